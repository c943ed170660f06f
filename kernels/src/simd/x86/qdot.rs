//! x86-64 kernels of the quantized matmul for the 32-value formats (`Q4_0`, `Q4_1`,
//! `Q5_0`, `Q5_1`, `Q8_0`) and the activation quantizer, at two instruction sets
//! ([`Isa`]): AVX2 (`maddubs`/`madd`) and AVX-512 VNNI (`vpdpbusd` on 256-bit vectors).
//!
//! Each call computes `R` outputs (one weight row against `R` activation rows), sharing
//! the unpacking of every weight block. Per group of 8 blocks, each row's 8 per-block
//! integer sums (exact) are gathered into one vector by a fixed tree of horizontal adds,
//! then enter the row's 8 f32 lanes in the order of `simd::qref::dot_b32` (lane = block
//! mod 8): every output equals the reference bit for bit, whatever `R` and the level.

use crate::simd::ggml::QFormat;
use crate::simd::prim::x86::hsum;
use crate::simd::qref::InRow;
use std::arch::x86_64::*;

/// Format codes of the const parameter `F`.
pub(crate) const Q4_0: u8 = 0;
pub(crate) const Q4_1: u8 = 1;
pub(crate) const Q5_0: u8 = 2;
pub(crate) const Q5_1: u8 = 3;
pub(crate) const Q8_0: u8 = 4;

/// The const code of a 32-value format.
pub(crate) fn code(f: QFormat) -> u8 {
    match f {
        QFormat::Q4_0 => Q4_0,
        QFormat::Q4_1 => Q4_1,
        QFormat::Q5_0 => Q5_0,
        QFormat::Q5_1 => Q5_1,
        QFormat::Q8_0 => Q8_0,
        _ => unreachable!("not a 32-value format: {f}"),
    }
}

/// The integer instructions one level uses. Implementations are `#[inline(always)]` and
/// run only inside the entry points below, compiled with the level's features.
pub(crate) trait Isa {
    /// Whether `vpdpbusd` is available (the GEMMs then accumulate with it).
    const VNNI: bool;
    /// Whether `Q8_0` weights are unpacked biased (`w + 128`, unsigned; the sums then
    /// lose `128 * sum(x)`), else signed.
    const Q8_BIASED: bool;
    /// Per 32-bit lane, the sum of four products of unsigned bytes of `a` with signed
    /// bytes of `b` (exact for the codes used here).
    unsafe fn dot(a: __m256i, b: __m256i) -> __m256i;
    /// The same for signed weight bytes `w` (`Q8_0` when not biased).
    unsafe fn dot_signed(w: __m256i, b: __m256i) -> __m256i;
    /// Byte `i` = 0xFF when bit `i` of `bits` is set, else 0.
    unsafe fn bit_bytes(bits: u32) -> __m256i;
}

/// AVX2: `maddubs` then `madd` with ones.
pub(crate) struct Avx2;
/// AVX-512 VNNI (with BW and VL): `vpdpbusd`, mask-register bit expansion.
pub(crate) struct Vnni;

impl Isa for Avx2 {
    const VNNI: bool = false;
    const Q8_BIASED: bool = false;
    #[inline(always)]
    unsafe fn dot(a: __m256i, b: __m256i) -> __m256i {
        // SAFETY: inlined into functions compiled with AVX2 (the caller's contract).
        // Pairs of products are at most 2 * 63 * 127 for the unsigned codes here: no
        // i16 saturation.
        unsafe { _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)) }
    }
    #[inline(always)]
    unsafe fn dot_signed(w: __m256i, b: __m256i) -> __m256i {
        // SAFETY: as `dot`; |w| <= 128 and |b| <= 127 keep pairs within i16.
        unsafe { Self::dot(_mm256_sign_epi8(w, w), _mm256_sign_epi8(b, w)) }
    }
    #[inline(always)]
    unsafe fn bit_bytes(bits: u32) -> __m256i {
        // SAFETY: AVX2 (the caller's contract). Byte i takes byte i / 8 of `bits`, keeps
        // bit i % 8 (all other bits forced to 1) and compares with all ones.
        unsafe {
            let v = _mm256_shuffle_epi8(
                _mm256_set1_epi32(bits as i32),
                _mm256_setr_epi64x(0, 0x0101_0101_0101_0101, 0x0202_0202_0202_0202, 0x0303_0303_0303_0303),
            );
            let v = _mm256_or_si256(v, _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe_u64 as i64));
            _mm256_cmpeq_epi8(v, _mm256_set1_epi64x(-1))
        }
    }
}

