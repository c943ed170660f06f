//! QAQ's width decisions and the re-encoding that carries them out, for one
//! (layer, KV head).
//!
//! [`Targets`] is the width rule of one step (the formulas of [`crate::policy`] at the
//! step's `T`, ||Q||^2 percentile and windows). It is applied in one of two ways, with
//! the same decisions:
//! - during the decode attention, which touches every token anyway: [`window_pass`]
//!   pushes each token's new probability into its window and, when the step ends with a
//!   re-quantization, compares the token's targets with its widths, recording only the
//!   tokens that must move (a [`Plan`]); the step's end then re-encodes those and
//!   touches nothing else;
//! - after anything else (a prefill's rows, an append after the attention, a restored
//!   snapshot): [`Plan::evaluate`] evaluates every token at the step's end, as the
//!   cache always did.
//!
//! Either way [`move_planned`] re-encodes the moving tokens through
//! [`rewrite_selected`], block by block in token order, so the counters, the host reads
//! and the rewrite lists of a device mirror are the same.

use super::types::Counters;
use crate::base::{GroupMeta, Scheme};
use crate::error::Result;
use crate::host::HostTier;
use crate::policy::{self, DownSource, QNorm, QNormTracker, QaqParams, Windows};
use crate::quant;
use crate::simd::{self, Observed, UNDECIDED, WidthRule};
use crate::store::{BLOCK_TOKENS, PackedStream};
use half::slice::HalfFloatSliceExt;

/// The width rule of one (layer, KV head) at one step. Each width is first computed
/// without a division ([`policy::bits_near`], from reciprocals taken once per step),
/// and with the formula itself ([`policy::bits`]) where that is not certain.
#[derive(Clone, Copy, Debug)]
pub(super) struct Targets {
    p: QaqParams,
    t_total: usize,
    /// The key step width (`None`: no ||Q||^2 sample yet; keys keep their widths).
    e_k: Option<f64>,
    /// The part of the value step width shared by every token.
    v_num: f64,
    /// `1 / e_k` and `1 / v_num`.
    inv_ek: f64,
    inv_vnum: f64,
}

impl Targets {
    /// The rule for a context of `t_total` tokens with the head's ||Q||^2 samples `qn`.
    pub fn new(p: &QaqParams, t_total: usize, qn: &QNormTracker) -> Self {
        let qn2 = match p.qnorm {
            QNorm::Constant(c) => Some(c),
            QNorm::Percentile(pc) => qn.percentile(pc),
        };
        let e_k = qn2.map(|q| p.key_step_for(t_total, q));
        let v_num = policy::value_step_numerator(t_total, p.sigma_x);
        Targets { p: *p, t_total, e_k, v_num, inv_ek: e_k.map_or(0.0, |e| 1.0 / e), inv_vnum: 1.0 / v_num }
    }

    /// The key width of token `t` stored as `m`, whose window is `full` or not.
    #[inline]
    pub fn key(&self, t: usize, m: &GroupMeta, full: bool) -> u8 {
        let p = &self.p;
        match self.e_k {
            _ if t < p.sinks || (p.k_window && !full) => p.b_max,
            Some(e) => {
                let r = m.range() as f64;
                policy::bits_near(r * self.inv_ek, p.formula, p.b_min, p.b_max)
                    .unwrap_or_else(|| policy::bits(r, e, p.formula, p.b_min, p.b_max))
            }
            None => m.bits,
        }
    }

    /// The rule as the SIMD window pass takes it.
    fn rule(&self) -> WidthRule {
        let p = &self.p;
        WidthRule {
            sinks: p.sinks,
            k_window: p.k_window,
            b_min: p.b_min,
            b_max: p.b_max,
            reference: p.formula == policy::BitFormula::Reference,
            inv_ek: self.e_k.map(|_| self.inv_ek),
            inv_vnum: self.inv_vnum,
        }
    }

    /// The value width of token `t` stored as `m`, whose window is `full` or not and
    /// has the maximum `wmax`.
    #[inline]
    pub fn value(&self, t: usize, m: &GroupMeta, full: bool, wmax: f32) -> u8 {
        let p = &self.p;
        if t < p.sinks || !full {
            return p.b_max;
        }
        let (r, a) = (m.range() as f64, wmax as f64);
        policy::bits_near(r * a * self.inv_vnum, p.formula, p.b_min, p.b_max).unwrap_or_else(|| {
            let e = policy::value_step_from(self.v_num, self.t_total, a);
            policy::bits(r, e, p.formula, p.b_min, p.b_max)
        })
    }
}

