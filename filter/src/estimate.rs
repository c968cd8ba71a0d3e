//! Sizes the reservation from the request body, before the call.
//!
//! The estimate only sizes the reservation; Settle charges the usage the provider
//! reports. The heuristic, per request:
//!
//! - input tokens = ceil(text characters / 4) + 4 per message (chat / Messages /
//!   Responses items) + 3 per request, where text characters count every text of the
//!   prompt (message contents and text parts, `system`, `instructions`, `prompt`,
//!   `input`, tool calls, tool results) plus the JSON length of tool definitions;
//!   each image / audio / file / document part counts a flat 1000 tokens (base64 data
//!   is never counted as text). Prompts given as token ids count one token per id.
//! - output tokens = `max_completion_tokens`, else `max_tokens` (chat), `max_tokens`
//!   (completions, Anthropic Messages), `max_output_tokens` (Responses), else the
//!   configured `default_max_output_tokens`; times the number of choices (`n`, or
//!   `best_of` for completions) and, for completions, the number of prompts.
//!   Embeddings have no output tokens.
//! - both counts are capped at 2^32 - 1 (pricing them can never overflow).
//! - model = the body's `model` (empty when absent; the provider rejects such calls).
//!
//! For OpenAI streaming chat/completions requests (`"stream": true`) the body is
//! rewritten to set `stream_options.include_usage = true`, so the final chunk carries
//! the usage to settle.
//!
//! The output reserved is also the output allowed: when the request sets no output
//! limit, the reserved one is written into the forwarded body (`max_completion_tokens`
//! for chat, `max_tokens` for completions and Messages, `max_output_tokens` for
//! Responses), and a limit above the configured maximum is lowered to it. Otherwise a
//! model could return far more than was reserved. Responses `background: true` is
//! flagged ([`Prepared::background`]) and refused unless the route allows it: its
//! usage never comes back through the gateway.

use serde_json::{Map, Value};

/// Which provider API a request path is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    /// OpenAI `/v1/chat/completions`.
    ChatCompletions,
    /// OpenAI legacy `/v1/completions`.
    Completions,
    /// OpenAI `/v1/embeddings`.
    Embeddings,
    /// OpenAI `/v1/responses` (create).
    Responses,
    /// Anthropic `/v1/messages`.
    Messages,
    /// Any other path on an LLM route: authorized with a zero-token estimate, without
    /// reading the body.
    Other,
}

impl Api {
    /// Recognises the API from the request path (query ignored; any prefix before the
    /// API path is allowed, e.g. `/openai/v1/chat/completions`).
    pub fn from_path(path: &str) -> Api {
        let p = crate::config::strip_query(path).trim_end_matches('/');
        if p.ends_with("/chat/completions") {
            Api::ChatCompletions
        } else if p.ends_with("/completions") {
            Api::Completions
        } else if p.ends_with("/embeddings") {
            Api::Embeddings
        } else if p.ends_with("/responses") {
            Api::Responses
        } else if p.ends_with("/messages") {
            Api::Messages
        } else {
            Api::Other
        }
    }

    /// The API of a request: only `POST` creates a completion / embedding / message;
    /// any other method (e.g. `GET /v1/chat/completions` listing stored completions)
    /// is [`Api::Other`].
    pub fn for_request(method: &str, path: &str) -> Api {
        if method.eq_ignore_ascii_case("POST") {
            Api::from_path(path)
        } else {
            Api::Other
        }
    }

    /// Whether the filter may rewrite the body (`stream_options.include_usage`).
    pub fn may_rewrite_body(self) -> bool {
        matches!(self, Api::ChatCompletions | Api::Completions)
    }

    /// Whether the filter may change the body (output limit, stream_options), so
    /// `content-length` cannot be kept.
    pub fn may_change_body(self) -> bool {
        cap_field(self).is_some()
    }

    /// Whether the body is read to estimate (and checked to be JSON).
    pub fn reads_body(self) -> bool {
        self != Api::Other
    }
}

/// The estimate of one call.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Estimate {
    /// The `model` of the request.
    pub model: String,
    /// Estimated prompt tokens.
    pub input_tokens: u64,
    /// Reserved output tokens.
    pub output_tokens: u64,
    /// `"stream": true` was requested.
    pub stream: bool,
}

