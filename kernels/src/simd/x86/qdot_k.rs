//! x86-64 (AVX2) kernels of the quantized matmul for the k-quants (`Q2_K` .. `Q6_K`),
//! used at the AVX2 and AVX-512 levels alike.
//!
//! Each call computes `R` outputs (one weight row against `R` activation rows), sharing
//! the unpacking of every super-block. A super-block's integer sums (codes times
//! activations times sub-block scales, `maddubs` then `madd` with the scales; mins times
//! activation sums) are exact, and enter the float accumulator through
//! `simd::qref::k_accumulate`: every output equals `simd::qref::dot_k` bit for bit.

use super::qdot::hsum_i32;
use crate::simd::ggml::{QFormat, QK_K, k_scale_min, q3k_scale};
use crate::simd::qref::{InRow, k_accumulate, k_scales};
use std::arch::x86_64::*;

/// Format codes of the const parameter `F`.
pub(crate) const Q2_K: u8 = 0;
pub(crate) const Q3_K: u8 = 1;
pub(crate) const Q4_K: u8 = 2;
pub(crate) const Q5_K: u8 = 3;
pub(crate) const Q6_K: u8 = 4;

/// The const code of a k-quant.
pub(crate) fn code(f: QFormat) -> u8 {
    match f {
        QFormat::Q2_K => Q2_K,
        QFormat::Q3_K => Q3_K,
        QFormat::Q4_K => Q4_K,
        QFormat::Q5_K => Q5_K,
        QFormat::Q6_K => Q6_K,
        _ => unreachable!("not a k-quant: {f}"),
    }
}

/// The format of a const code.
const fn format(f: u8) -> QFormat {
    match f {
        Q2_K => QFormat::Q2_K,
        Q3_K => QFormat::Q3_K,
        Q4_K => QFormat::Q4_K,
        Q5_K => QFormat::Q5_K,
        _ => QFormat::Q6_K,
    }
}

/// `acc + madd(maddubs(q, x), scales)`: 32 unsigned codes times 32 activations, each
/// pair sum times its 16-bit scale.
///
/// # Safety
/// AVX2; 32 readable bytes at `x`.
#[inline(always)]
unsafe fn mac(acc: __m256i, q: __m256i, x: *const i8, scales: __m256i) -> __m256i {
    // SAFETY: the caller's contract. Codes are at most 63, activations at most 127 in
    // magnitude: pair sums fit i16, scaled pair sums fit i32.
    unsafe {
        let p = _mm256_maddubs_epi16(q, _mm256_loadu_si256(x as *const __m256i));
        _mm256_add_epi32(acc, _mm256_madd_epi16(p, scales))
    }
}

/// 16-bit scales: `a` for the first 16 values of 32, `b` for the last 16.
#[inline(always)]
unsafe fn two_scales(a: i32, b: i32) -> __m256i {
    // SAFETY: AVX2 (the caller's).
    unsafe { _mm256_set_m128i(_mm_set1_epi16(b as i16), _mm_set1_epi16(a as i16)) }
}

/// Bits `shift..` of every byte of `v`, masked by `mask`.
#[inline(always)]
unsafe fn bits(v: __m256i, shift: i32, mask: i8) -> __m256i {
    // SAFETY: AVX2 (the caller's). A 16-bit shift moves bits across the two bytes of a
    // lane only into positions the mask clears.
    unsafe { _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(shift)), _mm256_set1_epi8(mask)) }
}

/// 32 bytes of `b` from `o` (bounds-checked).
///
/// # Safety
/// AVX (the callers').
#[inline(always)]
unsafe fn load32(b: &[u8], o: usize) -> __m256i {
    // SAFETY: the slice bounds are checked.
    unsafe { _mm256_loadu_si256(b[o..o + 32].as_ptr() as *const __m256i) }
}

