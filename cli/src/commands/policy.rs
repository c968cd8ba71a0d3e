//! `caracal policy ...`.

use std::io::Write;

use anyhow::Result;
use caracal_proto::v1 as pb;
use serde_json::{json, Value};

use super::{read_pages, Ctx};
use crate::{
    args::{wire, PolicyCmd},
    output::{self, money_json, ts_json, ts_text, yes_no, Table},
};

pub async fn run(ctx: &Ctx<'_>, cmd: PolicyCmd, out: &mut dyn Write) -> Result<()> {
    match cmd {
        PolicyCmd::Create {
            agent_id,
            limit,
            currency,
            time_window,
            window_type,
            on_expiry,
        } => {
            let request = pb::CreatePolicyRequest {
                agent_id,
                limit,
                currency,
                time_window: wire(time_window),
                window_type: wire(window_type),
                on_expiry: on_expiry.map(wire).unwrap_or_default(),
            };
            let policy = ctx
                .connect()
                .await?
                .policies()
                .create_policy(request)
                .await?
                .into_inner();
            write_policy(ctx, &policy, out)
        }
        PolicyCmd::List {
            agent_id,
            include_inactive,
        } => {
            let client = ctx.connect().await?.policies();
            let agent_id = agent_id.unwrap_or_default();
            let policies = read_pages(None, |page| {
                let mut client = client.clone();
                let request = pb::ListPoliciesRequest {
                    agent_id: agent_id.clone(),
                    include_inactive,
                    page: Some(page),
                };
                async move {
                    let page = client.list_policies(request).await?.into_inner();
                    Ok((page.policies, page.next_page_token))
                }
            })
            .await?;
            let mut table = Table::new([
                "ID",
                "AGENT",
                "LIMIT",
                "CURRENCY",
                "WINDOW",
                "TYPE",
                "ON_EXPIRY",
                "ACTIVE",
                "VERSION",
            ]);
            for p in &policies {
                let (amount, currency) = money_cells(p.limit.as_ref());
                table.row(vec![
                    p.id.clone(),
                    p.agent_id.clone(),
                    amount,
                    currency,
                    p.time_window.clone(),
                    p.window_type.clone(),
                    p.on_expiry.clone(),
                    yes_no(p.active),
                    p.version.to_string(),
                ]);
            }
            output::write_list(
                out,
                ctx.format,
                policies.iter().map(policy_json).collect(),
                &table,
            )
        }
        PolicyCmd::Get { id } => {
            let request = pb::GetPolicyRequest { id };
            let policy = ctx
                .connect()
                .await?
                .policies()
                .get_policy(request)
                .await?
                .into_inner();
            write_policy(ctx, &policy, out)
        }
        PolicyCmd::History { id } => {
            let request = pb::PolicyHistoryRequest { id };
            let versions = ctx
                .connect()
                .await?
                .policies()
                .policy_history(request)
                .await?
                .into_inner()
                .versions;
            let mut table = Table::new([
                "VERSION",
                "CHANGE",
                "CHANGED_AT",
                "CHANGED_BY",
                "LIMIT",
                "CURRENCY",
                "WINDOW",
                "TYPE",
                "ON_EXPIRY",
                "ACTIVE",
            ]);
            for v in &versions {
                let (amount, currency) = money_cells(v.limit.as_ref());
                table.row_with_notes(
                    vec![
                        v.version.to_string(),
                        v.change_kind.clone(),
                        ts_text(v.changed_at.as_ref()),
                        v.changed_by.clone(),
                        amount,
                        currency,
                        v.time_window.clone(),
                        v.window_type.clone(),
                        v.on_expiry.clone(),
                        yes_no(v.active),
                    ],
                    v.diff.clone(),
                );
            }
            output::write_list(
                out,
                ctx.format,
                versions.iter().map(version_json).collect(),
                &table,
            )
        }
        PolicyCmd::At { id, time } => {
            let at = prost_types::Timestamp {
                seconds: time.timestamp(),
                nanos: i32::try_from(time.timestamp_subsec_nanos()).unwrap_or(0),
            };
            let request = pb::PolicyAtRequest { id, at: Some(at) };
            let v = ctx
                .connect()
                .await?
                .policies()
                .policy_at(request)
                .await?
                .into_inner();
            let (amount, currency) = money_cells(v.limit.as_ref());
            let pairs = [
                ("policy", v.policy_id.clone()),
                ("version", v.version.to_string()),
                ("limit", amount),
                ("currency", currency),
                ("window", v.time_window.clone()),
                ("type", v.window_type.clone()),
                ("on_expiry", v.on_expiry.clone()),
                ("active", yes_no(v.active)),
                ("change", v.change_kind.clone()),
                ("changed_by", v.changed_by.clone()),
                ("changed_at", ts_text(v.changed_at.as_ref())),
                ("diff", v.diff.join("; ")),
            ];
            output::write_object(out, ctx.format, version_json(&v), &pairs)
        }
        PolicyCmd::Update {
            id,
            limit,
            currency,
            time_window,
            window_type,
            on_expiry,
            active,
            expected_version,
        } => {
            let request = pb::UpdatePolicyRequest {
                id,
                limit,
                currency,
                time_window: time_window.map(wire),
                window_type: window_type.map(wire),
                on_expiry: on_expiry.map(wire),
                active,
                expected_version: expected_version.unwrap_or(0),
            };
            let policy = ctx
                .connect()
                .await?
                .policies()
                .update_policy(request)
                .await?
                .into_inner();
            write_policy(ctx, &policy, out)
        }
        PolicyCmd::Deactivate { id } => {
            let request = pb::DeactivatePolicyRequest { id };
            let policy = ctx
                .connect()
                .await?
                .policies()
                .deactivate_policy(request)
                .await?
                .into_inner();
            write_policy(ctx, &policy, out)
        }
    }
}

