//! [`SeqCache`], the worker's per-sequence KV cache: a policy cache of `qaq-kernels`
//! ([`PolicyCache`]: fp16, uniform, KIVI or QAQ) behind the model's [`KvCache`] seam, its device tier on a GPU worker ([`super::tier`]), and what the
//! engine's two-tier memory accounting needs from it (device and host bytes, backup
//! eviction, transfer and re-quantization counters, final statistics: [`KvSummary`]).

use qaq_kernels::{Counters, PolicyCache, cache};

use super::policy::{PolicyChoice, cache_config};
use super::tier::Tier;
use crate::model::{DeviceCall, DeviceTier, KvCache, KvError, KvShape};

/// KV statistics of a finished sequence.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KvSummary {
    pub policy: String,
    pub avg_key_bits: f64,
    pub avg_value_bits: f64,
    pub device_bytes: u64,
    pub fp16_equivalent_bytes: u64,
    pub requantizations_up: u64,
    pub requantizations_down: u64,
    /// Decode rows (one per layer and decode step) attended on the GPU in the cache's
    /// device tier; 0 on a CPU worker.
    pub device_attended_rows: u64,
}

/// One sequence's cache.
pub struct SeqCache {
    inner: Box<dyn PolicyCache>,
    label: String,
    backups: bool,
    n_layers: usize,
    /// Bytes written to the host tier (fp16 backups of appended tokens).
    pub to_host_bytes: u64,
    /// Device bytes at the end of the last step, before re-quantization (the
    /// step's peak).
    pub step_peak_bytes: usize,
    /// On a GPU worker: the device tier, made at the first decode row on the GPU.
    tier: Tier,
    /// Decode rows attended in the device tier so far.
    device_rows: u64,
}

impl std::fmt::Debug for SeqCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeqCache").field("label", &self.label).finish_non_exhaustive()
    }
}

fn kv_err(e: qaq_kernels::KernelError) -> KvError {
    KvError::Other(e.to_string())
}

impl SeqCache {
    pub fn new(shape: &KvShape, choice: &PolicyChoice) -> Result<Self, KvError> {
        let inner = cache::new_cache(cache_config(shape), choice.policy).map_err(kv_err)?;
        Ok(Self::wrap(inner, shape, choice))
    }

    fn wrap(inner: Box<dyn PolicyCache>, shape: &KvShape, choice: &PolicyChoice) -> Self {
        Self {
            inner,
            label: choice.label.clone(),
            backups: choice.uses_host_backups(),
            n_layers: shape.n_layers,
            to_host_bytes: 0,
            step_peak_bytes: 0,
            tier: Tier::None,
            device_rows: 0,
        }
    }

    /// On a GPU worker, once the cache attends there: its device tier's bytes and the
    /// bytes copied up to it so far. `None`: the cache has no device tier.
    pub fn device_tier_bytes(&self) -> Option<(usize, u64)> {
        Some((self.tier.bytes()?, self.tier.uploaded_bytes()?))
    }

    /// Frees the cache's device tier (a preempted sequence on a GPU worker gives its
    /// device memory back; its next decode step on the GPU copies the cache up again).
    /// The host cache is untouched. No-op on a CPU worker.
    pub fn release_device(&mut self) {
        self.tier.release();
    }

    /// Bytes of the cache's device tier: on a GPU worker whose cache has one, its
    /// allocations (free room and garbage of its arenas included); otherwise the packed
    /// groups as stored (on a CPU worker, the cache's memory is its device tier).
    pub fn device_bytes(&self) -> usize {
        self.tier.bytes().unwrap_or_else(|| self.inner.bytes_used())
    }

    /// Bytes of fp16 backups held in the host tier.
    pub fn host_bytes(&self) -> usize {
        self.inner.host_bytes()
    }

    /// Bytes the same tokens take in fp16.
    pub fn fp16_equivalent_bytes(&self) -> usize {
        self.inner.fp16_equivalent_bytes()
    }

    /// Cumulative re-quantization counters.
    pub fn counters(&self) -> Counters {
        self.inner.counters()
    }

    /// Current widths of every (layer, KV head, token) group: (keys, values).
    pub fn widths(&self) -> (Vec<u8>, Vec<u8>) {
        let (mut k, mut v) = (Vec::new(), Vec::new());
        for layer in 0..self.n_layers {
            for h in 0.. {
                let Some((kw, vw)) = self.inner.widths(layer, h) else { break };
                k.extend(kw);
                v.extend(vw);
            }
        }
        (k, v)
    }

    /// Evicts backups, least important tokens first, until at least `want` bytes are
    /// freed or nothing is left ([`PolicyCache::evict_backups`]; a no-op for policies
    /// without backups). Returns (bytes freed, backups evicted).
    pub fn evict_backups(&mut self, want: usize) -> (usize, u64) {
        self.inner.evict_backups(want)
    }

