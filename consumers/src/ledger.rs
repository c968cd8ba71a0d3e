//! The ledger-writer: `caracal.metering.events` -> `ledger_events`.
//!
//! Each message is a [`ChargeEvent`] as the outbox relay encodes it (protobuf
//! value, key = root agent id, headers `event_id`, `event_type`, `schema_version`).
//! It is validated ([`decode`]) and written with every field, plus where it was
//! read (topic, partition, offset). A batch is written as two key ranges at once,
//! each one multi-row `INSERT ... SELECT FROM unnest(...) ON CONFLICT DO NOTHING`
//! in its own transaction; a redelivered event (same id, same time) changes
//! nothing. See the migration `*_ledger_events` for
//! the table, its monthly partitions and the rule for superseded charges
//! (`late_settle`), and `*_ledger_ingest_indexes` for its key and indexes.

use std::{borrow::Borrow, future::Future, pin::Pin, time::Duration};

use caracal_domain::merkle::leaf::LedgerLeaf;
use caracal_proto::v1::{ChargeEvent, Money};
use caracal_service_kit::db::Pool;
use chrono::{DateTime, Utc};
use diesel::sql_types::{Array, BigInt, Bytea, Integer, Nullable, Text, Timestamptz};
use diesel_async::RunQueryDsl;
use prost::Message as _;

use crate::{
    config::ConsumerConfig,
    launch::{launch, Consumer, LaunchError, RunningConsumer},
    pg_batch,
    runner::{Handler, RawMessage, WriteError},
};

/// The `consumer` label.
pub const CONSUMER: &str = "ledger-writer";
/// The consumer group unless configured otherwise.
pub const DEFAULT_GROUP: &str = "caracal-ledger-writer";
/// Event schema versions this writer understands.
pub const KNOWN_SCHEMA_VERSIONS: &[u32] = &[1];
/// Largest amount accepted, micro-units (1e9 currency units): anything above is a
/// corrupt event, and sums of many such stay far inside BIGINT.
pub const MAX_MICROS: i64 = 1_000_000_000_000_000;
/// Longest text accepted, in bytes: ids (the table's CHECK on event and
/// reservation ids), request id, provider, model. Authorize refuses a longer
/// provider or model (authz-service `authorize::MAX_TEXT_BYTES`, the same 200
/// bytes), and the price book a longer model, so every charge the hot path makes
/// fits: what the ledger dead-letters for its text was never charged by a current
/// authz-service.
const MAX_ID_LEN: usize = 200;
/// Joins a row's policy ids into one text for the batch's arrays (PostgreSQL has no
/// ragged arrays; `string_to_array` splits it back, ~40 % cheaper per row than a
/// JSON sub-select). Ids containing it are refused in [`decode`].
const POLICY_SEPARATOR: char = '\u{1f}';
const POLICY_SEPARATOR_STR: &str = "\u{1f}";
/// Batches from this size on are written as [`PARALLEL_WRITES`] concurrent
/// chunks (see [`LedgerWriter`]'s `write`).
const PARALLEL_MIN_ROWS: usize = 1000;
/// Chunks of a batch written at once, each on its own connection.
const PARALLEL_WRITES: usize = 2;
/// The debug line of a write that met rows already there.
const DUPLICATES: &str = "events already in the ledger (redelivery)";
/// How often the monthly partitions ahead are (re)created.
const PARTITIONS_EVERY: Duration = Duration::from_secs(3600);
/// Months created ahead of the current one.
const PARTITIONS_AHEAD: i32 = 2;

/// One `ledger_events` row.
#[derive(Debug, Clone, PartialEq)]
pub struct LedgerRow {
    pub event_id: String,
    pub kind: String,
    pub reservation_id: String,
    pub request_id: String,
    pub agent_id: uuid::Uuid,
    pub root_agent_id: uuid::Uuid,
    pub policy_ids: Vec<String>,
    pub currency: String,
    pub reserved_micros: i64,
    pub charged_micros: i64,
    pub overshoot_micros: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cached_input_tokens: i64,
    pub provider: String,
    pub model: String,
    pub price_version: i32,
    pub schema_version: i32,
    pub occurred_at: DateTime<Utc>,
    /// When the reservation was made: the policy windows the charge counts in.
    /// None for events from before the field existed.
    pub reserved_at: Option<DateTime<Utc>>,
    pub kafka_topic: String,
    pub kafka_partition: i32,
    pub kafka_offset: i64,
}

