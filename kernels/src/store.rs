//! Paged mixed-width storage for one (layer, KV head, K-or-V) stream of groups.
//!
//! A stream is a list of blocks of up to [`BLOCK_TOKENS`] groups. Appending fills the
//! last block and opens a new one when it is full, so a growing sequence never copies
//! old blocks. Inside a block the data is struct-of-arrays: widths, f16 `m`, f16 `s`,
//! outlier counts (the 6 metadata bytes per group), the concatenated bit-packed codes
//! (each group starts on a byte boundary), and the outliers' u8 indices and f16 values.
//! Changing widths rewrites only the blocks concerned. Quantized blocks keep
//! [`SLACK`] zero bytes after their codes so SIMD unpacking can read 8 bytes at a time;
//! those bytes are real memory and are counted as padding in [`Bytes`].

pub use crate::base::{Block, GroupRef, SLACK, Sink};

use crate::base::StreamView;
use crate::error::{KernelError, Result};
use crate::quant::{self, GroupMeta, META_BYTES, QuantSpec, RAW};
use half::f16;

/// Groups per block.
pub const BLOCK_TOKENS: usize = 64;

/// Byte accounting of a stream (or a sum of streams).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Bytes {
    /// Packed code bytes (raw fp16 groups included), excluding padding bits.
    pub codes: usize,
    /// Padding: unused bits in the last code byte of each group, plus block slack.
    pub padding: usize,
    /// Per-group metadata (6 bytes per quantized group, 1 width byte per raw group in a
    /// mixed stream, 0 in an fp16-only stream).
    pub metadata: usize,
    /// Outlier values (2 bytes each).
    pub outlier_values: usize,
    /// Outlier indices (1 byte each).
    pub outlier_indices: usize,
    /// Paper-style size in bits: codes of inliers + 32 bits of metadata per quantized
    /// group + 16 bits per outlier, no indices, no padding (raw groups: 16 bits/value).
    pub paper_bits: f64,
    /// Number of groups.
    pub groups: usize,
    /// Number of values.
    pub values: usize,
    /// Sum of widths over groups (raw counts as 16), for average bits.
    pub width_sum: usize,
}

impl Bytes {
    /// Real bytes: everything stored.
    pub fn total(&self) -> usize {
        self.codes + self.padding + self.metadata + self.outlier_values + self.outlier_indices
    }
    /// Bytes of the same values in fp16.
    pub fn fp16_equivalent(&self) -> usize {
        2 * self.values
    }
    /// Paper-style bytes (see [`Bytes::paper_bits`]); labelled "paper-style" in reports.
    pub fn paper_style(&self) -> f64 {
        self.paper_bits / 8.0
    }
    /// Average width per group.
    pub fn avg_bits(&self) -> f64 {
        if self.groups == 0 { 0.0 } else { self.width_sum as f64 / self.groups as f64 }
    }
    /// Subtracts an account that is part of this one (the inverse of [`Bytes::add`];
    /// exact, `paper_bits` being a sum of whole numbers).
    pub(crate) fn sub(&mut self, o: &Bytes) {
        self.codes -= o.codes;
        self.padding -= o.padding;
        self.metadata -= o.metadata;
        self.outlier_values -= o.outlier_values;
        self.outlier_indices -= o.outlier_indices;
        self.paper_bits -= o.paper_bits;
        self.groups -= o.groups;
        self.values -= o.values;
        self.width_sum -= o.width_sum;
    }
    /// Adds the account of one group of `d` values (`raw_only`: of an fp16-only stream).
    fn add_group(&mut self, m: &GroupMeta, d: usize, raw_only: bool) {
        self.groups += 1;
        self.values += d;
        self.width_sum += m.bits as usize;
        let no = m.n_out as usize;
        self.outlier_values += 2 * no;
        self.outlier_indices += no;
        if m.bits == RAW {
            self.codes += 2 * d;
            self.metadata += usize::from(!raw_only);
            self.paper_bits += 16.0 * d as f64;
        } else {
            let bits = d * m.bits as usize;
            self.codes += bits / 8;
            self.padding += m.code_bytes(d) - bits / 8;
            self.metadata += META_BYTES;
            self.paper_bits += (m.bits as usize * (d - no)) as f64 + 32.0 + 16.0 * no as f64;
        }
    }
    /// Sums two accounts.
    pub fn add(&mut self, o: &Bytes) {
        self.codes += o.codes;
        self.padding += o.padding;
        self.metadata += o.metadata;
        self.outlier_values += o.outlier_values;
        self.outlier_indices += o.outlier_indices;
        self.paper_bits += o.paper_bits;
        self.groups += o.groups;
        self.values += o.values;
        self.width_sum += o.width_sum;
    }
}

