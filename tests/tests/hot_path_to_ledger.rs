//! What the hot path hands the ledger, against a real authz-service, Redis and
//! PostgreSQL (no Kafka: the charge events the budget scripts wrote to the outbox
//! are converted as the relay converts them and written by the ledger-writer's own
//! `decode` + `insert_rows`).
//!
//! - A request id used again after its reservation's done marker aged out
//!   (`budget.finishedMarkerTtl`) is a new reservation with new reservation and
//!   event ids: both charges stay in `ledger_final_charges`; retries within a
//!   marker's life stay no-ops, and an id of the earlier reservation never
//!   finishes the later one.
//! - Text the ledger would refuse (provider or model over 200 bytes, NUL) is
//!   refused by Authorize and by the price book; what they accept, the ledger
//!   accepts.

use std::collections::HashMap;

use caracal_authz::budget::{keys::partition_of_reservation, KeySpace};
use caracal_consumers::ledger::{insert_rows, LedgerRow};
use caracal_proto::v1 as pb;
use caracal_tests::{authorize_request, TestStack};
use diesel_async::RunQueryDsl;
use tonic::Code;

fn usd(micros: i64) -> pb::Money {
    pb::Money {
        currency: "USD".into(),
        micros,
        amount: String::new(),
    }
}

fn allowed(r: &pb::AuthorizeResponse) -> bool {
    r.decision == pb::Decision::Allow as i32
}

fn remaining_of(r: &pb::AuthorizeResponse, policy: &str) -> i64 {
    r.remaining
        .iter()
        .find(|p| p.policy_id == policy)
        .and_then(|p| p.remaining.as_ref())
        .map(|m| m.micros)
        .unwrap()
}

