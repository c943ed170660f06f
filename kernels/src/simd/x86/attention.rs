//! AVX2/FMA/F16C/BMI2 attention over the packed cache of one KV head (x86-64 only).
//!
//! Same algebra as the portable path, restructured for speed:
//! * keys: each group's codes are unpacked once into registers (pdep + convert) and
//!   dotted with every query head of the KV head (GQA sharing); the four (or fewer)
//!   dot products are reduced together; no fp32 key is written to memory;
//! * softmax: vectorised max / exp / sum / scale;
//! * values: each group's codes are unpacked once into registers and accumulated into
//!   register-resident output rows of up to three query heads, 32 values at a time;
//!   the per-group constants and outliers go to small side accumulators.
//!
//! Results agree with the portable path (`simd::portable`) to float rounding
//! (summation order differs); the tests in [`crate::attention`] compare them.
//!
//! Each kernel is one body compiled twice: for AVX2 (16 vector registers) and, at the
//! AVX-512 level, with AVX-512VL too (`wide`: 32 registers, still 8-lane vectors). The
//! wide build keeps the query heads' vectors in registers across the keys and
//! accumulates all 64 columns of three query heads' values in one pass over a block
//! (24 accumulators), where the AVX2 build reloads and makes two passes. Every output
//! element is computed by the same operations in the same order in both builds (the
//! same fused multiply-adds in the same chains, the same horizontal sums), so they
//! agree bit for bit.

use crate::base::{Block, GroupMeta, MAX_GROUP, RAW, Scheme, StreamView};
use crate::simd::prim::x86::{exp8, h2f_f16c, lane_mask};
use std::arch::x86_64::*;

/// Loads the 8 codes starting at `p` (width `mask`'s bits) as f32.
///
/// # Safety
/// 8 bytes readable at `p`; BMI2 and AVX2 available.
#[inline(always)]
unsafe fn codes8(p: *const u8, mask: u64) -> __m256 {
    // SAFETY: per the contract.
    unsafe {
        let w = u64::from_le((p as *const u64).read_unaligned());
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(_pdep_u64(w, mask) as i64)))
    }
}

/// Loads 8 little-endian f16 values at `p` as f32.
///
/// # Safety
/// 16 bytes readable at `p`; F16C available.
#[inline(always)]
unsafe fn raw8(p: *const u8) -> __m256 {
    // SAFETY: per the contract.
    unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
}

/// Code bytes of the next block that [`prefetch_block`] touches: enough to restart the
/// hardware stream prefetcher, which follows the rest. Prefetching a whole block (up to
/// 8 KiB of fp16, 128 lines at once) stalled the kernels on the prefetches themselves:
/// with an fp16 cache of 8k tokens, one decode step's attention kernels took 23.4-23.7 ms
/// of one core's time with it and 16.1-16.3 ms with this limit (6/3-bit codes: 15.1-15.7
/// ms either way; `cargo bench -p qaq-kernels --bench decode`, its `kernel` column).
const PREFETCH_CODES: usize = 512;

/// Prefetches the start of a block's codes, its metadata and outliers into the cache
/// (the blocks are separate allocations, so the hardware stream prefetcher loses the
/// stream at every block boundary).
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn prefetch_block(b: Option<&Block>) {
    let Some(b) = b else { return };
    let pf = |p: *const u8, len: usize| {
        for off in (0..len).step_by(64) {
            // Prefetching never faults; the address is inside the allocation anyway.
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(off) as *const i8);
        }
    };
    pf(b.codes.as_ptr(), b.codes.len().min(PREFETCH_CODES));
    pf(b.meta.as_ptr() as *const u8, std::mem::size_of_val(b.meta.as_slice()));
    pf(b.out_idx.as_ptr(), b.out_idx.len());
    pf(b.out_val.as_ptr() as *const u8, 2 * b.out_val.len());
}

