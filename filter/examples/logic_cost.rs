//! What the filter's own request/response logic costs natively, per gateway request:
//! the work `glue` does between host calls for the body `gateway-bench` sends (estimate
//! from the JSON body, the encoded Authorize, the usage of the JSON answer, the encoded
//! Settle). Native figures are a floor for the same code in V8: a profile of the
//! filtered Envoy put ~14 µs per request in the wasm's JIT code.
//!
//!   cargo run --release -p caracal-filter --example logic_cost

use std::{hint::black_box, time::Instant};

use caracal_filter::{
    authz::{self, CallInfo},
    estimate::{self, Api, Limits},
    identity::Identity,
    usage,
};

const ROUNDS: u32 = 200_000;

/// The body gateway-bench sends (serde_json's key order).
const BODY: &[u8] = br#"{"max_tokens":16,"messages":[{"role":"user","content":"Say hello to the benchmark please"}],"model":"gpt-4o"}"#;

/// Shaped as the mock upstream answers it (`tests/src/mock_llm.rs`, `openai_chat`:
/// 6 prompt + 12 completion tokens; the words stand in for its vocabulary).
const ANSWER: &[u8] = br#"{"choices":[{"finish_reason":"stop","index":0,"logprobs":null,"message":{"annotations":[],"content":"hello hello hello hello hello hello hello hello hello hello hello hello","refusal":null,"role":"assistant"}}],"created":1700000000,"id":"chatcmpl-mock","model":"gpt-4o","object":"chat.completion","service_tier":"default","system_fingerprint":"fp_mock","usage":{"completion_tokens":12,"completion_tokens_details":{"accepted_prediction_tokens":0,"audio_tokens":0,"reasoning_tokens":0,"rejected_prediction_tokens":0},"prompt_tokens":6,"prompt_tokens_details":{"audio_tokens":0,"cached_tokens":0},"total_tokens":18}}"#;

fn per_op(label: &str, mut f: impl FnMut()) -> f64 {
    for _ in 0..ROUNDS / 10 {
        f();
    }
    let t = Instant::now();
    for _ in 0..ROUNDS {
        f();
    }
    let ns = t.elapsed().as_nanos() as f64 / f64::from(ROUNDS);
    println!("{label:<44} {ns:>8.0} ns");
    ns
}

fn main() -> Result<(), String> {
    let api = Api::for_request("POST", "/v1/chat/completions");
    let limits = Limits::new(4096);
    let prepared = estimate::prepare(api, BODY, &limits).map_err(|e| e.0)?;
    let identity = Identity::ApiKey("cak_0123456789abcdef0123456789abcdef".to_owned());
    let used = usage::usage_from_json(ANSWER).ok_or("no usage in the answer")?;
    println!("filter logic, native, {ROUNDS} rounds each (release build of this machine)");
    let mut total = 0.0;
    total += per_op("estimate::prepare (parse + estimate)", || {
        black_box(estimate::prepare(api, black_box(BODY), &limits).ok());
    });
    total += per_op("authz::authorize_request (encode)", || {
        black_box(authz::authorize_request(&CallInfo {
            request_id: "0d6f7c2e-3b1a-4c55-9e0f-5a7d1e2b3c4d",
            identity: &identity,
            provider: "openai",
            resource: "api.openai.com/v1/chat/completions",
            estimate: &prepared.estimate,
        }));
    });
    total += per_op("usage::usage_from_json (the answer)", || {
        black_box(usage::usage_from_json(black_box(ANSWER)));
    });
    total += per_op("authz::settle_request (encode)", || {
        black_box(authz::settle_request(
            "0194f1c2-6d0e-7c55-9a4e-54a1d7e2b1aa",
            &used,
            "openai",
            "gpt-4o",
        ));
    });
    println!("{:<44} {total:>8.0} ns per gateway request", "sum");
    Ok(())
}
