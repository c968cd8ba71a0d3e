//! Property tests: whatever bytes arrive, the parsers never panic and give a defined
//! result (a value, `None` or an error), and chunking never changes the result.

// Test code: failing loudly is the point.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use caracal_filter::authz;
use caracal_filter::config::{Config, Provider};
use caracal_filter::estimate::{self, Api};
use caracal_filter::identity;
use caracal_filter::reply::{self, Refusal};
use caracal_filter::usage::{as_count, usage_from_json, usage_from_sse, RawUsage, UsageParser};
use proptest::prelude::*;
use serde_json::Value;

const APIS: [Api; 6] = [
    Api::ChatCompletions,
    Api::Completions,
    Api::Embeddings,
    Api::Responses,
    Api::Messages,
    Api::Other,
];

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

/// Number spellings that break naive parsers.
fn nasty_number() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("18446744073709551615".to_owned()),
        Just("18446744073709551616".to_owned()),
        Just("340282366920938463463374607431768211456".to_owned()),
        Just("1e400".to_owned()),
        Just("-1e400".to_owned()),
        Just("1e19".to_owned()),
        Just("-1".to_owned()),
        Just("-0".to_owned()),
        Just("0.5".to_owned()),
        Just("1.0".to_owned()),
        Just("NaN".to_owned()),
        Just("\"12\"".to_owned()),
        Just("null".to_owned()),
        Just("[]".to_owned()),
        Just("{}".to_owned()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| format!("{f:e}")),
        "[0-9]{1,60}",
        "-?[0-9]{1,5}(\\.[0-9]{1,5})?(e[+-]?[0-9]{1,4})?",
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,20}".prop_map(Value::String),
        prop_oneof![
            Just("text"),
            Just("image_url"),
            Just("input_image"),
            Just("tool_use"),
            Just("document")
        ]
        .prop_map(|s| Value::String(s.to_owned())),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec(
                (
                    prop_oneof![
                        Just("model".to_owned()),
                        Just("messages".to_owned()),
                        Just("content".to_owned()),
                        Just("text".to_owned()),
                        Just("type".to_owned()),
                        Just("input".to_owned()),
                        Just("prompt".to_owned()),
                        Just("system".to_owned()),
                        Just("max_tokens".to_owned()),
                        Just("n".to_owned()),
                        Just("stream".to_owned()),
                        Just("stream_options".to_owned()),
                        Just("tools".to_owned()),
                        "[a-z_]{1,8}",
                    ],
                    inner
                ),
                0..6
            )
            .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

