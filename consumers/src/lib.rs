//! Kafka consumers of Caracal's events, each its own consumer group and separately
//! deployable (`caracal-consumers <consumer>`).
//!
//! Reading order:
//! - [`config`]: the consumers' configuration (`database`, `kafka`, `consumer`,
//!   `audit`, `redis`, `aggregator`), YAML + `CARACAL_*` overrides like the service.
//! - [`runner`]: the consumer loop every consumer shares: batches per poll, manual
//!   commits only after the batch is durable, dead letters, retries that wait
//!   rather than skip, graceful shutdown.
//! - [`launch`]: starting a consumer the same way for all: probes, database,
//!   group, upkeep job, lag sampler, loop.
//! - [`lease`]: which replica reads which partition: PostgreSQL advisory locks,
//!   no Kafka group protocol (a dead replica's partitions move on at once).
//! - [`lag`]: `kafka_consumer_lag{topic,partition,group}` and stalled partitions,
//!   sampled.
//! - [`health`]: `/health/live`, `/health/ready`, `/metrics`.
//! - [`metrics`]: metric names.
//! - [`ledger`]: the ledger-writer: `caracal.metering.events` -> `ledger_events`.
//! - [`audit`]: the audit-logger: every topic -> append-only `audit_logs`, and
//!   its retention job.
//! - [`aggregator`]: the metrics-aggregator: `caracal.metering.events` -> spend
//!   per agent / model / hour / day in Redis, spend gauges, spending anomalies.
//! - [`pg_batch`]: the batch write and reachability check of the PostgreSQL consumers.
//! - [`replay`]: a time range of the metering topic (or a region's mirror of it)
//!   read again into the ledger, idempotently; and checking the ledger holds it.
//! - [`cli`]: the `caracal-consumers` command line.

pub mod aggregator;
pub mod audit;
pub mod cli;
pub mod config;
pub mod health;
pub mod lag;
pub mod launch;
pub mod lease;
pub mod ledger;
pub mod metrics;
pub mod pg_batch;
pub mod replay;
pub mod runner;

pub use config::ConsumerConfig;
