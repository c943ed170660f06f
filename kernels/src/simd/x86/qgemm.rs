//! The GEMM of the quantized matmul's 32-value formats, for many activation rows at
//! once (prefill), with AVX-512 VNNI or AVX2.
//!
//! A task's weight rows are first unpacked into unsigned code bytes (`Q8_0` biased by
//! 128, VNNI only) *interleaved by groups of 8 blocks* ([`pack_vnni`], [`pack_avx2`]):
//! vector `k` of a group holds bytes `4k..4k+4` of each of its 8 blocks, block `t` in
//! 32-bit lane `t`; the activation codes are interleaved alike ([`interleave`]). Then each
//! product of a weight vector with an activation vector adds to lane `t` the products of
//! block `t` only: with VNNI one `vpdpbusd` per vector; with AVX2 `maddubs` into 16-bit
//! lanes for as many vectors as the codes' range keeps exact ([`i16_steps`]), then `madd`
//! into the 32-bit lanes. No horizontal adds; register tiles (4 activation rows x 2
//! weight rows with VNNI's 32 registers, 2 x 2 with AVX2's 16) share the loads. The
//! per-block sums are exact and enter the f32 lanes exactly as in
//! `simd::qref::dot_b32` (lane = block mod 8): every output equals the reference, and
//! the single-row kernels, bit for bit.
//!
//! Weights stored interleaved since load (`simd::qdot`'s interleaved layout: each group
//! of 8 blocks holds its code bytes 4 by 4 in block order, then its scales and minimums)
//! skip the packing: the tiles read them where they lie ([`gemm_interleaved_vnni`]),
//! splitting each 4-bit byte vector into its two code vectors, at every number of rows.

use super::qdot::{Avx2, Isa, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Vnni, block_bytes, offset_shift, scales, unpack};
use crate::simd::prim::x86::hsum;
use crate::simd::qref::{InRow, OutTile};
use std::arch::x86_64::*;

/// Weight rows repacked for [`gemm`]: interleaved unsigned codes (`32 * nbp` bytes per
/// row), and f32 scales and minimums (`nbp` per row), zero past the row's blocks.
#[derive(Default)]
pub(crate) struct Packed {
    q: Vec<u8>,
    d: Vec<f32>,
    m: Vec<f32>,
    nbp: usize,
}

/// The weight rows a GEMM reads: code vector `k` (0..8; unsigned bytes, lane `t` holding
/// codes `4k..4k + 4` of block `t`) and the f32 scales and minimums (0 past the row's
/// blocks, as the codes) of each group of 8 blocks.
pub(crate) trait Weights {
    /// Groups of 8 blocks per row (the last may be partial).
    fn groups(&self) -> usize;
    /// Code vectors `k` and `k + 4` (`k` < 4) of group `g` of row `j` (for 4-bit codes,
    /// the low and high nibbles of the same bytes).
    ///
    /// # Safety
    /// AVX2 (and the ISA's features); `j`, `g`, `k` in range.
    unsafe fn codes<const F: u8, I: Isa>(&self, j: usize, g: usize, k: usize) -> [__m256i; 2];
    /// Asks for bytes that come some groups after group `g` of row `j` (no-op where they
    /// are in cache anyway).
    #[inline(always)]
    fn prefetch<const F: u8>(&self, j: usize, g: usize) {
        let _ = (j, g);
    }
    /// The scales and minimums (zero without) of group `g` of row `j`.
    ///
    /// # Safety
    /// As [`Weights::codes`].
    unsafe fn scales<const F: u8>(&self, j: usize, g: usize) -> (__m256, __m256);
}

impl Packed {
    /// Sizes the buffers for `n` rows of `nb` blocks (rounded up to groups of 8); the
    /// packer then writes every byte, scale and minimum, padding included.
    fn size_for(&mut self, n: usize, nb: usize) {
        self.nbp = nb.div_ceil(8) * 8;
        self.q.resize(n * self.nbp * 32, 0);
        self.d.resize(n * self.nbp, 0.0);
        self.m.resize(n * self.nbp, 0.0);
    }
}

