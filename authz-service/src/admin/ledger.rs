//! LedgerService: reads the ledger of record (`ledger_events`, written by the
//! ledger-writer) for operators: rows, totals, and a reconciliation of the ledger
//! with the Redis budget counters.
//!
//! Final charges. A reservation may have two charge rows: an `expire_charge`, then
//! the `late_settle` that carries its final charge and supersedes it. Totals take,
//! per reservation, its last charge row, the rule of the view `ledger_final_charges`
//! (late_settle first, then latest occurred_at, then event id). The queries here
//! apply that same rule per row ([`SUPERSEDED`]: "another row of my reservation
//! ranks above me") instead of reading the view, whose DISTINCT ON runs over the
//! whole ledger before any agent or time filter; per row, the reservation index
//! answers it.
//!
//! Reconcile. A charge counts in the policy windows open when its reservation was
//! made (`reserved_at`): the settle, expiry or late settle of a reservation all
//! write to the counters recorded in it. So for each active policy, the ledger side
//! is the final charges naming the policy whose `reserved_at` (`occurred_at` for
//! rows from before it was recorded) falls in the policy's current window, and the
//! Redis side is the spent field(s) of the counter the hot path uses now: the
//! calendar window's hash, or the rolling window's buckets from the oldest still
//! counted. Reserved amounts are not compared: open reservations are not charges.

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use caracal_domain::{
    hierarchy::MAX_HIERARCHY_DEPTH,
    window::{bucket_start, calendar_bounds, rolling_bucket_width},
};
use caracal_proto::v1::{self as pb, ledger_service_server::LedgerService};
use caracal_service_kit::redis::query_each;
use chrono::{DateTime, Days, NaiveDate, Utc};
use diesel::{
    prelude::*,
    sql_types::{Array, BigInt, Bool, Integer, Nullable, Text, Timestamptz},
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use redis::Value;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::{counters::policy_info, respond, AdminState};
use crate::{
    authorize::policy_slot,
    budget::{store::SlotMode, BudgetStore},
    convert::{self, from_timestamp, money, timestamp},
    db::{self, schema::policies},
    error::{ServiceError, ServiceResult},
};

/// Rows per page unless asked otherwise.
pub const DEFAULT_PAGE_SIZE: u32 = 100;
/// Largest page.
pub const MAX_PAGE_SIZE: u32 = 1000;
/// Most policies one Reconcile call checks (name an agent for fewer).
pub const MAX_RECONCILE_POLICIES: i64 = 10_000;
/// Redis commands per pipeline when reading counters.
const REDIS_BATCH: usize = 500;
/// A charge's occurred_at may precede its reserved_at by this much (the clocks of
/// the replicas that reserved and settled): the margin of the time pre-filter.
const CLOCK_SKEW_MARGIN: &str = "1 day";

/// `true` when a later charge row of the same reservation replaces row `e` in
/// totals (the rule of the view `ledger_final_charges`).
const SUPERSEDED: &str = "EXISTS (SELECT 1 FROM ledger_events s \
    WHERE s.reservation_id = e.reservation_id \
      AND (s.kind = 'late_settle', s.occurred_at, s.event_id) \
        > (e.kind = 'late_settle', e.occurred_at, e.event_id))";

/// The agents a query covers: `$1` alone, or with every descendant when `$2`
/// (bounded by the hierarchy depth limit, which the database enforces anyway).
fn agent_tree() -> String {
    format!(
        "WITH RECURSIVE tree(id, depth) AS ( \
            SELECT $1::uuid, 0 \
          UNION \
            SELECT a.id, t.depth + 1 FROM agents a JOIN tree t ON a.parent_id = t.id \
            WHERE $2 AND t.depth < {MAX_HIERARCHY_DEPTH} \
        )"
    )
}

pub struct LedgerAdmin {
    state: AdminState,
    store: BudgetStore,
}

impl LedgerAdmin {
    /// `store`: the budget counters Reconcile compares with.
    pub fn new(state: AdminState, store: BudgetStore) -> Self {
        Self { state, store }
    }
}

// ------------------------------------------------------------------ input

/// `[start, end)` on occurred_at; `None` is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TimeRange {
    pub start: Option<DateTime<Utc>>,
    pub end: Option<DateTime<Utc>>,
}

