//! Partition leases in PostgreSQL: which replica reads which partition, without
//! Kafka's group protocol.
//!
//! Why: a consumer group needs the broker's coordinator to expire a dead member
//! and hand its partitions on. tansu 0.6 never expires a SIGKILLed member, so a
//! restarted ledger-writer could join, get 0 partitions and write nothing more,
//! with readiness green (issue 22). A PostgreSQL session-level advisory lock dies
//! with the session that holds it: a process that is killed closes its socket and
//! the server frees its locks at once; a peer that vanishes without a word is
//! found by TCP keepalives (set per session below) within about 11 s.
//!
//! How (every `consumer.leaseIntervalMs`, one round trip or a few):
//! - A replica holds one *member* lock `(member namespace, slot)` for as long as
//!   its session lives; the number of member locks granted is the number of live
//!   replicas `M`.
//! - Each partition `p` of the topics has a lock `(topic namespace, p)`. A replica
//!   aims at `share = ceil(N / M)` of the `N` partitions: below it, it tries the
//!   free ones (in an order rotated by its slot, so replicas pick different ones);
//!   above it (a replica joined), it gives its least preferred ones up. The sum of
//!   the shares is at least `N`, so no partition stays unowned for longer than a
//!   tick once a replica has room.
//! - Taking a partition: lock, then `incremental_assign` from the group's committed
//!   offset. Giving one up: `incremental_unassign`, wait (bounded) for the batches in
//!   flight to commit, then unlock. Losing the session (the database went away):
//!   every partition is unassigned at once, since another replica may now take it.
//! - Offsets stay where they were: committed to the Kafka group after each durable
//!   batch ([`crate::runner`]). The group never has members (nobody subscribes), so
//!   Kafka accepts those commits from any replica. The runner commits only the
//!   partitions this replica still owns, so a replica that gave a partition up
//!   cannot move its offset back.
//!
//! Two replicas reading one partition for a moment (a session lost while its
//! process still writes) is safe: every write is idempotent on the event id; it
//! only costs work twice.
//!
//! The owner also records, per owned partition, where it stands (committed offset,
//! end offset, last commit time) in `consumer_partitions`, for `caracal ledger
//! status` and for operators.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::{Duration, Instant},
};

