//! [`QaqCache`]: the QAQ cache (arXiv:2403.04643). Every token's keys and values get
//! their own widths per KV head, recomputed every `every` steps from how much attention
//! the token receives (values: the maximum over its attention window) and from the
//! ||Q||^2 percentile (keys); new tokens are stored at `b_max`, tokens move down by
//! dropping code bits (or from the backup) and up from the fp16 backups in the host
//! tier. All of that state lives here; storage and attention are the shared
//! [`Layers`].

use super::layers::{Head, Layers, RowObserver};
use super::policy_cache::PolicyCache;
use super::policy_cache::sealed::{Key, Storage};
use super::requant::{Ctx, Plan, Targets, move_planned, window_pass};
use super::snapshot::{self, QaqState};
use super::types::{Attention, CacheConfig, Counters};
use crate::attention::KStore;
use crate::base::check_finite;
use crate::error::Result;
use crate::host::{HostTier, InMemoryHost};
use crate::policy::{KvPolicy, PrefillFeed, QNormTracker, QaqParams, Windows};
use crate::simd::Observed;
use crate::store::PackedStream;
use rayon::prelude::*;

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
    /// Counts the changes of `win` and `qn` (what the width decisions read).
    epoch: u64,
    /// The moves of the coming re-quantization, decided during the decode attention.
    plan: Plan,
}

impl HeadState {
    /// Feeds the `g` queries' ||q||^2 to the tracker.
    fn observe_queries(&mut self, qs: &[f32], g: usize, d: usize) {
        self.epoch += 1;
        for q in qs.chunks_exact(d).take(g) {
            self.qn.observe(q.iter().map(|x| (x * x) as f64).sum());
        }
    }

    /// Feeds windows (the last `feed` tokens' worth: tokens `0..feed`, each the maximum
    /// over the `g` rows of `probs`, `[g][t]`) and the ||Q||^2 tracker.
    fn observe(&mut self, qs: &[f32], probs: &[f32], g: usize, d: usize, t: usize, feed: usize) {
        self.observe_queries(qs, g, d);
        for tok in 0..feed.min(t) {
            let mx = (0..g).map(|j| probs[j * t + tok]).fold(0f32, f32::max);
            self.win.push(tok, mx);
        }
    }

    /// A decode row's window update over all tokens of the head `hd` (the maximum
    /// over the `g` query heads of `probs` when `window` is `None`, else `window`),
    /// planning the moves of the step's re-quantization when `targets` says it comes.
    fn decode_window(&mut self, hd: &Head, targets: Option<&Targets>, probs: &[f32], window: Option<&[f32]>, g: usize) {
        let KStore::Packed(ks) = &hd.k else { return };
        let HeadState { win, plan, epoch, .. } = self;
        let obs = match window {
            Some(w) => Observed::Values(w),
            None => Observed::Probs(probs, g),
        };
        window_pass(win, plan, *epoch, ks, &hd.v, targets, obs);
    }
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
    /// Re-quantizations of a (layer, KV head) carried out from a plan, and by
    /// evaluating every token (what the identity tests look at).
    paths: [u64; 2],
    /// Whether re-quantization ignores the plans (the tests' reference).
    no_plans: bool,
}

impl QaqState for State {
    fn head(&self, layer: usize, h: usize) -> (&[f32], &QNormTracker, &Windows) {
        let s = &self.heads[layer][h];
        (&s.kscale, &s.qn, &s.win)
    }
    fn set_head(&mut self, layer: usize, h: usize, kscale: Vec<f32>, qn: QNormTracker, win: Windows) {
        let s = &mut self.heads[layer][h];
        (s.kscale, s.qn, s.win) = (kscale, qn, win);
        s.epoch += 1;
        s.plan.clear();
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
        let layers = Layers::new(cfg, keys, params.value_quant(), false).rotated(params.rotate)?;
        let head = HeadState {
            win: Windows::new(params.window),
            qn: QNormTracker::default(),
            kscale: Vec::new(),
            rewritten: [Vec::new(), Vec::new()],
            epoch: 0,
            plan: Plan::default(),
        };
        let state = State {
            heads: vec![vec![head; cfg.n_kv_heads]; cfg.n_layers],
            host,
            counters: Counters::default(),
            track: false,
            paths: [0; 2],
            no_plans: false,
        };
        Ok(QaqCache { params, policy: KvPolicy::Qaq(params), layers, state })
    }