impl Isa for Vnni {
    const VNNI: bool = true;
    const Q8_BIASED: bool = true;
    #[inline(always)]
    unsafe fn dot(a: __m256i, b: __m256i) -> __m256i {
        // SAFETY: inlined into functions compiled with AVX-512 VNNI and VL.
        unsafe { _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b) }
    }
    #[inline(always)]
    unsafe fn dot_signed(w: __m256i, b: __m256i) -> __m256i {
        // SAFETY: as `dot`.
        unsafe { Self::dot(_mm256_sign_epi8(w, w), _mm256_sign_epi8(b, w)) }
    }
    #[inline(always)]
    unsafe fn bit_bytes(bits: u32) -> __m256i {
        // SAFETY: inlined into functions compiled with AVX-512 BW and VL.
        unsafe { _mm256_movm_epi8(bits) }
    }
}

/// Unpacks the 32 codes of the block at `p` into bytes, value `i` in byte `i`: unsigned
/// codes (no offset) for the 4- and 5-bit formats, `Q8_0` biased or signed per [`Isa`].
///
/// # Safety
/// AVX2 (and the ISA's features); `p` points to a whole block of format `F`.
#[inline(always)]
pub(crate) unsafe fn unpack<const F: u8, I: Isa>(p: *const u8) -> __m256i {
    // SAFETY: the reads stay within the block (offsets and lengths of ggml's layouts).
    unsafe {
        match F {
            Q4_0 => nibbles(p.add(2)),
            Q4_1 => nibbles(p.add(4)),
            Q5_0 => _mm256_or_si256(nibbles(p.add(6)), fifth_bits::<I>(p.add(2))),
            Q5_1 => _mm256_or_si256(nibbles(p.add(8)), fifth_bits::<I>(p.add(4))),
            _ => {
                let w = _mm256_loadu_si256(p.add(2) as *const __m256i);
                if I::Q8_BIASED { _mm256_xor_si256(w, _mm256_set1_epi8(-128)) } else { w }
            }
        }
    }
}

/// 16 bytes of nibbles at `p` as 32 bytes: the low nibbles, then the high ones.
///
/// # Safety
/// AVX2; 16 readable bytes at `p`.
#[inline(always)]
unsafe fn nibbles(p: *const u8) -> __m256i {
    // SAFETY: the caller's contract.
    unsafe {
        let q = _mm_loadu_si128(p as *const __m128i);
        _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), _mm256_set1_epi8(0x0F))
    }
}

/// The fifth bits (a little-endian u32 at `p`) as 0x10 in the bytes whose bit is set.
///
/// # Safety
/// AVX2 (and the ISA's features); 4 readable bytes at `p`.
#[inline(always)]
unsafe fn fifth_bits<I: Isa>(p: *const u8) -> __m256i {
    // SAFETY: the caller's contract.
    unsafe {
        let bits = u32::from_le_bytes(std::ptr::read_unaligned(p as *const [u8; 4]));
        _mm256_and_si256(I::bit_bytes(bits), _mm256_set1_epi8(0x10))
    }
}

/// What the per-block sums lose: `OFF * sum(x)` (`Q4_0`: 8, `Q5_0`: 16, biased `Q8_0`:
/// 128), as a shift.
pub(crate) const fn offset_shift<const F: u8>(biased: bool) -> Option<i32> {
    match F {
        Q4_0 => Some(3),
        Q5_0 => Some(4),
        Q8_0 if biased => Some(7),
        _ => None,
    }
}

