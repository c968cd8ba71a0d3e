//! Budget snapshots (`caracal snapshot ...`): what one consistent point of the
//! deployment holds, how it is written down and checked, and where it is kept.
//!
//! A snapshot is the base a restore starts from when Redis, the ledger or both are
//! gone: per policy window the spend the ledger had, the reservations open, where
//! the ledger stood on each partition of the metering topic (`ledger_cut`: the
//! rows "in" the snapshot are exactly those below it, which is what lets a restore
//! add the rows after it and a replay re-feed them), every consumer group's
//! committed offsets, the newest signed Merkle checkpoint, and the configuration
//! rows (agents, policies, keys, identities, allowlists, price book) a fresh
//! database needs before any balance means anything.
//!
//! Written as one JSON document whose BLAKE3 hash is its checksum; a snapshot
//! whose bytes no longer hash to it is refused, never half-used. Kept in
//! PostgreSQL (`budget_snapshots`) or as files in a directory (a volume, or an
//! object-storage mount: what survives losing the database), behind one interface,
//! [`SnapshotStore`].

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use chrono::{DateTime, NaiveDateTime, Utc};
use diesel::sql_types::{BigInt, Binary, Integer, Text, Timestamptz};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use serde::{Deserialize, Serialize};

/// The document's format; a reader refuses any other.
pub const FORMAT: u32 = 1;

/// File name suffix in a directory store.
const FILE_SUFFIX: &str = ".snapshot";

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("database: {0}")]
    Db(#[from] diesel::result::Error),
    #[error("snapshot directory {path}: {reason}")]
    Io { path: String, reason: String },
    /// The stored bytes do not match their checksum, or are not a snapshot.
    #[error("snapshot {id} is corrupt: {reason}")]
    Corrupt { id: String, reason: String },
    #[error("{0}")]
    Invalid(String),
}

/// Where the hot path keeps its budget keys: a snapshot's counter keys mean
/// something only under the same layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyLayout {
    pub prefix: String,
    pub partitions: u16,
}

/// Where the ledger stood on one partition: every row read from `topic` /
/// `partition` below `next_offset` is in the snapshot, none at or after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerCut {
    pub topic: String,
    pub partition: i32,
    pub next_offset: i64,
    /// Ledger rows from this partition in the snapshot.
    pub events: i64,
}

/// A consumer group's committed offset on one partition, as its replicas last
/// reported it (`consumer_partitions`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupOffset {
    pub group: String,
    pub topic: String,
    pub partition: i32,
    pub committed_offset: Option<i64>,
}

/// One budget counter as the ledger had it: the spent fields (`s`, or `s:<bucket>`
/// of a rolling window) of the policy window current at the snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counter {
    pub policy_id: String,
    pub agent_id: String,
    pub key: String,
    pub partition: u16,
    pub currency: String,
    /// When a calendar counter expires (s since the epoch; 0 for rolling).
    pub expire_at_s: i64,
    pub fields: Vec<(String, i64)>,
}

/// A reservation open at the snapshot: its record as the hot path keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    pub reservation_id: String,
    pub partition: u16,
    pub agent_id: String,
    pub record: String,
    pub expires_at_ms: i64,
}

/// The newest signed Merkle checkpoint at the snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub tree_size: i64,
    /// The root, base64 (as in the note).
    pub root: String,
    pub key_id: String,
    /// The whole signed note.
    pub note: String,
    pub published_at: DateTime<Utc>,
}

/// One snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub format: u32,
    pub snapshot_id: String,
    pub taken_at: DateTime<Utc>,
    pub layout: KeyLayout,
    pub ledger_cut: Vec<LedgerCut>,
    pub consumer_offsets: Vec<GroupOffset>,
    /// Ledger rows in the snapshot (the sum of `ledger_cut`'s).
    pub ledger_events: i64,
    pub counters: Vec<Counter>,
    pub reservations: Vec<Reservation>,
    /// Where the open reservations were read (or why they were not).
    pub reservations_source: String,
    pub merkle: Option<Checkpoint>,
    /// Configuration rows per table (JSON arrays of rows), parents before children.
    pub config: BTreeMap<String, serde_json::Value>,
}

