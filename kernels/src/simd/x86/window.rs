//! AVX-512 window pass (x86-64 only): eight tokens at a time, the update of QAQ's
//! attention windows after a decode row and, when the step ends with a
//! re-quantization, the comparison of every token's width targets with its widths
//! (see [`crate::simd::window_pass`] for the contract, and `cache::requant` for the
//! scalar pass it reproduces decision for decision).
//!
//! Per chunk of eight tokens: the observation (the maximum over the query heads'
//! probability rows), the push into the slot-major rings (masked stores of the slot each
//! token writes), the window maximum (over the slots in order), the counts; then the
//! group metadata of the eight key and value groups, gathered from the blocks' 6-byte
//! records with one byte permutation, their ranges `s * 2^bits`, and the widths
//! `ceil(log2(x))` from the exponent of `x` (computed as the scalar pass computes it, in
//! f64) wherever its fraction is clear of a power of two; the other lanes are left to
//! the caller ([`UNDECIDED`]).

use crate::base::{Block, GroupMeta, RAW};
use crate::simd::rule::{Observed, UNDECIDED, WidthRule};
use std::arch::x86_64::*;

/// The byte permutation that gathers, from eight consecutive [`GroupMeta`] records, the
/// eight `s` (f16, bytes 0..16) and the eight widths (bytes 16..24).
fn meta_index() -> __m512i {
    let (sz, off_s, off_b) =
        (size_of::<GroupMeta>(), std::mem::offset_of!(GroupMeta, s), std::mem::offset_of!(GroupMeta, bits));
    let mut idx = [0u8; 64];
    for l in 0..8 {
        idx[2 * l] = (l * sz + off_s) as u8;
        idx[2 * l + 1] = (l * sz + off_s + 1) as u8;
        idx[16 + l] = (l * sz + off_b) as u8;
    }
    // SAFETY: 64 bytes; SSE2/AVX-512F loads of an array.
    unsafe { _mm512_loadu_si512(idx.as_ptr() as *const _) }
}

/// The ranges `s * 2^bits` (0 for raw groups) and widths of the `n` (<= 8) groups of
/// `b` from `i` on.
///
/// # Safety
/// This module's features; `i + n <= b.meta.len()`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,bmi2,avx512f,avx512bw,avx512vl,avx512vbmi")]
unsafe fn ranges(b: &Block, i: usize, n: usize, idx: __m512i) -> (__m256, __m256i) {
    let sz = size_of::<GroupMeta>();
    debug_assert!(i + n <= b.meta.len() && n <= 8 && 8 * sz <= 64);
    let bytes: u64 = if n * sz >= 64 { u64::MAX } else { (1u64 << (n * sz)) - 1 };
    // SAFETY: the masked load reads only the `n` records at `i` (in bounds: the caller).
    let raw = unsafe { _mm512_maskz_loadu_epi8(bytes, b.meta.as_ptr().add(i) as *const i8) };
    let g = _mm512_permutexvar_epi8(idx, raw);
    let s = _mm256_cvtph_ps(_mm512_castsi512_si128(g));
    let bits = _mm256_cvtepu8_epi32(_mm512_extracti32x4_epi32::<1>(g));
    let pow = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(bits, _mm256_set1_epi32(127))));
    let raw_g = _mm256_cmpeq_epi32_mask(bits, _mm256_set1_epi32(RAW as i32));
    (_mm256_maskz_mov_ps(!raw_g, _mm256_mul_ps(s, pow)), bits)
}

