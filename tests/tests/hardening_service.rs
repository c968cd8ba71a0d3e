//! Issue 11, service side, against a real authz-service, Redis and PostgreSQL:
//! a Settle after expiry charges the difference once (item 3), ReleaseByRequest
//! (item 5), Settle refuses another currency (item 10), one corrupt reservation does
//! not stop the expiry sweep and a finished request's retried Authorize is refused
//! (item 11).

use std::{collections::HashMap, time::Duration};

use caracal_authz::budget::{BudgetStore, KeySpace};
use caracal_proto::v1 as pb;
use caracal_tests::TestStack;
use tonic::Code;

const USD: &str = "USD";
/// TestStack's partition count (tests/src/lib.rs).
const PARTITIONS: u16 = 4;

fn money(currency: &str, micros: i64) -> pb::Money {
    pb::Money {
        currency: currency.into(),
        micros,
        amount: String::new(),
    }
}

fn usd(micros: i64) -> pb::Money {
    money(USD, micros)
}

fn allowed(r: &pb::AuthorizeResponse) -> bool {
    r.decision == pb::Decision::Allow as i32
}

fn remaining_of(r: &pb::AuthorizeResponse, policy: &str) -> i64 {
    r.remaining
        .iter()
        .find(|p| p.policy_id == policy)
        .unwrap_or_else(|| panic!("no policy {policy} in {r:?}"))
        .remaining
        .as_ref()
        .unwrap()
        .micros
}

fn credential(key: &str) -> Option<pb::AgentCredential> {
    Some(pb::AgentCredential {
        kind: Some(pb::agent_credential::Kind::ApiKey(key.into())),
    })
}

fn partition_of(rid: &str) -> u16 {
    caracal_authz::budget::keys::partition_of_reservation(rid, PARTITIONS).unwrap()
}

struct Harness {
    stack: TestStack,
    keys: KeySpace,
    redis: redis::aio::MultiplexedConnection,
    probes: usize,
}

impl Harness {
    async fn start(tune: impl FnOnce(&mut caracal_authz::Config)) -> Self {
        let stack = TestStack::start_with(tune).await.unwrap();
        let keys = KeySpace::new(stack.key_prefix.clone(), PARTITIONS);
        let redis = redis::Client::open(stack.redis.url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        Self {
            stack,
            keys,
            redis,
            probes: 0,
        }
    }

    async fn agent(&self, name: &str, parent: Option<&str>) -> (String, String) {
        self.stack.agent_with_key(name, parent).await.unwrap()
    }

    async fn policy(&self, agent: &str, window_type: &str, on_expiry: &str) -> String {
        self.stack
            .usd_policy(agent, "10", "daily", window_type, on_expiry)
            .await
            .unwrap()
    }

    async fn authorize(&self, key: &str, request_id: &str, micros: i64) -> pb::AuthorizeResponse {
        self.stack
            .authz()
            .authorize(caracal_tests::authorize_request(key, request_id, micros))
            .await
            .unwrap()
            .into_inner()
    }

    /// What is left on `policy` now (an Authorize of 0 reserves nothing).
    async fn remaining(&mut self, key: &str, policy: &str) -> i64 {
        self.probes += 1;
        let id = format!("probe-{}", self.probes);
        let r = self.authorize(key, &id, 0).await;
        remaining_of(&r, policy)
    }

    async fn settle(
        &self,
        rid: &str,
        cost: pb::Money,
    ) -> Result<pb::SettleResponse, tonic::Status> {
        self.stack
            .authz()
            .settle(pb::SettleRequest {
                reservation_id: rid.into(),
                actual_cost: Some(cost),
                ..Default::default()
            })
            .await
            .map(tonic::Response::into_inner)
    }

    async fn record(&mut self, rid: &str) -> Option<String> {
        redis::cmd("GET")
            .arg(self.keys.reservation(partition_of(rid), rid))
            .query_async(&mut self.redis)
            .await
            .unwrap()
    }

    /// Waits (bounded) until the sweeper has expired every reservation of `rids`.
    async fn wait_expired(&mut self, rids: &[&str]) {
        for _ in 0..100 {
            let mut all = true;
            for rid in rids {
                let rec = self.record(rid).await.unwrap_or_default();
                all &= rec.starts_with("D\texpire\t");
            }
            if all {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the sweeper never expired {rids:?}");
    }

    /// The outbox entries of `rid`'s partition about `rid`, with the metadata
    /// merged in as the relay does.
    async fn events(&mut self, rid: &str) -> Vec<HashMap<String, String>> {
        let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
            .arg(self.keys.outbox(partition_of(rid)))
            .arg("-")
            .arg("+")
            .query_async(&mut self.redis)
            .await
            .unwrap();
        entries
            .into_iter()
            .map(|(_, fields)| fields.into_iter().collect::<HashMap<_, _>>())
            .filter(|f| f.get("reservation_id").map(String::as_str) == Some(rid))
            .map(|mut f| {
                caracal_authz::outbox::expand_meta(&mut f).unwrap();
                f
            })
            .collect()
    }

    async fn stop(self) {
        self.stack.stop().await.unwrap();
    }
}

fn of_kind<'a>(
    events: &'a [HashMap<String, String>],
    kind: &str,
) -> Vec<&'a HashMap<String, String>> {
    events.iter().filter(|e| e["kind"] == kind).collect()
}

/// Item 3: a Settle after expiry brings every policy's spend to the actual cost,
/// once, whatever expiry did there (charged the estimate, or released it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settle_after_expiry_charges_the_difference_once() {
    let mut h = Harness::start(|c| {
        c.reservations.provisional_charge_expiration = 1;
        c.reservations.provisional_charge_cleanup_interval = 1;
    })
    .await;
    // charging: calendar, on expiry charge. releasing: rolling, on expiry release.
    // child (charge) under parent (release): one reservation, both behaviours.
    let (charging, key_c) = h.agent("charging", None).await;
    let pol_c = h.policy(&charging, "calendar", "charge").await;
    let (releasing, key_r) = h.agent("releasing", None).await;
    let pol_r = h.policy(&releasing, "rolling", "release").await;
    let (parent, key_p) = h.agent("parent", None).await;
    let pol_p = h.policy(&parent, "calendar", "release").await;
    let (child, key_k) = h.agent("child", Some(&parent)).await;
    let pol_k = h.policy(&child, "rolling", "charge").await;

