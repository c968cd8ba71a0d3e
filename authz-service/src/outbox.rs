//! The outbox relay: Redis streams -> Kafka.
//!
//! The budget scripts (`budget/lua/*.lua`) append an event to their partition's
//! outbox stream in the same atomic step that changes the counters, so a state
//! change and its event exist together or not at all. This relay moves the events
//! on to Kafka:
//!
//! 1. Per partition, a lease (`SET lease owner NX PX 10000`, renewed with a
//!    compare-and-set script) lets one replica at a time drain a partition, which
//!    keeps the events of a hierarchy in order.
//! 2. It reads up to [`BATCH`] entries from the head of each owned outbox, turns each
//!    into its protobuf event ([`DecisionEvent`] or [`ChargeEvent`], Kafka key = the
//!    root agent id, headers `event_id`, `event_type`, `schema_version`) and sends
//!    them all with an idempotent `acks=all` producer.
//! 3. It awaits every delivery and deletes (XDEL) exactly the entries delivered, in
//!    stream order, stopping at the first failure: an entry leaves the outbox only
//!    once Kafka has it. The rest is sent again in a later round; consumers dedupe
//!    on `event_id`, so a rare second copy is harmless, while a lost event is not.
//!
//! An entry that cannot be converted (missing or garbled fields) is sent to the
//! dead-letter topic as JSON and then deleted, so it never blocks its partition.
//! Kafka being down only delays: the producer has no message timeout, and nothing
//! is deleted until delivered.

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use caracal_domain::money::format_amount;
use caracal_proto::v1::{ChargeEvent, Decision, DecisionEvent, DenyReason, Money, TokenUsage};
use caracal_service_kit::process::LogLimit;
use caracal_service_kit::redis::{query_each, RedisConn};
use caracal_service_kit::telemetry;
use prost::Message as _;
use rdkafka::{
    message::{Header, OwnedHeaders},
    producer::{DeliveryFuture, FutureProducer, FutureRecord},
};
use redis::{Script, Value};
use tokio::sync::watch;

use crate::{
    budget::KeySpace,
    kafka::{producer_config, KafkaConfig, KafkaError},
};

/// Entries waiting in the outbox streams (sum over partitions), sampled by the relay.
pub const OUTBOX_DEPTH: &str = "caracal_outbox_depth";
/// Relay lag: seconds the oldest entry of any outbox stream has waited (0 when all
/// are empty), sampled with the depth.
pub const OUTBOX_OLDEST_AGE: &str = "caracal_outbox_oldest_age_seconds";
/// Events delivered to Kafka, labelled `topic`.
pub const OUTBOX_RELAYED: &str = "caracal_outbox_relayed_total";
/// Failed Redis calls, sends and deliveries of the relay (each is retried).
pub const OUTBOX_RELAY_ERRORS: &str = "caracal_outbox_relay_errors_total";
/// Outbox entries that could not be converted and went to the dead-letter topic.
pub const OUTBOX_DLQ: &str = "caracal_outbox_dlq_total";

/// Version of the event schemas (`schema_version` field and header).
pub const SCHEMA_VERSION: u32 = 1;
/// Entries read from one partition's outbox per round.
pub const BATCH: usize = 500;
/// `consumer` field of the relay's dead-letter records.
pub const DLQ_CONSUMER: &str = "outbox-relay";

/// Lease lifetime. A relay that stops renewing loses its partitions after this.
const LEASE_MS: u64 = 10_000;
/// How often an owned lease is renewed (well inside [`LEASE_MS`]).
const LEASE_RENEW_EVERY: Duration = Duration::from_millis(2_500);
/// How often a relay tries to take a partition another relay holds.
const LEASE_ACQUIRE_EVERY: Duration = Duration::from_secs(1);
/// A lease is only used for a new round while at least this much of it is left.
const LEASE_MARGIN: Duration = Duration::from_secs(3);
/// Pause after a round that moved nothing.
const IDLE_SLEEP: Duration = Duration::from_millis(50);
/// Bound on every Redis call.
const REDIS_TIMEOUT: Duration = Duration::from_secs(5);
/// Backoff after errors: doubles from the first value up to the second.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often the depth gauge is refreshed.
const DEPTH_EVERY: Duration = Duration::from_secs(1);
/// On shutdown, how long in-flight deliveries may still take.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Renews the lease only if we still hold it.
const RENEW_LUA: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// Gives the lease up only if we still hold it.
const RELEASE_LUA: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// What kind of event an outbox entry became.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Decision,
    Charge,
}

impl EventKind {
    /// The `event_type` header (the outbox entry's `type`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Decision => "decision",
            Self::Charge => "charge",
        }
    }
}

/// An outbox entry turned into the Kafka message that carries it.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvertedEvent {
    pub kind: EventKind,
    pub event_id: String,
    /// The Kafka key: the hierarchy's root agent id.
    pub key: String,
    /// The encoded protobuf event.
    pub payload: Vec<u8>,
}

/// Converts one outbox entry (its fields, as the Lua scripts wrote them) into its
/// event. The error says what is missing or garbled; such an entry is poison.
pub fn convert_entry(fields: &HashMap<String, String>) -> Result<ConvertedEvent, String> {
    let f = Fields(fields);
    match f.get("type")? {
        "decision" => {
            let event = decision_event(&f)?;
            Ok(ConvertedEvent {
                kind: EventKind::Decision,
                key: event.root_agent_id.clone(),
                event_id: event.event_id.clone(),
                payload: event.encode_to_vec(),
            })
        }
        "charge" => {
            let event = charge_event(&f)?;
            Ok(ConvertedEvent {
                kind: EventKind::Charge,
                key: event.root_agent_id.clone(),
                event_id: event.event_id.clone(),
                payload: event.encode_to_vec(),
            })
        }
        other => Err(format!("unknown entry type {other:?}")),
    }
}

