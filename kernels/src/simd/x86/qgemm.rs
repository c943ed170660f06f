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

use super::qdot::{Avx2, Isa, Q4_0, Q4_1, Q5_0, Q5_1, Vnni, block_bytes, offset_shift, scales, unpack};
use crate::simd::prim::x86::hsum;
use crate::simd::qref::InRow;
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
    let nbp = nb.div_ceil(8) * 8;
    p.nbp = nbp;
    // Every byte and scale is written below (padding included).
    p.q.resize(n * nbp * 32, 0);
    p.d.resize(n * nbp, 0.0);
    p.m.resize(n * nbp, 0.0);
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

/// `R` x `C` outputs: activation rows `xs` (their interleaved codes at `xi`) times packed
/// weight rows `j..j + C`, as `[row][weight row]`.
///
/// # Safety
/// AVX2, FMA (and the ISA's features); `j + C <= ` the packed rows; every `xi` holds
/// `32 * p.nbp` codes and every row's `d`, `sums`, `s` `p.nbp` entries.
#[inline(always)]
unsafe fn tile<const F: u8, I: Isa, const R: usize, const C: usize>(
    p: &Packed,
    j: usize,
    xs: &[InRow<'_>],
    xi: &[*const i8; R],
) -> [[f32; C]; R] {
    let nbp = p.nbp;
    let has_min = F == Q4_1 || F == Q5_1;
    // SAFETY: all offsets stay within the packed row and the activation rows (the
    // caller's contract).
    unsafe {
        let wq = p.q.as_ptr().add(j * nbp * 32);
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let steps = i16_steps(max_code::<F>());
        for g in 0..nbp / 8 {
            let mut ia = [[_mm256_setzero_si256(); C]; R];
            let mut i16a = [[_mm256_setzero_si256(); C]; R];
            for k in 0..8 {
                let mut w = [_mm256_setzero_si256(); C];
                for (c, w) in w.iter_mut().enumerate() {
                    *w = _mm256_loadu_si256(wq.add(c * nbp * 32 + 256 * g + 32 * k) as *const __m256i);
                }
                for r in 0..R {
                    let x = _mm256_loadu_si256(xi[r].add(256 * g + 32 * k) as *const __m256i);
                    for c in 0..C {
                        if I::VNNI {
                            ia[r][c] = _mm256_dpbusd_epi32(ia[r][c], w[c], x);
                        } else {
                            i16a[r][c] = _mm256_add_epi16(i16a[r][c], _mm256_maddubs_epi16(w[c], x));
                        }
                    }
                }
                if !I::VNNI && ((k + 1) % steps == 0 || k == 7) {
                    for r in 0..R {
                        for c in 0..C {
                            let wide = _mm256_madd_epi16(i16a[r][c], _mm256_set1_epi16(1));
                            ia[r][c] = _mm256_add_epi32(ia[r][c], wide);
                            i16a[r][c] = _mm256_setzero_si256();
                        }
                    }
                }
            }
            let at = 8 * g;
            let (mut dw, mut mw) = ([_mm256_setzero_ps(); C], [_mm256_setzero_ps(); C]);
            for c in 0..C {
                dw[c] = _mm256_loadu_ps(p.d.as_ptr().add((j + c) * nbp + at));
                mw[c] = _mm256_loadu_ps(p.m.as_ptr().add((j + c) * nbp + at));
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

/// Every packed weight row of `p` (`n` of them) times every activation row `xs`
/// (interleaved codes in `xi`, `32 * p.nbp` per row): `res[j * xs.len() + i]`. Tiles of
/// `RT` activation rows x 2 weight rows, then the edges one by one.
///
/// # Safety
/// AVX2, FMA (and the ISA's features); `p` was packed for the ISA with `n` rows of
/// format `F`. (Other bounds are checked.)
#[inline(always)]
unsafe fn gemm<const F: u8, I: Isa, const RT: usize>(
    p: &Packed,
    n: usize,
    xs: &[InRow<'_>],
    xi: &[i8],
    res: &mut [f32],
) {
    let (m, nbp) = (xs.len(), p.nbp);
    assert!(p.q.len() >= n * nbp * 32 && xi.len() >= m * nbp * 32 && res.len() >= n * m);
    assert!(xs.iter().all(|x| x.d.len() >= nbp && x.sums.len() >= nbp && x.s.len() >= nbp));
    assert!(I::VNNI || i16_steps(max_code::<F>()) > 0, "no AVX2 GEMM for signed Q8_0 codes");
    let ptr = |i: usize| xi[i * nbp * 32..].as_ptr();
    let mut j = 0;
    while j < n {
        let c = if n - j >= 2 { 2 } else { 1 };
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
            let o: [[f32; 2]; 4] = unsafe {
                match (r, c) {
                    (4, 2) => tile::<F, I, 4, 2>(p, j, rows, &x4),
                    (4, _) => tile::<F, I, 4, 1>(p, j, rows, &x4).map(|o| [o[0], 0.0]),
                    (2, 2) => pad(tile::<F, I, 2, 2>(p, j, rows, &[x4[0], x4[1]])),
                    (2, _) => pad(tile::<F, I, 2, 1>(p, j, rows, &[x4[0], x4[1]]).map(|o| [o[0], 0.0])),
                    (_, 2) => pad(tile::<F, I, 1, 2>(p, j, rows, &[x4[0]])),
                    _ => pad([[tile::<F, I, 1, 1>(p, j, rows, &[x4[0]])[0][0], 0.0]]),
                }
            };
            for (k, o) in o.iter().enumerate().take(r) {
                for (cc, &v) in o.iter().enumerate().take(c) {
                    res[(j + cc) * m + i + k] = v;
                }
            }
            i += r;
        }
        j += c;
    }
}

/// `N` rows of results as 4.
fn pad<const N: usize>(o: [[f32; 2]; N]) -> [[f32; 2]; 4] {
    let mut out = [[0.0; 2]; 4];
    out[..N].copy_from_slice(&o);
    out
}

/// [`gemm`] with VNNI (tiles of 4 x 2).
///
/// # Safety
/// The CPU supports AVX2, FMA, F16C and AVX-512 F, BW, VL and VNNI; `p` was packed by
/// [`pack_vnni::<F>`] with `n` rows. (Other bounds are checked.)
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) unsafe fn gemm_vnni<const F: u8>(p: &Packed, n: usize, xs: &[InRow<'_>], xi: &[i8], res: &mut [f32]) {
    // SAFETY: the features are enabled here; the packing per the contract.
    unsafe { gemm::<F, Vnni, 4>(p, n, xs, xi, res) }
}

/// [`gemm`] with AVX2 (tiles of 2 x 2; not `Q8_0`).
///
/// # Safety
/// The CPU supports AVX2, FMA and F16C; `p` was packed by [`pack_avx2::<F>`] with `n`
/// rows. (Other bounds are checked.)
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn gemm_avx2<const F: u8>(p: &Packed, n: usize, xs: &[InRow<'_>], xi: &[i8], res: &mut [f32]) {
    // SAFETY: the features are enabled here; the packing per the contract.
    unsafe { gemm::<F, Avx2, 2>(p, n, xs, xi, res) }
}
