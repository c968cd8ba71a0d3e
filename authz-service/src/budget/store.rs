//! The budget store: typed calls to the Lua scripts.
//!
//! Each call is one EVALSHA (redis-rs loads the script on first use or after a Redis
//! restart), so an authorization costs exactly one Redis round trip.
//!
//! Group commit: while a call of a partition is in Redis, that partition's next
//! calls queue in its [`Lane`]; when it returns they go as ONE EVALSHA of
//! `lua/batch.lua`, which runs each call's own script in arrival order and answers
//! each separately (a refusal refuses only its call), with one `WAIT` for the lot
//! when replicas must acknowledge. No timer: a call that finds its partition idle
//! goes at once, alone, so nothing waits for company that is not there.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use caracal_domain::policy::OnExpiry;
use caracal_service_kit::redis::{RedisConn, RedisEndpoint, RedisMode};
use redis::{Cmd, ErrorKind, RedisResult, Script, ServerErrorKind, Value};

use super::keys::{split_reservation_id, KeySpace};

/// Redis is down, slow, refused one call, or answered something the scripts never
/// return.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("budget store unavailable: {0}")]
    Unavailable(String),
    /// Redis answered this one call with an error (a script refusing a corrupt
    /// record, say): the store is up, other calls may succeed.
    #[error("budget store refused the call: {0}")]
    Rejected(String),
    #[error("budget store answered unexpectedly: {0}")]
    Protocol(String),
    /// The partition's budget-state marker is missing: Redis lost its data, and
    /// nothing is decided there until `caracal budget rebuild` has run.
    #[error(
        "the budget state of partition {0} is lost (Redis lost its data): nothing is \
         decided there until `caracal budget rebuild` restores it from the ledger"
    )]
    StateLost(u16),
}

impl StoreError {
    /// True when the error concerns this call only (not the connection): a loop
    /// over many reservations goes on with the next one.
    pub fn is_per_call(&self) -> bool {
        !matches!(self, StoreError::Unavailable(_))
    }
}

impl From<redis::RedisError> for StoreError {
    fn from(e: redis::RedisError) -> Self {
        match e.kind() {
            // An error reply to this command: a script's error_reply (code
            // "caracal:") or a Lua runtime error ("ERR ...").
            ErrorKind::Extension | ErrorKind::Server(ServerErrorKind::ResponseError)
                if !(e.is_io_error() || e.is_timeout() || e.is_connection_dropped()) =>
            {
                StoreError::Rejected(e.to_string())
            }
            _ => StoreError::Unavailable(e.to_string()),
        }
    }
}

/// How a policy's spend is counted at the moment of a request.
#[derive(Debug, Clone)]
pub enum SlotMode {
    /// One counter for the calendar window containing "now"; the key expires a day
    /// after the window ends (0 = never, for `total`).
    Calendar { expire_at_s: i64 },
    /// Sub-bucket counters; spend in buckets `oldest..=bucket` counts.
    Rolling {
        bucket: i64,
        oldest: i64,
        width_s: i64,
    },
}

/// One policy to check and reserve against, with its counter key.
#[derive(Debug, Clone)]
pub struct PolicySlot {
    pub policy_id: String,
    pub limit_micros: i64,
    pub key: String,
    pub mode: SlotMode,
    pub on_expiry: OnExpiry,
}

/// Everything a reservation needs; ids are made by the caller so retries are stable
/// (the reservation id's stem is derived from the agent and the request id, see
/// [`super::keys::reservation_stem`]: its record is the idempotency key).
#[derive(Debug)]
pub struct ReserveRequest<'a> {
    pub partition: u16,
    pub request_id: &'a str,
    /// The id of the reservation this request makes if it is new:
    /// `<stem>_<generation>` (see [`super::keys::reservation_id`]; the generation
    /// is stored with it). A retry finds the stem's record and is answered with
    /// the id it holds. A bare stem makes a reservation without a generation.
    pub reservation_id: &'a str,
    pub amount_micros: i64,
    pub now_ms: i64,
    pub expires_at_ms: i64,
    pub agent_id: &'a str,
    pub root_agent_id: &'a str,
    pub currency: &'a str,
    pub provider: &'a str,
    pub model: &'a str,
    pub resource: &'a str,
    pub allow_event_id: &'a str,
    pub deny_event_id: &'a str,
    pub policies: &'a [PolicySlot],
    /// The W3C `traceparent` of the Authorize span (sampled traces only): its
    /// events carry it to Kafka, so the consumers' writes join the agent call's trace.
    pub traceparent: Option<&'a str>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum ReserveOutcome {
    /// Reserved on every policy; `used[i]` = spent + reserved of policy i before.
    Allowed { used: Vec<i64> },
    /// This agent already made this request; nothing was reserved.
    /// `reservation_id`: the reservation the request's record holds (made by an
    /// earlier Authorize). `finished`: None while it is live (it stands), else how
    /// it ended (the request must not be admitted again). `used[i]` = spent +
    /// reserved of policy i now.
    Duplicate {
        reservation_id: String,
        used: Vec<i64>,
        finished: Option<DoneMarker>,
    },
    /// Policy `index` (0-based) had no room; nothing was reserved.
    Denied { index: usize, used: Vec<i64> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishKind {
    Settle,
    Release,
    Expire,
}

impl FinishKind {
    fn as_str(self) -> &'static str {
        match self {
            FinishKind::Settle => "settle",
            FinishKind::Release => "release",
            FinishKind::Expire => "expire",
        }
    }
    fn parse(s: &str) -> Option<Self> {
        match s {
            "settle" => Some(FinishKind::Settle),
            "release" => Some(FinishKind::Release),
            "expire" => Some(FinishKind::Expire),
            _ => None,
        }
    }
}

