//! Merkle log benchmark (issue 26): in-memory append, sequencing + storage in
//! PostgreSQL, inclusion proofs with their reads, and verify-range, at a given
//! number of leaves (default 1,000,000). Prints each figure next to its target.
//!
//!   cargo run --release -p caracal-tests --bin merkle-bench -- --leaves 1000000
//!
//! The ledger is filled with the ledger-writer's own statement (rows + their
//! queued leaf hashes), then drained by the real sequencer with the production
//! defaults (a checkpoint every 1,000 leaves, 5,000 leaves per transaction). The
//! sequencing rate inside the full pipeline (Kafka -> writer -> sequencer) and the
//! writer's ingest rate with and without it are ledger-bench's.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use caracal_consumers::{ledger, runner::RawMessage};
use caracal_domain::merkle::{compact::CompactRange, keys::Signer, tree};
use caracal_merkle_log::{
    keys, proofs,
    sequencer::{self, Limits, Sequencer},
    tiles::TileCache,
    verify::{self, Scope},
};
use caracal_proto::v1::{ChargeEvent, TokenUsage};
use caracal_tests::{
    charges::{charged, numbered_charge, usd, METERING},
    cpu::MachineTicks,
    TestDb,
};
use clap::Parser;
use diesel_async::{AsyncConnection, AsyncPgConnection};
use prost::Message as _;
use rand::Rng as _;
use uuid::Uuid;

#[derive(Parser, Debug)]
#[command(about = "Merkle log: append, sequencing + storage, proofs and verify-range")]
struct Args {
    /// Leaves (ledger rows) in the log.
    #[arg(long, default_value_t = 1_000_000)]
    leaves: u64,
    /// Inclusion proofs timed.
    #[arg(long, default_value_t = 2000)]
    proofs: usize,
    /// Distinct agents the rows spread over.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
}

const ORIGIN: &str = "caracal.bench/ledger";