/// `bits_near` (`crate::policy::bits_near`) of eight products `x`: the clamped widths,
/// and the lanes where they are certain.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,bmi2,avx512f,avx512bw,avx512vl,avx512vbmi")]
fn bits_near(x: __m512d, rule: &WidthRule) -> (__m256i, __mmask8) {
    let z = if rule.reference { _mm512_add_pd(_mm512_mul_pd(x, _mm512_set1_pd(0.5)), _mm512_set1_pd(1.0)) } else { x };
    let zb = _mm512_castpd_si512(z);
    let e = _mm512_and_si512(_mm512_srli_epi64::<52>(zb), _mm512_set1_epi64(0x7ff));
    // A positive normal number: sign clear, exponent field in 1..=2046.
    let pos_normal = _mm512_cmpeq_epi64_mask(_mm512_srli_epi64::<63>(zb), _mm512_setzero_si512())
        & _mm512_cmpneq_epi64_mask(e, _mm512_setzero_si512())
        & _mm512_cmpneq_epi64_mask(e, _mm512_set1_epi64(0x7ff));
    let mant =
        _mm512_or_si512(_mm512_and_si512(zb, _mm512_set1_epi64((1i64 << 52) - 1)), _mm512_set1_epi64(1023i64 << 52));
    let f = _mm512_sub_pd(_mm512_castsi512_pd(mant), _mm512_set1_pd(1.0));
    let clear = _mm512_cmp_pd_mask::<_CMP_GT_OQ>(f, _mm512_set1_pd(2e-12))
        & _mm512_cmp_pd_mask::<_CMP_LT_OQ>(f, _mm512_set1_pd(1.0 - 2e-12));
    let w = _mm512_cvtepi64_epi32(_mm512_sub_epi64(e, _mm512_set1_epi64(1022)));
    let w = _mm256_min_epi32(
        _mm256_max_epi32(w, _mm256_set1_epi32(rule.b_min as i32)),
        _mm256_set1_epi32(rule.b_max as i32),
    );
    (w, pos_normal & clear)
}

/// Appends `(t0 + lane, width)` for every lane of `emit` (widths of lanes not in `sure`:
/// [`UNDECIDED`]).
#[inline]
fn emit(out: &mut Vec<(u32, u8)>, t0: usize, emit: __mmask8, sure: __mmask8, want: &[i32; 8]) {
    let mut m = emit;
    while m != 0 {
        let l = m.trailing_zeros() as usize;
        out.push(((t0 + l) as u32, if sure & (1 << l) != 0 { want[l] as u8 } else { UNDECIDED }));
        m &= m - 1;
    }
}

