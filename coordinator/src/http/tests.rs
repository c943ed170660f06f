//! The HTTP front on a real socket, over a cluster whose one worker is a
//! scripted fake (a tonic `Worker` on another socket): statuses and error
//! shapes, keys, bodies and streams, and a client that goes away.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use qaq_proto::v1::worker_server::{Worker, WorkerServer};
use qaq_proto::v1::{
    AbortRequest, AbortResponse, DrainRequest, DrainResponse, ExportKvRequest, FinishReason, GenerateRequest,
    GenerateResponse, KvChunk, KvStats, ModelInfo, RegisterRequest, StatsRequest, StatsResponse, SubmitRequest, Usage,
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tonic::{Request, Status};

use super::*;
use crate::auth::ApiKeys;
use crate::config::Config;

/// Streams `tokens` messages `t0 `, `t1 `, ... one every `every`, then a
/// final LENGTH message; records the ids of Abort calls.
#[derive(Clone, Default)]
struct FakeWorker {
    tokens: u32,
    every: Duration,
    aborted: Arc<Mutex<Vec<String>>>,
}

type Stream<T> = std::pin::Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Worker for FakeWorker {
    type SubmitStream = Stream<GenerateResponse>;
    type ExportKvStream = Stream<KvChunk>;

    async fn submit(&self, r: Request<SubmitRequest>) -> Result<tonic::Response<Self::SubmitStream>, Status> {
        let req = r.into_inner().request.unwrap_or_default();
        let (n, every) = (req.max_new_tokens.unwrap_or(self.tokens).min(self.tokens), self.every);
        let s = futures::stream::unfold(0, move |i| async move {
            if i > n {
                return None;
            }
            tokio::time::sleep(every).await;
            let msg = if i < n {
                GenerateResponse { text: format!("t{i} "), token_ids: vec![i], ..Default::default() }
            } else {
                GenerateResponse {
                    finish_reason: FinishReason::Length as i32,
                    usage: Some(Usage { prompt_tokens: 5, completion_tokens: n }),
                    kv_stats: Some(KvStats { policy: "fp16".into(), device_bytes: 640, ..Default::default() }),
                    ..Default::default()
                }
            };
            Some((Ok(msg), i + 1))
        });
        Ok(tonic::Response::new(Box::pin(s)))
    }
    async fn abort(&self, r: Request<AbortRequest>) -> Result<tonic::Response<AbortResponse>, Status> {
        self.aborted.lock().unwrap().push(r.into_inner().request_id);
        Ok(tonic::Response::new(AbortResponse { found: true }))
    }
    async fn stats(&self, _: Request<StatsRequest>) -> Result<tonic::Response<StatsResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn drain(&self, _: Request<DrainRequest>) -> Result<tonic::Response<DrainResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn export_kv(&self, _: Request<ExportKvRequest>) -> Result<tonic::Response<Self::ExportKvStream>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

/// Serves `fake` on a local port and registers it as `w1` (model `smol`).
async fn add_worker(cluster: &Cluster, fake: FakeWorker) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tokio::spawn(
        tonic::transport::Server::builder().add_service(WorkerServer::new(fake)).serve_with_incoming(incoming),
    );
    let model = ModelInfo { name: "smol".into(), context_length: 8192, vocab_size: 49152, ..Default::default() };
    cluster
        .register(&RegisterRequest { worker_id: "w1".into(), address, model: Some(model), ..Default::default() })
        .unwrap();
}

/// The HTTP front of `cluster` on a local port.
async fn front(cluster: &Cluster) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(serve(listener, cluster.clone(), std::future::pending()));
    addr
}

/// A response: status, headers (lower-case names), body (de-chunked).
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
    /// `(status, error.code, error.param)` of an error reply.
    fn error(&self) -> (u16, String, String) {
        let e = &self.json()["error"];
        let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()) && e["type"].is_string(), "{}", self.body);
        (self.status, s(&e["code"]), s(&e["param"]))
    }
}

fn request_text(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    [head.as_bytes(), body].concat()
}

async fn call(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&request_text(method, path, headers, body)).await.unwrap();
    let mut raw = Vec::new();
    // The server may answer (413) and close before reading a huge body.
    let _ = s.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no head: {text:?}"));
    let mut lines = head.lines();
    let status = lines.next().unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers.iter().any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked { dechunk(rest) } else { rest.to_string() };
    Reply { status, headers, body }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

async fn post(addr: &str, path: &str, body: &Value, headers: &[(&str, &str)]) -> Reply {
    call(addr, "POST", path, headers, body.to_string().as_bytes()).await
}

fn hello(extra: Value) -> Value {
    let mut v = json!({"model": "smol", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3});
    v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    v
}

const CHAT: &str = "/v1/chat/completions";

