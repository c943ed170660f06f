//! Joining the coordinators: the worker registers with every coordinator it
//! is given, then heartbeats each with its current load at the interval that
//! coordinator asks for, and registers again whenever a coordinator no longer
//! knows it or cannot be reached. Coordinators share nothing: each keeps its
//! own registry from these heartbeats.
//!
//! `--coordinator` is a comma-separated list of `host:port` or URIs. An IP
//! address is one coordinator. A DNS name may stand for several (a Kubernetes
//! headless Service lists one address per coordinator pod): it is resolved
//! every [`RESOLVE_INTERVAL`] and the worker keeps one registration per
//! address, so a new or replaced coordinator is found and a removed one
//! dropped. IPv4 addresses are used when the name has any (`localhost` is one
//! coordinator, not two), IPv6 ones otherwise. TLS verifies the name as given.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qaq_proto::v1::registry_client::RegistryClient;
use qaq_proto::v1::{DeregisterRequest, HeartbeatRequest, ModelInfo, RegisterRequest};
use tonic::transport::{ClientTlsConfig, Uri};

use crate::engine::EngineHandle;
use crate::metrics as m;
use crate::service::WorkerService;

/// How often coordinator names are resolved again.
pub const RESOLVE_INTERVAL: Duration = Duration::from_secs(5);
/// Longest wait between attempts to reach a coordinator (shorter once its
/// heartbeat interval is known: half of it).
const MAX_BACKOFF: Duration = Duration::from_secs(2);

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

/// One `--coordinator` entry.
#[derive(Clone, Debug)]
pub struct Coordinator {
    /// As given: `host:port` or a URI.
    pub name: String,
    /// TLS towards it, verifying `name`'s host (`None`: plaintext).
    pub tls: Option<ClientTlsConfig>,
}

/// What the worker announces, and to whom.
#[derive(Clone, Debug)]
pub struct Announcement {
    pub coordinators: Vec<Coordinator>,
    pub worker_id: String,
    pub address: String,
    pub metrics_address: String,
    pub model: ModelInfo,
    pub secret: Option<crate::config::Secret>,
    pub max_batch: usize,
}

/// The addresses to dial for one entry: itself when its host is an IP
/// address, else one per resolved address (IPv4 preferred), with the
/// entry's scheme.
async fn resolve(name: &str) -> Result<Vec<String>, String> {
    let uri: Uri = qaq_proto::client::normalize_uri(name).parse().map_err(|e| format!("{name:?}: {e}"))?;
    let host = uri.host().ok_or_else(|| format!("{name:?}: no host"))?;
    if host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>().is_ok() {
        return Ok(vec![name.to_string()]);
    }
    let https = uri.scheme_str() == Some("https");
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let found: Vec<SocketAddr> =
        tokio::net::lookup_host((host, port)).await.map_err(|e| format!("resolving {host}: {e}"))?.collect();
    let v4: Vec<SocketAddr> = found.iter().copied().filter(SocketAddr::is_ipv4).collect();
    let mut addrs = if v4.is_empty() { found } else { v4 };
    addrs.sort();
    addrs.dedup();
    if addrs.is_empty() {
        return Err(format!("{host} resolves to no address"));
    }
    let scheme = uri.scheme_str().filter(|_| name.contains("://"));
    Ok(addrs.into_iter().map(|a| scheme.map_or_else(|| a.to_string(), |s| format!("{s}://{a}"))).collect())
}

/// Each dialed address' state (and, as unreachable, each name that never resolved),
/// for the [`m::COORDINATORS`] gauge.
#[derive(Clone, Default)]
struct Links(Arc<Mutex<HashMap<String, bool>>>);

