//! AgentService: agents and their API keys.

use caracal_domain::hierarchy::{HierarchyError, MAX_HIERARCHY_DEPTH};
use caracal_proto::v1::{self as pb, agent_service_server::AgentService};
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::{
    commit_change,
    counters::{guard_reparent, PendingFences},
    respond, AdminState,
};
use crate::{
    admin_events::AdminEvent,
    auth::actor,
    convert::{self, opt_timestamp, timestamp},
    db::{
        self,
        schema::{agent_api_keys, agent_identities, agents},
    },
    error::{ServiceError, ServiceResult},
    keys,
};

#[derive(Queryable, Selectable, Debug, Clone)]
#[diesel(table_name = agents)]
pub struct AgentRow {
    pub id: Uuid,
    pub name: String,
    pub agent_type: String,
    pub parent_id: Option<Uuid>,
    pub metadata: serde_json::Value,
    pub status: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<AgentRow> for pb::Agent {
    fn from(r: AgentRow) -> Self {
        pb::Agent {
            id: r.id.to_string(),
            name: r.name,
            agent_type: r.agent_type,
            parent_id: r.parent_id.map(|p| p.to_string()).unwrap_or_default(),
            metadata_json: r.metadata.to_string(),
            status: r.status,
            created_at: Some(timestamp(r.created_at)),
            updated_at: Some(timestamp(r.updated_at)),
        }
    }
}

#[derive(Queryable, Selectable, Debug, Clone)]
#[diesel(table_name = agent_api_keys)]
pub struct ApiKeyRow {
    pub id: Uuid,
    pub agent_id: Uuid,
    pub key_prefix: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

impl From<ApiKeyRow> for pb::ApiKey {
    fn from(r: ApiKeyRow) -> Self {
        pb::ApiKey {
            id: r.id.to_string(),
            agent_id: r.agent_id.to_string(),
            prefix: r.key_prefix,
            created_at: Some(timestamp(r.created_at)),
            revoked_at: opt_timestamp(r.revoked_at),
        }
    }
}

#[derive(Queryable, Selectable, Debug, Clone)]
#[diesel(table_name = agent_identities)]
pub struct IdentityRow {
    pub id: Uuid,
    pub agent_id: Uuid,
    pub kind: String,
    pub value: String,
    pub created_at: DateTime<Utc>,
    pub issuer: String,
}

impl From<IdentityRow> for pb::AgentIdentity {
    fn from(r: IdentityRow) -> Self {
        pb::AgentIdentity {
            id: r.id.to_string(),
            agent_id: r.agent_id.to_string(),
            kind: r.kind,
            value: r.value,
            created_at: Some(timestamp(r.created_at)),
            issuer: r.issuer,
        }
    }
}

impl AgentRow {
    /// The fields an admin can change, for change events.
    pub fn state(&self) -> pb::AgentState {
        pb::AgentState {
            name: self.name.clone(),
            agent_type: self.agent_type.clone(),
            parent_id: self.parent_id.map(|p| p.to_string()).unwrap_or_default(),
            metadata_json: self.metadata.to_string(),
            status: self.status.clone(),
        }
    }
}

impl ApiKeyRow {
    /// The key as change events show it: id and display prefix, never the hash.
    pub fn state(&self) -> pb::ApiKeyState {
        pb::ApiKeyState {
            key_id: self.id.to_string(),
            prefix: self.key_prefix.clone(),
            created_at: Some(timestamp(self.created_at)),
            revoked_at: opt_timestamp(self.revoked_at),
        }
    }
}

impl IdentityRow {
    pub fn state(&self) -> pb::IdentityState {
        pb::IdentityState {
            identity_id: self.id.to_string(),
            kind: self.kind.clone(),
            issuer: self.issuer.clone(),
            value: self.value.clone(),
        }
    }
}

/// The root of `agent`'s hierarchy (the agent itself when it has no parent): the
/// Kafka key of every event about the hierarchy.
pub async fn root_of(conn: &mut AsyncPgConnection, agent: Uuid) -> ServiceResult<Uuid> {
    Ok(ancestor_chain(conn, agent)
        .await?
        .last()
        .copied()
        .unwrap_or(agent))
}

/// An agent lifecycle event about `agent` (its root is looked up in the caller's
/// transaction, so it is the root after the change).
async fn lifecycle_event(
    conn: &mut AsyncPgConnection,
    actor: &str,
    kind: &str,
    agent: Uuid,
    change: pb::agent_lifecycle_event::Change,
) -> ServiceResult<AdminEvent> {
    let root = root_of(conn, agent).await?;
    Ok(AdminEvent::lifecycle(
        actor,
        pb::AgentLifecycleEvent {
            kind: kind.to_owned(),
            agent_id: agent.to_string(),
            root_agent_id: root.to_string(),
            change: Some(change),
            ..Default::default()
        },
    ))
}

/// Identity kinds the gateway can verify.
pub const IDENTITY_KINDS: [&str; 2] = ["spiffe", "jwt"];

pub struct AgentAdmin {
    state: AdminState,
}

impl AgentAdmin {
    pub fn new(state: AdminState) -> Self {
        Self { state }
    }
}

fn parse_metadata(text: &str) -> ServiceResult<serde_json::Value> {
    if text.trim().is_empty() {
        return Ok(serde_json::Value::Object(Default::default()));
    }
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(v @ serde_json::Value::Object(_)) => Ok(v),
        Ok(_) => Err(ServiceError::InvalidArgument(
            "metadata must be a JSON object, e.g. {\"team\":\"platform\"}".to_owned(),
        )),
        Err(e) => Err(ServiceError::InvalidArgument(format!(
            "metadata is not valid JSON: {e}"
        ))),
    }
}

/// Loads an agent by id or, when the text is not a UUID, by its unique name.
pub async fn find_agent(conn: &mut AsyncPgConnection, id_or_name: &str) -> ServiceResult<AgentRow> {
    let key = id_or_name.trim();
    if key.is_empty() {
        return Err(ServiceError::InvalidArgument(
            "agent id or name is required".to_owned(),
        ));
    }
    let query = agents::table.select(AgentRow::as_select()).into_boxed();
    let query = match Uuid::parse_str(key) {
        Ok(id) => query.filter(agents::id.eq(id)),
        Err(_) => query.filter(agents::name.eq(key.to_owned())),
    };
    query
        .first(conn)
        .await
        .optional()?
        .ok_or_else(|| ServiceError::NotFound(format!("agent {key:?} not found")))
}

/// Ancestors of `agent`, nearest first (bounded by the hierarchy depth limit).
pub async fn ancestor_chain(conn: &mut AsyncPgConnection, start: Uuid) -> ServiceResult<Vec<Uuid>> {
    let mut chain = Vec::new();
    let mut next = Some(start);
    while let Some(id) = next {
        if chain.len() > MAX_HIERARCHY_DEPTH {
            break;
        }
        chain.push(id);
        next = agents::table
            .select(agents::parent_id)
            .filter(agents::id.eq(id))
            .first::<Option<Uuid>>(conn)
            .await
            .optional()?
            .flatten();
    }
    Ok(chain)
}

/// Friendly pre-check of a new parent; the database trigger is the guarantee.
async fn check_parent(
    conn: &mut AsyncPgConnection,
    agent: Option<Uuid>,
    parent: Uuid,
) -> ServiceResult<()> {
    let parent_row = find_agent(conn, &parent.to_string())
        .await
        .map_err(|e| match e {
            ServiceError::NotFound(_) => {
                ServiceError::NotFound(format!("parent agent {parent} not found"))
            }
            other => other,
        })?;
    if parent_row.status != "active" {
        return Err(ServiceError::FailedPrecondition(format!(
            "parent agent {parent} is inactive"
        )));
    }
    let chain: Vec<String> = ancestor_chain(conn, parent)
        .await?
        .iter()
        .map(Uuid::to_string)
        .collect();
    let me = agent.map(|a| a.to_string()).unwrap_or_default();
    caracal_domain::hierarchy::check_new_parent(&me, &chain).map_err(|e| {
        let why = match e {
            HierarchyError::Cycle { .. } => "that would create a cycle".to_owned(),
            other => other.to_string(),
        };
        ServiceError::FailedPrecondition(format!("cannot set parent {parent}: {why}"))
    })
}

#[tonic::async_trait]
impl AgentService for AgentAdmin {
    async fn create_agent(
        &self,
        request: Request<pb::CreateAgentRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        let changed_by = actor(&request);
        let result: ServiceResult<_> = async {
            let req = request.into_inner();
            let name = convert::required_text("name", &req.name, 200)?;
            let agent_type = convert::required_text("type", &req.agent_type, 64)?;
            let metadata = parse_metadata(&req.metadata_json)?;
            let parent = convert::opt_uuid("parent_id", &req.parent_id)?;
            let mut conn = db::conn(&self.state.pool).await?;
            let row = conn
                .transaction::<_, ServiceError, _>(async move |conn| {
                    if let Some(parent) = parent {
                        check_parent(conn, None, parent).await?;
                    }
                    let row = diesel::insert_into(agents::table)
                        .values((
                            agents::id.eq(Uuid::now_v7()),
                            agents::name.eq(&name),
                            agents::agent_type.eq(&agent_type),
                            agents::parent_id.eq(parent),
                            agents::metadata.eq(&metadata),
                        ))
                        .returning(AgentRow::as_returning())
                        .get_result(conn)
                        .await
                        .map_err(|e| match ServiceError::from(e) {
                            ServiceError::AlreadyExists(_) => ServiceError::AlreadyExists(format!(
                                "an agent named {name:?} already exists"
                            )),
                            other => other,
                        })?;
                    let change = pb::agent_lifecycle_event::Change::Agent(pb::AgentChange {
                        before: None,
                        after: Some(row.state()),
                    });
                    let event =
                        lifecycle_event(conn, &changed_by, "agent_created", row.id, change).await?;
                    commit_change(conn, &[event]).await?;
                    Ok(row)
                })
                .await?;
            tracing::info!(agent_id = %row.id, name = %row.name, "agent created");
            Ok::<_, ServiceError>(pb::Agent::from(row))
        }
        .await;
        respond("CreateAgent", result)
    }

