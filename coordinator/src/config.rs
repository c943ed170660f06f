//! Configuration in two stages: [`Args`] (clap, `QAQ_*` environment names) is
//! what the user typed; [`Config`] is the validated form the library runs on.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use qaq_proto::tls::{ClientTls, ServerTls, read_pem};

use crate::auth::{ApiKeys, Secret};
use crate::error::ConfigError;
use crate::placement::Policy;

/// Command line of `qaq-coordinator`.
#[derive(Debug, Clone, Parser)]
#[command(name = "qaq-coordinator", version, about = "qaq coordinator: client API, worker registry and placement")]
pub struct Args {
    /// gRPC address serving qaq.v1.Generation, qaq.v1.Registry, health and reflection.
    #[arg(long, env = "QAQ_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Address of the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions,
    /// /v1/models, /health; port 0 picks one). Served over TLS with --tls-cert, guarded by
    /// --api-keys-file. Absent: no HTTP API.
    #[arg(long, env = "QAQ_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// Address of the Prometheus /metrics endpoint (port 0 picks one). Absent: no metrics endpoint.
    #[arg(long, env = "QAQ_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Interval at which workers must send heartbeats, in milliseconds.
    #[arg(long, env = "QAQ_HEARTBEAT_INTERVAL_MS", default_value_t = 500)]
    pub heartbeat_interval_ms: u64,
    /// A worker whose last heartbeat is older than this many milliseconds is marked DOWN.
    #[arg(long, env = "QAQ_LEASE_MS", default_value_t = 2000)]
    pub lease_ms: u64,
    /// Seconds in-flight streams may take to finish after a shutdown signal.
    #[arg(long, env = "QAQ_SHUTDOWN_GRACE_S", default_value_t = 5)]
    pub shutdown_grace_s: u64,
    /// How a worker is chosen for a request.
    #[arg(long, env = "QAQ_PLACEMENT", value_enum, default_value_t = Policy::KvAware)]
    pub placement: Policy,
    /// Most requests waiting in the admission queue for a worker slot; beyond
    /// it requests get RESOURCE_EXHAUSTED with a `retry-after-ms` hint.
    #[arg(long, env = "QAQ_MAX_QUEUE", default_value_t = 256)]
    pub max_queue: usize,
    /// Most requests the coordinator runs on one worker at once; 0: the
    /// worker's reported max_batch.
    #[arg(long, env = "QAQ_MAX_PER_WORKER", default_value_t = 0)]
    pub max_per_worker: u32,
    /// Most resubmissions of one request to another worker after failures.
    #[arg(long, env = "QAQ_MAX_RETRIES", default_value_t = 3)]
    pub max_retries: u32,
    /// File of client API keys (one per line, `#` comments). Set: every
    /// Generation call needs `authorization: Bearer <key>`.
    #[arg(long, env = "QAQ_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// Shared secret workers must present to register (prefer the file or the environment).
    #[arg(long, env = "QAQ_REGISTRATION_SECRET", hide_env_values = true)]
    pub registration_secret: Option<String>,
    /// File holding the registration secret (first line).
    #[arg(long, env = "QAQ_REGISTRATION_SECRET_FILE", conflicts_with = "registration_secret")]
    pub registration_secret_file: Option<PathBuf>,
    /// PEM certificate chain: serve gRPC over TLS (with --tls-key).
    #[arg(long, env = "QAQ_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "QAQ_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate: dial workers over TLS, verifying them against it.
    #[arg(long, env = "QAQ_WORKER_TLS_CA")]
    pub worker_tls_ca: Option<PathBuf>,
    /// Server name expected in worker certificates (default: the host of the worker's address).
    #[arg(long, env = "QAQ_WORKER_TLS_DOMAIN", requires = "worker_tls_ca")]
    pub worker_tls_domain: Option<String>,
}

