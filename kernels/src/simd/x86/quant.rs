//! Hand-written AVX2/FMA/F16C/BMI2 versions of the per-group quantizer hot paths:
//! [`encode_midpoint`] (min/max, at most one outlier per side, quantize, pack; two groups
//! in lock step in [`encode_midpoint_many`]) and [`decode_quantized`] (unpack +
//! reconstruct), and [`encode_group`], which picks the former or the reference encoder
//! compiled with AVX2. They reproduce the reference in `simd::portable` bit for bit
//! (same lane order for min/max, same operation order for every rounding step); the
//! tests in `simd::tests` compare them for every width.

use crate::base::{F16_MAX, GroupMeta, MAX_BITS, QuantSpec, Scheme, Sink, check_group_len};
use crate::error::{KernelError, Result};
use crate::simd::input::Input;
use crate::simd::portable;
use crate::simd::prim::x86::{h2f_f16c, lane_mask};
use half::f16;
use std::arch::x86_64::*;

/// Per lane: the two smallest (`lo1 <= lo2`) and two largest (`hi1 >= hi2`) values
/// seen, as a multiset (equal values count twice).
#[derive(Clone, Copy)]
struct Pairs {
    lo1: __m256,
    lo2: __m256,
    hi1: __m256,
    hi2: __m256,
}

/// Merges two (smallest, second smallest) lane pairs.
#[inline]
#[target_feature(enable = "avx2")]
fn merge_lo(a1: __m256, a2: __m256, b1: __m256, b2: __m256) -> (__m256, __m256) {
    (_mm256_min_ps(a1, b1), _mm256_min_ps(_mm256_max_ps(a1, b1), _mm256_min_ps(a2, b2)))
}

impl Pairs {
    #[inline]
    #[target_feature(enable = "avx2")]
    fn push(self, v: __m256) -> Pairs {
        Pairs {
            lo1: _mm256_min_ps(self.lo1, v),
            lo2: _mm256_min_ps(self.lo2, _mm256_max_ps(self.lo1, v)),
            hi1: _mm256_max_ps(self.hi1, v),
            hi2: _mm256_max_ps(self.hi2, _mm256_min_ps(self.hi1, v)),
        }
    }
    #[inline]
    #[target_feature(enable = "avx2")]
    fn merge(self, o: Pairs) -> Pairs {
        let (lo1, lo2) = merge_lo(self.lo1, self.lo2, o.lo1, o.lo2);
        Pairs {
            lo1,
            lo2,
            hi1: _mm256_max_ps(self.hi1, o.hi1),
            hi2: _mm256_max_ps(_mm256_min_ps(self.hi1, o.hi1), _mm256_max_ps(self.hi2, o.hi2)),
        }
    }
    /// Across lanes: `[smallest, second smallest, largest, second largest]` (values
    /// only; which of two equal zeros wins is irrelevant after `+ 0.0`). The maxima
    /// are negated so both sides share the registers of one min-tree.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn reduce(self) -> [f32; 4] {
        let sign = _mm256_set1_ps(-0.0);
        let (n1, n2) = (_mm256_xor_ps(self.hi1, sign), _mm256_xor_ps(self.hi2, sign));
        // Level 1: low halves hold lanes 0..4 of lo / -hi, high halves lanes 4..8.
        let a1 = _mm256_permute2f128_ps::<0x20>(self.lo1, n1);
        let b1 = _mm256_permute2f128_ps::<0x31>(self.lo1, n1);
        let a2 = _mm256_permute2f128_ps::<0x20>(self.lo2, n2);
        let b2 = _mm256_permute2f128_ps::<0x31>(self.lo2, n2);
        let (p1, p2) = merge_lo(a1, a2, b1, b2);
        let sh = |v: __m256| _mm256_permute_ps::<0b01_00_11_10>(v);
        let (p1, p2) = merge_lo(p1, p2, sh(p1), sh(p2));
        let s1 = |v: __m256| _mm256_permute_ps::<0b10_11_00_01>(v);
        let (p1, p2) = merge_lo(p1, p2, s1(p1), s1(p2));
        let hi = |v: __m256| _mm_cvtss_f32(_mm256_extractf128_ps::<1>(v));
        [_mm256_cvtss_f32(p1), _mm256_cvtss_f32(p2), -hi(p1), -hi(p2)]
    }
}

