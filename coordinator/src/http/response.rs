//! Response bodies of the HTTP front, in OpenAI's shapes: a completion,
//! stream chunks (`chat.completion.chunk`, `text_completion`), usage with
//! qaq's per-request KV accounting, and errors (`{"error": {...}}`).
//!
//! `finish_reason`: qaq's `length` and `context` are OpenAI's `length`,
//! `stop` and `eos` are `stop`; an aborted request ends with `abort` (as
//! vLLM's). The exact qaq reason is `usage.qaq.finish_reason`.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use qaq_proto::v1::{FinishReason, GenerateResponse};
use serde_json::{Value, json};

use crate::error::HttpError;
use crate::http::openai::{Endpoint, X_REQUEST_ID};

/// Seconds since the Unix epoch (OpenAI's `created`).
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// What every body of one request repeats.
#[derive(Debug, Clone)]
pub struct Meta {
    /// `chatcmpl-<request id>` or `cmpl-<request id>`.
    pub id: String,
    /// When the request arrived.
    pub created: u64,
    /// The model that ran it.
    pub model: String,
    /// Chat or completion.
    pub endpoint: Endpoint,
}

impl Meta {
    /// The metadata of request `request_id` on `model`.
    pub fn new(endpoint: Endpoint, request_id: &str, model: String, created: u64) -> Self {
        let prefix = match endpoint {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completion => "cmpl",
        };
        Self { id: format!("{prefix}-{request_id}"), created, model, endpoint }
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completion, _) => "text_completion",
        }
    }

    fn envelope(&self, chunk: bool, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": choices,
        })
    }

    /// A stream chunk carrying `text` (chat: as `delta.content`; `role` adds
    /// the assistant role, as OpenAI's first chunk does) and, on the last,
    /// `finish`. With `include_usage` every chunk has `"usage": null`.
    pub fn chunk(&self, text: &str, role: bool, finish: Option<&str>, include_usage: bool) -> Value {
        let choice = match self.endpoint {
            Endpoint::Chat => {
                let mut delta = serde_json::Map::new();
                if role {
                    delta.insert("role".into(), "assistant".into());
                }
                if role || !text.is_empty() {
                    delta.insert("content".into(), text.into());
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Endpoint::Completion => json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish}),
        };
        let mut v = self.envelope(true, json!([choice]));
        if include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    /// The chunk after the last one, when usage was asked for: no choices.
    pub fn usage_chunk(&self, last: &GenerateResponse) -> Value {
        let mut v = self.envelope(true, json!([]));
        v["usage"] = usage(last);
        v
    }

    /// The whole response of a request that was not streamed.
    pub fn completion(&self, text: &str, last: &GenerateResponse) -> Value {
        let finish = finish_reason(last.finish_reason);
        let choice = match self.endpoint {
            Endpoint::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": finish,
            }),
            Endpoint::Completion => json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish}),
        };
        let mut v = self.envelope(false, json!([choice]));
        v["usage"] = usage(last);
        v
    }
}

/// OpenAI's `finish_reason` of a qaq final message.
pub fn finish_reason(reason: i32) -> &'static str {
    match FinishReason::try_from(reason).unwrap_or(FinishReason::Unspecified) {
        FinishReason::Length | FinishReason::Context => "length",
        FinishReason::Stop | FinishReason::Eos => "stop",
        FinishReason::Aborted => "abort",
        FinishReason::Unspecified => "stop",
    }
}

/// qaq's own name of a finish reason (`usage.qaq.finish_reason`).
fn qaq_reason(reason: i32) -> &'static str {
    match FinishReason::try_from(reason).unwrap_or(FinishReason::Unspecified) {
        FinishReason::Length => "length",
        FinishReason::Stop => "stop",
        FinishReason::Eos => "eos",
        FinishReason::Aborted => "aborted",
        FinishReason::Context => "context",
        FinishReason::Unspecified => "unspecified",
    }
}

/// `usage` of a final message: OpenAI's token counts, plus a `qaq` object
/// with the sequence's KV accounting (real bytes as stored, the same tokens'
/// fp16 bytes, average K/V bits, re-quantizations).
pub fn usage(last: &GenerateResponse) -> Value {
    let u = last.usage.unwrap_or_default();
    let kv = last.kv_stats.clone().unwrap_or_default();
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "qaq": {
            "finish_reason": qaq_reason(last.finish_reason),
            "worker_id": last.worker_id,
            "kv_policy": kv.policy,
            "kv_bytes": kv.device_bytes,
            "kv_fp16_equivalent_bytes": kv.fp16_equivalent_bytes,
            "kv_compression_ratio": kv.compression_ratio,
            "avg_key_bits": kv.avg_key_bits,
            "avg_value_bits": kv.avg_value_bits,
            "requantizations_up": kv.requantizations_up,
            "requantizations_down": kv.requantizations_down,
        },
    })
}

