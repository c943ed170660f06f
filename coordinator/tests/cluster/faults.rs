//! Failover, drain and shutdown with real workers: kill -9 mid-run (every
//! admitted request completes, greedy output unchanged), SIGTERM drain of a
//! worker under load, migration of the KV caches a drain parks (QAQ output
//! unchanged, no second prefill), SIGTERM of the coordinator, lease expiry and
//! re-registration of a paused worker.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use qaq_proto::v1::{FinishReason, GenerateRequest, KvPolicy, WorkerState};

use super::harness::{Opts, SERIAL, TestCluster, up_count};

/// A greedy request with the fp16 KV policy that always runs `n` tokens.
fn dense(prompt: &str, n: u32) -> GenerateRequest {
    GenerateRequest {
        prompt: prompt.into(),
        max_new_tokens: Some(n),
        ignore_eos: true,
        kv_policy: Some(KvPolicy { policy: "fp16".into(), ..Default::default() }),
        ..Default::default()
    }
}

/// A greedy request under `qaq-tuned` (QAQ with re-quantization every step) that always
/// runs `n` tokens.
fn qaq(prompt: &str, n: u32) -> GenerateRequest {
    GenerateRequest {
        kv_policy: Some(KvPolicy { policy: "qaq-tuned".into(), ..Default::default() }),
        ..dense(prompt, n)
    }
}

/// What one stream produced.
#[derive(Debug, Default)]
struct Run {
    tokens: Vec<u32>,
    workers: Vec<String>,
    finish: i32,
    completion_tokens: u32,
    prompt_tokens: u32,
}

/// Per stream: (current worker, tokens so far, finished).
type Progress = Arc<std::sync::Mutex<Vec<(String, usize, bool)>>>;

/// Streams `req`, adding every token to `streamed` and, when given, keeping
/// stream `i`'s entry of `progress` current.
async fn run_tracked(
    mut c: qaq_proto::client::Client,
    req: GenerateRequest,
    streamed: Arc<AtomicU32>,
    progress: Option<(Progress, usize)>,
) -> Result<Run, tonic::Status> {
    let mut s = c.generate(req).await?.into_inner();
    let mut r = Run::default();
    while let Some(m) = s.message().await? {
        streamed.fetch_add(m.token_ids.len() as u32, Ordering::Relaxed);
        if let Some((p, i)) = &progress {
            let e = &mut p.lock().unwrap()[*i];
            e.0.clone_from(&m.worker_id);
            e.1 += m.token_ids.len();
            e.2 = m.finish_reason != 0;
        }
        r.tokens.extend_from_slice(&m.token_ids);
        if r.workers.last() != Some(&m.worker_id) && !m.worker_id.is_empty() {
            r.workers.push(m.worker_id.clone());
        }
        if m.finish_reason != 0 {
            r.finish = m.finish_reason;
            r.completion_tokens = m.usage.map_or(0, |u| u.completion_tokens);
            r.prompt_tokens = m.usage.map_or(0, |u| u.prompt_tokens);
        }
    }
    Ok(r)
}

/// Streams `req`, adding every token to `streamed`.
async fn run(
    c: qaq_proto::client::Client,
    req: GenerateRequest,
    streamed: Arc<AtomicU32>,
) -> Result<Run, tonic::Status> {
    run_tracked(c, req, streamed, None).await
}

/// The worker with the most unfinished streams that already have `min`
/// tokens, once one has at least `streams` of them (at most 120 s).
async fn busiest_streaming_worker(progress: &Progress, only: Option<&str>, streams: usize, min: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut by_worker = std::collections::HashMap::<String, usize>::new();
        for (w, n, done) in progress.lock().unwrap().iter() {
            if *n >= min && !*done && only.is_none_or(|o| o == w) {
                *by_worker.entry(w.clone()).or_default() += 1;
            }
        }
        if let Some((w, n)) = by_worker.into_iter().max_by_key(|(_, n)| *n)
            && n >= streams
        {
            return w;
        }
        assert!(Instant::now() < deadline, "no worker streams {streams} requests: {:?}", progress.lock().unwrap());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The value of a metric line `name value` in a Prometheus text.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{series} missing:\n{text}"))
}

