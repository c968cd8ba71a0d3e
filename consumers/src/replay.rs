//! Replay: the metering events of a time range read again from Kafka and written
//! into the ledger the way the ledger-writer writes them (`ledger::decode` +
//! `ledger::insert_rows`, which queues each new row for the Merkle log), so
//! replaying twice changes nothing. `caracal replay start|status|validate` runs it
//! (cli/src/replay.rs), with the ledger-writer's database credentials.
//!
//! The range is read with [`caracal_service_kit::topic_range`]: from the first
//! offset at or after `from`, to the first at or after `to` or to each
//! partition's end when the replay starts (what arrives meanwhile is the running
//! writer's). A range with no message at all, or whose start the topic's retention
//! already deleted, is an error, never a silent replay from offset 0 or from
//! wherever the topic now begins.
//!
//! `--from-snapshot ID` reads from the snapshot's cut: per partition, the first
//! offset whose row the snapshot did not hold, to the end.
//!
//! `--from-region R` reads `R.<topic>`: the topic as MirrorMaker 2 names its copy
//! of another region's topic, on whichever cluster `brokers` names.

use std::{collections::HashMap, time::Duration};

use caracal_service_kit::{
    kafka::KafkaConfig,
    topic_range::{RangeError, TopicRange},
};
use chrono::{DateTime, Utc};
use diesel::sql_types::{Array, BigInt, Text, Timestamptz};
use diesel_async::{AsyncPgConnection, RunQueryDsl};

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

impl From<RangeError> for ReplayError {
    fn from(e: RangeError) -> Self {
        match e {
            RangeError::Kafka(e) => ReplayError::Kafka(e),
            RangeError::Range(e) => ReplayError::Range(e),
        }
    }
}

/// What to read: `[from, to)` of `topic` on the brokers of `kafka`, or with
/// `after_cut` everything from those offsets on (a snapshot's cut: partition ->
/// first offset not in the snapshot; `from` is then the snapshot's time, for the
/// record only).
#[derive(Debug, Clone)]
pub struct Source {
    pub kafka: KafkaConfig,
    pub topic: String,
    pub from: DateTime<Utc>,
    pub to: Option<DateTime<Utc>>,
    pub after_cut: Option<HashMap<i32, i64>>,
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
    let mut range = match &source.after_cut {
        Some(starts) => {
            TopicRange::open_at_offsets(&source.kafka, &source.topic, starts, source.timeout)?
        }
        None => TopicRange::open(
            &source.kafka,
            &source.topic,
            source.from,
            source.to,
            source.timeout,
            true,
        )?,
    };
    let mut progress = Progress {
        partitions: range.partitions,
        total: range.messages,
        ..Progress::default()
    };
    let mut batch: Vec<LedgerRow> = Vec::with_capacity(BATCH);
    while let Some(msg) = range.next().await? {
        progress.read += 1;
        match decode(&RawMessage::from_message(&msg)) {
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
    // After a snapshot's cut nothing may have come yet; a time range that holds
    // nothing was asked wrongly.
    if progress.read == 0 && source.after_cut.is_none() {
        return Err(nothing_in_range(source));
    }
    Ok(progress)
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