fn date(field: &str, text: &str) -> ServiceResult<NaiveDate> {
    NaiveDate::parse_from_str(text.trim(), "%Y-%m-%d").map_err(|_| {
        ServiceError::InvalidArgument(format!("{field} {text:?} is not a date (YYYY-MM-DD, UTC)"))
    })
}

/// The range of a request: dates (end date included) or timestamps (end excluded).
pub fn time_range(range: Option<&pb::LedgerTimeRange>) -> ServiceResult<TimeRange> {
    let Some(r) = range else {
        return Ok(TimeRange::default());
    };
    let midnight = |d: NaiveDate| d.and_time(chrono::NaiveTime::MIN).and_utc();
    let start = match (r.start_date.trim(), &r.start_time) {
        ("", None) => None,
        ("", Some(t)) => Some(from_timestamp("start_time", t)?),
        (d, None) => Some(midnight(date("start_date", d)?)),
        (_, Some(_)) => {
            return Err(ServiceError::InvalidArgument(
                "give start_date or start_time, not both".to_owned(),
            ))
        }
    };
    let end = match (r.end_date.trim(), &r.end_time) {
        ("", None) => None,
        ("", Some(t)) => Some(from_timestamp("end_time", t)?),
        (d, None) => {
            // The end date is included: the range ends at the next midnight.
            let day = date("end_date", d)?;
            let next = day.checked_add_days(Days::new(1)).ok_or_else(|| {
                ServiceError::InvalidArgument(format!("end_date {d:?} is out of range"))
            })?;
            Some(midnight(next))
        }
        (_, Some(_)) => {
            return Err(ServiceError::InvalidArgument(
                "give end_date or end_time, not both".to_owned(),
            ))
        }
    };
    if let (Some(s), Some(e)) = (start, end) {
        if e < s {
            return Err(ServiceError::InvalidArgument(format!(
                "the range ends before it starts ({} .. {}); the end date is included",
                s.to_rfc3339(),
                e.to_rfc3339()
            )));
        }
    }
    Ok(TimeRange { start, end })
}

/// The page size asked for: 0 means the default.
pub fn page_size(asked: u32) -> ServiceResult<u32> {
    match asked {
        0 => Ok(DEFAULT_PAGE_SIZE),
        n if n <= MAX_PAGE_SIZE => Ok(n),
        n => Err(ServiceError::InvalidArgument(format!(
            "page_size {n} is out of range (1..={MAX_PAGE_SIZE}; 0 = {DEFAULT_PAGE_SIZE})"
        ))),
    }
}

/// Where a page starts: after the row (occurred_at, event_id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub occurred_at: DateTime<Utc>,
    pub event_id: String,
}

impl Cursor {
    /// Opaque to callers: base64 of `v1:<occurred_at µs>:<event id>`.
    pub fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(format!(
            "v1:{}:{}",
            self.occurred_at.timestamp_micros(),
            self.event_id
        ))
    }

    pub fn decode(token: &str) -> ServiceResult<Option<Self>> {
        let token = token.trim();
        if token.is_empty() {
            return Ok(None);
        }
        let bad = || {
            ServiceError::InvalidArgument(
                "page_token is not a token this service handed out (pass next_page_token as is)"
                    .to_owned(),
            )
        };
        let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?;
        let text = String::from_utf8(bytes).map_err(|_| bad())?;
        let rest = text.strip_prefix("v1:").ok_or_else(bad)?;
        let (micros, event_id) = rest.split_once(':').ok_or_else(bad)?;
        let micros: i64 = micros.parse().map_err(|_| bad())?;
        let occurred_at = DateTime::from_timestamp_micros(micros).ok_or_else(bad)?;
        if event_id.is_empty() {
            return Err(bad());
        }
        Ok(Some(Self {
            occurred_at,
            event_id: event_id.to_owned(),
        }))
    }
}

/// The agent named by the request: INVALID_ARGUMENT when not a UUID, NOT_FOUND
/// when there is no such agent.
async fn existing_agent(conn: &mut AsyncPgConnection, text: &str) -> ServiceResult<Uuid> {
    use crate::db::schema::agents;
    let id = convert::uuid("agent_id", text)?;
    let found: Option<Uuid> = agents::table
        .select(agents::id)
        .filter(agents::id.eq(id))
        .first(conn)
        .await
        .optional()?;
    found.ok_or_else(|| ServiceError::NotFound(format!("agent {id} not found")))
}

