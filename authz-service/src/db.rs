//! PostgreSQL access: the connection pool, TLS and embedded migrations (shared with
//! the consumers, in [`caracal_service_kit::db`]) and this service's diesel schema.

use crate::error::ServiceError;

pub use caracal_service_kit::db::{
    connect, ping, run_migrations, tls, Conn, DbError, Pool, MIGRATIONS,
};

pub mod schema;

/// A pooled connection, or UNAVAILABLE when the database is down or the pool is
/// exhausted for longer than `dbPoolTimeout`.
pub async fn conn(pool: &Pool) -> Result<Conn<'_>, ServiceError> {
    pool.get().await.map_err(|e| {
        metrics::counter!(crate::metrics::DB_ERRORS).increment(1);
        ServiceError::Unavailable(format!("database unavailable: {e}"))
    })
}
