//! Whether Redis still holds the deployment's budget state.
//!
//! Redis is the hot path's only view of spend. A Redis that loses its data
//! (FLUSHALL, a failover to a replica that never synced, a restart without
//! persistence) would otherwise answer every Authorize from empty counters: every
//! agent would get its whole budget back, silently. So each partition of the state
//! carries a marker key ([`KeySpace::state_marker`]) that every budget script checks
//! before anything else; without it the scripts decide nothing (Authorize is
//! refused, Settle and Release are answered UNAVAILABLE, the sweeper passes by).
//!
//! Who writes a marker:
//! - the first authz-service of a new deployment (the `budget_state` row does not
//!   exist yet: nothing was ever spent), on every partition, with the row, once;
//! - `caracal budget rebuild` (`admin::rebuild`), after it has recomputed the
//!   partition's counters from the ledger.
//!
//! Nothing else: a missing marker with the row present means the state is lost,
//! whatever restarts in between. [`watch`] re-checks every [`CHECK_EVERY`] and sets
//! [`LOST_PARTITIONS`], which the `CaracalBudgetStateLost` alert watches.

use std::time::Duration;

use caracal_service_kit::redis::query_each;
use diesel::sql_types::{Integer, Nullable, Text};
use diesel_async::RunQueryDsl;
use redis::Value;
use tokio::sync::watch as tokio_watch;

use super::{BudgetStore, KeySpace};
use crate::{
    db,
    error::{ServiceError, ServiceResult},
};

/// Partitions whose budget-state marker is missing (0 when all is well).
pub const LOST_PARTITIONS: &str = "caracal_budget_state_lost_partitions";
/// How often [`watch`] looks.
pub const CHECK_EVERY: Duration = Duration::from_secs(5);

/// The deployment's `budget_state` row.
#[derive(Debug, Clone, PartialEq, Eq, diesel::QueryableByName)]
pub struct Established {
    #[diesel(sql_type = Text)]
    pub epoch: String,
    #[diesel(sql_type = Integer)]
    pub partitions: i32,
    #[diesel(sql_type = Nullable<Text>)]
    pub rebuilt_at: Option<String>,
}

/// The partitions whose marker is missing, in order.
pub async fn lost_partitions(store: &BudgetStore) -> ServiceResult<Vec<u16>> {
    let keys = store.keys();
    let reads = (0..keys.partitions())
        .map(|p| redis::cmd("EXISTS").arg(keys.state_marker(p)).clone())
        .collect();
    let replies = query_each(&store.connection(), reads)
        .await
        .map_err(|e| unavailable(&e))?;
    let mut lost = Vec::new();
    for (p, reply) in (0..keys.partitions()).zip(&replies) {
        match reply {
            Value::Int(1) => {}
            Value::Int(0) => lost.push(p),
            other => {
                return Err(ServiceError::Internal(format!(
                    "EXISTS of a budget-state marker answered {other:?}"
                )))
            }
        }
    }
    Ok(lost)
}

/// Writes the markers of `partitions` (with `epoch`).
pub async fn write_markers(
    store: &BudgetStore,
    partitions: &[u16],
    epoch: &str,
) -> ServiceResult<()> {
    let keys: &KeySpace = store.keys();
    let writes = partitions
        .iter()
        .map(|p| {
            redis::cmd("SET")
                .arg(keys.state_marker(*p))
                .arg(epoch)
                .clone()
        })
        .collect();
    query_each(&store.connection(), writes)
        .await
        .map_err(|e| unavailable(&e))?;
    Ok(())
}

/// Removes the markers of `partitions`: the hot path refuses there (as after a
/// loss) until a rebuild or a snapshot restore puts them back.
pub async fn take_offline(store: &BudgetStore, partitions: &[u16]) -> ServiceResult<()> {
    let keys: &KeySpace = store.keys();
    let deletes = partitions
        .iter()
        .map(|p| redis::cmd("DEL").arg(keys.state_marker(*p)).clone())
        .collect();
    query_each(&store.connection(), deletes)
        .await
        .map_err(|e| unavailable(&e))?;
    Ok(())
}

