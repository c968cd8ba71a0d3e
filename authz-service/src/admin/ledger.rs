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
//! write to the counters recorded in it. So the ledger side of a window is the
//! final charges naming the policy whose `reserved_at` (`occurred_at` for rows
//! from before it was recorded) falls in it, and the Redis side is the spent
//! field(s) of its counter: a calendar window's hash, or a rolling counter's
//! buckets. Reserved amounts are not compared: open reservations are not charges.
//!
//! Which windows. Without a period, each active policy's current window (what the
//! hot path counts now). With one, every window of every policy, active or not,
//! that overlaps it: each calendar window, and a rolling counter's buckets (those
//! of the current window, and older ones still in the counter). The windows are
//! those the policy had at the time: its version history splits it into eras of
//! one window and type (one set of counters), each compared over its own time
//! only, so a window change does not show the old counters' charges as drift.
//!
//! Currencies. Counters hold micros without a currency; a window's counter counts
//! in the currency the policy had when it last counted there (a currency change
//! is refused while a counter holds anything: admin::counters). Charges of the
//! window in that currency are compared with the counter; charges in any other
//! currency are a row of their own and drift whatever the counter says (the hot
//! path never reserves in another currency than the policy's, so such a charge
//! was counted where it does not belong).
//!
//! Counters that are gone. A calendar counter expires a day after its window
//! (`COUNTER_GRACE_S`): a window older than that is shown, not compared. A missing
//! counter of a more recent window is read as 0 (a lost counter is drift). Rolling
//! buckets older than the current window are dropped by the hot path: those still
//! there are compared, the others only shown.

use std::collections::{BTreeMap, HashMap, HashSet};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use caracal_domain::{
    hierarchy::MAX_HIERARCHY_DEPTH,
    money::Currency,
    window::{bucket_index, bucket_start, calendar_bounds, TimeWindow, WindowType},
};
use caracal_proto::v1::{self as pb, ledger_service_server::LedgerService};
use caracal_service_kit::{redis::query_each, snapshot::LedgerCut};
use chrono::{DateTime, Days, Duration, NaiveDate, Utc};
use diesel::{
    prelude::*,
    sql_types::{Array, BigInt, Bool, Integer, Nullable, Text, Timestamptz},
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use redis::Value;
use tonic::{Request, Response, Status};
use uuid::Uuid;

pub(crate) mod rebuild;
pub mod reopen;

use super::{
    counters::{counter_fields, policy_info},
    respond, AdminState,
};
use crate::{
    authorize::policy_slot,
    budget::{store::SlotMode, BudgetStore, KeySpace},
    convert::{self, from_timestamp, money, timestamp},
    db::{
        self,
        schema::{policies, policy_versions},
    },
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
    decisions: Option<reopen::DecisionsSource>,
}

impl LedgerAdmin {
    /// `store`: the budget counters Reconcile compares with and a rebuild writes;
    /// `decisions`: where a rebuild finds the reservations open at a loss (None
    /// when the relay is off).
    pub fn new(
        state: AdminState,
        store: BudgetStore,
        decisions: Option<reopen::DecisionsSource>,
    ) -> Self {
        Self {
            state,
            store,
            decisions,
        }
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

/// Most windows (calendar windows, rolling counters) one Reconcile call compares:
/// name an agent, or reconcile a shorter period, for more.
pub const MAX_RECONCILE_WINDOWS: usize = 50_000;

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
) -> ServiceResult<HashMap<Uuid, Uuid>> {
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

/// A stretch of a policy's history that counted in the same counters: consecutive
/// versions with the same window (and type; `total` is one counter for both).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Era {
    /// The first era reaches back without limit (a charge reserved just before the
    /// policy row's commit still names it).
    from: DateTime<Utc>,
    until: Option<DateTime<Utc>>,
    window: TimeWindow,
    window_type: WindowType,
}

/// A policy to reconcile: as it is now, its history, its hierarchy's partition.
struct Subject {
    info: crate::catalog::PolicyInfo,
    partition: u16,
    eras: Vec<Era>,
    /// Never empty.
    currencies: Currencies,
}

impl Subject {
    /// The policy's currency at `t`.
    fn currency_at(&self, t: DateTime<Utc>) -> Currency {
        self.currencies
            .iter()
            .rev()
            .find(|(from, _)| *from <= t)
            .or(<[_]>::first(&self.currencies))
            .map_or(self.info.currency, |(_, c)| *c)
    }
}

/// A policy's currency over time: (from, currency), oldest first.
type Currencies = Vec<(DateTime<Utc>, Currency)>;

/// One version of a policy: (currency, time_window, window_type, changed_at).
type Version = (String, String, String, DateTime<Utc>);

/// Eras and currencies of a policy from its versions (oldest first); the policy as
/// it is now when it has no versions.
fn history(
    info: &crate::catalog::PolicyInfo,
    versions: &[Version],
) -> ServiceResult<(Vec<Era>, Currencies)> {
    let bad = |what: &str, e: &dyn std::fmt::Display| {
        ServiceError::Internal(format!("stored version of policy {}: {what}: {e}", info.id))
    };
    let mut eras: Vec<Era> = Vec::new();
    let mut currencies = Vec::new();
    for (i, (currency, window, window_type, changed_at)) in versions.iter().enumerate() {
        let currency = Currency::parse(currency).map_err(|e| bad("currency", &e))?;
        let window: TimeWindow = window.parse().map_err(|e| bad("time_window", &e))?;
        let window_type: WindowType = window_type.parse().map_err(|e| bad("window_type", &e))?;
        let from = if i == 0 {
            DateTime::<Utc>::MIN_UTC
        } else {
            *changed_at
        };
        currencies.push((from, currency));
        match eras.last_mut() {
            Some(last)
                if last.window == window
                    && (window == TimeWindow::Total || last.window_type == window_type) => {}
            last => {
                if let Some(last) = last {
                    last.until = Some(from);
                }
                eras.push(Era {
                    from,
                    until: None,
                    window,
                    window_type,
                });
            }
        }
    }
    if eras.is_empty() {
        eras.push(Era {
            from: DateTime::<Utc>::MIN_UTC,
            until: None,
            window: info.window,
            window_type: info.window_type,
        });
        currencies.push((DateTime::<Utc>::MIN_UTC, info.currency));
    }
    Ok((eras, currencies))
}

/// How a counter key is read and reported.
#[derive(Debug, Clone, PartialEq, Eq)]
enum TargetKind {
    /// One calendar window (or `total`).
    Calendar {
        start: DateTime<Utc>,
        end: Option<DateTime<Utc>>,
        /// When the counter expires by design (s; 0 = never).
        expire_at_s: i64,
    },
    /// A rolling counter: the bucket ranges (inclusive) compared, and the oldest
    /// and newest bucket the hot path counts now when the policy counts in this
    /// key now.
    Rolling {
        width_s: i64,
        ranges: Vec<(i64, i64)>,
        current: Option<(i64, i64)>,
    },
}

/// A counter key to read, and the rows it makes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    subject: usize,
    key: String,
    window: TimeWindow,
    window_type: WindowType,
    kind: TargetKind,
    /// The policy's current window (no range): always reported.
    always: bool,
    /// The latest time the policy counted in this key (for the currency it counted in).
    last_use: DateTime<Utc>,
}

/// Reservation times whose final charges belong to a target: `[lo, hi)`, by
/// rolling bucket of `width_s` seconds (0: as a whole).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Span {
    target: usize,
    lo: DateTime<Utc>,
    hi: Option<DateTime<Utc>>,
    width_s: i64,
}

