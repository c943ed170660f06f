//! Integration tests of the caches ([`PolicyCache`]) under every policy.

use half::f16;
use qaq_kernels::attention::attend_dense_f32;
use qaq_kernels::cache::new_cache;
use qaq_kernels::{CacheConfig, KernelError, KvPolicy, PolicyCache, QNorm, QaqCache, QaqParams};

const CFG: CacheConfig = CacheConfig { n_layers: 2, n_kv_heads: 2, n_q_heads: 6, head_dim: 16 };

struct Rng(u64);
impl Rng {
    fn f(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.f() * scale).collect()
    }
}

fn row(c: &CacheConfig) -> usize {
    c.n_kv_heads * c.head_dim
}

fn r16(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| f16::from_f32(v).to_f32()).collect()
}

/// Reference: attention of one query over a dense cache `[T][n_kv*d]`, GQA, scaled.
fn dense_attention(c: &CacheConfig, k: &[f32], v: &[f32], q: &[f32]) -> Vec<f32> {
    let (d, g, r) = (c.head_dim, c.group(), row(c));
    let t = k.len() / r;
    let mut out = vec![0f32; c.n_q_heads * d];
    for h in 0..c.n_kv_heads {
        let kh: Vec<f32> = (0..t).flat_map(|i| k[i * r + h * d..i * r + (h + 1) * d].to_vec()).collect();
        let vh: Vec<f32> = (0..t).flat_map(|i| v[i * r + h * d..i * r + (h + 1) * d].to_vec()).collect();
        let qs: Vec<f32> = q[h * g * d..(h + 1) * g * d].iter().map(|x| x / (d as f32).sqrt()).collect();
        let mut probs = vec![0f32; g * t];
        attend_dense_f32(&kh, &vh, d, &qs, g, &mut out[h * g * d..(h + 1) * g * d], &mut probs);
    }
    out
}

fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    let n = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f32>().sqrt() / n
}

/// A cache under any policy.
type Cache = Box<dyn PolicyCache>;

fn filled(policy: &str, t: usize, seed: u64) -> (Cache, Rng, Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let mut cache = new_cache(CFG, policy.parse().unwrap()).unwrap();
    let mut rng = Rng(seed);
    let (mut ks, mut vs) = (Vec::new(), Vec::new());
    for layer in 0..CFG.n_layers {
        let k = rng.vec(t * row(&CFG), 2.0);
        let v = rng.vec(t * row(&CFG), 1.0);
        cache.append(layer, &k, &v).unwrap();
        ks.push(k);
        vs.push(v);
    }
    (cache, rng, ks, vs)
}

#[test]
fn packed_attention_equals_dequantised_attention_for_every_policy() {
    for policy in [
        "fp16",
        "uniform:3",
        "uniform:0",
        "uniform:4:noout",
        "uniform-k:2",
        "uniform-v:1",
        "kivi:8:16",
        "qaq",
        "qaq-ref",
        "qaq:kscale=1,sinks=4,valpha=0",
        "qaq:kscale=0.5,kt=64",
    ] {
        let (mut cache, mut rng, _, _) = filled(policy, 300, 7);
        let q0 = rng.vec(CFG.n_q_heads * CFG.head_dim, 3.0);
        cache.attend_rows(0, &q0, 1).unwrap();
        cache.end_step().unwrap();
        for layer in 0..CFG.n_layers {
            let q = rng.vec(CFG.n_q_heads * CFG.head_dim, 3.0);
            let (kd, vd) = cache.dequantized(layer).unwrap();
            let want = dense_attention(&CFG, &kd, &vd, &q);
            let got = cache.attend(layer, &q).unwrap();
            let e = rel_err(&got.output, &want);
            assert!(e <= 1e-5, "{policy}: rel err {e}");
            let t = cache.len(layer);
            for j in 0..CFG.n_q_heads {
                let s: f32 = got.probs[j * t..(j + 1) * t].iter().sum();
                assert!((s - 1.0).abs() < 1e-4, "{policy}: probs sum {s}");
            }
        }
    }
}