    let est = 3_000_000;
    let c_hi = h.authorize(&key_c, "c-hi", est).await;
    let c_lo = h.authorize(&key_c, "c-lo", est).await;
    let r_hi = h.authorize(&key_r, "r-hi", est).await;
    let r_lo = h.authorize(&key_r, "r-lo", est).await;
    let k = h.authorize(&key_k, "k", est).await;
    for a in [&c_hi, &c_lo, &r_hi, &r_lo, &k] {
        assert!(allowed(a), "{a:?}");
    }
    let rids = [
        c_hi.reservation_id.as_str(),
        c_lo.reservation_id.as_str(),
        r_hi.reservation_id.as_str(),
        r_lo.reservation_id.as_str(),
        k.reservation_id.as_str(),
    ];
    h.wait_expired(&rids).await;
    // Expiry did its part: charge 2 x 3 on charging, nothing on releasing.
    assert_eq!(h.remaining(&key_c, &pol_c).await, 10_000_000 - 2 * est);
    assert_eq!(h.remaining(&key_r, &pol_r).await, 10_000_000);
    assert_eq!(h.remaining(&key_k, &pol_k).await, 10_000_000 - est);
    assert_eq!(h.remaining(&key_p, &pol_p).await, 10_000_000);

    // Above the estimate on a charging policy: +2 on top of expiry's 3.
    let s = h
        .settle(&c_hi.reservation_id, usd(5_000_000))
        .await
        .unwrap();
    assert_eq!(s.charged.as_ref().unwrap().micros, 5_000_000);
    assert_eq!(s.reserved.as_ref().unwrap().micros, est);
    assert_eq!(s.overshoot.as_ref().unwrap().micros, 2_000_000);
    assert!(!s.already_settled);
    assert_eq!(
        s.remaining[0].remaining.as_ref().unwrap().micros,
        10_000_000 - 5_000_000 - est,
        "the other expired reservation still holds its 3"
    );
    // Below the estimate: expiry's over-charge of 2 is refunded.
    let s = h
        .settle(&c_lo.reservation_id, usd(1_000_000))
        .await
        .unwrap();
    assert_eq!(s.charged.as_ref().unwrap().micros, 1_000_000);
    assert_eq!(s.overshoot.as_ref().unwrap().micros, 0);
    assert_eq!(h.remaining(&key_c, &pol_c).await, 10_000_000 - 6_000_000);

