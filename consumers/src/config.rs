//! Consumer configuration: the service's `database` and `kafka` sections plus a
//! `consumer` section, the audit-logger's `audit` and the metrics-aggregator's
//! `redis` and `aggregator` sections, from a YAML file with `CARACAL_*` environment
//! overrides.

use std::{net::SocketAddr, path::Path, time::Duration};

use caracal_service_kit::{
    config::{ConfigError, DatabaseConfig, EnvOverrides},
    kafka::KafkaConfig,
    redis::{RedisEndpoint, RedisMode, RedisTls},
};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct ConsumerConfig {
    pub database: DatabaseConfig,
    pub kafka: KafkaConfig,
    pub consumer: ConsumerSettings,
    /// The audit-logger's own settings (`audit:`).
    pub audit: AuditSettings,
    /// The metrics-aggregator's Redis (`redis:`).
    pub redis: RedisSettings,
    /// The metrics-aggregator's own settings (`aggregator:`).
    pub aggregator: AggregatorSettings,
    /// The ledger-writer's own settings (`ledgerWriter:`; the guide's
    /// `consumers.ledgerWriter.*`).
    pub ledger_writer: LedgerWriterSettings,
    /// OpenTelemetry traces (`tracing:`; off by default).
    pub tracing: caracal_service_kit::telemetry::TracingConfig,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct LedgerWriterSettings {
    /// The Merkle log's sequencer (`ledgerWriter.merkle.*`).
    pub merkle: caracal_merkle_log::MerkleConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct RedisSettings {
    /// `standalone` (one server at `url`, default) or `cluster` (Redis Cluster,
    /// seeds in `nodes`): the authz-service's Redis, usually.
    pub mode: RedisMode,
    /// `redis://host:6379[/db]` or `rediss://host:6380` (TLS).
    pub url: String,
    /// Cluster seeds, `redis://host:port` or `rediss://...`.
    pub nodes: Vec<String>,
    /// Key prefix: the authz-service's `redis.keyPrefix`, so `SpendTrend` reads
    /// the same keys.
    pub key_prefix: String,
    /// Connect and response timeout, ms. A write that takes longer fails and is
    /// retried (the consumer waits; it never skips).
    pub timeout_ms: u64,
    /// PEM bundle of the CA that signs the server's certificate, for `rediss://`
    /// to a server with a private CA; empty: the system's roots.
    pub ca_file: String,
    /// Client certificate and key (PEM), for servers that require one.
    pub cert_file: String,
    pub key_file: String,
}

impl RedisSettings {
    /// Where Redis is, for [`caracal_service_kit::redis`].
    pub fn endpoint(&self) -> RedisEndpoint {
        let tls = RedisTls {
            enabled: false,
            ca_cert_file: self.ca_file.clone(),
            cert_file: self.cert_file.clone(),
            key_file: self.key_file.clone(),
        };
        let timeout = Duration::from_millis(self.timeout_ms);
        RedisEndpoint::new(self.mode, &self.url, &self.nodes, tls, timeout)
    }
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            mode: RedisMode::Standalone,
            url: "redis://127.0.0.1:6379".to_owned(),
            nodes: Vec::new(),
            key_prefix: "caracal".to_owned(),
            timeout_ms: 2000,
            ca_file: String::new(),
            cert_file: String::new(),
            key_file: String::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct AggregatorSettings {
    /// How often the spend gauges are refreshed and every agent that spent in the
    /// last 24 hours is checked for an anomaly, ms.
    pub upkeep_interval_ms: u64,
    /// Agents with their own spend gauge: the top N by spend today (bounds the
    /// metric's cardinality).
    pub top_agents: usize,
}

impl Default for AggregatorSettings {
    fn default() -> Self {
        Self {
            upkeep_interval_ms: 60_000,
            top_agents: 100,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct AuditSettings {
    /// Audit rows older than this many days (by message time) are deleted by the
    /// retention job. Default 2555 (7 years).
    pub retention_days: u32,
    /// Rows deleted per retention transaction (keeps locks and WAL bursts small).
    pub retention_batch: u32,
}

impl Default for AuditSettings {
    fn default() -> Self {
        Self {
            retention_days: 2555,
            retention_batch: 5000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct ConsumerSettings {
    /// `/health/*` and `/metrics` listen address.
    pub http_addr: SocketAddr,
    /// Consumer group; empty: the consumer's own (`caracal-ledger-writer`, ...).
    pub group_id: String,
    /// Static group membership (`group.instance.id`, e.g. the pod name of a
    /// StatefulSet): a restarted replica takes its partitions back at once instead
    /// of waiting for its dead predecessor's session to expire. Empty: dynamic.
    pub group_instance_id: String,
    /// How a replica gets its partitions: `leases` (default; PostgreSQL advisory
    /// locks, see `lease.rs`: no group protocol, a dead replica's partitions move on
    /// as soon as its database session ends), `group` (Kafka's consumer-group
    /// protocol: needs a broker whose coordinator expires dead members, e.g. Apache
    /// Kafka; tansu 0.6 does not), or `static` (`assignAll` below).
    pub assignment: Assignment,
    /// How often a replica renews and rebalances its partition leases, ms.
    pub lease_interval_ms: u64,
    /// A partition with lag whose committed offset has not moved for this long is
    /// stalled: readiness drops and `caracal_consumer_stalled_partitions` counts it.
    pub stall_seconds: u64,
    /// Take every partition of the topic directly (`assign`) instead of joining
    /// the group's partition sharing (`subscribe`). Offsets are still committed to
    /// the group and resumed from. For a single replica on a broker whose group
    /// coordinator keeps dead members (tansu 0.6 never expires a SIGKILLed member,
    /// so its partitions would stay unread).
    pub assign_all: bool,
    /// With `assignAll`: this replica takes only the partitions `p` with
    /// `p % assignReplicas == assignIndex` (e.g. a StatefulSet's ordinal), so
    /// several replicas share the partitions without the group protocol. A dead
    /// replica's partitions wait for its restart (Kubernetes restarts it). Default
    /// 0 of 1: every partition.
    pub assign_index: u32,
    pub assign_replicas: u32,
    /// Most messages written per batch (one transaction).
    pub batch_size: usize,
    /// How long a batch waits to fill after its first message, ms.
    pub batch_wait_ms: u64,
    /// Failed attempts at a batch before the consumer reports not ready (it keeps
    /// retrying the same batch with capped backoff: it never skips).
    pub max_retries: u32,
    /// First retry delay, ms; doubles up to `maxBackoffMs`.
    pub retry_backoff_ms: u64,
    pub max_backoff_ms: u64,
    /// Group session timeout, ms: how soon a dead replica's partitions move on.
    pub session_timeout_ms: u64,
    /// Longest time between polls before the member is dropped from its group, ms;
    /// also how long a rebalance waits for members that went silent.
    pub max_poll_interval_ms: u64,
    /// How often consumer lag is sampled, ms.
    pub lag_interval_ms: u64,
    /// Apply pending database migrations at start (serialised across processes).
    pub run_migrations: bool,
    /// On SIGTERM, how long the batch in hand may take to be written and committed, s.
    pub shutdown_grace: u64,
}

impl Default for ConsumerSettings {
    fn default() -> Self {
        Self {
            http_addr: SocketAddr::from(([127, 0, 0, 1], 9465)),
            group_id: String::new(),
            group_instance_id: String::new(),
            assignment: Assignment::Leases,
            lease_interval_ms: 1000,
            stall_seconds: 60,
            assign_all: false,
            assign_index: 0,
            assign_replicas: 1,
            batch_size: 2000,
            batch_wait_ms: 50,
            max_retries: 5,
            retry_backoff_ms: 100,
            max_backoff_ms: 5000,
            session_timeout_ms: 10_000,
            max_poll_interval_ms: 300_000,
            lag_interval_ms: 5000,
            run_migrations: true,
            shutdown_grace: 30,
        }
    }
}

/// How a replica gets its partitions (`consumer.assignment`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Assignment {
    Leases,
    Group,
    Static,
}

impl std::str::FromStr for Assignment {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "leases" => Ok(Self::Leases),
            "group" => Ok(Self::Group),
            "static" => Ok(Self::Static),
            other => Err(format!("{other:?} is not leases, group or static")),
        }
    }
}

impl ConsumerConfig {
    /// How this replica gets its partitions: `assignAll: true` is `static`
    /// whatever `assignment` says (it predates the key).
    pub fn assignment(&self) -> Assignment {
        if self.consumer.assign_all {
            Assignment::Static
        } else {
            self.consumer.assignment
        }
    }

    pub fn lease_interval(&self) -> Duration {
        Duration::from_millis(self.consumer.lease_interval_ms)
    }

    /// Reads `path` (if given), then applies `CARACAL_*` environment overrides.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut config: Self = caracal_service_kit::config::read_yaml(path)?;
        config.apply_env(|name| std::env::var(name).ok())?;
        config.validate()?;
        Ok(config)
    }

    /// Applies overrides; `lookup` is `std::env::var` in production, a map in tests.
    pub fn apply_env(
        &mut self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        let env = EnvOverrides::new(lookup);
        self.database.apply_env(&env)?;
        self.kafka.apply_env(&env)?;
        self.tracing.apply_env(&env)?;
        let c = &mut self.consumer;
        env.parse("CARACAL_CONSUMER_HTTP_ADDR", &mut c.http_addr)?;
        env.text("CARACAL_CONSUMER_GROUP_ID", &mut c.group_id);
        env.text(
            "CARACAL_CONSUMER_GROUP_INSTANCE_ID",
            &mut c.group_instance_id,
        );
        env.parse("CARACAL_CONSUMER_ASSIGNMENT", &mut c.assignment)?;
        env.parse(
            "CARACAL_CONSUMER_LEASE_INTERVAL_MS",
            &mut c.lease_interval_ms,
        )?;
        env.parse("CARACAL_CONSUMER_STALL_SECONDS", &mut c.stall_seconds)?;
        env.parse("CARACAL_CONSUMER_ASSIGN_ALL", &mut c.assign_all)?;
        env.parse("CARACAL_CONSUMER_ASSIGN_INDEX", &mut c.assign_index)?;
        env.parse("CARACAL_CONSUMER_ASSIGN_REPLICAS", &mut c.assign_replicas)?;
        env.parse("CARACAL_CONSUMER_BATCH_SIZE", &mut c.batch_size)?;
        env.parse("CARACAL_CONSUMER_BATCH_WAIT_MS", &mut c.batch_wait_ms)?;
        env.parse("CARACAL_CONSUMER_MAX_RETRIES", &mut c.max_retries)?;
        env.parse("CARACAL_CONSUMER_RETRY_BACKOFF_MS", &mut c.retry_backoff_ms)?;
        env.parse("CARACAL_CONSUMER_MAX_BACKOFF_MS", &mut c.max_backoff_ms)?;
        env.parse(
            "CARACAL_CONSUMER_SESSION_TIMEOUT_MS",
            &mut c.session_timeout_ms,
        )?;
        env.parse(
            "CARACAL_CONSUMER_MAX_POLL_INTERVAL_MS",
            &mut c.max_poll_interval_ms,
        )?;
        env.parse("CARACAL_CONSUMER_LAG_INTERVAL_MS", &mut c.lag_interval_ms)?;
        env.parse("CARACAL_CONSUMER_RUN_MIGRATIONS", &mut c.run_migrations)?;
        env.parse("CARACAL_CONSUMER_SHUTDOWN_GRACE", &mut c.shutdown_grace)?;
        let a = &mut self.audit;
        env.parse("CARACAL_AUDIT_RETENTION_DAYS", &mut a.retention_days)?;
        env.parse("CARACAL_AUDIT_RETENTION_BATCH", &mut a.retention_batch)?;
        let r = &mut self.redis;
        env.text("CARACAL_REDIS_URL", &mut r.url);
        env.parse("CARACAL_REDIS_MODE", &mut r.mode)?;
        let mut nodes = String::new();
        env.text("CARACAL_REDIS_NODES", &mut nodes);
        if !nodes.is_empty() {
            r.nodes = caracal_service_kit::redis::parse_nodes(&nodes);
        }
        env.text("CARACAL_REDIS_KEY_PREFIX", &mut r.key_prefix);
        env.parse("CARACAL_REDIS_TIMEOUT_MS", &mut r.timeout_ms)?;
        env.text("CARACAL_REDIS_CA_FILE", &mut r.ca_file);
        env.text("CARACAL_REDIS_CERT_FILE", &mut r.cert_file);
        env.text("CARACAL_REDIS_KEY_FILE", &mut r.key_file);
        let g = &mut self.aggregator;
        env.parse(
            "CARACAL_AGGREGATOR_UPKEEP_INTERVAL_MS",
            &mut g.upkeep_interval_ms,
        )?;
        env.parse("CARACAL_AGGREGATOR_TOP_AGENTS", &mut g.top_agents)?;
        let m = &mut self.ledger_writer.merkle;
        env.parse("CARACAL_LEDGER_WRITER_MERKLE_ENABLED", &mut m.enabled)?;
        env.parse(
            "CARACAL_LEDGER_WRITER_MERKLE_BATCH_SIZE_LIMIT",
            &mut m.batch_size_limit,
        )?;
        env.parse(
            "CARACAL_LEDGER_WRITER_MERKLE_BATCH_TIMEOUT_SECONDS",
            &mut m.batch_timeout_seconds,
        )?;
        env.text("CARACAL_LEDGER_WRITER_MERKLE_ORIGIN", &mut m.origin);
        env.parse("CARACAL_LEDGER_WRITER_MERKLE_KEY_DIR", &mut m.key_dir)?;
        env.parse(
            "CARACAL_LEDGER_WRITER_MERKLE_KEY_PASSPHRASE_FILE",
            &mut m.key_passphrase_file,
        )?;
        env.parse(
            "CARACAL_LEDGER_WRITER_MERKLE_SELF_CHECK_INTERVAL_SECONDS",
            &mut m.self_check_interval_seconds,
        )?;
        Ok(())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.database.validate()?;
        self.kafka.validate()?;
        self.tracing.validate()?;
        let c = &self.consumer;
        if c.batch_size == 0 || c.retry_backoff_ms == 0 || c.lag_interval_ms == 0 {
            return Err(ConfigError::Invalid(
                "consumer.batchSize, retryBackoffMs and lagIntervalMs must be at least 1"
                    .to_owned(),
            ));
        }
        // One multi-row INSERT per batch; keep it well inside what one statement should carry.
        if c.batch_size > 50_000 {
            return Err(ConfigError::Invalid(
                "consumer.batchSize must be at most 50000".to_owned(),
            ));
        }
        if c.max_poll_interval_ms < c.session_timeout_ms {
            return Err(ConfigError::Invalid(
                "consumer.maxPollIntervalMs must be at least sessionTimeoutMs".to_owned(),
            ));
        }
        if c.assign_replicas == 0 || c.assign_index >= c.assign_replicas {
            return Err(ConfigError::Invalid(format!(
                "consumer.assignIndex ({}) must be below consumer.assignReplicas ({}, at least 1)",
                c.assign_index, c.assign_replicas
            )));
        }
        if c.lease_interval_ms < 100 || c.stall_seconds == 0 {
            return Err(ConfigError::Invalid(
                "consumer.leaseIntervalMs must be at least 100 and consumer.stallSeconds at least 1"
                    .to_owned(),
            ));
        }
        if c.max_backoff_ms < c.retry_backoff_ms {
            return Err(ConfigError::Invalid(
                "consumer.maxBackoffMs must be at least retryBackoffMs".to_owned(),
            ));
        }
        if self.audit.retention_days == 0 || self.audit.retention_batch == 0 {
            return Err(ConfigError::Invalid(
                "audit.retentionDays and audit.retentionBatch must be at least 1".to_owned(),
            ));
        }
        self.validate_aggregator()?;
        self.ledger_writer
            .merkle
            .validate()
            .map_err(ConfigError::Invalid)?;
        if self.kafka.brokers.is_empty()
            || self.kafka.metering_topic.is_empty()
            || self.kafka.dlq_topic.is_empty()
        {
            return Err(ConfigError::Invalid(
                "kafka.brokers, kafka.meteringTopic and kafka.dlqTopic are required".to_owned(),
            ));
        }
        Ok(())
    }

    fn validate_aggregator(&self) -> Result<(), ConfigError> {
        let r = &self.redis;
        // Schemes, seeds, the CA file's rediss:// (and a zero timeout).
        r.endpoint()
            .validate()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        caracal_service_kit::redis::check_key_prefix(&r.key_prefix)
            .map_err(ConfigError::Invalid)?;
        let g = &self.aggregator;
        if g.upkeep_interval_ms < 100 || g.top_agents > 1000 {
            return Err(ConfigError::Invalid(
                "aggregator.upkeepIntervalMs must be at least 100 and aggregator.topAgents at most 1000"
                    .to_owned(),
            ));
        }
        if self.kafka.decisions_topic.is_empty() {
            return Err(ConfigError::Invalid(
                "kafka.decisionsTopic is required (spending anomalies go there)".to_owned(),
            ));
        }
        Ok(())
    }

    /// The group id, or `default` when none is configured.
    pub fn group_id(&self, default: &str) -> String {
        if self.consumer.group_id.is_empty() {
            default.to_owned()
        } else {
            self.consumer.group_id.clone()
        }
    }

    pub fn batch_wait(&self) -> Duration {
        Duration::from_millis(self.consumer.batch_wait_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn shipped_example_config_is_valid() {
        let c: ConsumerConfig =
            caracal_service_kit::config::from_yaml(include_str!("../config.example.yaml")).unwrap();
        c.validate().unwrap();
        assert_eq!(c.consumer.batch_size, 2000);
        assert_eq!(c.kafka.dlq_topic, "caracal.dlq");
        assert_eq!(c.audit.retention_days, 2555);
        assert_eq!(c.redis.key_prefix, "caracal");
        assert_eq!(c.aggregator.top_agents, 100);
    }

    /// The consumers' ConfigMap in the Kubernetes manifests parses and validates.
    #[test]
    fn the_shipped_kubernetes_config_parses_and_validates() {
        let manifests = include_str!("../../k8s/base/consumers.yaml");
        let text = manifests
            .split("\n---")
            .filter_map(|doc| serde_yaml::from_str::<serde_yaml::Value>(doc).ok())
            .find_map(|doc| doc["data"]["consumers.yaml"].as_str().map(str::to_owned))
            .expect("the caracal-consumers-config ConfigMap");
        let mut c: ConsumerConfig = caracal_service_kit::config::from_yaml(&text).unwrap();
        c.database.url = "postgres://u@db/caracal".to_owned();
        c.kafka.sasl_password = "placeholder".to_owned();
        c.redis.nodes = vec!["rediss://10.0.0.1:6379".to_owned()];
        if let Err(e) = c.validate() {
            panic!("{e}");
        }
        assert!(!c.tracing.enabled);
        assert_eq!(c.tracing.endpoint, "http://otel-collector.monitoring:4317");
        assert_eq!(c.consumer.batch_size, 2000);
    }

    #[test]
    fn redis_section_and_overrides() {
        let mut c: ConsumerConfig = caracal_service_kit::config::from_yaml(
            "redis:\n  url: rediss://cache:6380\n  keyPrefix: prod\naggregator:\n  topAgents: 10\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.redis.url, "rediss://cache:6380");
        assert_eq!(c.aggregator.top_agents, 10);
        let env: HashMap<&str, &str> = [
            ("CARACAL_REDIS_URL", "redis://127.0.0.1:7000"),
            ("CARACAL_AGGREGATOR_UPKEEP_INTERVAL_MS", "500"),
        ]
        .into_iter()
        .collect();
        c.apply_env(|k| env.get(k).map(|v| v.to_string())).unwrap();
        assert_eq!(c.redis.url, "redis://127.0.0.1:7000");
        assert_eq!(c.aggregator.upkeep_interval_ms, 500);
        c.validate().unwrap();
        for bad in ["http://x", ""] {
            let mut b = c.clone();
            b.redis.url = bad.to_owned();
            assert!(b.validate().is_err(), "{bad}");
        }
        let mut b = c.clone();
        b.redis.key_prefix = "a{b}".to_owned();
        assert!(b.validate().is_err());
        // A CA file only means something for TLS.
        let mut b = c.clone();
        b.redis.ca_file = "/ca.pem".to_owned();
        assert!(b.validate().is_err());
        b.redis.url = "rediss://cache:6380".to_owned();
        b.validate().unwrap();
    }

    #[test]
    fn yaml_and_env_overrides() {
        let mut c: ConsumerConfig = caracal_service_kit::config::from_yaml(
            "database:\n  url: postgres://db/x\nkafka:\n  brokers: k:1\nconsumer:\n  batchSize: 10\n",
        )
        .unwrap();
        assert_eq!(c.consumer.batch_size, 10);
        assert_eq!(c.group_id("caracal-ledger-writer"), "caracal-ledger-writer");
        let env: HashMap<&str, &str> = [
            ("CARACAL_CONSUMER_GROUP_ID", "g2"),
            ("CARACAL_KAFKA_BROKERS", "k:2"),
            ("CARACAL_DATABASE_URL", "postgres://db/y"),
            ("CARACAL_CONSUMER_HTTP_ADDR", "127.0.0.1:0"),
            ("CARACAL_AUDIT_RETENTION_DAYS", "30"),
        ]
        .into_iter()
        .collect();
        c.apply_env(|k| env.get(k).map(|v| v.to_string())).unwrap();
        assert_eq!(c.group_id("x"), "g2");
        assert_eq!(c.kafka.brokers, "k:2");
        assert_eq!(c.database.url, "postgres://db/y");
        assert_eq!(c.consumer.http_addr.port(), 0);
        assert_eq!(c.audit.retention_days, 30);
        c.validate().unwrap();
        c.consumer.batch_size = 0;
        assert!(c.validate().is_err());
        let err = c
            .apply_env(|k| (k == "CARACAL_CONSUMER_BATCH_SIZE").then(|| "lots".to_owned()))
            .unwrap_err();
        assert!(
            err.to_string().contains("CARACAL_CONSUMER_BATCH_SIZE"),
            "{err}"
        );
        assert!(caracal_service_kit::config::from_yaml::<ConsumerConfig>(
            "consumer:\n  batchSzie: 1\n"
        )
        .is_err());
    }
}
