//! PolicyService: budget policies and their version history.
//!
//! Every change writes the policy row and a `policy_versions` row in one transaction,
//! so the history is complete by construction: version n of a policy is exactly the
//! state it had between `changed_at(n)` and `changed_at(n+1)`.

use caracal_domain::{
    money::{parse_positive_limit, Currency},
    policy::OnExpiry,
    window::{TimeWindow, WindowType},
};
use caracal_proto::v1::{self as pb, policy_service_server::PolicyService};
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::{
    agents::{find_agent, root_of},
    commit_change,
    counters::{guard_policy_change, PendingFences},
    respond, AdminState,
};
use crate::{
    admin_events::AdminEvent,
    auth::actor,
    catalog::PolicyInfo,
    convert::{self, money, timestamp},
    db::{
        self,
        schema::{policies, policy_versions},
    },
    error::{ServiceError, ServiceResult},
};

#[derive(Queryable, Selectable, Debug, Clone)]
#[diesel(table_name = policies)]
pub struct PolicyRow {
    pub id: Uuid,
    pub agent_id: Uuid,
    pub limit_micros: i64,
    pub currency: String,
    pub time_window: String,
    pub window_type: String,
    pub on_expiry: String,
    pub active: bool,
    pub version: i32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<PolicyRow> for pb::Policy {
    fn from(r: PolicyRow) -> Self {
        pb::Policy {
            id: r.id.to_string(),
            agent_id: r.agent_id.to_string(),
            limit: Some(money(r.limit_micros, &r.currency)),
            time_window: r.time_window,
            window_type: r.window_type,
            on_expiry: r.on_expiry,
            active: r.active,
            version: r.version,
            created_at: Some(timestamp(r.created_at)),
            updated_at: Some(timestamp(r.updated_at)),
        }
    }
}

impl PolicyRow {
    /// The policy's changeable fields, for change events.
    pub fn state(&self) -> pb::PolicyState {
        pb::PolicyState {
            limit: Some(money(self.limit_micros, &self.currency)),
            time_window: self.time_window.clone(),
            window_type: self.window_type.clone(),
            on_expiry: self.on_expiry.clone(),
            active: self.active,
            version: self.version,
        }
    }
}

/// The change event of a policy write (`before` absent for a creation), keyed by
/// the root agent of the policy's agent.
async fn policy_event(
    conn: &mut AsyncPgConnection,
    actor: &str,
    kind: &str,
    before: Option<&PolicyRow>,
    after: &PolicyRow,
) -> ServiceResult<AdminEvent> {
    let root = root_of(conn, after.agent_id).await?.to_string();
    Ok(AdminEvent::policy_change(
        actor,
        root.clone(),
        pb::PolicyChangeEvent {
            kind: kind.to_owned(),
            policy_id: after.id.to_string(),
            agent_id: after.agent_id.to_string(),
            root_agent_id: root,
            version: after.version,
            change: Some(pb::policy_change_event::Change::Policy(pb::PolicyChange {
                before: before.map(PolicyRow::state),
                after: Some(after.state()),
            })),
            ..Default::default()
        },
    ))
}

#[derive(Queryable, Selectable, Insertable, Debug, Clone)]
#[diesel(table_name = policy_versions)]
pub struct PolicyVersionRow {
    pub policy_id: Uuid,
    pub version: i32,
    pub agent_id: Uuid,
    pub limit_micros: i64,
    pub currency: String,
    pub time_window: String,
    pub window_type: String,
    pub on_expiry: String,
    pub active: bool,
    pub change_kind: String,
    pub changed_by: String,
    pub changed_at: DateTime<Utc>,
}

impl PolicyVersionRow {
    fn of(p: &PolicyRow, change_kind: &str, changed_by: &str) -> Self {
        Self {
            policy_id: p.id,
            version: p.version,
            agent_id: p.agent_id,
            limit_micros: p.limit_micros,
            currency: p.currency.clone(),
            time_window: p.time_window.clone(),
            window_type: p.window_type.clone(),
            on_expiry: p.on_expiry.clone(),
            active: p.active,
            change_kind: change_kind.to_owned(),
            changed_by: changed_by.to_owned(),
            changed_at: p.updated_at,
        }
    }

