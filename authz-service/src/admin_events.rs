//! Admin change events: the PostgreSQL outbox and its relay to Kafka.
//!
//! **Write side.** Every admin write builds its event ([`AdminEvent::lifecycle`] or
//! [`AdminEvent::policy_change`]) and appends it with [`append`] inside the
//! transaction that makes the change (see `admin::commit_change`). A rolled-back
//! change therefore leaves no event, and a committed one cannot lose it. The
//! append comes after the transaction's update of `config_epoch`, a row every admin
//! write locks until it commits, so `admin_outbox.id` is handed out in commit order.
//!
//! **Relay.** [`AdminOutboxRelay`] runs in every replica; one at a time relays. It
//! holds a session-level PostgreSQL advisory lock on a dedicated connection (not a
//! pooled one: a pooled connection would go back to the pool still holding it) and,
//! while it holds the lock, reads the outbox from the head in id order, produces
//! every row (key, headers `event_id`, `event_type`, `schema_version`) with the
//! idempotent `acks=all` producer, awaits the deliveries and deletes the delivered
//! prefix. Why a session lock rather than `SELECT ... FOR UPDATE SKIP LOCKED`:
//! SKIP LOCKED would let a second replica send the rows *after* the ones the first
//! holds, breaking per-key order, and it would keep a transaction open for as long
//! as Kafka is down. If the relay's connection dies, PostgreSQL releases the lock
//! and another replica takes over from the head: a row that was delivered but not
//! yet deleted is sent again with the same `event_id` (consumers dedupe on it);
//! nothing is skipped. Kafka down only delays: the producer never times a message
//! out and nothing is deleted before Kafka acknowledged it.

use std::time::{Duration, Instant};

use caracal_proto::v1 as pb;
use caracal_service_kit::process::LogLimit;
use chrono::Utc;
use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use prost::Message as _;
use rdkafka::{
    message::{Header, OwnedHeaders},
    producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer as _},
};
use tokio::sync::watch;
use uuid::Uuid;

use crate::{
    convert::timestamp,
    db::schema::admin_outbox,
    error::ServiceResult,
    kafka::{producer_config, KafkaConfig, KafkaError},
};

/// Version of [`pb::AgentLifecycleEvent`] and [`pb::PolicyChangeEvent`] (field and header).
pub const SCHEMA_VERSION: u32 = 1;
/// Rows waiting in `admin_outbox` (sampled by every replica's relay).
pub const ADMIN_OUTBOX_DEPTH: &str = "caracal_admin_outbox_depth";
/// Age of the oldest waiting row, seconds (0 when empty): a stuck relay shows here.
pub const ADMIN_OUTBOX_OLDEST_AGE: &str = "caracal_admin_outbox_oldest_age_seconds";
/// Admin events delivered to Kafka, labelled `topic`.
pub const ADMIN_OUTBOX_RELAYED: &str = "caracal_admin_outbox_relayed_total";
/// Failed database calls, sends and deliveries of the admin relay (each is retried).
pub const ADMIN_OUTBOX_ERRORS: &str = "caracal_admin_outbox_relay_errors_total";

/// Rows read per round.
pub const BATCH: i64 = 200;
/// Rows per INSERT (a 10,000-row price import stays well below PostgreSQL's bind limit).
const APPEND_CHUNK: usize = 1_000;
/// The advisory lock: the two-int key space, which the service's single-bigint
/// `pg_advisory_xact_lock(hashtext(..))` locks can never collide with.
const LOCK_CLASS: i32 = 0x4341_5241; // "CARA"
const LOCK_RELAY: i32 = 1;
/// How often a replica without the lock tries to take it.
const LOCK_RETRY: Duration = Duration::from_secs(1);
/// Pause after a round that found nothing.
const IDLE_SLEEP: Duration = Duration::from_millis(100);
/// Bound on every database call (a timed-out connection is dropped).
const DB_TIMEOUT: Duration = Duration::from_secs(10);
/// Backoff after errors: doubles from the first value up to the second.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often the depth gauges are refreshed.
const DEPTH_EVERY: Duration = Duration::from_secs(1);
/// On shutdown, how long in-flight deliveries may still take.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Which topic an admin event goes to (stored as `admin_outbox.topic`; the relay
/// maps it to the configured topic name, so a rename needs no data migration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// `kafka.lifecycleTopic` (`caracal.agent.lifecycle`).
    AgentLifecycle,
    /// `kafka.policyChangesTopic` (`caracal.policy.changes`).
    PolicyChanges,
}

