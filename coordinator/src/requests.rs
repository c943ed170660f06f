//! The table of requests in flight through the coordinator: request id ->
//! worker, plus the sender that tells the request's stream it was aborted.
//! A plain struct; [`crate::cluster::Cluster`] holds it behind its mutex.

use std::collections::HashMap;

use tokio::sync::oneshot;

/// One request in flight.
#[derive(Debug)]
pub struct InFlight {
    /// Worker running it.
    pub worker_id: String,
    /// Fires the request's stream into its abort path. The receiver is held
    /// by that stream ([`crate::stream::Forward`]); taken by the first Abort.
    pub abort: Option<oneshot::Sender<()>>,
}

/// Requests in flight, by id.
#[derive(Debug, Default)]
pub struct RequestTable {
    by_id: HashMap<String, InFlight>,
}

impl RequestTable {
    /// Whether a request with this id is in flight.
    pub fn contains(&self, request_id: &str) -> bool {
        self.by_id.contains_key(request_id)
    }

    /// Adds a request; `false` (and nothing changes) if the id is taken.
    pub fn insert(&mut self, request_id: &str, worker_id: &str, abort: oneshot::Sender<()>) -> bool {
        if self.by_id.contains_key(request_id) {
            return false;
        }
        self.by_id.insert(request_id.to_string(), InFlight { worker_id: worker_id.to_string(), abort: Some(abort) });
        true
    }

    /// The worker a request runs on (empty while queued).
    pub fn worker_of(&self, request_id: &str) -> Option<&str> {
        self.by_id.get(request_id).map(|r| r.worker_id.as_str())
    }

    /// Moves a request to another worker (placement after queueing, migration).
    pub fn set_worker(&mut self, request_id: &str, worker_id: &str) {
        if let Some(r) = self.by_id.get_mut(request_id) {
            r.worker_id = worker_id.to_string();
        }
    }

    /// Removes a finished request, returning its worker.
    pub fn remove(&mut self, request_id: &str) -> Option<String> {
        self.by_id.remove(request_id).map(|r| r.worker_id)
    }

    /// Starts aborting a request: returns its worker and the abort sender
    /// (`None` when an Abort already took it).
    pub fn take_abort(&mut self, request_id: &str) -> Option<(String, Option<oneshot::Sender<()>>)> {
        self.by_id.get_mut(request_id).map(|r| (r.worker_id.clone(), r.abort.take()))
    }

    /// Requests in flight.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether none is in flight.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_rejects_duplicates_and_remove_frees_the_id() {
        let mut t = RequestTable::default();
        let (a, _ra) = oneshot::channel();
        let (b, _rb) = oneshot::channel();
        assert!(t.insert("r1", "w1", a));
        assert!(!t.insert("r1", "w2", b));
        assert_eq!(t.len(), 1);
        assert_eq!(t.remove("r1").as_deref(), Some("w1"));
        assert!(t.is_empty() && t.remove("r1").is_none());
        let (c, _rc) = oneshot::channel();
        assert!(t.insert("r1", "w2", c));
    }

    #[test]
    fn abort_fires_once() {
        let mut t = RequestTable::default();
        let (tx, mut rx) = oneshot::channel();
        t.insert("r1", "w1", tx);
        let (w, s) = t.take_abort("r1").unwrap();
        assert_eq!(w, "w1");
        s.unwrap().send(()).unwrap();
        assert!(rx.try_recv().is_ok());
        let (_, again) = t.take_abort("r1").unwrap();
        assert!(again.is_none());
        assert!(t.take_abort("nope").is_none());
        assert!(t.contains("r1"));
    }

    #[test]
    fn queued_requests_get_a_worker_later_and_can_move() {
        let mut t = RequestTable::default();
        let (tx, _rx) = oneshot::channel();
        t.insert("r1", "", tx);
        assert_eq!(t.worker_of("r1"), Some(""));
        t.set_worker("r1", "w1");
        t.set_worker("r1", "w2");
        t.set_worker("ghost", "w2");
        assert_eq!(t.worker_of("r1"), Some("w2"));
        assert_eq!(t.remove("r1").as_deref(), Some("w2"));
        assert_eq!(t.worker_of("r1"), None);
    }
}
