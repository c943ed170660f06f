//! Inner loops with run-time SIMD selection.
//!
//! Every function has a portable scalar version (module [`scalar`]), which is the
//! reference, and an x86-64 AVX2/FMA/F16C/BMI2 version chosen at run time with
//! `is_x86_feature_detected!`. Code bytes are bit-packed LSB-first: code `i` of a group
//! of width `b` occupies bits `[i*b, (i+1)*b)` of the group's little-endian bit string,
//! so 8 codes always fill exactly `b` bytes.

use std::sync::OnceLock;

/// Whether the fast x86 path (AVX2 + FMA + F16C + BMI2) is usable on this CPU.
pub fn fast_path() -> bool {
    static FAST: OnceLock<bool> = OnceLock::new();
    *FAST.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> bool {
    std::env::var_os("QAQ_KERNELS_SCALAR").is_none()
        && is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
        && is_x86_feature_detected!("bmi2")
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> bool {
    false
}

/// Byte mask with the low `bits` bits of every byte set (for pdep/pext).
#[inline]
fn lane_mask(bits: u8) -> u64 {
    0x0101_0101_0101_0101u64.wrapping_mul((1u64 << bits) - 1)
}

/// Branch-light f16 -> f32 conversion (exact for every f16, NaN/Inf included), cheaper
/// than a per-call feature check in the hot loops.
#[inline(always)]
pub fn h2f(h: half::f16) -> f32 {
    let h = h.to_bits() as u32;
    let magic = f32::from_bits(113 << 23);
    let shifted_exp = 0x7c00u32 << 13;
    let mut o = (h & 0x7fff) << 13;
    let exp = shifted_exp & o;
    o += (127 - 15) << 23;
    if exp == shifted_exp {
        o += (128 - 16) << 23;
    } else if exp == 0 {
        o += 1 << 23;
        o = (f32::from_bits(o) - magic).to_bits();
    }
    f32::from_bits(o | ((h & 0x8000) << 16))
}

/// Dot product of two equal-length f32 slices.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    if fast_path() && a.len().is_multiple_of(8) {
        // SAFETY: the required CPU features were detected at run time.
        return unsafe { x86::dot(a, b) };
    }
    scalar::dot(a, b)
}

/// `acc += w * x`.
#[inline]
pub fn axpy(acc: &mut [f32], w: f32, x: &[f32]) {
    debug_assert_eq!(acc.len(), x.len());
    #[cfg(target_arch = "x86_64")]
    if fast_path() && acc.len().is_multiple_of(8) {
        // SAFETY: the required CPU features were detected at run time.
        unsafe { x86::axpy(acc, w, x) };
        return;
    }
    scalar::axpy(acc, w, x)
}

/// Converts little-endian f16 bytes (`2 * out.len()` of them) to f32.
#[inline]
pub fn f16_bytes_to_f32(src: &[u8], out: &mut [f32]) {
    debug_assert!(src.len() >= 2 * out.len());
    #[cfg(target_arch = "x86_64")]
    if fast_path() && out.len().is_multiple_of(8) {
        // SAFETY: features detected; lengths checked by the caller contract above.
        unsafe { x86::f16_bytes_to_f32(src, out) };
        return;
    }
    scalar::f16_bytes_to_f32(src, out)
}

/// Unpacks `out.len()` codes of width `bits` (1..=8) into f32 values.
/// The fast path reads up to 7 bytes past the group, so `src` must extend at least
/// 8 bytes beyond the start of the last 8-code chunk when it is used; otherwise the
/// scalar path is taken.
#[inline]
pub fn unpack_f32(src: &[u8], bits: u8, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if fast_path() && out.len().is_multiple_of(8) && src.len() >= out.len() / 8 * bits as usize + 8 {
        // SAFETY: features detected; `src` holds every byte read (checked above).
        unsafe { x86::unpack_f32(src, bits, out) };
        return;
    }
    scalar::unpack_f32(src, bits, out)
}

/// Packs `codes` (each < 2^bits) of width `bits` (1..=8) and appends the bytes to `dst`.
#[inline]
pub fn pack_append(codes: &[u8], bits: u8, dst: &mut Vec<u8>) {
    #[cfg(target_arch = "x86_64")]
    if fast_path() && codes.len().is_multiple_of(8) {
        // SAFETY: BMI2 detected.
        unsafe { x86::pack_append(codes, bits, dst) };
        return;
    }
    scalar::pack_append(codes, bits, dst)
}

/// Portable reference implementations.
pub mod scalar {
    use half::f16;

