//! Criterion benchmarks with side-by-side ratios, printed as `SUMMARY` lines:
//! quantize+pack (batch API on f16 input, and one f32 call per group) and dequantize vs memcpy of the
//! same f16 buffer (one thread), re-quantization of a T = 4k cache, and one
//! decode step of attention for all 90 KV heads of the default model (30 layers x 3 KV
//! heads, 9 query heads, head_dim 64) over a QAQ-packed cache (~3 bits) vs f32 and f16.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use half::f16;
use qaq_kernels::attention::{KStore, attend_dense_f16, attend_dense_f32, attend_packed};
use qaq_kernels::quant::{QuantSpec, decode_group, encode_group, encode_groups_f16};
use qaq_kernels::simd;
use qaq_kernels::store::PackedStream;
use std::hint::black_box;
use std::time::{Duration, Instant};

const D: usize = 64;
const HEADS: usize = 90;
const G: usize = 3;

struct Rng(u64);
impl Rng {
    fn f(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

/// Best of `reps` runs, seconds.
fn best(reps: usize, mut f: impl FnMut()) -> f64 {
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn f16_buffer(n: usize) -> Vec<u8> {
    let mut r = Rng(42);
    (0..n).flat_map(|_| f16::from_f32(r.f() * 3.0).to_le_bytes()).collect()
}

/// Quantizes the whole buffer with the batch API reading f16 directly
/// ([`encode_groups_f16`]).
fn quantize_all(
    src: &[f16],
    bits: u8,
    spec: &QuantSpec,
    codes: &mut Vec<u8>,
    oi: &mut Vec<u8>,
    ov: &mut Vec<f16>,
    metas: &mut Vec<qaq_kernels::quant::GroupMeta>,
) {
    codes.clear();
    oi.clear();
    ov.clear();
    metas.clear();
    let _ = encode_groups_f16(src, D, bits, spec, codes, oi, ov, metas);
}

/// The same with one [`encode_group`] call per group.
fn quantize_all_single(
    src: &[u8],
    bits: u8,
    spec: &QuantSpec,
    codes: &mut Vec<u8>,
    oi: &mut Vec<u8>,
    ov: &mut Vec<f16>,
    metas: &mut Vec<qaq_kernels::quant::GroupMeta>,
) {
    codes.clear();
    oi.clear();
    ov.clear();
    metas.clear();
    let mut tmp = [0f32; D];
    for g in src.chunks_exact(2 * D) {
        simd::f16_bytes_to_f32(g, &mut tmp);
        if let Ok(m) = encode_group(&tmp, bits, spec, codes, oi, ov) {
            metas.push(m);
        }
    }
}

fn dequantize_all(codes: &[u8], metas: &[qaq_kernels::quant::GroupMeta], oi: &[u8], ov: &[f16], out: &mut [f32]) {
    let (mut co, mut oo) = (0, 0);
    for (m, o) in metas.iter().zip(out.chunks_exact_mut(D)) {
        let no = m.n_out as usize;
        decode_group(m, qaq_kernels::Scheme::Midpoint, &codes[co..], &oi[oo..oo + no], &ov[oo..oo + no], o);
        co += m.code_bytes(D);
        oo += no;
    }
}

fn bench_quant(c: &mut Criterion) {
    let n = 16 << 20; // 16M values = 32 MiB of f16
    let src = f16_buffer(n);
    // The same values as f16 (the batch API's input type); identical bytes.
    let src_h: Vec<f16> = src.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]])).collect();
    let mut dst = vec![0u8; src.len()];
    let spec = QuantSpec::default();
    let (mut codes, mut oi, mut ov, mut metas) = (Vec::with_capacity(n), Vec::new(), Vec::new(), Vec::new());
    let mut out = vec![0f32; n];
    quantize_all(&src_h, 3, &spec, &mut codes, &mut oi, &mut ov, &mut metas);
    codes.extend_from_slice(&[0; 8]);

    let mut grp = c.benchmark_group("throughput");
    grp.throughput(Throughput::Bytes(src.len() as u64));
    grp.bench_function("memcpy_f16", |b| b.iter(|| dst.copy_from_slice(black_box(&src))));
    grp.bench_function("quantize_pack_3bit", |b| {
        b.iter(|| quantize_all(black_box(&src_h), 3, &spec, &mut codes, &mut oi, &mut ov, &mut metas))
    });
    grp.bench_function("quantize_pack_3bit_per_group", |b| {
        b.iter(|| quantize_all_single(black_box(&src), 3, &spec, &mut codes, &mut oi, &mut ov, &mut metas))
    });
    quantize_all(&src_h, 3, &spec, &mut codes, &mut oi, &mut ov, &mut metas);
    codes.extend_from_slice(&[0; 8]);
    grp.bench_function("dequantize_3bit", |b| b.iter(|| dequantize_all(black_box(&codes), &metas, &oi, &ov, &mut out)));
    grp.finish();

    let gb = src.len() as f64 / 1e9;
    let t_mem = best(5, || dst.copy_from_slice(black_box(&src)));
    let mut c2 = Vec::with_capacity(n);
    let t_q1 = best(3, || quantize_all_single(black_box(&src), 3, &spec, &mut c2, &mut oi, &mut ov, &mut metas));
    let t_q = best(3, || quantize_all(black_box(&src_h), 3, &spec, &mut c2, &mut oi, &mut ov, &mut metas));
    c2.extend_from_slice(&[0; 8]);
    let t_dq = best(3, || dequantize_all(black_box(&c2), &metas, &oi, &ov, &mut out));
    println!(
        "SUMMARY quantize+pack (3 bit, 1% outliers, head_dim 64, batch encode_groups_f16): {:.2} GB/s of f16 input vs memcpy {:.2} GB/s -> ratio {:.2}",
        gb / t_q,
        gb / t_mem,
        t_mem / t_q
    );
    println!(
        "SUMMARY quantize+pack, one encode_group call per group: {:.2} GB/s vs memcpy {:.2} GB/s -> ratio {:.2}",
        gb / t_q1,
        gb / t_mem,
        t_mem / t_q1
    );
    println!(
        "SUMMARY dequantize (3 bit -> f32): {:.2} GB/s of f16-equivalent vs memcpy {:.2} GB/s -> ratio {:.2}",
        gb / t_dq,
        gb / t_mem,
        t_mem / t_dq
    );
}

