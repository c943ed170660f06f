//! qaq worker: one process per device.
//!
//! - [`model`]: configuration, GGUF / safetensors loading, tokenizer and chat
//!   template, the llama forward pass, the [`model::KvCache`] seam.
//! - [`engine`]: the engine thread (continuous batching under two-tier KV
//!   budgets with preemption), sampling, detokenization with stop strings.
//! - [`cache`]: the per-sequence QAQ cache behind the model's KV seam, and
//!   KV policy resolution.
//! - [`service`]: the `qaq.v1.Worker` gRPC service; [`nccl`]: its KV migration
//!   between GPU workers of one node over NCCL.
//! - [`registration`]: register and heartbeat with the coordinator.
//! - [`server`]: `run(listener, ...)`, the whole worker behind a listener.
//! - [`config`]: command-line arguments and the validated configuration.
//! - [`device`]: `--device cpu | cuda:N` and its check against the machine.
//! - [`metrics`]: metric names; [`prom`]: the Prometheus recorder.
//! - [`bench`]: `qaq-worker bench`, decode throughput in-process.
//! - [`eval`]: `qaq-worker eval`, quality of the KV policies on real data.

pub mod bench;
pub mod cache;
pub mod config;
pub mod device;
pub mod engine;
pub mod eval;
pub mod metrics;
pub mod model;
pub mod nccl;
pub mod prom;
pub mod registration;
pub mod server;
pub mod service;
pub mod tls;
