//! `caracal agent ...` and `caracal agent key ...`.

use std::io::Write;

use anyhow::Result;
use caracal_proto::v1 as pb;
use serde_json::{json, Value};

use super::{read_pages, Ctx};
use crate::{
    args::{wire, AgentCmd, IdentityCmd, IdentityKind, KeyCmd},
    output::{self, or_dash, ts_json, ts_text, OutputFormat, Table},
};

pub async fn run(ctx: &Ctx<'_>, cmd: AgentCmd, out: &mut dyn Write) -> Result<()> {
    match cmd {
        AgentCmd::Create {
            name,
            agent_type,
            parent_id,
            metadata,
        } => {
            let request = pb::CreateAgentRequest {
                name,
                agent_type,
                parent_id: parent_id.unwrap_or_default(),
                metadata_json: metadata.unwrap_or_default(),
            };
            let agent = ctx
                .connect()
                .await?
                .agents()
                .create_agent(request)
                .await?
                .into_inner();
            write_agent(ctx.format, &agent, out)
        }
        AgentCmd::Get { id_or_name } => {
            let request = pb::GetAgentRequest { id_or_name };
            let agent = ctx
                .connect()
                .await?
                .agents()
                .get_agent(request)
                .await?
                .into_inner();
            write_agent(ctx.format, &agent, out)
        }
        AgentCmd::List {
            status,
            parent_id,
            limit,
        } => {
            let client = ctx.connect().await?.agents();
            let status = status.map(wire).unwrap_or_default();
            let parent_id = parent_id.unwrap_or_default();
            let agents = read_pages(limit, |page| {
                let mut client = client.clone();
                let request = pb::ListAgentsRequest {
                    status: status.clone(),
                    parent_id: parent_id.clone(),
                    page: Some(page),
                };
                async move {
                    let page = client.list_agents(request).await?.into_inner();
                    Ok((page.agents, page.next_page_token))
                }
            })
            .await?;
            let mut table = Table::new(["ID", "NAME", "TYPE", "PARENT", "STATUS", "CREATED"]);
            for a in &agents {
                table.row(vec![
                    a.id.clone(),
                    a.name.clone(),
                    a.agent_type.clone(),
                    or_dash(&a.parent_id),
                    a.status.clone(),
                    ts_text(a.created_at.as_ref()),
                ]);
            }
            output::write_list(
                out,
                ctx.format,
                agents.iter().map(agent_json).collect(),
                &table,
            )
        }
        AgentCmd::Update {
            id,
            agent_type,
            metadata,
            parent_id,
        } => {
            let request = pb::UpdateAgentRequest {
                id,
                agent_type,
                metadata_json: metadata,
                parent_id,
            };
            let agent = ctx
                .connect()
                .await?
                .agents()
                .update_agent(request)
                .await?
                .into_inner();
            write_agent(ctx.format, &agent, out)
        }
        AgentCmd::Deactivate { id } => {
            let request = pb::DeactivateAgentRequest { id };
            let agent = ctx
                .connect()
                .await?
                .agents()
                .deactivate_agent(request)
                .await?
                .into_inner();
            write_agent(ctx.format, &agent, out)
        }
        AgentCmd::Key(cmd) => run_key(ctx, cmd, out).await,
        AgentCmd::Identity(cmd) => run_identity(ctx, cmd, out).await,
    }
}

