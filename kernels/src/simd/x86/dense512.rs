//! AVX-512 exact attention of many query vectors over f32 keys and values: the
//! multi-row attention of a prefill chunk, for head dims that are multiples of 16.
//!
//! Row by row (`crate::attention::attend_dense_f32`) every query vector streams the
//! whole key and value history through the AVX2 `dot` and `axpy`; at long contexts
//! that is most of a prefill. Here register tiles share each load among several query
//! vectors (scores: 4 query vectors x 4 keys; values: 6 query vectors at head dim 64, 3
//! at 128), and the keys and values are walked in blocks that stay in L2 while every
//! tile of the call uses them.
//!
//! Each output is computed with the operations of the AVX2 primitives, in their order,
//! so the results are bit-identical to the row-by-row path (the tests compare bits):
//! - a score is `prim::x86::dot`: 8-lane fused multiply-add chains over the chunks
//!   `16c..16c+8` (`acc0`) and `16c+8..16c+16` (`acc1`), which are the low and high
//!   halves of one 16-lane chain, then `hsum(acc0 + acc1)` (its tree, on 16 sums at
//!   once);
//! - a value output lane is `prim::x86::axpy`'s `acc = p_t * v_t + acc`, fused, over
//!   `t = 0, 1, ...` in order, starting from zero; lanes are independent, so 16-lane
//!   vectors give the same lanes as 8-lane ones.
//!
//! Query vector `i` attends keys `0..lens[i]`; its scores (and probabilities) live at
//! `probs[offs[i]..][..lens[i]]`, its output at `out[i * d..][..d]`.

use crate::simd::prim::x86::dot;
use std::arch::x86_64::*;

/// Query vectors per score tile.
const QT: usize = 4;
/// Keys per score tile.
const KT: usize = 4;
// `reduce16` is written for 4 x 4 tiles.
const _: () = assert!(QT == 4 && KT == 4);

/// Keys (and values) per L2 block: 128 KiB of f32 at head dim 64.
const BLOCK: usize = 512;

/// Whether the kernels serve head dim `d`.
pub(crate) fn fits(d: usize) -> bool {
    d.is_multiple_of(16) && d > 0
}

/// The 16 sums of a score tile's accumulators, `acc[i][j]` reduced as `prim::x86::dot`
/// reduces its two 8-lane halves ([`tree16`]). Lane `4 i + j` of the result is
/// `acc[i][j]`'s sum.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
fn reduce16(acc: &[[__m512; KT]; QT]) -> __m512 {
    // Accumulator n is acc[n % 4][n / 4]: then the last level leaves vector i's four sums
    // in 128-bit lane i.
    tree16(|n| acc[n % QT][n / QT], |x, y| _mm512_add_ps(x, y))
}

/// The sums of the 16 lanes of each of 16 vectors `a(0..16)` (`add` adds two vectors,
/// as floats or as integers): lanes `(l, l + 8)`, then `(l, l + 4)`, `(l, l + 2)`,
/// `(0, 1)`, the tree `prim::x86::dot`'s `hsum` walks, on four vectors per register at
/// each level (30 shuffles and 15 additions for 16 sums). Lane `4 k + r` of the result
/// is `a(4 r + k)`'s sum.
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) fn tree16(a: impl Fn(usize) -> __m512, add: impl Fn(__m512, __m512) -> __m512) -> __m512 {
    // (l, l + 8): [a(2m) (8 lanes), a(2m + 1) (8 lanes)].
    let s1: [__m512; 8] = std::array::from_fn(|m| {
        let (x, y) = (a(2 * m), a(2 * m + 1));
        add(_mm512_shuffle_f32x4::<0x44>(x, y), _mm512_shuffle_f32x4::<0xEE>(x, y))
    });
    // (l, l + 4): [a(4p), a(4p + 1), a(4p + 2), a(4p + 3)], 4 lanes each.
    let s2: [__m512; 4] = std::array::from_fn(|p| {
        let (x, y) = (s1[2 * p], s1[2 * p + 1]);
        add(_mm512_shuffle_f32x4::<0x88>(x, y), _mm512_shuffle_f32x4::<0xDD>(x, y))
    });
    // (l, l + 2): 128-bit lane k = [a(8r + k) (2 lanes), a(8r + 4 + k) (2 lanes)].
    let s3: [__m512; 2] = std::array::from_fn(|r| {
        let (x, y) = (s2[2 * r], s2[2 * r + 1]);
        add(_mm512_shuffle_ps::<0x44>(x, y), _mm512_shuffle_ps::<0xEE>(x, y))
    });
    // (0, 1): 128-bit lane k = [a(k), a(4 + k), a(8 + k), a(12 + k)].
    add(_mm512_shuffle_ps::<0x88>(s3[0], s3[1]), _mm512_shuffle_ps::<0xDD>(s3[0], s3[1]))
}

