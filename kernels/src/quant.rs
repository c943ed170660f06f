//! Per-group quantizer: one group is one token's `head_dim` values of one KV head.
//!
//! * [`Scheme::Midpoint`] (paper, default): outliers removed, `m` = inlier min rounded
//!   *down* to f16, `s` = `(max - m) / 2^b` rounded *up* to f16, code
//!   `c = min(floor((x - m)/s), 2^b - 1)`, reconstruction `m + (c + 0.5) s`. The directed
//!   rounding keeps `|x - x_hat| <= s/2` for every inlier with the stored metadata.
//!   Width 0 stores no codes and reconstructs every inlier at the midpoint `m + s/2`.
//! * [`Scheme::MeanCentred`] (reference code): `m` = inlier mean, `s = (max - min)/2^b`,
//!   signed code `clamp(round_half_even((x - m)/s), -2^(b-1), 2^(b-1) - 1)` stored with a
//!   `+2^(b-1)` bias, reconstruction `m + q s`; width 0 gives the constant `m - r/2`.
//!
//! Outliers (the lowest / highest `alpha` of the group, see [`Outliers`]) are stored
//! exactly as (u8 index, f16 value) and excluded from min/max/mean; their code is 0.
//! Inputs must be finite and within f16 range; callers pass f16-representable values
//! (the cache rounds every row to f16 first, which is also what the host backup holds),
//! so outliers and constant groups are reproduced exactly.
//!
//! This module is the quantizer's API; the implementations are in [`crate::simd`] (the
//! reference in [`crate::simd::scalar`], the hand-written x86 encoders and decoders
//! beside it), and the format types are defined in the crate's base module and
//! re-exported here.

pub use crate::base::{
    F16_MAX, GroupMeta, MAX_BITS, MAX_GROUP, META_BYTES, OUTLIER_BYTES, OutlierMode, Outliers, QuantSpec, RAW, Scheme,
    check_finite, check_group_len, code_bytes,
};

use crate::base::{GroupRef, Sink};
use crate::error::Result;
use crate::simd;
use half::f16;

/// Quantizes one group to `bits` (0..=8 or [`RAW`]) and appends its codes and outliers.
/// Returns the metadata. Errors on a bad length or non-finite / out-of-range input.
#[inline]
pub fn encode_group(
    x: &[f32],
    bits: u8,
    spec: &QuantSpec,
    codes: &mut Vec<u8>,
    out_idx: &mut Vec<u8>,
    out_val: &mut Vec<f16>,
) -> Result<GroupMeta> {
    simd::encode_group(x, bits, spec, &mut Sink { codes, out_idx, out_val })
}

/// [`encode_group`] over consecutive groups of `d` values (`x.len()` a multiple of
/// `d`), appending each group's metadata to `metas`: the same bytes and metadata as one
/// [`encode_group`] call per group, and the same error at the first failing group (the
/// groups before it stay appended). Faster: on x86-64 the default midpoint scheme runs
/// four groups in lock step with AVX-512 (F/BW/VL/VBMI), else two with AVX2
/// (`QAQ_KERNELS_NO_AVX512` forces the latter).
#[allow(clippy::too_many_arguments)]
pub fn encode_groups(
    x: &[f32],
    d: usize,
    bits: u8,
    spec: &QuantSpec,
    codes: &mut Vec<u8>,
    out_idx: &mut Vec<u8>,
    out_val: &mut Vec<f16>,
    metas: &mut Vec<GroupMeta>,
) -> Result<()> {
    simd::encode_groups(x, d, bits, spec, &mut Sink { codes, out_idx, out_val }, metas)
}

/// [`encode_groups`] reading f16 values directly (the same results as converting them
/// to f32 first, without the conversion pass).
#[allow(clippy::too_many_arguments)]
pub fn encode_groups_f16(
    x: &[f16],
    d: usize,
    bits: u8,
    spec: &QuantSpec,
    codes: &mut Vec<u8>,
    out_idx: &mut Vec<u8>,
    out_val: &mut Vec<f16>,
    metas: &mut Vec<GroupMeta>,
) -> Result<()> {
    simd::encode_groups(x, d, bits, spec, &mut Sink { codes, out_idx, out_val }, metas)
}

/// Reconstructs one group into `out` (length `d`). `codes` starts at the group's codes
/// (it may extend further); `out_idx`/`out_val` are the group's outliers.
#[inline]
pub fn decode_group(meta: &GroupMeta, scheme: Scheme, codes: &[u8], out_idx: &[u8], out_val: &[f16], out: &mut [f32]) {
    simd::decode_group(GroupRef { meta: *meta, codes, out_idx, out_val }, scheme, out)
}

/// Midpoint scheme only: re-encodes a group down to `new_bits` by dropping low code
/// bits (the grids nest, so the result equals a fresh encode at `new_bits` from the
/// same inliers). Appends the new codes; returns `None` when the scale would overflow
/// f16 (the caller then re-encodes from decoded values).
pub fn shift_down(meta: &GroupMeta, d: usize, codes: &[u8], new_bits: u8, dst: &mut Vec<u8>) -> Option<GroupMeta> {
    if meta.bits == RAW || new_bits > meta.bits {
        return None;
    }
    let k = meta.bits - new_bits;
    let s = f16::from_f32(meta.s.to_f32() * (1u32 << k) as f32);
    if !s.is_finite() {
        return None;
    }
    if new_bits > 0 {
        let mut tmp = [0f32; MAX_GROUP];
        simd::unpack_f32(codes, meta.bits, &mut tmp[..d]);
        let mut c = [0u8; MAX_GROUP];
        for (ci, &v) in c.iter_mut().zip(&tmp[..d]) {
            *ci = (v as u8) >> k;
        }
        simd::pack_append(&c[..d], new_bits, dst);
    }
    Some(GroupMeta { m: meta.m, s, bits: new_bits, n_out: meta.n_out })
}

#[cfg(test)]
#[path = "quant_tests.rs"]
mod tests;
