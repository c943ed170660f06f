//! The model: configuration, weight loading (GGUF, HF safetensors), the tokenizer and
//! chat template, the llama-family forward pass and the KV-cache seam it is driven
//! through.
//!
//! - [`llama`]: [`Llama`], a model on its backend; `forward` / `forward_all`.
//! - [`backend`]: the [`Backend`] seam (where the weights live and the stack runs);
//!   [`cpu`] is the CPU backend, `gpu` (feature `cuda`) the GPU one.
//! - [`decoder`]: the decoder stack written once over a backend's [`decoder::Ops`],
//!   batch planning and one layer's cache step.
//! - [`weights`]: the weights, generic over where they live; HF-name loading.
//! - [`kv`]: the [`KvCache`] seam (and a cache's [`kv::DeviceTier`]), [`DenseKv`].
//! - [`config`], [`loader`], [`tokenizer`]: hyper-parameters, GGUF / safetensors
//!   loading, tokenizer and chat template.

pub mod backend;
pub mod config;
pub mod cpu;
pub mod decoder;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod kv;
pub mod llama;
pub mod loader;
pub mod tokenizer;
pub mod weights;

pub use backend::Backend;
pub use config::LlamaConfig;
pub use decoder::BatchItem;
pub use kv::{DenseKv, DeviceCall, DeviceTier, KvCache, KvError, KvShape};
pub use llama::{Llama, Logits};
pub use loader::{LoadedModel, load_model};
pub use tokenizer::TextTokenizer;

/// Errors of model loading and execution.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("i/o error reading {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("model format: {0}")]
    Format(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("device: {0}")]
    Device(String),
    #[error("kv cache: {0}")]
    Kv(#[from] KvError),
    #[error("kernel: {0}")]
    Kernel(#[from] qaq_kernels::KernelError),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
