//! Two-tier KV memory accounting: the device tier holds the packed caches of
//! running sequences, the host tier holds fp16 backups and the packed caches
//! of preempted (swapped-out) sequences. Plain functions over sizes, so the
//! engine's decisions are unit-tested without a model.

/// Byte budgets of the two tiers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budgets {
    /// Packed caches of running sequences.
    pub device: u64,
    /// fp16 backups plus swapped-out packed caches.
    pub host: u64,
}

/// A running sequence as the planner sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeqNeed {
    /// Device bytes it holds now.
    pub bytes: u64,
    /// Tokens it still has to feed before it can sample (1 when decoding).
    pub pending: usize,
    /// Worst-case device bytes per fed token (until re-quantized).
    pub worst_per_token: u64,
}

/// The plan of one step.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct StepPlan {
    /// Tokens each kept sequence feeds (0: sits this step out), in input order.
    pub feed: Vec<usize>,
    /// Sequences to preempt (indices into the input), latest admitted first.
    pub preempt: Vec<usize>,
}

/// Plans a step under the device budget. Sequences are in admission order;
/// when the step's worst-case growth does not fit, the latest admitted are
/// preempted first (never the first one). Prefill chunks share
/// `prefill_budget` tokens and shrink to the room left.
pub fn plan_step(seqs: &[SeqNeed], device_budget: u64, prefill_budget: usize) -> StepPlan {
    let mut keep = seqs.len();
    let used = |k: usize| seqs[..k].iter().map(|s| s.bytes).sum::<u64>();
    let min_growth = |k: usize| seqs[..k].iter().map(|s| s.worst_per_token * s.pending.min(1) as u64).sum::<u64>();
    while keep > 1 && used(keep) + min_growth(keep) > device_budget {
        keep -= 1;
    }
    let mut room = device_budget.saturating_sub(used(keep) + min_growth(keep));
    let mut prefill = prefill_budget;
    let mut feed = Vec::with_capacity(seqs.len());
    for s in &seqs[..keep] {
        let n = match s.pending {
            0 => 0,
            1 => 1,
            p => {
                // One token is already reserved in min_growth.
                let extra_room = room / s.worst_per_token.max(1);
                let n = p.min(prefill).min(1 + extra_room as usize).max(1);
                room -= (n as u64 - 1) * s.worst_per_token;
                prefill = prefill.saturating_sub(n);
                n
            }
        };
        feed.push(n);
    }
    feed.resize(seqs.len(), 0);
    StepPlan { feed, preempt: (keep..seqs.len()).rev().collect() }
}

/// Whether a sequence of `bytes` (plus `growth` for its next step) can join
/// running sequences holding `used` bytes.
pub fn fits(used: u64, bytes: u64, growth: u64, device_budget: u64) -> bool {
    used.saturating_add(bytes).saturating_add(growth) <= device_budget
}

/// How many bytes to free in the host tier: down to 90% of the budget once
/// over it, so eviction runs in batches rather than every step.
pub fn host_excess(host_used: u64, host_budget: u64) -> u64 {
    if host_used <= host_budget { 0 } else { host_used - host_budget * 9 / 10 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(bytes: u64, pending: usize) -> SeqNeed {
        SeqNeed { bytes, pending, worst_per_token: 10 }
    }

    #[test]
    fn everything_fits_decodes_one_each_and_prefills_in_chunks() {
        let p = plan_step(&[s(100, 1), s(50, 1), s(0, 30)], 10_000, 16);
        assert_eq!(p.feed, vec![1, 1, 16]);
        assert!(p.preempt.is_empty());
    }

    #[test]
    fn latest_admitted_are_preempted_first_and_the_first_never() {
        // 3 x 100 bytes + 3 x 10 growth = 330 > 250: drop the last two? 2 x 110 = 220 fits.
        let p = plan_step(&[s(100, 1), s(100, 1), s(100, 1)], 250, 16);
        assert_eq!(p.feed, vec![1, 1, 0]);
        assert_eq!(p.preempt, vec![2]);
        let p = plan_step(&[s(100, 1), s(100, 1), s(100, 1)], 50, 16);
        assert_eq!(p.feed, vec![1, 0, 0]);
        assert_eq!(p.preempt, vec![2, 1]);
    }

    #[test]
    fn prefill_chunks_shrink_to_the_room_left() {
        // 1000 budget, 900 used, first token reserved: 90 bytes left = 9 more tokens.
        let p = plan_step(&[s(900, 50)], 1000, 512);
        assert_eq!(p.feed, vec![10]);
        let p = plan_step(&[s(0, 50), s(0, 50)], 10_000, 64);
        assert_eq!(p.feed, vec![50, 14]);
    }

    #[test]
    fn admission_and_host_excess() {
        assert!(fits(100, 50, 10, 160));
        assert!(!fits(100, 50, 11, 160));
        assert!(fits(u64::MAX, 1, 1, u64::MAX), "u64::MAX means unlimited");
        assert!(!fits(u64::MAX - 2, 1, 1, u64::MAX - 2));
        assert_eq!(host_excess(90, 100), 0);
        assert_eq!(host_excess(120, 100), 30);
    }
}
