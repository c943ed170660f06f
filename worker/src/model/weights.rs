//! A llama-family model's weights, generic over where they live: [`Weights<M, V>`] with
//! matrices `M` and vectors `V`. The loader builds [`HostWeights`] (row-major f32 on the
//! host, HF layout); a backend keeps them (the CPU) or maps them into its own memory once
//! (a GPU: [`Weights::map`]). The decoder stack ([`super::decoder`]) reads either through
//! the backend's operations, so it is written once.

use std::collections::HashMap;

use candle_core::{DType, Tensor};

use super::{LlamaConfig, ModelError, Result};

/// One decoder layer's weights.
#[derive(Debug)]
pub struct LayerWeights<M, V> {
    pub attn_norm: V,
    pub wq: M,
    pub wk: M,
    pub wv: M,
    pub bq: Option<V>,
    pub bk: Option<V>,
    pub bv: Option<V>,
    pub wo: M,
    pub ffn_norm: V,
    pub w_gate: M,
    pub w_up: M,
    pub w_down: M,
}

/// Every weight of a model.
#[derive(Debug)]
pub struct Weights<M, V> {
    /// `[vocab, hidden]`; also the output projection when tied.
    pub embed: M,
    pub layers: Vec<LayerWeights<M, V>>,
    /// The final norm.
    pub norm: V,
    /// `None` when tied to `embed`.
    pub lm_head: Option<M>,
}

impl<M, V> Weights<M, V> {
    /// The output projection (the embedding when tied).
    pub fn head(&self) -> &M {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// The same weights with every matrix through `fm` and every vector through `fv`
    /// (e.g. uploaded to a device).
    pub fn map<M2, V2, E>(
        &self,
        mut fm: impl FnMut(&M) -> Result<M2, E>,
        mut fv: impl FnMut(&V) -> Result<V2, E>,
    ) -> Result<Weights<M2, V2>, E> {
        let mut layers = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            layers.push(LayerWeights {
                attn_norm: fv(&l.attn_norm)?,
                wq: fm(&l.wq)?,
                wk: fm(&l.wk)?,
                wv: fm(&l.wv)?,
                bq: l.bq.as_ref().map(&mut fv).transpose()?,
                bk: l.bk.as_ref().map(&mut fv).transpose()?,
                bv: l.bv.as_ref().map(&mut fv).transpose()?,
                wo: fm(&l.wo)?,
                ffn_norm: fv(&l.ffn_norm)?,
                w_gate: fm(&l.w_gate)?,
                w_up: fm(&l.w_up)?,
                w_down: fm(&l.w_down)?,
            });
        }
        Ok(Weights {
            embed: fm(&self.embed)?,
            layers,
            norm: fv(&self.norm)?,
            lm_head: self.lm_head.as_ref().map(fm).transpose()?,
        })
    }
}

/// A weight matrix `[rows, cols]`, row-major f32, on the host.
#[derive(Debug)]
pub struct Mat {
    pub data: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

/// Weights as loaded: f32 on the host.
pub type HostWeights = Weights<Mat, Vec<f32>>;

fn vec1(t: Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

impl HostWeights {
    /// Builds the weights from HF-named tensors (`model.layers.N.self_attn.q_proj.weight`,
    /// ...), checking every shape against `cfg`.
    pub fn from_hf(cfg: &LlamaConfig, mut w: HashMap<String, Tensor>) -> Result<Self> {
        let mut take = |name: &str| -> Result<Tensor> {
            let t = w.remove(name).ok_or_else(|| ModelError::Format(format!("missing tensor {name}")))?;
            Ok(t.to_dtype(DType::F32)?.contiguous()?)
        };
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let mat = |take: &mut dyn FnMut(&str) -> Result<Tensor>, name: &str, dims: [usize; 2]| -> Result<Mat> {
            let t = take(name)?;
            if t.dims() != dims {
                return Err(ModelError::Format(format!("{name}: shape {:?}, expected {dims:?}", t.dims())));
            }
            let (rows, cols) = t.dims2()?;
            Ok(Mat { data: vec1(t)?, rows, cols })
        };
        let norm = |take: &mut dyn FnMut(&str) -> Result<Tensor>, name: &str| -> Result<Vec<f32>> {
            let v = vec1(take(name)?)?;
            if v.len() != h {
                return Err(ModelError::Format(format!("{name}: norm weights must have {h} values")));
            }
            Ok(v)
        };
        let embed = mat(&mut take, "model.embed_tokens.weight", [cfg.vocab_size, h])?;
        let (q_out, kv_out, inter) = (cfg.n_heads * hd, cfg.n_kv_heads * hd, cfg.intermediate_size);
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let p = format!("model.layers.{i}");
            let mut bias = |name: &str| take(&format!("{p}.self_attn.{name}.bias")).ok().map(vec1).transpose();
            let (bq, bk, bv) = (bias("q_proj")?, bias("k_proj")?, bias("v_proj")?);
            layers.push(LayerWeights {
                attn_norm: norm(&mut take, &format!("{p}.input_layernorm.weight"))?,
                wq: mat(&mut take, &format!("{p}.self_attn.q_proj.weight"), [q_out, h])?,
                wk: mat(&mut take, &format!("{p}.self_attn.k_proj.weight"), [kv_out, h])?,
                wv: mat(&mut take, &format!("{p}.self_attn.v_proj.weight"), [kv_out, h])?,
                bq,
                bk,
                bv,
                wo: mat(&mut take, &format!("{p}.self_attn.o_proj.weight"), [h, q_out])?,
                ffn_norm: norm(&mut take, &format!("{p}.post_attention_layernorm.weight"))?,
                w_gate: mat(&mut take, &format!("{p}.mlp.gate_proj.weight"), [inter, h])?,
                w_up: mat(&mut take, &format!("{p}.mlp.up_proj.weight"), [inter, h])?,
                w_down: mat(&mut take, &format!("{p}.mlp.down_proj.weight"), [h, inter])?,
            });
        }
        let lm_head =
            if cfg.tie_embeddings { None } else { Some(mat(&mut take, "lm_head.weight", [cfg.vocab_size, h])?) };
        let norm = norm(&mut take, "model.norm.weight")?;
        Ok(Self { embed, layers, norm, lm_head })
    }
}

/// Random HF-named weights for a config (deterministic; for tests and benches).
pub fn random_weights(cfg: &LlamaConfig, seed: u64) -> HashMap<String, Tensor> {
    use candle_core::Device;
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
