//! Load benchmark of the hot path: Authorize + Settle pairs over gRPC.
//!
//! Starts a real authz-service (in-process, on 127.0.0.1) on a fresh PostgreSQL
//! database and the local Redis, creates 1 and 10,000 agents with keys and a
//! generous daily policy, then for each concurrency level drives pairs for a fixed
//! time and prints pairs/s and p50/p99/p99.9 latency of a whole pair.
//!
//!   cargo run --release -p caracal-tests --bin authz-bench -- --seconds 10
//!
//! Flags: --seconds N (per run, default 10), --concurrency 1,16,64,
//! --agents 1,10000, --kafka BROKERS (relay events to Kafka during the run;
//! default: events stay in the Redis outbox, which the bench deletes afterwards).

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use caracal_proto::v1::{self as pb, budget_authorization_client::BudgetAuthorizationClient};
use caracal_tests::TestStack;
use hdrhistogram::Histogram;
use tonic::transport::Channel;

struct Args {
    seconds: u64,
    concurrency: Vec<usize>,
    agents: Vec<usize>,
    kafka: Option<String>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        seconds: 10,
        concurrency: vec![1, 16, 64],
        agents: vec![1, 10_000],
        kafka: None,
    };
    let mut it = std::env::args().skip(1);
    let list = |v: Option<String>| -> anyhow::Result<Vec<usize>> {
        v.context("missing value")?
            .split(',')
            .map(|x| x.trim().parse().context("not a number"))
            .collect()
    };
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--seconds" => args.seconds = it.next().context("--seconds N")?.parse()?,
            "--concurrency" => args.concurrency = list(it.next())?,
            "--agents" => args.agents = list(it.next())?,
            "--kafka" => args.kafka = Some(it.next().context("--kafka BROKERS")?),
            "--bench" => {} // passed by `cargo bench`
            other => anyhow::bail!("unknown flag {other}"),
        }
    }
    Ok(args)
}

/// Creates `n` agents, each with a key and a $1,000,000 daily policy, with bulk SQL
/// (the admin API would take minutes for 10,000); returns their keys.
async fn seed_agents(stack: &TestStack, n: usize, tag: &str) -> anyhow::Result<Vec<String>> {
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
            policies.push(format!(
                "('{}', '{agent}', 1000000000000, 'USD', 'daily', 'calendar')",
                uuid::Uuid::now_v7()
            ));
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

async fn pair(
    client: &mut BudgetAuthorizationClient<Channel>,
    key: &str,
    request_id: String,
) -> anyhow::Result<()> {
    let r = client
        .authorize(caracal_tests::authorize_request(key, &request_id, 5_000))
        .await?
        .into_inner();
    anyhow::ensure!(
        r.decision == pb::Decision::Allow as i32,
        "denied: {}",
        r.message
    );
    client
        .settle(pb::SettleRequest {
            reservation_id: r.reservation_id,
            actual_cost: Some(pb::Money {
                currency: "USD".into(),
                micros: 4_000,
                amount: String::new(),
            }),
            ..Default::default()
        })
        .await?;
    Ok(())
}

async fn run(
    stack: &TestStack,
    keys: Arc<Vec<String>>,
    concurrency: usize,
    seconds: u64,
    label: &str,
) -> anyhow::Result<()> {
    // One HTTP/2 connection per 16 workers, as a gateway fleet would spread them.
    let mut channels = Vec::new();
    for _ in 0..concurrency.div_ceil(16) {
        channels.push(Channel::from_shared(stack.grpc_url())?.connect().await?);
    }
    // Warm the caches (first use of each key hits PostgreSQL once).
    {
        let mut c = BudgetAuthorizationClient::new(channels[0].clone());
        for (i, k) in keys.iter().enumerate() {
            pair(&mut c, k, format!("warm-{label}-{i}")).await?;
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let mut client = BudgetAuthorizationClient::new(channels[w / 16].clone());
        let (keys, stop, errors, label) =
            (keys.clone(), stop.clone(), errors.clone(), label.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
                .unwrap_or_else(|_| Histogram::new(3).unwrap());
            let mut i: u64 = 0;
            while !stop.load(Ordering::Relaxed) {
                let key = &keys[(w + i as usize * concurrency) % keys.len()];
                let t = Instant::now();
                match pair(&mut client, key, format!("b-{label}-{w}-{i}")).await {
                    Ok(()) => {
                        let _ = hist.record(t.elapsed().as_micros() as u64);
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                i += 1;
            }
            hist
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = Histogram::<u64>::new(3)?;
    for t in tasks {
        total.add(t.await?)?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "agents={:>6} concurrency={:>3}  pairs/s={:>8.0}  p50={:>7.3}ms  p99={:>7.3}ms  p99.9={:>7.3}ms  pairs={} errors={}",
        keys.len(),
        concurrency,
        total.len() as f64 / elapsed,
        total.value_at_quantile(0.5) as f64 / 1000.0,
        total.value_at_quantile(0.99) as f64 / 1000.0,
        total.value_at_quantile(0.999) as f64 / 1000.0,
        total.len(),
        errors.load(Ordering::Relaxed)
    );
    Ok(())
}

async fn delete_outbox(stack: &TestStack) -> anyhow::Result<()> {
    let client = redis::Client::open(stack.redis_url.as_str())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    for p in 0..4 {
        let _: () = redis::cmd("DEL")
            .arg(format!("{}:{{p{p}}}:outbox", stack.key_prefix))
            .query_async(&mut conn)
            .await?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let kafka = args.kafka.clone();
    let stack = TestStack::start_with(move |c| {
        c.database.db_pool_size = 4;
        c.database.db_max_overflow = 4;
        c.server.max_concurrent_requests = 10_000;
        if let Some(brokers) = kafka {
            c.budget.relay_enabled = true;
            c.kafka.brokers = brokers;
        }
    })
    .await?;
    println!(
        "caracal authz bench: Authorize+Settle pairs over gRPC, {} s per run, 127.0.0.1, {} cores",
        args.seconds,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    for (ai, agents) in args.agents.iter().enumerate() {
        let keys = Arc::new(seed_agents(&stack, *agents, &ai.to_string()).await?);
        for c in &args.concurrency {
            run(&stack, keys.clone(), *c, args.seconds, &format!("{ai}-{c}")).await?;
            if args.kafka.is_none() {
                delete_outbox(&stack).await?;
            }
        }
    }
    stack.stop().await?;
    Ok(())
}
