//! The device layout of one packed stream and its conversion from / to the CPU's
//! [`PackedStream`].
//!
//! On the device a stream is struct-of-arrays over its `n` groups, with no blocks:
//! `bits`, `m`, `s` (f16 bit patterns), `n_out` (the CPU's 6 metadata bytes per group),
//! `code_off` / `out_off` (`n + 1` prefix offsets, u32, so every kernel finds group `t`
//! without a scan), one `codes` buffer holding every group's code bytes back to back
//! (each group byte-aligned, LSB-first packing, raw groups as little-endian f16), and
//! the outliers' `out_idx` (u8) and `out_val` (f16 bits). A group's code and outlier
//! bytes are exactly the CPU store's bytes; only the block slack and paging differ.

use crate::error::{KernelError, Result};
use crate::quant::{self, GroupMeta, MAX_BITS, QuantSpec, RAW, Scheme};
use crate::store::PackedStream;
use half::f16;

/// Host mirror of a stream's device buffers.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StreamImage {
    /// Group length (head_dim).
    pub d: usize,
    /// Widths (0..=8 or [`RAW`]).
    pub bits: Vec<u8>,
    /// Grid origins, f16 bits.
    pub m: Vec<u16>,
    /// Steps, f16 bits.
    pub s: Vec<u16>,
    /// Outliers per group.
    pub n_out: Vec<u8>,
    /// Byte offset of each group's codes, plus the end (`n + 1` entries).
    pub code_off: Vec<u32>,
    /// Index of each group's first outlier, plus the end (`n + 1` entries).
    pub out_off: Vec<u32>,
    /// Code bytes.
    pub codes: Vec<u8>,
    /// Outlier positions.
    pub out_idx: Vec<u8>,
    /// Outlier values, f16 bits.
    pub out_val: Vec<u16>,
}

/// Outliers per side for groups of `d` values, capped as the encoder caps them.
pub fn outlier_counts(spec: &QuantSpec, d: usize) -> (usize, usize) {
    let (k_lo, k_hi) = spec.outliers.counts(d);
    let k_lo = k_lo.min(d - 1);
    (k_lo, k_hi.min(d - 1 - k_lo))
}

/// Prefix offsets of codes and outliers for groups of `d` values at widths `bits`,
/// each quantized group holding `n_out` outliers and each raw group none. Errors on a
/// width outside 0..=8 / raw or offsets past u32.
pub fn offsets(bits: &[u8], d: usize, n_out: usize) -> Result<(Vec<u32>, Vec<u32>)> {
    let (mut co, mut oo) = (Vec::with_capacity(bits.len() + 1), Vec::with_capacity(bits.len() + 1));
    let (mut c, mut o) = (0usize, 0usize);
    let too_big = || KernelError::Config("stream too large for u32 offsets".to_string());
    for &b in bits {
        if b > MAX_BITS && b != RAW {
            return Err(KernelError::Config(format!("width {b} outside 0..=8 (or raw)")));
        }
        co.push(u32::try_from(c).map_err(|_| too_big())?);
        oo.push(u32::try_from(o).map_err(|_| too_big())?);
        c += quant::code_bytes(b, d);
        o += if b == RAW { 0 } else { n_out };
    }
    co.push(u32::try_from(c).map_err(|_| too_big())?);
    oo.push(u32::try_from(o).map_err(|_| too_big())?);
    Ok((co, oo))
}

