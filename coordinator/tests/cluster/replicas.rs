//! No single point of failure: two coordinators, three workers registered
//! with both, clients of the SDK's `Client::connect_many` spreading streams
//! over both. `kill -9` one coordinator mid-stream: every stream resumes on
//! the other with its tokens so far and ends equal to the no-fault run;
//! requests started after the kill succeed; the coordinator restarted on its
//! address sees every worker again within two heartbeat intervals.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use qaq_coordinator::process::{StdoutMode, spawn_ready};
use qaq_proto::client::{Client, Replicas};
use qaq_proto::v1::{ClusterStatusRequest, FinishReason, GenerateRequest};

use super::faults::metric;
use super::harness::{Opts, SERIAL, TestCluster, WORKER_READY, grpc_of, start_coordinator, up_count};

const LEASE_MS: u64 = 1500;
/// The coordinators' heartbeat interval (the harness sets a fifth of the lease).
const INTERVAL: Duration = Duration::from_millis(LEASE_MS / 5);

fn prompt(i: usize) -> String {
    let things = ["a lighthouse", "a red fox", "the moon", "a bakery", "a river", "an old map", "a robot", "winter"];
    format!("Write one sentence about {}.", things[i % things.len()])
}

/// A greedy request under the workers' default KV policy that always runs `n` tokens.
fn greedy(i: usize, n: u32) -> GenerateRequest {
    GenerateRequest { prompt: prompt(i), max_new_tokens: Some(n), ignore_eos: true, ..Default::default() }
}

/// What one stream produced: its tokens, finish reason and usage.
#[derive(Debug, Default)]
struct Run {
    tokens: Vec<u32>,
    finish: i32,
    completion_tokens: u32,
}

/// Streams `req` through `replicas`, keeping `progress` (tokens so far) current.
async fn run(replicas: Replicas, req: GenerateRequest, progress: Option<(Arc<Mutex<Vec<usize>>>, usize)>) -> Run {
    let mut s = replicas.generate(req);
    let mut r = Run::default();
    while let Some(m) = s.next().await {
        let m = m.unwrap_or_else(|e| panic!("stream failed: {:?}: {}", e.code(), e.message()));
        r.tokens.extend_from_slice(&m.token_ids);
        if let Some((p, i)) = &progress {
            p.lock().unwrap()[*i] = r.tokens.len();
        }
        if m.finish_reason != 0 {
            r.finish = m.finish_reason;
            r.completion_tokens = m.usage.map_or(0, |u| u.completion_tokens);
        }
    }
    r
}

/// UP workers in the registry of the coordinator at `addr`.
async fn up_at(addr: &str) -> usize {
    let mut c = qaq_proto::client::connect(addr, None).await.expect("connect");
    up_count(&c.cluster_status(ClusterStatusRequest {}).await.expect("ClusterStatus").into_inner())
}

