//! Window boundaries on the real Redis scripts (calendar roll-over, rolling windows
//! sliding), and the service's behaviour when Redis goes away and comes back.

use std::time::Duration;

use caracal_authz::{
    authorize::policy_slot,
    budget::{
        store::{ReserveOutcome, ReserveRequest},
        BudgetStore, KeySpace, ReplicaAck,
    },
    catalog::PolicyInfo,
};
use caracal_domain::{
    money::Currency,
    policy::OnExpiry,
    window::{TimeWindow, WindowType},
};
use caracal_proto::v1 as pb;
use caracal_tests::{own_redis::OwnRedis, redis_url, standalone, TestStack};
use chrono::{DateTime, Utc};
use tonic::Code;
use uuid::Uuid;

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

struct Fixture {
    store: BudgetStore,
    policy: PolicyInfo,
    n: usize,
}

impl Fixture {
    fn new(window: TimeWindow, window_type: WindowType, limit: i64) -> Self {
        let prefix = format!("t{}", Uuid::new_v4().simple());
        let store = BudgetStore::new(
            &standalone(&redis_url(), Duration::from_secs(2)),
            KeySpace::new(prefix, 4),
            1,
            ReplicaAck::NONE,
        )
        .unwrap();
        let policy = PolicyInfo {
            id: Uuid::now_v7(),
            agent_id: Uuid::now_v7(),
            limit_micros: limit,
            currency: Currency::parse("USD").unwrap(),
            window,
            window_type,
            on_expiry: OnExpiry::Charge,
        };
        Self {
            store,
            policy,
            n: 0,
        }
    }

    /// Tries to reserve `amount` at instant `now`; true when admitted.
    async fn reserve(&mut self, amount: i64, now: &str) -> bool {
        if self.n == 0 {
            // The budget state of a new deployment, as the service establishes it
            // (budget::state): the scripts decide nothing without it.
            let partitions: Vec<u16> = (0..self.store.keys().partitions()).collect();
            caracal_authz::budget::state::write_markers(&self.store, &partitions, "test")
                .await
                .unwrap();
        }
        self.n += 1;
        let now = at(now);
        let slot = policy_slot(self.store.keys(), 0, &self.policy, now);
        let rid = format!("rsv_0_{}", Uuid::now_v7().simple());
        let agent = self.policy.agent_id.to_string();
        let outcome = self
            .store
            .reserve(&ReserveRequest {
                partition: 0,
                request_id: &format!("req-{}", self.n),
                reservation_id: &rid,
                amount_micros: amount,
                now_ms: now.timestamp_millis(),
                expires_at_ms: now.timestamp_millis() + 300_000,
                agent_id: &agent,
                root_agent_id: &agent,
                currency: "USD",
                provider: "openai",
                model: "m",
                resource: "r",
                allow_event_id: &format!("{rid}/authorize"),
                deny_event_id: &format!("deny/{}", self.n),
                policies: std::slice::from_ref(&slot),
                traceparent: None,
            })
            .await
            .unwrap();
        match outcome {
            ReserveOutcome::Allowed { .. } => true,
            ReserveOutcome::Denied { .. } => false,
            ReserveOutcome::Duplicate { .. } => panic!("unexpected duplicate"),
        }
    }

