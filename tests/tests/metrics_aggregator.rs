//! The metrics-aggregator (consumers/) against a real Kafka-protocol broker (tansu)
//! and a real Redis: exact spend per agent / model / hour / day, redeliveries and
//! superseded expiry charges, the spend gauges, spending anomalies on the decisions
//! topic, a Redis outage, and `caracal spend trend` through the CLI.
//!
//! Every test has its own broker and its own Redis key prefix (and agent ids), so
//! tests running side by side never read each other's keys. Metrics are
//! process-wide: each test that reads a gauge or counter uses a currency of its own.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use caracal_consumers::{aggregator, config::ConsumerConfig};
use caracal_domain::spend::{self, SpendKeys};
use caracal_proto::v1::{ChargeEvent, SpendingAnomalyEvent};
use caracal_service_kit::dlq::DeadLetter;
use caracal_tests::{
    charges::{charge_producer, produce_charges, produce_events, Charge, ChargeMessage, METERING},
    consumer_config::consumer_config,
    flaky_proxy::FlakyProxy,
    kafka::{consume_all, create_topics, Tansu},
    probe::{http_get, metric_value},
    redis_url,
    reflection::reflected_services,
    TestStack, ADMIN_TOKEN,
};
use chrono::{DateTime, Duration as Span, Utc};
use prost::Message;
use uuid::Uuid;

const DECISIONS: &str = "caracal.policy.decisions";
const DLQ: &str = "caracal.dlq";
const PARTITIONS: i32 = 3;

// ------------------------------------------------------------------ fixtures

async fn broker() -> Tansu {
    let tansu = Tansu::start_new().await.expect("tansu broker");
    create_topics(&tansu.brokers(), &[METERING, DECISIONS, DLQ], PARTITIONS)
        .await
        .unwrap();
    tansu
}

fn prefix() -> String {
    format!("t{}", Uuid::new_v4().simple())
}

fn aggregator_config(brokers: &str, redis: &str, prefix: &str) -> ConsumerConfig {
    let group = format!("aggregator-{}", Uuid::new_v4().simple());
    let mut c = consumer_config(brokers, &group).unwrap();
    c.redis.url = redis.to_owned();
    c.redis.key_prefix = prefix.to_owned();
    c.redis.timeout_ms = 1000;
    c.aggregator.upkeep_interval_ms = 300;
    c.validate().unwrap();
    c
}

