//! Unit tests of the scheduler ([`EngineState`]) over a scripted fake model: no model
//! file, no threads. The fake drives real [`crate::kv::SeqCache`]s (appends, attention,
//! re-quantization, host backups) through the same [`BatchItem`] seam as the real model,
//! so memory, preemption, parking and eviction are the engine's real accounting; only the
//! logits are scripted: the greedy successor of token `t` is always [`next`]`(t)`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::abort::Aborts;
use super::output::Detokenize;
use super::park::ParkedKv;
use super::state::EngineState;
use super::{Budgets, EngineConfig, Event, Finish, Job, Load, SamplingConfig, StepModel};
use crate::kv::{self, PolicyChoice, SeqCache};
use crate::model::{BatchItem, KvShape, Logits, ModelError, Result};

const SHAPE: KvShape = KvShape { n_layers: 2, n_heads: 2, n_kv_heads: 1, head_dim: 16 };
const VOCAB: usize = 50;
const EOS: u32 = 49;

/// The scripted greedy successor of token `t`: [`EOS`] after 48, which no other token
/// leads to (`7t + 3 = 48 mod 49` has no solution), so only a prompt ending in 48 ends on
/// EOS.
fn next(t: u32) -> u32 {
    if t == 48 { EOS } else { (t * 7 + 3) % (VOCAB as u32 - 1) }
}

/// The tokens a sequence generates greedily after `last`, `n` of them.
fn expected(last: u32, n: usize) -> Vec<u32> {
    std::iter::successors(Some(next(last)), |&t| Some(next(t))).take(n).collect()
}

/// Renders token `t` as `<t>` (ASCII, so no partial characters).
struct FakeText;

impl Detokenize for FakeText {
    fn detokenize(&self, ids: &[u32]) -> Result<String> {
        Ok(ids.iter().map(|t| format!("<{t}>")).collect())
    }
}

/// Called after every layer of every step: `(step, layer)`.
type Hook = Box<dyn Fn(usize, usize) + Send + Sync>;

struct Fake {
    context: usize,
    steps: AtomicUsize,
    /// The step whose forward pass fails.
    fail_at: Option<usize>,
    hook: Option<Hook>,
}

impl Fake {
    fn new() -> Self {
        Self { context: 64, steps: AtomicUsize::new(0), fail_at: None, hook: None }
    }
}

impl StepModel for Fake {
    type Text = FakeText;

    fn kv_shape(&self) -> KvShape {
        SHAPE
    }

    fn context_length(&self) -> usize {
        self.context
    }

    fn eos_ids(&self) -> &[u32] {
        &[EOS]
    }

    fn text(&self) -> &FakeText {
        &FakeText
    }

    fn step(&self, items: &mut [BatchItem<'_>]) -> Result<Logits> {
        let step = self.steps.fetch_add(1, Ordering::Relaxed);
        if self.fail_at == Some(step) {
            return Err(ModelError::Format("scripted failure".into()));
        }
        let (kvw, qw) = (SHAPE.kv_width(), SHAPE.q_width());
        let starts: Vec<usize> = items.iter().map(|it| it.kv.len()).collect();
        for layer in 0..SHAPE.n_layers {
            for (it, &start) in items.iter_mut().zip(&starts) {
                let n = it.tokens.len();
                let rows: Vec<f32> = (0..n * kvw)
                    .map(|i| {
                        let (tok, pos, c) = (it.tokens[i / kvw] as f32, (start + i / kvw) as f32, (i % kvw) as f32);
                        (tok * 0.37 + pos * 0.11 + c * 0.05 + layer as f32).sin() * 2.0
                    })
                    .collect();
                it.kv.append(layer, &rows, &rows)?;
                let mut out = vec![0f32; n * qw];
                it.kv.attend(layer, &vec![0.1; n * qw], n, &mut out)?;
            }
            if let Some(h) = &self.hook {
                h(step, layer);
            }
        }
        let mut data = vec![0f32; items.len() * VOCAB];
        for (i, it) in items.iter_mut().enumerate() {
            it.kv.end_step();
            data[i * VOCAB + next(*it.tokens.last().expect("fed tokens")) as usize] = 1.0;
        }
        Ok(Logits::new(data, VOCAB))
    }

    fn device_memory(&self) -> Option<(usize, usize)> {
        None
    }
}

/// The scheduler over a fake, and every request's events.
struct Harness {
    st: EngineState<Fake>,
    aborts: Arc<Aborts>,
    load: Arc<Load>,
    rx: HashMap<String, mpsc::UnboundedReceiver<Event>>,
    /// Every event so far: (step, request id, event).
    log: Vec<(usize, String, Event)>,
    steps: usize,
}

fn config(device: u64, host: u64) -> EngineConfig {
    EngineConfig {
        max_batch: 8,
        prefill_chunk: 16,
        max_waiting: 8,
        budgets: Budgets { device, host },
        park_ttl: Duration::from_secs(30),
    }
}

fn policy(s: &str) -> PolicyChoice {
    PolicyChoice::parse(s).unwrap()
}

/// Worst-case device bytes per fed token under `p` for the fake's shape.
fn worst(p: &str) -> u64 {
    kv::worst_bytes_per_token(&SHAPE, &policy(p).policy).unwrap() as u64
}

impl Harness {
    fn new(fake: Fake, cfg: EngineConfig) -> Self {
        Self::with_aborts(fake, cfg, Arc::default())
    }

