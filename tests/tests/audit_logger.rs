//! The audit-logger (consumers/src/audit.rs) against a real Kafka-protocol broker
//! (tansu) and a real PostgreSQL: every message of the four topics lands once,
//! byte for byte, also when the group re-reads everything; the table refuses
//! UPDATE, DELETE and TRUNCATE; the retention job deletes exactly the expired rows.
//!
//! Every test has its own database (and broker).

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use caracal_consumers::{audit, config::ConsumerConfig};
use caracal_tests::{
    consumer_config::database_consumer_config,
    kafka::{create_topics, Tansu},
    probe::http_get,
    TestDb,
};
use diesel::sql_types::{BigInt, Bytea, Integer, Nullable, Text, Timestamptz};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use rdkafka::{
    consumer::{BaseConsumer, CommitMode, Consumer},
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
    ClientConfig, Offset, TopicPartitionList,
};

const TOPICS: [&str; 4] = [
    "caracal.metering.events",
    "caracal.policy.decisions",
    "caracal.agent.lifecycle",
    "caracal.policy.changes",
];
const DLQ: &str = "caracal.dlq";
const PARTITIONS: i32 = 2;

// ------------------------------------------------------------------ fixtures

/// A fresh database of this test.
async fn db() -> TestDb {
    TestDb::create("audit").await.unwrap()
}

/// A database with the migrations applied (what the logger does at start).
async fn migrated_db() -> TestDb {
    let db = db().await;
    caracal_service_kit::db::run_migrations(&db.url)
        .await
        .unwrap();
    db
}

/// The audit-logger's configuration: small batches, so a few hundred messages
/// make several transactions.
fn config(db_url: &str, brokers: &str, group: &str) -> ConsumerConfig {
    let mut c = database_consumer_config(db_url, brokers, group).unwrap();
    c.consumer.batch_size = 64;
    c
}

#[derive(diesel::QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

async fn count(url: &str) -> i64 {
    let Ok(mut conn) = AsyncPgConnection::establish(url).await else {
        return 0;
    };
    diesel::sql_query("SELECT count(*) AS n FROM audit_logs")
        .get_result::<Count>(&mut conn)
        .await
        .map_or(0, |c| c.n)
}

async fn wait_for_rows(url: &str, rows: i64, timeout: Duration) -> i64 {
    let deadline = Instant::now() + timeout;
    loop {
        let n = count(url).await;
        if n >= rows || Instant::now() >= deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What was produced: key, payload, event_type, event_id.
type Sent = (Option<Vec<u8>>, Vec<u8>, Option<String>, Option<String>);

/// The group's committed offset per (topic, partition) (`None`: nothing committed).
fn committed(brokers: &str, group: &str) -> BTreeMap<(String, i32), Option<i64>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for t in TOPICS {
        for p in 0..PARTITIONS {
            tpl.add_partition(t, p);
        }
    }
    let got = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap();
    got.elements()
        .iter()
        .map(|e| {
            let off = match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            };
            ((e.topic().to_owned(), e.partition()), off)
        })
        .collect()
}

