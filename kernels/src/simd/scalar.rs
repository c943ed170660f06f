//! Scalar references of the SIMD primitives (dot product, axpy, f16 conversion, code
//! unpacking and packing, the SwiGLU activation) and of every output of
//! [`super::linear_rows`]: the code the x86 versions are tested against and the
//! [`super::Level::Scalar`] path. Depends on nothing else in the crate. (The composed
//! kernels' portable versions are in `simd::portable`.)

use half::f16;

/// Reference dot product.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut s = [0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..8 {
            s[i] += x[i] * y[i];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail += x * y;
    }
    s.iter().sum::<f32>() + tail
}

/// Reference `acc += w * x`.
pub fn axpy(acc: &mut [f32], w: f32, x: &[f32]) {
    for (a, v) in acc.iter_mut().zip(x) {
        *a += w * v;
    }
}

/// Constants of [`exp`]: `log2(e)`, `ln 2` in two parts (the high part exact in 9
/// bits, so `n * LN2_HI` is exact for the `n` that occur), and the degree-5 minimax
/// polynomial of `(e^r - 1 - r) / r^2` on `|r| <= ln(2) / 2` (Cephes' `expf`), as the
/// attention's softmax has always used them (its outputs are pinned).
pub(crate) mod exp_consts {
    pub const LOG2E: f32 = std::f32::consts::LOG2_E;
    pub const LN2_HI: f32 = 0.693_359_4;
    pub const LN2_LO: f32 = -2.121_944_4e-4;
    pub const P: [f32; 6] = [1.987_569_1e-4, 1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5];
    /// Inputs are clamped to `[LO, HI]`: `2^n` stays a normal float.
    pub const LO: f32 = -87.0;
    pub const HI: f32 = 88.0;
}

/// `e^x` within 2 ulp for `x` in `[-87, 88]` (clamped there outside, so it is never 0
/// or infinite), in fused multiply-adds and exact steps only: `n = round(x log2 e)`,
/// `r = x - n ln 2` in two parts, a degree-5 polynomial, times `2^n`. The AVX2 version
/// performs the same IEEE operations, so the two agree bit for bit (libm's `expf` is
/// correctly rounded more often, and a call per value).
pub fn exp(x: f32) -> f32 {
    use exp_consts::*;
    let x = x.clamp(LO, HI);
    let n = (x * LOG2E).round_ties_even();
    let r = n.mul_add(-LN2_HI, x);
    let r = n.mul_add(-LN2_LO, r);
    let mut p = P[0];
    for c in &P[1..] {
        p = p.mul_add(r, *c);
    }
    let y = (p * r).mul_add(r, r + 1.0);
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// The SwiGLU activation in place: `gate[i] = gate[i] / (1 + e^-gate[i]) * up[i]` (SiLU
/// of the gate times the up projection), with [`exp`].
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + exp(-*g)) * u;
    }
}

/// Reference f16 (LE bytes) to f32.
pub fn f16_bytes_to_f32(src: &[u8], out: &mut [f32]) {
    for (o, b) in out.iter_mut().zip(src.chunks_exact(2)) {
        *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
    }
}

/// Reference unpack: reads code `i` from bits `[i*b, (i+1)*b)`.
pub fn unpack_f32(src: &[u8], bits: u8, out: &mut [f32]) {
    let b = bits as usize;
    let mask = (1u32 << b) - 1;
    for (i, o) in out.iter_mut().enumerate() {
        let bit = i * b;
        let byte = bit / 8;
        let lo = src[byte] as u32;
        let hi = if byte + 1 < src.len() { src[byte + 1] as u32 } else { 0 };
        *o = (((lo | (hi << 8)) >> (bit % 8)) & mask) as f32;
    }
}

/// Reference pack.
pub fn pack_append(codes: &[u8], bits: u8, dst: &mut Vec<u8>) {
    let mut acc: u32 = 0;
    let mut n: u32 = 0;
    for &c in codes {
        acc |= (c as u32) << n;
        n += bits as u32;
        while n >= 8 {
            dst.push(acc as u8);
            acc >>= 8;
            n -= 8;
        }
    }
    if n > 0 {
        dst.push(acc as u8);
    }
}

/// The fixed horizontal sum of 8 lanes: lanes `(i, i + 4)`, then `(i, i + 2)`, then
/// `(0, 1)` (what the AVX2 horizontal sum computes, in the same order).
#[inline]
pub fn hsum8(a: [f32; 8]) -> f32 {
    let q = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    let p = [q[0] + q[2], q[1] + q[3]];
    p[0] + p[1]
}

/// Reference of one [`super::linear_rows`] output: 8 lanes of fused multiply-adds over
/// `k`, the lanes summed by [`hsum8`], then the tail.
pub fn row_dot(a: &[f32], b: &[f32]) -> f32 {
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

/// One task of [`super::linear_rows`]: `t[jj * m + i] = row_dot(x_i, w_jj)` for the
/// rows of `w` (as many as `t` has columns) and the `m` rows of `x`.
pub(crate) fn linear_block(x: &[f32], m: usize, w: &[f32], k: usize, t: &mut [f32]) {
    for (jj, col) in t.chunks_mut(m).enumerate() {
        let wj = &w[jj * k..][..k];
        for (i, o) in col.iter_mut().enumerate() {
            *o = row_dot(&x[i * k..][..k], wj);
        }
    }
}
