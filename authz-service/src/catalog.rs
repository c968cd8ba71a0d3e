//! What the hot path needs to know about agents, cached in process.
//!
//! Authorize must cost one Redis round trip, so agents, keys, identities, policies,
//! allowlists and prices come from bounded TTL caches (`policyCacheTTL`,
//! `policyCacheMaxSize`) filled from PostgreSQL on a miss. Every admin change bumps
//! `config_epoch` in its transaction; a watcher polls it and empties the caches when
//! it moves, so a change made through any replica reaches every replica within one
//! poll interval (and at worst within the TTL if the database is unreachable).
//!
//! Each cache is [`Tiered`]: the lookups of every Authorize are answered first by a
//! plain map (a read lock and a hash probe, ~0.1 µs), and only on a miss by moka
//! (~1.5 µs of bookkeeping per read, measured: 9 % of the service's CPU on the hot
//! path), which also coalesces concurrent loads of one key from PostgreSQL.

use std::{
    collections::HashMap,
    future::Future,
    hash::Hash,
    sync::{
        atomic::{AtomicI64, AtomicU64, Ordering},
        Arc, RwLock,
    },
    time::{Duration, Instant},
};

use caracal_domain::{
    allowlist::{AllowTarget, Pattern, PatternKind},
    hierarchy::MAX_HIERARCHY_DEPTH,
    money::Currency,
    policy::OnExpiry,
    pricing::Price,
    window::{TimeWindow, WindowType},
};
use diesel::{prelude::*, sql_types};
use diesel_async::RunQueryDsl;
use moka::future::Cache;
use uuid::Uuid;

use crate::{
    db::{self, schema, Pool},
    error::{ServiceError, ServiceResult},
    keys,
};

/// A policy as the hot path evaluates it.
#[derive(Debug, Clone)]
pub struct PolicyInfo {
    pub id: Uuid,
    pub agent_id: Uuid,
    pub limit_micros: i64,
    pub currency: Currency,
    pub window: TimeWindow,
    pub window_type: WindowType,
    pub on_expiry: OnExpiry,
}

/// An agent with everything Authorize checks.
#[derive(Debug, Clone)]
pub struct AgentView {
    pub agent_id: Uuid,
    /// Top of the hierarchy: the Kafka key and the Redis partition.
    pub root_id: Uuid,
    /// Why the agent may not spend (itself or an ancestor inactive), if so.
    pub blocked: Option<String>,
    /// Active policies of the agent first, then of each ancestor, nearest first.
    pub policies: Vec<PolicyInfo>,
    pub allowed_resources: Vec<Pattern>,
    pub allowed_models: Vec<Pattern>,
}

/// A price with the version it came from.
#[derive(Debug, Clone)]
pub struct PriceEntry {
    pub price: Price,
    pub version: i32,
}

pub struct Catalog {
    pool: Pool,
    pepper: String,
    by_key: Tiered<[u8; 32], Option<Uuid>>,
    /// (kind, issuer, value): a JWT claim is only an identity within its issuer.
    by_identity: Tiered<(String, String, String), Option<Uuid>>,
    agents: Tiered<Uuid, Option<Arc<AgentView>>>,
    prices: Tiered<(String, String), Option<Arc<PriceEntry>>>,
    epoch: AtomicI64,
}

/// One catalog cache: a front map under a read-write lock (at most `max` entries;
/// when full it is emptied: the working set is larger than the cache, and moka's
/// eviction behind it decides), then moka, then the loader (PostgreSQL).
///
/// Every value carries the deadline it got when it was loaded (see [`deadline`]),
/// in both tiers: a value the front map takes again from moka keeps it, so nothing
/// is served longer than `ttl` after PostgreSQL said it.
struct Tiered<K, V> {
    front: RwLock<HashMap<K, (V, Instant)>>,
    back: Cache<K, (V, Instant)>,
    ttl: Duration,
    max: usize,
    /// Bumped by `invalidate_all`: a value loaded before a clear is not put into
    /// the front map after it.
    generation: AtomicU64,
}