fn decision_event(f: &Fields<'_>) -> Result<DecisionEvent, String> {
    let decision = match f.get("decision")? {
        "allow" => Decision::Allow,
        "deny" => Decision::Deny,
        other => return Err(format!("field decision: unknown value {other:?}")),
    };
    let reason_text = f.opt("reason");
    let reason = if reason_text.is_empty() {
        DenyReason::Unspecified
    } else {
        match DenyReason::from_str_name(&format!(
            "DENY_REASON_{}",
            reason_text.to_ascii_uppercase()
        )) {
            Some(r) => r,
            // A release carries a free-text reason (client abort, upstream error...)
            // that has no DenyReason value; a denial must name a known one.
            None if decision == Decision::Allow => DenyReason::Unspecified,
            None => return Err(format!("field reason: unknown deny reason {reason_text:?}")),
        }
    };
    let currency = f.non_empty("currency")?;
    Ok(DecisionEvent {
        schema_version: SCHEMA_VERSION,
        event_id: f.non_empty("event_id")?.to_owned(),
        kind: f.non_empty("kind")?.to_owned(),
        request_id: f.opt("request_id").to_owned(),
        agent_id: f.opt("agent_id").to_owned(),
        root_agent_id: f.non_empty("root_agent_id")?.to_owned(),
        decision: decision as i32,
        reason: reason as i32,
        policy_id: f.opt("policy_id").to_owned(),
        reservation_id: f.opt("reservation_id").to_owned(),
        amount: Some(money(f.micros("amount")?, currency)),
        provider: f.opt("provider").to_owned(),
        model: f.opt("model").to_owned(),
        resource: f.opt("resource").to_owned(),
        occurred_at: Some(f.timestamp("at_ms")?),
        reservation_record: f.opt("record").to_owned(),
        expires_at: match f.opt("expires_at_ms") {
            "" => None,
            _ => Some(f.timestamp("expires_at_ms")?),
        },
    })
}

fn charge_event(f: &Fields<'_>) -> Result<ChargeEvent, String> {
    let currency = f.non_empty("currency")?;
    let reserved = f.micros("reserved")?;
    let charged = f.micros("charged")?;
    let price_version = match f.opt("price_version") {
        "" => 0,
        v => v
            .parse::<i32>()
            .map_err(|_| format!("field price_version: not an integer: {v:?}"))?,
    };
    Ok(ChargeEvent {
        schema_version: SCHEMA_VERSION,
        event_id: f.non_empty("event_id")?.to_owned(),
        kind: f.non_empty("kind")?.to_owned(),
        reservation_id: f.non_empty("reservation_id")?.to_owned(),
        request_id: f.opt("request_id").to_owned(),
        agent_id: f.opt("agent_id").to_owned(),
        root_agent_id: f.non_empty("root_agent_id")?.to_owned(),
        reserved: Some(money(reserved, currency)),
        charged: Some(money(charged, currency)),
        overshoot_micros: charged.saturating_sub(reserved).max(0),
        usage: Some(TokenUsage {
            input_tokens: f.tokens("input_tokens")?,
            output_tokens: f.tokens("output_tokens")?,
            cached_input_tokens: f.tokens("cached_input_tokens")?,
        }),
        provider: f.opt("provider").to_owned(),
        model: f.opt("model").to_owned(),
        price_version,
        policy_ids: f
            .opt("policy_ids")
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(str::to_owned)
            .collect(),
        occurred_at: Some(f.timestamp("at_ms")?),
        // From the reservation's metadata (see `budget::store`): the windows the
        // charge counts in. Absent for reservations made before it was recorded.
        reserved_at: match f.opt("reserved_at_ms") {
            "" => None,
            _ => Some(f.timestamp("reserved_at_ms")?),
        },
    })
}

fn money(micros: i64, currency: &str) -> Money {
    Money {
        currency: currency.to_owned(),
        micros,
        amount: format_amount(micros),
    }
}

/// The scripts write what every event of a reservation shares (request, agents,
/// currency, provider, model, resource) as one JSON field, `meta`, built by the
/// service: fewer stream fields keep the hot-path scripts cheap. This spreads it
/// into the entry's fields; a field written by the script itself wins.
pub fn expand_meta(fields: &mut HashMap<String, String>) -> Result<(), String> {
    let Some(meta) = fields.remove("meta") else {
        return Ok(());
    };
    // An allow's reservation record ends with the metadata (its last line): the
    // script stores the record without it, and it is put back here, off Redis.
    if let Some(record) = fields.get_mut("record") {
        record.push_str(&meta);
    }
    let parsed: HashMap<String, String> = match serde_json::from_str(&meta) {
        Ok(m) => m,
        Err(e) => {
            let error = format!("field meta: not a JSON object of strings: {e}");
            fields.insert("meta".to_owned(), meta);
            return Err(error);
        }
    };
    for (name, value) in parsed {
        fields.entry(name).or_insert(value);
    }
    Ok(())
}

/// Field access with the error messages of a poison entry.
struct Fields<'a>(&'a HashMap<String, String>);

