//! The authorization hot path against a real authz-service, Redis and PostgreSQL:
//! the hard guarantee under concurrency, hierarchies, idempotency, settle and
//! release, expiry, window boundaries, deny reasons, and Redis outages.

use std::{collections::HashSet, time::Duration};

use caracal_proto::v1 as pb;
use caracal_tests::TestStack;
use tonic::Code;

const USD: &str = "USD";

async fn agent(stack: &TestStack, name: &str, parent: Option<&str>) -> (String, String) {
    stack.agent_with_key(name, parent).await.unwrap()
}

async fn policy(
    stack: &TestStack,
    agent: &str,
    limit: &str,
    window: &str,
    window_type: &str,
    on_expiry: &str,
) -> String {
    stack
        .usd_policy(agent, limit, window, window_type, on_expiry)
        .await
        .unwrap()
}

fn usd(micros: i64) -> pb::Money {
    pb::Money {
        currency: USD.into(),
        micros,
        amount: String::new(),
    }
}

fn authorize_req(key: &str, request_id: &str, micros: i64) -> pb::AuthorizeRequest {
    caracal_tests::authorize_request(key, request_id, micros)
}

fn allowed(r: &pb::AuthorizeResponse) -> bool {
    r.decision == pb::Decision::Allow as i32
}

fn reason(r: &pb::AuthorizeResponse) -> pb::DenyReason {
    pb::DenyReason::try_from(r.reason).unwrap()
}

fn remaining_of(r: &pb::AuthorizeResponse, policy: &str) -> i64 {
    r.remaining
        .iter()
        .find(|p| p.policy_id == policy)
        .unwrap()
        .remaining
        .as_ref()
        .unwrap()
        .micros
}

