//! Launch shapes of every kernel: plain functions of the problem size (unit-tested on
//! the CPU). The constants mirror the `#define`s of the CUDA sources; a test checks that
//! they agree.

use crate::error::{KernelError, Result};
#[cfg(test)]
use crate::quant::MAX_GROUP;

/// Warps (= groups) per block of `qaq_quantize` / `qaq_dequantize` (`QAQ_QUANT_WARPS`).
pub const QUANT_WARPS: u32 = 4;
/// Tokens per block of the split attention kernels (`QAQ_ATT_CHUNK`).
pub const ATT_CHUNK: u32 = 64;
/// Threads per block of the split attention kernels (`QAQ_ATT_THREADS`).
pub const ATT_THREADS: u32 = 256;
/// Most query heads per KV head the attention kernels accept (`QAQ_ATT_MAX_G`).
pub const ATT_MAX_G: u32 = 8;
/// Threads per block of the row kernels (`QAQ_ROW_THREADS`).
pub const ROW_THREADS: u32 = 256;
/// Threads per block of the elementwise kernels.
pub const ELEM_THREADS: u32 = 256;

/// Grid, block and dynamic shared memory of one launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// Blocks.
    pub grid: (u32, u32, u32),
    /// Threads per block.
    pub block: (u32, u32, u32),
    /// Dynamic shared memory, bytes.
    pub shared: u32,
}

impl From<Shape> for cudarc::driver::LaunchConfig {
    fn from(s: Shape) -> Self {
        cudarc::driver::LaunchConfig { grid_dim: s.grid, block_dim: s.block, shared_mem_bytes: s.shared }
    }
}

fn blocks(n: usize, per_block: u32, what: &str) -> Result<u32> {
    u32::try_from(n.div_ceil(per_block as usize))
        .ok()
        .filter(|&b| b > 0)
        .ok_or_else(|| KernelError::Config(format!("{what}: {n} items do not fit one launch")))
}

/// `qaq_quantize` / `qaq_dequantize` over `n` groups: one warp per group.
pub fn groups(n: usize) -> Result<Shape> {
    Ok(Shape { grid: (blocks(n, QUANT_WARPS, "groups")?, 1, 1), block: (32 * QUANT_WARPS, 1, 1), shared: 0 })
}

/// Number of token chunks (blocks) of the split attention kernels for `t` tokens.
pub fn attention_chunks(t: usize) -> usize {
    t.div_ceil(ATT_CHUNK as usize)
}

/// Shared memory of the split attention kernels for `g` heads of `d` values.
pub fn attention_shared_bytes(g: u32, d: u32) -> u32 {
    4 * (g * d + g * ATT_CHUNK + g * ATT_THREADS)
}

/// Largest dynamic shared memory a block gets without an opt-in attribute.
pub const DEFAULT_SHARED_LIMIT: u32 = 48 * 1024;

/// `qaq_attn_split_*` for `t` tokens (at least one), `g` query heads of `d` values.
pub fn attention_split(t: usize, g: usize, d: usize) -> Result<Shape> {
    if g == 0 || g > ATT_MAX_G as usize {
        return Err(KernelError::Config(format!("attention: {g} query heads per KV head, 1..={ATT_MAX_G} supported")));
    }
    crate::quant::check_group_len(d)?;
    let shared = attention_shared_bytes(g as u32, d as u32);
    debug_assert!(shared <= DEFAULT_SHARED_LIMIT);
    Ok(Shape { grid: (blocks(t, ATT_CHUNK, "attention")?, 1, 1), block: (ATT_THREADS, 1, 1), shared })
}

/// `qaq_attn_combine`: one block per query head.
pub fn attention_combine(g: usize) -> Shape {
    Shape { grid: (g as u32, 1, 1), block: (ROW_THREADS, 1, 1), shared: 0 }
}

/// Elementwise kernels (`qaq_attn_probs`, `qaq_silu_mul`, `qaq_rope` pairs) over `n`.
pub fn elementwise(n: usize) -> Result<Shape> {
    Ok(Shape { grid: (blocks(n, ELEM_THREADS, "elementwise")?, 1, 1), block: (ELEM_THREADS, 1, 1), shared: 0 })
}

/// Row kernels (`qaq_rmsnorm`, `qaq_softmax_rows`, `qaq_argmax_rows`): a block per row.
pub fn rows(n_rows: usize) -> Result<Shape> {
    let r = u32::try_from(n_rows).ok().filter(|&r| r > 0);
    let r = r.ok_or_else(|| KernelError::Config(format!("rows: {n_rows} rows")))?;
    Ok(Shape { grid: (r, 1, 1), block: (ROW_THREADS, 1, 1), shared: 0 })
}

