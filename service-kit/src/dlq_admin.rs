//! Operating the dead-letter topic: reading what is in it, and replaying a dead
//! letter to its original topic, once.
//!
//! - **Reading** ([`DlqAdmin::read`]): every partition of the DLQ topic from its low
//!   watermark up to the high watermark read at the start (what arrives meanwhile
//!   waits for the next read), so a read always ends; bounded by `readTimeout`. The
//!   reader assigns the partitions itself and never commits: it belongs to no group
//!   and moves nobody's offsets. A dead letter's id is `<dlq partition>:<dlq offset>`,
//!   stable for as long as the message is in the topic.
//! - **Replaying** ([`DlqAdmin::replay`]): the original key, headers and payload go
//!   back to the original topic and partition, plus the header
//!   `caracal-dlq-replay: <id>`. Once per dead letter, recorded in PostgreSQL
//!   (`dlq_replays`, unique on DLQ topic/partition/offset): claim the row, produce with
//!   `acks=all` and wait for the broker's delivery report, then mark the row done. A
//!   dead letter whose row is marked is never replayed again (the answer says when
//!   and by whom it was). Only to the deployment's own topics
//!   ([`DlqAdmin::replay_targets`]): the envelope's topic is data (anyone who can
//!   write to the DLQ topic can name any topic), so a dead letter naming another
//!   topic, or the DLQ itself, is refused before anything is claimed or published.
//!
//! Pending = in the topic and not (yet) marked replayed: what `caracal_dlq_size`
//! counts.

use std::{collections::HashMap, fmt, str::FromStr, time::Duration};

use base64::{engine::general_purpose::STANDARD, Engine as _};
use chrono::{DateTime, Utc};
use diesel::sql_types::{Array, BigInt, Integer, Nullable, Text, Timestamptz};
use diesel_async::RunQueryDsl;
use rdkafka::{
    consumer::{BaseConsumer, Consumer},
    error::KafkaError,
    message::{Header, Message, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
    Offset, TopicPartitionList,
};

use crate::{
    db::Pool,
    dlq::DeadLetter,
    kafka::{client_config, producer_config, KafkaConfig},
};

/// Header a replayed message carries: the id of the dead letter it came from.
pub const REPLAY_HEADER: &str = "caracal-dlq-replay";

/// Largest number of dead letters one replay call handles.
pub const MAX_REPLAY: usize = 1000;

/// How long a poll of the reader waits for the next message.
const POLL: Duration = Duration::from_millis(200);

/// A dead letter's place in the DLQ topic, shown as `<partition>:<offset>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeadLetterId {
    pub partition: i32,
    pub offset: i64,
}

impl fmt::Display for DeadLetterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.partition, self.offset)
    }
}

impl FromStr for DeadLetterId {
    type Err = DlqError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || DlqError::InvalidId(s.to_owned());
        let (p, o) = s.trim().split_once(':').ok_or_else(bad)?;
        let partition: i32 = p.parse().map_err(|_| bad())?;
        let offset: i64 = o.parse().map_err(|_| bad())?;
        if partition < 0 || offset < 0 {
            return Err(bad());
        }
        Ok(Self { partition, offset })
    }
}

/// A recorded replay (or a claim still in flight: `replayed_at` is `None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayRecord {
    /// The admin credential that asked for it.
    pub actor: String,
    pub claimed_at: DateTime<Utc>,
    pub replayed_at: Option<DateTime<Utc>>,
    pub target_topic: String,
    pub target_partition: Option<i32>,
    pub target_offset: Option<i64>,
}

/// One message of the DLQ topic.
#[derive(Debug, Clone)]
pub struct StoredDeadLetter {
    pub id: DeadLetterId,
    /// When it was written to the DLQ (the Kafka message timestamp).
    pub dead_lettered_at: Option<DateTime<Utc>>,
    /// The envelope, or why the message is not one.
    pub envelope: Result<DeadLetter, String>,
    /// Bytes of the original payload (known even when a read leaves them out).
    pub payload_size: u64,
    /// Its replay, when one was claimed or done.
    pub replay: Option<ReplayRecord>,
}

impl StoredDeadLetter {
    fn from_message(partition: i32, offset: i64, ts_ms: Option<i64>, payload: &[u8]) -> Self {
        let envelope = serde_json::from_slice::<DeadLetter>(payload)
            .map_err(|e| format!("not a dead-letter envelope: {e}"));
        // base64 is 4 characters per 3 bytes, minus the padding.
        let payload_size = envelope
            .as_ref()
            .ok()
            .and_then(|d| d.payload_base64.as_deref())
            .map_or(0, |p| {
                let padding = p.bytes().rev().take_while(|b| *b == b'=').count();
                ((p.len() / 4) * 3).saturating_sub(padding) as u64
            });
        Self {
            id: DeadLetterId { partition, offset },
            dead_lettered_at: ts_ms.and_then(DateTime::from_timestamp_millis),
            envelope,
            payload_size,
            replay: None,
        }
    }

