//! The metrics-aggregator on the shared local Redis Cluster (`redis.mode:
//! cluster`): spend of many agents — whose keys live on different slots and
//! shards — is counted exactly, once per event, per agent and across agents.

use std::time::{Duration, Instant};

use caracal_consumers::aggregator;
use caracal_domain::spend::{self, SpendKeys, TOTAL_FIELD};
use caracal_service_kit::redis::{query_each, RedisMode};
use caracal_tests::{
    charges::{charge_producer, produce_events, Charge, METERING},
    consumer_config::consumer_config,
    kafka::{create_topics, Tansu},
    redis_cluster::ensure_shared,
};
use chrono::Utc;
use uuid::Uuid;

const AGENTS: usize = 24;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spend_is_exact_per_agent_and_in_total_on_a_cluster() {
    let tansu = Tansu::start_new().await.unwrap();
    create_topics(
        &tansu.brokers(),
        &[METERING, "caracal.policy.decisions", "caracal.dlq"],
        3,
    )
    .await
    .unwrap();
    let prefix = format!("t{}", Uuid::new_v4().simple());
    let mut config = consumer_config(
        &tansu.brokers(),
        &format!("agg-{}", Uuid::new_v4().simple()),
    )
    .unwrap();
    config.redis.mode = RedisMode::Cluster;
    config.redis.nodes = ensure_shared().await.unwrap();
    config.redis.key_prefix = prefix.clone();
    config.aggregator.upkeep_interval_ms = 300;
    config.validate().unwrap();
    let endpoint = config.redis.endpoint();
    let agg = aggregator::start(config).await.unwrap();

    // XTU: a currency of this test's own. Agent i spends (i+1) * 1,000 + 7 twice;
    // every event is also sent a second time (a redelivery).
    let cur = "XTU";
    let root = Uuid::new_v4();
    let agents: Vec<Uuid> = (0..AGENTS).map(|_| Uuid::new_v4()).collect();
    let now = Utc::now() - chrono::Duration::minutes(1);
    let ids: Vec<(String, String)> = (0..AGENTS * 2)
        .map(|n| (format!("e{n}/settle"), format!("e{n}")))
        .collect();
    let mut events = Vec::new();
    for (n, (id, rsv)) in ids.iter().enumerate() {
        let i = n % AGENTS;
        events.push(
            Charge {
                agent: agents[i],
                root,
                id,
                kind: "settle",
                reservation: rsv,
                model: "gpt-4o",
                currency: cur,
                micros: (i as i64 + 1) * 1_000 + 7,
                at: now,
            }
            .event(),
        );
    }
    let p = charge_producer(&tansu.brokers()).unwrap();
    produce_events(&p, &events).await.unwrap();
    produce_events(&p, &events).await.unwrap();

    let keys = SpendKeys::new(prefix.clone());
    let day = spend::day_of(now);
    let conn = endpoint.connect_one().unwrap();
    let expected: Vec<i64> = (0..AGENTS)
        .map(|i| 2 * ((i as i64 + 1) * 1_000 + 7))
        .collect();
    let expected_all: i64 = expected.iter().sum();
    let read = || async {
        let mut cmds: Vec<redis::Cmd> = agents
            .iter()
            .map(|a| {
                let mut c = redis::cmd("HGET");
                c.arg(keys.day(&a.to_string(), day, cur)).arg(TOTAL_FIELD);
                c
            })
            .collect();
        let mut all = redis::cmd("HGET");
        all.arg(keys.all_day(day)).arg(cur);
        cmds.push(all);
        let values = query_each(&conn, cmds).await.unwrap();
        values
            .into_iter()
            .map(|v| {
                redis::from_redis_value::<Option<i64>>(v)
                    .unwrap()
                    .unwrap_or(0)
            })
            .collect::<Vec<i64>>()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut got = read().await;
    while got[..AGENTS] != expected[..] || got[AGENTS] != expected_all {
        assert!(
            Instant::now() < deadline,
            "spend on the cluster: {got:?}, expected {expected:?} + {expected_all}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        got = read().await;
    }
    // The agents' keys really are spread over the shards.
    let slots: std::collections::BTreeSet<u16> = agents
        .iter()
        .map(|a| caracal_service_kit::redis::slot_of(&keys.day(&a.to_string(), day, cur)))
        .collect();
    assert!(slots.len() > AGENTS / 2, "{slots:?}");
    // Nothing changes afterwards (each event counted once).
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(read().await, got);
    agg.shutdown().await.unwrap();
    let mut conn = conn;
    for key in caracal_tests::redis_keys(&mut conn, &format!("{prefix}:*"))
        .await
        .unwrap()
    {
        let _: () = redis::cmd("DEL")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}