fn min_end(a: Option<DateTime<Utc>>, b: Option<DateTime<Utc>>) -> Option<DateTime<Utc>> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

/// What a reconciliation reads: counter keys, and the ledger spans of each.
#[derive(Default)]
struct Plan {
    targets: Vec<Target>,
    by_key: HashMap<String, usize>,
    spans: Vec<Span>,
}

impl Plan {
    /// Adds the span `[lo, hi)` of `key` (a new target, or one already planned:
    /// the same counter in another era).
    fn add(&mut self, new: Target, lo: DateTime<Utc>, hi: Option<DateTime<Utc>>) {
        let ti = match self.by_key.get(&new.key) {
            Some(&ti) => {
                let t = &mut self.targets[ti];
                t.last_use = t.last_use.max(new.last_use);
                if let (
                    TargetKind::Rolling {
                        ranges, current, ..
                    },
                    TargetKind::Rolling {
                        ranges: more,
                        current: now_current,
                        ..
                    },
                ) = (&mut t.kind, new.kind)
                {
                    ranges.extend(more);
                    if now_current.is_some() {
                        *current = now_current;
                    }
                }
                ti
            }
            None => {
                self.by_key.insert(new.key.clone(), self.targets.len());
                self.targets.push(new);
                self.targets.len() - 1
            }
        };
        let width_s = match &self.targets[ti].kind {
            TargetKind::Rolling { width_s, .. } => *width_s,
            TargetKind::Calendar { .. } => 0,
        };
        self.spans.push(Span {
            target: ti,
            lo,
            hi,
            width_s,
        });
    }
}

/// Targets and spans: without `period`, each subject's current window (its last
/// era); with one (`[start, end)`, end <= now), every window of every era that
/// overlaps it.
fn plan(
    keys: &crate::budget::KeySpace,
    subjects: &[Subject],
    period: Option<(DateTime<Utc>, DateTime<Utc>)>,
    now: DateTime<Utc>,
) -> ServiceResult<(Vec<Target>, Vec<Span>)> {
    let mut plan = Plan::default();
    let too_many = || {
        ServiceError::FailedPrecondition(format!(
            "the reconciliation covers more than {MAX_RECONCILE_WINDOWS} windows: reconcile \
             a shorter period, or one agent at a time (agent_id)"
        ))
    };
    for (si, s) in subjects.iter().enumerate() {
        let eras = match period {
            None => s.eras.last().into_iter().collect::<Vec<_>>(),
            Some(_) => s.eras.iter().collect(),
        };
        for era in eras {
            let (lo, hi) = match period {
                None => (now, now),
                Some((start, end)) => {
                    let lo = start.max(era.from);
                    let hi = era.until.map_or(end, |u| u.min(end));
                    if lo >= hi {
                        continue;
                    }
                    (lo, hi)
                }
            };
            let info = crate::catalog::PolicyInfo {
                window: era.window,
                window_type: era.window_type,
                ..s.info.clone()
            };
            let target = |key: String, kind: TargetKind, span_hi: Option<DateTime<Utc>>| Target {
                subject: si,
                key,
                window: era.window,
                window_type: era.window_type,
                kind,
                always: period.is_none(),
                last_use: span_hi.map_or(now, |h| h.min(now)),
            };
            let slot = policy_slot(keys, s.partition, &info, now);
            match slot.mode {
                SlotMode::Rolling {
                    oldest,
                    bucket: newest,
                    width_s,
                } => {
                    let width = Duration::seconds(width_s);
                    let start_of = |b: i64| {
                        bucket_start(b, width).ok_or_else(|| {
                            ServiceError::Internal(format!(
                                "policy {}: bucket {b} out of range",
                                s.info.id
                            ))
                        })
                    };
                    let (first, last, span_hi) = match period {
                        None => (oldest, i64::MAX, None),
                        Some(_) => {
                            let last = bucket_index(hi - Duration::nanoseconds(1), width);
                            let end = start_of(last.saturating_add(1))?;
                            (bucket_index(lo, width), last, min_end(Some(end), era.until))
                        }
                    };
                    let span_lo = start_of(first)?.max(era.from);
                    let kind = TargetKind::Rolling {
                        width_s,
                        ranges: vec![(first, last)],
                        current: era.until.is_none().then_some((oldest, newest)),
                    };
                    plan.add(target(slot.key, kind, span_hi), span_lo, span_hi);
                }
                SlotMode::Calendar { .. } => {
                    let mut at = if period.is_none() { now } else { lo };
                    loop {
                        if plan.spans.len() >= MAX_RECONCILE_WINDOWS {
                            return Err(too_many());
                        }
                        let bounds = calendar_bounds(era.window, at);
                        let slot = policy_slot(keys, s.partition, &info, bounds.start);
                        let expire_at_s = match slot.mode {
                            SlotMode::Calendar { expire_at_s } => expire_at_s,
                            SlotMode::Rolling { .. } => 0,
                        };
                        let kind = TargetKind::Calendar {
                            start: bounds.start,
                            end: bounds.end,
                            expire_at_s,
                        };
                        let span_hi = min_end(bounds.end, era.until);
                        plan.add(
                            target(slot.key, kind, span_hi),
                            bounds.start.max(era.from),
                            span_hi,
                        );
                        match bounds.end {
                            Some(end) if period.is_some() && end < hi => at = end,
                            _ => break,
                        }
                    }
                }
            }
            if plan.spans.len() > MAX_RECONCILE_WINDOWS {
                return Err(too_many());
            }
        }
    }
    Ok((plan.targets, plan.spans))
}