    pub fn original_topic(&self) -> Option<&str> {
        self.envelope
            .as_ref()
            .ok()
            .and_then(|d| d.original_topic.as_deref())
    }

    /// The consumer group (or `outbox-relay`) that gave up on it.
    pub fn consumer(&self) -> Option<&str> {
        self.envelope.as_ref().ok().map(|d| d.consumer.as_str())
    }

    /// Not (yet) replayed: still needs an operator.
    pub fn is_pending(&self) -> bool {
        self.replay.as_ref().is_none_or(|r| r.replayed_at.is_none())
    }

    /// Since when it has been waiting: the DLQ message time, else its first failure.
    pub fn waiting_since(&self) -> Option<DateTime<Utc>> {
        self.dead_lettered_at.or_else(|| {
            self.envelope
                .as_ref()
                .ok()
                .and_then(|d| d.first_failed_at.as_deref())
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.with_timezone(&Utc))
        })
    }

    /// Why this dead letter cannot be replayed, if it cannot.
    pub fn not_replayable(&self) -> Option<String> {
        match &self.envelope {
            Err(e) => Some(e.clone()),
            Ok(d) if d.original_topic.as_deref().is_none_or(str::is_empty) => Some(
                "it has no original Kafka topic (an outbox entry: re-create the event instead)"
                    .to_owned(),
            ),
            Ok(d) => {
                let parts = [d.key_base64.as_deref(), d.payload_base64.as_deref()]
                    .into_iter()
                    .flatten()
                    .chain(d.headers.iter().filter_map(|h| h.value_base64.as_deref()));
                for part in parts {
                    if let Err(e) = STANDARD.decode(part) {
                        return Some(format!("its envelope holds invalid base64: {e}"));
                    }
                }
                None
            }
        }
    }

    /// Drops the key, headers and payload (kept out of scans that only count).
    fn strip_bytes(&mut self) {
        if let Ok(d) = self.envelope.as_mut() {
            d.key_base64 = None;
            d.headers.clear();
            d.payload_base64 = None;
            d.fields = None;
        }
    }
}

/// Which dead letters a list or count covers (empty: any).
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub original_topic: String,
    pub consumer: String,
    pub include_replayed: bool,
}

impl Filter {
    pub fn matches(&self, d: &StoredDeadLetter) -> bool {
        (self.original_topic.is_empty() || d.original_topic() == Some(&self.original_topic))
            && (self.consumer.is_empty() || d.consumer() == Some(&self.consumer))
            && (self.include_replayed || d.is_pending())
    }
}

/// Totals of a read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    pub total: u64,
    pub pending: u64,
    /// When the oldest pending one entered the DLQ.
    pub oldest_pending: Option<DateTime<Utc>>,
}

impl Summary {
    /// Over `letters` (whatever the filter's `include_replayed`, pending are counted
    /// apart).
    pub fn of<'a>(letters: impl IntoIterator<Item = &'a StoredDeadLetter>) -> Self {
        let mut s = Self::default();
        for d in letters {
            s.total += 1;
            if d.is_pending() {
                s.pending += 1;
                if let Some(at) = d.waiting_since() {
                    s.oldest_pending = Some(s.oldest_pending.map_or(at, |o| o.min(at)));
                }
            }
        }
        s
    }

    /// Seconds the oldest pending dead letter has waited at `now` (0 when none).
    pub fn oldest_pending_age(&self, now: DateTime<Utc>) -> f64 {
        self.oldest_pending
            .map(|at| ((now - at).num_milliseconds().max(0) as f64) / 1000.0)
            .unwrap_or(0.0)
    }
}

