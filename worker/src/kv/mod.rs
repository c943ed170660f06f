//! Per-sequence KV caches behind the model's [`KvCache`](crate::model::KvCache) seam.
//!
//! - [`policy`]: a request's KV policy ([`PolicyChoice`], [`QaqOverrides`]) and the byte
//!   figures the engine plans its budgets with.
//! - [`seq`]: [`SeqCache`], one sequence's cache (host tier, counters, summary).
//! - `tier`: its device tier on a GPU worker.

pub mod policy;
pub mod seq;
mod tier;

pub use policy::{PolicyChoice, QaqOverrides, backup_bytes_per_token, cache_config, worst_bytes_per_token};
pub use seq::{KvSummary, SeqCache};
