//! Prometheus metrics, served at `/metrics`.
//!
//! Names follow the production guide's alert rules (`caracal_*`). Metrics are recorded
//! with the `metrics` facade; one process-wide Prometheus recorder renders them.

/// Admin API calls, labelled `method` and `code` (gRPC code name).
pub const ADMIN_REQUESTS: &str = "caracal_admin_requests_total";
/// Hot-path calls by method and status (allow | deny | ok | error); the guide's
/// HighErrorRate alert reads `caracal_requests_total{status="error"}`.
pub const REQUESTS: &str = "caracal_requests_total";
/// Authorization decisions by decision and deny reason.
pub const DECISIONS: &str = "caracal_authorization_decisions_total";
/// Hot-path latency in seconds, labelled `method`.
pub const HOT_PATH_LATENCY: &str = "caracal_authz_request_duration_seconds";
/// Reservations by `event`: created | settled | released | expired.
pub const RESERVATIONS: &str = "caracal_reservations_total";
/// Micro-units charged above the estimate (the only overshoot allowed).
pub const OVERSHOOT_MICROS: &str = "caracal_settle_overshoot_micros_total";
/// Failed calls to the Redis budget store.
pub const REDIS_ERRORS: &str = "caracal_redis_errors_total";
/// Failures to obtain or use a PostgreSQL connection.
pub const DB_ERRORS: &str = "caracal_db_errors_total";
/// PostgreSQL connections open in the pool (sampled at scrape time).
pub const DB_POOL_CONNECTIONS: &str = "caracal_db_pool_connections";
/// Idle PostgreSQL connections in the pool (sampled at scrape time).
pub const DB_POOL_IDLE: &str = "caracal_db_pool_idle_connections";

/// Installs the process-wide recorder (once; tests start several servers per
/// process) and describes this service's metrics.
pub fn init() {
    static DESCRIBED: std::sync::Once = std::sync::Once::new();
    if caracal_service_kit::metrics::init() {
        DESCRIBED.call_once(describe);
    }
}

fn describe() {
    metrics::describe_counter!(ADMIN_REQUESTS, "Admin API calls by method and gRPC code");
    metrics::describe_counter!(
        DB_ERRORS,
        "Failures to obtain or use a PostgreSQL connection"
    );
    metrics::describe_gauge!(
        DB_POOL_CONNECTIONS,
        "PostgreSQL connections open in the pool"
    );
    metrics::describe_gauge!(DB_POOL_IDLE, "Idle PostgreSQL connections in the pool");
    metrics::describe_counter!(REQUESTS, "Hot-path calls by method and status");
    metrics::describe_counter!(DECISIONS, "Authorization decisions by decision and reason");
    metrics::describe_histogram!(HOT_PATH_LATENCY, metrics::Unit::Seconds, "Hot-path latency");
    metrics::describe_counter!(
        RESERVATIONS,
        "Reservations created, settled, released, expired"
    );
    metrics::describe_counter!(OVERSHOOT_MICROS, "Micro-units settled above their estimate");
    metrics::describe_counter!(REDIS_ERRORS, "Failed calls to the Redis budget store");
    metrics::counter!(DB_ERRORS).absolute(0);
    metrics::counter!(REDIS_ERRORS).absolute(0);
    metrics::counter!(OVERSHOOT_MICROS).increment(0);
    // Counted by `merkle verify-range` (MerkleService) when it finds a mismatch.
    metrics::counter!(caracal_merkle_log::metric::VERIFICATION_FAILURES).increment(0);
}

pub use caracal_service_kit::metrics::render;

// The hot path's labelled metrics go through per-thread handles: the `metrics`
// macros build and hash a key on every call when label values are not literals
// (measured: ~2 % of the service's CPU per Authorize + Settle).
thread_local! {
    static COUNTERS: std::cell::RefCell<
        std::collections::HashMap<(&'static str, &'static str, &'static str), metrics::Counter>,
    > = std::cell::RefCell::default();
    static HISTOGRAMS: std::cell::RefCell<
        std::collections::HashMap<(&'static str, &'static str), metrics::Histogram>,
    > = std::cell::RefCell::default();
}

/// Adds 1 to `name{k1=v1}` (`k2` empty) or `name{k1=v1,k2=v2}`. The label names of
/// one metric name must always be the same (they are not part of the cache key).
pub fn count(
    name: &'static str,
    (k1, v1): (&'static str, &'static str),
    (k2, v2): (&'static str, &'static str),
) {
    COUNTERS.with(|c| {
        let Ok(mut c) = c.try_borrow_mut() else {
            return;
        };
        c.entry((name, v1, v2))
            .or_insert_with(|| {
                if k2.is_empty() {
                    metrics::counter!(name, k1 => v1)
                } else {
                    metrics::counter!(name, k1 => v1, k2 => v2)
                }
            })
            .increment(1);
    });
}

/// Records `value` in histogram `name{k=v}`.
pub fn record(name: &'static str, (k, v): (&'static str, &'static str), value: f64) {
    HISTOGRAMS.with(|h| {
        let Ok(mut h) = h.try_borrow_mut() else {
            return;
        };
        h.entry((name, v))
            .or_insert_with(|| metrics::histogram!(name, k => v))
            .record(value);
    });
}
