//! Load benchmark of the hot path: Authorize + Settle pairs over gRPC.
//!
//! Starts a real authz-service (in-process, on 127.0.0.1) on a fresh PostgreSQL
//! database and the local Redis, creates 1 and 10,000 agents with keys and generous
//! policies (`--policies`: 3 by default, daily / weekly / monthly, so every decision
//! checks and reserves on 3 counters, the shape of the Redis-only ceiling's script),
//! then for each concurrency level drives pairs for a fixed
//! time and prints pairs/s, and p50/p99/p99.9 latency of each call (Authorize and
//! Settle together: what a gateway waits for per RPC) and of a whole pair.
//!
//!   cargo run --release -p caracal-tests --bin authz-bench -- --seconds 10
//!
//! Flags: `--help`. `--redis-cluster` runs against the local 3-shard cluster,
//! once with the replica acknowledgement and once without (`--replica-ack 1,0`).
//! `--transport unary,stream`: each call as its unary RPC, and each call as a
//! message on one CallStream per connection (as the gateway sends Authorize).
//! `--rate R`: an open loop offering R pairs/s, latency counted from when each pair
//! was due when its caller was still busy then, else from when the timer woke it
//! (tokio's 1 ms timer; its lateness printed apart). `--trace-sampling 0.1`: OpenTelemetry tracing on (spans to `otlp-sink`).

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::Context;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use caracal_proto::v1::{self as pb, budget_authorization_client::BudgetAuthorizationClient};
use caracal_tests::{
    cpu::{cpu_seconds, CommandStats, CpuSample},
    met, TestStack,
};
use hdrhistogram::Histogram;

/// Authorize+Settle pairs over gRPC against an in-process authz-service.
#[derive(clap::Parser, Debug)]
#[command(name = "authz-bench")]
struct Args {
    /// Seconds per run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Concurrent callers, one run per value.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    concurrency: Vec<usize>,
    /// Agents the callers spread over, one set of runs per value.
    #[arg(long, value_delimiter = ',', default_value = "1,10000")]
    agents: Vec<usize>,
    /// Budget policies per agent (1-3: daily, weekly, monthly), i.e. the counters each
    /// decision checks and reserves on. 3 = the shape of the ceiling's script.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=3))]
    policies: u8,
    /// Relay events to this Kafka during the run (default: events stay in the
    /// Redis outbox and are deleted after each run).
    #[arg(long)]
    kafka: Option<String>,
    /// The service's `reconcile.monitorInterval` in seconds; 0 turns the drift
    /// monitor off. Default: off in closed-loop runs, whose figures are per pair
    /// (a monitor run reads every counter whatever the traffic: 30,000 HGETALLs at
    /// 10,000 agents, which landed in whichever run crossed the 60-s mark and were
    /// counted as the commands the scripts call); the service's own, 60, with
    /// `--rate`, whose tail is measured at the defaults (its first run is one
    /// interval after the start, so a shorter run never sees it).
    #[arg(long)]
    reconcile_interval: Option<u64>,
    /// Callers per HTTP/2 connection (64: one connection, as from one Envoy worker).
    #[arg(long, default_value_t = 64)]
    per_connection: usize,
    /// The service's `server.workerThreads` (1 = single-threaded runtime, 0 = one
    /// per core).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// 0: the callers run on the service's runtime; N: on N threads of their own,
    /// like a separate client process.
    #[arg(long, default_value_t = 0)]
    client_threads: usize,
    /// The service's `redis.groupCommitMaxCalls` (1 = every call its own script
    /// run, as before group commit; default: the service's, 64).
    #[arg(long)]
    group_commit: Option<u16>,
    /// The service's `redis.connections` (default: the service's, 1; 8 on a
    /// cluster with replica acknowledgement).
    #[arg(long)]
    redis_connections: Option<u16>,
    /// Run against the local 3-shard Redis Cluster (3 primaries + 3 replicas on
    /// 127.0.0.1:7001-7006, started when none runs) instead of the standalone
    /// Redis: once per `--replica-ack` value.
    #[arg(long)]
    redis_cluster: bool,
    /// With --redis-cluster: the `redis.minReplicasAck` values to compare.
    #[arg(long, value_delimiter = ',', default_value = "1,0")]
    replica_ack: Vec<u8>,
    /// Requests per script shape for the Redis-only ceiling (`redis-benchmark`,
    /// 64 connections, standalone only); 0 skips it.
    #[arg(long, default_value_t = 300_000)]
    ceiling_requests: u64,
    /// How the calls travel, one set of runs per value: `unary` RPCs, or messages on
    /// one `CallStream` per HTTP/2 connection (what the gateway does for Authorize).
    #[arg(long, value_delimiter = ',', default_value = "unary,stream")]
    transport: Vec<Transport>,
    /// Open loop: offer this many pairs/s in all, on a fixed schedule spread over
    /// the callers (caller w's k-th pair is due at (k * concurrency + w) / rate s),
    /// and time each pair and each Authorize from when it was due, so time spent
    /// waiting behind a slow call counts (a closed loop hides that queueing).
    /// Without it each caller sends its next pair when the last one is answered.
    #[arg(long)]
    rate: Option<f64>,
    /// Export OpenTelemetry spans, sampling this share of the calls (the service's
    /// `tracing.samplingRatio`; the bench's calls carry no traceparent, so each is
    /// a new trace), to an OTLP sink in a process of its own (`otlp-sink`, next
    /// to this binary). Without it tracing is off, as by default.
    #[arg(long)]
    trace_sampling: Option<f64>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    Unary,
    Stream,
}

