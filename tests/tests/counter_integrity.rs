//! Budget counters across admin changes (issue 11 item 9), against a real
//! authz-service, Redis and PostgreSQL: a change that would move a policy to other
//! (empty) counters — re-parenting into another partition, a window change,
//! calendar <-> rolling — is refused while the policy has spend or reservations in
//! its current window, so the spend keeps counting; without spend it goes through,
//! and a replica still on the old configuration cannot spend where the new one will
//! not look (the old counters are fenced).

use std::time::Duration;

use caracal_authz::budget::KeySpace;
use caracal_proto::v1 as pb;
use caracal_tests::TestStack;
use tonic::Code;

/// $1 in micros.
const USD1: i64 = 1_000_000;

fn usd(micros: i64) -> pb::Money {
    pb::Money {
        currency: "USD".into(),
        micros,
        amount: String::new(),
    }
}

fn remaining_of(r: &pb::AuthorizeResponse, policy: &str) -> i64 {
    r.remaining
        .iter()
        .find(|p| p.policy_id == policy)
        .and_then(|p| p.remaining.as_ref())
        .map(|m| m.micros)
        .unwrap_or_else(|| panic!("policy {policy} not in {r:?}"))
}

fn allowed(r: &pb::AuthorizeResponse) -> bool {
    r.decision == pb::Decision::Allow as i32
}

async fn authorize(
    stack: &TestStack,
    key: &str,
    request_id: &str,
    micros: i64,
) -> pb::AuthorizeResponse {
    stack
        .authz()
        .authorize(caracal_tests::authorize_request(key, request_id, micros))
        .await
        .unwrap()
        .into_inner()
}

