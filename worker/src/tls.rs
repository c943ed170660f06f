//! TLS of the worker (rustls, through tonic): `--tls-cert`/`--tls-key` serve
//! the Worker gRPC service over TLS; `--coordinator-ca` makes the worker dial
//! the coordinator's Registry over TLS, verifying it against that CA. Keys
//! are read once at startup and never printed (`Debug` is redacted). The
//! plumbing (PEM files, identities, CAs, endpoints) is `qaq_proto::tls`,
//! shared with the coordinator.

use std::fmt;
use std::path::PathBuf;

use clap::Args;
pub use qaq_proto::tls::host_of;
use qaq_proto::tls::{ClientTls, PemError, ServerTls, read_pem};
use tonic::transport::{ClientTlsConfig, Endpoint, ServerTlsConfig};

/// TLS flags of `qaq-worker serve` (flattened into `ServeArgs`).
#[derive(Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// PEM certificate chain: serve gRPC over TLS (with --tls-key).
    #[arg(long, env = "QAQ_WORKER_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "QAQ_WORKER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate: dial the coordinator over TLS, verifying it against this CA.
    #[arg(long, env = "QAQ_COORDINATOR_TLS_CA")]
    pub coordinator_ca: Option<PathBuf>,
    /// Server name expected in the coordinator's certificate (default: the host of --coordinator).
    #[arg(long, env = "QAQ_COORDINATOR_TLS_DOMAIN", requires = "coordinator_ca")]
    pub coordinator_tls_domain: Option<String>,
    /// PEM CA certificate of the other workers: pull migrated KV caches from workers that
    /// serve TLS (verified against this CA, server name = the host of their address).
    #[arg(long, env = "QAQ_PEER_TLS_CA")]
    pub peer_ca: Option<PathBuf>,
}

/// Validated TLS settings.
#[derive(Clone, Default)]
pub struct TlsConfig {
    server: Option<ServerTls>,
    coordinator: Option<ClientTls>,
    peer: Option<ClientTls>,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("server", &self.server.as_ref().map(|_| "<cert and redacted key>"))
            .field("coordinator_ca", &self.coordinator.is_some())
            .field("coordinator_domain", &self.coordinator.as_ref().and_then(ClientTls::domain))
            .field("peer_ca", &self.peer.is_some())
            .finish()
    }
}

impl TlsArgs {
    /// Reads and checks the PEM files.
    pub fn validate(&self) -> Result<TlsConfig, PemError> {
        let server = match (&self.tls_cert, &self.tls_key) {
            (Some(c), Some(k)) => Some(ServerTls::from_pem(read_pem("--tls-cert", c)?, read_pem("--tls-key", k)?)),
            _ => None,
        };
        let domain = self.coordinator_tls_domain.clone();
        let coordinator =
            self.coordinator_ca.as_deref().map(|p| ClientTls::load("--coordinator-ca", p, domain)).transpose()?;
        let peer = self.peer_ca.as_deref().map(|p| ClientTls::load("--peer-ca", p, None)).transpose()?;
        Ok(TlsConfig { server, coordinator, peer })
    }
}

impl TlsConfig {
    /// The gRPC server's TLS settings, if it serves TLS.
    pub fn server_config(&self) -> Option<ServerTlsConfig> {
        self.server.as_ref().map(ServerTls::server_config)
    }

    /// TLS settings for dialing the coordinator at `addr`, if enabled.
    pub fn coordinator_client(&self, addr: &str) -> Option<ClientTlsConfig> {
        self.coordinator.as_ref().map(|c| c.client_config(addr))
    }

    /// The endpoint of another worker at `addr` (a KV migration's source): TLS verified
    /// against `--peer-ca` when given, plaintext otherwise.
    pub fn peer_endpoint(&self, addr: &str) -> Result<Endpoint, tonic::transport::Error> {
        grpc_endpoint(addr, self.peer.as_ref().map(|p| p.client_config(addr)).as_ref())
    }
}

/// The endpoint of a gRPC server (the coordinator, another worker): `https://` with `tls`,
/// else as given.
pub fn grpc_endpoint(addr: &str, tls: Option<&ClientTlsConfig>) -> Result<Endpoint, tonic::transport::Error> {
    qaq_proto::tls::endpoint(addr, tls)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_and_endpoints() {
        assert_eq!(host_of("127.0.0.1:50051"), "127.0.0.1");
        assert_eq!(host_of("https://coord.local:1/x"), "coord.local");
        assert_eq!(host_of("[::1]:5"), "::1");
        let e = grpc_endpoint("127.0.0.1:5", None).unwrap();
        assert_eq!(e.uri().scheme_str(), Some("http"));
        let e = grpc_endpoint("http://127.0.0.1:5", Some(&ClientTlsConfig::new())).unwrap();
        assert_eq!(e.uri().scheme_str(), Some("https"));
    }

    #[test]
    fn validates_files_and_redacts() {
        assert!(TlsArgs::default().validate().unwrap().server_config().is_none());
        let bad = TlsArgs { coordinator_ca: Some("/nonexistent/ca.pem".into()), ..Default::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("--coordinator-ca"));
        let cfg =
            TlsConfig { server: Some(ServerTls::from_pem(b"c".to_vec(), b"SECRETKEY".to_vec())), ..Default::default() };
        assert!(!format!("{cfg:?}").contains("SECRETKEY"));
        assert!(cfg.coordinator_client("a:1").is_none());
    }
}