struct Caches {
    packed: Vec<(KStore, PackedStream)>,
    f32s: Vec<(Vec<f32>, Vec<f32>)>,
    f16s: Vec<(Vec<u8>, Vec<u8>)>,
    avg_bits: f64,
}

fn build(t: usize) -> Caches {
    let mut r = Rng(7 + t as u64);
    let spec = QuantSpec::default();
    let widths = [2u8, 3, 4, 3];
    let mut packed = Vec::new();
    let mut f32s = Vec::new();
    let mut f16s = Vec::new();
    let (mut wsum, mut groups) = (0usize, 0usize);
    let mut row = [0f32; D];
    for _ in 0..HEADS {
        let (mut ks, mut vs) = (PackedStream::new(D, spec, false), PackedStream::new(D, spec, false));
        let (mut kf, mut vf) = (Vec::with_capacity(t * D), Vec::with_capacity(t * D));
        let (mut kh, mut vh) = (Vec::with_capacity(2 * t * D), Vec::with_capacity(2 * t * D));
        for i in 0..t {
            for (stream, f, h) in [(&mut ks, &mut kf, &mut kh), (&mut vs, &mut vf, &mut vh)] {
                for x in row.iter_mut() {
                    *x = f16::from_f32(r.f() * 2.0).to_f32();
                }
                let w = widths[(i + groups) % 4];
                if stream.push(&row, w).is_ok() {
                    wsum += w as usize;
                    groups += 1;
                }
                f.extend_from_slice(&row);
                for x in row {
                    h.extend_from_slice(&f16::from_f32(x).to_le_bytes());
                }
            }
        }
        packed.push((KStore::Packed(ks), vs));
        f32s.push((kf, vf));
        f16s.push((kh, vh));
    }
    Caches { packed, f32s, f16s, avg_bits: wsum as f64 / groups as f64 }
}