/// Authorizes `micros` and settles it at the same cost: `micros` spent.
async fn spend(stack: &TestStack, key: &str, request_id: &str, micros: i64) {
    let r = authorize(stack, key, request_id, micros).await;
    assert!(allowed(&r), "{r:?}");
    let s = stack
        .authz()
        .settle(pb::SettleRequest {
            reservation_id: r.reservation_id,
            actual_cost: Some(usd(micros)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.charged.unwrap().micros, micros);
}

/// Authorizes until the hot path has picked up an admin change (the epoch poll):
/// until `ready` holds for an allowed answer. Refused answers reserve nothing.
async fn authorize_when(
    stack: &TestStack,
    key: &str,
    request_id: &str,
    micros: i64,
    ready: impl Fn(&pb::AuthorizeResponse) -> bool,
) -> pb::AuthorizeResponse {
    let mut last = None;
    for i in 0..60 {
        let r = authorize(stack, key, &format!("{request_id}-{i}"), micros).await;
        if allowed(&r) && ready(&r) {
            return r;
        }
        if allowed(&r) {
            // Allowed on a configuration we are not waiting for: give it back.
            stack
                .authz()
                .release(pb::ReleaseRequest {
                    reservation_id: r.reservation_id.clone(),
                    reason: "test".into(),
                })
                .await
                .unwrap();
        }
        last = Some(r);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the change never reached the hot path: {last:?}");
}

fn partition(stack: &TestStack, root: &str) -> u16 {
    KeySpace::new(stack.key_prefix.clone(), 4).partition_of(root)
}

/// A new root agent whose partition is (`same` = true) or is not `p`.
async fn root_in(stack: &TestStack, name: &str, p: u16, same: bool) -> String {
    for i in 0..64 {
        let (id, _) = stack
            .agent_with_key(&format!("{name}-{i}"), None)
            .await
            .unwrap();
        if (partition(stack, &id) == p) == same {
            return id;
        }
    }
    panic!("no root agent in the wanted partition after 64 tries");
}

async fn move_agent(
    stack: &TestStack,
    agent: &str,
    parent: &str,
) -> Result<pb::Agent, tonic::Status> {
    stack
        .agents()
        .update_agent(pb::UpdateAgentRequest {
            id: agent.into(),
            parent_id: Some(parent.into()),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

async fn change_window(
    stack: &TestStack,
    policy: &str,
    window: &str,
    window_type: &str,
) -> Result<pb::Policy, tonic::Status> {
    stack
        .policies()
        .update_policy(pb::UpdatePolicyRequest {
            id: policy.into(),
            time_window: Some(window.into()),
            window_type: Some(window_type.into()),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reparenting_into_another_partition_with_spend_is_refused_and_spend_still_counts() {
    let stack = TestStack::start().await.unwrap();
    let (root_a, _) = stack.agent_with_key("root-a", None).await.unwrap();
    let (child, key) = stack.agent_with_key("child", Some(&root_a)).await.unwrap();
    let pol = stack
        .usd_policy(&child, "10", "monthly", "calendar", "")
        .await
        .unwrap();
    spend(&stack, &key, "spent", 3 * USD1).await;
    let pa = partition(&stack, &root_a);

    // Under a root of another partition, the child's counters would be empty.
    let root_b = root_in(&stack, "root-b", pa, false).await;
    let err = move_agent(&stack, &child, &root_b).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains(&pol), "{}", err.message());
    assert!(err.message().contains("3.00 USD"), "{}", err.message());
    let still = stack
        .agents()
        .get_agent(pb::GetAgentRequest {
            id_or_name: child.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(still.parent_id, root_a, "a refused move changes nothing");
    // Making the child a root of its own moves it too (its own partition may differ;
    // the same rule applies): whatever the partition, the spend must still count.
    let as_root = move_agent(&stack, &child, "").await;
    if partition(&stack, &child) != pa {
        assert_eq!(as_root.unwrap_err().code(), Code::FailedPrecondition);
    } else {
        // Same partition, same counters: allowed, and moved back.
        as_root.unwrap();
        move_agent(&stack, &child, &root_a).await.unwrap();
    }

    // The spend still counts: $10 - $3 spent - $1 asked = $6 (old code: the move
    // went through and the child had $9 left in the new partition's empty counter).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = authorize(&stack, &key, "after-refusal", USD1).await;
    assert!(allowed(&r), "{r:?}");
    assert_eq!(remaining_of(&r, &pol), 6 * USD1);

    // A root in the same partition: same counters, the move is exact and allowed.
    let root_c = root_in(&stack, "root-c", pa, true).await;
    let pol_c = stack
        .usd_policy(&root_c, "50", "monthly", "calendar", "")
        .await
        .unwrap();
    move_agent(&stack, &child, &root_c).await.unwrap();
    let r = authorize_when(&stack, &key, "same-partition", USD1, |r| {
        r.remaining.iter().any(|p| p.policy_id == pol_c)
    })
    .await;
    // $10 - $3 spent - $1 still reserved - $1 asked.
    assert_eq!(remaining_of(&r, &pol), 5 * USD1);
    assert_eq!(
        remaining_of(&r, &pol_c),
        49 * USD1,
        "new ancestor counts from the move"
    );
    stack.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reparenting_without_spend_moves_and_budgets_work_after() {
    let stack = TestStack::start().await.unwrap();
    let (root_a, _) = stack.agent_with_key("root-a", None).await.unwrap();
    let (child, key) = stack.agent_with_key("child", Some(&root_a)).await.unwrap();
    let pol = stack
        .usd_policy(&child, "10", "monthly", "calendar", "")
        .await
        .unwrap();
    let root_b = root_in(&stack, "root-b", partition(&stack, &root_a), false).await;
    let pol_b = stack
        .usd_policy(&root_b, "5", "monthly", "calendar", "")
        .await
        .unwrap();
    let moved = move_agent(&stack, &child, &root_b).await.unwrap();
    assert_eq!(moved.parent_id, root_b);

    let r = authorize_when(&stack, &key, "moved", 2 * USD1, |r| {
        r.remaining.iter().any(|p| p.policy_id == pol_b)
    })
    .await;
    assert_eq!(remaining_of(&r, &pol), 8 * USD1);
    assert_eq!(remaining_of(&r, &pol_b), 3 * USD1);
    // And the new hierarchy's limit holds: $3 left on the new root.
    let r = authorize(&stack, &key, "too-much", 4 * USD1).await;
    assert!(!allowed(&r), "{r:?}");
    assert_eq!(r.policy_id, pol_b);
    stack.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_window_change_with_spend_is_refused() {
    let stack = TestStack::start().await.unwrap();
    let (agent, key) = stack.agent_with_key("roller", None).await.unwrap();
    let pol = stack
        .usd_policy(&agent, "10", "hourly", "rolling", "")
        .await
        .unwrap();
    spend(&stack, &key, "spent", 3 * USD1).await;
    // An open reservation counts too: $3 spent + $2 reserved.
    let open = authorize(&stack, &key, "open", 2 * USD1).await;
    assert!(allowed(&open), "{open:?}");

    let err = change_window(&stack, &pol, "daily", "rolling")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains(&pol), "{}", err.message());
    assert!(err.message().contains("5.00 USD"), "{}", err.message());
    let p = stack
        .policies()
        .get_policy(pb::GetPolicyRequest { id: pol.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((p.time_window.as_str(), p.version), ("hourly", 1));

    // Old code: the window became daily and the remaining budget jumped back to
    // $10 - $1 = $9. Now: $10 - $3 - $2 - $1 = $4.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = authorize(&stack, &key, "after", USD1).await;
    assert!(allowed(&r), "{r:?}");
    assert_eq!(remaining_of(&r, &pol), 4 * USD1);

    // A limit change keeps the counters: allowed, and the spend carries over.
    stack
        .policies()
        .update_policy(pb::UpdatePolicyRequest {
            id: pol.clone(),
            limit: Some("20".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let r = authorize_when(&stack, &key, "raised", USD1, |r| {
        r.remaining
            .iter()
            .any(|p| p.limit.as_ref().is_some_and(|l| l.micros == 20 * USD1))
    })
    .await;
    // $20 - $3 spent - $2 open - $1 open - $1 asked.
    assert_eq!(remaining_of(&r, &pol), 13 * USD1);
    stack.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calendar_rolling_switch_with_spend_is_refused() {
    let stack = TestStack::start().await.unwrap();
    let (agent, key) = stack.agent_with_key("switcher", None).await.unwrap();
    let pol = stack
        .usd_policy(&agent, "10", "monthly", "calendar", "")
        .await
        .unwrap();
    spend(&stack, &key, "spent", 3 * USD1).await;

    for (window, window_type) in [
        ("monthly", "rolling"),
        ("daily", "calendar"),
        ("weekly", "rolling"),
    ] {
        let err = change_window(&stack, &pol, window, window_type)
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::FailedPrecondition,
            "{window} {window_type}: {err:?}"
        );
        assert!(err.message().contains("3.00 USD"), "{}", err.message());
    }
    // Old code: rolling started from zero, $10 - $1 = $9 left. Now: $10 - $3 - $1.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = authorize(&stack, &key, "after", USD1).await;
    assert!(allowed(&r), "{r:?}");
    assert_eq!(remaining_of(&r, &pol), 6 * USD1);
    stack.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_change_without_spend_goes_through_and_counts_afresh() {
    let stack = TestStack::start().await.unwrap();
    let (agent, key) = stack.agent_with_key("fresh", None).await.unwrap();
    let pol = stack
        .usd_policy(&agent, "10", "hourly", "rolling", "")
        .await
        .unwrap();
    let changed = change_window(&stack, &pol, "monthly", "calendar")
        .await
        .unwrap();
    assert_eq!(
        (changed.time_window.as_str(), changed.version),
        ("monthly", 2)
    );
    let r = authorize_when(&stack, &key, "fresh", 2 * USD1, |_| true).await;
    assert_eq!(remaining_of(&r, &pol), 8 * USD1);
    // Back to rolling is now refused: the daily counter holds the $2 reservation.
    let err = change_window(&stack, &pol, "hourly", "rolling")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("2.00 USD"), "{}", err.message());
    stack.stop().await.unwrap();
}

/// A replica whose cache still holds the old configuration (here: the only
/// replica, with a 1-hour epoch poll and cache TTL) must not spend on counters the
/// new configuration no longer reads: the change fences them atomically with the
/// check that they are empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_replica_cannot_spend_on_retired_counters() {
    let stack = TestStack::start_with(|c| {
        c.budget.config_poll_interval = 3600;
        c.cache.policy_cache_ttl = 3600;
    })
    .await
    .unwrap();
    let (root_a, _) = stack.agent_with_key("root-a", None).await.unwrap();
    let (child, key) = stack.agent_with_key("child", Some(&root_a)).await.unwrap();
    let pol = stack
        .usd_policy(&child, "10", "hourly", "rolling", "")
        .await
        .unwrap();
    let (solo, solo_key) = stack.agent_with_key("solo", None).await.unwrap();
    let solo_pol = stack
        .usd_policy(&solo, "10", "monthly", "calendar", "")
        .await
        .unwrap();
    // Warm the cache (reserve, then release: nothing stays counted).
    for (k, id) in [(&key, "warm"), (&solo_key, "warm-solo")] {
        let r = authorize(&stack, k, id, USD1).await;
        assert!(allowed(&r), "{r:?}");
        stack
            .authz()
            .release(pb::ReleaseRequest {
                reservation_id: r.reservation_id,
                reason: "warm-up".into(),
            })
            .await
            .unwrap();
    }

    // Nothing spent: both changes go through...
    let root_b = root_in(&stack, "root-b", partition(&stack, &root_a), false).await;
    move_agent(&stack, &child, &root_b).await.unwrap();
    change_window(&stack, &solo_pol, "monthly", "rolling")
        .await
        .unwrap();
    // ...but this replica still uses the old counters, now fenced: refused, nothing
    // reserved (old code: allowed, $1 spent where the new configuration never looks).
    for (k, p) in [(&key, &pol), (&solo_key, &solo_pol)] {
        let r = authorize(&stack, k, "stale", USD1).await;
        assert!(!allowed(&r), "{r:?}");
        assert_eq!(r.reason, pb::DenyReason::BudgetExceeded as i32, "{r:?}");
        assert_eq!(&r.policy_id, p);
    }
    stack.stop().await.unwrap();
}

/// A change undone at once: the counter the policy returns to loses the fence the
/// first change put on it (else the policy would refuse everything until the fence
/// expired, cache TTL + poll interval later).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_undone_at_once_lifts_its_fence() {
    let stack = TestStack::start().await.unwrap();
    let (agent, key) = stack.agent_with_key("undo", None).await.unwrap();
    let pol = stack
        .usd_policy(&agent, "10", "hourly", "rolling", "")
        .await
        .unwrap();
    change_window(&stack, &pol, "monthly", "calendar")
        .await
        .unwrap();
    let back = change_window(&stack, &pol, "hourly", "rolling")
        .await
        .unwrap();
    assert_eq!((back.time_window.as_str(), back.version), ("hourly", 3));
    let r = authorize_when(&stack, &key, "undone", 3 * USD1, |_| true).await;
    assert_eq!(remaining_of(&r, &pol), 7 * USD1);
    stack.stop().await.unwrap();
}

async fn change_currency(
    stack: &TestStack,
    policy: &str,
    currency: &str,
) -> Result<pb::Policy, tonic::Status> {
    stack
        .policies()
        .update_policy(pb::UpdatePolicyRequest {
            id: policy.into(),
            currency: Some(currency.into()),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

/// Issue 22 item 6: budget counters hold micros without a currency, so a currency
/// change keeps the counters; with spend (or an open reservation) in them, the
/// USD spend would count against the JPY limit. Refused then; allowed when the
/// counters are empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn currency_change_with_spend_or_reservations_is_refused() {
    let stack = TestStack::start().await.unwrap();
    let (agent, key) = stack.agent_with_key("cur-spent", None).await.unwrap();
    let daily = stack
        .usd_policy(&agent, "10", "daily", "calendar", "")
        .await
        .unwrap();
    spend(&stack, &key, "spent", 3 * USD1).await;

    let err = change_currency(&stack, &daily, "JPY").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains(&daily), "{}", err.message());
    assert!(err.message().contains("3.00 USD"), "{}", err.message());
    assert!(err.message().contains("JPY"), "{}", err.message());
    let p = stack
        .policies()
        .get_policy(pb::GetPolicyRequest { id: daily.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (p.limit.unwrap().currency.as_str(), p.version),
        ("USD", 1),
        "a refused change changes nothing"
    );
    // A currency change together with a window change is refused the same way.
    let err = stack
        .policies()
        .update_policy(pb::UpdatePolicyRequest {
            id: daily.clone(),
            currency: Some("JPY".into()),
            time_window: Some("monthly".into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    // The same currency named again is no change.
    let same = change_currency(&stack, &daily, "USD").await.unwrap();
    assert_eq!(same.limit.unwrap().currency, "USD");

    // An open reservation alone (nothing spent yet) holds the counter too: a
    // rolling policy of another agent with $2 reserved.
    let (agent2, key2) = stack.agent_with_key("cur-open", None).await.unwrap();
    let rolling = stack
        .usd_policy(&agent2, "10", "hourly", "rolling", "")
        .await
        .unwrap();
    let open = authorize(&stack, &key2, "open", 2 * USD1).await;
    assert!(allowed(&open), "{open:?}");
    let err = change_currency(&stack, &rolling, "JPY").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("2.00 USD"), "{}", err.message());
    // Released: the counter holds nothing any more and the change goes through.
    stack
        .authz()
        .release(pb::ReleaseRequest {
            reservation_id: open.reservation_id,
            reason: "test".into(),
        })
        .await
        .unwrap();
    let changed = change_currency(&stack, &rolling, "JPY").await.unwrap();
    assert_eq!(
        (changed.limit.unwrap().currency.as_str(), changed.version),
        ("JPY", 2)
    );

    // A policy whose counters never held anything changes currency freely, and
    // then counts in the new currency.
    let (agent3, key3) = stack.agent_with_key("cur-empty", None).await.unwrap();
    let empty = stack
        .usd_policy(&agent3, "10", "monthly", "calendar", "")
        .await
        .unwrap();
    let changed = change_currency(&stack, &empty, "EUR").await.unwrap();
    assert_eq!(
        (changed.limit.unwrap().currency.as_str(), changed.version),
        ("EUR", 2)
    );
    let mut last = None;
    for i in 0..60 {
        let mut req = caracal_tests::authorize_request(&key3, &format!("eur-{i}"), USD1);
        if let Some(m) = req.estimated_cost.as_mut() {
            m.currency = "EUR".into();
        }
        let r = stack.authz().authorize(req).await.unwrap().into_inner();
        if allowed(&r) {
            assert_eq!(remaining_of(&r, &empty), 9 * USD1);
            last = None;
            break;
        }
        last = Some(r);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(last.is_none(), "EUR never allowed: {last:?}");
    stack.stop().await.unwrap();
}