/// Creates `n` agents, each with a key and `policies` $1,000,000 calendar policies
/// (daily, weekly, monthly: one counter each), with bulk SQL (the admin API would take
/// minutes for 10,000); returns their keys.
async fn seed_agents(
    stack: &TestStack,
    n: usize,
    policies_per_agent: u8,
    tag: &str,
) -> anyhow::Result<Vec<String>> {
    use diesel_async::RunQueryDsl;
    let mut conn = stack.db().await?;
    let mut keys = Vec::with_capacity(n);
    for chunk_start in (0..n).step_by(1000) {
        let chunk = chunk_start..(chunk_start + 1000).min(n);
        let (mut agents, mut key_rows, mut policies) = (Vec::new(), Vec::new(), Vec::new());
        for i in chunk {
            let agent = uuid::Uuid::now_v7();
            let key = caracal_authz::keys::generate(caracal_tests::PEPPER);
            agents.push(format!("('{agent}', 'bench-{tag}-{i}', 'openai')"));
            let hex: String = key.hash.iter().map(|b| format!("{b:02x}")).collect();
            key_rows.push(format!(
                "('{}', '{agent}', '{}', '\\x{hex}')",
                uuid::Uuid::now_v7(),
                key.display_prefix
            ));
            for window in ["daily", "weekly", "monthly"]
                .iter()
                .take(usize::from(policies_per_agent))
            {
                policies.push(format!(
                    "('{}', '{agent}', 1000000000000, 'USD', '{window}', 'calendar')",
                    uuid::Uuid::now_v7()
                ));
            }
            keys.push(key.secret);
        }
        diesel::sql_query(format!(
            "INSERT INTO agents (id, name, agent_type) VALUES {}",
            agents.join(",")
        ))
        .execute(&mut conn)
        .await?;
        diesel::sql_query(format!(
            "INSERT INTO agent_api_keys (id, agent_id, key_prefix, key_hash) VALUES {}",
            key_rows.join(",")
        ))
        .execute(&mut conn)
        .await?;
        diesel::sql_query(format!(
            "INSERT INTO policies (id, agent_id, limit_micros, currency, time_window, window_type) VALUES {}",
            policies.join(",")
        ))
        .execute(&mut conn)
        .await?;
    }
    Ok(keys)
}

/// One HTTP/2 connection to the service, shared by several callers: hyper's
/// `SendRequest` used directly as the gRPC transport. (tonic's `Channel` puts a
/// buffer task between each call and the connection, one more hop per call that
/// the load generator would spend CPU on; a gateway has its own client.)
#[derive(Clone)]
struct H2Connection {
    service: H2Service,
    origin: tonic::codegen::http::Uri,
}

#[derive(Clone)]
struct H2Service(hyper::client::conn::http2::SendRequest<tonic::body::Body>);

impl H2Connection {
    async fn connect(url: &str) -> anyhow::Result<Self> {
        let origin: tonic::codegen::http::Uri = url.parse()?;
        let authority = origin
            .authority()
            .context("url without host:port")?
            .as_str();
        let tcp = tokio::net::TcpStream::connect(authority).await?;
        tcp.set_nodelay(true)?;
        let (send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await?;
        tokio::spawn(conn);
        Ok(Self {
            service: H2Service(send),
            origin,
        })
    }
}

impl tower::Service<tonic::codegen::http::Request<tonic::body::Body>> for H2Service {
    type Response = tonic::codegen::http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut req: tonic::codegen::http::Request<tonic::body::Body>) -> Self::Future {
        // The hot path answers gateways only: authenticate as one, as a plain-TCP
        // gateway does (the bench pays the interceptor like a real deployment).
        req.headers_mut().insert(
            caracal_tests::GATEWAY_TOKEN_HEADER,
            tonic::codegen::http::HeaderValue::from_static(caracal_tests::GATEWAY_TOKEN),
        );
        Box::pin(self.0.send_request(req))
    }
}

