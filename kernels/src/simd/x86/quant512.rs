//! AVX-512 (F/BW/VL/VBMI) version of the midpoint encoder of [`super::quant`]: one group
//! is `ceil(d / 16)` zmm of f32 (f16 input converted with `vcvtph2ps` as it is loaded),
//! min/max and the one-per-side outlier selection use masked reductions, codes are
//! `trunc((x - m) * (1 / s))` saturated by the `packus` chain, and 64 byte codes are
//! bit-packed at once with shifts and one `vpermb`. Bit-exact with the reference in
//! `simd::portable` (same operations in the same order for every rounding step).
//! Callers check for [`crate::simd::Level::Avx512`] first.

use crate::base::{F16_MAX, GroupMeta, Sink};
use crate::error::{KernelError, Result};
use crate::simd::input::Input;
use half::f16;
use std::arch::x86_64::*;

/// Midpoint-scheme encode of consecutive groups of `d` values (`x.len()` a multiple of
/// `d`) with at most one outlier per side, `bits` in 0..=8. Same bytes, metadata and
/// errors as one reference `simd::portable::encode_group` call per group, stopping at the first
/// failing group (the groups before it stay appended, the failing one appends nothing).
///
/// # Safety
/// the level is [`crate::simd::Level::Avx512`]; `d` a multiple of 8 in 8..=256; `k_lo, k_hi <= 1`.
pub(crate) unsafe fn encode_midpoint_many<T: Input>(
    x: &[T],
    d: usize,
    bits: u8,
    k_lo: usize,
    k_hi: usize,
    out: &mut Sink<'_>,
    metas: &mut Vec<GroupMeta>,
) -> Result<()> {
    assert!(d.is_multiple_of(8) && (8..=256).contains(&d) && x.len().is_multiple_of(d) && bits <= 8);
    assert!(k_lo <= 1 && k_hi <= 1);
    // SAFETY: features detected (contract); `d` checked above.
    unsafe {
        match (d, x.len() > d) {
            (64, true) => encode_body::<T, 4, 4>(x, d, bits, k_lo, k_hi, out, metas),
            (64, false) => encode_body::<T, 4, 1>(x, d, bits, k_lo, k_hi, out, metas),
            (128, true) => encode_body::<T, 8, 2>(x, d, bits, k_lo, k_hi, out, metas),
            (128, false) => encode_body::<T, 8, 1>(x, d, bits, k_lo, k_hi, out, metas),
            _ => encode_body::<T, 0, 1>(x, d, bits, k_lo, k_hi, out, metas),
        }
    }
}

/// Mask of the valid lanes of vector `i` of a group of `d` values.
#[inline(always)]
fn lanes<const NZ: usize>(d: usize, i: usize) -> __mmask16 {
    // NZ != 0: d == 16 NZ (all lanes valid, known at compile time).
    if NZ != 0 || 16 * i + 16 <= d { 0xffff } else { 0x00ff }
}

/// Per width, the `vpermb` indices that gather the low `b` bytes of every qword: output
/// byte `j < 8 b` comes from qword `j / b`, byte `j % b`.
static PACK_IDX: [[u8; 64]; 9] = {
    let mut t = [[0u8; 64]; 9];
    let mut b = 1;
    while b <= 8 {
        let mut j = 0;
        while j < 8 * b {
            t[b][j] = ((j / b) * 8 + j % b) as u8;
            j += 1;
        }
        b += 1;
    }
    t
};

/// Per lane: the smallest and the second smallest value seen (as a multiset).
type Pair = (__m512, __m512);

#[inline]
#[target_feature(enable = "avx512f")]
fn push_lo(p: Pair, v: __m512) -> Pair {
    (_mm512_min_ps(p.0, v), _mm512_min_ps(p.1, _mm512_max_ps(p.0, v)))
}

/// Per lane: the largest and the second largest value seen (as a multiset).
#[inline]
#[target_feature(enable = "avx512f")]
fn push_hi(p: Pair, v: __m512) -> Pair {
    (_mm512_max_ps(p.0, v), _mm512_max_ps(p.1, _mm512_min_ps(p.0, v)))
}

#[inline]
#[target_feature(enable = "avx512f")]
fn merge(a: Pair, b: Pair) -> Pair {
    (_mm512_min_ps(a.0, b.0), _mm512_min_ps(_mm512_max_ps(a.0, b.0), _mm512_min_ps(a.1, b.1)))
}