#[test]
fn fp16_policy_is_exact_fp16_and_ratio_one() {
    let (mut cache, mut rng, ks, vs) = filled("fp16", 50, 3);
    let (kd, vd) = cache.dequantized(1).unwrap();
    assert_eq!(kd, r16(&ks[1]));
    assert_eq!(vd, r16(&vs[1]));
    let st = cache.stats();
    assert_eq!(st.bytes_used(), st.fp16_equivalent_bytes());
    assert_eq!(st.fp16_equivalent_bytes(), 2 * 2 * 50 * row(&CFG) * 2);
    assert_eq!(st.compression_ratio(), 1.0);
    let q = rng.vec(CFG.n_q_heads * CFG.head_dim, 1.0);
    let want = dense_attention(&CFG, &r16(&ks[1]), &r16(&vs[1]), &q);
    assert!(rel_err(&cache.attend(1, &q).unwrap().output, &want) < 1e-5);
}

#[test]
fn uniform_bytes_hand_computed() {
    // d = 16 at 4 bits, no outliers: 8 code bytes + 6 meta per group; blocks of 64
    // tokens carry 8 slack bytes. 70 tokens -> 2 blocks per stream.
    let (cache, _, _, _) = filled("uniform:4:noout", 70, 5);
    let streams = 2 * 2 * 2; // layers x heads x {K,V}
    let per_stream = 70 * (8 + 6) + 2 * 8;
    let st = cache.stats();
    assert_eq!(st.bytes_used(), streams * per_stream);
    assert_eq!(st.fp16_equivalent_bytes(), streams * 70 * 32);
    assert_eq!(st.k.avg_bits(), 4.0);
    // paper-style: 64 bits codes + 32 bits meta per group
    assert_eq!(st.paper_style_bytes(), (streams * 70 * 12) as f64);
    // with 1% outliers (1 low + 1 high at d = 16): + 3 bytes each
    let (cache, _, _, _) = filled("uniform:4", 70, 5);
    assert_eq!(cache.bytes_used(), streams * (per_stream + 70 * 6));
}

fn qaq_params() -> QaqParams {
    QaqParams { qnorm: QNorm::Constant(1.0), sigma_x: 0.02, sigma_s: 0.05, ..QaqParams::default() }
}

#[test]
fn prefill_sets_first_widths_and_keeps_last_window_at_bmax() {
    let p = qaq_params();
    let mut cache = QaqCache::new(CFG, p).unwrap();
    let mut rng = Rng(11);
    let t = 200;
    let qrow = CFG.n_q_heads * CFG.head_dim;
    for layer in 0..CFG.n_layers {
        cache.append(layer, &rng.vec(t * row(&CFG), 2.0), &rng.vec(t * row(&CFG), 1.0)).unwrap();
        let q = rng.vec(t * qrow, 2.0);
        let out = cache.attend_rows(layer, &q[(t - 8) * qrow..], 8).unwrap();
        assert_eq!(out.len(), 8 * qrow);
    }
    assert_eq!(cache.counters().v_down, 0);
    cache.end_step().unwrap();
    let (kw, vw) = cache.widths(0, 1).unwrap();
    assert_eq!(kw.len(), t);
    for i in t - (p.window - 1)..t {
        assert_eq!((kw[i], vw[i]), (p.b_max, p.b_max), "token {i} must stay at b_max");
    }
    assert!(vw[..t - 4].iter().any(|&b| b < p.b_max), "{vw:?}");
    assert!(kw[..t - 4].iter().all(|&b| b < p.b_max), "{kw:?}");
    let c = cache.counters();
    assert!(c.k_down > 0 && c.v_down > 0);
    assert_eq!(c.backup_bytes_read, 0, "down from codes by default");
    let st = cache.stats();
    assert!(st.compression_ratio() > 1.5, "{}", st.compression_ratio());
    assert!(st.paper_style_ratio() > st.compression_ratio());
    assert!(st.host_bytes == 2 * 2 * t * row(&CFG) * 2);
}