async fn run_identity(ctx: &Ctx<'_>, cmd: IdentityCmd, out: &mut dyn Write) -> Result<()> {
    let client = ctx.connect().await?;
    match cmd {
        IdentityCmd::Add {
            agent_id,
            kind,
            value,
            issuer,
        } => {
            let kind = match kind {
                IdentityKind::Spiffe => "spiffe",
                IdentityKind::Jwt => "jwt",
            };
            let request = pb::AddIdentityRequest {
                agent_id,
                kind: kind.to_owned(),
                value,
                issuer,
            };
            let i = client.agents().add_identity(request).await?.into_inner();
            let pairs = vec![
                ("id", i.id.clone()),
                ("agent", i.agent_id.clone()),
                ("kind", i.kind.clone()),
                ("issuer", i.issuer.clone()),
                ("value", i.value.clone()),
                ("created", ts_text(i.created_at.as_ref())),
            ];
            output::write_object(out, ctx.format, identity_json(&i), &pairs)
        }
        IdentityCmd::Remove { id } => {
            client
                .agents()
                .remove_identity(pb::RemoveIdentityRequest { id: id.clone() })
                .await?;
            output::write_object(
                out,
                ctx.format,
                json!({ "id": id, "removed": true }),
                &[("removed", id.clone())],
            )
        }
        IdentityCmd::List { agent_id } => {
            let list = client
                .agents()
                .list_identities(pb::ListIdentitiesRequest { agent_id })
                .await?
                .into_inner()
                .identities;
            let mut table = Table::new(["ID", "AGENT", "KIND", "ISSUER", "VALUE", "CREATED"]);
            for i in &list {
                table.row(vec![
                    i.id.clone(),
                    i.agent_id.clone(),
                    i.kind.clone(),
                    i.issuer.clone(),
                    i.value.clone(),
                    ts_text(i.created_at.as_ref()),
                ]);
            }
            output::write_list(
                out,
                ctx.format,
                list.iter().map(identity_json).collect(),
                &table,
            )
        }
    }
}

fn identity_json(i: &pb::AgentIdentity) -> Value {
    json!({
        "id": i.id,
        "agent_id": i.agent_id,
        "kind": i.kind,
        "issuer": i.issuer,
        "value": i.value,
        "created_at": ts_json(i.created_at.as_ref()),
    })
}

async fn run_key(ctx: &Ctx<'_>, cmd: KeyCmd, out: &mut dyn Write) -> Result<()> {
    match cmd {
        KeyCmd::Issue { agent_id } => {
            let request = pb::IssueApiKeyRequest { agent_id };
            let issued = ctx
                .connect()
                .await?
                .agents()
                .issue_api_key(request)
                .await?
                .into_inner();
            write_issued_key(ctx.format, &issued, out)
        }
        KeyCmd::Revoke { key_id } => {
            let request = pb::RevokeApiKeyRequest { key_id };
            let key = ctx
                .connect()
                .await?
                .agents()
                .revoke_api_key(request)
                .await?
                .into_inner();
            output::write_object(out, ctx.format, key_json(&key), &key_pairs(&key))
        }
        KeyCmd::List { agent_id } => {
            let request = pb::ListApiKeysRequest { agent_id };
            let keys = ctx
                .connect()
                .await?
                .agents()
                .list_api_keys(request)
                .await?
                .into_inner()
                .keys;
            let mut table = Table::new(["ID", "AGENT", "PREFIX", "CREATED", "REVOKED"]);
            for k in &keys {
                table.row(vec![
                    k.id.clone(),
                    k.agent_id.clone(),
                    k.prefix.clone(),
                    ts_text(k.created_at.as_ref()),
                    or_dash(&ts_text(k.revoked_at.as_ref())),
                ]);
            }
            output::write_list(out, ctx.format, keys.iter().map(key_json).collect(), &table)
        }
    }
}

fn write_agent(format: OutputFormat, a: &pb::Agent, out: &mut dyn Write) -> Result<()> {
    let pairs = [
        ("id", a.id.clone()),
        ("name", a.name.clone()),
        ("type", a.agent_type.clone()),
        ("parent", or_dash(&a.parent_id)),
        ("metadata", a.metadata_json.clone()),
        ("status", a.status.clone()),
        ("created", ts_text(a.created_at.as_ref())),
        ("updated", ts_text(a.updated_at.as_ref())),
    ];
    output::write_object(out, format, agent_json(a), &pairs)
}

