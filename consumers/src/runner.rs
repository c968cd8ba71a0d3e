//! The consumer loop every consumer shares.
//!
//! - One poll gathers a batch (up to `batchSize` messages, waiting at most
//!   `batchWaitMs` after the first). Messages of a partition arrive in offset order
//!   and the batch is handled as a whole, so per-partition order is kept.
//! - Each message is decoded and validated by the [`Handler`]; one that fails is
//!   poison: it goes to the dead-letter topic (the shared
//!   [`caracal_service_kit::dlq::DeadLetter`] envelope) and the consumer moves on.
//! - The good ones are written by the handler in one transaction. A failure (the
//!   database is down) is retried with capped exponential backoff, indefinitely:
//!   after `maxRetries` attempts the consumer reports not ready, but it never skips
//!   a batch and never commits past it. Only when the store answers and still
//!   refuses the batch after `maxRetries` attempts are the items written one by
//!   one, and those it refuses go to the dead-letter topic with their retry count.
//! - Only once the batch is durable (and its dead letters acknowledged by Kafka)
//!   are its offsets committed, synchronously, with an explicit partition list.
//!   A crash before the commit replays the batch; the handler's writes are
//!   idempotent (event ids), so a replay is a no-op.
//! - On shutdown polling stops, the batch in hand is finished and committed
//!   (within `shutdownGrace`), and the consumer leaves its group.

use std::{
    collections::{BTreeMap, VecDeque},
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, PoisonError,
    },
    task::Poll,
    time::{Duration, Instant},
};

use caracal_service_kit::process::LogLimit;
use caracal_service_kit::telemetry;
use caracal_service_kit::{
    dlq::DeadLetter,
    kafka::{consumer_config, producer_config},
};
use rdkafka::{
    consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer},
    message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
    ClientContext, Offset, TopicPartitionList,
};
use tokio::{
    sync::{watch, Notify},
    task::JoinHandle,
};

use crate::{
    config::{Assignment, ConsumerConfig},
    health::HealthState,
    lease::{Leases, PartitionState, TopicPartition},
    metrics as m,
};

/// The consumer spans of the messages of `batch` that carry a `traceparent`
/// (none when tracing is off).
fn traced_writes(consumer: &'static str, batch: &[RawMessage]) -> Vec<tracing::Span> {
    if !telemetry::enabled() {
        return Vec::new();
    }
    let batch_size = batch.len().to_string();
    batch
        .iter()
        .filter_map(|msg| {
            let parent = std::str::from_utf8(msg.header(telemetry::TRACEPARENT)?).ok()?;
            let span = telemetry::span(consumer, telemetry::Kind::Consumer, Some(parent));
            telemetry::attribute(&span, "messaging.destination.name", msg.topic.clone());
            telemetry::attribute(&span, "messaging.kafka.offset", msg.offset.to_string());
            telemetry::attribute(&span, "messaging.batch.message_count", batch_size.clone());
            if let Some(id) = msg
                .header("event_id")
                .and_then(|v| std::str::from_utf8(v).ok())
            {
                telemetry::attribute(&span, "caracal.event_id", id.to_owned());
            }
            Some(span)
        })
        .collect()
}

/// Pause after a failed poll.
const POLL_ERROR_PAUSE: Duration = Duration::from_millis(200);

/// A consumed message, owned (the batch outlives the poll that read it).
#[derive(Debug, Clone)]
pub struct RawMessage {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    /// The message timestamp (create or log-append time), Unix ms, when it has one.
    pub timestamp_ms: Option<i64>,
}

impl RawMessage {
    pub fn from_borrowed(msg: &BorrowedMessage<'_>) -> Self {
        Self::from_message(msg)
    }

