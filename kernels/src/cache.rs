//! [`QaqCache`]: the KV cache of one sequence, all layers, under any [`KvPolicy`].
//!
//! Engine cycle (matches the worker's `append / attend / end_step` trait):
//! 1. [`QaqCache::append`] the step's K/V rows of a layer (post-RoPE, f32,
//!    `[n_tokens][n_kv_heads * head_dim]`, many tokens at once for a prefill). Rows are
//!    rounded to fp16 (the reference values), stored at `b_max` (QAQ) or the baseline's
//!    width, and, for QAQ, backed up in the [`HostTier`].
//! 2. [`QaqCache::attend_rows`] with the step's queries (the last `n_q` positions, causal).
//!    One row: attention over the packed cache ([`QaqCache::attend`]). Several rows (a
//!    prefill): exact attention over fp16 values (this step's rows are staged in fp16;
//!    older tokens are dequantized). In both cases the probabilities of the last
//!    `window` rows feed the per-token attention windows (max over the query heads of a
//!    KV head) and every query's `||q||^2 / D` feeds the ||Q||^2 tracker. So after a
//!    prefill the prompt's tokens get their first widths from the last `n` prompt rows
//!    (as the reference code does), and the last `n-1` tokens, whose windows are not
//!    full yet, stay at `b_max`.
//! 3. [`QaqCache::end_step`]: every `every` steps, [`QaqCache::requantize`] each layer.

pub mod mirror;
mod snapshot;

use crate::attention::{self, KStore};
use crate::error::{KernelError, Result};
use crate::host::{HostTier, InMemoryHost};
use crate::kivi::KiviKeys;
use crate::policy::{self, DownSource, KvPolicy, PrefillFeed, QNorm, QNormTracker, QaqParams, Windows};
use crate::quant::{self, GroupMeta, Outliers, QuantSpec, RAW, Scheme, check_group_len};
use crate::store::{BLOCK_TOKENS, Bytes, PackedStream};
use half::f16;
use half::slice::HalfFloatSliceExt;

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
    fn row(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

/// Re-quantization counters.
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

#[derive(Clone, Debug)]
struct Head {
    k: KStore,
    v: PackedStream,
    win: Windows,
    qn: QNormTracker,
    /// Per-channel key scales `s_c` (QAQ `kscale`; empty: none or not calibrated yet).
    kscale: Vec<f32>,
    /// Tokens whose key / value group was re-encoded since the last
    /// [`QaqCache::take_rewrites`] (recorded only after [`QaqCache::track_rewrites`]).
    rewritten: [Vec<u32>; 2],
}

/// Channel scales of one head from its first key rows (`rows`: `[n][row]`, the head's
/// channels at `off..off + d`): `max_t |k_tc|^beta`, normalised to RMS 1, and kept within
/// `[2^-6, 2^6]` so the scaled keys stay well inside f16 range.
fn channel_scales(rows: &[f32], row: usize, off: usize, d: usize, beta: f64) -> Vec<f32> {
    let mut mx = vec![0f64; d];
    for r in rows.chunks_exact(row) {
        for (m, &x) in mx.iter_mut().zip(&r[off..off + d]) {
            *m = m.max(x.abs() as f64);
        }
    }
    let peak = mx.iter().copied().fold(0.0, f64::max).max(1e-6);
    let raw: Vec<f64> = mx.iter().map(|&m| m.max(peak * 1e-3).powf(beta)).collect();
    let rms = (raw.iter().map(|x| x * x).sum::<f64>() / d as f64).sqrt();
    raw.iter().map(|&x| ((x / rms) as f32).clamp(1.0 / 64.0, 64.0)).collect()
}

#[derive(Clone, Debug)]
struct Layer {
    heads: Vec<Head>,
    len: usize,
    staged_from: usize,
    staged_k: Vec<f16>,
    staged_v: Vec<f16>,
    v_quantized: usize,
}

/// The KV cache of one sequence.
pub struct QaqCache {
    cfg: CacheConfig,
    policy: KvPolicy,
    layers: Vec<Layer>,
    host: Box<dyn HostTier>,
    counters: Counters,
    step: u64,
    /// Whether re-encoded groups are recorded for a mirror ([`QaqCache::track_rewrites`]).
    track: bool,
}

impl std::fmt::Debug for QaqCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QaqCache").field("cfg", &self.cfg).field("policy", &self.policy).finish_non_exhaustive()
    }
}