// ------------------------------------------------------------------ query

#[derive(QueryableByName, Debug)]
struct EntryRow {
    #[diesel(sql_type = Text)]
    event_id: String,
    #[diesel(sql_type = Text)]
    kind: String,
    #[diesel(sql_type = Text)]
    reservation_id: String,
    #[diesel(sql_type = Text)]
    request_id: String,
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    agent_id: Uuid,
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    root_agent_id: Uuid,
    #[diesel(sql_type = Array<Text>)]
    policy_ids: Vec<String>,
    #[diesel(sql_type = Text)]
    currency: String,
    #[diesel(sql_type = BigInt)]
    reserved_micros: i64,
    #[diesel(sql_type = BigInt)]
    charged_micros: i64,
    #[diesel(sql_type = BigInt)]
    overshoot_micros: i64,
    #[diesel(sql_type = BigInt)]
    input_tokens: i64,
    #[diesel(sql_type = BigInt)]
    output_tokens: i64,
    #[diesel(sql_type = BigInt)]
    cached_input_tokens: i64,
    #[diesel(sql_type = Text)]
    provider: String,
    #[diesel(sql_type = Text)]
    model: String,
    #[diesel(sql_type = Integer)]
    price_version: i32,
    #[diesel(sql_type = Integer)]
    schema_version: i32,
    #[diesel(sql_type = Timestamptz)]
    occurred_at: DateTime<Utc>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    reserved_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = Text)]
    kafka_topic: String,
    #[diesel(sql_type = Integer)]
    kafka_partition: i32,
    #[diesel(sql_type = BigInt)]
    kafka_offset: i64,
    #[diesel(sql_type = Timestamptz)]
    ingested_at: DateTime<Utc>,
    #[diesel(sql_type = Bool)]
    superseded: bool,
}

fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

impl From<EntryRow> for pb::LedgerEntry {
    fn from(r: EntryRow) -> Self {
        pb::LedgerEntry {
            reserved: Some(money(r.reserved_micros, &r.currency)),
            charged: Some(money(r.charged_micros, &r.currency)),
            overshoot: Some(money(r.overshoot_micros, &r.currency)),
            usage: Some(pb::TokenUsage {
                input_tokens: count(r.input_tokens),
                output_tokens: count(r.output_tokens),
                cached_input_tokens: count(r.cached_input_tokens),
            }),
            event_id: r.event_id,
            kind: r.kind,
            reservation_id: r.reservation_id,
            request_id: r.request_id,
            agent_id: r.agent_id.to_string(),
            root_agent_id: r.root_agent_id.to_string(),
            policy_ids: r.policy_ids,
            provider: r.provider,
            model: r.model,
            price_version: r.price_version,
            schema_version: u32::try_from(r.schema_version).unwrap_or(0),
            occurred_at: Some(timestamp(r.occurred_at)),
            reserved_at: r.reserved_at.map(timestamp),
            kafka_topic: r.kafka_topic,
            kafka_partition: r.kafka_partition,
            kafka_offset: r.kafka_offset,
            ingested_at: Some(timestamp(r.ingested_at)),
            superseded: r.superseded,
        }
    }
}

