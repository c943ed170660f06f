//! Bookkeeping of a device mirror of one cache layer: where every group of the layer's
//! packed streams lives in the mirror's buffers, and the batch of writes ([`Update`])
//! that brings the mirror up to date with the host cache after appends and
//! re-quantization. It is plain host code, so it is tested here without a GPU
//! ([`HostArena`] applies an update the way `cuda::kv` applies it on the device).
//!
//! Layout of one layer, for its `n_streams = 2 * n_kv_heads` streams (stream
//! `2 * head` holds the head's keys, `2 * head + 1` its values):
//! - six metadata arrays, `n_streams * cap_tokens` long each: `m`, `s` (f16 bits), `bits`,
//!   `n_out` (u8), `code_off`, `out_off` (u32). Group `t` of stream `s` is slot
//!   `s * cap_tokens + t`.
//! - one code arena (`cap_codes` bytes) and one outlier arena (`cap_out` indices, u8, and
//!   values, f16 bits), shared by the streams. A group's code bytes start at its
//!   `code_off`, its outliers at its `out_off`; its width and outlier count give their
//!   lengths. The bytes of a group are exactly the host store's.
//!
//! The attention kernel finds a group from its own offsets alone (it never reads the
//! next group's), so a group re-encoded at another width is written at the arenas' tail
//! and only its slot changes. The old bytes are garbage until an arena or the token
//! capacity runs out; then the layer is rebuilt compact ([`Update::realloc`]) with twice
//! the room its live groups need, which also bounds the garbage.

use crate::error::{KernelError, Result};
use crate::quant::GroupMeta;
use crate::store::{BLOCK_TOKENS, PackedStream};

/// u32 words per record of [`Update::records`]: slot, `m | s << 16`, `bits | n_out << 8`,
/// code offset, outlier offset.
pub const RECORD_WORDS: usize = 5;

/// Capacities of a layer's mirror buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Streams (2 per KV head).
    pub n_streams: usize,
    /// Groups per stream.
    pub cap_tokens: usize,
    /// Bytes of the code arena.
    pub cap_codes: usize,
    /// Entries of the outlier arena.
    pub cap_out: usize,
}

impl Layout {
    /// Metadata slots (`n_streams * cap_tokens`).
    pub fn slots(&self) -> usize {
        self.n_streams * self.cap_tokens
    }
    /// Bytes of every buffer of this layout: 14 metadata bytes per slot (f16 `m`, `s`;
    /// u8 width and outlier count; u32 code and outlier offsets), the code arena and 3
    /// bytes per outlier entry.
    pub fn bytes(&self) -> usize {
        14 * self.slots() + self.cap_codes + 3 * self.cap_out
    }
}

/// The writes that bring a mirror layer up to date.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Update {
    /// `Some`: allocate every buffer anew (zeroed) with this layout first; the batch
    /// then holds every group of the layer.
    pub realloc: Option<Layout>,
    /// [`RECORD_WORDS`] words per written group (its slot and metadata).
    pub records: Vec<u32>,
    /// Code bytes, to be written at `codes_at` in the code arena.
    pub codes: Vec<u8>,
    pub codes_at: usize,
    /// Outlier indices and values (f16 bits), to be written at `out_at`.
    pub out_idx: Vec<u8>,
    pub out_val: Vec<u16>,
    pub out_at: usize,
}

impl Update {
    /// Groups written.
    pub fn groups(&self) -> usize {
        self.records.len() / RECORD_WORDS
    }
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.realloc.is_none() && self.records.is_empty()
    }
    /// Bytes copied to the device for this update.
    pub fn upload_bytes(&self) -> usize {
        4 * self.records.len() + self.codes.len() + self.out_idx.len() + 2 * self.out_val.len()
    }
}

/// Host-side state of one layer's mirror: its layout, every mirrored group's size and
/// the arenas' fill.
#[derive(Clone, Debug)]
pub struct LayerBook {
    layout: Option<Layout>,
    /// Per stream, per mirrored group: (code bytes, outliers).
    sizes: Vec<Vec<(u32, u8)>>,
    codes_tail: usize,
    out_tail: usize,
    /// Sums of `sizes`: the arenas' live code bytes and outliers.
    live: (usize, usize),
}

/// Smallest capacities a layer is allocated with.
const MIN_TOKENS: usize = 64;
const MIN_CODES: usize = 1 << 12;
const MIN_OUT: usize = 1 << 8;