impl LedgerRow {
    /// The row's Merkle leaf (`caracal_merkle_log::rows::LeafRow::leaf` builds the
    /// same from the stored row: `occurred_at` / `reserved_at` are whole
    /// microseconds here already, as PostgreSQL keeps them).
    pub fn leaf(&self) -> LedgerLeaf {
        LedgerLeaf {
            event_id: self.event_id.clone(),
            kind: self.kind.clone(),
            reservation_id: self.reservation_id.clone(),
            request_id: self.request_id.clone(),
            agent_id: *self.agent_id.as_bytes(),
            root_agent_id: *self.root_agent_id.as_bytes(),
            policy_ids: self.policy_ids.clone(),
            currency: self.currency.clone(),
            reserved_micros: self.reserved_micros,
            charged_micros: self.charged_micros,
            overshoot_micros: self.overshoot_micros,
            input_tokens: self.input_tokens,
            output_tokens: self.output_tokens,
            cached_input_tokens: self.cached_input_tokens,
            provider: self.provider.clone(),
            model: self.model.clone(),
            price_version: self.price_version,
            schema_version: self.schema_version,
            occurred_at_micros: self.occurred_at.timestamp_micros(),
            reserved_at_micros: self.reserved_at.map(|t| t.timestamp_micros()),
        }
    }
}

fn text(name: &str, value: &str, required: bool) -> Result<String, String> {
    if required && value.is_empty() {
        return Err(format!("{name} is missing"));
    }
    if value.len() > MAX_ID_LEN {
        return Err(format!("{name} is longer than {MAX_ID_LEN} bytes"));
    }
    // PostgreSQL text cannot hold NUL.
    if value.contains('\0') {
        return Err(format!("{name} contains a NUL character"));
    }
    Ok(value.to_owned())
}

fn agent(name: &str, value: &str) -> Result<uuid::Uuid, String> {
    if value.is_empty() {
        return Err(format!("{name} is missing"));
    }
    uuid::Uuid::parse_str(value).map_err(|_| format!("{name} is not a UUID: {value:?}"))
}

fn amount(name: &str, money: Option<&Money>) -> Result<(i64, String), String> {
    let money = money.ok_or_else(|| format!("{name} is missing"))?;
    if !(0..=MAX_MICROS).contains(&money.micros) {
        return Err(format!(
            "{name} is out of range: {} micros (0..={MAX_MICROS})",
            money.micros
        ));
    }
    if money.currency.len() != 3 || !money.currency.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(format!(
            "{name}: currency is not three capital letters: {:?}",
            money.currency
        ));
    }
    Ok((money.micros, money.currency.clone()))
}

fn time(name: &str, ts: &prost_types::Timestamp) -> Result<DateTime<Utc>, String> {
    let nanos = u32::try_from(ts.nanos).map_err(|_| format!("{name}: bad nanos"))?;
    // Whole microseconds, as PostgreSQL stores a timestamptz: the row and its
    // Merkle leaf then hold the same instant.
    DateTime::from_timestamp(ts.seconds, nanos - nanos % 1000)
        .filter(|t| t.timestamp() > 0)
        .ok_or_else(|| format!("{name} is out of range: {}s", ts.seconds))
}

fn tokens(name: &str, n: u64) -> Result<i64, String> {
    i64::try_from(n).map_err(|_| format!("{name} is out of range: {n}"))
}