impl Weights for Packed {
    #[inline(always)]
    fn groups(&self) -> usize {
        self.nbp / 8
    }

    #[inline(always)]
    unsafe fn codes<const F: u8, I: Isa>(&self, j: usize, g: usize, k: usize) -> [__m256i; 2] {
        // SAFETY: row `j` is packed (the caller's contract): `32 * nbp` bytes.
        unsafe {
            let p = self.q.as_ptr().add(j * self.nbp * 32 + 256 * g + 32 * k);
            [_mm256_loadu_si256(p as *const __m256i), _mm256_loadu_si256(p.add(128) as *const __m256i)]
        }
    }

    #[inline(always)]
    unsafe fn scales<const F: u8>(&self, j: usize, g: usize) -> (__m256, __m256) {
        let at = j * self.nbp + 8 * g;
        // SAFETY: `nbp` entries per packed row.
        unsafe { (_mm256_loadu_ps(self.d.as_ptr().add(at)), _mm256_loadu_ps(self.m.as_ptr().add(at))) }
    }
}

/// How many bytes past a group of interleaved weights its tile asks for (1-2 KB measured
/// best at 1 and 8 rows on a Zen 4 core, against 320 bytes, i.e. 2 groups, and 4 KB).
const PREFETCH_AHEAD: usize = 1024;

/// Rows of `Q4_0`, `Q4_1` or `Q8_0` in `simd::qdot`'s interleaved layout, `nb` blocks each,
/// read in place with AVX-512 masked loads (a partial last group reads only its blocks).
pub(crate) struct Interleaved<'a> {
    w: &'a [u8],
    nb: usize,
}

impl Interleaved<'_> {
    /// Group `g`'s blocks, its first byte in row `j` and the mask of its 32-bit lanes.
    #[inline(always)]
    unsafe fn group<const F: u8>(&self, j: usize, g: usize) -> (usize, *const u8, __mmask8) {
        let c = (self.nb - 8 * g).min(8);
        let at = (j * self.nb + 8 * g) * block_bytes::<F>();
        // SAFETY: `at` is within `w` for rows in range (checked by the entry point).
        (c, unsafe { self.w.as_ptr().add(at) }, (0xFFu16 >> (8 - c)) as __mmask8)
    }
}

impl Weights for Interleaved<'_> {
    #[inline(always)]
    fn groups(&self) -> usize {
        self.nb.div_ceil(8)
    }

    #[inline(always)]
    fn prefetch<const F: u8>(&self, j: usize, g: usize) {
        // A group spans up to 5 cache lines (8 blocks of 34 bytes); prefetching never
        // faults, past the row's end included.
        let at = (j * self.nb + 8 * g) * block_bytes::<F>() + PREFETCH_AHEAD;
        let p = self.w.as_ptr().wrapping_add(at);
        for line in 0..(8 * block_bytes::<F>()).div_ceil(64) {
            // SAFETY: a prefetch reads nothing the program sees and does not fault.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64 * line) as *const i8) };
        }
    }

    #[inline(always)]
    unsafe fn codes<const F: u8, I: Isa>(&self, j: usize, g: usize, k: usize) -> [__m256i; 2] {
        // SAFETY: AVX-512 F, BW and VL (the entry point); the masked loads read the
        // group's `c` lanes only, within its `c` blocks.
        unsafe {
            let (c, p, mask) = self.group::<F>(j, g);
            if F == Q8_0 {
                // (Lanes past `c` become 128: their activations are 0.)
                let bias = _mm256_set1_epi8(if I::Q8_BIASED { -128 } else { 0 });
                let v =
                    |k: usize| _mm256_xor_si256(_mm256_maskz_loadu_epi32(mask, p.add(4 * c * k) as *const i32), bias);
                return [v(k), v(k + 4)];
            }
            // 4-bit codes: bytes `4k..4k + 4` of each block hold codes `4k..` in their
            // low nibbles and `16 + 4k..` in their high ones.
            let v = _mm256_maskz_loadu_epi32(mask, p.add(4 * c * k) as *const i32);
            let low = _mm256_set1_epi8(0x0F);
            [_mm256_and_si256(v, low), _mm256_and_si256(_mm256_srli_epi16::<4>(v), low)]
        }
    }

    #[inline(always)]
    unsafe fn scales<const F: u8>(&self, j: usize, g: usize) -> (__m256, __m256) {
        // SAFETY: as `codes`: the group's `c` scales (and minimums) follow its codes.
        unsafe {
            let (c, p, mask) = self.group::<F>(j, g);
            let at = p.add(c * (block_bytes::<F>() - if F == Q4_1 { 4 } else { 2 }));
            let d = _mm256_cvtph_ps(_mm_maskz_loadu_epi16(mask, at as *const i16));
            let m = if F == Q4_1 {
                _mm256_cvtph_ps(_mm_maskz_loadu_epi16(mask, at.add(2 * c) as *const i16))
            } else {
                _mm256_setzero_ps()
            };
            (d, m)
        }
    }
}

