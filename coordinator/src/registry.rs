//! The worker registry: a plain struct, time passed in by the caller, so that
//! leases are unit-tested without sleeping. [`crate::cluster::Cluster`] holds
//! it behind a mutex.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use qaq_proto::v1::{ModelInfo, RegisterRequest, WorkerLoad, WorkerState};

use crate::error::{GenerateError, RegistryError};

/// One registered worker.
#[derive(Debug, Clone)]
pub struct WorkerEntry {
    /// Worker id, unique in the cluster.
    pub worker_id: String,
    /// Address the coordinator dials (Worker service).
    pub address: String,
    /// The worker's /metrics address, if it has one.
    pub metrics_address: String,
    /// The model it serves.
    pub model: ModelInfo,
    /// Last reported load.
    pub load: WorkerLoad,
    /// Registry state (UP, DRAINING or DOWN).
    pub state: WorkerState,
    /// When the lease was last renewed.
    pub last_heartbeat: Instant,
    /// Requests the coordinator streams from this worker right now.
    pub in_flight: u32,
    /// Bumped on every (re-)registration: lets connection caches notice a
    /// restarted worker.
    pub incarnation: u64,
}

/// What placement and status need to know about a worker, at one instant.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerSnapshot {
    /// Worker id.
    pub worker_id: String,
    /// Address to dial.
    pub address: String,
    /// Model name.
    pub model: String,
    /// State at the snapshot's instant.
    pub state: WorkerState,
    /// Sequences running on the worker (last heartbeat).
    pub running: u32,
    /// Requests waiting on the worker (last heartbeat).
    pub waiting: u32,
    /// Requests the coordinator has in flight on it.
    pub in_flight: u32,
    /// Most requests the coordinator places on it at once.
    pub capacity: u32,
    /// KV device bytes in use (last heartbeat).
    pub kv_device_bytes: u64,
    /// KV device budget (0: unlimited).
    pub kv_device_budget_bytes: u64,
    /// Device bytes per cached token (0: not reported yet).
    pub avg_bytes_per_token: f64,
    /// Time since the last heartbeat.
    pub heartbeat_age: Duration,
    /// Registration incarnation.
    pub incarnation: u64,
}

/// Every registered worker, by id.
#[derive(Debug)]
pub struct Registry {
    workers: BTreeMap<String, WorkerEntry>,
    lease: Duration,
    incarnations: u64,
    max_per_worker: Option<u32>,
}

/// Slots of a worker that reports no max_batch.
pub const DEFAULT_CAPACITY: u32 = 16;

impl Registry {
    /// An empty registry with the given lease.
    pub fn new(lease: Duration) -> Self {
        Self { workers: BTreeMap::new(), lease, incarnations: 0, max_per_worker: None }
    }

    /// Caps the requests placed on each worker (`None`: its reported max_batch).
    pub fn with_max_per_worker(mut self, max: Option<u32>) -> Self {
        self.max_per_worker = max;
        self
    }

    fn capacity(&self, w: &WorkerEntry) -> u32 {
        self.max_per_worker.unwrap_or(if w.load.max_batch > 0 { w.load.max_batch } else { DEFAULT_CAPACITY })
    }

