//! Group commit on the real Redis scripts (issue 24): concurrent decisions of one
//! partition go to Redis as one script run, and each is still decided on its own,
//! in arrival order: a refusal in the middle of a run refuses only its call, a
//! retry inside the same run is answered as a duplicate, and the counters hold
//! exactly the sum of what was allowed, then of what was settled.

use std::time::Duration;

use caracal_authz::{
    authorize::policy_slot,
    budget::{
        store::{
            Finish, FinishKind, FinishOutcome, ReserveOutcome, ReserveRequest, GROUP_COMMIT_CALLS,
        },
        BudgetStore, KeySpace, PolicySlot, ReplicaAck,
    },
    catalog::PolicyInfo,
};
use caracal_domain::{
    money::Currency,
    policy::OnExpiry,
    window::{TimeWindow, WindowType},
};
use caracal_tests::{probe::metric_value, redis_url, standalone};
use futures::future::join_all;
use uuid::Uuid;

/// One Authorize of the run: its request id, reservation id and amount.
struct Call {
    request: String,
    reservation: String,
    amount: i64,
}

/// The Authorize of `call` on partition 0, against the one policy of `slot`.
fn reserve_request<'a>(
    c: &'a Call,
    slot: &'a PolicySlot,
    agent: &'a str,
    now: chrono::DateTime<chrono::Utc>,
    allow_event_id: &'a str,
    deny_event_id: &'a str,
) -> ReserveRequest<'a> {
    ReserveRequest {
        partition: 0,
        request_id: &c.request,
        reservation_id: &c.reservation,
        amount_micros: c.amount,
        now_ms: now.timestamp_millis(),
        expires_at_ms: now.timestamp_millis() + 300_000,
        agent_id: agent,
        root_agent_id: agent,
        currency: "USD",
        provider: "openai",
        model: "m",
        resource: "r",
        allow_event_id,
        deny_event_id,
        policies: std::slice::from_ref(slot),
        traceparent: None,
    }
}

/// The tests count script runs on the process's one metrics recorder: one at a
/// time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Calls and script runs so far (the histogram's count and sum).
fn runs_and_calls() -> (f64, f64) {
    let text = caracal_service_kit::metrics::render();
    let count = metric_value(&text, &format!("{GROUP_COMMIT_CALLS}_count"), &[]).unwrap_or(0.0);
    let sum = metric_value(&text, &format!("{GROUP_COMMIT_CALLS}_sum"), &[]).unwrap_or(0.0);
    (count, sum)
}

/// A store with group commit on (4 partitions, markers written), and one policy
/// of `limit` on partition 0, its slot and agent.
struct Setup {
    store: BudgetStore,
    prefix: String,
    slot: PolicySlot,
    agent: String,
    now: chrono::DateTime<chrono::Utc>,
}