    fn to_pb(&self, previous: Option<&PolicyVersionRow>) -> pb::PolicyVersion {
        pb::PolicyVersion {
            policy_id: self.policy_id.to_string(),
            version: self.version,
            limit: Some(money(self.limit_micros, &self.currency)),
            time_window: self.time_window.clone(),
            window_type: self.window_type.clone(),
            on_expiry: self.on_expiry.clone(),
            active: self.active,
            change_kind: self.change_kind.clone(),
            changed_by: self.changed_by.clone(),
            changed_at: Some(timestamp(self.changed_at)),
            diff: previous.map(|p| diff(p, self)).unwrap_or_default(),
        }
    }
}

/// Human-readable differences between two versions, one line per changed field.
pub fn diff(old: &PolicyVersionRow, new: &PolicyVersionRow) -> Vec<String> {
    let mut out = Vec::new();
    let amount = |v: &PolicyVersionRow| {
        format!(
            "{} {}",
            caracal_domain::money::format_amount(v.limit_micros),
            v.currency
        )
    };
    if old.limit_micros != new.limit_micros || old.currency != new.currency {
        out.push(format!("limit: {} -> {}", amount(old), amount(new)));
    }
    let mut field = |name: &str, a: &str, b: &str| {
        if a != b {
            out.push(format!("{name}: {a} -> {b}"));
        }
    };
    field("time_window", &old.time_window, &new.time_window);
    field("window_type", &old.window_type, &new.window_type);
    field("on_expiry", &old.on_expiry, &new.on_expiry);
    field("active", &old.active.to_string(), &new.active.to_string());
    out
}

/// Validated policy fields.
struct PolicyFields {
    limit_micros: i64,
    currency: Currency,
    time_window: TimeWindow,
    window_type: WindowType,
    on_expiry: OnExpiry,
}

fn parse_limit(text: &str) -> ServiceResult<i64> {
    parse_positive_limit(text).map_err(|e| ServiceError::invalid("limit", e))
}
fn parse_currency(text: &str) -> ServiceResult<Currency> {
    Currency::parse(text).map_err(|e| ServiceError::invalid("currency", e))
}
fn parse_window(text: &str) -> ServiceResult<TimeWindow> {
    text.trim()
        .parse()
        .map_err(|e| ServiceError::invalid("time_window", e))
}
fn parse_window_type(text: &str) -> ServiceResult<WindowType> {
    text.trim()
        .parse()
        .map_err(|e| ServiceError::invalid("window_type", e))
}
fn parse_on_expiry(text: &str) -> ServiceResult<OnExpiry> {
    if text.trim().is_empty() {
        return Ok(OnExpiry::default());
    }
    text.trim()
        .parse()
        .map_err(|e| ServiceError::invalid("on_expiry", e))
}

pub struct PolicyAdmin {
    state: AdminState,
}

impl PolicyAdmin {
    pub fn new(state: AdminState) -> Self {
        Self { state }
    }
}

async fn load_policy(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    for_update: bool,
) -> ServiceResult<PolicyRow> {
    let query = policies::table
        .select(PolicyRow::as_select())
        .filter(policies::id.eq(id));
    let row = if for_update {
        query.for_update().first(conn).await.optional()?
    } else {
        query.first(conn).await.optional()?
    };
    row.ok_or_else(|| ServiceError::NotFound(format!("policy {id} not found")))
}

/// Writes a new version of a policy: the row, its history entry and its change
/// event (`event_kind`), together.
async fn write_version(
    conn: &mut AsyncPgConnection,
    current: &PolicyRow,
    fields: PolicyFields,
    active: bool,
    (change_kind, event_kind): (&str, &str),
    changed_by: &str,
) -> ServiceResult<PolicyRow> {
    let row = diesel::update(policies::table.filter(policies::id.eq(current.id)))
        .set((
            policies::limit_micros.eq(fields.limit_micros),
            policies::currency.eq(fields.currency.as_str()),
            policies::time_window.eq(fields.time_window.as_str()),
            policies::window_type.eq(fields.window_type.as_str()),
            policies::on_expiry.eq(fields.on_expiry.as_str()),
            policies::active.eq(active),
            policies::version.eq(current.version + 1),
            policies::updated_at.eq(diesel::dsl::now),
        ))
        .returning(PolicyRow::as_returning())
        .get_result(conn)
        .await?;
    diesel::insert_into(policy_versions::table)
        .values(PolicyVersionRow::of(&row, change_kind, changed_by))
        .execute(conn)
        .await?;
    let event = policy_event(conn, changed_by, event_kind, Some(current), &row).await?;
    commit_change(conn, &[event]).await?;
    Ok(row)
}

fn fields_of(p: &PolicyRow) -> ServiceResult<PolicyFields> {
    Ok(PolicyFields {
        limit_micros: p.limit_micros,
        currency: parse_currency(&p.currency)?,
        time_window: parse_window(&p.time_window)?,
        window_type: parse_window_type(&p.window_type)?,
        on_expiry: parse_on_expiry(&p.on_expiry)?,
    })
}

/// The policy as the hot path would count it with these fields.
fn info_of(row: &PolicyRow, f: &PolicyFields) -> PolicyInfo {
    PolicyInfo {
        id: row.id,
        agent_id: row.agent_id,
        limit_micros: f.limit_micros,
        currency: f.currency,
        window: f.time_window,
        window_type: f.window_type,
        on_expiry: f.on_expiry,
    }
}

#[tonic::async_trait]
impl PolicyService for PolicyAdmin {
    async fn create_policy(
        &self,
        request: Request<pb::CreatePolicyRequest>,
    ) -> Result<Response<pb::Policy>, Status> {
        let changed_by = actor(&request);
        let result: ServiceResult<_> = async {
            let req = request.into_inner();
            let fields = PolicyFields {
                limit_micros: parse_limit(&req.limit)?,
                currency: parse_currency(&req.currency)?,
                time_window: parse_window(&req.time_window)?,
                window_type: parse_window_type(&req.window_type)?,
                on_expiry: parse_on_expiry(&req.on_expiry)?,
            };
            let mut conn = db::conn(&self.state.pool).await?;
            let agent = find_agent(&mut conn, &req.agent_id).await?;
            if agent.status != "active" {
                return Err(ServiceError::FailedPrecondition(format!(
                    "agent {} is inactive; policies can only be added to active agents",
                    agent.id
                )));
            }
            let row = conn
                .transaction::<_, ServiceError, _>(async move |conn| {
                    let row = diesel::insert_into(policies::table)
                        .values((
                            policies::id.eq(Uuid::now_v7()),
                            policies::agent_id.eq(agent.id),
                            policies::limit_micros.eq(fields.limit_micros),
                            policies::currency.eq(fields.currency.as_str()),
                            policies::time_window.eq(fields.time_window.as_str()),
                            policies::window_type.eq(fields.window_type.as_str()),
                            policies::on_expiry.eq(fields.on_expiry.as_str()),
                        ))
                        .returning(PolicyRow::as_returning())
                        .get_result(conn)
                        .await?;
                    diesel::insert_into(policy_versions::table)
                        .values(PolicyVersionRow::of(&row, "create", &changed_by))
                        .execute(conn)
                        .await?;
                    let event =
                        policy_event(conn, &changed_by, "policy_created", None, &row).await?;
                    commit_change(conn, &[event]).await?;
                    Ok(row)
                })
                .await?;
            tracing::info!(policy_id = %row.id, agent_id = %row.agent_id, "policy created");
            Ok(pb::Policy::from(row))
        }
        .await;
        respond("CreatePolicy", result)
    }

