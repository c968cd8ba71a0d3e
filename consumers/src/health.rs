//! What `/health/ready` reports for a consumer, and the probe server.
//!
//! Ready means: the store answers (PostgreSQL, or the consumer's own store such as
//! the metrics-aggregator's Redis), the consumer has joined its group (it has
//! received an assignment, possibly empty when there are more replicas than
//! partitions; with partition leases: its lease session works), it is not stuck
//! retrying a batch (after `maxRetries` failed attempts it keeps retrying, but
//! reports not ready so the platform sees it), and no partition of its topics is
//! stalled (lag, and no commit for `consumer.stallSeconds`, whoever owns it).

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, OnceLock,
    },
    time::Duration,
};

use caracal_service_kit::{db::Pool, http::Probe};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

use crate::lease::Leases;

/// Bound on the readiness database check.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// A readiness check of a consumer's store other than PostgreSQL.
pub type StoreCheck =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// Shared between the consumer loop (writer) and the probes (readers).
#[derive(Default)]
pub struct HealthState {
    assigned: AtomicBool,
    leases: OnceLock<Arc<Leases>>,
    /// Partitions with lag whose committed offset stands still (see [`crate::lag`]).
    stalled: Mutex<Vec<String>>,
    waiting: Mutex<Option<String>>,
    pool: OnceLock<Pool>,
    store: OnceLock<(&'static str, StoreCheck)>,
}

impl HealthState {
    pub fn set_assigned(&self, assigned: bool) {
        self.assigned.store(assigned, Ordering::SeqCst);
    }

    /// Whether the consumer has its partitions: a group assignment (possibly
    /// empty), or with partition leases a working lease session.
    pub fn assigned(&self) -> bool {
        match self.leases.get() {
            Some(leases) => leases.session_ok(),
            None => self.assigned.load(Ordering::SeqCst),
        }
    }

    /// With partition leases: what this replica holds.
    pub fn set_leases(&self, leases: Arc<Leases>) {
        let _ = self.leases.set(leases);
    }

    pub fn leases(&self) -> Option<&Arc<Leases>> {
        self.leases.get()
    }

    /// The partitions that have lag and no commit for `consumer.stallSeconds`.
    pub fn set_stalled(&self, stalled: Vec<String>) {
        if let Ok(mut s) = self.stalled.lock() {
            *s = stalled;
        }
    }

    pub fn stalled(&self) -> Vec<String> {
        self.stalled.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// `Some(reason)`: stuck retrying (not ready); `None`: making progress.
    pub fn set_waiting(&self, reason: Option<String>) {
        if let Ok(mut w) = self.waiting.lock() {
            *w = reason;
        }
    }

    pub fn waiting(&self) -> Option<String> {
        self.waiting.lock().ok().and_then(|w| w.clone())
    }

    /// The database pool, once the consumer has connected.
    pub fn set_pool(&self, pool: Pool) {
        let _ = self.pool.set(pool);
    }

    /// For a consumer without PostgreSQL: its store's check, reported as `name`.
    pub fn set_store_check(&self, name: &'static str, check: StoreCheck) {
        let _ = self.store.set((name, check));
    }
}

#[derive(Clone)]
struct ConsumerProbe(Arc<HealthState>);

impl Probe for ConsumerProbe {
    fn checks(&self) -> impl Future<Output = Vec<(&'static str, Result<(), String>)>> + Send {
        let state = self.0.clone();
        async move {
            let store = match (state.pool.get(), state.store.get()) {
                (Some(pool), _) => (
                    "database",
                    caracal_service_kit::db::ping(pool, CHECK_TIMEOUT).await,
                ),
                (None, Some((name, check))) => (*name, check().await),
                (None, None) => ("database", Err("not connected yet".to_owned())),
            };
            let kafka = if !state.assigned() {
                Err(if let Some(leases) = state.leases() {
                    format!(
                        "no partition lease session (PostgreSQL): {}",
                        leases.last_error().unwrap_or_else(|| "starting".to_owned())
                    )
                } else {
                    "no partition assignment yet".to_owned()
                })
            } else {
                Ok(())
            };
            let stalled = state.stalled();
            let progress = if stalled.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "stalled: lag and no commit on {}",
                    stalled.join(", ")
                ))
            };
            let processing = match state.waiting() {
                None => Ok(()),
                Some(reason) => Err(format!("retrying a batch: {reason}")),
            };
            vec![
                store,
                ("kafka", kafka),
                ("processing", processing),
                ("progress", progress),
            ]
        }
    }
}

/// Serves `/health/live`, `/health/ready`, `/metrics` on `listener` until `shutdown`.
pub fn serve(
    listener: TcpListener,
    state: Arc<HealthState>,
    mut shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let app = caracal_service_kit::http::router(ConsumerProbe(state));
    tokio::spawn(async move {
        let stop = async move {
            while !*shutdown.borrow() {
                if shutdown.changed().await.is_err() {
                    break;
                }
            }
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await
        {
            tracing::warn!(error = %e, "health server stopped");
        }
    })
}

/// Binds the probe listener (port 0: a free port).
pub async fn bind(addr: SocketAddr) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}
