//! Shared helpers for Caracal's cross-component tests.
//!
//! [`TestStack`] starts a real authz-service (in-process, on 127.0.0.1 with free
//! ports) against its own fresh PostgreSQL database, so tests run in parallel without
//! seeing each other's rows. PostgreSQL comes from `CARACAL_TEST_PG`
//! (default `postgres://postgres@127.0.0.1:5432`).

pub mod budget_calls;
pub mod charges;
pub mod cli_process;
pub mod consumer_config;
pub mod consumer_process;
pub mod cpu;
pub mod envoy;
pub mod flaky_proxy;
pub mod kafka;
pub mod mock_llm;
pub mod otlp_collector;
pub mod own_redis;
pub mod probe;
pub mod redis_ceiling;
pub mod redis_cluster;
pub mod reflection;
pub mod service_process;
pub mod tls;

use std::time::Duration;

use anyhow::Context;
use caracal_authz::{config::Config, RunningServer};
use caracal_proto::v1::{
    agent_service_client::AgentServiceClient, allowlist_service_client::AllowlistServiceClient,
    budget_authorization_client::BudgetAuthorizationClient,
    ledger_service_client::LedgerServiceClient, policy_service_client::PolicyServiceClient,
    price_book_service_client::PriceBookServiceClient,
};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use tonic::{
    metadata::MetadataValue,
    service::{interceptor::InterceptedService, Interceptor},
    transport::Channel,
    Request, Status,
};

pub const ADMIN_TOKEN: &str = "test-admin-token";
/// The gateway token every [`TestStack`] accepts on the hot path
/// (`x-caracal-gateway-token`), as a plain-TCP gateway sends it.
pub const GATEWAY_TOKEN: &str = "test-gateway-token";
/// The metadata a gateway sends its token in.
pub const GATEWAY_TOKEN_HEADER: &str = caracal_authz::auth::GATEWAY_TOKEN_HEADER;
pub const PEPPER: &str = "test-pepper";

/// Base URL of the PostgreSQL server used by tests (no database name).
pub fn pg_base() -> String {
    std::env::var("CARACAL_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned())
}

/// A fresh PostgreSQL database of one test (`caracal_test_<what>_<uuid>`: the test
/// script drops what an interrupted run leaves behind by that prefix).
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    /// Creates an empty database.
    pub async fn create(what: &str) -> anyhow::Result<Self> {
        let name = format!("caracal_test_{what}_{}", uuid::Uuid::new_v4().simple());
        let mut admin = AsyncPgConnection::establish(&format!("{}/postgres", pg_base()))
            .await
            .context("connecting to PostgreSQL (is it running on 127.0.0.1:5432?)")?;
        diesel::sql_query(format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await?;
        let url = format!("{}/{name}", pg_base());
        Ok(Self { name, url })
    }

    /// Drops the database, whoever is still connected.
    pub async fn drop(self) -> anyhow::Result<()> {
        let mut admin = AsyncPgConnection::establish(&format!("{}/postgres", pg_base())).await?;
        diesel::sql_query(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&mut admin)
        .await?;
        Ok(())
    }
}

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct Bearer(pub Option<String>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = &self.0 {
            let value: MetadataValue<_> = format!("Bearer {token}")
                .parse()
                .map_err(|_| Status::internal("bad token"))?;
            req.metadata_mut().insert("authorization", value);
        }
        Ok(req)
    }
}

pub type Svc = InterceptedService<Channel, Bearer>;

/// Adds `x-caracal-gateway-token: <token>` to every call (the hot path's gateway
/// credential on plain TCP).
#[derive(Clone)]
pub struct GatewayToken(pub Option<String>);

impl Interceptor for GatewayToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = &self.0 {
            let value: MetadataValue<_> = token
                .parse()
                .map_err(|_| Status::internal("bad gateway token"))?;
            req.metadata_mut().insert(GATEWAY_TOKEN_HEADER, value);
        }
        Ok(req)
    }
}

/// A hot-path client that authenticates as a gateway.
pub type GatewaySvc = InterceptedService<Channel, GatewayToken>;

/// A `BudgetAuthorization` client on `channel` sending [`GATEWAY_TOKEN`] (for
/// services started outside [`TestStack`] with the same gateway token).
pub fn gateway_client(channel: Channel) -> BudgetAuthorizationClient<GatewaySvc> {
    BudgetAuthorizationClient::with_interceptor(
        channel,
        GatewayToken(Some(GATEWAY_TOKEN.to_owned())),
    )
}

