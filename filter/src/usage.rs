//! Reads the token usage from a response body while it streams through, without
//! holding it back and with bounded memory.
//!
//! - JSON bodies: [`JsonUsageScanner`] follows the JSON structure byte by byte and keeps
//!   only the top-level `usage` object (at most 64 KiB), so a multi-megabyte embeddings
//!   response costs no buffer.
//! - Server-sent events: [`SseUsageParser`] splits arbitrary chunks into lines (LF, CR
//!   or CRLF, even when a chunk ends between CR and LF), keeps at most one line (1 MiB;
//!   a longer line is skipped, not buffered), and reads `data:` lines that mention
//!   `usage`: OpenAI's final chunk (`usage`), Anthropic's `message_start`
//!   (`message.usage`) and `message_delta` (`usage`), the Responses API's
//!   `response.completed` (`response.usage`). `[DONE]` ends the stream.
//!
//! Usage fields (later events override earlier ones, field by field) map to
//! Caracal's `TokenUsage`, whose `input_tokens` INCLUDES cached tokens:
//! - OpenAI chat/completions/embeddings: input = `prompt_tokens`, output =
//!   `completion_tokens`, cached = `prompt_tokens_details.cached_tokens`;
//! - OpenAI Responses: input = `input_tokens`, output = `output_tokens`, cached =
//!   `input_tokens_details.cached_tokens`;
//! - Anthropic: input = `input_tokens + cache_read_input_tokens +
//!   cache_creation_input_tokens`, output = `output_tokens`, cached =
//!   `cache_read_input_tokens`.
//!
//! Counts that are not non-negative integers below 2^64 are ignored (never wrap).

use caracal_proto::v1::TokenUsage;
use serde_json::Value;

/// Longest SSE line kept; longer lines are skipped.
pub const MAX_LINE_BYTES: usize = 1 << 20;
/// Largest `usage` object kept from a JSON body.
pub const MAX_USAGE_JSON_BYTES: usize = 64 << 10;

/// A token count from JSON: a non-negative integer (or integral float) below 2^64.
pub fn as_count(v: &Value) -> Option<u64> {
    if let Some(n) = v.as_u64() {
        return Some(n);
    }
    let f = v.as_f64()?;
    // 18446744073709551616.0 is 2^64, the first float past u64::MAX.
    (f.is_finite() && f >= 0.0 && f.fract() == 0.0 && f < 18_446_744_073_709_551_616.0)
        .then_some(f as u64)
}

/// Usage fields as providers report them, merged across events.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RawUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    details_cached_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
}

impl RawUsage {
    /// Reads a provider `usage` object; `None` when it holds no token count.
    pub fn from_usage_object(v: &Value) -> Option<RawUsage> {
        let o = v.as_object()?;
        let get = |k: &str| o.get(k).and_then(as_count);
        let details = |k: &str| {
            o.get(k)
                .and_then(|d| d.get("cached_tokens"))
                .and_then(as_count)
        };
        let raw = RawUsage {
            prompt_tokens: get("prompt_tokens"),
            completion_tokens: get("completion_tokens"),
            input_tokens: get("input_tokens"),
            output_tokens: get("output_tokens"),
            details_cached_tokens: details("prompt_tokens_details")
                .or_else(|| details("input_tokens_details")),
            cache_read_input_tokens: get("cache_read_input_tokens"),
            cache_creation_input_tokens: get("cache_creation_input_tokens"),
        };
        raw.has_tokens().then_some(raw)
    }

    fn has_tokens(&self) -> bool {
        self.prompt_tokens.is_some()
            || self.completion_tokens.is_some()
            || self.input_tokens.is_some()
            || self.output_tokens.is_some()
    }

