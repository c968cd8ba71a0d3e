//! The outbox relay against a real Redis (127.0.0.1:6379, or the local cluster) and a real Kafka-protocol
//! broker (tansu): events arrive exactly once with the right fields, poison entries
//! go to the dead-letter topic, and a broker outage delays events without losing or
//! deleting any.
//!
//! The outbox entries are written with XADD exactly as `authorize.lua` and
//! `finish.lua` write them (same fields, same order).

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use caracal_authz::{
    budget::KeySpace,
    kafka::KafkaConfig,
    outbox::{outbox_depth, OutboxRelay},
};
use caracal_proto::v1::{ChargeEvent, Decision, DecisionEvent, DenyReason};
use caracal_service_kit::redis::RedisConn;
use caracal_tests::kafka::{consume_all, topic_message_count, Consumed, Tansu};
use prost::Message;
use tokio::{sync::watch, task::JoinHandle};

const AT_MS: i64 = 1_770_000_000_250;

/// A connection of its own (the relay gets another one, as in the service, so big
/// XRANGE replies never queue the test's calls): the standalone Redis, or the
/// shared cluster when this file runs as `cluster_outbox_relay`.
async fn redis() -> RedisConn {
    tokio::time::timeout(Duration::from_secs(30), caracal_tests::test_redis())
        .await
        .expect("Redis connection timed out")
        .expect("the tests' Redis")
}

fn key_space() -> KeySpace {
    KeySpace::new(format!("test-{}", uuid::Uuid::new_v4().simple()), 4)
}

fn kafka_config(brokers: &str) -> KafkaConfig {
    KafkaConfig {
        brokers: brokers.to_owned(),
        topic_partitions: 3,
        ..KafkaConfig::default()
    }
}

async fn xadd(conn: &mut RedisConn, stream: &str, fields: &[(&str, String)]) -> String {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream).arg("*");
    for (k, v) in fields {
        cmd.arg(*k).arg(v);
    }
    cmd.query_async(conn).await.unwrap()
}

/// An entry as authorize.lua writes it (allow when `deny_policy` is None).
fn authorize_entry(
    event_id: &str,
    agent: &str,
    root: &str,
    amount: i64,
    deny_policy: Option<&str>,
) -> Vec<(&'static str, String)> {
    let (decision, reason, policy, rsv) = match deny_policy {
        Some(p) => ("deny", "budget_exceeded", p.to_owned(), String::new()),
        None => (
            "allow",
            "",
            String::new(),
            format!("rsv_0_{}", uuid::Uuid::new_v4().simple()),
        ),
    };
    vec![
        ("type", "decision".into()),
        ("event_id", event_id.into()),
        ("kind", "authorize".into()),
        ("decision", decision.into()),
        ("reason", reason.into()),
        ("request_id", format!("req-{event_id}")),
        ("agent_id", agent.into()),
        ("root_agent_id", root.into()),
        ("policy_id", policy),
        ("reservation_id", rsv),
        ("amount", amount.to_string()),
        ("currency", "USD".into()),
        ("provider", "openai".into()),
        ("model", "gpt-4o".into()),
        ("resource", "api.openai.com/v1/chat/completions".into()),
        ("at_ms", AT_MS.to_string()),
    ]
}

/// A settle entry as finish.lua writes it.
fn charge_entry(
    rsv: &str,
    agent: &str,
    root: &str,
    reserved: i64,
    charged: i64,
) -> Vec<(&'static str, String)> {
    vec![
        ("type", "charge".into()),
        ("kind", "settle".into()),
        ("reserved", reserved.to_string()),
        ("charged", charged.to_string()),
        ("input_tokens", "1200".into()),
        ("output_tokens", "300".into()),
        ("cached_input_tokens", "200".into()),
        ("price_version", "4".into()),
        ("policy_ids", "pol-child,pol-root".into()),
        ("event_id", format!("{rsv}/settle")),
        ("reservation_id", rsv.into()),
        ("request_id", format!("req-{rsv}")),
        ("agent_id", agent.into()),
        ("root_agent_id", root.into()),
        ("currency", "USD".into()),
        ("provider", "anthropic".into()),
        ("model", "claude-sonnet".into()),
        ("at_ms", AT_MS.to_string()),
    ]
}