fn to_f16_checked(x: &[f32], what: &'static str) -> Result<Vec<f16>> {
    let h: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
    if h.iter().all(|v| v.is_finite()) { Ok(h) } else { Err(KernelError::NonFinite { what }) }
}

impl QaqCache {
    /// A cache with the in-memory host tier.
    pub fn new(cfg: CacheConfig, policy: KvPolicy) -> Result<Self> {
        Self::with_host(cfg, policy, Box::new(InMemoryHost::new()))
    }

    /// A cache with a caller-provided host tier (used by QAQ only).
    pub fn with_host(cfg: CacheConfig, policy: KvPolicy, host: Box<dyn HostTier>) -> Result<Self> {
        cfg.validate()?;
        let d = cfg.head_dim;
        let plain = QuantSpec { scheme: Scheme::Midpoint, outliers: Outliers::NONE };
        let (kspec, vspec, window) = match policy {
            KvPolicy::Qaq(p) => {
                p.validate()?;
                (p.quant, p.value_quant(), p.window)
            }
            KvPolicy::Uniform(u) => {
                let o = if u.outliers { Outliers::PAPER } else { Outliers::NONE };
                let spec = QuantSpec { scheme: Scheme::Midpoint, outliers: o };
                for b in [u.k_bits, u.v_bits].into_iter().flatten() {
                    if b > quant::MAX_BITS {
                        return Err(KernelError::Config(format!("width {b} > 8")));
                    }
                }
                (spec, spec, 1)
            }
            KvPolicy::Kivi(k) if k.group == 0 || k.bits > quant::MAX_BITS => {
                return Err(KernelError::Config("kivi: group >= 1, bits <= 8".into()));
            }
            KvPolicy::Fp16 | KvPolicy::Kivi(_) => (plain, plain, 1),
        };
        let k_raw_only = matches!(policy, KvPolicy::Fp16 | KvPolicy::Uniform(policy::UniformSpec { k_bits: None, .. }));
        let v_raw_only = matches!(policy, KvPolicy::Fp16 | KvPolicy::Uniform(policy::UniformSpec { v_bits: None, .. }));
        let head = || Head {
            k: match policy {
                KvPolicy::Kivi(s) => KStore::Kivi(KiviKeys::new(d, s.bits, s.group, s.residual)),
                _ => KStore::Packed(PackedStream::new(d, kspec, k_raw_only)),
            },
            v: PackedStream::new(d, vspec, v_raw_only),
            win: Windows::new(window),
            qn: QNormTracker::default(),
            kscale: Vec::new(),
            rewritten: [Vec::new(), Vec::new()],
        };
        let layer = Layer {
            heads: (0..cfg.n_kv_heads).map(|_| head()).collect(),
            len: 0,
            staged_from: 0,
            staged_k: Vec::new(),
            staged_v: Vec::new(),
            v_quantized: 0,
        };
        Ok(QaqCache {
            cfg,
            policy,
            layers: vec![layer; cfg.n_layers],
            host,
            counters: Counters::default(),
            step: 0,
            track: false,
        })
    }

    /// Shape.
    pub fn config(&self) -> &CacheConfig {
        &self.cfg
    }
    /// Policy.
    pub fn policy(&self) -> &KvPolicy {
        &self.policy
    }
    /// Tokens stored in `layer` (0 for a bad layer).
    pub fn len(&self, layer: usize) -> usize {
        self.layers.get(layer).map_or(0, |l| l.len)
    }
    /// Whether layer 0 is empty.
    pub fn is_empty(&self) -> bool {
        self.len(0) == 0
    }
    /// Counters.
    pub fn counters(&self) -> Counters {
        self.counters
    }
    /// The host tier (for budgeting and eviction).
    pub fn host_mut(&mut self) -> &mut dyn HostTier {
        self.host.as_mut()
    }

    fn check_layer(&self, layer: usize) -> Result<()> {
        if layer < self.layers.len() { Ok(()) } else { Err(KernelError::Layer { layer, n_layers: self.layers.len() }) }
    }

    fn widths_for_new(&self) -> (u8, u8) {
        match self.policy {
            KvPolicy::Fp16 => (RAW, RAW),
            KvPolicy::Uniform(u) => (u.k_bits.unwrap_or(RAW), u.v_bits.unwrap_or(RAW)),
            KvPolicy::Kivi(_) => (RAW, RAW),
            KvPolicy::Qaq(p) => (p.b_max, p.b_max),
        }
    }

