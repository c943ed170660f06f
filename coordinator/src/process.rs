//! Child processes that announce readiness with one stdout line
//! (`PREFIX key=value ...`): spawn, wait for the line (never for a port),
//! keep draining their stdout, signal and reap them. Used by `qaq up` and by
//! the integration tests.

use std::collections::BTreeMap;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};
use tokio::task::JoinHandle;

/// Errors starting or stopping a child.
#[derive(Debug, Error)]
pub enum ProcessError {
    /// The program could not be started.
    #[error("{name}: cannot start {program}: {source}")]
    Spawn {
        /// Display name.
        name: String,
        /// Program path.
        program: String,
        /// Why.
        source: std::io::Error,
    },
    /// The child exited (or closed stdout) before printing its READY line.
    #[error("{name}: exited before printing {prefix} ({status})")]
    ExitedEarly {
        /// Display name.
        name: String,
        /// The expected prefix.
        prefix: String,
        /// Exit status, as text.
        status: String,
    },
    /// The READY line did not come in time.
    #[error("{name}: no {prefix} line within {} s", .waited.as_secs())]
    Timeout {
        /// Display name.
        name: String,
        /// The expected prefix.
        prefix: String,
        /// How long we waited.
        waited: Duration,
    },
    /// Reading the child's stdout or waiting for it failed.
    #[error("{name}: {source}")]
    Io {
        /// Display name.
        name: String,
        /// Why.
        source: std::io::Error,
    },
}

/// The `key=value` fields of a READY line.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReadyLine {
    /// Fields by key.
    pub fields: BTreeMap<String, String>,
}

impl ReadyLine {
    /// Parses `line` if it is `prefix` followed by space-separated `key=value`s.
    pub fn parse(line: &str, prefix: &str) -> Option<Self> {
        let mut words = line.split_whitespace();
        if words.next()? != prefix {
            return None;
        }
        let fields = words.filter_map(|w| w.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Some(Self { fields })
    }

    /// A field (`None` when absent or `-`).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.get(key).map(String::as_str).filter(|v| *v != "-")
    }
}

/// What happens to a child's stdout after its READY line.
#[derive(Debug, Clone)]
pub enum StdoutMode {
    /// Print each line on our stdout, prefixed with `[name] `.
    Prefixed,
    /// Read and discard (so the child never blocks on a full pipe).
    Discard,
}

/// A running child that printed its READY line.
#[derive(Debug)]
pub struct ReadyChild {
    /// Display name (e.g. `worker-1`).
    pub name: String,
    /// The child; killed when dropped.
    pub child: Child,
    /// Its process id.
    pub pid: u32,
    /// Its READY line.
    pub ready: ReadyLine,
    drain: JoinHandle<()>,
}

/// Starts `cmd` (stdout piped, stdin closed, killed on drop; stderr as the
/// caller configured it) and waits up to `timeout` for a stdout line starting
/// with `prefix`. Lines before it are handled like those after it.
pub async fn spawn_ready(
    cmd: Command,
    name: &str,
    prefix: &str,
    timeout: Duration,
    mode: StdoutMode,
) -> Result<ReadyChild, ProcessError> {
    spawn_until(cmd, name, prefix, timeout, mode, |line| ReadyLine::parse(line, prefix)).await
}

/// Like [`spawn_ready`], with the READY line recognised (and turned into
/// fields) by `matcher`; `what` names the awaited line in errors.
pub async fn spawn_until(
    mut cmd: Command,
    name: &str,
    what: &str,
    timeout: Duration,
    mode: StdoutMode,
    matcher: impl Fn(&str) -> Option<ReadyLine>,
) -> Result<ReadyChild, ProcessError> {
    let prefix = what;
    let program = cmd.as_std().get_program().to_string_lossy().into_owned();
    cmd.stdout(Stdio::piped()).stdin(Stdio::null()).kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|source| ProcessError::Spawn {
        name: name.to_string(),
        program: program.clone(),
        source,
    })?;
    let pid = child.id().unwrap_or_default();
    let stdout = child.stdout.take().ok_or_else(|| ProcessError::Io {
        name: name.to_string(),
        source: std::io::Error::other("stdout was not captured"),
    })?;
    let mut lines = BufReader::new(stdout).lines();
    let wait_ready = async {
        loop {
            match lines.next_line().await {
                Ok(Some(line)) => {
                    if let Some(ready) = matcher(&line) {
                        return Ok(Some(ready));
                    }
                    emit(&mode, name, &line);
                }
                Ok(None) => return Ok(None),
                Err(source) => return Err(ProcessError::Io { name: name.to_string(), source }),
            }
        }
    };
    let ready = match tokio::time::timeout(timeout, wait_ready).await {
        Ok(Ok(Some(ready))) => ready,
        Ok(Ok(None)) => {
            let status = match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
                Ok(Ok(s)) => s.to_string(),
                _ => "stdout closed".to_string(),
            };
            return Err(ProcessError::ExitedEarly { name: name.to_string(), prefix: prefix.to_string(), status });
        }
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            let _ = child.start_kill();
            return Err(ProcessError::Timeout { name: name.to_string(), prefix: prefix.to_string(), waited: timeout });
        }
    };
    let drain = tokio::spawn(drain_lines(lines, name.to_string(), mode));
    Ok(ReadyChild { name: name.to_string(), child, pid, ready, drain })
}

