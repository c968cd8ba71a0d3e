//! Consumer lag per partition: `kafka_consumer_lag{topic,partition,group}` = the
//! partition's high watermark minus the group's committed offset (what a restart
//! would resume from; the low watermark when nothing is committed yet). Sampled
//! every `lagIntervalMs` for the partitions this replica owns; a partition it no
//! longer owns drops to 0 here (its new owner reports it), so `max` over replicas
//! is the lag and the guide's `kafka_consumer_lag > 10000` alert works.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use rdkafka::{consumer::Consumer, Offset};
use tokio::{sync::watch, task::JoinHandle};

use crate::{metrics::CONSUMER_LAG, runner::KafkaConsumer};

/// Bound on each broker query of a sample.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// One sample: (topic, partition, lag) for the partitions assigned now.
pub fn sample(
    consumer: &KafkaConsumer,
) -> Result<Vec<(String, i32, i64)>, rdkafka::error::KafkaError> {
    let assignment = consumer.assignment()?;
    if assignment.count() == 0 {
        return Ok(Vec::new());
    }
    let committed = consumer.committed_offsets(assignment, QUERY_TIMEOUT)?;
    let mut out = Vec::new();
    for e in committed.elements() {
        let (low, high) = consumer.fetch_watermarks(e.topic(), e.partition(), QUERY_TIMEOUT)?;
        let done = match e.offset() {
            Offset::Offset(o) => o,
            _ => low,
        };
        out.push((e.topic().to_owned(), e.partition(), (high - done).max(0)));
    }
    Ok(out)
}

/// Samples every `every` until `shutdown`.
pub fn spawn_sampler(
    consumer: Arc<KafkaConsumer>,
    group: String,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut reported: BTreeSet<(String, i32)> = BTreeSet::new();
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        break;
                    }
                }
            }
            let c = consumer.clone();
            let sampled = match tokio::task::spawn_blocking(move || sample(&c)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "consumer lag sample failed");
                    continue;
                }
                Err(_) => continue,
            };
            let now: BTreeSet<(String, i32)> =
                sampled.iter().map(|(t, p, _)| (t.clone(), *p)).collect();
            for (topic, partition) in reported.difference(&now) {
                metrics::gauge!(CONSUMER_LAG, "topic" => topic.clone(), "partition" => partition.to_string(), "group" => group.clone()).set(0.0);
            }
            for (topic, partition, lag) in sampled {
                // Precision loss only above 2^53 messages.
                #[allow(clippy::cast_precision_loss)]
                metrics::gauge!(CONSUMER_LAG, "topic" => topic, "partition" => partition.to_string(), "group" => group.clone()).set(lag as f64);
            }
            reported = now;
        }
    })
}
