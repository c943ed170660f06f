//! The llama-family forward pass (Llama, Mistral, Qwen2): RMSNorm, GQA
//! attention with RoPE (rotate-half convention, HF weight layout), SwiGLU MLP.
//!
//! Weights are immutable after loading. The KV cache is passed in per
//! sequence ([`KvCache`]); a batch may mix prefill chunks and decode steps of
//! different sequences at different positions: all their tokens go through the
//! dense layers as one matrix, attention runs per sequence.

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor};

use super::kv::{KvCache, KvShape};
use super::{LlamaConfig, ModelError, Result};

struct Layer {
    attn_norm: Tensor,
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    bq: Option<Tensor>,
    bk: Option<Tensor>,
    bv: Option<Tensor>,
    wo: Tensor,
    ffn_norm: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
}

/// A loaded llama-family model.
pub struct Llama {
    cfg: LlamaConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Tensor,
    /// `cos` and `sin` for every position and rotary pair, `[context, head_dim / 2]`.
    rope_cos: Vec<f32>,
    rope_sin: Vec<f32>,
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

fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = x.matmul(&w.t()?)?;
    Ok(match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

impl Llama {
    /// Builds the model from HF-named f32 weights (`model.layers.N.self_attn.q_proj.weight`, ...).
    pub fn from_weights(cfg: LlamaConfig, mut w: HashMap<String, Tensor>) -> Result<Self> {
        cfg.validate()?;
        let mut take = |name: &str| -> Result<Tensor> {
            let t = w.remove(name).ok_or_else(|| ModelError::Format(format!("missing tensor {name}")))?;
            Ok(t.to_dtype(DType::F32)?.contiguous()?)
        };
        let embed = take("model.embed_tokens.weight")?;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let p = format!("model.layers.{i}");
            layers.push(Layer {
                attn_norm: take(&format!("{p}.input_layernorm.weight"))?,
                wq: take(&format!("{p}.self_attn.q_proj.weight"))?,
                wk: take(&format!("{p}.self_attn.k_proj.weight"))?,
                wv: take(&format!("{p}.self_attn.v_proj.weight"))?,
                bq: take(&format!("{p}.self_attn.q_proj.bias")).ok(),
                bk: take(&format!("{p}.self_attn.k_proj.bias")).ok(),
                bv: take(&format!("{p}.self_attn.v_proj.bias")).ok(),
                wo: take(&format!("{p}.self_attn.o_proj.weight"))?,
                ffn_norm: take(&format!("{p}.post_attention_layernorm.weight"))?,
                w_gate: take(&format!("{p}.mlp.gate_proj.weight"))?,
                w_up: take(&format!("{p}.mlp.up_proj.weight"))?,
                w_down: take(&format!("{p}.mlp.down_proj.weight"))?,
            });
        }
        let norm = take("model.norm.weight")?;
        let lm_head = if cfg.tie_embeddings { embed.clone() } else { take("lm_head.weight")? };
        let expect = [
            (&embed, vec![cfg.vocab_size, cfg.hidden_size], "embed_tokens"),
            (&lm_head, vec![cfg.vocab_size, cfg.hidden_size], "lm_head"),
            (&layers[0].wq, vec![cfg.n_heads * cfg.head_dim, cfg.hidden_size], "q_proj"),
            (&layers[0].wk, vec![cfg.n_kv_heads * cfg.head_dim, cfg.hidden_size], "k_proj"),
            (&layers[0].w_up, vec![cfg.intermediate_size, cfg.hidden_size], "up_proj"),
        ];
        for (t, dims, name) in expect {
            if t.dims() != dims.as_slice() {
                return Err(ModelError::Format(format!("{name}: shape {:?}, expected {dims:?}", t.dims())));
            }
        }
        let half = cfg.head_dim / 2;
        let mut rope_cos = Vec::with_capacity(cfg.context_length * half);
        let mut rope_sin = Vec::with_capacity(cfg.context_length * half);
        for pos in 0..cfg.context_length {
            for i in 0..half {
                let freq = 1.0 / (cfg.rope_theta as f64).powf(2.0 * i as f64 / cfg.head_dim as f64);
                let a = pos as f64 * freq;
                rope_cos.push(a.cos() as f32);
                rope_sin.push(a.sin() as f32);
            }
        }
        Ok(Self { cfg, embed, layers, norm, lm_head, rope_cos, rope_sin })
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

    fn rms_norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(x, w, self.cfg.rms_eps as f32)?)
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
    /// stay within the context.
    pub fn forward(&self, items: &mut [BatchItem<'_>]) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (hd, nh, nkv) = (cfg.head_dim, cfg.n_heads, cfg.n_kv_heads);
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
        let n = ids.len();
        let dev = Device::Cpu;
        let mut x = self.embed.index_select(&Tensor::from_vec(ids, n, &dev)?, 0)?;
        let (qw, kvw) = (nh * hd, nkv * hd);
        let mut attn = vec![0f32; n * qw];
        for (li, l) in self.layers.iter().enumerate() {
            let h = self.rms_norm(&x, &l.attn_norm)?;
            let mut q = linear(&h, &l.wq, l.bq.as_ref())?.flatten_all()?.to_vec1::<f32>()?;
            let mut k = linear(&h, &l.wk, l.bk.as_ref())?.flatten_all()?.to_vec1::<f32>()?;
            let v = linear(&h, &l.wv, l.bv.as_ref())?.flatten_all()?.to_vec1::<f32>()?;
            self.rope(&mut q, nh, &positions);
            self.rope(&mut k, nkv, &positions);
            for (it, &(off, len)) in items.iter_mut().zip(&spans) {
                it.kv.append(li, &k[off * kvw..(off + len) * kvw], &v[off * kvw..(off + len) * kvw])?;
                it.kv.attend(li, &q[off * qw..(off + len) * qw], len, &mut attn[off * qw..(off + len) * qw])?;
            }
            let a = Tensor::from_slice(&attn, (n, qw), &dev)?;
            x = (x + linear(&a, &l.wo, None)?)?;
            let h = self.rms_norm(&x, &l.ffn_norm)?;
            let g = linear(&h, &l.w_gate, None)?.silu()?;
            let u = linear(&h, &l.w_up, None)?;
            x = (x + linear(&(g * u)?, &l.w_down, None)?)?;
        }
        for it in items.iter_mut() {
            it.kv.end_step();
        }
        let last: Vec<u32> = spans.iter().map(|&(off, len)| (off + len - 1) as u32).collect();
        let b = last.len();
        let x = x.index_select(&Tensor::from_vec(last, b, &dev)?, 0)?;
        let x = self.rms_norm(&x, &self.norm)?;
        Ok(x.apply(&LmHead(&self.lm_head))?)
    }
}

struct LmHead<'a>(&'a Tensor);

impl Module for LmHead<'_> {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.matmul(&self.0.t()?)
    }
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
