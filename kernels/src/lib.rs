//! QAQ KV-cache kernels: Quality Adaptive Quantization (arXiv:2403.04643) of a
//! sequence's keys and values, with per-token bit widths, exact outliers, packed
//! mixed-width storage, attention over the packed cache, and like-for-like baselines.
//! No I/O, no async. Algorithm spec: `shared/qaq-algorithm.md`.
//!
//! Modules, each depending only on those listed before it (no import cycles):
//! - [`error`]: the error type, [`KernelError`].
//! - `base`: the packed-group format (widths, [`QuantSpec`], group metadata, f16
//!   conversions, one page of groups), re-exported by [`quant`] and [`store`].
//! - [`pool`]: a small persistent thread pool ([`pool::Pool::parallel_for`], the
//!   process-wide [`pool::global()`]) for many short data-parallel loops.
//! - [`simd`]: the one SIMD layer: every inner loop with its portable reference
//!   ([`simd::scalar`]) and its x86-64 AVX2 / AVX-512 versions, chosen at one dispatch
//!   point ([`simd::level`]; `QAQ_KERNELS_SCALAR`, `QAQ_KERNELS_NO_AVX512`,
//!   `QAQ_KERNELS_NO_VNNI`, `QAQ_KERNELS_NO_INTERLEAVE`): primitives, the group encoders and decoders, fused attention
//!   over packed K/V, [`simd::linear_rows`] (the worker's row-independent f32 matmul),
//!   and the quantized matmul's kernels (GGUF block layouts, activation quantization,
//!   integer dot products).
//! - [`qmat`]: quantized weights in their GGUF form ([`QMatrix`], [`QFormat`]) and the
//!   row-independent matmul that reads them ([`qmat::linear`]), on `simd` and `pool`.
//! - [`quant`]: the per-group quantizer's API (paper midpoint / reference mean-centred,
//!   outliers).
//! - [`store`]: paged, bit-packed storage of groups and exact byte accounting.
//! - [`kivi`]: KIVI-style per-channel key storage.
//! - [`policy`]: the QAQ bit-width formulas (paper and reference-code variants), the
//!   online ||Q||^2 percentile, attention windows, [`KvPolicy`] and its string syntax.
//! - [`attention`]: attention over packed K/V, plus dense f32/f16 references.
//! - [`host`]: the host tier ([`HostTier`]) holding fp16 backups.
//! - [`cache`]: the online cache of one sequence behind one trait, [`PolicyCache`]
//!   (append, attend, end_step, stats, snapshots), one type per policy
//!   ([`Fp16Cache`], [`UniformCache`], [`KiviCache`], [`QaqCache`]), made by
//!   [`cache::new_cache`] / [`cache::restore`]; the books of a device mirror.
//! - `cuda` (feature `cuda`): CUDA C kernels (quantize/pack, dequantize, fused packed
//!   attention, forward-pass ops) compiled by NVRTC at run time, their launch code
//!   with cudarc, the device layout of a packed stream, and a cache's device tier.

pub mod attention;
mod base;
pub mod cache;
pub mod error;
pub mod host;
pub mod kivi;
pub mod policy;
pub mod pool;
pub mod qmat;
pub mod quant;
pub mod simd;
pub mod store;
#[cfg(test)]
mod testutil;

#[cfg(feature = "cuda")]
pub mod cuda;

pub use cache::{
    Attention, CacheConfig, CacheStats, Counters, Fp16Cache, KiviCache, PolicyCache, QaqCache, UniformCache,
};
pub use error::{KernelError, Result};
pub use host::{HostTier, InMemoryHost};
pub use policy::{
    BitFormula, DownSource, KiviSpec, KvPolicy, POLICY_SYNTAX, PrefillFeed, QNorm, QaqParams, UniformSpec,
};
pub use qmat::{QFormat, QMatrix};
pub use quant::{OutlierMode, Outliers, QuantSpec, Scheme};
pub use store::Bytes;