/// The window pass (see [`crate::simd::window_pass`]).
///
/// # Safety
/// AVX2, FMA, F16C, BMI2 and AVX-512 F/BW/VL/VBMI available; `k` and `v` hold the same
/// number of groups in blocks of the same lengths, `rows`, `seen` and `pos` one entry per
/// token (at least as many as the groups), the observation one value (row) per token.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c,bmi2,avx512f,avx512bw,avx512vl,avx512vbmi")]
pub(crate) unsafe fn window_pass(
    obs: Observed<'_>,
    rows: &mut [Vec<f32>],
    seen: &mut [u32],
    pos: &mut [u32],
    k: &[Block],
    v: &[Block],
    rule: Option<&WidthRule>,
    kout: &mut Vec<(u32, u8)>,
    vout: &mut Vec<(u32, u8)>,
) {
    let n = rows.len();
    let t_total: usize = v.iter().map(Block::len).sum();
    assert!(seen.len() >= t_total && pos.len() >= t_total && rows.iter().all(|r| r.len() >= t_total));
    match obs {
        Observed::Probs(p, g) => assert!(p.len() >= g * t_total),
        Observed::Values(w) => assert!(w.len() >= t_total),
    }
    let idx = meta_index();
    let (one, nv) = (_mm256_set1_epi32(1), _mm256_set1_epi32(n as i32));
    let mut t0 = 0usize;
    for (bi, (kb, vb)) in k.iter().zip(v).enumerate() {
        assert_eq!(kb.len(), vb.len());
        // Blocks are separate allocations: fetch the next ones' metadata ahead.
        if rule.is_some() {
            for b in [k.get(bi + 1), v.get(bi + 1)].into_iter().flatten() {
                let p = b.meta.as_ptr() as *const i8;
                for off in (0..size_of_val(b.meta.as_slice())).step_by(64) {
                    // Prefetching never faults.
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(off));
                }
            }
        }
        let mut i = 0;
        while i < vb.len() {
            let c = (vb.len() - i).min(8);
            let m8: __mmask8 = if c == 8 { 0xff } else { (1u8 << c) - 1 };
            let t = t0 + i;
            // SAFETY (every masked load and store below): the lanes of `m8` are tokens
            // t .. t + c < t_total, within every per-token slice (asserted above).
            let mx = match obs {
                Observed::Probs(p, g) => {
                    let mut acc = _mm256_setzero_ps();
                    for j in 0..g {
                        acc = _mm256_max_ps(unsafe { _mm256_maskz_loadu_ps(m8, p.as_ptr().add(j * t_total + t)) }, acc);
                    }
                    acc
                }
                Observed::Values(w) => unsafe { _mm256_maskz_loadu_ps(m8, w.as_ptr().add(t)) },
            };
            // SAFETY: as above.
            let posv = unsafe { _mm256_maskz_loadu_epi32(m8, pos.as_ptr().add(t) as *const i32) };
            let mut wmax = _mm256_setzero_ps();
            for (s, row) in rows.iter_mut().enumerate() {
                let rp = row.as_mut_ptr().wrapping_add(t);
                // SAFETY: as above.
                let mut r = unsafe { _mm256_maskz_loadu_ps(m8, rp) };
                let hit = _mm256_mask_cmpeq_epi32_mask(m8, posv, _mm256_set1_epi32(s as i32));
                r = _mm256_mask_mov_ps(r, hit, mx);
                // SAFETY: as above.
                unsafe { _mm256_mask_storeu_ps(rp, hit, r) };
                wmax = _mm256_max_ps(r, wmax);
            }
            // SAFETY: as above.
            let seenv = unsafe { _mm256_maskz_loadu_epi32(m8, seen.as_ptr().add(t) as *const i32) };
            let live = _mm256_mask_cmpneq_epi32_mask(m8, seenv, _mm256_set1_epi32(-1));
            let seen2 = _mm256_mask_add_epi32(seenv, live, seenv, one);
            let next = _mm256_add_epi32(posv, one);
            let next = _mm256_mask_mov_epi32(next, _mm256_cmpeq_epi32_mask(next, nv), _mm256_setzero_si256());
            let pos2 = _mm256_mask_mov_epi32(posv, live, next);
            // SAFETY: as above.
            unsafe {
                _mm256_mask_storeu_epi32(seen.as_mut_ptr().add(t) as *mut i32, m8, seen2);
                _mm256_mask_storeu_epi32(pos.as_mut_ptr().add(t) as *mut i32, m8, pos2);
            }
            if let Some(rule) = rule {
                let full = _mm256_mask_cmpge_epu32_mask(m8, seen2, nv);
                // Lanes of tokens below `sinks`.
                let sink = if t >= rule.sinks { 0 } else { (((1u32 << (rule.sinks - t).min(8)) - 1) as u8) & m8 };
                let bmax = _mm256_set1_epi32(rule.b_max as i32);
                let mut want = [0i32; 8];
                // Keys: b_max for sinks (and tokens without a full window with
                // `k_window`), else the bound's width (none yet: the current width).
                // SAFETY: groups i .. i + c of the block.
                let (kr, kbits) = unsafe { ranges(kb, i, c, idx) };
                let forced = sink | if rule.k_window { m8 & !full } else { 0 };
                let (w, sure) = match rule.inv_ek {
                    Some(inv) => bits_near(_mm512_mul_pd(_mm512_cvtps_pd(kr), _mm512_set1_pd(inv)), rule),
                    None => (kbits, 0xff),
                };
                let w = _mm256_mask_mov_epi32(w, forced, bmax);
                let sure = sure | forced;
                let differ = _mm256_mask_cmpneq_epi32_mask(m8, w, kbits);
                // SAFETY: 8 i32.
                unsafe { _mm256_storeu_si256(want.as_mut_ptr() as *mut __m256i, w) };
                emit(kout, t, (differ | !sure) & m8, sure, &want);
                // Values: b_max for sinks and tokens without a full window, else the
                // V-bound's width at the window's maximum.
                // SAFETY: groups i .. i + c of the block.
                let (vr, vbits) = unsafe { ranges(vb, i, c, idx) };
                let x = _mm512_mul_pd(
                    _mm512_mul_pd(_mm512_cvtps_pd(vr), _mm512_cvtps_pd(wmax)),
                    _mm512_set1_pd(rule.inv_vnum),
                );
                let (w, sure) = bits_near(x, rule);
                let forced = sink | (m8 & !full);
                let w = _mm256_mask_mov_epi32(w, forced, bmax);
                let sure = sure | forced;
                let differ = _mm256_mask_cmpneq_epi32_mask(m8, w, vbits);
                // SAFETY: 8 i32.
                unsafe { _mm256_storeu_si256(want.as_mut_ptr() as *mut __m256i, w) };
                emit(vout, t, (differ | !sure) & m8, sure, &want);
            }
            i += c;
        }
        t0 += vb.len();
    }
}
