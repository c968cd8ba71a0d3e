//! The ledger-writer (consumers/) against a real Kafka-protocol broker (tansu) and
//! a real PostgreSQL: exact ingest with redeliveries, SIGKILL crashes of the real
//! binary, poison messages to the dead-letter topic, and a database outage.
//!
//! Every test has its own broker and its own database.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use caracal_consumers::ledger;
use caracal_proto::v1::ChargeEvent;
use caracal_service_kit::dlq::DeadLetter;
use caracal_tests::{
    charges::{
        burst_charge_producer, charged, ledger_totals, numbered_charge, produce_charges, usd,
        wait_for_ledger_rows, ChargeMessage, LedgerTotals, METERING,
    },
    consumer_config::database_consumer_config,
    consumer_process::{random_ms, terminate, ConsumerProcess},
    flaky_proxy::FlakyProxy,
    kafka::{consume_all, create_topics, Tansu},
    pg_base,
    probe::{http_get, metric_value},
    TestDb,
};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

const DLQ: &str = "caracal.dlq";
const PARTITIONS: i32 = 3;

/// The tests that run several writers or 100,000 events take turns: side by side on
/// two cores, tansu's group rebalances and the ingest slow down past their bounds.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ------------------------------------------------------------------ fixtures

/// `n` numbered charges of a new run, each its own root agent's (one of `roots`,
/// in turn: keys spread over the partitions), and the sum they charge.
fn spread_charges(n: u64, roots: u64) -> (Vec<ChargeEvent>, i64) {
    let run = uuid::Uuid::new_v4().simple().to_string();
    let roots: Vec<uuid::Uuid> = (0..roots).map(|_| uuid::Uuid::new_v4()).collect();
    let events: Vec<ChargeEvent> = (0..n)
        .map(|i| {
            let root = &roots[(i % roots.len() as u64) as usize];
            numbered_charge(&run, i, root, root)
        })
        .collect();
    let sum = events.iter().map(charged).sum();
    (events, sum)
}

/// A fresh database of this test.
async fn db() -> TestDb {
    TestDb::create("ledger").await.unwrap()
}

async fn broker() -> Tansu {
    let tansu = Tansu::start_new().await.expect("tansu broker");
    create_topics(&tansu.brokers(), &[METERING, DLQ], PARTITIONS)
        .await
        .unwrap();
    tansu
}

