//! The engine: a dedicated OS thread that owns the model and every
//! sequence's KV cache and runs continuous batching — each step batches all
//! running sequences (decode) with chunks of newly admitted prompts
//! (prefill); requests join and leave between steps.
//!
//! - [`EngineHandle`]: the async side's handle (submit, abort, load).
//! - [`StepModel`]: what the engine needs of a model (the worker's [`LoadedModel`]).
//! - `state`: the scheduler, a plain state machine over a [`StepModel`] (admission,
//!   budget reservation, preemption and resume, parking, aborts, host-tier eviction),
//!   unit-tested with a scripted fake model and no threads.
//! - `abort`: abort flags shared with the async side, effective mid-step.
//! - [`memory`]: two-tier (device / host) KV budget planning.
//! - [`sampling`]: next-token selection.
//! - [`output`]: incremental detokenization and stop strings.

mod abort;
pub mod memory;
mod model;
pub mod output;
pub mod park;
pub mod sampling;
mod state;
#[cfg(test)]
mod state_tests;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Instant;

use tokio::sync::mpsc as tmpsc;

pub use crate::kv::KvSummary;
use crate::kv::{PolicyChoice, SeqCache};
use abort::{Aborts, Ticket};
pub use memory::Budgets;
pub use model::StepModel;
use park::ParkedKv;
pub use sampling::SamplingConfig;
use state::EngineState;

/// Engine limits.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Most sequences per step.
    pub max_batch: usize,
    /// Most prompt tokens prefilled per step (across sequences).
    pub prefill_chunk: usize,
    /// Most requests waiting for a slot; beyond that submissions are refused.
    pub max_waiting: usize,
    /// KV memory budgets.
    pub budgets: Budgets,
    /// How long a parked KV cache waits for its next worker ([`EngineHandle::park_all`];
    /// zero: nothing is parked, migrated requests are prefilled again).
    pub park_ttl: std::time::Duration,
}

/// Default device-tier budget (bytes).
pub const DEFAULT_DEVICE_BUDGET: u64 = 1 << 30;
/// Default time a parked KV cache waits for its next worker.
pub const DEFAULT_PARK_TTL: std::time::Duration = std::time::Duration::from_secs(30);
/// Default host-tier budget (bytes).
pub const DEFAULT_HOST_BUDGET: u64 = 4 << 30;

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch: 16,
            prefill_chunk: 512,
            max_waiting: 256,
            budgets: Budgets { device: DEFAULT_DEVICE_BUDGET, host: DEFAULT_HOST_BUDGET },
            park_ttl: DEFAULT_PARK_TTL,
        }
    }
}

/// Why a sequence ended (mirrors `qaq.v1.FinishReason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    Length,
    Stop,
    Eos,
    Aborted,
    Context,
}

/// What the engine reports about a request, in order.
#[derive(Debug, PartialEq)]
pub enum Event {
    /// New text and the tokens that produced it.
    Delta { text: String, token_ids: Vec<u32> },
    /// The last message.
    Done {
        text: String,
        token_ids: Vec<u32>,
        finish: Finish,
        prompt_tokens: u32,
        completion_tokens: u32,
        kv: KvSummary,
    },
    /// The sequence failed inside the engine.
    Failed(Failure),
}

/// Why the engine failed a request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// More requests are waiting than `--max-waiting` allows.
    #[error("worker queue full ({0} waiting requests)")]
    QueueFull(usize),
    /// A sequence alone outgrew the device budget.
    #[error("the device KV budget (--kv-device-budget-bytes {budget}) cannot hold this sequence ({bytes} bytes)")]
    OutOfBudget { budget: u64, bytes: usize },
    /// Its KV cache could not be made.
    #[error("kv cache: {0}")]
    KvCache(String),
    /// The forward pass of its batch failed.
    #[error("forward pass failed: {0}")]
    Forward(String),
    /// Its resumed tokens could not be detokenized.
    #[error("detokenization: {0}")]
    Text(String),
}

/// A request ready for the engine (validated and tokenized).
#[derive(Debug)]
pub struct Job {
    pub id: String,
    pub prompt: Vec<u32>,
    /// Tokens generated earlier elsewhere (migration), fed after the prompt.
    pub resume: Vec<u32>,
    /// A cache restored from the request's previous worker (migration), holding the
    /// first tokens of `prompt` + `resume`: they are not prefilled again.
    pub kv: Option<SeqCache>,
    /// Most tokens to generate, `resume` included.
    pub max_new_tokens: u32,
    pub sampling: SamplingConfig,
    pub stops: Vec<String>,
    pub ignore_eos: bool,
    /// KV-cache policy of the sequence.
    pub policy: PolicyChoice,
    /// Worst-case device bytes per token under that policy.
    pub worst_bytes_per_token: usize,
    /// Receiver held by the gRPC stream of this request; dropping it aborts.
    pub events: tmpsc::UnboundedSender<Event>,
    pub received: Instant,
}

