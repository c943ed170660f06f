//! `run`: serves a loaded model on already-bound listeners until `shutdown`
//! resolves, then drains (no new requests; in-flight ones get the grace
//! period), deregisters and stops.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use qaq_proto::v1::worker_server::WorkerServer;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

use crate::config::WorkerConfig;
use crate::engine::EngineHandle;
use crate::error::ServeError;
use crate::kv;
use crate::model::LoadedModel;
use crate::registration::{self, Announcement, Coordinator};
use crate::service::{KvSettings, WorkerService};

/// Serves until `shutdown` resolves. `metrics_addr` is announced to the
/// coordinator (empty if metrics are not served).
pub async fn run(
    listener: TcpListener,
    metrics_addr: String,
    model: Arc<LoadedModel>,
    cfg: WorkerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let addr = listener.local_addr()?;
    let shape = model.model.kv_shape();
    let worst = kv::worst_bytes_per_token(&shape, &cfg.kv_policy.policy)
        .map_err(|e| ServeError::Config(format!("--kv-policy: {e}")))?;
    cfg.check_budgets(worst, kv::backup_bytes_per_token(&shape))?;
    let engine = Arc::new(EngineHandle::start(model.clone(), cfg.engine.clone()));
    let draining = Arc::new(AtomicBool::new(false));
    let service = WorkerService::new(
        cfg.worker_id.clone(),
        cfg.engine.max_batch,
        Arc::new(KvSettings::new(cfg.kv_policy.clone()).on_node(cfg.node.clone())),
        model.clone(),
        engine.clone(),
        draining.clone(),
        Arc::new(cfg.tls.clone()),
    );

    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<WorkerServer<WorkerService>>().await;
    // Reflection v1 and v1alpha (grpcio's reflection client, older grpcurl and GUI clients).
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(qaq_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let (reflection, reflection_v1alpha) = (reflection().build_v1()?, reflection().build_v1alpha()?);

    let coordinators: Vec<Coordinator> =
        cfg.coordinators.iter().map(|c| Coordinator { name: c.clone(), tls: cfg.tls.coordinator_client(c) }).collect();
    let announcement = (!coordinators.is_empty()).then(|| Announcement {
        coordinators,
        worker_id: cfg.worker_id.clone(),
        address: cfg.advertise.clone().unwrap_or_else(|| addr.to_string()),
        metrics_address: metrics_addr,
        model: WorkerService::model_info(&model),
        secret: cfg.registration_secret.clone(),
        max_batch: cfg.engine.max_batch,
    });
    let heartbeats =
        announcement.clone().map(|a| tokio::spawn(registration::keep_registered(a, engine.clone(), draining.clone())));

    // Stop signal for the gRPC server; fired after the drain below.
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = cfg.tls.server_config() {
        builder = builder.tls_config(tls)?;
    }
    let server = builder
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(WorkerServer::new(service))
        // TCP_NODELAY on accepted sockets (`Server::tcp_nodelay` does not apply
        // to an incoming stream): small streamed messages must not wait for ACKs.
        .serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), async {
            let _ = stop_rx.await;
        });
    let server = tokio::spawn(server);

    shutdown.await;
    tracing::info!("shutting down: draining");
    draining.store(true, Ordering::Relaxed);
    reporter.set_not_serving::<WorkerServer<WorkerService>>().await;
    let deadline = Instant::now() + cfg.shutdown_grace;
    while Instant::now() < deadline {
        let l = engine.load();
        if l.running() + l.waiting() == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // What the grace did not finish is parked (its KV cache kept for the next worker,
    // which the coordinator names when it migrates the request) and ended; the gRPC
    // server keeps serving Worker.ExportKv until every parked cache is pulled or expired.
    let l = engine.load();
    if l.running() + l.waiting() > 0 {
        match engine.park_all().await {
            Ok(n) if n > 0 => {
                let parked = engine.parked();
                let until = Instant::now() + parked.ttl();
                tracing::info!(
                    parked = n,
                    window_ms = parked.ttl().as_millis() as u64,
                    "KV caches parked for migration"
                );
                while parked.pending() > 0 && Instant::now() < until {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "parking the KV caches failed"),
        }
    }
    if let Some(h) = heartbeats {
        h.abort();
    }
    if let Some(a) = &announcement {
        registration::deregister(a).await;
    }
    let _ = stop_tx.send(());
    // Open streams end when the engine stops (its drop aborts what is left).
    drop(engine);
    match tokio::time::timeout(std::time::Duration::from_secs(2), server).await {
        Ok(r) => r??,
        Err(_) => tracing::warn!("gRPC server did not stop in time"),
    }
    Ok(())
}