    async fn get_policy(
        &self,
        request: Request<pb::GetPolicyRequest>,
    ) -> Result<Response<pb::Policy>, Status> {
        let result: ServiceResult<_> = async {
            let id = convert::uuid("id", &request.get_ref().id)?;
            let mut conn = db::conn(&self.state.pool).await?;
            Ok(pb::Policy::from(load_policy(&mut conn, id, false).await?))
        }
        .await;
        respond("GetPolicy", result)
    }

    async fn list_policies(
        &self,
        request: Request<pb::ListPoliciesRequest>,
    ) -> Result<Response<pb::ListPoliciesResponse>, Status> {
        let result: ServiceResult<_> = async {
            let req = request.into_inner();
            let limit = convert::page_limit(req.page.as_ref());
            let after = convert::page_after(req.page.as_ref())?;
            let mut conn = db::conn(&self.state.pool).await?;
            let mut query = policies::table
                .select(PolicyRow::as_select())
                .order(policies::id.asc())
                .limit(limit)
                .into_boxed();
            if !req.agent_id.trim().is_empty() {
                let agent = find_agent(&mut conn, &req.agent_id).await?;
                query = query.filter(policies::agent_id.eq(agent.id));
            }
            if !req.include_inactive {
                query = query.filter(policies::active.eq(true));
            }
            if let Some(a) = after {
                query = query.filter(policies::id.gt(a));
            }
            let rows: Vec<PolicyRow> = query.load(&mut conn).await?;
            let next_page_token = if rows.len() as i64 == limit {
                rows.last().map(|r| r.id.to_string()).unwrap_or_default()
            } else {
                String::new()
            };
            Ok(pb::ListPoliciesResponse {
                policies: rows.into_iter().map(pb::Policy::from).collect(),
                next_page_token,
            })
        }
        .await;
        respond("ListPolicies", result)
    }

