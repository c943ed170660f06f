//! KIVI-style key storage: keys quantized per channel over groups of `G` tokens (one
//! f16 min and scale per channel and group, midpoint grid), the most recent tokens kept
//! in fp16 until `R + G` of them have accumulated, then the oldest `G` are quantized.
//! (KIVI's values are per-token, stored in a [`crate::store::PackedStream`].)

use crate::base::{check_finite, code_bytes, f16_down, f16_up};
use crate::error::Result;
use crate::simd;
use crate::store::{Bytes, SLACK};
use half::f16;

#[derive(Clone, Debug)]
struct Chunk {
    m: Vec<f16>,
    s: Vec<f16>,
    /// `group` rows of `d` codes each, bit-packed per row, plus slack.
    codes: Vec<u8>,
}

/// Keys of one (layer, KV head) under the KIVI baseline.
#[derive(Clone, Debug)]
pub struct KiviKeys {
    d: usize,
    bits: u8,
    group: usize,
    residual: usize,
    chunks: Vec<Chunk>,
    /// fp16 rows (LE bytes) not yet quantized.
    tail: Vec<u8>,
}

impl KiviKeys {
    /// Empty store.
    pub fn new(d: usize, bits: u8, group: usize, residual: usize) -> Self {
        KiviKeys { d, bits, group: group.max(1), residual, chunks: Vec::new(), tail: Vec::new() }
    }
    fn tail_len(&self) -> usize {
        self.tail.len() / (2 * self.d)
    }
    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.chunks.len() * self.group + self.tail_len()
    }
    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Tokens already quantized (the rest are fp16).
    pub fn quantized_len(&self) -> usize {
        self.chunks.len() * self.group
    }
    /// Width of the quantized keys.
    pub fn bits(&self) -> u8 {
        self.bits
    }
    fn row_bytes(&self) -> usize {
        code_bytes(self.bits, self.d)
    }

    /// Appends one key row (f16-representable values).
    pub fn push(&mut self, x: &[f32]) -> Result<()> {
        check_finite(x, "key row")?;
        for &v in x {
            self.tail.extend_from_slice(&f16::from_f32(v).to_le_bytes());
        }
        if self.tail_len() >= self.residual + self.group {
            self.quantize_oldest();
        }
        Ok(())
    }

    fn quantize_oldest(&mut self) {
        let (d, g) = (self.d, self.group);
        let mut rows = vec![0f32; g * d];
        simd::scalar::f16_bytes_to_f32(&self.tail[..2 * g * d], &mut rows);
        let levels = (1u32 << self.bits) as f32;
        let mut m = Vec::with_capacity(d);
        let mut s = Vec::with_capacity(d);
        for c in 0..d {
            let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
            for r in 0..g {
                lo = lo.min(rows[r * d + c]);
                hi = hi.max(rows[r * d + c]);
            }
            let mh = f16_down(lo);
            m.push(mh);
            s.push(f16_up((hi - mh.to_f32()) / levels));
        }
        let mut codes = Vec::with_capacity(g * self.row_bytes() + SLACK);
        let mut cr = vec![0u8; d];
        for r in 0..g {
            for c in 0..d {
                let (mf, sf) = (m[c].to_f32(), s[c].to_f32());
                cr[c] = if self.bits == 0 || sf == 0.0 {
                    0
                } else {
                    ((rows[r * d + c] - mf) / sf).floor().clamp(0.0, levels - 1.0) as u8
                };
            }
            if self.bits > 0 {
                simd::pack_append(&cr, self.bits, &mut codes);
            }
        }
        codes.extend_from_slice(&[0; SLACK]);
        self.chunks.push(Chunk { m, s, codes });
        self.tail.drain(..2 * g * d);
    }

    /// Scores of every token against `g` queries (`qs`, `g * d`, already scaled):
    /// `scores[j * t_total + t]`.
    pub fn scores(&self, qs: &[f32], g: usize, scores: &mut [f32]) {
        let (d, t_total) = (self.d, self.len());
        let rb = self.row_bytes();
        let mut tmp = vec![0f32; d];
        let mut qeff = vec![0f32; g * d];
        let mut cst = vec![0f32; g];
        for (ci, ch) in self.chunks.iter().enumerate() {
            for j in 0..g {
                let q = &qs[j * d..(j + 1) * d];
                cst[j] = 0.0;
                for i in 0..d {
                    let (m, s) = (ch.m[i].to_f32(), ch.s[i].to_f32());
                    qeff[j * d + i] = q[i] * s;
                    cst[j] += q[i] * (m + 0.5 * s);
                }
            }
            for r in 0..self.group {
                let t = ci * self.group + r;
                if self.bits > 0 {
                    simd::unpack_f32(&ch.codes[r * rb..], self.bits, &mut tmp);
                }
                for j in 0..g {
                    let dotv = if self.bits > 0 { simd::dot(&qeff[j * d..(j + 1) * d], &tmp) } else { 0.0 };
                    scores[j * t_total + t] = cst[j] + dotv;
                }
            }
        }
        let t0 = self.chunks.len() * self.group;
        for (r, row) in self.tail.chunks_exact(2 * d).enumerate() {
            simd::f16_bytes_to_f32(row, &mut tmp);
            for j in 0..g {
                scores[j * t_total + t0 + r] = simd::dot(&qs[j * d..(j + 1) * d], &tmp);
            }
        }
    }

    /// Decodes token `t` into `out`.
    pub fn decode(&self, t: usize, out: &mut [f32]) -> bool {
        let (d, g) = (self.d, self.group);
        if let Some(ch) = self.chunks.get(t / g) {
            let r = t % g;
            if self.bits > 0 {
                simd::unpack_f32(&ch.codes[r * self.row_bytes()..], self.bits, out);
            } else {
                out.fill(0.0);
            }
            for ((o, m), s) in out.iter_mut().zip(&ch.m).zip(&ch.s) {
                *o = m.to_f32() + (*o + 0.5) * s.to_f32();
            }
            return true;
        }
        let r = t - self.chunks.len() * g;
        match self.tail.get(2 * r * d..2 * (r + 1) * d) {
            Some(row) => {
                simd::f16_bytes_to_f32(row, out);
                true
            }
            None => false,
        }
    }

    /// Byte accounting (per-channel metadata: 4 bytes per channel and chunk).
    pub fn bytes(&self) -> Bytes {
        let d = self.d;
        let mut a = Bytes::default();
        let nq = self.chunks.len() * self.group;
        let bits = d * self.bits as usize;
        a.codes = nq * (bits / 8) + self.tail.len();
        a.padding = nq * (self.row_bytes() - bits / 8) + self.chunks.len() * SLACK;
        a.metadata = self.chunks.len() * 4 * d;
        a.paper_bits = (nq * bits) as f64 + (self.chunks.len() * 32 * d) as f64 + (self.tail.len() * 8) as f64;
        a.groups = self.len();
        a.values = self.len() * d;
        a.width_sum = nq * self.bits as usize + self.tail_len() * 16;
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kivi_keys_quantize_in_chunks_within_bound() {
        let d = 8;
        let mut k = KiviKeys::new(d, 2, 4, 4);
        let rows: Vec<Vec<f32>> = (0..11)
            .map(|t| (0..d).map(|i| f16::from_f32(((t * 7 + i * 3) % 11) as f32 / 4.0 - 1.0).to_f32()).collect())
            .collect();
        for r in &rows {
            k.push(r).unwrap();
        }
        assert_eq!(k.len(), 11);
        assert_eq!(k.chunks.len(), 1, "8 tokens reached R+G once");
        assert_eq!(k.tail_len(), 7);
        let mut out = vec![0f32; d];
        for (t, r) in rows.iter().enumerate() {
            assert!(k.decode(t, &mut out));
            for i in 0..d {
                let s = if t < 4 { k.chunks[0].s[i].to_f32() / 2.0 } else { 0.0 };
                assert!((out[i] - r[i]).abs() <= s * 1.0001 + 1e-6, "t {t} i {i}");
            }
        }
        // scores equal dot with decoded rows
        let q: Vec<f32> = (0..2 * d).map(|i| i as f32 * 0.1 - 0.5).collect();
        let mut sc = vec![0f32; 2 * 11];
        k.scores(&q, 2, &mut sc);
        for t in 0..11 {
            k.decode(t, &mut out);
            for j in 0..2 {
                let e: f32 = (0..d).map(|i| q[j * d + i] * out[i]).sum();
                assert!((sc[j * 11 + t] - e).abs() < 1e-4);
            }
        }
        let b = k.bytes();
        assert_eq!(b.codes, 4 * 2 + 7 * 16);
        assert_eq!(b.metadata, 32);
        assert!(k.push(&[f32::NAN; 8]).is_err());
    }
}