impl Stream {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::AgentLifecycle => "agent_lifecycle",
            Self::PolicyChanges => "policy_changes",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "agent_lifecycle" => Some(Self::AgentLifecycle),
            "policy_changes" => Some(Self::PolicyChanges),
            _ => None,
        }
    }
}

/// One admin change event, encoded and ready for the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct AdminEvent {
    pub event_id: Uuid,
    pub stream: Stream,
    /// Kafka key: the root agent id (prices: `provider/model`).
    pub key: String,
    /// The event's `kind`, also the `event_type` header.
    pub kind: String,
    pub payload: Vec<u8>,
}

impl AdminEvent {
    /// An agent lifecycle event: `event` carries kind, agent, root and change; this
    /// fills in the id, schema version, actor and time. Keyed by the root agent.
    pub fn lifecycle(actor: &str, mut event: pb::AgentLifecycleEvent) -> Self {
        let event_id = Uuid::now_v7();
        event.schema_version = SCHEMA_VERSION;
        event.event_id = event_id.to_string();
        event.actor = actor.to_owned();
        event.occurred_at = Some(timestamp(Utc::now()));
        Self {
            event_id,
            stream: Stream::AgentLifecycle,
            key: event.root_agent_id.clone(),
            kind: event.kind.clone(),
            payload: event.encode_to_vec(),
        }
    }

    /// A policy, allowlist or price change, keyed by `key`.
    pub fn policy_change(actor: &str, key: String, mut event: pb::PolicyChangeEvent) -> Self {
        let event_id = Uuid::now_v7();
        event.schema_version = SCHEMA_VERSION;
        event.event_id = event_id.to_string();
        event.actor = actor.to_owned();
        event.occurred_at = Some(timestamp(Utc::now()));
        Self {
            event_id,
            stream: Stream::PolicyChanges,
            key,
            kind: event.kind.clone(),
            payload: event.encode_to_vec(),
        }
    }
}

/// Appends events to the outbox, in order, on the caller's connection (inside the
/// caller's transaction).
pub async fn append(conn: &mut AsyncPgConnection, events: &[AdminEvent]) -> ServiceResult<()> {
    for chunk in events.chunks(APPEND_CHUNK) {
        let rows: Vec<_> = chunk
            .iter()
            .map(|e| {
                (
                    admin_outbox::event_id.eq(e.event_id),
                    admin_outbox::topic.eq(e.stream.as_str()),
                    admin_outbox::key.eq(&e.key),
                    admin_outbox::event_type.eq(&e.kind),
                    admin_outbox::payload.eq(&e.payload),
                )
            })
            .collect();
        diesel::insert_into(admin_outbox::table)
            .values(rows)
            .execute(conn)
            .await?;
    }
    Ok(())
}

/// Rows waiting in the outbox and the age in seconds of the oldest (0 when empty).
pub async fn outbox_depth(conn: &mut AsyncPgConnection) -> QueryResult<(i64, f64)> {
    #[derive(QueryableByName)]
    struct Depth {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
        #[diesel(sql_type = diesel::sql_types::Double)]
        oldest_s: f64,
    }
    let d: Depth = diesel::sql_query(
        "SELECT count(*) AS n, \
         COALESCE(EXTRACT(EPOCH FROM now() - min(created_at)), 0)::float8 AS oldest_s \
         FROM admin_outbox",
    )
    .get_result(conn)
    .await?;
    Ok((d.n, d.oldest_s))
}

#[derive(Queryable, Selectable, Debug)]
#[diesel(table_name = admin_outbox)]
struct OutboxRow {
    id: i64,
    event_id: Uuid,
    topic: String,
    key: String,
    event_type: String,
    payload: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error("database: {0}")]
    Db(#[from] diesel::result::Error),
    #[error("database call timed out after {0:?}")]
    Timeout(Duration),
    #[error("cannot connect to PostgreSQL: {0}")]
    Connect(String),
}

/// Runs a database call with the bound every call gets.
async fn bounded<T>(
    fut: impl std::future::Future<Output = QueryResult<T>>,
) -> Result<T, RelayError> {
    match tokio::time::timeout(DB_TIMEOUT, fut).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(RelayError::Timeout(DB_TIMEOUT)),
    }
}

/// What one round did.
#[derive(Debug, Default)]
struct RoundStats {
    moved: usize,
    failures: usize,
    shutdown: bool,
}