/// The 8 x 8 transpose of 32-bit elements: lane `t` of output `k` is lane `k` of input
/// `t`.
#[inline(always)]
pub(crate) unsafe fn transpose8(v: [__m256i; 8]) -> [__m256i; 8] {
    // SAFETY: AVX2 (the callers are compiled with it). (Plain loops, no closures: those
    // would not inherit the callers' target features.)
    unsafe {
        let mut t = [_mm256_setzero_si256(); 8];
        for i in 0..4 {
            t[2 * i] = _mm256_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
            t[2 * i + 1] = _mm256_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
        }
        // u[q] (q < 4): elements q | q + 4 of inputs 0..4; u[4 + q]: of inputs 4..8.
        let mut u = [_mm256_setzero_si256(); 8];
        for base in [0, 4] {
            u[base] = _mm256_unpacklo_epi64(t[base], t[base + 2]);
            u[base + 1] = _mm256_unpackhi_epi64(t[base], t[base + 2]);
            u[base + 2] = _mm256_unpacklo_epi64(t[base + 1], t[base + 3]);
            u[base + 3] = _mm256_unpackhi_epi64(t[base + 1], t[base + 3]);
        }
        let mut o = [_mm256_setzero_si256(); 8];
        for k in 0..4 {
            o[k] = _mm256_permute2x128_si256::<0x20>(u[k], u[4 + k]);
            o[k + 4] = _mm256_permute2x128_si256::<0x31>(u[k], u[4 + k]);
        }
        o
    }
}

/// Code vectors the AVX2 GEMM may accumulate in 16-bit lanes before widening: each
/// `maddubs` lane adds two products of at most `max_code * 127`, and `steps` of them must
/// stay within i16 (0: the format is not for the AVX2 GEMM, i.e. signed `Q8_0`).
pub(crate) const fn i16_steps(max_code: usize) -> usize {
    if max_code == 0 || max_code > 127 {
        return 0;
    }
    let s = 32767 / (2 * 127 * max_code);
    if s > 8 { 8 } else { s }
}

/// The largest code byte of a 32-value format (0 for `Q8_0`, whose unbiased codes are
/// signed).
const fn max_code<const F: u8>() -> usize {
    match F {
        Q4_0 | Q4_1 => 15,
        Q5_0 | Q5_1 => 31,
        _ => 0,
    }
}

