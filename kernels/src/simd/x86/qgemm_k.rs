//! The GEMM of the k-quants, for many activation rows at once (prefill), with AVX-512
//! VNNI or AVX2: the scheme of `super::qgemm` per 256-value super-block.
//!
//! A task's weight super-blocks are unpacked once into unsigned code bytes in value order
//! (`Q6_K`: `q + 32`, `Q3_K`: `q + 4`), transposed as 8 x 8 blocks of 32-bit elements
//! (the activation codes alike: `super::qgemm::interleave`), and their sub-block scales
//! and mins decoded ([`pack_k`]). Eight `vpdpbusd` then leave, for the 32-value
//! sub-blocks of `Q4_K`/`Q5_K`, sub-block `t`'s integer sum in lane `t` of one
//! accumulator; for the 16-value sub-blocks of `Q2_K`/`Q3_K`/`Q6_K`, sub-block `2t` in
//! lane `t` of one and `2t + 1` in lane `t` of another. Multiplying by the scales in the
//! same order and adding the lanes gives `simd::qref::ints_k`'s exact integers, which
//! enter the f32 accumulator through `simd::qref::k_accumulate`: every output equals
//! the reference, and the single-row kernels, bit for bit. Register tiles (4 activation
//! rows x 2 weight rows with VNNI; 2 x 2, or 2 x 1 for 16-value sub-blocks, with AVX2)
//! share the loads.

use super::qdot::{Avx2, Isa, Vnni, hsum_i32};
use super::qdot_k::{Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, unpack_k};
use super::qgemm::{i16_steps, transpose8};
use crate::simd::ggml::{QFormat, QK_K, k_scale_min, q3k_scale};
use crate::simd::qref::{InRow, k_accumulate, k_scales};
use std::arch::x86_64::*;

/// k-quant weight rows repacked for [`gemm_k`], per super-block: 256 transposed code
/// bytes; the scales in accumulator-lane order (`sc_lanes`, 16); the scale and min of
/// each 16 values in value order (`sc16`, `m16`, 16 each); `d` and `dmin`.
#[derive(Default)]
pub(crate) struct PackedK {
    q: Vec<u8>,
    sc_lanes: Vec<i32>,
    sc16: Vec<i32>,
    m16: Vec<i32>,
    d: Vec<[f32; 2]>,
    /// Super-blocks per row.
    nsb: usize,
}

/// 8 i32 of `v` from `at`.
///
/// # Safety
/// AVX (the callers'); `v` holds `at + 8` values.
#[inline(always)]
unsafe fn ld(v: &[i32], at: usize) -> __m256i {
    // SAFETY: the caller's contract.
    unsafe { _mm256_loadu_si256(v.as_ptr().add(at) as *const __m256i) }
}

/// Whether the format's sub-blocks hold 16 values (else 32).
const fn sub16(f: u8) -> bool {
    !matches!(f, Q4_K | Q5_K)
}

/// The format of a const code.
const fn format(f: u8) -> QFormat {
    match f {
        Q3_K => QFormat::Q3_K,
        Q4_K => QFormat::Q4_K,
        Q5_K => QFormat::Q5_K,
        Q6_K => QFormat::Q6_K,
        _ => QFormat::Q2_K,
    }
}

