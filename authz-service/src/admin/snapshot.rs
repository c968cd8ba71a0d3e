//! SnapshotService: `caracal snapshot create|list|status|restore|cleanup` and the
//! scheduled snapshots (`snapshots.schedule`, cron, UTC).
//!
//! Create reads one consistent point: a REPEATABLE READ, READ ONLY transaction
//! sees the ledger's rows, the offsets the consumer groups reported, the newest
//! Merkle checkpoint and the configuration at one instant. Per partition of the
//! metering topic the point is the ledger's highest offset plus one (the writer of
//! a partition commits its batches in offset order, so the rows below it are all
//! there); the counters are what `budget rebuild` would write from those rows.
//! The reservations open then come from the decisions topic afterwards (that read
//! is not transactional; a restore filters them against the ledger again).
//!
//! Restore is a budget rebuild with the snapshot as its base
//! ([`rebuild::Base`]): each counter gets the ledger's charges now plus what the
//! snapshot had that the ledger lost. Configuration rows the database lacks
//! (a fresh database) are put back first, never over existing rows. Like a
//! rebuild it writes only partitions whose state Redis lost; with `replace_live`
//! the live ones are taken offline first (their calls refused until it ends).
//!
//! Every create and restore is a row of `snapshot_runs` (phase, progress, error),
//! and runs in its own task: a client that hangs up does not stop it halfway.

use std::{collections::BTreeMap, sync::Arc, time::Instant};

use caracal_domain::schedule::CronSchedule;
use caracal_proto::v1::{self as pb, snapshot_service_server::SnapshotService};
use caracal_service_kit::snapshot::{
    self, snapshot_id_at, GroupOffset, KeyLayout, LedgerCut, Snapshot, SnapshotError,
    SnapshotStore, Summary,
};
use chrono::{DateTime, Duration as ChronoDuration, Utc};
use diesel::sql_types::{BigInt, Bool, Integer, Nullable, Text, Timestamptz};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use super::{
    bump_config_epoch,
    ledger::{
        rebuild::{self, Base},
        reopen,
    },
    respond, AdminState,
};
use crate::{
    budget::{state, BudgetStore},
    db,
    error::{ServiceError, ServiceResult},
};

/// Seconds per snapshot create (histogram).
pub const CREATE_SECONDS: &str = "caracal_snapshot_create_seconds";
/// Seconds per snapshot restore (histogram; dry runs included).
pub const RESTORE_SECONDS: &str = "caracal_snapshot_restore_seconds";
/// Bytes, ledger events and counters of the newest snapshot this process took.
pub const LAST_SIZE_BYTES: &str = "caracal_snapshot_last_size_bytes";
pub const LAST_EVENTS: &str = "caracal_snapshot_last_ledger_events";
pub const LAST_COUNTERS: &str = "caracal_snapshot_last_counters";
/// When the newest snapshot this process took was taken (s since the epoch): the
/// alert `CaracalSnapshotMissing` fires when it is older than the schedule allows.
pub const LAST_SUCCESS: &str = "caracal_snapshot_last_success_timestamp_seconds";
/// Creates and restores that failed, by kind.
pub const FAILURES: &str = "caracal_snapshot_failures_total";

/// The configuration tables a snapshot carries, parents before children (a
/// restore inserts them in this order).
const CONFIG_TABLES: [&str; 7] = [
    "agents",
    "agent_api_keys",
    "agent_identities",
    "policies",
    "policy_versions",
    "allowlist_entries",
    "price_book",
];

/// What the service needs to take and restore snapshots.
#[derive(Clone)]
pub struct SnapshotAdmin {
    inner: Arc<Inner>,
}

struct Inner {
    state: AdminState,
    store: BudgetStore,
    decisions: Option<reopen::DecisionsSource>,
    snapshots: SnapshotStore,
    schedule: Option<CronSchedule>,
    /// Scheduled snapshots older than this many days are deleted after each
    /// scheduled create (0: kept).
    retention_days: u32,
}

