//! The CPU backend: the weights on the host as their file stores them (a GGUF's quantized
//! blocks, or f32), row-independent matmuls over them ([`qmat::linear_input`]: each
//! activation row quantized once per matrix input and reused by the matrices that share
//! it, integer dot products, the kernels' thread pool), attention in each sequence's cache
//! on the host. Results do not depend on the batch a row is in, so a sequence decodes
//! bit-identically alone or batched (greedy decoding, preemption and migration rely on it).

use std::cell::RefCell;

use qaq_kernels::qmat::{self, InputKind, QInput, QMatrix};

use super::backend::Backend;
use super::decoder::{self, BatchItem, Ops, Plan};
use super::weights::HostWeights;
use super::{LlamaConfig, Result};

/// RoPE tables: `cos` and `sin` for every position and rotary pair, `[context, head_dim / 2]`.
#[derive(Debug)]
struct Rope {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
}

impl Rope {
    fn new(cfg: &LlamaConfig) -> Self {
        let (hd, half) = (cfg.head_dim, cfg.head_dim / 2);
        let mut cos = Vec::with_capacity(cfg.context_length * half);
        let mut sin = Vec::with_capacity(cfg.context_length * half);
        for pos in 0..cfg.context_length {
            for i in 0..half {
                let freq = 1.0 / (cfg.rope_theta as f64).powf(2.0 * i as f64 / hd as f64);
                let a = pos as f64 * freq;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Self { cos, sin, half }
    }

    /// Rotates rows `[n, heads * head_dim]` in place (rotate-half convention).
    fn apply(&self, rows: &mut [f32], heads: usize, positions: &[usize]) {
        let half = self.half;
        for (row, &pos) in rows.chunks_exact_mut(heads * 2 * half).zip(positions) {
            let (cos, sin) = (&self.cos[pos * half..][..half], &self.sin[pos * half..][..half]);
            for head in row.chunks_exact_mut(2 * half) {
                let (a, b) = head.split_at_mut(half);
                for i in 0..half {
                    let (x0, x1) = (a[i], b[i]);
                    a[i] = x0 * cos[i] - x1 * sin[i];
                    b[i] = x1 * cos[i] + x0 * sin[i];
                }
            }
        }
    }
}

/// A model's weights on the host and the CPU kernels that run them.
#[derive(Debug)]
pub struct CpuBackend {
    cfg: LlamaConfig,
    weights: HostWeights,
    rope: Rope,
}

impl CpuBackend {
    pub fn new(cfg: LlamaConfig, weights: HostWeights) -> Self {
        Self { rope: Rope::new(&cfg), cfg, weights }
    }
}

impl Backend for CpuBackend {
    fn device(&self) -> String {
        "cpu".to_string()
    }

    fn memory(&self) -> Option<(usize, usize)> {
        None
    }

    fn host_weights(&self) -> Option<&HostWeights> {
        Some(&self.weights)
    }

    fn forward(&self, plan: &Plan, items: &mut [BatchItem<'_>], rows: &[usize]) -> Result<Vec<f32>> {
        decoder::run(&CpuPass { b: self, plan }, &self.cfg, &self.weights, items, rows)
    }

    #[cfg(feature = "cuda")]
    fn cuda_context(&self) -> Option<std::sync::Arc<qaq_kernels::cuda::cudarc::driver::CudaContext>> {
        None
    }
}

/// One forward pass on the CPU.
struct CpuPass<'a> {
    b: &'a CpuBackend,
    plan: &'a Plan,
}

impl CpuPass<'_> {
    fn n(&self) -> usize {
        self.plan.ids.len()
    }
}

/// Activations about to meet weight matrices: the f32 rows, and their quantized form for
/// the last input kind asked (Q, K and V share one; so do gate and up).
pub struct Operand {
    x: Vec<f32>,
    m: usize,
    quantized: RefCell<Option<(InputKind, QInput)>>,
}

/// Spare buffers kept per thread, at most (a pass holds a few operands at a time).
const SPARE_INPUTS_MAX: usize = 4;

thread_local! {
    /// Quantized-activation buffers of dropped operands, reused by the next ones (no
    /// allocation or zeroing per matmul input in the steady state).
    static SPARE_INPUTS: RefCell<Vec<QInput>> = const { RefCell::new(Vec::new()) };
}

impl Operand {
    fn new(x: Vec<f32>, m: usize) -> Self {
        Operand { x, m, quantized: RefCell::new(None) }
    }
}

impl Drop for Operand {
    fn drop(&mut self) {
        if let Some((_, q)) = self.quantized.get_mut().take() {
            SPARE_INPUTS.with_borrow_mut(|s| {
                if s.len() < SPARE_INPUTS_MAX {
                    s.push(q)
                }
            });
        }
    }
}

/// `x · wᵀ (+ bias)` for the rows of `x`.
fn apply(w: &QMatrix, x: &Operand, bias: Option<&[f32]>) -> Result<Vec<f32>> {
    let kind = w.format().input_kind();
    let mut q = x.quantized.borrow_mut();
    if q.as_ref().is_none_or(|(k, _)| *k != kind) {
        let mut input = match q.take() {
            Some((_, input)) => input,
            None => SPARE_INPUTS.with_borrow_mut(|s| s.pop()).unwrap_or_default(),
        };
        input.refill(w.format(), &x.x, x.m, w.cols())?;
        *q = Some((kind, input));
    }
    let (_, input) = q.as_ref().expect("quantized above");
    let mut out = vec![0f32; x.m * w.rows()];
    qmat::linear_input(w, input, &mut out)?;
    if let Some(b) = bias {
        for row in out.chunks_exact_mut(w.rows()) {
            for (o, b) in row.iter_mut().zip(b) {
                *o += b;
            }
        }
    }
    Ok(out)
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let h = w.len();
    let mut out = vec![0f32; x.len()];
    let norm = |rows: &[f32], outs: &mut [f32], ss: &[f32]| {
        for ((row, o), &ss) in rows.chunks_exact(h).zip(outs.chunks_exact_mut(h)).zip(ss) {
            // Rounded as candle's `rms_norm` is: quantized matmuls round their inputs to 8
            // bits, and a last-bit difference here can flip a code there.
            let rms = (ss / h as f32 + eps).sqrt();
            for ((o, v), g) in o.iter_mut().zip(row).zip(w) {
                *o = v / rms * g;
            }
        }
    };
    let mut rows = x.chunks_exact(8 * h);
    let mut outs = out.chunks_exact_mut(8 * h);
    for (r8, o8) in (&mut rows).zip(&mut outs) {
        norm(r8, o8, &squares::<8>(r8, h));
    }
    for (r, o) in rows.remainder().chunks_exact(h).zip(outs.into_remainder().chunks_exact_mut(h)) {
        norm(r, o, &squares::<1>(r, h));
    }
    out
}

/// The sums of squares of `N` rows of `h` values, each added up in order as one row alone
/// (`Σ v²` from the first value on), the rows' independent chains interleaved.
fn squares<const N: usize>(rows: &[f32], h: usize) -> [f32; N] {
    let mut ss = [0f32; N];
    for j in 0..h {
        for (r, s) in ss.iter_mut().enumerate() {
            let v = rows[r * h + j];
            *s += v * v;
        }
    }
    ss
}

impl Ops for CpuPass<'_> {
    type Mat = QMatrix;
    type Vec = Vec<f32>;
    type Buf = Vec<f32>;
    type In = Operand;