    /// From any message (one read by the consumer loop, or one detached from it).
    pub fn from_message<M: Message>(msg: &M) -> Self {
        let headers = msg
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                    .collect()
            })
            .unwrap_or_default();
        Self {
            topic: msg.topic().to_owned(),
            partition: msg.partition(),
            offset: msg.offset(),
            key: msg.key().map(<[u8]>::to_vec),
            payload: msg.payload().map(<[u8]>::to_vec),
            headers,
            timestamp_ms: msg.timestamp().to_millis(),
        }
    }

    /// The first header named `name` that has a value.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, v)| k == name && v.is_some())
            .and_then(|(_, v)| v.as_deref())
    }
}

/// Why a store refused a write: decides whether its items may ever become dead
/// letters (issue 22 item 3: a database that answers but refuses every write, a
/// read-only failover target or a full disk, must not empty the ledger into the
/// dead-letter topic).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The item itself (a constraint it breaks): after `maxRetries`, the items are
    /// written one by one and those refused this way are dead letters.
    Item,
    /// The store's state (down, read-only, out of space, permissions, overloaded):
    /// retried for as long as it lasts, never a dead letter.
    Store,
    /// Not known: an item refused while the store answers a ping is a dead letter
    /// (the metrics-aggregator's Redis scripts).
    Unknown,
}

/// A failed [`Handler::write`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct WriteError {
    pub message: String,
    pub fault: Fault,
}

impl WriteError {
    pub fn store(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            fault: Fault::Store,
        }
    }
}

impl From<String> for WriteError {
    fn from(message: String) -> Self {
        Self {
            message,
            fault: Fault::Unknown,
        }
    }
}

/// What a consumer does with its messages.
pub trait Handler: Send + Sync + 'static {
    /// A decoded, validated message.
    type Item: Send + Sync;

    /// The `consumer` label of metrics and logs (`ledger-writer`).
    fn name(&self) -> &'static str;

    /// Decodes and validates one message; the error (the reason) makes it poison.
    fn decode(&self, msg: &RawMessage) -> Result<Self::Item, String>;

    /// Writes a batch durably, in one transaction, idempotently (a replay of the
    /// same items changes nothing). An error is retried; its [`Fault`] decides
    /// whether an item can end as a dead letter.
    fn write(&self, items: &[Self::Item]) -> impl Future<Output = Result<(), WriteError>> + Send;

    /// Whether the store answers at all (a failed write while it answers means
    /// the items are refused, not that the store is down).
    fn reachable(&self) -> impl Future<Output = bool> + Send;

    /// How many batches may be written at the same time (each in its own
    /// [`Handler::write`]); their offsets are still committed batch by batch, in
    /// order, each only once it and every batch before it are durable. 1: one
    /// batch at a time.
    fn in_flight(&self) -> usize {
        1
    }
}

/// What the runner tells the lease task and the lag sampler: batches in flight,
/// commits made, and per partition the offset committed last (and when) and the
/// end offset last sampled.
#[derive(Default)]
pub struct Progress {
    in_flight: AtomicUsize,
    commits: AtomicU64,
    committed_now: Notify,
    partitions: Mutex<BTreeMap<TopicPartition, PartitionState>>,
}

impl Progress {
    fn set_in_flight(&self, n: usize) {
        self.in_flight.store(n, Ordering::SeqCst);
        if n == 0 {
            self.committed_now.notify_waiters();
        }
    }

    fn committed(&self, offsets: &[(TopicPartition, i64)]) {
        let now = chrono::Utc::now();
        {
            let mut parts = self
                .partitions
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for (tp, offset) in offsets {
                let state = parts.entry(tp.clone()).or_default();
                state.committed = Some(*offset);
                state.committed_at = Some(now);
            }
        }
        self.commits.fetch_add(1, Ordering::SeqCst);
        self.committed_now.notify_waiters();
    }

    /// Records a partition's high watermark and the group's committed offset (the
    /// lag sampler's).
    pub fn sampled(&self, tp: &TopicPartition, group_committed: Option<i64>, end: i64) {
        let mut parts = self
            .partitions
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let state = parts.entry(tp.clone()).or_default();
        state.end = Some(end);
        state.group_committed = group_committed;
    }