impl SnapshotAdmin {
    pub fn new(
        state: AdminState,
        store: BudgetStore,
        decisions: Option<reopen::DecisionsSource>,
        snapshots: SnapshotStore,
        schedule: Option<CronSchedule>,
        retention_days: u32,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                state,
                store,
                decisions,
                snapshots,
                schedule,
                retention_days,
            }),
        }
    }

    /// Takes the scheduled snapshots until `stop` turns true: at each time of the
    /// schedule every replica tries, the one whose claim of the time's id lands
    /// takes it (the others see the claim and skip), then old ones are cleaned up.
    pub async fn run_schedule(self, mut stop: watch::Receiver<bool>) {
        self.export_metrics().await;
        let replays = tokio::spawn(replay_gauges(self.inner.state.pool.clone(), stop.clone()));
        let Some(schedule) = self.inner.schedule.clone() else {
            let _ = replays.await;
            return;
        };
        loop {
            let Some(due) = schedule.next_after(Utc::now()) else {
                tracing::warn!(schedule = %schedule, "the snapshot schedule never fires");
                return;
            };
            // Sleeps in steps of at most a minute: a clock change is noticed.
            loop {
                let left = due - Utc::now();
                if left <= ChronoDuration::zero() {
                    break;
                }
                let step = left
                    .to_std()
                    .unwrap_or_default()
                    .min(std::time::Duration::from_secs(60));
                tokio::select! {
                    _ = tokio::time::sleep(step) => {}
                    _ = stop.changed() => return,
                }
                if *stop.borrow() {
                    return;
                }
            }
            let id = snapshot_id_at(due);
            match self.create_now(Some(id.clone()), due).await {
                Ok(Some((s, _))) => {
                    tracing::info!(snapshot = %s.snapshot_id, size = s.size_bytes, "scheduled snapshot taken");
                    if self.inner.retention_days > 0 {
                        if let Err(e) = self.cleanup(self.inner.retention_days, false).await {
                            tracing::warn!(error = %e, "snapshot cleanup after the scheduled snapshot failed");
                        }
                    }
                }
                Ok(None) => {
                    tracing::debug!(snapshot = %id, "another replica takes the scheduled snapshot")
                }
                Err(e) => tracing::warn!(snapshot = %id, error = %e, "scheduled snapshot failed"),
            }
        }
    }

    /// Describes the snapshot metrics and starts them where an alert can watch
    /// them: no failure yet; the newest snapshot kept (0 when there is none).
    async fn export_metrics(&self) {
        metrics::describe_counter!(
            FAILURES,
            "Snapshot creates and restores that failed, by kind"
        );
        metrics::describe_gauge!(
            LAST_SUCCESS,
            "When the newest snapshot kept was taken (s since the epoch; 0: none)"
        );
        metrics::describe_gauge!(
            LAST_SIZE_BYTES,
            "Size of the newest snapshot this process took"
        );
        metrics::describe_gauge!(
            LAST_EVENTS,
            "Ledger rows in the newest snapshot this process took"
        );
        metrics::describe_gauge!(
            LAST_COUNTERS,
            "Policy-window counters in the newest snapshot this process took"
        );
        metrics::describe_histogram!(CREATE_SECONDS, "Seconds per snapshot create");
        metrics::describe_histogram!(RESTORE_SECONDS, "Seconds per snapshot restore");
        for kind in ["create", "restore"] {
            metrics::counter!(FAILURES, "kind" => kind).increment(0);
        }
        let newest = match db::conn(&self.inner.state.pool).await {
            Ok(mut conn) => self.inner.snapshots.list(&mut conn).await.ok(),
            Err(_) => None,
        };
        let taken = newest
            .as_ref()
            .and_then(|l| l.iter().next())
            .map_or(0, |s| s.taken_at.timestamp());
        metrics::gauge!(LAST_SUCCESS).set(taken as f64);
    }

    /// Creates snapshot `id` (now's when None) of the point `at`; `None` when
    /// another process claimed that id first (a scheduled one).
    async fn create_now(
        &self,
        scheduled: Option<String>,
        at: DateTime<Utc>,
    ) -> ServiceResult<Option<(Summary, pb::CreateSnapshotResponse)>> {
        let is_scheduled = scheduled.is_some();
        let id = scheduled.unwrap_or_else(|| snapshot_id_at(at));
        let pool = &self.inner.state.pool;
        let Some(run) = Run::claim_create(pool, &id, is_scheduled).await? else {
            if is_scheduled {
                return Ok(None);
            }
            return Err(ServiceError::AlreadyExists(format!(
                "a snapshot {id} is being taken or was taken already (ids are per second: try \
                 again in a second)"
            )));
        };
        let started = Instant::now();
        let result = self.create_run(&id, &run).await;
        match &result {
            Ok((summary, _)) => {
                metrics::histogram!(CREATE_SECONDS).record(started.elapsed().as_secs_f64());
                metrics::gauge!(LAST_SIZE_BYTES).set(summary.size_bytes as f64);
                metrics::gauge!(LAST_EVENTS).set(summary.ledger_events as f64);
                metrics::gauge!(LAST_COUNTERS).set(summary.counters as f64);
                metrics::gauge!(LAST_SUCCESS).set(summary.taken_at.timestamp() as f64);
            }
            Err(e) => {
                metrics::counter!(FAILURES, "kind" => "create").increment(1);
                run.fail(pool, &e.to_string()).await;
            }
        }
        result.map(Some)
    }

    async fn create_run(
        &self,
        id: &str,
        run: &Run,
    ) -> ServiceResult<(Summary, pb::CreateSnapshotResponse)> {
        let started = Instant::now();
        let inner = &self.inner;
        let pool = &inner.state.pool;
        let mut conn = db::conn(pool).await?;
        run.phase(pool, "reading the ledger (one consistent point)", 0, 0)
            .await;
        diesel::sql_query("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *conn)
            .await?;
        let point = read_point(&mut conn, &inner.store, pool, run).await;
        let end = if point.is_ok() { "COMMIT" } else { "ROLLBACK" };
        diesel::sql_query(end).execute(&mut *conn).await?;
        let point = point?;

        run.phase(
            pool,
            "reading the open reservations",
            point.counters.len() as i64,
            point.counters.len() as i64,
        )
        .await;
        let all: Vec<u16> = (0..inner.store.keys().partitions()).collect();
        let (reservations, reservations_source) = match inner.decisions.as_ref() {
            Some(source) => {
                let open = reopen::open_reservations(
                    &mut conn,
                    Some(source),
                    &inner.store,
                    &all,
                    None,
                    &[],
                )
                .await?;
                (
                    open.into_iter()
                        .map(|r| snapshot::Reservation {
                            reservation_id: r.reservation_id,
                            partition: r.partition,
                            agent_id: r.agent_id,
                            record: r.record,
                            expires_at_ms: r.expires_at_ms,
                        })
                        .collect(),
                    format!("decisions topic {}", source.kafka.decisions_topic),
                )
            }
            None => (
                Vec::new(),
                "not read: the relay is off (no decisions topic)".to_owned(),
            ),
        };
        let config_rows: Vec<String> = point
            .config
            .iter()
            .map(|(t, rows)| format!("{t}={}", rows.as_array().map_or(0, Vec::len)))
            .collect();
        let merkle_tree_size = point.merkle.as_ref().map_or(0, |m| m.tree_size);
        let snapshot = Snapshot {
            format: snapshot::FORMAT,
            snapshot_id: id.to_owned(),
            taken_at: point.taken_at,
            layout: KeyLayout {
                prefix: inner.store.keys().prefix().to_owned(),
                partitions: inner.store.keys().partitions(),
            },
            ledger_events: point.ledger_cut.iter().map(|c| c.events).sum(),
            ledger_cut: point.ledger_cut,
            consumer_offsets: point.consumer_offsets,
            counters: point.counters,
            reservations,
            reservations_source: reservations_source.clone(),
            merkle: point.merkle,
            config: point.config,
        };
        run.phase(pool, "storing", 0, 0).await;
        let stored = snapshot.seal().map_err(snapshot_error)?;
        inner
            .snapshots
            .put(&mut conn, &stored)
            .await
            .map_err(snapshot_error)?;
        let took_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let response = pb::CreateSnapshotResponse {
            snapshot: Some(info(&stored.summary)),
            took_ms,
            store: inner.snapshots.describe(),
            merkle_tree_size,
            reservations_source,
            config_rows,
        };
        run.done(pool, &detail(&response)).await;
        tracing::info!(
            snapshot = %id,
            size = stored.summary.size_bytes,
            counters = stored.summary.counters,
            events = stored.summary.ledger_events,
            took_ms,
            "snapshot taken"
        );
        Ok((stored.summary, response))
    }

    async fn restore(
        &self,
        req: pb::RestoreSnapshotRequest,
    ) -> ServiceResult<pb::RestoreSnapshotResponse> {
        let inner = &self.inner;
        let pool = &inner.state.pool;
        let id = req.snapshot_id.trim().to_owned();
        snapshot::parse_snapshot_id(&id).map_err(snapshot_error)?;
        let loading = Instant::now();
        let stored = {
            let mut conn = db::conn(pool).await?;
            inner
                .snapshots
                .get(&mut conn, &id)
                .await
                .map_err(snapshot_error)?
        };
        let Some(stored) = stored else {
            return Err(ServiceError::NotFound(format!(
                "no snapshot {id} in the {}",
                inner.snapshots.describe()
            )));
        };
        let snapshot = stored.open().map_err(snapshot_error)?;
        tracing::info!(
            snapshot = %id,
            took_ms = loading.elapsed().as_millis() as u64,
            "snapshot restore: read and checked"
        );
        let keys = inner.store.keys();
        if snapshot.layout.prefix != keys.prefix()
            || snapshot.layout.partitions != keys.partitions()
        {
            return Err(ServiceError::FailedPrecondition(format!(
                "snapshot {id} was taken with budget keys {}:* over {} partitions; this \
                 deployment uses {}:* over {}: its counters would land on other keys",
                snapshot.layout.prefix,
                snapshot.layout.partitions,
                keys.prefix(),
                keys.partitions()
            )));
        }
        let run = Run::start(pool, "restore", &id, req.dry_run).await?;
        let started = Instant::now();
        let result = self.restore_run(&snapshot, &req, &run).await;
        metrics::histogram!(RESTORE_SECONDS).record(started.elapsed().as_secs_f64());
        match &result {
            Ok(response) => run.done(pool, &detail(response)).await,
            Err(e) => {
                metrics::counter!(FAILURES, "kind" => "restore").increment(1);
                run.fail(pool, &e.to_string()).await;
            }
        }
        result
    }

    async fn restore_run(
        &self,
        snapshot: &Snapshot,
        req: &pb::RestoreSnapshotRequest,
        run: &Run,
    ) -> ServiceResult<pb::RestoreSnapshotResponse> {
        let started = Instant::now();
        let inner = &self.inner;
        let pool = &inner.state.pool;
        // Everything that can refuse comes before anything is written.
        let lost = state::lost_partitions(&inner.store).await?;
        let live: Vec<u16> = (0..inner.store.keys().partitions())
            .filter(|p| lost.binary_search(p).is_err())
            .collect();
        if !live.is_empty() && !req.dry_run && !req.replace_live {
            return Err(ServiceError::FailedPrecondition(format!(
                "Redis holds the budget state of {} of {} partitions: their counters are \
                 live and traffic moves them. Restore with --replace-live to take them \
                 offline (calls there are refused) while the snapshot is written, or use \
                 `caracal budget rebuild` for the partitions Redis lost",
                live.len(),
                inner.store.keys().partitions()
            )));
        }
        let rebuild_req = pb::RebuildBudgetsRequest {
            agent_id: String::new(),
            dry_run: req.dry_run,
            allow_ledger_lag: req.allow_ledger_lag,
            ledger_group: req.ledger_group.clone(),
        };
        let mut config_restored = Vec::new();
        {
            let mut conn = db::conn(pool).await?;
            rebuild::refuse_ledger_lag(&mut conn, &rebuild_req).await?;
            if !req.dry_run {
                run.phase(pool, "configuration rows the database lacks", 0, 0)
                    .await;
                let t = Instant::now();
                config_restored = restore_config(&mut conn, &snapshot.config).await?;
                tracing::info!(
                    snapshot = %snapshot.snapshot_id,
                    took_ms = t.elapsed().as_millis() as u64,
                    tables = ?config_restored,
                    "snapshot restore: configuration rows"
                );
            }
        }
        if !live.is_empty() && !req.dry_run {
            run.phase(pool, "taking the live partitions offline", 0, 0)
                .await;
            state::take_offline(&inner.store, &live).await?;
        }
        run.phase(pool, "writing the budget state", 0, 0).await;
        let base = Base::new(snapshot);
        let budgets = rebuild::rebuild_from(
            pool,
            &inner.store,
            inner.decisions.as_ref(),
            rebuild_req,
            Some(&base),
        )
        .await?;
        let t = Instant::now();
        let ledger_events_after = {
            let mut conn = db::conn(pool).await?;
            events_after(&mut conn, &snapshot.ledger_cut).await?
        };
        tracing::info!(
            snapshot = %snapshot.snapshot_id,
            budget_ms = budgets.took_ms,
            events_after_ms = t.elapsed().as_millis() as u64,
            ledger_events_after,
            "snapshot restore: budget state written"
        );
        Ok(pb::RestoreSnapshotResponse {
            dry_run: req.dry_run,
            snapshot_id: snapshot.snapshot_id.clone(),
            budgets: Some(budgets),
            ledger_events_after,
            config_restored,
            took_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        })
    }

    async fn list(&self) -> ServiceResult<pb::ListSnapshotsResponse> {
        let mut conn = db::conn(&self.inner.state.pool).await?;
        let list = self
            .inner
            .snapshots
            .list(&mut conn)
            .await
            .map_err(snapshot_error)?;
        Ok(pb::ListSnapshotsResponse {
            snapshots: list.iter().map(info).collect(),
            store: self.inner.snapshots.describe(),
        })
    }

    async fn cleanup(
        &self,
        retention_days: u32,
        dry_run: bool,
    ) -> ServiceResult<pb::CleanupSnapshotsResponse> {
        if retention_days == 0 {
            return Err(ServiceError::InvalidArgument(
                "--retention-days must be at least 1 (0 would delete every snapshot)".to_owned(),
            ));
        }
        let mut conn = db::conn(&self.inner.state.pool).await?;
        let list = self
            .inner
            .snapshots
            .list(&mut conn)
            .await
            .map_err(snapshot_error)?;
        let horizon = Utc::now() - ChronoDuration::days(i64::from(retention_days));
        let mut deleted = Vec::new();
        let mut kept = 0u32;
        // The newest snapshot is kept whatever its age: a cleanup never leaves none.
        for (i, s) in list.iter().enumerate() {
            if i == 0 || s.taken_at >= horizon {
                kept += 1;
                continue;
            }
            if !dry_run {
                self.inner
                    .snapshots
                    .delete(&mut conn, &s.snapshot_id)
                    .await
                    .map_err(snapshot_error)?;
            }
            deleted.push(s.snapshot_id.clone());
        }
        Ok(pb::CleanupSnapshotsResponse {
            deleted,
            kept,
            dry_run,
        })
    }

    async fn status(
        &self,
        req: pb::SnapshotStatusRequest,
    ) -> ServiceResult<pb::SnapshotStatusResponse> {
        let limit = match req.limit {
            0 => 20,
            n if n > 500 => {
                return Err(ServiceError::InvalidArgument(
                    "limit is at most 500".to_owned(),
                ))
            }
            n => i64::from(n),
        };
        let mut conn = db::conn(&self.inner.state.pool).await?;
        let rows: Vec<RunRow> = diesel::sql_query(
            "SELECT id, kind, snapshot_id, state, phase, done_items, total_items, dry_run, \
                    scheduled, error, \
                    to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') \
                        AS started_at, \
                    to_char(finished_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') \
                        AS finished_at \
             FROM snapshot_runs WHERE ($1 = '' OR snapshot_id = $1) \
             ORDER BY id DESC LIMIT $2",
        )
        .bind::<Text, _>(req.snapshot_id.trim())
        .bind::<BigInt, _>(limit)
        .load(&mut *conn)
        .await?;
        let schedule = self.inner.schedule.as_ref();
        Ok(pb::SnapshotStatusResponse {
            runs: rows
                .into_iter()
                .map(|r| pb::SnapshotRun {
                    id: r.id,
                    kind: r.kind,
                    snapshot_id: r.snapshot_id,
                    state: r.state,
                    phase: r.phase,
                    done_items: r.done_items,
                    total_items: r.total_items,
                    started_at: r.started_at.unwrap_or_default(),
                    finished_at: r.finished_at.unwrap_or_default(),
                    error: r.error.unwrap_or_default(),
                    dry_run: r.dry_run,
                    scheduled: r.scheduled,
                })
                .collect(),
            schedule: schedule.map(|s| s.to_string()).unwrap_or_default(),
            next_scheduled: schedule
                .and_then(|s| s.next_after(Utc::now()))
                .map(|t| t.to_rfc3339())
                .unwrap_or_default(),
        })
    }
}