/// Midpoint-scheme encode of one group with at most one outlier per side
/// (`k_lo, k_hi <= 1`), `bits` in 0..=8, `x.len()` a multiple of 8 in 8..=256 (checked
/// by the caller). Same results and errors as the reference `simd::portable::encode_group`; appends
/// nothing on error.
///
/// # Safety
/// AVX2, FMA, F16C and BMI2 must be available.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,bmi2")]
pub(crate) unsafe fn encode_midpoint<T: Input>(
    x: &[T],
    bits: u8,
    k_lo: usize,
    k_hi: usize,
    out: &mut Sink<'_>,
) -> Result<GroupMeta> {
    let mut metas = [EMPTY; 1];
    let d = x.len();
    // SAFETY: features enabled here; `x.len() == G * d` and `NV` is 0 or `d / 8`.
    let (_, err) = unsafe {
        match d {
            64 => encode_body::<T, 8, 1>(x, d, bits, k_lo, k_hi, out, &mut metas),
            128 => encode_body::<T, 16, 1>(x, d, bits, k_lo, k_hi, out, &mut metas),
            _ => encode_body::<T, 0, 1>(x, d, bits, k_lo, k_hi, out, &mut metas),
        }
    };
    match err {
        Some(e) => Err(e),
        None => Ok(metas[0]),
    }
}

/// [`encode_midpoint`] over consecutive groups of `d` values (`x.len()` a multiple of
/// `d`), two groups at a time in lock step so that their dependency chains overlap.
/// Appends the groups in order and stops at the first error (the groups before it stay
/// appended), exactly like one [`encode_midpoint`] call per group.
///
/// # Safety
/// As [`encode_midpoint`]; `d` a multiple of 8 in 8..=256.
#[target_feature(enable = "avx2,fma,f16c,bmi2")]
pub(crate) unsafe fn encode_midpoint_many<T: Input>(
    x: &[T],
    d: usize,
    bits: u8,
    k_lo: usize,
    k_hi: usize,
    out: &mut Sink<'_>,
    metas: &mut Vec<GroupMeta>,
) -> Result<()> {
    let n = x.len() / d;
    for k in 0..n / 2 {
        // Fetch the input 8 groups ahead (a prefetch never faults, even past the end).
        let ahead = x.as_ptr().wrapping_add((2 * k + 8) * d) as *const i8;
        for off in (0..2 * d * size_of::<T>()).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(off));
        }
        let xx = &x[2 * k * d..2 * (k + 1) * d];
        let mut m2 = [EMPTY; 2];
        // SAFETY: as documented; `xx.len() == 2 * d`.
        let (n, err) = unsafe {
            match d {
                64 => encode_body::<T, 8, 2>(xx, d, bits, k_lo, k_hi, out, &mut m2),
                128 => encode_body::<T, 16, 2>(xx, d, bits, k_lo, k_hi, out, &mut m2),
                _ => encode_body::<T, 0, 2>(xx, d, bits, k_lo, k_hi, out, &mut m2),
            }
        };
        metas.extend_from_slice(&m2[..n]);
        if let Some(e) = err {
            return Err(e);
        }
    }
    if n % 2 == 1 {
        let xx = &x[(n - 1) * d..n * d];
        // SAFETY: as documented.
        metas.push(unsafe { encode_midpoint(xx, bits, k_lo, k_hi, out) }?);
    }
    Ok(())
}

const EMPTY: GroupMeta = GroupMeta { m: f16::ZERO, s: f16::ZERO, bits: 0, n_out: 0 };