impl Links {
    fn set(&self, address: &str, registered: bool) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(address.to_string(), registered);
        Self::publish(&map);
    }

    fn forget(&self, address: &str) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(address);
        Self::publish(&map);
    }

    /// A configured name that does not resolve (`now`) and never has: one coordinator
    /// the worker cannot reach, counted as unreachable until it resolves.
    fn unresolved(&self, name: &str, now: bool) {
        let key = format!("{name} (unresolved)");
        if now { self.set(&key, false) } else { self.forget(&key) }
    }

    /// (registered, unreachable).
    fn counts(map: &HashMap<String, bool>) -> (usize, usize) {
        let registered = map.values().filter(|&&r| r).count();
        (registered, map.len() - registered)
    }

    fn publish(map: &HashMap<String, bool>) {
        let (registered, unreachable) = Self::counts(map);
        let [r, u] = m::COORDINATOR_STATES;
        metrics::gauge!(m::COORDINATORS, "state" => r).set(registered as f64);
        metrics::gauge!(m::COORDINATORS, "state" => u).set(unreachable as f64);
    }
}

/// A spawned task, aborted when dropped.
struct Task(tokio::task::JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Announcement {
    /// The registration secret as sent (empty: none).
    fn secret(&self) -> String {
        self.secret.clone().map(|s| s.0).unwrap_or_default()
    }
}

/// What every registration task shares: the announcement, the engine whose load
/// it reports, the drain flag and the gauge's books.
struct Registrar {
    a: Announcement,
    engine: Arc<EngineHandle>,
    draining: Arc<AtomicBool>,
    links: Links,
}

/// Keeps the worker registered with every coordinator until the task is
/// dropped (which ends every registration).
pub async fn keep_registered(a: Announcement, engine: Arc<EngineHandle>, draining: Arc<AtomicBool>) {
    let r = Arc::new(Registrar { a, engine, draining, links: Links::default() });
    let (a, links) = (&r.a, &r.links);
    // Dialed address -> its registration.
    let mut sessions: HashMap<String, Task> = HashMap::new();
    // Per entry, its last resolution (kept while the name does not resolve).
    let mut resolved: Vec<Vec<String>> = vec![Vec::new(); a.coordinators.len()];
    loop {
        let mut want: Vec<(String, usize)> = Vec::new();
        for (i, c) in a.coordinators.iter().enumerate() {
            match resolve(&c.name).await {
                Ok(addrs) => resolved[i] = addrs,
                Err(e) => tracing::warn!(coordinator = %c.name, error = %e, "cannot resolve the coordinator"),
            }
            links.unresolved(&c.name, resolved[i].is_empty());
            want.extend(resolved[i].iter().map(|addr| (addr.clone(), i)));
        }
        sessions.retain(|addr, _| {
            let keep = want.iter().any(|(w, _)| w == addr);
            if !keep {
                tracing::info!(coordinator = %addr, "coordinator address gone; leaving it");
                links.forget(addr);
            }
            keep
        });
        for (addr, i) in want {
            if sessions.contains_key(&addr) {
                continue;
            }
            let (c, r) = (a.coordinators[i].clone(), r.clone());
            let task = tokio::spawn({
                let addr = addr.clone();
                async move { r.keep_registered_at(&addr, &c).await }
            });
            sessions.insert(addr, Task(task));
        }
        tokio::time::sleep(RESOLVE_INTERVAL).await;
    }
}

impl Registrar {
    /// Keeps the worker registered with the coordinator at `addr` (of entry `c`).
    async fn keep_registered_at(&self, addr: &str, c: &Coordinator) {
        let mut backoff = Duration::from_millis(100);
        let mut max_backoff = MAX_BACKOFF;
        let mut failing = false;
        loop {
            match self.session(addr, c, &mut max_backoff).await {
                Ok(()) => {
                    backoff = Duration::from_millis(100);
                    failing = false;
                }
                Err(e) => {
                    self.links.set(addr, false);
                    // Once per outage (the gauge shows it meanwhile), not every retry.
                    if !failing {
                        tracing::warn!(coordinator = %addr, error = %e, "coordinator unreachable; retrying");
                    } else {
                        tracing::debug!(coordinator = %addr, error = %e, "coordinator still unreachable");
                    }
                    failing = true;
                    backoff = (backoff * 2).min(max_backoff);
                }
            }
            tokio::time::sleep(backoff.min(max_backoff)).await;
        }
    }

    /// One registration at `addr` and its heartbeats; returns when the
    /// coordinator forgets this worker, errs when it cannot be reached. Sets
    /// `max_backoff` to half the coordinator's heartbeat interval, so that a
    /// coordinator restarted on the same address sees this worker again within
    /// one interval.
    async fn session(&self, addr: &str, c: &Coordinator, max_backoff: &mut Duration) -> Result<(), SessionError> {
        let Registrar { a, engine, draining, links } = self;
        let channel = crate::tls::grpc_endpoint(addr, c.tls.as_ref())
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
                secret: a.secret(),
                load: Some(WorkerService::load(engine, a.max_batch)),
                metrics_address: a.metrics_address.clone(),
            })
            .await?
            .into_inner();
        links.set(addr, true);
        tracing::info!(coordinator = %addr, worker_id = %a.worker_id, "registered");
        let interval = Duration::from_millis(resp.heartbeat_interval_ms.clamp(50, 60_000));
        *max_backoff = (interval / 2).clamp(Duration::from_millis(50), MAX_BACKOFF);
        loop {
            tokio::time::sleep(interval).await;
            let known = client
                .heartbeat(HeartbeatRequest {
                    worker_id: a.worker_id.clone(),
                    load: Some(WorkerService::load(engine, a.max_batch)),
                    secret: a.secret(),
                    draining: draining.load(Ordering::Relaxed),
                })
                .await?
                .into_inner()
                .known;
            if !known {
                tracing::info!(coordinator = %addr, "coordinator does not know this worker; registering again");
                return Ok(());
            }
        }
    }
}