/// First level of the horizontal reduction of one group: the 8-lane reduction of `lo`
/// in the low 256 bits, of `nh` in the high ones.
#[inline]
#[target_feature(enable = "avx512f")]
fn level1(lo: Pair, nh: Pair) -> Pair {
    let a = (_mm512_shuffle_f32x4::<0x44>(lo.0, nh.0), _mm512_shuffle_f32x4::<0x44>(lo.1, nh.1));
    let b = (_mm512_shuffle_f32x4::<0xEE>(lo.0, nh.0), _mm512_shuffle_f32x4::<0xEE>(lo.1, nh.1));
    merge(a, b)
}

/// The other levels for two groups `p`, `q` (from [`level1`]): lanes 0, 4, 8, 12 of the
/// result hold the reductions of `p.lo`, `p.nh`, `q.lo`, `q.nh` (values only; the sign
/// of a zero result is irrelevant after `+ 0.0`).
#[inline]
#[target_feature(enable = "avx512f")]
fn level234(p: Pair, q: Pair) -> Pair {
    let a = (_mm512_shuffle_f32x4::<0x88>(p.0, q.0), _mm512_shuffle_f32x4::<0x88>(p.1, q.1));
    let b = (_mm512_shuffle_f32x4::<0xDD>(p.0, q.0), _mm512_shuffle_f32x4::<0xDD>(p.1, q.1));
    let r = merge(a, b);
    let r = merge(r, (_mm512_permute_ps::<0x4E>(r.0), _mm512_permute_ps::<0x4E>(r.1)));
    merge(r, (_mm512_permute_ps::<0xB1>(r.0), _mm512_permute_ps::<0xB1>(r.1)))
}

