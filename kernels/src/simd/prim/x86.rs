//! x86-64 helpers shared by the kernels ([`lane_mask`], the 8-lane horizontal sum
//! [`hsum`], the F16C conversion [`h2f_f16c`]) and the AVX2 versions of the primitives
//! of [`super`]. Every function
//! requires CPU features its caller has detected.

use std::arch::x86_64::*;

/// f16 -> f32 of one value with F16C: [`crate::base::h2f`] (the portable conversion,
/// bit for bit the same) as one instruction, for kernels compiled with F16C; in the
/// fused attention's per-group and per-outlier conversions the portable one costs 4-8%
/// of a decode step.
#[inline]
#[target_feature(enable = "avx2,f16c")]
pub(crate) fn h2f_f16c(h: half::f16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h.to_bits() as i32)))
}

/// Byte mask with the low `bits` bits of every byte set (for pdep/pext).
#[inline(always)]
pub(crate) fn lane_mask(bits: u8) -> u64 {
    0x0101_0101_0101_0101u64.wrapping_mul((1u64 << bits) - 1)
}

/// The horizontal sum of 8 lanes in the fixed tree of [`crate::simd::scalar::hsum8`]: lanes
/// `(i, i + 4)`, then `(i, i + 2)`, then `(0, 1)`.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) fn hsum(v: __m256) -> f32 {
    let lo = _mm256_castps256_ps128(v);
    let hi = _mm256_extractf128_ps::<1>(v);
    let s = _mm_add_ps(lo, hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
    _mm_cvtss_f32(s)
}

/// # Safety
/// AVX2 and FMA must be available; `a.len() == b.len()`, a multiple of 8.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc0 = _mm256_setzero_ps();
    let mut acc1 = _mm256_setzero_ps();
    let mut i = 0;
    // SAFETY: all offsets are < n, which bounds both slices.
    unsafe {
        while i + 16 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 8)), _mm256_loadu_ps(pb.add(i + 8)), acc1);
            i += 16;
        }
        while i + 8 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
            i += 8;
        }
    }
    hsum(_mm256_add_ps(acc0, acc1))
}

/// # Safety
/// AVX2 and FMA must be available; equal lengths, a multiple of 8.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn axpy(acc: &mut [f32], w: f32, x: &[f32]) {
    let n = acc.len().min(x.len());
    let wv = _mm256_set1_ps(w);
    let (pa, px) = (acc.as_mut_ptr(), x.as_ptr());
    let mut i = 0;
    // SAFETY: offsets < n.
    unsafe {
        while i + 8 <= n {
            let a = _mm256_loadu_ps(pa.add(i));
            _mm256_storeu_ps(pa.add(i), _mm256_fmadd_ps(wv, _mm256_loadu_ps(px.add(i)), a));
            i += 8;
        }
    }
}

/// [`crate::simd::scalar::exp`] of 8 lanes, the same operations in the same order.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) fn exp8(x: __m256) -> __m256 {
    use crate::simd::scalar::exp_consts::*;
    // `max` then `min` as `f32::clamp`: finite inputs only matter (a NaN input's
    // result is not used by the callers).
    let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(LO)), _mm256_set1_ps(HI));
    let n =
        _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(x, _mm256_set1_ps(LOG2E)));
    let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_HI), x);
    let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_LO), r);
    let mut p = _mm256_set1_ps(P[0]);
    for c in &P[1..] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
    }
    let y = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0)));
    let scale = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
    _mm256_mul_ps(y, _mm256_castsi256_ps(scale))
}

/// [`crate::simd::scalar::silu_mul`], 8 values at a time (the tail by the reference,
/// which agrees bit for bit).
///
/// # Safety
/// AVX2 and FMA must be available.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn silu_mul(gate: &mut [f32], up: &[f32]) {
    let n = gate.len().min(up.len());
    let (pg, pu) = (gate.as_mut_ptr(), up.as_ptr());
    let (one, neg) = (_mm256_set1_ps(1.0), _mm256_set1_ps(-0.0));
    let mut i = 0;
    // SAFETY: offsets < n, which bounds both slices.
    unsafe {
        while i + 8 <= n {
            let g = _mm256_loadu_ps(pg.add(i));
            let e = exp8(_mm256_xor_ps(g, neg));
            let s = _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), _mm256_loadu_ps(pu.add(i)));
            _mm256_storeu_ps(pg.add(i), s);
            i += 8;
        }
    }
    crate::simd::scalar::silu_mul(&mut gate[i..n], &up[i..n]);
}

/// # Safety
/// AVX2 and F16C available; `src.len() >= 2 * out.len()`, `out.len() % 8 == 0`.
#[target_feature(enable = "avx2,f16c")]
pub(crate) unsafe fn f16_bytes_to_f32(src: &[u8], out: &mut [f32]) {
    let n = out.len();
    let mut i = 0;
    // SAFETY: reads 16 bytes at 2*i < src.len(); writes 8 floats at i < n.
    unsafe {
        while i + 8 <= n {
            let h = _mm_loadu_si128(src.as_ptr().add(2 * i) as *const __m128i);
            _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
            i += 8;
        }
    }
}

/// # Safety
/// AVX2 and BMI2 available; `out.len() % 8 == 0`;
/// `src.len() >= out.len() / 8 * bits + 8`.
#[target_feature(enable = "avx2,bmi2")]
pub(crate) unsafe fn unpack_f32(src: &[u8], bits: u8, out: &mut [f32]) {
    let mask = lane_mask(bits);
    let step = bits as usize;
    let mut off = 0;
    for chunk in out.chunks_exact_mut(8) {
        // SAFETY: off + 8 <= src.len() by the caller contract.
        let word = unsafe { (src.as_ptr().add(off) as *const u64).read_unaligned() };
        let bytes = _pdep_u64(u64::from_le(word), mask);
        let v = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(bytes as i64)));
        // SAFETY: chunk has exactly 8 floats.
        unsafe { _mm256_storeu_ps(chunk.as_mut_ptr(), v) };
        off += step;
    }
}

/// # Safety
/// BMI2 available; `codes.len() % 8 == 0`.
#[target_feature(enable = "bmi2")]
pub(crate) unsafe fn pack_append(codes: &[u8], bits: u8, dst: &mut Vec<u8>) {
    let mask = lane_mask(bits);
    let nb = bits as usize;
    dst.reserve(codes.len() / 8 * nb);
    for c in codes.chunks_exact(8) {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        let packed = _pext_u64(u64::from_le_bytes(w), mask).to_le_bytes();
        let len = dst.len();
        dst.extend_from_slice(&packed);
        dst.truncate(len + nb);
    }
}
