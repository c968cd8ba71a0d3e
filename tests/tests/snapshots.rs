//! Budget snapshots (issue 23 items 1, 2, 4, 5), against Redis servers of the
//! tests' own (so FLUSHALL is real), PostgreSQL, tansu, the authz-service and the
//! ledger-writer; the CLI as an operator runs it.
//!
//! - Snapshot, more traffic, then the ledger rows written after the snapshot
//!   deleted: `replay start --from-snapshot` writes back exactly those rows (a
//!   second run none), and `merkle verify-range` passes. Then Redis loses
//!   everything: `snapshot restore` puts back every balance exactly (the
//!   snapshot's spend plus the ledger after it): reconcile shows no drift, and
//!   each policy admits exactly its remaining budget, not a micro more.
//! - A snapshot kept in a directory, restored onto a fresh database and a fresh
//!   Redis: the configuration comes back (the old API keys work), every balance
//!   is the old one (spent and reserved), and the reservation open at the
//!   snapshot settles once. A corrupted snapshot is refused.
//! - create / list / status / cleanup: ids, progress rows, refusals.

use std::time::Duration;

use caracal_proto::v1 as pb;
use caracal_tests::{
    budget_calls::{allowed, authorize, ledger_reaches, settle_request, spend, Authz},
    charges::ledger_totals,
    cli_process::{run_caracal, Run},
    gateway_client,
    own_redis::OwnRedis,
    relayed_stack, TestStack,
};
use diesel_async::RunQueryDsl;
use tonic::Code;

async fn caracal(stack: &TestStack, args: &[&str]) -> Run {
    run_caracal(env!("CARGO_BIN_EXE_caracal-under-test"), stack, args)
        .await
        .unwrap()
}

fn json(run: &Run) -> serde_json::Value {
    assert_eq!(run.code, 0, "stdout: {}\nstderr: {}", run.out, run.err);
    serde_json::from_str(&run.out).unwrap_or_else(|e| panic!("not JSON ({e}): {}", run.out))
}

