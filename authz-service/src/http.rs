//! Plain-HTTP probes and metrics: `/health` (readiness: PostgreSQL and Redis answer),
//! `/health/live` (liveness: the process serves), `/metrics` (Prometheus text).

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Json, Router};
use diesel_async::RunQueryDsl;
use serde_json::json;

use crate::{budget::BudgetStore, db::Pool};

#[derive(Clone)]
struct Deps {
    pool: Pool,
    store: BudgetStore,
}

pub fn router(pool: Pool, store: BudgetStore) -> Router {
    Router::new()
        .route("/health", get(ready))
        .route("/health/ready", get(ready))
        .route("/health/live", get(live))
        .route("/metrics", get(metrics))
        .with_state(Deps { pool, store })
}

async fn live() -> impl IntoResponse {
    Json(json!({ "status": "ok" }))
}

async fn ready(State(deps): State<Deps>) -> impl IntoResponse {
    let database = match crate::db::conn(&deps.pool).await {
        Ok(mut conn) => diesel::sql_query("SELECT 1")
            .execute(&mut conn)
            .await
            .map(|_| "ok".to_owned())
            .unwrap_or_else(|e| format!("error: {e}")),
        Err(e) => format!("error: {e}"),
    };
    let redis = match deps.store.ping().await {
        Ok(()) => "ok".to_owned(),
        Err(e) => format!("error: {e}"),
    };
    let ok = database == "ok" && redis == "ok";
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let status = if ok { "ok" } else { "unavailable" };
    (
        code,
        Json(json!({ "status": status, "database": database, "redis": redis })),
    )
}

async fn metrics(State(deps): State<Deps>) -> impl IntoResponse {
    let state = deps.pool.state();
    // The outbox depth gauge is sampled by the relay (once a second), not here.
    metrics::gauge!(crate::metrics::DB_POOL_CONNECTIONS).set(f64::from(state.connections));
    metrics::gauge!(crate::metrics::DB_POOL_IDLE).set(f64::from(state.idle_connections));
    (
        [("content-type", "text/plain; version=0.0.4")],
        crate::metrics::render(),
    )
}
