//! Quantized weight matrices in their GGUF form and the matmul that reads them as they
//! are: [`QMatrix`] (the bytes of a GGUF tensor: rows of whole ggml blocks) and
//! [`linear`] (`out[i * rows + j] = x_i · w_j`).
//!
//! Formats ([`QFormat`]): F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the k-quants
//! Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (Q4_K_M and Q5_K_M files use Q4_K/Q5_K plus Q6_K); other
//! GGUF types are a clear error ([`QFormat::from_ggml_type`]).
//!
//! The product quantizes each activation row once per call ([`QInput`]: per 32 values
//! an i8 block with an f32 scale for Q4_0 .. Q8_0, per 256 values with sums per 16 for
//! the k-quants), then takes integer dot products with the weight codes (AVX2
//! `maddubs`/`madd`, AVX-512 VNNI `vpdpbusd`, or the portable reference; see
//! `simd::qref` for the fixed float order): up to 7 rows with kernels that decode each
//! weight block once for 1 or 4 rows; from 8 rows (prefill) with GEMMs that unpack a
//! task's weights once into an interleaved layout and run register tiles of rows x
//! weight rows. At the VNNI level, `Q4_0`, `Q4_1` and `Q8_0` matrices keep their bytes
//! in that interleaved order from the start (same size, reordered once in
//! [`QMatrix::new`]), and every product, of any number of rows, runs the GEMM on them in
//! place. Float weights take the f32 kernels of [`crate::simd::linear_rows`].
//!
//! Every output is computed the same way whatever the number of rows `m` and whichever
//! rows share the call, at every SIMD level and whichever kernel runs it: the integer
//! sums are exact and their float combination has one fixed order, so a sequence
//! decodes bit-identically alone or batched (greedy decoding, preemption and migration
//! rely on it), and the SIMD levels equal the portable reference bit for bit. The work
//! is split into ranges of weight rows run on the kernels' thread pool ([`crate::pool`]).
//!
//! Not exact: the product itself, against real arithmetic. Activations are rounded to 8
//! bits per block (at most half a step, `amax / 254`, per value), which is the whole
//! difference from a dot product with the dequantized weights.

mod quantize;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_gguf;

pub use crate::simd::ggml::{InputKind, QFormat, QInput};

use crate::error::{KernelError, Result};
use crate::pool::{self, ParallelFor};
use crate::simd::qdot::{self, OutTile};
use crate::simd::qref;
use std::borrow::Cow;

/// A weight matrix of `rows` rows of `cols` values in a GGUF format: exactly the bytes
/// of a GGUF tensor (`rows * row_bytes`, row-major, every row whole blocks). In GGUF's
/// terms `cols` is `ne[0]` and `rows` the product of the other dimensions. Where the
/// level's GEMM reads a format in place (`simd::qdot::interleaves`), each row's bytes
/// are held reordered (`simd::qdot::interleave_rows`; same size); [`QMatrix::data`]
/// gives the GGUF bytes either way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QMatrix {
    format: QFormat,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
    interleaved: bool,
}

impl QMatrix {
    /// A matrix over `data`; an error when `cols` is not a whole number of blocks or
    /// `data` is not `rows` rows of them.
    pub fn new(format: QFormat, rows: usize, cols: usize, data: Vec<u8>) -> Result<QMatrix> {
        let rb = format.row_bytes(cols)?;
        let expected = rows.checked_mul(rb).ok_or_else(|| KernelError::Config(format!("{rows} rows overflow")))?;
        if data.len() != expected {
            return Err(KernelError::Shape { what: "QMatrix data (bytes)", expected, got: data.len() });
        }
        let mut data = data;
        let interleaved = qdot::interleaves(format) && !data.is_empty();
        if interleaved {
            qdot::interleave_rows(format, &mut data, cols / format.block_values(), false);
        }
        Ok(QMatrix { format, rows, cols, data, interleaved })
    }

