//! Charge events as the consumers' tests feed them: built as the outbox relay
//! encodes them, produced to `caracal.metering.events` with the relay's headers,
//! and counted back out of the ledger.

use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use caracal_proto::v1::{ChargeEvent, Money, TokenUsage};
use chrono::{DateTime, Utc};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use prost::Message;
use rdkafka::{
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
    ClientConfig,
};
use uuid::Uuid;

/// The topic the outbox relay publishes charge events to.
pub const METERING: &str = "caracal.metering.events";

pub fn money(currency: &str, micros: i64) -> Option<Money> {
    Some(Money {
        currency: currency.to_owned(),
        micros,
        amount: String::new(),
    })
}

pub fn usd(micros: i64) -> Option<Money> {
    money("USD", micros)
}

/// One charge event, as the outbox relay encodes it: `micros` reserved and
/// charged, 10 input / 20 output tokens of an OpenAI model, price version 1.
pub struct Charge<'a> {
    pub agent: Uuid,
    pub root: Uuid,
    pub id: &'a str,
    pub kind: &'a str,
    pub reservation: &'a str,
    pub model: &'a str,
    pub currency: &'a str,
    pub micros: i64,
    pub at: DateTime<Utc>,
}

impl Charge<'_> {
    pub fn event(&self) -> ChargeEvent {
        ChargeEvent {
            schema_version: 1,
            event_id: self.id.to_owned(),
            kind: self.kind.to_owned(),
            reservation_id: self.reservation.to_owned(),
            request_id: format!("req-{}", self.reservation),
            agent_id: self.agent.to_string(),
            root_agent_id: self.root.to_string(),
            reserved: money(self.currency, self.micros),
            charged: money(self.currency, self.micros),
            overshoot_micros: 0,
            usage: Some(TokenUsage {
                input_tokens: 10,
                output_tokens: 20,
                cached_input_tokens: 0,
            }),
            provider: "openai".to_owned(),
            model: self.model.to_owned(),
            price_version: 1,
            policy_ids: vec![],
            occurred_at: Some(prost_types::Timestamp {
                seconds: self.at.timestamp(),
                nanos: 0,
            }),
            reserved_at: None,
        }
    }
}

/// The `i`-th settle of a run (`<run>-<i>/settle`, now, gpt-4o-mini, policy
/// `policy-<i mod 3>`), charging 1 to 100,000 USD micros spread by `i`: a
/// backlog whose sum only comes out right if every event lands once.
pub fn numbered_charge(run: &str, i: u64, agent: &Uuid, root: &Uuid) -> ChargeEvent {
    let reservation = format!("{run}-{i}");
    let id = format!("{reservation}/settle");
    ChargeEvent {
        request_id: format!("req-{i}"),
        policy_ids: vec![format!("policy-{}", i % 3)],
        ..Charge {
            agent: *agent,
            root: *root,
            id: &id,
            kind: "settle",
            reservation: &reservation,
            model: "gpt-4o-mini",
            currency: "USD",
            micros: 1 + (i * 7919 % 100_000) as i64,
            at: Utc::now(),
        }
        .event()
    }
}

/// The charged micros of an event (0 without a charge).
pub fn charged(ev: &ChargeEvent) -> i64 {
    ev.charged.as_ref().map_or(0, |m| m.micros)
}

/// A message to produce to [`METERING`]: key, value and the `event_id` header
/// (any bytes: poison tests send values that are no `ChargeEvent`).
#[derive(Debug, Clone)]
pub struct ChargeMessage {
    pub key: String,
    pub payload: Vec<u8>,
    pub event_id: String,
}

impl ChargeMessage {
    /// An event as the relay publishes it: keyed by its root agent.
    pub fn event(ev: &ChargeEvent) -> Self {
        Self {
            key: ev.root_agent_id.clone(),
            payload: ev.encode_to_vec(),
            event_id: ev.event_id.clone(),
        }
    }
}

/// The headers the relay sends with a charge event.
pub fn charge_headers(event_id: &str) -> OwnedHeaders {
    OwnedHeaders::new_with_capacity(3)
        .insert(Header {
            key: "event_id",
            value: Some(event_id),
        })
        .insert(Header {
            key: "event_type",
            value: Some("charge"),
        })
        .insert(Header {
            key: "schema_version",
            value: Some("1"),
        })
}

/// A producer that waits for every replica (`acks=all`).
pub fn charge_producer(brokers: &str) -> anyhow::Result<FutureProducer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .set("linger.ms", "5")
        .create()?)
}

