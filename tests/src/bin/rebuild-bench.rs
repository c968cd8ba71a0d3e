//! How long `caracal budget rebuild` takes after Redis lost its data: agents with
//! a daily calendar and an hourly rolling policy each, real Authorize + Settle
//! traffic, the charges in the ledger (the ledger-writer's own decode + insert), a
//! real FLUSHALL on a Redis of the bench's own, then the rebuild, timed.
//!
//!   cargo run --release -p caracal-tests --bin rebuild-bench -- --agents 10000
//!
//! Prints the rebuild's wall time and per 10,000 agents (the README's figure).

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
    /// Concurrent admin / traffic calls while filling.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
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
    // Reconcile covers at most 10,000 policies at once: a few agents then.
    let scopes: Vec<String> = if 2 * args.agents <= 10_000 {
        vec![String::new()]
    } else {
        agents.iter().step_by(args.agents / 5).cloned().collect()
    };
    for agent_id in scopes {
        let check = ledger
            .reconcile(pb::ReconcileRequest {
                agent_id,
                range: None,
            })
            .await?
            .into_inner();
        if check.policies_with_drift != 0 || check.policies_checked == 0 {
            bail!(
                "{} of {} policies drift after the rebuild",
                check.policies_with_drift,
                check.policies_checked
            );
        }
    }
    println!(
        "agents={} policies={} ledger rows={} partitions=16",
        args.agents,
        report.policies,
        rows.len()
    );
    println!(
        "budget rebuild after FLUSHALL: {:.2} s ({} counters; server-side {} ms); {:.2} s per 10,000 agents; reconcile afterwards: no drift",
        took.as_secs_f64(),
        report.counters_total,
        report.took_ms,
        took.as_secs_f64() * 10_000.0 / args.agents as f64
    );
    drop(conn);
    if let Ok(stack) = std::sync::Arc::try_unwrap(stack) {
        stack.stop().await?;
    }
    Ok(())
}
