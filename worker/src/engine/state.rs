//! The scheduler of the engine thread, a plain state machine over a [`StepModel`]: the
//! waiting queue, the running batch, preempted sequences, one engine step under the KV
//! budgets, and finishing sequences. It owns no thread and no channel of its own: the
//! engine thread (or a unit test) calls [`EngineState::submit`], [`EngineState::step`]
//! and [`EngineState::end_all`], and every outcome is an [`Event`] on the request's own
//! channel, the shared [`Load`] counters, or the sequence's KV memory.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use metrics::{counter, gauge, histogram};

use super::abort::{Abortable, Ticket};
use super::memory::{self, SeqNeed};
use super::output::OutputText;
use super::sampling::Sampler;
use super::{EngineConfig, Event, Failure, Finish, Job, KvSummary, Load, StepModel};
use crate::kv::{self, SeqCache};
use crate::metrics as m;
use crate::model::{BatchItem, KvCache};

/// A sequence that has been admitted (running or preempted).
struct Seq {
    job: Job,
    /// Its registration for aborts; dropped with the sequence.
    ticket: Ticket,
    /// Prompt, then every generated token (resumed ones included).
    tokens: Vec<u32>,
    kv: SeqCache,
    sampler: Sampler,
    output: OutputText,
    generated: u32,
    last_token_at: Option<Instant>,
    /// Counters already exported (the cache's are cumulative).
    exported: qaq_kernels::Counters,
}

impl Seq {
    /// Tokens this sequence may be fed in one step. The prompt is prefilled in chunks;
    /// generated tokens (resumed after a migration, or fed again after a dropped cache)
    /// one per step, as they were when first generated: a prefill chunk's rows attend by
    /// another kernel than a decode row (and a compressed cache decides its widths during
    /// decode steps), and a last-bit difference can flip the 8-bit codes of the quantized
    /// matmuls' inputs, so only the same steps reproduce the same logits, and a resumed
    /// greedy sequence continues exactly as it would have.
    fn feedable(&self) -> usize {
        let (fed, prompt) = (self.kv.len(), self.job.prompt.len());
        if fed < prompt { prompt - fed } else { (self.tokens.len() - fed).min(1) }
    }
}

pub(super) struct EngineState<M: StepModel> {
    model: Arc<M>,
    cfg: EngineConfig,
    load: Arc<Load>,
    waiting: VecDeque<(Job, Ticket)>,
    /// In admission order (preemption takes the latest first).
    running: Vec<Seq>,
    /// Swapped out of the device tier, resumed from the front: a step preempts its latest
    /// admitted first and each goes to the front, so the front is the earliest admitted.
    preempted: VecDeque<Seq>,
}

impl<M: StepModel> EngineState<M> {
    pub fn new(model: Arc<M>, cfg: EngineConfig, load: Arc<Load>) -> Self {
        gauge!(m::KV_DEVICE_BUDGET_BYTES).set(cfg.budgets.device as f64);
        gauge!(m::KV_HOST_BUDGET_BYTES).set(cfg.budgets.host as f64);
        Self { model, cfg, load, waiting: VecDeque::new(), running: Vec::new(), preempted: VecDeque::new() }
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty() && self.preempted.is_empty()
    }

    pub fn submit(&mut self, job: Job, ticket: Ticket) {
        if self.waiting.len() >= self.cfg.max_waiting {
            let _ = job.events.send(Event::Failed(Failure::QueueFull(self.cfg.max_waiting)));
            counter!(m::REQUESTS_TOTAL, "outcome" => "rejected").increment(1);
            return;
        }
        self.waiting.push_back((job, ticket));
    }

    /// Ends every request whose abort flag is set or whose client went away.
    fn drop_aborted(&mut self) {
        for i in (0..self.waiting.len()).rev() {
            let (job, ticket) = &self.waiting[i];
            if gone(job, ticket) {
                let (job, _) = self.waiting.remove(i).expect("index in range");
                abort_waiting(job);
            }
        }
        for i in (0..self.running.len()).rev() {
            if gone(&self.running[i].job, &self.running[i].ticket) {
                let seq = self.running.remove(i);
                self.finish(seq, Finish::Aborted, String::new(), vec![]);
            }
        }
        for i in (0..self.preempted.len()).rev() {
            if gone(&self.preempted[i].job, &self.preempted[i].ticket) {
                let seq = self.preempted.remove(i).expect("index in range");
                self.finish(seq, Finish::Aborted, String::new(), vec![]);
            }
        }
    }

