//! The x86-64 composed kernels of the SIMD layer, each requiring CPU features that
//! [`super::level()`] detected (the helpers and AVX2 primitives they share are
//! `simd::prim::x86`): [`quant`]
//! (the AVX2 group encoder and decoder), [`quant512`] (the AVX-512 group encoder and
//! decoder), [`attention`] (fused attention over packed K/V, AVX2) and [`attention512`]
//! (its AVX-512 version for head dims that are multiples of 64), [`dense512`] (exact
//! attention of a prefill chunk's rows over f32 keys and values), [`window`] (QAQ's
//! window pass after a decode row), [`matmul`] (the register blocks of `linear_rows`),
//! [`qdot`] (the quantized matmul's 32-value formats at the AVX2 and VNNI levels, and its
//! activation quantizer), [`qgemm`] (their GEMM for many activation rows, VNNI or AVX2),
//! [`qdot_k`] (its k-quants) and [`qgemm_k`] (their GEMM).

pub(crate) mod attention;
pub(crate) mod attention512;
pub(crate) mod dense512;
pub(crate) mod matmul;
pub(crate) mod qdot;
pub(crate) mod qdot_k;
pub(crate) mod qgemm;
pub(crate) mod qgemm_k;
pub(crate) mod quant;
pub(crate) mod quant512;
pub(crate) mod window;