async fn query_ledger(
    pool: &db::Pool,
    req: pb::QueryLedgerRequest,
) -> ServiceResult<pb::QueryLedgerResponse> {
    let range = time_range(req.range.as_ref())?;
    let size = page_size(req.page_size)?;
    let cursor = Cursor::decode(&req.page_token)?;
    let mut conn = db::conn(pool).await?;
    let agent = existing_agent(&mut conn, &req.agent_id).await?;
    let sql = format!(
        "{tree} \
        SELECT e.event_id, e.kind, e.reservation_id, e.request_id, e.agent_id, e.root_agent_id, \
            e.policy_ids, e.currency, e.reserved_micros, e.charged_micros, e.overshoot_micros, \
            e.input_tokens, e.output_tokens, e.cached_input_tokens, e.provider, e.model, \
            e.price_version, e.schema_version, e.occurred_at, e.reserved_at, e.kafka_topic, \
            e.kafka_partition, e.kafka_offset, e.ingested_at, {SUPERSEDED} AS superseded \
        FROM ledger_events e \
        WHERE e.agent_id IN (SELECT id FROM tree) \
          AND ($3::timestamptz IS NULL OR e.occurred_at >= $3) \
          AND ($4::timestamptz IS NULL OR e.occurred_at < $4) \
          AND ($5::timestamptz IS NULL OR (e.occurred_at, e.event_id) > ($5, $6::text)) \
        ORDER BY e.occurred_at, e.event_id \
        LIMIT $7",
        tree = agent_tree()
    );
    let mut rows: Vec<EntryRow> = diesel::sql_query(sql)
        .bind::<diesel::sql_types::Uuid, _>(agent)
        .bind::<Bool, _>(req.aggregate_children)
        .bind::<Nullable<Timestamptz>, _>(range.start)
        .bind::<Nullable<Timestamptz>, _>(range.end)
        .bind::<Nullable<Timestamptz>, _>(cursor.as_ref().map(|c| c.occurred_at))
        .bind::<Text, _>(cursor.map(|c| c.event_id).unwrap_or_default())
        .bind::<BigInt, _>(i64::from(size) + 1)
        .load(&mut conn)
        .await?;
    // One row more than the page says whether another page follows.
    let more = rows.len() > size as usize;
    rows.truncate(size as usize);
    let next_page_token = match rows.last() {
        Some(last) if more => Cursor {
            occurred_at: last.occurred_at,
            event_id: last.event_id.clone(),
        }
        .encode(),
        _ => String::new(),
    };
    Ok(pb::QueryLedgerResponse {
        entries: rows.into_iter().map(pb::LedgerEntry::from).collect(),
        next_page_token,
    })
}

// ---------------------------------------------------------------- summary

#[derive(QueryableByName, Debug)]
struct TotalsRow {
    #[diesel(sql_type = Text)]
    currency: String,
    #[diesel(sql_type = Text)]
    provider: String,
    #[diesel(sql_type = Text)]
    model: String,
    #[diesel(sql_type = Text)]
    day: String,
    #[diesel(sql_type = BigInt)]
    charged: i64,
    #[diesel(sql_type = BigInt)]
    reserved: i64,
    #[diesel(sql_type = BigInt)]
    overshoot: i64,
    #[diesel(sql_type = BigInt)]
    events: i64,
    #[diesel(sql_type = BigInt)]
    superseded: i64,
    #[diesel(sql_type = BigInt)]
    input_tokens: i64,
    #[diesel(sql_type = BigInt)]
    output_tokens: i64,
    #[diesel(sql_type = BigInt)]
    cached_input_tokens: i64,
}

impl From<TotalsRow> for pb::LedgerTotals {
    fn from(r: TotalsRow) -> Self {
        pb::LedgerTotals {
            charged: Some(money(r.charged, &r.currency)),
            reserved: Some(money(r.reserved, &r.currency)),
            overshoot: Some(money(r.overshoot, &r.currency)),
            event_count: r.events,
            superseded_count: r.superseded,
            input_tokens: count(r.input_tokens),
            output_tokens: count(r.output_tokens),
            cached_input_tokens: count(r.cached_input_tokens),
            currency: r.currency,
            provider: r.provider,
            model: r.model,
            day: r.day,
        }
    }
}

/// Totals of final charges per currency and group (`$8`: 0 none, 1 model, 2 day).
fn summary_sql() -> String {
    let fin = |col: &str| format!("coalesce(sum({col}) FILTER (WHERE NOT superseded), 0)::bigint");
    format!(
        "{tree}, rows AS ( \
            SELECT e.*, {SUPERSEDED} AS superseded FROM ledger_events e \
            WHERE e.agent_id IN (SELECT id FROM tree) \
              AND ($3::timestamptz IS NULL OR e.occurred_at >= $3) \
              AND ($4::timestamptz IS NULL OR e.occurred_at < $4) \
        ), grouped AS ( \
            SELECT *, \
                CASE WHEN $5 = 1 THEN provider ELSE '' END AS g_provider, \
                CASE WHEN $5 = 1 THEN model ELSE '' END AS g_model, \
                CASE WHEN $5 = 2 THEN to_char(occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD') \
                     ELSE '' END AS g_day \
            FROM rows \
        ) \
        SELECT currency, g_provider AS provider, g_model AS model, g_day AS day, \
            {charged} AS charged, {reserved} AS reserved, {overshoot} AS overshoot, \
            count(*) FILTER (WHERE NOT superseded) AS events, \
            count(*) FILTER (WHERE superseded) AS superseded, \
            {it} AS input_tokens, {ot} AS output_tokens, {ct} AS cached_input_tokens \
        FROM grouped \
        GROUP BY currency, g_provider, g_model, g_day \
        ORDER BY g_day, g_provider, g_model, currency",
        tree = agent_tree(),
        charged = fin("charged_micros"),
        reserved = fin("reserved_micros"),
        overshoot = fin("overshoot_micros"),
        it = fin("input_tokens"),
        ot = fin("output_tokens"),
        ct = fin("cached_input_tokens"),
    )
}