    /// Byte accounting and counters of the whole cache.
    pub fn stats(&self) -> qaq_kernels::CacheStats {
        self.inner.stats()
    }

    /// The side effects of attending `q` (`n_q` rows) in `layer` — attention windows and
    /// the ||Q||^2 tracker — without computing the output; see
    /// [`PolicyCache::observe_rows`]. For evaluations that share one exact prefill.
    pub fn observe(&mut self, layer: usize, q: &[f32], n_q: usize) -> Result<(), KvError> {
        self.inner.observe_rows(layer, q, n_q).map_err(kv_err)
    }

    /// The whole cache as bytes, to move the sequence to another worker
    /// ([`PolicyCache::snapshot`]: between steps only, not for the KIVI baseline).
    pub fn snapshot(&self) -> Result<Vec<u8>, KvError> {
        self.inner.snapshot().map_err(kv_err)
    }

    /// A cache rebuilt from [`SeqCache::snapshot`]'s bytes, under `choice` (which must
    /// be the policy it was taken under).
    pub fn restore(shape: &KvShape, choice: &PolicyChoice, bytes: &[u8]) -> Result<Self, KvError> {
        let inner = cache::restore(cache_config(shape), choice.policy, bytes).map_err(kv_err)?;
        Ok(Self::wrap(inner, shape, choice))
    }

    /// Final statistics.
    pub fn summary(&self) -> KvSummary {
        let s = self.inner.stats();
        let c = s.counters;
        KvSummary {
            policy: self.label.clone(),
            avg_key_bits: s.k.avg_bits(),
            avg_value_bits: s.v.avg_bits(),
            device_bytes: self.device_bytes() as u64,
            fp16_equivalent_bytes: s.fp16_equivalent_bytes() as u64,
            requantizations_up: c.k_up + c.v_up,
            requantizations_down: c.k_down + c.v_down,
            device_attended_rows: self.device_rows,
        }
    }
}

impl KvCache for SeqCache {
    fn len(&self) -> usize {
        self.inner.len(self.n_layers - 1)
    }

    fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) -> Result<(), KvError> {
        self.inner.append(layer, k, v).map_err(kv_err)?;
        if self.backups {
            self.to_host_bytes += 2 * (k.len() + v.len()) as u64;
        }
        Ok(())
    }

    fn attend(&mut self, layer: usize, q: &[f32], n_q: usize, out: &mut [f32]) -> Result<(), KvError> {
        let o = self.inner.attend_rows(layer, q, n_q).map_err(kv_err)?;
        if o.len() != out.len() {
            return Err(KvError::Shape { what: "attention output", got: o.len(), width: out.len() });
        }
        out.copy_from_slice(&o);
        Ok(())
    }

    fn device_tier(&mut self) -> Option<&mut dyn DeviceTier> {
        Some(self)
    }

    fn end_step(&mut self) {
        self.step_peak_bytes = self.device_bytes();
        if let Err(e) = self.inner.end_step() {
            tracing::warn!(error = %e, "re-quantization failed; the cache keeps its widths");
        }
    }

    fn bytes_used(&self) -> usize {
        self.device_bytes()
    }
}

impl DeviceTier for SeqCache {
    fn attend_on_device(&mut self, call: &mut DeviceCall<'_>, layer: usize, q: &[f32]) -> Result<bool, KvError> {
        let done = self.tier.attend(call, &mut *self.inner, &self.label, layer, q)?;
        self.device_rows += u64::from(done);
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: KvShape = KvShape { n_layers: 2, n_heads: 4, n_kv_heads: 2, head_dim: 64 };

    #[test]
    fn evicting_backups_frees_host_bytes_least_important_first() {
        let choice = PolicyChoice::parse("qaq").unwrap();
        let mut c = SeqCache::new(&SHAPE, &choice).unwrap();
        let row = SHAPE.kv_width();
        let rows: Vec<f32> = (0..8 * row).map(|i| (i as f32 * 0.37).sin()).collect();
        for layer in 0..2 {
            c.append(layer, &rows, &rows).unwrap();
        }
        assert_eq!(c.to_host_bytes, 2 * 2 * 2 * 8 * row as u64);
        let before = c.host_bytes();
        assert_eq!(before, 8 * super::super::policy::backup_bytes_per_token(&SHAPE));
        let (freed, n) = c.evict_backups(100);
        assert!(freed >= 100 && n >= 1, "{freed} {n}");
        assert_eq!(c.host_bytes(), before - freed);
        let (freed_all, _) = c.evict_backups(usize::MAX);
        assert_eq!(c.host_bytes(), 0);
        assert_eq!(freed + freed_all, before);
        // fp16 keeps no backups.
        let mut f = SeqCache::new(&SHAPE, &PolicyChoice::parse("fp16").unwrap()).unwrap();
        f.append(0, &rows, &rows).unwrap();
        assert_eq!((f.host_bytes(), f.to_host_bytes), (0, 0));
    }
}