async fn redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis_url().as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Deletes every key of `prefix`.
async fn drop_keys(prefix: &str) {
    let mut conn = redis().await;
    let mut cursor: u64 = 0;
    for _ in 0..10_000 {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .unwrap();
        if !keys.is_empty() {
            let _: () = redis::cmd("DEL")
                .arg(&keys)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
}

/// A bucket hash: field -> micros, without zero fields (a model whose charge
/// was superseded keeps one); empty when the key does not exist.
async fn bucket(key: &str) -> BTreeMap<String, i64> {
    let mut conn = redis().await;
    let all: BTreeMap<String, i64> = redis::cmd("HGETALL")
        .arg(key)
        .query_async(&mut conn)
        .await
        .unwrap();
    all.into_iter().filter(|(_, v)| *v != 0).collect()
}

/// Waits until `check` holds (or `timeout` passes); returns whether it held.
async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn day(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d").to_string()
}

fn hour(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H").to_string()
}

/// Expected bucket contents: bucket part ("2026-02-01" or "2026-02-01T13") ->
/// field -> micros, from (model, micros, time) final charges.
fn expected(
    finals: &[(&str, i64, DateTime<Utc>)],
    part: fn(DateTime<Utc>) -> String,
) -> BTreeMap<String, BTreeMap<String, i64>> {
    let mut out: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    for (model, micros, at) in finals {
        let b = out.entry(part(*at)).or_default();
        *b.entry("total".to_owned()).or_default() += micros;
        *b.entry(format!("model:{model}")).or_default() += micros;
    }
    out
}

// ------------------------------------------------------------------ a. exact spend

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spend_is_exact_per_agent_model_hour_and_day_once_per_event() {
    let tansu = broker().await;
    let prefix = prefix();
    let keys = SpendKeys::new(prefix.clone());
    let config = aggregator_config(&tansu.brokers(), &redis_url(), &prefix);
    let group = config.consumer.group_id.clone();
    let agg = aggregator::start(config).await.unwrap();

    // XTS (the ISO code reserved for tests): this test's gauges are its own.
    let cur = "XTS";
    let (a, b, root) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let now = Utc::now();
    let ago = |h: i64, m: i64| now - Span::hours(h) - Span::minutes(m);
    let c = |agent: Uuid,
             id: &'static str,
             kind: &'static str,
             rsv: &'static str,
             model: &'static str,
             micros: i64,
             at: DateTime<Utc>| Charge {
        agent,
        root,
        id,
        kind,
        reservation: rsv,
        model,
        currency: cur,
        micros,
        at,
    };
    let charges = vec![
        // Agent a over four days, two models; two in the same hour.
        c(
            a,
            "r1/settle",
            "settle",
            "r1",
            "gpt-4o",
            1_250_000,
            ago(72, 0),
        ),
        c(
            a,
            "r2/settle",
            "settle",
            "r2",
            "gpt-4o",
            750_001,
            ago(72, 0) + Span::seconds(1),
        ),
        c(
            a,
            "r3/settle",
            "settle",
            "r3",
            "gpt-4o-mini",
            30_000,
            ago(72, 0) + Span::seconds(2),
        ),
        c(
            a,
            "r4/settle",
            "settle",
            "r4",
            "gpt-4o-mini",
            999_999,
            ago(49, 0),
        ),
        c(
            a,
            "r5/settle",
            "settle",
            "r5",
            "gpt-4o",
            2_000_000,
            ago(26, 0),
        ),
        c(
            a,
            "r6/settle",
            "settle",
            "r6",
            "gpt-4o",
            123_456,
            ago(0, 10),
        ),
        c(
            a,
            "r7/settle",
            "settle",
            "r7",
            "gpt-4o-mini",
            654_321,
            ago(0, 20),
        ),
        // Expired with a charge, then settled late for less a day later: only
        // the final 400_000 counts, in the late settle's buckets.
        c(
            a,
            "r8/expire",
            "expire_charge",
            "r8",
            "gpt-4o",
            900_000,
            ago(50, 0),
        ),
        c(
            a,
            "r8/late",
            "late_settle",
            "r8",
            "gpt-4o",
            400_000,
            ago(25, 0),
        ),
        // Expired with a charge and never settled: the expiry charge counts.
        c(
            a,
            "r9/expire",
            "expire_charge",
            "r9",
            "gpt-4o",
            77_000,
            ago(49, 30),
        ),
        // Agent b: its own keys.
        c(
            b,
            "r10/settle",
            "settle",
            "r10",
            "claude",
            5_000_000,
            ago(0, 15),
        ),
    ];
    let events: Vec<ChargeEvent> = charges.iter().map(Charge::event).collect();
    let p = charge_producer(&tansu.brokers()).unwrap();
    produce_events(&p, &events).await.unwrap();
    // Redeliveries of three of them (the relay resends what it could not confirm),
    // and one garbage message, which goes to the dead-letter topic.
    produce_events(
        &p,
        &[events[0].clone(), events[7].clone(), events[8].clone()],
    )
    .await
    .unwrap();
    produce_charges(
        &p,
        &[ChargeMessage {
            key: root.to_string(),
            payload: vec![0xff; 12],
            event_id: "garbage".to_owned(),
        }],
    )
    .await
    .unwrap();

    let finals_a: Vec<(&str, i64, DateTime<Utc>)> = vec![
        ("gpt-4o", 1_250_000, ago(72, 0)),
        ("gpt-4o", 750_001, ago(72, 0) + Span::seconds(1)),
        ("gpt-4o-mini", 30_000, ago(72, 0) + Span::seconds(2)),
        ("gpt-4o-mini", 999_999, ago(49, 0)),
        ("gpt-4o", 2_000_000, ago(26, 0)),
        ("gpt-4o", 123_456, ago(0, 10)),
        ("gpt-4o-mini", 654_321, ago(0, 20)),
        ("gpt-4o", 400_000, ago(25, 0)),
        ("gpt-4o", 77_000, ago(49, 30)),
    ];
    let days_a = expected(&finals_a, day);
    let hours_a = expected(&finals_a, hour);
    let day_key = |agent: &Uuid, d: &str| format!("{prefix}:spend:{{{agent}}}:day:{d}:{cur}");
    let hour_key = |agent: &Uuid, h: &str| format!("{prefix}:spend:{{{agent}}}:hour:{h}:{cur}");
    // The layout the authz-service reads is the one written.
    assert_eq!(
        keys.day(&a.to_string(), now.date_naive(), cur),
        day_key(&a, &day(now))
    );
    let today_b = day_key(&b, &day(ago(0, 15)));
    assert!(
        eventually(Duration::from_secs(60), || async {
            bucket(&today_b).await.get("total") == Some(&5_000_000)
                && bucket(&day_key(&a, &day(ago(25, 0)))).await.get("total")
                    == days_a[&day(ago(25, 0))].get("total")
        })
        .await,
        "events counted"
    );
    // Whatever was in flight has had time to land twice, if it could.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (d, fields) in &days_a {
        assert_eq!(&bucket(&day_key(&a, d)).await, fields, "day {d}");
    }
    for (h, fields) in &hours_a {
        assert_eq!(&bucket(&hour_key(&a, h)).await, fields, "hour {h}");
    }
    // The superseded expiry's buckets hold nothing of it any more.
    let (h, d) = (hour(ago(50, 0)), day(ago(50, 0)));
    assert_eq!(
        bucket(&hour_key(&a, &h)).await,
        hours_a.get(&h).cloned().unwrap_or_default()
    );
    assert_eq!(
        bucket(&day_key(&a, &d)).await,
        days_a.get(&d).cloned().unwrap_or_default()
    );
    let total_a: i64 = finals_a.iter().map(|f| f.1).sum();
    let counted_a: i64 = days_a.values().map(|f| f["total"]).sum();
    assert_eq!(counted_a, total_a);
    assert_eq!(total_a, 6_284_777);
    assert_eq!(
        bucket(&day_key(&b, &day(ago(0, 15)))).await,
        BTreeMap::from([
            ("total".to_owned(), 5_000_000),
            ("model:claude".to_owned(), 5_000_000)
        ])
    );

    // The dead letter.
    let dead = consume_all(&tansu.brokers(), DLQ, 1, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    let letter: DeadLetter = serde_json::from_slice(&dead[0].1).unwrap();
    assert!(
        letter.error.contains("not a ChargeEvent"),
        "{}",
        letter.error
    );
    assert_eq!(letter.consumer, group);

    // Gauges: today's total across agents, the last hour's rate, the top agents.
    let today = day(Utc::now());
    let spent_today: i64 = finals_a
        .iter()
        .filter(|f| day(f.2) == today)
        .map(|f| f.1)
        .sum::<i64>()
        + if day(ago(0, 15)) == today {
            5_000_000
        } else {
            0
        };
    let today_a: i64 = finals_a
        .iter()
        .filter(|f| day(f.2) == today)
        .map(|f| f.1)
        .sum();
    // Charges of the last 60 complete minutes: those 10, 15 and 20 minutes ago.
    let last_hour = 123_456 + 654_321 + 5_000_000;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let metrics = http_get(agg.http_addr, "/metrics").await.1;
        let values = (
            metric_value(
                &metrics,
                "caracal_spend_total_micros",
                &["currency=\"XTS\""],
            ),
            metric_value(
                &metrics,
                "caracal_spend_rate_micros_per_second",
                &["currency=\"XTS\"", "window=\"1h\""],
            ),
            metric_value(
                &metrics,
                "caracal_agent_spend_today_micros",
                &[&format!("agent_id=\"{a}\""), "currency=\"XTS\""],
            ),
        );
        let want = (
            Some(spent_today as f64),
            Some(last_hour as f64 / 3600.0),
            Some(today_a as f64),
        );
        if values == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "gauges {values:?} != {want:?}: {metrics}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (code, body) = http_get(agg.http_addr, "/health/ready").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("redis"), "{body}");

    agg.shutdown().await.unwrap();
    drop_keys(&prefix).await;
}

// ------------------------------------------------------------------ a2. late redeliveries

/// Deletes every key of `prefix` whose TTL, as Redis reports it, is at most
/// `ttl_s` seconds: what is left of the keys once `ttl_s` seconds pass without a
/// write. Returns the deleted keys.
async fn expire_keys_living_at_most(prefix: &str, ttl_s: u64) -> Vec<String> {
    let mut conn = redis().await;
    let mut cursor: u64 = 0;
    let mut gone = Vec::new();
    for _ in 0..10_000 {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .unwrap();
        for key in keys {
            let ttl: i64 = redis::cmd("TTL")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap();
            if ttl > 0 && ttl as u64 <= ttl_s {
                let _: i64 = redis::cmd("DEL")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                gone.push(key);
            }
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    gone
}

async fn ttl(key: &str) -> i64 {
    redis::cmd("TTL")
        .arg(key)
        .query_async(&mut redis().await)
        .await
        .unwrap()
}

/// A `dlq replay` or an offset reset redelivers events long after they were
/// counted, when their seen markers (9 days) are gone but their day buckets (400
/// days) are not: they count nothing, a superseded expiry stays superseded, and
/// an event older than the day buckets' retention counts nothing at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_redelivered_after_its_seen_marker_expired_counts_once() {
    let tansu = broker().await;
    let prefix = prefix();
    let keys = SpendKeys::new(prefix.clone());
    let config = aggregator_config(&tansu.brokers(), &redis_url(), &prefix);
    let agg = aggregator::start(config).await.unwrap();

    // A currency of its own: this aggregator's gauges touch no other test's.
    let cur = "XRE";
    let (a, b, root) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let at = Utc::now() - Span::minutes(1);
    let c = |agent: Uuid,
             id: &'static str,
             kind: &'static str,
             rsv: &'static str,
             micros: i64,
             at: DateTime<Utc>| Charge {
        agent,
        root,
        id,
        kind,
        reservation: rsv,
        model: "gpt-4o",
        currency: cur,
        micros,
        at,
    };
    // A settle; an expiry charge settled late for less (only the 400_000 counts).
    let first = vec![
        c(a, "r1/settle", "settle", "r1", 1_500_000, at).event(),
        c(a, "r2/expire", "expire_charge", "r2", 900_000, at).event(),
        c(
            a,
            "r2/late",
            "late_settle",
            "r2",
            400_000,
            at + Span::seconds(1),
        )
        .event(),
    ];
    let spent = 1_500_000 + 400_000;
    let (a_id, b_id) = (a.to_string(), b.to_string());
    let a_day = keys.day(&a_id, at.date_naive(), cur);
    let a_hour = keys.hour(&a_id, at, cur);
    let b_day = keys.day(&b_id, at.date_naive(), cur);
    let all_day = keys.all_day(at.date_naive());
    let all_total = || {
        let k = all_day.clone();
        async move {
            redis::cmd("HGET")
                .arg(&k)
                .arg(cur)
                .query_async::<Option<i64>>(&mut redis().await)
                .await
                .unwrap()
                .unwrap_or(0)
        }
    };
    let once = BTreeMap::from([
        ("total".to_owned(), spent),
        ("model:gpt-4o".to_owned(), spent),
    ]);

    let p = charge_producer(&tansu.brokers()).unwrap();
    produce_events(&p, &first).await.unwrap();
    assert!(
        eventually(Duration::from_secs(60), || async {
            bucket(&a_day).await.get("total") == Some(&spent) && all_total().await == spent
        })
        .await,
        "counted: {:?}, all agents {}",
        bucket(&a_day).await,
        all_total().await
    );
    assert_eq!(bucket(&a_day).await, once);

    // Nine days later: every key that lives at most as long as a seen marker is
    // gone (seen markers, reservation records, hour buckets, rankings...).
    let gone = expire_keys_living_at_most(&prefix, spend::SEEN_TTL_S).await;
    assert!(
        gone.contains(&keys.seen(&a_id, "r1/settle")),
        "the seen marker lives at most {} s: {gone:?}",
        spend::SEEN_TTL_S
    );
    assert!(gone.contains(&a_hour), "{gone:?}");
    assert!(!gone.contains(&a_day), "{gone:?}");
    assert!(ttl(&a_day).await > spend::SEEN_TTL_S as i64);

    // The same three events again (a DLQ replay, an offset reset), one from 400
    // days ago, then a marker event of another agent: same root, so the same
    // partition, processed after the others.
    let old_at = at - Span::days(400);
    let mut again = first.clone();
    again.push(c(a, "r0/settle", "settle", "r0", 7_000_000, old_at).event());
    again.push(c(b, "s1/settle", "settle", "s1", 1, at).event());
    produce_events(&p, &again).await.unwrap();
    assert!(
        eventually(Duration::from_secs(60), || async {
            bucket(&b_day).await.get("total") == Some(&1)
        })
        .await,
        "marker event counted"
    );
    assert_eq!(
        bucket(&a_day).await,
        once,
        "redelivered events counted again in the day bucket"
    );
    assert_eq!(all_total().await, spent + 1, "day total across agents");
    assert_eq!(
        bucket(&a_hour).await,
        BTreeMap::new(),
        "an expired hour bucket stays expired"
    );
    assert_eq!(
        bucket(&keys.day(&a_id, old_at.date_naive(), cur)).await,
        BTreeMap::new(),
        "an event older than the day buckets' retention counts nothing"
    );
    // What remembers the counted events lives as long as the day bucket.
    let events = format!("{a_day}:events");
    assert!(
        ttl(&events).await >= ttl(&a_day).await,
        "{events}: {} s, day bucket {} s",
        ttl(&events).await,
        ttl(&a_day).await
    );

    agg.shutdown().await.unwrap();
    drop_keys(&prefix).await;
}

// ------------------------------------------------------------------ b. anomalies

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spike_over_twice_the_weekly_average_is_reported_once() {
    let tansu = broker().await;
    let prefix = prefix();
    let agg = aggregator::start(aggregator_config(&tansu.brokers(), &redis_url(), &prefix))
        .await
        .unwrap();
    // EUR: this test's anomaly counter is its own.
    let cur = "EUR";
    let x: i64 = 1_000_000;
    let (spiky, steady, edge) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let root = Uuid::new_v4();
    let now = Utc::now();
    let ids: Vec<String> = (0..64)
        .map(|i| format!("{}-{i}", Uuid::new_v4().simple()))
        .collect();
    let mut n = 0;
    let mut next = || {
        n += 1;
        ids[n - 1].clone()
    };
    let ev = |agent: Uuid, id: String, micros: i64, at: DateTime<Utc>| {
        Charge {
            agent,
            root,
            id: &id,
            kind: "settle",
            reservation: &id,
            model: "gpt-4o",
            currency: cur,
            micros,
            at,
        }
        .event()
    };
    // Seven days of history at X a day (in the 168 hours before the last 24), for
    // each agent; counted before the last day arrives.
    let mut history = Vec::new();
    for agent in [spiky, steady, edge] {
        for d in 0..7 {
            // Two charges a day summing to X.
            let at = now - Span::hours(25 + 24 * d);
            history.push(ev(agent, next(), x / 4, at));
            history.push(ev(agent, next(), x - x / 4, at - Span::minutes(30)));
        }
    }
    let p = charge_producer(&tansu.brokers()).unwrap();
    produce_events(&p, &history).await.unwrap();
    let keys = SpendKeys::new(prefix.clone());
    let history_total = || async {
        let mut total = 0;
        for agent in [spiky, steady, edge] {
            for d in 0..10 {
                let k = keys.day(&agent.to_string(), (now - Span::days(d)).date_naive(), cur);
                total += bucket(&k).await.get("total").copied().unwrap_or(0);
            }
        }
        total
    };
    assert!(
        eventually(Duration::from_secs(60), || async {
            history_total().await == 21 * x
        })
        .await,
        "history counted"
    );
    let mut conn = redis().await;
    // Then the last 24 hours: spiky 2.5 X, steady X, edge exactly 2 X (not more
    // than twice the average: no anomaly).
    let recent = vec![
        ev(spiky, next(), 2 * x, now - Span::hours(2)),
        ev(spiky, next(), x / 2, now - Span::hours(20)),
        ev(steady, next(), x, now - Span::hours(3)),
        ev(edge, next(), x, now - Span::hours(1)),
        ev(edge, next(), x, now - Span::hours(23)),
    ];
    produce_events(&p, &recent).await.unwrap();

    let found = consume_all(&tansu.brokers(), DECISIONS, 1, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(found.len(), 1, "the spike is reported");
    // A few more upkeep runs: nothing more.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let all = consume_all(&tansu.brokers(), DECISIONS, 2, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(
        all.len(),
        1,
        "exactly one anomaly: once per agent and day, none for the others"
    );
    let (key, payload, headers) = &all[0];
    let event = SpendingAnomalyEvent::decode(payload.as_slice()).unwrap();
    let detected = event.detected_at.unwrap();
    let detected = DateTime::from_timestamp(detected.seconds, 0).unwrap();
    assert_eq!(event.event_id, format!("anomaly/{spiky}/{}", day(detected)));
    assert_eq!(event.schema_version, 1);
    assert_eq!(event.agent_id, spiky.to_string());
    assert_eq!(event.root_agent_id, root.to_string());
    assert_eq!(event.currency, cur);
    assert_eq!(event.last_24h_micros, 2 * x + x / 2);
    assert_eq!(event.daily_average_7d_micros, x);
    assert_eq!(key, &root.to_string());
    assert_eq!(headers["event_type"], "spending_anomaly");
    assert_eq!(headers["event_id"], event.event_id);
    assert_eq!(headers["schema_version"], "1");
    let marker: Option<String> = redis::cmd("GET")
        .arg(keys.anomaly(&spiky.to_string(), detected.date_naive()))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(marker.as_deref(), Some(cur));
    let (_, metrics) = http_get(agg.http_addr, "/metrics").await;
    assert_eq!(
        metric_value(
            &metrics,
            "caracal_spending_anomalies_detected_total",
            &["currency=\"EUR\""]
        ),
        Some(1.0),
        "{metrics}"
    );

    agg.shutdown().await.unwrap();
    drop_keys(&prefix).await;
}

// ------------------------------------------------------------------ c. Redis down

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_loses_and_skips_nothing() {
    let tansu = broker().await;
    let prefix = prefix();
    let target: SocketAddr = {
        let url = redis_url();
        let hostport = url
            .trim_start_matches("redis://")
            .split('/')
            .next()
            .unwrap()
            .to_owned();
        tokio::net::lookup_host(hostport)
            .await
            .unwrap()
            .next()
            .unwrap()
    };
    let proxy = FlakyProxy::start(target).await.unwrap();
    let config = aggregator_config(
        &tansu.brokers(),
        &format!("redis://127.0.0.1:{}", proxy.port),
        &prefix,
    );
    let agg = aggregator::start(config).await.unwrap();
    let keys = SpendKeys::new(prefix.clone());
    let (agent, root) = (Uuid::new_v4(), Uuid::new_v4());
    let now = Utc::now();
    let at = now - Span::minutes(5);
    let run = Uuid::new_v4().simple().to_string();
    let events: Vec<ChargeEvent> = (0..600)
        .map(|i| {
            let id = format!("{run}-{i}");
            Charge {
                agent,
                root,
                id: &format!("{id}/settle"),
                kind: "settle",
                reservation: &id,
                model: if i % 2 == 0 { "m-even" } else { "m-odd" },
                currency: "USD",
                micros: 1 + (i * 7919) % 100_000,
                at,
            }
            .event()
        })
        .collect();
    let sum = |evs: &[ChargeEvent]| -> i64 {
        evs.iter().map(|e| e.charged.as_ref().unwrap().micros).sum()
    };
    let day_key = keys.day(&agent.to_string(), at.date_naive(), "USD");
    let total = || {
        let k = day_key.clone();
        async move { bucket(&k).await.get("total").copied().unwrap_or(0) }
    };
    let p = charge_producer(&tansu.brokers()).unwrap();
    produce_events(&p, &events[..200]).await.unwrap();
    let first = sum(&events[..200]);
    assert!(
        eventually(Duration::from_secs(60), || async { total().await == first }).await,
        "first 200 counted"
    );

    // Down for 10 s while events keep coming.
    proxy.set_down(true);
    let down_at = Instant::now();
    let mut saw_unready = false;
    produce_events(&p, &events[200..400]).await.unwrap();
    while down_at.elapsed() < Duration::from_secs(10) {
        let (code, _) = http_get(agg.http_addr, "/health/ready").await;
        saw_unready |= code == 503;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(total().await, first, "nothing counted while Redis is away");
    assert!(
        saw_unready,
        "readiness drops while the aggregator cannot write"
    );
    proxy.set_down(false);
    produce_events(&p, &events[400..]).await.unwrap();
    // Redeliveries after the outage change nothing.
    produce_events(&p, &events[150..250]).await.unwrap();

    let all = sum(&events);
    assert!(
        eventually(Duration::from_secs(60), || async { total().await == all }).await,
        "every event counted after the outage: {} of {all}",
        total().await
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let day = bucket(&day_key).await;
    let even: i64 = events
        .iter()
        .step_by(2)
        .map(|e| e.charged.as_ref().unwrap().micros)
        .sum();
    assert_eq!(
        day,
        BTreeMap::from([
            ("total".to_owned(), all),
            ("model:m-even".to_owned(), even),
            ("model:m-odd".to_owned(), all - even),
        ]),
        "nothing lost, nothing twice"
    );
    assert!(
        eventually(Duration::from_secs(20), || async {
            http_get(agg.http_addr, "/health/ready").await.0 == 200
        })
        .await,
        "ready again after the outage"
    );
    let (_, metrics) = http_get(agg.http_addr, "/metrics").await;
    assert!(
        metric_value(
            &metrics,
            "caracal_consumer_errors_total",
            &["metrics-aggregator", "kind=\"db\""]
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{metrics}"
    );
    agg.shutdown().await.unwrap();
    drop(proxy);
    drop_keys(&prefix).await;
}

// ------------------------------------------------------------------ d. the CLI

async fn caracal(stack: &TestStack, args: &[&str]) -> (i32, String, String) {
    let url = stack.grpc_url();
    let mut argv = vec!["caracal", "--server", &url, "--admin-token", ADMIN_TOKEN];
    argv.extend_from_slice(args);
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = caracal_cli::run(argv, &mut out, &mut err).await;
    (
        code,
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spend_trend_prints_the_daily_spend_from_the_aggregator() {
    let stack = TestStack::start().await.unwrap();
    let tansu = broker().await;
    // The aggregator writes under the service's Redis prefix, as in production.
    let agg = aggregator::start(aggregator_config(
        &tansu.brokers(),
        &stack.redis.url,
        &stack.key_prefix,
    ))
    .await
    .unwrap();
    let (agent, _) = stack.agent_with_key("trend-agent", None).await.unwrap();
    let agent_id = Uuid::parse_str(&agent).unwrap();
    // Midday of each day, so the days are the same whenever the test runs.
    let today = Utc::now().date_naive();
    let noon = |back: i64| {
        (today - Span::days(back))
            .and_hms_opt(12, 0, 0)
            .unwrap()
            .and_utc()
    };
    let today_at = Utc::now() - Span::seconds(1);
    let c = |id: &'static str, model: &'static str, micros: i64, at: DateTime<Utc>| {
        Charge {
            agent: agent_id,
            root: agent_id,
            id,
            kind: "settle",
            reservation: id,
            model,
            currency: "USD",
            micros,
            at,
        }
        .event()
    };
    let events = vec![
        c("t1", "gpt-4o", 1_500_000, noon(4)),
        c("t2", "gpt-4o-mini", 250_000, noon(4)),
        c("t3", "gpt-4o", 3_000_000, noon(2)),
        c("t4", "gpt-4o-mini", 10_000, today_at),
        c("t5", "gpt-4o", 20_000, today_at),
        // Outside the 5 days asked for.
        c("t6", "gpt-4o", 9_000_000, noon(5)),
    ];
    let p = charge_producer(&tansu.brokers()).unwrap();
    produce_events(&p, &events).await.unwrap();
    let keys = SpendKeys::new(stack.key_prefix.clone());
    let last = keys.day(&agent, today_at.date_naive(), "USD");
    let oldest = keys.day(&agent, noon(5).date_naive(), "USD");
    assert!(
        eventually(Duration::from_secs(60), || async {
            bucket(&last).await.get("total") == Some(&30_000)
                && bucket(&oldest).await.get("total") == Some(&9_000_000)
        })
        .await,
        "events counted"
    );
    let (code, out, err) = caracal(
        &stack,
        &[
            "spend",
            "trend",
            "--agent-id",
            &agent,
            "--days",
            "5",
            "--output",
            "json",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["agent_id"], agent.as_str());
    let usd = &v["currencies"][0];
    assert_eq!(v["currencies"].as_array().unwrap().len(), 1);
    assert_eq!(usd["currency"], "USD");
    let days: Vec<(String, i64)> = usd["days"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["date"].as_str().unwrap().to_owned(),
                d["spend"]["micros"].as_i64().unwrap(),
            )
        })
        .collect();
    let expected_days: Vec<(String, i64)> = vec![
        (day(noon(4)), 1_750_000),
        (day(noon(3)), 0),
        (day(noon(2)), 3_000_000),
        (day(noon(1)), 0),
        (day(today_at), 30_000),
    ];
    assert_eq!(days, expected_days);
    assert_eq!(usd["total"]["micros"], 4_780_000);
    assert_eq!(usd["days"][0]["models"][0]["model"], "gpt-4o");
    assert_eq!(usd["days"][0]["models"][0]["spend"]["micros"], 1_500_000);
    assert_eq!(usd["days"][0]["models"][1]["spend"]["micros"], 250_000);

    let (code, out, err) = caracal(
        &stack,
        &["spend", "trend", "--agent-id", &agent, "--days", "5"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 7, "{out}");
    assert!(lines[0].starts_with("DATE"), "{out}");
    let cells: Vec<Vec<&str>> = lines[1..6]
        .iter()
        .map(|l| l.split_whitespace().take(3).collect())
        .collect();
    let want: Vec<Vec<String>> = expected_days
        .iter()
        .zip(["1.75", "0.00", "3.00", "0.00", "0.03"])
        .map(|((d, _), amount)| vec![d.clone(), "USD".to_owned(), amount.to_owned()])
        .collect();
    assert_eq!(cells, want, "{out}");
    assert!(lines[1].ends_with("gpt-4o 1.50, gpt-4o-mini 0.25"), "{out}");
    assert_eq!(lines[6], "Total USD: 4.78 over 5 days");

    // Usage and lookup errors.
    let (code, _, _) = caracal(
        &stack,
        &["spend", "trend", "--agent-id", &agent, "--days", "0"],
    )
    .await;
    assert_eq!(code, 2);
    let (code, _, err) = caracal(
        &stack,
        &[
            "spend",
            "trend",
            "--agent-id",
            &Uuid::new_v4().to_string(),
            "--days",
            "3",
        ],
    )
    .await;
    assert_eq!(code, 1);
    assert!(err.starts_with("error: NotFound"), "{err}");
    // An agent that never spent: zero days, no currency.
    let (quiet, _) = stack.agent_with_key("quiet-agent", None).await.unwrap();
    let (code, out, err) = caracal(
        &stack,
        &["spend", "trend", "--agent-id", &quiet, "--days", "3"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        format!("No spend recorded for agent {quiet} in the last 3 days.\n")
    );

    // Listed by reflection; admin credentials only.
    let services = reflected_services(stack.channel.clone()).await.unwrap();
    assert!(
        services.iter().any(|s| s == "caracal.v1.SpendService"),
        "{services:?}"
    );
    let status =
        caracal_proto::v1::spend_service_client::SpendServiceClient::new(stack.channel.clone())
            .spend_trend(caracal_proto::v1::SpendTrendRequest {
                agent_id: agent.clone(),
                days: 3,
                currency: String::new(),
            })
            .await
            .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);

    agg.shutdown().await.unwrap();
    stack.stop().await.unwrap();
}

// ------------------------------------------------------------------ e. rediss://

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_to_a_server_with_a_private_ca() {
    let server = caracal_tests::tls::TlsRedis::start(false).await.unwrap();
    let tansu = broker().await;
    let prefix = prefix();
    let url = server.tls_url();

    // Without the CA the certificate is not trusted: nothing is written, not ready.
    let untrusted = aggregator::start(aggregator_config(&tansu.brokers(), &url, &prefix))
        .await
        .unwrap();
    let mut config = aggregator_config(&tansu.brokers(), &url, &prefix);
    config.redis.ca_file = server.ca();
    config.validate().unwrap();
    let agg = aggregator::start(config).await.unwrap();

    let (agent, root) = (Uuid::new_v4(), Uuid::new_v4());
    let at = Utc::now() - Span::minutes(1);
    let events: Vec<ChargeEvent> = [("s1", 1_000_001), ("s2", 2_000_002)]
        .into_iter()
        .map(|(id, micros)| {
            Charge {
                agent,
                root,
                id,
                kind: "settle",
                reservation: id,
                model: "gpt-4o",
                currency: "USD",
                micros,
                at,
            }
            .event()
        })
        .collect();
    produce_events(&charge_producer(&tansu.brokers()).unwrap(), &events)
        .await
        .unwrap();
    let key = SpendKeys::new(prefix.clone()).day(&agent.to_string(), at.date_naive(), "USD");
    let read = || {
        let (url, key) = (server.plain_url(), key.clone());
        async move {
            let mut conn = redis::Client::open(url.as_str())
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap();
            let total: Option<i64> = redis::cmd("HGET")
                .arg(key)
                .arg("total")
                .query_async(&mut conn)
                .await
                .unwrap();
            total
        }
    };
    assert!(
        eventually(Duration::from_secs(60), || async {
            read().await == Some(3_000_003)
        })
        .await,
        "counted over TLS"
    );
    let (code, body) = http_get(agg.http_addr, "/health/ready").await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = http_get(untrusted.http_addr, "/health/ready").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("redis"), "{body}");
    untrusted.shutdown().await.unwrap();
    agg.shutdown().await.unwrap();
}