/// The request body after estimation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prepared {
    /// The estimate for Authorize.
    pub estimate: Estimate,
    /// A replacement body (output limit written, streaming usage turned on), when one
    /// is needed.
    pub new_body: Option<Vec<u8>>,
    /// A Responses `background: true` request: its usage never comes back through the
    /// gateway, so it is refused unless the route allows it.
    pub background: bool,
}

/// The refusal text of a background Responses request.
pub const BACKGROUND_REFUSED: &str = "Background responses (\"background\": true) cannot be metered by this gateway (their usage never comes back through it); send the request without \"background\", or ask the operator to allow background responses on this route.";

/// A body the filter refuses with 400.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadRequest(pub String);

/// What the route allows a request to ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Output tokens reserved (and written into the body) when the request sets none.
    pub default_max_output_tokens: u64,
    /// Largest output limit forwarded; a larger one in the request is lowered to it.
    pub max_output_tokens_cap: u64,
}

impl Limits {
    /// `default_max_output_tokens` for requests without a limit, no lowering of the
    /// client's own limit.
    pub fn new(default_max_output_tokens: u64) -> Self {
        Limits {
            default_max_output_tokens,
            max_output_tokens_cap: MAX_ESTIMATE_TOKENS,
        }
    }
}

/// The top-level field holding the per-choice output limit of `api`, if any.
pub fn cap_field(api: Api) -> Option<&'static str> {
    match api {
        Api::ChatCompletions => Some("max_completion_tokens"),
        Api::Completions | Api::Messages => Some("max_tokens"),
        Api::Responses => Some("max_output_tokens"),
        Api::Embeddings | Api::Other => None,
    }
}

/// Characters per token of the heuristic.
pub const CHARS_PER_TOKEN: u64 = 4;
/// Overhead tokens per message / input item.
pub const PER_MESSAGE_TOKENS: u64 = 4;
/// Overhead tokens per request.
pub const PER_REQUEST_TOKENS: u64 = 3;
/// Flat tokens for one image, audio, file or document part.
pub const MEDIA_PART_TOKENS: u64 = 1000;
/// Largest token count an estimate reports (2^32 - 1): far above any model's limits,
/// low enough that pricing it can never overflow; a larger request is simply refused
/// for lack of budget.
pub const MAX_ESTIMATE_TOKENS: u64 = u32::MAX as u64;
const MAX_CHOICES: u64 = 128;
const MAX_DEPTH: u32 = 64;

/// Estimates `body` for `api` and prepares the body to forward (see the module doc).
pub fn prepare(api: Api, body: &[u8], limits: &Limits) -> Result<Prepared, BadRequest> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| BadRequest(format!("The request body is not valid JSON: {e}")))?;
    let Value::Object(obj) = &value else {
        return Err(BadRequest(
            "The request body must be a JSON object.".to_owned(),
        ));
    };
    let background =
        api == Api::Responses && obj.get("background").and_then(Value::as_bool) == Some(true);
    let mut edits: Vec<(&'static str, Value)> = Vec::new();
    let cap = output_cap(api, obj, limits);
    if let Some(cap) = cap {
        if api == Api::ChatCompletions {
            // Lower whichever limit the client set; with none, write
            // max_completion_tokens (the field every current OpenAI model takes).
            let mut any = false;
            for field in ["max_completion_tokens", "max_tokens"] {
                if obj.contains_key(field) {
                    any = true;
                    edits.push((field, Value::from(cap)));
                }
            }
            if !any {
                edits.push(("max_completion_tokens", Value::from(cap)));
            }
        } else if let Some(field) = cap_field(api) {
            edits.push((field, Value::from(cap)));
        }
    }
    let estimate = estimate_inner(api, obj, limits.default_max_output_tokens, cap);
    if estimate.stream && api.may_rewrite_body() {
        match obj.get("stream_options") {
            Some(Value::Object(so)) if so.get("include_usage") == Some(&Value::Bool(true)) => {}
            Some(Value::Object(so)) => {
                let mut so = so.clone();
                so.insert("include_usage".to_owned(), Value::Bool(true));
                edits.push(("stream_options", Value::Object(so)));
            }
            _ => edits.push(("stream_options", json_include_usage())),
        }
    }
    let new_body = rewrite(body, obj, &edits);
    Ok(Prepared {
        estimate,
        new_body,
        background,
    })
}

fn json_include_usage() -> Value {
    let mut so = Map::new();
    so.insert("include_usage".to_owned(), Value::Bool(true));
    Value::Object(so)
}