/// How a finished reservation ended: the first line of its done marker,
/// `D <mode> <reserved> <charged> <currency>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DoneMarker {
    pub kind: FinishKind,
    pub reserved: i64,
    pub charged: i64,
    pub currency: String,
}

impl DoneMarker {
    fn parse(line: &str) -> Result<Self, StoreError> {
        let mut parts = line.split('\t');
        let (Some("D"), Some(mode), Some(reserved), Some(charged), Some(currency), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(protocol(&format!("done marker {line:?}")));
        };
        Ok(Self {
            kind: FinishKind::parse(mode).ok_or_else(|| protocol("done mode"))?,
            reserved: reserved.parse().map_err(|_| protocol("done amount"))?,
            charged: charged.parse().map_err(|_| protocol("done charged"))?,
            currency: currency.to_owned(),
        })
    }
}

/// How a reservation ends. Its event's id is `<reservation id>/<kind>`
/// (`.../settle`, `.../release`, `.../expire`), made by the script from the
/// reservation's full id (a stem alone, as ReleaseByRequest names it, gets the
/// record's generation).
#[derive(Debug, Clone)]
pub struct Finish<'a> {
    pub kind: FinishKind,
    pub partition: u16,
    /// As the caller names it: `<stem>_<generation>`, or a stem alone (any
    /// generation).
    pub reservation_id: &'a str,
    pub now_ms: i64,
    /// Settle only: the actual cost.
    pub cost_micros: i64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_input_tokens: u64,
    pub price_version: i32,
    /// Release only.
    pub reason: &'a str,
    pub done_ttl_s: u64,
    /// Settle: the currency of the actual cost; the script refuses it unless it is
    /// the reservation's ("" = not checked). Release with `tombstone`: the
    /// currency the tombstone names.
    pub currency: &'a str,
    /// Release only: when no record exists (the Authorize has not run yet, or
    /// never reserved), leave a released marker so that Authorize reserves nothing.
    pub tombstone: bool,
}

impl<'a> Finish<'a> {
    /// A finish of `kind` that charges nothing and carries no usage (release, expiry);
    /// a settle fills in the cost and usage with struct-update syntax.
    pub fn new(
        kind: FinishKind,
        partition: u16,
        reservation_id: &'a str,
        now_ms: i64,
        done_ttl_s: u64,
    ) -> Self {
        Self {
            kind,
            partition,
            reservation_id,
            now_ms,
            cost_micros: 0,
            input_tokens: 0,
            output_tokens: 0,
            cached_input_tokens: 0,
            price_version: 0,
            reason: "",
            done_ttl_s,
            currency: "",
            tombstone: false,
        }
    }
}

/// A policy's state after a reservation finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyUse {
    pub policy_id: String,
    pub limit_micros: i64,
    pub used_micros: i64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum FinishOutcome {
    Finished {
        kind: FinishKind,
        /// A Settle of a reservation that had expired: it charged, per policy, the
        /// actual cost minus what expiry charged there (`charged` = the actual cost).
        late: bool,
        reserved: i64,
        charged: i64,
        currency: String,
        policies: Vec<PolicyUse>,
    },
    /// Finished before (a retry, or expiry got there first): what happened then.
    AlreadyFinished {
        kind: FinishKind,
        reserved: i64,
        charged: i64,
        currency: String,
    },
    /// No such reservation (never made, or its marker has aged out, or the record
    /// holds another reservation of the request id than the one named).
    Unknown,
    /// A release with `tombstone` found no reservation and left a released marker.
    Tombstoned,
    /// A settle in another currency than the reservation's: nothing changed.
    CurrencyMismatch { reservation_currency: String },
}

/// How many replicas must hold a write before it is answered (`WAIT`), and how
/// long to wait for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaAck {
    pub replicas: u8,
    pub timeout: Duration,
}

impl ReplicaAck {
    /// Answer as soon as the primary has run the script.
    pub const NONE: ReplicaAck = ReplicaAck {
        replicas: 0,
        timeout: Duration::ZERO,
    };
}

/// Metric: decisions refused because too few replicas confirmed them in time.
pub const REPLICA_ACK_TIMEOUTS: &str = "caracal_redis_wait_timeouts_total";
/// Metric (histogram): calls per script run of a partition (1 = alone).
pub const GROUP_COMMIT_CALLS: &str = "caracal_redis_calls_per_script_run";
/// Metric: failed budget-store calls, by shard (the primary serving the key's slot
/// at the last topology read; "standalone" for one server).
pub const SHARD_ERRORS: &str = "caracal_redis_shard_errors_total";

