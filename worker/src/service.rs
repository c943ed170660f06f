//! The worker's gRPC service (`qaq.v1.Worker`): validates and tokenizes
//! requests, hands them to the engine and streams its events back. A migrated
//! request that names its previous worker (`kv_source_address`) has its KV cache
//! pulled from there (Worker.ExportKv) and restored instead of prefilled again;
//! this worker serves its own parked caches the same way.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use metrics::counter;
use qaq_proto::v1::worker_client::WorkerClient;
use qaq_proto::v1::worker_server::Worker;
use qaq_proto::v1::{
    AbortRequest, AbortResponse, DrainRequest, DrainResponse, ExportKvRequest, FinishReason, GenerateResponse, KvChunk,
    KvStats, ModelInfo, StatsRequest, StatsResponse, SubmitRequest, Usage, WorkerLoad,
};
use qaq_proto::validate;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use crate::cache::{self, PolicyChoice, QaqOverrides, SeqCache};
use crate::engine::{EngineHandle, Event, Finish, Job, SamplingConfig};
use crate::metrics as m;
use crate::model::{KvCache, LoadedModel};
use crate::nccl;
use crate::tls::TlsConfig;

/// Bytes per Worker.ExportKv message.
pub const KV_CHUNK_BYTES: usize = 1 << 20;
/// How long pulling a migrated request's KV cache may take before the worker prefills.
const KV_PULL_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest `kv_source_address`.
const MAX_ADDRESS_BYTES: usize = 256;

/// The worker's KV settings, against which requests are resolved.
#[derive(Debug)]
pub struct KvSettings {
    /// Default policy (`--kv-policy` with the `--kv-*` flags applied).
    pub default: PolicyChoice,
    /// Worst-case device bytes per token, by policy label (measured once each).
    worst: std::sync::Mutex<std::collections::HashMap<String, usize>>,
    /// The node this worker runs on (NCCL migration between workers of one node).
    pub node: String,
}

impl KvSettings {
    /// Settings with default policy `default`, on the node named by the host name.
    pub fn new(default: PolicyChoice) -> Self {
        Self { default, worst: Default::default(), node: crate::config::hostname() }
    }

    /// The same settings on node `node`.
    pub fn on_node(self, node: String) -> Self {
        Self { node, ..self }
    }

    /// The request's policy: its override (string and QAQ fields) or the default.
    pub fn resolve(&self, req: Option<&qaq_proto::v1::KvPolicy>) -> Result<PolicyChoice, Status> {
        let Some(p) = req else { return Ok(self.default.clone()) };
        let base = if p.policy.trim().is_empty() {
            self.default.clone()
        } else {
            PolicyChoice::parse(&p.policy).map_err(|e| Status::invalid_argument(format!("kv_policy.policy: {e}")))?
        };
        let o = QaqOverrides {
            sigma_s: p.sigma_s.map(f64::from),
            sigma_x: p.sigma_x.map(f64::from),
            outlier_ratio: p.outlier_ratio.map(f64::from),
            window: p.window.map(|w| w as usize),
            min_bits: p.min_bits.map(|b| b.min(255) as u8),
            max_bits: p.max_bits.map(|b| b.min(255) as u8),
            every: None,
        };
        o.apply(base, "kv_policy").map_err(Status::invalid_argument)
    }

    /// Worst-case device bytes per token of a policy for this model.
    pub fn worst_bytes_per_token(&self, model: &LoadedModel, p: &PolicyChoice) -> Result<usize, Status> {
        let mut m = self.worst.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&w) = m.get(&p.label) {
            return Ok(w);
        }
        let w = cache::worst_bytes_per_token(&model.model.kv_shape(), &p.policy)
            .map_err(|e| Status::invalid_argument(format!("kv_policy: {e}")))?;
        m.insert(p.label.clone(), w);
        Ok(w)
    }
}

