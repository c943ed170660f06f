//! qaq worker: one process per device, as a library (the `qaq-worker` binary and its
//! `bench` and `eval` tools are the `qaq-worker-cli` package, in `worker/cli`).
//!
//! - [`model`]: configuration, GGUF / safetensors loading, tokenizer and chat
//!   template, the llama forward pass on its backend (CPU or GPU), the
//!   [`model::KvCache`] seam.
//! - [`engine`]: the engine thread and its scheduler (continuous batching under
//!   two-tier KV budgets with preemption), sampling, detokenization with stop strings.
//! - [`kv`]: the per-sequence KV caches behind the model's KV seam, and KV
//!   policy resolution.
//! - [`service`]: the `qaq.v1.Worker` gRPC service (request preparation, KV
//!   migration); [`nccl`]: KV migration between GPU workers of one node over NCCL.
//! - [`error`]: the typed errors and their one mapping to gRPC statuses.
//! - [`registration`]: register and heartbeat with the coordinator.
//! - [`server`]: `run(listener, ...)`, the whole worker behind a listener.
//! - [`config`]: command-line arguments and the validated configuration.
//! - [`device`]: `--device cpu | cuda:N` and its check against the machine.
//! - [`metrics`]: metric names; [`prom`]: the Prometheus recorder.
//! - [`tls`]: TLS of the gRPC server and of the worker's clients.

pub mod config;
pub mod device;
pub mod engine;
pub mod error;
pub mod kv;
pub mod metrics;
pub mod model;
pub mod nccl;
pub mod prom;
pub mod registration;
pub mod server;
pub mod service;
pub mod tls;
