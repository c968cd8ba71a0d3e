//! `caracal budget rebuild`: the Redis budget counters recomputed from the ledger
//! after Redis lost its data (see `budget::state`).
//!
//! For every active policy whose hierarchy lives on a lost partition, the counter
//! of its current window gets the ledger's final charges there (in the policy's
//! currency), exactly as `caracal ledger reconcile` attributes them: a calendar
//! counter its window's sum, a rolling counter one field per bucket still in the
//! window. Then each lost partition's marker goes back, and the hot path decides
//! there again.
//!
//! Why it is safe: a lost partition has no marker, so no script has written there
//! since the loss (they all check the marker first); nothing races the rebuild.
//! A partition that still has its marker is never written (its counters are live
//! and the ledger trails them by the events in flight): there `reconcile` tells
//! drift, and this refuses. Running it twice writes the same values.
//!
//! Reservations open at the moment of the loss, and Settles / Releases that came
//! while it was lost, are [`super::reopen`]'s.

use std::{
    collections::{BTreeMap, HashMap},
    time::Instant,
};

use caracal_service_kit::{
    redis::query_each,
    snapshot::{self, Snapshot},
};
use chrono::{Duration, Utc};
use diesel::sql_types::Text;
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use super::reopen;
use super::{
    existing_agent, load_policies, pb, plan_windows, BudgetStore, ByCurrency, KeySpace, Planned,
    ServiceError, ServiceResult, TargetKind, Uuid,
};
use crate::{budget::state, db};

/// Policies planned per round (each round: one plan, one ledger query). Each
/// round reads every ledger row of the rounds' windows once (about 1.5 s per
/// million rows here), so rounds are large: 20,000 policies' windows and sums
/// take a few MB.
const PAGE: i64 = 20_000;
/// Counters listed in the response (all are counted).
const LISTED: usize = 1_000;
/// Counter writes sent at once.
const WRITE_BATCH: usize = 500;

/// Replaces a counter's spent fields (`s`, `s:<bucket>`) with the ledger's and
/// leaves its reserved fields (`r`, `r:<bucket>`) alone: one atomic step per
/// counter. KEYS[1] counter; ARGV[1] expire-at (s, 0 = none); then field, value
/// pairs.
const WRITE_COUNTER: &str = r"
local fields = redis.call('HKEYS', KEYS[1])
for _, f in ipairs(fields) do
  if f == 's' or string.sub(f, 1, 2) == 's:' then
    redis.call('HDEL', KEYS[1], f)
  end
end
if #ARGV > 1 then
  redis.call('HSET', KEYS[1], unpack(ARGV, 2))
end
if tonumber(ARGV[1]) > 0 and redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('EXPIREAT', KEYS[1], ARGV[1])
end
return (#ARGV - 1) / 2
";

/// One counter to write.
pub(crate) struct Write {
    pub key: String,
    pub expire_at_s: i64,
    pub fields: Vec<(String, i64)>,
    pub listed: pb::RebuiltCounter,
}

pub(crate) async fn state(
    pool: &db::Pool,
    store: &BudgetStore,
) -> ServiceResult<pb::BudgetStateResponse> {
    let lost = state::lost_partitions(store).await?;
    let mut conn = db::conn(pool).await?;
    let row = state::established(&mut conn).await?;
    Ok(pb::BudgetStateResponse {
        established: row.is_some(),
        partitions: u32::from(store.keys().partitions()),
        lost_partitions: lost.into_iter().map(u32::from).collect(),
        rebuilt_at: row.and_then(|r| r.rebuilt_at).unwrap_or_default(),
    })
}

/// The snapshot a restore starts from (`caracal snapshot restore`): each counter
/// gets the ledger's charges now plus what the snapshot held that the ledger no
/// longer does (its value minus the ledger's rows below the snapshot's cut, when
/// positive). With the ledger intact that is the ledger's value; with rows lost it
/// is the snapshot's plus the rows after it; never less than the ledger holds.
pub(crate) struct Base<'a> {
    pub snapshot: &'a Snapshot,
    counters: HashMap<&'a str, &'a snapshot::Counter>,
}

impl<'a> Base<'a> {
    pub fn new(snapshot: &'a Snapshot) -> Self {
        Self {
            snapshot,
            counters: snapshot
                .counters
                .iter()
                .map(|c| (c.key.as_str(), c))
                .collect(),
        }
    }

