//! Typed errors of the coordinator, mapped to `tonic::Status` in one place
//! ([`From<GenerateError> for Status`], [`From<RegistryError> for Status`]),
//! each with the metrics outcome label it counts under; and, for the HTTP
//! front, to an HTTP status and an OpenAI-shaped error in one place beside it
//! ([`GenerateError::to_http`], [`HttpError`]).

use std::time::Duration;

use thiserror::Error;
use tonic::{Code, Status};

use crate::metrics::Outcome;

/// Invalid coordinator configuration.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// A flag's value is out of range; the message names the flag.
    #[error("{0}")]
    Invalid(String),
    /// A TLS file (`--tls-cert`, `--tls-key`, `--worker-tls-ca`) is unusable;
    /// the message names the flag.
    #[error(transparent)]
    Tls(#[from] qaq_proto::tls::PemError),
}

/// Errors of the client API (`qaq.v1.Generation`).
#[derive(Debug, Error)]
pub enum GenerateError {
    /// A field failed validation (`qaq_proto::validate`); the status names it.
    #[error("{}", .0.message())]
    Invalid(Status),
    /// The requested model is served by no registered worker.
    #[error("model: {model:?} is not served by this cluster; available models: [{}]", .available.join(", "))]
    ModelNotFound {
        /// The name the client asked for.
        model: String,
        /// Models of live workers.
        available: Vec<String>,
    },
    /// No live worker can take the request.
    #[error("no live worker{}", .model.as_ref().map(|m| format!(" serves model {m:?}")).unwrap_or_default())]
    NoLiveWorker {
        /// The model asked for, if one was named.
        model: Option<String>,
    },
    /// A request with this id is already running.
    #[error("request_id: {0:?} is already running; choose another id or leave it empty")]
    DuplicateRequestId(String),
    /// The worker answered with an error (forwarded with its code).
    #[error("worker {worker_id}: {}", .status.message())]
    Worker {
        /// The worker that failed.
        worker_id: String,
        /// Its status.
        status: Status,
    },
    /// The client's gRPC deadline passed.
    #[error("deadline of {} ms exceeded after {tokens} generated tokens", .timeout.as_millis())]
    Deadline {
        /// The client's timeout.
        timeout: Duration,
        /// Tokens streamed before the deadline.
        tokens: u32,
    },
    /// The admission queue is full; retry after the hint.
    #[error("admission queue full ({depth} requests waiting); retry after {} ms", .retry_after.as_millis())]
    QueueFull {
        /// Requests waiting.
        depth: usize,
        /// When a retry may succeed (sent as `retry-after-ms` metadata).
        retry_after: Duration,
    },
    /// The request's deadline passed while it waited in the admission queue.
    #[error("deadline of {} ms exceeded while queued for a worker", .timeout.as_millis())]
    QueuedTooLong {
        /// The client's timeout.
        timeout: Duration,
    },
    /// Generation.Abort arrived while the request waited in the queue.
    #[error("aborted while queued")]
    AbortedWhileQueued,
    /// The coordinator is shutting down and admits nothing new.
    #[error("the coordinator is shutting down")]
    ShuttingDown,
    /// Workers kept failing: the retry budget is spent.
    #[error("gave up after {retries} retries (last worker {worker_id}: {}); completion_tokens={tokens} were streamed", .status.message())]
    RetriesExhausted {
        /// Resubmissions made.
        retries: u32,
        /// Tokens the client received.
        tokens: u32,
        /// The last worker that failed.
        worker_id: String,
        /// Its error.
        status: Status,
    },
}

/// Trailer metadata key carrying the tokens a failed request streamed.
pub const PARTIAL_COMPLETION_TOKENS: &str = "qaq-completion-tokens";