/// Moves of one stream: (token, new width), in token order.
pub(super) type Moves = Vec<(u32, u8)>;

/// The moves a (layer, KV head) has to make at the end of the step, decided during its
/// attention: the tokens whose key (value) width differs from its target, in token
/// order, with the target. Valid while nothing the decisions read has changed since
/// (`len` tokens, the head's state at `epoch`).
#[derive(Clone, Debug, Default)]
pub(super) struct Plan {
    ready: bool,
    len: usize,
    epoch: u64,
    k: Moves,
    v: Moves,
}

impl Plan {
    /// Whether the plan holds the decisions for `len` tokens and the state at `epoch`.
    pub fn valid(&self, len: usize, epoch: u64) -> bool {
        self.ready && self.len == len && self.epoch == epoch
    }
    /// Forgets the decisions (they were carried out, or the state changed).
    pub fn clear(&mut self) {
        self.ready = false;
    }
    /// The key and value moves.
    pub fn moves(&self) -> (&Moves, &Moves) {
        (&self.k, &self.v)
    }
    /// Decides the moves now, from every token's targets under `tg` and its window in
    /// `win` (for a step whose attention did not plan them).
    pub fn evaluate(&mut self, k: &PackedStream, v: &PackedStream, tg: &Targets, win: &Windows) {
        self.k.clear();
        self.v.clear();
        let mut t = 0usize;
        for (kb, vb) in k.blocks().iter().zip(v.blocks()) {
            for (km, vm) in kb.meta.iter().zip(&vb.meta) {
                let full = win.full(t);
                let wk = tg.key(t, km, full);
                if wk != km.bits {
                    self.k.push((t as u32, wk));
                }
                let wv = if full { tg.value(t, vm, true, win.max(t)) } else { tg.value(t, vm, false, 0.0) };
                if wv != vm.bits {
                    self.v.push((t as u32, wv));
                }
                t += 1;
            }
        }
    }
}

/// Pushes each token's observation (`obs`) into the window of every token of a head
/// whose keys and values are `k` and `v`; with `targets`, also plans the step's moves
/// into `plan`, for the state at `epoch` (recorded as the plan's). Without, the plan is
/// cleared. At the AVX-512 level, eight tokens at a time ([`simd::window_pass`]; the
/// few widths it leaves undecided are computed here), else one by one.
pub(super) fn window_pass(
    win: &mut Windows,
    plan: &mut Plan,
    epoch: u64,
    k: &PackedStream,
    v: &PackedStream,
    targets: Option<&Targets>,
    obs: Observed<'_>,
) {
    plan.k.clear();
    plan.v.clear();
    let t_total = v.len();
    let rule = targets.map(Targets::rule);
    let (rows, seen, pos) = win.raw_mut();
    if simd::window_pass(obs, rows, seen, pos, k.blocks(), v.blocks(), rule.as_ref(), &mut plan.k, &mut plan.v) {
        if let Some(tg) = targets {
            let meta = |s: &PackedStream, t: u32| s.meta(t as usize).expect("a planned token is stored");
            let win = &*win;
            plan.k.retain_mut(|(t, w)| {
                let m = meta(k, *t);
                if *w == UNDECIDED {
                    *w = tg.key(*t as usize, &m, win.full(*t as usize));
                }
                *w != m.bits
            });
            plan.v.retain_mut(|(t, w)| {
                let m = meta(v, *t);
                if *w == UNDECIDED {
                    let t = *t as usize;
                    *w = tg.value(t, &m, win.full(t), win.max(t));
                }
                *w != m.bits
            });
        }
    } else {
        scalar_pass(win, plan, k, v, targets, obs);
    }
    (plan.ready, plan.len, plan.epoch) = (targets.is_some(), t_total, epoch);
}

/// [`window_pass`] one token at a time (below the AVX-512 level, and the reference of
/// the SIMD pass).
fn scalar_pass(
    win: &mut Windows,
    plan: &mut Plan,
    k: &PackedStream,
    v: &PackedStream,
    targets: Option<&Targets>,
    obs: Observed<'_>,
) {
    let t_total = v.len();
    let value = |t: usize| match obs {
        Observed::Probs(p, g) => (0..g).map(|j| p[j * t_total + t]).fold(0f32, f32::max),
        Observed::Values(w) => w[t],
    };
    let mut t = 0usize;
    for (kb, vb) in k.blocks().iter().zip(v.blocks()) {
        for (km, vm) in kb.meta.iter().zip(&vb.meta) {
            let (full, wmax) = win.push_full_max(t, value(t));
            if let Some(tg) = targets {
                let wk = tg.key(t, km, full);
                if wk != km.bits {
                    plan.k.push((t as u32, wk));
                }
                let wv = tg.value(t, vm, full, wmax);
                if wv != vm.bits {
                    plan.v.push((t as u32, wv));
                }
            }
            t += 1;
        }
    }
}

