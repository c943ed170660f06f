//! One decode step of one sequence as the worker runs it, per policy, at 2k and 8k
//! tokens of context, on the default model's shape (SmolLM2-135M: 30 layers, 3 KV heads,
//! 9 query heads, head_dim 64): per layer `append` (one token) and `attend_rows` (one
//! query row), then `end_step`, then the engine's accounting calls (`bytes_used` five
//! times, `fp16_equivalent_bytes`, `host_bytes` twice, `counters`), as the engine makes
//! them each step.
//!
//! Criterion times whole steps (`decode_step/<policy>/T<n>`, wall time, the attention on
//! the kernels' pool). The `SUMMARY` lines give, for the same caches, medians over
//! `QAQ_DECODE_STEPS` steps run on one thread (a pool of one, so that the thread's CPU
//! clock measures all the work, whatever else runs on a shared machine):
//! - `append`: the 30 appends;
//! - `attend`: the 30 `attend_rows` calls (attention plus, QAQ, window and ||Q||^2
//!   bookkeeping);
//! - `kernel`: the attention kernel alone over the same streams (cloned), one thread,
//!   CPU time, after the measured steps; `attend - kernel` is what the cache adds
//!   around it (and the cost of cold caches);
//! - `end_step`: QAQ's re-quantization (every `every` steps);
//! - `stats`: the engine's accounting calls;
//!
//! then the wall time of as many steps on the default pool (`2 threads`: both cores of
//! this machine).
//!
//! And a prefill chunk (`attend_rows` of 64 rows over the whole context, all layers).
//!
//! Data: synthetic, shaped like real post-RoPE K/V (per head a few channels with large
//! offsets, channel scales from 0.3 to 2), queries with a persistent direction per head
//! plus fresh noise each step (attention concentrated on a few hundred tokens, the
//! pattern drifting from step to step), and an attention sink at token 0.
//!
//! With `QAQ_DECODE_DUMP=FILE` (a dump of a real prompt's K/V/Q, as
//! `worker/examples/dump_kv.rs` writes it, at least as long as the largest context),
//! the caches hold the model's real keys and values and decode with its real queries:
//! the prompt's first `T` tokens are the context, the following ones the decoded tokens
//! (from the dump's start again when it runs out).
//!
//! Environment: `QAQ_DECODE_T` (comma-separated contexts, default `2048,8192`),
//! `QAQ_DECODE_POLICIES` (comma-separated policy strings, default
//! `fp16,uniform:4,qaq-tuned`), `QAQ_DECODE_STEPS` (measured steps for the breakdown,
//! default 12), `QAQ_DECODE_QUICK` (the breakdown only, on the same steps whatever the
//! speed: no criterion sampling before it, no prefill chunk after).

use criterion::{Criterion, criterion_group, criterion_main};
use qaq_kernels::attention::{KStore, attend_packed};
use qaq_kernels::cache::new_cache;
use qaq_kernels::{CacheConfig, KvPolicy, PolicyCache};
use std::hint::black_box;
use std::time::{Duration, Instant};

const CFG: CacheConfig = CacheConfig { n_layers: 30, n_kv_heads: 3, n_q_heads: 9, head_dim: 64 };
const D: usize = 64;
const PREFILL_ROWS: usize = 64;

/// Deterministic data shaped like a model's K/V/Q.
struct Synth {
    s: u64,
    /// Per (layer, KV head): key channel offsets and scales, value scales, query direction.
    koff: Vec<Vec<f32>>,
    kscale: Vec<Vec<f32>>,
    vscale: Vec<Vec<f32>>,
    qdir: Vec<Vec<f32>>,
}