/// What one replay did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayOutcome {
    /// Published now; the record says where.
    Replayed(ReplayRecord),
    /// Refused: it was replayed before (when, by whom).
    AlreadyReplayed(ReplayRecord),
    /// Refused: another replay holds the claim (in flight, or died less than the
    /// claim timeout ago).
    InProgress(ReplayRecord),
    /// No such message in the DLQ topic.
    NotFound,
    /// Refused: see [`StoredDeadLetter::not_replayable`].
    NotReplayable(String),
    /// Nothing was recorded (or, when said, the publish happened but the record did not).
    Failed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error("invalid dead-letter id {0:?}: expected <partition>:<offset>")]
    InvalidId(String),
    #[error("reading the dead-letter topic: {0}")]
    Kafka(String),
    #[error("reading the dead-letter topic {topic} did not finish within {timeout:?} ({read} messages read, partitions {left:?} not at their end){last_error}")]
    ReadTimeout {
        topic: String,
        timeout: Duration,
        read: usize,
        left: Vec<i32>,
        last_error: String,
    },
    #[error("the dead-letter topic {0} does not exist")]
    NoTopic(String),
    #[error("database: {0}")]
    Database(String),
}

impl From<KafkaError> for DlqError {
    fn from(e: KafkaError) -> Self {
        Self::Kafka(e.to_string())
    }
}

impl From<diesel::result::Error> for DlqError {
    fn from(e: diesel::result::Error) -> Self {
        Self::Database(e.to_string())
    }
}

/// Bounds of reads and replays.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A read of the whole topic (or one produce) must finish within this.
    pub read_timeout: Duration,
    /// A claim older than this whose replay never finished may be taken over.
    pub claim_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            read_timeout: Duration::from_secs(30),
            claim_timeout: Duration::from_secs(120),
        }
    }
}

/// Reads and replays the dead letters of one DLQ topic.
pub struct DlqAdmin {
    kafka: KafkaConfig,
    topic: String,
    pool: Pool,
    /// Created at the first replay: a process that never replays opens no producer.
    producer: std::sync::Mutex<Option<FutureProducer>>,
    limits: Limits,
}

impl DlqAdmin {
    /// The reader/replayer of `kafka.dlqTopic`. Connects lazily: a broker that is
    /// down fails the calls, not the construction.
    pub fn new(kafka: &KafkaConfig, pool: Pool, limits: Limits) -> Self {
        Self {
            kafka: kafka.clone(),
            topic: kafka.dlq_topic.clone(),
            pool,
            producer: std::sync::Mutex::new(None),
            limits,
        }
    }