use caracal_service_kit::db::tls;
use diesel::sql_types::{Array, BigInt, Bool, Integer, Nullable, Text, Timestamptz};
use diesel_async::{AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use rdkafka::{consumer::Consumer, Offset, TopicPartitionList};
use tokio::{sync::watch, task::JoinHandle};

use crate::{
    metrics as m,
    runner::{KafkaConsumer, Progress},
};

/// A partition of a topic.
pub type TopicPartition = (String, i32);

/// Member slots per group: at most this many replicas hold leases at once.
const MAX_MEMBERS: i32 = 256;
/// Bound on one lease tick's database work; longer counts as a lost session.
const TICK_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a partition given up waits for the batches in flight to commit.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the topics' partition lists are read again from Kafka.
const METADATA_EVERY: Duration = Duration::from_secs(30);
/// Bound on a metadata request.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// What the lease task shares with the runner (commit filter) and the probes.
#[derive(Default)]
pub struct Leases {
    owned: Mutex<BTreeSet<TopicPartition>>,
    /// The lease session is up and its last tick succeeded.
    session_ok: AtomicBool,
    /// Live replicas of the group, as of the last tick.
    members: AtomicUsize,
    /// Why the session is down, for readiness.
    last_error: Mutex<Option<String>>,
}

impl Leases {
    /// Whether this replica holds the lease of `partition` of `topic`.
    pub fn owns(&self, topic: &str, partition: i32) -> bool {
        self.lock().contains(&(topic.to_owned(), partition))
    }

    /// The partitions this replica holds, in order.
    pub fn owned(&self) -> Vec<TopicPartition> {
        self.lock().iter().cloned().collect()
    }

    pub fn session_ok(&self) -> bool {
        AtomicBool::load(&self.session_ok, Ordering::SeqCst)
    }

    /// Why the lease session is down (None while it works).
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_error(&self, error: Option<String>) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = error;
    }

    pub fn members(&self) -> usize {
        AtomicUsize::load(&self.members, Ordering::SeqCst)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<TopicPartition>> {
        self.owned.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What a lease task needs to know.
#[derive(Debug, Clone)]
pub struct LeaseSettings {
    /// The database URL (the consumer's own).
    pub url: String,
    pub group: String,
    pub topics: Vec<String>,
    pub interval: Duration,
}

/// The advisory-lock namespace (first key) of `name`: FNV-1a, kept positive so
/// `pg_locks.classid` (an unsigned oid) reads back the same number.
fn namespace(name: &str) -> i32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    i32::try_from(h & 0x7fff_ffff).unwrap_or(0)
}

fn member_namespace(group: &str) -> i32 {
    namespace(&format!("caracal-lease-member/{group}"))
}

/// The advisory-lock namespace of the partitions of `topic` for `group` (the
/// second key is the partition): what an operator (or a test) locks to hold a
/// partition away from the replicas.
pub fn partition_namespace(group: &str, topic: &str) -> i32 {
    namespace(&format!("caracal-lease-partition/{group}/{topic}"))
}

/// How many partitions each of `members` replicas should hold of `total`.
pub fn share(total: usize, members: usize) -> usize {
    total.div_ceil(members.max(1))
}

/// `partitions` in this replica's order of preference: rotated by its slot, so
/// replicas starting together try different partitions first.
pub fn preference(partitions: &[TopicPartition], slot: i32, share: usize) -> Vec<TopicPartition> {
    if partitions.is_empty() {
        return Vec::new();
    }
    let start = (usize::try_from(slot).unwrap_or(0) * share.max(1)) % partitions.len();
    partitions[start..]
        .iter()
        .chain(&partitions[..start])
        .cloned()
        .collect()
}

/// One open lease session: its connection and the member slot it holds.
struct Session {
    conn: AsyncPgConnection,
    slot: i32,
    owner: String,
}

#[derive(diesel::QueryableByName)]
struct Flag {
    #[diesel(sql_type = Bool)]
    ok: bool,
}

#[derive(diesel::QueryableByName)]
struct Held {
    #[diesel(sql_type = BigInt)]
    ns: i64,
    #[diesel(sql_type = BigInt)]
    id: i64,
}

impl Session {
    async fn open(settings: &LeaseSettings) -> Result<Self, String> {
        let mut conn = tls::establish(&settings.url)
            .await
            .map_err(|e| format!("connecting: {e}"))?;
        // A replica that vanishes without closing its socket (node lost, network
        // cut) holds its locks until the server notices: about 5 + 3 x 2 s.
        conn.batch_execute(
            "SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 2; \
             SET tcp_keepalives_count = 3; SET application_name = 'caracal-lease'",
        )
        .await
        .map_err(|e| format!("session settings: {e}"))?;
        let ns = member_namespace(&settings.group);
        for slot in 0..MAX_MEMBERS {
            let got: Flag = diesel::sql_query("SELECT pg_try_advisory_lock($1, $2) AS ok")
                .bind::<Integer, _>(ns)
                .bind::<Integer, _>(slot)
                .get_result(&mut conn)
                .await
                .map_err(|e| format!("taking a member slot: {e}"))?;
            if got.ok {
                let host = std::env::var("HOSTNAME")
                    .ok()
                    .filter(|h| !h.is_empty())
                    .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
                    .map(|h| h.trim().to_owned())
                    .unwrap_or_else(|| "unknown".to_owned());
                let owner = format!("{host}/{}/{slot}", std::process::id());
                return Ok(Self { conn, slot, owner });
            }
        }
        Err(format!(
            "all {MAX_MEMBERS} member slots of the group are taken"
        ))
    }

    /// Every granted lock of the namespaces `ns`: (namespace, second key).
    async fn held(&mut self, ns: &[i64]) -> Result<Vec<Held>, String> {
        diesel::sql_query(
            "SELECT classid::bigint AS ns, objid::bigint AS id FROM pg_locks \
             WHERE locktype = 'advisory' AND granted AND objsubid = 2 \
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
               AND classid::bigint = ANY($1)",
        )
        .bind::<Array<BigInt>, _>(ns)
        .load(&mut self.conn)
        .await
        .map_err(|e| format!("reading the leases: {e}"))
    }

    async fn try_lock(&mut self, ns: i32, id: i32) -> Result<bool, String> {
        let got: Flag = diesel::sql_query("SELECT pg_try_advisory_lock($1, $2) AS ok")
            .bind::<Integer, _>(ns)
            .bind::<Integer, _>(id)
            .get_result(&mut self.conn)
            .await
            .map_err(|e| format!("taking a lease: {e}"))?;
        Ok(got.ok)
    }

    async fn unlock(&mut self, ns: i32, id: i32) -> Result<(), String> {
        diesel::sql_query("SELECT pg_advisory_unlock($1, $2) AS ok")
            .bind::<Integer, _>(ns)
            .bind::<Integer, _>(id)
            .get_result::<Flag>(&mut self.conn)
            .await
            .map(|_| ())
            .map_err(|e| format!("giving a lease up: {e}"))
    }

    /// [`Session::report`], for people only: a failure is logged, not returned
    /// (a database that refuses writes must not cost the leases).
    async fn record(
        &mut self,
        group: &str,
        rows: &[(TopicPartition, Option<PartitionState>)],
        whose: Whose,
    ) {
        if let Err(error) = self.report(group, rows, whose).await {
            tracing::debug!(%error, "recording the partitions' progress failed");
        }
    }

    /// Records where this replica stands on `rows` (or that it let go: `owner` None).
    async fn report(
        &mut self,
        group: &str,
        rows: &[(TopicPartition, Option<PartitionState>)],
        whose: Whose,
    ) -> Result<(), String> {
        if rows.is_empty() {
            return Ok(());
        }
        let topics: Vec<&str> = rows.iter().map(|((t, _), _)| t.as_str()).collect();
        let partitions: Vec<i32> = rows.iter().map(|((_, p), _)| *p).collect();
        let committed: Vec<Option<i64>> = rows
            .iter()
            .map(|(_, s)| s.as_ref().and_then(|s| s.committed))
            .collect();
        let ends: Vec<Option<i64>> = rows
            .iter()
            .map(|(_, s)| s.as_ref().and_then(|s| s.end))
            .collect();
        let at: Vec<Option<chrono::DateTime<chrono::Utc>>> = rows
            .iter()
            .map(|(_, s)| s.as_ref().and_then(|s| s.committed_at))
            .collect();
        let owner = (whose == Whose::Mine).then(|| self.owner.clone());
        // Another replica's row is its own to write: only make sure one exists,
        // and refresh it while nobody claims it (a holder that never reports).
        let only_unclaimed = if whose == Whose::Another {
            " WHERE c.owner IS NULL"
        } else {
            ""
        };
        diesel::sql_query(format!(
            "INSERT INTO consumer_partitions AS c \
               (group_id, topic, kafka_partition, owner, committed_offset, end_offset, last_commit_at, updated_at) \
             SELECT $1, t, p, $2, o, e, a, now() \
               FROM unnest($3::text[], $4::int[], $5::bigint[], $6::bigint[], $7::timestamptz[]) AS u(t, p, o, e, a) \
             ON CONFLICT (group_id, topic, kafka_partition) DO UPDATE SET \
               owner = EXCLUDED.owner, \
               committed_offset = COALESCE(EXCLUDED.committed_offset, c.committed_offset), \
               end_offset = COALESCE(EXCLUDED.end_offset, c.end_offset), \
               last_commit_at = COALESCE(EXCLUDED.last_commit_at, c.last_commit_at), \
               updated_at = now(){only_unclaimed}",
        ))
        .bind::<Text, _>(group)
        .bind::<Nullable<Text>, _>(owner)
        .bind::<Array<Text>, _>(topics)
        .bind::<Array<Integer>, _>(partitions)
        .bind::<Array<Nullable<BigInt>>, _>(committed)
        .bind::<Array<Nullable<BigInt>>, _>(ends)
        .bind::<Array<Nullable<Timestamptz>>, _>(at)
        .execute(&mut self.conn)
        .await
        .map(|_| ())
        .map_err(|e| format!("recording the partitions' progress: {e}"))
    }
}

/// What this replica knows of each of `partitions`, for [`Session::report`].
fn rows_of(
    progress: &Progress,
    partitions: &[TopicPartition],
) -> Vec<(TopicPartition, Option<PartitionState>)> {
    partitions
        .iter()
        .map(|tp| {
            // Not committed by this replica yet: the group's offset (what it resumed from).
            let state = progress.state(tp).map(|s| PartitionState {
                committed: s.committed.or(s.group_committed),
                ..s
            });
            (tp.clone(), state)
        })
        .collect()
}

/// Whose partitions a [`Session::report`] records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Whose {
    /// This replica's: it is the owner.
    Mine,
    /// Nobody holds them: owner cleared.
    Nobody,
    /// Another session holds them.
    Another,
}

/// Where this replica stands on one partition (from the runner's commits and the
/// lag sampler's watermarks).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartitionState {
    /// The offset this replica committed last, and when.
    pub committed: Option<i64>,
    pub committed_at: Option<chrono::DateTime<chrono::Utc>>,
    /// The partition's high watermark when last sampled.
    pub end: Option<i64>,
    /// The group's committed offset when last sampled (whoever committed it).
    pub group_committed: Option<i64>,
}

