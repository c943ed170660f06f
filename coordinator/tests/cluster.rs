//! End-to-end tests with real processes: one `qaq-coordinator` and real
//! `qaq-worker`s serving SmolLM2-135M on ephemeral ports (see
//! `cluster/harness.rs`). Generations are short; tests run one at a time.

#[path = "cluster/harness.rs"]
mod harness;

#[path = "cluster/faults.rs"]
mod faults;
#[path = "cluster/http.rs"]
mod http;
#[path = "cluster/replicas.rs"]
mod replicas;
#[path = "cluster/security.rs"]
mod security;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use harness::{SERIAL, TestCluster, up_count, wait_load_on};
use qaq_proto::v1::{
    AbortRequest, ChatMessage, FinishReason, GenerateRequest, GenerateResponse, ListModelsRequest, SamplingParams,
    WorkerState,
};
use tonic::{Code, Request, Status};

fn greedy(prompt: &str, n: u32) -> GenerateRequest {
    GenerateRequest { prompt: prompt.into(), max_new_tokens: Some(n), ..Default::default() }
}

fn long_running(request_id: &str) -> GenerateRequest {
    GenerateRequest {
        prompt: "Tell me a very long story about a lighthouse keeper.".into(),
        max_new_tokens: Some(2000),
        ignore_eos: true,
        request_id: request_id.into(),
        ..Default::default()
    }
}

