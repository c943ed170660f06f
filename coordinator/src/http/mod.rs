//! The OpenAI-compatible HTTP front (`--http-listen`), on axum 0.8: one
//! request path, two wire formats. A request is translated into the
//! `qaq.v1` request the gRPC front builds and runs through the same
//! admission, placement, forwarding, failover, deadlines and metrics
//! ([`crate::front`], label `protocol="http"`); errors map to OpenAI's shape
//! in one place (`GenerateError::to_http`).
//!
//! Routes: `POST /v1/chat/completions`, `POST /v1/completions`,
//! `GET /v1/models`, `GET /v1/models/{model}` (the API keys of
//! `--api-keys-file` guard these: `Authorization: Bearer <key>`), and
//! `GET /health` (open; 200 when a worker is UP). `x-request-id` is accepted
//! (it becomes the request's id, for logs and `Generation.Abort`) and echoed.
//! Bodies are limited to [`crate::MAX_REQUEST_BYTES`] (413 beyond).
//!
//! - [`openai`]: request bodies -> `qaq.v1`; field names.
//! - [`response`]: response bodies, stream chunks, errors.
//! - [`handlers`]: the routes.
//! - [`listener`]: the TLS listener (when the coordinator has a certificate).

pub mod handlers;
pub mod listener;
pub mod openai;
pub mod response;

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use tokio::net::TcpListener;

use crate::auth::ApiKeys;
use crate::cluster::Cluster;
use crate::error::{HttpError, ServeError};
use crate::metrics::Rejection;

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct HttpState {
    cluster: Cluster,
    /// When this front started (`created` of `/v1/models`).
    created: u64,
}

/// The routes over `cluster`, guarded by its API keys.
pub fn router(cluster: Cluster) -> Router {
    let keys = cluster.config().api_keys.clone().map(Arc::new);
    let state = HttpState { cluster, created: response::unix_now() };
    let api = Router::new()
        .route("/v1/chat/completions", post(handlers::chat))
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/models", get(handlers::models))
        .route("/v1/models/{model}", get(handlers::model))
        .route_layer(middleware::from_fn_with_state(keys, require_key));
    Router::new()
        .merge(api)
        .route("/health", get(handlers::health))
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::not_found)
        .layer(DefaultBodyLimit::max(crate::MAX_REQUEST_BYTES))
        .layer(middleware::from_fn(echo_request_id))
        .with_state(state)
}

/// With keys configured, a request needs `Authorization: Bearer <key>`.
async fn require_key(State(keys): State<Option<Arc<ApiKeys>>>, req: Request, next: Next) -> Response {
    if let Some(keys) = &keys {
        let header = req.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok());
        if let Err(s) = keys.check(header) {
            Rejection::Unauthenticated.count();
            return HttpError::unauthenticated(s.message()).into_response();
        }
    }
    next.run(req).await
}

/// Echoes the client's `x-request-id` on responses that do not carry the
/// request's own (errors before a request was admitted, other routes).
async fn echo_request_id(req: Request, next: Next) -> Response {
    let id = req.headers().get(openai::X_REQUEST_ID).cloned();
    let mut r = next.run(req).await;
    if let Some(id) = id
        && !r.headers().contains_key(openai::X_REQUEST_ID)
    {
        r.headers_mut().insert(openai::X_REQUEST_ID, id);
    }
    r
}

/// Serves the HTTP front on `listener` (over TLS when the coordinator has a
/// certificate) until `shutdown` resolves, then lets open responses finish.
pub async fn serve(
    listener: TcpListener,
    cluster: Cluster,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let tls = cluster.config().tls.as_ref().map(|t| t.rustls_config(&[b"h2", b"http/1.1"])).transpose()?;
    let app = router(cluster);
    match tls {
        None => {
            let listener = listener.tap_io(|tcp| {
                // Small SSE events must not wait for delayed ACKs.
                let _ = tcp.set_nodelay(true);
            });
            axum::serve(listener, app).with_graceful_shutdown(shutdown).await?;
        }
        Some(config) => {
            let listener = listener::TlsListener::new(listener, config)?;
            axum::serve(listener, app).with_graceful_shutdown(shutdown).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
