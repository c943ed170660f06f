//! The GGUF weight formats the quantized matmul reads ([`QFormat`]: ggml's type ids,
//! block sizes in values and bytes, the byte offsets inside a block), and the layout of
//! the activations quantized for its integer dot products ([`QInput`]).
//!
//! Block layouts (little-endian, `d`/`m`/`dmin` are f16):
//! - `Q4_0` (32 values, 18 bytes): `d`, 16 bytes of nibbles; byte `i` holds value `i` in
//!   its low nibble and value `i + 16` in its high nibble; value = `(q - 8) * d`.
//! - `Q4_1` (32, 20): `d`, `m`, nibbles as `Q4_0`; value = `q * d + m`.
//! - `Q5_0` (32, 22): `d`, a u32 of fifth bits (bit `i` for value `i`), nibbles; value =
//!   `(q - 16) * d`.
//! - `Q5_1` (32, 24): `d`, `m`, fifth bits, nibbles; value = `q * d + m`.
//! - `Q8_0` (32, 34): `d`, 32 i8; value = `q * d`.
//! - `Q2_K` (256, 84): 16 bytes of (4-bit scale | 4-bit min << 4) per 16 values, 64 bytes
//!   of 2-bit codes, `d`, `dmin`. Value `e` (`h = e / 128`, `k = e % 128 / 32`,
//!   `l = e % 32`): `q = qs[32 h + l] >> 2k & 3`; value = `d * sc * q - dmin * min`.
//! - `Q3_K` (256, 110): 32 bytes of high bits (bit `e / 32` of byte `e % 32`), 64 bytes of
//!   low 2-bit codes as `Q2_K`, 12 bytes of 16 six-bit scales, `d`; the code is
//!   `low - 4` when the high bit is clear, `low` when set; value = `d * (sc - 32) * q`.
//! - `Q4_K` (256, 144): `d`, `dmin`, 12 bytes of eight 6-bit scales and mins (one each
//!   per 32 values, [`k_scale_min`]), 128 bytes of nibbles: bytes `32c..32c+32` hold
//!   sub-block `2c` in their low nibbles and `2c + 1` in their high nibbles; value =
//!   `d * sc * q - dmin * min`.
//! - `Q5_K` (256, 176): `d`, `dmin`, scales as `Q4_K`, 32 bytes of fifth bits (bit `e / 32`
//!   of byte `e % 32`), nibbles as `Q4_K`.
//! - `Q6_K` (256, 210): 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 i8
//!   scales (one per 16 values), `d`. Value `e` (`h = e / 128`, `k = e % 128 / 32`,
//!   `l = e % 32`): low nibble of `ql[64 h + 32 (k % 2) + l]` (the high nibble when
//!   `k >= 2`), bits `2k..2k+2` of `qh[32 h + l]` above it, minus 32; value =
//!   `d * sc * q`.

use crate::error::{KernelError, Result};

/// Values per block of the 32-value formats.
pub(crate) const QK: usize = 32;
/// Values per super-block of the k-quants.
pub(crate) const QK_K: usize = 256;

/// A weight format of a GGUF tensor (ggml's type, with ggml's names).
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QFormat {
    /// 32-bit floats.
    F32,
    /// IEEE half floats.
    F16,
    /// bfloat16.
    BF16,
    /// 4-bit codes, one f16 scale per 32 values.
    Q4_0,
    /// 4-bit codes, an f16 scale and minimum per 32 values.
    Q4_1,
    /// 5-bit codes, one f16 scale per 32 values.
    Q5_0,
    /// 5-bit codes, an f16 scale and minimum per 32 values.
    Q5_1,
    /// 8-bit codes, one f16 scale per 32 values.
    Q8_0,
    /// k-quant, 2-bit codes, 4-bit scales and mins per 16 values.
    Q2_K,
    /// k-quant, 3-bit codes, 6-bit scales per 16 values.
    Q3_K,
    /// k-quant, 4-bit codes, 6-bit scales and mins per 32 values.
    Q4_K,
    /// k-quant, 5-bit codes, 6-bit scales and mins per 32 values.
    Q5_K,
    /// k-quant, 6-bit codes, 8-bit scales per 16 values.
    Q6_K,
}