/// Runs a generation to its end: (concatenated text, messages).
async fn collect(
    c: &mut qaq_proto::client::Client,
    req: impl tonic::IntoRequest<GenerateRequest>,
) -> Result<(String, Vec<GenerateResponse>), Status> {
    let mut s = c.generate(req).await?.into_inner();
    let mut msgs = Vec::new();
    while let Some(m) = s.message().await? {
        msgs.push(m);
    }
    Ok((msgs.iter().map(|m| m.text.as_str()).collect(), msgs))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_serve_concurrent_streams() {
    let _serial = SERIAL.lock().await;
    let cluster = TestCluster::start(2, 2000).await;

    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let mut c = cluster.client().await;
        tasks.push(tokio::spawn(async move {
            let prompt = format!("Once upon a time, in a village with {} houses, there lived", i + 2);
            let r = collect(&mut c, greedy(&prompt, 16)).await;
            (i, r)
        }));
    }
    let mut workers_used = HashSet::new();
    for t in tasks {
        let (i, r) = t.await.unwrap();
        let (text, msgs) = r.unwrap_or_else(|e| panic!("request {i}: {e:?}"));
        assert!(msgs.len() >= 2, "request {i} was not streamed: {msgs:?}");
        let last = msgs.last().unwrap();
        let reason = FinishReason::try_from(last.finish_reason).unwrap();
        assert!(matches!(reason, FinishReason::Length | FinishReason::Eos), "request {i}: {reason:?}");
        assert!(!text.trim().is_empty(), "request {i}: empty text");
        let usage = last.usage.expect("usage on the final message");
        assert!(usage.completion_tokens >= 1 && usage.completion_tokens <= 16, "{usage:?}");
        assert!(usage.prompt_tokens > 0, "{usage:?}");
        assert!(msgs.iter().all(|m| m.request_id == last.request_id && !m.request_id.is_empty()));
        workers_used.insert(last.worker_id.clone());
    }
    eprintln!("8 concurrent streams of 16 tokens: {:?}", started.elapsed());
    assert_eq!(workers_used, HashSet::from(["w1".to_string(), "w2".to_string()]), "both workers used");

    let status = cluster.status().await;
    assert_eq!(status.workers.iter().map(|w| w.worker_id.as_str()).collect::<Vec<_>>(), ["w1", "w2"]);
    assert_eq!(up_count(&status), 2, "{status:?}");
    assert_eq!(status.in_flight, 0);
    let models = cluster.client().await.list_models(ListModelsRequest {}).await.unwrap().into_inner().models;
    assert_eq!(models.len(), 1);
    assert_eq!(models[0].workers, 2);
    assert!(models[0].context_length >= 2048, "{models:?}");

    // Chat messages go through the model's chat template.
    let chat = GenerateRequest {
        messages: vec![ChatMessage { role: "user".into(), content: "Say hello.".into() }],
        max_new_tokens: Some(8),
        ..Default::default()
    };
    let (text, _) = collect(&mut cluster.client().await, chat).await.unwrap();
    assert!(!text.is_empty());

    // Health: SERVING for both services.
    {
        use tonic_health::pb::health_check_response::ServingStatus;
        use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
        let mut health = HealthClient::new(cluster.channel().await);
        for service in ["qaq.v1.Generation", "qaq.v1.Registry"] {
            let r = health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
            assert_eq!(r.status, ServingStatus::Serving as i32, "{service}");
        }
    }
    // Reflection lists the client API.
    {
        use tonic_reflection::pb::v1::ServerReflectionRequest;
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        let mut refl = ServerReflectionClient::new(cluster.channel().await);
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut resp = refl.server_reflection_info(tokio_stream::iter([req])).await.unwrap().into_inner();
        let msg = resp.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else { panic!("{msg:?}") };
        assert!(list.service.iter().any(|s| s.name == "qaq.v1.Generation"), "{list:?}");
    }
    // Metrics: the requests were counted, histograms have buckets.
    let text = cluster.metrics().await;
    assert!(text.contains("qaq_coordinator_requests_total{outcome=\"ok\",protocol=\"grpc\"} 9"), "{text}");
    assert!(text.contains("qaq_coordinator_workers{state=\"up\"} 2"), "{text}");
    for (h, labels) in [
        ("time_to_first_token_seconds", "protocol=\"grpc\","),
        ("inter_token_latency_seconds", ""),
        ("request_duration_seconds", "protocol=\"grpc\","),
    ] {
        assert!(text.contains(&format!("# TYPE qaq_coordinator_{h} histogram")), "{h}: {text}");
        assert!(text.contains(&format!("qaq_coordinator_{h}_bucket{{{labels}le=\"+Inf\"}}")), "{h}: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_stops_work_on_the_worker() {
    let _serial = SERIAL.lock().await;
    let cluster = TestCluster::start(1, 2000).await;
    let mut c = cluster.client().await;

    // Client disconnect: read two messages, drop the stream.
    let mut s = c.generate(long_running("disconnect-1")).await.unwrap().into_inner();
    s.message().await.unwrap().expect("first message");
    s.message().await.unwrap().expect("second message");
    let mut worker = cluster.worker_client(0).await;
    assert_eq!(cluster.worker_load(0).await.running, 1, "the request runs on the worker");
    drop(s);
    let took = cluster.wait_idle_on(&mut worker).await;
    eprintln!("worker idle {took:?} after the client dropped its stream");
    assert!(took < Duration::from_millis(100), "worker still running the request {took:?} after the disconnect");
    cluster.wait_state(|s| s.in_flight == 0 && s.workers[0].in_flight == 0, "coordinator in-flight back to 0").await;

    // Abort(request_id) of a long prompt in the middle of its prefill, beside
    // two decoding streams (one engine step with a 512-token prefill chunk
    // lasts longer than 100 ms here): the worker drops it from its running
    // count within 100 ms of the Abort being sent; the others go on.
    let mut busy = Vec::new();
    for id in ["busy-1", "busy-2"] {
        let mut s = c.generate(long_running(id)).await.unwrap().into_inner();
        s.message().await.unwrap().expect("first message");
        busy.push(s);
    }
    let long_prompt = "The keeper climbed the stairs of the lighthouse again at dusk. ".repeat(250);
    let req = GenerateRequest { prompt: long_prompt, request_id: "abort-1".into(), ..greedy("", 16) };
    let mut s = c.generate(req).await.unwrap().into_inner();
    wait_load_on(&mut worker, |l| l.running == 3, "running the long prompt beside the two streams").await;
    let aborted = Instant::now();
    let found = c.abort(AbortRequest { request_id: "abort-1".into() }).await.unwrap().into_inner().found;
    let rpc = aborted.elapsed();
    let load = wait_load_on(&mut worker, |l| l.running <= 2, "rid of the aborted request").await;
    let took = aborted.elapsed();
    eprintln!("Abort RPC answered after {rpc:?}; worker running count down after {took:?} ({load:?})");
    assert!(found);
    assert_eq!(load.running, 2, "the other two streams still run: {load:?}");
    assert!(took <= Duration::from_millis(100), "worker still running the request {took:?} after Abort was sent");
    let mut last = None;
    while let Some(m) = s.message().await.unwrap() {
        last = Some(m);
    }
    let last = last.expect("a final message");
    assert_eq!(last.finish_reason, FinishReason::Aborted as i32, "{last:?}");
    let usage = last.usage.expect("usage on the ABORTED message");
    assert_eq!(usage.completion_tokens, 0, "aborted during its prefill: {usage:?}");
    for s in &mut busy {
        let m = s.message().await.unwrap().expect("the other streams go on");
        assert_eq!((m.token_ids.len(), m.finish_reason), (1, 0), "{m:?}");
    }
    drop(busy);
    cluster.wait_idle_on(&mut worker).await;
    assert!(!c.abort(AbortRequest { request_id: "abort-1".into() }).await.unwrap().into_inner().found);
    // The worker still serves afterwards.
    let (text, _) = collect(&mut c, greedy("Hello", 4)).await.unwrap();
    assert!(!text.is_empty());
    let text = cluster.metrics().await;
    for line in [
        "qaq_coordinator_requests_total{outcome=\"aborted\",protocol=\"grpc\"} 4",
        "qaq_coordinator_requests_total{outcome=\"ok\",protocol=\"grpc\"} 1",
        "qaq_coordinator_requests_running{protocol=\"grpc\"} 0",
        "qaq_coordinator_requests_waiting{protocol=\"grpc\"} 0",
    ] {
        assert!(text.contains(line), "{line} missing:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_exceeded_ends_the_stream_and_frees_the_worker() {
    let _serial = SERIAL.lock().await;
    let cluster = TestCluster::start(1, 2000).await;
    let mut c = cluster.client().await;
    let mut req = Request::new(long_running("deadline-1"));
    req.set_timeout(Duration::from_millis(300));
    let started = Instant::now();
    let err = match collect(&mut c, req).await {
        Ok((text, _)) => panic!("finished despite a 300 ms deadline: {text:?}"),
        Err(e) => e,
    };
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(3), "deadline honoured late: {:?}", started.elapsed());
    cluster.wait_worker_idle(0).await;
    cluster.wait_state(|s| s.in_flight == 0, "coordinator in-flight back to 0").await;
    let text = cluster.metrics().await;
    assert!(text.contains("qaq_coordinator_requests_total{outcome=\"deadline\",protocol=\"grpc\"} 1"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_rejected_naming_the_field() {
    let _serial = SERIAL.lock().await;
    let cluster = TestCluster::start(1, 2000).await;
    let mut c = cluster.client().await;
    let ok = || greedy("Hello", 4);
    let sampling = |s: SamplingParams| GenerateRequest { sampling: Some(s), ..ok() };
    let cases: Vec<(&str, GenerateRequest, Code, &str)> = vec![
        ("empty prompt", greedy("", 4), Code::InvalidArgument, "prompt"),
        ("max_new_tokens 0", greedy("Hello", 0), Code::InvalidArgument, "max_new_tokens"),
        ("max_new_tokens beyond context", greedy("Hello", 100_000), Code::InvalidArgument, "max_new_tokens"),
        (
            "temperature < 0",
            sampling(SamplingParams { temperature: Some(-0.5), ..Default::default() }),
            Code::InvalidArgument,
            "sampling.temperature",
        ),
        (
            "top_p 0",
            sampling(SamplingParams { top_p: Some(0.0), ..Default::default() }),
            Code::InvalidArgument,
            "sampling.top_p",
        ),
        (
            "top_p > 1",
            sampling(SamplingParams { top_p: Some(1.5), ..Default::default() }),
            Code::InvalidArgument,
            "sampling.top_p",
        ),
        ("unknown model", GenerateRequest { model: "llama-9000b".into(), ..ok() }, Code::NotFound, "llama-9000b"),
        (
            "bad chat role",
            GenerateRequest {
                prompt: String::new(),
                messages: vec![ChatMessage { role: "robot".into(), content: "hi".into() }],
                ..ok()
            },
            Code::InvalidArgument,
            "messages[0].role",
        ),
        (
            "empty chat content",
            GenerateRequest {
                prompt: String::new(),
                messages: vec![ChatMessage { role: "user".into(), content: String::new() }],
                ..ok()
            },
            Code::InvalidArgument,
            "messages[0].content",
        ),
        (
            "prompt and messages",
            GenerateRequest { messages: vec![ChatMessage { role: "user".into(), content: "hi".into() }], ..ok() },
            Code::InvalidArgument,
            "messages",
        ),
        ("prompt longer than the context", greedy(&"hello ".repeat(10_000), 4), Code::InvalidArgument, "prompt"),
    ];
    for (name, req, code, field) in cases {
        let err = collect(&mut c, req).await.expect_err(name);
        assert_eq!(err.code(), code, "{name}: {err:?}");
        assert!(err.message().contains(field), "{name}: message does not name {field:?}: {}", err.message());
    }
    // The unknown-model error lists what is available.
    let err = collect(&mut c, GenerateRequest { model: "nope".into(), ..ok() }).await.unwrap_err();
    let served = cluster.status().await.workers[0].model.clone().unwrap().name;
    assert!(err.message().contains(&served), "{}", err.message());
    // Nothing leaked, and valid input still works.
    cluster.wait_state(|s| s.in_flight == 0, "coordinator in-flight back to 0").await;
    assert!(collect(&mut c, ok()).await.is_ok());
    let text = cluster.metrics().await;
    assert!(text.contains("qaq_coordinator_requests_total{outcome=\"invalid\",protocol=\"grpc\"} 12"), "{text}");
    assert!(text.contains("qaq_coordinator_requests_total{outcome=\"ok\",protocol=\"grpc\"} 1"), "{text}");

    // A coordinator without workers: UNAVAILABLE.
    let empty = TestCluster::start(0, 2000).await;
    let err = collect(&mut empty.client().await, ok()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let text = empty.metrics().await;
    assert!(text.contains("qaq_coordinator_requests_total{outcome=\"unavailable\",protocol=\"grpc\"} 1"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_is_marked_down_and_avoided() {
    let _serial = SERIAL.lock().await;
    let lease_ms = 1000;
    let cluster = TestCluster::start(2, lease_ms).await;
    let killed_at = Instant::now();
    cluster.workers[0].kill9().expect("kill -9 w1");
    let status = cluster
        .wait_state(|s| s.workers.iter().any(|w| w.worker_id == "w1" && w.state == WorkerState::Down as i32), "w1 DOWN")
        .await;
    let took = killed_at.elapsed();
    assert!(took >= Duration::from_millis(lease_ms / 2), "marked down before its lease could lapse: {took:?}");
    assert_eq!(up_count(&status), 1);
    let mut c = cluster.client().await;
    for i in 0..4 {
        let (text, msgs) = collect(&mut c, greedy(&format!("Count to {i}."), 4)).await.unwrap();
        assert!(!text.is_empty());
        assert_eq!(msgs.last().unwrap().worker_id, "w2");
    }
    let text = cluster.metrics().await;
    assert!(text.contains("qaq_coordinator_workers{state=\"down\"} 1"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qaq_cli_up_two_coordinators_generate_status_and_clean_shutdown() {
    use qaq_coordinator::process::{ReadyLine, StdoutMode, spawn_until};

    let _serial = SERIAL.lock().await;
    let log = std::env::temp_dir().join(format!("qaq-up-test-{}.log", std::process::id()));
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_qaq"));
    cmd.args([
        "up",
        "--workers",
        "2",
        "--coordinators",
        "2",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
    ])
    .arg("--model")
    .arg(harness::model_path())
    .arg("--worker-bin")
    .arg(harness::worker_bin())
    .env("QAQ_LOG", "warn")
    .stderr(std::fs::File::create(&log).unwrap());
    // `qaq coordinators (...): HOST:PORT HOST:PORT`, then
    // `qaq cluster ready: coordinator HOST:PORT (metrics ...), N workers`
    let replicas = std::sync::Mutex::new(Vec::<String>::new());
    let matcher = |line: &str| {
        if let Some((_, list)) = line.strip_prefix("qaq coordinators ").and_then(|l| l.split_once("): ")) {
            *replicas.lock().unwrap() = list.split_whitespace().map(str::to_string).collect();
        }
        let rest = line.strip_prefix("qaq cluster ready: coordinator ")?;
        let addr = rest.split_whitespace().next()?;
        let mut r = ReadyLine::default();
        r.fields.insert("grpc".into(), addr.to_string());
        r.fields.insert("line".into(), line.to_string());
        Some(r)
    };
    let mut up =
        spawn_until(cmd, "qaq up", "qaq cluster ready", Duration::from_secs(180), StdoutMode::Discard, matcher)
            .await
            .expect("qaq up prints its ready line");
    let addr = up.ready.get("grpc").unwrap().to_string();
    assert!(up.ready.get("line").unwrap().ends_with("2 workers"), "{:?}", up.ready);
    let replicas = replicas.into_inner().unwrap();
    assert_eq!(replicas.len(), 2, "{replicas:?}");
    assert_eq!(replicas[0], addr);

    let qaq = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_qaq")).args(args).output().expect("run qaq");
        (
            out.status,
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (st, out, err) = tokio::task::spawn_blocking(move || {
        qaq(&["generate", "--addr", &addr, "--max-new-tokens", "8", "Once upon a time"])
    })
    .await
    .unwrap();
    assert!(st.success(), "qaq generate failed: {err}");
    assert!(!out.trim().is_empty(), "no text streamed; stderr: {err}");
    assert!(err.contains("finish=") && err.contains("tokens/s"), "{err}");
    // Both coordinators know both workers.
    for addr in replicas {
        let (st, out, err) = tokio::task::spawn_blocking(move || qaq(&["status", "--addr", &addr])).await.unwrap();
        assert!(st.success(), "qaq status failed: {err}");
        assert!(out.starts_with("WORKER"), "{out}");
        assert_eq!(out.lines().filter(|l| l.contains(" UP ")).count(), 2, "{out}");
    }
    let addr = up.ready.get("grpc").unwrap().to_string();
    let (st, _, err) =
        tokio::task::spawn_blocking(move || qaq(&["generate", "--addr", &addr, "--max-new-tokens", "0", "x"]))
            .await
            .unwrap();
    assert!(!st.success());
    assert!(err.contains("InvalidArgument") && err.contains("max_new_tokens"), "{err}");

    // SIGTERM: every child gets SIGTERM, qaq exits 0, no child is left.
    up.terminate().unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), up.wait()).await.expect("qaq up exits").unwrap();
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    assert!(status.success(), "qaq up exited with {status}; its stderr:\n{log_text}");
    assert!(log_text.contains("stopping the cluster"), "{log_text}");
    assert!(!log_text.contains("did not stop") && !log_text.contains("exited with"), "{log_text}");
}