/// One group re-encoded by [`PackedStream::rewrite_groups`]: its index, its old codes
/// (offset, bytes) and outliers (offset), where its new codes and outliers start.
#[derive(Clone, Copy, Default)]
struct Redo {
    i: usize,
    co: usize,
    cb: usize,
    oo: usize,
    nc: usize,
    no: usize,
}

/// The groups of one stream.
#[derive(Clone, Debug)]
pub struct PackedStream {
    d: usize,
    spec: QuantSpec,
    raw_only: bool,
    blocks: Vec<Block>,
    len: usize,
    /// The buffers a rewrite makes its new encodings in, reused by the next one.
    spare: Block,
    /// The byte account of `blocks`, kept up to date by every change.
    acct: Bytes,
}

impl PackedStream {
    /// A stream of groups of `d` values. `raw_only` streams (fp16 baseline) hold only raw
    /// groups and store no per-group metadata.
    pub fn new(d: usize, spec: QuantSpec, raw_only: bool) -> Self {
        PackedStream { d, spec, raw_only, blocks: Vec::new(), len: 0, spare: Block::default(), acct: Bytes::default() }
    }
    /// Group length.
    pub fn d(&self) -> usize {
        self.d
    }
    /// Quantizer configuration.
    pub fn spec(&self) -> &QuantSpec {
        &self.spec
    }
    /// Number of groups.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The blocks, in order.
    pub fn blocks(&self) -> &[Block] {
        &self.blocks
    }
    /// The stream as the attention kernels read it.
    pub(crate) fn view(&self) -> StreamView<'_> {
        self.view_blocks(0..self.blocks.len())
    }

    /// Blocks `blocks` of the stream as the attention kernels read them.
    pub(crate) fn view_blocks(&self, blocks: std::ops::Range<usize>) -> StreamView<'_> {
        let blocks = &self.blocks[blocks];
        let len = if blocks.len() == self.blocks.len() { self.len } else { blocks.iter().map(Block::len).sum() };
        StreamView { blocks, d: self.d, len, scheme: self.spec.scheme }
    }

    /// Appends one group (f16-representable values) at width `bits`.
    pub fn push(&mut self, x: &[f32], bits: u8) -> Result<()> {
        let bits = if self.raw_only { RAW } else { bits };
        if self.blocks.last().is_none_or(|b| b.len() >= BLOCK_TOKENS) {
            self.blocks.push(Block::default());
        }
        let (spec, d, raw_only) = (self.spec, self.d, self.raw_only);
        let Some(b) = self.blocks.last_mut() else { unreachable!("a block was just ensured") };
        let had_slack = b.has_slack;
        b.strip_slack();
        let meta = quant::encode_group(x, bits, &spec, &mut b.codes, &mut b.out_idx, &mut b.out_val);
        let res = meta.map(|m| {
            self.acct.add_group(&m, d, raw_only);
            b.meta.push(m)
        });
        b.add_slack();
        self.acct.padding = self.acct.padding + SLACK * usize::from(b.has_slack) - SLACK * usize::from(had_slack);
        if res.is_ok() {
            self.len += 1;
        }
        res
    }

    /// Appends consecutive groups of `d` f16 values at width `bits`: the same stream as
    /// one [`PackedStream::push`] per group (of the values as f32), through the batch
    /// encoder. Stops at the first failing group; the groups before it stay appended.
    pub fn push_many_f16(&mut self, x: &[f16], bits: u8) -> Result<()> {
        let bits = if self.raw_only { RAW } else { bits };
        let d = self.d;
        if !x.len().is_multiple_of(d) {
            return Err(KernelError::Shape { what: "groups", expected: d, got: x.len() });
        }
        let spec = self.spec;
        let mut rest = x;
        while !rest.is_empty() {
            if self.blocks.last().is_none_or(|b| b.len() >= BLOCK_TOKENS) {
                self.blocks.push(Block::default());
            }
            let Some(b) = self.blocks.last_mut() else { unreachable!("a block was just ensured") };
            let take = (BLOCK_TOKENS - b.len()).min(rest.len() / d);
            let (now, later) = rest.split_at(take * d);
            let had_slack = b.has_slack;
            b.strip_slack();
            let before = b.meta.len();
            let res = quant::encode_groups_f16(
                now,
                d,
                bits,
                &spec,
                &mut b.codes,
                &mut b.out_idx,
                &mut b.out_val,
                &mut b.meta,
            );
            self.len += b.meta.len() - before;
            b.add_slack();
            for m in &b.meta[before..] {
                self.acct.add_group(m, d, self.raw_only);
            }
            self.acct.padding = self.acct.padding + SLACK * usize::from(b.has_slack) - SLACK * usize::from(had_slack);
            res?;
            rest = later;
        }
        Ok(())
    }

    /// Appends a group that is already encoded (metadata, its codes, its outliers), as
    /// it is: the inverse of reading it with [`Block::for_each`]. Used to rebuild a
    /// stream from another layout (the CUDA device tier).
    pub fn push_encoded(&mut self, meta: GroupMeta, codes: &[u8], out_idx: &[u8], out_val: &[f16]) -> Result<()> {
        let no = meta.n_out as usize;
        if meta.bits != RAW && (self.raw_only || meta.bits > quant::MAX_BITS) {
            return Err(KernelError::Config(format!("width {} in this stream", meta.bits)));
        }
        if codes.len() != meta.code_bytes(self.d) {
            return Err(KernelError::Shape {
                what: "group codes",
                expected: meta.code_bytes(self.d),
                got: codes.len(),
            });
        }
        if out_idx.len() != no || out_val.len() != no {
            return Err(KernelError::Shape { what: "group outliers", expected: no, got: out_idx.len() });
        }
        if self.blocks.last().is_none_or(|b| b.len() >= BLOCK_TOKENS) {
            self.blocks.push(Block::default());
        }
        let Some(b) = self.blocks.last_mut() else { unreachable!("a block was just ensured") };
        let had_slack = b.has_slack;
        b.strip_slack();
        b.codes.extend_from_slice(codes);
        b.out_idx.extend_from_slice(out_idx);
        b.out_val.extend_from_slice(out_val);
        b.meta.push(meta);
        b.add_slack();
        self.acct.add_group(&meta, self.d, self.raw_only);
        self.acct.padding = self.acct.padding + SLACK * usize::from(b.has_slack) - SLACK * usize::from(had_slack);
        self.len += 1;
        Ok(())
    }

    /// Metadata of group `t`.
    pub fn meta(&self, t: usize) -> Option<GroupMeta> {
        self.blocks.get(t / BLOCK_TOKENS)?.meta.get(t % BLOCK_TOKENS).copied()
    }

    /// Decodes group `t` into `out`.
    pub fn decode(&self, t: usize, out: &mut [f32]) -> bool {
        let Some(b) = self.blocks.get(t / BLOCK_TOKENS) else { return false };
        let want = t % BLOCK_TOKENS;
        let mut found = false;
        b.for_each(self.d, |i, g| {
            if i == want {
                quant::decode_group(&g.meta, self.spec.scheme, g.codes, g.out_idx, g.out_val, out);
                found = true;
            }
        });
        found
    }

    /// Rewrites block `bi`: `f(i, group, &mut sink)` returns `Some(meta)` after appending
    /// a new encoding of group `i` to the sink, or `None` to keep the group unchanged.
    pub fn rewrite_block(
        &mut self,
        bi: usize,
        f: impl FnMut(usize, GroupRef<'_>, &mut Sink) -> Result<Option<GroupMeta>>,
    ) -> Result<()> {
        self.rewrite_groups(bi, None, f)
    }

    /// [`PackedStream::rewrite_block`] calling `f` only for the groups `i` with
    /// `selected[i]` (all when `None`); the other groups are kept. The new encodings are
    /// made first (in buffers kept from one rewrite to the next; an error leaves the
    /// block unchanged); then, when every re-encoded group keeps its number of outliers
    /// (always, for a quantized group re-encoded at another quantized width), they
    /// replace the old ones in place (the metadata and outliers overwritten, the codes
    /// spliced: only the bytes after a group whose size changed move); otherwise the
    /// block is rebuilt.
    pub fn rewrite_groups(
        &mut self,
        bi: usize,
        selected: Option<&[bool]>,
        mut f: impl FnMut(usize, GroupRef<'_>, &mut Sink) -> Result<Option<GroupMeta>>,
    ) -> Result<()> {
        let d = self.d;
        let Some(old) = self.blocks.get(bi) else { return Ok(()) };
        let mut new = std::mem::take(&mut self.spare);
        new.meta.clear();
        new.codes.clear();
        new.out_idx.clear();
        new.out_val.clear();
        // Per re-encoded group: where its old codes and outliers are, where its new ones
        // are in `new`.
        let mut redo = [Redo::default(); BLOCK_TOKENS];
        let mut n_redo = 0;
        let (mut co, mut oo) = (0usize, 0usize);
        let mut same_outliers = true;
        for (i, m) in old.meta.iter().enumerate() {
            let (cb, no) = (m.code_bytes(d), m.n_out as usize);
            if selected.is_none_or(|sel| sel.get(i).copied().unwrap_or(false)) {
                let (nc, no_new) = (new.codes.len(), new.out_idx.len());
                let g = GroupRef {
                    meta: *m,
                    codes: &old.codes[co..],
                    out_idx: &old.out_idx[oo..oo + no],
                    out_val: &old.out_val[oo..oo + no],
                };
                let mut sink = Sink { codes: &mut new.codes, out_idx: &mut new.out_idx, out_val: &mut new.out_val };
                match f(i, g, &mut sink) {
                    Ok(Some(nm)) => {
                        same_outliers &= nm.n_out == m.n_out;
                        new.meta.push(nm);
                        redo[n_redo] = Redo { i, co, cb, oo, nc, no: no_new };
                        n_redo += 1;
                    }
                    Ok(None) => {
                        new.codes.truncate(nc);
                        new.out_idx.truncate(no_new);
                        new.out_val.truncate(no_new);
                    }
                    Err(e) => {
                        self.spare = new;
                        return Err(e);
                    }
                }
            }
            co += cb;
            oo += no;
        }
        let redo = &redo[..n_redo];
        // The account changes by the re-encoded groups' old and new encodings.
        let (mut gone, mut came) = (Bytes::default(), Bytes::default());
        for (r, nm) in redo.iter().zip(&new.meta) {
            gone.add_group(&old.meta[r.i], d, self.raw_only);
            came.add_group(nm, d, self.raw_only);
        }
        let had_slack = old.has_slack;
        if same_outliers {
            let b = &mut self.blocks[bi];
            b.strip_slack();
            let mut shift = 0isize;
            for (r, nm) in redo.iter().zip(&new.meta) {
                let (ncb, no) = (nm.code_bytes(d), nm.n_out as usize);
                b.meta[r.i] = *nm;
                b.out_idx[r.oo..r.oo + no].copy_from_slice(&new.out_idx[r.no..r.no + no]);
                b.out_val[r.oo..r.oo + no].copy_from_slice(&new.out_val[r.no..r.no + no]);
                let at = (r.co as isize + shift) as usize;
                if ncb == r.cb {
                    b.codes[at..at + ncb].copy_from_slice(&new.codes[r.nc..r.nc + ncb]);
                } else {
                    b.codes.splice(at..at + r.cb, new.codes[r.nc..r.nc + ncb].iter().copied());
                    shift += ncb as isize - r.cb as isize;
                }
            }
            b.add_slack();
        } else {
            let mut nb = Block::default();
            let mut next = redo.iter().zip(&new.meta).peekable();
            let (mut co, mut oo) = (0usize, 0usize);
            for (i, m) in old.meta.iter().enumerate() {
                let (cb, no) = (m.code_bytes(d), m.n_out as usize);
                match next.next_if(|(r, _)| r.i == i) {
                    Some((r, nm)) => {
                        let (ncb, nno) = (nm.code_bytes(d), nm.n_out as usize);
                        nb.meta.push(*nm);
                        nb.codes.extend_from_slice(&new.codes[r.nc..r.nc + ncb]);
                        nb.out_idx.extend_from_slice(&new.out_idx[r.no..r.no + nno]);
                        nb.out_val.extend_from_slice(&new.out_val[r.no..r.no + nno]);
                    }
                    None => {
                        nb.meta.push(*m);
                        nb.codes.extend_from_slice(&old.codes[co..co + cb]);
                        nb.out_idx.extend_from_slice(&old.out_idx[oo..oo + no]);
                        nb.out_val.extend_from_slice(&old.out_val[oo..oo + no]);
                    }
                }
                co += cb;
                oo += no;
            }
            nb.add_slack();
            self.blocks[bi] = nb;
        }
        gone.padding += SLACK * usize::from(had_slack);
        came.padding += SLACK * usize::from(self.blocks[bi].has_slack);
        self.acct.sub(&gone);
        self.acct.add(&came);
        self.spare = new;
        Ok(())
    }

    /// Exact byte accounting (kept up to date by every change: O(1)).
    pub fn bytes(&self) -> Bytes {
        self.acct
    }

    /// [`PackedStream::bytes`] recomputed from every group (the reference its
    /// maintained account is tested against).
    #[cfg(test)]
    pub(crate) fn bytes_walk(&self) -> Bytes {
        let mut a = Bytes::default();
        let d = self.d;
        for b in &self.blocks {
            if b.has_slack {
                a.padding += SLACK;
            }
            for m in &b.meta {
                a.groups += 1;
                a.values += d;
                a.width_sum += m.bits as usize;
                let no = m.n_out as usize;
                a.outlier_values += 2 * no;
                a.outlier_indices += no;
                if m.bits == RAW {
                    a.codes += 2 * d;
                    a.metadata += usize::from(!self.raw_only);
                    a.paper_bits += 16.0 * d as f64;
                } else {
                    let bits = d * m.bits as usize;
                    a.codes += bits / 8;
                    a.padding += m.code_bytes(d) - bits / 8;
                    a.metadata += META_BYTES;
                    a.paper_bits += (m.bits as usize * (d - no)) as f64 + 32.0 + 16.0 * no as f64;
                }
            }
        }
        debug_assert_eq!(a.outlier_values + a.outlier_indices, quant::OUTLIER_BYTES * (a.outlier_indices));
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::Outliers;

    #[test]
    fn hand_computed_bytes() {
        // d = 64, alpha 1% total -> 2 outliers per group.
        let mut s = PackedStream::new(64, QuantSpec::default(), false);
        let x: Vec<f32> = (0..64).map(|i| (i as f32 - 30.0) / 16.0).collect();
        s.push(&x, 3).unwrap(); // 24 code bytes, 6 meta, 2 outliers = 6 bytes
        s.push(&x, 0).unwrap(); // 0 code bytes, 6 meta, 6 outlier bytes
        s.push(&x, RAW).unwrap(); // 128 code bytes, 1 width byte
        let b = s.bytes();
        assert_eq!(b, s.bytes_walk());
        assert_eq!(b.codes, 24 + 128);
        assert_eq!(b.metadata, 6 + 6 + 1);
        assert_eq!(b.outlier_values, 2 * 2 * 2);
        assert_eq!(b.outlier_indices, 2 * 2);
        assert_eq!(b.padding, SLACK);
        assert_eq!(b.total(), 152 + 13 + 8 + 4 + 8);
        assert_eq!(b.fp16_equivalent(), 3 * 128);
        // paper: 3*62 + 32 + 32 ; 0 + 32 + 32 ; 1024
        assert_eq!(b.paper_bits, (186 + 64 + 64 + 1024) as f64);
        // d = 8 at 3 bits: exactly 3 bytes; d = 8 at 5 bits: 5 bytes; d=24 at 3: 9 bytes.
        let mut s = PackedStream::new(24, QuantSpec { outliers: Outliers::NONE, ..Default::default() }, false);
        s.push(&[0.5; 24], 3).unwrap();
        assert_eq!(s.bytes().codes, 9);
        assert_eq!(s.bytes().padding, SLACK);
    }

    #[test]
    fn rewrite_groups_keeps_unselected_and_declined_groups() {
        let spec = QuantSpec::default();
        let rows: Vec<Vec<f32>> = (0..70)
            .map(|t| (0..16).map(|i| half::f16::from_f32(((t * 7 + i * 3) % 11) as f32 - 5.0).to_f32()).collect())
            .collect();
        let build = || {
            let mut s = PackedStream::new(16, spec, false);
            for (t, r) in rows.iter().enumerate() {
                s.push(r, [8u8, RAW, 3, 0][t % 4]).unwrap();
            }
            s
        };
        let (mut a, mut b) = (build(), build());
        let sel: Vec<bool> = (0..BLOCK_TOKENS).map(|i| i.is_multiple_of(3)).collect();
        for (s, selected) in [(&mut a, Some(sel.as_slice())), (&mut b, None)] {
            for bi in 0..2 {
                s.rewrite_groups(bi, selected, |i, g, sink| {
                    // Selected groups: every 6th is declined, the others re-encoded at 2 bits.
                    if !i.is_multiple_of(3) || i.is_multiple_of(6) {
                        return Ok(None);
                    }
                    let mut tmp = [0f32; 16];
                    quant::decode_group(&g.meta, spec.scheme, g.codes, g.out_idx, g.out_val, &mut tmp);
                    quant::encode_group(&tmp, 2, &spec, sink.codes, sink.out_idx, sink.out_val).map(Some)
                })
                .unwrap();
            }
        }
        let (mut x, mut y) = ([0f32; 16], [0f32; 16]);
        for t in 0..70 {
            assert!(a.decode(t, &mut x) && b.decode(t, &mut y));
            assert_eq!(x, y, "t {t}");
            let i = t % BLOCK_TOKENS;
            let want = if i.is_multiple_of(3) && !i.is_multiple_of(6) { 2 } else { [8u8, RAW, 3, 0][t % 4] };
            assert_eq!(a.meta(t).unwrap().bits, want, "t {t}");
        }
        assert_eq!(a.bytes(), b.bytes());
        assert_eq!(a.bytes(), a.bytes_walk());
        assert_eq!(b.bytes(), b.bytes_walk());
    }

    #[test]
    fn blocks_grow_without_copy_and_decode() {
        let mut s = PackedStream::new(8, QuantSpec { outliers: Outliers::NONE, ..Default::default() }, false);
        for t in 0..(2 * BLOCK_TOKENS + 3) {
            s.push(&[t as f32; 8], 8).unwrap();
        }
        assert_eq!(s.blocks().len(), 3);
        let ptr = s.blocks()[0].codes.as_ptr();
        s.push(&[1.0; 8], 4).unwrap();
        assert_eq!(s.blocks()[0].codes.as_ptr(), ptr);
        let mut out = [0f32; 8];
        assert!(s.decode(70, &mut out));
        assert_eq!(out, [70.0; 8]);
        assert!(!s.decode(10_000, &mut out));
        let raw = PackedStream::new(8, QuantSpec::default(), true);
        assert_eq!(raw.bytes().total(), 0);
    }
}