/// Scores of query vectors `qs` (`n * d`) against keys `k` (`[t][d]`): `probs[offs[i] +
/// t] = dot(q_i, k_t)` for `t < lens[i]`.
///
/// # Safety
/// AVX-512F, AVX2 and FMA available; `fits(d)`; `k` holds `max(lens)` keys, `qs` holds
/// `lens.len()` vectors, `offs[i] + lens[i] <= probs.len()`.
#[target_feature(enable = "avx512f,avx2,fma")]
pub(crate) unsafe fn scores(k: &[f32], d: usize, qs: &[f32], lens: &[usize], offs: &[usize], probs: &mut [f32]) {
    let n = lens.len();
    let max = lens.iter().copied().max().unwrap_or(0);
    assert!(fits(d) && k.len() >= max * d && qs.len() >= n * d && offs.len() == n);
    assert!(lens.iter().zip(offs).all(|(&l, &o)| o + l <= probs.len()));
    let (kp, qp, pp) = (k.as_ptr(), qs.as_ptr(), probs.as_mut_ptr());
    // Per full tile of QT vectors: the keys all of them attend, in whole key tiles.
    let tiled = |q0: usize| if q0 + QT <= n { lens[q0..q0 + QT].iter().min().unwrap() / KT * KT } else { 0 };
    for b0 in (0..max).step_by(BLOCK) {
        for q0 in (0..n).step_by(QT) {
            let end = tiled(q0).min(b0 + BLOCK);
            let mut t = b0;
            while t < end {
                let mut acc = [[_mm512_setzero_ps(); KT]; QT];
                for c in (0..d).step_by(16) {
                    // SAFETY: t + KT <= lens of every vector of the tile <= keys in `k`;
                    // c + 16 <= d.
                    let kv: [__m512; KT] = std::array::from_fn(|j| unsafe { _mm512_loadu_ps(kp.add((t + j) * d + c)) });
                    for (i, a) in acc.iter_mut().enumerate() {
                        // SAFETY: q0 + i < n.
                        let qv = unsafe { _mm512_loadu_ps(qp.add((q0 + i) * d + c)) };
                        for (a, &kv) in a.iter_mut().zip(&kv) {
                            *a = _mm512_fmadd_ps(qv, kv, *a);
                        }
                    }
                }
                let w = reduce16(&acc);
                let lanes = [
                    _mm512_extractf32x4_ps::<0>(w),
                    _mm512_extractf32x4_ps::<1>(w),
                    _mm512_extractf32x4_ps::<2>(w),
                    _mm512_extractf32x4_ps::<3>(w),
                ];
                for (i, &l) in lanes.iter().enumerate() {
                    // SAFETY: t + KT <= lens[q0 + i], so inside the vector's scores.
                    unsafe { _mm_storeu_ps(pp.add(offs[q0 + i] + t), l) };
                }
                t += KT;
            }
        }
    }
    // What the tiles left: the keys past a tile's shortest vector, and partial tiles.
    for q0 in (0..n).step_by(QT) {
        let from = tiled(q0);
        for i in q0..n.min(q0 + QT) {
            let q = &qs[i * d..(i + 1) * d];
            for t in from..lens[i] {
                // SAFETY: the features are enabled here; equal lengths, a multiple of 8.
                probs[offs[i] + t] = unsafe { dot(q, &k[t * d..(t + 1) * d]) };
            }
        }
    }
}

/// Weighted values: `out[i * d..][..d] = sum_{t < lens[i]} probs[offs[i] + t] * v_t`
/// (`v`: `[t][d]`).
///
/// # Safety
/// As [`scores`], with `v` for `k` and `out.len() >= lens.len() * d`.
#[target_feature(enable = "avx512f,avx2,fma")]
pub(crate) unsafe fn values(v: &[f32], d: usize, probs: &[f32], lens: &[usize], offs: &[usize], out: &mut [f32]) {
    let n = lens.len();
    let max = lens.iter().copied().max().unwrap_or(0);
    assert!(fits(d) && v.len() >= max * d && out.len() >= n * d && offs.len() == n);
    assert!(lens.iter().zip(offs).all(|(&l, &o)| o + l <= probs.len()));
    out[..n * d].fill(0.0);
    // SAFETY (all three): the features are enabled here; the shapes are as asserted.
    match d {
        64 => unsafe { values_tiled::<4, 6>(v, probs, lens, offs, out) },
        128 => unsafe { values_tiled::<8, 3>(v, probs, lens, offs, out) },
        _ => unsafe { values_tiled_any(v, d, probs, lens, offs, out) },
    }
}