/// Decodes and validates one metering message. The error is the dead-letter reason.
pub fn decode(msg: &RawMessage) -> Result<LedgerRow, String> {
    if let Some(v) = msg.header("schema_version") {
        let v = std::str::from_utf8(v).unwrap_or("");
        match v.trim().parse::<u32>() {
            Ok(n) if KNOWN_SCHEMA_VERSIONS.contains(&n) => {}
            _ => return Err(format!("unknown schema version {v:?} (header)")),
        }
    }
    let payload = msg.payload.as_deref().ok_or("message has no value")?;
    let ev = ChargeEvent::decode(payload).map_err(|e| format!("not a ChargeEvent: {e}"))?;
    if !KNOWN_SCHEMA_VERSIONS.contains(&ev.schema_version) {
        return Err(format!("unknown schema version {}", ev.schema_version));
    }
    let kind = match ev.kind.as_str() {
        k @ ("settle" | "expire_charge" | "late_settle") => k.to_owned(),
        "" => return Err("kind is missing".to_owned()),
        other => return Err(format!("unknown kind {other:?}")),
    };
    let (reserved, currency) = amount("reserved", ev.reserved.as_ref())?;
    let (charged, charged_currency) = amount("charged", ev.charged.as_ref())?;
    if charged_currency != currency {
        return Err(format!(
            "reserved and charged differ in currency: {currency} / {charged_currency}"
        ));
    }
    if !(0..=MAX_MICROS).contains(&ev.overshoot_micros) {
        return Err(format!(
            "overshoot_micros is out of range: {}",
            ev.overshoot_micros
        ));
    }
    if ev.price_version < 0 {
        return Err(format!("price_version is negative: {}", ev.price_version));
    }
    let usage = ev.usage.unwrap_or_default();
    let ts = ev.occurred_at.ok_or("occurred_at is missing")?;
    let occurred_at = time("occurred_at", &ts)?;
    // Not checked against occurred_at: the two come from the clocks of the
    // replicas that reserved and settled, which may differ a little.
    let reserved_at = ev
        .reserved_at
        .as_ref()
        .map(|t| time("reserved_at", t))
        .transpose()?;
    let policy_ids = ev
        .policy_ids
        .iter()
        .map(|p| {
            let p = text("policy_ids", p, true)?;
            if p.contains(POLICY_SEPARATOR) {
                return Err("policy_ids contains a control character (U+001F)".to_owned());
            }
            Ok(p)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(LedgerRow {
        event_id: text("event_id", &ev.event_id, true)?,
        kind,
        reservation_id: text("reservation_id", &ev.reservation_id, true)?,
        request_id: text("request_id", &ev.request_id, false)?,
        agent_id: agent("agent_id", &ev.agent_id)?,
        root_agent_id: agent("root_agent_id", &ev.root_agent_id)?,
        policy_ids,
        currency,
        reserved_micros: reserved,
        charged_micros: charged,
        overshoot_micros: ev.overshoot_micros,
        input_tokens: tokens("input_tokens", usage.input_tokens)?,
        output_tokens: tokens("output_tokens", usage.output_tokens)?,
        cached_input_tokens: tokens("cached_input_tokens", usage.cached_input_tokens)?,
        provider: text("provider", &ev.provider, false)?,
        model: text("model", &ev.model, false)?,
        price_version: ev.price_version,
        // Known versions are small.
        schema_version: i32::try_from(ev.schema_version).unwrap_or(i32::MAX),
        occurred_at,
        reserved_at,
        kafka_topic: msg.topic.clone(),
        kafka_partition: msg.partition,
        kafka_offset: msg.offset,
    })
}

/// Each new row and its leaf hash in one statement: the rows the INSERT really
/// added (RETURNING: not a redelivered event) are queued for the Merkle log with
/// the hash of their leaf, computed here from the same values
/// ([`LedgerRow::leaf`]), as ONE queue entry holding the arrays (a row each cost
/// more than the ledger row's own index entries). When every row was new, the
/// bound arrays are stored as they are; otherwise only the new rows', in the same
/// order (a one-time filter: that join runs only when something was already
/// there). A row inserted any other way has no queue entry, hence never a leaf,
/// and `merkle verify-range` names it. A statement must not hold an event twice
/// (its RETURNING row would join both copies): [`key_chunks`] keeps one. The
/// statement returns how many rows were new.
const INSERT: &str = "\
WITH ins AS (
INSERT INTO ledger_events (event_id, kind, reservation_id, request_id, agent_id, root_agent_id,
    policy_ids, currency, reserved_micros, charged_micros, overshoot_micros, input_tokens,
    output_tokens, cached_input_tokens, provider, model, price_version, schema_version,
    occurred_at, kafka_topic, kafka_partition, kafka_offset, reserved_at)
SELECT e, k, r, rq, a, ra, coalesce(string_to_array(nullif(p, ''), chr(31)), '{}'), c, rs, ch, o,
    it, ot, ct, pv, m, prv, sv, oa, t, kp, ko, rat
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::uuid[], $6::uuid[], $7::text[],
    $8::text[], $9::int8[], $10::int8[], $11::int8[], $12::int8[], $13::int8[], $14::int8[],
    $15::text[], $16::text[], $17::int4[], $18::int4[], $19::timestamptz[], $20::text[],
    $21::int4[], $22::int8[], $23::timestamptz[])
  AS u(e, k, r, rq, a, ra, p, c, rs, ch, o, it, ot, ct, pv, m, prv, sv, oa, t, kp, ko, rat)
ON CONFLICT DO NOTHING
RETURNING occurred_at, event_id),
n AS (SELECT count(*) AS inserted FROM ins),
q AS (
INSERT INTO merkle_queue (leaves, occurred_ats, event_ids, leaf_hashes)
SELECT n.inserted, $19::timestamptz[], $1::text[], $24::bytea[] FROM n
WHERE n.inserted > 0 AND n.inserted = cardinality($1::text[])
UNION ALL
SELECT count(*), array_agg(h.occurred_at ORDER BY h.ord), array_agg(h.event_id ORDER BY h.ord),
    array_agg(h.leaf_hash ORDER BY h.ord)
FROM ins JOIN unnest($1::text[], $19::timestamptz[], $24::bytea[]) WITH ORDINALITY
    AS h(event_id, occurred_at, leaf_hash, ord)
  ON h.event_id = ins.event_id AND h.occurred_at = ins.occurred_at
WHERE (SELECT inserted FROM n) < cardinality($1::text[])
HAVING count(*) > 0)
SELECT inserted FROM n";