/// Per-group constants: `(base, step, code bytes)`; raw groups read as base 0, step 1.
/// `base` is computed as in [`GroupMeta::base`] (F16C conversion, exact).
#[inline]
#[target_feature(enable = "avx2,f16c")]
pub(super) fn group_consts(m: &GroupMeta, offsets: &[f32; 9], d: usize) -> (f32, f32, usize) {
    if m.bits == RAW {
        (0.0, 1.0, 2 * d)
    } else {
        let ms = _mm_cvtph_ps(_mm_cvtsi32_si128((m.m.to_bits() as u32 | (m.s.to_bits() as u32) << 16) as i32));
        let (mf, sf) = (_mm_cvtss_f32(ms), _mm_cvtss_f32(_mm_movehdup_ps(ms)));
        (mf + offsets[m.bits as usize] * sf, sf, d * m.bits as usize / 8)
    }
}

/// `Scheme::offset` for widths 0..=8.
pub(super) fn offsets(scheme: Scheme) -> [f32; 9] {
    std::array::from_fn(|b| scheme.offset(b as u8))
}

/// `[dot(acc0), dot(acc1), dot(acc2), dot(acc3)]`.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) fn hsum4(a: [__m256; 4]) -> __m128 {
    let s = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s))
}

/// exp(x) for x <= 0 (softmax after max subtraction): the primitives' vector `exp`
/// (within 2 ulp), and 0 below the f32 normal range.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn exp_neg(x: __m256) -> __m256 {
    let keep = _mm256_cmp_ps::<_CMP_GE_OQ>(x, _mm256_set1_ps(-87.0));
    _mm256_and_ps(exp8(x), keep)
}

/// In-place softmax of each of the `g` rows of length `t` in `x`.
///
/// # Safety
/// AVX2 and FMA available.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn softmax_rows(x: &mut [f32], g: usize, t: usize) {
    for row in x.chunks_exact_mut(t.max(1)).take(g) {
        let n8 = row.len() / 8 * 8;
        let (body, tail) = row.split_at_mut(n8);
        let mut mv = _mm256_set1_ps(f32::NEG_INFINITY);
        for c in body.chunks_exact(8) {
            // SAFETY: `c` holds 8 floats.
            mv = _mm256_max_ps(mv, unsafe { _mm256_loadu_ps(c.as_ptr()) });
        }
        let mut lanes = [0f32; 8];
        // SAFETY: 8 floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), mv) };
        let mx = lanes.iter().chain(tail.iter()).copied().fold(f32::NEG_INFINITY, f32::max);
        let (mxv, mut sv) = (_mm256_set1_ps(mx), _mm256_setzero_ps());
        for c in body.chunks_exact_mut(8) {
            // SAFETY: `c` holds 8 floats.
            unsafe {
                let e = exp_neg(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), mxv));
                _mm256_storeu_ps(c.as_mut_ptr(), e);
                sv = _mm256_add_ps(sv, e);
            }
        }
        // SAFETY: 8 floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sv) };
        let mut sum: f32 = lanes.iter().sum();
        for v in tail.iter_mut() {
            *v = (*v - mx).exp();
            sum += *v;
        }
        let inv = 1.0 / sum;
        let iv = _mm256_set1_ps(inv);
        for c in body.chunks_exact_mut(8) {
            // SAFETY: `c` holds 8 floats.
            unsafe { _mm256_storeu_ps(c.as_mut_ptr(), _mm256_mul_ps(_mm256_loadu_ps(c.as_ptr()), iv)) };
        }
        for v in tail.iter_mut() {
            *v *= inv;
        }
    }
}

/// The query heads' values at every channel, transposed: `qt[i]` holds channel `i` of
/// heads `j0 .. j0 + 4` (zeros past `g`), for the outlier corrections.
pub(super) fn transpose_q(qs: &[f32], d: usize, g: usize, j0: usize, qt: &mut [[f32; 4]]) {
    for (i, q) in qt.iter_mut().enumerate().take(d) {
        for (j, x) in q.iter_mut().enumerate() {
            *x = if j0 + j < g { qs[(j0 + j) * d + i] } else { 0.0 };
        }
    }
}

