//! [`UniformCache`]: the uniform baselines, one width for every key (or raw fp16 keys)
//! and one for every value, optionally with the paper's 1% exact outliers, and
//! optionally fp16 windows: the first `sinks` tokens and the `recent` most recent ones
//! stay raw fp16, and a token leaving the recent window is encoded at the widths from
//! its fp16 value (the codes an append at that width would have given).

use super::layers::Layers;
use super::policy_cache::PolicyCache;
use super::policy_cache::sealed::{Key, Storage};
use super::types::CacheConfig;
use crate::attention::KStore;
use crate::base::{MAX_BITS, Outliers, QuantSpec, RAW, Scheme};
use crate::error::{KernelError, Result};
use crate::policy::{KvPolicy, UniformSpec};
use crate::store::PackedStream;

/// The KV cache of one sequence under [`KvPolicy::Uniform`].
#[derive(Debug)]
pub struct UniformCache {
    policy: KvPolicy,
    spec: UniformSpec,
    layers: Layers,
    /// Per layer and KV head, the tokens re-encoded since the last
    /// [`PolicyCache::take_rewrites`], when a mirror tracks them.
    rewritten: Option<Vec<Vec<Vec<u32>>>>,
}

impl UniformCache {
    /// An empty cache of shape `cfg`; errors for a width above 8.
    pub fn new(cfg: CacheConfig, spec: UniformSpec) -> Result<Self> {
        cfg.validate()?;
        let o = if spec.outliers { Outliers::PAPER } else { Outliers::NONE };
        let qspec = QuantSpec { scheme: Scheme::Midpoint, outliers: o };
        for b in [spec.k_bits, spec.v_bits].into_iter().flatten() {
            if b > MAX_BITS {
                return Err(KernelError::Config(format!("width {b} > 8")));
            }
        }
        let keys = || KStore::Packed(PackedStream::new(cfg.head_dim, qspec, spec.k_bits.is_none()));
        let layers = Layers::new(cfg, keys, qspec, spec.v_bits.is_none()).rotated(spec.rotate)?;
        Ok(UniformCache { policy: KvPolicy::Uniform(spec), spec, layers, rewritten: None })
    }
}

impl Storage for UniformCache {
    fn layers(&self) -> &Layers {
        &self.layers
    }
    fn layers_mut(&mut self, _: Key) -> &mut Layers {
        &mut self.layers
    }
}

impl PolicyCache for UniformCache {
    fn policy(&self) -> &KvPolicy {
        &self.policy
    }
    fn append(&mut self, layer: usize, k_rows: &[f32], v_rows: &[f32]) -> Result<()> {
        let UniformSpec { k_bits, v_bits, recent, sinks, .. } = self.spec;
        let widths = (k_bits.unwrap_or(RAW), v_bits.unwrap_or(RAW));
        if recent == 0 && sinks == 0 {
            return self.layers.append(layer, k_rows, v_rows, widths);
        }
        self.layers.check_rows(layer, k_rows, v_rows)?;
        // Tokens `sinks..quantized(len)` are stored at the widths, the others raw.
        let quantized = |len: usize| len.saturating_sub(recent).max(sinks);
        let old = self.layers.len(layer);
        let new = old + k_rows.len() / self.layers.cfg.row();
        let (from, to) = (quantized(old), quantized(new));
        // The new rows: raw sinks, then those already outside the window, then raw.
        let a = sinks.clamp(old, new);
        let b = to.clamp(a, new);
        let runs = [(a - old, (RAW, RAW)), (b - a, widths), (new - b, (RAW, RAW))];
        self.layers.append_runs(layer, k_rows, v_rows, &runs)?;
        // Stored rows leaving the window.
        let leaving = from..to.min(old);
        if !leaving.is_empty() {
            self.layers.reencode(layer, leaving.clone(), k_bits, widths.1)?;
            if let Some(r) = &mut self.rewritten {
                r[layer].iter_mut().for_each(|h| h.extend(leaving.clone().map(|t| t as u32)));
            }
        }
        Ok(())
    }

    fn track_rewrites(&mut self) {
        let c = self.layers.cfg;
        self.rewritten.get_or_insert_with(|| vec![vec![Vec::new(); c.n_kv_heads]; c.n_layers]);
    }

    fn take_rewrites(&mut self, layer: usize, kv_head: usize) -> Option<[Vec<u32>; 2]> {
        self.layers.head(layer, kv_head)?;
        let r = self.rewritten.as_mut().map_or_else(Vec::new, |r| std::mem::take(&mut r[layer][kv_head]));
        Some([r.clone(), r])
    }
}
