//! Device tests of the CUDA kernels (feature `cuda`), each against the CPU reference on
//! random data. They need a GPU and fail (never skip) without one: run them with
//! `scripts/gpu-check.sh`, not from `make test`.

use half::f16;
use qaq_kernels::KernelError;
use qaq_kernels::attention::{self, KStore};
use qaq_kernels::cuda::{DeviceStream, Gpu, StreamImage};
use qaq_kernels::quant::{OutlierMode, Outliers, QuantSpec, RAW, Scheme};
use qaq_kernels::store::PackedStream;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::OnceLock;

fn gpu() -> &'static Gpu {
    static GPU: OnceLock<Gpu> = OnceLock::new();
    GPU.get_or_init(|| {
        let ordinal = std::env::var("QAQ_GPU_ORDINAL").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
        Gpu::open(ordinal).unwrap_or_else(|e| panic!("the device tests need a GPU (scripts/gpu-check.sh): {e}"))
    })
}

/// f16-representable values: mostly normal-ish, some large outliers, some groups
/// constant, zero or of mixed-sign zeros, so every path of the quantizer is hit.
fn groups(rng: &mut StdRng, n: usize, d: usize) -> Vec<f16> {
    groups_with(rng, n, d, true)
}

/// [`groups`]; `mixed_zeros: false` makes the zero groups all -0. (Which zero `f32::min`
/// returns for +-0 is unspecified, so the mean-centred scheme's step sign for a group of
/// mixed zeros through the general outlier selection is not a reproducible CPU result.)
fn groups_with(rng: &mut StdRng, n: usize, d: usize, mixed_zeros: bool) -> Vec<f16> {
    let mut x = Vec::with_capacity(n * d);
    for t in 0..n {
        let kind = t % 11;
        for i in 0..d {
            let v = match kind {
                0 => 0.75,
                1 if mixed_zeros && i % 2 == 0 => 0.0,
                1 => -0.0,
                2 => (i as f32 - d as f32 / 2.0) * 0.01,
                _ => {
                    let g: f32 = (0..4).map(|_| rng.random::<f32>() - 0.5).sum::<f32>() * 2.0;
                    if rng.random::<f32>() < 0.02 { g * 40.0 } else { g }
                }
            };
            x.push(f16::from_f32(v));
        }
    }
    x
}

fn widths(rng: &mut StdRng, n: usize, raw: bool) -> Vec<u8> {
    (0..n).map(|_| if raw && rng.random::<f32>() < 0.1 { RAW } else { rng.random_range(0..=8u8) }).collect()
}

fn cpu_stream(x: &[f16], d: usize, bits: &[u8], spec: QuantSpec) -> PackedStream {
    let mut s = PackedStream::new(d, spec, false);
    let mut row = vec![0f32; d];
    for (g, &b) in x.chunks_exact(d).zip(bits) {
        for (r, v) in row.iter_mut().zip(g) {
            *r = v.to_f32();
        }
        s.push(&row, b).unwrap();
    }
    s
}

fn bits_of(x: &[f16]) -> Vec<u16> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// Whether groups of mixed zeros give a reproducible CPU result under `spec` (see
/// [`groups_with`]).
fn mixed_zeros_ok(spec: &QuantSpec, d: usize) -> bool {
    let (lo, hi) = qaq_kernels::cuda::layout::outlier_counts(spec, d);
    spec.scheme == Scheme::Midpoint || (lo <= 1 && hi <= 1)
}

fn specs() -> Vec<QuantSpec> {
    let mut v = Vec::new();
    for scheme in [Scheme::Midpoint, Scheme::MeanCentred] {
        for outliers in [
            Outliers::NONE,
            Outliers::PAPER,
            Outliers { alpha: 0.05, mode: OutlierMode::PerSide },
            Outliers { alpha: 0.2, mode: OutlierMode::Total },
        ] {
            v.push(QuantSpec { scheme, outliers });
        }
    }
    v
}

