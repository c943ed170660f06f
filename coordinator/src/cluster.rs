//! [`Cluster`]: the shared handle over the registry, the in-flight request
//! table and the connections to workers. Critical sections are short and
//! never await; everything that talks to a worker happens outside the lock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use qaq_proto::v1::worker_client::WorkerClient;
use qaq_proto::v1::{
    AbortRequest, ClusterStatusResponse, GenerateRequest, HeartbeatRequest, HeartbeatResponse, ListModelsResponse,
    ModelInfo, RegisterRequest, RegisterResponse, WorkerState, WorkerStatus,
};
use tokio::sync::oneshot;
use tonic::transport::{Channel, Endpoint};

use crate::config::Config;
use crate::error::{GenerateError, RegistryError};
use crate::metrics as m;
use crate::placement::{self, Policy};
use crate::registry::Registry;
use crate::requests::RequestTable;

/// Time to establish a connection to a worker.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Time a Worker.Abort call may take.
pub const ABORT_TIMEOUT: Duration = Duration::from_secs(2);

/// Mutable state, under one mutex.
#[derive(Debug)]
struct State {
    registry: Registry,
    requests: RequestTable,
    /// worker id -> (incarnation, channel): reused until the worker re-registers.
    channels: HashMap<String, (u64, Channel)>,
}

/// Shared handle; cheap to clone.
#[derive(Debug, Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: Config,
    policy: Policy,
    state: Mutex<State>,
}

/// A request admitted and placed on a worker.
#[derive(Debug)]
pub struct Admission {
    /// Request id (the client's or a generated one).
    pub request_id: String,
    /// Worker chosen.
    pub worker_id: String,
    /// Client for that worker.
    pub worker: WorkerClient<Channel>,
    /// The model the request runs on.
    pub model: ModelInfo,
    /// Fires when the client calls Abort for this request.
    pub abort: oneshot::Receiver<()>,
}

