//! The whole pipeline end to end: agent calls through the real Envoy and filter, the
//! authz-service reserving and settling in Redis, its outbox relayed to a real
//! Kafka-protocol broker (tansu), and the real ledger-writer writing PostgreSQL.
//!
//! After a burst of calls from a three-level hierarchy (one child runs into its
//! limit) and the pipeline drained, for every agent and every policy:
//! ledger total (last charge per reservation) = the Redis spent counter = the sum of
//! what each answered call cost by the provider's reported usage and the price book.
//!
//!   cargo test -p caracal-tests --test pipeline_e2e

use std::{collections::HashMap, sync::Arc, time::Duration};

use caracal_consumers::{config::ConsumerConfig, ledger};
use caracal_tests::{
    envoy::{Envoy, EnvoyOptions, Gateway},
    kafka::{topic_message_count, Tansu},
    mock_llm::{MockLlm, COMPLETION_TOKENS_HEADER, STATUS_HEADER},
    TestStack,
};
use diesel_async::RunQueryDsl;
use serde_json::{json, Value};

const CALLS: usize = 240;
const CONCURRENCY: usize = 16;
/// Micro-units per token at the prices set below ($2 / $8 per million tokens).
const INPUT_MICROS: i64 = 2;
const OUTPUT_MICROS: i64 = 8;

/// What one call cost by the usage the provider reported (`None`: not charged).
#[derive(Debug, Clone)]
struct Answered {
    agent: usize,
    status: u16,
    cost: Option<i64>,
}

/// The provider's usage in a JSON answer or in the last usage chunk of an SSE stream.
fn reported_usage(body: &str) -> Option<(i64, i64)> {
    let usage = |v: &Value| -> Option<(i64, i64)> {
        let u = v.get("usage")?;
        Some((
            u["prompt_tokens"].as_i64()?,
            u["completion_tokens"].as_i64()?,
        ))
    };
    if let Ok(v) = serde_json::from_str::<Value>(body) {
        return usage(&v);
    }
    body.lines()
        .rev()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find_map(|v| usage(&v))
}

async fn call(envoy: &Envoy, i: usize, agent: usize, key: &str) -> Answered {
    let stream = i % 3 == 1;
    let fail = i % 7 == 5;
    let mut body = json!({
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": format!("pipeline call {i}: tell me something")}],
        "max_tokens": 64,
    });
    if stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    let completion = (10 + i % 25).to_string();
    let mut headers: Vec<(&str, String)> = vec![
        ("authorization", format!("Bearer {key}")),
        (COMPLETION_TOKENS_HEADER, completion),
    ];
    if fail {
        headers.push((STATUS_HEADER, "500".into()));
    }
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let resp = envoy
        .post_json("/v1/chat/completions", &headers, &body)
        .await
        .unwrap();
    let cost = if (200..300).contains(&resp.status) {
        let (prompt, completion) = reported_usage(&resp.text())
            .unwrap_or_else(|| panic!("a 2xx answer reports usage: {}", resp.text()));
        Some(prompt * INPUT_MICROS + completion * OUTPUT_MICROS)
    } else {
        None
    };
    Answered {
        agent,
        status: resp.status,
        cost,
    }
}

#[derive(diesel::QueryableByName, Debug)]
struct Sum {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    micros: i64,
}

/// Ledger rows and the sum of the final charge of each reservation matching `filter`.
async fn ledger_sum(stack: &TestStack, filter: &str) -> Sum {
    let mut conn = stack.db().await.unwrap();
    diesel::sql_query(format!(
        "SELECT count(*) AS n, coalesce(sum(charged_micros), 0)::int8 AS micros \
         FROM ledger_final_charges WHERE {filter}"
    ))
    .get_result(&mut conn)
    .await
    .unwrap()
}

async fn ledger_rows(stack: &TestStack) -> i64 {
    stack.count("ledger_events").await.unwrap_or(0)
}

/// Spent on a policy's counters (its one window: the test runs inside it).
async fn spent(stack: &TestStack, policy: &str) -> i64 {
    let counters = stack.policy_counters(policy).await.unwrap();
    counters
        .iter()
        .map(|c| c.get("s").copied().unwrap_or(0))
        .sum()
}

