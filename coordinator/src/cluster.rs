//! [`Cluster`]: the shared handle over the registry, the in-flight request
//! table and the connections to workers. Critical sections are short and
//! never await; everything that talks to a worker happens outside the lock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use qaq_proto::v1::worker_client::WorkerClient;
use qaq_proto::v1::{
    ClusterStatusResponse, GenerateRequest, HeartbeatRequest, HeartbeatResponse, ListModelsResponse, ModelInfo,
    RegisterRequest, RegisterResponse, WorkerState, WorkerStatus,
};
use tokio::sync::{Notify, oneshot, watch};
use tonic::transport::Channel;

use crate::admission::{AdmissionQueue, DurationEwma, retry_after};
use crate::config::Config;
use crate::error::{GenerateError, RegistryError};
use crate::metrics::{self as m, Rejection};
use crate::placement::{self, Ask, Decision, Policy};
use crate::registry::Registry;
use crate::requests::RequestTable;
use crate::workers::channel_for;
pub use crate::workers::{ABORT_TIMEOUT, abort_on_worker};

/// Prompt bytes per token assumed when predicting a request's KV footprint
/// (the coordinator does not tokenize).
const BYTES_PER_PROMPT_TOKEN: u64 = 3;

/// Mutable state, under one mutex.
#[derive(Debug)]
struct State {
    registry: Registry,
    requests: RequestTable,
    /// worker id -> (incarnation, channel): reused until the worker re-registers.
    channels: HashMap<String, (u64, Channel)>,
    queue: AdmissionQueue,
    /// Round-robin position.
    cursor: u64,
    durations: DurationEwma,
    /// Set by [`Cluster::close`]: nothing new is admitted.
    closing: bool,
    /// Readiness (see [`Cluster::ready`]), for watchers.
    ready: watch::Sender<bool>,
}

/// Shared handle; cheap to clone.
#[derive(Debug, Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: Config,
    state: Mutex<State>,
    /// Wakes queued admissions ([`Cluster::admit`] waits on it) whenever a
    /// slot may have freed: release, (re-)registration, heartbeat, close.
    slot_freed: Notify,
}

/// A request placed on a worker.
#[derive(Debug)]
pub struct Placed {
    /// Worker chosen.
    pub worker_id: String,
    /// Its registration incarnation (to report failures of this very worker).
    pub incarnation: u64,
    /// Client for that worker.
    pub worker: WorkerClient<Channel>,
    /// Its registered address (host:port of its Worker service).
    pub address: String,
}

/// A request admitted and placed on a worker.
#[derive(Debug)]
pub struct Admission {
    /// Request id (the client's or a generated one).
    pub request_id: String,
    /// Where it runs.
    pub placed: Placed,
    /// The model the request runs on.
    pub model: ModelInfo,
    /// Tokens it may hold in the KV cache (placement's prediction).
    pub predicted_tokens: u64,
    /// Fires when the client calls Abort for this request.
    pub abort: oneshot::Receiver<()>,
}

/// What placement is asked for one request.
#[derive(Debug, Clone, Copy)]
struct Want<'a> {
    request_id: &'a str,
    model: &'a str,
    session: &'a str,
    predicted_tokens: u64,
    exclude: &'a [String],
}

/// Predicted KV tokens of a request: prompt estimate plus max_new_tokens.
pub fn predicted_tokens(req: &GenerateRequest, model: &ModelInfo) -> u64 {
    let prompt_bytes = req.prompt.len() + req.messages.iter().map(|m| m.content.len() + 8).sum::<usize>();
    let prompt = (prompt_bytes as u64).div_ceil(BYTES_PER_PROMPT_TOKEN);
    let new = u64::from(req.max_new_tokens.unwrap_or(qaq_proto::validate::DEFAULT_MAX_NEW_TOKENS));
    (prompt + new).min(u64::from(model.context_length.max(1)))
}

/// Removes a queued request when its admission ends without a placement
/// (deadline, abort, client gone, error).
struct QueueGuard<'a> {
    cluster: &'a Cluster,
    ticket: u64,
    request_id: String,
    placed: bool,
}