async fn totals(
    conn: &mut AsyncPgConnection,
    agent: Uuid,
    children: bool,
    range: TimeRange,
    breakdown: i32,
) -> ServiceResult<Vec<pb::LedgerTotals>> {
    let rows: Vec<TotalsRow> = diesel::sql_query(summary_sql())
        .bind::<diesel::sql_types::Uuid, _>(agent)
        .bind::<Bool, _>(children)
        .bind::<Nullable<Timestamptz>, _>(range.start)
        .bind::<Nullable<Timestamptz>, _>(range.end)
        .bind::<Integer, _>(breakdown)
        .load(conn)
        .await?;
    Ok(rows.into_iter().map(pb::LedgerTotals::from).collect())
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

async fn ledger_summary(
    pool: &db::Pool,
    req: pb::LedgerSummaryRequest,
) -> ServiceResult<pb::LedgerSummaryResponse> {
    let range = time_range(req.range.as_ref())?;
    let breakdown = pb::LedgerBreakdown::try_from(req.breakdown).map_err(|_| {
        ServiceError::InvalidArgument(format!(
            "breakdown {} is not one of none (0), model (1), day (2)",
            req.breakdown
        ))
    })?;
    let mut conn = db::conn(pool).await?;
    let agent = existing_agent(&mut conn, &req.agent_id).await?;
    let children = req.aggregate_children;
    let agents: Count = diesel::sql_query(format!(
        "{} SELECT count(DISTINCT id) AS n FROM tree",
        agent_tree()
    ))
    .bind::<diesel::sql_types::Uuid, _>(agent)
    .bind::<Bool, _>(children)
    .get_result(&mut conn)
    .await?;
    let overall = totals(&mut conn, agent, children, range, 0).await?;
    let groups = match breakdown {
        pb::LedgerBreakdown::None => Vec::new(),
        other => totals(&mut conn, agent, children, range, other as i32).await?,
    };
    Ok(pb::LedgerSummaryResponse {
        agent_id: agent.to_string(),
        agent_count: i32::try_from(agents.n).unwrap_or(i32::MAX),
        totals: overall,
        breakdown: groups,
    })
}

// -------------------------------------------------------------- reconcile

#[derive(QueryableByName)]
struct Root {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    agent_id: Uuid,
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    root: Uuid,
}

/// The root of each agent's hierarchy (the agent itself for a root).
async fn roots(
    conn: &mut AsyncPgConnection,
    agents: &[Uuid],
) -> ServiceResult<std::collections::HashMap<Uuid, Uuid>> {
    let rows: Vec<Root> = diesel::sql_query(format!(
        "WITH RECURSIVE chain(agent_id, cur, depth) AS ( \
            SELECT id, id, 0 FROM agents WHERE id = ANY($1) \
          UNION ALL \
            SELECT c.agent_id, a.parent_id, c.depth + 1 FROM chain c JOIN agents a ON a.id = c.cur \
            WHERE a.parent_id IS NOT NULL AND c.depth < {MAX_HIERARCHY_DEPTH} \
        ) \
        SELECT DISTINCT ON (agent_id) agent_id, cur AS root FROM chain \
        ORDER BY agent_id, depth DESC"
    ))
    .bind::<Array<diesel::sql_types::Uuid>, _>(agents)
    .load(conn)
    .await?;
    Ok(rows.into_iter().map(|r| (r.agent_id, r.root)).collect())
}

#[derive(QueryableByName)]
struct LedgerSide {
    #[diesel(sql_type = Text)]
    policy_id: String,
    #[diesel(sql_type = BigInt)]
    micros: i64,
    #[diesel(sql_type = BigInt)]
    events: i64,
}

/// Final charges per policy whose reservation time is in its check's window.
async fn ledger_side(
    conn: &mut AsyncPgConnection,
    checks: &[Check],
) -> ServiceResult<std::collections::HashMap<String, (i64, i64)>> {
    let Some(min_lo) = checks.iter().map(|c| c.start).min() else {
        return Ok(Default::default());
    };
    let sql = format!(
        "WITH w(pid, lo, hi) AS ( \
            SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::timestamptz[]) \
        ), charges AS ( \
            SELECT p.pid, e.charged_micros, e.event_id, \
                coalesce(e.reserved_at, e.occurred_at) AS at \
            FROM ledger_events e CROSS JOIN LATERAL unnest(e.policy_ids) AS p(pid) \
            WHERE e.occurred_at >= $4::timestamptz - interval '{CLOCK_SKEW_MARGIN}' \
              AND NOT {SUPERSEDED} \
        ) \
        SELECT w.pid AS policy_id, coalesce(sum(c.charged_micros), 0)::bigint AS micros, \
            count(c.event_id) AS events \
        FROM w LEFT JOIN charges c \
          ON c.pid = w.pid AND c.at >= w.lo AND (w.hi IS NULL OR c.at < w.hi) \
        GROUP BY w.pid"
    );
    let rows: Vec<LedgerSide> = diesel::sql_query(sql)
        .bind::<Array<Text>, _>(
            checks
                .iter()
                .map(|c| c.policy.id.to_string())
                .collect::<Vec<_>>(),
        )
        .bind::<Array<Timestamptz>, _>(checks.iter().map(|c| c.start).collect::<Vec<_>>())
        .bind::<Array<Nullable<Timestamptz>>, _>(checks.iter().map(|c| c.end).collect::<Vec<_>>())
        .bind::<Timestamptz, _>(min_lo)
        .load(conn)
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.policy_id, (r.micros, r.events)))
        .collect())
}