/// Handle to the budget state. Cheap to clone: `redis.connections` multiplexed
/// connections (each reconnects by itself; on a cluster each follows the
/// topology), used in turn.
#[derive(Clone)]
pub struct BudgetStore {
    conns: Arc<[RedisConn]>,
    next: Arc<AtomicUsize>,
    keys: KeySpace,
    ack: ReplicaAck,
    authorize: Arc<Script>,
    finish: Arc<Script>,
    /// authorize.lua and finish.lua as functions, and lua/batch.lua calling them.
    batch: Arc<Script>,
    /// One per partition (group commit).
    lanes: Arc<[std::sync::Mutex<Lane>]>,
    /// Most calls in one script run; 1 = every call alone.
    group_max: usize,
    /// Slot ranges and their primaries (cluster), for the per-shard error label;
    /// refreshed by [`BudgetStore::refresh_topology`].
    owners: Arc<std::sync::RwLock<Vec<caracal_service_kit::redis::SlotOwner>>>,
}

impl BudgetStore {
    /// Connects lazily: the service starts even while Redis is down and answers
    /// UNAVAILABLE until it is back.
    pub fn new(
        endpoint: &RedisEndpoint,
        keys: KeySpace,
        connections: u16,
        ack: ReplicaAck,
    ) -> Result<Self, StoreError> {
        let conns = endpoint
            .connect(usize::from(connections.max(1)))
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        metrics::describe_counter!(
            REPLICA_ACK_TIMEOUTS,
            "Budget decisions failed closed because fewer than redis.minReplicasAck replicas confirmed them in time"
        );
        metrics::describe_counter!(SHARD_ERRORS, "Failed budget-store calls, by Redis shard");
        metrics::describe_histogram!(
            GROUP_COMMIT_CALLS,
            "Budget-store calls per script run of a partition (group commit; 1 = alone)"
        );
        // Failures are counted from 0 (a cluster's shards get theirs from the
        // topology: `refresh_topology`).
        if ack.replicas > 0 {
            metrics::counter!(REPLICA_ACK_TIMEOUTS).increment(0);
        }
        if endpoint.mode == RedisMode::Standalone {
            metrics::counter!(SHARD_ERRORS, "shard" => "standalone").increment(0);
        }
        Ok(Self {
            conns: conns.into(),
            next: Arc::new(AtomicUsize::new(0)),
            ack,
            authorize: Arc::new(Script::new(AUTHORIZE_LUA)),
            finish: Arc::new(Script::new(FINISH_LUA)),
            batch: Arc::new(Script::new(BATCH_LUA)),
            lanes: (0..keys.partitions())
                .map(|_| std::sync::Mutex::new(Lane::default()))
                .collect(),
            keys,
            group_max: usize::from(DEFAULT_GROUP_COMMIT_CALLS),
            owners: Arc::default(),
        })
    }

    /// At most `calls` calls of a partition in one script run (`redis.groupCommitMaxCalls`;
    /// 1 = every call alone, as before group commit).
    pub fn with_group_commit(mut self, calls: u16) -> Self {
        self.group_max = usize::from(calls.max(1));
        self
    }

    pub fn keys(&self) -> &KeySpace {
        &self.keys
    }

    /// One of the connections, in turn.
    pub fn connection(&self) -> RedisConn {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
        self.conns[i].clone()
    }

    /// With `minReplicasAck`, waits until that many replicas of every primary hold
    /// each write made so far on any of the store's connections (`WAIT` on each
    /// connection: it covers that connection's writes; on a cluster it goes to every
    /// primary and the fewest confirmations count). Each WAIT is bounded by
    /// `replicaAckTimeoutMs`, as on the hot path (a longer one would hold up the
    /// calls queued behind it on the shared connection); as many of them as fit in
    /// `patience` (at least one). Used by the admin writes that must outlive a
    /// failover (a rebuild's counters before its markers).
    pub async fn confirm_replicas(&self, patience: Duration) -> Result<(), StoreError> {
        if self.ack.replicas == 0 {
            return Ok(());
        }
        let millis = u64::try_from(self.ack.timeout.as_millis()).unwrap_or(u64::MAX);
        let attempts = u32::try_from(patience.as_millis() / self.ack.timeout.as_millis().max(1))
            .unwrap_or(u32::MAX)
            .max(1);
        for conn in self.conns.iter() {
            let mut conn = conn.clone();
            let mut acked = 0;
            for _ in 0..attempts.max(1) {
                acked = redis::cmd("WAIT")
                    .arg(self.ack.replicas)
                    .arg(millis)
                    .query_async(&mut conn)
                    .await?;
                if acked >= i64::from(self.ack.replicas) {
                    break;
                }
            }
            if acked < i64::from(self.ack.replicas) {
                metrics::counter!(REPLICA_ACK_TIMEOUTS).increment(1);
                return Err(StoreError::Unavailable(format!(
                    "{acked} of {} replicas confirmed the writes ({attempts} waits of {:?})",
                    self.ack.replicas, self.ack.timeout
                )));
            }
        }
        Ok(())
    }

    /// Re-reads which primary serves which slots (cluster; none standalone) and
    /// returns it.
    pub async fn refresh_topology(
        &self,
    ) -> Result<Vec<caracal_service_kit::redis::SlotOwner>, String> {
        let owners = self.connection().slot_owners().await?;
        for owner in &owners {
            metrics::counter!(SHARD_ERRORS, "shard" => owner.node.clone()).increment(0);
        }
        if let Ok(mut o) = self.owners.write() {
            o.clone_from(&owners);
        }
        Ok(owners)
    }

