//! Ledger-writer ingest benchmark: a backlog of charge events in a real tansu broker,
//! read once by a bare Kafka consumer (tansu's raw consume rate: fetch and count,
//! nothing else) and then by the real ledger-writer into a fresh PostgreSQL database,
//! both in the same run; prints both rates and their ratio.
//!
//!   cargo run --release -p caracal-tests --bin ledger-bench -- --events 1000000
//!
//! Targets (issue 8): >= 30,000 events/s and >= 0.6 of the raw consume rate.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use caracal_consumers::{config::ConsumerConfig, ledger};
use caracal_proto::v1::{ChargeEvent, TokenUsage};
use caracal_tests::{
    charges::{charged, numbered_charge, produce_charges, usd, ChargeMessage, METERING},
    kafka::{create_topics, Tansu},
    TestDb,
};
use clap::Parser;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use rdkafka::{
    consumer::{BaseConsumer, Consumer},
    producer::FutureProducer,
    ClientConfig, Message, Offset, TopicPartitionList,
};
use uuid::Uuid;

#[derive(Parser, Debug)]
#[command(
    about = "Ledger-writer ingest rate from a tansu backlog, next to tansu's raw consume rate"
)]
struct Args {
    /// Charge events in the backlog.
    #[arg(long, default_value_t = 1_000_000)]
    events: usize,
    /// Partitions of the metering topic.
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    /// The ledger-writer's batch size (messages per transaction).
    #[arg(long, default_value_t = 5000)]
    batch_size: usize,
    /// tansu storage engine (`memory://tansu/` or `sqlite://tansu.db`).
    #[arg(long, default_value = "memory://tansu/")]
    storage: String,
    /// Ledger-writer replicas sharing the partitions (`assignIndex` / `assignReplicas`),
    /// in this process: each writes its own batches on its own PostgreSQL connection.
    #[arg(long, default_value_t = 1)]
    writers: u32,
    /// Distinct agents (root = agent) the events spread over.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// The Merkle sequencer beside the writer (issue 26): `both` ingests the backlog
    /// twice, into two fresh databases, without it and then with it; `on` / `off` once.
    #[arg(long, default_value = "both", value_parser = ["both", "on", "off"])]
    merkle: String,
}

/// A backlog event: the tests' numbered charge, with a bench-sized usage, a
/// reservation above the charge and a price version of its own.
fn event(run: &str, i: usize, agent: &Uuid) -> ChargeEvent {
    let base = numbered_charge(run, i as u64, agent, agent);
    ChargeEvent {
        reserved: usd(charged(&base) + 100),
        usage: Some(TokenUsage {
            input_tokens: 120,
            output_tokens: 340,
            cached_input_tokens: 0,
        }),
        price_version: 3,
        policy_ids: vec![format!("policy-{agent}")],
        reserved_at: Some(prost_types::Timestamp {
            seconds: chrono::Utc::now().timestamp() - 1,
            nanos: 0,
        }),
        ..base
    }
}

async fn fill(brokers: &str, args: &Args) -> anyhow::Result<i64> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .set("batch.size", "4000000")
        .set("queue.buffering.max.messages", "2000000")
        .set("queue.buffering.max.kbytes", "2097152")
        .create()?;
    let run = Uuid::new_v4().simple().to_string();
    let agents: Vec<Uuid> = (0..args.agents.max(1)).map(|_| Uuid::new_v4()).collect();
    let mut sum = 0i64;
    let started = Instant::now();
    for chunk_start in (0..args.events).step_by(50_000) {
        let end = (chunk_start + 50_000).min(args.events);
        let msgs: Vec<ChargeMessage> = (chunk_start..end)
            .map(|i| {
                let ev = event(&run, i, &agents[i % agents.len()]);
                sum += charged(&ev);
                ChargeMessage::event(&ev)
            })
            .collect();
        produce_charges(&producer, &msgs).await?;
    }
    eprintln!(
        "backlog: {} events produced in {:.1} s",
        args.events,
        started.elapsed().as_secs_f64()
    );
    Ok(sum)
}

