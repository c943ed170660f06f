//! `qaq up`: a local cluster. Starts `qaq-coordinator` (or several, with
//! `--coordinators N`: every worker registers with each) and N `qaq-worker`
//! processes (each in its own process group, so that Ctrl-C reaches only
//! `qaq`), waits for their READY lines and for every worker to be UP on every
//! coordinator, then
//! on Ctrl-C / SIGTERM sends SIGTERM to each child by PID, waits for them
//! (SIGKILL after a grace period) and exits 0.
//!
//! Security options are passed through explicitly: `--api-keys-file` to the
//! coordinator (both fronts then need a key; `qaq up` itself uses `--api-key`,
//! else the file's first key), the registration secret to the coordinator
//! and every worker (in their environment, never on a command line), and
//! `--tls-cert/--tls-key` with the global `--tls-ca` to every process: the
//! coordinator serves its fronts over TLS and dials workers over TLS, the
//! workers serve TLS and verify the coordinator and each other against the CA.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use qaq_coordinator::auth::ApiKeys;
use qaq_coordinator::process::{ReadyChild, StdoutMode, spawn_ready};
use qaq_proto::v1::{ClusterStatusRequest, WorkerState};
use tokio::process::Command;

use crate::{DEFAULT_ADDR, Global};

/// Prefix of the worker's READY line (worker process contract).
const WORKER_READY: &str = "QAQ_WORKER_READY";
/// Time the coordinator gets to print READY.
const COORDINATOR_START: Duration = Duration::from_secs(30);
/// Time a worker gets to load its model and print READY.
const WORKER_START: Duration = Duration::from_secs(300);
/// Time all workers get to appear UP after their READY lines.
const WORKERS_UP: Duration = Duration::from_secs(60);
/// Time each child gets to exit after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Number of worker processes.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub workers: u32,
    /// Number of coordinator processes (replicas): the first listens on --listen (and
    /// --metrics-listen, --http-listen), the others on free ports of the same hosts; every
    /// worker registers with each.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=8))]
    pub coordinators: u32,
    /// Model every worker serves (GGUF file or HF safetensors folder).
    #[arg(long, env = "QAQ_MODEL", default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    pub model: PathBuf,
    /// Client address of the coordinator.
    #[arg(long, default_value = DEFAULT_ADDR)]
    pub listen: String,
    /// Address of the coordinator's Prometheus /metrics endpoint (port 0 picks one).
    #[arg(long)]
    pub metrics_listen: Option<String>,
    /// Address of the coordinator's OpenAI-compatible HTTP API (port 0 picks one).
    #[arg(long)]
    pub http_listen: Option<String>,
    /// Client API keys (one per line): the coordinator's gRPC and HTTP fronts then need one.
    #[arg(long, env = "QAQ_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// Shared secret the workers present to register (prefer the file or the environment).
    #[arg(long, env = "QAQ_REGISTRATION_SECRET", hide_env_values = true)]
    pub registration_secret: Option<String>,
    /// File holding the registration secret (first line).
    #[arg(long, env = "QAQ_REGISTRATION_SECRET_FILE", conflicts_with = "registration_secret")]
    pub registration_secret_file: Option<PathBuf>,
    /// PEM certificate chain (with --tls-key and the global --tls-ca that signed it): TLS
    /// on the coordinator's fronts and between coordinator and workers (every process uses
    /// this certificate, so it must name the hosts they listen on, e.g. 127.0.0.1).
    #[arg(long, env = "QAQ_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "QAQ_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The qaq-worker binary (default: next to this executable).
    #[arg(long, env = "QAQ_WORKER_BIN")]
    pub worker_bin: Option<PathBuf>,
    /// The qaq-coordinator binary (default: next to this executable).
    #[arg(long, env = "QAQ_COORDINATOR_BIN")]
    pub coordinator_bin: Option<PathBuf>,
}

/// `name` in the directory of the running executable.
fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the qaq executable")?;
    Ok(exe.parent().unwrap_or(Path::new(".")).join(name))
}

fn check_file(path: &Path, what: &str, hint: &str) -> anyhow::Result<()> {
    if !path.exists() {
        anyhow::bail!("{what} not found at {} ({hint})", path.display());
    }
    Ok(())
}

/// What `qaq up` passes to its children, read and checked before any starts.
struct Security {
    /// The key `qaq up` itself sends.
    api_key: Option<String>,
    /// The registration secret.
    secret: Option<String>,
    /// `(cert, key, ca, domain)`.
    tls: Option<(PathBuf, PathBuf, PathBuf, Option<String>)>,
}