/// Entries still in the service's Redis outbox streams (not yet relayed).
async fn outbox_backlog(stack: &TestStack) -> i64 {
    let client = redis::Client::open(stack.redis.url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut n = 0;
    for p in 0..4u16 {
        let len: i64 = redis::cmd("XLEN")
            .arg(format!("{}:{{p{p}}}:outbox", stack.key_prefix))
            .query_async(&mut conn)
            .await
            .unwrap();
        n += len;
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_totals_equal_the_counters_and_the_reported_costs_after_a_burst_through_envoy() {
    let tansu = Tansu::start_new().await.unwrap();
    let brokers = tansu.brokers();
    let b = brokers.clone();
    let stack = TestStack::start_with(move |c| {
        c.budget.relay_enabled = true;
        c.kafka.brokers = b;
        c.kafka.topic_partitions = 3;
    })
    .await
    .unwrap();
    let mut wc = ConsumerConfig::default();
    wc.database.url = stack.database_url.clone();
    wc.database.db_pool_size = 2;
    wc.kafka.brokers = brokers.clone();
    wc.consumer.http_addr = "127.0.0.1:0".parse().unwrap();
    wc.consumer.group_id = format!("e2e-{}", uuid::Uuid::new_v4().simple());
    wc.consumer.session_timeout_ms = 6000;
    wc.consumer.batch_wait_ms = 20;
    let writer = ledger::start(wc).await.unwrap();

    let mock = MockLlm::start().await.unwrap();
    let port = stack.server.as_ref().unwrap().grpc_addr.port();
    let envoy = Arc::new(
        Envoy::start(EnvoyOptions::new(Gateway::Wasm, port, mock.port()))
            .await
            .unwrap(),
    );
    stack
        .set_token_price("openai", "gpt-4o", "USD", ["2.00", "8.00", "1.00"])
        .await
        .unwrap();

    // root -> child -> grandchild, and a second child that runs into its limit.
    let (root, _) = stack.agent_with_key("e2e-root", None).await.unwrap();
    let (child, key_child) = stack
        .agent_with_key("e2e-child", Some(&root))
        .await
        .unwrap();
    let (grand, key_grand) = stack
        .agent_with_key("e2e-grandchild", Some(&child))
        .await
        .unwrap();
    let (tight, key_tight) = stack
        .agent_with_key("e2e-tight", Some(&root))
        .await
        .unwrap();
    let p_root = stack
        .usd_policy(&root, "100.00", "monthly", "calendar", "charge")
        .await
        .unwrap();
    let p_child = stack
        .usd_policy(&child, "50.00", "daily", "calendar", "charge")
        .await
        .unwrap();
    let p_grand = stack
        .usd_policy(&grand, "50.00", "total", "calendar", "charge")
        .await
        .unwrap();
    // ~20 calls' worth: the rest of its calls are refused.
    let p_tight = stack
        .usd_policy(&tight, "0.0050", "total", "calendar", "release")
        .await
        .unwrap();
    let agents = [child.clone(), grand.clone(), tight.clone()];
    let keys = [key_child, key_grand, key_tight];

    let gate = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let mut tasks = Vec::with_capacity(CALLS);
    for i in 0..CALLS {
        let (envoy, gate) = (envoy.clone(), gate.clone());
        let agent = i % 3;
        let key = keys[agent].clone();
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.unwrap();
            call(&envoy, i, agent, &key).await
        }));
    }
    let mut answered = Vec::with_capacity(CALLS);
    for t in tasks {
        answered.push(t.await.unwrap());
    }
    let mut by_status: HashMap<u16, usize> = HashMap::new();
    for a in &answered {
        *by_status.entry(a.status).or_default() += 1;
    }
    eprintln!("statuses: {by_status:?}");
    let refused = by_status.get(&429).copied().unwrap_or(0);
    assert!(
        refused >= 20,
        "the tight agent runs into its limit: {by_status:?}"
    );
    assert!(by_status.get(&500).copied().unwrap_or(0) > 0);
    let charged_calls = answered.iter().filter(|a| a.cost.is_some()).count();
    assert!(charged_calls >= 120, "{by_status:?}");
    let cost_of = |agent: usize| -> i64 {
        answered
            .iter()
            .filter(|a| a.agent == agent)
            .filter_map(|a| a.cost)
            .sum()
    };
    let calls_of = |agent: usize| -> i64 {
        answered
            .iter()
            .filter(|a| a.agent == agent && a.cost.is_some())
            .count() as i64
    };

    // Drained: the outbox is empty, every metering message is in the ledger, and
    // nothing moves any more.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut last = (-1, -1);
    loop {
        let backlog = outbox_backlog(&stack).await;
        let produced =
            topic_message_count(&brokers, "caracal.metering.events", Duration::from_secs(10))
                .unwrap();
        let rows = ledger_rows(&stack).await;
        if backlog == 0 && produced == rows && (produced, rows) == last && rows > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "pipeline drained: backlog {backlog}, produced {produced}, ledger rows {rows}"
        );
        last = (produced, rows);
        tokio::time::sleep(Duration::from_millis(700)).await;
    }

    for (i, agent) in agents.iter().enumerate() {
        let ledger = ledger_sum(&stack, &format!("agent_id = '{agent}'")).await;
        assert_eq!(
            (ledger.n, ledger.micros),
            (calls_of(i), cost_of(i)),
            "agent {i}: one ledger charge per answered call, at the provider's reported cost"
        );
    }
    let all: i64 = (0..3).map(cost_of).sum();
    assert!(
        cost_of(2) <= 5_000,
        "the tight agent stays within its limit"
    );
    for (policy, expected) in [
        (&p_root, all),
        (&p_child, cost_of(0) + cost_of(1)),
        (&p_grand, cost_of(1)),
        (&p_tight, cost_of(2)),
    ] {
        let ledger = ledger_sum(&stack, &format!("'{policy}' = ANY(policy_ids)")).await;
        let redis = spent(&stack, policy).await;
        assert_eq!(
            (ledger.micros, redis),
            (expected, expected),
            "policy {policy}: ledger = counter = reported costs"
        );
    }

    // The operator's view of the same: `caracal ledger reconcile` finds no drift on
    // any of the four policies, and the totals it compared are the ones above.
    let report = stack
        .ledger()
        .reconcile(caracal_proto::v1::ReconcileRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (report.policies_checked, report.policies_with_drift),
        (4, 0),
        "{report:?}"
    );
    for p in &report.policies {
        assert_eq!(p.drift_micros, 0, "{p:?}");
        assert_eq!(p.ledger_micros, spent(&stack, &p.policy_id).await, "{p:?}");
    }
    let reconciled_root = report.policies.iter().find(|p| p.policy_id == p_root);
    assert_eq!(reconciled_root.map(|p| p.ledger_micros), Some(all));

    writer.shutdown().await.unwrap();
    drop(envoy);
    mock.stop().await;
    stack.stop().await.unwrap();
}
