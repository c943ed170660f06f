//! [`KiviCache`]: the KIVI-style baseline. Keys are quantized per channel over groups
//! of `G` tokens ([`crate::kivi::KiviKeys`]); values per token, the most recent `R`
//! kept in fp16 and older ones re-encoded at the KIVI width as they leave that window.

use super::layers::Layers;
use super::policy_cache::PolicyCache;
use super::policy_cache::sealed::{Key, Storage};
use super::types::CacheConfig;
use crate::attention::KStore;
use crate::base::{MAX_BITS, Outliers, QuantSpec, RAW, Scheme};
use crate::error::{KernelError, Result};
use crate::kivi::KiviKeys;
use crate::policy::{KiviSpec, KvPolicy};

/// The KV cache of one sequence under [`KvPolicy::Kivi`]. Not transferable: its
/// [`PolicyCache::snapshot`] is an error.
#[derive(Debug)]
pub struct KiviCache {
    policy: KvPolicy,
    spec: KiviSpec,
    layers: Layers,
    /// Per layer, the value groups already re-encoded at the KIVI width (the oldest).
    v_quantized: Vec<usize>,
}

impl KiviCache {
    /// An empty cache of shape `cfg`; errors for a group of 0 or a width above 8.
    pub fn new(cfg: CacheConfig, spec: KiviSpec) -> Result<Self> {
        cfg.validate()?;
        if spec.group == 0 || spec.bits > MAX_BITS {
            return Err(KernelError::Config("kivi: group >= 1, bits <= 8".into()));
        }
        let plain = QuantSpec { scheme: Scheme::Midpoint, outliers: Outliers::NONE };
        let keys = || KStore::Kivi(KiviKeys::new(cfg.head_dim, spec.bits, spec.group, spec.residual));
        let layers = Layers::new(cfg, keys, plain, false).rotated(spec.rotate)?;
        Ok(KiviCache { policy: KvPolicy::Kivi(spec), spec, layers, v_quantized: vec![0; cfg.n_layers] })
    }
}

impl Storage for KiviCache {
    fn layers(&self) -> &Layers {
        &self.layers
    }
    fn layers_mut(&mut self, _: Key) -> &mut Layers {
        &mut self.layers
    }
}

impl PolicyCache for KiviCache {
    fn policy(&self) -> &KvPolicy {
        &self.policy
    }
    fn append(&mut self, layer: usize, k_rows: &[f32], v_rows: &[f32]) -> Result<()> {
        self.layers.append(layer, k_rows, v_rows, (RAW, RAW))?;
        let upto = self.layers.len(layer).saturating_sub(self.spec.residual);
        let done = &mut self.v_quantized[layer];
        if upto > *done {
            self.layers.reencode(layer, *done..upto, None, self.spec.bits)?;
            *done = upto;
        }
        Ok(())
    }
}
