//! The two halves of the attention of one KV head's query heads over packed values,
//! dispatched on the SIMD level: [`attend_probs`] (scores and softmax) and
//! [`attend_values`] (the probability-weighted values). [`super::attend_packed`] is the
//! one after the other; a caller that runs them as separate tasks (the decode of one
//! sequence on several cores) gets the same results. And [`window_pass`], what QAQ does
//! with a decode row's probabilities, and [`dense_scores`] / [`dense_values`], the
//! register-tiled halves of a prefill's exact multi-row attention.

use super::level::{Level, avx2, level};
use super::portable;
use super::rule::{Observed, WidthRule};
#[cfg(target_arch = "x86_64")]
use super::x86;
use crate::base::{Block, StreamView};

/// The attention probabilities (`probs`, `g * T`) of `g` query heads (`qs`, `g * d`,
/// already scaled) over packed keys `keys` of `t` tokens ([`packed_scores`], then
/// [`softmax_rows`]), or, when `keys` is `None`, from the scores already in `probs`
/// (keys of another layout).
pub(crate) fn attend_probs(keys: Option<StreamView<'_>>, qs: &[f32], g: usize, t: usize, probs: &mut [f32]) {
    if let Some(k) = keys {
        assert!(k.len == t);
        packed_scores(k, qs, g, probs);
    }
    softmax_rows(probs, g, t);
}

/// The scores (before the softmax; `scores`, `g * T`, row `j` for query head `j`) of
/// `g` query heads (`qs`, `g * d`, already scaled) over the `T` packed keys of `k`. AVX2
/// level: the fused kernels of `x86::attention`; at the AVX-512 level those of
/// `x86::attention512` for head dims that are multiples of 64, else the AVX-512VL build
/// of `x86::attention`; else the portable ones.
pub(crate) fn packed_scores(k: StreamView<'_>, qs: &[f32], g: usize, scores: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if let Some(path) = packed_path(k.d) {
        assert!(qs.len() >= g * k.d && scores.len() >= g * k.len);
        // SAFETY: `packed_path` checked the features at run time; lengths checked above.
        unsafe {
            match path {
                PackedPath::Wide512 => x86::attention512::packed_scores(k, qs, g, scores, super::level::vnni()),
                PackedPath::Attention { wide } => x86::attention::packed_scores(k, qs, g, scores, wide),
            }
        }
        return;
    }
    portable::packed_scores(k, qs, g, scores);
}

/// The x86 kernels of the packed attention.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
enum PackedPath {
    /// `x86::attention512` (AVX-512 F/BW/VL/VBMI; AVX512_VNNI where detected).
    Wide512,
    /// `x86::attention`, its AVX-512VL build when `wide`, else AVX2.
    Attention { wide: bool },
}

/// Which x86 kernels run the packed attention of head size `d` at this process's level
/// (`None`: the portable ones).
#[cfg(target_arch = "x86_64")]
fn packed_path(d: usize) -> Option<PackedPath> {
    if !avx2() || !d.is_multiple_of(8) {
        return None;
    }
    let wide = level() == Level::Avx512;
    Some(if wide && x86::attention512::fits(d) { PackedPath::Wide512 } else { PackedPath::Attention { wide } })
}

/// In-place softmax of each of the `g` rows of length `t` in `x`: at the AVX2 level and
/// above `x86::attention`'s (vectorized exp and sums), else the portable one.
pub(crate) fn softmax_rows(x: &mut [f32], g: usize, t: usize) {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: AVX2 and FMA detected.
        unsafe { x86::attention::softmax_rows(x, g, t) };
        return;
    }
    portable::softmax_rows(x, g, t);
}

/// `out[j * d ..] = sum_t probs[j * T + t] * v_hat_t` for `g` query heads over packed
/// values `v` (dispatched as [`packed_scores`]).
pub(crate) fn attend_values(v: StreamView<'_>, probs: &[f32], g: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if let Some(path) = packed_path(v.d) {
        assert!(out.len() >= g * v.d && probs.len() >= g * v.len);
        // SAFETY: `packed_path` checked the features at run time; lengths checked above.
        unsafe {
            match path {
                PackedPath::Wide512 => x86::attention512::weighted_values(v, probs, g, out, super::level::vnni()),
                PackedPath::Attention { wide } => x86::attention::weighted_values(v, probs, g, out, wide),
            }
        }
        return;
    }
    portable::weighted_values(v, probs, g, out);
}

/// Scores of many query vectors over f32 keys (`probs[offs[i] + t] = dot(q_i, k_t)` for
/// `t < lens[i]`, `qs`: `[i][d]`, `k`: `[t][d]`), bit-identical to [`super::dot`] of each
/// pair; with [`softmax_rows`] and [`dense_values`], a prefill's multi-row attention.
/// `x86::dense512`'s register tiles at the AVX-512 level for head dims that are
/// multiples of 16; returns `false` without doing anything elsewhere (the caller then
/// takes the primitives pair by pair, with the same results).
pub(crate) fn dense_scores(k: &[f32], d: usize, qs: &[f32], lens: &[usize], offs: &[usize], probs: &mut [f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if dense512(d) {
        // SAFETY: AVX-512F, AVX2 and FMA detected; the kernel asserts the shapes.
        unsafe { x86::dense512::scores(k, d, qs, lens, offs, probs) };
        return true;
    }
    let _ = (k, d, qs, lens, offs, probs);
    false
}

/// Whether the dense kernels run at this level for head size `d` (AVX-512 only).
#[cfg(target_arch = "x86_64")]
fn dense512(d: usize) -> bool {
    level() == Level::Avx512 && x86::dense512::fits(d)
}

/// The weighted values of many query vectors (`out[i * d..][..d] = sum_{t < lens[i]}
/// probs[offs[i] + t] * v_t`), bit-identical to [`super::axpy`] over `t` in order from
/// zero; dispatched as [`dense_scores`].
pub(crate) fn dense_values(
    v: &[f32],
    d: usize,
    probs: &[f32],
    lens: &[usize],
    offs: &[usize],
    out: &mut [f32],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if dense512(d) {
        // SAFETY: as in `dense_scores`.
        unsafe { x86::dense512::values(v, d, probs, lens, offs, out) };
        return true;
    }
    let _ = (v, d, probs, lens, offs, out);
    false
}

/// The window update of one (layer, KV head) after a decode row, over every token (the
/// rings `rows[slot][t]`, counts `seen` and next slots `pos` of
/// [`crate::policy::Windows`]), and, with `rule`, the tokens whose key (value) width
/// differs from its target: `(token, target)` appended to `kout` (`vout`) in token
/// order, the target [`super::UNDECIDED`] where it is too close to a width boundary for the
/// fast computation (those lanes may also not move). Returns `false` without doing
/// anything below the AVX-512 level (the caller then runs its scalar pass).
#[allow(clippy::too_many_arguments)]
pub(crate) fn window_pass(
    obs: Observed<'_>,
    rows: &mut [Vec<f32>],
    seen: &mut [u32],
    pos: &mut [u32],
    k: &[Block],
    v: &[Block],
    rule: Option<&WidthRule>,
    kout: &mut Vec<(u32, u8)>,
    vout: &mut Vec<(u32, u8)>,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if level() == Level::Avx512 && !rows.is_empty() && rows.len() < i32::MAX as usize {
        // SAFETY: the features were detected at run time; the shapes are checked inside.
        unsafe { x86::window::window_pass(obs, rows, seen, pos, k, v, rule, kout, vout) };
        return true;
    }
    let _ = (obs, rows, seen, pos, k, v, rule, kout, vout);
    false
}