    /// What this replica knows of `tp`.
    pub fn state(&self, tp: &TopicPartition) -> Option<PartitionState> {
        let parts = self
            .partitions
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        parts.get(tp).cloned()
    }

    /// Waits until every batch in flight now (and the one being gathered) has
    /// committed, or none is in flight, or `timeout`. True: drained.
    pub async fn drained_after(&self, timeout: Duration) -> bool {
        let start = self.commits.load(Ordering::SeqCst);
        let need = self.in_flight.load(Ordering::SeqCst) as u64 + 1;
        let wait = async {
            loop {
                let notified = self.committed_now.notified();
                if self.in_flight.load(Ordering::SeqCst) == 0
                    || self.commits.load(Ordering::SeqCst) >= start + need
                {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }
}

/// Tracks the group assignment for readiness.
pub struct Ctx {
    health: Arc<HealthState>,
}

impl ClientContext for Ctx {}

impl ConsumerContext for Ctx {
    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                tracing::info!(partitions = tpl.count(), "partitions assigned");
                self.health.set_assigned(true);
            }
            Rebalance::Revoke(tpl) => {
                tracing::info!(partitions = tpl.count(), "partitions revoked");
                self.health.set_assigned(false);
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }
}

pub type KafkaConsumer = StreamConsumer<Ctx>;

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
}

/// Creates the consumer and the dead-letter producer. With `assignment: group` it
/// subscribes to `topics`; `static` assigns its share at once; `leases` assigns
/// nothing here (the lease task does, partition by partition).
pub fn connect(
    config: &ConsumerConfig,
    assignment: Assignment,
    group: &str,
    topics: &[&str],
    health: Arc<HealthState>,
) -> Result<(Arc<KafkaConsumer>, FutureProducer), RunnerError> {
    let kafka = &config.kafka;
    let mut cc = consumer_config(kafka, group);
    cc.set(
        "session.timeout.ms",
        config.consumer.session_timeout_ms.to_string(),
    )
    .set(
        "heartbeat.interval.ms",
        (config.consumer.session_timeout_ms / 3)
            .max(100)
            .to_string(),
    )
    .set(
        "max.poll.interval.ms",
        config.consumer.max_poll_interval_ms.to_string(),
    )
    .set("fetch.wait.max.ms", "100");
    if !config.consumer.group_instance_id.is_empty() {
        cc.set("group.instance.id", &config.consumer.group_instance_id);
    }
    let consumer: KafkaConsumer = cc.create_with_context(Ctx { health })?;
    match assignment {
        Assignment::Static => {
            let share = (
                config.consumer.assign_index,
                config.consumer.assign_replicas,
            );
            assign_all(&consumer, topics, share)?;
        }
        Assignment::Group => consumer.subscribe(topics)?,
        Assignment::Leases => {}
    }
    let producer: FutureProducer = producer_config(kafka).create()?;
    Ok((Arc::new(consumer), producer))
}

/// Takes every partition of `topics` that is this replica's share (`p % replicas ==
/// index`), each from the group's committed offset (`auto.offset.reset` when there
/// is none).
fn assign_all(
    consumer: &KafkaConsumer,
    topics: &[&str],
    (index, replicas): (u32, u32),
) -> Result<(), RunnerError> {
    let mut tpl = TopicPartitionList::new();
    for topic in topics {
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(30))?;
        for t in metadata.topics().iter().filter(|t| t.name() == *topic) {
            for p in t.partitions() {
                if u32::try_from(p.id()).is_ok_and(|id| id % replicas.max(1) == index) {
                    tpl.add_partition_offset(topic, p.id(), Offset::Stored)?;
                }
            }
        }
    }
    consumer.assign(&tpl)?;
    consumer.context().health.set_assigned(true);
    tracing::info!(partitions = tpl.count(), "partitions assigned (assignAll)");
    Ok(())
}

/// A gathered batch: its messages, each one's decoding (same index), and the
/// Kafka errors met while gathering.
struct Gathered<T> {
    batch: Vec<RawMessage>,
    decoded: Vec<Result<T, String>>,
    errors: Vec<String>,
}

