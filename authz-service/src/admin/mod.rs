//! The admin gRPC services. Each call validates its input completely before it
//! writes, and writes in one transaction, so a refused call leaves nothing behind.
//! Every write ends with [`commit_change`]: the config epoch bump and the change's
//! events ([`crate::admin_events`]), in that same transaction.

use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use crate::{admin_events::AdminEvent, db::Pool, error::ServiceResult};

pub mod agents;
pub mod allowlist;
pub mod counters;
pub mod dlq;
pub mod ledger;
pub mod merkle;
pub mod policies;
pub mod pricebook;
pub mod snapshot;
pub mod spend;

pub use agents::AgentAdmin;
pub use allowlist::AllowlistAdmin;
pub use dlq::DeadLetterAdmin;
pub use ledger::LedgerAdmin;
pub use merkle::MerkleAdmin;
pub use policies::PolicyAdmin;
pub use pricebook::PriceBookAdmin;
pub use snapshot::SnapshotAdmin;
pub use spend::SpendAdmin;

/// What every admin service needs.
#[derive(Clone)]
pub struct AdminState {
    pub pool: Pool,
    pub api_key_pepper: String,
    /// Redis, for the changes that would move a policy's budget counters
    /// (re-parenting, window changes): see [`counters`].
    pub counters: counters::CounterGuard,
}

/// Marks a configuration change, in the writer's transaction. Every replica polls
/// this counter and drops its caches when it moves, so an admin change made through
/// any replica reaches all of them within one poll interval.
pub async fn bump_config_epoch(conn: &mut AsyncPgConnection) -> ServiceResult<()> {
    use crate::db::schema::config_epoch::dsl::*;
    diesel::update(config_epoch)
        .set(epoch.eq(epoch + 1))
        .execute(conn)
        .await?;
    Ok(())
}

/// The last step of every admin write, inside its transaction: bumps the config
/// epoch, then appends the change's events to the admin outbox. In this order: the
/// epoch row stays locked until the transaction commits, so outbox ids are handed
/// out in commit order and the relay, reading from the head, keeps every key's
/// events in order. A transaction that rolls back takes its events with it.
pub async fn commit_change(
    conn: &mut AsyncPgConnection,
    events: &[AdminEvent],
) -> ServiceResult<()> {
    bump_config_epoch(conn).await?;
    crate::admin_events::append(conn, events).await
}

/// Turns a handler's result into the gRPC answer and records it under
/// `caracal_admin_requests_total{method, code}`.
pub fn respond<T>(
    method: &'static str,
    result: ServiceResult<T>,
) -> Result<tonic::Response<T>, tonic::Status> {
    let result = result
        .map(tonic::Response::new)
        .map_err(tonic::Status::from);
    let code = match &result {
        Ok(_) => "OK".to_owned(),
        Err(status) => format!("{:?}", status.code()),
    };
    metrics::counter!(crate::metrics::ADMIN_REQUESTS, "method" => method, "code" => code)
        .increment(1);
    result
}

/// Runs a long admin operation (budget rebuild, snapshot create and restore) in
/// its own task, so a client hanging up or the request timeout does not cut it
/// short; answers with its result.
pub(crate) async fn detached<T: Send + 'static>(
    work: impl std::future::Future<Output = ServiceResult<T>> + Send + 'static,
) -> ServiceResult<T> {
    tokio::spawn(work)
        .await
        .map_err(|e| crate::error::ServiceError::Internal(format!("admin task: {e}")))?
}
