//! Consumer lag and stalls, sampled every `lagIntervalMs` over every partition of
//! the consumer's topics (not only those this replica reads: a partition nobody
//! reads is exactly what must show).
//!
//! - `kafka_consumer_lag{topic,partition,group}` = the partition's high watermark
//!   minus the group's committed offset (what a restart would resume from; the low
//!   watermark when nothing is committed yet). Every replica reports the same
//!   values, so `max` over replicas is the lag and the guide's `kafka_consumer_lag >
//!   10000` alert works.
//! - A partition is *stalled* when it has lag and its committed offset has not moved
//!   for `consumer.stallSeconds`: whatever the cause (no replica holds it, its
//!   owner's writes hang, a group coordinator that keeps a dead member), the ledger
//!   has stopped following the topic. `caracal_consumer_stalled_partitions{group}`
//!   counts them (alert `CaracalConsumerStalled`) and readiness drops on every
//!   replica of the group.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use rdkafka::{consumer::Consumer, Offset, TopicPartitionList};
use tokio::{sync::watch, task::JoinHandle};

use crate::{
    health::HealthState,
    lease::TopicPartition,
    metrics::{CONSUMER_LAG, STALLED_PARTITIONS},
    runner::{KafkaConsumer, Progress},
};

/// Bound on each broker query of a sample.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// One partition in a sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionLag {
    pub topic: String,
    pub partition: i32,
    /// The group's committed offset, if any.
    pub committed: Option<i64>,
    pub high: i64,
    pub lag: i64,
}

/// One sample over every partition of `topics`.
pub fn sample(
    consumer: &KafkaConsumer,
    topics: &[String],
) -> Result<Vec<PartitionLag>, rdkafka::error::KafkaError> {
    let mut all = TopicPartitionList::new();
    for topic in topics {
        let md = consumer.fetch_metadata(Some(topic), QUERY_TIMEOUT)?;
        for t in md.topics().iter().filter(|t| t.name() == topic) {
            for p in t.partitions() {
                all.add_partition(topic, p.id());
            }
        }
    }
    if all.count() == 0 {
        return Ok(Vec::new());
    }
    let committed = consumer.committed_offsets(all, QUERY_TIMEOUT)?;
    let mut out = Vec::new();
    for e in committed.elements() {
        let (low, high) = consumer.fetch_watermarks(e.topic(), e.partition(), QUERY_TIMEOUT)?;
        let committed = match e.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        };
        let done = committed.unwrap_or(low);
        out.push(PartitionLag {
            topic: e.topic().to_owned(),
            partition: e.partition(),
            committed,
            high,
            lag: (high - done).max(0),
        });
    }
    Ok(out)
}

/// Follows each partition's committed offset between samples and says which are
/// stalled.
#[derive(Debug, Default)]
pub struct StallWatch {
    /// Per partition: the committed offset last seen and since when it has stood
    /// with lag behind it.
    seen: BTreeMap<TopicPartition, (Option<i64>, Instant, bool)>,
}

impl StallWatch {
    /// Takes a sample made at `now`; returns the stalled partitions (`topic/p`).
    pub fn observe(
        &mut self,
        sample: &[PartitionLag],
        now: Instant,
        after: Duration,
    ) -> Vec<String> {
        let mut stalled = Vec::new();
        let mut seen = BTreeMap::new();
        for s in sample {
            let key = (s.topic.clone(), s.partition);
            // The clock runs from the first sample that saw lag at this committed
            // offset: an idle partition (no lag for hours) that gets a message is
            // not stalled at once.
            let since = match self.seen.get(&key) {
                Some((committed, since, true)) if *committed == s.committed => *since,
                _ => now,
            };
            if s.lag > 0 && now.duration_since(since) >= after {
                stalled.push(format!("{}/{}", s.topic, s.partition));
            }
            seen.insert(key, (s.committed, since, s.lag > 0));
        }
        self.seen = seen;
        stalled
    }
}

/// What the sampler needs.
pub struct Sampler {
    pub consumer: Arc<KafkaConsumer>,
    pub group: String,
    pub topics: Vec<String>,
    pub every: Duration,
    pub stall_after: Duration,
    pub progress: Arc<Progress>,
    pub health: Arc<HealthState>,
}

