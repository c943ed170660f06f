//! [`UniformCache`]: the uniform baselines, one width for every key (or raw fp16 keys)
//! and one for every value, optionally with the paper's 1% exact outliers.

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
        Ok(UniformCache { policy: KvPolicy::Uniform(spec), spec, layers })
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
        let widths = (self.spec.k_bits.unwrap_or(RAW), self.spec.v_bits.unwrap_or(RAW));
        self.layers.append(layer, k_rows, v_rows, widths)
    }
}
