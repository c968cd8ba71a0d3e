//! The metrics-aggregator: `caracal.metering.events` -> spend history in Redis,
//! spend gauges, and spending anomalies on `caracal.policy.decisions`.
//!
//! Each charge event is validated like the ledger-writer does ([`ledger::decode`],
//! so poison goes to the dead-letter topic the same way) and counted in exact
//! integer micros per agent, per UTC hour and day of its `occurred_at`, per
//! currency, in total and per model (key layout: [`caracal_domain::spend`]).
//!
//! Exactly once per event id: one Lua script per event ([`COUNT_SCRIPT`]) checks
//! the agent's `seen` marker and the event set of the event's day bucket, counts,
//! and records the event in both, in one atomic step. The marker keeps the deltas
//! the event applied, so a second script ([`TOTALS_SCRIPT`], with its own marker)
//! can add them to the cross-agent totals (day totals, minute totals for the rate,
//! the day's ranking of agents) even when a crash came between the two: a batch
//! is committed only after both. Both scripts touch one Redis Cluster slot each
//! (the agent's hash tag, `{all}`).
//!
//! The markers live 9 days ([`spend::SEEN_TTL_S`]), the day buckets 400
//! ([`spend::DAY_TTL_S`]): a `dlq replay` or an offset reset can bring an event
//! back long after its marker is gone. The day's event set catches it: dedupe
//! per day bucket, one set member (the event id) per counted event, with the
//! bucket's TTL set by the same counts, so it dies with the bucket it protects
//! and memory follows the day buckets' retention (a set member, not a key with
//! its own expiry, per event). An event found there counts nothing and adds
//! nothing to the cross-agent totals (its share was added when it was counted).
//! Events older than [`spend::MAX_EVENT_AGE_S`] (a day less than the sets live)
//! count nothing at all, so whenever an event could count again its id is still
//! in its day's set, whatever else kept its buckets alive (a late settle's
//! correction, other agents' spend in the cross-agent day totals). The hour
//! buckets (9 days) die before their day's set.
//!
//! A `late_settle` supersedes its reservation's `expire_charge`: the reservation's
//! record says what the expiry counted and in which buckets; the late settle takes
//! that out again and counts the final charge in its own buckets, so every bucket
//! holds final charges only, like the ledger's `ledger_final_charges` view. (An
//! `expire_charge` arriving after its `late_settle` counts nothing.)
//!
//! A Redis outage fails the batch's write, which the runner retries with backoff
//! for as long as it lasts: nothing is skipped, and nothing counted twice.
//!
//! The upkeep job (every `aggregator.upkeepIntervalMs`) refreshes the gauges and
//! checks every agent that spent in the last two UTC days for an anomaly: the last
//! 24 hour buckets against the 168 before them ([`spend::is_anomalous`]). An
//! anomaly is reported at most once per agent and UTC day (a `SET NX` marker, so
//! several replicas report it once) as a [`SpendingAnomalyEvent`] with `acks=all`.

