//! [`PolicyCache`]: the one interface of a sequence's KV cache, whatever its policy.
//!
//! The trait is sealed: its implementations are this crate's four caches, which share
//! their storage and attention ([`super::layers::Layers`], reached through the sealed
//! supertrait). The provided methods are that shared behaviour, the baselines' whole
//! behaviour; QAQ overrides those its state takes part in.

use super::layers::Layers;
use super::rotation::Rotation;
use super::snapshot;
use super::types::{Attention, CacheConfig, CacheStats, Counters};
use crate::error::Result;
use crate::policy::KvPolicy;
use crate::store::PackedStream;

pub(crate) mod sealed {
    /// A value only this crate can make: the key to [`Storage::layers_mut`].
    #[derive(Clone, Copy, Debug)]
    pub struct Key(pub(crate) ());

    /// Access to the shared storage (not nameable outside the crate, so only this
    /// crate's caches implement [`super::PolicyCache`]).
    pub trait Storage {
        /// The shared storage.
        fn layers(&self) -> &super::Layers;
        /// The shared storage, mutably (it takes a [`Key`], so only from this crate).
        fn layers_mut(&mut self, key: Key) -> &mut super::Layers;
    }
}

/// The KV cache of one sequence, all layers, under one [`KvPolicy`].
///
/// Engine cycle (the worker's `append / attend / end_step`):
/// 1. [`PolicyCache::append`] the step's K/V rows of a layer (post-RoPE, f32,
///    `[n_tokens][n_kv_heads * head_dim]`, many tokens at once for a prefill). Rows are
///    rounded to fp16 (the reference values) and stored at the policy's width for new
///    tokens.
/// 2. [`PolicyCache::attend_rows`] with the step's queries (the last `n_q` positions,
///    causal). One row: attention over the packed cache ([`PolicyCache::attend`]).
///    Several rows (a prefill): exact attention over fp16 values (this step's rows are
///    staged in fp16; older tokens are dequantized).
/// 3. [`PolicyCache::end_step`].
///
/// Methods that only make sense for QAQ (its attention windows and ||Q||^2 tracker, host
/// backups, rewrite tracking) validate their arguments and do nothing for the baselines.
pub trait PolicyCache: sealed::Storage + Send + std::fmt::Debug {
    /// The policy.
    fn policy(&self) -> &KvPolicy;

    /// Appends `n` tokens' K and V rows (`n * n_kv_heads * head_dim` each) to `layer`.
    /// Non-finite or out-of-f16-range values are an error and leave the cache unchanged.
    fn append(&mut self, layer: usize, k_rows: &[f32], v_rows: &[f32]) -> Result<()>;

    /// Shape.
    fn config(&self) -> &CacheConfig {
        self.layers().config()
    }
    /// The rotation keys and values are stored in (a policy's `+rot`): queries are
    /// rotated by [`PolicyCache::decode_queries`], and an attention output computed
    /// elsewhere (a device mirror) must be rotated back with it.
    fn rotation(&self) -> Option<&Rotation> {
        self.layers().rotation.as_ref()
    }
    /// Tokens stored in `layer` (0 for a bad layer).
    fn len(&self, layer: usize) -> usize {
        self.layers().len(layer)
    }
    /// Whether layer 0 is empty.
    fn is_empty(&self) -> bool {
        self.len(0) == 0
    }

    /// Attention of one decode query (`n_q_heads * head_dim`, all query heads) over the
    /// packed cache of `layer`, with `1/sqrt(D)` scaling. QAQ: feeds the windows and the
    /// ||Q||^2 tracker.
    fn attend(&mut self, layer: usize, q: &[f32]) -> Result<Attention> {
        let qs = self.decode_queries(layer, q)?;
        Ok(self.layers().attend(layer, &qs))
    }

    /// A decode query (`n_q_heads * head_dim`) checked and prepared for attention over
    /// `layer`'s packed keys: scaled by `1/sqrt(D)` (and, QAQ, by the key channel
    /// scales), in KV-head order (the `g` query heads of KV head `h` at `h * g * D`).
    /// What [`PolicyCache::attend`] attends with, and what a device mirror of the cache
    /// ([`super::mirror`]) is given instead.
    fn decode_queries(&self, layer: usize, q: &[f32]) -> Result<Vec<f32>> {
        self.layers().decode_queries(layer, q)
    }

    /// Attention for the last `n_q` positions of `layer` (`q_rows`:
    /// `n_q * n_q_heads * head_dim`), causal; returns `n_q * n_q_heads * head_dim` outputs.
    /// `n_q == 1` uses the packed cache ([`PolicyCache::attend`]); several rows are exact
    /// attention over fp16 values. QAQ: the probabilities of the last `window` rows feed
    /// the per-token windows and every query feeds the ||Q||^2 tracker, so after a
    /// prefill the prompt's tokens get their first widths from the last rows.
    fn attend_rows(&mut self, layer: usize, q_rows: &[f32], n_q: usize) -> Result<Vec<f32>> {
        if n_q == 1 {
            let qs = self.decode_queries(layer, q_rows)?;
            return Ok(self.layers_mut(sealed::Key(())).attend_output(layer, &qs));
        }
        self.layers_mut(sealed::Key(())).rows(layer, q_rows, n_q, true, &mut ())
    }

