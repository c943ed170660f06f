//! Command-line arguments (stage one, clap with `QAQ_*` environment names)
//! and the validated worker configuration (stage two).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::device::Device;
use crate::engine::{Budgets, EngineConfig};
use crate::error::ServeError;
use crate::kv::{PolicyChoice, QaqOverrides};

/// Default model path (fetched by `scripts/fetch-model.sh`).
pub const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
/// The default KV policy: keys at 6 bits and values at 3 per token, no outliers, stored
/// rotated (3.04x fewer bytes than fp16). Chosen on `docs/results/safe-default`: the
/// highest real ratio measured that is as safe as fp16 on every check of issue 17
/// (perplexity at 8k, passkeys at 4k, HellaSwag and PIQA); keys below 6 bits lose
/// passkeys.
pub const DEFAULT_KV_POLICY: &str = "uniform:6/3:noout+rot";

/// `qaq-worker serve` arguments.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Device: cpu, or cuda:N (GPU N; needs a build with the `cuda` feature).
    #[arg(long, env = "QAQ_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Model: a .gguf file or an HF safetensors folder.
    #[arg(long, env = "QAQ_MODEL", default_value = DEFAULT_MODEL)]
    pub model: PathBuf,
    /// gRPC listen address (port 0 picks a free port).
    #[arg(long, env = "QAQ_WORKER_LISTEN", default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Prometheus /metrics listen address; empty disables.
    #[arg(long, env = "QAQ_WORKER_METRICS_LISTEN", default_value = "127.0.0.1:0")]
    pub metrics_listen: String,
    /// Coordinators to register with: comma-separated host:port or URIs; a DNS name with
    /// several addresses (a headless Service) is one coordinator per address, re-resolved
    /// every 5 s. Empty: standalone.
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
    /// Default KV-cache policy: uniform:6/3:noout+rot (keys at 6 bits, values at 3, no
    /// outliers, rotated), qaq-tuned | qaq | fp16 | uniform:N | uniform:K/V | kivi, any but
    /// fp16 with +rot (see the README for every option, e.g. qaq:sigma_s=0.01,window=5).
    #[arg(long, env = "QAQ_KV_POLICY", default_value = DEFAULT_KV_POLICY)]
    pub kv_policy: String,
    /// QAQ key target sigma_S (overrides the policy string).
    #[arg(long, env = "QAQ_KV_SIGMA_S")]
    pub kv_sigma_s: Option<f64>,
    /// QAQ value target sigma_X (overrides the policy string).
    #[arg(long, env = "QAQ_KV_SIGMA_X")]
    pub kv_sigma_x: Option<f64>,
    /// Fraction of each group kept exact as outliers (QAQ).
    #[arg(long, env = "QAQ_KV_OUTLIER_RATIO")]
    pub kv_outlier_ratio: Option<f64>,
    /// QAQ attention window (recent scores whose max predicts importance).
    #[arg(long, env = "QAQ_KV_WINDOW")]
    pub kv_window: Option<usize>,
    /// Smallest QAQ bit width.
    #[arg(long, env = "QAQ_KV_MIN_BITS")]
    pub kv_min_bits: Option<u8>,
    /// Largest QAQ bit width (new tokens are stored at it).
    #[arg(long, env = "QAQ_KV_MAX_BITS")]
    pub kv_max_bits: Option<u8>,
    /// Re-quantize every k decode steps.
    #[arg(long, env = "QAQ_KV_REQUANTIZE_EVERY")]
    pub kv_requantize_every: Option<u32>,
    /// Device-tier budget: packed KV caches of all running sequences, in bytes.
    #[arg(long, env = "QAQ_KV_DEVICE_BUDGET_BYTES", default_value_t = crate::engine::DEFAULT_DEVICE_BUDGET)]
    pub kv_device_budget_bytes: u64,
    /// Host-tier budget: fp16 backups and swapped-out caches, in bytes.
    #[arg(long, env = "QAQ_KV_HOST_BUDGET_BYTES", default_value_t = crate::engine::DEFAULT_HOST_BUDGET)]
    pub kv_host_budget_bytes: u64,
    /// On SIGTERM, how long in-flight requests may run before being aborted.
    #[arg(long, env = "QAQ_SHUTDOWN_GRACE_MS", default_value_t = 10_000)]
    pub shutdown_grace_ms: u64,
    /// When the grace runs out, how long the KV caches of the aborted requests stay
    /// parked for their next worker to pull (Worker.ExportKv), the worker waiting
    /// that long at most before it exits; 0: none is parked, they are prefilled again.
    #[arg(long, env = "QAQ_KV_PARK_MS", default_value_t = 30_000)]
    pub kv_park_ms: u64,
    /// The node this worker runs on (default: the host name). A parked KV cache moves
    /// over NCCL, device to device, only between GPU workers naming the same node; in
    /// Kubernetes pass the pod's `spec.nodeName`.
    #[arg(long, env = "QAQ_NODE")]
    pub node: Option<String>,
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Where the model runs.
    pub device: Device,
    pub model: PathBuf,
    pub listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    /// Coordinators to register with (`--coordinator`'s entries; empty: standalone).
    pub coordinators: Vec<String>,
    pub worker_id: String,
    pub advertise: Option<String>,
    pub registration_secret: Option<Secret>,
    pub engine: EngineConfig,
    /// Default KV policy (flags applied).
    pub kv_policy: PolicyChoice,
    pub shutdown_grace: Duration,
    /// The node this worker runs on (`--node`).
    pub node: String,
    /// TLS of the gRPC server and towards the coordinator.
    pub tls: crate::tls::TlsConfig,
}