    /// Quantizes `values` (`rows * cols`, row-major) with a simple reference quantizer
    /// (per block or sub-block min/max or max-magnitude scales, no search; for tests
    /// and tools: real weights come quantized in their GGUF file).
    pub fn from_f32(format: QFormat, rows: usize, cols: usize, values: &[f32]) -> Result<QMatrix> {
        let rb = format.row_bytes(cols)?;
        if values.len() != rows * cols {
            return Err(KernelError::Shape {
                what: "QMatrix::from_f32 values",
                expected: rows * cols,
                got: values.len(),
            });
        }
        let mut data = Vec::with_capacity(rows * rb);
        for row in values.chunks_exact(cols) {
            quantize::quantize_row(format, row, &mut data);
        }
        debug_assert_eq!(data.len(), rows * rb);
        QMatrix::new(format, rows, cols, data)
    }

    /// The format.
    pub fn format(&self) -> QFormat {
        self.format
    }

    /// Rows (outputs of [`linear`]).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Values per row (inputs of [`linear`]).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The GGUF bytes (a copy when the rows are held interleaved).
    pub fn data(&self) -> Cow<'_, [u8]> {
        if self.interleaved {
            let mut d = self.data.clone();
            qdot::interleave_rows(self.format, &mut d, self.cols / self.format.block_values(), true);
            Cow::Owned(d)
        } else {
            Cow::Borrowed(&self.data)
        }
    }

    /// The GGUF bytes, owned.
    pub fn into_data(self) -> Vec<u8> {
        match self.data() {
            Cow::Owned(d) => d,
            Cow::Borrowed(_) => self.data,
        }
    }

    /// Whether the rows are held in the interleaved order of the level's GEMM.
    pub fn is_interleaved(&self) -> bool {
        self.interleaved
    }

    /// Bytes of the matrix (what one product reads).
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.data.len() / self.rows.max(1)
    }

    /// Row `r`'s GGUF bytes.
    fn row(&self, r: usize) -> Cow<'_, [u8]> {
        let rb = self.row_bytes();
        let row = &self.data[r * rb..][..rb];
        if self.interleaved {
            let mut d = row.to_vec();
            qdot::interleave_rows(self.format, &mut d, self.cols / self.format.block_values(), true);
            Cow::Owned(d)
        } else {
            Cow::Borrowed(row)
        }
    }

    /// Dequantizes row `r` into `out` (`cols` values): the embedding lookup.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) -> Result<()> {
        if r >= self.rows {
            return Err(KernelError::Config(format!("row {r} out of range (the matrix has {} rows)", self.rows)));
        }
        if out.len() != self.cols {
            return Err(KernelError::Shape { what: "dequantize_row output", expected: self.cols, got: out.len() });
        }
        qref::dequantize_row(self.format, &self.row(r), out);
        Ok(())
    }

    /// The whole matrix as f32 (`rows * cols`, row-major; for a GPU upload).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        if self.cols > 0 {
            for (r, o) in out.chunks_exact_mut(self.cols).enumerate() {
                qref::dequantize_row(self.format, &self.row(r), o);
            }
        }
        out
    }

    /// Reorders whole rows: row `i` becomes the former row `perm[i]`; `perm` must be a
    /// permutation of `0..rows` (e.g. undoing llama.cpp's Q/K row permutation). (Each
    /// row's bytes move as a whole in either layout.)
    pub fn permute_rows(&mut self, perm: &[usize]) -> Result<()> {
        if perm.len() != self.rows {
            return Err(KernelError::Shape { what: "permute_rows permutation", expected: self.rows, got: perm.len() });
        }
        let mut seen = vec![false; self.rows];
        for &p in perm {
            if p >= self.rows || std::mem::replace(&mut seen[p], true) {
                return Err(KernelError::Config(format!(
                    "permute_rows: {perm:?} is not a permutation of 0..{}",
                    self.rows
                )));
            }
        }
        let rb = self.row_bytes();
        let mut data = Vec::with_capacity(self.data.len());
        for &p in perm {
            data.extend_from_slice(&self.data[p * rb..][..rb]);
        }
        self.data = data;
        Ok(())
    }
}

