//! `caracal budget status|rebuild`: whether Redis holds the budget state, and
//! putting it back from the ledger after Redis lost it (LedgerService BudgetState
//! and RebuildBudgets).
//!
//! - `status` lists the partitions Redis lost (their calls are refused) and exits
//!   with [`EXIT_DRIFT`](crate::EXIT_DRIFT) while any is lost, so a probe or a
//!   script can wait on it.
//! - `rebuild` recomputes every active policy's current-window counter from the
//!   ledger on the lost partitions, then lets the hot path decide there again.
//!   `--dry-run` shows what it would write; it refuses when nothing is lost.

use std::io::Write;

use anyhow::Result;
use caracal_proto::v1 as pb;
use clap::{Args, Subcommand};
use serde_json::json;

use crate::{
    commands::Ctx,
    output::{self, csv_line, key_values, micros_text, OutputFormat, Table},
};

#[derive(Debug, Args)]
pub struct BudgetArgs {
    #[command(subcommand)]
    pub command: BudgetCmd,
}

#[derive(Debug, Subcommand)]
pub enum BudgetCmd {
    /// Whether Redis holds the budget state of every partition. Exits with code 3
    /// while a partition is lost (its calls are refused until `budget rebuild`).
    Status,
    /// Recompute the Redis budget counters (every active policy's current window)
    /// from the ledger on the partitions Redis lost, then let the hot path decide
    /// there again. Refused when no partition is lost.
    Rebuild {
        /// Only this agent's policies (its partition stays refused until a rebuild
        /// of every agent).
        #[arg(long, value_name = "ID")]
        agent_id: Option<String>,
        /// Show what would be written; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Rebuild even while the ledger-writer has lag (its unwritten charges will be
        /// missing from the counters).
        #[arg(long)]
        allow_ledger_lag: bool,
        /// The ledger-writer's consumer group (default caracal-ledger-writer).
        #[arg(long, value_name = "GROUP")]
        ledger_group: Option<String>,
    },
}

/// `budget status` found lost partitions.
#[derive(Debug)]
pub struct StateLost(pub usize);

impl std::fmt::Display for StateLost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Redis lost the budget state of {} partition(s): their calls are refused until \
             `caracal budget rebuild`",
            self.0
        )
    }
}

impl std::error::Error for StateLost {}

pub async fn run(ctx: &Ctx<'_>, cmd: BudgetCmd, out: &mut dyn Write) -> Result<()> {
    match cmd {
        BudgetCmd::Status => {
            let state = ctx
                .connect()
                .await?
                .ledger()
                .budget_state(pb::BudgetStateRequest {})
                .await?
                .into_inner();
            write_state(out, ctx.format, &state)?;
            if !state.lost_partitions.is_empty() {
                return Err(StateLost(state.lost_partitions.len()).into());
            }
            Ok(())
        }
        BudgetCmd::Rebuild {
            agent_id,
            dry_run,
            allow_ledger_lag,
            ledger_group,
        } => {
            let report = ctx
                .connect_long()
                .await?
                .ledger()
                .rebuild_budgets(pb::RebuildBudgetsRequest {
                    agent_id: agent_id.unwrap_or_default(),
                    dry_run,
                    allow_ledger_lag,
                    ledger_group: ledger_group.unwrap_or_default(),
                })
                .await
                .map_err(|e| crate::commands::long_call_error(e, "caracal budget status"))?
                .into_inner();
            write_rebuild(out, ctx.format, &report)
        }
    }
}