    /// The snapshot's value of `field` of counter `key` (0 when it had none, or
    /// counted in another currency).
    fn value(&self, key: &str, currency: &str, field: &str) -> i64 {
        self.counters
            .get(key)
            .filter(|c| c.currency == currency)
            .and_then(|c| c.fields.iter().find(|(f, _)| f == field))
            .map_or(0, |(_, v)| *v)
    }

    /// The rolling buckets the snapshot has for `key`.
    fn buckets(&self, key: &str) -> Vec<i64> {
        self.counters.get(key).map_or_else(Vec::new, |c| {
            c.fields
                .iter()
                .filter_map(|(f, _)| f.strip_prefix("s:").and_then(|b| b.parse().ok()))
                .collect()
        })
    }
}

/// The counters of every active policy (of `agent` alone when given) whose
/// hierarchy lives on a partition `targeted` accepts, as the ledger (and `base`)
/// has them now, and the number of policies.
pub(crate) async fn plan_counters(
    conn: &mut AsyncPgConnection,
    keys: &KeySpace,
    agent: Option<Uuid>,
    targeted: impl Fn(u16) -> bool,
    base: Option<&Base<'_>>,
    mut on_page: impl FnMut(usize),
) -> ServiceResult<(Vec<Write>, u32)> {
    let mut writes: Vec<Write> = Vec::new();
    let mut policies = 0u32;
    let mut after: Option<(Uuid, Uuid)> = None;
    let cut = base.map(|b| b.snapshot.ledger_cut.as_slice());
    loop {
        let rows = load_policies(conn, agent, true, after, PAGE).await?;
        let Some(last) = rows.last() else { break };
        after = Some((last.1, last.0));
        let full = rows.len() as i64 == PAGE;
        let now = Utc::now();
        let Planned {
            subjects,
            targets,
            ledger,
            ledger_before,
        } = plan_windows(conn, keys, rows, None, now, cut).await?;
        let empty = BTreeMap::new();
        for (i, (target, charges)) in targets.iter().zip(&ledger).enumerate() {
            let subject = &subjects[target.subject];
            if !targeted(subject.partition) {
                continue;
            }
            policies += 1;
            let currency = subject.currency_at(target.last_use - Duration::microseconds(1));
            let own = |charges: &BTreeMap<i64, ByCurrency>, bucket: i64| {
                charges
                    .get(&bucket)
                    .and_then(|c| c.get(currency.as_str()))
                    .map_or(0, |(micros, _)| *micros)
            };
            let before = ledger_before.get(i).unwrap_or(&empty);
            let value = |field: &str, bucket: i64| -> i64 {
                let now = own(charges, bucket);
                match base {
                    None => now,
                    Some(base) => {
                        let lost = base
                            .value(&target.key, currency.as_str(), field)
                            .saturating_sub(own(before, bucket));
                        now.saturating_add(lost.max(0))
                    }
                }
            };
            let (expire_at_s, fields) = match &target.kind {
                TargetKind::Calendar { expire_at_s, .. } => {
                    let spent = value("s", 0);
                    let fields = if spent == 0 {
                        Vec::new()
                    } else {
                        vec![("s".to_owned(), spent)]
                    };
                    (*expire_at_s, fields)
                }
                TargetKind::Rolling { current, .. } => {
                    // The buckets the hot path counts now (and any after the newest:
                    // a reservation clock ahead).
                    let oldest = current.map_or(i64::MAX, |c| c.0);
                    let mut buckets: Vec<i64> = charges.keys().copied().collect();
                    if let Some(base) = base {
                        buckets.extend(base.buckets(&target.key));
                    }
                    buckets.sort_unstable();
                    buckets.dedup();
                    let fields = buckets
                        .into_iter()
                        .filter(|b| *b >= oldest)
                        .map(|b| {
                            let field = format!("s:{b}");
                            let v = value(&field, b);
                            (field, v)
                        })
                        .filter(|(_, micros)| *micros != 0)
                        .collect();
                    (0, fields)
                }
            };
            let spent = fields.iter().map(|(_, v)| *v).sum();
            let buckets = match target.kind {
                TargetKind::Rolling { .. } => u32::try_from(fields.len()).unwrap_or(u32::MAX),
                TargetKind::Calendar { .. } => 0,
            };
            writes.push(Write {
                key: target.key.clone(),
                expire_at_s,
                listed: pb::RebuiltCounter {
                    policy_id: subject.info.id.to_string(),
                    agent_id: subject.info.agent_id.to_string(),
                    counter_key: target.key.clone(),
                    partition: u32::from(subject.partition),
                    currency: currency.to_string(),
                    spent_micros: spent,
                    buckets,
                },
                fields,
            });
        }
        on_page(writes.len());
        if !full {
            break;
        }
    }
    Ok((writes, policies))
}

