//! AllowlistService: which upstream resources and models an agent may use.
//!
//! Patterns are validated (compiled) before they are stored, and always match the
//! whole value: a regex `gpt-4` does not admit `gpt-4o`.

use caracal_domain::allowlist::{AllowTarget, Pattern, PatternKind};
use caracal_proto::v1::{self as pb, allowlist_service_server::AllowlistService};
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncConnection, RunQueryDsl};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::{
    agents::{find_agent, root_of},
    commit_change, respond, AdminState,
};
use crate::{
    admin_events::AdminEvent,
    auth::actor,
    convert::{self, timestamp},
    db::{self, schema::allowlist_entries},
    error::{ServiceError, ServiceResult},
};

#[derive(Queryable, Selectable, Debug, Clone)]
#[diesel(table_name = allowlist_entries)]
pub struct AllowlistRow {
    pub id: Uuid,
    pub agent_id: Uuid,
    pub target: String,
    pub pattern_kind: String,
    pub pattern: String,
    pub created_at: DateTime<Utc>,
}

impl From<AllowlistRow> for pb::AllowlistEntry {
    fn from(r: AllowlistRow) -> Self {
        pb::AllowlistEntry {
            id: r.id.to_string(),
            agent_id: r.agent_id.to_string(),
            target: r.target,
            pattern_kind: r.pattern_kind,
            pattern: r.pattern,
            created_at: Some(timestamp(r.created_at)),
        }
    }
}

impl AllowlistRow {
    pub fn state(&self) -> pb::AllowlistEntryState {
        pb::AllowlistEntryState {
            entry_id: self.id.to_string(),
            target: self.target.clone(),
            pattern_kind: self.pattern_kind.clone(),
            pattern: self.pattern.clone(),
        }
    }
}

/// The change event of an allowlist entry added (`removed` false) or removed,
/// keyed by the root agent of the entry's agent.
async fn allowlist_event(
    conn: &mut diesel_async::AsyncPgConnection,
    actor: &str,
    row: &AllowlistRow,
    removed: bool,
) -> ServiceResult<AdminEvent> {
    let root = root_of(conn, row.agent_id).await?.to_string();
    let (kind, before, after) = if removed {
        ("allowlist_entry_removed", Some(row.state()), None)
    } else {
        ("allowlist_entry_added", None, Some(row.state()))
    };
    Ok(AdminEvent::policy_change(
        actor,
        root.clone(),
        pb::PolicyChangeEvent {
            kind: kind.to_owned(),
            agent_id: row.agent_id.to_string(),
            root_agent_id: root,
            change: Some(pb::policy_change_event::Change::Allowlist(
                pb::AllowlistChange { before, after },
            )),
            ..Default::default()
        },
    ))
}

fn parse_target(text: &str) -> ServiceResult<AllowTarget> {
    text.trim()
        .parse()
        .map_err(|e| ServiceError::invalid("target", e))
}

fn parse_kind(text: &str) -> ServiceResult<PatternKind> {
    if text.trim().is_empty() {
        return Ok(PatternKind::Glob);
    }
    text.trim()
        .parse()
        .map_err(|e| ServiceError::invalid("pattern_kind", e))
}

pub struct AllowlistAdmin {
    state: AdminState,
}