/// The spent value of a counter: the calendar hash's `s`, or the sum of a rolling
/// counter's `s:<bucket>` fields from `oldest` on (what the hot path counts).
fn spent_of(reply: &Value, oldest: Option<i64>) -> ServiceResult<i64> {
    let int = |v: &Value| -> Option<i64> {
        match v {
            Value::Int(i) => Some(*i),
            Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
            Value::SimpleString(s) => s.parse().ok(),
            _ => None,
        }
    };
    let bad = || ServiceError::Internal(format!("unexpected budget counter reply {reply:?}"));
    match oldest {
        None => match reply {
            Value::Nil => Ok(0),
            v => int(v).ok_or_else(bad),
        },
        Some(oldest) => {
            let pairs: Vec<(&Value, &Value)> = match reply {
                Value::Array(items) => items.chunks_exact(2).map(|c| (&c[0], &c[1])).collect(),
                Value::Map(items) => items.iter().map(|(k, v)| (k, v)).collect(),
                Value::Nil => Vec::new(),
                _ => return Err(bad()),
            };
            let mut sum: i64 = 0;
            for (field, value) in pairs {
                let field = match field {
                    Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                    Value::SimpleString(s) => s.clone(),
                    _ => return Err(bad()),
                };
                let Some(bucket) = field.strip_prefix("s:") else {
                    continue;
                };
                match bucket.parse::<i64>() {
                    Ok(b) if b >= oldest => sum = sum.saturating_add(int(value).ok_or_else(bad)?),
                    _ => {}
                }
            }
            Ok(sum)
        }
    }
}

/// One active policy's counter and window now.
struct Check {
    policy: crate::catalog::PolicyInfo,
    key: String,
    /// Rolling: the oldest bucket counted.
    oldest: Option<i64>,
    start: DateTime<Utc>,
    end: Option<DateTime<Utc>>,
}

