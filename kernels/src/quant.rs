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

use crate::error::{KernelError, Result};
use crate::simd;
use half::f16;

/// Width marker for a group kept as raw fp16 (no codes, no min/scale).
pub const RAW: u8 = 16;
/// Largest quantized width.
pub const MAX_BITS: u8 = 8;
/// Largest group (head_dim) supported: outlier indices are one byte.
pub const MAX_GROUP: usize = 256;

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
    /// silly alphas; [`encode_group`] caps the total at `n - 1`).
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

/// Per-group metadata: 6 bytes in storage (f16 m, f16 s, width, outlier count).
#[derive(Clone, Copy, Debug, PartialEq)]
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

/// Bytes of metadata stored per quantized group.
pub const META_BYTES: usize = 6;
/// Bytes per outlier: u8 index + f16 value.
pub const OUTLIER_BYTES: usize = 3;

impl GroupMeta {
    /// Reconstruction of code 0 (and of outlier positions before correction).
    #[inline]
    pub fn base(&self, scheme: Scheme) -> f32 {
        simd::h2f(self.m) + scheme.offset(self.bits) * simd::h2f(self.s)
    }
    /// Inlier range implied by the metadata (`s * 2^b`).
    #[inline]
    pub fn range(&self) -> f32 {
        if self.bits == RAW { 0.0 } else { simd::h2f(self.s) * (1u32 << self.bits) as f32 }
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

/// Largest finite f16.
pub const F16_MAX: f32 = 65504.0;

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

#[inline(always)]
fn lane_sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    for c in x.chunks_exact(8) {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + x.chunks_exact(8).remainder().iter().sum::<f32>()
}

#[inline(always)]
fn lane_min_max(x: &[f32]) -> (f32, f32) {
    let mut mn = [f32::INFINITY; 8];
    let mut mx = [f32::NEG_INFINITY; 8];
    for c in x.chunks_exact(8) {
        for i in 0..8 {
            mn[i] = if c[i] < mn[i] { c[i] } else { mn[i] };
            mx[i] = if c[i] > mx[i] { c[i] } else { mx[i] };
        }
    }
    (fold_lanes(mn, |a, b| if a < b { a } else { b }), fold_lanes(mx, |a, b| if a > b { a } else { b }))
}

/// Cross-lane reduction in a fixed tree, lanes (i+4, i), then (i+2, i), then (1, 0), with
/// `pick(a, b)` = `a < b ? a : b` (or `>`): deterministic even for +-0.
#[inline(always)]
fn fold_lanes(mut a: [f32; 8], pick: impl Fn(f32, f32) -> f32) -> f32 {
    for i in 0..4 {
        a[i] = pick(a[i + 4], a[i]);
    }
    for i in 0..2 {
        a[i] = pick(a[i + 2], a[i]);
    }
    pick(a[1], a[0])
}

/// Fast path for at most one outlier per side (the default at head_dim <= 200).
#[inline(always)]
fn select_small(x: &[f32], k_lo: usize, k_hi: usize, idx: &mut [u8; MAX_GROUP], n_idx: &mut usize) -> (f32, f32, f32) {
    *n_idx = 0;
    let (mn, mx) = lane_min_max(x);
    let sum_all = lane_sum(x);
    if k_lo + k_hi == 0 {
        return (mn, mx, sum_all);
    }
    let imin = x.iter().position(|&v| v == mn).unwrap_or(0);
    let imax = x.iter().rposition(|&v| v == mx).unwrap_or(0);
    let imax = if imax == imin && k_lo == 1 { if imin == 0 { 1 } else { 0 } } else { imax };
    let mut w = [0f32; MAX_GROUP];
    let w = &mut w[..x.len()];
    w.copy_from_slice(x);
    let mut sum = sum_all;
    let mut ex = [usize::MAX; 2];
    if k_lo == 1 {
        ex[0] = imin;
    }
    if k_hi == 1 {
        ex[1] = imax;
    }
    for &e in ex.iter().filter(|&&e| e != usize::MAX) {
        sum -= x[e];
        w[e] = f32::INFINITY;
    }
    let (imn, _) = lane_min_max(w);
    for &e in ex.iter().filter(|&&e| e != usize::MAX) {
        w[e] = f32::NEG_INFINITY;
    }
    let (_, imx) = lane_min_max(w);
    if ex[0] > ex[1] {
        ex.swap(0, 1);
    }
    for &e in ex.iter().filter(|&&e| e != usize::MAX) {
        idx[*n_idx] = e as u8;
        *n_idx += 1;
    }
    (imn, imx, sum)
}

/// Picks outliers; returns the inlier (min, max, sum) and fills `idx` (sorted).
#[inline(always)]
fn select_outliers(
    x: &[f32],
    k_lo: usize,
    k_hi: usize,
    idx: &mut [u8; MAX_GROUP],
    n_idx: &mut usize,
) -> (f32, f32, f32) {
    *n_idx = 0;
    if k_lo + k_hi > 0 {
        let mut taken = [false; MAX_GROUP];
        for pass in 0..k_lo + k_hi {
            let low = pass < k_lo;
            let mut best = usize::MAX;
            for (i, &v) in x.iter().enumerate() {
                if taken[i] {
                    continue;
                }
                if best == usize::MAX || (low && v < x[best]) || (!low && v > x[best]) {
                    best = i;
                }
            }
            taken[best] = true;
        }
        for i in (0..x.len()).filter(|&i| taken[i]) {
            idx[*n_idx] = i as u8;
            *n_idx += 1;
        }
    }
    let (mut mn, mut mx, mut sum) = (f32::INFINITY, f32::NEG_INFINITY, 0f32);
    let mut next = idx[..*n_idx].iter().peekable();
    for (i, &v) in x.iter().enumerate() {
        if next.peek().is_some_and(|&&j| j as usize == i) {
            next.next();
            continue;
        }
        mn = mn.min(v);
        mx = mx.max(v);
        sum += v;
    }
    (mn, mx, sum)
}

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
    #[cfg(target_arch = "x86_64")]
    if simd::fast_path() {
        // SAFETY: the features named by `encode_fast` were detected at run time.
        return unsafe { encode_fast(x, bits, spec, codes, out_idx, out_val) };
    }
    encode_scalar(x, bits, spec, codes, out_idx, out_val)
}

/// [`encode_group`] over consecutive groups of `d` values (`x.len()` a multiple of
/// `d`), appending each group's metadata to `metas`: the same bytes and metadata as one
/// [`encode_group`] call per group, and the same error at the first failing group (the
/// groups before it stay appended). Faster: on x86-64 the default midpoint scheme runs
/// four groups in lock step with AVX-512 (F/BW/VL/VBMI, `crate::fastq512`), else two
/// with AVX2 (`QAQ_KERNELS_NO_AVX512` forces the latter).
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
    encode_groups_of(x, d, bits, spec, codes, out_idx, out_val, metas)
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
    encode_groups_of(x, d, bits, spec, codes, out_idx, out_val, metas)
}

