//! [`Layers`]: the storage and attention every policy's cache shares. Per layer, one
//! [`Head`] per KV head (its key store and packed value stream), the token count, and
//! the fp16 rows appended since the last step ended (what multi-row attention reads
//! exactly); per cache, the shape and the step count. Each idea has one implementation
//! here: appending rows (rounded to fp16, batch-encoded for a prefill), decode attention
//! over the packed streams, exact causal attention of several rows, widths,
//! dequantization and byte accounting. What a policy adds (QAQ's windows, ||Q||^2
//! tracker, key scales, backups) comes in through [`RowObserver`] and the callbacks.

use std::borrow::Cow;
use std::ops::Range;

use super::rotation::Rotation;
use super::types::{Attention, CacheConfig, CacheStats, Counters};
use crate::attention::{self, KStore};
use crate::base::{QuantSpec, RAW, check_finite};
use crate::error::{KernelError, Result};
use crate::pool::{self, Pool};
use crate::quant;
use crate::simd;
use crate::store::{BLOCK_TOKENS, PackedStream};
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;
use std::sync::Mutex;

/// The storage of one KV head in one layer.
#[derive(Clone, Debug)]
pub(crate) struct Head {
    /// Keys.
    pub k: KStore,
    /// Values.
    pub v: PackedStream,
}

/// One layer.
#[derive(Clone, Debug)]
pub(crate) struct Layer {
    pub heads: Vec<Head>,
    /// Tokens stored.
    pub len: usize,
    /// First token of the rows in `staged_k` / `staged_v`.
    pub staged_from: usize,
    /// The fp16 K and V rows appended since the last [`Layers::end_step`].
    pub staged_k: Vec<f16>,
    pub staged_v: Vec<f16>,
}

/// The layers of one sequence's cache.
pub struct Layers {
    pub(crate) cfg: CacheConfig,
    pub(crate) layers: Vec<Layer>,
    /// Steps ended.
    pub(crate) step: u64,
    /// The probabilities of the last decode attention whose caller did not want them
    /// (kept, so that a decode step allocates nothing that grows with the context).
    pub(crate) scratch: Vec<f32>,
    /// The buffers of multi-row attention.
    dense: Dense,
    /// Keys, values and queries rotated (a policy's `+rot`).
    pub(crate) rotation: Option<Rotation>,
}

/// Contexts from which decode attention runs a layer's KV heads in parallel (below, a
/// fork-join costs more than it saves).
const PAR_MIN_TOKENS: usize = 256;

/// Blocks per task of a long context's decode attention ([`Layers::attend_parallel`]):
/// 1,024 tokens. The results depend on it (a head's values are summed run by run),
/// not on the number of threads.
const RUN_BLOCKS: usize = 1024 / BLOCK_TOKENS;

/// The runs of [`RUN_BLOCKS`] blocks of `s`: their blocks and their tokens.
fn runs(s: &PackedStream) -> Vec<(Range<usize>, Range<usize>)> {
    let mut t0 = 0;
    (0..s.blocks().len().max(1))
        .step_by(RUN_BLOCKS)
        .map(|b0| {
            let blocks = b0..(b0 + RUN_BLOCKS).min(s.blocks().len());
            let n: usize = s.blocks()[blocks.clone()].iter().map(|b| b.len()).sum();
            t0 += n;
            (blocks, t0 - n..t0)
        })
        .collect()
}

/// A task's own lock (never contended; a panicked task's data is still its own).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The columns `runs[i].1` of each of the rows of length `t` in `rows`, per run: the
/// parts of the rows that each run's task writes.
fn columns<'a>(rows: &'a mut [f32], t: usize, runs: &[(Range<usize>, Range<usize>)]) -> Vec<Vec<&'a mut [f32]>> {
    let mut cols: Vec<Vec<&mut [f32]>> = runs.iter().map(|_| Vec::new()).collect();
    for row in rows.chunks_exact_mut(t) {
        let mut rest = row;
        for (c, (_, tokens)) in cols.iter_mut().zip(runs) {
            let (mine, tail) = std::mem::take(&mut rest).split_at_mut(tokens.len());
            c.push(mine);
            rest = tail;
        }
    }
    cols
}

/// Rows of a multi-row attention computed together (in parallel) before the policy
/// sees them.
const ROW_BATCH: usize = 32;

/// Rows of a batch attended by one task (their loads of keys and values shared).
const TASK_ROWS: usize = 8;

/// The buffers of a multi-row attention, kept from one call to the next (a prefill
/// attends chunk after chunk): one KV head's dequantized keys and values, a batch of
/// rows' probabilities and prepared queries.
#[derive(Default)]
pub(crate) struct Dense {
    k: Vec<f32>,
    v: Vec<f32>,
    probs: Vec<f32>,
    qs: Vec<f32>,
}