/// The output limit to write into the body: the default when the request sets none,
/// the cap when it sets more; `None` when the request's own limit stands.
fn output_cap(api: Api, o: &Map<String, Value>, limits: &Limits) -> Option<u64> {
    let field = cap_field(api)?;
    let cap = limits.max_output_tokens_cap.max(1);
    let given = match api {
        Api::ChatCompletions => {
            count_field(o, "max_completion_tokens").or_else(|| count_field(o, "max_tokens"))
        }
        _ => count_field(o, field),
    };
    match given {
        None => Some(limits.default_max_output_tokens.min(cap)),
        Some(n) if n > cap => Some(cap),
        Some(_) => None,
    }
}

/// The body with the top-level `edits` applied, or `None`
/// when there are none. When every edited key is new, the original bytes are kept
/// and the keys are inserted after the opening brace (cheap for large bodies);
/// otherwise the object is re-serialized.
fn rewrite(body: &[u8], obj: &Map<String, Value>, edits: &[(&str, Value)]) -> Option<Vec<u8>> {
    if edits.is_empty() {
        return None;
    }
    if edits.iter().all(|(k, _)| !obj.contains_key(*k)) {
        let open = body.iter().position(|&b| b == b'{')?;
        let mut insert = Vec::with_capacity(64);
        for (k, v) in edits {
            insert.extend_from_slice(serde_json::to_string(k).ok()?.as_bytes());
            insert.push(b':');
            insert.extend_from_slice(serde_json::to_string(v).ok()?.as_bytes());
            insert.push(b',');
        }
        if obj.is_empty() {
            insert.pop();
        }
        let mut out = Vec::with_capacity(body.len() + insert.len());
        out.extend_from_slice(&body[..=open]);
        out.extend_from_slice(&insert);
        out.extend_from_slice(&body[open + 1..]);
        return Some(out);
    }
    let mut o = obj.clone();
    for (k, v) in edits {
        o.insert((*k).to_owned(), v.clone());
    }
    serde_json::to_vec(&Value::Object(o)).ok()
}

/// Estimates an already parsed request object.
pub fn estimate_object(
    api: Api,
    o: &Map<String, Value>,
    default_max_output_tokens: u64,
) -> Estimate {
    estimate_inner(api, o, default_max_output_tokens, None)
}

/// [`estimate_object`], with `forced` as the per-choice output limit when set (the
/// limit written into the forwarded body).
fn estimate_inner(
    api: Api,
    o: &Map<String, Value>,
    default_max_output_tokens: u64,
    forced: Option<u64>,
) -> Estimate {
    let mut c = Counter::default();
    let model = o
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let stream = o.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let choices = count_field(o, "n").unwrap_or(1).clamp(1, MAX_CHOICES);
    let output_tokens = match api {
        Api::ChatCompletions => {
            c.fixed(PER_REQUEST_TOKENS);
            c.messages(o.get("messages"));
            c.json(o.get("tools"));
            c.json(o.get("functions"));
            forced
                .or_else(|| count_field(o, "max_completion_tokens"))
                .or_else(|| count_field(o, "max_tokens"))
                .unwrap_or(default_max_output_tokens)
                .saturating_mul(choices)
        }
        Api::Completions => {
            c.fixed(PER_REQUEST_TOKENS);
            let prompts = c.prompt(o.get("prompt"));
            c.part(o.get("suffix"), 0);
            let best_of = count_field(o, "best_of").unwrap_or(1).clamp(1, MAX_CHOICES);
            forced
                .or_else(|| count_field(o, "max_tokens"))
                .unwrap_or(default_max_output_tokens)
                .saturating_mul(choices.max(best_of))
                .saturating_mul(prompts.max(1))
        }
        Api::Embeddings => {
            c.prompt(o.get("input"));
            0
        }
        Api::Responses => {
            c.fixed(PER_REQUEST_TOKENS);
            match o.get("input") {
                Some(Value::Array(_)) => c.messages(o.get("input")),
                other => c.part(other, 0),
            }
            c.part(o.get("instructions"), 0);
            c.json(o.get("tools"));
            forced
                .or_else(|| count_field(o, "max_output_tokens"))
                .unwrap_or(default_max_output_tokens)
        }
        Api::Messages => {
            c.fixed(PER_REQUEST_TOKENS);
            c.part(o.get("system"), 0);
            c.messages(o.get("messages"));
            c.json(o.get("tools"));
            forced
                .or_else(|| count_field(o, "max_tokens"))
                .unwrap_or(default_max_output_tokens)
        }
        Api::Other => 0,
    };
    let input_tokens = if api == Api::Other { 0 } else { c.tokens() };
    Estimate {
        model,
        input_tokens: input_tokens.min(MAX_ESTIMATE_TOKENS),
        output_tokens: output_tokens.min(MAX_ESTIMATE_TOKENS),
        stream,
    }
}