/// An Authorize call as the gateway makes it for an OpenAI chat completion: the
/// agent's key and a fixed USD cost estimate.
pub fn authorize_request(
    key: &str,
    request_id: &str,
    estimate_micros: i64,
) -> caracal_proto::v1::AuthorizeRequest {
    use caracal_proto::v1 as pb;
    pb::AuthorizeRequest {
        request_id: request_id.into(),
        credential: Some(pb::AgentCredential {
            kind: Some(pb::agent_credential::Kind::ApiKey(key.into())),
        }),
        provider: "openai".into(),
        model: "gpt-4o".into(),
        resource: "api.openai.com/v1/chat/completions".into(),
        estimated_usage: None,
        estimated_cost: Some(pb::Money {
            currency: "USD".into(),
            micros: estimate_micros,
            amount: String::new(),
        }),
    }
}

/// Redis used by tests (each stack uses its own key prefix).
pub fn redis_url() -> String {
    std::env::var("CARACAL_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A standalone Redis endpoint (plain `redis://`).
pub fn standalone(url: &str, timeout: Duration) -> caracal_service_kit::redis::RedisEndpoint {
    use caracal_service_kit::redis::{RedisEndpoint, RedisMode};
    RedisEndpoint::new(RedisMode::Standalone, url, &[], Default::default(), timeout)
}

/// Whether this test process runs on the shared local Redis Cluster instead of
/// the standalone server: `CARACAL_TEST_REDIS_MODE=cluster|standalone`, else by
/// the test binary's name — `tests/cluster_*.rs` include other test files
/// (`#[path]`) to run the very same tests on the cluster.
pub fn on_redis_cluster() -> bool {
    match std::env::var("CARACAL_TEST_REDIS_MODE").as_deref() {
        Ok("cluster") => true,
        Ok("standalone") => false,
        _ => std::env::current_exe()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .is_some_and(|n| n.starts_with("cluster_")),
    }
}

/// Points `redis` at the tests' Redis: the standalone server, or the shared
/// cluster (started when none runs) with its default replica acknowledgement.
pub async fn use_test_redis(redis: &mut caracal_authz::config::RedisConfig) -> anyhow::Result<()> {
    if on_redis_cluster() {
        redis.mode = caracal_authz::config::RedisMode::Cluster;
        redis.nodes = redis_cluster::ensure_shared().await?;
        // The replica acknowledgement stays on (1); its wait is generous because
        // the 2-core machine running the tests may be busy (a busy replica is
        // not what these tests are about: the failover test is).
        redis.replica_ack_timeout_ms = 1_000;
        redis.timeout_ms = 3_000;
    } else {
        redis.mode = caracal_authz::config::RedisMode::Standalone;
        redis.url = redis_url();
    }
    Ok(())
}

/// A connection to the tests' Redis (standalone or the shared cluster).
pub async fn test_redis() -> anyhow::Result<caracal_service_kit::redis::RedisConn> {
    let mut config = caracal_authz::config::RedisConfig::default();
    use_test_redis(&mut config).await?;
    Ok(config.endpoint(Duration::from_secs(5)).connect_one()?)
}

/// A benchmark target's verdict, as the benches print it.
pub fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT met"
    }
}

/// Keys matching `pattern` on the tests' Redis (KEYS; on a cluster, of every
/// primary).
pub async fn redis_keys(
    conn: &mut caracal_service_kit::redis::RedisConn,
    pattern: &str,
) -> anyhow::Result<Vec<String>> {
    Ok(redis::cmd("KEYS").arg(pattern).query_async(conn).await?)
}

/// Deletes every key under `prefix:` on the standalone test Redis (a test's own
/// key space).
pub async fn delete_redis_prefix(prefix: &str) -> anyhow::Result<()> {
    let client = redis::Client::open(redis_url())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut conn)
        .await?;
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL").arg(keys).query_async(&mut conn).await?;
    }
    Ok(())
}

/// A running authz-service on its own database and its own Redis key prefix.
pub struct TestStack {
    pub key_prefix: String,
    /// The stack's Redis settings (mode, url or cluster seeds, partitions), for a
    /// second replica or a tool that must reach the same state.
    pub redis: caracal_authz::config::RedisConfig,
    pub database: String,
    pub database_url: String,
    pub server: Option<RunningServer>,
    pub channel: Channel,
}

