//! The crate's one SIMD layer: every inner loop, its portable reference and its x86-64
//! versions, chosen at one dispatch point.
//!
//! [`level()`] detects the CPU once: [`Level::Avx2`] needs AVX2, FMA, F16C and BMI2;
//! [`Level::Avx512`] adds AVX-512 F/BW/VL/VBMI. `QAQ_KERNELS_SCALAR` (any value) forces
//! [`Level::Scalar`], `QAQ_KERNELS_NO_AVX512` caps the level at [`Level::Avx2`] (to
//! exercise that path). One capability flag refines the AVX-512 level: [`vnni()`]
//! (AVX512_VNNI present, `QAQ_KERNELS_NO_VNNI` unset), for the quantized matmul and the
//! attention's integer value tiles; with it, `Q4_0`/`Q4_1`/`Q8_0` weights are stored in
//! the GEMM's interleaved order (`qdot::interleaves`; `QAQ_KERNELS_NO_INTERLEAVE` keeps
//! GGUF order, same results, to compare speeds). The
//! dispatching functions (the primitives re-exported here from `prim`, the kernels
//! defined here, and `qdot`'s) are the only code that looks at the level;
//! everything above them (quantizer, store, attention, caches, the worker's matmul)
//! calls them and never picks an instruction set itself.
//!
//! Submodules (this file uses them and none uses it; among themselves they form no
//! cycle):
//! - `level`: [`Level`] and [`level()`], the dispatch point.
//! - `input`: the encoders' input trait (f32 or f16 values).
//! - [`scalar`]: the references of the primitives and of [`linear_rows`] (pure scalar
//!   code, the [`Level::Scalar`] path).
//! - `prim`: the dispatching primitives ([`dot`], [`axpy`], [`f16_bytes_to_f32`],
//!   [`unpack_f32`], [`pack_append`], [`silu_mul`]), on `level`, `scalar` and
//!   `prim::x86`, which also holds the x86 helpers (`lane_mask`, the 8-lane horizontal
//!   sum, the F16C conversion, the vector `exp` of the softmax and of [`silu_mul`]) that
//!   the composed x86 kernels share.
//! - `portable`: the portable versions of the composed kernels (reference group encoder
//!   and decoder, attention over packed K/V), built on `prim`.
//! - `ggml`: the GGUF weight formats ([`crate::qmat::QFormat`]: type ids, block sizes,
//!   layouts) and the quantized activations ([`crate::qmat::QInput`]).
//! - `qref`: the portable references of the quantized matmul (block dequantization,
//!   activation quantization, the dot product of a quantized weight row with a quantized
//!   activation row, in a fixed float order), on `ggml` and `scalar`.
//! - `qdot`: the quantized matmul's dispatching kernels (activation quantization, one
//!   task of weight rows against all activation rows), on `qref` and `x86`.
//! - `attend`: the dispatch of the attention's two halves ([`attend_probs`],
//!   [`attend_values`]) and of QAQ's window pass ([`window_pass`], AVX-512 only; `rule`
//!   holds its plain input types).
//! - `x86` (x86-64 only), the composed kernels: `x86::attention`, fused
//!   attention of one KV head over packed K/V (codes unpacked in registers, GQA heads
//!   sharing each unpack; an AVX2 and an AVX-512VL build, bit-identical);
//!   `x86::attention512`, its AVX-512 version for head dims that are multiples of 64
//!   (64 codes of any width unpacked at once, 16-lane vectors; with [`vnni()`], blocks of
//!   one quantized width accumulate their values in 16-bit integer products);
//!   `x86::window`, QAQ's window pass eight tokens at a time; `x86::dense512`, the
//!   register-tiled exact attention of many query rows over f32 keys and values (a
//!   prefill chunk), bit-identical to the primitives row by row; `x86::matmul`, the
//!   register blocks of [`linear_rows`];
//!   `x86::quant512`, the AVX-512 group encoder (four groups in lock step) and decoder;
//!   `x86::quant`, the AVX2 group encoder (two groups) and decoder, and the AVX2 level's
//!   one-group encoder (which falls back to `portable`'s reference compiled with AVX2);
//!   `x86::qdot`, the quantized matmul of the 32-value formats (AVX2 `maddubs`, or
//!   `vpdpbusd` when [`vnni()`]) and the activation quantizer; `x86::qgemm`, their GEMM
//!   for 8 or more activation rows (a task's weights repacked, interleaved by 8 blocks;
//!   VNNI, or AVX2 with exact 16-bit partial sums; `Q8_0` with VNNI only); `x86::qdot_k`,
//!   the k-quants (AVX2 at both levels), and `x86::qgemm_k`, their GEMM (the same scheme
//!   per super-block).
//!
//! Code bytes are bit-packed LSB-first: code `i` of a group of width `b` occupies bits
//! `[i*b, (i+1)*b)` of the group's little-endian bit string, so 8 codes always fill
//! exactly `b` bytes. The encoders and decoders are bit-exact with their references;
//! the fused attention agrees with the portable attention to float rounding (its
//! summation order differs); [`linear_rows`] is bit-exact at every level, and so is the
//! quantized matmul (activation quantization and every output).

