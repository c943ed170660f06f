//! The KV cache of one sequence, all layers: one trait, [`PolicyCache`], and one cache
//! type per policy, each in its own module:
//!
//! - [`Fp16Cache`] (`fp16`), [`UniformCache`] (`uniform`), [`KiviCache`] (`kivi`): the
//!   baselines, nothing but the shared storage and a width rule;
//! - [`QaqCache`] (`qaq`): QAQ, with all its state (attention windows, ||Q||^2
//!   tracker, key channel scales, fp16 backups in the host tier, re-quantization,
//!   rewrite tracking).
//!
//! Shared by the four: `layers` (per-layer heads with the K/V stores, staged fp16 rows
//! for multi-row prefill attention, decode attention over the packed streams on the
//! kernels' pool, widths, dequantization, byte accounting), `policy_cache` (the trait; its
//! provided methods are the shared behaviour), `snapshot` (the transfer format) and
//! `types` ([`CacheConfig`], [`Attention`], [`Counters`], [`CacheStats`]). A policy's
//! `+rot` stores keys and values rotated ([`Rotation`]): `Layers` rotates what is
//! appended and the queries, and rotates attention outputs back. `requant` is
//! QAQ's width rule and re-encoding: the moves of a step are decided during its decode
//! attention and only the moving tokens are re-encoded. [`mirror`] keeps the books of a
//! device copy of a cache layer. `identity_tests` pins every policy's observables on a
//! fixed scenario (a change of implementation must not change them).
//!
//! [`new_cache`] makes the cache of a [`KvPolicy`] and [`restore`] rebuilds one from a
//! snapshot, both as a `Box<dyn PolicyCache>`; a QAQ cache with a custom host tier is
//! [`QaqCache::with_host`].

mod fp16;
#[cfg(test)]
mod identity_tests;
mod kivi;
mod layers;
pub mod mirror;
mod policy_cache;
mod qaq;
mod requant;
mod rotation;
mod snapshot;
#[cfg(test)]
mod tests;
mod types;
mod uniform;

pub use fp16::Fp16Cache;
pub use kivi::KiviCache;
pub use policy_cache::PolicyCache;
pub use qaq::QaqCache;
pub use rotation::Rotation;
pub use types::{Attention, CacheConfig, CacheStats, Counters};
pub use uniform::UniformCache;

use crate::error::Result;
use crate::policy::KvPolicy;
use policy_cache::sealed::Key;

/// An empty cache of shape `cfg` under `policy` (QAQ with the in-memory host tier).
/// Errors for an invalid shape or policy.
pub fn new_cache(cfg: CacheConfig, policy: KvPolicy) -> Result<Box<dyn PolicyCache>> {
    Ok(match policy {
        KvPolicy::Fp16 => Box::new(Fp16Cache::new(cfg)?),
        KvPolicy::Uniform(u) => Box::new(UniformCache::new(cfg, u)?),
        KvPolicy::Kivi(k) => Box::new(KiviCache::new(cfg, k)?),
        KvPolicy::Qaq(p) => Box::new(QaqCache::new(cfg, p)?),
    })
}

/// Rebuilds a cache of shape `cfg` under `policy` from [`PolicyCache::snapshot`]'s
/// bytes. Shape and policy must be the snapshot's; any inconsistency is an error (so is
/// a KIVI policy: its caches are not transferable).
pub fn restore(cfg: CacheConfig, policy: KvPolicy, bytes: &[u8]) -> Result<Box<dyn PolicyCache>> {
    if let KvPolicy::Qaq(p) = policy {
        return Ok(Box::new(QaqCache::restore(cfg, p, bytes)?));
    }
    let mut c = new_cache(cfg, policy)?;
    snapshot::read(c.layers_mut(Key(())), &policy, bytes, None)?;
    Ok(c)
}