    async fn get_agent(
        &self,
        request: Request<pb::GetAgentRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        let result: ServiceResult<_> = async {
            let req = request.into_inner();
            let mut conn = db::conn(&self.state.pool).await?;
            Ok::<_, ServiceError>(pb::Agent::from(
                find_agent(&mut conn, &req.id_or_name).await?,
            ))
        }
        .await;
        respond("GetAgent", result)
    }

    async fn list_agents(
        &self,
        request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let result: ServiceResult<_> = async {
            let req = request.into_inner();
            let limit = convert::page_limit(req.page.as_ref());
            let after = convert::page_after(req.page.as_ref())?;
            let parent = convert::opt_uuid("parent_id", &req.parent_id)?;
            let status = req.status.trim().to_owned();
            if !status.is_empty() && status != "active" && status != "inactive" {
                return Err(ServiceError::InvalidArgument(format!(
                    "status must be \"active\" or \"inactive\", not {status:?}"
                )));
            }
            let mut query = agents::table
                .select(AgentRow::as_select())
                .order(agents::id.asc())
                .limit(limit)
                .into_boxed();
            if !status.is_empty() {
                query = query.filter(agents::status.eq(status));
            }
            if let Some(p) = parent {
                query = query.filter(agents::parent_id.eq(p));
            }
            if let Some(a) = after {
                query = query.filter(agents::id.gt(a));
            }
            let mut conn = db::conn(&self.state.pool).await?;
            let rows: Vec<AgentRow> = query.load(&mut conn).await?;
            let next_page_token = if rows.len() as i64 == limit {
                rows.last().map(|r| r.id.to_string()).unwrap_or_default()
            } else {
                String::new()
            };
            Ok(pb::ListAgentsResponse {
                agents: rows.into_iter().map(pb::Agent::from).collect(),
                next_page_token,
            })
        }
        .await;
        respond("ListAgents", result)
    }