    /// Appends `n` tokens' K and V rows (`n * n_kv_heads * head_dim` each) to `layer`.
    /// Non-finite or out-of-f16-range values are an error and leave the cache unchanged.
    pub fn append(&mut self, layer: usize, k_rows: &[f32], v_rows: &[f32]) -> Result<()> {
        self.check_layer(layer)?;
        let row = self.cfg.row();
        let d = self.cfg.head_dim;
        if !k_rows.len().is_multiple_of(row) || k_rows.len() != v_rows.len() {
            return Err(KernelError::Shape {
                what: "k_rows/v_rows",
                expected: row,
                got: k_rows.len().max(v_rows.len()),
            });
        }
        let beta = match self.policy {
            KvPolicy::Qaq(p) => p.k_scale,
            _ => 0.0,
        };
        let scaled;
        let k_rows = if beta > 0.0 {
            quant::check_finite(k_rows, "k_rows")?;
            let l = &mut self.layers[layer];
            for (h, hd) in l.heads.iter_mut().enumerate() {
                if hd.kscale.is_empty() {
                    hd.kscale = channel_scales(k_rows, row, h * d, d, beta);
                }
            }
            scaled = k_rows
                .chunks_exact(row)
                .flat_map(|r| r.iter().enumerate().map(|(i, &x)| x / l.heads[i / d].kscale[i % d]))
                .collect::<Vec<f32>>();
            &scaled[..]
        } else {
            k_rows
        };
        let kh = to_f16_checked(k_rows, "k_rows")?;
        let vh = to_f16_checked(v_rows, "v_rows")?;
        let (kb, vb) = self.widths_for_new();
        let is_qaq = matches!(self.policy, KvPolicy::Qaq(_));
        let l = &mut self.layers[layer];
        let n_tok = kh.len() / row;
        // Prefill: one batch encode per head and stream. Only where no encode can fail
        // (finite f16 input: widths >= 1 or raw), so the result is the same as the
        // token-by-token loop below, errors included.
        let batched = n_tok > 1 && kb != 0 && vb != 0 && l.heads.iter().all(|hd| matches!(hd.k, KStore::Packed(_)));
        if batched {
            let (mut kbuf, mut vbuf) = (vec![f16::ZERO; n_tok * d], vec![f16::ZERO; n_tok * d]);
            for (h, hd) in l.heads.iter_mut().enumerate() {
                for (t, (kr, vr)) in kh.chunks_exact(row).zip(vh.chunks_exact(row)).enumerate() {
                    kbuf[t * d..(t + 1) * d].copy_from_slice(&kr[h * d..(h + 1) * d]);
                    vbuf[t * d..(t + 1) * d].copy_from_slice(&vr[h * d..(h + 1) * d]);
                }
                if let KStore::Packed(s) = &mut hd.k {
                    s.push_many_f16(&kbuf, kb)?;
                }
                hd.v.push_many_f16(&vbuf, vb)?;
                hd.win.grow(l.len + n_tok);
            }
            if is_qaq {
                for (t, (kr, vr)) in kh.chunks_exact(row).zip(vh.chunks_exact(row)).enumerate() {
                    self.host.put(layer, l.len + t, kr, vr);
                }
            }
            l.len += n_tok;
        }
        let mut kf = vec![0f32; row];
        let mut vf = vec![0f32; row];
        let per_token = if batched { 0 } else { n_tok };
        for (kr, vr) in kh.chunks_exact(row).zip(vh.chunks_exact(row)).take(per_token) {
            kr.convert_to_f32_slice(&mut kf);
            vr.convert_to_f32_slice(&mut vf);
            for (h, hd) in l.heads.iter_mut().enumerate() {
                let ks = &kf[h * d..(h + 1) * d];
                match &mut hd.k {
                    KStore::Packed(s) => s.push(ks, kb)?,
                    KStore::Kivi(s) => s.push(ks)?,
                }
                hd.v.push(&vf[h * d..(h + 1) * d], vb)?;
                hd.win.grow(l.len + 1);
            }
            if is_qaq {
                self.host.put(layer, l.len, kr, vr);
            }
            l.len += 1;
        }
        l.staged_k.extend_from_slice(&kh);
        l.staged_v.extend_from_slice(&vh);
        if let KvPolicy::Kivi(s) = self.policy {
            while l.v_quantized + s.residual < l.len {
                let t = l.v_quantized;
                for hd in &mut l.heads {
                    requant_one(&mut hd.v, t, s.bits)?;
                }
                l.v_quantized += 1;
            }
        }
        Ok(())
    }

