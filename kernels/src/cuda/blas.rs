//! [`Blas`]: the forward pass's GEMMs on cuBLAS (`cublasGemmEx`): f16 weights and f16
//! activations, f32 accumulation and f32 output.
//!
//! Row-major data meets column-major cuBLAS through the usual transpose: a weight
//! `W [out, in]` (row-major, as HF stores it) is the column-major `in x out` matrix, the
//! activations `X [n, in]` are column-major `in x n`, and `Y [n, out] = X · Wᵀ` is the
//! column-major `out x n` product `Wᵀ · X`, so one GEMM with `transa = T`, `transb = N`,
//! `m = out`, `n = n`, `k = in` computes it without moving any data.

use super::device::Gpu;
use crate::error::{KernelError, Result};
use cudarc::cublas::{CudaBlas, result, sys};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use std::ffi::c_int;
use std::sync::Arc;

/// The GEMM arguments of `Y [n, out] = X [n, in] · W [out, in]ᵀ` (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearGemm {
    /// Rows of `op(A)` and `C`: the output width.
    pub m: c_int,
    /// Columns of `op(B)` and `C`: the tokens.
    pub n: c_int,
    /// The inner dimension: the input width.
    pub k: c_int,
    /// Leading dimensions of `A` (the weight), `B` (the activations), `C` (the output).
    pub lda: c_int,
    pub ldb: c_int,
    pub ldc: c_int,
}

impl LinearGemm {
    /// The arguments for `n` rows through a `[out, in]` weight; every size must be
    /// positive and fit cuBLAS's `int`, and so must every matrix's element count.
    pub fn new(out_dim: usize, in_dim: usize, n: usize) -> Result<Self> {
        let int = |what: &str, v: usize| {
            c_int::try_from(v)
                .ok()
                .filter(|&v| v > 0)
                .ok_or_else(|| KernelError::Config(format!("linear layer: {what} = {v} must be in 1..={}", c_int::MAX)))
        };
        let (m, k, cols) = (int("out", out_dim)?, int("in", in_dim)?, int("n", n)?);
        for (what, v) in [("out * in", out_dim * in_dim), ("n * in", n * in_dim), ("n * out", n * out_dim)] {
            int(what, v)?;
        }
        Ok(LinearGemm { m, n: cols, k, lda: k, ldb: k, ldc: m })
    }
}

/// A cuBLAS handle on the [`Gpu`]'s stream.
pub struct Blas {
    inner: CudaBlas,
    stream: Arc<CudaStream>,
}

impl std::fmt::Debug for Blas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blas").finish_non_exhaustive()
    }
}

/// Whether the cuBLAS library (`libcublas.so.12`) can be loaded.
pub fn cublas_available() -> bool {
    // SAFETY: only tries to dlopen the library by its candidate names.
    unsafe { sys::is_culib_present() }
}

impl Blas {
    /// A handle bound to `gpu`'s stream, so its GEMMs order with the kernels.
    pub fn new(gpu: &Gpu) -> Result<Self> {
        if !cublas_available() {
            return Err(KernelError::Device(
                "the cuBLAS library (libcublas.so.12) could not be loaded: install the CUDA 12 runtime \
                 libraries (or the nvidia-cublas-cu12 wheel) and put them on LD_LIBRARY_PATH"
                    .to_string(),
            ));
        }
        let inner = CudaBlas::new(gpu.stream().clone())
            .map_err(|e| KernelError::Device(format!("creating the cuBLAS handle: {e}")))?;
        Ok(Blas { inner, stream: gpu.stream().clone() })
    }

    /// `y [n, out] = x [n, in] · w [out, in]ᵀ`: `w` and `x` are f16 bit patterns, `y` is
    /// f32 (overwritten).
    pub fn linear(
        &self,
        w: &CudaSlice<u16>,
        out_dim: usize,
        in_dim: usize,
        x: &CudaSlice<u16>,
        n: usize,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let g = LinearGemm::new(out_dim, in_dim, n)?;
        let need = |what: &'static str, have: usize, expected: usize| {
            if have < expected { Err(KernelError::Shape { what, expected, got: have }) } else { Ok(()) }
        };
        need("linear weight", w.len(), out_dim * in_dim)?;
        need("linear input", x.len(), n * in_dim)?;
        need("linear output", y.len(), n * out_dim)?;
        let stream = &self.stream;
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (a, _ra) = w.device_ptr(stream);
        let (b, _rb) = x.device_ptr(stream);
        let (c, _rc) = y.device_ptr_mut(stream);
        // SAFETY: the three pointers are live device buffers of the stream the handle is
        // bound to, at least as large as the GEMM reads (checked above); alpha and beta
        // are host scalars (the handle's default pointer mode).
        unsafe {
            result::gemm_ex(
                *self.inner.handle(),
                sys::cublasOperation_t::CUBLAS_OP_T,
                sys::cublasOperation_t::CUBLAS_OP_N,
                g.m,
                g.n,
                g.k,
                (&alpha) as *const f32 as *const _,
                a as *const _,
                sys::cudaDataType_t::CUDA_R_16F,
                g.lda,
                b as *const _,
                sys::cudaDataType_t::CUDA_R_16F,
                g.ldb,
                (&beta) as *const f32 as *const _,
                c as *mut _,
                sys::cudaDataType_t::CUDA_R_32F,
                g.ldc,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| KernelError::Device(format!("cublasGemmEx ({out_dim} x {in_dim}, {n} rows): {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_gemm_maps_row_major_layers_to_column_major_arguments() {
        // q_proj of SmolLM2-135M over a 512-token prefill chunk.
        let g = LinearGemm::new(576, 576, 512).unwrap();
        assert_eq!(g, LinearGemm { m: 576, n: 512, k: 576, lda: 576, ldb: 576, ldc: 576 });
        // A non-square layer: the leading dimensions follow in (A, B) and out (C).
        let g = LinearGemm::new(1536, 576, 3).unwrap();
        assert_eq!((g.m, g.n, g.k, g.lda, g.ldb, g.ldc), (1536, 3, 576, 576, 576, 1536));
    }

    #[test]
    fn linear_gemm_rejects_empty_and_oversized_shapes_naming_them() {
        for (o, i, n, what) in [(0, 4, 1, "out"), (4, 0, 1, "in"), (4, 4, 0, "n")] {
            let e = LinearGemm::new(o, i, n).unwrap_err().to_string();
            assert!(e.contains(&format!("{what} = 0")), "{e}");
        }
        let e = LinearGemm::new(49_152, 576, 100_000).unwrap_err().to_string();
        assert!(e.contains("n * out"), "{e}");
    }
}
