//! `caracal ledger query|summary|reconcile`: the ledger of record over the admin
//! API's LedgerService (`status`, read from PostgreSQL, is [`crate::ledger_status`]).
//!
//! - `query` follows the pages to the end (or `--limit`); CSV is written page by
//!   page, so a long range does not have to fit in memory.
//! - `summary` totals final charges (one per reservation: a late settle replaces
//!   the expiry charge) per currency, optionally per model or per UTC day.
//! - `reconcile` compares, per active policy and its current window (or, with
//!   `--start [--end]`, every window of every policy in that period), and per
//!   currency, the ledger with the Redis budget counter. Drift makes the command
//!   exit with
//!   [`EXIT_DRIFT`](crate::EXIT_DRIFT) after printing the report, so a script
//!   or a CronJob can alert on it.

use std::io::Write;

use anyhow::{bail, Result};
use caracal_proto::v1 as pb;
use chrono::{DateTime, NaiveDate, Utc};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{json, Value};

use crate::{
    commands::Ctx,
    output::{self, csv_line, micros_text, money_json, ts_json, ts_text, OutputFormat, Table},
};

#[derive(Debug, Args)]
pub struct LedgerArgs {
    #[command(subcommand)]
    pub command: LedgerCmd,
}

/// Whose ledger rows, and when: what `query` and `summary` share.
#[derive(Debug, Args)]
pub struct Scope {
    #[arg(long, value_name = "ID")]
    agent_id: String,
    /// First UTC day (YYYY-MM-DD).
    #[arg(long, value_name = "DATE", value_parser = date)]
    start_date: Option<NaiveDate>,
    /// Last UTC day, included (YYYY-MM-DD).
    #[arg(long, value_name = "DATE", value_parser = date)]
    end_date: Option<NaiveDate>,
    /// Also the rows of every descendant agent (any depth).
    #[arg(long)]
    aggregate_children: bool,
}

#[derive(Debug, Subcommand)]
pub enum LedgerCmd {
    /// Whether the ledger keeps up with the metering topic: per partition its
    /// reader, committed and end offsets, lag and last commit (from PostgreSQL).
    /// Exits with code 3 when a partition is stalled.
    Status(crate::ledger_status::StatusArgs),
    /// Ledger rows of an agent between two UTC dates (end date included), oldest
    /// first; every page, up to --limit. `--output csv` for spreadsheets.
    Query {
        #[command(flatten)]
        scope: Scope,
        /// Stop after this many rows.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        limit: Option<u32>,
        /// Rows per request (1..=1000).
        #[arg(long, value_name = "N", default_value_t = 1000,
              value_parser = clap::value_parser!(u32).range(1..=1000))]
        page_size: u32,
    },
    /// Totals of final charges per currency (all time unless dates are given).
    Summary {
        #[command(flatten)]
        scope: Scope,
        /// Also totals per model or per UTC day.
        #[arg(long, value_enum)]
        breakdown: Option<Breakdown>,
    },
    /// Ledger charges against the Redis budget counters, per policy window and
    /// currency: each active policy's current window, or with --start every window
    /// of every policy (active or not) in a period. Exits with code 3 on drift.
    Reconcile {
        /// Only this agent's policies (default: every agent).
        #[arg(long, value_name = "ID")]
        agent_id: Option<String>,
        /// Reconcile a period from this UTC date (YYYY-MM-DD) or time (RFC 3339):
        /// every window that overlaps it, of every policy, active or not.
        #[arg(long, value_name = "DATE|TIME", value_parser = instant)]
        start: Option<Instant>,
        /// End of the period: a UTC date (included) or time (excluded); default now.
        #[arg(long, value_name = "DATE|TIME", value_parser = instant, requires = "start")]
        end: Option<Instant>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Breakdown {
    Model,
    Day,
}

fn date(text: &str) -> Result<NaiveDate, String> {
    NaiveDate::parse_from_str(text.trim(), "%Y-%m-%d")
        .map_err(|_| format!("expected a UTC date such as 2026-02-01, got {text:?}"))
}

/// A bound of a reconciliation period: a UTC day or an instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Instant {
    Date(NaiveDate),
    Time(DateTime<Utc>),
}

