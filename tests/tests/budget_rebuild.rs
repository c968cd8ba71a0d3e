//! Redis losing its data (issue 23 item 3), against a Redis server of the test's
//! own (so FLUSHALL is real), PostgreSQL and the authz-service; the ledger is
//! written from the outbox's charge events by the ledger-writer's own decode and
//! insert (`TestStack::outbox_charges`, `insert_rows`).
//!
//! - Before the loss, a rebuild is refused (the counters are live) and a dry run
//!   shows what the ledger says.
//! - After FLUSHALL, every Authorize is refused (ABORTED: a 503 refusal even from
//!   a gateway that fails open), Settle is UNAVAILABLE, and a restarted
//!   service does not re-establish the state on its own.
//! - `RebuildBudgets` puts every current window back from the ledger, exactly:
//!   reconcile shows no drift, and each policy admits exactly its limit minus the
//!   ledger's charges, not a micro more.

use caracal_consumers::ledger::insert_rows;
use caracal_proto::v1 as pb;
use std::time::Duration;

use caracal_tests::{
    authorize_request, charges::wait_for_ledger_rows, gateway_client, kafka::Tansu,
    own_redis::OwnRedis, TestStack,
};
use tonic::{transport::Channel, Code};

fn usd(micros: i64) -> pb::Money {
    pb::Money {
        currency: "USD".into(),
        micros,
        amount: String::new(),
    }
}

type Authz = pb::budget_authorization_client::BudgetAuthorizationClient<caracal_tests::GatewaySvc>;

async fn authorize(
    authz: &mut Authz,
    key: &str,
    request_id: &str,
    micros: i64,
) -> Result<pb::AuthorizeResponse, tonic::Status> {
    authz
        .authorize(authorize_request(key, request_id, micros))
        .await
        .map(tonic::Response::into_inner)
}

fn allowed(r: &pb::AuthorizeResponse) -> bool {
    r.decision == pb::Decision::Allow as i32
}

fn settle_request(reservation_id: &str, actual: i64) -> pb::SettleRequest {
    pb::SettleRequest {
        reservation_id: reservation_id.into(),
        actual_cost: Some(usd(actual)),
        ..Default::default()
    }
}

/// Authorize + Settle, both answered; returns the reservation id.
async fn spend(
    authz: &mut Authz,
    key: &str,
    request_id: &str,
    estimate: i64,
    actual: i64,
) -> String {
    let r = authorize(authz, key, request_id, estimate).await.unwrap();
    assert!(allowed(&r), "{request_id}: {r:?}");
    authz
        .settle(settle_request(&r.reservation_id, actual))
        .await
        .unwrap();
    r.reservation_id
}

/// Every charge event in the outbox, written into the ledger.
async fn write_ledger(stack: &TestStack) -> usize {
    let rows: Vec<_> = stack
        .outbox_charges()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let mut conn = stack.db().await.unwrap();
    insert_rows(&mut conn, &rows).await.unwrap();
    rows.len()
}

