//! `caracal replay start|status|validate`: a time range of the metering topic read
//! again into the ledger (`caracal_consumers::replay`), with the ledger-writer's
//! database credentials and the Kafka settings of the consumers (`CARACAL_KAFKA_*`).
//!
//! - `start` writes what the ledger lacks (idempotent: a second run writes nothing)
//!   and records the run in `ledger_replays` with its progress.
//! - `status` lists the recent runs.
//! - `validate` reads the same range and counts the events the ledger does not
//!   hold; exit code 3 when some are missing.

use std::{collections::HashMap, io::Write, time::Duration};

use anyhow::{bail, Context, Result};
use caracal_consumers::replay::{self, Progress, Source};
use caracal_service_kit::{
    kafka::KafkaConfig,
    snapshot::{Snapshot, SnapshotStore},
};
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use diesel::sql_types::{BigInt, Nullable, Text, Timestamptz};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use serde_json::json;

use crate::output::{self, csv_line, OutputFormat, Table};

#[derive(Debug, Args)]
pub struct ReplayArgs {
    #[command(subcommand)]
    pub command: ReplayCmd,
}

/// The range and where to read it.
#[derive(Debug, Args)]
pub struct RangeArgs {
    /// First event time included (RFC 3339 or a UTC date).
    #[arg(long, value_name = "TIME", value_parser = crate::args::time_or_date)]
    from_timestamp: Option<DateTime<Utc>>,
    /// First event time excluded (default: the topic's end when the run starts).
    #[arg(long = "to", value_name = "TIME", value_parser = crate::args::time_or_date)]
    to: Option<DateTime<Utc>>,
    /// Everything after a snapshot's point: per partition, from the first offset
    /// whose ledger row the snapshot did not hold.
    #[arg(long, value_name = "ID", conflicts_with_all = ["from_timestamp", "to"])]
    from_snapshot: Option<String>,
    /// Where the snapshots are kept when `snapshots.store` is `directory` (default:
    /// the database's budget_snapshots table).
    #[arg(long, value_name = "DIR", env = "CARACAL_SNAPSHOT_DIR")]
    snapshot_dir: Option<std::path::PathBuf>,
    /// The consumer whose writes to replay (only `ledger-writer` replays today).
    #[arg(long, default_value = "ledger-writer")]
    group: String,
    /// Read `<region>.<metering topic>`: another region's topic as MirrorMaker 2
    /// mirrors it.
    #[arg(long, value_name = "REGION")]
    from_region: Option<String>,
    /// Kafka bootstrap servers (default `CARACAL_KAFKA_BROKERS`, as the consumers).
    #[arg(long, value_name = "HOST:PORT,...")]
    brokers: Option<String>,
    /// Longest wait for the brokers (metadata, offsets, the next message).
    #[arg(long, value_name = "S", default_value_t = 30)]
    timeout_seconds: u64,
    /// PostgreSQL URL of the ledger, as the ledger-writer's role (it inserts).
    #[arg(
        long,
        env = "CARACAL_DATABASE_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    database_url: String,
}

#[derive(Debug, Subcommand)]
pub enum ReplayCmd {
    /// Re-feed the metering events of a time range into the ledger (idempotent).
    Start(RangeArgs),
    /// Recent replays: range, progress, outcome.
    Status {
        #[arg(
            long,
            env = "CARACAL_DATABASE_URL",
            hide_env_values = true,
            value_name = "URL"
        )]
        database_url: String,
        /// How many of the latest runs.
        #[arg(long, default_value_t = 20)]
        limit: i64,
    },
    /// Check that the ledger holds every event of a time range; exit code 3 when not.
    Validate(RangeArgs),
}

/// `replay validate` found events the ledger lacks.
#[derive(Debug)]
pub struct EventsMissing(pub u64);

impl std::fmt::Display for EventsMissing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} event(s) of the range are not in the ledger: `caracal replay start` with the \
             same range writes them",
            self.0
        )
    }
}

impl std::error::Error for EventsMissing {}

async fn source(args: &RangeArgs) -> Result<Source> {
    if args.group != "ledger-writer" {
        bail!(
            "--group {}: only the ledger-writer's writes replay today",
            args.group
        );
    }
    let mut kafka = KafkaConfig::default();
    kafka
        .apply_env(&caracal_service_kit::config::process_env())
        .context("Kafka settings (CARACAL_KAFKA_*)")?;
    if let Some(b) = &args.brokers {
        kafka.brokers.clone_from(b);
    }
    let topic = replay::topic_of(&kafka.metering_topic, args.from_region.as_deref());
    let timeout = Duration::from_secs(args.timeout_seconds.max(1));
    if let Some(id) = &args.from_snapshot {
        let snapshot = load_snapshot(args, id).await?;
        let cut: HashMap<i32, i64> = snapshot
            .ledger_cut
            .iter()
            .filter(|c| c.topic == topic)
            .map(|c| (c.partition, c.next_offset))
            .collect();
        if cut.is_empty() && snapshot.ledger_cut.iter().any(|c| c.topic != topic) {
            bail!(
                "snapshot {id} holds the ledger's offsets on {}, not on {topic}: offsets of \
                 another cluster or topic do not apply here. Replay --from-timestamp {} instead",
                snapshot
                    .ledger_cut
                    .iter()
                    .map(|c| c.topic.as_str())
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect::<Vec<_>>()
                    .join(", "),
                snapshot.taken_at.to_rfc3339()
            );
        }
        return Ok(Source {
            kafka,
            topic,
            from: snapshot.taken_at,
            to: None,
            after_cut: Some(cut),
            timeout,
        });
    }
    let Some(from) = args.from_timestamp else {
        bail!("--from-timestamp or --from-snapshot is required");
    };
    if args.to.is_some_and(|to| to <= from) {
        bail!("--to must be after --from-timestamp");
    }
    Ok(Source {
        kafka,
        topic,
        from,
        to: args.to,
        after_cut: None,
        timeout,
    })
}