impl Instant {
    /// Where the bound falls: a start date at its 00:00, an end date (included) at
    /// the next day's.
    fn at(self, end: bool) -> Option<DateTime<Utc>> {
        match self {
            Instant::Time(t) => Some(t),
            Instant::Date(d) if end => d
                .succ_opt()
                .map(|d| d.and_time(chrono::NaiveTime::MIN).and_utc()),
            Instant::Date(d) => Some(d.and_time(chrono::NaiveTime::MIN).and_utc()),
        }
    }
}

fn instant(text: &str) -> Result<Instant, String> {
    if let Ok(d) = date(text) {
        return Ok(Instant::Date(d));
    }
    DateTime::parse_from_rfc3339(text.trim())
        .map(|t| Instant::Time(t.with_timezone(&Utc)))
        .map_err(|_| {
            format!(
                "expected a UTC date such as 2026-02-01 or a time such as \
                 2026-02-01T10:00:00Z, got {text:?}"
            )
        })
}

/// The period of `reconcile --start [--end]`.
fn period(start: Option<Instant>, end: Option<Instant>) -> Result<Option<pb::LedgerTimeRange>> {
    let Some(start) = start else {
        if end.is_some() {
            bail!("--end needs --start");
        }
        return Ok(None);
    };
    if let (Some(s), Some(e)) = (start.at(false), end.and_then(|e| e.at(true))) {
        if e <= s {
            bail!("the period ends ({e}) before it starts ({s}); an end date is included");
        }
    }
    let mut range = pb::LedgerTimeRange::default();
    match start {
        Instant::Date(d) => range.start_date = d.to_string(),
        Instant::Time(t) => range.start_time = Some(timestamp_of(t)),
    }
    match end {
        None => {}
        Some(Instant::Date(d)) => range.end_date = d.to_string(),
        Some(Instant::Time(t)) => range.end_time = Some(timestamp_of(t)),
    }
    Ok(Some(range))
}

fn timestamp_of(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

fn range(start: Option<NaiveDate>, end: Option<NaiveDate>) -> Result<Option<pb::LedgerTimeRange>> {
    if let (Some(s), Some(e)) = (start, end) {
        if e < s {
            bail!("--end-date {e} is before --start-date {s}");
        }
    }
    if start.is_none() && end.is_none() {
        return Ok(None);
    }
    let text = |d: Option<NaiveDate>| d.map(|d| d.to_string()).unwrap_or_default();
    Ok(Some(pb::LedgerTimeRange {
        start_date: text(start),
        end_date: text(end),
        ..Default::default()
    }))
}

/// Reconcile found drift: the report is printed; the process exits non-zero.
#[derive(Debug)]
pub struct DriftFound {
    pub with_drift: i32,
    pub checked: i32,
}

impl std::fmt::Display for DriftFound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "drift in {} of {} policies: the ledger and the Redis budget counters differ \
             (if events are still in flight, run again once the pipeline is drained)",
            self.with_drift, self.checked
        )
    }
}

impl std::error::Error for DriftFound {}

