//! A deterministic stand-in for the OpenAI and Anthropic APIs, for gateway tests.
//!
//! Answers `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`,
//! `/v1/responses` (OpenAI) and `/v1/messages` (Anthropic), as JSON or as server-sent
//! events when the request says `"stream": true`, with usage blocks shaped like the
//! real APIs':
//! - prompt tokens = the number of whitespace-separated words of the prompt (system,
//!   instructions, messages, input), at least 1;
//! - completion tokens = the `x-mock-completion-tokens` request header, else
//!   [`DEFAULT_COMPLETION_TOKENS`], never above the request's `max_tokens` /
//!   `max_completion_tokens` / `max_output_tokens`;
//! - cached prompt tokens = the `x-mock-cached-tokens` header (default 0, at most the
//!   prompt tokens);
//! - OpenAI streams carry a final usage chunk only when the request set
//!   `stream_options.include_usage: true`, like the real API; Responses streams always
//!   end with `response.completed` and its usage; Anthropic streams carry usage in
//!   `message_start` (input) and `message_delta` (output).
//!
//! Header `x-mock-delay-ms: N` holds the answer (headers included) back N ms (at
//! most 60 s).
//! Header `x-mock-chunk-delay-ms: N` spaces the chunks of a stream N ms apart (default
//! 2), for slow-stream tests.
//!
//! Model `fail-500` (or header `x-mock-status: 500`, any 4xx/5xx) makes it answer that
//! status with an error body in the provider's format. Every request (method, path,
//! headers, body) is recorded, so tests can check what reached the "provider".

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use axum::{
    body::{Body, Bytes},
    http::{HeaderMap, Method, StatusCode, Uri},
    response::Response,
    Router,
};
use futures::StreamExt as _;
use serde_json::{json, Value};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

/// Completion tokens when the request does not say otherwise.
pub const DEFAULT_COMPLETION_TOKENS: u64 = 12;
/// Request header: how many completion tokens to produce.
pub const COMPLETION_TOKENS_HEADER: &str = "x-mock-completion-tokens";
/// Request header: how many of the prompt tokens were "cached".
pub const CACHED_TOKENS_HEADER: &str = "x-mock-cached-tokens";
/// Request header: answer with this error status instead.
pub const STATUS_HEADER: &str = "x-mock-status";
/// Request header: milliseconds between the chunks of a stream.
pub const CHUNK_DELAY_HEADER: &str = "x-mock-chunk-delay-ms";
/// Request header: milliseconds to wait before answering at all (a slow provider).
pub const DELAY_HEADER: &str = "x-mock-delay-ms";
/// Model name that makes the mock answer 500.
pub const FAIL_MODEL: &str = "fail-500";
/// Fixed timestamp in answers (deterministic bodies).
const CREATED: i64 = 1_700_000_000;