    async fn update_policy(
        &self,
        request: Request<pb::UpdatePolicyRequest>,
    ) -> Result<Response<pb::Policy>, Status> {
        let changed_by = actor(&request);
        let result: ServiceResult<_> = async {
            let req = request.into_inner();
            let id = convert::uuid("id", &req.id)?;
            // Validate every given field before touching the database.
            let limit = req.limit.as_deref().map(parse_limit).transpose()?;
            let currency = req.currency.as_deref().map(parse_currency).transpose()?;
            let time_window = req.time_window.as_deref().map(parse_window).transpose()?;
            let window_type = req
                .window_type
                .as_deref()
                .map(parse_window_type)
                .transpose()?;
            let on_expiry = req.on_expiry.as_deref().map(parse_on_expiry).transpose()?;
            let mut conn = db::conn(&self.state.pool).await?;
            let guard = self.state.counters.clone();
            let pending = PendingFences::default();
            let fences = pending.clone();
            let result = conn
                .transaction::<_, ServiceError, _>(async move |conn| {
                    let current = load_policy(conn, id, true).await?;
                    if req.expected_version != 0 && req.expected_version != current.version {
                        return Err(ServiceError::Aborted(format!(
                            "policy {id} is at version {}, not {}; reload and retry",
                            current.version, req.expected_version
                        )));
                    }
                    let old = fields_of(&current)?;
                    let fields = PolicyFields {
                        limit_micros: limit.unwrap_or(old.limit_micros),
                        currency: currency.unwrap_or(old.currency),
                        time_window: time_window.unwrap_or(old.time_window),
                        window_type: window_type.unwrap_or(old.window_type),
                        on_expiry: on_expiry.unwrap_or(old.on_expiry),
                    };
                    let active = req.active.unwrap_or(current.active);
                    // A window or calendar/rolling change moves the policy to other
                    // budget counters: refused while the old one holds spend, fenced
                    // otherwise (see admin::counters). Other fields keep the counters.
                    let before = info_of(&current, &old);
                    let after = info_of(&current, &fields);
                    fences.add(guard_policy_change(conn, &guard, &before, &after).await?);
                    write_version(
                        conn,
                        &current,
                        fields,
                        active,
                        ("update", "policy_updated"),
                        &changed_by,
                    )
                    .await
                })
                .await;
            pending.settle(&self.state.counters, &result).await;
            let row = result?;
            tracing::info!(policy_id = %row.id, version = row.version, "policy updated");
            Ok(pb::Policy::from(row))
        }
        .await;
        respond("UpdatePolicy", result)
    }

