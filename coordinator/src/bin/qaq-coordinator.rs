//! `qaq-coordinator`: parses flags, installs the Prometheus recorder, binds
//! the listeners, prints the READY line and runs the library until SIGINT or
//! SIGTERM.

use std::io::Write;

use anyhow::Context;
use clap::Parser;
use qaq_coordinator::{Args, Config, Listeners, metrics, ready_line};
use qaq_proto::metrics_http;
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("QAQ_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let config = Config::try_from(&args)?;
    // What is on, never the secrets themselves.
    let config_summary =
        (config.api_keys.as_ref().map_or(0, |k| k.len()), config.registration_secret.is_some(), config.tls.is_some());

    let listener = TcpListener::bind(args.listen).await.with_context(|| format!("binding --listen {}", args.listen))?;
    let grpc_addr = listener.local_addr()?;
    let http = match args.http_listen {
        None => None,
        Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| format!("binding --http-listen {addr}"))?),
    };
    let http_addr = http.as_ref().map(TcpListener::local_addr).transpose()?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let metrics_addr = match args.metrics_listen {
        None => None,
        Some(addr) => {
            let handle = metrics::install_prometheus().context("installing the Prometheus recorder")?;
            let l = TcpListener::bind(addr).await.with_context(|| format!("binding --metrics-listen {addr}"))?;
            let bound = l.local_addr()?;
            let mut rx = stop_rx.clone();
            tokio::spawn(metrics_http::serve(l, handle, async move {
                let _ = rx.wait_for(|s| *s).await;
            }));
            Some(bound)
        }
    };

    let server = tokio::spawn(qaq_coordinator::run(Listeners { grpc: listener, http }, config, {
        let mut rx = stop_rx;
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    }));
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", ready_line(grpc_addr, metrics_addr, http_addr))?;
        out.flush()?;
    }
    tracing::info!(
        grpc = %grpc_addr,
        metrics = ?metrics_addr,
        http = ?http_addr,
        placement = ?args.placement,
        api_keys = config_summary.0,
        registration_secret = config_summary.1,
        tls = config_summary.2,
        "coordinator serving"
    );

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut server = server;
    tokio::select! {
        r = &mut server => return Ok(r.context("server task")??),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
    }
    let _ = stop_tx.send(true);
    server.await.context("server task")??;
    Ok(())
}
