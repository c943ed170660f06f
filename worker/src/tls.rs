//! TLS of the worker (rustls, through tonic): `--tls-cert`/`--tls-key` serve
//! the Worker gRPC service over TLS; `--coordinator-ca` makes the worker dial
//! the coordinator's Registry over TLS, verifying it against that CA. Keys
//! are read once at startup and never printed (`Debug` is redacted).

use std::fmt;
use std::path::{Path, PathBuf};

use clap::Args;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

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
    server: Option<(Vec<u8>, Vec<u8>)>,
    coordinator_ca: Option<Vec<u8>>,
    coordinator_domain: Option<String>,
    peer_ca: Option<Vec<u8>>,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("server", &self.server.as_ref().map(|_| "<cert and redacted key>"))
            .field("coordinator_ca", &self.coordinator_ca.is_some())
            .field("coordinator_domain", &self.coordinator_domain)
            .field("peer_ca", &self.peer_ca.is_some())
            .finish()
    }
}

fn read_pem(flag: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(|e| anyhow::anyhow!("{flag}: cannot read {}: {e}", path.display()))?;
    anyhow::ensure!(bytes.windows(11).any(|w| w == b"-----BEGIN "), "{flag}: {} is not a PEM file", path.display());
    Ok(bytes)
}

impl TlsArgs {
    /// Reads and checks the PEM files.
    pub fn validate(&self) -> anyhow::Result<TlsConfig> {
        let server = match (&self.tls_cert, &self.tls_key) {
            (Some(c), Some(k)) => Some((read_pem("--tls-cert", c)?, read_pem("--tls-key", k)?)),
            _ => None,
        };
        let coordinator_ca = self.coordinator_ca.as_deref().map(|p| read_pem("--coordinator-ca", p)).transpose()?;
        let peer_ca = self.peer_ca.as_deref().map(|p| read_pem("--peer-ca", p)).transpose()?;
        Ok(TlsConfig { server, coordinator_ca, coordinator_domain: self.coordinator_tls_domain.clone(), peer_ca })
    }
}

impl TlsConfig {
    /// The gRPC server's TLS settings, if it serves TLS.
    pub fn server_config(&self) -> Option<ServerTlsConfig> {
        self.server.as_ref().map(|(c, k)| ServerTlsConfig::new().identity(Identity::from_pem(c, k)))
    }

    /// TLS settings for dialing the coordinator at `addr`, if enabled.
    pub fn coordinator_client(&self, addr: &str) -> Option<ClientTlsConfig> {
        let ca = self.coordinator_ca.as_ref()?;
        let host = self.coordinator_domain.clone().unwrap_or_else(|| host_of(addr).to_string());
        Some(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)).domain_name(host))
    }
}

impl TlsConfig {
    /// The endpoint of another worker at `addr` (a KV migration's source): TLS verified
    /// against `--peer-ca` when given, plaintext otherwise.
    pub fn peer_endpoint(&self, addr: &str) -> anyhow::Result<Endpoint> {
        let tls = self.peer_ca.as_ref().map(|ca| {
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)).domain_name(host_of(addr).to_string())
        });
        grpc_endpoint(addr, tls.as_ref())
    }
}

/// The host part of `host:port`, `[v6]:port` or a URI.
pub fn host_of(addr: &str) -> &str {
    let rest = addr.split_once("://").map_or(addr, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next().unwrap_or(v6);
    }
    authority.rsplit_once(':').map_or(authority, |(h, _)| h)
}

/// The endpoint of a gRPC server (the coordinator, another worker): `https://` with `tls`,
/// else as given.
pub fn grpc_endpoint(addr: &str, tls: Option<&ClientTlsConfig>) -> anyhow::Result<Endpoint> {
    let Some(tls) = tls else { return Ok(qaq_proto::client::endpoint(addr)?) };
    let rest = addr.split_once("://").map_or(addr, |(_, r)| r);
    Ok(Endpoint::from_shared(format!("https://{rest}"))?.tls_config(tls.clone())?)
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
        let cfg = TlsConfig { server: Some((b"c".to_vec(), b"SECRETKEY".to_vec())), ..Default::default() };
        assert!(!format!("{cfg:?}").contains("SECRETKEY"));
        assert!(cfg.coordinator_client("a:1").is_none());
    }
}