impl TestStack {
    /// Creates a fresh database and starts the service on it (no Kafka relay).
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(|_| {}).await
    }

    /// Like [`TestStack::start`], with a chance to change the configuration.
    pub async fn start_with(tune: impl FnOnce(&mut Config)) -> anyhow::Result<Self> {
        let TestDb {
            name: database,
            url: database_url,
        } = TestDb::create("stack").await?;
        let mut config = Self::config(&database_url).await?;
        let key_prefix = config.redis.key_prefix.clone();
        tune(&mut config);
        let redis = config.redis.clone();
        let server = caracal_authz::serve(config).await?;
        let channel = Channel::from_shared(format!("http://{}", server.grpc_addr))?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await?;
        Ok(Self {
            key_prefix,
            redis,
            database,
            database_url,
            server: Some(server),
            channel,
        })
    }

    /// The configuration of a stack on `database_url`: free loopback ports, the
    /// tests' tokens, the tests' Redis under a key prefix of its own, no relay. Also
    /// what [`service_process::ServiceProcess`] hands its process.
    pub async fn config(database_url: &str) -> anyhow::Result<Config> {
        let mut config = Config::default();
        config.server.grpc_addr = "127.0.0.1:0".parse()?;
        config.server.http_addr = "127.0.0.1:0".parse()?;
        config.database.url = database_url.to_owned();
        config.database.db_pool_size = 2;
        config.database.db_max_overflow = 4;
        config.database.db_pool_timeout = 5;
        config.auth.admin_token = ADMIN_TOKEN.to_owned();
        config.auth.gateway_token = GATEWAY_TOKEN.to_owned();
        config.auth.api_key_pepper = PEPPER.to_owned();
        use_test_redis(&mut config.redis).await?;
        config.redis.key_prefix = format!("t{}", uuid::Uuid::new_v4().simple());
        // On a cluster, enough partitions that every shard holds some.
        config.redis.partitions = if on_redis_cluster() { 16 } else { 4 };
        config.budget.relay_enabled = false;
        // No scheduled snapshot lands in a test that runs past midnight.
        config.snapshots.schedule = String::new();
        Ok(config)
    }

    pub fn grpc_url(&self) -> String {
        self.server
            .as_ref()
            .map(|s| format!("http://{}", s.grpc_addr))
            .unwrap_or_default()
    }

    pub fn http_url(&self) -> String {
        self.server
            .as_ref()
            .map(|s| format!("http://{}", s.http_addr))
            .unwrap_or_default()
    }

    fn bearer(&self) -> Bearer {
        Bearer(Some(ADMIN_TOKEN.to_owned()))
    }

    pub fn agents(&self) -> AgentServiceClient<Svc> {
        AgentServiceClient::with_interceptor(self.channel.clone(), self.bearer())
    }
    pub fn agents_with(&self, token: Option<&str>) -> AgentServiceClient<Svc> {
        AgentServiceClient::with_interceptor(self.channel.clone(), Bearer(token.map(str::to_owned)))
    }
    pub fn policies(&self) -> PolicyServiceClient<Svc> {
        PolicyServiceClient::with_interceptor(self.channel.clone(), self.bearer())
    }
    pub fn allowlists(&self) -> AllowlistServiceClient<Svc> {
        AllowlistServiceClient::with_interceptor(self.channel.clone(), self.bearer())
    }
    pub fn ledger(&self) -> LedgerServiceClient<Svc> {
        LedgerServiceClient::with_interceptor(self.channel.clone(), self.bearer())
    }
    pub fn snapshots(
        &self,
    ) -> caracal_proto::v1::snapshot_service_client::SnapshotServiceClient<Svc> {
        caracal_proto::v1::snapshot_service_client::SnapshotServiceClient::with_interceptor(
            self.channel.clone(),
            self.bearer(),
        )
    }
    pub fn prices(&self) -> PriceBookServiceClient<Svc> {
        PriceBookServiceClient::with_interceptor(self.channel.clone(), self.bearer())
    }
    /// The hot path, as the gateway calls it: with the gateway token, no admin
    /// credentials.
    pub fn authz(&self) -> BudgetAuthorizationClient<GatewaySvc> {
        gateway_client(self.channel.clone())
    }
    /// The hot path with another gateway token (`None`: no token at all).
    pub fn authz_with(&self, token: Option<&str>) -> BudgetAuthorizationClient<GatewaySvc> {
        BudgetAuthorizationClient::with_interceptor(
            self.channel.clone(),
            GatewayToken(token.map(str::to_owned)),
        )
    }

    /// Creates an agent (optionally under `parent`) and issues it an API key:
    /// returns (agent id, key secret).
    pub async fn agent_with_key(
        &self,
        name: &str,
        parent: Option<&str>,
    ) -> anyhow::Result<(String, String)> {
        use caracal_proto::v1 as pb;
        let agent = self
            .agents()
            .create_agent(pb::CreateAgentRequest {
                name: name.into(),
                agent_type: "openai".into(),
                parent_id: parent.unwrap_or_default().into(),
                metadata_json: String::new(),
            })
            .await?
            .into_inner();
        let key = self
            .agents()
            .issue_api_key(pb::IssueApiKeyRequest {
                agent_id: agent.id.clone(),
            })
            .await?
            .into_inner();
        Ok((agent.id, key.secret))
    }

    /// Creates a USD policy (`limit` is decimal text); returns its id.
    pub async fn usd_policy(
        &self,
        agent_id: &str,
        limit: &str,
        window: &str,
        window_type: &str,
        on_expiry: &str,
    ) -> anyhow::Result<String> {
        use caracal_proto::v1 as pb;
        Ok(self
            .policies()
            .create_policy(pb::CreatePolicyRequest {
                agent_id: agent_id.into(),
                limit: limit.into(),
                currency: "USD".into(),
                time_window: window.into(),
                window_type: window_type.into(),
                on_expiry: on_expiry.into(),
            })
            .await?
            .into_inner()
            .id)
    }

    /// Sets a per-token price: decimal amounts per million input / output / cached
    /// input tokens, no per-request price.
    pub async fn set_token_price(
        &self,
        provider: &str,
        model: &str,
        currency: &str,
        [input, output, cached]: [&str; 3],
    ) -> anyhow::Result<()> {
        use caracal_proto::v1 as pb;
        self.prices()
            .set_price(pb::SetPriceRequest {
                provider: provider.into(),
                model: model.into(),
                currency: currency.into(),
                input_per_mtok: input.into(),
                output_per_mtok: output.into(),
                cached_input_per_mtok: cached.into(),
                per_request: "0".into(),
            })
            .await?;
        Ok(())
    }

    /// The Redis keys of `policy`'s counters (one per window or bucket range).
    pub async fn policy_counter_keys(&self, policy: &str) -> anyhow::Result<Vec<String>> {
        redis_keys(
            &mut self.redis_conn()?,
            &format!("{}:*:c:{policy}:*", self.key_prefix),
        )
        .await
    }

    /// The fields of every Redis counter of `policy` (one hash per window: one for
    /// `total` and calendar windows, one per bucket for rolling ones), as numbers.
    pub async fn policy_counters(
        &self,
        policy: &str,
    ) -> anyhow::Result<Vec<std::collections::HashMap<String, i64>>> {
        let conn = self.redis_conn()?;
        let keys = self.policy_counter_keys(policy).await?;
        let reads = keys
            .iter()
            .map(|k| redis::cmd("HGETALL").arg(k).clone())
            .collect();
        caracal_service_kit::redis::query_each(&conn, reads)
            .await?
            .into_iter()
            .map(|v| Ok(redis::from_redis_value(v)?))
            .collect()
    }

    /// Every entry of this stack's outbox streams (standalone Redis), `meta` spread
    /// as the relay spreads it: (partition, fields), per partition in stream order.
    pub async fn outbox_entries(
        &self,
    ) -> anyhow::Result<Vec<(u16, std::collections::HashMap<String, String>)>> {
        let client = redis::Client::open(self.redis.url.as_str())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let mut out = Vec::new();
        for p in 0..self.redis.partitions {
            let key = format!("{}:{{p{p}}}:outbox", self.key_prefix);
            let entries: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
                .arg(&key)
                .arg("-")
                .arg("+")
                .query_async(&mut conn)
                .await?;
            for e in entries.ids {
                let mut fields = std::collections::HashMap::new();
                for (k, v) in e.map {
                    fields.insert(k, redis::from_redis_value::<String>(v)?);
                }
                caracal_authz::outbox::expand_meta(&mut fields).map_err(anyhow::Error::msg)?;
                out.push((p, fields));
            }
        }
        Ok(out)
    }

    /// The outbox's charge events as the relay converts them and the ledger-writer
    /// decodes them: a row, or the reason the writer would dead-letter the event.
    /// Each gets its entry's position in its partition's stream as its offset.
    pub async fn outbox_charges(
        &self,
    ) -> anyhow::Result<Vec<Result<caracal_consumers::ledger::LedgerRow, String>>> {
        use caracal_authz::outbox::{convert_entry, EventKind};
        let mut decoded = Vec::new();
        let mut offsets: std::collections::HashMap<u16, i64> = std::collections::HashMap::new();
        for (p, fields) in self.outbox_entries().await? {
            let offset = offsets.entry(p).or_insert(0);
            let at = *offset;
            *offset += 1;
            let event = convert_entry(&fields).map_err(anyhow::Error::msg)?;
            if event.kind != EventKind::Charge {
                continue;
            }
            let msg = caracal_consumers::runner::RawMessage {
                topic: "caracal.metering.events".into(),
                partition: i32::from(p),
                offset: at,
                key: Some(event.key.into_bytes()),
                payload: Some(event.payload),
                headers: vec![("schema_version".into(), Some(b"1".to_vec()))],
                timestamp_ms: None,
            };
            decoded.push(caracal_consumers::ledger::decode(&msg));
        }
        Ok(decoded)
    }

    /// A connection to this stack's Redis (standalone or cluster).
    pub fn redis_conn(&self) -> anyhow::Result<caracal_service_kit::redis::RedisConn> {
        Ok(self.redis.endpoint(Duration::from_secs(5)).connect_one()?)
    }

    /// A direct connection to this stack's database, to check what was written.
    pub async fn db(&self) -> anyhow::Result<AsyncPgConnection> {
        Ok(AsyncPgConnection::establish(&self.database_url).await?)
    }

    /// Counts rows of a table (test-only helper; the table name is a literal).
    pub async fn count(&self, table: &str) -> anyhow::Result<i64> {
        #[derive(diesel::QueryableByName)]
        struct Count {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        let mut conn = self.db().await?;
        let row: Count = diesel::sql_query(format!("SELECT count(*) AS n FROM {table}"))
            .get_result(&mut conn)
            .await?;
        Ok(row.n)
    }

    /// Stops the service, drops its database and deletes its Redis keys.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(server) = self.server.take() {
            server.shutdown().await?;
        }
        // Best effort: a stack whose Redis refused it (a TLS test) wrote nothing.
        if let Ok(mut conn) = self.redis_conn() {
            if let Ok(keys) = redis_keys(&mut conn, &format!("{}:*", self.key_prefix)).await {
                // One DEL per key: on a cluster they live on different slots. In
                // slices: a bench leaves hundreds of thousands, more than one
                // pipeline gets through within the connection's timeout.
                for slice in keys.chunks(2_000) {
                    let deletes = slice.iter().map(|k| redis::cmd("DEL").arg(k).clone());
                    caracal_service_kit::redis::query_each(&conn, deletes.collect()).await?;
                }
            }
        }
        drop(self.channel);
        TestDb {
            name: self.database,
            url: self.database_url,
        }
        .drop()
        .await
    }
}