impl Fields<'_> {
    /// A field the scripts always write (may be empty).
    fn get(&self, name: &str) -> Result<&str, String> {
        self.0
            .get(name)
            .map(String::as_str)
            .ok_or_else(|| format!("field {name} is missing"))
    }
    fn non_empty(&self, name: &str) -> Result<&str, String> {
        match self.get(name)? {
            "" => Err(format!("field {name} is empty")),
            v => Ok(v),
        }
    }
    /// An optional text field ("" when absent).
    fn opt(&self, name: &str) -> &str {
        self.0.get(name).map_or("", String::as_str)
    }
    /// A non-negative amount in micro-units.
    fn micros(&self, name: &str) -> Result<i64, String> {
        let v = self.non_empty(name)?;
        match v.parse::<i64>() {
            Ok(n) if n >= 0 => Ok(n),
            _ => Err(format!("field {name}: not a non-negative integer: {v:?}")),
        }
    }
    /// A token count; absent or empty means 0.
    fn tokens(&self, name: &str) -> Result<u64, String> {
        match self.opt(name) {
            "" => Ok(0),
            v => v
                .parse::<u64>()
                .map_err(|_| format!("field {name}: not a token count: {v:?}")),
        }
    }
    /// Milliseconds since the epoch, as a protobuf timestamp.
    fn timestamp(&self, name: &str) -> Result<prost_types::Timestamp, String> {
        let ms = self.micros(name)?;
        Ok(prost_types::Timestamp {
            seconds: ms / 1000,
            // 0..=999_000_000: always fits.
            nanos: i32::try_from((ms % 1000) * 1_000_000).unwrap_or(0),
        })
    }
}

/// The dead-letter record of a poison entry (the envelope every dead letter uses).
pub fn dlq_record(
    stream: &str,
    entry_id: &str,
    fields: &BTreeMap<String, String>,
    error: &str,
) -> Vec<u8> {
    caracal_service_kit::dlq::DeadLetter::from_outbox(stream, entry_id, fields, error, DLQ_CONSUMER)
        .to_json()
}

/// Entries in all outbox streams of the key space (sum of XLEN): one pipeline on
/// a standalone server, one call per partition's slot on a cluster.
pub async fn outbox_depth(conn: &RedisConn, keys: &KeySpace) -> redis::RedisResult<u64> {
    let lens = (0..keys.partitions())
        .map(|p| redis::cmd("XLEN").arg(keys.outbox(p)).clone())
        .collect();
    let mut total = 0u64;
    for len in query_each(conn, lens).await? {
        total = total.saturating_add(redis::from_redis_value::<u64>(len)?);
    }
    Ok(total)
}

/// When the oldest entry of all outbox streams was appended (ms since the epoch,
/// from its stream id: the scripts append with `XADD ... *`, so the id is the Redis
/// server's clock), or `None` when every stream is empty. One `XRANGE ... COUNT 1`
/// per partition, pipelined like [`outbox_depth`].
pub async fn outbox_oldest_ms(
    conn: &RedisConn,
    keys: &KeySpace,
) -> redis::RedisResult<Option<u64>> {
    let heads = (0..keys.partitions())
        .map(|p| {
            redis::cmd("XRANGE")
                .arg(keys.outbox(p))
                .arg("-")
                .arg("+")
                .arg("COUNT")
                .arg(1)
                .clone()
        })
        .collect();
    let mut oldest: Option<u64> = None;
    for reply in query_each(conn, heads).await? {
        let Ok(entries) = range_entries(reply) else {
            continue;
        };
        let ms = entries
            .first()
            .and_then(|(id, _)| id.split('-').next()?.parse::<u64>().ok());
        if let Some(ms) = ms {
            oldest = Some(oldest.map_or(ms, |o| o.min(ms)));
        }
    }
    Ok(oldest)
}

/// One partition's lease as this relay sees it.
#[derive(Debug, Default, Clone, Copy)]
struct Lease {
    /// Until when the lease is ours (measured from before the call that set it).
    owned_until: Option<Instant>,
    /// When it was last set or renewed.
    renewed_at: Option<Instant>,
    /// When we last tried to take it.
    tried_at: Option<Instant>,
}

#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis call timed out after {0:?}")]
    RedisTimeout(Duration),
    #[error("{0}")]
    Reply(String),
}

/// What one round did.
#[derive(Debug, Default)]
struct RoundStats {
    /// Entries deleted from the outbox after delivery (events and dead letters).
    moved: usize,
    /// Sends or deliveries that failed (their entries stay in the outbox).
    failures: usize,
    /// Shutdown was requested while deliveries were pending.
    shutdown: bool,
}

/// One message of a round, in the order of its partition's stream.
struct Slot {
    partition: usize,
    entry_id: String,
    topic: String,
    dlq: bool,
    /// The producer span of a traced event: it ends when the slot is dropped,
    /// after the broker answered.
    _span: tracing::Span,
}

/// Relays the outbox streams of one key space to Kafka. See the module docs.
pub struct OutboxRelay {
    conn: RedisConn,
    keys: KeySpace,
    producer: FutureProducer,
    decisions_topic: String,
    metering_topic: String,
    dlq_topic: String,
    owner: String,
    leases: Vec<Lease>,
    renew_script: Script,
    release_script: Script,
    redis_log: LogLimit,
    kafka_log: LogLimit,
    wait_log: LogLimit,
    dlq_log: LogLimit,
}