impl AllowlistAdmin {
    pub fn new(state: AdminState) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl AllowlistService for AllowlistAdmin {
    async fn add_entry(
        &self,
        request: Request<pb::AddAllowlistEntryRequest>,
    ) -> Result<Response<pb::AllowlistEntry>, Status> {
        let changed_by = actor(&request);
        let result: ServiceResult<_> = async {
            let req = request.into_inner();
            let target = parse_target(&req.target)?;
            let kind = parse_kind(&req.pattern_kind)?;
            Pattern::compile(kind, &req.pattern)
                .map_err(|e| ServiceError::invalid("pattern", e))?;
            let mut conn = db::conn(&self.state.pool).await?;
            let agent = find_agent(&mut conn, &req.agent_id).await?;
            let row = conn
                .transaction::<_, ServiceError, _>(async move |conn| {
                    let row = diesel::insert_into(allowlist_entries::table)
                        .values((
                            allowlist_entries::id.eq(Uuid::now_v7()),
                            allowlist_entries::agent_id.eq(agent.id),
                            allowlist_entries::target.eq(target.as_str()),
                            allowlist_entries::pattern_kind.eq(kind.as_str()),
                            allowlist_entries::pattern.eq(&req.pattern),
                        ))
                        .returning(AllowlistRow::as_returning())
                        .get_result(conn)
                        .await
                        .map_err(|e| match ServiceError::from(e) {
                            ServiceError::AlreadyExists(_) => ServiceError::AlreadyExists(format!(
                                "agent {} already has {} pattern {:?}",
                                agent.id,
                                kind.as_str(),
                                req.pattern
                            )),
                            other => other,
                        })?;
                    let event = allowlist_event(conn, &changed_by, &row, false).await?;
                    commit_change(conn, &[event]).await?;
                    Ok(row)
                })
                .await?;
            Ok(pb::AllowlistEntry::from(row))
        }
        .await;
        respond("AddAllowlistEntry", result)
    }

    async fn remove_entry(
        &self,
        request: Request<pb::RemoveAllowlistEntryRequest>,
    ) -> Result<Response<pb::RemoveAllowlistEntryResponse>, Status> {
        let changed_by = actor(&request);
        let result: ServiceResult<_> = async {
            let id = convert::uuid("id", &request.get_ref().id)?;
            let mut conn = db::conn(&self.state.pool).await?;
            conn.transaction::<_, ServiceError, _>(async move |conn| {
                let removed: AllowlistRow =
                    diesel::delete(allowlist_entries::table.filter(allowlist_entries::id.eq(id)))
                        .returning(AllowlistRow::as_returning())
                        .get_result(conn)
                        .await
                        .optional()?
                        .ok_or_else(|| {
                            ServiceError::NotFound(format!("allowlist entry {id} not found"))
                        })?;
                let event = allowlist_event(conn, &changed_by, &removed, true).await?;
                commit_change(conn, &[event]).await
            })
            .await?;
            Ok(pb::RemoveAllowlistEntryResponse {})
        }
        .await;
        respond("RemoveAllowlistEntry", result)
    }

    async fn list_entries(
        &self,
        request: Request<pb::ListAllowlistRequest>,
    ) -> Result<Response<pb::ListAllowlistResponse>, Status> {
        let result: ServiceResult<_> = async {
            let mut conn = db::conn(&self.state.pool).await?;
            let agent = find_agent(&mut conn, &request.get_ref().agent_id).await?;
            let rows = load_entries(&mut conn, agent.id, None).await?;
            Ok(pb::ListAllowlistResponse {
                entries: rows.into_iter().map(pb::AllowlistEntry::from).collect(),
            })
        }
        .await;
        respond("ListAllowlist", result)
    }

    async fn check(
        &self,
        request: Request<pb::CheckAllowlistRequest>,
    ) -> Result<Response<pb::CheckAllowlistResponse>, Status> {
        let result: ServiceResult<_> = async {
            let req = request.into_inner();
            let target = parse_target(&req.target)?;
            let mut conn = db::conn(&self.state.pool).await?;
            let agent = find_agent(&mut conn, &req.agent_id).await?;
            let rows = load_entries(&mut conn, agent.id, Some(target)).await?;
            if rows.is_empty() {
                // No entries for this target means no restriction on it.
                return Ok(pb::CheckAllowlistResponse {
                    allowed: true,
                    matched_entry_id: String::new(),
                });
            }
            for row in &rows {
                let kind = parse_kind(&row.pattern_kind)?;
                let pattern = Pattern::compile(kind, &row.pattern).map_err(|e| {
                    ServiceError::Internal(format!("stored pattern {} is invalid: {e}", row.id))
                })?;
                if pattern.matches(&req.value) {
                    return Ok(pb::CheckAllowlistResponse {
                        allowed: true,
                        matched_entry_id: row.id.to_string(),
                    });
                }
            }
            Ok(pb::CheckAllowlistResponse {
                allowed: false,
                matched_entry_id: String::new(),
            })
        }
        .await;
        respond("CheckAllowlist", result)
    }
}

async fn load_entries(
    conn: &mut diesel_async::AsyncPgConnection,
    agent: Uuid,
    target: Option<AllowTarget>,
) -> ServiceResult<Vec<AllowlistRow>> {
    let mut query = allowlist_entries::table
        .select(AllowlistRow::as_select())
        .filter(allowlist_entries::agent_id.eq(agent))
        .order(allowlist_entries::id.asc())
        .limit(10_000)
        .into_boxed();
    if let Some(t) = target {
        query = query.filter(allowlist_entries::target.eq(t.as_str()));
    }
    Ok(query.load(conn).await?)
}