    /// Counts a failed call of `partition` against the shard serving it (every key
    /// of a partition shares its hash tag, so any of them names the slot).
    fn count_error(&self, partition: u16, e: &StoreError) {
        if !matches!(e, StoreError::Unavailable(_)) {
            return;
        }
        let shard = match self.conns.first().map(RedisConn::mode) {
            Some(RedisMode::Cluster) => {
                let slot = caracal_service_kit::redis::slot_of(&self.keys.state_marker(partition));
                self.owners
                    .read()
                    .ok()
                    .and_then(|o| caracal_service_kit::redis::owner_of(&o, slot).map(str::to_owned))
                    .unwrap_or_else(|| "unknown".to_owned())
            }
            _ => "standalone".to_owned(),
        };
        metrics::counter!(SHARD_ERRORS, "shard" => shard).increment(1);
    }

    /// Runs one call of a budget script (`cmd` = EVALSHA of `kind`'s script with
    /// its keys and arguments) through its partition's lane: alone when the lane
    /// is idle, else with the calls queued behind the one in Redis (module doc).
    async fn run(
        &self,
        kind: ScriptKind,
        partition: u16,
        cmd: Cmd,
    ) -> Result<Vec<Value>, StoreError> {
        let lane = match self.lanes.get(usize::from(partition)) {
            Some(lane) if self.group_max > 1 => lane,
            _ => return self.run_alone(kind, partition, &cmd).await,
        };
        let queued = {
            let mut l = lane
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if l.busy {
                let (tx, rx) = tokio::sync::oneshot::channel();
                l.queue.push(Queued {
                    kind,
                    cmd,
                    reply: tx,
                });
                Turn::Queued(rx)
            } else {
                l.busy = true;
                Turn::Alone(cmd)
            }
        };
        match queued {
            Turn::Queued(rx) => rx.await.unwrap_or_else(|_| {
                Err(StoreError::Unavailable(
                    "the budget store dropped a queued call".to_owned(),
                ))
            }),
            Turn::Alone(cmd) => {
                // Runs even if this caller goes away mid-call: the guard's drop hands
                // whatever queued meanwhile to a drainer (or frees the lane).
                let _lane = LaneGuard {
                    store: self,
                    partition,
                };
                self.run_alone(kind, partition, &cmd).await
            }
        }
    }

    /// Sends the calls queued in `partition`'s lane, a script run at a time, until
    /// it is empty; then frees the lane. Runs as its own task.
    async fn drain(self, partition: u16) {
        let Some(lane) = self.lanes.get(usize::from(partition)) else {
            return;
        };
        loop {
            let batch: Vec<Queued> = {
                let mut l = lane
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if l.queue.is_empty() {
                    l.busy = false;
                    return;
                }
                let n = l.queue.len().min(self.group_max);
                l.queue.drain(..n).collect()
            };
            self.run_batch(partition, batch).await;
        }
    }

    /// One script run for `batch` (the single script itself for one call); every
    /// caller gets its own reply.
    async fn run_batch(&self, partition: u16, mut batch: Vec<Queued>) {
        if batch.len() == 1 {
            if let Some(q) = batch.pop() {
                let reply = self.run_alone(q.kind, partition, &q.cmd).await;
                let _ = q.reply.send(reply);
            }
            return;
        }
        metrics::histogram!(GROUP_COMMIT_CALLS).record(batch.len() as f64);
        let cmd = batch_cmd(self.batch.get_hash(), &batch);
        match self.run_script(&self.batch, partition, &cmd).await {
            Ok(replies) if replies.len() == batch.len() => {
                for (q, reply) in batch.into_iter().zip(replies) {
                    let _ = q.reply.send(match reply {
                        Value::Array(v) => Ok(v),
                        Value::ServerError(e) => Err(StoreError::from(redis::RedisError::from(e))),
                        other => Err(protocol(&format!("a batched reply {other:?}"))),
                    });
                }
            }
            Ok(replies) => {
                let e = protocol(&format!(
                    "{} replies to a batch of {}",
                    replies.len(),
                    batch.len()
                ));
                for q in batch {
                    let _ = q.reply.send(Err(e.clone()));
                }
            }
            Err(e) => {
                for q in batch {
                    let _ = q.reply.send(Err(e.clone()));
                }
            }
        }
    }

    /// One call as its own script run.
    async fn run_alone(
        &self,
        kind: ScriptKind,
        partition: u16,
        cmd: &Cmd,
    ) -> Result<Vec<Value>, StoreError> {
        metrics::histogram!(GROUP_COMMIT_CALLS).record(1.0);
        let script = match kind {
            ScriptKind::Authorize => &self.authorize,
            ScriptKind::Finish => &self.finish,
        };
        self.run_script(script, partition, cmd).await
    }

