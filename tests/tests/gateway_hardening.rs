//! Issue 11 through the real Envoy and the built filter: the money leaks of the
//! gateway side are closed.
//!
//! - a client that resets after the provider answered 2xx is charged (item 1);
//! - the output limit reserved is the one forwarded (item 2);
//! - failed Settles are retried until the charge lands, and counted (item 4);
//! - an Authorize that timed out is released by request id (item 5);
//! - unparsable and unmatched paths are refused, dot segments and double slashes are
//!   normalised before metering (item 8);
//! - a multi-MiB image request is accepted and charged (item 12);
//! - issue 9's transports: Settles in FinishBatch and Authorize on the worker's
//!   CallStream (exact charges, a broken or silent stream fails closed and releases,
//!   a service without either gets unary calls). `Gw::start` opens the stream, so
//!   the item tests above run their Authorize over it.
//!
//!   cargo test -p caracal-tests --test gateway_hardening
//!
//! Needs Envoy (`.venv`, see tests/src/envoy.rs); builds the filter unless
//! `CARACAL_FILTER_WASM` names a built `.wasm`.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use caracal_proto::v1 as pb;
use caracal_tests::{
    envoy::{http_request, Envoy, EnvoyOptions, Gateway, OPENAI_PROVIDER_KEY},
    mock_llm::{MockLlm, CHUNK_DELAY_HEADER, COMPLETION_TOKENS_HEADER},
    TestStack,
};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
    task::JoinHandle,
    time::Instant,
};

const USD: &str = "USD";
const CHAT: &str = "/v1/chat/completions";
const LIMIT: i64 = 10_000_000;

/// gpt-4o in micro-USD per million tokens (input, output); as set by [`set_prices`].
const GPT4O_IN: u128 = 2_500_000;
const GPT4O_OUT: u128 = 10_000_000;

/// ceil(input x price + output x price) / 1e6, computed independently of the service.
fn cost(input: u64, output: u64) -> i64 {
    let total = u128::from(input) * GPT4O_IN + u128::from(output) * GPT4O_OUT;
    i64::try_from(total.div_ceil(1_000_000)).unwrap()
}

fn words(s: &str) -> u64 {
    s.split_whitespace().count() as u64
}

/// The filter's input estimate of a one-message chat with a text prompt:
/// ceil(chars / 4) + 4 per message + 3 per request.
fn chat_input_estimate(prompt: &str) -> u64 {
    (prompt.chars().count() as u64).div_ceil(4) + 4 + 3
}

async fn set_prices(stack: &TestStack) {
    stack
        .set_token_price("openai", "gpt-4o", USD, ["2.50", "10.00", "1.25"])
        .await
        .unwrap();
}

/// An agent with a $10 daily policy (charged on expiry); returns its key.
async fn agent(stack: &TestStack, name: &str) -> String {
    let (id, key) = stack.agent_with_key(name, None).await.unwrap();
    stack
        .usd_policy(&id, "10", "daily", "calendar", "charge")
        .await
        .unwrap();
    key
}

/// The agent's remaining budget: a zero-estimate Authorize, released.
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
    assert_eq!(r.decision, pb::Decision::Allow as i32, "probe: {r:?}");
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
/// value seen.
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

/// The remaining budget, after the gateway had `settle` time to end the call, and
/// again a while later (nothing more changes).
async fn settled_remaining(stack: &TestStack, key: &str, settle: Duration) -> i64 {
    tokio::time::sleep(settle).await;
    let first = remaining(stack, key).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let second = remaining(stack, key).await;
    assert_eq!(first, second, "the budget still moved");
    second
}

fn amount_micros(text: &str) -> i64 {
    caracal_domain::money::parse_amount(text.trim())
        .unwrap_or_else(|e| panic!("{text:?} is not a decimal amount: {e}"))
}

/// Envoy's counter `name` (admin /stats), 0 when absent.
async fn envoy_counter(envoy: &Envoy, name: &str) -> u64 {
    envoy
        .stats()
        .await
        .unwrap()
        .into_iter()
        .find(|(k, _)| k.ends_with(name))
        .map_or(0, |(_, v)| v)
}

// ------------------------------------------------------------ a controllable proxy

/// A TCP proxy in front of the authz-service that a test can take down (existing
/// connections cut, new ones closed at once) or slow down (bytes from the service held
/// back `delay_ms`).
struct FlakyProxy {
    port: u16,
    down: Arc<AtomicBool>,
    delay_ms: Arc<AtomicU64>,
    kill: Arc<watch::Sender<u64>>,
    task: JoinHandle<()>,
}

