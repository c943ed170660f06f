//! The worker's per-sequence KV cache: a [`QaqCache`] from `qaq-kernels`
//! behind the model's [`KvCache`] seam, plus what the engine's two-tier
//! memory accounting needs from it (device and host bytes, backup eviction,
//! transfer and re-quantization counters, final statistics), and the
//! resolution of a request's KV policy.

use std::str::FromStr;

use qaq_kernels::{CacheConfig, Counters, KvPolicy, QaqCache};

use crate::engine::KvSummary;
use crate::model::{KvCache, KvError, KvShape};

/// A KV policy with the label it is reported under.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyChoice {
    pub policy: KvPolicy,
    /// The `--kv-policy` string it came from (with overrides applied).
    pub label: String,
}

impl PolicyChoice {
    /// Parses a `--kv-policy` string; the error lists the accepted forms.
    pub fn parse(s: &str) -> Result<Self, String> {
        KvPolicy::from_str(s).map(|policy| Self { policy, label: s.trim().to_string() }).map_err(|e| e.to_string())
    }

    /// Whether the policy keeps fp16 backups in the host tier (QAQ does).
    pub fn uses_host_backups(&self) -> bool {
        matches!(self.policy, KvPolicy::Qaq(_))
    }
}

/// Overrides of the QAQ hyper-parameters (flags or a request's `kv_policy`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QaqOverrides {
    pub sigma_s: Option<f64>,
    pub sigma_x: Option<f64>,
    pub outlier_ratio: Option<f64>,
    pub window: Option<usize>,
    pub min_bits: Option<u8>,
    pub max_bits: Option<u8>,
    pub every: Option<u32>,
}

impl QaqOverrides {
    fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Applies the overrides; `what` prefixes error messages (a flag or field family).
    pub fn apply(&self, choice: PolicyChoice, what: &str) -> Result<PolicyChoice, String> {
        if self.is_empty() {
            return Ok(choice);
        }
        let KvPolicy::Qaq(mut p) = choice.policy else {
            return Err(format!(
                "{what}: sigma/outlier/window/bits settings apply to the qaq policy only, not {:?}",
                choice.label
            ));
        };
        let mut label = choice.label;
        let mut note = |k: &str, v: String| {
            label.push_str(if label.contains(':') { "," } else { ":" });
            label.push_str(&format!("{k}={v}"));
        };
        if let Some(v) = self.sigma_s {
            p.sigma_s = v;
            note("sigma_s", v.to_string());
        }
        if let Some(v) = self.sigma_x {
            p.sigma_x = v;
            note("sigma_x", v.to_string());
        }
        if let Some(v) = self.outlier_ratio {
            p.quant.outliers.alpha = v;
            note("alpha", v.to_string());
        }
        if let Some(v) = self.window {
            p.window = v;
            note("window", v.to_string());
        }
        if let Some(v) = self.min_bits {
            p.b_min = v;
            note("bmin", v.to_string());
        }
        if let Some(v) = self.max_bits {
            p.b_max = v;
            note("bmax", v.to_string());
        }
        if let Some(v) = self.every {
            p.every = v;
            note("every", v.to_string());
        }
        p.validate().map_err(|e| format!("{what}: {e}"))?;
        Ok(PolicyChoice { policy: KvPolicy::Qaq(p), label })
    }
}

/// Cache configuration of a model shape.
pub fn cache_config(shape: &KvShape) -> CacheConfig {
    CacheConfig {
        n_layers: shape.n_layers,
        n_kv_heads: shape.n_kv_heads,
        n_q_heads: shape.n_heads,
        head_dim: shape.head_dim,
    }
}

/// Device-tier bytes per token right after append (new tokens are stored at
/// the policy's widest setting), measured on the real implementation: the
/// worst case the budget planner reserves for tokens fed in a step.
pub fn worst_bytes_per_token(shape: &KvShape, policy: &KvPolicy) -> Result<usize, String> {
    const PROBE: usize = 64;
    let mut c = QaqCache::new(cache_config(shape), *policy).map_err(|e| e.to_string())?;
    let row = shape.kv_width();
    // Deterministic, varied values (ranges and outliers like real keys).
    let rows: Vec<f32> = (0..PROBE * row).map(|i| ((i * 7919 % 1000) as f32 / 100.0 - 5.0).sin() * 3.0).collect();
    for layer in 0..shape.n_layers {
        c.append(layer, &rows, &rows).map_err(|e| e.to_string())?;
    }
    Ok(c.bytes_used().div_ceil(PROBE))
}

