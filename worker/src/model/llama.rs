//! The llama-family forward pass (Llama, Mistral, Qwen2): RMSNorm, GQA
//! attention with RoPE (rotate-half convention, HF weight layout), SwiGLU MLP.
//!
//! Weights are immutable after loading. The KV cache is passed in per
//! sequence ([`KvCache`]); a batch may mix prefill chunks and decode steps of
//! different sequences at different positions: all their tokens go through the
//! dense layers as one matrix, attention runs per sequence.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use super::kv::{KvCache, KvShape};
use super::matmul::linear_rows;
use super::{LlamaConfig, ModelError, Result};

/// A weight matrix `[rows, cols]`, row-major f32.
pub(super) struct Mat {
    pub(super) data: Vec<f32>,
    pub(super) rows: usize,
    pub(super) cols: usize,
}

impl Mat {
    fn from_tensor(t: Tensor) -> Result<Self> {
        let (rows, cols) = t.dims2()?;
        Ok(Self { data: t.flatten_all()?.to_vec1::<f32>()?, rows, cols })
    }

    /// `x · selfᵀ (+ bias)` for `m` rows of `x`.
    fn apply(&self, x: &[f32], m: usize, bias: Option<&[f32]>) -> Vec<f32> {
        let mut out = vec![0f32; m * self.rows];
        linear_rows(x, m, &self.data, self.rows, self.cols, &mut out);
        if let Some(b) = bias {
            for row in out.chunks_exact_mut(self.rows) {
                for (o, b) in row.iter_mut().zip(b) {
                    *o += b;
                }
            }
        }
        out
    }
}

pub(super) struct Layer {
    pub(super) attn_norm: Vec<f32>,
    pub(super) wq: Mat,
    pub(super) wk: Mat,
    pub(super) wv: Mat,
    pub(super) bq: Option<Vec<f32>>,
    pub(super) bk: Option<Vec<f32>>,
    pub(super) bv: Option<Vec<f32>>,
    pub(super) wo: Mat,
    pub(super) ffn_norm: Vec<f32>,
    pub(super) w_gate: Mat,
    pub(super) w_up: Mat,
    pub(super) w_down: Mat,
}

/// A loaded llama-family model. It runs on the CPU unless [`Llama::use_gpu`] gave it a
/// GPU copy of its weights (feature `cuda`); then [`Llama::forward`] runs there.
pub struct Llama {
    pub(super) cfg: LlamaConfig,
    /// `[vocab, hidden]`; also the output projection when tied.
    pub(super) embed: Mat,
    pub(super) layers: Vec<Layer>,
    pub(super) norm: Vec<f32>,
    /// `None` when tied to `embed`.
    pub(super) lm_head: Option<Mat>,
    /// `cos` and `sin` for every position and rotary pair, `[context, head_dim / 2]`.
    rope_cos: Vec<f32>,
    rope_sin: Vec<f32>,
    #[cfg(feature = "cuda")]
    gpu: Option<Box<super::gpu::GpuLlama>>,
}

impl std::fmt::Debug for Llama {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Llama").field("cfg", &self.cfg).finish_non_exhaustive()
    }
}

/// One sequence's part of a batch.
pub struct BatchItem<'a> {
    /// Tokens to feed, at positions `kv.len()..kv.len() + tokens.len()`.
    pub tokens: &'a [u32],
    /// The sequence's cache.
    pub kv: &'a mut dyn KvCache,
}

/// The last hidden state of every fed token, and each item's (offset, length) in it.
type Hidden = (Vec<f32>, Vec<(usize, usize)>);

/// A batch flattened for the dense layers: every fed token's id and position, and each
/// item's (offset, length) among them.
pub(super) struct Plan {
    pub(super) ids: Vec<u32>,
    pub(super) positions: Vec<usize>,
    pub(super) spans: Vec<(usize, usize)>,
}

