//! Failover on a Redis Cluster (3 primaries + 3 replicas on loopback, owned by the
//! test): Authorize/Settle traffic on a hierarchy at its limit while the primary
//! serving the hierarchy is SIGKILLed and its replica promoted. The worst case is
//! forced: just before the kill the replica stops receiving (frozen, link cut), so
//! the primary's last writes exist nowhere else. With `redis.minReplicasAck` 1
//! none of those was acknowledged to the gateway (they failed closed), so
//! afterwards the counters hold exactly the acknowledged charges, no acknowledged
//! reservation is missing, and admitted spend stays within the limit. Calls fail
//! closed (UNAVAILABLE) during the switch and recover by themselves; the test
//! prints the gap.
//!
//! `CARACAL_FAILOVER_ACK=0` runs the same scenario without the acknowledgement:
//! then acknowledged reservations and charges are lost and the test fails, which
//! is what the setting is for.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use caracal_authz::{budget::KeySpace, config::RedisMode};
use caracal_proto::v1 as pb;
use caracal_tests::{redis_cluster::LocalCluster, TestStack};
use tonic::Code;

/// Ports 7101..7106: apart from the shared test cluster (7001..).
const BASE_PORT: u16 = 7101;
/// How long a primary may be unreachable before its replica takes over.
const NODE_TIMEOUT_MS: u64 = 2_000;
const WORKERS: usize = 8;
/// Bounded retries of a Settle / ReleaseByRequest (as the gateway retries them).
const RETRIES: usize = 300;

