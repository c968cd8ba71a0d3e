//! The audit-logger: every message of every Caracal topic -> `audit_logs`.
//!
//! It subscribes to the metering, decisions, agent-lifecycle and policy-change
//! topics (not the dead-letter topic, whose letters are copies of messages already
//! logged from their original topic) with its own consumer group, and stores each
//! message as is: topic, partition, offset, key, headers, payload bytes, the
//! `event_type` / `event_id` headers when present and the message timestamp. It
//! decodes nothing, so practically nothing is poison.
//!
//! A batch is one `INSERT ... SELECT FROM unnest(...) ON CONFLICT DO NOTHING` on
//! UNIQUE (topic, partition, kafka_offset, message_hash), the hash being
//! `audit_message_hash()` of the message itself (key, payload, timestamp, headers;
//! migration `*_audit_message_identity`): a redelivery is a no-op, and a different
//! message at a position already used (a re-created topic, a migrated cluster) is
//! kept. The table is append-only in the database (triggers; migrations
//! `*_audit_logs`, `*_database_roles`); the only deletes are the retention job's
//! ([`run_retention`]): rows ingested more than `audit.retentionDays` ago (by
//! `ingested_at`, the database's clock, never the producer's timestamp), in bounded
//! batches, each in a transaction that sets `caracal.audit_retention = 'on'`
//! locally, by a role that is a member of `caracal_audit_retention` (the trigger
//! checks both). `caracal-consumers audit-retention` runs it once (for a CronJob,
//! with the retention role's credentials); the logger runs it at start and daily
//! only when its own role may delete (a development setup), and otherwise leaves it
//! to that job.

use std::{future::Future, time::Duration};

use caracal_service_kit::db::{self, Pool};
use chrono::{DateTime, Utc};
use diesel::sql_types::{Array, BigInt, Binary, Bool, Integer, Nullable, Text, Timestamptz};
use diesel_async::{RunQueryDsl, SimpleAsyncConnection};

use crate::{
    config::ConsumerConfig,
    launch::{launch, Consumer, LaunchError, RunningConsumer},
    pg_batch,
    runner::{Handler, RawMessage, WriteError},
};

/// The `consumer` label.
pub const CONSUMER: &str = "audit-logger";
/// The consumer group unless configured otherwise.
pub const DEFAULT_GROUP: &str = "caracal-audit-logger";
/// How often the logger runs the retention job.
const RETENTION_EVERY: Duration = Duration::from_secs(24 * 3600);
/// Longest header value kept as `event_type` / `event_id` (longer: left NULL; the
/// raw header is still in `headers`).
const MAX_ID_LEN: usize = 200;

