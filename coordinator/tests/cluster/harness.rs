//! Spawns real `qaq-coordinator` and `qaq-worker` processes on ephemeral
//! ports, waits on their READY lines (never on a port), and kills them when
//! dropped.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use qaq_coordinator::process::{ReadyChild, StdoutMode, spawn_ready};
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

fn workspace() -> PathBuf {
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

/// A coordinator process and its workers.
pub struct TestCluster {
    /// The coordinator (first) ...
    pub coordinator: ReadyChild,
    /// ... and its workers, in start order.
    pub workers: Vec<ReadyChild>,
}

impl TestCluster {
    /// Starts a coordinator (lease `lease_ms`, heartbeats every `lease_ms / 5`)
    /// and `n` workers named `w1..wn`, and waits until all are UP.
    pub async fn start(n: usize, lease_ms: u64) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_qaq-coordinator"));
        cmd.args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .arg("--lease-ms")
            .arg(lease_ms.to_string())
            .arg("--heartbeat-interval-ms")
            .arg((lease_ms / 5).max(1).to_string())
            .env("QAQ_LOG", "warn")
            .stderr(Stdio::inherit());
        let coordinator = spawn_ready(
            cmd,
            "coordinator",
            qaq_coordinator::READY_PREFIX,
            Duration::from_secs(30),
            StdoutMode::Discard,
        )
        .await
        .expect("coordinator starts");
        let mut cluster = Self { coordinator, workers: Vec::new() };
        if n > 0 {
            let (model, bin) = (model_path(), worker_bin());
            let starts = (1..=n).map(|i| {
                let mut cmd = Command::new(&bin);
                cmd.arg("serve")
                    .arg("--model")
                    .arg(&model)
                    .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
                    .args(["--coordinator", &cluster.grpc(), "--worker-id", &format!("w{i}")])
                    .env("QAQ_LOG", "warn")
                    .stderr(Stdio::inherit());
                async move {
                    spawn_ready(cmd, &format!("w{i}"), WORKER_READY, Duration::from_secs(180), StdoutMode::Discard)
                        .await
                }
            });
            for w in futures::future::join_all(starts).await {
                cluster.workers.push(w.expect("worker starts"));
            }
            cluster.wait_state(|s| up_count(s) == n, "all workers UP").await;
        }
        cluster
    }

    /// The coordinator's gRPC address.
    pub fn grpc(&self) -> String {
        self.coordinator.ready.get("grpc").expect("grpc= in READY line").to_string()
    }

    /// A client of the coordinator.
    pub async fn client(&self) -> GenerationClient<Channel> {
        GenerationClient::connect(format!("http://{}", self.grpc())).await.expect("connect to coordinator")
    }

    /// A channel to the coordinator (for health and reflection clients).
    pub async fn channel(&self) -> Channel {
        tonic::transport::Endpoint::from_shared(format!("http://{}", self.grpc())).unwrap().connect().await.unwrap()
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

    /// Worker.Stats of worker `i` (0-based), straight from the worker.
    pub async fn worker_load(&self, i: usize) -> WorkerLoad {
        let addr = self.workers[i].ready.get("grpc").expect("grpc= in worker READY line");
        let mut c = WorkerClient::connect(format!("http://{addr}")).await.expect("connect to worker");
        c.stats(StatsRequest {}).await.expect("Worker.Stats").into_inner().load.unwrap_or_default()
    }

    /// Polls worker `i` until it runs and queues nothing (at most [`POLL_LIMIT`]);
    /// returns how long that took.
    pub async fn wait_worker_idle(&self, i: usize) -> Duration {
        let started = tokio::time::Instant::now();
        loop {
            let load = self.worker_load(i).await;
            if load.running == 0 && load.waiting == 0 {
                return started.elapsed();
            }
            assert!(started.elapsed() < POLL_LIMIT, "worker {i} still busy after {POLL_LIMIT:?}: {load:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The coordinator's /metrics text.
    pub async fn metrics(&self) -> String {
        let addr = self.coordinator.ready.get("metrics").expect("metrics= in READY line");
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect to /metrics");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).await.unwrap();
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        text
    }
}

/// Workers UP in a status.
pub fn up_count(s: &ClusterStatusResponse) -> usize {
    s.workers.iter().filter(|w| w.state == WorkerState::Up as i32).count()
}