/// Repacks `n` weight rows of `nb` blocks of format `F` (consecutive in `w`) into `p`.
///
/// # Safety
/// AVX2, F16C (and the ISA's features). (Bounds are checked.)
#[inline(always)]
unsafe fn pack<const F: u8, I: Isa>(w: &[u8], n: usize, nb: usize, p: &mut Packed) {
    let bb = block_bytes::<F>();
    assert!(w.len() >= n * nb * bb);
    p.size_for(n, nb);
    let nbp = p.nbp;
    for j in 0..n {
        for g in 0..nbp / 8 {
            let cnt = (nb - 8 * g).min(8);
            let at = j * nbp + 8 * g;
            // SAFETY: blocks `8g..8g + cnt` of row `j` are within `w` (checked); the
            // stores are within the buffers sized above.
            unsafe {
                let blk = w.as_ptr().add((j * nb + 8 * g) * bb);
                let (d, m) = scales::<F>(blk, cnt);
                _mm256_storeu_ps(p.d.as_mut_ptr().add(at), d);
                _mm256_storeu_ps(p.m.as_mut_ptr().add(at), m);
                let mut v = [_mm256_setzero_si256(); 8];
                for (t, v) in v.iter_mut().enumerate().take(cnt) {
                    *v = unpack::<F, I>(blk.add(t * bb));
                }
                for (k, o) in transpose8(v).into_iter().enumerate() {
                    _mm256_storeu_si256(p.q.as_mut_ptr().add(at * 32 + 32 * k) as *mut __m256i, o);
                }
            }
        }
    }
}

/// [`pack`] for [`gemm_vnni`].
///
/// # Safety
/// The CPU supports AVX2, FMA, F16C and AVX-512 F, BW, VL and VNNI. (Bounds are
/// checked.)
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) unsafe fn pack_vnni<const F: u8>(w: &[u8], n: usize, nb: usize, p: &mut Packed) {
    // SAFETY: the features are enabled here.
    unsafe { pack::<F, Vnni>(w, n, nb, p) }
}

/// [`pack`] for [`gemm_avx2`].
///
/// # Safety
/// The CPU supports AVX2, FMA and F16C. (Bounds are checked.)
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn pack_avx2<const F: u8>(w: &[u8], n: usize, nb: usize, p: &mut Packed) {
    // SAFETY: the features are enabled here.
    unsafe { pack::<F, Avx2>(w, n, nb, p) }
}

/// [`pack_vnni`] from rows already interleaved (`n` rows of `nb` blocks of `F`:
/// `Q4_0`, `Q4_1` or `Q8_0`): no transposes, only the 4-bit codes split and the scales
/// widened, for products of many rows, whose tiles would otherwise split every code
/// byte once per tile.
///
/// # Safety
/// The CPU supports AVX2, FMA, F16C and AVX-512 F, BW, VL and VNNI. (Bounds are
/// checked.)
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) unsafe fn pack_interleaved_vnni<const F: u8>(w: &[u8], n: usize, nb: usize, p: &mut Packed) {
    assert!(matches!(F, Q4_0 | Q4_1 | Q8_0), "no interleaved layout for this format");
    assert!(w.len() >= n * nb * block_bytes::<F>());
    let src = Interleaved { w, nb };
    p.size_for(n, nb);
    let nbp = p.nbp;
    for j in 0..n {
        for g in 0..nbp / 8 {
            // SAFETY: the features are enabled here; row `j` is within `w` (checked), and
            // the stores within the buffers sized above.
            unsafe {
                for k in 0..4 {
                    let [a, b] = src.codes::<F, Vnni>(j, g, k);
                    let at = p.q.as_mut_ptr().add(j * nbp * 32 + 256 * g + 32 * k);
                    _mm256_storeu_si256(at as *mut __m256i, a);
                    _mm256_storeu_si256(at.add(128) as *mut __m256i, b);
                }
                let (d, m) = src.scales::<F>(j, g);
                _mm256_storeu_ps(p.d.as_mut_ptr().add(j * nbp + 8 * g), d);
                _mm256_storeu_ps(p.m.as_mut_ptr().add(j * nbp + 8 * g), m);
            }
        }
    }
}