/// The cache `pulled` from a request's previous worker, restored, when it is of the
/// request's policy and holds a strict prefix of its tokens (`all`: prompt, then resumed).
fn restore_kv(model: &LoadedModel, policy: &PolicyChoice, all: &[u32], pulled: PulledKv) -> Result<SeqCache, String> {
    if pulled.policy != policy.label {
        return Err(format!("its policy {:?} is not the request's {:?}", pulled.policy, policy.label));
    }
    let n = pulled.tokens.len();
    if n == 0 || n >= all.len() || pulled.tokens[..] != all[..n] {
        return Err(format!("its {n} tokens are not a strict prefix of the request's {} tokens", all.len()));
    }
    let kv = SeqCache::restore(&model.model.kv_shape(), policy, &pulled.bytes).map_err(|e| e.to_string())?;
    if kv.len() != n {
        return Err(format!("it holds {} tokens, announced {n}", kv.len()));
    }
    Ok(kv)
}

/// A KV cache pulled from a request's previous worker.
#[derive(Debug)]
struct PulledKv {
    tokens: Vec<u32>,
    policy: String,
    bytes: Vec<u8>,
}

/// Shared state of the service (cheap to clone).
#[derive(Clone)]
pub struct WorkerService {
    pub worker_id: String,
    max_batch: usize,
    kv: Arc<KvSettings>,
    model: Arc<LoadedModel>,
    engine: Arc<EngineHandle>,
    draining: Arc<AtomicBool>,
    /// For dialing other workers (KV migration).
    tls: Arc<TlsConfig>,
}

impl std::fmt::Debug for WorkerService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerService").field("worker_id", &self.worker_id).finish_non_exhaustive()
    }
}

impl WorkerService {
    pub fn new(
        worker_id: String,
        max_batch: usize,
        kv: Arc<KvSettings>,
        model: Arc<LoadedModel>,
        engine: Arc<EngineHandle>,
        draining: Arc<AtomicBool>,
        tls: Arc<TlsConfig>,
    ) -> Self {
        Self { worker_id, max_batch, kv, model, engine, draining, tls }
    }

    /// Pulls request `id`'s parked KV cache from the worker at `addr`.
    async fn pull_kv(&self, addr: &str, id: &str) -> anyhow::Result<PulledKv> {
        let channel = self.tls.peer_endpoint(addr)?.connect_timeout(Duration::from_secs(5)).connect().await?;
        let mut client = WorkerClient::new(channel).max_decoding_message_size(2 * KV_CHUNK_BYTES);
        let nccl = nccl::offer(&self.model, &self.kv.node);
        let mut stream = client.export_kv(ExportKvRequest { request_id: id.to_string(), nccl }).await?.into_inner();
        let first =
            stream.message().await?.ok_or_else(|| anyhow::anyhow!("the stream ended before its first chunk"))?;
        // A cache larger than both tiers could not run here anyway.
        let b = self.engine.budgets();
        let cap = b.device.saturating_add(b.host);
        anyhow::ensure!(first.total_bytes <= cap, "{} bytes exceed the KV budgets ({cap} bytes)", first.total_bytes);
        let total = first.total_bytes as usize;
        if !first.nccl_id.is_empty() {
            // Device to device: the exporter's stream ends once its send completed.
            anyhow::ensure!(first.data.is_empty(), "an NCCL answer carries no data chunks");
            let bytes = nccl::recv(&self.model, first.nccl_id, total).await?;
            while let Some(c) = stream.message().await? {
                anyhow::ensure!(c.data.is_empty(), "data chunks after an NCCL transfer");
            }
            tracing::info!(id, bytes = total, "KV cache received over NCCL");
            return Ok(PulledKv { tokens: first.token_ids, policy: first.kv_policy, bytes });
        }
        let mut bytes = Vec::with_capacity(total);
        bytes.extend_from_slice(&first.data);
        while let Some(c) = stream.message().await? {
            anyhow::ensure!(bytes.len() + c.data.len() <= total, "more than the announced {total} bytes");
            bytes.extend_from_slice(&c.data);
        }
        anyhow::ensure!(bytes.len() == total, "{} of the announced {total} bytes arrived", bytes.len());
        Ok(PulledKv { tokens: first.token_ids, policy: first.kv_policy, bytes })
    }

