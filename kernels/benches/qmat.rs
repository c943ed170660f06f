//! The quantized matmul ([`qaq_kernels::qmat::linear`]) against the f32 matmul
//! ([`qaq_kernels::simd::linear_rows`]) on the dequantized matrix, side by side, printed
//! as `SUMMARY` lines:
//! - the default model's shapes (576x576, 192x576, 1536x576, 576x1536, and the tied
//!   head 49152x576 in Q8_0) at m = 1, 8, 512, for Q4_1, Q8_0, Q4_K and Q6_K (the
//!   k-quants only where the columns are whole 256-blocks: 576x1536), with the ratio and
//!   the GB/s of weight bytes read at m = 1;
//! - the fork-join cost of the kernels' pool against rayon's;
//! - one forward pass's sequence of matmuls (7 per layer x 30 layers in Q4_1, plus the
//!   Q8_0 head): decode (all 211 at m = 1), decode of 8 sequences (all at m = 8) and
//!   prefill (the 210 layer calls at m = 512, the head on the last row only), with the
//!   tokens/s they bound, on the kernels' pool, on rayon's and on one thread.
//!
//! Times are the fastest of repeated runs (the least disturbed on a shared machine).
//!
//! Threads: the kernels' global pool and rayon both use every core (set
//! `QAQ_KERNELS_THREADS` / `RAYON_NUM_THREADS` to change). `QAQ_QMAT_BENCH_QUICK=1`
//! runs fewer repetitions.

use criterion::{Criterion, criterion_group, criterion_main};
use qaq_kernels::pool::{self, ParallelFor, Pool};
use qaq_kernels::qmat::{QFormat, QInput, QMatrix, linear, linear_in};
use qaq_kernels::simd;
use rayon::prelude::*;
use std::hint::black_box;
use std::time::{Duration, Instant};

struct Rng(u64);
impl Rng {
    fn f(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

fn quick() -> bool {
    std::env::var_os("QAQ_QMAT_BENCH_QUICK").is_some()
}

/// Seconds of the fastest run of `f` among enough repetitions to fill about `budget`
/// (at least 3): on a shared machine the fastest run is the one least disturbed.
fn best(budget: Duration, mut f: impl FnMut()) -> f64 {
    f();
    let t0 = Instant::now();
    f();
    let once = t0.elapsed().max(Duration::from_nanos(100));
    let reps = ((budget.as_secs_f64() / once.as_secs_f64()) as usize).clamp(3, 2000);
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn budget() -> Duration {
    Duration::from_millis(if quick() { 60 } else { 400 })
}

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng(seed | 1);
    (0..n).map(|_| r.f() * 0.1).collect()
}

const SHAPES: [(usize, usize); 5] = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)];

/// One shape in one format at one m: (quantized s, f32 s).
fn pair(w: &QMatrix, wf: &[f32], x: &[f32], m: usize) -> (f64, f64) {
    let (n, k) = (w.rows(), w.cols());
    let mut out = vec![0f32; m * n];
    let q = best(budget(), || linear(w, black_box(x), m, &mut out).unwrap());
    let f = best(budget(), || simd::linear_rows(black_box(x), m, wf, n, k, &mut out));
    (q, f)
}

