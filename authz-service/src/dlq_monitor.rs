//! The DLQ monitor: reads the dead-letter topic every `dlq.monitorInterval` seconds
//! (and right after every replay) and sets the gauges the guide's alerts read:
//!
//! - `caracal_dlq_size{topic}`: pending dead letters (in the topic, not replayed),
//!   so `caracal_dlq_size > 1000` fires on a DLQ that nobody works off;
//! - `caracal_dlq_oldest_message_age_seconds{topic}`: how long the oldest pending
//!   one has waited (0 when none).
//!
//! A read that fails (broker or database down) leaves the gauges as they were and
//! counts `caracal_dlq_monitor_errors_total`; the next tick tries again. Every
//! replica that runs it reports the same values (they read the same topic).

use std::{sync::Arc, time::Duration};

use caracal_service_kit::{
    dlq_admin::{DlqAdmin, Summary},
    process::LogLimit,
};
use tokio::sync::{watch, Notify};

/// Pending dead letters (in the topic, not replayed), labelled `topic`.
pub const DLQ_SIZE: &str = "caracal_dlq_size";
/// Age of the oldest pending dead letter, seconds (0 when none), labelled `topic`.
pub const DLQ_OLDEST_AGE: &str = "caracal_dlq_oldest_message_age_seconds";
/// Reads of the DLQ that failed.
pub const DLQ_MONITOR_ERRORS: &str = "caracal_dlq_monitor_errors_total";

fn describe() {
    static DESCRIBED: std::sync::Once = std::sync::Once::new();
    DESCRIBED.call_once(|| {
        metrics::describe_gauge!(
            DLQ_SIZE,
            "Pending dead letters: in the DLQ topic and not replayed"
        );
        metrics::describe_gauge!(
            DLQ_OLDEST_AGE,
            metrics::Unit::Seconds,
            "Age of the oldest pending dead letter (0 when none)"
        );
        metrics::describe_counter!(DLQ_MONITOR_ERRORS, "Reads of the DLQ topic that failed");
        metrics::counter!(DLQ_MONITOR_ERRORS).increment(0);
    });
}

/// Reads the DLQ once and sets the gauges; returns what it found.
pub async fn scan(dlq: &DlqAdmin) -> Result<Summary, caracal_service_kit::dlq_admin::DlqError> {
    let letters = dlq.read(false).await?;
    let summary = Summary::of(&letters);
    let topic = dlq.topic().to_owned();
    // Counts far below 2^53: exact as f64.
    #[allow(clippy::cast_precision_loss)]
    metrics::gauge!(DLQ_SIZE, "topic" => topic.clone()).set(summary.pending as f64);
    metrics::gauge!(DLQ_OLDEST_AGE, "topic" => topic)
        .set(summary.oldest_pending_age(chrono::Utc::now()));
    Ok(summary)
}

/// Scans every `every`, and at once when `rescan` is notified (after a replay),
/// until `stop` turns true.
pub async fn run(
    dlq: Arc<DlqAdmin>,
    every: Duration,
    rescan: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    describe();
    let mut log = LogLimit::default();
    loop {
        if *stop.borrow() {
            break;
        }
        match scan(&dlq).await {
            Ok(s) => tracing::debug!(
                topic = dlq.topic(),
                pending = s.pending,
                total = s.total,
                "DLQ scanned"
            ),
            Err(error) => {
                metrics::counter!(DLQ_MONITOR_ERRORS).increment(1);
                if let Some(suppressed) = log.allow() {
                    tracing::warn!(topic = dlq.topic(), %error, suppressed, "reading the DLQ failed; the gauges keep their last values");
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = rescan.notified() => {}
            changed = stop.changed() => {
                if changed.is_err() {
                    break;
                }
            }
        }
    }
}
