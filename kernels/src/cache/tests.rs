//! Unit tests of the caches through [`PolicyCache`]: snapshots and restore, backup
//! eviction. (The behaviour of every policy is tested in `tests/cache.rs`.)

use super::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::str::FromStr;

const CFG: CacheConfig = CacheConfig { n_layers: 2, n_kv_heads: 2, n_q_heads: 4, head_dim: 16 };

fn rows(rng: &mut StdRng, n: usize, w: usize) -> Vec<f32> {
    (0..n * w).map(|_| rng.random_range(-2.0f32..2.0)).collect()
}

/// One step of every layer: append `n` tokens, attend with `n` queries, end the step.
fn step(c: &mut dyn PolicyCache, rng: &mut StdRng, n: usize) -> Vec<f32> {
    let (kv, q) = (CFG.n_kv_heads * CFG.head_dim, CFG.n_q_heads * CFG.head_dim);
    let mut out = Vec::new();
    for layer in 0..CFG.n_layers {
        c.append(layer, &rows(rng, n, kv), &rows(rng, n, kv)).unwrap();
        out.extend(c.attend_rows(layer, &rows(rng, n, q), n).unwrap());
    }
    c.end_step().unwrap();
    out
}

/// A 40-token prefill and 12 decode steps.
fn fill(c: &mut dyn PolicyCache, rng: &mut StdRng) {
    step(c, rng, 40);
    for _ in 0..12 {
        step(c, rng, 1);
    }
}

fn cache(policy: &str, rng: &mut StdRng) -> Box<dyn PolicyCache> {
    let mut c = new_cache(CFG, KvPolicy::from_str(policy).unwrap()).unwrap();
    fill(&mut *c, rng);
    c
}

/// `b` (restored from `a`'s snapshot `bytes`) and `a` go on identically.
fn continues_exactly(policy: &str, a: &mut dyn PolicyCache, b: &mut dyn PolicyCache, bytes: &[u8]) {
    assert_eq!(b.snapshot().unwrap(), bytes, "{policy}: snapshot of the restored cache");
    assert_eq!(format!("{:?}", a.stats()), format!("{:?}", b.stats()), "{policy}");
    let (mut ra, mut rb) = (StdRng::seed_from_u64(5), StdRng::seed_from_u64(5));
    for _ in 0..10 {
        assert_eq!(step(a, &mut ra, 1), step(b, &mut rb, 1), "{policy}: attention after restore");
    }
    for layer in 0..CFG.n_layers {
        for h in 0..CFG.n_kv_heads {
            assert_eq!(a.widths(layer, h), b.widths(layer, h), "{policy}: widths after restore");
        }
        assert_eq!(a.dequantized(layer).unwrap(), b.dequantized(layer).unwrap());
    }
    assert_eq!(a.counters(), b.counters());
}

