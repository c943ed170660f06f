//! Hyper-parameters of a llama-family model.

use super::{ModelError, Result};

/// Architecture hyper-parameters, from GGUF metadata or HF `config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    /// Architecture family name ("llama", "mistral", "qwen2").
    pub architecture: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rope_theta: f32,
    pub rms_eps: f64,
    /// Maximum sequence length (prompt + generated tokens).
    pub context_length: usize,
    /// The output projection shares the embedding matrix.
    pub tie_embeddings: bool,
}

impl LlamaConfig {
    /// Checks that the shapes fit together.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::Format(m));
        if self.n_heads == 0 || self.n_kv_heads == 0 || self.n_layers == 0 || self.hidden_size == 0 {
            return bad(format!("zero-sized dimension in {self:?}"));
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(format!("{} query heads not a multiple of {} KV heads", self.n_heads, self.n_kv_heads));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim {} must be even for RoPE", self.head_dim));
        }
        if self.context_length < 2 {
            return bad(format!("context length {} too small", self.context_length));
        }
        Ok(())
    }

    /// Bytes one token's keys and values take in an fp16 cache (all layers).
    pub fn fp16_kv_bytes_per_token(&self) -> usize {
        2 * 2 * self.n_layers * self.n_kv_heads * self.head_dim
    }

    /// Tiny random-weight configuration for tests.
    pub fn tiny() -> Self {
        Self {
            architecture: "llama".into(),
            hidden_size: 64,
            intermediate_size: 96,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 16,
            vocab_size: 97,
            rope_theta: 10_000.0,
            rms_eps: 1e-5,
            context_length: 128,
            tie_embeddings: false,
        }
    }
}