    fn producer(&self) -> Result<FutureProducer, String> {
        let mut slot = self
            .producer
            .lock()
            .map_err(|_| "the replay producer's lock is poisoned".to_owned())?;
        if let Some(p) = slot.as_ref() {
            return Ok(p.clone());
        }
        let mut pc = producer_config(&self.kafka);
        // A delivery report within a bound: the operator waits for the answer (the
        // shared producer setting waits forever, right for the relay, not here).
        pc.set(
            "message.timeout.ms",
            self.limits.read_timeout.as_millis().max(1000).to_string(),
        );
        let p: FutureProducer = pc
            .create()
            .map_err(|e| format!("creating the Kafka producer: {e}"))?;
        *slot = Some(p.clone());
        Ok(p)
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The topics a replay may publish to: the deployment's metering, decisions,
    /// lifecycle and policy-change topics (what its consumers read and so
    /// dead-letter); not the DLQ topic (a replay there would only dead-letter the
    /// message again).
    pub fn replay_targets(&self) -> [&str; 4] {
        [
            &self.kafka.metering_topic,
            &self.kafka.decisions_topic,
            &self.kafka.lifecycle_topic,
            &self.kafka.policy_changes_topic,
        ]
    }

    /// Why `d` cannot be replayed, if it cannot: [`StoredDeadLetter::not_replayable`],
    /// or an original topic that is not one of [`Self::replay_targets`].
    pub fn replay_refusal(&self, d: &StoredDeadLetter) -> Option<String> {
        d.not_replayable()
            .or_else(|| self.foreign_topic(d.original_topic().unwrap_or_default()))
    }

    /// The refusal of a replay to `topic`, unless it is one of ours.
    fn foreign_topic(&self, topic: &str) -> Option<String> {
        let targets = self.replay_targets();
        if targets.contains(&topic) && topic != self.topic {
            return None;
        }
        Some(format!(
            "its original topic {topic:?} is not one a replay may publish to ({}): refused, nothing published",
            targets.join(", ")
        ))
    }

    /// Every dead letter now in the topic, in id order, with its replay.
    /// `with_bytes: false` leaves out keys, headers and payloads (for counting).
    pub async fn read(&self, with_bytes: bool) -> Result<Vec<StoredDeadLetter>, DlqError> {
        let kafka = self.kafka.clone();
        let topic = self.topic.clone();
        let timeout = self.limits.read_timeout;
        let (mut letters, lows) = tokio::task::spawn_blocking(move || {
            read_topic(&kafka, &topic, timeout, None, with_bytes)
        })
        .await
        .map_err(|e| DlqError::Kafka(format!("reader task: {e}")))??;
        self.attach_replays(&mut letters, &lows).await?;
        Ok(letters)
    }

    /// One dead letter (with its bytes), or `None` when the topic has no such message.
    pub async fn get(&self, id: DeadLetterId) -> Result<Option<StoredDeadLetter>, DlqError> {
        let kafka = self.kafka.clone();
        let topic = self.topic.clone();
        let timeout = self.limits.read_timeout;
        let (mut letters, _) = tokio::task::spawn_blocking(move || {
            read_topic(&kafka, &topic, timeout, Some(id), true)
        })
        .await
        .map_err(|e| DlqError::Kafka(format!("reader task: {e}")))??;
        letters.retain(|d| d.id == id);
        self.attach_replays(&mut letters, &[(id.partition, id.offset)])
            .await?;
        Ok(letters.pop())
    }

    async fn attach_replays(
        &self,
        letters: &mut [StoredDeadLetter],
        lows: &[(i32, i64)],
    ) -> Result<(), DlqError> {
        if letters.is_empty() {
            return Ok(());
        }
        let mut conn = self
            .pool
            .get()
            .await
            .map_err(|e| DlqError::Database(e.to_string()))?;
        let rows: Vec<ReplayRow> = diesel::sql_query(
            "SELECT r.dlq_partition, r.dlq_offset, r.actor, r.claimed_at, r.replayed_at, \
                    r.target_topic, r.target_partition, r.target_offset \
             FROM dlq_replays r \
             JOIN unnest($2::int4[], $3::int8[]) AS w(p, lo) \
               ON r.dlq_partition = w.p AND r.dlq_offset >= w.lo \
             WHERE r.dlq_topic = $1",
        )
        .bind::<Text, _>(&self.topic)
        .bind::<Array<Integer>, _>(lows.iter().map(|l| l.0).collect::<Vec<_>>())
        .bind::<Array<BigInt>, _>(lows.iter().map(|l| l.1).collect::<Vec<_>>())
        .load(&mut conn)
        .await?;
        let mut by_id: HashMap<DeadLetterId, ReplayRecord> = rows
            .into_iter()
            .map(|r| {
                (
                    DeadLetterId {
                        partition: r.dlq_partition,
                        offset: r.dlq_offset,
                    },
                    r.record(),
                )
            })
            .collect();
        for d in letters.iter_mut() {
            d.replay = by_id.remove(&d.id);
        }
        Ok(())
    }

    /// Replays `letters` (read with their bytes) as `actor`, each at most once ever;
    /// one outcome per letter, in order. At most [`MAX_REPLAY`] per call (the rest:
    /// `Failed`).
    pub async fn replay(&self, letters: &[StoredDeadLetter], actor: &str) -> Vec<ReplayOutcome> {
        // Phase 1: claim. Phase 2: publish them all, then wait for each delivery
        // report. Phase 3: mark each one delivered. A refusal or failure of one does
        // not stop the others.
        let mut outcomes: Vec<Option<ReplayOutcome>> = vec![None; letters.len()];
        let mut claimed: Vec<(usize, uuid::Uuid)> = Vec::new();
        for (i, d) in letters.iter().enumerate() {
            if i >= MAX_REPLAY {
                outcomes[i] = Some(ReplayOutcome::Failed(format!(
                    "more than {MAX_REPLAY} dead letters in one call; replay the rest in another"
                )));
                continue;
            }
            if let Some(reason) = self.replay_refusal(d) {
                outcomes[i] = Some(ReplayOutcome::NotReplayable(reason));
                continue;
            }
            match self.claim(d, actor).await {
                Ok(Ok(claim)) => claimed.push((i, claim)),
                Ok(Err(refusal)) => outcomes[i] = Some(refusal),
                Err(e) => outcomes[i] = Some(ReplayOutcome::Failed(e.to_string())),
            }
        }

        let mut sent = Vec::with_capacity(claimed.len());
        for (i, claim) in claimed {
            let d = &letters[i];
            match self.publish(d) {
                Ok(delivery) => sent.push((i, claim, delivery)),
                Err(error) => outcomes[i] = Some(self.release(d, claim, error).await),
            }
        }
        for (i, claim, delivery) in sent {
            let d = &letters[i];
            let delivered = match delivery.await {
                Ok(Ok(delivery)) => Ok((delivery.partition, delivery.offset)),
                Ok(Err((e, _))) => Err(format!("publishing failed: {e}")),
                Err(_) => Err("publishing was canceled".to_owned()),
            };
            outcomes[i] = Some(match delivered {
                Ok(at) => self.mark(d, claim, actor, at).await,
                Err(error) => self.release(d, claim, error).await,
            });
        }
        outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| ReplayOutcome::Failed("not attempted".to_owned())))
            .collect()
    }

    /// Takes the replay of `d` for this call. `Ok(Err(outcome))`: refused (already
    /// replayed, or someone else's claim is live).
    async fn claim(
        &self,
        d: &StoredDeadLetter,
        actor: &str,
    ) -> Result<Result<uuid::Uuid, ReplayOutcome>, DlqError> {
        let target = d.original_topic().unwrap_or_default();
        let claim = uuid::Uuid::new_v4();
        let mut conn = self
            .pool
            .get()
            .await
            .map_err(|e| DlqError::Database(e.to_string()))?;
        let inserted = diesel::sql_query(
            "INSERT INTO dlq_replays (dlq_topic, dlq_partition, dlq_offset, actor, claim_id, target_topic) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
        )
        .bind::<Text, _>(&self.topic)
        .bind::<Integer, _>(d.id.partition)
        .bind::<BigInt, _>(d.id.offset)
        .bind::<Text, _>(actor)
        .bind::<diesel::sql_types::Uuid, _>(claim)
        .bind::<Text, _>(target)
        .execute(&mut conn)
        .await?;
        if inserted == 1 {
            return Ok(Ok(claim));
        }
        // A claim exists. A stale one (its replay died between claim and mark) is
        // taken over; see `mark` for why publishing again is safe.
        let taken = diesel::sql_query(
            "UPDATE dlq_replays SET actor = $4, claim_id = $5, claimed_at = now() \
             WHERE dlq_topic = $1 AND dlq_partition = $2 AND dlq_offset = $3 \
               AND replayed_at IS NULL AND claimed_at < now() - make_interval(secs => $6)",
        )
        .bind::<Text, _>(&self.topic)
        .bind::<Integer, _>(d.id.partition)
        .bind::<BigInt, _>(d.id.offset)
        .bind::<Text, _>(actor)
        .bind::<diesel::sql_types::Uuid, _>(claim)
        .bind::<diesel::sql_types::Double, _>(self.limits.claim_timeout.as_secs_f64())
        .execute(&mut conn)
        .await?;
        if taken == 1 {
            tracing::warn!(id = %d.id, "taking over an interrupted replay claim; the message may be published twice (consumers ignore the duplicate)");
            return Ok(Ok(claim));
        }
        let row: ReplayRow = diesel::sql_query(
            "SELECT dlq_partition, dlq_offset, actor, claimed_at, replayed_at, target_topic, \
                    target_partition, target_offset \
             FROM dlq_replays WHERE dlq_topic = $1 AND dlq_partition = $2 AND dlq_offset = $3",
        )
        .bind::<Text, _>(&self.topic)
        .bind::<Integer, _>(d.id.partition)
        .bind::<BigInt, _>(d.id.offset)
        .get_result(&mut conn)
        .await?;
        let record = row.record();
        Ok(Err(if record.replayed_at.is_some() {
            ReplayOutcome::AlreadyReplayed(record)
        } else {
            ReplayOutcome::InProgress(record)
        }))
    }

    /// Queues the original message for its original topic and partition.
    fn publish(&self, d: &StoredDeadLetter) -> Result<rdkafka::producer::DeliveryFuture, String> {
        let Ok(letter) = &d.envelope else {
            return Err("not a dead-letter envelope".to_owned());
        };
        let bytes = |b64: Option<&str>| -> Result<Option<Vec<u8>>, String> {
            b64.map(|b| STANDARD.decode(b).map_err(|e| e.to_string()))
                .transpose()
        };
        let topic = letter.original_topic.as_deref().unwrap_or_default();
        // Checked before the claim too; here so that no path publishes elsewhere.
        if let Some(refusal) = self.foreign_topic(topic) {
            return Err(refusal);
        }
        let key = bytes(letter.key_base64.as_deref())?;
        let payload = bytes(letter.payload_base64.as_deref())?;
        let id = d.id.to_string();
        let mut headers = OwnedHeaders::new_with_capacity(letter.headers.len() + 1);
        for h in &letter.headers {
            let value = bytes(h.value_base64.as_deref())?;
            headers = headers.insert(Header {
                key: &h.key,
                value: value.as_deref(),
            });
        }
        headers = headers.insert(Header {
            key: REPLAY_HEADER,
            value: Some(id.as_str()),
        });
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(headers);
        if let Some(k) = key.as_deref() {
            record = record.key(k);
        }
        if let Some(p) = payload.as_deref() {
            record = record.payload(p);
        }
        // The original partition keeps the key's order and place; without one, the
        // partitioner picks by key.
        if let Some(p) = letter.original_partition {
            record = record.partition(p);
        }
        self.producer()?
            .send_result(record)
            .map_err(|(e, _)| format!("publishing failed: {e}"))
    }

    /// Records the delivered replay.
    ///
    /// If the process dies after the broker acknowledged the message and before this
    /// update, the claim stays with `replayed_at` NULL: the dead letter still counts
    /// as pending, and after `claim_timeout` a later replay takes the claim over and
    /// publishes it again. The original topic then holds the event twice; that is
    /// safe because every consumer is idempotent on the event id (the ledger's key,
    /// the audit log's topic/partition/offset dedupe records both copies as what they
    /// are), so the event still takes effect once. Marking before publishing would be
    /// worse: a crash in between would record a replay that never happened.
    async fn mark(
        &self,
        d: &StoredDeadLetter,
        claim: uuid::Uuid,
        actor: &str,
        (partition, offset): (i32, i64),
    ) -> ReplayOutcome {
        let target_topic = d.original_topic().unwrap_or_default().to_owned();
        let result: Result<Vec<MarkedAt>, DlqError> = async {
            let mut conn = self
                .pool
                .get()
                .await
                .map_err(|e| DlqError::Database(e.to_string()))?;
            Ok(diesel::sql_query(
                "UPDATE dlq_replays SET replayed_at = now(), target_partition = $5, target_offset = $6 \
                 WHERE dlq_topic = $1 AND dlq_partition = $2 AND dlq_offset = $3 AND claim_id = $4 \
                 RETURNING claimed_at, replayed_at",
            )
            .bind::<Text, _>(&self.topic)
            .bind::<Integer, _>(d.id.partition)
            .bind::<BigInt, _>(d.id.offset)
            .bind::<diesel::sql_types::Uuid, _>(claim)
            .bind::<Integer, _>(partition)
            .bind::<BigInt, _>(offset)
            .load(&mut conn)
            .await?)
        }
        .await;
        match result {
            Ok(rows) => match rows.into_iter().next() {
                Some(m) => {
                    tracing::info!(id = %d.id, %actor, topic = %target_topic, partition, offset, "dead letter replayed");
                    ReplayOutcome::Replayed(ReplayRecord {
                        actor: actor.to_owned(),
                        claimed_at: m.claimed_at,
                        replayed_at: m.replayed_at,
                        target_topic,
                        target_partition: Some(partition),
                        target_offset: Some(offset),
                    })
                }
                None => ReplayOutcome::Failed(format!(
                    "published to {target_topic} at {partition}:{offset}, but the claim was taken over meanwhile; the other replay records it"
                )),
            },
            Err(e) => {
                tracing::warn!(id = %d.id, error = %e, "replay published but not recorded");
                ReplayOutcome::Failed(format!(
                    "published to {target_topic} at {partition}:{offset}, but recording the replay failed ({e}); a later replay may publish it again, which consumers ignore"
                ))
            }
        }
    }

    /// Gives the claim back after a publish that did not happen (or whose outcome
    /// is unknown: a retry may then publish twice, which consumers ignore).
    async fn release(
        &self,
        d: &StoredDeadLetter,
        claim: uuid::Uuid,
        error: String,
    ) -> ReplayOutcome {
        let released: Result<usize, DlqError> = async {
            let mut conn = self
                .pool
                .get()
                .await
                .map_err(|e| DlqError::Database(e.to_string()))?;
            Ok(diesel::sql_query(
                "DELETE FROM dlq_replays WHERE dlq_topic = $1 AND dlq_partition = $2 \
                 AND dlq_offset = $3 AND claim_id = $4 AND replayed_at IS NULL",
            )
            .bind::<Text, _>(&self.topic)
            .bind::<Integer, _>(d.id.partition)
            .bind::<BigInt, _>(d.id.offset)
            .bind::<diesel::sql_types::Uuid, _>(claim)
            .execute(&mut conn)
            .await?)
        }
        .await;
        match released {
            Ok(_) => ReplayOutcome::Failed(error),
            Err(e) => ReplayOutcome::Failed(format!(
                "{error}; releasing the claim failed too ({e}): it can be retried after the claim timeout"
            )),
        }
    }
}