/// Snapshot `id` from the database (or `--snapshot-dir`), checked.
async fn load_snapshot(args: &RangeArgs, id: &str) -> Result<Snapshot> {
    let store = match &args.snapshot_dir {
        Some(dir) => SnapshotStore::Directory(dir.clone()),
        None => SnapshotStore::Postgres,
    };
    let mut conn = connect(&args.database_url).await?;
    let stored = store
        .get(&mut conn, id)
        .await?
        .with_context(|| format!("no snapshot {id} in the {}", store.describe()))?;
    Ok(stored.open()?)
}

async fn connect(url: &str) -> Result<AsyncPgConnection> {
    caracal_service_kit::db::tls::establish(url)
        .await
        .context("cannot connect to the ledger database")
}

#[derive(diesel::QueryableByName)]
struct Id {
    #[diesel(sql_type = BigInt)]
    id: i64,
}

async fn record_progress(conn: &mut AsyncPgConnection, id: i64, p: &Progress) -> Result<()> {
    diesel::sql_query(
        "UPDATE ledger_replays SET messages = $2, read = $3, written = $4, poison = $5, \
                updated_at = now() WHERE id = $1",
    )
    .bind::<BigInt, _>(id)
    .bind::<BigInt, _>(i64::try_from(p.total).unwrap_or(i64::MAX))
    .bind::<BigInt, _>(i64::try_from(p.read).unwrap_or(i64::MAX))
    .bind::<BigInt, _>(i64::try_from(p.new_rows).unwrap_or(i64::MAX))
    .bind::<BigInt, _>(i64::try_from(p.poison).unwrap_or(i64::MAX))
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn run(format: OutputFormat, cmd: ReplayCmd, out: &mut dyn Write) -> Result<()> {
    match cmd {
        ReplayCmd::Start(args) => {
            let source = source(&args).await?;
            let mut conn = connect(&args.database_url).await?;
            let mut log = connect(&args.database_url).await?;
            let id: Id = diesel::sql_query(
                "INSERT INTO ledger_replays (state, brokers, topic, from_time, to_time, \
                        snapshot_id) \
                 VALUES ('running', $1, $2, $3, $4, $5) RETURNING id",
            )
            .bind::<Text, _>(&source.kafka.brokers)
            .bind::<Text, _>(&source.topic)
            .bind::<Timestamptz, _>(source.from)
            .bind::<Nullable<Timestamptz>, _>(source.to)
            .bind::<Nullable<Text>, _>(args.from_snapshot.as_deref())
            .get_result(&mut log)
            .await
            .context("recording the replay (ledger_replays)")?;
            match &args.from_snapshot {
                Some(snapshot) => eprintln!(
                    "replay {}: {} after snapshot {snapshot}'s cut, to its end now",
                    id.id, source.topic
                ),
                None => eprintln!(
                    "replay {}: {} from {} to {}",
                    id.id,
                    source.topic,
                    source.from.to_rfc3339(),
                    source
                        .to
                        .map_or_else(|| "its end now".to_owned(), |t| t.to_rfc3339())
                ),
            }
            let mut last = Progress::default();
            let result = replay::replay_ledger(&mut conn, &source, |p| {
                eprintln!(
                    "replay {}: {} of {} read, {} written",
                    id.id, p.read, p.total, p.new_rows
                );
                last = p.clone();
            })
            .await;
            let (state, error) = match &result {
                Ok(p) => {
                    last = p.clone();
                    ("done", None)
                }
                Err(e) => ("failed", Some(e.to_string())),
            };
            record_progress(&mut log, id.id, &last).await?;
            diesel::sql_query(
                "UPDATE ledger_replays SET state = $2, error = $3, finished_at = now(), \
                        updated_at = now() WHERE id = $1",
            )
            .bind::<BigInt, _>(id.id)
            .bind::<Text, _>(state)
            .bind::<Nullable<Text>, _>(error)
            .execute(&mut log)
            .await?;
            let p = result.with_context(|| format!("replay {}", id.id))?;
            write_progress(out, format, id.id, &source, &p)
        }
        ReplayCmd::Validate(args) => {
            let source = source(&args).await?;
            let mut conn = connect(&args.database_url).await?;
            let p = replay::validate_ledger(&mut conn, &source).await?;
            write_progress(out, format, 0, &source, &p)?;
            if p.new_rows > 0 {
                return Err(EventsMissing(p.new_rows).into());
            }
            Ok(())
        }
        ReplayCmd::Status {
            database_url,
            limit,
        } => {
            let mut conn = connect(&database_url).await?;
            let rows: Vec<Run> = diesel::sql_query(
                "SELECT id, state, topic, brokers, from_time, to_time, started_at, finished_at, \
                        messages, read, written, poison, coalesce(error, '') AS error \
                 FROM ledger_replays ORDER BY id DESC LIMIT $1",
            )
            .bind::<BigInt, _>(limit.clamp(1, 1000))
            .load(&mut conn)
            .await
            .context("reading ledger_replays")?;
            write_runs(out, format, &rows)
        }
    }
}

#[derive(diesel::QueryableByName, Debug)]
struct Run {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Text)]
    state: String,
    #[diesel(sql_type = Text)]
    topic: String,
    #[diesel(sql_type = Text)]
    brokers: String,
    #[diesel(sql_type = Timestamptz)]
    from_time: DateTime<Utc>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    to_time: Option<DateTime<Utc>>,
    #[diesel(sql_type = Timestamptz)]
    started_at: DateTime<Utc>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    finished_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = BigInt)]
    messages: i64,
    #[diesel(sql_type = BigInt)]
    read: i64,
    #[diesel(sql_type = BigInt)]
    written: i64,
    #[diesel(sql_type = BigInt)]
    poison: i64,
    #[diesel(sql_type = Text)]
    error: String,
}

