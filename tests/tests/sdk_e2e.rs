//! The official OpenAI and Anthropic Python SDKs against the gateway (real Envoy +
//! the built wasm filter + the real authz-service + the mock upstream), through
//! tests/python/sdk_e2e.py, which prints JSON results asserted on here.
//!
//!   cargo test -p caracal-tests --test sdk_e2e
//!
//! Needs `<repo>/.venv/bin/python` with `openai` and `anthropic` installed
//! (or `CARACAL_PYTHON`).

use std::{path::PathBuf, process::Stdio, time::Duration};

use caracal_proto::v1 as pb;
use caracal_tests::{
    envoy::{repo_root, Envoy, EnvoyOptions, Gateway},
    mock_llm::MockLlm,
    TestStack,
};
use serde_json::{json, Value};

const USD: &str = "USD";

fn python() -> PathBuf {
    std::env::var("CARACAL_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_root().join(".venv/bin/python"))
}

fn words(s: &str) -> u64 {
    s.split_whitespace().count() as u64
}

/// ceil(tokens x price-per-Mtok / 1e6), micro-USD; prices in micro-USD per Mtok.
fn cost(input_price: u128, output_price: u128, prompt: u64, completion: u64) -> i64 {
    let total = u128::from(prompt) * input_price + u128::from(completion) * output_price;
    i64::try_from(total.div_ceil(1_000_000)).unwrap()
}

async fn remaining(stack: &TestStack, key: &str) -> i64 {
    let mut authz = stack.authz();
    let r = authz
        .authorize(pb::AuthorizeRequest {
            request_id: format!("probe-{}", uuid::Uuid::new_v4().simple()),
            credential: Some(pb::AgentCredential {
                kind: Some(pb::agent_credential::Kind::ApiKey(key.into())),
            }),
            provider: "openai".into(),
            model: "gpt-4o".into(),
            resource: "api.openai.com/v1/chat/completions".into(),
            estimated_usage: None,
            estimated_cost: Some(pb::Money {
                currency: USD.into(),
                micros: 0,
                amount: String::new(),
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.decision, pb::Decision::Allow as i32, "{r:?}");
    authz
        .release(pb::ReleaseRequest {
            reservation_id: r.reservation_id,
            reason: "probe".into(),
        })
        .await
        .unwrap();
    r.min_remaining.unwrap().micros
}

/// Runs the SDK script (bounded: killed by its PID after 180 s); returns success,
/// stdout and stderr.
async fn run_script(script: &std::path::Path, arg: &str) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let (out_path, err_path) = (dir.path().join("out"), dir.path().join("err"));
    let mut child = std::process::Command::new(python())
        .arg(script)
        .arg(arg)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("python (set CARACAL_PYTHON or create .venv with openai and anthropic)");
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let mut stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    if status.is_none() {
        stderr.push_str("\n(timed out after 180 s and was killed)");
    }
    (status.is_some_and(|s| s.success()), stdout, stderr)
}

fn assert_no_error(results: &Value, step: &str) -> Value {
    let v = results[step].clone();
    assert!(
        v.get("error").is_none(),
        "{step} failed: {}",
        serde_json::to_string_pretty(&v).unwrap_or_default()
    );
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_and_anthropic_sdks_are_metered_and_refused_over_budget() {
    let stack = TestStack::start().await.unwrap();
    let mock = MockLlm::start().await.unwrap();
    let authz_port = stack.server.as_ref().unwrap().grpc_addr.port();
    let envoy = Envoy::start(EnvoyOptions::new(Gateway::Wasm, authz_port, mock.port()))
        .await
        .unwrap();
    for (provider, model, input, output) in [
        ("openai", "gpt-4o", "2.50", "10.00"),
        ("anthropic", "claude-sonnet-4-5", "3.00", "15.00"),
    ] {
        stack
            .prices()
            .set_price(pb::SetPriceRequest {
                provider: provider.into(),
                model: model.into(),
                currency: USD.into(),
                input_per_mtok: input.into(),
                output_per_mtok: output.into(),
                cached_input_per_mtok: "0".into(),
                per_request: "0".into(),
            })
            .await
            .unwrap();
    }
    let (agent_id, key) = stack.agent_with_key("sdk-user", None).await.unwrap();
    // $0.02: the four small calls fit; a 5000-token call ($0.05+) never does.
    let limit = 20_000;
    stack
        .usd_policy(&agent_id, "0.02", "daily", "calendar", "")
        .await
        .unwrap();

    let prompt = "Give me one sentence about spending limits";
    let config = json!({
        "base_url": format!("http://127.0.0.1:{}", envoy.port),
        "agent_key": key,
        "openai_model": "gpt-4o",
        "anthropic_model": "claude-sonnet-4-5",
        "prompt": prompt,
        "completion_tokens": 17,
        "stream_tokens": 23,
        "anthropic_tokens": 19,
        "anthropic_stream_tokens": 29,
        "image_mib": 4,
        "image_tokens": 11,
    });
    let script = repo_root().join("tests/python/sdk_e2e.py");
    let (status, stdout, stderr) = run_script(&script, &config.to_string()).await;
    assert!(status, "script failed: {stderr}\n{stdout}");
    let results: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("script output is not JSON ({e}): {stdout}\n{stderr}"));
    println!("{}", serde_json::to_string_pretty(&results).unwrap());

    let p = words(prompt);
    // OpenAI, plain.
    let chat = assert_no_error(&results, "chat");
    assert_eq!(chat["status"], 200);
    assert_eq!(chat["usage"]["prompt_tokens"], p);
    assert_eq!(chat["usage"]["completion_tokens"], 17);
    assert!(
        chat["reservation"].as_str().is_some_and(|r| !r.is_empty()),
        "{chat}"
    );
    assert!(chat["remaining"].as_str().is_some(), "{chat}");
    // OpenAI, streaming: the usage chunk arrived although the client did not ask.
    let stream = assert_no_error(&results, "chat_stream");
    assert_eq!(stream["status"], 200);
    assert_eq!(words(stream["text"].as_str().unwrap()), 23);
    assert!(stream["reservation"].as_str().is_some(), "{stream}");
    // Over budget: RateLimitError naming budget_exceeded.
    let over = &results["chat_over_budget"]["error"];
    assert_eq!(
        over["class"], "RateLimitError",
        "{}",
        results["chat_over_budget"]
    );
    assert_eq!(over["module"], "openai");
    assert_eq!(over["status_code"], 429);
    assert_eq!(over["code"], "budget_exceeded", "{over}");
    assert_eq!(over["type"], "insufficient_quota", "{over}");
    assert!(over["body"].to_string().contains("budget_exceeded"));
    // Anthropic, plain and streaming.
    let msg = assert_no_error(&results, "message");
    assert_eq!(msg["status"], 200);
    assert_eq!(msg["usage"]["input_tokens"], p);
    assert_eq!(msg["usage"]["output_tokens"], 19);
    assert!(msg["reservation"].as_str().is_some(), "{msg}");
    let mstream = assert_no_error(&results, "message_stream");
    assert_eq!(mstream["usage"]["output_tokens"], 29);
    assert_eq!(words(mstream["text"].as_str().unwrap()), 29);
    let over = &results["message_over_budget"]["error"];
    assert_eq!(
        over["class"], "RateLimitError",
        "{}",
        results["message_over_budget"]
    );
    assert_eq!(over["module"], "anthropic");
    assert_eq!(over["status_code"], 429);
    assert!(
        over["body"].to_string().contains("rate_limit_error"),
        "{over}"
    );

    // A 4 MiB image request is accepted (the filter's old 1 MiB default answered 413)
    // and charged.
    let image = assert_no_error(&results, "chat_image");
    assert_eq!(image["status"], 200, "{image}");
    assert!(
        image["image_bytes"].as_u64().unwrap() > 4_000_000,
        "{image}"
    );
    assert_eq!(image["usage"]["completion_tokens"], 11);
    assert!(image["reservation"].as_str().is_some(), "{image}");

    // Charged exactly the priced usage of the five calls.
    let spent = cost(2_500_000, 10_000_000, p, 17)
        + cost(2_500_000, 10_000_000, p, 23)
        + cost(3_000_000, 15_000_000, p, 19)
        + cost(3_000_000, 15_000_000, p, 29)
        + cost(2_500_000, 10_000_000, p, 11);
    let expected = limit - spent;
    let mut last = remaining(&stack, &key).await;
    for _ in 0..150 {
        if last == expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        last = remaining(&stack, &key).await;
    }
    assert_eq!(
        last,
        expected,
        "charged {} instead of {spent}",
        limit - last
    );
    // Exactly five calls reached the provider (the refused two did not).
    let seen = mock.requests();
    assert_eq!(seen.len(), 5);
    assert!(seen[4].body.len() > 4_000_000, "{}", seen[4].body.len());

    drop(envoy);
    mock.stop().await;
    stack.stop().await.unwrap();
}