/// A release entry as finish.lua writes it.
fn release_entry(rsv: &str, agent: &str, root: &str, amount: i64) -> Vec<(&'static str, String)> {
    vec![
        ("type", "decision".into()),
        ("kind", "release".into()),
        ("decision", "allow".into()),
        ("reason", "client_abort".into()),
        ("policy_id", String::new()),
        ("amount", amount.to_string()),
        ("resource", "api.anthropic.com/v1/messages".into()),
        ("event_id", format!("{rsv}/release")),
        ("reservation_id", rsv.into()),
        ("request_id", format!("req-{rsv}")),
        ("agent_id", agent.into()),
        ("root_agent_id", root.into()),
        ("currency", "USD".into()),
        ("provider", "anthropic".into()),
        ("model", "claude-sonnet".into()),
        ("at_ms", AT_MS.to_string()),
    ]
}

fn spawn_relay(
    conn: RedisConn,
    ks: &KeySpace,
    cfg: &KafkaConfig,
) -> (watch::Sender<bool>, JoinHandle<()>) {
    spawn_relay_as(conn, ks, cfg, &format!("relay-{}", uuid::Uuid::new_v4()))
}

fn spawn_relay_as(
    conn: RedisConn,
    ks: &KeySpace,
    cfg: &KafkaConfig,
    owner: &str,
) -> (watch::Sender<bool>, JoinHandle<()>) {
    let relay = OutboxRelay::new(conn, ks.clone(), cfg, owner.to_owned()).unwrap();
    let (tx, rx) = watch::channel(false);
    (tx, tokio::spawn(relay.run(rx)))
}

async fn stop_relay(tx: watch::Sender<bool>, handle: JoinHandle<()>) {
    tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(15), handle)
        .await
        .expect("relay did not stop within 15 s")
        .unwrap();
}