    /// Ends every request; with `parked` (and a non-zero TTL), the caches of those that
    /// have generated tokens are parked there first, under the request id with the tokens
    /// they hold. Returns how many were parked.
    pub fn end_all(&mut self, parked: Option<&super::park::ParkedKv>) -> usize {
        for (job, _) in std::mem::take(&mut self.waiting) {
            abort_waiting(job);
        }
        let parked = parked.filter(|p| !p.ttl().is_zero());
        let seqs: Vec<Seq> = self.running.drain(..).chain(self.preempted.drain(..)).collect();
        let mut n = 0;
        for seq in seqs {
            // Only a request that has streamed tokens is migrated with them (before its
            // first token it is simply retried), so only its cache is worth parking.
            if let Some(parked) = parked
                && seq.generated > 0
                && seq.kv.len() > 0
                && !gone(&seq.job, &seq.ticket)
            {
                match seq.kv.snapshot() {
                    Ok(bytes) => {
                        let tokens = seq.tokens[..seq.kv.len()].to_vec();
                        tracing::info!(id = %seq.job.id, tokens = tokens.len(), bytes = bytes.len(), "KV cache parked");
                        parked.put(seq.job.id.clone(), tokens, seq.job.policy.label.clone(), bytes);
                        n += 1;
                    }
                    Err(e) => tracing::warn!(id = %seq.job.id, error = %e, "KV cache not parked"),
                }
            }
            self.finish(seq, Finish::Aborted, String::new(), vec![]);
        }
        n
    }

    fn device_used(&self) -> u64 {
        self.running.iter().map(|s| s.kv.bytes_used() as u64).sum()
    }

    fn host_used(&self) -> u64 {
        let backups: u64 = self.running.iter().chain(&self.preempted).map(|s| s.kv.host_bytes() as u64).sum();
        backups + self.preempted.iter().map(|s| s.kv.bytes_used() as u64).sum::<u64>()
    }

    /// Device bytes per cached token over the running sequences (the real
    /// compressed footprint), or `None` before any token is cached.
    fn avg_bytes_per_token(&self) -> Option<f64> {
        let tokens: usize = self.running.iter().map(|s| s.kv.len()).sum();
        (tokens > 0).then(|| self.device_used() as f64 / tokens as f64)
    }

    /// Device bytes the running sequences hold plus what their next step may add (one
    /// token each, at the worst case): what the step planner reserves, so a sequence
    /// admitted within the rest is not preempted again by the same step.
    fn reserved(&self) -> u64 {
        self.device_used() + self.running.iter().map(|s| s.job.worst_bytes_per_token as u64).sum::<u64>()
    }

    /// Resumes preempted sequences (in admission order), then admits new ones, while
    /// they fit beside the running ones' next step.
    fn admit(&mut self) {
        let budget = self.cfg.budgets.device;
        while self.running.len() < self.cfg.max_batch
            && let Some(seq) = self.preempted.front()
        {
            let bytes = seq.kv.bytes_used() as u64;
            if !memory::fits(self.reserved(), bytes, seq.job.worst_bytes_per_token as u64, budget) {
                return;
            }
            let seq = self.preempted.pop_front().expect("front exists");
            counter!(m::KV_HOST_TRANSFER_BYTES_TOTAL, "direction" => "to_device").increment(bytes);
            self.running.push(seq);
        }
        while self.running.len() < self.cfg.max_batch
            && let Some((job, ticket)) = self.waiting.front()
        {
            if gone(job, ticket) {
                let (job, _) = self.waiting.pop_front().expect("front exists");
                abort_waiting(job);
                continue;
            }
            // The first step stores a prefill chunk at the widest setting;
            // in the long run the prompt costs the running average.
            let worst = job.worst_bytes_per_token as u64;
            let n = (job.prompt.len() + job.resume.len()) as u64;
            let first_chunk = n.min(self.cfg.prefill_chunk as u64) * worst;
            let settled = self.avg_bytes_per_token().map_or(n * worst, |a| (a * n as f64) as u64);
            if !self.running.is_empty() && !memory::fits(self.reserved(), settled.max(first_chunk), worst, budget) {
                return;
            }
            let (job, ticket) = self.waiting.pop_front().expect("front exists");
            if let Some(seq) = self.start(job, ticket) {
                self.running.push(seq);
            }
        }
    }