#[test]
fn quantize_is_byte_exact_with_the_cpu_store() {
    let gpu = gpu();
    let mut rng = StdRng::seed_from_u64(8);
    for d in [8usize, 64, 72, 128, 256] {
        for spec in specs() {
            let n = 333;
            let x = groups_with(&mut rng, n, d, mixed_zeros_ok(&spec, d));
            let bits = widths(&mut rng, n, true);
            let cpu = StreamImage::from_stream(&cpu_stream(&x, d, &bits, spec)).unwrap();
            let dx = gpu.upload(&bits_of(&x)).unwrap();
            let dev = gpu.quantize_f16(&dx, d, &bits, &spec).unwrap().download(gpu).unwrap();
            for t in 0..n {
                assert_eq!(dev.meta(t), cpu.meta(t), "d {d} {spec:?} group {t}");
                assert_eq!(dev.group_codes(t), cpu.group_codes(t), "d {d} {spec:?} group {t}");
                assert_eq!(dev.group_outliers(t), cpu.group_outliers(t), "d {d} {spec:?} group {t}");
            }
            assert_eq!(dev, cpu, "d {d} {spec:?}");
        }
    }
}

#[test]
fn quantize_rejects_what_the_cpu_rejects() {
    let gpu = gpu();
    let d = 64;
    let mut x = vec![f16::from_f32(1.0); 2 * d];
    x[d + 5] = f16::INFINITY;
    let dx = gpu.upload(&bits_of(&x)).unwrap();
    let err = gpu.quantize_f16(&dx, d, &[4, 4], &QuantSpec::default()).unwrap_err();
    assert_eq!(err, KernelError::NonFinite { what: "group" });
    let ok = gpu.upload(&bits_of(&x[..d])).unwrap();
    assert!(gpu.quantize_f16(&ok, d, &[9], &QuantSpec::default()).is_err());
    assert!(gpu.quantize_f16(&ok, 60, &[4], &QuantSpec::default()).is_err());
}

#[test]
fn dequantize_matches_cpu_decode() {
    let gpu = gpu();
    let mut rng = StdRng::seed_from_u64(9);
    for d in [16usize, 64, 256] {
        for spec in specs() {
            let n = 300;
            let x = groups_with(&mut rng, n, d, mixed_zeros_ok(&spec, d));
            let bits = widths(&mut rng, n, true);
            let cpu = cpu_stream(&x, d, &bits, spec);
            let dev = DeviceStream::upload(gpu, &StreamImage::from_stream(&cpu).unwrap(), spec.scheme).unwrap();
            let got = gpu.download(&gpu.dequantize(&dev).unwrap()).unwrap();
            let mut want = vec![0f32; d];
            for t in 0..n {
                assert!(cpu.decode(t, &mut want));
                for i in 0..d {
                    let (a, b) = (got[t * d + i], want[i]);
                    assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "d {d} {spec:?} t {t} i {i}: {a} vs {b}");
                }
            }
        }
    }
}

#[test]
fn device_stream_upload_download_round_trips() {
    let gpu = gpu();
    let mut rng = StdRng::seed_from_u64(10);
    let x = groups(&mut rng, 200, 64);
    let bits = widths(&mut rng, 200, true);
    let img = StreamImage::from_stream(&cpu_stream(&x, 64, &bits, QuantSpec::default())).unwrap();
    let dev = DeviceStream::upload(gpu, &img, Scheme::Midpoint).unwrap();
    assert_eq!(dev.download(gpu).unwrap(), img);
    assert_eq!(dev.device_bytes(), img.device_bytes());
}

fn close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol * scale, "{what}[{i}]: {x} vs {y} (scale {scale})");
    }
}

fn queries(rng: &mut StdRng, g: usize, d: usize) -> Vec<f32> {
    let sc = 1.0 / (d as f32).sqrt();
    (0..g * d).map(|_| (rng.random::<f32>() - 0.5) * 4.0 * sc).collect()
}