impl StreamImage {
    /// Number of groups.
    pub fn len(&self) -> usize {
        self.bits.len()
    }
    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.bits.is_empty()
    }

    /// The device layout of `stream`: the same bytes per group.
    pub fn from_stream(stream: &PackedStream) -> Result<Self> {
        let d = stream.d();
        let mut img = StreamImage { d, ..Default::default() };
        img.code_off.push(0);
        img.out_off.push(0);
        for b in stream.blocks() {
            b.for_each(d, |_, g| {
                img.bits.push(g.meta.bits);
                img.m.push(g.meta.m.to_bits());
                img.s.push(g.meta.s.to_bits());
                img.n_out.push(g.meta.n_out);
                img.codes.extend_from_slice(&g.codes[..g.meta.code_bytes(d)]);
                img.out_idx.extend_from_slice(g.out_idx);
                img.out_val.extend(g.out_val.iter().map(|v| v.to_bits()));
                img.code_off.push(img.codes.len() as u32);
                img.out_off.push(img.out_idx.len() as u32);
            });
        }
        if img.codes.len() > u32::MAX as usize || img.out_idx.len() > u32::MAX as usize {
            return Err(KernelError::Config("stream too large for u32 offsets".to_string()));
        }
        Ok(img)
    }

    /// Metadata of group `t`.
    pub fn meta(&self, t: usize) -> GroupMeta {
        GroupMeta {
            m: f16::from_bits(self.m[t]),
            s: f16::from_bits(self.s[t]),
            bits: self.bits[t],
            n_out: self.n_out[t],
        }
    }

    /// Code bytes of group `t`.
    pub fn group_codes(&self, t: usize) -> &[u8] {
        &self.codes[self.code_off[t] as usize..self.code_off[t + 1] as usize]
    }

    /// Outliers of group `t`: positions and values.
    pub fn group_outliers(&self, t: usize) -> (&[u8], Vec<f16>) {
        let r = self.out_off[t] as usize..self.out_off[t + 1] as usize;
        (&self.out_idx[r.clone()], self.out_val[r].iter().map(|&v| f16::from_bits(v)).collect())
    }

    /// Checks that the arrays are consistent (lengths, offsets, widths) — what a stream
    /// downloaded from the device must satisfy before it is trusted.
    pub fn validate(&self) -> Result<()> {
        let n = self.len();
        for (what, len) in [("m", self.m.len()), ("s", self.s.len()), ("n_out", self.n_out.len())] {
            if len != n {
                return Err(KernelError::Shape { what, expected: n, got: len });
            }
        }
        for (what, len) in [("code_off", self.code_off.len()), ("out_off", self.out_off.len())] {
            if len != n + 1 {
                return Err(KernelError::Shape { what, expected: n + 1, got: len });
            }
        }
        for t in 0..n {
            let (b, no) = (self.bits[t], self.n_out[t] as usize);
            if b > MAX_BITS && b != RAW {
                return Err(KernelError::Config(format!("group {t}: width {b}")));
            }
            let cb = (self.code_off[t + 1] as usize).checked_sub(self.code_off[t] as usize);
            if cb != Some(quant::code_bytes(b, self.d)) {
                return Err(KernelError::Config(format!("group {t}: code offsets do not match width {b}")));
            }
            if (self.out_off[t + 1] as usize).checked_sub(self.out_off[t] as usize) != Some(no) {
                return Err(KernelError::Config(format!("group {t}: outlier offsets do not match {no} outliers")));
            }
        }
        let (ce, oe) = (self.code_off[n] as usize, self.out_off[n] as usize);
        if ce != self.codes.len() || oe != self.out_idx.len() || oe != self.out_val.len() {
            return Err(KernelError::Config("buffer lengths do not match the offsets".to_string()));
        }
        Ok(())
    }

    /// Rebuilds the CPU stream (same groups, same bytes) with quantizer `spec`.
    pub fn to_stream(&self, spec: QuantSpec) -> Result<PackedStream> {
        self.validate()?;
        let mut s = PackedStream::new(self.d, spec, false);
        for t in 0..self.len() {
            let (idx, val) = self.group_outliers(t);
            s.push_encoded(self.meta(t), self.group_codes(t), idx, &val)?;
        }
        Ok(s)
    }

    /// Bytes this stream occupies on the device (every buffer, offsets included).
    pub fn device_bytes(&self) -> usize {
        let n = self.len();
        n * quant::META_BYTES + 4 * (2 * (n + 1)) + self.codes.len() + self.out_idx.len() + 2 * self.out_val.len()
    }
}