    /// Runs one script (`cmd` = EVALSHA of `script` with its keys and arguments)
    /// and, when replicas must acknowledge, `WAIT`s for them in the
    /// same pipeline: both reach the primary that serves the script's slot on one
    /// connection, so the `WAIT` covers exactly this write (and any queued before
    /// it). Fewer confirmations than required fail closed; the write stays on the
    /// primary, and the callers' retries are idempotent (a retried Authorize finds
    /// its reservation, a retried Settle its done marker; the gateway releases an
    /// Authorize that failed).
    async fn run_script(
        &self,
        script: &Script,
        partition: u16,
        cmd: &Cmd,
    ) -> Result<Vec<Value>, StoreError> {
        let result = self.run_inner(script, cmd).await;
        if let Err(e) = &result {
            self.count_error(partition, e);
        }
        result
    }

    async fn run_inner(&self, script: &Script, cmd: &Cmd) -> Result<Vec<Value>, StoreError> {
        let mut conn = self.connection();
        let mut loaded = false;
        loop {
            let reply: RedisResult<Vec<Value>> = if self.ack.replicas == 0 {
                cmd.query_async(&mut conn).await
            } else {
                let mut pipe = redis::pipe();
                pipe.add_command(cmd.clone())
                    .cmd("WAIT")
                    .arg(self.ack.replicas)
                    .arg(u64::try_from(self.ack.timeout.as_millis()).unwrap_or(u64::MAX));
                let (reply, acked): (RedisResult<Vec<Value>>, RedisResult<i64>) =
                    pipe.ignore_errors().query_async(&mut conn).await?;
                match (reply, acked) {
                    (Ok(reply), Ok(n)) if n >= i64::from(self.ack.replicas) => Ok(reply),
                    (Ok(_), Ok(n)) => {
                        metrics::counter!(REPLICA_ACK_TIMEOUTS).increment(1);
                        return Err(StoreError::Unavailable(format!(
                            "{n} of {} replicas confirmed the write within {:?}",
                            self.ack.replicas, self.ack.timeout
                        )));
                    }
                    (Ok(_), Err(e)) => {
                        return Err(StoreError::Unavailable(format!("WAIT failed: {e}")))
                    }
                    (Err(e), _) => Err(e),
                }
            };
            match reply {
                // A server that lost its scripts (restart, failover to a replica
                // that never saw SCRIPT LOAD): load it (on every node) and retry once.
                Err(e) if !loaded && e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                    script.load_async(&mut conn).await?;
                    loaded = true;
                }
                other => return other.map_err(StoreError::from),
            }
        }
    }

    /// Checks and reserves on every policy, atomically.
    pub async fn reserve(&self, req: &ReserveRequest<'_>) -> Result<ReserveOutcome, StoreError> {
        let p = req.partition;
        let (stem, generation) = split_reservation_id(req.reservation_id);
        let meta = event_meta(req, generation);
        let record = reservation_record(req);
        let rsv_key = self.keys.reservation(p, stem);
        let mut inv = redis::cmd("EVALSHA");
        inv.arg(self.authorize.get_hash())
            .arg(4 + req.policies.len())
            .arg(&rsv_key)
            .arg(self.keys.expiry(p))
            .arg(self.keys.outbox(p));
        for slot in req.policies {
            inv.arg(&slot.key);
        }
        inv.arg(self.keys.state_marker(p));
        inv.arg(req.now_ms)
            .arg(req.reservation_id)
            .arg(req.amount_micros)
            .arg(req.expires_at_ms)
            .arg(meta)
            .arg(record)
            .arg(req.allow_event_id)
            .arg(req.deny_event_id)
            .arg(req.policies.len())
            .arg(stem);
        for slot in req.policies {
            let (mode, bucket, oldest, expire_at) = match slot.mode {
                SlotMode::Calendar { expire_at_s } => ("c", 0, 0, expire_at_s),
                SlotMode::Rolling { bucket, oldest, .. } => ("r", bucket, oldest, 0),
            };
            inv.arg(&slot.policy_id)
                .arg(slot.limit_micros)
                .arg(mode)
                .arg(bucket)
                .arg(oldest)
                .arg(expire_at);
        }
        let reply = self.run(ScriptKind::Authorize, p, inv).await?;
        if is_lost(&reply) {
            return Err(StoreError::StateLost(p));
        }
        parse_reserve(&reply, req.policies.len())
    }

    /// Settles, releases or expires a reservation, exactly once.
    pub async fn finish(&self, f: &Finish<'_>) -> Result<FinishOutcome, StoreError> {
        let p = f.partition;
        let (stem, generation) = split_reservation_id(f.reservation_id);
        let rsv_key = self.keys.reservation(p, stem);
        let mut inv = redis::cmd("EVALSHA");
        inv.arg(self.finish.get_hash())
            .arg(5)
            .arg(&rsv_key)
            .arg(self.keys.expiry(p))
            .arg(self.keys.outbox(p))
            .arg(self.keys.state_marker(p))
            .arg(self.keys.parked(p))
            .arg(f.kind.as_str())
            .arg(f.now_ms)
            .arg(stem)
            .arg(f.done_ttl_s)
            .arg(f.cost_micros)
            .arg(generation.unwrap_or_default())
            .arg(f.input_tokens)
            .arg(f.output_tokens)
            .arg(f.cached_input_tokens)
            .arg(f.price_version)
            .arg(f.reason)
            .arg(f.currency)
            .arg(if f.tombstone { "1" } else { "0" });
        let reply = self.run(ScriptKind::Finish, p, inv).await?;
        if is_lost(&reply) {
            return Err(StoreError::StateLost(p));
        }
        parse_finish(&reply)
    }

    /// Reservations of a partition whose expiry time has passed, oldest first:
    /// at most `limit`, after the first `skip`. They are named by their stems (see
    /// [`KeySpace::expiry`]), which [`BudgetStore::finish`] takes as they are.
    pub async fn due_reservations(
        &self,
        partition: u16,
        now_ms: i64,
        skip: usize,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let mut conn = self.connection();
        let ids: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.keys.expiry(partition))
            .arg("-inf")
            .arg(now_ms)
            .arg("LIMIT")
            .arg(skip)
            .arg(limit)
            .query_async(&mut conn)
            .await?;
        Ok(ids)
    }

    /// Readiness: the server answers PING; a cluster also reports
    /// `cluster_state:ok` with every primary answering.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.connection()
            .check()
            .await
            .map_err(StoreError::Unavailable)
    }
}

