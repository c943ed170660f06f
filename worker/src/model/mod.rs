//! The model: configuration, weight loading (GGUF, HF safetensors), the
//! tokenizer and chat template, the llama-family forward pass and the KV-cache
//! trait it is driven through.

pub mod config;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod kv;
pub mod llama;
pub mod loader;
pub mod matmul;
pub mod tokenizer;

pub use config::LlamaConfig;
pub use kv::{DenseKv, KvCache, KvError, KvShape};
pub use llama::{BatchItem, Llama};
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
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
