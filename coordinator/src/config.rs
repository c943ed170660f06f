//! Configuration in two stages: [`Args`] (clap, `QAQ_*` environment names) is
//! what the user typed; [`Config`] is the validated form the library runs on.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

use crate::error::ConfigError;

/// Command line of `qaq-coordinator`.
#[derive(Debug, Clone, Parser)]
#[command(name = "qaq-coordinator", version, about = "qaq coordinator: client API, worker registry and placement")]
pub struct Args {
    /// gRPC address serving qaq.v1.Generation, qaq.v1.Registry, health and reflection.
    #[arg(long, env = "QAQ_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
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
}

impl Default for Config {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_millis(500),
            lease: Duration::from_millis(2000),
            shutdown_grace: Duration::from_secs(5),
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
        Ok(Self { heartbeat_interval, lease, shutdown_grace })
    }

    /// How often the registry sweeps for expired leases.
    pub fn sweep_interval(&self) -> Duration {
        (self.lease / 4).clamp(Duration::from_millis(10), self.heartbeat_interval.max(Duration::from_millis(10)))
    }
}

impl TryFrom<&Args> for Config {
    type Error = ConfigError;

    fn try_from(a: &Args) -> Result<Self, Self::Error> {
        Config::new(
            Duration::from_millis(a.heartbeat_interval_ms),
            Duration::from_millis(a.lease_ms),
            Duration::from_secs(a.shutdown_grace_s),
        )
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
        assert!(a.metrics_listen.is_none());
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
    fn bad_address_is_a_parse_error() {
        assert!(Args::try_parse_from(["qaq-coordinator", "--listen", "nowhere"]).is_err());
    }
}
