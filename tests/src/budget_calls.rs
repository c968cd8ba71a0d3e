//! Budget calls as the recovery tests make them over gRPC: Authorize, Settle, and
//! waiting for their charges in the ledger.

use std::time::Duration;

use caracal_proto::v1 as pb;

use crate::{authorize_request, charges::wait_for_ledger_rows, GatewaySvc, TestStack};

/// The gateway's client of the hot path.
pub type Authz = pb::budget_authorization_client::BudgetAuthorizationClient<GatewaySvc>;

/// `micros` US dollars.
pub fn usd(micros: i64) -> pb::Money {
    pb::Money {
        currency: "USD".into(),
        micros,
        amount: String::new(),
    }
}

/// One Authorize of `key` with an estimate of `micros` (USD).
pub async fn authorize(
    authz: &mut Authz,
    key: &str,
    request_id: &str,
    micros: i64,
) -> Result<pb::AuthorizeResponse, tonic::Status> {
    authz
        .authorize(authorize_request(key, request_id, micros))
        .await
        .map(tonic::Response::into_inner)
}

pub fn allowed(r: &pb::AuthorizeResponse) -> bool {
    r.decision == pb::Decision::Allow as i32
}

/// A Settle of `reservation_id` costing `actual` micros (USD).
pub fn settle_request(reservation_id: &str, actual: i64) -> pb::SettleRequest {
    pb::SettleRequest {
        reservation_id: reservation_id.into(),
        actual_cost: Some(usd(actual)),
        ..Default::default()
    }
}

/// Authorize + Settle, both answered (panics otherwise); returns the reservation id.
pub async fn spend(
    authz: &mut Authz,
    key: &str,
    request_id: &str,
    estimate: i64,
    actual: i64,
) -> String {
    let r = authorize(authz, key, request_id, estimate).await.unwrap();
    assert!(allowed(&r), "{request_id}: {r:?}");
    authz
        .settle(settle_request(&r.reservation_id, actual))
        .await
        .unwrap();
    r.reservation_id
}

/// Waits (bounded) until the ledger holds `rows` rows, asserts it holds exactly
/// that many, and returns their sum.
pub async fn ledger_reaches(stack: &TestStack, rows: i64) -> i64 {
    let t = wait_for_ledger_rows(&stack.database_url, rows, Duration::from_secs(60)).await;
    assert_eq!(t.rows, rows, "the ledger's rows against the charges made");
    t.charged
}