impl<K, V> Tiered<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    fn new(ttl: Duration, max: u64) -> Self {
        Self {
            front: RwLock::new(HashMap::new()),
            back: Cache::builder()
                .expire_after(UntilDeadline)
                .max_capacity(max)
                .build(),
            ttl,
            max: usize::try_from(max).unwrap_or(usize::MAX).max(1),
            generation: AtomicU64::new(0),
        }
    }

    /// The cached value of `key`, else what `load` (given the key) finds.
    async fn get_or_load<F>(&self, key: K, load: impl FnOnce(&K) -> F) -> ServiceResult<V>
    where
        F: Future<Output = ServiceResult<V>>,
    {
        if let Some(hit) = self.front_get(&key) {
            return Ok(hit);
        }
        // Not `.load()`: diesel's RunQueryDsl has a method of that name too.
        let generation = AtomicU64::load(&self.generation, Ordering::SeqCst);
        let loading = load(&key);
        let ttl = self.ttl;
        let (value, until) = self
            .back
            .try_get_with(key.clone(), async move {
                let value = loading.await?;
                Ok::<_, ServiceError>((value, deadline(ttl, Instant::now(), rand::random())))
            })
            .await
            .map_err(unwrap_arc)?;
        self.front_put(key, value.clone(), until, generation);
        Ok(value)
    }

    fn front_get(&self, key: &K) -> Option<V> {
        let map = self.front.read().ok()?;
        let (value, until) = map.get(key)?;
        (Instant::now() < *until).then(|| value.clone())
    }

    fn front_put(&self, key: K, value: V, until: Instant, generation: u64) {
        let Ok(mut map) = self.front.write() else {
            return;
        };
        if AtomicU64::load(&self.generation, Ordering::SeqCst) != generation {
            return;
        }
        if map.len() >= self.max {
            map.clear();
        }
        map.insert(key, (value, until));
    }

    fn invalidate_all(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut map) = self.front.write() {
            map.clear();
        }
        self.back.invalidate_all();
    }
}

impl Catalog {
    pub fn new(pool: Pool, pepper: String, ttl: Duration, max_size: u64) -> Arc<Self> {
        Arc::new(Self {
            pool,
            pepper,
            by_key: Tiered::new(ttl, max_size),
            by_identity: Tiered::new(ttl, max_size),
            agents: Tiered::new(ttl, max_size),
            prices: Tiered::new(ttl, max_size),
            epoch: AtomicI64::new(-1),
        })
    }

    /// Empties every cache (after an admin change).
    pub fn invalidate_all(&self) {
        self.by_key.invalidate_all();
        self.by_identity.invalidate_all();
        self.agents.invalidate_all();
        self.prices.invalidate_all();
    }