/// See [`Runner::gather`]. A free function over owned handles, so it can run in a
/// task of its own while the previous batch is written; it decodes the batch
/// there too.
async fn gather<H: Handler>(
    consumer: Arc<KafkaConsumer>,
    handler: Arc<H>,
    batch_size: usize,
    batch_wait: Duration,
    shutdown: watch::Receiver<bool>,
) -> Gathered<H::Item> {
    let (batch, errors) = receive(consumer, batch_size, batch_wait, shutdown).await;
    let decoded = batch.iter().map(|msg| handler.decode(msg)).collect();
    Gathered {
        batch,
        decoded,
        errors,
    }
}

async fn receive(
    consumer: Arc<KafkaConsumer>,
    batch_size: usize,
    batch_wait: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> (Vec<RawMessage>, Vec<String>) {
    let mut batch = Vec::with_capacity(batch_size);
    let mut errors = Vec::new();
    loop {
        if *shutdown.borrow() {
            return (batch, errors);
        }
        let first = tokio::select! {
            changed = shutdown.changed() => {
                if changed.is_err() {
                    return (batch, errors);
                }
                continue;
            }
            msg = consumer.recv() => msg.map(|m| RawMessage::from_borrowed(&m)),
        };
        match first {
            Ok(msg) => {
                batch.push(msg);
                break;
            }
            Err(e) => {
                errors.push(e.to_string());
                tokio::time::sleep(POLL_ERROR_PAUSE).await;
                // Bounded: report now and then, even while the broker is away.
                if errors.len() >= 16 {
                    return (batch, errors);
                }
            }
        }
    }
    let deadline = tokio::time::Instant::now() + batch_wait;
    while batch.len() < batch_size && !*shutdown.borrow() {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(msg)) => batch.push(RawMessage::from_borrowed(&msg)),
            Ok(Err(e)) => {
                errors.push(e.to_string());
                break;
            }
            Err(_) => break,
        }
    }
    (batch, errors)
}

/// A message that goes to the dead-letter topic.
struct Poison<'a> {
    msg: &'a RawMessage,
    reason: String,
    /// Attempts made before giving up (0: decoding/validation, not retried).
    retries: u32,
    first_failed: chrono::DateTime<chrono::Utc>,
}

/// Whether a batch was finished.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Committed,
    /// Shutdown came while the batch could not be written: it stays uncommitted
    /// (and is read again by whoever takes the partition).
    Abandoned,
}

/// A batch whose write has ended.
struct Written {
    batch: Vec<RawMessage>,
    /// Items written (poison excluded).
    items: usize,
    started: Instant,
    outcome: Outcome,
}

/// A batch being written, or written and waiting for its turn to commit.
enum Slot<'a> {
    Writing(Pin<Box<dyn Future<Output = Written> + Send + 'a>>),
    Done(Written),
}

/// What [`next_event`] saw first.
enum Event<T> {
    /// The oldest batch in flight is written (offsets go in order).
    Written(Written),
    /// The next batch is gathered.
    Gathered(Result<Gathered<T>, tokio::task::JoinError>),
}

/// Drives every write in flight until the oldest has ended or (when given) the
/// gathering of the next batch has; `None` when there is nothing to wait for.
async fn next_event<T>(
    writing: &mut VecDeque<Slot<'_>>,
    mut gathering: Option<&mut JoinHandle<Gathered<T>>>,
) -> Option<Event<T>> {
    if writing.is_empty() && gathering.is_none() {
        return None;
    }
    std::future::poll_fn(|cx| {
        for slot in writing.iter_mut() {
            if let Slot::Writing(write) = slot {
                if let Poll::Ready(written) = write.as_mut().poll(cx) {
                    *slot = Slot::Done(written);
                }
            }
        }
        if matches!(writing.front(), Some(Slot::Done(_))) {
            if let Some(Slot::Done(written)) = writing.pop_front() {
                return Poll::Ready(Some(Event::Written(written)));
            }
        }
        if let Some(gathering) = gathering.as_mut() {
            if let Poll::Ready(joined) = Pin::new(&mut **gathering).poll(cx) {
                return Poll::Ready(Some(Event::Gathered(joined)));
            }
        }
        Poll::Pending
    })
    .await
}