    fn with_aborts(fake: Fake, cfg: EngineConfig, aborts: Arc<Aborts>) -> Self {
        let load = Arc::new(Load::default());
        let st = EngineState::new(Arc::new(fake), cfg, load.clone());
        Self { st, aborts, load, rx: HashMap::new(), log: Vec::new(), steps: 0 }
    }

    fn job(&mut self, id: &str, prompt: &[u32], max_new: u32, p: &str) -> Job {
        let (tx, rx) = mpsc::unbounded_channel();
        self.rx.insert(id.to_string(), rx);
        let policy = policy(p);
        Job {
            id: id.to_string(),
            prompt: prompt.to_vec(),
            resume: Vec::new(),
            kv: None,
            max_new_tokens: max_new,
            sampling: SamplingConfig::default(),
            stops: Vec::new(),
            ignore_eos: false,
            worst_bytes_per_token: worst(p) as usize,
            policy,
            events: tx,
            received: Instant::now(),
        }
    }

    fn submit_job(&mut self, job: Job) {
        let ticket = self.aborts.register(&job.id);
        self.st.submit(job, ticket);
    }

    fn submit(&mut self, id: &str, prompt: &[u32], max_new: u32, p: &str) {
        let job = self.job(id, prompt, max_new, p);
        self.submit_job(job);
    }

    /// One step, as the engine thread runs it, then the events it produced.
    fn step(&mut self) {
        self.st.step();
        self.st.publish_load();
        self.steps += 1;
        let mut ids: Vec<&String> = self.rx.keys().collect();
        ids.sort();
        for id in ids.into_iter().cloned().collect::<Vec<_>>() {
            while let Ok(ev) = self.rx.get_mut(&id).expect("known id").try_recv() {
                self.log.push((self.steps, id.clone(), ev));
            }
        }
    }

    /// Steps until the scheduler is idle (at most `max` steps).
    fn run(&mut self, max: usize) {
        for _ in 0..max {
            if self.st.is_idle() {
                return;
            }
            self.step();
        }
        panic!("still busy after {max} steps");
    }

    fn events(&self, id: &str) -> Vec<&Event> {
        self.log.iter().filter(|(_, i, _)| i == id).map(|(_, _, e)| e).collect()
    }

    /// Every token streamed to `id`, final message included.
    fn tokens(&self, id: &str) -> Vec<u32> {
        self.events(id)
            .into_iter()
            .flat_map(|e| match e {
                Event::Delta { token_ids, .. } | Event::Done { token_ids, .. } => token_ids.clone(),
                Event::Failed(_) => Vec::new(),
            })
            .collect()
    }

    fn finish(&self, id: &str) -> Option<Finish> {
        self.events(id).into_iter().find_map(|e| match e {
            Event::Done { finish, .. } => Some(*finish),
            _ => None,
        })
    }

    fn failure(&self, id: &str) -> Option<String> {
        self.events(id).into_iter().find_map(|e| match e {
            Event::Failed(f) => Some(f.to_string()),
            _ => None,
        })
    }

    /// The first step at which `id` streamed again after a pause (it was preempted).
    fn resumed_at(&self, id: &str) -> Option<usize> {
        let steps: Vec<usize> = self.log.iter().filter(|(_, i, _)| i == id).map(|(s, _, _)| *s).collect();
        steps.windows(2).find(|w| w[1] > w[0] + 1).map(|w| w[1])
    }

