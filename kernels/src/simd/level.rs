//! The one dispatch point of the SIMD layer: the [`Level`] this process runs at,
//! detected once.

use std::sync::OnceLock;

/// The instruction set the kernels run with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Portable code only (no x86-64 CPU, a CPU without the AVX2 set, or
    /// `QAQ_KERNELS_SCALAR`).
    Scalar,
    /// AVX2, FMA, F16C and BMI2.
    Avx2,
    /// [`Level::Avx2`] plus AVX-512 F, BW, VL and VBMI (used by the group encoder and
    /// decoder, QAQ's window pass and the attention at head dims that are multiples of
    /// 64; the other kernels run their AVX2 versions).
    Avx512,
}

/// The level of this process: detected on the first call, then fixed.
#[inline]
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Level {
    let avx2 = std::env::var_os("QAQ_KERNELS_SCALAR").is_none()
        && is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
        && is_x86_feature_detected!("bmi2");
    let avx512 = std::env::var_os("QAQ_KERNELS_NO_AVX512").is_none()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vbmi");
    match (avx2, avx512) {
        (false, _) => Level::Scalar,
        (true, false) => Level::Avx2,
        (true, true) => Level::Avx512,
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Level {
    Level::Scalar
}

/// Whether the AVX2 kernels may run (the level is [`Level::Avx2`] or above).
#[inline]
pub(crate) fn avx2() -> bool {
    level() >= Level::Avx2
}

/// Whether the AVX-512 VNNI integer dot products (`vpdpbusd`) may run: the level is
/// [`Level::Avx512`] and the CPU has AVX512_VNNI, unless `QAQ_KERNELS_NO_VNNI` is set
/// (which leaves the other AVX-512 kernels on). Detected once. Used by the quantized
/// matmul of the 32-value formats and by the attention's value tiles over blocks of one
/// quantized width (`x86::attention512`); the other kernels do not depend on it.
#[inline]
pub fn vnni() -> bool {
    static VNNI: OnceLock<bool> = OnceLock::new();
    *VNNI.get_or_init(|| level() == Level::Avx512 && std::env::var_os("QAQ_KERNELS_NO_VNNI").is_none() && has_vnni())
}

#[cfg(target_arch = "x86_64")]
fn has_vnni() -> bool {
    is_x86_feature_detected!("avx512vnni")
}

#[cfg(not(target_arch = "x86_64"))]
fn has_vnni() -> bool {
    false
}
