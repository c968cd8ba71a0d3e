//! The reconcile-drift monitor: every `reconcile.monitorInterval` seconds it runs
//! what `caracal ledger reconcile` runs without arguments (every active policy, its
//! current window: the Redis counter against the ledger's final charges) and sets:
//!
//! - `caracal_reconcile_drift_windows`: windows that drift (counter != ledger) with
//!   both sides unchanged since the previous run. Events in flight (outbox, Kafka,
//!   the ledger-writer's batch) also make a window differ, but they reach the
//!   ledger within seconds: a difference that holds still for a whole interval is
//!   not one of them (unless the pipeline itself stands still that long, which the
//!   outbox and consumer-lag alerts name). A window that keeps moving is judged
//!   once it has been quiet for an interval;
//! - `caracal_reconcile_drift_micros{currency}`: the sum of those windows' |drift|
//!   (Redis - ledger), micro-units of the row's currency;
//! - `caracal_reconcile_runs_total{result="ok"|"error"}`: runs, and runs that
//!   failed (database or Redis unreachable, more policies than one reconciliation
//!   covers: see `MAX_RECONCILE_POLICIES`).
//!
//! Every replica runs it (the gauges are the same on each; alerts take `max`); the
//! first run waits one interval, so replicas starting together do not all read at
//! once. `monitorInterval: 0` turns it off.
//!
//! A run shares the machine with the hot path: its CPU work runs on the blocking
//! pool, not on the threads that answer Authorize.

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use caracal_proto::v1 as pb;
use caracal_service_kit::process::LogLimit;
use tokio::sync::watch;

use crate::{admin::ledger::off_runtime, budget::BudgetStore, db};

/// Windows whose drift held still for a whole interval.
pub const DRIFT_WINDOWS: &str = "caracal_reconcile_drift_windows";
/// Sum of |drift| of those windows, micro-units, labelled `currency`.
pub const DRIFT_MICROS: &str = "caracal_reconcile_drift_micros";
/// Monitor runs, labelled `result` (`ok`, `error`).
pub const RUNS: &str = "caracal_reconcile_runs_total";

/// One reported window: policy, counter, window start, row currency.
type WindowKey = (String, String, i64, String);
/// What a run saw of it: ledger micros, ledger events, Redis micros.
type Seen = (i64, i64, i64);

/// The windows of a run that drift, keyed, with what was seen.
fn drifting(resp: &pb::ReconcileResponse) -> HashMap<WindowKey, (Seen, i64)> {
    resp.policies
        .iter()
        .filter(|r| r.drift_micros != 0)
        .map(|r| {
            let start = r.window_start.as_ref().map_or(0, |t| t.seconds);
            (
                (
                    r.policy_id.clone(),
                    r.counter_key.clone(),
                    start,
                    r.currency.clone(),
                ),
                (
                    (r.ledger_micros, r.ledger_events, r.redis_spent_micros),
                    r.drift_micros,
                ),
            )
        })
        .collect()
}

/// A page's drifting windows, and the currencies it reconciled windows in.
fn digest(resp: pb::ReconcileResponse) -> (HashMap<WindowKey, (Seen, i64)>, Vec<String>) {
    let mut currencies: Vec<String> = Vec::new();
    for r in &resp.policies {
        if !currencies.contains(&r.currency) {
            currencies.push(r.currency.clone());
        }
    }
    (drifting(&resp), currencies)
}

/// The windows drifting now that drifted the same way, with nothing moved, in the
/// previous run: their count and |drift| per currency.
fn confirmed(
    previous: &HashMap<WindowKey, (Seen, i64)>,
    now: &HashMap<WindowKey, (Seen, i64)>,
) -> (usize, BTreeMap<String, i64>) {
    let mut windows = 0;
    let mut micros: BTreeMap<String, i64> = BTreeMap::new();
    for (key, (seen, drift)) in now {
        if previous.get(key).is_some_and(|(before, _)| before == seen) {
            windows += 1;
            let sum = micros.entry(key.3.clone()).or_insert(0);
            *sum = sum.saturating_add(drift.saturating_abs());
        }
    }
    (windows, micros)
}

fn describe() {
    static DESCRIBED: std::sync::Once = std::sync::Once::new();
    DESCRIBED.call_once(|| {
        metrics::describe_gauge!(
            DRIFT_WINDOWS,
            "Policy windows whose Redis counter and ledger differ, unchanged for a monitor interval"
        );
        metrics::describe_gauge!(
            DRIFT_MICROS,
            "Sum of |Redis - ledger| of those windows, micro-units, by currency"
        );
        metrics::describe_counter!(RUNS, "Reconcile-drift monitor runs, by result");
        metrics::counter!(RUNS, "result" => "ok").increment(0);
        metrics::counter!(RUNS, "result" => "error").increment(0);
    });
}

