//! Row-independent `y = x · wᵀ` for the few rows of a decode step.
//!
//! Every output element is one dot product computed in a fixed order (8-wide
//! lanes over `k`, then a fixed horizontal sum), whatever the number of rows
//! and whichever rows share the call. A sequence's decode step therefore gives
//! bit-identical results alone or batched with others — which greedy
//! decoding, preemption and request migration rely on — unlike a general GEMM,
//! whose kernel (and summation order) changes with the row count.
//!
//! The AVX2+FMA path is chosen at run time; the portable path is the
//! reference (same lane structure, so both agree to rounding).

use rayon::prelude::*;

/// Output columns per parallel task.
const COLS_PER_TASK: usize = 64;
/// Rows of `x` per register block of the AVX2 kernel.
const MR: usize = 3;
/// Rows of `w` per register block of the AVX2 kernel.
const NR: usize = 4;

/// `out[i * n + j] = dot(x[i*k..][..k], w[j*k..][..k])` for `m` rows of `x`
/// and `n` rows of `w` (row-major, `[n, k]`).
///
/// The AVX2 path computes `MR x NR` blocks of outputs at once (the loads of a
/// block are shared by its dot products), but every output element still
/// accumulates its own 8 lanes over `k` in order and is finished by the same
/// horizontal sum as [`dot_portable`]: blocking changes speed, not results.
pub fn linear_rows(x: &[f32], m: usize, w: &[f32], n: usize, k: usize, out: &mut [f32]) {
    assert!(x.len() >= m * k && w.len() >= n * k && out.len() >= m * n, "linear_rows: bad shapes");
    // Transposed result, [n, m]: each task owns a contiguous range of columns.
    let mut t = vec![0f32; n * m];
    let simd = has_avx2_fma();
    #[cfg(not(target_arch = "x86_64"))]
    let _ = simd;
    t.par_chunks_mut(COLS_PER_TASK * m).enumerate().for_each(|(task, chunk)| {
        let j0 = task * COLS_PER_TASK;
        let cols = chunk.len() / m.max(1);
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: AVX2 and FMA were detected at run time just above.
            unsafe { block_avx2(x, m, &w[j0 * k..(j0 + cols) * k], cols, k, chunk) };
            return;
        }
        for (jj, col) in chunk.chunks_mut(m).enumerate() {
            let wj = &w[(j0 + jj) * k..][..k];
            for (i, o) in col.iter_mut().enumerate() {
                *o = dot_portable(&x[i * k..][..k], wj);
            }
        }
    });
    for j in 0..n {
        for i in 0..m {
            out[i * n + j] = t[j * m + i];
        }
    }
}

fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Reference dot product: 8 lanes over `k`, lanes summed pairwise, then the tail.
pub fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    hsum8(acc) + ta.iter().zip(tb).map(|(x, y)| x * y).sum::<f32>()
}

fn hsum8(a: [f32; 8]) -> f32 {
    let q = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    let p = [q[0] + q[2], q[1] + q[3]];
    p[0] + p[1]
}