use std::{
    collections::{BTreeSet, HashSet},
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use caracal_domain::spend::{self, SpendKeys};
use caracal_proto::v1::SpendingAnomalyEvent;
use caracal_service_kit::kafka::producer_config;
use caracal_service_kit::redis::{query_each, RedisConn};
use chrono::{DateTime, Duration as Span, Utc};
use prost::Message as _;
use rdkafka::{
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
};
use redis::Script;

use crate::{
    config::{ConsumerConfig, RedisSettings},
    health::StoreCheck,
    launch::{launch_with, until_ok, Consumer, LaunchError, RunningConsumer},
    ledger::{self, LedgerRow},
    metrics as m,
    runner::{Handler, RawMessage, RunnerError, WriteError},
};

/// The `consumer` label.
pub const CONSUMER: &str = "metrics-aggregator";
/// The consumer group unless configured otherwise.
pub const DEFAULT_GROUP: &str = "caracal-metrics-aggregator";
/// Schema version of the anomaly events this aggregator writes.
pub const ANOMALY_SCHEMA_VERSION: u32 = 1;
/// Most agents checked for anomalies per currency and run (bounds one upkeep run).
const MAX_CHECKED_AGENTS: isize = 100_000;
/// Agents whose hour buckets are read in one pipeline.
const AGENTS_PER_PIPELINE: usize = 20;
/// Longest wait for Kafka to acknowledge an anomaly event; after it the event is
/// reported again on a later run (same event id: consumers deduplicate).
const ANOMALY_DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// Counts one event for its agent (see the module documentation).
///
/// KEYS: seen, reservation, day, hour, currencies, root, day events.
/// ARGV: kind, charged micros, model field, occurred_at (s), currency, root agent
/// id, day TTL, hour TTL, seen TTL, event id.
/// Returns {1, deltas} when counted now, {0, deltas} when counted before (deltas
/// empty once the seen marker is gone: the cross-agent totals have them); deltas
/// are `<occurred_at s>:<micros>` joined by commas (amounts stay strings: Lua's
/// doubles would print large ones as 1e+15).
pub const COUNT_SCRIPT: &str = r"
local prev = redis.call('GET', KEYS[1])
if prev then return {0, prev} end
if redis.call('SISMEMBER', KEYS[7], ARGV[10]) == 1 then return {0, ''} end
local kind, amount, field, ts = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local day_ttl, hour_ttl, seen_ttl = ARGV[7], ARGV[8], ARGV[9]
local deltas = {}
local function bump(day, hour, f, at, delta, existing_only)
  if delta == '0' or delta == '-0' then return end
  for _, kt in ipairs({{day, day_ttl}, {hour, hour_ttl}}) do
    if (not existing_only) or redis.call('EXISTS', kt[1]) == 1 then
      redis.call('HINCRBY', kt[1], 'total', delta)
      redis.call('HINCRBY', kt[1], f, delta)
      redis.call('EXPIRE', kt[1], kt[2])
    end
  end
  deltas[#deltas + 1] = at .. ':' .. delta
end
if kind == 'settle' then
  bump(KEYS[3], KEYS[4], field, ts, amount, false)
else
  local r = redis.call('HMGET', KEYS[2], 'counted', 'day', 'hour', 'field', 'ts', 'final')
  if not (kind == 'expire_charge' and r[6]) then
    if kind == 'late_settle' and r[1] then
      bump(r[2], r[3], r[4], r[5], '-' .. r[1], true)
    end
    bump(KEYS[3], KEYS[4], field, ts, amount, false)
    redis.call('HSET', KEYS[2], 'counted', amount, 'day', KEYS[3], 'hour', KEYS[4],
      'field', field, 'ts', ts)
    if kind == 'late_settle' then redis.call('HSET', KEYS[2], 'final', '1') end
    redis.call('EXPIRE', KEYS[2], seen_ttl)
  end
end
redis.call('SADD', KEYS[5], ARGV[5])
redis.call('EXPIRE', KEYS[5], day_ttl)
redis.call('SET', KEYS[6], ARGV[6], 'EX', day_ttl)
redis.call('SADD', KEYS[7], ARGV[10])
redis.call('EXPIRE', KEYS[7], day_ttl)
local enc = table.concat(deltas, ',')
redis.call('SET', KEYS[1], enc, 'EX', seen_ttl)
return {1, enc}
";

/// Adds one event's deltas to the cross-agent totals, once.
///
/// KEYS: seen (cross-agent), currencies, then per delta: day, minute, ranking.
/// ARGV: agent id, currency, seen TTL, day TTL, minute TTL, ranking TTL, deltas.
/// A negative delta (a superseded expiry) only changes buckets that still exist.
pub const TOTALS_SCRIPT: &str = r"
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[3]) then return 0 end
redis.call('SADD', KEYS[2], ARGV[2])
for i = 7, #ARGV do
  local d = ARGV[i]
  local positive = tonumber(d) > 0
  local k = 3 + (i - 7) * 3
  for j, ttl in ipairs({ARGV[4], ARGV[5], ARGV[6]}) do
    local key = KEYS[k + j - 1]
    if positive or redis.call('EXISTS', key) == 1 then
      if j == 3 then
        redis.call('ZINCRBY', key, d, ARGV[1])
      else
        redis.call('HINCRBY', key, ARGV[2], d)
      end
      redis.call('EXPIRE', key, ttl)
    end
  end
end
return 1
";

/// One applied change: `micros` (negative for a superseded expiry) in the buckets of `at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delta {
    pub at: DateTime<Utc>,
    pub micros: i64,
}