    /// Adds a worker or refreshes a returning one (state UP, lease renewed).
    /// The coordinator's in-flight count of a returning worker is kept.
    pub fn register(&mut self, req: &RegisterRequest, now: Instant) -> Result<&WorkerEntry, RegistryError> {
        if req.worker_id.is_empty() {
            return Err(RegistryError::Invalid("worker_id: must not be empty".into()));
        }
        qaq_proto::validate::id("worker_id", &req.worker_id).map_err(|s| RegistryError::Invalid(s.message().into()))?;
        if req.address.is_empty() {
            return Err(RegistryError::Invalid("address: must not be empty (host:port of the Worker service)".into()));
        }
        let model = match &req.model {
            Some(m) if !m.name.is_empty() => m.clone(),
            _ => return Err(RegistryError::Invalid("model.name: must not be empty".into())),
        };
        self.incarnations += 1;
        let in_flight = self.workers.get(&req.worker_id).map_or(0, |w| w.in_flight);
        let entry = WorkerEntry {
            worker_id: req.worker_id.clone(),
            address: req.address.clone(),
            metrics_address: req.metrics_address.clone(),
            model,
            load: req.load.unwrap_or_default(),
            state: WorkerState::Up,
            last_heartbeat: now,
            in_flight,
            incarnation: self.incarnations,
        };
        self.workers.insert(req.worker_id.clone(), entry);
        Ok(&self.workers[&req.worker_id])
    }

    /// Renews a lease. Returns false when the worker is unknown, DOWN, or its
    /// own lease lapsed before this heartbeat (then it is marked DOWN here):
    /// it must register again. Other workers' leases are left to
    /// [`Self::expire`], whose caller reports what it marks DOWN.
    pub fn heartbeat(&mut self, worker_id: &str, load: Option<WorkerLoad>, draining: bool, now: Instant) -> bool {
        let lease = self.lease;
        match self.workers.get_mut(worker_id) {
            Some(w) if lapsed(w, now, lease) => {
                w.state = WorkerState::Down;
                false
            }
            Some(w) if w.state != WorkerState::Down => {
                w.last_heartbeat = now;
                if let Some(l) = load {
                    w.load = l;
                }
                w.state = if draining { WorkerState::Draining } else { WorkerState::Up };
                true
            }
            _ => false,
        }
    }

    /// Marks a worker DOWN at once (its connection failed), unless it
    /// re-registered since (`incarnation` differs). Returns whether it changed.
    pub fn mark_down(&mut self, worker_id: &str, incarnation: u64) -> bool {
        match self.workers.get_mut(worker_id) {
            Some(w) if w.incarnation == incarnation && w.state != WorkerState::Down => {
                w.state = WorkerState::Down;
                true
            }
            _ => false,
        }
    }

    /// Total slots of UP workers.
    pub fn up_capacity(&self) -> u32 {
        self.workers.values().filter(|w| w.state == WorkerState::Up).map(|w| self.capacity(w)).sum()
    }

    /// Removes a worker. Returns whether it was known.
    pub fn deregister(&mut self, worker_id: &str) -> bool {
        self.workers.remove(worker_id).is_some()
    }

    /// Marks every worker whose lease lapsed DOWN; returns their ids.
    pub fn expire(&mut self, now: Instant) -> Vec<String> {
        let lease = self.lease;
        let mut down = Vec::new();
        for w in self.workers.values_mut() {
            if lapsed(w, now, lease) {
                w.state = WorkerState::Down;
                down.push(w.worker_id.clone());
            }
        }
        down
    }

    /// The worker with this id.
    pub fn get(&self, worker_id: &str) -> Option<&WorkerEntry> {
        self.workers.get(worker_id)
    }

    /// Every worker, sorted by id.
    pub fn entries(&self) -> impl Iterator<Item = &WorkerEntry> {
        self.workers.values()
    }

    /// Counts the coordinator's request on a worker.
    pub fn add_in_flight(&mut self, worker_id: &str) {
        if let Some(w) = self.workers.get_mut(worker_id) {
            w.in_flight += 1;
        }
    }

    /// Uncounts a finished request (no-op for a worker that left).
    pub fn remove_in_flight(&mut self, worker_id: &str) {
        if let Some(w) = self.workers.get_mut(worker_id) {
            w.in_flight = w.in_flight.saturating_sub(1);
        }
    }