type Waiting = Arc<std::sync::Mutex<HashMap<u64, tokio::sync::oneshot::Sender<pb::StreamResult>>>>;

/// One `CallStream` shared by the callers of a connection: calls go out through a
/// channel into the request stream; a reader task hands each answer to the caller
/// waiting for its call id.
struct CallLane {
    calls: tokio::sync::mpsc::Sender<pb::StreamCall>,
    waiting: Waiting,
    next_id: AtomicU64,
}

impl CallLane {
    async fn open(mut client: BudgetAuthorizationClient<H2Service>) -> anyhow::Result<Self> {
        let (calls, outgoing) = tokio::sync::mpsc::channel(1024);
        let mut answers = client
            .call_stream(tokio_stream::wrappers::ReceiverStream::new(outgoing))
            .await?
            .into_inner();
        let waiting: Waiting = Arc::default();
        let w = waiting.clone();
        tokio::spawn(async move {
            while let Ok(Some(answer)) = answers.message().await {
                let to = match w.lock() {
                    Ok(mut m) => m.remove(&answer.call_id),
                    Err(_) => None,
                };
                if let Some(to) = to {
                    let _ = to.send(answer);
                }
            }
        });
        Ok(Self {
            calls,
            waiting,
            next_id: AtomicU64::new(0),
        })
    }

    async fn call(
        &self,
        call: pb::stream_call::Call,
    ) -> anyhow::Result<pb::stream_result::Response> {
        let call_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.waiting
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .insert(call_id, tx);
        self.calls
            .send(pb::StreamCall {
                call_id,
                x_request_id: String::new(),
                traceparent: String::new(),
                call: Some(call),
            })
            .await
            .map_err(|_| anyhow::anyhow!("the call stream ended"))?;
        let answer = rx.await.context("the call stream ended")?;
        anyhow::ensure!(
            answer.code == 0,
            "status {}: {}",
            answer.code,
            answer.message
        );
        answer.response.context("an OK answer without a response")
    }
}

/// How a caller reaches the service.
enum Caller {
    Unary(BudgetAuthorizationClient<H2Service>),
    Stream(Arc<CallLane>),
}

fn settle_request(reservation_id: String) -> pb::SettleRequest {
    pb::SettleRequest {
        reservation_id,
        actual_cost: Some(pb::Money {
            currency: "USD".into(),
            micros: 4_000,
            amount: String::new(),
        }),
        ..Default::default()
    }
}

/// One Authorize + Settle; returns the latency of each call (µs).
async fn pair(caller: &mut Caller, key: &str, request_id: String) -> anyhow::Result<(u64, u64)> {
    use pb::{stream_call::Call, stream_result::Response as Answer};
    let t = Instant::now();
    let request = caracal_tests::authorize_request(key, &request_id, 5_000);
    let r = match caller {
        Caller::Unary(client) => client.authorize(request).await?.into_inner(),
        Caller::Stream(lane) => match lane.call(Call::Authorize(request)).await? {
            Answer::Authorize(r) => r,
            other => anyhow::bail!("not an Authorize answer: {other:?}"),
        },
    };
    anyhow::ensure!(
        r.decision == pb::Decision::Allow as i32,
        "denied: {}",
        r.message
    );
    let authorize_us = t.elapsed().as_micros() as u64;
    let t = Instant::now();
    let settle = settle_request(r.reservation_id);
    match caller {
        Caller::Unary(client) => {
            client.settle(settle).await?;
        }
        Caller::Stream(lane) => {
            lane.call(Call::Settle(settle)).await?;
        }
    }
    Ok((authorize_us, t.elapsed().as_micros() as u64))
}

/// Per pair, per call, the open loop's timer lateness; the load generator's CPU s.
type Histograms = (Histogram<u64>, Histogram<u64>, Histogram<u64>, f64);

fn histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap())
}

