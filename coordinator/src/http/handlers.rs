//! The routes of the HTTP front. A generation is parsed ([`openai::parse`]),
//! run through the request path the gRPC front uses ([`front::generate`])
//! and answered as one JSON body or as Server-Sent Events; dropping the
//! answer (the client went away) drops the request's stream, which aborts
//! it on its worker.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use qaq_proto::v1::{GenerateResponse, ModelInfo, WorkerState};
use serde_json::{Value, json};
use tracing::Instrument;

use crate::error::{GenerateError, HttpError};
use crate::front::{self, ResponseStream};
use crate::http::HttpState;
use crate::http::openai::{self, Endpoint, FieldNames, X_REQUEST_ID};
use crate::http::response::{Meta, error_body, finish_reason, unix_now, with_request_id};
use crate::metrics::{Outcome, Protocol};

/// Header of the request's deadline in milliseconds (the HTTP twin of
/// `grpc-timeout`): past it, 504 (or an error event once streaming).
pub const X_TIMEOUT_MS: &str = "x-qaq-timeout-ms";

/// `POST /v1/chat/completions`.
pub async fn chat(State(s): State<HttpState>, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Response {
    generate(s, headers, body, Endpoint::Chat).await
}

/// `POST /v1/completions`.
pub async fn completions(
    State(s): State<HttpState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    generate(s, headers, body, Endpoint::Completion).await
}

/// The header values this front reads, checked.
fn request_headers(headers: &HeaderMap) -> Result<(Option<String>, Option<Duration>), HttpError> {
    let text = |name: &str| {
        headers
            .get(name)
            .map(|v| {
                v.to_str()
                    .map(str::to_string)
                    .map_err(|_| HttpError::invalid(Some(name.into()), format!("{name}: must be printable ASCII")))
            })
            .transpose()
    };
    let id = text(X_REQUEST_ID)?;
    let timeout = match text(X_TIMEOUT_MS)? {
        None => None,
        Some(v) => match v.trim().parse::<u64>() {
            Ok(ms) if ms > 0 => Some(Duration::from_millis(ms)),
            _ => {
                let m = format!("{X_TIMEOUT_MS}: must be a whole number of milliseconds > 0, got {v:?}");
                return Err(HttpError::invalid(Some(X_TIMEOUT_MS.into()), m));
            }
        },
    };
    Ok((id, timeout))
}

async fn generate(
    s: HttpState,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    endpoint: Endpoint,
) -> Response {
    let received = Instant::now();
    let created = unix_now();
    let client_id = headers.get(X_REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let parsed = request_headers(&headers).and_then(|(id, timeout)| {
        let body = body.map_err(|r| match r.status() {
            StatusCode::PAYLOAD_TOO_LARGE => HttpError::too_large(crate::MAX_REQUEST_BYTES),
            _ => HttpError::malformed(format!("request body: {}", r.body_text())),
        })?;
        Ok((openai::parse(endpoint, &body, id.as_deref())?, timeout))
    });
    let (parsed, timeout) = match parsed {
        Ok(p) => p,
        Err(e) => {
            front::count_outcome(Outcome::Invalid, received, Protocol::Http);
            return with_request_id(e.into_response(), &client_id);
        }
    };
    let span = tracing::info_span!("http", request_id = %client_id, ?endpoint);
    let (names, stream, include_usage) = (parsed.names, parsed.stream, parsed.include_usage);
    let started =
        front::generate(&s.cluster, parsed.request, received, timeout, Protocol::Http).instrument(span.clone()).await;
    let started = match started {
        Ok(started) => started,
        Err(e) => return with_request_id(error(&e, names).into_response(), &client_id),
    };
    span.record("request_id", started.request_id.as_str());
    let meta = Meta::new(endpoint, &started.request_id, started.model, created);
    let response = if stream {
        // (Forward's own logs carry the request id while it streams.)
        Sse::new(sse(started.stream, meta, include_usage, names)).into_response()
    } else {
        complete(started.stream, &meta, names).instrument(span).await
    };
    with_request_id(response, &started.request_id)
}

/// The HTTP error of a request's error, its field named as the request did.
fn error(e: &GenerateError, names: FieldNames) -> HttpError {
    e.to_http(&|m: &str| names.rename(m))
}

/// Reads the whole stream: one JSON body, or the error that ended it.
async fn complete(mut stream: ResponseStream, meta: &Meta, names: FieldNames) -> Response {
    let mut text = String::new();
    let mut last = None;
    // To its end: a finished worker stream is read to its trailers.
    while let Some(item) = stream.next().await {
        match item {
            Ok(msg) => {
                text.push_str(&msg.text);
                if msg.finish_reason != 0 {
                    last = Some(msg);
                }
            }
            Err(e) => return error(&e, names).into_response(),
        }
    }
    match last {
        Some(last) => Json(meta.completion(&text, &last)).into_response(),
        None => HttpError::internal("the request's stream ended without its final message".into()).into_response(),
    }
}

/// Server-Sent Events as the OpenAI SDKs parse them: chunks, a final chunk
/// with `finish_reason`, a usage chunk when asked, then `data: [DONE]`; an
/// error after the first chunk is a `data: {"error": ...}` event.
fn sse(
    stream: ResponseStream,
    meta: Meta,
    include_usage: bool,
    names: FieldNames,
) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
    let mut pending = VecDeque::new();
    if meta.endpoint == Endpoint::Chat {
        pending.push_back(meta.chunk("", true, None, include_usage));
    }
    let state = SseState { stream, meta, include_usage, names, pending, finished: false, ended: false };
    futures::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(v) = st.pending.pop_front() {
                let event =
                    if v.is_null() { Event::default().data("[DONE]") } else { Event::default().data(v.to_string()) };
                return Some((Ok(event), st));
            }
            if st.ended {
                return None;
            }
            match st.stream.next().await {
                Some(Ok(msg)) => st.on_message(msg),
                Some(Err(e)) => {
                    st.pending.push_back(error_body(&error(&e, st.names)));
                    st.ended = true;
                }
                None => {
                    if !st.finished {
                        let e = HttpError::internal("the request's stream ended without its final message".into());
                        st.pending.push_back(error_body(&e));
                    }
                    st.ended = true;
                }
            }
        }
    })
}