    /// Every worker as seen at `now`, sorted by id. Call [`Self::expire`]
    /// first for up-to-date states.
    pub fn snapshot(&self, now: Instant) -> Vec<WorkerSnapshot> {
        self.workers
            .values()
            .map(|w| WorkerSnapshot {
                worker_id: w.worker_id.clone(),
                address: w.address.clone(),
                model: w.model.name.clone(),
                state: w.state,
                running: w.load.running,
                waiting: w.load.waiting,
                in_flight: w.in_flight,
                capacity: self.capacity(w),
                kv_device_bytes: w.load.kv_device_bytes,
                kv_device_budget_bytes: w.load.kv_device_budget_bytes,
                avg_bytes_per_token: w.load.avg_bytes_per_token,
                heartbeat_age: now.saturating_duration_since(w.last_heartbeat),
                incarnation: w.incarnation,
            })
            .collect()
    }

    /// Workers per state: (up, draining, down).
    pub fn state_counts(&self) -> (usize, usize, usize) {
        let count = |s| self.workers.values().filter(|w| w.state == s).count();
        (count(WorkerState::Up), count(WorkerState::Draining), count(WorkerState::Down))
    }

    /// Models served by UP workers, by name, with `workers` filled in.
    pub fn live_models(&self) -> Vec<ModelInfo> {
        let mut by_name: BTreeMap<&str, ModelInfo> = BTreeMap::new();
        for w in self.workers.values().filter(|w| w.state == WorkerState::Up) {
            by_name
                .entry(w.model.name.as_str())
                .or_insert_with(|| ModelInfo { workers: 0, ..w.model.clone() })
                .workers += 1;
        }
        by_name.into_values().collect()
    }

    /// The model a request names: empty means the cluster's default, the
    /// model of the first UP worker (by id). Errors: no UP worker (or none
    /// for a model some DOWN worker serves) -> `NoLiveWorker`; a name no
    /// worker serves -> `ModelNotFound` listing the live models.
    pub fn resolve_model(&self, name: &str) -> Result<ModelInfo, GenerateError> {
        let live = self.live_models();
        if live.is_empty() {
            return Err(GenerateError::NoLiveWorker { model: (!name.is_empty()).then(|| name.to_string()) });
        }
        if name.is_empty() {
            let first = self.workers.values().find(|w| w.state == WorkerState::Up);
            let default = first.map(|w| w.model.name.as_str()).unwrap_or_default();
            return live.into_iter().find(|m| m.name == default).ok_or(GenerateError::NoLiveWorker { model: None });
        }
        if let Some(m) = live.iter().find(|m| m.name == name) {
            return Ok(m.clone());
        }
        if self.workers.values().any(|w| w.model.name == name) {
            return Err(GenerateError::NoLiveWorker { model: Some(name.to_string()) });
        }
        Err(GenerateError::ModelNotFound {
            model: name.to_string(),
            available: live.into_iter().map(|m| m.name).collect(),
        })
    }
}