/// Whether a rate-limited line may be logged now.
fn allow(limit: &Mutex<LogLimit>) -> bool {
    limit
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .allow()
        .is_some()
}

/// One consumer: its handler, Kafka clients and settings.
pub struct Runner<H: Handler> {
    handler: Arc<H>,
    consumer: Arc<KafkaConsumer>,
    producer: FutureProducer,
    group: String,
    dlq_topic: String,
    batch_size: usize,
    batch_wait: Duration,
    max_retries: u32,
    backoff_min: Duration,
    backoff_max: Duration,
    grace: Duration,
    health: Arc<HealthState>,
    kafka_log: Mutex<LogLimit>,
    db_log: Mutex<LogLimit>,
    progress: Arc<Progress>,
    /// With partition leases: only partitions still leased are committed.
    leases: Option<Arc<Leases>>,
}

impl<H: Handler> Runner<H> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        handler: H,
        consumer: Arc<KafkaConsumer>,
        producer: FutureProducer,
        config: &ConsumerConfig,
        group: &str,
        health: Arc<HealthState>,
        progress: Arc<Progress>,
        leases: Option<Arc<Leases>>,
    ) -> Self {
        let c = &config.consumer;
        m::zero_failures(handler.name());
        Self {
            handler: Arc::new(handler),
            consumer,
            producer,
            group: group.to_owned(),
            dlq_topic: config.kafka.dlq_topic.clone(),
            batch_size: c.batch_size.max(1),
            batch_wait: config.batch_wait(),
            max_retries: c.max_retries,
            backoff_min: Duration::from_millis(c.retry_backoff_ms.max(1)),
            backoff_max: Duration::from_millis(c.max_backoff_ms.max(c.retry_backoff_ms.max(1))),
            grace: Duration::from_secs(c.shutdown_grace),
            health,
            kafka_log: Mutex::default(),
            db_log: Mutex::default(),
            progress,
            leases,
        }
    }

    /// Consumes until `shutdown` becomes true (or its sender is dropped).
    ///
    /// While a batch is written, the next one is gathered and decoded: the broker
    /// and the store work at the same time. Up to [`Handler::in_flight`] batches are
    /// written at once; the offsets are still committed batch by batch, in order,
    /// each only after its own write and the commit of the batch before it. A batch
    /// not written when the consumer stops is simply not committed (whoever reads
    /// the partition next reads it again), nor is any batch after it.
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        let name = self.handler.name();
        tracing::info!(consumer = name, group = %self.group, "consumer started");
        let depth = self.handler.in_flight().max(1);
        let mut writing: VecDeque<Slot<'_>> = VecDeque::with_capacity(depth);
        let mut gathering = Some(tokio::spawn(self.gather(&shutdown)));
        loop {
            self.progress.set_in_flight(writing.len());
            let stopping = *shutdown.borrow() || shutdown.has_changed().is_err();
            if stopping && writing.is_empty() {
                break;
            }
            let room = writing.len() < depth;
            let Some(event) = next_event(&mut writing, gathering.as_mut().filter(|_| room)).await
            else {
                break;
            };
            match event {
                Event::Gathered(joined) => {
                    gathering = None;
                    match joined {
                        Ok(mut next) => {
                            self.kafka_troubles(std::mem::take(&mut next.errors));
                            // Gathered while stopping: left for whoever reads next.
                            if !next.batch.is_empty() && !*shutdown.borrow() {
                                let write = self.write_batch(next, shutdown.clone());
                                writing.push_back(Slot::Writing(Box::pin(write)));
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "gathering the next batch failed"),
                    }
                    if !*shutdown.borrow() {
                        gathering = Some(tokio::spawn(self.gather(&shutdown)));
                    }
                }
                Event::Written(written) => {
                    if written.outcome == Outcome::Abandoned {
                        break;
                    }
                    self.commit(written).await;
                }
            }
        }
        if let Some(gathering) = gathering {
            gathering.abort();
        }
        self.progress.set_in_flight(0);
        tracing::info!(consumer = name, group = %self.group, "consumer stopped");
    }

    /// Gathers one batch: waits for a first message (until shutdown), then up to
    /// `batchSize` messages for at most `batchWait`, and decodes them. Returns them
    /// with the Kafka errors met (logged by the caller).
    fn gather(
        &self,
        shutdown: &watch::Receiver<bool>,
    ) -> impl Future<Output = Gathered<H::Item>> + Send + 'static {
        gather(
            self.consumer.clone(),
            self.handler.clone(),
            self.batch_size,
            self.batch_wait,
            shutdown.clone(),
        )
    }

    fn kafka_troubles(&self, errors: Vec<String>) {
        for e in errors {
            self.kafka_trouble(&e);
        }
    }

    fn kafka_trouble(&self, error: &str) {
        metrics::counter!(m::ERRORS, "consumer" => self.handler.name(), "kind" => "kafka")
            .increment(1);
        if allow(&self.kafka_log) {
            tracing::warn!(consumer = self.handler.name(), %error, "Kafka error (retrying)");
        }
    }

    /// When shutdown has been asked for: the moment the batch in hand must be given up.
    fn give_up_at(&self, shutdown: &watch::Receiver<bool>, at: &mut Option<Instant>) -> bool {
        if *shutdown.borrow() || shutdown.has_changed().is_err() {
            let deadline = *at.get_or_insert_with(|| Instant::now() + self.grace);
            return Instant::now() >= deadline;
        }
        false
    }

    /// Writes a gathered batch (dead letters included); its offsets are committed
    /// by the caller, in order ([`Runner::commit`]).
    async fn write_batch(
        &self,
        gathered: Gathered<H::Item>,
        shutdown: watch::Receiver<bool>,
    ) -> Written {
        let started = Instant::now();
        let (items, outcome) = self
            .write_items(&gathered.batch, gathered.decoded, &shutdown)
            .await;
        Written {
            batch: gathered.batch,
            items,
            started,
            outcome,
        }
    }

    /// Writes the decoded items of `batch` and sends its poison to the dead-letter
    /// topic; returns how many items were written.
    async fn write_items(
        &self,
        batch: &[RawMessage],
        decoded: Vec<Result<H::Item, String>>,
        shutdown: &watch::Receiver<bool>,
    ) -> (usize, Outcome) {
        let name = self.handler.name();
        // A span per traced message (its `traceparent` header), ending when the
        // batch is written: the agent call's trace shows this write.
        let _spans = traced_writes(name, batch);
        let mut items = Vec::with_capacity(batch.len());
        // The message of each item (same index), for a dead letter.
        let mut sources: Vec<&RawMessage> = Vec::with_capacity(batch.len());
        let mut poison: Vec<Poison<'_>> = Vec::new();
        for (msg, decoded) in batch.iter().zip(decoded) {
            match decoded {
                Ok(item) => {
                    items.push(item);
                    sources.push(msg);
                }
                Err(reason) => poison.push(Poison {
                    msg,
                    reason,
                    retries: 0,
                    first_failed: chrono::Utc::now(),
                }),
            }
        }

        let mut give_up: Option<Instant> = None;
        if !items.is_empty() {
            let mut attempt: u32 = 0;
            let mut backoff = self.backoff_min;
            let mut first_failed = None;
            loop {
                let error = match self.handler.write(&items).await {
                    Ok(()) => break,
                    Err(error) => error,
                };
                let failed_at = *first_failed.get_or_insert_with(chrono::Utc::now);
                attempt = attempt.saturating_add(1);
                metrics::counter!(m::ERRORS, "consumer" => name, "kind" => "db").increment(1);
                if allow(&self.db_log) {
                    tracing::warn!(consumer = name, %error, attempt, retry_in = ?backoff,
                        "writing a batch failed; retrying the same batch (nothing is skipped)");
                }
                if attempt >= self.max_retries {
                    // The batch keeps failing. When the store refuses it for an
                    // item's sake (or cannot say why, and answers), write the items
                    // one by one; what is still refused that way is a dead letter.
                    // A refusal for the store's own state (read-only, disk full) or
                    // a store that stops answering is an outage: wait.
                    if error.fault != Fault::Store && self.handler.reachable().await {
                        if let Some(refused) = self.isolate(&items, attempt).await {
                            for (i, reason) in refused {
                                poison.push(Poison {
                                    msg: sources[i],
                                    reason,
                                    retries: attempt,
                                    first_failed: failed_at,
                                });
                            }
                            poison.sort_by_key(|p| (p.msg.partition, p.msg.offset));
                            break;
                        }
                    }
                    self.health.set_waiting(Some(error.message.clone()));
                }
                if self.give_up_at(shutdown, &mut give_up) {
                    tracing::warn!(
                        consumer = name,
                        "shutting down with a batch not written; it stays uncommitted"
                    );
                    return (items.len(), Outcome::Abandoned);
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(self.backoff_max);
            }
            self.health.set_waiting(None);
        }

        for p in poison {
            if !self.dead_letter(&p, shutdown, &mut give_up).await {
                return (items.len(), Outcome::Abandoned);
            }
        }
        (items.len(), Outcome::Committed)
    }

    /// Commits the offsets of a written batch (one past its last message, per
    /// partition), synchronously.
    async fn commit(&self, written: Written) {
        let Written {
            batch,
            items,
            started,
            ..
        } = written;
        let name = self.handler.name();

        // The next offset to read, per partition: one past the last of the batch.
        let mut next: BTreeMap<(&str, i32), i64> = BTreeMap::new();
        for msg in &batch {
            let e = next.entry((msg.topic.as_str(), msg.partition)).or_insert(0);
            *e = (*e).max(msg.offset + 1);
        }
        if tracing::enabled!(tracing::Level::DEBUG) {
            let mut first: BTreeMap<(&str, i32), (i64, usize)> = BTreeMap::new();
            for msg in &batch {
                let e = first
                    .entry((msg.topic.as_str(), msg.partition))
                    .or_insert((msg.offset, 0));
                e.0 = e.0.min(msg.offset);
                e.1 += 1;
            }
            tracing::debug!(consumer = name, ?first, ?next, "batch written; committing");
        }
        // A partition whose lease this replica gave up (or lost) is another's now:
        // committing it could move that replica's offset back. Its rows are written
        // (idempotent); the new owner reads them again.
        let next: Vec<(TopicPartition, i64)> = next
            .into_iter()
            .filter(|((topic, partition), _)| {
                self.leases
                    .as_ref()
                    .is_none_or(|l| l.owns(topic, *partition))
            })
            .map(|((topic, partition), offset)| ((topic.to_owned(), partition), offset))
            .collect();
        let mut tpl = TopicPartitionList::with_capacity(next.len());
        for ((topic, partition), offset) in &next {
            if let Err(e) = tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset)) {
                tracing::warn!(error = %e, "cannot build the commit list");
            }
        }
        let consumer = self.consumer.clone();
        let committed = if next.is_empty() {
            Ok(Ok(()))
        } else {
            tokio::task::spawn_blocking(move || consumer.commit(&tpl, CommitMode::Sync)).await
        };
        match committed {
            Ok(Ok(())) => self.progress.committed(&next),
            // Written but not committed (e.g. the partition moved to another replica
            // in a rebalance): whoever reads it again writes nothing twice.
            Ok(Err(e)) => {
                metrics::counter!(m::ERRORS, "consumer" => name, "kind" => "commit").increment(1);
                tracing::warn!(consumer = name, error = %e, "offset commit failed; the batch may be read again (idempotent)");
            }
            Err(e) => tracing::warn!(consumer = name, error = %e, "offset commit task failed"),
        }
        metrics::counter!(m::EVENTS_PROCESSED, "consumer" => name).increment(items as u64);
        metrics::histogram!(m::PROCESSING_SECONDS, "consumer" => name)
            .record(started.elapsed().as_secs_f64());
        // Precision loss only above 2^53 messages per batch.
        #[allow(clippy::cast_precision_loss)]
        metrics::histogram!(m::BATCH_SIZE, "consumer" => name).record(batch.len() as f64);
    }

    /// Writes `items` one at a time. `Some(refused)`: every item was written except
    /// `refused` (index, error), which the store refused for the item's sake while
    /// answering. `None`: the store stopped answering or refused for its own state
    /// (an outage, not a bad item).
    async fn isolate(&self, items: &[H::Item], attempts: u32) -> Option<Vec<(usize, String)>> {
        let mut refused = Vec::new();
        for (i, item) in items.iter().enumerate() {
            if let Err(error) = self.handler.write(std::slice::from_ref(item)).await {
                let WriteError {
                    message: error,
                    fault,
                } = error;
                if fault == Fault::Store || !self.handler.reachable().await {
                    return None;
                }
                tracing::warn!(consumer = self.handler.name(), %error, attempts,
                    "the store refuses this item; sending it to the dead-letter topic");
                refused.push((i, error));
            }
        }
        Some(refused)
    }

    /// Sends one poison message to the dead-letter topic and waits for Kafka to
    /// acknowledge it (retrying like a database failure). False: shutdown came first.
    async fn dead_letter(
        &self,
        poison: &Poison<'_>,
        shutdown: &watch::Receiver<bool>,
        give_up: &mut Option<Instant>,
    ) -> bool {
        let (msg, reason) = (poison.msg, poison.reason.as_str());
        let name = self.handler.name();
        metrics::counter!(m::ERRORS, "consumer" => name, "kind" => "poison").increment(1);
        tracing::warn!(consumer = name, topic = %msg.topic, partition = msg.partition, offset = msg.offset,
            %reason, "message cannot be processed; sending it to the dead-letter topic");
        let mut retries: u32 = 0;
        let mut backoff = self.backoff_min;
        loop {
            let letter = DeadLetter::from_kafka(
                &msg.topic,
                msg.partition,
                msg.offset,
                msg.key.as_deref(),
                &msg.headers,
                msg.payload.as_deref(),
                reason.to_owned(),
                poison.retries,
                &self.group,
                poison.first_failed,
            );
            let payload = letter.to_json();
            let headers = OwnedHeaders::new_with_capacity(2)
                .insert(Header {
                    key: "event_type",
                    value: Some("dead_letter"),
                })
                .insert(Header {
                    key: "consumer",
                    value: Some(self.group.as_str()),
                });
            let key = msg.key.clone().unwrap_or_default();
            let record = FutureRecord::to(&self.dlq_topic)
                .key(key.as_slice())
                .payload(payload.as_slice())
                .headers(headers);
            let error = match self.producer.send_result(record) {
                Ok(delivery) => match delivery.await {
                    Ok(Ok(_)) => {
                        metrics::counter!(m::DLQ_MESSAGES, "consumer" => name).increment(1);
                        if retries > 0 {
                            self.health.set_waiting(None);
                        }
                        return true;
                    }
                    Ok(Err((e, _))) => e.to_string(),
                    Err(_) => "delivery canceled".to_owned(),
                },
                Err((e, _)) => e.to_string(),
            };
            retries = retries.saturating_add(1);
            metrics::counter!(m::ERRORS, "consumer" => name, "kind" => "dlq").increment(1);
            if retries >= self.max_retries {
                self.health
                    .set_waiting(Some(format!("dead-letter topic: {error}")));
            }
            if allow(&self.kafka_log) {
                tracing::warn!(consumer = name, %error, "sending a dead letter failed; retrying");
            }
            if self.give_up_at(shutdown, give_up) {
                return false;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.backoff_max);
        }
    }
}
