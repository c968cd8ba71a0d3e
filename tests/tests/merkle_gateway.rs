//! The Merkle log's full loop (issue 26): an agent's calls through the real Envoy
//! and filter -> authz-service -> outbox -> tansu -> the real ledger-writer (with its
//! sequencer) -> a signed checkpoint -> `caracal merkle prove` -> `caracal merkle
//! verify-proof` offline with the exported public key. Then the charge's row is
//! edited in PostgreSQL: `caracal merkle verify-range` exits non-zero naming it,
//! the failure counter rises, and the old proof file still verifies (it proves
//! what was signed, which is what makes the edit visible).

use std::{sync::Arc, time::Duration};

use caracal_consumers::{config::ConsumerConfig, ledger};
use caracal_tests::{
    charges::agent_charges,
    cli_process::run_caracal,
    envoy::{Envoy, EnvoyOptions, Gateway},
    kafka::Tansu,
    mock_llm::{MockLlm, COMPLETION_TOKENS_HEADER},
    probe::{http_get, metric_value},
    TestStack,
};
use diesel_async::RunQueryDsl;
use serde_json::json;

const CLI: &str = env!("CARGO_BIN_EXE_caracal-under-test");
const CALLS: usize = 12;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charge_through_the_gateway_is_proven_offline_and_its_edit_is_named() {
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
    let dir = tempfile::tempdir().unwrap();
    let mut wc = ConsumerConfig::default();
    wc.database.url = stack.database_url.clone();
    wc.database.db_pool_size = 2;
    wc.kafka.brokers = brokers.clone();
    wc.consumer.http_addr = "127.0.0.1:0".parse().unwrap();
    wc.consumer.group_id = format!("merkle-{}", uuid::Uuid::new_v4().simple());
    wc.consumer.batch_wait_ms = 20;
    let m = &mut wc.ledger_writer.merkle;
    m.key_dir = dir.path().join("keys");
    m.batch_size_limit = 1000;
    m.batch_timeout_seconds = 1;
    m.self_check_interval_seconds = 1;
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
    let (agent, key) = stack.agent_with_key("merkle-agent", None).await.unwrap();
    stack
        .usd_policy(&agent, "10.00", "daily", "calendar", "charge")
        .await
        .unwrap();
    for i in 0..CALLS {
        let body = json!({
            "model": "gpt-4o",
            "messages": [{"role": "user", "content": format!("merkle call {i}")}],
            "max_tokens": 64,
        });
        let completion = (10 + i).to_string();
        let auth = format!("Bearer {key}");
        let resp = envoy
            .post_json(
                "/v1/chat/completions",
                &[
                    ("authorization", auth.as_str()),
                    (COMPLETION_TOKENS_HEADER, completion.as_str()),
                ],
                &body,
            )
            .await
            .unwrap();
        assert_eq!(resp.status, 200, "{}", resp.text());
    }

    // Every call in the ledger, and under a signed checkpoint.
    let mut conn = stack.db().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let rows = loop {
        let rows = agent_charges(&mut conn, &agent).await.unwrap();
        let (_, checkpointed) = caracal_merkle_log::sequencer::state(&mut conn)
            .await
            .unwrap();
        if rows.len() == CALLS && checkpointed >= CALLS as u64 {
            break rows;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {CALLS} rows, checkpoint at {checkpointed}",
            rows.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let victim = &rows[CALLS / 2];
    assert!(victim.charged_micros > 0);

    // The proof, and the public key, through the service and the CLI.
    let proof = dir.path().join("proof.json");
    let public = dir.path().join("public.pem");
    let run = run_caracal(
        CLI,
        &stack,
        &[
            "merkle",
            "prove",
            "--event-id",
            &victim.event_id,
            "--out",
            proof.to_str().unwrap(),
        ],
    )
    .await
    .unwrap();
    assert_eq!(run.code, 0, "{} {}", run.out, run.err);
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&proof).unwrap()).unwrap();
    assert_eq!(file["event"]["event_id"], victim.event_id.as_str());
    assert_eq!(file["event"]["charged_micros"], victim.charged_micros);
    let run = run_caracal(
        CLI,
        &stack,
        &[
            "merkle",
            "export-public-key",
            "--out",
            public.to_str().unwrap(),
        ],
    )
    .await
    .unwrap();
    assert_eq!(run.code, 0, "{} {}", run.out, run.err);

    // Offline: no server, no database (an unreachable server is given).
    let offline = |args: Vec<String>| {
        std::process::Command::new(CLI)
            .args(["--server", "http://127.0.0.1:9"])
            .args(args)
            .env_remove("CARACAL_SERVER")
            .output()
            .unwrap()
    };
    let verify_proof = || {
        offline(vec![
            "merkle".into(),
            "verify-proof".into(),
            proof.display().to_string(),
            "--public-key".into(),
            public.display().to_string(),
        ])
    };
    let out = verify_proof();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("OK") && text.contains(&victim.event_id),
        "{text}"
    );

    // verify-range over today passes...
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    let run = run_caracal(
        CLI,
        &stack,
        &["merkle", "verify-range", "--start", &today, "--end", &today],
    )
    .await
    .unwrap();
    assert_eq!(run.code, 0, "{} {}", run.out, run.err);

    // ...until the charge is edited in PostgreSQL behind the ledger's back.
    for sql in [
        "SET session_replication_role = replica".to_owned(),
        format!(
            "UPDATE ledger_events SET charged_micros = 1 WHERE event_id = '{}'",
            victim.event_id
        ),
        "SET session_replication_role = DEFAULT".to_owned(),
    ] {
        diesel::sql_query(sql).execute(&mut conn).await.unwrap();
    }
    let run = run_caracal(
        CLI,
        &stack,
        &["merkle", "verify-range", "--start", &today, "--end", &today],
    )
    .await
    .unwrap();
    assert_ne!(run.code, 0, "the edit went unnoticed: {}", run.out);
    assert!(
        run.out.contains(&victim.event_id) || run.err.contains(&victim.event_id),
        "verify-range does not name {}: {} {}",
        victim.event_id,
        run.out,
        run.err
    );
    let others = rows
        .iter()
        .filter(|r| r.event_id != victim.event_id)
        .filter(|r| run.out.contains(&r.event_id))
        .count();
    assert_eq!(others, 0, "only the edited event is named: {}", run.out);
    // The counter rose (the service's verify-range and the writer's self-check
    // share this test process's registry).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, metrics) = http_get(writer.http_addr, "/metrics").await;
        let failures = metric_value(&metrics, "caracal_merkle_verification_failures_total", &[])
            .unwrap_or(0.0);
        if failures >= 1.0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no failure counted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The proof made before the edit still verifies: it proves what was signed.
    assert!(verify_proof().status.success());

    writer.shutdown().await.unwrap();
    drop(envoy);
    stack.stop().await.unwrap();
}