/// Backup bytes per token in the host tier (fp16 K and V rows, all layers).
pub fn backup_bytes_per_token(shape: &KvShape) -> usize {
    2 * 2 * shape.n_layers * shape.kv_width()
}

/// One sequence's cache.
pub struct SeqCache {
    inner: QaqCache,
    label: String,
    backups: bool,
    n_layers: usize,
    /// Bytes written to the host tier (fp16 backups of appended tokens).
    pub to_host_bytes: u64,
    /// Device bytes at the end of the last step, before re-quantization (the
    /// step's peak).
    pub step_peak_bytes: usize,
    /// On a GPU worker: the device tier, made at the first decode step on the GPU.
    #[cfg(feature = "cuda")]
    device: DeviceTier,
}

/// A sequence's device tier (GPU workers): not made yet, refused (the KIVI baseline's
/// per-channel keys: attention stays on the host), or the mirror of its packed groups.
#[cfg(feature = "cuda")]
#[derive(Debug, Default)]
enum DeviceTier {
    #[default]
    None,
    Refused,
    Mirror(qaq_kernels::cuda::DeviceKv),
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
        let inner = QaqCache::new(cache_config(shape), choice.policy).map_err(kv_err)?;
        Ok(Self::wrap(inner, shape, choice))
    }

    fn wrap(inner: QaqCache, shape: &KvShape, choice: &PolicyChoice) -> Self {
        Self {
            inner,
            label: choice.label.clone(),
            backups: choice.uses_host_backups(),
            n_layers: shape.n_layers,
            to_host_bytes: 0,
            step_peak_bytes: 0,
            #[cfg(feature = "cuda")]
            device: DeviceTier::None,
        }
    }

    /// On a GPU worker, once the cache attends there: its device tier's bytes and the
    /// bytes copied up to it so far. `None`: the cache has no device tier.
    #[cfg(feature = "cuda")]
    pub fn device_tier(&self) -> Option<(usize, u64)> {
        match &self.device {
            DeviceTier::Mirror(m) => Some((m.bytes(), m.uploaded_bytes())),
            _ => None,
        }
    }

    /// Frees the cache's device tier (a preempted sequence on a GPU worker gives its
    /// device memory back; its next decode step on the GPU copies the cache up again).
    /// The host cache is untouched. No-op on a CPU worker.
    pub fn release_device(&mut self) {
        #[cfg(feature = "cuda")]
        if let DeviceTier::Mirror(_) = self.device {
            self.device = DeviceTier::None;
        }
    }

    /// Bytes of the cache's device tier: on a GPU worker whose cache has one, its
    /// allocations (free room and garbage of its arenas included); otherwise the packed
    /// groups as stored (on a CPU worker, the cache's memory is its device tier).
    pub fn device_bytes(&self) -> usize {
        #[cfg(feature = "cuda")]
        if let DeviceTier::Mirror(m) = &self.device {
            return m.bytes();
        }
        self.inner.bytes_used()
    }

    /// Bytes of fp16 backups held in the host tier.
    pub fn host_bytes(&self) -> usize {
        self.inner.stats().host_bytes
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

    /// Evicts backups, least important tokens first (importance: the widest
    /// value width over the token's KV heads in that layer, which QAQ derives
    /// from the token's predicted attention), until at least `want` bytes are
    /// freed or nothing is left. Returns (bytes freed, backups evicted).
    pub fn evict_backups(&mut self, want: usize) -> (usize, u64) {
        if !self.backups || want == 0 {
            return (0, 0);
        }
        let mut cand: Vec<(u8, usize, usize)> = Vec::new();
        for layer in 0..self.n_layers {
            let mut imp: Vec<u8> = Vec::new();
            for h in 0.. {
                let Some((_, vw)) = self.inner.widths(layer, h) else { break };
                if imp.is_empty() {
                    imp = vw;
                } else {
                    for (a, b) in imp.iter_mut().zip(vw) {
                        *a = (*a).max(b);
                    }
                }
            }
            cand.extend(imp.into_iter().enumerate().map(|(t, w)| (w, layer, t)));
        }
        // Ties: older tokens first (recent ones may still be in their window).
        cand.sort_unstable_by_key(|&(w, layer, t)| (w, t, layer));
        let before = self.host_bytes();
        let mut evicted = 0;
        let host = self.inner.host_mut();
        for (_, layer, t) in cand {
            if before - host.bytes() >= want {
                break;
            }
            if host.evict(layer, t) {
                evicted += 1;
            }
        }
        (before - self.inner.host_mut().bytes(), evicted)
    }

    /// Byte accounting and counters of the whole cache.
    pub fn stats(&self) -> qaq_kernels::CacheStats {
        self.inner.stats()
    }

    /// The side effects of attending `q` (`n_q` rows) in `layer` — attention windows and
    /// the ||Q||^2 tracker — without computing the output; see
    /// [`QaqCache::observe_rows`]. For evaluations that share one exact prefill.
    pub fn observe(&mut self, layer: usize, q: &[f32], n_q: usize) -> Result<(), KvError> {
        self.inner.observe_rows(layer, q, n_q).map_err(kv_err)
    }

    /// The whole cache as bytes, to move the sequence to another worker
    /// ([`QaqCache::snapshot`]: between steps only, not for the KIVI baseline).
    pub fn snapshot(&self) -> Result<Vec<u8>, KvError> {
        self.inner.snapshot().map_err(kv_err)
    }

    /// A cache rebuilt from [`SeqCache::snapshot`]'s bytes, under `choice` (which must
    /// be the policy it was taken under).
    pub fn restore(shape: &KvShape, choice: &PolicyChoice, bytes: &[u8]) -> Result<Self, KvError> {
        let inner = QaqCache::restore(cache_config(shape), choice.policy, bytes).map_err(kv_err)?;
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

    #[cfg(feature = "cuda")]
    fn attend_on_gpu(
        &mut self,
        gpu: &qaq_kernels::cuda::Gpu,
        layer: usize,
        q: &[f32],
        out: &mut qaq_kernels::cuda::cudarc::driver::CudaViewMut<'_, f32>,
    ) -> Result<bool, KvError> {
        if let DeviceTier::None = self.device {
            self.device = match qaq_kernels::cuda::DeviceKv::new(&mut self.inner) {
                Ok(m) => DeviceTier::Mirror(m),
                Err(e) => {
                    tracing::debug!(policy = %self.label, reason = %e, "no device KV tier; attention stays on the host");
                    DeviceTier::Refused
                }
            };
        }
        let DeviceTier::Mirror(m) = &mut self.device else { return Ok(false) };
        m.attend(gpu, &mut self.inner, layer, q, out).map_err(kv_err)?;
        Ok(true)
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

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: KvShape = KvShape { n_layers: 2, n_heads: 4, n_kv_heads: 2, head_dim: 64 };

    #[test]
    fn parses_policies_and_applies_overrides() {
        assert!(PolicyChoice::parse("qaq").unwrap().uses_host_backups());
        assert!(!PolicyChoice::parse("fp16").unwrap().uses_host_backups());
        let e = PolicyChoice::parse("bogus").unwrap_err();
        assert!(e.contains("uniform:N"), "{e}");
        let o = QaqOverrides { sigma_x: Some(0.5), max_bits: Some(4), ..Default::default() };
        let c = o.apply(PolicyChoice::parse("qaq").unwrap(), "kv_policy").unwrap();
        assert_eq!(c.label, "qaq:sigma_x=0.5,bmax=4");
        let KvPolicy::Qaq(p) = c.policy else { panic!() };
        assert_eq!((p.sigma_x, p.b_max), (0.5, 4));
        let e = o.apply(PolicyChoice::parse("fp16").unwrap(), "kv_policy").unwrap_err();
        assert!(e.contains("qaq policy only"), "{e}");
        let bad = QaqOverrides { min_bits: Some(6), max_bits: Some(2), ..Default::default() };
        assert!(bad.apply(PolicyChoice::parse("qaq").unwrap(), "kv_policy").is_err());
    }

    #[test]
    fn worst_case_bytes_per_token_order_the_policies() {
        let fp16 = worst_bytes_per_token(&SHAPE, &PolicyChoice::parse("fp16").unwrap().policy).unwrap();
        let u4 = worst_bytes_per_token(&SHAPE, &PolicyChoice::parse("uniform:4").unwrap().policy).unwrap();
        let qaq = worst_bytes_per_token(&SHAPE, &PolicyChoice::parse("qaq").unwrap().policy).unwrap();
        // fp16: 2 layers x 2 heads x 64 values x 2 (K, V) x 2 bytes.
        assert!(fp16 >= 1024, "{fp16}");
        assert!(u4 < fp16 / 2, "{u4} vs {fp16}");
        // New QAQ tokens sit at b_max = 8 bits until re-quantized.
        assert!(qaq > u4 && qaq < fp16, "{qaq}");
        assert_eq!(backup_bytes_per_token(&SHAPE), 1024);
    }

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
        assert_eq!(before, 8 * backup_bytes_per_token(&SHAPE));
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