fn partitions(list: &[u32]) -> String {
    if list.is_empty() {
        return "none".to_owned();
    }
    list.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn write_state(
    out: &mut dyn Write,
    format: OutputFormat,
    s: &pb::BudgetStateResponse,
) -> Result<()> {
    match format {
        OutputFormat::Json => output::write_json(
            out,
            &json!({
                "established": s.established,
                "partitions": s.partitions,
                "lost_partitions": s.lost_partitions,
                "rebuilt_at": s.rebuilt_at,
            }),
        ),
        OutputFormat::Csv => {
            writeln!(
                out,
                "{}",
                csv_line(&["established", "partitions", "lost_partitions", "rebuilt_at"])
            )?;
            writeln!(
                out,
                "{}",
                csv_line(&[
                    s.established.to_string(),
                    s.partitions.to_string(),
                    partitions(&s.lost_partitions),
                    s.rebuilt_at.clone(),
                ])
            )?;
            Ok(())
        }
        OutputFormat::Table => output::write_text(
            out,
            &key_values(&[
                ("established", output::yes_no(s.established)),
                ("partitions", s.partitions.to_string()),
                ("lost partitions", partitions(&s.lost_partitions)),
                ("last rebuild", output::or_dash(&s.rebuilt_at)),
            ]),
        ),
    }
}

const REBUILD_COLUMNS: &[&str] = &[
    "policy_id",
    "agent_id",
    "partition",
    "counter_key",
    "currency",
    "spent_micros",
    "buckets",
];

pub(crate) fn write_rebuild(
    out: &mut dyn Write,
    format: OutputFormat,
    r: &pb::RebuildBudgetsResponse,
) -> Result<()> {
    match format {
        OutputFormat::Json => output::write_json(
            out,
            &json!({
                "dry_run": r.dry_run,
                "lost_partitions": r.lost_partitions,
                "restored_partitions": r.restored_partitions,
                "policies": r.policies,
                "counters_total": r.counters_total,
                "took_ms": r.took_ms,
                "reservations_open": r.reservations_open,
                "reservations_restored": r.reservations_restored,
                "parked_applied": r.parked_applied,
                "reservations_source": r.reservations_source,
                "ledger_lag": r.ledger_lag,
                "counters": r.counters.iter().map(|c| json!({
                    "policy_id": c.policy_id,
                    "agent_id": c.agent_id,
                    "partition": c.partition,
                    "counter_key": c.counter_key,
                    "currency": c.currency,
                    "spent_micros": c.spent_micros,
                    "buckets": c.buckets,
                })).collect::<Vec<_>>(),
            }),
        ),
        OutputFormat::Csv => {
            writeln!(out, "{}", csv_line(REBUILD_COLUMNS))?;
            for c in &r.counters {
                let cells = [
                    c.policy_id.clone(),
                    c.agent_id.clone(),
                    c.partition.to_string(),
                    c.counter_key.clone(),
                    c.currency.clone(),
                    c.spent_micros.to_string(),
                    c.buckets.to_string(),
                ];
                writeln!(out, "{}", csv_line(&cells))?;
            }
            Ok(())
        }
        OutputFormat::Table => {
            let mut table = Table::new(["POLICY", "AGENT", "PARTITION", "SPENT", "BUCKETS"]);
            for c in &r.counters {
                table.row(vec![
                    c.policy_id.clone(),
                    c.agent_id.clone(),
                    c.partition.to_string(),
                    format!("{} {}", micros_text(c.spent_micros), c.currency),
                    c.buckets.to_string(),
                ]);
            }
            let mut text = table.render();
            let shown = r.counters.len() as u64;
            if shown < r.counters_total {
                text.push_str(&format!(
                    "({} of {} counters shown)\n",
                    shown, r.counters_total
                ));
            }
            text.push_str(&format!(
                "\n{}{} counters of {} policies from the ledger in {} ms; lost partitions: {}; \
                 restored: {}.\n",
                if r.dry_run {
                    "Dry run: would write "
                } else {
                    "Wrote "
                },
                r.counters_total,
                r.policies,
                r.took_ms,
                partitions(&r.lost_partitions),
                partitions(&r.restored_partitions),
            ));
            text.push_str(&format!(
                "Reservations open at the loss: {} ({} restored); settles and releases made \
                 during the loss applied: {}. Source: {}.\n",
                r.reservations_open,
                r.reservations_restored,
                r.parked_applied,
                r.reservations_source
            ));
            if r.ledger_lag > 0 {
                text.push_str(&format!(
                    "The ledger-writer was {} events behind: their charges are missing from these \
                     counters.\n",
                    r.ledger_lag
                ));
            }
            output::write_text(out, &text)
        }
    }
}