/// OpenAI's error body.
pub fn error_body(e: &HttpError) -> Value {
    json!({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}})
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut r = (status, axum::Json(error_body(&self))).into_response();
        if let Some(after) = self.retry_after {
            let h = r.headers_mut();
            // `retry-after` is whole seconds; the OpenAI SDKs read `retry-after-ms` first.
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            h.insert("retry-after", HeaderValue::from(secs.max(1)));
            h.insert("retry-after-ms", HeaderValue::from(after.as_millis().min(u128::from(u64::MAX)) as u64));
        }
        r
    }
}

/// Sets `x-request-id` on a response (an id that is no header value is left out).
pub fn with_request_id(mut r: Response, request_id: &str) -> Response {
    if !request_id.is_empty()
        && let Ok(v) = HeaderValue::from_str(request_id)
    {
        r.headers_mut().insert(X_REQUEST_ID, v);
    }
    r
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use qaq_proto::v1::{KvStats, Usage};

    use super::*;

    fn retry_after_of(r: &Response) -> Option<Duration> {
        let ms = r.headers().get("retry-after-ms")?.to_str().ok()?.parse().ok()?;
        Some(Duration::from_millis(ms))
    }

    fn last() -> GenerateResponse {
        GenerateResponse {
            request_id: "r1".into(),
            finish_reason: FinishReason::Eos as i32,
            usage: Some(Usage { prompt_tokens: 7, completion_tokens: 3 }),
            kv_stats: Some(KvStats {
                policy: "qaq-tuned".into(),
                device_bytes: 1000,
                fp16_equivalent_bytes: 4000,
                compression_ratio: 4.0,
                avg_key_bits: 3.5,
                avg_value_bits: 2.5,
                requantizations_up: 2,
                requantizations_down: 9,
            }),
            worker_id: "w1".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_chat_completion_has_openai_fields_and_qaq_usage() {
        let m = Meta::new(Endpoint::Chat, "r1", "smol".into(), 1_700_000_000);
        let v = m.completion("Hello", &last());
        assert_eq!(v["id"], "chatcmpl-r1");
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["choices"][0]["message"]["content"], "Hello");
        assert_eq!(v["choices"][0]["message"]["role"], "assistant");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        let u = &v["usage"];
        assert_eq!((u["prompt_tokens"].as_u64(), u["total_tokens"].as_u64()), (Some(7), Some(10)));
        assert_eq!(u["qaq"]["finish_reason"], "eos");
        assert_eq!(u["qaq"]["kv_bytes"], 1000);
        assert_eq!(u["qaq"]["kv_fp16_equivalent_bytes"], 4000);
        assert_eq!(u["qaq"]["avg_key_bits"], 3.5);
        assert_eq!(u["qaq"]["requantizations_up"], 2);
    }

    #[test]
    fn chunks_follow_the_openai_stream_shape() {
        let m = Meta::new(Endpoint::Chat, "r1", "smol".into(), 1);
        let first = m.chunk("", true, None, true);
        assert_eq!(first["object"], "chat.completion.chunk");
        assert_eq!(first["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
        assert!(first["usage"].is_null() && first.as_object().unwrap().contains_key("usage"));
        let end = m.chunk("", false, Some("length"), false);
        assert_eq!(end["choices"][0]["delta"], json!({}));
        assert_eq!(end["choices"][0]["finish_reason"], "length");
        assert!(!end.as_object().unwrap().contains_key("usage"));
        let u = m.usage_chunk(&last());
        assert_eq!(u["choices"], json!([]));
        assert_eq!(u["usage"]["completion_tokens"], 3);
        let c = Meta::new(Endpoint::Completion, "r2", "smol".into(), 1).chunk("Hi", false, None, false);
        assert_eq!((c["object"].as_str(), c["choices"][0]["text"].as_str()), (Some("text_completion"), Some("Hi")));
        assert_eq!(c["id"], "cmpl-r2");
    }

    #[test]
    fn finish_reasons_map_to_openai_names() {
        let cases = [
            (FinishReason::Length, "length"),
            (FinishReason::Context, "length"),
            (FinishReason::Stop, "stop"),
            (FinishReason::Eos, "stop"),
            (FinishReason::Aborted, "abort"),
        ];
        for (r, name) in cases {
            assert_eq!(finish_reason(r as i32), name, "{r:?}");
        }
    }

    #[test]
    fn errors_render_in_openai_shape_with_retry_hints() {
        let e = HttpError {
            retry_after: Some(Duration::from_millis(1500)),
            ..HttpError::invalid(Some("n".into()), "n: only 1".into())
        };
        assert_eq!(
            error_body(&e),
            json!({"error": {"message": "n: only 1", "type": "invalid_request_error", "param": "n", "code": "invalid_value"}})
        );
        let r = e.into_response();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert_eq!(r.headers()["retry-after"], "2");
        assert_eq!(retry_after_of(&r), Some(Duration::from_millis(1500)));
    }
}