impl FlakyProxy {
    async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let down = Arc::new(AtomicBool::new(false));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let kill = Arc::new(watch::channel(0u64).0);
        let (d, dl, k) = (down.clone(), delay_ms.clone(), kill.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    break;
                };
                if d.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let (dl, mut killed) = (dl.clone(), k.subscribe());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = async move {
                        let _ = tokio::io::copy(&mut cr, &mut sw).await;
                    };
                    let back = async move {
                        // Chunks keep their order; each leaves `delay` after it came.
                        let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
                        let read = async move {
                            let mut buf = vec![0u8; 16 * 1024];
                            loop {
                                match sr.read(&mut buf).await {
                                    Ok(0) | Err(_) => break,
                                    Ok(n) => {
                                        let at = Instant::now()
                                            + Duration::from_millis(dl.load(Ordering::SeqCst));
                                        if tx.send((at, buf[..n].to_vec())).is_err() {
                                            break;
                                        }
                                    }
                                }
                            }
                        };
                        let write = async move {
                            while let Some((at, data)) = rx.recv().await {
                                tokio::time::sleep_until(at).await;
                                if cw.write_all(&data).await.is_err() {
                                    break;
                                }
                            }
                        };
                        tokio::join!(read, write);
                    };
                    tokio::select! {
                        _ = async { tokio::join!(up, back) } => {}
                        _ = killed.changed() => {}
                    }
                });
            }
        });
        Self {
            port,
            down,
            delay_ms,
            kill,
            task,
        }
    }

    /// Cuts every connection and refuses new ones (or serves again).
    fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
        if down {
            self.kill.send_modify(|g| *g += 1);
        }
    }

    fn set_delay(&self, ms: u64) {
        self.delay_ms.store(ms, Ordering::SeqCst);
    }
}

impl Drop for FlakyProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.kill.send_modify(|g| *g += 1);
    }
}

/// The service, the mock provider, and Envoy (optionally behind a [`FlakyProxy`]).
struct Gw {
    stack: TestStack,
    mock: MockLlm,
    envoy: Envoy,
    proxy: Option<FlakyProxy>,
}

impl Gw {
    async fn start(with_proxy: bool, tune: impl FnOnce(&mut EnvoyOptions)) -> Self {
        let stack = TestStack::start().await.unwrap();
        set_prices(&stack).await;
        let mock = MockLlm::start().await.unwrap();
        let authz = stack.server.as_ref().unwrap().grpc_addr;
        let proxy = if with_proxy {
            Some(FlakyProxy::start(authz).await)
        } else {
            None
        };
        let port = proxy.as_ref().map_or(authz.port(), |p| p.port);
        let mut opts = EnvoyOptions::new(Gateway::Wasm, port, mock.port());
        tune(&mut opts);
        let envoy = Envoy::start(opts).await.unwrap();
        // Authorize goes over the worker's CallStream from here on.
        wait_stream_opens(&envoy, 1).await;
        Self {
            stack,
            mock,
            envoy,
            proxy,
        }
    }

    async fn stop(self) {
        drop(self.proxy);
        drop(self.envoy);
        self.mock.stop().await;
        self.stack.stop().await.unwrap();
    }
}

/// Sends a request, reads the response headers and the first body chunk, then drops
/// the connection (a client reset mid-stream). Returns the status and headers.
async fn first_chunk_then_reset(
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
    body: &Value,
) -> (u16, Vec<(String, String)>, Bytes) {
    let stream = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let conn_task = tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method("POST")
        .uri(path)
        .header("host", format!("127.0.0.1:{port}"))
        .header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::from(body.to_string()))).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(20), sender.send_request(req))
        .await
        .unwrap()
        .unwrap();
    let status = resp.status().as_u16();
    let hs = resp
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let mut body = resp.into_body();
    let mut first = Bytes::new();
    for _ in 0..50 {
        match tokio::time::timeout(Duration::from_secs(10), body.frame()).await {
            Ok(Some(Ok(f))) => {
                if let Ok(data) = f.into_data() {
                    if !data.is_empty() {
                        first = data;
                        break;
                    }
                }
            }
            _ => break,
        }
    }
    // Reset: the connection goes away mid-stream.
    drop(body);
    drop(sender);
    conn_task.abort();
    (status, hs, first)
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

// ------------------------------------------------------------------------ item 1

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reset_after_the_provider_answered_is_charged_the_estimate() {
    let gw = Gw::start(false, |_| {}).await;
    let key = agent(&gw.stack, "resetter").await;
    let prompt = "Stream a long answer slowly";
    let body = json!({
        "model": "gpt-4o", "stream": true, "max_tokens": 200,
        "messages": [{"role": "user", "content": prompt}],
    });
    let auth = format!("Bearer {key}");
    let (status, headers, first) = first_chunk_then_reset(
        gw.envoy.port,
        CHAT,
        &[
            ("authorization", &auth),
            (COMPLETION_TOKENS_HEADER, "40"),
            (CHUNK_DELAY_HEADER, "250"),
        ],
        &body,
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        String::from_utf8_lossy(&first).contains("data:"),
        "{first:?}"
    );
    let announced = amount_micros(header(&headers, "x-caracal-remaining-budget").unwrap());
    let estimate = cost(chat_input_estimate(prompt), 200);
    assert_eq!(
        announced,
        LIMIT - estimate,
        "the reservation is the estimate"
    );
    // The reset call is settled at the estimate (old code: released, budget back to
    // the limit); the stream was cut long before its end (40 chunks x 250 ms).
    assert_eq!(
        settled_remaining(&gw.stack, &key, Duration::from_millis(1500)).await,
        LIMIT - estimate
    );
    assert_eq!(gw.mock.requests().len(), 1);

    // No 2xx before the reset (upstream error): released, nothing charged.
    let key2 = agent(&gw.stack, "resetter-2").await;
    let auth2 = format!("Bearer {key2}");
    let (status, _, _) = first_chunk_then_reset(
        gw.envoy.port,
        CHAT,
        &[("authorization", &auth2), ("x-mock-status", "500")],
        &body,
    )
    .await;
    assert_eq!(status, 500);
    assert_eq!(wait_remaining(&gw.stack, &key2, LIMIT).await, LIMIT);
    gw.stop().await;
}