/// How the activations of a product with a format are given to its kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputKind {
    /// f32 values as they are (float weight formats).
    Float,
    /// i8 codes with an f32 scale, the sum of the codes and the scale times that sum per
    /// 32 values (`Q4_0` .. `Q8_0`).
    Q8x32,
    /// i8 codes with an f32 scale per 256 values and the sum of the codes per 16 (the
    /// k-quants).
    Q8x256,
}

impl QFormat {
    /// Every supported format.
    pub const ALL: [QFormat; 13] = [
        QFormat::F32,
        QFormat::F16,
        QFormat::BF16,
        QFormat::Q4_0,
        QFormat::Q4_1,
        QFormat::Q5_0,
        QFormat::Q5_1,
        QFormat::Q8_0,
        QFormat::Q2_K,
        QFormat::Q3_K,
        QFormat::Q4_K,
        QFormat::Q5_K,
        QFormat::Q6_K,
    ];

    /// ggml's type id (the `type` field of a GGUF tensor).
    pub fn ggml_type(self) -> u32 {
        match self {
            QFormat::F32 => 0,
            QFormat::F16 => 1,
            QFormat::Q4_0 => 2,
            QFormat::Q4_1 => 3,
            QFormat::Q5_0 => 6,
            QFormat::Q5_1 => 7,
            QFormat::Q8_0 => 8,
            QFormat::Q2_K => 10,
            QFormat::Q3_K => 11,
            QFormat::Q4_K => 12,
            QFormat::Q5_K => 13,
            QFormat::Q6_K => 14,
            QFormat::BF16 => 30,
        }
    }

    /// The format of a ggml type id; other types (the i-quants, `Q8_1`, `Q8_K`, integer
    /// and f64 tensors, ternary and fp4 formats) are a [`KernelError::Config`] naming
    /// the type and the supported ones.
    pub fn from_ggml_type(id: u32) -> Result<QFormat> {
        if let Some(f) = QFormat::ALL.into_iter().find(|f| f.ggml_type() == id) {
            return Ok(f);
        }
        let name = match id {
            9 => "Q8_1",
            15 => "Q8_K",
            16 => "IQ2_XXS",
            17 => "IQ2_XS",
            18 => "IQ3_XXS",
            19 => "IQ1_S",
            20 => "IQ4_NL",
            21 => "IQ3_S",
            22 => "IQ2_S",
            23 => "IQ4_XS",
            24 => "I8",
            25 => "I16",
            26 => "I32",
            27 => "I64",
            28 => "F64",
            29 => "IQ1_M",
            34 => "TQ1_0",
            35 => "TQ2_0",
            39 => "MXFP4",
            _ => "unknown",
        };
        let supported: Vec<&str> = QFormat::ALL.iter().map(|f| f.name()).collect();
        Err(KernelError::Config(format!(
            "unsupported GGUF tensor type {id} ({name}); supported types: {}",
            supported.join(", ")
        )))
    }

    /// ggml's name of the type (`"Q4_K"`).
    pub fn name(self) -> &'static str {
        match self {
            QFormat::F32 => "F32",
            QFormat::F16 => "F16",
            QFormat::BF16 => "BF16",
            QFormat::Q4_0 => "Q4_0",
            QFormat::Q4_1 => "Q4_1",
            QFormat::Q5_0 => "Q5_0",
            QFormat::Q5_1 => "Q5_1",
            QFormat::Q8_0 => "Q8_0",
            QFormat::Q2_K => "Q2_K",
            QFormat::Q3_K => "Q3_K",
            QFormat::Q4_K => "Q4_K",
            QFormat::Q5_K => "Q5_K",
            QFormat::Q6_K => "Q6_K",
        }
    }

    /// Values per block (1 for the float formats).
    pub fn block_values(self) -> usize {
        match self {
            QFormat::F32 | QFormat::F16 | QFormat::BF16 => 1,
            QFormat::Q4_0 | QFormat::Q4_1 | QFormat::Q5_0 | QFormat::Q5_1 | QFormat::Q8_0 => QK,
            QFormat::Q2_K | QFormat::Q3_K | QFormat::Q4_K | QFormat::Q5_K | QFormat::Q6_K => QK_K,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            QFormat::F32 => 4,
            QFormat::F16 | QFormat::BF16 => 2,
            QFormat::Q4_0 => 18,
            QFormat::Q4_1 => 20,
            QFormat::Q5_0 => 22,
            QFormat::Q5_1 => 24,
            QFormat::Q8_0 => 34,
            QFormat::Q2_K => 84,
            QFormat::Q3_K => 110,
            QFormat::Q4_K => 144,
            QFormat::Q5_K => 176,
            QFormat::Q6_K => 210,
        }
    }

    /// Bytes of one row of `cols` values, or an error when `cols` is not a whole
    /// number of blocks.
    pub fn row_bytes(self, cols: usize) -> Result<usize> {
        let b = self.block_values();
        if cols == 0 || !cols.is_multiple_of(b) {
            return Err(KernelError::Config(format!(
                "{} rows hold whole blocks of {b} values; a row of {cols} values is not a positive multiple of {b}",
                self.name()
            )));
        }
        Ok(cols / b * self.block_bytes())
    }

    /// The activations this format's kernels take.
    pub fn input_kind(self) -> InputKind {
        match self.block_values() {
            1 => InputKind::Float,
            QK => InputKind::Q8x32,
            _ => InputKind::Q8x256,
        }
    }
}