    /// Fields present in `later` replace these (providers report running totals).
    pub fn merge(&mut self, later: RawUsage) {
        fn take(a: &mut Option<u64>, b: Option<u64>) {
            if b.is_some() {
                *a = b;
            }
        }
        take(&mut self.prompt_tokens, later.prompt_tokens);
        take(&mut self.completion_tokens, later.completion_tokens);
        take(&mut self.input_tokens, later.input_tokens);
        take(&mut self.output_tokens, later.output_tokens);
        take(&mut self.details_cached_tokens, later.details_cached_tokens);
        take(
            &mut self.cache_read_input_tokens,
            later.cache_read_input_tokens,
        );
        take(
            &mut self.cache_creation_input_tokens,
            later.cache_creation_input_tokens,
        );
    }

    /// Caracal's usage (input includes cached tokens), `None` when nothing was reported.
    pub fn to_token_usage(&self) -> Option<TokenUsage> {
        if !self.has_tokens() {
            return None;
        }
        let cache_read = self.cache_read_input_tokens.unwrap_or(0);
        let input = match self.prompt_tokens {
            Some(p) => p,
            None => self
                .input_tokens
                .unwrap_or(0)
                .saturating_add(cache_read)
                .saturating_add(self.cache_creation_input_tokens.unwrap_or(0)),
        };
        let output = self.completion_tokens.or(self.output_tokens).unwrap_or(0);
        let cached = self
            .cache_read_input_tokens
            .or(self.details_cached_tokens)
            .unwrap_or(0)
            .min(input);
        Some(TokenUsage {
            input_tokens: input,
            output_tokens: output,
            cached_input_tokens: cached,
        })
    }

    /// Merges every usage object found in one event or body: `usage`,
    /// `message.usage` (Anthropic `message_start`), `response.usage` (Responses API).
    fn absorb_event(&mut self, v: &Value) -> bool {
        let mut found = false;
        let candidates = [
            v.get("usage"),
            v.get("message").and_then(|m| m.get("usage")),
            v.get("response").and_then(|r| r.get("usage")),
        ];
        for u in candidates.into_iter().flatten() {
            if let Some(raw) = RawUsage::from_usage_object(u) {
                self.merge(raw);
                found = true;
            }
        }
        found
    }
}

/// Incremental parser of a `text/event-stream` body.
#[derive(Debug, Default)]
pub struct SseUsageParser {
    line: Vec<u8>,
    skipping: bool,
    after_cr: bool,
    done: bool,
    usage: RawUsage,
}

impl SseUsageParser {
    /// A parser at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next chunk, split anywhere.
    pub fn feed(&mut self, mut chunk: &[u8]) {
        while !chunk.is_empty() {
            if self.after_cr {
                self.after_cr = false;
                if chunk[0] == b'\n' {
                    chunk = &chunk[1..];
                    continue;
                }
            }
            match chunk.iter().position(|&b| b == b'\n' || b == b'\r') {
                Some(i) => {
                    self.push(&chunk[..i]);
                    self.end_line();
                    self.after_cr = chunk[i] == b'\r';
                    chunk = &chunk[i + 1..];
                }
                None => {
                    self.push(chunk);
                    break;
                }
            }
        }
    }

    /// The end of the body: a last line without a line end still counts.
    pub fn finish(&mut self) {
        if !self.line.is_empty() || self.skipping {
            self.end_line();
        }
    }

    /// Whether `data: [DONE]` was seen.
    pub fn saw_done(&self) -> bool {
        self.done
    }

    /// The usage seen so far.
    pub fn usage(&self) -> Option<TokenUsage> {
        self.usage.to_token_usage()
    }

    fn push(&mut self, bytes: &[u8]) {
        if self.skipping {
            return;
        }
        if self.line.len() + bytes.len() > MAX_LINE_BYTES {
            self.skipping = true;
            self.line = Vec::new();
            return;
        }
        self.line.extend_from_slice(bytes);
    }

    fn end_line(&mut self) {
        if !self.skipping {
            let line = std::mem::take(&mut self.line);
            self.process_line(&line);
            self.line = line;
            self.line.clear();
            if self.line.capacity() > 64 << 10 {
                self.line = Vec::new();
            }
        }
        self.skipping = false;
    }

