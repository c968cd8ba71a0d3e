//! Replay: the metering events of a time range read again from Kafka and written
//! into the ledger the way the ledger-writer writes them (`ledger::decode` +
//! `ledger::insert_rows`, which queues each new row for the Merkle log), so
//! replaying twice changes nothing. `caracal replay start|status|validate` runs it
//! (cli/src/replay.rs), with the ledger-writer's database credentials.
//!
//! Where to start is asked of the brokers (`offsetsForTimes`): the first offset of
//! each partition whose message is at or after `from`. A range with no message at
//! all, or whose start the topic's retention already deleted, is an error, never a
//! silent replay from offset 0 or from wherever the topic now begins. The end is
//! the first offset at or after `to`, or the end of each partition when the
//! replay starts (what arrives meanwhile is the running writer's).
//!
//! `--from-region R` reads `R.<topic>`: the topic as MirrorMaker 2 names its copy
//! of another region's topic, on whichever cluster `brokers` names.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use caracal_service_kit::kafka::{consumer_config, KafkaConfig};
use chrono::{DateTime, Utc};
use diesel::sql_types::{Array, BigInt, Text, Timestamptz};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use rdkafka::{
    consumer::{Consumer, StreamConsumer},
    Offset, TopicPartitionList,
};

use crate::{
    ledger::{decode, insert_rows, LedgerRow},
    runner::RawMessage,
};

/// Messages written per statement.
const BATCH: usize = 2_000;

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("kafka: {0}")]
    Kafka(String),
    #[error("database: {0}")]
    Db(#[from] diesel::result::Error),
    /// The range cannot be replayed as asked (nothing there, or partly deleted).
    #[error("{0}")]
    Range(String),
}

/// What to read: `[from, to)` of `topic` on the brokers of `kafka`.
#[derive(Debug, Clone)]
pub struct Source {
    pub kafka: KafkaConfig,
    pub topic: String,
    pub from: DateTime<Utc>,
    pub to: Option<DateTime<Utc>>,
    /// Longest wait for the brokers (metadata, offsets, the next message).
    pub timeout: Duration,
}

/// The metering topic of `region` (MirrorMaker 2's name for a mirrored topic), or
/// the deployment's own without one.
pub fn topic_of(metering_topic: &str, region: Option<&str>) -> String {
    match region.map(str::trim).filter(|r| !r.is_empty()) {
        Some(r) => format!("{r}.{metering_topic}"),
        None => metering_topic.to_owned(),
    }
}

/// How far a replay (or a validation) got.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    pub partitions: usize,
    /// Messages in the range read so far.
    pub read: u64,
    /// Rows the ledger did not have (replay), or does not have (validate).
    pub new_rows: u64,
    /// Messages that are not charge events the ledger takes (skipped, counted: the
    /// running writer sent them to the dead-letter topic already).
    pub poison: u64,
    /// Messages the range holds in all.
    pub total: u64,
}

/// One partition's part of the range.
#[derive(Debug, Clone, Copy)]
struct Span {
    partition: i32,
    start: i64,
    end: i64,
    /// The start is where the topic begins now and something was deleted before
    /// it: the first message must not be after `from` (retention took the rest).
    at_log_start: bool,
}

/// What a read of the range does with each batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Writes what the ledger lacks.
    Replay,
    /// Counts what the ledger lacks.
    Validate,
}

/// Reads the range and writes what the ledger lacks; `on_batch` hears the progress
/// after every statement.
pub async fn replay_ledger(
    conn: &mut AsyncPgConnection,
    source: &Source,
    mut on_batch: impl FnMut(&Progress),
) -> Result<Progress, ReplayError> {
    read_range(conn, source, Mode::Replay, &mut on_batch).await
}

/// Reads the range and counts the events the ledger does not hold.
pub async fn validate_ledger(
    conn: &mut AsyncPgConnection,
    source: &Source,
) -> Result<Progress, ReplayError> {
    read_range(conn, source, Mode::Validate, &mut |_| {}).await
}

async fn write(
    conn: &mut AsyncPgConnection,
    mode: Mode,
    rows: &[LedgerRow],
) -> Result<u64, ReplayError> {
    match mode {
        Mode::Replay => Ok(insert_rows(conn, rows).await? as u64),
        Mode::Validate => missing(conn, rows).await,
    }
}

