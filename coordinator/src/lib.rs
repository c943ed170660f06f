//! qaq coordinator: the client-facing services of a qaq cluster.
//!
//! Workers register with the coordinator's `qaq.v1.Registry` (presenting the
//! shared secret when one is configured) and heartbeat their load; clients
//! call `qaq.v1.Generation` over gRPC or the OpenAI-compatible HTTP API (with
//! an API key when keys are configured). Both fronts take one request path:
//! each request is admitted (or queued, or refused when the queue is full),
//! placed on a worker and its stream forwarded to the client, failing over
//! to another worker when its worker dies.
//!
//! Modules:
//! - [`config`]: clap [`config::Args`] (`QAQ_*` env) -> validated [`config::Config`].
//! - [`error`]: typed errors and their one mapping to `tonic::Status`, and
//!   beside it to HTTP statuses and OpenAI-shaped errors.
//! - [`auth`]: API keys and the registration secret (TLS settings are
//!   `qaq_proto::tls`, loaded by [`config`]).
//! - [`registry`]: the worker registry and leases (plain struct, time injected).
//! - [`placement`]: pure placement policies over a registry snapshot.
//! - [`admission`]: the bounded admission queue and the retry-after hint.
//! - [`requests`]: the in-flight request table (request id -> worker, abort signal).
//! - [`cluster`]: the shared handle over registry, queue, requests and worker channels.
//! - [`workers`]: channels to workers (plaintext or TLS) and Worker.Abort.
//! - [`stream`]: forwards one worker stream to its client (deadline, abort,
//!   disconnect, failover with request migration).
//! - [`deadline`]: the client's `grpc-timeout`.
//! - [`front`]: the one request path both fronts call (admit, count,
//!   forward), with errors still typed.
//! - [`service`]: the tonic services `Generation` and `Registry`.
//! - [`http`]: the OpenAI-compatible HTTP front (axum), over [`front`].
//! - [`metrics`]: metric names, buckets and the Prometheus recorder;
//!   the `/metrics` endpoint is `qaq_proto::metrics_http`.
//! - [`process`]: child processes that announce readiness on stdout (used by
//!   `qaq up` and the integration tests).
//!
//! [`run`] serves the gRPC services on one listener and the HTTP front on
//! another until a shutdown future resolves.

pub mod admission;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod deadline;
pub mod error;
pub mod front;
pub mod http;
pub mod metrics;
pub mod placement;
pub mod process;
pub mod registry;
pub mod requests;
pub mod service;
pub mod stream;
pub mod workers;

use std::future::Future;

use qaq_proto::v1::generation_server::GenerationServer;
use qaq_proto::v1::registry_server::RegistryServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;

use crate::auth::ApiKeyCheck;
pub use crate::cluster::Cluster;
pub use crate::config::{Args, Config};
pub use crate::error::ServeError;
use crate::service::generation::GenerationService;
use crate::service::registry::RegistryService;

/// Largest client request accepted on the wire: room for a prompt of
/// `qaq_proto::validate::MAX_PROMPT_BYTES`, so that an oversized prompt gets
/// the validator's INVALID_ARGUMENT naming the field rather than a transport
/// error.
pub const MAX_REQUEST_BYTES: usize = 2 * qaq_proto::validate::MAX_PROMPT_BYTES + (64 << 10);

/// Prefix of the line the coordinator binary prints on stdout once serving:
/// `QAQ_COORDINATOR_READY grpc=HOST:PORT metrics=HOST:PORT http=HOST:PORT`
/// (`-` for a disabled endpoint).
pub const READY_PREFIX: &str = "QAQ_COORDINATOR_READY";

/// The readiness line for these addresses.
pub fn ready_line(
    grpc: std::net::SocketAddr,
    metrics: Option<std::net::SocketAddr>,
    http: Option<std::net::SocketAddr>,
) -> String {
    let or_dash = |a: Option<std::net::SocketAddr>| a.map_or_else(|| "-".to_string(), |a| a.to_string());
    format!("{READY_PREFIX} grpc={grpc} metrics={} http={}", or_dash(metrics), or_dash(http))
}