fn bench_shapes(c: &mut Criterion) {
    println!(
        "SUMMARY level {:?}, vnni {}, pool threads {}, rayon threads {}",
        simd::level(),
        simd::vnni(),
        pool::global().threads(),
        rayon::current_num_threads()
    );
    println!(
        "SUMMARY | format | shape (rows x cols) | m | qmat::linear | f32 linear_rows | speed-up | weight GB/s (m=1) |"
    );
    for f in [QFormat::Q4_1, QFormat::Q8_0, QFormat::Q4_K, QFormat::Q6_K] {
        for (n, k) in SHAPES {
            if f.row_bytes(k).is_err() || (n == 49152 && f != QFormat::Q8_0) {
                continue;
            }
            let w = QMatrix::from_f32(f, n, k, &values(n * k, 3)).unwrap();
            let wf = w.dequantize();
            for m in [1, 8, 512] {
                if n == 49152 && m == 512 && quick() {
                    continue;
                }
                let x = values(m * k, 5 + m as u64);
                let (q, fl) = pair(&w, &wf, &x, m);
                let gbs = if m == 1 {
                    format!("{:.1} (f32: {:.1})", w.bytes() as f64 / q / 1e9, wf.len() as f64 * 4.0 / fl / 1e9)
                } else {
                    String::new()
                };
                println!(
                    "SUMMARY | {f} | {n}x{k} | {m} | {:.1} us | {:.1} us | {:.2}x | {gbs} |",
                    q * 1e6,
                    fl * 1e6,
                    fl / q
                );
            }
        }
    }
    let w = QMatrix::from_f32(QFormat::Q4_1, 576, 576, &values(576 * 576, 7)).unwrap();
    let x = values(576, 9);
    let mut out = vec![0f32; 576];
    c.bench_function("qmat linear Q4_1 576x576 m=1", |b| b.iter(|| linear(&w, black_box(&x), 1, &mut out).unwrap()));
}

fn bench_pool(c: &mut Criterion) {
    let p = pool::global();
    let work = |i: usize| {
        black_box(i);
    };
    let n = p.threads();
    let calls = 2000;
    let ours = best(budget(), || (0..calls).for_each(|_| p.parallel_for(n, &work))) / calls as f64;
    let theirs = best(budget(), || (0..calls).for_each(|_| (0..n).into_par_iter().for_each(work))) / calls as f64;
    let gap = |f: &dyn Fn()| {
        let reps = if quick() { 100 } else { 1000 };
        let mut total = 0.0;
        for _ in 0..reps {
            let t = Instant::now();
            while t.elapsed() < Duration::from_micros(30) {
                std::hint::spin_loop();
            }
            let t = Instant::now();
            f();
            total += t.elapsed().as_secs_f64();
        }
        total / reps as f64
    };
    let ours_gap = gap(&|| p.parallel_for(n, &work));
    let theirs_gap = gap(&|| (0..n).into_par_iter().for_each(work));
    println!(
        "SUMMARY fork-join of {n} empty tasks: pool {:.2} us, rayon {:.2} us back to back; after 30 us of other work: pool {:.2} us, rayon {:.2} us",
        ours * 1e6,
        theirs * 1e6,
        ours_gap * 1e6,
        theirs_gap * 1e6
    );
    c.bench_function("pool parallel_for empty", |b| b.iter(|| p.parallel_for(n, &work)));
}

/// The default model's matmuls: per layer q, k, v, o, gate, up, down (Q4_1), then the
/// Q8_0 head.
struct Model {
    layers: Vec<[QMatrix; 7]>,
    head: QMatrix,
}

fn model() -> Model {
    let shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)];
    // One layer's matrices, repeated in distinct copies (so that the weights stream from
    // memory as in a real forward pass).
    let layers = (0..30)
        .map(|l| {
            std::array::from_fn(|i| {
                let (n, k) = shapes[i];
                QMatrix::from_f32(QFormat::Q4_1, n, k, &values(n * k, 11 + 7 * l as u64 + i as u64)).unwrap()
            })
        })
        .collect();
    Model { layers, head: QMatrix::from_f32(QFormat::Q8_0, 49152, 576, &values(49152 * 576, 99)).unwrap() }
}

/// rayon's pool behind the kernels' [`ParallelFor`] (for the comparison).
struct Rayon;
impl ParallelFor for Rayon {
    fn threads(&self) -> usize {
        rayon::current_num_threads()
    }
    fn parallel_for(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        (0..n).into_par_iter().for_each(f);
    }
}

