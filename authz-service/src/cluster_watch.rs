//! Redis Cluster upkeep (cluster mode only): every few seconds, reads the
//! cluster's state, which primary serves which slots (the `shard` label of
//! `caracal_redis_shard_errors_total`) and the `MOVED`/`ASK` redirections each
//! primary has answered, and sets:
//!
//! - `caracal_redis_cluster_ok`: 1 while `cluster_state:ok` and every primary
//!   answers (readiness reads the same check), else 0;
//! - `caracal_redis_cluster_primaries`: primaries serving slots;
//! - `caracal_redis_redirections{kind="moved"|"ask", node}`: the servers' own
//!   counts (`INFO errorstats`) — the client follows redirections silently, so a
//!   rising count is how a resharding or failover shows on a dashboard.
//!
//! Reads that fail leave the gauges as they were (and set `cluster_ok` to 0).

use std::time::Duration;

use caracal_service_kit::process::LogLimit;
use tokio::sync::watch;

use crate::budget::BudgetStore;

pub const CLUSTER_OK: &str = "caracal_redis_cluster_ok";
pub const CLUSTER_PRIMARIES: &str = "caracal_redis_cluster_primaries";
pub const REDIRECTIONS: &str = "caracal_redis_redirections";
/// How often the topology is read.
const EVERY: Duration = Duration::from_secs(5);

/// One read; returns whether the cluster is healthy.
pub async fn tick(store: &BudgetStore) -> Result<(), String> {
    let check = store.ping().await.map_err(|e| e.to_string());
    metrics::gauge!(CLUSTER_OK).set(if check.is_ok() { 1.0 } else { 0.0 });
    let owners = store.refresh_topology().await?;
    let mut primaries: Vec<&str> = owners.iter().map(|o| o.node.as_str()).collect();
    primaries.sort_unstable();
    primaries.dedup();
    // A handful of nodes: exact as f64.
    #[allow(clippy::cast_precision_loss)]
    metrics::gauge!(CLUSTER_PRIMARIES).set(primaries.len() as f64);
    for r in store.connection().redirections().await? {
        #[allow(clippy::cast_precision_loss)]
        {
            metrics::gauge!(REDIRECTIONS, "kind" => "moved", "node" => r.node.clone())
                .set(r.moved as f64);
            metrics::gauge!(REDIRECTIONS, "kind" => "ask", "node" => r.node).set(r.ask as f64);
        }
    }
    check
}

/// Reads every [`EVERY`] until `stop` turns true.
pub async fn run(store: BudgetStore, mut stop: watch::Receiver<bool>) {
    metrics::describe_gauge!(
        CLUSTER_OK,
        "1 while the Redis Cluster reports cluster_state:ok and every primary answers"
    );
    metrics::describe_gauge!(CLUSTER_PRIMARIES, "Redis Cluster primaries serving slots");
    metrics::describe_gauge!(
        REDIRECTIONS,
        "MOVED/ASK redirections answered by each Redis Cluster primary since it started"
    );
    let mut log = LogLimit::default();
    loop {
        if let Err(error) = tick(&store).await {
            if let Some(suppressed) = log.allow() {
                tracing::warn!(%error, suppressed, "Redis Cluster check failed");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
    }
}
