//! A consumer of `caracal-consumers` run as a real child process (crash tests):
//! started with its settings in `CARACAL_*` variables, killed with SIGKILL, or
//! stopped with SIGTERM and expected to exit 0.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

/// How to start one consumer process.
#[derive(Debug, Clone)]
pub struct ConsumerProcess {
    /// The binary (`env!("CARGO_BIN_EXE_consumers-under-test")` in a test).
    pub binary: PathBuf,
    /// `ledger-writer`, `audit-logger`, ...
    pub subcommand: String,
    pub database_url: String,
    pub brokers: String,
    pub group: String,
    /// Appended to by every start (stdout and stderr).
    pub log: PathBuf,
    /// More `CARACAL_*` settings, applied after the defaults below.
    pub env: Vec<(String, String)>,
}

impl ConsumerProcess {
    /// Starts the process.
    pub fn spawn(&self) -> anyhow::Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = Command::new(&self.binary);
        cmd.arg(&self.subcommand)
            .env("CARACAL_DATABASE_URL", &self.database_url)
            .env("CARACAL_DB_POOL_SIZE", "1")
            .env("CARACAL_DB_POOL_TIMEOUT", "5")
            .env("CARACAL_KAFKA_BROKERS", &self.brokers)
            .env("CARACAL_CONSUMER_GROUP_ID", &self.group)
            .env("CARACAL_CONSUMER_HTTP_ADDR", "127.0.0.1:0")
            .env("CARACAL_CONSUMER_SESSION_TIMEOUT_MS", "6000")
            .env("CARACAL_CONSUMER_BATCH_WAIT_MS", "20")
            .env("RUST_LOG", "info");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))
    }

    /// The last `lines` lines of the log (for failure messages).
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }
}

/// A child process, killed if the test ends without stopping it (a failed
/// assertion): a `Child` alone outlives its handle.
pub struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut last: Vec<&str> = text.lines().rev().take(lines).collect();
    last.reverse();
    last.join("\n")
}

/// Sends SIGTERM and waits (at most `within`) for the process to exit; fails unless
/// it exits 0 (a consumer commits what it wrote and leaves on SIGTERM).
pub fn terminate(child: &mut Child, within: Duration) -> anyhow::Result<()> {
    let pid = child.id().to_string();
    let status = Command::new("kill").args(["-TERM", &pid]).status()?;
    if !status.success() {
        bail!("kill -TERM {pid} failed");
    }
    let deadline = Instant::now() + within;
    loop {
        if let Some(exit) = child.try_wait()? {
            if exit.success() {
                return Ok(());
            }
            bail!("exit status {exit}");
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("did not exit within {within:?} of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A random duration in `lo..hi` ms (uuid v4 bits: no rand dependency needed).
pub fn random_ms(lo: u64, hi: u64) -> Duration {
    let span = u128::from(hi.saturating_sub(lo).max(1));
    let r = u64::try_from(uuid::Uuid::new_v4().as_u128() % span).unwrap_or(0);
    Duration::from_millis(lo + r)
}
