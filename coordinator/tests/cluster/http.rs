//! The OpenAI-compatible HTTP front and the standard clients, against a real
//! cluster started by `qaq up`: the official `openai` Python package, `curl -N`,
//! grpcio's reflection client (v1alpha), a client that disconnects mid-stream,
//! and `qaq up` passing API keys, the registration secret and TLS to every
//! process it starts. The Python clients live in a venv that
//! `scripts/install-pyclients.sh` makes (and `make test` runs first).

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use qaq_coordinator::process::{ReadyChild, ReadyLine, StdoutMode, spawn_until};
use qaq_proto::v1::registry_client::RegistryClient;
use qaq_proto::v1::worker_client::WorkerClient;
use qaq_proto::v1::{ClusterStatusRequest, ListModelsRequest, ModelInfo, RegisterRequest};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

use super::faults::metric;
use super::harness::{self, SERIAL, wait_load_on};
use super::security::certificates;

const API_KEY: &str = "qaq-http-test-key-5c1e";
const SECRET: &str = "qaq-http-test-secret-93ab";

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("qaq-http-{}-{name}", std::process::id()))
}

/// The Python with `openai`, `grpcio` and `grpcio-reflection` (installed on first use).
fn python() -> PathBuf {
    let script = harness::workspace().join("scripts/install-pyclients.sh");
    let out = std::process::Command::new(&script).output().expect("run scripts/install-pyclients.sh");
    assert!(out.status.success(), "install-pyclients.sh failed:\n{}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn client_script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/clients").join(name)
}

/// Runs `program args` off the async runtime; asserts it succeeded.
async fn run_ok(program: PathBuf, args: Vec<String>) -> String {
    let out = run(program.clone(), args.clone()).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{} {args:?} failed ({}):\n{stdout}\n{}",
        program.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    eprint!("{stdout}");
    stdout
}

async fn run(program: PathBuf, args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || std::process::Command::new(program).args(args).output().expect("spawn"))
        .await
        .unwrap()
}

/// `qaq up` with one worker and every endpoint on an ephemeral port.
struct Up {
    child: ReadyChild,
    grpc: String,
    /// `http://HOST:PORT/v1` (or https).
    base: String,
    metrics: String,
}