/// What [`INSERT`] returns.
#[derive(diesel::QueryableByName)]
struct Inserted {
    #[diesel(sql_type = BigInt)]
    inserted: i64,
}

/// Writes `rows` in one statement; returns how many were new (the rest were
/// already in the ledger). The columns are bound as borrowed arrays: no text is
/// copied on the way to the wire.
pub async fn insert_rows<R: Borrow<LedgerRow> + Sync>(
    conn: &mut diesel_async::AsyncPgConnection,
    rows: &[R],
) -> Result<usize, diesel::result::Error> {
    fn col<'r, R: Borrow<LedgerRow>, T>(rows: &'r [R], f: impl Fn(&'r LedgerRow) -> T) -> Vec<T> {
        rows.iter().map(|r| f(r.borrow())).collect()
    }
    if rows.is_empty() {
        return Ok(0);
    }
    let new: Inserted = diesel::sql_query(INSERT)
        .bind::<Array<Text>, _>(col(rows, |r| r.event_id.as_str()))
        .bind::<Array<Text>, _>(col(rows, |r| r.kind.as_str()))
        .bind::<Array<Text>, _>(col(rows, |r| r.reservation_id.as_str()))
        .bind::<Array<Text>, _>(col(rows, |r| r.request_id.as_str()))
        .bind::<Array<diesel::sql_types::Uuid>, _>(col(rows, |r| r.agent_id))
        .bind::<Array<diesel::sql_types::Uuid>, _>(col(rows, |r| r.root_agent_id))
        .bind::<Array<Text>, _>(col(rows, |r| r.policy_ids.join(POLICY_SEPARATOR_STR)))
        .bind::<Array<Text>, _>(col(rows, |r| r.currency.as_str()))
        .bind::<Array<BigInt>, _>(col(rows, |r| r.reserved_micros))
        .bind::<Array<BigInt>, _>(col(rows, |r| r.charged_micros))
        .bind::<Array<BigInt>, _>(col(rows, |r| r.overshoot_micros))
        .bind::<Array<BigInt>, _>(col(rows, |r| r.input_tokens))
        .bind::<Array<BigInt>, _>(col(rows, |r| r.output_tokens))
        .bind::<Array<BigInt>, _>(col(rows, |r| r.cached_input_tokens))
        .bind::<Array<Text>, _>(col(rows, |r| r.provider.as_str()))
        .bind::<Array<Text>, _>(col(rows, |r| r.model.as_str()))
        .bind::<Array<Integer>, _>(col(rows, |r| r.price_version))
        .bind::<Array<Integer>, _>(col(rows, |r| r.schema_version))
        .bind::<Array<Timestamptz>, _>(col(rows, |r| r.occurred_at))
        .bind::<Array<Text>, _>(col(rows, |r| r.kafka_topic.as_str()))
        .bind::<Array<Integer>, _>(col(rows, |r| r.kafka_partition))
        .bind::<Array<BigInt>, _>(col(rows, |r| r.kafka_offset))
        .bind::<Array<Nullable<Timestamptz>>, _>(col(rows, |r| r.reserved_at))
        .bind::<Array<Bytea>, _>(col(rows, |r| r.leaf().hash().to_vec()))
        .get_result(conn)
        .await?;
    Ok(usize::try_from(new.inserted).unwrap_or(0))
}