    /// Attention of one decode query (`n_q_heads * head_dim`, all query heads) over the
    /// packed cache of `layer`, with `1/sqrt(D)` scaling. Feeds the windows and the
    /// ||Q||^2 tracker.
    pub fn attend(&mut self, layer: usize, q: &[f32]) -> Result<Attention> {
        let qs = self.decode_queries(layer, q)?;
        let (d, g, nq) = (self.cfg.head_dim, self.cfg.group(), self.cfg.n_q_heads);
        let l = &mut self.layers[layer];
        let t = l.len;
        let mut output = vec![0f32; nq * d];
        let mut probs = vec![0f32; nq * t];
        for (h, hd) in l.heads.iter_mut().enumerate() {
            let qh = &qs[h * g * d..(h + 1) * g * d];
            attention::attend_packed(
                &hd.k,
                &hd.v,
                qh,
                g,
                &mut output[h * g * d..(h + 1) * g * d],
                &mut probs[h * g * t..(h + 1) * g * t],
            );
            observe(hd, qh, &probs[h * g * t..(h + 1) * g * t], g, d, t, t);
        }
        Ok(Attention { output, probs })
    }

    /// A decode query (`n_q_heads * head_dim`) checked and prepared for attention over
    /// `layer`'s packed keys: scaled by `1/sqrt(D)` and by the key channel scales, in
    /// KV-head order (the `g` query heads of KV head `h` at `h * g * D`). What
    /// [`QaqCache::attend`] attends with, and what a device mirror of the cache
    /// ([`mirror`]) is given instead.
    pub fn decode_queries(&self, layer: usize, q: &[f32]) -> Result<Vec<f32>> {
        self.check_layer(layer)?;
        let (d, g, nq) = (self.cfg.head_dim, self.cfg.group(), self.cfg.n_q_heads);
        if q.len() != nq * d {
            return Err(KernelError::Shape { what: "q", expected: nq * d, got: q.len() });
        }
        quant::check_finite(q, "q")?;
        let l = &self.layers[layer];
        if l.len == 0 {
            return Err(KernelError::Config("attend on an empty layer".into()));
        }
        let scale = 1.0 / (d as f32).sqrt();
        let mut qs: Vec<f32> = q.iter().map(|x| x * scale).collect();
        for (h, hd) in l.heads.iter().enumerate() {
            scale_queries(&mut qs[h * g * d..(h + 1) * g * d], &hd.kscale);
        }
        Ok(qs)
    }

    /// The side effects of [`QaqCache::attend`] for KV head `head` of `layer` when the
    /// attention ran elsewhere (a device mirror): `qs` are the head's `g` prepared queries
    /// ([`QaqCache::decode_queries`]), `window` the per-token maximum over them of the
    /// attention probabilities (one value per cached token).
    pub fn observe_window(&mut self, layer: usize, head: usize, qs: &[f32], window: &[f32]) -> Result<()> {
        self.check_layer(layer)?;
        let (d, g) = (self.cfg.head_dim, self.cfg.group());
        let l = &mut self.layers[layer];
        let t = l.len;
        if window.len() != t || qs.len() != g * d {
            return Err(KernelError::Shape { what: "window", expected: t, got: window.len() });
        }
        let Some(hd) = l.heads.get_mut(head) else {
            return Err(KernelError::Config(format!("KV head {head} out of range")));
        };
        quant::check_finite(window, "window")?;
        observe_queries(hd, qs, g, d);
        for (tok, &p) in window.iter().enumerate() {
            hd.win.push(tok, p);
        }
        Ok(())
    }

    /// Starts recording which groups re-quantization re-encodes, for a mirror that copies
    /// only what changed ([`QaqCache::take_rewrites`]). Appended tokens need no record: a
    /// mirror knows how many it holds.
    pub fn track_rewrites(&mut self) {
        self.track = true;
    }

