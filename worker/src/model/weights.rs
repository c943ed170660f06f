//! A llama-family model's weights, generic over where they live: [`Weights<M, V>`] with
//! matrices `M` and vectors `V`. The loader builds [`HostWeights`]: matrices as their file
//! stores them ([`QMatrix`]: a GGUF's quantized blocks as they are, or f32 from
//! safetensors), vectors as f32, HF layout; a backend keeps them (the CPU) or maps them
//! into its own memory once (a GPU: [`Weights::map`]). The decoder stack
//! ([`super::decoder`]) reads either through the backend's operations, so it is written once.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use qaq_kernels::qmat::{QFormat, QMatrix};

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

/// Weights as loaded, on the host.
pub type HostWeights = Weights<QMatrix, Vec<f32>>;

/// One tensor of a model file as the host keeps it: a matrix in its file's format, or a
/// vector of f32 (norms, biases).
#[derive(Debug)]
pub enum HostTensor {
    Mat(QMatrix),
    Vec(Vec<f32>),
}

impl HostTensor {
    /// An f32 tensor of one or two dimensions (a matrix keeps f32).
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        let t = t.to_dtype(DType::F32)?.contiguous()?;
        Ok(match *t.dims() {
            [rows, cols] => {
                let v = t.flatten_all()?.to_vec1::<f32>()?;
                HostTensor::Mat(QMatrix::from_f32(QFormat::F32, rows, cols, &v)?)
            }
            _ => HostTensor::Vec(t.flatten_all()?.to_vec1::<f32>()?),
        })
    }

    /// The tensor dequantized to f32 (a reference in tests).
    pub fn to_tensor(&self) -> Result<Tensor> {
        Ok(match self {
            HostTensor::Mat(m) => Tensor::from_vec(m.dequantize(), (m.rows(), m.cols()), &Device::Cpu)?,
            HostTensor::Vec(v) => Tensor::from_vec(v.clone(), v.len(), &Device::Cpu)?,
        })
    }
}

impl HostWeights {
    /// Builds the weights from HF-named f32 tensors (`model.layers.N.self_attn.q_proj.weight`,
    /// ...), checking every shape against `cfg`.
    pub fn from_hf(cfg: &LlamaConfig, w: HashMap<String, Tensor>) -> Result<Self> {
        Self::from_named(cfg, host_tensors(&w)?)
    }

    /// Builds the weights from HF-named host tensors, checking every shape against `cfg`.
    pub fn from_named(cfg: &LlamaConfig, mut w: HashMap<String, HostTensor>) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let w = &mut w;
        let embed = mat(w, "model.embed_tokens.weight", [cfg.vocab_size, h])?;
        let lm_head = if cfg.tie_embeddings { None } else { Some(mat(w, "lm_head.weight", [cfg.vocab_size, h])?) };
        let (q_out, kv_out, inter) = (cfg.n_heads * hd, cfg.n_kv_heads * hd, cfg.intermediate_size);
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let p = format!("model.layers.{i}");
            let bias = |w: &mut HashMap<String, HostTensor>, name: &str, n: usize| {
                let name = format!("{p}.self_attn.{name}.bias");
                if w.contains_key(&name) { vector(w, &name, n).map(Some) } else { Ok(None) }
            };
            layers.push(LayerWeights {
                attn_norm: vector(w, &format!("{p}.input_layernorm.weight"), h)?,
                wq: mat(w, &format!("{p}.self_attn.q_proj.weight"), [q_out, h])?,
                wk: mat(w, &format!("{p}.self_attn.k_proj.weight"), [kv_out, h])?,
                wv: mat(w, &format!("{p}.self_attn.v_proj.weight"), [kv_out, h])?,
                bq: bias(w, "q_proj", q_out)?,
                bk: bias(w, "k_proj", kv_out)?,
                bv: bias(w, "v_proj", kv_out)?,
                wo: mat(w, &format!("{p}.self_attn.o_proj.weight"), [h, q_out])?,
                ffn_norm: vector(w, &format!("{p}.post_attention_layernorm.weight"), h)?,
                w_gate: mat(w, &format!("{p}.mlp.gate_proj.weight"), [inter, h])?,
                w_up: mat(w, &format!("{p}.mlp.up_proj.weight"), [inter, h])?,
                w_down: mat(w, &format!("{p}.mlp.down_proj.weight"), [h, inter])?,
            });
        }
        let norm = vector(w, "model.norm.weight", h)?;
        Ok(Self { embed, layers, norm, lm_head })
    }
}

/// Named tensors (any float type) as host tensors, f32.
pub fn host_tensors(w: &HashMap<String, Tensor>) -> Result<HashMap<String, HostTensor>> {
    w.iter().map(|(k, t)| Ok((k.clone(), HostTensor::from_tensor(t)?))).collect()
}

/// Takes matrix `name` of shape `dims` out of `w`.
fn mat(w: &mut HashMap<String, HostTensor>, name: &str, dims: [usize; 2]) -> Result<QMatrix> {
    match w.remove(name) {
        Some(HostTensor::Mat(m)) if [m.rows(), m.cols()] == dims => Ok(m),
        Some(HostTensor::Mat(m)) => {
            Err(ModelError::Format(format!("{name}: shape {:?}, expected {dims:?}", [m.rows(), m.cols()])))
        }
        Some(HostTensor::Vec(v)) => {
            Err(ModelError::Format(format!("{name}: a vector of {}, expected a matrix {dims:?}", v.len())))
        }
        None => Err(ModelError::Format(format!("missing tensor {name}"))),
    }
}

/// Takes vector `name` of `n` values out of `w`.
fn vector(w: &mut HashMap<String, HostTensor>, name: &str, n: usize) -> Result<Vec<f32>> {
    match w.remove(name) {
        Some(HostTensor::Vec(v)) if v.len() == n => Ok(v),
        Some(_) => Err(ModelError::Format(format!("{name}: must be a vector of {n} values"))),
        None => Err(ModelError::Format(format!("missing tensor {name}"))),
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