/// The callers `first..first + count` (of `concurrency`), on this thread's own
/// runtime and connections.
#[allow(clippy::too_many_arguments)]
async fn callers(
    url: String,
    keys: Arc<Vec<String>>,
    first: usize,
    count: usize,
    concurrency: usize,
    per_connection: usize,
    transport: Transport,
    label: String,
    stop: Arc<AtomicBool>,
    errors: Arc<AtomicU64>,
) -> anyhow::Result<Histograms> {
    let mut channels = Vec::new();
    let mut lanes = Vec::new();
    for _ in 0..count.div_ceil(per_connection) {
        let conn = H2Connection::connect(&url).await?;
        if transport == Transport::Stream {
            let client =
                BudgetAuthorizationClient::with_origin(conn.service.clone(), conn.origin.clone());
            lanes.push(Arc::new(CallLane::open(client).await?));
        }
        channels.push(conn);
    }
    let cpu_before = cpu_seconds("/proc/thread-self/stat");
    let rate = RATE.get().copied();
    // Each caller's histograms are made before the schedule starts: made by the
    // callers as they start, 192 of them (~300 KB each, zeroed) held the first
    // pairs back by 20-80 ms, counted as the service's.
    let mut recorders: Vec<_> = (0..count)
        .map(|_| (histogram(), histogram(), histogram()))
        .collect();
    let schedule_start = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..count {
        let Some((mut hist, mut calls, mut timer)) = recorders.pop() else {
            break;
        };
        let w = first + n;
        let conn = &channels[n / per_connection];
        let mut caller = match lanes.get(n / per_connection) {
            Some(lane) => Caller::Stream(lane.clone()),
            None => Caller::Unary(BudgetAuthorizationClient::with_origin(
                conn.service.clone(),
                conn.origin.clone(),
            )),
        };
        let (keys, stop, errors, label) =
            (keys.clone(), stop.clone(), errors.clone(), label.clone());
        tasks.spawn(async move {
            let mut i: u64 = 0;
            while !stop.load(Ordering::Relaxed) {
                let key = &keys[(w + i as usize * concurrency) % keys.len()];
                // Open loop: wait for this pair's time. A pair that found its caller
                // still busy at its time has queued: counted from its time (no
                // coordinated omission). One that found the caller idle is counted
                // from when the timer woke it: tokio's timer fires on a 1 ms wheel,
                // so up to 1 ms after the due time, the load generator's lateness and
                // not the service's (printed apart, as "timer lateness").
                let start = match rate {
                    Some(r) => {
                        let at = (i as f64 * concurrency as f64 + w as f64) / r;
                        let due = schedule_start + Duration::from_secs_f64(at);
                        let idle = tokio::time::Instant::now() < due;
                        tokio::time::sleep_until(due).await;
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        if idle {
                            let _ = timer.record(due.elapsed().as_micros() as u64);
                            Instant::now()
                        } else {
                            due.into_std()
                        }
                    }
                    None => Instant::now(),
                };
                let queued = start.elapsed().as_micros() as u64;
                match pair(&mut caller, key, format!("b-{label}-{w}-{i}")).await {
                    Ok((a, s)) => {
                        let _ = hist.record(start.elapsed().as_micros() as u64);
                        let _ = calls.record(a + queued);
                        let _ = calls.record(s);
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                i += 1;
            }
            (hist, calls, timer)
        });
    }
    let (mut total, mut calls, mut timer) = (histogram(), histogram(), histogram());
    while let Some(done) = tasks.join_next().await {
        let (h, c, t) = done?;
        total.add(h)?;
        calls.add(c)?;
        timer.add(t)?;
    }
    Ok((
        total,
        calls,
        timer,
        cpu_seconds("/proc/thread-self/stat") - cpu_before,
    ))
}

/// Lets the callers run for `seconds`, then stops them; returns the elapsed time
/// and the CPU samples before and after.
/// Redis's `INFO commandstats` at the start and the end of a measured window.
type WindowStats = (CommandStats, CommandStats);

async fn measure(
    stack: &TestStack,
    seconds: u64,
    stop: &AtomicBool,
) -> anyhow::Result<(f64, CpuSample, CpuSample, WindowStats)> {
    let started = Instant::now();
    let before = CpuSample::take(stack, None, None).await?;
    let stats = CommandStats::take(stack).await?;
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let after = CpuSample::take(stack, None, None).await?;
    let now = CommandStats::take(stack).await?;
    Ok((elapsed, before, after, (stats, now)))
}

#[allow(clippy::too_many_arguments)]
async fn run(
    stack: &TestStack,
    keys: Arc<Vec<String>>,
    concurrency: usize,
    seconds: u64,
    label: &str,
    per_connection: usize,
    client_threads: usize,
    transport: Transport,
) -> anyhow::Result<()> {
    // Warm the caches (first use of each key hits PostgreSQL once).
    {
        let channel = H2Connection::connect(&stack.grpc_url()).await?;
        let mut c = Caller::Unary(BudgetAuthorizationClient::with_origin(
            channel.service,
            channel.origin,
        ));
        for (i, k) in keys.iter().enumerate() {
            pair(&mut c, k, format!("warm-{label}-{i}")).await?;
        }
    }
    // Callers share HTTP/2 connections, `per_connection` each (as a gateway's
    // workers do). They run on the service's runtime (client_threads = 0: one
    // process, shared threads), or on threads of their own, each a single-threaded
    // runtime: like a separate client process.
    let per_connection = per_connection.max(1);
    if client_threads == 0 {
        let (stop, errors) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let task = tokio::spawn(callers(
            stack.grpc_url(),
            keys.clone(),
            0,
            concurrency,
            concurrency,
            per_connection,
            transport,
            label.to_owned(),
            stop.clone(),
            errors.clone(),
        ));
        let (elapsed, before, after, (stats_before, stats_after)) =
            measure(stack, seconds, &stop).await?;
        let (total, calls, timer, _) = task.await??;
        report(&keys, concurrency, elapsed, &total, &calls, &errors);
        report_timer(&timer);
        let cpu = after.per_unit_since(&before, total.len());
        println!(
            "    cpu per pair: service + load generator {:.0} µs, redis {:.0} µs",
            cpu.process, cpu.redis
        );
        println!("    {}", after.machine.describe_since(&before.machine));
        println!(
            "    {}",
            stats_after.describe_since(&stats_before, total.len(), "pair")
        );
        let pairs_per_s = total.len() as f64 / elapsed;
        issue24_targets(
            concurrency,
            keys.len(),
            transport,
            pairs_per_s,
            &calls,
            cpu.redis,
            None,
        );
        return Ok(());
    }
    let threads = client_threads.clamp(1, concurrency.max(1));
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    let mut first = 0;
    for t in 0..threads {
        let count = concurrency / threads + usize::from(t < concurrency % threads);
        let (url, keys, stop, errors, label) = (
            stack.grpc_url(),
            keys.clone(),
            stop.clone(),
            errors.clone(),
            label.to_owned(),
        );
        let start = first;
        handles.push(std::thread::spawn(move || -> anyhow::Result<Histograms> {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(callers(
                    url,
                    keys,
                    start,
                    count,
                    concurrency,
                    per_connection,
                    transport,
                    label,
                    stop,
                    errors,
                ))
        }));
        first += count;
    }
    let (elapsed, before, after, (stats_before, stats_after)) =
        measure(stack, seconds, &stop).await?;
    let (mut total, mut calls, mut timer, mut client_cpu) =
        (histogram(), histogram(), histogram(), 0.0);
    for h in handles {
        let (p, c, t, cpu) = tokio::task::spawn_blocking(move || h.join())
            .await?
            .map_err(|_| anyhow::anyhow!("a load thread panicked"))??;
        total.add(p)?;
        calls.add(c)?;
        timer.add(t)?;
        client_cpu += cpu;
    }
    report(&keys, concurrency, elapsed, &total, &calls, &errors);
    report_timer(&timer);
    // CPU per pair: where the 2 cores went (the service is the process minus the
    // load threads; the load threads' time runs a little past the window).
    let cpu = after.per_unit_since(&before, total.len());
    let client = client_cpu * 1e6 / total.len().max(1) as f64;
    let service = (cpu.process - client).max(0.0);
    println!(
        "    cpu per pair: service {service:.0} µs, load generator {client:.0} µs, redis {:.0} µs",
        cpu.redis
    );
    println!("    {}", after.machine.describe_since(&before.machine));
    println!(
        "    {}",
        stats_after.describe_since(&stats_before, total.len(), "pair")
    );
    let pairs_per_s = total.len() as f64 / elapsed;
    issue24_targets(
        concurrency,
        keys.len(),
        transport,
        pairs_per_s,
        &calls,
        cpu.redis,
        Some(service),
    );
    Ok(())
}

/// The Redis-only reference with 16 calls in flight per connection (issue 24's
/// targets are stated against it), when measured.
static PIPELINED: std::sync::OnceLock<caracal_tests::redis_ceiling::Ceiling> =
    std::sync::OnceLock::new();

/// Issue 24's targets for the c=64 / 10,000-agent runs, each with its figure:
/// `redis_us` Redis CPU per pair, `service_us` the service's own CPU per pair when
/// the load generator runs on threads of its own (`--client-threads`).
#[allow(clippy::too_many_arguments)]
fn issue24_targets(
    concurrency: usize,
    agents: usize,
    transport: Transport,
    pairs_per_s: f64,
    calls: &Histogram<u64>,
    redis_us: f64,
    service_us: Option<f64>,
) {
    let p99_ms = calls.value_at_quantile(0.99) as f64 / 1000.0;
    if RATE.get().is_some() {
        // Target 4, open loop (at half the measured maximum: the caller picks --rate).
        println!(
            "    issue 24 target 4 (open loop): p99 per call {p99_ms:.3} ms <= 1.5 ms: {}",
            met(p99_ms <= 1.5)
        );
        return;
    }
    let headline = concurrency == 64 && agents >= 10_000;
    if headline {
        // Target 6: the cluster's figure against the standalone run made first in
        // this invocation (same transport, same load).
        let mut standalone = STANDALONE.lock().unwrap_or_else(|e| e.into_inner());
        match cluster_ack() {
            None => standalone.push((transport, pairs_per_s)),
            Some(ack) => {
                if let Some((_, alone)) = standalone.iter().find(|(t, _)| *t == transport) {
                    println!(
                        "    issue 24 target 6 (cluster, minReplicasAck {ack}): {pairs_per_s:.0} pairs/s >= 0.8 x the standalone run's {alone:.0}: {} ({:.2})",
                        met(pairs_per_s >= 0.8 * alone),
                        pairs_per_s / alone
                    );
                }
            }
        }
    }
    let Some(reference) = PIPELINED.get() else {
        return;
    };
    if !headline || cluster_ack().is_some() {
        return;
    }
    let ref_cpu = reference.redis_cpu_us_per_pair();
    let ref_pairs = reference.pairs_per_s();
    // The reference's own p99 per call: the slower of its two scripts.
    let ref_p99 = reference.reserve.p99_ms.max(reference.settle.p99_ms);
    println!(
        "    issue 24 target 1: Redis CPU per pair {redis_us:.0} µs <= 0.5 x the pipelined reference's {ref_cpu:.1} µs: {}",
        met(redis_us <= 0.5 * ref_cpu)
    );
    println!(
        "    issue 24 target 2: {pairs_per_s:.0} pairs/s >= 1.0 x the pipelined reference's {ref_pairs:.0}: {}",
        met(pairs_per_s >= ref_pairs)
    );
    match service_us {
        Some(service) => println!(
            "    issue 24 target 3: service + Redis CPU per pair {:.0} µs <= 60 µs: {}",
            service + redis_us,
            met(service + redis_us <= 60.0)
        ),
        None => println!(
            "    issue 24 target 3: not measured here (the load generator shares the process: run with --client-threads 1)"
        ),
    }
    println!(
        "    issue 24 target 4 (closed loop): p99 per call {p99_ms:.3} ms <= 1.3 x the reference's {ref_p99:.3} ms: {}",
        met(p99_ms <= 1.3 * ref_p99)
    );
}

/// The open loop's timer lateness (pairs whose caller was idle at their time; not
/// counted in their latency): what the load generator's 1 ms timer adds.
fn report_timer(timer: &Histogram<u64>) {
    if RATE.get().is_none() || timer.is_empty() {
        return;
    }
    let q = |p: f64| timer.value_at_quantile(p) as f64 / 1000.0;
    println!(
        "    timer lateness (not counted; {} of the pairs found their caller idle): p50={:.3}ms p99={:.3}ms",
        timer.len(),
        q(0.5),
        q(0.99)
    );
}

/// `--rate`: pairs/s offered in all (open loop), when set.
static RATE: std::sync::OnceLock<f64> = std::sync::OnceLock::new();

/// Pairs/s of the c=64 / 10,000-agent standalone runs, per transport (target 6).
static STANDALONE: std::sync::Mutex<Vec<(Transport, f64)>> = std::sync::Mutex::new(Vec::new());

/// The cluster's `minReplicasAck` while the runs are on the cluster; -1 on the
/// standalone Redis.
static CLUSTER_ACK: std::sync::atomic::AtomicI16 = std::sync::atomic::AtomicI16::new(-1);

fn cluster_ack() -> Option<i16> {
    Some(CLUSTER_ACK.load(Ordering::Relaxed)).filter(|ack| *ack >= 0)
}

/// Pairs/s of the Redis-only ceiling measured at the start (standalone runs).
static CEILING: std::sync::OnceLock<f64> = std::sync::OnceLock::new();

/// The port of a `redis://host:port` URL (6379 when absent).
fn redis_port(url: &str) -> u16 {
    url.rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .unwrap_or(6379)
}

fn report(
    keys: &[String],
    concurrency: usize,
    elapsed: f64,
    total: &Histogram<u64>,
    calls: &Histogram<u64>,
    errors: &AtomicU64,
) {
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "agents={:>6} concurrency={:>3}  pairs/s={:>8.0}  per call: p50={:>6.3}ms p90={:>6.3}ms p99={:>6.3}ms p99.9={:>6.3}ms  per pair: p50={:>6.3}ms p99={:>6.3}ms p99.9={:>6.3}ms  pairs={} errors={}",
        keys.len(),
        concurrency,
        total.len() as f64 / elapsed,
        ms(calls, 0.5),
        ms(calls, 0.9),
        ms(calls, 0.99),
        ms(calls, 0.999),
        ms(total, 0.5),
        ms(total, 0.99),
        ms(total, 0.999),
        total.len(),
        errors.load(Ordering::Relaxed)
    );
    if let Some(ceiling) = CEILING.get() {
        let ratio = total.len() as f64 / elapsed / ceiling;
        println!("    = {ratio:.2} of the Redis-only ceiling ({ceiling:.0} pairs/s)");
        // Issue 9's targets, stated for the c=64 / 10,000-agent run.
        if concurrency == 64 && keys.len() >= 10_000 {
            println!(
                "    targets: >= 0.75 of the ceiling {}, p99 per call <= 2 ms {}",
                met(ratio >= 0.75),
                met(ms(calls, 0.99) <= 2.0)
            );
        }
    }
}

async fn delete_outbox(stack: &TestStack) -> anyhow::Result<()> {
    let keys =
        caracal_authz::budget::KeySpace::new(stack.key_prefix.clone(), stack.redis.partitions);
    let deletes = (0..keys.partitions())
        .map(|p| redis::cmd("DEL").arg(keys.outbox(p)).clone())
        .collect();
    caracal_service_kit::redis::query_each(&stack.redis_conn()?, deletes).await?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = <Args as clap::Parser>::parse();
    if let Some(rate) = args.rate {
        anyhow::ensure!(
            rate.is_finite() && rate > 0.0,
            "--rate must be a positive number of pairs/s"
        );
        let _ = RATE.set(rate);
        println!("open loop: {rate} pairs/s offered, timed from when each pair was due");
    }
    // As the service binary builds it from `server.workerThreads`.
    let runtime = caracal_authz::server::runtime(args.workers)?;
    let Some(ratio) = args.trace_sampling else {
        println!("tracing: off");
        return runtime.block_on(bench(args));
    };
    let port = caracal_tests::envoy::free_port()?;
    let sink_binary = std::env::current_exe()?.with_file_name("otlp-sink");
    let mut sink = std::process::Command::new(&sink_binary)
        .arg(port.to_string())
        .spawn()
        .with_context(|| format!("starting {}", sink_binary.display()))?;
    let config = caracal_service_kit::telemetry::TracingConfig {
        enabled: true,
        endpoint: format!("http://127.0.0.1:{port}"),
        sampling_ratio: ratio,
        service_name: "authz-bench".to_owned(),
        ..Default::default()
    };
    config.validate()?;
    println!("tracing: on, samplingRatio {ratio}, exporting to otlp-sink on 127.0.0.1:{port}");
    let result = caracal_service_kit::telemetry::block_on(
        &runtime,
        false,
        &config,
        "authz-bench",
        bench(args),
    );
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &sink.id().to_string()])
        .status();
    let _ = sink.wait();
    result
}

