//! Authentication, registration secret, secrets kept out of logs and
//! metrics, TLS, and admission (queue full, queued deadline), with real
//! processes.

use std::time::{Duration, Instant};

use qaq_proto::v1::registry_client::RegistryClient;
use qaq_proto::v1::{AbortRequest, FinishReason, ModelInfo, RegisterRequest};
use tonic::{Code, Request};

use super::harness::{Opts, SERIAL, TestCluster};
use super::{collect, greedy, long_running};

const API_KEY: &str = "qaq-test-key-7f3a9c2e51";
const SECRET: &str = "qaq-test-secret-b84d06e1";

fn temp(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("qaq-coord-{}-{name}", std::process::id()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_and_registration_secret() {
    let _serial = SERIAL.lock().await;
    let keys = temp("keys");
    std::fs::write(&keys, format!("# test keys\n{API_KEY}\nother-key-0000\n")).unwrap();
    let stderr = temp("stderr");
    let secret_file = temp("secret");
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    let opts = Opts {
        coordinator_args: vec![
            "--api-keys-file".into(),
            keys.display().to_string(),
            "--registration-secret-file".into(),
            secret_file.display().to_string(),
        ],
        worker_args: vec!["--registration-secret".into(), SECRET.into()],
        coordinator_stderr: Some(stderr.clone()),
        coordinator_log: Some("debug".into()),
        api_key: Some(API_KEY.into()),
        ..Opts::new(1, 2000)
    };
    let cluster = TestCluster::start_with(opts).await;

    // No key, wrong key: UNAUTHENTICATED; the right key works.
    for key in [None, Some("wrong-key"), Some("")] {
        let err = collect(&mut cluster.client_with_key(key).await, greedy("Hello", 2)).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{key:?}: {err:?}");
    }
    let (text, _) = collect(&mut cluster.client().await, greedy("Hello", 4)).await.expect("right key");
    assert!(!text.is_empty());
    assert!(collect(&mut cluster.client_with_key(Some("other-key-0000")).await, greedy("Hi", 2)).await.is_ok());

    // A rogue worker with a wrong (or no) secret is refused and never listed.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", cluster.grpc())).unwrap();
    let mut registry = RegistryClient::new(channel.connect().await.unwrap());
    for secret in ["not-the-secret", ""] {
        let rogue = RegisterRequest {
            worker_id: "rogue".into(),
            address: "127.0.0.1:1".into(),
            model: Some(ModelInfo { name: "evil".into(), context_length: 8192, vocab_size: 10, ..Default::default() }),
            secret: secret.into(),
            ..Default::default()
        };
        let err = registry.register(rogue).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    }
    let status = cluster.status().await;
    assert_eq!(status.workers.iter().map(|w| w.worker_id.as_str()).collect::<Vec<_>>(), ["w1"]);

    // Counted, and no secret in the metrics or the (debug-level) log.
    let metrics = cluster.metrics().await;
    assert!(metrics.contains("qaq_coordinator_rejections_total{reason=\"unauthenticated\"} 3"), "{metrics}");
    assert!(metrics.contains("qaq_coordinator_rejections_total{reason=\"bad_secret\"} 2"), "{metrics}");
    let log = std::fs::read_to_string(&stderr).unwrap();
    let _ = std::fs::remove_file(&stderr);
    let _ = std::fs::remove_file(&keys);
    let _ = std::fs::remove_file(&secret_file);
    assert!(log.contains("refused a worker"), "the refusal is logged:\n{log}");
    for secret in [API_KEY, SECRET, "other-key-0000"] {
        assert!(!log.contains(secret), "a secret appears in the coordinator's log");
        assert!(!metrics.contains(secret), "a secret appears in the metrics");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_is_resource_exhausted_and_queued_requests_keep_deadlines() {
    let _serial = SERIAL.lock().await;
    let opts = Opts {
        coordinator_args: ["--max-per-worker", "1", "--max-queue", "1"].map(String::from).to_vec(),
        ..Opts::new(1, 2000)
    };
    let cluster = TestCluster::start_with(opts).await;
    let mut c = cluster.client().await;
    // r1 holds the only slot.
    let mut r1 = c.generate(long_running("hold-1")).await.unwrap().into_inner();
    r1.message().await.unwrap().expect("r1 streams");
    // r2 waits in the queue with a 400 ms deadline ...
    let mut c2 = c.clone();
    let queued = tokio::spawn(async move {
        // The header alone: the coordinator enforces it, not the client.
        let mut req = Request::new(greedy("Hello", 2));
        req.metadata_mut().insert("grpc-timeout", "400m".parse().unwrap());
        let t0 = Instant::now();
        (collect(&mut c2, req).await, t0.elapsed())
    });
    cluster.wait_state(|_| true, "").await;
    let wait_queued = Instant::now();
    while !cluster.metrics().await.contains("qaq_coordinator_queue_depth 1") {
        assert!(wait_queued.elapsed() < Duration::from_secs(10), "r2 never queued");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // ... so r3 finds the queue full: RESOURCE_EXHAUSTED with a retry hint.
    let err = collect(&mut c, greedy("Hello", 2)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let hint: u64 = err.metadata().get("retry-after-ms").expect("retry-after-ms").to_str().unwrap().parse().unwrap();
    assert!((100..=30_000).contains(&hint), "{hint}");
    let (r2, waited) = queued.await.unwrap();
    assert_eq!(r2.unwrap_err().code(), Code::DeadlineExceeded);
    assert!(waited < Duration::from_secs(2), "queued deadline honoured late: {waited:?}");
    // r4 queues, then runs once r1 is aborted.
    let mut c4 = c.clone();
    let r4 = tokio::spawn(async move { collect(&mut c4, greedy("Hello", 3)).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(c.abort(AbortRequest { request_id: "hold-1".into() }).await.unwrap().into_inner().found);
    while let Some(m) = r1.message().await.unwrap() {
        if m.finish_reason != 0 {
            assert_eq!(m.finish_reason, FinishReason::Aborted as i32);
        }
    }
    let (text, _) = r4.await.unwrap().expect("queued request runs after the slot frees");
    assert!(!text.is_empty());
    let m = cluster.metrics().await;
    for line in [
        "qaq_coordinator_rejections_total{reason=\"queue_full\"} 1",
        "qaq_coordinator_rejections_total{reason=\"queue_timeout\"} 1",
        "qaq_coordinator_requests_total{outcome=\"rejected\",protocol=\"grpc\"} 1",
        "qaq_coordinator_queue_depth 0",
    ] {
        assert!(m.contains(line), "{line} missing:\n{m}");
    }
}

/// A test CA and a certificate it signed for `localhost` and 127.0.0.1
/// (openssl CLI): (ca.pem, cert.pem, key.pem).
pub fn certificates(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let p = |n: &str| dir.join(n);
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl must be installed for the TLS test");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &["-days", "1", "-subj", "/CN=qaq-test-ca", "-keyout", "ca.key", "-out", "ca.pem"],
        ]
        .concat(),
    );
    openssl(&[&["req"][..], &ec, &["-subj", "/CN=localhost", "-keyout", "key.pem", "-out", "leaf.csr"]].concat());
    std::fs::write(p("leaf.ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "leaf.ext",
        "-out",
        "cert.pem",
    ]);
    (p("ca.pem"), p("cert.pem"), p("key.pem"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_on_the_client_api_and_the_internal_protocol() {
    let _serial = SERIAL.lock().await;
    let dir = temp("tls");
    std::fs::create_dir_all(&dir).unwrap();
    let (ca_path, cert, key) = certificates(&dir);
    let (ca_s, cert_s, key_s) = (ca_path.display().to_string(), cert.display().to_string(), key.display().to_string());
    let ca = std::fs::read(&ca_path).unwrap();
    let opts = Opts {
        coordinator_args: ["--tls-cert", &cert_s, "--tls-key", &key_s, "--worker-tls-ca", &ca_s]
            .map(String::from)
            .to_vec(),
        worker_args: ["--tls-cert", &cert_s, "--tls-key", &key_s, "--coordinator-ca", &ca_s].map(String::from).to_vec(),
        client_tls: Some(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(ca))
                .domain_name("localhost"),
        ),
        ..Opts::new(1, 2000)
    };
    let cluster = TestCluster::start_with(opts).await;
    let (text, msgs) = collect(&mut cluster.client().await, greedy("Hello", 4)).await.expect("generate over TLS");
    assert!(!text.is_empty() && msgs.last().unwrap().worker_id == "w1");
    // Plaintext is refused.
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{}", cluster.grpc())).unwrap();
    let refused = match plain.connect().await {
        Err(_) => true,
        Ok(ch) => {
            let mut c = qaq_proto::v1::generation_client::GenerationClient::new(ch);
            c.list_models(qaq_proto::v1::ListModelsRequest {}).await.is_err()
        }
    };
    assert!(refused, "plaintext accepted by a TLS coordinator");
    // The CLI connects with --tls-ca.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_qaq"))
        .args(["status", "--addr", &cluster.grpc(), "--tls-ca", &ca_s, "--tls-domain", "localhost"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.contains(" UP "), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}
