//! Pins what the caches compute on a fixed scenario, bit for bit, so that a change of
//! implementation cannot change a policy's behaviour silently.
//!
//! The scenario ([`run`]) drives one cache through everything the worker and the
//! evaluations do: two multi-row prefill chunks, then 300 decode steps with growing
//! context (append one token per layer, attend one row, end the step), with, now and
//! then, a multi-row chunk in the middle, rows observed instead of attended (a shared
//! prefill), a layer attended "elsewhere" and fed back through
//! [`PolicyCache::observe_window`] (the device tier's path), backup evictions, attention
//! spikes on old tokens (so tokens move up from their backups), snapshots and the
//! rewrite lists a device mirror takes. Every observable of every step (attention
//! outputs, widths of every group, statistics, counters, rewrite lists, snapshots) goes
//! into one FNV-1a hash per policy.
//!
//! The hashes of the portable and AVX2 levels were computed by the implementation before
//! the decode path was made incremental (commit a6e2788: full re-quantization walks,
//! stats walks) and must never change. They depend on the SIMD level only through the
//! attention kernels (the encoders are bit-exact), so each level has its value; a second
//! hash leaves the attention outputs out and pins the decisions alone, which for the
//! policies of fixed widths are the same on every level.

use super::*;
use crate::attention::{KStore, attend_packed};
use crate::simd::{Level, level};

const CFG: CacheConfig = CacheConfig { n_layers: 2, n_kv_heads: 2, n_q_heads: 6, head_dim: 64 };

/// FNV-1a, 64 bits (stable across Rust versions, unlike `DefaultHasher`).
pub(super) struct Fnv(pub u64);

