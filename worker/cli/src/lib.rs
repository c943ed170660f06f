//! The `qaq-worker` binary's tools beside serving, built on the `qaq-worker` library
//! (not part of it, so the serving library stays what a worker runs):
//!
//! - [`bench`]: `qaq-worker bench`, decode throughput in-process, side by side.
//! - [`eval`]: `qaq-worker eval`, quality of the KV policies on real data.

pub mod bench;
pub mod eval;