/// One `audit_logs` row (without the generated id, ingested_at, and message_hash,
/// which the database computes from these columns and `timestamp_ms`).
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRow {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    /// JSON array text (see [`headers_json`]).
    pub headers: String,
    pub payload: Option<Vec<u8>>,
    pub event_type: Option<String>,
    pub event_id: Option<String>,
    /// The message timestamp, or the time it was decoded when it had none. What the
    /// producer said: kept, but retention and export go by `ingested_at`.
    pub occurred_at: DateTime<Utc>,
    /// The message's own timestamp (ms; `None` when it had none): part of the
    /// message's identity (`audit_message_hash`).
    pub timestamp_ms: Option<i64>,
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Headers as a JSON array in message order: `{"key", "value"}` for UTF-8 text,
/// `{"key", "value_hex"}` for other bytes (and text with NUL, which jsonb cannot
/// hold), `{"key", "value": null}` for a header without a value.
pub fn headers_json(headers: &[(String, Option<Vec<u8>>)]) -> String {
    let items: Vec<serde_json::Value> = headers
        .iter()
        .map(|(k, v)| {
            // Keys are strings in Kafka, but NUL would break jsonb too.
            let key = k.replace('\0', "\u{fffd}");
            match v {
                None => serde_json::json!({ "key": key, "value": null }),
                Some(bytes) => match std::str::from_utf8(bytes) {
                    Ok(text) if !text.contains('\0') => {
                        serde_json::json!({ "key": key, "value": text })
                    }
                    _ => serde_json::json!({ "key": key, "value_hex": hex(bytes) }),
                },
            }
        })
        .collect();
    serde_json::Value::Array(items).to_string()
}

/// A header value usable as a text column: UTF-8, no NUL, bounded.
fn header_text(msg: &RawMessage, name: &str) -> Option<String> {
    let v = std::str::from_utf8(msg.header(name)?).ok()?;
    (!v.is_empty() && v.len() <= MAX_ID_LEN && !v.contains('\0')).then(|| v.to_owned())
}

/// One message as its audit row. Only a message without a usable position is
/// refused (a broker would never deliver one).
pub fn to_row(msg: &RawMessage, now: DateTime<Utc>) -> Result<AuditRow, String> {
    if msg.topic.is_empty() || msg.topic.contains('\0') {
        return Err("message has no usable topic".to_owned());
    }
    if msg.partition < 0 || msg.offset < 0 {
        return Err(format!(
            "message has no position: partition {}, offset {}",
            msg.partition, msg.offset
        ));
    }
    let timestamp_ms = msg
        .timestamp_ms
        .filter(|ms| *ms > 0 && DateTime::from_timestamp_millis(*ms).is_some());
    let occurred_at = timestamp_ms
        .and_then(DateTime::from_timestamp_millis)
        .unwrap_or(now);
    Ok(AuditRow {
        topic: msg.topic.clone(),
        partition: msg.partition,
        offset: msg.offset,
        key: msg.key.clone(),
        headers: headers_json(&msg.headers),
        payload: msg.payload.clone(),
        event_type: header_text(msg, "event_type"),
        event_id: header_text(msg, "event_id"),
        occurred_at,
        timestamp_ms,
    })
}

/// ingested_at is left to the database (its default, `now()`): the logger's role may
/// not set it.
const INSERT: &str = "\
INSERT INTO audit_logs (topic, \"partition\", kafka_offset, key, headers, payload, event_type,
    event_id, occurred_at, message_hash)
SELECT t, p, o, k, h::jsonb, v, et, ei, oa, audit_message_hash(k, h::jsonb, v, ts)
FROM unnest($1::text[], $2::int4[], $3::int8[], $4::bytea[], $5::text[], $6::bytea[],
    $7::text[], $8::text[], $9::timestamptz[], $10::int8[])
  AS u(t, p, o, k, h, v, et, ei, oa, ts)
ON CONFLICT (topic, \"partition\", kafka_offset, message_hash) DO NOTHING";

/// Writes `rows` in one statement; returns how many were new.
pub async fn insert_rows(
    conn: &mut diesel_async::AsyncPgConnection,
    rows: &[AuditRow],
) -> Result<usize, diesel::result::Error> {
    fn col<T>(rows: &[AuditRow], f: impl Fn(&AuditRow) -> T) -> Vec<T> {
        rows.iter().map(f).collect()
    }
    diesel::sql_query(INSERT)
        .bind::<Array<Text>, _>(col(rows, |r| r.topic.clone()))
        .bind::<Array<Integer>, _>(col(rows, |r| r.partition))
        .bind::<Array<BigInt>, _>(col(rows, |r| r.offset))
        .bind::<Array<Nullable<Binary>>, _>(col(rows, |r| r.key.clone()))
        .bind::<Array<Text>, _>(col(rows, |r| r.headers.clone()))
        .bind::<Array<Nullable<Binary>>, _>(col(rows, |r| r.payload.clone()))
        .bind::<Array<Nullable<Text>>, _>(col(rows, |r| r.event_type.clone()))
        .bind::<Array<Nullable<Text>>, _>(col(rows, |r| r.event_id.clone()))
        .bind::<Array<Timestamptz>, _>(col(rows, |r| r.occurred_at))
        .bind::<Array<Nullable<BigInt>>, _>(col(rows, |r| r.timestamp_ms))
        .execute(conn)
        .await
}

/// The [`Handler`] that writes the audit trail.
pub struct AuditLogger {
    pool: Pool,
}

impl AuditLogger {
    pub fn new(pool: Pool) -> Self {
        Self { pool }
    }
}

impl Handler for AuditLogger {
    type Item = AuditRow;

    fn name(&self) -> &'static str {
        CONSUMER
    }

    fn decode(&self, msg: &RawMessage) -> Result<AuditRow, String> {
        to_row(msg, Utc::now())
    }

    fn write(&self, items: &[AuditRow]) -> impl Future<Output = Result<(), WriteError>> + Send {
        pg_batch::write(
            self.pool.clone(),
            items,
            |conn, rows| Box::pin(insert_rows(conn, rows)),
            "messages already in the audit log (redelivery)",
        )
    }

    fn reachable(&self) -> impl Future<Output = bool> + Send {
        pg_batch::reachable(self.pool.clone())
    }
}