/// How long until every coordinator at `addrs` has `n` workers UP (at most 10 s).
async fn until_all_up(addrs: &[String], n: usize) -> Duration {
    let started = Instant::now();
    for addr in addrs {
        while up_at(addr).await < n {
            assert!(started.elapsed() < Duration::from_secs(10), "{addr} never saw {n} workers UP");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_a_coordinator_mid_stream_every_sdk_stream_resumes_on_the_other_unchanged() {
    const DISTINCT: usize = 8;
    const STREAMS: usize = 48;
    const MAX: u32 = 48;
    let _serial = SERIAL.lock().await;

    // Two coordinators, then three workers registering with both.
    let mut cluster = TestCluster::start_with(Opts { coordinators: 2, ..Opts::new(0, LEASE_MS) }).await;
    let addrs = cluster.coordinator_addrs();
    let starts =
        (1..=3).map(|i| {
            let cmd = cluster.worker_command(&format!("w{i}"), &[]);
            async move {
                spawn_ready(cmd, &format!("w{i}"), WORKER_READY, Duration::from_secs(180), StdoutMode::Discard).await
            }
        });
    for w in futures::future::join_all(starts).await {
        cluster.workers.push(w.expect("worker starts"));
    }
    let registered = until_all_up(&addrs, 3).await;
    eprintln!("every worker UP on both coordinators {registered:?} after the last worker's READY line");
    assert!(registered <= 2 * INTERVAL, "took {registered:?}, more than two heartbeat intervals ({INTERVAL:?} each)");
    for i in 0..3 {
        let text = cluster.worker_metrics(i).await;
        assert_eq!(metric(&text, "qaq_worker_coordinators{state=\"registered\"}"), 2.0, "w{}", i + 1);
    }

    let replicas = Client::connect_many(&addrs, None).await.expect("SDK client");
    // The no-fault run: each distinct prompt once.
    let reference: Vec<Vec<u32>> =
        futures::future::join_all((0..DISTINCT).map(|i| run(replicas.clone(), greedy(i, MAX), None)))
            .await
            .into_iter()
            .map(|r| r.tokens)
            .collect();
    assert!(reference.iter().all(|t| t.len() == MAX as usize), "{reference:?}");
    assert_eq!(replicas.resumed(), 0);

    // 48 concurrent streams, spread over both coordinators in turn; kill -9 the
    // second coordinator once a third of them are mid-stream.
    let progress = Arc::new(Mutex::new(vec![0usize; STREAMS]));
    let tasks: Vec<_> = (0..STREAMS)
        .map(|i| tokio::spawn(run(replicas.clone(), greedy(i % DISTINCT, MAX), Some((progress.clone(), i)))))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let p = progress.lock().unwrap().clone();
        let midway = p.iter().filter(|&&n| n >= 1 && n < MAX as usize).count();
        let finished = p.iter().filter(|&&n| n >= MAX as usize).count();
        if midway >= STREAMS / 3 {
            eprintln!("kill -9 the second coordinator: {midway} streams mid-stream, {finished} finished");
            break;
        }
        assert!(Instant::now() < deadline, "streams never all started: {p:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let victim = cluster.replicas.remove(0);
    let victim_addr = grpc_of(&victim);
    victim.kill9().expect("kill -9 a coordinator");

    for (i, t) in tasks.into_iter().enumerate() {
        let r = t.await.expect("stream task");
        assert_eq!(r.finish, FinishReason::Length as i32, "stream {i}: {r:?}");
        assert_eq!(r.completion_tokens, MAX, "stream {i}: {r:?}");
        assert_eq!(r.tokens, reference[i % DISTINCT], "stream {i} differs from the no-fault run");
    }
    let resumed = replicas.resumed();
    eprintln!("{STREAMS} streams completed, {resumed} of them resumed on the other coordinator");
    assert!(resumed >= 1, "no stream was resumed: the kill came too late");

    // Requests started after the kill all succeed (half start at the dead coordinator).
    let after: Vec<Run> =
        futures::future::join_all((0..DISTINCT).map(|i| run(replicas.clone(), greedy(i, MAX), None))).await;
    for (i, r) in after.iter().enumerate() {
        assert_eq!(r.tokens, reference[i], "request {i} after the kill");
    }
    // The workers see one coordinator gone.
    for i in 0..3 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = cluster.worker_metrics(i).await;
            let (r, u) = (
                metric(&text, "qaq_worker_coordinators{state=\"registered\"}"),
                metric(&text, "qaq_worker_coordinators{state=\"unreachable\"}"),
            );
            if (r, u) == (1.0, 1.0) {
                break;
            }
            assert!(Instant::now() < deadline, "w{}: registered {r}, unreachable {u}", i + 1);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // The coordinator restarted on the same address sees every worker within two intervals.
    let restarted = start_coordinator(&cluster.opts, &victim_addr).await;
    let seen = until_all_up(std::slice::from_ref(&victim_addr), 3).await;
    eprintln!("restarted coordinator saw all 3 workers UP {seen:?} after its READY line");
    assert!(seen <= 2 * INTERVAL, "took {seen:?}, more than two heartbeat intervals ({INTERVAL:?} each)");
    cluster.replicas.push(restarted);
    let workers: HashSet<usize> = [up_at(&addrs[0]).await, up_at(&addrs[1]).await].into();
    assert_eq!(workers, HashSet::from([3]));
}