/// The body of [`encode_midpoint`] for `G` (1 or 2) consecutive groups of `d` values
/// in lock step; `NV` is `d / 8` when known at compile time (0: at run time). Writes
/// the metadata of the groups appended into `metas` and returns how many were appended
/// and the error that stopped it.
///
/// # Safety
/// As [`encode_midpoint`]; `x.len() == G * d`.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx2,fma,f16c,bmi2")]
unsafe fn encode_body<T: Input, const NV: usize, const G: usize>(
    x: &[T],
    d: usize,
    bits: u8,
    k_lo: usize,
    k_hi: usize,
    out: &mut Sink<'_>,
    metas: &mut [GroupMeta; G],
) -> (usize, Option<KernelError>) {
    let Sink { codes, out_idx, out_val } = out;
    let nv = if NV == 0 { d / 8 } else { NV };
    assert!(nv * 8 == d && nv <= 32 && x.len() == G * d && (1..=2).contains(&G));
    debug_assert!(k_lo <= 1 && k_hi <= 1 && bits <= 8);
    // SAFETY: g * d + 8 * i + 8 <= G * d = x.len() for g < G, i < nv.
    let ld = |g: usize, i: usize| unsafe { T::load8(x, g * d + 8 * i) };

    // Pass 1: finiteness (|v| <= F16_MAX as ordered bit patterns: the largest of
    // `bits << 1`, which drops the sign, NaN and inf being above F16_MAX) and, per lane,
    // the two smallest and two largest values, in two independent sets per group to
    // halve the dependency chains.
    let (pinf, ninf) = (_mm256_set1_ps(f32::INFINITY), _mm256_set1_ps(f32::NEG_INFINITY));
    let mut big = [_mm256_setzero_si256(); G];
    let mut st = [[Pairs { lo1: pinf, lo2: pinf, hi1: ninf, hi2: ninf }; 2]; G];
    for i in 0..nv {
        for g in 0..G {
            let v = ld(g, i);
            big[g] = _mm256_max_epu32(big[g], _mm256_slli_epi32::<1>(_mm256_castps_si256(v)));
            // One group alone uses two sets for ILP; in lock step the groups provide it.
            let set = if G == 1 { i & 1 } else { 0 };
            st[g][set] = st[g][set].push(v);
        }
    }
    let lim = _mm256_set1_epi32((F16_MAX.to_bits() << 1) as i32);
    let mut finite = [true; G];
    let (mut mn, mut mx, mut s1, mut l1) = ([0f32; G], [0f32; G], [0f32; G], [0f32; G]);
    for g in 0..G {
        // max_epu32(big, lim) == lim  <=>  every lane of `big` <= lim (unsigned).
        finite[g] = _mm256_movemask_epi8(_mm256_cmpeq_epi32(_mm256_max_epu32(big[g], lim), lim)) == -1;
        let [a1, a2, b1, b2] = if G == 1 { st[g][0].merge(st[g][1]) } else { st[g][0] }.reduce();
        // Inlier extremes: with one outlier per side they are the second smallest /
        // largest values (the reference excludes the first minimum and the last
        // maximum; d >= 8 leaves the same values). `+ 0.0` turns -0 into +0 as the
        // reference does.
        mn[g] = if k_lo == 1 { a2 } else { a1 } + 0.0;
        mx[g] = if k_hi == 1 { b2 } else { b1 } + 0.0;
        (s1[g], l1[g]) = (a1, b1);
    }

    // Outliers: the first minimum and the last maximum (as the reference's `select_small`),
    // found through the largest `and(eq, key)`: key `255 - i` gives the first match,
    // key `i + 1` the last; no data-dependent branch.
    let (mut ex0, mut ex1) = ([usize::MAX; G], [usize::MAX; G]);
    if k_lo + k_hi > 0 {
        let iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let (mut fa, mut la) = ([_mm256_setzero_si256(); G], [_mm256_setzero_si256(); G]);
        for i in 0..nv {
            let pos = _mm256_add_epi32(iota, _mm256_set1_epi32(8 * i as i32));
            let key_first = _mm256_sub_epi32(_mm256_set1_epi32(255), pos);
            let key_last = _mm256_add_epi32(pos, _mm256_set1_epi32(1));
            for g in 0..G {
                let v = ld(g, i);
                let eq_lo = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_EQ_OQ>(v, _mm256_set1_ps(s1[g])));
                let eq_hi = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_EQ_OQ>(v, _mm256_set1_ps(l1[g])));
                fa[g] = _mm256_max_epu32(fa[g], _mm256_and_si256(eq_lo, key_first));
                la[g] = _mm256_max_epu32(la[g], _mm256_and_si256(eq_hi, key_last));
            }
        }
        let hmax_u32 = |v: __m256i| {
            let r = _mm_max_epu32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
            let r = _mm_max_epu32(r, _mm_shuffle_epi32::<0b01_00_11_10>(r));
            _mm_cvtsi128_si32(_mm_max_epu32(r, _mm_shuffle_epi32::<0b10_11_00_01>(r))) as u32
        };
        for g in 0..G {
            // On non-finite input (reported below) the keys may be 0: wrap, unused.
            let imin = 255usize.wrapping_sub(hmax_u32(fa[g]) as usize) & 255;
            let mut imax = (hmax_u32(la[g]) as usize).wrapping_sub(1) & 255;
            if imax == imin && k_lo == 1 {
                imax = if imin == 0 { 1 } else { 0 };
            }
            if k_lo == 1 {
                ex0[g] = imin;
            }
            if k_hi == 1 {
                ex1[g] = imax;
            }
        }
    }

    // Metadata with directed rounding, all groups in one register.
    let lane = |a: &[f32; G]| _mm_setr_ps(a[0], a[1 % G], 0.0, 0.0);
    let mh = _mm_cvtps_ph::<_MM_FROUND_TO_NEG_INF>(lane(&mn));
    let mf4 = _mm_cvtph_ps(mh);
    // x / 2^b and x * 2^-b are the same correctly rounded value.
    let sh = _mm_cvtps_ph::<_MM_FROUND_TO_POS_INF>(_mm_mul_ps(
        _mm_sub_ps(lane(&mx), mf4),
        _mm_set1_ps(1.0 / (1u32 << bits) as f32),
    ));
    let sf4 = _mm_cvtph_ps(sh);
    let inv4 = _mm_div_ps(_mm_set1_ps(1.0), sf4);
    let (mut mf, mut sf, mut inv, mut mb, mut sb) = ([0f32; 4], [0f32; 4], [0f32; 4], [0u16; 8], [0u16; 8]);
    // SAFETY: 4 floats / 8 u16 each.
    unsafe {
        _mm_storeu_ps(mf.as_mut_ptr(), mf4);
        _mm_storeu_ps(sf.as_mut_ptr(), sf4);
        _mm_storeu_ps(inv.as_mut_ptr(), inv4);
        _mm_storeu_si128(mb.as_mut_ptr() as *mut __m128i, mh);
        _mm_storeu_si128(sb.as_mut_ptr() as *mut __m128i, sh);
    }

    let nb = bits as usize;
    codes.reserve(G * nv * nb + 8);
    let len = codes.len();
    if bits > 0 {
        let mask = lane_mask(bits);
        let top = _mm256_set1_epi16(((1u32 << bits) - 1) as i16);
        // Positions of the 16-bit codes after `packus_epi32(c(i), c(i + 1))`.
        let pos16 = _mm256_setr_epi16(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15);
        let perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for g in 0..G {
            // Codes as bytes: trunc((v - m) / s) then saturation, which is the
            // reference's clamp to [0, 2^b - 1] (negative or overflowing conversions
            // saturate to 0 in `packus`; only outliers can be that far out, and their
            // code is 0 anyway). All zero when the step is zero.
            // SAFETY: (for the whole block) capacity >= len + G * nv * nb + 8; the k-th 8-byte
            // write of group g starts at len + (g * nv + k) * nb <= len + (G * nv - 1) * nb,
            // so every write is inside the allocation; the bytes later exposed by
            // `set_len` are all written (pext leaves the high bytes zero and the next write
            // overwrites them). `cb` is only read where it was written: bytes 0 .. 8 nv,
            // stored 32 at a time (8 * i + 32 <= 256).
            let dst = unsafe { codes.as_mut_ptr().add(len + g * nv * nb) };
            if sf[g] <= 0.0 {
                // SAFETY: nv * nb bytes at `dst` are inside the reserved capacity (above).
                unsafe { std::ptr::write_bytes(dst, 0, nv * nb) };
                continue;
            }
            let mut cb = std::mem::MaybeUninit::<[u8; 256]>::uninit();
            let cbp = cb.as_mut_ptr() as *mut u8;
            {
                let (iv, mv) = (_mm256_set1_ps(inv[g]), _mm256_set1_ps(mf[g]));
                let code = |i: usize| {
                    if i < nv {
                        _mm256_cvttps_epi32(_mm256_mul_ps(_mm256_sub_ps(ld(g, i), mv), iv))
                    } else {
                        _mm256_setzero_si256()
                    }
                };
                let (x0, x1) = (_mm256_set1_epi16(ex0[g] as i16), _mm256_set1_epi16(ex1[g] as i16));
                let pair = |i: usize| {
                    let w = _mm256_min_epu16(_mm256_packus_epi32(code(i), code(i + 1)), top);
                    let pos = _mm256_add_epi16(pos16, _mm256_set1_epi16(8 * i as i16));
                    let ex = _mm256_or_si256(_mm256_cmpeq_epi16(pos, x0), _mm256_cmpeq_epi16(pos, x1));
                    _mm256_andnot_si256(ex, w)
                };
                let mut i = 0;
                while i < nv {
                    let bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(pair(i), pair(i + 2)), perm);
                    // SAFETY: see above.
                    unsafe { _mm256_storeu_si256(cbp.add(8 * i) as *mut __m256i, bytes) };
                    i += 4;
                }
            }
            // SAFETY: see above.
            unsafe {
                for k in 0..nv {
                    let w = (cbp.add(8 * k) as *const u64).read_unaligned();
                    (dst.add(k * nb) as *mut u64).write_unaligned(_pext_u64(w, mask).to_le());
                }
            }
        }
    }
    for g in 0..G {
        if !finite[g] {
            return (g, Some(KernelError::NonFinite { what: "group" }));
        }
        if sb[g] & 0x7c00 == 0x7c00 {
            return (g, Some(KernelError::NonFinite { what: "group range" }));
        }
        let mut n_out = 0u8;
        let (a, b) = if ex0[g] > ex1[g] { (ex1[g], ex0[g]) } else { (ex0[g], ex1[g]) };
        for e in [a, b] {
            if e != usize::MAX {
                out_idx.push(e as u8);
                // SAFETY: F16C is enabled in this function.
                out_val.push(f16::from_bits(unsafe { x[g * d + e].half_bits() }));
                n_out += 1;
            }
        }
        metas[g] = GroupMeta { m: f16::from_bits(mb[g]), s: f16::from_bits(sb[g]), bits, n_out };
        // SAFETY: the codes of groups 0..=g were written above (see the pext loop).
        unsafe { codes.set_len(len + (g + 1) * nv * nb) };
    }
    (G, None)
}