#[test]
fn a_restored_cache_continues_exactly_as_the_original() {
    for policy in [
        "qaq-tuned",
        "qaq",
        "uniform:4",
        "fp16",
        "uniform-v:2",
        "uniform:3+rot",
        "qaq-tuned+rot",
        "uniform:4/3:noout:recent=8:sinks=2+rot",
    ] {
        let mut rng = StdRng::seed_from_u64(11);
        match KvPolicy::from_str(policy).unwrap() {
            KvPolicy::Qaq(p) => {
                let mut a = QaqCache::new(CFG, p).unwrap();
                fill(&mut a, &mut rng);
                // Evict some backups: a restored cache must not resurrect them.
                for t in [3, 17] {
                    a.host_mut().evict(1, t);
                }
                let bytes = a.snapshot().unwrap();
                let mut b = QaqCache::restore(CFG, p, &bytes).unwrap();
                continues_exactly(policy, &mut a, &mut b, &bytes);
                assert!(b.host_mut().get(1, 3).is_none());
                // The same through the policy-generic constructor.
                assert_eq!(restore(CFG, KvPolicy::Qaq(p), &bytes).unwrap().snapshot().unwrap(), bytes);
            }
            p => {
                let mut a = cache(policy, &mut rng);
                let bytes = a.snapshot().unwrap();
                let mut b = restore(CFG, p, &bytes).unwrap();
                continues_exactly(policy, &mut *a, &mut *b, &bytes);
            }
        }
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
        let e = restore(CFG, p, &bytes[..cut]).unwrap_err().to_string();
        assert!(e.contains("kv snapshot"), "{e}");
    }
    let mut more = bytes.clone();
    more.push(0);
    assert!(restore(CFG, p, &more).unwrap_err().to_string().contains("left over"));
    let other = KvPolicy::from_str("uniform:4").unwrap();
    assert!(restore(CFG, other, &bytes).unwrap_err().to_string().contains("policy"));
    let shape = CacheConfig { n_layers: 3, ..CFG };
    assert!(restore(shape, p, &bytes).unwrap_err().to_string().contains("shape"));
    assert!(restore(CFG, p, b"GGUF....").unwrap_err().to_string().contains("magic"));
    // Flipped bytes anywhere: an error or a cache, never a panic.
    for i in (0..bytes.len()).step_by(31) {
        let mut b = bytes.clone();
        b[i] ^= 0xa5;
        let _ = restore(CFG, p, &b);
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

/// A baseline has no QAQ state and writes neutral fields in its place; a snapshot that
/// holds anything there (as builds did whose baselines fed windows and a histogram they
/// never used) restores to the same cache, which goes on identically.
#[test]
fn a_baseline_restores_whatever_its_snapshot_holds_in_the_qaq_fields() {
    struct Fields(crate::policy::QNormTracker, crate::policy::Windows, crate::host::InMemoryHost);
    impl snapshot::QaqState for Fields {
        fn head(&self, _: usize, _: usize) -> (&[f32], &crate::policy::QNormTracker, &crate::policy::Windows) {
            (&[], &self.0, &self.1)
        }
        fn set_head(
            &mut self,
            _: usize,
            _: usize,
            _: Vec<f32>,
            _: crate::policy::QNormTracker,
            _: crate::policy::Windows,
        ) {
            unreachable!()
        }
        fn host(&self) -> &dyn crate::host::HostTier {
            &self.2
        }
        fn host_mut(&mut self) -> &mut dyn crate::host::HostTier {
            &mut self.2
        }
    }
    for policy in ["uniform:4", "fp16"] {
        let mut rng = StdRng::seed_from_u64(6);
        let mut a = cache(policy, &mut rng);
        let neutral = a.snapshot().unwrap();
        let mut f = Fields(Default::default(), crate::policy::Windows::new(1), Default::default());
        f.0.observe(1.5);
        f.1.grow(a.len(0));
        for t in 0..a.len(0) {
            f.1.push(t, 0.25);
        }
        let old = snapshot::write(a.layers(), a.policy(), &a.counters(), Some(&f)).unwrap();
        assert_ne!(old, neutral);
        let mut b = restore(CFG, *a.policy(), &old).unwrap();
        continues_exactly(policy, &mut *a, &mut *b, &neutral);
    }
}

#[test]
fn evicting_backups_frees_host_bytes_least_important_first() {
    const SHAPE: CacheConfig = CacheConfig { n_layers: 2, n_kv_heads: 2, n_q_heads: 4, head_dim: 64 };
    let KvPolicy::Qaq(p) = KvPolicy::from_str("qaq").unwrap() else { unreachable!() };
    let mut c = QaqCache::new(SHAPE, p).unwrap();
    let row = SHAPE.n_kv_heads * SHAPE.head_dim;
    let rows: Vec<f32> = (0..8 * row).map(|i| (i as f32 * 0.37).sin()).collect();
    for layer in 0..2 {
        c.append(layer, &rows, &rows).unwrap();
    }
    // fp16 K and V rows of every layer.
    let backup_bytes_per_token = 2 * 2 * SHAPE.n_layers * row;
    let before = c.host_bytes();
    assert_eq!(before, 8 * backup_bytes_per_token);
    let (freed, n) = c.evict_backups(100);
    assert!(freed >= 100 && n >= 1, "{freed} {n}");
    assert_eq!(c.host_bytes(), before - freed);
    // Every token is at b_max: the oldest token goes first, layer 0 before layer 1.
    assert!(c.host_mut().get(0, 0).is_none() && c.host_mut().get(1, 0).is_some());
    let (freed_all, _) = c.evict_backups(usize::MAX);
    assert_eq!(c.host_bytes(), 0);
    assert_eq!(freed + freed_all, before);
    // fp16 keeps no backups.
    let mut f = new_cache(SHAPE, KvPolicy::Fp16).unwrap();
    f.append(0, &rows, &rows).unwrap();
    assert_eq!((f.host_bytes(), f.evict_backups(100)), (0, (0, 0)));
}

/// Feeds the same steps to every cache in `caches` (a 40-token prefill, then `decode`
/// one-token steps; keys with a massive channel 3 in every head, as real models have)
/// and returns each cache's attention outputs, all layers, all steps.
fn same_steps(caches: &mut [Box<dyn PolicyCache>], decode: usize) -> Vec<Vec<f32>> {
    let mut rng = StdRng::seed_from_u64(3);
    let cfg = *caches[0].config();
    let (kv, q) = (cfg.n_kv_heads * cfg.head_dim, cfg.n_q_heads * cfg.head_dim);
    let mut outs = vec![Vec::new(); caches.len()];
    for n in std::iter::once(40).chain(std::iter::repeat_n(1, decode)) {
        for layer in 0..cfg.n_layers {
            let mut k = rows(&mut rng, n, kv);
            for (i, x) in k.iter_mut().enumerate() {
                if i % cfg.head_dim == 3 {
                    *x *= 30.0;
                }
            }
            let (v, qr) = (rows(&mut rng, n, kv), rows(&mut rng, n, q));
            for (c, out) in caches.iter_mut().zip(&mut outs) {
                c.append(layer, &k, &v).unwrap();
                out.extend(c.attend_rows(layer, &qr, n).unwrap());
            }
        }
        for c in caches.iter_mut() {
            c.end_step().unwrap();
        }
    }
    outs
}

fn rms_diff(a: &[f32], b: &[f32]) -> f32 {
    (a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f32>() / a.len() as f32).sqrt()
}

#[test]
fn a_rotated_cache_attends_as_the_exact_one_up_to_quantization() {
    let make = |p: &str| new_cache(CFG, KvPolicy::from_str(p).unwrap()).unwrap();
    // At 8 bits the rotation is all that differs from fp16: the same attention, prefill
    // rows and decode rows alike (rotated queries, values rotated back), for every
    // policy that rotates.
    for policy in ["uniform:8", "qaq:bmin=8,bmax=8", "kivi:4:8:8"] {
        let rot = format!("{policy}+rot");
        let mut caches = vec![make("fp16"), make(policy), make(&rot)];
        let outs = same_steps(&mut caches, 8);
        let (plain, rotated) = (rms_diff(&outs[1], &outs[0]), rms_diff(&outs[2], &outs[0]));
        assert!(rotated < 0.02 && plain < 0.02, "{policy}: {plain} unrotated, {rotated} rotated");
        assert!(caches[2].policy().rotated() && !caches[1].policy().rotated());
    }
}

#[test]
fn rotation_spreads_a_massive_key_channel_that_a_per_token_group_would_inherit() {
    // The default model's head size: the channel's energy is spread over 64 values.
    let cfg = CacheConfig { head_dim: 64, ..CFG };
    let make = |p: &str| new_cache(cfg, KvPolicy::from_str(p).unwrap()).unwrap();
    // Without exact outliers a group's range is the massive channel's; rotated, the
    // channel's energy is spread over the head and the error drops.
    let mut caches = vec![make("fp16"), make("uniform:3:noout"), make("uniform:3:noout+rot")];
    let outs = same_steps(&mut caches, 12);
    let (plain, rotated) = (rms_diff(&outs[1], &outs[0]), rms_diff(&outs[2], &outs[0]));
    assert!(rotated < 0.7 * plain, "rms error {plain} unrotated, {rotated} rotated");
}

/// A uniform cache with fp16 windows holds its first `sinks` and last `recent` tokens raw
/// and every other token exactly as the plain uniform cache does (same widths, same
/// decoded values), through a prefill, decode steps and a second multi-row chunk; and
/// the windows cost bytes.
#[test]
fn fp16_windows_hold_the_plain_uniform_codes_outside_them() {
    let (recent, sinks) = (8, 3);
    let mut rng = StdRng::seed_from_u64(11);
    let plain = "uniform:4/3:noout+rot";
    let windowed = format!("uniform:4/3:noout:recent={recent}:sinks={sinks}+rot");
    let mut a = new_cache(CFG, KvPolicy::from_str(plain).unwrap()).unwrap();
    let mut b = new_cache(CFG, KvPolicy::from_str(&windowed).unwrap()).unwrap();
    let (kv, qw) = (CFG.n_kv_heads * CFG.head_dim, CFG.n_q_heads * CFG.head_dim);
    // Chunks: shorter than the sinks, across the sinks, a long one, decode rows, a chunk
    // shorter than the window.
    for n in [2usize, 5, 30, 1, 1, 1, 4, 1, 1, 12, 1] {
        let (k, v, q) = (rows(&mut rng, n, kv), rows(&mut rng, n, kv), rows(&mut rng, n, qw));
        for layer in 0..CFG.n_layers {
            for c in [&mut a, &mut b] {
                c.append(layer, &k, &v).unwrap();
                c.attend_rows(layer, &q, n).unwrap();
            }
        }
        a.end_step().unwrap();
        b.end_step().unwrap();
        let len = a.len(0);
        for layer in 0..CFG.n_layers {
            let (da, db) = (a.dequantized(layer).unwrap(), b.dequantized(layer).unwrap());
            for h in 0..CFG.n_kv_heads {
                let ((ka, va), (kb, vb)) = (a.widths(layer, h).unwrap(), b.widths(layer, h).unwrap());
                for t in 0..len {
                    let raw = t < sinks || t + recent >= len;
                    let want = if raw { (16, 16) } else { (ka[t], va[t]) };
                    assert_eq!((kb[t], vb[t]), want, "len {len} layer {layer} head {h} token {t}");
                    if !raw {
                        let r = t * kv + h * CFG.head_dim..t * kv + (h + 1) * CFG.head_dim;
                        assert_eq!(da.0[r.clone()], db.0[r.clone()], "keys, len {len} token {t}");
                        assert_eq!(da.1[r.clone()], db.1[r], "values, len {len} token {t}");
                    }
                }
            }
        }
    }
    assert!(a.len(0) > sinks + recent + 10);
    assert!(b.bytes_used() > a.bytes_used(), "{} vs {}", b.bytes_used(), a.bytes_used());
}