/// Slices the SIMD batch encoders read (f32 and f16 values).
#[cfg(target_arch = "x86_64")]
trait FastInput: crate::fastq::GroupInput + crate::fastq512::Input16 {}
#[cfg(target_arch = "x86_64")]
impl<X: crate::fastq::GroupInput + crate::fastq512::Input16> FastInput for X {}
#[cfg(not(target_arch = "x86_64"))]
trait FastInput {}
#[cfg(not(target_arch = "x86_64"))]
impl<X> FastInput for X {}

/// The one implementation behind [`encode_groups`] and [`encode_groups_f16`].
#[allow(clippy::too_many_arguments)]
fn encode_groups_of<T: Copy + Into<f32>>(
    x: &[T],
    d: usize,
    bits: u8,
    spec: &QuantSpec,
    codes: &mut Vec<u8>,
    out_idx: &mut Vec<u8>,
    out_val: &mut Vec<f16>,
    metas: &mut Vec<GroupMeta>,
) -> Result<()>
where
    for<'a> &'a [T]: FastInput,
{
    check_group_len(d)?;
    if !x.len().is_multiple_of(d) {
        return Err(KernelError::Config(format!("{} values is not a whole number of groups of {d}", x.len())));
    }
    #[cfg(target_arch = "x86_64")]
    if simd::fast_path() && spec.scheme == Scheme::Midpoint && bits <= MAX_BITS {
        let (k_lo, k_hi) = spec.outliers.counts(d);
        let k_lo = k_lo.min(d - 1);
        let k_hi = k_hi.min(d - 1 - k_lo);
        if k_lo <= 1 && k_hi <= 1 {
            if crate::fastq512::available() {
                // SAFETY: AVX-512 detected at run time; `d` checked above.
                return unsafe {
                    crate::fastq512::encode_midpoint_many(x, d, bits, k_lo, k_hi, codes, out_idx, out_val, metas)
                };
            }
            // SAFETY: features detected at run time; `d` checked above.
            return unsafe {
                crate::fastq::encode_midpoint_many(x, d, bits, k_lo, k_hi, codes, out_idx, out_val, metas)
            };
        }
    }
    let mut tmp = [0f32; MAX_GROUP];
    for g in x.chunks_exact(d) {
        for (t, &v) in tmp.iter_mut().zip(g) {
            *t = v.into();
        }
        metas.push(encode_group(&tmp[..d], bits, spec, codes, out_idx, out_val)?);
    }
    Ok(())
}