impl LayerBook {
    /// An empty mirror of `n_streams` streams (nothing allocated yet).
    pub fn new(n_streams: usize) -> Self {
        LayerBook { layout: None, sizes: vec![Vec::new(); n_streams], codes_tail: 0, out_tail: 0, live: (0, 0) }
    }

    /// The current layout (`None` before the first update).
    pub fn layout(&self) -> Option<Layout> {
        self.layout
    }
    /// Groups of stream `s` the mirror holds.
    pub fn len(&self, s: usize) -> usize {
        self.sizes.get(s).map_or(0, Vec::len)
    }
    /// Whether the mirror holds no group.
    pub fn is_empty(&self) -> bool {
        self.sizes.iter().all(Vec::is_empty)
    }
    /// Bytes of the mirror's buffers (its allocation, garbage and free room included).
    pub fn bytes(&self) -> usize {
        self.layout.map_or(0, |l| l.bytes())
    }
    /// Code bytes and outliers of the groups the mirror holds now (the arenas' live part).
    pub fn live(&self) -> (usize, usize) {
        self.live
    }

    /// The update that makes the mirror equal to `streams` (the layer's streams in
    /// mirror order), given the tokens each stream re-encoded since the last update (any
    /// order, repeats allowed). Groups appended since then are found from the lengths.
    pub fn plan(&mut self, streams: &[&PackedStream], rewritten: &[Vec<u32>]) -> Result<Update> {
        let n = self.sizes.len();
        if streams.len() != n || rewritten.len() != n {
            return Err(KernelError::Shape { what: "mirrored streams", expected: n, got: streams.len() });
        }
        let d = streams.first().map_or(0, |s| s.d());
        let mut want: Vec<Vec<u32>> = Vec::with_capacity(n);
        let (mut add_codes, mut add_out) = (0usize, 0usize);
        let (mut gone_codes, mut gone_out) = (0usize, 0usize);
        for (s, (st, rw)) in streams.iter().zip(rewritten).enumerate() {
            let have = self.sizes[s].len();
            if st.d() != d {
                return Err(KernelError::Config(format!("stream {s}: group length {} differs from {d}", st.d())));
            }
            if st.len() < have {
                return Err(KernelError::Config(format!(
                    "stream {s} has {} groups but its mirror {have}: caches never shrink",
                    st.len()
                )));
            }
            let mut w: Vec<u32> = rw.iter().copied().filter(|&t| (t as usize) < have).collect();
            w.sort_unstable();
            w.dedup();
            for &t in &w {
                let (cb, no) = self.sizes[s][t as usize];
                gone_codes += cb as usize;
                gone_out += no as usize;
            }
            w.extend(have as u32..st.len() as u32);
            for &t in &w {
                let (cb, no) = group_size(st, t as usize, d)?;
                add_codes += cb as usize;
                add_out += no as usize;
            }
            want.push(w);
        }
        let max_len = streams.iter().map(|s| s.len()).max().unwrap_or(0);
        let live = (self.live.0 + add_codes - gone_codes, self.live.1 + add_out - gone_out);
        // Room for the new bytes, and not more than 4x the room the live bytes need
        // (re-quantization down can shrink a layer's live bytes a lot).
        let fits = self.layout.is_some_and(|l| {
            max_len <= l.cap_tokens
                && self.codes_tail + add_codes <= l.cap_codes
                && self.out_tail + add_out <= l.cap_out
                && l.cap_codes <= 4 * live.0.max(MIN_CODES)
                && l.cap_out <= 4 * live.1.max(MIN_OUT)
        });
        let mut upd = Update::default();
        if !fits {
            // Rebuild: every group, compact, with twice the room the live groups take.
            let (mut codes, mut outs) = (0usize, 0usize);
            for (s, st) in streams.iter().enumerate() {
                want[s] = (0..st.len() as u32).collect();
                for t in 0..st.len() {
                    let (cb, no) = group_size(st, t, d)?;
                    codes += cb as usize;
                    outs += no as usize;
                }
            }
            let layout = Layout {
                n_streams: n,
                cap_tokens: (2 * max_len).max(MIN_TOKENS).next_multiple_of(BLOCK_TOKENS),
                cap_codes: (2 * codes).max(MIN_CODES),
                cap_out: (2 * outs).max(MIN_OUT),
            };
            if layout.cap_codes > u32::MAX as usize || layout.cap_out > u32::MAX as usize {
                return Err(KernelError::Config("mirror arena too large for u32 offsets".to_string()));
            }
            upd.realloc = Some(layout);
            self.layout = Some(layout);
            self.codes_tail = 0;
            self.out_tail = 0;
            for v in &mut self.sizes {
                v.clear();
            }
        }
        self.live = live;
        let cap = self.layout.map_or(0, |l| l.cap_tokens);
        upd.codes_at = self.codes_tail;
        upd.out_at = self.out_tail;
        for (s, (st, w)) in streams.iter().zip(&want).enumerate() {
            let sizes = &mut self.sizes[s];
            visit(st, w, |t, meta, codes, idx, val| {
                let cb = meta.code_bytes(d);
                let no = meta.n_out as usize;
                upd.records.extend_from_slice(&[
                    (s * cap + t) as u32,
                    u32::from(meta.m.to_bits()) | u32::from(meta.s.to_bits()) << 16,
                    u32::from(meta.bits) | u32::from(meta.n_out) << 8,
                    (self.codes_tail + upd.codes.len()) as u32,
                    (self.out_tail + upd.out_idx.len()) as u32,
                ]);
                upd.codes.extend_from_slice(&codes[..cb]);
                upd.out_idx.extend_from_slice(&idx[..no]);
                upd.out_val.extend(val[..no].iter().map(|v| v.to_bits()));
                if t < sizes.len() {
                    sizes[t] = (cb as u32, meta.n_out);
                } else {
                    debug_assert_eq!(t, sizes.len());
                    sizes.push((cb as u32, meta.n_out));
                }
            });
        }
        self.codes_tail += upd.codes.len();
        self.out_tail += upd.out_idx.len();
        Ok(upd)
    }
}

