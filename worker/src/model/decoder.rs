//! The decoder stack, written once for every backend: the batch checked and flattened
//! ([`Plan`]), the operations a backend provides ([`Ops`]), the layer loop ([`run`]) and
//! one layer's cache operations ([`cache_step`]).
//!
//! A batch may mix prefill chunks and decode steps of different sequences at different
//! positions: all their tokens go through the dense layers as one matrix, attention runs
//! per sequence against its own [`KvCache`].

use super::kv::{DeviceTier, KvCache};
use super::weights::Weights;
use super::{LlamaConfig, ModelError, Result};

/// One sequence's part of a batch.
pub struct BatchItem<'a> {
    /// Tokens to feed, at positions `kv.len()..kv.len() + tokens.len()`.
    pub tokens: &'a [u32],
    /// The sequence's cache.
    pub kv: &'a mut dyn KvCache,
}

/// A batch flattened for the dense layers: every fed token's id and position, and each
/// item's (offset, length) among them.
#[derive(Debug)]
pub struct Plan {
    pub ids: Vec<u32>,
    pub positions: Vec<usize>,
    pub spans: Vec<(usize, usize)>,
}

impl Plan {
    /// Checks a batch (every item feeds a token, stays within the context, uses ids of
    /// the vocabulary) and flattens it.
    pub fn new(cfg: &LlamaConfig, items: &[BatchItem<'_>]) -> Result<Plan> {
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut spans = Vec::with_capacity(items.len());
        for it in items {
            let start = it.kv.len();
            if it.tokens.is_empty() {
                return Err(ModelError::Format("batch item without tokens".into()));
            }
            if start + it.tokens.len() > cfg.context_length {
                return Err(ModelError::Format(format!(
                    "sequence of {} tokens exceeds the context of {}",
                    start + it.tokens.len(),
                    cfg.context_length
                )));
            }
            if let Some(&bad) = it.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
                return Err(ModelError::Format(format!("token id {bad} outside the vocabulary")));
            }
            spans.push((ids.len(), it.tokens.len()));
            ids.extend_from_slice(it.tokens);
            positions.extend(start..start + it.tokens.len());
        }
        Ok(Plan { ids, positions, spans })
    }

    /// The row of each item's last fed token.
    pub fn last_rows(&self) -> Vec<usize> {
        self.spans.iter().map(|&(off, len)| off + len - 1).collect()
    }

    /// Every fed token's row, in order.
    pub fn all_rows(&self) -> Vec<usize> {
        (0..self.ids.len()).collect()
    }
}

