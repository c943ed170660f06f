//! The GPU path (feature `cuda`): CUDA C kernels compiled at run time by NVRTC and
//! launched through cudarc 0.19 (driver and NVRTC loaded dynamically, so a `cuda`
//! build compiles and runs its CPU-side tests on a machine without CUDA).
//!
//! - [`source`]: the embedded `.cu` sources (`common.cuh`, `quant.cu`,
//!   `attention.cu`, `ops.cu`), their kernels, NVRTC options and compilation.
//! - [`launch`]: grid / block / shared-memory shapes of every kernel.
//! - [`layout`]: the device layout of a packed stream ([`StreamImage`]) and its
//!   conversion from / to the CPU [`crate::store::PackedStream`].
//! - [`device`]: [`Gpu`], the context wrapper (driver check before any context, module
//!   loading, launches), and [`DeviceStream`], a stream's buffers on the device.
//! - [`kv`]: [`DeviceKv`], the device tier of a sequence's QAQ cache (its packed groups
//!   mirrored in device memory, decode attention over them).
//! - [`nccl`]: bytes from one GPU process to another over NCCL (KV migration between
//!   GPU workers on one node).
//! - [`ops`]: launches of the forward-pass and sampling kernels on [`Gpu`].
//! - [`blas`]: [`Blas`], the forward pass's GEMMs on cuBLAS (f16 operands, f32 output).
//!
//! The device tests (every kernel against the CPU reference) are `tests/gpu.rs`, run by
//! `scripts/gpu-check.sh` on a GPU machine; they fail, not skip, without a GPU.

pub mod blas;
pub mod device;
pub mod kv;
pub mod launch;
pub mod layout;
pub mod nccl;
pub mod ops;
pub mod source;

pub use blas::{Blas, cublas_available};
/// The cudarc this crate was built with (device buffers in its API are cudarc types).
pub use cudarc;
pub use device::{AttnBuffers, DeviceStream, Gpu, driver_available, probe};
pub use kv::DeviceKv;
pub use layout::StreamImage;