/// One request as the mock received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    /// Lower-case names, in arrival order (repeated headers appear repeatedly).
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl RecordedRequest {
    /// The first value of a header (name compared case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON (Null when it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

#[derive(Default)]
struct State {
    requests: Mutex<Vec<RecordedRequest>>,
    /// Requests whose headers arrived (counted before the body is read).
    started: AtomicUsize,
}

/// A running mock upstream on 127.0.0.1.
pub struct MockLlm {
    addr: SocketAddr,
    state: Arc<State>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl MockLlm {
    /// Starts on a free port of 127.0.0.1.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Starts on the given address (port 0: a free one).
    pub async fn start_on(addr: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State::default());
        let app = router(state.clone());
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        Ok(Self {
            addr,
            state,
            shutdown: Some(tx),
            task: Some(task),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state
            .requests
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }

    /// How many requests reached the mock at all, counted when their headers arrived
    /// (so also requests reset before their body was complete).
    pub fn requests_started(&self) -> usize {
        self.state.started.load(Ordering::SeqCst)
    }

    /// Forgets the recorded requests.
    pub fn clear(&self) {
        if let Ok(mut r) = self.state.requests.lock() {
            r.clear();
        }
    }

    /// Stops serving (also done on drop, without waiting).
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }
}

impl Drop for MockLlm {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The mock as an axum router (for embedding in another server or binary).
pub fn app() -> Router {
    router(Arc::new(State::default()))
}

/// Largest request body the mock reads.
const MAX_BODY: usize = 16 << 20;

fn router(state: Arc<State>) -> Router {
    Router::new().fallback(move |req: axum::extract::Request| {
        let state = state.clone();
        async move {
            state.started.fetch_add(1, Ordering::SeqCst);
            let (parts, body) = req.into_parts();
            let body = match axum::body::to_bytes(body, MAX_BODY).await {
                Ok(b) => b,
                Err(_) => return error(false, StatusCode::BAD_REQUEST, "unreadable body"),
            };
            handle(&state, parts.method, parts.uri, parts.headers, body).await
        }
    })
}

async fn handle(
    state: &State,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let recorded = RecordedRequest {
        method: method.to_string(),
        path: uri.path().to_owned(),
        headers: headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_ascii_lowercase(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: body.clone(),
    };
    if let Ok(mut r) = state.requests.lock() {
        r.push(recorded);
    }
    let path = uri.path();
    let anthropic = path == "/v1/messages";
    if method != Method::POST {
        if path == "/health" || path == "/" {
            return json_response(StatusCode::OK, json!({"status": "ok"}));
        }
        return error(anthropic, StatusCode::METHOD_NOT_ALLOWED, "POST only");
    }
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return error(anthropic, StatusCode::BAD_REQUEST, "body is not JSON");
    };
    let model = req["model"].as_str().unwrap_or("mock-model").to_owned();
    if let Some(ms) = header_u64(&headers, DELAY_HEADER) {
        tokio::time::sleep(Duration::from_millis(ms.min(60_000))).await;
    }
    let forced = header_u64(&headers, STATUS_HEADER)
        .and_then(|s| u16::try_from(s).ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .filter(|s| s.is_client_error() || s.is_server_error());
    if let Some(status) = forced {
        return error(anthropic, status, "forced error (x-mock-status)");
    }
    if model == FAIL_MODEL {
        return error(
            anthropic,
            StatusCode::INTERNAL_SERVER_ERROR,
            "The server had an error while processing your request.",
        );
    }
    let u = usage_for(path, &req, &headers);
    let stream = req["stream"].as_bool().unwrap_or(false);
    let delay = Duration::from_millis(header_u64(&headers, CHUNK_DELAY_HEADER).unwrap_or(2));
    let sse = |events: Vec<String>| sse(events, delay);
    match path {
        "/v1/chat/completions" if stream => sse(openai_chat_stream(&req, &model, &u)),
        "/v1/chat/completions" => json_response(StatusCode::OK, openai_chat(&model, &u)),
        "/v1/completions" if stream => sse(openai_completion_stream(&req, &model, &u)),
        "/v1/completions" => json_response(StatusCode::OK, openai_completion(&model, &u)),
        "/v1/embeddings" => json_response(StatusCode::OK, openai_embeddings(&req, &model, &u)),
        "/v1/responses" if stream => sse(responses_stream(&model, &u)),
        "/v1/responses" => json_response(StatusCode::OK, responses(&model, &u)),
        "/v1/messages" if stream => sse(anthropic_stream(&model, &u)),
        "/v1/messages" => json_response(StatusCode::OK, anthropic_message(&model, &u)),
        _ => error(anthropic, StatusCode::NOT_FOUND, "unknown endpoint"),
    }
}

/// Token counts of one answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MockUsage {
    pub prompt: u64,
    pub completion: u64,
    pub cached: u64,
    /// The answer stopped at the request's output-token limit.
    pub truncated: bool,
}

/// Number of whitespace-separated words.
pub fn words(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

/// Words of a content value: a string, or an array of parts with `text` (or strings).
fn content_words(v: &Value) -> u64 {
    match v {
        Value::String(s) => words(s),
        Value::Array(parts) => parts
            .iter()
            .map(|p| match p {
                Value::String(s) => words(s),
                Value::Object(_) => {
                    p.get("text")
                        .and_then(Value::as_str)
                        .map(words)
                        .unwrap_or(0)
                        + p.get("content").map(content_words).unwrap_or(0)
                }
                // Token-id arrays (embeddings / completions): one token per id.
                Value::Number(_) => 1,
                Value::Array(_) => content_words(p),
                _ => 0,
            })
            .sum(),
        _ => 0,
    }
}

/// Prompt words of a request body, as the mock counts them.
pub fn prompt_words(path: &str, req: &Value) -> u64 {
    let mut n = 0;
    match path {
        "/v1/chat/completions" | "/v1/messages" => {
            n += content_words(&req["system"]);
            if let Some(msgs) = req["messages"].as_array() {
                n += msgs
                    .iter()
                    .map(|m| content_words(&m["content"]))
                    .sum::<u64>();
            }
        }
        "/v1/completions" => n += content_words(&req["prompt"]),
        "/v1/embeddings" => n += content_words(&req["input"]),
        "/v1/responses" => {
            n += content_words(&req["instructions"]);
            n += content_words(&req["input"]);
        }
        _ => {}
    }
    n.max(1)
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

fn usage_for(path: &str, req: &Value, headers: &HeaderMap) -> MockUsage {
    let prompt = prompt_words(path, req);
    let max = ["max_tokens", "max_completion_tokens", "max_output_tokens"]
        .iter()
        .filter_map(|k| req[*k].as_u64())
        .min();
    let mut completion =
        header_u64(headers, COMPLETION_TOKENS_HEADER).unwrap_or(DEFAULT_COMPLETION_TOKENS);
    let truncated = max.is_some_and(|m| completion >= m);
    if let Some(max) = max {
        completion = completion.min(max);
    }
    if path == "/v1/embeddings" {
        completion = 0;
    }
    let cached = header_u64(headers, CACHED_TOKENS_HEADER)
        .unwrap_or(0)
        .min(prompt);
    MockUsage {
        prompt,
        completion,
        cached,
        truncated: truncated && path != "/v1/embeddings",
    }
}

const VOCABULARY: [&str; 8] = [
    "Budgets", "keep", "agents", "honest", "and", "spending", "stays", "bounded",
];

/// The answer's words, one per completion token.
fn output_words(n: u64) -> Vec<String> {
    (0..n)
        .map(|i| {
            let w = VOCABULARY[(i as usize) % VOCABULARY.len()];
            if i == 0 {
                w.to_owned()
            } else {
                format!(" {w}")
            }
        })
        .collect()
}

fn output_text(n: u64) -> String {
    output_words(n).concat()
}

fn openai_usage(u: &MockUsage) -> Value {
    json!({
        "prompt_tokens": u.prompt,
        "completion_tokens": u.completion,
        "total_tokens": u.prompt + u.completion,
        "prompt_tokens_details": {"cached_tokens": u.cached, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0, "audio_tokens": 0,
            "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0
        }
    })
}

/// OpenAI's finish_reason.
fn finish_reason(u: &MockUsage) -> &'static str {
    if u.truncated {
        "length"
    } else {
        "stop"
    }
}

/// Anthropic's stop_reason.
fn stop_reason(u: &MockUsage) -> &'static str {
    if u.truncated {
        "max_tokens"
    } else {
        "end_turn"
    }
}

fn openai_chat(model: &str, u: &MockUsage) -> Value {
    json!({
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "created": CREATED,
        "model": model,
        "system_fingerprint": "fp_mock",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": output_text(u.completion), "refusal": null, "annotations": []},
            "logprobs": null,
            "finish_reason": finish_reason(u)
        }],
        "usage": openai_usage(u),
        "service_tier": "default"
    })
}

fn include_usage(req: &Value) -> bool {
    req["stream_options"]["include_usage"]
        .as_bool()
        .unwrap_or(false)
}

fn openai_chat_stream(req: &Value, model: &str, u: &MockUsage) -> Vec<String> {
    let with_usage = include_usage(req);
    let chunk = |choices: Value| {
        let mut c = json!({
            "id": "chatcmpl-mock",
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": model,
            "system_fingerprint": "fp_mock",
            "choices": choices,
        });
        if with_usage {
            c["usage"] = Value::Null;
        }
        format!("data: {c}\n\n")
    };
    let mut out = vec![chunk(json!([{
        "index": 0, "delta": {"role": "assistant", "content": "", "refusal": null},
        "logprobs": null, "finish_reason": null
    }]))];
    for w in output_words(u.completion) {
        out.push(chunk(json!([{
            "index": 0, "delta": {"content": w}, "logprobs": null, "finish_reason": null
        }])));
    }
    out.push(chunk(json!([{
        "index": 0, "delta": {}, "logprobs": null, "finish_reason": finish_reason(u)
    }])));
    if with_usage {
        let last = json!({
            "id": "chatcmpl-mock",
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": model,
            "system_fingerprint": "fp_mock",
            "choices": [],
            "usage": openai_usage(u),
        });
        out.push(format!("data: {last}\n\n"));
    }
    out.push("data: [DONE]\n\n".to_owned());
    out
}

fn openai_completion(model: &str, u: &MockUsage) -> Value {
    json!({
        "id": "cmpl-mock",
        "object": "text_completion",
        "created": CREATED,
        "model": model,
        "choices": [{"text": output_text(u.completion), "index": 0, "logprobs": null, "finish_reason": finish_reason(u)}],
        "usage": openai_usage(u),
    })
}

fn openai_completion_stream(req: &Value, model: &str, u: &MockUsage) -> Vec<String> {
    let with_usage = include_usage(req);
    let mut out = Vec::new();
    let words = output_words(u.completion);
    let n = words.len();
    for (i, w) in words.into_iter().enumerate() {
        let mut c = json!({
            "id": "cmpl-mock", "object": "text_completion", "created": CREATED, "model": model,
            "choices": [{"text": w, "index": 0, "logprobs": null,
                         "finish_reason": if i + 1 == n { json!(finish_reason(u)) } else { Value::Null }}],
        });
        if with_usage {
            c["usage"] = Value::Null;
        }
        out.push(format!("data: {c}\n\n"));
    }
    if with_usage {
        let last = json!({
            "id": "cmpl-mock", "object": "text_completion", "created": CREATED, "model": model,
            "choices": [], "usage": openai_usage(u),
        });
        out.push(format!("data: {last}\n\n"));
    }
    out.push("data: [DONE]\n\n".to_owned());
    out
}

fn openai_embeddings(req: &Value, model: &str, u: &MockUsage) -> Value {
    let inputs = match &req["input"] {
        Value::Array(a) if a.iter().all(|v| v.is_string() || v.is_array()) => a.len(),
        _ => 1,
    };
    let data: Vec<Value> = (0..inputs)
        .map(|i| json!({"object": "embedding", "index": i, "embedding": [0.0125, -0.25, 0.5, 0.0625]}))
        .collect();
    json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": u.prompt, "total_tokens": u.prompt},
    })
}

