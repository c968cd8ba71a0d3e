//! The gateway end to end: the real Envoy running the built Caracal wasm filter (or
//! Envoy's stock ext_authz filter), the real authz-service on PostgreSQL + Redis, and
//! a mock OpenAI/Anthropic upstream, all on 127.0.0.1.
//!
//! What is charged is read back from the budget itself: a probe Authorize with a zero
//! estimate reports the policy's remaining room (then is released), and is polled
//! (bounded) because the filter settles after the response has been sent.
//!
//!   cargo test -p caracal-tests --test gateway_e2e
//!
//! Needs Envoy (`.venv`, see tests/src/envoy.rs) and builds the filter with
//! `cargo build -p caracal-filter --target wasm32-wasip1 --profile wasm` unless
//! `CARACAL_FILTER_WASM` names a built `.wasm`.

use std::time::Duration;

use caracal_proto::v1 as pb;
use caracal_tests::{
    envoy::{
        free_port, Envoy, EnvoyOptions, Gateway, HttpResponse, ANTHROPIC_PROVIDER_KEY,
        EXT_AUTHZ_ANTHROPIC_ESTIMATE_MICROS, EXT_AUTHZ_OPENAI_ESTIMATE_MICROS, OPENAI_PROVIDER_KEY,
    },
    mock_llm::{MockLlm, RecordedRequest, CACHED_TOKENS_HEADER, COMPLETION_TOKENS_HEADER},
    TestStack,
};
use serde_json::{json, Value};

const USD: &str = "USD";
const CHAT: &str = "/v1/chat/completions";
const MESSAGES: &str = "/v1/messages";

/// Price book used by these tests (micro-USD per million tokens).
const GPT4O: Price = Price {
    input: 2_500_000,
    output: 10_000_000,
    cached: 1_250_000,
};
const CLAUDE: Price = Price {
    input: 3_000_000,
    output: 15_000_000,
    cached: 300_000,
};
const EMBED: Price = Price {
    input: 20_000,
    output: 0,
    cached: 0,
};

#[derive(Clone, Copy)]
struct Price {
    input: u128,
    output: u128,
    cached: u128,
}

/// The priced cost of a usage: ceil(sum of tokens x price per Mtok / 1e6), computed
/// here independently of the service. `prompt` includes `cached`.
fn cost(p: Price, prompt: u64, completion: u64, cached: u64) -> i64 {
    let uncached = u128::from(prompt - cached);
    let total =
        uncached * p.input + u128::from(completion) * p.output + u128::from(cached) * p.cached;
    i64::try_from(total.div_ceil(1_000_000)).unwrap()
}

fn decimal(micros: i64) -> String {
    format!("{}.{:06}", micros / 1_000_000, micros % 1_000_000)
}

fn usd(micros: i64) -> pb::Money {
    pb::Money {
        currency: USD.into(),
        micros,
        amount: String::new(),
    }
}

/// Everything of one test: the service, the mock provider and Envoy.
struct Gw {
    stack: TestStack,
    mock: MockLlm,
    envoy: Envoy,
}

impl Gw {
    async fn start(gateway: Gateway) -> Self {
        Self::start_with(gateway, |_| {}, |_| {}).await
    }

    async fn start_with(
        gateway: Gateway,
        tune_service: impl FnOnce(&mut caracal_authz::Config),
        tune_envoy: impl FnOnce(&mut EnvoyOptions),
    ) -> Self {
        let stack = TestStack::start_with(tune_service).await.unwrap();
        let mock = MockLlm::start().await.unwrap();
        let mut opts = EnvoyOptions::new(gateway, authz_port(&stack), mock.port());
        tune_envoy(&mut opts);
        let envoy = Envoy::start(opts).await.unwrap();
        set_prices(&stack).await;
        Self { stack, mock, envoy }
    }

    async fn stop(self) {
        drop(self.envoy);
        self.mock.stop().await;
        self.stack.stop().await.unwrap();
    }
}

fn authz_port(stack: &TestStack) -> u16 {
    stack.server.as_ref().unwrap().grpc_addr.port()
}

async fn set_prices(stack: &TestStack) {
    for (provider, model, input, output, cached) in [
        ("openai", "gpt-4o", "2.50", "10.00", "1.25"),
        ("openai", "text-embedding-3-small", "0.02", "0", "0"),
        ("anthropic", "claude-sonnet-4-5", "3.00", "15.00", "0.30"),
    ] {
        stack
            .prices()
            .set_price(pb::SetPriceRequest {
                provider: provider.into(),
                model: model.into(),
                currency: USD.into(),
                input_per_mtok: input.into(),
                output_per_mtok: output.into(),
                cached_input_per_mtok: cached.into(),
                per_request: "0".into(),
            })
            .await
            .unwrap();
    }
}

