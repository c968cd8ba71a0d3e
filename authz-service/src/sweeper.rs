//! Expiry of reservations that were never settled or released.
//!
//! Every `provisionalChargeCleanupInterval` the sweeper finds, per partition, the
//! reservations older than `provisionalChargeExpiration` and finishes each with the
//! `expire` mode of the finish script: per policy, charge the reserved amount
//! (default) or release it, as the policy said when the reservation was made.
//! Several replicas may sweep at once: each reservation is finished atomically and
//! exactly once (the script deletes it and leaves a marker), so a second sweeper
//! finds nothing to do.

use std::time::Duration;

use chrono::Utc;
use tokio::sync::watch;

use crate::{
    budget::{
        store::{Finish, FinishKind, FinishOutcome, StoreError},
        BudgetStore,
    },
    metrics,
};

/// Reservations finished per partition per batch, and batches per partition per
/// sweep: explicit bounds so one sweep cannot run away.
const BATCH: usize = 500;
const MAX_BATCHES: usize = 20;

/// What one sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sweep {
    /// Reservations expired.
    pub expired: usize,
    /// Reservations that could not be finished (e.g. a corrupt record): logged,
    /// counted, left in the expiry index for the operator and the next sweep.
    pub failed: usize,
}

/// Expires every due reservation once.
///
/// One reservation that cannot be finished does not stop the sweep (every other
/// due reservation would otherwise hold its budget forever); only losing Redis
/// does.
pub async fn sweep_once(
    store: &BudgetStore,
    finished_marker_ttl_s: u64,
) -> Result<Sweep, StoreError> {
    let mut sweep = Sweep::default();
    'partitions: for partition in 0..store.keys().partitions() {
        // Failed reservations stay in the index, at its front (the lowest expiry
        // times seen so far): the next batch starts after them.
        let mut skip = 0;
        for _ in 0..MAX_BATCHES {
            let now_ms = Utc::now().timestamp_millis();
            let due = store
                .due_reservations(partition, now_ms, skip, BATCH)
                .await?;
            for rid in &due {
                let outcome = store
                    .finish(&Finish {
                        reason: "expired",
                        ..Finish::new(
                            FinishKind::Expire,
                            partition,
                            rid,
                            now_ms,
                            finished_marker_ttl_s,
                        )
                    })
                    .await;
                match outcome {
                    Ok(FinishOutcome::Finished { charged, .. }) => {
                        sweep.expired += 1;
                        ::metrics::counter!(metrics::RESERVATIONS, "event" => "expired")
                            .increment(1);
                        tracing::debug!(reservation = %rid, charged, "reservation expired");
                    }
                    Ok(_) => {}
                    // Redis lost this partition's state: nothing to expire there
                    // until `caracal budget rebuild` has put it back.
                    Err(StoreError::StateLost(_)) => continue 'partitions,
                    Err(e) if e.is_per_call() => {
                        sweep.failed += 1;
                        skip += 1;
                        ::metrics::counter!(metrics::RESERVATIONS, "event" => "expire_failed")
                            .increment(1);
                        tracing::error!(
                            reservation = %rid, partition, error = %e,
                            "could not expire a reservation; going on with the others"
                        );
                    }
                    Err(e) => return Err(e),
                }
            }
            if due.len() < BATCH {
                break;
            }
        }
    }
    Ok(sweep)
}

/// Runs [`sweep_once`] every `interval` until shutdown.
pub async fn run(
    store: BudgetStore,
    interval: Duration,
    finished_marker_ttl_s: u64,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => return,
        }
        match sweep_once(&store, finished_marker_ttl_s).await {
            Ok(Sweep {
                expired: 0,
                failed: 0,
            }) => {}
            Ok(Sweep { expired, failed }) => {
                tracing::info!(expired, failed, "expired unsettled reservations");
            }
            Err(e) => {
                ::metrics::counter!(metrics::REDIS_ERRORS).increment(1);
                tracing::warn!(error = %e, "expiry sweep failed; retrying next interval");
            }
        }
    }
}