/// A secret that never shows in `Debug` output (logs).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Smallest sequence (tokens) the budgets must be able to hold.
pub const MIN_SEQUENCE_TOKENS: u64 = 256;

impl ServeArgs {
    /// Checks every argument and builds the configuration.
    pub fn validate(self) -> Result<WorkerConfig, ServeError> {
        let metrics_listen = match self.metrics_listen.trim() {
            "" => None,
            s => Some(
                s.parse().map_err(|e| ServeError::Config(format!("--metrics-listen: {s:?} is not host:port ({e})")))?,
            ),
        };
        ensure((1..=1024).contains(&self.max_batch), || {
            format!("--max-batch: must be in [1, 1024], got {}", self.max_batch)
        })?;
        ensure((1..=65536).contains(&self.prefill_chunk), || {
            format!("--prefill-chunk: must be in [1, 65536], got {}", self.prefill_chunk)
        })?;
        ensure(self.max_waiting <= 1 << 20, || "--max-waiting: must be at most 1048576".to_string())?;
        ensure(self.kv_park_ms <= 600_000, || {
            format!("--kv-park-ms: must be in [0, 600000], got {}", self.kv_park_ms)
        })?;
        let overrides = QaqOverrides {
            sigma_s: self.kv_sigma_s,
            sigma_x: self.kv_sigma_x,
            outlier_ratio: self.kv_outlier_ratio,
            window: self.kv_window,
            min_bits: self.kv_min_bits,
            max_bits: self.kv_max_bits,
            every: self.kv_requantize_every,
        };
        let kv_policy =
            PolicyChoice::parse(&self.kv_policy).map_err(|e| ServeError::Config(format!("--kv-policy: {e}")))?;
        let kv_policy = overrides.apply(kv_policy, "--kv-* flags").map_err(ServeError::Config)?;
        // Comma-separated; blanks trimmed, empty entries dropped.
        let coordinators: Vec<String> =
            self.coordinator.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect();
        for c in &coordinators {
            let uri = qaq_proto::client::normalize_uri(c);
            let host = uri.parse::<tonic::transport::Uri>().ok().and_then(|u| u.host().map(str::to_string));
            ensure(host.is_some_and(|h| !h.is_empty()), || {
                format!("--coordinator: {c:?} is not host:port or a URI (in a comma-separated list)")
            })?;
        }
        let node = self.node.unwrap_or_else(hostname);
        crate::nccl::check_node("--node", &node).map_err(ServeError::Config)?;
        let worker_id = match self.worker_id {
            Some(id) => {
                qaq_proto::validate::id("--worker-id", &id).map_err(|s| ServeError::Config(s.message().to_string()))?;
                ensure(!id.is_empty(), || "--worker-id: must not be empty".to_string())?;
                id
            }
            None => format!("worker-{}-{}", hostname(), std::process::id()),
        };
        Ok(WorkerConfig {
            device: Device::parse(&self.device)?,
            model: self.model,
            listen: self.listen,
            metrics_listen,
            coordinators,
            worker_id,
            advertise: self.advertise,
            registration_secret: self.registration_secret.map(Secret),
            engine: EngineConfig {
                max_batch: self.max_batch,
                prefill_chunk: self.prefill_chunk,
                max_waiting: self.max_waiting,
                budgets: Budgets { device: self.kv_device_budget_bytes, host: self.kv_host_budget_bytes },
                park_ttl: Duration::from_millis(self.kv_park_ms),
            },
            kv_policy,
            shutdown_grace: Duration::from_millis(self.shutdown_grace_ms),
            node,
            tls: self.tls.validate().map_err(|e| ServeError::Config(e.to_string()))?,
        })
    }
}

impl WorkerConfig {
    /// Checks the budgets against the model: each tier must hold at least one
    /// sequence of [`MIN_SEQUENCE_TOKENS`] tokens at the worst case (new tokens
    /// at the policy's widest setting; fp16 backups for QAQ).
    pub fn check_budgets(&self, worst_bytes_per_token: usize, backup_bytes_per_token: usize) -> Result<(), ServeError> {
        let b = self.engine.budgets;
        let dev_min = MIN_SEQUENCE_TOKENS * worst_bytes_per_token as u64;
        ensure(b.device >= dev_min, || {
            format!(
                "--kv-device-budget-bytes: {} is smaller than one sequence of {MIN_SEQUENCE_TOKENS} tokens under {:?} \
                 ({dev_min} bytes); allowed: [{dev_min}, 2^64)",
                b.device, self.kv_policy.label
            )
        })?;
        let host_min =
            if self.kv_policy.uses_host_backups() { MIN_SEQUENCE_TOKENS * backup_bytes_per_token as u64 } else { 1 };
        ensure(b.host >= host_min, || {
            format!(
                "--kv-host-budget-bytes: {} is smaller than the fp16 backups of one sequence of {MIN_SEQUENCE_TOKENS} \
                 tokens ({host_min} bytes); allowed: [{host_min}, 2^64)",
                b.host
            )
        })
    }
}

/// `Ok` when `ok`, else the configuration error `msg()` (which names the flag).
fn ensure(ok: bool, msg: impl FnOnce() -> String) -> Result<(), ServeError> {
    if ok { Ok(()) } else { Err(ServeError::Config(msg())) }
}

pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').collect())
        .unwrap_or_else(|_| "localhost".into())
}
