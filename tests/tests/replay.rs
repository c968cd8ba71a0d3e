//! `caracal replay start|status|validate` (issue 23 item 4), run as the operator
//! runs the CLI, against real tansu brokers and a fresh PostgreSQL ledger.
//!
//! - A time range replays exactly its events; the whole topic then fills the
//!   ledger, once: a second replay writes nothing; `validate` says what is
//!   missing before and nothing after; `status` lists the runs.
//! - A time with no event after it is an error, not a replay from offset 0.
//! - Another region's mirrored topic (`<region>.caracal.metering.events`, as
//!   MirrorMaker 2 names it) on a second broker fills a fresh ledger exactly once.

use std::time::Duration;

use caracal_proto::v1::ChargeEvent;
use caracal_tests::{
    charges::{
        charge_producer, charged, ledger_totals, numbered_charge, produce_charges_to,
        ChargeMessage, METERING,
    },
    kafka::{create_topics, Tansu},
    TestDb,
};
use chrono::{DateTime, Utc};

struct Run {
    code: i32,
    out: String,
    err: String,
}

/// The CLI with `args`, the ledger at `db`, Kafka at `brokers` (as the consumers'
/// environment names them).
async fn caracal(db: &str, brokers: &str, args: &[&str]) -> Run {
    let (db, brokers) = (db.to_owned(), brokers.to_owned());
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_caracal-under-test"))
            .args(&args)
            .env("CARACAL_DATABASE_URL", db)
            .env("CARACAL_KAFKA_BROKERS", brokers)
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    Run {
        code: output.status.code().unwrap_or(-1),
        out: String::from_utf8_lossy(&output.stdout).into_owned(),
        err: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn ok(run: &Run) -> serde_json::Value {
    assert_eq!(run.code, 0, "stdout: {}\nstderr: {}", run.out, run.err);
    serde_json::from_str(&run.out).unwrap_or(serde_json::Value::Null)
}

/// The ledger's rows and charged sum.
async fn ledger(db: &str) -> (i64, i64) {
    let t = ledger_totals(db).await;
    (t.rows, t.charged)
}

/// `n` numbered charge events of a run of their own, produced to `topic`.
async fn produce(brokers: &str, topic: &str, from: u64, n: u64) -> Vec<ChargeEvent> {
    let run = uuid::Uuid::new_v4().simple().to_string();
    let agents: Vec<uuid::Uuid> = (0..5).map(|_| uuid::Uuid::new_v4()).collect();
    let events: Vec<ChargeEvent> = (from..from + n)
        .map(|i| {
            let a = &agents[(i % 5) as usize];
            numbered_charge(&run, i, a, a)
        })
        .collect();
    let msgs: Vec<ChargeMessage> = events.iter().map(ChargeMessage::event).collect();
    let producer = charge_producer(brokers).unwrap();
    produce_charges_to(&producer, topic, &msgs).await.unwrap();
    events
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_time_range_replays_into_the_ledger_once_and_validate_says_what_is_missing() {
    let tansu = Tansu::start_new().await.unwrap();
    let brokers = tansu.brokers();
    create_topics(&brokers, &[METERING], 3).await.unwrap();
    let db = TestDb::create("replay").await.unwrap();
    caracal_service_kit::db::run_migrations(&db.url)
        .await
        .unwrap();

    let start = Utc::now() - chrono::Duration::seconds(1);
    let first = produce(&brokers, METERING, 0, 100).await;
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let middle = Utc::now();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = produce(&brokers, METERING, 100, 200).await;
    let first_sum: i64 = first.iter().map(charged).sum();
    let all_sum: i64 = first_sum + second.iter().map(charged).sum::<i64>();
    let (from, mid) = (rfc3339(start), rfc3339(middle));

    // Before: the ledger lacks all 300.
    let missing = caracal(
        &db.url,
        &brokers,
        &[
            "--output",
            "json",
            "replay",
            "validate",
            "--from-timestamp",
            &from,
        ],
    )
    .await;
    assert_eq!(missing.code, 3, "{}\n{}", missing.out, missing.err);
    assert!(missing.err.contains("300 event(s)"), "{}", missing.err);

    // The first range alone.
    let part = ok(&caracal(
        &db.url,
        &brokers,
        &[
            "--output",
            "json",
            "replay",
            "start",
            "--from-timestamp",
            &from,
            "--to",
            &mid,
        ],
    )
    .await);
    assert_eq!(part["read"], 100, "{part}");
    assert_eq!(part["missing_from_ledger"], 100, "{part}");
    assert_eq!(ledger(&db.url).await, (100, first_sum));

    // Everything from the start: the other 200, once.
    let rest = ok(&caracal(
        &db.url,
        &brokers,
        &[
            "--output",
            "json",
            "replay",
            "start",
            "--from-timestamp",
            &from,
        ],
    )
    .await);
    assert_eq!(
        (rest["read"].clone(), rest["missing_from_ledger"].clone()),
        (300.into(), 200.into())
    );
    assert_eq!(ledger(&db.url).await, (300, all_sum));
    // Again: nothing changes.
    let again = ok(&caracal(
        &db.url,
        &brokers,
        &[
            "--output",
            "json",
            "replay",
            "start",
            "--from-timestamp",
            &from,
        ],
    )
    .await);
    assert_eq!(again["missing_from_ledger"], 0, "{again}");
    assert_eq!(ledger(&db.url).await, (300, all_sum));
    ok(&caracal(
        &db.url,
        &brokers,
        &["replay", "validate", "--from-timestamp", &from],
    )
    .await);

    let status = ok(&caracal(&db.url, &brokers, &["--output", "json", "replay", "status"]).await);
    let runs = status.as_array().unwrap();
    assert_eq!(runs.len(), 3, "{status}");
    assert!(runs.iter().all(|r| r["state"] == "done"), "{status}");
    assert_eq!(runs[0]["written"], 0);
    assert_eq!(runs[1]["written"], 200);
    assert_eq!(runs[2]["written"], 100);

    // No event at or after the time: an error that says so, nothing written.
    let future = rfc3339(Utc::now() + chrono::Duration::hours(1));
    let none = caracal(
        &db.url,
        &brokers,
        &["replay", "start", "--from-timestamp", &future],
    )
    .await;
    assert_eq!(none.code, 1, "{}\n{}", none.out, none.err);
    assert!(none.err.contains("no event of"), "{}", none.err);
    let failed = ok(&caracal(&db.url, &brokers, &["--output", "json", "replay", "status"]).await);
    assert_eq!(failed[0]["state"], "failed", "{failed}");
    let snapshot = caracal(
        &db.url,
        &brokers,
        &[
            "replay",
            "start",
            "--from-snapshot",
            "snapshot-20260203-000000",
        ],
    )
    .await;
    assert_eq!(snapshot.code, 1);
    assert!(
        snapshot
            .err
            .contains("no snapshot snapshot-20260203-000000"),
        "{}",
        snapshot.err
    );
    assert_eq!(ledger(&db.url).await, (300, all_sum));
    db.drop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_regions_mirrored_topic_fills_a_fresh_ledger_exactly_once() {
    // The local cluster, and the backup cluster holding us-east-1's mirrored topic.
    let local = Tansu::start_new().await.unwrap();
    let backup = Tansu::start_new().await.unwrap();
    let mirrored = format!("us-east-1.{METERING}");
    create_topics(&local.brokers(), &[METERING], 2)
        .await
        .unwrap();
    create_topics(&backup.brokers(), &[mirrored.as_str()], 3)
        .await
        .unwrap();
    let start = rfc3339(Utc::now() - chrono::Duration::seconds(1));
    let events = produce(&backup.brokers(), &mirrored, 0, 150).await;
    // Something else on the local cluster's own topic: not read.
    produce(&local.brokers(), METERING, 1_000, 20).await;
    let sum: i64 = events.iter().map(charged).sum();
    let db = TestDb::create("replay").await.unwrap();
    caracal_service_kit::db::run_migrations(&db.url)
        .await
        .unwrap();

    let args = [
        "--output",
        "json",
        "replay",
        "start",
        "--from-region",
        "us-east-1",
        "--brokers",
        &backup.brokers(),
        "--from-timestamp",
        &start,
    ];
    let first = ok(&caracal(&db.url, &local.brokers(), &args).await);
    assert_eq!(first["topic"], mirrored.as_str());
    assert_eq!(first["missing_from_ledger"], 150, "{first}");
    assert_eq!(ledger(&db.url).await, (150, sum));
    let second = ok(&caracal(&db.url, &local.brokers(), &args).await);
    assert_eq!(second["missing_from_ledger"], 0, "{second}");
    assert_eq!(ledger(&db.url).await, (150, sum));
    db.drop().await.unwrap();
}
