//! Portable references of the quantized matmul's inner loops: block dequantization of
//! every [`QFormat`], activation quantization ([`QInput`]) and the dot product of one
//! quantized weight row with one quantized activation row. The x86 kernels
//! (`simd::x86::qdot`, `simd::x86::qdot_k`) equal these bit for bit, and these are the
//! [`super::Level::Scalar`] path.
//!
//! The order of every float operation is fixed here:
//! - 32-value formats: each block's integer sum `isum_b` (exact) enters lane `b % 8` of
//!   eight f32 accumulators as `acc += (dw_b * dx_b) * isum_b`, then, for `Q4_1`/`Q5_1`,
//!   `acc += mw_b * sx_b`; the lanes are summed by [`hsum8`].
//! - k-quants: each super-block's integer sums (`isum`: scales times codes times
//!   activations, `msum`: mins times activation sums; exact) enter one accumulator in
//!   order: `acc += (d * dx) * isum`, then `acc -= (dmin * dx) * msum` (formats with
//!   mins).

use super::ggml::{InputKind, QFormat, QInput, QK, QK_K, f16_at, k_scale_min, q3k_scale};
use super::scalar::hsum8;
use half::f16;

/// One row of a [`QInput`].
#[derive(Clone, Copy)]
pub(crate) struct InRow<'a> {
    /// The row's codes (`cols`).
    pub(crate) qs: &'a [i8],
    /// Scales (one per block; padded to a multiple of 8 blocks for `Q8x32`).
    pub(crate) d: &'a [f32],
    /// Code sums (per block for `Q8x32`, per 16 for `Q8x256`).
    pub(crate) sums: &'a [i32],
    /// `d * sum` per block (`Q8x32`).
    pub(crate) s: &'a [f32],
}

impl QInput {
    /// Row `i`.
    pub(crate) fn row(&self, i: usize) -> InRow<'_> {
        let qs = &self.qs[i * self.cols..][..self.cols];
        match self.kind {
            Some(InputKind::Q8x32) => {
                let n = self.nbp;
                InRow { qs, d: &self.d[i * n..][..n], sums: &self.sums[i * n..][..n], s: &self.s[i * n..][..n] }
            }
            _ => {
                let (nsb, n16) = (self.cols / QK_K, self.cols / 16);
                InRow { qs, d: &self.d[i * nsb..][..nsb], sums: &self.sums[i * n16..][..n16], s: &[] }
            }
        }
    }
}

/// Quantizes one 32-value block of activations into `q` as ggml's `q8_0`/`q8_1` do (so a
/// product equals llama.cpp's and candle's up to the order of float additions): the scale
/// `d = max|x| / 127` is stored rounded to f16, the codes are `round(x / d)` with the
/// unrounded `d` (half away from zero), and `s`, the scale times the code sum, is
/// `f16(f16(sum) * d)`. Returns `(d, sum, s)`.
pub(crate) fn quantize_block32(x: &[f32], q: &mut [i8]) -> (f32, i32, f32) {
    let amax = x.iter().fold(0f32, |a, &v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0;
    for (o, &v) in q.iter_mut().zip(x) {
        let c = (v * id).round() as i32;
        sum += c;
        *o = c as i8;
    }
    let dh = f16::from_f32(d).to_f32();
    (dh, sum, f16::from_f32(f16::from_f32(sum as f32).to_f32() * dh).to_f32())
}

/// Quantizes one 256-value block of activations into `q` as ggml's `q8_K` does: with
/// `max` the value of largest magnitude (the first one), `iscale = -127 / max`, the codes
/// are `round(iscale * x)` (half away from zero, at most 127) and the scale `1 / iscale`
/// (f32). Returns the scale.
pub(crate) fn quantize_block256(x: &[f32], q: &mut [i8]) -> f32 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    if amax == 0.0 {
        q.fill(0);
        return 0.0;
    }
    let iscale = -127.0 / max;
    for (o, &v) in q.iter_mut().zip(x) {
        *o = (iscale * v).round().min(127.0) as i8;
    }
    1.0 / iscale
}

/// The buffers of one row of a [`QInput`] (see its fields).
pub(crate) struct RowMut<'a> {
    pub(crate) qs: &'a mut [i8],
    pub(crate) d: &'a mut [f32],
    pub(crate) sums: &'a mut [i32],
    pub(crate) s: &'a mut [f32],
    /// Empty unless the GEMM's interleaved codes are wanted.
    pub(crate) qsi: &'a mut [i8],
}

