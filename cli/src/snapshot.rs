//! `caracal snapshot create|list|status|restore|cleanup` (the admin API's
//! SnapshotService): budget snapshots, the guide's recovery runbook.
//!
//! - `create` takes one now; `list` shows those kept; `status` the creates and
//!   restores, running (with their phase and progress) and finished.
//! - `restore --snapshot-id ID [--dry-run]` writes the Redis budget state from the
//!   snapshot plus the ledger's rows after it; refused while Redis holds live
//!   state unless `--replace-live`.
//! - `cleanup --retention-days N` deletes those older than N days (the newest is
//!   always kept).

use std::io::Write;

use anyhow::Result;
use caracal_proto::v1::{self as pb, snapshot_service_client::SnapshotServiceClient};
use clap::{Args, Subcommand};
use serde_json::json;

use crate::{
    commands::{long_call_error, Ctx},
    output::{self, csv_line, key_values, OutputFormat, Table},
};

#[derive(Debug, Args)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    pub command: SnapshotCmd,
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCmd {
    /// Take a snapshot now: spend per policy window, open reservations, the
    /// ledger's and the consumer groups' offsets, the newest Merkle checkpoint,
    /// the configuration rows; kept with a BLAKE3 checksum.
    Create,
    /// The snapshots kept, newest first.
    List,
    /// Snapshot creates and restores: running ones with their phase and progress,
    /// finished ones with their outcome; and the schedule.
    Status {
        /// Only this snapshot's runs.
        #[arg(long, value_name = "ID")]
        snapshot_id: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Rebuild the Redis budget state from a snapshot plus the ledger rows after it
    /// (configuration rows a fresh database lacks are put back first).
    Restore {
        #[arg(long, value_name = "ID")]
        snapshot_id: String,
        /// Show what would be written; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Restore even where Redis holds live state: those partitions refuse calls
        /// until the restore ends.
        #[arg(long)]
        replace_live: bool,
        /// Restore even while the ledger-writer has lag.
        #[arg(long)]
        allow_ledger_lag: bool,
        /// The ledger-writer's consumer group (default caracal-ledger-writer).
        #[arg(long, value_name = "GROUP")]
        ledger_group: Option<String>,
    },
    /// Delete the snapshots taken more than N days ago (the newest is kept).
    Cleanup {
        #[arg(long, value_name = "N")]
        retention_days: u32,
        #[arg(long)]
        dry_run: bool,
    },
}

pub async fn run(ctx: &Ctx<'_>, cmd: SnapshotCmd, out: &mut dyn Write) -> Result<()> {
    let client = match cmd {
        SnapshotCmd::Create | SnapshotCmd::Restore { .. } => ctx.connect_long().await?,
        _ => ctx.connect().await?,
    };
    let mut svc: SnapshotServiceClient<_> = client.snapshots();
    match cmd {
        SnapshotCmd::Create => {
            let r = svc
                .create_snapshot(pb::CreateSnapshotRequest {})
                .await
                .map_err(|e| long_call_error(e, "caracal snapshot status"))?
                .into_inner();
            let s = r.snapshot.clone().unwrap_or_default();
            match ctx.format {
                OutputFormat::Json => output::write_json(
                    out,
                    &json!({
                        "snapshot": info_json(&s),
                        "took_ms": r.took_ms,
                        "store": r.store,
                        "merkle_tree_size": r.merkle_tree_size,
                        "reservations_source": r.reservations_source,
                        "config_rows": r.config_rows,
                    }),
                ),
                _ => output::write_text(
                    out,
                    &key_values(&[
                        ("snapshot", s.snapshot_id.clone()),
                        ("taken at", s.taken_at.clone()),
                        ("counters", s.counters.to_string()),
                        ("open reservations", s.reservations.to_string()),
                        ("ledger events", s.ledger_events.to_string()),
                        ("merkle tree size", r.merkle_tree_size.to_string()),
                        ("configuration rows", r.config_rows.join(" ")),
                        ("size", format!("{} bytes", s.size_bytes)),
                        ("checksum", s.checksum.clone()),
                        ("stored in", r.store.clone()),
                        ("took", format!("{} ms", r.took_ms)),
                    ]),
                ),
            }
        }
        SnapshotCmd::List => {
            let r = svc
                .list_snapshots(pb::ListSnapshotsRequest {})
                .await?
                .into_inner();
            match ctx.format {
                OutputFormat::Json => output::write_json(
                    out,
                    &json!({
                        "store": r.store,
                        "snapshots": r.snapshots.iter().map(info_json).collect::<Vec<_>>(),
                    }),
                ),
                OutputFormat::Csv => {
                    writeln!(
                        out,
                        "{}",
                        csv_line(&[
                            "snapshot_id",
                            "taken_at",
                            "counters",
                            "reservations",
                            "ledger_events",
                            "size_bytes",
                            "checksum"
                        ])
                    )?;
                    for s in &r.snapshots {
                        writeln!(
                            out,
                            "{}",
                            csv_line(&[
                                s.snapshot_id.clone(),
                                s.taken_at.clone(),
                                s.counters.to_string(),
                                s.reservations.to_string(),
                                s.ledger_events.to_string(),
                                s.size_bytes.to_string(),
                                s.checksum.clone(),
                            ])
                        )?;
                    }
                    Ok(())
                }
                OutputFormat::Table => {
                    let mut table =
                        Table::new(["SNAPSHOT", "TAKEN AT", "COUNTERS", "EVENTS", "SIZE"]);
                    for s in &r.snapshots {
                        table.row(vec![
                            s.snapshot_id.clone(),
                            s.taken_at.clone(),
                            s.counters.to_string(),
                            s.ledger_events.to_string(),
                            s.size_bytes.to_string(),
                        ]);
                    }
                    let mut text = table.render();
                    text.push_str(&format!("({} in the {})\n", r.snapshots.len(), r.store));
                    output::write_text(out, &text)
                }
            }
        }
        SnapshotCmd::Status { snapshot_id, limit } => {
            let r = svc
                .snapshot_status(pb::SnapshotStatusRequest {
                    snapshot_id: snapshot_id.unwrap_or_default(),
                    limit,
                })
                .await?
                .into_inner();
            match ctx.format {
                OutputFormat::Json => output::write_json(
                    out,
                    &json!({
                        "schedule": r.schedule,
                        "next_scheduled": r.next_scheduled,
                        "runs": r.runs.iter().map(|x| json!({
                            "id": x.id, "kind": x.kind, "snapshot_id": x.snapshot_id,
                            "state": x.state, "phase": x.phase, "done_items": x.done_items,
                            "total_items": x.total_items, "started_at": x.started_at,
                            "finished_at": x.finished_at, "error": x.error,
                            "dry_run": x.dry_run, "scheduled": x.scheduled,
                        })).collect::<Vec<_>>(),
                    }),
                ),
                _ => {
                    let mut table = Table::new([
                        "ID", "KIND", "SNAPSHOT", "STATE", "PHASE", "PROGRESS", "STARTED",
                        "FINISHED", "ERROR",
                    ]);
                    for x in &r.runs {
                        let kind = match (x.dry_run, x.scheduled) {
                            (true, _) => format!("{} (dry run)", x.kind),
                            (_, true) => format!("{} (scheduled)", x.kind),
                            _ => x.kind.clone(),
                        };
                        table.row(vec![
                            x.id.to_string(),
                            kind,
                            x.snapshot_id.clone(),
                            x.state.clone(),
                            x.phase.clone(),
                            if x.total_items > 0 {
                                format!("{}/{}", x.done_items, x.total_items)
                            } else {
                                x.done_items.to_string()
                            },
                            x.started_at.clone(),
                            output::or_dash(&x.finished_at),
                            output::or_dash(&x.error),
                        ]);
                    }
                    let mut text = table.render();
                    text.push_str(&if r.schedule.is_empty() {
                        "Scheduled snapshots: off.\n".to_owned()
                    } else {
                        format!(
                            "Scheduled snapshots: {} (UTC), next at {}.\n",
                            r.schedule, r.next_scheduled
                        )
                    });
                    output::write_text(out, &text)
                }
            }
        }
        SnapshotCmd::Restore {
            snapshot_id,
            dry_run,
            replace_live,
            allow_ledger_lag,
            ledger_group,
        } => {
            let r = svc
                .restore_snapshot(pb::RestoreSnapshotRequest {
                    snapshot_id,
                    dry_run,
                    replace_live,
                    allow_ledger_lag,
                    ledger_group: ledger_group.unwrap_or_default(),
                })
                .await
                .map_err(|e| long_call_error(e, "caracal snapshot status"))?
                .into_inner();
            let budgets = r.budgets.clone().unwrap_or_default();
            match ctx.format {
                OutputFormat::Json => output::write_json(
                    out,
                    &json!({
                        "dry_run": r.dry_run,
                        "snapshot_id": r.snapshot_id,
                        "ledger_events_after": r.ledger_events_after,
                        "config_restored": r.config_restored,
                        "took_ms": r.took_ms,
                        "counters_total": budgets.counters_total,
                        "restored_partitions": budgets.restored_partitions,
                        "reservations_restored": budgets.reservations_restored,
                        "parked_applied": budgets.parked_applied,
                    }),
                ),
                format => {
                    crate::budget::write_rebuild(out, format, &budgets)?;
                    if format == OutputFormat::Table {
                        output::write_text(
                            out,
                            &format!(
                                "Snapshot {}: its counters plus {} ledger rows after its cut; \
                                 configuration rows put back: {}.\n",
                                r.snapshot_id,
                                r.ledger_events_after,
                                if r.config_restored.is_empty() {
                                    "none".to_owned()
                                } else {
                                    r.config_restored.join(" ")
                                }
                            ),
                        )?;
                    }
                    Ok(())
                }
            }
        }
        SnapshotCmd::Cleanup {
            retention_days,
            dry_run,
        } => {
            let r = svc
                .cleanup_snapshots(pb::CleanupSnapshotsRequest {
                    retention_days,
                    dry_run,
                })
                .await?
                .into_inner();
            match ctx.format {
                OutputFormat::Json => output::write_json(
                    out,
                    &json!({"deleted": r.deleted, "kept": r.kept, "dry_run": r.dry_run}),
                ),
                _ => output::write_text(
                    out,
                    &format!(
                        "{} {} snapshot(s){}; kept {}.\n",
                        if r.dry_run { "Would delete" } else { "Deleted" },
                        r.deleted.len(),
                        if r.deleted.is_empty() {
                            String::new()
                        } else {
                            format!(": {}", r.deleted.join(", "))
                        },
                        r.kept
                    ),
                ),
            }
        }
    }
}

fn info_json(s: &pb::SnapshotInfo) -> serde_json::Value {
    json!({
        "snapshot_id": s.snapshot_id,
        "taken_at": s.taken_at,
        "checksum": s.checksum,
        "size_bytes": s.size_bytes,
        "counters": s.counters,
        "reservations": s.reservations,
        "ledger_events": s.ledger_events,
        "format": s.format,
    })
}