    /// The side effects of [`PolicyCache::attend_rows`] without its output: the state
    /// sees exactly what `attend_rows` would feed it (QAQ's windows and tracker; nothing
    /// for the baselines, which only check the arguments), but attention is computed for
    /// the rows that feed a window only. An evaluation that runs one exact prefill for
    /// several caches ("shared prefill") calls this on every cache but the one whose
    /// output it uses.
    fn observe_rows(&mut self, layer: usize, q_rows: &[f32], n_q: usize) -> Result<()> {
        if n_q == 1 {
            return self.decode_queries(layer, q_rows).map(|_| ());
        }
        self.layers_mut(sealed::Key(())).rows(layer, q_rows, n_q, false, &mut ()).map(|_| ())
    }

    /// The side effects of [`PolicyCache::attend`] for KV head `head` of `layer` when the
    /// attention ran elsewhere (a device mirror): `qs` are the head's `g` prepared queries
    /// ([`PolicyCache::decode_queries`]), `window` the per-token maximum over them of the
    /// attention probabilities (one value per cached token).
    fn observe_window(&mut self, layer: usize, head: usize, qs: &[f32], window: &[f32]) -> Result<()> {
        self.layers().check_window(layer, head, qs, window)
    }

    /// Ends a decode (or prefill) step: clears the staged fp16 rows and, QAQ, every
    /// `every` steps re-quantizes all layers.
    fn end_step(&mut self) -> Result<()> {
        self.layers_mut(sealed::Key(())).end_step();
        Ok(())
    }

    /// Current widths of `(layer, kv_head)`: (keys, values); raw fp16 reads as 16.
    fn widths(&self, layer: usize, kv_head: usize) -> Option<(Vec<u8>, Vec<u8>)> {
        self.layers().widths(layer, kv_head)
    }

    /// Dequantized K and V of `layer`, `[T][n_kv_heads * head_dim]` each, in the model's
    /// units.
    fn dequantized(&self, layer: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        self.layers().dequantized(layer, |_| &[])
    }

    /// Sizes, average widths and counters.
    fn stats(&self) -> CacheStats {
        self.layers().stats(self.host_bytes(), self.counters())
    }
    /// Real device-tier bytes (see [`CacheStats::bytes_used`]).
    fn bytes_used(&self) -> usize {
        self.stats().bytes_used()
    }
    /// fp16 bytes of the same K/V.
    fn fp16_equivalent_bytes(&self) -> usize {
        self.stats().fp16_equivalent_bytes()
    }
    /// Re-quantization counters (zero for the baselines).
    fn counters(&self) -> Counters {
        Counters::default()
    }

    /// Bytes of fp16 backups held in the host tier (0 for the baselines).
    fn host_bytes(&self) -> usize {
        0
    }

    /// Evicts fp16 backups, least important tokens first (importance: the widest value
    /// width over the token's KV heads in that layer, which QAQ derives from the token's
    /// predicted attention; ties: the older token first, then the lower layer), until at
    /// least `want` bytes are freed or nothing is left. Returns (bytes freed, backups
    /// evicted); `(0, 0)` for the baselines and for `want == 0`. A token without backup
    /// can no longer be re-quantized upward.
    fn evict_backups(&mut self, want: usize) -> (usize, u64) {
        let _ = want;
        (0, 0)
    }

    /// The cache as bytes, to move it to another worker (request migration) instead of
    /// prefilling it again; see [`super::restore`]. Only between steps (after
    /// [`PolicyCache::end_step`], every layer at the same length), and not for the KIVI
    /// baseline, whose key store is not transferable.
    fn snapshot(&self) -> Result<Vec<u8>> {
        snapshot::write(self.layers(), self.policy(), &self.counters(), None)
    }

    /// Starts recording which groups re-quantization re-encodes, for a mirror that copies
    /// only what changed ([`PolicyCache::take_rewrites`]). Appended tokens need no
    /// record: a mirror knows how many it holds. (QAQ re-encodes groups, and so does a
    /// uniform cache as tokens leave its fp16 window.)
    fn track_rewrites(&mut self) {}

    /// The tokens whose key and value groups of `(layer, kv_head)` were re-encoded since
    /// the last call (in order of re-encoding, possibly repeated), or `None` for a bad
    /// index.
    fn take_rewrites(&mut self, layer: usize, kv_head: usize) -> Option<[Vec<u32>; 2]> {
        self.layers().head(layer, kv_head).map(|_| Default::default())
    }

    /// The packed key and value streams of `(layer, kv_head)`; `None` for a bad index
    /// or KIVI keys (not a packed stream).
    fn streams(&self, layer: usize, kv_head: usize) -> Option<(&PackedStream, &PackedStream)> {
        self.layers().streams(layer, kv_head)
    }
}