/// Reconciles every `every` until `stop` turns true.
pub async fn run(
    pool: db::Pool,
    store: BudgetStore,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    describe();
    let mut log = LogLimit::default();
    let mut previous: HashMap<WindowKey, (Seen, i64)> = HashMap::new();
    // Currencies with a series (set to 0 when they no longer drift).
    let mut currencies: Vec<String> = Vec::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    return;
                }
                continue;
            }
        }
        // Page by page: a deployment of any size is watched (the API's reconcile
        // refuses more than MAX_RECONCILE_POLICIES at once). Each page's rows are
        // reduced to its drifting windows off the runtime (`digest`): the rows of
        // 10,000 policies took 13-31 ms of the runtime's thread, every call waiting.
        let mut now: HashMap<WindowKey, (Seen, i64)> = HashMap::new();
        let pages = crate::admin::ledger::reconcile_pages(
            &pool,
            &store,
            crate::admin::ledger::MAX_RECONCILE_POLICIES,
            digest,
            |(drifts, seen_currencies)| {
                now.extend(drifts);
                // Every currency a window was reconciled in has a series (0: no drift).
                for c in seen_currencies {
                    if !currencies.contains(&c) {
                        currencies.push(c);
                    }
                }
            },
        );
        // Shutdown does not wait for a run (many pages on a large deployment).
        let run = tokio::select! {
            run = pages => run,
            _ = stop.changed() => return,
        };
        // Judged off the runtime too (a whole deployment's drifting windows, and
        // dropping the previous run's).
        let judged = match run {
            Ok(()) => {
                let before = std::mem::take(&mut previous);
                off_runtime(move || Ok((confirmed(&before, &now), now))).await
            }
            Err(error) => Err(error),
        };
        match judged {
            Ok(((windows, micros), now)) => {
                metrics::counter!(RUNS, "result" => "ok").increment(1);
                // Window counts far below 2^53: exact as f64.
                #[allow(clippy::cast_precision_loss)]
                metrics::gauge!(DRIFT_WINDOWS).set(windows as f64);
                for c in &currencies {
                    let sum = micros.get(c).copied().unwrap_or(0);
                    // Sums far below 2^53 micro-units: exact as f64.
                    #[allow(clippy::cast_precision_loss)]
                    metrics::gauge!(DRIFT_MICROS, "currency" => c.clone()).set(sum as f64);
                }
                if windows > 0 {
                    if let Some(suppressed) = log.allow() {
                        tracing::warn!(
                            windows,
                            suppressed,
                            "ledger and budget counters differ and stayed so for a monitor \
                             interval: see `caracal ledger reconcile`"
                        );
                    }
                }
                previous = now;
            }
            Err(error) => {
                metrics::counter!(RUNS, "result" => "error").increment(1);
                if let Some(suppressed) = log.allow() {
                    tracing::warn!(%error, suppressed, "reconcile-drift monitor: the run failed");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(policy: &str, ledger: i64, events: i64, redis: i64) -> pb::PolicyReconciliation {
        pb::PolicyReconciliation {
            policy_id: policy.into(),
            counter_key: format!("k:{policy}"),
            currency: "USD".into(),
            window_start: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
            ledger_micros: ledger,
            ledger_events: events,
            redis_spent_micros: redis,
            drift_micros: redis - ledger,
            ..Default::default()
        }
    }

    fn response(rows: Vec<pb::PolicyReconciliation>) -> pb::ReconcileResponse {
        pb::ReconcileResponse {
            policies: rows,
            ..Default::default()
        }
    }

    #[test]
    fn only_a_difference_that_held_still_for_an_interval_counts() {
        // a: in flight (the ledger caught up); b: drift that held still; c: moving;
        // d: no drift.
        let first = drifting(&response(vec![
            row("a", 100, 1, 150),
            row("b", 100, 1, 130),
            row("c", 100, 1, 170),
            row("d", 100, 1, 100),
        ]));
        let second = drifting(&response(vec![
            row("a", 150, 2, 150),
            row("b", 100, 1, 130),
            row("c", 120, 2, 190),
            row("d", 100, 1, 100),
        ]));
        assert_eq!(first.len(), 3);
        let (windows, micros) = confirmed(&first, &second);
        assert_eq!(windows, 1);
        assert_eq!(micros.get("USD"), Some(&30));
        // The first run confirms nothing.
        assert_eq!(confirmed(&HashMap::new(), &first).0, 0);
        // A counter behind the ledger is drift too (|drift|).
        let behind = drifting(&response(vec![row("e", 200, 2, 150)]));
        assert_eq!(confirmed(&behind, &behind).1.get("USD"), Some(&50));
    }
}