/// What `list` shows of a snapshot without reading its body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub format: u32,
    pub snapshot_id: String,
    pub taken_at: DateTime<Utc>,
    /// `blake3:<hex>` of the body.
    pub checksum: String,
    pub size_bytes: i64,
    pub counters: i64,
    pub reservations: i64,
    pub ledger_events: i64,
}

/// A snapshot as stored: its summary and its body's bytes.
#[derive(Debug, Clone)]
pub struct Stored {
    pub summary: Summary,
    pub body: Vec<u8>,
}

/// `snapshot-YYYYMMDD-HHMMSS` of `t` (UTC), the runbook's form.
pub fn snapshot_id_at(t: DateTime<Utc>) -> String {
    format!("snapshot-{}", t.format("%Y%m%d-%H%M%S"))
}

/// Checks `id` is a snapshot id (and so a safe file name) and returns its time.
pub fn parse_snapshot_id(id: &str) -> Result<DateTime<Utc>, SnapshotError> {
    let bad = || {
        SnapshotError::Invalid(format!(
            "{id:?} is not a snapshot id (snapshot-YYYYMMDD-HHMMSS, UTC, e.g. \
             snapshot-20260203-000000)"
        ))
    };
    let rest = id.strip_prefix("snapshot-").ok_or_else(bad)?;
    if rest.len() != 15 || !rest.bytes().all(|b| b.is_ascii_digit() || b == b'-') {
        return Err(bad());
    }
    NaiveDateTime::parse_from_str(rest, "%Y%m%d-%H%M%S")
        .map(|t| t.and_utc())
        .map_err(|_| bad())
}

/// `blake3:<hex>` of `bytes`.
pub fn checksum_of(bytes: &[u8]) -> String {
    format!("blake3:{}", blake3::hash(bytes).to_hex())
}

impl Snapshot {
    /// The stored form: the body's bytes and the summary naming their checksum.
    pub fn seal(&self) -> Result<Stored, SnapshotError> {
        let body = serde_json::to_vec(self).map_err(|e| SnapshotError::Invalid(e.to_string()))?;
        Ok(Stored {
            summary: Summary {
                format: self.format,
                snapshot_id: self.snapshot_id.clone(),
                taken_at: self.taken_at,
                checksum: checksum_of(&body),
                size_bytes: i64::try_from(body.len()).unwrap_or(i64::MAX),
                counters: i64::try_from(self.counters.len()).unwrap_or(i64::MAX),
                reservations: i64::try_from(self.reservations.len()).unwrap_or(i64::MAX),
                ledger_events: self.ledger_events,
            },
            body,
        })
    }
}

impl Stored {
    /// The snapshot, once its bytes hash to the checksum and parse as this format.
    pub fn open(&self) -> Result<Snapshot, SnapshotError> {
        let id = &self.summary.snapshot_id;
        let corrupt = |reason: String| SnapshotError::Corrupt {
            id: id.clone(),
            reason,
        };
        let actual = checksum_of(&self.body);
        if actual != self.summary.checksum {
            return Err(corrupt(format!(
                "its body hashes to {actual}, the stored checksum is {}",
                self.summary.checksum
            )));
        }
        let snapshot: Snapshot = serde_json::from_slice(&self.body)
            .map_err(|e| corrupt(format!("not a snapshot document: {e}")))?;
        if snapshot.format != FORMAT {
            return Err(corrupt(format!(
                "format {} (this build reads format {FORMAT})",
                snapshot.format
            )));
        }
        if snapshot.snapshot_id != *id {
            return Err(corrupt(format!(
                "its body is snapshot {}",
                snapshot.snapshot_id
            )));
        }
        Ok(snapshot)
    }
}

/// Where snapshots are kept: one interface, two backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotStore {
    /// The `budget_snapshots` table of the deployment's database.
    Postgres,
    /// One file per snapshot in a directory (`<id>.snapshot`: a summary line, then
    /// the body), written to a temporary name and renamed, so a file is whole or
    /// absent.
    Directory(PathBuf),
}

#[derive(diesel::QueryableByName)]
struct SummaryRow {
    #[diesel(sql_type = Text)]
    snapshot_id: String,
    #[diesel(sql_type = Integer)]
    format: i32,
    #[diesel(sql_type = Timestamptz)]
    taken_at: DateTime<Utc>,
    #[diesel(sql_type = Text)]
    checksum: String,
    #[diesel(sql_type = BigInt)]
    size_bytes: i64,
    #[diesel(sql_type = BigInt)]
    counters: i64,
    #[diesel(sql_type = BigInt)]
    reservations: i64,
    #[diesel(sql_type = BigInt)]
    ledger_events: i64,
}

