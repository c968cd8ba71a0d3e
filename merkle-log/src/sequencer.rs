//! One sequencing transaction: the oldest queued rows get the next leaf indices,
//! the tree's new perfect-subtree hashes go into their tiles, a checkpoint is
//! signed at every multiple of `batchSizeLimit` (and when the oldest leaf not under
//! a checkpoint has waited `batchTimeoutSeconds`), the queue entries go, and
//! `merkle_state` moves on: all or nothing. A sequencer killed anywhere leaves the
//! log as it was before the transaction; the next one (this process or another
//! replica) starts from `merkle_state` and redoes it. Indices are therefore dense,
//! each row gets one, and an index never changes once committed. The leaves are
//! stored as runs ([`crate::leaves`]).
//!
//! A queued row is not checked against the log: the ledger-writer queues only the
//! rows its INSERT created, so a row is queued twice only if it was deleted and
//! written again (a replay restoring lost rows); `verify-range` checks both leaves
//! and counts the event as rewritten.
//!
//! `merkle_state` is read `FOR UPDATE` first: two sequencers (the advisory lock in
//! [`crate::service`] normally prevents that) serialise on it, and one that finds
//! the tree bigger than it remembers reloads its right edge from the tiles.

use std::collections::{BTreeMap, HashMap};

use caracal_domain::merkle::{
    checkpoint::{sign_checkpoint, Checkpoint},
    compact::CompactRange,
    keys::{key_id_hex, Signer},
    tree::{Hash, NodeId, HASH_LEN},
};
use chrono::{DateTime, Utc};
use diesel::sql_types::{BigInt, Bool, Bytea, Nullable, Text, Timestamptz};
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use crate::{
    leaves,
    rows::rows_by_key,
    tiles::{self, TileCache, TileKey, TILE_BYTES, TILE_HEIGHT, TILE_WIDTH},
    LogError,
};

/// The right edge of the stored tree: the peaks (to append and compute roots)
/// and the rightmost, still growing tile of each tile level.
#[derive(Debug, Clone, Default)]
pub struct Edge {
    range: CompactRange,
    open: HashMap<TileKey, Vec<u8>>,
}

impl Edge {
    /// Reads the edge of the stored tree of `size` leaves.
    pub async fn load(conn: &mut AsyncPgConnection, size: u64) -> Result<Self, LogError> {
        let mut cache = TileCache::new();
        let ids = CompactRange::peak_ids(size);
        let peaks = cache.nodes(conn, &ids).await?;
        let range = CompactRange::from_peaks(size, peaks)
            .map_err(|e| LogError::Corrupt(format!("right edge of size {size}: {e}")))?;
        let mut open = HashMap::new();
        let mut want = Vec::new();
        for level in 0..8u8 {
            let stored = size >> (u32::from(level) * u32::from(TILE_HEIGHT));
            if stored == 0 {
                break;
            }
            if stored % TILE_WIDTH != 0 {
                want.push(NodeId::new(level * TILE_HEIGHT, stored - 1));
            }
        }
        cache.fetch(conn, &want).await?;
        for node in want {
            let (key, range) = tiles::source(node);
            let tile = cache.tile(&key).ok_or_else(|| {
                LogError::Corrupt(format!("open tile ({}, {}) is missing", key.level, key.idx))
            })?;
            let len = range.end * HASH_LEN;
            let bytes = tile.get(..len).ok_or_else(|| {
                LogError::Corrupt(format!(
                    "open tile ({}, {}) has {} hashes, the tree needs {}",
                    key.level,
                    key.idx,
                    tile.len() / HASH_LEN,
                    range.end
                ))
            })?;
            open.insert(key, bytes.to_vec());
        }
        Ok(Self { range, open })
    }

    pub fn size(&self) -> u64 {
        self.range.size()
    }

    pub fn root(&self) -> Hash {
        self.range.root()
    }