/// Writes `rows` in one statement on a pooled connection.
async fn write_rows(pool: Pool, rows: &[&LedgerRow]) -> Result<(), WriteError> {
    pg_batch::write(
        pool,
        rows,
        |conn, rows| Box::pin(insert_rows(conn, rows)),
        DUPLICATES,
    )
    .await
}

/// The rows of `items` sorted by primary key `(occurred_at, event_id)`, one per
/// key, cut in `n` ranges (fewer when short).
fn key_chunks(items: &[LedgerRow], n: usize) -> Vec<Vec<&LedgerRow>> {
    fn key(r: &LedgerRow) -> (DateTime<Utc>, &str) {
        (r.occurred_at, &r.event_id)
    }
    let mut rows: Vec<&LedgerRow> = items.iter().collect();
    rows.sort_by(|a, b| key(a).cmp(&key(b)));
    // One copy of an event per batch (the first read): the statement queues each
    // inserted row's leaf by joining on its key.
    rows.dedup_by(|a, b| key(a) == key(b));
    let size = rows.len().div_ceil(n.max(1)).max(1);
    let mut chunks = Vec::with_capacity(n);
    while !rows.is_empty() {
        let cut = size.min(rows.len());
        let rest = rows.split_off(cut);
        chunks.push(std::mem::replace(&mut rows, rest));
    }
    chunks
}

/// Writes each chunk in a transaction of its own, all at once.
fn write_chunks<'a>(
    pool: Pool,
    chunks: &'a [Vec<&'a LedgerRow>],
) -> Pin<Box<dyn Future<Output = Result<(), WriteError>> + Send + 'a>> {
    Box::pin(async move {
        match chunks {
            [] => Ok(()),
            [one] => write_rows(pool, one).await,
            _ => {
                let (low, high) = chunks.split_at(chunks.len() / 2);
                let (a, b) =
                    tokio::join!(write_chunks(pool.clone(), low), write_chunks(pool, high));
                a.and(b)
            }
        }
    })
}

/// Creates the current month's partition and the next [`PARTITIONS_AHEAD`] when
/// missing; returns how many were created.
pub async fn ensure_partitions(pool: &Pool) -> Result<i32, String> {
    #[derive(diesel::QueryableByName)]
    struct Created {
        #[diesel(sql_type = Integer)]
        n: i32,
    }
    let mut conn = pool.get().await.map_err(|e| e.to_string())?;
    let row: Created = diesel::sql_query("SELECT ledger_ensure_partitions($1) AS n")
        .bind::<Integer, _>(PARTITIONS_AHEAD)
        .get_result(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
    Ok(row.n)
}

/// The [`Handler`] that writes the ledger.
pub struct LedgerWriter {
    pool: Pool,
}

impl LedgerWriter {
    pub fn new(pool: Pool) -> Self {
        Self { pool }
    }
}

impl Handler for LedgerWriter {
    type Item = LedgerRow;

    fn name(&self) -> &'static str {
        CONSUMER
    }

    fn decode(&self, msg: &RawMessage) -> Result<LedgerRow, String> {
        decode(msg)
    }

    /// A batch of [`PARALLEL_MIN_ROWS`] or more is written as [`PARALLEL_WRITES`]
    /// chunks at once, each in its own transaction on its own connection
    /// (PostgreSQL spends a backend's CPU per row: several backends share the
    /// work). The chunks are ranges of the primary key, so no event is in two of
    /// them (two transactions inserting the same key wait for each other). The
    /// batch is durable once every chunk is; when one fails the whole batch is
    /// retried, and the chunks already written are no-ops (`ON CONFLICT DO
    /// NOTHING`).
    fn write(&self, items: &[LedgerRow]) -> impl Future<Output = Result<(), WriteError>> + Send {
        let pool = self.pool.clone();
        async move {
            let n = if items.len() < PARALLEL_MIN_ROWS {
                1
            } else {
                PARALLEL_WRITES
            };
            let chunks = key_chunks(items, n);
            write_chunks(pool, &chunks).await
        }
    }

    fn reachable(&self) -> impl Future<Output = bool> + Send {
        pg_batch::reachable(self.pool.clone())
    }
}

