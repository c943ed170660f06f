//! The value types of the cache API: the model shape ([`CacheConfig`]), one decode
//! query's attention ([`Attention`]), re-quantization [`Counters`] and [`CacheStats`].

use crate::base::check_group_len;
use crate::error::{KernelError, Result};
use crate::store::Bytes;

/// Model shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheConfig {
    /// Layers.
    pub n_layers: usize,
    /// KV heads per layer.
    pub n_kv_heads: usize,
    /// Query heads per layer (a multiple of `n_kv_heads`).
    pub n_q_heads: usize,
    /// Head dimension (multiple of 8, at most 256).
    pub head_dim: usize,
}

impl CacheConfig {
    /// Checks the shape.
    pub fn validate(&self) -> Result<()> {
        check_group_len(self.head_dim)?;
        if self.n_layers == 0
            || self.n_kv_heads == 0
            || self.n_q_heads == 0
            || !self.n_q_heads.is_multiple_of(self.n_kv_heads)
        {
            return Err(KernelError::Config(format!("bad shape {self:?}")));
        }
        Ok(())
    }
    /// Query heads per KV head.
    pub fn group(&self) -> usize {
        self.n_q_heads / self.n_kv_heads
    }
    /// Values per K (or V) row of one token: `n_kv_heads * head_dim`.
    pub(crate) fn row(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

/// Re-quantization counters (QAQ; always zero for the baselines).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Key groups moved to a higher width (from the backup).
    pub k_up: u64,
    /// Key groups moved to a lower width.
    pub k_down: u64,
    /// Value groups moved up.
    pub v_up: u64,
    /// Value groups moved down.
    pub v_down: u64,
    /// Upward moves refused because the backup was evicted.
    pub up_blocked: u64,
    /// Bytes read from the host tier.
    pub backup_bytes_read: u64,
}

impl Counters {
    /// Adds `o`'s counts.
    pub(crate) fn add(&mut self, o: &Counters) {
        self.k_up += o.k_up;
        self.k_down += o.k_down;
        self.v_up += o.v_up;
        self.v_down += o.v_down;
        self.up_blocked += o.up_blocked;
        self.backup_bytes_read += o.backup_bytes_read;
    }
}

/// One decode query's attention.
#[derive(Clone, Debug)]
pub struct Attention {
    /// `[n_q_heads * head_dim]`.
    pub output: Vec<f32>,
    /// `[n_q_heads][T]` probabilities.
    pub probs: Vec<f32>,
}

/// Sizes and statistics of a cache.
#[derive(Clone, Copy, Debug, Default)]
pub struct CacheStats {
    /// Tokens (layer 0).
    pub tokens: usize,
    /// Keys, all layers and heads.
    pub k: Bytes,
    /// Values.
    pub v: Bytes,
    /// Host-tier bytes.
    pub host_bytes: usize,
    /// Counters.
    pub counters: Counters,
}

impl CacheStats {
    /// Real bytes on the device tier (codes, metadata, outliers and indices, padding).
    pub fn bytes_used(&self) -> usize {
        self.k.total() + self.v.total()
    }
    /// Bytes of the same K/V in fp16.
    pub fn fp16_equivalent_bytes(&self) -> usize {
        self.k.fp16_equivalent() + self.v.fp16_equivalent()
    }
    /// Paper-style bytes (codes + 32-bit metadata + 16 bits per outlier; no indices).
    pub fn paper_style_bytes(&self) -> f64 {
        self.k.paper_style() + self.v.paper_style()
    }
    /// fp16 bytes / real bytes.
    pub fn compression_ratio(&self) -> f64 {
        self.fp16_equivalent_bytes() as f64 / self.bytes_used().max(1) as f64
    }
    /// fp16 bytes / paper-style bytes (labelled "paper-style").
    pub fn paper_style_ratio(&self) -> f64 {
        self.fp16_equivalent_bytes() as f64 / self.paper_style_bytes().max(1.0)
    }
}
