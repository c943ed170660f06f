//! `qaq`: the command-line client of a qaq cluster.
//!
//! - `qaq up`: starts a coordinator and N workers locally (see [`up`]).
//! - `qaq generate`: streams one generation to the terminal (see [`generate`]).
//! - `qaq status`: prints the workers and their load (see [`status`]).

mod generate;
mod status;
mod up;

use clap::{Parser, Subcommand};

/// Default coordinator address of every subcommand.
const DEFAULT_ADDR: &str = "127.0.0.1:50051";

#[derive(Debug, Parser)]
#[command(name = "qaq", version, about = "qaq: run and query a qaq LLM serving cluster")]
struct Cli {
    /// API key sent as `authorization: Bearer <key>`.
    #[arg(long, env = "QAQ_API_KEY", global = true, hide_env_values = true)]
    api_key: Option<String>,
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
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("QAQ_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let api_key = cli.api_key.as_deref();
    let result = match cli.command {
        Command::Up(a) => up::run(a, api_key).await,
        Command::Generate(a) => generate::run(a, api_key).await,
        Command::Status(a) => status::run(a, api_key).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("qaq: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Connects to a coordinator's client API, with a readable error.
async fn connect(addr: &str, api_key: Option<&str>) -> anyhow::Result<qaq_proto::client::Client> {
    qaq_proto::client::connect(addr, api_key).await.map_err(|e| anyhow::anyhow!("cannot connect to {addr}: {e}"))
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
