//! The packed-group format every layer of the crate shares, and nothing else: widths
//! and size constants, the quantizer configuration ([`Scheme`], [`Outliers`],
//! [`QuantSpec`]), a group's metadata ([`GroupMeta`]), the f16 conversions and directed
//! roundings, and one page of packed groups ([`Block`]) as the store writes it and the
//! SIMD attention reads it. It depends on [`crate::error`] only, so `quant`, `store` and
//! the SIMD layer all build on it (`quant -> simd -> base`, never back).
//!
//! Its public items are re-exported where they have always been: [`crate::quant`] (the
//! format and the quantizer configuration) and [`crate::store`] (`Block`, `GroupRef`,
//! `Sink`, `SLACK`).

use crate::error::{KernelError, Result};
use half::f16;

/// Width marker for a group kept as raw fp16 (no codes, no min/scale).
pub const RAW: u8 = 16;
/// Largest quantized width.
pub const MAX_BITS: u8 = 8;
/// Largest group (head_dim) supported: outlier indices are one byte.
pub const MAX_GROUP: usize = 256;
/// Bytes of metadata stored per quantized group.
pub const META_BYTES: usize = 6;
/// Bytes per outlier: u8 index + f16 value.
pub const OUTLIER_BYTES: usize = 3;
/// Largest finite f16.
pub const F16_MAX: f32 = 65504.0;
/// Zero bytes kept after the codes of a block that holds quantized groups.
pub const SLACK: usize = 8;

/// Reconstruction scheme.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Scheme {
    /// Paper: asymmetric min/max grid, segment midpoints.
    #[default]
    Midpoint,
    /// Reference code: mean-centred signed grid, round half to even, clipped.
    MeanCentred,
}

impl Scheme {
    /// `x_hat = m + (code + offset) * s` for this scheme and width.
    pub fn offset(self, bits: u8) -> f32 {
        match self {
            Scheme::Midpoint => 0.5,
            Scheme::MeanCentred if bits == 0 => -0.5,
            Scheme::MeanCentred => -((1u32 << (bits - 1)) as f32),
        }
    }
}

/// How `alpha` is split between the two tails.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OutlierMode {
    /// `alpha` in total, `alpha/2` per side (reference code).
    #[default]
    Total,
    /// `alpha` on each side.
    PerSide,
}

/// Outlier selection: per group, `ceil(a*N)` lowest and `N - floor((1-a)*N)` highest
/// values, with `a = alpha/2` (total) or `alpha` (per side). Ties are broken by index,
/// so the count is exact.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Outliers {
    /// Fraction in [0, 0.5).
    pub alpha: f64,
    /// Split.
    pub mode: OutlierMode,
}

impl Outliers {
    /// No outliers.
    pub const NONE: Outliers = Outliers { alpha: 0.0, mode: OutlierMode::Total };
    /// The paper's 1% (total, as the reference code splits it).
    pub const PAPER: Outliers = Outliers { alpha: 0.01, mode: OutlierMode::Total };

    /// `(low, high)` outlier counts for a group of `n` values (may exceed the group for
    /// silly alphas; the encoders cap the total at `n - 1`, low side first).
    pub fn counts(&self, n: usize) -> (usize, usize) {
        if self.alpha <= 0.0 || n == 0 {
            return (0, 0);
        }
        let a = match self.mode {
            OutlierMode::Total => self.alpha / 2.0,
            OutlierMode::PerSide => self.alpha,
        };
        let nf = n as f64;
        let lo = (a * nf - 1e-9).ceil().max(0.0) as usize;
        let hi_rank = ((1.0 - a) * nf + 1e-9).floor() as usize;
        (lo, n.saturating_sub(hi_rank))
    }

    /// [`Outliers::counts`] as the encoders use them for a group of `n >= 1` values: at
    /// most `n - 1` in total, the low side first.
    #[inline]
    pub(crate) fn capped(&self, n: usize) -> (usize, usize) {
        let (k_lo, k_hi) = self.counts(n);
        let k_lo = k_lo.min(n - 1);
        (k_lo, k_hi.min(n - 1 - k_lo))
    }
}

/// Quantizer configuration.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QuantSpec {
    /// Reconstruction scheme.
    pub scheme: Scheme,
    /// Outlier selection.
    pub outliers: Outliers,
}

impl Default for QuantSpec {
    fn default() -> Self {
        QuantSpec { scheme: Scheme::Midpoint, outliers: Outliers::PAPER }
    }
}

/// Per-group metadata: 6 bytes in storage (f16 m, f16 s, width, outlier count), laid out
/// in that order in memory too (the AVX-512 attention reads 16 tokens' metadata at once).
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub struct GroupMeta {
    /// Grid origin: inlier min (midpoint) or inlier mean (mean-centred).
    pub m: f16,
    /// Step.
    pub s: f16,
    /// Width, 0..=8, or [`RAW`].
    pub bits: u8,
    /// Number of outliers.
    pub n_out: u8,
}

const _: () = assert!(
    std::mem::size_of::<GroupMeta>() == META_BYTES
        && std::mem::offset_of!(GroupMeta, s) == 2
        && std::mem::offset_of!(GroupMeta, bits) == 4
        && std::mem::offset_of!(GroupMeta, n_out) == 5
);

impl GroupMeta {
    /// Reconstruction of code 0 (and of outlier positions before correction).
    #[inline]
    pub fn base(&self, scheme: Scheme) -> f32 {
        h2f(self.m) + scheme.offset(self.bits) * h2f(self.s)
    }
    /// Inlier range implied by the metadata (`s * 2^b`).
    #[inline]
    pub fn range(&self) -> f32 {
        if self.bits == RAW { 0.0 } else { h2f(self.s) * (1u32 << self.bits) as f32 }
    }
    /// Bytes of codes for a group of `d` values.
    #[inline]
    pub fn code_bytes(&self, d: usize) -> usize {
        code_bytes(self.bits, d)
    }
}