impl GenerateError {
    /// The `outcome` label this error is counted under in
    /// `qaq_coordinator_requests_total`.
    pub fn outcome(&self) -> Outcome {
        match self {
            Self::Invalid(_) | Self::ModelNotFound { .. } | Self::DuplicateRequestId(_) => Outcome::Invalid,
            Self::NoLiveWorker { .. } => Outcome::Unavailable,
            Self::Deadline { .. } => Outcome::Deadline,
            Self::QueueFull { .. } | Self::ShuttingDown => Outcome::Rejected,
            Self::QueuedTooLong { .. } => Outcome::Deadline,
            Self::AbortedWhileQueued => Outcome::Aborted,
            Self::RetriesExhausted { .. } => Outcome::Unavailable,
            Self::Worker { status, .. } => match status.code() {
                Code::InvalidArgument | Code::NotFound | Code::OutOfRange | Code::FailedPrecondition => {
                    Outcome::Invalid
                }
                Code::Unavailable | Code::ResourceExhausted => Outcome::Unavailable,
                Code::DeadlineExceeded => Outcome::Deadline,
                Code::Cancelled => Outcome::Aborted,
                _ => Outcome::Error,
            },
        }
    }

    /// The gRPC code this error is reported with.
    pub fn code(&self) -> Code {
        match self {
            Self::Invalid(s) => s.code(),
            Self::ModelNotFound { .. } => Code::NotFound,
            Self::NoLiveWorker { .. } => Code::Unavailable,
            Self::DuplicateRequestId(_) => Code::AlreadyExists,
            Self::Worker { status, .. } => status.code(),
            Self::Deadline { .. } => Code::DeadlineExceeded,
            Self::QueueFull { .. } => Code::ResourceExhausted,
            Self::QueuedTooLong { .. } => Code::DeadlineExceeded,
            Self::AbortedWhileQueued => Code::Cancelled,
            Self::ShuttingDown | Self::RetriesExhausted { .. } => Code::Unavailable,
        }
    }
}

impl From<GenerateError> for Status {
    fn from(e: GenerateError) -> Self {
        match e {
            // Validation messages already start with the field name: keep them verbatim.
            GenerateError::Invalid(s) => s,
            // Client-caused errors keep the worker's message verbatim (it names
            // the field); others say which worker failed. The code is kept.
            GenerateError::Worker { worker_id, status } => match status.code() {
                Code::InvalidArgument | Code::NotFound | Code::OutOfRange | Code::DeadlineExceeded => {
                    Status::new(status.code(), status.message().to_string())
                }
                code => Status::new(code, format!("worker {worker_id}: {}", status.message())),
            },
            e @ GenerateError::QueueFull { retry_after, .. } => {
                let mut s =
                    Status::new(e.code(), format!("{e} (see the {} metadata)", crate::admission::RETRY_AFTER_MS));
                if let Ok(v) = retry_after.as_millis().to_string().parse() {
                    s.metadata_mut().insert(crate::admission::RETRY_AFTER_MS, v);
                }
                s
            }
            e @ GenerateError::RetriesExhausted { tokens, .. } => {
                let mut s = Status::new(e.code(), e.to_string());
                if let Ok(v) = tokens.to_string().parse() {
                    s.metadata_mut().insert(PARTIAL_COMPLETION_TOKENS, v);
                }
                s
            }
            other => Status::new(other.code(), other.to_string()),
        }
    }
}

/// An error of the HTTP front in OpenAI's shape, `{"error": {"message",
/// "type", "param", "code"}}`, with its HTTP status (rendered by `crate::http`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpError {
    /// HTTP status code.
    pub status: u16,
    /// OpenAI's error `type`.
    pub kind: &'static str,
    /// OpenAI's error `code`, for programs.
    pub code: Option<&'static str>,
    /// The request field at fault, spelled as in the HTTP request.
    pub param: Option<String>,
    /// For people: a bad field's message names the field and its range.
    pub message: String,
    /// When a retry may succeed (`retry-after` and `retry-after-ms` headers).
    pub retry_after: Option<Duration>,
}

/// OpenAI's error type of a request the client must change.
pub const INVALID_REQUEST_ERROR: &str = "invalid_request_error";
const SERVER_ERROR: &str = "server_error";

impl HttpError {
    fn new(status: u16, kind: &'static str, code: &'static str, message: String) -> Self {
        Self { status, kind, code: Some(code), param: None, message, retry_after: None }
    }