#[derive(QueryableByName, Debug)]
struct LedgerSide {
    #[diesel(sql_type = Integer)]
    span: i32,
    #[diesel(sql_type = Text)]
    currency: String,
    #[diesel(sql_type = BigInt)]
    bucket: i64,
    #[diesel(sql_type = BigInt)]
    micros: i64,
    #[diesel(sql_type = BigInt)]
    events: i64,
}

/// (micros, events) per currency.
type ByCurrency = BTreeMap<String, (i64, i64)>;

/// The final charges of each target: per rolling bucket (0 for a calendar window)
/// and currency.
///
/// With `cut` (a snapshot's, see `caracal_service_kit::snapshot::LedgerCut`),
/// only the rows below it count, and a row supersedes another only if it is below
/// it too: the ledger as it was at the snapshot, as far as it still holds it.
async fn ledger_side(
    conn: &mut AsyncPgConnection,
    subjects: &[Subject],
    targets: &[Target],
    spans: &[Span],
    cut: Option<&[LedgerCut]>,
) -> ServiceResult<Vec<BTreeMap<i64, ByCurrency>>> {
    let mut out = vec![BTreeMap::new(); targets.len()];
    let Some(min_lo) = spans.iter().map(|s| s.lo).min() else {
        return Ok(out);
    };
    let (in_cut, superseded) = match cut {
        None => (String::new(), SUPERSEDED.to_owned()),
        Some(_) => (
            format!("AND {}", below_cut("e")),
            format!(
                "EXISTS (SELECT 1 FROM ledger_events s \
                 WHERE s.reservation_id = e.reservation_id AND {} \
                   AND (s.kind = 'late_settle', s.occurred_at, s.event_id) \
                     > (e.kind = 'late_settle', e.occurred_at, e.event_id))",
                below_cut("s")
            ),
        ),
    };
    let sql = format!(
        "WITH w(pid, idx, lo, hi, width) AS ( \
            SELECT * FROM unnest($1::text[], $2::int[], $3::timestamptz[], $4::timestamptz[], \
                $5::bigint[]) \
        ), charges AS ( \
            SELECT p.pid, e.currency, e.charged_micros, \
                coalesce(e.reserved_at, e.occurred_at) AS at \
            FROM ledger_events e CROSS JOIN LATERAL unnest(e.policy_ids) AS p(pid) \
            WHERE e.occurred_at >= $6::timestamptz - interval '{CLOCK_SKEW_MARGIN}' \
              AND p.pid = ANY($1) {in_cut} \
              AND NOT {superseded} \
        ) \
        SELECT w.idx AS span, c.currency, \
            CASE WHEN w.width > 0 THEN floor(extract(epoch FROM c.at) / w.width)::bigint \
                ELSE 0 END AS bucket, \
            sum(c.charged_micros)::bigint AS micros, count(*) AS events \
        FROM w JOIN charges c \
          ON c.pid = w.pid AND c.at >= w.lo AND (w.hi IS NULL OR c.at < w.hi) \
        GROUP BY 1, 2, 3"
    );
    let pid = |s: &Span| subjects[targets[s.target].subject].info.id.to_string();
    let rows: Vec<LedgerSide> = diesel::sql_query(sql)
        .bind::<Array<Text>, _>(spans.iter().map(pid).collect::<Vec<_>>())
        .bind::<Array<Integer>, _>(
            (0..spans.len())
                .map(|i| i32::try_from(i).unwrap_or(i32::MAX))
                .collect::<Vec<_>>(),
        )
        .bind::<Array<Timestamptz>, _>(spans.iter().map(|s| s.lo).collect::<Vec<_>>())
        .bind::<Array<Nullable<Timestamptz>>, _>(spans.iter().map(|s| s.hi).collect::<Vec<_>>())
        .bind::<Array<BigInt>, _>(spans.iter().map(|s| s.width_s).collect::<Vec<_>>())
        .bind::<Timestamptz, _>(min_lo)
        .bind::<Array<Text>, _>(
            cut.unwrap_or_default()
                .iter()
                .map(|c| c.topic.as_str())
                .collect::<Vec<_>>(),
        )
        .bind::<Array<Integer>, _>(
            cut.unwrap_or_default()
                .iter()
                .map(|c| c.partition)
                .collect::<Vec<_>>(),
        )
        .bind::<Array<BigInt>, _>(
            cut.unwrap_or_default()
                .iter()
                .map(|c| c.next_offset)
                .collect::<Vec<_>>(),
        )
        .load(conn)
        .await?;
    for r in rows {
        let Some(span) = usize::try_from(r.span).ok().and_then(|i| spans.get(i)) else {
            continue;
        };
        let sums = out[span.target]
            .entry(r.bucket)
            .or_default()
            .entry(r.currency)
            .or_insert((0, 0));
        sums.0 = sums.0.saturating_add(r.micros);
        sums.1 += r.events;
    }
    Ok(out)
}