/// The per-block integer sums of `cnt` (<= 8) consecutive blocks starting at `blk` with
/// `R` activation rows (codes from block `b0`), lane `t` holding block `t` (0 past
/// `cnt`).
///
/// # Safety
/// AVX2 (and the ISA's features); `cnt` whole blocks at `blk`; each row holds
/// `32 * (b0 + cnt)` codes.
#[inline(always)]
unsafe fn block_sums<const F: u8, const R: usize, I: Isa>(
    blk: *const u8,
    bb: usize,
    xs: &[InRow<'_>; R],
    b0: usize,
    cnt: usize,
) -> [__m256i; R] {
    // SAFETY: blocks t < cnt and their codes are in bounds (the caller's contract).
    unsafe {
        let z = _mm256_setzero_si256();
        let mut pair = [[z; 4]; R];
        let mut half = [[z; 2]; R];
        for k in 0..4 {
            let mut v = [[z; 2]; R];
            for (u, t) in [2 * k, 2 * k + 1].into_iter().enumerate() {
                if t < cnt {
                    let w = unpack::<F, I>(blk.add(t * bb));
                    for r in 0..R {
                        let x = _mm256_loadu_si256(xs[r].qs.as_ptr().add(32 * (b0 + t)) as *const __m256i);
                        v[r][u] = if F == Q8_0 && !I::Q8_BIASED { I::dot_signed(w, x) } else { I::dot(w, x) };
                    }
                }
            }
            for r in 0..R {
                pair[r][k] = _mm256_hadd_epi32(v[r][0], v[r][1]);
                if k % 2 == 1 {
                    half[r][k / 2] = _mm256_hadd_epi32(pair[r][k - 1], pair[r][k]);
                }
            }
        }
        let mut out = [z; R];
        for r in 0..R {
            let (a, b) = (half[r][0], half[r][1]);
            out[r] = _mm256_add_epi32(_mm256_permute2x128_si256::<0x20>(a, b), _mm256_permute2x128_si256::<0x31>(a, b));
        }
        out
    }
}

/// Bytes per block of format `F`.
pub(crate) const fn block_bytes<const F: u8>() -> usize {
    match F {
        Q4_0 => 18,
        Q4_1 => 20,
        Q5_0 => 22,
        Q5_1 => 24,
        _ => 34,
    }
}

/// The f32 scales and (for `Q4_1`/`Q5_1`) minimums of the `cnt` (1..=8) blocks at
/// `blk`, lanes past `cnt` zero, from the first 4 bytes of each block.
///
/// # Safety
/// AVX2 and F16C; `cnt` whole blocks of format `F` at `blk`.
#[inline(always)]
pub(crate) unsafe fn scales<const F: u8>(blk: *const u8, cnt: usize) -> (__m256, __m256) {
    let bb = block_bytes::<F>();
    // SAFETY: reads 4 bytes at the start of each of the `cnt` blocks (a gather
    // instruction is slower here).
    unsafe {
        let rd = |t: usize| if t < cnt { std::ptr::read_unaligned(blk.add(t * bb) as *const i32) } else { 0 };
        let v = _mm256_setr_epi32(rd(0), rd(1), rd(2), rd(3), rd(4), rd(5), rd(6), rd(7));
        let low = _mm256_and_si256(v, _mm256_set1_epi32(0xFFFF));
        // [d0..d4, m0..m4 | d4..d8, m4..m8] as u16, then [d0..d8, m0..m8].
        let halves = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packus_epi32(low, _mm256_srli_epi32::<16>(v)));
        (_mm256_cvtph_ps(_mm256_castsi256_si128(halves)), _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(halves)))
    }
}

