//! [`Fp16Cache`]: the fp16 baseline. Every group is stored as raw fp16 (no metadata).

use super::layers::Layers;
use super::policy_cache::PolicyCache;
use super::policy_cache::sealed::{Key, Storage};
use super::types::CacheConfig;
use crate::attention::KStore;
use crate::base::{Outliers, QuantSpec, RAW, Scheme};
use crate::error::Result;
use crate::policy::KvPolicy;
use crate::store::PackedStream;

/// The KV cache of one sequence under [`KvPolicy::Fp16`].
#[derive(Debug)]
pub struct Fp16Cache {
    layers: Layers,
}

impl Fp16Cache {
    /// An empty cache of shape `cfg`.
    pub fn new(cfg: CacheConfig) -> Result<Self> {
        cfg.validate()?;
        let plain = QuantSpec { scheme: Scheme::Midpoint, outliers: Outliers::NONE };
        let keys = || KStore::Packed(PackedStream::new(cfg.head_dim, plain, true));
        Ok(Fp16Cache { layers: Layers::new(cfg, keys, plain, true) })
    }
}

impl Storage for Fp16Cache {
    fn layers(&self) -> &Layers {
        &self.layers
    }
    fn layers_mut(&mut self, _: Key) -> &mut Layers {
        &mut self.layers
    }
}

impl PolicyCache for Fp16Cache {
    fn policy(&self) -> &KvPolicy {
        &KvPolicy::Fp16
    }
    fn append(&mut self, layer: usize, k_rows: &[f32], v_rows: &[f32]) -> Result<()> {
        self.layers.append(layer, k_rows, v_rows, (RAW, RAW))
    }
}
