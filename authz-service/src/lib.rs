//! Caracal budget-authorization service.
//!
//! This first half serves the administration API: agents and their API keys, budget
//! policies with version history, allowlists and the price book, all on PostgreSQL.
//! It also serves the authorization hot path (Authorize / Settle / Release on Redis)
//! and relays every decision and charge to Kafka through a Redis-stream outbox.
//!
//! Reading order:
//! - [`config`]: the guide's configuration keys, from a YAML file plus `CARACAL_*` overrides.
//! - [`db`]: the PostgreSQL pool, embedded migrations and the diesel schema.
//! - [`error`]: one error type, mapped to the gRPC status a caller can act on.
//! - [`auth`]: who may call the admin API (admin token or client certificate).
//! - [`admin`]: the admin gRPC services; [`admin_events`]: their change events
//!   (PostgreSQL outbox, relayed to Kafka).
//! - [`authorize`]: the hot path — Authorize, Settle, Release — over [`catalog`]
//!   (cached agents, policies, prices) and [`budget`] (Redis state, Lua scripts).
//! - [`sweeper`]: expiry of reservations that were never settled.
//! - [`cluster_watch`]: Redis Cluster state, topology and redirection gauges.
//! - [`dlq_monitor`]: the dead-letter queue's gauges (`caracal_dlq_size`, ...);
//!   listing and replaying dead letters is [`admin`]'s `DeadLetterService`.
//! - [`outbox`] and [`kafka`]: the relay of budget events from Redis to Kafka.
//! - [`reconcile_monitor`]: the ledger-vs-counters drift gauges.
//! - [`keys`]: agent API keys: generation and keyed hashing.
//! - [`http`] and [`metrics`]: `/health`, `/metrics` and the Prometheus registry.
//! - [`server`]: wires everything into one running server.

pub mod admin;
pub mod admin_events;
pub mod auth;
pub mod authorize;
pub mod budget;
pub mod catalog;
pub mod cluster_watch;
pub mod config;
pub mod convert;
pub mod db;
pub mod dlq_monitor;
pub mod error;
pub mod ext_authz;
pub mod http;
pub mod kafka;
pub mod keys;
pub mod metrics;
pub mod outbox;
pub mod reconcile_monitor;
pub mod server;
pub mod sweeper;

pub use config::Config;
pub use error::ServiceError;
pub use server::{serve, RunningServer};