impl Up {
    async fn start(extra: &[&str]) -> Self {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_qaq"));
        cmd.args(["up", "--workers", "1", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .args(["--http-listen", "127.0.0.1:0"])
            .arg("--model")
            .arg(harness::model_path())
            .arg("--worker-bin")
            .arg(harness::worker_bin())
            .args(extra)
            .env("QAQ_LOG", "warn")
            .env_remove("QAQ_API_KEY")
            .stderr(std::process::Stdio::inherit());
        // `qaq cluster ready: coordinator G (metrics http://M/metrics), http http://H/v1, 1 workers`
        let matcher = |line: &str| {
            let rest = line.strip_prefix("qaq cluster ready: coordinator ")?;
            let mut r = ReadyLine::default();
            r.fields.insert("grpc".into(), rest.split_whitespace().next()?.to_string());
            let metrics = rest.split_once("(metrics http://")?.1.split_once("/metrics)")?.0;
            r.fields.insert("metrics".into(), metrics.to_string());
            r.fields.insert("http".into(), rest.split_once(", http ")?.1.split_once(',')?.0.to_string());
            Some(r)
        };
        let child =
            spawn_until(cmd, "qaq up", "qaq cluster ready", Duration::from_secs(180), StdoutMode::Discard, matcher)
                .await
                .expect("qaq up prints its ready line with an http address");
        let field = |k: &str| child.ready.get(k).unwrap().to_string();
        let (grpc, base, metrics) = (field("grpc"), field("http"), field("metrics"));
        Self { child, grpc, base, metrics }
    }

    /// `HOST:PORT` of the HTTP front.
    fn http_addr(&self) -> &str {
        let rest = self.base.split_once("://").unwrap().1;
        rest.strip_suffix("/v1").unwrap()
    }

    /// SIGTERM; `qaq up` stops its children and exits 0.
    async fn stop(mut self) {
        self.child.terminate().unwrap();
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await.expect("exits").unwrap();
        assert!(status.success(), "qaq up exited with {status}");
    }
}

fn curl(args: &[&str]) -> Vec<String> {
    ["-sS", "--max-time", "120"].iter().chain(args).map(|s| s.to_string()).collect()
}

/// Splits `curl -D -` output into (status, lower-case header lines, body).
fn split_response(out: &str) -> (u16, Vec<String>, String) {
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no headers: {out:?}"));
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head.lines().skip(1).map(str::to_ascii_lowercase).collect(), body.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standard_clients_against_qaq_up_with_keys_and_a_registration_secret() {
    let _serial = SERIAL.lock().await;
    let python = python();
    let (keys, secret) = (temp("keys"), temp("secret"));
    std::fs::write(&keys, format!("# test\n{API_KEY}\n")).unwrap();
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    let (keys_s, secret_s) = (keys.display().to_string(), secret.display().to_string());
    let up = Up::start(&["--api-keys-file", &keys_s, "--registration-secret-file", &secret_s]).await;
    assert!(up.base.starts_with("http://"), "{}", up.base);

    // 1. The official openai package.
    run_ok(
        python.clone(),
        vec![client_script("openai_check.py").display().to_string(), up.base.clone(), API_KEY.into()],
    )
    .await;

    // 2. curl -N: well-formed SSE, [DONE] last, the request id echoed.
    let auth = format!("authorization: Bearer {API_KEY}");
    let url = format!("{}/chat/completions", up.base);
    let body = r#"{"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 12, "temperature": 0,
                   "stream": true, "stream_options": {"include_usage": true}}"#;
    let args = curl(&["-N", "-D", "-", "-H", &auth, "-H", "x-request-id: curl-sse-1", "-d", body, &url]);
    let out = String::from_utf8(run(PathBuf::from("curl"), args).await.stdout).unwrap();
    let (status, headers, sse) = split_response(&out);
    assert_eq!(status, 200, "{out}");
    assert!(headers.iter().any(|h| h.starts_with("content-type: text/event-stream")), "{headers:?}");
    assert!(headers.iter().any(|h| h == "x-request-id: curl-sse-1"), "{headers:?}");
    assert!(sse.ends_with("\n\n"), "{sse:?}");
    let events: Vec<&str> = sse.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert!(events.iter().all(|e| e.starts_with("data: ") && !e.contains('\n')), "{events:?}");
    assert_eq!(*events.last().unwrap(), "data: [DONE]", "[DONE] last");
    let chunks: Vec<Value> =
        events[..events.len() - 1].iter().map(|e| serde_json::from_str(&e[6..]).expect("JSON chunk")).collect();
    assert!(chunks.iter().all(|c| c["id"] == "chatcmpl-curl-sse-1"), "{chunks:?}");
    let finish = &chunks[chunks.len() - 2]["choices"][0]["finish_reason"];
    assert!(finish == "stop" || finish == "length", "{finish}");
    let usage = &chunks[chunks.len() - 1]["usage"];
    assert!(usage["completion_tokens"].as_u64().unwrap() >= 1 && usage["qaq"]["kv_bytes"].as_u64().unwrap() > 0);

    // 3. Keys on both fronts: none or a wrong one is refused.
    for key in [None, Some("wrong-key")] {
        let mut args = vec!["-o", "/dev/null", "-w", "%{http_code}", "-d", body, url.as_str()];
        let header = key.map(|k| format!("authorization: Bearer {k}"));
        if let Some(h) = &header {
            args.extend(["-H", h]);
        }
        let code = String::from_utf8(run(PathBuf::from("curl"), curl(&args)).await.stdout).unwrap();
        assert_eq!(code, "401", "HTTP with key {key:?}");
        let mut c = qaq_proto::client::connect(&up.grpc, key).await.unwrap();
        let e = c.list_models(ListModelsRequest {}).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "gRPC with key {key:?}");
    }
    let mut client = qaq_proto::client::connect(&up.grpc, Some(API_KEY)).await.unwrap();
    assert_eq!(client.list_models(ListModelsRequest {}).await.unwrap().into_inner().models.len(), 1);
    // The workers registered with the secret; a worker without it is refused.
    let mut registry = RegistryClient::connect(format!("http://{}", up.grpc)).await.unwrap();
    let rogue = RegisterRequest {
        worker_id: "rogue".into(),
        address: "127.0.0.1:1".into(),
        model: Some(ModelInfo { name: "evil".into(), context_length: 8, vocab_size: 8, ..Default::default() }),
        ..Default::default()
    };
    assert_eq!(registry.register(rogue).await.unwrap_err().code(), Code::Unauthenticated);

    // 4. grpcio's reflection client (v1alpha) on the coordinator and the worker.
    let status = client.cluster_status(ClusterStatusRequest {}).await.unwrap().into_inner();
    let worker_addr = status.workers[0].address.clone();
    let reflection = client_script("reflection_check.py").display().to_string();
    let services = ["qaq.v1.Generation", "qaq.v1.Registry"].map(String::from);
    run_ok(python.clone(), [vec![reflection.clone(), up.grpc.clone()], services.to_vec()].concat()).await;
    let services = ["qaq.v1.Generation", "qaq.v1.Worker"].map(String::from);
    run_ok(python, [vec![reflection, worker_addr.clone()], services.to_vec()].concat()).await;

    // 5. A client that disconnects mid-stream: the worker's running count is 0 within 200 ms.
    let mut worker = WorkerClient::connect(format!("http://{worker_addr}")).await.unwrap();
    let long = r#"{"messages": [{"role": "user", "content": "Tell me a very long story."}], "max_tokens": 2000,
                   "ignore_eos": true, "stream": true}"#;
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n{auth}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{long}",
        long.len()
    );
    let mut s = tokio::net::TcpStream::connect(up.http_addr()).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    while seen.windows(6).filter(|w| w == b"data: ").count() < 4 {
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "stream ended early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    wait_load_on(&mut worker, |l| l.running == 1, "running the streamed request").await;
    drop(s);
    let gone = Instant::now();
    wait_load_on(&mut worker, |l| l.running == 0 && l.waiting == 0, "idle after the disconnect").await;
    let took = gone.elapsed();
    eprintln!("worker idle {took:?} after the HTTP client disconnected mid-stream");
    assert!(took <= Duration::from_millis(200), "worker still ran the request {took:?} after the disconnect");

    // 6. Metrics: both protocols counted under one set of names.
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = scrape(&up.metrics).await;
        if text.contains("qaq_coordinator_requests_total{outcome=\"aborted\",protocol=\"http\"} 1")
            || Instant::now() > deadline
        {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for line in [
        "qaq_coordinator_requests_total{outcome=\"aborted\",protocol=\"http\"} 1",
        "qaq_coordinator_requests_running{protocol=\"http\"} 0",
        "qaq_coordinator_requests_total{outcome=\"ok\",protocol=\"grpc\"} 0",
        "qaq_coordinator_time_to_first_token_seconds_bucket{protocol=\"http\",le=\"+Inf\"}",
    ] {
        assert!(text.contains(line), "{line} missing:\n{text}");
    }
    let ok = metric(&text, "qaq_coordinator_requests_total{outcome=\"ok\",protocol=\"http\"}");
    assert!(ok >= 5.0, "{ok} HTTP requests ok:\n{text}");
    assert!(metric(&text, "qaq_coordinator_requests_total{outcome=\"invalid\",protocol=\"http\"}") >= 6.0);
    assert!(metric(&text, "qaq_coordinator_rejections_total{reason=\"unauthenticated\"}") >= 5.0);
    up.stop().await;
    let _ = (std::fs::remove_file(&keys), std::fs::remove_file(&secret));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qaq_up_serves_tls_on_both_fronts_and_between_its_processes() {
    let _serial = SERIAL.lock().await;
    let dir = temp("tls");
    std::fs::create_dir_all(&dir).unwrap();
    let (ca, cert, key) = certificates(&dir);
    let s = |p: &Path| p.display().to_string();
    let up = Up::start(&["--tls-cert", &s(&cert), "--tls-key", &s(&key), "--tls-ca", &s(&ca)]).await;
    assert!(up.base.starts_with("https://"), "{}", up.base);
    // The worker registered over TLS (qaq up waited for it) and serves TLS.
    let out = run(
        PathBuf::from(env!("CARGO_BIN_EXE_qaq")),
        vec!["status".into(), "--addr".into(), up.grpc.clone(), "--tls-ca".into(), s(&ca)],
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.contains(" UP "), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    // HTTPS, verified against the CA.
    let body = r#"{"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}"#;
    let url = format!("{}/completions", up.base);
    let out = run(PathBuf::from("curl"), curl(&["--cacert", &s(&ca), "-D", "-", "-d", body, &url])).await;
    let (status, _, reply) = split_response(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(status, 200, "{reply}");
    let v: Value = serde_json::from_str(&reply).unwrap();
    assert!(v["choices"][0]["text"].as_str().is_some_and(|t| !t.is_empty()), "{v}");
    let health = format!("https://{}/health", up.http_addr());
    let out =
        run(PathBuf::from("curl"), curl(&["--cacert", &s(&ca), "-o", "/dev/null", "-w", "%{http_code}", &health]))
            .await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
    // Plaintext HTTP is refused.
    let plain = format!("http://{}/health", up.http_addr());
    let out = run(PathBuf::from("curl"), curl(&["-o", "/dev/null", "-w", "%{http_code}", &plain])).await;
    assert!(!out.status.success() || String::from_utf8_lossy(&out.stdout) != "200", "plaintext HTTP accepted");
    up.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

async fn scrape(addr: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect to /metrics");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    text
}