// ------------------------------------------------------------------------ item 2

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reserved_output_limit_is_the_forwarded_one() {
    let gw = Gw::start(false, |_| {}).await;
    let key = agent(&gw.stack, "uncapped").await;
    let auth = format!("Bearer {key}");
    let prompt = "Think as long as you like";
    // No limit in the request: the reserved default (4096) is written into the body.
    let r = gw
        .envoy
        .post_json(
            CHAT,
            &[("authorization", &auth), (COMPLETION_TOKENS_HEADER, "30")],
            &json!({"model": "gpt-4o", "messages": [{"role": "user", "content": prompt}]}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let announced = amount_micros(r.header("x-caracal-remaining-budget").unwrap());
    assert_eq!(announced, LIMIT - cost(chat_input_estimate(prompt), 4096));
    let seen = gw.mock.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].json()["max_completion_tokens"],
        4096,
        "the reserved output limit was not forwarded: {}",
        seen[0].json()
    );
    let mut expected = LIMIT - cost(words(prompt), 30);
    assert_eq!(wait_remaining(&gw.stack, &key, expected).await, expected);

    // A limit above the configured maximum (65536) is lowered to it, reserved so.
    let r = gw
        .envoy
        .post_json(
            CHAT,
            &[("authorization", &auth), (COMPLETION_TOKENS_HEADER, "5")],
            &json!({"model": "gpt-4o", "max_tokens": 1_000_000,
                    "messages": [{"role": "user", "content": prompt}]}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        amount_micros(r.header("x-caracal-remaining-budget").unwrap()),
        expected - cost(chat_input_estimate(prompt), 65_536)
    );
    let seen = gw.mock.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].json()["max_tokens"], 65_536, "{}", seen[1].json());
    expected -= cost(words(prompt), 5);
    assert_eq!(wait_remaining(&gw.stack, &key, expected).await, expected);

    // Responses in the background never report usage through the gateway: 400.
    let r = gw
        .envoy
        .post_json(
            "/v1/responses",
            &[("authorization", &auth)],
            &json!({"model": "gpt-4o", "input": "later", "background": true}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    assert!(r.text().contains("background"), "{}", r.text());
    assert_eq!(gw.mock.requests_started(), 2, "refused before the provider");
    assert_eq!(remaining(&gw.stack, &key).await, expected);
    gw.stop().await;
}

// ------------------------------------------------------------------------ item 4

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_settle_is_retried_until_the_charge_lands_and_is_counted() {
    let gw = Gw::start(true, |_| {}).await;
    let key = agent(&gw.stack, "unlucky-settle").await;
    let auth = format!("Bearer {key}");
    let prompt = "Answer while the service blinks";
    let body = json!({
        "model": "gpt-4o", "stream": true, "max_tokens": 300,
        "messages": [{"role": "user", "content": prompt}],
    });
    let port = gw.envoy.port;
    let call = tokio::spawn(async move {
        http_request(
            port,
            "POST",
            CHAT,
            &[
                ("content-type", "application/json"),
                ("authorization", &auth),
                (COMPLETION_TOKENS_HEADER, "8"),
                (CHUNK_DELAY_HEADER, "100"),
            ],
            Some(body.to_string().as_bytes()),
        )
        .await
    });
    // Authorized and streaming; then the authz-service becomes unreachable.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let proxy = gw.proxy.as_ref().unwrap();
    proxy.set_down(true);
    let r = call.await.unwrap().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("[DONE]"));
    // The first Settle (at the end of the stream) and the retry 200 ms later fail;
    // the service is back before the one 600 ms after the end.
    tokio::time::sleep(Duration::from_millis(400)).await;
    proxy.set_down(false);
    let expected = LIMIT - cost(words(prompt), 8);
    // Old code: the one Settle was lost, the estimate stayed reserved.
    assert_eq!(wait_remaining(&gw.stack, &key, expected).await, expected);
    let failures = envoy_counter(&gw.envoy, "caracal_filter_settle_failures_total").await;
    let recovered = envoy_counter(&gw.envoy, "caracal_filter_settle_recovered_total").await;
    let dropped = envoy_counter(&gw.envoy, "caracal_filter_settle_dropped_total").await;
    assert!(failures >= 1, "failures not counted: {failures}");
    assert_eq!(recovered, 1, "one Settle recovered");
    assert_eq!(dropped, 0);
    gw.stop().await;
}

