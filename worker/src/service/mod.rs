//! The worker's gRPC service (`qaq.v1.Worker`): the surface that takes requests, hands
//! them to the engine and streams its events back.
//!
//! - [`prepare`]: a request validated against this worker, tokenized, made a job.
//! - [`migration`]: both sides of `Worker.ExportKv` (KV caches between workers).
//! - Errors are [`WorkerError`]s, turned into statuses by `From<WorkerError> for Status`.

pub mod migration;
pub mod prepare;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::Stream;
use qaq_proto::v1::worker_server::Worker;
use qaq_proto::v1::{
    AbortRequest, AbortResponse, DrainRequest, DrainResponse, ExportKvRequest, FinishReason, GenerateResponse, KvStats,
    ModelInfo, StatsRequest, StatsResponse, SubmitRequest, Usage, WorkerLoad,
};
use qaq_proto::validate;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use crate::engine::{EngineHandle, Event, Finish};
use crate::error::WorkerError;
use crate::model::LoadedModel;
use crate::nccl;
pub use migration::{KV_CHUNK_BYTES, Migration};
pub use prepare::KvSettings;

/// Longest `kv_source_address`.
const MAX_ADDRESS_BYTES: usize = 256;

/// Shared state of the service (cheap to clone).
#[derive(Clone)]
pub struct WorkerService {
    pub worker_id: String,
    max_batch: usize,
    kv: Arc<KvSettings>,
    model: Arc<LoadedModel>,
    engine: Arc<EngineHandle>,
    /// Set by the server when it starts to drain; read here and in heartbeats.
    draining: Arc<AtomicBool>,
    migration: Migration,
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
        tls: Arc<crate::tls::TlsConfig>,
    ) -> Self {
        let migration = Migration { model: model.clone(), tls, node: kv.node.clone(), budgets: engine.budgets() };
        Self { worker_id, max_batch, kv, model, engine, draining, migration }
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
        let o = Ordering::Relaxed;
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

    /// Validates, migrates when asked, and submits one request; the receiver of its events.
    async fn submit_request(&self, mut req: SubmitRequest) -> Result<mpsc::UnboundedReceiver<Event>, WorkerError> {
        if self.draining.load(Ordering::Relaxed) {
            return Err(WorkerError::Draining);
        }
        let source = std::mem::take(&mut req.kv_source_address);
        if source.len() > MAX_ADDRESS_BYTES || source.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
            return Err(WorkerError::invalid(
                "kv_source_address",
                format!("must be host:port of a worker (at most {MAX_ADDRESS_BYTES} bytes, no spaces)"),
            ));
        }
        // Tokenizing a long prompt is CPU work: keep it off the async threads.
        let (model, kv, budget) = (self.model.clone(), self.kv.clone(), self.engine.budgets().device);
        let (mut job, rx) = tokio::task::spawn_blocking(move || prepare::prepare(&model, &kv, budget, req))
            .await
            .map_err(|e| WorkerError::Internal(format!("tokenizer task failed: {e}")))??;
        if !source.is_empty() && !job.resume.is_empty() {
            job = self.migration.migrate(job, &source).await;
        }
        self.engine.submit(job).map_err(|_| WorkerError::EngineStopped)?;
        Ok(rx)
    }
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
        Event::Failed(f) => return Err(WorkerError::Engine(f).into()),
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
        use std::task::Poll;
        if self.done {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(ev)) => {
                if matches!(ev, Event::Done { .. } | Event::Failed(_)) {
                    self.done = true;
                }
                Poll::Ready(Some(to_response(&self.id, &self.worker_id, ev)))
            }
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(Some(Err(WorkerError::Internal("the engine dropped the request".into()).into())))
            }
            Poll::Pending => Poll::Pending,
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
        let req = request.into_inner();
        let id = req.request.as_ref().map(|r| r.request_id.clone()).unwrap_or_default();
        let rx = self.submit_request(req).await.inspect_err(|e| {
            tracing::debug!(id = %id, error_type = e.error_type(), error = %e, "submission refused");
        })?;
        let stream =
            EventStream { id, worker_id: self.worker_id.clone(), rx, engine: self.engine.clone(), done: false };
        Ok(Response::new(Box::pin(stream)))
    }

    type ExportKvStream = migration::ExportStream;

    async fn export_kv(&self, request: Request<ExportKvRequest>) -> Result<Response<Self::ExportKvStream>, Status> {
        let ExportKvRequest { request_id: id, nccl: offer } = request.into_inner();
        validate::id("request_id", &id)?;
        if id.is_empty() {
            return Err(WorkerError::invalid("request_id", "must be set").into());
        }
        if let Some(o) = &offer {
            nccl::check_node("nccl.node", &o.node).map_err(Status::invalid_argument)?;
        }
        let p = self.engine.parked().take(&id).ok_or_else(|| WorkerError::NotFound {
            field: "request_id",
            message: format!("no KV cache is parked under {id:?} (never parked, expired or taken)"),
        })?;
        Ok(Response::new(self.migration.export(id, p, offer.as_ref())))
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