/// The outlier counts `(low, high)` of the hand-written midpoint encoders for groups of
/// `d` values at width `bits` under `spec`, or `None` where they do not apply (another
/// scheme, raw or an invalid width or length, more than one outlier on a side).
#[inline]
pub(crate) fn midpoint_counts(spec: &QuantSpec, bits: u8, d: usize) -> Option<(usize, usize)> {
    if spec.scheme != Scheme::Midpoint || bits > MAX_BITS || check_group_len(d).is_err() {
        return None;
    }
    let (k_lo, k_hi) = spec.outliers.capped(d);
    (k_lo <= 1 && k_hi <= 1).then_some((k_lo, k_hi))
}

/// The AVX2 level's encoder of one group: [`encode_midpoint`] where it applies (at most
/// one outlier per side, the default at head_dim <= 200), else the reference encoder
/// ([`portable::encode_group`], always inlined) compiled with the AVX2 set. One
/// function with the features, so that either is inlined into it.
///
/// # Safety
/// AVX2, FMA, F16C and BMI2 must be available.
#[target_feature(enable = "avx2,fma,f16c,bmi2")]
pub(crate) unsafe fn encode_group(x: &[f32], bits: u8, spec: &QuantSpec, out: &mut Sink<'_>) -> Result<GroupMeta> {
    if let Some((k_lo, k_hi)) = midpoint_counts(spec, bits, x.len()) {
        // SAFETY: the features are enabled here; the length was checked.
        return unsafe { encode_midpoint(x, bits, k_lo, k_hi, out) };
    }
    portable::encode_group(x, bits, spec, out)
}

