//! The dead-letter queue end to end, on a real tansu broker, a real PostgreSQL, the
//! real ledger-writer and the authz-service's DeadLetterService: poison lands in
//! `caracal.dlq` with its reason while the good events around it reach the ledger;
//! counts and the `caracal_dlq_size` / `caracal_dlq_oldest_message_age_seconds`
//! gauges are exact; once the cause is fixed, a replay delivers the message to the
//! ledger exactly once and a second replay is refused and changes nothing. Plus the
//! `caracal dlq` CLI, run as a process.
//!
//! "The cause" of the replayable poison: a database trigger that refuses rows of
//! one model (the ledger-writer dead-letters them after `maxRetries` while the
//! database answers). Dropping the trigger is the fix.

use std::time::{Duration, Instant};

use base64::{engine::general_purpose::STANDARD, Engine as _};
use caracal_consumers::{config::ConsumerConfig, ledger};
use caracal_proto::v1::{
    self as pb, dead_letter_service_client::DeadLetterServiceClient,
    replay_outcome::Status as Outcome, ChargeEvent,
};
use caracal_tests::{
    charges::{
        charge_producer, charged, ledger_totals, numbered_charge, produce_charges, usd,
        wait_for_ledger_rows, ChargeMessage, LedgerTotals, METERING,
    },
    cli_process::{run_caracal, Run},
    consumer_config::database_consumer_config,
    kafka::{consume_all, create_topics, topic_message_count, Tansu},
    probe::{http_get, metric_value},
    Bearer, Svc, TestStack, ADMIN_TOKEN,
};
use diesel_async::RunQueryDsl;
use prost::Message;

const PARTITIONS: i32 = 3;
const REFUSED_MODEL: &str = "refuse-me";

// ------------------------------------------------------------------ fixtures

/// A charge event as the outbox relay encodes it (agent = root, one policy).
fn charge(run: &str, i: u64, root: &uuid::Uuid) -> ChargeEvent {
    ChargeEvent {
        policy_ids: vec!["policy-1".to_owned()],
        ..numbered_charge(run, i, root, root)
    }
}

/// The ledger-writer's configuration, dead-lettering to `dlq_topic`.
fn writer_config(db_url: &str, brokers: &str, group: &str, dlq_topic: &str) -> ConsumerConfig {
    let mut c = database_consumer_config(db_url, brokers, group).unwrap();
    c.kafka.dlq_topic = dlq_topic.to_owned();
    c
}

/// A broker with the metering and DLQ topics, an authz-service on a fresh database
/// that watches that DLQ every second, and a trigger in that database refusing
/// ledger rows of [`REFUSED_MODEL`] (the "cause" a test later fixes).
async fn setup(dlq_topic: &str) -> (Tansu, TestStack) {
    let tansu = Tansu::start_new().await.expect("tansu broker");
    create_topics(&tansu.brokers(), &[METERING, dlq_topic], PARTITIONS)
        .await
        .unwrap();
    let brokers = tansu.brokers();
    let dlq = dlq_topic.to_owned();
    let stack = TestStack::start_with(move |c| {
        c.kafka.brokers = brokers;
        c.kafka.dlq_topic = dlq;
        c.kafka.topic_partitions = PARTITIONS;
        // The service talks to Kafka (relay on), so it runs the DLQ monitor.
        c.budget.relay_enabled = true;
        c.dlq.monitor_interval = 1;
        // A broker that stops answering fails a read within this (the outage test).
        c.dlq.read_timeout = 5;
    })
    .await
    .unwrap();
    let mut conn = stack.db().await.unwrap();
    diesel::sql_query(format!(
        "CREATE FUNCTION refuse_test_row() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF NEW.model = '{REFUSED_MODEL}' THEN \
           RAISE EXCEPTION 'refused by the test trigger' USING ERRCODE = 'check_violation'; END IF; \
         RETURN NEW; END $$"
    ))
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
    (tansu, stack)
}

/// The fix: the database accepts those rows again.
async fn fix_the_cause(stack: &TestStack) {
    let mut conn = stack.db().await.unwrap();
    diesel::sql_query("DROP TRIGGER refuse_test_row ON ledger_events")
        .execute(&mut conn)
        .await
        .unwrap();
}

fn dlq_client(stack: &TestStack) -> DeadLetterServiceClient<Svc> {
    DeadLetterServiceClient::with_interceptor(
        stack.channel.clone(),
        Bearer(Some(ADMIN_TOKEN.to_owned())),
    )
}