mod attend;
pub(crate) mod ggml;
mod input;
mod level;
pub(crate) mod portable;
mod prim;
pub(crate) mod qdot;
pub(crate) mod qref;
#[cfg(test)]
mod qtests;
mod rule;
pub mod scalar;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use crate::base::h2f;
pub use level::{Level, level, vnni};
pub use prim::{axpy, dot, f16_bytes_to_f32, pack_append, silu_mul, unpack_f32};

pub(crate) use attend::{
    attend_probs, attend_values, dense_scores, dense_values, packed_scores, softmax_rows, window_pass,
};
pub(crate) use rule::{Observed, UNDECIDED, WidthRule};

use crate::base::{GroupMeta, GroupRef, MAX_GROUP, QuantSpec, Scheme, Sink, StreamView, check_group_len};
use crate::error::{KernelError, Result};
use input::Input;
use level::avx2;
use rayon::prelude::*;

/// Output columns per parallel task of [`linear_rows`].
const COLS_PER_TASK: usize = 64;

/// Row-independent `y = x · wᵀ` for the few rows of a decode step:
/// `out[i * n + j] = dot(x[i*k..][..k], w[j*k..][..k])` for `m` rows of `x` and `n` rows
/// of `w` (row-major, `[n, k]`), in parallel over tasks of 64 columns.
///
/// Every output element is one dot product computed in a fixed order (8 lanes of fused
/// multiply-adds over `k`, the fixed lane tree of [`scalar::hsum8`], then the tail; see
/// [`scalar::row_dot`]), whatever the number of rows, whichever rows share the call and
/// whatever the level: a sequence's decode step gives bit-identical results alone or
/// batched with others (greedy decoding, preemption and request migration rely on it),
/// unlike a general GEMM, whose kernel (and summation order) changes with the row count.
/// The AVX2 path computes 3 x 4 blocks of outputs at once, sharing their loads; blocking
/// changes speed, not results.
pub fn linear_rows(x: &[f32], m: usize, w: &[f32], n: usize, k: usize, out: &mut [f32]) {
    assert!(x.len() >= m * k && w.len() >= n * k && out.len() >= m * n, "linear_rows: bad shapes");
    // Transposed result, [n, m]: each task owns a contiguous range of columns.
    let mut t = vec![0f32; n * m];
    let fast = avx2();
    t.par_chunks_mut(COLS_PER_TASK * m).enumerate().for_each(|(task, chunk)| {
        let j0 = task * COLS_PER_TASK;
        let cols = chunk.len() / m.max(1);
        let wt = &w[j0 * k..(j0 + cols) * k];
        #[cfg(target_arch = "x86_64")]
        if fast {
            // SAFETY: AVX2 and FMA were detected at run time; the shapes are as asserted.
            unsafe { x86::matmul::linear_block(x, m, wt, cols, k, chunk) };
            return;
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = fast;
        scalar::linear_block(x, m, wt, k, chunk);
    });
    for j in 0..n {
        for i in 0..m {
            out[i * n + j] = t[j * m + i];
        }
    }
}

/// Quantizes one group (see [`crate::quant::encode_group`], which this implements):
/// the AVX2 level's encoder (`x86::quant::encode_group`), else the reference.
#[inline]
pub(crate) fn encode_group(x: &[f32], bits: u8, spec: &QuantSpec, out: &mut Sink<'_>) -> Result<GroupMeta> {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the AVX2 set was detected.
        return unsafe { x86::quant::encode_group(x, bits, spec, out) };
    }
    portable::encode_group(x, bits, spec, out)
}