/// The 256 codes of the super-block `blk` of format `F` as unsigned bytes in value
/// order (`Q6_K`: `q + 32`, `Q3_K`: `q + 4`), 32 per vector.
///
/// # Safety
/// AVX2; `blk` is a whole block of format `F`.
#[inline(always)]
pub(crate) unsafe fn unpack_k<const F: u8>(blk: &[u8]) -> [__m256i; 8] {
    // SAFETY: every load reads within `blk` (offsets per layout).
    unsafe {
        let mut out = [_mm256_setzero_si256(); 8];
        match F {
            Q4_K | Q5_K => {
                let five = F == Q5_K;
                let hb = if five { load32(blk, 16) } else { _mm256_setzero_si256() };
                for c in 0..4 {
                    let q = load32(blk, if five { 48 } else { 16 } + 32 * c);
                    let mut lo = _mm256_and_si256(q, _mm256_set1_epi8(0x0F));
                    let mut hi = bits(q, 4, 0x0F);
                    if five {
                        lo = _mm256_or_si256(lo, _mm256_slli_epi16::<4>(bits(hb, 2 * c as i32, 1)));
                        hi = _mm256_or_si256(hi, _mm256_slli_epi16::<4>(bits(hb, 2 * c as i32 + 1, 1)));
                    }
                    (out[2 * c], out[2 * c + 1]) = (lo, hi);
                }
            }
            Q6_K => {
                for h in 0..2 {
                    let (a, b2, hv) = (load32(blk, 64 * h), load32(blk, 64 * h + 32), load32(blk, 128 + 32 * h));
                    for k in 0..4 {
                        let src = if k % 2 == 0 { a } else { b2 };
                        let nib =
                            if k < 2 { _mm256_and_si256(src, _mm256_set1_epi8(0x0F)) } else { bits(src, 4, 0x0F) };
                        out[4 * h + k] = _mm256_or_si256(nib, _mm256_slli_epi16::<4>(bits(hv, 2 * k as i32, 3)));
                    }
                }
            }
            Q2_K => {
                for h in 0..2 {
                    let qv = load32(blk, 16 + 32 * h);
                    for k in 0..4 {
                        out[4 * h + k] = bits(qv, 2 * k as i32, 3);
                    }
                }
            }
            _ => {
                let hm = load32(blk, 0);
                for h in 0..2 {
                    let qv = load32(blk, 32 + 32 * h);
                    for k in 0..4 {
                        let high = _mm256_slli_epi16::<2>(bits(hm, (4 * h + k) as i32, 1));
                        out[4 * h + k] = _mm256_or_si256(bits(qv, 2 * k as i32, 3), high);
                    }
                }
            }
        }
        out
    }
}