fn money_cells(money: Option<&pb::Money>) -> (String, String) {
    money.map_or_else(Default::default, |m| (m.amount.clone(), m.currency.clone()))
}

fn write_policy(ctx: &Ctx<'_>, p: &pb::Policy, out: &mut dyn Write) -> Result<()> {
    let (amount, currency) = money_cells(p.limit.as_ref());
    let pairs = [
        ("id", p.id.clone()),
        ("agent", p.agent_id.clone()),
        ("limit", amount),
        ("currency", currency),
        ("window", p.time_window.clone()),
        ("type", p.window_type.clone()),
        ("on_expiry", p.on_expiry.clone()),
        ("active", yes_no(p.active)),
        ("version", p.version.to_string()),
        ("created", ts_text(p.created_at.as_ref())),
        ("updated", ts_text(p.updated_at.as_ref())),
    ];
    output::write_object(out, ctx.format, policy_json(p), &pairs)
}

fn policy_json(p: &pb::Policy) -> Value {
    json!({
        "id": p.id,
        "agent_id": p.agent_id,
        "limit": money_json(p.limit.as_ref()),
        "time_window": p.time_window,
        "window_type": p.window_type,
        "on_expiry": p.on_expiry,
        "active": p.active,
        "version": p.version,
        "created_at": ts_json(p.created_at.as_ref()),
        "updated_at": ts_json(p.updated_at.as_ref()),
    })
}

fn version_json(v: &pb::PolicyVersion) -> Value {
    json!({
        "policy_id": v.policy_id,
        "version": v.version,
        "limit": money_json(v.limit.as_ref()),
        "time_window": v.time_window,
        "window_type": v.window_type,
        "on_expiry": v.on_expiry,
        "active": v.active,
        "change_kind": v.change_kind,
        "changed_by": v.changed_by,
        "changed_at": ts_json(v.changed_at.as_ref()),
        "diff": v.diff,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_json_shape() {
        let p = pb::Policy {
            id: "p1".into(),
            agent_id: "a1".into(),
            limit: Some(pb::Money {
                currency: "USD".into(),
                micros: 1_000_000_000,
                amount: "1000.00".into(),
            }),
            time_window: "daily".into(),
            window_type: "calendar".into(),
            on_expiry: "charge".into(),
            active: true,
            version: 1,
            created_at: Some(prost_types::Timestamp {
                seconds: 0,
                nanos: 0,
            }),
            updated_at: None,
        };
        assert_eq!(
            policy_json(&p),
            json!({
                "id": "p1", "agent_id": "a1",
                "limit": {"amount": "1000.00", "currency": "USD", "micros": 1_000_000_000},
                "time_window": "daily", "window_type": "calendar", "on_expiry": "charge",
                "active": true, "version": 1,
                "created_at": "1970-01-01T00:00:00Z", "updated_at": null,
            })
        );
    }

    #[test]
    fn version_json_keeps_diff_lines() {
        let v = pb::PolicyVersion {
            policy_id: "p1".into(),
            version: 2,
            change_kind: "update".into(),
            diff: vec!["limit: 100.00 USD -> 200.00 USD".into()],
            ..Default::default()
        };
        let value = version_json(&v);
        assert_eq!(value["diff"], json!(["limit: 100.00 USD -> 200.00 USD"]));
        assert_eq!(value["limit"], Value::Null);
        assert_eq!(value["version"], 2);
    }
}