#[test]
fn requantize_up_restores_bound_from_backup_and_eviction_blocks() {
    let p = QaqParams { window: 2, ..qaq_params() };
    let mut cache = QaqCache::new(CFG, p).unwrap();
    let mut rng = Rng(21);
    let t = 64;
    let k = rng.vec(t * row(&CFG), 1.0);
    let v = rng.vec(t * row(&CFG), 1.0);
    for layer in 0..2 {
        cache.append(layer, &k, &v).unwrap();
    }
    let qrow = CFG.n_q_heads * CFG.head_dim;
    // uniform attention (q = 0) for two steps -> low value widths
    for _ in 0..2 {
        for layer in 0..2 {
            cache.attend(layer, &vec![0.0; qrow]).unwrap();
        }
        cache.end_step().unwrap();
    }
    let (_, v_before) = cache.widths(0, 0).unwrap();
    let target = 5usize;
    assert!(v_before[target] < p.b_max);
    // evict token 9's backup in layer 0
    assert!(cache.host_mut().evict(0, 9));
    // queries aligned with the key of token `tok` (KV head 0)
    let aligned = |tok: usize| {
        let mut q = vec![0f32; qrow];
        for j in 0..3 {
            for i in 0..16 {
                q[j * 16 + i] = 40.0 * k[tok * row(&CFG) + i];
            }
        }
        q
    };
    for _ in 0..2 {
        let a = cache.attend(0, &aligned(target)).unwrap();
        assert!(a.probs[target] > 0.2, "{}", a.probs[target]);
        cache.end_step().unwrap();
    }
    let (_, v_after) = cache.widths(0, 0).unwrap();
    assert!(v_after[target] > v_before[target], "{} -> {}", v_before[target], v_after[target]);
    let c = cache.counters();
    assert!(c.v_up >= 1 && c.backup_bytes_read > 0);
    // the upgraded group meets the new width's bound against the fp16 backup
    let (_, vd) = cache.dequantized(0).unwrap();
    let orig = r16(&v[target * row(&CFG)..target * row(&CFG) + 16]);
    let got = &vd[target * row(&CFG)..target * row(&CFG) + 16];
    let inl: Vec<f32> = {
        let mut s = orig.clone();
        s.sort_by(f32::total_cmp);
        s[1..15].to_vec()
    };
    let bound = (inl[13] - inl[0]) / (1u32 << v_after[target]) as f32 / 2.0 * 1.01 + 1e-3;
    for i in 0..16 {
        assert!((got[i] - orig[i]).abs() <= bound, "i {i}: {} vs {} (bound {bound})", got[i], orig[i]);
    }
    assert_eq!(cache.counters().up_blocked, 0);
    for _ in 0..2 {
        let a = cache.attend(0, &aligned(9)).unwrap();
        assert!(a.probs[9] > 0.2, "{}", a.probs[9]);
        cache.end_step().unwrap();
    }
    assert!(cache.counters().up_blocked >= 1, "token 9 cannot go up");
}

#[test]
fn cadence_every_k_steps_and_down_from_backup() {
    let p = QaqParams { every: 3, window: 1, down: qaq_kernels::DownSource::Backup, ..qaq_params() };
    let mut cache = QaqCache::new(CFG, p).unwrap();
    let mut rng = Rng(5);
    let qrow = CFG.n_q_heads * CFG.head_dim;
    for layer in 0..2 {
        cache.append(layer, &rng.vec(40 * row(&CFG), 1.0), &rng.vec(40 * row(&CFG), 1.0)).unwrap();
    }
    for step in 1..=3 {
        for layer in 0..2 {
            cache.attend(layer, &rng.vec(qrow, 1.0)).unwrap();
        }
        cache.end_step().unwrap();
        let c = cache.counters();
        if step < 3 {
            assert_eq!(c.k_down + c.v_down, 0, "step {step}");
        } else {
            assert!(c.k_down + c.v_down > 0);
            assert!(c.backup_bytes_read >= 32 * (c.k_down + c.v_down), "down from backup reads it");
        }
    }
}

