//! `caracal ledger status`: is the ledger keeping up with the metering topic?
//!
//! Per partition of the ledger-writer's group (or `--group`), from the table the
//! writers' lease task keeps (`consumer_partitions`, refreshed every lease tick):
//! who reads it, the offset committed after the last durable batch, the end offset
//! last seen, the lag between them, when a batch last committed and how old the
//! report is. A partition with lag whose last commit is older than
//! `--stall-seconds`, or whose report has gone stale (no replica holds it), is
//! STALLED and the command exits with [`EXIT_DRIFT`](crate::EXIT_DRIFT) after
//! printing, so a CronJob or a script can alert on it.
//!
//! It reads PostgreSQL directly (a read-only role is enough), like `audit export`.

use std::io::Write;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use clap::Args;
use diesel::sql_types::{BigInt, Integer, Nullable, Text, Timestamptz};
use diesel_async::{AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use serde_json::json;

use crate::output::{self, OutputFormat, Table};

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The consumer group (the ledger-writer's unless given).
    #[arg(long, default_value = "caracal-ledger-writer")]
    pub group: String,
    /// A partition with lag and no commit for this long is stalled.
    #[arg(long, value_name = "S", default_value_t = 60)]
    pub stall_seconds: u32,
    /// PostgreSQL URL of the ledger database (a read-only role is enough).
    #[arg(
        long,
        env = "CARACAL_DATABASE_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    pub database_url: String,
}

/// Some partition is stalled (exit code 3).
#[derive(Debug)]
pub struct Stalled(pub usize);

impl std::fmt::Display for Stalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} partition(s) stalled: the ledger is not keeping up with the topic",
            self.0
        )
    }
}

impl std::error::Error for Stalled {}

#[derive(diesel::QueryableByName, Debug)]
struct Row {
    #[diesel(sql_type = Text)]
    topic: String,
    #[diesel(sql_type = Integer)]
    kafka_partition: i32,
    #[diesel(sql_type = Nullable<Text>)]
    owner: Option<String>,
    #[diesel(sql_type = Nullable<BigInt>)]
    committed_offset: Option<i64>,
    #[diesel(sql_type = Nullable<BigInt>)]
    end_offset: Option<i64>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    last_commit_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = Timestamptz)]
    updated_at: DateTime<Utc>,
    #[diesel(sql_type = Timestamptz)]
    now: DateTime<Utc>,
}

/// A report older than this means nobody holds the partition (owners report every
/// lease tick, about a second).
const STALE_REPORT_SECONDS: i64 = 30;

/// What a partition's row says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// No lag.
    Current,
    /// Lag, and a batch committed recently.
    CatchingUp,
    /// No replica holds it (a moment in a handover), no lag yet.
    Unowned,
    /// Lag and no commit for `--stall-seconds`, or nobody reading it while it has
    /// lag, or nobody reporting.
    Stalled,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            Self::Current => "ok",
            Self::CatchingUp => "catching up",
            Self::Unowned => "unowned",
            Self::Stalled => "STALLED",
        }
    }
}

/// The state of one partition at `now`.
pub fn state(
    lag: Option<i64>,
    last_commit: Option<DateTime<Utc>>,
    reported: DateTime<Utc>,
    owned: bool,
    now: DateTime<Utc>,
    stall_seconds: i64,
) -> State {
    let stale = (now - reported).num_seconds() > STALE_REPORT_SECONDS;
    if !owned && !stale {
        return match lag {
            Some(0) => State::Unowned,
            _ => State::Stalled,
        };
    }
    match lag {
        Some(0) if !stale => State::Current,
        // Unknown lag from a live owner: it has not sampled yet.
        None if !stale => State::CatchingUp,
        _ if stale => State::Stalled,
        _ => match last_commit {
            Some(at) if (now - at).num_seconds() < stall_seconds => State::CatchingUp,
            _ => State::Stalled,
        },
    }
}