fn responses_usage(u: &MockUsage) -> Value {
    json!({
        "input_tokens": u.prompt,
        "input_tokens_details": {"cached_tokens": u.cached},
        "output_tokens": u.completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": u.prompt + u.completion,
    })
}

fn responses_object(model: &str, u: &MockUsage, status: &str, done: bool) -> Value {
    let output = if done {
        json!([{
            "type": "message", "id": "msg_mock", "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": output_text(u.completion), "annotations": []}]
        }])
    } else {
        json!([])
    };
    json!({
        "id": "resp_mock",
        "object": "response",
        "created_at": CREATED,
        "status": status,
        "model": model,
        "output": output,
        "usage": if done { responses_usage(u) } else { Value::Null },
    })
}

fn responses(model: &str, u: &MockUsage) -> Value {
    responses_object(model, u, "completed", true)
}

fn event(name: &str, data: &Value) -> String {
    format!("event: {name}\ndata: {data}\n\n")
}

fn responses_stream(model: &str, u: &MockUsage) -> Vec<String> {
    let mut seq = 0u64;
    let mut next = || {
        seq += 1;
        seq - 1
    };
    let mut out = vec![event(
        "response.created",
        &json!({"type": "response.created", "sequence_number": next(),
                "response": responses_object(model, u, "in_progress", false)}),
    )];
    for w in output_words(u.completion) {
        out.push(event(
            "response.output_text.delta",
            &json!({"type": "response.output_text.delta", "sequence_number": next(),
                    "item_id": "msg_mock", "output_index": 0, "content_index": 0, "delta": w}),
        ));
    }
    out.push(event(
        "response.completed",
        &json!({"type": "response.completed", "sequence_number": next(),
                "response": responses_object(model, u, "completed", true)}),
    ));
    out
}

