//! `qaq-echo-worker`: a TEST ENGINE for the coordinator-overhead benchmark
//! (`qaq bench --spawn-echo`) only. It loads no model: Worker.Submit echoes
//! the prompt's words back as "tokens" at `--tokens-per-s` (0: at once). It
//! serves `qaq.v1.Worker`, registers and heartbeats like a real worker and
//! announces itself as model `echo`, so no real client can mistake it for
//! one. Functional tests use the real `qaq-worker`.

use std::collections::HashMap;
use std::io::Write;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use futures::Stream;
use qaq_proto::v1::registry_client::RegistryClient;
use qaq_proto::v1::worker_server::{Worker, WorkerServer};
use qaq_proto::v1::{
    AbortRequest, AbortResponse, DrainRequest, DrainResponse, ExportKvRequest, FinishReason, GenerateResponse,
    HeartbeatRequest, KvChunk, ModelInfo, RegisterRequest, StatsRequest, StatsResponse, SubmitRequest, Usage,
    WorkerLoad,
};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

/// Model name the echo engine announces.
const ECHO_MODEL: &str = "echo";

#[derive(Debug, Parser)]
#[command(name = "qaq-echo-worker", about = "TEST ENGINE for `qaq bench`: echoes prompt words, loads no model")]
struct Args {
    /// gRPC listen address.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: std::net::SocketAddr,
    /// Coordinator to register with (empty: standalone).
    #[arg(long, default_value = "")]
    coordinator: String,
    /// Worker id.
    #[arg(long, default_value = "echo-1")]
    worker_id: String,
    /// Tokens per second per request (0: as fast as possible).
    #[arg(long, default_value_t = 0.0)]
    tokens_per_s: f64,
    /// Registration secret.
    #[arg(long, env = "QAQ_REGISTRATION_SECRET", hide_env_values = true)]
    registration_secret: Option<String>,
    /// Batch size announced (the coordinator's per-worker slots).
    #[arg(long, default_value_t = 4096)]
    max_batch: u32,
}

#[derive(Clone)]
struct Echo {
    id: String,
    delay: Option<Duration>,
    max_batch: u32,
    running: Arc<AtomicU32>,
    generated: Arc<AtomicU64>,
    draining: Arc<AtomicBool>,
    aborts: Arc<Mutex<HashMap<String, oneshot::Sender<()>>>>,
}

fn model() -> ModelInfo {
    ModelInfo {
        name: ECHO_MODEL.into(),
        architecture: "echo".into(),
        context_length: 8192,
        vocab_size: 49152,
        workers: 0,
    }
}

impl Echo {
    fn load(&self) -> WorkerLoad {
        WorkerLoad {
            running: self.running.load(Ordering::Relaxed),
            max_batch: self.max_batch,
            generated_tokens_total: self.generated.load(Ordering::Relaxed),
            ..Default::default()
        }
    }
}