/// A producer for bursts of up to a million queued messages whose record
/// batches hold at most `batch` messages.
pub fn burst_charge_producer(brokers: &str, batch: usize) -> anyhow::Result<FutureProducer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        // Not idempotent: tansu refuses some pipelined idempotent batches
        // (DuplicateSequenceNumber) under a 100,000-message burst. A resent
        // duplicate is just one more redelivery for the consumer to ignore.
        .set("linger.ms", "5")
        .set("batch.num.messages", batch.to_string())
        .set("queue.buffering.max.messages", "1000000")
        .set("queue.buffering.max.kbytes", "1048576")
        .create()?)
}

/// Produces every message to [`METERING`] (all queued at once, then every
/// delivery awaited) and returns each one's (partition, offset), in order.
pub async fn produce_charges(
    producer: &FutureProducer,
    msgs: &[ChargeMessage],
) -> anyhow::Result<Vec<(i32, i64)>> {
    produce_charges_to(producer, METERING, msgs).await
}

/// [`produce_charges`] to `topic` (another region's mirror of it, say).
pub async fn produce_charges_to(
    producer: &FutureProducer,
    topic: &str,
    msgs: &[ChargeMessage],
) -> anyhow::Result<Vec<(i32, i64)>> {
    let mut futures = Vec::with_capacity(msgs.len());
    for m in msgs {
        let record = FutureRecord::to(topic)
            .key(m.key.as_str())
            .payload(m.payload.as_slice())
            .headers(charge_headers(&m.event_id));
        let delivery = producer
            .send_result(record)
            .map_err(|(e, _)| anyhow!("producer refused a message: {e}"))?;
        futures.push(delivery);
    }
    let mut coords = Vec::with_capacity(futures.len());
    for delivered in futures::future::join_all(futures).await {
        let d = delivered
            .context("delivery canceled")?
            .map_err(|(e, _)| anyhow!("delivery failed: {e}"))?;
        coords.push((d.partition, d.offset));
    }
    Ok(coords)
}

/// [`produce_charges`] of events as the relay publishes them.
pub async fn produce_events(
    producer: &FutureProducer,
    events: &[ChargeEvent],
) -> anyhow::Result<Vec<(i32, i64)>> {
    let msgs: Vec<ChargeMessage> = events.iter().map(ChargeMessage::event).collect();
    produce_charges(producer, &msgs).await
}

// ------------------------------------------------------------------ the ledger

/// What the ledger holds: rows, distinct event ids, the sum of charged micros.
#[derive(diesel::QueryableByName, Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedgerTotals {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub rows: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub distinct_ids: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub charged: i64,
}

/// The ledger's totals in the database at `url` (zeros while it cannot be read,
/// e.g. before the writer has created the table).
pub async fn ledger_totals(url: &str) -> LedgerTotals {
    let zero = LedgerTotals {
        rows: 0,
        distinct_ids: 0,
        charged: 0,
    };
    let Ok(mut conn) = AsyncPgConnection::establish(url).await else {
        return zero;
    };
    diesel::sql_query(
        "SELECT count(*) AS rows, count(DISTINCT event_id) AS distinct_ids, \
         coalesce(sum(charged_micros), 0)::int8 AS charged FROM ledger_events",
    )
    .get_result(&mut conn)
    .await
    .unwrap_or(zero)
}

/// Waits until the ledger holds at least `rows` rows (or `timeout` passes);
/// returns the totals last read.
pub async fn wait_for_ledger_rows(url: &str, rows: i64, timeout: Duration) -> LedgerTotals {
    let deadline = Instant::now() + timeout;
    loop {
        let t = ledger_totals(url).await;
        if t.rows >= rows || Instant::now() >= deadline {
            return t;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One ledger row of an agent, as the end-to-end tests check it.
#[derive(Debug, Clone, diesel::QueryableByName)]
pub struct AgentCharge {
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub event_id: String,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub charged_micros: i64,
}

/// The ledger rows of `agent`, oldest first.
pub async fn agent_charges(
    conn: &mut AsyncPgConnection,
    agent: &str,
) -> anyhow::Result<Vec<AgentCharge>> {
    Ok(diesel::sql_query(
        "SELECT event_id, charged_micros FROM ledger_events WHERE agent_id = $1::uuid \
         ORDER BY occurred_at",
    )
    .bind::<diesel::sql_types::Text, _>(agent)
    .load(conn)
    .await?)
}
