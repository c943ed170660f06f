//! `qaq`: the command-line client of a qaq cluster.
//!
//! - `qaq up`: starts a coordinator and N workers locally (see [`up`]).
//! - `qaq generate`: streams one generation to the terminal (see [`generate`]).
//! - `qaq status`: prints the workers and their load (see [`status`]).
//! - `qaq bench`: gRPC load generator, coordinator vs direct worker (see [`bench`]).

mod bench;
mod generate;
mod status;
mod up;

use clap::{Parser, Subcommand};
use qaq_proto::tls::ClientTls;

/// Default coordinator address of every subcommand.
const DEFAULT_ADDR: &str = "127.0.0.1:50051";

#[derive(Debug, Parser)]
#[command(name = "qaq", version, about = "qaq: run and query a qaq LLM serving cluster")]
struct Cli {
    /// API key sent as `authorization: Bearer <key>`.
    #[arg(long, env = "QAQ_API_KEY", global = true, hide_env_values = true)]
    api_key: Option<String>,
    /// PEM CA certificate: connect to the coordinator over TLS, verifying it against this CA.
    #[arg(long, env = "QAQ_TLS_CA", global = true)]
    tls_ca: Option<std::path::PathBuf>,
    /// Server name expected in the coordinator's certificate (default: the host of --addr).
    #[arg(long, env = "QAQ_TLS_DOMAIN", global = true)]
    tls_domain: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a coordinator and N worker processes on this machine (Ctrl-C stops them).
    Up(up::UpArgs),
    /// Stream a generation to the terminal.
    Generate(generate::GenerateArgs),
    /// Print the cluster's workers and their load.
    Status(status::StatusArgs),
    /// Load-test a coordinator (optionally side by side with one worker directly).
    Bench(bench::BenchArgs),
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("QAQ_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Some(ca) = &cli.tls_ca {
        match std::fs::read(ca) {
            Ok(pem) => {
                let _ = TLS.set(ClientTls::from_pem(pem, cli.tls_domain.clone()));
            }
            Err(e) => {
                eprintln!("qaq: error: --tls-ca: cannot read {}: {e}", ca.display());
                return std::process::ExitCode::FAILURE;
            }
        }
    }
    let api_key = cli.api_key.as_deref();
    let global = Global { api_key, tls_ca: cli.tls_ca.as_deref(), tls_domain: cli.tls_domain.as_deref() };
    let result = match cli.command {
        Command::Up(a) => up::run(a, global).await,
        Command::Generate(a) => generate::run(a, api_key).await,
        Command::Status(a) => status::run(a, api_key).await,
        Command::Bench(a) => bench::run(a, api_key).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("qaq: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The global options, as given.
#[derive(Debug, Clone, Copy)]
struct Global<'a> {
    /// `--api-key`.
    api_key: Option<&'a str>,
    /// `--tls-ca`.
    tls_ca: Option<&'a std::path::Path>,
    /// `--tls-domain`.
    tls_domain: Option<&'a str>,
}

/// `--tls-ca` (PEM) and `--tls-domain`, set once by `main`.
static TLS: std::sync::OnceLock<ClientTls> = std::sync::OnceLock::new();

/// Connects to a coordinator's client API (over TLS with `--tls-ca`), with a readable error.
async fn connect(addr: &str, api_key: Option<&str>) -> anyhow::Result<qaq_proto::client::Client> {
    let Some(tls) = TLS.get() else {
        return qaq_proto::client::connect(addr, api_key)
            .await
            .map_err(|e| anyhow::anyhow!("cannot connect to {addr}: {e}"));
    };
    let channel = qaq_proto::tls::endpoint(addr, Some(&tls.client_config(addr)))?
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to {addr} over TLS: {e}"))?;
    let key = qaq_proto::client::ApiKey::new(api_key).map_err(|s| anyhow::anyhow!("{}", s.message()))?;
    Ok(qaq_proto::v1::generation_client::GenerationClient::with_interceptor(channel, key))
}

/// `code: message` of a gRPC status.
fn status_text(s: &tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_subcommands_and_global_api_key() {
        let c = Cli::try_parse_from(["qaq", "status", "--api-key", "k"]).unwrap();
        assert_eq!(c.api_key.as_deref(), Some("k"));
        assert!(matches!(c.command, Command::Status(_)));
        let c = Cli::try_parse_from(["qaq", "generate", "--max-new-tokens", "8", "--stop", "a", "--stop", "b", "Hi"])
            .unwrap();
        match c.command {
            Command::Generate(g) => {
                assert_eq!(g.prompt, "Hi");
                assert_eq!(g.stop, ["a", "b"]);
                assert_eq!(g.max_new_tokens, Some(8));
            }
            other => panic!("{other:?}"),
        }
        let c = Cli::try_parse_from(["qaq", "up", "--workers", "3"]).unwrap();
        match c.command {
            Command::Up(u) => assert_eq!(u.workers, 3),
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from(["qaq", "generate"]).is_err(), "prompt is required");
        assert!(Cli::try_parse_from(["qaq", "up", "--workers", "0"]).is_err());
    }
}