// ------------------------------------------------------------------ a. every message once

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_of_every_topic_lands_once_byte_for_byte_even_when_reread() {
    let tansu = Tansu::start_new().await.expect("tansu broker");
    let brokers = tansu.brokers();
    let mut all: Vec<&str> = TOPICS.to_vec();
    all.push(DLQ);
    create_topics(&brokers, &all, PARTITIONS).await.unwrap();
    let db = db().await;
    let group = format!("audit-{}", uuid::Uuid::new_v4().simple());

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("acks", "all")
        .set("linger.ms", "5")
        .create()
        .unwrap();
    // 80 messages per topic (the last 10 of each resend earlier payloads, as a
    // relay resends what it could not confirm: new offsets, so new rows); binary
    // payloads, some without key or event headers.
    let mut futures = Vec::new();
    let mut sent_meta: Vec<(String, Sent)> = Vec::new();
    for (ti, topic) in TOPICS.iter().enumerate() {
        for i in 0..80u32 {
            let j = if i >= 70 { i - 70 } else { i };
            let payload: Vec<u8> = (0..(j % 50 + 1))
                .map(|b| u8::try_from((b * 31 + j * 7 + ti as u32) % 256).unwrap())
                .chain([0u8, 0xff])
                .collect();
            let key = (j % 4 != 0).then(|| format!("key-{ti}-{j}").into_bytes());
            let with_headers = j % 3 != 0;
            let event_type = with_headers.then(|| format!("type-{ti}"));
            let event_id = with_headers.then(|| format!("{topic}/{j}"));
            let mut headers = OwnedHeaders::new_with_capacity(3);
            if let (Some(t), Some(id)) = (&event_type, &event_id) {
                headers = headers
                    .insert(Header {
                        key: "event_type",
                        value: Some(t.as_str()),
                    })
                    .insert(Header {
                        key: "event_id",
                        value: Some(id.as_str()),
                    });
            }
            headers = headers.insert(Header {
                key: "schema_version",
                value: Some("1"),
            });
            let mut record = FutureRecord::to(topic)
                .payload(payload.as_slice())
                .headers(headers);
            if let Some(k) = &key {
                record = record.key(k.as_slice());
            }
            match producer.send_result(record) {
                Ok(f) => futures.push(f),
                Err((e, _)) => panic!("producer refused a message: {e}"),
            }
            sent_meta.push((topic.to_string(), (key, payload, event_type, event_id)));
        }
    }
    // Dead letters are not audited (they copy messages logged from their topic).
    for i in 0..10 {
        let payload = format!("{{\"dead\":{i}}}");
        let f = producer
            .send_result(FutureRecord::<(), _>::to(DLQ).payload(payload.as_str()))
            .map_err(|(e, _)| e)
            .unwrap();
        futures.push(f);
    }
    let deliveries: Vec<(i32, i64)> = futures::future::join_all(futures)
        .await
        .into_iter()
        .map(|r| {
            let d = r.expect("delivery canceled").expect("delivery failed");
            (d.partition, d.offset)
        })
        .collect();
    let mut expected: BTreeMap<(String, i32, i64), Sent> = BTreeMap::new();
    for ((topic, sent), (p, o)) in sent_meta.into_iter().zip(deliveries.iter()) {
        assert!(
            expected.insert((topic, *p, *o), sent).is_none(),
            "unique positions"
        );
    }
    let total = i64::try_from(expected.len()).unwrap();
    assert_eq!(total, 320);

    // First pass.
    let logger = audit::start(config(&db.url, &brokers, &group))
        .await
        .unwrap();
    assert_eq!(
        wait_for_rows(&db.url, total, Duration::from_secs(60)).await,
        total
    );
    let (code, body) = http_get(logger.http_addr, "/health/ready").await;
    assert_eq!(code, 200, "{body}");
    let (_, metrics) = http_get(logger.http_addr, "/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("caracal_consumer_events_processed_total")
                && l.contains("audit-logger")),
        "processed metric with consumer=audit-logger"
    );
    logger.shutdown().await.unwrap();
    let before = committed(&brokers, &group);
    assert_eq!(
        before.values().filter_map(|o| *o).sum::<i64>(),
        total,
        "the first pass committed every message: {before:?}"
    );

    // Rewind the group to the beginning of every partition: the same group then
    // reads every message a second time.
    {
        let rewinder: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for t in TOPICS {
            for p in 0..PARTITIONS {
                tpl.add_partition_offset(t, p, Offset::Offset(0)).unwrap();
            }
        }
        rewinder.commit(&tpl, CommitMode::Sync).unwrap();
    }
    let rewound = committed(&brokers, &group);
    assert!(
        rewound.values().all(|o| *o == Some(0)),
        "rewound: {rewound:?}"
    );
    let logger = audit::start(config(&db.url, &brokers, &group))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if committed(&brokers, &group) == before || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(
        committed(&brokers, &group),
        before,
        "the second pass re-read every message"
    );
    logger.shutdown().await.unwrap();

    // Exactly one row per message, byte for byte.
    #[derive(diesel::QueryableByName)]
    struct Row {
        #[diesel(sql_type = Text)]
        topic: String,
        #[diesel(sql_type = Integer)]
        partition: i32,
        #[diesel(sql_type = BigInt)]
        kafka_offset: i64,
        #[diesel(sql_type = Nullable<Bytea>)]
        key: Option<Vec<u8>>,
        #[diesel(sql_type = Nullable<Bytea>)]
        payload: Option<Vec<u8>>,
        #[diesel(sql_type = Nullable<Text>)]
        event_type: Option<String>,
        #[diesel(sql_type = Nullable<Text>)]
        event_id: Option<String>,
        #[diesel(sql_type = BigInt)]
        age_s: i64,
        #[diesel(sql_type = BigInt)]
        headers: i64,
    }
    let mut conn = AsyncPgConnection::establish(&db.url).await.unwrap();
    let rows: Vec<Row> = diesel::sql_query(
        "SELECT topic, \"partition\", kafka_offset, key, payload, event_type, event_id, \
         extract(epoch FROM now() - occurred_at)::int8 AS age_s, \
         jsonb_array_length(headers)::int8 AS headers FROM audit_logs",
    )
    .load(&mut conn)
    .await
    .unwrap();
    assert_eq!(rows.len(), expected.len(), "one row per message, no more");
    let mut got: BTreeMap<(String, i32, i64), Sent> = BTreeMap::new();
    for r in rows {
        assert!(
            (0..300).contains(&r.age_s),
            "occurred_at is the message time"
        );
        let n_headers = if r.event_id.is_some() { 3 } else { 1 };
        assert_eq!(r.headers, n_headers);
        got.insert(
            (r.topic, r.partition, r.kafka_offset),
            (
                r.key,
                r.payload.unwrap_or_default(),
                r.event_type,
                r.event_id,
            ),
        );
    }
    assert!(got == expected, "rows differ from the produced messages");
    db.drop().await.unwrap();
}