impl Drop for QueueGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.cluster.lock();
        st.queue.remove(self.ticket);
        metrics::gauge!(m::QUEUE_DEPTH).set(st.queue.len() as f64);
        if !self.placed {
            st.requests.remove(&self.request_id);
        }
        drop(st);
        // The next in line may be placeable now.
        self.cluster.inner.slot_freed.notify_waiters();
    }
}

impl Cluster {
    /// An empty cluster.
    pub fn new(config: Config) -> Self {
        let state = State {
            registry: Registry::new(config.lease).with_max_per_worker(config.max_per_worker),
            requests: RequestTable::default(),
            channels: HashMap::new(),
            queue: AdmissionQueue::new(config.max_queue),
            cursor: 0,
            durations: DurationEwma::default(),
            closing: false,
            ready: watch::Sender::new(false),
        };
        Self { inner: Arc::new(Inner { config, state: Mutex::new(state), slot_freed: Notify::new() }) }
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

    fn check_secret(&self, worker_id: &str, presented: &str) -> Result<(), RegistryError> {
        match &self.inner.config.registration_secret {
            Some(secret) if !secret.matches(presented) => {
                Rejection::BadSecret.count();
                tracing::warn!(%worker_id, "refused a worker: registration secret missing or wrong");
                Err(RegistryError::BadSecret)
            }
            _ => Ok(()),
        }
    }

    /// Registry.Register.
    pub fn register(&self, req: &RegisterRequest) -> Result<RegisterResponse, RegistryError> {
        self.check_secret(&req.worker_id, &req.secret)?;
        let mut st = self.lock();
        let w = st.registry.register(req, Instant::now())?;
        tracing::info!(worker_id = %w.worker_id, address = %w.address, model = %w.model.name, "worker registered");
        publish_worker_gauges(&st);
        drop(st);
        self.inner.slot_freed.notify_waiters();
        Ok(RegisterResponse {
            heartbeat_interval_ms: self.inner.config.heartbeat_interval.as_millis() as u64,
            lease_ms: self.inner.config.lease.as_millis() as u64,
        })
    }

    /// Registry.Heartbeat.
    pub fn heartbeat(&self, req: &HeartbeatRequest) -> Result<HeartbeatResponse, RegistryError> {
        self.check_secret(&req.worker_id, &req.secret)?;
        let mut st = self.lock();
        // Other workers' lapsed leases first, reported (gauges, channels) as
        // at every sweep: the registry's heartbeat only looks at this one.
        expire(&mut st);
        let before = st.registry.get(&req.worker_id).map(|w| w.state);
        let known = st.registry.heartbeat(&req.worker_id, req.load, req.draining, Instant::now());
        if !known {
            tracing::debug!(worker_id = %req.worker_id, "heartbeat from an unknown or down worker");
        }
        let after = st.registry.get(&req.worker_id).map(|w| w.state);
        if before != after {
            if after == Some(WorkerState::Draining) {
                tracing::info!(worker_id = %req.worker_id, "worker draining: no new placements");
            }
            publish_worker_gauges(&st);
        }
        let queued = !st.queue.is_empty();
        drop(st);
        if queued {
            self.inner.slot_freed.notify_waiters();
        }
        Ok(HeartbeatResponse { known })
    }

    /// Registry.Deregister.
    pub fn deregister(&self, worker_id: &str, secret: &str) -> Result<bool, RegistryError> {
        self.check_secret(worker_id, secret)?;
        let mut st = self.lock();
        let known = st.registry.deregister(worker_id);
        st.channels.remove(worker_id);
        publish_worker_gauges(&st);
        Ok(known)
    }

    /// Marks workers with lapsed leases DOWN and refreshes the worker gauges.
    pub fn sweep(&self) {
        let mut st = self.lock();
        expire(&mut st);
        publish_worker_gauges(&st);
    }

    /// A worker's connection failed: mark it DOWN now rather than at the end
    /// of its lease (it re-registers if it is alive).
    pub fn suspect(&self, worker_id: &str, incarnation: u64) {
        let mut st = self.lock();
        if st.registry.mark_down(worker_id, incarnation) {
            tracing::warn!(%worker_id, "worker connection failed: marked down");
            st.channels.remove(worker_id);
            publish_worker_gauges(&st);
        }
    }

    /// Stops admitting (coordinator shutdown); queued requests are rejected.
    pub fn close(&self) {
        let mut st = self.lock();
        st.closing = true;
        publish_worker_gauges(&st);
        drop(st);
        self.inner.slot_freed.notify_waiters();
    }

    /// Resolves the model and validates the request (names it when unnamed).
    fn validate(&self, req: &mut GenerateRequest) -> Result<ModelInfo, GenerateError> {
        let resolved = {
            let mut st = self.lock();
            expire(&mut st);
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
        Ok(model)
    }

    /// Validates, names and places a request; when every worker is busy it
    /// waits in the admission queue (FIFO per model) until a slot frees, its
    /// `deadline` passes or it is aborted. On success the request is in the
    /// in-flight table and counted on its worker until [`Self::release`].
    pub async fn admit(
        &self,
        req: &mut GenerateRequest,
        deadline: Option<tokio::time::Instant>,
        timeout: Option<Duration>,
    ) -> Result<Admission, GenerateError> {
        let model = self.validate(req)?;
        let predicted = predicted_tokens(req, &model);
        let want = Want {
            request_id: &req.request_id,
            model: &model.name,
            session: &req.session_id,
            predicted_tokens: predicted,
            exclude: &[],
        };
        let admission = |placed, abort| Admission {
            request_id: req.request_id.clone(),
            placed,
            model: model.clone(),
            predicted_tokens: predicted,
            abort,
        };
        let (mut abort, ticket) = {
            let mut st = self.lock();
            if st.closing {
                Rejection::ShuttingDown.count();
                return Err(GenerateError::ShuttingDown);
            }
            if st.requests.contains(&req.request_id) {
                return Err(GenerateError::DuplicateRequestId(req.request_id.clone()));
            }
            let (abort_tx, abort_rx) = oneshot::channel();
            st.requests.insert(&req.request_id, "", abort_tx);
            if !st.queue.has_waiters(&model.name) {
                match self.try_place(&mut st, &want, false) {
                    Ok(Some(placed)) => return Ok(admission(placed, abort_rx)),
                    Ok(None) => {}
                    Err(e) => {
                        st.requests.remove(&req.request_id);
                        return Err(e);
                    }
                }
            }
            match st.queue.push(&model.name) {
                Ok(ticket) => {
                    metrics::gauge!(m::QUEUE_DEPTH).set(st.queue.len() as f64);
                    (abort_rx, ticket)
                }
                Err(full) => {
                    st.requests.remove(&req.request_id);
                    Rejection::QueueFull.count();
                    let hint = retry_after(full.depth, st.registry.up_capacity(), st.durations.mean());
                    return Err(GenerateError::QueueFull { depth: full.depth, retry_after: hint });
                }
            }
        };
        let mut guard = QueueGuard { cluster: self, ticket, request_id: req.request_id.clone(), placed: false };
        loop {
            let notified = self.inner.slot_freed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = self.lock();
                if st.closing {
                    Rejection::ShuttingDown.count();
                    return Err(GenerateError::ShuttingDown);
                }
                if st.queue.is_turn(ticket, &model.name)
                    && let Some(placed) = self.try_place(&mut st, &want, false)?
                {
                    guard.placed = true;
                    return Ok(admission(placed, abort));
                }
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = sleep_until(deadline) => {
                    Rejection::QueueTimeout.count();
                    return Err(GenerateError::QueuedTooLong { timeout: timeout.unwrap_or_default() });
                }
                _ = &mut abort => return Err(GenerateError::AbortedWhileQueued),
            }
        }
    }

    /// Places `want` now: `Ok(None)` when every worker is busy.
    /// `over_capacity` ignores the per-worker slot limit (migrations).
    fn try_place(&self, st: &mut State, want: &Want<'_>, over_capacity: bool) -> Result<Option<Placed>, GenerateError> {
        expire(st);
        let now = Instant::now();
        let mut snapshot = st.registry.snapshot(now);
        if over_capacity {
            for w in &mut snapshot {
                w.capacity = u32::MAX;
            }
        }
        let ask = Ask {
            model: want.model,
            predicted_tokens: want.predicted_tokens,
            session: want.session,
            exclude: want.exclude,
        };
        let mut decision = placement::place(self.inner.config.placement, &snapshot, &ask, st.cursor, &mut rand::rng());
        if over_capacity && decision == Decision::Busy {
            // A migrated request must move on even where memory looks short.
            decision = placement::place(Policy::LeastLoaded, &snapshot, &ask, st.cursor, &mut rand::rng());
        }
        let i = match decision {
            Decision::Place(i) => i,
            Decision::Busy => return Ok(None),
            Decision::NoWorker => return Err(GenerateError::NoLiveWorker { model: Some(want.model.to_string()) }),
        };
        let w = &snapshot[i];
        let tls = self.inner.config.worker_tls.as_ref();
        let channel = channel_for(&mut st.channels, &w.worker_id, w.incarnation, &w.address, tls)?;
        st.cursor = st.cursor.wrapping_add(1);
        st.requests.set_worker(want.request_id, &w.worker_id);
        st.registry.add_in_flight(&w.worker_id);
        Ok(Some(Placed {
            worker_id: w.worker_id.clone(),
            incarnation: w.incarnation,
            worker: WorkerClient::new(channel),
            address: w.address.clone(),
        }))
    }

    /// Moves a request whose worker failed to another worker (never one in
    /// `exclude`), ignoring slot limits: it was admitted already.
    pub fn reassign(
        &self,
        request_id: &str,
        model: &str,
        session: &str,
        predicted_tokens: u64,
        exclude: &[String],
    ) -> Result<Placed, GenerateError> {
        let mut st = self.lock();
        if let Some(old) = st.requests.worker_of(request_id).map(str::to_string) {
            st.registry.remove_in_flight(&old);
            st.requests.set_worker(request_id, "");
        }
        let want = Want { request_id, model, session, predicted_tokens, exclude };
        self.try_place(&mut st, &want, true)?.ok_or_else(|| GenerateError::NoLiveWorker { model: Some(model.into()) })
    }

    /// Forgets a finished request and wakes the admission queue.
    pub fn release(&self, request_id: &str, duration: Option<Duration>) {
        let mut st = self.lock();
        if let Some(worker_id) = st.requests.remove(request_id) {
            st.registry.remove_in_flight(&worker_id);
        }
        if let Some(d) = duration {
            st.durations.observe(d);
        }
        drop(st);
        self.inner.slot_freed.notify_waiters();
    }

    /// Generation.Abort: signals the request's stream (or its wait in the
    /// queue) and tells its worker. Returns whether the request was in flight.
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
        expire(&mut st);
        let now = Instant::now();
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

    /// Whether [`Cluster::close`] was called: nothing new is admitted.
    pub fn is_closing(&self) -> bool {
        self.lock().closing
    }

    /// Whether this coordinator can serve a request now: at least one worker
    /// is UP and it is not shutting down (readiness: gRPC health of
    /// `qaq.v1.Generation`, HTTP `/health`).
    pub fn ready(&self) -> bool {
        let mut st = self.lock();
        expire(&mut st);
        *st.ready.borrow()
    }

    /// Follows [`Self::ready`] as workers come and go (leases lapse at the
    /// next sweep or request).
    pub fn readiness(&self) -> watch::Receiver<bool> {
        self.lock().ready.subscribe()
    }

    /// Requests waiting in the admission queue.
    pub fn queue_depth(&self) -> usize {
        self.lock().queue.len()
    }

    /// Generation.ListModels.
    pub fn models(&self) -> ListModelsResponse {
        let mut st = self.lock();
        expire(&mut st);
        ListModelsResponse { models: st.registry.live_models() }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Marks workers whose lease lapsed DOWN, forgets their channels and
/// refreshes the gauges when something changed.
fn expire(st: &mut State) {
    let down = st.registry.expire(Instant::now());
    for id in &down {
        tracing::warn!(worker_id = %id, "lease expired: worker marked down");
        st.channels.remove(id);
    }
    if !down.is_empty() {
        publish_worker_gauges(st);
    }
}

/// Publishes the registry's state counts: the worker gauges and readiness.
fn publish_worker_gauges(st: &State) {
    let (up, draining, down) = st.registry.state_counts();
    for (state, n) in m::STATES.into_iter().zip([up, draining, down]) {
        metrics::gauge!(m::WORKERS, m::LABEL_STATE => state).set(n as f64);
    }
    let ready = up > 0 && !st.closing;
    st.ready.send_if_modified(|r| std::mem::replace(r, ready) != ready);
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

    async fn admit(c: &Cluster, r: &mut GenerateRequest) -> Result<Admission, GenerateError> {
        c.admit(r, None, None).await
    }

    async fn code(c: &Cluster, mut r: GenerateRequest) -> Code {
        tonic::Status::from(admit(c, &mut r).await.unwrap_err()).code()
    }

    fn one_slot() -> Config {
        Config { max_per_worker: Some(1), max_queue: 2, ..Config::default() }
    }

    #[tokio::test]
    async fn admit_validates_then_places_and_release_uncounts() {
        let c = Cluster::new(Config::default());
        // No worker: bad input is still INVALID_ARGUMENT, good input UNAVAILABLE.
        assert_eq!(code(&c, req("")).await, Code::InvalidArgument);
        assert_eq!(code(&c, req("hi")).await, Code::Unavailable);
        c.register(&reg("w1", 5)).unwrap();
        c.register(&reg("w2", 0)).unwrap();
        let mut too_long = req("hi");
        too_long.max_new_tokens = Some(8192);
        let e = tonic::Status::from(admit(&c, &mut too_long).await.unwrap_err());
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().starts_with("max_new_tokens"), "{}", e.message());
        let mut unknown = req("hi");
        unknown.model = "nope".into();
        assert_eq!(code(&c, unknown).await, Code::NotFound);

        let mut r = req("hi");
        let a = admit(&c, &mut r).await.unwrap();
        assert_eq!(a.placed.worker_id, "w2");
        assert!(!r.request_id.is_empty() && r.request_id == a.request_id);
        assert_eq!(r.model, "smol");
        assert!(a.predicted_tokens >= 5, "{}", a.predicted_tokens);
        let s = c.status();
        assert_eq!(s.in_flight, 1);
        assert_eq!(s.workers.iter().map(|w| w.in_flight).collect::<Vec<_>>(), [0, 1]);
        // Same id again: ALREADY_EXISTS.
        let mut dup = req("hi");
        dup.request_id = a.request_id.clone();
        assert_eq!(code(&c, dup).await, Code::AlreadyExists);
        c.release(&a.request_id, None);
        assert_eq!(c.status().in_flight, 0);
        assert!(c.status().workers.iter().all(|w| w.in_flight == 0));
    }

    #[tokio::test]
    async fn abort_signals_the_stream_once() {
        let c = Cluster::new(Config::default());
        c.register(&reg("w1", 0)).unwrap();
        let mut r = req("hi");
        r.request_id = "job-1".into();
        let mut a = admit(&c, &mut r).await.unwrap();
        // The worker address is unreachable: abort still reports found.
        assert!(c.abort("job-1").await);
        assert!(a.abort.try_recv().is_ok());
        assert!(!c.abort("job-2").await);
        c.release("job-1", None);
        assert!(!c.abort("job-1").await);
    }

    #[tokio::test(start_paused = true)]
    async fn full_workers_queue_requests_in_order_until_a_slot_frees() {
        let c = Cluster::new(one_slot());
        c.register(&reg("w1", 0)).unwrap();
        let mut first = req("a");
        let a = admit(&c, &mut first).await.unwrap();
        // Two more wait in the queue, a third is refused with a retry hint.
        let (c2, c3) = (c.clone(), c.clone());
        let second = tokio::spawn(async move { c2.admit(&mut req("b"), None, None).await.map(|a| a.request_id) });
        tokio::task::yield_now().await;
        let third = tokio::spawn(async move { c3.admit(&mut req("c"), None, None).await.map(|a| a.request_id) });
        tokio::task::yield_now().await;
        assert_eq!(c.queue_depth(), 2);
        let e = tonic::Status::from(admit(&c, &mut req("d")).await.unwrap_err());
        assert_eq!(e.code(), Code::ResourceExhausted);
        let hint: u64 = e.metadata().get(crate::admission::RETRY_AFTER_MS).unwrap().to_str().unwrap().parse().unwrap();
        assert!((100..=30_000).contains(&hint), "{hint}");
        // Releasing the first places the second (FIFO), not the third.
        c.release(&a.request_id, Some(Duration::from_millis(500)));
        let b = second.await.unwrap().unwrap();
        assert_eq!(c.queue_depth(), 1);
        assert!(!third.is_finished());
        c.release(&b, None);
        let d = third.await.unwrap().unwrap();
        assert_eq!(c.queue_depth(), 0);
        c.release(&d, None);
        assert_eq!(c.status().in_flight, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn queued_requests_respect_deadlines_aborts_and_shutdown() {
        let c = Cluster::new(one_slot());
        c.register(&reg("w1", 0)).unwrap();
        let _running = admit(&c, &mut req("a")).await.unwrap();
        // Deadline: DEADLINE_EXCEEDED after exactly the timeout (time is paused).
        let t0 = tokio::time::Instant::now();
        let timeout = Duration::from_millis(300);
        let e = c.admit(&mut req("b"), Some(t0 + timeout), Some(timeout)).await.unwrap_err();
        assert!(matches!(e, GenerateError::QueuedTooLong { .. }), "{e}");
        assert_eq!(t0.elapsed(), timeout);
        assert_eq!((c.queue_depth(), c.status().in_flight), (0, 1), "nothing left behind");
        // Abort while queued.
        let c2 = c.clone();
        let queued = tokio::spawn(async move {
            let mut r = req("c");
            r.request_id = "queued-1".into();
            c2.admit(&mut r, None, None).await.map(|a| a.request_id)
        });
        tokio::task::yield_now().await;
        assert!(c.abort("queued-1").await);
        assert!(matches!(queued.await.unwrap(), Err(GenerateError::AbortedWhileQueued)));
        // Shutdown rejects the queued and the new.
        let c3 = c.clone();
        let queued = tokio::spawn(async move { c3.admit(&mut req("d"), None, None).await.map(|a| a.request_id) });
        tokio::task::yield_now().await;
        c.close();
        assert!(matches!(queued.await.unwrap(), Err(GenerateError::ShuttingDown)));
        assert_eq!(code(&c, req("e")).await, Code::Unavailable);
        assert_eq!((c.queue_depth(), c.status().in_flight), (0, 1));
    }

    #[tokio::test]
    async fn reassign_moves_the_request_and_its_count() {
        let c = Cluster::new(Config { max_per_worker: Some(1), ..Config::default() });
        c.register(&reg("w1", 0)).unwrap();
        c.register(&reg("w2", 0)).unwrap();
        let mut r = req("hi");
        let a = admit(&c, &mut r).await.unwrap();
        let mut r2 = req("hi");
        let b = admit(&c, &mut r2).await.unwrap();
        assert_ne!(a.placed.worker_id, b.placed.worker_id);
        // a's worker fails: it moves to the other, full, worker anyway.
        c.suspect(&a.placed.worker_id, a.placed.incarnation);
        let failed = [a.placed.worker_id.clone()];
        let p = c.reassign(&a.request_id, "smol", "", 10, &failed).unwrap();
        assert_eq!(p.worker_id, b.placed.worker_id);
        let s = c.status();
        let by_id: HashMap<_, _> = s.workers.iter().map(|w| (w.worker_id.clone(), (w.in_flight, w.state))).collect();
        assert_eq!(by_id[&a.placed.worker_id], (0, WorkerState::Down as i32));
        assert_eq!(by_id[&b.placed.worker_id].0, 2);
        let all = [a.placed.worker_id.clone(), b.placed.worker_id.clone()];
        assert!(matches!(c.reassign(&a.request_id, "smol", "", 10, &all), Err(GenerateError::NoLiveWorker { .. })));
    }

    #[tokio::test]
    async fn sessions_stick_to_their_worker_on_every_coordinator_replica() {
        let c = Cluster::new(Config::default());
        for id in ["w1", "w2", "w3"] {
            c.register(&reg(id, 0)).unwrap();
        }
        // A second coordinator that heard of the workers in another order.
        let replica = Cluster::new(Config::default());
        for id in ["w3", "w1", "w2"] {
            replica.register(&reg(id, 0)).unwrap();
        }
        let mut workers = std::collections::HashSet::new();
        for n in 0..12 {
            let session = format!("chat-{n}");
            let mut r = req("hi");
            r.session_id = session.clone();
            let a = admit(&c, &mut r).await.unwrap();
            let first = a.placed.worker_id;
            c.release(&a.request_id, None);
            for cluster in [&c, &replica, &c, &replica] {
                let mut r = req("more");
                r.session_id = session.clone();
                let a = admit(cluster, &mut r).await.unwrap();
                assert_eq!(a.placed.worker_id, first, "{session}");
                cluster.release(&a.request_id, None);
            }
            workers.insert(first);
        }
        assert!(workers.len() > 1, "sessions spread over the workers: {workers:?}");
    }

    #[tokio::test]
    async fn ready_while_a_worker_is_up_and_not_closing() {
        let c = Cluster::new(Config::default());
        let mut watch = c.readiness();
        assert!(!c.ready() && !*watch.borrow_and_update());
        c.register(&reg("w1", 0)).unwrap();
        assert!(c.ready() && watch.has_changed().unwrap() && *watch.borrow_and_update());
        c.register(&reg("w2", 0)).unwrap();
        assert!(!watch.has_changed().unwrap(), "a second worker changes nothing");
        c.deregister("w1", "").unwrap();
        assert!(c.ready());
        let incarnation = c.lock().registry.get("w2").unwrap().incarnation;
        c.suspect("w2", incarnation);
        assert!(!c.ready() && !*watch.borrow_and_update());
        c.register(&reg("w2", 0)).unwrap();
        assert!(c.ready());
        c.close();
        assert!(!c.ready() && !*watch.borrow_and_update());
    }

    /// The race behind a flaky cluster test: when another worker's heartbeat
    /// is the first call after a lease lapsed, the lapse is still reported
    /// (gauges, readiness, the dead worker's channel dropped), not absorbed.
    #[test]
    fn a_lease_noticed_by_another_workers_heartbeat_still_updates_the_gauges() {
        let recorder = crate::metrics::prometheus_builder().unwrap().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            let lease = Duration::from_millis(60);
            let c = Cluster::new(Config { lease, ..Config::default() });
            c.register(&reg("w1", 0)).unwrap();
            c.register(&reg("w2", 0)).unwrap();
            std::thread::sleep(lease / 2);
            assert!(c.heartbeat(&HeartbeatRequest { worker_id: "w2".into(), ..Default::default() }).unwrap().known);
            std::thread::sleep(lease / 2 + Duration::from_millis(20));
            // w1 lapsed; w2's lease (renewed half a lease ago) did not.
            assert!(c.heartbeat(&HeartbeatRequest { worker_id: "w2".into(), ..Default::default() }).unwrap().known);
        });
        let text = handle.render();
        assert!(text.contains("qaq_coordinator_workers{state=\"down\"} 1"), "{text}");
        assert!(text.contains("qaq_coordinator_workers{state=\"up\"} 1"), "{text}");
    }

    #[tokio::test]
    async fn registration_secret_is_required_when_configured() {
        let c = Cluster::new(Config { registration_secret: crate::auth::Secret::new("s3"), ..Config::default() });
        let e = c.register(&reg("rogue", 0)).unwrap_err();
        assert!(matches!(e, RegistryError::BadSecret));
        let mut wrong = reg("rogue", 0);
        wrong.secret = "s4".into();
        assert!(c.register(&wrong).is_err());
        assert!(c.status().workers.is_empty());
        let mut good = reg("w1", 0);
        good.secret = "s3".into();
        c.register(&good).unwrap();
        let hb = HeartbeatRequest { worker_id: "w1".into(), ..Default::default() };
        assert!(c.heartbeat(&hb).is_err(), "heartbeats need it too");
        assert!(c.heartbeat(&HeartbeatRequest { secret: "s3".into(), ..hb }).unwrap().known);
        assert!(c.deregister("w1", "").is_err());
        assert!(c.deregister("w1", "s3").unwrap());
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
        assert!(c.heartbeat(&HeartbeatRequest { worker_id: "w1".into(), ..Default::default() }).unwrap().known);
        assert!(!c.heartbeat(&HeartbeatRequest { worker_id: "w9".into(), ..Default::default() }).unwrap().known);
        assert!(c.deregister("w1", "").unwrap());
        assert_eq!(c.status().workers.len(), 1);
    }
}
