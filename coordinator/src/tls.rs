//! TLS (rustls, through tonic): the coordinator's server identity and the CA
//! it verifies workers against. PEM files are read once at startup; the
//! private key is never printed (`Debug` is redacted).

use std::fmt;
use std::path::Path;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::error::ConfigError;

fn read(flag: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    let bytes = std::fs::read(path)
        .map_err(|e| ConfigError::Invalid(format!("{flag}: cannot read {}: {e}", path.display())))?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(ConfigError::Invalid(format!("{flag}: {} is not a PEM file", path.display())));
    }
    Ok(bytes)
}

/// Certificate chain and private key of the gRPC server.
#[derive(Clone)]
pub struct ServerTls {
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls").field("cert_bytes", &self.cert.len()).field("key", &"<redacted>").finish()
    }
}

impl ServerTls {
    /// Reads PEM files (`--tls-cert`, `--tls-key`).
    pub fn load(cert: &Path, key: &Path) -> Result<Self, ConfigError> {
        Ok(Self { cert: read("tls-cert", cert)?, key: read("tls-key", key)? })
    }

    /// The tonic server configuration.
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new().identity(Identity::from_pem(&self.cert, &self.key))
    }
}

/// How the coordinator verifies workers when it dials them over TLS.
#[derive(Clone, Debug)]
pub struct WorkerTls {
    ca: Vec<u8>,
    domain: Option<String>,
}

impl WorkerTls {
    /// Reads the CA (`--worker-tls-ca`); `domain` overrides the name checked
    /// in worker certificates.
    pub fn load(ca: &Path, domain: Option<String>) -> Result<Self, ConfigError> {
        Ok(Self { ca: read("worker-tls-ca", ca)?, domain })
    }

    /// The tonic client configuration for a worker at `address` (`host:port` or URI).
    pub fn client_config(&self, address: &str) -> ClientTlsConfig {
        let host = self.domain.clone().unwrap_or_else(|| host_of(address).to_string());
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca)).domain_name(host)
    }
}

/// The host part of `host:port`, `[v6]:port` or a URI.
pub fn host_of(address: &str) -> &str {
    let rest = address.split_once("://").map_or(address, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next().unwrap_or(v6);
    }
    authority.rsplit_once(':').map_or(authority, |(h, _)| h)
}

/// `https://` URI for a worker address when TLS is on (the channel's scheme
/// must match its TLS setting).
pub fn worker_uri(address: &str, tls: bool) -> String {
    if !tls {
        return qaq_proto::client::normalize_uri(address);
    }
    match address.split_once("://") {
        Some((_, rest)) => format!("https://{rest}"),
        None => format!("https://{address}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_and_uris() {
        assert_eq!(host_of("127.0.0.1:5"), "127.0.0.1");
        assert_eq!(host_of("http://localhost:5"), "localhost");
        assert_eq!(host_of("https://[::1]:5/x"), "::1");
        assert_eq!(host_of("name"), "name");
        assert_eq!(worker_uri("a:1", false), "http://a:1");
        assert_eq!(worker_uri("a:1", true), "https://a:1");
        assert_eq!(worker_uri("http://a:1", true), "https://a:1");
    }

    #[test]
    fn rejects_missing_and_non_pem_files() {
        let e = ServerTls::load(Path::new("/nonexistent/c.pem"), Path::new("/nonexistent/k.pem")).unwrap_err();
        assert!(e.to_string().starts_with("tls-cert"), "{e}");
        let e = WorkerTls::load(Path::new("/proc/self/cmdline"), None).unwrap_err();
        assert!(e.to_string().contains("not a PEM"), "{e}");
        let t = ServerTls { cert: b"c".to_vec(), key: b"PRIVATE".to_vec() };
        assert!(!format!("{t:?}").contains("PRIVATE"));
    }
}