fn emit(mode: &StdoutMode, name: &str, line: &str) {
    if let StdoutMode::Prefixed = mode {
        println!("[{name}] {line}");
    }
}

async fn drain_lines(mut lines: tokio::io::Lines<BufReader<ChildStdout>>, name: String, mode: StdoutMode) {
    while let Ok(Some(line)) = lines.next_line().await {
        emit(&mode, &name, &line);
    }
}

/// Sends a signal to a process id. Errors (e.g. the process is gone) are
/// returned, not panicked on.
pub fn signal(pid: u32, sig: i32) -> std::io::Result<()> {
    let pid = i32::try_from(pid).map_err(|_| std::io::Error::other("pid out of range"))?;
    if pid <= 0 {
        return Err(std::io::Error::other("refusing to signal pid <= 0"));
    }
    // SAFETY: kill(2) with a positive pid only sends a signal; no memory is shared.
    let rc = unsafe { libc::kill(pid, sig) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

impl ReadyChild {
    /// Sends SIGTERM.
    pub fn terminate(&self) -> std::io::Result<()> {
        signal(self.pid, libc::SIGTERM)
    }

    /// Sends SIGKILL (as `kill -9 PID`).
    pub fn kill9(&self) -> std::io::Result<()> {
        signal(self.pid, libc::SIGKILL)
    }

    /// Whether the child has exited (reaping it if so).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits for the child to exit.
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        self.child.wait().await
    }

    /// SIGTERM, then up to `grace` for the child to exit, then SIGKILL.
    /// Returns the exit status, or `None` if it had to be killed.
    pub async fn shutdown(&mut self, grace: Duration) -> Option<ExitStatus> {
        if self.exited().is_none() {
            let _ = self.terminate();
        }
        let status = match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(Ok(status)) => Some(status),
            _ => {
                let _ = self.child.start_kill();
                let _ = self.child.wait().await;
                None
            }
        };
        self.drain.abort();
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ready_lines() {
        let r = ReadyLine::parse("QAQ_WORKER_READY grpc=127.0.0.1:5 metrics=-", "QAQ_WORKER_READY").unwrap();
        assert_eq!(r.get("grpc"), Some("127.0.0.1:5"));
        assert_eq!(r.get("metrics"), None);
        assert!(ReadyLine::parse("QAQ_WORKER_READYX grpc=1", "QAQ_WORKER_READY").is_none());
        assert!(ReadyLine::parse("log line", "QAQ_WORKER_READY").is_none());
        assert!(ReadyLine::parse("", "QAQ_WORKER_READY").is_none());
    }

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c").arg(script);
        c
    }

    #[tokio::test]
    async fn waits_for_the_ready_line_then_terminates() {
        let mut c = spawn_ready(
            sh("trap 'exit 0' TERM; echo starting; echo 'READY grpc=a:1'; while :; do sleep 0.05; done"),
            "t",
            "READY",
            Duration::from_secs(10),
            StdoutMode::Discard,
        )
        .await
        .unwrap();
        assert_eq!(c.ready.get("grpc"), Some("a:1"));
        assert!(c.exited().is_none());
        let status = c.shutdown(Duration::from_secs(10)).await.expect("exits on SIGTERM");
        assert!(status.success(), "{status}");
    }

    #[tokio::test]
    async fn reports_early_exit_and_timeout() {
        let e = spawn_ready(sh("echo nope; exit 3"), "t", "READY", Duration::from_secs(10), StdoutMode::Discard)
            .await
            .unwrap_err();
        assert!(matches!(e, ProcessError::ExitedEarly { .. }), "{e}");
        assert!(e.to_string().contains('3'), "{e}");
        let e = spawn_ready(sh("sleep 30"), "t", "READY", Duration::from_millis(200), StdoutMode::Discard)
            .await
            .unwrap_err();
        assert!(matches!(e, ProcessError::Timeout { .. }), "{e}");
        let e =
            spawn_ready(Command::new("/nonexistent/prog"), "t", "READY", Duration::from_secs(1), StdoutMode::Discard)
                .await
                .unwrap_err();
        assert!(matches!(e, ProcessError::Spawn { .. }), "{e}");
    }

    #[tokio::test]
    async fn kill9_is_reported_as_a_signal() {
        let mut c =
            spawn_ready(sh("echo READY; exec sleep 30"), "t", "READY", Duration::from_secs(10), StdoutMode::Discard)
                .await
                .unwrap();
        c.kill9().unwrap();
        let status = c.wait().await.unwrap();
        assert!(!status.success());
        assert!(signal(0, libc::SIGTERM).is_err());
    }
}
