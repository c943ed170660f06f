//! [`Input`]: the values the group encoders read, f32 or f16 (converted exactly as they
//! are loaded), one trait for the portable and the x86 encoders.

use half::f16;
use half::slice::HalfFloatSliceExt;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
}

/// An input value type: `f32` or `f16` (sealed).
pub(crate) trait Input: Copy + sealed::Sealed {
    /// The value as f32 (exact).
    fn value(self) -> f32;
    /// `x` as f16 into `out` (as long; round to nearest even, exact for f16 input), or
    /// `false` (and `out` unspecified) when a value lies outside f16's finite range.
    fn halves(x: &[Self], out: &mut [f16]) -> bool;
    /// The value as f16 bits (round to nearest even, exact for f16-representable values).
    ///
    /// # Safety
    /// F16C available.
    #[cfg(target_arch = "x86_64")]
    unsafe fn half_bits(self) -> u16;
    /// 8 values of `x` from `off` as f32.
    ///
    /// # Safety
    /// AVX2 and F16C available; `off + 8 <= x.len()`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(x: &[Self], off: usize) -> __m256;
    /// The lanes of `mask` of the 16 values of `x` from `off` as f32 (other lanes 0).
    ///
    /// # Safety
    /// AVX-512 F/BW/VL available; every lane of `mask` is inside `x`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(x: &[Self], off: usize, mask: __mmask16) -> __m512;
}

impl Input for f32 {
    #[inline(always)]
    fn value(self) -> f32 {
        self
    }
    #[inline]
    fn halves(x: &[Self], out: &mut [f16]) -> bool {
        if crate::base::check_finite(x, "group").is_err() {
            return false;
        }
        out.convert_from_f32_slice(x);
        true
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn half_bits(self) -> u16 {
        _mm_extract_epi16::<0>(_mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(self))) as u16
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn load8(x: &[Self], off: usize) -> __m256 {
        debug_assert!(off + 8 <= x.len());
        // SAFETY: per the contract, 8 floats at `off` are inside the slice.
        unsafe { _mm256_loadu_ps(x.as_ptr().add(off)) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c")]
    unsafe fn load16(x: &[Self], off: usize, mask: __mmask16) -> __m512 {
        debug_assert!(off < x.len());
        // SAFETY: per the contract, the lanes read (those of `mask`) are in the slice;
        // masked-off lanes are not accessed.
        unsafe { _mm512_maskz_loadu_ps(mask, x.as_ptr().add(off)) }
    }
}

impl Input for f16 {
    #[inline(always)]
    fn value(self) -> f32 {
        self.to_f32()
    }
    #[inline]
    fn halves(x: &[Self], out: &mut [f16]) -> bool {
        out.copy_from_slice(x);
        x.iter().all(|v| v.is_finite())
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn half_bits(self) -> u16 {
        self.to_bits()
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn load8(x: &[Self], off: usize) -> __m256 {
        debug_assert!(off + 8 <= x.len());
        // SAFETY: per the contract, 8 f16 (16 bytes) at `off` are inside the slice.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(x.as_ptr().add(off) as *const __m128i)) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c")]
    unsafe fn load16(x: &[Self], off: usize, mask: __mmask16) -> __m512 {
        debug_assert!(off < x.len());
        // SAFETY: as for f32; 16-bit lanes.
        unsafe { _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, x.as_ptr().add(off) as *const i16)) }
    }
}