/// The relay of `admin_outbox` to Kafka. See the module docs.
pub struct AdminOutboxRelay {
    database_url: String,
    producer_config: rdkafka::ClientConfig,
    producer: FutureProducer,
    lifecycle_topic: String,
    policy_changes_topic: String,
    dlq_topic: String,
    db_log: LogLimit,
    kafka_log: LogLimit,
}

impl AdminOutboxRelay {
    pub fn new(database_url: String, kafka: &KafkaConfig) -> Result<Self, KafkaError> {
        let config = producer_config(kafka);
        let producer: FutureProducer = config.create()?;
        metrics::describe_gauge!(
            ADMIN_OUTBOX_DEPTH,
            "Admin change events waiting in PostgreSQL"
        );
        metrics::describe_gauge!(
            ADMIN_OUTBOX_OLDEST_AGE,
            metrics::Unit::Seconds,
            "Age of the oldest admin change event waiting in PostgreSQL"
        );
        metrics::describe_counter!(
            ADMIN_OUTBOX_RELAYED,
            "Admin change events delivered to Kafka, by topic"
        );
        metrics::describe_counter!(
            ADMIN_OUTBOX_ERRORS,
            "Failed database calls and Kafka sends/deliveries of the admin event relay (retried)"
        );
        metrics::counter!(ADMIN_OUTBOX_ERRORS).absolute(0);
        Ok(Self {
            database_url,
            producer_config: config,
            producer,
            lifecycle_topic: kafka.lifecycle_topic.clone(),
            policy_changes_topic: kafka.policy_changes_topic.clone(),
            dlq_topic: kafka.dlq_topic.clone(),
            db_log: LogLimit::default(),
            kafka_log: LogLimit::default(),
        })
    }