/// The database role whose members may delete audit rows (the retention job's);
/// the append-only trigger checks it (migration `*_database_roles`).
pub const RETENTION_ROLE: &str = "caracal_audit_retention";

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("database: {0}")]
    Db(String),
    #[error(
        "database role {role} may not delete audit rows: run the retention job as a \
         member of {RETENTION_ROLE} (README \"Database roles\")"
    )]
    NotRetentionRole { role: String },
}

const DELETE_BATCH: &str = "\
DELETE FROM audit_logs WHERE id IN (
    SELECT id FROM audit_logs WHERE ingested_at < $1 ORDER BY ingested_at, id LIMIT $2)";

/// Whether this session's role may delete audit rows: a member of
/// [`RETENTION_ROLE`] (a superuser counts as a member of every role). Asked first
/// so a role that may not gets a plain answer instead of the trigger's refusal.
async fn check_retention_role(
    conn: &mut diesel_async::AsyncPgConnection,
) -> Result<(), AuditError> {
    #[derive(diesel::QueryableByName)]
    struct May {
        #[diesel(sql_type = Text)]
        role: String,
        #[diesel(sql_type = Bool)]
        may: bool,
    }
    let may: May = diesel::sql_query(
        "SELECT current_user::text AS role, \
           coalesce(pg_has_role(current_user, to_regrole($1), 'MEMBER'), false) AS may",
    )
    .bind::<Text, _>(RETENTION_ROLE)
    .get_result(conn)
    .await
    .map_err(|e| AuditError::Db(e.to_string()))?;
    if may.may {
        Ok(())
    } else {
        Err(AuditError::NotRetentionRole { role: may.role })
    }
}