/// What every event of a reservation carries, as the JSON object the outbox relay
/// merges into the entry's fields (one stream field instead of seven). It is also
/// the last line of the reservation's record, where `generation` names the
/// reservation among those of its request id (the scripts read it there).
fn event_meta(req: &ReserveRequest<'_>, generation: Option<&str>) -> String {
    #[derive(serde::Serialize)]
    struct Meta<'a> {
        request_id: &'a str,
        agent_id: &'a str,
        root_agent_id: &'a str,
        currency: &'a str,
        provider: &'a str,
        model: &'a str,
        resource: &'a str,
        /// When the reservation was made (ms): charge events carry it as
        /// `reserved_at`, the instant whose policy windows the charge counts in.
        reserved_at_ms: String,
        /// The reservation id's generation (see `keys::reservation_id`).
        #[serde(skip_serializing_if = "Option::is_none")]
        generation: Option<&'a str>,
        /// The Authorize span's context; the relay sends it as a Kafka header.
        #[serde(skip_serializing_if = "Option::is_none")]
        traceparent: Option<&'a str>,
    }
    serde_json::to_string(&Meta {
        request_id: req.request_id,
        agent_id: req.agent_id,
        root_agent_id: req.root_agent_id,
        currency: req.currency,
        provider: req.provider,
        model: req.model,
        resource: req.resource,
        reserved_at_ms: req.now_ms.to_string(),
        generation,
        traceparent: req.traceparent,
    })
    // Serialising borrowed strings cannot fail; an empty object would be poison.
    .unwrap_or_else(|_| "{}".to_owned())
}

/// The live reservation record, in the line format finish.lua reads (see there),
/// but its last line: authorize.lua appends the event metadata it is also given
/// for the event, so the metadata crosses the wire once. Keys and policy ids hold
/// no tabs or newlines (UUIDs and a validated prefix); the JSON metadata escapes them.
fn reservation_record(req: &ReserveRequest<'_>) -> String {
    use std::fmt::Write as _;
    let mut rec = String::with_capacity(32 + 160 * req.policies.len());
    let _ = writeln!(
        rec,
        "L\t{}\t{}\t{}",
        req.amount_micros,
        req.currency,
        req.policies.len()
    );
    for slot in req.policies {
        let (mode, bucket, width, older) = match slot.mode {
            SlotMode::Calendar { .. } => ('c', 0, 0, 0),
            SlotMode::Rolling {
                bucket,
                oldest,
                width_s,
            } => ('r', bucket, width_s, bucket.saturating_sub(oldest).max(0)),
        };
        let _ = writeln!(
            rec,
            "{}\t{}\t{}\t{mode}\t{bucket}\t{width}\t{older}\t{}",
            slot.key,
            slot.policy_id,
            slot.limit_micros,
            slot.on_expiry.as_str()
        );
    }
    rec
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        other => text(other)?.parse().ok(),
    }
}

/// The group-commit script: authorize.lua and finish.lua as the functions
/// lua/batch.lua calls.
/// Each budget script's body is a function of the group-commit script, after its
/// prelude (`MARKER_PRESENT`: the run looked at the partition's budget-state
/// marker; the expiry index's writes deferred to the end of the run), or a script
/// of its own after lua/alone_prelude.lua.
const BATCH_LUA: &str = concat!(
    include_str!("lua/batch_prelude.lua"),
    "local function authorize(KEYS, ARGV, MARKER_PRESENT)\n",
    include_str!("lua/authorize.lua"),
    "\nend\nlocal function finish(KEYS, ARGV, MARKER_PRESENT)\n",
    include_str!("lua/finish.lua"),
    "\nend\n",
    include_str!("lua/batch.lua"),
);

/// authorize.lua as a script of its own.
const AUTHORIZE_LUA: &str = concat!(
    include_str!("lua/alone_prelude.lua"),
    include_str!("lua/authorize.lua")
);

/// finish.lua as a script of its own.
const FINISH_LUA: &str = concat!(
    include_str!("lua/alone_prelude.lua"),
    include_str!("lua/finish.lua")
);