/// Code bytes and outliers of group `t`.
fn group_size(s: &PackedStream, t: usize, d: usize) -> Result<(u32, u8)> {
    let m = s.meta(t).ok_or_else(|| KernelError::Config(format!("group {t} missing from its stream")))?;
    Ok((m.code_bytes(d) as u32, m.n_out))
}

/// Calls `f(t, meta, codes, out_idx, out_val)` for the groups `tokens` (ascending) of `s`.
fn visit(s: &PackedStream, tokens: &[u32], mut f: impl FnMut(usize, &GroupMeta, &[u8], &[u8], &[half::f16])) {
    let d = s.d();
    let mut next = tokens.iter().peekable();
    while let Some(&&t) = next.peek() {
        let bi = t as usize / BLOCK_TOKENS;
        let t0 = bi * BLOCK_TOKENS;
        let Some(b) = s.blocks().get(bi) else { return };
        b.for_each(d, |i, g| {
            if next.peek().is_some_and(|&&t| t as usize == t0 + i) {
                next.next();
                f(t0 + i, &g.meta, g.codes, g.out_idx, g.out_val);
            }
        });
        // Anything left in this block was past its end: skip to the next block.
        while next.peek().is_some_and(|&&t| t as usize / BLOCK_TOKENS == bi) {
            next.next();
        }
    }
}

/// A mirror layer's buffers in host memory, written exactly as `cuda::kv` writes the
/// device's: what the tests check the bookkeeping against, and a reference for the
/// device tests.
#[derive(Clone, Debug, Default)]
pub struct HostArena {
    pub layout: Option<Layout>,
    pub m: Vec<u16>,
    pub s: Vec<u16>,
    pub bits: Vec<u8>,
    pub n_out: Vec<u8>,
    pub code_off: Vec<u32>,
    pub out_off: Vec<u32>,
    pub codes: Vec<u8>,
    pub out_idx: Vec<u8>,
    pub out_val: Vec<u16>,
}