/// Parses a script's `<s>:<micros>,...` list.
fn parse_deltas(text: &str) -> Result<Vec<Delta>, String> {
    text.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (at, micros) = p
                .split_once(':')
                .ok_or_else(|| format!("bad delta {p:?}"))?;
            let at = at
                .parse::<i64>()
                .ok()
                .and_then(|s| DateTime::from_timestamp(s, 0))
                .ok_or_else(|| format!("bad delta time {p:?}"))?;
            let micros = micros
                .parse::<i64>()
                .map_err(|_| format!("bad delta amount {p:?}"))?;
            Ok(Delta { at, micros })
        })
        .collect()
}

/// The aggregator's Redis: the spend keys and the two scripts.
#[derive(Clone)]
pub struct SpendStore {
    conn: RedisConn,
    keys: SpendKeys,
    count: Arc<Script>,
    totals: Arc<Script>,
}

impl SpendStore {
    /// Connects lazily: a store made while Redis is down works once it is back.
    /// A standalone server or a cluster: every script touches one agent's hash
    /// tag (or the cross-agent `{all}` tag), and what spans agents goes through
    /// [`query_each`].
    pub fn new(settings: &RedisSettings) -> Result<Self, String> {
        let conn = settings
            .endpoint()
            .connect_one()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            conn,
            keys: SpendKeys::new(settings.key_prefix.clone()),
            count: Arc::new(Script::new(COUNT_SCRIPT)),
            totals: Arc::new(Script::new(TOTALS_SCRIPT)),
        })
    }

    pub fn keys(&self) -> &SpendKeys {
        &self.keys
    }

    pub async fn ping(&self) -> Result<(), String> {
        let mut conn = self.conn.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Counts `charges` (each exactly once, whatever was counted before): the
    /// per-agent scripts, then the cross-agent ones — each set one pipeline on a
    /// standalone server, one call per script on a cluster (the agents' keys live
    /// on different slots). Charges that occurred more than
    /// [`spend::MAX_EVENT_AGE_S`] before `now` count nothing.
    pub async fn record(&self, charges: &[LedgerRow], now: DateTime<Utc>) -> Result<(), String> {
        let oldest = i64::try_from(spend::MAX_EVENT_AGE_S)
            .ok()
            .and_then(Span::try_seconds)
            .and_then(|age| now.checked_sub_signed(age))
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        let (charges, too_old): (Vec<&LedgerRow>, Vec<&LedgerRow>) =
            charges.iter().partition(|c| c.occurred_at >= oldest);
        if !too_old.is_empty() {
            tracing::info!(
                events = too_old.len(),
                oldest = %oldest,
                "events older than the day buckets' retention: not counted"
            );
        }
        if charges.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        let k = &self.keys;
        // Loaded first (on every node of a cluster), so the EVALSHAs find them; a
        // node that lost them since fails the batch, which is retried (idempotent).
        self.count
            .load_async(&mut conn)
            .await
            .map_err(|e| format!("redis: {e}"))?;
        let calls = charges
            .iter()
            .map(|c| {
                let agent = c.agent_id.to_string();
                let at = c.occurred_at;
                let mut cmd = redis::cmd("EVALSHA");
                cmd.arg(self.count.get_hash())
                    .arg(7)
                    .arg(k.seen(&agent, &c.event_id))
                    .arg(k.reservation(&agent, &c.reservation_id))
                    .arg(k.day(&agent, spend::day_of(at), &c.currency))
                    .arg(k.hour(&agent, at, &c.currency))
                    .arg(k.currencies(&agent))
                    .arg(k.root(&agent))
                    .arg(k.day_events(&agent, spend::day_of(at), &c.currency))
                    .arg(&c.kind)
                    .arg(c.charged_micros.to_string())
                    .arg(spend::model_field(&c.model))
                    .arg(at.timestamp())
                    .arg(&c.currency)
                    .arg(c.root_agent_id.to_string())
                    .arg(spend::DAY_TTL_S)
                    .arg(spend::HOUR_TTL_S)
                    .arg(spend::SEEN_TTL_S)
                    .arg(&c.event_id);
                cmd
            })
            .collect();
        let counted: Vec<(i64, String)> = query_each(&self.conn, calls)
            .await
            .map_err(|e| format!("redis: {e}"))?
            .into_iter()
            .map(redis::from_redis_value)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("redis: unexpected count reply: {e}"))?;
        if counted.len() != charges.len() {
            return Err(format!(
                "redis answered {} results for {} events",
                counted.len(),
                charges.len()
            ));
        }
        let fresh = counted.iter().filter(|(new, _)| *new == 1).count();
        if fresh < charges.len() {
            tracing::debug!(
                duplicates = charges.len() - fresh,
                "events already counted (redelivery)"
            );
        }

        let mut calls = Vec::new();
        for (c, (_, deltas)) in charges.iter().zip(&counted) {
            let deltas = parse_deltas(deltas)?;
            if deltas.is_empty() {
                continue;
            }
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(self.totals.get_hash())
                .arg(2 + 3 * deltas.len())
                .arg(k.all_seen(&c.event_id))
                .arg(k.all_currencies());
            for d in &deltas {
                cmd.arg(k.all_day(spend::day_of(d.at)))
                    .arg(k.all_minute(d.at))
                    .arg(k.ranking(spend::day_of(d.at), &c.currency));
            }
            cmd.arg(c.agent_id.to_string())
                .arg(&c.currency)
                .arg(spend::SEEN_TTL_S)
                .arg(spend::DAY_TTL_S)
                .arg(spend::MINUTE_TTL_S)
                .arg(spend::RANKING_TTL_S);
            for d in &deltas {
                cmd.arg(d.micros.to_string());
            }
            calls.push(cmd);
        }
        if !calls.is_empty() {
            self.totals
                .load_async(&mut conn)
                .await
                .map_err(|e| format!("redis: {e}"))?;
            query_each(&self.conn, calls)
                .await
                .map_err(|e| format!("redis: {e}"))?;
        }
        Ok(())
    }

    /// Totals (`total` field) of `keys`, 0 for a missing key, in order.
    async fn totals_of(&self, keys: &[String]) -> Result<Vec<i64>, String> {
        let reads = keys
            .iter()
            .map(|key| {
                let mut cmd = redis::cmd("HGET");
                cmd.arg(key).arg(spend::TOTAL_FIELD);
                cmd
            })
            .collect();
        query_each(&self.conn, reads)
            .await
            .map_err(|e| format!("redis: {e}"))?
            .into_iter()
            .map(|v| redis::from_redis_value::<Option<i64>>(v).map(Option::unwrap_or_default))
            .collect::<Result<_, _>>()
            .map_err(|e| format!("redis: unexpected total: {e}"))
    }
}

