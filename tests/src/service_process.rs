//! The authz-service as its own process: the shipped `caracal-authz-service` binary
//! (its allocator, its runtime, its logging), for benchmarks that must count its CPU
//! apart from the load generator's and must not share a process with it.
//!
//! [`ServiceProcess::start`] creates a fresh database, starts the binary on free
//! loopback ports with its settings in `CARACAL_*` variables (the same ones an
//! operator sets) and returns a [`TestStack`] whose gRPC channel reaches it, so the
//! admin helpers (`agent_with_key`, policies, prices) work unchanged; stop the
//! process before the stack ([`ServiceProcess::stop`], then `TestStack::stop`).

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context};
use tonic::transport::Channel;

use crate::{
    consumer_process::terminate,
    envoy::{free_port, repo_root},
    TestDb, TestStack,
};

/// Longest wait for the service to answer after it was started (it applies the
/// migrations to a fresh database first).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for it to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// A running `caracal-authz-service` (or `authz-under-test`).
pub struct ServiceProcess {
    child: Child,
    pub grpc_port: u16,
    /// `/health/*` and `/metrics`.
    pub http_port: u16,
    pub log: PathBuf,
}

impl ServiceProcess {
    /// Starts `binary` on a fresh database and this machine's test Redis (own key
    /// prefix, relay off), with `env` applied after the defaults.
    pub async fn start(
        binary: &Path,
        env: &[(&str, String)],
    ) -> anyhow::Result<(TestStack, ServiceProcess)> {
        Self::start_with(binary, env, |_| {}).await
    }

    /// Like [`ServiceProcess::start`], with a chance to change the stack's Redis
    /// settings first (e.g. a Redis Cluster: mode, seeds, replica acknowledgement).
    pub async fn start_with(
        binary: &Path,
        env: &[(&str, String)],
        tune: impl FnOnce(&mut caracal_authz::config::RedisConfig),
    ) -> anyhow::Result<(TestStack, ServiceProcess)> {
        let mut config = TestStack::config("").await?;
        tune(&mut config.redis);
        let db = TestDb::create("process").await?;
        config.database.url = db.url.clone();
        let redis = config.redis.clone();
        let key_prefix = redis.key_prefix.clone();
        let (grpc_port, http_port) = (free_port()?, free_port()?);
        let log = std::env::temp_dir().join(format!("caracal-authz-{key_prefix}.log"));
        let log_file = std::fs::File::create(&log)?;
        let mut cmd = Command::new(binary);
        // The stack's configuration, as an operator sets it: in CARACAL_* variables.
        cmd.env("CARACAL_GRPC_ADDR", format!("127.0.0.1:{grpc_port}"))
            .env("CARACAL_HTTP_ADDR", format!("127.0.0.1:{http_port}"))
            .env("CARACAL_DATABASE_URL", &config.database.url)
            .env(
                "CARACAL_DB_POOL_SIZE",
                config.database.db_pool_size.to_string(),
            )
            .env(
                "CARACAL_DB_MAX_OVERFLOW",
                config.database.db_max_overflow.to_string(),
            )
            .env(
                "CARACAL_DB_POOL_TIMEOUT",
                config.database.db_pool_timeout.to_string(),
            )
            .env("CARACAL_REDIS_URL", &redis.url)
            .env("CARACAL_REDIS_TIMEOUT_MS", redis.timeout_ms.to_string())
            .env("CARACAL_REDIS_KEY_PREFIX", &key_prefix)
            .env("CARACAL_REDIS_PARTITIONS", redis.partitions.to_string())
            .env(
                "CARACAL_RELAY_ENABLED",
                config.budget.relay_enabled.to_string(),
            )
            .env("CARACAL_ADMIN_TOKEN", &config.auth.admin_token)
            .env("CARACAL_GATEWAY_TOKEN", &config.auth.gateway_token)
            .env("CARACAL_API_KEY_PEPPER", &config.auth.api_key_pepper)
            .env_remove("CARACAL_CONFIG");
        match redis.mode {
            caracal_authz::config::RedisMode::Standalone => {
                cmd.env("CARACAL_REDIS_MODE", "standalone");
            }
            caracal_authz::config::RedisMode::Cluster => {
                cmd.env("CARACAL_REDIS_MODE", "cluster")
                    .env("CARACAL_REDIS_NODES", redis.nodes.join(","))
                    .env(
                        "CARACAL_REDIS_REPLICA_ACK_TIMEOUT_MS",
                        redis.replica_ack_timeout_ms.to_string(),
                    );
            }
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut process = ServiceProcess {
            child,
            grpc_port,
            http_port,
            log,
        };
        let channel = match process.connect().await {
            Ok(c) => c,
            Err(e) => {
                process.stop();
                let _ = db.drop().await;
                return Err(e);
            }
        };
        let stack = TestStack {
            key_prefix,
            redis,
            database: db.name,
            database_url: db.url,
            server: None,
            channel,
        };
        Ok((stack, process))
    }

    /// Connects once the service listens; fails when it exits or takes too long.
    async fn connect(&mut self) -> anyhow::Result<Channel> {
        let url = format!("http://127.0.0.1:{}", self.grpc_port);
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "the authz-service exited at start-up ({status}); its log ({}):\n{}",
                    self.log.display(),
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            let attempt = Channel::from_shared(url.clone())?
                .connect_timeout(Duration::from_secs(2))
                .connect()
                .await;
            match attempt {
                Ok(channel) => return Ok(channel),
                Err(e) if started.elapsed() > START_TIMEOUT => {
                    let log = self.log.display();
                    let why = format!("the authz-service did not listen on {url} in time ({log})");
                    return Err(anyhow!(e).context(why));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM (a graceful stop), then SIGKILL when it has not exited in time.
    pub fn stop(&mut self) {
        // Once reaped, its PID may belong to another process: no signal then.
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        if let Err(e) = terminate(&mut self.child, STOP_TIMEOUT) {
            eprintln!(
                "authz-service (pid {}): {e:#}; log: {}",
                self.child.id(),
                self.log.display()
            );
        }
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The `caracal-authz-service` binary to run: `CARACAL_AUTHZ_BIN`, else the one
/// next to the running executable, built (or brought up to date) first with the
/// same profile, so a bench never measures a stale service.
pub fn authz_service_binary() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("CARACAL_AUTHZ_BIN") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("CARACAL_AUTHZ_BIN={} does not exist", p.display());
        }
        return Ok(p);
    }
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .context("the running executable has no directory")?;
    // target/<profile>/<exe>; a test binary lives one level deeper, in deps/.
    let profile_dir = if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().context("deps/ without a parent")?
    } else {
        dir
    };
    let target_dir = profile_dir
        .parent()
        .context("the profile directory has no parent")?;
    let profile = profile_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let cargo_profile = if profile == "debug" { "dev" } else { &profile };
    let status = Command::new(cargo)
        .args([
            "build",
            "--profile",
            cargo_profile,
            "-p",
            "caracal-authz",
            "--bin",
            "caracal-authz-service",
        ])
        .env("CARGO_TARGET_DIR", target_dir)
        .current_dir(repo_root())
        .status()
        .context("running cargo to build caracal-authz-service")?;
    if !status.success() {
        bail!("building caracal-authz-service failed ({status})");
    }
    let binary = profile_dir.join("caracal-authz-service");
    if !binary.is_file() {
        bail!("{} was not built", binary.display());
    }
    Ok(binary)
}