/// Dot products of `n` weight rows (`nb` blocks each, consecutive at `w`) with `R`
/// activation rows: `res[j * R + r]` = row `j` times row `r`.
///
/// # Safety
/// AVX2, F16C (and the ISA's features); `w` holds `n * nb` blocks of format `F`; every
/// row's `d`, `sums`, `s` hold `nb` rounded up to a multiple of 8 entries (zero padded),
/// its codes `32 * nb`; `res` holds `n * R` floats.
#[inline(always)]
unsafe fn task<const F: u8, const R: usize, I: Isa>(
    w: *const u8,
    n: usize,
    nb: usize,
    xs: &[InRow<'_>; R],
    res: *mut f32,
) {
    let bb = block_bytes::<F>();
    let has_min = F == Q4_1 || F == Q5_1;
    // SAFETY: every access is within the bounds of the caller's contract.
    unsafe {
        for j in 0..n {
            let wr = w.add(j * nb * bb);
            let mut acc = [_mm256_setzero_ps(); R];
            let mut g = 0;
            while g < nb {
                let cnt = (nb - g).min(8);
                let blk = wr.add(g * bb);
                let (dwv, mwv) = scales::<F>(blk, cnt);
                let sums = if cnt == 8 {
                    block_sums::<F, R, I>(blk, bb, xs, g, 8)
                } else {
                    block_sums::<F, R, I>(blk, bb, xs, g, cnt)
                };
                for r in 0..R {
                    let mut s = sums[r];
                    if let Some(sh) = offset_shift::<F>(I::Q8_BIASED) {
                        let xsum = _mm256_loadu_si256(xs[r].sums.as_ptr().add(g) as *const __m256i);
                        s = _mm256_sub_epi32(s, _mm256_sll_epi32(xsum, _mm_cvtsi32_si128(sh)));
                    }
                    let dd = _mm256_mul_ps(dwv, _mm256_loadu_ps(xs[r].d.as_ptr().add(g)));
                    acc[r] = _mm256_add_ps(acc[r], _mm256_mul_ps(dd, _mm256_cvtepi32_ps(s)));
                    if has_min {
                        let sx = _mm256_loadu_ps(xs[r].s.as_ptr().add(g));
                        acc[r] = _mm256_add_ps(acc[r], _mm256_mul_ps(mwv, sx));
                    }
                }
                g += 8;
            }
            for (r, &a) in acc.iter().enumerate() {
                *res.add(j * R + r) = hsum(a);
            }
        }
    }
}

/// Checks the slice bounds of [`task`]'s contract.
fn check<const F: u8, const R: usize>(w: &[u8], n: usize, nb: usize, xs: &[InRow<'_>; R], res: &[f32]) {
    let nbp = nb.div_ceil(8) * 8;
    assert!(w.len() >= n * nb * block_bytes::<F>() && res.len() >= n * R);
    assert!(xs.iter().all(|x| x.qs.len() >= 32 * nb && x.d.len() >= nbp && x.sums.len() >= nbp && x.s.len() >= nbp));
}

/// [`task`] with AVX2: `res[j * R + r]` = weight row `j` of `w` (`n` rows of `nb`
/// blocks) times activation row `xs[r]`.
///
/// # Safety
/// The CPU supports AVX2, FMA and F16C. (Bounds are checked.)
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn task_avx2<const F: u8, const R: usize>(
    w: &[u8],
    n: usize,
    nb: usize,
    xs: &[InRow<'_>; R],
    res: &mut [f32],
) {
    check::<F, R>(w, n, nb, xs, res);
    // SAFETY: the features are enabled here; bounds checked above.
    unsafe { task::<F, R, Avx2>(w.as_ptr(), n, nb, xs, res.as_mut_ptr()) }
}

/// [`task`] with AVX-512 VNNI.
///
/// # Safety
/// The CPU supports AVX2, FMA, F16C and AVX-512 F, BW, VL and VNNI. (Bounds are
/// checked.)
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) unsafe fn task_vnni<const F: u8, const R: usize>(
    w: &[u8],
    n: usize,
    nb: usize,
    xs: &[InRow<'_>; R],
    res: &mut [f32],
) {
    check::<F, R>(w, n, nb, xs, res);
    // SAFETY: the features are enabled here; bounds checked above.
    unsafe { task::<F, R, Vnni>(w.as_ptr(), n, nb, xs, res.as_mut_ptr()) }
}

/// The largest lane (exact: max is order-independent for finite values).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn hmax(v: __m256) -> f32 {
    let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<0b01>(m, m)))
}

/// The sum of 8 i32 lanes (exact).
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) fn hsum_i32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32::<0b00_00_00_01>(s)))
}

