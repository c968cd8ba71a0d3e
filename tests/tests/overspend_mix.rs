//! The hard guarantee under a realistic mess, through the real Envoy and filter:
//! 2,000 concurrent agent calls from two children of one parent, mixing normal
//! completions, streams the client resets half-way, upstream 500s, requests without
//! an output cap, answers slower than the reservation expiry, and clients that give up
//! before any answer.
//!
//! Afterwards, from the service's own records (the Redis counters and the outbox
//! events the scripts wrote in the same atomic steps):
//! - for each child and for the parent: spent + still reserved <= limit + the
//!   overshoot the charges recorded (settled above their estimate);
//! - every call the client saw answered 2xx (completely or not) was charged;
//! - no call that got an upstream 5xx, or that ended before any answer, was charged.
//!
//! Run with one Envoy worker thread and with two (each worker its own wasm VM).
//!
//!   cargo test -p caracal-tests --test overspend_mix

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use caracal_tests::{
    envoy::{Envoy, EnvoyOptions, Gateway},
    mock_llm::{
        MockLlm, CHUNK_DELAY_HEADER, COMPLETION_TOKENS_HEADER, DELAY_HEADER, STATUS_HEADER,
    },
    TestStack,
};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

const CALLS: usize = 2_000;
const CONCURRENCY: usize = 100;
const CHAT: &str = "/v1/chat/completions";
/// Reservations expire after this many seconds (swept every second).
const EXPIRY_S: u64 = 2;
/// The slow answers take longer than the expiry (plus a sweep).
const SLOW_MS: &str = "4000";
/// Header tagging each call, recorded by the mock upstream with Envoy's request id.
const CALL_HEADER: &str = "x-test-call";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    Normal,
    Stream,
    ResetMidStream,
    Upstream500,
    NoMaxTokens,
    SlowPastExpiry,
    AbortBeforeAnswer,
}

fn kind_of(i: usize) -> Kind {
    match i % 10 {
        3 => Kind::Stream,
        4 => Kind::ResetMidStream,
        5 => Kind::Upstream500,
        6 => Kind::NoMaxTokens,
        7 => Kind::SlowPastExpiry,
        8 => Kind::AbortBeforeAnswer,
        _ => Kind::Normal,
    }
}

/// What the client saw of one call.
#[derive(Debug)]
struct Seen {
    kind: Kind,
    /// Status of the answer, if any arrived.
    status: Option<u16>,
    /// The reservation receipt header, if headers arrived.
    reservation: Option<String>,
}

async fn call(port: u16, i: usize, key: &str) -> Seen {
    let kind = kind_of(i);
    let mut body = json!({
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": format!("call number {i} please answer")}],
        "max_tokens": 100,
    });
    let mut headers: Vec<(&str, String)> = vec![
        ("authorization", format!("Bearer {key}")),
        ("content-type", "application/json".into()),
        (CALL_HEADER, i.to_string()),
        (COMPLETION_TOKENS_HEADER, "40".into()),
    ];
    let mut give_up = Duration::from_secs(30);
    let mut read_one_chunk = false;
    match kind {
        Kind::Normal => {}
        Kind::Stream => body["stream"] = json!(true),
        Kind::ResetMidStream => {
            body["stream"] = json!(true);
            headers.push((CHUNK_DELAY_HEADER, "300".into()));
            read_one_chunk = true;
        }
        Kind::Upstream500 => headers.push((STATUS_HEADER, "500".into())),
        Kind::NoMaxTokens => {
            body.as_object_mut().map(|o| o.remove("max_tokens"));
        }
        Kind::SlowPastExpiry => headers.push((DELAY_HEADER, SLOW_MS.into())),
        Kind::AbortBeforeAnswer => {
            headers.push((DELAY_HEADER, SLOW_MS.into()));
            give_up = Duration::from_millis(500);
        }
    }
    let mut seen = Seen {
        kind,
        status: None,
        reservation: None,
    };
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port)))
            .await
            .ok()?;
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .ok()?;
        let conn_task = tokio::spawn(conn);
        let mut req = hyper::Request::builder()
            .method("POST")
            .uri(CHAT)
            .header("host", format!("127.0.0.1:{port}"));
        for (k, v) in &headers {
            req = req.header(*k, v.as_str());
        }
        let req = req.body(Full::new(Bytes::from(body.to_string()))).ok()?;
        let resp = sender.send_request(req).await.ok()?;
        seen.status = Some(resp.status().as_u16());
        seen.reservation = resp
            .headers()
            .get("x-caracal-reservation-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let mut body = resp.into_body();
        if read_one_chunk {
            // The first event, then hang up: the rest of the stream (and its usage
            // chunk) never reaches the client.
            let _ = body.frame().await;
            conn_task.abort();
            return Some(());
        }
        let _ = body.collect().await;
        conn_task.abort();
        Some(())
    };
    let _ = tokio::time::timeout(give_up, exchange).await;
    seen
}