    async fn cleanup(self) {
        caracal_tests::delete_redis_prefix(self.store.keys().prefix())
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn calendar_windows_roll_over_at_utc_boundaries() {
    // (window, last instant of one window, first instant of the next). Instants are
    // in the future: a counter expires a day after its window ends, and Redis drops
    // a key whose expiry is already past.
    let cases = [
        (
            TimeWindow::Hourly,
            "2027-02-03T10:59:59.999Z",
            "2027-02-03T11:00:00Z",
        ),
        (
            TimeWindow::Daily,
            "2027-02-03T23:59:59Z",
            "2027-02-04T00:00:00Z",
        ),
        // ISO weeks start on Monday: Sunday 7 Feb 2027 -> Monday 8 Feb.
        (
            TimeWindow::Weekly,
            "2027-02-07T23:59:59Z",
            "2027-02-08T00:00:00Z",
        ),
        (
            TimeWindow::Monthly,
            "2027-01-31T23:59:59Z",
            "2027-02-01T00:00:00Z",
        ),
        // Leap day belongs to February; March starts a new month.
        (
            TimeWindow::Monthly,
            "2028-02-29T23:59:59Z",
            "2028-03-01T00:00:00Z",
        ),
        (
            TimeWindow::Monthly,
            "2027-12-31T23:59:59Z",
            "2028-01-01T00:00:00Z",
        ),
    ];
    for (window, last, next) in cases {
        let mut f = Fixture::new(window, WindowType::Calendar, 100);
        assert!(f.reserve(80, last).await, "{window:?} first reservation");
        assert!(
            !f.reserve(30, last).await,
            "{window:?}: 80 + 30 > 100 in one window"
        );
        assert!(
            f.reserve(20, last).await,
            "{window:?}: exactly the limit is allowed"
        );
        assert!(
            f.reserve(30, next).await,
            "{window:?}: a new window starts at {next}"
        );
        assert!(
            !f.reserve(71, next).await,
            "{window:?}: and counts from zero"
        );
        f.cleanup().await;
    }
    // Mid-week days share the weekly window (Monday .. Sunday).
    let mut f = Fixture::new(TimeWindow::Weekly, WindowType::Calendar, 100);
    assert!(f.reserve(60, "2027-02-08T00:00:00Z").await);
    assert!(
        !f.reserve(60, "2027-02-14T23:59:59Z").await,
        "same ISO week"
    );
    f.cleanup().await;
    // `total` never rolls over.
    let mut f = Fixture::new(TimeWindow::Total, WindowType::Calendar, 100);
    assert!(f.reserve(60, "2027-02-08T00:00:00Z").await);
    assert!(!f.reserve(60, "2031-07-01T00:00:00Z").await);
    f.cleanup().await;
}

#[tokio::test]
async fn rolling_windows_slide_and_never_under_count() {
    // Hourly rolling, 1-minute buckets: spend at 10:00:30 counts until the bucket
    // 10:00 leaves the window, i.e. while now - 1h is before 10:01.
    let mut f = Fixture::new(TimeWindow::Hourly, WindowType::Rolling, 100);
    assert!(f.reserve(80, "2026-02-03T10:00:30Z").await);
    assert!(
        !f.reserve(30, "2026-02-03T10:30:00Z").await,
        "inside the hour"
    );
    assert!(
        !f.reserve(30, "2026-02-03T11:00:29Z").await,
        "exactly an hour later: still counted"
    );
    // Granularity: at 11:00:45 the spend is more than an hour old, but its bucket
    // still overlaps the window, so it still counts (early refusal, never overshoot).
    assert!(
        !f.reserve(30, "2026-02-03T11:00:45Z").await,
        "bucket still overlaps the window"
    );
    assert!(
        f.reserve(30, "2026-02-03T11:01:00Z").await,
        "the bucket has left the window"
    );
    f.cleanup().await;

    // Daily rolling: spend spread over a day keeps counting until it is 24h old.
    let mut f = Fixture::new(TimeWindow::Daily, WindowType::Rolling, 100);
    assert!(f.reserve(50, "2026-02-03T08:00:00Z").await);
    assert!(f.reserve(50, "2026-02-03T20:00:00Z").await);
    assert!(
        !f.reserve(1, "2026-02-04T07:59:00Z").await,
        "both still inside 24h"
    );
    assert!(
        f.reserve(50, "2026-02-04T08:15:00Z").await,
        "the first 50 has left the window"
    );
    assert!(!f.reserve(1, "2026-02-04T08:15:00Z").await);
    f.cleanup().await;
}

#[tokio::test]
async fn redis_outage_fails_closed_and_recovers() {
    let port = caracal_tests::envoy::free_port().unwrap();
    let mut redis = OwnRedis::start_on(port).await;
    let stack = TestStack::start_with(|c| {
        c.redis.url = format!("redis://127.0.0.1:{port}");
        c.redis.timeout_ms = 500;
    })
    .await
    .unwrap();
    let (_, key) = stack.agent_with_key("fragile", None).await.unwrap();
    let agent_id = stack
        .agents()
        .get_agent(pb::GetAgentRequest {
            id_or_name: "fragile".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .id;
    stack
        .usd_policy(&agent_id, "10", "daily", "calendar", "")
        .await
        .unwrap();
    let req = |id: &str| caracal_tests::authorize_request(&key, id, 1000);
    let mut authz = stack.authz();
    let ok = authz.authorize(req("before")).await.unwrap().into_inner();
    assert_eq!(ok.decision, pb::Decision::Allow as i32);

    redis.kill();
    let started = std::time::Instant::now();
    let err = authz.authorize(req("during")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "fails fast, not after the request timeout"
    );
    let err = authz
        .settle(pb::SettleRequest {
            reservation_id: ok.reservation_id.clone(),
            actual_cost: Some(pb::Money {
                currency: "USD".into(),
                micros: 1,
                amount: String::new(),
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);

    // Redis returns empty (this one keeps nothing): the service reaches it again by
    // itself (reloading its scripts), but an emptied budget decides nothing: every
    // Authorize is refused until the budget state is rebuilt from the ledger.
    let mut redis = OwnRedis::start_on(port).await;
    let mut refused = None;
    for i in 0..50 {
        match authz.authorize(req(&format!("after-{i}"))).await {
            Err(e) if e.code() == Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => {
                refused = Some(other);
                break;
            }
        }
    }
    match refused {
        Some(Err(e)) => assert_eq!(e.code(), Code::Aborted, "{e:?}"),
        other => panic!("Redis came back empty and the service answered {other:?}"),
    }
    let rebuilt = stack
        .ledger()
        .rebuild_budgets(pb::RebuildBudgetsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        rebuilt.restored_partitions.len(),
        usize::from(stack.redis.partitions)
    );
    let r = authz.authorize(req("after-rebuild")).await.unwrap();
    assert_eq!(r.into_inner().decision, pb::Decision::Allow as i32);
    stack.stop().await.unwrap();
    redis.kill();
}
