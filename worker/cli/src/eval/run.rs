//! The evaluation protocols, run on the worker's own forward pass and caches
//! ([`SeqCache`], the same code the engine serves with):
//!
//! - [`score_mc`]: zero-shot multiple choice (qaq-algorithm.md §8.2). The
//!   context is prefilled once, exactly ([`SharedPrefill`]); every (policy,
//!   choice) pair gets its own cache holding that prefill compressed by its
//!   policy; the choice's tokens are then decoded one per step against the
//!   compressed cache, online QAQ updates active, all pairs in one batch. A
//!   choice's score is its tokens' log-probabilities (the first one comes from
//!   the exact prefill, as in the reference code).
//! - [`perplexity`]: teacher-forced next-token loss over a window, fed in
//!   prefill chunks through one policy's cache, which compresses as it grows.
//! - [`retrieve`]: retrieval (key–value pairs, passkey): one exact shared
//!   prefill of the document, then the question and a greedy answer decoded
//!   per policy against its compressed cache; exact match.

use qaq_worker::engine::sampling::argmax;
use qaq_worker::kv::{PolicyChoice, SeqCache};
use qaq_worker::model::{BatchItem, DeviceTier, KvCache, KvError, LoadedModel};

use super::store::KvBytes;
use super::tasks::{KvItem, McItem};

/// Prompt tokens per prefill step (the engine's default chunk).
pub const PREFILL_CHUNK: usize = 512;

/// One exact prefill feeding several caches. The model attends through
/// `lead` (an fp16 cache); every follower appends the same K/V rows and
/// observes the same queries (attention windows, ||Q||^2), then re-quantizes
/// at each step's end under its own policy. This is the paper's protocol (an
/// fp16 prefill whose cache is then compressed), and it lets one forward pass
/// serve all policies.
pub struct SharedPrefill<'a> {
    pub lead: &'a mut SeqCache,
    pub followers: Vec<&'a mut SeqCache>,
}

impl KvCache for SharedPrefill<'_> {
    fn len(&self) -> usize {
        self.lead.len()
    }
    fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) -> Result<(), KvError> {
        self.lead.append(layer, k, v)?;
        self.followers.iter_mut().try_for_each(|f| f.append(layer, k, v))
    }
    fn attend(&mut self, layer: usize, q: &[f32], n_q: usize, out: &mut [f32]) -> Result<(), KvError> {
        self.lead.attend(layer, q, n_q, out)?;
        self.followers.iter_mut().try_for_each(|f| f.observe(layer, q, n_q))
    }
    fn end_step(&mut self) {
        self.lead.end_step();
        self.followers.iter_mut().for_each(|f| f.end_step());
    }
    fn device_tier(&mut self) -> Option<&mut dyn DeviceTier> {
        // Several caches answer for one: attention stays on the host.
        None
    }
    fn bytes_used(&self) -> usize {
        self.lead.bytes_used()
    }
}

/// A fresh cache for `policy`.
fn new_cache(model: &LoadedModel, policy: &PolicyChoice) -> anyhow::Result<SeqCache> {
    SeqCache::new(&model.model.kv_shape(), policy).map_err(|e| anyhow::anyhow!("{}: {e}", policy.label))
}

fn fp16() -> PolicyChoice {
    PolicyChoice::parse("fp16").expect("fp16 is a policy")
}

/// Prefills `ids` in chunks through a [`SharedPrefill`] and returns the logits
/// of the last token.
fn shared_prefill(model: &LoadedModel, ids: &[u32], followers: Vec<&mut SeqCache>) -> anyhow::Result<Vec<f32>> {
    let mut lead = new_cache(model, &fp16())?;
    let mut kv = SharedPrefill { lead: &mut lead, followers };
    let mut last = Vec::new();
    for chunk in ids.chunks(PREFILL_CHUNK) {
        let logits = model.model.forward(&mut [BatchItem { tokens: chunk, kv: &mut kv }])?;
        last = logits.row(0).to_vec();
    }
    anyhow::ensure!(!last.is_empty(), "empty prompt");
    Ok(last)
}