    /// Runs until `shutdown` becomes true (or its sender is dropped). Never panics;
    /// database and Kafka trouble is logged, counted and retried with backoff.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        tracing::info!("admin event relay started");
        // The dedicated connection; `leader` = it holds the relay lock.
        let mut conn: Option<AsyncPgConnection> = None;
        let mut leader = false;
        let mut backoff = BACKOFF_MIN;
        let mut depth_at: Option<Instant> = None;
        loop {
            if *shutdown.borrow() {
                break;
            }
            let pause = match self
                .step(&mut conn, &mut leader, &mut depth_at, &mut shutdown)
                .await
            {
                Ok(stats) if stats.shutdown => break,
                Ok(stats) if stats.failures > 0 => Some(next_backoff(&mut backoff)),
                Ok(stats) => {
                    backoff = BACKOFF_MIN;
                    match (leader, stats.moved) {
                        (false, _) => Some(LOCK_RETRY),
                        (true, 0) => Some(IDLE_SLEEP),
                        (true, _) => None,
                    }
                }
                Err(e) => {
                    // The connection may be broken or mid-query: drop it, which
                    // also gives the lock up (PostgreSQL releases it with the session).
                    conn = None;
                    leader = false;
                    metrics::counter!(ADMIN_OUTBOX_ERRORS).increment(1);
                    let pause = next_backoff(&mut backoff);
                    if self.db_log.allow().is_some() {
                        tracing::warn!(error = %e, retry_in = ?pause, "admin event relay: database error");
                    }
                    Some(pause)
                }
            };
            if let Some(pause) = pause {
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    _ = shutdown.changed() => break,
                }
            }
        }
        if let (Some(mut c), true) = (conn, leader) {
            let unlocked = bounded(
                diesel::sql_query("SELECT pg_advisory_unlock($1, $2)")
                    .bind::<diesel::sql_types::Integer, _>(LOCK_CLASS)
                    .bind::<diesel::sql_types::Integer, _>(LOCK_RELAY)
                    .execute(&mut c),
            )
            .await;
            if let Err(e) = unlocked {
                // Released anyway when the connection closes just below.
                tracing::debug!(error = %e, "admin event relay: unlock failed");
            }
        }
        tracing::info!("admin event relay stopped");
    }

    /// Connects, takes the lock if free, samples the depth and, as the leader,
    /// relays one batch.
    async fn step(
        &mut self,
        conn: &mut Option<AsyncPgConnection>,
        leader: &mut bool,
        depth_at: &mut Option<Instant>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<RoundStats, RelayError> {
        if conn.is_none() {
            let connecting = crate::db::tls::establish(&self.database_url);
            let fresh = match tokio::time::timeout(DB_TIMEOUT, connecting).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => return Err(RelayError::Connect(e.to_string())),
                Err(_) => return Err(RelayError::Timeout(DB_TIMEOUT)),
            };
            *conn = Some(fresh);
            *leader = false;
        }
        let Some(c) = conn.as_mut() else {
            return Ok(RoundStats::default());
        };
        if depth_at.is_none_or(|t| t.elapsed() >= DEPTH_EVERY) {
            *depth_at = Some(Instant::now());
            let (depth, oldest) = bounded(outbox_depth(c)).await?;
            // Precision loss only above 2^53 rows.
            #[allow(clippy::cast_precision_loss)]
            let depth = depth as f64;
            metrics::gauge!(ADMIN_OUTBOX_DEPTH).set(depth);
            metrics::gauge!(ADMIN_OUTBOX_OLDEST_AGE).set(oldest.max(0.0));
        }
        if !*leader {
            #[derive(QueryableByName)]
            struct Locked {
                #[diesel(sql_type = diesel::sql_types::Bool)]
                locked: bool,
            }
            let got: Locked = bounded(
                diesel::sql_query("SELECT pg_try_advisory_lock($1, $2) AS locked")
                    .bind::<diesel::sql_types::Integer, _>(LOCK_CLASS)
                    .bind::<diesel::sql_types::Integer, _>(LOCK_RELAY)
                    .get_result(c),
            )
            .await?;
            if !got.locked {
                return Ok(RoundStats::default());
            }
            tracing::info!("admin event relay: this replica relays (holds the lock)");
            *leader = true;
        }
        self.round(c, shutdown).await
    }

    /// Reads a batch from the head, sends it, awaits it, deletes the delivered prefix.
    async fn round(
        &mut self,
        conn: &mut AsyncPgConnection,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<RoundStats, RelayError> {
        let rows: Vec<OutboxRow> = bounded(
            admin_outbox::table
                .select(OutboxRow::as_select())
                .order(admin_outbox::id.asc())
                .limit(BATCH)
                .load(conn),
        )
        .await?;
        let mut stats = RoundStats::default();
        let mut sent: Vec<(i64, String)> = Vec::with_capacity(rows.len());
        let mut futures: Vec<DeliveryFuture> = Vec::with_capacity(rows.len());
        for row in &rows {
            match self.send(row) {
                Some((topic, fut)) => {
                    sent.push((row.id, topic));
                    futures.push(fut);
                }
                None => {
                    // The rest waits: sending it now would only produce copies.
                    stats.failures += 1;
                    break;
                }
            }
        }
        if futures.is_empty() {
            return Ok(stats);
        }
        let Some(results) = await_all(futures, shutdown).await else {
            stats.shutdown = true;
            return Ok(stats);
        };
        // The delivered prefix: a later row of the same key must not overtake a
        // failed one, so everything after the first failure is sent again.
        let mut delivered: Vec<i64> = Vec::with_capacity(sent.len());
        for ((id, topic), result) in sent.into_iter().zip(results) {
            let error = match result {
                Ok(Ok(_)) => None,
                Ok(Err((e, _))) => Some(e.to_string()),
                Err(_) => Some("delivery canceled (producer closed)".to_owned()),
            };
            if let Some(error) = error {
                stats.failures += 1;
                metrics::counter!(ADMIN_OUTBOX_ERRORS).increment(1);
                if self.kafka_log.allow().is_some() {
                    tracing::warn!(%error, %topic, row = id, "admin event relay: Kafka delivery failed; will retry");
                }
                break;
            }
            metrics::counter!(ADMIN_OUTBOX_RELAYED, "topic" => topic).increment(1);
            delivered.push(id);
        }
        if stats.failures > 0 {
            self.recover_producer();
        }
        if !delivered.is_empty() {
            stats.moved = delivered.len();
            bounded(
                diesel::delete(admin_outbox::table.filter(admin_outbox::id.eq_any(delivered)))
                    .execute(conn),
            )
            .await?;
        }
        Ok(stats)
    }

    /// An idempotent producer that hit a fatal error (e.g. the broker lost its
    /// producer state) refuses every later message: replace it. Its undelivered
    /// rows are still in the outbox and go out through the new one.
    fn recover_producer(&mut self) {
        let Some((code, reason)) = self.producer.client().fatal_error() else {
            return;
        };
        match self.producer_config.create::<FutureProducer>() {
            Ok(fresh) => {
                tracing::warn!(?code, %reason, "admin event relay: producer hit a fatal error; replaced it");
                self.producer = fresh;
            }
            Err(e) => {
                metrics::counter!(ADMIN_OUTBOX_ERRORS).increment(1);
                tracing::warn!(error = %e, "admin event relay: cannot recreate the Kafka producer; will retry");
            }
        }
    }

    /// Queues one row. `None` when the producer refused it (logged and counted).
    fn send(&mut self, row: &OutboxRow) -> Option<(String, DeliveryFuture)> {
        let topic = match Stream::parse(&row.topic) {
            Some(Stream::AgentLifecycle) => self.lifecycle_topic.clone(),
            Some(Stream::PolicyChanges) => self.policy_changes_topic.clone(),
            // Impossible under the table's CHECK; parked on the DLQ rather than
            // blocking every later event.
            None => self.dlq_topic.clone(),
        };
        let event_id = row.event_id.to_string();
        let version = SCHEMA_VERSION.to_string();
        let headers = OwnedHeaders::new_with_capacity(4)
            .insert(Header {
                key: "event_id",
                value: Some(event_id.as_str()),
            })
            .insert(Header {
                key: "event_type",
                value: Some(row.event_type.as_str()),
            })
            .insert(Header {
                key: "schema_version",
                value: Some(version.as_str()),
            })
            .insert(Header {
                key: "outbox_topic",
                value: Some(row.topic.as_str()),
            });
        let record = FutureRecord::to(&topic)
            .key(row.key.as_str())
            .payload(row.payload.as_slice())
            .headers(headers);
        match self.producer.send_result(record) {
            Ok(fut) => Some((topic, fut)),
            Err((e, _)) => {
                metrics::counter!(ADMIN_OUTBOX_ERRORS).increment(1);
                if self.kafka_log.allow().is_some() {
                    tracing::warn!(error = %e, %topic, "admin event relay: Kafka producer refused a message; will retry");
                }
                None
            }
        }
    }
}