impl Security {
    fn of(args: &UpArgs, global: &Global<'_>) -> anyhow::Result<Self> {
        let mut api_key = global.api_key.map(str::to_string);
        if let Some(path) = &args.api_keys_file {
            let keys = ApiKeys::load(path)?;
            api_key = api_key.or_else(|| keys.first().map(|k| k.expose().to_string()));
        }
        let secret = match (&args.registration_secret, &args.registration_secret_file) {
            (Some(s), _) => Some(s.trim().to_string()),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("--registration-secret-file: cannot read {}", path.display()))?
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_string(),
            ),
            (None, None) => None,
        };
        if secret.as_deref() == Some("") {
            anyhow::bail!("--registration-secret: must not be empty");
        }
        let tls = match (&args.tls_cert, &args.tls_key, global.tls_ca) {
            (Some(cert), Some(key), Some(ca)) => {
                Some((cert.clone(), key.clone(), ca.to_path_buf(), global.tls_domain.map(str::to_string)))
            }
            (Some(_), _, None) => anyhow::bail!(
                "--tls-cert needs --tls-ca (the CA that signed it): the workers and qaq itself verify the coordinator against it"
            ),
            _ => None,
        };
        Ok(Self { api_key, secret, tls })
    }

    /// The flags and environment of the coordinator.
    fn coordinator(&self, cmd: &mut Command) {
        if let Some(secret) = &self.secret {
            cmd.env("QAQ_REGISTRATION_SECRET", secret).env_remove("QAQ_REGISTRATION_SECRET_FILE");
        }
        if let Some((cert, key, ca, domain)) = &self.tls {
            cmd.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key).arg("--worker-tls-ca").arg(ca);
            if let Some(d) = domain {
                cmd.args(["--worker-tls-domain", d]);
            }
        }
    }

    /// The flags and environment of a worker.
    fn worker(&self, cmd: &mut Command) {
        if let Some(secret) = &self.secret {
            cmd.env("QAQ_REGISTRATION_SECRET", secret);
        }
        if let Some((cert, key, ca, domain)) = &self.tls {
            cmd.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key);
            cmd.arg("--coordinator-ca").arg(ca).arg("--peer-ca").arg(ca);
            if let Some(d) = domain {
                cmd.args(["--coordinator-tls-domain", d]);
            }
        }
    }
}

pub async fn run(args: UpArgs, global: Global<'_>) -> anyhow::Result<ExitCode> {
    let coordinator_bin = match &args.coordinator_bin {
        Some(p) => p.clone(),
        None => sibling("qaq-coordinator")?,
    };
    let worker_bin = match &args.worker_bin {
        Some(p) => p.clone(),
        None => sibling("qaq-worker")?,
    };
    check_file(
        &coordinator_bin,
        "qaq-coordinator",
        "build it with `cargo build --release`, or pass --coordinator-bin",
    )?;
    check_file(&worker_bin, "qaq-worker", "build it with `cargo build --release`, or pass --worker-bin")?;
    check_file(&args.model, "model", "run scripts/fetch-model.sh, or pass --model / set QAQ_MODEL")?;
    let security = Security::of(&args, &global)?;

    // Handlers first: a Ctrl-C during start-up must still stop the children
    // (they live in their own process groups and would not see it).
    let mut signals = Signals::new()?;
    let mut children: Vec<ReadyChild> = Vec::new();
    let started = tokio::select! {
        r = start(&args, &coordinator_bin, &worker_bin, &security, &mut children) => r,
        name = signals.recv() => Err(anyhow::anyhow!("{name} during start-up")),
    };
    let outcome = match started {
        Err(e) => Err(e),
        Ok(()) => wait_for_stop(&mut children, &mut signals).await,
    };
    stop_all(&mut children).await;
    outcome
}

/// SIGINT and SIGTERM, registered once.
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
        })
    }

    /// Waits for either; returns its name.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "Ctrl-C",
            _ = self.term.recv() => "SIGTERM",
        }
    }
}