/// `qaq_unrotate_heads` over `n_heads` rows of `d` values: a block of `d` threads per
/// head, `d` floats of shared memory; `d` a power of two up to 1024.
pub fn unrotate_heads(n_heads: usize, d: usize) -> Result<Shape> {
    if !d.is_power_of_two() || d > 1024 {
        return Err(KernelError::Config(format!("unrotate: head size {d}, a power of two up to 1024 supported")));
    }
    let h = u32::try_from(n_heads).ok().filter(|&h| h > 0);
    let h = h.ok_or_else(|| KernelError::Config(format!("unrotate: {n_heads} heads")))?;
    Ok(Shape { grid: (h, 1, 1), block: (d as u32, 1, 1), shared: 4 * d as u32 })
}

/// `qaq_embed_f16`: grid (rows, column blocks).
pub fn embedding(n_rows: usize, dim: usize) -> Result<Shape> {
    let r = rows(n_rows)?.grid.0;
    Ok(Shape { grid: (r, blocks(dim, ELEM_THREADS, "embedding")?, 1), block: (ELEM_THREADS, 1, 1), shared: 0 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::source;

    #[test]
    fn constants_match_the_cuda_defines() {
        let pairs = [
            (source::QUANT.source, "QAQ_QUANT_WARPS", QUANT_WARPS),
            (source::ATTENTION.source, "QAQ_ATT_CHUNK", ATT_CHUNK),
            (source::ATTENTION.source, "QAQ_ATT_THREADS", ATT_THREADS),
            (source::ATTENTION.source, "QAQ_ATT_MAX_G", ATT_MAX_G),
            (source::OPS.source, "QAQ_ROW_THREADS", ROW_THREADS),
        ];
        for (src, name, v) in pairs {
            assert!(src.contains(&format!("#define {name} {v}\n")), "{name} != {v}");
        }
        assert!(source::COMMON.contains(&format!("#define QAQ_MAX_GROUP {MAX_GROUP}u")));
    }

    #[test]
    fn unrotate_shapes() {
        assert_eq!(unrotate_heads(9, 64).unwrap(), Shape { grid: (9, 1, 1), block: (64, 1, 1), shared: 256 });
        assert_eq!(unrotate_heads(1, 1024).unwrap().shared, 4096);
        assert!(unrotate_heads(9, 96).is_err() && unrotate_heads(9, 2048).is_err() && unrotate_heads(0, 64).is_err());
    }

    #[test]
    fn group_shapes() {
        assert_eq!(groups(1).unwrap(), Shape { grid: (1, 1, 1), block: (128, 1, 1), shared: 0 });
        assert_eq!(groups(4).unwrap().grid.0, 1);
        assert_eq!(groups(5).unwrap().grid.0, 2);
        assert_eq!(groups(4096).unwrap().grid.0, 1024);
        assert!(groups(0).is_err());
    }

    #[test]
    fn attention_shapes_and_shared_memory() {
        let s = attention_split(16_384, 3, 64).unwrap();
        assert_eq!(s.grid, (256, 1, 1));
        assert_eq!(s.block, (256, 1, 1));
        assert_eq!(s.shared, 4 * (3 * 64 + 3 * 64 + 3 * 256));
        assert_eq!(attention_split(65, 3, 64).unwrap().grid.0, 2);
        assert_eq!(attention_chunks(65_536), 1024);
        assert_eq!(attention_chunks(1), 1);
        // The largest supported case stays within the default 48 KiB.
        assert!(attention_shared_bytes(ATT_MAX_G, MAX_GROUP as u32) <= DEFAULT_SHARED_LIMIT);
        assert!(attention_split(10, 9, 64).is_err());
        assert!(attention_split(10, 0, 64).is_err());
        assert!(attention_split(10, 3, 60).is_err());
        assert!(attention_split(0, 3, 64).is_err());
        assert_eq!(attention_combine(3).grid, (3, 1, 1));
    }

    #[test]
    fn row_and_elementwise_shapes() {
        assert_eq!(rows(7).unwrap().grid, (7, 1, 1));
        assert!(rows(0).is_err());
        assert_eq!(elementwise(257).unwrap().grid.0, 2);
        assert_eq!(embedding(5, 576).unwrap().grid, (5, 3, 1));
    }
}
