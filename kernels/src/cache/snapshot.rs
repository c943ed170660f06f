//! Snapshots: a sequence's whole cache as bytes, to move it to another worker (request
//! migration) instead of prefilling it again ([`super::PolicyCache::snapshot`],
//! [`super::restore`]).
//!
//! The snapshot holds everything the cache's future depends on, so a restored cache
//! behaves exactly as the original would have (same attention, same widths, same
//! re-quantizations): every packed group as stored (metadata, codes, outliers), and for
//! QAQ the fp16 backups of the host tier (evicted ones stay evicted), the attention
//! windows, the ||Q||^2 histograms, the key channel scales, the counters and the step
//! count. Its size is what the transfer costs: the packed cache plus, for QAQ, the fp16
//! backups.
//!
//! Layout (little endian): magic `QAQKV`, format version, the shape, the policy (its
//! `Debug` text, compared on restore), the step and counters, then per layer its length
//! and per KV head the scales, histogram, windows and both streams, then the backups.
//! Every count is checked against the bytes left before anything is allocated, so a
//! truncated or corrupt snapshot is an error, never a panic or a huge allocation. The
//! baselines have no QAQ state: they write neutral fields (no key scales, an empty
//! histogram, one-slot windows of zeros, no backups) and read and check, then ignore,
//! whatever a snapshot holds there.

use super::layers::Layers;
use super::types::Counters;
use crate::attention::KStore;
use crate::base::{GroupMeta, MAX_BITS, RAW};
use crate::error::{KernelError, Result};
use crate::host::HostTier;
use crate::policy::{KvPolicy, QNormTracker, Windows};
use crate::store::PackedStream;
use half::f16;

const MAGIC: &[u8; 5] = b"QAQKV";
const VERSION: u16 = 1;

pub(crate) fn bad(what: impl std::fmt::Display) -> KernelError {
    KernelError::Config(format!("kv snapshot: {what}"))
}

#[derive(Default)]
struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn len(&mut self, n: usize) {
        self.u64(n as u64);
    }
    fn f16s(&mut self, v: &[f16]) {
        v.iter().for_each(|x| self.u16(x.to_bits()));
    }
    fn f32s(&mut self, v: &[f32]) {
        v.iter().for_each(|x| self.u32(x.to_bits()));
    }
    fn bytes(&mut self, v: &[u8]) {
        self.0.extend_from_slice(v);
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.buf.len() - self.pos {
            return Err(bad(format!("truncated at byte {} of {} (wanted {n} more)", self.pos, self.buf.len())));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes([self.u8()?, self.u8()?]))
    }
    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(std::array::from_fn(|i| b[i])))
    }
    /// A count of items of `size` bytes each, checked against the bytes left.
    fn len(&mut self, size: usize, what: &str) -> Result<usize> {
        let n = self.u64()?;
        let left = (self.buf.len() - self.pos) as u64;
        if n.saturating_mul(size.max(1) as u64) > left {
            return Err(bad(format!("{what}: {n} items cannot fit in the {left} bytes left")));
        }
        Ok(n as usize)
    }
    fn f16s(&mut self, n: usize) -> Result<Vec<f16>> {
        (0..n).map(|_| self.u16().map(f16::from_bits)).collect()
    }
    fn f32s(&mut self, n: usize) -> Result<Vec<f32>> {
        (0..n).map(|_| self.u32().map(f32::from_bits)).collect()
    }
}

fn write_stream(w: &mut Writer, s: &PackedStream) {
    w.len(s.len());
    for b in s.blocks() {
        b.for_each(s.d(), |_, g| {
            let m = g.meta;
            w.u16(m.m.to_bits());
            w.u16(m.s.to_bits());
            w.u8(m.bits);
            w.u8(m.n_out);
            w.bytes(&g.codes[..m.code_bytes(s.d())]);
            w.bytes(g.out_idx);
            w.f16s(g.out_val);
        });
    }
}

fn read_stream(r: &mut Reader<'_>, s: &mut PackedStream, what: &str) -> Result<()> {
    let n = r.len(6, what)?;
    for _ in 0..n {
        let m = GroupMeta { m: f16::from_bits(r.u16()?), s: f16::from_bits(r.u16()?), bits: r.u8()?, n_out: r.u8()? };
        if m.bits > MAX_BITS && m.bits != RAW {
            return Err(bad(format!("{what}: width {} is not 0..=8 or raw", m.bits)));
        }
        let codes = r.take(m.code_bytes(s.d()))?;
        let out_idx = r.take(m.n_out as usize)?;
        if out_idx.iter().any(|&i| i as usize >= s.d()) {
            return Err(bad(format!("{what}: an outlier index is not below the head dimension {}", s.d())));
        }
        let out_val = r.f16s(m.n_out as usize)?;
        s.push_encoded(m, codes, out_idx, &out_val).map_err(|e| bad(format!("{what}: {e}")))?;
    }
    Ok(())
}

