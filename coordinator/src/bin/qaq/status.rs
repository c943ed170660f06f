//! `qaq status`: the workers as a table.

use std::process::ExitCode;

use clap::Args;
use qaq_coordinator::cluster::state_name;
use qaq_proto::v1::{ClusterStatusRequest, ClusterStatusResponse};

use crate::{DEFAULT_ADDR, connect, status_text};

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Coordinator address.
    #[arg(long, env = "QAQ_ADDR", default_value = DEFAULT_ADDR)]
    pub addr: String,
}

pub async fn run(args: StatusArgs, api_key: Option<&str>) -> anyhow::Result<ExitCode> {
    let mut client = connect(&args.addr, api_key).await?;
    let status = client
        .cluster_status(ClusterStatusRequest {})
        .await
        .map_err(|s| anyhow::anyhow!(status_text(&s)))?
        .into_inner();
    print!("{}", table(&status));
    Ok(ExitCode::SUCCESS)
}

/// Bytes in binary units (`1.5 MiB`).
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{b} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

/// The status as an aligned table, one line per worker, then a summary line.
pub fn table(s: &ClusterStatusResponse) -> String {
    let header = ["WORKER", "ADDRESS", "STATE", "MODEL", "RUNNING", "WAITING", "IN-FLIGHT", "KV BYTES", "HEARTBEAT"];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    for w in &s.workers {
        let load = w.load.unwrap_or_default();
        rows.push(vec![
            w.worker_id.clone(),
            w.address.clone(),
            state_name(w.state).to_string(),
            w.model.as_ref().map(|m| m.name.clone()).unwrap_or_default(),
            load.running.to_string(),
            load.waiting.to_string(),
            w.in_flight.to_string(),
            human_bytes(load.kv_device_bytes),
            format!("{} ms ago", w.last_heartbeat_ms_ago),
        ]);
    }
    let widths: Vec<usize> =
        (0..header.len()).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(v, w)| format!("{v:<w$}")).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out.push_str(&format!("{} workers, {} requests in flight\n", s.workers.len(), s.in_flight));
    out
}

#[cfg(test)]
mod tests {
    use qaq_proto::v1::{ModelInfo, WorkerLoad, WorkerState, WorkerStatus};

    use super::*;

    #[test]
    fn formats_bytes() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
    }

    #[test]
    fn renders_a_row_per_worker() {
        let s = ClusterStatusResponse {
            workers: vec![WorkerStatus {
                worker_id: "worker-1".into(),
                address: "127.0.0.1:4000".into(),
                model: Some(ModelInfo { name: "SmolLM2".into(), ..Default::default() }),
                state: WorkerState::Up as i32,
                load: Some(WorkerLoad { running: 2, waiting: 1, kv_device_bytes: 2048, ..Default::default() }),
                last_heartbeat_ms_ago: 120,
                in_flight: 3,
            }],
            in_flight: 3,
        };
        let t = table(&s);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("WORKER") && lines[0].contains("HEARTBEAT"), "{t}");
        for cell in ["worker-1", "127.0.0.1:4000", "UP", "SmolLM2", "2.0 KiB", "120 ms ago"] {
            assert!(lines[1].contains(cell), "{cell} missing: {t}");
        }
        assert_eq!(lines[2], "1 workers, 3 requests in flight");
    }
}