/// The lease task's state between ticks.
struct Task {
    settings: LeaseSettings,
    consumer: Arc<KafkaConsumer>,
    progress: Arc<Progress>,
    leases: Arc<Leases>,
    session: Option<Session>,
    partitions: Vec<TopicPartition>,
    metadata_at: Option<Instant>,
}

/// Starts the lease task. It runs until `stop` turns true, then closes its session
/// (every lease it held is freed with it): stop it only once the runner has
/// committed its last batch.
pub fn spawn(
    settings: LeaseSettings,
    consumer: Arc<KafkaConsumer>,
    progress: Arc<Progress>,
    leases: Arc<Leases>,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    metrics::counter!(m::LEASE_ERRORS, "group" => settings.group.clone()).increment(0);
    tokio::spawn(async move {
        let mut task = Task {
            settings,
            consumer,
            progress,
            leases,
            session: None,
            partitions: Vec::new(),
            metadata_at: None,
        };
        let mut backoff = task.settings.interval;
        loop {
            let ok = task.tick().await;
            let wait = if ok {
                backoff = task.settings.interval;
                task.settings.interval
            } else {
                backoff = (backoff * 2).min(Duration::from_secs(5));
                backoff
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                changed = stop.changed() => if changed.is_err() || *stop.borrow() { break },
            }
        }
        task.close().await;
    })
}