/// The reference quantization of one row `x` of `kind` into `r` (all but `qsi`).
pub(crate) fn quantize_row(kind: InputKind, x: &[f32], r: RowMut<'_>) {
    match kind {
        InputKind::Q8x32 => {
            for (b, (xb, qb)) in x.chunks_exact(QK).zip(r.qs.chunks_exact_mut(QK)).enumerate() {
                (r.d[b], r.sums[b], r.s[b]) = quantize_block32(xb, qb);
            }
        }
        InputKind::Q8x256 => {
            for (b, (xb, qb)) in x.chunks_exact(QK_K).zip(r.qs.chunks_exact_mut(QK_K)).enumerate() {
                r.d[b] = quantize_block256(xb, qb);
                for (k, c) in qb.chunks_exact(16).enumerate() {
                    r.sums[b * 16 + k] = c.iter().map(|&v| v as i32).sum();
                }
            }
        }
        InputKind::Float => unreachable!("float activations are not quantized"),
    }
}

/// Whether a 32-value format carries a minimum (`Q4_1`, `Q5_1`).
#[inline]
pub(crate) fn has_min(f: QFormat) -> bool {
    matches!(f, QFormat::Q4_1 | QFormat::Q5_1)
}

/// The 32 integer codes of a block of a 32-value format, offsets applied (`Q4_0`:
/// `q - 8`, `Q5_0`: `q - 16`; the minimum formats' codes are unsigned).
pub(crate) fn codes_b32(f: QFormat, blk: &[u8]) -> [i32; QK] {
    let mut q = [0i32; QK];
    let nib = |qs: &[u8], q: &mut [i32; QK]| {
        for i in 0..16 {
            q[i] = (qs[i] & 0xF) as i32;
            q[i + 16] = (qs[i] >> 4) as i32;
        }
    };
    let high = |qh: &[u8], q: &mut [i32; QK]| {
        let bits = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
        for (i, v) in q.iter_mut().enumerate() {
            *v |= (((bits >> i) & 1) as i32) << 4;
        }
    };
    match f {
        QFormat::Q4_0 => {
            nib(&blk[2..18], &mut q);
            q.iter_mut().for_each(|v| *v -= 8);
        }
        QFormat::Q4_1 => nib(&blk[4..20], &mut q),
        QFormat::Q5_0 => {
            nib(&blk[6..22], &mut q);
            high(&blk[2..6], &mut q);
            q.iter_mut().for_each(|v| *v -= 16);
        }
        QFormat::Q5_1 => {
            nib(&blk[8..24], &mut q);
            high(&blk[4..8], &mut q);
        }
        QFormat::Q8_0 => {
            for (v, &b) in q.iter_mut().zip(&blk[2..34]) {
                *v = b as i8 as i32;
            }
        }
        _ => unreachable!("codes_b32: {f} is not a 32-value format"),
    }
    q
}

/// A k-quant super-block as integers: 256 codes (offsets applied), the scale of each
/// 16 values and the min of each 16 values (0 for formats without mins).
pub(crate) struct KBlock {
    pub(crate) q: [i32; QK_K],
    pub(crate) sc: [i32; 16],
    pub(crate) min: [i32; 16],
    pub(crate) d: f32,
    pub(crate) dmin: f32,
}