/// The body of [`encode_midpoint_many`] for `G` (1 or 2) groups in lock step, so that
/// their dependency chains overlap; `NZ` is `d / 16` rounded up when known at compile
/// time (0: at run time).
///
/// # Safety
/// As [`encode_midpoint_many`], with its assertions.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx2,fma,f16c,bmi2")]
unsafe fn encode_body<T: Input, const NZ: usize, const G: usize>(
    x: &[T],
    d: usize,
    bits: u8,
    k_lo: usize,
    k_hi: usize,
    out: &mut Sink<'_>,
    metas: &mut Vec<GroupMeta>,
) -> Result<()> {
    let Sink { codes, out_idx, out_val } = out;
    let nz = if NZ == 0 { d.div_ceil(16) } else { NZ };
    assert!(nz == d.div_ceil(16) && nz <= 16 && (NZ == 0 || d == 16 * NZ) && (1..=4).contains(&G));
    let n = x.len() / d;
    let b = bits as usize;
    let nb = d * b / 8;
    codes.reserve(n * nb);
    out_idx.reserve(n * (k_lo + k_hi));
    out_val.reserve(n * (k_lo + k_hi));
    metas.reserve(n);
    let len0 = codes.len();

    let lim = _mm512_set1_epi32((F16_MAX.to_bits() << 1) as i32);
    let (pinf, sign) = (_mm512_set1_ps(f32::INFINITY), _mm512_set1_epi32(i32::MIN));
    let top = _mm512_set1_epi8(((1u32 << bits) - 1) as u8 as i8);
    // Dword order after `packus_epi16(packus_epi32(c0, c1), packus_epi32(c2, c3))`:
    // 128-bit lane L holds dwords (c0, c1, c2, c3) of lane L; put them back in order.
    let fix = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    // SAFETY: 64 bytes.
    let pidx = unsafe { _mm512_loadu_si512(PACK_IDX[b].as_ptr() as *const _) };
    let (sh1, sh2, sh4) =
        (_mm_cvtsi32_si128(b as i32), _mm_cvtsi32_si128(2 * b as i32), _mm_cvtsi32_si128(4 * b as i32));
    let (m16, m32, m64) =
        (_mm512_set1_epi32(0x00ff_00ff), _mm512_set1_epi32(0x0000_ffff), _mm512_set1_epi64(0xffff_ffff));
    let scale = 1.0 / (1u32 << bits) as f32;

    let mut g0 = 0;
    while g0 < n {
        // Groups g0 .. g0 + gn; a missing second group repeats the first (not written).
        let gn = G.min(n - g0);
        // Fetch the input 8 groups ahead (a prefetch never faults, even past the end).
        let ahead = x.as_ptr().wrapping_add((g0 + 8) * d) as *const i8;
        for off in (0..G * d * size_of::<T>()).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(off));
        }
        let base = |g: usize| (g0 + g.min(gn - 1)) * d;
        // Only the first `nz` vectors of each group are written and read (left
        // uninitialised: zeroing all 16 per step costs a memset).
        let mut v = [[std::mem::MaybeUninit::<__m512>::uninit(); 16]; G];
        let mut big = [_mm512_setzero_si512(); G];
        let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
        let (mut lo, mut hi) = ([(pinf, pinf); G], [(ninf, ninf); G]);
        for i in 0..nz {
            let k = lanes::<NZ>(d, i);
            for g in 0..G {
                // SAFETY: lanes `16 i ..` of `k` are below `d`, so inside the group.
                let vv = unsafe { T::load16(x, base(g) + 16 * i, k) };
                v[g][i].write(vv);
                // Finiteness: |v| <= F16_MAX as ordered bit patterns of `bits << 1` (NaN
                // and inf are above); masked-off lanes are 0.
                big[g] = _mm512_max_epu32(big[g], _mm512_slli_epi32::<1>(_mm512_castps_si512(vv)));
                // The two smallest and the two largest values per lane, masked-off
                // lanes as +inf / -inf.
                lo[g] = push_lo(lo[g], _mm512_mask_blend_ps(k, pinf, vv));
                hi[g] = push_hi(hi[g], _mm512_mask_blend_ps(k, ninf, vv));
            }
        }
        // SAFETY: vectors 0..nz of every group were written in the load loop above.
        let vec = |g: usize, i: usize| unsafe { v[g][i].assume_init() };
        let mut finite = [true; G];
        for g in 0..G {
            finite[g] = _mm512_cmpgt_epu32_mask(big[g], lim) == 0;
        }
        // Horizontal reduction, two groups per register from the second level on; lane
        // g of a1/a2 (n1/n2) is the smallest/second smallest of v (of -v) of group g.
        let mut l1 = [(pinf, pinf); G];
        for g in 0..G {
            let neg = |p: __m512| _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(p), sign));
            l1[g] = level1(lo[g], (neg(hi[g].0), neg(hi[g].1)));
        }
        let r0 = level234(l1[0], l1[1 % G]);
        let r1 = if G > 2 { level234(l1[2 % G], l1[3 % G]) } else { r0 };
        let (ilo, inh) = (
            _mm512_setr_epi32(0, 8, 16, 24, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
            _mm512_setr_epi32(4, 12, 20, 28, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
        );
        let a1 = _mm512_permutex2var_ps(r0.0, ilo, r1.0);
        let n1 = _mm512_permutex2var_ps(r0.0, inh, r1.0);
        let low = |p: __m512| _mm512_castps512_ps128(p);
        let a2 = low(_mm512_permutex2var_ps(r0.1, ilo, r1.1));
        let n2 = low(_mm512_permutex2var_ps(r0.1, inh, r1.1));
        // Inlier extremes: with one outlier per side they are the second smallest /
        // largest values (the reference excludes the first minimum and the last maximum;
        // d >= 8 leaves the same values). `+ 0.0` turns -0 into +0 as the reference
        // does; directed rounding to f16; x / 2^b and x * 2^-b are the same correctly
        // rounded value.
        let zero4 = _mm_setzero_ps();
        let neg = |p: __m128| _mm_castsi128_ps(_mm_xor_si128(_mm_castps_si128(p), _mm_set1_epi32(i32::MIN)));
        let mn4 = _mm_add_ps(if k_lo == 1 { a2 } else { low(a1) }, zero4);
        let mx4 = _mm_add_ps(neg(if k_hi == 1 { n2 } else { low(n1) }), zero4);
        let mh4 = _mm_cvtps_ph::<_MM_FROUND_TO_NEG_INF>(mn4);
        let mf4 = _mm_cvtph_ps(mh4);
        let sh4v = _mm_cvtps_ph::<_MM_FROUND_TO_POS_INF>(_mm_mul_ps(_mm_sub_ps(mx4, mf4), _mm_set1_ps(scale)));
        let sf4 = _mm_cvtph_ps(sh4v);
        let inv4 = _mm_div_ps(_mm_set1_ps(1.0), sf4);
        let (mut mh, mut sh, mut sf) = ([0u16; 8], [0u16; 8], [0f32; 4]);
        // SAFETY: 8 u16 / 4 f32 each.
        unsafe {
            _mm_storeu_si128(mh.as_mut_ptr() as *mut __m128i, mh4);
            _mm_storeu_si128(sh.as_mut_ptr() as *mut __m128i, sh4v);
            _mm_storeu_ps(sf.as_mut_ptr(), sf4);
        }
        let lane = |p: __m512, g: usize| _mm512_permutexvar_ps(_mm512_set1_epi32(g as i32), p);
        let (mf16, inv16) = (_mm512_castps128_ps512(mf4), _mm512_castps128_ps512(inv4));
        let (mut ex0, mut ex1) = ([usize::MAX; G], [usize::MAX; G]);
        if k_lo + k_hi > 0 {
            for g in 0..G {
                // The reference's outliers: the first minimum and the last maximum (by
                // value equality, so +0 == -0), the maximum moved off the minimum.
                let (vmn, vmx) = (lane(a1, g), lane(n1, g));
                let vmx = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(vmx), sign));
                // Equality masks, 64 positions per word (4 words for d = 256).
                let (mut wlo, mut whi) = ([0u64; 4], [0u64; 4]);
                for i in 0..nz {
                    let k = lanes::<NZ>(d, i);
                    wlo[i / 4] |= (_mm512_mask_cmp_ps_mask::<_CMP_EQ_OQ>(k, vec(g, i), vmn) as u64) << (16 * (i % 4));
                    whi[i / 4] |= (_mm512_mask_cmp_ps_mask::<_CMP_EQ_OQ>(k, vec(g, i), vmx) as u64) << (16 * (i % 4));
                }
                let (mut imin, mut imax) = (0usize, 0usize);
                for j in (0..nz.div_ceil(4)).rev() {
                    if wlo[j] != 0 {
                        imin = 64 * j + wlo[j].trailing_zeros() as usize;
                    }
                }
                for j in 0..nz.div_ceil(4) {
                    if whi[j] != 0 {
                        imax = 64 * j + 63 - whi[j].leading_zeros() as usize;
                    }
                }
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
        for g in 0..G {
            if b == 0 || g >= gn {
                continue;
            }
            // SAFETY: capacity >= len0 + n * nb (reserved above) and g0 + g < n, so the
            // group's nb bytes at len0 + (g0 + g) * nb are inside the allocation (the
            // length is only set once they are all written).
            let dst = unsafe { codes.as_mut_ptr().add(len0 + (g0 + g) * nb) };
            if sf[g] <= 0.0 || !finite[g] {
                // SAFETY: see `dst`.
                unsafe { std::ptr::write_bytes(dst, 0, nb) };
                continue;
            }
            let (iv, mv) = (lane(inv16, g), lane(mf16, g));
            for blk in 0..nz.div_ceil(4) {
                // Codes 64 blk .. 64 blk + 64 as bytes: trunc((v - m) * inv), negative
                // or overflowing conversions saturate to 0 in `packus` (only outliers
                // get there, and their code is 0), then clamp to 2^b - 1 and zero the
                // outliers' codes. All zero when the step is zero (above).
                let c = |q: usize| {
                    let i = 4 * blk + q;
                    if i < nz {
                        _mm512_cvttps_epi32(_mm512_mul_ps(_mm512_sub_ps(vec(g, i), mv), iv))
                    } else {
                        _mm512_setzero_si512()
                    }
                };
                let w = _mm512_packus_epi16(_mm512_packus_epi32(c(0), c(1)), _mm512_packus_epi32(c(2), c(3)));
                let w = _mm512_permutexvar_epi32(fix, w);
                let bit64 = |e: usize| if e / 64 == blk { 1u64 << (e % 64) } else { 0 };
                let w = _mm512_maskz_min_epu8(!(bit64(ex0[g]) | bit64(ex1[g])), w, top);
                // Pack: 16-bit lanes (c0 | c1 << b), 32-bit (.. | .. << 2b), 64-bit
                // (.. | .. << 4b); 0xEA: (a & b) | c. Then gather the low b bytes of
                // every qword.
                let w = _mm512_ternarylogic_epi32::<0xEA>(w, m16, _mm512_sll_epi16(_mm512_srli_epi16::<8>(w), sh1));
                let w = _mm512_ternarylogic_epi32::<0xEA>(w, m32, _mm512_sll_epi32(_mm512_srli_epi32::<16>(w), sh2));
                let w = _mm512_ternarylogic_epi64::<0xEA>(w, m64, _mm512_sll_epi64(_mm512_srli_epi64::<32>(w), sh4));
                let w = _mm512_permutexvar_epi8(pidx, w);
                let bytes = (d - 64 * blk).min(64) * b / 8;
                let keep = if bytes >= 64 { u64::MAX } else { (1u64 << bytes) - 1 };
                // SAFETY: bytes 8 blk b .. 8 blk b + bytes lie inside the group's nb.
                unsafe { _mm512_mask_storeu_epi8(dst.add(8 * blk * b) as *mut i8, keep, w) };
            }
        }
        for g in 0..gn {
            if !finite[g] {
                return Err(KernelError::NonFinite { what: "group" });
            }
            if sh[g] & 0x7c00 == 0x7c00 {
                return Err(KernelError::NonFinite { what: "group range" });
            }
            let mut n_out = 0u8;
            let (a, z) = if ex0[g] > ex1[g] { (ex1[g], ex0[g]) } else { (ex0[g], ex1[g]) };
            for e in [a, z] {
                if e != usize::MAX {
                    out_idx.push(e as u8);
                    // SAFETY: F16C is enabled in this function.
                    out_val.push(f16::from_bits(unsafe { x[base(g) + e].half_bits() }));
                    n_out += 1;
                }
            }
            metas.push(GroupMeta { m: f16::from_bits(mh[g]), s: f16::from_bits(sh[g]), bits, n_out });
            // SAFETY: the nb code bytes of groups ..= g0 + g were all written above.
            unsafe { codes.set_len(len0 + (g0 + g + 1) * nb) };
        }
        g0 += gn;
    }
    Ok(())
}