/// What the handler and the upkeep job share.
struct Shared {
    store: SpendStore,
    producer: FutureProducer,
    decisions_topic: String,
    top_agents: usize,
    /// (agent, currency) pairs that have a per-agent gauge.
    published: Mutex<HashSet<(String, String)>>,
}

/// The [`Handler`] that counts spend.
pub struct MetricsAggregator {
    store: SpendStore,
}

impl Handler for MetricsAggregator {
    type Item = LedgerRow;

    fn name(&self) -> &'static str {
        CONSUMER
    }

    fn decode(&self, msg: &RawMessage) -> Result<LedgerRow, String> {
        ledger::decode(msg)
    }

    fn write(&self, items: &[LedgerRow]) -> impl Future<Output = Result<(), WriteError>> + Send {
        let store = self.store.clone();
        let items = items.to_vec();
        async move {
            store
                .record(&items, Utc::now())
                .await
                .map_err(WriteError::from)
        }
    }

    fn reachable(&self) -> impl Future<Output = bool> + Send {
        let store = self.store.clone();
        async move { store.ping().await.is_ok() }
    }
}

/// Starts the metrics-aggregator: binds `/health` + `/metrics` at once, then (in
/// the background, once Redis answers) consumes, and runs the upkeep job at start
/// and every `aggregator.upkeepIntervalMs`.
pub async fn start(config: ConsumerConfig) -> Result<RunningConsumer, LaunchError> {
    let store = SpendStore::new(&config.redis).map_err(LaunchError::Store)?;
    let producer: FutureProducer = producer_config(&config.kafka)
        .create()
        .map_err(|e| LaunchError::Kafka(RunnerError::Kafka(e)))?;
    let shared = Arc::new(Shared {
        store: store.clone(),
        producer,
        decisions_topic: config.kafka.decisions_topic.clone(),
        top_agents: config.aggregator.top_agents,
        published: Mutex::new(HashSet::new()),
    });
    let topics = vec![config.kafka.metering_topic.clone()];
    let every = Duration::from_millis(config.aggregator.upkeep_interval_ms);
    let handler_store = store.clone();
    launch_with(
        config,
        Consumer {
            default_group: DEFAULT_GROUP,
            topics,
            handler: move |()| MetricsAggregator {
                store: handler_store,
            },
            upkeep_every: every,
            upkeep: move |()| {
                let shared = shared.clone();
                async move { upkeep(&shared, Utc::now()).await }
            },
        },
        move |health, shutdown| async move {
            let check_store = store.clone();
            let check: StoreCheck = Arc::new(move || {
                let store = check_store.clone();
                Box::pin(async move { store.ping().await })
            });
            health.set_store_check("redis", check);
            until_ok("connecting to Redis", &shutdown, || store.ping()).await
        },
    )
    .await
}