pub(crate) async fn rebuild(
    pool: &db::Pool,
    store: &BudgetStore,
    decisions: Option<&reopen::DecisionsSource>,
    req: pb::RebuildBudgetsRequest,
) -> ServiceResult<pb::RebuildBudgetsResponse> {
    rebuild_from(pool, store, decisions, req, None).await
}

/// A rebuild, from the ledger alone or (`base`) from a snapshot and the ledger.
/// How long a rebuild gives `minReplicasAck` replicas to confirm what it wrote,
/// in waits of `replicaAckTimeoutMs` (an admin call: a few seconds are fine; a
/// failure leaves the partitions refused).
const REPLICA_CONFIRM_PATIENCE: std::time::Duration = std::time::Duration::from_secs(3);

async fn confirm_replicas(store: &BudgetStore) -> ServiceResult<()> {
    store
        .confirm_replicas(REPLICA_CONFIRM_PATIENCE)
        .await
        .map_err(|e| {
            ServiceError::Unavailable(format!(
                "the rebuilt budget state is not on enough replicas, so traffic stays refused \
                 (run the rebuild again once they are back): {e}"
            ))
        })
}

/// The ledger-writer's lag on the metering topic; an error when there is some and
/// the request neither is a dry run nor allows it (the rebuilt counters would miss
/// those charges).
pub(crate) async fn refuse_ledger_lag(
    conn: &mut AsyncPgConnection,
    req: &pb::RebuildBudgetsRequest,
) -> ServiceResult<i64> {
    let lag = ledger_lag(conn, &req.ledger_group).await?;
    if lag > 0 && !req.allow_ledger_lag && !req.dry_run {
        return Err(ServiceError::FailedPrecondition(format!(
            "the ledger-writer is {lag} events behind on the metering topic: their \
             charges would be missing from the rebuilt counters (each one an overspend of its \
             amount). Wait until `caracal ledger status` shows no lag, or rebuild anyway with \
             --allow-ledger-lag"
        )));
    }
    Ok(lag)
}

