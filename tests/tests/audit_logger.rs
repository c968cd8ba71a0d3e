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

/// An audit row written by hand (as the tests' superuser, who may set
/// ingested_at), its message_hash computed as the logger's insert computes it.
/// `headers` is the JSON array text; event_type / event_id are taken from it.
async fn insert_audit_row(
    conn: &mut AsyncPgConnection,
    topic: &str,
    offset: i64,
    headers: &str,
    payload: &[u8],
    occurred_at: chrono::DateTime<chrono::Utc>,
    ingested_at: chrono::DateTime<chrono::Utc>,
) {
    diesel::sql_query(
        "INSERT INTO audit_logs (topic, \"partition\", kafka_offset, headers, payload, \
           event_type, event_id, occurred_at, ingested_at, message_hash) \
         SELECT $1, 0, $2, h, $4, \
           jsonb_path_query_first(h, '$[*] ? (@.key == \"event_type\").value') #>> '{}', \
           jsonb_path_query_first(h, '$[*] ? (@.key == \"event_id\").value') #>> '{}', \
           $5, $6, audit_message_hash(NULL, h, $4, NULL) \
         FROM (SELECT $3::jsonb AS h) AS x",
    )
    .bind::<Text, _>(topic)
    .bind::<BigInt, _>(offset)
    .bind::<Text, _>(headers)
    .bind::<Bytea, _>(payload)
    .bind::<Timestamptz, _>(occurred_at)
    .bind::<Timestamptz, _>(ingested_at)
    .execute(conn)
    .await
    .unwrap();
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
    let now = chrono::Utc::now();
    insert_audit_row(&mut conn, "t", 0, "[]", &[1], now, now).await;
    insert_audit_row(&mut conn, "t", 1, "[]", &[2], now, now).await;
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
    // 43 expired (written 31..=73 days ago), 26 kept (0..=25 days) plus one at 29
    // days. Retention goes by when a row was written (ingested_at), not by the
    // producer's timestamp: here every message claims to be from today.
    let mut ages: Vec<(i64, bool)> = (31..=73).map(|d| (d, true)).collect();
    ages.extend((0..=25).map(|d| (d, false)));
    ages.push((29, false));
    for (i, (days, _)) in ages.iter().enumerate() {
        insert_audit_row(
            &mut conn,
            "caracal.policy.decisions",
            i64::try_from(i).unwrap(),
            "[]",
            &[0],
            now,
            now - chrono::Duration::days(*days),
        )
        .await;
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
        "SELECT coalesce(max(extract(epoch FROM now() - ingested_at)), 0)::int8 / 86400 AS n \
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
    // Feb 1..=5 at noon, 3 rows a day (offsets 3d+i), each written when it says it
    // happened; the export takes Feb 2 and 3. One more row claims Feb 3 but was
    // written on Feb 10: the export goes by when a row was written.
    for d in 1..=5u32 {
        for i in 0..3i64 {
            let at = day(d) + chrono::Duration::minutes(i);
            insert_audit_row(
                &mut conn,
                "caracal.policy.changes",
                i64::from(d) * 3 + i,
                &format!(
                    "[{{\"key\":\"event_type\",\"value\":\"policy_updated\"}},\
                     {{\"key\":\"event_id\",\"value\":\"ev-{d}-{i}\"}}]"
                ),
                &[u8::try_from(d).unwrap(), 0xff, u8::try_from(i).unwrap()],
                at,
                at,
            )
            .await;
        }
    }
    insert_audit_row(
        &mut conn,
        "caracal.policy.changes",
        100,
        "[{\"key\":\"event_id\",\"value\":\"ev-late\"}]",
        &[0],
        day(3),
        day(10),
    )
    .await;
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
    assert_eq!(count(&db.url).await, 16);
    drop(conn);
    db.drop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_logger_runs_retention_at_start() {
    let db = migrated_db().await;
    let mut conn = AsyncPgConnection::establish(&db.url).await.unwrap();
    let now = chrono::Utc::now();
    for (offset, days) in [(0i64, 45i64), (1, 31), (2, 10)] {
        insert_audit_row(
            &mut conn,
            "caracal.agent.lifecycle",
            offset,
            "[]",
            &[],
            now,
            now - chrono::Duration::days(days),
        )
        .await;
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

// ------------------------------------------------------------------ database roles (issue 22 item 4)

/// Runs `sql` as the test server's superuser, in the `postgres` database (roles
/// are cluster-wide) or in `db`.
async fn as_admin(db: Option<&TestDb>, sql: &str) -> Result<(), String> {
    let url = match db {
        Some(db) => db.url.clone(),
        None => format!("{}/postgres", caracal_tests::pg_base()),
    };
    let mut conn = AsyncPgConnection::establish(&url)
        .await
        .map_err(|e| e.to_string())?;
    conn.batch_execute(sql).await.map_err(|e| e.to_string())
}

/// A LOGIN role of one test: a unique name (roles are cluster-wide), dropped by
/// [`LoginRole::drop`] once the test's database is gone.
struct LoginRole {
    name: String,
}

impl LoginRole {
    /// `CREATE ROLE <unique name> LOGIN PASSWORD 'test' <options>` (e.g.
    /// `IN ROLE caracal_audit_logger`).
    async fn create(what: &str, options: &str) -> Result<Self, String> {
        let name = format!(
            "caracal_test_{what}_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        as_admin(
            None,
            &format!("CREATE ROLE {name} LOGIN PASSWORD 'test' {options}"),
        )
        .await?;
        Ok(Self { name })
    }

    /// `db`'s URL with this role as the user.
    fn url(&self, db: &TestDb) -> String {
        let (scheme, rest) = db.url.split_once("://").unwrap();
        let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
        format!("{scheme}://{}:test@{host}", self.name)
    }

    async fn connect(&self, db: &TestDb) -> AsyncPgConnection {
        AsyncPgConnection::establish(&self.url(db)).await.unwrap()
    }

    async fn drop(self) {
        as_admin(None, &format!("DROP ROLE IF EXISTS {}", self.name))
            .await
            .unwrap();
    }
}

/// A message as the broker hands it to the logger.
fn raw_message(
    topic: &str,
    offset: i64,
    payload: &[u8],
    event_id: &str,
    timestamp_ms: Option<i64>,
) -> caracal_consumers::runner::RawMessage {
    caracal_consumers::runner::RawMessage {
        topic: topic.to_owned(),
        partition: 0,
        offset,
        key: Some(b"agent-1".to_vec()),
        payload: Some(payload.to_vec()),
        headers: vec![
            ("event_type".into(), Some(b"decision".to_vec())),
            ("event_id".into(), Some(event_id.as_bytes().to_vec())),
            ("bin".into(), Some(vec![0xff, 0x00])),
            ("none".into(), None),
        ],
        timestamp_ms,
    }
}

/// Writes `msgs` the way the logger does; returns how many rows were new.
async fn log_messages(
    conn: &mut AsyncPgConnection,
    msgs: &[caracal_consumers::runner::RawMessage],
) -> Result<usize, diesel::result::Error> {
    let rows: Vec<audit::AuditRow> = msgs
        .iter()
        .map(|m| audit::to_row(m, chrono::Utc::now()).unwrap())
        .collect();
    audit::insert_rows(conn, &rows).await
}

/// `DELETE FROM audit_logs` in a transaction that set the retention flag.
async fn delete_with_flag(conn: &mut AsyncPgConnection) -> Result<usize, String> {
    conn.batch_execute("BEGIN; SET LOCAL caracal.audit_retention = 'on'")
        .await
        .map_err(|e| e.to_string())?;
    let r = diesel::sql_query("DELETE FROM audit_logs")
        .execute(conn)
        .await
        .map_err(|e| e.to_string());
    let end = if r.is_ok() { "COMMIT" } else { "ROLLBACK" };
    conn.batch_execute(end).await.map_err(|e| e.to_string())?;
    r
}

/// The flag alone no longer deletes: the table's owner (a non-superuser migrator)
/// and a role someone granted DELETE both set `caracal.audit_retention` and are
/// refused by the trigger, since neither is a member of caracal_audit_retention.
#[tokio::test]
async fn the_retention_flag_alone_lets_no_role_delete_audit_rows() {
    let owner = LoginRole::create("owner", "CREATEROLE").await.unwrap();
    let granted = LoginRole::create("granted", "").await.unwrap();
    let db = db().await;
    as_admin(
        None,
        &format!("ALTER DATABASE {} OWNER TO {}", db.name, owner.name),
    )
    .await
    .unwrap();
    // Migrated by the owner, as a deployment's migrator does.
    caracal_service_kit::db::run_migrations(&owner.url(&db))
        .await
        .unwrap();
    as_admin(
        Some(&db),
        &format!(
            "GRANT SELECT, INSERT, DELETE ON audit_logs TO {}",
            granted.name
        ),
    )
    .await
    .unwrap();
    let t = "caracal.policy.decisions";
    let mut conn = owner.connect(&db).await;
    let new = log_messages(
        &mut conn,
        &[
            raw_message(t, 0, b"a", "e-0", Some(1_700_000_000_000)),
            raw_message(t, 1, b"b", "e-1", Some(1_700_000_000_001)),
        ],
    )
    .await
    .unwrap();
    assert_eq!(new, 2);

    let by_owner = delete_with_flag(&mut conn).await;
    assert!(
        matches!(&by_owner, Err(e) if e.contains("audit_logs is append-only: DELETE refused")),
        "the owner with the retention flag: {by_owner:?}"
    );
    let mut granted_conn = granted.connect(&db).await;
    let by_granted = delete_with_flag(&mut granted_conn).await;
    assert!(
        matches!(&by_granted, Err(e) if e.contains("audit_logs is append-only: DELETE refused")),
        "a role granted DELETE, with the retention flag: {by_granted:?}"
    );
    assert_eq!(count(&db.url).await, 2);
    drop((conn, granted_conn));
    db.drop().await.unwrap();
    owner.drop().await;
    granted.drop().await;
}

/// ledger_events is append-only like audit_logs: UPDATE, DELETE and TRUNCATE are
/// refused by triggers, even to a superuser, on the table and on a partition.
#[tokio::test]
async fn ledger_events_refuses_update_delete_and_truncate() {
    let db = migrated_db().await;
    let mut conn = AsyncPgConnection::establish(&db.url).await.unwrap();
    insert_ledger_event(&mut conn, "rsv-1/settle", "now()")
        .await
        .unwrap();
    // Older than every monthly partition: the default partition's.
    insert_ledger_event(&mut conn, "rsv-0/settle", "'2020-01-15T00:00:00Z'")
        .await
        .unwrap();
    for (what, sql) in [
        ("UPDATE", "UPDATE ledger_events SET charged_micros = 0"),
        ("DELETE", "DELETE FROM ledger_events"),
        ("DELETE", "DELETE FROM ledger_events_default"),
        ("TRUNCATE", "TRUNCATE ledger_events"),
        ("TRUNCATE", "TRUNCATE ledger_events_default"),
    ] {
        let r = diesel::sql_query(sql)
            .execute(&mut conn)
            .await
            .map_err(|e| e.to_string());
        assert!(
            matches!(&r, Err(e) if e.contains(&format!("ledger_events is append-only: {what} refused"))),
            "{sql}: {r:?}"
        );
    }
    let current = format!("ledger_events_{}", chrono::Utc::now().format("%Y_%m"));
    let r = diesel::sql_query(format!("TRUNCATE {current}"))
        .execute(&mut conn)
        .await
        .map_err(|e| e.to_string());
    assert!(
        matches!(&r, Err(e) if e.contains("ledger_events is append-only: TRUNCATE refused")),
        "TRUNCATE {current}: {r:?}"
    );
    let n: Count =
        diesel::sql_query("SELECT count(*) AS n FROM ledger_events WHERE charged_micros = 100")
            .get_result(&mut conn)
            .await
            .unwrap();
    assert_eq!(n.n, 2, "the rows are unchanged");
    drop(conn);
    db.drop().await.unwrap();
}

/// One charge row of `ledger_events`; `occurred_at` is SQL.
async fn insert_ledger_event(
    conn: &mut AsyncPgConnection,
    event_id: &str,
    occurred_at: &str,
) -> Result<usize, String> {
    diesel::sql_query(format!(
        "INSERT INTO ledger_events (event_id, kind, reservation_id, agent_id, root_agent_id, \
           currency, reserved_micros, charged_micros, overshoot_micros, schema_version, \
           occurred_at, kafka_topic, kafka_partition, kafka_offset) \
         VALUES ($1, 'settle', $1, gen_random_uuid(), gen_random_uuid(), 'USD', 100, 100, 0, 1, \
           {occurred_at}, 'caracal.metering.events', 0, 0)"
    ))
    .bind::<Text, _>(event_id)
    .execute(conn)
    .await
    .map_err(|e| e.to_string())
}

/// Each process's role may do what that process does and nothing else: the
/// audit-logger inserts (not ingested_at) and reads audit rows but cannot change
/// or delete them, nor touch the ledger; the ledger-writer inserts ledger rows and
/// creates partitions (moving rows out of the default partition) through
/// ledger_ensure_partitions(), but cannot change the ledger or read the audit
/// trail; the authz-service runs on its own role (migrations up to date, an admin
/// write through the CLI); the retention role deletes expired audit rows, and
/// only with the flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_process_role_may_do_its_work_and_nothing_more() {
    let db = migrated_db().await;
    let logger = LoginRole::create("logger", "IN ROLE caracal_audit_logger")
        .await
        .unwrap();
    let writer = LoginRole::create("writer", "IN ROLE caracal_ledger_writer")
        .await
        .unwrap();
    let authz = LoginRole::create("authz", "IN ROLE caracal_authz")
        .await
        .unwrap();
    let retention = LoginRole::create("retention", "IN ROLE caracal_audit_retention")
        .await
        .unwrap();
    let denied = |r: Result<usize, diesel::result::Error>, what: &str| {
        let e = r.map_err(|e| e.to_string());
        assert!(
            matches!(&e, Err(m) if m.contains("permission denied")),
            "{what}: {e:?}"
        );
    };

    // The audit-logger.
    assert_eq!(
        caracal_service_kit::db::run_migrations(&logger.url(&db))
            .await
            .unwrap(),
        Vec::<String>::new(),
        "up to date: nothing to apply, and no CREATE needed to find out"
    );
    let mut conn = logger.connect(&db).await;
    let t = "caracal.agent.lifecycle";
    let msgs = [
        raw_message(t, 0, b"a", "e-0", Some(1_700_000_000_000)),
        raw_message(t, 1, b"b", "e-1", None),
    ];
    assert_eq!(log_messages(&mut conn, &msgs).await.unwrap(), 2);
    assert_eq!(
        log_messages(&mut conn, &msgs).await.unwrap(),
        0,
        "redelivery"
    );
    let by_logger = delete_with_flag(&mut conn).await;
    assert!(
        matches!(&by_logger, Err(e) if e.contains("permission denied")),
        "{by_logger:?}"
    );
    for sql in [
        "UPDATE audit_logs SET payload = NULL",
        "TRUNCATE audit_logs",
        "INSERT INTO audit_logs (topic, \"partition\", kafka_offset, occurred_at, \
         message_hash, ingested_at) VALUES ('t', 0, 9, now(), sha256('x'), now() - interval '9 years')",
        "SELECT 1 FROM ledger_events",
    ] {
        denied(diesel::sql_query(sql).execute(&mut conn).await, sql);
    }
    diesel::sql_query(
        "INSERT INTO consumer_partitions (group_id, topic, kafka_partition, owner) \
         VALUES ('caracal-audit-logger', 'x', 0, 'me') \
         ON CONFLICT (group_id, topic, kafka_partition) DO UPDATE SET owner = EXCLUDED.owner",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    diesel::sql_query("SELECT 1 FROM pg_locks WHERE locktype = 'advisory'")
        .execute(&mut conn)
        .await
        .unwrap();
    drop(conn);

    // The ledger-writer.
    let mut conn = writer.connect(&db).await;
    insert_ledger_event(&mut conn, "rsv-w/settle", "now()")
        .await
        .unwrap();
    // A row of a month five ahead lands in the default partition; creating that
    // month's partition (as the owner, inside the function) moves it there.
    let mut admin = AsyncPgConnection::establish(&db.url).await.unwrap();
    insert_ledger_event(
        &mut admin,
        "rsv-ahead/settle",
        "date_trunc('month', now()) + interval '5 months 1 day'",
    )
    .await
    .unwrap();
    #[derive(diesel::QueryableByName)]
    struct Created {
        #[diesel(sql_type = Integer)]
        n: i32,
    }
    let created: Created = diesel::sql_query("SELECT ledger_ensure_partitions(6) AS n")
        .get_result(&mut conn)
        .await
        .unwrap();
    assert_eq!(created.n, 4, "months +3 .. +6");
    #[derive(diesel::QueryableByName)]
    struct Part {
        #[diesel(sql_type = Text)]
        part: String,
    }
    let part: Part = diesel::sql_query(
        "SELECT tableoid::regclass::text AS part FROM ledger_events WHERE event_id = 'rsv-ahead/settle'",
    )
    .get_result(&mut admin)
    .await
    .unwrap();
    use chrono::Datelike;
    let ahead = (chrono::Utc::now().date_naive().with_day(1).unwrap() + chrono::Months::new(5))
        .format("ledger_events_%Y_%m")
        .to_string();
    assert_eq!(part.part, ahead, "moved out of the default partition");
    for sql in [
        "UPDATE ledger_events SET charged_micros = 0",
        "DELETE FROM ledger_events",
        "TRUNCATE ledger_events",
        "SELECT 1 FROM ledger_events_default",
        "SELECT 1 FROM audit_logs",
    ] {
        denied(diesel::sql_query(sql).execute(&mut conn).await, sql);
    }
    // The move flag is the owner's only: set by hand it changes nothing.
    conn.batch_execute("SET caracal.ledger_partition_move = 'on'")
        .await
        .unwrap();
    denied(
        diesel::sql_query("DELETE FROM ledger_events")
            .execute(&mut conn)
            .await,
        "DELETE with the move flag",
    );
    drop(conn);

    // The authz-service, on its own role.
    let mut service = caracal_tests::TestStack::config(&authz.url(&db))
        .await
        .unwrap();
    service.database.db_pool_size = 1;
    let server = caracal_authz::serve(service).await.unwrap();
    let (code, out, err) = cli(&[
        "caracal",
        "--server",
        &format!("http://{}", server.grpc_addr),
        "--admin-token",
        caracal_tests::ADMIN_TOKEN,
        "agent",
        "create",
        "--name",
        "roles-agent",
        "--type",
        "openai",
    ])
    .await;
    assert_eq!(code, 0, "{out}{err}");
    server.shutdown().await.unwrap();
    let mut conn = authz.connect(&db).await;
    diesel::sql_query("SELECT 1 FROM ledger_final_charges")
        .execute(&mut conn)
        .await
        .unwrap();
    for sql in [
        "SELECT 1 FROM audit_logs",
        "INSERT INTO consumer_partitions (group_id, topic, kafka_partition) VALUES ('g', 't', 0)",
        "UPDATE ledger_events SET charged_micros = 0",
    ] {
        denied(diesel::sql_query(sql).execute(&mut conn).await, sql);
    }
    drop(conn);

    // The retention job.
    let mut conn = retention.connect(&db).await;
    let plain = diesel::sql_query("DELETE FROM audit_logs")
        .execute(&mut conn)
        .await
        .map_err(|e| e.to_string());
    assert!(
        matches!(&plain, Err(e) if e.contains("audit_logs is append-only: DELETE refused")),
        "the retention role without the flag: {plain:?}"
    );
    drop(conn);
    let mut c = config(&retention.url(&db), "127.0.0.1:1", "unused");
    c.audit.retention_days = 0;
    c.consumer.run_migrations = true;
    assert_eq!(audit::retention_once(&c).await.unwrap(), 2);
    assert_eq!(count(&db.url).await, 0);
    drop(admin);

    db.drop().await.unwrap();
    for role in [logger, writer, authz, retention] {
        role.drop().await;
    }
}

// ------------------------------------------------------------------ ingest time (issue 22 item 9)

/// A producer's timestamp chooses nothing: a message stamped ten years back is
/// kept by retention (30 days) and exported by the day it was written.
#[tokio::test]
async fn a_message_stamped_ten_years_back_is_kept_and_exported_by_its_ingest_time() {
    let db = migrated_db().await;
    let mut conn = AsyncPgConnection::establish(&db.url).await.unwrap();
    let ten_years_ago = chrono::Utc::now() - chrono::Duration::days(3653);
    let t = "caracal.policy.changes";
    let new = log_messages(
        &mut conn,
        &[raw_message(
            t,
            0,
            b"old stamp",
            "e-old",
            Some(ten_years_ago.timestamp_millis()),
        )],
    )
    .await
    .unwrap();
    assert_eq!(new, 1);
    let mut c = config(&db.url, "127.0.0.1:1", "unused");
    c.audit.retention_days = 30;
    let deleted = audit::retention_once(&c).await.unwrap();
    assert_eq!(
        deleted, 0,
        "retention deleted the row stamped ten years back"
    );
    assert_eq!(count(&db.url).await, 1);

    let today = chrono::Utc::now().date_naive();
    let (start, end) = (
        today.to_string(),
        (today + chrono::Days::new(1)).to_string(),
    );
    let (code, out, err) = cli(&[
        "caracal",
        "audit",
        "export",
        "--database-url",
        &db.url,
        "--start",
        &start,
        "--end",
        &end,
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "exported by the day it was written: {out}");
    assert_eq!(lines[0]["event_id"], "e-old");
    assert_eq!(
        lines[0]["occurred_at"].as_str().unwrap()[..10],
        ten_years_ago.format("%Y-%m-%d").to_string(),
        "the producer's timestamp is still in the record"
    );
    drop(conn);
    db.drop().await.unwrap();
}

// ------------------------------------------------------------------ identity (issue 22 item 5)

/// A position is not an identity: after a topic is re-created, a different
/// message at an offset already logged is a new row; the same message again is
/// still a redelivery.
#[tokio::test]
async fn a_different_message_at_a_logged_position_is_kept_and_a_redelivery_is_not() {
    let db = migrated_db().await;
    let mut conn = AsyncPgConnection::establish(&db.url).await.unwrap();
    let t = "caracal.metering.events";
    let first = raw_message(t, 0, b"before re-creation", "e-1", Some(1_700_000_000_000));
    assert_eq!(
        log_messages(&mut conn, std::slice::from_ref(&first))
            .await
            .unwrap(),
        1
    );
    // The topic re-created: offset 0 again, another event.
    let second = raw_message(t, 0, b"after re-creation", "e-2", Some(1_800_000_000_000));
    let new = log_messages(&mut conn, std::slice::from_ref(&second))
        .await
        .unwrap();
    assert_eq!(
        new, 1,
        "the new message at offset 0 was dropped as a redelivery"
    );
    // Messages that differ only in a header value, or only in the timestamp, are
    // different messages too.
    let mut third = first.clone();
    third.headers[2].1 = Some(vec![0xff, 0x01]);
    let mut fourth = first.clone();
    fourth.timestamp_ms = Some(1_700_000_000_001);
    assert_eq!(
        log_messages(&mut conn, &[third.clone(), fourth.clone()])
            .await
            .unwrap(),
        2
    );
    // Redeliveries of all four, in one batch and again: nothing new.
    let all = [first, second, third, fourth];
    assert_eq!(log_messages(&mut conn, &all).await.unwrap(), 0);
    assert_eq!(log_messages(&mut conn, &all).await.unwrap(), 0);
    assert_eq!(count(&db.url).await, 4);
    #[derive(diesel::QueryableByName)]
    struct P {
        #[diesel(sql_type = Nullable<Bytea>)]
        payload: Option<Vec<u8>>,
    }
    let payloads: Vec<P> =
        diesel::sql_query("SELECT payload FROM audit_logs WHERE kafka_offset = 0 ORDER BY id")
            .load(&mut conn)
            .await
            .unwrap();
    assert_eq!(
        payloads
            .into_iter()
            .filter_map(|p| p.payload)
            .collect::<Vec<_>>(),
        vec![
            b"before re-creation".to_vec(),
            b"after re-creation".to_vec(),
            b"before re-creation".to_vec(),
            b"before re-creation".to_vec()
        ]
    );
    drop(conn);
    db.drop().await.unwrap();
}

/// The group's committed offset of partition 0 of `topic` once it is `offset`
/// (or whatever it is after a minute).
async fn committed_at(brokers: &str, group: &str, topic: &str, offset: i64) -> Option<i64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let at = committed(brokers, group)
            .get(&(topic.to_owned(), 0))
            .copied()
            .flatten();
        if at == Some(offset) || Instant::now() >= deadline {
            return at;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The same through a broker: the logger logs a message at offset 0, the topic is
/// re-created (here: a fresh broker, the same group and database), and the new
/// topic's first message, at offset 0 again and stamped ten years back by its
/// producer, is kept; and kept by retention. Re-reading it is a no-op.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_topic_is_recreated_its_new_messages_are_logged() {
    let db = migrated_db().await;
    let group = format!("audit-{}", uuid::Uuid::new_v4().simple());
    let topic = TOPICS[1];
    let produce = |brokers: String, payload: &'static str, id: &'static str, ts: i64| async move {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("acks", "all")
            .create()
            .unwrap();
        let headers = OwnedHeaders::new_with_capacity(1).insert(Header {
            key: "event_id",
            value: Some(id),
        });
        let d = producer
            .send(
                FutureRecord::to(topic)
                    .partition(0)
                    .key("agent-1")
                    .payload(payload)
                    .headers(headers)
                    .timestamp(ts),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
        (d.partition, d.offset)
    };
    let now_ms = chrono::Utc::now().timestamp_millis();

    let old = Tansu::start_new().await.expect("tansu broker");
    create_topics(&old.brokers(), &TOPICS, PARTITIONS)
        .await
        .unwrap();
    assert_eq!(produce(old.brokers(), "first", "e-1", now_ms).await, (0, 0));
    let logger = audit::start(config(&db.url, &old.brokers(), &group))
        .await
        .unwrap();
    assert_eq!(wait_for_rows(&db.url, 1, Duration::from_secs(60)).await, 1);
    logger.shutdown().await.unwrap();
    drop(old);

    let new = Tansu::start_new().await.expect("tansu broker");
    create_topics(&new.brokers(), &TOPICS, PARTITIONS)
        .await
        .unwrap();
    let ten_years_ago = now_ms - 3653 * 86_400_000;
    assert_eq!(
        produce(new.brokers(), "second", "e-2", ten_years_ago).await,
        (0, 0)
    );
    let mut c = config(&db.url, &new.brokers(), &group);
    c.audit.retention_days = 30;
    let logger = audit::start(c).await.unwrap();
    assert_eq!(
        committed_at(&new.brokers(), &group, topic, 1).await,
        Some(1),
        "the logger read it"
    );
    logger.shutdown().await.unwrap();
    assert_eq!(
        count(&db.url).await,
        2,
        "the re-created topic's message at offset 0 is kept"
    );
    // Retention at the logger's start ran as well; a second run deletes nothing.
    let mut c = config(&db.url, "127.0.0.1:1", "unused");
    c.audit.retention_days = 30;
    assert_eq!(audit::retention_once(&c).await.unwrap(), 0);

    // The group re-reads the partition: a redelivery, nothing new.
    {
        let rewinder: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", new.brokers())
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, 0, Offset::Offset(0))
            .unwrap();
        rewinder.commit(&tpl, CommitMode::Sync).unwrap();
    }
    let logger = audit::start(config(&db.url, &new.brokers(), &group))
        .await
        .unwrap();
    assert_eq!(
        committed_at(&new.brokers(), &group, topic, 1).await,
        Some(1),
        "re-read"
    );
    logger.shutdown().await.unwrap();
    assert_eq!(count(&db.url).await, 2, "a redelivery adds nothing");
    db.drop().await.unwrap();
}