/// `redis.groupCommitMaxCalls` unset.
pub const DEFAULT_GROUP_COMMIT_CALLS: u16 = 64;

/// Which script a call runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ScriptKind {
    Authorize,
    Finish,
}

/// A call waiting in its partition's lane.
struct Queued {
    kind: ScriptKind,
    /// EVALSHA <sha> <number of keys> <keys...> <arguments...>
    cmd: Cmd,
    reply: tokio::sync::oneshot::Sender<Result<Vec<Value>, StoreError>>,
}

/// What a call found in its lane: go now, alone, or wait for the drainer's answer.
enum Turn {
    Alone(Cmd),
    Queued(tokio::sync::oneshot::Receiver<Result<Vec<Value>, StoreError>>),
}

/// A partition's group commit: `busy` while one of its script runs is in Redis
/// (the calls arriving meanwhile queue); a non-empty queue is always busy.
#[derive(Default)]
struct Lane {
    busy: bool,
    queue: Vec<Queued>,
}

/// Held by a call that runs alone: when it ends (answered, or its caller gone),
/// the calls that queued meanwhile go to a drainer task, or the lane is freed.
struct LaneGuard<'a> {
    store: &'a BudgetStore,
    partition: u16,
}

impl Drop for LaneGuard<'_> {
    fn drop(&mut self) {
        let Some(lane) = self.store.lanes.get(usize::from(self.partition)) else {
            return;
        };
        let mut l = lane
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if l.queue.is_empty() {
            l.busy = false;
        } else {
            tokio::spawn(self.store.clone().drain(self.partition));
        }
    }
}