/// The scalar reference encoder (what [`encode_group`] computes on every CPU).
pub(crate) fn encode_scalar(
    x: &[f32],
    bits: u8,
    spec: &QuantSpec,
    codes: &mut Vec<u8>,
    out_idx: &mut Vec<u8>,
    out_val: &mut Vec<f16>,
) -> Result<GroupMeta> {
    encode_impl(x, bits, spec, codes, out_idx, out_val)
}

/// Dispatch on the x86 fast path: the hand-written midpoint encoder for at most one
/// outlier per side (the default at head_dim <= 200), else [`encode_impl`] compiled
/// with AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,bmi2")]
unsafe fn encode_fast(
    x: &[f32],
    bits: u8,
    spec: &QuantSpec,
    codes: &mut Vec<u8>,
    out_idx: &mut Vec<u8>,
    out_val: &mut Vec<f16>,
) -> Result<GroupMeta> {
    let d = x.len();
    if spec.scheme == Scheme::Midpoint && bits <= MAX_BITS && check_group_len(d).is_ok() {
        let (k_lo, k_hi) = spec.outliers.counts(d);
        let k_lo = k_lo.min(d - 1);
        let k_hi = k_hi.min(d - 1 - k_lo);
        if k_lo <= 1 && k_hi <= 1 {
            // SAFETY: features detected by the caller; length checked above.
            return unsafe { crate::fastq::encode_midpoint(x, bits, k_lo, k_hi, codes, out_idx, out_val) };
        }
    }
    // SAFETY: same features.
    unsafe { encode_avx2(x, bits, spec, codes, out_idx, out_val) }
}

/// The same code compiled with AVX2 enabled (multiversioning of [`encode_impl`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,bmi2")]
unsafe fn encode_avx2(
    x: &[f32],
    bits: u8,
    spec: &QuantSpec,
    codes: &mut Vec<u8>,
    out_idx: &mut Vec<u8>,
    out_val: &mut Vec<f16>,
) -> Result<GroupMeta> {
    encode_impl(x, bits, spec, codes, out_idx, out_val)
}

