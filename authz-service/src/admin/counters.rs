//! Budget counters across admin changes (issue 11 item 9).
//!
//! A policy's spend lives in Redis under keys derived from the policy's id, its
//! window (calendar window key, or rolling bucket width) and the partition of its
//! hierarchy's root agent. Three admin changes move a policy to other keys, where
//! the counters are empty: changing a window, switching calendar <-> rolling, and
//! re-parenting an agent so that its hierarchy's root maps to another partition.
//! Done silently, that forgets the spend of the current window and the agent may
//! spend its whole limit again.
//!
//! We refuse such a change while an old counter holds spend or open reservations in
//! its current window (FAILED_PRECONDITION naming the policy and the amount), rather
//! than carry the spend over: an exact carry-over is not possible in general (a
//! rolling hour's minute buckets cannot be re-cut into a calendar day, a partition
//! change crosses Redis Cluster slots so no single script sees both sides), and the
//! operator who wants a fresh counter can still say so explicitly by creating a
//! new policy (or agent).
//!
//! The race. The check reads Redis at admin time, but the hot path keeps using the
//! old configuration until its cache notices the change (`config_epoch`, polled
//! every `configPollInterval`; at worst `policyCacheTTL` when the database is
//! unreachable). A reservation a stale replica makes on an old counter after the
//! check would be invisible to the new counter: forgotten spend, up to one old limit.
//! So the check and a *fence* are one Lua step (`counter_fence.lua`): an old counter
//! found empty at once gets a reserved amount larger than any limit, so every
//! Authorize that still uses it is refused (budget exceeded) until its replica sees
//! the new configuration; the fence expires after `fence_ttl_s` (cache TTL + poll
//! interval + margin), when no replica can still be using the old configuration.
//! Spend that arrived before the fence was seen by the check (refused change); none
//! can arrive after it. Settles and expiries of reservations made earlier go to the
//! keys recorded in each reservation, never to the new ones, so they are unaffected.
//! If the database commit fails after the fence was set, the fence is lifted again
//! (best effort; otherwise it blocks the unchanged policy until it expires).
//! Calendar keys are named by time, so the fence covers every window a stale replica
//! could still compute before the fence expires, not only the current one.
//!
//! A counter the change starts using again (a change undone within the fence TTL)
//! loses the fence that the earlier change put on it.
//!
//! What the new keys count: spend from the moment the change takes effect. The old
//! ancestors of a re-parented agent keep its past spend (it was spent under them);
//! its new ancestors count its spend from the move on, like any new child.
//!
//! Currency (issue 22 item 6). Counter keys do not name a currency: a currency
//! change keeps the policy's counters, and the micros already in them would count
//! in the new currency (3 USD spent read as 3 JPY of a JPY limit). So a currency
//! change is refused while the counters it keeps (and, with a window change too,
//! the ones it moves to) hold spend or open reservations in their current window,
//! like a window change. It cannot be fenced: the new configuration uses the same
//! keys, and a fence there would refuse every request of the policy until it
//! expired. What remains is a replica whose cache still has the old currency
//! (until its next epoch poll, `configPollInterval`): it may reserve in the old
//! currency on the kept counter after the check. Such charges show in `caracal
//! ledger reconcile`, which reports charges in another currency than the policy's
//! as drift of their own.

use std::collections::{BTreeMap, HashSet};