/// The Redis-only ceiling at 64 connections, `pipeline` calls in flight on each.
async fn ceiling(
    port: u16,
    requests: u64,
    pipeline: u16,
) -> anyhow::Result<caracal_tests::redis_ceiling::Ceiling> {
    tokio::task::spawn_blocking(move || {
        caracal_tests::redis_ceiling::measure(port, requests, 64, pipeline)
    })
    .await?
}

async fn bench(args: Args) -> anyhow::Result<()> {
    println!(
        "caracal authz bench: Authorize+Settle pairs over gRPC, {} s per run, 127.0.0.1, {} cores, {} calendar policies per agent (counters per decision)",
        args.seconds,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        args.policies
    );
    if !args.redis_cluster {
        println!("redis: standalone");
        if args.ceiling_requests > 0 {
            let port = redis_port(&caracal_tests::redis_url());
            let c = ceiling(port, args.ceiling_requests, 1).await?;
            println!(
                "redis-only ceiling (redis-benchmark, EVALSHA of the same shape, 64 connections): reserve {:.0}/s, settle {:.0}/s = {:.0} pairs/s",
                c.reserve.per_s,
                c.settle.per_s,
                c.pairs_per_s()
            );
            // What Redis alone gives per call at this concurrency: the floor under
            // the service's p99 at c=64 (the service cannot answer before Redis does).
            println!(
                "    its own latency per call at 64 connections: reserve p50 {:.3} ms p99 {:.3} ms, settle p50 {:.3} ms p99 {:.3} ms",
                c.reserve.p50_ms, c.reserve.p99_ms, c.settle.p50_ms, c.settle.p99_ms
            );
            let _ = CEILING.set(c.pairs_per_s());
            // Issue 24's reference: the same scripts with 16 calls in flight per
            // connection (what one script call per decision allows at best).
            let p = ceiling(port, args.ceiling_requests, 16).await?;
            println!(
                "pipelined reference (the same, -P 16): reserve {:.0}/s, settle {:.0}/s = {:.0} pairs/s; p99 per call {:.3} / {:.3} ms; Redis CPU per pair {:.1} µs (-P 1: {:.1} µs)",
                p.reserve.per_s,
                p.settle.per_s,
                p.pairs_per_s(),
                p.reserve.p99_ms,
                p.settle.p99_ms,
                p.redis_cpu_us_per_pair(),
                c.redis_cpu_us_per_pair()
            );
            let _ = PIPELINED.set(p);
        }
        return bench_on(&args, None).await;
    }
    // Target 6 compares the cluster with the standalone Redis in the same run.
    println!("redis: standalone (for issue 24 target 6)");
    bench_on(&args, None).await?;
    let seeds = caracal_tests::redis_cluster::ensure_shared().await?;
    for ack in &args.replica_ack {
        println!(
            "redis: cluster of 3 primaries + 3 replicas ({}), minReplicasAck={ack}",
            seeds.join(" ")
        );
        bench_on(&args, Some((seeds.clone(), *ack))).await?;
    }
    Ok(())
}

