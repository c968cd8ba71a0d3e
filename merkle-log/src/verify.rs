//! `verify-range`: recompute every leaf of a range from the current ledger rows and
//! check it against the signed checkpoints; name every event and checkpoint that no
//! longer matches.
//!
//! What is checked, and what each failure means:
//!
//! 1. Every checkpoint's signed note verifies with a known public key, and the
//!    table's `tree_size` / `root` / `key_id` copies agree with the note
//!    ([`FailureKind::CheckpointSignature`], [`FailureKind::CheckpointMismatch`]).
//! 2. The stored tree gives each checkpoint's signed root (O(log n) stored nodes
//!    per checkpoint): otherwise a stored node was edited
//!    ([`FailureKind::StoredTreeMismatch`], the checkpoint named). All checkpoints
//!    matching one stored tree also makes each consistent with the next.
//! 3. Leaf indices are dense: `0 .. tree_size`, each once ([`FailureKind::IndexGap`],
//!    [`FailureKind::IndexRepeated`], [`FailureKind::IndexBeyondTree`]). An event
//!    in the log twice (its row deleted and written again: the sequencer does not
//!    look queued rows up in the log) has each copy checked, and is counted
//!    (`rewritten`), not failed.
//! 4. Each row of the range hashes to the leaf stored at its index. Where not, the
//!    recomputed leaf is checked against the newest checkpoint covering it with an
//!    inclusion proof: included means the row is right and the stored leaf hash was
//!    edited ([`FailureKind::StoredLeafAltered`]); otherwise the row was changed,
//!    or its leaf index moved ([`FailureKind::RowChanged`]).
//! 5. Each leaf of the range still has its row ([`FailureKind::RowDeleted`]), and
//!    each row of the range has a leaf or is queued for one
//!    ([`FailureKind::RowInserted`]: written past the ledger-writer).
//!
//! Rows queued but not sequenced yet, and leaves not yet under a checkpoint, are
//! counted (`pending`, `unsigned`), not failures.

use std::collections::{HashMap, HashSet};

use caracal_domain::merkle::{
    checkpoint::open_checkpoint,
    keys::{key_id_hex, Verifier},
    tree::{self, Hash, NodeId},
};
use chrono::{DateTime, Utc};
use diesel::sql_types::{BigInt, Text, Timestamptz};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use serde::Serialize;

use crate::{
    checkpoints::{self, CheckpointRecord},
    leaves::{self, LeafRef},
    metric, proofs,
    rows::{rows_by_key, LeafRow, RowKey, LEAF_COLUMNS},
    sequencer,
    tiles::TileCache,
    LogError,
};

/// What to verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Rows and leaves with `start <= occurred_at < end`.
    Time {
        start: DateTime<Utc>,
        end: DateTime<Utc>,
    },
    /// Leaves `from .. to` (the self-check: what was published since last time).
    Leaves { from: u64, to: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    CheckpointSignature,
    CheckpointMismatch,
    StoredTreeMismatch,
    IndexGap,
    IndexBeyondTree,
    StoredLeafAltered,
    RowChanged,
    RowDeleted,
    RowInserted,
    IndexRepeated,
}

impl FailureKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::CheckpointSignature => "checkpoint_signature",
            Self::CheckpointMismatch => "checkpoint_mismatch",
            Self::StoredTreeMismatch => "stored_tree_mismatch",
            Self::IndexGap => "index_gap",
            Self::IndexBeyondTree => "index_beyond_tree",
            Self::StoredLeafAltered => "stored_leaf_altered",
            Self::RowChanged => "row_changed",
            Self::RowDeleted => "row_deleted",
            Self::RowInserted => "row_inserted",
            Self::IndexRepeated => "index_repeated",
        }
    }
}

/// One mismatch, naming what it is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Failure {
    pub kind: FailureKind,
    pub event_id: Option<String>,
    pub leaf_index: Option<u64>,
    pub checkpoint: Option<u64>,
    pub detail: String,
}

