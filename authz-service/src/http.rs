//! Plain-HTTP probes and metrics: `/health` and `/health/ready` (readiness:
//! PostgreSQL and Redis answer), `/health/live` (liveness: the process serves),
//! `/metrics` (Prometheus text). The routes are [`caracal_service_kit::http`]'s;
//! this file says what "ready" means here.

use std::{future::Future, time::Duration};

use axum::Router;
use caracal_service_kit::http::Probe;

use crate::{budget::BudgetStore, db::Pool};

/// Bound on each readiness check.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
struct Deps {
    pool: Pool,
    store: BudgetStore,
}

impl Probe for Deps {
    fn checks(&self) -> impl Future<Output = Vec<(&'static str, Result<(), String>)>> + Send {
        let deps = self.clone();
        async move {
            let database = crate::db::ping(&deps.pool, CHECK_TIMEOUT).await;
            if database.is_err() {
                metrics::counter!(crate::metrics::DB_ERRORS).increment(1);
            }
            let redis = deps.store.ping().await.map_err(|e| e.to_string());
            vec![("database", database), ("redis", redis)]
        }
    }

    fn before_scrape(&self) {
        let state = self.pool.state();
        // The outbox depth gauge is sampled by the relay (once a second), not here.
        metrics::gauge!(crate::metrics::DB_POOL_CONNECTIONS).set(f64::from(state.connections));
        metrics::gauge!(crate::metrics::DB_POOL_IDLE).set(f64::from(state.idle_connections));
    }
}

pub fn router(pool: Pool, store: BudgetStore) -> Router {
    caracal_service_kit::http::router(Deps { pool, store })
}