/// Replays running now (`caracal replay start` records its progress in
/// `ledger_replays`; one that has not reported for five minutes died).
pub const REPLAYS_RUNNING: &str = "caracal_replay_running";
/// Messages the running replays have still to read: their lag.
pub const REPLAY_REMAINING: &str = "caracal_replay_remaining_messages";
/// How often the replay gauges are read.
const REPLAY_GAUGES_EVERY: std::time::Duration = std::time::Duration::from_secs(15);

/// Sets the replay gauges from `ledger_replays` every [`REPLAY_GAUGES_EVERY`]
/// until `stop` turns true.
async fn replay_gauges(pool: db::Pool, mut stop: watch::Receiver<bool>) {
    metrics::describe_gauge!(REPLAYS_RUNNING, "Replays of the metering topic running now");
    metrics::describe_gauge!(
        REPLAY_REMAINING,
        "Messages the running replays have still to read"
    );
    #[derive(diesel::QueryableByName)]
    struct Running {
        #[diesel(sql_type = BigInt)]
        running: i64,
        #[diesel(sql_type = BigInt)]
        remaining: i64,
    }
    loop {
        let read = async {
            let mut conn = db::conn(&pool).await?;
            let r: Running = diesel::sql_query(
                "SELECT count(*) AS running, \
                        coalesce(sum(greatest(messages - read, 0)), 0)::int8 AS remaining \
                 FROM ledger_replays \
                 WHERE state = 'running' AND updated_at > now() - interval '5 minutes'",
            )
            .get_result(&mut *conn)
            .await?;
            Ok::<_, ServiceError>(r)
        }
        .await;
        match read {
            Ok(r) => {
                metrics::gauge!(REPLAYS_RUNNING).set(r.running as f64);
                metrics::gauge!(REPLAY_REMAINING).set(r.remaining as f64);
            }
            Err(e) => tracing::debug!(error = %e, "cannot read the replays' progress"),
        }
        tokio::select! {
            _ = tokio::time::sleep(REPLAY_GAUGES_EVERY) => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
    }
}

/// What one consistent point holds (all but the reservations).
struct Point {
    taken_at: DateTime<Utc>,
    ledger_cut: Vec<LedgerCut>,
    consumer_offsets: Vec<GroupOffset>,
    counters: Vec<snapshot::Counter>,
    merkle: Option<snapshot::Checkpoint>,
    config: BTreeMap<String, serde_json::Value>,
}

/// Reads the point inside the caller's REPEATABLE READ transaction on `conn`;
/// progress goes through another connection of `pool`.
async fn read_point(
    conn: &mut AsyncPgConnection,
    store: &BudgetStore,
    pool: &db::Pool,
    run: &Run,
) -> ServiceResult<Point> {
    #[derive(diesel::QueryableByName)]
    struct Now {
        #[diesel(sql_type = Timestamptz)]
        now: DateTime<Utc>,
    }
    // The transaction's snapshot is taken by its first statement: this one.
    let taken_at = diesel::sql_query("SELECT now() AS now")
        .get_result::<Now>(conn)
        .await?
        .now;

    #[derive(diesel::QueryableByName)]
    struct Cut {
        #[diesel(sql_type = Text)]
        kafka_topic: String,
        #[diesel(sql_type = Integer)]
        kafka_partition: i32,
        #[diesel(sql_type = BigInt)]
        next_offset: i64,
        #[diesel(sql_type = BigInt)]
        events: i64,
    }
    let cut: Vec<Cut> = diesel::sql_query(
        "SELECT kafka_topic, kafka_partition, max(kafka_offset) + 1 AS next_offset, \
                count(*) AS events \
         FROM ledger_events GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .load(conn)
    .await?;
    let ledger_cut = cut
        .into_iter()
        .map(|c| LedgerCut {
            topic: c.kafka_topic,
            partition: c.kafka_partition,
            next_offset: c.next_offset,
            events: c.events,
        })
        .collect();

    #[derive(diesel::QueryableByName)]
    struct Offset {
        #[diesel(sql_type = Text)]
        group_id: String,
        #[diesel(sql_type = Text)]
        topic: String,
        #[diesel(sql_type = Integer)]
        kafka_partition: i32,
        #[diesel(sql_type = Nullable<BigInt>)]
        committed_offset: Option<i64>,
    }
    let offsets: Vec<Offset> = diesel::sql_query(
        "SELECT group_id, topic, kafka_partition, committed_offset FROM consumer_partitions \
         ORDER BY 1, 2, 3",
    )
    .load(conn)
    .await?;
    let consumer_offsets = offsets
        .into_iter()
        .map(|o| GroupOffset {
            group: o.group_id,
            topic: o.topic,
            partition: o.kafka_partition,
            committed_offset: o.committed_offset,
        })
        .collect();

    #[derive(diesel::QueryableByName)]
    struct Cp {
        #[diesel(sql_type = BigInt)]
        tree_size: i64,
        #[diesel(sql_type = Text)]
        root: String,
        #[diesel(sql_type = Text)]
        key_id: String,
        #[diesel(sql_type = Text)]
        note: String,
        #[diesel(sql_type = Timestamptz)]
        published_at: DateTime<Utc>,
    }
    let merkle = diesel::sql_query(
        "SELECT tree_size, encode(root, 'base64') AS root, key_id, note, published_at \
         FROM merkle_checkpoints ORDER BY tree_size DESC LIMIT 1",
    )
    .load::<Cp>(conn)
    .await?
    .into_iter()
    .next()
    .map(|c| snapshot::Checkpoint {
        tree_size: c.tree_size,
        root: c.root,
        key_id: c.key_id,
        note: c.note,
        published_at: c.published_at,
    });

    let mut config = BTreeMap::new();
    for table in CONFIG_TABLES {
        config.insert(table.to_owned(), config_rows(conn, table).await?);
    }

    let keys = store.keys().clone();
    let (writes, _) = rebuild::plan_counters(
        conn,
        &keys,
        None,
        |_| true,
        None,
        |n| {
            // Progress through another connection: this one is in the transaction.
            let pool = pool.clone();
            let run_id = run.id;
            tokio::spawn(async move {
                Run { id: run_id }
                    .phase(&pool, "planning the policy windows", n as i64, 0)
                    .await;
            });
        },
    )
    .await?;
    let counters = writes
        .into_iter()
        .map(|w| snapshot::Counter {
            policy_id: w.listed.policy_id,
            agent_id: w.listed.agent_id,
            key: w.key,
            partition: u16::try_from(w.listed.partition).unwrap_or(u16::MAX),
            currency: w.listed.currency,
            expire_at_s: w.expire_at_s,
            fields: w.fields,
        })
        .collect();
    Ok(Point {
        taken_at,
        ledger_cut,
        consumer_offsets,
        counters,
        merkle,
        config,
    })
}

/// The rows of `table` as a JSON array (agents parents first).
async fn config_rows(
    conn: &mut AsyncPgConnection,
    table: &str,
) -> ServiceResult<serde_json::Value> {
    #[derive(diesel::QueryableByName)]
    struct Rows {
        #[diesel(sql_type = Text)]
        rows: String,
    }
    let sql = if table == "agents" {
        "WITH RECURSIVE d(id, depth) AS ( \
             SELECT id, 0 FROM agents WHERE parent_id IS NULL \
           UNION ALL \
             SELECT a.id, d.depth + 1 FROM agents a JOIN d ON a.parent_id = d.id \
             WHERE d.depth < 64) \
         SELECT coalesce(json_agg(a ORDER BY d.depth, a.id), '[]'::json)::text AS rows \
         FROM agents a JOIN d USING (id)"
            .to_owned()
    } else {
        format!("SELECT coalesce(json_agg(t), '[]'::json)::text AS rows FROM {table} t")
    };
    let rows: Rows = diesel::sql_query(sql).get_result(conn).await?;
    serde_json::from_str(&rows.rows)
        .map_err(|e| ServiceError::Internal(format!("{table} rows as JSON: {e}")))
}

/// Inserts the snapshot's configuration rows the database lacks (never over an
/// existing row); returns "table=n" for each table that got some, and moves the
/// config epoch when any did (every replica reloads its caches).
async fn restore_config(
    conn: &mut AsyncPgConnection,
    config: &BTreeMap<String, serde_json::Value>,
) -> ServiceResult<Vec<String>> {
    let mut out = Vec::new();
    let mut any = false;
    for table in CONFIG_TABLES {
        let Some(rows) = config.get(table) else {
            continue;
        };
        if rows.as_array().is_none_or(Vec::is_empty) {
            continue;
        }
        let n = diesel::sql_query(format!(
            "INSERT INTO {table} SELECT * FROM json_populate_recordset(NULL::{table}, $1::json) \
             ON CONFLICT DO NOTHING"
        ))
        .bind::<Text, _>(rows.to_string())
        .execute(conn)
        .await?;
        if n > 0 {
            any = true;
            out.push(format!("{table}={n}"));
        }
    }
    if any {
        bump_config_epoch(conn).await?;
    }
    Ok(out)
}

/// Ledger rows at or after the cut.
async fn events_after(conn: &mut AsyncPgConnection, cut: &[LedgerCut]) -> ServiceResult<i64> {
    #[derive(diesel::QueryableByName)]
    struct N {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let n: N = diesel::sql_query(
        "SELECT count(*) AS n FROM ledger_events e \
         WHERE e.kafka_offset >= coalesce((SELECT c.next FROM unnest($1::text[], $2::int[], \
               $3::bigint[]) AS c(topic, part, next) \
               WHERE c.topic = e.kafka_topic AND c.part = e.kafka_partition), 0)",
    )
    .bind::<diesel::sql_types::Array<Text>, _>(
        cut.iter().map(|c| c.topic.as_str()).collect::<Vec<_>>(),
    )
    .bind::<diesel::sql_types::Array<Integer>, _>(
        cut.iter().map(|c| c.partition).collect::<Vec<_>>(),
    )
    .bind::<diesel::sql_types::Array<BigInt>, _>(
        cut.iter().map(|c| c.next_offset).collect::<Vec<_>>(),
    )
    .get_result(conn)
    .await?;
    Ok(n.n)
}

fn info(s: &Summary) -> pb::SnapshotInfo {
    pb::SnapshotInfo {
        snapshot_id: s.snapshot_id.clone(),
        taken_at: s.taken_at.to_rfc3339(),
        checksum: s.checksum.clone(),
        size_bytes: s.size_bytes,
        counters: s.counters,
        reservations: s.reservations,
        ledger_events: s.ledger_events,
        format: s.format,
    }
}

fn snapshot_error(e: SnapshotError) -> ServiceError {
    match e {
        SnapshotError::Db(e) => e.into(),
        SnapshotError::Io { .. } => ServiceError::Unavailable(e.to_string()),
        SnapshotError::Corrupt { .. } => ServiceError::FailedPrecondition(e.to_string()),
        SnapshotError::Invalid(m) if m.contains("exists already") => ServiceError::AlreadyExists(m),
        SnapshotError::Invalid(m) => ServiceError::InvalidArgument(m),
    }
}

fn detail(response: &impl std::fmt::Debug) -> String {
    format!("{response:?}")
}

/// One row of `snapshot_runs`.
struct Run {
    id: i64,
}

#[derive(diesel::QueryableByName)]
struct RunId {
    #[diesel(sql_type = BigInt)]
    id: i64,
}

#[derive(diesel::QueryableByName)]
struct RunRow {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Text)]
    kind: String,
    #[diesel(sql_type = Text)]
    snapshot_id: String,
    #[diesel(sql_type = Text)]
    state: String,
    #[diesel(sql_type = Text)]
    phase: String,
    #[diesel(sql_type = BigInt)]
    done_items: i64,
    #[diesel(sql_type = BigInt)]
    total_items: i64,
    #[diesel(sql_type = Bool)]
    dry_run: bool,
    #[diesel(sql_type = Bool)]
    scheduled: bool,
    #[diesel(sql_type = Nullable<Text>)]
    error: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    started_at: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    finished_at: Option<String>,
}

impl Run {
    /// Claims the create of `id`: `None` when one is running or done already.
    async fn claim_create(
        pool: &db::Pool,
        id: &str,
        scheduled: bool,
    ) -> ServiceResult<Option<Run>> {
        let mut conn = db::conn(pool).await?;
        let rows: Vec<RunId> = diesel::sql_query(
            "INSERT INTO snapshot_runs (kind, snapshot_id, scheduled, state, phase) \
             VALUES ('create', $1, $2, 'running', 'starting') \
             ON CONFLICT (snapshot_id) WHERE kind = 'create' AND state <> 'failed' DO NOTHING \
             RETURNING id",
        )
        .bind::<Text, _>(id)
        .bind::<Bool, _>(scheduled)
        .load(&mut *conn)
        .await?;
        Ok(rows.into_iter().next().map(|r| Run { id: r.id }))
    }

    async fn start(pool: &db::Pool, kind: &str, id: &str, dry_run: bool) -> ServiceResult<Run> {
        let mut conn = db::conn(pool).await?;
        let row: RunId = diesel::sql_query(
            "INSERT INTO snapshot_runs (kind, snapshot_id, dry_run, state, phase) \
             VALUES ($1, $2, $3, 'running', 'starting') RETURNING id",
        )
        .bind::<Text, _>(kind)
        .bind::<Text, _>(id)
        .bind::<Bool, _>(dry_run)
        .get_result(&mut *conn)
        .await?;
        Ok(Run { id: row.id })
    }

    /// Records progress; a failure to record it is logged, never fatal.
    async fn phase(&self, pool: &db::Pool, phase: &str, done: i64, total: i64) {
        self.update(
            pool,
            "UPDATE snapshot_runs SET phase = $2, done_items = $3, total_items = $4, \
             updated_at = now() WHERE id = $1 AND state = 'running'",
            phase,
            done,
            total,
        )
        .await;
    }

    async fn done(&self, pool: &db::Pool, detail: &str) {
        self.finish(pool, "done", "detail", detail).await;
    }

    async fn fail(&self, pool: &db::Pool, error: &str) {
        self.finish(pool, "failed", "error", error).await;
    }

    /// Records progress or the end; a failure to record it is logged, never fatal
    /// (the work itself is done or failed already).
    async fn update(&self, pool: &db::Pool, sql: &str, text: &str, a: i64, b: i64) {
        let result = async {
            let mut conn = db::conn(pool).await?;
            diesel::sql_query(sql)
                .bind::<BigInt, _>(self.id)
                .bind::<Text, _>(text)
                .bind::<BigInt, _>(a)
                .bind::<BigInt, _>(b)
                .execute(&mut *conn)
                .await?;
            Ok::<_, ServiceError>(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(run = self.id, error = %e, "cannot record a snapshot run's progress");
        }
    }

    async fn finish(&self, pool: &db::Pool, state: &str, column: &str, text: &str) {
        let (detail, error) = if column == "detail" {
            (Some(text), None)
        } else {
            (None, Some(text))
        };
        let result = async {
            let mut conn = db::conn(pool).await?;
            diesel::sql_query(
                "UPDATE snapshot_runs SET state = $2, phase = $2, \
                 detail = CASE WHEN $3::text IS NULL THEN NULL \
                               ELSE jsonb_build_object('response', $3::text) END, \
                 error = $4, updated_at = now(), finished_at = now() WHERE id = $1",
            )
            .bind::<BigInt, _>(self.id)
            .bind::<Text, _>(state)
            .bind::<Nullable<Text>, _>(detail)
            .bind::<Nullable<Text>, _>(error)
            .execute(&mut *conn)
            .await?;
            Ok::<_, ServiceError>(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(run = self.id, error = %e, "cannot record the end of a snapshot run");
        }
    }
}

#[tonic::async_trait]
impl SnapshotService for SnapshotAdmin {
    async fn create_snapshot(
        &self,
        _request: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::CreateSnapshotResponse>, Status> {
        let me = self.clone();
        let result = super::detached(async move {
            me.create_now(None, Utc::now())
                .await?
                .map(|(_, response)| response)
                .ok_or_else(|| ServiceError::Internal("snapshot create not claimed".to_owned()))
        })
        .await;
        respond("CreateSnapshot", result)
    }

    async fn list_snapshots(
        &self,
        _request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        respond("ListSnapshots", self.list().await)
    }

    async fn snapshot_status(
        &self,
        request: Request<pb::SnapshotStatusRequest>,
    ) -> Result<Response<pb::SnapshotStatusResponse>, Status> {
        respond("SnapshotStatus", self.status(request.into_inner()).await)
    }

    async fn restore_snapshot(
        &self,
        request: Request<pb::RestoreSnapshotRequest>,
    ) -> Result<Response<pb::RestoreSnapshotResponse>, Status> {
        let me = self.clone();
        let req = request.into_inner();
        let result = super::detached(async move { me.restore(req).await }).await;
        respond("RestoreSnapshot", result)
    }

    async fn cleanup_snapshots(
        &self,
        request: Request<pb::CleanupSnapshotsRequest>,
    ) -> Result<Response<pb::CleanupSnapshotsResponse>, Status> {
        let req = request.into_inner();
        respond(
            "CleanupSnapshots",
            self.cleanup(req.retention_days, req.dry_run).await,
        )
    }
}