    /// Polls `config_epoch` until `shutdown` flips; runs as a background task.
    pub async fn watch_epoch(
        self: Arc<Self>,
        every: Duration,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            match self.read_epoch().await {
                Ok(epoch) => {
                    let previous = self.epoch.swap(epoch, Ordering::SeqCst);
                    if previous != epoch && previous != -1 {
                        tracing::debug!(previous, epoch, "configuration changed; caches cleared");
                        self.invalidate_all();
                    }
                }
                Err(e) => tracing::debug!(error = %e, "cannot read config epoch"),
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    async fn read_epoch(&self) -> ServiceResult<i64> {
        let mut conn = db::conn(&self.pool).await?;
        Ok(schema::config_epoch::table
            .select(schema::config_epoch::epoch)
            .first(&mut conn)
            .await?)
    }

    /// The active agent holding this API key, if any.
    pub async fn agent_for_key(&self, secret: &str) -> ServiceResult<Option<Uuid>> {
        if !keys::looks_like_key(secret) {
            return Ok(None);
        }
        let hash = keys::hash(&self.pepper, secret);
        self.by_key
            .get_or_load(hash, |hash| {
                let (pool, hash) = (self.pool.clone(), hash.to_vec());
                async move {
                    use schema::agent_api_keys::dsl as k;
                    let mut conn = db::conn(&pool).await?;
                    let id: Option<Uuid> = k::agent_api_keys
                        .select(k::agent_id)
                        .filter(k::key_hash.eq(hash))
                        .filter(k::revoked_at.is_null())
                        .first(&mut conn)
                        .await
                        .optional()?;
                    Ok(id)
                }
            })
            .await
    }

    /// The agent bound to a verified identity, if any: `(kind, issuer, value)`, the
    /// issuer being the JWT's `iss` (empty for SPIFFE).
    pub async fn agent_for_identity(
        &self,
        kind: &str,
        issuer: &str,
        value: &str,
    ) -> ServiceResult<Option<Uuid>> {
        let key = (kind.to_owned(), issuer.to_owned(), value.to_owned());
        self.by_identity
            .get_or_load(key, |key| {
                let pool = self.pool.clone();
                let (kind, issuer, value) = key.clone();
                async move {
                    use schema::agent_identities::dsl as i;
                    let mut conn = db::conn(&pool).await?;
                    let id: Option<Uuid> = i::agent_identities
                        .select(i::agent_id)
                        .filter(i::kind.eq(kind))
                        .filter(i::issuer.eq(issuer))
                        .filter(i::value.eq(value))
                        .first(&mut conn)
                        .await
                        .optional()?;
                    Ok(id)
                }
            })
            .await
    }

    /// An agent with its hierarchy's policies and its allowlists.
    pub async fn agent(&self, id: Uuid) -> ServiceResult<Option<Arc<AgentView>>> {
        self.agents
            .get_or_load(id, |&id| {
                let pool = self.pool.clone();
                async move { load_agent(&pool, id).await }
            })
            .await
    }

    /// The current price of a model, if the price book has one.
    pub async fn price(
        &self,
        provider: &str,
        model: &str,
    ) -> ServiceResult<Option<Arc<PriceEntry>>> {
        let key = (provider.to_lowercase(), model.to_owned());
        self.prices
            .get_or_load(key, |key| {
                let (pool, key) = (self.pool.clone(), key.clone());
                async move {
                    use schema::price_book::dsl as p;
                    let mut conn = db::conn(&pool).await?;
                    let row: Option<(i32, String, i64, i64, i64, i64)> = p::price_book
                        .select((
                            p::version,
                            p::currency,
                            p::input_per_mtok_micros,
                            p::output_per_mtok_micros,
                            p::cached_input_per_mtok_micros,
                            p::per_request_micros,
                        ))
                        .filter(p::provider.eq(&key.0))
                        .filter(p::model.eq(&key.1))
                        .order(p::version.desc())
                        .first(&mut conn)
                        .await
                        .optional()?;
                    let Some((version, currency, input, output, cached, per_request)) = row else {
                        return Ok(None);
                    };
                    let currency = Currency::parse(&currency).map_err(|e| {
                        ServiceError::Internal(format!("stored price currency: {e}"))
                    })?;
                    Ok::<_, ServiceError>(Some(Arc::new(PriceEntry {
                        price: Price {
                            input_per_mtok_micros: input,
                            output_per_mtok_micros: output,
                            cached_input_per_mtok_micros: cached,
                            per_request_micros: per_request,
                            currency,
                        },
                        version,
                    })))
                }
            })
            .await
    }
}

/// The share of the TTL by which a value's life is cut short, at random.
///
/// Values loaded together would otherwise expire together, and a restart or a
/// configuration change (which empties the caches) loads every active agent's
/// within seconds: one TTL later all of them went back to PostgreSQL in the same
/// few seconds, and the hot path waited behind the reloads (authz-bench, open loop
/// at 3,000 pairs/s over 10,000 agents: calls of 20-30 ms, p99.9 70-100 ms, in the
/// run where the 60 s TTL ran out; none with the TTL out of reach). Spread over
/// the last quarter of the TTL, and spread further each time round, the reloads
/// come as the agents' own calls do.
const TTL_SPREAD: f64 = 0.25;

/// When a value loaded at `loaded` stops being served: between `(1 - TTL_SPREAD)
/// × ttl` and `ttl` after it, as `draw` (0..1) falls. Never later than `ttl`: the
/// TTL is also the bound on serving a change missed while the database was away.
fn deadline(ttl: Duration, loaded: Instant, draw: f64) -> Instant {
    let cut = ttl.mul_f64(TTL_SPREAD * draw.clamp(0.0, 1.0));
    loaded + ttl.saturating_sub(cut)
}

/// moka's side of [`deadline`]: an entry lives until the deadline it carries.
struct UntilDeadline;

impl<K, V> moka::Expiry<K, (V, Instant)> for UntilDeadline {
    fn expire_after_create(
        &self,
        _key: &K,
        value: &(V, Instant),
        created_at: Instant,
    ) -> Option<Duration> {
        Some(value.1.saturating_duration_since(created_at))
    }
}

fn unwrap_arc(e: Arc<ServiceError>) -> ServiceError {
    Arc::try_unwrap(e).unwrap_or_else(|shared| match &*shared {
        ServiceError::Unavailable(m) => ServiceError::Unavailable(m.clone()),
        other => ServiceError::Internal(other.to_string()),
    })
}

#[derive(QueryableByName)]
struct ChainRow {
    #[diesel(sql_type = sql_types::Uuid)]
    id: Uuid,
    #[diesel(sql_type = sql_types::Text)]
    status: String,
    #[diesel(sql_type = sql_types::Integer)]
    depth: i32,
}

async fn load_agent(pool: &Pool, id: Uuid) -> ServiceResult<Option<Arc<AgentView>>> {
    let mut conn = db::conn(pool).await?;
    // The agent and its ancestors, nearest first (depth bounded like the hierarchy).
    let chain: Vec<ChainRow> = diesel::sql_query(
        "WITH RECURSIVE chain(id, parent_id, status, depth) AS ( \
             SELECT id, parent_id, status, 0 FROM agents WHERE id = $1 \
             UNION ALL \
             SELECT a.id, a.parent_id, a.status, c.depth + 1 \
             FROM agents a JOIN chain c ON a.id = c.parent_id WHERE c.depth < $2 \
         ) SELECT id, status, depth FROM chain ORDER BY depth",
    )
    .bind::<sql_types::Uuid, _>(id)
    .bind::<sql_types::Integer, _>(MAX_HIERARCHY_DEPTH as i32)
    .load(&mut conn)
    .await?;
    let Some(root) = chain.last() else {
        return Ok(None);
    };
    let root_id = root.id;
    let blocked = chain.iter().find(|c| c.status != "active").map(|c| {
        if c.depth == 0 {
            format!("agent {} is inactive", c.id)
        } else {
            format!("ancestor agent {} is inactive", c.id)
        }
    });
    let ids: Vec<Uuid> = chain.iter().map(|c| c.id).collect();

    use schema::policies::dsl as p;
    let rows: Vec<(Uuid, Uuid, i64, String, String, String, String)> = p::policies
        .select((
            p::id,
            p::agent_id,
            p::limit_micros,
            p::currency,
            p::time_window,
            p::window_type,
            p::on_expiry,
        ))
        .filter(p::agent_id.eq_any(&ids))
        .filter(p::active.eq(true))
        .order(p::id.asc())
        .load(&mut conn)
        .await?;
    let corrupt = |what: &str, e: &dyn std::fmt::Display| {
        ServiceError::Internal(format!("stored policy {what}: {e}"))
    };
    let mut policies = Vec::with_capacity(rows.len());
    for (pid, agent_id, limit, currency, window, window_type, on_expiry) in rows {
        policies.push(PolicyInfo {
            id: pid,
            agent_id,
            limit_micros: limit,
            currency: Currency::parse(&currency).map_err(|e| corrupt("currency", &e))?,
            window: window.parse().map_err(|e| corrupt("window", &e))?,
            window_type: window_type
                .parse()
                .map_err(|e| corrupt("window type", &e))?,
            on_expiry: on_expiry.parse().map_err(|e| corrupt("on_expiry", &e))?,
        });
    }
    // The agent's own policies first, then its ancestors' nearest first: the deny
    // names the closest policy that refused.
    let rank = |agent: &Uuid| ids.iter().position(|i| i == agent).unwrap_or(usize::MAX);
    policies.sort_by_key(|p| rank(&p.agent_id));

    use schema::allowlist_entries::dsl as a;
    let entries: Vec<(String, String, String)> = a::allowlist_entries
        .select((a::target, a::pattern_kind, a::pattern))
        .filter(a::agent_id.eq(id))
        .load(&mut conn)
        .await?;
    let (mut allowed_resources, mut allowed_models) = (Vec::new(), Vec::new());
    for (target, kind, pattern) in entries {
        let kind: PatternKind = kind.parse().map_err(|e| corrupt("allowlist kind", &e))?;
        let compiled =
            Pattern::compile(kind, &pattern).map_err(|e| corrupt("allowlist pattern", &e))?;
        match target.parse::<AllowTarget>() {
            Ok(AllowTarget::Resource) => allowed_resources.push(compiled),
            Ok(AllowTarget::Model) => allowed_models.push(compiled),
            Err(e) => return Err(corrupt("allowlist target", &e)),
        }
    }
    Ok(Some(Arc::new(AgentView {
        agent_id: id,
        root_id,
        blocked,
        policies,
        allowed_resources,
        allowed_models,
    })))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// A cache whose loader counts its calls and answers the key doubled.
    async fn load_all(cache: &Tiered<u32, u32>, keys: std::ops::Range<u32>, loads: &AtomicUsize) {
        for k in keys {
            let got = cache
                .get_or_load(k, |&k| async move {
                    // Counted when it runs (the future is made on every miss of the
                    // front map, and run only on moka's).
                    loads.fetch_add(1, Ordering::SeqCst);
                    Ok(k * 2)
                })
                .await;
            assert_eq!(got.ok(), Some(k * 2));
        }
    }

    /// Loads so far (not `.load()`: diesel's RunQueryDsl has a method of that name).
    fn count(loads: &AtomicUsize) -> usize {
        AtomicUsize::load(loads, Ordering::SeqCst)
    }

    fn deadlines(cache: &Tiered<u32, u32>) -> Vec<Instant> {
        let map = cache.front.read().unwrap_or_else(|e| e.into_inner());
        map.values().map(|(_, until)| *until).collect()
    }

    #[test]
    fn a_deadline_falls_in_the_last_quarter_of_the_ttl() {
        let (ttl, t0) = (Duration::from_secs(60), Instant::now());
        assert_eq!(deadline(ttl, t0, 0.0), t0 + ttl);
        assert_eq!(deadline(ttl, t0, 1.0), t0 + Duration::from_secs(45));
        assert_eq!(deadline(ttl, t0, 0.5), t0 + Duration::from_millis(52_500));
        // Out-of-range draws stay inside the TTL.
        assert_eq!(deadline(ttl, t0, 7.0), t0 + Duration::from_secs(45));
        assert_eq!(deadline(ttl, t0, -1.0), t0 + ttl);
    }

    #[tokio::test]
    async fn values_loaded_together_expire_apart() {
        let ttl = Duration::from_secs(600);
        let cache = Tiered::<u32, u32>::new(ttl, 10_000);
        let loads = AtomicUsize::new(0);
        let t0 = Instant::now();
        load_all(&cache, 0..1_000, &loads).await;
        let t1 = Instant::now();
        assert_eq!(count(&loads), 1_000);
        let d = deadlines(&cache);
        assert_eq!(d.len(), 1_000);
        let (first, last) = (
            d.iter().min().copied().unwrap_or(t0),
            d.iter().max().copied().unwrap_or(t0),
        );
        // Within the TTL, none before its last quarter...
        assert!(
            first >= t0 + ttl.mul_f64(1.0 - TTL_SPREAD),
            "{:?}",
            first - t0
        );
        assert!(last <= t1 + ttl);
        // ... and spread over it (1,000 uniform draws over a quarter of the TTL span
        // more than a fifth of it), not all at t0 + ttl as when every value lived
        // exactly the TTL.
        assert!(
            last - first >= ttl / 5,
            "deadlines span only {:?}",
            last - first
        );
        // Hits are served from the front map: no reload.
        load_all(&cache, 0..1_000, &loads).await;
        assert_eq!(count(&loads), 1_000);
    }

    #[tokio::test]
    async fn a_value_taken_again_from_moka_keeps_its_deadline() {
        let cache = Tiered::<u32, u32>::new(Duration::from_secs(600), 10_000);
        let loads = AtomicUsize::new(0);
        load_all(&cache, 7..8, &loads).await;
        let before = deadlines(&cache);
        // The front map emptied (it does when full): the value comes from moka again,
        // not from PostgreSQL, and is not given a new life.
        cache
            .front
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        load_all(&cache, 7..8, &loads).await;
        assert_eq!(count(&loads), 1);
        assert_eq!(deadlines(&cache), before);
    }

    #[tokio::test]
    async fn a_value_past_its_deadline_is_loaded_again() {
        let cache = Tiered::<u32, u32>::new(Duration::from_millis(40), 10_000);
        let loads = AtomicUsize::new(0);
        load_all(&cache, 1..3, &loads).await;
        assert_eq!(count(&loads), 2);
        let latest = deadlines(&cache).into_iter().max();
        // Wait out the later of the two deadlines (bounded: 40 ms at most).
        if let Some(until) = latest {
            tokio::time::sleep(until.saturating_duration_since(Instant::now())).await;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        load_all(&cache, 1..3, &loads).await;
        assert_eq!(count(&loads), 4);
    }
}