/// The listeners the coordinator serves on.
#[derive(Debug)]
pub struct Listeners {
    /// `qaq.v1.Generation`, `qaq.v1.Registry`, health and reflection (gRPC).
    pub grpc: TcpListener,
    /// The OpenAI-compatible HTTP API, if enabled.
    pub http: Option<TcpListener>,
}

/// Server reflection, `grpc.reflection.v1` and `v1alpha` (grpcio's
/// reflection client, older grpcurl and GUI clients speak `v1alpha`), over
/// the `qaq.v1` and health descriptors.
fn reflection_builder() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(qaq_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

/// The accepted connections of `listener`, with TCP_NODELAY set:
/// `Server::tcp_nodelay` does not apply to an incoming stream, and without it
/// the small messages of a token stream wait for delayed ACKs (40 ms stalls).
fn nodelay(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Serves `qaq.v1.Generation`, `qaq.v1.Registry`, `grpc.health.v1` and
/// server reflection on `listeners.grpc`, and the HTTP front on
/// `listeners.http`, until `shutdown` resolves; then nothing new is admitted
/// and in-flight streams get `config.shutdown_grace` to finish.
pub async fn run(
    listeners: Listeners,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let cluster = Cluster::new(config.clone());
    let (health, health_service) = tonic_health::server::health_reporter();
    // Generation is SERVING only while a worker is UP (readiness, kept
    // current below). Registry serves from the start.
    health.set_not_serving::<GenerationServer<GenerationService>>().await;
    health.set_serving::<RegistryServer<RegistryService>>().await;
    let reflection = reflection_builder().build_v1()?;
    let reflection_v1alpha = reflection_builder().build_v1alpha()?;

    // Sweeps lapsed leases so states and gauges change without traffic.
    let sweeper = {
        let cluster = cluster.clone();
        let every = config.sweep_interval();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                cluster.sweep();
            }
        })
    };
    // Keeps Generation's health in step with readiness.
    let readiness = {
        let (mut ready, health) = (cluster.readiness(), health.clone());
        tokio::spawn(async move {
            loop {
                if *ready.borrow_and_update() {
                    health.set_serving::<GenerationServer<GenerationService>>().await;
                } else {
                    health.set_not_serving::<GenerationServer<GenerationService>>().await;
                }
                if ready.changed().await.is_err() {
                    return;
                }
            }
        })
    };

    // `stop` flips once `shutdown` resolves; read by the server's graceful
    // shutdown and by the grace timer below.
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &config.tls {
        builder = builder.tls_config(tls.server_config())?;
    }
    let generation =
        GenerationServer::new(GenerationService::new(cluster.clone())).max_decoding_message_size(MAX_REQUEST_BYTES);
    let server = builder
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(InterceptedService::new(generation, ApiKeyCheck::new(config.api_keys.clone())))
        .add_service(RegistryServer::new(RegistryService::new(cluster.clone())))
        .serve_with_incoming_shutdown(nodelay(listeners.grpc), stopped(stop_rx.clone()));
    let http_stopped = stopped(stop_rx.clone());
    let http = async {
        match listeners.http {
            Some(l) => http::serve(l, cluster.clone(), http_stopped).await,
            None => Ok(()),
        }
    };
    let servers = async {
        let (grpc, http) = tokio::join!(server, http);
        grpc.map_err(ServeError::from).and(http)
    };
    let grace = async {
        stopped(stop_rx).await;
        cluster.close();
        health.set_not_serving::<GenerationServer<GenerationService>>().await;
        let in_flight = cluster.status().in_flight;
        tracing::info!(in_flight, grace = ?config.shutdown_grace, "shutting down");
        tokio::time::sleep(config.shutdown_grace).await;
    };
    let result = tokio::select! {
        r = servers => r,
        _ = grace => {
            tracing::warn!("shutdown grace elapsed with streams still open");
            Ok(())
        }
    };
    sweeper.abort();
    readiness.abort();
    result
}
