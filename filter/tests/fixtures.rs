//! Parsers on realistic provider bodies (tests/fixtures): request estimates, JSON usage,
//! and SSE usage however the stream is cut into chunks.

// Test code: failing loudly is the point.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use caracal_filter::estimate::{
    self, Api, MEDIA_PART_TOKENS, PER_MESSAGE_TOKENS, PER_REQUEST_TOKENS,
};
use caracal_filter::usage::{
    usage_from_json, usage_from_sse, JsonUsageScanner, SseUsageParser, UsageParser,
};
use caracal_proto::v1::TokenUsage;
use serde_json::Value;

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn tu(input: u64, output: u64, cached: u64) -> TokenUsage {
    TokenUsage {
        input_tokens: input,
        output_tokens: output,
        cached_input_tokens: cached,
    }
}

/// (fixture, is SSE, expected usage)
fn usage_table() -> Vec<(&'static str, bool, Option<TokenUsage>)> {
    vec![
        ("openai_chat_response.json", false, Some(tu(1117, 46, 1024))),
        ("openai_completions_response.json", false, Some(tu(5, 7, 0))),
        ("openai_embeddings_response.json", false, Some(tu(8, 0, 0))),
        ("openai_responses_response.json", false, Some(tu(36, 87, 0))),
        (
            "anthropic_message_response.json",
            false,
            Some(tu(12 + 2048 + 4096, 10, 4096)),
        ),
        ("openai_error_response.json", false, None),
        ("openai_chat_stream.sse", true, Some(tu(19, 10, 0))),
        (
            "openai_responses_stream.sse",
            true,
            Some(tu(1337, 11, 1152)),
        ),
        (
            "anthropic_message_stream.sse",
            true,
            Some(tu(472 + 1800, 89, 1800)),
        ),
    ]
}

fn parse_whole(body: &[u8], sse: bool) -> Option<TokenUsage> {
    if sse {
        usage_from_sse(body)
    } else {
        usage_from_json(body)
    }
}

fn parse_chunks<'a>(chunks: impl IntoIterator<Item = &'a [u8]>, sse: bool) -> Option<TokenUsage> {
    let mut p = UsageParser::for_content_type(if sse {
        "text/event-stream"
    } else {
        "application/json"
    });
    for c in chunks {
        p.feed(c);
    }
    p.finish();
    p.usage()
}

fn crlf(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() * 2);
    for &b in body {
        if b == b'\n' {
            out.push(b'\r');
        }
        out.push(b);
    }
    out
}

fn cr_only(body: &[u8]) -> Vec<u8> {
    body.iter()
        .map(|&b| if b == b'\n' { b'\r' } else { b })
        .collect()
}

#[test]
fn usage_of_every_fixture() {
    for (name, sse, expected) in usage_table() {
        assert_eq!(parse_whole(&fixture(name), sse), expected, "{name}");
    }
}

#[test]
fn sse_line_end_variants_give_the_same_usage() {
    for (name, sse, expected) in usage_table().into_iter().filter(|t| t.1) {
        let body = fixture(name);
        assert_eq!(parse_whole(&crlf(&body), sse), expected, "{name} CRLF");
        assert_eq!(parse_whole(&cr_only(&body), sse), expected, "{name} CR");
    }
}

#[test]
fn split_at_every_byte_boundary() {
    for (name, sse, expected) in usage_table() {
        let lf = fixture(name);
        let variants = if sse {
            vec![lf.clone(), crlf(&lf), cr_only(&lf)]
        } else {
            vec![lf]
        };
        for body in variants {
            for i in 0..=body.len() {
                let got = parse_chunks([&body[..i], &body[i..]], sse);
                assert_eq!(got, expected, "{name} split at {i}");
            }
        }
    }
}

#[test]
fn byte_by_byte_and_three_way_splits() {
    for (name, sse, expected) in usage_table() {
        let body = crlf(&fixture(name));
        let body = if sse { body } else { fixture(name) };
        assert_eq!(
            parse_chunks(body.chunks(1), sse),
            expected,
            "{name} byte by byte"
        );
        for size in [2, 3, 7, 64, 333] {
            assert_eq!(
                parse_chunks(body.chunks(size), sse),
                expected,
                "{name} chunks of {size}"
            );
        }
        let step = (body.len() / 40).max(1);
        for i in (0..body.len()).step_by(step) {
            for j in (i..body.len()).step_by(step) {
                let got = parse_chunks([&body[..i], &body[i..j], &body[j..]], sse);
                assert_eq!(got, expected, "{name} split at {i},{j}");
            }
        }
    }
}