    /// The tokens whose key and value groups of `(layer, kv_head)` were re-encoded since
    /// the last call (in order of re-encoding, possibly repeated), or `None` for a bad
    /// index.
    pub fn take_rewrites(&mut self, layer: usize, kv_head: usize) -> Option<[Vec<u32>; 2]> {
        let hd = self.layers.get_mut(layer)?.heads.get_mut(kv_head)?;
        Some(std::mem::take(&mut hd.rewritten))
    }

    /// The packed key and value streams of `(layer, kv_head)`; `None` for a bad index
    /// or KIVI keys (not a packed stream).
    pub fn streams(&self, layer: usize, kv_head: usize) -> Option<(&PackedStream, &PackedStream)> {
        let hd = self.layers.get(layer)?.heads.get(kv_head)?;
        match &hd.k {
            KStore::Packed(k) => Some((k, &hd.v)),
            KStore::Kivi(_) => None,
        }
    }

    /// Attention for the last `n_q` positions of `layer` (`q_rows`:
    /// `n_q * n_q_heads * head_dim`), causal; returns `n_q * n_q_heads * head_dim` outputs.
    /// `n_q == 1` uses the packed cache; otherwise see the module docs.
    pub fn attend_rows(&mut self, layer: usize, q_rows: &[f32], n_q: usize) -> Result<Vec<f32>> {
        if n_q == 1 {
            return Ok(self.attend(layer, q_rows)?.output);
        }
        self.rows(layer, q_rows, n_q, true)
    }

    /// The side effects of [`attend_rows`](Self::attend_rows) without its output: the
    /// attention windows and the ||Q||^2 tracker see exactly what `attend_rows` would
    /// feed them, but attention is computed for the rows that feed a window only. An
    /// evaluation that runs one exact prefill for several caches ("shared prefill")
    /// calls this on every cache but the one whose output it uses.
    pub fn observe_rows(&mut self, layer: usize, q_rows: &[f32], n_q: usize) -> Result<()> {
        if n_q == 1 {
            return self.attend(layer, q_rows).map(|_| ());
        }
        self.rows(layer, q_rows, n_q, false).map(|_| ())
    }

    /// Multi-row attention; with `full == false`, only the window rows are attended
    /// and the returned output is all zeros.
    fn rows(&mut self, layer: usize, q_rows: &[f32], n_q: usize, full: bool) -> Result<Vec<f32>> {
        self.check_layer(layer)?;
        let (d, g, nqh) = (self.cfg.head_dim, self.cfg.group(), self.cfg.n_q_heads);
        let qrow = nqh * d;
        if n_q == 0 || q_rows.len() != n_q * qrow {
            return Err(KernelError::Shape { what: "q_rows", expected: n_q.max(1) * qrow, got: q_rows.len() });
        }
        quant::check_finite(q_rows, "q_rows")?;
        let row = self.cfg.row();
        let (window, agg) = match self.policy {
            KvPolicy::Qaq(p) => (p.window, p.prefill == PrefillFeed::All && n_q > p.window),
            _ => (1, false),
        };
        let l = &mut self.layers[layer];
        let t_total = l.len;
        if n_q > t_total {
            return Err(KernelError::Shape { what: "n_q (more queries than tokens)", expected: t_total, got: n_q });
        }
        let scale = 1.0 / (d as f32).sqrt();
        let mut out = vec![0f32; n_q * qrow];
        let (mut kd, mut vd) = (vec![0f32; t_total * d], vec![0f32; t_total * d]);
        for (h, hd) in l.heads.iter_mut().enumerate() {
            for t in 0..t_total {
                let (ko, vo) = (&mut kd[t * d..(t + 1) * d], &mut vd[t * d..(t + 1) * d]);
                if t >= l.staged_from {
                    let o = (t - l.staged_from) * row + h * d;
                    for i in 0..d {
                        ko[i] = l.staged_k[o + i].to_f32();
                        vo[i] = l.staged_v[o + i].to_f32();
                    }
                } else {
                    hd.k.decode(t, ko);
                    hd.v.decode(t, vo);
                }
            }
            let mut probs = vec![0f32; g * t_total];
            // PrefillFeed::All: the scaled max attention of the rows before the window.
            let mut early = if agg { vec![0f32; t_total] } else { Vec::new() };
            for r in 0..n_q {
                let p = t_total - n_q + r;
                let tv = p + 1;
                let mut qs: Vec<f32> =
                    q_rows[r * qrow + h * g * d..r * qrow + (h + 1) * g * d].iter().map(|x| x * scale).collect();
                scale_queries(&mut qs, &hd.kscale);
                let feed = if r + window >= n_q { tv } else { 0 };
                if full || feed > 0 || agg {
                    let o = &mut out[r * qrow + h * g * d..r * qrow + (h + 1) * g * d];
                    attention::attend_dense_f32(&kd[..tv * d], &vd[..tv * d], d, &qs, g, o, &mut probs[..g * tv]);
                }
                if agg && feed == 0 {
                    let w = (tv as f32 / t_total as f32).sqrt();
                    for (tok, e) in early.iter_mut().enumerate().take(tv) {
                        let mx = (0..g).map(|j| probs[j * tv + tok]).fold(0f32, f32::max);
                        *e = e.max(w * mx);
                    }
                } else if agg && r + window == n_q {
                    // The window's oldest observation carries the earlier rows too.
                    for j in 0..g {
                        for (tok, e) in early.iter().enumerate().take(tv) {
                            probs[j * tv + tok] = probs[j * tv + tok].max(*e);
                        }
                    }
                }
                observe(hd, &qs, &probs[..g * tv], g, d, tv, feed);
            }
        }
        Ok(out)
    }