// ------------------------------------------------------------------------ item 5

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authorize_that_timed_out_is_released_by_request_id() {
    let gw = Gw::start(true, |o| o.authz_timeout_ms = 400).await;
    let key = agent(&gw.stack, "timed-out").await;
    // The service reserves at once, but its answers reach Envoy 1.2 s late.
    gw.proxy.as_ref().unwrap().set_delay(1200);
    let r = gw
        .envoy
        .post_json(
            CHAT,
            &[("authorization", &format!("Bearer {key}"))],
            &json!({"model": "gpt-4o", "max_tokens": 100,
                    "messages": [{"role": "user", "content": "too slow"}]}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(gw.mock.requests_started(), 0);
    // Old code: the reservation stayed until expiry (then charged: on_expiry charge).
    assert_eq!(wait_remaining(&gw.stack, &key, LIMIT).await, LIMIT);
    gw.proxy.as_ref().unwrap().set_delay(0);
    assert_eq!(
        settled_remaining(&gw.stack, &key, Duration::from_millis(500)).await,
        LIMIT
    );
    // The stream that answered nothing within the deadline was given up; calls are
    // answered again (on a new stream, or unary while it opens) and charged.
    let prompt = "in time again";
    let r = gw
        .envoy
        .post_json(
            CHAT,
            &[
                ("authorization", &format!("Bearer {key}")),
                (COMPLETION_TOKENS_HEADER, "6"),
            ],
            &json!({"model": "gpt-4o", "max_tokens": 100,
                    "messages": [{"role": "user", "content": prompt}]}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let expected = LIMIT - cost(words(prompt), 6);
    assert_eq!(wait_remaining(&gw.stack, &key, expected).await, expected);
    // The stuck stream was replaced.
    wait_stream_opens(&gw.envoy, 2).await;
    gw.stop().await;
}

// ------------------------------------------------------------------------ item 8

/// One raw HTTP/1.1 request (bytes as given, so the path may be anything); returns
/// the status code (0 when the connection closed without one).
async fn raw_status(port: u16, request: &[u8]) -> u16 {
    let mut s = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .unwrap();
    s.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        let mut chunk = [0u8; 4096];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&buf);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_paths_are_refused_or_normalised_and_never_reach_the_provider_unmetered() {
    // The filter meters chat and messages only; the Envoy routes send all of /v1/ to
    // the provider.
    let gw = Gw::start(false, |o| {
        o.edits.push((
            r#"{"path_prefix": "/v1/", "provider": "openai", "upstream_host": "api.openai.com"}"#
                .to_owned(),
            r#"{"path_prefix": "/v1/chat/", "provider": "openai", "upstream_host": "api.openai.com"}"#
                .to_owned(),
        ))
    })
    .await;
    let key = agent(&gw.stack, "path-tricks").await;
    let auth = format!("Bearer {key}");
    let body = json!({"model": "gpt-4o", "max_tokens": 10,
                      "messages": [{"role": "user", "content": "hi"}]})
    .to_string();

    // A path matching no filter route, on a provider route: refused (old: forwarded
    // with the provider key and never charged).
    let r = gw
        .envoy
        .post_json(
            "/v1/embeddings",
            &[("authorization", &auth)],
            &json!({"model": "text-embedding-3-small", "input": "free?"}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "unknown_route", "{}", r.text());

    // Raw bytes in the path: refused by Envoy or the filter, never forwarded.
    for path in [&b"/v1/chat/completions\xff"[..], b"/v1/embeddings/\xc3\x28"] {
        let mut req = b"POST ".to_vec();
        req.extend_from_slice(path);
        req.extend_from_slice(
            format!(
                " HTTP/1.1\r\nhost: x\r\nauthorization: {auth}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
        let status = raw_status(gw.envoy.port, &req).await;
        assert!(
            (400..500).contains(&status),
            "{:?}: {status}",
            String::from_utf8_lossy(path)
        );
    }
    assert_eq!(gw.mock.requests_started(), 0, "{:?}", gw.mock.requests());

    // Dot segments and double slashes: normalised, then metered like the plain path
    // (old: "//v1/..." matched no route, "/v1/../" reached the provider verbatim).
    let mut expected = LIMIT;
    for path in [
        "//v1/chat/completions",
        "/v1/../v1/chat/completions",
        "/v1/chat//completions",
    ] {
        let r = gw
            .envoy
            .request(
                "POST",
                path,
                &[
                    ("content-type", "application/json"),
                    ("authorization", &auth),
                    (COMPLETION_TOKENS_HEADER, "3"),
                ],
                Some(body.as_bytes()),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert!(r.header("x-caracal-reservation-id").is_some(), "{path}");
        expected -= cost(1, 3);
        assert_eq!(
            wait_remaining(&gw.stack, &key, expected).await,
            expected,
            "{path}"
        );
    }
    let seen = gw.mock.requests();
    assert_eq!(seen.len(), 3);
    for s in &seen {
        assert_eq!(s.path, CHAT);
        assert_eq!(
            s.header("authorization"),
            Some(format!("Bearer {OPENAI_PROVIDER_KEY}").as_str())
        );
    }
    gw.stop().await;
}

// ------------------------------------------------------------------------ item 12

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_mib_image_request_is_accepted_and_charged() {
    let gw = Gw::start(false, |_| {}).await;
    let key = agent(&gw.stack, "screenshots").await;
    // A 6 MiB "screenshot" as a base64 data URL, as computer-use agents send.
    let image = "iVBORw0KGgo".repeat(6 * 1024 * 1024 / 11);
    let prompt = "What is on this screen";
    let body = json!({
        "model": "gpt-4o", "max_tokens": 50,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": prompt},
            {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{image}")}}
        ]}],
    });
    assert!(body.to_string().len() > 6_000_000);
    let r = gw
        .envoy
        .post_json(
            CHAT,
            &[
                ("authorization", &format!("Bearer {key}")),
                (COMPLETION_TOKENS_HEADER, "7"),
            ],
            &body,
        )
        .await
        .unwrap();
    // Old default (1 MiB): 413.
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = gw.mock.requests();
    assert_eq!(seen.len(), 1);
    assert!(seen[0].body.len() > 6_000_000);
    let expected = LIMIT - cost(words(prompt), 7);
    assert_eq!(wait_remaining(&gw.stack, &key, expected).await, expected);
    gw.stop().await;
}

// ------------------------------------------------------------------ gateway token

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_token_is_sent_and_a_wrong_one_is_a_503_never_a_free_pass() {
    // The configured token: the call is authorized (the service requires it).
    let gw = Gw::start(false, |_| {}).await;
    let key = agent(&gw.stack, "tokened").await;
    let auth = format!("Bearer {key}");
    let body = json!({"model": "gpt-4o", "max_tokens": 10,
                      "messages": [{"role": "user", "content": "hi"}]});
    let r = gw
        .envoy
        .post_json(CHAT, &[("authorization", &auth)], &body)
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let authz = gw.stack.server.as_ref().unwrap().grpc_addr.port();
    let mock_port = gw.mock.port();

    // A wrong token, even on a fail-open route: 503, nothing reaches the provider
    // (old filter: no token at all, and a gateway refusal read as the agent's 401).
    for mode in ["deny", "allow"] {
        let mut opts = EnvoyOptions::new(Gateway::Wasm, authz, mock_port);
        opts.gateway_token = "not-the-gateway-token".into();
        opts.failure_mode = mode;
        let envoy = Envoy::start(opts).await.unwrap();
        let r = envoy
            .post_json(CHAT, &[("authorization", &auth)], &body)
            .await
            .unwrap();
        assert_eq!(r.status, 503, "{mode}: {}", r.text());
        assert_eq!(r.json()["error"]["code"], "authorization_unavailable");
        drop(envoy);
    }
    assert_eq!(gw.mock.requests_started(), 1);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_while_authorize_is_in_flight_is_released() {
    let gw = Gw::start(true, |o| o.authz_timeout_ms = 5000).await;
    let key = agent(&gw.stack, "impatient").await;
    // The service reserves at once; its answer reaches Envoy 1.5 s late, and the
    // client gives up after 300 ms.
    gw.proxy.as_ref().unwrap().set_delay(1500);
    let body = json!({"model": "gpt-4o", "max_tokens": 100,
                      "messages": [{"role": "user", "content": "never mind"}]})
    .to_string();
    let mut s = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], gw.envoy.port)))
        .await
        .unwrap();
    s.write_all(
        format!(
            "POST {CHAT} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Reserved by now (the request reached the service at once).
    assert!(remaining(&gw.stack, &key).await < LIMIT);
    drop(s);
    // Old code: held until expiry, then charged (on_expiry charge).
    assert_eq!(wait_remaining(&gw.stack, &key, LIMIT).await, LIMIT);
    gw.proxy.as_ref().unwrap().set_delay(0);
    assert_eq!(
        settled_remaining(&gw.stack, &key, Duration::from_millis(1800)).await,
        LIMIT
    );
    assert_eq!(gw.mock.requests_started(), 0);
    gw.stop().await;
}

// ------------------------------------------------------------------ FinishBatch

/// An authz-service from before FinishBatch: answers it UNIMPLEMENTED and passes
/// every other call to the real service, counting what it saw.
/// A BudgetAuthorization in front of the real one, counting what reaches it.
#[derive(Clone, Default)]
struct FakeService {
    real: Option<
        pb::budget_authorization_client::BudgetAuthorizationClient<caracal_tests::GatewaySvc>,
    >,
    /// A release before FinishBatch and CallStream: both answer UNIMPLEMENTED.
    old: bool,
    /// The first stream ends cleanly (OK) at its first call, unread (a service
    /// shutting down), instead of breaking after reserving.
    clean_end: bool,
    batches: Arc<AtomicU64>,
    settles: Arc<AtomicU64>,
    streams: Arc<AtomicU64>,
    authorizes: Arc<AtomicU64>,
}

impl FakeService {
    fn real(
        &self,
    ) -> pb::budget_authorization_client::BudgetAuthorizationClient<caracal_tests::GatewaySvc> {
        self.real.clone().unwrap()
    }

    async fn serve(self) -> (u16, JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(pb::budget_authorization_server::BudgetAuthorizationServer::new(self))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
        });
        (port, server)
    }
}

#[tonic::async_trait]
impl pb::budget_authorization_server::BudgetAuthorization for FakeService {
    async fn authorize(
        &self,
        r: tonic::Request<pb::AuthorizeRequest>,
    ) -> Result<tonic::Response<pb::AuthorizeResponse>, tonic::Status> {
        self.authorizes.fetch_add(1, Ordering::SeqCst);
        self.real().authorize(r.into_inner()).await
    }
    async fn settle(
        &self,
        r: tonic::Request<pb::SettleRequest>,
    ) -> Result<tonic::Response<pb::SettleResponse>, tonic::Status> {
        self.settles.fetch_add(1, Ordering::SeqCst);
        self.real().settle(r.into_inner()).await
    }
    async fn release(
        &self,
        r: tonic::Request<pb::ReleaseRequest>,
    ) -> Result<tonic::Response<pb::ReleaseResponse>, tonic::Status> {
        self.real().release(r.into_inner()).await
    }
    async fn release_by_request(
        &self,
        r: tonic::Request<pb::ReleaseByRequestRequest>,
    ) -> Result<tonic::Response<pb::ReleaseResponse>, tonic::Status> {
        self.real().release_by_request(r.into_inner()).await
    }
    async fn finish_batch(
        &self,
        r: tonic::Request<pb::FinishBatchRequest>,
    ) -> Result<tonic::Response<pb::FinishBatchResponse>, tonic::Status> {
        self.batches.fetch_add(1, Ordering::SeqCst);
        if self.old {
            return Err(tonic::Status::unimplemented("FinishBatch"));
        }
        self.real().finish_batch(r.into_inner()).await
    }
    type CallStreamStream = std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<pb::StreamResult, tonic::Status>> + Send>,
    >;
    /// Each call is passed to the real service's unary Authorize, one at a time;
    /// on the FIRST stream, the first call's answer (warm-ups aside) is lost: the
    /// stream breaks (UNAVAILABLE) after the real service reserved, or, with
    /// `clean_end`, the stream ends OK without reading the call.
    async fn call_stream(
        &self,
        r: tonic::Request<tonic::Streaming<pb::StreamCall>>,
    ) -> Result<tonic::Response<Self::CallStreamStream>, tonic::Status> {
        let n = self.streams.fetch_add(1, Ordering::SeqCst);
        if self.old {
            return Err(tonic::Status::unimplemented("CallStream"));
        }
        let mut calls = r.into_inner();
        let (real, authorizes, clean_end) = (self.real(), self.authorizes.clone(), self.clean_end);
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            while let Ok(Some(call)) = calls.message().await {
                let Some(pb::stream_call::Call::Authorize(req)) = call.call else {
                    continue;
                };
                let warm_up = matches!(
                    req.credential.as_ref().and_then(|c| c.kind.as_ref()),
                    Some(pb::agent_credential::Kind::ApiKey(k)) if k == WARM_UP_KEY
                );
                if n == 0 && !warm_up && clean_end {
                    return;
                }
                authorizes.fetch_add(1, Ordering::SeqCst);
                let result = real.clone().authorize(req).await;
                if n == 0 && !warm_up {
                    let lost = tonic::Status::unavailable("stream broken after reserving");
                    let _ = tx.send(Err(lost)).await;
                    return;
                }
                let answer = match result {
                    Ok(r) => pb::StreamResult {
                        call_id: call.call_id,
                        code: 0,
                        message: String::new(),
                        response: Some(pb::stream_result::Response::Authorize(r.into_inner())),
                    },
                    Err(s) => pb::StreamResult {
                        call_id: call.call_id,
                        code: i32::from(s.code()) as u32,
                        message: s.message().to_owned(),
                        response: None,
                    },
                };
                if tx.send(Ok(answer)).await.is_err() {
                    return;
                }
            }
        });
        Ok(tonic::Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// A gateway in front of a service without FinishBatch and CallStream (a rolling
/// upgrade, filter first) still authorizes and charges every call: the batch is
/// answered UNIMPLEMENTED once, its Settle is sent again as a unary call, and later
/// Settles go unary directly; the Authorize stream is refused UNIMPLEMENTED, and every
/// Authorize goes unary (none is lost or failed on the way).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_without_finish_batch_gets_unary_settles() {
    let stack = TestStack::start().await.unwrap();
    set_prices(&stack).await;
    let mock = MockLlm::start().await.unwrap();
    let key = agent(&stack, "old-service").await;
    let old = FakeService {
        real: Some(stack.authz()),
        old: true,
        ..FakeService::default()
    };
    let (batches, settles) = (old.batches.clone(), old.settles.clone());
    let (streams, authorizes) = (old.streams.clone(), old.authorizes.clone());
    let (port, server) = old.serve().await;
    let envoy = Envoy::start(EnvoyOptions::new(Gateway::Wasm, port, mock.port()))
        .await
        .unwrap();
    let auth = format!("Bearer {key}");
    let mut expected = LIMIT;
    let prompts = [
        "first call to an old service",
        "second one",
        "third, after the stream was refused",
    ];
    for (i, prompt) in prompts.iter().enumerate() {
        let r = envoy
            .post_json(
                CHAT,
                &[("authorization", &auth), (COMPLETION_TOKENS_HEADER, "7")],
                &json!({"model": "gpt-4o", "max_tokens": 50,
                        "messages": [{"role": "user", "content": prompt}]}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        expected -= cost(words(prompt), 7);
        assert_eq!(
            wait_remaining(&stack, &key, expected).await,
            expected,
            "call {i}"
        );
    }
    assert_eq!(batches.load(Ordering::SeqCst), 1, "one FinishBatch tried");
    assert_eq!(settles.load(Ordering::SeqCst), 3, "all settled unary");
    assert_eq!(authorizes.load(Ordering::SeqCst), 3, "all authorized unary");
    // One Envoy worker: the stream is tried once, then never again.
    assert_eq!(streams.load(Ordering::SeqCst), 1, "one CallStream tried");
    assert_eq!(
        envoy_counter(&envoy, "caracal_filter_settle_dropped_total").await,
        0
    );
    drop(envoy);
    server.abort();
    mock.stop().await;
    stack.stop().await.unwrap();
}

// ------------------------------------------------------------------ CallStream

/// The key of the warm-up calls (an unknown agent: each is refused 401).
const WARM_UP_KEY: &str = "cak_warmup-unknown";

/// Sends warm-up calls (the first Authorize of a worker goes unary and asks for the
/// stream) until Envoy's filter has opened `n` Authorize streams in all.
async fn wait_stream_opens(envoy: &Envoy, n: u64) {
    let name = "caracal_filter_authorize_stream_opens_total";
    for _ in 0..200 {
        if envoy_counter(envoy, name).await >= n {
            return;
        }
        let r = envoy
            .post_json(
                CHAT,
                &[("authorization", &format!("Bearer {WARM_UP_KEY}"))],
                &json!({"model": "gpt-4o", "max_tokens": 1,
                        "messages": [{"role": "user", "content": "warm up"}]}),
            )
            .await
            .unwrap();
        assert!(matches!(r.status, 401 | 503), "{} {}", r.status, r.text());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!(
        "{name} never reached {n}: {}",
        envoy_counter(envoy, name).await
    );
}

/// Once the stream is open, every Authorize goes on it (none unary) and every call
/// is charged exactly what it used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorize_goes_over_the_call_stream_and_charges_exactly() {
    let gw = Gw::start(false, |_| {}).await;
    let streamed = "caracal_filter_authorize_streamed_total";
    let unary = "caracal_filter_authorize_unary_total";
    let (streamed_before, unary_before) = (
        envoy_counter(&gw.envoy, streamed).await,
        envoy_counter(&gw.envoy, unary).await,
    );
    let key = agent(&gw.stack, "streamed").await;
    let auth = format!("Bearer {key}");
    let mut expected = LIMIT;
    let prompts = [
        "one",
        "two words",
        "three words here",
        "and a fourth one",
        "five",
    ];
    for (i, prompt) in prompts.iter().enumerate() {
        let tokens = 5 + i as u64;
        let r = gw
            .envoy
            .post_json(
                CHAT,
                &[
                    ("authorization", &auth),
                    (COMPLETION_TOKENS_HEADER, &tokens.to_string()),
                ],
                &json!({"model": "gpt-4o", "max_tokens": 50,
                        "messages": [{"role": "user", "content": prompt}]}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        expected -= cost(words(prompt), tokens);
    }
    assert_eq!(wait_remaining(&gw.stack, &key, expected).await, expected);
    // A denial travels the stream too.
    let (poor_id, poor) = gw
        .stack
        .agent_with_key("streamed-poor", None)
        .await
        .unwrap();
    gw.stack
        .usd_policy(&poor_id, "0.000001", "daily", "calendar", "charge")
        .await
        .unwrap();
    let r = gw
        .envoy
        .post_json(
            CHAT,
            &[("authorization", &format!("Bearer {poor}"))],
            &json!({"model": "gpt-4o", "max_tokens": 50,
                    "messages": [{"role": "user", "content": "too expensive"}]}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(
        envoy_counter(&gw.envoy, streamed).await - streamed_before,
        6
    );
    assert_eq!(envoy_counter(&gw.envoy, unary).await - unary_before, 0);
    assert_eq!(
        envoy_counter(&gw.envoy, "caracal_filter_authorize_stream_opens_total").await,
        1
    );
    assert_eq!(gw.mock.requests_started(), 5);
    gw.stop().await;
}

/// The stream breaks after the service reserved but before it answered: the call
/// fails closed at once (not at its deadline), what was reserved is released by
/// request id, a new stream is opened, and the next call on it is charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_call_stream_fails_its_call_closed_and_releases_the_reservation() {
    let stack = TestStack::start().await.unwrap();
    set_prices(&stack).await;
    let mock = MockLlm::start().await.unwrap();
    let key = agent(&stack, "broken-stream").await;
    let fake = FakeService {
        real: Some(stack.authz()),
        ..FakeService::default()
    };
    let (streams, authorizes) = (fake.streams.clone(), fake.authorizes.clone());
    let (port, server) = fake.serve().await;
    let mut opts = EnvoyOptions::new(Gateway::Wasm, port, mock.port());
    opts.authz_timeout_ms = 30_000;
    let envoy = Envoy::start(opts).await.unwrap();
    wait_stream_opens(&envoy, 1).await;
    let warm_ups = authorizes.load(Ordering::SeqCst);
    let streamed = "caracal_filter_authorize_streamed_total";
    let (streamed_before, opens_before) = (
        envoy_counter(&envoy, streamed).await,
        envoy_counter(&envoy, "caracal_filter_authorize_stream_opens_total").await,
    );
    let auth = format!("Bearer {key}");
    let started = Instant::now();
    let r = envoy
        .post_json(
            CHAT,
            &[("authorization", &auth)],
            &json!({"model": "gpt-4o", "max_tokens": 100,
                    "messages": [{"role": "user", "content": "answer lost"}]}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "failed at the 30 s deadline, not when the stream broke"
    );
    assert_eq!(
        authorizes.load(Ordering::SeqCst) - warm_ups,
        1,
        "the service reserved"
    );
    assert_eq!(mock.requests_started(), 0);
    assert_eq!(wait_remaining(&stack, &key, LIMIT).await, LIMIT, "released");
    assert_eq!(envoy_counter(&envoy, streamed).await - streamed_before, 1);
    wait_stream_opens(&envoy, opens_before + 1).await;
    let (authorizes_before, streamed_before) = (
        authorizes.load(Ordering::SeqCst),
        envoy_counter(&envoy, streamed).await,
    );
    let prompt = "on the new stream";
    let r = envoy
        .post_json(
            CHAT,
            &[("authorization", &auth), (COMPLETION_TOKENS_HEADER, "9")],
            &json!({"model": "gpt-4o", "max_tokens": 100,
                    "messages": [{"role": "user", "content": prompt}]}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let expected = LIMIT - cost(words(prompt), 9);
    assert_eq!(wait_remaining(&stack, &key, expected).await, expected);
    assert_eq!(streams.load(Ordering::SeqCst), 2);
    assert_eq!(authorizes.load(Ordering::SeqCst) - authorizes_before, 1);
    assert_eq!(envoy_counter(&envoy, streamed).await - streamed_before, 1);
    drop(envoy);
    server.abort();
    mock.stop().await;
    stack.stop().await.unwrap();
}

/// A service that ends the stream cleanly (OK: it shuts down, and answered all it
/// read) leaves the calls it did not read unapplied: the gateway sends them again as
/// unary calls instead of failing them, so a rolling restart costs no agent call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_left_unread_by_a_clean_stream_end_is_sent_again_unary() {
    let stack = TestStack::start().await.unwrap();
    set_prices(&stack).await;
    let mock = MockLlm::start().await.unwrap();
    let key = agent(&stack, "restart-proof").await;
    let fake = FakeService {
        real: Some(stack.authz()),
        clean_end: true,
        ..FakeService::default()
    };
    let authorizes = fake.authorizes.clone();
    let (port, server) = fake.serve().await;
    let envoy = Envoy::start(EnvoyOptions::new(Gateway::Wasm, port, mock.port()))
        .await
        .unwrap();
    wait_stream_opens(&envoy, 1).await;
    let (streamed, unary) = (
        "caracal_filter_authorize_streamed_total",
        "caracal_filter_authorize_unary_total",
    );
    let before = (
        authorizes.load(Ordering::SeqCst),
        envoy_counter(&envoy, streamed).await,
        envoy_counter(&envoy, unary).await,
    );
    let prompt = "sent during a restart";
    let r = envoy
        .post_json(
            CHAT,
            &[
                ("authorization", &format!("Bearer {key}")),
                (COMPLETION_TOKENS_HEADER, "5"),
            ],
            &json!({"model": "gpt-4o", "max_tokens": 100,
                    "messages": [{"role": "user", "content": prompt}]}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let expected = LIMIT - cost(words(prompt), 5);
    assert_eq!(wait_remaining(&stack, &key, expected).await, expected);
    // Sent on the stream, left unread, then authorized once, unary.
    assert_eq!(authorizes.load(Ordering::SeqCst) - before.0, 1);
    assert_eq!(envoy_counter(&envoy, streamed).await - before.1, 1);
    assert_eq!(envoy_counter(&envoy, unary).await - before.2, 1);
    assert_eq!(mock.requests_started(), 1);
    drop(envoy);
    server.abort();
    mock.stop().await;
    stack.stop().await.unwrap();
}