/// `log softmax(logits)[target]`, in f64.
pub fn log_prob(logits: &[f32], target: u32) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = logits.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln() + max;
    logits[target as usize] as f64 - lse
}

/// The scores of one policy on one multiple-choice item.
#[derive(Clone, Debug, PartialEq)]
pub struct McScores {
    /// Per choice: sum of the log-probabilities of its tokens.
    pub sum_lp: Vec<f64>,
    /// Per choice: its number of tokens.
    pub tokens: Vec<u32>,
    /// What the caches stored at the end, summed over the choices.
    pub kv: KvBytes,
}

/// Scores `item` under every policy (module docs). Returns one entry per policy.
pub fn score_mc(model: &LoadedModel, item: &McItem, policies: &[PolicyChoice]) -> anyhow::Result<Vec<McScores>> {
    let tok = &model.tokenizer;
    let n_choices = item.continuations.len();
    let ctx_ids = item.contexts.iter().map(|c| tok.encode(c)).collect::<Result<Vec<_>, _>>()?;
    let conts = item.continuations.iter().map(|c| tok.encode_continuation(c)).collect::<Result<Vec<_>, _>>()?;
    anyhow::ensure!(conts.iter().all(|c| !c.is_empty()), "item {}: a choice has no tokens", item.id);
    // caches[p * n_choices + c]
    let mut caches = Vec::with_capacity(policies.len() * n_choices);
    for p in policies {
        for _ in 0..n_choices {
            caches.push(new_cache(model, p)?);
        }
    }
    let mut sum_lp = vec![0f64; n_choices];
    for (x, ids) in ctx_ids.iter().enumerate() {
        let followers =
            caches.iter_mut().enumerate().filter(|(i, _)| item.ctx_of[i % n_choices] == x).map(|(_, c)| c).collect();
        let last = shared_prefill(model, ids, followers)?;
        for c in (0..n_choices).filter(|&c| item.ctx_of[c] == x) {
            sum_lp[c] = log_prob(&last, conts[c][0]);
        }
    }
    let mut sums: Vec<f64> = (0..caches.len()).map(|i| sum_lp[i % n_choices]).collect();
    let longest = conts.iter().map(Vec::len).max().unwrap_or(0);
    for s in 0..longest.saturating_sub(1) {
        let active: Vec<usize> = (0..caches.len()).filter(|&i| conts[i % n_choices].len() > s + 1).collect();
        let feed: Vec<u32> = active.iter().map(|&i| conts[i % n_choices][s]).collect();
        let logits = decode_step(model, &mut caches, &active, &feed)?;
        for (row, &i) in logits.iter().zip(&active) {
            sums[i] += log_prob(row, conts[i % n_choices][s + 1]);
        }
    }
    Ok((0..policies.len())
        .map(|p| {
            let range = p * n_choices..(p + 1) * n_choices;
            let mut kv = KvBytes::default();
            for c in &caches[range.clone()] {
                kv.add(&KvBytes::of(c));
            }
            McScores { sum_lp: sums[range].to_vec(), tokens: conts.iter().map(|c| c.len() as u32).collect(), kv }
        })
        .collect())
}

/// Teacher-forced loss of `ids` under `policy`, the cache compressing as it grows: (sum
/// of next-token NLL, predicted tokens, cache bytes at the end). Only the predictions made
/// at positions `from..` are scored: 0 scores every token; `ids.len() / 2` scores the
/// second half of the window, as llama.cpp's `llama-perplexity` scores each chunk (the
/// first half is context only).
pub fn perplexity(
    model: &LoadedModel,
    ids: &[u32],
    policy: &PolicyChoice,
    from: usize,
) -> anyhow::Result<(f64, u64, KvBytes)> {
    let mut cache = new_cache(model, policy)?;
    let vocab = model.model.config().vocab_size;
    let (mut nll, mut n) = (0f64, 0u64);
    for (ci, chunk) in ids.chunks(PREFILL_CHUNK).enumerate() {
        let start = ci * PREFILL_CHUNK;
        let logits = model.model.forward_all(&mut [BatchItem { tokens: chunk, kv: &mut cache }])?;
        for (i, row) in logits.chunks_exact(vocab).enumerate() {
            if start + i >= from
                && let Some(&next) = ids.get(start + i + 1)
            {
                nll -= log_prob(row, next);
                n += 1;
            }
        }
    }
    Ok((nll, n, KvBytes::of(&cache)))
}