    // Released at expiry: the whole actual cost is charged.
    let s = h
        .settle(&r_hi.reservation_id, usd(4_000_000))
        .await
        .unwrap();
    assert_eq!(s.charged.as_ref().unwrap().micros, 4_000_000);
    let s = h
        .settle(&r_lo.reservation_id, usd(1_000_000))
        .await
        .unwrap();
    assert_eq!(s.charged.as_ref().unwrap().micros, 1_000_000);
    assert_eq!(h.remaining(&key_r, &pol_r).await, 10_000_000 - 5_000_000);

    // Child charged 3 at expiry, parent released: both end at the actual 2.
    let s = h.settle(&k.reservation_id, usd(2_000_000)).await.unwrap();
    assert_eq!(s.charged.as_ref().unwrap().micros, 2_000_000);
    assert_eq!(h.remaining(&key_k, &pol_k).await, 10_000_000 - 2_000_000);
    assert_eq!(h.remaining(&key_p, &pol_p).await, 10_000_000 - 2_000_000);

    // Exactly once: a retried Settle (even with another amount) changes nothing.
    for rid in rids {
        let again = h.settle(rid, usd(9_000_000)).await.unwrap();
        assert!(again.already_settled, "{rid}: {again:?}");
    }
    let again = h.settle(&c_hi.reservation_id, usd(1)).await.unwrap();
    assert_eq!(again.charged.as_ref().unwrap().micros, 5_000_000);
    assert_eq!(h.remaining(&key_c, &pol_c).await, 10_000_000 - 6_000_000);
    assert_eq!(h.remaining(&key_r, &pol_r).await, 10_000_000 - 5_000_000);
    assert_eq!(h.remaining(&key_k, &pol_k).await, 10_000_000 - 2_000_000);
    assert_eq!(h.remaining(&key_p, &pol_p).await, 10_000_000 - 2_000_000);

    // Its own event, once, carrying the final charge, and one the relay accepts.
    let events = h.events(&c_hi.reservation_id).await;
    let late = of_kind(&events, "late_settle");
    assert_eq!(late.len(), 1, "{events:?}");
    assert_eq!(late[0]["type"], "charge");
    assert_eq!(
        late[0]["event_id"],
        format!("{}/settle", c_hi.reservation_id)
    );
    assert_eq!(late[0]["charged"], "5000000");
    assert_eq!(late[0]["reserved"], "3000000");
    assert_eq!(late[0]["policy_ids"], pol_c);
    assert_eq!(of_kind(&events, "expire_charge").len(), 1, "{events:?}");
    let converted = caracal_authz::outbox::convert_entry(late[0]).unwrap();
    assert_eq!(converted.kind, caracal_authz::outbox::EventKind::Charge);
    let k_events = h.events(&k.reservation_id).await;
    let k_late = of_kind(&k_events, "late_settle");
    assert_eq!(k_late.len(), 1, "{k_events:?}");
    let mut ids: Vec<&str> = k_late[0]["policy_ids"].split(',').collect();
    ids.sort_unstable();
    let mut want = vec![pol_k.as_str(), pol_p.as_str()];
    want.sort_unstable();
    assert_eq!(ids, want);
    h.stop().await;
}

