//! The dispatching primitives: each takes its AVX2 version ([`x86`], with the x86
//! helpers the composed kernels share) when the level allows it (and the lengths suit
//! it), else its reference in [`super::scalar`].

#[cfg(target_arch = "x86_64")]
use super::level::avx2;
use super::scalar;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86;

/// Dot product of two equal-length f32 slices (8 lanes; two accumulators and FMA on
/// the AVX2 path, so the last bits differ from [`scalar::dot`]).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    if avx2() && a.len().is_multiple_of(8) {
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
    if avx2() && acc.len().is_multiple_of(8) {
        // SAFETY: the required CPU features were detected at run time.
        unsafe { x86::axpy(acc, w, x) };
        return;
    }
    scalar::axpy(acc, w, x)
}

/// The SwiGLU activation in place, `gate[i] = silu(gate[i]) * up[i]`
/// ([`scalar::silu_mul`]; bit-exact at every level).
#[inline]
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "silu_mul: gate and up differ in length");
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the required CPU features were detected at run time.
        unsafe { x86::silu_mul(gate, up) };
        return;
    }
    scalar::silu_mul(gate, up)
}

/// Converts little-endian f16 bytes (`2 * out.len()` of them) to f32.
#[inline]
pub fn f16_bytes_to_f32(src: &[u8], out: &mut [f32]) {
    debug_assert!(src.len() >= 2 * out.len());
    #[cfg(target_arch = "x86_64")]
    if avx2() && out.len().is_multiple_of(8) {
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
    if avx2() && out.len().is_multiple_of(8) && src.len() >= out.len() / 8 * bits as usize + 8 {
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
    if avx2() && codes.len().is_multiple_of(8) {
        // SAFETY: BMI2 detected.
        unsafe { x86::pack_append(codes, bits, dst) };
        return;
    }
    scalar::pack_append(codes, bits, dst)
}