impl std::fmt::Display for QFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Activations quantized for the integer dot products: `m` rows of `cols` values, each
/// row cut into blocks (32 values for [`InputKind::Q8x32`], 256 for
/// [`InputKind::Q8x256`]) of i8 codes `q = round_ties_even(x * 127 / amax)` with the
/// scale `d = amax / 127` (`amax` the block's largest magnitude; 0 for a zero block).
/// Quantized once per row, whatever the batch: a row's codes depend on that row alone.
/// Non-finite activations give unspecified (but memory-safe) products.
#[derive(Clone, Debug, Default)]
pub struct QInput {
    pub(crate) kind: Option<InputKind>,
    pub(crate) m: usize,
    pub(crate) cols: usize,
    /// Blocks per row, rounded up to a multiple of 8 (the stride of `d`, `s`, `sums`
    /// rows for [`InputKind::Q8x32`]; padding entries are 0).
    pub(crate) nbp: usize,
    /// `m * cols` codes.
    pub(crate) qs: Vec<i8>,
    /// One scale per block.
    pub(crate) d: Vec<f32>,
    /// `Q8x32`: the sum of each block's codes; `Q8x256`: the sum of each 16 codes.
    pub(crate) sums: Vec<i32>,
    /// `Q8x32`: `d * sum` per block (the minimum terms of `Q4_1`/`Q5_1`).
    pub(crate) s: Vec<f32>,
    /// [`InputKind::Float`]: the values.
    pub(crate) f: Vec<f32>,
    /// With enough rows at the VNNI level: the codes interleaved for the GEMMs
    /// (`simd::x86::qgemm`, `simd::x86::qgemm_k`), `32 * nbp` (`Q8x32`) or `cols`
    /// (`Q8x256`) per row; else empty.
    pub(crate) qsi: Vec<i8>,
}

impl QInput {
    /// The kind (`None` for an empty default).
    pub fn kind(&self) -> Option<InputKind> {
        self.kind
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.m
    }

    /// Values per row.
    pub fn cols(&self) -> usize {
        self.cols
    }
}

/// Reads the f16 at `b[i..i + 2]` as f32.
#[inline]
pub(crate) fn f16_at(b: &[u8], i: usize) -> f32 {
    crate::base::h2f(half::f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])))
}

/// Sub-block `j` (0..8) of a `Q4_K`/`Q5_K` super-block: its 6-bit scale and min, from
/// the 12 packed bytes. Bytes 0..4 hold scales 0..4 in their low 6 bits, bytes 4..8 mins
/// 0..4 likewise; sub-blocks 4..8 take their low 4 bits from the nibbles of bytes 8..12
/// (scale low, min high) and their top 2 bits from the top 2 bits of bytes `j - 4`
/// (scale) and `j` (min).
#[inline]
pub(crate) fn k_scale_min(s: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}

/// Scale `j` (0..16) of a `Q3_K` super-block, in -32..32: its low 4 bits are the low
/// nibble of byte `j` (j < 8) or the high nibble of byte `j - 8`, its top 2 bits bits
/// `2 (j / 4)..` of byte `8 + j % 4`.
#[inline]
pub(crate) fn q3k_scale(s: &[u8], j: usize) -> i32 {
    let lo = if j < 8 { s[j] & 0xF } else { s[j - 8] >> 4 };
    let hi = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
    (lo | (hi << 4)) as i32 - 32
}
