//! The AVX2+FMA task of [`crate::simd::linear_rows`]: `MR x NR` register blocks of
//! outputs, every output accumulating its own 8 lanes over `k` in order and finished by
//! the fixed lane tree, so each equals [`crate::simd::scalar::row_dot`] bit for bit.

use crate::simd::prim::x86::hsum;
use std::arch::x86_64::*;

/// Rows of `x` per register block.
const MR: usize = 3;
/// Rows of `w` per register block.
const NR: usize = 4;

/// `t[jj * m + i] = dot(x_i, w_jj)` for `cols` rows of `w` (a task's columns) and all
/// `m` rows of `x`, in `MR x NR` register blocks; edges one by one.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `x` holds `m * k`, `w` `cols * k` and `t`
/// `cols * m` floats.
#[target_feature(enable = "avx2,fma")]
// The register tile is indexed by (row, column) on purpose: iterators would hide it.
#[allow(clippy::needless_range_loop)]
pub(crate) unsafe fn linear_block(x: &[f32], m: usize, w: &[f32], cols: usize, k: usize, t: &mut [f32]) {
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
                    t[(j + c) * m + i + r] = finish(acc[r][c], &xr[n8..], &wc[n8..]);
                }
            }
            j += NR;
        }
        for j in j..cols {
            for r in 0..MR {
                t[j * m + i + r] = dot(&x[(i + r) * k..][..k], &w[j * k..][..k]);
            }
        }
        i += MR;
    }
    for i in i..m {
        for j in 0..cols {
            t[j * m + i] = dot(&x[i * k..][..k], &w[j * k..][..k]);
        }
    }
}

/// The horizontal sum of 8 lanes plus the scalar tail, as in
/// [`crate::simd::scalar::row_dot`].
#[inline]
#[target_feature(enable = "avx2,fma")]
fn finish(acc: __m256, ta: &[f32], tb: &[f32]) -> f32 {
    hsum(acc) + ta.iter().zip(tb).map(|(x, y)| x * y).sum::<f32>()
}

/// One output of [`linear_block`] outside the register blocks.
#[target_feature(enable = "avx2,fma")]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n8 = a.len() / 8 * 8;
    assert!(b.len() >= n8);
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    while i < n8 {
        // SAFETY: i + 8 <= n8 <= a.len(), b.len() (asserted).
        unsafe {
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(a.as_ptr().add(i)), _mm256_loadu_ps(b.as_ptr().add(i)), acc);
        }
        i += 8;
    }
    finish(acc, &a[n8..], &b[n8..])
}
