//! Local Redis Clusters on loopback: 3 primaries + 3 replicas
//! (`redis-server --cluster-enabled yes`, `redis-cli --cluster create ...
//! --cluster-replicas 1`).
//!
//! - [`ensure_shared`]: the cluster every `cluster_*` test binary shares, on ports
//!   7001-7006, started (daemonized, so it outlives the test process) when none is
//!   running and reused otherwise.
//! - [`LocalCluster::start`]: a cluster owned by one test (children of the test
//!   process, killed on drop) for tests that kill nodes.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

/// First port of the shared cluster (7001..=7006).
pub const SHARED_BASE_PORT: u16 = 7001;
const NODES: u16 = 6;

/// `redis-cli` options for a TLS cluster whose certificates are in `dir`
/// (see [`crate::tls::TestCerts`]).
fn tls_args(tls: Option<&Path>) -> Vec<String> {
    match tls {
        None => Vec::new(),
        Some(d) => vec![
            "--tls".into(),
            "--cacert".into(),
            d.join("ca.pem").display().to_string(),
        ],
    }
}

fn cli(tls: Option<&Path>, port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new("redis-cli")
        .args(tls_args(tls))
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn answers(tls: Option<&Path>, port: u16) -> bool {
    cli(tls, port, &["ping"]).is_some_and(|r| r.trim() == "PONG")
}

/// `cluster_state:ok` with all six nodes known, as `port` sees it, and its
/// replication working: a replica's link to its primary up (a replica that never
/// synced cannot take over), a primary's replica online.
fn healthy(tls: Option<&Path>, port: u16) -> bool {
    let cluster_ok = cli(tls, port, &["cluster", "info"]).is_some_and(|info| {
        info.contains("cluster_state:ok") && info.contains(&format!("cluster_known_nodes:{NODES}"))
    });
    // A primary counts a replica for WAIT only once the replica is `online`
    // (after its first ACK following the sync), so wait for that too.
    cluster_ok
        && cli(tls, port, &["info", "replication"]).is_some_and(|info| {
            (info.contains("role:master")
                && info
                    .lines()
                    .any(|l| l.starts_with("slave0:") && l.contains("state=online")))
                || info.contains("master_link_status:up")
        })
}

fn node_args(port: u16, dir: &Path, node_timeout_ms: u64, tls: Option<&Path>) -> Vec<String> {
    let (plain, tls_port) = match tls {
        None => (port, 0),
        Some(_) => (0, port),
    };
    let mut args: Vec<String> = [
        "--bind",
        "127.0.0.1",
        "--port",
        &plain.to_string(),
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        "nodes.conf",
        "--cluster-node-timeout",
        &node_timeout_ms.to_string(),
        "--save",
        "",
        "--appendonly",
        "no",
        // DEBUG SLEEP, from loopback only (the failover test freezes a replica).
        "--enable-debug-command",
        "local",
        // A new replica syncs at once (default: waits 5 s for more replicas).
        "--repl-diskless-sync-delay",
        "0",
        "--dir",
        &dir.to_string_lossy(),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    if let Some(d) = tls {
        let file = |f: &str| d.join(f).display().to_string();
        args.extend([
            "--tls-port".into(),
            tls_port.to_string(),
            "--tls-cluster".into(),
            "yes".into(),
            "--tls-replication".into(),
            "yes".into(),
            "--tls-cert-file".into(),
            file("srv.pem"),
            "--tls-key-file".into(),
            file("srv.key"),
            "--tls-ca-cert-file".into(),
            file("ca.pem"),
            "--tls-auth-clients".into(),
            "optional".into(),
        ]);
    }
    args
}

fn create(tls: Option<&Path>, ports: &[u16]) -> anyhow::Result<()> {
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let out = Command::new("redis-cli")
        .args(tls_args(tls))
        .args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", "1", "--cluster-yes"])
        .output()
        .context("redis-cli --cluster create")?;
    if !out.status.success() {
        bail!(
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(())
}

async fn wait_healthy(tls: Option<&Path>, ports: &[u16], within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if ports.iter().all(|&p| healthy(tls, p)) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("Redis Cluster on ports {ports:?} did not become healthy within {within:?}")
}

fn seeds(ports: &[u16]) -> Vec<String> {
    ports
        .iter()
        .map(|p| format!("redis://127.0.0.1:{p}"))
        .collect()
}

static SHARED: tokio::sync::OnceCell<Vec<String>> = tokio::sync::OnceCell::const_new();

/// Seeds of the shared cluster on 7001-7006, started when none is running.
pub async fn ensure_shared() -> anyhow::Result<Vec<String>> {
    SHARED
        .get_or_try_init(|| async {
            let ports: Vec<u16> = (SHARED_BASE_PORT..SHARED_BASE_PORT + NODES).collect();
            if ports.iter().all(|&p| healthy(None, p)) {
                return Ok(seeds(&ports));
            }
            let root = std::env::temp_dir().join("caracal-redis-cluster");
            let fresh = !ports.iter().any(|&p| answers(None, p));
            for &port in &ports {
                if answers(None, port) {
                    continue;
                }
                let dir = root.join(port.to_string());
                if fresh {
                    // A previous cluster's identity would make the nodes refuse
                    // `--cluster create`.
                    let _ = std::fs::remove_dir_all(&dir);
                }
                std::fs::create_dir_all(&dir)?;
                let status = Command::new("redis-server")
                    .args(node_args(port, &dir, 5_000, None))
                    .args(["--daemonize", "yes", "--logfile"])
                    .arg(dir.join("redis.log"))
                    .status()
                    .context("starting redis-server (Debian package redis-server)")?;
                if !status.success() {
                    bail!("redis-server on port {port} did not start");
                }
            }
            let deadline = Instant::now() + Duration::from_secs(20);
            while !ports.iter().all(|&p| answers(None, p)) {
                if Instant::now() > deadline {
                    bail!("Redis Cluster nodes {ports:?} do not answer");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if fresh {
                create(None, &ports)?;
            }
            wait_healthy(None, &ports, Duration::from_secs(60)).await?;
            Ok(seeds(&ports))
        })
        .await
        .cloned()
}

/// A cluster owned by one test: its nodes are children of the test process.
pub struct LocalCluster {
    pub ports: Vec<u16>,
    dir: PathBuf,
    /// Certificates directory of a TLS cluster (`rediss://` only).
    tls: Option<PathBuf>,
    node_timeout_ms: u64,
    nodes: HashMap<u16, Child>,
}

impl LocalCluster {
    /// Starts 6 nodes on `base_port..base_port+6` and joins them (3 primaries,
    /// each with one replica). `node_timeout_ms`: how long a primary may be
    /// unreachable before its replica takes over.
    pub async fn start(base_port: u16, node_timeout_ms: u64) -> anyhow::Result<Self> {
        Self::start_with(base_port, node_timeout_ms, None).await
    }

    /// Like [`LocalCluster::start`], TLS only (clients, cluster bus, replication)
    /// with the certificates in `certs` ([`crate::tls::TestCerts`]).
    pub async fn start_tls(base_port: u16, certs: &Path) -> anyhow::Result<Self> {
        Self::start_with(base_port, 5_000, Some(certs.to_path_buf())).await
    }

    async fn start_with(
        base_port: u16,
        node_timeout_ms: u64,
        tls: Option<PathBuf>,
    ) -> anyhow::Result<Self> {
        let ports: Vec<u16> = (base_port..base_port + NODES).collect();
        if let Some(p) = ports.iter().find(|&&p| answers(tls.as_deref(), p)) {
            bail!("port {p} is taken by a running Redis");
        }
        let dir = std::env::temp_dir().join(format!(
            "caracal-cluster-{base_port}-{}",
            uuid::Uuid::new_v4().simple()
        ));
        let mut cluster = Self {
            ports: ports.clone(),
            dir,
            tls,
            node_timeout_ms,
            nodes: HashMap::new(),
        };
        for &port in &ports {
            cluster.spawn(port)?;
        }
        let tls = cluster.tls.clone();
        let tls = tls.as_deref();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ports.iter().all(|&p| answers(tls, p)) {
            if Instant::now() > deadline {
                bail!("Redis Cluster nodes {ports:?} do not answer");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        create(tls, &ports)?;
        wait_healthy(tls, &ports, Duration::from_secs(60)).await?;
        Ok(cluster)
    }

    fn spawn(&mut self, port: u16) -> anyhow::Result<()> {
        let dir = self.dir.join(port.to_string());
        std::fs::create_dir_all(&dir)?;
        let child = Command::new("redis-server")
            .args(node_args(
                port,
                &dir,
                self.node_timeout_ms,
                self.tls.as_deref(),
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting redis-server")?;
        self.nodes.insert(port, child);
        Ok(())
    }

    /// `redis://` (or `rediss://` for a TLS cluster) seed URLs.
    pub fn seeds(&self) -> Vec<String> {
        let urls = seeds(&self.ports);
        match self.tls {
            None => urls,
            Some(_) => urls
                .iter()
                .map(|u| u.replacen("redis://", "rediss://", 1))
                .collect(),
        }
    }

    /// The port of the primary serving `key`'s slot.
    pub fn primary_of(&self, key: &str) -> anyhow::Result<u16> {
        let slot = caracal_service_kit::redis::slot_of(key);
        for &port in &self.ports {
            let Some(nodes) = cli(self.tls.as_deref(), port, &["cluster", "nodes"]) else {
                continue;
            };
            for line in nodes.lines() {
                let f: Vec<&str> = line.split_whitespace().collect();
                if f.len() < 9 || !f[2].contains("master") || f[2].contains("fail") {
                    continue;
                }
                let owns = f[8..].iter().any(|r| {
                    let (a, b) = r.split_once('-').unwrap_or((r, r));
                    matches!((a.parse::<u16>(), b.parse::<u16>()), (Ok(a), Ok(b)) if a <= slot && slot <= b)
                });
                if owns {
                    let addr = f[1].split('@').next().unwrap_or("");
                    if let Some(p) = addr.rsplit(':').next().and_then(|p| p.parse().ok()) {
                        return Ok(p);
                    }
                }
            }
        }
        bail!("no primary serves slot {slot}")
    }

    /// The port of a replica of the primary on `primary`.
    pub fn replica_of(&self, primary: u16) -> anyhow::Result<u16> {
        let nodes =
            cli(self.tls.as_deref(), primary, &["cluster", "nodes"]).context("CLUSTER NODES")?;
        let lines: Vec<Vec<&str>> = nodes
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        let port_of = |addr: &str| -> Option<u16> {
            addr.split('@').next()?.rsplit(':').next()?.parse().ok()
        };
        let id = lines
            .iter()
            .find(|f| f.len() > 2 && f[2].contains("myself"))
            .map(|f| f[0])
            .context("no myself line")?;
        lines
            .iter()
            .find(|f| f.len() > 3 && f[2].contains("slave") && f[3] == id)
            .and_then(|f| port_of(f[1]))
            .context("no replica")
    }

    /// Stops replication from the primary on `primary` for a while: its replica
    /// is frozen (`DEBUG SLEEP`, `freeze`) and the primary drops the replica's
    /// link, so writes from now on exist on the primary only.
    pub async fn cut_replication(&self, primary: u16, freeze: Duration) -> anyhow::Result<u16> {
        let replica = self.replica_of(primary)?;
        // DEBUG SLEEP blocks the caller for the whole sleep: run it aside.
        Command::new("redis-cli")
            .args(tls_args(self.tls.as_deref()))
            .args(["-h", "127.0.0.1", "-p", &replica.to_string()])
            .args(["debug", "sleep", &format!("{:.3}", freeze.as_secs_f64())])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("redis-cli debug sleep")?;
        tokio::time::sleep(Duration::from_millis(50)).await;
        cli(
            self.tls.as_deref(),
            primary,
            &["client", "kill", "type", "replica"],
        )
        .context("CLIENT KILL")?;
        Ok(replica)
    }

    /// SIGKILLs the node on `port`.
    pub fn kill(&mut self, port: u16) -> anyhow::Result<()> {
        let mut child = self.nodes.remove(&port).context("no such node")?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// Starts the node on `port` again (it rejoins with its old identity).
    pub fn restart(&mut self, port: u16) -> anyhow::Result<()> {
        self.spawn(port)
    }

    /// Whether every live node reports a healthy cluster.
    pub fn is_healthy(&self) -> bool {
        self.ports
            .iter()
            .filter(|p| self.nodes.contains_key(p))
            .all(|&p| {
                cli(self.tls.as_deref(), p, &["cluster", "info"])
                    .is_some_and(|i| i.contains("cluster_state:ok"))
            })
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for (_, mut child) in self.nodes.drain() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