    async fn update_agent(
        &self,
        request: Request<pb::UpdateAgentRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        let changed_by = actor(&request);
        let result: ServiceResult<_> = async {
            let req = request.into_inner();
            let id = convert::uuid("id", &req.id)?;
            let agent_type = req
                .agent_type
                .as_deref()
                .map(|t| convert::required_text("type", t, 64))
                .transpose()?;
            let metadata = req
                .metadata_json
                .as_deref()
                .map(parse_metadata)
                .transpose()?;
            let parent = req
                .parent_id
                .as_deref()
                .map(|p| convert::opt_uuid("parent_id", p))
                .transpose()?;
            let mut conn = db::conn(&self.state.pool).await?;
            let guard = self.state.counters.clone();
            let pending = PendingFences::default();
            let fences = pending.clone();
            let result = conn
                .transaction::<_, ServiceError, _>(async move |conn| {
                    let current = find_agent(conn, &id.to_string()).await?;
                    if let Some(Some(p)) = parent {
                        if p == id {
                            return Err(ServiceError::FailedPrecondition(
                                "an agent cannot be its own parent".to_owned(),
                            ));
                        }
                        check_parent(conn, Some(id), p).await?;
                    }
                    if let Some(new_parent) = parent.filter(|p| *p != current.parent_id) {
                        // The hierarchy's budget counters live in its root's partition:
                        // a move that changes it is refused while the moved policies
                        // hold spend (see admin::counters).
                        fences.add(guard_reparent(conn, &guard, id, new_parent).await?);
                    }
                    let before = current.state();
                    let row = diesel::update(agents::table.filter(agents::id.eq(id)))
                        .set((
                            agents::agent_type.eq(agent_type.unwrap_or(current.agent_type)),
                            agents::metadata.eq(metadata.unwrap_or(current.metadata)),
                            agents::parent_id.eq(parent.unwrap_or(current.parent_id)),
                            agents::updated_at.eq(diesel::dsl::now),
                        ))
                        .returning(AgentRow::as_returning())
                        .get_result(conn)
                        .await?;
                    let change = pb::agent_lifecycle_event::Change::Agent(pb::AgentChange {
                        before: Some(before),
                        after: Some(row.state()),
                    });
                    let event =
                        lifecycle_event(conn, &changed_by, "agent_updated", id, change).await?;
                    commit_change(conn, &[event]).await?;
                    Ok(row)
                })
                .await;
            pending.settle(&self.state.counters, &result).await;
            Ok::<_, ServiceError>(pb::Agent::from(result?))
        }
        .await;
        respond("UpdateAgent", result)
    }

