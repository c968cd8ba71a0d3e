//! Wires configuration, database, admin services, health, reflection and HTTP probes
//! into one server, and runs it until asked to stop.

use std::{net::SocketAddr, time::Duration};

use anyhow::Context;
use caracal_proto::v1::{
    agent_service_server::AgentServiceServer, allowlist_service_server::AllowlistServiceServer,
    budget_authorization_server::BudgetAuthorizationServer,
    ledger_service_server::LedgerServiceServer, policy_service_server::PolicyServiceServer,
    price_book_service_server::PriceBookServiceServer, spend_service_server::SpendServiceServer,
};
use tokio::{
    net::TcpListener,
    sync::{oneshot, watch},
    task::JoinHandle,
};
use tonic::{
    service::interceptor::InterceptedService,
    transport::{server::TcpIncoming, Certificate, Identity, Server, ServerTlsConfig},
};
use tower::limit::GlobalConcurrencyLimitLayer;

use crate::{
    admin::{
        AdminState, AgentAdmin, AllowlistAdmin, LedgerAdmin, PolicyAdmin, PriceBookAdmin,
        SpendAdmin,
    },
    auth::{AdminAuth, GatewayAuth},
    authorize::{AuthorizationService, Settings},
    budget::{BudgetStore, KeySpace, ReplicaAck},
    catalog::Catalog,
    config::Config,
    db,
    outbox::OutboxRelay,
};

/// The async runtime for `server.workerThreads`: 1 = single-threaded (no work
/// stealing or cross-thread wake-ups: the cheapest per call on one core),
/// 0 = one worker per available core, N = N workers.
pub fn runtime(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match worker_threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    if worker_threads > 1 {
        builder.worker_threads(worker_threads);
    }
    builder.enable_all().build()
}

/// A started server: its bound addresses and a handle to stop it.
pub struct RunningServer {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    shutdown: Vec<oneshot::Sender<()>>,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
    /// Ends the open CallStreams (before the listener waits for them).
    streams_stop: watch::Sender<bool>,
    /// Stops the background loops (epoch watcher, sweeper, relay).
    background_stop: watch::Sender<bool>,
    background: Vec<JoinHandle<()>>,
}

impl RunningServer {
    /// Stops accepting, lets in-flight calls finish, and waits for the listeners.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.streams_stop.send(true);
        for tx in self.shutdown {
            let _ = tx.send(());
        }
        for task in self.tasks {
            task.await.context("server task panicked")??;
        }
        // Listeners are closed: no new events. Let the relay drain what it holds.
        let _ = self.background_stop.send(true);
        for task in self.background {
            let _ = task.await;
        }
        Ok(())
    }

    /// Waits until a listener stops on its own (an error).
    pub async fn wait(&mut self) -> anyhow::Result<()> {
        let tasks = std::mem::take(&mut self.tasks);
        let (first, _, rest) = futures::future::select_all(tasks).await;
        self.tasks = rest;
        first.context("server task panicked")?
    }
}