/// Reconstructs a quantized group of width 1..=8: `out[i] = base + c_i * s`, then the
/// outliers. Same operation order (multiply, then add) as `simd::portable::decode_group`.
///
/// # Safety
/// AVX2, F16C and BMI2 available; `out.len() % 8 == 0`;
/// `codes.len() >= out.len() / 8 * bits + 8`; `1 <= bits <= 8`.
#[target_feature(enable = "avx2,fma,f16c,bmi2")]
pub(crate) unsafe fn decode_quantized(
    base: f32,
    s: f32,
    bits: u8,
    codes: &[u8],
    out_idx: &[u8],
    out_val: &[f16],
    out: &mut [f32],
) {
    let mask = lane_mask(bits);
    let (bv, sv) = (_mm256_set1_ps(base), _mm256_set1_ps(s));
    let nb = bits as usize;
    let (src, dst) = (codes.as_ptr(), out.as_mut_ptr());
    for k in 0..out.len() / 8 {
        // SAFETY: reads 8 bytes at k * nb <= codes.len() - 8; writes 8 floats inside `out`.
        unsafe {
            let w = (src.add(k * nb) as *const u64).read_unaligned();
            let c =
                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(_pdep_u64(u64::from_le(w), mask) as i64)));
            _mm256_storeu_ps(dst.add(8 * k), _mm256_add_ps(bv, _mm256_mul_ps(c, sv)));
        }
    }
    for (&i, &v) in out_idx.iter().zip(out_val) {
        if let Some(o) = out.get_mut(i as usize) {
            *o = h2f_f16c(v);
        }
    }
}