    async fn deactivate_agent(
        &self,
        request: Request<pb::DeactivateAgentRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        let changed_by = actor(&request);
        let result: ServiceResult<_> = async {
            let id = convert::uuid("id", &request.get_ref().id)?;
            let mut conn = db::conn(&self.state.pool).await?;
            let row = conn
                .transaction::<_, ServiceError, _>(async move |conn| {
                    {
                        let current = find_agent(conn, &id.to_string()).await?;
                        if current.status == "inactive" {
                            // Idempotent: a retried deactivation changes nothing.
                            return Ok(current);
                        }
                        let row = diesel::update(agents::table.filter(agents::id.eq(id)))
                            .set((
                                agents::status.eq("inactive"),
                                agents::updated_at.eq(diesel::dsl::now),
                            ))
                            .returning(AgentRow::as_returning())
                            .get_result(conn)
                            .await?;
                        let change = pb::agent_lifecycle_event::Change::Agent(pb::AgentChange {
                            before: Some(current.state()),
                            after: Some(row.state()),
                        });
                        let event =
                            lifecycle_event(conn, &changed_by, "agent_deactivated", id, change)
                                .await?;
                        commit_change(conn, &[event]).await?;
                        Ok(row)
                    }
                })
                .await?;
            tracing::info!(agent_id = %row.id, "agent deactivated");
            Ok::<_, ServiceError>(pb::Agent::from(row))
        }
        .await;
        respond("DeactivateAgent", result)
    }

    async fn issue_api_key(
        &self,
        request: Request<pb::IssueApiKeyRequest>,
    ) -> Result<Response<pb::IssueApiKeyResponse>, Status> {
        let changed_by = actor(&request);
        let result: ServiceResult<_> = async {
            let agent_key = request.get_ref().agent_id.clone();
            let mut conn = db::conn(&self.state.pool).await?;
            let agent = find_agent(&mut conn, &agent_key).await?;
            if agent.status != "active" {
                return Err(ServiceError::FailedPrecondition(format!(
                    "agent {} is inactive; keys can only be issued to active agents",
                    agent.id
                )));
            }
            let new_key = keys::generate(&self.state.api_key_pepper);
            let (prefix, hash) = (new_key.display_prefix.clone(), new_key.hash.to_vec());
            let row = conn
                .transaction::<_, ServiceError, _>(async move |conn| {
                    let row = diesel::insert_into(agent_api_keys::table)
                        .values((
                            agent_api_keys::id.eq(Uuid::now_v7()),
                            agent_api_keys::agent_id.eq(agent.id),
                            agent_api_keys::key_prefix.eq(prefix),
                            agent_api_keys::key_hash.eq(hash),
                        ))
                        .returning(ApiKeyRow::as_returning())
                        .get_result(conn)
                        .await?;
                    let change = pb::agent_lifecycle_event::Change::ApiKey(pb::ApiKeyChange {
                        before: None,
                        after: Some(row.state()),
                    });
                    let event =
                        lifecycle_event(conn, &changed_by, "api_key_issued", agent.id, change)
                            .await?;
                    commit_change(conn, &[event]).await?;
                    Ok(row)
                })
                .await?;
            tracing::info!(agent_id = %row.agent_id, key_id = %row.id, "api key issued");
            Ok(pb::IssueApiKeyResponse {
                key: Some(row.into()),
                secret: new_key.secret,
            })
        }
        .await;
        respond("IssueApiKey", result)
    }