/// Interleaves one row of activation codes (`nb` blocks of 32) into `out` (`nb`
/// rounded up to 8 blocks; zero past them).
///
/// # Safety
/// The CPU supports AVX2. (Bounds are checked.)
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn interleave(qs: &[i8], out: &mut [i8]) {
    let nb = qs.len() / 32;
    assert!(out.len() >= nb.div_ceil(8) * 256);
    for g in 0..nb.div_ceil(8) {
        let cnt = (nb - 8 * g).min(8);
        // SAFETY: blocks `8g..8g + cnt` are within `qs`, the group within `out`.
        unsafe {
            let mut v = [_mm256_setzero_si256(); 8];
            for (t, v) in v.iter_mut().enumerate().take(cnt) {
                *v = _mm256_loadu_si256(qs.as_ptr().add(32 * (8 * g + t)) as *const __m256i);
            }
            for (k, o) in transpose8(v).into_iter().enumerate() {
                _mm256_storeu_si256(out.as_mut_ptr().add(256 * g + 32 * k) as *mut __m256i, o);
            }
        }
    }
}

/// `R` x `C` outputs: activation rows `xs` (their interleaved codes at `xi`) times weight
/// rows `j..j + C` of `p`, as `[row][weight row]`.
///
/// # Safety
/// AVX2, FMA (and the ISA's features); `j + C <=` the rows of `p`; with `nbp = 8 *
/// p.groups()`, every `xi` holds `32 * nbp` codes and every row's `d`, `sums`, `s` `nbp`
/// entries.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // (`h` picks a vector of each weight row)
unsafe fn tile<const F: u8, I: Isa, W: Weights, const R: usize, const C: usize>(
    p: &W,
    j: usize,
    xs: &[InRow<'_>],
    xi: &[*const i8; R],
) -> [[f32; C]; R] {
    let has_min = F == Q4_1 || F == Q5_1;
    // SAFETY: all offsets stay within the weight rows and the activation rows (the
    // caller's contract).
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let steps = i16_steps(max_code::<F>());
        // Small VNNI tiles accumulate vectors `k` and `k + 4` apart (then add them:
        // integers, exact), or their few `vpdpbusd` chains would wait on each other.
        let split = I::VNNI && R * C <= 4;
        for g in 0..p.groups() {
            let mut ia = [[_mm256_setzero_si256(); C]; R];
            // AVX2: the 16-bit sums; VNNI, split: vectors `k + 4`.
            let mut i16a = [[_mm256_setzero_si256(); C]; R];
            // Vectors `k` and `k + 4` share their loads (4-bit codes: one load); the
            // integer sums do not depend on the order.
            for k in 0..4 {
                let mut w = [[_mm256_setzero_si256(); 2]; C];
                for (c, w) in w.iter_mut().enumerate() {
                    *w = p.codes::<F, I>(j + c, g, k);
                    if k == 0 {
                        p.prefetch::<F>(j + c, g);
                    }
                }
                for h in 0..2 {
                    let (kk, step) = (k + 4 * h, 2 * k + h);
                    for r in 0..R {
                        let x = _mm256_loadu_si256(xi[r].add(256 * g + 32 * kk) as *const __m256i);
                        for c in 0..C {
                            if I::VNNI && split && h == 1 {
                                i16a[r][c] = _mm256_dpbusd_epi32(i16a[r][c], w[c][h], x);
                            } else if I::VNNI {
                                ia[r][c] = _mm256_dpbusd_epi32(ia[r][c], w[c][h], x);
                            } else {
                                i16a[r][c] = _mm256_add_epi16(i16a[r][c], _mm256_maddubs_epi16(w[c][h], x));
                            }
                        }
                    }
                    if !I::VNNI && ((step + 1) % steps == 0 || step == 7) {
                        for r in 0..R {
                            for c in 0..C {
                                let wide = _mm256_madd_epi16(i16a[r][c], _mm256_set1_epi16(1));
                                ia[r][c] = _mm256_add_epi32(ia[r][c], wide);
                                i16a[r][c] = _mm256_setzero_si256();
                            }
                        }
                    }
                }
            }
            if split {
                for r in 0..R {
                    for c in 0..C {
                        ia[r][c] = _mm256_add_epi32(ia[r][c], i16a[r][c]);
                    }
                }
            }
            let at = 8 * g;
            let (mut dw, mut mw) = ([_mm256_setzero_ps(); C], [_mm256_setzero_ps(); C]);
            for c in 0..C {
                (dw[c], mw[c]) = p.scales::<F>(j + c, g);
            }
            for r in 0..R {
                let xd = _mm256_loadu_ps(xs[r].d.as_ptr().add(at));
                for c in 0..C {
                    let mut s = ia[r][c];
                    if let Some(sh) = offset_shift::<F>(I::Q8_BIASED) {
                        let xsum = _mm256_loadu_si256(xs[r].sums.as_ptr().add(at) as *const __m256i);
                        s = _mm256_sub_epi32(s, _mm256_sll_epi32(xsum, _mm_cvtsi32_si128(sh)));
                    }
                    acc[r][c] =
                        _mm256_add_ps(acc[r][c], _mm256_mul_ps(_mm256_mul_ps(dw[c], xd), _mm256_cvtepi32_ps(s)));
                    if has_min {
                        let sx = _mm256_loadu_ps(xs[r].s.as_ptr().add(at));
                        acc[r][c] = _mm256_add_ps(acc[r][c], _mm256_mul_ps(mw[c], sx));
                    }
                }
            }
        }
        let mut out = [[0f32; C]; R];
        for r in 0..R {
            for c in 0..C {
                out[r][c] = hsum(acc[r][c]);
            }
        }
        out
    }
}