/// Where re-encoding reads and what it records, for one stream.
pub(super) struct Ctx<'a> {
    pub layer: usize,
    pub head: usize,
    pub is_key: bool,
    pub p: &'a QaqParams,
    pub host: &'a dyn HostTier,
    pub counters: &'a mut Counters,
    /// The tokens re-encoded, for a device mirror (`None`: not tracked).
    pub rewritten: Option<&'a mut Vec<u32>>,
}

/// Re-encodes the tokens of `moves` (token, width; in token order) in `s`.
pub(super) fn move_planned(s: &mut PackedStream, moves: &[(u32, u8)], cx: &mut Ctx<'_>) -> Result<()> {
    let (mut wants, mut sel) = ([0u8; BLOCK_TOKENS], [false; BLOCK_TOKENS]);
    let mut rest = moves;
    while let Some(&(t, _)) = rest.first() {
        let bi = t as usize / BLOCK_TOKENS;
        let n = rest.iter().take_while(|&&(u, _)| u as usize / BLOCK_TOKENS == bi).count();
        // The next block to rewrite is a separate allocation last touched a step ago:
        // fetch it while this one is rewritten.
        if let Some(nb) = rest.get(n).and_then(|&(u, _)| s.blocks().get(u as usize / BLOCK_TOKENS)) {
            prefetch(nb.meta.as_ptr() as *const u8, std::mem::size_of_val(nb.meta.as_slice()));
            prefetch(nb.codes.as_ptr(), nb.codes.len());
            prefetch(nb.out_val.as_ptr() as *const u8, std::mem::size_of_val(nb.out_val.as_slice()));
        }
        sel.fill(false);
        for &(u, w) in &rest[..n] {
            let i = u as usize % BLOCK_TOKENS;
            (wants[i], sel[i]) = (w, true);
        }
        rewrite_selected(s, bi, &wants, &sel, cx)?;
        rest = &rest[n..];
    }
    Ok(())
}

/// Asks the CPU to fetch `len` bytes at `p` into its caches (a no-op off x86-64).
#[inline]
fn prefetch(p: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    for off in (0..len).step_by(64) {
        // SAFETY: SSE is part of the x86-64 baseline; a prefetch never faults.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.wrapping_add(off) as *const i8)
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, len);
}

