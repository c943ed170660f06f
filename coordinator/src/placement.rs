//! Placement: which worker runs a request. Pure functions over a registry
//! snapshot, so that policies are unit-tested without a cluster. Issue 5 adds
//! round-robin and KV-aware policies as further [`Policy`] variants.

use qaq_proto::v1::WorkerState;
use rand::Rng;

use crate::registry::WorkerSnapshot;

/// How a worker is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// Fewest running + waiting (last heartbeat) + the coordinator's own
    /// in-flight requests; random among equals.
    #[default]
    LeastLoaded,
}

/// The load a worker is ranked by under [`Policy::LeastLoaded`]. Heartbeats
/// lag, so the coordinator's in-flight count is added: a burst of requests
/// spreads before the next heartbeat reports it.
pub fn load_score(w: &WorkerSnapshot) -> u64 {
    u64::from(w.running) + u64::from(w.waiting) + u64::from(w.in_flight)
}

/// Whether a worker may receive new requests for `model`.
pub fn eligible(w: &WorkerSnapshot, model: &str) -> bool {
    w.state == WorkerState::Up && w.model == model
}

/// Index into `workers` of the worker that should run a request for `model`,
/// or `None` when no UP worker serves it.
pub fn place<R: Rng + ?Sized>(policy: Policy, workers: &[WorkerSnapshot], model: &str, rng: &mut R) -> Option<usize> {
    match policy {
        Policy::LeastLoaded => least_loaded(workers, model, rng),
    }
}

fn least_loaded<R: Rng + ?Sized>(workers: &[WorkerSnapshot], model: &str, rng: &mut R) -> Option<usize> {
    let best = workers.iter().filter(|w| eligible(w, model)).map(load_score).min()?;
    let ties: Vec<usize> = workers
        .iter()
        .enumerate()
        .filter(|(_, w)| eligible(w, model) && load_score(w) == best)
        .map(|(i, _)| i)
        .collect();
    Some(ties[rng.random_range(0..ties.len())])
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::time::Duration;

    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    fn w(id: &str, state: WorkerState, running: u32, waiting: u32, in_flight: u32) -> WorkerSnapshot {
        WorkerSnapshot {
            worker_id: id.into(),
            address: String::new(),
            model: "smol".into(),
            state,
            running,
            waiting,
            in_flight,
            heartbeat_age: Duration::ZERO,
            incarnation: 1,
        }
    }

    fn pick(ws: &[WorkerSnapshot], seed: u64) -> Option<&str> {
        let mut rng = StdRng::seed_from_u64(seed);
        place(Policy::LeastLoaded, ws, "smol", &mut rng).map(|i| ws[i].worker_id.as_str())
    }

    #[test]
    fn picks_the_least_loaded() {
        let ws = [w("a", WorkerState::Up, 3, 0, 0), w("b", WorkerState::Up, 1, 1, 0), w("c", WorkerState::Up, 2, 2, 0)];
        for seed in 0..20 {
            assert_eq!(pick(&ws, seed), Some("b"));
        }
    }

    #[test]
    fn counts_the_coordinators_in_flight_requests() {
        // Same heartbeat load; "a" already has two requests in flight.
        let ws = [w("a", WorkerState::Up, 1, 0, 2), w("b", WorkerState::Up, 1, 0, 0)];
        for seed in 0..20 {
            assert_eq!(pick(&ws, seed), Some("b"));
        }
    }

    #[test]
    fn breaks_ties_at_random_among_equals_only() {
        let ws = [w("a", WorkerState::Up, 1, 0, 0), w("b", WorkerState::Up, 0, 1, 0), w("c", WorkerState::Up, 5, 0, 0)];
        let seen: HashSet<&str> = (0..64).filter_map(|s| pick(&ws, s)).collect();
        assert_eq!(seen, HashSet::from(["a", "b"]));
    }

    #[test]
    fn excludes_down_draining_and_other_models() {
        let mut other = w("d", WorkerState::Up, 0, 0, 0);
        other.model = "big".into();
        let ws = [
            w("a", WorkerState::Down, 0, 0, 0),
            w("b", WorkerState::Draining, 0, 0, 0),
            w("c", WorkerState::Up, 9, 9, 9),
            other,
        ];
        for seed in 0..20 {
            assert_eq!(pick(&ws, seed), Some("c"));
        }
        assert_eq!(pick(&ws[..2], 0), None);
        assert_eq!(pick(&[], 0), None);
    }

    #[test]
    fn sequential_placements_alternate_when_counting_in_flight() {
        // What the coordinator does for a burst: place, then count it in flight.
        let mut ws = vec![w("a", WorkerState::Up, 0, 0, 0), w("b", WorkerState::Up, 0, 0, 0)];
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..8 {
            let i = place(Policy::LeastLoaded, &ws, "smol", &mut rng).unwrap();
            ws[i].in_flight += 1;
        }
        assert_eq!((ws[0].in_flight, ws[1].in_flight), (4, 4));
    }
}
