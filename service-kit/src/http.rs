//! Plain-HTTP probes and metrics every process serves: `/health/live` (the process
//! serves), `/health/ready` and `/health` (its dependencies answer: what that
//! means is the process's [`Probe`]), `/metrics` (Prometheus text).

use std::future::Future;

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Json, Router};
use serde_json::json;

/// What a process reports on its probes.
pub trait Probe: Clone + Send + Sync + 'static {
    /// Named checks, each `Ok` or the reason it fails; ready when all are `Ok`.
    fn checks(&self) -> impl Future<Output = Vec<(&'static str, Result<(), String>)>> + Send;

    /// Called before `/metrics` renders: a chance to sample gauges.
    fn before_scrape(&self) {}
}

/// The probe and metrics routes over `probe`.
pub fn router<P: Probe>(probe: P) -> Router {
    Router::new()
        .route("/health", get(ready::<P>))
        .route("/health/ready", get(ready::<P>))
        .route("/health/live", get(live))
        .route("/metrics", get(metrics::<P>))
        .with_state(probe)
}

async fn live() -> impl IntoResponse {
    Json(json!({ "status": "ok" }))
}

async fn ready<P: Probe>(State(probe): State<P>) -> impl IntoResponse {
    let checks = probe.checks().await;
    let ok = checks.iter().all(|(_, r)| r.is_ok());
    let mut body = serde_json::Map::new();
    body.insert(
        "status".to_owned(),
        json!(if ok { "ok" } else { "unavailable" }),
    );
    for (name, result) in checks {
        let text = match result {
            Ok(()) => "ok".to_owned(),
            Err(e) => format!("error: {e}"),
        };
        body.insert(name.to_owned(), json!(text));
    }
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(serde_json::Value::Object(body)))
}

async fn metrics<P: Probe>(State(probe): State<P>) -> impl IntoResponse {
    probe.before_scrape();
    (
        [("content-type", "text/plain; version=0.0.4")],
        crate::metrics::render(),
    )
}