/// One decode step of the default model at T = 4k with the QAQ policy: the attention
/// of all 30 layers vs the re-quantization pass (`end_step`), in steady state.
fn bench_requantize(_c: &mut Criterion) {
    if std::env::var_os("QAQ_BENCH_SKIP_ATTENTION").is_some() {
        return;
    }
    let cfg = qaq_kernels::CacheConfig { n_layers: 30, n_kv_heads: 3, n_q_heads: 9, head_dim: D };
    let mut cache = qaq_kernels::cache::new_cache(cfg, "qaq".parse().unwrap()).unwrap();
    let mut r = Rng(11);
    let row = cfg.n_kv_heads * D;
    let t0 = 4096;
    for layer in 0..cfg.n_layers {
        let k: Vec<f32> = (0..t0 * row).map(|_| r.f() * 2.0).collect();
        let v: Vec<f32> = (0..t0 * row).map(|_| r.f()).collect();
        cache.append(layer, &k, &v).unwrap();
    }
    let (mut t_att, mut t_req) = (f64::INFINITY, f64::INFINITY);
    for step in 0..12 {
        let mut ta = 0.0;
        for layer in 0..cfg.n_layers {
            let k: Vec<f32> = (0..row).map(|_| r.f() * 2.0).collect();
            let v: Vec<f32> = (0..row).map(|_| r.f()).collect();
            let q: Vec<f32> = (0..cfg.n_q_heads * D).map(|_| r.f() * 3.0).collect();
            cache.append(layer, &k, &v).unwrap();
            let t = Instant::now();
            black_box(cache.attend(layer, &q).unwrap());
            ta += t.elapsed().as_secs_f64();
        }
        let t = Instant::now();
        cache.end_step().unwrap();
        let tr = t.elapsed().as_secs_f64();
        if step >= 8 {
            t_att = t_att.min(ta);
            t_req = t_req.min(tr);
        }
    }
    let s = cache.stats();
    println!(
        "SUMMARY decode step T={} (QAQ default policy, 30 layers): attention {:.2} ms, requantize (end_step) {:.2} ms -> requantize/attention {:.2} (avg bits K {:.2} V {:.2})",
        cache.len(0),
        t_att * 1e3,
        t_req * 1e3,
        t_req / t_att,
        s.k.avg_bits(),
        s.v.avg_bits()
    );
}

fn bench_attention(c: &mut Criterion) {
    if std::env::var_os("QAQ_BENCH_SKIP_ATTENTION").is_some() {
        return;
    }
    let mut r = Rng(3);
    let qs: Vec<f32> = (0..HEADS * G * D).map(|_| r.f() * 0.3).collect();
    let mut out = vec![0f32; G * D];
    for t in [1024usize, 4096, 16384] {
        let caches = build(t);
        let mut probs = vec![0f32; G * t];
        let mut step_packed = || {
            for (h, (k, v)) in caches.packed.iter().enumerate() {
                attend_packed(k, v, &qs[h * G * D..(h + 1) * G * D], G, &mut out, &mut probs);
            }
            black_box(&out);
        };
        let mut probs2 = vec![0f32; G * t];
        let mut out2 = vec![0f32; G * D];
        let mut step_f32 = || {
            for (h, (k, v)) in caches.f32s.iter().enumerate() {
                attend_dense_f32(k, v, D, &qs[h * G * D..(h + 1) * G * D], G, &mut out2, &mut probs2);
            }
            black_box(&out2);
        };
        let mut probs3 = vec![0f32; G * t];
        let mut out3 = vec![0f32; G * D];
        let mut step_f16 = || {
            for (h, (k, v)) in caches.f16s.iter().enumerate() {
                attend_dense_f16(k, v, D, &qs[h * G * D..(h + 1) * G * D], G, &mut out3, &mut probs3);
            }
            black_box(&out3);
        };
        let mut grp = c.benchmark_group(format!("decode_step_90_heads_T{t}"));
        grp.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
        grp.bench_function("qaq_packed", |b| b.iter(&mut step_packed));
        grp.bench_function("f32", |b| b.iter(&mut step_f32));
        grp.bench_function("f16", |b| b.iter(&mut step_f16));
        grp.finish();
        let reps = if t >= 16384 { 5 } else { 10 };
        let (tp, t32, t16) = (best(reps, &mut step_packed), best(reps, &mut step_f32), best(reps, &mut step_f16));
        println!(
            "SUMMARY attention T={t} (90 KV heads, 9 q heads each layer, d 64, packed avg {:.2} bits + 1% outliers): \
packed {:.2} ms, f32 {:.2} ms, f16 {:.2} ms -> f32/packed {:.2}, f16/packed {:.2}",
            caches.avg_bits,
            tp * 1e3,
            t32 * 1e3,
            t16 * 1e3,
            t32 / tp,
            t16 / tp
        );
    }
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! { name = benches; config = config(); targets = bench_quant, bench_requantize, bench_attention }
criterion_main!(benches);