/// The state QAQ adds to the shared storage in a snapshot (the baselines have none).
pub(crate) trait QaqState {
    /// The key channel scales, ||Q||^2 tracker and attention windows of KV head `h` of
    /// `layer`.
    fn head(&self, layer: usize, h: usize) -> (&[f32], &QNormTracker, &Windows);
    /// Restores them.
    fn set_head(&mut self, layer: usize, h: usize, kscale: Vec<f32>, qn: QNormTracker, win: Windows);
    /// The host tier with the fp16 backups.
    fn host(&self) -> &dyn HostTier;
    /// The host tier, mutably.
    fn host_mut(&mut self) -> &mut dyn HostTier;
}

fn write_head(w: &mut Writer, kscale: &[f32], qn: &QNormTracker, win: &Windows) {
    w.len(kscale.len());
    w.f32s(kscale);
    let (bins, n) = qn.parts();
    w.u64(n);
    let nonzero: Vec<(usize, u32)> = bins.iter().copied().enumerate().filter(|&(_, c)| c > 0).collect();
    w.len(nonzero.len());
    for (i, c) in nonzero {
        w.u32(i as u32);
        w.u32(c);
    }
    let (wn, vals, seen) = win.parts();
    w.len(wn);
    w.len(seen.len());
    w.f32s(&vals);
    seen.iter().for_each(|&s| w.u32(s));
}

/// Reads what [`write_head`] wrote, checked (`what` names the head in errors).
fn read_head(r: &mut Reader<'_>, d: usize, what: &dyn Fn(&str) -> String) -> Result<(Vec<f32>, QNormTracker, Windows)> {
    let ns = r.len(4, "key scales")?;
    if ns != 0 && ns != d {
        return Err(bad(what(&format!("{ns} key scales for head dimension {d}"))));
    }
    let kscale = r.f32s(ns)?;
    let q_n = r.u64()?;
    let mut bins = QNormTracker::default().parts().0.to_vec();
    for _ in 0..r.len(8, "histogram")? {
        let (i, count) = (r.u32()? as usize, r.u32()?);
        *bins.get_mut(i).ok_or_else(|| bad(what(&format!("histogram bin {i} out of range"))))? = count;
    }
    let qn = QNormTracker::from_parts(bins, q_n).ok_or_else(|| bad(what("histogram size")))?;
    let wn = r.u64()? as usize;
    let nw = r.len(4, "windows")?;
    let vals = r.f32s(nw.checked_mul(wn).ok_or_else(|| bad(what("window size")))?)?;
    let seen = (0..nw).map(|_| r.u32()).collect::<Result<Vec<u32>>>()?;
    let win = Windows::from_parts(wn, vals, seen).ok_or_else(|| bad(what("window lengths")))?;
    Ok((kscale, qn, win))
}

/// The snapshot of a cache: its storage `layers` under `policy`, its `counters`, and
/// QAQ's state (`None`: a baseline).
pub(crate) fn write(
    layers: &Layers,
    policy: &KvPolicy,
    counters: &Counters,
    qaq: Option<&dyn QaqState>,
) -> Result<Vec<u8>> {
    if matches!(policy, KvPolicy::Kivi(_)) {
        return Err(bad("the kivi baseline's caches are not transferable"));
    }
    let len = layers.len(0);
    if let Some((i, l)) = layers.layers.iter().enumerate().find(|(_, l)| l.len != len || !l.staged_k.is_empty()) {
        return Err(bad(format!(
            "taken mid-step: layer {i} holds {} tokens ({} staged), layer 0 holds {len}",
            l.len,
            l.staged_k.len() / layers.cfg.row().max(1)
        )));
    }
    let mut w = Writer::default();
    w.bytes(MAGIC);
    w.u16(VERSION);
    let c = &layers.cfg;
    for v in [c.n_layers, c.n_kv_heads, c.n_q_heads, c.head_dim] {
        w.u32(v as u32);
    }
    let policy = format!("{policy:?}");
    w.len(policy.len());
    w.bytes(policy.as_bytes());
    w.u64(layers.step);
    let k = counters;
    for v in [k.k_up, k.k_down, k.v_up, k.v_down, k.up_blocked, k.backup_bytes_read] {
        w.u64(v);
    }
    let (empty, mut neutral) = (QNormTracker::default(), Windows::new(1));
    neutral.grow(len);
    for (li, l) in layers.layers.iter().enumerate() {
        w.len(l.len);
        // KIVI's count of value groups re-encoded (its caches are never snapshotted).
        w.len(0);
        for (h, hd) in l.heads.iter().enumerate() {
            match qaq {
                Some(q) => {
                    let (kscale, qn, win) = q.head(li, h);
                    write_head(&mut w, kscale, qn, win);
                }
                None => write_head(&mut w, &[], &empty, &neutral),
            }
            let KStore::Packed(ks) = &hd.k else { return Err(bad("the kivi baseline's caches are not transferable")) };
            write_stream(&mut w, ks);
            write_stream(&mut w, &hd.v);
        }
    }
    for layer in 0..layers.layers.len() {
        for t in 0..len {
            match qaq.and_then(|q| q.host().get(layer, t)) {
                Some((kr, vr)) => {
                    w.u8(1);
                    w.f16s(kr);
                    w.f16s(vr);
                }
                None => w.u8(0),
            }
        }
    }
    Ok(w.0)
}

