//! Which event each leaf is: `merkle_leaf_runs`, one row per run of up to
//! [`RUN_LEAVES`] consecutive leaves (migration `2026-12-07-100000_merkle_leaf_runs`).
//!
//! A row per leaf cost a heap tuple and two index entries per ledger row, most of
//! what the sequencer took from the ledger-writer's ingest; a run costs that once
//! per 1024 leaves. Every read here narrows the runs first (by the primary key for
//! an index range, by the GiST index over each run's time span for a time range)
//! and only then unnests them: the `merkle_leaves` view unnests every run and is
//! for operators' ad-hoc queries.
//!
//! Runs are never changed; that they are dense and do not overlap is what
//! [`runs`] lets `verify-range` check.

use chrono::{DateTime, Utc};
use diesel::sql_types::{Array, BigInt, Integer, Text, Timestamptz};
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use crate::LogError;

/// Most leaves in one run (the table's CHECK says the same).
pub const RUN_LEAVES: usize = 1024;

/// One leaf: its index and its ledger row's key.
#[derive(Debug, Clone, PartialEq, Eq, diesel::QueryableByName)]
pub struct LeafRef {
    #[diesel(sql_type = BigInt)]
    pub leaf_index: i64,
    #[diesel(sql_type = Timestamptz)]
    pub occurred_at: DateTime<Utc>,
    #[diesel(sql_type = Text)]
    pub event_id: String,
}

/// A run's place: leaves `first_index .. first_index + leaves`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, diesel::QueryableByName)]
pub struct Run {
    #[diesel(sql_type = BigInt)]
    pub first_index: i64,
    #[diesel(sql_type = Integer)]
    pub leaves: i32,
}

fn i(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The leaves of a run, one row per leaf (`r` is the run's alias).
const UNNEST: &str = "SELECT r.first_index + u.ord - 1 AS leaf_index, u.occurred_at, u.event_id \
     FROM merkle_leaf_runs r CROSS JOIN LATERAL unnest(r.occurred_ats, r.event_ids) \
       WITH ORDINALITY AS u(occurred_at, event_id, ord)";

/// Stores leaves `first_index ..` as runs of at most [`RUN_LEAVES`], in one
/// statement (the sequencer's transaction).
pub async fn append(
    conn: &mut AsyncPgConnection,
    first_index: u64,
    occurred_ats: &[DateTime<Utc>],
    event_ids: &[&str],
) -> Result<(), LogError> {
    if occurred_ats.len() != event_ids.len() {
        return Err(LogError::Invalid(format!(
            "{} times for {} events",
            occurred_ats.len(),
            event_ids.len()
        )));
    }
    if occurred_ats.is_empty() {
        return Ok(());
    }
    // Run g holds array elements g*RUN_LEAVES+1 ..= min((g+1)*RUN_LEAVES, n).
    diesel::sql_query(
        "INSERT INTO merkle_leaf_runs (first_index, leaves, occurred_ats, event_ids) \
         SELECT $1 + g * $4, least($4, $5 - g * $4), \
                ($2::timestamptz[])[g * $4 + 1 : least((g + 1) * $4, $5)], \
                ($3::text[])[g * $4 + 1 : least((g + 1) * $4, $5)] \
         FROM generate_series(0, ($5 - 1) / $4) AS g",
    )
    .bind::<BigInt, _>(i(first_index))
    .bind::<Array<Timestamptz>, _>(occurred_ats)
    .bind::<Array<Text>, _>(event_ids)
    .bind::<Integer, _>(RUN_LEAVES as i32)
    .bind::<Integer, _>(
        i32::try_from(occurred_ats.len()).map_err(|_| {
            LogError::Invalid(format!("{} leaves in one append", occurred_ats.len()))
        })?,
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Leaves `from .. to`, by index.
pub async fn by_index(
    conn: &mut AsyncPgConnection,
    from: u64,
    to: u64,
) -> Result<Vec<LeafRef>, LogError> {
    if to <= from {
        return Ok(Vec::new());
    }
    // A run starting more than RUN_LEAVES before `from` ends before it.
    Ok(diesel::sql_query(format!(
        "SELECT * FROM ({UNNEST} WHERE r.first_index > $1 - {RUN_LEAVES} AND r.first_index < $2) l \
         WHERE l.leaf_index >= $1 AND l.leaf_index < $2 ORDER BY l.leaf_index"
    ))
    .bind::<BigInt, _>(i(from))
    .bind::<BigInt, _>(i(to))
    .load(conn)
    .await?)
}

/// Leaves whose row occurred in `start .. end`, by index.
pub async fn by_time(
    conn: &mut AsyncPgConnection,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
) -> Result<Vec<LeafRef>, LogError> {
    if end <= start {
        return Ok(Vec::new());
    }
    Ok(diesel::sql_query(format!(
        "SELECT * FROM ({UNNEST} WHERE merkle_time_span(r.occurred_ats) && tstzrange($1, $2, '[)')) l \
         WHERE l.occurred_at >= $1 AND l.occurred_at < $2 ORDER BY l.leaf_index"
    ))
    .bind::<Timestamptz, _>(start)
    .bind::<Timestamptz, _>(end)
    .load(conn)
    .await?)
}

/// The leaves of one ledger row (normally one; more only if the row was deleted
/// and written again). Many runs can cover one instant (rows are timed to the
/// millisecond or coarser): each is searched for the id in place
/// (`array_positions`), not unnested.
pub async fn of_row(
    conn: &mut AsyncPgConnection,
    occurred_at: DateTime<Utc>,
    event_id: &str,
) -> Result<Vec<LeafRef>, LogError> {
    Ok(diesel::sql_query(
        "SELECT r.first_index + p - 1 AS leaf_index, r.occurred_ats[p] AS occurred_at, \
                $2 AS event_id \
         FROM merkle_leaf_runs r CROSS JOIN LATERAL unnest(array_positions(r.event_ids, $2)) AS p \
         WHERE merkle_time_span(r.occurred_ats) && tstzrange($1, $1, '[]') \
           AND r.occurred_ats[p] = $1 \
         ORDER BY 1",
    )
    .bind::<Timestamptz, _>(occurred_at)
    .bind::<Text, _>(event_id)
    .load(conn)
    .await?)
}

/// The leaves of `event_id` at any time: every run unnested (for event ids that
/// do not name their ledger row's reservation; slow on a big log).
pub async fn of_event_scan(
    conn: &mut AsyncPgConnection,
    event_id: &str,
) -> Result<Vec<LeafRef>, LogError> {
    Ok(diesel::sql_query(format!(
        "SELECT * FROM ({UNNEST} WHERE $1 = ANY (r.event_ids)) l WHERE l.event_id = $1 \
         ORDER BY l.leaf_index"
    ))
    .bind::<Text, _>(event_id)
    .load(conn)
    .await?)
}

/// The runs holding any leaf of `from .. to`, by first index (their headers only:
/// what the density check needs).
pub async fn runs(conn: &mut AsyncPgConnection, from: u64, to: u64) -> Result<Vec<Run>, LogError> {
    Ok(diesel::sql_query(format!(
        "SELECT first_index, leaves FROM merkle_leaf_runs \
         WHERE first_index > $1 - {RUN_LEAVES} AND first_index < $2 \
           AND first_index + leaves > $1 \
         ORDER BY first_index, leaves"
    ))
    .bind::<BigInt, _>(i(from))
    .bind::<BigInt, _>(i(to))
    .load(conn)
    .await?)
}
