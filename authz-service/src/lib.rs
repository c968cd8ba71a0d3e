//! Caracal budget-authorization service.
//!
//! This first half serves the administration API: agents and their API keys, budget
//! policies with version history, allowlists and the price book, all on PostgreSQL.
//! The authorization hot path (Authorize / Settle / Release on Redis) builds on it.
//!
//! Reading order:
//! - [`config`]: the guide's configuration keys, from a YAML file plus `CARACAL_*` overrides.
//! - [`db`]: the PostgreSQL pool, embedded migrations and the diesel schema.
//! - [`error`]: one error type, mapped to the gRPC status a caller can act on.
//! - [`auth`]: who may call the admin API (admin token or client certificate).
//! - [`admin`]: the admin gRPC services.
//! - [`keys`]: agent API keys: generation and keyed hashing.
//! - [`http`] and [`metrics`]: `/health`, `/metrics` and the Prometheus registry.
//! - [`server`]: wires everything into one running server.

pub mod admin;
pub mod auth;
pub mod config;
pub mod convert;
pub mod db;
pub mod error;
pub mod http;
pub mod keys;
pub mod metrics;
pub mod server;

pub use config::Config;
pub use error::ServiceError;
pub use server::{serve, RunningServer};