/// [`values`] for head dim `16 * DC`, `Q` query vectors at a time (`Q * DC` 16-lane
/// accumulators), over blocks of [`BLOCK`] values; `out` starts zeroed and holds the
/// partial sums between blocks.
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn values_tiled<const DC: usize, const Q: usize>(
    v: &[f32],
    probs: &[f32],
    lens: &[usize],
    offs: &[usize],
    out: &mut [f32],
) {
    let d = 16 * DC;
    let n = lens.len();
    let max = lens.iter().copied().max().unwrap_or(0);
    let (vp, pp, op) = (v.as_ptr(), probs.as_ptr(), out.as_mut_ptr());
    let common = |q0: usize| lens[q0..n.min(q0 + Q)].iter().copied().min().unwrap_or(0);
    for b0 in (0..max).step_by(BLOCK) {
        for q0 in (0..n).step_by(Q) {
            let end = common(q0).min(b0 + BLOCK);
            if b0 >= end {
                continue;
            }
            if q0 + Q > n {
                for (i, &off) in offs.iter().enumerate().skip(q0) {
                    // SAFETY: as below, one vector at a time.
                    unsafe { values_one::<DC>(vp, pp.add(off), b0..end, op.add(i * d)) };
                }
                continue;
            }
            // SAFETY: q0 + Q <= n, so every output row is inside `out`.
            let mut acc: [[__m512; DC]; Q] = std::array::from_fn(|i| {
                std::array::from_fn(|c| unsafe { _mm512_loadu_ps(op.add((q0 + i) * d + 16 * c)) })
            });
            for t in b0..end {
                // SAFETY: t < lens of every vector of the tile <= values in `v`.
                let vv: [__m512; DC] = std::array::from_fn(|c| unsafe { _mm512_loadu_ps(vp.add(t * d + 16 * c)) });
                for (i, a) in acc.iter_mut().enumerate() {
                    // SAFETY: t < lens[q0 + i].
                    let w = _mm512_set1_ps(unsafe { *pp.add(offs[q0 + i] + t) });
                    for (a, &x) in a.iter_mut().zip(&vv) {
                        *a = _mm512_fmadd_ps(w, x, *a);
                    }
                }
            }
            for (i, a) in acc.iter().enumerate() {
                for (c, &a) in a.iter().enumerate() {
                    // SAFETY: inside output row q0 + i.
                    unsafe { _mm512_storeu_ps(op.add((q0 + i) * d + 16 * c), a) };
                }
            }
        }
    }
    // Each vector's values past its tile's shortest (they come last in its sum).
    for q0 in (0..n).step_by(Q) {
        let from = common(q0);
        for i in q0..n.min(q0 + Q) {
            // SAFETY: from..lens[i] are values of `v` and scores of vector i.
            unsafe { values_one::<DC>(vp, pp.add(offs[i]), from..lens[i], op.add(i * d)) };
        }
    }
}

/// `o[..16 * DC] += sum_{t in range} p[t] * v_t`, fused, in order.
///
/// # Safety
/// The features; `v` holds the values of `range`, `p` their weights, `o` one output row.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn values_one<const DC: usize>(v: *const f32, p: *const f32, range: std::ops::Range<usize>, o: *mut f32) {
    let d = 16 * DC;
    // SAFETY: per the contract.
    unsafe {
        let mut acc: [__m512; DC] = std::array::from_fn(|c| _mm512_loadu_ps(o.add(16 * c)));
        for t in range {
            let w = _mm512_set1_ps(*p.add(t));
            for (c, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(w, _mm512_loadu_ps(v.add(t * d + 16 * c)), *a);
            }
        }
        for (c, &a) in acc.iter().enumerate() {
            _mm512_storeu_ps(o.add(16 * c), a);
        }
    }
}

/// [`values`] for any head dim that [`fits`]: one vector at a time, 16 lanes at a time.
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn values_tiled_any(v: &[f32], d: usize, probs: &[f32], lens: &[usize], offs: &[usize], out: &mut [f32]) {
    for (i, o) in out.chunks_exact_mut(d).take(lens.len()).enumerate() {
        let p = &probs[offs[i]..offs[i] + lens[i]];
        for c in (0..d).step_by(16) {
            let mut a = _mm512_setzero_ps();
            for (t, &w) in p.iter().enumerate() {
                // SAFETY: t < lens[i], so v_t is inside `v`; c + 16 <= d.
                a = _mm512_fmadd_ps(_mm512_set1_ps(w), unsafe { _mm512_loadu_ps(v.as_ptr().add(t * d + c)) }, a);
            }
            // SAFETY: c + 16 <= d = o.len().
            unsafe { _mm512_storeu_ps(o.as_mut_ptr().add(c), a) };
        }
    }
}