/// Per width, the `vpermb` indices that give qword `k` the bytes `k b .. k b + 8` of a
/// block of packed codes (codes `8 k .. 8 k + 8` start at bit 0 of them).
static SPREAD_IDX: [[u8; 64]; 9] = {
    let mut t = [[0u8; 64]; 9];
    let mut b = 1;
    while b <= 8 {
        let mut j = 0;
        while j < 64 {
            t[b][j] = ((j / 8) * b + j % 8) as u8;
            j += 1;
        }
        b += 1;
    }
    t
};

/// Per width, the `vpmultishiftqb` bit offsets: byte `i` of each qword takes the 8 bits
/// from bit `i b`.
static SHIFT_CTL: [[u8; 64]; 9] = {
    let mut t = [[0u8; 64]; 9];
    let mut b = 1;
    while b <= 8 {
        let mut j = 0;
        while j < 64 {
            t[b][j] = ((j % 8) * b) as u8;
            j += 1;
        }
        b += 1;
    }
    t
};

/// The `n` (at most 64, a multiple of 8) codes of width `bits` (1..=8) packed at `p`, one
/// per byte (bytes past `n` zero): [`Unpack::new`] then [`Unpack::load`].
///
/// # Safety
/// `1 <= bits <= 8`, `n <= 64`; `n * bits / 8` bytes readable at `p`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
pub(crate) unsafe fn codes64(p: *const u8, bits: u8, n: usize) -> __m512i {
    // SAFETY: per the contract.
    unsafe { Unpack::new(bits, n).load(p) }
}