// ------------------------------------------------------------------ b. append-only

#[tokio::test]
async fn update_delete_and_truncate_are_refused() {
    let db = migrated_db().await;
    let mut conn = AsyncPgConnection::establish(&db.url).await.unwrap();
    diesel::sql_query(
        "INSERT INTO audit_logs (topic, \"partition\", kafka_offset, payload, occurred_at) \
         VALUES ('t', 0, 0, '\\x01'::bytea, now()), ('t', 0, 1, '\\x02'::bytea, now())",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    for (what, sql) in [
        ("UPDATE", "UPDATE audit_logs SET payload = '\\x03'::bytea"),
        ("DELETE", "DELETE FROM audit_logs WHERE kafka_offset = 0"),
        ("TRUNCATE", "TRUNCATE audit_logs"),
    ] {
        let err = diesel::sql_query(sql).execute(&mut conn).await.unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("audit_logs is append-only: {what} refused")),
            "{what}: {err}"
        );
    }
    // The retention flag allows DELETE only: an UPDATE stays refused.
    conn.batch_execute("BEGIN; SET LOCAL caracal.audit_retention = 'on'")
        .await
        .unwrap();
    let err = diesel::sql_query("UPDATE audit_logs SET topic = 'x'")
        .execute(&mut conn)
        .await
        .unwrap_err();
    conn.batch_execute("ROLLBACK").await.unwrap();
    assert!(err.to_string().contains("UPDATE refused"), "{err}");
    // The flag is transaction-local: it does not leak into the session.
    let err = diesel::sql_query("DELETE FROM audit_logs")
        .execute(&mut conn)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("DELETE refused"), "{err}");
    assert_eq!(count(&db.url).await, 2);
    #[derive(diesel::QueryableByName)]
    struct P {
        #[diesel(sql_type = Bytea)]
        payload: Vec<u8>,
    }
    let p: Vec<P> = diesel::sql_query("SELECT payload FROM audit_logs ORDER BY kafka_offset")
        .load(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        p.into_iter().map(|p| p.payload).collect::<Vec<_>>(),
        vec![vec![1u8], vec![2u8]]
    );
    drop(conn);
    db.drop().await.unwrap();
}

// ------------------------------------------------------------------ c. retention