fn prompt(i: usize) -> String {
    let things = ["a lighthouse", "a red fox", "the moon", "a bakery", "a river", "an old map", "a robot", "winter"];
    format!("Write one sentence about {}.", things[i % things.len()])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_mid_run_every_admitted_request_completes_with_unchanged_output() {
    kill9_mid_run(dense).await;
}

/// The same under QAQ (`qaq-tuned`): a migrated stream's new worker feeds
/// the prompt and then the streamed tokens one step each, as the first worker did, so its
/// compressed cache makes the same decisions and the output is unchanged too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_mid_run_under_qaq_the_output_is_unchanged_too() {
    kill9_mid_run(qaq).await;
}

/// 64 greedy streams over 3 workers under `request`'s KV policy; `kill -9` the busiest
/// worker mid-run: every stream completes, equal to the no-fault run.
async fn kill9_mid_run(request: fn(&str, u32) -> GenerateRequest) {
    const DISTINCT: usize = 8;
    const STREAMS: usize = 64;
    const MAX: u32 = 12;
    let _serial = SERIAL.lock().await;
    let cluster = TestCluster::start(3, 1500).await;
    let client = cluster.client().await;

    // The no-fault run: each distinct prompt once.
    let none = Arc::new(AtomicU32::new(0));
    let reference: Vec<Vec<u32>> =
        futures::future::join_all((0..DISTINCT).map(|i| run(client.clone(), request(&prompt(i), MAX), none.clone())))
            .await
            .into_iter()
            .map(|r| r.expect("no-fault run").tokens)
            .collect();
    assert!(reference.iter().all(|t| t.len() == MAX as usize), "{reference:?}");

    // 64 concurrent streams; kill -9 the busiest worker once they all stream.
    let started = Instant::now();
    let streamed = Arc::new(AtomicU32::new(0));
    let progress: Progress = Arc::new(std::sync::Mutex::new(vec![(String::new(), 0, false); STREAMS]));
    let tasks: Vec<_> = (0..STREAMS)
        .map(|i| {
            let (c, req, s, p) =
                (client.clone(), request(&prompt(i % DISTINCT), MAX), streamed.clone(), progress.clone());
            tokio::spawn(run_tracked(c, req, s, Some((p, i))))
        })
        .collect();
    // Mid-run: kill the worker with the most streams already producing tokens.
    let victim_id = busiest_streaming_worker(&progress, None, 4, 2).await;
    let victim = cluster.workers.iter().position(|w| w.name == victim_id).expect("a worker of this cluster");
    let at = streamed.load(Ordering::Relaxed);
    cluster.workers[victim].kill9().expect("kill -9");
    eprintln!("kill -9 {victim_id} after {at} streamed tokens");

    let mut migrated = 0;
    let mut on_victim = 0;
    for (i, t) in tasks.into_iter().enumerate() {
        let r = t.await.unwrap().unwrap_or_else(|e| panic!("stream {i} failed: {e:?}"));
        assert_eq!(r.finish, FinishReason::Length as i32, "stream {i}: {r:?}");
        assert_eq!(r.completion_tokens, MAX, "stream {i}: {r:?}");
        assert_eq!(
            r.tokens,
            reference[i % DISTINCT],
            "stream {i} (workers {:?}) differs from the no-fault run",
            r.workers
        );
        if r.workers.len() > 1 {
            migrated += 1;
        }
        if r.workers.contains(&victim_id) {
            on_victim += 1;
        }
    }
    let text = cluster.metrics().await;
    let migrations = metric(&text, "qaq_coordinator_migrations_total");
    let retries = metric(&text, "qaq_coordinator_retries_total");
    eprintln!(
        "fault run: {STREAMS} admitted, {STREAMS} completed, {migrated} streams migrated mid-stream \
         ({on_victim} touched {victim_id}); coordinator counted {migrations} migrations, {retries} retries; {:?}",
        started.elapsed()
    );
    assert!(migrated >= 1 && migrations >= 1.0, "nothing was migrated");
    assert_eq!(
        metric(&text, "qaq_coordinator_requests_total{outcome=\"ok\",protocol=\"grpc\"}"),
        (DISTINCT + STREAMS) as f64
    );
    for bad in ["error", "unavailable", "aborted", "deadline"] {
        assert_eq!(
            metric(&text, &format!("qaq_coordinator_requests_total{{outcome=\"{bad}\",protocol=\"grpc\"}}")),
            0.0,
            "{bad}"
        );
    }
    cluster.wait_state(|s| s.in_flight == 0, "nothing in flight").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drain_under_load_fails_no_request() {
    const STREAMS: usize = 12;
    const MAX: u32 = 32;
    let _serial = SERIAL.lock().await;
    // A short worker grace: what does not finish in it is migrated.
    let opts = Opts { worker_args: vec!["--shutdown-grace-ms".into(), "150".into()], ..Opts::new(2, 1500) };
    let mut cluster = TestCluster::start_with(opts).await;
    let client = cluster.client().await;
    let streamed = Arc::new(AtomicU32::new(0));
    let progress: Progress = Arc::new(std::sync::Mutex::new(vec![(String::new(), 0, false); STREAMS]));
    let tasks: Vec<_> = (0..STREAMS)
        .map(|i| {
            let (c, req, s, p) = (client.clone(), dense(&prompt(i), MAX), streamed.clone(), progress.clone());
            tokio::spawn(run_tracked(c, req, s, Some((p, i))))
        })
        .collect();
    // SIGTERM w1 while it streams several requests.
    busiest_streaming_worker(&progress, Some("w1"), 3, 1).await;
    cluster.workers[0].terminate().expect("SIGTERM w1");
    let mut moved = 0;
    for (i, t) in tasks.into_iter().enumerate() {
        let r = t.await.unwrap().unwrap_or_else(|e| panic!("stream {i} failed during the drain: {e:?}"));
        assert_eq!((r.finish, r.completion_tokens), (FinishReason::Length as i32, MAX), "stream {i}: {r:?}");
        moved += usize::from(r.workers.len() > 1);
    }
    let exit = tokio::time::timeout(Duration::from_secs(20), cluster.workers[0].wait()).await.expect("w1 exits");
    assert!(exit.unwrap().success(), "w1 exits 0 after its drain");
    cluster.wait_state(|s| !s.workers.iter().any(|w| w.worker_id == "w1"), "w1 deregistered").await;
    let text = cluster.metrics().await;
    eprintln!("drain: {STREAMS} streams completed, {moved} moved off the draining worker");
    assert!(moved >= 1, "a 150 ms grace cannot finish 32 tokens: some streams must have moved");
    assert_eq!(metric(&text, "qaq_coordinator_requests_total{outcome=\"ok\",protocol=\"grpc\"}"), STREAMS as f64);
    // w2 keeps serving.
    let r = run(client.clone(), dense("Hello", 4), streamed.clone()).await.unwrap();
    assert_eq!(r.workers, ["w2"]);
}

/// A drain out of grace parks the KV caches of its running requests; the coordinator
/// migrates them with `kv_source_address`, and the next worker restores the caches
/// instead of prefilling prompt and tokens again. With QAQ, whose widths depend on the
/// cache's whole history, only an exact transfer reproduces the unmigrated greedy output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drain_migrates_qaq_kv_caches_and_the_output_is_unchanged() {
    const STREAMS: usize = 4;
    const MAX: u32 = 40;
    let _serial = SERIAL.lock().await;
    let opts = Opts { worker_args: vec!["--shutdown-grace-ms".into(), "50".into()], ..Opts::new(2, 1500) };
    let mut cluster = TestCluster::start_with(opts).await;
    let client = cluster.client().await;
    let streamed = Arc::new(AtomicU32::new(0));
    // The unmigrated outputs, one request at a time.
    let mut want = Vec::new();
    for i in 0..STREAMS {
        want.push(run(client.clone(), qaq(&prompt(i), MAX), streamed.clone()).await.unwrap().tokens);
    }
    let before = cluster.worker_metrics(1).await;
    let prefilled_before = metric(&before, "qaq_worker_prompt_tokens_total");
    let progress: Progress = Arc::new(std::sync::Mutex::new(vec![(String::new(), 0, false); STREAMS]));
    let tasks: Vec<_> = (0..STREAMS)
        .map(|i| {
            let (c, req, s, p) = (client.clone(), qaq(&prompt(i), MAX), streamed.clone(), progress.clone());
            tokio::spawn(run_tracked(c, req, s, Some((p, i))))
        })
        .collect();
    busiest_streaming_worker(&progress, Some("w1"), 1, 4).await;
    cluster.workers[0].terminate().expect("SIGTERM w1");
    let (mut moved, mut fresh_prompts) = (Vec::new(), 0u32);
    for (i, t) in tasks.into_iter().enumerate() {
        let r = t.await.unwrap().unwrap_or_else(|e| panic!("stream {i} failed during the drain: {e:?}"));
        assert_eq!((r.finish, r.completion_tokens), (FinishReason::Length as i32, MAX), "stream {i}: {r:?}");
        assert_eq!(r.tokens, want[i], "stream {i} (workers {:?}): output changed", r.workers);
        match r.workers.as_slice() {
            [w] if w == "w2" => fresh_prompts += r.prompt_tokens,
            [_, _] => moved.push(i),
            other => assert_eq!(other, ["w1"], "stream {i}"),
        }
    }
    let exit = tokio::time::timeout(Duration::from_secs(40), cluster.workers[0].wait()).await.expect("w1 exits");
    assert!(exit.unwrap().success(), "w1 exits 0 after its drain");
    let text = cluster.worker_metrics(1).await;
    eprintln!("drain: streams {moved:?} moved with their KV caches");
    assert!(!moved.is_empty(), "a 50 ms grace cannot finish {MAX} tokens: some streams must have moved");
    let series = |o: &str| format!("qaq_worker_kv_migrations_total{{direction=\"in\",outcome=\"{o}\"}}");
    assert_eq!(metric(&text, &series("transferred")), moved.len() as f64, "{text}");
    assert_eq!(metric(&text, &series("prefilled")), 0.0);
    assert!(metric(&text, "qaq_worker_kv_migration_bytes_total{direction=\"in\"}") > 0.0);
    // w2 prefilled the prompts of the streams it started, and of each moved stream only
    // the one token its restored cache had not seen yet (not its prompt and tokens again).
    let prefilled = metric(&text, "qaq_worker_prompt_tokens_total") - prefilled_before;
    assert_eq!(prefilled, (fresh_prompts as usize + moved.len()) as f64, "prompt tokens prefilled on w2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_worker_loses_its_lease_and_re_registers() {
    let _serial = SERIAL.lock().await;
    let lease_ms = 1000;
    let cluster = TestCluster::start(1, lease_ms).await;
    let pid = cluster.workers[0].pid;
    qaq_coordinator::process::signal(pid, libc::SIGSTOP).unwrap();
    let stopped = Instant::now();
    cluster.wait_state(|s| s.workers[0].state == WorkerState::Down as i32, "w1 DOWN").await;
    assert!(stopped.elapsed() >= Duration::from_millis(lease_ms / 2), "down before its lease lapsed");
    let text = cluster.metrics().await;
    assert!(text.contains("qaq_coordinator_workers{state=\"down\"} 1"), "{text}");
    qaq_coordinator::process::signal(pid, libc::SIGCONT).unwrap();
    cluster.wait_state(|s| up_count(s) == 1, "w1 UP again after re-registering").await;
    let mut c = cluster.client().await;
    let (text, _) = super::collect(&mut c, super::greedy("Hello", 4)).await.unwrap();
    assert!(!text.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_sigterm_lets_streams_finish_then_exits_0() {
    let _serial = SERIAL.lock().await;
    let mut cluster = TestCluster::start(1, 2000).await;
    let mut c = cluster.client().await;
    let mut s = c.generate(dense("Tell me about the sea.", 16)).await.unwrap().into_inner();
    s.message().await.unwrap().expect("first message");
    cluster.coordinator.terminate().unwrap();
    let mut last = None;
    while let Some(m) = s.message().await.expect("the open stream finishes") {
        last = Some(m);
    }
    assert_eq!(last.unwrap().finish_reason, FinishReason::Length as i32);
    let exit = tokio::time::timeout(Duration::from_secs(15), cluster.coordinator.wait()).await.expect("exits");
    assert!(exit.unwrap().success());
    // Nothing is admitted any more.
    let e = super::collect(&mut c, super::greedy("Hello", 2)).await.unwrap_err();
    assert!(matches!(e.code(), tonic::Code::Unavailable | tonic::Code::Unknown), "{e:?}");
}
