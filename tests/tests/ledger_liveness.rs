//! Issue 22's acceptance test, as the operator reproduced the bug: hot-path traffic
//! (Authorize, then Settle at a varying actual cost or Release) from the four
//! children of one parent, through the real authz-service, its outbox relay and a
//! real Kafka-protocol broker (tansu, SQLite storage), into the real ledger-writer
//! binary, which is SIGKILLed and restarted ten times during the traffic (at
//! random 1-5 s intervals, two kills less than 1 s apart).
//!
//! Before partition leases, a restarted writer could be given no partitions by
//! tansu's group coordinator (the killed member kept them) and wrote nothing more
//! with readiness green: 609 of 2,093 charges reached the ledger. Now, within 30 s
//! of the last kill or the last call, whichever is later (plus whatever time the
//! relay needs to drain the outbox after the last call), the ledger equals what the
//! service acknowledged, row for row: one final charge per acknowledged Settle with
//! its reservation id and the amount the Settle answered, nothing else, per-agent
//! sums equal, and the parent's policy total equals its Redis counter.
//!
//!   cargo test -p caracal-tests --test ledger_liveness

use std::{
    collections::{BTreeMap, HashMap},
    process::Child,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use caracal_proto::v1 as pb;
use caracal_tests::{
    authorize_request,
    consumer_process::{random_ms, terminate, ConsumerProcess},
    kafka::Tansu,
    TestStack,
};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

/// Hot-path calls (each an Authorize, then a Settle or a Release).
const CALLS: usize = 3_000;
/// Calls in flight at once.
const CONCURRENCY: usize = 8;
/// The calls are spread over the kill schedule plus this long, so that every kill
/// (the last one too) lands during the traffic (ten kills at 1-5 s take ~28 s on
/// average), and the last restarted writer has charges left to write.
const TRAFFIC_AFTER_LAST_KILL: Duration = Duration::from_secs(2);
/// The traffic lasts at least this long (at most ~200 calls/s).
const MIN_TRAFFIC_SPAN: Duration = Duration::from_secs(15);
/// Every `RELEASE_EVERY`-th call releases instead of settling.
const RELEASE_EVERY: usize = 10;
const KILLS: usize = 10;
/// The acceptance bound: the ledger is complete this long after the last kill or
/// the last call, whichever is later (plus the relay's drain time).
const COMPLETE_WITHIN: Duration = Duration::from_secs(30);

fn usd(micros: i64) -> pb::Money {
    pb::Money {
        currency: "USD".into(),
        micros,
        amount: String::new(),
    }
}

/// What the service acknowledged for one Settle.
#[derive(Debug, Clone)]
struct Acked {
    reservation: String,
    child: usize,
    charged: i64,
}

/// What one call ended with.
#[derive(Debug)]
enum Outcome {
    Settled(Acked),
    Released,
}

/// The estimate and the actual cost of call `i` (micros): actual costs below,
/// equal to and above the estimate (overshoot), and now and then zero.
fn amounts(i: usize) -> (i64, i64) {
    let estimate = 2_000 + (i % 13) as i64 * 500;
    let actual = if i.is_multiple_of(97) {
        0
    } else if i.is_multiple_of(31) {
        estimate
    } else {
        ((i as i64 * 7_919) % 12_000) + 1
    };
    (estimate, actual)
}

/// One call: Authorize (must be allowed: the policies are generous), then Settle
/// at the call's actual cost, or Release. A failed Settle/Release is retried
/// (both are idempotent on the reservation id: a retried Settle answers what the
/// first charged); a call that still fails fails the test.
async fn one_call(
    authz: &mut pb::budget_authorization_client::BudgetAuthorizationClient<
        caracal_tests::GatewaySvc,
    >,
    run: &str,
    i: usize,
    child: usize,
    key: &str,
) -> Outcome {
    let (estimate, actual) = amounts(i);
    let request_id = format!("liveness-{run}-{i}");
    let mut last_err = None;
    let mut auth = None;
    for _ in 0..3 {
        match authz
            .authorize(authorize_request(key, &request_id, estimate))
            .await
        {
            Ok(r) => {
                auth = Some(r.into_inner());
                break;
            }
            Err(e) => {
                last_err = Some(e);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let auth = auth.unwrap_or_else(|| panic!("Authorize {i} failed: {last_err:?}"));
    assert_eq!(
        auth.decision,
        pb::Decision::Allow as i32,
        "call {i} is allowed (generous policies): {auth:?}"
    );
    let reservation = auth.reservation_id.clone();
    assert!(!reservation.is_empty(), "{auth:?}");
    for _ in 0..3 {
        if i % RELEASE_EVERY == RELEASE_EVERY - 1 {
            match authz
                .release(pb::ReleaseRequest {
                    reservation_id: reservation.clone(),
                    reason: "upstream_error".into(),
                })
                .await
            {
                Ok(_) => return Outcome::Released,
                Err(e) => last_err = Some(e),
            }
        } else {
            match authz
                .settle(pb::SettleRequest {
                    reservation_id: reservation.clone(),
                    actual_cost: Some(usd(actual)),
                    ..Default::default()
                })
                .await
            {
                Ok(r) => {
                    let r = r.into_inner();
                    let charged = r
                        .charged
                        .as_ref()
                        .unwrap_or_else(|| panic!("Settle {i} answers what it charged: {r:?}"));
                    assert_eq!(charged.currency, "USD");
                    return Outcome::Settled(Acked {
                        reservation,
                        child,
                        charged: charged.micros,
                    });
                }
                Err(e) => last_err = Some(e),
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("Settle/Release of call {i} ({reservation}) failed: {last_err:?}");
}

/// Entries still in the service's Redis outbox streams (not yet relayed).
async fn outbox_backlog(stack: &TestStack) -> i64 {
    let mut conn = stack.redis_conn().unwrap();
    let mut n = 0;
    for p in 0..stack.redis.partitions {
        let len: i64 = redis::cmd("XLEN")
            .arg(format!("{}:{{p{p}}}:outbox", stack.key_prefix))
            .query_async(&mut conn)
            .await
            .unwrap();
        n += len;
    }
    n
}

#[derive(diesel::QueryableByName, Debug, Clone)]
struct FinalCharge {
    #[diesel(sql_type = diesel::sql_types::Text)]
    reservation_id: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    agent_id: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    kind: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    event_id: String,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    charged_micros: i64,
}

async fn final_charges(conn: &mut AsyncPgConnection) -> Vec<FinalCharge> {
    diesel::sql_query(
        "SELECT reservation_id, agent_id::text AS agent_id, kind, event_id, charged_micros \
         FROM ledger_final_charges",
    )
    .load(conn)
    .await
    .unwrap()
}

#[derive(diesel::QueryableByName, Debug, PartialEq, Eq)]
struct RawCounts {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    rows: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    event_ids: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    reservations: i64,
}

async fn raw_counts(conn: &mut AsyncPgConnection) -> RawCounts {
    diesel::sql_query(
        "SELECT count(*) AS rows, count(DISTINCT event_id) AS event_ids, \
         count(DISTINCT reservation_id) AS reservations FROM ledger_events",
    )
    .get_result(conn)
    .await
    .unwrap()
}

async fn ledger_rows(conn: &mut AsyncPgConnection) -> i64 {
    raw_counts(conn).await.rows
}

/// The writer process; SIGKILLed on drop (a failing test leaves nothing behind).
struct Writer {
    process: ConsumerProcess,
    child: Option<Child>,
}

impl Writer {
    fn start(&mut self) {
        self.child = Some(self.process.spawn().expect("starting the ledger-writer"));
    }
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL, by our own child's pid
            let _ = c.wait();
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The wall-clock times (UTC) at which the writer's log says it took partition
/// leases (ANSI colours stripped; lines whose first word is not a timestamp are
/// skipped).
fn lease_times(log: &str) -> Vec<chrono::DateTime<chrono::Utc>> {
    log.lines()
        .filter(|l| l.contains("partition leases taken"))
        .filter_map(|l| {
            let plain: String = strip_ansi(l);
            let first = plain.split_whitespace().next()?;
            chrono::DateTime::parse_from_rfc3339(first)
                .ok()
                .map(|t| t.with_timezone(&chrono::Utc))
        })
        .collect()
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ ... letter
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_equals_what_the_service_acknowledged_after_ten_writer_kills_during_traffic() {
    let test_start = Instant::now();
    let tansu = Tansu::start_new().await.expect("tansu broker");
    let brokers = tansu.brokers();
    let b = brokers.clone();
    let stack = TestStack::start_with(move |c| {
        c.budget.relay_enabled = true;
        c.kafka.brokers = b;
        c.kafka.topic_partitions = 6;
    })
    .await
    .unwrap();

    // A parent with four children; generous USD policies on all five.
    let (parent, _) = stack.agent_with_key("liveness-parent", None).await.unwrap();
    let p_parent = stack
        .usd_policy(&parent, "1000.00", "total", "calendar", "charge")
        .await
        .unwrap();
    let mut children = Vec::new();
    let mut child_policies = Vec::new();
    for c in 0..4 {
        let (id, key) = stack
            .agent_with_key(&format!("liveness-child-{c}"), Some(&parent))
            .await
            .unwrap();
        child_policies.push(
            stack
                .usd_policy(&id, "500.00", "total", "calendar", "charge")
                .await
                .unwrap(),
        );
        children.push((id, key));
    }
    stack
        .set_token_price("openai", "gpt-4o", "USD", ["2.50", "10.00", "1.25"])
        .await
        .unwrap();

    // The real ledger-writer binary, in its own group, with fast lease ticks.
    let dir = tempfile::tempdir().unwrap();
    let group = format!("liveness-{}", uuid::Uuid::new_v4().simple());
    let mut writer = Writer {
        process: ConsumerProcess {
            binary: env!("CARGO_BIN_EXE_consumers-under-test").into(),
            subcommand: "ledger-writer".into(),
            database_url: stack.database_url.clone(),
            brokers: brokers.clone(),
            group,
            log: dir.path().join("writer.log"),
            env: vec![("CARACAL_CONSUMER_LEASE_INTERVAL_MS".into(), "300".into())],
        },
        child: None,
    };
    let mut conn = AsyncPgConnection::establish(&stack.database_url)
        .await
        .unwrap();
    let setup = test_start.elapsed();

    // The kill schedule, drawn up front so the traffic can cover it: pauses of 1-5 s,
    // the 5th kill less than 1 s after the 4th.
    let pauses: Vec<Duration> = (0..KILLS)
        .map(|k| {
            if k == 4 {
                random_ms(300, 1000)
            } else {
                random_ms(1000, 5000)
            }
        })
        .collect();
    let traffic_span =
        (pauses.iter().sum::<Duration>() + TRAFFIC_AFTER_LAST_KILL).max(MIN_TRAFFIC_SPAN);
    eprintln!("kill pauses {pauses:?}; traffic spread over {traffic_span:?}");

    // ------------------------------------------------------------ the traffic
    let started = Instant::now();
    writer.start();
    let run = uuid::Uuid::new_v4().simple().to_string();
    let next = Arc::new(AtomicUsize::new(0));
    let keys: Arc<Vec<String>> = Arc::new(children.iter().map(|(_, k)| k.clone()).collect());
    let mut workers = Vec::new();
    for _ in 0..CONCURRENCY {
        let (next, keys, run) = (next.clone(), keys.clone(), run.clone());
        let mut authz = stack.authz();
        workers.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= CALLS {
                    break;
                }
                // Paced: call i starts no earlier than its share of the span.
                let due = started + traffic_span.mul_f64(i as f64 / CALLS as f64);
                tokio::time::sleep_until(due.into()).await;
                let child = i % 4;
                out.push(one_call(&mut authz, &run, i, child, &keys[child]).await);
            }
            (out, Instant::now())
        }));
    }

    // Ledger rows sampled every 100 ms (to see when each restarted writer resumes).
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (url, sampling) = (stack.database_url.clone(), sampling.clone());
        tokio::spawn(async move {
            let mut c = AsyncPgConnection::establish(&url).await.unwrap();
            let mut samples: Vec<(Instant, i64)> = Vec::new();
            // Bounded: at most 10 minutes of samples.
            for _ in 0..6_000 {
                if !AtomicBool::load(&sampling, Ordering::Relaxed) {
                    break;
                }
                let rows = ledger_rows(&mut c).await;
                samples.push((Instant::now(), rows));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            samples
        })
    };

    // ------------------------------------------------------------ the kills
    // In a task of its own, so the end of the traffic and the outbox drain are
    // observed when they happen. Returns the writer, each restart (instant, wall
    // clock, ledger rows then), the kill times (since the start) and the last kill.
    let killing = {
        let next = next.clone();
        let url = stack.database_url.clone();
        tokio::spawn(async move {
            let mut conn = AsyncPgConnection::establish(&url).await.unwrap();
            let mut restarts: Vec<(Instant, chrono::DateTime<chrono::Utc>, i64)> = Vec::new();
            let mut kill_times = Vec::new();
            for (kill, pause) in pauses.into_iter().enumerate() {
                tokio::time::sleep(pause).await;
                writer.kill();
                kill_times.push(started.elapsed());
                let rows = ledger_rows(&mut conn).await;
                let calls = AtomicUsize::load(&next, Ordering::Relaxed).min(CALLS);
                eprintln!(
                    "kill {kill} after {pause:?} at {:?}: {rows} ledger rows, ~{calls} calls \
                     started",
                    started.elapsed()
                );
                writer.start();
                restarts.push((Instant::now(), chrono::Utc::now(), rows));
            }
            (writer, restarts, kill_times, Instant::now())
        })
    };

    let mut acked: Vec<Acked> = Vec::new();
    let mut released = 0usize;
    let mut last_call = started;
    for w in workers {
        let (out, done) = w.await.unwrap();
        last_call = last_call.max(done);
        for o in out {
            match o {
                Outcome::Settled(a) => acked.push(a),
                Outcome::Released => released += 1,
            }
        }
    }
    assert_eq!(acked.len() + released, CALLS);
    eprintln!(
        "traffic: {} settles, {released} releases in {:?}",
        acked.len(),
        last_call - started,
    );
    let expected: BTreeMap<String, i64> = acked
        .iter()
        .map(|a| (a.reservation.clone(), a.charged))
        .collect();
    assert_eq!(expected.len(), acked.len(), "distinct reservation ids");

    // ------------------------------------------------------------ drained and complete
    // The relay drains the outbox (bounded), then the ledger must be complete within
    // 30 s of the later of the last kill and the last call, plus that drain time.
    let drain_deadline = last_call + Duration::from_secs(60);
    let drained_at = loop {
        let backlog = outbox_backlog(&stack).await;
        if backlog == 0 {
            break Instant::now();
        }
        assert!(
            Instant::now() < drain_deadline,
            "the relay drains the outbox within 60 s of the last call: {backlog} entries left"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let drain = drained_at.saturating_duration_since(last_call);
    let (mut writer, restarts, kill_times, last_kill) = killing.await.unwrap();
    eprintln!(
        "last kill at {:?}, last call at {:?}, outbox drained {drain:?} after the last call",
        last_kill - started,
        last_call - started
    );
    let deadline = last_kill.max(last_call) + COMPLETE_WITHIN + drain;
    let complete_at = loop {
        let rows = final_charges(&mut conn).await;
        let have: HashMap<&str, i64> = rows
            .iter()
            .map(|r| (r.reservation_id.as_str(), r.charged_micros))
            .collect();
        let missing = expected
            .keys()
            .filter(|k| !have.contains_key(k.as_str()))
            .count();
        if missing == 0 {
            break Instant::now();
        }
        if Instant::now() >= deadline {
            panic!(
                "{missing} of {} acknowledged charges still missing from the ledger {:?} after \
                 the last kill ({:?} after the last call; outbox drained {drain:?} after it); \
                 writer log:\n{}",
                expected.len(),
                last_kill.elapsed(),
                last_call.elapsed(),
                writer.process.log_tail(60)
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let reference = last_kill.max(last_call);
    eprintln!(
        "outbox drained {drain:?} after the last call; ledger complete {:?} after the later of \
         the last kill and the last call (bound {:?})",
        complete_at.saturating_duration_since(reference),
        COMPLETE_WITHIN + drain
    );

    // Whatever was still in flight has had time to land twice, if it could.
    tokio::time::sleep(Duration::from_secs(1)).await;
    sampling.store(false, Ordering::Relaxed);
    let samples = sampler.await.unwrap();

    // SIGTERM: the last writer commits what it wrote and exits 0.
    if let Some(mut c) = writer.child.take() {
        if let Err(e) = terminate(&mut c, Duration::from_secs(30)) {
            panic!(
                "the writer on SIGTERM: {e}; log:\n{}",
                writer.process.log_tail(60)
            );
        }
    }

    // How long each restarted writer took: to take its leases (its log) and until
    // the ledger grew again (the samples).
    let log = std::fs::read_to_string(&writer.process.log).unwrap_or_default();
    let leases = lease_times(&log);
    for (n, (at, wall, rows)) in restarts.iter().enumerate() {
        // Only this writer's rows: up to its own kill (None: killed before a new
        // row showed in a sample).
        let until = restarts.get(n + 1).map(|r| r.0);
        let grew = samples
            .iter()
            .take_while(|(t, _)| until.is_none_or(|u| *t < u))
            .find(|(t, r)| t > at && *r > *rows)
            .map(|(t, _)| *t - *at);
        let leased = leases
            .iter()
            .find(|t| *t >= wall && restarts.get(n + 1).is_none_or(|r| **t < r.1))
            .and_then(|t| (*t - *wall).to_std().ok());
        let next_kill = kill_times.get(n + 1).map(|k| *k - (*at - started));
        eprintln!(
            "restart {n}: leases after {leased:?}, ledger grew after {grew:?} (killed again \
             after {next_kill:?})"
        );
    }

    // ------------------------------------------------------------ row for row
    let tail = writer.process.log_tail(60);
    let rows = final_charges(&mut conn).await;
    let ledger: BTreeMap<String, i64> = rows
        .iter()
        .map(|r| (r.reservation_id.clone(), r.charged_micros))
        .collect();
    let missing: Vec<_> = expected
        .iter()
        .filter(|(k, _)| !ledger.contains_key(*k))
        .take(5)
        .collect();
    let extra: Vec<_> = ledger
        .iter()
        .filter(|(k, _)| !expected.contains_key(*k))
        .take(5)
        .collect();
    let wrong: Vec<_> = expected
        .iter()
        .filter_map(|(k, v)| ledger.get(k).filter(|l| *l != v).map(|l| (k, *v, *l)))
        .take(5)
        .collect();
    assert!(
        ledger == expected,
        "the ledger's final charges = the acknowledged settles, reservation by reservation \
         ({} in the ledger, {} acknowledged); missing e.g. {missing:?}, extra e.g. {extra:?}, \
         wrong amount (acked, ledger) e.g. {wrong:?}; writer log:\n{tail}",
        ledger.len(),
        expected.len()
    );
    // Exactly once in ledger_events too (the view keeps one row per reservation
    // whatever the table holds): one settle row per acknowledged settle.
    let n = expected.len() as i64;
    assert_eq!(
        raw_counts(&mut conn).await,
        RawCounts {
            rows: n,
            event_ids: n,
            reservations: n
        },
        "one ledger_events row per acknowledged settle, no duplicates; writer log:\n{tail}"
    );
    let agent_index: HashMap<&str, usize> = children
        .iter()
        .enumerate()
        .map(|(i, (id, _))| (id.as_str(), i))
        .collect();
    let by_reservation: HashMap<&str, &Acked> =
        acked.iter().map(|a| (a.reservation.as_str(), a)).collect();
    for r in &rows {
        assert_eq!(r.kind, "settle", "{r:?}");
        assert_eq!(r.event_id, format!("{}/settle", r.reservation_id), "{r:?}");
        let a = by_reservation[r.reservation_id.as_str()];
        assert_eq!(
            agent_index.get(r.agent_id.as_str()),
            Some(&a.child),
            "charged to the child that called: {r:?}"
        );
    }

    // Per agent: the ledger's count and sum = what the service acknowledged.
    let mut ledger_per_agent: HashMap<String, (i64, i64)> = HashMap::new();
    for r in &rows {
        let e = ledger_per_agent.entry(r.agent_id.clone()).or_default();
        e.0 += 1;
        e.1 += r.charged_micros;
    }
    let mut total = 0;
    for (c, (id, _)) in children.iter().enumerate() {
        let mine = acked.iter().filter(|a| a.child == c);
        let want = (
            mine.clone().count() as i64,
            mine.map(|a| a.charged).sum::<i64>(),
        );
        total += want.1;
        assert_eq!(
            ledger_per_agent.get(id).copied().unwrap_or_default(),
            want,
            "child {c}: (charges, micros) in the ledger = acknowledged"
        );
        // And the child's Redis counter says the same.
        let spent: i64 = stack
            .policy_counters(&child_policies[c])
            .await
            .unwrap()
            .iter()
            .map(|h| h.get("s").copied().unwrap_or(0))
            .sum();
        assert_eq!(spent, want.1, "child {c}: Redis spent = acknowledged");
    }
    assert!(
        !ledger_per_agent.contains_key(&parent),
        "the parent made no calls of its own"
    );
    let parent_spent: i64 = stack
        .policy_counters(&p_parent)
        .await
        .unwrap()
        .iter()
        .map(|h| h.get("s").copied().unwrap_or(0))
        .sum();
    assert_eq!(
        parent_spent, total,
        "the parent's Redis counter = everything acknowledged"
    );
    assert!(total > 0);

    eprintln!(
        "{} charges, {total} micros, ledger = acknowledged; setup {setup:?}, whole test {:?}",
        expected.len(),
        test_start.elapsed()
    );
    drop(conn);
    drop(writer);
    stack.stop().await.unwrap();
    drop(tansu);
}