impl HostArena {
    /// Applies `u`: reallocation first, then the records, then the arena bytes.
    pub fn apply(&mut self, u: &Update) -> Result<()> {
        if let Some(l) = u.realloc {
            *self = HostArena {
                layout: Some(l),
                m: vec![0; l.slots()],
                s: vec![0; l.slots()],
                bits: vec![0; l.slots()],
                n_out: vec![0; l.slots()],
                code_off: vec![0; l.slots()],
                out_off: vec![0; l.slots()],
                codes: vec![0; l.cap_codes],
                out_idx: vec![0; l.cap_out],
                out_val: vec![0; l.cap_out],
            };
        }
        let l = self.layout.ok_or_else(|| KernelError::Config("update before any allocation".to_string()))?;
        for r in u.records.chunks_exact(RECORD_WORDS) {
            let slot = r[0] as usize;
            if slot >= l.slots() {
                return Err(KernelError::Config(format!("slot {slot} outside {} slots", l.slots())));
            }
            self.m[slot] = r[1] as u16;
            self.s[slot] = (r[1] >> 16) as u16;
            self.bits[slot] = r[2] as u8;
            self.n_out[slot] = (r[2] >> 8) as u8;
            self.code_off[slot] = r[3];
            self.out_off[slot] = r[4];
        }
        let put = |dst: &mut Vec<u8>, at: usize, src: &[u8]| -> Result<()> {
            dst.get_mut(at..at + src.len())
                .ok_or_else(|| KernelError::Config("arena write past its capacity".to_string()))?
                .copy_from_slice(src);
            Ok(())
        };
        put(&mut self.codes, u.codes_at, &u.codes)?;
        put(&mut self.out_idx, u.out_at, &u.out_idx)?;
        self.out_val
            .get_mut(u.out_at..u.out_at + u.out_val.len())
            .ok_or_else(|| KernelError::Config("arena write past its capacity".to_string()))?
            .copy_from_slice(&u.out_val);
        Ok(())
    }

    /// Decodes group `t` of stream `s` from the arena, as the attention kernel reads it.
    pub fn decode(&self, s: usize, t: usize, d: usize, scheme: crate::quant::Scheme, out: &mut [f32]) {
        let l = self.layout.expect("allocated");
        let slot = s * l.cap_tokens + t;
        let meta = GroupMeta {
            m: half::f16::from_bits(self.m[slot]),
            s: half::f16::from_bits(self.s[slot]),
            bits: self.bits[slot],
            n_out: self.n_out[slot],
        };
        let (co, oo, no) = (self.code_off[slot] as usize, self.out_off[slot] as usize, meta.n_out as usize);
        // The group's own bytes only, plus zeroed slack for the vector decoders.
        let mut codes = self.codes[co..co + meta.code_bytes(d)].to_vec();
        codes.extend_from_slice(&[0; 16]);
        let val: Vec<half::f16> = self.out_val[oo..oo + no].iter().map(|&v| half::f16::from_bits(v)).collect();
        crate::quant::decode_group(&meta, scheme, &codes, &self.out_idx[oo..oo + no], &val, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{CacheConfig, PolicyCache, new_cache};
    use crate::policy::KvPolicy;
    use std::str::FromStr;

    const CFG: CacheConfig = CacheConfig { n_layers: 2, n_kv_heads: 2, n_q_heads: 4, head_dim: 64 };

    fn rows(n: usize, seed: usize) -> Vec<f32> {
        let row = CFG.n_kv_heads * CFG.head_dim;
        (0..n * row)
            .map(|i| {
                let x = ((i * 7919 + seed * 104_729) % 10_007) as f32 / 10_007.0;
                (x * std::f32::consts::TAU).sin() * 2.0 + if i % 61 == 0 { 9.0 } else { 0.0 }
            })
            .collect()
    }

    /// Syncs `arena` with layer `layer` of `c` and checks every group decodes the same.
    fn sync_and_check(
        c: &mut dyn PolicyCache,
        book: &mut LayerBook,
        arena: &mut HostArena,
        layer: usize,
    ) -> (Update, usize) {
        let mut rw = Vec::new();
        for h in 0..CFG.n_kv_heads {
            let [k, v] = c.take_rewrites(layer, h).unwrap();
            rw.push(k);
            rw.push(v);
        }
        let streams: Vec<&PackedStream> = (0..CFG.n_kv_heads)
            .flat_map(|h| {
                let (k, v) = c.streams(layer, h).unwrap();
                [k, v]
            })
            .collect();
        let recorded = rw.iter().map(Vec::len).sum();
        let u = book.plan(&streams, &rw).unwrap();
        arena.apply(&u).unwrap();
        let d = CFG.head_dim;
        let (mut a, mut b) = (vec![0f32; d], vec![0f32; d]);
        for (s, st) in streams.iter().enumerate() {
            assert_eq!(book.len(s), st.len());
            for t in 0..st.len() {
                assert!(st.decode(t, &mut a));
                arena.decode(s, t, d, st.spec().scheme, &mut b);
                let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&a), bits(&b), "stream {s} token {t}");
            }
        }
        (u, recorded)
    }

