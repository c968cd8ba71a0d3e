//! `caracal allowlist ...`.

use std::io::Write;

use anyhow::Result;
use caracal_proto::v1 as pb;
use serde_json::{json, Value};

use super::Ctx;
use crate::{
    args::{wire, AllowlistCmd},
    output::{self, or_dash, ts_json, ts_text, yes_no, OutputFormat, Table},
};

pub async fn run(ctx: &Ctx<'_>, cmd: AllowlistCmd, out: &mut dyn Write) -> Result<()> {
    match cmd {
        AllowlistCmd::Add {
            agent_id,
            target,
            pattern,
            kind,
        } => {
            let request = pb::AddAllowlistEntryRequest {
                agent_id,
                target: wire(target),
                pattern_kind: kind.map(wire).unwrap_or_default(),
                pattern,
            };
            let e = ctx
                .connect()
                .await?
                .allowlists()
                .add_entry(request)
                .await?
                .into_inner();
            let pairs = [
                ("id", e.id.clone()),
                ("agent", e.agent_id.clone()),
                ("target", e.target.clone()),
                ("kind", e.pattern_kind.clone()),
                ("pattern", e.pattern.clone()),
                ("created", ts_text(e.created_at.as_ref())),
            ];
            output::write_object(out, ctx.format, entry_json(&e), &pairs)
        }
        AllowlistCmd::List { agent_id } => {
            let request = pb::ListAllowlistRequest { agent_id };
            let entries = ctx
                .connect()
                .await?
                .allowlists()
                .list_entries(request)
                .await?
                .into_inner()
                .entries;
            let mut table = Table::new(["ID", "AGENT", "TARGET", "KIND", "PATTERN", "CREATED"]);
            for e in &entries {
                table.row(vec![
                    e.id.clone(),
                    e.agent_id.clone(),
                    e.target.clone(),
                    e.pattern_kind.clone(),
                    e.pattern.clone(),
                    ts_text(e.created_at.as_ref()),
                ]);
            }
            output::write_list(
                out,
                ctx.format,
                entries.iter().map(entry_json).collect(),
                &table,
            )
        }
        AllowlistCmd::Remove { id } => {
            let request = pb::RemoveAllowlistEntryRequest { id: id.clone() };
            ctx.connect()
                .await?
                .allowlists()
                .remove_entry(request)
                .await?;
            match ctx.format {
                OutputFormat::Json => {
                    output::write_json(out, &json!({ "id": id, "removed": true }))
                }
                OutputFormat::Table | OutputFormat::Csv => {
                    writeln!(out, "Removed allowlist entry {id}.")?;
                    Ok(())
                }
            }
        }
        AllowlistCmd::Check {
            agent_id,
            target,
            value,
        } => {
            let request = pb::CheckAllowlistRequest {
                agent_id,
                target: wire(target),
                value,
            };
            let r = ctx
                .connect()
                .await?
                .allowlists()
                .check(request)
                .await?
                .into_inner();
            let json = json!({ "allowed": r.allowed, "matched_entry_id": r.matched_entry_id });
            let pairs = [
                ("allowed", yes_no(r.allowed)),
                ("matched_entry", or_dash(&r.matched_entry_id)),
            ];
            output::write_object(out, ctx.format, json, &pairs)
        }
    }
}

fn entry_json(e: &pb::AllowlistEntry) -> Value {
    json!({
        "id": e.id,
        "agent_id": e.agent_id,
        "target": e.target,
        "pattern_kind": e.pattern_kind,
        "pattern": e.pattern,
        "created_at": ts_json(e.created_at.as_ref()),
    })
}