/// Each policy's spent value in Redis, and the number of policies with drift.
async fn redis_spent(stack: &TestStack) -> (std::collections::HashMap<String, i64>, i32) {
    let report = stack
        .ledger()
        .reconcile(pb::ReconcileRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut spent = std::collections::HashMap::new();
    for p in &report.policies {
        *spent.entry(p.policy_id.clone()).or_insert(0) += p.redis_spent_micros;
    }
    (spent, report.policies_with_drift)
}

/// `room` is admitted for `key` and `room + 1` is not (the over-ask first: it
/// reserves nothing).
async fn exactly_room(authz: &mut Authz, key: &str, id: &str, room: i64) {
    assert!(room > 0, "{id}");
    let over = authorize(authz, key, &format!("{id}-over"), room + 1)
        .await
        .unwrap();
    assert!(!allowed(&over), "{id}: {room} + 1 admitted: {over:?}");
    let exact = authorize(authz, key, id, room).await.unwrap();
    assert!(allowed(&exact), "{id}: {room} refused: {exact:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_lost_after_a_snapshot_replay_back_and_a_restore_after_redis_loss_is_exact() {
    let redis = OwnRedis::start().await;
    let (tansu, stack, writer) = relayed_stack(&redis, |_| {}).await;
    let (a, a_key) = stack.agent_with_key("snap-a", None).await.unwrap();
    let (b, b_key) = stack.agent_with_key("snap-b", None).await.unwrap();
    let a_daily = stack
        .usd_policy(&a, "10.00", "daily", "calendar", "charge")
        .await
        .unwrap();
    let a_hourly = stack
        .usd_policy(&a, "5.00", "hourly", "rolling", "charge")
        .await
        .unwrap();
    let b_daily = stack
        .usd_policy(&b, "2.00", "daily", "calendar", "charge")
        .await
        .unwrap();
    let mut authz = gateway_client(stack.channel.clone());
    for i in 0..3 {
        spend(&mut authz, &a_key, &format!("a-{i}"), 500_000, 400_000).await;
    }
    for i in 0..2 {
        spend(&mut authz, &b_key, &format!("b-{i}"), 500_000, 250_000).await;
    }
    assert_eq!(ledger_reaches(&stack, 5).await, 1_700_000);

    // The snapshot, through the CLI.
    let created = json(&caracal(&stack, &["snapshot", "create", "--output", "json"]).await);
    let id = created["snapshot"]["snapshot_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(id.starts_with("snapshot-"), "{created}");
    assert_eq!(created["snapshot"]["ledger_events"], 5, "{created}");
    assert_eq!(created["snapshot"]["counters"], 3, "{created}");
    assert!(created["snapshot"]["checksum"]
        .as_str()
        .unwrap()
        .starts_with("blake3:"));
    let listed = json(&caracal(&stack, &["snapshot", "list", "--output", "json"]).await);
    assert_eq!(listed["snapshots"][0]["snapshot_id"], id.as_str());
    let status = json(&caracal(&stack, &["snapshot", "status", "--output", "json"]).await);
    assert_eq!(status["runs"][0]["kind"], "create");
    assert_eq!(status["runs"][0]["state"], "done", "{status}");
    assert_eq!(status["schedule"], "", "tests run with the schedule off");

    // More traffic after the snapshot: 2 x 0.30 for A, 1 x 0.25 for B.
    for i in 0..2 {
        spend(
            &mut authz,
            &a_key,
            &format!("a-after-{i}"),
            500_000,
            300_000,
        )
        .await;
    }
    spend(&mut authz, &b_key, "b-after", 500_000, 250_000).await;
    assert_eq!(ledger_reaches(&stack, 8).await, 2_550_000);
    let (before_loss, drift) = redis_spent(&stack).await;
    assert_eq!(drift, 0);

    // The rows written after the snapshot are deleted (a superuser working around
    // the append-only trigger).
    {
        let mut conn = stack.db().await.unwrap();
        diesel::sql_query("SET session_replication_role = replica")
            .execute(&mut conn)
            .await
            .unwrap();
        let deleted = diesel::sql_query(
            "DELETE FROM ledger_events WHERE request_id IN ('a-after-0', 'a-after-1', 'b-after')",
        )
        .execute(&mut conn)
        .await
        .unwrap();
        assert_eq!(deleted, 3);
    }
    assert_eq!(ledger_totals(&stack.database_url).await.rows, 5);

    // Replay from the snapshot's cut: exactly those three come back.
    let brokers = tansu.brokers();
    let replay = |args: &'static [&'static str]| {
        let mut argv: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        argv.extend([
            "--from-snapshot".to_owned(),
            id.clone(),
            "--brokers".to_owned(),
            brokers.clone(),
            "--database-url".to_owned(),
            stack.database_url.clone(),
            "--output".to_owned(),
            "json".to_owned(),
        ]);
        argv
    };
    let argv = replay(&["replay", "start"]);
    let args: Vec<&str> = argv.iter().map(String::as_str).collect();
    let first = json(&caracal(&stack, &args).await);
    assert_eq!(first["missing_from_ledger"], 3, "{first}");
    let t = ledger_totals(&stack.database_url).await;
    assert_eq!((t.rows, t.charged), (8, 2_550_000));
    let second = json(&caracal(&stack, &args).await);
    assert_eq!(
        second["missing_from_ledger"], 0,
        "replaying twice changes nothing: {second}"
    );
    assert_eq!(ledger_totals(&stack.database_url).await.rows, 8);

    // The Merkle log still verifies over today's rows.
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    let mut verified = serde_json::Value::Null;
    for _ in 0..100 {
        let run = caracal(
            &stack,
            &[
                "merkle",
                "verify-range",
                "--start",
                &today,
                "--end",
                &today,
                "--output",
                "json",
            ],
        )
        .await;
        verified = serde_json::from_str(&run.out).unwrap_or_default();
        if run.code == 0 && verified["pending"] == 0 && verified["unsigned"] == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(verified["failures_total"], 0, "{verified}");
    assert_eq!(verified["events_checked"], 8, "{verified}");

    // Redis loses everything: refused until restored.
    let _: () = redis.cmd(&mut redis::cmd("FLUSHALL")).await;
    let e = authorize(&mut authz, &a_key, "after-loss", 1)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e:?}");
    let dry = json(
        &caracal(
            &stack,
            &[
                "snapshot",
                "restore",
                "--snapshot-id",
                &id,
                "--dry-run",
                "--output",
                "json",
            ],
        )
        .await,
    );
    assert_eq!(dry["dry_run"], true);
    assert!(authorize(&mut authz, &a_key, "after-dry-run", 1)
        .await
        .is_err());
    let restored = json(
        &caracal(
            &stack,
            &[
                "snapshot",
                "restore",
                "--snapshot-id",
                &id,
                "--output",
                "json",
            ],
        )
        .await,
    );
    assert_eq!(restored["counters_total"], 3, "{restored}");
    assert_eq!(restored["ledger_events_after"], 3, "{restored}");
    assert_eq!(
        restored["restored_partitions"],
        serde_json::json!([0, 1, 2, 3])
    );
    let (after, drift) = redis_spent(&stack).await;
    assert_eq!(drift, 0, "Redis and the ledger agree after the restore");
    assert_eq!(after, before_loss);
    assert_eq!(after[&a_daily], 1_800_000);
    assert_eq!(after[&a_hourly], 1_800_000);
    assert_eq!(after[&b_daily], 750_000);
    exactly_room(&mut authz, &a_key, "rest-a", 5_000_000 - 1_800_000).await;
    exactly_room(&mut authz, &b_key, "rest-b", 2_000_000 - 750_000).await;

    // With the state live, a restore is refused unless it may take it offline.
    let refused = stack
        .snapshots()
        .restore_snapshot(pb::RestoreSnapshotRequest {
            snapshot_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("--replace-live"), "{refused:?}");
    let status = json(
        &caracal(
            &stack,
            &[
                "snapshot",
                "status",
                "--snapshot-id",
                &id,
                "--output",
                "json",
            ],
        )
        .await,
    );
    let states: Vec<(String, String)> = status["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["kind"].as_str().unwrap().to_owned(),
                r["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        states,
        [
            ("restore".to_owned(), "failed".to_owned()),
            ("restore".to_owned(), "done".to_owned()),
            ("restore".to_owned(), "done".to_owned()),
            ("create".to_owned(), "done".to_owned()),
        ]
    );

    writer.shutdown().await.unwrap();
    stack.stop().await.unwrap();
    drop(tansu);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_restored_onto_a_fresh_database_and_redis_reproduces_every_balance() {
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().to_str().unwrap().to_owned();
    let redis = OwnRedis::start().await;
    let d = store_dir.clone();
    let (tansu, stack, writer) = relayed_stack(&redis, |c| {
        c.snapshots.store = "directory".into();
        c.snapshots.directory = d;
    })
    .await;
    let (parent, parent_key) = stack.agent_with_key("fresh-parent", None).await.unwrap();
    let (child, child_key) = stack
        .agent_with_key("fresh-child", Some(&parent))
        .await
        .unwrap();
    stack
        .usd_policy(&parent, "10.00", "daily", "calendar", "charge")
        .await
        .unwrap();
    stack
        .usd_policy(&parent, "5.00", "hourly", "rolling", "charge")
        .await
        .unwrap();
    stack
        .usd_policy(&child, "3.00", "total", "calendar", "charge")
        .await
        .unwrap();
    let mut authz = gateway_client(stack.channel.clone());
    for i in 0..3 {
        spend(&mut authz, &parent_key, &format!("p-{i}"), 500_000, 400_000).await;
    }
    for i in 0..2 {
        spend(&mut authz, &child_key, &format!("c-{i}"), 500_000, 300_000).await;
    }
    // A call still running at the snapshot. Its allow is on the decisions topic
    // once a later event of its partition (the hierarchy's) is in the ledger: the
    // relay keeps a partition's order. The snapshot reads it from there.
    let open = authorize(&mut authz, &child_key, "open", 700_000)
        .await
        .unwrap();
    assert!(allowed(&open));
    spend(&mut authz, &parent_key, "p-3", 500_000, 400_000).await;
    assert_eq!(ledger_reaches(&stack, 6).await, 2_200_000);
    let created = stack
        .snapshots()
        .create_snapshot(pb::CreateSnapshotRequest {})
        .await
        .unwrap()
        .into_inner();
    let info = created.snapshot.clone().unwrap();
    assert_eq!(info.reservations, 1, "{created:?}");
    assert!(created.store.contains(&store_dir), "{created:?}");
    let file = dir.path().join(format!("{}.snapshot", info.snapshot_id));
    assert!(file.exists());
    let (old, drift) = redis_spent(&stack).await;
    assert_eq!(drift, 0);
    let prefix = stack.key_prefix.clone();
    writer.shutdown().await.unwrap();
    stack.stop().await.unwrap();
    drop(tansu);

    // A fresh database and a fresh Redis (same key layout), relay off: nothing but
    // the snapshot knows the agents, the spend or the open reservation.
    let fresh_redis = OwnRedis::start().await;
    let d = store_dir.clone();
    let fresh = TestStack::start_with(|c| {
        fresh_redis.configure(&mut c.redis);
        c.redis.partitions = 4;
        c.redis.key_prefix = prefix;
        c.snapshots.store = "directory".into();
        c.snapshots.directory = d;
    })
    .await
    .unwrap();
    let listed = fresh
        .snapshots()
        .list_snapshots(pb::ListSnapshotsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.snapshots.len(), 1);
    assert_eq!(listed.snapshots[0].checksum, info.checksum);

    // A corrupted copy is refused, naming why; the original restores.
    let bytes = std::fs::read(&file).unwrap();
    let corrupt_id = "snapshot-20200101-000000";
    let corrupt = String::from_utf8(bytes)
        .unwrap()
        .replace(&info.snapshot_id, corrupt_id)
        .replacen(
            "\"reservations_source\":\"",
            "\"reservations_source\":\"x",
            1,
        );
    // Its summary line dated as its id says (a cleanup finds it old).
    let (summary, body) = corrupt.split_once('\n').unwrap();
    let mut summary: serde_json::Value = serde_json::from_str(summary).unwrap();
    summary["taken_at"] = "2020-01-01T00:00:00Z".into();
    std::fs::write(
        dir.path().join(format!("{corrupt_id}.snapshot")),
        format!("{summary}\n{body}"),
    )
    .unwrap();
    let e = fresh
        .snapshots()
        .restore_snapshot(pb::RestoreSnapshotRequest {
            snapshot_id: corrupt_id.into(),
            replace_live: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("corrupt"), "{e:?}");

    // The fresh deployment established its (empty) state at start: live, so the
    // restore must be told it may replace it.
    let e = fresh
        .snapshots()
        .restore_snapshot(pb::RestoreSnapshotRequest {
            snapshot_id: info.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let restored = fresh
        .snapshots()
        .restore_snapshot(pb::RestoreSnapshotRequest {
            snapshot_id: info.snapshot_id.clone(),
            replace_live: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(restored.ledger_events_after, 0);
    let config: Vec<&str> = restored
        .config_restored
        .iter()
        .map(String::as_str)
        .collect();
    assert!(config.contains(&"agents=2"), "{config:?}");
    assert!(config.contains(&"policies=3"), "{config:?}");
    assert!(config.contains(&"agent_api_keys=2"), "{config:?}");
    let budgets = restored.budgets.unwrap();
    assert_eq!(budgets.counters_total, 3);
    assert_eq!(budgets.reservations_restored, 1, "{budgets:?}");
    assert_eq!(budgets.restored_partitions, vec![0, 1, 2, 3]);

    // The same spent values as before, per policy (the ledger here is empty:
    // reconcile reports the difference as drift, which is expected).
    let (new, _) = redis_spent(&fresh).await;
    assert_eq!(new, old);
    // The old keys work; the remaining budgets are exactly the old ones: the
    // child's total policy 3.00 - 0.60 - 0.70 open; then the parent's hourly
    // 5.00 - 2.20 - 0.70 less what the child just took.
    let mut authz = gateway_client(fresh.channel.clone());
    exactly_room(
        &mut authz,
        &child_key,
        "rest-c",
        3_000_000 - 600_000 - 700_000,
    )
    .await;
    exactly_room(
        &mut authz,
        &parent_key,
        "rest-p",
        5_000_000 - 2_200_000 - 700_000 - (3_000_000 - 600_000 - 700_000),
    )
    .await;
    // The reservation open at the snapshot settles, once.
    let settled = authz
        .settle(settle_request(&open.reservation_id, 500_000))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(settled.charged.as_ref().map(|m| m.micros), Some(500_000));
    let again = authz
        .settle(settle_request(&open.reservation_id, 500_000))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.charged.as_ref().map(|m| m.micros), Some(500_000));
    let (settled_spent, _) = redis_spent(&fresh).await;
    let total: i64 = settled_spent.values().sum();
    let old_total: i64 = old.values().sum();
    // 0.50 charged on each of the three policies (the child's and its parent's).
    assert_eq!(total, old_total + 3 * 500_000);

    // Cleanup keeps the newest whatever its age, deletes the older one.
    let cleaned = fresh
        .snapshots()
        .cleanup_snapshots(pb::CleanupSnapshotsRequest {
            retention_days: 1,
            dry_run: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cleaned.deleted, vec![corrupt_id.to_owned()]);
    assert_eq!(cleaned.kept, 1);
    assert!(file.exists());
    let zero = fresh
        .snapshots()
        .cleanup_snapshots(pb::CleanupSnapshotsRequest {
            retention_days: 0,
            dry_run: true,
        })
        .await
        .unwrap_err();
    assert_eq!(zero.code(), Code::InvalidArgument);

    // Admin credentials only; reflection lists the service (grpcurl needs no protos).
    let anonymous = pb::snapshot_service_client::SnapshotServiceClient::with_interceptor(
        fresh.channel.clone(),
        caracal_tests::Bearer(None),
    )
    .restore_snapshot(pb::RestoreSnapshotRequest {
        snapshot_id: info.snapshot_id.clone(),
        replace_live: true,
        ..Default::default()
    })
    .await
    .unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated);
    let services = caracal_tests::reflection::reflected_services(fresh.channel.clone())
        .await
        .unwrap();
    assert!(
        services.iter().any(|s| s == "caracal.v1.SnapshotService"),
        "{services:?}"
    );
    fresh.stop().await.unwrap();
}

/// Scheduled snapshots: two replicas on one database with a schedule of every
/// minute. At the next minute exactly one of them takes the snapshot named for
/// that minute (the other's claim of the id is refused), and `status` shows it as
/// scheduled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_a_schedule_take_each_scheduled_snapshot_once() {
    let every_minute = "* * * * *";
    let started = chrono::Utc::now();
    let stack = TestStack::start_with(|c| c.snapshots.schedule = every_minute.into())
        .await
        .unwrap();
    let mut config = TestStack::config(&stack.database_url).await.unwrap();
    config.redis = stack.redis.clone();
    config.snapshots.schedule = every_minute.into();
    let second = caracal_authz::serve(config).await.unwrap();

    let mut snapshots = stack.snapshots();
    let status = snapshots
        .snapshot_status(pb::SnapshotStatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.schedule, every_minute);
    assert!(!status.next_scheduled.is_empty(), "{status:?}");

    // Bounded: the next minute plus the snapshot's own time.
    let mut listed = Vec::new();
    for _ in 0..100 {
        listed = snapshots
            .list_snapshots(pb::ListSnapshotsRequest {})
            .await
            .unwrap()
            .into_inner()
            .snapshots;
        if !listed.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(listed.len(), 1, "one scheduled snapshot: {listed:?}");
    let id = listed[0].snapshot_id.clone();
    let at = caracal_service_kit::snapshot::parse_snapshot_id(&id).unwrap();
    assert_eq!(
        chrono::Timelike::second(&at),
        0,
        "{id}: named for its minute"
    );
    assert!(
        at > started && at <= started + chrono::Duration::seconds(120),
        "{id} after {started}"
    );
    // Both replicas fired at that minute; one run was claimed.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let runs = snapshots
        .snapshot_status(pb::SnapshotStatusRequest {
            snapshot_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .runs;
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert!(runs[0].scheduled && runs[0].kind == "create" && runs[0].state == "done");
    second.shutdown().await.unwrap();
    stack.stop().await.unwrap();
}