async fn upkeep(shared: &Shared, now: DateTime<Utc>) {
    if let Err(error) = refresh_gauges(shared, now).await {
        tracing::warn!(%error, "refreshing the spend gauges failed; retrying on the next run");
    }
    match detect_anomalies(shared, now).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(anomalies = n, "spending anomalies reported"),
        Err(error) => {
            tracing::warn!(%error, "checking for spending anomalies failed; retrying on the next run");
        }
    }
}

/// Micros as a gauge value (exact below 2^53 micros, 9 billion units).
#[allow(clippy::cast_precision_loss)]
fn gauge_value(micros: i64) -> f64 {
    micros as f64
}

/// Today's totals, the spend rate over the last minute and hour (complete UTC
/// minutes of `occurred_at`), and the top agents' spend today, per currency.
async fn refresh_gauges(shared: &Shared, now: DateTime<Utc>) -> Result<(), String> {
    let store = &shared.store;
    let k = store.keys();
    let mut conn = store.conn.clone();
    let currencies: BTreeSet<String> = redis::cmd("SMEMBERS")
        .arg(k.all_currencies())
        .query_async(&mut conn)
        .await
        .map_err(|e| format!("redis: {e}"))?;
    let today = spend::day_of(now);
    let this_minute = DateTime::from_timestamp(now.timestamp() - now.timestamp().rem_euclid(60), 0)
        .unwrap_or(now);
    let mut top: HashSet<(String, String)> = HashSet::new();
    for currency in &currencies {
        let mut pipe = redis::pipe();
        pipe.hget(k.all_day(today), currency);
        for back in 1..=60 {
            pipe.hget(k.all_minute(this_minute - Span::minutes(back)), currency);
        }
        let values: Vec<Option<i64>> = pipe
            .query_async(&mut conn)
            .await
            .map_err(|e| format!("redis: {e}"))?;
        let total = values.first().copied().flatten().unwrap_or(0);
        let last_minute = values.get(1).copied().flatten().unwrap_or(0);
        let last_hour: i64 = values.iter().skip(1).map(|v| v.unwrap_or(0)).sum();
        metrics::gauge!(m::SPEND_TOTAL, "currency" => currency.clone()).set(gauge_value(total));
        // The currency's anomaly counter exists (at 0) before its first anomaly.
        metrics::counter!(m::ANOMALIES, "currency" => currency.clone()).increment(0);
        metrics::gauge!(m::SPEND_RATE, "currency" => currency.clone(), "window" => "1m")
            .set(gauge_value(last_minute) / 60.0);
        metrics::gauge!(m::SPEND_RATE, "currency" => currency.clone(), "window" => "1h")
            .set(gauge_value(last_hour) / 3600.0);
        if shared.top_agents == 0 {
            continue;
        }
        let stop = isize::try_from(shared.top_agents).unwrap_or(isize::MAX) - 1;
        let ranked: Vec<(String, f64)> = redis::cmd("ZREVRANGE")
            .arg(k.ranking(today, currency))
            .arg(0)
            .arg(stop)
            .arg("WITHSCORES")
            .query_async(&mut conn)
            .await
            .map_err(|e| format!("redis: {e}"))?;
        for (agent, micros) in ranked {
            metrics::gauge!(m::AGENT_SPEND_TODAY, "agent_id" => agent.clone(), "currency" => currency.clone())
                .set(micros);
            top.insert((agent, currency.clone()));
        }
    }
    // Agents that left the top: their series stays (the exporter cannot drop
    // one), at 0, so a dashboard never shows a stale amount.
    if let Ok(mut published) = shared.published.lock() {
        for (agent, currency) in published.difference(&top) {
            metrics::gauge!(m::AGENT_SPEND_TODAY, "agent_id" => agent.clone(), "currency" => currency.clone())
                .set(0.0);
        }
        published.extend(top);
    }
    Ok(())
}