/// What a backend provides to run the decoder stack over one [`Plan`]: activations `Buf`
/// (f32 rows, `[n, width]`), the GEMM operand `In` a `Buf` becomes before it meets a weight
/// matrix (an f16 copy on a GPU; the rows themselves on the CPU), and the weights' matrix
/// and vector types. Every operation is row-independent: a row's result does not depend on
/// the other rows of the batch.
pub trait Ops {
    type Mat;
    type Vec;
    type Buf;
    type In;
    /// The embedding rows of the plan's tokens.
    fn embed(&self, table: &Self::Mat) -> Result<Self::Buf>;
    /// RMSNorm of every row of `x` with weight `w`.
    fn rms_norm(&self, x: &Self::Buf, w: &Self::Vec) -> Result<Self::Buf>;
    /// `x` as a GEMM operand.
    fn operand(&self, x: Self::Buf) -> Result<Self::In>;
    /// `x · wᵀ (+ bias)`.
    fn linear(&self, w: &Self::Mat, x: &Self::In, bias: Option<&Self::Vec>) -> Result<Self::Buf>;
    /// RoPE in place over rows of `heads` heads, at the plan's positions.
    fn rope(&self, x: &mut Self::Buf, heads: usize) -> Result<()>;
    /// `x += y`.
    fn add(&self, x: &mut Self::Buf, y: &Self::Buf) -> Result<()>;
    /// `silu(gate) * up`.
    fn silu_mul(&self, gate: Self::Buf, up: &Self::Buf) -> Result<Self::Buf>;
    /// Appends the layer's keys and values to every item's cache and attends its queries
    /// there ([`cache_step`]); returns the attention output rows.
    fn attention(
        &self,
        layer: usize,
        items: &mut [BatchItem<'_>],
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
    ) -> Result<Self::Buf>;
    /// Final-norm logits (`norm`, then `head`) of the given rows of `x`, row-major on the host.
    fn logits(&self, x: &Self::Buf, norm: &Self::Vec, head: &Self::Mat, rows: &[usize]) -> Result<Vec<f32>>;
}

/// Runs the decoder stack over a planned batch and returns the logits of `rows` (rows of
/// the plan's fed tokens), `[rows.len(), vocab]` row-major. Every cache of the batch gets
/// its layers' appends and attention, then one `end_step`.
pub fn run<O: Ops>(
    o: &O,
    cfg: &LlamaConfig,
    w: &Weights<O::Mat, O::Vec>,
    items: &mut [BatchItem<'_>],
    rows: &[usize],
) -> Result<Vec<f32>> {
    let mut x = o.embed(&w.embed)?;
    for (li, l) in w.layers.iter().enumerate() {
        let hn = o.operand(o.rms_norm(&x, &l.attn_norm)?)?;
        let mut q = o.linear(&l.wq, &hn, l.bq.as_ref())?;
        let mut k = o.linear(&l.wk, &hn, l.bk.as_ref())?;
        let v = o.linear(&l.wv, &hn, l.bv.as_ref())?;
        o.rope(&mut q, cfg.n_heads)?;
        o.rope(&mut k, cfg.n_kv_heads)?;
        let attn = o.operand(o.attention(li, items, &q, &k, &v)?)?;
        o.add(&mut x, &o.linear(&l.wo, &attn, None)?)?;
        let hn = o.operand(o.rms_norm(&x, &l.ffn_norm)?)?;
        let gate = o.linear(&l.w_gate, &hn, None)?;
        let up = o.linear(&l.w_up, &hn, None)?;
        let act = o.operand(o.silu_mul(gate, &up)?)?;
        o.add(&mut x, &o.linear(&l.w_down, &act, None)?)?;
    }
    for it in items.iter_mut() {
        it.kv.end_step();
    }
    o.logits(&x, &w.norm, w.head(), rows)
}

/// Where one item's attention output of a layer was computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attended {
    /// In the host rows passed to [`cache_step`].
    Host,
    /// On the device, by the cache's device tier.
    Device,
}

/// Attends one decode row on a cache's device tier: `(tier, item index, query row)`, with
/// the output written on the device; `Ok(false)` when the tier declines (the row is then
/// attended on the host).
pub type DeviceAttend<'a> = dyn FnMut(&mut dyn DeviceTier, usize, &[f32]) -> Result<bool> + 'a;

/// One layer's cache operations for every item of a batch: its new tokens' keys and values
/// (rows of `kvw` in `k`, `v`) are appended to its cache, then its queries (rows of `qw` in
/// `q`) attend there. With `device` (a GPU backend), a decode row (one new token) of a cache
/// that has a device tier attends there; every other row attends on the host, into `out`.
/// Without a device the items are independent and run in parallel (each item's result is
/// the same as alone). Returns where each item's rows were attended.
#[allow(clippy::too_many_arguments)]
pub fn cache_step(
    items: &mut [BatchItem<'_>],
    spans: &[(usize, usize)],
    layer: usize,
    [q, k, v]: [&[f32]; 3],
    (qw, kvw): (usize, usize),
    out: &mut [f32],
    mut device: Option<&mut DeviceAttend<'_>>,
) -> Result<Vec<Attended>> {
    if device.is_none() && items.len() > 1 {
        // Spans are consecutive: each item's output rows are the next `len * qw` values.
        // The items run on the kernels' pool, the one the matmuls use (a second pool's
        // threads would compete with its waiting workers for the cores); a cache's own
        // decode attention inside a task then runs on that task's thread (the pool is
        // busy), its re-quantization on rayon's pool. One sequence's attention runs on
        // the kernels' pool itself.
        let mut rest = out;
        let mut work = Vec::with_capacity(items.len());
        for (it, &(off, len)) in items.iter_mut().zip(spans) {
            let (mine, tail) = std::mem::take(&mut rest).split_at_mut(len * qw);
            work.push(std::sync::Mutex::new((it, off, len, mine, Ok::<(), ModelError>(()))));
            rest = tail;
        }
        qaq_kernels::pool::global().parallel_for(work.len(), &|i| {
            let mut w = work[i].lock().unwrap_or_else(|e| e.into_inner());
            let (it, off, len, o, res) = &mut *w;
            let (off, len) = (*off, *len);
            *res = (|| -> Result<()> {
                it.kv.append(layer, &k[off * kvw..(off + len) * kvw], &v[off * kvw..(off + len) * kvw])?;
                Ok(it.kv.attend(layer, &q[off * qw..(off + len) * qw], len, o)?)
            })();
        });
        // The first item's error, if any (as alone, in order).
        for w in work {
            w.into_inner().unwrap_or_else(|e| e.into_inner()).4?;
        }
        return Ok(vec![Attended::Host; items.len()]);
    }
    let mut at = Vec::with_capacity(items.len());
    for (i, (it, &(off, len))) in items.iter_mut().zip(spans).enumerate() {
        it.kv.append(layer, &k[off * kvw..(off + len) * kvw], &v[off * kvw..(off + len) * kvw])?;
        let (qr, rows) = (&q[off * qw..(off + len) * qw], off * qw..(off + len) * qw);
        if len == 1
            && let Some(attend) = device.as_deref_mut()
            && let Some(tier) = it.kv.device_tier()
            && attend(tier, i, qr)?
        {
            at.push(Attended::Device);
            continue;
        }
        it.kv.attend(layer, qr, len, &mut out[rows])?;
        at.push(Attended::Host);
    }
    Ok(at)
}