/// Connects to the database, applies migrations, binds both listeners and starts
/// serving. Port 0 in the config picks a free port (tests read the bound address).
pub async fn serve(config: Config) -> anyhow::Result<RunningServer> {
    crate::metrics::init();
    let applied = db::run_migrations(&config.database.url).await?;
    if !applied.is_empty() {
        tracing::info!(?applied, "applied database migrations");
    }
    let pool = db::connect(&config.database).await?;
    let has_client_ca = config
        .server
        .tls
        .as_ref()
        .is_some_and(|t| t.client_ca_file.is_some());
    if config.auth.admin_token.is_empty() && (config.auth.admin_sans.is_empty() || !has_client_ca) {
        tracing::warn!("no admin token and no admin certificate SANs with a client CA: the admin API will refuse every call");
    }
    if config.auth.gateway_token.is_empty()
        && (config.auth.gateway_sans.is_empty() || !has_client_ca)
    {
        tracing::warn!("no gateway token and no gateway certificate SANs with a client CA (auth.gatewayToken, auth.gatewaySans, server.tls.clientCaFile): every Authorize, Settle, Release and ext_authz Check will be refused");
    }
    if config.auth.api_key_pepper.is_empty() {
        tracing::warn!("auth.apiKeyPepper is empty: API-key hashes are unkeyed; set CARACAL_API_KEY_PEPPER in production");
    }

    let (background_stop, background_rx) = watch::channel(false);
    let (streams_stop, streams_rx) = watch::channel(false);
    let mut background = Vec::new();
    let catalog = Catalog::new(
        pool.clone(),
        config.auth.api_key_pepper.clone(),
        Duration::from_secs(config.cache.policy_cache_ttl),
        config.cache.policy_cache_max_size,
    );
    background.push(tokio::spawn(catalog.clone().watch_epoch(
        Duration::from_secs(config.budget.config_poll_interval.max(1)),
        background_rx.clone(),
    )));
    let keys = KeySpace::new(config.redis.key_prefix.clone(), config.redis.partitions);
    let store = BudgetStore::new(
        &config
            .redis
            .endpoint(Duration::from_millis(config.redis.timeout_ms)),
        keys.clone(),
        config.redis.hot_path_connections(),
        ReplicaAck {
            replicas: config.redis.replicas_ack(),
            timeout: Duration::from_millis(config.redis.replica_ack_timeout_ms),
        },
    )
    .context("Redis configuration")?
    .with_group_commit(config.redis.group_commit_max_calls);
    // Whether Redis holds the budget state: established on a new deployment before
    // the first call, then watched (budget::state). A Redis that cannot be reached
    // now is looked at again by the watcher.
    if let Err(error) = crate::budget::state::check(&pool, &store).await {
        tracing::warn!(%error, "budget-state check at start failed; retrying in the background");
    }
    background.push(tokio::spawn(crate::budget::state::watch(
        pool.clone(),
        store.clone(),
        background_rx.clone(),
    )));
    if config.redis.mode == crate::config::RedisMode::Cluster {
        background.push(tokio::spawn(crate::cluster_watch::run(
            store.clone(),
            background_rx.clone(),
        )));
    }
    // A replica may use a configuration this long after it changed (cache TTL, or
    // the next epoch poll): how long a retired budget counter stays fenced.
    let fence_ttl_s = config
        .cache
        .policy_cache_ttl
        .saturating_add(config.budget.config_poll_interval)
        .saturating_add(30);
    let state = AdminState {
        pool: pool.clone(),
        api_key_pepper: config.auth.api_key_pepper.clone(),
        counters: crate::admin::counters::CounterGuard::new(store.clone(), fence_ttl_s),
    };
    background.push(tokio::spawn(crate::sweeper::run(
        store.clone(),
        Duration::from_secs(config.reservations.provisional_charge_cleanup_interval),
        config.budget.finished_marker_ttl,
        background_rx.clone(),
    )));
    if config.budget.relay_enabled {
        if let Err(e) = crate::kafka::ensure_topics(&config.kafka).await {
            // Not fatal: events wait in the outbox until the broker is reachable.
            tracing::warn!(error = %e, "cannot ensure Kafka topics now; the relay will keep retrying");
        }
        let owner = format!("authz-{}", uuid::Uuid::new_v4().simple());
        // Its own Redis connection: 500-entry XRANGE replies on the hot path's
        // multiplexed connection would delay Authorize calls queued behind them.
        let relay_conn = config
            .redis
            .endpoint(Duration::from_millis(config.redis.timeout_ms.max(5_000)))
            .connect_one()
            .context("Redis configuration")?;
        let relay = OutboxRelay::new(relay_conn, keys.clone(), &config.kafka, owner)
            .context("Kafka producer configuration")?;
        background.push(tokio::spawn(relay.run(background_rx.clone())));
        // Admin change events: PostgreSQL outbox -> Kafka, one replica at a time.
        let admin_relay =
            crate::admin_events::AdminOutboxRelay::new(config.database.url.clone(), &config.kafka)
                .context("Kafka producer configuration")?;
        background.push(tokio::spawn(admin_relay.run(background_rx.clone())));
    }
    // The dead-letter queue: DeadLetterService reads and replays it; the monitor
    // sets its gauges, where this process talks to Kafka.
    let dlq = std::sync::Arc::new(caracal_service_kit::dlq_admin::DlqAdmin::new(
        &config.kafka,
        pool.clone(),
        caracal_service_kit::dlq_admin::Limits {
            read_timeout: Duration::from_secs(config.dlq.read_timeout),
            claim_timeout: Duration::from_secs(config.dlq.replay_claim_timeout),
        },
    ));
    let dlq_rescan = std::sync::Arc::new(tokio::sync::Notify::new());
    if config.budget.relay_enabled && config.dlq.monitor_interval > 0 {
        background.push(tokio::spawn(crate::dlq_monitor::run(
            dlq.clone(),
            Duration::from_secs(config.dlq.monitor_interval),
            dlq_rescan.clone(),
            background_rx.clone(),
        )));
    }
    // Where a budget rebuild (or snapshot) reads the reservations open: the
    // decisions topic, when the relay writes one.
    let decisions =
        config
            .budget
            .relay_enabled
            .then(|| crate::admin::ledger::reopen::DecisionsSource {
                kafka: config.kafka.clone(),
                reservation_ttl: Duration::from_secs(
                    config.reservations.provisional_charge_expiration,
                ),
                timeout: Duration::from_secs(120),
            });
    let snapshot_schedule = match config.snapshots.schedule.trim() {
        "" => None,
        text => Some(
            text.parse::<caracal_domain::schedule::CronSchedule>()
                .map_err(|e| anyhow::anyhow!("snapshots.schedule: {e}"))?,
        ),
    };
    let snapshots = crate::admin::SnapshotAdmin::new(
        state.clone(),
        store.clone(),
        decisions.clone(),
        caracal_service_kit::snapshot::SnapshotStore::new(
            &config.snapshots.store,
            &config.snapshots.directory,
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?,
        snapshot_schedule,
        config.snapshots.retention_days,
    );
    background.push(tokio::spawn(
        snapshots.clone().run_schedule(background_rx.clone()),
    ));
    if config.reconcile.monitor_interval > 0 {
        background.push(tokio::spawn(crate::reconcile_monitor::run(
            pool.clone(),
            store.clone(),
            Duration::from_secs(config.reconcile.monitor_interval),
            background_rx.clone(),
        )));
    }
    let authorization = AuthorizationService::new(
        catalog,
        store.clone(),
        Settings {
            reservation_ttl_s: config.reservations.provisional_charge_expiration,
            finished_marker_ttl_s: config.budget.finished_marker_ttl,
            allow_without_policy: config.budget.allow_without_policy,
        },
        streams_rx,
    );
    // Envoy ext_authz (Authorization/Check) on the same hot path as Authorize.
    let ext_authz = crate::ext_authz::ExtAuthzService::new(authorization.clone());

    let auth = AdminAuth::new(
        &config.auth.admin_token,
        &config.auth.admin_sans,
        &config.auth.gateway_sans,
    );
    let intercept = move |req| auth.check(req);
    // The hot path answers gateways only: Settle/Release move money and `verified`
    // identities / ext_authz `source.principal` are taken on the gateway's word.
    let gateway = GatewayAuth::new(
        &config.auth.gateway_token,
        &config.auth.gateway_sans,
        &config.auth.admin_sans,
    );
    let gateway_intercept = move |req| gateway.check(req);

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<AgentServiceServer<AgentAdmin>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(caracal_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the reflection service")?;

    let mut builder = Server::builder()
        .timeout(config.request_timeout())
        .http2_keepalive_interval(Some(Duration::from_secs(30)));
    if let Some(tls) = &config.server.tls {
        let cert = std::fs::read(&tls.cert_file)
            .with_context(|| format!("reading {}", tls.cert_file.display()))?;
        let key = std::fs::read(&tls.key_file)
            .with_context(|| format!("reading {}", tls.key_file.display()))?;
        let mut tls_config = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
        if let Some(ca) = &tls.client_ca_file {
            let ca = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
            // Optional: agents' and token-holding admins' connections carry no cert.
            tls_config = tls_config
                .client_ca_root(Certificate::from_pem(ca))
                .client_auth_optional(true);
        }
        builder = builder
            .tls_config(tls_config)
            .context("TLS configuration")?;
    }
    let router = builder
        .layer(GlobalConcurrencyLimitLayer::new(
            config.server.max_concurrent_requests,
        ))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(InterceptedService::new(
            BudgetAuthorizationServer::from_arc(authorization),
            gateway_intercept.clone(),
        ))
        .add_service(
            envoy_types::ext_authz::v3::pb::AuthorizationServer::with_interceptor(
                ext_authz,
                gateway_intercept,
            ),
        )
        .add_service(AgentServiceServer::with_interceptor(
            AgentAdmin::new(state.clone()),
            intercept.clone(),
        ))
        .add_service(PolicyServiceServer::with_interceptor(
            PolicyAdmin::new(state.clone()),
            intercept.clone(),
        ))
        .add_service(AllowlistServiceServer::with_interceptor(
            AllowlistAdmin::new(state.clone()),
            intercept.clone(),
        ))
        .add_service(
            caracal_proto::v1::dead_letter_service_server::DeadLetterServiceServer::with_interceptor(
                crate::admin::DeadLetterAdmin::new(dlq, dlq_rescan),
                intercept.clone(),
            ),
        )
        .add_service(PriceBookServiceServer::with_interceptor(
            PriceBookAdmin::new(state.clone()),
            intercept.clone(),
        ))
        .add_service(SpendServiceServer::with_interceptor(
            SpendAdmin::new(state.clone(), store.clone()),
            intercept.clone(),
        ))
        .add_service(
            caracal_proto::v1::merkle_service_server::MerkleServiceServer::with_interceptor(
                crate::admin::MerkleAdmin::new(state.clone()),
                intercept.clone(),
            ),
        )
        .add_service(LedgerServiceServer::with_interceptor(
            LedgerAdmin::new(state.clone(), store.clone(), decisions),
            intercept.clone(),
        ))
        .add_service(
            caracal_proto::v1::snapshot_service_server::SnapshotServiceServer::with_interceptor(
                snapshots, intercept,
            ),
        );

    let grpc_listener = TcpListener::bind(config.server.grpc_addr)
        .await
        .with_context(|| format!("binding gRPC on {}", config.server.grpc_addr))?;
    let http_listener = TcpListener::bind(config.server.http_addr)
        .await
        .with_context(|| format!("binding HTTP on {}", config.server.http_addr))?;
    let grpc_addr = grpc_listener.local_addr()?;
    let http_addr = http_listener.local_addr()?;

    let (grpc_tx, grpc_rx) = oneshot::channel::<()>();
    let (http_tx, http_rx) = oneshot::channel::<()>();
    // Our own listener (to learn the bound port), so tonic's own socket options do
    // not apply: TCP_NODELAY is set here, or Nagle + delayed ACK add ~40 ms per call.
    let incoming = TcpIncoming::from(grpc_listener).with_nodelay(Some(true));
    let grpc_task = tokio::spawn(async move {
        router
            .serve_with_incoming_shutdown(incoming, async {
                let _ = grpc_rx.await;
            })
            .await
            .context("gRPC server")
    });
    let http_task = tokio::spawn(async move {
        axum::serve(http_listener, crate::http::router(pool, store))
            .with_graceful_shutdown(async {
                let _ = http_rx.await;
            })
            .await
            .context("HTTP server")
    });
    tracing::info!(%grpc_addr, %http_addr, "caracal authz-service listening");
    Ok(RunningServer {
        grpc_addr,
        http_addr,
        shutdown: vec![grpc_tx, http_tx],
        tasks: vec![grpc_task, http_task],
        streams_stop,
        background_stop,
        background,
    })
}