    async fn revoke_api_key(
        &self,
        request: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::ApiKey>, Status> {
        let changed_by = actor(&request);
        let result: ServiceResult<_> = async {
            let id = convert::uuid("key_id", &request.get_ref().key_id)?;
            let mut conn = db::conn(&self.state.pool).await?;
            let row = conn
                .transaction::<_, ServiceError, _>(async move |conn| {
                    let current: ApiKeyRow = agent_api_keys::table
                        .select(ApiKeyRow::as_select())
                        .filter(agent_api_keys::id.eq(id))
                        .first(conn)
                        .await
                        .optional()?
                        .ok_or_else(|| ServiceError::NotFound(format!("api key {id} not found")))?;
                    if current.revoked_at.is_some() {
                        return Ok(current);
                    }
                    let row =
                        diesel::update(agent_api_keys::table.filter(agent_api_keys::id.eq(id)))
                            .set(agent_api_keys::revoked_at.eq(diesel::dsl::now))
                            .returning(ApiKeyRow::as_returning())
                            .get_result(conn)
                            .await?;
                    let change = pb::agent_lifecycle_event::Change::ApiKey(pb::ApiKeyChange {
                        before: Some(current.state()),
                        after: Some(row.state()),
                    });
                    let event =
                        lifecycle_event(conn, &changed_by, "api_key_revoked", row.agent_id, change)
                            .await?;
                    commit_change(conn, &[event]).await?;
                    Ok(row)
                })
                .await?;
            tracing::info!(key_id = %row.id, "api key revoked");
            Ok::<_, ServiceError>(pb::ApiKey::from(row))
        }
        .await;
        respond("RevokeApiKey", result)
    }

    async fn list_api_keys(
        &self,
        request: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        let result: ServiceResult<_> = async {
            let mut conn = db::conn(&self.state.pool).await?;
            let agent = find_agent(&mut conn, &request.get_ref().agent_id).await?;
            let rows: Vec<ApiKeyRow> = agent_api_keys::table
                .select(ApiKeyRow::as_select())
                .filter(agent_api_keys::agent_id.eq(agent.id))
                .order(agent_api_keys::id.asc())
                .limit(1000)
                .load(&mut conn)
                .await?;
            Ok::<_, ServiceError>(pb::ListApiKeysResponse {
                keys: rows.into_iter().map(pb::ApiKey::from).collect(),
            })
        }
        .await;
        respond("ListApiKeys", result)
    }

    async fn add_identity(
        &self,
        request: Request<pb::AddIdentityRequest>,
    ) -> Result<Response<pb::AgentIdentity>, Status> {
        let changed_by = actor(&request);
        let result: ServiceResult<_> = async {
            let req = request.into_inner();
            let kind = req.kind.trim().to_lowercase();
            if !IDENTITY_KINDS.contains(&kind.as_str()) {
                return Err(ServiceError::InvalidArgument(format!(
                    "kind must be \"spiffe\" or \"jwt\", not {:?}",
                    req.kind
                )));
            }
            let value = convert::required_text("value", &req.value, 2048)?;
            if kind == "spiffe" && !value.starts_with("spiffe://") {
                return Err(ServiceError::InvalidArgument(format!(
                    "a SPIFFE id starts with spiffe://, got {value:?}"
                )));
            }
            // A claim means nothing without the issuer that minted it: binding `sub`
            // alone would let any issuer the gateway trusts speak for this agent.
            let issuer = req.issuer.trim().to_owned();
            if kind == "jwt" && issuer.is_empty() {
                return Err(ServiceError::InvalidArgument(
                    "a jwt identity needs its issuer (the token's `iss`, exactly)".to_owned(),
                ));
            }
            if kind == "spiffe" && !issuer.is_empty() {
                return Err(ServiceError::InvalidArgument(
                    "a spiffe identity takes no issuer (the id names its trust domain)"
                        .to_owned(),
                ));
            }
            if issuer.len() > 2048 || issuer.chars().any(char::is_control) {
                return Err(ServiceError::InvalidArgument(
                    "issuer must be at most 2048 characters, without control characters"
                        .to_owned(),
                ));
            }
            let mut conn = db::conn(&self.state.pool).await?;
            let agent = find_agent(&mut conn, &req.agent_id).await?;
            let row = conn
                .transaction::<_, ServiceError, _>(async move |conn| {
                    let row = diesel::insert_into(agent_identities::table)
                        .values((
                            agent_identities::id.eq(Uuid::now_v7()),
                            agent_identities::agent_id.eq(agent.id),
                            agent_identities::kind.eq(&kind),
                            agent_identities::issuer.eq(&issuer),
                            agent_identities::value.eq(&value),
                        ))
                        .returning(IdentityRow::as_returning())
                        .get_result(conn)
                        .await
                        .map_err(|e| match ServiceError::from(e) {
                            ServiceError::AlreadyExists(_) if issuer.is_empty() => {
                                ServiceError::AlreadyExists(format!(
                                    "{kind} identity {value:?} is already bound to an agent"
                                ))
                            }
                            ServiceError::AlreadyExists(_) => ServiceError::AlreadyExists(format!(
                                "{kind} identity {value:?} of issuer {issuer:?} is already bound to an agent"
                            )),
                            other => other,
                        })?;
                    let change = pb::agent_lifecycle_event::Change::Identity(pb::IdentityChange {
                        before: None,
                        after: Some(row.state()),
                    });
                    let event =
                        lifecycle_event(conn, &changed_by, "identity_added", agent.id, change)
                            .await?;
                    commit_change(conn, &[event]).await?;
                    Ok(row)
                })
                .await?;
            Ok(pb::AgentIdentity::from(row))
        }
        .await;
        respond("AddIdentity", result)
    }

    async fn remove_identity(
        &self,
        request: Request<pb::RemoveIdentityRequest>,
    ) -> Result<Response<pb::RemoveIdentityResponse>, Status> {
        let changed_by = actor(&request);
        let result: ServiceResult<_> = async {
            let id = convert::uuid("id", &request.get_ref().id)?;
            let mut conn = db::conn(&self.state.pool).await?;
            conn.transaction::<_, ServiceError, _>(async move |conn| {
                let removed: IdentityRow =
                    diesel::delete(agent_identities::table.filter(agent_identities::id.eq(id)))
                        .returning(IdentityRow::as_returning())
                        .get_result(conn)
                        .await
                        .optional()?
                        .ok_or_else(|| {
                            ServiceError::NotFound(format!("identity {id} not found"))
                        })?;
                let change = pb::agent_lifecycle_event::Change::Identity(pb::IdentityChange {
                    before: Some(removed.state()),
                    after: None,
                });
                let event = lifecycle_event(
                    conn,
                    &changed_by,
                    "identity_removed",
                    removed.agent_id,
                    change,
                )
                .await?;
                commit_change(conn, &[event]).await
            })
            .await?;
            Ok(pb::RemoveIdentityResponse {})
        }
        .await;
        respond("RemoveIdentity", result)
    }

    async fn list_identities(
        &self,
        request: Request<pb::ListIdentitiesRequest>,
    ) -> Result<Response<pb::ListIdentitiesResponse>, Status> {
        let result: ServiceResult<_> = async {
            let mut conn = db::conn(&self.state.pool).await?;
            let agent = find_agent(&mut conn, &request.get_ref().agent_id).await?;
            let rows: Vec<IdentityRow> = agent_identities::table
                .select(IdentityRow::as_select())
                .filter(agent_identities::agent_id.eq(agent.id))
                .order(agent_identities::id.asc())
                .limit(1000)
                .load(&mut conn)
                .await?;
            Ok(pb::ListIdentitiesResponse {
                identities: rows.into_iter().map(pb::AgentIdentity::from).collect(),
            })
        }
        .await;
        respond("ListIdentities", result)
    }
}
