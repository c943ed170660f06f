//! Admission: the coordinator's bounded FIFO of requests waiting for a worker
//! slot, and the retry-after hint given when it is full. A plain struct;
//! [`crate::cluster::Cluster`] holds it behind its mutex and wakes waiters
//! (a `tokio::sync::Notify`) whenever a slot may have freed.

use std::collections::VecDeque;
use std::time::Duration;

/// Metadata key of the retry hint sent with RESOURCE_EXHAUSTED.
pub const RETRY_AFTER_MS: &str = "retry-after-ms";

/// One queued request.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Waiter {
    ticket: u64,
    model: String,
}

/// Requests waiting for a worker slot, oldest first.
#[derive(Debug)]
pub struct AdmissionQueue {
    capacity: usize,
    next_ticket: u64,
    waiting: VecDeque<Waiter>,
}

/// The queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFull {
    /// Requests waiting.
    pub depth: usize,
}

impl AdmissionQueue {
    /// An empty queue holding at most `capacity` requests.
    pub fn new(capacity: usize) -> Self {
        Self { capacity, next_ticket: 1, waiting: VecDeque::new() }
    }

    /// Queues a request for `model`; its ticket, or [`QueueFull`].
    pub fn push(&mut self, model: &str) -> Result<u64, QueueFull> {
        if self.waiting.len() >= self.capacity {
            return Err(QueueFull { depth: self.waiting.len() });
        }
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.waiting.push_back(Waiter { ticket, model: model.to_string() });
        Ok(ticket)
    }

    /// Whether `ticket` may be placed now: no older request waits for the same model.
    pub fn is_turn(&self, ticket: u64, model: &str) -> bool {
        self.waiting.iter().find(|w| w.model == model).is_some_and(|w| w.ticket == ticket)
    }

    /// Whether any request waits for `model` (a new one must queue behind it).
    pub fn has_waiters(&self, model: &str) -> bool {
        self.waiting.iter().any(|w| w.model == model)
    }

    /// Removes a ticket (placed, timed out or cancelled); whether it was queued.
    pub fn remove(&mut self, ticket: u64) -> bool {
        let before = self.waiting.len();
        self.waiting.retain(|w| w.ticket != ticket);
        self.waiting.len() != before
    }

    /// Requests waiting.
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }
}

/// The retry hint for a rejected request: the time for the queue ahead of it
/// to drain through `slots` worker slots at `avg_duration` per request,
/// clamped to [100 ms, 30 s].
pub fn retry_after(depth: usize, slots: u32, avg_duration: Duration) -> Duration {
    let rounds = (depth as f64 + 1.0) / f64::from(slots.max(1));
    avg_duration.mul_f64(rounds.max(0.1)).clamp(Duration::from_millis(100), Duration::from_secs(30))
}

/// Exponentially weighted mean of request durations (for [`retry_after`]).
#[derive(Debug, Clone, Copy)]
pub struct DurationEwma {
    mean: Duration,
}

impl Default for DurationEwma {
    fn default() -> Self {
        Self { mean: Duration::from_secs(1) }
    }
}

impl DurationEwma {
    /// Adds an observation (weight 1/8).
    pub fn observe(&mut self, d: Duration) {
        self.mean = self.mean.mul_f64(0.875) + d.mul_f64(0.125);
    }

    /// The current mean.
    pub fn mean(&self) -> Duration {
        self.mean
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_per_model_and_bounded() {
        let mut q = AdmissionQueue::new(3);
        let a = q.push("smol").unwrap();
        let b = q.push("big").unwrap();
        let c = q.push("smol").unwrap();
        assert_eq!(q.push("smol"), Err(QueueFull { depth: 3 }));
        assert!(q.is_turn(a, "smol") && !q.is_turn(c, "smol"));
        assert!(q.is_turn(b, "big"), "another model's waiter does not block");
        assert!(q.has_waiters("smol") && !q.has_waiters("tiny"));
        assert!(q.remove(a));
        assert!(!q.remove(a));
        assert!(q.is_turn(c, "smol"));
        let d = q.push("smol").unwrap();
        assert!(d > c);
        assert_eq!(q.len(), 3);
        for t in [b, c, d] {
            q.remove(t);
        }
        assert!(q.is_empty());
    }

    #[test]
    fn zero_capacity_rejects_at_once() {
        let mut q = AdmissionQueue::new(0);
        assert_eq!(q.push("smol"), Err(QueueFull { depth: 0 }));
    }

    #[test]
    fn retry_hint_grows_with_the_queue_and_is_clamped() {
        let avg = Duration::from_secs(2);
        assert_eq!(retry_after(0, 4, avg), Duration::from_millis(500));
        assert_eq!(retry_after(7, 4, avg), Duration::from_secs(4));
        assert_eq!(retry_after(0, 1000, avg), Duration::from_millis(200));
        assert_eq!(retry_after(0, 0, Duration::ZERO), Duration::from_millis(100));
        assert_eq!(retry_after(10_000, 1, avg), Duration::from_secs(30));
    }

    #[test]
    fn ewma_moves_towards_observations() {
        let mut e = DurationEwma::default();
        for _ in 0..100 {
            e.observe(Duration::from_millis(200));
        }
        assert!((e.mean().as_secs_f64() - 0.2).abs() < 0.001, "{:?}", e.mean());
    }
}