/// A bench-sized row: the ledger-bench's event shape (3 policies' worth of text).
fn row(run: &str, i: u64, agent: &Uuid) -> anyhow::Result<ledger::LedgerRow> {
    let base = numbered_charge(run, i, agent, agent);
    let ev = ChargeEvent {
        reserved: usd(charged(&base) + 100),
        usage: Some(TokenUsage {
            input_tokens: 120,
            output_tokens: 340,
            cached_input_tokens: 0,
        }),
        price_version: 3,
        policy_ids: vec![format!("policy-{agent}")],
        ..base
    };
    ledger::decode(&RawMessage {
        topic: METERING.into(),
        partition: (i % 6) as i32,
        offset: i as i64,
        key: None,
        payload: Some(ev.encode_to_vec()),
        headers: vec![],
        timestamp_ms: None,
    })
    .map_err(anyhow::Error::msg)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

async fn run(args: Args) -> anyhow::Result<()> {
    let n = args.leaves;
    let run = Uuid::new_v4().simple().to_string();
    let agents: Vec<Uuid> = (0..args.agents.max(1)).map(|_| Uuid::new_v4()).collect();
    let machine = MachineTicks::read();

    // 1. In memory: encode + hash each leaf, append.
    let sample: Vec<ledger::LedgerRow> = (0..10_000)
        .map(|i| row(&run, i, &agents[(i as usize) % agents.len()]))
        .collect::<anyhow::Result<_>>()?;
    let leaves: Vec<Vec<u8>> = sample.iter().map(|r| r.leaf().encode()).collect();
    let t = Instant::now();
    let mut range = CompactRange::new();
    for i in 0..n {
        let leaf = &leaves[(i % leaves.len() as u64) as usize];
        range.append(tree::leaf_hash(leaf), |_, _| {});
    }
    let append = t.elapsed();
    let append_rate = n as f64 / append.as_secs_f64();
    println!(
        "in-memory append (hash a {}-byte leaf + append): {:>10.0} leaves/s  (target >= 1000000: {})",
        leaves[0].len(),
        append_rate,
        met(append_rate >= 1_000_000.0)
    );

    // 2. Sequencing + storage.
    let db = TestDb::create("merklebench").await?;
    caracal_service_kit::db::run_migrations(&db.url).await?;
    let mut conn = AsyncPgConnection::establish(&db.url).await?;
    let t = Instant::now();
    let mut i = 0;
    while i < n {
        let end = (i + 5000).min(n);
        let rows: Vec<ledger::LedgerRow> = (i..end)
            .map(|k| row(&run, k, &agents[(k as usize) % agents.len()]))
            .collect::<anyhow::Result<_>>()?;
        ledger::insert_rows(&mut conn, &rows).await?;
        i = end;
    }
    eprintln!(
        "filled: {n} ledger rows + queued leaf hashes in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let signer = Signer::generate(ORIGIN)?;
    keys::register(&mut conn, &signer.verifier()).await?;
    let mut seq = Sequencer::new(
        signer,
        ORIGIN,
        Limits {
            batch_size_limit: 1000,
            batch_timeout: chrono::Duration::seconds(300),
            max_leaves_per_transaction: 5000,
        },
    );
    let t = Instant::now();
    let mut checkpoints = 0usize;
    let mut signing = Duration::ZERO;
    loop {
        let out = seq.step(&mut conn).await?;
        checkpoints += out.checkpoints.len();
        signing += out
            .signing_seconds
            .iter()
            .map(|s| Duration::from_secs_f64(*s))
            .sum::<Duration>();
        if out.leaves == 0 && !out.more {
            break;
        }
    }
    let sequencing = t.elapsed();
    let (size, checkpointed) = sequencer::state(&mut conn).await?;
    if size != n {
        bail!("the log holds {size} leaves, not {n}");
    }
    let seq_rate = n as f64 / sequencing.as_secs_f64();
    println!(
        "sequencing + storage (queue -> leaves, tiles, {checkpoints} signed checkpoints, one sequencer): {:>10.0} leaves/s ({:.1} s; signing {:.0} ms in all)  (target >= 50000: {})",
        seq_rate,
        sequencing.as_secs_f64(),
        signing.as_secs_f64() * 1000.0,
        met(seq_rate >= 50_000.0)
    );

    // 3. Inclusion proofs at this size, each with its own reads (a fresh tile
    // cache: nothing cached between proofs). Read latency on a settled database:
    // the million rows just written are flushed first, as ledger-bench does
    // before each run, so the checkpointer's write-out is not in the figures.
    diesel_async::RunQueryDsl::execute(diesel::sql_query("CHECKPOINT"), &mut conn).await?;
    let newest = caracal_merkle_log::checkpoints::get(&mut conn, Some(checkpointed)).await?;
    let root: tree::Hash = newest
        .root
        .as_slice()
        .try_into()
        .context("root is not 32 bytes")?;
    let mut rng = rand::rng();
    let mut times = Vec::with_capacity(args.proofs);
    for _ in 0..args.proofs {
        let index = rng.random_range(0..checkpointed);
        let t = Instant::now();
        let mut cache = TileCache::new();
        let path = proofs::inclusion_path(&mut conn, &mut cache, index, checkpointed).await?;
        let mut leaf_cache = TileCache::new();
        let leaf = leaf_cache
            .nodes(&mut conn, &[tree::NodeId::new(0, index)])
            .await?;
        tree::verify_inclusion(&leaf[0], index, checkpointed, &path, &root)
            .map_err(|e| anyhow::anyhow!("proof of leaf {index}: {e}"))?;
        times.push(t.elapsed());
    }
    times.sort();
    let (p50, p99) = (percentile(&times, 0.5), percentile(&times, 0.99));
    println!(
        "inclusion proof at {checkpointed} leaves (tile reads + assemble + verify): p50 {:.2} ms, p99 {:.2} ms  (target <= 5 ms: {})",
        p50.as_secs_f64() * 1000.0,
        p99.as_secs_f64() * 1000.0,
        met(p99 <= Duration::from_millis(5))
    );
    let verifiers = keys::verifiers(&mut conn).await?;
    let mut times = Vec::with_capacity(200);
    for row in sample.iter().step_by(sample.len().div_ceil(200).max(1)) {
        let t = Instant::now();
        let file = proofs::prove_event(&mut conn, &row.event_id, None, &verifiers).await?;
        file.verify(&verifiers)?;
        times.push(t.elapsed());
    }
    times.sort();
    println!(
        "prove --event-id (find the event, read its row, proof file, verify), {} events: p50 {:.2} ms, max {:.2} ms",
        times.len(),
        percentile(&times, 0.5).as_secs_f64() * 1000.0,
        times.last().copied().unwrap_or_default().as_secs_f64() * 1000.0
    );

    // 4. verify-range over every event.
    let t = Instant::now();
    let report = verify::verify(
        &mut conn,
        Scope::Time {
            start: chrono::DateTime::from_timestamp(0, 0).context("epoch")?,
            end: chrono::Utc::now() + chrono::Duration::days(1),
        },
        &verifiers,
    )
    .await?;
    let took = t.elapsed();
    if !report.ok() || report.events_checked != n {
        bail!(
            "verify-range: {} events, failures {:?}",
            report.events_checked,
            report.failures.as_slice().first()
        );
    }
    println!(
        "verify-range over {} events and {} checkpoints: {:.1} s  (target <= 30 s: {})",
        report.events_checked,
        report.checkpoints_checked,
        took.as_secs_f64(),
        met(took <= Duration::from_secs(30))
    );
    println!(
        "  verify-range phases: {}",
        report
            .phase_seconds
            .iter()
            .map(|(p, s)| format!("{p} {s:.1} s"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("{}", MachineTicks::read().describe_since(&machine));
    drop(conn);
    db.drop().await?;
    Ok(())
}

fn met(ok: bool) -> &'static str {
    if ok {
        "MET"
    } else {
        "NOT MET"
    }
}