use caracal_domain::{
    money::{format_amount, Currency, MAX_AMOUNT_MICROS},
    policy::OnExpiry,
    window::{TimeWindow, WindowType},
};
use caracal_service_kit::redis::query_each;
use chrono::{DateTime, Duration, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use redis::{Script, Value};
use uuid::Uuid;

use crate::{
    authorize::policy_slot,
    budget::{store::SlotMode, BudgetStore, KeySpace},
    catalog::PolicyInfo,
    db::schema::{agents, policies},
    error::{ServiceError, ServiceResult},
};

/// Reserved amount of a fence: more than any limit can be ([`MAX_AMOUNT_MICROS`]),
/// so `used + estimate > limit` for every request, and a real reserved amount
/// (admitted requests only, so at most one limit) can never reach it.
pub const FENCE_MICROS: i64 = 2 * MAX_AMOUNT_MICROS;
// Refused for any estimate under any limit, and still exact in Lua's doubles (below
// 2^53) with a limit's worth of spend and of reservations on top.
const _: () = assert!(
    FENCE_MICROS > MAX_AMOUNT_MICROS && FENCE_MICROS + 2 * MAX_AMOUNT_MICROS < (1_i64 << 53)
);
/// Rolling counters are summed over every `r:<bucket>` field: the fence is a bucket
/// far in the future, counted by every window until it is removed or expires.
const FENCE_FIELD: &str = "r:9000000000000000";
/// Calendar keys are named by time: the fence covers the windows of `now`,
/// `now + step`, ... up to the fence's end (the shortest window is an hour).
const CALENDAR_STEP_S: i64 = 900;
/// Bounds that walk (and the fence TTL it follows: 8 days).
const MAX_CALENDAR_STEPS: i64 = 768;
/// Agents of a moved subtree we are willing to check in one call.
const MAX_SUBTREE_AGENTS: usize = 10_000;
/// The advisory lock the parent trigger takes (migrations, foundation): every
/// change of a hierarchy's shape, and every window change, holds it, so the
/// partition a policy's counters live in cannot change under a check.
const HIERARCHY_LOCK: i64 = 7_368_223_501;

/// One counter of one policy at one time.
#[derive(Debug, Clone)]
pub struct Counter {
    pub policy_id: Uuid,
    pub agent_id: Uuid,
    pub currency: Currency,
    pub partition: u16,
    pub key: String,
    mode: SlotMode,
}

/// Counters fenced by a change, to lift if the change is not committed.
#[derive(Debug, Default)]
pub struct Fenced(Vec<Counter>);

/// Fences set inside a database transaction, lifted if it does not commit.
#[derive(Clone, Default)]
pub struct PendingFences(std::sync::Arc<std::sync::Mutex<Fenced>>);

impl PendingFences {
    pub fn add(&self, fenced: Fenced) {
        if let Ok(mut all) = self.0.lock() {
            all.0.extend(fenced.0);
        }
    }

    /// After the transaction: a change that did not commit must not leave its
    /// unchanged policy fenced.
    pub async fn settle<T>(&self, guard: &CounterGuard, result: &ServiceResult<T>) {
        if result.is_ok() {
            return;
        }
        let fenced = match self.0.lock() {
            Ok(mut all) => std::mem::take(&mut *all),
            Err(_) => return,
        };
        if !fenced.0.is_empty() {
            guard.lift(&fenced).await;
        }
    }
}

/// Why a retired counter stopped the change.
#[derive(Debug)]
pub struct Busy {
    pub counter: Counter,
    pub used_micros: i64,
}

impl Busy {
    /// "policy P (agent A) has 12.50 USD spent or reserved in its current window"
    pub fn describe(&self) -> String {
        format!(
            "policy {} (agent {}) has {} {} spent or reserved in its current window",
            self.counter.policy_id,
            self.counter.agent_id,
            format_amount(self.used_micros),
            self.counter.currency
        )
    }
}

/// Checks and fences counters; held by the admin services.
#[derive(Clone)]
pub struct CounterGuard {
    store: BudgetStore,
    fence_ttl_s: u64,
    script: Script,
}

impl CounterGuard {
    /// `fence_ttl_s`: how long a replica may still use a configuration after it
    /// changed (policy cache TTL + epoch poll interval + a margin).
    pub fn new(store: BudgetStore, fence_ttl_s: u64) -> Self {
        Self {
            store,
            // Within the span the calendar walk covers (and far from chrono's limits).
            fence_ttl_s: fence_ttl_s.clamp(1, (MAX_CALENDAR_STEPS * CALENDAR_STEP_S) as u64),
            script: Script::new(include_str!("counter_fence.lua")),
        }
    }

    pub fn keys(&self) -> &KeySpace {
        self.store.keys()
    }

    fn fence_ttl(&self) -> Duration {
        Duration::seconds(
            i64::try_from(self.fence_ttl_s).unwrap_or(MAX_CALENDAR_STEPS * CALENDAR_STEP_S),
        )
    }

    /// The counters `p` uses from `now` until the fence would expire: its rolling
    /// counter, or its calendar window keys over that span (first = current).
    pub fn counters_of(&self, partition: u16, p: &PolicyInfo, now: DateTime<Utc>) -> Vec<Counter> {
        counters_over(self.keys(), self.fence_ttl(), partition, p, now)
    }

    /// Retires `old` (check that none holds anything in its current window, then
    /// fence them; per partition, each partition in one atomic step) and resumes
    /// `new` (lifts earlier fences). Counters in both lists are left alone.
    /// `Err(Busy)` inside `Ok`: the change must be refused; nothing is fenced.
    pub async fn retire(
        &self,
        old: &[Counter],
        new: &[Counter],
    ) -> ServiceResult<Result<Fenced, Busy>> {
        let new_keys: HashSet<&str> = new.iter().map(|c| c.key.as_str()).collect();
        let old_keys: HashSet<&str> = old.iter().map(|c| c.key.as_str()).collect();
        let mut groups: BTreeMap<u16, (Vec<&Counter>, Vec<&Counter>)> = BTreeMap::new();
        for c in old.iter().filter(|c| !new_keys.contains(c.key.as_str())) {
            groups.entry(c.partition).or_default().0.push(c);
        }
        for c in new.iter().filter(|c| !old_keys.contains(c.key.as_str())) {
            groups.entry(c.partition).or_default().1.push(c);
        }
        // Partitions with counters to check first: a refused change must not have
        // lifted fences elsewhere before it is refused.
        let mut groups: Vec<_> = groups.into_values().collect();
        groups.sort_by_key(|(retiring, _)| retiring.is_empty());
        let mut fenced = Fenced::default();
        for (retiring, resuming) in &groups {
            match self.run(retiring, resuming).await {
                Ok(None) => fenced.0.extend(retiring.iter().map(|c| (*c).clone())),
                Ok(Some(busy)) => {
                    self.lift(&fenced).await;
                    return Ok(Err(busy));
                }
                Err(e) => {
                    self.lift(&fenced).await;
                    return Err(e);
                }
            }
        }
        Ok(Ok(fenced))
    }

    /// Lifts the fences of a change that was not committed (best effort: a fence
    /// that stays only refuses spending on the unchanged policy until it expires).
    pub async fn lift(&self, fenced: &Fenced) {
        let mut groups: BTreeMap<u16, Vec<&Counter>> = BTreeMap::new();
        for c in &fenced.0 {
            groups.entry(c.partition).or_default().push(c);
        }
        for resuming in groups.values() {
            if let Err(e) = self.run(&[], resuming).await {
                tracing::warn!(error = %e, "cannot lift budget counter fences of an uncommitted change; they expire by themselves");
            }
        }
    }

    /// The first of `counters` that holds spend or open reservations in its current
    /// window (a fence not counted), read without changing anything: what
    /// counter_fence.lua's check counts, for a change that keeps the counters.
    pub async fn held(&self, counters: &[Counter]) -> ServiceResult<Option<Busy>> {
        let reads = counters
            .iter()
            .map(|c| redis::cmd("HGETALL").arg(&c.key).clone())
            .collect();
        let replies = query_each(&self.store.connection(), reads)
            .await
            .map_err(|e| {
                ServiceError::Unavailable(format!(
                    "budget store unavailable, cannot check the budget counters this change affects: {e}"
                ))
            })?;
        if replies.len() != counters.len() {
            return Err(ServiceError::Internal(format!(
                "budget store answered {} of {} counter reads",
                replies.len(),
                counters.len()
            )));
        }
        for (c, reply) in counters.iter().zip(&replies) {
            let used = used_of(reply, &c.mode)?;
            if used != 0 {
                return Ok(Some(Busy {
                    counter: c.clone(),
                    used_micros: used,
                }));
            }
        }
        Ok(None)
    }

    async fn run(
        &self,
        retiring: &[&Counter],
        resuming: &[&Counter],
    ) -> ServiceResult<Option<Busy>> {
        if retiring.is_empty() && resuming.is_empty() {
            return Ok(None);
        }
        let mut inv = self.script.prepare_invoke();
        for c in retiring.iter().chain(resuming) {
            inv.key(&c.key);
        }
        inv.arg(retiring.len())
            .arg(FENCE_MICROS)
            .arg(self.fence_ttl_s)
            .arg(FENCE_FIELD);
        for c in retiring {
            match c.mode {
                SlotMode::Calendar { .. } => inv.arg("c").arg(0),
                SlotMode::Rolling { oldest, .. } => inv.arg("r").arg(oldest),
            };
        }
        for c in resuming {
            match c.mode {
                SlotMode::Calendar { expire_at_s } => inv.arg("c").arg(expire_at_s),
                SlotMode::Rolling { .. } => inv.arg("r").arg(0),
            };
        }
        let mut conn = self.store.connection();
        let reply: Vec<Value> = inv.invoke_async(&mut conn).await.map_err(|e| {
            ServiceError::Unavailable(format!(
                "budget store unavailable, cannot check the budget counters this change affects: {e}"
            ))
        })?;
        let int = |v: Option<&Value>| match v {
            Some(Value::Int(i)) => Some(*i),
            _ => None,
        };
        match <[Value]>::first(&reply) {
            Some(Value::BulkString(tag)) if tag.as_slice() == b"ok" => Ok(None),
            Some(Value::BulkString(tag)) if tag.as_slice() == b"busy" => {
                let index = int(reply.get(1))
                    .and_then(|i| usize::try_from(i - 1).ok())
                    .and_then(|i| retiring.get(i));
                match (index, int(reply.get(2))) {
                    (Some(c), Some(used)) => Ok(Some(Busy {
                        counter: (*c).clone(),
                        used_micros: used,
                    })),
                    _ => Err(ServiceError::Internal(
                        "counter fence script: malformed busy reply".to_owned(),
                    )),
                }
            }
            other => Err(ServiceError::Internal(format!(
                "counter fence script: unexpected reply {other:?}"
            ))),
        }
    }
}

/// Spent + reserved in a counter's current window, from its `HGETALL` reply, a fence
/// excluded (the rule of `used` in counter_fence.lua).
fn used_of(reply: &Value, mode: &SlotMode) -> ServiceResult<i64> {
    let mut used: i64 = 0;
    for (field, amount) in counter_fields(reply)? {
        let counts = match mode {
            SlotMode::Calendar { .. } => match field.as_str() {
                "s" => Some(amount),
                "r" if amount >= FENCE_MICROS => Some(amount - FENCE_MICROS),
                "r" => Some(amount),
                _ => None,
            },
            SlotMode::Rolling { oldest, .. } => {
                let bucket = field.get(2..).and_then(|b| b.parse::<i64>().ok());
                match bucket {
                    Some(b) if field != FENCE_FIELD && b >= *oldest => Some(amount),
                    _ => None,
                }
            }
        };
        used = used.saturating_add(counts.unwrap_or(0));
    }
    Ok(used)
}

/// A counter hash's integer fields (`HGETALL` reply); empty when there is no key.
pub(super) fn counter_fields(reply: &Value) -> ServiceResult<Vec<(String, i64)>> {
    let text = |v: &Value| -> Option<String> {
        match v {
            Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
            Value::SimpleString(s) => Some(s.clone()),
            Value::Int(i) => Some(i.to_string()),
            _ => None,
        }
    };
    let bad = || ServiceError::Internal(format!("unexpected budget counter reply {reply:?}"));
    let pairs: Vec<(&Value, &Value)> = match reply {
        Value::Array(items) => items.chunks_exact(2).map(|c| (&c[0], &c[1])).collect(),
        Value::Map(items) => items.iter().map(|(k, v)| (k, v)).collect(),
        Value::Nil => Vec::new(),
        _ => return Err(bad()),
    };
    pairs
        .into_iter()
        .map(|(k, v)| {
            let field = text(k).ok_or_else(bad)?;
            let value = text(v).and_then(|t| t.parse().ok()).ok_or_else(bad)?;
            Ok((field, value))
        })
        .collect()
}

/// The counters `p` uses from `now` to `now + span` (see [`CounterGuard::counters_of`]).
fn counters_over(
    keys: &KeySpace,
    span: Duration,
    partition: u16,
    p: &PolicyInfo,
    now: DateTime<Utc>,
) -> Vec<Counter> {
    let end = now + span;
    let mut out: Vec<Counter> = Vec::new();
    let mut seen = HashSet::new();
    let mut push = |at: DateTime<Utc>| {
        let slot = policy_slot(keys, partition, p, at);
        if seen.insert(slot.key.clone()) {
            out.push(Counter {
                policy_id: p.id,
                agent_id: p.agent_id,
                currency: p.currency,
                partition,
                key: slot.key,
                mode: slot.mode,
            });
        }
    };
    push(now);
    for k in 1..=MAX_CALENDAR_STEPS {
        let at = now + Duration::seconds(k * CALENDAR_STEP_S);
        if at >= end {
            break;
        }
        push(at);
    }
    push(end);
    out
}

/// Serialises this transaction with every re-parenting and window change (held
/// until commit).
pub async fn lock_hierarchies(conn: &mut AsyncPgConnection) -> ServiceResult<()> {
    diesel::sql_query(format!("SELECT pg_advisory_xact_lock({HIERARCHY_LOCK})"))
        .execute(conn)
        .await?;
    Ok(())
}

/// A policy row's fields as the hot path sees them.
pub fn policy_info(
    id: Uuid,
    agent_id: Uuid,
    limit_micros: i64,
    currency: &str,
    window: &str,
    window_type: &str,
    on_expiry: &str,
) -> ServiceResult<PolicyInfo> {
    let bad = |what: &str, e: &dyn std::fmt::Display| {
        ServiceError::Internal(format!("stored policy {id}: {what}: {e}"))
    };
    Ok(PolicyInfo {
        id,
        agent_id,
        limit_micros,
        currency: Currency::parse(currency).map_err(|e| bad("currency", &e))?,
        window: window
            .parse::<TimeWindow>()
            .map_err(|e| bad("time_window", &e))?,
        window_type: window_type
            .parse::<WindowType>()
            .map_err(|e| bad("window_type", &e))?,
        on_expiry: if on_expiry.is_empty() {
            OnExpiry::default()
        } else {
            on_expiry
                .parse::<OnExpiry>()
                .map_err(|e| bad("on_expiry", &e))?
        },
    })
}

/// The root of `agent`'s hierarchy (from its ancestor chain, nearest first).
async fn root_of(conn: &mut AsyncPgConnection, agent: Uuid) -> ServiceResult<Uuid> {
    let chain = super::agents::ancestor_chain(conn, agent).await?;
    Ok(chain.last().copied().unwrap_or(agent))
}

/// `agent` and every agent below it (bounded by the hierarchy depth limit and by
/// [`MAX_SUBTREE_AGENTS`]).
async fn subtree(conn: &mut AsyncPgConnection, agent: Uuid) -> ServiceResult<Vec<Uuid>> {
    let mut all = vec![agent];
    let mut level = vec![agent];
    for _ in 0..=caracal_domain::hierarchy::MAX_HIERARCHY_DEPTH {
        if level.is_empty() {
            break;
        }
        level = agents::table
            .select(agents::id)
            .filter(agents::parent_id.eq_any(&level))
            .load(conn)
            .await?;
        all.extend(&level);
        if all.len() > MAX_SUBTREE_AGENTS {
            return Err(ServiceError::FailedPrecondition(format!(
                "agent {agent} has more than {MAX_SUBTREE_AGENTS} descendants; too many to move at once"
            )));
        }
    }
    Ok(all)
}

/// Every policy (active or not: a deactivated policy's counters are still its
/// record) of the given agents.
async fn policies_of(
    conn: &mut AsyncPgConnection,
    agents: &[Uuid],
) -> ServiceResult<Vec<PolicyInfo>> {
    type Row = (Uuid, Uuid, i64, String, String, String, String);
    let rows: Vec<Row> = policies::table
        .select((
            policies::id,
            policies::agent_id,
            policies::limit_micros,
            policies::currency,
            policies::time_window,
            policies::window_type,
            policies::on_expiry,
        ))
        .filter(policies::agent_id.eq_any(agents))
        .load(conn)
        .await?;
    rows.into_iter()
        .map(|(id, agent, limit, cur, w, wt, oe)| policy_info(id, agent, limit, &cur, &w, &wt, &oe))
        .collect()
}

/// Re-parenting `agent` under `new_parent` (`None`: it becomes a root), in the
/// caller's transaction, before the parent is written. When the hierarchy's root
/// maps to another partition, every policy of the moved subtree would count in
/// empty counters there: refused while any of them holds spend or reservations
/// in its current window, fenced otherwise. Takes the hierarchy lock first.
pub async fn guard_reparent(
    conn: &mut AsyncPgConnection,
    guard: &CounterGuard,
    agent: Uuid,
    new_parent: Option<Uuid>,
) -> ServiceResult<Fenced> {
    lock_hierarchies(conn).await?;
    let old_root = root_of(conn, agent).await?;
    let new_root = match new_parent {
        Some(p) => root_of(conn, p).await?,
        None => agent,
    };
    let keys = guard.keys();
    let (from, to) = (
        keys.partition_of(&old_root.to_string()),
        keys.partition_of(&new_root.to_string()),
    );
    if from == to {
        // Same partition, same keys: the counters stay where they are.
        return Ok(Fenced::default());
    }
    let members = subtree(conn, agent).await?;
    let policies = policies_of(conn, &members).await?;
    let now = Utc::now();
    let old: Vec<Counter> = policies
        .iter()
        .flat_map(|p| guard.counters_of(from, p, now))
        .collect();
    let new: Vec<Counter> = policies
        .iter()
        .flat_map(|p| guard.counters_of(to, p, now))
        .collect();
    match guard.retire(&old, &new).await? {
        Ok(fenced) => Ok(fenced),
        Err(busy) => Err(ServiceError::FailedPrecondition(format!(
            "cannot move agent {agent}: its hierarchy's budget counters are kept per root \
             agent partition, and the new root {new_root} maps to partition {to} instead of \
             {from}, where {}; the move would forget it. Wait until that window has passed \
             (or its reservations are settled), or create a new agent under the new parent",
            busy.describe()
        ))),
    }
}

/// A policy change from `old` to `new` (same policy), in the caller's transaction,
/// before the row is written: when the change moves the policy to other counters
/// (window, calendar/rolling), refused while the old counter holds spend or
/// reservations in its current window, fenced otherwise. A currency change is
/// refused while the counters it keeps or moves to hold anything in their current
/// window (their micros have no currency).
pub async fn guard_policy_change(
    conn: &mut AsyncPgConnection,
    guard: &CounterGuard,
    old: &PolicyInfo,
    new: &PolicyInfo,
) -> ServiceResult<Fenced> {
    let now = Utc::now();
    // Compare in any partition first: no Redis call (and no lock) for changes that
    // keep the counters and the currency (limit, on_expiry, activation).
    let same = |a: &[Counter], b: &[Counter]| {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.key == y.key)
    };
    let same_counters = same(
        &guard.counters_of(0, old, now),
        &guard.counters_of(0, new, now),
    );
    let currency_changes = old.currency != new.currency;
    if same_counters && !currency_changes {
        return Ok(Fenced::default());
    }
    lock_hierarchies(conn).await?;
    let root = root_of(conn, old.agent_id).await?;
    let partition = guard.keys().partition_of(&root.to_string());
    let from = guard.counters_of(partition, old, now);
    let to = guard.counters_of(partition, new, now);
    if currency_changes {
        // Whatever these counters hold is in the old currency.
        let kept: HashSet<&str> = from.iter().map(|c| c.key.as_str()).collect();
        let mut counted = from.clone();
        counted.extend(
            to.iter()
                .filter(|c| !kept.contains(c.key.as_str()))
                .map(|c| Counter {
                    currency: old.currency,
                    ..c.clone()
                }),
        );
        if let Some(busy) = guard.held(&counted).await? {
            return Err(ServiceError::FailedPrecondition(format!(
                "cannot change the currency of policy {} ({} -> {}): {}; budget counters \
                 hold amounts without a currency, so that would count as {}. Wait until \
                 that window has passed (or its reservations are settled), or deactivate \
                 this policy and create a new one in {}",
                old.id,
                old.currency,
                new.currency,
                busy.describe(),
                new.currency,
                new.currency
            )));
        }
        if same_counters {
            return Ok(Fenced::default());
        }
    }
    match guard.retire(&from, &to).await? {
        Ok(fenced) => Ok(fenced),
        Err(busy) => Err(ServiceError::FailedPrecondition(format!(
            "cannot change the window of policy {} ({} {} -> {} {}): {}, which the new \
             window's counters would not see. Wait until that window has passed (or its \
             reservations are settled), or deactivate this policy and create a new one",
            old.id,
            old.window_type,
            old.window,
            new.window_type,
            new.window,
            busy.describe()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(window: TimeWindow, window_type: WindowType) -> PolicyInfo {
        PolicyInfo {
            id: Uuid::nil(),
            agent_id: Uuid::nil(),
            limit_micros: 1,
            currency: Currency::parse("USD").unwrap(),
            window,
            window_type,
            on_expiry: OnExpiry::default(),
        }
    }

    #[test]
    fn calendar_counters_cover_every_window_until_the_fence_expires() {
        let ks = KeySpace::new("k", 4);
        let now = DateTime::parse_from_rfc3339("2026-12-01T10:30:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let p = policy(TimeWindow::Hourly, WindowType::Calendar);
        let keys: Vec<String> = counters_over(&ks, Duration::seconds(7200), 1, &p, now)
            .into_iter()
            .map(|c| c.key)
            .collect();
        let id = Uuid::nil();
        assert_eq!(
            keys,
            ["10", "11", "12"].map(|h| format!("k:{{p1}}:c:{id}:h:2026-12-01T{h}"))
        );
        // A rolling window is one counter whatever the span, named by its width.
        let p = policy(TimeWindow::Daily, WindowType::Rolling);
        let keys: Vec<String> = counters_over(&ks, Duration::seconds(7200), 1, &p, now)
            .into_iter()
            .map(|c| c.key)
            .collect();
        assert_eq!(keys, [format!("k:{{p1}}:r:{id}:900")]);
        // `total` is one counter for both types: switching type keeps it.
        let a = counters_over(
            &ks,
            Duration::seconds(60),
            1,
            &policy(TimeWindow::Total, WindowType::Calendar),
            now,
        );
        let b = counters_over(
            &ks,
            Duration::seconds(60),
            1,
            &policy(TimeWindow::Total, WindowType::Rolling),
            now,
        );
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].key, b[0].key);
    }
}
