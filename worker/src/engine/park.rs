//! Parked KV caches. When a drain runs out of grace, the engine snapshots every
//! sequence it still holds ([`crate::kv::SeqCache::snapshot`]) and parks it here
//! under its request id; the request's next worker pulls it through Worker.ExportKv and
//! continues without prefilling prompt and generated tokens again. An entry is taken at
//! most once and expires after the park window.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use metrics::gauge;

use crate::metrics as m;

/// One parked sequence.
#[derive(Debug)]
pub struct Parked {
    /// The tokens its cache holds (prompt, then generated).
    pub tokens: Vec<u32>,
    /// The policy label the cache was built under.
    pub policy: String,
    /// The cache snapshot.
    pub bytes: Vec<u8>,
    at: Instant,
}

/// The parked caches of one worker.
#[derive(Debug)]
pub struct ParkedKv {
    ttl: Duration,
    map: Mutex<HashMap<String, Parked>>,
}

impl ParkedKv {
    /// A store whose entries live `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self { ttl, map: Mutex::default() }
    }

    fn locked(&self) -> std::sync::MutexGuard<'_, HashMap<String, Parked>> {
        // A panic while holding the lock leaves a map that is still consistent.
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let ttl = self.ttl;
        let before = map.len();
        map.retain(|_, p| p.at.elapsed() < ttl);
        let expired = before - map.len();
        if expired > 0 {
            m::MigrationOutcome::Expired.count_n("out", expired as u64);
            publish(&map);
        }
        map
    }

    /// Parks `id`'s cache (replacing an older entry of the same id).
    pub fn put(&self, id: String, tokens: Vec<u32>, policy: String, bytes: Vec<u8>) {
        let mut map = self.locked();
        map.insert(id, Parked { tokens, policy, bytes, at: Instant::now() });
        publish(&map);
    }

    /// Takes `id`'s cache, unless it was never parked, has expired or was taken.
    pub fn take(&self, id: &str) -> Option<Parked> {
        let mut map = self.locked();
        let p = map.remove(id);
        publish(&map);
        p
    }

    /// Entries still waiting to be pulled.
    pub fn pending(&self) -> usize {
        self.locked().len()
    }

    /// How long entries live.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }
}

/// Sets the parked-bytes gauge.
fn publish(map: &HashMap<String, Parked>) {
    gauge!(m::KV_PARKED_BYTES).set(map.values().map(|p| p.bytes.len()).sum::<usize>() as f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_taken_once_and_expire() {
        let p = ParkedKv::new(Duration::from_millis(200));
        p.put("a".into(), vec![1, 2], "qaq".into(), vec![9; 10]);
        p.put("b".into(), vec![3], "fp16".into(), vec![]);
        assert_eq!(p.pending(), 2);
        let a = p.take("a").unwrap();
        assert_eq!((a.tokens, a.policy, a.bytes.len()), (vec![1, 2], "qaq".to_string(), 10));
        assert!(p.take("a").is_none(), "taken once");
        assert!(p.take("zzz").is_none());
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(p.pending(), 0, "b expired");
        assert!(p.take("b").is_none());
    }
}