fn rfc3339(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

pub async fn run(args: StatusArgs, format: OutputFormat, out: &mut dyn Write) -> Result<()> {
    let mut conn: AsyncPgConnection = caracal_service_kit::db::tls::establish(&args.database_url)
        .await
        .context("cannot connect to the ledger database")?;
    conn.batch_execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
        .await
        .context("cannot make the session read-only")?;
    let rows: Vec<Row> = diesel::sql_query(
        "SELECT topic, kafka_partition, owner, committed_offset, end_offset, last_commit_at, \
                updated_at, now() AS now \
           FROM consumer_partitions WHERE group_id = $1 ORDER BY topic, kafka_partition",
    )
    .bind::<Text, _>(&args.group)
    .load(&mut conn)
    .await
    .context("cannot read consumer_partitions (are the migrations applied?)")?;
    if rows.is_empty() {
        anyhow::bail!(
            "no partition of group {} has been reported: is a ledger-writer with partition leases running?",
            args.group
        );
    }
    let stall = i64::from(args.stall_seconds);
    let mut stalled = 0;
    let mut table = Table::new([
        "TOPIC",
        "PARTITION",
        "OWNER",
        "COMMITTED",
        "END",
        "LAG",
        "LAST COMMIT",
        "REPORTED",
        "STATE",
    ]);
    let mut docs = Vec::new();
    for r in &rows {
        // The end offset is sampled every few seconds, the commit recorded as it
        // happens: the end is at least what was committed.
        let end = match (r.end_offset, r.committed_offset) {
            (Some(end), Some(done)) => Some(end.max(done)),
            (end, _) => end,
        };
        let lag = match (end, r.committed_offset) {
            (Some(end), Some(done)) => Some((end - done).max(0)),
            (Some(end), None) => Some(end),
            _ => None,
        };
        let st = state(
            lag,
            r.last_commit_at,
            r.updated_at,
            r.owner.is_some(),
            r.now,
            stall,
        );
        if st == State::Stalled {
            stalled += 1;
        }
        let opt = |v: Option<i64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
        let reported_ago = (r.now - r.updated_at).num_seconds().max(0);
        table.row(vec![
            r.topic.clone(),
            r.kafka_partition.to_string(),
            r.owner.clone().unwrap_or_else(|| "-".to_owned()),
            opt(r.committed_offset),
            opt(end),
            opt(lag),
            r.last_commit_at
                .map_or_else(|| "-".to_owned(), |t| rfc3339(&t)),
            format!("{reported_ago}s ago"),
            st.name().to_owned(),
        ]);
        docs.push(json!({
            "topic": r.topic,
            "partition": r.kafka_partition,
            "owner": r.owner,
            "committed_offset": r.committed_offset,
            "end_offset": end,
            "lag": lag,
            "last_commit_at": r.last_commit_at.map(|t| rfc3339(&t)),
            "reported_seconds_ago": reported_ago,
            "state": st.name(),
        }));
    }
    match format {
        OutputFormat::Table => output::write_text(out, &table.render())?,
        OutputFormat::Csv => output::write_text(out, &table.render_csv())?,
        OutputFormat::Json => output::write_json(
            out,
            &json!({ "group": args.group, "partitions": docs, "stalled": stalled }),
        )?,
    }
    if stalled > 0 {
        return Err(Stalled(stalled).into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states() {
        let now = Utc::now();
        let ago = |s: i64| now - chrono::Duration::seconds(s);
        assert_eq!(
            state(Some(0), Some(ago(500)), ago(1), true, now, 60),
            State::Current
        );
        assert_eq!(
            state(Some(5), Some(ago(10)), ago(1), true, now, 60),
            State::CatchingUp
        );
        assert_eq!(
            state(Some(5), Some(ago(61)), ago(1), true, now, 60),
            State::Stalled
        );
        assert_eq!(state(Some(5), None, ago(1), true, now, 60), State::Stalled);
        // Nobody reports it any more: stalled whatever it last said.
        assert_eq!(
            state(Some(0), Some(ago(1)), ago(31), true, now, 60),
            State::Stalled
        );
        assert_eq!(
            state(Some(0), Some(ago(1)), ago(1), false, now, 60),
            State::Unowned
        );
        assert_eq!(
            state(Some(3), Some(ago(1)), ago(1), false, now, 60),
            State::Stalled
        );
        assert_eq!(state(None, None, ago(1), false, now, 60), State::Stalled);
        assert_eq!(state(None, None, ago(1), true, now, 60), State::CatchingUp);
    }
}