/// Anthropic reports input tokens WITHOUT the cache reads.
fn anthropic_usage(u: &MockUsage, output: u64) -> Value {
    json!({
        "input_tokens": u.prompt - u.cached,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": u.cached,
        "output_tokens": output,
        "service_tier": "standard",
    })
}

fn anthropic_message(model: &str, u: &MockUsage) -> Value {
    json!({
        "id": "msg_mock",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": output_text(u.completion)}],
        "stop_reason": stop_reason(u),
        "stop_sequence": null,
        "usage": anthropic_usage(u, u.completion),
    })
}

fn anthropic_stream(model: &str, u: &MockUsage) -> Vec<String> {
    let mut start = anthropic_message(model, u);
    start["content"] = json!([]);
    start["stop_reason"] = Value::Null;
    start["usage"] = anthropic_usage(u, 1);
    let mut out = vec![
        event(
            "message_start",
            &json!({"type": "message_start", "message": start}),
        ),
        event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        event("ping", &json!({"type": "ping"})),
    ];
    for w in output_words(u.completion) {
        out.push(event(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}}),
        ));
    }
    out.push(event(
        "content_block_stop",
        &json!({"type": "content_block_stop", "index": 0}),
    ));
    out.push(event(
        "message_delta",
        &json!({"type": "message_delta",
                "delta": {"stop_reason": stop_reason(u), "stop_sequence": null},
                "usage": {"output_tokens": u.completion}}),
    ));
    out.push(event("message_stop", &json!({"type": "message_stop"})));
    out
}