/// Validated configuration of the coordinator library.
#[derive(Debug, Clone)]
pub struct Config {
    /// Interval workers heartbeat at (sent to them in RegisterResponse).
    pub heartbeat_interval: Duration,
    /// Lease: a worker silent for longer is DOWN.
    pub lease: Duration,
    /// Time in-flight streams get to finish after shutdown is requested.
    pub shutdown_grace: Duration,
    /// Placement policy.
    pub placement: Policy,
    /// Capacity of the admission queue (0: no queue, reject when every worker is busy).
    pub max_queue: usize,
    /// Requests per worker; `None`: the worker's reported max_batch.
    pub max_per_worker: Option<u32>,
    /// Resubmissions of one request after worker failures.
    pub max_retries: u32,
    /// Client API keys; `None`: no authentication.
    pub api_keys: Option<ApiKeys>,
    /// Registration secret; `None`: any worker may register.
    pub registration_secret: Option<Secret>,
    /// TLS of the coordinator's gRPC server.
    pub tls: Option<ServerTls>,
    /// TLS towards workers: the CA they are verified against.
    pub worker_tls: Option<ClientTls>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_millis(500),
            lease: Duration::from_millis(2000),
            shutdown_grace: Duration::from_secs(5),
            placement: Policy::default(),
            max_queue: 256,
            max_per_worker: None,
            max_retries: 3,
            api_keys: None,
            registration_secret: None,
            tls: None,
            worker_tls: None,
        }
    }
}

impl Config {
    /// Checks the timing relations: both durations positive and the lease
    /// longer than the heartbeat interval (otherwise every worker flaps).
    pub fn new(heartbeat_interval: Duration, lease: Duration, shutdown_grace: Duration) -> Result<Self, ConfigError> {
        if heartbeat_interval.is_zero() {
            return Err(ConfigError::Invalid("heartbeat-interval-ms: must be at least 1".into()));
        }
        if lease <= heartbeat_interval {
            return Err(ConfigError::Invalid(format!(
                "lease-ms: must be greater than heartbeat-interval-ms ({} ms), got {} ms",
                heartbeat_interval.as_millis(),
                lease.as_millis()
            )));
        }
        Ok(Self { heartbeat_interval, lease, shutdown_grace, ..Self::default() })
    }

    /// How often the registry sweeps for expired leases.
    pub fn sweep_interval(&self) -> Duration {
        (self.lease / 4).clamp(Duration::from_millis(10), self.heartbeat_interval.max(Duration::from_millis(10)))
    }
}

impl TryFrom<&Args> for Config {
    type Error = ConfigError;