    /// Ends a decode (or prefill) step: clears the staged fp16 rows and, every `every`
    /// steps, re-quantizes all layers (QAQ only).
    pub fn end_step(&mut self) -> Result<()> {
        self.step += 1;
        for l in &mut self.layers {
            l.staged_from = l.len;
            l.staged_k.clear();
            l.staged_v.clear();
        }
        if let KvPolicy::Qaq(p) = self.policy
            && self.step.is_multiple_of(p.every as u64)
        {
            for layer in 0..self.layers.len() {
                self.requantize(layer)?;
            }
        }
        Ok(())
    }

    /// Recomputes every token's K and V widths in `layer` and moves tokens down or up.
    /// No-op for the baselines.
    pub fn requantize(&mut self, layer: usize) -> Result<()> {
        self.check_layer(layer)?;
        let KvPolicy::Qaq(p) = self.policy else { return Ok(()) };
        let host = self.host.as_ref();
        let counters = &mut self.counters;
        let track = self.track;
        let l = &mut self.layers[layer];
        let t_total = l.len;
        for (h, hd) in l.heads.iter_mut().enumerate() {
            let qn2 = match p.qnorm {
                QNorm::Constant(c) => Some(c),
                QNorm::Percentile(pc) => hd.qn.percentile(pc),
            };
            let e_k = qn2.map(|q| p.key_step_for(t_total, q));
            let win = &hd.win;
            let [rk, rv] = &mut hd.rewritten;
            let (rk, rv) = if track { (Some(rk), Some(rv)) } else { (None, None) };
            let KStore::Packed(ks) = &mut hd.k else { continue };
            let k_target = |t: usize, m: &GroupMeta| match e_k {
                _ if t < p.sinks || (p.k_window && !win.full(t)) => p.b_max,
                Some(e) => policy::bits(m.range() as f64, e, p.formula, p.b_min, p.b_max),
                None => m.bits,
            };
            move_stream(ks, layer, h, true, &p, host, counters, rk, k_target)?;
            let v_num = policy::value_step_numerator(t_total, p.sigma_x);
            let v_target = |t: usize, m: &GroupMeta| {
                if t < p.sinks || !win.full(t) {
                    return p.b_max;
                }
                let e = policy::value_step_from(v_num, t_total, win.max(t) as f64);
                policy::bits(m.range() as f64, e, p.formula, p.b_min, p.b_max)
            };
            move_stream(&mut hd.v, layer, h, false, &p, host, counters, rv, v_target)?;
        }
        Ok(())
    }

    /// Current widths of `(layer, kv_head)`: (keys, values); raw fp16 reads as 16.
    pub fn widths(&self, layer: usize, kv_head: usize) -> Option<(Vec<u8>, Vec<u8>)> {
        let hd = self.layers.get(layer)?.heads.get(kv_head)?;
        let of = |s: &PackedStream| (0..s.len()).filter_map(|t| s.meta(t).map(|m| m.bits)).collect::<Vec<u8>>();
        let k = match &hd.k {
            KStore::Packed(s) => of(s),
            KStore::Kivi(kk) => (0..kk.len()).map(|t| if t < kk.quantized_len() { kk.bits() } else { RAW }).collect(),
        };
        Some((k, of(&hd.v)))
    }