#[test]
fn single_token_and_constant_rows() {
    let mut cache = new_cache(CFG, "qaq".parse().unwrap()).unwrap();
    let k = vec![0.25f32; row(&CFG)];
    let v: Vec<f32> = vec![1.5f32; row(&CFG)];
    cache.append(0, &k, &v).unwrap();
    let a = cache.attend(0, &vec![1.0; CFG.n_q_heads * CFG.head_dim]).unwrap();
    assert_eq!(a.probs, vec![1.0; CFG.n_q_heads]);
    assert!(a.output.iter().all(|&x| x == 1.5), "{:?}", &a.output[..4]);
    cache.end_step().unwrap();
    let a = cache.attend(0, &vec![1.0; CFG.n_q_heads * CFG.head_dim]).unwrap();
    assert!(a.output.iter().all(|&x| x == 1.5));
    assert!(cache.attend(1, &vec![1.0; CFG.n_q_heads * CFG.head_dim]).is_err(), "empty layer");
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let mut cache = new_cache(CFG, "qaq".parse().unwrap()).unwrap();
    let mut k = vec![0.5f32; row(&CFG)];
    let v = vec![0.5f32; row(&CFG)];
    k[3] = f32::NAN;
    assert!(matches!(cache.append(0, &k, &v), Err(KernelError::NonFinite { .. })));
    k[3] = f32::INFINITY;
    assert!(cache.append(0, &k, &v).is_err());
    k[3] = 1e9;
    assert!(cache.append(0, &k, &v).is_err());
    assert_eq!(cache.len(0), 0, "nothing stored");
    assert!(cache.append(0, &v[..5], &v[..5]).is_err());
    assert!(cache.append(9, &v, &v).is_err());
    cache.append(0, &v, &v).unwrap();
    let mut q = vec![0.0f32; CFG.n_q_heads * CFG.head_dim];
    q[0] = f32::NAN;
    assert!(cache.attend(0, &q).is_err());
    assert!(cache.attend(0, &q[..3]).is_err());
    assert!(cache.attend_rows(0, &vec![0.0; 2 * q.len()], 2).is_err(), "more queries than tokens");
    assert!(new_cache(CacheConfig { head_dim: 12, ..CFG }, KvPolicy::Fp16).is_err());
    assert!(new_cache(CacheConfig { n_q_heads: 5, ..CFG }, KvPolicy::Fp16).is_err());
}

#[test]
fn prefill_rows_are_exact_causal_attention_and_single_row_matches_attend() {
    let mut cache = new_cache(CFG, "uniform:2".parse().unwrap()).unwrap();
    let mut rng = Rng(99);
    let t = 30;
    let (k, v) = (rng.vec(t * row(&CFG), 1.0), rng.vec(t * row(&CFG), 1.0));
    cache.append(0, &k, &v).unwrap();
    let qrow = CFG.n_q_heads * CFG.head_dim;
    let q = rng.vec(4 * qrow, 2.0);
    let out = cache.attend_rows(0, &q, 4).unwrap();
    let (k16, v16) = (r16(&k), r16(&v));
    for r in 0..4 {
        let p = t - 4 + r + 1;
        let want = dense_attention(&CFG, &k16[..p * row(&CFG)], &v16[..p * row(&CFG)], &q[r * qrow..(r + 1) * qrow]);
        assert!(rel_err(&out[r * qrow..(r + 1) * qrow], &want) < 1e-5, "row {r}");
    }
    cache.end_step().unwrap();
    let one = cache.attend_rows(0, &q[..qrow], 1).unwrap();
    let a = cache.attend(0, &q[..qrow]).unwrap();
    assert_eq!(one, a.output);
    // after end_step the rows come from the 2-bit cache: no longer exact
    let later = cache.attend_rows(0, &q, 4).unwrap();
    assert!(rel_err(&later, &out) > 1e-4);
}

