//! TLS plumbing (rustls, through tonic) shared by the coordinator, the worker
//! and the `qaq` CLI: reading PEM files, a server's identity, the CA a client
//! verifies a server against, and `https://` endpoints.
//!
//! PEM files are read once, at startup; a private key is never printed
//! (`Debug` of [`ServerTls`] is redacted). Errors name the flag the file
//! came from, spelled as the caller passes it.

use std::fmt;
use std::path::{Path, PathBuf};

use thiserror::Error;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

/// A PEM file that cannot be used.
#[derive(Debug, Error)]
pub enum PemError {
    /// The file cannot be read.
    #[error("{flag}: cannot read {}: {error}", .path.display())]
    Read {
        /// The flag that named the file.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it cannot be read.
        error: std::io::Error,
    },
    /// The file holds no PEM block.
    #[error("{flag}: {} is not a PEM file", .path.display())]
    NotPem {
        /// The flag that named the file.
        flag: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// The certificate chain or the private key cannot be used by rustls
    /// (feature `rustls-server`).
    #[error("tls-cert, tls-key: {0}")]
    Identity(String),
}

/// Reads the PEM file `path`, given by `flag`; it must hold a PEM block.
pub fn read_pem(flag: &'static str, path: &Path) -> Result<Vec<u8>, PemError> {
    let bytes = std::fs::read(path).map_err(|error| PemError::Read { flag, path: path.to_owned(), error })?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(PemError::NotPem { flag, path: path.to_owned() });
    }
    Ok(bytes)
}

/// Certificate chain and private key (PEM) of a gRPC server.
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
    /// A certificate chain and its private key, both PEM (see [`read_pem`]).
    pub fn from_pem(cert: Vec<u8>, key: Vec<u8>) -> Self {
        Self { cert, key }
    }

    /// The tonic server configuration.
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new().identity(Identity::from_pem(&self.cert, &self.key))
    }

    /// The same identity as a rustls server configuration (ring provider, as
    /// tonic's), offering the ALPN protocols `alpn`: for servers that are not
    /// tonic's (the coordinator's HTTP front).
    #[cfg(feature = "rustls-server")]
    pub fn rustls_config(
        &self,
        alpn: &[&[u8]],
    ) -> Result<std::sync::Arc<tokio_rustls::rustls::ServerConfig>, PemError> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        use tokio_rustls::rustls;

        let certs = CertificateDer::pem_slice_iter(&self.cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| PemError::Identity(format!("certificate chain: {e}")))?;
        if certs.is_empty() {
            return Err(PemError::Identity("certificate chain: no CERTIFICATE block".into()));
        }
        // The key's error never quotes the key.
        let key = PrivateKeyDer::from_pem_slice(&self.key)
            .map_err(|_| PemError::Identity("private key: no usable PRIVATE KEY block".into()))?;
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| PemError::Identity(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| PemError::Identity(e.to_string()))?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(std::sync::Arc::new(config))
    }
}

/// How a client verifies the servers it dials: a CA (PEM) and, optionally,
/// the server name expected in their certificates (default: the host of the
/// address dialed).
#[derive(Clone)]
pub struct ClientTls {
    ca: Vec<u8>,
    domain: Option<String>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls").field("ca_bytes", &self.ca.len()).field("domain", &self.domain).finish()
    }
}

impl ClientTls {
    /// A CA certificate (PEM) and an optional server-name override.
    pub fn from_pem(ca: Vec<u8>, domain: Option<String>) -> Self {
        Self { ca, domain }
    }

    /// Reads the CA from `path`, given by `flag` (see [`read_pem`]).
    pub fn load(flag: &'static str, path: &Path, domain: Option<String>) -> Result<Self, PemError> {
        Ok(Self::from_pem(read_pem(flag, path)?, domain))
    }

    /// The server name override, if any.
    pub fn domain(&self) -> Option<&str> {
        self.domain.as_deref()
    }

    /// The tonic client configuration for a server at `address` (`host:port` or URI).
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

/// The URI to dial `address` at: `https://` when `tls` (a channel's scheme
/// must match its TLS setting), else as [`crate::client::normalize_uri`].
pub fn uri(address: &str, tls: bool) -> String {
    if !tls {
        return crate::client::normalize_uri(address);
    }
    let rest = address.split_once("://").map_or(address, |(_, r)| r);
    format!("https://{rest}")
}

/// The endpoint of a gRPC server at `address`: over TLS with `tls`, plaintext otherwise.
pub fn endpoint(address: &str, tls: Option<&ClientTlsConfig>) -> Result<Endpoint, tonic::transport::Error> {
    let endpoint = Endpoint::from_shared(uri(address, tls.is_some()))?;
    match tls {
        Some(tls) => endpoint.tls_config(tls.clone()),
        None => Ok(endpoint),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_uris_and_endpoints() {
        assert_eq!(host_of("127.0.0.1:5"), "127.0.0.1");
        assert_eq!(host_of("http://localhost:5"), "localhost");
        assert_eq!(host_of("https://[::1]:5/x"), "::1");
        assert_eq!(host_of("[::1]:5"), "::1");
        assert_eq!(host_of("name"), "name");
        assert_eq!(uri("a:1", false), "http://a:1");
        assert_eq!(uri("a:1", true), "https://a:1");
        assert_eq!(uri("http://a:1", true), "https://a:1");
        assert_eq!(endpoint("127.0.0.1:5", None).unwrap().uri().scheme_str(), Some("http"));
        let e = endpoint("http://127.0.0.1:5", Some(&ClientTlsConfig::new())).unwrap();
        assert_eq!(e.uri().scheme_str(), Some("https"));
    }

    #[test]
    fn rejects_missing_and_non_pem_files_naming_the_flag() {
        let e = read_pem("--tls-cert", Path::new("/nonexistent/c.pem")).unwrap_err();
        assert!(e.to_string().starts_with("--tls-cert: cannot read /nonexistent/c.pem: "), "{e}");
        let e = ClientTls::load("worker-tls-ca", Path::new("/proc/self/cmdline"), None).unwrap_err();
        assert_eq!(e.to_string(), "worker-tls-ca: /proc/self/cmdline is not a PEM file");
    }

    #[test]
    fn the_private_key_is_never_printed() {
        let t = ServerTls::from_pem(b"c".to_vec(), b"PRIVATE".to_vec());
        assert!(!format!("{t:?}").contains("PRIVATE"));
    }

    #[cfg(feature = "rustls-server")]
    #[test]
    fn an_unusable_identity_is_an_error_that_quotes_no_key() {
        let t = ServerTls::from_pem(b"-----BEGIN NOTHING-----\n".to_vec(), b"PRIVATE".to_vec());
        let e = t.rustls_config(&[b"h2"]).unwrap_err();
        assert!(e.to_string().starts_with("tls-cert, tls-key: certificate chain"), "{e}");
        assert!(!e.to_string().contains("PRIVATE"));
    }
}