/// The integer sums `(isum, msum)` of one super-block `blk` with `R` activation rows'
/// super-block `b` (as `simd::qref::ints_k`).
///
/// # Safety
/// AVX2; `blk` is a whole block of format `F`; every row holds super-block `b`.
#[inline(always)]
unsafe fn sums<const F: u8, const R: usize>(blk: &[u8], xs: &[InRow<'_>; R], b: usize) -> ([i32; R], [i32; R]) {
    let x: [*const i8; R] = std::array::from_fn(|r| xs[r].qs[b * QK_K..][..QK_K].as_ptr());
    let bs: [&[i32]; R] = std::array::from_fn(|r| &xs[r].sums[b * 16..][..16]);
    let mut msum = [0i32; R];
    let mut isum_off = [0i32; R];
    // SAFETY: every load reads within `blk` or a row's 256 codes (offsets per layout).
    unsafe {
        let mut acc = [_mm256_setzero_si256(); R];
        match F {
            Q4_K | Q5_K => {
                let five = F == Q5_K;
                let mut sc = [0i32; 8];
                for (j, s) in sc.iter_mut().enumerate() {
                    let (s6, m6) = k_scale_min(&blk[4..16], j);
                    *s = s6 as i32;
                    for r in 0..R {
                        msum[r] += m6 as i32 * (bs[r][2 * j] + bs[r][2 * j + 1]);
                    }
                }
                let qs = blk[if five { 48 } else { 16 }..].as_ptr();
                let hb = if five {
                    _mm256_loadu_si256(blk[16..48].as_ptr() as *const __m256i)
                } else {
                    _mm256_setzero_si256()
                };
                for c in 0..4 {
                    let q = _mm256_loadu_si256(qs.add(32 * c) as *const __m256i);
                    let mut lo = _mm256_and_si256(q, _mm256_set1_epi8(0x0F));
                    let mut hi = bits(q, 4, 0x0F);
                    if five {
                        lo = _mm256_or_si256(lo, _mm256_slli_epi16::<4>(bits(hb, 2 * c as i32, 1)));
                        hi = _mm256_or_si256(hi, _mm256_slli_epi16::<4>(bits(hb, 2 * c as i32 + 1, 1)));
                    }
                    let (s0, s1) = (_mm256_set1_epi16(sc[2 * c] as i16), _mm256_set1_epi16(sc[2 * c + 1] as i16));
                    for r in 0..R {
                        acc[r] = mac(acc[r], lo, x[r].add(64 * c), s0);
                        acc[r] = mac(acc[r], hi, x[r].add(64 * c + 32), s1);
                    }
                }
            }
            Q6_K => {
                let sc: [i32; 16] = std::array::from_fn(|j| blk[192 + j] as i8 as i32);
                for r in 0..R {
                    isum_off[r] = 32 * (0..16).map(|j| sc[j] * bs[r][j]).sum::<i32>();
                }
                for h in 0..2 {
                    let a = _mm256_loadu_si256(blk[64 * h..].as_ptr() as *const __m256i);
                    let b2 = _mm256_loadu_si256(blk[64 * h + 32..].as_ptr() as *const __m256i);
                    let hv = _mm256_loadu_si256(blk[128 + 32 * h..].as_ptr() as *const __m256i);
                    for k in 0..4 {
                        let src = if k % 2 == 0 { a } else { b2 };
                        let nib =
                            if k < 2 { _mm256_and_si256(src, _mm256_set1_epi8(0x0F)) } else { bits(src, 4, 0x0F) };
                        let q = _mm256_or_si256(nib, _mm256_slli_epi16::<4>(bits(hv, 2 * k as i32, 3)));
                        let s = two_scales(sc[8 * h + 2 * k], sc[8 * h + 2 * k + 1]);
                        for r in 0..R {
                            acc[r] = mac(acc[r], q, x[r].add(128 * h + 32 * k), s);
                        }
                    }
                }
            }
            Q2_K => {
                let sb = &blk[..16];
                for r in 0..R {
                    msum[r] = (0..16).map(|j| (sb[j] >> 4) as i32 * bs[r][j]).sum();
                }
                for h in 0..2 {
                    let qv = _mm256_loadu_si256(blk[16 + 32 * h..].as_ptr() as *const __m256i);
                    for k in 0..4 {
                        let q = bits(qv, 2 * k as i32, 3);
                        let j = 8 * h + 2 * k;
                        let s = two_scales((sb[j] & 0xF) as i32, (sb[j + 1] & 0xF) as i32);
                        for r in 0..R {
                            acc[r] = mac(acc[r], q, x[r].add(128 * h + 32 * k), s);
                        }
                    }
                }
            }
            _ => {
                let sc: [i32; 16] = std::array::from_fn(|j| q3k_scale(&blk[96..108], j));
                for r in 0..R {
                    isum_off[r] = 4 * (0..16).map(|j| sc[j] * bs[r][j]).sum::<i32>();
                }
                let hm = _mm256_loadu_si256(blk.as_ptr() as *const __m256i);
                for h in 0..2 {
                    let qv = _mm256_loadu_si256(blk[32 + 32 * h..].as_ptr() as *const __m256i);
                    for k in 0..4 {
                        let high = _mm256_slli_epi16::<2>(bits(hm, (4 * h + k) as i32, 1));
                        let q = _mm256_or_si256(bits(qv, 2 * k as i32, 3), high);
                        let s = two_scales(sc[8 * h + 2 * k], sc[8 * h + 2 * k + 1]);
                        for r in 0..R {
                            acc[r] = mac(acc[r], q, x[r].add(128 * h + 32 * k), s);
                        }
                    }
                }
            }
        }
        let mut isum = [0i32; R];
        for r in 0..R {
            isum[r] = hsum_i32(acc[r]) - isum_off[r];
        }
        (isum, msum)
    }
}

/// `R` dot products of one k-quant weight row `w` with `R` activation rows.
///
/// # Safety
/// AVX2, FMA and F16C; `w` holds whole blocks of format `F`, every row as many
/// super-blocks.
#[inline(always)]
unsafe fn row<const F: u8, const R: usize>(w: &[u8], xs: &[InRow<'_>; R]) -> [f32; R] {
    let f = format(F);
    let mut acc = [0f32; R];
    for (b, blk) in w.chunks_exact(f.block_bytes()).enumerate() {
        // SAFETY: `blk` is a whole block and the rows hold super-block `b` (the
        // contract).
        let (isum, msum) = unsafe { sums::<F, R>(blk, xs, b) };
        let (d, dmin) = k_scales(f, blk);
        for r in 0..R {
            acc[r] = k_accumulate(f, acc[r], d, dmin, xs[r].d[b], isum[r], msum[r]);
        }
    }
    acc
}

/// Dot products of `n` k-quant weight rows (consecutive in `w`) with `R` activation
/// rows: `res[j * R + r]` = row `j` times row `r`.
///
/// # Safety
/// The CPU supports AVX2, FMA and F16C. (Bounds are checked.)
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn task_k<const F: u8, const R: usize>(w: &[u8], n: usize, xs: &[InRow<'_>; R], res: &mut [f32]) {
    let rb = w.len() / n.max(1);
    let nsb = rb / format(F).block_bytes();
    assert!(rb.is_multiple_of(format(F).block_bytes()) && res.len() >= n * R);
    assert!(xs.iter().all(|x| x.qs.len() >= nsb * QK_K && x.d.len() >= nsb && x.sums.len() >= 16 * nsb));
    for j in 0..n {
        // SAFETY: the features are enabled here; whole blocks and rows that hold as
        // many super-blocks (checked above).
        let v = unsafe { row::<F, R>(&w[j * rb..][..rb], xs) };
        res[j * R..][..R].copy_from_slice(&v);
    }
}