async fn start(
    args: &UpArgs,
    coordinator_bin: &Path,
    worker_bin: &Path,
    security: &Security,
    children: &mut Vec<ReadyChild>,
) -> anyhow::Result<()> {
    let scheme = if security.tls.is_some() { "https" } else { "http" };
    // Coordinator i (0-based): the given addresses for the first, their hosts with port 0
    // for the others.
    let listen_of = |addr: &str, i: u32| if i == 0 { addr.to_string() } else { any_port(addr) };
    let mut coordinators = Vec::new();
    for i in 0..args.coordinators {
        let mut cmd = Command::new(coordinator_bin);
        cmd.arg("--listen").arg(listen_of(&args.listen, i));
        if let Some(m) = &args.metrics_listen {
            cmd.arg("--metrics-listen").arg(listen_of(m, i));
        }
        if let Some(h) = &args.http_listen {
            cmd.arg("--http-listen").arg(listen_of(h, i));
        }
        if let Some(keys) = &args.api_keys_file {
            cmd.arg("--api-keys-file").arg(keys);
        }
        security.coordinator(&mut cmd);
        cmd.process_group(0);
        let name = if i == 0 { "coordinator".to_string() } else { format!("coordinator-{}", i + 1) };
        let c = spawn_ready(cmd, &name, qaq_coordinator::READY_PREFIX, COORDINATOR_START, StdoutMode::Prefixed).await?;
        let grpc = c.ready.get("grpc").context("coordinator READY line has no grpc=")?.to_string();
        coordinators.push(grpc);
        children.push(c);
    }
    let grpc = coordinators[0].clone();
    let metrics = children[0].ready.get("metrics").map(str::to_string);
    let http = children[0].ready.get("http").map(|h| format!("{scheme}://{h}/v1"));
    let coordinator_list = coordinators.join(",");

    let spawns = (1..=args.workers).map(|i| {
        let name = format!("worker-{i}");
        let mut cmd = Command::new(worker_bin);
        cmd.arg("serve")
            .arg("--model")
            .arg(&args.model)
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .args(["--coordinator", &coordinator_list])
            .args(["--worker-id", &name])
            .process_group(0);
        security.worker(&mut cmd);
        async move { spawn_ready(cmd, &name, WORKER_READY, WORKER_START, StdoutMode::Prefixed).await }
    });
    let mut failure = None;
    for r in futures::future::join_all(spawns).await {
        match r {
            Ok(c) => children.push(c),
            Err(e) => failure = failure.or(Some(e)),
        }
    }
    if let Some(e) = failure {
        return Err(e.into());
    }

    for addr in &coordinators {
        wait_workers_up(addr, security.api_key.as_deref(), args.workers as usize).await?;
    }
    if coordinators.len() > 1 {
        println!("qaq coordinators (every worker registered with each): {}", coordinators.join(" "));
    }
    let metrics = metrics.map_or_else(|| "metrics off".to_string(), |m| format!("metrics http://{m}/metrics"));
    let http_part = http.as_deref().map(|h| format!(", http {h}")).unwrap_or_default();
    println!("qaq cluster ready: coordinator {grpc} ({metrics}){http_part}, {} workers", args.workers);
    for c in children.iter().skip(1) {
        let http = c.ready.get("http").map(|h| format!(" http {scheme}://{h}/v1")).unwrap_or_default();
        println!(
            "  {} pid {} grpc {} metrics {}{http}",
            c.name,
            c.pid,
            c.ready.get("grpc").unwrap_or("-"),
            c.ready.get("metrics").unwrap_or("-")
        );
    }
    println!("try: qaq generate --addr {grpc} \"Once upon a time\"   (Ctrl-C here stops the cluster)");
    if let Some(h) = http {
        println!(
            "     curl -N {h}/chat/completions -H 'content-type: application/json' \\\n       \
             -d '{{\"messages\": [{{\"role\": \"user\", \"content\": \"Hi\"}}], \"stream\": true}}'"
        );
    }
    Ok(())
}

/// `addr` (`host:port`) with port 0 (a free port on the same host).
fn any_port(addr: &str) -> String {
    match addr.rsplit_once(':') {
        Some((host, _)) => format!("{host}:0"),
        None => format!("{addr}:0"),
    }
}

/// Polls ClusterStatus until `n` workers are UP.
async fn wait_workers_up(addr: &str, api_key: Option<&str>, n: usize) -> anyhow::Result<()> {
    let mut client = crate::connect(addr, api_key).await?;
    let deadline = Instant::now() + WORKERS_UP;
    loop {
        let up = match client.cluster_status(ClusterStatusRequest {}).await {
            Ok(s) => s.into_inner().workers.iter().filter(|w| w.state == WorkerState::Up as i32).count(),
            Err(e) => anyhow::bail!("ClusterStatus: {}", crate::status_text(&e)),
        };
        if up >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!("only {up} of {n} workers registered within {} s", WORKERS_UP.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits for Ctrl-C / SIGTERM (exit 0) or a child's unexpected exit (error).
async fn wait_for_stop(children: &mut [ReadyChild], signals: &mut Signals) -> anyhow::Result<ExitCode> {
    let mut check = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            name = signals.recv() => {
                eprintln!("qaq: {name}: stopping the cluster");
                return Ok(ExitCode::SUCCESS);
            }
            _ = check.tick() => {
                for c in children.iter_mut() {
                    if let Some(status) = c.exited() {
                        anyhow::bail!("{} (pid {}) exited unexpectedly: {status}", c.name, c.pid);
                    }
                }
            }
        }
    }
}

/// SIGTERM to every child (workers first), then reap them all.
async fn stop_all(children: &mut [ReadyChild]) {
    for c in children.iter().rev() {
        let _ = c.terminate();
    }
    let stops = children.iter_mut().rev().map(|c| async move {
        let status = c.shutdown(STOP_GRACE).await;
        (c.name.clone(), c.pid, status)
    });
    for (name, pid, status) in futures::future::join_all(stops).await {
        match status {
            Some(s) if s.success() => {}
            Some(s) => eprintln!("qaq: {name} (pid {pid}) exited with {s}"),
            None => eprintln!("qaq: {name} (pid {pid}) did not stop within {} s; killed", STOP_GRACE.as_secs()),
        }
    }
}