/// The scheme's code for the kernels (`QAQ_MIDPOINT` / `QAQ_MEAN_CENTRED`).
pub fn scheme_code(s: Scheme) -> u32 {
    match s {
        Scheme::Midpoint => 0,
        Scheme::MeanCentred => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::Outliers;
    use crate::store::BLOCK_TOKENS;

    fn rows(n: usize, d: usize) -> Vec<Vec<f32>> {
        (0..n)
            .map(|t| (0..d).map(|i| f16::from_f32((((t * 13 + i * 7) % 29) as f32 - 14.0) / 3.0).to_f32()).collect())
            .collect()
    }

    fn mixed_stream(spec: QuantSpec, n: usize, d: usize) -> PackedStream {
        let mut s = PackedStream::new(d, spec, false);
        for (t, r) in rows(n, d).iter().enumerate() {
            s.push(r, [0u8, 1, 2, 3, 4, 5, 6, 7, 8, RAW][t % 10]).unwrap();
        }
        s
    }

    #[test]
    fn offsets_are_prefix_sums_of_code_and_outlier_bytes() {
        let (co, oo) = offsets(&[3, 0, RAW, 8, 1], 64, 2).unwrap();
        assert_eq!(co, vec![0, 24, 24, 24 + 128, 24 + 128 + 64, 24 + 128 + 64 + 8]);
        assert_eq!(oo, vec![0, 2, 4, 4, 6, 8]);
        assert_eq!(offsets(&[], 64, 2).unwrap(), (vec![0], vec![0]));
        assert!(offsets(&[9], 64, 2).is_err());
    }

    #[test]
    fn image_holds_the_stores_bytes_and_round_trips() {
        for spec in [
            QuantSpec::default(),
            QuantSpec { scheme: Scheme::MeanCentred, outliers: Outliers { alpha: 0.1, ..Outliers::PAPER } },
        ] {
            let s = mixed_stream(spec, 2 * BLOCK_TOKENS + 5, 64);
            let img = StreamImage::from_stream(&s).unwrap();
            img.validate().unwrap();
            assert_eq!(img.len(), s.len());
            let bits: Vec<u8> = (0..s.len()).map(|t| s.meta(t).unwrap().bits).collect();
            let k = outlier_counts(&spec, 64);
            let (co, oo) = offsets(&bits, 64, k.0 + k.1).unwrap();
            assert_eq!((co, oo), (img.code_off.clone(), img.out_off.clone()));
            // Same groups byte for byte: compare each group with the block it came from.
            let mut t = 0;
            for b in s.blocks() {
                b.for_each(64, |_, g| {
                    assert_eq!(img.meta(t), g.meta);
                    assert_eq!(img.group_codes(t), &g.codes[..g.meta.code_bytes(64)]);
                    let (idx, val) = img.group_outliers(t);
                    assert_eq!((idx, val.as_slice()), (g.out_idx, g.out_val));
                    t += 1;
                });
            }
            let back = img.to_stream(spec).unwrap();
            assert_eq!(back.bytes(), s.bytes());
            let (mut x, mut y) = ([0f32; 64], [0f32; 64]);
            for t in 0..s.len() {
                assert!(s.decode(t, &mut x) && back.decode(t, &mut y));
                assert_eq!(x.map(f32::to_bits), y.map(f32::to_bits), "t {t}");
            }
            assert_eq!(StreamImage::from_stream(&back).unwrap(), img);
            let meta = 6 * img.len() + 8 * (img.len() + 1);
            assert_eq!(img.device_bytes(), meta + img.codes.len() + 3 * img.out_idx.len());
        }
    }

    #[test]
    fn validate_rejects_inconsistent_images() {
        let img = StreamImage::from_stream(&mixed_stream(QuantSpec::default(), 12, 16)).unwrap();
        let mut bad = img.clone();
        bad.code_off[3] += 1;
        assert!(bad.validate().is_err());
        let mut bad = img.clone();
        bad.bits[2] = 9;
        assert!(bad.to_stream(QuantSpec::default()).is_err());
        let mut bad = img.clone();
        bad.out_val.pop();
        assert!(bad.validate().is_err());
        let mut bad = img;
        bad.m.pop();
        assert!(bad.validate().is_err());
    }
}