/// `alias` (a ledger_events row) is below the cut bound as `$7` (topics), `$8`
/// (partitions) and `$9` (next offsets): a row of a partition the cut does not
/// name came after it.
fn below_cut(alias: &str) -> String {
    format!(
        "{alias}.kafka_offset < coalesce((SELECT c.next FROM unnest($7::text[], $8::int[], \
            $9::bigint[]) AS c(topic, part, next) \
            WHERE c.topic = {alias}.kafka_topic AND c.part = {alias}.kafka_partition), 0)"
    )
}

/// One reported row before it becomes a message.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Row {
    target: usize,
    currency: Currency,
    row_currency: String,
    start: DateTime<Utc>,
    end: Option<DateTime<Utc>>,
    ledger_micros: i64,
    ledger_events: i64,
    redis_micros: i64,
    state: pb::CounterState,
}

impl Row {
    fn foreign(&self) -> bool {
        self.row_currency != self.currency.as_str()
    }

    /// Redis - ledger where compared; a charge in another currency is drift whatever
    /// the counter.
    fn drift(&self) -> i64 {
        if self.foreign() {
            return self.ledger_micros.saturating_neg();
        }
        match self.state {
            pb::CounterState::Expired => 0,
            _ => self.redis_micros.saturating_sub(self.ledger_micros),
        }
    }
}

/// The rows of one target from its counter's fields and its ledger charges.
fn rows_of(
    ti: usize,
    target: &Target,
    subject: &Subject,
    fields: &[(String, i64)],
    ledger: &BTreeMap<i64, ByCurrency>,
    now: DateTime<Utc>,
) -> ServiceResult<Vec<Row>> {
    let present = !fields.is_empty();
    let before = |t: DateTime<Utc>| t - Duration::microseconds(1);
    let mut rows = Vec::new();
    match &target.kind {
        TargetKind::Calendar {
            start,
            end,
            expire_at_s,
        } => {
            let spent = fields.iter().find(|(f, _)| f == "s").map_or(0, |(_, v)| *v);
            let state = if present {
                pb::CounterState::Present
            } else if *expire_at_s > 0 && *expire_at_s <= now.timestamp() {
                pb::CounterState::Expired
            } else {
                pb::CounterState::Missing
            };
            let currency = subject.currency_at(before(target.last_use));
            let empty = ByCurrency::new();
            let charges = ledger.get(&0).unwrap_or(&empty);
            let own = charges.get(currency.as_str()).copied().unwrap_or((0, 0));
            let row = |row_currency: &str, (micros, events): (i64, i64), redis| Row {
                target: ti,
                currency,
                row_currency: row_currency.to_owned(),
                start: *start,
                end: *end,
                ledger_micros: micros,
                ledger_events: events,
                redis_micros: redis,
                state,
            };
            if target.always || present || own.1 > 0 {
                rows.push(row(currency.as_str(), own, spent));
            }
            for (c, sums) in charges {
                if c != currency.as_str() && sums.1 > 0 {
                    rows.push(row(c, *sums, 0));
                }
            }
        }
        TargetKind::Rolling {
            width_s,
            ranges,
            current,
        } => {
            let width = Duration::seconds(*width_s);
            let start_of = |b: i64| {
                bucket_start(b, width).ok_or_else(|| {
                    ServiceError::Internal(format!("{}: bucket {b} out of range", target.key))
                })
            };
            let spent: BTreeMap<i64, i64> = fields
                .iter()
                .filter_map(|(f, v)| Some((f.strip_prefix("s:")?.parse::<i64>().ok()?, *v)))
                .collect();
            let in_range = |b: i64| ranges.iter().any(|(f, l)| (*f..=*l).contains(&b));
            let current_ranges: Vec<(i64, i64)> = match current {
                // Buckets after the newest (a reservation clock ahead) are current too.
                Some((oldest, _)) => ranges
                    .iter()
                    .map(|(f, l)| ((*f).max(*oldest), *l))
                    .filter(|(f, l)| f <= l)
                    .collect(),
                None => Vec::new(),
            };
            let in_current = |b: i64| current_ranges.iter().any(|(f, l)| (*f..=*l).contains(&b));
            // (class, policy currency, row currency) -> (first, last bucket, ledger, redis)
            // class: 0 = the current window, 1 = older buckets still in the counter,
            // 2 = older buckets gone (by design: nothing to compare).
            type Acc = (i64, i64, (i64, i64), i64);
            let mut groups: BTreeMap<(u8, Currency, String), Acc> = BTreeMap::new();
            let mut add = |key: (u8, Currency, String), b: i64, sums: (i64, i64), redis: i64| {
                let acc = groups.entry(key).or_insert((b, b, (0, 0), 0));
                acc.0 = acc.0.min(b);
                acc.1 = acc.1.max(b);
                acc.2 .0 = acc.2 .0.saturating_add(sums.0);
                acc.2 .1 += sums.1;
                acc.3 = acc.3.saturating_add(redis);
            };
            let mut buckets: Vec<i64> = ledger.keys().copied().collect();
            buckets.extend(spent.keys().copied().filter(|b| in_range(*b)));
            buckets.sort_unstable();
            buckets.dedup();
            let empty = ByCurrency::new();
            for b in buckets {
                let class = if in_current(b) {
                    0
                } else if spent.contains_key(&b) {
                    1
                } else {
                    2
                };
                let bucket_end = start_of(b.saturating_add(1))?;
                let currency = subject.currency_at(before(bucket_end.min(target.last_use)));
                let charges = ledger.get(&b).unwrap_or(&empty);
                let own = charges.get(currency.as_str()).copied().unwrap_or((0, 0));
                let redis = if class == 2 {
                    0
                } else {
                    spent.get(&b).copied().unwrap_or(0)
                };
                if class != 2 || own.1 > 0 {
                    add(
                        (class, currency, currency.as_str().to_owned()),
                        b,
                        own,
                        redis,
                    );
                }
                for (c, sums) in charges {
                    if c != currency.as_str() && sums.1 > 0 {
                        add((class, currency, c.clone()), b, *sums, 0);
                    }
                }
            }
            // The current window is reported whole (and always without a range).
            if let (Some(first), Some(last)) = (
                current_ranges.iter().map(|r| r.0).min(),
                current_ranges.iter().map(|r| r.1).max(),
            ) {
                let currency = subject.currency_at(before(target.last_use));
                let key = (0, currency, currency.as_str().to_owned());
                if target.always || present || groups.contains_key(&key) {
                    let acc = groups.entry(key).or_insert((first, last, (0, 0), 0));
                    acc.0 = acc.0.min(first);
                    acc.1 = acc.1.max(last);
                }
            }
            let newest = current.map(|c| c.1).unwrap_or(i64::MIN);
            for ((class, currency, row_currency), (first, last, (micros, events), redis)) in groups
            {
                let state = match class {
                    0 if present => pb::CounterState::Present,
                    0 => pb::CounterState::Missing,
                    1 => pb::CounterState::Present,
                    _ => pb::CounterState::Expired,
                };
                let end = if class == 0 && last >= newest {
                    None
                } else {
                    Some(start_of(last.saturating_add(1))?)
                };
                rows.push(Row {
                    target: ti,
                    currency,
                    row_currency,
                    start: start_of(first)?,
                    end,
                    ledger_micros: micros,
                    ledger_events: events,
                    redis_micros: redis,
                    state,
                });
            }
        }
    }
    Ok(rows)
}