/// Events of `rows` the ledger does not hold.
async fn missing(conn: &mut AsyncPgConnection, rows: &[LedgerRow]) -> Result<u64, ReplayError> {
    #[derive(diesel::QueryableByName)]
    struct N {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let n: N = diesel::sql_query(
        "SELECT count(*) AS n FROM unnest($1::timestamptz[], $2::text[]) AS w(occurred_at, event_id) \
         WHERE NOT EXISTS (SELECT 1 FROM ledger_events e \
                           WHERE e.occurred_at = w.occurred_at AND e.event_id = w.event_id)",
    )
    .bind::<Array<Timestamptz>, _>(rows.iter().map(|r| r.occurred_at).collect::<Vec<_>>())
    .bind::<Array<Text>, _>(rows.iter().map(|r| r.event_id.as_str()).collect::<Vec<_>>())
    .get_result(conn)
    .await?;
    Ok(u64::try_from(n.n).unwrap_or(0))
}

async fn read_range(
    conn: &mut AsyncPgConnection,
    source: &Source,
    mode: Mode,
    on_batch: &mut impl FnMut(&Progress),
) -> Result<Progress, ReplayError> {
    let mut progress = Progress::default();
    let group = format!("caracal-replay-{}", uuid::Uuid::new_v4().simple());
    let consumer: StreamConsumer = consumer_config(&source.kafka, &group)
        .create()
        .map_err(|e| ReplayError::Kafka(e.to_string()))?;
    let spans = plan(&consumer, source)?;
    progress.partitions = spans.len();
    progress.total = spans
        .iter()
        .map(|s| u64::try_from(s.end - s.start).unwrap_or(0))
        .sum();
    let mut assign = TopicPartitionList::new();
    let mut pending: HashMap<i32, Span> = HashMap::new();
    for s in spans.iter().filter(|s| s.start < s.end) {
        assign
            .add_partition_offset(&source.topic, s.partition, Offset::Offset(s.start))
            .map_err(|e| ReplayError::Kafka(e.to_string()))?;
        pending.insert(s.partition, *s);
    }
    if pending.is_empty() {
        return Ok(progress);
    }
    consumer
        .assign(&assign)
        .map_err(|e| ReplayError::Kafka(e.to_string()))?;
    let from_ms = source.from.timestamp_millis();
    let to_ms = source.to.map(|t| t.timestamp_millis());
    let mut checked_start: HashSet<i32> = HashSet::new();
    let mut batch: Vec<LedgerRow> = Vec::with_capacity(BATCH);
    while !pending.is_empty() {
        let msg = match tokio::time::timeout(source.timeout, consumer.recv()).await {
            Err(_) => {
                return Err(ReplayError::Kafka(format!(
                    "no message from {} in {:?} ({} partitions not read to the end of the range)",
                    source.topic,
                    source.timeout,
                    pending.len()
                )))
            }
            Ok(Err(e)) => return Err(ReplayError::Kafka(e.to_string())),
            Ok(Ok(m)) => RawMessage::from_borrowed(&m),
        };
        let Some(span) = pending.get(&msg.partition).copied() else {
            continue;
        };
        if msg.offset >= span.end {
            pending.remove(&msg.partition);
            continue;
        }
        if span.at_log_start && checked_start.insert(msg.partition) {
            if let Some(ts) = msg.timestamp_ms.filter(|ts| *ts > from_ms) {
                return Err(ReplayError::Range(format!(
                    "partition {} of {} now begins at offset {} ({}): the events between {} and \
                     then were deleted by the topic's retention and cannot be replayed",
                    msg.partition,
                    source.topic,
                    span.start,
                    DateTime::<Utc>::from_timestamp_millis(ts)
                        .map(|t| t.to_rfc3339())
                        .unwrap_or_default(),
                    source.from.to_rfc3339()
                )));
            }
        }
        if msg.offset + 1 >= span.end {
            pending.remove(&msg.partition);
        }
        // A batch's base offset can precede `from`, and `to` bounds by time too.
        let in_range = msg
            .timestamp_ms
            .is_none_or(|ts| ts >= from_ms && to_ms.is_none_or(|to| ts < to));
        if !in_range {
            continue;
        }
        progress.read += 1;
        match decode(&msg) {
            Ok(row) => batch.push(row),
            Err(_) => progress.poison += 1,
        }
        if batch.len() >= BATCH {
            progress.new_rows += write(conn, mode, &batch).await?;
            batch.clear();
            on_batch(&progress);
        }
    }
    if !batch.is_empty() {
        progress.new_rows += write(conn, mode, &batch).await?;
        on_batch(&progress);
    }
    if progress.read == 0 {
        return Err(nothing_in_range(source));
    }
    Ok(progress)
}

/// Each partition's offsets for the range.
fn plan(consumer: &StreamConsumer, source: &Source) -> Result<Vec<Span>, ReplayError> {
    let topic = source.topic.as_str();
    let kafka = |e: rdkafka::error::KafkaError| ReplayError::Kafka(e.to_string());
    let metadata = consumer
        .fetch_metadata(Some(topic), source.timeout)
        .map_err(kafka)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(ReplayError::Range(format!(
            "topic {topic} does not exist on {}",
            source.kafka.brokers
        )));
    }
    let mut marks = HashMap::new();
    for &p in &partitions {
        marks.insert(
            p,
            consumer
                .fetch_watermarks(topic, p, source.timeout)
                .map_err(kafka)?,
        );
    }
    let at = |t: DateTime<Utc>| -> Result<HashMap<i32, Offset>, ReplayError> {
        let mut tpl = TopicPartitionList::new();
        for &p in &partitions {
            tpl.add_partition_offset(topic, p, Offset::Offset(t.timestamp_millis()))
                .map_err(kafka)?;
        }
        let found = consumer
            .offsets_for_times(tpl, source.timeout)
            .map_err(kafka)?;
        Ok(found
            .elements()
            .iter()
            .map(|e| (e.partition(), e.offset()))
            .collect())
    };
    let starts = at(source.from)?;
    let ends = match source.to {
        Some(to) => Some(at(to)?),
        None => None,
    };
    let mut spans = Vec::with_capacity(partitions.len());
    for &p in &partitions {
        let (low, high) = marks.get(&p).copied().unwrap_or((0, 0));
        let start = match starts.get(&p) {
            Some(Offset::Offset(o)) => *o,
            Some(Offset::End) | None => high,
            Some(other) => {
                return Err(ReplayError::Kafka(format!(
                    "the brokers answered {other:?} for {topic}/{p} at {}",
                    source.from.to_rfc3339()
                )))
            }
        };
        // An end at or before the start is no bound: some brokers (tansu) answer
        // offset 0 when no message reaches the time, where Kafka answers the end.
        // The messages' own timestamps bound the range in any case.
        let end = match ends.as_ref().and_then(|e| e.get(&p)) {
            Some(Offset::Offset(o)) if *o > start => (*o).min(high),
            _ => high,
        };
        spans.push(Span {
            partition: p,
            start: start.max(low),
            end,
            at_log_start: start <= low && low > 0,
        });
    }
    tracing::debug!(?spans, "replay plan");
    if spans.iter().all(|s| s.start >= s.end) {
        return Err(nothing_in_range(source));
    }
    Ok(spans)
}

/// The range holds no event: an error, never a replay of something else.
fn nothing_in_range(source: &Source) -> ReplayError {
    ReplayError::Range(format!(
        "no event of {} at or after {}{}: nothing to replay (a time after the last event, or \
         one the topic no longer holds)",
        source.topic,
        source.from.to_rfc3339(),
        source
            .to
            .map(|t| format!(" and before {}", t.to_rfc3339()))
            .unwrap_or_default()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_region_reads_the_mirrored_topic() {
        assert_eq!(
            topic_of("caracal.metering.events", Some("us-east-1")),
            "us-east-1.caracal.metering.events"
        );
        assert_eq!(
            topic_of("caracal.metering.events", Some(" ")),
            "caracal.metering.events"
        );
        assert_eq!(
            topic_of("caracal.metering.events", None),
            "caracal.metering.events"
        );
    }
}