/// Load counters shared with the async side (heartbeats, Stats).
#[derive(Debug, Default)]
pub struct Load {
    pub running: AtomicU32,
    pub waiting: AtomicU32,
    pub generated_total: AtomicU64,
    pub kv_device_bytes: AtomicU64,
    pub kv_fp16_equivalent_bytes: AtomicU64,
    pub kv_host_bytes: AtomicU64,
    pub cached_tokens: AtomicU64,
    /// Highest device-tier bytes seen after any step.
    pub peak_device_bytes: AtomicU64,
    /// Highest host-tier bytes seen after any step.
    pub peak_host_bytes: AtomicU64,
    /// Sequences preempted so far.
    pub preemptions: AtomicU64,
    /// Token backups evicted from the host tier so far.
    pub backup_evictions: AtomicU64,
}

enum Command {
    Submit(Box<Job>, Ticket),
    /// Park every sequence's cache and end the sequences; reply with how many parked.
    Park(tokio::sync::oneshot::Sender<usize>),
    Shutdown,
}

/// Errors of the engine handle.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EngineError {
    #[error("the engine has stopped")]
    Stopped,
}

/// The async side's handle to the engine thread. Dropping it stops the thread
/// after the current step.
#[derive(Debug)]
pub struct EngineHandle {
    /// Commands to the engine thread, which owns the receiving end.
    tx: mpsc::Sender<Command>,
    /// Abort flags; the engine thread holds the tickets.
    aborts: Arc<Aborts>,
    load: Arc<Load>,
    budgets: Budgets,
    parked: Arc<ParkedKv>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EngineHandle {
    /// Starts the engine thread for a model (the worker's: a [`crate::model::LoadedModel`]).
    pub fn start<M: StepModel>(model: Arc<M>, cfg: EngineConfig) -> Self {
        let (tx, rx) = mpsc::channel();
        let load = Arc::new(Load::default());
        let l = load.clone();
        let budgets = cfg.budgets;
        let parked = Arc::new(ParkedKv::new(cfg.park_ttl));
        let p = parked.clone();
        let thread = std::thread::Builder::new()
            .name("qaq-engine".into())
            .spawn(move || run(EngineState::new(model, cfg, l), rx, p))
            .expect("spawning the engine thread");
        Self { tx, aborts: Arc::default(), load, budgets, parked, thread: Some(thread) }
    }

    /// Ends every request, parking the KV cache of each one that had started (for its
    /// next worker to pull through Worker.ExportKv; a drain out of grace). Returns how
    /// many were parked.
    pub async fn park_all(&self) -> Result<usize, EngineError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx.send(Command::Park(tx)).map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)
    }

    /// The parked KV caches.
    pub fn parked(&self) -> &Arc<ParkedKv> {
        &self.parked
    }

    /// Queues a job.
    pub fn submit(&self, job: Job) -> Result<(), EngineError> {
        let ticket = self.aborts.register(&job.id);
        self.tx.send(Command::Submit(Box::new(job), ticket)).map_err(|_| EngineError::Stopped)
    }

    /// Aborts a request; resolves to whether it was queued, running or
    /// preempted (and not aborted already), once its KV memory is freed.
    /// The engine frees it at its next cache operation, in the middle of a
    /// step if need be.
    pub async fn abort(&self, id: &str) -> bool {
        let Some(freed) = self.aborts.abort(id) else { return false };
        for f in freed {
            // An error means the engine dropped the sequence: freed as well.
            let _ = f.await;
        }
        true
    }

    /// Aborts without waiting for the memory (used from `Drop`).
    pub fn abort_nowait(&self, id: &str) {
        let _ = self.aborts.abort(id);
    }

    /// Live load counters.
    pub fn load(&self) -> &Arc<Load> {
        &self.load
    }

    /// The KV budgets the engine runs under.
    pub fn budgets(&self) -> Budgets {
        self.budgets
    }
}

impl Drop for EngineHandle {
    fn drop(&mut self) {
        let _ = self.tx.send(Command::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run<M: StepModel>(mut st: EngineState<M>, rx: mpsc::Receiver<Command>, parked: Arc<ParkedKv>) {
    loop {
        // Block only when idle; otherwise take what has arrived and step.
        let first = if st.is_idle() {
            match rx.recv() {
                Ok(c) => Some(c),
                Err(_) => return,
            }
        } else {
            None
        };
        for cmd in first.into_iter().chain(std::iter::from_fn(|| rx.try_recv().ok())) {
            match cmd {
                Command::Submit(job, ticket) => st.submit(*job, ticket),
                Command::Park(reply) => {
                    let _ = reply.send(st.end_all(Some(&parked)));
                }
                Command::Shutdown => {
                    st.end_all(None);
                    return;
                }
            }
        }
        st.step();
        st.publish_load();
    }
}

/// Load snapshot helpers.
impl Load {
    pub fn running(&self) -> u32 {
        self.running.load(Ordering::Relaxed)
    }
    pub fn waiting(&self) -> u32 {
        self.waiting.load(Ordering::Relaxed)
    }
}