/// Dequantizes tokens `0..n` of `k` into `out` (`n * d`), block by block, the blocks in
/// parallel.
fn decode_all(k: &KStore, n: usize, out: &mut [f32]) {
    match k {
        KStore::Packed(s) => decode_stream(s, out),
        KStore::Kivi(kk) => {
            let d = out.len() / n.max(1);
            for (t, o) in out.chunks_exact_mut(d.max(1)).take(n).enumerate() {
                kk.decode(t, o);
            }
        }
    }
}

/// [`decode_all`] of a packed stream: its first `out.len() / d` tokens.
fn decode_stream(s: &PackedStream, out: &mut [f32]) {
    let (d, scheme) = (s.d(), s.spec().scheme);
    s.blocks().par_iter().zip(out.par_chunks_mut(BLOCK_TOKENS * d)).for_each(|(b, o)| {
        b.for_each(d, |i, g| {
            if let Some(o) = o.get_mut(i * d..(i + 1) * d) {
                quant::decode_group(&g.meta, scheme, g.codes, g.out_idx, g.out_val, o);
            }
        });
    });
}

/// Re-encodes groups `tokens` of `s` at `bits` from their decoded values, block by
/// block.
fn reencode_stream(s: &mut PackedStream, tokens: Range<usize>, bits: u8) -> Result<()> {
    let spec = *s.spec();
    let mut tmp = vec![0f32; s.d()];
    let mut t = tokens.start;
    while t < tokens.end.min(s.len()) {
        let b0 = t / BLOCK_TOKENS * BLOCK_TOKENS;
        let end = tokens.end.min(b0 + BLOCK_TOKENS);
        let selected: [bool; BLOCK_TOKENS] = std::array::from_fn(|i| (t..end).contains(&(b0 + i)));
        s.rewrite_groups(t / BLOCK_TOKENS, Some(&selected), |_, g, sink| {
            quant::decode_group(&g.meta, spec.scheme, g.codes, g.out_idx, g.out_val, &mut tmp);
            quant::encode_group(&tmp, bits, &spec, sink.codes, sink.out_idx, sink.out_val).map(Some)
        })?;
        t = end;
    }
    Ok(())
}

impl std::fmt::Debug for Layers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Layers").field("cfg", &self.cfg).field("step", &self.step).finish_non_exhaustive()
    }
}

/// What a policy does with the rows of a multi-row attention ([`Layers::rows`]) beyond
/// the output; the default does nothing (the baselines).
pub(crate) trait RowObserver {
    /// Prepares KV head `h`'s queries (already scaled by `1/sqrt(D)`) for attention.
    fn queries(&self, _h: usize, _qs: &mut [f32]) {}
    /// Whether row `r` of `n_q` needs its probabilities even when the output is not
    /// wanted.
    fn needs(&self, _r: usize, _n_q: usize) -> bool {
        false
    }
    /// Before the rows of KV head `h`, over `t_total` tokens.
    fn head(&mut self, _h: usize, _t_total: usize) {}
    /// After row `r` of `n_q` of KV head `h`: its prepared queries and its `g * tv`
    /// probabilities (computed when the output is wanted or [`RowObserver::needs`]).
    fn row(&mut self, _h: usize, _r: usize, _n_q: usize, _qs: &[f32], _probs: &mut [f32], _tv: usize) {}
}

impl RowObserver for () {}

fn to_f16_checked(x: &[f32], what: &'static str) -> Result<Vec<f16>> {
    let h: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
    if h.iter().all(|v| v.is_finite()) { Ok(h) } else { Err(KernelError::NonFinite { what }) }
}

impl Layers {
    /// Empty layers of shape `cfg` (validated by the caller), each KV head's keys made
    /// by `keys` and its values in a stream of groups under `vspec` (`v_raw_only`: raw
    /// fp16 groups only, see [`PackedStream::new`]).
    pub(crate) fn new(cfg: CacheConfig, keys: impl Fn() -> KStore, vspec: QuantSpec, v_raw_only: bool) -> Self {
        let layer = Layer {
            heads: (0..cfg.n_kv_heads)
                .map(|_| Head { k: keys(), v: PackedStream::new(cfg.head_dim, vspec, v_raw_only) })
                .collect(),
            len: 0,
            staged_from: 0,
            staged_k: Vec::new(),
            staged_v: Vec::new(),
        };
        Layers {
            cfg,
            layers: vec![layer; cfg.n_layers],
            step: 0,
            scratch: Vec::new(),
            dense: Dense::default(),
            rotation: None,
        }
    }