    /// Dequantized K and V of `layer`, `[T][n_kv_heads * head_dim]` each.
    pub fn dequantized(&self, layer: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        self.check_layer(layer)?;
        let (d, row) = (self.cfg.head_dim, self.cfg.row());
        let l = &self.layers[layer];
        let (mut k, mut v) = (vec![0f32; l.len * row], vec![0f32; l.len * row]);
        for (h, hd) in l.heads.iter().enumerate() {
            for t in 0..l.len {
                let kt = &mut k[t * row + h * d..t * row + (h + 1) * d];
                hd.k.decode(t, kt);
                for (x, s) in kt.iter_mut().zip(&hd.kscale) {
                    *x *= s;
                }
                hd.v.decode(t, &mut v[t * row + h * d..t * row + (h + 1) * d]);
            }
        }
        Ok((k, v))
    }

    /// Sizes, average widths and counters.
    pub fn stats(&self) -> CacheStats {
        let mut s = CacheStats {
            tokens: self.len(0),
            host_bytes: self.host.bytes(),
            counters: self.counters,
            ..Default::default()
        };
        for l in &self.layers {
            for hd in &l.heads {
                s.k.add(&hd.k.bytes());
                s.v.add(&hd.v.bytes());
            }
        }
        s
    }
    /// Real device-tier bytes (see [`CacheStats::bytes_used`]).
    pub fn bytes_used(&self) -> usize {
        self.stats().bytes_used()
    }
    /// fp16 bytes of the same K/V.
    pub fn fp16_equivalent_bytes(&self) -> usize {
        self.stats().fp16_equivalent_bytes()
    }
}

/// Multiplies each query head of `qs` (`[g][d]`) by the key channel scales (none: as is),
/// so that `q' . (k / s) = q . k`.
fn scale_queries(qs: &mut [f32], kscale: &[f32]) {
    if kscale.is_empty() {
        return;
    }
    for qh in qs.chunks_exact_mut(kscale.len()) {
        for (x, s) in qh.iter_mut().zip(kscale) {
            *x *= s;
        }
    }
}

/// Feeds windows (the last `feed` tokens' worth: tokens `0..feed`) and the ||Q||^2 tracker.
fn observe(hd: &mut Head, qs: &[f32], probs: &[f32], g: usize, d: usize, t: usize, feed: usize) {
    observe_queries(hd, qs, g, d);
    for tok in 0..feed.min(t) {
        let mx = (0..g).map(|j| probs[j * t + tok]).fold(0f32, f32::max);
        hd.win.push(tok, mx);
    }
}

/// Feeds the `g` queries' ||q||^2 to the tracker.
fn observe_queries(hd: &mut Head, qs: &[f32], g: usize, d: usize) {
    for q in qs.chunks_exact(d).take(g) {
        hd.qn.observe(q.iter().map(|x| (x * x) as f64).sum());
    }
}

/// Re-encodes group `t` of a stream at `bits` from its decoded values (baseline use).
fn requant_one(s: &mut PackedStream, t: usize, bits: u8) -> Result<()> {
    let d = s.d();
    let spec = *s.spec();
    let mut tmp = vec![0f32; d];
    s.rewrite_block(t / BLOCK_TOKENS, |i, g, sink| {
        if i != t % BLOCK_TOKENS {
            return Ok(None);
        }
        quant::decode_group(&g.meta, spec.scheme, g.codes, g.out_idx, g.out_val, &mut tmp);
        quant::encode_group(&tmp, bits, &spec, sink.codes, sink.out_idx, sink.out_val).map(Some)
    })
}