/// A small deterministic generator (no extra crate): xorshift.
struct Rng(u64);
impl Rng {
    fn next(&mut self, lo: i64, hi: i64) -> i64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        lo + (self.0 % ((hi - lo) as u64 + 1)) as i64
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_authorizations_never_exceed_the_limit() {
    let stack = TestStack::start().await.unwrap();
    let (agent_id, key) = agent(&stack, "busy", None).await;
    let limit = 50_000_000; // $50
    let pol = policy(&stack, &agent_id, "50", "daily", "calendar", "").await;

    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let estimates: Vec<i64> = (0..1000).map(|_| rng.next(10_000, 200_000)).collect();
    let total: i64 = estimates.iter().sum();
    assert!(total > 2 * limit, "the test must overload the budget");

    let authz = stack.authz();
    let tasks: Vec<_> = estimates
        .iter()
        .enumerate()
        .map(|(i, est)| {
            let mut client = authz.clone();
            let req = authorize_req(&key, &format!("req-{i}"), *est);
            tokio::spawn(async move { client.authorize(req).await.map(|r| r.into_inner()) })
        })
        .collect();
    let mut admitted = 0i64;
    let mut denied = Vec::new();
    let mut reservation_ids = HashSet::new();
    for (t, est) in tasks.into_iter().zip(&estimates) {
        let r = t.await.unwrap().unwrap();
        if allowed(&r) {
            admitted += est;
            assert!(reservation_ids.insert(r.reservation_id.clone()));
        } else {
            assert_eq!(reason(&r), pb::DenyReason::BudgetExceeded);
            assert_eq!(r.policy_id, pol);
            // The refusal was necessary when it was made: the room then was smaller
            // than the estimate.
            let room_then = remaining_of(&r, &pol);
            assert!(room_then < *est, "refused {est} with {room_then} left");
            denied.push(*est);
        }
    }
    assert!(admitted <= limit, "admitted {admitted} > limit {limit}");
    assert!(!denied.is_empty());
    // Nothing is released here, so the room only shrank: every refused estimate is
    // also larger than the room left at the end (no false refusals).
    let final_room = limit - admitted;
    assert!(
        denied.iter().all(|d| *d > final_room),
        "a refusal had room: final room {final_room}"
    );
    assert_eq!(
        reservation_ids.len() as i64,
        estimates.len() as i64 - denied.len() as i64
    );
    stack.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_children_exhausting_a_shared_parent() {
    let stack = TestStack::start().await.unwrap();
    let (parent, _) = agent(&stack, "team", None).await;
    let parent_limit = 20_000_000;
    let parent_pol = policy(&stack, &parent, "20", "monthly", "calendar", "").await;
    let (child_a, key_a) = agent(&stack, "child-a", Some(&parent)).await;
    let (child_b, key_b) = agent(&stack, "child-b", Some(&parent)).await;
    let pol_a = policy(&stack, &child_a, "1000", "daily", "calendar", "").await;
    policy(&stack, &child_b, "1000", "daily", "rolling", "").await;

    let authz = stack.authz();
    // Warm both children's cache entries first, so neither starts the race late.
    for (i, key) in [&key_a, &key_b].into_iter().enumerate() {
        let r = authz
            .clone()
            .authorize(authorize_req(key, &format!("warm-{i}"), 0))
            .await
            .unwrap()
            .into_inner();
        assert!(allowed(&r));
    }
    let mut rng = Rng(42);
    let mut tasks = Vec::new();
    for i in 0..1000 {
        let key = if i % 2 == 0 {
            key_a.clone()
        } else {
            key_b.clone()
        };
        let est = rng.next(5_000, 100_000);
        let mut client = authz.clone();
        let req = authorize_req(&key, &format!("shared-{i}"), est);
        tasks.push((
            est,
            i % 2 == 0,
            tokio::spawn(async move { client.authorize(req).await.map(|r| r.into_inner()) }),
        ));
    }
    let (mut sum_a, mut sum_b, mut denials) = (0, 0, 0);
    for (est, is_a, t) in tasks {
        let r = t.await.unwrap().unwrap();
        if allowed(&r) {
            if is_a {
                sum_a += est
            } else {
                sum_b += est
            }
            // Allowed answers report the child's and the parent's room.
            assert_eq!(r.remaining.len(), 2);
        } else {
            denials += 1;
            assert_eq!(
                r.policy_id, parent_pol,
                "the shared parent is what runs out"
            );
            assert!(remaining_of(&r, &parent_pol) < est);
        }
    }
    assert!(sum_a > 0 && sum_b > 0, "both children spent");
    assert!(
        sum_a + sum_b <= parent_limit,
        "{} > {parent_limit}",
        sum_a + sum_b
    );
    assert!(denials > 0);

    // The child's own policy counts only the child's reservations.
    let probe = stack
        .authz()
        .authorize(authorize_req(&key_a, "probe-a", 1))
        .await
        .unwrap()
        .into_inner();
    if allowed(&probe) {
        assert_eq!(remaining_of(&probe, &pol_a), 1_000_000_000 - sum_a - 1);
    }
    stack.stop().await.unwrap();
}

#[tokio::test]
async fn retries_are_idempotent_and_settle_charges_the_priced_usage() {
    let stack = TestStack::start().await.unwrap();
    let (agent_id, key) = agent(&stack, "careful", None).await;
    let pol = policy(&stack, &agent_id, "10", "daily", "calendar", "").await;
    stack
        .prices()
        .set_price(pb::SetPriceRequest {
            provider: "openai".into(),
            model: "gpt-4o".into(),
            currency: USD.into(),
            input_per_mtok: "2.50".into(),
            output_per_mtok: "10.00".into(),
            cached_input_per_mtok: "1.25".into(),
            per_request: String::new(),
        })
        .await
        .unwrap();
    let mut authz = stack.authz();

    // Estimate from tokens: 1000 in + 500 out = 0.0025 + 0.005 = $0.0075.
    let mut req = authorize_req(&key, "idem-1", 0);
    req.estimated_cost = None;
    req.estimated_usage = Some(pb::TokenUsage {
        input_tokens: 1000,
        output_tokens: 500,
        cached_input_tokens: 0,
    });
    let first = authz.authorize(req.clone()).await.unwrap().into_inner();
    assert!(allowed(&first), "{first:?}");
    assert_eq!(first.estimate.as_ref().unwrap().micros, 7_500);
    assert_eq!(remaining_of(&first, &pol), 10_000_000 - 7_500);
    assert_eq!(
        first.min_remaining.as_ref().unwrap().micros,
        10_000_000 - 7_500
    );
    let again = authz.authorize(req.clone()).await.unwrap().into_inner();
    assert_eq!(
        again.reservation_id, first.reservation_id,
        "a retry returns the same reservation"
    );
    assert!(allowed(&again), "{again:?}");
    assert_eq!(remaining_of(&again, &pol), 10_000_000 - 7_500);
    // Request ids are per agent: another agent's "idem-1" is its own reservation.
    let (other_id, other_key) = agent(&stack, "other-careful", None).await;
    policy(&stack, &other_id, "10", "daily", "calendar", "").await;
    let other = authz
        .authorize(authorize_req(&other_key, "idem-1", 1))
        .await
        .unwrap()
        .into_inner();
    assert!(allowed(&other), "{other:?}");
    assert!(!other.message.contains("retry"), "{other:?}");
    assert_ne!(other.reservation_id, first.reservation_id);
    let probe = authz
        .authorize(authorize_req(&key, "probe", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        remaining_of(&probe, &pol),
        10_000_000 - 7_500,
        "the retry reserved nothing more"
    );

    // Settle above the estimate: 2000 prompt tokens of which 400 cached, 1000 out:
    // 1600*2.5 + 400*1.25 + 1000*10 = 4000 + 500 + 10000 = 14500 micros.
    let settle = pb::SettleRequest {
        reservation_id: first.reservation_id.clone(),
        usage: Some(pb::TokenUsage {
            input_tokens: 2000,
            output_tokens: 1000,
            cached_input_tokens: 400,
        }),
        provider: "openai".into(),
        model: "gpt-4o".into(),
        actual_cost: None,
    };
    let s1 = authz.settle(settle.clone()).await.unwrap().into_inner();
    assert_eq!(s1.charged.as_ref().unwrap().micros, 14_500);
    assert_eq!(s1.reserved.as_ref().unwrap().micros, 7_500);
    assert_eq!(s1.overshoot.as_ref().unwrap().micros, 7_000);
    assert!(!s1.already_settled);
    assert_eq!(
        s1.remaining[0].remaining.as_ref().unwrap().micros,
        10_000_000 - 14_500
    );
    let s2 = authz.settle(settle).await.unwrap().into_inner();
    assert!(s2.already_settled);
    assert_eq!(s2.charged.as_ref().unwrap().micros, 14_500);
    let probe = authz
        .authorize(authorize_req(&key, "probe-2", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        remaining_of(&probe, &pol),
        10_000_000 - 14_500,
        "charged once"
    );
    // A retry of the settled request names its reservation, reserves nothing, and
    // is refused: the request is finished (admitting it would be a free call).
    let late = authz.authorize(req).await.unwrap().into_inner();
    assert_eq!(late.reservation_id, first.reservation_id);
    assert!(!allowed(&late), "{late:?}");
    assert_eq!(reason(&late), pb::DenyReason::RequestFinished);
    assert!(late.message.contains("settled"), "{}", late.message);
    assert_eq!(remaining_of(&late, &pol), 10_000_000 - 14_500);
    let err = authz
        .release(pb::ReleaseRequest {
            reservation_id: first.reservation_id.clone(),
            reason: "late".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    // Settle below the estimate frees the difference; release frees all.
    let r = authz
        .authorize(authorize_req(&key, "below", 1_000_000))
        .await
        .unwrap()
        .into_inner();
    let s = authz
        .settle(pb::SettleRequest {
            reservation_id: r.reservation_id.clone(),
            actual_cost: Some(usd(250_000)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (s.charged.unwrap().micros, s.overshoot.unwrap().micros),
        (250_000, 0)
    );
    let r = authz
        .authorize(authorize_req(&key, "freed", 2_000_000))
        .await
        .unwrap()
        .into_inner();
    let rel = authz
        .release(pb::ReleaseRequest {
            reservation_id: r.reservation_id.clone(),
            reason: "upstream_error".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rel.released.unwrap().micros, 2_000_000);
    let rel2 = authz
        .release(pb::ReleaseRequest {
            reservation_id: r.reservation_id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(rel2.already_released);
    let probe = authz
        .authorize(authorize_req(&key, "probe-3", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(remaining_of(&probe, &pol), 10_000_000 - 14_500 - 250_000);
    // A zero estimate (a probe) can be released and settled like any other.
    let rel0 = authz
        .release(pb::ReleaseRequest {
            reservation_id: probe.reservation_id.clone(),
            reason: "probe".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rel0.released.unwrap().micros, 0);
    let zero = authz
        .authorize(authorize_req(&key, "zero", 0))
        .await
        .unwrap()
        .into_inner();
    let s0 = authz
        .settle(pb::SettleRequest {
            reservation_id: zero.reservation_id.clone(),
            actual_cost: Some(usd(30)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (s0.charged.unwrap().micros, s0.overshoot.unwrap().micros),
        (30, 30)
    );
    assert_eq!(
        s0.remaining[0].remaining.as_ref().unwrap().micros,
        10_000_000 - 14_500 - 250_000 - 30
    );

    // Bad input: unknown and malformed reservations, negative and huge amounts.
    let err = authz
        .settle(pb::SettleRequest {
            reservation_id: "rsv_1_0123456789abcdef0123456789abcdef".into(),
            actual_cost: Some(usd(1)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = authz
        .settle(pb::SettleRequest {
            reservation_id: "garbage".into(),
            actual_cost: Some(usd(1)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    for bad in [-1, i64::MAX] {
        let err = authz
            .authorize(authorize_req(&key, &format!("bad-{bad}"), bad))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad}");
    }
    let err = authz
        .authorize(authorize_req(&key, "", 1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = authz
        .authorize(authorize_req(&key, "has space", 1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let mut no_cred = authorize_req(&key, "nocred", 1);
    no_cred.credential = None;
    assert_eq!(
        authz.authorize(no_cred).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    stack.stop().await.unwrap();
}

#[tokio::test]
async fn deny_reasons_name_the_problem() {
    let stack = TestStack::start().await.unwrap();
    let (agent_id, key) = agent(&stack, "picky", None).await;
    let mut authz = stack.authz();

    let r = authz
        .authorize(authorize_req("cak_not-a-real-key", "u1", 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (allowed(&r), reason(&r)),
        (false, pb::DenyReason::UnknownAgent)
    );
    let r = authz
        .authorize(authorize_req(&key, "np", 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reason(&r), pb::DenyReason::NoPolicy);

    policy(&stack, &agent_id, "5", "daily", "calendar", "").await;
    // The new policy reaches the hot path's cache within the epoch poll interval.
    let mut r = pb::AuthorizeResponse::default();
    for i in 0..50 {
        let mut eur = authorize_req(&key, &format!("eur-{i}"), 1);
        eur.estimated_cost = Some(pb::Money {
            currency: "EUR".into(),
            micros: 1,
            amount: String::new(),
        });
        r = authz.authorize(eur).await.unwrap().into_inner();
        if reason(&r) != pb::DenyReason::NoPolicy {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(reason(&r), pb::DenyReason::CurrencyMismatch);
    let mut unpriced = authorize_req(&key, "price", 0);
    unpriced.estimated_cost = None;
    unpriced.model = "mystery-model".into();
    let r = authz.authorize(unpriced).await.unwrap().into_inner();
    assert_eq!(reason(&r), pb::DenyReason::NoPrice);

    stack
        .allowlists()
        .add_entry(pb::AddAllowlistEntryRequest {
            agent_id: agent_id.clone(),
            target: "model".into(),
            pattern_kind: "glob".into(),
            pattern: "gpt-4o-mini*".into(),
        })
        .await
        .unwrap();
    // Admin changes reach the hot path's cache within the epoch poll interval.
    let mut denied = None;
    for i in 0..50 {
        let r = authz
            .authorize(authorize_req(&key, &format!("al-{i}"), 1))
            .await
            .unwrap()
            .into_inner();
        if !allowed(&r) {
            denied = Some(r);
            break;
        }
        authz
            .release(pb::ReleaseRequest {
                reservation_id: r.reservation_id,
                reason: String::new(),
            })
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let denied = denied.expect("allowlist change never reached the hot path");
    assert_eq!(reason(&denied), pb::DenyReason::NotAllowed);
    let mut mini = authorize_req(&key, "mini", 1);
    mini.model = "gpt-4o-mini".into();
    assert!(allowed(&authz.authorize(mini).await.unwrap().into_inner()));

    // A revoked key and a deactivated agent are refused as unknown.
    let keys = stack
        .agents()
        .list_api_keys(pb::ListApiKeysRequest {
            agent_id: agent_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    stack
        .agents()
        .revoke_api_key(pb::RevokeApiKeyRequest {
            key_id: keys.keys[0].id.clone(),
        })
        .await
        .unwrap();
    let mut refused = false;
    for i in 0..50 {
        let r = authz
            .authorize(authorize_req(&key, &format!("rev-{i}"), 1))
            .await
            .unwrap()
            .into_inner();
        if !allowed(&r) && reason(&r) == pb::DenyReason::UnknownAgent {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(refused, "revoked key still accepted");
    stack.stop().await.unwrap();
}

#[tokio::test]
async fn verified_identities_authenticate_agents() {
    let stack = TestStack::start().await.unwrap();
    let (agent_id, _) = agent(&stack, "meshed", None).await;
    policy(&stack, &agent_id, "1", "total", "calendar", "").await;
    let spiffe = "spiffe://cluster.local/ns/agents/sa/meshed";
    stack
        .agents()
        .add_identity(pb::AddIdentityRequest {
            agent_id: agent_id.clone(),
            kind: "spiffe".into(),
            value: spiffe.into(),
            issuer: String::new(),
        })
        .await
        .unwrap();
    let err = stack
        .agents()
        .add_identity(pb::AddIdentityRequest {
            agent_id: agent_id.clone(),
            kind: "spiffe".into(),
            value: "not-a-spiffe-id".into(),
            issuer: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let mut req = authorize_req("", "sp-1", 1000);
    req.credential = Some(pb::AgentCredential {
        kind: Some(pb::agent_credential::Kind::Verified(pb::VerifiedIdentity {
            kind: "spiffe".into(),
            value: spiffe.into(),
            issuer: String::new(),
        })),
    });
    let r = stack
        .authz()
        .authorize(req.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(allowed(&r), "{r:?}");
    assert_eq!(r.agent_id, agent_id);
    req.request_id = "sp-2".into();
    req.credential = Some(pb::AgentCredential {
        kind: Some(pb::agent_credential::Kind::Verified(pb::VerifiedIdentity {
            kind: "spiffe".into(),
            value: "spiffe://cluster.local/ns/x/sa/y".into(),
            issuer: String::new(),
        })),
    });
    let r = stack.authz().authorize(req).await.unwrap().into_inner();
    assert_eq!(reason(&r), pb::DenyReason::UnknownAgent);
    stack.stop().await.unwrap();
}

#[tokio::test]
async fn expiry_charges_or_releases_as_the_policy_says() {
    let stack = TestStack::start_with(|c| {
        c.reservations.provisional_charge_expiration = 1;
        c.reservations.provisional_charge_cleanup_interval = 1;
    })
    .await
    .unwrap();
    let (charging, key_c) = agent(&stack, "charging", None).await;
    let pol_c = policy(&stack, &charging, "10", "daily", "calendar", "charge").await;
    let (releasing, key_r) = agent(&stack, "releasing", None).await;
    let pol_r = policy(&stack, &releasing, "10", "daily", "rolling", "release").await;
    let mut authz = stack.authz();
    let c = authz
        .authorize(authorize_req(&key_c, "exp-c", 3_000_000))
        .await
        .unwrap()
        .into_inner();
    let r = authz
        .authorize(authorize_req(&key_r, "exp-r", 3_000_000))
        .await
        .unwrap()
        .into_inner();
    assert!(allowed(&c) && allowed(&r));

    // Wait (bounded) until the sweeper has released r's reservation; c's expired
    // earlier (it was made first), in the same or an earlier sweep.
    let mut released = false;
    for i in 0..80 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let p = authz
            .authorize(authorize_req(&key_r, &format!("poll-{i}"), 0))
            .await
            .unwrap()
            .into_inner();
        if remaining_of(&p, &pol_r) == 10_000_000 {
            released = true;
            break;
        }
    }
    assert!(released, "the sweeper never expired the reservation");
    let b = authz
        .release(pb::ReleaseRequest {
            reservation_id: r.reservation_id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(b.code(), Code::FailedPrecondition, "{b:?}");
    let pc = authz
        .authorize(authorize_req(&key_c, "after-c", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        remaining_of(&pc, &pol_c),
        7_000_000,
        "expiry charged the reserved amount"
    );
    let pr = authz
        .authorize(authorize_req(&key_r, "after-r", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        remaining_of(&pr, &pol_r),
        10_000_000,
        "expiry released the reservation"
    );
    // A Settle after expiry still charges the actual cost (issue 11 item 3; more
    // in hardening_service.rs): expiry's 3 becomes the actual 0.000001.
    let a = authz
        .settle(pb::SettleRequest {
            reservation_id: c.reservation_id.clone(),
            actual_cost: Some(usd(1)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.charged.as_ref().unwrap().micros, 1, "{a:?}");
    assert!(!a.already_settled);
    let pc = authz
        .authorize(authorize_req(&key_c, "after-late-settle", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(remaining_of(&pc, &pol_c), 10_000_000 - 1);
    stack.stop().await.unwrap();
}

#[tokio::test]
async fn admin_changes_through_one_replica_reach_the_others() {
    let stack = TestStack::start().await.unwrap();
    let (agent_id, key) = agent(&stack, "replicated", None).await;
    policy(&stack, &agent_id, "10", "daily", "calendar", "").await;

    // A second replica on the same database and Redis state.
    let mut config = caracal_authz::config::Config::default();
    config.server.grpc_addr = "127.0.0.1:0".parse().unwrap();
    config.server.http_addr = "127.0.0.1:0".parse().unwrap();
    config.database.url = stack.database_url.clone();
    config.database.db_pool_size = 2;
    config.redis = stack.redis.clone();
    config.budget.relay_enabled = false;
    config.cache.policy_cache_ttl = 3600; // only the epoch can refresh it in time
    config.auth.api_key_pepper = caracal_tests::PEPPER.to_owned();
    config.auth.gateway_token = caracal_tests::GATEWAY_TOKEN.to_owned();
    let replica = caracal_authz::serve(config).await.unwrap();
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", replica.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut b = caracal_tests::gateway_client(channel);

    let first = b
        .authorize(authorize_req(&key, "rep-0", 1_000))
        .await
        .unwrap()
        .into_inner();
    assert!(allowed(&first), "{first:?}");
    // Both replicas reserve on the same counters.
    let via_a = stack
        .authz()
        .authorize(authorize_req(&key, "rep-a", 1_000))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(via_a.min_remaining.unwrap().micros, 10_000_000 - 2_000);

    // Deactivate through replica A; replica B (warm cache, 1 h TTL) must notice.
    stack
        .agents()
        .deactivate_agent(pb::DeactivateAgentRequest {
            id: agent_id.clone(),
        })
        .await
        .unwrap();
    let mut refused = false;
    for i in 1..=50 {
        let r = b
            .authorize(authorize_req(&key, &format!("rep-{i}"), 1_000))
            .await
            .unwrap()
            .into_inner();
        if !allowed(&r) {
            assert_eq!(reason(&r), pb::DenyReason::UnknownAgent);
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(refused, "replica B kept admitting a deactivated agent");
    replica.shutdown().await.unwrap();
    stack.stop().await.unwrap();
}

/// FinishBatch answers each call as its unary RPC would: a settle charges once even
/// when the batch names it twice (the second is `already_settled`), a release frees
/// its reservation, ReleaseByRequest tombstones a request not yet authorized, and a
/// bad call is refused on its own without failing its neighbours; a batch above the
/// limit is refused whole and changes nothing.
#[tokio::test]
async fn finish_batch_answers_each_call_like_its_unary_rpc() {
    use pb::{finish_call::Call, finish_result::Response as Answer};
    let stack = TestStack::start().await.unwrap();
    let (agent_id, key) = agent(&stack, "batched", None).await;
    let pol = policy(&stack, &agent_id, "10", "daily", "calendar", "").await;
    let mut authz = stack.authz();
    let reserve = |id: &'static str, micros: i64| {
        let mut c = authz.clone();
        let req = authorize_req(&key, id, micros);
        async move {
            let r = c.authorize(req).await.unwrap().into_inner();
            assert!(allowed(&r), "{r:?}");
            r.reservation_id
        }
    };
    let settled = reserve("batch-settle", 300_000).await;
    let released = reserve("batch-release", 200_000).await;
    let kept = reserve("batch-kept", 100_000).await;
    let settle = |rid: &str, micros: i64| pb::FinishCall {
        call: Some(Call::Settle(pb::SettleRequest {
            reservation_id: rid.into(),
            actual_cost: Some(usd(micros)),
            ..Default::default()
        })),
        x_request_id: "trace-1".into(),
        traceparent: String::new(),
    };
    let calls = vec![
        settle(&settled, 250_000),
        pb::FinishCall {
            call: Some(Call::Release(pb::ReleaseRequest {
                reservation_id: released.clone(),
                reason: "upstream_error".into(),
            })),
            x_request_id: String::new(),
            traceparent: String::new(),
        },
        // Unknown reservation, malformed id, empty call: refused one by one.
        settle("rsv_0_00000000000000000000000000000000", 1),
        settle("not-a-reservation", 1),
        pb::FinishCall::default(),
        pb::FinishCall {
            call: Some(Call::ReleaseByRequest(pb::ReleaseByRequestRequest {
                request_id: "batch-never-authorized".into(),
                credential: authorize_req(&key, "x", 0).credential,
                reason: "client_abort".into(),
            })),
            x_request_id: String::new(),
            traceparent: String::new(),
        },
        // The same settle twice in one batch (a retry racing the first): charged once.
        settle(&settled, 250_000),
    ];
    let results = authz
        .finish_batch(pb::FinishBatchRequest { calls })
        .await
        .unwrap()
        .into_inner()
        .results;
    let codes: Vec<u32> = results.iter().map(|r| r.code).collect();
    assert_eq!(
        codes,
        vec![
            0,
            0,
            Code::NotFound as u32,
            Code::InvalidArgument as u32,
            Code::InvalidArgument as u32,
            0,
            0
        ],
        "{results:?}"
    );
    let settles: Vec<&pb::SettleResponse> = results
        .iter()
        .filter_map(|r| match &r.response {
            Some(Answer::Settle(s)) => Some(s),
            _ => None,
        })
        .collect();
    assert_eq!(settles.len(), 2);
    assert_eq!(
        settles.iter().filter(|s| s.already_settled).count(),
        1,
        "exactly one of the two settles charged"
    );
    assert!(settles
        .iter()
        .all(|s| s.charged.as_ref().unwrap().micros == 250_000));
    match &results[1].response {
        Some(Answer::Release(r)) => assert_eq!(r.released.as_ref().unwrap().micros, 200_000),
        other => panic!("release answered {other:?}"),
    }
    // Room left: 10 USD - 0.25 charged - 0.10 still reserved.
    let probe = authz
        .authorize(authorize_req(&key, "batch-probe", 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        remaining_of(&probe, &pol),
        10_000_000 - 250_000 - 100_000 - 1
    );
    // The tombstoned request id reserves nothing when its Authorize arrives late.
    let late = authz
        .authorize(authorize_req(&key, "batch-never-authorized", 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reason(&late), pb::DenyReason::RequestFinished);

    // Over the limit: refused whole, the kept reservation is not settled.
    let too_many = vec![settle(&kept, 1); caracal_authz::authorize::MAX_FINISH_BATCH + 1];
    let err = authz
        .finish_batch(pb::FinishBatchRequest { calls: too_many })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let results = authz
        .finish_batch(pb::FinishBatchRequest {
            calls: vec![settle(&kept, 100_000)],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results.len(), 1);
    match &results[0].response {
        Some(Answer::Settle(s)) => assert!(!s.already_settled, "{s:?}"),
        other => panic!("settle answered {other:?}"),
    }
    stack.stop().await.unwrap();
}

/// The CallStream answers each call as its unary RPC would, tagged with its call
/// id: a repeated Authorize gets the same reservation, an unknown key a denial,
/// malformed and empty calls INVALID_ARGUMENT; the same Settle twice charges once;
/// after the caller stops sending, the calls in flight are still answered and the
/// stream ends.
#[tokio::test]
async fn call_stream_answers_each_call_like_its_unary_rpc() {
    use pb::{stream_call::Call, stream_result::Response as Answer};
    use std::collections::HashMap;
    let stack = TestStack::start().await.unwrap();
    let (agent_id, key) = agent(&stack, "streaming", None).await;
    let pol = policy(&stack, &agent_id, "10", "daily", "calendar", "").await;
    let mut authz = stack.authz();
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let mut answers = authz
        .call_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let call = |call_id: u64, call: Option<Call>| pb::StreamCall {
        call_id,
        x_request_id: format!("trace-{call_id}"),
        traceparent: String::new(),
        call,
    };
    let mut no_id = authorize_req(&key, "x", 1);
    no_id.request_id.clear();
    for c in [
        call(
            10,
            Some(Call::Authorize(authorize_req(&key, "stream-a", 300_000))),
        ),
        call(
            11,
            Some(Call::Authorize(authorize_req(&key, "stream-a", 300_000))),
        ),
        call(
            12,
            Some(Call::Authorize(authorize_req(
                "cak_not-a-real-key",
                "stream-b",
                1,
            ))),
        ),
        call(13, Some(Call::Authorize(no_id))),
        call(14, None),
    ] {
        tx.send(c).await.unwrap();
    }
    let mut got: HashMap<u64, pb::StreamResult> = HashMap::new();
    for _ in 0..5 {
        let r = answers
            .message()
            .await
            .unwrap()
            .expect("an answer per call");
        assert!(got.insert(r.call_id, r).is_none(), "one answer per call id");
    }
    let authorized = |id: u64| match &got[&id].response {
        Some(Answer::Authorize(a)) => a.clone(),
        other => panic!("call {id} answered {other:?}"),
    };
    let (first, again) = (authorized(10), authorized(11));
    assert!(allowed(&first), "{first:?}");
    assert_eq!(
        first.reservation_id, again.reservation_id,
        "idempotent by request id"
    );
    assert_eq!(reason(&authorized(12)), pb::DenyReason::UnknownAgent);
    assert_eq!(got[&12].code, 0);
    assert_eq!(
        got[&13].code,
        Code::InvalidArgument as u32,
        "{:?}",
        got[&13]
    );
    assert_eq!(
        got[&14].code,
        Code::InvalidArgument as u32,
        "{:?}",
        got[&14]
    );
    assert!(got[&13].response.is_none() && got[&14].response.is_none());

    let settle = |call_id: u64| {
        call(
            call_id,
            Some(Call::Settle(pb::SettleRequest {
                reservation_id: first.reservation_id.clone(),
                actual_cost: Some(usd(250_000)),
                ..Default::default()
            })),
        )
    };
    tx.send(settle(20)).await.unwrap();
    tx.send(settle(21)).await.unwrap();
    tx.send(call(
        22,
        Some(Call::ReleaseByRequest(pb::ReleaseByRequestRequest {
            request_id: "stream-never-authorized".into(),
            credential: authorize_req(&key, "x", 0).credential,
            reason: "client_abort".into(),
        })),
    ))
    .await
    .unwrap();
    // The caller stops sending: what is in flight is still answered, then the end.
    drop(tx);
    let mut rest = Vec::new();
    while let Some(r) = answers.message().await.unwrap() {
        rest.push(r);
    }
    rest.sort_by_key(|r| r.call_id);
    assert_eq!(
        rest.iter().map(|r| (r.call_id, r.code)).collect::<Vec<_>>(),
        vec![(20, 0), (21, 0), (22, 0)]
    );
    let charged_once = rest[..2]
        .iter()
        .filter(|r| matches!(&r.response, Some(Answer::Settle(s)) if !s.already_settled))
        .count();
    assert_eq!(
        charged_once, 1,
        "the same settle twice charges once: {rest:?}"
    );
    let probe = authz
        .authorize(authorize_req(&key, "stream-probe", 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(remaining_of(&probe, &pol), 10_000_000 - 250_000 - 1);
    let late = authz
        .authorize(authorize_req(&key, "stream-never-authorized", 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reason(&late), pb::DenyReason::RequestFinished);
    stack.stop().await.unwrap();
}

/// A service that shuts down ends its open CallStreams (once the calls in flight
/// are answered) instead of waiting for the gateways to hang up, which they never
/// do: a rolling restart must not hang on them until it is killed.
#[tokio::test]
async fn shutting_down_ends_open_call_streams() {
    use pb::stream_call::Call;
    let stack = TestStack::start().await.unwrap();
    let (agent_id, key) = agent(&stack, "restarting", None).await;
    policy(&stack, &agent_id, "10", "daily", "calendar", "").await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut answers = stack
        .authz()
        .call_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(pb::StreamCall {
        call_id: 1,
        x_request_id: String::new(),
        traceparent: String::new(),
        call: Some(Call::Authorize(authorize_req(
            &key,
            "before-restart",
            1_000,
        ))),
    })
    .await
    .unwrap();
    let first = answers.message().await.unwrap().unwrap();
    assert_eq!((first.call_id, first.code), (1, 0));
    let stopped = tokio::time::timeout(Duration::from_secs(20), stack.stop()).await;
    assert!(
        stopped.is_ok(),
        "the shutdown waited for the open CallStream"
    );
    stopped.unwrap().unwrap();
    // Ended with OK, not cut off: the gateway opens a new stream elsewhere.
    assert!(matches!(answers.message().await, Ok(None)));
    drop(tx);
}

/// A calendar counter gets its expiry (window end + one day of grace) when the
/// first reservation creates it, and keeps it: later reservations no longer set it
/// again (one Redis call per policy saved), and it never becomes a key without one.
#[tokio::test]
async fn calendar_counters_expire_a_day_after_their_window() {
    let stack = TestStack::start().await.unwrap();
    let (agent_id, key) = agent(&stack, "expiring", None).await;
    let pol = policy(&stack, &agent_id, "10", "daily", "calendar", "").await;
    let mut authz = stack.authz();
    let mut conn = stack.redis_conn().unwrap();
    for i in 0..3 {
        let r = authz
            .authorize(authorize_req(&key, &format!("ttl-{i}"), 1_000))
            .await
            .unwrap()
            .into_inner();
        assert!(allowed(&r));
        let keys = stack.policy_counter_keys(&pol).await.unwrap();
        assert_eq!(keys.len(), 1, "{keys:?}");
        let expire_at: i64 = redis::cmd("EXPIRETIME")
            .arg(&keys[0])
            .query_async(&mut conn)
            .await
            .unwrap();
        // The end of today (UTC) + 86,400 s; the test may straddle midnight.
        let day = |t: chrono::DateTime<chrono::Utc>| {
            t.date_naive()
                .succ_opt()
                .unwrap()
                .and_hms_opt(0, 0, 0)
                .unwrap()
                .and_utc()
                .timestamp()
                + 86_400
        };
        let now = chrono::Utc::now();
        assert!(
            expire_at == day(now) || expire_at == day(now - chrono::Duration::seconds(5)),
            "counter expires at {expire_at}, not a day after its window"
        );
    }
    stack.stop().await.unwrap();
}