/// A stack on `redis` (4 budget partitions) whose relay publishes to a tansu
/// broker of its own (2 partitions per topic), and a ledger-writer in this process
/// writing the stack's database from it; `tune` adjusts the service's settings.
pub async fn relayed_stack(
    redis: &own_redis::OwnRedis,
    tune: impl FnOnce(&mut Config),
) -> (
    kafka::Tansu,
    TestStack,
    caracal_consumers::launch::RunningConsumer,
) {
    let tansu = kafka::Tansu::start_new().await.unwrap();
    let brokers = tansu.brokers();
    let b = brokers.clone();
    let stack = TestStack::start_with(|c| {
        redis.configure(&mut c.redis);
        c.redis.partitions = 4;
        c.budget.relay_enabled = true;
        c.kafka.brokers = b;
        c.kafka.topic_partitions = 2;
        tune(c);
    })
    .await
    .unwrap();
    let mut writer_config = consumer_config::database_consumer_config(
        &stack.database_url,
        &brokers,
        &format!("relayed-{}", uuid::Uuid::new_v4().simple()),
    )
    .unwrap();
    // A checkpoint within a second of a leaf (verify-range has them all signed).
    writer_config.ledger_writer.merkle.batch_timeout_seconds = 1;
    let writer = caracal_consumers::ledger::start(writer_config)
        .await
        .unwrap();
    (tansu, stack, writer)
}
