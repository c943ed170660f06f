//! [`QaqCache::snapshot`] and [`QaqCache::restore`]: a sequence's whole cache as bytes,
//! to move it to another worker (request migration) instead of prefilling it again.
//!
//! The snapshot holds everything the cache's future depends on, so a restored cache
//! behaves exactly as the original would have (same attention, same widths, same
//! re-quantizations): every packed group as stored (metadata, codes, outliers), the
//! fp16 backups of the host tier (evicted ones stay evicted), the attention windows, the
//! ||Q||^2 histograms, the key channel scales, the counters and the step count. Its
//! size is what the transfer costs: the packed cache plus, for QAQ, the fp16 backups.
//!
//! Layout (little endian): magic `QAQKV`, format version, the shape, the policy (its
//! `Debug` text, compared on restore), the step and counters, then per layer its length
//! and per KV head the scales, histogram, windows and both streams, then the backups.
//! Every count is checked against the bytes left before anything is allocated, so a
//! truncated or corrupt snapshot is an error, never a panic or a huge allocation.

use super::{Counters, KStore, Layer, QaqCache};
use crate::CacheConfig;
use crate::error::{KernelError, Result};
use crate::policy::{KvPolicy, QNormTracker, Windows};
use crate::quant::{GroupMeta, RAW};
use crate::store::PackedStream;
use half::f16;

const MAGIC: &[u8; 5] = b"QAQKV";
const VERSION: u16 = 1;