/// Reads every partition from the start with a bare consumer until `events`
/// messages arrived; returns the elapsed time.
fn raw_consume(brokers: &str, partitions: i32, events: usize) -> anyhow::Result<Duration> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("raw-{}", Uuid::new_v4().simple()))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "100")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(METERING, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(1800);
    let (mut n, mut bytes) = (0usize, 0usize);
    while n < events {
        if Instant::now() > deadline {
            bail!("raw consume: only {n} of {events} messages in 30 min");
        }
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => {
                n += 1;
                bytes += m.payload().map_or(0, <[u8]>::len);
            }
            Some(Err(e)) => eprintln!("raw consume: {e}"),
            None => {}
        }
    }
    let elapsed = started.elapsed();
    eprintln!("raw consume: {n} messages, {bytes} payload bytes");
    Ok(elapsed)
}

#[derive(diesel::QueryableByName)]
struct Totals {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    micros: i64,
}

async fn ledger_totals(conn: &mut AsyncPgConnection) -> anyhow::Result<Totals> {
    Ok(diesel::sql_query(
        "SELECT count(*) AS n, coalesce(sum(charged_micros), 0)::int8 AS micros FROM ledger_events",
    )
    .get_result(conn)
    .await?)
}

/// `caracal_consumer_events_processed_total` from the writer's `/metrics`.
async fn events_processed(addr: std::net::SocketAddr) -> anyhow::Result<u64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .await?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await?;
    Ok(processed_in(&body))
}