impl Cluster {
    /// An empty cluster.
    pub fn new(config: Config) -> Self {
        let state = State {
            registry: Registry::new(config.lease),
            requests: RequestTable::default(),
            channels: HashMap::new(),
        };
        Self { inner: Arc::new(Inner { config, policy: Policy::default(), state: Mutex::new(state) }) }
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (every
        // mutation is a single insert/remove): keep serving.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registry.Register.
    pub fn register(&self, req: &RegisterRequest) -> Result<RegisterResponse, RegistryError> {
        let mut st = self.lock();
        let w = st.registry.register(req, Instant::now())?;
        tracing::info!(worker_id = %w.worker_id, address = %w.address, model = %w.model.name, "worker registered");
        publish_worker_gauges(&st.registry);
        Ok(RegisterResponse {
            heartbeat_interval_ms: self.inner.config.heartbeat_interval.as_millis() as u64,
            lease_ms: self.inner.config.lease.as_millis() as u64,
        })
    }

    /// Registry.Heartbeat.
    pub fn heartbeat(&self, req: &HeartbeatRequest) -> HeartbeatResponse {
        let mut st = self.lock();
        let known = st.registry.heartbeat(&req.worker_id, req.load, req.draining, Instant::now());
        if !known {
            tracing::debug!(worker_id = %req.worker_id, "heartbeat from an unknown or down worker");
        }
        HeartbeatResponse { known }
    }

    /// Registry.Deregister.
    pub fn deregister(&self, worker_id: &str) -> bool {
        let mut st = self.lock();
        let known = st.registry.deregister(worker_id);
        st.channels.remove(worker_id);
        publish_worker_gauges(&st.registry);
        known
    }

    /// Marks workers with lapsed leases DOWN and refreshes the worker gauges.
    pub fn sweep(&self) {
        let mut st = self.lock();
        for id in st.registry.expire(Instant::now()) {
            tracing::warn!(worker_id = %id, "lease expired: worker marked down");
            st.channels.remove(&id);
        }
        publish_worker_gauges(&st.registry);
    }

    /// Validates, names and places a request. On success the request is in
    /// the in-flight table and counted on its worker until [`Self::release`].
    pub fn admit(&self, req: &mut GenerateRequest) -> Result<Admission, GenerateError> {
        let resolved = {
            let mut st = self.lock();
            st.registry.expire(Instant::now());
            st.registry.resolve_model(&req.model)
        };
        let model = match resolved {
            Ok(model) => model,
            Err(e @ GenerateError::NoLiveWorker { .. }) => {
                // Bad fields are reported as such even when no worker is up.
                qaq_proto::validate::generate_request(req, 0, 0).map_err(GenerateError::Invalid)?;
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        qaq_proto::validate::generate_request(req, model.context_length, model.vocab_size)
            .map_err(GenerateError::Invalid)?;
        if req.model.is_empty() {
            req.model = model.name.clone();
        }
        if req.request_id.is_empty() {
            req.request_id = uuid::Uuid::new_v4().to_string();
        }

        let mut st = self.lock();
        if st.requests.contains(&req.request_id) {
            return Err(GenerateError::DuplicateRequestId(req.request_id.clone()));
        }
        let now = Instant::now();
        st.registry.expire(now);
        let snapshot = st.registry.snapshot(now);
        let chosen = placement::place(self.inner.policy, &snapshot, &model.name, &mut rand::rng())
            .ok_or_else(|| GenerateError::NoLiveWorker { model: Some(model.name.clone()) })?;
        let w = &snapshot[chosen];
        let channel = channel_for(&mut st.channels, &w.worker_id, w.incarnation, &w.address)?;
        let (abort_tx, abort_rx) = oneshot::channel();
        st.requests.insert(&req.request_id, &w.worker_id, abort_tx);
        st.registry.add_in_flight(&w.worker_id);
        Ok(Admission {
            request_id: req.request_id.clone(),
            worker_id: w.worker_id.clone(),
            worker: WorkerClient::new(channel),
            model,
            abort: abort_rx,
        })
    }

    /// Forgets a finished request.
    pub fn release(&self, request_id: &str) {
        let mut st = self.lock();
        if let Some(worker_id) = st.requests.remove(request_id) {
            st.registry.remove_in_flight(&worker_id);
        }
    }

    /// Generation.Abort: signals the request's stream and tells its worker.
    /// Returns whether the request was in flight.
    pub async fn abort(&self, request_id: &str) -> bool {
        let target = {
            let mut st = self.lock();
            match st.requests.take_abort(request_id) {
                None => return false,
                Some((worker_id, signal)) => {
                    if let Some(s) = signal {
                        // The stream may already be gone; then nothing waits.
                        let _ = s.send(());
                    }
                    st.channels.get(&worker_id).map(|(_, c)| (worker_id.clone(), c.clone()))
                }
            }
        };
        if let Some((worker_id, channel)) = target {
            abort_on_worker(WorkerClient::new(channel), &worker_id, request_id).await;
        }
        true
    }

    /// Generation.ClusterStatus.
    pub fn status(&self) -> ClusterStatusResponse {
        let mut st = self.lock();
        let now = Instant::now();
        st.registry.expire(now);
        let workers = st
            .registry
            .entries()
            .map(|w| WorkerStatus {
                worker_id: w.worker_id.clone(),
                address: w.address.clone(),
                model: Some(w.model.clone()),
                state: w.state as i32,
                load: Some(w.load),
                last_heartbeat_ms_ago: now.saturating_duration_since(w.last_heartbeat).as_millis() as u64,
                in_flight: w.in_flight,
            })
            .collect();
        ClusterStatusResponse { workers, in_flight: st.requests.len() as u32 }
    }

    /// Generation.ListModels.
    pub fn models(&self) -> ListModelsResponse {
        let mut st = self.lock();
        st.registry.expire(Instant::now());
        ListModelsResponse { models: st.registry.live_models() }
    }
}

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
fn channel_for(
    channels: &mut HashMap<String, (u64, Channel)>,
    worker_id: &str,
    incarnation: u64,
    address: &str,
) -> Result<Channel, GenerateError> {
    if let Some((inc, c)) = channels.get(worker_id)
        && *inc == incarnation
    {
        return Ok(c.clone());
    }
    let endpoint =
        Endpoint::from_shared(qaq_proto::client::normalize_uri(address)).map_err(|e| GenerateError::Worker {
            worker_id: worker_id.to_string(),
            status: tonic::Status::unavailable(format!("bad worker address {address:?}: {e}")),
        })?;
    let channel = endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .connect_lazy();
    channels.insert(worker_id.to_string(), (incarnation, channel.clone()));
    Ok(channel)
}

fn publish_worker_gauges(r: &Registry) {
    let (up, draining, down) = r.state_counts();
    for (state, n) in [("up", up), ("draining", draining), ("down", down)] {
        metrics::gauge!(m::WORKERS, m::LABEL_STATE => state).set(n as f64);
    }
}

/// The proto enum of a status' state field, for display.
pub fn state_name(state: i32) -> &'static str {
    match WorkerState::try_from(state) {
        Ok(WorkerState::Up) => "UP",
        Ok(WorkerState::Draining) => "DRAINING",
        Ok(WorkerState::Down) => "DOWN",
        _ => "UNKNOWN",
    }
}

#[cfg(test)]
mod tests {
    use qaq_proto::v1::WorkerLoad;
    use tonic::Code;

    use super::*;

    fn reg(id: &str, running: u32) -> RegisterRequest {
        RegisterRequest {
            worker_id: id.into(),
            address: "127.0.0.1:9".into(),
            model: Some(ModelInfo {
                name: "smol".into(),
                context_length: 8192,
                vocab_size: 49152,
                ..Default::default()
            }),
            load: Some(WorkerLoad { running, ..Default::default() }),
            ..Default::default()
        }
    }

    fn req(prompt: &str) -> GenerateRequest {
        GenerateRequest { prompt: prompt.into(), max_new_tokens: Some(4), ..Default::default() }
    }

    fn code(r: Result<Admission, GenerateError>) -> Code {
        tonic::Status::from(r.unwrap_err()).code()
    }

    #[tokio::test]
    async fn admit_validates_then_places_and_release_uncounts() {
        let c = Cluster::new(Config::default());
        // No worker: bad input is still INVALID_ARGUMENT, good input UNAVAILABLE.
        assert_eq!(code(c.admit(&mut req(""))), Code::InvalidArgument);
        assert_eq!(code(c.admit(&mut req("hi"))), Code::Unavailable);
        c.register(&reg("w1", 5)).unwrap();
        c.register(&reg("w2", 0)).unwrap();
        let mut too_long = req("hi");
        too_long.max_new_tokens = Some(8192);
        let e = tonic::Status::from(c.admit(&mut too_long).unwrap_err());
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().starts_with("max_new_tokens"), "{}", e.message());
        let mut unknown = req("hi");
        unknown.model = "nope".into();
        assert_eq!(code(c.admit(&mut unknown)), Code::NotFound);

        let mut r = req("hi");
        let a = c.admit(&mut r).unwrap();
        assert_eq!(a.worker_id, "w2");
        assert!(!r.request_id.is_empty() && r.request_id == a.request_id);
        assert_eq!(r.model, "smol");
        let s = c.status();
        assert_eq!(s.in_flight, 1);
        assert_eq!(s.workers.iter().map(|w| w.in_flight).collect::<Vec<_>>(), [0, 1]);
        // Same id again: ALREADY_EXISTS.
        let mut dup = req("hi");
        dup.request_id = a.request_id.clone();
        assert_eq!(code(c.admit(&mut dup)), Code::AlreadyExists);
        c.release(&a.request_id);
        assert_eq!(c.status().in_flight, 0);
        assert!(c.status().workers.iter().all(|w| w.in_flight == 0));
    }

    #[tokio::test]
    async fn abort_signals_the_stream_once() {
        let c = Cluster::new(Config::default());
        c.register(&reg("w1", 0)).unwrap();
        let mut r = req("hi");
        r.request_id = "job-1".into();
        let mut a = c.admit(&mut r).unwrap();
        // The worker address is unreachable: abort still reports found.
        assert!(c.abort("job-1").await);
        assert!(a.abort.try_recv().is_ok());
        assert!(!c.abort("job-2").await);
        c.release("job-1");
        assert!(!c.abort("job-1").await);
    }

    #[tokio::test]
    async fn status_lists_workers_sorted_and_models() {
        let c = Cluster::new(Config::default());
        c.register(&reg("w2", 0)).unwrap();
        c.register(&reg("w1", 3)).unwrap();
        let s = c.status();
        let ids: Vec<_> = s.workers.iter().map(|w| w.worker_id.as_str()).collect();
        assert_eq!(ids, ["w1", "w2"]);
        assert_eq!(s.workers[0].load.unwrap().running, 3);
        assert!(s.workers.iter().all(|w| state_name(w.state) == "UP"));
        let models = c.models().models;
        assert_eq!(models.len(), 1);
        assert_eq!((models[0].name.as_str(), models[0].workers), ("smol", 2));
        assert!(c.heartbeat(&HeartbeatRequest { worker_id: "w1".into(), ..Default::default() }).known);
        assert!(!c.heartbeat(&HeartbeatRequest { worker_id: "w9".into(), ..Default::default() }).known);
        assert!(c.deregister("w1"));
        assert_eq!(c.status().workers.len(), 1);
    }
}