#[derive(Default)]
struct Tally {
    /// Sum of what acknowledged Settles charged.
    charged: i64,
    settled: usize,
    admitted: usize,
    denied: usize,
    /// Authorize calls that failed (UNAVAILABLE), released by request afterwards.
    failed: usize,
    /// Acknowledged reservations whose Settle found nothing: lost in the failover.
    lost: Vec<String>,
    /// When calls failed and succeeded (since the start), to measure the gap.
    failures_at: Vec<Duration>,
    successes_at: Vec<Duration>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_decision_is_lost_when_a_primary_dies() {
    let mut cluster = LocalCluster::start(BASE_PORT, NODE_TIMEOUT_MS)
        .await
        .unwrap();
    let seeds = cluster.seeds();
    let stack = TestStack::start_with(|c| {
        c.redis.mode = RedisMode::Cluster;
        c.redis.nodes = seeds;
        c.redis.partitions = 16;
        c.redis.min_replicas_ack = Some(
            std::env::var("CARACAL_FAILOVER_ACK")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(1),
        );
        c.redis.replica_ack_timeout_ms = 200;
        c.redis.timeout_ms = 1_000;
    })
    .await
    .unwrap();
    // A hierarchy: the limit is on the root, two children spend from it.
    let (root, _) = stack.agent_with_key("root", None).await.unwrap();
    let (_, key_a) = stack.agent_with_key("child-a", Some(&root)).await.unwrap();
    let (_, key_b) = stack.agent_with_key("child-b", Some(&root)).await.unwrap();
    // $0.20: the workers' reservations in flight (up to 8 x $0.03) exceed it, so
    // calls are refused and admitted side by side all along, while each Settle
    // charges a few micros (spend grows slowly and every charge is checked).
    let limit: i64 = 200_000;
    let policy = stack
        .usd_policy(&root, "0.2", "daily", "calendar", "")
        .await
        .unwrap();
    let keys = KeySpace::new(stack.key_prefix.clone(), 16);
    let doomed = cluster
        .primary_of(&keys.outbox(keys.partition_of(&root)))
        .unwrap();

    let tally = Arc::new(Mutex::new(Tally::default()));
    let start = Instant::now();
    let run_for = Duration::from_secs(14);
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let mut authz = stack.authz();
            let key = if w % 2 == 0 {
                key_a.clone()
            } else {
                key_b.clone()
            };
            let tally = tally.clone();
            tokio::spawn(async move {
                let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ (w as u64 + 1);
                for i in 0..100_000 {
                    if start.elapsed() > run_for {
                        break;
                    }
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let estimate = 10_000 + (seed % 20_000) as i64;
                    let request_id = format!("w{w}-{i}");
                    let req = caracal_tests::authorize_request(&key, &request_id, estimate);
                    match authz.authorize(req).await.map(|r| r.into_inner()) {
                        Ok(r) if r.decision == pb::Decision::Allow as i32 => {
                            tally.lock().unwrap().admitted += 1;
                            tally.lock().unwrap().successes_at.push(start.elapsed());
                            let cost = 1 + (seed >> 20) as i64 % 100;
                            settle(&mut authz, &r.reservation_id, cost, &tally, start).await;
                        }
                        Ok(_) => {
                            let mut t = tally.lock().unwrap();
                            t.denied += 1;
                            t.successes_at.push(start.elapsed());
                        }
                        Err(status) => {
                            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                            {
                                let mut t = tally.lock().unwrap();
                                t.failed += 1;
                                t.failures_at.push(start.elapsed());
                            }
                            // As the gateway does: release whatever it may have reserved.
                            release_by_request(&mut authz, &key, &request_id).await;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_secs(3)).await;
    let replica = cluster
        .cut_replication(doomed, Duration::from_millis(1_000))
        .await
        .unwrap();
    // Writes go on for a moment on the primary alone.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let killed_at = start.elapsed();
    cluster.kill(doomed).unwrap();
    eprintln!("replica 127.0.0.1:{replica} cut off before the kill");
    eprintln!("killed primary 127.0.0.1:{doomed} at {killed_at:?}");
    // Bring the dead node back once its replica has taken over (as Kubernetes
    // restarts a pod): it rejoins as the new primary's replica, so replica
    // acknowledgements work again. (Restarted before the promotion, a node without
    // persistence would come back empty as primary.)
    let deadline = Instant::now() + Duration::from_secs(30);
    let promoted_at = loop {
        match cluster.primary_of(&keys.outbox(keys.partition_of(&root))) {
            Ok(p) if p != doomed => {
                let at = start.elapsed();
                eprintln!("127.0.0.1:{p} promoted at {at:?}");
                break at;
            }
            _ => {}
        }
        assert!(Instant::now() < deadline, "no replica was promoted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    cluster.restart(doomed).unwrap();

    for w in workers {
        w.await.unwrap();
    }
    let t = std::mem::take(&mut *tally.lock().unwrap());
    let first_failure = t
        .failures_at
        .iter()
        .copied()
        .filter(|f| *f >= killed_at)
        .min();
    let recovered =
        first_failure.and_then(|f| t.successes_at.iter().copied().filter(|s| *s > f).min());
    eprintln!(
        "admitted {} settled {} denied {} failed {} charged {} micros; unavailable from {:?} to {:?} (gap {:?})",
        t.admitted,
        t.settled,
        t.denied,
        t.failed,
        t.charged,
        first_failure,
        recovered,
        first_failure.zip(recovered).map(|(f, r)| r - f)
    );
    assert!(
        t.lost.is_empty(),
        "acknowledged reservations lost: {:?}",
        t.lost
    );
    assert_eq!(
        t.settled, t.admitted,
        "every admitted reservation was settled"
    );
    // The replication cut makes acknowledged writes fail closed (WAIT times out)
    // before the kill; after it, calls on the dead primary's slots may fail or
    // merely wait for the promotion (the cluster client retries), by timing.
    assert!(
        t.failed > 0,
        "calls failed closed while replicas could not confirm"
    );
    assert!(
        t.successes_at.iter().any(|s| *s > promoted_at),
        "calls recovered after the failover (promoted at {promoted_at:?})"
    );
    assert!(t.denied > 0, "the hierarchy reached its limit");

    // The counters hold exactly the acknowledged charges, nothing reserved is left
    // and the limit held.
    let counters = stack.policy_counters(&policy).await.unwrap();
    assert_eq!(counters.len(), 1, "{counters:?}");
    let spent = counters[0].get("s").copied().unwrap_or(0);
    let reserved = counters[0].get("r").copied().unwrap_or(0);
    assert_eq!(reserved, 0, "every reservation was finished");
    assert_eq!(
        spent, t.charged,
        "spent counter = sum of acknowledged charges"
    );
    assert!(spent <= limit, "spent {spent} > limit {limit}");

    // What operators see: the refused decisions were counted, and the watcher
    // reports the cluster whole again (three primaries, state ok) by itself.
    let http = stack.server.as_ref().unwrap().http_addr;
    let (_, metrics) = caracal_tests::probe::http_get(http, "/metrics").await;
    let metric = |name: &str| caracal_tests::probe::metric_value(&metrics, name, &[]);
    assert!(
        metric("caracal_redis_wait_timeouts_total").unwrap_or(0.0) >= 1.0,
        "writes the replica never confirmed were counted: {metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("caracal_redis_shard_errors_total{")
                && l.contains(&format!(":{doomed}\""))
                // Every shard's series exists from the start (at 0): count, not presence.
                && l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) >= Some(1.0)),
        "failed calls counted against the lost primary's shard: {metrics}"
    );
    let mut whole = false;
    for _ in 0..60 {
        let (_, m) = caracal_tests::probe::http_get(http, "/metrics").await;
        let (status, _) = caracal_tests::probe::http_get(http, "/health/ready").await;
        whole = status == 200
            && caracal_tests::probe::metric_value(&m, "caracal_redis_cluster_ok", &[]) == Some(1.0)
            && caracal_tests::probe::metric_value(&m, "caracal_redis_cluster_primaries", &[])
                == Some(3.0)
            && caracal_tests::probe::metric_value(
                &m,
                "caracal_redis_redirections",
                &["kind=\"moved\""],
            )
            .is_some();
        if whole {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        whole,
        "cluster reported whole and ready again after the failover"
    );
    stack.stop().await.unwrap();
    drop(cluster);
}

/// Settles until acknowledged (a retry of an applied Settle answers
/// `already_settled` with the same charge).
async fn settle(
    authz: &mut pb::budget_authorization_client::BudgetAuthorizationClient<
        caracal_tests::GatewaySvc,
    >,
    reservation_id: &str,
    cost: i64,
    tally: &Mutex<Tally>,
    start: Instant,
) {
    for _ in 0..RETRIES {
        let req = pb::SettleRequest {
            reservation_id: reservation_id.to_owned(),
            actual_cost: Some(pb::Money {
                currency: "USD".into(),
                micros: cost,
                amount: String::new(),
            }),
            ..Default::default()
        };
        match authz.settle(req).await.map(|r| r.into_inner()) {
            Ok(r) => {
                let mut t = tally.lock().unwrap();
                t.charged += r.charged.map(|m| m.micros).unwrap_or(0);
                t.settled += 1;
                t.successes_at.push(start.elapsed());
                return;
            }
            Err(s) if s.code() == Code::NotFound => {
                tally.lock().unwrap().lost.push(reservation_id.to_owned());
                return;
            }
            Err(s) => {
                assert_eq!(s.code(), Code::Unavailable, "{s:?}");
                tally.lock().unwrap().failures_at.push(start.elapsed());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    panic!("settle of {reservation_id} never succeeded");
}

async fn release_by_request(
    authz: &mut pb::budget_authorization_client::BudgetAuthorizationClient<
        caracal_tests::GatewaySvc,
    >,
    key: &str,
    request_id: &str,
) {
    for _ in 0..RETRIES {
        let req = pb::ReleaseByRequestRequest {
            request_id: request_id.to_owned(),
            credential: Some(pb::AgentCredential {
                kind: Some(pb::agent_credential::Kind::ApiKey(key.to_owned())),
            }),
            reason: "authorize_failed".into(),
        };
        match authz.release_by_request(req).await {
            Ok(_) => return,
            Err(s) if s.code() == Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(s) => panic!("release by request {request_id}: {s:?}"),
        }
    }
    panic!("release of {request_id} never succeeded");
}
