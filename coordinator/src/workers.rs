//! Connections to workers: one lazily-connecting channel per worker
//! incarnation (plaintext or TLS), and the best-effort Worker.Abort call.

use std::collections::HashMap;
use std::time::Duration;

use qaq_proto::tls::ClientTls;
use qaq_proto::v1::AbortRequest;
use qaq_proto::v1::worker_client::WorkerClient;
use tonic::transport::Channel;

use crate::error::GenerateError;

/// Time to establish a connection to a worker.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Time a Worker.Abort call may take.
pub const ABORT_TIMEOUT: Duration = Duration::from_secs(2);

/// Calls Worker.Abort, logging (not failing) when the worker cannot be reached.
pub async fn abort_on_worker(mut worker: WorkerClient<Channel>, worker_id: &str, request_id: &str) {
    let mut req = tonic::Request::new(AbortRequest { request_id: request_id.to_string() });
    req.set_timeout(ABORT_TIMEOUT);
    match tokio::time::timeout(ABORT_TIMEOUT, worker.abort(req)).await {
        Ok(Ok(r)) => tracing::debug!(%worker_id, %request_id, found = r.get_ref().found, "aborted on worker"),
        Ok(Err(e)) => tracing::warn!(%worker_id, %request_id, error = %e, "Worker.Abort failed"),
        Err(_) => tracing::warn!(%worker_id, %request_id, "Worker.Abort timed out"),
    }
}

/// The cached channel to a worker, or a new lazily-connecting one when the
/// worker is new or re-registered.
pub fn channel_for(
    channels: &mut HashMap<String, (u64, Channel)>,
    worker_id: &str,
    incarnation: u64,
    address: &str,
    tls: Option<&ClientTls>,
) -> Result<Channel, GenerateError> {
    if let Some((inc, c)) = channels.get(worker_id)
        && *inc == incarnation
    {
        return Ok(c.clone());
    }
    let bad = |e: String| GenerateError::Worker {
        worker_id: worker_id.to_string(),
        status: tonic::Status::unavailable(format!("bad worker address {address:?}: {e}")),
    };
    let tls = tls.map(|t| t.client_config(address));
    let channel = qaq_proto::tls::endpoint(address, tls.as_ref())
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .connect_lazy();
    channels.insert(worker_id.to_string(), (incarnation, channel.clone()));
    Ok(channel)
}