/// Restores a snapshot into the empty storage `layers` of a new cache under `policy`
/// (which must be the snapshot's, as its shape), and into QAQ's state (`None`: a
/// baseline). Returns the counters. Any inconsistency is an error.
pub(crate) fn read(
    layers: &mut Layers,
    policy: &KvPolicy,
    bytes: &[u8],
    mut qaq: Option<&mut dyn QaqState>,
) -> Result<Counters> {
    let cfg = layers.cfg;
    let r = &mut Reader { buf: bytes, pos: 0 };
    if r.take(MAGIC.len()).ok() != Some(&MAGIC[..]) {
        return Err(bad("not a qaq KV snapshot (bad magic)"));
    }
    let version = r.u16()?;
    if version != VERSION {
        return Err(bad(format!("format version {version}, this build reads {VERSION}")));
    }
    let shape: Vec<usize> = (0..4).map(|_| r.u32().map(|v| v as usize)).collect::<Result<_>>()?;
    let want = [cfg.n_layers, cfg.n_kv_heads, cfg.n_q_heads, cfg.head_dim];
    if shape != want {
        return Err(bad(format!(
            "shape (layers, KV heads, query heads, head dim) {shape:?}, this model's is {want:?}"
        )));
    }
    let n = r.len(1, "policy")?;
    let theirs = String::from_utf8_lossy(r.take(n)?).into_owned();
    let ours = format!("{policy:?}");
    if theirs != ours {
        return Err(bad(format!("taken under policy {theirs}, restoring under {ours}")));
    }
    layers.step = r.u64()?;
    let k: Vec<u64> = (0..6).map(|_| r.u64()).collect::<Result<_>>()?;
    let counters =
        Counters { k_up: k[0], k_down: k[1], v_up: k[2], v_down: k[3], up_blocked: k[4], backup_bytes_read: k[5] };
    let d = cfg.head_dim;
    let mut len = None;
    for (li, l) in layers.layers.iter_mut().enumerate() {
        let n_tok = r.u64()? as usize;
        if *len.get_or_insert(n_tok) != n_tok {
            return Err(bad(format!("layer {li} holds {n_tok} tokens, layer 0 {}", len.unwrap_or(0))));
        }
        (l.len, l.staged_from) = (n_tok, n_tok);
        // KIVI's count of value groups re-encoded: never in a snapshot that restores.
        r.u64()?;
        for (h, hd) in l.heads.iter_mut().enumerate() {
            let what = |s: &str| format!("layer {li}, KV head {h}: {s}");
            let (kscale, qn, win) = read_head(r, d, &what)?;
            let KStore::Packed(ks) = &mut hd.k else { return Err(bad("the kivi baseline is not transferable")) };
            read_stream(r, ks, &what("keys"))?;
            read_stream(r, &mut hd.v, &what("values"))?;
            if ks.len() != n_tok || hd.v.len() != n_tok || win.len() != n_tok {
                return Err(bad(what(&format!(
                    "{} keys, {} values, {} windows for {n_tok} tokens",
                    ks.len(),
                    hd.v.len(),
                    win.len()
                ))));
            }
            if let Some(q) = qaq.as_deref_mut() {
                q.set_head(li, h, kscale, qn, win);
            }
        }
    }
    let (n_tok, row) = (len.unwrap_or(0), cfg.row());
    for layer in 0..cfg.n_layers {
        for t in 0..n_tok {
            match r.u8()? {
                0 => {}
                1 => {
                    let (kr, vr) = (r.f16s(row)?, r.f16s(row)?);
                    if let Some(q) = qaq.as_deref_mut() {
                        q.host_mut().put(layer, t, &kr, &vr);
                    }
                }
                f => return Err(bad(format!("backup flag {f} of layer {layer}, token {t}"))),
            }
        }
    }
    if r.pos != bytes.len() {
        return Err(bad(format!("{} bytes left over after the cache", bytes.len() - r.pos)));
    }
    Ok(counters)
}
