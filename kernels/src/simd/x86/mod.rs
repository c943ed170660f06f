//! The x86-64 composed kernels of the SIMD layer, each requiring CPU features that
//! [`super::level()`] detected (the helpers and AVX2 primitives they share are
//! `simd::prim::x86`): [`quant`]
//! (the AVX2 group encoder and decoder), [`quant512`] (the AVX-512 group encoder and
//! decoder), [`attention`] (fused attention over packed K/V), [`window`] (QAQ's
//! window pass after a decode row) and [`matmul`] (the register blocks of
//! `linear_rows`).

pub(crate) mod attention;
pub(crate) mod matmul;
pub(crate) mod quant;
pub(crate) mod quant512;
pub(crate) mod window;