/// What a verification found.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Report {
    /// Ledger rows of the range recomputed.
    pub events_checked: u64,
    /// Rows of the range queued, not in the log yet.
    pub pending: u64,
    /// Rows of the range in the log but not under a checkpoint yet.
    pub unsigned: u64,
    /// Events of the range in the log more than once, every copy matching the row:
    /// the row was deleted and written again (a replay restoring lost rows). Not a
    /// failure: each copy is checked like any leaf; the extra ones are the trace.
    pub rewritten: u64,
    pub checkpoints_checked: u64,
    pub tree_size: u64,
    pub newest_checkpoint: u64,
    /// Every failure found; `failures` lists the first [`MAX_LISTED`].
    pub failures_total: u64,
    pub failures: Vec<Failure>,
    /// Seconds spent per phase (checkpoints, density, rows, leaf indices, tiles +
    /// hashing, orphans): where a slow verification goes.
    pub phase_seconds: Vec<(String, f64)>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.failures.is_empty()
    }

    fn timed(&mut self, phase: &str, since: std::time::Instant) {
        let secs = since.elapsed().as_secs_f64();
        match self.phase_seconds.iter_mut().find(|(p, _)| p == phase) {
            Some((_, total)) => *total += secs,
            None => self.phase_seconds.push((phase.to_owned(), secs)),
        }
    }

    fn fail(
        &mut self,
        kind: FailureKind,
        event_id: Option<&str>,
        leaf_index: Option<u64>,
        checkpoint: Option<u64>,
        detail: String,
    ) {
        self.failures.push(Failure {
            kind,
            event_id: event_id.map(str::to_owned),
            leaf_index,
            checkpoint,
            detail,
        });
    }
}

/// Most failures listed one by one (the count goes on).
pub const MAX_LISTED: usize = 1000;
/// Rows read per query.
const CHUNK: i64 = 20_000;