    /// A cache rebuilt from a snapshot ([`PolicyCache::snapshot`]) taken under `params`.
    pub(crate) fn restore(cfg: CacheConfig, params: QaqParams, bytes: &[u8]) -> Result<Self> {
        let mut c = QaqCache::new(cfg, params)?;
        c.state.counters = snapshot::read(&mut c.layers, &c.policy, bytes, Some(&mut c.state))?;
        Ok(c)
    }

    /// Makes re-quantization evaluate every token whatever the attention planned: the
    /// implementation as it was before the plans, the reference of the identity tests.
    #[cfg(test)]
    pub(crate) fn without_plans(mut self) -> Self {
        self.state.no_plans = true;
        self
    }

    /// How many (layer, KV head) re-quantizations ran from a plan, and by evaluating
    /// every token.
    #[cfg(test)]
    pub(crate) fn paths(&self) -> [u64; 2] {
        self.state.paths
    }

    /// The host tier (for budgeting and eviction; see also
    /// [`PolicyCache::evict_backups`]).
    pub fn host_mut(&mut self) -> &mut dyn HostTier {
        self.state.host.as_mut()
    }

    /// Recomputes every token's K and V widths in `layer` and moves tokens down or up
    /// ([`PolicyCache::end_step`] does it every `every` steps, for every layer). Where the
    /// step's decode attention already decided the moves (and nothing they read has
    /// changed since), only the tokens that move are touched; otherwise every token is
    /// evaluated.
    pub fn requantize(&mut self, layer: usize) -> Result<()> {
        self.layers.check_layer(layer)?;
        self.requantize_layers(layer..layer + 1)
    }

    /// [`QaqCache::requantize`] of `layers`: the moves of every (layer, KV head) first
    /// (its plan, or every token evaluated), then every stream re-encoded, the streams in
    /// parallel (each its own counters and rewrite list, summed and kept in order). Only
    /// an encoding error (impossible from finite values) would leave other streams than
    /// the one-at-a-time order would have re-encoded.
    fn requantize_layers(&mut self, layers: std::ops::Range<usize>) -> Result<()> {
        let p = self.params;
        let State { heads, host, counters, track, paths, no_plans } = &mut self.state;
        let host: &dyn HostTier = host.as_ref();
        for layer in layers.clone() {
            let l = &self.layers.layers[layer];
            for (hd, st) in l.heads.iter().zip(heads[layer].iter_mut()) {
                let KStore::Packed(ks) = &hd.k else { continue };
                if st.plan.valid(l.len, st.epoch) && !*no_plans {
                    paths[0] += 1;
                } else {
                    paths[1] += 1;
                    let tg = Targets::new(&p, l.len, &st.qn);
                    st.plan.evaluate(ks, &hd.v, &tg, &st.win);
                }
            }
        }
        let mut jobs = Vec::new();
        let (ls, hs) = (&mut self.layers.layers[layers.clone()], &mut heads[layers.clone()]);
        for (layer, (l, lh)) in layers.zip(ls.iter_mut().zip(hs.iter_mut())) {
            for (h, (hd, st)) in l.heads.iter_mut().zip(lh.iter_mut()).enumerate() {
                let KStore::Packed(ks) = &mut hd.k else { continue };
                let HeadState { plan, rewritten: [rk, rv], .. } = st;
                let (km, vm) = plan.moves();
                jobs.push((ks, km, layer, h, true, track.then_some(rk)));
                jobs.push((&mut hd.v, vm, layer, h, false, track.then_some(rv)));
            }
        }
        let done: Vec<Result<Counters>> = jobs
            .into_par_iter()
            .map(|(s, moves, layer, head, is_key, rewritten)| {
                let mut c = Counters::default();
                let mut cx = Ctx { layer, head, is_key, p: &p, host, counters: &mut c, rewritten };
                move_planned(s, moves, &mut cx).map(|_| c)
            })
            .collect();
        for st in heads.iter_mut().flatten() {
            st.plan.clear();
        }
        for c in done {
            counters.add(&c?);
        }
        Ok(())
    }