impl From<SummaryRow> for Summary {
    fn from(r: SummaryRow) -> Self {
        Summary {
            format: u32::try_from(r.format).unwrap_or(0),
            snapshot_id: r.snapshot_id,
            taken_at: r.taken_at,
            checksum: r.checksum,
            size_bytes: r.size_bytes,
            counters: r.counters,
            reservations: r.reservations,
            ledger_events: r.ledger_events,
        }
    }
}

#[derive(diesel::QueryableByName)]
struct BodyRow {
    #[diesel(sql_type = Binary)]
    body: Vec<u8>,
}

const SUMMARY_COLUMNS: &str =
    "snapshot_id, format, taken_at, checksum, size_bytes, counters, reservations, ledger_events";

impl SnapshotStore {
    /// `postgres`, or `directory` with its path.
    pub fn new(kind: &str, directory: &str) -> Result<Self, SnapshotError> {
        match kind.trim() {
            "" | "postgres" => Ok(Self::Postgres),
            "directory" if !directory.trim().is_empty() => {
                Ok(Self::Directory(PathBuf::from(directory.trim())))
            }
            "directory" => Err(SnapshotError::Invalid(
                "snapshots.store is directory but snapshots.directory is empty".to_owned(),
            )),
            other => Err(SnapshotError::Invalid(format!(
                "snapshots.store {other:?} is neither postgres nor directory"
            ))),
        }
    }

    /// Where the snapshots are, for messages.
    pub fn describe(&self) -> String {
        match self {
            Self::Postgres => "PostgreSQL table budget_snapshots".to_owned(),
            Self::Directory(dir) => format!("directory {}", dir.display()),
        }
    }

    /// Keeps `stored`; an existing snapshot of the same id is an error (ids name
    /// one point, never two).
    pub async fn put(
        &self,
        conn: &mut AsyncPgConnection,
        stored: &Stored,
    ) -> Result<(), SnapshotError> {
        let s = &stored.summary;
        parse_snapshot_id(&s.snapshot_id)?;
        match self {
            Self::Postgres => {
                let inserted = diesel::sql_query(format!(
                    "INSERT INTO budget_snapshots ({SUMMARY_COLUMNS}, body) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING"
                ))
                .bind::<Text, _>(&s.snapshot_id)
                .bind::<Integer, _>(i32::try_from(s.format).unwrap_or(0))
                .bind::<Timestamptz, _>(s.taken_at)
                .bind::<Text, _>(&s.checksum)
                .bind::<BigInt, _>(s.size_bytes)
                .bind::<BigInt, _>(s.counters)
                .bind::<BigInt, _>(s.reservations)
                .bind::<BigInt, _>(s.ledger_events)
                .bind::<Binary, _>(&stored.body)
                .execute(conn)
                .await?;
                if inserted == 0 {
                    return Err(exists(&s.snapshot_id));
                }
                Ok(())
            }
            Self::Directory(dir) => {
                let path = file_of(dir, &s.snapshot_id);
                if path.exists() {
                    return Err(exists(&s.snapshot_id));
                }
                let mut bytes = serde_json::to_vec(s).map_err(|e| io_err(dir, e))?;
                bytes.push(b'\n');
                bytes.extend_from_slice(&stored.body);
                let tmp = dir.join(format!(".{}.tmp-{}", s.snapshot_id, std::process::id()));
                tokio::fs::create_dir_all(dir)
                    .await
                    .map_err(|e| io_err(dir, e))?;
                tokio::fs::write(&tmp, &bytes)
                    .await
                    .map_err(|e| io_err(&tmp, e))?;
                tokio::fs::rename(&tmp, &path)
                    .await
                    .map_err(|e| io_err(&path, e))
            }
        }
    }