/// A policy as the reconciliation and the rebuild read it: id, agent, limit,
/// currency, window, window type, on-expiry.
type PolicyRow = (Uuid, Uuid, i64, String, String, String, String);

/// Policies in (agent, id) order after `after`, at most `limit`: `active_only` (the
/// current windows: as the hot path counts now), of `agent` alone if given.
async fn load_policies(
    conn: &mut AsyncPgConnection,
    agent: Option<Uuid>,
    active_only: bool,
    after: Option<(Uuid, Uuid)>,
    limit: i64,
) -> ServiceResult<Vec<PolicyRow>> {
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
        .order((policies::agent_id, policies::id))
        .limit(limit)
        .into_boxed();
    if active_only {
        query = query.filter(policies::active.eq(true));
    }
    if let Some(agent) = agent {
        query = query.filter(policies::agent_id.eq(agent));
    }
    if let Some((agent, id)) = after {
        query = query.filter(
            policies::agent_id
                .gt(agent)
                .or(policies::agent_id.eq(agent).and(policies::id.gt(id))),
        );
    }
    Ok(query.load(conn).await?)
}

/// What a reconciliation (or a rebuild) works from: the policies, the counters and
/// windows to look at, and the ledger's final charges of each.
struct Planned {
    subjects: Vec<Subject>,
    targets: Vec<Target>,
    ledger: Vec<BTreeMap<i64, ByCurrency>>,
    /// With a cut: the ledger side of the rows below it (empty without).
    ledger_before: Vec<BTreeMap<i64, ByCurrency>>,
}

/// Plans the windows of `rows` (the current ones without `period`) and reads their
/// ledger side.
async fn plan_windows(
    conn: &mut AsyncPgConnection,
    keys: &KeySpace,
    rows: Vec<PolicyRow>,
    period: Option<(DateTime<Utc>, DateTime<Utc>)>,
    now: DateTime<Utc>,
    cut: Option<&[LedgerCut]>,
) -> ServiceResult<Planned> {
    let mut agents: Vec<Uuid> = rows.iter().map(|r| r.1).collect();
    agents.sort();
    agents.dedup();
    let roots = roots(conn, &agents).await?;
    let ids: Vec<Uuid> = rows.iter().map(|r| r.0).collect();
    let version_rows: Vec<(Uuid, String, String, String, DateTime<Utc>)> = policy_versions::table
        .select((
            policy_versions::policy_id,
            policy_versions::currency,
            policy_versions::time_window,
            policy_versions::window_type,
            policy_versions::changed_at,
        ))
        .filter(policy_versions::policy_id.eq_any(&ids))
        .order((policy_versions::policy_id, policy_versions::version))
        .load(conn)
        .await?;
    let keys = keys.clone();
    let (subjects, targets, spans) = off_runtime(move || {
        let mut versions: HashMap<Uuid, Vec<Version>> = HashMap::new();
        for (id, currency, window, window_type, at) in version_rows {
            versions
                .entry(id)
                .or_default()
                .push((currency, window, window_type, at));
        }
        let mut subjects = Vec::with_capacity(rows.len());
        for (id, agent_id, limit, currency, window, window_type, on_expiry) in rows {
            let info = policy_info(
                id,
                agent_id,
                limit,
                &currency,
                &window,
                &window_type,
                &on_expiry,
            )?;
            let root = roots.get(&agent_id).copied().unwrap_or(agent_id);
            let (eras, currencies) = history(&info, versions.get(&id).map_or(&[], |v| v))?;
            subjects.push(Subject {
                partition: keys.partition_of(&root.to_string()),
                info,
                eras,
                currencies,
            });
        }
        let (targets, spans) = plan(&keys, &subjects, period, now)?;
        Ok((subjects, targets, spans))
    })
    .await?;
    let ledger = ledger_side(conn, &subjects, &targets, &spans, None).await?;
    let ledger_before = match cut {
        Some(cut) => ledger_side(conn, &subjects, &targets, &spans, Some(cut)).await?,
        None => Vec::new(),
    };
    Ok(Planned {
        subjects,
        targets,
        ledger,
        ledger_before,
    })
}

