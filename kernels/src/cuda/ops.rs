//! Launches of the forward-pass and sampling kernels (`ops.cu`) on a [`Gpu`]. Buffers are
//! f32 unless named otherwise; every function checks lengths before launching.

use super::device::{Gpu, fire};
use super::launch;
use crate::error::{KernelError, Result};
use cudarc::driver::{CudaSlice, CudaViewMut, PushKernelArg};

fn need(what: &'static str, have: usize, expected: usize) -> Result<()> {
    if have < expected { Err(KernelError::Shape { what, expected, got: have }) } else { Ok(()) }
}

fn u32_of(what: &str, n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| KernelError::Config(format!("{what}: {n} does not fit u32")))
}

impl Gpu {
    /// `y[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w` for `rows` rows of `n` values.
    pub fn rmsnorm(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        rows: usize,
        n: usize,
        eps: f32,
    ) -> Result<()> {
        need("rmsnorm input", x.len(), rows * n)?;
        need("rmsnorm output", y.len(), rows * n)?;
        need("rmsnorm weight", w.len(), n)?;
        let n32 = u32_of("rmsnorm", n)?;
        // SAFETY: `qaq_rmsnorm(x, w, y, n, eps)`; lengths checked above.
        unsafe {
            let mut b = self.kernel("qaq_rmsnorm")?;
            b.arg(x).arg(w).arg(y).arg(&n32).arg(&eps);
            fire(b, launch::rows(rows)?, "qaq_rmsnorm")
        }
    }

