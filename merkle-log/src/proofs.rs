//! Proofs from the stored tree: inclusion (a self-contained proof file) and
//! consistency between two checkpoints, and the raw leaves for auditors with their
//! own tools. Every proof reads O(log n) tiles ([`crate::tiles`]).

use caracal_domain::merkle::{
    keys::Verifier,
    leaf::LedgerLeaf,
    proof_file::ProofFile,
    tree::{self, Hash},
};
use chrono::{DateTime, Utc};
use diesel::sql_types::{BigInt, Text, Timestamptz};
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use crate::{
    checkpoints::{self, CheckpointRecord},
    leaves,
    rows::{rows_by_key, LeafRow, LEAF_COLUMNS},
    tiles::TileCache,
    LogError,
};

/// The audit path of leaf `index` in the stored tree of `size` leaves.
pub async fn inclusion_path(
    conn: &mut AsyncPgConnection,
    cache: &mut TileCache,
    index: u64,
    size: u64,
) -> Result<Vec<Hash>, LogError> {
    let plan = tree::inclusion_plan(index, size).map_err(|e| LogError::Invalid(e.to_string()))?;
    let hashes = cache.nodes(conn, plan.nodes()).await?;
    plan.assemble(&hashes)
        .map_err(|e| LogError::Corrupt(e.to_string()))
}

/// The consistency proof between the stored trees of `size1` and `size2` leaves.
pub async fn consistency_path(
    conn: &mut AsyncPgConnection,
    cache: &mut TileCache,
    size1: u64,
    size2: u64,
) -> Result<Vec<Hash>, LogError> {
    let plan =
        tree::consistency_plan(size1, size2).map_err(|e| LogError::Invalid(e.to_string()))?;
    let hashes = cache.nodes(conn, plan.nodes()).await?;
    plan.assemble(&hashes)
        .map_err(|e| LogError::Corrupt(e.to_string()))
}

