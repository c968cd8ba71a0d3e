//! Metric names of the consumers (the guide's alert rules read them).

/// Events written (or recognised as already written), labelled `consumer`.
pub const EVENTS_PROCESSED: &str = "caracal_consumer_events_processed_total";
/// Seconds from a batch's first message in hand to its offsets committed.
pub const PROCESSING_SECONDS: &str = "caracal_consumer_processing_seconds";
/// Failures, labelled `consumer` and `kind`: `db`, `kafka`, `commit`, `dlq`, `poison`.
pub const ERRORS: &str = "caracal_consumer_errors_total";
/// Messages sent to the dead-letter topic, labelled `consumer`.
pub const DLQ_MESSAGES: &str = "caracal_dlq_messages_total";
/// High watermark minus committed offset, labelled `topic`, `partition`, `group`.
pub const CONSUMER_LAG: &str = "kafka_consumer_lag";
/// Partitions with lag whose committed offset has not moved for
/// `consumer.stallSeconds`, labelled `group` (alert `CaracalConsumerStalled`).
pub const STALLED_PARTITIONS: &str = "caracal_consumer_stalled_partitions";
/// Partitions whose lease this replica holds, labelled `group`.
pub const PARTITIONS_OWNED: &str = "caracal_consumer_partitions_owned";
/// Live replicas of the group holding a lease session, labelled `group`.
pub const LEASE_MEMBERS: &str = "caracal_consumer_lease_members";
/// Lease sessions lost or not opened, labelled `group`.
pub const LEASE_ERRORS: &str = "caracal_consumer_lease_errors_total";
/// Batches written (the size histogram's count), labelled `consumer`.
pub const BATCH_SIZE: &str = "caracal_consumer_batch_size";

/// Spend of the current UTC day across agents, micro-units, labelled `currency`
/// (metrics-aggregator).
pub const SPEND_TOTAL: &str = "caracal_spend_total_micros";
/// Spend per second over the last complete minute or hour of `occurred_at`,
/// labelled `currency`, `window` (`1m`, `1h`).
pub const SPEND_RATE: &str = "caracal_spend_rate_micros_per_second";
/// Today's spend of the top agents (`aggregator.topAgents`), labelled `agent_id`, `currency`.
pub const AGENT_SPEND_TODAY: &str = "caracal_agent_spend_today_micros";
/// Spending anomalies reported, labelled `currency`.
pub const ANOMALIES: &str = "caracal_spending_anomalies_detected_total";

/// Every `kind` of [`ERRORS`].
pub const ERROR_KINDS: [&str; 5] = ["db", "kafka", "commit", "dlq", "poison"];

/// Registers `consumer`'s failure counters ([`ERRORS`] of every kind,
/// [`DLQ_MESSAGES`]) at 0, so they are scraped before the first failure (alerts
/// and dashboards read them with `increase`/`rate`, which need a series to start).
pub fn zero_failures(consumer: &'static str) {
    for kind in ERROR_KINDS {
        metrics::counter!(ERRORS, "consumer" => consumer, "kind" => kind).increment(0);
    }
    metrics::counter!(DLQ_MESSAGES, "consumer" => consumer).increment(0);
}

/// Installs the recorder and describes the metrics.
pub fn init() {
    static DESCRIBED: std::sync::Once = std::sync::Once::new();
    if caracal_service_kit::metrics::init() {
        DESCRIBED.call_once(|| {
            metrics::describe_counter!(EVENTS_PROCESSED, "Events processed, by consumer");
            metrics::describe_histogram!(
                PROCESSING_SECONDS,
                metrics::Unit::Seconds,
                "Seconds from a batch in hand to its offsets committed"
            );
            metrics::describe_counter!(ERRORS, "Consumer failures, by consumer and kind");
            metrics::describe_counter!(DLQ_MESSAGES, "Messages sent to the dead-letter topic");
            metrics::describe_gauge!(
                CONSUMER_LAG,
                "Messages not yet committed: high watermark - committed offset"
            );
            metrics::describe_histogram!(BATCH_SIZE, "Messages per processed batch");
            metrics::describe_gauge!(
                STALLED_PARTITIONS,
                "Partitions with lag and no commit for consumer.stallSeconds"
            );
            metrics::describe_gauge!(PARTITIONS_OWNED, "Partition leases held by this replica");
            metrics::describe_gauge!(
                LEASE_MEMBERS,
                "Replicas of the group holding a lease session"
            );
            metrics::describe_counter!(LEASE_ERRORS, "Partition lease sessions lost or not opened");
            metrics::describe_gauge!(SPEND_TOTAL, "Spend of the current UTC day, micro-units");
            metrics::describe_gauge!(
                SPEND_RATE,
                "Spend per second over the last minute or hour, micro-units"
            );
            metrics::describe_gauge!(
                AGENT_SPEND_TODAY,
                "Spend of the current UTC day of the top agents, micro-units"
            );
            metrics::describe_counter!(
                ANOMALIES,
                "Spending anomalies reported (last 24 h > 2x the 7-day daily average)"
            );
        });
    }
}