impl Synth {
    fn new(seed: u64) -> Self {
        let mut s = Synth { s: seed | 1, koff: vec![], kscale: vec![], vscale: vec![], qdir: vec![] };
        for _ in 0..CFG.n_layers * CFG.n_kv_heads {
            let ko: Vec<f32> = (0..D).map(|c| if c % 29 == 3 { 8.0 + 4.0 * s.u() } else { 0.5 * s.n() }).collect();
            let ks: Vec<f32> = (0..D).map(|_| 0.3 + 1.7 * s.u()).collect();
            let vs: Vec<f32> = (0..D).map(|_| 0.3 + 1.2 * s.u()).collect();
            let qd: Vec<f32> = (0..D).map(|_| 1.6 * s.n()).collect();
            s.koff.push(ko);
            s.kscale.push(ks);
            s.vscale.push(vs);
            s.qdir.push(qd);
        }
        s
    }
    fn u(&mut self) -> f32 {
        self.s ^= self.s << 13;
        self.s ^= self.s >> 7;
        self.s ^= self.s << 17;
        (self.s >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Roughly standard normal (sum of four uniforms).
    fn n(&mut self) -> f32 {
        (self.u() + self.u() + self.u() + self.u() - 2.0) * 1.732
    }
    /// K and V rows of `n` tokens of `layer` starting at position `pos`.
    fn kv(&mut self, layer: usize, pos: usize, n: usize) -> (Vec<f32>, Vec<f32>) {
        let (mut k, mut v) = (Vec::with_capacity(n * CFG.n_kv_heads * D), Vec::with_capacity(n * CFG.n_kv_heads * D));
        for t in pos..pos + n {
            for h in 0..CFG.n_kv_heads {
                let i = layer * CFG.n_kv_heads + h;
                for c in 0..D {
                    let sink = if t == 0 { 0.4 * self.qdir[i][c] } else { 0.0 };
                    k.push(self.koff[i][c] + self.kscale[i][c] * self.n() + sink);
                    v.push(self.vscale[i][c] * self.n());
                }
            }
        }
        (k, v)
    }
    /// One query row (all query heads) of `layer`.
    fn q(&mut self, layer: usize) -> Vec<f32> {
        let g = CFG.group();
        let mut q = Vec::with_capacity(CFG.n_q_heads * D);
        for qh in 0..CFG.n_q_heads {
            let i = layer * CFG.n_kv_heads + qh / g;
            for c in 0..D {
                q.push(self.qdir[i][c] * (1.0 + 0.1 * (qh % g) as f32) + 0.8 * self.n());
            }
        }
        q
    }
}

/// A real prompt's K, V and Q (`kernels/examples/kv_report.rs` describes the format).
struct Dump {
    t: usize,
    k: Vec<f32>,
    v: Vec<f32>,
    q: Vec<f32>,
}

impl Dump {
    fn read(path: &str) -> Dump {
        let b = std::fs::read(path).unwrap();
        assert_eq!(&b[..8], b"QAQKVD01", "{path}: not a KV dump");
        let h: Vec<usize> =
            (0..5).map(|i| u32::from_le_bytes(b[8 + 4 * i..12 + 4 * i].try_into().unwrap()) as usize).collect();
        assert_eq!(
            h[..4],
            [CFG.n_layers, CFG.n_kv_heads, CFG.n_q_heads, CFG.head_dim],
            "{path}: another model's shape"
        );
        let t = h[4];
        let f = |from: usize, n: usize| -> Vec<f32> {
            b[from..from + 4 * n].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
        };
        let (kv, qn) = (CFG.n_layers * t * CFG.n_kv_heads * D, CFG.n_layers * t * CFG.n_q_heads * D);
        Dump { t, k: f(28, kv), v: f(28 + 4 * kv, kv), q: f(28 + 8 * kv, qn) }
    }
}

/// Where the K/V/Q come from.
enum Source {
    Synth(Synth),
    Dump(std::sync::Arc<Dump>),
}

impl Source {
    fn new(dump: &Option<std::sync::Arc<Dump>>) -> Source {
        match dump {
            Some(d) => Source::Dump(d.clone()),
            None => Source::Synth(Synth::new(7)),
        }
    }
    fn kv(&mut self, layer: usize, pos: usize, n: usize) -> (Vec<f32>, Vec<f32>) {
        match self {
            Source::Synth(s) => s.kv(layer, pos, n),
            Source::Dump(d) => {
                let row = CFG.n_kv_heads * D;
                let (mut k, mut v) = (Vec::new(), Vec::new());
                for p in pos..pos + n {
                    let o = (layer * d.t + p % d.t) * row;
                    k.extend_from_slice(&d.k[o..o + row]);
                    v.extend_from_slice(&d.v[o..o + row]);
                }
                (k, v)
            }
        }
    }
    /// The query row of `layer` at position `pos`.
    fn q(&mut self, layer: usize, pos: usize) -> Vec<f32> {
        match self {
            Source::Synth(s) => s.q(layer),
            Source::Dump(d) => {
                let row = CFG.n_q_heads * D;
                let o = (layer * d.t + pos % d.t) * row;
                d.q[o..o + row].to_vec()
            }
        }
    }
}

/// A cache of `t` tokens under `policy`: the prompt appended at once per layer, its last
/// 8 rows attended (what feeds QAQ's windows after a prefill), one `end_step`, then 8
/// decode steps so that the newest tokens' windows are full.
fn build(policy: &str, t: usize, syn: &mut Source) -> Box<dyn PolicyCache> {
    let mut c = new_cache(CFG, policy.parse::<KvPolicy>().unwrap()).unwrap();
    for layer in 0..CFG.n_layers {
        let (k, v) = syn.kv(layer, 0, t);
        c.append(layer, &k, &v).unwrap();
        let q: Vec<f32> = (t - 8..t).flat_map(|p| syn.q(layer, p)).collect();
        c.attend_rows(layer, &q, 8).unwrap();
    }
    c.end_step().unwrap();
    let mut sink = Times::default();
    for _ in 0..8 {
        step(&mut *c, syn, &mut sink);
    }
    c
}

/// The parts of a step: append, attend, end_step, stats.
const PARTS: usize = 4;

/// Durations of a step's parts: wall time, and CPU time of all the process's threads
/// (on a shared machine, the work the part costs whatever else runs).
#[derive(Default, Clone, Copy)]
struct Times {
    wall: [f64; PARTS],
    cpu: [f64; PARTS],
}

impl Times {
    fn total(&self) -> f64 {
        self.wall.iter().sum()
    }
    fn total_cpu(&self) -> f64 {
        self.cpu.iter().sum()
    }
}

/// A point in wall and process CPU time.
struct Clock(Instant, f64);

impl Clock {
    fn now() -> Clock {
        Clock(Instant::now(), proc_cpu())
    }
    /// Adds the time since `self` to part `i` of `tm`; returns now.
    fn lap(self, tm: &mut Times, i: usize) -> Clock {
        let now = Clock::now();
        tm.wall[i] += (now.0 - self.0).as_secs_f64();
        tm.cpu[i] += now.1 - self.1;
        now
    }
}

/// This thread's CPU time so far, seconds (the breakdown's steps run on one thread).
fn proc_cpu() -> f64 {
    cpu_clock(libc::CLOCK_THREAD_CPUTIME_ID)
}

fn cpu_clock(id: libc::clockid_t) -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec for clock_gettime to write.
    let rc = unsafe { libc::clock_gettime(id, &mut ts) };
    if rc == 0 { ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9 } else { 0.0 }
}

/// The engine's accounting calls of one step.
fn engine_stats(c: &dyn PolicyCache) -> usize {
    let mut x = 0;
    for _ in 0..5 {
        x += c.bytes_used();
    }
    x += c.fp16_equivalent_bytes();
    x += c.host_bytes() + c.host_bytes();
    x + c.counters().k_up as usize
}

/// One decode step; adds its parts' durations to `tm`.
fn step(c: &mut dyn PolicyCache, syn: &mut Source, tm: &mut Times) {
    let pos = c.len(0);
    for layer in 0..CFG.n_layers {
        let (k, v) = syn.kv(layer, pos, 1);
        let q = syn.q(layer, pos);
        let t = Clock::now();
        c.append(layer, &k, &v).unwrap();
        let t = t.lap(tm, 0);
        black_box(c.attend_rows(layer, &q, 1).unwrap());
        t.lap(tm, 1);
    }
    let t = Clock::now();
    c.end_step().unwrap();
    let t = t.lap(tm, 2);
    black_box(engine_stats(c));
    t.lap(tm, 3);
}

/// The attention kernel alone over clones of `c`'s streams (one query row per layer).
fn kernel_time(c: &dyn PolicyCache, syn: &mut Source) -> f64 {
    let g = CFG.group();
    let mut heads = Vec::new();
    for layer in 0..CFG.n_layers {
        for h in 0..CFG.n_kv_heads {
            let (k, v) = c.streams(layer, h).unwrap();
            heads.push((KStore::Packed(k.clone()), v.clone()));
        }
    }
    let pos = c.len(0);
    let qs: Vec<Vec<f32>> = (0..CFG.n_layers).map(|l| c.decode_queries(l, &syn.q(l, pos)).unwrap()).collect();
    let t = c.len(0);
    let (mut out, mut probs) = (vec![0f32; g * D], vec![0f32; g * t]);
    let mut run = || {
        for (i, (k, v)) in heads.iter().enumerate() {
            let (l, h) = (i / CFG.n_kv_heads, i % CFG.n_kv_heads);
            attend_packed(k, v, &qs[l][h * g * D..(h + 1) * g * D], g, &mut out, &mut probs);
        }
        black_box(&out);
    };
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let (t0, c0) = (Instant::now(), cpu_time());
        run();
        let wall = t0.elapsed().as_secs_f64();
        // On a shared machine, this thread's CPU time is closer to what the kernel costs
        // than the wall time.
        best = best.min(cpu_time().zip(c0).map_or(wall, |(b, a)| b - a));
    }
    best
}