/// Repacks `n` weight rows of format `F` (`w`: whole rows, consecutive) into `p`.
///
/// # Safety
/// The CPU supports AVX2, FMA and F16C (the packing is the same for both GEMMs).
/// (Bounds are checked.)
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn pack_k<const F: u8>(w: &[u8], n: usize, p: &mut PackedK) {
    let f = format(F);
    let bb = f.block_bytes();
    let nsb = w.len() / n.max(1) / bb;
    assert!(w.len() == n * nsb * bb);
    p.nsb = nsb;
    let total = n * nsb;
    p.q.resize(total * QK_K, 0);
    p.sc_lanes.resize(total * 16, 0);
    p.sc16.resize(total * 16, 0);
    p.m16.resize(total * 16, 0);
    p.d.resize(total, [0.0; 2]);
    for (b, blk) in w.chunks_exact(bb).enumerate() {
        let (mut sc, mut mn) = ([0i32; 16], [0i32; 16]);
        match F {
            Q4_K | Q5_K => {
                for j in 0..8 {
                    let (s, m) = k_scale_min(&blk[4..16], j);
                    (sc[2 * j], sc[2 * j + 1], mn[2 * j], mn[2 * j + 1]) = (s as i32, s as i32, m as i32, m as i32);
                }
            }
            Q6_K => (0..16).for_each(|j| sc[j] = blk[192 + j] as i8 as i32),
            Q3_K => (0..16).for_each(|j| sc[j] = q3k_scale(&blk[96..108], j)),
            _ => (0..16).for_each(|j| (sc[j], mn[j]) = ((blk[j] & 0xF) as i32, (blk[j] >> 4) as i32)),
        }
        let lanes = &mut p.sc_lanes[16 * b..][..16];
        for t in 0..8 {
            if sub16(F) {
                (lanes[t], lanes[8 + t]) = (sc[2 * t], sc[2 * t + 1]);
            } else {
                lanes[t] = sc[2 * t];
            }
        }
        p.sc16[16 * b..][..16].copy_from_slice(&sc);
        p.m16[16 * b..][..16].copy_from_slice(&mn);
        let (d, dmin) = k_scales(f, blk);
        p.d[b] = [d, dmin];
        // SAFETY: the features are enabled here; `blk` is a whole block; the stores
        // stay within the 256 bytes of super-block `b`.
        unsafe {
            for (k, o) in transpose8(unpack_k::<F>(blk)).into_iter().enumerate() {
                _mm256_storeu_si256(p.q.as_mut_ptr().add(QK_K * b + 32 * k) as *mut __m256i, o);
            }
        }
    }
}

