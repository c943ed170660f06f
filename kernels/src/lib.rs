//! QAQ KV-cache kernels: Quality Adaptive Quantization (arXiv:2403.04643) of a
//! sequence's keys and values, with per-token bit widths, exact outliers, packed
//! mixed-width storage, attention over the packed cache, and like-for-like baselines.
//! No I/O, no async. Algorithm spec: `shared/qaq-algorithm.md`.
//!
//! Modules:
//! - [`policy`]: the QAQ bit-width formulas (paper and reference-code variants), the
//!   online ||Q||^2 percentile, attention windows, [`KvPolicy`] and its string syntax.
//! - [`quant`]: per-group quantizer (paper midpoint / reference mean-centred), outliers.
//! - [`store`]: paged, bit-packed storage of groups and exact byte accounting.
//! - [`kivi`]: KIVI-style per-channel key storage.
//! - [`attention`]: attention over packed K/V, plus dense f32/f16 references.
//! - [`host`]: the host tier ([`HostTier`]) holding fp16 backups.
//! - [`cache`]: [`QaqCache`], the online cache of one sequence (append, attend,
//!   requantize, end_step, stats).
//! - [`simd`]: inner loops with run-time AVX2/FMA/F16C/BMI2 selection and scalar
//!   reference versions.
//! - `fastq` (x86-64): hand-written AVX2 group encoder / decoder, bit-exact with
//!   the scalar reference in [`quant`].
//! - `fused` (x86-64): fused AVX2 attention over packed K/V of one KV head (GQA
//!   sharing, codes unpacked in registers), checked against the portable path.
//! - [`error`] holds the error type, [`KernelError`].
//! - `cuda` (feature `cuda`): CUDA C kernels (quantize/pack, dequantize, fused packed
//!   attention, forward-pass ops) compiled by NVRTC at run time, their launch code
//!   with cudarc, and the device layout of a packed stream.

pub mod attention;
pub mod cache;
pub mod error;
#[cfg(target_arch = "x86_64")]
mod fastq;
#[cfg(target_arch = "x86_64")]
mod fastq512;
#[cfg(target_arch = "x86_64")]
mod fused;
pub mod host;
pub mod kivi;
pub mod policy;
pub mod quant;
pub mod simd;
pub mod store;
#[cfg(test)]
mod testutil;

#[cfg(feature = "cuda")]
pub mod cuda;

pub use cache::{Attention, CacheConfig, CacheStats, Counters, QaqCache};
pub use error::{KernelError, Result};
pub use host::{HostTier, InMemoryHost};
pub use policy::{
    BitFormula, DownSource, KiviSpec, KvPolicy, POLICY_SYNTAX, PrefillFeed, QNorm, QaqParams, UniformSpec,
};
pub use quant::{OutlierMode, Outliers, QuantSpec, Scheme};
pub use store::Bytes;