/// `t[jj * m + i] = dot(x_i, w_jj)` for `cols` rows of `w` (a task's columns)
/// and all `m` rows of `x`, in `MR x NR` register blocks; edges one by one.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `x` holds `m * k`, `w` `cols * k` and
/// `t` `cols * m` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
// The register tile is indexed by (row, column) on purpose: iterators would hide it.
#[allow(clippy::needless_range_loop)]
unsafe fn block_avx2(x: &[f32], m: usize, w: &[f32], cols: usize, k: usize, t: &mut [f32]) {
    use std::arch::x86_64::*;
    let n8 = k / 8 * 8;
    let mut i = 0;
    while i + MR <= m {
        let mut j = 0;
        while j + NR <= cols {
            let mut acc = [[_mm256_setzero_ps(); NR]; MR];
            let mut p = 0;
            while p < n8 {
                // SAFETY: p + 8 <= n8 <= k, rows i..i+MR < m and j..j+NR < cols.
                unsafe {
                    let xs: [__m256; MR] = std::array::from_fn(|r| _mm256_loadu_ps(x.as_ptr().add((i + r) * k + p)));
                    for c in 0..NR {
                        let wv = _mm256_loadu_ps(w.as_ptr().add((j + c) * k + p));
                        for r in 0..MR {
                            acc[r][c] = _mm256_fmadd_ps(xs[r], wv, acc[r][c]);
                        }
                    }
                }
                p += 8;
            }
            for r in 0..MR {
                for c in 0..NR {
                    let (xr, wc) = (&x[(i + r) * k..][..k], &w[(j + c) * k..][..k]);
                    // SAFETY: AVX2 is enabled in this function.
                    t[(j + c) * m + i + r] = unsafe { finish(acc[r][c], &xr[n8..], &wc[n8..]) };
                }
            }
            j += NR;
        }
        for j in j..cols {
            for r in 0..MR {
                // SAFETY: AVX2 and FMA are enabled in this function.
                t[j * m + i + r] = unsafe { dot_avx2(&x[(i + r) * k..][..k], &w[j * k..][..k]) };
            }
        }
        i += MR;
    }
    for i in i..m {
        for j in 0..cols {
            // SAFETY: AVX2 and FMA are enabled in this function.
            t[j * m + i] = unsafe { dot_avx2(&x[i * k..][..k], &w[j * k..][..k]) };
        }
    }
}

/// The horizontal sum of 8 lanes plus the scalar tail, as in [`dot_portable`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn finish(acc: std::arch::x86_64::__m256, ta: &[f32], tb: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    // SAFETY: `lanes` holds exactly 8 floats.
    unsafe { std::arch::x86_64::_mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
    hsum8(lanes) + ta.iter().zip(tb).map(|(x, y)| x * y).sum::<f32>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n8 = a.len() / 8 * 8;
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    while i < n8 {
        // SAFETY: i + 8 <= n8 <= a.len() == b.len() (callers pass equal lengths).
        unsafe {
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(a.as_ptr().add(i)), _mm256_loadu_ps(b.as_ptr().add(i)), acc);
        }
        i += 8;
    }
    // SAFETY: AVX2 is enabled in this function.
    unsafe { finish(acc, &a[n8..], &b[n8..]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n).map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 2001) as f32 / 1000.0 - 1.0).collect()
    }

    #[test]
    fn rows_are_bit_identical_whatever_else_is_in_the_batch() {
        let (n, k) = (130, 70);
        let w = data(n * k, 1);
        let x = data(5 * k, 2);
        let mut all = vec![0f32; 5 * n];
        linear_rows(&x, 5, &w, n, k, &mut all);
        for m in 1..=5 {
            let mut part = vec![0f32; m * n];
            linear_rows(&x, m, &w, n, k, &mut part);
            assert_eq!(part[..], all[..m * n], "m = {m}");
        }
        let mut one = vec![0f32; n];
        linear_rows(&x[3 * k..], 1, &w, n, k, &mut one);
        assert_eq!(one[..], all[3 * n..4 * n]);
        // Register blocks (3 x 4) and edges give the portable reference's exact bits.
        for i in 0..5 {
            for j in 0..n {
                assert_eq!(
                    all[i * n + j].to_bits(),
                    dot_portable(&x[i * k..][..k], &w[j * k..][..k]).to_bits(),
                    "{i},{j}"
                );
            }
        }
    }

    #[test]
    fn matches_a_plain_dot_product() {
        let (n, k) = (3, 19);
        let (w, x) = (data(n * k, 3), data(2 * k, 4));
        let mut out = vec![0f32; 2 * n];
        linear_rows(&x, 2, &w, n, k, &mut out);
        for i in 0..2 {
            for j in 0..n {
                let want: f64 = (0..k).map(|t| x[i * k + t] as f64 * w[j * k + t] as f64).sum();
                assert!((out[i * n + j] as f64 - want).abs() < 1e-4, "{i},{j}");
                assert!((dot_portable(&x[i * k..][..k], &w[j * k..][..k]) - out[i * n + j]).abs() < 1e-5);
            }
        }
    }
}
