//! The worker's typed errors, each mapped to the wire in one place:
//!
//! - [`WorkerError`]: what a request or an RPC of `qaq.v1.Worker` fails with; converted to
//!   `tonic::Status` by `From<WorkerError> for Status` (and nowhere else), labelled by
//!   [`WorkerError::error_type`] in logs.
//! - [`ServeError`]: what keeps a worker from starting or serving (a flag out of range, a
//!   device or model it cannot use, a socket); the binary reports it and exits.
//! - [`MigrationError`]: pulling or exporting a KV cache between workers. It never reaches
//!   a client: the puller prefills instead, the exporter's stream ends with it as an
//!   internal status.

use tonic::Status;

use crate::engine::Failure;
use crate::model::ModelError;

/// Errors of the worker's gRPC service.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A field failed the validation shared with the coordinator
    /// (`qaq_proto::validate`); the status names the field and its range.
    #[error("{}", .0.message())]
    Invalid(Status),
    /// A field is out of range for this worker (its model, context, vocabulary).
    #[error("{field}: {message}")]
    InvalidArgument { field: &'static str, message: String },
    /// The request names what this worker does not have (a model, a parked KV cache).
    #[error("{field}: {message}")]
    NotFound { field: &'static str, message: String },
    /// The request cannot fit this worker's limits (its KV budget).
    #[error("{field}: {message}")]
    ResourceExhausted { field: &'static str, message: String },
    /// The worker is draining and takes no new request.
    #[error("worker is draining")]
    Draining,
    /// The engine thread has stopped.
    #[error("the engine has stopped")]
    EngineStopped,
    /// The engine failed the request.
    #[error(transparent)]
    Engine(#[from] Failure),
    /// Work the request needed failed outside the engine (a blocking task, a transfer).
    #[error("{0}")]
    Internal(String),
}

impl WorkerError {
    /// A short label of the error's kind, for logs.
    pub fn error_type(&self) -> &'static str {
        match self {
            Self::Invalid(_) | Self::InvalidArgument { .. } => "invalid_argument",
            Self::NotFound { .. } => "not_found",
            Self::ResourceExhausted { .. } => "resource_exhausted",
            Self::Draining => "draining",
            Self::EngineStopped => "engine_stopped",
            Self::Engine(Failure::QueueFull(_)) => "queue_full",
            Self::Engine(Failure::OutOfBudget { .. }) => "kv_budget",
            Self::Engine(_) => "engine",
            Self::Internal(_) => "internal",
        }
    }

    /// An out-of-range field.
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Self::InvalidArgument { field, message: message.into() }
    }
}

impl From<WorkerError> for Status {
    fn from(e: WorkerError) -> Status {
        let msg = e.to_string();
        match e {
            WorkerError::Invalid(s) => s,
            WorkerError::InvalidArgument { .. } => Status::invalid_argument(msg),
            WorkerError::NotFound { .. } => Status::not_found(msg),
            WorkerError::ResourceExhausted { .. } => Status::resource_exhausted(msg),
            // A draining worker is alive: the detail tells the coordinator not to mark it
            // down (qaq.v1.ErrorDetail, reason DRAINING).
            WorkerError::Draining => qaq_proto::status::draining(msg),
            WorkerError::EngineStopped => Status::unavailable(msg),
            WorkerError::Engine(Failure::QueueFull(_) | Failure::OutOfBudget { .. }) => Status::resource_exhausted(msg),
            WorkerError::Engine(_) | WorkerError::Internal(_) => Status::internal(msg),
        }
    }
}

/// Errors that keep a worker from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A flag is out of range; the message names it.
    #[error("{0}")]
    Config(String),
    /// The device cannot be used; the message names `--device`.
    #[error("{0}")]
    Device(String),
    /// The model cannot be loaded.
    #[error("loading {path}: {source}")]
    Model { path: String, source: ModelError },
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("the gRPC server task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("metrics: {0}")]
    Metrics(String),
}

/// Errors of moving a KV cache between workers.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The previous worker could not be reached or answered with an error.
    #[error("{0}")]
    Rpc(#[from] Status),
    #[error("connecting: {0}")]
    Connect(#[from] tonic::transport::Error),
    /// The transfer broke its own announcement (sizes, chunks, policy, tokens).
    #[error("{0}")]
    Protocol(String),
    /// The bytes did not restore into a cache of the request.
    #[error("restoring it failed: {0}")]
    Restore(String),
    /// The NCCL path failed.
    #[error("NCCL: {0}")]
    Nccl(String),
    #[error("no answer within {0:?}")]
    Timeout(std::time::Duration),
}
