//! Kafka outage, end to end: with the broker (tansu) stopped, 5,000 Authorize +
//! Settle pairs still work; their events wait in the Redis outbox; when the broker
//! returns, exactly 5,000 charge events arrive, each once, with the right amounts.

use std::{collections::HashSet, sync::Arc, time::Duration};

use caracal_proto::v1 as pb;
use caracal_tests::{
    kafka::{consume_all, topic_message_count, Tansu},
    TestStack,
};
use prost::Message;

const PAIRS: usize = 5_000;
const WORKERS: usize = 32;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_wait_out_a_broker_outage_and_arrive_exactly_once() {
    let mut tansu = Tansu::start_new().await.unwrap();
    let brokers = tansu.brokers();
    let b = brokers.clone();
    let stack = TestStack::start_with(move |c| {
        c.budget.relay_enabled = true;
        c.kafka.brokers = b;
        c.kafka.topic_partitions = 3;
    })
    .await
    .unwrap();
    let (agent_id, key) = stack.agent_with_key("steady", None).await.unwrap();
    stack
        .usd_policy(&agent_id, "100000", "daily", "calendar", "")
        .await
        .unwrap();

    tansu.stop().await.unwrap();

    // Settle amount of pair i: 1000 + i micros (so sums and identities are checkable).
    let key = Arc::new(key);
    let mut tasks = Vec::new();
    for w in 0..WORKERS {
        let mut authz = stack.authz();
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let mut reservations = Vec::new();
            for i in (w..PAIRS).step_by(WORKERS) {
                let r = authz
                    .authorize(caracal_tests::authorize_request(
                        &key,
                        &format!("outage-{i}"),
                        5_000,
                    ))
                    .await
                    .unwrap()
                    .into_inner();
                assert_eq!(r.decision, pb::Decision::Allow as i32, "{}", r.message);
                authz
                    .settle(pb::SettleRequest {
                        reservation_id: r.reservation_id.clone(),
                        actual_cost: Some(pb::Money {
                            currency: "USD".into(),
                            micros: 1_000 + i as i64,
                            amount: String::new(),
                        }),
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                reservations.push((r.reservation_id, 1_000 + i as i64));
            }
            reservations
        }));
    }
    let mut expected = std::collections::HashMap::new();
    for t in tasks {
        for (rid, amount) in t.await.unwrap() {
            expected.insert(format!("{rid}/settle"), amount);
        }
    }
    assert_eq!(expected.len(), PAIRS);

    // While the broker is down every event is still in the outbox.
    let conn = stack.redis_conn().unwrap();
    let keys = caracal_authz::budget::KeySpace::new(stack.key_prefix.clone(), 4);
    let depth = caracal_authz::outbox::outbox_depth(&conn, &keys)
        .await
        .unwrap();
    assert_eq!(
        depth,
        2 * PAIRS as u64,
        "one decision and one charge event per pair wait in the outbox"
    );

    tansu.start().await.unwrap();
    // Bounded wait for the relay to drain the outbox.
    let mut drained = false;
    for _ in 0..600 {
        if caracal_authz::outbox::outbox_depth(&conn, &keys)
            .await
            .unwrap()
            == 0
        {
            drained = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        drained,
        "the relay did not drain the outbox after the broker returned"
    );

    // Every charge arrives (bounded wait; a loaded machine makes consumers slow)...
    let charges = consume_all(
        &brokers,
        "caracal.metering.events",
        PAIRS,
        Duration::from_secs(180),
    )
    .await
    .unwrap();
    assert_eq!(charges.len(), PAIRS, "every charge event arrived");
    // ...and the topic holds exactly that many: none was published twice.
    let stored =
        topic_message_count(&brokers, "caracal.metering.events", Duration::from_secs(30)).unwrap();
    assert_eq!(
        stored, PAIRS as i64,
        "exactly one charge event per settle in the topic"
    );
    let mut seen = HashSet::new();
    let mut total = 0i64;
    for (k, payload, headers) in &charges {
        let e = pb::ChargeEvent::decode(payload.as_slice()).unwrap();
        assert_eq!(k, &agent_id, "keyed by the root agent");
        assert_eq!(e.root_agent_id, agent_id);
        assert_eq!(e.kind, "settle");
        assert_eq!(headers.get("event_id"), Some(&e.event_id));
        let want = expected
            .get(&e.event_id)
            .unwrap_or_else(|| panic!("unexpected event {}", e.event_id));
        let charged = e.charged.as_ref().unwrap();
        assert_eq!((charged.micros, charged.currency.as_str()), (*want, "USD"));
        assert_eq!(e.reserved.as_ref().unwrap().micros, 5_000);
        assert!(seen.insert(e.event_id.clone()), "duplicate {}", e.event_id);
        total += charged.micros;
    }
    let want_total: i64 = expected.values().sum();
    assert_eq!(total, want_total);
    let decisions = consume_all(
        &brokers,
        "caracal.policy.decisions",
        PAIRS,
        Duration::from_secs(180),
    )
    .await
    .unwrap();
    assert_eq!(decisions.len(), PAIRS, "one allow decision per authorize");
    let stored = topic_message_count(
        &brokers,
        "caracal.policy.decisions",
        Duration::from_secs(30),
    )
    .unwrap();
    assert_eq!(
        stored, PAIRS as i64,
        "no decision event was published twice"
    );
    let ids: HashSet<String> = decisions
        .iter()
        .map(|(_, p, _)| pb::DecisionEvent::decode(p.as_slice()).unwrap().event_id)
        .collect();
    assert_eq!(ids.len(), PAIRS, "decision events are distinct");
    stack.stop().await.unwrap();
}