    /// The snapshot `id` as stored (checked by [`Stored::open`]), if there is one.
    pub async fn get(
        &self,
        conn: &mut AsyncPgConnection,
        id: &str,
    ) -> Result<Option<Stored>, SnapshotError> {
        parse_snapshot_id(id)?;
        match self {
            Self::Postgres => {
                let summary: Option<SummaryRow> = diesel::sql_query(format!(
                    "SELECT {SUMMARY_COLUMNS} FROM budget_snapshots WHERE snapshot_id = $1"
                ))
                .bind::<Text, _>(id)
                .get_result(conn)
                .await
                .map(Some)
                .or_else(not_found_is_none)?;
                let Some(summary) = summary else {
                    return Ok(None);
                };
                let body: BodyRow =
                    diesel::sql_query("SELECT body FROM budget_snapshots WHERE snapshot_id = $1")
                        .bind::<Text, _>(id)
                        .get_result(conn)
                        .await?;
                Ok(Some(Stored {
                    summary: summary.into(),
                    body: body.body,
                }))
            }
            Self::Directory(dir) => {
                let path = file_of(dir, id);
                let bytes = match tokio::fs::read(&path).await {
                    Ok(b) => b,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(io_err(&path, e)),
                };
                let (summary, body) = split_file(id, &bytes)?;
                Ok(Some(Stored {
                    summary,
                    body: body.to_vec(),
                }))
            }
        }
    }

    /// Every snapshot kept, newest first.
    pub async fn list(&self, conn: &mut AsyncPgConnection) -> Result<Vec<Summary>, SnapshotError> {
        match self {
            Self::Postgres => {
                let rows: Vec<SummaryRow> = diesel::sql_query(format!(
                    "SELECT {SUMMARY_COLUMNS} FROM budget_snapshots ORDER BY taken_at DESC, \
                     snapshot_id DESC"
                ))
                .load(conn)
                .await?;
                Ok(rows.into_iter().map(Summary::from).collect())
            }
            Self::Directory(dir) => {
                let mut entries = match tokio::fs::read_dir(dir).await {
                    Ok(e) => e,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                    Err(e) => return Err(io_err(dir, e)),
                };
                let mut out = Vec::new();
                while let Some(entry) = entries.next_entry().await.map_err(|e| io_err(dir, e))? {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    let Some(id) = name.strip_suffix(FILE_SUFFIX) else {
                        continue;
                    };
                    if parse_snapshot_id(id).is_err() {
                        continue;
                    }
                    out.push(read_summary(&entry.path(), id).await?);
                }
                out.sort_by(|a, b| (b.taken_at, &b.snapshot_id).cmp(&(a.taken_at, &a.snapshot_id)));
                Ok(out)
            }
        }
    }

    /// Removes snapshot `id`; `false` when there was none.
    pub async fn delete(
        &self,
        conn: &mut AsyncPgConnection,
        id: &str,
    ) -> Result<bool, SnapshotError> {
        parse_snapshot_id(id)?;
        match self {
            Self::Postgres => {
                let n = diesel::sql_query("DELETE FROM budget_snapshots WHERE snapshot_id = $1")
                    .bind::<Text, _>(id)
                    .execute(conn)
                    .await?;
                Ok(n > 0)
            }
            Self::Directory(dir) => {
                let path = file_of(dir, id);
                match tokio::fs::remove_file(&path).await {
                    Ok(()) => Ok(true),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
                    Err(e) => Err(io_err(&path, e)),
                }
            }
        }
    }
}

fn exists(id: &str) -> SnapshotError {
    SnapshotError::Invalid(format!(
        "snapshot {id} exists already (one id names one point: wait a second, or delete it \
         with `caracal snapshot cleanup`)"
    ))
}

fn not_found_is_none<T>(e: diesel::result::Error) -> Result<Option<T>, diesel::result::Error> {
    match e {
        diesel::result::Error::NotFound => Ok(None),
        e => Err(e),
    }
}

fn file_of(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}{FILE_SUFFIX}"))
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> SnapshotError {
    SnapshotError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// A directory store's file: the summary line, then the body.
fn split_file<'a>(id: &str, bytes: &'a [u8]) -> Result<(Summary, &'a [u8]), SnapshotError> {
    let corrupt = |reason: String| SnapshotError::Corrupt {
        id: id.to_owned(),
        reason,
    };
    let nl = bytes
        .iter()
        .position(|b| *b == b'\n')
        .ok_or_else(|| corrupt("no summary line".to_owned()))?;
    let summary: Summary = serde_json::from_slice(&bytes[..nl])
        .map_err(|e| corrupt(format!("bad summary line: {e}")))?;
    if summary.snapshot_id != id {
        return Err(corrupt(format!(
            "the file holds snapshot {}",
            summary.snapshot_id
        )));
    }
    Ok((summary, &bytes[nl + 1..]))
}

