//! PostgreSQL access: the connection pool, embedded migrations and the schema.

use std::time::Duration;

use diesel_async::{
    async_connection_wrapper::AsyncConnectionWrapper,
    pooled_connection::{bb8, AsyncDieselConnectionManager, ManagerConfig},
    AsyncPgConnection,
};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

use crate::{config::DatabaseConfig, error::ServiceError};

pub mod schema;
pub mod tls;

/// The migrations under `migrations/` at the repository root, compiled in so a
/// deployed binary can bring its database up to date (`caracal-authz-service migrate`).
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../migrations");

pub type Pool = bb8::Pool<AsyncPgConnection>;
pub type Conn<'a> = bb8::PooledConnection<'a, AsyncPgConnection>;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot connect to PostgreSQL: {0}")]
    Connect(String),
    #[error("migration failed: {0}")]
    Migration(String),
}

/// Builds the pool. `dbPoolSize` connections are kept (min idle) and up to
/// `dbMaxOverflow` more are opened under load, the same meaning the keys had in the
/// original deployment; `dbPoolTimeout` bounds the wait for a free connection.
pub async fn connect(config: &DatabaseConfig) -> Result<Pool, DbError> {
    let mut setup = ManagerConfig::<AsyncPgConnection>::default();
    setup.custom_setup = Box::new(|url| Box::pin(tls::establish(url)));
    let manager = AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(
        config.url.clone(),
        setup,
    );
    bb8::Pool::builder()
        .max_size(config.db_pool_size + config.db_max_overflow)
        .min_idle(Some(config.db_pool_size))
        .connection_timeout(Duration::from_secs(config.db_pool_timeout))
        .build(manager)
        .await
        .map_err(|e| DbError::Connect(e.to_string()))
}

/// Applies pending migrations. Runs on a blocking thread because diesel's migration
/// harness is synchronous.
pub async fn run_migrations(url: &str) -> Result<Vec<String>, DbError> {
    let url = url.to_owned();
    tokio::task::spawn_blocking(move || {
        // The same TLS handling as the pool: connect async, then wrap for the
        // synchronous migration harness.
        let handle = tokio::runtime::Handle::current();
        let conn = handle
            .block_on(tls::establish(&url))
            .map_err(|e| DbError::Connect(e.to_string()))?;
        let mut conn = AsyncConnectionWrapper::<AsyncPgConnection>::from(conn);
        let applied = conn
            .run_pending_migrations(MIGRATIONS)
            .map_err(|e| DbError::Migration(e.to_string()))?;
        Ok(applied.iter().map(|m| m.to_string()).collect())
    })
    .await
    .map_err(|e| DbError::Migration(e.to_string()))?
}

/// A pooled connection, or UNAVAILABLE when the database is down or the pool is
/// exhausted for longer than `dbPoolTimeout`.
pub async fn conn(pool: &Pool) -> Result<Conn<'_>, ServiceError> {
    pool.get().await.map_err(|e| {
        metrics::counter!(crate::metrics::DB_ERRORS).increment(1);
        ServiceError::Unavailable(format!("database unavailable: {e}"))
    })
}