#[test]
fn openai_stream_without_done_still_settles() {
    let body = fixture("openai_chat_stream.sse");
    let text = String::from_utf8(body).unwrap();
    let cut = text.find("data: [DONE]").unwrap();
    let mut p = SseUsageParser::new();
    p.feed(&text.as_bytes()[..cut]);
    p.finish();
    assert_eq!(p.usage(), Some(tu(19, 10, 0)));
    assert!(!p.saw_done());
}

#[test]
fn anthropic_stream_cut_after_message_start_gives_partial_usage() {
    let body = fixture("anthropic_message_stream.sse");
    let text = String::from_utf8(body).unwrap();
    let cut = text.find("event: content_block_start").unwrap();
    assert_eq!(
        usage_from_sse(&text.as_bytes()[..cut]),
        Some(tu(472 + 1800, 2, 1800)),
        "input known, output so far"
    );
}

#[test]
fn every_prefix_of_every_fixture_is_safe() {
    for (name, sse, expected) in usage_table() {
        let body = fixture(name);
        for i in 0..=body.len() {
            let got = parse_whole(&body[..i], sse);
            if let Some(u) = got {
                assert!(u.cached_input_tokens <= u.input_tokens, "{name}[..{i}]");
                let e = expected.unwrap();
                assert!(u.input_tokens <= e.input_tokens && u.output_tokens <= e.output_tokens);
            }
        }
    }
}

#[test]
fn big_embeddings_response_streams_through_bounded_memory() {
    let mut body = br#"{"object":"list","data":["#.to_vec();
    for i in 0..300 {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(
            format!(r#"{{"object":"embedding","index":{i},"embedding":["#).as_bytes(),
        );
        for k in 0..1536 {
            if k > 0 {
                body.push(b',');
            }
            body.extend_from_slice(b"-0.0028842222");
        }
        body.extend_from_slice(b"]}");
    }
    body.extend_from_slice(br#"],"model":"text-embedding-3-large","usage":{"prompt_tokens":4242,"total_tokens":4242}}"#);
    assert!(body.len() > 6_000_000);
    let mut s = JsonUsageScanner::new();
    for c in body.chunks(16 * 1024) {
        s.feed(c);
    }
    assert_eq!(s.usage(), Some(tu(4242, 0, 0)));
}

/// (request fixture, api, model, input tokens, output tokens, stream, body rewritten)
#[test]
fn estimate_table() {
    let table: [(&str, Api, &str, u64, u64, bool, bool); 6] = [
        (
            "openai_chat.json",
            Api::ChatCompletions,
            "gpt-4o-mini",
            34_u64.div_ceil(4) + 2 * PER_MESSAGE_TOKENS + PER_REQUEST_TOKENS,
            300,
            false,
            false,
        ),
        (
            "openai_chat_stream.json",
            Api::ChatCompletions,
            "gpt-4o",
            22_u64.div_ceil(4) + MEDIA_PART_TOKENS + PER_MESSAGE_TOKENS + PER_REQUEST_TOKENS,
            200,
            true,
            true,
        ),
        (
            "anthropic_messages.json",
            Api::Messages,
            "claude-sonnet-4-20250514",
            77_u64.div_ceil(4) + 3 * PER_MESSAGE_TOKENS + PER_REQUEST_TOKENS,
            1024,
            true,
            false,
        ),
        (
            "openai_responses.json",
            Api::Responses,
            "gpt-4.1",
            57_u64.div_ceil(4) + PER_REQUEST_TOKENS,
            512,
            false,
            false,
        ),
        (
            "openai_embeddings.json",
            Api::Embeddings,
            "text-embedding-3-small",
            43_u64.div_ceil(4),
            0,
            false,
            false,
        ),
        (
            "openai_completions.json",
            Api::Completions,
            "gpt-3.5-turbo-instruct",
            18_u64.div_ceil(4) + PER_REQUEST_TOKENS,
            7,
            true,
            true,
        ),
    ];
    for (name, api, model, input, output, stream, rewritten) in table {
        let body = fixture(&format!("requests/{name}"));
        let p = estimate::prepare(api, &body, &estimate::Limits::new(4096)).unwrap();
        assert_eq!(p.estimate.model, model, "{name}");
        assert_eq!(p.estimate.input_tokens, input, "{name} input");
        assert_eq!(p.estimate.output_tokens, output, "{name} output");
        assert_eq!(p.estimate.stream, stream, "{name} stream");
        assert_eq!(p.new_body.is_some(), rewritten, "{name} rewritten");
        if let Some(nb) = p.new_body {
            let before: Value = serde_json::from_slice(&body).unwrap();
            let mut after: Value = serde_json::from_slice(&nb).unwrap();
            assert_eq!(after["stream_options"]["include_usage"], Value::Bool(true));
            // Nothing else changed.
            after.as_object_mut().unwrap().remove("stream_options");
            assert_eq!(after, before, "{name}");
        }
    }
}