impl Task {
    /// One round: (re)open the session, read the leases, take or give partitions.
    /// False: it failed (logged; every partition was let go if the session is lost).
    async fn tick(&mut self) -> bool {
        if self.session.is_none() {
            match tokio::time::timeout(TICK_TIMEOUT, Session::open(&self.settings)).await {
                Ok(Ok(s)) => {
                    tracing::info!(owner = %s.owner, group = %self.settings.group, "lease session open");
                    self.session = Some(s);
                }
                Ok(Err(error)) => return self.lost(&error),
                Err(_) => return self.lost("opening the lease session timed out"),
            }
        }
        if self.partitions.is_empty()
            || self
                .metadata_at
                .is_none_or(|t| t.elapsed() >= METADATA_EVERY)
        {
            self.refresh_partitions().await;
        }
        match tokio::time::timeout(TICK_TIMEOUT, self.balance()).await {
            Ok(Ok(())) => {
                self.leases.session_ok.store(true, Ordering::SeqCst);
                self.leases.set_error(None);
                true
            }
            Ok(Err(error)) => self.lost(&error),
            Err(_) => self.lost("a lease round timed out"),
        }
    }

    /// The session is gone (or never came): its locks are gone with it, so stop
    /// reading every partition now.
    fn lost(&mut self, error: &str) -> bool {
        tracing::warn!(group = %self.settings.group, %error,
            "partition leases unavailable; reading nothing until they are back");
        metrics::counter!(m::LEASE_ERRORS, "group" => self.settings.group.clone()).increment(1);
        self.session = None;
        self.leases.session_ok.store(false, Ordering::SeqCst);
        self.leases.set_error(Some(error.to_owned()));
        let owned: Vec<TopicPartition> = std::mem::take(&mut *self.leases.lock())
            .into_iter()
            .collect();
        if !owned.is_empty() {
            self.unassign(&owned);
        }
        self.gauges();
        false
    }