impl OutboxRelay {
    /// `owner` names this relay in the leases; it must be unique per process
    /// (e.g. pod name + a random suffix).
    pub fn new(
        conn: RedisConn,
        keys: KeySpace,
        kafka: &KafkaConfig,
        owner: String,
    ) -> Result<Self, KafkaError> {
        let producer: FutureProducer = producer_config(kafka).create()?;
        metrics::describe_gauge!(OUTBOX_DEPTH, "Events waiting in the Redis outbox streams");
        metrics::describe_gauge!(
            OUTBOX_OLDEST_AGE,
            metrics::Unit::Seconds,
            "Relay lag: age of the oldest event waiting in the Redis outbox streams (0 when none)"
        );
        metrics::describe_counter!(OUTBOX_RELAYED, "Outbox events delivered to Kafka, by topic");
        metrics::describe_counter!(
            OUTBOX_RELAY_ERRORS,
            "Failed Redis calls and Kafka sends/deliveries of the outbox relay (retried)"
        );
        metrics::describe_counter!(
            OUTBOX_DLQ,
            "Outbox entries that could not be converted, sent to the dead-letter topic"
        );
        // Failures are counted from 0: the series exist before the first one.
        metrics::counter!(OUTBOX_RELAY_ERRORS).increment(0);
        metrics::counter!(OUTBOX_DLQ).increment(0);
        Ok(Self {
            leases: vec![Lease::default(); usize::from(keys.partitions())],
            conn,
            keys,
            producer,
            decisions_topic: kafka.decisions_topic.clone(),
            metering_topic: kafka.metering_topic.clone(),
            dlq_topic: kafka.dlq_topic.clone(),
            owner,
            renew_script: Script::new(RENEW_LUA),
            release_script: Script::new(RELEASE_LUA),
            redis_log: LogLimit::default(),
            kafka_log: LogLimit::default(),
            wait_log: LogLimit::default(),
            dlq_log: LogLimit::default(),
        })
    }