#[tokio::test]
async fn retention_deletes_exactly_the_expired_rows_in_batches() {
    let db = migrated_db().await;
    let mut conn = AsyncPgConnection::establish(&db.url).await.unwrap();
    let now = chrono::Utc::now();
    // 43 expired (31..=73 days old), 26 kept (0..=25 days old) plus one at 29 days.
    let mut ages: Vec<(i64, bool)> = (31..=73).map(|d| (d, true)).collect();
    ages.extend((0..=25).map(|d| (d, false)));
    ages.push((29, false));
    for (i, (days, _)) in ages.iter().enumerate() {
        diesel::sql_query(
            "INSERT INTO audit_logs (topic, \"partition\", kafka_offset, payload, occurred_at) \
             VALUES ('caracal.policy.decisions', 0, $1, '\\x00'::bytea, $2)",
        )
        .bind::<BigInt, _>(i64::try_from(i).unwrap())
        .bind::<Timestamptz, _>(now - chrono::Duration::days(*days))
        .execute(&mut conn)
        .await
        .unwrap();
    }
    let expired = ages.iter().filter(|(_, e)| *e).count() as u64;
    let kept = ages.len() as i64 - expired as i64;
    assert_eq!((expired, kept), (43, 27));

    // The `audit-retention` subcommand's path, 7 rows per transaction.
    let mut c = config(&db.url, "127.0.0.1:1", "unused");
    c.audit.retention_days = 30;
    c.audit.retention_batch = 7;
    let deleted = audit::retention_once(&c).await.unwrap();
    assert_eq!(deleted, expired);
    assert_eq!(count(&db.url).await, kept);
    let oldest: Count = diesel::sql_query(
        "SELECT coalesce(max(extract(epoch FROM now() - occurred_at)), 0)::int8 / 86400 AS n \
         FROM audit_logs",
    )
    .get_result(&mut conn)
    .await
    .unwrap();
    assert_eq!(oldest.n, 29, "the 29-day-old row is kept");
    // Nothing left to delete; a second run is a no-op.
    assert_eq!(audit::retention_once(&c).await.unwrap(), 0);
    assert_eq!(count(&db.url).await, kept);
    // The job's flag did not leave the retention transactions: a normal delete
    // is still refused.
    assert!(diesel::sql_query("DELETE FROM audit_logs")
        .execute(&mut conn)
        .await
        .is_err());
    drop(conn);
    db.drop().await.unwrap();
}

// ------------------------------------------------------------------ d. export

async fn cli(args: &[&str]) -> (i32, String, String) {
    let mut out = Vec::new();
    let mut err = Vec::new();
    let code = caracal_cli::run(args.iter().copied(), &mut out, &mut err).await;
    (
        code,
        String::from_utf8(out).unwrap(),
        String::from_utf8(err).unwrap(),
    )
}