/// `round(v)`, half away from zero (Rust's `f32::round`), in every lane: the nearest
/// integer, except that an exact half goes to the integer away from zero.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn round_away(v: __m256) -> __m256 {
    let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(v);
    let nearest = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
    let sign = _mm256_set1_ps(-0.0);
    // v - t is exact (|v| < 2^23 here); a half is the only case the two roundings differ on.
    let half = _mm256_cmp_ps::<_CMP_EQ_OQ>(_mm256_andnot_ps(sign, _mm256_sub_ps(v, t)), _mm256_set1_ps(0.5));
    let away = _mm256_add_ps(t, _mm256_or_ps(_mm256_and_ps(v, sign), _mm256_set1_ps(1.0)));
    _mm256_blendv_ps(nearest, away, half)
}

/// The codes `round(x * scale)` of 32 values as bytes (in order) and their sum.
///
/// # Safety
/// AVX2 and FMA; `x` and `q` hold 32 values.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn codes32(x: &[f32], scale: __m256, q: &mut [i8]) -> (i32, i32) {
    let perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let mut v = [_mm256_setzero_si256(); 4];
    for (k, v) in v.iter_mut().enumerate() {
        // SAFETY: 32 values in `x`.
        let xs = unsafe { _mm256_loadu_ps(x.as_ptr().add(8 * k)) };
        *v = _mm256_cvtps_epi32(round_away(_mm256_mul_ps(xs, scale)));
    }
    let bytes =
        _mm256_permutevar8x32_epi32(_mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3])), perm);
    // SAFETY: `q` holds 32 bytes.
    unsafe { _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, bytes) };
    (hsum_i32(_mm256_add_epi32(v[0], v[1])), hsum_i32(_mm256_add_epi32(v[2], v[3])))
}

/// The largest magnitude of the values of `x` (a multiple of 8).
///
/// # Safety
/// AVX2 and FMA.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn amax(x: &[f32]) -> f32 {
    let sign = _mm256_set1_ps(-0.0);
    let mut m = _mm256_setzero_ps();
    for c in x.chunks_exact(8) {
        // SAFETY: 8 values.
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, unsafe { _mm256_loadu_ps(c.as_ptr()) }));
    }
    hmax(m)
}

/// One 32-value block quantized exactly as `simd::qref::quantize_block32` does:
/// `(d, sum, s)`.
///
/// # Safety
/// AVX2 and FMA; `x` and `q` hold 32 values.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn quantize32(x: &[f32], q: &mut [i8]) -> (f32, i32, f32) {
    // SAFETY: the caller's contract.
    let d = unsafe { amax(x) } / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    // SAFETY: the caller's contract.
    let (lo, hi) = unsafe { codes32(x, _mm256_set1_ps(id), q) };
    let sum = lo + hi;
    let dh = half::f16::from_f32(d).to_f32();
    (dh, sum, half::f16::from_f32(half::f16::from_f32(sum as f32).to_f32() * dh).to_f32())
}

/// One 256-value block quantized exactly as `simd::qref::quantize_block256` does, the
/// sums of every 16 codes into `sums`; returns the scale.
///
/// # Safety
/// AVX2 and FMA; `x` and `q` hold 256 values, `sums` 16.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn quantize256(x: &[f32], q: &mut [i8], sums: &mut [i32]) -> f32 {
    // SAFETY: the caller's contract.
    let amax = unsafe { amax(x) };
    if amax == 0.0 {
        q.fill(0);
        sums.fill(0);
        return 0.0;
    }
    // The first value of that magnitude, with its sign (the reference's scan).
    let max = x.iter().copied().find(|v| v.abs() == amax).unwrap_or(amax);
    let iscale = -127.0 / max;
    for (b, (xb, qb)) in x.chunks_exact(32).zip(q.chunks_exact_mut(32)).enumerate() {
        // SAFETY: 32 values and codes; |iscale * x| <= 127 up to rounding, and the
        // packs saturate at 127 exactly as the reference's `min(127)`.
        let (lo, hi) = unsafe { codes32(xb, _mm256_set1_ps(iscale), qb) };
        sums[2 * b] = lo;
        sums[2 * b + 1] = hi;
    }
    1.0 / iscale
}