    /// Appends a leaf; every stored hash it completes goes into its open tile
    /// (marked in `dirty`).
    fn append(&mut self, leaf: Hash, dirty: &mut BTreeMap<TileKey, ()>) -> Result<(), LogError> {
        let mut fault = None;
        let open = &mut self.open;
        self.range.append(leaf, |node, hash| {
            let Some((key, slot)) = tiles::slot_of(node) else {
                return;
            };
            let tile = open.entry(key).or_default();
            if tile.len() != slot * HASH_LEN {
                fault = Some(format!(
                    "tile ({}, {}) holds {} hashes, next slot is {slot}",
                    key.level,
                    key.idx,
                    tile.len() / HASH_LEN
                ));
                return;
            }
            tile.extend_from_slice(hash);
            dirty.insert(key, ());
        });
        match fault {
            Some(f) => Err(LogError::Corrupt(f)),
            None => Ok(()),
        }
    }
}

/// Settings of [`Sequencer::step`].
#[derive(Debug, Clone)]
pub struct Limits {
    pub batch_size_limit: u64,
    pub batch_timeout: chrono::Duration,
    pub max_leaves_per_transaction: u64,
}

/// What one [`Sequencer::step`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepOutcome {
    /// Leaves appended.
    pub leaves: u64,
    /// Queue entries dropped: their row is gone (a backfilled row deleted
    /// before it was sequenced).
    pub dropped: u64,
    /// Sizes of the checkpoints published.
    pub checkpoints: Vec<u64>,
    /// Signing time of those checkpoints, seconds each.
    pub signing_seconds: Vec<f64>,
    pub tree_size: u64,
    /// The queue had more than one transaction's worth.
    pub more: bool,
}

/// The sequencer's memory between transactions.
pub struct Sequencer {
    edge: Option<Edge>,
    signer: Signer,
    origin: String,
    limits: Limits,
}

#[derive(diesel::QueryableByName)]
struct StateRow {
    #[diesel(sql_type = BigInt)]
    tree_size: i64,
    #[diesel(sql_type = BigInt)]
    checkpoint_size: i64,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pending_since: Option<DateTime<Utc>>,
}

#[derive(diesel::QueryableByName)]
struct QueueRow {
    #[diesel(sql_type = BigInt)]
    id: i64,
    /// The row's place in its entry's arrays (from 1).
    #[diesel(sql_type = BigInt)]
    ord: i64,
    #[diesel(sql_type = Timestamptz)]
    occurred_at: DateTime<Utc>,
    #[diesel(sql_type = Text)]
    event_id: String,
    #[diesel(sql_type = Nullable<Bytea>)]
    leaf_hash: Option<Vec<u8>>,
    /// Entries were left in the queue (the same on every row).
    #[diesel(sql_type = Bool)]
    more: bool,
}

/// The statement that takes the oldest queue entries (see `step_in_transaction`).
const TAKE_QUEUE: &str =
    "WITH head AS (SELECT id, leaves FROM merkle_queue ORDER BY id LIMIT $2), \
          pick AS (SELECT id FROM (SELECT id, sum(leaves) OVER (ORDER BY id) - leaves \
                                   AS before FROM head) b WHERE before < $1), \
          q AS (DELETE FROM merkle_queue WHERE id IN (SELECT id FROM pick) \
                RETURNING id, occurred_ats, event_ids, leaf_hashes) \
     SELECT q.id, u.ord, u.occurred_at, u.event_id, u.leaf_hash, \
            (SELECT count(*) FROM head) > (SELECT count(*) FROM pick) AS more \
     FROM q CROSS JOIN LATERAL unnest(q.occurred_ats, q.event_ids, q.leaf_hashes) \
            WITH ORDINALITY AS u(occurred_at, event_id, leaf_hash, ord)";

/// Queue entries one transaction takes at most (each is one writer statement's
/// rows; `max_leaves_per_transaction` bounds the rows).
const MAX_ENTRIES_PER_TRANSACTION: i64 = 1024;

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

