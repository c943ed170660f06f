//! Command-line arguments (stage one, clap with `QAQ_*` environment names)
//! and the validated worker configuration (stage two).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::engine::EngineConfig;

/// Default model path (fetched by `scripts/fetch-model.sh`).
pub const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// `qaq-worker serve` arguments.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Model: a .gguf file or an HF safetensors folder.
    #[arg(long, env = "QAQ_MODEL", default_value = DEFAULT_MODEL)]
    pub model: PathBuf,
    /// gRPC listen address (port 0 picks a free port).
    #[arg(long, env = "QAQ_WORKER_LISTEN", default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Prometheus /metrics listen address; empty disables.
    #[arg(long, env = "QAQ_WORKER_METRICS_LISTEN", default_value = "127.0.0.1:0")]
    pub metrics_listen: String,
    /// Coordinator address to register with (host:port or URI); empty: standalone.
    #[arg(long, env = "QAQ_COORDINATOR", default_value = "")]
    pub coordinator: String,
    /// Worker id; default: worker-<hostname>-<pid>.
    #[arg(long, env = "QAQ_WORKER_ID")]
    pub worker_id: Option<String>,
    /// Address the coordinator should dial; default: the bound listen address.
    #[arg(long, env = "QAQ_WORKER_ADVERTISE")]
    pub advertise: Option<String>,
    /// Shared registration secret presented to the coordinator.
    #[arg(long, env = "QAQ_REGISTRATION_SECRET", hide_env_values = true)]
    pub registration_secret: Option<String>,
    /// Most sequences per engine step.
    #[arg(long, env = "QAQ_MAX_BATCH", default_value_t = 16)]
    pub max_batch: usize,
    /// Most prompt tokens prefilled per engine step.
    #[arg(long, env = "QAQ_PREFILL_CHUNK", default_value_t = 512)]
    pub prefill_chunk: usize,
    /// Most requests waiting for a batch slot.
    #[arg(long, env = "QAQ_MAX_WAITING", default_value_t = 256)]
    pub max_waiting: usize,
    /// On SIGTERM, how long in-flight requests may run before being aborted.
    #[arg(long, env = "QAQ_SHUTDOWN_GRACE_MS", default_value_t = 10_000)]
    pub shutdown_grace_ms: u64,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub model: PathBuf,
    pub listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    pub coordinator: Option<String>,
    pub worker_id: String,
    pub advertise: Option<String>,
    pub registration_secret: Option<String>,
    pub engine: EngineConfig,
    pub shutdown_grace: Duration,
}

impl ServeArgs {
    /// Checks every argument and builds the configuration.
    pub fn validate(self) -> anyhow::Result<WorkerConfig> {
        let metrics_listen = match self.metrics_listen.trim() {
            "" => None,
            s => Some(s.parse().map_err(|e| anyhow::anyhow!("--metrics-listen: {s:?} is not host:port ({e})"))?),
        };
        anyhow::ensure!(
            (1..=1024).contains(&self.max_batch),
            "--max-batch: must be in [1, 1024], got {}",
            self.max_batch
        );
        anyhow::ensure!(
            (1..=65536).contains(&self.prefill_chunk),
            "--prefill-chunk: must be in [1, 65536], got {}",
            self.prefill_chunk
        );
        anyhow::ensure!(self.max_waiting <= 1 << 20, "--max-waiting: must be at most 1048576");
        let worker_id = match self.worker_id {
            Some(id) => {
                qaq_proto::validate::id("--worker-id", &id).map_err(|s| anyhow::anyhow!("{}", s.message()))?;
                anyhow::ensure!(!id.is_empty(), "--worker-id: must not be empty");
                id
            }
            None => format!("worker-{}-{}", hostname(), std::process::id()),
        };
        Ok(WorkerConfig {
            model: self.model,
            listen: self.listen,
            metrics_listen,
            coordinator: Some(self.coordinator).filter(|c| !c.trim().is_empty()),
            worker_id,
            advertise: self.advertise,
            registration_secret: self.registration_secret,
            engine: EngineConfig {
                max_batch: self.max_batch,
                prefill_chunk: self.prefill_chunk,
                max_waiting: self.max_waiting,
            },
            shutdown_grace: Duration::from_millis(self.shutdown_grace_ms),
        })
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').collect())
        .unwrap_or_else(|_| "localhost".into())
}
