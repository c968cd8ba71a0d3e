//! Reading the messages of a topic whose timestamps fall in `[from, to)`, up to the
//! end each partition had when the read began: what `caracal replay` re-feeds into
//! the ledger and what `caracal budget rebuild` reads of the decisions topic.
//!
//! Where to start is asked of the brokers (`offsetsForTimes`), and the messages'
//! own timestamps bound the range as well: some brokers (tansu) answer offset 0
//! when no message reaches the time, where Kafka answers the end, and a batch's
//! base offset may precede `from`. An end at or before the start is no bound.

use std::{collections::HashMap, time::Duration};

use chrono::{DateTime, Utc};
use rdkafka::{
    consumer::{Consumer, StreamConsumer},
    message::OwnedMessage,
    Message, Offset, TopicPartitionList,
};

use crate::kafka::{consumer_config, KafkaConfig};

#[derive(Debug, thiserror::Error)]
pub enum RangeError {
    #[error("kafka: {0}")]
    Kafka(String),
    /// The range cannot be read as asked (no such topic, or its start deleted).
    #[error("{0}")]
    Range(String),
}

fn kafka_err(e: rdkafka::error::KafkaError) -> RangeError {
    RangeError::Kafka(e.to_string())
}

/// A consumer of its own group (it commits nothing), the topic's partitions and
/// their (low, high) watermarks.
type Connected = (StreamConsumer, Vec<i32>, HashMap<i32, (i64, i64)>);

fn connect(kafka: &KafkaConfig, topic: &str, timeout: Duration) -> Result<Connected, RangeError> {
    let group = format!("caracal-range-{}", uuid::Uuid::new_v4().simple());
    let consumer: StreamConsumer = consumer_config(kafka, &group).create().map_err(kafka_err)?;
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(kafka_err)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(RangeError::Range(format!(
            "topic {topic} does not exist on {}",
            kafka.brokers
        )));
    }
    let mut marks = HashMap::new();
    for &p in &partitions {
        marks.insert(
            p,
            consumer
                .fetch_watermarks(topic, p, timeout)
                .map_err(kafka_err)?,
        );
    }
    Ok((consumer, partitions, marks))
}

/// One partition's offsets for the range.
#[derive(Debug, Clone, Copy)]
struct Span {
    end: i64,
    start: i64,
    /// The start is where the topic begins now and something was deleted before
    /// it: with `refuse_deleted_start`, a first message after `from` is an error
    /// (retention took the rest).
    at_log_start: bool,
}

/// The messages of a time range, one at a time ([`TopicRange::next`]).
pub struct TopicRange {
    consumer: StreamConsumer,
    topic: String,
    from_ms: i64,
    to_ms: Option<i64>,
    timeout: Duration,
    refuse_deleted_start: bool,
    pending: HashMap<i32, Span>,
    /// Messages in the offset spans (a bound: the timestamps may exclude some).
    pub messages: u64,
    pub partitions: usize,
}

impl TopicRange {
    /// Plans the read of `topic` on the brokers of `kafka`. `timeout` bounds each
    /// wait for the brokers (metadata, offsets, the next message).
    pub fn open(
        kafka: &KafkaConfig,
        topic: &str,
        from: DateTime<Utc>,
        to: Option<DateTime<Utc>>,
        timeout: Duration,
        refuse_deleted_start: bool,
    ) -> Result<Self, RangeError> {
        let (consumer, partitions, marks) = connect(kafka, topic, timeout)?;
        let at = |t: DateTime<Utc>| -> Result<HashMap<i32, Offset>, RangeError> {
            let mut tpl = TopicPartitionList::new();
            for &p in &partitions {
                tpl.add_partition_offset(topic, p, Offset::Offset(t.timestamp_millis()))
                    .map_err(kafka_err)?;
            }
            let found = consumer
                .offsets_for_times(tpl, timeout)
                .map_err(kafka_err)?;
            Ok(found
                .elements()
                .iter()
                .map(|e| (e.partition(), e.offset()))
                .collect())
        };
        let starts = at(from)?;
        let ends = match to {
            Some(to) => Some(at(to)?),
            None => None,
        };
        let mut spans = HashMap::new();
        for &p in &partitions {
            let (low, high) = marks.get(&p).copied().unwrap_or((0, 0));
            let start = match starts.get(&p) {
                Some(Offset::Offset(o)) => *o,
                Some(Offset::End) | None => high,
                Some(other) => {
                    return Err(RangeError::Kafka(format!(
                        "the brokers answered {other:?} for {topic}/{p} at {}",
                        from.to_rfc3339()
                    )))
                }
            };
            let end = match ends.as_ref().and_then(|e| e.get(&p)) {
                Some(Offset::Offset(o)) if *o > start => (*o).min(high),
                _ => high,
            };
            spans.insert(
                p,
                Span {
                    start: start.max(low),
                    end,
                    at_log_start: start <= low && low > 0,
                },
            );
        }
        Self::assign(
            consumer,
            topic,
            partitions.len(),
            spans,
            (from.timestamp_millis(), to.map(|t| t.timestamp_millis())),
            timeout,
            refuse_deleted_start,
        )
    }