/// The batch script's EVALSHA for `batch` (see lua/batch.lua), from each call's
/// own EVALSHA <sha> <number of keys> <keys...> <arguments...>.
fn batch_cmd(sha: &str, batch: &[Queued]) -> Cmd {
    let mut keys: Vec<&[u8]> = Vec::new();
    let mut args: Vec<&[u8]> = Vec::new();
    let mut header: Vec<(&'static str, usize, usize)> = Vec::with_capacity(batch.len());
    for q in batch {
        let parts: Vec<&[u8]> = q
            .cmd
            .args_iter()
            .filter_map(|a| match a {
                redis::Arg::Simple(b) => Some(b),
                _ => None,
            })
            .collect();
        let nkeys = parts
            .get(2)
            .and_then(|n| std::str::from_utf8(n).ok())
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(0);
        let (k, a) = parts
            .get(3..)
            .unwrap_or_default()
            .split_at(nkeys.min(parts.len().saturating_sub(3)));
        keys.extend_from_slice(k);
        args.extend_from_slice(a);
        let script = match q.kind {
            ScriptKind::Authorize => "a",
            ScriptKind::Finish => "f",
        };
        header.push((script, k.len(), a.len()));
    }
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(sha).arg(keys.len());
    for k in keys {
        cmd.arg(k);
    }
    cmd.arg(batch.len());
    for (script, nk, na) in header {
        cmd.arg(script).arg(nk).arg(na);
    }
    for a in args {
        cmd.arg(a);
    }
    cmd
}

/// The scripts' answer when the partition's budget-state marker is missing.
fn is_lost(reply: &[Value]) -> bool {
    reply.len() == 1 && reply.first().and_then(text).as_deref() == Some("lost")
}

fn protocol(what: &str) -> StoreError {
    StoreError::Protocol(what.to_owned())
}

fn parse_reserve(reply: &[Value], npol: usize) -> Result<ReserveOutcome, StoreError> {
    let tag = reply
        .first()
        .and_then(text)
        .ok_or_else(|| protocol("empty reply"))?;
    let ints = |from: usize| -> Result<Vec<i64>, StoreError> {
        reply
            .get(from..)
            .unwrap_or_default()
            .iter()
            .map(|v| int(v).ok_or_else(|| protocol("non-integer used amount")))
            .collect()
    };
    match tag.as_str() {
        "allow" => {
            let used = ints(1)?;
            if used.len() != npol {
                return Err(protocol("allow: wrong number of policies"));
            }
            Ok(ReserveOutcome::Allowed { used })
        }
        "deny" => {
            let index = reply
                .get(1)
                .and_then(int)
                .ok_or_else(|| protocol("deny index"))?;
            let used = ints(2)?;
            let index = usize::try_from(index - 1).map_err(|_| protocol("deny index"))?;
            if index >= npol || used.len() != npol {
                return Err(protocol("deny: bad index or policy count"));
            }
            Ok(ReserveOutcome::Denied { index, used })
        }
        "dup" | "finished" => {
            let reservation_id = reply
                .get(1)
                .and_then(text)
                .ok_or_else(|| protocol("dup: reservation id"))?;
            let (finished, from) = if tag == "finished" {
                let line = reply
                    .get(2)
                    .and_then(text)
                    .ok_or_else(|| protocol("finished marker"))?;
                (Some(DoneMarker::parse(&line)?), 3)
            } else {
                (None, 2)
            };
            let used = ints(from)?;
            if used.len() != npol {
                return Err(protocol("dup: wrong number of policies"));
            }
            Ok(ReserveOutcome::Duplicate {
                reservation_id,
                used,
                finished,
            })
        }
        other => Err(protocol(&format!("unknown reply {other:?}"))),
    }
}

fn parse_finish(reply: &[Value]) -> Result<FinishOutcome, StoreError> {
    let tag = reply
        .first()
        .and_then(text)
        .ok_or_else(|| protocol("empty reply"))?;
    match tag.as_str() {
        "unknown" => Ok(FinishOutcome::Unknown),
        "tombstone" => Ok(FinishOutcome::Tombstoned),
        "currency" => Ok(FinishOutcome::CurrencyMismatch {
            reservation_currency: reply
                .get(1)
                .and_then(text)
                .ok_or_else(|| protocol("reservation currency"))?,
        }),
        "done" => {
            let marker = reply
                .get(1)
                .and_then(text)
                .ok_or_else(|| protocol("done marker"))?;
            let DoneMarker {
                kind,
                reserved,
                charged,
                currency,
            } = DoneMarker::parse(&marker)?;
            Ok(FinishOutcome::AlreadyFinished {
                kind,
                reserved,
                charged,
                currency,
            })
        }
        mode => {
            let (kind, late) = match mode {
                "late_settle" => (FinishKind::Settle, true),
                other => (
                    FinishKind::parse(other).ok_or_else(|| protocol("finish mode"))?,
                    false,
                ),
            };
            let reserved = reply
                .get(1)
                .and_then(int)
                .ok_or_else(|| protocol("reserved"))?;
            let charged = reply
                .get(2)
                .and_then(int)
                .ok_or_else(|| protocol("charged"))?;
            let currency = reply
                .get(3)
                .and_then(text)
                .ok_or_else(|| protocol("currency"))?;
            let rest = reply.get(4..).unwrap_or_default();
            if rest.len() % 3 != 0 {
                return Err(protocol("policy triples"));
            }
            let policies = rest
                .chunks(3)
                .map(|c| {
                    Ok(PolicyUse {
                        policy_id: text(&c[0]).ok_or_else(|| protocol("policy id"))?,
                        limit_micros: int(&c[1]).ok_or_else(|| protocol("limit"))?,
                        used_micros: int(&c[2]).ok_or_else(|| protocol("used"))?,
                    })
                })
                .collect::<Result<Vec<_>, StoreError>>()?;
            Ok(FinishOutcome::Finished {
                kind,
                late,
                reserved,
                charged,
                currency,
                policies,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn a_finished_request_is_a_duplicate_that_says_how_it_ended() {
        let reply = [
            bulk("finished"),
            bulk("rsv_1_x_17"),
            bulk("D\texpire\t300\t300\tUSD"),
            Value::Int(7),
        ];
        assert_eq!(
            parse_reserve(&reply, 1).unwrap(),
            ReserveOutcome::Duplicate {
                reservation_id: "rsv_1_x_17".into(),
                used: vec![7],
                finished: Some(DoneMarker {
                    kind: FinishKind::Expire,
                    reserved: 300,
                    charged: 300,
                    currency: "USD".into(),
                }),
            }
        );
        let live = [bulk("dup"), bulk("rsv_1_x"), Value::Int(7), Value::Int(9)];
        assert_eq!(
            parse_reserve(&live, 2).unwrap(),
            ReserveOutcome::Duplicate {
                reservation_id: "rsv_1_x".into(),
                used: vec![7, 9],
                finished: None,
            }
        );
        // A garbled marker is a protocol error, not an allow.
        assert!(parse_reserve(
            &[
                bulk("finished"),
                bulk("r"),
                bulk("D\tsettle"),
                Value::Int(7)
            ],
            1
        )
        .is_err());
    }

    #[test]
    fn finish_replies_parse() {
        let late = [
            bulk("late_settle"),
            Value::Int(300),
            Value::Int(500),
            bulk("USD"),
            bulk("pol"),
            Value::Int(1000),
            Value::Int(500),
        ];
        assert_eq!(
            parse_finish(&late).unwrap(),
            FinishOutcome::Finished {
                kind: FinishKind::Settle,
                late: true,
                reserved: 300,
                charged: 500,
                currency: "USD".into(),
                policies: vec![PolicyUse {
                    policy_id: "pol".into(),
                    limit_micros: 1000,
                    used_micros: 500,
                }],
            }
        );
        assert_eq!(
            parse_finish(&[bulk("tombstone")]).unwrap(),
            FinishOutcome::Tombstoned
        );
        assert_eq!(
            parse_finish(&[bulk("currency"), bulk("USD")]).unwrap(),
            FinishOutcome::CurrencyMismatch {
                reservation_currency: "USD".into()
            }
        );
        // A tombstone of an agent without policies names no currency.
        assert_eq!(
            parse_finish(&[bulk("done"), bulk("D\trelease\t0\t0\t")]).unwrap(),
            FinishOutcome::AlreadyFinished {
                kind: FinishKind::Release,
                reserved: 0,
                charged: 0,
                currency: String::new(),
            }
        );
    }

    #[test]
    fn script_refusals_are_per_call_and_connection_trouble_is_not() {
        let refused = redis::RedisError::from((redis::ErrorKind::Extension, "caracal: corrupt"));
        assert!(StoreError::from(refused).is_per_call());
        let io = redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(!StoreError::from(io).is_per_call());
    }
}