#[allow(clippy::too_many_arguments)]
fn move_stream(
    s: &mut PackedStream,
    layer: usize,
    head: usize,
    is_key: bool,
    p: &QaqParams,
    host: &dyn HostTier,
    c: &mut Counters,
    mut rewritten: Option<&mut Vec<u32>>,
    target: impl Fn(usize, &GroupMeta) -> u8,
) -> Result<()> {
    let d = s.d();
    let spec = *s.spec();
    let mut tmp = vec![0f32; d];
    let (mut wants, mut sel) = ([0u8; BLOCK_TOKENS], [false; BLOCK_TOKENS]);
    for bi in 0..s.blocks().len() {
        let t0 = bi * BLOCK_TOKENS;
        // Blocks are separate allocations: fetch the next block's metadata ahead of the
        // scan (the stream prefetcher loses the stream at every block).
        #[cfg(target_arch = "x86_64")]
        if let Some(nb) = s.blocks().get(bi + 2) {
            let p = nb.meta.as_ptr() as *const i8;
            for off in (0..std::mem::size_of_val(nb.meta.as_slice())).step_by(64) {
                // SAFETY: SSE is part of the x86-64 baseline; a prefetch never faults.
                unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.wrapping_add(off)) };
            }
        }
        let mut changed = false;
        for (i, m) in s.blocks()[bi].meta.iter().enumerate() {
            wants[i] = target(t0 + i, m);
            sel[i] = wants[i] != m.bits;
            changed |= sel[i];
        }
        if !changed {
            continue;
        }
        s.rewrite_groups(bi, Some(&sel), |i, g, sink| {
            let t = t0 + i;
            let want = wants[i];
            let cur = g.meta.bits;
            if want == cur {
                return Ok(None);
            }
            let up = want > cur;
            let backup = host.get(layer, t).map(|(k, v)| if is_key { k } else { v });
            let use_backup = up || p.down == DownSource::Backup;
            match (backup, use_backup) {
                (Some(row), true) => {
                    row[head * d..(head + 1) * d].convert_to_f32_slice(&mut tmp);
                    c.backup_bytes_read += 2 * d as u64;
                }
                (None, true) if up => {
                    c.up_blocked += 1;
                    return Ok(None);
                }
                _ => {
                    if spec.scheme == Scheme::Midpoint
                        && let Some(m) = quant::shift_down(&g.meta, d, g.codes, want, sink.codes)
                    {
                        sink.out_idx.extend_from_slice(g.out_idx);
                        sink.out_val.extend_from_slice(g.out_val);
                        bump(c, is_key, false);
                        return Ok(Some(m));
                    }
                    quant::decode_group(&g.meta, spec.scheme, g.codes, g.out_idx, g.out_val, &mut tmp);
                }
            }
            bump(c, is_key, up);
            quant::encode_group(&tmp, want, &spec, sink.codes, sink.out_idx, sink.out_val).map(Some)
        })?;
        if let Some(r) = rewritten.as_deref_mut() {
            // Selected groups that now have their target width were re-encoded (an
            // upward move without a backup kept its group).
            let meta = &s.blocks()[bi].meta;
            r.extend((0..meta.len()).filter(|&i| sel[i] && meta[i].bits == wants[i]).map(|i| (t0 + i) as u32));
        }
    }
    Ok(())
}

fn bump(c: &mut Counters, is_key: bool, up: bool) {
    match (is_key, up) {
        (true, true) => c.k_up += 1,
        (true, false) => c.k_down += 1,
        (false, true) => c.v_up += 1,
        (false, false) => c.v_down += 1,
    }
}

#[cfg(test)]
mod tests {
    use super::channel_scales;

    #[test]
    fn channel_scales_follow_each_channels_maximum_normalised_to_rms_one() {
        // 100 rows of one head (d = 4): channel 0 is 1.0 except 50.0 in the first row,
        // channel 1 is 1.0, channel 2 is 2.0, channel 3 is empty.
        let mut rows = Vec::new();
        for t in 0..100 {
            rows.extend_from_slice(&[if t == 0 { 50.0 } else { 1.0 }, 1.0, 2.0, 0.0]);
        }
        let s = channel_scales(&rows, 4, 0, 4, 1.0);
        assert!((s[0] / s[1] - 50.0).abs() < 1e-3 && (s[2] / s[1] - 2.0).abs() < 1e-5, "{s:?}");
        // The empty channel gets the floor (1e-3 of the peak, then at least 2^-6).
        assert_eq!(s[3], 1.0 / 64.0, "{s:?}");
        let r = (s[..3].iter().map(|x| x * x).sum::<f32>() / 4.0).sqrt();
        assert!((r - 1.0).abs() < 1e-3, "RMS 1 before the clamp: {s:?}");
        // beta = 0.5: square roots of the maxima.
        let h = channel_scales(&rows, 4, 0, 4, 0.5);
        assert!((h[0] / h[1] - 50f32.sqrt()).abs() < 1e-3, "{h:?}");
    }
}