    /// These layers storing keys and values rotated when `rotate` (errors for a head size
    /// the rotation does not support).
    pub(crate) fn rotated(mut self, rotate: bool) -> Result<Self> {
        self.rotation = if rotate { Some(Rotation::new(self.cfg.head_dim)?) } else { None };
        Ok(self)
    }

    /// `rows` as the cache stores them: rotated when the policy says so (every head of
    /// every row), else as given.
    pub(crate) fn stored_form<'a>(&self, rows: &'a [f32]) -> Cow<'a, [f32]> {
        match &self.rotation {
            Some(r) => Cow::Owned(r.rotated(rows)),
            None => Cow::Borrowed(rows),
        }
    }

    /// Shape.
    pub(crate) fn config(&self) -> &CacheConfig {
        &self.cfg
    }
    /// Tokens stored in `layer` (0 for a bad layer).
    pub(crate) fn len(&self, layer: usize) -> usize {
        self.layers.get(layer).map_or(0, |l| l.len)
    }
    /// KV head `h` of `layer`.
    pub(crate) fn head(&self, layer: usize, h: usize) -> Option<&Head> {
        self.layers.get(layer)?.heads.get(h)
    }

    pub(crate) fn check_layer(&self, layer: usize) -> Result<()> {
        if layer < self.layers.len() { Ok(()) } else { Err(KernelError::Layer { layer, n_layers: self.layers.len() }) }
    }

    /// Checks an append's layer and row shapes.
    pub(crate) fn check_rows(&self, layer: usize, k_rows: &[f32], v_rows: &[f32]) -> Result<()> {
        self.check_layer(layer)?;
        let row = self.cfg.row();
        if !k_rows.len().is_multiple_of(row) || k_rows.len() != v_rows.len() {
            return Err(KernelError::Shape {
                what: "k_rows/v_rows",
                expected: row,
                got: k_rows.len().max(v_rows.len()),
            });
        }
        Ok(())
    }

    /// Appends `n` tokens' K and V rows (checked by [`Layers::check_rows`]) to `layer`,
    /// rounded to fp16, keys at width `kb` and values at `vb` (raw for a KIVI key store),
    /// and calls `stored(token, k_row, v_row)` with each token's fp16 rows once it is
    /// stored. Non-finite or out-of-f16-range values are an error and change nothing.
    pub(crate) fn push_rows(
        &mut self,
        layer: usize,
        k_rows: &[f32],
        v_rows: &[f32],
        (kb, vb): (u8, u8),
        stored: impl FnMut(usize, &[f16], &[f16]),
    ) -> Result<()> {
        let kh = to_f16_checked(k_rows, "k_rows")?;
        let vh = to_f16_checked(v_rows, "v_rows")?;
        self.push_f16(layer, &kh, &vh, (kb, vb), stored)
    }

    /// [`Layers::push_rows`] of rows already rounded to fp16 (and checked finite).
    fn push_f16(
        &mut self,
        layer: usize,
        kh: &[f16],
        vh: &[f16],
        (kb, vb): (u8, u8),
        mut stored: impl FnMut(usize, &[f16], &[f16]),
    ) -> Result<()> {
        let (row, d) = (self.cfg.row(), self.cfg.head_dim);
        let l = &mut self.layers[layer];
        let n_tok = kh.len() / row;
        // One batch encode per head and stream, from the f16 rows (a decode token's head
        // is a slice of its row; a prefill's heads are gathered). Only where no encode
        // can fail (finite f16 input: widths >= 1 or raw), so the result is the same as
        // the token-by-token loop below, errors included.
        let batched = n_tok > 0 && kb != 0 && vb != 0 && l.heads.iter().all(|hd| matches!(hd.k, KStore::Packed(_)));
        if batched {
            let (mut kbuf, mut vbuf) = (Vec::new(), Vec::new());
            for (h, hd) in l.heads.iter_mut().enumerate() {
                let (kg, vg): (&[f16], &[f16]) = if n_tok == 1 {
                    (&kh[h * d..(h + 1) * d], &vh[h * d..(h + 1) * d])
                } else {
                    kbuf.resize(n_tok * d, f16::ZERO);
                    vbuf.resize(n_tok * d, f16::ZERO);
                    for (t, (kr, vr)) in kh.chunks_exact(row).zip(vh.chunks_exact(row)).enumerate() {
                        kbuf[t * d..(t + 1) * d].copy_from_slice(&kr[h * d..(h + 1) * d]);
                        vbuf[t * d..(t + 1) * d].copy_from_slice(&vr[h * d..(h + 1) * d]);
                    }
                    (&kbuf, &vbuf)
                };
                if let KStore::Packed(s) = &mut hd.k {
                    s.push_many_f16(kg, kb)?;
                }
                hd.v.push_many_f16(vg, vb)?;
            }
            for (t, (kr, vr)) in kh.chunks_exact(row).zip(vh.chunks_exact(row)).enumerate() {
                stored(l.len + t, kr, vr);
            }
            l.len += n_tok;
        }
        let per_token = if batched { 0 } else { n_tok };
        let (mut kf, mut vf) = if batched { (Vec::new(), Vec::new()) } else { (vec![0f32; row], vec![0f32; row]) };
        for (kr, vr) in kh.chunks_exact(row).zip(vh.chunks_exact(row)).take(per_token) {
            kr.convert_to_f32_slice(&mut kf);
            vr.convert_to_f32_slice(&mut vf);
            for (h, hd) in l.heads.iter_mut().enumerate() {
                let ks = &kf[h * d..(h + 1) * d];
                match &mut hd.k {
                    KStore::Packed(s) => s.push(ks, kb)?,
                    KStore::Kivi(s) => s.push(ks)?,
                }
                hd.v.push(&vf[h * d..(h + 1) * d], vb)?;
            }
            stored(l.len, kr, vr);
            l.len += 1;
        }
        l.staged_k.extend_from_slice(kh);
        l.staged_v.extend_from_slice(vh);
        Ok(())
    }

    /// [`Layers::append`] with widths per run of tokens: `runs` are (tokens, (key
    /// width, value width)) in order and cover the rows. All or nothing, like `append`.
    pub(crate) fn append_runs(
        &mut self,
        layer: usize,
        k_rows: &[f32],
        v_rows: &[f32],
        runs: &[(usize, (u8, u8))],
    ) -> Result<()> {
        self.check_rows(layer, k_rows, v_rows)?;
        let row = self.cfg.row();
        let n: usize = runs.iter().map(|r| r.0).sum();
        if n * row != k_rows.len() {
            return Err(KernelError::Shape { what: "k_rows (runs)", expected: n * row, got: k_rows.len() });
        }
        let kh = to_f16_checked(&self.stored_form(k_rows), "k_rows")?;
        let vh = to_f16_checked(&self.stored_form(v_rows), "v_rows")?;
        let mut at = 0;
        for &(n, widths) in runs.iter().filter(|r| r.0 > 0) {
            let (k, v) = (&kh[at * row..(at + n) * row], &vh[at * row..(at + n) * row]);
            self.push_f16(layer, k, v, widths, |_, _, _| {})?;
            at += n;
        }
        Ok(())
    }

    /// Re-encodes tokens `tokens` of `layer`, every KV head, from their decoded values:
    /// packed keys at `kb` (`None`: keys untouched), values at `vb`. A raw fp16 group
    /// re-encoded this way gets exactly the codes an append at that width gives.
    pub(crate) fn reencode(&mut self, layer: usize, tokens: Range<usize>, kb: Option<u8>, vb: u8) -> Result<()> {
        for hd in &mut self.layers[layer].heads {
            if let (Some(kb), KStore::Packed(s)) = (kb, &mut hd.k) {
                reencode_stream(s, tokens.clone(), kb)?;
            }
            reencode_stream(&mut hd.v, tokens.clone(), vb)?;
        }
        Ok(())
    }

    /// [`Layers::check_rows`] then [`Layers::push_rows`], with nothing to do per token
    /// (the baselines' append).
    pub(crate) fn append(&mut self, layer: usize, k_rows: &[f32], v_rows: &[f32], widths: (u8, u8)) -> Result<()> {
        self.check_rows(layer, k_rows, v_rows)?;
        let (k_rows, v_rows) = (self.stored_form(k_rows), self.stored_form(v_rows));
        self.push_rows(layer, &k_rows, &v_rows, widths, |_, _, _| {})
    }

    /// A decode query (`n_q_heads * head_dim`) checked and scaled by `1/sqrt(D)`, in
    /// KV-head order (the `g` query heads of KV head `h` at `h * g * D`).
    pub(crate) fn decode_queries(&self, layer: usize, q: &[f32]) -> Result<Vec<f32>> {
        self.check_layer(layer)?;
        let (d, nq) = (self.cfg.head_dim, self.cfg.n_q_heads);
        if q.len() != nq * d {
            return Err(KernelError::Shape { what: "q", expected: nq * d, got: q.len() });
        }
        check_finite(q, "q")?;
        if self.layers[layer].len == 0 {
            return Err(KernelError::Config("attend on an empty layer".into()));
        }
        let scale = 1.0 / (d as f32).sqrt();
        let mut qs: Vec<f32> = q.iter().map(|x| x * scale).collect();
        if let Some(r) = &self.rotation {
            r.rotate(&mut qs);
        }
        Ok(qs)
    }

    /// Attention of prepared decode queries ([`Layers::decode_queries`], then the
    /// policy's preparation) over the packed cache of `layer`, with its probabilities.
    pub(crate) fn attend(&self, layer: usize, qs: &[f32]) -> Attention {
        let (d, nq, t) = (self.cfg.head_dim, self.cfg.n_q_heads, self.layers[layer].len);
        let mut output = vec![0f32; nq * d];
        let mut probs = vec![0f32; nq * t];
        let mut none = vec![(); self.cfg.n_kv_heads];
        self.attend_with(layer, qs, &mut output, &mut probs, &mut none, |_, _, _, _| {});
        Attention { output, probs }
    }

    /// [`Layers::attend`]'s output alone (its probabilities go to the scratch buffer).
    pub(crate) fn attend_output(&mut self, layer: usize, qs: &[f32]) -> Vec<f32> {
        let (d, nq, t) = (self.cfg.head_dim, self.cfg.n_q_heads, self.layers[layer].len);
        let mut output = vec![0f32; nq * d];
        let mut probs = std::mem::take(&mut self.scratch);
        probs.resize(nq * t, 0.0);
        let mut none = vec![(); self.cfg.n_kv_heads];
        self.attend_with(layer, qs, &mut output, &mut probs, &mut none, |_, _, _, _| {});
        self.scratch = probs;
        output
    }

    /// Decode attention of `layer` (prepared queries `qs`): KV head `h`'s outputs into
    /// `out[h * g * d..]` and its probabilities into `probs[h * g * T..]` (`probs` holds
    /// at least `n_q_heads * T`), and `post(h, head, its probabilities, &mut states[h])`
    /// (`states`: one per KV head) once they are known.
    ///
    /// From [`PAR_MIN_TOKENS`] tokens on, on the kernels' current pool
    /// ([`Layers::attend_parallel`]); below, one head after the other on this thread
    /// ([`attention::attend_packed`]).
    pub(crate) fn attend_with<S: Send>(
        &self,
        layer: usize,
        qs: &[f32],
        out: &mut [f32],
        probs: &mut [f32],
        states: &mut [S],
        post: impl Fn(usize, &Head, &[f32], &mut S) + Sync,
    ) {
        let (d, g) = (self.cfg.head_dim, self.cfg.group());
        let l = &self.layers[layer];
        let t = l.len;
        assert!(
            states.len() == l.heads.len() && out.len() >= l.heads.len() * g * d && probs.len() >= l.heads.len() * g * t
        );
        if t >= PAR_MIN_TOKENS {
            pool::with_current(|pool| self.attend_parallel(pool, layer, qs, out, probs, states, &post));
        } else {
            let one = |h: usize, hd: &Head, o: &mut [f32], p: &mut [f32], s: &mut S| {
                attention::attend_packed(&hd.k, &hd.v, &qs[h * g * d..(h + 1) * g * d], g, o, p);
                post(h, hd, p, s);
            };
            for (h, (hd, s)) in l.heads.iter().zip(states.iter_mut()).enumerate() {
                one(h, hd, &mut out[h * g * d..(h + 1) * g * d], &mut probs[h * g * t..(h + 1) * g * t], s);
            }
        }
        if let Some(r) = &self.rotation {
            r.unrotate(&mut out[..l.heads.len() * g * d]);
        }
    }

    /// [`Layers::attend_with`] on `pool`, in three rounds of tasks, so that the cores
    /// share a layer's few KV heads evenly at any context: the scores of each run of
    /// [`RUN_BLOCKS`] blocks of each head's keys; each query row's softmax; `post` for each
    /// head and the weighted values of each run of its values, whose outputs are then
    /// added in the runs' order. Each head's results are the same whichever threads
    /// compute them and however many there are; up to one run they are those of
    /// [`attention::attend_packed`]. The kernels' pool rather than rayon's: its workers
    /// stay awake between the step's matmuls and these short rounds, so that a round
    /// costs microseconds where rayon's fork-join cost as much as the second core gave.
    #[allow(clippy::too_many_arguments)]
    fn attend_parallel<S: Send>(
        &self,
        pool: &Pool,
        layer: usize,
        qs: &[f32],
        out: &mut [f32],
        probs: &mut [f32],
        states: &mut [S],
        post: &(impl Fn(usize, &Head, &[f32], &mut S) + Sync),
    ) {
        let (d, g) = (self.cfg.head_dim, self.cfg.group());
        let l = &self.layers[layer];
        let (t, nh) = (l.len, l.heads.len());
        let query = |h: usize| &qs[h * g * d..(h + 1) * g * d];
        // Scores: a task per run of a head's packed keys (the whole head for KIVI keys).
        enum Scores<'a> {
            Whole(usize, &'a KStore, &'a mut [f32]),
            Run(usize, &'a PackedStream, Range<usize>, usize, Vec<&'a mut [f32]>),
        }
        let mut tasks = Vec::new();
        for (h, (hd, p)) in l.heads.iter().zip(probs.chunks_mut(g * t)).enumerate() {
            let key_runs = match &hd.k {
                KStore::Packed(ks) => runs(ks),
                KStore::Kivi(_) => Vec::new(),
            };
            match &hd.k {
                KStore::Packed(ks) if key_runs.len() > 1 => {
                    let cols = columns(&mut p[..g * t], t, &key_runs);
                    for ((blocks, tokens), cols) in key_runs.into_iter().zip(cols) {
                        tasks.push(Mutex::new(Scores::Run(h, ks, blocks, tokens.len(), cols)));
                    }
                }
                k => tasks.push(Mutex::new(Scores::Whole(h, k, p))),
            }
        }
        pool.parallel_for(tasks.len(), &|i| match &mut *lock(&tasks[i]) {
            Scores::Whole(h, KStore::Packed(ks), p) => {
                attention::block_scores(ks, 0..ks.blocks().len(), query(*h), g, p)
            }
            Scores::Whole(h, KStore::Kivi(kk), p) => kk.scores(query(*h), g, p),
            Scores::Run(h, ks, blocks, n, cols) => {
                let mut sc = vec![0f32; g * *n];
                attention::block_scores(ks, blocks.clone(), query(*h), g, &mut sc);
                for (c, r) in cols.iter_mut().zip(sc.chunks_exact(*n)) {
                    c.copy_from_slice(r);
                }
            }
        });
        drop(tasks);
        // Softmax: a task per query row (rows are independent; as many tasks as heads
        // would leave a core idle for a head's softmax with 3 heads on 2 cores).
        let rows: Vec<Mutex<&mut [f32]>> = probs.chunks_mut(t).take(nh * g).map(Mutex::new).collect();
        pool.parallel_for(nh * g, &|r| simd::softmax_rows(&mut lock(&rows[r])[..], 1, t));
        drop(rows);
        // `post` per head, and the values: a task per run of a head's values (the head's
        // output itself for one run, else the run's own part).
        let probs: &[f32] = probs;
        let head_probs = |h: usize| &probs[h * g * t..(h + 1) * g * t];
        enum Values<'a, S> {
            Post(usize, &'a mut S),
            Whole(usize, &'a mut [f32]),
            Run(usize, Range<usize>, Range<usize>, &'a mut [f32]),
        }
        let value_runs: Vec<_> = l.heads.iter().map(|hd| runs(&hd.v)).collect();
        let mut parts: Vec<Vec<f32>> = value_runs
            .iter()
            .map(|runs| match runs.len() {
                1 => Vec::new(),
                n => vec![0f32; n * g * d],
            })
            .collect();
        let mut tasks: Vec<Mutex<Values<'_, S>>> =
            states.iter_mut().enumerate().map(|(h, st)| Mutex::new(Values::Post(h, st))).collect();
        for (h, ((runs, o), part)) in value_runs.into_iter().zip(out.chunks_mut(g * d)).zip(&mut parts).enumerate() {
            if runs.len() == 1 {
                tasks.push(Mutex::new(Values::Whole(h, o)));
            } else {
                for ((blocks, tokens), part) in runs.into_iter().zip(part.chunks_mut(g * d)) {
                    tasks.push(Mutex::new(Values::Run(h, blocks, tokens, part)));
                }
            }
        }
        pool.parallel_for(tasks.len(), &|i| match &mut *lock(&tasks[i]) {
            Values::Post(h, st) => post(*h, &l.heads[*h], head_probs(*h), st),
            Values::Whole(h, o) => {
                let v = &l.heads[*h].v;
                attention::block_values(v, 0..v.blocks().len(), head_probs(*h), g, o)
            }
            Values::Run(h, blocks, tokens, part) => {
                let mut pr = Vec::with_capacity(g * tokens.len());
                for row in head_probs(*h).chunks_exact(t) {
                    pr.extend_from_slice(&row[tokens.clone()]);
                }
                attention::block_values(&l.heads[*h].v, blocks.clone(), &pr, g, part);
            }
        });
        drop(tasks);
        // Each head's runs, added in order.
        for (o, part) in out.chunks_mut(g * d).zip(&parts) {
            let mut runs = part.chunks_exact(g * d);
            if let Some(first) = runs.next() {
                o[..g * d].copy_from_slice(first);
                for r in runs {
                    for (x, y) in o.iter_mut().zip(r) {
                        *x += y;
                    }
                }
            }
        }
    }

    /// Exact causal attention of the last `n_q` positions of `layer` (`q_rows`:
    /// `n_q * n_q_heads * head_dim`) over fp16 values: this step's rows from the staged
    /// fp16 rows, older tokens dequantized. With `full == false` only the rows `obs`
    /// needs are attended and the output is all zeros. `obs` sees every row, in order.
    ///
    /// Per KV head: the head's keys and values are dequantized once (block by block, the
    /// blocks in parallel) into buffers the cache keeps, then the rows are attended in
    /// batches of [`ROW_BATCH`], tasks of [`TASK_ROWS`] rows in parallel
    /// ([`attention::attend_dense_rows`]: each row's result is the same whatever rows
    /// share its task), and `obs` sees the batch's rows one after the other.
    pub(crate) fn rows(
        &mut self,
        layer: usize,
        q_rows: &[f32],
        n_q: usize,
        full: bool,
        obs: &mut impl RowObserver,
    ) -> Result<Vec<f32>> {
        self.check_layer(layer)?;
        let (d, g, nqh) = (self.cfg.head_dim, self.cfg.group(), self.cfg.n_q_heads);
        let qrow = nqh * d;
        if n_q == 0 || q_rows.len() != n_q * qrow {
            return Err(KernelError::Shape { what: "q_rows", expected: n_q.max(1) * qrow, got: q_rows.len() });
        }
        check_finite(q_rows, "q_rows")?;
        let row = self.cfg.row();
        let Layers { layers, dense, rotation, .. } = self;
        let l = &layers[layer];
        let t_total = l.len;
        if n_q > t_total {
            return Err(KernelError::Shape { what: "n_q (more queries than tokens)", expected: t_total, got: n_q });
        }
        let mut out = vec![0f32; n_q * qrow];
        let needs: Vec<bool> = (0..n_q).map(|r| full || obs.needs(r, n_q)).collect();
        if !needs.contains(&true) {
            return Ok(out);
        }
        let scale = 1.0 / (d as f32).sqrt();
        let Dense { k: kd, v: vd, probs, qs } = dense;
        kd.resize(t_total * d, 0.0);
        vd.resize(t_total * d, 0.0);
        let batch = ROW_BATCH.min(n_q);
        probs.resize(batch * g * t_total, 0.0);
        qs.resize(batch * g * d, 0.0);
        for (h, hd) in l.heads.iter().enumerate() {
            let stored = l.staged_from.min(t_total);
            decode_all(&hd.k, stored, &mut kd[..stored * d]);
            decode_stream(&hd.v, &mut vd[..stored * d]);
            for t in stored..t_total {
                let o = (t - l.staged_from) * row + h * d;
                for i in 0..d {
                    kd[t * d + i] = l.staged_k[o + i].to_f32();
                    vd[t * d + i] = l.staged_v[o + i].to_f32();
                }
            }
            obs.head(h, t_total);
            for r0 in (0..n_q).step_by(batch) {
                let rb = batch.min(n_q - r0);
                for (i, q) in qs.chunks_exact_mut(g * d).take(rb).enumerate() {
                    let r = r0 + i;
                    let src = &q_rows[r * qrow + h * g * d..r * qrow + (h + 1) * g * d];
                    for (x, &y) in q.iter_mut().zip(src) {
                        *x = y * scale;
                    }
                    if let Some(rot) = rotation.as_ref() {
                        rot.rotate(q);
                    }
                    obs.queries(h, q);
                }
                let (kd, vd, qs) = (&kd[..], &vd[..], &qs[..]);
                let rows = &mut out[r0 * qrow..(r0 + rb) * qrow];
                rows.par_chunks_mut(TASK_ROWS * qrow)
                    .zip(probs.par_chunks_mut(TASK_ROWS * g * t_total))
                    .zip(qs.par_chunks(TASK_ROWS * g * d))
                    .enumerate()
                    .for_each(|(task, ((o, p), q))| {
                        let i0 = r0 + task * TASK_ROWS;
                        let rows: Vec<usize> = (0..o.len() / qrow).filter(|&i| needs[i0 + i]).collect();
                        let tvs: Vec<usize> = rows.iter().map(|&i| t_total - n_q + i0 + i + 1).collect();
                        let mut oc = vec![0f32; rows.len() * g * d];
                        attention::attend_dense_rows(kd, vd, d, q, g, (&rows, &tvs), t_total, &mut oc, p);
                        for (&i, oc) in rows.iter().zip(oc.chunks_exact(g * d)) {
                            o[i * qrow + h * g * d..i * qrow + (h + 1) * g * d].copy_from_slice(oc);
                        }
                    });
                for i in 0..rb {
                    let tv = t_total - n_q + r0 + i + 1;
                    let p = &mut probs[i * g * t_total..i * g * t_total + g * tv];
                    obs.row(h, r0 + i, n_q, &qs[i * g * d..(i + 1) * g * d], p, tv);
                }
            }
        }
        if full && let Some(r) = rotation.as_ref() {
            r.unrotate(&mut out);
        }
        Ok(out)
    }

    /// Checks the arguments of an attention computed elsewhere (a device mirror) for KV
    /// head `head` of `layer`: `qs` its `g` prepared queries, `window` one value per
    /// cached token.
    pub(crate) fn check_window(&self, layer: usize, head: usize, qs: &[f32], window: &[f32]) -> Result<()> {
        self.check_layer(layer)?;
        let (d, g) = (self.cfg.head_dim, self.cfg.group());
        let t = self.layers[layer].len;
        if window.len() != t || qs.len() != g * d {
            return Err(KernelError::Shape { what: "window", expected: t, got: window.len() });
        }
        if head >= self.cfg.n_kv_heads {
            return Err(KernelError::Config(format!("KV head {head} out of range")));
        }
        check_finite(window, "window")
    }

    /// Ends a step: the staged fp16 rows are dropped (multi-row attention now reads the
    /// stored groups).
    pub(crate) fn end_step(&mut self) {
        self.step += 1;
        for l in &mut self.layers {
            l.staged_from = l.len;
            l.staged_k.clear();
            l.staged_v.clear();
        }
    }

    /// Current widths of `(layer, kv_head)`: (keys, values); raw fp16 reads as 16.
    pub(crate) fn widths(&self, layer: usize, kv_head: usize) -> Option<(Vec<u8>, Vec<u8>)> {
        let hd = self.head(layer, kv_head)?;
        let of = |s: &PackedStream| (0..s.len()).filter_map(|t| s.meta(t).map(|m| m.bits)).collect::<Vec<u8>>();
        let k = match &hd.k {
            KStore::Packed(s) => of(s),
            KStore::Kivi(kk) => (0..kk.len()).map(|t| if t < kk.quantized_len() { kk.bits() } else { RAW }).collect(),
        };
        Some((k, of(&hd.v)))
    }

    /// Dequantized K and V of `layer`, `[T][n_kv_heads * head_dim]` each, keys multiplied
    /// by the channel scales `kscale(h)` of their head (none: as stored).
    pub(crate) fn dequantized<'a>(
        &self,
        layer: usize,
        kscale: impl Fn(usize) -> &'a [f32],
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        self.check_layer(layer)?;
        let (d, row) = (self.cfg.head_dim, self.cfg.row());
        let l = &self.layers[layer];
        let (mut k, mut v) = (vec![0f32; l.len * row], vec![0f32; l.len * row]);
        for (h, hd) in l.heads.iter().enumerate() {
            let scales = kscale(h);
            for t in 0..l.len {
                let kt = &mut k[t * row + h * d..t * row + (h + 1) * d];
                hd.k.decode(t, kt);
                for (x, s) in kt.iter_mut().zip(scales) {
                    *x *= s;
                }
                hd.v.decode(t, &mut v[t * row + h * d..t * row + (h + 1) * d]);
            }
        }
        Ok((k, v))
    }

    /// Sizes and average widths, with the policy's host bytes and counters.
    pub(crate) fn stats(&self, host_bytes: usize, counters: Counters) -> CacheStats {
        let mut s = CacheStats { tokens: self.len(0), host_bytes, counters, ..Default::default() };
        for l in &self.layers {
            for hd in &l.heads {
                s.k.add(&hd.k.bytes());
                s.v.add(&hd.v.bytes());
            }
        }
        s
    }

    /// The packed key and value streams of `(layer, kv_head)`; `None` for a bad index
    /// or KIVI keys (not a packed stream).
    pub(crate) fn streams(&self, layer: usize, kv_head: usize) -> Option<(&PackedStream, &PackedStream)> {
        let hd = self.head(layer, kv_head)?;
        match &hd.k {
            KStore::Packed(k) => Some((k, &hd.v)),
            KStore::Kivi(_) => None,
        }
    }
}
