//! `qaq bench`: a gRPC load generator. N requests with a fixed prompt and
//! max_new_tokens, either closed-loop at concurrency C or open-loop at a
//! target rate; reports p50/p99 latency (request sent -> final message) and
//! requests/s. With `--worker-addr` (or `--spawn-echo`) the same load runs
//! directly against one worker's `Worker.Submit` as well, side by side, and
//! the coordinator's added latency is printed.
//!
//! With `--http-addr` (or `--spawn-echo`, whose coordinator then serves its
//! HTTP front too) the same load also runs through the coordinator's
//! OpenAI-compatible HTTP API (`POST /v1/completions`, streamed as SSE to its
//! `[DONE]`), and HTTP's latency is printed against gRPC's, measured side by
//! side in the same run.
//!
//! `--spawn-echo` starts a coordinator and one `qaq-echo-worker` (the TEST
//! ENGINE: echoes prompt words, no model) on loopback, which isolates the
//! coordinator's own overhead.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use qaq_coordinator::process::{ReadyChild, StdoutMode, spawn_ready};
use qaq_proto::v1::worker_client::WorkerClient;
use qaq_proto::v1::{GenerateRequest, SubmitRequest};
use tokio::process::Command;
use tonic::transport::Channel;

use crate::{DEFAULT_ADDR, connect};

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Coordinator address.
    #[arg(long, env = "QAQ_ADDR", default_value = DEFAULT_ADDR)]
    pub addr: String,
    /// Also run the load directly against this worker (Worker.Submit), side by side.
    #[arg(long)]
    pub worker_addr: Option<String>,
    /// Also run the load through the coordinator's HTTP front at this address (host:port,
    /// plaintext), side by side with gRPC.
    #[arg(long)]
    pub http_addr: Option<String>,
    /// Start a coordinator and one qaq-echo-worker (test engine, no model) on loopback and bench them.
    #[arg(long)]
    pub spawn_echo: bool,
    /// Tokens per second of each echo request (0: at once).
    #[arg(long, default_value_t = 0.0)]
    pub echo_tokens_per_s: f64,
    /// Requests per run.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub requests: u32,
    /// Closed loop: requests in flight at once.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub concurrency: u32,
    /// Open loop: send at this many requests per second (in addition to the closed-loop run).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Prompt of every request.
    #[arg(long, default_value = "one two three four five six seven eight")]
    pub prompt: String,
    /// max_new_tokens of every request.
    #[arg(long, default_value_t = 8)]
    pub max_new_tokens: u32,
    /// Model (empty: the cluster's default).
    #[arg(long, default_value = "")]
    pub model: String,
    /// Requests sent before measuring (per target).
    #[arg(long, default_value_t = 200)]
    pub warmup: u32,
}

/// The coordinator's HTTP front: a pooled HTTP/1.1 client, the completions
/// URL and the `authorization` header value.
#[derive(Clone)]
struct Http {
    client: HttpClient<HttpConnector, Full<Bytes>>,
    url: String,
    authorization: Option<String>,
}

impl Http {
    fn new(addr: &str, api_key: Option<&str>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Self {
            client: HttpClient::builder(TokioExecutor::new()).build(connector),
            url: format!("http://{addr}/v1/completions"),
            authorization: api_key.map(|k| format!("Bearer {k}")),
        }
    }

    /// One streamed completion, read to its `data: [DONE]`.
    async fn once(&self, req: &GenerateRequest) -> Result<(), tonic::Status> {
        let body = serde_json::json!({
            "model": req.model,
            "prompt": req.prompt,
            "max_tokens": req.max_new_tokens,
            "ignore_eos": req.ignore_eos,
            "temperature": 0,
            "stream": true,
        });
        let mut r = hyper::Request::post(&self.url).header("content-type", "application/json");
        if let Some(a) = &self.authorization {
            r = r.header("authorization", a);
        }
        let http_error = |e: &dyn std::fmt::Display| tonic::Status::unavailable(format!("HTTP: {e}"));
        let r = r.body(Full::new(Bytes::from(body.to_string()))).map_err(|e| http_error(&e))?;
        let response = self.client.request(r).await.map_err(|e| http_error(&e))?;
        let status = response.status();
        let body = response.into_body().collect().await.map_err(|e| http_error(&e))?.to_bytes();
        if !status.is_success() || !body.ends_with(b"data: [DONE]\n\n") {
            return Err(tonic::Status::unknown(format!("HTTP {status}: {}", String::from_utf8_lossy(&body))));
        }
        Ok(())
    }
}