/// Leaves every coordinator (best effort, all at once, at most about 2 s).
pub async fn deregister(a: &Announcement) {
    let leave = |addr: String, c: Coordinator| async move {
        let Ok(ep) = crate::tls::grpc_endpoint(&addr, c.tls.as_ref()) else { return };
        let Ok(channel) = ep.connect_timeout(Duration::from_secs(1)).timeout(Duration::from_secs(1)).connect().await
        else {
            return;
        };
        let req = DeregisterRequest { worker_id: a.worker_id.clone(), secret: a.secret() };
        if let Err(e) = RegistryClient::new(channel).deregister(req).await {
            tracing::warn!(coordinator = %addr, error = %e, "deregistration failed");
        }
    };
    let mut targets = Vec::new();
    for c in &a.coordinators {
        let addrs = tokio::time::timeout(Duration::from_millis(500), resolve(&c.name)).await;
        for addr in addrs.ok().and_then(Result::ok).unwrap_or_default() {
            targets.push(leave(addr, c.clone()));
        }
    }
    futures::future::join_all(targets).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gauge_counts_names_that_never_resolved_as_unreachable() {
        let links = Links::default();
        let counts = || Links::counts(&links.0.lock().unwrap());
        links.set("10.0.0.1:5", true);
        links.unresolved("coordinator.invalid:5", true);
        assert_eq!(counts(), (1, 1));
        links.unresolved("coordinator.invalid:5", true);
        assert_eq!(counts(), (1, 1), "once per name, however often it fails");
        links.unresolved("coordinator.invalid:5", false);
        links.set("10.0.0.2:5", false);
        assert_eq!(counts(), (1, 1), "resolved: its addresses count instead");
    }

    #[tokio::test]
    async fn ip_addresses_are_dialed_as_given_and_names_resolve_to_each_address() {
        assert_eq!(resolve("127.0.0.1:5").await.unwrap(), ["127.0.0.1:5"]);
        assert_eq!(resolve("https://[::1]:5").await.unwrap(), ["https://[::1]:5"]);
        // A name: its addresses, IPv4 first choice, the scheme kept.
        assert_eq!(resolve("localhost:7").await.unwrap(), ["127.0.0.1:7"]);
        assert_eq!(resolve("http://localhost:7").await.unwrap(), ["http://127.0.0.1:7"]);
        let e = resolve("no-such-host.invalid:7").await.unwrap_err();
        assert!(e.contains("no-such-host.invalid"), "{e}");
    }
}