fn next_backoff(backoff: &mut Duration) -> Duration {
    let pause = *backoff;
    *backoff = (*backoff * 2).min(BACKOFF_MAX);
    pause
}

/// Waits for every delivery (a broker outage can make this take long: the rows
/// stay in the outbox meanwhile). `None` on shutdown, once [`SHUTDOWN_GRACE`] has
/// passed without the deliveries completing.
async fn await_all(
    futures: Vec<DeliveryFuture>,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<Vec<<DeliveryFuture as std::future::Future>::Output>> {
    let all = futures::future::join_all(futures);
    tokio::pin!(all);
    if !*shutdown.borrow() {
        tokio::select! {
            results = &mut all => return Some(results),
            _ = shutdown.changed() => {}
        }
    }
    match tokio::time::timeout(SHUTDOWN_GRACE, all).await {
        Ok(results) => Some(results),
        Err(_) => {
            tracing::warn!("admin event relay: shutting down with deliveries pending; their rows stay in the outbox");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    #[test]
    fn events_carry_id_actor_and_key() {
        let e = AdminEvent::lifecycle(
            "mtls:spiffe://ops/admin",
            pb::AgentLifecycleEvent {
                kind: "agent_created".into(),
                agent_id: "a".into(),
                root_agent_id: "r".into(),
                ..Default::default()
            },
        );
        assert_eq!(e.stream, Stream::AgentLifecycle);
        assert_eq!((e.key.as_str(), e.kind.as_str()), ("r", "agent_created"));
        let decoded = pb::AgentLifecycleEvent::decode(e.payload.as_slice()).unwrap();
        assert_eq!(decoded.event_id, e.event_id.to_string());
        assert_eq!(decoded.actor, "mtls:spiffe://ops/admin");
        assert_eq!(decoded.schema_version, SCHEMA_VERSION);
        assert!(decoded.occurred_at.is_some());
        let p = AdminEvent::policy_change(
            "admin-token",
            "openai/gpt-4o".into(),
            pb::PolicyChangeEvent {
                kind: "price_set".into(),
                ..Default::default()
            },
        );
        assert_eq!(p.stream, Stream::PolicyChanges);
        assert_eq!(p.key, "openai/gpt-4o");
        assert_ne!(p.event_id, e.event_id);
        for s in [Stream::AgentLifecycle, Stream::PolicyChanges] {
            assert_eq!(Stream::parse(s.as_str()), Some(s));
        }
        assert_eq!(Stream::parse("nope"), None);
    }
}