#[tokio::test]
async fn errors_have_openai_shape_and_the_right_status() {
    let cluster = Cluster::new(Config { max_per_worker: Some(1), max_queue: 0, ..Config::default() });
    let addr = front(&cluster).await;
    // No worker.
    assert_eq!(post(&addr, CHAT, &hello(json!({})), &[]).await.error(), (503, "no_live_worker".into(), String::new()));
    let h = call(&addr, "GET", "/health", &[], b"").await;
    assert_eq!((h.status, h.json()["status"].as_str()), (503, Some("unavailable")));
    // Bodies that never reach the cluster.
    // Bodies that never reach the cluster: (body, code, param), all 400.
    let x = r#"{"messages": [{"role": "user", "content": "x"}]"#;
    let cases = [
        ("{".to_string(), "invalid_json", ""),
        (r#"{"messages": "hi"}"#.to_string(), "invalid_value", "messages"),
        (format!(r#"{x}, "temperature": "hot"}}"#), "invalid_value", "temperature"),
        (format!(r#"{x}, "n": 3}}"#), "invalid_value", "n"),
        (format!(r#"{x}, "logprobs": true}}"#), "invalid_value", "logprobs"),
    ];
    for (body, code, param) in cases {
        let r = call(&addr, "POST", CHAT, &[("content-type", "application/json")], body.as_bytes()).await;
        assert_eq!(r.error(), (400, code.into(), param.into()), "{body}");
    }
    let huge = vec![b' '; crate::MAX_REQUEST_BYTES + 1];
    assert_eq!(call(&addr, "POST", CHAT, &[], &huge).await.error().0, 413);
    assert_eq!(call(&addr, "GET", "/v1/nothing", &[], b"").await.error().0, 404);
    assert_eq!(call(&addr, "GET", CHAT, &[], b"").await.error().0, 404);
    let bad_id = post(&addr, CHAT, &hello(json!({})), &[("x-request-id", "has space")]).await;
    assert_eq!(bad_id.error(), (400, "invalid_value".into(), "x-request-id".into()));
    assert_eq!(bad_id.header("x-request-id"), Some("has space"), "echoed");

    // With a worker: the shared validation, under the HTTP names.
    add_worker(&cluster, FakeWorker { tokens: 50, every: Duration::from_millis(20), ..Default::default() }).await;
    assert_eq!(call(&addr, "GET", "/health", &[], b"").await.status, 200);
    let r = post(&addr, CHAT, &hello(json!({"max_tokens": 0})), &[]).await;
    assert_eq!(r.error(), (400, "invalid_value".into(), "max_tokens".into()));
    assert!(
        r.json()["error"]["message"].as_str().unwrap().starts_with("max_tokens: must be in [1, 8191]"),
        "{}",
        r.body
    );
    let r = post(&addr, CHAT, &hello(json!({"max_completion_tokens": 9000})), &[]).await;
    assert_eq!(r.error().2, "max_completion_tokens");
    let r = post(&addr, CHAT, &hello(json!({"temperature": -1})), &[]).await;
    assert!(
        r.json()["error"]["message"].as_str().unwrap().starts_with("temperature: must be in [0, 100]"),
        "{}",
        r.body
    );
    let r = post(&addr, CHAT, &hello(json!({"model": "llama-9000"})), &[]).await;
    assert_eq!(r.error(), (404, "model_not_found".into(), "model".into()));
    assert_eq!(call(&addr, "GET", "/v1/models/llama-9000", &[], b"").await.error().0, 404);
    // A deadline: 504.
    let r = post(&addr, CHAT, &hello(json!({"max_tokens": 40})), &[("x-qaq-timeout-ms", "100")]).await;
    assert_eq!(r.error(), (504, "deadline_exceeded".into(), String::new()));
    let r = post(&addr, CHAT, &hello(json!({})), &[("x-qaq-timeout-ms", "soon")]).await;
    assert_eq!(r.error().2, "x-qaq-timeout-ms");
    // The only slot taken and no queue: 429 with the retry hint.
    let mut held = GenerateRequest { prompt: "hold".into(), ..Default::default() };
    let admission = cluster.admit(&mut held, None, None).await.unwrap();
    let r = post(&addr, CHAT, &hello(json!({})), &[]).await;
    assert_eq!(r.error(), (429, "queue_full".into(), String::new()));
    assert!(r.header("retry-after").is_some() && r.header("retry-after-ms").is_some(), "{:?}", r.headers);
    cluster.release(&admission.request_id, None);
    let r = post(&addr, CHAT, &hello(json!({})), &[("x-request-id", "after-429")]).await;
    assert_eq!((r.status, r.header("x-request-id")), (200, Some("after-429")), "{}", r.body);
}

#[tokio::test]
async fn api_keys_guard_the_api_but_not_health() {
    let keys = ApiKeys::parse("k-1\n").unwrap();
    let cluster = Cluster::new(Config { api_keys: Some(keys), ..Config::default() });
    add_worker(&cluster, FakeWorker { tokens: 2, ..Default::default() }).await;
    let addr = front(&cluster).await;
    for key in [None, Some("Bearer nope"), Some("k-1")] {
        let headers: Vec<_> = key.map(|k| ("authorization", k)).into_iter().collect();
        let r = call(&addr, "GET", "/v1/models", &headers, b"").await;
        assert_eq!(r.error(), (401, "invalid_api_key".into(), String::new()), "{key:?}");
        assert_eq!(post(&addr, CHAT, &hello(json!({})), &headers).await.status, 401);
    }
    let r = call(&addr, "GET", "/v1/models", &[("authorization", "Bearer k-1")], b"").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let models = r.json();
    assert_eq!((models["object"].as_str(), models["data"][0]["id"].as_str()), (Some("list"), Some("smol")));
    assert_eq!(models["data"][0]["object"], "model");
    let r = call(&addr, "GET", "/v1/models/smol", &[("authorization", "Bearer k-1")], b"").await;
    assert_eq!((r.status, r.json()["context_length"].as_u64()), (200, Some(8192)));
    assert_eq!(call(&addr, "GET", "/health", &[], b"").await.status, 200);
}

#[tokio::test]
async fn answers_whole_and_streamed() {
    let cluster = Cluster::new(Config::default());
    add_worker(&cluster, FakeWorker { tokens: 3, ..Default::default() }).await;
    let addr = front(&cluster).await;
    let r = post(&addr, CHAT, &hello(json!({})), &[("x-request-id", "req-1")]).await;
    assert_eq!((r.status, r.header("x-request-id")), (200, Some("req-1")), "{}", r.body);
    let v = r.json();
    assert_eq!((v["id"].as_str(), v["object"].as_str()), (Some("chatcmpl-req-1"), Some("chat.completion")));
    assert_eq!(v["choices"][0]["message"]["content"], "t0 t1 t2 ");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["total_tokens"], 8);
    assert_eq!(v["usage"]["qaq"]["kv_bytes"], 640);

    let r = post(&addr, CHAT, &hello(json!({"stream": true, "stream_options": {"include_usage": true}})), &[]).await;
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/event-stream"), "{:?}", r.headers);
    let events: Vec<&str> = r.body.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert!(events.iter().all(|e| e.starts_with("data: ")), "{events:?}");
    assert_eq!(events.last(), Some(&"data: [DONE]"));
    let chunks: Vec<Value> =
        events[..events.len() - 1].iter().map(|e| serde_json::from_str(&e["data: ".len()..]).unwrap()).collect();
    assert_eq!(chunks.len(), 1 + 3 + 1 + 1, "role, 3 tokens, finish, usage: {chunks:?}");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, "t0 t1 t2 ");
    assert_eq!(chunks[4]["choices"][0]["finish_reason"], "length");
    assert_eq!(
        (chunks[5]["choices"].as_array().map(Vec::len), chunks[5]["usage"]["completion_tokens"].as_u64()),
        (Some(0), Some(3))
    );
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]));

    let r = post(&addr, "/v1/completions", &json!({"prompt": "x", "stream": true}), &[]).await;
    let chunks: Vec<Value> = r
        .body
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
    assert_eq!(text, "t0 t1 t2 ");
    assert!(chunks.iter().all(|c| c["object"] == "text_completion" && !c.as_object().unwrap().contains_key("usage")));
    assert_eq!(cluster.status().in_flight, 0);
}

#[tokio::test]
async fn a_client_that_goes_away_mid_stream_aborts_the_request_on_its_worker() {
    let cluster = Cluster::new(Config::default());
    let fake = FakeWorker { tokens: 500, every: Duration::from_millis(10), ..Default::default() };
    let aborted = fake.aborted.clone();
    add_worker(&cluster, fake).await;
    let addr = front(&cluster).await;
    let body = hello(json!({"stream": true, "max_tokens": 500})).to_string();
    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(&request_text("POST", CHAT, &[("x-request-id", "gone-1")], body.as_bytes())).await.unwrap();
    let mut seen = Vec::new();
    while seen.windows(6).filter(|w| w == b"data: ").count() < 3 {
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    assert_eq!(cluster.status().in_flight, 1);
    drop(s);
    let t0 = tokio::time::Instant::now();
    while cluster.status().in_flight > 0 || aborted.lock().unwrap().is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(5), "still in flight");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(aborted.lock().unwrap().as_slice(), ["gone-1"]);
}

#[tokio::test]
async fn the_request_id_header_is_the_id_generation_abort_takes() {
    let cluster = Cluster::new(Config::default());
    add_worker(&cluster, FakeWorker { tokens: 500, every: Duration::from_millis(10), ..Default::default() }).await;
    let addr = front(&cluster).await;
    let c = cluster.clone();
    let reply = tokio::spawn(async move {
        let body = hello(json!({"stream": true, "max_tokens": 500}));
        post(&addr, CHAT, &body, &[("x-request-id", "abort-me")]).await
    });
    let t0 = tokio::time::Instant::now();
    while !c.abort("abort-me").await {
        assert!(t0.elapsed() < Duration::from_secs(5), "never in flight");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let r = reply.await.unwrap();
    assert_eq!((r.status, r.header("x-request-id")), (200, Some("abort-me")));
    let data: Vec<&str> = r.body.split("\n\n").filter_map(|e| e.strip_prefix("data: ")).collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{data:?}");
    let finish: Value = serde_json::from_str(data[data.len() - 2]).unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "abort", "{finish}");
}
