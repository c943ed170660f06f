//! Aborts that take effect in the middle of an engine step.
//!
//! The async side registers every request ([`Aborts::register`]) and hands
//! its [`Ticket`] to the engine thread with the job. An abort (Abort RPC or a
//! client that went away) only sets the request's flag, so it never waits
//! for the engine's channel. The engine checks the flag between steps and, in
//! the forward pass, before every layer's cache operation ([`Abortable`]): an
//! aborted sequence's KV cache is dropped there and then (device and host
//! tier), the load counters are lowered, and the abort is answered. The other
//! sequences of the batch are computed exactly as before: every row of the
//! forward pass is independent of the others.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

use super::Load;
use crate::kv::{PolicyChoice, SeqCache};
use crate::model::{DeviceTier, KvCache, KvError, KvShape};

/// Requests known to the engine (queued, waiting, running or preempted).
#[derive(Debug, Default)]
pub(super) struct Aborts {
    live: Mutex<HashMap<u64, Entry>>,
    next: AtomicU64,
}

#[derive(Debug)]
struct Entry {
    id: String,
    flag: Arc<AtomicBool>,
    /// Whether the engine gave the sequence KV memory (then an abort waits
    /// until it is freed).
    holds_memory: bool,
    /// Aborts waiting for the memory to be freed.
    freed: Vec<oneshot::Sender<()>>,
}

impl Aborts {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Entry>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a request about to be submitted.
    pub fn register(self: &Arc<Self>, id: &str) -> Ticket {
        let serial = self.next.fetch_add(1, Ordering::Relaxed);
        let flag = Arc::new(AtomicBool::new(false));
        let entry = Entry { id: id.to_string(), flag: flag.clone(), holds_memory: false, freed: Vec::new() };
        self.lock().insert(serial, entry);
        Ticket { serial, flag, aborts: Some(self.clone()) }
    }

    /// Flags every live, not yet aborted request with this id. `None` if
    /// there is none; otherwise the signals that fire once the memory of
    /// those holding any is freed.
    pub fn abort(&self, id: &str) -> Option<Vec<oneshot::Receiver<()>>> {
        let mut live = self.lock();
        let mut found = None;
        for e in live.values_mut().filter(|e| e.id == id && !e.flag.load(Ordering::Acquire)) {
            e.flag.store(true, Ordering::Release);
            let waits: &mut Vec<_> = found.get_or_insert_with(Vec::new);
            if e.holds_memory {
                let (tx, rx) = oneshot::channel();
                e.freed.push(tx);
                waits.push(rx);
            }
        }
        found
    }
}

/// The engine's side of one registration; dropping it (the sequence ended)
/// forgets the request and answers its aborts.
#[derive(Debug)]
pub(super) struct Ticket {
    serial: u64,
    flag: Arc<AtomicBool>,
    /// `None` once released.
    aborts: Option<Arc<Aborts>>,
}

impl Ticket {
    pub fn is_aborted(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    /// The engine is about to give the sequence KV memory: false (and no
    /// memory is to be given) if it was aborted already.
    pub fn admit(&self) -> bool {
        let Some(aborts) = &self.aborts else { return false };
        let mut live = aborts.lock();
        match live.get_mut(&self.serial) {
            Some(e) if !e.flag.load(Ordering::Acquire) => {
                e.holds_memory = true;
                true
            }
            _ => false,
        }
    }

    /// The sequence holds no memory any more: forgets the request and
    /// answers the aborts waiting for it.
    pub fn release(&mut self) {
        if let Some(aborts) = self.aborts.take()
            && let Some(e) = aborts.lock().remove(&self.serial)
        {
            for tx in e.freed {
                let _ = tx.send(());
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.release();
    }
}

/// A running sequence's cache as the forward pass sees it: once the
/// sequence is aborted, the next cache operation frees the cache, lowers the
/// load counters and answers the abort; from then on the sequence's rows are
/// computed over nothing (zero attention) and thrown away after the step.
pub(super) struct Abortable<'a> {
    pub kv: &'a mut SeqCache,
    pub ticket: &'a mut Ticket,
    pub shape: &'a KvShape,
    pub policy: &'a PolicyChoice,
    pub load: &'a Load,
    /// Tokens cached when the step began (what the model was told).
    pub len: usize,
}

impl Abortable<'_> {
    /// True once the sequence is aborted and its memory freed.
    fn freed(&mut self) -> bool {
        if self.ticket.aborts.is_none() {
            return true;
        }
        if !self.ticket.is_aborted() {
            return false;
        }
        let (device, host) = (self.kv.bytes_used() as u64, self.kv.host_bytes() as u64);
        if let Ok(empty) = SeqCache::new(self.shape, self.policy) {
            *self.kv = empty;
        }
        let o = Ordering::Relaxed;
        self.load.running.fetch_sub(1, o);
        self.load.kv_device_bytes.fetch_sub(device.min(self.load.kv_device_bytes.load(o)), o);
        self.load.kv_host_bytes.fetch_sub(host.min(self.load.kv_host_bytes.load(o)), o);
        tracing::debug!(device, host, "aborted mid-step: KV cache freed");
        self.ticket.release();
        true
    }
}

impl KvCache for Abortable<'_> {
    fn len(&self) -> usize {
        self.len
    }

    fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) -> Result<(), KvError> {
        if self.freed() {
            return Ok(());
        }
        self.kv.append(layer, k, v)
    }

    fn attend(&mut self, layer: usize, q: &[f32], n_q: usize, out: &mut [f32]) -> Result<(), KvError> {
        if self.freed() {
            out.fill(0.0);
            return Ok(());
        }
        self.kv.attend(layer, q, n_q, out)
    }

    fn end_step(&mut self) {
        if !self.freed() {
            self.kv.end_step();
        }
    }

    fn device_tier(&mut self) -> Option<&mut dyn DeviceTier> {
        if self.freed() {
            return None;
        }
        self.kv.device_tier()
    }

    fn bytes_used(&self) -> usize {
        self.kv.bytes_used()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::decoder::{Attended, BatchItem, cache_step};
    use crate::model::{DenseKv, DeviceTier};

    #[test]
    fn an_abort_waits_only_for_sequences_holding_memory() {
        let aborts = Arc::new(Aborts::default());
        let queued = aborts.register("a");
        let mut running = aborts.register("b");
        assert!(running.admit());
        assert!(aborts.abort("nope").is_none());
        // Queued: nothing to free, answered at once; the engine will not admit it.
        assert!(aborts.abort("a").expect("found").is_empty());
        assert!(queued.is_aborted() && !queued.admit());
        assert!(aborts.abort("a").is_none(), "a second abort finds nothing new");
        // Running: the abort's signal fires when the engine frees the memory.
        let mut waits = aborts.abort("b").expect("found");
        assert_eq!(waits.len(), 1);
        assert!(waits[0].try_recv().is_err());
        running.release();
        assert!(waits[0].try_recv().is_ok());
        drop(queued);
        assert!(aborts.lock().is_empty(), "released tickets are forgotten");
    }

    /// The device capability of a cache reaches a GPU backend through the engine's
    /// wrapper: decode rows of a live sequence go to its device tier, prefill rows and
    /// caches without one (the dense reference, an aborted sequence) to the host.
    #[test]
    fn decode_rows_reach_the_device_tier_through_the_abortable_wrapper() {
        const SHAPE: KvShape = KvShape { n_layers: 1, n_heads: 2, n_kv_heads: 1, head_dim: 8 };
        let (qw, kvw) = (SHAPE.q_width(), SHAPE.kv_width());
        let policy = PolicyChoice::parse("qaq").unwrap();
        let aborts = Arc::new(Aborts::default());
        let mut ticket = aborts.register("a");
        assert!(ticket.admit());
        let load = Load::default();
        load.running.store(1, Ordering::Relaxed);
        let mut seq = SeqCache::new(&SHAPE, &policy).unwrap();
        let mut dense = DenseKv::new(SHAPE);
        let rows = |n: usize, w: usize| (0..n * w).map(|i| (i as f32 * 0.3).sin()).collect::<Vec<f32>>();
        let mut calls = Vec::new();
        let mut run = |seq: &mut SeqCache, ticket: &mut Ticket, dense: &mut DenseKv, n: usize| {
            let len = seq.len();
            let mut wrapped = Abortable { kv: seq, ticket, shape: &SHAPE, policy: &policy, load: &load, len };
            let mut items = [
                BatchItem { tokens: &[0; 4][..n], kv: &mut wrapped as &mut dyn KvCache },
                BatchItem { tokens: &[0; 4][..n], kv: dense as &mut dyn KvCache },
            ];
            let (q, kv) = (rows(2 * n, qw), rows(2 * n, kvw));
            let mut out = vec![0f32; 2 * n * qw];
            let mut device = |_: &mut dyn DeviceTier, item: usize, q: &[f32]| {
                calls.push((item, q.len()));
                Ok(true)
            };
            let spans = [(0, n), (n, n)];
            let at = cache_step(&mut items, &spans, 0, [&q, &kv, &kv], (qw, kvw), &mut out, Some(&mut device));
            items.iter_mut().for_each(|it| it.kv.end_step());
            at.unwrap()
        };
        // A prefill chunk attends on the host, whatever the cache.
        assert_eq!(run(&mut seq, &mut ticket, &mut dense, 3), vec![Attended::Host, Attended::Host]);
        // A decode row of the live sequence goes to its device tier; the dense cache has none.
        assert_eq!(run(&mut seq, &mut ticket, &mut dense, 1), vec![Attended::Device, Attended::Host]);
        // Once aborted, the wrapper frees the cache and offers no tier.
        assert!(aborts.abort("a").is_some());
        assert_eq!(run(&mut seq, &mut ticket, &mut dense, 1), vec![Attended::Host, Attended::Host]);
        assert_eq!(calls, vec![(0, qw)], "one device call: item 0's decode row");
        assert_eq!(seq.len(), 0, "the aborted sequence's cache was freed");
    }
}