/// The sum of `caracal_consumer_events_processed_total` in a metrics text.
fn processed_in(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("caracal_consumer_events_processed_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let tansu = Tansu::start_with_storage(&args.storage).await?;
    let brokers = tansu.brokers();
    create_topics(&brokers, &[METERING, "caracal.dlq"], args.partitions).await?;
    let produced_sum = fill(&brokers, &args).await?;

    let raw = {
        let b = brokers.clone();
        let (p, n) = (args.partitions, args.events);
        tokio::task::spawn_blocking(move || raw_consume(&b, p, n)).await??
    };
    let modes: &[bool] = match args.merkle.as_str() {
        "on" => &[true],
        "off" => &[false],
        _ => &[false, true],
    };
    let mut runs = Vec::new();
    for &merkle in modes {
        runs.push((merkle, ingest(&args, &brokers, produced_sum, merkle).await?));
    }

    let rate = |d: Duration| args.events as f64 / d.as_secs_f64().max(1e-9);
    let raw_rate = rate(raw);
    println!(
        "events={} partitions={} batch={} writers={} storage={}",
        args.events, args.partitions, args.batch_size, args.writers, args.storage
    );
    println!(
        "tansu raw consume:     {:>9.0} events/s ({:.1} s)",
        raw_rate,
        raw.as_secs_f64()
    );
    let mut without = None;
    for (merkle, run) in &runs {
        let ingest_rate = rate(run.ingest);
        let ratio = ingest_rate / raw_rate;
        println!(
            "ledger-writer ingest, Merkle sequencer {}: {:>9.0} events/s ({:.1} s, every row checked: count and sum exact)",
            if *merkle { "on " } else { "off" },
            ingest_rate,
            run.ingest.as_secs_f64()
        );
        println!(
            "  ratio ingest/raw:    {ratio:>9.2}   targets: >= 30000 events/s {} , >= 0.60 of raw {}",
            if ingest_rate >= 30_000.0 { "MET" } else { "NOT MET" },
            if ratio >= 0.6 { "MET" } else { "NOT MET" }
        );
        if let Some(all) = run.sequenced {
            println!(
                "  every row a leaf under a signed checkpoint after {:.1} s: {:>9.0} leaves/s through the pipeline (target >= 50000: {}); verify-range of all: {:.1} s",
                all.as_secs_f64(),
                rate(all),
                if rate(all) >= 50_000.0 { "MET" } else { "NOT MET" },
                run.verified.map_or(0.0, |d| d.as_secs_f64())
            );
        }
        match (merkle, without) {
            (false, _) => without = Some(ingest_rate),
            (true, Some(base)) => println!(
                "  ingest with the sequencer / without: {:.2} (target >= 0.80: {})",
                ingest_rate / base,
                if ingest_rate / base >= 0.8 {
                    "MET"
                } else {
                    "NOT MET"
                }
            ),
            (true, None) => {}
        }
    }
    Ok(())
}

/// One ingest run.
struct Run {
    ingest: Duration,
    /// With the sequencer: until every row had its leaf under a checkpoint.
    sequenced: Option<Duration>,
    /// With the sequencer: verify-range over every event.
    verified: Option<Duration>,
}

/// The backlog into a fresh database by the real ledger-writer(s); checks count
/// and sum; with `merkle`, also waits until the log holds every row under a
/// checkpoint, and verifies it all.
async fn ingest(
    args: &Args,
    brokers: &str,
    produced_sum: i64,
    merkle: bool,
) -> anyhow::Result<Run> {
    let db = TestDb::create("ledgerbench").await?;
    caracal_service_kit::db::run_migrations(&db.url).await?;
    let mut config = ConsumerConfig::default();
    config.database.url = db.url.clone();
    config.database.db_pool_size = 2;
    config.kafka.brokers = brokers.to_owned();
    config.consumer.http_addr = "127.0.0.1:0".parse()?;
    config.consumer.group_id = format!("bench-{}", Uuid::new_v4().simple());
    config.consumer.batch_size = args.batch_size;
    config.consumer.assign_all = true;
    config.consumer.assign_replicas = args.writers.max(1);
    config.ledger_writer.merkle.enabled = merkle;
    config.ledger_writer.merkle.batch_timeout_seconds = 1;
    config.ledger_writer.merkle.self_check_interval_seconds = 0;
    let mut conn = AsyncPgConnection::establish(&db.url).await?;
    // Both runs start from the same state: the WAL of the previous run (a million
    // rows, a dropped database) flushed now, not by a checkpoint in the middle of
    // the next run's timing.
    if let Err(e) = diesel::sql_query("CHECKPOINT").execute(&mut conn).await {
        eprintln!("CHECKPOINT before the run refused ({e}); the runs may not start alike");
    }
    // One process, one metrics registry: an earlier run's events are counted too.
    let before = processed_in(&caracal_service_kit::metrics::render());
    let started = Instant::now();
    let mut writers = Vec::new();
    for index in 0..args.writers.max(1) {
        let mut c = config.clone();
        c.consumer.assign_index = index;
        // Migrations were applied above; replicas would only queue on their lock.
        c.consumer.run_migrations = false;
        writers.push(ledger::start(c).await?);
    }
    let http_addr = writers
        .iter()
        .map(|w| w.http_addr)
        .next()
        .context("no writer")?;
    // Progress from the writer's own counter (a count(*) every few hundred ms would
    // take PostgreSQL CPU from the writer it measures); the rows are counted once at
    // the end.
    let deadline = started + Duration::from_secs(3600);
    loop {
        // One process, one metrics registry: the counter is every writer's sum.
        let written = events_processed(http_addr)
            .await
            .unwrap_or(0)
            .saturating_sub(before);
        if written >= args.events as u64 {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "ledger: only {written} of {} events after an hour",
                args.events
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ingest = started.elapsed();
    let (mut sequenced, mut verified) = (None, None);
    if merkle {
        loop {
            let (size, checkpointed) = caracal_merkle_log::sequencer::state(&mut conn).await?;
            if size >= args.events as u64 && checkpointed >= args.events as u64 {
                sequenced = Some(started.elapsed());
                break;
            }
            if Instant::now() > deadline {
                bail!("Merkle log: {size} leaves, checkpoint at {checkpointed}, after an hour");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let totals = ledger_totals(&mut conn).await?;
    for writer in writers {
        writer.shutdown().await.context("ledger-writer shutdown")?;
    }
    if merkle {
        use caracal_merkle_log::{keys, verify};
        let verifiers = keys::verifiers(&mut conn).await?;
        let t = Instant::now();
        let report = verify::verify(
            &mut conn,
            verify::Scope::Time {
                start: chrono::DateTime::from_timestamp(0, 0).context("epoch")?,
                end: chrono::Utc::now() + chrono::Duration::days(1),
            },
            &verifiers,
        )
        .await?;
        verified = Some(t.elapsed());
        if !report.ok() || report.events_checked != args.events as u64 {
            bail!(
                "the Merkle log does not verify ({} events checked): {:?}",
                report.events_checked,
                report.failures.as_slice().first()
            );
        }
    }
    drop(conn);
    db.drop().await?;
    if totals.n != args.events as i64 || totals.micros != produced_sum {
        bail!(
            "ledger holds {} rows / {} micros; produced {} / {}",
            totals.n,
            totals.micros,
            args.events,
            produced_sum
        );
    }
    Ok(Run {
        ingest,
        sequenced,
        verified,
    })
}
