//! Service configuration.
//!
//! Keys follow the production guide (`dbPoolSize`, `maxConcurrentRequests`,
//! `policyCacheTTL`, ...). A YAML file gives the base; every key can be overridden by
//! an environment variable `CARACAL_<KEY_IN_UPPER_SNAKE_CASE>` (for example
//! `CARACAL_DB_POOL_SIZE=40`), which is how Kubernetes secrets and per-pod settings
//! reach the process. Durations are whole seconds, as in the guide. The loading
//! helpers and the sections the consumers share (`database`, `kafka`) live in
//! [`caracal_service_kit`].

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use caracal_service_kit::config::EnvOverrides;
use serde::Deserialize;

pub use caracal_service_kit::config::{ConfigError, DatabaseConfig};
pub use caracal_service_kit::redis::{RedisEndpoint, RedisMode, RedisTls};

/// Everything the service reads at start-up.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub auth: AuthConfig,
    pub database: DatabaseConfig,
    pub cache: CacheConfig,
    pub reservations: ReservationConfig,
    pub redis: RedisConfig,
    pub budget: BudgetConfig,
    pub kafka: crate::kafka::KafkaConfig,
    pub dlq: DlqConfig,
    pub reconcile: ReconcileConfig,
    pub snapshots: SnapshotsConfig,
    /// OpenTelemetry traces (`tracing:`; off by default).
    pub tracing: caracal_service_kit::telemetry::TracingConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct ServerConfig {
    /// gRPC listen address (admin API, health, reflection).
    pub grpc_addr: SocketAddr,
    /// HTTP listen address for `/health` and `/metrics`.
    pub http_addr: SocketAddr,
    /// Upper bound on requests in flight across all connections; more wait.
    pub max_concurrent_requests: usize,
    /// Per-request deadline, seconds.
    pub request_timeout: u64,
    /// TLS for the gRPC listener; required for client-certificate admin auth.
    pub tls: Option<TlsConfig>,
    /// Threads that run requests: 0 = one per available core (cgroup CPU limits
    /// count); 1 = a single-threaded runtime, the cheapest per call when the
    /// service gets one core (no work stealing, no cross-thread wake-ups).
    pub worker_threads: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 50051)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 9464)),
            max_concurrent_requests: 1000,
            request_timeout: 30,
            tls: None,
            worker_threads: 0,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// When set, clients may present a certificate signed by this CA. A verified
    /// certificate alone grants nothing: its SAN must be on `auth.gatewaySans` (hot
    /// path) or `auth.adminSans` (admin API). Clients without one need a token.
    pub client_ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthConfig {
    /// Bearer token that grants admin rights. Empty disables token auth (then only
    /// client certificates can administer).
    pub admin_token: String,
    /// Server-side secret mixed into API-key hashes, so a copy of the database alone
    /// cannot be used to test guessed keys. Changing it invalidates every issued key.
    pub api_key_pepper: String,
    /// Bearer token a gateway presents on the hot path (`BudgetAuthorization`,
    /// ext_authz `Check`) as `x-caracal-gateway-token`, for plain-TCP dev setups.
    /// Empty disables it (then only allowlisted client certificates are gateways).
    pub gateway_token: String,
    /// Client-certificate SANs (URI, e.g. a SPIFFE id, or DNS name) that are
    /// gateways. Exact match, or a trailing `*` for a prefix.
    pub gateway_sans: Vec<String>,
    /// Client-certificate SANs that are administrators (same matching).
    pub admin_sans: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct CacheConfig {
    /// Seconds an agent/policy/key/price stays cached on the hot path.
    #[serde(rename = "policyCacheTTL")]
    pub policy_cache_ttl: u64,
    /// Entries per cache before the least recently used are evicted.
    pub policy_cache_max_size: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            policy_cache_ttl: 60,
            policy_cache_max_size: 50_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct ReservationConfig {
    /// Seconds before an unsettled reservation expires.
    pub provisional_charge_expiration: u64,
    /// Seconds between expiry sweeps.
    pub provisional_charge_cleanup_interval: u64,
}

impl Default for ReservationConfig {
    fn default() -> Self {
        Self {
            provisional_charge_expiration: 300,
            provisional_charge_cleanup_interval: 30,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct RedisConfig {
    /// `standalone` (one server at `url`) or `cluster` (Redis Cluster, seeds in
    /// `nodes`).
    pub mode: RedisMode,
    /// Standalone: `redis://host:6379` or `rediss://host:6380` (TLS).
    pub url: String,
    /// Cluster: seed nodes, `redis://host:port` or `rediss://...`; any reachable
    /// one gives the client the whole topology.
    pub nodes: Vec<String>,
    /// TLS files (the guide's `redis.tls`); TLS itself is the `rediss://` scheme.
    pub tls: RedisTls,
    /// Hash-tag partitions of the budget state (see `budget::keys`). Fixed for the
    /// life of the data: changing it moves hierarchies to other keys. On a cluster,
    /// several per shard so that they spread over all of them.
    pub partitions: u16,
    pub key_prefix: String,
    /// Connect and response timeout, milliseconds. A call that takes longer fails
    /// with UNAVAILABLE (the gateway then fails closed).
    pub timeout_ms: u64,
    /// Multiplexed connections of the hot path, used in turn. Each is driven by one
    /// task that batches the commands queued at once into one write: fewer
    /// connections batch better, more spread the work over more cores. Unset: 1,
    /// or 8 on a cluster with replica acknowledgement (a `WAIT` holds its
    /// connection until the replica answers, so decisions queue behind it; 8 let
    /// them overlap: see README, benchmarks).
    pub connections: Option<u16>,
    /// Replicas that must hold a reservation or settlement before it is answered
    /// (`WAIT`): a primary lost right after answering then cannot take an
    /// acknowledged decision with it. Unset: 1 in cluster mode, 0 standalone.
    /// When fewer confirm within `replicaAckTimeoutMs` the call fails closed
    /// (UNAVAILABLE).
    pub min_replicas_ack: Option<u8>,
    /// How long to wait for those replicas, milliseconds.
    pub replica_ack_timeout_ms: u64,
    /// Group commit: most calls of one partition sent as one script run while an
    /// earlier run of that partition is in Redis (budget::store). 1 = every call
    /// alone. Nothing waits for a group: an idle partition's call goes at once.
    pub group_commit_max_calls: u16,
}

impl RedisConfig {
    /// The hot path's connections in force (see `connections`).
    pub fn hot_path_connections(&self) -> u16 {
        self.connections.unwrap_or(match self.mode {
            RedisMode::Cluster if self.replicas_ack() > 0 => 8,
            _ => 1,
        })
    }

    /// The replica acknowledgement in force (see `minReplicasAck`).
    pub fn replicas_ack(&self) -> u8 {
        self.min_replicas_ack.unwrap_or(match self.mode {
            RedisMode::Cluster => 1,
            RedisMode::Standalone => 0,
        })
    }

    /// Where Redis is, for [`caracal_service_kit::redis`].
    pub fn endpoint(&self, timeout: Duration) -> RedisEndpoint {
        RedisEndpoint::new(self.mode, &self.url, &self.nodes, self.tls.clone(), timeout)
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            mode: RedisMode::Standalone,
            url: "redis://127.0.0.1:6379".to_owned(),
            nodes: Vec::new(),
            tls: RedisTls::default(),
            partitions: 16,
            key_prefix: "caracal".to_owned(),
            timeout_ms: 1000,
            connections: None,
            min_replicas_ack: None,
            replica_ack_timeout_ms: 100,
            group_commit_max_calls: crate::budget::store::DEFAULT_GROUP_COMMIT_CALLS,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct BudgetConfig {
    /// Admit agents that have no active policy (default: deny them).
    pub allow_without_policy: bool,
    /// Seconds a finished reservation's outcome is kept for retried Settle/Release
    /// and for a Settle that arrives after expiry (it charges the difference). At
    /// least 1; keep it well above the gateway's longest route timeout.
    pub finished_marker_ttl: u64,
    /// Relay outbox events to Kafka from this process.
    pub relay_enabled: bool,
    /// Seconds between polls of the configuration epoch (cache invalidation).
    pub config_poll_interval: u64,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            allow_without_policy: false,
            finished_marker_ttl: 86_400,
            relay_enabled: true,
            config_poll_interval: 1,
        }
    }
}

/// The dead-letter queue (`dlq:`): its monitor and the bounds of reads and replays.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct DlqConfig {
    /// Seconds between reads of the DLQ topic that set `caracal_dlq_size` and
    /// `caracal_dlq_oldest_message_age_seconds` (also read after every replay).
    /// 0 turns the monitor off; it runs only where the service talks to Kafka
    /// (`budget.relayEnabled`).
    pub monitor_interval: u64,
    /// Seconds a read of the whole DLQ topic, or a replay's delivery, may take.
    pub read_timeout: u64,
    /// Seconds after which a replay that claimed a dead letter and never finished
    /// (its process died) may be taken over by another replay.
    pub replay_claim_timeout: u64,
}

/// The reconcile-drift monitor (`reconcile:`; [`crate::reconcile_monitor`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct ReconcileConfig {
    /// Seconds between the monitor's reconciliations of every active policy's
    /// current window (what `caracal ledger reconcile` shows), which set
    /// `caracal_reconcile_drift_windows` and `caracal_reconcile_drift_micros`. 0
    /// turns it off.
    pub monitor_interval: u64,
}

/// Budget snapshots (`snapshots:`; [`crate::admin::snapshot`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct SnapshotsConfig {
    /// When scheduled snapshots are taken: a 5-field cron expression, UTC
    /// (default daily at 00:00). Empty turns them off.
    pub schedule: String,
    /// Where snapshots are kept: `postgres` (the budget_snapshots table) or
    /// `directory` (files under `directory`: a volume or an object-storage mount,
    /// what survives losing the database).
    pub store: String,
    pub directory: String,
    /// Snapshots older than this many days are deleted after each scheduled one
    /// (the newest is always kept); 0 keeps them all.
    pub retention_days: u32,
}

impl Default for SnapshotsConfig {
    fn default() -> Self {
        Self {
            schedule: caracal_domain::schedule::DEFAULT_SNAPSHOT_SCHEDULE.to_owned(),
            store: "postgres".to_owned(),
            directory: String::new(),
            retention_days: 30,
        }
    }
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        Self {
            monitor_interval: 60,
        }
    }
}

impl Default for DlqConfig {
    fn default() -> Self {
        Self {
            monitor_interval: 30,
            read_timeout: 30,
            replay_claim_timeout: 120,
        }
    }
}

impl Config {
    /// Reads `path` (if given), then applies `CARACAL_*` environment overrides.
    pub fn load(path: Option<&std::path::Path>) -> Result<Self, ConfigError> {
        let mut config: Self = caracal_service_kit::config::read_yaml(path)?;
        config.apply_env(|name| std::env::var(name).ok())?;
        config.validate()?;
        Ok(config)
    }

    pub fn from_yaml(text: &str) -> Result<Self, serde_yaml::Error> {
        caracal_service_kit::config::from_yaml(text)
    }

    /// Applies overrides; `lookup` is `std::env::var` in production, a map in tests.
    pub fn apply_env(
        &mut self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        fn parsed<T: std::str::FromStr>(name: &str, value: &str) -> Result<T, ConfigError>
        where
            T::Err: std::fmt::Display,
        {
            value.trim().parse().map_err(|e: T::Err| ConfigError::Env {
                name: name.to_owned(),
                value: value.to_owned(),
                reason: e.to_string(),
            })
        }
        macro_rules! overrides {
            ($($name:literal => $field:expr, $kind:ident;)*) => {$(
                if let Some(value) = lookup($name) {
                    overrides!(@set $name, value, $field, $kind);
                }
            )*};
            (@set $name:literal, $value:ident, $field:expr, text) => { $field = $value; };
            (@set $name:literal, $value:ident, $field:expr, parse) => { $field = parsed($name, &$value)?; };
        }
        overrides! {
            "CARACAL_GRPC_ADDR" => self.server.grpc_addr, parse;
            "CARACAL_HTTP_ADDR" => self.server.http_addr, parse;
            "CARACAL_MAX_CONCURRENT_REQUESTS" => self.server.max_concurrent_requests, parse;
            "CARACAL_REQUEST_TIMEOUT" => self.server.request_timeout, parse;
            "CARACAL_ADMIN_TOKEN" => self.auth.admin_token, text;
            "CARACAL_API_KEY_PEPPER" => self.auth.api_key_pepper, text;
            "CARACAL_GATEWAY_TOKEN" => self.auth.gateway_token, text;
            "CARACAL_FINISHED_MARKER_TTL" => self.budget.finished_marker_ttl, parse;
            "CARACAL_POLICY_CACHE_TTL" => self.cache.policy_cache_ttl, parse;
            "CARACAL_POLICY_CACHE_MAX_SIZE" => self.cache.policy_cache_max_size, parse;
            "CARACAL_PROVISIONAL_CHARGE_EXPIRATION" => self.reservations.provisional_charge_expiration, parse;
            "CARACAL_PROVISIONAL_CHARGE_CLEANUP_INTERVAL" => self.reservations.provisional_charge_cleanup_interval, parse;
            "CARACAL_REDIS_URL" => self.redis.url, text;
            "CARACAL_REDIS_PARTITIONS" => self.redis.partitions, parse;
            "CARACAL_REDIS_KEY_PREFIX" => self.redis.key_prefix, text;
            "CARACAL_REDIS_TIMEOUT_MS" => self.redis.timeout_ms, parse;
            "CARACAL_REDIS_REPLICA_ACK_TIMEOUT_MS" => self.redis.replica_ack_timeout_ms, parse;
            "CARACAL_REDIS_GROUP_COMMIT_MAX_CALLS" => self.redis.group_commit_max_calls, parse;
            "CARACAL_REDIS_TLS_CA_CERT_FILE" => self.redis.tls.ca_cert_file, text;
            "CARACAL_REDIS_TLS_CERT_FILE" => self.redis.tls.cert_file, text;
            "CARACAL_REDIS_TLS_KEY_FILE" => self.redis.tls.key_file, text;
            "CARACAL_WORKER_THREADS" => self.server.worker_threads, parse;
            "CARACAL_ALLOW_WITHOUT_POLICY" => self.budget.allow_without_policy, parse;
            "CARACAL_RELAY_ENABLED" => self.budget.relay_enabled, parse;
            "CARACAL_DLQ_MONITOR_INTERVAL" => self.dlq.monitor_interval, parse;
            "CARACAL_RECONCILE_MONITOR_INTERVAL" => self.reconcile.monitor_interval, parse;
        }
        // Not plain text fields: a mode word, a comma-separated list, an optional count.
        if let Some(v) = lookup("CARACAL_REDIS_MODE") {
            self.redis.mode = parsed("CARACAL_REDIS_MODE", &v)?;
        }
        if let Some(v) = lookup("CARACAL_REDIS_NODES") {
            self.redis.nodes = caracal_service_kit::redis::parse_nodes(&v);
        }
        if let Some(v) = lookup("CARACAL_REDIS_CONNECTIONS") {
            self.redis.connections = Some(parsed("CARACAL_REDIS_CONNECTIONS", &v)?);
        }
        if let Some(v) = lookup("CARACAL_REDIS_MIN_REPLICAS_ACK") {
            self.redis.min_replicas_ack = Some(parsed("CARACAL_REDIS_MIN_REPLICAS_ACK", &v)?);
        }
        if let Some(v) = lookup("CARACAL_REDIS_TLS_ENABLED") {
            self.redis.tls.enabled = parsed("CARACAL_REDIS_TLS_ENABLED", &v)?;
        }
        let shared = EnvOverrides::new(&lookup);
        self.database.apply_env(&shared)?;
        self.kafka.apply_env(&shared)?;
        self.tracing.apply_env(&shared)?;
        Ok(())
    }

    /// Rejects settings that would make the service misbehave rather than fail fast.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.tracing.validate()?;
        let bad = |msg: &str| Err(ConfigError::Invalid(msg.to_owned()));
        if self.database.db_pool_size == 0 {
            return bad("database.dbPoolSize must be at least 1");
        }
        if self.server.max_concurrent_requests == 0 {
            return bad("server.maxConcurrentRequests must be at least 1");
        }
        if self.server.request_timeout == 0 || self.database.db_pool_timeout == 0 {
            return bad(
                "server.requestTimeout and database.dbPoolTimeout must be at least 1 second",
            );
        }
        if self.reservations.provisional_charge_cleanup_interval == 0
            || self.reservations.provisional_charge_expiration == 0
        {
            return bad("reservations.provisionalChargeExpiration and provisionalChargeCleanupInterval must be at least 1 second");
        }
        if self.redis.partitions == 0
            || self.redis.timeout_ms == 0
            || self.redis.hot_path_connections() == 0
        {
            return bad(
                "redis.partitions, redis.timeoutMs and redis.connections must be at least 1",
            );
        }
        if self.database.url.is_empty() {
            return bad("database.url is required");
        }
        // 0 would make the finish script's SET ... EX 0 fail after the counters moved,
        // leaving the live record: a retried Settle would charge again.
        if self.budget.finished_marker_ttl == 0 {
            return bad("budget.finishedMarkerTtl must be at least 1 second");
        }
        if self.dlq.read_timeout == 0 || self.dlq.replay_claim_timeout == 0 {
            return bad("dlq.readTimeout and dlq.replayClaimTimeout must be at least 1 second");
        }
        // Gateways and admins are separate identities.
        if !self.auth.gateway_token.is_empty() && self.auth.gateway_token == self.auth.admin_token {
            return bad("auth.gatewayToken must differ from auth.adminToken");
        }
        if let Some(san) = self
            .auth
            .gateway_sans
            .iter()
            .find(|s| self.auth.admin_sans.contains(s))
        {
            return bad(&format!(
                "SAN {san:?} is on both auth.gatewaySans and auth.adminSans"
            ));
        }
        if let Err(e) = self.redis.endpoint(Duration::from_millis(1)).validate() {
            return Err(ConfigError::Invalid(e.to_string()));
        }
        self.kafka.validate()?;
        if self.redis.replicas_ack() > 0
            && (self.redis.replica_ack_timeout_ms == 0
                || self.redis.replica_ack_timeout_ms >= self.redis.timeout_ms)
        {
            // Past timeoutMs the call is cut before WAIT answers: every decision
            // would fail as a timeout instead of being confirmed.
            return bad("redis.replicaAckTimeoutMs must be at least 1 and below redis.timeoutMs when replicas must acknowledge");
        }
        if self.redis.group_commit_max_calls == 0 || self.redis.group_commit_max_calls > 1024 {
            // A run of 1024 calls holds Redis for milliseconds: every other
            // partition's calls wait behind it.
            return bad("redis.groupCommitMaxCalls must be 1 (off) to 1024");
        }
        // The prefix is part of every key, and keys are written into reservation
        // records as tab/newline-separated text.
        caracal_service_kit::redis::check_key_prefix(&self.redis.key_prefix)
            .map_err(ConfigError::Invalid)?;
        Ok(())
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.server.request_timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn guide_keys_parse_and_env_overrides_win() {
        let yaml = r#"
server:
  maxConcurrentRequests: 500
  requestTimeout: 10
  workerThreads: 1
redis:
  connections: 2
database:
  url: postgres://db/caracal
  dbPoolSize: 20
  dbMaxOverflow: 10
  dbPoolTimeout: 30
cache:
  policyCacheTTL: 60
  policyCacheMaxSize: 50000
reservations:
  provisionalChargeExpiration: 300
  provisionalChargeCleanupInterval: 30
"#;
        let mut c = Config::from_yaml(yaml).unwrap();
        assert_eq!(c.server.max_concurrent_requests, 500);
        assert_eq!(c.cache.policy_cache_ttl, 60);
        assert_eq!(c.server.worker_threads, 1);
        assert_eq!(c.redis.connections, Some(2));
        let env: HashMap<&str, &str> = [
            ("CARACAL_DB_POOL_SIZE", "40"),
            ("CARACAL_ADMIN_TOKEN", "s3"),
            ("CARACAL_REDIS_CONNECTIONS", "3"),
        ]
        .into_iter()
        .collect();
        c.apply_env(|k| env.get(k).map(|v| v.to_string())).unwrap();
        assert_eq!(c.database.db_pool_size, 40);
        assert_eq!(c.database.db_max_overflow, 10);
        assert_eq!(c.auth.admin_token, "s3");
        assert_eq!(c.redis.connections, Some(3));
        c.validate().unwrap();
        // A prefix that would break the record format or the hash tag is refused.
        for bad in ["", "a b", "a{b}", "a\tb"] {
            let mut bad_prefix = c.clone();
            bad_prefix.redis.key_prefix = bad.to_owned();
            assert!(bad_prefix.validate().is_err(), "{bad:?}");
        }
        let mut no_connections = c.clone();
        no_connections.redis.connections = Some(0);
        assert!(no_connections.validate().is_err());
    }

    /// The configuration the Kubernetes manifests ship parses and validates (its
    /// secrets come from the environment; a placeholder stands in for them here).
    #[test]
    fn the_shipped_kubernetes_config_parses_and_validates() {
        let manifest = include_str!("../../k8s/base/configmap.yaml");
        let doc: serde_yaml::Value = serde_yaml::from_str(manifest).unwrap();
        let text = doc["data"]["config.yaml"].as_str().unwrap();
        let mut c = Config::from_yaml(text).unwrap();
        assert_eq!(c.snapshots.schedule, "0 0 * * *");
        assert_eq!(c.snapshots.retention_days, 30);
        assert!(!c.tracing.enabled);
        assert_eq!(c.tracing.sampling_ratio, 0.1);
        c.database.url = "postgres://u@db/caracal".to_owned();
        c.redis.nodes = vec!["rediss://10.0.0.1:6379".to_owned()];
        c.kafka.sasl_password = "placeholder".to_owned();
        if let Err(e) = c.validate() {
            panic!("{e}");
        }
    }

    #[test]
    fn redis_cluster_settings_parse_and_default_to_one_replica_ack() {
        let yaml = r#"
redis:
  mode: cluster
  nodes: [rediss://10.0.0.1:6379, rediss://10.0.0.2:6379]
  tls:
    enabled: true
    caCertFile: /etc/redis/certs/ca.crt
"#;
        let mut c = Config::from_yaml(yaml).unwrap();
        assert_eq!(c.redis.mode, RedisMode::Cluster);
        assert_eq!(c.redis.nodes.len(), 2);
        assert_eq!(c.redis.replicas_ack(), 1);
        assert_eq!(c.redis.hot_path_connections(), 8);
        c.validate().unwrap();
        assert_eq!(Config::default().redis.replicas_ack(), 0);
        let env: HashMap<&str, &str> = [
            ("CARACAL_REDIS_NODES", "rediss://a:1, rediss://b:2,"),
            ("CARACAL_REDIS_MIN_REPLICAS_ACK", "2"),
        ]
        .into_iter()
        .collect();
        c.apply_env(|k| env.get(k).map(|v| v.to_string())).unwrap();
        assert_eq!(c.redis.nodes, vec!["rediss://a:1", "rediss://b:2"]);
        assert_eq!(c.redis.replicas_ack(), 2);
        // TLS required with a plain seed, a cluster without seeds, a bad mode.
        let mut plain = c.clone();
        plain.redis.nodes = vec!["redis://a:1".into()];
        assert!(plain
            .validate()
            .unwrap_err()
            .to_string()
            .contains("rediss://"));
        let mut empty = c.clone();
        empty.redis.nodes.clear();
        assert!(empty.validate().is_err());
        let mut slow_ack = c.clone();
        slow_ack.redis.replica_ack_timeout_ms = slow_ack.redis.timeout_ms;
        assert!(slow_ack
            .validate()
            .unwrap_err()
            .to_string()
            .contains("replicaAckTimeoutMs"));
        assert!(c
            .apply_env(|k| (k == "CARACAL_REDIS_MODE").then(|| "sentinel".to_owned()))
            .is_err());
        assert!(Config::from_yaml("redis:\n  mode: sentinel\n").is_err());
    }

    #[test]
    fn finished_marker_ttl_zero_is_refused() {
        let mut c = Config::default();
        c.validate().unwrap();
        c.budget.finished_marker_ttl = 0;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("finishedMarkerTtl"), "{err}");
        let mut c = Config::default();
        c.apply_env(|k| (k == "CARACAL_FINISHED_MARKER_TTL").then(|| "0".to_owned()))
            .unwrap();
        assert!(c.validate().is_err());
    }

    #[test]
    fn gateway_and_admin_identities_are_separate() {
        let mut c = Config::default();
        c.auth.admin_token = "same".into();
        c.auth.gateway_token = "same".into();
        assert!(c.validate().is_err());
        c.auth.gateway_token = "other".into();
        c.validate().unwrap();
        c.auth.gateway_sans = vec!["spiffe://mesh/gw".into()];
        c.auth.admin_sans = vec!["spiffe://mesh/gw".into()];
        assert!(c.validate().is_err());
    }

    #[test]
    fn shipped_example_config_is_valid() {
        let c = Config::from_yaml(include_str!("../config.example.yaml")).unwrap();
        c.validate().unwrap();
        assert_eq!(c.database.db_pool_size, 20);
        assert_eq!(c.reservations.provisional_charge_expiration, 300);
    }

    #[test]
    fn bad_values_are_named() {
        let mut c = Config::default();
        let err = c
            .apply_env(|k| (k == "CARACAL_DB_POOL_SIZE").then(|| "many".to_owned()))
            .unwrap_err();
        assert!(err.to_string().contains("CARACAL_DB_POOL_SIZE"), "{err}");
        assert!(Config::from_yaml("database:\n  dbPoolSze: 3\n").is_err());
        c.database.db_pool_size = 0;
        assert!(c.validate().is_err());
    }
}