/// Decodes a k-quant super-block into integers.
pub(crate) fn codes_k(f: QFormat, blk: &[u8]) -> KBlock {
    let mut k = KBlock { q: [0; QK_K], sc: [0; 16], min: [0; 16], d: 0.0, dmin: 0.0 };
    match f {
        QFormat::Q2_K => {
            let (sc, qs) = (&blk[..16], &blk[16..80]);
            (k.d, k.dmin) = (f16_at(blk, 80), f16_at(blk, 82));
            for (j, &b) in sc.iter().enumerate() {
                (k.sc[j], k.min[j]) = ((b & 0xF) as i32, (b >> 4) as i32);
            }
            for (e, v) in k.q.iter_mut().enumerate() {
                let (h, s, l) = (e / 128, e % 128 / 32, e % 32);
                *v = ((qs[32 * h + l] >> (2 * s)) & 3) as i32;
            }
        }
        QFormat::Q3_K => {
            let (hm, qs, sc) = (&blk[..32], &blk[32..96], &blk[96..108]);
            k.d = f16_at(blk, 108);
            for j in 0..16 {
                k.sc[j] = q3k_scale(sc, j);
            }
            for (e, v) in k.q.iter_mut().enumerate() {
                let (h, s, l) = (e / 128, e % 128 / 32, e % 32);
                let low = ((qs[32 * h + l] >> (2 * s)) & 3) as i32;
                let high = ((hm[l] >> (e / 32)) & 1) as i32;
                *v = low + 4 * high - 4;
            }
        }
        QFormat::Q4_K | QFormat::Q5_K => {
            (k.d, k.dmin) = (f16_at(blk, 0), f16_at(blk, 2));
            let sc = &blk[4..16];
            for j in 0..8 {
                let (s, m) = k_scale_min(sc, j);
                (k.sc[2 * j], k.sc[2 * j + 1]) = (s as i32, s as i32);
                (k.min[2 * j], k.min[2 * j + 1]) = (m as i32, m as i32);
            }
            let (qh, qs) = if f == QFormat::Q5_K { (Some(&blk[16..48]), &blk[48..176]) } else { (None, &blk[16..144]) };
            for (e, v) in k.q.iter_mut().enumerate() {
                let (g, l) = (e / 32, e % 32);
                let byte = qs[32 * (g / 2) + l];
                *v = (if g % 2 == 0 { byte & 0xF } else { byte >> 4 }) as i32;
                if let Some(qh) = qh {
                    *v |= (((qh[l] >> g) & 1) as i32) << 4;
                }
            }
        }
        QFormat::Q6_K => {
            let (ql, qh, sc) = (&blk[..128], &blk[128..192], &blk[192..208]);
            k.d = f16_at(blk, 208);
            for (s, &b) in k.sc.iter_mut().zip(sc) {
                *s = b as i8 as i32;
            }
            for (e, v) in k.q.iter_mut().enumerate() {
                let (h, s, l) = (e / 128, e % 128 / 32, e % 32);
                let byte = ql[64 * h + 32 * (s % 2) + l];
                let low = if s < 2 { byte & 0xF } else { byte >> 4 };
                let high = (qh[32 * h + l] >> (2 * s)) & 3;
                *v = (low | (high << 4)) as i32 - 32;
            }
        }
        _ => unreachable!("codes_k: {f} is not a k-quant"),
    }
    k
}

/// Dequantizes one block of `f` (`f.block_values()` values) into `out`.
pub(crate) fn dequantize_block(f: QFormat, blk: &[u8], out: &mut [f32]) {
    match f {
        QFormat::F32 => out[0] = f32::from_le_bytes([blk[0], blk[1], blk[2], blk[3]]),
        QFormat::F16 => out[0] = f16_at(blk, 0),
        QFormat::BF16 => out[0] = f32::from_bits((u16::from_le_bytes([blk[0], blk[1]]) as u32) << 16),
        QFormat::Q4_0 | QFormat::Q5_0 | QFormat::Q8_0 => {
            let d = f16_at(blk, 0);
            for (o, q) in out.iter_mut().zip(codes_b32(f, blk)) {
                *o = d * q as f32;
            }
        }
        QFormat::Q4_1 | QFormat::Q5_1 => {
            let (d, m) = (f16_at(blk, 0), f16_at(blk, 2));
            for (o, q) in out.iter_mut().zip(codes_b32(f, blk)) {
                *o = d * q as f32 + m;
            }
        }
        _ => {
            let k = codes_k(f, blk);
            for (e, o) in out[..QK_K].iter_mut().enumerate() {
                let (s, m) = (k.sc[e / 16] as f32, k.min[e / 16] as f32);
                *o = match f {
                    QFormat::Q3_K | QFormat::Q6_K => (k.d * s) * k.q[e] as f32,
                    _ => (k.d * s) * k.q[e] as f32 - k.dmin * m,
                };
            }
        }
    }
}

/// Dequantizes a row of blocks (`out.len()` values).
pub(crate) fn dequantize_row(f: QFormat, row: &[u8], out: &mut [f32]) {
    let (bv, bb) = (f.block_values(), f.block_bytes());
    for (blk, o) in row.chunks_exact(bb).zip(out.chunks_exact_mut(bv)) {
        dequantize_block(f, blk, o);
    }
}

