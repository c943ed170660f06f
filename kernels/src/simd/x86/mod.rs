//! The x86-64 kernels of the SIMD layer, each requiring CPU features that
//! [`super::level()`] detected: [`prim`] (helpers and the AVX2 primitives), [`quant`]
//! (the AVX2 group encoder and decoder), [`quant512`] (the AVX-512 group encoder and
//! decoder), [`attention`] (fused attention over packed K/V) and [`matmul`] (the
//! register blocks of `linear_rows`).

pub(crate) mod attention;
pub(crate) mod matmul;
pub(crate) mod prim;
pub(crate) mod quant;
pub(crate) mod quant512;