/// The constants that unpack groups of `n` codes of one width, for a loop over many
/// groups of that width (a block quantized at one width): the `n * bits / 8` code bytes
/// are loaded under a mask, spread so that qword `k` starts with code `8 k` (`vpermb`),
/// shifted into place byte by byte (`vpmultishiftqb`) and masked to the width.
#[derive(Clone, Copy)]
pub(crate) struct Unpack {
    spread: __m512i,
    ctl: __m512i,
    keep: u64,
    width: __m512i,
}

impl Unpack {
    /// # Safety
    /// `1 <= bits <= 8`, `n <= 64`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
    pub(crate) unsafe fn new(bits: u8, n: usize) -> Unpack {
        let b = bits as usize;
        debug_assert!((1..=8).contains(&b) && n <= 64);
        let bytes = n * b / 8;
        let keep = if bytes >= 64 { u64::MAX } else { (1u64 << bytes) - 1 };
        let lanes = if n >= 64 { u64::MAX } else { (1u64 << n) - 1 };
        // SAFETY: the tables hold 64 bytes per width.
        unsafe {
            Unpack {
                spread: _mm512_loadu_si512(SPREAD_IDX[b].as_ptr() as *const _),
                ctl: _mm512_loadu_si512(SHIFT_CTL[b].as_ptr() as *const _),
                keep,
                width: _mm512_maskz_set1_epi8(lanes, ((1u32 << b) - 1) as u8 as i8),
            }
        }
    }