/// Dot product of a weight row of a 32-value format with an activation row.
pub(crate) fn dot_b32(f: QFormat, wrow: &[u8], x: InRow<'_>) -> f32 {
    let bb = f.block_bytes();
    let mut acc = [0f32; 8];
    for (b, blk) in wrow.chunks_exact(bb).enumerate() {
        let q = codes_b32(f, blk);
        let isum: i32 = q.iter().zip(&x.qs[b * QK..][..QK]).map(|(&w, &v)| w * v as i32).sum();
        let l = b % 8;
        acc[l] += (f16_at(blk, 0) * x.d[b]) * isum as f32;
        if has_min(f) {
            acc[l] += f16_at(blk, 2) * x.s[b];
        }
    }
    hsum8(acc)
}

/// The integer sums of one k-quant super-block with 256 activation codes `xq` and their
/// sums per 16 `bsums`: `(isum, msum)`.
pub(crate) fn ints_k(f: QFormat, blk: &[u8], xq: &[i8], bsums: &[i32]) -> (i32, i32) {
    let k = codes_k(f, blk);
    let isum = (0..QK_K).map(|e| k.sc[e / 16] * k.q[e] * xq[e] as i32).sum();
    let msum = (0..16).map(|j| k.min[j] * bsums[j]).sum();
    (isum, msum)
}

/// Whether a k-quant carries mins (`Q2_K`, `Q4_K`, `Q5_K`).
#[inline]
pub(crate) fn k_has_min(f: QFormat) -> bool {
    matches!(f, QFormat::Q2_K | QFormat::Q4_K | QFormat::Q5_K)
}

/// `d` and `dmin` of a k-quant super-block.
#[inline]
pub(crate) fn k_scales(f: QFormat, blk: &[u8]) -> (f32, f32) {
    match f {
        QFormat::Q2_K => (f16_at(blk, 80), f16_at(blk, 82)),
        QFormat::Q3_K => (f16_at(blk, 108), 0.0),
        QFormat::Q6_K => (f16_at(blk, 208), 0.0),
        _ => (f16_at(blk, 0), f16_at(blk, 2)),
    }
}

/// Adds one super-block's sums to the accumulator (the fixed float order of the
/// k-quants).
#[inline]
pub(crate) fn k_accumulate(f: QFormat, acc: f32, d: f32, dmin: f32, dx: f32, isum: i32, msum: i32) -> f32 {
    let acc = acc + (d * dx) * isum as f32;
    if k_has_min(f) { acc - (dmin * dx) * msum as f32 } else { acc }
}

/// Dot product of a k-quant weight row with an activation row.
pub(crate) fn dot_k(f: QFormat, wrow: &[u8], x: InRow<'_>) -> f32 {
    let mut acc = 0f32;
    for (b, blk) in wrow.chunks_exact(f.block_bytes()).enumerate() {
        let (isum, msum) = ints_k(f, blk, &x.qs[b * QK_K..][..QK_K], &x.sums[b * 16..][..16]);
        let (d, dmin) = k_scales(f, blk);
        acc = k_accumulate(f, acc, d, dmin, x.d[b], isum, msum);
    }
    acc
}

/// Dot product of a quantized weight row with an activation row (the reference of every
/// output of the quantized matmul).
pub(crate) fn dot_row(f: QFormat, wrow: &[u8], x: InRow<'_>) -> f32 {
    if f.block_values() == QK { dot_b32(f, wrow, x) } else { dot_k(f, wrow, x) }
}

/// Where a task writes: output `(i, j)` (activation row `i`, the task's weight row `j`)
/// at `ptr + i * stride + j`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct OutTile {
    pub(crate) ptr: *mut f32,
    pub(crate) stride: usize,
}

// SAFETY: an `OutTile` is a plain address; the tasks that share one write disjoint
// elements (the contract of `matmul_task`).
unsafe impl Send for OutTile {}
// SAFETY: as above.
unsafe impl Sync for OutTile {}

impl OutTile {
    /// The tile whose column 0 is this one's column `j`.
    #[inline]
    pub(crate) fn columns_from(self, j: usize) -> OutTile {
        OutTile { ptr: self.ptr.wrapping_add(j), stride: self.stride }
    }

    /// The tile whose row 0 is this one's row `i`.
    #[inline]
    pub(crate) fn rows_from(self, i: usize) -> OutTile {
        OutTile { ptr: self.ptr.wrapping_add(i * self.stride), stride: self.stride }
    }

    /// # Safety
    /// Element `(i, j)` is valid for writes and written by no one else meanwhile.
    #[inline]
    pub(crate) unsafe fn put(self, i: usize, j: usize, v: f32) {
        // SAFETY: the caller's contract.
        unsafe { *self.ptr.add(i * self.stride + j) = v };
    }
}