/// An agent with an API key and one daily policy of `limit` (decimal USD).
async fn agent(stack: &TestStack, name: &str, limit: &str) -> (String, String, String) {
    let (id, key) = stack.agent_with_key(name, None).await.unwrap();
    assert!(key.starts_with("cak_"), "{key}");
    let policy = stack
        .usd_policy(&id, limit, "daily", "calendar", "charge")
        .await
        .unwrap();
    (id, key, policy)
}

/// The agent's smallest remaining budget now: a zero-estimate Authorize, released.
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
            estimated_cost: Some(usd(0)),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.decision,
        pb::Decision::Allow as i32,
        "probe refused: {r:?}"
    );
    authz
        .release(pb::ReleaseRequest {
            reservation_id: r.reservation_id.clone(),
            reason: "probe".into(),
        })
        .await
        .unwrap();
    r.min_remaining.unwrap().micros
}

/// Polls (bounded, 15 s) until the remaining budget is `expected`; returns the last
/// value seen, for the caller's assert.
async fn wait_remaining(stack: &TestStack, key: &str, expected: i64) -> i64 {
    let mut last = remaining(stack, key).await;
    for _ in 0..150 {
        if last == expected {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        last = remaining(stack, key).await;
    }
    last
}

/// Checks the remaining budget stays at `expected` for a while (nothing more is
/// charged later, e.g. by a second settle).
async fn stays_remaining(stack: &TestStack, key: &str, expected: i64) {
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(remaining(stack, key).await, expected);
}

fn chat(model: &str, prompt: &str, max_tokens: u64) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
    })
}

fn words(s: &str) -> u64 {
    s.split_whitespace().count() as u64
}

fn amount_micros(text: &str) -> i64 {
    caracal_domain::money::parse_amount(text.trim())
        .unwrap_or_else(|e| panic!("{text:?} is not a decimal amount: {e}"))
}

/// The gateway answered with both Caracal headers; returns the remaining budget they
/// announce (micros).
fn caracal_headers(r: &HttpResponse) -> i64 {
    let reservation = r
        .header("x-caracal-reservation-id")
        .unwrap_or_else(|| panic!("no x-caracal-reservation-id: {:?}", r.headers));
    assert!(!reservation.is_empty());
    let remaining = r
        .header("x-caracal-remaining-budget")
        .unwrap_or_else(|| panic!("no x-caracal-remaining-budget: {:?}", r.headers));
    amount_micros(remaining)
}

/// What reached the provider carried its key, and nothing of the agent's.
fn assert_clean_upstream(req: &RecordedRequest, agent_key: &str, provider: &str) {
    for (name, value) in &req.headers {
        assert!(
            !name.starts_with("x-caracal-"),
            "{name} reached the upstream: {:?}",
            req.headers
        );
        assert!(
            !value.contains(agent_key) && !value.contains("cak_"),
            "the agent key reached the upstream in {name}"
        );
    }
    match provider {
        "openai" => assert_eq!(
            req.header("authorization"),
            Some(format!("Bearer {OPENAI_PROVIDER_KEY}").as_str()),
            "the OpenAI key was not injected: {:?}",
            req.headers
        ),
        _ => assert_eq!(
            req.header("x-api-key"),
            Some(ANTHROPIC_PROVIDER_KEY),
            "the Anthropic key was not injected: {:?}",
            req.headers
        ),
    }
}

/// The usage block of the last SSE event that has one (`usage`, `response.usage` or
/// Anthropic's message_delta usage).
fn sse_events(body: &str) -> Vec<Value> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(str::trim)
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str(d).ok())
        .collect()
}