pub async fn run(ctx: &Ctx<'_>, cmd: LedgerCmd, out: &mut dyn Write) -> Result<()> {
    match cmd {
        LedgerCmd::Status(args) => crate::ledger_status::run(args, ctx.format, out).await,
        LedgerCmd::Query {
            scope:
                Scope {
                    agent_id,
                    start_date,
                    end_date,
                    aggregate_children,
                },
            limit,
            page_size,
        } => {
            let range = range(start_date, end_date)?;
            let mut client = ctx.connect().await?.ledger();
            let mut page_token = String::new();
            let mut shown: usize = 0;
            let limit = limit.map(|l| usize::try_from(l).unwrap_or(usize::MAX));
            let mut rows: Vec<pb::LedgerEntry> = Vec::new();
            if ctx.format == OutputFormat::Csv {
                writeln!(out, "{}", csv_line(ENTRY_COLUMNS))?;
            }
            loop {
                let want = limit.map_or(usize::MAX, |l| l.saturating_sub(shown));
                if want == 0 {
                    break;
                }
                let request = pb::QueryLedgerRequest {
                    agent_id: agent_id.clone(),
                    range: range.clone(),
                    aggregate_children,
                    page_size: u32::try_from(want).unwrap_or(page_size).min(page_size),
                    page_token: page_token.clone(),
                };
                let page = client.query_ledger(request).await?.into_inner();
                let take = page.entries.len().min(want);
                shown += take;
                let entries = page.entries.into_iter().take(take);
                if ctx.format == OutputFormat::Csv {
                    for e in entries {
                        writeln!(out, "{}", csv_line(&entry_cells(&e)))?;
                    }
                } else {
                    rows.extend(entries);
                }
                if page.next_page_token.is_empty() {
                    break;
                }
                if page.next_page_token == page_token {
                    bail!("the server returned the same page token twice; stopping");
                }
                page_token = page.next_page_token;
            }
            match ctx.format {
                OutputFormat::Csv => Ok(()),
                OutputFormat::Json => {
                    output::write_json(out, &Value::Array(rows.iter().map(entry_json).collect()))
                }
                OutputFormat::Table => output::write_text(out, &entry_table(&rows).render()),
            }
        }
        LedgerCmd::Summary {
            scope:
                Scope {
                    agent_id,
                    start_date,
                    end_date,
                    aggregate_children,
                },
            breakdown,
        } => {
            let request = pb::LedgerSummaryRequest {
                agent_id,
                range: range(start_date, end_date)?,
                aggregate_children,
                breakdown: match breakdown {
                    None => pb::LedgerBreakdown::None,
                    Some(Breakdown::Model) => pb::LedgerBreakdown::Model,
                    Some(Breakdown::Day) => pb::LedgerBreakdown::Day,
                } as i32,
            };
            let summary = ctx
                .connect()
                .await?
                .ledger()
                .ledger_summary(request)
                .await?
                .into_inner();
            write_summary(out, ctx.format, &summary, breakdown)
        }
        LedgerCmd::Reconcile {
            agent_id,
            start,
            end,
        } => {
            let request = pb::ReconcileRequest {
                agent_id: agent_id.unwrap_or_default(),
                range: period(start, end)?,
            };
            let report = ctx
                .connect()
                .await?
                .ledger()
                .reconcile(request)
                .await?
                .into_inner();
            write_reconcile(out, ctx.format, &report)?;
            if report.policies_with_drift > 0 {
                return Err(DriftFound {
                    with_drift: report.policies_with_drift,
                    checked: report.policies_checked,
                }
                .into());
            }
            Ok(())
        }
    }
}

// ------------------------------------------------------------------ query

const ENTRY_COLUMNS: &[&str] = &[
    "event_id",
    "kind",
    "reservation_id",
    "request_id",
    "agent_id",
    "root_agent_id",
    "policy_ids",
    "currency",
    "reserved_micros",
    "charged_micros",
    "overshoot_micros",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "provider",
    "model",
    "price_version",
    "schema_version",
    "occurred_at",
    "reserved_at",
    "kafka_topic",
    "kafka_partition",
    "kafka_offset",
    "ingested_at",
    "superseded",
];

fn micros(m: Option<&pb::Money>) -> i64 {
    m.map_or(0, |m| m.micros)
}

fn currency(e: &pb::LedgerEntry) -> String {
    e.charged
        .as_ref()
        .map(|m| m.currency.clone())
        .unwrap_or_default()
}