#[test]
fn packed_attention_matches_the_cpu_reference() {
    let gpu = gpu();
    let mut rng = StdRng::seed_from_u64(11);
    for (t, g, d) in [(1, 1, 64), (63, 3, 64), (64, 3, 64), (65, 8, 64), (1000, 3, 128), (4097, 3, 64), (300, 2, 24)] {
        for spec in [QuantSpec::default(), QuantSpec { scheme: Scheme::MeanCentred, ..Default::default() }] {
            let kx = groups(&mut rng, t, d);
            let vx = groups(&mut rng, t, d);
            let (kb, vb) = (widths(&mut rng, t, true), widths(&mut rng, t, true));
            let (kc, vc) = (cpu_stream(&kx, d, &kb, spec), cpu_stream(&vx, d, &vb, spec));
            let q = queries(&mut rng, g, d);
            let (mut out, mut probs) = (vec![0f32; g * d], vec![0f32; g * t]);
            let kc = KStore::Packed(kc);
            attention::attend_packed_reference(&kc, &vc, &q, g, &mut out, &mut probs);
            let KStore::Packed(kc) = kc else { unreachable!() };
            let kd = DeviceStream::upload(gpu, &StreamImage::from_stream(&kc).unwrap(), spec.scheme).unwrap();
            let vd = DeviceStream::upload(gpu, &StreamImage::from_stream(&vc).unwrap(), spec.scheme).unwrap();
            let dq = gpu.upload(&q).unwrap();
            let mut buf = gpu.attn_buffers(t, g, d).unwrap();
            gpu.attend_packed(&kd, &vd, &dq, &mut buf).unwrap();
            let what = format!("T {t} g {g} d {d} {:?}", spec.scheme);
            close(&gpu.download(&buf.out).unwrap(), &out, 2e-4, &format!("{what} out"));
            close(&gpu.download(&buf.probs).unwrap(), &probs, 2e-4, &format!("{what} probs"));
            let window: Vec<f32> = (0..t).map(|i| (0..g).map(|j| probs[j * t + i]).fold(0f32, f32::max)).collect();
            close(&gpu.download(&buf.window).unwrap(), &window, 2e-4, &format!("{what} window"));
        }
    }
}

#[test]
fn f16_attention_matches_the_dense_reference() {
    let gpu = gpu();
    let mut rng = StdRng::seed_from_u64(12);
    for (t, g, d) in [(1, 3, 64), (777, 3, 64), (2048, 8, 128)] {
        let (kx, vx) = (groups(&mut rng, t, d), groups(&mut rng, t, d));
        let q = queries(&mut rng, g, d);
        let f = |x: &[f16]| x.iter().map(|v| v.to_f32()).collect::<Vec<_>>();
        let (mut out, mut probs) = (vec![0f32; g * d], vec![0f32; g * t]);
        attention::attend_dense_f32(&f(&kx), &f(&vx), d, &q, g, &mut out, &mut probs);
        let (dk, dv, dq) =
            (gpu.upload(&bits_of(&kx)).unwrap(), gpu.upload(&bits_of(&vx)).unwrap(), gpu.upload(&q).unwrap());
        let mut buf = gpu.attn_buffers(t, g, d).unwrap();
        gpu.attend_f16(&dk, &dv, &dq, &mut buf).unwrap();
        close(&gpu.download(&buf.out).unwrap(), &out, 2e-4, "f16 out");
        close(&gpu.download(&buf.probs).unwrap(), &probs, 2e-4, "f16 probs");
    }
}