/// Whether a worker that is not DOWN has gone longer than `lease` without a heartbeat.
fn lapsed(w: &WorkerEntry, now: Instant, lease: Duration) -> bool {
    w.state != WorkerState::Down && now.saturating_duration_since(w.last_heartbeat) > lease
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_millis(2000);

    fn req(id: &str, model: &str) -> RegisterRequest {
        RegisterRequest {
            worker_id: id.into(),
            address: format!("127.0.0.1:1{}", id.len()),
            model: Some(ModelInfo {
                name: model.into(),
                context_length: 8192,
                vocab_size: 49152,
                ..Default::default()
            }),
            load: Some(WorkerLoad { running: 1, ..Default::default() }),
            ..Default::default()
        }
    }

    fn load(running: u32, waiting: u32) -> Option<WorkerLoad> {
        Some(WorkerLoad { running, waiting, ..Default::default() })
    }

    #[test]
    fn register_then_heartbeat_renews_the_lease() {
        let t0 = Instant::now();
        let mut r = Registry::new(LEASE);
        r.register(&req("w1", "smol"), t0).unwrap();
        assert_eq!(r.get("w1").unwrap().state, WorkerState::Up);
        assert_eq!(r.get("w1").unwrap().load.running, 1);
        // Heartbeats every 1.5 s keep it up well past one lease.
        for i in 1..=4 {
            let now = t0 + Duration::from_millis(1500 * i);
            assert!(r.heartbeat("w1", load(i as u32, 0), false, now));
            assert!(r.expire(now).is_empty());
        }
        assert_eq!(r.get("w1").unwrap().load.running, 4);
        assert_eq!(r.state_counts(), (1, 0, 0));
    }

    #[test]
    fn lapsed_lease_marks_down_and_heartbeat_is_refused_until_reregistered() {
        let t0 = Instant::now();
        let mut r = Registry::new(LEASE);
        r.register(&req("w1", "smol"), t0).unwrap();
        r.register(&req("w2", "smol"), t0).unwrap();
        assert!(r.heartbeat("w2", None, false, t0 + Duration::from_millis(1900)));
        // At exactly the lease the worker is still up; just after, it is down.
        assert!(r.expire(t0 + LEASE).is_empty());
        assert_eq!(r.expire(t0 + LEASE + Duration::from_millis(1)), vec!["w1".to_string()]);
        assert_eq!(r.get("w1").unwrap().state, WorkerState::Down);
        assert_eq!(r.get("w2").unwrap().state, WorkerState::Up);
        assert_eq!(r.state_counts(), (1, 0, 1));
        // A late heartbeat does not revive it: the worker must re-register.
        assert!(!r.heartbeat("w1", None, false, t0 + Duration::from_millis(2100)));
        assert_eq!(r.get("w1").unwrap().state, WorkerState::Down);
        let inc = r.get("w1").unwrap().incarnation;
        r.register(&req("w1", "smol"), t0 + Duration::from_millis(2200)).unwrap();
        assert_eq!(r.get("w1").unwrap().state, WorkerState::Up);
        assert!(r.get("w1").unwrap().incarnation > inc);
    }

    #[test]
    fn heartbeat_expires_stale_worker_before_renewing() {
        let t0 = Instant::now();
        let mut r = Registry::new(LEASE);
        r.register(&req("w1", "smol"), t0).unwrap();
        // No sweep ran, but the heartbeat arrives after the lease: refused.
        assert!(!r.heartbeat("w1", None, false, t0 + Duration::from_secs(3)));
    }

    #[test]
    fn unknown_heartbeat_is_not_known() {
        let mut r = Registry::new(LEASE);
        assert!(!r.heartbeat("ghost", None, false, Instant::now()));
        assert!(!r.deregister("ghost"));
    }

    #[test]
    fn draining_heartbeat_and_deregister() {
        let t0 = Instant::now();
        let mut r = Registry::new(LEASE);
        r.register(&req("w1", "smol"), t0).unwrap();
        assert!(r.heartbeat("w1", None, true, t0));
        assert_eq!(r.get("w1").unwrap().state, WorkerState::Draining);
        assert_eq!(r.state_counts(), (0, 1, 0));
        assert!(r.deregister("w1"));
        assert!(r.get("w1").is_none());
    }

    #[test]
    fn mark_down_respects_incarnations_and_capacity_follows_max_batch() {
        let t0 = Instant::now();
        let mut r = Registry::new(LEASE);
        let mut q = req("w1", "smol");
        q.load = Some(WorkerLoad { max_batch: 8, ..Default::default() });
        let inc = r.register(&q, t0).unwrap().incarnation;
        r.register(&req("w2", "smol"), t0).unwrap();
        assert_eq!(r.up_capacity(), 8 + DEFAULT_CAPACITY);
        assert_eq!(r.snapshot(t0)[0].capacity, 8);
        assert!(!r.mark_down("w1", inc + 5), "stale incarnation");
        assert!(r.mark_down("w1", inc));
        assert!(!r.mark_down("w1", inc));
        assert_eq!(r.up_capacity(), DEFAULT_CAPACITY);
        assert!(!r.heartbeat("w1", None, false, t0), "must re-register");
        let mut r = Registry::new(LEASE).with_max_per_worker(Some(2));
        r.register(&q, t0).unwrap();
        assert_eq!(r.snapshot(t0)[0].capacity, 2);
    }

    #[test]
    fn reregister_keeps_in_flight() {
        let t0 = Instant::now();
        let mut r = Registry::new(LEASE);
        r.register(&req("w1", "smol"), t0).unwrap();
        r.add_in_flight("w1");
        r.add_in_flight("w1");
        r.register(&req("w1", "smol"), t0).unwrap();
        assert_eq!(r.get("w1").unwrap().in_flight, 2);
        r.remove_in_flight("w1");
        r.remove_in_flight("w1");
        r.remove_in_flight("w1");
        r.remove_in_flight("gone");
        assert_eq!(r.get("w1").unwrap().in_flight, 0);
    }

    #[test]
    fn register_validates_fields() {
        let mut r = Registry::new(LEASE);
        let now = Instant::now();
        let bad = |f: fn(&mut RegisterRequest)| {
            let mut q = req("w1", "smol");
            f(&mut q);
            q
        };
        let e = r.register(&bad(|q| q.worker_id.clear()), now).unwrap_err();
        assert!(e.to_string().starts_with("worker_id"), "{e}");
        let e = r.register(&bad(|q| q.worker_id = "a b".into()), now).unwrap_err();
        assert!(e.to_string().starts_with("worker_id"), "{e}");
        let e = r.register(&bad(|q| q.address.clear()), now).unwrap_err();
        assert!(e.to_string().starts_with("address"), "{e}");
        let e = r.register(&bad(|q| q.model = None), now).unwrap_err();
        assert!(e.to_string().starts_with("model.name"), "{e}");
        assert_eq!(r.entries().count(), 0);
    }

    #[test]
    fn resolves_models() {
        let t0 = Instant::now();
        let mut r = Registry::new(LEASE);
        assert!(matches!(r.resolve_model(""), Err(GenerateError::NoLiveWorker { model: None })));
        r.register(&req("w2", "smol"), t0).unwrap();
        r.register(&req("w1", "smol"), t0).unwrap();
        r.register(&req("w3", "big"), t0).unwrap();
        let m = r.resolve_model("").unwrap();
        assert_eq!((m.name.as_str(), m.workers), ("smol", 2));
        assert_eq!(r.resolve_model("big").unwrap().workers, 1);
        match r.resolve_model("huge") {
            Err(GenerateError::ModelNotFound { model, available }) => {
                assert_eq!(model, "huge");
                assert_eq!(available, vec!["big".to_string(), "smol".to_string()]);
            }
            other => panic!("{other:?}"),
        }
        // w3 stops heartbeating: "big" is known but has no live worker.
        for id in ["w1", "w2"] {
            assert!(r.heartbeat(id, None, false, t0 + Duration::from_millis(1500)));
        }
        r.expire(t0 + Duration::from_millis(2500));
        assert!(matches!(r.resolve_model("big"), Err(GenerateError::NoLiveWorker { model: Some(_) })));
        assert_eq!(r.live_models().len(), 1);
    }

    #[test]
    fn snapshot_is_sorted_with_ages() {
        let t0 = Instant::now();
        let mut r = Registry::new(LEASE);
        r.register(&req("b", "smol"), t0).unwrap();
        r.register(&req("a", "smol"), t0 + Duration::from_millis(100)).unwrap();
        let s = r.snapshot(t0 + Duration::from_millis(300));
        assert_eq!(s.iter().map(|w| w.worker_id.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(s[0].heartbeat_age, Duration::from_millis(200));
        assert_eq!(s[1].heartbeat_age, Duration::from_millis(300));
    }
}
