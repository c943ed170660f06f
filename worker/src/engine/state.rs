//! Scheduler state of the engine thread: the waiting queue, the running
//! batch, one engine step, and finishing sequences.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use metrics::{counter, gauge, histogram};

use super::output::OutputText;
use super::sampling::Sampler;
use super::{EngineConfig, Event, Finish, Job, KvSummary, Load};
use crate::metrics as m;
use crate::model::{BatchItem, DenseKv, KvCache, LoadedModel};

/// A running sequence.
struct Seq {
    job: Job,
    /// Prompt, then every generated token (resumed ones included).
    tokens: Vec<u32>,
    kv: Box<dyn KvCache>,
    sampler: Sampler,
    output: OutputText,
    generated: u32,
    last_token_at: Option<Instant>,
}

pub(super) struct EngineState {
    model: Arc<LoadedModel>,
    cfg: EngineConfig,
    load: Arc<Load>,
    waiting: VecDeque<Job>,
    running: Vec<Seq>,
}

impl EngineState {
    pub fn new(model: Arc<LoadedModel>, cfg: EngineConfig, load: Arc<Load>) -> Self {
        Self { model, cfg, load, waiting: VecDeque::new(), running: Vec::new() }
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    pub fn submit(&mut self, job: Job) {
        if self.waiting.len() >= self.cfg.max_waiting {
            let _ = job
                .events
                .send(Event::Failed(format!("worker queue full ({} waiting requests)", self.cfg.max_waiting)));
            counter!(m::REQUESTS_TOTAL, "outcome" => "rejected").increment(1);
            return;
        }
        self.waiting.push_back(job);
    }

    /// Aborts a waiting or running request; true if it was found.
    pub fn abort(&mut self, id: &str) -> bool {
        if let Some(i) = self.waiting.iter().position(|j| j.id == id) {
            let job = self.waiting.remove(i).expect("index from position");
            let _ = job.events.send(done_event(
                String::new(),
                vec![],
                Finish::Aborted,
                job.prompt.len(),
                0,
                KvSummary::default(),
            ));
            counter!(m::REQUESTS_TOTAL, "outcome" => "aborted").increment(1);
            return true;
        }
        if let Some(i) = self.running.iter().position(|s| s.job.id == id) {
            let seq = self.running.swap_remove(i);
            self.finish(seq, Finish::Aborted, String::new(), vec![]);
            return true;
        }
        false
    }

    pub fn abort_all(&mut self) {
        let ids: Vec<String> =
            self.waiting.iter().map(|j| j.id.clone()).chain(self.running.iter().map(|s| s.job.id.clone())).collect();
        for id in ids {
            self.abort(&id);
        }
    }

    fn admit(&mut self) {
        while self.running.len() < self.cfg.max_batch {
            let Some(job) = self.waiting.pop_front() else { break };
            if job.events.is_closed() {
                counter!(m::REQUESTS_TOTAL, "outcome" => "aborted").increment(1);
                continue;
            }
            let mut tokens = job.prompt.clone();
            tokens.extend_from_slice(&job.resume);
            let mut output = OutputText::new(job.stops.clone());
            if let Err(e) = output.prime(&self.model.tokenizer, &job.resume) {
                let _ = job.events.send(Event::Failed(e.to_string()));
                continue;
            }
            self.running.push(Seq {
                kv: Box::new(DenseKv::new(self.model.model.kv_shape())),
                sampler: Sampler::new(job.sampling.clone()),
                output,
                generated: job.resume.len() as u32,
                tokens,
                last_token_at: None,
                job,
            });
        }
    }

    /// One engine step: admit, run the batch, sample, stream, retire.
    pub fn step(&mut self) {
        self.admit();
        // Drop sequences whose client went away before spending compute.
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].job.events.is_closed() {
                let seq = self.running.swap_remove(i);
                self.finish(seq, Finish::Aborted, String::new(), vec![]);
            } else {
                i += 1;
            }
        }
        if self.running.is_empty() {
            return;
        }
        // Plan: decoding sequences feed their last token, prefilling ones a
        // chunk of their prompt while the step's prefill budget lasts.
        let mut budget = self.cfg.prefill_chunk;
        let mut plan = Vec::with_capacity(self.running.len());
        for (i, s) in self.running.iter().enumerate() {
            let fed = s.kv.len();
            let n = match s.tokens.len() - fed {
                0 => 0,
                1 => 1,
                r => {
                    let n = r.min(budget);
                    budget -= n;
                    n
                }
            };
            if n > 0 {
                plan.push((i, fed, fed + n));
            }
        }
        if plan.is_empty() {
            return;
        }
        let started = Instant::now();
        let mut prompt_tokens = 0u64;
        let result = {
            let mut items: Vec<BatchItem<'_>> = Vec::with_capacity(plan.len());
            let mut rest: &mut [Seq] = &mut self.running;
            let mut base = 0;
            for &(i, a, b) in &plan {
                let (_, tail) = std::mem::take(&mut rest).split_at_mut(i - base);
                let (seq, tail) = tail.split_first_mut().expect("planned index in range");
                let n_prompt = seq.job.prompt.len() + seq.job.resume.len();
                prompt_tokens += b.min(n_prompt).saturating_sub(a) as u64;
                items.push(BatchItem { tokens: &seq.tokens[a..b], kv: seq.kv.as_mut() });
                rest = tail;
                base = i + 1;
            }
            self.model.model.forward(&mut items).and_then(|l| Ok(l.to_vec2::<f32>()?))
        };
        histogram!(m::STEP_DURATION_SECONDS).record(started.elapsed().as_secs_f64());
        histogram!(m::BATCH_SIZE).record(plan.len() as f64);
        counter!(m::PROMPT_TOKENS_TOTAL).increment(prompt_tokens);
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "forward pass failed; failing the batch");
                let mut idx: Vec<usize> = plan.iter().map(|p| p.0).collect();
                idx.sort_unstable_by(|a, b| b.cmp(a));
                for i in idx {
                    let seq = self.running.swap_remove(i);
                    let _ = seq.job.events.send(Event::Failed(format!("forward pass failed: {e}")));
                    counter!(m::REQUESTS_TOTAL, "outcome" => "error").increment(1);
                }
                return;
            }
        };
        let mut finished = Vec::new();
        for (row, &(i, _, b)) in plan.iter().enumerate() {
            let seq = &mut self.running[i];
            if b < seq.tokens.len() {
                continue; // still prefilling
            }
            let mut l = logits[row].clone();
            let tok = seq.sampler.sample(&mut l, &seq.tokens);
            if let Some(f) = self.advance(i, tok) {
                finished.push((i, f));
            }
        }
        finished.sort_unstable_by_key(|f| std::cmp::Reverse(f.0));
        for (i, (finish, text, ids)) in finished {
            let seq = self.running.swap_remove(i);
            self.finish(seq, finish, text, ids);
        }
    }

    /// Records a sampled token; returns the finish (with the final text and
    /// ids to send) if the sequence ends.
    fn advance(&mut self, i: usize, tok: u32) -> Option<(Finish, String, Vec<u32>)> {
        let ctx = self.model.model.config().context_length;
        let seq = &mut self.running[i];
        let now = Instant::now();
        match seq.last_token_at {
            None => histogram!(m::TIME_TO_FIRST_TOKEN_SECONDS).record((now - seq.job.received).as_secs_f64()),
            Some(t) => histogram!(m::INTER_TOKEN_LATENCY_SECONDS).record((now - t).as_secs_f64()),
        }
        seq.last_token_at = Some(now);
        seq.generated += 1;
        seq.tokens.push(tok);
        counter!(m::GENERATED_TOKENS_TOTAL).increment(1);
        self.load.generated_total.fetch_add(1, Ordering::Relaxed);
        if !seq.job.ignore_eos && self.model.tokenizer.eos_ids().contains(&tok) {
            return Some((Finish::Eos, String::new(), vec![tok]));
        }
        let delta = match seq.output.push(&self.model.tokenizer, tok) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "detokenization failed");
                Default::default()
            }
        };
        if delta.stopped {
            return Some((Finish::Stop, delta.text, vec![tok]));
        }
        if seq.generated >= seq.job.max_new_tokens {
            return Some((Finish::Length, delta.text, vec![tok]));
        }
        if seq.tokens.len() >= ctx {
            return Some((Finish::Context, delta.text, vec![tok]));
        }
        // A failed send means the client left: the next step drops the sequence.
        let _ = seq.job.events.send(Event::Delta { text: delta.text, token_ids: vec![tok] });
        None
    }

    fn finish(&mut self, mut seq: Seq, finish: Finish, mut text: String, ids: Vec<u32>) {
        if finish != Finish::Stop {
            text.push_str(&seq.output.flush());
        }
        let cached = seq.kv.len();
        let kv = KvSummary {
            policy: "f32".into(),
            avg_key_bits: 32.0,
            avg_value_bits: 32.0,
            device_bytes: seq.kv.bytes_used() as u64,
            fp16_equivalent_bytes: (cached * self.model.model.config().fp16_kv_bytes_per_token()) as u64,
        };
        let prompt = seq.job.prompt.len();
        let _ = seq.job.events.send(done_event(text, ids, finish, prompt, seq.generated, kv));
        let outcome = match finish {
            Finish::Aborted => "aborted",
            _ => "ok",
        };
        counter!(m::REQUESTS_TOTAL, "outcome" => outcome).increment(1);
    }

    /// Publishes load counters and gauges.
    pub fn publish_load(&self) {
        let (mut dev, mut tokens) = (0usize, 0usize);
        for s in &self.running {
            dev += s.kv.bytes_used();
            tokens += s.kv.len();
        }
        let fp16 = tokens * self.model.model.config().fp16_kv_bytes_per_token();
        let l = &self.load;
        l.running.store(self.running.len() as u32, Ordering::Relaxed);
        l.waiting.store(self.waiting.len() as u32, Ordering::Relaxed);
        l.kv_device_bytes.store(dev as u64, Ordering::Relaxed);
        l.kv_fp16_equivalent_bytes.store(fp16 as u64, Ordering::Relaxed);
        l.cached_tokens.store(tokens as u64, Ordering::Relaxed);
        gauge!(m::REQUESTS_RUNNING).set(self.running.len() as f64);
        gauge!(m::REQUESTS_WAITING).set(self.waiting.len() as f64);
        gauge!(m::KV_DEVICE_BYTES).set(dev as f64);
        gauge!(m::KV_FP16_EQUIVALENT_BYTES).set(fp16 as f64);
    }
}

fn done_event(
    text: String,
    token_ids: Vec<u32>,
    finish: Finish,
    prompt: usize,
    completion: u32,
    kv: KvSummary,
) -> Event {
    Event::Done { text, token_ids, finish, prompt_tokens: prompt as u32, completion_tokens: completion, kv }
}