/// Starts the ledger-writer: binds `/health` + `/metrics` at once, then (in the
/// background, retrying until the database answers) applies migrations, creates
/// the partitions ahead (at start and every hour) and consumes.
pub async fn start(config: ConsumerConfig) -> Result<RunningConsumer, LaunchError> {
    let topics = vec![config.kafka.metering_topic.clone()];
    let merkle = config.ledger_writer.merkle.clone();
    let url = config.database.url.clone();
    let mut running = launch(
        config,
        Consumer {
            default_group: DEFAULT_GROUP,
            topics,
            handler: LedgerWriter::new,
            upkeep_every: PARTITIONS_EVERY,
            upkeep: |pool: Pool| async move {
                match ensure_partitions(&pool).await {
                    Ok(n) if n > 0 => tracing::info!(created = n, "ledger partitions created"),
                    Ok(_) => {}
                    Err(error) => {
                        tracing::warn!(%error, "creating ledger partitions failed; retrying later")
                    }
                }
            },
        },
    )
    .await?;
    // The Merkle sequencer: on every replica, one leads (caracal_merkle_log::service).
    if merkle.enabled {
        running.attach(|shutdown| caracal_merkle_log::service::spawn(url, merkle, shutdown));
    }
    Ok(running)
}

#[cfg(test)]
mod tests {
    use super::*;
    use caracal_proto::v1::TokenUsage;

