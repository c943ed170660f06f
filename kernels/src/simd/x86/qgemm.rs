//! The AVX-512 VNNI GEMM of the quantized matmul's 32-value formats, for many
//! activation rows at once (prefill).
//!
//! A task's weight rows are first unpacked into unsigned code bytes (`Q8_0` biased by
//! 128) *interleaved by groups of 8 blocks* ([`pack`]): vector `k` of a group holds bytes
//! `4k..4k+4` of each of its 8 blocks, block `t` in 32-bit lane `t`; the activation codes
//! are interleaved alike ([`interleave`]). Then one `vpdpbusd` per vector accumulates each
//! block's integer sum directly in its own lane (no horizontal adds), and register tiles
//! of 4 activation rows x 2 weight rows share every load. The per-block sums are exact
//! and enter the f32 lanes exactly as in `simd::qref::dot_b32` (lane = block mod 8):
//! every output equals the reference, and the single-row kernels, bit for bit.

use super::qdot::{Vnni, block_bytes, offset_shift, scales, unpack};
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

/// Repacks `n` weight rows of `nb` blocks of format `F` (consecutive in `w`) into `p`.
///
/// # Safety
/// The CPU supports AVX2, FMA, F16C and AVX-512 F, BW, VL and VNNI. (Bounds are
/// checked.)
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) unsafe fn pack<const F: u8>(w: &[u8], n: usize, nb: usize, p: &mut Packed) {
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
                    *v = unpack::<F, Vnni>(blk.add(t * bb));
                }
                for (k, o) in transpose8(v).into_iter().enumerate() {
                    _mm256_storeu_si256(p.q.as_mut_ptr().add(at * 32 + 32 * k) as *mut __m256i, o);
                }
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

/// `R` x `C` outputs: activation rows `xs` (their interleaved codes at `xi`) times packed
/// weight rows `j..j + C`, as `[row][weight row]`.
///
/// # Safety
/// AVX2, FMA and AVX-512 VNNI, VL; `j + C <= ` the packed rows; every `xi` holds
/// `32 * p.nbp` codes and every row's `d`, `sums`, `s` `p.nbp` entries.
#[inline(always)]
unsafe fn tile<const F: u8, const R: usize, const C: usize>(
    p: &Packed,
    j: usize,
    xs: &[InRow<'_>],
    xi: &[*const i8; R],
) -> [[f32; C]; R] {
    let nbp = p.nbp;
    let has_min = F == super::qdot::Q4_1 || F == super::qdot::Q5_1;
    // SAFETY: all offsets stay within the packed row and the activation rows (the
    // caller's contract).
    unsafe {
        let wq = p.q.as_ptr().add(j * nbp * 32);
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        for g in 0..nbp / 8 {
            let mut ia = [[_mm256_setzero_si256(); C]; R];
            for k in 0..8 {
                let mut w = [_mm256_setzero_si256(); C];
                for (c, w) in w.iter_mut().enumerate() {
                    *w = _mm256_loadu_si256(wq.add(c * nbp * 32 + 256 * g + 32 * k) as *const __m256i);
                }
                for r in 0..R {
                    let x = _mm256_loadu_si256(xi[r].add(256 * g + 32 * k) as *const __m256i);
                    for c in 0..C {
                        ia[r][c] = _mm256_dpbusd_epi32(ia[r][c], w[c], x);
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
                    if let Some(sh) = offset_shift::<F>(true) {
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
/// 4 activation rows x 2 weight rows, then the edges one by one.
///
/// # Safety
/// The CPU supports AVX2, FMA, F16C and AVX-512 F, BW, VL and VNNI; `p` was packed by
/// [`pack::<F>`] with `n` rows. (Other bounds are checked.)
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) unsafe fn gemm<const F: u8>(p: &Packed, n: usize, xs: &[InRow<'_>], xi: &[i8], res: &mut [f32]) {
    let (m, nbp) = (xs.len(), p.nbp);
    assert!(p.q.len() >= n * nbp * 32 && xi.len() >= m * nbp * 32 && res.len() >= n * m);
    assert!(xs.iter().all(|x| x.d.len() >= nbp && x.sums.len() >= nbp && x.s.len() >= nbp));
    let ptr = |i: usize| xi[i * nbp * 32..].as_ptr();
    let mut j = 0;
    while j < n {
        let c = if n - j >= 2 { 2 } else { 1 };
        let mut i = 0;
        while i < m {
            let r = if m - i >= 4 { 4 } else { 1 };
            let rows = &xs[i..i + r];
            // SAFETY: the features are enabled; rows `j..j + c` are packed, rows
            // `i..i + r` exist, and their buffers hold what `tile` reads (checked above).
            unsafe {
                match (r, c) {
                    (4, 2) => {
                        let o = tile::<F, 4, 2>(p, j, rows, &std::array::from_fn(|k| ptr(i + k)));
                        for (k, o) in o.iter().enumerate() {
                            res[j * m + i + k] = o[0];
                            res[(j + 1) * m + i + k] = o[1];
                        }
                    }
                    (4, _) => {
                        let o = tile::<F, 4, 1>(p, j, rows, &std::array::from_fn(|k| ptr(i + k)));
                        for (k, o) in o.iter().enumerate() {
                            res[j * m + i + k] = o[0];
                        }
                    }
                    (_, 2) => {
                        let o = tile::<F, 1, 2>(p, j, rows, &[ptr(i)]);
                        res[j * m + i] = o[0][0];
                        res[(j + 1) * m + i] = o[0][1];
                    }
                    _ => res[j * m + i] = tile::<F, 1, 1>(p, j, rows, &[ptr(i)])[0][0],
                }
            }
            i += r;
        }
        j += c;
    }
}