#[derive(Clone)]
enum Target {
    Coordinator(qaq_proto::client::Client),
    Worker(WorkerClient<Channel>),
    Http(Http),
}

impl Target {
    fn name(&self) -> &'static str {
        match self {
            Self::Coordinator(_) => "coordinator",
            Self::Worker(_) => "direct-worker",
            Self::Http(_) => "coordinator-http",
        }
    }

    /// One request to its final message.
    async fn once(&self, req: GenerateRequest) -> Result<(), tonic::Status> {
        let mut s = match self {
            Self::Http(h) => return h.once(&req).await,
            Self::Coordinator(c) => c.clone().generate(req).await?.into_inner(),
            Self::Worker(w) => {
                let req = GenerateRequest { request_id: uuid::Uuid::new_v4().to_string(), ..req };
                w.clone().submit(SubmitRequest { request: Some(req), ..Default::default() }).await?.into_inner()
            }
        };
        while s.message().await?.is_some() {}
        Ok(())
    }
}

/// Latencies of one run.
#[derive(Debug)]
pub struct Report {
    pub target: String,
    pub mode: String,
    pub ok: usize,
    pub errors: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub per_s: f64,
}

/// The q-quantile (nearest rank) of sorted samples.
pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

async fn run_load(target: &Target, args: &BenchArgs, n: u32, rate: Option<f64>) -> Report {
    let req = GenerateRequest {
        model: args.model.clone(),
        prompt: args.prompt.clone(),
        max_new_tokens: Some(args.max_new_tokens),
        ignore_eos: true,
        ..Default::default()
    };
    let limit = Arc::new(tokio::sync::Semaphore::new(match rate {
        Some(_) => 4096,
        None => args.concurrency as usize,
    }));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(n as usize);
    for i in 0..n {
        if let Some(r) = rate {
            let at = started + Duration::from_secs_f64(f64::from(i) / r);
            tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
        }
        let permit = limit.clone().acquire_owned().await.expect("semaphore never closed");
        let (t, req) = (target.clone(), req.clone());
        tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let r = t.once(req).await;
            drop(permit);
            r.map(|()| t0.elapsed())
        }));
    }
    let mut lat = Vec::with_capacity(tasks.len());
    let mut errors = 0;
    let mut first_error = None;
    for t in tasks {
        match t.await {
            Ok(Ok(d)) => lat.push(d),
            Ok(Err(e)) => {
                errors += 1;
                first_error.get_or_insert(e);
            }
            Err(_) => errors += 1,
        }
    }
    let wall = started.elapsed();
    if let Some(e) = first_error {
        eprintln!("qaq bench: {}: {errors} errors, first: {:?}: {}", target.name(), e.code(), e.message());
    }
    lat.sort();
    Report {
        target: target.name().into(),
        mode: match rate {
            Some(r) => format!("rate {r:.0}/s"),
            None => format!("concurrency {}", args.concurrency),
        },
        ok: lat.len(),
        errors,
        p50: quantile(&lat, 0.50),
        p99: quantile(&lat, 0.99),
        per_s: lat.len() as f64 / wall.as_secs_f64().max(1e-9),
    }
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

fn print_runs(direct: Option<&Report>, coord: &Report, http: Option<&Report>) {
    for r in direct.into_iter().chain([coord]).chain(http) {
        println!(
            "{:<16} {:<18} {:>7} {:>6} {:>10} {:>10} {:>10.0}",
            r.target,
            r.mode,
            r.ok,
            r.errors,
            ms(r.p50),
            ms(r.p99),
            r.per_s
        );
    }
    let added = |a: Duration, b: Duration| (a.as_secs_f64() - b.as_secs_f64()) * 1e3;
    if let Some(h) = http {
        println!(
            "  HTTP vs gRPC through the coordinator ({}): p50 {:+.3} ms, p99 {:+.3} ms; requests/s {:.0} vs {:.0}",
            h.mode,
            added(h.p50, coord.p50),
            added(h.p99, coord.p99),
            h.per_s,
            coord.per_s
        );
    }
    if let Some(d) = direct {
        println!(
            "  added by the coordinator ({}): p50 {:+.3} ms, p99 {:+.3} ms; requests/s {:.0} vs {:.0} direct",
            coord.mode,
            added(coord.p50, d.p50),
            added(coord.p99, d.p99),
            coord.per_s,
            d.per_s
        );
    }
}

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    Ok(me.with_file_name(name))
}