#[test]
fn kivi_keeps_residual_in_fp16() {
    let (cache, _, ks, _) = filled("kivi:8:16", 40, 2);
    let (kw, vw) = cache.widths(0, 0).unwrap();
    assert_eq!(kw.iter().filter(|&&b| b == 2).count(), 24, "3 groups of 8 quantized");
    assert_eq!(vw.iter().filter(|&&b| b == 16).count(), 16, "residual R = 16");
    let (kd, _) = cache.dequantized(0).unwrap();
    assert_eq!(&kd[39 * 32..40 * 32], &r16(&ks[0][39 * 32..40 * 32])[..]);
    assert!(cache.stats().compression_ratio() > 1.2);
}

/// A multi-token append (prefill, batch encoder) leaves the same cache as appending the
/// tokens one at a time, across block boundaries and after a partly filled block.
#[test]
fn batch_append_matches_token_by_token() {
    for policy in [
        "fp16",
        "uniform:0",
        "uniform:2",
        "uniform:3",
        "uniform:4:noout",
        "uniform-k:2",
        "uniform-v:1",
        "kivi:8:16",
        "qaq",
        "qaq-ref",
    ] {
        for cfg in [CFG, CacheConfig { head_dim: 64, ..CFG }, CacheConfig { head_dim: 24, ..CFG }] {
            let r = row(&cfg);
            let (mut a, mut b) =
                (new_cache(cfg, policy.parse().unwrap()).unwrap(), new_cache(cfg, policy.parse().unwrap()).unwrap());
            let mut rng = Rng(77);
            for n in [1usize, 130, 3, 1, 70] {
                for layer in 0..cfg.n_layers {
                    let k = rng.vec(n * r, 2.0);
                    let v = rng.vec(n * r, 1.0);
                    a.append(layer, &k, &v).unwrap();
                    for t in 0..n {
                        b.append(layer, &k[t * r..(t + 1) * r], &v[t * r..(t + 1) * r]).unwrap();
                    }
                }
            }
            let q = rng.vec(cfg.n_q_heads * cfg.head_dim, 1.0);
            for layer in 0..cfg.n_layers {
                assert_eq!(a.len(layer), b.len(layer));
                let bits = |x: (Vec<f32>, Vec<f32>)| {
                    (
                        x.0.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        x.1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    )
                };
                assert_eq!(
                    bits(a.dequantized(layer).unwrap()),
                    bits(b.dequantized(layer).unwrap()),
                    "{policy} d {}",
                    cfg.head_dim
                );
                for h in 0..cfg.n_kv_heads {
                    assert_eq!(a.widths(layer, h), b.widths(layer, h), "{policy}");
                }
                let (oa, ob) = (a.attend(layer, &q).unwrap(), b.attend(layer, &q).unwrap());
                assert_eq!(
                    oa.output.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    ob.output.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{policy}"
                );
            }
            assert_eq!(format!("{:?}", a.stats()), format!("{:?}", b.stats()), "{policy} d {}", cfg.head_dim);
            a.end_step().unwrap();
            b.end_step().unwrap();
            assert_eq!(format!("{:?}", a.stats()), format!("{:?}", b.stats()), "{policy} after end_step");
            for layer in 0..cfg.n_layers {
                let bits = |x: (Vec<f32>, Vec<f32>)| {
                    (
                        x.0.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        x.1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    )
                };
                assert_eq!(
                    bits(a.dequantized(layer).unwrap()),
                    bits(b.dequantized(layer).unwrap()),
                    "{policy} after end_step"
                );
            }
        }
    }
}