/// The summary line of a directory store's file, without reading the body.
async fn read_summary(path: &Path, id: &str) -> Result<Summary, SnapshotError> {
    use tokio::io::AsyncBufReadExt;
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| io_err(path, e))?;
    let mut line = String::new();
    tokio::io::BufReader::new(file)
        .read_line(&mut line)
        .await
        .map_err(|e| io_err(path, e))?;
    line.push('\n');
    split_file(id, line.as_bytes()).map(|(s, _)| s)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        Snapshot {
            format: FORMAT,
            snapshot_id: "snapshot-20260203-000000".to_owned(),
            taken_at: parse_snapshot_id("snapshot-20260203-000000").unwrap(),
            layout: KeyLayout {
                prefix: "caracal".to_owned(),
                partitions: 16,
            },
            ledger_cut: vec![LedgerCut {
                topic: "caracal.metering.events".to_owned(),
                partition: 0,
                next_offset: 42,
                events: 40,
            }],
            consumer_offsets: Vec::new(),
            ledger_events: 40,
            counters: vec![Counter {
                policy_id: "p".to_owned(),
                agent_id: "a".to_owned(),
                key: "caracal:{p3}:c:p:day".to_owned(),
                partition: 3,
                currency: "USD".to_owned(),
                expire_at_s: 1_770_163_200,
                fields: vec![("s".to_owned(), 1_500_000)],
            }],
            reservations: Vec::new(),
            reservations_source: "test".to_owned(),
            merkle: None,
            config: BTreeMap::new(),
        }
    }

    #[test]
    fn ids_are_the_runbooks_form_and_nothing_else() {
        let t = parse_snapshot_id("snapshot-20260203-000000").unwrap();
        assert_eq!(t.to_rfc3339(), "2026-02-03T00:00:00+00:00");
        assert_eq!(snapshot_id_at(t), "snapshot-20260203-000000");
        for bad in [
            "snapshot-2026020-000000",
            "snapshot-20260230-000000",
            "snapshot-20260203-000000/../x",
            "../snapshot-20260203-000000",
            "snap-20260203-000000",
            "snapshot-20260203-246000",
        ] {
            assert!(parse_snapshot_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_sealed_snapshot_opens_and_a_flipped_byte_is_refused() {
        let s = sample();
        let stored = s.seal().unwrap();
        assert_eq!(stored.open().unwrap(), s);
        assert_eq!(stored.summary.counters, 1);
        assert_eq!(stored.summary.ledger_events, 40);
        let mut bad = stored.clone();
        let i = bad.body.len() / 2;
        bad.body[i] ^= 1;
        assert!(matches!(bad.open(), Err(SnapshotError::Corrupt { .. })));
        let mut renamed = stored;
        renamed.summary.snapshot_id = "snapshot-20260204-000000".to_owned();
        assert!(matches!(renamed.open(), Err(SnapshotError::Corrupt { .. })));
    }

    #[test]
    fn a_directory_file_splits_into_summary_and_body() {
        let stored = sample().seal().unwrap();
        let mut bytes = serde_json::to_vec(&stored.summary).unwrap();
        bytes.push(b'\n');
        bytes.extend_from_slice(&stored.body);
        let (summary, body) = split_file("snapshot-20260203-000000", &bytes).unwrap();
        assert_eq!(summary, stored.summary);
        assert_eq!(body, stored.body.as_slice());
        assert!(split_file("snapshot-20260204-000000", &bytes).is_err());
        assert!(split_file("snapshot-20260203-000000", b"no newline").is_err());
    }

    #[test]
    fn the_store_is_chosen_by_name() {
        assert_eq!(SnapshotStore::new("", "").unwrap(), SnapshotStore::Postgres);
        assert_eq!(
            SnapshotStore::new("directory", "/var/lib/caracal/snapshots").unwrap(),
            SnapshotStore::Directory(PathBuf::from("/var/lib/caracal/snapshots"))
        );
        assert!(SnapshotStore::new("directory", " ").is_err());
        assert!(SnapshotStore::new("s3", "").is_err());
    }
}