/// Every event in the stack's outbox streams, fields spread (meta included).
async fn outbox_events(stack: &TestStack) -> Vec<HashMap<String, String>> {
    let entries = stack.outbox_entries().await.unwrap();
    entries.into_iter().map(|(_, fields)| fields).collect()
}

/// Spent and still reserved on a policy's counters (a `total` window: one hash).
async fn counters(stack: &TestStack, policy: &str) -> (i64, i64) {
    let counters = stack.policy_counters(policy).await.unwrap();
    assert_eq!(
        counters.len(),
        1,
        "one total-window counter for {policy}: {counters:?}"
    );
    let h = &counters[0];
    (
        h.get("s").copied().unwrap_or(0),
        h.get("r").copied().unwrap_or(0),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_mixed_calls_never_overspend_and_every_answered_call_is_charged() {
    mixed_calls(1).await;
}

/// The same through an Envoy with two worker threads, as gateways run in production
/// (one per core): each worker has its own wasm VM, root context, Authorize stream
/// and Settle batches, and the calls of one agent land on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guarantee_holds_when_envoy_runs_two_workers() {
    mixed_calls(2).await;
}

async fn mixed_calls(envoy_workers: u16) {
    let stack = TestStack::start_with(|c| {
        c.reservations.provisional_charge_expiration = EXPIRY_S;
        c.reservations.provisional_charge_cleanup_interval = 1;
    })
    .await
    .unwrap();
    let mock = MockLlm::start().await.unwrap();
    let port = stack.server.as_ref().unwrap().grpc_addr.port();
    let envoy = Envoy::start(EnvoyOptions {
        workers: envoy_workers,
        ..EnvoyOptions::new(Gateway::Wasm, port, mock.port())
    })
    .await
    .unwrap();
    stack
        .set_token_price("openai", "gpt-4o", "USD", ["2.50", "10.00", "1.25"])
        .await
        .unwrap();
    // The parent binds: its children together could spend twice its limit.
    let (parent, _) = stack.agent_with_key("mix-parent", None).await.unwrap();
    let (a, key_a) = stack.agent_with_key("mix-a", Some(&parent)).await.unwrap();
    let (b, key_b) = stack.agent_with_key("mix-b", Some(&parent)).await.unwrap();
    let p_parent = stack
        .usd_policy(&parent, "0.80", "total", "calendar", "charge")
        .await
        .unwrap();
    let p_a = stack
        .usd_policy(&a, "0.50", "total", "calendar", "charge")
        .await
        .unwrap();
    let p_b = stack
        .usd_policy(&b, "0.50", "total", "calendar", "release")
        .await
        .unwrap();

    let gate = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let mut tasks = Vec::with_capacity(CALLS);
    for i in 0..CALLS {
        let key = if i % 2 == 0 {
            key_a.clone()
        } else {
            key_b.clone()
        };
        let gate = gate.clone();
        let envoy_port = envoy.port;
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await;
            call(envoy_port, i, &key).await
        }));
    }
    let mut seen = Vec::with_capacity(CALLS);
    for t in tasks {
        seen.push(t.await.unwrap());
    }
    // Every worker took calls (each call is its own connection).
    let per_worker = envoy.connections_per_worker().await.unwrap();
    assert_eq!(
        per_worker.len(),
        usize::from(envoy_workers),
        "{per_worker:?}"
    );
    assert!(
        per_worker.iter().all(|&n| n > 0),
        "a worker took no calls: {per_worker:?}"
    );
    assert!(
        per_worker.iter().sum::<u64>() >= CALLS as u64,
        "{per_worker:?}"
    );

    // Let every Settle/Release the filter sends after the answers land, and the
    // expiries: no live reservation, and no new event for a second (bounded wait).
    let mut events = outbox_events(&stack).await;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let now = outbox_events(&stack).await;
        let (_, r_parent) = counters(&stack, &p_parent).await;
        let settled = now.len() == events.len() && r_parent == 0;
        events = now;
        if settled {
            break;
        }
    }

    // Per reservation: total charged, and whether it was released.
    let mut charged: HashMap<String, i64> = HashMap::new();
    let mut reserved: HashMap<String, i64> = HashMap::new();
    let mut released: HashSet<String> = HashSet::new();
    let mut by_request: HashMap<String, String> = HashMap::new();
    let mut final_policies: HashMap<String, String> = HashMap::new();
    for e in &events {
        let rsv = e.get("reservation_id").cloned().unwrap_or_default();
        match (e["type"].as_str(), e["kind"].as_str()) {
            ("charge", _) => {
                // The last charge event of a reservation holds its final charge (a
                // late settle supersedes the expiry's charge); one partition's
                // stream is in order.
                charged.insert(rsv.clone(), e["charged"].parse::<i64>().unwrap());
                reserved.insert(rsv.clone(), e["reserved"].parse().unwrap());
                final_policies.insert(rsv.clone(), e["policy_ids"].clone());
            }
            ("decision", "release") | ("decision", "expire_release") => {
                released.insert(rsv.clone());
            }
            _ => {}
        }
        if e.get("decision").map(String::as_str) == Some("allow") && e["kind"] == "authorize" {
            by_request.insert(e["request_id"].clone(), rsv);
        }
    }

    // The mock saw each forwarded call with Envoy's request id: the filter's request
    // id starts with it, which links calls that never got headers to their reservation.
    let forwarded: HashMap<usize, String> = mock
        .requests()
        .iter()
        .filter_map(|r| {
            let i = r.header(CALL_HEADER)?.parse().ok()?;
            Some((i, r.header("x-request-id")?.to_owned()))
        })
        .collect();
    let reservation_of = |i: usize, s: &Seen| -> Option<String> {
        if let Some(r) = &s.reservation {
            return Some(r.clone());
        }
        let xrid = forwarded.get(&i)?;
        by_request
            .iter()
            .find(|(req, _)| req.starts_with(&format!("{xrid}:")))
            .map(|(_, r)| r.clone())
    };

    let mut per_kind: HashMap<(Kind, Option<u16>), usize> = HashMap::new();
    let mut answered_2xx: HashSet<String> = HashSet::new();
    for (i, s) in seen.iter().enumerate() {
        *per_kind.entry((s.kind, s.status)).or_default() += 1;
        let rsv = reservation_of(i, s);
        match (s.kind, s.status) {
            (_, Some(429)) => {}
            (Kind::AbortBeforeAnswer, None) | (Kind::Upstream500, Some(500)) => {
                // Forwarded (the mock saw it): its reservation was released, not
                // charged. Not forwarded (gave up during authorization): checked
                // below with every other charge.
                if let Some(rsv) = rsv {
                    assert!(
                        released.contains(&rsv),
                        "call {i} ({s:?}): reservation {rsv} not released"
                    );
                }
            }
            (_, Some(st)) if (200..300).contains(&st) => {
                let rsv =
                    rsv.unwrap_or_else(|| panic!("2xx call {i} ({s:?}) without a reservation"));
                let c = charged.get(&rsv).copied().unwrap_or(0);
                assert!(
                    c > 0,
                    "2xx call {i} ({s:?}) was not charged (reservation {rsv})"
                );
                answered_2xx.insert(rsv);
            }
            other => panic!("call {i}: unexpected outcome {other:?}"),
        }
    }
    // Only calls answered 2xx were charged (nothing for 5xx, aborts, refusals, or
    // reservations whose call never went out).
    for (rsv, c) in &charged {
        assert!(
            answered_2xx.contains(rsv),
            "reservation {rsv} was charged {c} but no 2xx answer carried it"
        );
    }
    eprintln!("outcomes: {per_kind:?}");
    // The mix really happened, and the budget really was hit.
    for kind in [
        Kind::Normal,
        Kind::Stream,
        Kind::ResetMidStream,
        Kind::Upstream500,
        Kind::NoMaxTokens,
        Kind::SlowPastExpiry,
        Kind::AbortBeforeAnswer,
    ] {
        let answered: usize = per_kind
            .iter()
            .filter(|((k, st), _)| *k == kind && *st != Some(429))
            .map(|(_, n)| *n)
            .sum();
        assert!(answered > 0, "no {kind:?} call got through: {per_kind:?}");
    }
    let refused: usize = per_kind
        .iter()
        .filter(|((_, st), _)| *st == Some(429))
        .map(|(_, n)| *n)
        .sum();
    assert!(refused > 0, "the budget was never reached: {per_kind:?}");

    // The forwarded uncapped requests carried the cap that was reserved.
    for r in mock.requests() {
        let Some(i) = r.header(CALL_HEADER).and_then(|v| v.parse::<usize>().ok()) else {
            continue;
        };
        let body: Value = r.json();
        if kind_of(i) == Kind::NoMaxTokens {
            let cap = body["max_completion_tokens"]
                .as_u64()
                .or_else(|| body["max_tokens"].as_u64());
            assert!(
                cap.is_some_and(|c| c > 0),
                "call {i} forwarded uncapped: {body}"
            );
        }
    }

    // The guarantee, per policy: spent + reserved <= limit + recorded overshoot; and
    // the counters hold exactly the final charges on that policy.
    for (policy, limit) in [(&p_parent, 800_000), (&p_a, 500_000), (&p_b, 500_000)] {
        let on_policy: Vec<&String> = final_policies
            .iter()
            .filter(|(_, ids)| ids.split(',').any(|id| id == policy.as_str()))
            .map(|(rsv, _)| rsv)
            .collect();
        let overshoot: i64 = on_policy
            .iter()
            .map(|rsv| (charged[*rsv] - reserved[*rsv]).max(0))
            .sum();
        let charges: i64 = on_policy.iter().map(|rsv| charged[*rsv]).sum();
        let (spent, open) = counters(&stack, policy).await;
        assert_eq!(open, 0, "policy {policy}: reservations still open");
        assert!(
            spent + open <= limit + overshoot,
            "policy {policy}: spent {spent} + reserved {open} > limit {limit} + overshoot {overshoot}"
        );
        assert_eq!(spent, charges, "policy {policy}: counters vs charge events");
    }

    drop(envoy);
    mock.stop().await;
    stack.stop().await.unwrap();
}