#[test]
fn rmsnorm_silu_and_rope_match_scalar_references() {
    let gpu = gpu();
    let mut rng = StdRng::seed_from_u64(13);
    let (rows, n, eps) = (5, 576, 1e-5f32);
    let x: Vec<f32> = (0..rows * n).map(|_| rng.random::<f32>() * 4.0 - 2.0).collect();
    let w: Vec<f32> = (0..n).map(|_| rng.random::<f32>() + 0.5).collect();
    let mut want = vec![0f32; rows * n];
    for r in 0..rows {
        let xr = &x[r * n..(r + 1) * n];
        let inv = 1.0 / (xr.iter().map(|v| v * v).sum::<f32>() / n as f32 + eps).sqrt();
        for i in 0..n {
            want[r * n + i] = xr[i] * inv * w[i];
        }
    }
    let (dx, dw) = (gpu.upload(&x).unwrap(), gpu.upload(&w).unwrap());
    let mut dy = gpu.zeros::<f32>(rows * n).unwrap();
    gpu.rmsnorm(&dx, &dw, &mut dy, rows, n, eps).unwrap();
    close(&gpu.download(&dy).unwrap(), &want, 1e-5, "rmsnorm");

    let up: Vec<f32> = (0..rows * n).map(|_| rng.random::<f32>() - 0.5).collect();
    let want: Vec<f32> = x.iter().zip(&up).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
    let du = gpu.upload(&up).unwrap();
    gpu.silu_mul(&dx, &du, &mut dy, rows * n).unwrap();
    close(&gpu.download(&dy).unwrap(), &want, 1e-5, "silu_mul");

    let (heads, hd, theta) = (9, 64, 10_000f32);
    let pos = [0u32, 1, 17, 4095];
    let mut xr: Vec<f32> = (0..pos.len() * heads * hd).map(|_| rng.random::<f32>() - 0.5).collect();
    let mut want = xr.clone();
    for (r, &p) in pos.iter().enumerate() {
        for h in 0..heads {
            let row = &mut want[(r * heads + h) * hd..(r * heads + h + 1) * hd];
            for i in 0..hd / 2 {
                let ang = p as f64 * (theta as f64).powf(-2.0 * i as f64 / hd as f64);
                let (s, c) = ang.sin_cos();
                let (a, b) = (row[i] as f64, row[i + hd / 2] as f64);
                row[i] = (a * c - b * s) as f32;
                row[i + hd / 2] = (a * s + b * c) as f32;
            }
        }
    }
    let mut dxr = gpu.upload(&xr).unwrap();
    gpu.rope(&mut dxr, &gpu.upload(&pos).unwrap(), heads, hd, theta).unwrap();
    xr = gpu.download(&dxr).unwrap();
    close(&xr, &want, 2e-3, "rope");
}

#[test]
fn embedding_softmax_and_argmax_match_scalar_references() {
    let gpu = gpu();
    let mut rng = StdRng::seed_from_u64(14);
    let (vocab, dim) = (1000, 576);
    let table: Vec<f16> = (0..vocab * dim).map(|_| f16::from_f32(rng.random::<f32>() - 0.5)).collect();
    let ids = [3u32, 999, 0, 3];
    let dt = gpu.upload(&bits_of(&table)).unwrap();
    let mut out = gpu.zeros::<f32>(ids.len() * dim).unwrap();
    gpu.embed_f16(&dt, &gpu.upload(&ids).unwrap(), vocab, dim, &mut out).unwrap();
    let got = gpu.download(&out).unwrap();
    for (r, &id) in ids.iter().enumerate() {
        for i in 0..dim {
            assert_eq!(got[r * dim + i], table[id as usize * dim + i].to_f32());
        }
    }
    assert!(gpu.embed_f16(&dt, &gpu.upload(&[1000u32]).unwrap(), vocab, dim, &mut out).is_err());

    let (rows, n) = (4, 49_152);
    let mut logits: Vec<f32> = (0..rows * n).map(|_| rng.random::<f32>() * 20.0 - 10.0).collect();
    logits[n + 7] = 50.0;
    logits[n + 9000] = 50.0; // tie: the first index wins
    logits[3 * n + n - 1] = 60.0;
    let dl = gpu.upload(&logits).unwrap();
    let mut am = gpu.zeros::<u32>(rows).unwrap();
    gpu.argmax_rows(&dl, rows, n, &mut am).unwrap();
    let want: Vec<u32> = (0..rows)
        .map(|r| {
            let row = &logits[r * n..(r + 1) * n];
            let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            row.iter().position(|&v| v == mx).unwrap() as u32
        })
        .collect();
    assert_eq!(gpu.download(&am).unwrap(), want);
    assert_eq!(want[1], 7);

    let mut dl = gpu.upload(&logits).unwrap();
    gpu.softmax_rows(&mut dl, rows, n, 1.0).unwrap();
    attention::softmax_rows(&mut logits, rows, n);
    close(&gpu.download(&dl).unwrap(), &logits, 1e-5, "softmax");
}