type EchoStream = Pin<Box<dyn Stream<Item = Result<GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Worker for Echo {
    type SubmitStream = EchoStream;
    type ExportKvStream = futures::stream::Empty<Result<KvChunk, Status>>;

    async fn submit(&self, request: Request<SubmitRequest>) -> Result<Response<EchoStream>, Status> {
        if self.draining.load(Ordering::Relaxed) {
            return Err(qaq_proto::status::draining("worker is draining"));
        }
        let SubmitRequest { request, resume_token_ids, .. } = request.into_inner();
        let r = request.ok_or_else(|| Status::invalid_argument("request: must be set"))?;
        let text = if r.messages.is_empty() {
            r.prompt.clone()
        } else {
            r.messages.iter().map(|m| m.content.as_str()).collect::<Vec<_>>().join(" ")
        };
        let words: Vec<String> = text.split_whitespace().map(|w| format!("{w} ")).collect();
        if words.is_empty() {
            return Err(Status::invalid_argument("prompt: no words to echo"));
        }
        let max_new = r.max_new_tokens.unwrap_or(16);
        let prompt_tokens = words.len() as u32;
        let (abort_tx, mut abort_rx) = oneshot::channel();
        self.aborts.lock().unwrap_or_else(|p| p.into_inner()).insert(r.request_id.clone(), abort_tx);
        let this = self.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        this.running.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let mut n = resume_token_ids.len() as u32;
            while n < max_new {
                if let Some(d) = this.delay {
                    tokio::select! {
                        _ = tokio::time::sleep(d) => {}
                        _ = &mut abort_rx => break,
                    }
                }
                let i = n as usize % words.len();
                n += 1;
                this.generated.fetch_add(1, Ordering::Relaxed);
                let last = n == max_new;
                let msg = GenerateResponse {
                    request_id: r.request_id.clone(),
                    text: words[i].clone(),
                    token_ids: vec![i as u32],
                    finish_reason: if last { FinishReason::Length as i32 } else { 0 },
                    usage: last.then_some(Usage { prompt_tokens, completion_tokens: n }),
                    worker_id: this.id.clone(),
                    ..Default::default()
                };
                if tx.send(Ok(msg)).await.is_err() {
                    break;
                }
            }
            this.running.fetch_sub(1, Ordering::Relaxed);
            this.aborts.lock().unwrap_or_else(|p| p.into_inner()).remove(&r.request_id);
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn abort(&self, request: Request<AbortRequest>) -> Result<Response<AbortResponse>, Status> {
        let id = request.into_inner().request_id;
        let found = self.aborts.lock().unwrap_or_else(|p| p.into_inner()).remove(&id).map(|tx| tx.send(()));
        Ok(Response::new(AbortResponse { found: found.is_some() }))
    }

    async fn stats(&self, _: Request<StatsRequest>) -> Result<Response<StatsResponse>, Status> {
        Ok(Response::new(StatsResponse {
            worker_id: self.id.clone(),
            load: Some(self.load()),
            model: Some(model()),
            draining: self.draining.load(Ordering::Relaxed),
        }))
    }

    async fn drain(&self, _: Request<DrainRequest>) -> Result<Response<DrainResponse>, Status> {
        self.draining.store(true, Ordering::Relaxed);
        Ok(Response::new(DrainResponse { in_flight: self.running.load(Ordering::Relaxed) }))
    }

    async fn export_kv(&self, _: Request<ExportKvRequest>) -> Result<Response<Self::ExportKvStream>, Status> {
        Err(Status::not_found("the echo worker keeps no KV caches"))
    }
}

/// Registers, then heartbeats; re-registers when forgotten or disconnected.
async fn keep_registered(echo: Echo, coordinator: String, address: String, secret: String) {
    loop {
        let session = async {
            let channel = qaq_proto::client::endpoint(&coordinator)?.connect().await?;
            let mut c = RegistryClient::new(channel);
            let r = c
                .register(RegisterRequest {
                    worker_id: echo.id.clone(),
                    address: address.clone(),
                    model: Some(model()),
                    secret: secret.clone(),
                    load: Some(echo.load()),
                    metrics_address: String::new(),
                })
                .await?
                .into_inner();
            let every = Duration::from_millis(r.heartbeat_interval_ms.clamp(50, 60_000));
            loop {
                tokio::time::sleep(every).await;
                let hb = HeartbeatRequest {
                    worker_id: echo.id.clone(),
                    load: Some(echo.load()),
                    secret: secret.clone(),
                    draining: echo.draining.load(Ordering::Relaxed),
                };
                if !c.heartbeat(hb).await?.into_inner().known {
                    return Ok::<(), Box<dyn std::error::Error + Send + Sync>>(());
                }
            }
        };
        if let Err(e) = session.await {
            eprintln!("qaq-echo-worker: coordinator {coordinator}: {e}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.tokens_per_s >= 0.0 && args.tokens_per_s.is_finite(), "--tokens-per-s: must be >= 0");
    let echo = Echo {
        id: args.worker_id.clone(),
        delay: (args.tokens_per_s > 0.0).then(|| Duration::from_secs_f64(1.0 / args.tokens_per_s)),
        max_batch: args.max_batch,
        running: Arc::default(),
        generated: Arc::default(),
        draining: Arc::default(),
        aborts: Arc::default(),
    };
    let listener = TcpListener::bind(args.listen).await?;
    let addr = listener.local_addr()?;
    println!("QAQ_WORKER_READY grpc={addr} metrics=-");
    std::io::stdout().flush()?;
    if !args.coordinator.is_empty() {
        let secret = args.registration_secret.clone().unwrap_or_default();
        tokio::spawn(keep_registered(echo.clone(), args.coordinator.clone(), addr.to_string(), secret));
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tonic::transport::Server::builder()
        .add_service(WorkerServer::new(echo))
        // TCP_NODELAY on accepted sockets, as the coordinator and the real worker do.
        .serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        })
        .await?;
    Ok(())
}