pub(crate) async fn reconcile(
    pool: &db::Pool,
    store: &BudgetStore,
    req: pb::ReconcileRequest,
) -> ServiceResult<pb::ReconcileResponse> {
    let now = Utc::now();
    let period = match req.range.as_ref() {
        None => None,
        Some(r) => {
            let range = time_range(Some(r))?;
            let start = range.start.ok_or_else(|| {
                ServiceError::InvalidArgument(
                    "a reconciliation period needs a start (start_date or start_time)".to_owned(),
                )
            })?;
            if start >= now {
                return Err(ServiceError::InvalidArgument(format!(
                    "the period starts at {}, in the future",
                    start.to_rfc3339()
                )));
            }
            if range.end.is_some_and(|end| end <= start) {
                return Err(ServiceError::InvalidArgument(
                    "the period is empty: it ends where it starts (an end date is included)"
                        .to_owned(),
                ));
            }
            Some((start, range.end.map_or(now, |e| e.min(now))))
        }
    };
    let mut conn = db::conn(pool).await?;
    let agent = match req.agent_id.trim() {
        "" => None,
        text => Some(existing_agent(&mut conn, text).await?),
    };
    let rows = load_policies(
        &mut conn,
        agent,
        period.is_none(),
        None,
        MAX_RECONCILE_POLICIES + 1,
    )
    .await?;
    if rows.len() as i64 > MAX_RECONCILE_POLICIES {
        return Err(ServiceError::FailedPrecondition(format!(
            "more than {MAX_RECONCILE_POLICIES} policies: reconcile one agent at a time (agent_id)"
        )));
    }
    reconcile_rows(conn, store, rows, period, now, std::convert::identity).await
}

/// Every active policy's current windows, `page` policies at a time, each page's
/// answer reduced by `digest` (on the blocking pool, with the rest of the page's
/// CPU work) and handed to `on_page`: the drift monitor's reconcile, which no
/// deployment size refuses (the API's is capped at [`MAX_RECONCILE_POLICIES`] per
/// call).
pub(crate) async fn reconcile_pages<T: Send + 'static>(
    pool: &db::Pool,
    store: &BudgetStore,
    page: i64,
    digest: fn(pb::ReconcileResponse) -> T,
    mut on_page: impl FnMut(T),
) -> ServiceResult<()> {
    let page = page.max(1);
    let mut after = None;
    loop {
        let now = Utc::now();
        let mut conn = db::conn(pool).await?;
        let rows = load_policies(&mut conn, None, true, after, page).await?;
        let Some(last) = rows.last() else {
            return Ok(());
        };
        after = Some((last.1, last.0));
        let full = rows.len() as i64 == page;
        on_page(reconcile_rows(conn, store, rows, None, now, digest).await?);
        if !full {
            return Ok(());
        }
    }
}

/// Reconciles `rows` (policies): their windows' ledger sums against the counters,
/// the answer reduced by `digest`.
async fn reconcile_rows<T: Send + 'static>(
    mut conn: db::Conn<'_>,
    store: &BudgetStore,
    rows: Vec<PolicyRow>,
    period: Option<(DateTime<Utc>, DateTime<Utc>)>,
    now: DateTime<Utc>,
    digest: fn(pb::ReconcileResponse) -> T,
) -> ServiceResult<T> {
    let Planned {
        subjects,
        targets,
        ledger,
        ..
    } = plan_windows(&mut conn, store.keys(), rows, period, now, None).await?;
    drop(conn);

    let mut fields = Vec::with_capacity(targets.len());
    let redis = store.connection();
    for batch in targets.chunks(REDIS_BATCH) {
        // Counters of different hierarchies live on different slots (shards).
        let reads = batch
            .iter()
            .map(|t| redis::cmd("HGETALL").arg(&t.key).clone())
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
        for reply in &replies {
            fields.push(counter_fields(reply)?);
        }
    }

    off_runtime(move || compare(&subjects, &targets, &fields, &ledger, period, now).map(digest))
        .await
}

/// Runs a big reconciliation's CPU work (planning thousands of windows, comparing
/// and sorting their rows) on the blocking pool. On the runtime it held up the hot
/// path's tasks 13-31 ms per page of 10,000 policies (`workerThreads: 1`), seen as
/// a 250 ms p99.9 in authz-bench's open loop every monitor interval.
pub(crate) async fn off_runtime<T: Send + 'static>(
    work: impl FnOnce() -> ServiceResult<T> + Send + 'static,
) -> ServiceResult<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ServiceError::Internal(format!("reconciliation work failed: {e}")))?
}