impl QInput {
    /// `m` rows of `cols` activations (`x`, row-major, at least `m * cols` values)
    /// quantized for weights of `format` (each row alone; see [`QInput`]).
    pub fn new(format: QFormat, x: &[f32], m: usize, cols: usize) -> Result<QInput> {
        let mut q = QInput::default();
        q.refill(format, x, m, cols)?;
        Ok(q)
    }

    /// [`QInput::new`] into this value's buffers (no allocation once they are large
    /// enough).
    pub fn refill(&mut self, format: QFormat, x: &[f32], m: usize, cols: usize) -> Result<()> {
        format.row_bytes(cols)?;
        if x.len() < m * cols {
            return Err(KernelError::Shape { what: "activations", expected: m * cols, got: x.len() });
        }
        qdot::quantize_input(pool::global(), self, format.input_kind(), x, m, cols);
        Ok(())
    }
}

/// Multiply-adds per task, at least (smaller products run as fewer tasks, down to one
/// on the calling thread).
const TASK_MACS: usize = 1 << 15;
/// Output rows per task are a multiple of this (whole cache lines of f32 outputs).
const TASK_ROWS: usize = 16;

/// `out[i * w.rows() + j] = x_i · w_j` for the `m` rows of `x` (`m * w.cols()` values,
/// row-major) and the rows of `w`, on the [`pool::global()`] pool. Each activation row is
/// quantized once for the format. Errors on short `x` or `out`.
pub fn linear(w: &QMatrix, x: &[f32], m: usize, out: &mut [f32]) -> Result<()> {
    if x.len() < m * w.cols {
        return Err(KernelError::Shape { what: "linear activations", expected: m * w.cols, got: x.len() });
    }
    let input = QInput::new(w.format, x, m, w.cols)?;
    linear_in(pool::global(), w, &input, out)
}

/// [`linear`] with activations already quantized for `w`'s format (one [`QInput`] can
/// serve several matrices of the same input kind and width, e.g. Q, K and V).
pub fn linear_input(w: &QMatrix, x: &QInput, out: &mut [f32]) -> Result<()> {
    linear_in(pool::global(), w, x, out)
}

/// [`linear_input`] on a given pool (the kernels' [`crate::pool::Pool`] or another
/// [`ParallelFor`]); the results do not depend on it.
pub fn linear_in(pool: &dyn ParallelFor, w: &QMatrix, x: &QInput, out: &mut [f32]) -> Result<()> {
    let (n, m, k) = (w.rows, x.m, w.cols);
    if x.kind != Some(w.format.input_kind()) || x.cols != k {
        return Err(KernelError::Config(format!(
            "activations quantized as {:?} with {} values per row do not suit {} weights of {k} columns",
            x.kind, x.cols, w.format
        )));
    }
    if out.len() < m * n {
        return Err(KernelError::Shape { what: "linear output", expected: m * n, got: out.len() });
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    let tasks = (n * m * k / TASK_MACS).clamp(1, 4 * pool.threads()).min(n.div_ceil(TASK_ROWS));
    let per = n.div_ceil(tasks).div_ceil(TASK_ROWS) * TASK_ROWS;
    let tasks = n.div_ceil(per);
    let rb = w.row_bytes();
    let base = OutTile { ptr: out.as_mut_ptr(), stride: n };
    pool.parallel_for(tasks, &|t| {
        let (j0, j1) = (t * per, ((t + 1) * per).min(n));
        let tile = base.columns_from(j0);
        // SAFETY: `out` holds `m * n` floats (checked); task `t` alone writes columns
        // `j0..j1` of every row, and the call returns after every task.
        unsafe { qdot::matmul_task(w.format, w.interleaved, &w.data[j0 * rb..j1 * rb], j1 - j0, k, x, tile) };
    });
    Ok(())
}