#[derive(diesel::QueryableByName)]
struct ReplayRow {
    #[diesel(sql_type = Integer)]
    dlq_partition: i32,
    #[diesel(sql_type = BigInt)]
    dlq_offset: i64,
    #[diesel(sql_type = Text)]
    actor: String,
    #[diesel(sql_type = Timestamptz)]
    claimed_at: DateTime<Utc>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    replayed_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = Text)]
    target_topic: String,
    #[diesel(sql_type = Nullable<Integer>)]
    target_partition: Option<i32>,
    #[diesel(sql_type = Nullable<BigInt>)]
    target_offset: Option<i64>,
}

impl ReplayRow {
    fn record(self) -> ReplayRecord {
        ReplayRecord {
            actor: self.actor,
            claimed_at: self.claimed_at,
            replayed_at: self.replayed_at,
            target_topic: self.target_topic,
            target_partition: self.target_partition,
            target_offset: self.target_offset,
        }
    }
}

#[derive(diesel::QueryableByName)]
struct MarkedAt {
    #[diesel(sql_type = Timestamptz)]
    claimed_at: DateTime<Utc>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    replayed_at: Option<DateTime<Utc>>,
}

/// What [`read_topic`] found: the messages, and each read partition's low watermark.
type TopicRead = (Vec<StoredDeadLetter>, Vec<(i32, i64)>);