    /// A migrated job with the KV cache pulled from its previous worker at `source`, or
    /// as it is (to be prefilled) when the pull or the restore fails.
    async fn migrate_kv(&self, mut job: Job, source: &str) -> Job {
        let pulled = match tokio::time::timeout(KV_PULL_TIMEOUT, self.pull_kv(source, &job.id)).await {
            Ok(r) => r,
            Err(_) => Err(anyhow::anyhow!("no answer within {KV_PULL_TIMEOUT:?}")),
        };
        let bytes = pulled.as_ref().map_or(0, |p| p.bytes.len() as u64);
        let (model, policy) = (self.model.clone(), job.policy.clone());
        let all: Vec<u32> = job.prompt.iter().chain(&job.resume).copied().collect();
        // Restoring a long context's cache is CPU work: off the async threads.
        let restored = tokio::task::spawn_blocking(move || {
            pulled.map_err(|e| format!("pulling it failed: {e:#}")).and_then(|p| restore_kv(&model, &policy, &all, p))
        })
        .await
        .unwrap_or_else(|e| Err(format!("the restore task failed: {e}")));
        let outcome = restored.map(|kv| job.kv = Some(kv));
        match outcome {
            Ok(()) => {
                tracing::info!(id = %job.id, from = %source, bytes, "KV cache migrated in");
                counter!(m::KV_MIGRATIONS_TOTAL, "direction" => "in", "outcome" => "transferred").increment(1);
                counter!(m::KV_MIGRATION_BYTES_TOTAL, "direction" => "in").increment(bytes);
            }
            Err(e) => {
                tracing::warn!(id = %job.id, from = %source, error = %e, "KV cache not migrated: prefilling instead");
                counter!(m::KV_MIGRATIONS_TOTAL, "direction" => "in", "outcome" => "prefilled").increment(1);
            }
        }
        job
    }

    /// The model as announced to the coordinator.
    pub fn model_info(model: &LoadedModel) -> ModelInfo {
        let c = model.model.config();
        ModelInfo {
            name: model.name.clone(),
            architecture: c.architecture.clone(),
            context_length: c.context_length as u32,
            vocab_size: c.vocab_size as u32,
            workers: 0,
        }
    }

    /// Current load.
    pub fn load(engine: &EngineHandle, max_batch: usize) -> WorkerLoad {
        let l = engine.load();
        let o = std::sync::atomic::Ordering::Relaxed;
        let tokens = l.cached_tokens.load(o);
        let dev = l.kv_device_bytes.load(o);
        let budgets = engine.budgets();
        WorkerLoad {
            running: l.running(),
            waiting: l.waiting(),
            max_batch: max_batch as u32,
            kv_device_bytes: dev,
            kv_device_budget_bytes: budgets.device,
            kv_host_bytes: l.kv_host_bytes.load(o),
            kv_host_budget_bytes: budgets.host,
            avg_bytes_per_token: if tokens > 0 { dev as f64 / tokens as f64 } else { 0.0 },
            kv_fp16_equivalent_bytes: l.kv_fp16_equivalent_bytes.load(o),
            generated_tokens_total: l.generated_total.load(o),
        }
    }