    #[test]
    fn the_mirror_follows_appends_and_requantization_byte_for_byte() {
        for label in ["qaq", "qaq-tuned", "uniform:4", "fp16", "uniform:4/3:noout:recent=32:sinks=4+rot"] {
            let policy = KvPolicy::from_str(label).unwrap();
            let mut c = new_cache(CFG, policy).unwrap();
            c.track_rewrites();
            let (mut book, mut arena) = (LayerBook::new(2 * CFG.n_kv_heads), HostArena::default());
            let (mut reallocs, mut rewrites) = (0, 0);
            // A 300-token prefill, then 400 decode steps with re-quantization.
            let d = CFG.head_dim;
            for step in 0..401 {
                let n = if step == 0 { 300 } else { 1 };
                for layer in 0..CFG.n_layers {
                    let r = rows(n, step * 7 + layer);
                    c.append(layer, &r, &rows(n, step * 13 + layer + 1)).unwrap();
                    let q = rows(n, step + 99);
                    let q: Vec<f32> = q.iter().cycle().take(n * CFG.n_q_heads * d).copied().collect();
                    c.attend_rows(layer, &q, n).unwrap();
                }
                c.end_step().unwrap();
                if step % 37 == 0 || step == 400 {
                    let (u, r) = sync_and_check(&mut *c, &mut book, &mut arena, 1);
                    reallocs += usize::from(u.realloc.is_some());
                    rewrites += r;
                }
            }
            assert!(reallocs >= 1, "{label}");
            let (live, _) = book.live();
            assert!(book.bytes() >= live, "{label}");
            // Re-quantization (QAQ) and tokens leaving an fp16 window re-encode groups,
            // and each is recorded.
            let moved = c.counters();
            assert_eq!(rewrites > 0, label.starts_with("qaq") || label.contains("recent="), "{label}: {rewrites}");
            if label.starts_with("qaq") {
                assert!(rewrites as u64 <= moved.k_down + moved.v_down + moved.k_up + moved.v_up, "{label}");
            }
            // Nothing changed since: the next update is empty.
            let (u, _) = sync_and_check(&mut *c, &mut book, &mut arena, 1);
            assert!(u.is_empty() && u.upload_bytes() == 0, "{label}: {u:?}");
        }
    }

    #[test]
    fn garbage_is_bounded_by_rebuilding_compact() {
        let policy = KvPolicy::from_str("qaq").unwrap();
        let mut c = new_cache(CFG, policy).unwrap();
        c.track_rewrites();
        let (mut book, mut arena) = (LayerBook::new(4), HostArena::default());
        let d = CFG.head_dim;
        for step in 0..600 {
            c.append(0, &rows(1, step), &rows(1, step + 5)).unwrap();
            c.append(1, &rows(1, step), &rows(1, step + 5)).unwrap();
            let q = rows(1, step + 3);
            let q: Vec<f32> = q.iter().cycle().take(CFG.n_q_heads * d).copied().collect();
            c.attend_rows(0, &q, 1).unwrap();
            c.attend_rows(1, &q, 1).unwrap();
            c.end_step().unwrap();
            sync_and_check(&mut *c, &mut book, &mut arena, 0);
            let l = book.layout().unwrap();
            let (live, live_out) = book.live();
            // After a rebuild the arena is twice the live bytes; until the next one it
            // only fills up, so it never holds more than 2x (or the minimum) in all.
            assert!(l.cap_codes <= 4 * live.max(MIN_CODES), "{l:?} live {live}");
            assert!(l.cap_out <= 4 * live_out.max(MIN_OUT), "{l:?}");
            let sum = (0..4).map(|s| book.sizes[s].iter().map(|&(c, _)| c as usize).sum::<usize>()).sum::<usize>();
            assert_eq!(sum, live);
            assert!(l.cap_tokens >= c.len(0));
        }
    }

    #[test]
    fn a_shrunk_stream_or_wrong_stream_count_is_an_error() {
        let mut c = new_cache(CFG, KvPolicy::Fp16).unwrap();
        c.append(0, &rows(3, 0), &rows(3, 1)).unwrap();
        let (k, v) = c.streams(0, 0).unwrap();
        let mut book = LayerBook::new(2);
        assert!(book.plan(&[k], &[vec![]]).is_err());
        book.plan(&[k, v], &[vec![], vec![]]).unwrap();
        let empty = PackedStream::new(64, *k.spec(), true);
        let e = book.plan(&[&empty, v], &[vec![], vec![]]).unwrap_err().to_string();
        assert!(e.contains("never shrink"), "{e}");
    }
}