fn json_text(v: Value) -> String {
    match v {
        Value::String(s) => s,
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// One entry as CSV cells, in [`ENTRY_COLUMNS`] order (times RFC 3339 UTC with
/// their full precision; policy ids separated by `;`).
fn entry_cells(e: &pb::LedgerEntry) -> Vec<String> {
    let usage = e.usage.unwrap_or_default();
    vec![
        e.event_id.clone(),
        e.kind.clone(),
        e.reservation_id.clone(),
        e.request_id.clone(),
        e.agent_id.clone(),
        e.root_agent_id.clone(),
        e.policy_ids.join(";"),
        currency(e),
        micros(e.reserved.as_ref()).to_string(),
        micros(e.charged.as_ref()).to_string(),
        micros(e.overshoot.as_ref()).to_string(),
        usage.input_tokens.to_string(),
        usage.output_tokens.to_string(),
        usage.cached_input_tokens.to_string(),
        e.provider.clone(),
        e.model.clone(),
        e.price_version.to_string(),
        e.schema_version.to_string(),
        json_text(ts_json(e.occurred_at.as_ref())),
        json_text(ts_json(e.reserved_at.as_ref())),
        e.kafka_topic.clone(),
        e.kafka_partition.to_string(),
        e.kafka_offset.to_string(),
        json_text(ts_json(e.ingested_at.as_ref())),
        e.superseded.to_string(),
    ]
}

fn entry_json(e: &pb::LedgerEntry) -> Value {
    let usage = e.usage.unwrap_or_default();
    json!({
        "event_id": e.event_id,
        "kind": e.kind,
        "reservation_id": e.reservation_id,
        "request_id": e.request_id,
        "agent_id": e.agent_id,
        "root_agent_id": e.root_agent_id,
        "policy_ids": e.policy_ids,
        "reserved": money_json(e.reserved.as_ref()),
        "charged": money_json(e.charged.as_ref()),
        "overshoot": money_json(e.overshoot.as_ref()),
        "usage": {
            "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens,
            "cached_input_tokens": usage.cached_input_tokens,
        },
        "provider": e.provider,
        "model": e.model,
        "price_version": e.price_version,
        "schema_version": e.schema_version,
        "occurred_at": ts_json(e.occurred_at.as_ref()),
        "reserved_at": ts_json(e.reserved_at.as_ref()),
        "kafka": {
            "topic": e.kafka_topic,
            "partition": e.kafka_partition,
            "offset": e.kafka_offset,
        },
        "ingested_at": ts_json(e.ingested_at.as_ref()),
        "superseded": e.superseded,
    })
}

fn entry_table(rows: &[pb::LedgerEntry]) -> Table {
    let mut table = Table::new([
        "TIME",
        "KIND",
        "AGENT",
        "MODEL",
        "CHARGED",
        "RESERVED",
        "OVERSHOOT",
        "TOKENS IN/OUT/CACHED",
        "RESERVATION",
        "NOTE",
    ]);
    for e in rows {
        let usage = e.usage.unwrap_or_default();
        let cur = currency(e);
        table.row(vec![
            ts_text(e.occurred_at.as_ref()),
            e.kind.clone(),
            e.agent_id.clone(),
            format!("{}/{}", e.provider, e.model),
            format!("{} {cur}", micros_text(micros(e.charged.as_ref()))),
            micros_text(micros(e.reserved.as_ref())),
            micros_text(micros(e.overshoot.as_ref())),
            format!(
                "{}/{}/{}",
                usage.input_tokens, usage.output_tokens, usage.cached_input_tokens
            ),
            e.reservation_id.clone(),
            if e.superseded {
                "superseded".to_owned()
            } else {
                String::new()
            },
        ]);
    }
    table
}

// ---------------------------------------------------------------- summary

fn totals_json(t: &pb::LedgerTotals) -> Value {
    json!({
        "currency": t.currency,
        "provider": t.provider,
        "model": t.model,
        "day": t.day,
        "charged": money_json(t.charged.as_ref()),
        "reserved": money_json(t.reserved.as_ref()),
        "overshoot": money_json(t.overshoot.as_ref()),
        "event_count": t.event_count,
        "superseded_count": t.superseded_count,
        "input_tokens": t.input_tokens,
        "output_tokens": t.output_tokens,
        "cached_input_tokens": t.cached_input_tokens,
    })
}

const TOTALS_COLUMNS: &[&str] = &[
    "group",
    "day",
    "provider",
    "model",
    "currency",
    "charged_micros",
    "reserved_micros",
    "overshoot_micros",
    "event_count",
    "superseded_count",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
];

fn totals_cells(group: &str, t: &pb::LedgerTotals) -> Vec<String> {
    vec![
        group.to_owned(),
        t.day.clone(),
        t.provider.clone(),
        t.model.clone(),
        t.currency.clone(),
        micros(t.charged.as_ref()).to_string(),
        micros(t.reserved.as_ref()).to_string(),
        micros(t.overshoot.as_ref()).to_string(),
        t.event_count.to_string(),
        t.superseded_count.to_string(),
        t.input_tokens.to_string(),
        t.output_tokens.to_string(),
        t.cached_input_tokens.to_string(),
    ]
}

fn totals_table(first: &[&str], rows: &[(Vec<String>, &pb::LedgerTotals)]) -> Table {
    let mut headers: Vec<&str> = first.to_vec();
    headers.extend([
        "CURRENCY",
        "CHARGED",
        "RESERVED",
        "OVERSHOOT",
        "CHARGES",
        "SUPERSEDED",
        "TOKENS IN/OUT/CACHED",
    ]);
    let mut table = Table::new(headers);
    for (group, t) in rows {
        let mut cells = group.clone();
        cells.extend([
            t.currency.clone(),
            micros_text(micros(t.charged.as_ref())),
            micros_text(micros(t.reserved.as_ref())),
            micros_text(micros(t.overshoot.as_ref())),
            t.event_count.to_string(),
            t.superseded_count.to_string(),
            format!(
                "{}/{}/{}",
                t.input_tokens, t.output_tokens, t.cached_input_tokens
            ),
        ]);
        table.row(cells);
    }
    table
}

fn write_summary(
    out: &mut dyn Write,
    format: OutputFormat,
    s: &pb::LedgerSummaryResponse,
    breakdown: Option<Breakdown>,
) -> Result<()> {
    match format {
        OutputFormat::Json => output::write_json(
            out,
            &json!({
                "agent_id": s.agent_id,
                "agent_count": s.agent_count,
                "totals": s.totals.iter().map(totals_json).collect::<Vec<_>>(),
                "breakdown": s.breakdown.iter().map(totals_json).collect::<Vec<_>>(),
            }),
        ),
        OutputFormat::Csv => {
            writeln!(out, "{}", csv_line(TOTALS_COLUMNS))?;
            for t in &s.totals {
                writeln!(out, "{}", csv_line(&totals_cells("total", t)))?;
            }
            let group = match breakdown {
                Some(Breakdown::Model) => "model",
                _ => "day",
            };
            for t in &s.breakdown {
                writeln!(out, "{}", csv_line(&totals_cells(group, t)))?;
            }
            Ok(())
        }
        OutputFormat::Table => {
            let mut text = output::key_values(&[
                ("agent", s.agent_id.clone()),
                ("agents covered", s.agent_count.to_string()),
            ]);
            text.push('\n');
            let overall: Vec<_> = s.totals.iter().map(|t| (Vec::new(), t)).collect();
            if overall.is_empty() {
                text.push_str("No charges in the ledger for this range.\n");
            } else {
                text.push_str(&totals_table(&[], &overall).render());
            }
            if let Some(b) = breakdown {
                text.push('\n');
                let (first, rows): (&[&str], Vec<_>) = match b {
                    Breakdown::Model => (
                        &["PROVIDER", "MODEL"],
                        s.breakdown
                            .iter()
                            .map(|t| (vec![t.provider.clone(), t.model.clone()], t))
                            .collect(),
                    ),
                    Breakdown::Day => (
                        &["DAY"],
                        s.breakdown
                            .iter()
                            .map(|t| (vec![t.day.clone()], t))
                            .collect(),
                    ),
                };
                text.push_str(&totals_table(first, &rows).render());
            }
            output::write_text(out, &text)
        }
    }
}

// -------------------------------------------------------------- reconcile

const RECONCILE_COLUMNS: &[&str] = &[
    "policy_id",
    "agent_id",
    "currency",
    "time_window",
    "window_type",
    "window_start",
    "window_end",
    "ledger_micros",
    "ledger_events",
    "redis_spent_micros",
    "drift_micros",
    "counter_key",
    "counter_state",
    "policy_currency",
];

/// present | missing | expired (what became of the window's counter).
fn counter_state(p: &pb::PolicyReconciliation) -> &'static str {
    match p.counter_state() {
        pb::CounterState::Present => "present",
        pb::CounterState::Missing => "missing",
        pb::CounterState::Expired => "expired",
        pb::CounterState::Unspecified => "",
    }
}

fn write_reconcile(
    out: &mut dyn Write,
    format: OutputFormat,
    r: &pb::ReconcileResponse,
) -> Result<()> {
    match format {
        OutputFormat::Json => output::write_json(
            out,
            &json!({
                "checked_at": ts_json(r.checked_at.as_ref()),
                "period_start": ts_json(r.period_start.as_ref()),
                "period_end": ts_json(r.period_end.as_ref()),
                "policies_checked": r.policies_checked,
                "policies_with_drift": r.policies_with_drift,
                "windows_checked": r.windows_checked,
                "windows_with_drift": r.windows_with_drift,
                "windows_expired": r.windows_expired,
                "policies": r.policies.iter().map(|p| json!({
                    "policy_id": p.policy_id,
                    "agent_id": p.agent_id,
                    "currency": p.currency,
                    "time_window": p.time_window,
                    "window_type": p.window_type,
                    "window_start": ts_json(p.window_start.as_ref()),
                    "window_end": ts_json(p.window_end.as_ref()),
                    "ledger_micros": p.ledger_micros,
                    "ledger_events": p.ledger_events,
                    "redis_spent_micros": p.redis_spent_micros,
                    "drift_micros": p.drift_micros,
                    "counter_key": p.counter_key,
                    "counter_state": counter_state(p),
                    "policy_currency": p.policy_currency,
                })).collect::<Vec<_>>(),
            }),
        ),
        OutputFormat::Csv => {
            writeln!(out, "{}", csv_line(RECONCILE_COLUMNS))?;
            for p in &r.policies {
                let cells = vec![
                    p.policy_id.clone(),
                    p.agent_id.clone(),
                    p.currency.clone(),
                    p.time_window.clone(),
                    p.window_type.clone(),
                    json_text(ts_json(p.window_start.as_ref())),
                    json_text(ts_json(p.window_end.as_ref())),
                    p.ledger_micros.to_string(),
                    p.ledger_events.to_string(),
                    p.redis_spent_micros.to_string(),
                    p.drift_micros.to_string(),
                    p.counter_key.clone(),
                    counter_state(p).to_owned(),
                    p.policy_currency.clone(),
                ];
                writeln!(out, "{}", csv_line(&cells))?;
            }
            Ok(())
        }
        OutputFormat::Table => {
            let mut table = Table::new([
                "POLICY",
                "AGENT",
                "WINDOW",
                "SINCE",
                "LEDGER",
                "REDIS SPENT",
                "DRIFT",
                "COUNTER",
            ]);
            for p in &r.policies {
                // A row of charges in another currency than the policy's.
                let foreign = !p.policy_currency.is_empty() && p.policy_currency != p.currency;
                table.row(vec![
                    p.policy_id.clone(),
                    p.agent_id.clone(),
                    format!("{} {}", p.window_type, p.time_window),
                    ts_text(p.window_start.as_ref()),
                    format!("{} {}", micros_text(p.ledger_micros), p.currency),
                    micros_text(p.redis_spent_micros),
                    micros_text(p.drift_micros),
                    if foreign {
                        format!("not {}", p.policy_currency)
                    } else {
                        counter_state(p).to_owned()
                    },
                ]);
            }
            let mut text = table.render();
            text.push_str(&format!(
                "\n{} policies checked, {} with drift.\n",
                r.policies_checked, r.policies_with_drift
            ));
            if let Some(start) = r.period_start.as_ref() {
                text.push_str(&format!(
                    "Period {} .. {}: {} windows, {} with drift, {} not compared (counters \
                     expired).\n",
                    ts_text(Some(start)),
                    ts_text(r.period_end.as_ref()),
                    r.windows_checked,
                    r.windows_with_drift,
                    r.windows_expired
                ));
            }
            output::write_text(out, &text)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_checked_before_connecting() {
        assert!(date("2026-02-01").is_ok());
        assert!(date("02/01/2026").is_err());
        let d = |s: &str| Some(date(s).unwrap());
        assert!(range(d("2026-02-03"), d("2026-02-01")).is_err());
        assert_eq!(range(None, None).unwrap(), None);
        let r = range(d("2026-02-01"), d("2026-02-03")).unwrap().unwrap();
        assert_eq!(
            (r.start_date.as_str(), r.end_date.as_str()),
            ("2026-02-01", "2026-02-03")
        );
    }

    #[test]
    fn reconcile_periods_take_dates_or_times() {
        let d = |s: &str| Some(instant(s).unwrap());
        assert_eq!(period(None, None).unwrap(), None);
        let r = period(d("2026-02-01"), None).unwrap().unwrap();
        assert_eq!(
            (r.start_date.as_str(), r.end_date.as_str()),
            ("2026-02-01", "")
        );
        // One day: start and end date the same (the end date is included).
        assert!(period(d("2026-02-01"), d("2026-02-01")).is_ok());
        let r = period(d("2026-02-01T10:00:00Z"), d("2026-02-01T11:00:00+01:00"))
            .map(|r| r.map(|r| r.start_time.map(|t| t.seconds)));
        assert!(r.is_err(), "11:00+01:00 is 10:00Z: an empty period");
        let r = period(d("2026-02-01T10:00:00Z"), d("2026-02-02"))
            .unwrap()
            .unwrap();
        assert_eq!(r.start_time.map(|t| t.seconds), Some(1_769_940_000));
        assert_eq!(r.end_date, "2026-02-02");
        assert!(period(d("2026-02-03"), d("2026-02-01")).is_err());
        assert!(period(None, d("2026-02-01")).is_err());
        assert!(instant("yesterday").is_err());
    }

    #[test]
    fn entries_become_csv_rows_with_every_column() {
        let money = |micros| pb::Money {
            currency: "USD".into(),
            micros,
            amount: String::new(),
        };
        let e = pb::LedgerEntry {
            event_id: "rsv_1_a/settle".into(),
            kind: "settle".into(),
            policy_ids: vec!["p1".into(), "p2".into()],
            reserved: Some(money(100)),
            charged: Some(money(150)),
            overshoot: Some(money(50)),
            model: "gpt, \"4o\"".into(),
            ..Default::default()
        };
        let cells = entry_cells(&e);
        assert_eq!(cells.len(), ENTRY_COLUMNS.len());
        let line = csv_line(&cells);
        assert!(line.starts_with("rsv_1_a/settle,settle,"), "{line}");
        assert!(line.contains(",p1;p2,USD,100,150,50,"), "{line}");
        assert!(line.contains(",\"gpt, \"\"4o\"\"\","), "{line}");
    }
}