    /// Validates, tokenizes and builds the engine job.
    fn prepare(&self, req: SubmitRequest) -> Result<(Job, mpsc::UnboundedReceiver<Event>), Status> {
        let cfg = self.model.model.config();
        let ctx = cfg.context_length;
        let r = req.request.ok_or_else(|| Status::invalid_argument("request: must be set"))?;
        validate::generate_request(&r, ctx as u32, cfg.vocab_size as u32)?;
        if r.request_id.is_empty() {
            return Err(Status::invalid_argument("request.request_id: must be set by the coordinator"));
        }
        if !r.model.is_empty() && r.model != self.model.name {
            return Err(Status::not_found(format!(
                "model: {:?} is not served by this worker (it serves {:?})",
                r.model, self.model.name
            )));
        }
        let policy = self.kv.resolve(r.kv_policy.as_ref())?;
        let worst = self.kv.worst_bytes_per_token(&self.model, &policy)?;
        let tok = &self.model.tokenizer;
        let text = if r.messages.is_empty() {
            r.prompt.clone()
        } else {
            let turns: Vec<(String, String)> = r.messages.iter().map(|m| (m.role.clone(), m.content.clone())).collect();
            tok.render_chat(&turns).map_err(|e| Status::invalid_argument(format!("messages: {e}")))?
        };
        let prompt = tok.encode(&text).map_err(|e| Status::invalid_argument(format!("prompt: {e}")))?;
        if prompt.is_empty() {
            return Err(Status::invalid_argument("prompt: tokenizes to no tokens"));
        }
        if let Some(&bad) = req.resume_token_ids.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(Status::invalid_argument(format!(
                "resume_token_ids: token {bad} outside the vocabulary [0, {})",
                cfg.vocab_size
            )));
        }
        let used = prompt.len() + req.resume_token_ids.len();
        if used >= ctx {
            return Err(Status::invalid_argument(format!(
                "prompt: {} tokens (with {} resumed) but the context holds {ctx}; at most {} prompt tokens are allowed",
                prompt.len(),
                req.resume_token_ids.len(),
                ctx - 1
            )));
        }
        let device_budget = self.engine.budgets().device;
        let need = (used as u64).saturating_mul(worst as u64);
        if need > device_budget {
            return Err(Status::resource_exhausted(format!(
                "prompt: {used} tokens need up to {need} bytes of KV cache under {:?}, more than the worker's \
                 device budget (--kv-device-budget-bytes {device_budget})",
                policy.label
            )));
        }
        let room = (ctx - prompt.len()) as u32;
        let max_new = match r.max_new_tokens {
            Some(n) if n > room => {
                return Err(Status::invalid_argument(format!(
                    "max_new_tokens: must be in [1, {room}] for this {}-token prompt (context {ctx}), got {n}",
                    prompt.len()
                )));
            }
            Some(n) => n,
            None => validate::DEFAULT_MAX_NEW_TOKENS.min(room),
        };
        if req.resume_token_ids.len() as u32 >= max_new {
            return Err(Status::invalid_argument(format!(
                "resume_token_ids: {} tokens already reach max_new_tokens {max_new}",
                req.resume_token_ids.len()
            )));
        }
        let s = r.sampling.unwrap_or_default();
        let sampling = SamplingConfig {
            temperature: s.temperature.unwrap_or(0.0),
            top_p: s.top_p.unwrap_or(1.0),
            top_k: s.top_k.unwrap_or(0) as usize,
            repetition_penalty: s.repetition_penalty.unwrap_or(1.0),
            seed: s.seed.unwrap_or_else(|| seed_of(&r.request_id)),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let job = Job {
            id: r.request_id,
            prompt,
            resume: req.resume_token_ids,
            kv: None,
            max_new_tokens: max_new,
            sampling,
            stops: r.stop,
            ignore_eos: r.ignore_eos,
            policy,
            worst_bytes_per_token: worst,
            events: tx,
            received: Instant::now(),
        };
        Ok((job, rx))
    }
}