    /// Runs until `shutdown` becomes true (or its sender is dropped). Never panics;
    /// Redis and Kafka trouble is logged, counted and retried with backoff.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        tracing::info!(owner = %self.owner, partitions = self.keys.partitions(), "outbox relay started");
        let mut backoff = BACKOFF_MIN;
        let mut depth_at: Option<Instant> = None;
        loop {
            if *shutdown.borrow() {
                break;
            }
            if depth_at.is_none_or(|t| t.elapsed() >= DEPTH_EVERY) {
                depth_at = Some(Instant::now());
                self.sample_depth().await;
            }
            let pause = match self.round(&mut shutdown).await {
                Ok(stats) if stats.shutdown => break,
                Ok(stats) if stats.failures > 0 => {
                    let pause = backoff;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    Some(pause)
                }
                Ok(stats) => {
                    backoff = BACKOFF_MIN;
                    (stats.moved == 0).then_some(IDLE_SLEEP)
                }
                Err(e) => {
                    metrics::counter!(OUTBOX_RELAY_ERRORS).increment(1);
                    if let Some(suppressed) = self.redis_log.allow() {
                        tracing::warn!(error = %e, suppressed, retry_in = ?backoff, "outbox relay: Redis error");
                    }
                    let pause = backoff;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    Some(pause)
                }
            };
            if let Some(pause) = pause {
                if sleep_or_shutdown(pause, &mut shutdown).await {
                    break;
                }
            }
        }
        self.release_leases().await;
        tracing::info!(owner = %self.owner, "outbox relay stopped");
    }

    async fn sample_depth(&mut self) {
        match tokio::time::timeout(REDIS_TIMEOUT, outbox_depth(&self.conn, &self.keys)).await {
            // Precision loss only above 2^53 entries.
            #[allow(clippy::cast_precision_loss)]
            Ok(Ok(depth)) => metrics::gauge!(OUTBOX_DEPTH).set(depth as f64),
            Ok(Err(e)) => self.redis_trouble(&e.to_string()),
            Err(_) => self.redis_trouble("XLEN timed out"),
        }
        let oldest = tokio::time::timeout(REDIS_TIMEOUT, outbox_oldest_ms(&self.conn, &self.keys));
        match oldest.await {
            Ok(Ok(oldest)) => {
                let now_ms = u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0);
                // Another clock than this one: never below 0.
                let age_ms = oldest.map_or(0, |ms| now_ms.saturating_sub(ms));
                // Milliseconds far below 2^53: exact as f64.
                #[allow(clippy::cast_precision_loss)]
                metrics::gauge!(OUTBOX_OLDEST_AGE).set(age_ms as f64 / 1000.0);
            }
            Ok(Err(e)) => self.redis_trouble(&e.to_string()),
            Err(_) => self.redis_trouble("XRANGE timed out"),
        }
    }

    fn redis_trouble(&mut self, error: &str) {
        metrics::counter!(OUTBOX_RELAY_ERRORS).increment(1);
        if let Some(suppressed) = self.redis_log.allow() {
            tracing::warn!(%error, suppressed, "outbox relay: Redis error");
        }
    }

    /// Runs a Redis call with the timeout every call gets.
    async fn bounded<T>(
        fut: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, RelayError> {
        match tokio::time::timeout(REDIS_TIMEOUT, fut).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(RelayError::RedisTimeout(REDIS_TIMEOUT)),
        }
    }

    /// Renews the leases we hold that are due, and (when `acquire`) tries to take
    /// the others that are due for a try. Errors leave a lease as it was: it stays
    /// ours until its known expiry at most.
    async fn maintain_leases(&mut self, acquire: bool) -> Result<(), RelayError> {
        for p in 0..self.leases.len() {
            let now = Instant::now();
            let lease = self.leases[p];
            let owned = lease.owned_until.is_some_and(|t| t > now);
            let key = self.keys.relay_lease(partition_u16(p));
            let ttl = Duration::from_millis(LEASE_MS);
            if owned {
                if lease
                    .renewed_at
                    .is_some_and(|t| now.duration_since(t) < LEASE_RENEW_EVERY)
                {
                    continue;
                }
                let renewed: i64 = Self::bounded(
                    self.renew_script
                        .key(&key)
                        .arg(&self.owner)
                        .arg(LEASE_MS)
                        .invoke_async(&mut self.conn),
                )
                .await?;
                if renewed == 1 {
                    self.leases[p].owned_until = Some(now + ttl);
                    self.leases[p].renewed_at = Some(now);
                    continue;
                }
                tracing::info!(partition = p, owner = %self.owner, "outbox relay lost its lease");
                self.leases[p].owned_until = None;
            }
            if !acquire
                || lease
                    .tried_at
                    .is_some_and(|t| now.duration_since(t) < LEASE_ACQUIRE_EVERY)
            {
                continue;
            }
            self.leases[p].tried_at = Some(now);
            let set: Option<String> = Self::bounded(
                redis::cmd("SET")
                    .arg(&key)
                    .arg(&self.owner)
                    .arg("NX")
                    .arg("PX")
                    .arg(LEASE_MS)
                    .query_async(&mut self.conn),
            )
            .await?;
            if set.is_some() {
                tracing::debug!(partition = p, owner = %self.owner, "outbox relay took lease");
                self.leases[p].owned_until = Some(now + ttl);
                self.leases[p].renewed_at = Some(now);
            }
        }
        Ok(())
    }

    async fn release_leases(&mut self) {
        for p in 0..self.leases.len() {
            if self.leases[p].owned_until.is_none() {
                continue;
            }
            self.leases[p] = Lease::default();
            let key = self.keys.relay_lease(partition_u16(p));
            let released: Result<i64, _> = Self::bounded(
                self.release_script
                    .key(&key)
                    .arg(&self.owner)
                    .invoke_async(&mut self.conn),
            )
            .await;
            if let Err(e) = released {
                // It expires by itself.
                tracing::debug!(partition = p, error = %e, "could not release outbox lease");
            }
        }
    }

    /// One round over every partition we hold: read, send, await, delete.
    async fn round(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<RoundStats, RelayError> {
        self.maintain_leases(true).await?;
        let now = Instant::now();
        let owned: Vec<usize> = (0..self.leases.len())
            .filter(|&p| {
                self.leases[p]
                    .owned_until
                    .is_some_and(|t| t > now + LEASE_MARGIN)
            })
            .collect();
        let mut stats = RoundStats::default();
        if owned.is_empty() {
            return Ok(stats);
        }

        // One read per partition's stream; on a cluster they live on other shards.
        let reads = owned
            .iter()
            .map(|&p| {
                redis::cmd("XRANGE")
                    .arg(self.keys.outbox(partition_u16(p)))
                    .arg("-")
                    .arg("+")
                    .arg("COUNT")
                    .arg(BATCH)
                    .clone()
            })
            .collect();
        let batches: Vec<Value> = Self::bounded(query_each(&self.conn, reads)).await?;

        let mut slots: Vec<Slot> = Vec::new();
        let mut futures: Vec<DeliveryFuture> = Vec::new();
        for (&p, batch) in owned.iter().zip(batches) {
            let stream = self.keys.outbox(partition_u16(p));
            for (entry_id, raw) in range_entries(batch)? {
                let (slot, sent) = self.send_entry(p, &stream, entry_id, raw);
                match sent {
                    Some(fut) => {
                        slots.push(slot);
                        futures.push(fut);
                    }
                    None => {
                        // Not queued: the rest of this partition waits for the next
                        // round (sending it now would only produce copies).
                        stats.failures += 1;
                        break;
                    }
                }
            }
        }
        if futures.is_empty() {
            return Ok(stats);
        }

        let Some(results) = self.await_deliveries(futures, shutdown).await else {
            stats.shutdown = true;
            return Ok(stats);
        };

        // Per partition: the delivered prefix, in stream order.
        let mut delete: Vec<Vec<String>> = vec![Vec::new(); self.leases.len()];
        let mut blocked = vec![false; self.leases.len()];
        let mut delivered: HashMap<String, u64> = HashMap::new();
        let mut dlq_delivered = 0u64;
        for (slot, result) in slots.into_iter().zip(results) {
            if blocked[slot.partition] {
                continue;
            }
            let error = match result {
                Ok(Ok(_)) => None,
                Ok(Err((e, _))) => Some(e.to_string()),
                Err(_) => Some("delivery canceled (producer closed)".to_owned()),
            };
            if let Some(error) = error {
                stats.failures += 1;
                blocked[slot.partition] = true;
                metrics::counter!(OUTBOX_RELAY_ERRORS).increment(1);
                if let Some(suppressed) = self.kafka_log.allow() {
                    tracing::warn!(%error, topic = %slot.topic, entry = %slot.entry_id, suppressed,
                        "outbox relay: Kafka delivery failed; will retry");
                }
                continue;
            }
            if slot.dlq {
                dlq_delivered += 1;
            } else {
                *delivered.entry(slot.topic).or_default() += 1;
            }
            delete[slot.partition].push(slot.entry_id);
        }
        for (topic, n) in delivered {
            metrics::counter!(OUTBOX_RELAYED, "topic" => topic).increment(n);
        }
        if dlq_delivered > 0 {
            metrics::counter!(OUTBOX_DLQ).increment(dlq_delivered);
        }

        let mut deletes = Vec::new();
        for (p, ids) in delete.iter().enumerate() {
            if !ids.is_empty() {
                stats.moved += ids.len();
                deletes.push(
                    redis::cmd("XDEL")
                        .arg(self.keys.outbox(partition_u16(p)))
                        .arg(ids)
                        .clone(),
                );
            }
        }
        if stats.moved > 0 {
            Self::bounded(query_each(&self.conn, deletes)).await?;
        }
        Ok(stats)
    }

    /// Queues one entry (its event, or a dead letter when it cannot be converted).
    /// `None` when the producer refused it (its error is logged and counted).
    fn send_entry(
        &mut self,
        partition: usize,
        stream: &str,
        entry_id: String,
        raw: Vec<(String, Value)>,
    ) -> (Slot, Option<DeliveryFuture>) {
        let (mut fields, text_error) = entry_fields(raw);
        let expanded = text_error.or_else(|| expand_meta(&mut fields).err());
        // The Authorize span's context, when the call was traced: not part of the
        // event, it travels as the message's `traceparent` header.
        let (span, traceparent) = match fields.remove(telemetry::TRACEPARENT) {
            Some(parent) if telemetry::enabled() => {
                let span =
                    telemetry::span("outbox publish", telemetry::Kind::Producer, Some(&parent));
                let own = telemetry::traceparent(&span);
                (span, own)
            }
            _ => (tracing::Span::none(), None),
        };
        let converted = match expanded {
            Some(e) => Err(e),
            None => convert_entry(&fields),
        };
        let (topic, key, payload, event_id, event_type, dlq) = match converted {
            Ok(ev) => {
                let topic = match ev.kind {
                    EventKind::Decision => self.decisions_topic.clone(),
                    EventKind::Charge => self.metering_topic.clone(),
                };
                (
                    topic,
                    ev.key,
                    ev.payload,
                    ev.event_id,
                    ev.kind.as_str(),
                    false,
                )
            }
            Err(error) => {
                if let Some(suppressed) = self.dlq_log.allow() {
                    tracing::warn!(%stream, entry = %entry_id, %error, suppressed,
                        "outbox entry cannot be converted; sending it to the dead-letter topic");
                }
                let sorted: BTreeMap<String, String> =
                    fields.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                let payload = dlq_record(stream, &entry_id, &sorted, &error);
                let key = match fields.get("root_agent_id") {
                    Some(root) if !root.is_empty() => root.clone(),
                    _ => stream.to_owned(),
                };
                let event_id = match fields.get("event_id") {
                    Some(id) if !id.is_empty() => id.clone(),
                    _ => format!("{stream}/{entry_id}"),
                };
                (
                    self.dlq_topic.clone(),
                    key,
                    payload,
                    event_id,
                    "dead_letter",
                    true,
                )
            }
        };
        let version = SCHEMA_VERSION.to_string();
        let mut headers = OwnedHeaders::new_with_capacity(4)
            .insert(Header {
                key: "event_id",
                value: Some(event_id.as_str()),
            })
            .insert(Header {
                key: "event_type",
                value: Some(event_type),
            })
            .insert(Header {
                key: "schema_version",
                value: Some(version.as_str()),
            });
        if let Some(traceparent) = &traceparent {
            telemetry::attribute(&span, "messaging.destination.name", topic.clone());
            telemetry::attribute(&span, "caracal.event_id", event_id.clone());
            headers = headers.insert(Header {
                key: telemetry::TRACEPARENT,
                value: Some(traceparent.as_str()),
            });
        }
        let record = FutureRecord::to(&topic)
            .key(key.as_str())
            .payload(payload.as_slice())
            .headers(headers);
        let sent = match self.producer.send_result(record) {
            Ok(fut) => Some(fut),
            Err((e, _)) => {
                metrics::counter!(OUTBOX_RELAY_ERRORS).increment(1);
                if let Some(suppressed) = self.kafka_log.allow() {
                    tracing::warn!(error = %e, %topic, suppressed, "outbox relay: Kafka producer refused a message; will retry");
                }
                None
            }
        };
        let slot = Slot {
            partition,
            entry_id,
            topic,
            dlq,
            _span: span,
        };
        (slot, sent)
    }

    /// Waits for every delivery, renewing our leases meanwhile (a broker outage can
    /// make this take long). `None` on shutdown, once [`SHUTDOWN_GRACE`] has passed
    /// without the deliveries completing.
    async fn await_deliveries(
        &mut self,
        futures: Vec<DeliveryFuture>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<Vec<<DeliveryFuture as std::future::Future>::Output>> {
        let all = futures::future::join_all(futures);
        tokio::pin!(all);
        let started = Instant::now();
        let mut deadline: Option<Instant> = None;
        let mut watching = true;
        loop {
            if deadline.is_none() && *shutdown.borrow() {
                deadline = Some(Instant::now() + SHUTDOWN_GRACE);
            }
            let tick = match deadline {
                Some(d) => d
                    .saturating_duration_since(Instant::now())
                    .min(LEASE_RENEW_EVERY),
                None => LEASE_RENEW_EVERY,
            };
            tokio::select! {
                results = &mut all => return Some(results),
                changed = shutdown.changed(), if watching && deadline.is_none() => {
                    if changed.is_err() {
                        watching = false;
                        deadline = Some(Instant::now() + SHUTDOWN_GRACE);
                    }
                }
                () = tokio::time::sleep(tick) => {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        tracing::warn!("outbox relay: shutting down with deliveries pending; their entries stay in the outbox");
                        return None;
                    }
                    if let Some(suppressed) = self.wait_log.allow() {
                        if started.elapsed() >= LEASE_RENEW_EVERY {
                            tracing::warn!(waiting = ?started.elapsed(), suppressed,
                                "outbox relay: waiting for Kafka to acknowledge (broker down?)");
                        }
                    }
                    if let Err(e) = self.maintain_leases(false).await {
                        self.redis_trouble(&e.to_string());
                    }
                }
            }
        }
    }
}

