//! What the PostgreSQL consumers (ledger-writer, audit-logger) share around their
//! one-statement, idempotent batch insert: the write a [`crate::runner::Handler`]
//! retries, and the reachability check that tells an outage from a refused item.

use std::{future::Future, pin::Pin, time::Duration};

use caracal_service_kit::db::{self, Pool};
use diesel_async::AsyncPgConnection;

/// How long a reachability check may take.
const PING_TIMEOUT: Duration = Duration::from_secs(3);

/// A batch insert: writes the rows in one statement, returns how many were new.
pub type Insert<T> = for<'c> fn(
    &'c mut AsyncPgConnection,
    &'c [T],
) -> Pin<
    Box<dyn Future<Output = Result<usize, diesel::result::Error>> + Send + 'c>,
>;

/// Writes `items` with `insert` on a pooled connection. Rows already there
/// (a redelivery) are counted in a debug line saying `duplicates_are`.
pub async fn write<T: Sync>(
    pool: Pool,
    items: &[T],
    insert: Insert<T>,
    duplicates_are: &'static str,
) -> Result<(), String> {
    let mut conn = pool
        .get()
        .await
        .map_err(|e| format!("database unavailable: {e}"))?;
    let inserted = insert(&mut conn, items)
        .await
        .map_err(|e| format!("insert failed: {e}"))?;
    if inserted < items.len() {
        tracing::debug!(duplicates = items.len() - inserted, "{duplicates_are}");
    }
    Ok(())
}

/// Whether PostgreSQL answers at all.
pub async fn reachable(pool: Pool) -> bool {
    db::ping(&pool, PING_TIMEOUT).await.is_ok()
}