fn seed_of(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

/// Maps an engine event to the wire message.
pub fn to_response(id: &str, worker_id: &str, ev: Event) -> Result<GenerateResponse, Status> {
    let base = GenerateResponse { request_id: id.to_string(), worker_id: worker_id.to_string(), ..Default::default() };
    Ok(match ev {
        Event::Delta { text, token_ids } => GenerateResponse { text, token_ids, ..base },
        Event::Done { text, token_ids, finish, prompt_tokens, completion_tokens, kv } => {
            let finish_reason = match finish {
                Finish::Length => FinishReason::Length,
                Finish::Stop => FinishReason::Stop,
                Finish::Eos => FinishReason::Eos,
                Finish::Aborted => FinishReason::Aborted,
                Finish::Context => FinishReason::Context,
            };
            let ratio =
                if kv.device_bytes > 0 { kv.fp16_equivalent_bytes as f64 / kv.device_bytes as f64 } else { 0.0 };
            GenerateResponse {
                text,
                token_ids,
                finish_reason: finish_reason as i32,
                usage: Some(Usage { prompt_tokens, completion_tokens }),
                kv_stats: Some(KvStats {
                    policy: kv.policy,
                    avg_key_bits: kv.avg_key_bits,
                    avg_value_bits: kv.avg_value_bits,
                    device_bytes: kv.device_bytes,
                    fp16_equivalent_bytes: kv.fp16_equivalent_bytes,
                    compression_ratio: ratio,
                    requantizations_up: kv.requantizations_up,
                    requantizations_down: kv.requantizations_down,
                }),
                ..base
            }
        }
        Event::Failed(msg) => return Err(Status::internal(msg)),
    })
}

/// The response stream of one request; dropping it before the end aborts the
/// request in the engine.
struct EventStream {
    id: String,
    worker_id: String,
    /// Events from the engine thread, which holds the sending end in the job.
    rx: mpsc::UnboundedReceiver<Event>,
    engine: Arc<EngineHandle>,
    done: bool,
}

impl Stream for EventStream {
    type Item = Result<GenerateResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Self::Item>> {
        if self.done {
            return std::task::Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            std::task::Poll::Ready(Some(ev)) => {
                if matches!(ev, Event::Done { .. } | Event::Failed(_)) {
                    self.done = true;
                }
                std::task::Poll::Ready(Some(to_response(&self.id, &self.worker_id, ev)))
            }
            std::task::Poll::Ready(None) => {
                self.done = true;
                std::task::Poll::Ready(Some(Err(Status::internal("the engine dropped the request"))))
            }
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        if !self.done {
            self.engine.abort_nowait(&self.id);
        }
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Worker for WorkerService {
    type SubmitStream = ResponseStream;

    async fn submit(&self, request: Request<SubmitRequest>) -> Result<Response<Self::SubmitStream>, Status> {
        if self.draining.load(Ordering::Relaxed) {
            return Err(qaq_proto::status::draining("worker is draining"));
        }
        let mut req = request.into_inner();
        let source = std::mem::take(&mut req.kv_source_address);
        if source.len() > MAX_ADDRESS_BYTES || source.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
            return Err(Status::invalid_argument(format!(
                "kv_source_address: must be host:port of a worker (at most {MAX_ADDRESS_BYTES} bytes, no spaces)"
            )));
        }
        // Tokenizing a long prompt is CPU work: keep it off the async threads.
        let this = self.clone();
        let (mut job, rx) = tokio::task::spawn_blocking(move || this.prepare(req))
            .await
            .map_err(|e| Status::internal(format!("tokenizer task failed: {e}")))??;
        if !source.is_empty() && !job.resume.is_empty() {
            job = self.migrate_kv(job, &source).await;
        }
        let id = job.id.clone();
        self.engine.submit(job).map_err(|e| Status::unavailable(e.to_string()))?;
        let stream =
            EventStream { id, worker_id: self.worker_id.clone(), rx, engine: self.engine.clone(), done: false };
        Ok(Response::new(Box::pin(stream)))
    }

    type ExportKvStream = Pin<Box<dyn Stream<Item = Result<KvChunk, Status>> + Send>>;

    async fn export_kv(&self, request: Request<ExportKvRequest>) -> Result<Response<Self::ExportKvStream>, Status> {
        let ExportKvRequest { request_id: id, nccl: offer } = request.into_inner();
        validate::id("request_id", &id)?;
        if id.is_empty() {
            return Err(Status::invalid_argument("request_id: must be set"));
        }
        if let Some(o) = &offer {
            nccl::check_node("nccl.node", &o.node).map_err(Status::invalid_argument)?;
        }
        let p = self.engine.parked().take(&id).ok_or_else(|| {
            Status::not_found(format!(
                "request_id: no KV cache is parked under {id:?} (never parked, expired or taken)"
            ))
        })?;
        counter!(m::KV_MIGRATIONS_TOTAL, "direction" => "out", "outcome" => "transferred").increment(1);
        counter!(m::KV_MIGRATION_BYTES_TOTAL, "direction" => "out").increment(p.bytes.len() as u64);
        if nccl::accepts(offer.as_ref(), &self.kv.node, nccl::usable(&self.model)) {
            match nccl::new_id() {
                Ok(nccl_id) => {
                    let first = KvChunk {
                        data: Vec::new(),
                        total_bytes: p.bytes.len() as u64,
                        token_ids: p.tokens,
                        kv_policy: p.policy,
                        nccl_id: nccl_id.clone(),
                    };
                    let model = self.model.clone();
                    let sent = async move {
                        let r = tokio::time::timeout(KV_PULL_TIMEOUT, nccl::send(&model, nccl_id, p.bytes)).await;
                        match r.unwrap_or_else(|_| {
                            Err(anyhow::anyhow!("the puller did not join within {KV_PULL_TIMEOUT:?}"))
                        }) {
                            Ok(()) => None,
                            Err(e) => {
                                tracing::warn!(id = %id, error = %format!("{e:#}"), "NCCL send of a parked KV cache failed");
                                Some(Err(Status::internal(format!("NCCL send failed: {e:#}"))))
                            }
                        }
                    };
                    let s = futures::stream::once(async move { Ok(first) })
                        .chain(futures::stream::once(sent).filter_map(|x| async move { x }));
                    return Ok(Response::new(Box::pin(s)));
                }
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "no NCCL id: sending the KV cache over gRPC"),
            }
        }
        let mut chunks: Vec<KvChunk> =
            p.bytes.chunks(KV_CHUNK_BYTES).map(|c| KvChunk { data: c.to_vec(), ..Default::default() }).collect();
        if chunks.is_empty() {
            chunks.push(KvChunk::default());
        }
        chunks[0].total_bytes = p.bytes.len() as u64;
        chunks[0].token_ids = p.tokens;
        chunks[0].kv_policy = p.policy;
        Ok(Response::new(Box::pin(futures::stream::iter(chunks.into_iter().map(Ok)))))
    }

    async fn abort(&self, request: Request<AbortRequest>) -> Result<Response<AbortResponse>, Status> {
        let id = request.into_inner().request_id;
        validate::id("request_id", &id)?;
        Ok(Response::new(AbortResponse { found: self.engine.abort(&id).await }))
    }

    async fn stats(&self, _: Request<StatsRequest>) -> Result<Response<StatsResponse>, Status> {
        Ok(Response::new(StatsResponse {
            worker_id: self.worker_id.clone(),
            load: Some(Self::load(&self.engine, self.max_batch)),
            model: Some(Self::model_info(&self.model)),
            draining: self.draining.load(Ordering::Relaxed),
        }))
    }

    async fn drain(&self, _: Request<DrainRequest>) -> Result<Response<DrainResponse>, Status> {
        self.draining.store(true, Ordering::Relaxed);
        let l = self.engine.load();
        Ok(Response::new(DrainResponse { in_flight: l.running() + l.waiting() }))
    }
}