impl Sequencer {
    pub fn new(signer: Signer, origin: &str, limits: Limits) -> Self {
        Self {
            edge: None,
            signer,
            origin: origin.to_owned(),
            limits,
        }
    }

    /// Signs with `signer` from the next checkpoint on (key rotation).
    pub fn set_signer(&mut self, signer: Signer) {
        self.signer = signer;
    }

    pub fn signer(&self) -> &Signer {
        &self.signer
    }

    /// One transaction (see the module doc). On error nothing was written and the
    /// in-memory edge is dropped (reloaded next time).
    pub async fn step(&mut self, conn: &mut AsyncPgConnection) -> Result<StepOutcome, LogError> {
        diesel::sql_query("BEGIN").execute(conn).await?;
        match self.step_in_transaction(conn).await {
            Ok((outcome, edge)) => {
                if let Err(e) = diesel::sql_query("COMMIT").execute(conn).await {
                    self.edge = None;
                    return Err(e.into());
                }
                self.edge = Some(edge);
                Ok(outcome)
            }
            Err(e) => {
                self.edge = None;
                let _ = diesel::sql_query("ROLLBACK").execute(conn).await;
                Err(e)
            }
        }
    }

    async fn step_in_transaction(
        &mut self,
        conn: &mut AsyncPgConnection,
    ) -> Result<(StepOutcome, Edge), LogError> {
        let state: StateRow = diesel::sql_query(
            "SELECT tree_size, checkpoint_size, pending_since FROM merkle_state \
             WHERE id = 1 FOR UPDATE",
        )
        .get_result(conn)
        .await?;
        let size = to_u64(state.tree_size);
        let mut edge = match self.edge.take() {
            Some(edge) if edge.size() == size => edge,
            _ => Edge::load(conn, size).await?,
        };
        // The oldest queue entries (one per writer statement, its rows as arrays),
        // whole, up to about max_leaves_per_transaction rows, taken off the queue in
        // the same statement (the transaction puts them back if it fails) and
        // unnested in array order.
        let mut queue: Vec<QueueRow> = diesel::sql_query(TAKE_QUEUE)
            .bind::<BigInt, _>(to_i64(self.limits.max_leaves_per_transaction))
            .bind::<BigInt, _>(MAX_ENTRIES_PER_TRANSACTION)
            .load(conn)
            .await?;
        queue.sort_unstable_by_key(|q| (q.id, q.ord));
        let more = queue.iter().any(|q| q.more);
        let backfill = backfill_hashes(conn, &queue).await?;

        let mut outcome = StepOutcome {
            more,
            ..StepOutcome::default()
        };
        let mut checkpoint_size = to_u64(state.checkpoint_size);
        let mut pending_since = state.pending_since;
        let now = Utc::now();
        let mut dirty = BTreeMap::new();
        let first_index = edge.size();
        let mut leaf_time = Vec::with_capacity(queue.len());
        let mut leaf_event: Vec<&str> = Vec::with_capacity(queue.len());
        let mut checkpoints: Vec<(u64, Hash)> = Vec::new();
        for entry in &queue {
            let hash = match &entry.leaf_hash {
                Some(bytes) => <Hash>::try_from(bytes.as_slice()).map_err(|_| {
                    LogError::Corrupt(format!("queue entry {} has a bad leaf hash", entry.id))
                })?,
                None => match backfill.get(&(entry.occurred_at, entry.event_id.clone())) {
                    Some(h) => *h,
                    None => {
                        tracing::error!(
                            event_id = %entry.event_id,
                            occurred_at = %entry.occurred_at,
                            "a queued ledger row is gone before it was sequenced; not in the log"
                        );
                        outcome.dropped += 1;
                        continue;
                    }
                },
            };
            leaf_time.push(entry.occurred_at);
            leaf_event.push(&entry.event_id);
            edge.append(hash, &mut dirty)?;
            outcome.leaves += 1;
            if edge.size() % self.limits.batch_size_limit == 0 {
                checkpoints.push((edge.size(), edge.root()));
                checkpoint_size = edge.size();
                pending_since = None;
            } else if pending_since.is_none() {
                pending_since = Some(now);
            }
        }
        if edge.size() > checkpoint_size
            && pending_since.is_some_and(|t| now - t >= self.limits.batch_timeout)
        {
            checkpoints.push((edge.size(), edge.root()));
            checkpoint_size = edge.size();
            pending_since = None;
        }

        leaves::append(conn, first_index, &leaf_time, &leaf_event).await?;
        let written: Vec<(TileKey, &[u8])> = dirty
            .keys()
            .filter_map(|k| edge.open.get(k).map(|t| (*k, t.as_slice())))
            .collect();
        tiles::write(conn, &written).await?;
        // Full tiles never change again: only the open ones stay in memory.
        edge.open.retain(|_, t| t.len() < TILE_BYTES);
        for (size, root) in checkpoints {
            let cp = Checkpoint {
                origin: self.origin.clone(),
                size,
                root,
                timestamp_unix: now.timestamp(),
            };
            let started = std::time::Instant::now();
            let note = sign_checkpoint(&cp, &self.signer);
            outcome
                .signing_seconds
                .push(started.elapsed().as_secs_f64());
            diesel::sql_query(
                "INSERT INTO merkle_checkpoints (tree_size, root, key_id, note, published_at) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind::<BigInt, _>(to_i64(size))
            .bind::<Bytea, _>(root.as_slice())
            .bind::<Text, _>(key_id_hex(&self.signer.id()))
            .bind::<Text, _>(&note)
            .bind::<Timestamptz, _>(now)
            .execute(conn)
            .await?;
            outcome.checkpoints.push(size);
        }
        diesel::sql_query(
            "UPDATE merkle_state SET tree_size = $1, checkpoint_size = $2, pending_since = $3, \
             updated_at = now() WHERE id = 1",
        )
        .bind::<BigInt, _>(to_i64(edge.size()))
        .bind::<BigInt, _>(to_i64(checkpoint_size))
        .bind::<Nullable<Timestamptz>, _>(pending_since)
        .execute(conn)
        .await?;
        outcome.tree_size = edge.size();
        Ok((outcome, edge))
    }
}

/// Leaf hashes of the queued rows that came without one (the backfill of rows
/// written before the log existed), from the stored rows.
async fn backfill_hashes(
    conn: &mut AsyncPgConnection,
    queue: &[QueueRow],
) -> Result<HashMap<(DateTime<Utc>, String), Hash>, LogError> {
    let missing: Vec<&QueueRow> = queue.iter().filter(|q| q.leaf_hash.is_none()).collect();
    if missing.is_empty() {
        return Ok(HashMap::new());
    }
    let keys: Vec<(DateTime<Utc>, &str)> = missing
        .iter()
        .map(|q| (q.occurred_at, q.event_id.as_str()))
        .collect();
    let rows = rows_by_key(conn, &keys).await?;
    Ok(rows
        .into_iter()
        .map(|(key, row)| (key, row.leaf().hash()))
        .collect())
}

/// `merkle_state`: the tree size and the last checkpoint's size.
pub async fn state(conn: &mut AsyncPgConnection) -> Result<(u64, u64), LogError> {
    let s: StateRow = diesel::sql_query(
        "SELECT tree_size, checkpoint_size, pending_since FROM merkle_state WHERE id = 1",
    )
    .get_result(conn)
    .await?;
    Ok((to_u64(s.tree_size), to_u64(s.checkpoint_size)))
}

/// Ledger rows waiting in `merkle_queue` (the sum of its entries' rows).
pub async fn queue_depth(conn: &mut AsyncPgConnection) -> Result<u64, LogError> {
    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let c: Count =
        diesel::sql_query("SELECT coalesce(sum(leaves), 0)::int8 AS n FROM merkle_queue")
            .get_result(conn)
            .await?;
    Ok(to_u64(c.n))
}