fn u(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// Verifies `scope` (see the module doc) with `verifiers` (the auditor's public
/// keys, or `merkle_keys`'). Counts the failures in
/// `caracal_merkle_verification_failures_total`.
pub async fn verify(
    conn: &mut AsyncPgConnection,
    scope: Scope,
    verifiers: &[Verifier],
) -> Result<Report, LogError> {
    let mut report = Report::default();
    let (tree_size, _) = sequencer::state(conn).await?;
    report.tree_size = tree_size;
    let mut cache = TileCache::new();

    // 1 + 2: checkpoints.
    let t = std::time::Instant::now();
    let all = checkpoints::list(conn, 0, u64::MAX >> 1, u64::MAX >> 1).await?;
    let mut signed: Vec<(u64, Hash)> = Vec::with_capacity(all.len());
    for cp in &all {
        report.checkpoints_checked += 1;
        if let Some(root) = check_checkpoint(cp, verifiers, tree_size, &mut report) {
            signed.push((u(cp.tree_size), root));
        }
    }
    report.newest_checkpoint = signed.last().map_or(0, |c| c.0);
    let plans: Vec<NodeId> = signed
        .iter()
        .flat_map(|(size, _)| tree::root_plan(*size))
        .collect();
    cache.fetch(conn, &plans).await?;
    for (size, root) in &signed {
        let hashes: Result<Vec<Hash>, LogError> = tree::root_plan(*size)
            .into_iter()
            .map(|n| cache.node(n))
            .collect();
        match hashes.map(|h| tree::fold_right(&h)) {
            Ok(stored) if stored == *root => {}
            Ok(_) => report.fail(
                FailureKind::StoredTreeMismatch,
                None,
                None,
                Some(*size),
                format!(
                    "checkpoint {size}: the stored tree's root differs from the signed root \
                     (a stored node hash was changed)"
                ),
            ),
            Err(e) => report.fail(
                FailureKind::StoredTreeMismatch,
                None,
                None,
                Some(*size),
                format!("checkpoint {size}: {e}"),
            ),
        }
    }

    report.timed("checkpoints", t);
    // 3: dense indices.
    let t = std::time::Instant::now();
    check_density(conn, scope, tree_size, &mut report).await?;
    report.timed("density", t);

    // 4 + 5: the rows and leaves of the range.
    match scope {
        Scope::Time { start, end } => {
            verify_time(conn, &mut cache, start, end, &signed, &mut report).await?
        }
        Scope::Leaves { from, to } => {
            verify_leaves(
                conn,
                &mut cache,
                from,
                to.min(tree_size),
                &signed,
                &mut report,
            )
            .await?
        }
    }

    if !report.failures.is_empty() {
        metrics::counter!(metric::VERIFICATION_FAILURES).increment(report.failures.len() as u64);
        for f in report.failures.iter().take(20) {
            tracing::error!(
                kind = f.kind.as_str(),
                event_id = f.event_id.as_deref().unwrap_or(""),
                leaf_index = f.leaf_index,
                checkpoint = f.checkpoint,
                "Merkle verification failure: {}",
                f.detail
            );
        }
    }
    report.failures_total = report.failures.len() as u64;
    report.failures.truncate(MAX_LISTED);
    Ok(report)
}

/// Opens one checkpoint; returns its signed root when it verifies.
fn check_checkpoint(
    cp: &CheckpointRecord,
    verifiers: &[Verifier],
    tree_size: u64,
    report: &mut Report,
) -> Option<Hash> {
    let size = u(cp.tree_size);
    let opened = match open_checkpoint(&cp.note, verifiers) {
        Ok(o) => o,
        Err(e) => {
            report.fail(
                FailureKind::CheckpointSignature,
                None,
                None,
                Some(size),
                format!("checkpoint {size}: its signed note does not verify: {e}"),
            );
            return None;
        }
    };
    let mut bad = Vec::new();
    if opened.checkpoint.size != size {
        bad.push(format!("the note says size {}", opened.checkpoint.size));
    }
    if opened.checkpoint.root.as_slice() != cp.root.as_slice() {
        bad.push("the root column differs from the signed root".to_owned());
    }
    if key_id_hex(&opened.key_id) != cp.key_id {
        bad.push(format!(
            "key_id column {} but signed by {}",
            cp.key_id,
            key_id_hex(&opened.key_id)
        ));
    }
    if opened.checkpoint.size > tree_size {
        bad.push(format!("it is beyond the tree's size {tree_size}"));
    }
    if !bad.is_empty() {
        report.fail(
            FailureKind::CheckpointMismatch,
            None,
            None,
            Some(size),
            format!("checkpoint {size}: {}", bad.join("; ")),
        );
    }
    (opened.checkpoint.size <= tree_size).then_some(opened.checkpoint.root)
}

async fn check_density(
    conn: &mut AsyncPgConnection,
    scope: Scope,
    tree_size: u64,
    report: &mut Report,
) -> Result<(), LogError> {
    let (from, to) = match scope {
        Scope::Leaves { from, to } => (from, to.min(tree_size)),
        Scope::Time { .. } => (0, tree_size),
    };
    // The runs in index order must tile `from .. to` exactly: a hole is a leaf
    // removed (or a run moved), an overlap an index held twice.
    let runs = leaves::runs(conn, from, to).await?;
    let mut covered_to = 0; // the end of the runs so far
    let mut listed = 0;
    for run in &runs {
        let (first, end) = (
            u(run.first_index),
            u(run.first_index) + u(i64::from(run.leaves)),
        );
        if first < covered_to && listed < 100 {
            listed += 1;
            report.fail(
                FailureKind::IndexRepeated,
                None,
                Some(first),
                None,
                format!(
                    "leaf indices {first} .. {} are held by two runs of leaves (a run was \
                         inserted or moved)",
                    covered_to.min(end) - 1
                ),
            );
        }
        for gap in covered_to.max(from)..first.min(to) {
            if listed >= 100 {
                break;
            }
            listed += 1;
            report.fail(
                FailureKind::IndexGap,
                None,
                Some(gap),
                None,
                format!("leaf index {gap} has no event (an index was changed or a leaf removed)"),
            );
        }
        covered_to = covered_to.max(end);
    }
    let next = covered_to.max(from);
    if next < to {
        report.fail(
            FailureKind::IndexGap,
            None,
            Some(next),
            None,
            format!(
                "leaf indices {next} .. {} have no event (leaves removed)",
                to - 1
            ),
        );
    }
    let beyond = leaves::by_index(conn, tree_size, u64::MAX).await?;
    for b in beyond.iter().take(100) {
        report.fail(
            FailureKind::IndexBeyondTree,
            Some(&b.event_id),
            Some(u(b.leaf_index)),
            None,
            format!(
                "event {} has leaf index {}, beyond the tree's size {tree_size} (its index was changed)",
                b.event_id, b.leaf_index
            ),
        );
    }
    Ok(())
}

/// The newest signed checkpoint at or above `index + 1` leaves: the one to prove a
/// leaf against.
fn covering(signed: &[(u64, Hash)], index: u64) -> Option<(u64, Hash)> {
    signed.last().copied().filter(|(size, _)| *size > index)
}

/// Step 4 for a batch of (leaf index, event id, recomputed leaf hash).
async fn check_leaves(
    conn: &mut AsyncPgConnection,
    cache: &mut TileCache,
    leaves: &[(u64, String, Hash)],
    signed: &[(u64, Hash)],
    tree_size: u64,
    report: &mut Report,
) -> Result<(), LogError> {
    let nodes: Vec<NodeId> = leaves
        .iter()
        .filter(|l| l.0 < tree_size)
        .map(|l| NodeId::new(0, l.0))
        .collect();
    cache.fetch(conn, &nodes).await?;
    for (index, event_id, recomputed) in leaves {
        let newest = covering(signed, *index);
        if newest.is_none() {
            report.unsigned += 1;
        }
        if *index >= tree_size {
            continue; // named by the density check
        }
        let stored = match cache.leaf(*index) {
            Ok(h) => h,
            Err(e) => {
                report.fail(
                    FailureKind::StoredTreeMismatch,
                    Some(event_id),
                    Some(*index),
                    None,
                    e.to_string(),
                );
                continue;
            }
        };
        if stored == *recomputed {
            continue;
        }
        // Which one changed: the row, or the stored leaf hash?
        let included = match newest {
            Some((size, root)) => {
                let path = proofs::inclusion_path(conn, cache, *index, size).await?;
                tree::verify_inclusion(recomputed, *index, size, &path, &root).is_ok()
            }
            None => false,
        };
        if included {
            report.fail(
                FailureKind::StoredLeafAltered,
                Some(event_id),
                Some(*index),
                newest.map(|c| c.0),
                format!(
                    "event {event_id} (leaf {index}): the row matches the signed checkpoint but \
                     the stored leaf hash was changed"
                ),
            );
        } else {
            report.fail(
                FailureKind::RowChanged,
                Some(event_id),
                Some(*index),
                newest.map(|c| c.0),
                format!(
                    "event {event_id} (leaf {index}): the ledger row no longer matches its leaf{} \
                     (the row was changed, or its leaf index moved)",
                    match newest {
                        Some((size, _)) => format!(" in signed checkpoint {size}"),
                        None => String::new(),
                    }
                ),
            );
        }
    }
    Ok(())
}

async fn verify_time(
    conn: &mut AsyncPgConnection,
    cache: &mut TileCache,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    signed: &[(u64, Hash)],
    report: &mut Report,
) -> Result<(), LogError> {
    if end <= start {
        return Err(LogError::Invalid(format!(
            "--end {end} is not after --start {start}"
        )));
    }
    let tree_size = report.tree_size;
    #[derive(diesel::QueryableByName)]
    struct Key {
        #[diesel(sql_type = Timestamptz)]
        occurred_at: DateTime<Utc>,
        #[diesel(sql_type = Text)]
        event_id: String,
    }
    let queued: HashSet<(DateTime<Utc>, String)> = diesel::sql_query(
        "SELECT u.occurred_at, u.event_id \
         FROM merkle_queue q CROSS JOIN LATERAL unnest(q.occurred_ats, q.event_ids) \
           AS u(occurred_at, event_id) \
         WHERE u.occurred_at >= $1 AND u.occurred_at < $2",
    )
    .bind::<Timestamptz, _>(start)
    .bind::<Timestamptz, _>(end)
    .load::<Key>(conn)
    .await?
    .into_iter()
    .map(|k| (k.occurred_at, k.event_id))
    .collect();

    // Rows of the range a time slice at a time: each slice ends at the time of the
    // CHUNK-th row from its start (plain range scans of the primary key, whose
    // first column is occurred_at; every row of one instant in the same slice).
    #[derive(diesel::QueryableByName)]
    struct Bound {
        #[diesel(sql_type = Timestamptz)]
        occurred_at: DateTime<Utc>,
    }
    let mut lo = start;
    loop {
        let t = std::time::Instant::now();
        let next: Option<Bound> = diesel::sql_query(
            "SELECT occurred_at FROM ledger_events WHERE occurred_at >= $1 AND occurred_at < $2 \
             ORDER BY occurred_at OFFSET $3 LIMIT 1",
        )
        .bind::<Timestamptz, _>(lo)
        .bind::<Timestamptz, _>(end)
        .bind::<BigInt, _>(CHUNK)
        .load::<Bound>(conn)
        .await?
        .pop();
        let hi = match &next {
            // More than CHUNK rows at one instant: that instant alone.
            Some(b) if b.occurred_at == lo => (lo + chrono::Duration::microseconds(1)).min(end),
            Some(b) => b.occurred_at,
            None => end,
        };
        let chunk: Vec<LeafRow> = diesel::sql_query(format!(
            "SELECT {LEAF_COLUMNS} FROM ledger_events e \
             WHERE e.occurred_at >= $1 AND e.occurred_at < $2"
        ))
        .bind::<Timestamptz, _>(lo)
        .bind::<Timestamptz, _>(hi)
        .load(conn)
        .await?;
        let lo_of_slice = lo;
        lo = hi;
        let last_slice = next.is_none();
        report.timed("rows", t);
        let t = std::time::Instant::now();
        let (mut indices, mut extra) = by_key(leaves::by_time(conn, lo_of_slice, hi).await?);
        report.timed("leaf indices", t);
        let t = std::time::Instant::now();
        let mut leaves = Vec::with_capacity(chunk.len());
        for row in chunk {
            let key = (row.occurred_at, row.event_id.clone());
            match indices.remove(&key) {
                Some(index) => {
                    report.events_checked += 1;
                    let hash = row.leaf().hash();
                    // Only an event with a first leaf has copies (checked first).
                    if let Some(copies) = extra.remove(&key) {
                        report.rewritten += 1;
                        leaves.extend(copies.into_iter().map(|i| (i, row.event_id.clone(), hash)));
                    }
                    leaves.push((index, row.event_id.clone(), hash));
                }
                None if queued.contains(&key) => report.pending += 1,
                None => report.fail(
                    FailureKind::RowInserted,
                    Some(&row.event_id),
                    None,
                    None,
                    format!(
                        "event {} (occurred {}): in the ledger but not in the Merkle log, nor \
                         queued for it (written past the ledger-writer)",
                        row.event_id, row.occurred_at
                    ),
                ),
            }
        }
        check_leaves(conn, cache, &leaves, signed, tree_size, report).await?;
        // Leaves of the slice no row claimed: their row is gone.
        let mut orphans: Vec<(RowKey, u64)> = indices
            .into_iter()
            .chain(
                extra
                    .into_iter()
                    .flat_map(|(k, copies)| copies.into_iter().map(move |i| (k.clone(), i))),
            )
            .collect();
        orphans.sort_by_key(|o| o.1);
        for ((_, event_id), index) in orphans {
            report.fail(
                FailureKind::RowDeleted,
                Some(&event_id),
                Some(index),
                covering(signed, index).map(|c| c.0),
                format!(
                    "event {event_id} (leaf {index}): in the Merkle log but its ledger row is gone \
                     (deleted)"
                ),
            );
        }
        report.timed("hashing + tiles", t);
        if last_slice {
            break;
        }
    }
    Ok(())
}

async fn verify_leaves(
    conn: &mut AsyncPgConnection,
    cache: &mut TileCache,
    from: u64,
    to: u64,
    signed: &[(u64, Hash)],
    report: &mut Report,
) -> Result<(), LogError> {
    let tree_size = report.tree_size;
    let mut lo = from;
    while lo < to {
        let hi = (lo + u(CHUNK)).min(to);
        let leaves = leaves::by_index(conn, lo, hi).await?;
        let keys: Vec<(DateTime<Utc>, &str)> = leaves
            .iter()
            .map(|l| (l.occurred_at, l.event_id.as_str()))
            .collect();
        let rows = rows_by_key(conn, &keys).await?;
        let mut recomputed = Vec::with_capacity(leaves.len());
        for l in &leaves {
            match rows.get(&(l.occurred_at, l.event_id.clone())) {
                Some(row) => recomputed.push((u(l.leaf_index), l.event_id.clone(), row.leaf().hash())),
                None => report.fail(
                    FailureKind::RowDeleted,
                    Some(&l.event_id),
                    Some(u(l.leaf_index)),
                    covering(signed, u(l.leaf_index)).map(|c| c.0),
                    format!(
                        "event {} (leaf {}): in the Merkle log but its ledger row is gone (deleted)",
                        l.event_id, l.leaf_index
                    ),
                ),
            }
        }
        report.events_checked += recomputed.len() as u64;
        check_leaves(conn, cache, &recomputed, signed, tree_size, report).await?;
        lo = hi;
    }
    Ok(())
}

/// The leaves of a time slice by row key: the first leaf of each event, and the
/// later copies of the events that have more than one.
fn by_key(leaves: Vec<LeafRef>) -> (HashMap<RowKey, u64>, HashMap<RowKey, Vec<u64>>) {
    let mut first = HashMap::with_capacity(leaves.len());
    let mut extra: HashMap<_, Vec<u64>> = HashMap::new();
    for l in leaves {
        let index = u(l.leaf_index);
        match first.entry((l.occurred_at, l.event_id)) {
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(index);
            }
            std::collections::hash_map::Entry::Occupied(o) => {
                extra.entry(o.key().clone()).or_default().push(index);
            }
        }
    }
    (first, extra)
}