    fn start(&mut self, mut job: Job, ticket: Ticket) -> Option<Seq> {
        if !ticket.admit() {
            abort_waiting(job);
            return None;
        }
        // A restored cache must leave at least one token to feed (the service checks).
        let n_tokens = job.prompt.len() + job.resume.len();
        let restored = job.kv.take().filter(|kv| kv.len() < n_tokens).map(Ok);
        let kv = match restored.unwrap_or_else(|| SeqCache::new(&self.model.kv_shape(), &job.policy)) {
            Ok(kv) => kv,
            Err(e) => {
                let _ = job.events.send(Event::Failed(Failure::KvCache(e.to_string())));
                counter!(m::REQUESTS_TOTAL, "outcome" => "error").increment(1);
                return None;
            }
        };
        let mut tokens = job.prompt.clone();
        tokens.extend_from_slice(&job.resume);
        let mut output = OutputText::new(job.stops.clone());
        if let Err(e) = output.prime(self.model.text(), &job.resume) {
            let _ = job.events.send(Event::Failed(Failure::Text(e.to_string())));
            return None;
        }
        Some(Seq {
            kv,
            sampler: Sampler::new(job.sampling.clone()),
            output,
            generated: job.resume.len() as u32,
            tokens,
            last_token_at: None,
            exported: Default::default(),
            job,
            ticket,
        })
    }

    /// Moves running sequence `i` to the host tier.
    fn preempt(&mut self, i: usize) {
        let mut seq = self.running.remove(i);
        counter!(m::PREEMPTIONS_TOTAL).increment(1);
        self.load.preemptions.fetch_add(1, Ordering::Relaxed);
        counter!(m::KV_HOST_TRANSFER_BYTES_TOTAL, "direction" => "to_host").increment(seq.kv.bytes_used() as u64);
        tracing::debug!(id = %seq.job.id, bytes = seq.kv.bytes_used(), "preempted");
        seq.kv.release_device();
        self.preempted.push_front(seq);
    }

    /// One engine step: admit, plan under the budget, run the batch, sample,
    /// stream, retire, keep the host tier within its budget.
    pub fn step(&mut self) {
        // Drop aborted requests before spending compute.
        self.drop_aborted();
        self.admit();
        if self.running.is_empty() {
            return;
        }
        let needs: Vec<SeqNeed> = self
            .running
            .iter()
            .map(|s| SeqNeed {
                bytes: s.kv.bytes_used() as u64,
                pending: s.feedable(),
                worst_per_token: s.job.worst_bytes_per_token as u64,
            })
            .collect();
        let plan = memory::plan_step(&needs, self.cfg.budgets.device, self.cfg.prefill_chunk);
        let mut feed = plan.feed;
        for i in plan.preempt {
            self.preempt(i);
            feed.remove(i);
        }
        // A lone sequence that cannot grow within the budget cannot continue.
        if self.running.len() == 1
            && !memory::fits(needs[0].bytes, 0, needs[0].worst_per_token, self.cfg.budgets.device)
        {
            let seq = self.running.remove(0);
            let failure = Failure::OutOfBudget { budget: self.cfg.budgets.device, bytes: seq.kv.bytes_used() };
            let _ = seq.job.events.send(Event::Failed(failure));
            counter!(m::REQUESTS_TOTAL, "outcome" => "error").increment(1);
            return;
        }
        // Room in the host tier for the backups this step writes.
        let shape = self.model.kv_shape();
        let growth: u64 = self
            .running
            .iter()
            .zip(&feed)
            .filter(|(s, _)| s.job.policy.uses_host_backups())
            .map(|(_, &n)| (n * kv::backup_bytes_per_token(&shape)) as u64)
            .sum();
        self.enforce_host_budget(growth);
        // The batch about to run is what the load reports (and what an abort
        // in the middle of the step subtracts from).
        self.publish_load();
        self.run_batch(&feed);
        self.enforce_host_budget(0);
    }