/// The entry's fields as text, and an error when one is not UTF-8 text (then the
/// field is kept lossily, for the dead letter).
fn entry_fields(raw: Vec<(String, Value)>) -> (HashMap<String, String>, Option<String>) {
    let mut error = None;
    let mut fields = HashMap::with_capacity(raw.len());
    for (name, value) in raw {
        let text = match value {
            Value::BulkString(bytes) => match String::from_utf8(bytes) {
                Ok(s) => s,
                Err(e) => {
                    error.get_or_insert_with(|| format!("field {name} is not UTF-8 text"));
                    String::from_utf8_lossy(e.as_bytes()).into_owned()
                }
            },
            Value::SimpleString(s) => s,
            Value::Int(i) => i.to_string(),
            other => {
                error.get_or_insert_with(|| format!("field {name} has an unexpected type"));
                format!("{other:?}")
            }
        };
        fields.insert(name, text);
    }
    (fields, error)
}

/// One stream entry: its id and its fields in stream order.
type RawEntry = (String, Vec<(String, Value)>);

/// The entries of an XRANGE reply (`[[id, [field, value, ...]], ...]`). Walked by
/// hand: much cheaper than the generic stream reply type, which matters at
/// thousands of entries per round.
fn range_entries(reply: Value) -> Result<Vec<RawEntry>, RelayError> {
    let bad = |what: &str| RelayError::Reply(format!("unexpected XRANGE reply: {what}"));
    let Value::Array(entries) = reply else {
        return match reply {
            Value::Nil => Ok(Vec::new()),
            _ => Err(bad("not an array")),
        };
    };
    let mut out = Vec::with_capacity(entries.len());
    for entry in entries {
        let Value::Array(parts) = entry else {
            return Err(bad("entry is not an array"));
        };
        let mut parts = parts.into_iter();
        let id = match parts.next() {
            Some(Value::BulkString(b)) => {
                String::from_utf8(b).map_err(|_| bad("entry id is not text"))?
            }
            Some(Value::SimpleString(s)) => s,
            _ => return Err(bad("entry without id")),
        };
        let flat = match parts.next() {
            Some(Value::Array(flat)) => flat,
            // A deleted entry's fields can come back as nil.
            Some(Value::Nil) | None => Vec::new(),
            Some(_) => return Err(bad("entry fields are not an array")),
        };
        let mut fields = Vec::with_capacity(flat.len() / 2);
        let mut flat = flat.into_iter();
        while let Some(name) = flat.next() {
            let name = match name {
                Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
                Value::SimpleString(s) => s,
                other => format!("{other:?}"),
            };
            fields.push((name, flat.next().unwrap_or(Value::Nil)));
        }
        out.push((id, fields));
    }
    Ok(out)
}

