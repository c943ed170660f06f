//! `qaq-worker`: serve a model, or benchmark it in-process.

use std::io::Write;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use qaq_worker::{config, prom, server};
use qaq_worker_cli::{bench, eval};
use tokio::net::TcpListener;

#[derive(Parser, Debug)]
#[command(name = "qaq-worker", version, about = "qaq worker: serves one model on one device")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Serve the model over gRPC (and register with a coordinator).
    Serve(Box<config::ServeArgs>),
    /// Measure decode throughput in-process.
    Bench(bench::BenchArgs),
    /// Evaluate KV policies on real data (accuracy, perplexity, retrieval vs compression).
    Eval(Box<eval::EvalArgs>),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("QAQ_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.cmd {
        Cmd::Serve(args) => rt.block_on(serve((*args).validate()?)),
        Cmd::Bench(args) => bench::run(args),
        Cmd::Eval(args) => eval::run(*args),
    }
}

async fn serve(cfg: config::WorkerConfig) -> anyhow::Result<()> {
    cfg.device.check()?;
    let (path, device) = (cfg.model.clone(), cfg.device);
    let started = std::time::Instant::now();
    let loaded = tokio::task::spawn_blocking(move || device.load_model(&path)).await??;
    tracing::info!(model = %loaded.name, device = %loaded.model.device(), secs = started.elapsed().as_secs_f32(), "model loaded");
    let listener = TcpListener::bind(cfg.listen).await?;
    let grpc = listener.local_addr()?;
    let metrics = match cfg.metrics_listen {
        Some(a) => {
            let l = TcpListener::bind(a).await?;
            let addr = l.local_addr()?.to_string();
            tokio::spawn(qaq_proto::metrics_http::serve(l, prom::install_recorder()?, std::future::pending()));
            addr
        }
        None => String::new(),
    };
    let shown = if metrics.is_empty() { "-" } else { &metrics };
    println!("QAQ_WORKER_READY grpc={grpc} metrics={shown}");
    std::io::stdout().flush()?;
    Ok(server::run(listener, metrics, Arc::new(loaded), cfg, shutdown_signal()).await?)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