/// The per-group constants (`p * base` summed per head) and outlier corrections
/// of one block for `g <= 4` heads, four heads per vector operation: `cst` and
/// `corr[i]` (channel `i`) hold heads `0..4`. The same products and sums, in the
/// same order, as one head at a time.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn block_constants4(
    b: &Block,
    offs: &[f32; 9],
    d: usize,
    probs: &[f32],
    g: usize,
    t_total: usize,
    t0: usize,
    cst: &mut __m128,
    corr: &mut [[f32; 4]],
) {
    let mut oo = 0usize;
    for (i, m) in b.meta.iter().enumerate() {
        if m.bits == RAW {
            continue;
        }
        let (base, _, _) = group_consts(m, offs, d);
        let mut p = [0f32; 4];
        for (j, x) in p.iter_mut().enumerate().take(g) {
            *x = probs[j * t_total + t0 + i];
        }
        // SAFETY: 4 floats.
        let pv = unsafe { _mm_loadu_ps(p.as_ptr()) };
        *cst = _mm_add_ps(*cst, _mm_mul_ps(pv, _mm_set1_ps(base)));
        let no = m.n_out as usize;
        for (&oi, &ov) in b.out_idx[oo..oo + no].iter().zip(&b.out_val[oo..oo + no]) {
            let delta = _mm_set1_ps(h2f_f16c(ov) - base);
            let c = &mut corr[oi as usize];
            // SAFETY: 4 floats.
            unsafe { _mm_storeu_ps(c.as_mut_ptr(), _mm_add_ps(_mm_loadu_ps(c.as_ptr()), _mm_mul_ps(pv, delta))) };
        }
        oo += no;
    }
}

/// [`block_constants4`] for any number of heads, one head at a time: `cst[j]` and
/// `corr[j * d + i]`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
fn block_constants(
    b: &Block,
    offs: &[f32; 9],
    d: usize,
    probs: &[f32],
    g: usize,
    t_total: usize,
    t0: usize,
    cst: &mut [f32],
    corr: &mut [f32],
) {
    let mut oo = 0usize;
    for (i, m) in b.meta.iter().enumerate() {
        if m.bits == RAW {
            continue;
        }
        let (base, _, _) = group_consts(m, offs, d);
        let no = m.n_out as usize;
        for j in 0..g {
            cst[j] += probs[j * t_total + t0 + i] * base;
        }
        for (&oi, &ov) in b.out_idx[oo..oo + no].iter().zip(&b.out_val[oo..oo + no]) {
            let delta = h2f_f16c(ov) - base;
            for j in 0..g {
                corr[j * d + oi as usize] += probs[j * t_total + t0 + i] * delta;
            }
        }
        oo += no;
    }
}

/// Adds the per-head constants and outlier corrections to the outputs (`g * d`): from
/// `cst4` / `corr4` when `g <= 4` ([`block_constants4`]), else from `cst` / `corr`
/// ([`block_constants`]).
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx2,fma,f16c")]
fn add_constants(
    out: &mut [f32],
    d: usize,
    g: usize,
    cst4: __m128,
    corr4: &[[f32; 4]],
    cst: &mut [f32],
    corr: &mut [f32],
) {
    if g <= 4 {
        let mut c = [0f32; 4];
        // SAFETY: 4 floats.
        unsafe { _mm_storeu_ps(c.as_mut_ptr(), cst4) };
        for j in 0..g {
            cst[j] = c[j];
            for i in 0..d {
                corr[j * d + i] = corr4[i][j];
            }
        }
    }
    add_rows(out, d, g, cst, corr);
}

/// `out[j * d + i] += corr[j * d + i] + cst[j]` for `g` heads.
pub(super) fn add_rows(out: &mut [f32], d: usize, g: usize, cst: &[f32], corr: &[f32]) {
    for j in 0..g {
        for (o, c) in out[j * d..(j + 1) * d].iter_mut().zip(&corr[j * d..(j + 1) * d]) {
            *o += c + cst[j];
        }
    }
}