/// A non-negative integer field; anything else (absent, negative, fractional, string,
/// out of range) is `None`.
fn count_field(o: &Map<String, Value>, key: &str) -> Option<u64> {
    o.get(key).and_then(crate::usage::as_count)
}

#[derive(Default)]
struct Counter {
    chars: u64,
    fixed_tokens: u64,
}

impl Counter {
    fn tokens(&self) -> u64 {
        self.chars
            .div_ceil(CHARS_PER_TOKEN)
            .saturating_add(self.fixed_tokens)
    }

    fn fixed(&mut self, tokens: u64) {
        self.fixed_tokens = self.fixed_tokens.saturating_add(tokens);
    }

    fn text(&mut self, s: &str) {
        self.chars = self.chars.saturating_add(s.chars().count() as u64);
    }

    /// JSON length of a structure (tool definitions, tool-call arguments).
    fn json(&mut self, v: Option<&Value>) {
        if let Some(v) = v {
            if !v.is_null() {
                let len = serde_json::to_vec(v).map(|b| b.len()).unwrap_or(0);
                self.chars = self.chars.saturating_add(len as u64);
            }
        }
    }

    /// A list of messages / input items: per-item overhead plus their text.
    fn messages(&mut self, v: Option<&Value>) {
        if let Some(Value::Array(items)) = v {
            for m in items {
                self.fixed(PER_MESSAGE_TOKENS);
                self.part(Some(m), 0);
            }
        }
    }

    /// A completions `prompt` or embeddings `input`: text, texts, token ids or lists of
    /// token ids. Returns the number of prompts.
    fn prompt(&mut self, v: Option<&Value>) -> u64 {
        match v {
            Some(Value::String(s)) => {
                self.text(s);
                1
            }
            Some(Value::Array(items)) => {
                if items.iter().all(Value::is_number) {
                    self.fixed(items.len() as u64);
                    return 1;
                }
                for item in items {
                    match item {
                        Value::Array(ids) => self.fixed(ids.len() as u64),
                        other => self.part(Some(other), 0),
                    }
                }
                items.len() as u64
            }
            _ => 0,
        }
    }

    /// Any content: a string, a list of parts, a part or message object.
    fn part(&mut self, v: Option<&Value>, depth: u32) {
        let Some(v) = v else { return };
        if depth > MAX_DEPTH {
            return;
        }
        match v {
            Value::String(s) => self.text(s),
            Value::Array(items) => {
                for item in items {
                    self.part(Some(item), depth + 1);
                }
            }
            Value::Object(o) => {
                let ty = o.get("type").and_then(Value::as_str).unwrap_or("");
                if is_media(ty) {
                    self.fixed(MEDIA_PART_TOKENS);
                    return;
                }
                for key in [
                    "text",
                    "thinking",
                    "refusal",
                    "name",
                    "content",
                    "output",
                    "arguments",
                ] {
                    self.part(o.get(key), depth + 1);
                }
                // Tool calls and tool inputs are JSON structures.
                for key in ["input", "tool_calls", "function_call"] {
                    match o.get(key) {
                        Some(Value::String(s)) => self.text(s),
                        other => self.json(other),
                    }
                }
            }
            Value::Null | Value::Bool(_) | Value::Number(_) => {}
        }
    }
}

fn is_media(ty: &str) -> bool {
    matches!(
        ty,
        "image"
            | "image_url"
            | "input_image"
            | "audio"
            | "input_audio"
            | "file"
            | "input_file"
            | "document"
    )
}