/// The reconciliation's rows: each target's counter `fields` against its `ledger`
/// side, per policy in agent, policy order.
fn compare(
    subjects: &[Subject],
    targets: &[Target],
    fields: &[Vec<(String, i64)>],
    ledger: &[BTreeMap<i64, ByCurrency>],
    period: Option<(DateTime<Utc>, DateTime<Utc>)>,
    now: DateTime<Utc>,
) -> ServiceResult<pb::ReconcileResponse> {
    let mut found = Vec::new();
    for (ti, (target, (fields, ledger))) in
        targets.iter().zip(fields.iter().zip(ledger)).enumerate()
    {
        found.extend(rows_of(
            ti,
            target,
            &subjects[target.subject],
            fields,
            ledger,
            now,
        )?);
    }
    // Per policy (in agent, policy order), by window, the policy's currency first.
    found.sort_by(|a, b| {
        (
            targets[a.target].subject,
            a.start,
            a.foreign(),
            &a.row_currency,
        )
            .cmp(&(
                targets[b.target].subject,
                b.start,
                b.foreign(),
                &b.row_currency,
            ))
    });
    let mut drifting = HashSet::new();
    let (mut with_drift, mut expired) = (0usize, 0usize);
    let mut out = Vec::with_capacity(found.len());
    for row in found {
        let target = &targets[row.target];
        let policy = &subjects[target.subject].info;
        let drift = row.drift();
        if drift != 0 {
            with_drift += 1;
            drifting.insert(policy.id);
        }
        if row.state == pb::CounterState::Expired {
            expired += 1;
        }
        out.push(pb::PolicyReconciliation {
            policy_id: policy.id.to_string(),
            agent_id: policy.agent_id.to_string(),
            currency: row.row_currency.clone(),
            time_window: target.window.to_string(),
            window_type: target.window_type.to_string(),
            window_start: Some(timestamp(row.start)),
            window_end: row.end.map(timestamp),
            ledger_micros: row.ledger_micros,
            ledger_events: row.ledger_events,
            redis_spent_micros: row.redis_micros,
            drift_micros: drift,
            counter_key: target.key.clone(),
            counter_state: row.state as i32,
            policy_currency: row.currency.to_string(),
        });
    }
    if with_drift > 0 {
        tracing::warn!(
            policies = drifting.len(),
            windows = with_drift,
            "ledger and budget counters differ (normal while events are in flight)"
        );
    }
    let count = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);
    Ok(pb::ReconcileResponse {
        policies_checked: count(subjects.len()),
        policies_with_drift: count(drifting.len()),
        windows_checked: count(out.len()),
        windows_with_drift: count(with_drift),
        windows_expired: count(expired),
        policies: out,
        checked_at: Some(timestamp(now)),
        period_start: period.map(|p| timestamp(p.0)),
        period_end: period.map(|p| timestamp(p.1)),
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

    async fn budget_state(
        &self,
        _request: Request<pb::BudgetStateRequest>,
    ) -> Result<Response<pb::BudgetStateResponse>, Status> {
        let result = rebuild::state(&self.state.pool, &self.store).await;
        respond("BudgetState", result)
    }

    async fn rebuild_budgets(
        &self,
        request: Request<pb::RebuildBudgetsRequest>,
    ) -> Result<Response<pb::RebuildBudgetsResponse>, Status> {
        // In a task of its own: a client that hangs up (or the server's request
        // timeout) does not cut a rebuild short; `budget status` shows its end.
        let (pool, store, decisions) = (
            self.state.pool.clone(),
            self.store.clone(),
            self.decisions.clone(),
        );
        let req = request.into_inner();
        let result = super::detached(async move {
            rebuild::rebuild(&pool, &store, decisions.as_ref(), req).await
        })
        .await;
        respond("RebuildBudgets", result)
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
        assert!(counter_fields(&Value::Nil).unwrap().is_empty());
        assert!(counter_fields(&Value::Array(vec![])).unwrap().is_empty());
        let fields = counter_fields(&Value::Array(vec![
            bulk("s:99"),
            bulk("7"),
            bulk("r:100"),
            bulk("500"),
        ]))
        .unwrap();
        assert_eq!(fields, [("s:99".to_owned(), 7), ("r:100".to_owned(), 500)]);
        assert!(counter_fields(&Value::Array(vec![bulk("s"), bulk("x")])).is_err());
        assert!(counter_fields(&bulk("1")).is_err());
    }

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    fn info(window: TimeWindow, window_type: WindowType) -> crate::catalog::PolicyInfo {
        crate::catalog::PolicyInfo {
            id: Uuid::nil(),
            agent_id: Uuid::nil(),
            limit_micros: 1,
            currency: Currency::parse("USD").unwrap(),
            window,
            window_type,
            on_expiry: Default::default(),
        }
    }

    fn version(currency: &str, window: &str, window_type: &str, when: &str) -> Version {
        (currency.into(), window.into(), window_type.into(), at(when))
    }

    #[test]
    fn history_merges_versions_that_keep_the_counters() {
        let p = info(TimeWindow::Daily, WindowType::Calendar);
        let (eras, currencies) = history(
            &p,
            &[
                version("USD", "hourly", "calendar", "2026-12-01T00:00:00Z"),
                // A limit change: same counters.
                version("USD", "hourly", "calendar", "2026-12-01T05:00:00Z"),
                version("USD", "daily", "calendar", "2026-12-02T10:00:00Z"),
                version("EUR", "daily", "calendar", "2026-12-03T10:00:00Z"),
                version("EUR", "total", "calendar", "2026-12-04T00:00:00Z"),
                // total is one counter for both types.
                version("EUR", "total", "rolling", "2026-12-04T01:00:00Z"),
            ],
        )
        .unwrap();
        let spans: Vec<_> = eras.iter().map(|e| (e.from, e.until, e.window)).collect();
        assert_eq!(
            spans,
            [
                (
                    DateTime::<Utc>::MIN_UTC,
                    Some(at("2026-12-02T10:00:00Z")),
                    TimeWindow::Hourly
                ),
                (
                    at("2026-12-02T10:00:00Z"),
                    Some(at("2026-12-04T00:00:00Z")),
                    TimeWindow::Daily
                ),
                (at("2026-12-04T00:00:00Z"), None, TimeWindow::Total),
            ]
        );
        let s = Subject {
            info: p,
            partition: 0,
            eras,
            currencies,
        };
        assert_eq!(s.currency_at(at("2026-11-01T00:00:00Z")).as_str(), "USD");
        assert_eq!(s.currency_at(at("2026-12-03T09:59:59Z")).as_str(), "USD");
        assert_eq!(s.currency_at(at("2026-12-03T10:00:00Z")).as_str(), "EUR");
    }

    #[test]
    fn a_period_covers_every_window_of_every_era() {
        let keys = crate::budget::KeySpace::new("k", 1);
        let p = info(TimeWindow::Daily, WindowType::Calendar);
        let (eras, currencies) = history(
            &p,
            &[
                version("USD", "hourly", "rolling", "2026-12-01T00:00:00Z"),
                version("USD", "daily", "calendar", "2026-12-02T10:00:00Z"),
            ],
        )
        .unwrap();
        let subjects = [Subject {
            info: p,
            partition: 0,
            eras,
            currencies,
        }];
        let now = at("2026-12-03T12:00:00Z");
        let period = (at("2026-12-02T09:00:00Z"), now);
        let (targets, spans) = plan(&keys, &subjects, Some(period), now).unwrap();
        // The rolling era from 09:00 to 10:00 (minute buckets), then two days.
        assert_eq!(targets.len(), 3, "{targets:?}");
        assert!(matches!(
            &targets[0].kind,
            TargetKind::Rolling { width_s: 60, current: None, ranges, .. } if ranges.len() == 1
        ));
        assert_eq!(
            (spans[0].lo, spans[0].hi, spans[0].width_s),
            (
                at("2026-12-02T09:00:00Z"),
                Some(at("2026-12-02T10:00:00Z")),
                60
            )
        );
        // The day of the change counts from the change on.
        assert_eq!(
            (spans[1].lo, spans[1].hi),
            (at("2026-12-02T10:00:00Z"), Some(at("2026-12-03T00:00:00Z")))
        );
        assert!(
            targets[1].key.ends_with(":d:2026-12-02"),
            "{}",
            targets[1].key
        );
        assert_eq!(
            targets[2].kind,
            TargetKind::Calendar {
                start: at("2026-12-03T00:00:00Z"),
                end: Some(at("2026-12-04T00:00:00Z")),
                expire_at_s: at("2026-12-05T00:00:00Z").timestamp(),
            }
        );
        assert!(targets.iter().all(|t| !t.always));
        // Without a period: the current window only, clipped to its era.
        let (targets, spans) = plan(&keys, &subjects, None, now).unwrap();
        assert_eq!((targets.len(), spans.len()), (1, 1));
        assert!(targets[0].always);
        assert_eq!(spans[0].lo, at("2026-12-03T00:00:00Z"));
        // An hourly policy over ten years: too many windows.
        let p = info(TimeWindow::Hourly, WindowType::Calendar);
        let (eras, currencies) = history(&p, &[]).unwrap();
        let subjects = [Subject {
            info: p,
            partition: 0,
            eras,
            currencies,
        }];
        let long = (at("2016-12-03T00:00:00Z"), now);
        assert!(matches!(
            plan(&keys, &subjects, Some(long), now),
            Err(ServiceError::FailedPrecondition(_))
        ));
    }

    #[test]
    fn rows_split_currencies_and_classes() {
        let keys = crate::budget::KeySpace::new("k", 1);
        let p = info(TimeWindow::Hourly, WindowType::Rolling);
        let (eras, currencies) = history(&p, &[]).unwrap();
        let subject = Subject {
            info: p,
            partition: 0,
            eras,
            currencies,
        };
        let now = at("2026-12-03T12:00:30Z");
        let period = (at("2026-12-03T09:00:00Z"), now);
        let (targets, _) = plan(&keys, std::slice::from_ref(&subject), Some(period), now).unwrap();
        let b = |t: &str| at(t).timestamp() / 60;
        let (old_kept, old_gone, current) = (
            b("2026-12-03T10:00:00Z"),
            b("2026-12-03T10:30:00Z"),
            b("2026-12-03T11:30:00Z"),
        );
        let fields = vec![
            (format!("s:{old_kept}"), 700),
            (format!("s:{current}"), 1_000),
            (format!("r:{current}"), 50),
        ];
        let cur = |c: &str, m: i64| -> ByCurrency { [(c.to_owned(), (m, 1))].into() };
        let mut ledger = BTreeMap::new();
        ledger.insert(old_gone, cur("USD", 300));
        let mut both = cur("USD", 1_000);
        both.insert("EUR".into(), (9, 1));
        ledger.insert(current, both);
        let rows = rows_of(0, &targets[0], &subject, &fields, &ledger, now).unwrap();
        let summary: Vec<_> = rows
            .iter()
            .map(|r| {
                (
                    r.row_currency.as_str(),
                    r.state,
                    r.ledger_micros,
                    r.redis_micros,
                    r.drift(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("EUR", pb::CounterState::Present, 9, 0, -9),
                ("USD", pb::CounterState::Present, 1_000, 1_000, 0),
                ("USD", pb::CounterState::Present, 0, 700, 700),
                ("USD", pb::CounterState::Expired, 300, 0, 0),
            ]
        );
        // The current window starts at its oldest bucket and stays open.
        let current_row = &rows[1];
        assert_eq!(current_row.start, at("2026-12-03T11:00:00Z"));
        assert_eq!(current_row.end, None);
        assert_eq!(rows[2].start, at("2026-12-03T10:00:00Z"));
        assert_eq!(rows[2].end, Some(at("2026-12-03T10:01:00Z")));
    }
}