    /// Reference dot product.
    pub fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut s = [0f32; 8];
        let mut ca = a.chunks_exact(8);
        let mut cb = b.chunks_exact(8);
        for (x, y) in (&mut ca).zip(&mut cb) {
            for i in 0..8 {
                s[i] += x[i] * y[i];
            }
        }
        let mut tail = 0f32;
        for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
            tail += x * y;
        }
        s.iter().sum::<f32>() + tail
    }

    /// Reference `acc += w * x`.
    pub fn axpy(acc: &mut [f32], w: f32, x: &[f32]) {
        for (a, v) in acc.iter_mut().zip(x) {
            *a += w * v;
        }
    }

    /// Reference f16 (LE bytes) to f32.
    pub fn f16_bytes_to_f32(src: &[u8], out: &mut [f32]) {
        for (o, b) in out.iter_mut().zip(src.chunks_exact(2)) {
            *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
        }
    }

    /// Reference unpack: reads code `i` from bits `[i*b, (i+1)*b)`.
    pub fn unpack_f32(src: &[u8], bits: u8, out: &mut [f32]) {
        let b = bits as usize;
        let mask = (1u32 << b) - 1;
        for (i, o) in out.iter_mut().enumerate() {
            let bit = i * b;
            let byte = bit / 8;
            let lo = src[byte] as u32;
            let hi = if byte + 1 < src.len() { src[byte + 1] as u32 } else { 0 };
            *o = (((lo | (hi << 8)) >> (bit % 8)) & mask) as f32;
        }
    }

    /// Reference pack.
    pub fn pack_append(codes: &[u8], bits: u8, dst: &mut Vec<u8>) {
        let mut acc: u32 = 0;
        let mut n: u32 = 0;
        for &c in codes {
            acc |= (c as u32) << n;
            n += bits as u32;
            while n >= 8 {
                dst.push(acc as u8);
                acc >>= 8;
                n -= 8;
            }
        }
        if n > 0 {
            dst.push(acc as u8);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::lane_mask;
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
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
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
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
    pub unsafe fn axpy(acc: &mut [f32], w: f32, x: &[f32]) {
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

    /// # Safety
    /// AVX2 and F16C available; `src.len() >= 2 * out.len()`, `out.len() % 8 == 0`.
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn f16_bytes_to_f32(src: &[u8], out: &mut [f32]) {
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
    pub unsafe fn unpack_f32(src: &[u8], bits: u8, out: &mut [f32]) {
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
    pub unsafe fn pack_append(codes: &[u8], bits: u8, dst: &mut Vec<u8>) {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn h2f_is_exact_for_all_f16() {
        for b in 0..=u16::MAX {
            let h = half::f16::from_bits(b);
            let (a, e) = (h2f(h), h.to_f32());
            assert!(a.to_bits() == e.to_bits() || (a.is_nan() && e.is_nan()), "{b:#x}");
        }
    }

    #[test]
    fn fast_and_scalar_agree() {
        let a: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..64).map(|i| (i as f32 * 0.11).cos()).collect();
        assert!((dot(&a, &b) - scalar::dot(&a, &b)).abs() < 1e-4);
        let mut x1 = a.clone();
        let mut x2 = a.clone();
        axpy(&mut x1, 0.5, &b);
        scalar::axpy(&mut x2, 0.5, &b);
        assert_eq!(x1, x2);
        for bits in 1..=8u8 {
            let codes: Vec<u8> = (0..64u32).map(|i| ((i * 7 + 3) % (1 << bits)) as u8).collect();
            let mut p1 = Vec::new();
            let mut p2 = Vec::new();
            pack_append(&codes, bits, &mut p1);
            scalar::pack_append(&codes, bits, &mut p2);
            assert_eq!(p1, p2, "bits {bits}");
            assert_eq!(p1.len(), 8 * bits as usize);
            p1.extend_from_slice(&[0; 8]);
            let mut u1 = vec![0f32; 64];
            let mut u2 = vec![0f32; 64];
            unpack_f32(&p1, bits, &mut u1);
            scalar::unpack_f32(&p1, bits, &mut u2);
            assert_eq!(u1, u2);
            let back: Vec<u8> = u1.iter().map(|&v| v as u8).collect();
            assert_eq!(back, codes);
        }
        let h: Vec<u8> = (0..16).flat_map(|i| half::f16::from_f32(i as f32 - 3.5).to_le_bytes()).collect();
        let mut f1 = vec![0f32; 16];
        let mut f2 = vec![0f32; 16];
        f16_bytes_to_f32(&h, &mut f1);
        scalar::f16_bytes_to_f32(&h, &mut f2);
        assert_eq!(f1, f2);
        assert_eq!(f1[0], -3.5);
    }
}