/// One agent's spend over the anomaly rule's windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub last_24h: i64,
    pub prior_7d: i64,
}

/// Checks every agent that spent today or yesterday; returns how many anomalies
/// were reported now.
async fn detect_anomalies(shared: &Shared, now: DateTime<Utc>) -> Result<usize, String> {
    let store = &shared.store;
    let k = store.keys();
    let mut conn = store.conn.clone();
    let currencies: BTreeSet<String> = redis::cmd("SMEMBERS")
        .arg(k.all_currencies())
        .query_async(&mut conn)
        .await
        .map_err(|e| format!("redis: {e}"))?;
    let today = spend::day_of(now);
    let yesterday = today - Span::days(1);
    let (last, prior) = spend::anomaly_hours(now);
    let whole_days = match (prior.last(), prior.first()) {
        (Some(first), Some(last)) => spend::whole_days_within(*first, *last),
        _ => Vec::new(),
    };
    let mut reported = 0;
    for currency in &currencies {
        let mut agents: BTreeSet<String> = BTreeSet::new();
        for day in [today, yesterday] {
            let members: Vec<String> = redis::cmd("ZREVRANGE")
                .arg(k.ranking(day, currency))
                .arg(0)
                .arg(MAX_CHECKED_AGENTS - 1)
                .query_async(&mut conn)
                .await
                .map_err(|e| format!("redis: {e}"))?;
            agents.extend(members);
        }
        let agents: Vec<String> = agents.into_iter().collect();
        for chunk in agents.chunks(AGENTS_PER_PIPELINE) {
            // Already reported today: nothing to read.
            let checks = chunk
                .iter()
                .map(|agent| {
                    let mut cmd = redis::cmd("EXISTS");
                    cmd.arg(k.anomaly(agent, today));
                    cmd
                })
                .collect();
            let flagged: Vec<bool> = query_each(&store.conn, checks)
                .await
                .map_err(|e| format!("redis: {e}"))?
                .into_iter()
                .map(redis::from_redis_value)
                .collect::<Result<_, _>>()
                .map_err(|e| format!("redis: unexpected EXISTS reply: {e}"))?;
            let open: Vec<&String> = chunk
                .iter()
                .zip(flagged)
                .filter_map(|(a, f)| (!f).then_some(a))
                .collect();
            if open.is_empty() {
                continue;
            }
            // First the last 24 hours and the whole days of the 7 before: most
            // agents are ruled out by that lower bound of their prior spend.
            let mut keys = Vec::with_capacity(open.len() * (24 + whole_days.len()));
            for agent in &open {
                keys.extend(last.iter().map(|h| k.hour(agent, *h, currency)));
                keys.extend(whole_days.iter().map(|d| k.day(agent, *d, currency)));
            }
            let totals = store.totals_of(&keys).await?;
            let mut suspects: Vec<(&String, i64)> = Vec::new();
            for (agent, values) in open
                .iter()
                .zip(totals.chunks((24 + whole_days.len()).max(1)))
            {
                let last_24h: i64 = values.iter().take(24).sum();
                let prior_at_least: i64 = values.iter().skip(24).sum();
                let ruled_out = last_24h <= 0
                    || (prior_at_least > 0 && !spend::is_anomalous(last_24h, prior_at_least));
                if !ruled_out {
                    suspects.push((agent, last_24h));
                }
            }
            if suspects.is_empty() {
                continue;
            }
            let mut keys = Vec::with_capacity(suspects.len() * prior.len());
            for (agent, _) in &suspects {
                keys.extend(prior.iter().map(|h| k.hour(agent, *h, currency)));
            }
            let totals = store.totals_of(&keys).await?;
            for ((agent, last_24h), hours) in suspects.iter().zip(totals.chunks(prior.len().max(1)))
            {
                let window = Window {
                    last_24h: *last_24h,
                    prior_7d: hours.iter().sum(),
                };
                if spend::is_anomalous(window.last_24h, window.prior_7d)
                    && report(shared, agent, currency, window, now).await?
                {
                    reported += 1;
                }
            }
        }
    }
    Ok(reported)
}

