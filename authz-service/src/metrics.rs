//! Prometheus metrics, served at `/metrics`.
//!
//! Names follow the production guide's alert rules (`caracal_*`). Metrics are recorded
//! with the `metrics` facade; one process-wide Prometheus recorder renders them.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

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

/// Latency buckets: the hot path lives in the sub-millisecond range, admin calls in
/// the tens of milliseconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide recorder once (tests start several servers per process).
pub fn init() {
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), LATENCY_BUCKETS);
        let recorder = match builder {
            Ok(b) => b.build_recorder(),
            Err(e) => {
                tracing::warn!(error = %e, "invalid histogram buckets; using defaults");
                PrometheusBuilder::new().build_recorder()
            }
        };
        let handle = recorder.handle();
        match metrics::set_global_recorder(recorder) {
            Ok(()) => {
                describe();
                Some(handle)
            }
            Err(e) => {
                tracing::warn!(error = %e, "a metrics recorder is already installed");
                None
            }
        }
    });
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
}

/// Text exposition of every metric recorded so far.
pub fn render() -> String {
    HANDLE
        .get()
        .and_then(Option::as_ref)
        .map(PrometheusHandle::render)
        .unwrap_or_default()
}