/// One policy's answer to a retrieval item.
#[derive(Clone, Debug, PartialEq)]
pub struct Retrieved {
    pub output: String,
    pub correct: bool,
    pub kv: KvBytes,
}

/// Prompt tokens of a retrieval item: (document, question).
pub fn kv_prompt(model: &LoadedModel, item: &KvItem) -> anyhow::Result<(Vec<u32>, Vec<u32>)> {
    let tok = &model.tokenizer;
    Ok((tok.encode(&item.document)?, tok.encode_continuation(&item.question)?))
}

/// One decode step for the sequences `active` (ascending indices) of
/// `caches`, feeding `feed[j]` to `active[j]`; returns their logits in order.
fn decode_step(
    model: &LoadedModel,
    caches: &mut [SeqCache],
    active: &[usize],
    feed: &[u32],
) -> anyhow::Result<Vec<Vec<f32>>> {
    let mut items: Vec<BatchItem<'_>> = caches
        .iter_mut()
        .enumerate()
        .filter(|(i, _)| active.contains(i))
        .zip(feed)
        .map(|((_, kv), t)| BatchItem { tokens: std::slice::from_ref(t), kv: kv as &mut dyn KvCache })
        .collect();
    Ok(model.model.forward(&mut items)?.iter().map(<[f32]>::to_vec).collect())
}

/// Answers to `item` under every policy: the document is prefilled once,
/// exactly, for all policies; the question is then fed token by token and the
/// answer generated greedily, each policy against its own compressed cache.
/// Correct when the generated text starts with the gold answer.
/// `doc` and `question` are the item's tokens ([`kv_prompt`]).
pub fn retrieve(
    model: &LoadedModel,
    item: &KvItem,
    (doc, question): (&[u32], &[u32]),
    policies: &[PolicyChoice],
) -> anyhow::Result<Vec<Retrieved>> {
    let tok = &model.tokenizer;
    anyhow::ensure!(!question.is_empty(), "item {}: no question tokens", item.id);
    let max_new = tok.encode_continuation(&item.answer)?.len() + 2;
    let mut caches = policies.iter().map(|p| new_cache(model, p)).collect::<anyhow::Result<Vec<_>>>()?;
    shared_prefill(model, doc, caches.iter_mut().collect())?;
    let all: Vec<usize> = (0..caches.len()).collect();
    let mut logits = Vec::new();
    for &t in question {
        let feed = vec![t; all.len()];
        logits = decode_step(model, &mut caches, &all, &feed)?;
    }
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); caches.len()];
    let mut active = all;
    for step in 0..max_new {
        let feed: Vec<u32> = logits.iter().map(|row| argmax(row)).collect();
        for (&i, &t) in active.iter().zip(&feed) {
            out[i].push(t);
        }
        let keep: Vec<(usize, u32)> =
            active.iter().copied().zip(feed).filter(|(_, t)| !tok.eos_ids().contains(t)).collect();
        if step + 1 == max_new || keep.is_empty() {
            break;
        }
        active = keep.iter().map(|&(i, _)| i).collect();
        let feed: Vec<u32> = keep.iter().map(|&(_, t)| t).collect();
        logits = decode_step(model, &mut caches, &active, &feed)?;
    }
    caches
        .iter()
        .zip(out)
        .map(|(c, ids)| {
            let output = tok.decode(&ids)?;
            let correct = output.trim_start().starts_with(&item.answer);
            Ok(Retrieved { output, correct, kv: KvBytes::of(c) })
        })
        .collect()
}