    /// 400: a bad field; `message` starts with the field's name and says its range.
    pub fn invalid(param: Option<String>, message: String) -> Self {
        Self { param, ..Self::new(400, INVALID_REQUEST_ERROR, "invalid_value", message) }
    }

    /// 400: the body is not the JSON object expected.
    pub fn malformed(message: String) -> Self {
        Self::new(400, INVALID_REQUEST_ERROR, "invalid_json", message)
    }

    /// 401: no or a wrong API key.
    pub fn unauthenticated(message: &str) -> Self {
        Self::new(401, INVALID_REQUEST_ERROR, "invalid_api_key", message.to_string())
    }

    /// 404: no such model.
    pub fn model_not_found(message: String) -> Self {
        Self { param: Some("model".into()), ..Self::new(404, INVALID_REQUEST_ERROR, "model_not_found", message) }
    }

    /// 404: no such route.
    pub fn no_route(method: &str, path: &str) -> Self {
        Self::new(404, INVALID_REQUEST_ERROR, "unknown_url", format!("no route {method} {path}"))
    }

    /// 413: the body exceeds the limit.
    pub fn too_large(limit: usize) -> Self {
        Self::new(413, INVALID_REQUEST_ERROR, "body_too_large", format!("request body: at most {limit} bytes"))
    }

    /// 500: the coordinator failed.
    pub fn internal(message: String) -> Self {
        Self::new(500, SERVER_ERROR, "internal_error", message)
    }
}

/// Renames the field a `qaq.v1` validation message starts with
/// (`max_new_tokens: must be in [1, 8191] ...`) to the HTTP request's name
/// for it (`max_tokens`): returns the message and that name.
pub type Rename<'a> = &'a dyn Fn(&str) -> (String, Option<String>);

impl GenerateError {
    /// The HTTP status and OpenAI error of this error: 400 a bad field (its
    /// message from `qaq_proto::validate` or the worker, the field renamed by
    /// `rename`), 404 an unknown model, 409 a duplicate request id, 429 a full
    /// queue (with the retry hint), 503 no worker, 504 a deadline, 500 any
    /// other worker failure.
    pub fn to_http(&self, rename: Rename<'_>) -> HttpError {
        let invalid = |message: &str| {
            let (message, param) = rename(message);
            HttpError::invalid(param, message)
        };
        let unavailable = |code| HttpError::new(503, SERVER_ERROR, code, self.to_string());
        let deadline = || HttpError::new(504, "timeout_error", "deadline_exceeded", self.to_string());
        match self {
            Self::Invalid(s) => invalid(s.message()),
            Self::ModelNotFound { .. } => HttpError::model_not_found(self.to_string()),
            Self::NoLiveWorker { .. } => unavailable("no_live_worker"),
            Self::DuplicateRequestId(_) => HttpError {
                param: Some("x-request-id".into()),
                ..HttpError::new(409, INVALID_REQUEST_ERROR, "duplicate_request_id", self.to_string())
            },
            Self::Worker { status, .. } => match status.code() {
                Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => invalid(status.message()),
                Code::NotFound => {
                    let (message, param) = rename(status.message());
                    HttpError { param, ..HttpError::new(404, INVALID_REQUEST_ERROR, "not_found", message) }
                }
                Code::DeadlineExceeded => deadline(),
                Code::Unavailable | Code::ResourceExhausted | Code::Cancelled | Code::Aborted => {
                    unavailable("worker_unavailable")
                }
                _ => HttpError::new(500, SERVER_ERROR, "worker_error", self.to_string()),
            },
            Self::Deadline { .. } | Self::QueuedTooLong { .. } => deadline(),
            Self::QueueFull { retry_after, .. } => HttpError {
                retry_after: Some(*retry_after),
                ..HttpError::new(429, "rate_limit_error", "queue_full", self.to_string())
            },
            Self::AbortedWhileQueued => HttpError::new(409, INVALID_REQUEST_ERROR, "aborted", self.to_string()),
            Self::ShuttingDown => unavailable("shutting_down"),
            Self::RetriesExhausted { .. } => unavailable("retries_exhausted"),
        }
    }
}