    async fn deactivate_policy(
        &self,
        request: Request<pb::DeactivatePolicyRequest>,
    ) -> Result<Response<pb::Policy>, Status> {
        let changed_by = actor(&request);
        let result: ServiceResult<_> = async {
            let id = convert::uuid("id", &request.get_ref().id)?;
            let mut conn = db::conn(&self.state.pool).await?;
            let row = conn
                .transaction::<_, ServiceError, _>(async move |conn| {
                    let current = load_policy(conn, id, true).await?;
                    if !current.active {
                        return Ok(current);
                    }
                    let fields = fields_of(&current)?;
                    write_version(
                        conn,
                        &current,
                        fields,
                        false,
                        ("deactivate", "policy_deactivated"),
                        &changed_by,
                    )
                    .await
                })
                .await?;
            tracing::info!(policy_id = %row.id, "policy deactivated");
            Ok(pb::Policy::from(row))
        }
        .await;
        respond("DeactivatePolicy", result)
    }

    async fn policy_history(
        &self,
        request: Request<pb::PolicyHistoryRequest>,
    ) -> Result<Response<pb::PolicyHistoryResponse>, Status> {
        let result: ServiceResult<_> = async {
            let id = convert::uuid("id", &request.get_ref().id)?;
            let mut conn = db::conn(&self.state.pool).await?;
            load_policy(&mut conn, id, false).await?;
            let rows: Vec<PolicyVersionRow> = policy_versions::table
                .select(PolicyVersionRow::as_select())
                .filter(policy_versions::policy_id.eq(id))
                .order(policy_versions::version.asc())
                .load(&mut conn)
                .await?;
            let versions = rows
                .iter()
                .enumerate()
                .map(|(i, v)| v.to_pb(i.checked_sub(1).and_then(|p| rows.get(p))))
                .collect();
            Ok(pb::PolicyHistoryResponse { versions })
        }
        .await;
        respond("PolicyHistory", result)
    }

    async fn policy_at(
        &self,
        request: Request<pb::PolicyAtRequest>,
    ) -> Result<Response<pb::PolicyVersion>, Status> {
        let result: ServiceResult<_> = async {
            let req = request.into_inner();
            let id = convert::uuid("id", &req.id)?;
            let at = match &req.at {
                Some(t) => convert::from_timestamp("at", t)?,
                None => Utc::now(),
            };
            let mut conn = db::conn(&self.state.pool).await?;
            load_policy(&mut conn, id, false).await?;
            let rows: Vec<PolicyVersionRow> = policy_versions::table
                .select(PolicyVersionRow::as_select())
                .filter(policy_versions::policy_id.eq(id))
                .filter(policy_versions::changed_at.le(at))
                .order(policy_versions::version.desc())
                .limit(2)
                .load(&mut conn)
                .await?;
            let current = <[PolicyVersionRow]>::first(&rows).ok_or_else(|| {
                ServiceError::NotFound(format!("policy {id} did not exist at {}", at.to_rfc3339()))
            })?;
            Ok(current.to_pb(rows.get(1)))
        }
        .await;
        respond("PolicyAt", result)
    }
}