    fn process_line(&mut self, line: &[u8]) {
        let Some(data) = line.strip_prefix(b"data:") else {
            return; // event:, id:, retry:, comments and blank lines carry no usage
        };
        let data = data.strip_prefix(b" ").unwrap_or(data);
        if data.trim_ascii() == b"[DONE]" {
            self.done = true;
            return;
        }
        // Cheap pre-filter: only events that mention usage are parsed.
        if !contains(data, b"usage") {
            return;
        }
        if let Ok(v) = serde_json::from_slice::<Value>(data) {
            self.usage.absorb_event(&v);
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Incremental scanner of a JSON response body that keeps only the top-level `usage`.
#[derive(Debug, Default)]
pub struct JsonUsageScanner {
    depth: u32,
    in_str: bool,
    esc: bool,
    expect_key: bool,
    in_key: bool,
    key_len: usize,
    key_ok: bool,
    key_is_usage: bool,
    await_value: bool,
    capturing: bool,
    capture: Vec<u8>,
    stopped: bool,
    usage: Option<RawUsage>,
}

const USAGE_KEY: &[u8] = b"usage";

impl JsonUsageScanner {
    /// A scanner at the start of a body.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next chunk, split anywhere.
    pub fn feed(&mut self, chunk: &[u8]) {
        let mut i = 0;
        while i < chunk.len() && !self.stopped {
            // Fast path: skip the inside of strings nobody needs.
            if self.in_str && !self.esc && !self.in_key && !self.capturing {
                match chunk[i..].iter().position(|&b| b == b'"' || b == b'\\') {
                    Some(p) => i += p,
                    None => return,
                }
            }
            self.byte(chunk[i]);
            i += 1;
        }
    }

    /// The usage found (available as soon as the `usage` object is complete).
    pub fn usage(&self) -> Option<TokenUsage> {
        self.usage.as_ref().and_then(RawUsage::to_token_usage)
    }

    fn byte(&mut self, b: u8) {
        if self.capturing {
            if self.capture.len() >= MAX_USAGE_JSON_BYTES {
                self.capturing = false;
                self.capture = Vec::new();
            } else {
                self.capture.push(b);
            }
        }
        if self.in_str {
            if self.esc {
                self.esc = false;
            } else if b == b'\\' {
                self.esc = true;
                self.key_ok = false;
            } else if b == b'"' {
                self.in_str = false;
                if self.in_key {
                    self.in_key = false;
                    self.key_is_usage = self.key_ok && self.key_len == USAGE_KEY.len();
                }
            } else if self.in_key {
                if self.key_len < USAGE_KEY.len() && USAGE_KEY[self.key_len] == b {
                    self.key_len += 1;
                } else {
                    self.key_ok = false;
                }
            }
            return;
        }
        match b {
            b' ' | b'\t' | b'\n' | b'\r' => {}
            b'"' => {
                self.in_str = true;
                if self.depth == 1 {
                    if self.expect_key {
                        self.expect_key = false;
                        self.in_key = true;
                        self.key_len = 0;
                        self.key_ok = true;
                    }
                    self.await_value = false;
                }
            }
            b'{' | b'[' => {
                if self.depth == 0 && b == b'[' {
                    self.stopped = true;
                    return;
                }
                if self.depth == 0 {
                    self.expect_key = true;
                } else if self.depth == 1 && self.await_value {
                    self.await_value = false;
                    if b == b'{' {
                        self.capturing = true;
                        self.capture.clear();
                        self.capture.push(b);
                    }
                }
                self.depth = self.depth.saturating_add(1);
            }
            b'}' | b']' => {
                self.depth = self.depth.saturating_sub(1);
                if self.capturing && self.depth == 1 {
                    self.capturing = false;
                    let captured = std::mem::take(&mut self.capture);
                    if let Ok(v) = serde_json::from_slice::<Value>(&captured) {
                        if let Some(raw) = RawUsage::from_usage_object(&v) {
                            self.usage = Some(raw);
                        }
                    }
                }
                if self.depth == 0 {
                    self.stopped = true;
                }
            }
            b',' if self.depth == 1 => {
                self.expect_key = true;
                self.await_value = false;
            }
            b':' if self.depth == 1 => {
                self.await_value = self.key_is_usage;
                self.key_is_usage = false;
            }
            _ => {
                if self.depth == 0 {
                    self.stopped = true; // not a JSON object
                } else if self.depth == 1 {
                    self.await_value = false; // a scalar value (null, number, true)
                }
            }
        }
    }
}

/// The usage reader of one response, chosen from its `content-type`.
#[derive(Debug)]
pub enum UsageParser {
    /// `application/json` (and anything that is not an event stream).
    Json(JsonUsageScanner),
    /// `text/event-stream`.
    Sse(SseUsageParser),
}

impl UsageParser {
    /// The parser for a response `content-type`.
    pub fn for_content_type(content_type: &str) -> UsageParser {
        let ct = content_type.trim_start().to_ascii_lowercase();
        if ct.starts_with("text/event-stream") {
            UsageParser::Sse(SseUsageParser::new())
        } else {
            UsageParser::Json(JsonUsageScanner::new())
        }
    }

    /// Whether the body is an event stream.
    pub fn is_stream(&self) -> bool {
        matches!(self, UsageParser::Sse(_))
    }

    /// Feeds the next body chunk.
    pub fn feed(&mut self, chunk: &[u8]) {
        match self {
            UsageParser::Json(p) => p.feed(chunk),
            UsageParser::Sse(p) => p.feed(chunk),
        }
    }

    /// Marks the end of the body.
    pub fn finish(&mut self) {
        if let UsageParser::Sse(p) = self {
            p.finish();
        }
    }

    /// The usage seen so far.
    pub fn usage(&self) -> Option<TokenUsage> {
        match self {
            UsageParser::Json(p) => p.usage(),
            UsageParser::Sse(p) => p.usage(),
        }
    }
}

/// Parses a whole JSON body at once (convenience for tests and small bodies).
pub fn usage_from_json(body: &[u8]) -> Option<TokenUsage> {
    let mut s = JsonUsageScanner::new();
    s.feed(body);
    s.usage()
}

/// Parses a whole SSE body at once.
pub fn usage_from_sse(body: &[u8]) -> Option<TokenUsage> {
    let mut p = SseUsageParser::new();
    p.feed(body);
    p.finish();
    p.usage()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tu(input: u64, output: u64, cached: u64) -> TokenUsage {
        TokenUsage {
            input_tokens: input,
            output_tokens: output,
            cached_input_tokens: cached,
        }
    }

    #[test]
    fn counts() {
        let v: Value = serde_json::from_str(
            r#"[0, 5, 18446744073709551615, 18446744073709551616, -1, 1.5, 2.0, "3", null, 1e19, 1e20]"#,
        )
        .unwrap();
        let got: Vec<_> = v.as_array().unwrap().iter().map(as_count).collect();
        assert_eq!(
            got,
            vec![
                Some(0),
                Some(5),
                Some(u64::MAX),
                None,
                None,
                None,
                Some(2),
                None,
                None,
                Some(10_000_000_000_000_000_000),
                None
            ]
        );
    }

    #[test]
    fn anthropic_cache_fields_add_to_input() {
        let v: Value = serde_json::from_str(
            r#"{"input_tokens":10,"cache_read_input_tokens":100,"cache_creation_input_tokens":5,"output_tokens":7}"#,
        )
        .unwrap();
        let raw = RawUsage::from_usage_object(&v).unwrap();
        assert_eq!(raw.to_token_usage(), Some(tu(115, 7, 100)));
    }

    #[test]
    fn saturating_sums() {
        let v: Value = serde_json::from_str(
            r#"{"input_tokens":18446744073709551615,"cache_read_input_tokens":18446744073709551615,"output_tokens":1}"#,
        )
        .unwrap();
        let u = RawUsage::from_usage_object(&v)
            .unwrap()
            .to_token_usage()
            .unwrap();
        assert_eq!(u.input_tokens, u64::MAX);
        assert!(u.cached_input_tokens <= u.input_tokens);
    }

    #[test]
    fn empty_or_null_usage_is_none() {
        for s in [
            "{}",
            "null",
            "[]",
            r#"{"total_tokens":"x"}"#,
            r#"{"prompt_tokens":-3}"#,
        ] {
            let v: Value = serde_json::from_str(s).unwrap();
            assert_eq!(RawUsage::from_usage_object(&v), None, "{s}");
        }
    }

    #[test]
    fn json_scanner_ignores_nested_usage_keys() {
        let body = br#"{"choices":[{"message":{"usage":{"prompt_tokens":999}}}],"meta":{"usage":{"prompt_tokens":5}},"x":"usage","usage":{"prompt_tokens":3,"completion_tokens":4}}"#;
        assert_eq!(usage_from_json(body), Some(tu(3, 4, 0)));
    }

    #[test]
    fn json_scanner_escapes_and_tricky_strings() {
        let body = br#"{"a":"}\"{,\"usage\":{\"prompt_tokens\":1}}","us\u0061ge":{"prompt_tokens":9},"usage":{"prompt_tokens":2,"completion_tokens":1,"note":"}{\\"}}"#;
        assert_eq!(usage_from_json(body), Some(tu(2, 1, 0)));
    }

    #[test]
    fn json_scanner_null_usage_and_non_objects() {
        assert_eq!(usage_from_json(br#"{"usage":null,"id":"x"}"#), None);
        assert_eq!(usage_from_json(br#"{"usage":5}"#), None);
        assert_eq!(usage_from_json(br#"[{"usage":{"prompt_tokens":1}}]"#), None);
        assert_eq!(usage_from_json(b"data: {}"), None);
        assert_eq!(usage_from_json(b""), None);
        assert_eq!(usage_from_json(br#"{"usage":["prompt_tokens",1]}"#), None);
    }

    #[test]
    fn json_scanner_bounds_the_usage_object() {
        let mut body = br#"{"usage":{"pad":""#.to_vec();
        body.extend(std::iter::repeat_n(b'a', MAX_USAGE_JSON_BYTES * 2));
        body.extend_from_slice(br#"","prompt_tokens":1}}"#);
        assert_eq!(usage_from_json(&body), None);
    }

    #[test]
    fn sse_line_ends_and_comments() {
        let body = b": keep-alive\r\nevent: x\rdata: {\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\r\n\r\ndata:[DONE]\n";
        let mut p = SseUsageParser::new();
        p.feed(body);
        p.finish();
        assert_eq!(p.usage(), Some(tu(1, 2, 0)));
        assert!(p.saw_done());
    }

    #[test]
    fn sse_last_line_without_newline() {
        assert_eq!(
            usage_from_sse(br#"data: {"usage":{"prompt_tokens":4,"completion_tokens":5}}"#),
            Some(tu(4, 5, 0))
        );
    }

    #[test]
    fn sse_long_lines_are_skipped_not_buffered() {
        let mut p = SseUsageParser::new();
        p.feed(b"data: {\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1},\"pad\":\"");
        let big = vec![b'x'; 64 << 10];
        for _ in 0..20 {
            p.feed(&big);
            assert!(p.line.len() <= MAX_LINE_BYTES);
        }
        p.feed(b"\"}\n");
        assert_eq!(p.usage(), None, "the over-long line was skipped");
        p.feed(b"data: {\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":3}}\n");
        assert_eq!(
            p.usage(),
            Some(tu(2, 3, 0)),
            "parsing resumes on the next line"
        );
    }

    #[test]
    fn content_type_selects_parser() {
        assert!(UsageParser::for_content_type("text/event-stream; charset=utf-8").is_stream());
        assert!(UsageParser::for_content_type("Text/Event-Stream").is_stream());
        assert!(!UsageParser::for_content_type("application/json").is_stream());
        assert!(!UsageParser::for_content_type("").is_stream());
    }
}