    fn embed(&self, table: &QMatrix) -> Result<Vec<f32>> {
        let h = table.cols();
        let mut x = vec![0f32; self.n() * h];
        for (&t, row) in self.plan.ids.iter().zip(x.chunks_exact_mut(h)) {
            table.dequantize_row(t as usize, row)?;
        }
        Ok(x)
    }

    fn rms_norm(&self, x: &Vec<f32>, w: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(rms_norm(x, w, self.b.cfg.rms_eps as f32))
    }

    fn operand(&self, x: Vec<f32>) -> Result<Operand> {
        Ok(Operand::new(x, self.n()))
    }

    fn linear(&self, w: &QMatrix, x: &Operand, bias: Option<&Vec<f32>>) -> Result<Vec<f32>> {
        apply(w, x, bias.map(Vec::as_slice))
    }

    fn rope(&self, x: &mut Vec<f32>, heads: usize) -> Result<()> {
        self.b.rope.apply(x, heads, &self.plan.positions);
        Ok(())
    }

    fn add(&self, x: &mut Vec<f32>, y: &Vec<f32>) -> Result<()> {
        for (a, b) in x.iter_mut().zip(y) {
            *a += b;
        }
        Ok(())
    }

    fn silu_mul(&self, mut gate: Vec<f32>, up: &Vec<f32>) -> Result<Vec<f32>> {
        qaq_kernels::simd::silu_mul(&mut gate, up);
        Ok(gate)
    }

    fn attention(
        &self,
        layer: usize,
        items: &mut [BatchItem<'_>],
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
    ) -> Result<Vec<f32>> {
        let cfg = &self.b.cfg;
        let (qw, kvw) = (cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim);
        let mut out = vec![0f32; self.n() * qw];
        decoder::cache_step(items, &self.plan.spans, layer, [q, k, v], (qw, kvw), &mut out, None)?;
        Ok(out)
    }

    fn logits(&self, x: &Vec<f32>, norm: &Vec<f32>, head: &QMatrix, rows: &[usize]) -> Result<Vec<f32>> {
        let h = self.b.cfg.hidden_size;
        let mut sel = Vec::with_capacity(rows.len() * h);
        for &r in rows {
            sel.extend_from_slice(&x[r * h..][..h]);
        }
        let sel = rms_norm(&sel, norm, self.b.cfg.rms_eps as f32);
        apply(head, &Operand::new(sel, rows.len()), None)
    }
}

#[cfg(test)]
mod tests {
    use super::rms_norm;

    /// Each row normalized as alone, bit for bit: 1 to 19 rows (whole groups of 8 and
    /// the rows after them), against the one-row formula.
    #[test]
    fn rms_norm_of_many_rows_equals_each_row_alone() {
        let h = 96;
        let mut seed = 7u32;
        let mut next = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1 << 24) as f32 * 6.0 - 3.0
        };
        let w: Vec<f32> = (0..h).map(|_| next()).collect();
        for m in 1..20 {
            let x: Vec<f32> = (0..m * h).map(|_| next()).collect();
            let got = rms_norm(&x, &w, 1e-5);
            for (row, g) in x.chunks_exact(h).zip(got.chunks_exact(h)) {
                let rms = (row.iter().map(|v| v * v).sum::<f32>() / h as f32 + 1e-5).sqrt();
                let want: Vec<f32> = row.iter().zip(&w).map(|(v, g)| v / rms * g).collect();
                assert_eq!(
                    g.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{m} rows"
                );
            }
        }
    }
}