/// One set of runs on a fresh stack: standalone Redis, or the cluster at `seeds`
/// with `minReplicasAck` = the given value.
async fn bench_on(args: &Args, cluster: Option<(Vec<String>, u8)>) -> anyhow::Result<()> {
    CLUSTER_ACK.store(
        cluster.as_ref().map_or(-1, |(_, ack)| i16::from(*ack)),
        Ordering::Relaxed,
    );
    let kafka = args.kafka.clone();
    let redis_connections = args.redis_connections;
    let group_commit = args.group_commit;
    let reconcile_interval = args.reconcile_interval.unwrap_or(if args.rate.is_some() {
        caracal_authz::config::ReconcileConfig::default().monitor_interval
    } else {
        0
    });
    let stack = TestStack::start_with(move |c| {
        c.reconcile.monitor_interval = reconcile_interval;
        if let Some(calls) = group_commit {
            c.redis.group_commit_max_calls = calls;
        }
        c.database.db_pool_size = 4;
        c.database.db_max_overflow = 4;
        c.server.max_concurrent_requests = 10_000;
        c.redis.connections = redis_connections;
        if let Some((seeds, ack)) = cluster {
            c.redis.mode = caracal_authz::config::RedisMode::Cluster;
            c.redis.nodes = seeds;
            c.redis.partitions = 16;
            c.redis.min_replicas_ack = Some(ack);
        }
        if let Some(brokers) = kafka {
            c.budget.relay_enabled = true;
            c.kafka.brokers = brokers;
        }
    })
    .await?;
    println!(
        "redis.groupCommitMaxCalls={} reconcile.monitorInterval={}",
        stack.redis.group_commit_max_calls, reconcile_interval
    );
    println!(
        "redis.connections={} minReplicasAck={}",
        stack.redis.hot_path_connections(),
        stack.redis.replicas_ack()
    );
    for (ai, agents) in args.agents.iter().enumerate() {
        let keys = Arc::new(seed_agents(&stack, *agents, args.policies, &ai.to_string()).await?);
        for transport in &args.transport {
            println!("transport: {transport:?}");
            for c in &args.concurrency {
                run(
                    &stack,
                    keys.clone(),
                    *c,
                    args.seconds,
                    &format!("{ai}-{c}-{transport:?}"),
                    args.per_connection,
                    args.client_threads,
                    *transport,
                )
                .await?;
                if args.kafka.is_none() {
                    delete_outbox(&stack).await?;
                }
            }
        }
    }
    stack.stop().await?;
    Ok(())
}