/// Errors of the internal `qaq.v1.Registry` service.
#[derive(Debug, Error)]
pub enum RegistryError {
    /// A field of a Register/Heartbeat request is invalid; the message names it.
    #[error("{0}")]
    Invalid(String),
    /// The worker presented no or a wrong registration secret.
    #[error("registration secret: missing or wrong")]
    BadSecret,
}

impl From<RegistryError> for Status {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Invalid(m) => Status::invalid_argument(m),
            e @ RegistryError::BadSecret => Status::unauthenticated(e.to_string()),
        }
    }
}

/// Errors that stop the coordinator server.
#[derive(Debug, Error)]
pub enum ServeError {
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The reflection service could not be built from the descriptor set.
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// Binding or serving a socket failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// The certificate or key cannot serve TLS on the HTTP front.
    #[error("HTTP front TLS: {0}")]
    Tls(#[from] qaq_proto::tls::PemError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_codes_and_outcomes() {
        let cases: Vec<(GenerateError, Code, Outcome)> = vec![
            (GenerateError::Invalid(Status::invalid_argument("prompt: x")), Code::InvalidArgument, Outcome::Invalid),
            (
                GenerateError::ModelNotFound { model: "m".into(), available: vec!["a".into(), "b".into()] },
                Code::NotFound,
                Outcome::Invalid,
            ),
            (GenerateError::NoLiveWorker { model: None }, Code::Unavailable, Outcome::Unavailable),
            (GenerateError::DuplicateRequestId("r".into()), Code::AlreadyExists, Outcome::Invalid),
            (
                GenerateError::Deadline { timeout: Duration::from_millis(300), tokens: 2 },
                Code::DeadlineExceeded,
                Outcome::Deadline,
            ),
            (
                GenerateError::Worker { worker_id: "w".into(), status: Status::internal("boom") },
                Code::Internal,
                Outcome::Error,
            ),
            (
                GenerateError::Worker { worker_id: "w".into(), status: Status::invalid_argument("prompt: too long") },
                Code::InvalidArgument,
                Outcome::Invalid,
            ),
            (
                GenerateError::QueueFull { depth: 3, retry_after: Duration::from_millis(250) },
                Code::ResourceExhausted,
                Outcome::Rejected,
            ),
            (GenerateError::ShuttingDown, Code::Unavailable, Outcome::Rejected),
            (
                GenerateError::QueuedTooLong { timeout: Duration::from_millis(5) },
                Code::DeadlineExceeded,
                Outcome::Deadline,
            ),
        ];
        for (e, code, outcome) in cases {
            assert_eq!(e.outcome(), outcome, "{e}");
            let s: Status = e.into();
            assert_eq!(s.code(), code, "{}", s.message());
        }
    }

    #[test]
    fn messages_name_the_field_or_model() {
        let s: Status =
            GenerateError::ModelNotFound { model: "llama-70b".into(), available: vec!["smol".into()] }.into();
        assert!(s.message().starts_with("model:"), "{}", s.message());
        assert!(s.message().contains("llama-70b") && s.message().contains("[smol]"), "{}", s.message());
        let s: Status = GenerateError::Invalid(Status::invalid_argument("max_new_tokens: must be in [1, 8191]")).into();
        assert_eq!(s.message(), "max_new_tokens: must be in [1, 8191]");
        let s: Status =
            GenerateError::Worker { worker_id: "w1".into(), status: Status::invalid_argument("prompt: 9000 tokens") }
                .into();
        assert_eq!(s.message(), "prompt: 9000 tokens");
        let s: Status = GenerateError::Worker { worker_id: "w1".into(), status: Status::internal("boom") }.into();
        assert_eq!((s.code(), s.message()), (Code::Internal, "worker w1: boom"));
        let s: Status = GenerateError::NoLiveWorker { model: Some("smol".into()) }.into();
        assert!(s.message().contains("smol"));
    }

