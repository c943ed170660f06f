//! The llama-family model (Llama, Mistral, Qwen2): RMSNorm, GQA attention with RoPE
//! (rotate-half convention, HF weight layout), SwiGLU MLP.
//!
//! Weights are immutable after loading and live in the model's [`Backend`]; the KV cache
//! is passed in per sequence ([`KvCache`](super::KvCache)). [`Llama::forward`] checks and
//! plans the batch, then hands it to the backend.

use std::collections::HashMap;

use candle_core::Tensor;

use super::backend::Backend;
use super::cpu::CpuBackend;
use super::decoder::{BatchItem, Plan};
use super::kv::KvShape;
use super::weights::HostWeights;
use super::{LlamaConfig, Result};

/// Logits of a forward pass, `[rows, vocab]` row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Logits {
    data: Vec<f32>,
    vocab: usize,
}

impl Logits {
    /// Logits of `data.len() / vocab` rows.
    pub fn new(data: Vec<f32>, vocab: usize) -> Self {
        Self { data, vocab }
    }
    /// Row `i`'s logits. Panics if `i >= self.rows()`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.vocab..(i + 1) * self.vocab]
    }
    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.data.len() / self.vocab.max(1)
    }
    /// The rows, in order.
    pub fn iter(&self) -> std::slice::ChunksExact<'_, f32> {
        self.data.chunks_exact(self.vocab.max(1))
    }
}

/// A loaded llama-family model on its backend.
#[derive(Debug)]
pub struct Llama {
    cfg: LlamaConfig,
    backend: Box<dyn Backend>,
}

impl Llama {
    /// A model whose weights live in `backend`.
    pub fn new(cfg: LlamaConfig, backend: Box<dyn Backend>) -> Result<Self> {
        cfg.validate()?;
        Ok(Self { cfg, backend })
    }

    /// A CPU model from HF-named f32 weights (`model.layers.N.self_attn.q_proj.weight`, ...).
    pub fn from_weights(cfg: LlamaConfig, w: HashMap<String, Tensor>) -> Result<Self> {
        cfg.validate()?;
        let weights = HostWeights::from_hf(&cfg, w)?;
        Self::from_host(cfg, weights)
    }

    /// A CPU model over host weights (as loaded: GGUF matrices stay quantized).
    pub fn from_host(cfg: LlamaConfig, weights: HostWeights) -> Result<Self> {
        cfg.validate()?;
        Self::new(cfg.clone(), Box::new(CpuBackend::new(cfg, weights)))
    }

    /// Moves the weights to GPU `ordinal` (as f16) and runs every later forward pass there;
    /// returns the device's name. The host copy of the weights is dropped. The KV caches
    /// stay behind the [`KvCache`](super::KvCache) seam and attend decode rows on the device
    /// through their device tier (see [`super::gpu`]).
    #[cfg(feature = "cuda")]
    pub fn use_gpu(&mut self, ordinal: usize) -> Result<String> {
        let host = self
            .backend
            .host_weights()
            .ok_or_else(|| super::ModelError::Device(format!("the model already runs on {}", self.backend.device())))?;
        let gpu = super::gpu::GpuBackend::upload(&self.cfg, host, ordinal)?;
        let name = gpu.device_name();
        self.backend = Box::new(gpu);
        Ok(name)
    }

    /// On a GPU: the device's memory in use (by every process) and its total.
    pub fn gpu_memory(&self) -> Option<(usize, usize)> {
        self.backend.memory()
    }

    /// On a GPU: its CUDA context (for transfers off the engine thread, e.g. NCCL).
    #[cfg(feature = "cuda")]
    pub fn cuda_context(&self) -> Option<std::sync::Arc<qaq_kernels::cuda::cudarc::driver::CudaContext>> {
        self.backend.cuda_context()
    }

    /// Where the forward pass runs: `cpu` or `cuda:N`.
    pub fn device(&self) -> String {
        self.backend.device()
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

    /// Runs one step for a batch and returns the logits of each item's last token,
    /// `[batch, vocab]`. Every item must feed at least one token and stay within the
    /// context. Each row is computed independently of the others, so results do not depend
    /// on the batch.
    pub fn forward(&self, items: &mut [BatchItem<'_>]) -> Result<Logits> {
        let plan = Plan::new(&self.cfg, items)?;
        let data = self.backend.forward(&plan, items, &plan.last_rows())?;
        Ok(Logits { data, vocab: self.cfg.vocab_size })
    }

    /// Like [`forward`](Self::forward), but returns the logits of every fed token (teacher
    /// forcing): `[total tokens, vocab]`, items in order, each item's tokens in order.
    pub fn forward_all(&self, items: &mut [BatchItem<'_>]) -> Result<Vec<f32>> {
        let plan = Plan::new(&self.cfg, items)?;
        self.backend.forward(&plan, items, &plan.all_rows())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kv::{DenseKv, KvCache};
    use crate::model::weights::random_weights;

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
        let diff = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff(both.row(0), la.row(0)) < 1e-4);
        assert!(diff(both.row(1), lb.row(0)) < 1e-4);
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