fn vec1(t: Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

impl Llama {
    /// Builds the model from HF-named weights (`model.layers.N.self_attn.q_proj.weight`, ...).
    pub fn from_weights(cfg: LlamaConfig, mut w: HashMap<String, Tensor>) -> Result<Self> {
        cfg.validate()?;
        let mut take = |name: &str| -> Result<Tensor> {
            let t = w.remove(name).ok_or_else(|| ModelError::Format(format!("missing tensor {name}")))?;
            Ok(t.to_dtype(DType::F32)?.contiguous()?)
        };
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let expect = |t: &Tensor, dims: [usize; 2], name: &str| -> Result<()> {
            if t.dims() != dims {
                return Err(ModelError::Format(format!("{name}: shape {:?}, expected {dims:?}", t.dims())));
            }
            Ok(())
        };
        let mut mat = |name: &str, dims: [usize; 2]| -> Result<Mat> {
            let t = take(name)?;
            expect(&t, dims, name)?;
            Mat::from_tensor(t)
        };
        let embed = mat("model.embed_tokens.weight", [cfg.vocab_size, h])?;
        let (q_out, kv_out) = (cfg.n_heads * hd, cfg.n_kv_heads * hd);
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let p = format!("model.layers.{i}");
            layers.push(Layer {
                wq: mat(&format!("{p}.self_attn.q_proj.weight"), [q_out, h])?,
                wk: mat(&format!("{p}.self_attn.k_proj.weight"), [kv_out, h])?,
                wv: mat(&format!("{p}.self_attn.v_proj.weight"), [kv_out, h])?,
                wo: mat(&format!("{p}.self_attn.o_proj.weight"), [h, q_out])?,
                w_gate: mat(&format!("{p}.mlp.gate_proj.weight"), [cfg.intermediate_size, h])?,
                w_up: mat(&format!("{p}.mlp.up_proj.weight"), [cfg.intermediate_size, h])?,
                w_down: mat(&format!("{p}.mlp.down_proj.weight"), [h, cfg.intermediate_size])?,
                attn_norm: Vec::new(),
                ffn_norm: Vec::new(),
                bq: None,
                bk: None,
                bv: None,
            });
        }
        let lm_head = if cfg.tie_embeddings { None } else { Some(mat("lm_head.weight", [cfg.vocab_size, h])?) };
        for (i, l) in layers.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            l.attn_norm = vec1(take(&format!("{p}.input_layernorm.weight"))?)?;
            l.ffn_norm = vec1(take(&format!("{p}.post_attention_layernorm.weight"))?)?;
            l.bq = take(&format!("{p}.self_attn.q_proj.bias")).ok().map(vec1).transpose()?;
            l.bk = take(&format!("{p}.self_attn.k_proj.bias")).ok().map(vec1).transpose()?;
            l.bv = take(&format!("{p}.self_attn.v_proj.bias")).ok().map(vec1).transpose()?;
            if l.attn_norm.len() != h || l.ffn_norm.len() != h {
                return Err(ModelError::Format(format!("layer {i}: norm weights must have {h} values")));
            }
        }
        let norm = vec1(take("model.norm.weight")?)?;
        let half = hd / 2;
        let mut rope_cos = Vec::with_capacity(cfg.context_length * half);
        let mut rope_sin = Vec::with_capacity(cfg.context_length * half);
        for pos in 0..cfg.context_length {
            for i in 0..half {
                let freq = 1.0 / (cfg.rope_theta as f64).powf(2.0 * i as f64 / hd as f64);
                let a = pos as f64 * freq;
                rope_cos.push(a.cos() as f32);
                rope_sin.push(a.sin() as f32);
            }
        }
        Ok(Self {
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            rope_cos,
            rope_sin,
            #[cfg(feature = "cuda")]
            gpu: None,
        })
    }

    /// Uploads the weights to GPU `ordinal` (as f16) and runs every later forward pass
    /// there; returns the device's name. The KV caches keep their host copy behind the
    /// [`KvCache`] seam and attend on the device through their device tier (see
    /// [`super::gpu`]).
    #[cfg(feature = "cuda")]
    pub fn use_gpu(&mut self, ordinal: usize) -> Result<String> {
        let gpu = super::gpu::GpuLlama::upload(self, ordinal)?;
        let name = gpu.device_name();
        self.gpu = Some(Box::new(gpu));
        Ok(name)
    }

    /// On a GPU: the device's memory in use (by every process) and its total, as the
    /// driver reports them. `None` on the CPU or when the driver cannot say.
    pub fn gpu_memory(&self) -> Option<(usize, usize)> {
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.gpu {
            return g.memory();
        }
        None
    }

    /// On a GPU: its CUDA context (for transfers off the engine thread, e.g. NCCL).
    #[cfg(feature = "cuda")]
    pub fn cuda_context(&self) -> Option<std::sync::Arc<qaq_kernels::cuda::cudarc::driver::CudaContext>> {
        self.gpu.as_ref().map(|g| g.context().clone())
    }

    /// Where the forward pass runs: `cpu` or `cuda:N`.
    pub fn device(&self) -> String {
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.gpu {
            return format!("cuda:{}", g.ordinal());
        }
        "cpu".to_string()
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// Shapes of a cache for this model.
    pub fn kv_shape(&self) -> KvShape {
        KvShape {
            n_layers: self.cfg.n_layers,
            n_heads: self.cfg.n_heads,
            n_kv_heads: self.cfg.n_kv_heads,
            head_dim: self.cfg.head_dim,
        }
    }

    /// RMSNorm of each row of `x` (width `hidden`).
    fn rms_norm(&self, x: &[f32], w: &[f32]) -> Vec<f32> {
        let eps = self.cfg.rms_eps as f32;
        let mut out = vec![0f32; x.len()];
        for (row, o) in x.chunks_exact(w.len()).zip(out.chunks_exact_mut(w.len())) {
            let ms = row.iter().map(|v| v * v).sum::<f32>() / w.len() as f32;
            let r = 1.0 / (ms + eps).sqrt();
            for ((o, v), g) in o.iter_mut().zip(row).zip(w) {
                *o = v * r * g;
            }
        }
        out
    }

    /// Applies RoPE in place to rows `[n, heads * head_dim]` at the given positions.
    fn rope(&self, rows: &mut [f32], heads: usize, positions: &[usize]) {
        let hd = self.cfg.head_dim;
        let half = hd / 2;
        for (row, &pos) in rows.chunks_exact_mut(heads * hd).zip(positions) {
            let (cos, sin) = (&self.rope_cos[pos * half..][..half], &self.rope_sin[pos * half..][..half]);
            for head in row.chunks_exact_mut(hd) {
                let (a, b) = head.split_at_mut(half);
                for i in 0..half {
                    let (x0, x1) = (a[i], b[i]);
                    a[i] = x0 * cos[i] - x1 * sin[i];
                    b[i] = x1 * cos[i] + x0 * sin[i];
                }
            }
        }
    }

    /// Runs one step for a batch and returns the logits of each item's last
    /// token, `[batch, vocab]`. Every item must feed at least one token and
    /// stay within the context. Each row is computed independently of the
    /// others (see [`linear_rows`]), so results do not depend on the batch.
    pub fn forward(&self, items: &mut [BatchItem<'_>]) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.gpu {
            let (logits, n) = g.forward(self, items, false)?;
            return Ok(Tensor::from_vec(logits, (n, self.cfg.vocab_size), &Device::Cpu)?);
        }
        let (x, spans) = self.hidden(items)?;
        let last: Vec<usize> = spans.iter().map(|&(off, len)| off + len - 1).collect();
        let logits = self.logits(&x, &last);
        Ok(Tensor::from_vec(logits, (spans.len(), self.cfg.vocab_size), &Device::Cpu)?)
    }

    /// Like [`forward`](Self::forward), but returns the logits of every fed
    /// token (teacher forcing): `[total tokens, vocab]`, items in order, each
    /// item's tokens in order.
    pub fn forward_all(&self, items: &mut [BatchItem<'_>]) -> Result<Vec<f32>> {
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.gpu {
            return Ok(g.forward(self, items, true)?.0);
        }
        let (x, _) = self.hidden(items)?;
        let rows: Vec<usize> = (0..x.len() / self.cfg.hidden_size).collect();
        Ok(self.logits(&x, &rows))
    }

    /// Final-norm logits of the given rows of the last hidden state.
    fn logits(&self, x: &[f32], rows: &[usize]) -> Vec<f32> {
        let h = self.cfg.hidden_size;
        let mut sel = Vec::with_capacity(rows.len() * h);
        for &r in rows {
            sel.extend_from_slice(&x[r * h..][..h]);
        }
        let sel = self.rms_norm(&sel, &self.norm);
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        head.apply(&sel, rows.len(), None)
    }

    /// Checks a batch (every item feeds a token, stays within the context, uses ids of
    /// the vocabulary) and flattens it.
    pub(super) fn plan(&self, items: &[BatchItem<'_>]) -> Result<Plan> {
        let cfg = &self.cfg;
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut spans = Vec::with_capacity(items.len());
        for it in items.iter() {
            let start = it.kv.len();
            if it.tokens.is_empty() {
                return Err(ModelError::Format("batch item without tokens".into()));
            }
            if start + it.tokens.len() > cfg.context_length {
                return Err(ModelError::Format(format!(
                    "sequence of {} tokens exceeds the context of {}",
                    start + it.tokens.len(),
                    cfg.context_length
                )));
            }
            if let Some(&bad) = it.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
                return Err(ModelError::Format(format!("token id {bad} outside the vocabulary")));
            }
            spans.push((ids.len(), it.tokens.len()));
            ids.extend_from_slice(it.tokens);
            positions.extend(start..start + it.tokens.len());
        }
        Ok(Plan { ids, positions, spans })
    }

    /// The decoder stack: the last hidden state of every fed token
    /// (`[total tokens, hidden]`) and each item's (offset, length) in it.
    fn hidden(&self, items: &mut [BatchItem<'_>]) -> Result<Hidden> {
        let cfg = &self.cfg;
        let (hd, nh, nkv, h) = (cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.hidden_size);
        let Plan { ids, positions, spans } = self.plan(items)?;
        let n = ids.len();
        let mut x = Vec::with_capacity(n * h);
        for &t in &ids {
            x.extend_from_slice(&self.embed.data[t as usize * h..][..h]);
        }
        let (qw, kvw) = (nh * hd, nkv * hd);
        let mut attn = vec![0f32; n * qw];
        for (li, l) in self.layers.iter().enumerate() {
            let hn = self.rms_norm(&x, &l.attn_norm);
            let mut q = l.wq.apply(&hn, n, l.bq.as_deref());
            let mut k = l.wk.apply(&hn, n, l.bk.as_deref());
            let v = l.wv.apply(&hn, n, l.bv.as_deref());
            self.rope(&mut q, nh, &positions);
            self.rope(&mut k, nkv, &positions);
            cache_step(items, &spans, li, [&q, &k, &v], (qw, kvw), &mut attn)?;
            for (a, b) in x.iter_mut().zip(l.wo.apply(&attn, n, None)) {
                *a += b;
            }
            let hn = self.rms_norm(&x, &l.ffn_norm);
            let mut g = l.w_gate.apply(&hn, n, None);
            let u = l.w_up.apply(&hn, n, None);
            for (g, u) in g.iter_mut().zip(&u) {
                *g = *g / (1.0 + (-*g).exp()) * u;
            }
            for (a, b) in x.iter_mut().zip(l.w_down.apply(&g, n, None)) {
                *a += b;
            }
        }
        for it in items.iter_mut() {
            it.kv.end_step();
        }
        Ok((x, spans))
    }
}

/// One layer's cache operations for every item of a batch: its new tokens' keys and
/// values (`qkv[1]`, `qkv[2]`, rows of `kvw`) are appended to its cache, and its queries
/// (`qkv[0]`, rows of `qw`) attend there, writing `attn`. (The GPU pass does the same
/// per item, attending on the device where a cache can: see [`super::gpu`].)
fn cache_step(
    items: &mut [BatchItem<'_>],
    spans: &[(usize, usize)],
    layer: usize,
    [q, k, v]: [&[f32]; 3],
    (qw, kvw): (usize, usize),
    attn: &mut [f32],
) -> Result<()> {
    for (it, &(off, len)) in items.iter_mut().zip(spans) {
        it.kv.append(layer, &k[off * kvw..(off + len) * kvw], &v[off * kvw..(off + len) * kvw])?;
        it.kv.attend(layer, &q[off * qw..(off + len) * qw], len, &mut attn[off * qw..(off + len) * qw])?;
    }
    Ok(())
}

/// Random HF-named weights for a config (deterministic; for tests and benches).
pub fn random_weights(cfg: &LlamaConfig, seed: u64) -> HashMap<String, Tensor> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut t = |dims: &[usize], scale: f32| {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0) * scale).collect();
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    };
    let (h, i, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
    let mut w = HashMap::new();
    w.insert("model.embed_tokens.weight".into(), t(&[cfg.vocab_size, h], 1.0));
    w.insert("lm_head.weight".into(), t(&[cfg.vocab_size, h], 0.2));
    w.insert("model.norm.weight".into(), t(&[h], 1.0).affine(0.1, 1.0).unwrap());
    for l in 0..cfg.n_layers {
        let p = format!("model.layers.{l}");
        w.insert(format!("{p}.input_layernorm.weight"), t(&[h], 1.0).affine(0.1, 1.0).unwrap());
        w.insert(format!("{p}.post_attention_layernorm.weight"), t(&[h], 1.0).affine(0.1, 1.0).unwrap());
        w.insert(format!("{p}.self_attn.q_proj.weight"), t(&[cfg.n_heads * hd, h], 0.3));
        w.insert(format!("{p}.self_attn.k_proj.weight"), t(&[cfg.n_kv_heads * hd, h], 0.3));
        w.insert(format!("{p}.self_attn.v_proj.weight"), t(&[cfg.n_kv_heads * hd, h], 0.3));
        w.insert(format!("{p}.self_attn.o_proj.weight"), t(&[h, cfg.n_heads * hd], 0.2));
        w.insert(format!("{p}.mlp.gate_proj.weight"), t(&[i, h], 0.2));
        w.insert(format!("{p}.mlp.up_proj.weight"), t(&[i, h], 0.2));
        w.insert(format!("{p}.mlp.down_proj.weight"), t(&[h, i], 0.2));
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kv::DenseKv;

    #[test]
    fn batched_mixed_steps_equal_separate_runs() {
        let cfg = LlamaConfig::tiny();
        let m = Llama::from_weights(cfg.clone(), random_weights(&cfg, 7)).unwrap();
        let (a, b) = ([3u32, 5, 7, 11], [13u32, 17]);
        // Separately: each sequence prefilled alone.
        let mut ka = DenseKv::new(m.kv_shape());
        let la = m.forward(&mut [BatchItem { tokens: &a, kv: &mut ka }]).unwrap();
        let mut kb = DenseKv::new(m.kv_shape());
        m.forward(&mut [BatchItem { tokens: &b[..1], kv: &mut kb }]).unwrap();
        let lb = m.forward(&mut [BatchItem { tokens: &b[1..], kv: &mut kb }]).unwrap();
        // Together: a's prefill beside b's decode step.
        let mut ka2 = DenseKv::new(m.kv_shape());
        let mut kb2 = DenseKv::new(m.kv_shape());
        m.forward(&mut [BatchItem { tokens: &b[..1], kv: &mut kb2 }]).unwrap();
        let both = m
            .forward(&mut [BatchItem { tokens: &a, kv: &mut ka2 }, BatchItem { tokens: &b[1..], kv: &mut kb2 }])
            .unwrap();
        let diff =
            |x: &Tensor, y: &Tensor| (x - y).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff(&both.get(0).unwrap(), &la.get(0).unwrap()) < 1e-4);
        assert!(diff(&both.get(1).unwrap(), &lb.get(0).unwrap()) < 1e-4);
        assert_eq!(ka2.len(), 4);
        assert_eq!(kb2.len(), 2);
    }

    #[test]
    fn rejects_out_of_vocab_and_overlong_input() {
        let cfg = LlamaConfig::tiny();
        let m = Llama::from_weights(cfg.clone(), random_weights(&cfg, 1)).unwrap();
        let mut kv = DenseKv::new(m.kv_shape());
        assert!(m.forward(&mut [BatchItem { tokens: &[1000], kv: &mut kv }]).is_err());
        let long = vec![1u32; cfg.context_length + 1];
        assert!(m.forward(&mut [BatchItem { tokens: &long, kv: &mut kv }]).is_err());
        assert!(m.forward(&mut [BatchItem { tokens: &[], kv: &mut kv }]).is_err());
    }
}