/// Re-encodes the groups `i` of block `bi` with `sel[i]` at width `wants[i]`: down by
/// dropping code bits (midpoint) or from the codes, or from the backup with
/// [`DownSource::Backup`]; up from the backup (refused and counted without one).
fn rewrite_selected(
    s: &mut PackedStream,
    bi: usize,
    wants: &[u8; BLOCK_TOKENS],
    sel: &[bool; BLOCK_TOKENS],
    cx: &mut Ctx<'_>,
) -> Result<()> {
    let d = s.d();
    let spec = *s.spec();
    let t0 = bi * BLOCK_TOKENS;
    let mut tmp = [0f32; crate::base::MAX_GROUP];
    let tmp = &mut tmp[..d];
    let Ctx { layer, head, is_key, p, host, counters: c, rewritten } = cx;
    let (layer, head, is_key) = (*layer, *head, *is_key);
    s.rewrite_groups(bi, Some(sel), |i, g, sink| {
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
                row[head * d..(head + 1) * d].convert_to_f32_slice(tmp);
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
                quant::decode_group(&g.meta, spec.scheme, g.codes, g.out_idx, g.out_val, tmp);
            }
        }
        bump(c, is_key, up);
        quant::encode_group(tmp, want, &spec, sink.codes, sink.out_idx, sink.out_val).map(Some)
    })?;
    if let Some(r) = rewritten.as_deref_mut() {
        // Selected groups that now have their target width were re-encoded (an
        // upward move without a backup kept its group).
        let meta = &s.blocks()[bi].meta;
        r.extend((0..meta.len()).filter(|&i| sel[i] && meta[i].bits == wants[i]).map(|i| (t0 + i) as u32));
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
    use super::*;
    use crate::base::{GroupMeta, QuantSpec, RAW, code_bytes};
    use crate::policy::BitFormula;
    use half::f16;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn u(&mut self) -> f32 {
            (self.next() >> 40) as f32 / (1u64 << 24) as f32
        }
    }

    /// A stream of `n` groups of 64 values with the given metadata (codes all zero).
    fn stream(metas: &[GroupMeta]) -> PackedStream {
        let mut s = PackedStream::new(64, QuantSpec::default(), false);
        for m in metas {
            s.push_encoded(*m, &vec![0u8; code_bytes(m.bits, 64)], &[], &[]).unwrap();
        }
        s
    }

    /// The window pass as the cache runs it (eight tokens at a time at the AVX-512
    /// level) against the one-token-at-a-time pass: the same windows and the same plans,
    /// on metadata and probabilities made to put the width formulas on a power of two
    /// (give or take an ulp) for a quarter of the tokens, with sinks, key windows, both
    /// formulas, no ||Q||^2 yet, saturated counts, and lengths that end mid-block and
    /// mid-chunk.
    #[test]
    fn the_window_pass_decides_as_the_scalar_pass() {
        let mut rng = Rng(0x1234_5678_9abc_def1);
        for case in 0..60 {
            let n_tok = [1, 7, 8, 9, 64, 65, 100, 333][case % 8];
            let g = 1 + case % 4;
            let n = [1, 2, 5, 7][case / 8 % 4];
            let mut p = QaqParams { sinks: [0, 3, 9][case % 3], k_window: case % 2 == 0, ..Default::default() };
            p.formula = if case % 5 < 2 { BitFormula::Reference } else { BitFormula::Paper };
            (p.b_min, p.b_max) = [(0, 8), (1, 8), (2, 5)][case % 3];
            let t_total = n_tok + case % 3;
            let num = policy::value_step_numerator(t_total, p.sigma_x);
            let mut qn = QNormTracker::default();
            if case % 7 != 3 {
                qn.observe(0.3 + rng.u() as f64);
            }
            let tg = Targets::new(&p, t_total, &qn);
            let meta = |rng: &mut Rng| {
                let bits = [0u8, 1, 2, 3, 4, 5, 8, RAW][(rng.next() % 8) as usize];
                let s = f16::from_f32(rng.u() * 0.2 + 1e-3);
                GroupMeta { m: f16::from_f32(-1.0), s, bits, n_out: 0 }
            };
            let km: Vec<GroupMeta> = (0..n_tok).map(|_| meta(&mut rng)).collect();
            let vm: Vec<GroupMeta> = (0..n_tok).map(|_| meta(&mut rng)).collect();
            let (k, v) = (stream(&km), stream(&vm));
            let mut win = Windows::new(n);
            win.grow(n_tok);
            for t in 0..n_tok {
                for _ in 0..(rng.next() % (n as u64 + 2)) {
                    win.push(t, rng.u() * 0.01);
                }
            }
            let probs: Vec<f32> = (0..g * n_tok)
                .map(|i| {
                    let t = i % n_tok;
                    let r = vm[t].range() as f64;
                    if rng.next().is_multiple_of(4) && r > 0.0 {
                        // r * a / num on a power of two, give or take an ulp.
                        let x = 2f64.powi((rng.next() % 10) as i32 - 2);
                        let x = if p.formula == BitFormula::Reference { 2.0 * (x - 1.0).max(0.5) } else { x };
                        let a = (x * num / r) as f32;
                        f32::from_bits((a.to_bits() as i64 + (rng.next() % 3) as i64 - 1) as u32)
                    } else {
                        rng.u() * 0.05
                    }
                })
                .collect();
            let values: Vec<f32> = (0..n_tok).map(|_| rng.u() * 0.03).collect();
            for obs in [Observed::Probs(&probs, g), Observed::Values(&values)] {
                for targets in [Some(&tg), None] {
                    let (mut w1, mut w2) = (win.clone(), win.clone());
                    let (mut p1, mut p2) = (Plan::default(), Plan::default());
                    window_pass(&mut w1, &mut p1, 7, &k, &v, targets, obs);
                    scalar_pass(&mut w2, &mut p2, &k, &v, targets, obs);
                    assert_eq!(w1.parts(), w2.parts(), "case {case}: windows");
                    assert_eq!((p1.k, p1.v), (p2.k, p2.v), "case {case}: plans");
                }
            }
        }
    }
}
