//! The ledger's Merkle log in PostgreSQL (SPEC section 5): the pure tree, leaf and
//! checkpoint code is `caracal_domain::merkle`; this crate stores and reads it.
//!
//! | module | what it does |
//! | --- | --- |
//! | [`tiles`] | where each perfect-subtree hash is stored (tiles of height 8) and reading them back |
//! | [`leaves`] | which event each leaf is: runs of up to 1024 consecutive leaves |
//! | [`rows`] | a ledger row as a leaf: the columns every path reads, one conversion |
//! | [`sequencer`] | one sequencing transaction: queue -> leaf indices, tiles, checkpoints |
//! | [`keys`] | the signing key on disk (the sequencer only), public keys in `merkle_keys` |
//! | [`checkpoints`] | the published signed checkpoints |
//! | [`proofs`] | inclusion and consistency proofs, proof files, leaf export |
//! | [`verify`] | `verify-range`: recompute leaves from the current rows, check them against the signed checkpoints |
//! | [`service`] | the sequencer task: one leader by advisory lock, the checkpoint timer, the self-check, metrics |
//! | [`config`] | `ledgerWriter.merkle.*` |
//!
//! Tables: migrations `2026-12-05-400000_merkle_log` and `2026-12-07-100000_merkle_leaf_runs`.

pub mod checkpoints;
pub mod config;
pub mod keys;
pub mod leaves;
pub mod proofs;
pub mod rows;
pub mod sequencer;
pub mod service;
pub mod tiles;
pub mod verify;

pub use config::MerkleConfig;

/// What can go wrong reading or writing the log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("database: {0}")]
    Db(#[from] diesel::result::Error),
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("the stored tree is inconsistent: {0}")]
    Corrupt(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("key: {0}")]
    Key(String),
}

/// Metric names (the guide's "Merkle metrics").
pub mod metric {
    /// Counter: every mismatch `verify-range` or the self-check found (alert
    /// `MerkleVerificationFailure`).
    pub const VERIFICATION_FAILURES: &str = "caracal_merkle_verification_failures_total";
    /// Histogram: leaves per sequencing transaction.
    pub const BATCH_SIZE: &str = "caracal_merkle_batch_size";
    /// Histogram: seconds per sequencing transaction (read queue .. commit).
    pub const BATCH_SECONDS: &str = "caracal_merkle_batch_processing_seconds";
    /// Histogram: seconds to sign one checkpoint.
    pub const SIGNING_SECONDS: &str = "caracal_merkle_signing_seconds";
    /// Gauge: leaves in the log.
    pub const TREE_SIZE: &str = "caracal_merkle_tree_size";
    /// Gauge: seconds since the newest checkpoint was published.
    pub const CHECKPOINT_AGE: &str = "caracal_merkle_checkpoint_age_seconds";
    /// Gauge: ledger rows waiting for a leaf index.
    pub const QUEUE_DEPTH: &str = "caracal_merkle_queue_depth";
    /// Gauge: 1 on the replica that holds the sequencer lock.
    pub const LEADER: &str = "caracal_merkle_sequencer_leader";
    /// Counter: sequencing transactions that failed (retried).
    pub const ERRORS: &str = "caracal_merkle_sequencer_errors_total";
}