// ------------------------------------------------------------------ a. exact ingest

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_distinct_event_lands_once_and_redeliveries_are_no_ops() {
    let tansu = broker().await;
    let db = db().await;
    let group = format!("ledger-{}", uuid::Uuid::new_v4().simple());
    let writer =
        ledger::start(database_consumer_config(&db.url, &tansu.brokers(), &group).unwrap())
            .await
            .unwrap();

    let run = uuid::Uuid::new_v4().simple().to_string();
    let roots: Vec<uuid::Uuid> = (0..5).map(|_| uuid::Uuid::new_v4()).collect();
    let agent = uuid::Uuid::new_v4();
    let mut events: Vec<ChargeEvent> = (0..2000)
        .map(|i| numbered_charge(&run, i, &agent, &roots[(i % 5) as usize]))
        .collect();
    // An event of an old month: no monthly partition exists for it, the default
    // partition takes it.
    let mut old = numbered_charge(&run, 5000, &agent, &roots[0]);
    old.occurred_at = Some(prost_types::Timestamp {
        seconds: 1_580_000_000,
        nanos: 0,
    });
    events.push(old);
    // A reservation that expired with a charge and was then settled late: both
    // rows are kept, the final-charge view takes the late settle.
    let mut expired = numbered_charge(&run, 6000, &agent, &roots[1]);
    expired.event_id = format!("{run}-6000/expire");
    expired.kind = "expire_charge".to_owned();
    expired.charged = usd(900);
    let mut late = numbered_charge(&run, 6000, &agent, &roots[1]);
    late.event_id = format!("{run}-6000/late");
    late.kind = "late_settle".to_owned();
    late.charged = usd(400);
    late.occurred_at = Some(prost_types::Timestamp {
        seconds: chrono::Utc::now().timestamp() + 1,
        nanos: 0,
    });
    events.push(expired);
    events.push(late);
    let expected_sum: i64 = events.iter().map(charged).sum();
    let distinct = events.len() as i64;

    let p = burst_charge_producer(&tansu.brokers(), 10_000).unwrap();
    let mut out: Vec<ChargeMessage> = events.iter().map(ChargeMessage::event).collect();
    // Redeliveries: every tenth event a second time (same bytes, as the relay
    // resends an entry whose delivery it could not confirm).
    out.extend(events.iter().step_by(10).map(ChargeMessage::event));
    produce_charges(&p, &out).await.unwrap();

    let t = wait_for_ledger_rows(&db.url, distinct, Duration::from_secs(60)).await;
    assert_eq!(t.rows, distinct, "every distinct event once");
    // Whatever was still in flight has had time to land twice, if it could.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t = ledger_totals(&db.url).await;
    assert_eq!(
        t,
        LedgerTotals {
            rows: distinct,
            distinct_ids: distinct,
            charged: expected_sum
        }
    );

    let mut conn = AsyncPgConnection::establish(&db.url).await.unwrap();
    #[derive(diesel::QueryableByName)]
    struct Part {
        #[diesel(sql_type = diesel::sql_types::Text)]
        part: String,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let parts: Vec<Part> = diesel::sql_query(
        "SELECT tableoid::regclass::text AS part, count(*) AS n FROM ledger_events GROUP BY 1",
    )
    .load(&mut conn)
    .await
    .unwrap();
    let in_default: i64 = parts
        .iter()
        .filter(|p| p.part == "ledger_events_default")
        .map(|p| p.n)
        .sum();
    assert_eq!(
        in_default, 1,
        "only the 2020 event is outside the monthly partitions"
    );
    let this_month = format!("ledger_events_{}", chrono::Utc::now().format("%Y_%m"));
    assert!(
        parts
            .iter()
            .any(|p| p.part == this_month && p.n >= distinct - 2),
        "current month partition holds the rest"
    );
    #[derive(diesel::QueryableByName)]
    struct Final {
        #[diesel(sql_type = diesel::sql_types::Text)]
        kind: String,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        charged_micros: i64,
    }
    let fin: Vec<Final> = diesel::sql_query(
        "SELECT kind, charged_micros FROM ledger_final_charges WHERE reservation_id = $1",
    )
    .bind::<diesel::sql_types::Text, _>(format!("{run}-6000"))
    .load(&mut conn)
    .await
    .unwrap();
    assert_eq!(fin.len(), 1);
    assert_eq!(
        (fin[0].kind.as_str(), fin[0].charged_micros),
        ("late_settle", 400)
    );

    // Probes and metrics.
    let (code, body) = http_get(writer.http_addr, "/health/ready").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(http_get(writer.http_addr, "/health/live").await.0, 200);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, metrics) = http_get(writer.http_addr, "/metrics").await;
        let processed = metric_value(
            &metrics,
            "caracal_consumer_events_processed_total",
            &["ledger-writer"],
        );
        let lags: Vec<f64> = (0..PARTITIONS)
            .filter_map(|p| {
                metric_value(
                    &metrics,
                    "kafka_consumer_lag",
                    &[
                        &format!("group=\"{group}\""),
                        &format!("partition=\"{p}\""),
                        METERING,
                    ],
                )
            })
            .collect();
        if lags.len() == PARTITIONS as usize && lags.iter().all(|l| *l == 0.0) {
            assert!(processed.unwrap_or(0.0) >= distinct as f64, "{metrics}");
            assert!(
                metrics.contains("caracal_consumer_processing_seconds_bucket"),
                "{metrics}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "lag never reached 0 on every partition: {lags:?}\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    writer.shutdown().await.unwrap();
    db.drop().await.unwrap();
}

// ------------------------------------------------------------------ c. poison

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_goes_to_the_dlq_with_its_reason_and_the_rest_arrives() {
    let tansu = broker().await;
    let db = db().await;
    // A row the database itself refuses for the row's sake (it passes validation;
    // a constraint, SQLSTATE class 23): the writer must give up on it after its
    // bounded retries, not on the batch around it. (A refusal for the database's
    // state, e.g. read-only, is retried instead: see
    // a_database_that_refuses_writes_loses_nothing_to_the_dlq.)
    caracal_service_kit::db::run_migrations(&db.url)
        .await
        .unwrap();
    let mut conn = AsyncPgConnection::establish(&db.url).await.unwrap();
    diesel::sql_query(
        "CREATE FUNCTION refuse_test_row() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF NEW.model = 'refuse-me' THEN \
           RAISE EXCEPTION 'refused by the test trigger' USING ERRCODE = 'check_violation'; END IF; \
         RETURN NEW; END $$",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    diesel::sql_query(
        "CREATE TRIGGER refuse_test_row BEFORE INSERT ON ledger_events \
         FOR EACH ROW EXECUTE FUNCTION refuse_test_row()",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let group = format!("ledger-{}", uuid::Uuid::new_v4().simple());
    let config = database_consumer_config(&db.url, &tansu.brokers(), &group).unwrap();
    let max_retries = config.consumer.max_retries;
    let writer = ledger::start(config).await.unwrap();

    let run = uuid::Uuid::new_v4().simple().to_string();
    let root = uuid::Uuid::new_v4();
    let good: Vec<ChargeEvent> = (0..300)
        .map(|i| numbered_charge(&run, i, &root, &root))
        .collect();
    let mut future_version = numbered_charge(&run, 1001, &root, &root);
    future_version.schema_version = 2;
    let mut negative = numbered_charge(&run, 1002, &root, &root);
    negative.charged = usd(-5);
    let mut no_ids = numbered_charge(&run, 1003, &root, &root);
    no_ids.event_id.clear();
    no_ids.reservation_id.clear();
    let mut refused = numbered_charge(&run, 1004, &root, &root);
    refused.model = "refuse-me".to_owned();
    let garbage = ChargeMessage {
        key: root.to_string(),
        payload: vec![0xff; 16],
        event_id: "garbage".to_owned(),
    };
    // Same key (one partition), poison in between the good ones.
    let mut out: Vec<ChargeMessage> = Vec::new();
    out.extend(good[..100].iter().map(ChargeMessage::event));
    out.push(garbage);
    out.extend(good[100..150].iter().map(ChargeMessage::event));
    out.push(ChargeMessage::event(&future_version));
    out.push(ChargeMessage::event(&negative));
    out.extend(good[150..250].iter().map(ChargeMessage::event));
    out.push(ChargeMessage::event(&no_ids));
    out.extend(good[250..280].iter().map(ChargeMessage::event));
    out.push(ChargeMessage::event(&refused));
    out.extend(good[280..].iter().map(ChargeMessage::event));
    let expected: [(usize, &str, u32); 5] = [
        (100, "not a ChargeEvent", 0),
        (151, "unknown schema version 2", 0),
        (152, "charged is out of range", 0),
        (253, "event_id is missing", 0),
        (284, "refused by the test trigger", max_retries),
    ];
    let p = burst_charge_producer(&tansu.brokers(), 10_000).unwrap();
    let coords = produce_charges(&p, &out).await.unwrap();

    let t = wait_for_ledger_rows(&db.url, good.len() as i64, Duration::from_secs(60)).await;
    assert_eq!(t.rows, 300);
    assert_eq!(t.charged, good.iter().map(charged).sum::<i64>());

    let dead = consume_all(&tansu.brokers(), DLQ, 5, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(dead.len(), 5, "exactly the five poison messages");
    let mut letters: Vec<DeadLetter> = dead
        .iter()
        .map(|(_, payload, _)| serde_json::from_slice(payload).unwrap())
        .collect();
    letters.sort_by_key(|d| d.original_offset);
    for (letter, (i, reason, retries)) in letters.iter().zip(expected) {
        assert!(
            letter.error.contains(reason),
            "{} should say {reason}",
            letter.error
        );
        assert_eq!(letter.original_topic.as_deref(), Some(METERING));
        assert_eq!(
            (letter.original_partition, letter.original_offset),
            (Some(coords[i].0), Some(coords[i].1))
        );
        assert_eq!(letter.consumer, group);
        assert_eq!(letter.retry_count, retries, "{reason}");
        assert!(letter.first_failed_at.is_some());
        let payload = DeadLetter::decode(letter.payload_base64.as_deref().unwrap()).unwrap();
        assert_eq!(payload, out[i].payload, "the original value, byte for byte");
        let key = DeadLetter::decode(letter.key_base64.as_deref().unwrap()).unwrap();
        assert_eq!(key, root.to_string().into_bytes());
        assert!(letter.headers.iter().any(|h| h.key == "schema_version"));
    }
    let (_, metrics) = http_get(writer.http_addr, "/metrics").await;
    assert!(
        metric_value(&metrics, "caracal_dlq_messages_total", &["ledger-writer"]).unwrap_or(0.0)
            >= 5.0,
        "{metrics}"
    );
    writer.shutdown().await.unwrap();
    db.drop().await.unwrap();
}

// ------------------------------------------------------------------ d. database down

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_loses_and_skips_nothing() {
    let tansu = broker().await;
    let db = db().await;
    let pg: SocketAddr = {
        let base = pg_base();
        let hostport = base
            .rsplit('@')
            .next()
            .unwrap_or("127.0.0.1:5432")
            .to_owned();
        tokio::net::lookup_host(hostport)
            .await
            .unwrap()
            .next()
            .unwrap()
    };
    let proxy = FlakyProxy::start(pg).await.unwrap();
    let proxied = format!("postgres://postgres@127.0.0.1:{}/{}", proxy.port, db.name);
    let group = format!("ledger-{}", uuid::Uuid::new_v4().simple());
    let mut config = database_consumer_config(&proxied, &tansu.brokers(), &group).unwrap();
    config.consumer.batch_size = 200;
    let writer = ledger::start(config).await.unwrap();

    let run = uuid::Uuid::new_v4().simple().to_string();
    let roots: Vec<uuid::Uuid> = (0..6).map(|_| uuid::Uuid::new_v4()).collect();
    let events: Vec<ChargeEvent> = (0..6000)
        .map(|i| numbered_charge(&run, i, &roots[(i % 6) as usize], &roots[(i % 6) as usize]))
        .collect();
    let expected_sum: i64 = events.iter().map(charged).sum();
    let p = burst_charge_producer(&tansu.brokers(), 10_000).unwrap();
    produce_charges(
        &p,
        &events[..2000]
            .iter()
            .map(ChargeMessage::event)
            .collect::<Vec<_>>(),
    )
    .await
    .unwrap();
    let t = wait_for_ledger_rows(&db.url, 2000, Duration::from_secs(60)).await;
    assert_eq!(t.rows, 2000);

    // Down for 20 s while events keep coming.
    proxy.set_down(true);
    let down_at = Instant::now();
    let mut saw_unready = false;
    let mut sent = 2000;
    while down_at.elapsed() < Duration::from_secs(20) {
        if sent < 5000 {
            produce_charges(
                &p,
                &events[sent..sent + 500]
                    .iter()
                    .map(ChargeMessage::event)
                    .collect::<Vec<_>>(),
            )
            .await
            .unwrap();
            sent += 500;
        }
        let (code, _) = http_get(writer.http_addr, "/health/ready").await;
        saw_unready |= code == 503;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let during = ledger_totals(&db.url).await;
    assert_eq!(
        during.rows, 2000,
        "nothing can be written while the database is away"
    );
    assert!(
        saw_unready,
        "readiness must drop while the writer cannot write"
    );
    proxy.set_down(false);
    produce_charges(
        &p,
        &events[sent..]
            .iter()
            .map(ChargeMessage::event)
            .collect::<Vec<_>>(),
    )
    .await
    .unwrap();

    let t = wait_for_ledger_rows(&db.url, 6000, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t2 = ledger_totals(&db.url).await;
    assert_eq!(t, t2);
    assert_eq!(
        t,
        LedgerTotals {
            rows: 6000,
            distinct_ids: 6000,
            charged: expected_sum
        },
        "nothing lost, nothing skipped, nothing twice"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, body) = http_get(writer.http_addr, "/health/ready").await;
        if code == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "ready again after the outage: {code} {body}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The outage is counted: as failed writes when a batch was in hand, and as
    // lost lease sessions (the writer stops reading while it cannot hold leases,
    // so it may have had no batch to fail).
    let (_, metrics) = http_get(writer.http_addr, "/metrics").await;
    let db_errors = metric_value(
        &metrics,
        "caracal_consumer_errors_total",
        &["ledger-writer", "kind=\"db\""],
    )
    .unwrap_or(0.0);
    let lease_errors = metric_value(
        &metrics,
        "caracal_consumer_lease_errors_total",
        &[&format!("group=\"{group}\"")],
    )
    .unwrap_or(0.0);
    assert!(lease_errors >= 1.0, "{metrics}");
    assert!(db_errors + lease_errors >= 2.0, "{metrics}");
    writer.shutdown().await.unwrap();
    drop(proxy);
    db.drop().await.unwrap();
}

// ------------------------------------------------------------------ d2. database refuses writes

/// Messages in `topic` (sum of its partitions' high watermarks).
fn topic_size(brokers: &str, topic: &str) -> i64 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    (0..PARTITIONS)
        .map(|p| {
            c.fetch_watermarks(topic, p, Duration::from_secs(10))
                .unwrap()
                .1
        })
        .sum()
}

/// Issue 22 item 3: a database that answers but refuses every write (here: a
/// read-only database, SQLSTATE 25006, as a failover to a standby or a full disk
/// gives). Before, after `maxRetries` the writer wrote the batch row by row and
/// dead-lettered every row the database refused, so the whole incident's charges
/// left the ledger (500 rows in the DLQ, 500 missing). Now it keeps retrying, not
/// ready, and writes them all once the database takes writes again; the DLQ stays
/// empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_refuses_writes_loses_nothing_to_the_dlq() {
    let tansu = broker().await;
    let db = db().await;
    caracal_service_kit::db::run_migrations(&db.url)
        .await
        .unwrap();
    let group = format!("ledger-{}", uuid::Uuid::new_v4().simple());
    let mut config = database_consumer_config(&db.url, &tansu.brokers(), &group).unwrap();
    config.consumer.batch_size = 100;
    let writer = ledger::start(config).await.unwrap();
    let (events, expected_sum) = spread_charges(1000, 6);
    let p = burst_charge_producer(&tansu.brokers(), 10_000).unwrap();
    let msgs: Vec<ChargeMessage> = events.iter().map(ChargeMessage::event).collect();
    produce_charges(&p, &msgs[..500]).await.unwrap();
    assert_eq!(
        wait_for_ledger_rows(&db.url, 500, Duration::from_secs(60))
            .await
            .rows,
        500
    );

    let mut admin = AsyncPgConnection::establish(&db.url).await.unwrap();
    let read_only = |on: bool| {
        [
            format!(
                "ALTER DATABASE \"{}\" SET default_transaction_read_only = {}",
                db.name,
                if on { "on" } else { "off" }
            ),
            // Every session of the database starts again with the new default.
            format!(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE datname = '{}' AND pid <> pg_backend_pid()",
                db.name
            ),
        ]
    };
    for q in read_only(true) {
        diesel::sql_query(q).execute(&mut admin).await.unwrap();
    }
    produce_charges(&p, &msgs[500..]).await.unwrap();
    // Well past maxRetries (3) with backoff of at most 1 s.
    let until = Instant::now() + Duration::from_secs(10);
    let mut saw_unready = false;
    while Instant::now() < until {
        saw_unready |= http_get(writer.http_addr, "/health/ready").await.0 == 503;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(saw_unready, "not ready while every write is refused");
    assert_eq!(ledger_totals(&db.url).await.rows, 500);
    assert_eq!(
        topic_size(&tansu.brokers(), DLQ),
        0,
        "a refusal for the database's state sends nothing to the dead-letter topic"
    );

    for q in read_only(false) {
        diesel::sql_query(q).execute(&mut admin).await.unwrap();
    }
    let t = wait_for_ledger_rows(&db.url, 1000, Duration::from_secs(30)).await;
    assert_eq!(
        t,
        LedgerTotals {
            rows: 1000,
            distinct_ids: 1000,
            charged: expected_sum
        }
    );
    assert_eq!(topic_size(&tansu.brokers(), DLQ), 0);
    writer.shutdown().await.unwrap();
    drop(admin);
    db.drop().await.unwrap();
}

// ------------------------------------------------------------------ b. crash

/// The real binary, as a child process of this test, with the default partition
/// assignment (PostgreSQL leases).
fn writer_process(
    db_url: &str,
    brokers: &str,
    group: &str,
    log: &std::path::Path,
) -> ConsumerProcess {
    ConsumerProcess {
        binary: env!("CARGO_BIN_EXE_consumers-under-test").into(),
        subcommand: "ledger-writer".into(),
        database_url: db_url.to_owned(),
        brokers: brokers.to_owned(),
        group: group.to_owned(),
        log: log.to_owned(),
        env: vec![("CARACAL_CONSUMER_LEASE_INTERVAL_MS".into(), "300".into())],
    }
}

/// Issue 22: the writer SIGKILLed and restarted ten times at random 1-5 s
/// intervals (two kills within one session timeout: the 4th comes 1 s after the
/// 3rd) while 100,000 charges arrive. Before partition leases, a restarted writer
/// could be given 0 partitions by the broker's group coordinator (the dead member
/// kept them) and write nothing more. Now: every event once, sum equal, within
/// 30 s of the last kill or of the last event produced, whichever is later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_ten_times_the_ledger_still_holds_every_event_once() {
    let _alone = HEAVY.lock().await;
    const N: u64 = 100_000;
    // In memory: tansu's SQLite storage takes ~1,000 messages/s on this machine.
    let tansu = Tansu::start_with_storage("memory://tansu/").await.unwrap();
    create_topics(&tansu.brokers(), &[METERING, DLQ], PARTITIONS)
        .await
        .unwrap();
    let db = db().await;
    let group = format!("ledger-{}", uuid::Uuid::new_v4().simple());
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("writer.log");

    let run = uuid::Uuid::new_v4().simple().to_string();
    let roots: Vec<uuid::Uuid> = (0..12).map(|_| uuid::Uuid::new_v4()).collect();
    let events: Vec<ChargeEvent> = (0..N)
        .map(|i| {
            numbered_charge(
                &run,
                i,
                &roots[(i % 12) as usize],
                &roots[(i % 12) as usize],
            )
        })
        .collect();
    let expected_sum: i64 = events.iter().map(charged).sum();
    let out: Vec<ChargeMessage> = events.iter().map(ChargeMessage::event).collect();
    drop(events);

    let started = Instant::now();
    let brokers = tansu.brokers();
    let producing = tokio::spawn(async move {
        // One message per record batch: tansu's in-memory storage, asked to fetch
        // from an offset inside a stored batch, answers with the next batch (the
        // rest of that batch is never delivered), so a writer restarted at a
        // committed offset inside a batch would miss events. With one-message
        // batches every offset starts a batch. (Its SQLite storage is right, but
        // takes ~1,000 messages/s here.)
        let p = burst_charge_producer(&brokers, 1).unwrap();
        // ~3,000 messages/s this way: the kills land while the writer ingests.
        for chunk in out.chunks(5_000) {
            produce_charges(&p, chunk).await.unwrap();
        }
        Instant::now()
    });

    let writer = writer_process(&db.url, &tansu.brokers(), &group, &log);
    let mut child = writer.spawn().unwrap();
    for kill in 0..10 {
        let pause = if kill == 3 {
            Duration::from_secs(1)
        } else {
            random_ms(1000, 5000)
        };
        tokio::time::sleep(pause).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let t = ledger_totals(&db.url).await;
        eprintln!("kill {kill}: {} rows after {:?}", t.rows, started.elapsed());
        child = writer.spawn().unwrap();
    }
    let last_kill = Instant::now();
    let produced = producing.await.unwrap();
    let bound = last_kill.max(produced) + Duration::from_secs(30);
    let t = wait_for_ledger_rows(
        &db.url,
        N as i64,
        bound.saturating_duration_since(Instant::now()),
    )
    .await;
    eprintln!("{} rows after {:?}", t.rows, started.elapsed());
    assert_eq!(
        t.rows,
        N as i64,
        "every event within 30 s of the last kill; log:\n{}",
        writer.log_tail(60)
    );

    // SIGTERM: the last writer commits what it wrote and exits 0.
    if let Err(e) = terminate(&mut child, Duration::from_secs(30)) {
        panic!("the writer on SIGTERM: {e}; log:\n{}", writer.log_tail(60));
    }
    let t = ledger_totals(&db.url).await;
    assert_eq!(
        t,
        LedgerTotals {
            rows: N as i64,
            distinct_ids: N as i64,
            charged: expected_sum
        },
        "log:\n{}",
        writer.log_tail(40)
    );
    db.drop().await.unwrap();
}

// ------------------------------------------------------------------ stalls are visible

/// `caracal ledger status --output json` for `group`: exit code and output.
async fn ledger_status(db_url: &str, group: &str) -> (i32, String) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = caracal_cli::run(
        [
            "caracal",
            "--output",
            "json",
            "ledger",
            "status",
            "--group",
            group,
            "--stall-seconds",
            "2",
            "--database-url",
            db_url,
        ],
        &mut out,
        &mut err,
    )
    .await;
    if code != 0 {
        eprintln!("caracal ledger status: {}", String::from_utf8_lossy(&err));
    }
    (code, String::from_utf8_lossy(&out).into_owned())
}

/// A partition no replica can read (its lease held elsewhere: here by the test's
/// own PostgreSQL session, as a hung owner would) shows: after
/// `consumer.stallSeconds` with lag and no commit, readiness drops naming it,
/// `caracal_consumer_stalled_partitions` counts it and `consumer_partitions` shows
/// the other partitions owned with their offsets. Once the lease is free, the
/// writer takes the partition within a lease tick and the ledger is complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_nobody_reads_is_reported_stalled_until_taken_over() {
    let tansu = broker().await;
    let db = db().await;
    caracal_service_kit::db::run_migrations(&db.url)
        .await
        .unwrap();
    let group = format!("ledger-{}", uuid::Uuid::new_v4().simple());
    // Hold partition 0's lease, as a replica that hangs would.
    let mut holder = AsyncPgConnection::establish(&db.url).await.unwrap();
    let ns = caracal_consumers::lease::partition_namespace(&group, METERING);
    diesel::sql_query(format!("SELECT pg_advisory_lock({ns}, 0)"))
        .execute(&mut holder)
        .await
        .unwrap();

    let mut config = database_consumer_config(&db.url, &tansu.brokers(), &group).unwrap();
    config.consumer.stall_seconds = 2;
    config.consumer.lease_interval_ms = 200;
    let writer = ledger::start(config).await.unwrap();

    // 48 roots: every partition gets some (all on two of three: (2/3)^48).
    let (events, expected_sum) = spread_charges(960, 48);
    let p = burst_charge_producer(&tansu.brokers(), 10_000).unwrap();
    produce_charges(
        &p,
        &events.iter().map(ChargeMessage::event).collect::<Vec<_>>(),
    )
    .await
    .unwrap();

    let deadline = Instant::now() + Duration::from_secs(60);
    let body = loop {
        let (code, body) = http_get(writer.http_addr, "/health/ready").await;
        if code == 503 && body.contains("stalled") {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "readiness never said stalled: {code} {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(body.contains(&format!("{METERING}/0")), "{body}");
    let (_, metrics) = http_get(writer.http_addr, "/metrics").await;
    assert_eq!(
        metric_value(
            &metrics,
            "caracal_consumer_stalled_partitions",
            &[&format!("group=\"{group}\"")]
        ),
        Some(1.0),
        "{metrics}"
    );
    let blocked = ledger_totals(&db.url).await;
    assert!(
        blocked.rows > 0 && blocked.rows < 960,
        "partitions 1 and 2 written, 0 not: {blocked:?}"
    );
    assert!(
        !body.contains(&format!("{METERING}/1")) && !body.contains(&format!("{METERING}/2")),
        "{body}"
    );
    #[derive(diesel::QueryableByName, Debug)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        kafka_partition: i32,
        #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
        owner: Option<String>,
        #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::BigInt>)]
        committed_offset: Option<i64>,
    }
    let mut conn = AsyncPgConnection::establish(&db.url).await.unwrap();
    let rows: Vec<Row> = diesel::sql_query(
        "SELECT kafka_partition, owner, committed_offset FROM consumer_partitions \
         WHERE group_id = $1 ORDER BY kafka_partition",
    )
    .bind::<diesel::sql_types::Text, _>(&group)
    .load(&mut conn)
    .await
    .unwrap();
    let owned: Vec<i32> = rows
        .iter()
        .filter(|r| r.owner.is_some())
        .map(|r| r.kafka_partition)
        .collect();
    assert_eq!(owned, vec![1, 2], "{rows:?}");
    let committed: i64 = rows.iter().filter_map(|r| r.committed_offset).sum();
    assert_eq!(
        committed, blocked.rows,
        "offsets committed = rows written: {rows:?}"
    );

    // The operator's view: `caracal ledger status` names it and exits 3.
    let (code, status) = ledger_status(&db.url, &group).await;
    assert_eq!(code, 3, "{status}");
    let doc: serde_json::Value = serde_json::from_str(&status).unwrap();
    let states: Vec<(i64, String)> = doc["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["partition"].as_i64().unwrap(),
                p["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        states,
        vec![
            (0, "STALLED".to_owned()),
            (1, "ok".to_owned()),
            (2, "ok".to_owned())
        ],
        "{status}"
    );

    // The hung owner goes away: its lease is free, the writer takes it.
    drop(holder);
    let t = wait_for_ledger_rows(&db.url, 960, Duration::from_secs(30)).await;
    assert_eq!(
        t,
        LedgerTotals {
            rows: 960,
            distinct_ids: 960,
            charged: expected_sum
        }
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, body) = http_get(writer.http_addr, "/health/ready").await;
        let (_, metrics) = http_get(writer.http_addr, "/metrics").await;
        let stalled = metric_value(
            &metrics,
            "caracal_consumer_stalled_partitions",
            &[&format!("group=\"{group}\"")],
        );
        if code == 200 && stalled == Some(0.0) && ledger_status(&db.url, &group).await.0 == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "still stalled: {code} {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    writer.shutdown().await.unwrap();
    // Shut down: its leases are given back and the table says so.
    let owners: Vec<Row> = diesel::sql_query(
        "SELECT kafka_partition, owner, committed_offset FROM consumer_partitions \
         WHERE group_id = $1 AND owner IS NOT NULL",
    )
    .bind::<diesel::sql_types::Text, _>(&group)
    .load(&mut conn)
    .await
    .unwrap();
    assert!(owners.is_empty(), "{owners:?}");
    db.drop().await.unwrap();
}

// ------------------------------------------------------------------ two replicas

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_the_partitions_and_one_hands_over_mid_ingest() {
    let _alone = HEAVY.lock().await;
    let tansu = broker().await;
    let db = db().await;
    caracal_service_kit::db::run_migrations(&db.url)
        .await
        .unwrap();
    let group = format!("ledger-{}", uuid::Uuid::new_v4().simple());
    let mut config = database_consumer_config(&db.url, &tansu.brokers(), &group).unwrap();
    config.consumer.batch_size = 100;
    config.consumer.lease_interval_ms = 300;
    let a = ledger::start(config.clone()).await.unwrap();
    let b = ledger::start(config).await.unwrap();

    let run = uuid::Uuid::new_v4().simple().to_string();
    let roots: Vec<uuid::Uuid> = (0..12).map(|_| uuid::Uuid::new_v4()).collect();
    let events: Vec<ChargeEvent> = (0..6000)
        .map(|i| {
            numbered_charge(
                &run,
                i,
                &roots[(i % 12) as usize],
                &roots[(i % 12) as usize],
            )
        })
        .collect();
    let expected_sum: i64 = events.iter().map(charged).sum();
    let out: Vec<ChargeMessage> = events.iter().map(ChargeMessage::event).collect();
    let brokers = tansu.brokers();
    let producing = tokio::spawn(async move {
        let p = burst_charge_producer(&brokers, 10_000).unwrap();
        for chunk in out.chunks(500) {
            produce_charges(&p, chunk).await.unwrap();
        }
    });
    // Both replicas must hold partitions before one leaves: 3 partitions, 2
    // replicas: 2 + 1.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let held = |c: &caracal_consumers::launch::RunningConsumer| {
            c.health.leases().map_or(0, |l| l.owned().len())
        };
        let (na, nb) = (held(&a), held(&b));
        if na + nb == PARTITIONS as usize && na > 0 && nb > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "both replicas get partitions: {na} + {nb}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mid = wait_for_ledger_rows(&db.url, 1500, Duration::from_secs(60)).await;
    assert!(mid.rows >= 1500);
    // One replica stops (SIGTERM path: finishes its batch, commits, frees its leases).
    a.shutdown().await.unwrap();
    producing.await.unwrap();
    let t = wait_for_ledger_rows(&db.url, 6000, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(t, ledger_totals(&db.url).await);
    assert_eq!(
        t,
        LedgerTotals {
            rows: 6000,
            distinct_ids: 6000,
            charged: expected_sum
        },
        "the remaining replica takes every partition over: nothing lost, nothing twice"
    );
    b.shutdown().await.unwrap();
    db.drop().await.unwrap();
}

// ------------------------------------------------------------------ two replicas, one SIGKILLed

/// Two real writer processes share the partitions through their leases. Replica
/// 0 is SIGKILLed at five random moments and restarted while 100,000 events
/// arrive: each time replica 1 takes its partitions over (the killed session's
/// locks go with it) and gives some back when it returns. Afterwards the ledger
/// holds every event exactly once, sum equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_one_sigkilled_five_times_still_every_event_once() {
    let _alone = HEAVY.lock().await;
    const N: u64 = 100_000;
    let tansu = Tansu::start_with_storage("memory://tansu/").await.unwrap();
    create_topics(&tansu.brokers(), &[METERING, DLQ], 4)
        .await
        .unwrap();
    let db = db().await;
    caracal_service_kit::db::run_migrations(&db.url)
        .await
        .unwrap();
    let group = format!("ledger-{}", uuid::Uuid::new_v4().simple());
    let dir = tempfile::tempdir().unwrap();
    let replica = |index: u32| {
        let mut p = writer_process(
            &db.url,
            &tansu.brokers(),
            &group,
            &dir.path().join(format!("writer-{index}.log")),
        );
        p.env
            .push(("CARACAL_CONSUMER_RUN_MIGRATIONS".into(), "false".into()));
        p
    };
    let (r0, r1) = (replica(0), replica(1));

    let run = uuid::Uuid::new_v4().simple().to_string();
    let roots: Vec<uuid::Uuid> = (0..16).map(|_| uuid::Uuid::new_v4()).collect();
    let events: Vec<ChargeEvent> = (0..N)
        .map(|i| {
            let root = &roots[(i % 16) as usize];
            numbered_charge(&run, i, root, root)
        })
        .collect();
    let expected_sum: i64 = events.iter().map(charged).sum();
    let out: Vec<ChargeMessage> = events.iter().map(ChargeMessage::event).collect();
    drop(events);
    let started = Instant::now();
    let brokers = tansu.brokers();
    let producing = tokio::spawn(async move {
        // One message per record batch: see the single-replica crash test.
        let p = burst_charge_producer(&brokers, 1).unwrap();
        for chunk in out.chunks(5_000) {
            produce_charges(&p, chunk).await.unwrap();
        }
    });

    let mut c1 = r1.spawn().unwrap();
    let mut c0 = r0.spawn().unwrap();
    for kill in 0..5 {
        tokio::time::sleep(random_ms(1500, 4000)).await;
        c0.kill().unwrap(); // SIGKILL
        c0.wait().unwrap();
        let t = ledger_totals(&db.url).await;
        eprintln!("kill {kill}: {} rows after {:?}", t.rows, started.elapsed());
        c0 = r0.spawn().unwrap();
    }
    producing.await.unwrap();
    let t = wait_for_ledger_rows(&db.url, N as i64, Duration::from_secs(120)).await;
    eprintln!("{} rows after {:?}", t.rows, started.elapsed());
    for (c, r) in [(&mut c0, &r0), (&mut c1, &r1)] {
        if let Err(e) = terminate(c, Duration::from_secs(30)) {
            panic!("a replica on SIGTERM: {e}; log:\n{}", r.log_tail(60));
        }
    }
    assert_eq!(
        ledger_totals(&db.url).await,
        LedgerTotals {
            rows: N as i64,
            distinct_ids: N as i64,
            charged: expected_sum
        },
        "log of the killed replica:\n{}",
        r0.log_tail(40)
    );
    db.drop().await.unwrap();
}