/// A sequence's cache with its device tier against the same cache attending on the CPU:
/// a 300-token prefill, then 300 decode steps with re-quantization after each (groups
/// re-encoded, arenas rebuilt as they fill). Every step's attention output agrees, and the
/// widths QAQ chose from the device's windows are the CPU's (bar rounding at a boundary).
#[test]
fn device_kv_tier_attends_like_the_cpu_cache_through_requantization() {
    use qaq_kernels::cache::new_cache;
    use qaq_kernels::cuda::DeviceKv;
    use qaq_kernels::{CacheConfig, KvPolicy};
    use std::str::FromStr;
    let gpu = gpu();
    let cfg = CacheConfig { n_layers: 2, n_kv_heads: 3, n_q_heads: 9, head_dim: 64 };
    let (row, qrow) = (3 * 64, 9 * 64);
    for label in ["qaq-tuned", "qaq", "uniform:4", "fp16", "uniform:6/3:noout+rot", "qaq-tuned+rot"] {
        let policy = KvPolicy::from_str(label).unwrap();
        let (mut cpu, mut dev) = (new_cache(cfg, policy).unwrap(), new_cache(cfg, policy).unwrap());
        let mut tier = DeviceKv::new(&mut *dev).unwrap();
        let mut rng = StdRng::seed_from_u64(5);
        let mut out_d = gpu.zeros::<f32>(qrow).unwrap();
        let mut rnd = |n: usize| -> Vec<f32> {
            groups(&mut rng, n * row / 64, 64).iter().map(|v| v.to_f32() * 0.5).collect::<Vec<f32>>()
        };
        for step in 0..301 {
            let n = if step == 0 { 300 } else { 1 };
            for layer in 0..2 {
                let (k, v) = (rnd(n), rnd(n));
                let q: Vec<f32> = rnd(3 * n).into_iter().map(|x| x.clamp(-8.0, 8.0)).collect();
                cpu.append(layer, &k, &v).unwrap();
                dev.append(layer, &k, &v).unwrap();
                if n > 1 {
                    cpu.attend_rows(layer, &q, n).unwrap();
                    dev.attend_rows(layer, &q, n).unwrap();
                    continue;
                }
                let want = cpu.attend(layer, &q).unwrap().output;
                tier.attend(gpu, &mut *dev, layer, &q, &mut out_d.slice_mut(..)).unwrap();
                close(&gpu.download(&out_d).unwrap(), &want, 2e-4, &format!("{label} step {step} layer {layer}"));
            }
            cpu.end_step().unwrap();
            dev.end_step().unwrap();
        }
        let (mut same, mut all) = (0usize, 0usize);
        for layer in 0..2 {
            for h in 0..3 {
                let (a, b) = (cpu.widths(layer, h).unwrap(), dev.widths(layer, h).unwrap());
                for (x, y) in a.0.iter().chain(&a.1).zip(b.0.iter().chain(&b.1)) {
                    same += usize::from(x == y);
                    all += 1;
                }
            }
        }
        assert!(same as f64 >= 0.999 * all as f64, "{label}: {same} of {all} widths agree");
        assert_eq!(cpu.counters().k_down + cpu.counters().v_down > 0, label.starts_with("qaq"), "{label}");
        assert!(tier.bytes() >= dev.bytes_used() / 2 && tier.uploaded_bytes() > 0, "{label}: {tier:?}");
    }
}