    fn run_batch(&mut self, feed: &[usize]) {
        let started = Instant::now();
        let mut prompt_tokens = 0u64;
        let mut rows = Vec::with_capacity(feed.len());
        let shape = self.model.kv_shape();
        let result = {
            let mut fed: Vec<(&[u32], Abortable<'_>)> = Vec::with_capacity(feed.len());
            for (i, (seq, &n)) in self.running.iter_mut().zip(feed).enumerate() {
                if n == 0 {
                    continue;
                }
                let Seq { job, tokens, kv, ticket, .. } = seq;
                let a = kv.len();
                let n_prompt = job.prompt.len() + job.resume.len();
                prompt_tokens += (a + n).min(n_prompt).saturating_sub(a) as u64;
                rows.push((i, a + n == tokens.len()));
                let kv = Abortable { kv, ticket, shape: &shape, policy: &job.policy, load: &self.load, len: a };
                fed.push((&tokens[a..a + n], kv));
            }
            let mut items: Vec<BatchItem<'_>> =
                fed.iter_mut().map(|(tokens, kv)| BatchItem { tokens, kv: kv as &mut dyn KvCache }).collect();
            self.model.step(&mut items)
        };
        histogram!(m::STEP_DURATION_SECONDS).record(started.elapsed().as_secs_f64());
        // The step's peak: fed caches before re-quantization, the others as they are.
        let peak: usize = self
            .running
            .iter()
            .zip(feed)
            .map(|(s, &n)| if n > 0 { s.kv.step_peak_bytes.max(s.kv.bytes_used()) } else { s.kv.bytes_used() })
            .sum();
        self.load.peak_device_bytes.fetch_max(peak as u64, Ordering::Relaxed);
        histogram!(m::BATCH_SIZE).record(rows.len() as f64);
        counter!(m::PROMPT_TOKENS_TOTAL).increment(prompt_tokens);
        self.export_cache_counters();
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "forward pass failed; failing the batch");
                for &(i, _) in rows.iter().rev() {
                    let seq = self.running.remove(i);
                    let _ = seq.job.events.send(Event::Failed(Failure::Forward(e.to_string())));
                    counter!(m::REQUESTS_TOTAL, "outcome" => "error").increment(1);
                }
                return;
            }
        };
        let mut finished = Vec::new();
        for (row, &(i, complete)) in rows.iter().enumerate() {
            if self.running[i].ticket.is_aborted() {
                // Aborted during the step (its cache is already freed).
                finished.push((i, (Finish::Aborted, String::new(), vec![])));
                continue;
            }
            if !complete {
                continue; // still prefilling
            }
            let seq = &mut self.running[i];
            let mut l = logits.row(row).to_vec();
            let tok = seq.sampler.sample(&mut l, &seq.tokens);
            if let Some(f) = self.advance(i, tok) {
                finished.push((i, f));
            }
        }
        for (i, (finish, text, ids)) in finished.into_iter().rev() {
            let seq = self.running.remove(i);
            self.finish(seq, finish, text, ids);
        }
    }

    /// Exports the growth of every running cache's cumulative counters.
    fn export_cache_counters(&mut self) {
        for s in &mut self.running {
            let c = s.kv.counters();
            let e = s.exported;
            for (dir, kind, now, then) in [
                ("up", "key", c.k_up, e.k_up),
                ("down", "key", c.k_down, e.k_down),
                ("up", "value", c.v_up, e.v_up),
                ("down", "value", c.v_down, e.v_down),
            ] {
                if now > then {
                    counter!(m::KV_REQUANTIZATIONS_TOTAL, "direction" => dir, "kind" => kind).increment(now - then);
                }
            }
            counter!(m::KV_REQUANTIZATIONS_BLOCKED_TOTAL).increment(c.up_blocked - e.up_blocked);
            counter!(m::KV_HOST_TRANSFER_BYTES_TOTAL, "direction" => "to_device")
                .increment(c.backup_bytes_read - e.backup_bytes_read);
            counter!(m::KV_HOST_TRANSFER_BYTES_TOTAL, "direction" => "to_host").increment(s.kv.to_host_bytes);
            s.kv.to_host_bytes = 0;
            s.exported = c;
        }
    }

    /// Keeps the host tier within its budget with room for `reserve` more
    /// bytes: evicts the least important backups (largest holders first), then
    /// drops swapped-out caches (their sequences will prefill again when
    /// resumed).
    fn enforce_host_budget(&mut self, reserve: u64) {
        let budget = self.cfg.budgets.host.saturating_sub(reserve);
        let mut excess = memory::host_excess(self.host_used(), budget) as usize;
        while excess > 0 {
            let holder = self
                .running
                .iter_mut()
                .chain(self.preempted.iter_mut())
                .max_by_key(|s| s.kv.host_bytes())
                .filter(|s| s.kv.host_bytes() > 0);
            let Some(seq) = holder else { break };
            let (freed, n) = seq.kv.evict_backups(excess);
            counter!(m::KV_BACKUP_EVICTIONS_TOTAL).increment(n);
            self.load.backup_evictions.fetch_add(n, Ordering::Relaxed);
            if freed == 0 {
                break;
            }
            excess = excess.saturating_sub(freed);
        }
        while self.host_used() > budget
            && let Some(i) = (0..self.preempted.len()).max_by_key(|&i| self.preempted[i].kv.bytes_used())
        {
            let seq = &mut self.preempted[i];
            if seq.kv.is_empty() {
                break;
            }
            tracing::debug!(id = %seq.job.id, "host tier full: dropping a swapped-out cache (it will prefill again)");
            match SeqCache::new(&self.model.kv_shape(), &seq.job.policy) {
                Ok(kv) => seq.kv = kv,
                Err(_) => break,
            }
        }
    }

    /// Records a sampled token; returns the finish (with the final text and
    /// ids to send) if the sequence ends.
    fn advance(&mut self, i: usize, tok: u32) -> Option<(Finish, String, Vec<u32>)> {
        let ctx = self.model.context_length();
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
        if !seq.job.ignore_eos && self.model.eos_ids().contains(&tok) {
            return Some((Finish::Eos, String::new(), vec![tok]));
        }
        let delta = match seq.output.push(self.model.text(), tok) {
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
        let (kw, vw) = seq.kv.widths();
        for (kind, widths) in [("key", kw), ("value", vw)] {
            let mut hist = [0u64; 17];
            for w in widths {
                hist[usize::from(w).min(16)] += 1;
            }
            for (w, &n) in hist.iter().enumerate().filter(|(_, n)| **n > 0) {
                histogram!(m::KV_BITS, "kind" => kind).record_many(w as f64, n as usize);
            }
        }
        let kv = seq.kv.summary();
        let prompt = seq.job.prompt.len();
        // The sequence has left `running`: publish that before the client hears the
        // end, so a Stats call right after the last message sees it gone.
        self.publish_load();
        let _ = seq.job.events.send(done_event(text, ids, finish, prompt, seq.generated, kv));
        let outcome = match finish {
            Finish::Aborted => "aborted",
            _ => "ok",
        };
        counter!(m::REQUESTS_TOTAL, "outcome" => outcome).increment(1);
    }

    /// Publishes load counters and gauges.
    pub fn publish_load(&self) {
        let (mut tokens, mut fp16) = (0usize, 0usize);
        for s in &self.running {
            tokens += s.kv.len();
            fp16 += s.kv.fp16_equivalent_bytes();
        }
        let (dev, host) = (self.device_used(), self.host_used());
        let l = &self.load;
        l.running.store(self.running.len() as u32, Ordering::Relaxed);
        l.waiting.store((self.waiting.len() + self.preempted.len()) as u32, Ordering::Relaxed);
        l.kv_device_bytes.store(dev, Ordering::Relaxed);
        l.kv_host_bytes.store(host, Ordering::Relaxed);
        l.peak_device_bytes.fetch_max(dev, Ordering::Relaxed);
        l.peak_host_bytes.fetch_max(host, Ordering::Relaxed);
        l.kv_fp16_equivalent_bytes.store(fp16 as u64, Ordering::Relaxed);
        l.cached_tokens.store(tokens as u64, Ordering::Relaxed);
        gauge!(m::REQUESTS_RUNNING).set(self.running.len() as f64);
        gauge!(m::REQUESTS_WAITING).set((self.waiting.len() + self.preempted.len()) as f64);
        gauge!(m::KV_DEVICE_BYTES).set(dev as f64);
        gauge!(m::KV_HOST_BACKUP_BYTES).set(host as f64);
        gauge!(m::KV_FP16_EQUIVALENT_BYTES).set(fp16 as f64);
        gauge!(m::KV_USAGE_RATIO).set(dev as f64 / self.cfg.budgets.device.max(1) as f64);
        if let Some((used, total)) = self.model.device_memory() {
            gauge!(m::GPU_MEMORY_BYTES, "state" => "used").set(used as f64);
            gauge!(m::GPU_MEMORY_BYTES, "state" => "total").set(total as f64);
        }
    }
}

/// Whether a request was aborted or its client went away.
fn gone(job: &Job, ticket: &Ticket) -> bool {
    ticket.is_aborted() || job.events.is_closed()
}

/// Ends a request that never got KV memory.
fn abort_waiting(job: Job) {
    let _ =
        job.events.send(done_event(String::new(), vec![], Finish::Aborted, job.prompt.len(), 0, KvSummary::default()));
    counter!(m::REQUESTS_TOTAL, "outcome" => "aborted").increment(1);
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