async fn reconcile(
    pool: &db::Pool,
    store: &BudgetStore,
    req: pb::ReconcileRequest,
) -> ServiceResult<pb::ReconcileResponse> {
    type PolicyRow = (Uuid, Uuid, i64, String, String, String, String);
    let mut conn = db::conn(pool).await?;
    let agent = match req.agent_id.trim() {
        "" => None,
        text => Some(existing_agent(&mut conn, text).await?),
    };
    let mut query = policies::table
        .select((
            policies::id,
            policies::agent_id,
            policies::limit_micros,
            policies::currency,
            policies::time_window,
            policies::window_type,
            policies::on_expiry,
        ))
        .filter(policies::active.eq(true))
        .order((policies::agent_id, policies::id))
        .limit(MAX_RECONCILE_POLICIES + 1)
        .into_boxed();
    if let Some(agent) = agent {
        query = query.filter(policies::agent_id.eq(agent));
    }
    let rows: Vec<PolicyRow> = query.load(&mut conn).await?;
    if rows.len() as i64 > MAX_RECONCILE_POLICIES {
        return Err(ServiceError::FailedPrecondition(format!(
            "more than {MAX_RECONCILE_POLICIES} active policies: reconcile one agent at a time (agent_id)"
        )));
    }
    let mut agents: Vec<Uuid> = rows.iter().map(|r| r.1).collect();
    agents.sort();
    agents.dedup();
    let roots = roots(&mut conn, &agents).await?;
    let now = Utc::now();
    let keys = store.keys();
    let mut checks = Vec::with_capacity(rows.len());
    for (id, agent_id, limit, currency, window, window_type, on_expiry) in rows {
        let policy = policy_info(
            id,
            agent_id,
            limit,
            &currency,
            &window,
            &window_type,
            &on_expiry,
        )?;
        let root = roots.get(&agent_id).copied().unwrap_or(agent_id);
        let slot = policy_slot(keys, keys.partition_of(&root.to_string()), &policy, now);
        let (oldest, start, end) = match slot.mode {
            SlotMode::Rolling { oldest, .. } => {
                let width = rolling_bucket_width(policy.window).ok_or_else(|| {
                    ServiceError::Internal(format!("policy {id}: rolling window without width"))
                })?;
                let start = bucket_start(oldest, width).ok_or_else(|| {
                    ServiceError::Internal(format!("policy {id}: window start out of range"))
                })?;
                (Some(oldest), start, None)
            }
            SlotMode::Calendar { .. } => {
                let bounds = calendar_bounds(policy.window, now);
                (None, bounds.start, bounds.end)
            }
        };
        checks.push(Check {
            policy,
            key: slot.key,
            oldest,
            start,
            end,
        });
    }

    let ledger = ledger_side(&mut conn, &checks).await?;
    drop(conn);

    let mut spent = Vec::with_capacity(checks.len());
    let redis = store.connection();
    for batch in checks.chunks(REDIS_BATCH) {
        // Counters of different hierarchies live on different slots (shards).
        let reads = batch
            .iter()
            .map(|c| match c.oldest {
                None => redis::cmd("HGET").arg(&c.key).arg("s").clone(),
                Some(_) => redis::cmd("HGETALL").arg(&c.key).clone(),
            })
            .collect();
        let replies: Vec<Value> = query_each(&redis, reads).await.map_err(|e| {
            ServiceError::Unavailable(format!(
                "budget store unavailable, cannot read counters: {e}"
            ))
        })?;
        if replies.len() != batch.len() {
            return Err(ServiceError::Internal(format!(
                "budget store answered {} of {} counter reads",
                replies.len(),
                batch.len()
            )));
        }
        for (c, reply) in batch.iter().zip(&replies) {
            spent.push(spent_of(reply, c.oldest)?);
        }
    }

    let mut out = Vec::with_capacity(checks.len());
    for (c, redis_spent) in checks.into_iter().zip(spent) {
        let id = c.policy.id.to_string();
        let (ledger_micros, ledger_events) = ledger.get(&id).copied().unwrap_or((0, 0));
        out.push(pb::PolicyReconciliation {
            agent_id: c.policy.agent_id.to_string(),
            currency: c.policy.currency.to_string(),
            time_window: c.policy.window.to_string(),
            window_type: c.policy.window_type.to_string(),
            window_start: Some(timestamp(c.start)),
            window_end: c.end.map(timestamp),
            ledger_micros,
            ledger_events,
            redis_spent_micros: redis_spent,
            drift_micros: redis_spent.saturating_sub(ledger_micros),
            counter_key: c.key,
            policy_id: id,
        });
    }
    let with_drift = out.iter().filter(|p| p.drift_micros != 0).count();
    if with_drift > 0 {
        tracing::warn!(
            policies = with_drift,
            "ledger and budget counters differ (normal while events are in flight)"
        );
    }
    Ok(pb::ReconcileResponse {
        policies_checked: i32::try_from(out.len()).unwrap_or(i32::MAX),
        policies_with_drift: i32::try_from(with_drift).unwrap_or(i32::MAX),
        policies: out,
        checked_at: Some(timestamp(now)),
    })
}