/// The secret is printed on a line of its own, with the warning that it is shown once.
fn write_issued_key(
    format: OutputFormat,
    issued: &pb::IssueApiKeyResponse,
    out: &mut dyn Write,
) -> Result<()> {
    if format == OutputFormat::Json {
        let value = json!({
            "key": issued.key.as_ref().map_or(Value::Null, key_json),
            "secret": issued.secret,
        });
        return output::write_json(out, &value);
    }
    if let Some(key) = &issued.key {
        output::write_text(out, &output::key_values(&key_pairs(key)))?;
    }
    writeln!(out)?;
    writeln!(out, "API key secret (shown only once):")?;
    writeln!(out)?;
    writeln!(out, "    {}", issued.secret)?;
    writeln!(out)?;
    writeln!(
        out,
        "Store it now: only its hash is kept, so it cannot be shown again. \
         If it is lost, revoke this key and issue a new one."
    )?;
    Ok(())
}

fn agent_json(a: &pb::Agent) -> Value {
    json!({
        "id": a.id,
        "name": a.name,
        "agent_type": a.agent_type,
        "parent_id": a.parent_id,
        "metadata_json": a.metadata_json,
        "status": a.status,
        "created_at": ts_json(a.created_at.as_ref()),
        "updated_at": ts_json(a.updated_at.as_ref()),
    })
}

fn key_json(k: &pb::ApiKey) -> Value {
    json!({
        "id": k.id,
        "agent_id": k.agent_id,
        "prefix": k.prefix,
        "created_at": ts_json(k.created_at.as_ref()),
        "revoked_at": ts_json(k.revoked_at.as_ref()),
    })
}

fn key_pairs(k: &pb::ApiKey) -> Vec<(&'static str, String)> {
    vec![
        ("id", k.id.clone()),
        ("agent", k.agent_id.clone()),
        ("prefix", k.prefix.clone()),
        ("created", ts_text(k.created_at.as_ref())),
        ("revoked", or_dash(&ts_text(k.revoked_at.as_ref()))),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(seconds: i64) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp { seconds, nanos: 0 })
    }

    #[test]
    fn agent_json_shape() {
        let a = pb::Agent {
            id: "a1".into(),
            name: "bot".into(),
            agent_type: "openai".into(),
            parent_id: String::new(),
            metadata_json: r#"{"team":"platform"}"#.into(),
            status: "active".into(),
            created_at: ts(0),
            updated_at: None,
        };
        assert_eq!(
            agent_json(&a),
            json!({
                "id": "a1", "name": "bot", "agent_type": "openai", "parent_id": "",
                "metadata_json": "{\"team\":\"platform\"}", "status": "active",
                "created_at": "1970-01-01T00:00:00Z", "updated_at": null,
            })
        );
    }

    #[test]
    fn issued_key_shows_secret_once_with_warning() {
        let issued = pb::IssueApiKeyResponse {
            key: Some(pb::ApiKey {
                id: "k1".into(),
                agent_id: "a1".into(),
                prefix: "cak_abcd".into(),
                created_at: ts(0),
                revoked_at: None,
            }),
            secret: "cak_abcdefgh".into(),
        };
        let mut buf = Vec::new();
        write_issued_key(OutputFormat::Table, &issued, &mut buf).unwrap();
        let text = String::from_utf8(buf).unwrap();
        assert!(text.contains("\n    cak_abcdefgh\n"), "{text}");
        assert!(text.contains("shown only once"), "{text}");

        let mut buf = Vec::new();
        write_issued_key(OutputFormat::Json, &issued, &mut buf).unwrap();
        let value: Value = serde_json::from_slice(&buf).unwrap();
        assert_eq!(value["secret"], "cak_abcdefgh");
        assert_eq!(value["key"]["id"], "k1");
        assert_eq!(value["key"]["revoked_at"], Value::Null);
    }
}