/// `R` x `C` outputs: activation rows `xs` (their transposed codes at `xi`) times packed
/// weight rows `j..j + C`, as `[row][weight row]`.
///
/// # Safety
/// AVX2 (and the ISA's features); rows `j..j + C` are packed; every `xi` holds
/// `256 * p.nsb` codes, every row's `d` `p.nsb` scales and `sums` `16 * p.nsb` sums.
#[inline(always)]
unsafe fn tile<const F: u8, I: Isa, const R: usize, const C: usize>(
    p: &PackedK,
    j: usize,
    xs: &[InRow<'_>],
    xi: &[*const i8; R],
) -> [[f32; C]; R] {
    let (f, nsb) = (format(F), p.nsb);
    let off = match F {
        Q6_K => 5,
        Q3_K => 2,
        _ => -1,
    };
    let mins = matches!(F, Q2_K | Q4_K | Q5_K);
    let steps = i16_steps(match F {
        Q2_K => 3,
        Q3_K => 7,
        Q4_K => 15,
        Q5_K => 31,
        _ => 63,
    });
    // SAFETY: all offsets stay within the packed rows and the activation rows (the
    // caller's contract).
    unsafe {
        let z = _mm256_setzero_si256();
        let mut acc = [[0f32; C]; R];
        for sb in 0..nsb {
            let (mut a, mut b) = ([[z; C]; R], [[z; C]; R]);
            let mut a16 = [[z; C]; R];
            for k in 0..8 {
                let mut w = [z; C];
                for (c, w) in w.iter_mut().enumerate() {
                    *w = _mm256_loadu_si256(p.q.as_ptr().add(QK_K * ((j + c) * nsb + sb) + 32 * k) as *const __m256i);
                }
                for r in 0..R {
                    let x = _mm256_loadu_si256(xi[r].add(QK_K * sb + 32 * k) as *const __m256i);
                    for c in 0..C {
                        if !I::VNNI {
                            a16[r][c] = _mm256_add_epi16(a16[r][c], _mm256_maddubs_epi16(w[c], x));
                        } else if sub16(F) && k >= 4 {
                            b[r][c] = _mm256_dpbusd_epi32(b[r][c], w[c], x);
                        } else {
                            a[r][c] = _mm256_dpbusd_epi32(a[r][c], w[c], x);
                        }
                    }
                }
                // AVX2: widen the 16-bit sums before they could overflow, and at the end
                // of each accumulator's vectors.
                if !I::VNNI && ((k + 1) % steps == 0 || k == 7 || (sub16(F) && k == 3)) {
                    for r in 0..R {
                        for c in 0..C {
                            let wide = _mm256_madd_epi16(a16[r][c], _mm256_set1_epi16(1));
                            if sub16(F) && k >= 4 {
                                b[r][c] = _mm256_add_epi32(b[r][c], wide);
                            } else {
                                a[r][c] = _mm256_add_epi32(a[r][c], wide);
                            }
                            a16[r][c] = z;
                        }
                    }
                }
            }
            for r in 0..R {
                let bs = &xs[r].sums[16 * sb..][..16];
                let (bs0, bs1) = (ld(bs, 0), ld(bs, 8));
                for c in 0..C {
                    let at = 16 * ((j + c) * nsb + sb);
                    let mut v = _mm256_mullo_epi32(a[r][c], ld(&p.sc_lanes, at));
                    if sub16(F) {
                        v = _mm256_add_epi32(v, _mm256_mullo_epi32(b[r][c], ld(&p.sc_lanes, at + 8)));
                    }
                    if off > 0 {
                        let t = _mm256_add_epi32(
                            _mm256_mullo_epi32(ld(&p.sc16, at), bs0),
                            _mm256_mullo_epi32(ld(&p.sc16, at + 8), bs1),
                        );
                        v = _mm256_sub_epi32(v, _mm256_sll_epi32(t, _mm_cvtsi32_si128(off)));
                    }
                    let msum = if mins {
                        hsum_i32(_mm256_add_epi32(
                            _mm256_mullo_epi32(ld(&p.m16, at), bs0),
                            _mm256_mullo_epi32(ld(&p.m16, at + 8), bs1),
                        ))
                    } else {
                        0
                    };
                    let [d, dmin] = p.d[(j + c) * nsb + sb];
                    acc[r][c] = k_accumulate(f, acc[r][c], d, dmin, xs[r].d[sb], hsum_i32(v), msum);
                }
            }
        }
        acc
    }
}

/// Every packed weight row of `p` (`n` of them) times every activation row `xs`
/// (transposed codes in `xi`, `256 * p.nsb` per row): `res[j * xs.len() + i]`. Tiles of
/// `RT` activation rows x `CT` weight rows, then the edges one by one.
///
/// # Safety
/// AVX2 (and the ISA's features); `p` was packed by [`pack_k::<F>`] with `n` rows.
/// (Other bounds are checked.)
#[inline(always)]
unsafe fn gemm_k<const F: u8, I: Isa, const RT: usize, const CT: usize>(
    p: &PackedK,
    n: usize,
    xs: &[InRow<'_>],
    xi: &[i8],
    res: &mut [f32],
) {
    let (m, nsb) = (xs.len(), p.nsb);
    assert!(p.d.len() >= n * nsb && xi.len() >= m * nsb * QK_K && res.len() >= n * m);
    assert!(xs.iter().all(|x| x.d.len() >= nsb && x.sums.len() >= 16 * nsb));
    let ptr = |i: usize| xi[i * nsb * QK_K..].as_ptr();
    let mut j = 0;
    while j < n {
        let c = if n - j >= CT { CT } else { 1 };
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

/// [`gemm_k`] with VNNI (tiles of 4 x 2).
///
/// # Safety
/// The CPU supports AVX2, FMA, F16C and AVX-512 F, BW, VL and VNNI; `p` was packed by
/// [`pack_k::<F>`] with `n` rows. (Other bounds are checked.)
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) unsafe fn gemm_k_vnni<const F: u8>(p: &PackedK, n: usize, xs: &[InRow<'_>], xi: &[i8], res: &mut [f32]) {
    // SAFETY: the features are enabled here; the packing per the contract.
    unsafe { gemm_k::<F, Vnni, 4, 2>(p, n, xs, xi, res) }
}

/// [`gemm_k`] with AVX2 (tiles of 2 x 2, or 2 x 1 for 16-value sub-blocks).
///
/// # Safety
/// The CPU supports AVX2, FMA and F16C; `p` was packed by [`pack_k::<F>`] with `n` rows.
/// (Other bounds are checked.)
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn gemm_k_avx2<const F: u8>(p: &PackedK, n: usize, xs: &[InRow<'_>], xi: &[i8], res: &mut [f32]) {
    // SAFETY: the features are enabled here; the packing per the contract.
    unsafe {
        if sub16(F) { gemm_k::<F, Avx2, 2, 1>(p, n, xs, xi, res) } else { gemm_k::<F, Avx2, 2, 2>(p, n, xs, xi, res) }
    }
}
