//! Joining the coordinator: register, then heartbeat with the current load at
//! the interval the coordinator asks for; re-register whenever the
//! coordinator no longer knows this worker or cannot be reached.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use qaq_proto::v1::registry_client::RegistryClient;
use qaq_proto::v1::{DeregisterRequest, HeartbeatRequest, ModelInfo, RegisterRequest};

use crate::engine::EngineHandle;
use crate::service::WorkerService;

/// Why a registration session ended (logged; the worker retries).
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("coordinator address: {0}")]
    Address(String),
    #[error("connecting: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("{0}")]
    Rpc(#[from] tonic::Status),
}

/// What the worker announces.
#[derive(Clone, Debug)]
pub struct Announcement {
    pub coordinator: String,
    pub worker_id: String,
    pub address: String,
    pub metrics_address: String,
    pub model: ModelInfo,
    pub secret: Option<crate::config::Secret>,
    pub max_batch: usize,
    /// TLS towards the coordinator (`None`: plaintext).
    pub coordinator_tls: Option<tonic::transport::ClientTlsConfig>,
}

/// Keeps the worker registered until the task is dropped.
pub async fn keep_registered(a: Announcement, engine: Arc<EngineHandle>, draining: Arc<AtomicBool>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match session(&a, &engine, &draining).await {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(e) => {
                tracing::warn!(coordinator = %a.coordinator, error = %e, "coordinator unreachable; retrying");
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
        tokio::time::sleep(backoff).await;
    }
}

/// One registration and its heartbeats; returns when the coordinator forgets
/// this worker, errs when it cannot be reached.
async fn session(a: &Announcement, engine: &EngineHandle, draining: &AtomicBool) -> Result<(), SessionError> {
    let channel = crate::tls::grpc_endpoint(&a.coordinator, a.coordinator_tls.as_ref())
        .map_err(|e| SessionError::Address(e.to_string()))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect()
        .await?;
    let mut client = RegistryClient::new(channel);
    let resp = client
        .register(RegisterRequest {
            worker_id: a.worker_id.clone(),
            address: a.address.clone(),
            model: Some(a.model.clone()),
            secret: a.secret.clone().map(|s| s.0).unwrap_or_default(),
            load: Some(WorkerService::load(engine, a.max_batch)),
            metrics_address: a.metrics_address.clone(),
        })
        .await?
        .into_inner();
    tracing::info!(coordinator = %a.coordinator, worker_id = %a.worker_id, "registered");
    let interval = Duration::from_millis(resp.heartbeat_interval_ms.clamp(50, 60_000));
    loop {
        tokio::time::sleep(interval).await;
        let known = client
            .heartbeat(HeartbeatRequest {
                worker_id: a.worker_id.clone(),
                load: Some(WorkerService::load(engine, a.max_batch)),
                secret: a.secret.clone().map(|s| s.0).unwrap_or_default(),
                draining: draining.load(Ordering::Relaxed),
            })
            .await?
            .into_inner()
            .known;
        if !known {
            tracing::info!("coordinator does not know this worker; registering again");
            return Ok(());
        }
    }
}

/// Leaves the cluster (best effort).
pub async fn deregister(a: &Announcement) {
    let Ok(ep) = crate::tls::grpc_endpoint(&a.coordinator, a.coordinator_tls.as_ref()) else { return };
    let Ok(channel) = ep.connect_timeout(Duration::from_secs(1)).timeout(Duration::from_secs(2)).connect().await else {
        return;
    };
    let req =
        DeregisterRequest { worker_id: a.worker_id.clone(), secret: a.secret.clone().map(|s| s.0).unwrap_or_default() };
    if let Err(e) = RegistryClient::new(channel).deregister(req).await {
        tracing::warn!(error = %e, "deregistration failed");
    }
}