fn time(t: Option<&DateTime<Utc>>) -> String {
    t.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

fn write_progress(
    out: &mut dyn Write,
    format: OutputFormat,
    id: i64,
    source: &Source,
    p: &Progress,
) -> Result<()> {
    let value = json!({
        "replay_id": id,
        "topic": source.topic,
        "from": time(Some(&source.from)),
        "to": time(source.to.as_ref()),
        "partitions": p.partitions,
        "messages": p.total,
        "read": p.read,
        // replay: rows written; validate: events the ledger lacks.
        "missing_from_ledger": p.new_rows,
        "poison": p.poison,
    });
    match format {
        OutputFormat::Json => output::write_json(out, &value),
        OutputFormat::Csv => {
            writeln!(
                out,
                "{}",
                csv_line(&[
                    "topic",
                    "from",
                    "to",
                    "partitions",
                    "read",
                    "missing_from_ledger",
                    "poison"
                ])
            )?;
            writeln!(
                out,
                "{}",
                csv_line(&[
                    source.topic.clone(),
                    time(Some(&source.from)),
                    time(source.to.as_ref()),
                    p.partitions.to_string(),
                    p.read.to_string(),
                    p.new_rows.to_string(),
                    p.poison.to_string(),
                ])
            )?;
            Ok(())
        }
        OutputFormat::Table => output::write_text(
            out,
            &format!(
                "{}: {} events read from {} partitions, {} not in the ledger before{}, {} not \
                 ledger events.\n",
                source.topic,
                p.read,
                p.partitions,
                p.new_rows,
                if id > 0 { " (now written)" } else { "" },
                p.poison
            ),
        ),
    }
}

fn write_runs(out: &mut dyn Write, format: OutputFormat, rows: &[Run]) -> Result<()> {
    match format {
        OutputFormat::Json => output::write_json(
            out,
            &json!(rows
                .iter()
                .map(|r| json!({
                    "id": r.id,
                    "state": r.state,
                    "topic": r.topic,
                    "brokers": r.brokers,
                    "from": time(Some(&r.from_time)),
                    "to": time(r.to_time.as_ref()),
                    "started_at": time(Some(&r.started_at)),
                    "finished_at": time(r.finished_at.as_ref()),
                    "messages": r.messages,
                    "read": r.read,
                    "written": r.written,
                    "poison": r.poison,
                    "error": r.error,
                }))
                .collect::<Vec<_>>()),
        ),
        OutputFormat::Csv | OutputFormat::Table => {
            let mut table = Table::new([
                "ID", "STATE", "TOPIC", "FROM", "TO", "READ", "OF", "WRITTEN", "ERROR",
            ]);
            for r in rows {
                table.row(vec![
                    r.id.to_string(),
                    r.state.clone(),
                    r.topic.clone(),
                    time(Some(&r.from_time)),
                    time(r.to_time.as_ref()),
                    r.read.to_string(),
                    r.messages.to_string(),
                    r.written.to_string(),
                    r.error.clone(),
                ]);
            }
            let text = if matches!(format, OutputFormat::Csv) {
                table.render_csv()
            } else {
                table.render()
            };
            output::write_text(out, &text)
        }
    }
}