/// Every weight row of `p` (`n` of them) times every activation row `xs` (interleaved
/// codes in `xi`, `32 * p.nbp` per row), written to output `(i, j)` of `out`. Tiles of
/// `RT` activation rows x 2 weight rows (fewer than `RT` rows: 1 x 1), then the edges
/// one by one.
///
/// # Safety
/// AVX2, FMA (and the ISA's features); `p` holds `n` rows of format `F` for the ISA;
/// outputs `(i, j)` of `out` for `i < xs.len()`, `j < n` are valid for writes and no one
/// else's meanwhile. (Other bounds are checked.)
#[inline(always)]
unsafe fn gemm<const F: u8, I: Isa, W: Weights, const RT: usize>(
    p: &W,
    n: usize,
    xs: &[InRow<'_>],
    xi: &[i8],
    out: OutTile,
) {
    let (m, nbp) = (xs.len(), 8 * p.groups());
    assert!(xi.len() >= m * nbp * 32);
    assert!(xs.iter().all(|x| x.d.len() >= nbp && x.sums.len() >= nbp && x.s.len() >= nbp));
    assert!(I::VNNI || i16_steps(max_code::<F>()) > 0, "no AVX2 GEMM for signed Q8_0 codes");
    let ptr = |i: usize| xi[i * nbp * 32..].as_ptr();
    let mut j = 0;
    while j < n {
        // Fewer rows than a tile (decode, bound by reading the weights): one weight row
        // at a time, so that they stream in order.
        let c = if m >= RT && n - j >= 2 { 2 } else { 1 };
        let mut i = 0;
        while i < m {
            let r = if m - i >= RT { RT } else { 1 };
            let rows = &xs[i..i + r];
            let mut x4 = [ptr(i); 4];
            for (k, x) in x4.iter_mut().enumerate().take(r) {
                *x = ptr(i + k);
            }
            // SAFETY: the caller's features; rows `j..j + c` are packed, rows `i..i + r`
            // exist, and their buffers hold what `tile` reads (checked above).
            let o: [[f32; 4]; 4] = unsafe {
                match (r, c) {
                    (4, 2) => pad(tile::<F, I, W, 4, 2>(p, j, rows, &x4)),
                    (4, _) => pad(tile::<F, I, W, 4, 1>(p, j, rows, &x4)),
                    (2, 2) => pad(tile::<F, I, W, 2, 2>(p, j, rows, &[x4[0], x4[1]])),
                    (2, _) => pad(tile::<F, I, W, 2, 1>(p, j, rows, &[x4[0], x4[1]])),
                    (_, 2) => pad(tile::<F, I, W, 1, 2>(p, j, rows, &[x4[0]])),
                    _ => pad(tile::<F, I, W, 1, 1>(p, j, rows, &[x4[0]])),
                }
            };
            for (k, o) in o.iter().enumerate().take(r) {
                for (cc, &v) in o.iter().enumerate().take(c) {
                    // SAFETY: `(i + k, j + cc)` is in range (the contract).
                    unsafe { out.put(i + k, j + cc, v) };
                }
            }
            i += r;
        }
        j += c;
    }
}

/// `R` x `C` results as 4 x 4.
fn pad<const R: usize, const C: usize>(o: [[f32; C]; R]) -> [[f32; 4]; 4] {
    let mut out = [[0.0; 4]; 4];
    for (out, o) in out.iter_mut().zip(o) {
        out[..C].copy_from_slice(&o);
    }
    out
}

/// [`gemm`] with VNNI (tiles of 4 x 2).
///
/// # Safety
/// The CPU supports AVX2, FMA, F16C and AVX-512 F, BW, VL and VNNI; `p` was packed by
/// [`pack_vnni::<F>`] (or [`pack_interleaved_vnni::<F>`]) with `n` rows; `out` as
/// [`gemm`]'s. (Other bounds are checked.)
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) unsafe fn gemm_vnni<const F: u8>(p: &Packed, n: usize, xs: &[InRow<'_>], xi: &[i8], out: OutTile) {
    assert!(p.q.len() >= n * p.nbp * 32);
    // SAFETY: the features are enabled here; the packing and `out` per the contract.
    unsafe { gemm::<F, Vnni, Packed, 4>(p, n, xs, xi, out) }
}

/// [`gemm`] with VNNI over `n` rows of `nb` blocks of `F` (`Q4_0`, `Q4_1` or `Q8_0`) in
/// `simd::qdot`'s interleaved layout, read where they lie (tiles of 4 x 2).
///
/// # Safety
/// The CPU supports AVX2, FMA, F16C and AVX-512 F, BW, VL and VNNI; `out` as [`gemm`]'s.
/// (Other bounds are checked.)
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) unsafe fn gemm_interleaved_vnni<const F: u8>(
    w: &[u8],
    n: usize,
    nb: usize,
    xs: &[InRow<'_>],
    xi: &[i8],
    out: OutTile,
) {
    assert!(matches!(F, Q4_0 | Q4_1 | Q8_0), "no interleaved layout for this format");
    assert!(w.len() >= n * nb * block_bytes::<F>());
    // SAFETY: the features are enabled here; `w` holds the `n` rows (checked); `out` per
    // the contract.
    unsafe { gemm::<F, Vnni, Interleaved<'_>, 4>(&Interleaved { w, nb }, n, xs, xi, out) }
}

/// [`gemm`] with AVX2 (tiles of 2 x 2; not `Q8_0`).
///
/// # Safety
/// The CPU supports AVX2, FMA and F16C; `p` was packed by [`pack_avx2::<F>`] with `n`
/// rows; `out` as [`gemm`]'s. (Other bounds are checked.)
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn gemm_avx2<const F: u8>(p: &Packed, n: usize, xs: &[InRow<'_>], xi: &[i8], out: OutTile) {
    assert!(p.q.len() >= n * p.nbp * 32);
    // SAFETY: the features are enabled here; the packing and `out` per the contract.
    unsafe { gemm::<F, Avx2, Packed, 2>(p, n, xs, xi, out) }
}
