//! [`QaqCache`]: the QAQ cache (arXiv:2403.04643). Every token's keys and values get
//! their own widths per KV head, recomputed every `every` steps from how much attention
//! the token receives (values: the maximum over its attention window) and from the
//! ||Q||^2 percentile (keys); new tokens are stored at `b_max`, tokens move down by
//! dropping code bits (or from the backup) and up from the fp16 backups in the host
//! tier. All of that state lives here; storage and attention are the shared
//! [`Layers`].

use super::layers::{Layers, RowObserver};
use super::policy_cache::PolicyCache;
use super::policy_cache::sealed::{Key, Storage};
use super::snapshot::{self, QaqState};
use super::types::{Attention, CacheConfig, Counters};
use crate::attention::KStore;
use crate::base::{GroupMeta, Scheme, check_finite};
use crate::error::Result;
use crate::host::{HostTier, InMemoryHost};
use crate::policy::{self, DownSource, KvPolicy, PrefillFeed, QNorm, QNormTracker, QaqParams, Windows};
use crate::quant;
use crate::store::{BLOCK_TOKENS, PackedStream};
use half::slice::HalfFloatSliceExt;

/// QAQ's state of one KV head in one layer.
#[derive(Clone, Debug)]
struct HeadState {
    /// Per token, the last `window` attention probabilities (max over the query heads).
    win: Windows,
    /// The ||q||^2 / D samples of the head's queries.
    qn: QNormTracker,
    /// Per-channel key scales `s_c` (`kscale`; empty: none or not calibrated yet).
    kscale: Vec<f32>,
    /// Tokens whose key / value group was re-encoded since the last
    /// [`PolicyCache::take_rewrites`] (recorded only after
    /// [`PolicyCache::track_rewrites`]).
    rewritten: [Vec<u32>; 2],
}

/// QAQ's state beside the shared storage (a separate struct, so that both can be
/// borrowed at once).
struct State {
    /// Per layer, per KV head.
    heads: Vec<Vec<HeadState>>,
    /// The fp16 backups.
    host: Box<dyn HostTier>,
    counters: Counters,
    /// Whether re-encoded groups are recorded for a mirror.
    track: bool,
}

impl QaqState for State {
    fn head(&self, layer: usize, h: usize) -> (&[f32], &QNormTracker, &Windows) {
        let s = &self.heads[layer][h];
        (&s.kscale, &s.qn, &s.win)
    }
    fn set_head(&mut self, layer: usize, h: usize, kscale: Vec<f32>, qn: QNormTracker, win: Windows) {
        let s = &mut self.heads[layer][h];
        (s.kscale, s.qn, s.win) = (kscale, qn, win);
    }
    fn host(&self) -> &dyn HostTier {
        self.host.as_ref()
    }
    fn host_mut(&mut self) -> &mut dyn HostTier {
        self.host.as_mut()
    }
}

/// The KV cache of one sequence under [`KvPolicy::Qaq`].
pub struct QaqCache {
    params: QaqParams,
    policy: KvPolicy,
    layers: Layers,
    state: State,
}

impl std::fmt::Debug for QaqCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QaqCache").field("cfg", &self.layers.cfg).field("policy", &self.policy).finish_non_exhaustive()
    }
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

impl QaqCache {
    /// A cache with the in-memory host tier.
    pub fn new(cfg: CacheConfig, params: QaqParams) -> Result<Self> {
        Self::with_host(cfg, params, Box::new(InMemoryHost::new()))
    }

    /// A cache with a caller-provided host tier for the fp16 backups.
    pub fn with_host(cfg: CacheConfig, params: QaqParams, host: Box<dyn HostTier>) -> Result<Self> {
        cfg.validate()?;
        params.validate()?;
        let keys = || KStore::Packed(PackedStream::new(cfg.head_dim, params.quant, false));
        let layers = Layers::new(cfg, keys, params.value_quant(), false);
        let head = HeadState {
            win: Windows::new(params.window),
            qn: QNormTracker::default(),
            kscale: Vec::new(),
            rewritten: [Vec::new(), Vec::new()],
        };
        let state = State {
            heads: vec![vec![head; cfg.n_kv_heads]; cfg.n_layers],
            host,
            counters: Counters::default(),
            track: false,
        };
        Ok(QaqCache { params, policy: KvPolicy::Qaq(params), layers, state })
    }

    /// A cache rebuilt from a snapshot ([`PolicyCache::snapshot`]) taken under `params`.
    pub(crate) fn restore(cfg: CacheConfig, params: QaqParams, bytes: &[u8]) -> Result<Self> {
        let mut c = QaqCache::new(cfg, params)?;
        c.state.counters = snapshot::read(&mut c.layers, &c.policy, bytes, Some(&mut c.state))?;
        Ok(c)
    }

    /// The host tier (for budgeting and eviction; see also
    /// [`PolicyCache::evict_backups`]).
    pub fn host_mut(&mut self) -> &mut dyn HostTier {
        self.state.host.as_mut()
    }