/// Item 5: ReleaseByRequest frees what a failed Authorize reserved, and makes an
/// Authorize that arrives after it reserve nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_by_request_frees_or_forestalls_the_reservation() {
    let mut h = Harness::start(|_| {}).await;
    let (agent, key) = h.agent("timed-out", None).await;
    let pol = h.policy(&agent, "calendar", "charge").await;
    let mut authz = h.stack.authz();
    let by_request = |request_id: &str| pb::ReleaseByRequestRequest {
        request_id: request_id.into(),
        credential: credential(&key),
        reason: "authorize_timeout".into(),
    };

    // Reserved, but the gateway never saw the answer: released by request id.
    let a = h.authorize(&key, "slow-1", 2_000_000).await;
    assert!(allowed(&a), "{a:?}");
    assert_eq!(h.remaining(&key, &pol).await, 8_000_000);
    let r = authz
        .release_by_request(by_request("slow-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.released.as_ref().unwrap().micros, 2_000_000);
    assert!(!r.already_released);
    assert_eq!(h.remaining(&key, &pol).await, 10_000_000);
    let events = h.events(&a.reservation_id).await;
    let released = of_kind(&events, "release");
    assert_eq!(released.len(), 1, "{events:?}");
    assert_eq!(released[0]["reason"], "authorize_timeout");
    assert_eq!(released[0]["amount"], "2000000");
    // Idempotent.
    let r = authz
        .release_by_request(by_request("slow-1"))
        .await
        .unwrap()
        .into_inner();
    assert!(r.already_released);
    assert_eq!(r.released.as_ref().unwrap().micros, 2_000_000);
    assert_eq!(h.remaining(&key, &pol).await, 10_000_000);
    assert_eq!(
        of_kind(&h.events(&a.reservation_id).await, "release").len(),
        1
    );

    // Released before the Authorize ran: that Authorize reserves nothing.
    let r = authz
        .release_by_request(by_request("slow-2"))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.already_released);
    assert_eq!(r.released.as_ref().unwrap().micros, 0);
    let late = h.authorize(&key, "slow-2", 2_000_000).await;
    assert!(!allowed(&late), "{late:?}");
    assert_eq!(
        late.reason,
        pb::DenyReason::RequestFinished as i32,
        "{late:?}"
    );
    assert!(late.message.contains("released"), "{}", late.message);
    assert_eq!(
        h.remaining(&key, &pol).await,
        10_000_000,
        "nothing reserved"
    );
    let r = authz
        .release_by_request(by_request("slow-2"))
        .await
        .unwrap()
        .into_inner();
    assert!(r.already_released);
    assert_eq!(h.remaining(&key, &pol).await, 10_000_000);

    // An unknown credential names no agent.
    let err = authz
        .release_by_request(pb::ReleaseByRequestRequest {
            request_id: "x".into(),
            credential: credential("cak_not-a-key"),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    h.stop().await;
}

/// Item 10: Settle in another currency than the reservation's is refused, and
/// changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settle_refuses_another_currency() {
    let mut h = Harness::start(|_| {}).await;
    let (agent, key) = h.agent("usd-only", None).await;
    let pol = h.policy(&agent, "calendar", "charge").await;
    h.stack
        .set_token_price("openai", "priced-in-eur", "EUR", ["1.00", "1.00", "1.00"])
        .await
        .unwrap();
    let a = h.authorize(&key, "cur-1", 1_000_000).await;
    assert!(allowed(&a), "{a:?}");

    let err = h
        .settle(&a.reservation_id, money("EUR", 500))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("EUR") && err.message().contains("USD"),
        "{}",
        err.message()
    );
    assert_eq!(
        h.remaining(&key, &pol).await,
        9_000_000,
        "still just reserved"
    );

    let err = h
        .stack
        .authz()
        .settle(pb::SettleRequest {
            reservation_id: a.reservation_id.clone(),
            usage: Some(pb::TokenUsage {
                input_tokens: 1_000,
                output_tokens: 1_000,
                cached_input_tokens: 0,
            }),
            provider: "openai".into(),
            model: "priced-in-eur".into(),
            actual_cost: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("EUR"), "{}", err.message());
    assert_eq!(
        h.remaining(&key, &pol).await,
        9_000_000,
        "still just reserved"
    );
    assert!(
        of_kind(&h.events(&a.reservation_id).await, "settle").is_empty(),
        "no charge event"
    );

    // The reservation is intact: a Settle in its currency charges normally.
    let s = h.settle(&a.reservation_id, usd(400_000)).await.unwrap();
    assert_eq!(s.charged.as_ref().unwrap().micros, 400_000);
    assert!(!s.already_settled);
    assert_eq!(h.remaining(&key, &pol).await, 9_600_000);
    // A retry in another currency is refused too, not answered as settled.
    let err = h
        .settle(&a.reservation_id, money("EUR", 400_000))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    h.stop().await;
}

/// Item 11: a reservation the sweeper cannot finish does not stop it from
/// expiring the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_reservation_does_not_stop_the_sweep() {
    // Reservations due after 1 s; the stack's own sweeper waits an hour, so the
    // sweep below is the only one.
    let mut h = Harness::start(|c| {
        c.reservations.provisional_charge_expiration = 1;
        c.reservations.provisional_charge_cleanup_interval = 3_600;
    })
    .await;
    let (agent, key) = h.agent("swept", None).await;
    let pol = h.policy(&agent, "calendar", "charge").await;
    let a = h.authorize(&key, "due-1", 1_000_000).await;
    let b = h.authorize(&key, "due-2", 2_000_000).await;
    assert!(allowed(&a) && allowed(&b));
    let p = partition_of(&a.reservation_id);

    // Two broken records at the front of the same expiry index: a garbled header,
    // and a good header with a garbled policy line.
    let bad1 = format!("rsv_{p}_{}", "0".repeat(32));
    let bad2 = format!("rsv_{p}_{}", "1".repeat(32));
    let bad2_record = "L\t100\tUSD\t1\nnot a policy line\n{}".to_owned();
    let _: () = redis::pipe()
        .cmd("SET")
        .arg(h.keys.reservation(p, &bad1))
        .arg("L\tgarbage")
        .ignore()
        .cmd("SET")
        .arg(h.keys.reservation(p, &bad2))
        .arg(&bad2_record)
        .ignore()
        .cmd("ZADD")
        .arg(h.keys.expiry(p))
        .arg(0)
        .arg(&bad1)
        .arg(1)
        .arg(&bad2)
        .ignore()
        .query_async(&mut h.redis)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1_200)).await;

    let store = BudgetStore::new(
        &h.stack.redis.endpoint(Duration::from_secs(5)),
        h.keys.clone(),
        1,
        caracal_authz::budget::ReplicaAck::NONE,
    )
    .unwrap();
    let sweep = caracal_authz::sweeper::sweep_once(&store, 60)
        .await
        .unwrap();
    assert_eq!(sweep.expired, 2, "{sweep:?}");
    assert_eq!(sweep.failed, 2, "{sweep:?}");
    for rid in [&a.reservation_id, &b.reservation_id] {
        let rec = h.record(rid).await.unwrap_or_default();
        assert!(rec.starts_with("D\texpire\t"), "{rid}: {rec:?}");
    }
    assert_eq!(
        h.remaining(&key, &pol).await,
        7_000_000,
        "expiry charged 1 + 2"
    );
    // The broken ones are left as they were, for the operator; the next sweep
    // counts them again and still finishes nothing twice.
    assert_eq!(h.record(&bad2).await.as_deref(), Some(bad2_record.as_str()));
    let due: Vec<String> = redis::cmd("ZRANGE")
        .arg(h.keys.expiry(p))
        .arg(0)
        .arg(-1)
        .query_async(&mut h.redis)
        .await
        .unwrap();
    assert!(due.contains(&bad1) && due.contains(&bad2), "{due:?}");
    let again = caracal_authz::sweeper::sweep_once(&store, 60)
        .await
        .unwrap();
    assert_eq!(again.failed, 2, "{again:?}");
    assert!(again.expired <= 2, "only the probes can be due: {again:?}");
    assert_eq!(h.remaining(&key, &pol).await, 7_000_000);
    h.stop().await;
}