async fn setup(limit: i64) -> Setup {
    caracal_service_kit::metrics::init();
    let prefix = format!("t{}", Uuid::new_v4().simple());
    let store = BudgetStore::new(
        &standalone(&redis_url(), Duration::from_secs(5)),
        KeySpace::new(prefix.clone(), 4),
        1,
        ReplicaAck::NONE,
    )
    .unwrap()
    .with_group_commit(64);
    let partitions: Vec<u16> = (0..4).collect();
    caracal_authz::budget::state::write_markers(&store, &partitions, "test")
        .await
        .unwrap();
    let policy = PolicyInfo {
        id: Uuid::now_v7(),
        agent_id: Uuid::now_v7(),
        limit_micros: limit,
        currency: Currency::parse("USD").unwrap(),
        window: TimeWindow::Total,
        window_type: WindowType::Calendar,
        on_expiry: OnExpiry::Charge,
    };
    let now = chrono::Utc::now();
    let slot = policy_slot(store.keys(), 0, &policy, now);
    let agent = policy.agent_id.to_string();
    Setup {
        store,
        prefix,
        slot,
        agent,
        now,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_of_one_partition_decides_each_call_on_its_own() {
    let _serial = SERIAL.lock().await;
    const LIMIT: i64 = 250_000;
    let Setup {
        store,
        prefix,
        slot,
        agent,
        now,
    } = setup(LIMIT).await;

    // In arrival order: 20 x 10,000 (200,000), one 60,000 that does not fit
    // (260,000 > 250,000), a retry of call 3, five more 10,000 that fit
    // exactly (250,000), then one 10,000 too many.
    let mut calls: Vec<Call> = Vec::new();
    let call = |i: usize, amount: i64| Call {
        request: format!("req-{i}"),
        reservation: format!("rsv_0_{}_{i}", Uuid::now_v7().simple()),
        amount,
    };
    for i in 0..20 {
        calls.push(call(i, 10_000));
    }
    calls.push(call(20, 60_000));
    let retry = Call {
        request: calls[3].request.clone(),
        reservation: calls[3].reservation.clone(),
        amount: 10_000,
    };
    calls.push(retry);
    for i in 22..27 {
        calls.push(call(i, 10_000));
    }
    calls.push(call(27, 10_000));
    let deny_ids: Vec<String> = (0..calls.len()).map(|i| format!("deny/{i}")).collect();
    let allow_ids: Vec<String> = calls
        .iter()
        .map(|c| format!("{}/authorize", c.reservation))
        .collect();

    let (runs_before, calls_before) = runs_and_calls();
    let requests: Vec<ReserveRequest> = calls
        .iter()
        .enumerate()
        .map(|(i, c)| reserve_request(c, &slot, &agent, now, &allow_ids[i], &deny_ids[i]))
        .collect();
    let outcomes = join_all(requests.iter().map(|r| store.reserve(r))).await;
    let (runs_after, calls_after) = runs_and_calls();
    assert_eq!(calls_after - calls_before, calls.len() as f64);
    assert!(
        runs_after - runs_before < calls.len() as f64 / 2.0,
        "{} script runs for {} calls: the calls were not grouped",
        runs_after - runs_before,
        calls.len()
    );

    // Each answer as if it had been alone, in arrival order.
    let mut used = 0;
    for (i, outcome) in outcomes.into_iter().enumerate() {
        let outcome = outcome.unwrap();
        match i {
            20 | 27 => assert_eq!(
                outcome,
                ReserveOutcome::Denied {
                    index: 0,
                    used: vec![used]
                },
                "call {i}"
            ),
            21 => match outcome {
                ReserveOutcome::Duplicate {
                    reservation_id,
                    used: now_used,
                    finished: None,
                } => {
                    assert_eq!(reservation_id, calls[3].reservation);
                    assert_eq!(now_used, vec![used]);
                }
                other => panic!("the retry of call 3: {other:?}"),
            },
            _ => {
                assert_eq!(
                    outcome,
                    ReserveOutcome::Allowed { used: vec![used] },
                    "call {i}"
                );
                used += calls[i].amount;
            }
        }
    }
    assert_eq!(used, LIMIT);
    let mut conn = caracal_tests::test_redis().await.unwrap();
    let counter: std::collections::HashMap<String, i64> = redis::cmd("HGETALL")
        .arg(&slot.key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(counter.get("r"), Some(&LIMIT), "{counter:?}");
    assert_eq!(counter.get("s").copied().unwrap_or(0), 0, "{counter:?}");
    // The expiry index (written at the end of each run): the 25 reservations
    // made, each by its stem at its expiry; none of the refused or the retry.
    let index: Vec<(String, i64)> = redis::cmd("ZRANGE")
        .arg(store.keys().expiry(0))
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut expected: Vec<(String, i64)> = calls
        .iter()
        .enumerate()
        .filter(|(i, _)| !matches!(i, 20 | 21 | 27))
        .map(|(_, c)| {
            let stem = caracal_authz::budget::keys::split_reservation_id(&c.reservation).0;
            (stem.to_owned(), now.timestamp_millis() + 300_000)
        })
        .collect();
    let mut index_sorted = index.clone();
    index_sorted.sort();
    expected.sort();
    assert_eq!(index_sorted, expected);

    // Settles of every allowed call at 4,000, plus a second settle of call 0 in
    // the same run: 25 charged once, the repeat answered from the done marker.
    let allowed: Vec<&Call> = calls
        .iter()
        .enumerate()
        .filter(|(i, _)| !matches!(i, 20 | 21 | 27))
        .map(|(_, c)| c)
        .collect();
    assert_eq!(allowed.len(), 25);
    let mut settles: Vec<&str> = allowed.iter().map(|c| c.reservation.as_str()).collect();
    settles.push(&calls[0].reservation);
    let finishes: Vec<Finish> = settles
        .iter()
        .map(|rid| Finish {
            cost_micros: 4_000,
            input_tokens: 10,
            output_tokens: 20,
            price_version: 1,
            currency: "USD",
            ..Finish::new(
                FinishKind::Settle,
                0,
                rid,
                now.timestamp_millis() + 1_000,
                3600,
            )
        })
        .collect();
    let finished = join_all(finishes.iter().map(|f| store.finish(f))).await;
    for (i, f) in finished.into_iter().enumerate() {
        match (i, f.unwrap()) {
            (
                0..=24,
                FinishOutcome::Finished {
                    kind: FinishKind::Settle,
                    late: false,
                    reserved: 10_000,
                    charged: 4_000,
                    ..
                },
            ) => {}
            (
                25,
                FinishOutcome::AlreadyFinished {
                    kind: FinishKind::Settle,
                    charged: 4_000,
                    ..
                },
            ) => {}
            (i, other) => panic!("settle {i}: {other:?}"),
        }
    }
    let counter: std::collections::HashMap<String, i64> = redis::cmd("HGETALL")
        .arg(&slot.key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(counter.get("r").copied().unwrap_or(0), 0, "{counter:?}");
    assert_eq!(counter.get("s"), Some(&(25 * 4_000)), "{counter:?}");
    let left: i64 = redis::cmd("ZCARD")
        .arg(store.keys().expiry(0))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(left, 0, "settled reservations left in the expiry index");

    caracal_tests::delete_redis_prefix(&prefix).await.unwrap();
}

/// An Authorize and its Settle in one run: the expiry index is written at the
/// end of the run, each member as its last write says, so the settled
/// reservation is not left for the sweeper and the others are there.
#[tokio::test]
async fn an_authorize_and_its_settle_in_one_run_leave_the_index_in_order() {
    let _serial = SERIAL.lock().await;
    let Setup {
        store,
        prefix,
        slot,
        agent,
        now,
    } = setup(100_000).await;
    let call = |i: usize| Call {
        request: format!("req-{i}"),
        reservation: format!("rsv_0_{}_{i}", Uuid::now_v7().simple()),
        amount: 1_000,
    };
    let mut conn = caracal_tests::test_redis().await.unwrap();
    let fresh: Vec<Call> = (0..3).map(call).collect();
    let fresh_requests: Vec<ReserveRequest> = fresh
        .iter()
        .map(|c| reserve_request(c, &slot, &agent, now, &c.reservation, &c.request))
        .collect();
    let settle_b = Finish {
        cost_micros: 1_000,
        currency: "USD",
        ..Finish::new(
            FinishKind::Settle,
            0,
            &fresh[1].reservation,
            now.timestamp_millis() + 1_000,
            3600,
        )
    };
    let (runs_before, _) = runs_and_calls();
    let (a, b, settled, c) = tokio::join!(
        store.reserve(&fresh_requests[0]),
        store.reserve(&fresh_requests[1]),
        store.finish(&settle_b),
        store.reserve(&fresh_requests[2]),
    );
    let (runs_after, _) = runs_and_calls();
    // The first call went alone (its partition was idle), the three behind it
    // as one run (single-threaded: nothing drains the queue between them).
    assert_eq!(
        runs_after - runs_before,
        2.0,
        "the last three calls shared a run"
    );
    for r in [a, b, c] {
        assert!(matches!(r.unwrap(), ReserveOutcome::Allowed { .. }));
    }
    assert!(
        matches!(
            settled.unwrap(),
            FinishOutcome::Finished {
                kind: FinishKind::Settle,
                charged: 1_000,
                ..
            }
        ),
        "the settle ran after its Authorize, in the same run"
    );
    let mut index: Vec<String> = redis::cmd("ZRANGE")
        .arg(store.keys().expiry(0))
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    index.sort();
    let mut expected: Vec<String> = [&fresh[0], &fresh[2]]
        .iter()
        .map(|c| {
            caracal_authz::budget::keys::split_reservation_id(&c.reservation)
                .0
                .to_owned()
        })
        .collect();
    expected.sort();
    assert_eq!(index, expected);

    caracal_tests::delete_redis_prefix(&prefix).await.unwrap();
}