/// Reads the DLQ topic (blocking): every partition from its low watermark to the
/// high watermark seen at the start, or, with `only`, the one message at that id.
/// Returns the messages in id order and each read partition's low watermark.
fn read_topic(
    kafka: &KafkaConfig,
    topic: &str,
    timeout: Duration,
    only: Option<DeadLetterId>,
    with_bytes: bool,
) -> Result<TopicRead, DlqError> {
    let deadline = std::time::Instant::now() + timeout;
    let left = || deadline.saturating_duration_since(std::time::Instant::now());
    let mut cc = client_config(kafka);
    // A group id is required by the client; with assign() and no commits the
    // reader never joins the group nor moves its offsets.
    cc.set("group.id", "caracal-dlq-reader")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "true")
        .set("fetch.wait.max.ms", "100");
    let consumer: BaseConsumer = cc.create()?;
    let metadata = consumer.fetch_metadata(Some(topic), left())?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .filter(|p| only.is_none_or(|id| id.partition == *p))
        .collect();
    if partitions.is_empty() && only.is_none() {
        return Err(DlqError::NoTopic(topic.to_owned()));
    }
    // Per partition: where to start, and the high watermark to stop before.
    let mut ranges: HashMap<i32, (i64, i64)> = HashMap::new();
    let mut lows = Vec::with_capacity(partitions.len());
    for p in partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, left())?;
        lows.push((p, low));
        let (start, end) = match only {
            Some(id) if id.offset < low || id.offset >= high => continue,
            Some(id) => (id.offset, id.offset + 1),
            None => (low, high),
        };
        if end > start {
            ranges.insert(p, (start, end));
        }
    }
    let mut letters = Vec::new();
    if ranges.is_empty() {
        return Ok((letters, lows));
    }
    let mut tpl = TopicPartitionList::with_capacity(ranges.len());
    for (p, (start, _)) in &ranges {
        tpl.add_partition_offset(topic, *p, Offset::Offset(*start))?;
    }
    consumer.assign(&tpl)?;
    let mut last_error = String::new();
    while !ranges.is_empty() {
        if left().is_zero() {
            let mut left: Vec<i32> = ranges.keys().copied().collect();
            left.sort_unstable();
            return Err(DlqError::ReadTimeout {
                topic: topic.to_owned(),
                timeout,
                read: letters.len(),
                left,
                last_error: if last_error.is_empty() {
                    String::new()
                } else {
                    format!("; last error: {last_error}")
                },
            });
        }
        match consumer.poll(POLL.min(left())) {
            None => {}
            // At the end of the partition: nothing more below the high watermark.
            Some(Err(KafkaError::PartitionEOF(p))) => {
                ranges.remove(&p);
            }
            Some(Err(e)) => last_error = e.to_string(),
            Some(Ok(m)) => {
                let p = m.partition();
                let Some(&(_, end)) = ranges.get(&p) else {
                    continue;
                };
                if m.offset() < end {
                    let mut d = StoredDeadLetter::from_message(
                        p,
                        m.offset(),
                        m.timestamp().to_millis(),
                        m.payload().unwrap_or_default(),
                    );
                    if !with_bytes {
                        d.strip_bytes();
                    }
                    letters.push(d);
                }
                if m.offset() >= end - 1 {
                    ranges.remove(&p);
                }
            }
        }
    }
    letters.sort_by_key(|d| d.id);
    letters.dedup_by_key(|d| d.id);
    Ok((letters, lows))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(error: &str) -> DeadLetter {
        DeadLetter::from_kafka(
            "caracal.metering.events",
            1,
            9,
            Some(b"k"),
            &[("h".to_owned(), Some(b"v".to_vec()))],
            Some(b"payload"),
            error.to_owned(),
            0,
            "caracal-ledger-writer",
            Utc::now(),
        )
    }

    fn stored(offset: i64, ts_ms: i64, d: &DeadLetter) -> StoredDeadLetter {
        StoredDeadLetter::from_message(0, offset, Some(ts_ms), &d.to_json())
    }

    #[test]
    fn ids_round_trip_and_bad_ones_are_named() {
        let id: DeadLetterId = "2:17".parse().unwrap();
        assert_eq!(
            id,
            DeadLetterId {
                partition: 2,
                offset: 17
            }
        );
        assert_eq!(id.to_string(), "2:17");
        for bad in ["", "2", "a:1", "1:b", "-1:3", "1:-3", "1:2:3"] {
            let err = bad.parse::<DeadLetterId>().unwrap_err().to_string();
            assert!(err.contains("<partition>:<offset>"), "{bad}: {err}");
        }
        let mut ids: Vec<DeadLetterId> = ["1:2", "0:10", "0:9"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        ids.sort();
        assert_eq!(
            ids.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["0:9", "0:10", "1:2"]
        );
    }

    #[test]
    fn pending_filter_and_summary() {
        let a = stored(0, 1_700_000_000_000, &letter("a"));
        let mut b = stored(1, 1_700_000_010_000, &letter("b"));
        b.replay = Some(ReplayRecord {
            actor: "admin-token".into(),
            claimed_at: Utc::now(),
            replayed_at: Some(Utc::now()),
            target_topic: "caracal.metering.events".into(),
            target_partition: Some(1),
            target_offset: Some(50),
        });
        let mut c = stored(2, 1_700_000_020_000, &letter("c"));
        // A claim that never finished still counts as pending.
        c.replay = Some(ReplayRecord {
            replayed_at: None,
            target_partition: None,
            target_offset: None,
            ..b.replay.clone().unwrap()
        });
        let junk = StoredDeadLetter::from_message(0, 3, Some(1_699_000_000_000), b"{not json");
        let all = [a, b, c, junk];
        let s = Summary::of(&all);
        assert_eq!((s.total, s.pending), (4, 3));
        assert_eq!(
            s.oldest_pending.unwrap().timestamp_millis(),
            1_699_000_000_000
        );
        let now = DateTime::from_timestamp(1_699_000_100, 500_000_000).unwrap();
        assert_eq!(s.oldest_pending_age(now), 100.5);
        assert_eq!(Summary::default().oldest_pending_age(now), 0.0);

        let f = Filter {
            original_topic: "caracal.metering.events".into(),
            ..Filter::default()
        };
        let ids: Vec<String> = all
            .iter()
            .filter(|d| f.matches(d))
            .map(|d| d.id.to_string())
            .collect();
        assert_eq!(ids, ["0:0", "0:2"]);
        let f = Filter {
            include_replayed: true,
            consumer: "caracal-ledger-writer".into(),
            ..Filter::default()
        };
        assert_eq!(all.iter().filter(|d| f.matches(d)).count(), 3);
        let f = Filter {
            consumer: "other".into(),
            ..Filter::default()
        };
        assert_eq!(all.iter().filter(|d| f.matches(d)).count(), 0);
    }

    #[test]
    fn what_cannot_be_replayed_says_why() {
        assert!(stored(0, 0, &letter("x")).not_replayable().is_none());
        let junk = StoredDeadLetter::from_message(0, 1, None, b"\xff");
        assert!(junk
            .not_replayable()
            .unwrap()
            .contains("not a dead-letter envelope"));
        let outbox =
            DeadLetter::from_outbox("s", "1-0", &Default::default(), "bad", "outbox-relay");
        assert!(stored(2, 0, &outbox)
            .not_replayable()
            .unwrap()
            .contains("no original Kafka topic"));
        let mut broken = letter("x");
        broken.payload_base64 = Some("***".into());
        assert!(stored(3, 0, &broken)
            .not_replayable()
            .unwrap()
            .contains("base64"));
        let mut stripped = stored(4, 0, &letter("x"));
        stripped.strip_bytes();
        assert_eq!(stripped.payload_size, 7, "len(b\"payload\")");
        let d = stripped.envelope.as_ref().unwrap();
        assert!(d.payload_base64.is_none() && d.key_base64.is_none() && d.headers.is_empty());
        assert_eq!(d.error, "x");
    }
}