// ---------------------------------------------------------------- wasm filter

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_call_is_answered_with_budget_headers_and_charged_the_priced_usage() {
    let gw = Gw::start(Gateway::Wasm).await;
    let (_, key, _) = agent(&gw.stack, "allowed", "10").await;
    let limit = 10_000_000;
    let prompt = "Say hello to the budget please";
    let r = gw
        .envoy
        .post_json(
            CHAT,
            &[
                ("authorization", &format!("Bearer {key}")),
                (COMPLETION_TOKENS_HEADER, "40"),
            ],
            &chat("gpt-4o", prompt, 100),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let announced = caracal_headers(&r);
    assert!(
        (0..limit).contains(&announced),
        "remaining {announced} after reserving"
    );
    let body = r.json();
    assert_eq!(body["usage"]["prompt_tokens"], words(prompt));
    assert_eq!(body["usage"]["completion_tokens"], 40);
    let expected = limit - cost(GPT4O, words(prompt), 40, 0);
    assert_eq!(wait_remaining(&gw.stack, &key, expected).await, expected);
    // The announced remaining was after reserving the estimate (>= the real cost).
    assert!(announced <= expected, "{announced} > {expected}");
    stays_remaining(&gw.stack, &key, expected).await;

    let seen = gw.mock.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, CHAT);
    assert_clean_upstream(&seen[0], &key, "openai");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_refused_with_an_openai_429_once_the_budget_is_spent() {
    let gw = Gw::start(Gateway::Wasm).await;
    // $0.005: one call reserving >= 300 output tokens ($0.003) fits, two do not.
    let (_, key, policy) = agent(&gw.stack, "frugal", "0.005").await;
    let limit = 5_000;
    let prompt = "Count to three";
    let h = [
        ("x-caracal-agent-key", key.as_str()),
        (COMPLETION_TOKENS_HEADER, "250"),
    ];
    let first = gw
        .envoy
        .post_json(CHAT, &h, &chat("gpt-4o", prompt, 300))
        .await
        .unwrap();
    assert_eq!(first.status, 200, "{}", first.text());
    let spent = cost(GPT4O, words(prompt), 250, 0);
    let left = limit - spent;
    assert_eq!(wait_remaining(&gw.stack, &key, left).await, left);

    let second = gw
        .envoy
        .post_json(CHAT, &h, &chat("gpt-4o", prompt, 300))
        .await
        .unwrap();
    assert_eq!(second.status, 429, "{}", second.text());
    let body = second.json();
    assert_eq!(body["error"]["type"], "insufficient_quota", "{body}");
    assert_eq!(body["error"]["code"], "budget_exceeded", "{body}");
    assert!(
        second
            .header("content-type")
            .unwrap_or_default()
            .starts_with("application/json"),
        "{:?}",
        second.headers
    );
    let text = second.text();
    assert!(
        text.contains(&policy)
            || text.contains(&decimal(left))
            || second.header("x-caracal-remaining-budget").is_some(),
        "the refusal names neither the policy nor the remaining budget: {text}"
    );
    if let Some(rem) = second.header("x-caracal-remaining-budget") {
        assert_eq!(amount_micros(rem), left);
    }
    // Refused calls never reach the provider (not even their headers) and cost nothing.
    assert_eq!(gw.mock.requests().len(), 1);
    assert_eq!(gw.mock.requests_started(), 1);
    stays_remaining(&gw.stack, &key, left).await;

    // A request that could never fit is refused outright.
    let huge = gw
        .envoy
        .post_json(CHAT, &h, &chat("gpt-4o", prompt, 100_000))
        .await
        .unwrap();
    assert_eq!(huge.status, 429, "{}", huge.text());
    assert_eq!(gw.mock.requests().len(), 1);
    assert_eq!(gw.mock.requests_started(), 1);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_chat_is_charged_from_the_final_usage_chunk() {
    let gw = Gw::start(Gateway::Wasm).await;
    let (_, key, _) = agent(&gw.stack, "streamer", "10").await;
    let limit = 10_000_000;
    let prompt = "Stream a short answer about budgets";
    let mut req = chat("gpt-4o", prompt, 200);
    req["stream"] = json!(true);
    // The client did not ask for usage: the filter must turn it on.
    let r = gw
        .envoy
        .post_json(
            CHAT,
            &[
                ("authorization", &format!("Bearer {key}")),
                (COMPLETION_TOKENS_HEADER, "57"),
            ],
            &req,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    caracal_headers(&r);
    let text = r.text();
    assert!(text.contains("data: [DONE]"), "{text}");
    let events = sse_events(&text);
    let streamed: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(words(&streamed), 57);

    let seen = gw.mock.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].json()["stream_options"]["include_usage"],
        true,
        "the filter did not turn on stream_options.include_usage: {}",
        seen[0].json()
    );
    assert_clean_upstream(&seen[0], &key, "openai");

    let expected = limit - cost(GPT4O, words(prompt), 57, 0);
    assert_eq!(wait_remaining(&gw.stack, &key, expected).await, expected);
    stays_remaining(&gw.stack, &key, expected).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_500_releases_the_reservation() {
    let gw = Gw::start(Gateway::Wasm).await;
    let (_, key, _) = agent(&gw.stack, "unlucky", "10").await;
    let limit = 10_000_000;
    let auth = format!("Bearer {key}");
    // By header (a priced model), and by the mock's failing model name.
    let r = gw
        .envoy
        .post_json(
            CHAT,
            &[("authorization", &auth), ("x-mock-status", "500")],
            &chat("gpt-4o", "this will fail", 500),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 500, "{}", r.text());
    assert_eq!(r.json()["error"]["type"], "server_error");
    assert_eq!(wait_remaining(&gw.stack, &key, limit).await, limit);

    gw.stack
        .prices()
        .set_price(pb::SetPriceRequest {
            provider: "openai".into(),
            model: "fail-500".into(),
            currency: USD.into(),
            input_per_mtok: "1".into(),
            output_per_mtok: "1".into(),
            cached_input_per_mtok: "0".into(),
            per_request: "0".into(),
        })
        .await
        .unwrap();
    let mut stream = chat("fail-500", "this will fail too", 500);
    stream["stream"] = json!(true);
    let r = gw
        .envoy
        .post_json(CHAT, &[("authorization", &auth)], &stream)
        .await
        .unwrap();
    assert_eq!(r.status, 500, "{}", r.text());
    assert_eq!(wait_remaining(&gw.stack, &key, limit).await, limit);
    stays_remaining(&gw.stack, &key, limit).await;
    assert_eq!(gw.mock.requests().len(), 2);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authz_unreachable_fails_closed_with_503_or_open_when_configured() {
    let stack = TestStack::start().await.unwrap();
    let (_, key, _) = agent(&stack, "stranded", "10").await;
    let mock = MockLlm::start().await.unwrap();
    let dead = free_port().unwrap();

    let mut closed = EnvoyOptions::new(Gateway::Wasm, dead, mock.port());
    closed.authz_timeout_ms = 500;
    let envoy = Envoy::start(closed).await.unwrap();
    let r = envoy
        .post_json(
            CHAT,
            &[("authorization", &format!("Bearer {key}"))],
            &chat("gpt-4o", "anyone there", 10),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"]["type"], "server_error", "{}", r.text());
    assert!(
        mock.requests().is_empty(),
        "fail closed must not call the provider"
    );
    assert_eq!(mock.requests_started(), 0);
    drop(envoy);

    let mut open = EnvoyOptions::new(Gateway::Wasm, dead, mock.port());
    open.authz_timeout_ms = 500;
    open.failure_mode = "allow";
    let envoy = Envoy::start(open).await.unwrap();
    let r = envoy
        .post_json(
            CHAT,
            &[("authorization", &format!("Bearer {key}"))],
            &chat("gpt-4o", "anyone there", 10),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "fail-open route: {}", r.text());
    let seen = mock.requests();
    assert_eq!(seen.len(), 1);
    assert_clean_upstream(&seen[0], &key, "openai");
    drop(envoy);
    mock.stop().await;
    stack.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_caracal_headers_are_ignored_and_stripped() {
    let gw = Gw::start(Gateway::Wasm).await;
    let (_, key, _) = agent(&gw.stack, "spoofer", "10").await;
    let (other_id, other_key, _) = agent(&gw.stack, "victim", "10").await;
    let limit = 10_000_000;
    let prompt = "Who pays for this";
    let r = gw
        .envoy
        .post_json(
            CHAT,
            &[
                ("authorization", &format!("Bearer {key}")),
                ("x-caracal-agent-id", &other_id),
                ("x-caracal-remaining-budget", "999999"),
                ("x-caracal-reservation-id", "rsv-forged"),
                ("x-caracal-decision", "allow"),
                ("x-caracal-spiffe-id", "spiffe://forged/agent"),
                (COMPLETION_TOKENS_HEADER, "5"),
            ],
            &chat("gpt-4o", prompt, 20),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_ne!(r.header("x-caracal-reservation-id"), Some("rsv-forged"));
    assert_ne!(r.header("x-caracal-remaining-budget"), Some("999999"));
    caracal_headers(&r);
    let seen = gw.mock.requests();
    assert_eq!(seen.len(), 1);
    assert_clean_upstream(&seen[0], &key, "openai");
    // The key's agent paid; the agent named in the forged header did not.
    let expected = limit - cost(GPT4O, words(prompt), 5, 0);
    assert_eq!(wait_remaining(&gw.stack, &key, expected).await, expected);
    assert_eq!(remaining(&gw.stack, &other_key).await, limit);

    // A forged header alone is no identity.
    let r = gw
        .envoy
        .post_json(
            CHAT,
            &[
                ("x-caracal-agent-id", &other_id),
                ("x-caracal-decision", "allow"),
            ],
            &chat("gpt-4o", prompt, 20),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(gw.mock.requests().len(), 1);
    assert_eq!(gw.mock.requests_started(), 1);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_key_never_reaches_the_upstream_and_the_provider_key_does() {
    let gw = Gw::start(Gateway::Wasm).await;
    let (_, key, _) = agent(&gw.stack, "keyed", "10").await;
    let forms: [(&str, String); 2] = [
        ("authorization", format!("Bearer {key}")),
        ("x-caracal-agent-key", key.clone()),
    ];
    for (name, value) in &forms {
        let r = gw
            .envoy
            .post_json(CHAT, &[(name, value)], &chat("gpt-4o", "ping", 10))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{name}: {}", r.text());
    }
    // Anthropic SDKs send their key as x-api-key.
    let r = gw
        .envoy
        .post_json(
            MESSAGES,
            &[("x-api-key", &key), ("anthropic-version", "2023-06-01")],
            &chat("claude-sonnet-4-5", "ping", 10),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = gw.mock.requests();
    assert_eq!(seen.len(), 3);
    assert_clean_upstream(&seen[0], &key, "openai");
    assert_clean_upstream(&seen[1], &key, "openai");
    assert_clean_upstream(&seen[2], &key, "anthropic");
    assert_eq!(seen[2].header("anthropic-version"), Some("2023-06-01"));
    // The OpenAI key never goes to Anthropic, nor the other way round.
    assert!(
        seen[2].header("authorization").is_none(),
        "{:?}",
        seen[2].headers
    );
    assert!(
        seen[0].header("x-api-key").is_none(),
        "{:?}",
        seen[0].headers
    );

    // No key, or an unknown one: 401 in the provider's format, nothing upstream.
    let r = gw
        .envoy
        .post_json(CHAT, &[], &chat("gpt-4o", "ping", 10))
        .await
        .unwrap();
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    let r = gw
        .envoy
        .post_json(
            MESSAGES,
            &[("x-api-key", "cak_unknown0000000000000000000000")],
            &chat("claude-sonnet-4-5", "ping", 10),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.json()["type"], "error");
    assert_eq!(r.json()["error"]["type"], "authentication_error");
    assert_eq!(gw.mock.requests().len(), 3);
    assert_eq!(gw.mock.requests_started(), 3);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_messages_json_and_sse_are_charged() {
    let gw = Gw::start(Gateway::Wasm).await;
    let (_, key, _) = agent(&gw.stack, "claude-user", "10").await;
    let limit = 10_000_000;
    let system = "You are terse";
    let prompt = "Explain budgets in one line to a new engineer";
    let prompt_tokens = words(system) + words(prompt);
    let body = |stream: bool| {
        json!({
            "model": "claude-sonnet-4-5",
            "max_tokens": 300,
            "system": system,
            "messages": [{"role": "user", "content": prompt}],
            "stream": stream,
        })
    };
    let h = |completion: &'static str, cached: &'static str| {
        vec![
            ("x-api-key".to_owned(), key.clone()),
            ("anthropic-version".to_owned(), "2023-06-01".to_owned()),
            (COMPLETION_TOKENS_HEADER.to_owned(), completion.to_owned()),
            (CACHED_TOKENS_HEADER.to_owned(), cached.to_owned()),
        ]
    };

    // JSON, with part of the prompt read from the cache.
    let headers = h("33", "4");
    let refs: Vec<(&str, &str)> = headers
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let r = gw
        .envoy
        .post_json(MESSAGES, &refs, &body(false))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    caracal_headers(&r);
    assert_eq!(r.json()["usage"]["input_tokens"], prompt_tokens - 4);
    assert_eq!(r.json()["usage"]["cache_read_input_tokens"], 4);
    let mut expected = limit - cost(CLAUDE, prompt_tokens, 33, 4);
    assert_eq!(wait_remaining(&gw.stack, &key, expected).await, expected);

    // SSE: input in message_start, output in message_delta.
    let headers = h("71", "0");
    let refs: Vec<(&str, &str)> = headers
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let r = gw
        .envoy
        .post_json(MESSAGES, &refs, &body(true))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    caracal_headers(&r);
    let text = r.text();
    assert!(text.contains("event: message_stop"), "{text}");
    let delta = sse_events(&text)
        .into_iter()
        .find(|e| e["type"] == "message_delta")
        .unwrap();
    assert_eq!(delta["usage"]["output_tokens"], 71);
    expected -= cost(CLAUDE, prompt_tokens, 71, 0);
    assert_eq!(wait_remaining(&gw.stack, &key, expected).await, expected);
    stays_remaining(&gw.stack, &key, expected).await;

    let seen = gw.mock.requests();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        assert_eq!(s.path, MESSAGES);
        assert_clean_upstream(s, &key, "anthropic");
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_and_responses_are_charged() {
    let gw = Gw::start(Gateway::Wasm).await;
    let (_, key, _) = agent(&gw.stack, "mixed", "10").await;
    let limit = 10_000_000;
    let auth = format!("Bearer {key}");
    let mut expected = limit;

    let input = ["the first text to embed", "and a second one"];
    let r = gw
        .envoy
        .post_json(
            "/v1/embeddings",
            &[("authorization", &auth)],
            &json!({"model": "text-embedding-3-small", "input": input}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    caracal_headers(&r);
    let tokens: u64 = input.iter().map(|s| words(s)).sum();
    assert_eq!(r.json()["usage"]["prompt_tokens"], tokens);
    expected -= cost(EMBED, tokens, 0, 0);
    assert_eq!(wait_remaining(&gw.stack, &key, expected).await, expected);

    let prompt = "Summarise the budget rules";
    let r = gw
        .envoy
        .post_json(
            "/v1/responses",
            &[
                ("authorization", &auth),
                (COMPLETION_TOKENS_HEADER, "21"),
                (CACHED_TOKENS_HEADER, "2"),
            ],
            &json!({"model": "gpt-4o", "input": prompt, "max_output_tokens": 100}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    expected -= cost(GPT4O, words(prompt), 21, 2);
    assert_eq!(wait_remaining(&gw.stack, &key, expected).await, expected);

    let r = gw
        .envoy
        .post_json(
            "/v1/responses",
            &[("authorization", &auth), (COMPLETION_TOKENS_HEADER, "13")],
            &json!({"model": "gpt-4o", "input": prompt, "max_output_tokens": 100, "stream": true}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("response.completed"));
    expected -= cost(GPT4O, words(prompt), 13, 0);
    assert_eq!(wait_remaining(&gw.stack, &key, expected).await, expected);
    stays_remaining(&gw.stack, &key, expected).await;

    for s in gw.mock.requests() {
        assert_clean_upstream(&s, &key, "openai");
    }
    gw.stop().await;
}

// ---------------------------------------------------------------- ext_authz

/// Envoy's stock ext_authz filter against the service's Authorization/Check: a fixed
/// per-route estimate is reserved per call until the budget is spent, then 429; the
/// reservations are charged when they expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext_authz_check_enforces_a_fixed_per_route_budget() {
    let gw = Gw::start_with(
        Gateway::ExtAuthz,
        |c| {
            c.reservations.provisional_charge_expiration = 2;
            c.reservations.provisional_charge_cleanup_interval = 1;
        },
        |_| {},
    )
    .await;
    // $0.07: two chat calls ($0.02 each) and one Anthropic call ($0.03) fit exactly.
    let (_, key, policy) = agent(&gw.stack, "ext", "0.07").await;
    let limit = 70_000;
    let auth = format!("Bearer {key}");
    let mut reservations = Vec::new();
    let mut left = limit;
    for i in 0..2 {
        let r = gw
            .envoy
            .post_json(
                CHAT,
                &[
                    ("authorization", &auth),
                    ("x-caracal-remaining-budget", "42"),
                ],
                &chat("gpt-4o", "fixed price call", 10),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "call {i}: {}", r.text());
        left -= EXT_AUTHZ_OPENAI_ESTIMATE_MICROS;
        assert_eq!(caracal_headers(&r), left, "call {i}");
        reservations.push(r.header("x-caracal-reservation-id").unwrap().to_owned());
    }
    let r = gw
        .envoy
        .post_json(
            MESSAGES,
            &[("x-api-key", &key), ("anthropic-version", "2023-06-01")],
            &chat("claude-sonnet-4-5", "fixed price call", 10),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    left -= EXT_AUTHZ_ANTHROPIC_ESTIMATE_MICROS;
    assert_eq!(left, 0);
    assert_eq!(caracal_headers(&r), 0);
    reservations.push(r.header("x-caracal-reservation-id").unwrap().to_owned());

    // Spent: OpenAI-format and Anthropic-format 429s, nothing reaches the provider.
    let r = gw
        .envoy
        .post_json(
            CHAT,
            &[("authorization", &auth)],
            &chat("gpt-4o", "one more", 10),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 429, "{}", r.text());
    let body = r.json();
    assert_eq!(body["error"]["type"], "insufficient_quota", "{body}");
    assert_eq!(body["error"]["code"], "budget_exceeded", "{body}");
    assert_eq!(body["caracal"]["policy_id"], policy.as_str(), "{body}");
    assert_eq!(r.header("x-should-retry"), Some("false"));
    let r = gw
        .envoy
        .post_json(
            MESSAGES,
            &[("x-api-key", &key)],
            &chat("claude-sonnet-4-5", "one more", 10),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(
        r.json()["error"]["type"],
        "rate_limit_error",
        "{}",
        r.text()
    );
    // No identity: 401.
    let r = gw
        .envoy
        .post_json(CHAT, &[], &chat("gpt-4o", "who am i", 10))
        .await
        .unwrap();
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "invalid_api_key");

    let seen = gw.mock.requests();
    assert_eq!(seen.len(), 3);
    assert_eq!(gw.mock.requests_started(), 3);
    assert_clean_upstream(&seen[0], &key, "openai");
    assert_clean_upstream(&seen[1], &key, "openai");
    assert_clean_upstream(&seen[2], &key, "anthropic");

    // The reservations expire and are CHARGED (not released): the budget stays spent.
    let client = redis::Client::open(gw.stack.redis.url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    for rid in &reservations {
        let mut expired = false;
        for _ in 0..150 {
            // The record becomes a done marker ("D\t<mode>...") when it ends.
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!(
                    "{}:*:rsv:{}",
                    gw.stack.key_prefix,
                    caracal_authz::budget::keys::split_reservation_id(rid).0
                ))
                .query_async(&mut conn)
                .await
                .unwrap();
            assert_eq!(keys.len(), 1, "record of {rid}");
            let record: String = redis::cmd("GET")
                .arg(&keys[0])
                .query_async(&mut conn)
                .await
                .unwrap();
            if record.starts_with("D\texpire\t") {
                expired = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(expired, "reservation {rid} never expired");
        let e = gw
            .stack
            .authz()
            .release(pb::ReleaseRequest {
                reservation_id: rid.clone(),
                reason: "too late".into(),
            })
            .await
            .unwrap_err();
        assert!(e.message().contains("expired"), "{e:?}");
    }
    assert_eq!(remaining(&gw.stack, &key).await, 0);
    gw.stop().await;
}

// ---------------------------------------------------------------- TLS

/// `curl` over TLS (bounded by --max-time): status, lower-case headers, body.
async fn curl(args: Vec<String>) -> (u16, Vec<(String, String)>, String) {
    tokio::task::spawn_blocking(move || {
        let dir = tempfile::tempdir().unwrap();
        let headers_file = dir.path().join("headers");
        let out = std::process::Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "20",
                "-o",
                "-",
                "-w",
                "\n%{http_code}",
                "-D",
            ])
            .arg(&headers_file)
            .args(&args)
            .output()
            .expect("curl");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", "0"));
        let status = code.trim().parse().unwrap_or(0);
        assert!(
            status != 0,
            "curl failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let headers = std::fs::read_to_string(&headers_file)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        (status, headers, body.to_owned())
    })
    .await
    .unwrap()
}

/// envoy-tls.yaml for real: a TLS listener (the agent identified by the SPIFFE id of
/// its client certificate, or by its key), and mTLS from Envoy to an authz-service
/// that serves TLS with a client CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_gateway_with_spiffe_agents_and_mtls_to_authz() {
    use caracal_tests::envoy::{dev_certs, DEV_AGENT_SPIFFE_ID};

    let stack = TestStack::start().await.unwrap();
    set_prices(&stack).await;
    let (agent_id, key, _) = agent(&stack, "tls-agent", "10").await;
    stack
        .agents()
        .add_identity(pb::AddIdentityRequest {
            agent_id: agent_id.clone(),
            kind: "spiffe".into(),
            value: DEV_AGENT_SPIFFE_ID.into(),
            issuer: String::new(),
        })
        .await
        .unwrap();
    let certs = tempfile::tempdir().unwrap();
    dev_certs(certs.path()).unwrap();
    let c = |f: &str| certs.path().join(f);

    // A second service instance on the same database and Redis keys, serving TLS.
    let mut config = caracal_authz::Config::default();
    config.server.grpc_addr = "127.0.0.1:0".parse().unwrap();
    config.server.http_addr = "127.0.0.1:0".parse().unwrap();
    config.server.tls = Some(caracal_authz::config::TlsConfig {
        cert_file: c("authz.crt"),
        key_file: c("authz.key"),
        client_ca_file: Some(c("ca.crt")),
    });
    config.database.url = stack.database_url.clone();
    config.database.db_pool_size = 2;
    config.auth.admin_token = caracal_tests::ADMIN_TOKEN.into();
    // Envoy's client certificate (envoy-client.crt) is the gateway.
    config.auth.gateway_sans = vec!["spiffe://caracal.local/ns/caracal/sa/gateway".into()];
    config.auth.api_key_pepper = caracal_tests::PEPPER.into();
    config.redis.url = stack.redis.url.clone();
    config.redis.key_prefix = stack.key_prefix.clone();
    config.redis.partitions = 4;
    config.budget.relay_enabled = false;
    let tls_authz = caracal_authz::serve(config).await.unwrap();

    let mock = MockLlm::start().await.unwrap();
    let mut opts = EnvoyOptions::new(Gateway::WasmTls, tls_authz.grpc_addr.port(), mock.port());
    opts.tls_dir = Some(certs.path().to_path_buf());
    let envoy = Envoy::start(opts).await.unwrap();
    let base = format!("https://127.0.0.1:{}", envoy.port);
    let ca = c("ca.crt").display().to_string();

    let (status, _, body) = curl(vec![
        "--cacert".into(),
        ca.clone(),
        format!("{base}/health"),
    ])
    .await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));

    let limit = 10_000_000;
    let prompt = "Certified agents spend too";
    let post = |extra: Vec<String>, tokens: &str| {
        let mut a = vec![
            "--cacert".to_owned(),
            ca.clone(),
            "-H".into(),
            "content-type: application/json".into(),
            "-H".into(),
            format!("{COMPLETION_TOKENS_HEADER}: {tokens}"),
            "--data".into(),
            chat("gpt-4o", prompt, 100).to_string(),
        ];
        a.extend(extra);
        a.push(format!("{base}{CHAT}"));
        a
    };
    // Identified by the client certificate alone.
    let (status, headers, body) = curl(post(
        vec![
            "--cert".into(),
            c("agent.crt").display().to_string(),
            "--key".into(),
            c("agent.key").display().to_string(),
        ],
        "9",
    ))
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        headers.iter().any(|(k, _)| k == "x-caracal-reservation-id"),
        "{headers:?}"
    );
    let mut expected = limit - cost(GPT4O, words(prompt), 9, 0);
    assert_eq!(wait_remaining(&stack, &key, expected).await, expected);
    // By the agent key, without a certificate.
    let (status, _, body) = curl(post(
        vec!["-H".into(), format!("authorization: Bearer {key}")],
        "4",
    ))
    .await;
    assert_eq!(status, 200, "{body}");
    expected -= cost(GPT4O, words(prompt), 4, 0);
    assert_eq!(wait_remaining(&stack, &key, expected).await, expected);
    // Neither: 401. Over HTTP/1.1: the refusal comes before the body is read, and over
    // HTTP/2 Envoy then ends the stream with RST_STREAM(NO_ERROR), which is correct
    // (RFC 9113 8.1) but which curl 7.88 sometimes reports as error 92 when it races
    // its own upload of the body.
    let (status, _, body) = curl(post(vec!["--http1.1".into()], "4")).await;
    assert_eq!(status, 401, "{body}");

    let seen = mock.requests();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        assert_clean_upstream(s, &key, "openai");
        assert!(
            s.header("x-forwarded-client-cert").is_none(),
            "{:?}",
            s.headers
        );
    }
    drop(envoy);
    mock.stop().await;
    tls_authz.shutdown().await.unwrap();
    stack.stop().await.unwrap();
}