    /// Decode attention of `layer` with prepared queries `qs` (outputs into `out`,
    /// probabilities into `probs`, `n_q_heads * T`), feeding the ||Q||^2 trackers and the
    /// windows, and planning the moves of the step's re-quantization when the step ends
    /// with one.
    fn decode_attend(&mut self, layer: usize, qs: &[f32], out: &mut [f32], probs: &mut [f32]) {
        let (d, g, t) = (self.layers.cfg.head_dim, self.layers.cfg.group(), self.layers.len(layer));
        let p = self.params;
        let plan = (self.layers.step + 1).is_multiple_of(p.every as u64);
        let heads = &mut self.state.heads[layer];
        for (h, st) in heads.iter_mut().enumerate() {
            st.observe_queries(&qs[h * g * d..(h + 1) * g * d], g, d);
        }
        self.layers.attend_with(layer, qs, out, probs, heads, |_, hd, probs, st| {
            let tg = plan.then(|| Targets::new(&p, t, &st.qn));
            st.decode_window(hd, tg.as_ref(), probs, None, g);
        });
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
        let (k_rotated, v_rotated) = (self.layers.stored_form(k_rows), self.layers.stored_form(v_rows));
        let (k_rows, v_rows) = (&k_rotated[..], &v_rotated[..]);
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
        let (d, nq, t) = (self.layers.cfg.head_dim, self.layers.cfg.n_q_heads, self.layers.len(layer));
        let (mut output, mut probs) = (vec![0f32; nq * d], vec![0f32; nq * t]);
        self.decode_attend(layer, &qs, &mut output, &mut probs);
        Ok(Attention { output, probs })
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
            return self.attend_output(layer, q_rows);
        }
        self.rows(layer, q_rows, n_q, true)
    }

    fn observe_rows(&mut self, layer: usize, q_rows: &[f32], n_q: usize) -> Result<()> {
        if n_q == 1 {
            return self.attend_output(layer, q_rows).map(|_| ());
        }
        self.rows(layer, q_rows, n_q, false).map(|_| ())
    }

    fn observe_window(&mut self, layer: usize, head: usize, qs: &[f32], window: &[f32]) -> Result<()> {
        self.layers.check_window(layer, head, qs, window)?;
        let (d, g, t) = (self.layers.cfg.head_dim, self.layers.cfg.group(), self.layers.len(layer));
        let p = self.params;
        let plan = (self.layers.step + 1).is_multiple_of(p.every as u64);
        let st = &mut self.state.heads[layer][head];
        st.observe_queries(qs, g, d);
        let tg = plan.then(|| Targets::new(&p, t, &st.qn));
        st.decode_window(&self.layers.layers[layer].heads[head], tg.as_ref(), &[], Some(window), g);
        Ok(())
    }

    fn end_step(&mut self) -> Result<()> {
        self.layers.end_step();
        if self.layers.step.is_multiple_of(self.params.every as u64) {
            self.requantize_layers(0..self.layers.layers.len())?;
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
    /// A decode row's attention output ([`PolicyCache::attend`] without the
    /// probabilities, which go to the scratch buffer).
    fn attend_output(&mut self, layer: usize, q: &[f32]) -> Result<Vec<f32>> {
        let qs = self.decode_queries(layer, q)?;
        let (d, nq, t) = (self.layers.cfg.head_dim, self.layers.cfg.n_q_heads, self.layers.len(layer));
        let mut output = vec![0f32; nq * d];
        let mut probs = std::mem::take(&mut self.layers.scratch);
        probs.resize(nq * t, 0.0);
        self.decode_attend(layer, &qs, &mut output, &mut probs);
        self.layers.scratch = probs;
        Ok(output)
    }

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
        self.heads[h].observe(qs, probs, g, d, tv, feed);
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