/// Waits (bounded) until the outbox of `ks` is empty; returns how long it took.
async fn wait_drained(conn: &mut RedisConn, ks: &KeySpace, timeout: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let depth = outbox_depth(conn, ks).await.unwrap();
        if depth == 0 {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "outbox still holds {depth} entries after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn cleanup(conn: &mut RedisConn, ks: &KeySpace) {
    for p in 0..ks.partitions() {
        let _: () = redis::cmd("DEL")
            .arg(ks.outbox(p))
            .arg(ks.relay_lease(p))
            .query_async(conn)
            .await
            .unwrap();
    }
}

fn by_event_id(msgs: &[Consumed]) -> HashMap<String, &Consumed> {
    msgs.iter()
        .map(|m| (m.2.get("event_id").cloned().unwrap_or_default(), m))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_arrive_once_with_their_fields() {
    let tansu = Tansu::start_new().await.unwrap();
    let brokers = tansu.brokers();
    let cfg = kafka_config(&brokers);
    caracal_authz::kafka::ensure_topics(&cfg).await.unwrap();
    // Idempotent: a second call with the topics present succeeds.
    caracal_authz::kafka::ensure_topics(&cfg).await.unwrap();

    let ks = key_space();
    let mut conn = redis().await;
    // Several hierarchies, so several partitions; per root: allow, deny, settle, release.
    let mut decisions = Vec::new();
    let mut charges = Vec::new();
    for i in 0..8 {
        let root = format!("root-{i}-{}", uuid::Uuid::new_v4());
        let child = format!("child-{i}");
        let outbox = ks.outbox(ks.partition_of(&root));
        let allow = format!("allow-{i}-{}", uuid::Uuid::new_v4());
        let deny = format!("deny-{i}-{}", uuid::Uuid::new_v4());
        let rsv = format!(
            "rsv_{}_{}",
            ks.partition_of(&root),
            uuid::Uuid::new_v4().simple()
        );
        let rsv2 = format!(
            "rsv_{}_{}",
            ks.partition_of(&root),
            uuid::Uuid::new_v4().simple()
        );
        xadd(
            &mut conn,
            &outbox,
            &authorize_entry(&allow, &child, &root, 2_500_000, None),
        )
        .await;
        xadd(
            &mut conn,
            &outbox,
            &authorize_entry(&deny, &child, &root, 99_000_001, Some("pol-root")),
        )
        .await;
        xadd(
            &mut conn,
            &outbox,
            &charge_entry(&rsv, &child, &root, 2_500_000, 2_750_000 + i),
        )
        .await;
        xadd(
            &mut conn,
            &outbox,
            &release_entry(&rsv2, &child, &root, 1_000_000),
        )
        .await;
        decisions.push((allow, root.clone(), Decision::Allow));
        decisions.push((deny, root.clone(), Decision::Deny));
        decisions.push((format!("{rsv2}/release"), root.clone(), Decision::Allow));
        charges.push((format!("{rsv}/settle"), root.clone(), 2_750_000 + i));
    }
    assert_eq!(outbox_depth(&conn, &ks).await.unwrap(), 32);

    let (tx, handle) = spawn_relay(redis().await, &ks, &cfg);
    let took = wait_drained(&mut conn, &ks, Duration::from_secs(60)).await;
    eprintln!("32 events relayed in {took:?}");

    // Every event arrives (bounded, generous wait: consumers are slow on a loaded
    // machine), and the topics hold exactly that many: none was sent twice.
    let (d, c) = tokio::join!(
        consume_all(
            &brokers,
            &cfg.decisions_topic,
            decisions.len(),
            Duration::from_secs(120)
        ),
        consume_all(
            &brokers,
            &cfg.metering_topic,
            charges.len(),
            Duration::from_secs(120)
        ),
    );
    let (d, c) = (d.unwrap(), c.unwrap());
    assert_eq!(d.len(), decisions.len(), "every decision arrived");
    assert_eq!(c.len(), charges.len(), "every charge arrived");
    for (topic, want) in [
        (&cfg.decisions_topic, decisions.len()),
        (&cfg.metering_topic, charges.len()),
    ] {
        let stored = topic_message_count(&brokers, topic, Duration::from_secs(30)).unwrap();
        assert_eq!(stored, want as i64, "{topic}: every event exactly once");
    }

    let d_by_id = by_event_id(&d);
    for (event_id, root, decision) in &decisions {
        let (key, payload, headers) = d_by_id.get(event_id).copied().unwrap();
        assert_eq!(key, root);
        assert_eq!(
            headers.get("event_type").map(String::as_str),
            Some("decision")
        );
        assert_eq!(headers.get("schema_version").map(String::as_str), Some("1"));
        let ev = DecisionEvent::decode(payload.as_slice()).unwrap();
        assert_eq!(&ev.event_id, event_id);
        assert_eq!(&ev.root_agent_id, root);
        assert_eq!(ev.schema_version, 1);
        assert_eq!(ev.decision(), *decision);
        let at = ev.occurred_at.unwrap();
        assert_eq!((at.seconds, at.nanos), (1_770_000_000, 250_000_000));
        let amount = ev.amount.clone().unwrap();
        assert_eq!(amount.currency, "USD");
        match ev.kind.as_str() {
            "authorize" if *decision == Decision::Deny => {
                assert_eq!(ev.reason(), DenyReason::BudgetExceeded);
                assert_eq!(ev.policy_id, "pol-root");
                assert_eq!(
                    (amount.micros, amount.amount.as_str()),
                    (99_000_001, "99.000001")
                );
            }
            "authorize" => {
                assert_eq!(ev.reason(), DenyReason::Unspecified);
                assert!(ev.reservation_id.starts_with("rsv_0_"));
                assert_eq!((amount.micros, amount.amount.as_str()), (2_500_000, "2.50"));
                assert_eq!(ev.resource, "api.openai.com/v1/chat/completions");
            }
            "release" => {
                assert_eq!((amount.micros, amount.amount.as_str()), (1_000_000, "1.00"));
                assert_eq!(ev.model, "claude-sonnet");
            }
            other => panic!("unexpected kind {other}"),
        }
    }
    let c_by_id = by_event_id(&c);
    for (event_id, root, charged) in &charges {
        let (key, payload, headers) = c_by_id.get(event_id).copied().unwrap();
        assert_eq!(key, root);
        assert_eq!(
            headers.get("event_type").map(String::as_str),
            Some("charge")
        );
        let ev = ChargeEvent::decode(payload.as_slice()).unwrap();
        assert_eq!(ev.kind, "settle");
        assert_eq!(ev.charged.as_ref().unwrap().micros, *charged);
        assert_eq!(ev.reserved.as_ref().unwrap().amount, "2.50");
        assert_eq!(ev.overshoot_micros, charged - 2_500_000);
        assert_eq!(ev.policy_ids, vec!["pol-child", "pol-root"]);
        assert_eq!(ev.price_version, 4);
        let usage = ev.usage.unwrap();
        assert_eq!(
            (
                usage.input_tokens,
                usage.output_tokens,
                usage.cached_input_tokens
            ),
            (1200, 300, 200)
        );
        assert_eq!(&ev.root_agent_id, root);
    }

    stop_relay(tx, handle).await;
    assert_eq!(outbox_depth(&conn, &ks).await.unwrap(), 0);
    cleanup(&mut conn, &ks).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_entries_go_to_the_dlq_and_the_rest_still_arrives() {
    let tansu = Tansu::start_new().await.unwrap();
    let brokers = tansu.brokers();
    let cfg = kafka_config(&brokers);
    caracal_authz::kafka::ensure_topics(&cfg).await.unwrap();

    let ks = key_space();
    let mut conn = redis().await;
    let root = format!("root-{}", uuid::Uuid::new_v4());
    let outbox = ks.outbox(ks.partition_of(&root));
    let good1 = format!("good1-{}", uuid::Uuid::new_v4());
    let good2 = format!("good2-{}", uuid::Uuid::new_v4());
    xadd(
        &mut conn,
        &outbox,
        &authorize_entry(&good1, "a", &root, 10, None),
    )
    .await;
    // Garbled amount.
    let mut garbled = authorize_entry("poison-1", "a", &root, 10, None);
    garbled[10].1 = "12.5".into();
    let bad1 = xadd(&mut conn, &outbox, &garbled).await;
    // Missing event id (and unknown type on another).
    let mut missing = charge_entry("rsv_x", "a", &root, 1, 1);
    missing.retain(|(k, _)| *k != "event_id");
    let bad2 = xadd(&mut conn, &outbox, &missing).await;
    let bad3 = xadd(&mut conn, &outbox, &[("type", "mystery".to_owned())]).await;
    xadd(
        &mut conn,
        &outbox,
        &authorize_entry(&good2, "a", &root, 20, Some("p")),
    )
    .await;

    let (tx, handle) = spawn_relay(redis().await, &ks, &cfg);
    wait_drained(&mut conn, &ks, Duration::from_secs(60)).await;

    let (d, dlq) = tokio::join!(
        consume_all(&brokers, &cfg.decisions_topic, 2, Duration::from_secs(120)),
        consume_all(&brokers, &cfg.dlq_topic, 3, Duration::from_secs(120)),
    );
    let (d, dlq) = (d.unwrap(), dlq.unwrap());
    assert_eq!(
        topic_message_count(&brokers, &cfg.decisions_topic, Duration::from_secs(30)).unwrap(),
        2
    );
    assert_eq!(
        topic_message_count(&brokers, &cfg.dlq_topic, Duration::from_secs(30)).unwrap(),
        3
    );
    let ids: Vec<String> = d
        .iter()
        .map(|m| DecisionEvent::decode(m.1.as_slice()).unwrap().event_id)
        .collect();
    // Both good events, in stream order (same key, same partition).
    assert_eq!(ids, vec![good1.clone(), good2.clone()]);

    assert_eq!(dlq.len(), 3, "exactly the three poison entries");
    let mut seen = HashSet::new();
    for (_, payload, headers) in &dlq {
        let v: serde_json::Value = serde_json::from_slice(payload).unwrap();
        assert_eq!(v["consumer"], "outbox-relay");
        assert_eq!(v["original_stream"], outbox.as_str());
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()));
        assert!(v["fields"]["type"].is_string());
        assert_eq!(
            headers.get("event_type").map(String::as_str),
            Some("dead_letter")
        );
        let entry = v["entry_id"].as_str().unwrap().to_owned();
        if entry == bad1 {
            assert!(v["error"].as_str().unwrap().contains("amount"), "{v}");
            assert_eq!(v["fields"]["amount"], "12.5");
        } else if entry == bad2 {
            assert!(v["error"].as_str().unwrap().contains("event_id"), "{v}");
        } else {
            assert_eq!(entry, bad3);
            assert!(v["error"].as_str().unwrap().contains("mystery"), "{v}");
        }
        seen.insert(entry);
    }
    assert_eq!(seen.len(), 3);

    stop_relay(tx, handle).await;
    cleanup(&mut conn, &ks).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_delays_but_never_loses_events() {
    const N: usize = 2_000;
    let mut tansu = Tansu::start_new().await.unwrap();
    let brokers = tansu.brokers();
    let cfg = kafka_config(&brokers);
    caracal_authz::kafka::ensure_topics(&cfg).await.unwrap();
    tansu.stop().await.unwrap();

    let ks = key_space();
    let mut conn = redis().await;
    let mut expected = HashSet::new();
    let mut adds = Vec::with_capacity(N);
    for i in 0..N {
        let root = format!("root-{}", i % 50);
        let rsv = format!(
            "rsv_{}_{}",
            ks.partition_of(&root),
            uuid::Uuid::new_v4().simple()
        );
        expected.insert(format!("{rsv}/settle"));
        let fields = charge_entry(&rsv, "agent", &root, 1_000, 1_000);
        let mut cmd = redis::cmd("XADD");
        cmd.arg(ks.outbox(ks.partition_of(&root))).arg("*");
        for (k, v) in &fields {
            cmd.arg(*k).arg(v);
        }
        adds.push(cmd);
    }
    caracal_service_kit::redis::query_each(&conn, adds)
        .await
        .unwrap();
    assert_eq!(outbox_depth(&conn, &ks).await.unwrap(), N as u64);

    // A relay shut down in the middle of the outage stops within its grace period
    // and leaves every undelivered entry in the outbox.
    let (tx, handle) = spawn_relay(redis().await, &ks, &cfg);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stopping = Instant::now();
    stop_relay(tx, handle).await;
    eprintln!(
        "outage test: relay stopped {:?} after the request, deliveries pending",
        stopping.elapsed()
    );
    assert_eq!(outbox_depth(&conn, &ks).await.unwrap(), N as u64);

    let (tx, handle) = spawn_relay(redis().await, &ks, &cfg);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        outbox_depth(&conn, &ks).await.unwrap(),
        N as u64,
        "nothing may leave the outbox while the broker is down"
    );
    assert!(
        !handle.is_finished(),
        "the relay keeps running through the outage"
    );

    tansu.start().await.unwrap();
    let drained_in = wait_drained(&mut conn, &ks, Duration::from_secs(120)).await;
    eprintln!(
        "outage test: {N} events relayed {drained_in:?} after the broker came back ({:.0} events/s, including reconnect)",
        N as f64 / drained_in.as_secs_f64()
    );

    // Read until every id was seen: a (harmless, deduplicated) re-sent copy would
    // otherwise take the place of an event in the first N messages.
    let mut want = N;
    let mut consumed = Vec::new();
    let mut ids = HashSet::new();
    for _ in 0..3 {
        consumed = consume_all(&brokers, &cfg.metering_topic, want, Duration::from_secs(90))
            .await
            .unwrap();
        ids = consumed
            .iter()
            .map(|m| ChargeEvent::decode(m.1.as_slice()).unwrap().event_id)
            .collect();
        if ids.len() >= N || consumed.len() < want {
            break;
        }
        want = consumed.len() + (N - ids.len());
    }
    eprintln!(
        "outage test: consumed {} messages, {} distinct event ids",
        consumed.len(),
        ids.len()
    );
    assert_eq!(ids.len(), N, "every event arrived");
    assert_eq!(ids, expected);

    stop_relay(tx, handle).await;
    assert_eq!(outbox_depth(&conn, &ks).await.unwrap(), 0);
    cleanup(&mut conn, &ks).await;
}

/// Two replicas: each partition is drained by one lease holder at a time, and a
/// relay that stops hands its partitions over (releasing its leases) without an
/// event being lost or sent twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_share_partitions_through_leases() {
    let tansu = Tansu::start_new().await.unwrap();
    let brokers = tansu.brokers();
    let cfg = kafka_config(&brokers);
    caracal_authz::kafka::ensure_topics(&cfg).await.unwrap();
    let ks = key_space();
    let mut conn = redis().await;

    async fn add(conn: &mut RedisConn, ks: &KeySpace, n: usize, ids: &mut HashSet<String>) {
        for i in 0..n {
            let root = format!("root-{}", i % 20);
            let rsv = format!(
                "rsv_{}_{}",
                ks.partition_of(&root),
                uuid::Uuid::new_v4().simple()
            );
            ids.insert(format!("{rsv}/settle"));
            xadd(
                conn,
                &ks.outbox(ks.partition_of(&root)),
                &charge_entry(&rsv, "a", &root, 5, 5),
            )
            .await;
        }
    }
    async fn holders(conn: &mut RedisConn, ks: &KeySpace) -> Vec<Option<String>> {
        let mut out = Vec::new();
        for p in 0..ks.partitions() {
            let v: Option<String> = redis::cmd("GET")
                .arg(ks.relay_lease(p))
                .query_async(conn)
                .await
                .unwrap();
            out.push(v);
        }
        out
    }

    let (a, b) = ("relay-a", "relay-b");
    let (tx_a, handle_a) = spawn_relay_as(redis().await, &ks, &cfg, a);
    let (tx_b, handle_b) = spawn_relay_as(redis().await, &ks, &cfg, b);
    let mut expected = HashSet::new();
    add(&mut conn, &ks, 200, &mut expected).await;
    wait_drained(&mut conn, &ks, Duration::from_secs(60)).await;
    for h in holders(&mut conn, &ks).await {
        assert!(h.as_deref() == Some(a) || h.as_deref() == Some(b), "{h:?}");
    }

    // A stops and releases its leases: B takes every partition over.
    stop_relay(tx_a, handle_a).await;
    add(&mut conn, &ks, 200, &mut expected).await;
    wait_drained(&mut conn, &ks, Duration::from_secs(60)).await;
    assert!(holders(&mut conn, &ks)
        .await
        .iter()
        .all(|h| h.as_deref() == Some(b)));

    let consumed = consume_all(&brokers, &cfg.metering_topic, 400, Duration::from_secs(120))
        .await
        .unwrap();
    assert_eq!(
        topic_message_count(&brokers, &cfg.metering_topic, Duration::from_secs(30)).unwrap(),
        400,
        "each of the 400 events stored once"
    );
    let ids: HashSet<String> = consumed
        .iter()
        .map(|m| ChargeEvent::decode(m.1.as_slice()).unwrap().event_id)
        .collect();
    assert_eq!(consumed.len(), 400, "each event exactly once");
    assert_eq!(ids, expected);

    stop_relay(tx_b, handle_b).await;
    // Released on shutdown.
    assert!(holders(&mut conn, &ks).await.iter().all(Option::is_none));
    cleanup(&mut conn, &ks).await;
}