/// Item 11: a retried Authorize of a request whose reservation has ended is
/// refused (REQUEST_FINISHED) and reserves nothing: reusing a request id must not
/// buy a free call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_request_is_not_admitted_again() {
    let mut h = Harness::start(|c| {
        c.reservations.provisional_charge_expiration = 1;
        c.reservations.provisional_charge_cleanup_interval = 1;
    })
    .await;
    let (agent, key) = h.agent("reuser", None).await;
    let pol = h.policy(&agent, "calendar", "release").await;
    let mut authz = h.stack.authz();

    let settled = h.authorize(&key, "reused-s", 1_000_000).await;
    let released = h.authorize(&key, "reused-r", 1_000_000).await;
    let expired = h.authorize(&key, "reused-e", 1_000_000).await;
    h.settle(&settled.reservation_id, usd(700_000))
        .await
        .unwrap();
    authz
        .release(pb::ReleaseRequest {
            reservation_id: released.reservation_id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap();
    h.wait_expired(&[expired.reservation_id.as_str()]).await;
    assert_eq!(h.remaining(&key, &pol).await, 10_000_000 - 700_000);

    for (request_id, first, how) in [
        ("reused-s", &settled, "settled"),
        ("reused-r", &released, "released"),
        ("reused-e", &expired, "expired"),
    ] {
        let again = h.authorize(&key, request_id, 1_000_000).await;
        assert!(!allowed(&again), "{request_id}: {again:?}");
        assert_eq!(
            again.reason,
            pb::DenyReason::RequestFinished as i32,
            "{again:?}"
        );
        assert!(again.message.contains(how), "{}", again.message);
        assert_eq!(again.reservation_id, first.reservation_id);
        assert_eq!(remaining_of(&again, &pol), 10_000_000 - 700_000);
    }
    assert_eq!(
        h.remaining(&key, &pol).await,
        10_000_000 - 700_000,
        "nothing reserved"
    );
    // The refusal is a decision event like the others.
    let events = h.events(&settled.reservation_id).await;
    let denied: Vec<_> = events
        .iter()
        .filter(|e| e.get("reason").map(String::as_str) == Some("request_finished"))
        .collect();
    assert_eq!(denied.len(), 1, "{events:?}");
    assert_eq!(denied[0]["decision"], "deny");
    caracal_authz::outbox::convert_entry(denied[0]).unwrap();
    h.stop().await;
}
