//! Spawns real `qaq-coordinator` and `qaq-worker` processes on ephemeral
//! ports, waits on their READY lines (never on a port), and kills them when
//! dropped.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use qaq_coordinator::process::{ReadyChild, StdoutMode, spawn_ready};
use qaq_proto::client::{ApiKey, Client};
use qaq_proto::v1::generation_client::GenerationClient;
use qaq_proto::v1::worker_client::WorkerClient;
use qaq_proto::v1::{ClusterStatusRequest, ClusterStatusResponse, StatsRequest, WorkerLoad, WorkerState};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tonic::transport::Channel;

/// Prefix of the worker's READY line.
pub const WORKER_READY: &str = "QAQ_WORKER_READY";
/// Upper bound for any state change we poll for.
pub const POLL_LIMIT: Duration = Duration::from_secs(10);

/// Serializes the tests of this binary: each starts model-running processes,
/// and on a 2-core machine running them side by side only adds contention.
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// The real model; a missing model fails the test (never skips it).
pub fn model_path() -> PathBuf {
    let p = workspace().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "model not found at {}: run scripts/fetch-model.sh (make test does) before these tests",
        p.display()
    );
    p
}

/// `qaq-worker`: `$QAQ_WORKER_BIN`, else next to the coordinator binary.
pub fn worker_bin() -> PathBuf {
    let p = match std::env::var_os("QAQ_WORKER_BIN") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_BIN_EXE_qaq-coordinator")).with_file_name("qaq-worker"),
    };
    assert!(
        p.exists(),
        "qaq-worker not found at {}: build it in the same target dir (cargo build --release -p qaq-worker) or set QAQ_WORKER_BIN",
        p.display()
    );
    p
}

/// How a [`TestCluster`] is started.
#[derive(Debug, Clone, Default)]
pub struct Opts {
    /// Workers `w1..wn`.
    pub workers: usize,
    /// Coordinators (replicas; 0 counts as 1); every worker registers with each.
    pub coordinators: usize,
    /// Lease (heartbeats every `lease_ms / 5`).
    pub lease_ms: u64,
    /// Extra coordinator flags.
    pub coordinator_args: Vec<String>,
    /// Extra flags of every worker.
    pub worker_args: Vec<String>,
    /// Coordinator stderr goes to this file (default: inherited).
    pub coordinator_stderr: Option<PathBuf>,
    /// `QAQ_LOG` of the coordinator (default `warn`).
    pub coordinator_log: Option<String>,
    /// API key the harness' clients send.
    pub api_key: Option<String>,
    /// Scheme and client TLS of the coordinator (default: plaintext).
    pub client_tls: Option<tonic::transport::ClientTlsConfig>,
}

impl Opts {
    /// `n` workers, lease `lease_ms`, nothing else.
    pub fn new(workers: usize, lease_ms: u64) -> Self {
        Self { workers, lease_ms, ..Self::default() }
    }
}

/// A coordinator process (or several) and its workers.
pub struct TestCluster {
    /// The coordinator (first) ...
    pub coordinator: ReadyChild,
    /// ... the other coordinators (replicas), when there are several ...
    pub replicas: Vec<ReadyChild>,
    /// ... and its workers, in start order.
    pub workers: Vec<ReadyChild>,
    /// How it was started.
    pub opts: Opts,
}

impl TestCluster {
    /// Starts a coordinator (lease `lease_ms`, heartbeats every `lease_ms / 5`)
    /// and `n` workers named `w1..wn`, and waits until all are UP.
    pub async fn start(n: usize, lease_ms: u64) -> Self {
        Self::start_with(Opts::new(n, lease_ms)).await
    }

    /// Starts a cluster as `opts` say and waits until every worker is UP.
    pub async fn start_with(opts: Opts) -> Self {
        let coordinator = start_coordinator(&opts, "127.0.0.1:0").await;
        let mut replicas = Vec::new();
        for _ in 1..opts.coordinators {
            replicas.push(start_coordinator(&opts, "127.0.0.1:0").await);
        }
        let mut cluster = Self { coordinator, replicas, workers: Vec::new(), opts };
        let n = cluster.opts.workers;
        if n > 0 {
            let starts: Vec<_> = (1..=n).map(|i| cluster.worker_command(&format!("w{i}"), &[])).collect();
            let starts = starts.into_iter().enumerate().map(|(i, cmd)| async move {
                spawn_ready(cmd, &format!("w{}", i + 1), WORKER_READY, Duration::from_secs(180), StdoutMode::Discard)
                    .await
            });
            for w in futures::future::join_all(starts).await {
                cluster.workers.push(w.expect("worker starts"));
            }
            cluster.wait_state(|s| up_count(s) == n, "all workers UP").await;
        }
        cluster
    }

    /// Every coordinator's gRPC address (the first, then the replicas).
    pub fn coordinator_addrs(&self) -> Vec<String> {
        std::iter::once(&self.coordinator).chain(&self.replicas).map(grpc_of).collect()
    }

    /// The command line of a worker `id` of this cluster, plus `extra` flags.
    pub fn worker_command(&self, id: &str, extra: &[&str]) -> Command {
        let mut cmd = Command::new(worker_bin());
        cmd.arg("serve")
            .arg("--model")
            .arg(model_path())
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .args(["--coordinator", &self.coordinator_addrs().join(","), "--worker-id", id])
            .args(&self.opts.worker_args)
            .args(extra)
            .env("QAQ_LOG", "warn")
            .stderr(Stdio::inherit());
        cmd
    }

    /// The coordinator's gRPC address.
    pub fn grpc(&self) -> String {
        grpc_of(&self.coordinator)
    }