/// Quantizes consecutive groups of `d` values (see [`crate::quant::encode_groups`]):
/// the midpoint scheme runs four groups in lock step with AVX-512, else two with AVX2;
/// the rest one [`encode_group`] per group.
pub(crate) fn encode_groups<T: Input>(
    x: &[T],
    d: usize,
    bits: u8,
    spec: &QuantSpec,
    out: &mut Sink<'_>,
    metas: &mut Vec<GroupMeta>,
) -> Result<()> {
    check_group_len(d)?;
    if !x.len().is_multiple_of(d) {
        return Err(KernelError::Config(format!("{} values is not a whole number of groups of {d}", x.len())));
    }
    if bits == crate::base::RAW {
        for g in x.chunks_exact(d) {
            metas.push(portable::encode_raw(g, out.codes)?);
        }
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    if avx2()
        && let Some((k_lo, k_hi)) = x86::quant::midpoint_counts(spec, bits, d)
    {
        if level() == Level::Avx512 {
            // SAFETY: AVX-512 detected at run time; `d` checked above.
            return unsafe { x86::quant512::encode_midpoint_many(x, d, bits, k_lo, k_hi, out, metas) };
        }
        // SAFETY: features detected at run time; `d` checked above.
        return unsafe { x86::quant::encode_midpoint_many(x, d, bits, k_lo, k_hi, out, metas) };
    }
    let mut tmp = [0f32; MAX_GROUP];
    for g in 0..x.len() / d {
        for (i, t) in tmp[..d].iter_mut().enumerate() {
            *t = x[g * d + i].value();
        }
        metas.push(encode_group(&tmp[..d], bits, spec, out)?);
    }
    Ok(())
}

/// Reconstructs one group `g` into `out` (see [`crate::quant::decode_group`], which this
/// implements).
#[inline]
pub(crate) fn decode_group(g: GroupRef<'_>, scheme: Scheme, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        let GroupRef { meta, codes, out_idx, out_val } = g;
        if meta.bits != crate::base::RAW && meta.bits > 0 && out.len().is_multiple_of(8) {
            let (base, s) = (meta.base(scheme), h2f(meta.s));
            if level() == Level::Avx512
                && out.len() <= MAX_GROUP
                && codes.len() >= crate::base::code_bytes(meta.bits, out.len())
            {
                // SAFETY: AVX-512 detected; length conditions checked just above.
                unsafe { x86::quant512::decode_quantized(base, s, meta.bits, codes, out_idx, out_val, out) };
                return;
            }
            if avx2() && codes.len() >= out.len() / 8 * meta.bits as usize + 8 {
                // SAFETY: features detected; length conditions checked just above.
                unsafe { x86::quant::decode_quantized(base, s, meta.bits, codes, out_idx, out_val, out) };
                return;
            }
        }
    }
    portable::decode_group(g, scheme, out)
}

/// Attention of `g` query heads (`qs`, `g * d`, already scaled) over packed values `v`:
/// writes `out` (`g * d`) and `probs` (`g * T`). The scores come from the packed keys
/// `keys`, or, when `keys` is `None`, are already in `probs` (keys of another layout):
/// [`attend_probs`], then [`attend_values`].
pub(crate) fn attend_packed(
    keys: Option<StreamView<'_>>,
    v: StreamView<'_>,
    qs: &[f32],
    g: usize,
    out: &mut [f32],
    probs: &mut [f32],
) {
    attend_probs(keys, qs, g, v.len, probs);
    attend_values(v, probs, g, out);
}