/// (children, coordinator gRPC address, echo worker address, coordinator HTTP address).
async fn spawn_echo(args: &BenchArgs) -> anyhow::Result<(Vec<ReadyChild>, String, String, String)> {
    let mut cmd = Command::new(sibling("qaq-coordinator")?);
    cmd.args(["--listen", "127.0.0.1:0", "--heartbeat-interval-ms", "200", "--lease-ms", "1000"])
        .args(["--http-listen", "127.0.0.1:0"])
        .env("QAQ_LOG", "warn");
    let coord =
        spawn_ready(cmd, "coordinator", qaq_coordinator::READY_PREFIX, Duration::from_secs(30), StdoutMode::Discard)
            .await?;
    let caddr = coord.ready.get("grpc").unwrap_or_default().to_string();
    let haddr = coord.ready.get("http").unwrap_or_default().to_string();
    let mut cmd = Command::new(sibling("qaq-echo-worker")?);
    cmd.args(["--coordinator", &caddr, "--tokens-per-s", &args.echo_tokens_per_s.to_string()]);
    let worker = spawn_ready(cmd, "echo", "QAQ_WORKER_READY", Duration::from_secs(30), StdoutMode::Discard).await?;
    let waddr = worker.ready.get("grpc").unwrap_or_default().to_string();
    // Wait until the coordinator lists the echo worker UP.
    let mut c = connect(&caddr, None).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = c.cluster_status(qaq_proto::v1::ClusterStatusRequest {}).await?.into_inner();
        if s.workers.iter().any(|w| w.state == qaq_proto::v1::WorkerState::Up as i32) {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the echo worker did not register within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((vec![coord, worker], caddr, waddr, haddr))
}

pub async fn run(args: BenchArgs, api_key: Option<&str>) -> anyhow::Result<ExitCode> {
    let (mut children, addr, worker_addr, http_addr) = if args.spawn_echo {
        let (c, a, w, h) = spawn_echo(&args).await?;
        (c, a, Some(w), Some(h))
    } else {
        (Vec::new(), args.addr.clone(), args.worker_addr.clone(), args.http_addr.clone())
    };
    let http = http_addr.map(|h| Target::Http(Http::new(&h, api_key)));
    let coord = Target::Coordinator(connect(&addr, api_key).await?);
    let direct = match &worker_addr {
        Some(w) => {
            Some(Target::Worker(WorkerClient::new(qaq_proto::client::endpoint(w)?.tcp_nodelay(true).connect().await?)))
        }
        None => None,
    };
    println!(
        "qaq bench: {} requests, prompt {:?}, max_new_tokens {}, {} CPU cores on this machine",
        args.requests,
        args.prompt,
        args.max_new_tokens,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<16} {:<18} {:>7} {:>6} {:>10} {:>10} {:>10}",
        "TARGET", "MODE", "OK", "ERR", "P50_MS", "P99_MS", "REQ/S"
    );
    let mut failed = false;
    let modes: Vec<Option<f64>> = args.rate.into_iter().map(Some).chain([None]).collect();
    for rate in modes {
        let d = match &direct {
            Some(t) => {
                run_load(t, &args, args.warmup, None).await;
                Some(run_load(t, &args, args.requests, rate).await)
            }
            None => None,
        };
        run_load(&coord, &args, args.warmup, None).await;
        let c = run_load(&coord, &args, args.requests, rate).await;
        let h = match &http {
            Some(t) => {
                run_load(t, &args, args.warmup, None).await;
                Some(run_load(t, &args, args.requests, rate).await)
            }
            None => None,
        };
        failed |= c.errors > 0 || [&d, &h].iter().any(|r| r.as_ref().is_some_and(|r| r.errors > 0));
        print_runs(d.as_ref(), &c, h.as_ref());
    }
    for c in &mut children {
        c.shutdown(Duration::from_secs(5)).await;
    }
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_quantiles() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(quantile(&v, 0.5), Duration::from_millis(50));
        assert_eq!(quantile(&v, 0.99), Duration::from_millis(99));
        assert_eq!(quantile(&v[..1], 0.99), Duration::from_millis(1));
        assert_eq!(quantile(&[], 0.5), Duration::ZERO);
    }
}
