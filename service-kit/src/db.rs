//! PostgreSQL access shared by every process: the connection pool (with libpq's
//! `sslmode` meanings, see [`tls`]) and the embedded migrations.

use std::time::Duration;

use diesel_async::{
    async_connection_wrapper::AsyncConnectionWrapper,
    pooled_connection::{bb8, AsyncDieselConnectionManager, ManagerConfig},
    AsyncPgConnection, RunQueryDsl,
};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

use crate::config::DatabaseConfig;

pub mod tls;

/// The migrations under `migrations/` at the repository root, compiled in so a
/// deployed binary can bring its database up to date (`caracal-authz-service
/// migrate`; the consumers run them at start too).
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../migrations");

/// Session advisory lock held while migrations run: the service and the consumers
/// (and their replicas) may start at the same moment, and diesel's harness does not
/// serialise concurrent runs by itself.
const MIGRATION_LOCK: i64 = 7_368_223_502;

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

/// Applies pending migrations, one process at a time. Runs on a blocking thread
/// because diesel's migration harness is synchronous.
pub async fn run_migrations(url: &str) -> Result<Vec<String>, DbError> {
    let mut lock_conn = tls::establish(url)
        .await
        .map_err(|e| DbError::Connect(e.to_string()))?;
    diesel::sql_query(format!("SELECT pg_advisory_lock({MIGRATION_LOCK})"))
        .execute(&mut lock_conn)
        .await
        .map_err(|e| DbError::Migration(format!("taking the migration lock: {e}")))?;
    let applied = if up_to_date(&mut lock_conn).await {
        Ok(Vec::new())
    } else {
        run_harness(url.to_owned()).await
    };
    // Closing the connection would release it too; unlock explicitly so a pooled
    // wrapper of this code never keeps it.
    let _ = diesel::sql_query(format!("SELECT pg_advisory_unlock({MIGRATION_LOCK})"))
        .execute(&mut lock_conn)
        .await;
    applied
}

/// Diesel's (synchronous) harness on a blocking thread: applies what is pending.
async fn run_harness(url: String) -> Result<Vec<String>, DbError> {
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

/// Whether every embedded migration is recorded as applied. Checked before diesel's
/// harness, which starts with `CREATE TABLE IF NOT EXISTS __diesel_schema_migrations`:
/// PostgreSQL refuses that to a role without CREATE on the schema even when the table
/// exists, and the service's and consumers' own roles have none (README "Database
/// roles"; they may read the table). Any doubt (no table, an unreadable list) means
/// "run the harness", which then applies or fails as before.
async fn up_to_date(conn: &mut AsyncPgConnection) -> bool {
    use diesel::migration::MigrationSource;
    #[derive(diesel::QueryableByName)]
    struct Applied {
        #[diesel(sql_type = diesel::sql_types::Text)]
        version: String,
    }
    let Ok(applied) =
        diesel::sql_query("SELECT version::text AS version FROM __diesel_schema_migrations")
            .load::<Applied>(conn)
            .await
    else {
        return false;
    };
    let applied: std::collections::HashSet<String> =
        applied.into_iter().map(|a| a.version).collect();
    match MigrationSource::<diesel::pg::Pg>::migrations(&MIGRATIONS) {
        Ok(all) => all
            .iter()
            .all(|m| applied.contains(&m.name().version().to_string())),
        Err(_) => false,
    }
}

/// `SELECT 1` on a pooled connection, bounded by `timeout`: the readiness check.
pub async fn ping(pool: &Pool, timeout: Duration) -> Result<(), String> {
    let check = async {
        let mut conn = pool.get().await.map_err(|e| e.to_string())?;
        diesel::sql_query("SELECT 1")
            .execute(&mut conn)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    match tokio::time::timeout(timeout, check).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}
