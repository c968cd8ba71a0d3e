//! How long `caracal budget rebuild`, `snapshot create` and `snapshot restore`
//! take: agents with a daily calendar and an hourly rolling policy each, real
//! Authorize + Settle traffic, the charges in the ledger (the ledger-writer's own
//! decode + insert), the ledger padded to `--ledger-events` rows (charges of the
//! same agents and policies inside the last half hour, written by SQL: a million
//! real calls would time the hot path, not the rebuild), a real FLUSHALL on a
//! Redis of the bench's own, then the rebuild, timed; then a snapshot, another
//! FLUSHALL and the restore from it, timed; reconcile checks each.
//!
//!   cargo run --release -p caracal-tests --bin rebuild-bench -- --agents 10000 --ledger-events 1000000
//!
//! Prints each wall time and per 10,000 agents (the README's figures).

use std::time::Instant;

use anyhow::{bail, Context};
use caracal_consumers::ledger::insert_rows;
use caracal_proto::v1 as pb;
use caracal_tests::{authorize_request, gateway_client, own_redis::OwnRedis, TestStack};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "Wall time of a budget rebuild from the ledger after a Redis FLUSHALL")]
struct Args {
    /// Agents (each its own root, two policies each).
    #[arg(long, default_value_t = 10_000)]
    agents: usize,
    /// Charges per agent in the ledger.
    #[arg(long, default_value_t = 2)]
    charges: usize,
    /// Ledger rows in all (real charges, then padding up to this many).
    #[arg(long, default_value_t = 1_000_000)]
    ledger_events: usize,
    /// Concurrent admin / traffic calls while filling.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The services' phase timings (the restore's, the rebuild's) on stderr.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "warn,caracal_authz::admin=info",
        ))
        .with_writer(std::io::stderr)
        .init();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let redis = OwnRedis::start().await;
    let stack = TestStack::start_with(|c| {
        redis.configure(&mut c.redis);
        // The production default.
        c.redis.partitions = 16;
        c.database.db_pool_size = 8;
    })
    .await?;
    stack
        .set_token_price("openai", "gpt-4o", "USD", ["2.00", "8.00", "1.00"])
        .await?;

    let started = Instant::now();
    let stack = std::sync::Arc::new(stack);
    let mut keys = Vec::with_capacity(args.agents);
    let mut agents = Vec::with_capacity(args.agents);
    for chunk in (0..args.agents)
        .collect::<Vec<_>>()
        .chunks(args.concurrency.max(1))
    {
        let made = futures::future::join_all(chunk.iter().map(|i| {
            let stack = stack.clone();
            async move {
                let (agent, key) = stack.agent_with_key(&format!("rb-{i}"), None).await?;
                stack
                    .usd_policy(&agent, "100.00", "daily", "calendar", "charge")
                    .await?;
                stack
                    .usd_policy(&agent, "50.00", "hourly", "rolling", "charge")
                    .await?;
                anyhow::Ok((agent, key))
            }
        }))
        .await;
        for made in made {
            let (agent, key) = made?;
            agents.push(agent);
            keys.push(key);
        }
    }
    eprintln!(
        "{} agents, {} policies created in {:.1} s",
        args.agents,
        2 * args.agents,
        started.elapsed().as_secs_f64()
    );

    let started = Instant::now();
    let authz = gateway_client(stack.channel.clone());
    for round in 0..args.charges {
        for chunk in keys.chunks(args.concurrency.max(1)) {
            let calls = chunk.iter().enumerate().map(|(i, key)| {
                let mut authz = authz.clone();
                let id = format!("rb-{round}-{i}-{}", uuid::Uuid::new_v4().simple());
                async move {
                    let r = authz
                        .authorize(authorize_request(key, &id, 20_000))
                        .await?
                        .into_inner();
                    if r.decision != pb::Decision::Allow as i32 {
                        bail!("{id} refused: {r:?}");
                    }
                    authz
                        .settle(pb::SettleRequest {
                            reservation_id: r.reservation_id,
                            actual_cost: Some(pb::Money {
                                currency: "USD".into(),
                                micros: 12_345,
                                amount: String::new(),
                            }),
                            ..Default::default()
                        })
                        .await?;
                    anyhow::Ok(())
                }
            });
            for r in futures::future::join_all(calls).await {
                r?;
            }
        }
    }
    let rows: Vec<_> = stack
        .outbox_charges()
        .await?
        .into_iter()
        .collect::<Result<_, _>>()
        .map_err(anyhow::Error::msg)?;
    let mut conn = stack.db().await?;
    for chunk in rows.chunks(5_000) {
        insert_rows(&mut conn, chunk).await?;
    }
    eprintln!(
        "{} charges through Authorize + Settle into the ledger in {:.1} s",
        rows.len(),
        started.elapsed().as_secs_f64()
    );

    let padding = args.ledger_events.saturating_sub(rows.len());
    if padding > 0 {
        let started = Instant::now();
        pad_ledger(&mut conn, padding).await?;
        eprintln!(
            "ledger padded with {padding} charges in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    let ledger_rows = rows.len() + padding;

    let _: () = redis.cmd(&mut redis::cmd("FLUSHALL")).await;
    let mut ledger = stack.ledger();
    let started = Instant::now();
    let report = ledger
        .rebuild_budgets(pb::RebuildBudgetsRequest::default())
        .await
        .context("RebuildBudgets")?
        .into_inner();
    let took = started.elapsed();
    if report.policies as usize != 2 * args.agents {
        bail!(
            "rebuilt {} policies of {}",
            report.policies,
            2 * args.agents
        );
    }
    no_drift(&mut ledger, &agents, "the rebuild").await?;
    let per_10k = |t: std::time::Duration| t.as_secs_f64() * 10_000.0 / args.agents as f64;
    println!(
        "agents={} policies={} ledger rows={ledger_rows} partitions=16",
        args.agents, report.policies,
    );
    println!(
        "budget rebuild after FLUSHALL: {:.2} s ({} counters; server-side {} ms); {:.2} s per 10,000 agents; reconcile afterwards: no drift",
        took.as_secs_f64(),
        report.counters_total,
        report.took_ms,
        per_10k(took)
    );

    let mut snapshots = stack.snapshots();
    let started = Instant::now();
    let created = snapshots
        .create_snapshot(pb::CreateSnapshotRequest {})
        .await
        .context("CreateSnapshot")?
        .into_inner();
    let create_took = started.elapsed();
    let info = created.snapshot.unwrap_or_default();
    if info.ledger_events as usize != ledger_rows {
        bail!(
            "the snapshot holds {} ledger rows of {ledger_rows}",
            info.ledger_events
        );
    }
    let _: () = redis.cmd(&mut redis::cmd("FLUSHALL")).await;
    let started = Instant::now();
    let restored = snapshots
        .restore_snapshot(pb::RestoreSnapshotRequest {
            snapshot_id: info.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .context("RestoreSnapshot")?
        .into_inner();
    let restore_took = started.elapsed();
    let (counters, budget_ms) = restored
        .budgets
        .map_or((0, 0), |b| (b.counters_total, b.took_ms));
    no_drift(&mut ledger, &agents, "the snapshot restore").await?;
    println!(
        "snapshot create: {:.2} s ({} counters, {} bytes, {} ledger rows); {:.2} s per 10,000 agents",
        create_took.as_secs_f64(),
        info.counters,
        info.size_bytes,
        info.ledger_events,
        per_10k(create_took)
    );
    println!(
        "snapshot restore after FLUSHALL: {:.2} s ({counters} counters; the budget state {budget_ms} ms of the server's {} ms, the rest reading the snapshot, its configuration rows and the ledger after its cut); {:.2} s per 10,000 agents; reconcile afterwards: no drift",
        restore_took.as_secs_f64(),
        restored.took_ms,
        per_10k(restore_took)
    );
    drop(conn);
    if let Ok(stack) = std::sync::Arc::try_unwrap(stack) {
        stack.stop().await?;
    }
    Ok(())
}

/// Fails unless Redis and the ledger agree on every policy (reconcile covers at
/// most 10,000 policies at once: a few agents then).
async fn no_drift(
    ledger: &mut pb::ledger_service_client::LedgerServiceClient<caracal_tests::Svc>,
    agents: &[String],
    after: &str,
) -> anyhow::Result<()> {
    let scopes: Vec<String> = if 2 * agents.len() <= 10_000 {
        vec![String::new()]
    } else {
        agents
            .iter()
            .step_by((agents.len() / 5).max(1))
            .cloned()
            .collect()
    };
    for agent_id in scopes {
        let started = std::time::Instant::now();
        let check = ledger
            .reconcile(pb::ReconcileRequest {
                agent_id,
                range: None,
            })
            .await?
            .into_inner();
        // What one reconcile costs over this ledger: its ledger side reads every row
        // of the windows' time range, however few policies it covers.
        println!(
            "    reconcile of {} policies ({} windows) after {after}: {:.2} s",
            check.policies_checked,
            check.windows_checked,
            started.elapsed().as_secs_f64()
        );
        if check.policies_with_drift != 0 || check.policies_checked == 0 {
            bail!(
                "{} of {} policies drift after {after}",
                check.policies_with_drift,
                check.policies_checked
            );
        }
    }
    Ok(())
}

/// `n` more charges of 0.001 USD spread over every agent's two policies, inside
/// the last half hour (in the current hour's rolling window and, but for the
/// first half hour of a day, today's), each its own reservation, at offsets above
/// any real one.
async fn pad_ledger(conn: &mut diesel_async::AsyncPgConnection, n: usize) -> anyhow::Result<()> {
    use diesel_async::RunQueryDsl;
    const STEP: usize = 100_000;
    let mut done = 0;
    while done < n {
        let take = STEP.min(n - done);
        diesel::sql_query(format!(
            "WITH a AS ( \
                SELECT agent_id, array_agg(id::text ORDER BY id) AS pids, \
                       (row_number() OVER (ORDER BY agent_id)) - 1 AS i \
                FROM policies GROUP BY agent_id), \
             c AS (SELECT count(*) AS n FROM a), \
             g AS (SELECT {done} + s AS k FROM generate_series(1, {take}) s) \
             INSERT INTO ledger_events (event_id, kind, reservation_id, request_id, agent_id, \
                 root_agent_id, policy_ids, currency, reserved_micros, charged_micros, \
                 overshoot_micros, schema_version, occurred_at, reserved_at, kafka_topic, \
                 kafka_partition, kafka_offset) \
             SELECT 'pad-' || g.k || '/settle', 'settle', 'pad-' || g.k, 'pad-' || g.k, \
                 a.agent_id, a.agent_id, a.pids, 'USD', 1000, 1000, 0, 1, \
                 now() - make_interval(secs => (g.k % 1800)), \
                 now() - make_interval(secs => (g.k % 1800)), \
                 'caracal.metering.events', 0, 1000000000 + g.k \
             FROM g CROSS JOIN c JOIN a ON a.i = g.k % c.n"
        ))
        .execute(conn)
        .await?;
        done += take;
    }
    Ok(())
}