pub(crate) async fn rebuild_from(
    pool: &db::Pool,
    store: &BudgetStore,
    decisions: Option<&reopen::DecisionsSource>,
    req: pb::RebuildBudgetsRequest,
    base: Option<&Base<'_>>,
) -> ServiceResult<pb::RebuildBudgetsResponse> {
    let started = Instant::now();
    let lost = state::lost_partitions(store).await?;
    let mut conn = db::conn(pool).await?;
    let agent = match req.agent_id.trim() {
        "" => None,
        text => Some(existing_agent(&mut conn, text).await?),
    };
    let ledger_lag = refuse_ledger_lag(&mut conn, &req).await?;
    if lost.is_empty() && !req.dry_run {
        return Err(ServiceError::FailedPrecondition(
            "Redis holds the budget state of every partition: its counters are live, and \
             rewriting them from the ledger would race the traffic (the ledger trails them by \
             the events in flight). Use `caracal ledger reconcile` to look for drift."
                .to_owned(),
        ));
    }
    // The partitions rebuilt: the lost ones; a dry run with nothing lost shows what
    // a rebuild of every partition would write.
    let partitions: Vec<u16> = if lost.is_empty() {
        (0..store.keys().partitions()).collect()
    } else {
        lost.clone()
    };
    let targeted = |p: u16| partitions.binary_search(&p).is_ok();
    let keys = store.keys().clone();
    let (writes, policies) = plan_counters(&mut conn, &keys, agent, targeted, base, |_| {}).await?;

    // The reservations open at the loss: restored first (their reserved amounts),
    // then the spent values are written beside them.
    let agent_text = agent.map(|a| a.to_string());
    let snapshot_open = base.map_or(&[][..], |b| b.snapshot.reservations.as_slice());
    let open = reopen::open_reservations(
        &mut conn,
        decisions,
        store,
        &partitions,
        agent_text.as_deref(),
        snapshot_open,
    )
    .await?;
    let mut source = match decisions {
        Some(source) => format!("decisions topic {}", source.kafka.decisions_topic),
        None => "not read: the relay is off (no decisions topic); reservations open at the loss \
                 are not restored"
            .to_owned(),
    };
    if let Some(base) = base {
        source.push_str(&format!(
            "; snapshot {} ({} open then)",
            base.snapshot.snapshot_id,
            base.snapshot.reservations.len()
        ));
    }
    let mut reservations_restored = 0;
    let mut parked_applied = 0;
    let restored = if req.dry_run {
        Vec::new()
    } else {
        reservations_restored = reopen::restore(store, &open).await?;
        write_counters(store, &writes).await?;
        if agent.is_some() {
            // Other agents of these partitions are not rebuilt yet.
            Vec::new()
        } else {
            let epoch = match state::established(&mut conn).await? {
                Some(row) => row.epoch,
                None => uuid::Uuid::new_v4().simple().to_string(),
            };
            diesel::sql_query(
                "INSERT INTO budget_state (epoch, partitions, rebuilt_at, rebuilds) \
                 VALUES ($1, $2, now(), 1) \
                 ON CONFLICT (id) DO UPDATE SET rebuilt_at = now(), \
                     rebuilds = budget_state.rebuilds + 1",
            )
            .bind::<Text, _>(&epoch)
            .bind::<diesel::sql_types::Integer, _>(i32::from(keys.partitions()))
            .execute(&mut conn)
            .await?;
            // Traffic resumes on the markers: only once the replicas hold the
            // rebuilt state, so a failover now cannot bring back an empty one.
            confirm_replicas(store).await?;
            state::write_markers(store, &lost, &epoch).await?;
            confirm_replicas(store).await?;
            parked_applied = reopen::apply_parked(store, &lost).await?;
            lost.clone()
        }
    };
    let took = started.elapsed();
    let took_ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX);
    tracing::info!(
        dry_run = req.dry_run,
        lost = lost.len(),
        restored = restored.len(),
        counters = writes.len(),
        reservations = open.len(),
        reservations_restored,
        parked_applied,
        took_ms,
        "budget rebuild"
    );
    metrics::histogram!(REBUILD_SECONDS).record(took.as_secs_f64());
    Ok(pb::RebuildBudgetsResponse {
        dry_run: req.dry_run,
        lost_partitions: lost.into_iter().map(u32::from).collect(),
        restored_partitions: restored.into_iter().map(u32::from).collect(),
        policies,
        counters_total: writes.len() as u64,
        counters: writes.into_iter().take(LISTED).map(|w| w.listed).collect(),
        took_ms,
        reservations_open: open.len() as u64,
        reservations_restored,
        parked_applied,
        reservations_source: source,
        ledger_lag,
    })
}

/// The ledger-writer group's lag (events) on the metering topic, as its replicas
/// last reported it in consumer_partitions (0 when it never ran).
async fn ledger_lag(conn: &mut AsyncPgConnection, group: &str) -> ServiceResult<i64> {
    #[derive(diesel::QueryableByName)]
    struct Lag {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        lag: i64,
    }
    let group = match group.trim() {
        "" => DEFAULT_LEDGER_GROUP,
        g => g,
    };
    let lag: Lag = diesel::sql_query(
        "SELECT coalesce(sum(greatest(end_offset - coalesce(committed_offset, 0), 0)), 0)::int8 \
                AS lag \
         FROM consumer_partitions WHERE group_id = $1 AND end_offset IS NOT NULL",
    )
    .bind::<Text, _>(group)
    .get_result(conn)
    .await?;
    Ok(lag.lag)
}

/// The ledger-writer's consumer group unless the request names another.
const DEFAULT_LEDGER_GROUP: &str = "caracal-ledger-writer";

/// Seconds per budget rebuild (dry runs included).
pub const REBUILD_SECONDS: &str = "caracal_budget_rebuild_seconds";

async fn write_counters(store: &BudgetStore, writes: &[Write]) -> ServiceResult<()> {
    let redis = store.connection();
    for batch in writes.chunks(WRITE_BATCH) {
        let cmds = batch
            .iter()
            .map(|w| {
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(WRITE_COUNTER).arg(1).arg(&w.key).arg(w.expire_at_s);
                for (field, value) in &w.fields {
                    cmd.arg(field).arg(value);
                }
                cmd
            })
            .collect();
        query_each(&redis, cmds).await.map_err(|e| {
            ServiceError::Unavailable(format!(
                "budget store unavailable while rebuilding counters (run the rebuild again: \
                 it writes the same values): {e}"
            ))
        })?;
    }
    Ok(())
}