#[tonic::async_trait]
impl LedgerService for LedgerAdmin {
    async fn query_ledger(
        &self,
        request: Request<pb::QueryLedgerRequest>,
    ) -> Result<Response<pb::QueryLedgerResponse>, Status> {
        let result = query_ledger(&self.state.pool, request.into_inner()).await;
        respond("QueryLedger", result)
    }

    async fn ledger_summary(
        &self,
        request: Request<pb::LedgerSummaryRequest>,
    ) -> Result<Response<pb::LedgerSummaryResponse>, Status> {
        let result = ledger_summary(&self.state.pool, request.into_inner()).await;
        respond("LedgerSummary", result)
    }

    async fn reconcile(
        &self,
        request: Request<pb::ReconcileRequest>,
    ) -> Result<Response<pb::ReconcileResponse>, Status> {
        let result = reconcile(&self.state.pool, &self.store, request.into_inner()).await;
        respond("Reconcile", result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(sd: &str, ed: &str) -> pb::LedgerTimeRange {
        pb::LedgerTimeRange {
            start_date: sd.into(),
            end_date: ed.into(),
            ..Default::default()
        }
    }

    #[test]
    fn dates_cover_whole_utc_days_with_the_end_date_included() {
        let r = time_range(Some(&range("2026-02-01", "2026-02-03"))).unwrap();
        assert_eq!(r.start.unwrap().to_rfc3339(), "2026-02-01T00:00:00+00:00");
        assert_eq!(r.end.unwrap().to_rfc3339(), "2026-02-04T00:00:00+00:00");
        assert_eq!(time_range(None).unwrap(), TimeRange::default());
        let open = time_range(Some(&range("", "2026-02-03"))).unwrap();
        assert_eq!(open.start, None);
        // One day is a valid range.
        assert!(time_range(Some(&range("2026-02-03", "2026-02-03"))).is_ok());
    }

    #[test]
    fn bad_ranges_are_invalid_arguments_that_say_why() {
        let msg = |r: pb::LedgerTimeRange| match time_range(Some(&r)) {
            Err(ServiceError::InvalidArgument(m)) => m,
            other => panic!("{other:?}"),
        };
        assert!(msg(range("2026-02-03", "2026-02-01")).contains("ends before it starts"));
        assert!(msg(range("2026-02-30", "")).contains("start_date"));
        assert!(msg(range("", "yesterday")).contains("end_date"));
        let mut both = range("2026-02-01", "");
        both.start_time = Some(prost_types::Timestamp {
            seconds: 1,
            nanos: 0,
        });
        assert!(msg(both).contains("not both"));
    }

    #[test]
    fn page_sizes_and_tokens() {
        assert_eq!(page_size(0).unwrap(), DEFAULT_PAGE_SIZE);
        assert_eq!(page_size(1000).unwrap(), 1000);
        assert!(matches!(
            page_size(1001),
            Err(ServiceError::InvalidArgument(_))
        ));
        let c = Cursor {
            occurred_at: DateTime::from_timestamp_micros(1_770_000_000_123_456).unwrap(),
            event_id: "rsv_1_ab:cd/settle".into(),
        };
        assert_eq!(Cursor::decode(&c.encode()).unwrap(), Some(c));
        assert_eq!(Cursor::decode("").unwrap(), None);
        for bad in ["nope", "djE6eDp5", "!!!"] {
            assert!(
                matches!(Cursor::decode(bad), Err(ServiceError::InvalidArgument(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn counter_replies() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        assert_eq!(spent_of(&Value::Nil, None).unwrap(), 0);
        assert_eq!(spent_of(&bulk("1500"), None).unwrap(), 1500);
        let rolling = Value::Array(vec![
            bulk("s:99"),
            bulk("7"),
            bulk("s:100"),
            bulk("10"),
            bulk("r:100"),
            bulk("500"),
            bulk("s:101"),
            bulk("20"),
        ]);
        // Buckets older than the window and reserved fields do not count.
        assert_eq!(spent_of(&rolling, Some(100)).unwrap(), 30);
        assert!(spent_of(&bulk("x"), None).is_err());
    }
}