    async fn refresh_partitions(&mut self) {
        let consumer = self.consumer.clone();
        let topics = self.settings.topics.clone();
        let read = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            for topic in &topics {
                let md = consumer.fetch_metadata(Some(topic), METADATA_TIMEOUT)?;
                for t in md.topics().iter().filter(|t| t.name() == topic) {
                    for p in t.partitions() {
                        out.push((topic.clone(), p.id()));
                    }
                }
            }
            out.sort();
            Ok::<_, rdkafka::error::KafkaError>(out)
        })
        .await;
        match read {
            Ok(Ok(list)) if !list.is_empty() => {
                self.partitions = list;
                self.metadata_at = Some(Instant::now());
            }
            Ok(Ok(_)) => {
                tracing::warn!(topics = ?self.settings.topics, "the topics have no partitions (yet)")
            }
            Ok(Err(error)) => tracing::warn!(%error, "reading the topics' partitions failed"),
            Err(error) => tracing::warn!(%error, "reading the topics' partitions failed"),
        }
    }

    async fn balance(&mut self) -> Result<(), String> {
        let group = self.settings.group.clone();
        let member_ns = member_namespace(&group);
        let by_ns: BTreeMap<i32, String> = self
            .settings
            .topics
            .iter()
            .map(|t| (partition_namespace(&group, t), t.clone()))
            .collect();
        let mut namespaces: Vec<i64> = by_ns.keys().map(|n| i64::from(*n)).collect();
        namespaces.push(i64::from(member_ns));
        let Some(session) = self.session.as_mut() else {
            return Err("no session".to_owned());
        };
        let held = session.held(&namespaces).await?;
        let members = held.iter().filter(|h| h.ns == i64::from(member_ns)).count();
        let taken: BTreeSet<TopicPartition> = held
            .iter()
            .filter_map(|h| {
                let ns = i32::try_from(h.ns).ok()?;
                Some((by_ns.get(&ns)?.clone(), i32::try_from(h.id).ok()?))
            })
            .collect();
        self.leases.members.store(members, Ordering::SeqCst);
        let share = share(self.partitions.len(), members);
        let order = preference(&self.partitions, session.slot, share);
        let owned = self.leases.owned();

        if owned.len() > share {
            // A replica joined: give the least preferred partitions up.
            let mut extra: Vec<TopicPartition> = order
                .iter()
                .rev()
                .filter(|tp| owned.contains(tp))
                .take(owned.len() - share)
                .cloned()
                .collect();
            extra.sort();
            self.give_up(&extra).await?;
        } else if owned.len() < share {
            let mut got = Vec::new();
            for tp in order.iter().filter(|tp| !taken.contains(*tp)) {
                if owned.len() + got.len() >= share {
                    break;
                }
                let ns = partition_namespace(&group, &tp.0);
                let Some(session) = self.session.as_mut() else {
                    return Err("no session".to_owned());
                };
                if session.try_lock(ns, tp.1).await? {
                    got.push(tp.clone());
                }
            }
            if !got.is_empty() {
                self.take(&got).await?;
            }
        }
        // Partitions nobody holds (a moment in a handover, or a problem) and
        // partitions held by sessions that never report (a hung owner) are recorded
        // too, with the group's offsets: `caracal ledger status` must see a
        // partition that no replica reads.
        let mine = self.leases.owned();
        let theirs = |tp: &TopicPartition| {
            let state = self.progress.state(tp).map(|s| PartitionState {
                committed: s.group_committed,
                committed_at: None,
                ..s
            });
            (tp.clone(), state)
        };
        let others: Vec<_> = self
            .partitions
            .iter()
            .filter(|tp| !mine.contains(tp))
            .collect();
        let free: Vec<_> = others
            .iter()
            .filter(|tp| !taken.contains(**tp))
            .map(|tp| theirs(tp))
            .collect();
        let held: Vec<_> = others
            .iter()
            .filter(|tp| taken.contains(**tp))
            .map(|tp| theirs(tp))
            .collect();
        if let Some(session) = self.session.as_mut() {
            for (rows, whose) in [(free, Whose::Nobody), (held, Whose::Another)] {
                session.record(&group, &rows, whose).await;
            }
        }
        self.gauges();
        let rows = rows_of(&self.progress, &self.leases.owned());
        if let Some(session) = self.session.as_mut() {
            session.record(&group, &rows, Whose::Mine).await;
        }
        Ok(())
    }

    /// Starts reading `partitions` (their locks are held) from the group's offsets.
    async fn take(&mut self, partitions: &[TopicPartition]) -> Result<(), String> {
        let mut tpl = TopicPartitionList::with_capacity(partitions.len());
        for (t, p) in partitions {
            tpl.add_partition_offset(t, *p, Offset::Stored)
                .map_err(|e| e.to_string())?;
        }
        if let Err(error) = self.consumer.incremental_assign(&tpl) {
            // Not reading them: do not keep them from another replica either.
            tracing::warn!(%error, ?partitions, "assigning leased partitions failed; letting them go");
            if let Some(session) = self.session.as_mut() {
                for (t, p) in partitions {
                    session
                        .unlock(partition_namespace(&self.settings.group, t), *p)
                        .await?;
                }
            }
            return Ok(());
        }
        self.leases.lock().extend(partitions.iter().cloned());
        tracing::info!(
            ?partitions,
            owner = self.session.as_ref().map(|s| s.owner.as_str()),
            "partition leases taken; reading from the committed offsets"
        );
        Ok(())
    }

    /// Stops reading `partitions`, lets the batches in flight commit (bounded), then
    /// frees their leases.
    async fn give_up(&mut self, partitions: &[TopicPartition]) -> Result<(), String> {
        self.unassign(partitions);
        let drained = self.progress.drained_after(DRAIN_TIMEOUT).await;
        {
            let mut owned = self.leases.lock();
            for tp in partitions {
                owned.remove(tp);
            }
        }
        let Some(session) = self.session.as_mut() else {
            return Err("no session".to_owned());
        };
        for (t, p) in partitions {
            session
                .unlock(partition_namespace(&self.settings.group, t), *p)
                .await?;
        }
        let rows = rows_of(&self.progress, partitions);
        session
            .record(&self.settings.group, &rows, Whose::Nobody)
            .await;
        tracing::info!(
            ?partitions,
            drained,
            "partition leases given up (another replica takes them)"
        );
        Ok(())
    }

    fn unassign(&self, partitions: &[TopicPartition]) {
        let mut tpl = TopicPartitionList::with_capacity(partitions.len());
        for (t, p) in partitions {
            tpl.add_partition(t, *p);
        }
        if let Err(error) = self.consumer.incremental_unassign(&tpl) {
            tracing::warn!(%error, ?partitions, "unassigning partitions failed");
        }
    }

    fn gauges(&self) {
        let group = self.settings.group.clone();
        // Precision loss only above 2^53 partitions.
        #[allow(clippy::cast_precision_loss)]
        {
            metrics::gauge!(m::PARTITIONS_OWNED, "group" => group.clone())
                .set(self.leases.lock().len() as f64);
            metrics::gauge!(m::LEASE_MEMBERS, "group" => group).set(self.leases.members() as f64);
        }
    }

    /// The consumer has stopped (its last batch committed): say so in the status
    /// table and close the session, which frees every lease.
    async fn close(&mut self) {
        let owned = self.leases.owned();
        if let Some(mut session) = self.session.take() {
            let rows = rows_of(&self.progress, &owned);
            session
                .record(&self.settings.group, &rows, Whose::Nobody)
                .await;
        }
        self.leases.lock().clear();
        self.leases.session_ok.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(n: i32) -> Vec<TopicPartition> {
        (0..n).map(|p| ("t".to_owned(), p)).collect()
    }

    #[test]
    fn shares_cover_every_partition() {
        for total in 0..20 {
            for members in 1..10 {
                assert!(share(total, members) * members >= total);
                assert!(share(total, members) <= total.max(1));
            }
        }
        assert_eq!(share(6, 0), 6);
        assert_eq!(share(6, 4), 2);
    }

    #[test]
    fn preference_rotates_by_slot_and_keeps_every_partition() {
        let p = parts(6);
        assert_eq!(preference(&p, 0, 3), p);
        let r = preference(&p, 1, 3);
        assert_eq!(r[0], ("t".to_owned(), 3));
        let mut sorted = r.clone();
        sorted.sort();
        assert_eq!(sorted, p);
        assert!(preference(&[], 3, 2).is_empty());
    }

    #[test]
    fn namespaces_are_positive_and_distinct() {
        let a = partition_namespace("g", "caracal.metering.events");
        let b = partition_namespace("g2", "caracal.metering.events");
        let c = member_namespace("g");
        assert!(a >= 0 && b >= 0 && c >= 0);
        assert_ne!(a, b);
        assert_ne!(a, c);
    }
}