fn json_response(status: StatusCode, body: Value) -> Response {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("x-request-id", "req_mock")
        .body(Body::from(body.to_string()))
        .unwrap_or_default()
}

/// A stream delivered as separate chunks `delay` apart (a few milliseconds by
/// default), so the gateway sees events split across body callbacks like with a real
/// provider.
fn sse(events: Vec<String>, delay: Duration) -> Response {
    let stream = futures::stream::iter(events).then(move |e| async move {
        tokio::time::sleep(delay).await;
        Ok::<_, Infallible>(e)
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/event-stream; charset=utf-8")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_default()
}

fn error(anthropic: bool, status: StatusCode, message: &str) -> Response {
    let body = if anthropic {
        let kind = match status.as_u16() {
            400 => "invalid_request_error",
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            529 => "overloaded_error",
            _ => "api_error",
        };
        json!({"type": "error", "error": {"type": kind, "message": message}})
    } else {
        let kind = if status.is_server_error() {
            "server_error"
        } else {
            "invalid_request_error"
        };
        json!({"error": {"message": message, "type": kind, "param": null, "code": null}})
    };
    json_response(status, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_words_of_each_api() {
        let chat = json!({"messages": [{"role": "system", "content": "be brief"},
                                       {"role": "user", "content": [{"type": "text", "text": "hello there world"}]}]});
        assert_eq!(prompt_words("/v1/chat/completions", &chat), 5);
        let anth =
            json!({"system": "be brief", "messages": [{"role": "user", "content": "one two"}]});
        assert_eq!(prompt_words("/v1/messages", &anth), 4);
        assert_eq!(
            prompt_words("/v1/embeddings", &json!({"input": ["a b", "c"]})),
            3
        );
        assert_eq!(
            prompt_words(
                "/v1/responses",
                &json!({"input": "x y z", "instructions": "w"})
            ),
            4
        );
        assert_eq!(prompt_words("/v1/completions", &json!({"prompt": ""})), 1);
    }

    #[test]
    fn openai_stream_has_usage_only_when_asked() {
        let u = MockUsage {
            prompt: 3,
            completion: 4,
            cached: 0,
            truncated: false,
        };
        let without = openai_chat_stream(&json!({"stream": true}), "m", &u);
        assert!(!without.concat().contains("\"prompt_tokens\""));
        let with = openai_chat_stream(
            &json!({"stream": true, "stream_options": {"include_usage": true}}),
            "m",
            &u,
        );
        assert!(with.concat().contains("\"completion_tokens\":4"));
        assert_eq!(with.last().map(String::as_str), Some("data: [DONE]\n\n"));
        assert_eq!(output_text(4), "Budgets keep agents honest");
    }
}