/// The body with `stream_options.include_usage = true`, or `None` when it already is.
/// When `stream_options` is absent the original bytes are kept and the option is
/// inserted after the opening brace; otherwise the body is re-serialized.
pub fn enable_stream_usage(body: &[u8], value: &Value) -> Option<Vec<u8>> {
    let obj = value.as_object()?;
    match obj.get("stream_options") {
        None => {
            let open = body.iter().position(|&b| b == b'{')?;
            let insert: &[u8] = if obj.is_empty() {
                br#""stream_options":{"include_usage":true}"#
            } else {
                br#""stream_options":{"include_usage":true},"#
            };
            let mut out = Vec::with_capacity(body.len() + insert.len());
            out.extend_from_slice(&body[..=open]);
            out.extend_from_slice(insert);
            out.extend_from_slice(&body[open + 1..]);
            Some(out)
        }
        Some(Value::Object(so)) if so.get("include_usage") == Some(&Value::Bool(true)) => None,
        Some(_) => {
            let mut obj = obj.clone();
            let entry = obj
                .entry("stream_options")
                .or_insert_with(|| Value::Object(Map::new()));
            if !entry.is_object() {
                *entry = Value::Object(Map::new());
            }
            if let Value::Object(so) = entry {
                so.insert("include_usage".to_owned(), Value::Bool(true));
            }
            serde_json::to_vec(&Value::Object(obj)).ok()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn est(api: Api, body: &str) -> Estimate {
        prepare(api, body.as_bytes(), &Limits::new(4096))
            .unwrap()
            .estimate
    }

    #[test]
    fn api_from_path() {
        let table = [
            ("/v1/chat/completions", Api::ChatCompletions),
            ("/v1/chat/completions?x=1", Api::ChatCompletions),
            ("/openai/v1/chat/completions/", Api::ChatCompletions),
            ("/v1/completions", Api::Completions),
            ("/v1/embeddings", Api::Embeddings),
            ("/v1/responses", Api::Responses),
            ("/v1/responses/resp_123", Api::Other),
            ("/v1/messages", Api::Messages),
            ("/v1/messages/count_tokens", Api::Other),
            ("/v1/models", Api::Other),
            ("/", Api::Other),
        ];
        for (path, api) in table {
            assert_eq!(Api::from_path(path), api, "{path}");
        }
        assert_eq!(Api::for_request("POST", "/v1/messages"), Api::Messages);
        assert_eq!(Api::for_request("post", "/v1/embeddings"), Api::Embeddings);
        assert_eq!(Api::for_request("GET", "/v1/chat/completions"), Api::Other);
        assert_eq!(Api::for_request("DELETE", "/v1/responses"), Api::Other);
        assert!(!Api::Other.reads_body());
        assert!(Api::Messages.reads_body());
    }

    #[test]
    fn chat_completions_realistic() {
        let body = r#"{
          "model": "gpt-4o-mini",
          "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Write a haiku about budgets."}
          ],
          "temperature": 0.7,
          "max_tokens": 256
        }"#;
        let e = est(Api::ChatCompletions, body);
        assert_eq!(e.model, "gpt-4o-mini");
        // 28 + 28 chars = 56 -> 14 tokens, + 2*4 per message + 3 per request.
        assert_eq!(e.input_tokens, 14 + 8 + 3);
        assert_eq!(e.output_tokens, 256);
        assert!(!e.stream);
    }

    #[test]
    fn chat_completions_parts_images_tools_and_choices() {
        let body = r#"{
          "model": "gpt-4o",
          "messages": [
            {"role": "user", "content": [
              {"type": "text", "text": "What is in this image?"},
              {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="}}
            ]},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "ok"}
          ],
          "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
          "max_completion_tokens": 100,
          "max_tokens": 9999,
          "n": 3
        }"#;
        let e = est(Api::ChatCompletions, body);
        assert_eq!(e.output_tokens, 300, "max_completion_tokens wins, times n");
        assert!(e.input_tokens >= MEDIA_PART_TOKENS + 3 * PER_MESSAGE_TOKENS + PER_REQUEST_TOKENS);
        // The base64 image is not counted as text.
        assert!(e.input_tokens < MEDIA_PART_TOKENS + 100);
    }

    #[test]
    fn chat_without_limit_uses_default() {
        let e = est(Api::ChatCompletions, r#"{"model":"m","messages":[]}"#);
        assert_eq!(e.output_tokens, 4096);
        assert_eq!(e.input_tokens, PER_REQUEST_TOKENS);
        let e = prepare(Api::ChatCompletions, br#"{"model":"m"}"#, &Limits::new(7))
            .unwrap()
            .estimate;
        assert_eq!(e.output_tokens, 7);
    }

    #[test]
    fn invalid_limits_fall_back_to_default() {
        for v in ["-1", "1.5", "\"100\"", "null", "1e400x"] {
            let body = format!(r#"{{"model":"m","max_tokens":{v}}}"#);
            match prepare(Api::ChatCompletions, body.as_bytes(), &Limits::new(50)) {
                Ok(p) => assert_eq!(p.estimate.output_tokens, 50, "{v}"),
                Err(BadRequest(_)) => assert_eq!(v, "1e400x"),
            }
        }
        let e = est(
            Api::ChatCompletions,
            r#"{"max_tokens":18446744073709551615,"n":2}"#,
        );
        assert_eq!(
            e.output_tokens, MAX_ESTIMATE_TOKENS,
            "saturates, then capped"
        );
        let e = est(Api::Responses, r#"{"max_output_tokens":5000000000}"#);
        assert_eq!(e.output_tokens, MAX_ESTIMATE_TOKENS);
        let e = est(Api::ChatCompletions, r#"{"max_tokens":10,"n":100000}"#);
        assert_eq!(e.output_tokens, 10 * MAX_CHOICES);
    }

    #[test]
    fn completions_prompt_shapes() {
        let e = est(
            Api::Completions,
            r#"{"model":"gpt-3.5-turbo-instruct","prompt":"Say this is a test","max_tokens":7,"temperature":0}"#,
        );
        assert_eq!(e.model, "gpt-3.5-turbo-instruct");
        assert_eq!(e.input_tokens, 5 + PER_REQUEST_TOKENS);
        assert_eq!(e.output_tokens, 7);
        let e = est(
            Api::Completions,
            r#"{"model":"m","prompt":["abcd","efgh"],"max_tokens":10,"n":2}"#,
        );
        assert_eq!(e.input_tokens, 2 + PER_REQUEST_TOKENS);
        assert_eq!(e.output_tokens, 40, "2 prompts x n=2 x 10");
        let e = est(
            Api::Completions,
            r#"{"model":"m","prompt":[1,2,3,4,5],"max_tokens":1,"best_of":3}"#,
        );
        assert_eq!(e.input_tokens, 5 + PER_REQUEST_TOKENS);
        assert_eq!(e.output_tokens, 3);
        let e = est(
            Api::Completions,
            r#"{"model":"m","prompt":[[1,2],[3]],"max_tokens":1}"#,
        );
        assert_eq!(e.input_tokens, 3 + PER_REQUEST_TOKENS);
        assert_eq!(e.output_tokens, 2);
    }

    #[test]
    fn embeddings_have_no_output() {
        let e = est(
            Api::Embeddings,
            r#"{"model":"text-embedding-3-small","input":"The food was delicious and the waiter...","encoding_format":"float"}"#,
        );
        assert_eq!(e.model, "text-embedding-3-small");
        assert_eq!(e.input_tokens, 10);
        assert_eq!(e.output_tokens, 0);
        let e = est(
            Api::Embeddings,
            r#"{"model":"m","input":["aaaa","bbbbbbbb"],"max_tokens":99}"#,
        );
        assert_eq!(e.input_tokens, 3);
        assert_eq!(e.output_tokens, 0);
        let e = est(Api::Embeddings, r#"{"model":"m","input":[[1,2,3],[4]]}"#);
        assert_eq!(e.input_tokens, 4);
    }

    #[test]
    fn responses_input_shapes() {
        let e = est(
            Api::Responses,
            r#"{"model":"gpt-4.1","input":"Tell me a three sentence bedtime story about a unicorn."}"#,
        );
        assert_eq!(e.model, "gpt-4.1");
        assert_eq!(e.input_tokens, 14 + PER_REQUEST_TOKENS);
        assert_eq!(e.output_tokens, 4096);
        let body = r#"{
          "model": "o4-mini",
          "instructions": "Be terse.",
          "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "what is in this image?"},
                                          {"type": "input_image", "image_url": "https://example.com/x.png"}]},
            {"type": "function_call_output", "call_id": "c1", "output": "{\"t\":21}"}
          ],
          "max_output_tokens": 500,
          "stream": true
        }"#;
        let p = prepare(Api::Responses, body.as_bytes(), &Limits::new(4096)).unwrap();
        assert_eq!(p.estimate.output_tokens, 500);
        assert!(p.estimate.stream);
        assert!(p.new_body.is_none(), "Responses streams always carry usage");
        assert!(p.estimate.input_tokens > MEDIA_PART_TOKENS + 2 * PER_MESSAGE_TOKENS);
    }

    #[test]
    fn anthropic_messages() {
        let body = r#"{
          "model": "claude-sonnet-4-20250514",
          "max_tokens": 1024,
          "system": [{"type": "text", "text": "You are a pirate.", "cache_control": {"type": "ephemeral"}}],
          "messages": [
            {"role": "user", "content": "Hello, world"},
            {"role": "assistant", "content": [{"type": "text", "text": "Ahoy"},
               {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"location": "SF"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "15 degrees"},
               {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/4AAQSkZJRgABAQ"}}]}
          ]
        }"#;
        let e = est(Api::Messages, body);
        assert_eq!(e.model, "claude-sonnet-4-20250514");
        assert_eq!(e.output_tokens, 1024);
        assert!(e.input_tokens > MEDIA_PART_TOKENS + 3 * PER_MESSAGE_TOKENS);
        let e = est(
            Api::Messages,
            r#"{"model":"claude-3-5-haiku-latest","messages":[{"role":"user","content":"Hi"}]}"#,
        );
        assert_eq!(e.output_tokens, 4096, "missing max_tokens: the default");
        assert_eq!(e.input_tokens, 1 + PER_MESSAGE_TOKENS + PER_REQUEST_TOKENS);
    }

    #[test]
    fn other_apis_estimate_nothing() {
        let e = est(Api::Other, r#"{"model":"dall-e-3","prompt":"a cat"}"#);
        assert_eq!((e.input_tokens, e.output_tokens), (0, 0));
        assert_eq!(e.model, "dall-e-3");
    }

    #[test]
    fn bad_bodies_are_bad_requests() {
        for b in [
            "",
            "{",
            "not json",
            "[1,2]",
            "\"x\"",
            "null",
            "{\"a\":1}garbage",
            "{\"a\":1e400}",
        ] {
            assert!(
                prepare(Api::ChatCompletions, b.as_bytes(), &Limits::new(1)).is_err(),
                "{b:?}"
            );
        }
        assert!(prepare(Api::ChatCompletions, &[0xff, 0xfe, b'{'], &Limits::new(1)).is_err());
    }

    #[test]
    fn streaming_chat_turns_on_include_usage_keeping_bytes() {
        let body =
            br#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
        let p = prepare(Api::ChatCompletions, body, &Limits::new(10)).unwrap();
        assert!(p.estimate.stream);
        assert_eq!(p.estimate.output_tokens, 10);
        let nb = p.new_body.unwrap();
        assert_eq!(
            std::str::from_utf8(&nb).unwrap(),
            r#"{"max_completion_tokens":10,"stream_options":{"include_usage":true},"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}"#
        );
        let v: Value = serde_json::from_slice(&nb).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], Value::Bool(true));
    }

    #[test]
    fn streaming_existing_stream_options() {
        let body = br#"{"model":"m","stream":true,"stream_options":{"include_usage":false,"x":1},"temperature":0.2}"#;
        let nb = prepare(Api::ChatCompletions, body, &Limits::new(10))
            .unwrap()
            .new_body
            .unwrap();
        let v: Value = serde_json::from_slice(&nb).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], Value::Bool(true));
        assert_eq!(v["stream_options"]["x"], 1);
        assert_eq!(v["temperature"], 0.2);
        assert_eq!(v["stream"], true);

        let body = br#"{"model":"m","stream":true,"stream_options":null}"#;
        let nb = prepare(Api::Completions, body, &Limits::new(10))
            .unwrap()
            .new_body
            .unwrap();
        let v: Value = serde_json::from_slice(&nb).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], Value::Bool(true));

        let body = br#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"max_tokens":3}"#;
        assert!(prepare(Api::ChatCompletions, body, &Limits::new(10))
            .unwrap()
            .new_body
            .is_none());
    }

    #[test]
    fn bodies_within_their_limits_are_untouched() {
        let body = br#"{"model":"m","stream":false,"messages":[],"max_completion_tokens":9}"#;
        assert!(prepare(Api::ChatCompletions, body, &Limits::new(10))
            .unwrap()
            .new_body
            .is_none());
        let body = br#"{"model":"claude","stream":true,"max_tokens":5,"messages":[]}"#;
        assert!(prepare(Api::Messages, body, &Limits::new(10))
            .unwrap()
            .new_body
            .is_none());
        let body = br#"{"model":"e","stream":true,"input":"x"}"#;
        assert!(prepare(Api::Embeddings, body, &Limits::new(10))
            .unwrap()
            .new_body
            .is_none());
    }

    fn limits(default: u64, cap: u64) -> Limits {
        Limits {
            default_max_output_tokens: default,
            max_output_tokens_cap: cap,
        }
    }

    fn rewritten(api: Api, body: &str, l: &Limits) -> (Estimate, Value) {
        let p = prepare(api, body.as_bytes(), l).unwrap();
        let v = serde_json::from_slice(&p.new_body.expect("rewritten")).unwrap();
        (p.estimate, v)
    }

    #[test]
    fn the_reserved_output_limit_is_written_into_the_body() {
        let l = limits(300, 1000);
        // No limit: the reserved default is written, in each API's own field.
        for (api, body, field) in [
            (
                Api::ChatCompletions,
                r#"{"model":"m","messages":[]}"#,
                "max_completion_tokens",
            ),
            (
                Api::Completions,
                r#"{"model":"m","prompt":"x"}"#,
                "max_tokens",
            ),
            (
                Api::Responses,
                r#"{"model":"m","input":"x"}"#,
                "max_output_tokens",
            ),
            (
                Api::Messages,
                r#"{"model":"m","messages":[]}"#,
                "max_tokens",
            ),
        ] {
            let (e, v) = rewritten(api, body, &l);
            assert_eq!(v[field], 300, "{api:?}");
            assert_eq!(e.output_tokens, 300, "{api:?}");
            assert_eq!(v["model"], "m");
        }
        // A limit above the cap is lowered to it, and the reservation follows.
        let (e, v) = rewritten(
            Api::ChatCompletions,
            r#"{"model":"m","max_tokens":50000,"n":2}"#,
            &l,
        );
        assert_eq!(
            (v["max_tokens"].clone(), e.output_tokens),
            (json!(1000), 2000)
        );
        assert!(v.get("max_completion_tokens").is_none());
        let (e, v) = rewritten(
            Api::ChatCompletions,
            r#"{"model":"m","max_completion_tokens":5000,"max_tokens":20}"#,
            &l,
        );
        assert_eq!(v["max_completion_tokens"], 1000);
        assert_eq!(v["max_tokens"], 1000);
        assert_eq!(e.output_tokens, 1000);
        let (e, v) = rewritten(Api::Messages, r#"{"model":"c","max_tokens":64000}"#, &l);
        assert_eq!(
            (v["max_tokens"].clone(), e.output_tokens),
            (json!(1000), 1000)
        );
        let (e, v) = rewritten(Api::Responses, r#"{"max_output_tokens":1001}"#, &l);
        assert_eq!(
            (v["max_output_tokens"].clone(), e.output_tokens),
            (json!(1000), 1000)
        );
        // A default above the cap is capped too.
        let (e, v) = rewritten(Api::Responses, r#"{}"#, &limits(5000, 700));
        assert_eq!(
            (v["max_output_tokens"].clone(), e.output_tokens),
            (json!(700), 700)
        );
        // Invalid limits count as absent: replaced by the default.
        let (e, v) = rewritten(Api::Completions, r#"{"max_tokens":"lots"}"#, &l);
        assert_eq!(
            (v["max_tokens"].clone(), e.output_tokens),
            (json!(300), 300)
        );
        // Within the cap: untouched; embeddings never.
        for (api, body) in [
            (Api::Responses, r#"{"max_output_tokens":1000}"#),
            (Api::Embeddings, r#"{"input":"x"}"#),
        ] {
            assert!(prepare(api, body.as_bytes(), &l)
                .unwrap()
                .new_body
                .is_none());
        }
    }

    #[test]
    fn background_responses_are_flagged() {
        let l = Limits::new(10);
        let p = prepare(Api::Responses, br#"{"input":"x","background":true}"#, &l).unwrap();
        assert!(p.background);
        for (api, body) in [
            (Api::Responses, r#"{"input":"x","background":false}"#),
            (Api::ChatCompletions, r#"{"background":true}"#),
        ] {
            assert!(!prepare(api, body.as_bytes(), &l).unwrap().background);
        }
    }

    #[test]
    fn leading_whitespace_body_rewrite() {
        let body = b" \n {\"stream\":true}";
        let nb = prepare(Api::ChatCompletions, body, &Limits::new(1))
            .unwrap()
            .new_body
            .unwrap();
        let v: Value = serde_json::from_slice(&nb).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
    }

    #[test]
    fn unicode_counts_characters_not_bytes() {
        let e = est(Api::Embeddings, r#"{"input":"日本語テキスト"}"#);
        assert_eq!(e.input_tokens, 2, "7 chars -> 2 tokens");
    }
}