    /// Recomputes every token's K and V widths in `layer` and moves tokens down or up
    /// ([`PolicyCache::end_step`] does it every `every` steps).
    pub fn requantize(&mut self, layer: usize) -> Result<()> {
        self.layers.check_layer(layer)?;
        let p = self.params;
        let State { heads, host, counters, track } = &mut self.state;
        let host = host.as_ref();
        let l = &mut self.layers.layers[layer];
        let t_total = l.len;
        for (h, (hd, st)) in l.heads.iter_mut().zip(heads[layer].iter_mut()).enumerate() {
            let qn2 = match p.qnorm {
                QNorm::Constant(c) => Some(c),
                QNorm::Percentile(pc) => st.qn.percentile(pc),
            };
            let e_k = qn2.map(|q| p.key_step_for(t_total, q));
            let win = &st.win;
            let [rk, rv] = &mut st.rewritten;
            let (rk, rv) = if *track { (Some(rk), Some(rv)) } else { (None, None) };
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
}

impl Storage for QaqCache {
    fn layers(&self) -> &Layers {
        &self.layers
    }
    fn layers_mut(&mut self, _: Key) -> &mut Layers {
        &mut self.layers
    }
}

impl PolicyCache for QaqCache {
    fn policy(&self) -> &KvPolicy {
        &self.policy
    }

    /// Appends as every cache does, at `b_max`; the keys divided by the channel scales
    /// (calibrated on the first rows a layer receives) when `kscale` is on, and every
    /// token's fp16 rows backed up in the host tier.
    fn append(&mut self, layer: usize, k_rows: &[f32], v_rows: &[f32]) -> Result<()> {
        self.layers.check_rows(layer, k_rows, v_rows)?;
        let (row, d) = (self.layers.cfg.row(), self.layers.cfg.head_dim);
        let beta = self.params.k_scale;
        let scaled;
        let k_rows = if beta > 0.0 {
            check_finite(k_rows, "k_rows")?;
            let heads = &mut self.state.heads[layer];
            for (h, st) in heads.iter_mut().enumerate() {
                if st.kscale.is_empty() {
                    st.kscale = channel_scales(k_rows, row, h * d, d, beta);
                }
            }
            scaled = k_rows
                .chunks_exact(row)
                .flat_map(|r| r.iter().enumerate().map(|(i, &x)| x / heads[i / d].kscale[i % d]))
                .collect::<Vec<f32>>();
            &scaled[..]
        } else {
            k_rows
        };
        let b = self.params.b_max;
        let host = self.state.host.as_mut();
        let res = self.layers.push_rows(layer, k_rows, v_rows, (b, b), |t, kr, vr| host.put(layer, t, kr, vr));
        let len = self.layers.len(layer);
        for st in &mut self.state.heads[layer] {
            st.win.grow(len);
        }
        res
    }

    fn attend(&mut self, layer: usize, q: &[f32]) -> Result<Attention> {
        let qs = self.decode_queries(layer, q)?;
        let a = self.layers.attend(layer, &qs);
        let (d, g, t) = (self.layers.cfg.head_dim, self.layers.cfg.group(), self.layers.len(layer));
        for (h, st) in self.state.heads[layer].iter_mut().enumerate() {
            observe(st, &qs[h * g * d..(h + 1) * g * d], &a.probs[h * g * t..(h + 1) * g * t], g, d, t, t);
        }
        Ok(a)
    }

    fn decode_queries(&self, layer: usize, q: &[f32]) -> Result<Vec<f32>> {
        let mut qs = self.layers.decode_queries(layer, q)?;
        let (d, g) = (self.layers.cfg.head_dim, self.layers.cfg.group());
        for (h, st) in self.state.heads[layer].iter().enumerate() {
            scale_queries(&mut qs[h * g * d..(h + 1) * g * d], &st.kscale);
        }
        Ok(qs)
    }

    fn attend_rows(&mut self, layer: usize, q_rows: &[f32], n_q: usize) -> Result<Vec<f32>> {
        if n_q == 1 {
            return Ok(self.attend(layer, q_rows)?.output);
        }
        self.rows(layer, q_rows, n_q, true)
    }

    fn observe_rows(&mut self, layer: usize, q_rows: &[f32], n_q: usize) -> Result<()> {
        if n_q == 1 {
            return self.attend(layer, q_rows).map(|_| ());
        }
        self.rows(layer, q_rows, n_q, false).map(|_| ())
    }

    fn observe_window(&mut self, layer: usize, head: usize, qs: &[f32], window: &[f32]) -> Result<()> {
        self.layers.check_window(layer, head, qs, window)?;
        let (d, g) = (self.layers.cfg.head_dim, self.layers.cfg.group());
        let st = &mut self.state.heads[layer][head];
        observe_queries(st, qs, g, d);
        for (tok, &p) in window.iter().enumerate() {
            st.win.push(tok, p);
        }
        Ok(())
    }

    fn end_step(&mut self) -> Result<()> {
        self.layers.end_step();
        if self.layers.step.is_multiple_of(self.params.every as u64) {
            for layer in 0..self.layers.layers.len() {
                self.requantize(layer)?;
            }
        }
        Ok(())
    }

    fn dequantized(&self, layer: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let heads = self.state.heads.get(layer);
        self.layers.dequantized(layer, |h| heads.and_then(|l| l.get(h)).map_or(&[], |s| &s.kscale))
    }

    fn counters(&self) -> Counters {
        self.state.counters
    }

    fn host_bytes(&self) -> usize {
        self.state.host.bytes()
    }

    fn evict_backups(&mut self, want: usize) -> (usize, u64) {
        if want == 0 {
            return (0, 0);
        }
        let mut cand: Vec<(u8, usize, usize)> = Vec::new();
        for layer in 0..self.layers.cfg.n_layers {
            let mut imp: Vec<u8> = Vec::new();
            for h in 0.. {
                let Some((_, vw)) = self.widths(layer, h) else { break };
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
        let host = self.state.host.as_mut();
        for (_, layer, t) in cand {
            if before - host.bytes() >= want {
                break;
            }
            if host.evict(layer, t) {
                evicted += 1;
            }
        }
        (before - self.state.host.bytes(), evicted)
    }

    fn snapshot(&self) -> Result<Vec<u8>> {
        snapshot::write(&self.layers, &self.policy, &self.state.counters, Some(&self.state))
    }

    fn track_rewrites(&mut self) {
        self.state.track = true;
    }

    fn take_rewrites(&mut self, layer: usize, kv_head: usize) -> Option<[Vec<u32>; 2]> {
        let st = self.state.heads.get_mut(layer)?.get_mut(kv_head)?;
        Some(std::mem::take(&mut st.rewritten))
    }
}

impl QaqCache {
    /// Multi-row attention ([`Layers::rows`]) feeding QAQ's state.
    fn rows(&mut self, layer: usize, q_rows: &[f32], n_q: usize, full: bool) -> Result<Vec<f32>> {
        let p = &self.params;
        let mut obs = Observe {
            heads: self.state.heads.get_mut(layer).map_or(&mut [], |l| &mut l[..]),
            window: p.window,
            agg: p.prefill == PrefillFeed::All && n_q > p.window,
            g: self.layers.cfg.group(),
            d: self.layers.cfg.head_dim,
            early: Vec::new(),
            t_total: 0,
        };
        self.layers.rows(layer, q_rows, n_q, full, &mut obs)
    }
}

/// What the rows of a multi-row attention feed: the last `window` rows' probabilities
/// the windows (with [`PrefillFeed::All`], the oldest of them also carries the scaled
/// maximum of the rows before), every row's queries the ||Q||^2 tracker.
struct Observe<'a> {
    heads: &'a mut [HeadState],
    window: usize,
    /// [`PrefillFeed::All`] with more rows than the window.
    agg: bool,
    g: usize,
    d: usize,
    /// The scaled maximum attention of the rows before the window, per token.
    early: Vec<f32>,
    t_total: usize,
}

impl RowObserver for Observe<'_> {
    fn queries(&self, h: usize, qs: &mut [f32]) {
        scale_queries(qs, &self.heads[h].kscale);
    }
    fn needs(&self, r: usize, n_q: usize) -> bool {
        r + self.window >= n_q || self.agg
    }
    fn head(&mut self, _h: usize, t_total: usize) {
        self.t_total = t_total;
        self.early = if self.agg { vec![0f32; t_total] } else { Vec::new() };
    }
    fn row(&mut self, h: usize, r: usize, n_q: usize, qs: &[f32], probs: &mut [f32], tv: usize) {
        let (g, d) = (self.g, self.d);
        let feed = if r + self.window >= n_q { tv } else { 0 };
        if self.agg && feed == 0 {
            let w = (tv as f32 / self.t_total as f32).sqrt();
            for (tok, e) in self.early.iter_mut().enumerate().take(tv) {
                let mx = (0..g).map(|j| probs[j * tv + tok]).fold(0f32, f32::max);
                *e = e.max(w * mx);
            }
        } else if self.agg && r + self.window == n_q {
            // The window's oldest observation carries the earlier rows too.
            for j in 0..g {
                for (tok, e) in self.early.iter().enumerate().take(tv) {
                    probs[j * tv + tok] = probs[j * tv + tok].max(*e);
                }
            }
        }
        observe(&mut self.heads[h], qs, probs, g, d, tv, feed);
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
fn observe(hd: &mut HeadState, qs: &[f32], probs: &[f32], g: usize, d: usize, t: usize, feed: usize) {
    observe_queries(hd, qs, g, d);
    for tok in 0..feed.min(t) {
        let mx = (0..g).map(|j| probs[j * t + tok]).fold(0f32, f32::max);
        hd.win.push(tok, mx);
    }
}

/// Feeds the `g` queries' ||q||^2 to the tracker.
fn observe_queries(hd: &mut HeadState, qs: &[f32], g: usize, d: usize) {
    for q in qs.chunks_exact(d).take(g) {
        hd.qn.observe(q.iter().map(|x| (x * x) as f64).sum());
    }
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