impl Fnv {
    pub fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    pub fn bytes(&mut self, b: &[u8]) {
        for &x in b {
            self.0 ^= x as u64;
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
    pub fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
    pub fn f32s(&mut self, v: &[f32]) {
        for x in v {
            self.bytes(&x.to_bits().to_le_bytes());
        }
    }
}

struct Rng(u64);

impl Rng {
    fn u(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32
    }
    fn n(&mut self) -> f32 {
        (self.u() + self.u() + self.u() + self.u() - 2.0) * 1.732
    }
    fn below(&mut self, n: usize) -> usize {
        ((self.u() * n as f32) as usize).min(n - 1)
    }
}

/// The scenario's data: keys with a few large channels, values, queries with a
/// persistent direction per KV head; every key row kept for the spikes.
struct Data {
    rng: Rng,
    keys: Vec<Vec<f32>>,
    qdir: Vec<f32>,
}

impl Data {
    fn new(seed: u64) -> Self {
        let mut rng = Rng(seed | 1);
        let qdir = (0..CFG.n_layers * CFG.n_kv_heads * CFG.head_dim).map(|_| 1.5 * rng.n()).collect();
        Data { rng, keys: vec![Vec::new(); CFG.n_layers], qdir }
    }
    fn kv(&mut self, layer: usize, n: usize) -> (Vec<f32>, Vec<f32>) {
        let d = CFG.head_dim;
        let (mut k, mut v) = (Vec::new(), Vec::new());
        for _ in 0..n * CFG.n_kv_heads {
            let scale = 0.3 + 1.5 * self.rng.u();
            for c in 0..d {
                k.push(if c % 29 == 3 { 9.0 } else { 0.0 } + scale * self.rng.n());
                v.push(scale * self.rng.n());
            }
        }
        self.keys[layer].extend_from_slice(&k);
        (k, v)
    }
    /// `n` query rows of `layer`; now and then one query head aims at an old token's key
    /// (an attention spike).
    fn q(&mut self, layer: usize, n: usize) -> Vec<f32> {
        let (d, g) = (CFG.head_dim, CFG.group());
        let row = CFG.n_kv_heads * d;
        let mut q = Vec::new();
        for _ in 0..n {
            for qh in 0..CFG.n_q_heads {
                let h = qh / g;
                let spike = self.rng.u() < 0.15;
                let t = self.rng.below(self.keys[layer].len() / row);
                for c in 0..d {
                    let base = self.qdir[(layer * CFG.n_kv_heads + h) * d + c];
                    q.push(if spike { 0.6 * self.keys[layer][t * row + h * d + c] } else { base + 0.8 * self.rng.n() });
                }
            }
        }
        q
    }
}

/// What the scenario hashes: everything (`all`), and apart from it everything but the
/// attention outputs (`decisions`: lengths, widths, rewrite lists, statistics, snapshots),
/// which rounding in the attention kernel must not change.
pub(super) struct Hashes {
    pub all: Fnv,
    pub decisions: Fnv,
}

impl Hashes {
    fn bytes(&mut self, b: &[u8]) {
        self.all.bytes(b);
        self.decisions.bytes(b);
    }
    fn u64(&mut self, v: u64) {
        self.all.u64(v);
        self.decisions.u64(v);
    }
    /// Attention outputs: in `all` only.
    fn f32s(&mut self, v: &[f32]) {
        self.all.f32s(v);
    }
}

/// Hashes every observable of `c` after a step.
fn observe(c: &mut dyn PolicyCache, h: &mut Hashes, snapshot: bool) {
    for layer in 0..CFG.n_layers {
        h.u64(c.len(layer) as u64);
        for kv in 0..CFG.n_kv_heads {
            let (k, v) = c.widths(layer, kv).unwrap();
            h.bytes(&k);
            h.bytes(&v);
            if let Some((ks, vs)) = c.streams(layer, kv) {
                assert_eq!(ks.bytes(), ks.bytes_walk(), "maintained key account");
                assert_eq!(vs.bytes(), vs.bytes_walk(), "maintained value account");
            }
            let [rk, rv] = c.take_rewrites(layer, kv).unwrap();
            for t in rk.iter().chain(&[u32::MAX]).chain(&rv) {
                h.u64(*t as u64);
            }
        }
    }
    h.bytes(format!("{:?}", c.stats()).as_bytes());
    h.u64(c.bytes_used() as u64);
    h.u64(c.fp16_equivalent_bytes() as u64);
    h.u64(c.host_bytes() as u64);
    if snapshot {
        h.bytes(&c.snapshot().unwrap());
    }
}

/// Attends decode row `q` of `layer` "elsewhere" (the kernel over the cache's streams)
/// and feeds the windows back as a device tier does.
fn attend_elsewhere(c: &mut dyn PolicyCache, layer: usize, q: &[f32]) -> Vec<f32> {
    let (d, g) = (CFG.head_dim, CFG.group());
    let qs = c.decode_queries(layer, q).unwrap();
    let t = c.len(layer);
    let mut out = vec![0f32; CFG.n_q_heads * d];
    for h in 0..CFG.n_kv_heads {
        let (ks, vs) = c.streams(layer, h).unwrap();
        let (k, v) = (KStore::Packed(ks.clone()), vs.clone());
        let mut probs = vec![0f32; g * t];
        attend_packed(&k, &v, &qs[h * g * d..(h + 1) * g * d], g, &mut out[h * g * d..(h + 1) * g * d], &mut probs);
        let window: Vec<f32> = (0..t).map(|i| (0..g).map(|j| probs[j * t + i]).fold(0f32, f32::max)).collect();
        c.observe_window(layer, h, &qs[h * g * d..(h + 1) * g * d], &window).unwrap();
    }
    out
}

/// One step of every layer with `n` new tokens; `mode` picks how the rows are attended.
fn step(c: &mut dyn PolicyCache, data: &mut Data, n: usize, mode: usize, h: &mut Hashes) {
    for layer in 0..CFG.n_layers {
        let (k, v) = data.kv(layer, n);
        c.append(layer, &k, &v).unwrap();
        let q = data.q(layer, n);
        match mode {
            // A shared prefill: this cache only observes the rows.
            1 if layer == 1 => c.observe_rows(layer, &q, n).unwrap(),
            2 if layer == 0 && n == 1 && c.streams(layer, 0).is_some() => h.f32s(&attend_elsewhere(c, layer, &q)),
            _ => h.f32s(&c.attend_rows(layer, &q, n).unwrap()),
        }
    }
    c.end_step().unwrap();
}

/// The scenario under `policy`; returns its hashes (all, decisions).
pub(super) fn run(policy: &str, steps: usize) -> (u64, u64) {
    let pol: KvPolicy = policy.parse().unwrap();
    let mut c = new_cache(CFG, pol).unwrap();
    let h = scenario(&mut *c, steps, |_, _| {});
    (h.all.0, h.decisions.0)
}

/// The scenario on `c`, calling `each(step, hash of all so far)` after every step;
/// returns the hashes.
fn scenario(c: &mut dyn PolicyCache, steps: usize, mut each: impl FnMut(usize, u64)) -> Hashes {
    let pol = *c.policy();
    c.track_rewrites();
    let mut data = Data::new(0x5eed);
    let mut h = Hashes { all: Fnv::new(), decisions: Fnv::new() };
    let snapshots = !matches!(pol, KvPolicy::Kivi(_));
    step(c, &mut data, 48, 0, &mut h);
    step(c, &mut data, 16, 0, &mut h);
    observe(c, &mut h, snapshots);
    for s in 0..steps {
        let (n, mode) = match s % 37 {
            11 => (5, 0),
            23 => (7, 1),
            _ if s % 5 == 2 => (1, 1),
            _ if s % 7 == 4 => (1, 2),
            _ => (1, 0),
        };
        step(c, &mut data, n, mode, &mut h);
        if s % 23 == 9 {
            let (freed, evicted) = c.evict_backups(3000);
            h.u64(freed as u64);
            h.u64(evicted);
        }
        observe(c, &mut h, snapshots && s % 40 == 39);
        each(s, h.all.0);
    }
    h
}

/// The policies the scenario pins: QAQ under many parameterisations, and the baselines.
const POLICIES: [&str; 18] = [
    "qaq",
    "qaq-tuned",
    "qaq:bmin=1",
    "qaq:kwin=0",
    "qaq-tuned:sinks=4",
    "qaq:every=2",
    "qaq-tuned:every=3",
    "qaq:down=backup",
    "qaq-ref",
    "qaq:prefill=all",
    "qaq:qnorm=2,window=1",
    "qaq-tuned:kwin=1,ktmax=0,valpha=0",
    "qaq:formula=code,quant=mean,bmax=6",
    "uniform:4",
    "fp16",
    "kivi:16:32",
    "uniform:3+rot",
    "qaq-tuned+rot",
];

fn hashes() -> Vec<(String, (u64, u64))> {
    POLICIES.iter().map(|p| (p.to_string(), run(p, 300))).collect()
}

#[test]
#[ignore = "prints the hashes of the current implementation"]
fn print_pinned_hashes() {
    for (p, (all, decisions)) in hashes() {
        println!("(\"{p}\", {all:#018x}, {decisions:#018x}),");
    }
}

/// The hash of everything the scenario observes, per policy of [`POLICIES`], on the
/// portable level, the AVX2 level, and the AVX-512 level without and with AVX512_VNNI:
/// each level's attention kernels round differently (`simd::x86::attention512` sums in
/// another order, and with VNNI its value tiles round the weights to 16 bits and its
/// scores over quantized keys round the queries to 16 bits; a prefill's multi-row
/// attention takes the vectorized softmax at the AVX-512 level, where its register
/// tiles run), and outputs are hashed bit for bit. The first two columns are the values
/// pinned since commit a6e2788 (before the decode path was made incremental); the VNNI
/// column changed with the integer scores.
const PINNED: [(&str, [u64; 4]); 18] = [
    ("qaq", [0xc000d3a0b9e9dddf, 0x49d07722bf38ea1f, 0xcec2be3fd0414c12, 0x87d5588322424869]),
    ("qaq-tuned", [0xd6de4989efbaa692, 0xedfe6a52f95ea808, 0xb34fd7a9a51c440f, 0xd78b0df8ac4c2d55]),
    ("qaq:bmin=1", [0x1cffc17a21500955, 0x35da7ac58a191e6e, 0xc8fbe9d2a145c9a0, 0x2fe3a76ef8c2d4b8]),
    ("qaq:kwin=0", [0xa2cd8f87c3b18376, 0x6ce4ca38836f392c, 0xcb6613022eb3d122, 0x769f70da2930659a]),
    ("qaq-tuned:sinks=4", [0x67caea338a752ca7, 0xb697ba2c0a479099, 0xeac7acecaffadd06, 0xc8d1fc6550cd8c5c]),
    ("qaq:every=2", [0x23e3433af120f526, 0x06900fa795d051bb, 0x81462dcfe67cc35a, 0xee33ea73e311cfdd]),
    ("qaq-tuned:every=3", [0xec0deb18d4965ffb, 0x782fa2c655f7d968, 0x9b1e1c1589712125, 0x06dfe01eb3d5cebc]),
    ("qaq:down=backup", [0xf239ef04e727ba4c, 0x3030ddf563341dde, 0xf8d7f053ecf0c2e1, 0xc3798dd73a1d6c40]),
    ("qaq-ref", [0x8abb428613e58f6f, 0x58f647510b0c2849, 0x01120a46beba9422, 0x76b5ee7623fcc983]),
    ("qaq:prefill=all", [0xbab1aa784afc43a9, 0x6ea857554cafa102, 0x08e85321c2a48986, 0x18062592eaf0ed3c]),
    ("qaq:qnorm=2,window=1", [0xc6ceec817054e847, 0xa646b010a47df143, 0x1edc24d5ea770e2b, 0xdba907cb4a8da2f2]),
    (
        "qaq-tuned:kwin=1,ktmax=0,valpha=0",
        [0x3ae123c824b00917, 0x034b73dfe9f80687, 0x1c2ae976ef6315e8, 0xedc2369399e51c0b],
    ),
    (
        "qaq:formula=code,quant=mean,bmax=6",
        [0x19ef84812dd7c2c5, 0xa1078df3cd006c0e, 0x77bf409727480282, 0x55dd5ff1a9b6db3e],
    ),
    ("uniform:4", [0x17b03f0e54be5e97, 0xd1073d001c4cebca, 0x97059fe08a8d21e5, 0x817cfe6adbee1922]),
    ("fp16", [0x80072ed7335534ea, 0xcc74b898c8443d09, 0x856dfbe7049533b7, 0x856dfbe7049533b7]),
    ("kivi:16:32", [0x84ccb871d56893fc, 0x04021ed6f6cac66a, 0x9f87eaa5b82e1b83, 0xb101be609baec24c]),
    ("uniform:3+rot", [0x252d506dc59044c2, 0x4a3cd7979beed1aa, 0x77301fa3338a024c, 0xc8166f5faf4c6470]),
    ("qaq-tuned+rot", [0x1cfa7962947122eb, 0x176051a587dd4218, 0xbfa83d83702ee318, 0xfaab84ab40e1097a]),
];

/// The hash of the decisions alone (everything but the attention outputs: widths,
/// rewrite lists, statistics, snapshots), in the columns of [`PINNED`] (VNNI's integer
/// scores change the probabilities the widths follow). The policies with fixed widths
/// decide the same on every level; QAQ's widths follow the attention probabilities, and
/// a last-bit difference in a probability can move a token across a width boundary.
const DECISIONS: [(&str, [u64; 4]); 18] = [
    ("qaq", [0xf027450d4d6c3857, 0xa1f004f8a7bef5ab, 0x3c7bd356558b00b9, 0x75fd1ee9024c9741]),
    ("qaq-tuned", [0x7a44aac5d0e160ab, 0xbd3e4085ef8da6ea, 0xaf70ee115da736ed, 0x752399a9722d6d04]),
    ("qaq:bmin=1", [0x6f5acd8400af0c19, 0x992a50d56b353a79, 0x863f1354d7d3bf3b, 0x6eca1534a8e14dd3]),
    ("qaq:kwin=0", [0x3368effeafa0b062, 0xdf3395a8a4a66d51, 0x52adb0bb98392b83, 0x3a90a328611156b1]),
    ("qaq-tuned:sinks=4", [0x8bb2abb577cb860f, 0x5ae340b4fe9e93f3, 0x04a2f46c90556287, 0xa785dc2eb5bb0de8]),
    ("qaq:every=2", [0x96817c04d46d6c72, 0xdae3d8d0f105f14e, 0xd5ec9c333f2cd7dc, 0xf3797d49abb8a13f]),
    ("qaq-tuned:every=3", [0xa041b1339ecdf48f, 0x5c2fbe512a2dc274, 0xf33fb9fa5de64c82, 0x2d5322b1f68b1e01]),
    ("qaq:down=backup", [0xd55390be89cd3ab0, 0xc281b11e5c8a7bb0, 0x9afd713b41389dae, 0x6fad5f7b3a98d0ac]),
    ("qaq-ref", [0x597d9a3614a5c4e4, 0x3ec352b50f06f817, 0xc3af6d581486e7f9, 0x583ccd21b39f91b1]),
    ("qaq:prefill=all", [0xadf3141da6379319, 0x3b34bbb48e82b58b, 0x06dfe98d90dff5f3, 0xc8e41a0fcae42141]),
    ("qaq:qnorm=2,window=1", [0x88f9560dbcf51659, 0x641cf08835df864b, 0x9050f0598e3693fc, 0x121cfa1d318f29fd]),
    (
        "qaq-tuned:kwin=1,ktmax=0,valpha=0",
        [0xbe323d270d866d88, 0x38285556987b8d4d, 0x991a58dac09ad92d, 0x299e4143178df9be],
    ),
    (
        "qaq:formula=code,quant=mean,bmax=6",
        [0xcb5c6da360b2b709, 0x39690087f7830195, 0xb163578371de8fed, 0x51434660e4d732af],
    ),
    ("uniform:4", [0x86affa33be49e77c, 0x86affa33be49e77c, 0x86affa33be49e77c, 0x86affa33be49e77c]),
    ("fp16", [0x67f405e225595e93, 0x67f405e225595e93, 0x67f405e225595e93, 0x67f405e225595e93]),
    ("kivi:16:32", [0x94a85b7833a6f424, 0x94a85b7833a6f424, 0x94a85b7833a6f424, 0x94a85b7833a6f424]),
    ("uniform:3+rot", [0xc89b9b626edc0d9c, 0xc89b9b626edc0d9c, 0xc89b9b626edc0d9c, 0xc89b9b626edc0d9c]),
    ("qaq-tuned+rot", [0x322d260985baff0e, 0xe44dbe8b5b6d9a35, 0xeeb9138b8455768c, 0xcd56371e08316969]),
];

/// The column of [`PINNED`] for this process's level.
fn level_column() -> usize {
    match (level(), crate::simd::vnni()) {
        (Level::Scalar, _) => 0,
        (Level::Avx2, _) => 1,
        (Level::Avx512, false) => 2,
        (Level::Avx512, true) => 3,
    }
}

#[test]
fn every_policy_computes_exactly_what_it_always_computed() {
    let col = level_column();
    let got = hashes();
    let mut bad = Vec::new();
    for (((p, (all, decisions)), (q, pinned)), (r, decided)) in got.iter().zip(PINNED).zip(DECISIONS) {
        assert!(p == q && p == r);
        if *decisions != decided[col] {
            bad.push(format!("{p}: decisions {decisions:#018x}, pinned {:#018x}", decided[col]));
        }
        if *all != pinned[col] {
            bad.push(format!("{p}: {all:#018x}, pinned {:#018x}", pinned[col]));
        }
    }
    assert!(bad.is_empty(), "behaviour changed (level {:?}, column {col}):\n{}", level(), bad.join("\n"));
    // The table itself: only QAQ's decisions may depend on the level.
    for (p, d) in DECISIONS {
        assert!(p.starts_with("qaq") || d.iter().all(|&x| x == d[0]), "{p}: decisions pinned per level");
    }
}

/// The same scenario, step by step, on a cache that re-quantizes from the plans its
/// attention makes and on one that evaluates every token at every step's end (the
/// implementation before the plans): the same hash after every step, for every QAQ
/// parameterisation, with most re-quantizations running from a plan.
#[test]
fn planned_requantization_decides_exactly_as_evaluating_every_token() {
    for policy in POLICIES {
        let KvPolicy::Qaq(p) = policy.parse::<KvPolicy>().unwrap() else { continue };
        let mut reference = Vec::new();
        let mut full = QaqCache::new(CFG, p).unwrap().without_plans();
        scenario(&mut full, 300, |_, h| reference.push(h));
        let mut fast = QaqCache::new(CFG, p).unwrap();
        scenario(&mut fast, 300, |s, h| assert_eq!(h, reference[s], "{policy}: first difference after step {s}"));
        let [planned, evaluated] = fast.paths();
        assert_eq!(full.paths()[0], 0);
        assert!(planned > 2 * evaluated, "{policy}: {planned} planned, {evaluated} evaluated");
    }
}

/// `f` with `n` threads for the caches' parallel loops: the kernels' pool (decode
/// attention) and rayon's (re-quantization, multi-row attention).
fn on_threads<R: Send>(n: usize, f: impl FnOnce() -> R + Send) -> R {
    let pool = crate::pool::Pool::new(n);
    rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap().install(|| crate::pool::with_pool(&pool, f))
}

/// A step computes the same whatever the number of threads its attention runs on.
#[test]
fn the_results_do_not_depend_on_the_thread_count() {
    for policy in ["qaq-tuned", "qaq:every=2", "fp16"] {
        let hashes: Vec<(u64, u64)> = [1, 2, 3].iter().map(|&n| on_threads(n, || run(policy, 120))).collect();
        assert!(hashes.iter().all(|&h| h == hashes[0]), "{policy}: {hashes:x?}");
    }
}

/// From 1,024 tokens on, a head's decode attention runs in runs of 1,024 tokens, whose
/// weighted values are added in order: on a 2,650-token context the outputs do not
/// depend on the thread count, and (fixed widths) they are the attention over the whole
/// streams at once to float rounding (1e-4 relative).
#[test]
fn long_context_decode_runs_do_not_change_the_result() {
    let (d, g) = (CFG.head_dim, CFG.group());
    for policy in ["fp16", "uniform:4", "qaq-tuned", "kivi:16:32"] {
        let run = || {
            let mut c = new_cache(CFG, policy.parse().unwrap()).unwrap();
            let mut data = Data::new(0x10c);
            let mut h = Hashes { all: Fnv::new(), decisions: Fnv::new() };
            for n in [512, 512, 512, 512, 512, 89] {
                step(&mut *c, &mut data, n, 0, &mut h);
            }
            let mut outs = Vec::new();
            for _ in 0..3 {
                for layer in 0..CFG.n_layers {
                    let (k, v) = data.kv(layer, 1);
                    c.append(layer, &k, &v).unwrap();
                    let q = data.q(layer, 1);
                    // The whole streams at once, where the widths do not follow attention.
                    let reference = (!policy.starts_with("qaq")).then(|| {
                        let qs = c.decode_queries(layer, &q).unwrap();
                        let t = c.len(layer);
                        assert!(t > 2048);
                        let mut out = vec![0f32; CFG.n_q_heads * d];
                        for kv in 0..CFG.n_kv_heads {
                            let (ks, vs) = c.streams(layer, kv)?;
                            let (k, v) = (KStore::Packed(ks.clone()), vs.clone());
                            let mut probs = vec![0f32; g * t];
                            let o = &mut out[kv * g * d..(kv + 1) * g * d];
                            attend_packed(&k, &v, &qs[kv * g * d..(kv + 1) * g * d], g, o, &mut probs);
                        }
                        Some(out)
                    });
                    let got = c.attend_rows(layer, &q, 1).unwrap();
                    if let Some(Some(r)) = reference {
                        let norm = r.iter().map(|x| x * x).sum::<f32>().sqrt();
                        let diff = got.iter().zip(&r).map(|(a, b)| (a - b) * (a - b)).sum::<f32>().sqrt();
                        // (Measured: 1.0e-6 for fp16 at every level, 1.05e-5 for
                        // `uniform:4` at the scalar and AVX2 levels; a wrong run would be
                        // off by the order of 1.)
                        assert!(diff <= 1e-4 * norm, "{policy}: rel {}", diff / norm);
                    }
                    outs.push(got);
                }
                c.end_step().unwrap();
            }
            outs
        };
        let by_threads: Vec<Vec<Vec<f32>>> = [1, 2, 3].iter().map(|&n| on_threads(n, run)).collect();
        assert!(by_threads.iter().all(|o| *o == by_threads[0]), "{policy}: outputs depend on the thread count");
    }
}
