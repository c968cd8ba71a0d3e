//! The published checkpoints (`merkle_checkpoints`): each a C2SP tlog-checkpoint
//! body in a signed note. `tree_size` and `root` are copies of the note's for
//! queries; only the note is trusted, and verify-range checks they agree.

use chrono::{DateTime, Utc};
use diesel::sql_types::{BigInt, Bytea, Text, Timestamptz};
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use crate::LogError;

#[derive(Debug, Clone, PartialEq, diesel::QueryableByName)]
pub struct CheckpointRecord {
    #[diesel(sql_type = BigInt)]
    pub tree_size: i64,
    #[diesel(sql_type = Bytea)]
    pub root: Vec<u8>,
    #[diesel(sql_type = Text)]
    pub key_id: String,
    #[diesel(sql_type = Text)]
    pub note: String,
    #[diesel(sql_type = Timestamptz)]
    pub published_at: DateTime<Utc>,
}

const COLUMNS: &str = "tree_size, root, key_id, note, published_at";

/// Checkpoints with `from <= tree_size <= to`, oldest first, at most `limit`.
pub async fn list(
    conn: &mut AsyncPgConnection,
    from: u64,
    to: u64,
    limit: u64,
) -> Result<Vec<CheckpointRecord>, LogError> {
    Ok(diesel::sql_query(format!(
        "SELECT {COLUMNS} FROM merkle_checkpoints WHERE tree_size BETWEEN $1 AND $2 \
         ORDER BY tree_size LIMIT $3"
    ))
    .bind::<BigInt, _>(i64::try_from(from).unwrap_or(i64::MAX))
    .bind::<BigInt, _>(i64::try_from(to).unwrap_or(i64::MAX))
    .bind::<BigInt, _>(i64::try_from(limit).unwrap_or(i64::MAX))
    .load(conn)
    .await?)
}

/// The newest `limit` checkpoints, newest first.
pub async fn newest(
    conn: &mut AsyncPgConnection,
    limit: u64,
) -> Result<Vec<CheckpointRecord>, LogError> {
    Ok(diesel::sql_query(format!(
        "SELECT {COLUMNS} FROM merkle_checkpoints ORDER BY tree_size DESC LIMIT $1"
    ))
    .bind::<BigInt, _>(i64::try_from(limit).unwrap_or(i64::MAX))
    .load(conn)
    .await?)
}

/// The checkpoint of exactly `size` leaves, or the newest when `size` is None.
pub async fn get(
    conn: &mut AsyncPgConnection,
    size: Option<u64>,
) -> Result<CheckpointRecord, LogError> {
    let found = match size {
        Some(size) => list(conn, size, size, 1).await?.pop(),
        None => newest(conn, 1).await?.pop(),
    };
    found.ok_or_else(|| match size {
        Some(size) => LogError::NotFound(format!("no checkpoint of tree size {size}")),
        None => LogError::NotFound("no checkpoint published yet".into()),
    })
}