/// The `budget_state` row, if the state was ever established.
pub async fn established(conn: &mut db::Conn<'_>) -> ServiceResult<Option<Established>> {
    let row: Option<Established> = diesel::sql_query(
        "SELECT epoch, partitions, to_char(rebuilt_at AT TIME ZONE 'UTC', \
                'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') AS rebuilt_at \
         FROM budget_state WHERE id = 1",
    )
    .get_result(conn)
    .await
    .map(Some)
    .or_else(|e| match e {
        diesel::result::Error::NotFound => Ok(None),
        e => Err(e),
    })?;
    Ok(row)
}

/// One look: on a new deployment (no `budget_state` row) establishes the state
/// (the row, then every marker); otherwise returns the partitions whose marker is
/// missing, which stay refused until `caracal budget rebuild`.
pub async fn check(pool: &db::Pool, store: &BudgetStore) -> ServiceResult<Vec<u16>> {
    let lost = lost_partitions(store).await?;
    if lost.is_empty() {
        return Ok(lost);
    }
    let mut conn = db::conn(pool).await?;
    if established(&mut conn).await?.is_some() {
        return Ok(lost);
    }
    // A new deployment (or the first start of a release with markers on a Redis
    // that holds its state): the one process whose INSERT lands writes the markers.
    // One that loses the race finds them on its next look.
    let epoch = uuid::Uuid::new_v4().simple().to_string();
    let partitions = i32::from(store.keys().partitions());
    let inserted = diesel::sql_query(
        "INSERT INTO budget_state (epoch, partitions) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
    )
    .bind::<Text, _>(&epoch)
    .bind::<Integer, _>(partitions)
    .execute(&mut *conn)
    .await?;
    drop(conn);
    if inserted == 0 {
        return Ok(lost);
    }
    write_markers(store, &lost, &epoch).await?;
    tracing::info!(
        partitions,
        "budget state established (first start of this deployment's database)"
    );
    lost_partitions(store).await
}

/// Checks now and every [`CHECK_EVERY`] until `stop` turns true, setting
/// [`LOST_PARTITIONS`] and logging (rate-limited) while partitions are lost.
pub async fn watch(pool: db::Pool, store: BudgetStore, mut stop: tokio_watch::Receiver<bool>) {
    metrics::describe_gauge!(
        LOST_PARTITIONS,
        "Budget-state partitions Redis has lost (refused until `caracal budget rebuild`)"
    );
    metrics::gauge!(LOST_PARTITIONS).set(0.0);
    let mut log = caracal_service_kit::process::LogLimit::default();
    loop {
        match check(&pool, &store).await {
            Ok(lost) => {
                // At most 65,535 partitions: exact as f64.
                metrics::gauge!(LOST_PARTITIONS)
                    .set(f64::from(u32::try_from(lost.len()).unwrap_or(u32::MAX)));
                if !lost.is_empty() {
                    if let Some(suppressed) = log.allow() {
                        tracing::error!(
                            lost = lost.len(),
                            first = lost.iter().min().copied().unwrap_or_default(),
                            suppressed,
                            "Redis lost the budget state of some partitions: their calls are \
                             refused until `caracal budget rebuild` restores it from the ledger"
                        );
                    }
                }
            }
            Err(error) => {
                if let Some(suppressed) = log.allow() {
                    tracing::warn!(%error, suppressed, "budget-state check failed");
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(CHECK_EVERY) => {}
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    return;
                }
            }
        }
    }
}

fn unavailable(e: &redis::RedisError) -> ServiceError {
    ServiceError::Unavailable(format!(
        "budget store unavailable, cannot check the budget state: {e}"
    ))
}