    /// The group's codes at `p`, one per byte (bytes past `n` zero).
    ///
    /// # Safety
    /// `n * bits / 8` bytes readable at `p` (the masked load reads no others).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
    pub(crate) unsafe fn load(&self, p: *const u8) -> __m512i {
        // SAFETY: per the contract.
        let w = unsafe { _mm512_maskz_loadu_epi8(self.keep, p as *const i8) };
        self.place(w)
    }

    /// [`Unpack::load`] where `avail` bytes are readable at `p`: with 64 or more, one plain
    /// load (the bytes past the group's are masked off all the same).
    ///
    /// # Safety
    /// `avail` bytes readable at `p`, `avail >= n * bits / 8`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
    pub(crate) unsafe fn load_in(&self, p: *const u8, avail: usize) -> __m512i {
        if avail >= 64 {
            // SAFETY: 64 bytes readable at `p`.
            self.place(unsafe { _mm512_loadu_si512(p as *const _) })
        } else {
            // SAFETY: per the contract.
            unsafe { self.load(p) }
        }
    }

    /// The codes of the loaded bytes `w`: spread, shifted, masked to the width (bytes
    /// of `w` past the group's never reach a code).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
    fn place(&self, w: __m512i) -> __m512i {
        _mm512_and_si512(_mm512_multishift_epi64_epi8(self.ctl, _mm512_permutexvar_epi8(self.spread, w)), self.width)
    }
}

/// Reconstructs a quantized group of width 1..=8: `out[i] = base + c_i * s` (multiply,
/// then add, as `simd::portable::decode_group`), then the outliers. Reads only the group's
/// code bytes.
///
/// # Safety
/// the level is [`crate::simd::Level::Avx512`]; `out.len()` a multiple of 8, at most 256;
/// `codes.len() >= out.len() * bits / 8`; `1 <= bits <= 8`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx2,fma,f16c,bmi2")]
pub(crate) unsafe fn decode_quantized(
    base: f32,
    s: f32,
    bits: u8,
    codes: &[u8],
    out_idx: &[u8],
    out_val: &[f16],
    out: &mut [f32],
) {
    let (b, d) = (bits as usize, out.len());
    assert!((1..=8).contains(&b) && d.is_multiple_of(8) && d <= 256 && codes.len() >= d * b / 8);
    let (bv, sv) = (_mm512_set1_ps(base), _mm512_set1_ps(s));
    for blk in 0..d.div_ceil(64) {
        let cnt = (d - 64 * blk).min(64);
        // SAFETY: bytes 8 blk b .. 8 blk b + cnt b / 8 are inside `codes` (asserted length).
        let w = unsafe { codes64(codes.as_ptr().add(8 * blk * b), bits, cnt) };
        let c = [
            _mm512_castsi512_si128(w),
            _mm512_extracti32x4_epi32::<1>(w),
            _mm512_extracti32x4_epi32::<2>(w),
            _mm512_extracti32x4_epi32::<3>(w),
        ];
        for (q, cq) in c.into_iter().enumerate() {
            let off = 64 * blk + 16 * q;
            if off >= d {
                break;
            }
            let k: __mmask16 = if off + 16 <= d { 0xffff } else { 0x00ff };
            let y = _mm512_add_ps(bv, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(cq)), sv));
            // SAFETY: the lanes of `k` are below `d`, inside `out`.
            unsafe { _mm512_mask_storeu_ps(out.as_mut_ptr().add(off), k, y) };
        }
    }
    for (&i, &v) in out_idx.iter().zip(out_val) {
        if let Some(o) = out.get_mut(i as usize) {
            *o = v.to_f32();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_tables_gather_the_low_bytes() {
        for (b, t) in PACK_IDX.iter().enumerate().skip(1) {
            for (j, &q) in t.iter().enumerate().take(8 * b) {
                let q = q as usize;
                assert_eq!((q / 8, q % 8), (j / b, j % b));
            }
        }
    }
}