/// Waits until the DLQ holds `total` dead letters (as the service counts them).
async fn wait_for_dead_letters(
    client: &mut DeadLetterServiceClient<Svc>,
    total: u64,
    timeout: Duration,
) -> pb::CountDeadLettersResponse {
    let deadline = Instant::now() + timeout;
    loop {
        let c = client
            .count_dead_letters(pb::CountDeadLettersRequest::default())
            .await
            .map(tonic::Response::into_inner);
        match c {
            Ok(c) if c.total >= total || Instant::now() >= deadline => return c,
            Err(e) if Instant::now() >= deadline => panic!("counting dead letters: {e}"),
            _ => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
}

/// The value of `metric{topic="<topic>"}` on the service's `/metrics`.
async fn gauge(stack: &TestStack, metric: &str, topic: &str) -> Option<f64> {
    let addr = stack.server.as_ref().unwrap().http_addr;
    let (_, text) = http_get(addr, "/metrics").await;
    metric_value(&text, metric, &[&format!("topic=\"{topic}\"")])
}

/// Waits until the DLQ monitor has published `caracal_dlq_size == size`; returns
/// the last value seen.
async fn wait_for_dlq_size(stack: &TestStack, topic: &str, size: f64) -> Option<f64> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = gauge(stack, "caracal_dlq_size", topic).await;
        if v == Some(size) || Instant::now() >= deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ------------------------------------------------------------------ gRPC

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_is_dead_lettered_with_its_reason_and_a_fixed_one_replays_exactly_once() {
    const DLQ: &str = "caracal.dlq";
    let (tansu, stack) = setup(DLQ).await;
    let group = format!("ledger-{}", uuid::Uuid::new_v4().simple());
    let config = writer_config(&stack.database_url, &tansu.brokers(), &group, DLQ);
    let max_retries = config.consumer.max_retries;
    let writer = ledger::start(config).await.unwrap();

    let run = uuid::Uuid::new_v4().simple().to_string();
    let root = uuid::Uuid::new_v4();
    let good: Vec<ChargeEvent> = (0..200).map(|i| charge(&run, i, &root)).collect();
    let mut future_version = charge(&run, 1001, &root);
    future_version.schema_version = 2;
    let mut negative = charge(&run, 1002, &root);
    negative.charged = usd(-5);
    let mut no_ids = charge(&run, 1003, &root);
    no_ids.event_id.clear();
    no_ids.reservation_id.clear();
    let mut refused = charge(&run, 1004, &root);
    refused.model = REFUSED_MODEL.to_owned();
    let garbage = ChargeMessage {
        key: root.to_string(),
        payload: vec![0xff; 16],
        event_id: "garbage".to_owned(),
    };
    // One key (one partition), poison between good events.
    let mut out: Vec<ChargeMessage> = Vec::new();
    out.extend(good[..50].iter().map(ChargeMessage::event));
    out.push(garbage);
    out.extend(good[50..100].iter().map(ChargeMessage::event));
    out.push(ChargeMessage::event(&future_version));
    out.push(ChargeMessage::event(&negative));
    out.extend(good[100..150].iter().map(ChargeMessage::event));
    out.push(ChargeMessage::event(&no_ids));
    out.extend(good[150..180].iter().map(ChargeMessage::event));
    out.push(ChargeMessage::event(&refused));
    out.extend(good[180..].iter().map(ChargeMessage::event));
    // (index in `out`, reason, retries)
    let expected: [(usize, &str, u32); 5] = [
        (50, "not a ChargeEvent: ", 0),
        (101, "unknown schema version 2", 0),
        (102, "charged is out of range: -5 micros", 0),
        (153, "event_id is missing", 0),
        (184, "refused by the test trigger", max_retries),
    ];
    let p = charge_producer(&tansu.brokers()).unwrap();
    let coords = produce_charges(&p, &out).await.unwrap();
    let good_sum: i64 = good.iter().map(charged).sum();

    // The good ones all arrive; exactly the five poison messages are dead letters.
    let t = wait_for_ledger_rows(&stack.database_url, 200, Duration::from_secs(60)).await;
    assert_eq!(
        t,
        LedgerTotals {
            rows: 200,
            distinct_ids: 200,
            charged: good_sum
        }
    );
    let mut client = dlq_client(&stack);
    let count = wait_for_dead_letters(&mut client, 5, Duration::from_secs(60)).await;
    assert_eq!((count.total, count.pending, count.replayed), (5, 5, 0));
    assert_eq!(count.dlq_topic, DLQ);
    assert!(
        count.oldest_pending_age_seconds > 0.0 && count.oldest_pending_age_seconds < 300.0,
        "{count:?}"
    );

    let listed = client
        .list_dead_letters(pb::ListDeadLettersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.next_page_token.is_empty());
    let mut letters = listed.dead_letters;
    assert_eq!(letters.len(), 5);
    letters.sort_by_key(|d| d.original_offset);
    for (d, (i, reason, retries)) in letters.iter().zip(expected) {
        assert!(d.error.contains(reason), "{} should say {reason}", d.error);
        assert_eq!(d.original_topic, METERING);
        assert_eq!(
            (d.original_partition, d.original_offset),
            (Some(coords[i].0), Some(coords[i].1)),
            "{reason}"
        );
        assert_eq!(d.consumer_group, group);
        assert_eq!(d.retry_count, retries, "{reason}");
        assert!(d.pending && d.replay.is_none() && d.not_replayable.is_empty());
        assert_eq!(d.payload_size, out[i].payload.len() as u64);
        // Lists carry no bytes.
        assert!(d.payload.is_none() && d.key.is_none());
        assert_eq!(d.id, format!("{}:{}", d.dlq_partition, d.dlq_offset));
    }
    // Filters and paging.
    let page = |token: &str| pb::ListDeadLettersRequest {
        page: Some(pb::PageRequest {
            limit: 2,
            page_token: token.to_owned(),
        }),
        ..Default::default()
    };
    let first = client
        .list_dead_letters(page(""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.dead_letters.len(), 2);
    let second = client
        .list_dead_letters(page(&first.next_page_token))
        .await
        .unwrap()
        .into_inner();
    let third = client
        .list_dead_letters(page(&second.next_page_token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (second.dead_letters.len(), third.dead_letters.len()),
        (2, 1)
    );
    assert!(third.next_page_token.is_empty());
    let mut paged: Vec<String> = [first, second, third]
        .into_iter()
        .flat_map(|p| p.dead_letters.into_iter().map(|d| d.id))
        .collect();
    paged.dedup();
    assert_eq!(paged.len(), 5);
    for (topic, consumer, n) in [
        (METERING, "", 5),
        ("caracal.policy.decisions", "", 0),
        ("", group.as_str(), 5),
        ("", "caracal-audit-logger", 0),
    ] {
        let r = client
            .list_dead_letters(pb::ListDeadLettersRequest {
                original_topic: topic.to_owned(),
                consumer_group: consumer.to_owned(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.dead_letters.len(), n, "{topic:?} {consumer:?}");
    }

    // The gauges on the service's /metrics.
    assert_eq!(wait_for_dlq_size(&stack, DLQ, 5.0).await, Some(5.0));
    let age = gauge(&stack, "caracal_dlq_oldest_message_age_seconds", DLQ)
        .await
        .unwrap();
    assert!(age > 0.0 && age < 300.0, "{age}");

    // The refused one, whole: the original bytes.
    let refused_letter = letters[4].clone();
    let shown = client
        .get_dead_letter(pb::GetDeadLetterRequest {
            id: refused_letter.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(shown.payload.as_deref(), Some(out[184].payload.as_slice()));
    assert_eq!(shown.key.as_deref(), Some(root.to_string().as_bytes()));
    let header = |d: &pb::DeadLetter, k: &str| {
        d.headers
            .iter()
            .find(|h| h.key == k)
            .and_then(|h| h.value.clone())
    };
    assert_eq!(
        header(&shown, "event_id").as_deref(),
        Some(refused.event_id.as_bytes())
    );
    for bad in ["0:999999", "x", ""] {
        let code = client
            .get_dead_letter(pb::GetDeadLetterRequest { id: bad.into() })
            .await
            .unwrap_err()
            .code();
        let want = if bad.contains(':') {
            tonic::Code::NotFound
        } else {
            tonic::Code::InvalidArgument
        };
        assert_eq!(code, want, "{bad:?}");
    }

    // The cause is fixed; the replay delivers the event to the ledger, once.
    fix_the_cause(&stack).await;
    let metering_before =
        topic_message_count(&tansu.brokers(), METERING, Duration::from_secs(10)).unwrap();
    assert_eq!(metering_before, out.len() as i64);
    let replay = client
        .replay_dead_letters(pb::ReplayDeadLettersRequest {
            ids: vec![refused_letter.id.clone(), "0:999999".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((replay.replayed, replay.not_replayed), (1, 1));
    let done = replay
        .outcomes
        .iter()
        .find(|o| o.id == refused_letter.id)
        .unwrap();
    assert_eq!(done.status, Outcome::Replayed as i32, "{}", done.message);
    let first_replay = done.replay.clone().unwrap();
    assert_eq!(first_replay.actor, "admin-token");
    assert_eq!(first_replay.target_topic, METERING);
    assert_eq!(first_replay.target_partition, coords[184].0);
    assert!(first_replay.replayed_at.is_some());
    let missing = replay.outcomes.iter().find(|o| o.id == "0:999999").unwrap();
    assert_eq!(missing.status, Outcome::NotFound as i32);

    let t = wait_for_ledger_rows(&stack.database_url, 201, Duration::from_secs(60)).await;
    assert_eq!(
        t,
        LedgerTotals {
            rows: 201,
            distinct_ids: 201,
            charged: good_sum + charged(&refused)
        }
    );
    // The replayed message: the original bytes plus the replay header, once.
    let metering = consume_all(
        &tansu.brokers(),
        METERING,
        out.len() + 1,
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    let replayed: Vec<_> = metering
        .iter()
        .filter(|(_, _, h)| h.contains_key("caracal-dlq-replay"))
        .collect();
    assert_eq!(replayed.len(), 1);
    assert_eq!(replayed[0].2["caracal-dlq-replay"], refused_letter.id);
    assert_eq!(replayed[0].2["event_id"], refused.event_id);
    assert_eq!(replayed[0].1, out[184].payload);
    assert_eq!(replayed[0].0, root.to_string());

    // A second replay is refused: when, by whom; nothing is published, nothing changes.
    let again = client
        .replay_dead_letters(pb::ReplayDeadLettersRequest {
            ids: vec![refused_letter.id.clone()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((again.replayed, again.not_replayed), (0, 1));
    let refusal = &again.outcomes[0];
    assert_eq!(refusal.status, Outcome::AlreadyReplayed as i32);
    assert!(
        refusal.message.contains("already replayed") && refusal.message.contains("admin-token"),
        "{}",
        refusal.message
    );
    assert_eq!(refusal.replay.as_ref(), Some(&first_replay));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        topic_message_count(&tansu.brokers(), METERING, Duration::from_secs(10)).unwrap(),
        metering_before + 1
    );
    assert_eq!(ledger_totals(&stack.database_url).await.rows, 201);
    let mut conn = stack.db().await.unwrap();
    #[derive(diesel::QueryableByName)]
    struct Replays {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        done: i64,
    }
    let r: Replays = diesel::sql_query(
        "SELECT count(*) AS n, count(replayed_at) AS done FROM dlq_replays \
         WHERE dlq_topic = 'caracal.dlq' AND actor = 'admin-token'",
    )
    .get_result(&mut conn)
    .await
    .unwrap();
    assert_eq!((r.n, r.done), (1, 1));

    // Pending drops by one: count, list and gauge.
    let count = client
        .count_dead_letters(pb::CountDeadLettersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!((count.total, count.pending, count.replayed), (5, 4, 1));
    let pending = client
        .list_dead_letters(pb::ListDeadLettersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .dead_letters;
    assert_eq!(pending.len(), 4);
    assert!(pending.iter().all(|d| d.id != refused_letter.id));
    let all = client
        .list_dead_letters(pb::ListDeadLettersRequest {
            include_replayed: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .dead_letters;
    let shown = all.iter().find(|d| d.id == refused_letter.id).unwrap();
    assert!(!shown.pending);
    assert_eq!(shown.replay.as_ref(), Some(&first_replay));
    assert_eq!(wait_for_dlq_size(&stack, DLQ, 4.0).await, Some(4.0));

    // Replays need the admin credential.
    let anonymous = DeadLetterServiceClient::with_interceptor(stack.channel.clone(), Bearer(None))
        .count_dead_letters(pb::CountDeadLettersRequest::default())
        .await
        .unwrap_err();
    assert_eq!(anonymous.code(), tonic::Code::Unauthenticated);

    writer.shutdown().await.unwrap();
    stack.stop().await.unwrap();
}

// ------------------------------------------------------------------ CLI

/// Runs the `caracal` binary (built in this package as `caracal-under-test`) as a
/// process against the stack.
async fn caracal(stack: &TestStack, args: &[&str]) -> Run {
    run_caracal(env!("CARGO_BIN_EXE_caracal-under-test"), stack, args)
        .await
        .unwrap()
}

fn json(run: &Run) -> serde_json::Value {
    assert_eq!(run.code, 0, "stderr: {}", run.err);
    serde_json::from_str(&run.out).unwrap_or_else(|e| panic!("not JSON ({e}): {}", run.out))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_counts_shows_and_replays_all_pending_once() {
    // Its own DLQ topic name: the gauges of both tests live in one process.
    const DLQ: &str = "caracal.dlq.cli";
    let (tansu, stack) = setup(DLQ).await;
    let group = format!("ledger-{}", uuid::Uuid::new_v4().simple());
    let writer = ledger::start(writer_config(
        &stack.database_url,
        &tansu.brokers(),
        &group,
        DLQ,
    ))
    .await
    .unwrap();

    let run = uuid::Uuid::new_v4().simple().to_string();
    let roots: Vec<uuid::Uuid> = (0..4).map(|_| uuid::Uuid::new_v4()).collect();
    let mut events: Vec<ChargeEvent> = (0..40)
        .map(|i| charge(&run, i, &roots[(i % 4) as usize]))
        .collect();
    // Two events the database refuses until the cause is fixed.
    for i in [7, 22] {
        events[i].model = REFUSED_MODEL.to_owned();
    }
    let out: Vec<ChargeMessage> = events.iter().map(ChargeMessage::event).collect();
    produce_charges(&charge_producer(&tansu.brokers()).unwrap(), &out)
        .await
        .unwrap();
    let sum: i64 = events.iter().map(charged).sum();
    let refused_sum = charged(&events[7]) + charged(&events[22]);

    let t = wait_for_ledger_rows(&stack.database_url, 38, Duration::from_secs(60)).await;
    assert_eq!((t.rows, t.charged), (38, sum - refused_sum));
    wait_for_dead_letters(&mut dlq_client(&stack), 2, Duration::from_secs(60)).await;

    let count = json(&caracal(&stack, &["dlq", "count", "--output", "json"]).await);
    assert_eq!(count["dlq_topic"], DLQ);
    assert_eq!(
        (count["total"].as_u64(), count["pending"].as_u64()),
        (Some(2), Some(2))
    );
    assert_eq!(count["replayed"], 0);
    let table = caracal(&stack, &["dlq", "count"]).await;
    assert_eq!(table.code, 0, "{}", table.err);
    assert!(
        table
            .out
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["pending", "2"]),
        "{}",
        table.out
    );
    assert_eq!(wait_for_dlq_size(&stack, DLQ, 2.0).await, Some(2.0));

    let listed = json(&caracal(&stack, &["dlq", "list", "--output", "json"]).await);
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 2);
    for d in listed {
        assert!(
            d["error"]
                .as_str()
                .unwrap()
                .contains("refused by the test trigger"),
            "{d}"
        );
        assert_eq!(d["status"], "pending");
        assert_eq!(d["consumer_group"], group.as_str());
    }
    let id = listed[0]["id"].as_str().unwrap().to_owned();
    let shown = json(&caracal(&stack, &["dlq", "show", "--id", &id, "--output", "json"]).await);
    assert_eq!(shown["original_offset"], listed[0]["original_offset"]);
    let which = events
        .iter()
        .find(|e| STANDARD.encode(e.encode_to_vec()) == shown["payload_base64"].as_str().unwrap())
        .expect("the payload is one of the refused events, byte for byte");
    assert_eq!(which.model, REFUSED_MODEL);
    let key = STANDARD.encode(which.root_agent_id.as_bytes());
    assert_eq!(shown["key_base64"], key.as_str());
    let text = caracal(&stack, &["dlq", "show", "--id", &id]).await;
    assert_eq!(text.code, 0, "{}", text.err);
    assert!(text.out.contains("payload_base64"), "{}", text.out);
    assert!(
        text.out.contains("refused by the test trigger"),
        "{}",
        text.out
    );

    // Fixed: replay everything pending.
    fix_the_cause(&stack).await;
    let replay = caracal(&stack, &["dlq", "replay", "--all"]).await;
    assert_eq!(replay.code, 0, "{}\n{}", replay.out, replay.err);
    let outcome = |out: &str, what: &str| {
        out.lines()
            .filter(|l| l.split_whitespace().nth(1) == Some(what))
            .count()
    };
    assert_eq!(outcome(&replay.out, "replayed"), 2, "{}", replay.out);
    let t = wait_for_ledger_rows(&stack.database_url, 40, Duration::from_secs(60)).await;
    assert_eq!(
        t,
        LedgerTotals {
            rows: 40,
            distinct_ids: 40,
            charged: sum
        }
    );

    let count = json(&caracal(&stack, &["dlq", "count", "--output", "json"]).await);
    assert_eq!(
        (
            count["total"].as_u64(),
            count["pending"].as_u64(),
            count["replayed"].as_u64()
        ),
        (Some(2), Some(0), Some(2))
    );
    assert_eq!(count["oldest_pending_age_seconds"], 0.0);
    assert_eq!(wait_for_dlq_size(&stack, DLQ, 0.0).await, Some(0.0));
    assert_eq!(
        gauge(&stack, "caracal_dlq_oldest_message_age_seconds", DLQ).await,
        Some(0.0)
    );

    // Nothing is pending: --all replays nothing; a named one is refused (exit 1).
    let again = json(&caracal(&stack, &["dlq", "replay", "--all", "--output", "json"]).await);
    assert_eq!(again, serde_json::json!([]));
    let named = caracal(&stack, &["dlq", "replay", "--id", &id]).await;
    assert_eq!(named.code, 1, "{}", named.out);
    assert!(named.out.contains("already_replayed"), "{}", named.out);
    assert!(named.out.contains("by admin-token"), "{}", named.out);
    assert!(
        named.err.contains("1 of 1 dead letters were not replayed"),
        "{}",
        named.err
    );
    let usage = caracal(&stack, &["dlq", "replay"]).await;
    assert_eq!(usage.code, 2, "{}", usage.err);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(ledger_totals(&stack.database_url).await.rows, 40);
    assert_eq!(
        topic_message_count(&tansu.brokers(), METERING, Duration::from_secs(10)).unwrap(),
        42
    );
    let all = json(
        &caracal(
            &stack,
            &["dlq", "list", "--include-replayed", "--output", "json"],
        )
        .await,
    );
    let all = all.as_array().unwrap();
    assert_eq!(all.len(), 2);
    assert!(all.iter().all(|d| d["status"] == "replayed"
        && d["replay"]["actor"] == "admin-token"
        && d["replay"]["target_topic"] == METERING));

    writer.shutdown().await.unwrap();
    stack.stop().await.unwrap();
}

// ------------------------------------------------------------------ interrupted replays, outages

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_replay_is_taken_over_and_the_ledger_still_counts_it_once() {
    const DLQ: &str = "caracal.dlq.crash";
    let (mut tansu, stack) = setup(DLQ).await;
    let group = format!("ledger-{}", uuid::Uuid::new_v4().simple());
    let writer = ledger::start(writer_config(
        &stack.database_url,
        &tansu.brokers(),
        &group,
        DLQ,
    ))
    .await
    .unwrap();
    let run = uuid::Uuid::new_v4().simple().to_string();
    let root = uuid::Uuid::new_v4();
    let mut events: Vec<ChargeEvent> = (0..12).map(|i| charge(&run, i, &root)).collect();
    for i in [3, 8] {
        events[i].model = REFUSED_MODEL.to_owned();
    }
    let out: Vec<ChargeMessage> = events.iter().map(ChargeMessage::event).collect();
    let p = charge_producer(&tansu.brokers()).unwrap();
    produce_charges(&p, &out).await.unwrap();
    let sum: i64 = events.iter().map(charged).sum();
    assert_eq!(
        wait_for_ledger_rows(&stack.database_url, 10, Duration::from_secs(60))
            .await
            .rows,
        10
    );
    let mut client = dlq_client(&stack);
    wait_for_dead_letters(&mut client, 2, Duration::from_secs(60)).await;
    let mut letters = client
        .list_dead_letters(pb::ListDeadLettersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .dead_letters;
    letters.sort_by_key(|d| d.original_offset);
    let (died_after_publish, in_flight) = (letters[0].id.clone(), letters[1].id.clone());
    fix_the_cause(&stack).await;

    // A replay of the first one died after the broker took the message and before
    // the mark: the message is in the topic, the claim (an hour old) is unmarked.
    // Another replay of the second one is in flight right now (a fresh claim).
    produce_charges(&p, &out[3..4]).await.unwrap();
    let mut conn = stack.db().await.unwrap();
    for (id, age, actor) in [
        (&died_after_publish, "1 hour", "mtls:spiffe://ops/crashed"),
        (&in_flight, "0 seconds", "mtls:spiffe://ops/other"),
    ] {
        let (partition, offset) = id.split_once(':').unwrap();
        diesel::sql_query(format!(
            "INSERT INTO dlq_replays (dlq_topic, dlq_partition, dlq_offset, actor, claim_id, \
             claimed_at, target_topic) VALUES ('{DLQ}', {partition}, {offset}, '{actor}', \
             gen_random_uuid(), now() - interval '{age}', '{METERING}')"
        ))
        .execute(&mut conn)
        .await
        .unwrap();
    }
    // The published copy reached the ledger; both dead letters still count as pending.
    assert_eq!(
        wait_for_ledger_rows(&stack.database_url, 11, Duration::from_secs(60))
            .await
            .rows,
        11
    );
    let count = client
        .count_dead_letters(pb::CountDeadLettersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!((count.total, count.pending), (2, 2));
    let listed = client
        .list_dead_letters(pb::ListDeadLettersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .dead_letters;
    assert!(listed
        .iter()
        .all(|d| d.pending && d.replay.as_ref().is_some_and(|r| r.replayed_at.is_none())));

    // The stale claim is taken over and published again; the live one is refused.
    let replay = client
        .replay_dead_letters(pb::ReplayDeadLettersRequest {
            all_pending: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((replay.replayed, replay.not_replayed), (1, 1));
    let taken = replay
        .outcomes
        .iter()
        .find(|o| o.id == died_after_publish)
        .unwrap();
    assert_eq!(taken.status, Outcome::Replayed as i32, "{}", taken.message);
    assert_eq!(taken.replay.as_ref().unwrap().actor, "admin-token");
    let busy = replay.outcomes.iter().find(|o| o.id == in_flight).unwrap();
    assert_eq!(busy.status, Outcome::InProgress as i32);
    assert!(
        busy.message.contains("mtls:spiffe://ops/other"),
        "{}",
        busy.message
    );

    // Three copies of the first event reached the topic (original, crashed replay,
    // takeover); the ledger holds it once.
    assert_eq!(
        topic_message_count(&tansu.brokers(), METERING, Duration::from_secs(10)).unwrap(),
        14
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let t = ledger_totals(&stack.database_url).await;
    assert_eq!(
        t,
        LedgerTotals {
            rows: 11,
            distinct_ids: 11,
            charged: sum - charged(&events[8])
        }
    );
    let count = client
        .count_dead_letters(pb::CountDeadLettersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!((count.total, count.pending, count.replayed), (2, 1, 1));
    assert_eq!(wait_for_dlq_size(&stack, DLQ, 1.0).await, Some(1.0));

    // The broker goes away: reads fail within dlq.readTimeout (UNAVAILABLE), and
    // the gauges keep their last values.
    writer.shutdown().await.unwrap();
    tansu.stop().await.unwrap();
    let started = Instant::now();
    let status = client
        .count_dead_letters(pb::CountDeadLettersRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("dead-letter topic"), "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(gauge(&stack, "caracal_dlq_size", DLQ).await, Some(1.0));

    stack.stop().await.unwrap();
}

// ------------------------------------------------------------------ foreign topics

/// A dead letter naming a topic that is not one of the deployment's (anyone who
/// can write to the DLQ topic can forge one) is refused: nothing published,
/// nothing claimed; a dead letter of ours in the same call still replays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_naming_a_foreign_topic_is_refused_and_nothing_is_published() {
    use caracal_service_kit::dlq::DeadLetter;
    use rdkafka::producer::FutureRecord;

    const DLQ: &str = "caracal.dlq.foreign";
    const EVIL: &str = "evil.topic";
    let (tansu, stack) = setup(DLQ).await;
    // The foreign topic exists: a replay to it would go through.
    create_topics(&tansu.brokers(), &[EVIL], 1).await.unwrap();
    let letter = |topic: &str, offset: i64| {
        DeadLetter::from_kafka(
            topic,
            0,
            offset,
            Some(b"k"),
            &[("event_id".to_owned(), Some(b"e-1".to_vec()))],
            Some(b"payload"),
            "forged".to_owned(),
            0,
            "caracal-ledger-writer",
            chrono::Utc::now(),
        )
        .to_json()
    };
    let p = charge_producer(&tansu.brokers()).unwrap();
    let mut ids = Vec::new();
    for (topic, offset) in [(EVIL, 7), (METERING, 8), (DLQ, 9)] {
        let json = letter(topic, offset);
        let delivered = p
            .send(
                FutureRecord::<(), [u8]>::to(DLQ)
                    .partition(0)
                    .payload(json.as_slice()),
                Duration::from_secs(30),
            )
            .await
            .unwrap();
        ids.push(format!("{}:{}", delivered.partition, delivered.offset));
    }
    let (evil, ours, loop_back) = (ids[0].clone(), ids[1].clone(), ids[2].clone());
    let mut client = dlq_client(&stack);
    assert_eq!(
        wait_for_dead_letters(&mut client, 3, Duration::from_secs(60))
            .await
            .pending,
        3
    );

    let replay = client
        .replay_dead_letters(pb::ReplayDeadLettersRequest {
            ids: ids.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let outcome = |id: &str| replay.outcomes.iter().find(|o| o.id == id).unwrap().clone();
    let refused = outcome(&evil);
    assert_eq!(
        refused.status,
        Outcome::NotReplayable as i32,
        "{}: {}",
        refused.status,
        refused.message
    );
    assert!(refused.message.contains(EVIL), "{}", refused.message);
    assert!(refused.replay.is_none());
    // The DLQ itself is no replay target either (a replay would only dead-letter
    // the message again).
    let looped = outcome(&loop_back);
    assert_eq!(
        looped.status,
        Outcome::NotReplayable as i32,
        "{}",
        looped.message
    );
    assert!(looped.message.contains(DLQ), "{}", looped.message);
    let replayed = outcome(&ours);
    assert_eq!(
        replayed.status,
        Outcome::Replayed as i32,
        "{}",
        replayed.message
    );
    assert_eq!((replay.replayed, replay.not_replayed), (1, 2));

    // Nothing reached the foreign topic; only our dead letter was claimed.
    assert_eq!(
        topic_message_count(&tansu.brokers(), EVIL, Duration::from_secs(10)).unwrap(),
        0
    );
    assert_eq!(
        topic_message_count(&tansu.brokers(), METERING, Duration::from_secs(10)).unwrap(),
        1
    );
    #[derive(diesel::QueryableByName)]
    struct Claim {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        dlq_partition: i32,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        dlq_offset: i64,
        #[diesel(sql_type = diesel::sql_types::Text)]
        target_topic: String,
    }
    let mut conn = stack.db().await.unwrap();
    let claims: Vec<Claim> = diesel::sql_query(
        "SELECT dlq_partition, dlq_offset, target_topic FROM dlq_replays WHERE dlq_topic = $1",
    )
    .bind::<diesel::sql_types::Text, _>(DLQ)
    .load(&mut conn)
    .await
    .unwrap();
    let claims: Vec<(String, String)> = claims
        .into_iter()
        .map(|c| {
            (
                format!("{}:{}", c.dlq_partition, c.dlq_offset),
                c.target_topic,
            )
        })
        .collect();
    assert_eq!(claims, [(ours.clone(), METERING.to_owned())]);
    let count = client
        .count_dead_letters(pb::CountDeadLettersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!((count.total, count.pending, count.replayed), (3, 2, 1));

    // Asked again (and with all_pending), still refused, still nothing published.
    let again = client
        .replay_dead_letters(pb::ReplayDeadLettersRequest {
            all_pending: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((again.replayed, again.not_replayed), (0, 2));
    assert!(again
        .outcomes
        .iter()
        .all(|o| o.status == Outcome::NotReplayable as i32));
    assert_eq!(
        topic_message_count(&tansu.brokers(), EVIL, Duration::from_secs(10)).unwrap(),
        0
    );

    stack.stop().await.unwrap();
}

// ------------------------------------------------------------------ reflection

#[tokio::test]
async fn grpcurl_finds_the_dead_letter_service_by_reflection() {
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };
    let stack = TestStack::start().await.unwrap();
    let mut reflection = ServerReflectionClient::new(stack.channel.clone());
    let requests = vec![
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        },
        // What `grpcurl describe caracal.v1.DeadLetterService` asks for.
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "caracal.v1.DeadLetterService".to_owned(),
            )),
        },
    ];
    let mut stream = reflection
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let listed = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = listed.message_response else {
        panic!("unexpected reflection answer: {listed:?}");
    };
    assert!(
        list.service
            .iter()
            .any(|s| s.name == "caracal.v1.DeadLetterService"),
        "{list:?}"
    );
    let described = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::FileDescriptorResponse(files)) = described.message_response else {
        panic!("unexpected reflection answer: {described:?}");
    };
    let file = prost_types::FileDescriptorProto::decode(files.file_descriptor_proto[0].as_slice())
        .unwrap();
    assert_eq!(file.name(), "caracal/v1/dlq.proto");
    let service = &file.service[0];
    let methods: Vec<&str> = service.method.iter().map(|m| m.name()).collect();
    assert_eq!(
        methods,
        [
            "ListDeadLetters",
            "CountDeadLetters",
            "GetDeadLetter",
            "ReplayDeadLetters"
        ]
    );
    stack.stop().await.unwrap();
}