/// Partition indexes come from `0..partitions()` (a u16).
fn partition_u16(p: usize) -> u16 {
    u16::try_from(p).unwrap_or(u16::MAX)
}

/// Sleeps, or returns early with true when shutdown is requested.
async fn sleep_or_shutdown(d: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    if *shutdown.borrow() {
        return true;
    }
    tokio::select! {
        () = tokio::time::sleep(d) => false,
        changed = shutdown.changed() => changed.is_err() || *shutdown.borrow(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn deny_entry() -> HashMap<String, String> {
        map(&[
            ("type", "decision"),
            ("event_id", "ev-1"),
            ("kind", "authorize"),
            ("decision", "deny"),
            ("reason", "budget_exceeded"),
            ("request_id", "req-1"),
            ("agent_id", "child"),
            ("root_agent_id", "root"),
            ("policy_id", "pol-1"),
            ("reservation_id", ""),
            ("amount", "1500000"),
            ("currency", "USD"),
            ("provider", "openai"),
            ("model", "gpt-4o"),
            ("resource", "api.openai.com/v1/chat/completions"),
            ("at_ms", "1770000000123"),
        ])
    }

    fn charge_entry() -> HashMap<String, String> {
        map(&[
            ("type", "charge"),
            ("kind", "settle"),
            ("reserved", "1000000"),
            ("charged", "1250000"),
            ("input_tokens", "100"),
            ("output_tokens", "50"),
            ("cached_input_tokens", "10"),
            ("price_version", "3"),
            ("policy_ids", "p1,p2"),
            ("event_id", "rsv_1_x/settle"),
            ("reservation_id", "rsv_1_x"),
            ("request_id", "req-2"),
            ("agent_id", "child"),
            ("root_agent_id", "root"),
            ("currency", "EUR"),
            ("provider", "anthropic"),
            ("model", "claude"),
            ("at_ms", "1770000000999"),
            ("reserved_at_ms", "1769999999001"),
        ])
    }

    #[test]
    fn decision_entries_convert() {
        let ev = convert_entry(&deny_entry()).unwrap();
        assert_eq!(ev.kind, EventKind::Decision);
        assert_eq!(ev.key, "root");
        let d = DecisionEvent::decode(ev.payload.as_slice()).unwrap();
        assert_eq!(d.schema_version, 1);
        assert_eq!(d.decision(), Decision::Deny);
        assert_eq!(d.reason(), DenyReason::BudgetExceeded);
        let amount = d.amount.unwrap();
        assert_eq!(
            (
                amount.micros,
                amount.amount.as_str(),
                amount.currency.as_str()
            ),
            (1_500_000, "1.50", "USD")
        );
        let at = d.occurred_at.unwrap();
        assert_eq!((at.seconds, at.nanos), (1_770_000_000, 123_000_000));

        // A release carries a free-text reason: no DenyReason, still an event.
        let mut release = deny_entry();
        release.insert("decision".into(), "allow".into());
        release.insert("kind".into(), "release".into());
        release.insert("reason".into(), "client_abort".into());
        let d = DecisionEvent::decode(convert_entry(&release).unwrap().payload.as_slice()).unwrap();
        assert_eq!(
            (d.decision(), d.reason()),
            (Decision::Allow, DenyReason::Unspecified)
        );
    }

    #[test]
    fn charge_entries_convert() {
        let ev = convert_entry(&charge_entry()).unwrap();
        assert_eq!(ev.kind, EventKind::Charge);
        let c = ChargeEvent::decode(ev.payload.as_slice()).unwrap();
        assert_eq!(c.overshoot_micros, 250_000);
        assert_eq!(c.charged.unwrap().amount, "1.25");
        assert_eq!(c.policy_ids, vec!["p1", "p2"]);
        assert_eq!(c.price_version, 3);
        assert_eq!(c.usage.unwrap().cached_input_tokens, 10);
        let at = c.reserved_at.unwrap();
        assert_eq!((at.seconds, at.nanos), (1_769_999_999, 1_000_000));

        // A reservation made before reserved_at was recorded: none, not poison.
        let mut old = charge_entry();
        old.remove("reserved_at_ms");
        let c = ChargeEvent::decode(convert_entry(&old).unwrap().payload.as_slice()).unwrap();
        assert_eq!(c.reserved_at, None);

        let mut none = charge_entry();
        none.insert("policy_ids".into(), String::new());
        none.insert("charged".into(), "0".into());
        let c = ChargeEvent::decode(convert_entry(&none).unwrap().payload.as_slice()).unwrap();
        assert!(c.policy_ids.is_empty());
        assert_eq!(c.overshoot_micros, 0);
    }

    #[test]
    fn poison_entries_are_refused_with_a_reason() {
        let cases: Vec<(HashMap<String, String>, &str)> = vec![
            (map(&[("type", "other")]), "unknown entry type"),
            (map(&[]), "type is missing"),
            (
                {
                    let mut e = deny_entry();
                    e.remove("event_id");
                    e
                },
                "event_id",
            ),
            (
                {
                    let mut e = deny_entry();
                    e.insert("amount".into(), "1.5".into());
                    e
                },
                "amount",
            ),
            (
                {
                    let mut e = deny_entry();
                    e.insert("amount".into(), "-1".into());
                    e
                },
                "amount",
            ),
            (
                {
                    let mut e = deny_entry();
                    e.insert("decision".into(), "maybe".into());
                    e
                },
                "decision",
            ),
            (
                {
                    let mut e = deny_entry();
                    e.insert("reason".into(), "whatever".into());
                    e
                },
                "reason",
            ),
            (
                {
                    let mut e = deny_entry();
                    e.insert("root_agent_id".into(), String::new());
                    e
                },
                "root_agent_id",
            ),
            (
                {
                    let mut e = charge_entry();
                    e.insert("at_ms".into(), "soon".into());
                    e
                },
                "at_ms",
            ),
            (
                {
                    let mut e = charge_entry();
                    e.insert("input_tokens".into(), "x".into());
                    e
                },
                "input_tokens",
            ),
            (
                {
                    let mut e = charge_entry();
                    e.remove("charged");
                    e
                },
                "charged",
            ),
        ];
        for (entry, needle) in cases {
            let err = convert_entry(&entry).unwrap_err();
            assert!(err.contains(needle), "{err} should mention {needle}");
        }
    }

    #[test]
    fn meta_is_spread_into_the_fields() {
        let mut fields = map(&[
            ("type", "decision"),
            ("kind", "authorize"),
            ("decision", "allow"),
            ("event_id", "rsv_1_x/authorize"),
            ("reservation_id", "rsv_1_x"),
            ("amount", "5000"),
            ("at_ms", "1700000000123"),
            (
                "meta",
                r#"{"request_id":"r1","agent_id":"a","root_agent_id":"root","currency":"USD","provider":"openai","model":"gpt-4o","resource":"x\ty","kind":"ignored"}"#,
            ),
        ]);
        expand_meta(&mut fields).unwrap();
        assert!(!fields.contains_key("meta"));
        assert_eq!(fields["kind"], "authorize", "script fields win");
        assert_eq!(fields["resource"], "x\ty");
        let ev = convert_entry(&fields).unwrap();
        assert_eq!(ev.key, "root");
        let d = DecisionEvent::decode(ev.payload.as_slice()).unwrap();
        assert_eq!(d.request_id, "r1");
        assert_eq!(d.agent_id, "a");
        assert_eq!(d.model, "gpt-4o");
        assert_eq!(d.amount.unwrap().micros, 5000);

        let mut broken = map(&[("type", "decision"), ("meta", "{not json")]);
        let err = expand_meta(&mut broken).unwrap_err();
        assert!(err.contains("field meta"), "{err}");
        assert!(broken.contains_key("meta"), "kept for the dead letter");
    }

    #[test]
    fn non_text_fields_are_poison() {
        let raw: Vec<(String, Value)> =
            [("type".to_owned(), Value::BulkString(vec![0xff, 0xfe]))].into();
        let (fields, err) = entry_fields(raw);
        assert!(err.unwrap().contains("type"));
        assert_eq!(fields.len(), 1);
    }

    #[test]
    fn xrange_replies_are_walked_in_order() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let reply = Value::Array(vec![
            Value::Array(vec![
                bulk("1-0"),
                Value::Array(vec![
                    bulk("type"),
                    bulk("charge"),
                    bulk("event_id"),
                    bulk("e"),
                ]),
            ]),
            Value::Array(vec![bulk("2-0"), Value::Array(vec![bulk("odd")])]),
        ]);
        let entries = range_entries(reply).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].0, "1-0");
        assert_eq!(entries[0].1[1], ("event_id".to_owned(), bulk("e")));
        // A field without a value is kept (as nil): the entry is then poison.
        assert_eq!(entries[1].1, vec![("odd".to_owned(), Value::Nil)]);
        let (_, err) = entry_fields(entries[1].1.clone());
        assert!(err.is_some());
        assert!(range_entries(Value::Nil).unwrap().is_empty());
        assert!(range_entries(Value::Int(1)).is_err());
    }

    #[test]
    fn dead_letters_are_json() {
        let fields: BTreeMap<String, String> = [("type".to_owned(), "x".to_owned())].into();
        let v: serde_json::Value =
            serde_json::from_slice(&dlq_record("s", "1-0", &fields, "bad")).unwrap();
        assert_eq!(v["consumer"], "outbox-relay");
        assert_eq!(v["original_stream"], "s");
        assert_eq!(v["entry_id"], "1-0");
        assert_eq!(v["fields"]["type"], "x");
        assert_eq!(v["error"], "bad");
    }
}