/// This thread's CPU time so far, seconds.
fn cpu_time() -> Option<f64> {
    Some(cpu_clock(libc::CLOCK_THREAD_CPUTIME_ID))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn env_list(name: &str, default: &str) -> Vec<String> {
    std::env::var(name).unwrap_or_else(|_| default.into()).split(',').map(|s| s.trim().to_string()).collect()
}

fn bench_decode(c: &mut Criterion) {
    let contexts: Vec<usize> = env_list("QAQ_DECODE_T", "2048,8192").iter().map(|s| s.parse().unwrap()).collect();
    let policies = env_list("QAQ_DECODE_POLICIES", "fp16,uniform:4,qaq-tuned");
    let steps: usize = std::env::var("QAQ_DECODE_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(12);
    let dump = std::env::var("QAQ_DECODE_DUMP").ok().map(|p| std::sync::Arc::new(Dump::read(&p)));
    let mut rows = Vec::new();
    for &t in &contexts {
        for policy in &policies {
            let mut syn = Source::new(&dump);
            // A dump's last tokens are the decoded ones.
            let t = dump.as_ref().map_or(t, |d| t.min(d.t.saturating_sub(96)));
            let quick = std::env::var_os("QAQ_DECODE_QUICK").is_some();
            let mut cache = build(policy, t, &mut syn);
            if !quick {
                let mut grp = c.benchmark_group("decode_step");
                grp.sample_size(10).warm_up_time(Duration::from_millis(200)).measurement_time(Duration::from_secs(3));
                grp.bench_function(format!("{policy}/T{t}"), |b| {
                    b.iter_custom(|iters| {
                        let mut tm = Times::default();
                        for _ in 0..iters {
                            step(&mut *cache, &mut syn, &mut tm);
                        }
                        Duration::from_secs_f64(tm.total())
                    })
                });
                grp.finish();
            }
            let mut parts: Vec<Times> = Vec::new();
            let c0 = cache.counters();
            // On one thread (pools of one, rayon's and the kernels', whose thread runs the
            // step's parallel work itself), so that its CPU clock measures all of it.
            let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
            let one_k = qaq_kernels::pool::Pool::new(1);
            for _ in 0..steps {
                let mut tm = Times::default();
                one.install(|| qaq_kernels::pool::with_pool(&one_k, || step(&mut *cache, &mut syn, &mut tm)));
                parts.push(tm);
            }
            let c1 = cache.counters();
            let mut walls = Vec::new();
            for _ in 0..steps {
                let mut tm = Times::default();
                step(&mut *cache, &mut syn, &mut tm);
                walls.push(tm.total() * 1e3);
            }
            let moves = (c1.k_up + c1.k_down + c1.v_up + c1.v_down - c0.k_up - c0.k_down - c0.v_up - c0.v_down) as f64
                / steps as f64;
            let kernel = kernel_time(&*cache, &mut syn);
            let m = |f: &dyn Fn(&Times) -> f64| median(parts.iter().map(f).collect()) * 1e3;
            let s = cache.stats();
            let row = format!(
                "SUMMARY decode T={t:5} {policy:>10}: one thread, cpu {:7.2} ms = append {:5.2} + attend {:6.2} (kernel \
{:6.2}, rest {:5.2}) + end_step {:6.2} + stats {:5.2}; {} threads: wall {:7.2} ms; K {:.2} V {:.2} bits, {:.2} MB, \
{:.0} moves/step",
                m(&Times::total_cpu),
                m(&|x| x.cpu[0]),
                m(&|x| x.cpu[1]),
                kernel * 1e3,
                m(&|x| x.cpu[1]) - kernel * 1e3,
                m(&|x| x.cpu[2]),
                m(&|x| x.cpu[3]),
                qaq_kernels::pool::global().threads(),
                median(walls),
                s.k.avg_bits(),
                s.v.avg_bits(),
                s.bytes_used() as f64 / 1e6,
                moves,
            );
            println!("{row}");
            rows.push(row);
            if quick {
                continue;
            }
            // A prefill chunk over the whole context, all layers.
            let tp = {
                let t0 = Instant::now();
                let pos = cache.len(0);
                for layer in 0..CFG.n_layers {
                    let (k, v) = syn.kv(layer, pos, PREFILL_ROWS);
                    cache.append(layer, &k, &v).unwrap();
                    let q: Vec<f32> = (pos..pos + PREFILL_ROWS).flat_map(|p| syn.q(layer, p)).collect();
                    black_box(cache.attend_rows(layer, &q, PREFILL_ROWS).unwrap());
                }
                cache.end_step().unwrap();
                t0.elapsed().as_secs_f64()
            };
            let row = format!(
                "SUMMARY prefill T={t:5} {policy:>10}: chunk of {PREFILL_ROWS} rows (append + attend_rows, 30 layers, \
end_step) {:8.2} ms",
                tp * 1e3
            );
            println!("{row}");
            rows.push(row);
        }
    }
    println!("\n{}", rows.join("\n"));
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! { name = benches; config = config(); targets = bench_decode }
criterion_main!(benches);
