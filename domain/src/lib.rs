//! Caracal's domain rules, with no I/O.
//!
//! Every service that touches a budget (the authorization hot path, the CLI,
//! the usage consumers) links this crate, so a rule lives here exactly once
//! and all of them agree on it. Nothing here reads the clock, the network or
//! a database: callers pass the current instant and the current counters in,
//! which keeps each rule a pure function that can be tested exhaustively.
//!
//! | module | what it decides |
//! | --- | --- |
//! | [`money`] | amounts as integer micro-units, ISO-4217 currencies, parsing and formatting |
//! | [`window`] | calendar and rolling budget windows, their bounds, keys and rolling buckets |
//! | [`policy`] | whether a reservation fits every budget of an agent and its ancestors |
//! | [`pricing`] | what a request costs from a price book and token usage |
//! | [`allowlist`] | fully anchored glob / regex patterns for models and upstream resources |
//! | [`hierarchy`] | the bounded, acyclic agent tree |
//! | [`merkle`] | the tamper-evident ledger: RFC 9162 Merkle tree with BLAKE3, leaf encoding, signed checkpoints, proofs |
//! | [`schedule`] | cron schedules (5-field, UTC) for scheduled snapshots |
//! | [`spend`] | the Redis layout of spend history (aggregator and `SpendTrend`) and the anomaly rule |

pub mod allowlist;
pub mod hierarchy;
pub mod merkle;
pub mod money;
pub mod policy;
pub mod pricing;
pub mod schedule;
pub mod spend;
pub mod window;

pub use money::{Currency, Money, MoneyError};
pub use policy::{Decision, DenyReason, PolicyState, Remaining};
pub use window::{TimeWindow, WindowType};