    fn event() -> ChargeEvent {
        let money = |micros| Money {
            currency: "USD".into(),
            micros,
            amount: String::new(),
        };
        ChargeEvent {
            schema_version: 1,
            event_id: "r1/settle".into(),
            kind: "settle".into(),
            reservation_id: "r1".into(),
            request_id: "q1".into(),
            agent_id: uuid::Uuid::new_v4().to_string(),
            root_agent_id: uuid::Uuid::new_v4().to_string(),
            reserved: Some(money(100)),
            charged: Some(money(150)),
            overshoot_micros: 50,
            usage: Some(TokenUsage {
                input_tokens: 1,
                output_tokens: 2,
                cached_input_tokens: 3,
            }),
            provider: "openai".into(),
            model: "gpt".into(),
            price_version: 4,
            policy_ids: vec!["p1".into(), "p2".into()],
            occurred_at: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 5_000_000,
            }),
            reserved_at: Some(prost_types::Timestamp {
                seconds: 1_699_999_990,
                nanos: 250_000_000,
            }),
        }
    }

    fn msg(ev: &ChargeEvent) -> RawMessage {
        RawMessage {
            topic: "caracal.metering.events".into(),
            partition: 2,
            offset: 7,
            key: Some(ev.root_agent_id.clone().into_bytes()),
            payload: Some(ev.encode_to_vec()),
            headers: vec![("schema_version".into(), Some(b"1".to_vec()))],
            timestamp_ms: None,
        }
    }

    #[test]
    fn a_charge_event_becomes_its_row() {
        let ev = event();
        let row = decode(&msg(&ev)).unwrap();
        assert_eq!(row.event_id, "r1/settle");
        assert_eq!(row.charged_micros, 150);
        assert_eq!(row.overshoot_micros, 50);
        assert_eq!(row.cached_input_tokens, 3);
        assert_eq!(row.policy_ids, vec!["p1", "p2"]);
        assert_eq!(row.occurred_at.timestamp_millis(), 1_700_000_000_005);
        assert_eq!(
            row.reserved_at.map(|t| t.timestamp_millis()),
            Some(1_699_999_990_250)
        );
        // Events from before reserved_at existed still decode.
        let mut old = ev.clone();
        old.reserved_at = None;
        assert_eq!(decode(&msg(&old)).unwrap().reserved_at, None);
        assert_eq!((row.kafka_partition, row.kafka_offset), (2, 7));
    }

    #[test]
    fn chunks_are_key_ranges_with_one_copy_of_an_event() {
        let base = decode(&msg(&event())).unwrap();
        let row = |i: i64, id: &str| LedgerRow {
            event_id: id.to_owned(),
            occurred_at: DateTime::from_timestamp(1_700_000_000 + i, 0).unwrap(),
            ..base.clone()
        };
        // Out of order, and "c" twice: one copy is written.
        let items = vec![
            row(4, "e"),
            row(3, "c"),
            row(1, "a"),
            row(3, "c"),
            row(2, "b"),
            row(5, "f"),
        ];
        let chunks = key_chunks(&items, 2);
        let ids: Vec<Vec<&str>> = chunks
            .iter()
            .map(|c| c.iter().map(|r| r.event_id.as_str()).collect())
            .collect();
        assert_eq!(ids, vec![vec!["a", "b", "c"], vec!["e", "f"]]);
        assert_eq!(key_chunks(&items, 1).len(), 1);
        assert_eq!(key_chunks(&items, 9).iter().map(Vec::len).sum::<usize>(), 5);
        assert!(key_chunks(&[], 2).is_empty());
    }

    #[test]
    fn poison_is_named() {
        type Change = Box<dyn Fn(&mut ChargeEvent)>;
        let cases: Vec<(Change, &str)> = vec![
            (
                Box::new(|e: &mut ChargeEvent| e.schema_version = 9),
                "schema version",
            ),
            (
                Box::new(|e: &mut ChargeEvent| e.event_id.clear()),
                "event_id is missing",
            ),
            (
                Box::new(|e: &mut ChargeEvent| e.agent_id.clear()),
                "agent_id is missing",
            ),
            (
                Box::new(|e: &mut ChargeEvent| e.root_agent_id = "x".into()),
                "not a UUID",
            ),
            (
                Box::new(|e: &mut ChargeEvent| e.reservation_id.clear()),
                "reservation_id is missing",
            ),
            (
                Box::new(|e: &mut ChargeEvent| e.charged.as_mut().unwrap().micros = -1),
                "out of range",
            ),
            (
                Box::new(|e: &mut ChargeEvent| {
                    e.reserved.as_mut().unwrap().micros = MAX_MICROS + 1
                }),
                "out of range",
            ),
            (
                Box::new(|e: &mut ChargeEvent| e.charged.as_mut().unwrap().currency = "usd".into()),
                "currency",
            ),
            (
                Box::new(|e: &mut ChargeEvent| e.policy_ids = vec!["a\u{1f}b".into()]),
                "U+001F",
            ),
            (
                Box::new(|e: &mut ChargeEvent| e.kind = "refund".into()),
                "unknown kind",
            ),
            (
                Box::new(|e: &mut ChargeEvent| e.occurred_at = None),
                "occurred_at",
            ),
            (
                Box::new(|e: &mut ChargeEvent| {
                    e.reserved_at = Some(prost_types::Timestamp {
                        seconds: 0,
                        nanos: 0,
                    })
                }),
                "reserved_at",
            ),
            (
                Box::new(|e: &mut ChargeEvent| e.model = "a\0b".into()),
                "NUL",
            ),
        ];
        for (change, reason) in cases {
            let mut ev = event();
            change(&mut ev);
            let err = decode(&msg(&ev)).unwrap_err();
            assert!(err.contains(reason), "{err} should mention {reason}");
        }
        let mut garbage = msg(&event());
        garbage.payload = Some(vec![0xff; 16]);
        assert!(decode(&garbage).unwrap_err().contains("not a ChargeEvent"));
        let mut header = msg(&event());
        header.headers = vec![("schema_version".into(), Some(b"2".to_vec()))];
        assert!(decode(&header).unwrap_err().contains("schema version"));
    }
}