fn bad(what: impl std::fmt::Display) -> KernelError {
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
        if m.bits > crate::quant::MAX_BITS && m.bits != RAW {
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

impl QaqCache {
    /// The cache as bytes (see the module docs). Only between steps (after
    /// [`QaqCache::end_step`], every layer at the same length), and not for the KIVI
    /// baseline, whose key store is not transferable.
    pub fn snapshot(&self) -> Result<Vec<u8>> {
        if matches!(self.policy, KvPolicy::Kivi(_)) {
            return Err(bad("the kivi baseline's caches are not transferable"));
        }
        let len = self.len(0);
        if let Some((i, l)) = self.layers.iter().enumerate().find(|(_, l)| l.len != len || !l.staged_k.is_empty()) {
            return Err(bad(format!(
                "taken mid-step: layer {i} holds {} tokens ({} staged), layer 0 holds {len}",
                l.len,
                l.staged_k.len() / self.cfg.row().max(1)
            )));
        }
        let mut w = Writer::default();
        w.bytes(MAGIC);
        w.u16(VERSION);
        let c = &self.cfg;
        for v in [c.n_layers, c.n_kv_heads, c.n_q_heads, c.head_dim] {
            w.u32(v as u32);
        }
        let policy = format!("{:?}", self.policy);
        w.len(policy.len());
        w.bytes(policy.as_bytes());
        w.u64(self.step);
        let k = &self.counters;
        for v in [k.k_up, k.k_down, k.v_up, k.v_down, k.up_blocked, k.backup_bytes_read] {
            w.u64(v);
        }
        for l in &self.layers {
            w.len(l.len);
            w.len(l.v_quantized);
            for hd in &l.heads {
                w.len(hd.kscale.len());
                w.f32s(&hd.kscale);
                let (bins, n) = hd.qn.parts();
                w.u64(n);
                let nonzero: Vec<(usize, u32)> = bins.iter().copied().enumerate().filter(|&(_, c)| c > 0).collect();
                w.len(nonzero.len());
                for (i, c) in nonzero {
                    w.u32(i as u32);
                    w.u32(c);
                }
                let (wn, vals, seen) = hd.win.parts();
                w.len(wn);
                w.len(seen.len());
                w.f32s(vals);
                seen.iter().for_each(|&s| w.u32(s));
                let KStore::Packed(ks) = &hd.k else { unreachable!("kivi refused above") };
                write_stream(&mut w, ks);
                write_stream(&mut w, &hd.v);
            }
        }
        for layer in 0..self.layers.len() {
            for t in 0..len {
                match self.host.get(layer, t) {
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

    /// Rebuilds a cache of shape `cfg` under `policy` from [`QaqCache::snapshot`]'s
    /// bytes. Shape and policy must be the snapshot's; any inconsistency is an error.
    pub fn restore(cfg: CacheConfig, policy: KvPolicy, bytes: &[u8]) -> Result<Self> {
        let mut c = QaqCache::new(cfg, policy)?;
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
        c.step = r.u64()?;
        let k: Vec<u64> = (0..6).map(|_| r.u64()).collect::<Result<_>>()?;
        c.counters =
            Counters { k_up: k[0], k_down: k[1], v_up: k[2], v_down: k[3], up_blocked: k[4], backup_bytes_read: k[5] };
        let d = cfg.head_dim;
        let mut len = None;
        for (li, l) in c.layers.iter_mut().enumerate() {
            let Layer { heads, len: l_len, staged_from, v_quantized, .. } = l;
            let n_tok = r.u64()? as usize;
            if *len.get_or_insert(n_tok) != n_tok {
                return Err(bad(format!("layer {li} holds {n_tok} tokens, layer 0 {}", len.unwrap_or(0))));
            }
            (*l_len, *staged_from, *v_quantized) = (n_tok, n_tok, r.u64()? as usize);
            for (h, hd) in heads.iter_mut().enumerate() {
                let what = |s: &str| format!("layer {li}, KV head {h}: {s}");
                let ns = r.len(4, "key scales")?;
                if ns != 0 && ns != d {
                    return Err(bad(what(&format!("{ns} key scales for head dimension {d}"))));
                }
                hd.kscale = r.f32s(ns)?;
                let q_n = r.u64()?;
                let mut bins = hd.qn.parts().0.to_vec();
                for _ in 0..r.len(8, "histogram")? {
                    let (i, count) = (r.u32()? as usize, r.u32()?);
                    *bins.get_mut(i).ok_or_else(|| bad(what(&format!("histogram bin {i} out of range"))))? = count;
                }
                hd.qn = QNormTracker::from_parts(bins, q_n).ok_or_else(|| bad(what("histogram size")))?;
                let wn = r.u64()? as usize;
                let nw = r.len(4, "windows")?;
                let vals = r.f32s(nw.checked_mul(wn).ok_or_else(|| bad(what("window size")))?)?;
                let seen = (0..nw).map(|_| r.u32()).collect::<Result<Vec<u32>>>()?;
                hd.win = Windows::from_parts(wn, vals, seen).ok_or_else(|| bad(what("window lengths")))?;
                let KStore::Packed(ks) = &mut hd.k else { return Err(bad("the kivi baseline is not transferable")) };
                read_stream(r, ks, &what("keys"))?;
                read_stream(r, &mut hd.v, &what("values"))?;
                if ks.len() != n_tok || hd.v.len() != n_tok || hd.win.len() != n_tok {
                    return Err(bad(what(&format!(
                        "{} keys, {} values, {} windows for {n_tok} tokens",
                        ks.len(),
                        hd.v.len(),
                        hd.win.len()
                    ))));
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
                        c.host.put(layer, t, &kr, &vr);
                    }
                    f => return Err(bad(format!("backup flag {f} of layer {layer}, token {t}"))),
                }
            }
        }
        if r.pos != bytes.len() {
            return Err(bad(format!("{} bytes left over after the cache", bytes.len() - r.pos)));
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::KvPolicy;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use std::str::FromStr;

    const CFG: CacheConfig = CacheConfig { n_layers: 2, n_kv_heads: 2, n_q_heads: 4, head_dim: 16 };

    fn rows(rng: &mut StdRng, n: usize, w: usize) -> Vec<f32> {
        (0..n * w).map(|_| rng.random_range(-2.0f32..2.0)).collect()
    }

    /// One step of every layer: append `n` tokens, attend with `n` queries, end the step.
    fn step(c: &mut QaqCache, rng: &mut StdRng, n: usize) -> Vec<f32> {
        let (kv, q) = (CFG.n_kv_heads * CFG.head_dim, CFG.n_q_heads * CFG.head_dim);
        let mut out = Vec::new();
        for layer in 0..CFG.n_layers {
            c.append(layer, &rows(rng, n, kv), &rows(rng, n, kv)).unwrap();
            out.extend(c.attend_rows(layer, &rows(rng, n, q), n).unwrap());
        }
        c.end_step().unwrap();
        out
    }

    fn cache(policy: &str, rng: &mut StdRng) -> QaqCache {
        let mut c = QaqCache::new(CFG, KvPolicy::from_str(policy).unwrap()).unwrap();
        step(&mut c, rng, 40);
        for _ in 0..12 {
            step(&mut c, rng, 1);
        }
        c
    }

    #[test]
    fn a_restored_cache_continues_exactly_as_the_original() {
        for policy in ["qaq-tuned", "qaq", "uniform:4", "fp16", "uniform-v:2"] {
            let mut rng = StdRng::seed_from_u64(11);
            let mut a = cache(policy, &mut rng);
            // Evict some backups: a restored cache must not resurrect them.
            for t in [3, 17] {
                a.host_mut().evict(1, t);
            }
            let bytes = a.snapshot().unwrap();
            let p = KvPolicy::from_str(policy).unwrap();
            let mut b = QaqCache::restore(CFG, p, &bytes).unwrap();
            assert_eq!(b.snapshot().unwrap(), bytes, "{policy}: snapshot of the restored cache");
            assert_eq!(format!("{:?}", a.stats()), format!("{:?}", b.stats()), "{policy}");
            let (mut ra, mut rb) = (StdRng::seed_from_u64(5), StdRng::seed_from_u64(5));
            for _ in 0..10 {
                assert_eq!(step(&mut a, &mut ra, 1), step(&mut b, &mut rb, 1), "{policy}: attention after restore");
            }
            for layer in 0..CFG.n_layers {
                for h in 0..CFG.n_kv_heads {
                    assert_eq!(a.widths(layer, h), b.widths(layer, h), "{policy}: widths after restore");
                }
                assert_eq!(a.dequantized(layer).unwrap(), b.dequantized(layer).unwrap());
            }
            assert_eq!(a.counters(), b.counters());
            assert!(b.host_mut().get(1, 3).is_none() || !policy.starts_with("qaq"));
        }
    }

    #[test]
    fn a_qaq_snapshot_carries_the_backups_and_the_packed_cache() {
        let mut rng = StdRng::seed_from_u64(2);
        let c = cache("qaq-tuned", &mut rng);
        let s = c.stats();
        let bytes = c.snapshot().unwrap().len();
        assert!(bytes > s.host_bytes + s.bytes_used(), "{bytes} bytes for {} + {}", s.host_bytes, s.bytes_used());
        assert!(bytes < 2 * (s.host_bytes + s.bytes_used()) + 64 * 1024, "{bytes}");
    }

    #[test]
    fn corrupt_or_foreign_snapshots_are_errors_not_panics() {
        let mut rng = StdRng::seed_from_u64(3);
        let c = cache("qaq-tuned", &mut rng);
        let bytes = c.snapshot().unwrap();
        let p = *c.policy();
        for cut in (0..bytes.len()).step_by(97).chain([bytes.len() - 1]) {
            let e = QaqCache::restore(CFG, p, &bytes[..cut]).unwrap_err().to_string();
            assert!(e.contains("kv snapshot"), "{e}");
        }
        let mut more = bytes.clone();
        more.push(0);
        assert!(QaqCache::restore(CFG, p, &more).unwrap_err().to_string().contains("left over"));
        let other = KvPolicy::from_str("uniform:4").unwrap();
        assert!(QaqCache::restore(CFG, other, &bytes).unwrap_err().to_string().contains("policy"));
        let shape = CacheConfig { n_layers: 3, ..CFG };
        assert!(QaqCache::restore(shape, p, &bytes).unwrap_err().to_string().contains("shape"));
        assert!(QaqCache::restore(CFG, p, b"GGUF....").unwrap_err().to_string().contains("magic"));
        // Flipped bytes anywhere: an error or a cache, never a panic.
        for i in (0..bytes.len()).step_by(31) {
            let mut b = bytes.clone();
            b[i] ^= 0xa5;
            let _ = QaqCache::restore(CFG, p, &b);
        }
    }

    #[test]
    fn mid_step_and_kivi_caches_are_refused_with_the_reason() {
        let mut rng = StdRng::seed_from_u64(4);
        let mut c = cache("qaq-tuned", &mut rng);
        let kv = CFG.n_kv_heads * CFG.head_dim;
        c.append(0, &rows(&mut rng, 1, kv), &rows(&mut rng, 1, kv)).unwrap();
        assert!(c.snapshot().unwrap_err().to_string().contains("mid-step"));
        let k = cache("kivi", &mut rng);
        assert!(k.snapshot().unwrap_err().to_string().contains("kivi"));
    }
}
