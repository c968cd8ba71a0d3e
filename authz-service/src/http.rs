//! Plain-HTTP probes and metrics: `/health` (readiness: the database answers),
//! `/health/live` (liveness: the process serves), `/metrics` (Prometheus text).

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Json, Router};
use diesel_async::RunQueryDsl;
use serde_json::json;

use crate::db::Pool;

pub fn router(pool: Pool) -> Router {
    Router::new()
        .route("/health", get(ready))
        .route("/health/ready", get(ready))
        .route("/health/live", get(live))
        .route("/metrics", get(metrics))
        .with_state(pool)
}

async fn live() -> impl IntoResponse {
    Json(json!({ "status": "ok" }))
}

async fn ready(State(pool): State<Pool>) -> impl IntoResponse {
    let database = match crate::db::conn(&pool).await {
        Ok(mut conn) => diesel::sql_query("SELECT 1")
            .execute(&mut conn)
            .await
            .map(|_| "ok".to_owned())
            .unwrap_or_else(|e| format!("error: {e}")),
        Err(e) => format!("error: {e}"),
    };
    let ok = database == "ok";
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let status = if ok { "ok" } else { "unavailable" };
    (
        code,
        Json(json!({ "status": status, "database": database })),
    )
}

async fn metrics(State(pool): State<Pool>) -> impl IntoResponse {
    let state = pool.state();
    metrics::gauge!(crate::metrics::DB_POOL_CONNECTIONS).set(f64::from(state.connections));
    metrics::gauge!(crate::metrics::DB_POOL_IDLE).set(f64::from(state.idle_connections));
    (
        [("content-type", "text/plain; version=0.0.4")],
        crate::metrics::render(),
    )
}