/// Samples every `every` until `shutdown`.
pub fn spawn_sampler(s: Sampler, mut shutdown: watch::Receiver<bool>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut watch = StallWatch::default();
        loop {
            tokio::select! {
                () = tokio::time::sleep(s.every) => {}
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        break;
                    }
                }
            }
            let (c, topics) = (s.consumer.clone(), s.topics.clone());
            let sampled = match tokio::task::spawn_blocking(move || sample(&c, &topics)).await {
                Ok(Ok(sampled)) => sampled,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "consumer lag sample failed");
                    continue;
                }
                Err(_) => continue,
            };
            let stalled = watch.observe(&sampled, Instant::now(), s.stall_after);
            if !stalled.is_empty() {
                tracing::warn!(group = %s.group, ?stalled, stall_after = ?s.stall_after,
                    "partitions with lag and no commit: the consumer is not keeping up");
            }
            // Precision loss only above 2^53.
            #[allow(clippy::cast_precision_loss)]
            metrics::gauge!(STALLED_PARTITIONS, "group" => s.group.clone())
                .set(stalled.len() as f64);
            s.health.set_stalled(stalled);
            for p in sampled {
                s.progress
                    .sampled(&(p.topic.clone(), p.partition), p.committed, p.high);
                #[allow(clippy::cast_precision_loss)]
                metrics::gauge!(CONSUMER_LAG, "topic" => p.topic, "partition" => p.partition.to_string(), "group" => s.group.clone()).set(p.lag as f64);
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lag(p: i32, committed: Option<i64>, high: i64) -> PartitionLag {
        let done = committed.unwrap_or(0);
        PartitionLag {
            topic: "t".to_owned(),
            partition: p,
            committed,
            high,
            lag: high - done,
        }
    }

    #[test]
    fn a_partition_with_lag_and_no_commit_for_the_window_is_stalled() {
        let mut w = StallWatch::default();
        let t0 = Instant::now();
        let after = Duration::from_secs(10);
        assert!(w
            .observe(&[lag(0, Some(5), 9), lag(1, None, 0)], t0, after)
            .is_empty());
        // 11 s later: partition 0 has not moved and has lag; 1 has none.
        let t1 = t0 + Duration::from_secs(11);
        assert_eq!(
            w.observe(&[lag(0, Some(5), 12), lag(1, None, 0)], t1, after),
            vec!["t/0".to_owned()]
        );
        // It moves: no longer stalled, and the clock starts again.
        let t2 = t1 + Duration::from_secs(1);
        assert!(w.observe(&[lag(0, Some(6), 12)], t2, after).is_empty());
        let t3 = t2 + Duration::from_secs(9);
        assert!(w.observe(&[lag(0, Some(6), 12)], t3, after).is_empty());
        let t4 = t2 + Duration::from_secs(10);
        assert_eq!(w.observe(&[lag(0, Some(6), 12)], t4, after).len(), 1);
        // Caught up: no lag, not stalled however long it stands.
        let t5 = t4 + Duration::from_secs(60);
        assert!(w.observe(&[lag(0, Some(12), 12)], t5, after).is_empty());
        // Idle for an hour with nothing to read, then a message arrives: the clock
        // starts now, not an hour ago.
        let t6 = t5 + Duration::from_secs(3600);
        assert!(w.observe(&[lag(0, Some(12), 12)], t6, after).is_empty());
        let t7 = t6 + Duration::from_secs(1);
        assert!(w.observe(&[lag(0, Some(12), 13)], t7, after).is_empty());
        let t8 = t7 + Duration::from_secs(9);
        assert!(w.observe(&[lag(0, Some(12), 13)], t8, after).is_empty());
        let t9 = t7 + Duration::from_secs(10);
        assert_eq!(w.observe(&[lag(0, Some(12), 13)], t9, after).len(), 1);
        // Nothing ever committed while messages wait: stalled too.
        let mut w = StallWatch::default();
        w.observe(&[lag(2, None, 3)], t0, after);
        assert_eq!(
            w.observe(&[lag(2, None, 3)], t1, after),
            vec!["t/2".to_owned()]
        );
    }
}