/// Deletes audit rows ingested more than `retention_days` ago (`ingested_at`, the
/// database's clock: a producer's timestamp, however old, does not shorten a
/// row's life), at most `batch` rows per transaction, each transaction with
/// `SET LOCAL caracal.audit_retention = 'on'`. Only a member of
/// [`RETENTION_ROLE`] may ([`AuditError::NotRetentionRole`] otherwise; the
/// append-only trigger wants both). Returns the number of rows deleted.
pub async fn run_retention(
    pool: &Pool,
    retention_days: u32,
    batch: u32,
) -> Result<u64, AuditError> {
    let batch = i64::from(batch.max(1));
    let days = i32::try_from(retention_days).unwrap_or(i32::MAX);
    let mut conn = pool
        .get()
        .await
        .map_err(|e| AuditError::Db(e.to_string()))?;
    check_retention_role(&mut conn).await?;
    #[derive(diesel::QueryableByName)]
    struct Expired {
        #[diesel(sql_type = Timestamptz)]
        cutoff: DateTime<Utc>,
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    // The cutoff on the clock that wrote ingested_at; the count bounds the loop:
    // what is expired now, in batches, plus one to see none left.
    let expired: Expired = diesel::sql_query(
        "WITH c AS (SELECT now() - make_interval(days => $1) AS cutoff) \
         SELECT c.cutoff, (SELECT count(*) FROM audit_logs WHERE ingested_at < c.cutoff) AS n \
         FROM c",
    )
    .bind::<Integer, _>(days)
    .get_result(&mut conn)
    .await
    .map_err(|e| AuditError::Db(e.to_string()))?;
    let cutoff = expired.cutoff;
    let rounds = expired.n / batch + 2;
    let mut deleted: u64 = 0;
    for _ in 0..rounds {
        conn.batch_execute("BEGIN; SET LOCAL caracal.audit_retention = 'on'")
            .await
            .map_err(|e| AuditError::Db(e.to_string()))?;
        let n = match diesel::sql_query(DELETE_BATCH)
            .bind::<Timestamptz, _>(cutoff)
            .bind::<BigInt, _>(batch)
            .execute(&mut conn)
            .await
        {
            Ok(n) => n,
            Err(e) => {
                let _ = conn.batch_execute("ROLLBACK").await;
                return Err(AuditError::Db(e.to_string()));
            }
        };
        conn.batch_execute("COMMIT")
            .await
            .map_err(|e| AuditError::Db(e.to_string()))?;
        deleted += n as u64;
        if (n as i64) < batch {
            break;
        }
    }
    tracing::info!(deleted, retention_days, %cutoff, "audit retention done");
    Ok(deleted)
}

/// `caracal-consumers audit-retention`: applies migrations if configured, runs
/// the retention job once and returns the rows deleted.
pub async fn retention_once(config: &ConsumerConfig) -> Result<u64, AuditError> {
    if config.consumer.run_migrations {
        db::run_migrations(&config.database.url)
            .await
            .map_err(|e| AuditError::Db(e.to_string()))?;
    }
    let pool = db::connect(&config.database)
        .await
        .map_err(|e| AuditError::Db(e.to_string()))?;
    run_retention(
        &pool,
        config.audit.retention_days,
        config.audit.retention_batch,
    )
    .await
}

/// The topics the audit-logger reads: every topic of the configuration except
/// the dead-letter topic (non-empty names only).
pub fn audit_topics(config: &ConsumerConfig) -> Vec<String> {
    let k = &config.kafka;
    [
        &k.metering_topic,
        &k.decisions_topic,
        &k.lifecycle_topic,
        &k.policy_changes_topic,
    ]
    .into_iter()
    .filter(|t| !t.is_empty() && **t != k.dlq_topic)
    .cloned()
    .collect()
}

/// Starts the audit-logger: binds `/health` + `/metrics` at once, then (in the
/// background, retrying until the database answers) applies migrations, runs the
/// retention job (at start and daily, when its role may delete) and consumes.
pub async fn start(config: ConsumerConfig) -> Result<RunningConsumer, LaunchError> {
    let topics = audit_topics(&config);
    let (days, batch) = (config.audit.retention_days, config.audit.retention_batch);
    launch(
        config,
        Consumer {
            default_group: DEFAULT_GROUP,
            topics,
            handler: AuditLogger::new,
            upkeep_every: RETENTION_EVERY,
            upkeep: move |pool: Pool| async move {
                match run_retention(&pool, days, batch).await {
                    Ok(_) => {}
                    // The production setup: the logger's role only inserts, the
                    // retention job (its own role) deletes.
                    Err(AuditError::NotRetentionRole { role }) => tracing::info!(
                        %role,
                        "audit retention left to the retention job: this role may not delete"
                    ),
                    Err(error) => {
                        tracing::warn!(%error, "audit retention failed; retrying at the next run")
                    }
                }
            },
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg() -> RawMessage {
        RawMessage {
            topic: "caracal.policy.decisions".into(),
            partition: 1,
            offset: 42,
            key: Some(b"k".to_vec()),
            payload: Some(vec![0, 159, 146, 150]),
            headers: vec![
                ("event_type".into(), Some(b"decision".to_vec())),
                ("event_id".into(), Some(b"e-1".to_vec())),
                ("bin".into(), Some(vec![0xff, 0x00])),
                ("none".into(), None),
            ],
            timestamp_ms: Some(1_700_000_000_123),
        }
    }

    #[test]
    fn a_message_becomes_its_row_as_is() {
        let row = to_row(&msg(), Utc::now()).unwrap();
        assert_eq!(row.payload, Some(vec![0, 159, 146, 150]));
        assert_eq!(row.event_type.as_deref(), Some("decision"));
        assert_eq!(row.event_id.as_deref(), Some("e-1"));
        assert_eq!(row.occurred_at.timestamp_millis(), 1_700_000_000_123);
        let h: serde_json::Value = serde_json::from_str(&row.headers).unwrap();
        assert_eq!(h[0]["value"], "decision");
        assert_eq!(h[2]["value_hex"], "ff00");
        assert!(h[3]["value"].is_null());
    }

    #[test]
    fn no_timestamp_means_now_and_bad_positions_are_refused() {
        let now = Utc::now();
        let mut m = msg();
        m.timestamp_ms = None;
        assert_eq!(to_row(&m, now).unwrap().occurred_at, now);
        m.offset = -1;
        assert!(to_row(&m, now).unwrap_err().contains("position"));
    }

    #[test]
    fn every_topic_but_the_dlq() {
        let c = ConsumerConfig::default();
        let topics = audit_topics(&c);
        assert_eq!(topics.len(), 4);
        assert!(!topics.contains(&c.kafka.dlq_topic));
    }
}