/// Bytes of codes for width `bits` over `d` values (raw: 2 per value).
#[inline]
pub fn code_bytes(bits: u8, d: usize) -> usize {
    if bits == RAW { 2 * d } else { (d * bits as usize).div_ceil(8) }
}

/// Checks a group length: a multiple of 8 in 8..=256.
pub fn check_group_len(d: usize) -> Result<()> {
    if d == 0 || !d.is_multiple_of(8) || d > MAX_GROUP {
        return Err(KernelError::Config(format!("head_dim must be a multiple of 8 in 8..={MAX_GROUP}, got {d}")));
    }
    Ok(())
}

/// Branch-light f16 -> f32 conversion (exact for every f16, NaN/Inf included), cheaper
/// than a per-call feature check in the hot loops.
#[inline(always)]
pub fn h2f(h: f16) -> f32 {
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

/// The largest f16 `<= x` (round to nearest, then one step down if above): the
/// conversion with rounding toward -inf.
#[inline(always)]
pub(crate) fn f16_down(x: f32) -> f16 {
    let h = f16::from_f32(x);
    if h.to_f32() <= x {
        return h;
    }
    let b = h.to_bits();
    if b & 0x7fff == 0 {
        f16::from_bits(0x8001)
    } else if b & 0x8000 == 0 {
        f16::from_bits(b - 1)
    } else {
        f16::from_bits(b + 1)
    }
}

/// The smallest f16 `>= x` (rounding toward +inf).
#[inline(always)]
pub(crate) fn f16_up(x: f32) -> f16 {
    let h = f16::from_f32(x);
    if h.to_f32() >= x {
        return h;
    }
    let b = h.to_bits();
    if b & 0x7fff == 0 {
        f16::from_bits(0x0001)
    } else if b & 0x8000 == 0 {
        f16::from_bits(b + 1)
    } else {
        f16::from_bits(b - 1)
    }
}

/// Error unless every value is finite and within f16 range.
#[inline(always)]
pub fn check_finite(x: &[f32], what: &'static str) -> Result<()> {
    let mut ok = [true; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for i in 0..8 {
            ok[i] &= c[i].abs() <= F16_MAX;
        }
    }
    let tail_ok = chunks.remainder().iter().all(|v| v.abs() <= F16_MAX);
    if tail_ok && ok.iter().all(|&b| b) { Ok(()) } else { Err(KernelError::NonFinite { what }) }
}

/// One page of groups: struct-of-arrays metadata, the concatenated bit-packed codes
/// (each group starts on a byte boundary; [`SLACK`] zero bytes after them when the block
/// holds a quantized group) and the outliers' u8 indices and f16 values.
#[derive(Clone, Debug, Default)]
pub struct Block {
    pub(crate) meta: Vec<GroupMeta>,
    pub(crate) codes: Vec<u8>,
    pub(crate) out_idx: Vec<u8>,
    pub(crate) out_val: Vec<f16>,
    pub(crate) has_slack: bool,
}

/// A view of one stored group.
#[derive(Clone, Copy, Debug)]
pub struct GroupRef<'a> {
    /// Metadata.
    pub meta: GroupMeta,
    /// Codes, starting at this group (may run on into the next groups and the slack).
    pub codes: &'a [u8],
    /// Outlier indices.
    pub out_idx: &'a [u8],
    /// Outlier values.
    pub out_val: &'a [f16],
}

impl Block {
    /// Number of groups.
    pub fn len(&self) -> usize {
        self.meta.len()
    }
    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.meta.is_empty()
    }
    /// Visits every group in order.
    #[inline]
    pub fn for_each<'a>(&'a self, d: usize, mut f: impl FnMut(usize, GroupRef<'a>)) {
        let (mut co, mut oo) = (0usize, 0usize);
        for (i, m) in self.meta.iter().enumerate() {
            let no = m.n_out as usize;
            f(
                i,
                GroupRef {
                    meta: *m,
                    codes: &self.codes[co..],
                    out_idx: &self.out_idx[oo..oo + no],
                    out_val: &self.out_val[oo..oo + no],
                },
            );
            co += m.code_bytes(d);
            oo += no;
        }
    }

    pub(crate) fn strip_slack(&mut self) {
        if self.has_slack {
            self.codes.truncate(self.codes.len() - SLACK);
            self.has_slack = false;
        }
    }
    pub(crate) fn add_slack(&mut self) {
        if !self.has_slack && self.meta.iter().any(|m| m.bits != RAW) {
            self.codes.extend_from_slice(&[0; SLACK]);
            self.has_slack = true;
        }
    }
}

/// Where an encoder appends a group's code bytes and outliers (and where
/// [`crate::store::PackedStream::rewrite_block`] callbacks write a new encoding).
#[derive(Debug)]
pub struct Sink<'a> {
    /// Code bytes.
    pub codes: &'a mut Vec<u8>,
    /// Outlier indices.
    pub out_idx: &'a mut Vec<u8>,
    /// Outlier values.
    pub out_val: &'a mut Vec<f16>,
}

/// A packed stream as the attention kernels read it: its blocks in order, the group
/// length, the number of groups and the reconstruction scheme.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StreamView<'a> {
    pub blocks: &'a [Block],
    pub d: usize,
    pub len: usize,
    pub scheme: Scheme,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn h2f_is_exact_for_all_f16() {
        for b in 0..=u16::MAX {
            let h = f16::from_bits(b);
            let (a, e) = (h2f(h), h.to_f32());
            assert!(a.to_bits() == e.to_bits() || (a.is_nan() && e.is_nan()), "{b:#x}");
        }
    }
}
