//! `qaq.v1`: the protocol of qaq.
//!
//! - [`v1`]: generated messages, clients and servers for `qaq/v1/*.proto`
//!   (client API `Generation`, internal `Registry` and `Worker` services).
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors, for gRPC server reflection.
//! - [`client`]: a thin client SDK (address normalisation, API-key metadata).
//! - [`validate`]: field-range validation shared by coordinator and worker.
//! - [`status`]: machine-readable error reasons (`qaq.v1.ErrorDetail`) in
//!   `tonic::Status` details: build them, read them back.
//! - [`tls`]: TLS plumbing shared by coordinator, worker and CLI (PEM files,
//!   server identity, the CA clients verify servers against, `https://` endpoints).
//! - `metrics_http` (feature `metrics-http`): the Prometheus `/metrics`
//!   endpoint both servers expose.
//!
//! No domain logic lives here.

/// Generated code of package `qaq.v1`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("qaq.v1");
}

/// Encoded `FileDescriptorSet` of every `qaq.v1` file, for tonic-reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("qaq_v1_descriptor");

pub mod client;
pub mod status;
pub mod tls;
pub mod validate;

#[cfg(feature = "metrics-http")]
pub mod metrics_http;