    /// Plans the read of `topic` from `starts` (partition -> first offset; a
    /// partition not named is read from its beginning) to each partition's end
    /// now: what follows a snapshot's cut. A start the topic's retention deleted
    /// already is an error (the events between are gone), never a silent skip.
    pub fn open_at_offsets(
        kafka: &KafkaConfig,
        topic: &str,
        starts: &HashMap<i32, i64>,
        timeout: Duration,
    ) -> Result<Self, RangeError> {
        let (consumer, partitions, marks) = connect(kafka, topic, timeout)?;
        if let Some(p) = starts.keys().find(|p| !partitions.contains(p)) {
            return Err(RangeError::Range(format!(
                "partition {p} of {topic} does not exist on {} (it has {} partitions)",
                kafka.brokers,
                partitions.len()
            )));
        }
        let mut spans = HashMap::new();
        for &p in &partitions {
            let (low, high) = marks.get(&p).copied().unwrap_or((0, 0));
            let start = starts.get(&p).copied().unwrap_or(0);
            if start < low {
                return Err(RangeError::Range(format!(
                    "partition {p} of {topic} now begins at offset {low}: the events from \
                     offset {start} on were deleted by the topic's retention"
                )));
            }
            spans.insert(
                p,
                Span {
                    start,
                    end: high,
                    at_log_start: false,
                },
            );
        }
        Self::assign(
            consumer,
            topic,
            partitions.len(),
            spans,
            (i64::MIN, None),
            timeout,
            false,
        )
    }

    fn assign(
        consumer: StreamConsumer,
        topic: &str,
        partitions: usize,
        spans: HashMap<i32, Span>,
        (from_ms, to_ms): (i64, Option<i64>),
        timeout: Duration,
        refuse_deleted_start: bool,
    ) -> Result<Self, RangeError> {
        let mut assign = TopicPartitionList::new();
        let mut pending = HashMap::new();
        let mut messages = 0u64;
        for (p, span) in spans {
            if span.start < span.end {
                assign
                    .add_partition_offset(topic, p, Offset::Offset(span.start))
                    .map_err(kafka_err)?;
                messages += u64::try_from(span.end - span.start).unwrap_or(0);
                pending.insert(p, span);
            }
        }
        if !pending.is_empty() {
            consumer.assign(&assign).map_err(kafka_err)?;
        }
        Ok(Self {
            consumer,
            topic: topic.to_owned(),
            from_ms,
            to_ms,
            timeout,
            refuse_deleted_start,
            partitions,
            pending,
            messages,
        })
    }

    /// The next message of the range (in no order across partitions); `None`
    /// once every partition is read to its end.
    pub async fn next(&mut self) -> Result<Option<OwnedMessage>, RangeError> {
        while !self.pending.is_empty() {
            let msg = match tokio::time::timeout(self.timeout, self.consumer.recv()).await {
                Err(_) => {
                    return Err(RangeError::Kafka(format!(
                        "no message from {} in {:?} ({} partitions not read to the end of \
                         the range)",
                        self.topic,
                        self.timeout,
                        self.pending.len()
                    )))
                }
                Ok(Err(e)) => return Err(RangeError::Kafka(e.to_string())),
                Ok(Ok(m)) => m.detach(),
            };
            let p = msg.partition();
            let Some(span) = self.pending.get_mut(&p) else {
                continue;
            };
            if msg.offset() >= span.end {
                self.pending.remove(&p);
                continue;
            }
            let ts = msg.timestamp().to_millis();
            if span.at_log_start {
                span.at_log_start = false;
                if let Some(ts) = ts.filter(|ts| self.refuse_deleted_start && *ts > self.from_ms) {
                    return Err(RangeError::Range(format!(
                        "partition {p} of {} now begins at offset {} ({}): the events between \
                         {} and then were deleted by the topic's retention",
                        self.topic,
                        span.start,
                        DateTime::<Utc>::from_timestamp_millis(ts)
                            .map(|t| t.to_rfc3339())
                            .unwrap_or_default(),
                        DateTime::<Utc>::from_timestamp_millis(self.from_ms)
                            .map(|t| t.to_rfc3339())
                            .unwrap_or_default()
                    )));
                }
            }
            if msg.offset() + 1 >= span.end {
                self.pending.remove(&p);
            }
            let in_range = self.from_ms == i64::MIN
                || ts.is_none_or(|ts| ts >= self.from_ms && self.to_ms.is_none_or(|to| ts < to));
            if in_range {
                return Ok(Some(msg));
            }
        }
        Ok(None)
    }
}
