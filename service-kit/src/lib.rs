//! What every Caracal process shares: the authz-service and the Kafka consumers
//! read the same configuration keys, talk to the same PostgreSQL (and run the same
//! migrations), use the same Kafka client settings, write the same dead-letter
//! records and serve the same probes.
//!
//! Reading order:
//! - [`config`]: YAML + `CARACAL_*` environment overrides, [`config::DatabaseConfig`].
//! - [`db`]: the PostgreSQL pool, TLS (`sslmode`) and the embedded migrations.
//! - [`kafka`]: [`kafka::KafkaConfig`], client/producer/consumer settings, topic creation;
//!   [`topic_range`]: the messages of a topic in a time range (replay, budget rebuild).
//! - [`redis`]: standalone or cluster Redis connections (TLS), readiness, topology.
//! - [`snapshot`]: budget snapshots (the format, its checksum, where they are kept).
//! - [`dlq`]: the JSON envelope of a message sent to the dead-letter topic;
//!   [`dlq_admin`]: reading the dead-letter topic and replaying a dead letter once.
//! - [`http`] and [`metrics`]: `/health/live`, `/health/ready`, `/metrics`.
//! - [`process`]: the stop signal and rate-limited logging of recurring trouble.
//! - [`telemetry`]: logs and OpenTelemetry traces (W3C `traceparent` across the hops).

pub mod config;
pub mod db;
pub mod dlq;
pub mod dlq_admin;
pub mod http;
pub mod kafka;
pub mod metrics;
pub mod process;
pub mod redis;
pub mod snapshot;
pub mod telemetry;
pub mod topic_range;