    #[test]
    fn queue_full_carries_the_retry_hint_and_exhausted_retries_the_usage() {
        let s: Status = GenerateError::QueueFull { depth: 2, retry_after: Duration::from_millis(750) }.into();
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert_eq!(s.metadata().get(crate::admission::RETRY_AFTER_MS).unwrap(), "750");
        let s: Status = GenerateError::RetriesExhausted {
            retries: 3,
            tokens: 7,
            worker_id: "w2".into(),
            status: Status::unavailable("connection refused"),
        }
        .into();
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(s.metadata().get(PARTIAL_COMPLETION_TOKENS).unwrap(), "7");
        assert!(s.message().contains("completion_tokens=7"), "{}", s.message());
        let s: Status = RegistryError::BadSecret.into();
        assert_eq!(s.code(), Code::Unauthenticated);
    }

    /// `max_new_tokens` is `max_tokens` in this test's HTTP request.
    fn rename(message: &str) -> (String, Option<String>) {
        match message.strip_prefix("max_new_tokens") {
            Some(rest) => (format!("max_tokens{rest}"), Some("max_tokens".into())),
            None => (message.to_string(), None),
        }
    }

    #[test]
    fn maps_to_http_statuses_and_openai_errors() {
        let worker = |status| GenerateError::Worker { worker_id: "w1".into(), status };
        let cases: Vec<(GenerateError, u16, &str, Option<&str>)> = vec![
            (GenerateError::Invalid(Status::invalid_argument("prompt: x")), 400, "invalid_value", None),
            (
                GenerateError::ModelNotFound { model: "m".into(), available: vec![] },
                404,
                "model_not_found",
                Some("model"),
            ),
            (GenerateError::NoLiveWorker { model: None }, 503, "no_live_worker", None),
            (GenerateError::DuplicateRequestId("r".into()), 409, "duplicate_request_id", Some("x-request-id")),
            (GenerateError::Deadline { timeout: Duration::from_millis(9), tokens: 1 }, 504, "deadline_exceeded", None),
            (GenerateError::QueuedTooLong { timeout: Duration::from_millis(9) }, 504, "deadline_exceeded", None),
            (GenerateError::ShuttingDown, 503, "shutting_down", None),
            (worker(Status::invalid_argument("prompt: 9000 tokens")), 400, "invalid_value", None),
            (worker(Status::internal("boom")), 500, "worker_error", None),
            (worker(Status::unavailable("gone")), 503, "worker_unavailable", None),
            (worker(Status::deadline_exceeded("late")), 504, "deadline_exceeded", None),
            (
                GenerateError::RetriesExhausted {
                    retries: 3,
                    tokens: 2,
                    worker_id: "w".into(),
                    status: Status::unavailable("x"),
                },
                503,
                "retries_exhausted",
                None,
            ),
        ];
        for (e, status, code, param) in cases {
            let h = e.to_http(&rename);
            assert_eq!((h.status, h.code, h.param.as_deref()), (status, Some(code), param), "{e}");
            assert!(!h.message.is_empty());
        }
        let h = GenerateError::QueueFull { depth: 2, retry_after: Duration::from_millis(750) }.to_http(&rename);
        assert_eq!((h.status, h.kind, h.retry_after), (429, "rate_limit_error", Some(Duration::from_millis(750))));
    }

    #[test]
    fn http_errors_name_the_field_as_the_request_spelled_it() {
        let e = GenerateError::Invalid(Status::invalid_argument("max_new_tokens: must be in [1, 8191], got 0"));
        let h = e.to_http(&rename);
        assert_eq!((h.status, h.kind), (400, INVALID_REQUEST_ERROR));
        assert_eq!(h.message, "max_tokens: must be in [1, 8191], got 0");
        assert_eq!(h.param.as_deref(), Some("max_tokens"));
        let e = GenerateError::Worker {
            worker_id: "w1".into(),
            status: Status::invalid_argument("max_new_tokens: 9000 exceeds the room left"),
        };
        assert!(e.to_http(&rename).message.starts_with("max_tokens: 9000"));
    }
}