/// Where event `event_id` is in the log: its leaf index and row.
pub async fn find_event(
    conn: &mut AsyncPgConnection,
    event_id: &str,
) -> Result<(u64, LeafRow), LogError> {
    // The log finds leaves by time, not by event id alone (an index on event ids
    // cost the sequencer a third of its insert time). The ledger finds the row's
    // time: the event ids the services make are `<reservation id>/<kind>`, and
    // ledger_events is indexed by reservation id. An id of another shape falls
    // back to scanning the leaves.
    #[derive(diesel::QueryableByName)]
    struct At {
        #[diesel(sql_type = Timestamptz)]
        occurred_at: DateTime<Utc>,
    }
    let reservation = event_id.rsplit_once('/').map_or("", |(r, _)| r);
    let times: Vec<At> = diesel::sql_query(
        "SELECT occurred_at FROM ledger_events WHERE reservation_id = $2 AND event_id = $1",
    )
    .bind::<Text, _>(event_id)
    .bind::<Text, _>(reservation)
    .load(conn)
    .await?;
    let mut refs = Vec::new();
    for at in &times {
        refs.extend(leaves::of_row(conn, at.occurred_at, event_id).await?);
    }
    if times.is_empty() {
        refs = leaves::of_event_scan(conn, event_id).await?;
    }
    refs.sort_by_key(|r| r.leaf_index);
    // One row in the log twice (deleted and written again, see verify.rs): both
    // leaves commit to the same row; the first is its leaf of record.
    if refs.len() > 1 && refs.iter().all(|r| r.occurred_at == refs[0].occurred_at) {
        refs.truncate(1);
    }
    let leaf = match refs.as_slice() {
        [one] => one,
        [] => {
            #[derive(diesel::QueryableByName)]
            struct Queued {
                #[diesel(sql_type = BigInt)]
                n: i64,
            }
            let q: Queued = diesel::sql_query(
                "SELECT count(*) AS n FROM merkle_queue WHERE $1 = ANY (event_ids)",
            )
            .bind::<Text, _>(event_id)
            .get_result(conn)
            .await?;
            return Err(LogError::NotFound(if q.n > 0 {
                format!("event {event_id} is written but not sequenced yet: try again in a moment")
            } else {
                format!("event {event_id} is not in the Merkle log")
            }));
        }
        many => {
            return Err(LogError::Invalid(format!(
                "event id {event_id} names {} leaves (indices {}): the ledger holds that id at \
                 several times",
                many.len(),
                many.iter()
                    .map(|r| r.leaf_index.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )))
        }
    };
    let row: Option<LeafRow> = diesel::sql_query(format!(
        "SELECT {LEAF_COLUMNS} FROM ledger_events e WHERE e.occurred_at = $1 AND e.event_id = $2"
    ))
    .bind::<Timestamptz, _>(leaf.occurred_at)
    .bind::<Text, _>(event_id)
    .get_result(conn)
    .await
    .map(Some)
    .or_else(|e| match e {
        diesel::result::Error::NotFound => Ok(None),
        e => Err(e),
    })?;
    let row = row.ok_or_else(|| {
        LogError::Corrupt(format!(
            "event {event_id} has leaf {} but its ledger row is gone (deleted?): run verify-range",
            leaf.leaf_index
        ))
    })?;
    Ok((u64::try_from(leaf.leaf_index).unwrap_or(0), row))
}

/// The inclusion proof file of `event_id` under the checkpoint of `size` leaves
/// (default: the newest). It is checked against `verifiers` before it is returned:
/// a proof that does not verify means the row or the tree was changed, and is
/// refused with the reason.
pub async fn prove_event(
    conn: &mut AsyncPgConnection,
    event_id: &str,
    size: Option<u64>,
    verifiers: &[Verifier],
) -> Result<ProofFile, LogError> {
    let (index, row) = find_event(conn, event_id).await?;
    let checkpoint = checkpoints::get(conn, size).await?;
    let tree_size = u64::try_from(checkpoint.tree_size).unwrap_or(0);
    if index >= tree_size {
        return Err(LogError::NotFound(format!(
            "event {event_id} is leaf {index}, not under the checkpoint of size {tree_size} yet \
             (checkpoints follow every batchSizeLimit leaves or batchTimeoutSeconds)"
        )));
    }
    let mut cache = TileCache::new();
    let path = inclusion_path(conn, &mut cache, index, tree_size).await?;
    let leaf: LedgerLeaf = row.leaf();
    // `new` checks the proof against the note's root: a failure here means the row
    // (or the stored tree) no longer matches what was signed.
    let file = ProofFile::new(&leaf, index, &path, &checkpoint.note).map_err(|e| {
        LogError::Corrupt(format!(
            "event {event_id} (leaf {index}) no longer matches checkpoint {tree_size}: {e}; \
             run `caracal merkle verify-range`"
        ))
    })?;
    file.verify(verifiers).map_err(|e| {
        LogError::Corrupt(format!(
            "the proof of event {event_id} (leaf {index}) does not verify against checkpoint \
             {tree_size}: {e}; run `caracal merkle verify-range`"
        ))
    })?;
    Ok(file)
}

/// A consistency proof between two published checkpoints, with both.
pub async fn prove_consistency(
    conn: &mut AsyncPgConnection,
    from: u64,
    to: u64,
) -> Result<(CheckpointRecord, CheckpointRecord, Vec<Hash>), LogError> {
    if from > to {
        return Err(LogError::Invalid(format!(
            "--from {from} is larger than --to {to}"
        )));
    }
    let older = checkpoints::get(conn, Some(from)).await?;
    let newer = checkpoints::get(conn, Some(to)).await?;
    let mut cache = TileCache::new();
    let path = consistency_path(conn, &mut cache, from, to).await?;
    Ok((older, newer, path))
}

/// One exported leaf: its index, event and canonical bytes (None: the row is gone).
#[derive(Debug, Clone, PartialEq)]
pub struct ExportedLeaf {
    pub leaf_index: u64,
    pub event_id: String,
    pub leaf: Option<Vec<u8>>,
}

/// Most leaves one export returns.
pub const MAX_EXPORT: u64 = 100_000;

/// Leaves `from ..= to` (at most [`MAX_EXPORT`]), rebuilt from the current rows.
pub async fn export_leaves(
    conn: &mut AsyncPgConnection,
    from: u64,
    to: u64,
) -> Result<Vec<ExportedLeaf>, LogError> {
    if from > to {
        return Err(LogError::Invalid(format!(
            "--from {from} is larger than --to {to}"
        )));
    }
    if to - from >= MAX_EXPORT {
        return Err(LogError::Invalid(format!(
            "at most {MAX_EXPORT} leaves per export; ask for several ranges"
        )));
    }
    let leaves = leaves::by_index(conn, from, to.saturating_add(1)).await?;
    let keys: Vec<(DateTime<Utc>, &str)> = leaves
        .iter()
        .map(|l| (l.occurred_at, l.event_id.as_str()))
        .collect();
    let rows = rows_by_key(conn, &keys).await?;
    Ok(leaves
        .iter()
        .map(|l| ExportedLeaf {
            leaf_index: u64::try_from(l.leaf_index).unwrap_or(0),
            event_id: l.event_id.clone(),
            leaf: rows
                .get(&(l.occurred_at, l.event_id.clone()))
                .map(|r| r.leaf().encode()),
        })
        .collect())
}