/// Scores of all `g` query heads over packed keys, four heads per pass; `wide`: the
/// AVX-512VL build.
///
/// # Safety
/// AVX2, FMA, F16C and BMI2 available, and AVX-512F/VL when `wide`; `d % 8 == 0`;
/// `qs.len() >= g * d`, `scores.len() >= g * T`.
pub(crate) unsafe fn packed_scores(s: StreamView<'_>, qs: &[f32], g: usize, scores: &mut [f32], wide: bool) {
    let mut qt = [[0f32; 4]; MAX_GROUP];
    let mut j0 = 0;
    while j0 < g {
        transpose_q(qs, s.d, g, j0, &mut qt);
        // SAFETY: same contract; each call covers heads j0 .. min(j0 + 4, g).
        unsafe {
            if wide {
                wide::scores(s, qs, &qt, g - j0, j0, scores);
            } else {
                avx2::scores(s, qs, &qt, g - j0, j0, scores);
            }
        }
        j0 += 4;
    }
}

/// `out[j * d ..] = sum_t probs[j * T + t] * v_hat_t` for `g` query heads; `wide`: the
/// AVX-512VL build.
///
/// # Safety
/// AVX2, FMA, F16C and BMI2 available, and AVX-512F/VL when `wide`; `d % 8 == 0`;
/// `out.len() >= g * d`, `probs.len() >= g * T`.
pub(crate) unsafe fn weighted_values(vs: StreamView<'_>, probs: &[f32], g: usize, out: &mut [f32], wide: bool) {
    // SAFETY: per the contract.
    unsafe { if wide { wide::values(vs, probs, g, out) } else { avx2::values(vs, probs, g, out) } }
}