struct SseState {
    stream: ResponseStream,
    meta: Meta,
    include_usage: bool,
    names: FieldNames,
    /// Bodies to send, in order; `Value::Null` is `[DONE]`.
    pending: VecDeque<Value>,
    /// The final message was seen (the stream is read on to its end).
    finished: bool,
    /// Nothing more to read.
    ended: bool,
}

impl SseState {
    fn on_message(&mut self, msg: GenerateResponse) {
        let (usage, meta) = (self.include_usage, &self.meta);
        if !msg.text.is_empty() {
            self.pending.push_back(meta.chunk(&msg.text, false, None, usage));
        }
        if msg.finish_reason != 0 && !self.finished {
            self.finished = true;
            self.pending.push_back(meta.chunk("", false, Some(finish_reason(msg.finish_reason)), usage));
            if usage {
                self.pending.push_back(meta.usage_chunk(&msg));
            }
            self.pending.push_back(Value::Null);
        }
    }
}

fn model_object(m: &ModelInfo, created: u64) -> Value {
    json!({
        "id": m.name,
        "object": "model",
        "created": created,
        "owned_by": "qaq",
        "context_length": m.context_length,
        "workers": m.workers,
    })
}

/// `GET /v1/models`: the models of live workers.
pub async fn models(State(s): State<HttpState>) -> Response {
    let data: Vec<Value> = s.cluster.models().models.iter().map(|m| model_object(m, s.created)).collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

/// `GET /v1/models/{model}`.
pub async fn model(State(s): State<HttpState>, Path(name): Path<String>) -> Response {
    let models = s.cluster.models().models;
    match models.iter().find(|m| m.name == name) {
        Some(m) => Json(model_object(m, s.created)).into_response(),
        None => {
            let available: Vec<_> = models.into_iter().map(|m| m.name).collect();
            let e = GenerateError::ModelNotFound { model: name, available };
            HttpError::model_not_found(e.to_string()).into_response()
        }
    }
}

/// `GET /health`: 200 when at least one worker is UP, else 503.
pub async fn health(State(s): State<HttpState>) -> Response {
    let status = s.cluster.status();
    let count = |state: WorkerState| status.workers.iter().filter(|w| w.state == state as i32).count();
    let up = count(WorkerState::Up);
    let ready = s.cluster.ready();
    let body = json!({
        "status": if ready { "ok" } else { "unavailable" },
        "workers": {"up": up, "draining": count(WorkerState::Draining), "down": count(WorkerState::Down)},
    });
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}

/// Any other route or method.
pub async fn not_found(method: Method, uri: Uri) -> Response {
    HttpError::no_route(method.as_str(), uri.path()).into_response()
}