    /// The step of `id`'s first token and of its last message.
    fn span(&self, id: &str) -> (usize, usize) {
        let steps: Vec<usize> = self.log.iter().filter(|(_, i, _)| i == id).map(|(s, _, _)| *s).collect();
        (steps[0], *steps.last().expect("events"))
    }
}

#[test]
fn admits_in_arrival_order_up_to_the_batch_limit() {
    let mut h = Harness::new(Fake::new(), EngineConfig { max_batch: 2, ..config(u64::MAX, u64::MAX) });
    for id in ["a", "b", "c"] {
        h.submit(id, &[1, 2, 3], 4, "fp16");
    }
    h.step();
    assert_eq!(h.load.running(), 2);
    assert_eq!(h.load.waiting(), 1);
    assert!(h.events("c").is_empty(), "c waits for a slot");
    h.run(50);
    assert_eq!(h.span("a").0, 1);
    assert_eq!(h.span("b").0, 1);
    assert!(h.span("c").0 > h.span("a").1, "c starts once a has finished");
    for id in ["a", "b", "c"] {
        assert_eq!(h.tokens(id), expected(3, 4), "{id}");
        assert_eq!(h.finish(id), Some(Finish::Length));
    }
}

#[test]
fn refuses_submissions_beyond_the_queue_limit() {
    let mut h = Harness::new(Fake::new(), EngineConfig { max_waiting: 1, ..config(u64::MAX, u64::MAX) });
    h.submit("a", &[1], 2, "fp16");
    h.submit("b", &[1], 2, "fp16");
    h.step();
    let e = h.failure("b").expect("b refused");
    assert!(e.contains("queue full") && e.contains("1 waiting"), "{e}");
    h.run(10);
    assert_eq!(h.finish("a"), Some(Finish::Length));
}

#[test]
fn a_request_waits_until_its_prompt_fits_the_device_budget() {
    // a holds ~9 tokens' worth; b's 8-token prompt does not fit beside it in 12.
    let w = worst("fp16");
    let mut h = Harness::new(Fake::new(), config(12 * w, u64::MAX));
    h.submit("a", &[1, 2, 3, 4, 5], 4, "fp16");
    h.step();
    h.submit("b", &[6, 7, 8, 9, 10, 11, 12, 13], 2, "fp16");
    h.run(50);
    assert!(h.span("b").0 > h.span("a").1, "b admitted after a ended: {:?} {:?}", h.span("a"), h.span("b"));
    assert_eq!(h.load.preemptions.load(Ordering::Relaxed), 0, "reserved, never preempted");
    assert!(h.load.peak_device_bytes.load(Ordering::Relaxed) <= 12 * w);
    assert_eq!(h.tokens("b"), expected(13, 2));
}

#[test]
fn growth_that_does_not_fit_preempts_the_latest_admitted_and_it_resumes_unchanged() {
    // Both are admitted (4-token prompts fit), but 2 x 18 tokens do not fit in 20.
    let w = worst("fp16");
    let mut h = Harness::new(Fake::new(), config(20 * w, u64::MAX));
    h.submit("a", &[1, 2, 3, 4], 14, "fp16");
    h.submit("b", &[5, 6, 7, 8], 14, "fp16");
    h.run(100);
    assert_eq!(h.load.preemptions.load(Ordering::Relaxed), 1);
    assert!(h.load.peak_device_bytes.load(Ordering::Relaxed) <= 20 * w);
    let (a, b) = (h.span("a"), h.span("b"));
    // a (first admitted) is never preempted: one token every step from its first to its last.
    assert_eq!(a.1 - a.0 + 1, 14, "a streamed without a pause");
    assert!(b.1 > a.1, "b finishes after a");
    assert_eq!(h.tokens("a"), expected(4, 14));
    assert_eq!(h.tokens("b"), expected(8, 14), "b resumes where it stopped");
}

#[test]
fn preempted_sequences_resume_first_in_first_out_before_new_admissions() {
    let w = worst("fp16");
    let mut h = Harness::new(Fake::new(), config(20 * w, u64::MAX));
    for id in ["a", "b", "c"] {
        h.submit(id, &[1, 2, 3, 4], 14, "fp16");
    }
    h.step();
    assert_eq!(h.load.running(), 3);
    // Run until both later ones are preempted, then a newcomer arrives.
    while h.load.preemptions.load(Ordering::Relaxed) < 2 {
        h.step();
    }
    h.submit("d", &[1, 2, 3, 4], 14, "fp16");
    h.run(200);
    let ends: Vec<usize> = ["a", "b", "c", "d"].iter().map(|id| h.span(id).1).collect();
    assert!(ends.windows(2).all(|p| p[0] < p[1]), "finished in order a, b, c, d: {ends:?}");
    // c was preempted before b, yet b (admitted earlier) streams again first.
    let (b, c) = (h.resumed_at("b").expect("b paused"), h.resumed_at("c").expect("c paused"));
    assert!(b <= c, "b resumed at step {b}, c at {c}");
    for id in ["a", "b", "c", "d"] {
        assert_eq!(h.tokens(id), expected(4, 14), "{id}");
    }
}

#[test]
fn a_drain_parks_the_caches_of_sequences_that_have_generated() {
    let mut h = Harness::new(Fake::new(), EngineConfig { max_batch: 1, ..config(u64::MAX, u64::MAX) });
    h.submit("a", &[1, 2, 3], 10, "qaq");
    h.submit("b", &[4, 5], 10, "qaq");
    h.step();
    h.step();
    let parked = ParkedKv::new(Duration::from_secs(30));
    assert_eq!(h.st.end_all(Some(&parked)), 1, "only a has generated");
    h.step();
    assert!(h.st.is_idle());
    assert_eq!(h.finish("a"), Some(Finish::Aborted));
    assert_eq!(h.finish("b"), Some(Finish::Aborted));
    assert!(parked.take("b").is_none(), "b never started");
    let p = parked.take("a").expect("a parked");
    // a fed its prompt and one generated token; the second is sampled, not cached.
    assert_eq!(p.tokens, vec![1, 2, 3, next(3)]);
    assert_eq!(p.policy, "qaq");
    let restored = SeqCache::restore(&SHAPE, &policy("qaq"), &p.bytes).unwrap();
    assert_eq!(crate::model::KvCache::len(&restored), 4);
    assert_eq!(h.load.kv_device_bytes.load(Ordering::Relaxed), 0);
}

#[test]
fn an_abort_in_the_middle_of_a_step_frees_the_memory_at_once() {
    let aborts: Arc<Aborts> = Arc::default();
    let waits: Arc<Mutex<Vec<oneshot::Receiver<()>>>> = Arc::default();
    let (a2, w2) = (aborts.clone(), waits.clone());
    let mut fake = Fake::new();
    // Step 3, after layer 0: abort b; its cache is freed at its next cache operation.
    fake.hook = Some(Box::new(move |step, layer| {
        if (step, layer) == (3, 0) {
            w2.lock().unwrap().extend(a2.abort("b").expect("b is live"));
        }
    }));
    let mut h = Harness::with_aborts(fake, config(u64::MAX, u64::MAX), aborts);
    h.submit("a", &[1, 2, 3], 8, "qaq");
    h.submit("b", &[4, 5, 6], 8, "qaq");
    for _ in 0..4 {
        h.step();
    }
    let mut waits = std::mem::take(&mut *waits.lock().unwrap());
    assert_eq!(waits.len(), 1, "b held memory, so its abort waits for it");
    assert!(waits[0].try_recv().is_ok(), "freed within the step");
    assert_eq!(h.finish("b"), Some(Finish::Aborted));
    assert_eq!(h.load.running(), 1);
    let one = h.load.kv_device_bytes.load(Ordering::Relaxed);
    h.run(50);
    assert_eq!(h.tokens("a"), expected(3, 8), "a is computed as if alone");
    assert_eq!(h.tokens("b"), expected(6, 3), "b streamed three tokens, then nothing");
    assert!(one > 0);
    assert_eq!(h.load.kv_device_bytes.load(Ordering::Relaxed), 0);
}

#[test]
fn an_aborted_waiting_request_ends_without_memory_and_a_gone_client_is_dropped() {
    let mut h = Harness::new(Fake::new(), EngineConfig { max_batch: 1, ..config(u64::MAX, u64::MAX) });
    h.submit("a", &[1, 2], 6, "fp16");
    h.submit("b", &[3, 4], 6, "fp16");
    h.submit("c", &[5, 6], 6, "fp16");
    h.step();
    let waits = h.aborts.abort("b").expect("b is queued");
    assert!(waits.is_empty(), "a queued request holds no memory: answered at once");
    // c's client goes away.
    h.rx.remove("c");
    h.step();
    assert_eq!(h.finish("b"), Some(Finish::Aborted));
    let Some(Event::Done { completion_tokens, kv, .. }) = h.events("b").pop() else { panic!("b ended") };
    assert_eq!((*completion_tokens, kv.device_bytes), (0, 0));
    assert_eq!(h.load.waiting(), 0, "b and c are gone");
    h.run(20);
    assert_eq!(h.tokens("a"), expected(2, 6));
}

#[test]
fn the_host_tier_evicts_backups_to_stay_within_its_budget() {
    let per_token = kv::backup_bytes_per_token(&SHAPE) as u64;
    let budget = 10 * per_token;
    let mut h = Harness::new(Fake::new(), config(u64::MAX, budget));
    h.submit("a", &[1, 2, 3, 4], 20, "qaq");
    h.run(50);
    assert!(h.load.backup_evictions.load(Ordering::Relaxed) > 0);
    assert!(h.load.peak_host_bytes.load(Ordering::Relaxed) <= budget, "host tier over its budget");
    assert_eq!(h.tokens("a"), expected(4, 20));
}

#[test]
fn a_lone_sequence_that_outgrows_the_device_budget_fails_clearly() {
    let w = worst("fp16");
    let mut h = Harness::new(Fake::new(), config(6 * w, u64::MAX));
    h.submit("a", &[1, 2, 3], 10, "fp16");
    h.run(20);
    let e = h.failure("a").expect("a failed");
    assert!(e.contains("--kv-device-budget-bytes"), "{e}");
    // 3 prompt tokens and 3 generated ones fill 6 tokens' worth; the 4th was sampled.
    assert_eq!(h.tokens("a").len(), 4, "it streamed until the budget was full");
    assert_eq!(h.load.running(), 0);
}

#[test]
fn sequences_finish_on_eos_stop_strings_length_and_context() {
    let mut fake = Fake::new();
    fake.context = 12;
    let mut h = Harness::new(fake, config(u64::MAX, u64::MAX));
    // next(7) = 52 % 49 = 3: the text "<3>" is a stop string.
    let mut stop = h.job("stop", &[7], 10, "fp16");
    stop.stops = vec!["<3>".into()];
    h.submit_job(stop);
    h.submit("len", &[1], 3, "fp16");
    h.submit("ctx", &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 10, "fp16");
    h.submit("eos", &[5, 48], 10, "fp16");
    h.run(30);
    assert_eq!(h.finish("eos"), Some(Finish::Eos));
    assert_eq!(h.tokens("eos"), vec![EOS]);
    assert_eq!(h.finish("stop"), Some(Finish::Stop));
    assert_eq!(h.tokens("stop"), vec![3]);
    let Some(Event::Done { text, .. }) = h.events("stop").pop() else { panic!() };
    assert_eq!(text, "", "the stop string is not sent");
    assert_eq!(h.finish("len"), Some(Finish::Length));
    assert_eq!(h.tokens("len").len(), 3);
    assert_eq!(h.finish("ctx"), Some(Finish::Context));
    assert_eq!(h.tokens("ctx").len(), 2, "10 prompt tokens + 2 reach the context of 12");
}

#[test]
fn a_failed_forward_pass_fails_that_batch_and_the_engine_goes_on() {
    let mut fake = Fake::new();
    fake.fail_at = Some(1);
    let mut h = Harness::new(fake, config(u64::MAX, u64::MAX));
    h.submit("a", &[1, 2], 5, "fp16");
    h.step();
    h.step();
    let e = h.failure("a").expect("a failed");
    assert!(e.contains("forward pass failed") && e.contains("scripted failure"), "{e}");
    assert_eq!(h.load.running(), 0);
    h.submit("b", &[1, 2], 5, "fp16");
    h.run(20);
    assert_eq!(h.tokens("b"), expected(2, 5));
}

#[test]
fn resumed_tokens_are_fed_after_the_prompt_and_not_streamed_again() {
    let mut h = Harness::new(Fake::new(), config(u64::MAX, u64::MAX));
    let mut job = h.job("m", &[1, 2], 6, "qaq");
    job.resume = expected(2, 2);
    h.submit_job(job);
    h.run(20);
    let Some(Event::Done { completion_tokens, prompt_tokens, .. }) = h.events("m").pop() else { panic!() };
    assert_eq!((*prompt_tokens, *completion_tokens), (2, 6), "the resumed two count as generated");
    assert_eq!(h.tokens("m"), expected(2, 6)[2..].to_vec(), "only the four new tokens are streamed");
}

#[test]
fn a_resumed_sequence_is_not_preempted_again_by_the_step_that_resumed_it() {
    // A resume must leave room for every running sequence's next token, as the step
    // planner does; otherwise c is resumed and swapped out again in the same step.
    let w = worst("fp16");
    let mut h = Harness::new(Fake::new(), config(18 * w, u64::MAX));
    h.submit("a", &[1], 6, "fp16");
    h.submit("b", &[1], 14, "fp16");
    h.submit("c", &[1; 9], 9, "fp16");
    h.run(100);
    assert_eq!(h.load.preemptions.load(Ordering::Relaxed), 1);
    for (id, n) in [("a", 6), ("b", 14), ("c", 9)] {
        assert_eq!(h.tokens(id), expected(1, n), "{id}");
    }
}