/// The kernels over the packed stream, compiled with the target features `$features`;
/// `$wide`: with 32 vector registers (AVX-512VL), the query vectors stay in registers
/// across the keys and a value tile holds up to 8 vectors of three heads.
macro_rules! fused_kernels {
    ($features:literal, $wide:literal) => {
        use super::*;

        /// Tiles of values hold at most this many vectors per head.
        const MAXV: usize = if $wide { 8 } else { 4 };

        /// Scores of heads `j0 .. j0 + min(left, 4)` (`qt`: [`transpose_q`] of them).
        ///
        /// # Safety
        /// As [`packed_scores`], with this build's features.
        #[target_feature(enable = $features)]
        pub(super) unsafe fn scores(
            s: StreamView<'_>,
            qs: &[f32],
            qt: &[[f32; 4]],
            left: usize,
            j0: usize,
            scores: &mut [f32],
        ) {
            // SAFETY: per the contract; each instance covers its heads.
            unsafe {
                match (left, s.d) {
                    (1, 64) => scores_nh::<1, 8>(s, qs, qt, j0, scores),
                    (2, 64) => scores_nh::<2, 8>(s, qs, qt, j0, scores),
                    (3, 64) => scores_nh::<3, 8>(s, qs, qt, j0, scores),
                    (_, 64) => scores_nh::<4, 8>(s, qs, qt, j0, scores),
                    (1, _) => scores_nh::<1, 0>(s, qs, qt, j0, scores),
                    (2, _) => scores_nh::<2, 0>(s, qs, qt, j0, scores),
                    (3, _) => scores_nh::<3, 0>(s, qs, qt, j0, scores),
                    _ => scores_nh::<4, 0>(s, qs, qt, j0, scores),
                }
            }
        }

        /// Scores of `NH` query heads (`qs` rows `j0..j0 + NH`) over the packed keys
        /// (`NV`: vectors per head, 0 for any `d / 8`).
        ///
        /// # Safety
        /// This build's features available; `d % 8 == 0`; `qs.len() >= (j0 + NH) * d`;
        /// `scores.len() >= g * T` for the caller's `g > j0 + NH - 1`; `qt.len() >= d`.
        #[target_feature(enable = $features)]
        unsafe fn scores_nh<const NH: usize, const NV: usize>(
            s: StreamView<'_>,
            qs: &[f32],
            qt: &[[f32; 4]],
            j0: usize,
            scores: &mut [f32],
        ) {
            let d = s.d;
            let nv = if NV == 0 { d / 8 } else { NV };
            assert!(nv * 8 == d && qt.len() >= d);
            let t_total = s.len;
            let offs = offsets(s.scheme);
            assert!(qs.len() >= (j0 + NH) * d && scores.len() >= (j0 + NH) * t_total && NH <= 4);
            let mut sumq = [0f32; 4];
            for (j, sq) in sumq.iter_mut().enumerate().take(NH) {
                *sq = qs[(j0 + j) * d..(j0 + j + 1) * d].iter().sum();
            }
            // SAFETY: 4 floats.
            let sumq_v = unsafe { _mm_loadu_ps(sumq.as_ptr()) };
            let qp = qs.as_ptr();
            // The wide build holds the query vectors in registers ([head][vector]).
            let hoist = $wide && NV > 0;
            let mut qr = [[_mm256_setzero_ps(); 8]; 4];
            if hoist {
                for (j, row) in qr.iter_mut().enumerate().take(NH) {
                    for (v, x) in row.iter_mut().enumerate().take(NV) {
                        // SAFETY: (j0 + j) * d + 8 v + 8 <= qs.len() (asserted).
                        *x = unsafe { _mm256_loadu_ps(qp.add((j0 + j) * d + 8 * v)) };
                    }
                }
            }
            let q = |j: usize, v: usize| {
                if hoist {
                    qr[j][v]
                } else {
                    // SAFETY: (j0 + j) * d + 8 v + 8 <= qs.len() (asserted; j < NH, v < nv).
                    unsafe { _mm256_loadu_ps(qp.add((j0 + j) * d + 8 * v)) }
                }
            };
            let mut t = 0usize;
            let blocks = s.blocks;
            for (bi, b) in blocks.iter().enumerate() {
                prefetch_block(blocks.get(bi + 1));
                let (cp, mut co, mut oo) = (b.codes.as_ptr(), 0usize, 0usize);
                for m in &b.meta {
                    let (base, sc, cb) = group_consts(m, &offs, d);
                    let mut acc = [_mm256_setzero_ps(); 4];
                    if m.bits == RAW {
                        for v in 0..nv {
                            // SAFETY: a raw group holds 2 * d bytes at `co`.
                            let x = unsafe { raw8(cp.add(co + 16 * v)) };
                            for (j, a) in acc.iter_mut().enumerate().take(NH) {
                                *a = _mm256_fmadd_ps(q(j, v), x, *a);
                            }
                        }
                    } else if m.bits > 0 {
                        let (mask, nb) = (lane_mask(m.bits), m.bits as usize);
                        for v in 0..nv {
                            // SAFETY: a quantized block keeps SLACK (8) bytes after its
                            // codes, so 8 bytes at co + v * nb (v < nv) are readable.
                            let x = unsafe { codes8(cp.add(co + v * nb), mask) };
                            for (j, a) in acc.iter_mut().enumerate().take(NH) {
                                *a = _mm256_fmadd_ps(q(j, v), x, *a);
                            }
                        }
                    }
                    // score_j = base * sum(q_j) + s * (q_j . c), then each outlier's
                    // q_j[i] * (v_i - base) added in turn (four heads per operation).
                    let mut r = _mm_fmadd_ps(_mm_set1_ps(sc), hsum4(acc), _mm_mul_ps(_mm_set1_ps(base), sumq_v));
                    let no = m.n_out as usize;
                    for (&i, &ov) in b.out_idx[oo..oo + no].iter().zip(&b.out_val[oo..oo + no]) {
                        let delta = _mm_set1_ps(h2f_f16c(ov) - base);
                        // SAFETY: `qt[i]` holds 4 floats.
                        r = _mm_add_ps(r, _mm_mul_ps(unsafe { _mm_loadu_ps(qt[i as usize].as_ptr()) }, delta));
                    }
                    let mut out = [0f32; 4];
                    // SAFETY: 4 floats.
                    unsafe { _mm_storeu_ps(out.as_mut_ptr(), r) };
                    for (j, &o) in out.iter().enumerate().take(NH) {
                        scores[(j0 + j) * t_total + t] = o;
                    }
                    co += cb;
                    oo += no;
                    t += 1;
                }
            }
        }

        /// Value accumulation of `NH` heads (`j0..j0 + NH`) over `NV` vectors of the
        /// output starting at vector `v0`, for one block whose first token is `t0`.
        ///
        /// # Safety
        /// This build's features; indices within `out` (`g * d`) and `probs`.
        #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn values_tile<const NH: usize, const NV: usize>(
            b: &Block,
            d: usize,
            probs: &[f32],
            t_total: usize,
            t0: usize,
            j0: usize,
            v0: usize,
            out: &mut [f32],
        ) {
            let op = out.as_mut_ptr();
            let mut acc = [[_mm256_setzero_ps(); NV]; NH];
            for (j, row) in acc.iter_mut().enumerate() {
                for (v, a) in row.iter_mut().enumerate() {
                    // SAFETY: (j0 + j) * d + 8 (v0 + v) + 8 <= g * d by the caller.
                    *a = unsafe { _mm256_loadu_ps(op.add((j0 + j) * d + 8 * (v0 + v))) };
                }
            }
            let (cp, mut co) = (b.codes.as_ptr(), 0usize);
            let pp = probs.as_ptr();
            for (i, m) in b.meta.iter().enumerate() {
                let t = t0 + i;
                let mut w = [_mm256_setzero_ps(); NH];
                let sc = if m.bits == RAW { 1.0 } else { h2f_f16c(m.s) };
                for (j, wj) in w.iter_mut().enumerate() {
                    // SAFETY: (j0 + j) * t_total + t < probs.len() by the caller.
                    *wj = _mm256_set1_ps(unsafe { *pp.add((j0 + j) * t_total + t) } * sc);
                }
                if m.bits == RAW {
                    for v in 0..NV {
                        // SAFETY: a raw group holds 2 * d bytes at `co`; 16 (v0 + v) + 16 <= 2d.
                        let x = unsafe { raw8(cp.add(co + 16 * (v0 + v))) };
                        for j in 0..NH {
                            acc[j][v] = _mm256_fmadd_ps(w[j], x, acc[j][v]);
                        }
                    }
                    co += 2 * d;
                } else if m.bits > 0 {
                    let (mask, nb) = (lane_mask(m.bits), m.bits as usize);
                    for v in 0..NV {
                        // SAFETY: SLACK bytes follow the block's codes (see `scores_nh`).
                        let x = unsafe { codes8(cp.add(co + (v0 + v) * nb), mask) };
                        for j in 0..NH {
                            acc[j][v] = _mm256_fmadd_ps(w[j], x, acc[j][v]);
                        }
                    }
                    co += d * nb / 8;
                }
            }
            for (j, row) in acc.iter().enumerate() {
                for (v, a) in row.iter().enumerate() {
                    // SAFETY: as for the loads above.
                    unsafe { _mm256_storeu_ps(op.add((j0 + j) * d + 8 * (v0 + v)), *a) };
                }
            }
        }

        /// [`weighted_values`] in tiles of up to 3 heads x [`MAXV`] vectors.
        ///
        /// # Safety
        /// As [`weighted_values`], with this build's features.
        #[target_feature(enable = $features)]
        pub(super) unsafe fn values(vs: StreamView<'_>, probs: &[f32], g: usize, out: &mut [f32]) {
            let d = vs.d;
            let nv = d / 8;
            let t_total = vs.len;
            let offs = offsets(vs.scheme);
            assert!(out.len() >= g * d && probs.len() >= g * t_total && d <= MAX_GROUP);
            out[..g * d].fill(0.0);
            // Per-head constant (sum of p * base) and outlier corrections, added at the
            // end: four heads at a time in vectors (g <= 4), else one by one.
            let mut cst = vec![0f32; g];
            let mut corr = vec![0f32; g * d];
            let (mut cst4, mut corr4) = (_mm_setzero_ps(), [[0f32; 4]; MAX_GROUP]);
            let mut t0 = 0usize;
            let blocks = vs.blocks;
            for (bi, b) in blocks.iter().enumerate() {
                prefetch_block(blocks.get(bi + 1));
                if g <= 4 {
                    block_constants4(b, &offs, d, probs, g, t_total, t0, &mut cst4, &mut corr4);
                } else {
                    block_constants(b, &offs, d, probs, g, t_total, t0, &mut cst, &mut corr);
                }
                let mut j0 = 0;
                while j0 < g {
                    let nh = (g - j0).min(3);
                    let mut v0 = 0;
                    while v0 < nv {
                        // Tiles of 8, 4, 3, 2 or 1 vectors (8 only in the wide build).
                        let nvc = match (nv - v0).min(MAXV) {
                            8 => 8,
                            4..=7 => 4,
                            n => n,
                        };
                        // SAFETY: heads j0 .. j0 + nh <= g and vectors v0 .. v0 + nvc <= nv.
                        unsafe {
                            match (nh, nvc) {
                                (3, 8) => values_tile::<3, 8>(b, d, probs, t_total, t0, j0, v0, out),
                                (3, 4) => values_tile::<3, 4>(b, d, probs, t_total, t0, j0, v0, out),
                                (3, 3) => values_tile::<3, 3>(b, d, probs, t_total, t0, j0, v0, out),
                                (3, 2) => values_tile::<3, 2>(b, d, probs, t_total, t0, j0, v0, out),
                                (3, _) => values_tile::<3, 1>(b, d, probs, t_total, t0, j0, v0, out),
                                (2, 8) => values_tile::<2, 8>(b, d, probs, t_total, t0, j0, v0, out),
                                (2, 4) => values_tile::<2, 4>(b, d, probs, t_total, t0, j0, v0, out),
                                (2, 3) => values_tile::<2, 3>(b, d, probs, t_total, t0, j0, v0, out),
                                (2, 2) => values_tile::<2, 2>(b, d, probs, t_total, t0, j0, v0, out),
                                (2, _) => values_tile::<2, 1>(b, d, probs, t_total, t0, j0, v0, out),
                                (_, 8) => values_tile::<1, 8>(b, d, probs, t_total, t0, j0, v0, out),
                                (_, 4) => values_tile::<1, 4>(b, d, probs, t_total, t0, j0, v0, out),
                                (_, 3) => values_tile::<1, 3>(b, d, probs, t_total, t0, j0, v0, out),
                                (_, 2) => values_tile::<1, 2>(b, d, probs, t_total, t0, j0, v0, out),
                                (_, _) => values_tile::<1, 1>(b, d, probs, t_total, t0, j0, v0, out),
                            }
                        }
                        v0 += nvc;
                    }
                    j0 += nh;
                }
                t0 += b.len();
            }
            add_constants(out, d, g, cst4, &corr4, &mut cst, &mut corr);
        }
    };
}

/// The AVX2 build (16 vector registers).
mod avx2 {
    fused_kernels!("avx2,fma,f16c,bmi2", false);
}

/// The AVX-512VL build (32 vector registers, the same 8-lane operations).
mod wide {
    fused_kernels!("avx2,fma,f16c,bmi2,avx512f,avx512vl", true);
}

#[cfg(test)]
#[path = "attention_tests.rs"]
mod tests;