/// Claims the agent's anomaly of the day and sends the event; false when another
/// run (or replica) already did.
async fn report(
    shared: &Shared,
    agent: &str,
    currency: &str,
    window: Window,
    now: DateTime<Utc>,
) -> Result<bool, String> {
    let k = shared.store.keys();
    let mut conn = shared.store.conn.clone();
    let today = spend::day_of(now);
    let marker = k.anomaly(agent, today);
    let claimed: Option<String> = redis::cmd("SET")
        .arg(&marker)
        .arg(currency)
        .arg("NX")
        .arg("EX")
        .arg(spend::ANOMALY_TTL_S)
        .query_async(&mut conn)
        .await
        .map_err(|e| format!("redis: {e}"))?;
    if claimed.is_none() {
        return Ok(false);
    }
    let root: Option<String> = redis::cmd("GET")
        .arg(k.root(agent))
        .query_async(&mut conn)
        .await
        .map_err(|e| format!("redis: {e}"))?;
    let root = root.unwrap_or_else(|| agent.to_owned());
    let event = SpendingAnomalyEvent {
        schema_version: ANOMALY_SCHEMA_VERSION,
        event_id: format!("anomaly/{agent}/{}", spend::day_part(today)),
        agent_id: agent.to_owned(),
        root_agent_id: root.clone(),
        currency: currency.to_owned(),
        last_24h_micros: window.last_24h,
        daily_average_7d_micros: window.prior_7d / 7,
        detected_at: Some(prost_types::Timestamp {
            seconds: now.timestamp(),
            nanos: i32::try_from(now.timestamp_subsec_nanos()).unwrap_or(0),
        }),
    };
    let payload = event.encode_to_vec();
    let version = ANOMALY_SCHEMA_VERSION.to_string();
    let headers = OwnedHeaders::new_with_capacity(3)
        .insert(Header {
            key: "event_id",
            value: Some(event.event_id.as_str()),
        })
        .insert(Header {
            key: "event_type",
            value: Some("spending_anomaly"),
        })
        .insert(Header {
            key: "schema_version",
            value: Some(version.as_str()),
        });
    let record = FutureRecord::to(&shared.decisions_topic)
        .key(root.as_str())
        .payload(payload.as_slice())
        .headers(headers);
    let delivered = match shared.producer.send_result(record) {
        Ok(delivery) => match tokio::time::timeout(ANOMALY_DELIVERY_TIMEOUT, delivery).await {
            Ok(Ok(Ok(_))) => Ok(()),
            Ok(Ok(Err((e, _)))) => Err(e.to_string()),
            Ok(Err(_)) => Err("delivery canceled".to_owned()),
            Err(_) => Err("no acknowledgement in time".to_owned()),
        },
        Err((e, _)) => Err(e.to_string()),
    };
    if let Err(error) = delivered {
        // Free the claim so a later run reports it (same event id).
        let _: Result<i64, _> = redis::cmd("DEL").arg(&marker).query_async(&mut conn).await;
        return Err(format!("sending the anomaly of agent {agent}: {error}"));
    }
    metrics::counter!(m::ANOMALIES, "currency" => currency.to_owned()).increment(1);
    tracing::warn!(
        agent_id = agent,
        currency,
        last_24h_micros = window.last_24h,
        daily_average_7d_micros = window.prior_7d / 7,
        "spending anomaly: the last 24 hours spent more than twice the 7-day daily average"
    );
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_parse() {
        assert_eq!(parse_deltas("").unwrap(), vec![]);
        let d = parse_deltas("1700000000:900,1700003600:-900").unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].micros, 900);
        assert_eq!(d[1].micros, -900);
        assert_eq!(d[1].at.timestamp(), 1_700_003_600);
        assert!(parse_deltas("x").is_err());
        assert!(parse_deltas("1:y").is_err());
    }
}