#[tokio::test]
async fn export_writes_the_range_as_json_and_rfc5424_lines() {
    let db = migrated_db().await;
    let mut conn = AsyncPgConnection::establish(&db.url).await.unwrap();
    let day = |d: u32| {
        chrono::NaiveDate::from_ymd_opt(2026, 2, d)
            .unwrap()
            .and_hms_opt(12, 0, 0)
            .unwrap()
            .and_utc()
    };
    // Feb 1..=5 at noon, 3 rows a day (offsets 3d+i); the export takes Feb 2 and 3.
    for d in 1..=5u32 {
        for i in 0..3i64 {
            diesel::sql_query(
                "INSERT INTO audit_logs (topic, \"partition\", kafka_offset, key, headers, \
                 payload, event_type, event_id, occurred_at) \
                 VALUES ('caracal.policy.changes', 0, $1, NULL, \
                 '[{\"key\":\"event_type\",\"value\":\"policy_updated\"}]', $2, \
                 'policy_updated', $3, $4)",
            )
            .bind::<BigInt, _>(i64::from(d) * 3 + i)
            .bind::<Bytea, _>(vec![
                u8::try_from(d).unwrap(),
                0xff,
                u8::try_from(i).unwrap(),
            ])
            .bind::<Text, _>(format!("ev-{d}-{i}"))
            .bind::<Timestamptz, _>(day(d) + chrono::Duration::minutes(i))
            .execute(&mut conn)
            .await
            .unwrap();
        }
    }
    let (code, out, err) = cli(&[
        "caracal",
        "audit",
        "export",
        "--database-url",
        &db.url,
        "--start",
        "2026-02-02",
        "--end",
        "2026-02-04",
        "--format",
        "json",
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ids: Vec<&str> = lines
        .iter()
        .map(|v| v["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        ["ev-2-0", "ev-2-1", "ev-2-2", "ev-3-0", "ev-3-1", "ev-3-2"]
    );
    assert_eq!(lines[4]["payload_hex"], "03ff01");
    assert_eq!(lines[4]["offset"], 10);
    assert_eq!(lines[4]["headers"][0]["value"], "policy_updated");

    let file = std::env::temp_dir().join(format!("audit-{}.log", uuid::Uuid::new_v4().simple()));
    let path = file.to_str().unwrap().to_owned();
    let (code, out, err) = cli(&[
        "caracal",
        "audit",
        "export",
        "--database-url",
        &db.url,
        "--start",
        "2026-02-05T00:00:00Z",
        "--end",
        "2026-02-06",
        "--format",
        "syslog",
        "--file",
        &path,
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.is_empty(), "{out}");
    let text = std::fs::read_to_string(&file).unwrap();
    let _ = std::fs::remove_file(&file);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(
        lines[1].starts_with("<110>1 2026-02-05T12:01:00.000000Z "),
        "{}",
        lines[1]
    );
    assert!(
        lines[1].contains(
            " caracal - policy_updated [caracal@32473 topic=\"caracal.policy.changes\" \
             partition=\"0\" offset=\"16\" event_id=\"ev-5-1\"] \u{feff}{"
        ),
        "{}",
        lines[1]
    );
    // To a syslog server: UDP, one datagram per record.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let udp_url = format!("udp://{}", udp.local_addr().unwrap());
    let (code, _, err) = cli(&[
        "caracal",
        "audit",
        "export",
        "--database-url",
        &db.url,
        "--start",
        "2026-02-05",
        "--end",
        "2026-02-06",
        "--format",
        "syslog",
        "--syslog-server",
        &udp_url,
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    let mut buf = vec![0u8; 70_000];
    let mut datagrams = Vec::new();
    for _ in 0..3 {
        let n = udp.recv(&mut buf).unwrap();
        datagrams.push(String::from_utf8(buf[..n].to_vec()).unwrap());
    }
    assert_eq!(datagrams, lines, "the same lines, one per datagram");
    // TCP, octet counting (RFC 6587): "LEN SP MSG" per record.
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let tcp_url = format!("tcp://{}", tcp.local_addr().unwrap());
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        let (mut s, _) = tcp.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut all = Vec::new();
        s.read_to_end(&mut all).unwrap();
        all
    });
    let (code, _, err) = cli(&[
        "caracal",
        "audit",
        "export",
        "--database-url",
        &db.url,
        "--start",
        "2026-02-05",
        "--end",
        "2026-02-06",
        "--format",
        "syslog",
        "--syslog-server",
        &tcp_url,
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    let stream = String::from_utf8(reader.join().unwrap()).unwrap();
    let mut rest = stream.as_str();
    let mut frames = Vec::new();
    while !rest.is_empty() {
        let (len, tail) = rest.split_once(' ').unwrap();
        let len: usize = len.parse().unwrap();
        frames.push(tail[..len].to_owned());
        rest = &tail[len..];
    }
    assert_eq!(frames, lines, "the same lines, octet-counted");
    let (code, _, err) = cli(&[
        "caracal",
        "audit",
        "export",
        "--database-url",
        &db.url,
        "--start",
        "2026-02-05",
        "--end",
        "2026-02-06",
        "--format",
        "json",
        "--syslog-server",
        &udp_url,
    ])
    .await;
    assert_eq!(code, 1);
    assert!(err.contains("needs --format syslog"), "{err}");
    // The export session is read-only and the range must make sense.
    let (code, _, err) = cli(&[
        "caracal",
        "audit",
        "export",
        "--database-url",
        &db.url,
        "--start",
        "2026-02-05",
        "--end",
        "2026-02-05",
    ])
    .await;
    assert_eq!(code, 1);
    assert!(err.contains("--end must be after --start"), "{err}");
    assert_eq!(count(&db.url).await, 15);
    drop(conn);
    db.drop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_logger_runs_retention_at_start() {
    let db = migrated_db().await;
    let mut conn = AsyncPgConnection::establish(&db.url).await.unwrap();
    let now = chrono::Utc::now();
    for (offset, days) in [(0i64, 45i64), (1, 31), (2, 10)] {
        diesel::sql_query(
            "INSERT INTO audit_logs (topic, \"partition\", kafka_offset, occurred_at) \
             VALUES ('caracal.agent.lifecycle', 0, $1, $2)",
        )
        .bind::<BigInt, _>(offset)
        .bind::<Timestamptz, _>(now - chrono::Duration::days(days))
        .execute(&mut conn)
        .await
        .unwrap();
    }
    // No broker is needed for the retention job (the consumer keeps retrying Kafka).
    let mut c = config(&db.url, "127.0.0.1:1", "audit-retention-at-start");
    c.audit.retention_days = 30;
    let logger = audit::start(c).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while count(&db.url).await != 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(count(&db.url).await, 1, "only the 10-day-old row is kept");
    logger.shutdown().await.unwrap();
    drop(conn);
    db.drop().await.unwrap();
}

// ------------------------------------------------------------------ crash

#[derive(diesel::QueryableByName, Debug, PartialEq, Eq)]
struct AuditTotals {
    #[diesel(sql_type = BigInt)]
    rows: i64,
    #[diesel(sql_type = BigInt)]
    messages: i64,
    #[diesel(sql_type = BigInt)]
    event_ids: i64,
    #[diesel(sql_type = BigInt)]
    payload_bytes: i64,
}

async fn audit_totals(url: &str) -> AuditTotals {
    let mut conn = AsyncPgConnection::establish(url).await.unwrap();
    diesel::sql_query(
        "SELECT count(*) AS rows, \
           count(DISTINCT (topic, \"partition\", kafka_offset)) AS messages, \
           count(DISTINCT event_id) AS event_ids, \
           coalesce(sum(length(payload)), 0)::int8 AS payload_bytes \
         FROM audit_logs",
    )
    .get_result(&mut conn)
    .await
    .unwrap()
}

/// The real audit-logger binary SIGKILLed at five random moments while 100,000
/// messages arrive on the four topics: afterwards every message is in the audit
/// trail exactly once (by topic/partition/offset and by event id), and SIGTERM
/// ends the last process with exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_five_times_the_audit_trail_still_holds_every_message_once() {
    use caracal_tests::consumer_process::{random_ms, terminate, ConsumerProcess};
    const N: usize = 100_000;
    // In memory with one-message record batches: see the ledger-writer's crash test
    // (tansu 0.6's memory storage skips the rest of a batch fetched from inside it).
    let tansu = Tansu::start_with_storage("memory://tansu/").await.unwrap();
    let brokers = tansu.brokers();
    let mut all: Vec<&str> = TOPICS.to_vec();
    all.push(DLQ);
    create_topics(&brokers, &all, PARTITIONS).await.unwrap();
    let db = migrated_db().await;
    let group = format!("audit-{}", uuid::Uuid::new_v4().simple());
    let dir = tempfile::tempdir().unwrap();
    let logger = ConsumerProcess {
        binary: env!("CARGO_BIN_EXE_consumers-under-test").into(),
        subcommand: "audit-logger".into(),
        database_url: db.url.clone(),
        brokers: brokers.clone(),
        group,
        log: dir.path().join("audit.log"),
        env: vec![
            ("CARACAL_CONSUMER_ASSIGN_ALL".into(), "true".into()),
            ("CARACAL_CONSUMER_RUN_MIGRATIONS".into(), "false".into()),
        ],
    };

    let payload_bytes: i64 = (0..N).map(|i| (i % 40 + 10) as i64).sum();
    let b = brokers.clone();
    let started = Instant::now();
    let producing = tokio::spawn(async move {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &b)
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("batch.num.messages", "1")
            .set("queue.buffering.max.messages", "1000000")
            .create()
            .unwrap();
        for chunk in (0..N).collect::<Vec<_>>().chunks(5_000) {
            let mut futures = Vec::with_capacity(chunk.len());
            for &i in chunk {
                let payload: Vec<u8> = (0..(i % 40 + 10)).map(|b| (b ^ i) as u8).collect();
                let id = format!("crash-{i}");
                let headers = OwnedHeaders::new_with_capacity(2)
                    .insert(Header {
                        key: "event_id",
                        value: Some(id.as_str()),
                    })
                    .insert(Header {
                        key: "event_type",
                        value: Some("crash-test"),
                    });
                let key = format!("agent-{}", i % 16);
                let record = FutureRecord::to(TOPICS[i % TOPICS.len()])
                    .key(key.as_str())
                    .payload(payload.as_slice())
                    .headers(headers);
                match producer.send_result(record) {
                    Ok(f) => futures.push(f),
                    Err((e, _)) => panic!("producer refused a message: {e}"),
                }
            }
            for d in futures::future::join_all(futures).await {
                d.expect("delivery canceled").expect("delivery failed");
            }
        }
    });

    let mut child = logger.spawn().unwrap();
    for kill in 0..5 {
        tokio::time::sleep(random_ms(1500, 4000)).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        eprintln!(
            "kill {kill}: {} rows after {:?}",
            count(&db.url).await,
            started.elapsed()
        );
        child = logger.spawn().unwrap();
    }
    producing.await.unwrap();
    let rows = wait_for_rows(&db.url, N as i64, Duration::from_secs(180)).await;
    eprintln!("{rows} rows after {:?}", started.elapsed());
    if let Err(e) = terminate(&mut child, Duration::from_secs(30)) {
        panic!("the logger on SIGTERM: {e}; log:\n{}", logger.log_tail(60));
    }
    let n = N as i64;
    assert_eq!(
        audit_totals(&db.url).await,
        AuditTotals {
            rows: n,
            messages: n,
            event_ids: n,
            payload_bytes,
        },
        "every message exactly once; log:\n{}",
        logger.log_tail(40)
    );
    db.drop().await.unwrap();
}