#[tokio::test]
async fn redis_losing_its_data_refuses_every_call_until_the_budget_is_rebuilt_from_the_ledger() {
    let redis = OwnRedis::start().await;
    let stack = TestStack::start_with(|c| {
        redis.configure(&mut c.redis);
        c.redis.partitions = 4;
    })
    .await
    .unwrap();
    let mut ledger = stack.ledger();

    // A fresh deployment establishes the state at start.
    let state = ledger
        .budget_state(pb::BudgetStateRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(state.established);
    assert_eq!(state.partitions, 4);
    assert!(state.lost_partitions.is_empty(), "{state:?}");

    // Two hierarchies: a parent with a child (a daily calendar policy and an
    // hourly rolling one on the parent, a total one on the child), and another root.
    let (parent, parent_key) = stack.agent_with_key("rebuild-parent", None).await.unwrap();
    let (child, child_key) = stack
        .agent_with_key("rebuild-child", Some(&parent))
        .await
        .unwrap();
    let (other, other_key) = stack.agent_with_key("rebuild-other", None).await.unwrap();
    let daily = stack
        .usd_policy(&parent, "10.00", "daily", "calendar", "charge")
        .await
        .unwrap();
    let hourly = stack
        .usd_policy(&parent, "5.00", "hourly", "rolling", "charge")
        .await
        .unwrap();
    let total = stack
        .usd_policy(&child, "3.00", "total", "calendar", "charge")
        .await
        .unwrap();
    let other_daily = stack
        .usd_policy(&other, "2.00", "daily", "calendar", "charge")
        .await
        .unwrap();

    let mut authz = gateway_client(stack.channel.clone());
    // parent: 4 x 0.40 = 1.60; child: 3 x 0.30 = 0.90 (on parent's policies too);
    // other: 2 x 0.25 = 0.50.
    for i in 0..4 {
        spend(&mut authz, &parent_key, &format!("p-{i}"), 500_000, 400_000).await;
    }
    for i in 0..3 {
        spend(&mut authz, &child_key, &format!("c-{i}"), 500_000, 300_000).await;
    }
    let mut settled = String::new();
    for i in 0..2 {
        settled = spend(&mut authz, &other_key, &format!("o-{i}"), 500_000, 250_000).await;
    }
    assert_eq!(write_ledger(&stack).await, 9);
    let parent_spent = 1_600_000 + 900_000;
    let child_spent = 900_000;
    let other_spent = 500_000;

    // Nothing lost: a rebuild is refused; a dry run shows the ledger's view.
    let refused = ledger
        .rebuild_budgets(pb::RebuildBudgetsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    let dry = ledger
        .rebuild_budgets(pb::RebuildBudgetsRequest {
            dry_run: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(dry.lost_partitions.is_empty() && dry.restored_partitions.is_empty());
    let spent_of = |r: &pb::RebuildBudgetsResponse, policy: &str| {
        r.counters
            .iter()
            .filter(|c| c.policy_id == policy)
            .map(|c| c.spent_micros)
            .sum::<i64>()
    };
    assert_eq!(dry.counters_total, 4);
    assert_eq!(spent_of(&dry, &daily), parent_spent);
    assert_eq!(spent_of(&dry, &hourly), parent_spent);
    assert_eq!(spent_of(&dry, &total), child_spent);
    assert_eq!(spent_of(&dry, &other_daily), other_spent);

    // Redis loses everything.
    let _: () = redis.cmd(&mut redis::cmd("FLUSHALL")).await;

    // Every call refused: never an allow on an emptied budget.
    for (key, id) in [
        (&parent_key, "after-p"),
        (&child_key, "after-c"),
        (&other_key, "after-o"),
    ] {
        let e = authorize(&mut authz, key, id, 1).await.unwrap_err();
        assert_eq!(e.code(), Code::Aborted, "{id}: {e:?}");
        assert!(e.message().contains("budget rebuild"), "{e:?}");
    }
    // A Settle (here a retry of one that landed) is "try again later".
    let settle = authz
        .settle(settle_request(&settled, 250_000))
        .await
        .unwrap_err();
    assert_eq!(settle.code(), Code::Unavailable, "{settle:?}");
    let state = ledger
        .budget_state(pb::BudgetStateRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(state.established);
    assert_eq!(state.lost_partitions, vec![0, 1, 2, 3]);

    // A second replica started now (or this one restarted) does not re-establish
    // the state: the database remembers it existed.
    let mut config = TestStack::config(&stack.database_url).await.unwrap();
    config.redis = stack.redis.clone();
    let second = caracal_authz::serve(config).await.unwrap();
    let channel = Channel::from_shared(format!("http://{}", second.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut second_authz = gateway_client(channel);
    let e = authorize(&mut second_authz, &parent_key, "after-restart", 1)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e:?}");
    let markers: Vec<String> = redis
        .cmd(redis::cmd("KEYS").arg(format!("{}:*:state", stack.key_prefix)))
        .await;
    assert!(markers.is_empty(), "{markers:?}");

    // A dry run writes nothing: still refused.
    let dry = ledger
        .rebuild_budgets(pb::RebuildBudgetsRequest {
            dry_run: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dry.lost_partitions, vec![0, 1, 2, 3]);
    assert!(dry.restored_partitions.is_empty());
    assert_eq!(spent_of(&dry, &daily), parent_spent);
    let e = authorize(&mut authz, &parent_key, "after-dry-run", 1)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e:?}");

    // While the ledger-writer has lag, its unwritten charges would be missing from
    // the counters: refused unless asked for.
    {
        use diesel_async::RunQueryDsl;
        let mut conn = stack.db().await.unwrap();
        diesel::sql_query(
            "INSERT INTO consumer_partitions (group_id, topic, kafka_partition, committed_offset, \
                                              end_offset) \
             VALUES ('caracal-ledger-writer', 'caracal.metering.events', 0, 40, 47)",
        )
        .execute(&mut conn)
        .await
        .unwrap();
        let lagging = ledger
            .rebuild_budgets(pb::RebuildBudgetsRequest::default())
            .await
            .unwrap_err();
        assert_eq!(lagging.code(), Code::FailedPrecondition, "{lagging:?}");
        assert!(lagging.message().contains("7 events behind"), "{lagging:?}");
        diesel::sql_query("UPDATE consumer_partitions SET committed_offset = 47")
            .execute(&mut conn)
            .await
            .unwrap();
    }

    // The rebuild: every current window from the ledger, the markers back.
    let rebuilt = ledger
        .rebuild_budgets(pb::RebuildBudgetsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rebuilt.restored_partitions, vec![0, 1, 2, 3]);
    assert_eq!(rebuilt.policies, 4);
    assert_eq!(spent_of(&rebuilt, &daily), parent_spent);
    assert_eq!(spent_of(&rebuilt, &hourly), parent_spent);
    assert_eq!(spent_of(&rebuilt, &total), child_spent);
    assert_eq!(spent_of(&rebuilt, &other_daily), other_spent);
    let state = ledger
        .budget_state(pb::BudgetStateRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(state.lost_partitions.is_empty(), "{state:?}");
    assert!(!state.rebuilt_at.is_empty());

    // Redis and the ledger agree on every window.
    let report = ledger
        .reconcile(pb::ReconcileRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.policies_checked, 4);
    assert_eq!(report.policies_with_drift, 0, "{report:#?}");
    let redis_spent = |policy: &str| {
        report
            .policies
            .iter()
            .filter(|p| p.policy_id == policy)
            .map(|p| p.redis_spent_micros)
            .sum::<i64>()
    };
    assert_eq!(redis_spent(&daily), parent_spent);
    assert_eq!(redis_spent(&hourly), parent_spent);
    assert_eq!(redis_spent(&total), child_spent);
    assert_eq!(redis_spent(&other_daily), other_spent);

    // Exactly the rest of each budget, not a micro more (a budget handed back whole
    // would admit these). The child first: its total policy (3.00 - 0.90) is
    // tighter than its parent's hourly one (5.00 - 2.50); then the parent has
    // what the child left of the hourly policy; the other root 2.00 - 0.50.
    let child_room = 3_000_000 - child_spent;
    let parent_room = 5_000_000 - parent_spent - child_room;
    for (key, id, room) in [
        (&child_key, "rest-c", child_room),
        (&parent_key, "rest-p", parent_room),
        (&other_key, "rest-o", 2_000_000 - other_spent),
    ] {
        assert!(room > 0, "{id}");
        let over = authorize(&mut authz, key, &format!("{id}-over"), room + 1)
            .await
            .unwrap();
        assert!(!allowed(&over), "{id}: {room} + 1 admitted: {over:?}");
        let exact = authorize(&mut authz, key, id, room).await.unwrap();
        assert!(allowed(&exact), "{id}: {room} refused: {exact:?}");
    }
    // The second replica decides again too (the markers are shared).
    let e = authorize(&mut second_authz, &other_key, "rest-o-more", 1)
        .await
        .unwrap();
    assert!(!allowed(&e), "the other root's budget is used up: {e:?}");
    second.shutdown().await.unwrap();
    stack.stop().await.unwrap();
}

/// Waits (bounded) until the ledger holds `rows` rows, exactly; returns their sum.
async fn ledger_reaches(stack: &TestStack, rows: i64) -> i64 {
    let t = wait_for_ledger_rows(&stack.database_url, rows, Duration::from_secs(60)).await;
    assert_eq!(t.rows, rows, "the ledger's rows against the charges made");
    t.charged
}

/// A stack on `redis` whose relay publishes to a tansu broker of its own, and a
/// ledger-writer (in this process) writing the stack's database from it.
async fn relayed_stack(
    redis: &OwnRedis,
) -> (Tansu, TestStack, caracal_consumers::launch::RunningConsumer) {
    let tansu = Tansu::start_new().await.unwrap();
    let brokers = tansu.brokers();
    let b = brokers.clone();
    let stack = TestStack::start_with(|c| {
        redis.configure(&mut c.redis);
        c.redis.partitions = 4;
        c.budget.relay_enabled = true;
        c.kafka.brokers = b;
        c.kafka.topic_partitions = 2;
    })
    .await
    .unwrap();
    let writer = caracal_consumers::ledger::start(
        caracal_tests::consumer_config::database_consumer_config(
            &stack.database_url,
            &brokers,
            &format!("rebuild-{}", uuid::Uuid::new_v4().simple()),
        )
        .unwrap(),
    )
    .await
    .unwrap();
    (tansu, stack, writer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_open_at_the_loss_and_settles_during_it_come_back_with_the_rebuild() {
    let redis = OwnRedis::start().await;
    let (tansu, stack, writer) = relayed_stack(&redis).await;

    let (agent, key) = stack.agent_with_key("reopen", None).await.unwrap();
    stack
        .usd_policy(&agent, "10.00", "daily", "calendar", "charge")
        .await
        .unwrap();
    let hourly = stack
        .usd_policy(&agent, "5.00", "hourly", "rolling", "charge")
        .await
        .unwrap();
    let mut authz = gateway_client(stack.channel.clone());
    // Two calls still running at the loss, one released before it, three settled.
    let open_1 = authorize(&mut authz, &key, "open-1", 500_000)
        .await
        .unwrap();
    let open_2 = authorize(&mut authz, &key, "open-2", 700_000)
        .await
        .unwrap();
    let released = authorize(&mut authz, &key, "released", 300_000)
        .await
        .unwrap();
    assert!(allowed(&open_1) && allowed(&open_2) && allowed(&released));
    authz
        .release(pb::ReleaseRequest {
            reservation_id: released.reservation_id.clone(),
            reason: "client_abort".into(),
        })
        .await
        .unwrap();
    for i in 0..3 {
        spend(&mut authz, &key, &format!("done-{i}"), 500_000, 400_000).await;
    }
    // The settles were relayed after the allows and the release (one outbox per
    // partition, relayed in order): once they are in the ledger, the decisions are
    // on their topic.
    assert_eq!(ledger_reaches(&stack, 3).await, 1_200_000);

    let _: () = redis.cmd(&mut redis::cmd("FLUSHALL")).await;
    // A call ends during the loss: its Settle cannot be answered, but is kept.
    let e = authz
        .settle(settle_request(&open_1.reservation_id, 450_000))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    let e = authorize(&mut authz, &key, "during", 1).await.unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e:?}");

    let mut ledger = stack.ledger();
    let dry = ledger
        .rebuild_budgets(pb::RebuildBudgetsRequest {
            dry_run: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dry.reservations_open, 2, "{dry:?}");
    assert_eq!((dry.reservations_restored, dry.parked_applied), (0, 0));
    let rebuilt = ledger
        .rebuild_budgets(pb::RebuildBudgetsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rebuilt.restored_partitions, vec![0, 1, 2, 3]);
    assert_eq!(rebuilt.reservations_open, 2, "{rebuilt:?}");
    assert_eq!(rebuilt.reservations_restored, 2, "{rebuilt:?}");
    assert_eq!(rebuilt.parked_applied, 1, "{rebuilt:?}");
    assert!(rebuilt.reservations_source.starts_with("decisions topic"));

    // The Settle made during the loss lands, once.
    assert_eq!(ledger_reaches(&stack, 4).await, 1_650_000);
    let again = authz
        .settle(settle_request(&open_1.reservation_id, 450_000))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.charged.as_ref().map(|m| m.micros), Some(450_000));

    // The hourly policy holds the ledger's 1.65 and the open 0.70: 2.65 left, not a
    // micro more.
    let room = 5_000_000 - 1_650_000 - 700_000;
    let over = authorize(&mut authz, &key, "rest-over", room + 1)
        .await
        .unwrap();
    assert!(!allowed(&over), "{over:?}");
    let rest = authorize(&mut authz, &key, "rest", room).await.unwrap();
    assert!(allowed(&rest), "{rest:?}");

    // The restored reservation settles normally, once.
    let settled = authz
        .settle(settle_request(&open_2.reservation_id, 100_000))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(settled.charged.as_ref().map(|m| m.micros), Some(100_000));
    authz
        .settle(settle_request(&open_2.reservation_id, 100_000))
        .await
        .unwrap();
    authz
        .release(pb::ReleaseRequest {
            reservation_id: rest.reservation_id.clone(),
            reason: "client_abort".into(),
        })
        .await
        .unwrap();
    assert_eq!(ledger_reaches(&stack, 5).await, 1_750_000);
    let report = ledger
        .reconcile(pb::ReconcileRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.policies_with_drift, 0, "{report:#?}");
    let hourly_spent: i64 = report
        .policies
        .iter()
        .filter(|p| p.policy_id == hourly)
        .map(|p| p.redis_spent_micros)
        .sum();
    assert_eq!(hourly_spent, 1_750_000);

    writer.shutdown().await.unwrap();
    stack.stop().await.unwrap();
    drop(tansu);
}

/// One chat completion through Envoy for `key`; returns (status, body).
async fn call_through(envoy: &caracal_tests::envoy::Envoy, key: &str, i: usize) -> (u16, String) {
    let body = serde_json::json!({
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": format!("rebuild call {i}")}],
        "max_tokens": 64,
    });
    let auth = format!("Bearer {key}");
    let resp = envoy
        .post_json(
            "/v1/chat/completions",
            &[
                ("authorization", auth.as_str()),
                (caracal_tests::mock_llm::COMPLETION_TOKENS_HEADER, "20"),
            ],
            &body,
        )
        .await
        .unwrap();
    (resp.status, resp.text())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_envoy_failing_open_an_emptied_redis_admits_nothing_until_rebuilt() {
    use caracal_tests::{
        envoy::{Envoy, EnvoyOptions, Gateway},
        mock_llm::MockLlm,
    };
    let redis = OwnRedis::start().await;
    let (tansu, stack, writer) = relayed_stack(&redis).await;
    stack
        .set_token_price("openai", "gpt-4o", "USD", ["2.00", "8.00", "1.00"])
        .await
        .unwrap();
    let (agent, key) = stack.agent_with_key("through-envoy", None).await.unwrap();
    // A few calls' worth (each is charged ~0.0002 at these prices).
    let limit = 2_000;
    stack
        .usd_policy(&agent, "0.002", "daily", "calendar", "charge")
        .await
        .unwrap();
    let mock = MockLlm::start().await.unwrap();
    let port = stack.server.as_ref().unwrap().grpc_addr.port();
    // A gateway that lets calls through when the service cannot be asked: even so,
    // nothing passes on an emptied budget.
    let mut options = EnvoyOptions::new(Gateway::Wasm, port, mock.port());
    options.failure_mode = "allow";
    let envoy = Envoy::start(options).await.unwrap();

    let mut answered = 0;
    for i in 0..3 {
        let (status, body) = call_through(&envoy, &key, i).await;
        assert_eq!(status, 200, "{body}");
        answered += 1;
    }
    let before = ledger_reaches(&stack, answered).await;
    assert!(before > 0);

    let _: () = redis.cmd(&mut redis::cmd("FLUSHALL")).await;
    for i in 10..14 {
        let (status, body) = call_through(&envoy, &key, i).await;
        assert_eq!(status, 503, "call {i} on an emptied budget: {body}");
        assert!(body.contains("authorization_unavailable"), "{body}");
    }
    let rebuilt = stack
        .ledger()
        .rebuild_budgets(pb::RebuildBudgetsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rebuilt.restored_partitions.len(), 4);

    // Then exactly what the ledger left: calls pass until the limit, and the ledger
    // never goes past it.
    let mut refused = false;
    for i in 20..60 {
        let (status, body) = call_through(&envoy, &key, i).await;
        match status {
            200 => answered += 1,
            429 => {
                refused = true;
                break;
            }
            other => panic!("call {i}: {other} {body}"),
        }
    }
    assert!(refused, "the budget ran out");
    let spent = ledger_reaches(&stack, answered).await;
    assert!(
        spent <= limit,
        "the ledger holds {spent} of a {limit} limit"
    );
    let report = stack
        .ledger()
        .reconcile(pb::ReconcileRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.policies_with_drift, 0, "{report:#?}");

    drop(envoy);
    mock.stop().await;
    writer.shutdown().await.unwrap();
    stack.stop().await.unwrap();
    drop(tansu);
}
