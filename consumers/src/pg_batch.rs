//! What the PostgreSQL consumers (ledger-writer, audit-logger) share around their
//! one-statement, idempotent batch insert: the write a [`crate::runner::Handler`]
//! retries, and the reachability check that tells an outage from a refused item.

use std::{future::Future, pin::Pin, time::Duration};

use caracal_service_kit::db::{self, Pool};
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel_async::AsyncPgConnection;

use crate::runner::{Fault, WriteError};

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
) -> Result<(), WriteError> {
    let mut conn = pool
        .get()
        .await
        .map_err(|e| WriteError::store(format!("database unavailable: {e}")))?;
    let inserted = insert(&mut conn, items).await.map_err(|e| WriteError {
        fault: fault(&e),
        message: format!("insert failed: {e}"),
    })?;
    if inserted < items.len() {
        tracing::debug!(duplicates = items.len() - inserted, "{duplicates_are}");
    }
    Ok(())
}

/// Whose fault a failed insert is. Only an integrity-constraint violation (SQLSTATE
/// class 23, as diesel-async classifies it) or a row that cannot be encoded is the
/// row's own; everything else (read-only transaction 25006, disk full 53100, no
/// privilege 42501, a lost connection, ...) is the database's state, retried for as
/// long as it lasts. diesel-async keeps no SQLSTATE beyond class 23 and 25006, so a
/// data exception (class 22) counts as the database's too: it then stalls visibly
/// (not ready, `caracal_consumer_stalled_partitions`) instead of leaving the ledger.
/// [`crate::ledger::decode`] refuses what would raise one (lengths, ranges, NUL).
pub fn fault(error: &DieselError) -> Fault {
    match error {
        DieselError::DatabaseError(
            DatabaseErrorKind::UniqueViolation
            | DatabaseErrorKind::ForeignKeyViolation
            | DatabaseErrorKind::NotNullViolation
            | DatabaseErrorKind::CheckViolation
            | DatabaseErrorKind::ExclusionViolation
            | DatabaseErrorKind::RestrictViolation,
            _,
        )
        | DieselError::SerializationError(_) => Fault::Item,
        _ => Fault::Store,
    }
}

/// Whether PostgreSQL answers at all.
pub async fn reachable(pool: Pool) -> bool {
    db::ping(&pool, PING_TIMEOUT).await.is_ok()
}