fn check_usage(u: Option<caracal_proto::v1::TokenUsage>) {
    if let Some(u) = u {
        assert!(u.cached_input_tokens <= u.input_tokens);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_into_response_parsers(body in prop::collection::vec(any::<u8>(), 0..2048)) {
        check_usage(usage_from_json(&body));
        check_usage(usage_from_sse(&body));
        for ct in ["application/json", "text/event-stream"] {
            let mut p = UsageParser::for_content_type(ct);
            for c in body.chunks(7) {
                p.feed(c);
            }
            p.finish();
            check_usage(p.usage());
        }
    }

    #[test]
    fn sse_looking_noise(lines in prop::collection::vec(
        prop_oneof![
            Just("data: [DONE]".to_owned()),
            Just("data:".to_owned()),
            Just("event: message_delta".to_owned()),
            Just(": ping".to_owned()),
            Just(String::new()),
            "data: \\{\"usage\":\\{\"output_tokens\":[0-9-e.]{0,8}\\}\\}",
            "data: .{0,40}",
        ],
        0..30,
    ), sep in prop_oneof![Just("\n"), Just("\r\n"), Just("\r")]) {
        let body = lines.join(sep);
        let whole = usage_from_sse(body.as_bytes());
        check_usage(whole);
        let mut p = UsageParser::for_content_type("text/event-stream");
        for c in body.as_bytes().chunks(3) {
            p.feed(c);
        }
        p.finish();
        prop_assert_eq!(p.usage(), whole);
    }

    #[test]
    fn random_chunking_never_changes_sse_usage(
        which in 0usize..3,
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
    ) {
        let name = ["openai_chat_stream.sse", "anthropic_message_stream.sse", "openai_responses_stream.sse"][which];
        let body = fixture(name);
        let whole = usage_from_sse(&body);
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(body.len() + 1)).collect();
        points.sort_unstable();
        let mut p = UsageParser::for_content_type("text/event-stream");
        let mut last = 0;
        for pt in points.into_iter().chain([body.len()]) {
            p.feed(&body[last..pt]);
            last = pt;
        }
        p.finish();
        prop_assert_eq!(p.usage(), whole);
    }

    #[test]
    fn huge_and_odd_numbers_in_usage(a in nasty_number(), b in nasty_number(), c in nasty_number(), d in nasty_number()) {
        let json = format!(r#"{{"usage":{{"prompt_tokens":{a},"completion_tokens":{b},"prompt_tokens_details":{{"cached_tokens":{c}}}}}}}"#);
        check_usage(usage_from_json(json.as_bytes()));
        let json = format!(r#"{{"usage":{{"input_tokens":{a},"output_tokens":{b},"cache_read_input_tokens":{c},"cache_creation_input_tokens":{d}}}}}"#);
        let got = usage_from_json(json.as_bytes());
        check_usage(got);
        let sse = format!("data: {{\"type\":\"message_start\",\"message\":{{\"usage\":{{\"input_tokens\":{a},\"cache_read_input_tokens\":{c}}}}}}}\n\ndata: {{\"usage\":{{\"output_tokens\":{b}}}}}\n\n");
        check_usage(usage_from_sse(sse.as_bytes()));
        if let Ok(v) = serde_json::from_str::<Value>(&a) {
            if let Some(n) = as_count(&v) {
                // Only exact non-negative integers are counts.
                prop_assert!(v.as_u64() == Some(n) || v.as_f64().is_some_and(|f| f >= 0.0 && f.fract() == 0.0));
            }
        }
    }

    #[test]
    fn huge_and_odd_numbers_in_requests(n in nasty_number(), m in nasty_number(), api in prop::sample::select(APIS.to_vec())) {
        let body = format!(r#"{{"model":"m","max_tokens":{n},"max_completion_tokens":{m},"max_output_tokens":{n},"n":{m},"best_of":{n},"messages":[{{"role":"user","content":"hi"}}],"prompt":"x","input":"y"}}"#);
        match estimate::prepare(api, body.as_bytes(), &estimate::Limits::new(100)) {
            Ok(p) => {
                if api == Api::Embeddings || api == Api::Other {
                    prop_assert_eq!(p.estimate.output_tokens, 0);
                } else {
                    // Zero only when the request itself asked for zero.
                    let zero = |s: &str| serde_json::from_str::<Value>(s).ok().and_then(|v| as_count(&v)) == Some(0);
                    prop_assert!(p.estimate.output_tokens > 0 || zero(&n) || zero(&m));
                }
            }
            Err(estimate::BadRequest(msg)) => prop_assert!(!msg.is_empty()),
        }
    }

    #[test]
    fn random_bytes_into_request_parsers(body in prop::collection::vec(any::<u8>(), 0..1024), api in prop::sample::select(APIS.to_vec())) {
        let _ = estimate::prepare(api, &body, &estimate::Limits::new(4096));
        let _ = Config::parse(&body);
        let _ = authz::verdict(&body);
    }

    #[test]
    fn random_json_requests(v in json_value(), api in prop::sample::select(APIS.to_vec())) {
        let mut v = v;
        if let Value::Object(o) = &mut v {
            o.insert("stream".to_owned(), Value::Bool(true));
        }
        let body = serde_json::to_vec(&v).unwrap();
        match estimate::prepare(api, &body, &estimate::Limits::new(4096)) {
            Ok(p) => {
                if let Some(nb) = p.new_body {
                    let after: Value = serde_json::from_slice(&nb).unwrap();
                    if matches!(api, Api::ChatCompletions | Api::Completions) {
                        prop_assert_eq!(&after["stream_options"]["include_usage"], &Value::Bool(true));
                    }
                    prop_assert_eq!(&after["stream"], &Value::Bool(true));
                    // The forwarded output limit is the one reserved (per choice).
                    if let Some(field) = estimate::cap_field(api) {
                        let limit = as_count(&after[field]).or_else(|| as_count(&after["max_tokens"]));
                        prop_assert!(limit.is_some(), "no output limit forwarded: {}", after);
                        let limit = limit.unwrap_or(0).min(estimate::MAX_ESTIMATE_TOKENS);
                        prop_assert!(p.estimate.output_tokens >= limit);
                    }
                } else if v.is_object() && matches!(api, Api::ChatCompletions | Api::Completions) {
                    prop_assert_eq!(&v["stream_options"]["include_usage"], &Value::Bool(true));
                }
            }
            Err(_) => prop_assert!(!v.is_object()),
        }
    }

    #[test]
    fn truncated_request_json_is_a_bad_request(cut in any::<prop::sample::Index>()) {
        let body = fixture("requests/anthropic_messages.json");
        let body = body.trim_ascii_end();
        // A strict prefix of an object never parses (the closing brace is missing).
        let prefix = &body[..cut.index(body.len())];
        prop_assert!(estimate::prepare(Api::Messages, prefix, &estimate::Limits::new(1)).is_err());
    }

    #[test]
    fn header_hygiene_never_leaks_a_key(
        headers in prop::collection::vec(
            (
                prop_oneof![
                    Just("authorization".to_owned()),
                    Just("x-api-key".to_owned()),
                    Just("x-caracal-agent-key".to_owned()),
                    Just("X-Caracal-Whatever".to_owned()),
                    Just("content-type".to_owned()),
                    Just("accept-encoding".to_owned()),
                    "[a-z-]{1,12}",
                ],
                prop_oneof![
                    "cak_[A-Za-z0-9_-]{1,20}",
                    "Bearer cak_[A-Za-z0-9_-]{1,20}",
                    "bearer sk-[a-z0-9]{4}",
                    ".{0,24}",
                ],
            ),
            0..8,
        )
    ) {
        let pairs: Vec<(String, Vec<u8>)> = headers.into_iter().map(|(k, v)| (k, v.into_bytes())).collect();
        let plan = identity::plan_request_headers(&pairs);
        for (name, value) in &pairs {
            let lower = name.to_ascii_lowercase();
            let removed = plan.remove.contains(&lower);
            if lower.starts_with("x-caracal-") {
                prop_assert!(removed, "{}", name);
            }
            if let Some(key) = &plan.api_key {
                if value.windows(key.len()).any(|w| w == key.as_bytes()) && !removed {
                    // A surviving header may only mention the key inside some other text.
                    prop_assert!(!matches!(lower.as_str(), "authorization" | "x-api-key"));
                }
            }
        }
        if let Some(key) = plan.api_key {
            prop_assert!(key.starts_with("cak_"));
        }
    }

    #[test]
    fn replies_are_always_json(msg in ".{0,200}", amount in ".{0,12}") {
        for provider in [Provider::Openai, Provider::Anthropic] {
            for refusal in [Refusal::BudgetExceeded, Refusal::Unauthenticated, Refusal::NotAllowed, Refusal::Unavailable, Refusal::BadRequest, Refusal::TooLarge] {
                let r = reply::build(provider, &refusal, &msg, Some((&amount, "USD")));
                let v: Value = serde_json::from_slice(&r.body).unwrap();
                prop_assert!(v["error"]["message"].is_string());
                prop_assert!(v["error"]["type"].is_string());
            }
        }
    }

    #[test]
    fn amounts_are_header_safe(amount in ".{0,40}", micros in any::<i64>()) {
        let m = caracal_proto::v1::Money { currency: "USD".into(), micros, amount };
        let s = authz::format_amount(&m);
        prop_assert!(!s.is_empty());
        prop_assert!(s.bytes().all(|b| b.is_ascii_digit() || b == b'.' || b == b'-'));
    }
}

#[test]
fn raw_usage_merge_overrides_field_by_field() {
    let a: Value = serde_json::from_str(
        r#"{"input_tokens":10,"output_tokens":1,"cache_read_input_tokens":3}"#,
    )
    .unwrap();
    let b: Value = serde_json::from_str(r#"{"output_tokens":50}"#).unwrap();
    let mut u = RawUsage::from_usage_object(&a).unwrap();
    u.merge(RawUsage::from_usage_object(&b).unwrap());
    let t = u.to_token_usage().unwrap();
    assert_eq!(
        (t.input_tokens, t.output_tokens, t.cached_input_tokens),
        (13, 50, 3)
    );
}