/// Runs the 210 layer products at `m` rows and the head at `head_m` on `par`, quantizing
/// each input once (q/k/v share one, gate/up share one), as a forward pass would.
fn forward(par: &dyn ParallelFor, md: &Model, x: &[f32], xd: &[f32], m: usize, head_m: usize, out: &mut [f32]) {
    for l in &md.layers {
        let a = QInput::new(QFormat::Q4_1, x, m, 576).unwrap();
        for w in &l[..3] {
            linear_in(par, w, &a, &mut out[..m * w.rows()]).unwrap();
        }
        let a = QInput::new(QFormat::Q4_1, x, m, 576).unwrap();
        linear_in(par, &l[3], &a, &mut out[..m * 576]).unwrap();
        let a = QInput::new(QFormat::Q4_1, x, m, 576).unwrap();
        for w in &l[4..6] {
            linear_in(par, w, &a, &mut out[..m * w.rows()]).unwrap();
        }
        let a = QInput::new(QFormat::Q4_1, xd, m, 1536).unwrap();
        linear_in(par, &l[6], &a, &mut out[..m * 576]).unwrap();
    }
    let a = QInput::new(QFormat::Q8_0, &x[(m - head_m) * 576..], head_m, 576).unwrap();
    linear_in(par, &md.head, &a, &mut out[..head_m * 49152]).unwrap();
}

/// The same sequence with `linear_rows` on f32 copies.
fn forward_f32(
    ws: &[(Vec<f32>, usize, usize)],
    head: &[f32],
    x: &[f32],
    xd: &[f32],
    m: usize,
    head_m: usize,
    out: &mut [f32],
) {
    for (i, (w, n, k)) in ws.iter().enumerate() {
        let xi = if i % 7 == 6 { xd } else { x };
        simd::linear_rows(xi, m, w, *n, *k, &mut out[..m * n]);
    }
    simd::linear_rows(&x[(m - head_m) * 576..], head_m, head, 49152, 576, &mut out[..head_m * 49152]);
}

fn bench_forward(_c: &mut Criterion) {
    let md = model();
    let bytes: usize = md.layers.iter().flatten().map(|w| w.bytes()).sum::<usize>() + md.head.bytes();
    let ws: Vec<(Vec<f32>, usize, usize)> =
        md.layers.iter().flatten().map(|w| (w.dequantize(), w.rows(), w.cols())).collect();
    let head = md.head.dequantize();
    let one = Pool::new(1);
    for (m, head_m) in [(1, 1), (8, 8), (512, 1)] {
        let x = values(m * 576, 21);
        let xd = values(m * 1536, 23);
        let mut out = vec![0f32; m.max(head_m) * 49152];
        let b = if m < 512 { budget() * 5 } else { budget() * 10 };
        let q = best(b, || forward(pool::global(), &md, &x, &xd, m, head_m, &mut out));
        let r = best(b, || forward(&Rayon, &md, &x, &xd, m, head_m, &mut out));
        let q1 = best(b, || forward(&one, &md, &x, &xd, m, head_m, &mut out));
        let f = best(b, || forward_f32(&ws, &head, &x, &xd, m, head_m, &mut out));
        let what = match m {
            1 => "decode (211 calls at m=1)",
            8 => "decode of 8 sequences (211 calls at m=8)",
            _ => "prefill (210 calls at m=512, head at m=1)",
        };
        let gbs = if m == 1 {
            format!(", {:.1} GB/s of {:.1} MB weights", bytes as f64 / q / 1e9, bytes as f64 / 1e6)
        } else {
            String::new()
        };
        println!(
            "SUMMARY forward-pass matmuls, {what}: qmat on the pool {:.2} ms ({:.0} tok/s bound{gbs}); on rayon {:.2} ms; on one thread {:.2} ms; f32 linear_rows {:.2} ms ({:.0} tok/s) -> {:.2}x",
            q * 1e3,
            m as f64 / q,
            r * 1e3,
            q1 * 1e3,
            f * 1e3,
            m as f64 / f,
            f / q
        );
    }
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .measurement_time(Duration::from_secs(1))
        .warm_up_time(Duration::from_millis(300))
}

criterion_group! { name = benches; config = config(); targets = bench_pool, bench_shapes, bench_forward }
criterion_main!(benches);