    fn try_from(a: &Args) -> Result<Self, Self::Error> {
        let mut c = Config::new(
            Duration::from_millis(a.heartbeat_interval_ms),
            Duration::from_millis(a.lease_ms),
            Duration::from_secs(a.shutdown_grace_s),
        )?;
        if a.max_queue > 1 << 20 {
            return Err(ConfigError::Invalid(format!("max-queue: must be at most 1048576, got {}", a.max_queue)));
        }
        if a.max_retries > 16 {
            return Err(ConfigError::Invalid(format!("max-retries: must be at most 16, got {}", a.max_retries)));
        }
        c.placement = a.placement;
        c.max_queue = a.max_queue;
        c.max_per_worker = (a.max_per_worker > 0).then_some(a.max_per_worker);
        c.max_retries = a.max_retries;
        c.api_keys = a.api_keys_file.as_deref().map(ApiKeys::load).transpose()?;
        c.registration_secret = match (&a.registration_secret, &a.registration_secret_file) {
            (Some(s), _) => Some(
                Secret::new(s).ok_or_else(|| ConfigError::Invalid("registration-secret: must not be empty".into()))?,
            ),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ConfigError::Invalid(format!("registration-secret-file: cannot read {}: {e}", path.display()))
                })?;
                let first = text.lines().next().unwrap_or_default();
                Some(Secret::new(first).ok_or_else(|| {
                    ConfigError::Invalid(format!("registration-secret-file: {} is empty", path.display()))
                })?)
            }
            (None, None) => None,
        };
        c.tls = match (&a.tls_cert, &a.tls_key) {
            (Some(cert), Some(key)) => {
                let tls = ServerTls::from_pem(read_pem("tls-cert", cert)?, read_pem("tls-key", key)?);
                // An unusable pair fails here, not when a front starts serving.
                tls.rustls_config(&[])?;
                Some(tls)
            }
            _ => None,
        };
        c.worker_tls = a
            .worker_tls_ca
            .as_deref()
            .map(|ca| ClientTls::load("worker-tls-ca", ca, a.worker_tls_domain.clone()))
            .transpose()?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Args {
        let mut all = vec!["qaq-coordinator"];
        all.extend_from_slice(v);
        Args::try_parse_from(all).unwrap()
    }

    #[test]
    fn defaults_validate() {
        let a = args(&[]);
        assert_eq!(a.listen.to_string(), "127.0.0.1:50051");
        assert!(a.metrics_listen.is_none() && a.http_listen.is_none());
        assert_eq!(args(&["--http-listen", "127.0.0.1:0"]).http_listen.unwrap().to_string(), "127.0.0.1:0");
        let c = Config::try_from(&a).unwrap();
        assert_eq!(c.heartbeat_interval, Duration::from_millis(500));
        assert_eq!(c.lease, Duration::from_millis(2000));
        assert!(c.sweep_interval() <= c.heartbeat_interval);
    }

    #[test]
    fn rejects_lease_not_above_interval() {
        let e = Config::try_from(&args(&["--heartbeat-interval-ms", "500", "--lease-ms", "500"])).unwrap_err();
        assert!(e.to_string().contains("lease-ms"), "{e}");
        let e = Config::try_from(&args(&["--heartbeat-interval-ms", "0"])).unwrap_err();
        assert!(e.to_string().contains("heartbeat-interval-ms"), "{e}");
    }

    #[test]
    fn issue5_flags() {
        let c = Config::try_from(&args(&[])).unwrap();
        assert_eq!(c.placement, Policy::KvAware);
        assert_eq!((c.max_queue, c.max_per_worker, c.max_retries), (256, None, 3));
        assert!(c.api_keys.is_none() && c.registration_secret.is_none() && c.tls.is_none());
        let c = Config::try_from(&args(&[
            "--placement",
            "round-robin",
            "--max-queue",
            "0",
            "--max-per-worker",
            "2",
            "--registration-secret",
            "hunter2",
        ]))
        .unwrap();
        assert_eq!(c.placement, Policy::RoundRobin);
        assert_eq!((c.max_queue, c.max_per_worker), (0, Some(2)));
        assert!(c.registration_secret.as_ref().unwrap().matches("hunter2"));
        assert!(!format!("{c:?}").contains("hunter2"), "secret in Debug");
        assert!(Args::try_parse_from(["qaq-coordinator", "--placement", "fastest"]).is_err());
        assert!(Args::try_parse_from(["qaq-coordinator", "--tls-cert", "a.pem"]).is_err(), "needs --tls-key");
        let e = Config::try_from(&args(&["--api-keys-file", "/nonexistent/keys"])).unwrap_err();
        assert!(e.to_string().contains("api-keys-file"), "{e}");
        let e = Config::try_from(&args(&["--registration-secret", " "])).unwrap_err();
        assert!(e.to_string().contains("registration-secret"), "{e}");
        let e = Config::try_from(&args(&["--max-retries", "99"])).unwrap_err();
        assert!(e.to_string().contains("max-retries"), "{e}");
    }

    #[test]
    fn rejects_missing_and_non_pem_tls_files() {
        let e = Config::try_from(&args(&["--tls-cert", "/nonexistent/c.pem", "--tls-key", "/nonexistent/k.pem"]))
            .unwrap_err();
        assert!(e.to_string().starts_with("tls-cert"), "{e}");
        let e = Config::try_from(&args(&["--worker-tls-ca", "/proc/self/cmdline"])).unwrap_err();
        assert!(e.to_string().contains("not a PEM"), "{e}");
        let c = Config { tls: Some(ServerTls::from_pem(b"c".to_vec(), b"PRIVATE".to_vec())), ..Config::default() };
        assert!(!format!("{c:?}").contains("PRIVATE"));
    }

    #[test]
    fn bad_address_is_a_parse_error() {
        assert!(Args::try_parse_from(["qaq-coordinator", "--listen", "nowhere"]).is_err());
    }
}