    /// A client of the coordinator (sending the API key of the options).
    pub async fn client(&self) -> Client {
        self.client_with_key(self.opts.api_key.as_deref()).await
    }

    /// A client sending `key`.
    pub async fn client_with_key(&self, key: Option<&str>) -> Client {
        GenerationClient::with_interceptor(self.channel().await, ApiKey::new(key).expect("printable key"))
    }

    /// A channel to the coordinator (for health and reflection clients).
    pub async fn channel(&self) -> Channel {
        let scheme = if self.opts.client_tls.is_some() { "https" } else { "http" };
        let mut ep = tonic::transport::Endpoint::from_shared(format!("{scheme}://{}", self.grpc())).unwrap();
        if let Some(tls) = &self.opts.client_tls {
            ep = ep.tls_config(tls.clone()).unwrap();
        }
        ep.connect().await.expect("connect to coordinator")
    }

    /// ClusterStatus.
    pub async fn status(&self) -> ClusterStatusResponse {
        self.client().await.cluster_status(ClusterStatusRequest {}).await.expect("ClusterStatus").into_inner()
    }

    /// Polls ClusterStatus until `f` holds (at most [`POLL_LIMIT`]).
    pub async fn wait_state(&self, f: impl Fn(&ClusterStatusResponse) -> bool, what: &str) -> ClusterStatusResponse {
        let deadline = tokio::time::Instant::now() + POLL_LIMIT;
        loop {
            let s = self.status().await;
            if f(&s) {
                return s;
            }
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}; last status: {s:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A client of worker `i` (0-based), straight to the worker.
    pub async fn worker_client(&self, i: usize) -> WorkerClient<Channel> {
        let addr = self.workers[i].ready.get("grpc").expect("grpc= in worker READY line");
        WorkerClient::connect(format!("http://{addr}")).await.expect("connect to worker")
    }

    /// Worker.Stats of worker `i` (0-based), straight from the worker.
    pub async fn worker_load(&self, i: usize) -> WorkerLoad {
        load_of(&mut self.worker_client(i).await).await
    }

    /// Polls worker `i` (on one connection, every 5 ms) until it runs and
    /// queues nothing (at most [`POLL_LIMIT`]); returns how long that took.
    pub async fn wait_worker_idle(&self, i: usize) -> Duration {
        let mut c = self.worker_client(i).await;
        self.wait_idle_on(&mut c).await
    }

    /// [`Self::wait_worker_idle`] on an open connection; the time counts from the call.
    pub async fn wait_idle_on(&self, c: &mut WorkerClient<Channel>) -> Duration {
        let started = tokio::time::Instant::now();
        wait_load_on(c, |l| l.running == 0 && l.waiting == 0, "idle").await;
        started.elapsed()
    }
}

/// The gRPC address in a coordinator's READY line.
pub fn grpc_of(c: &ReadyChild) -> String {
    c.ready.get("grpc").expect("grpc= in READY line").to_string()
}

/// Starts a coordinator as `opts` say, listening on `listen` (lease
/// `opts.lease_ms`, heartbeats every fifth of it).
pub async fn start_coordinator(opts: &Opts, listen: &str) -> ReadyChild {
    let lease_ms = opts.lease_ms;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qaq-coordinator"));
    cmd.args(["--listen", listen, "--metrics-listen", "127.0.0.1:0"])
        .arg("--lease-ms")
        .arg(lease_ms.to_string())
        .arg("--heartbeat-interval-ms")
        .arg((lease_ms / 5).max(1).to_string())
        .args(&opts.coordinator_args)
        .env("QAQ_LOG", opts.coordinator_log.as_deref().unwrap_or("warn"));
    match &opts.coordinator_stderr {
        Some(path) => cmd.stderr(std::fs::File::create(path).expect("create the coordinator's stderr file")),
        None => cmd.stderr(Stdio::inherit()),
    };
    spawn_ready(cmd, "coordinator", qaq_coordinator::READY_PREFIX, Duration::from_secs(30), StdoutMode::Discard)
        .await
        .expect("coordinator starts")
}

/// Polls Worker.Stats on `c` (every 2 ms, at most [`POLL_LIMIT`]) until
/// `f` holds for its load; returns that load.
pub async fn wait_load_on(c: &mut WorkerClient<Channel>, f: impl Fn(&WorkerLoad) -> bool, what: &str) -> WorkerLoad {
    let started = tokio::time::Instant::now();
    loop {
        let load = load_of(c).await;
        if f(&load) {
            return load;
        }
        assert!(started.elapsed() < POLL_LIMIT, "worker not {what} after {POLL_LIMIT:?}: {load:?}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

impl TestCluster {
    /// The coordinator's /metrics text.
    pub async fn metrics(&self) -> String {
        scrape(self.coordinator.ready.get("metrics").expect("metrics= in READY line")).await
    }

    /// Worker `i`'s /metrics text.
    pub async fn worker_metrics(&self, i: usize) -> String {
        scrape(self.workers[i].ready.get("metrics").expect("metrics= in the worker's READY line")).await
    }
}

/// The /metrics text served at `addr`.
async fn scrape(addr: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect to /metrics");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text
}

async fn load_of(c: &mut WorkerClient<Channel>) -> WorkerLoad {
    c.stats(StatsRequest {}).await.expect("Worker.Stats").into_inner().load.unwrap_or_default()
}

/// Workers UP in a status.
pub fn up_count(s: &ClusterStatusResponse) -> usize {
    s.workers.iter().filter(|w| w.state == WorkerState::Up as i32).count()
}