    /// Rotate-half RoPE in place on `x` (`pos.len()` rows of `n_heads * head_dim`).
    pub fn rope(
        &self,
        x: &mut CudaSlice<f32>,
        pos: &CudaSlice<u32>,
        n_heads: usize,
        head_dim: usize,
        theta: f32,
    ) -> Result<()> {
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(KernelError::Config(format!("rope: head_dim {head_dim} must be even")));
        }
        let rows = pos.len();
        need("rope input", x.len(), rows * n_heads * head_dim)?;
        let (r, h, hd) = (u32_of("rope", rows)?, u32_of("rope", n_heads)?, u32_of("rope", head_dim)?);
        let shape = launch::elementwise(rows * n_heads * head_dim / 2)?;
        // SAFETY: `qaq_rope(x, pos, rows, n_heads, head_dim, theta)`; lengths checked.
        unsafe {
            let mut b = self.kernel("qaq_rope")?;
            b.arg(x).arg(pos).arg(&r).arg(&h).arg(&hd).arg(&theta);
            fire(b, shape, "qaq_rope")
        }
    }

    /// `out = silu(gate) * up` over `n` values.
    pub fn silu_mul(
        &self,
        gate: &CudaSlice<f32>,
        up: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        n: usize,
    ) -> Result<()> {
        need("silu gate", gate.len(), n)?;
        need("silu up", up.len(), n)?;
        need("silu output", out.len(), n)?;
        let n32 = u32_of("silu", n)?;
        // SAFETY: `qaq_silu_mul(gate, up, out, n)`; lengths checked above.
        unsafe {
            let mut b = self.kernel("qaq_silu_mul")?;
            b.arg(gate).arg(up).arg(out).arg(&n32);
            fire(b, launch::elementwise(n)?, "qaq_silu_mul")
        }
    }

    /// `out[r] = table[ids[r]]` from an f16 table (`vocab x dim` bit patterns); an id out
    /// of range is an error.
    pub fn embed_f16(
        &self,
        table: &CudaSlice<u16>,
        ids: &CudaSlice<u32>,
        vocab: usize,
        dim: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        need("embedding table", table.len(), vocab * dim)?;
        need("embedding output", out.len(), ids.len() * dim)?;
        let (v32, d32) = (u32_of("embedding", vocab)?, u32_of("embedding", dim)?);
        let mut err = self.zeros::<u32>(1)?;
        // SAFETY: `qaq_embed_f16(table, ids, vocab, dim, out, err)`; lengths checked.
        unsafe {
            let mut b = self.kernel("qaq_embed_f16")?;
            b.arg(table).arg(ids).arg(&v32).arg(&d32).arg(out).arg(&mut err);
            fire(b, launch::embedding(ids.len(), dim)?, "qaq_embed_f16")?;
        }
        if self.download(&err)?[0] != 0 {
            return Err(KernelError::Config(format!("embedding: a token id is not below the vocabulary size {vocab}")));
        }
        Ok(())
    }

    /// In-place softmax of `rows` rows of `n` logits at temperature `1 / inv_temp`.
    pub fn softmax_rows(&self, x: &mut CudaSlice<f32>, rows: usize, n: usize, inv_temp: f32) -> Result<()> {
        need("softmax input", x.len(), rows * n)?;
        let n32 = u32_of("softmax", n)?;
        // SAFETY: `qaq_softmax_rows(x, n, inv_temp)`; length checked above.
        unsafe {
            let mut b = self.kernel("qaq_softmax_rows")?;
            b.arg(x).arg(&n32).arg(&inv_temp);
            fire(b, launch::rows(rows)?, "qaq_softmax_rows")
        }
    }

    /// `out[r]` = first index of the largest of row `r`'s `n` values (greedy sampling).
    pub fn argmax_rows(&self, x: &CudaSlice<f32>, rows: usize, n: usize, out: &mut CudaSlice<u32>) -> Result<()> {
        need("argmax input", x.len(), rows * n)?;
        need("argmax output", out.len(), rows)?;
        let n32 = u32_of("argmax", n)?;
        // SAFETY: `qaq_argmax_rows(x, n, out)`; lengths checked above.
        unsafe {
            let mut b = self.kernel("qaq_argmax_rows")?;
            b.arg(x).arg(&n32).arg(out);
            fire(b, launch::rows(rows)?, "qaq_argmax_rows")
        }
    }

    /// `y = f16(x)` over `n` values (bit patterns; the f16 operands of [`super::Blas`]).
    pub fn to_f16(&self, x: &CudaSlice<f32>, y: &mut CudaSlice<u16>, n: usize) -> Result<()> {
        need("f16 cast input", x.len(), n)?;
        need("f16 cast output", y.len(), n)?;
        let n32 = u32_of("f16 cast", n)?;
        // SAFETY: `qaq_f32_to_f16(x, y, n)`; lengths checked above.
        unsafe {
            let mut b = self.kernel("qaq_f32_to_f16")?;
            b.arg(x).arg(y).arg(&n32);
            fire(b, launch::elementwise(n)?, "qaq_f32_to_f16")
        }
    }

    /// `x += y` over `n` values.
    pub fn add(&self, x: &mut CudaSlice<f32>, y: &CudaSlice<f32>, n: usize) -> Result<()> {
        need("add target", x.len(), n)?;
        need("add operand", y.len(), n)?;
        let n32 = u32_of("add", n)?;
        // SAFETY: `qaq_add(x, y, n)`; lengths checked above.
        unsafe {
            let mut b = self.kernel("qaq_add")?;
            b.arg(x).arg(y).arg(&n32);
            fire(b, launch::elementwise(n)?, "qaq_add")
        }
    }

    /// Rotates `n_heads` head rows of `d` values of `x` back from a cache's rotation
    /// (`signs`: [`crate::cache::Rotation::signs`], uploaded).
    pub fn unrotate_heads(
        &self,
        x: &mut CudaViewMut<'_, f32>,
        signs: &CudaSlice<f32>,
        n_heads: usize,
        d: usize,
    ) -> Result<()> {
        need("unrotate target", x.len(), n_heads * d)?;
        need("unrotate signs", signs.len(), d)?;
        let shape = launch::unrotate_heads(n_heads, d)?;
        let d32 = u32_of("unrotate", d)?;
        // SAFETY: `qaq_unrotate_heads(x, signs, d)`, one block of d threads per head;
        // lengths and the shape checked above.
        unsafe {
            let mut b = self.kernel("qaq_unrotate_heads")?;
            b.arg(x).arg(signs).arg(&d32);
            fire(b, shape, "qaq_unrotate_heads")
        }
    }

    /// `x[r] += bias` for `rows` rows of `n` values.
    pub fn add_bias(&self, x: &mut CudaSlice<f32>, bias: &CudaSlice<f32>, rows: usize, n: usize) -> Result<()> {
        need("bias target", x.len(), rows * n)?;
        need("bias", bias.len(), n)?;
        let (n32, total) = (u32_of("bias", n)?, u32_of("bias", rows * n)?);
        // SAFETY: `qaq_add_bias(x, b, n, total)`; lengths checked above.
        unsafe {
            let mut b = self.kernel("qaq_add_bias")?;
            b.arg(x).arg(bias).arg(&n32).arg(&total);
            fire(b, launch::elementwise(rows * n)?, "qaq_add_bias")
        }
    }
}