/// A cache that only observes a prefill (`observe_rows`) ends in the same state as one
/// that attended it (`attend_rows`): same widths after re-quantization, same bytes, and
/// the same attention output on the next decode step.
#[test]
fn observing_a_prefill_equals_attending_it() {
    for policy in ["qaq", "qaq:window=1", "qaq:window=3,sigma_x=0.05", "qaq:prefill=all", "uniform:3", "fp16"] {
        let mut rng = Rng(11);
        let t = 37;
        let qrow = CFG.n_q_heads * CFG.head_dim;
        let (mut a, mut b) =
            (new_cache(CFG, policy.parse().unwrap()).unwrap(), new_cache(CFG, policy.parse().unwrap()).unwrap());
        for layer in 0..CFG.n_layers {
            let (k, v, q) = (rng.vec(t * row(&CFG), 2.0), rng.vec(t * row(&CFG), 1.0), rng.vec(t * qrow, 3.0));
            a.append(layer, &k, &v).unwrap();
            b.append(layer, &k, &v).unwrap();
            let out = a.attend_rows(layer, &q, t).unwrap();
            assert!(out.iter().any(|x| *x != 0.0), "{policy}");
            b.observe_rows(layer, &q, t).unwrap();
        }
        a.end_step().unwrap();
        b.end_step().unwrap();
        for layer in 0..CFG.n_layers {
            for h in 0..CFG.n_kv_heads {
                assert_eq!(a.widths(layer, h), b.widths(layer, h), "{policy} layer {layer} head {h}");
            }
        }
        assert_eq!(a.bytes_used(), b.bytes_used(), "{policy}");
        let (k, v, q) = (rng.vec(row(&CFG), 2.0), rng.vec(row(&CFG), 1.0), rng.vec(qrow, 3.0));
        a.append(0, &k, &v).unwrap();
        b.append(0, &k, &v).unwrap();
        assert_eq!(a.attend(0, &q).unwrap().output, b.attend(0, &q).unwrap().output, "{policy}");
    }
}

/// Widths of layer 0 after a prefill whose last rows, and then `steps` decode queries,
/// all point at token `hot`'s key (keys with a massive channel 3 in every head).
fn attended(policy: &str, hot: usize, steps: usize) -> (Cache, Vec<f32>) {
    let mut cache = new_cache(CFG, policy.parse().unwrap()).unwrap();
    let mut rng = Rng(31);
    let (t, d, r) = (200, CFG.head_dim, row(&CFG));
    let mut k = rng.vec(t * r, 1.0);
    for (i, x) in k.iter_mut().enumerate() {
        if i % d == 3 {
            *x *= 40.0;
        }
    }
    let v = rng.vec(t * r, 1.0);
    let g = CFG.group();
    let q: Vec<f32> =
        (0..CFG.n_q_heads).flat_map(|j| k[hot * r + (j / g) * d..hot * r + (j / g + 1) * d].to_vec()).collect();
    cache.append(0, &k, &v).unwrap();
    let rows: Vec<f32> = (0..8).flat_map(|_| q.clone()).collect();
    cache.attend_rows(0, &rows, 8).unwrap();
    cache.end_step().unwrap();
    for _ in 0..steps {
        cache.attend(0, &q).unwrap();
        cache.end_step().unwrap();
    }
    (cache, k)
}

#[test]
fn key_channel_scaling_and_sinks() {
    let base = "qaq:qnorm=1,sigma_s=0.05,sigma_x=0.02";
    // Channel scaling: dequantized keys come back in the model's units, q . k unchanged.
    let (scaled, k) = attended(&format!("{base},kscale=1"), 10, 5);
    let (plain, _) = attended(base, 10, 5);
    let (ks, _) = scaled.dequantized(0).unwrap();
    let (kp, _) = plain.dequantized(0).unwrap();
    assert!(rel_err(&ks, &k) < 0.5, "scaled keys in model units: {}", rel_err(&ks, &k));
    // Same policy otherwise: per-token steps no longer set by the massive channel, so the
    // small channels keep more precision.
    let small =
        |x: &[f32]| x.iter().enumerate().filter(|(i, _)| i % CFG.head_dim != 3).map(|(_, v)| *v).collect::<Vec<_>>();
    assert!(
        rel_err(&small(&ks), &small(&k)) < rel_err(&small(&kp), &small(&k)),
        "scaled {} vs plain {}",
        rel_err(&small(&ks), &small(&k)),
        rel_err(&small(&kp), &small(&k))
    );
    // Sinks stay at b_max; the others are free to move down.
    let (sunk, _) = attended(&format!("{base},sinks=3"), 10, 5);
    let (kw, vw) = sunk.widths(0, 0).unwrap();
    assert!(kw[..3].iter().chain(&vw[..3]).all(|&b| b == 8), "{:?} {:?}", &kw[..3], &vw[..3]);
    assert!(kw[3..150].iter().any(|&b| b < 8));
}
