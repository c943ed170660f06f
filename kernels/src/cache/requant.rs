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
//!   snapshot, a direct [`super::QaqCache::requantize`]): [`move_stream`] evaluates every
//!   token at the step's end, as the cache always did.
//!
//! Both re-encode through [`rewrite_selected`], block by block in token order, so the
//! counters, the host reads and the rewrite lists of a device mirror are the same.

use super::types::Counters;
use crate::base::{GroupMeta, Scheme};
use crate::error::Result;
use crate::host::HostTier;
use crate::policy::{self, DownSource, QNorm, QNormTracker, QaqParams, Windows};
use crate::quant;
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

/// The moves a (layer, KV head) has to make at the end of the step, decided during its
/// attention: the tokens whose key (value) width differs from its target, in token
/// order, with the target. Valid while nothing the decisions read has changed since
/// (`len` tokens, the head's state at `epoch`).
#[derive(Clone, Debug, Default)]
pub(super) struct Plan {
    ready: bool,
    len: usize,
    epoch: u64,
    k: Vec<(u32, u8)>,
    v: Vec<(u32, u8)>,
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
    pub fn moves(&self) -> (&[(u32, u8)], &[(u32, u8)]) {
        (&self.k, &self.v)
    }
}

/// Pushes `value(t)` into the window of every token `t` of a head whose keys and values
/// are `k` and `v`; with `targets`, also plans the step's moves into `plan`, for the
/// state at `epoch` (recorded as the plan's). Without, the plan is cleared.
pub(super) fn window_pass(
    win: &mut Windows,
    plan: &mut Plan,
    epoch: u64,
    k: &PackedStream,
    v: &PackedStream,
    targets: Option<&Targets>,
    value: impl Fn(usize) -> f32,
) {
    plan.k.clear();
    plan.v.clear();
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
    (plan.ready, plan.len, plan.epoch) = (targets.is_some(), t, epoch);
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

/// Evaluates `target` for every token of `s` and re-encodes the tokens whose width
/// differs (the re-quantization of a stream without a plan).
pub(super) fn move_stream(
    s: &mut PackedStream,
    cx: &mut Ctx<'_>,
    target: impl Fn(usize, &GroupMeta) -> u8,
) -> Result<()> {
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
        if changed {
            rewrite_selected(s, bi, &wants, &sel, cx)?;
        }
    }
    Ok(())
}

/// Re-encodes the tokens of `moves` (token, width; in token order) in `s`.
pub(super) fn move_planned(s: &mut PackedStream, moves: &[(u32, u8)], cx: &mut Ctx<'_>) -> Result<()> {
    let (mut wants, mut sel) = ([0u8; BLOCK_TOKENS], [false; BLOCK_TOKENS]);
    let mut rest = moves;
    while let Some(&(t, _)) = rest.first() {
        let bi = t as usize / BLOCK_TOKENS;
        let n = rest.iter().take_while(|&&(u, _)| u as usize / BLOCK_TOKENS == bi).count();
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