#[inline(always)]
fn encode_impl(
    x: &[f32],
    bits: u8,
    spec: &QuantSpec,
    codes: &mut Vec<u8>,
    out_idx: &mut Vec<u8>,
    out_val: &mut Vec<f16>,
) -> Result<GroupMeta> {
    let d = x.len();
    check_group_len(d)?;
    check_finite(x, "group")?;
    if bits == RAW {
        for &v in x {
            codes.extend_from_slice(&f16::from_f32(v).to_le_bytes());
        }
        return Ok(GroupMeta { m: f16::ZERO, s: f16::ZERO, bits: RAW, n_out: 0 });
    }
    if bits > MAX_BITS {
        return Err(KernelError::Config(format!("width {bits} outside 0..=8")));
    }
    let (k_lo, k_hi) = spec.outliers.counts(d);
    let k_lo = k_lo.min(d - 1);
    let k_hi = k_hi.min(d - 1 - k_lo);
    let mut idx_buf = [0u8; MAX_GROUP];
    let mut n_idx = 0usize;
    let (mn, mx, sum) = if k_lo <= 1 && k_hi <= 1 {
        select_small(x, k_lo, k_hi, &mut idx_buf, &mut n_idx)
    } else {
        select_outliers(x, k_lo, k_hi, &mut idx_buf, &mut n_idx)
    };
    let idx = &idx_buf[..n_idx];
    let n_in = (d - idx.len()) as f32;
    let levels = (1u32 << bits) as f32;
    let mut c = [0u8; MAX_GROUP];
    let (m, s) = match spec.scheme {
        Scheme::Midpoint => {
            // `+ 0.0` maps -0 to +0, so the metadata does not depend on which of two
            // equal zeros the min/max search met first.
            let m = f16_down(mn + 0.0);
            let s = f16_up(((mx + 0.0) - m.to_f32()) / levels);
            if !s.is_finite() {
                return Err(KernelError::NonFinite { what: "group range" });
            }
            let (mf, sf) = (m.to_f32(), s.to_f32());
            if bits > 0 && sf > 0.0 {
                let inv = 1.0 / sf;
                let top = (1u32 << bits) - 1;
                // (v - mf) >= 0 for inliers, so truncation is floor; outliers clamp.
                let topf = top as f32;
                for (ci, &v) in c.iter_mut().zip(x) {
                    let q = ((v - mf) * inv).max(0.0).min(topf);
                    // SAFETY: `q` is finite (finite inputs, `inv` <= 2^24) and in [0, 255].
                    *ci = unsafe { q.to_int_unchecked::<i32>() } as u8;
                }
            }
            (m, s)
        }
        Scheme::MeanCentred => {
            let m = f16::from_f32(sum / n_in);
            let s = f16::from_f32((mx - mn) / levels);
            if !s.is_finite() {
                return Err(KernelError::NonFinite { what: "group range" });
            }
            if bits > 0 {
                let (mf, sf) = (m.to_f32(), s.to_f32());
                let half_lv = (1u32 << (bits - 1)) as f32;
                let inv = if sf > 0.0 { 1.0 / sf } else { 0.0 };
                for (ci, &v) in c.iter_mut().zip(x) {
                    let q = ((v - mf) * inv).round_ties_even().clamp(-half_lv, half_lv - 1.0);
                    *ci = (q + half_lv) as u8;
                }
            }
            (m, s)
        }
    };
    for &i in idx {
        c[i as usize] = 0;
        out_idx.push(i);
        out_val.push(f16::from_f32(x[i as usize]));
    }
    if bits > 0 {
        simd::pack_append(&c[..d], bits, codes);
    }
    Ok(GroupMeta { m, s, bits, n_out: idx.len() as u8 })
}

/// Reconstructs one group into `out` (length `d`). `codes` starts at the group's codes
/// (it may extend further); `out_idx`/`out_val` are the group's outliers.
pub fn decode_group(meta: &GroupMeta, scheme: Scheme, codes: &[u8], out_idx: &[u8], out_val: &[f16], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if meta.bits != RAW
        && meta.bits > 0
        && out.len().is_multiple_of(8)
        && out.len() <= MAX_GROUP
        && codes.len() >= code_bytes(meta.bits, out.len())
        && crate::fastq512::available()
    {
        // SAFETY: AVX-512 detected; length conditions checked just above.
        unsafe {
            crate::fastq512::decode_quantized(
                meta.base(scheme),
                simd::h2f(meta.s),
                meta.bits,
                codes,
                out_idx,
                out_val,
                out,
            )
        };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if meta.bits != RAW
        && meta.bits > 0
        && simd::fast_path()
        && out.len().is_multiple_of(8)
        && codes.len() >= out.len() / 8 * meta.bits as usize + 8
    {
        // SAFETY: features detected; length conditions checked just above.
        unsafe {
            crate::fastq::decode_quantized(
                meta.base(scheme),
                simd::h2f(meta.s),
                meta.bits,
                codes,
                out_idx,
                out_val,
                out,
            )
        };
        return;
    }
    decode_scalar(meta, scheme, codes, out_idx, out_val, out)
}

/// The portable reference of [`decode_group`].
pub(crate) fn decode_scalar(
    meta: &GroupMeta,
    scheme: Scheme,
    codes: &[u8],
    out_idx: &[u8],
    out_val: &[f16],
    out: &mut [f32],
) {
    if meta.bits == RAW {
        simd::f16_bytes_to_f32(codes, out);
        return;
    }
    let base = meta.base(scheme);
    let s = meta.s.to_f32();
    if meta.bits == 0 {
        out.fill(base);
    } else {
        simd::unpack_f32(codes, meta.bits, out);
        for v in out.iter_mut() {
            *v = base + *v * s;
        }
    }
    for (&i, &v) in out_idx.iter().zip(out_val) {
        if let Some(o) = out.get_mut(i as usize) {
            *o = v.to_f32();
        }
    }
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