async fn redis(stack: &TestStack) -> redis::aio::MultiplexedConnection {
    redis::Client::open(stack.redis.url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Every entry of the stack's outbox streams (see [`TestStack::outbox_entries`]).
async fn outbox_entries(stack: &TestStack) -> Vec<(u16, HashMap<String, String>)> {
    stack.outbox_entries().await.unwrap()
}

/// The outbox's charge events as the ledger-writer decodes them: a row, or the
/// reason it would dead-letter the event.
async fn ledger_view_of_charges(stack: &TestStack) -> Vec<Result<LedgerRow, String>> {
    stack.outbox_charges().await.unwrap()
}

#[derive(diesel::QueryableByName, Debug, PartialEq, Eq)]
struct Final {
    #[diesel(sql_type = diesel::sql_types::Text)]
    reservation_id: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    event_id: String,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    charged_micros: i64,
    #[diesel(sql_type = diesel::sql_types::Text)]
    model: String,
}

/// Writes `rows` into the ledger and returns the final charges of `request_id`
/// (the view every total reads), oldest first.
async fn final_charges(stack: &TestStack, rows: &[LedgerRow], request_id: &str) -> Vec<Final> {
    let mut conn = stack.db().await.unwrap();
    insert_rows(&mut conn, rows).await.unwrap();
    diesel::sql_query(
        "SELECT reservation_id, event_id, charged_micros, model FROM ledger_final_charges \
         WHERE request_id = $1 ORDER BY occurred_at, event_id",
    )
    .bind::<diesel::sql_types::Text, _>(request_id)
    .load(&mut conn)
    .await
    .unwrap()
}

async fn settle(
    authz: &mut caracal_proto::v1::budget_authorization_client::BudgetAuthorizationClient<
        caracal_tests::GatewaySvc,
    >,
    reservation_id: &str,
    micros: i64,
) -> Result<pb::SettleResponse, tonic::Status> {
    authz
        .settle(pb::SettleRequest {
            reservation_id: reservation_id.into(),
            actual_cost: Some(usd(micros)),
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

/// Deletes the done marker of a reservation, as Redis does when
/// `finishedMarkerTtl` has passed (the default TTL is kept, so the retries this
/// test makes within a marker's life cannot race a short TTL).
async fn age_out_marker(stack: &TestStack, reservation_id: &str) {
    let keys = KeySpace::new(stack.key_prefix.clone(), stack.redis.partitions);
    let p = partition_of_reservation(reservation_id, stack.redis.partitions).unwrap();
    let key = keys.reservation(p, reservation_id);
    let mut conn = redis(stack).await;
    let record: String = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(record.starts_with("D\t"), "{key}: {record:?}");
    let deleted: i64 = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(deleted, 1, "{key}");
}

#[tokio::test]
async fn a_request_id_reused_after_its_marker_aged_out_gets_new_ids() {
    let stack = TestStack::start().await.unwrap();
    let (agent_id, key) = stack.agent_with_key("reuser", None).await.unwrap();
    let pol = stack
        .usd_policy(&agent_id, "10", "daily", "calendar", "")
        .await
        .unwrap();
    let mut authz = stack.authz();
    const R: &str = "reused-request-1";

    // First use of R: authorize, settle, retry the settle (a no-op).
    let first = authz
        .authorize(authorize_request(&key, R, 1_000_000))
        .await
        .unwrap()
        .into_inner();
    assert!(allowed(&first), "{first:?}");
    let s = settle(&mut authz, &first.reservation_id, 400_000)
        .await
        .unwrap();
    assert_eq!(
        (s.charged.unwrap().micros, s.already_settled),
        (400_000, false)
    );
    let s = settle(&mut authz, &first.reservation_id, 400_000)
        .await
        .unwrap();
    assert_eq!(
        (s.charged.unwrap().micros, s.already_settled),
        (400_000, true)
    );

    // The marker ages out; R is used again: a new reservation.
    age_out_marker(&stack, &first.reservation_id).await;
    let second = authz
        .authorize(authorize_request(&key, R, 2_000_000))
        .await
        .unwrap()
        .into_inner();
    assert!(allowed(&second), "{second:?}");
    assert_eq!(
        remaining_of(&second, &pol),
        10_000_000 - 400_000 - 2_000_000
    );
    // A retried Authorize while it is live names it and reserves nothing more.
    let retry = authz
        .authorize(authorize_request(&key, R, 2_000_000))
        .await
        .unwrap()
        .into_inner();
    assert!(allowed(&retry), "{retry:?}");
    assert_eq!(retry.reservation_id, second.reservation_id);
    assert_eq!(remaining_of(&retry, &pol), 10_000_000 - 400_000 - 2_000_000);
    let s = settle(&mut authz, &second.reservation_id, 300_000)
        .await
        .unwrap();
    assert_eq!(
        (s.charged.unwrap().micros, s.already_settled),
        (300_000, false)
    );
    let s = settle(&mut authz, &second.reservation_id, 300_000)
        .await
        .unwrap();
    assert_eq!(
        (s.charged.unwrap().micros, s.already_settled),
        (300_000, true)
    );

    // Two charge events, one per reservation, with their own ids; the retried
    // settles added none.
    let charges: Vec<LedgerRow> = ledger_view_of_charges(&stack)
        .await
        .into_iter()
        .map(Result::unwrap)
        .filter(|r| r.request_id == R)
        .collect();
    let event_ids: Vec<&str> = charges.iter().map(|r| r.event_id.as_str()).collect();
    assert_eq!(charges.len(), 2, "{event_ids:?}");
    assert_ne!(
        charges[0].event_id, charges[1].event_id,
        "the second reservation of {R} reused the first one's event id"
    );
    assert_ne!(charges[0].reservation_id, charges[1].reservation_id);
    assert_ne!(first.reservation_id, second.reservation_id);
    assert_eq!(
        [&charges[0].reservation_id, &charges[1].reservation_id],
        [&first.reservation_id, &second.reservation_id]
    );
    assert_eq!(
        [&charges[0].event_id, &charges[1].event_id],
        [
            &format!("{}/settle", first.reservation_id),
            &format!("{}/settle", second.reservation_id)
        ]
    );
    // The ledger keeps both as final charges: totals count 0.40 + 0.30.
    let finals = final_charges(&stack, &charges, R).await;
    assert_eq!(
        finals
            .iter()
            .map(|f| (f.reservation_id.as_str(), f.charged_micros))
            .collect::<Vec<_>>(),
        [
            (first.reservation_id.as_str(), 400_000),
            (second.reservation_id.as_str(), 300_000)
        ]
    );
    // Writing them again (a redelivery) changes nothing.
    assert_eq!(final_charges(&stack, &charges, R).await, finals);

    // Finished: a retried Authorize names the latest reservation and is refused.
    let late = authz
        .authorize(authorize_request(&key, R, 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        pb::DenyReason::try_from(late.reason).unwrap(),
        pb::DenyReason::RequestFinished
    );
    assert_eq!(late.reservation_id, second.reservation_id);
    assert_eq!(remaining_of(&late, &pol), 10_000_000 - 700_000);

    // A third use while it is live: ids of the earlier reservations do not reach it.
    age_out_marker(&stack, &second.reservation_id).await;
    let third = authz
        .authorize(authorize_request(&key, R, 500_000))
        .await
        .unwrap()
        .into_inner();
    assert!(allowed(&third), "{third:?}");
    for stale in [&first.reservation_id, &second.reservation_id] {
        let err = settle(&mut authz, stale, 1).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{stale}: {err:?}");
        let err = authz
            .release(pb::ReleaseRequest {
                reservation_id: stale.clone(),
                reason: "stale".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{stale}: {err:?}");
    }
    // The live reservation is still due for expiry: its index entry (the stem,
    // one per record) outlived the stale calls.
    let p = partition_of_reservation(&third.reservation_id, stack.redis.partitions).unwrap();
    let keys = KeySpace::new(stack.key_prefix.clone(), stack.redis.partitions);
    let index: Vec<String> = redis::cmd("ZRANGE")
        .arg(keys.expiry(p))
        .arg(0)
        .arg(-1)
        .query_async(&mut redis(&stack).await)
        .await
        .unwrap();
    assert_eq!(
        index,
        [caracal_authz::budget::keys::split_reservation_id(&third.reservation_id).0]
    );
    // ReleaseByRequest (the gateway never learnt the id) finds the live one: its
    // release event is the third reservation's, and the index entry goes.
    let rel = authz
        .release_by_request(pb::ReleaseByRequestRequest {
            request_id: R.into(),
            credential: authorize_request(&key, R, 0).credential,
            reason: "client_abort".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (rel.released.unwrap().micros, rel.already_released),
        (500_000, false)
    );
    let releases: Vec<HashMap<String, String>> = outbox_entries(&stack)
        .await
        .into_iter()
        .map(|(_, f)| f)
        .filter(|f| f.get("kind").map(String::as_str) == Some("release"))
        .collect();
    assert_eq!(releases.len(), 1, "{releases:?}");
    assert_eq!(releases[0]["reservation_id"], third.reservation_id);
    assert_eq!(
        releases[0]["event_id"],
        format!("{}/release", third.reservation_id)
    );
    let indexed: i64 = redis::cmd("ZCARD")
        .arg(keys.expiry(p))
        .query_async(&mut redis(&stack).await)
        .await
        .unwrap();
    assert_eq!(indexed, 0, "nothing left for the sweeper");

    // The budget counted each reservation once: 0.40 + 0.30, the release nothing.
    let probe = authz
        .authorize(authorize_request(&key, "probe", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(remaining_of(&probe, &pol), 10_000_000 - 700_000);
    stack.stop().await.unwrap();
}

#[tokio::test]
async fn authorize_and_the_price_book_refuse_text_the_ledger_would_refuse() {
    let stack = TestStack::start().await.unwrap();
    let (agent_id, key) = stack.agent_with_key("wordy", None).await.unwrap();
    stack
        .usd_policy(&agent_id, "10", "daily", "calendar", "")
        .await
        .unwrap();
    let mut authz = stack.authz();

    // 150 characters, 300 bytes: over the ledger's 200-byte cap.
    let long_model = "é".repeat(150);
    let mut req = authorize_request(&key, "long-model", 1_000);
    req.model = long_model.clone();
    let answer = authz.authorize(req).await.map(tonic::Response::into_inner);
    assert!(
        matches!(&answer, Err(s) if s.code() == Code::InvalidArgument),
        "a 300-byte model must be refused, got {answer:?}"
    );
    let mut req = authorize_request(&key, "long-provider", 1_000);
    req.provider = "ü".repeat(101);
    let answer = authz.authorize(req).await.map(tonic::Response::into_inner);
    assert!(
        matches!(&answer, Err(s) if s.code() == Code::InvalidArgument),
        "a 202-byte provider must be refused, got {answer:?}"
    );
    let mut req = authorize_request(&key, "nul-model", 1_000);
    req.model = "gpt\0-4o".into();
    let answer = authz.authorize(req).await.map(tonic::Response::into_inner);
    assert!(
        matches!(&answer, Err(s) if s.code() == Code::InvalidArgument),
        "a model with NUL must be refused, got {answer:?}"
    );

    // The price book holds no model the hot path would refuse: 150 characters
    // of 2 bytes are refused, 100 (200 bytes) taken.
    let price = |provider: &str, model: &str| pb::SetPriceRequest {
        provider: provider.into(),
        model: model.into(),
        currency: "USD".into(),
        input_per_mtok: "1.00".into(),
        output_per_mtok: "2.00".into(),
        cached_input_per_mtok: String::new(),
        per_request: String::new(),
    };
    let err = stack
        .prices()
        .set_price(price("openai", &long_model))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = stack
        .prices()
        .set_price(price(&"ü".repeat(33), "m"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let edge_model = "é".repeat(100);
    stack
        .prices()
        .set_price(price("openai", &edge_model))
        .await
        .unwrap();

    // At the cap: priced, reserved, settled, and the ledger takes the charge.
    let mut req = authorize_request(&key, "edge-model", 0);
    req.model = edge_model.clone();
    req.estimated_cost = None;
    req.estimated_usage = Some(pb::TokenUsage {
        input_tokens: 1_000_000,
        output_tokens: 0,
        cached_input_tokens: 0,
    });
    let r = authz.authorize(req).await.unwrap().into_inner();
    assert!(allowed(&r), "{r:?}");
    assert_eq!(r.estimate.as_ref().unwrap().micros, 1_000_000);
    let s = authz
        .settle(pb::SettleRequest {
            reservation_id: r.reservation_id.clone(),
            usage: Some(pb::TokenUsage {
                input_tokens: 500_000,
                output_tokens: 0,
                cached_input_tokens: 0,
            }),
            provider: "openai".into(),
            model: edge_model.clone(),
            actual_cost: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.charged.unwrap().micros, 500_000);
    let decoded = ledger_view_of_charges(&stack).await;
    assert_eq!(decoded.len(), 1, "{decoded:?}");
    let rows: Vec<LedgerRow> = decoded.into_iter().map(Result::unwrap).collect();
    let finals = final_charges(&stack, &rows, "edge-model").await;
    assert_eq!(finals.len(), 1, "{finals:?}");
    assert_eq!(
        (finals[0].model.as_str(), finals[0].charged_micros),
        (edge_model.as_str(), 500_000)
    );
    stack.stop().await.unwrap();
}

#[tokio::test]
async fn reservations_made_before_generations_still_finish_by_their_old_ids() {
    let stack = TestStack::start().await.unwrap();
    let (agent_id, key) = stack.agent_with_key("upgraded", None).await.unwrap();
    let pol = stack
        .usd_policy(&agent_id, "10", "daily", "calendar", "")
        .await
        .unwrap();
    let mut authz = stack.authz();
    const R: &str = "made-before-the-upgrade";
    let made = authz
        .authorize(authorize_request(&key, R, 1_000_000))
        .await
        .unwrap()
        .into_inner();
    assert!(allowed(&made), "{made:?}");
    let (stem, generation) =
        caracal_authz::budget::keys::split_reservation_id(&made.reservation_id);
    let generation = generation.unwrap().to_owned();
    let stem = stem.to_owned();

    // The expiry index names the record by its stem, as before generations.
    let keys = KeySpace::new(stack.key_prefix.clone(), stack.redis.partitions);
    let p = partition_of_reservation(&stem, stack.redis.partitions).unwrap();
    let mut conn = redis(&stack).await;
    let index: Vec<String> = redis::cmd("ZRANGE")
        .arg(keys.expiry(p))
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(index, [stem.as_str()]);
    // Rewrite the record as a release without generations wrote it.
    let record: String = redis::cmd("GET")
        .arg(keys.reservation(p, &stem))
        .query_async(&mut conn)
        .await
        .unwrap();
    let generation_field = format!(",\"generation\":\"{generation}\"");
    assert_eq!(record.matches(&generation_field).count(), 1, "{record}");
    let _: () = redis::cmd("SET")
        .arg(keys.reservation(p, &stem))
        .arg(record.replace(&generation_field, ""))
        .query_async(&mut conn)
        .await
        .unwrap();

    // A retried Authorize names it by the stem; an id with a generation the record
    // cannot confirm finishes nothing; the stem settles it, once.
    let retry = authz
        .authorize(authorize_request(&key, R, 1_000_000))
        .await
        .unwrap()
        .into_inner();
    assert!(allowed(&retry), "{retry:?}");
    assert_eq!(retry.reservation_id, stem);
    let err = settle(&mut authz, &made.reservation_id, 1)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let s = settle(&mut authz, &stem, 250_000).await.unwrap();
    assert_eq!(
        (s.charged.unwrap().micros, s.already_settled),
        (250_000, false)
    );
    let s = settle(&mut authz, &stem, 250_000).await.unwrap();
    assert_eq!(
        (s.charged.unwrap().micros, s.already_settled),
        (250_000, true)
    );

    let charges: Vec<LedgerRow> = ledger_view_of_charges(&stack)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        charges
            .iter()
            .map(|c| (
                c.reservation_id.as_str(),
                c.event_id.as_str(),
                c.charged_micros
            ))
            .collect::<Vec<_>>(),
        [(stem.as_str(), format!("{stem}/settle").as_str(), 250_000)]
    );
    let indexed: i64 = redis::cmd("ZCARD")
        .arg(keys.expiry(p))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(indexed, 0);
    let marker: String = redis::cmd("GET")
        .arg(keys.reservation(p, &stem))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(marker, "D\tsettle\t1000000\t250000\tUSD");
    let late = authz
        .authorize(authorize_request(&key, R, 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        pb::DenyReason::try_from(late.reason).unwrap(),
        pb::DenyReason::RequestFinished
    );
    assert_eq!(late.reservation_id, stem);
    assert_eq!(remaining_of(&late, &pol), 10_000_000 - 250_000);
    stack.stop().await.unwrap();
}
