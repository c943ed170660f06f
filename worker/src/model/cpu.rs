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

impl Operand {
    fn new(x: Vec<f32>, m: usize) -> Self {
        Operand { x, m, quantized: RefCell::new(None) }
    }
}

/// `x · wᵀ (+ bias)` for the rows of `x`.
fn apply(w: &QMatrix, x: &Operand, bias: Option<&[f32]>) -> Result<Vec<f32>> {
    let kind = w.format().input_kind();
    let mut q = x.quantized.borrow_mut();
    if q.as_ref().is_none_or(|(k, _)| *k != kind) {
        *q = Some((kind, QInput::new(w.format(), &x.x, x.m, w.cols())?));
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
    let mut out = vec![0f32; x.len()];
    for (row, o) in x.chunks_exact(w.len()).zip(out.chunks_exact_mut(w.len())) {
        // Rounded as candle's `rms_norm` is: quantized matmuls round their inputs to 8 bits,
        // and a last-bit difference here can flip a code there.
        let rms = (row.iter().map(|v| v * v).sum::<f32>() / w.len() as f32 + eps).sqrt();
        for ((o, v), g) in o.iter_mut().zip(row).zip(w) {
            *o = v / rms * g;
        }
    }
    out
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
