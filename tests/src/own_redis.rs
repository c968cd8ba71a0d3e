//! A Redis server of one test's own.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// A redis-server of one test or bench only (no persistence), so it may FLUSHALL
/// for real; stopped (by its PID) when dropped.
pub struct OwnRedis {
    child: Child,
    pub url: String,
    /// Its working directory: a replica writes the RDB it syncs from there.
    _dir: tempfile::TempDir,
}

impl OwnRedis {
    /// On a free loopback port.
    pub async fn start() -> Self {
        Self::start_on(crate::envoy::free_port().expect("a free loopback port")).await
    }

    /// On `port` (a test that stops Redis and starts it again where it was).
    pub async fn start_on(port: u16) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory for redis-server");
        let child = Command::new("redis-server")
            .current_dir(dir.path())
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (Debian package redis-server)");
        let url = format!("redis://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ping = async {
                let client = redis::Client::open(url.as_str())?;
                let mut c = client.get_multiplexed_async_connection().await?;
                redis::cmd("PING").query_async::<String>(&mut c).await
            };
            if ping.await.is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on {port} did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self {
            child,
            url,
            _dir: dir,
        }
    }

    pub async fn cmd<T: redis::FromRedisValue>(&self, cmd: &mut redis::Cmd) -> T {
        let client = redis::Client::open(self.url.as_str()).expect("the test's redis-server");
        let mut c = client
            .get_multiplexed_async_connection()
            .await
            .expect("the test's redis-server");
        cmd.query_async(&mut c)
            .await
            .expect("the test's redis-server")
    }
}

impl OwnRedis {
    /// Points a service's Redis settings at this server (standalone).
    pub fn configure(&self, redis: &mut caracal_authz::config::RedisConfig) {
        redis.mode = caracal_authz::config::RedisMode::Standalone;
        redis.url.clone_from(&self.url);
        redis.nodes.clear();
    }

    /// Kills the server now (SIGKILL: an outage, not a shutdown) and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}
