//! `rediss://` for both Redis modes: the authz-service reaches a standalone server
//! and a Redis Cluster over TLS with a private CA and a client certificate
//! (`redis.tls.caCertFile`, `certFile`, `keyFile`), decides and charges through
//! them, and without the CA it trusts nothing and fails closed.

use caracal_authz::config::{RedisMode, RedisTls};
use caracal_proto::v1 as pb;
use caracal_tests::{redis_cluster::LocalCluster, tls::TlsRedis, TestStack};

/// Ports 7201..7206: apart from the shared test cluster and the failover test's.
const TLS_CLUSTER_PORT: u16 = 7201;

fn tls_files(ca: String, cert: String, key: String) -> RedisTls {
    RedisTls {
        enabled: true,
        ca_cert_file: ca,
        cert_file: cert,
        key_file: key,
    }
}

/// One Authorize + Settle on a fresh agent; returns the policy id and the charge.
async fn spend(stack: &TestStack) -> (String, i64) {
    let (agent, key) = stack.agent_with_key("tls", None).await.unwrap();
    let policy = stack
        .usd_policy(&agent, "10", "daily", "calendar", "")
        .await
        .unwrap();
    let mut authz = stack.authz();
    let r = authz
        .authorize(caracal_tests::authorize_request(&key, "tls-1", 40_000))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.decision, pb::Decision::Allow as i32, "{r:?}");
    let s = authz
        .settle(pb::SettleRequest {
            reservation_id: r.reservation_id,
            actual_cost: Some(pb::Money {
                currency: "USD".into(),
                micros: 31_415,
                amount: String::new(),
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    (policy, s.charged.unwrap().micros)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_over_tls_with_a_client_certificate() {
    let server = TlsRedis::start(true).await.unwrap();
    let tls = tls_files(
        server.ca(),
        server.certs.path("client.pem"),
        server.certs.path("client.key"),
    );
    let url = server.tls_url();
    let stack = TestStack::start_with(|c| {
        c.redis.url = url.clone();
        c.redis.tls = tls.clone();
    })
    .await
    .unwrap();
    let (policy, charged) = spend(&stack).await;
    assert_eq!(charged, 31_415);
    // The charge is in the TLS server's counters (read through its plain port).
    let client = redis::Client::open(server.plain_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:*:c:{policy}:*", stack.key_prefix))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let spent: i64 = redis::cmd("HGET")
        .arg(&keys[0])
        .arg("s")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(spent, 31_415);
    stack.stop().await.unwrap();

    // Without the client certificate the server refuses the handshake; without
    // the CA the client refuses the server: either way nothing is decided.
    for (case, tls) in [
        (
            "no client certificate",
            tls_files(server.ca(), String::new(), String::new()),
        ),
        (
            "no CA",
            tls_files(
                String::new(),
                server.certs.path("client.pem"),
                server.certs.path("client.key"),
            ),
        ),
    ] {
        let stack = TestStack::start_with(|c| {
            c.redis.url = url.clone();
            c.redis.tls = tls.clone();
            c.redis.timeout_ms = 500;
        })
        .await
        .unwrap();
        let (agent, key) = stack.agent_with_key("refused", None).await.unwrap();
        stack
            .usd_policy(&agent, "10", "daily", "calendar", "")
            .await
            .unwrap();
        let status = stack
            .authz()
            .authorize(caracal_tests::authorize_request(&key, "tls-2", 1_000))
            .await
            .map(|r| r.into_inner())
            .expect_err(case);
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        stack.stop().await.unwrap();
    }

    // TLS required but a plain URL given: refused at start, not silently plain.
    let err = TestStack::start_with(|c| {
        c.redis.url = server.plain_url();
        c.redis.tls.enabled = true;
    })
    .await
    .err()
    .unwrap();
    assert!(format!("{err:#}").contains("rediss://"), "{err:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_over_tls() {
    let certs = caracal_tests::tls::TestCerts::create().unwrap();
    let cluster = LocalCluster::start_tls(TLS_CLUSTER_PORT, certs.dir.path())
        .await
        .unwrap();
    let seeds = cluster.seeds();
    assert!(seeds.iter().all(|s| s.starts_with("rediss://")));
    let tls = tls_files(
        certs.path("ca.pem"),
        certs.path("client.pem"),
        certs.path("client.key"),
    );
    let stack = TestStack::start_with(|c| {
        c.redis.mode = RedisMode::Cluster;
        c.redis.nodes = seeds.clone();
        c.redis.tls = tls.clone();
        c.redis.partitions = 16;
        // TLS replication on a busy 2-core machine: a generous acknowledgement wait.
        c.redis.replica_ack_timeout_ms = 1_000;
        c.redis.timeout_ms = 3_000;
    })
    .await
    .unwrap();
    let (policy, charged) = spend(&stack).await;
    assert_eq!(charged, 31_415);
    let counters = stack.policy_counters(&policy).await.unwrap();
    assert_eq!(counters.len(), 1, "{counters:?}");
    assert_eq!(counters[0].get("s"), Some(&31_415));
    assert_eq!(counters[0].get("r"), Some(&0));
    // Readiness reads the cluster's state over TLS too.
    let http = stack.server.as_ref().unwrap().http_addr;
    let (status, body) = caracal_tests::probe::http_get(http, "/health/ready").await;
    assert_eq!(status, 200, "ready on a healthy TLS cluster: {body}");
    stack.stop().await.unwrap();
    drop(cluster);
}
