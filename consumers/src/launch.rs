//! Starting a consumer, the same way for every one of them: `/health` + `/metrics`
//! bound at once, then in the background (retrying until the database answers) the
//! migrations, the pool (or the consumer's own store: [`launch_with`]), the group
//! membership, the periodic upkeep job of the consumer (ledger partitions ahead,
//! audit retention, spend gauges and anomalies), the lag sampler and the [`Runner`]
//! loop.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use caracal_service_kit::db::{self, Pool};
use tokio::{sync::watch, task::JoinHandle};

use crate::{
    config::{Assignment, ConsumerConfig},
    health::{self, HealthState},
    lag,
    lease::{self, LeaseSettings, Leases},
    runner::{self, Handler, Progress, Runner},
};

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("binding the health listener: {0}")]
    Listen(#[from] std::io::Error),
    #[error(transparent)]
    Kafka(#[from] runner::RunnerError),
    #[error("the consumer task failed: {0}")]
    Task(String),
    #[error("the consumer's store: {0}")]
    Store(String),
}

/// A consumer started in-process by [`launch`].
pub struct RunningConsumer {
    /// Where `/health/*` and `/metrics` are served.
    pub http_addr: SocketAddr,
    pub health: Arc<HealthState>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<Result<(), LaunchError>>,
    http: JoinHandle<()>,
    /// Tasks running beside the consumer (the ledger-writer's Merkle sequencer),
    /// stopped with it.
    sidecars: Vec<JoinHandle<()>>,
}

impl RunningConsumer {
    /// Stops polling, finishes and commits the batch in hand, leaves the group.
    pub async fn shutdown(self) -> Result<(), LaunchError> {
        let _ = self.shutdown.send(true);
        let result = self
            .task
            .await
            .map_err(|e| LaunchError::Task(e.to_string()));
        for sidecar in self.sidecars {
            let _ = sidecar.await;
        }
        let _ = self.http.await;
        result?
    }

    /// Runs `start(shutdown)` beside the consumer; it must stop when `shutdown`
    /// turns true ([`Self::shutdown`] waits for it).
    pub fn attach(&mut self, start: impl FnOnce(watch::Receiver<bool>) -> JoinHandle<()>) {
        self.sidecars.push(start(self.shutdown.subscribe()));
    }

    /// Waits until the consumer stops by itself (it does not, unless it fails).
    pub async fn wait(&mut self) -> Result<(), LaunchError> {
        (&mut self.task)
            .await
            .map_err(|e| LaunchError::Task(e.to_string()))?
    }
}

/// What makes one consumer: its default group, its topics, its handler (built on
/// the pool, or the consumer's own store) and its upkeep job, run at start and then every `upkeep_every`.
pub struct Consumer<F, U> {
    pub default_group: &'static str,
    pub topics: Vec<String>,
    pub handler: F,
    pub upkeep_every: Duration,
    pub upkeep: U,
}

/// Starts `consumer` (see the module documentation) on PostgreSQL: its handler and
/// upkeep job get the pool.
pub async fn launch<H, F, U, UF>(
    config: ConsumerConfig,
    consumer: Consumer<F, U>,
) -> Result<RunningConsumer, LaunchError>
where
    H: Handler,
    F: FnOnce(Pool) -> H + Send + 'static,
    U: Fn(Pool) -> UF + Send + 'static,
    UF: Future<Output = ()> + Send,
{
    let settings = config.clone();
    let assignment = config.assignment();
    start(
        config,
        consumer,
        assignment,
        move |state, shutdown| async move {
            let pool = database(&settings, &shutdown).await?;
            state.set_pool(pool.clone());
            Some(pool)
        },
    )
    .await
}

/// Starts `consumer` on a store of its own (the metrics-aggregator's Redis):
/// `connect` registers the store's readiness check and returns what the handler
/// and the upkeep job get (`None`: shutdown was asked for first). The consumer
/// joins its group only once `connect` returned. Partition leases live in
/// PostgreSQL, which such a consumer does not use: `assignment: leases` means the
/// Kafka group protocol here (`static` works as everywhere).
pub async fn launch_with<R, H, F, U, UF, C, CF>(
    config: ConsumerConfig,
    consumer: Consumer<F, U>,
    connect: C,
) -> Result<RunningConsumer, LaunchError>
where
    R: Clone + Send + 'static,
    H: Handler,
    F: FnOnce(R) -> H + Send + 'static,
    U: Fn(R) -> UF + Send + 'static,
    UF: Future<Output = ()> + Send,
    C: FnOnce(Arc<HealthState>, watch::Receiver<bool>) -> CF + Send + 'static,
    CF: Future<Output = Option<R>> + Send,
{
    let assignment = match config.assignment() {
        Assignment::Leases => Assignment::Group,
        other => other,
    };
    start(config, consumer, assignment, connect).await
}

async fn start<R, H, F, U, UF, C, CF>(
    config: ConsumerConfig,
    consumer: Consumer<F, U>,
    assignment: Assignment,
    connect: C,
) -> Result<RunningConsumer, LaunchError>
where
    R: Clone + Send + 'static,
    H: Handler,
    F: FnOnce(R) -> H + Send + 'static,
    U: Fn(R) -> UF + Send + 'static,
    UF: Future<Output = ()> + Send,
    C: FnOnce(Arc<HealthState>, watch::Receiver<bool>) -> CF + Send + 'static,
    CF: Future<Output = Option<R>> + Send,
{
    crate::metrics::init();
    let health = Arc::new(HealthState::default());
    let (shutdown, rx) = watch::channel(false);
    let (listener, http_addr) = health::bind(config.consumer.http_addr).await?;
    let http = health::serve(listener, health.clone(), rx.clone());
    let group = config.group_id(consumer.default_group);
    let state = health.clone();
    let task: JoinHandle<Result<(), LaunchError>> = tokio::spawn(async move {
        let shutdown = rx;
        let Some(store) = connect(state.clone(), shutdown.clone()).await else {
            return Ok(());
        };
        // Join the group only once the store answers: a member that cannot
        // write would hold its partitions without progress.
        let topics: Vec<&str> = consumer.topics.iter().map(String::as_str).collect();
        let (kafka, producer) =
            runner::connect(&config, assignment, &group, &topics, state.clone())?;
        let progress = Arc::new(Progress::default());
        // Partition leases: a task of their own on the consumer's database.
        let (leases, lease_stop) = match assignment {
            Assignment::Leases => {
                let leases = Arc::new(Leases::default());
                state.set_leases(leases.clone());
                let (stop, stopped) = watch::channel(false);
                let task = lease::spawn(
                    LeaseSettings {
                        url: config.database.url.clone(),
                        group: group.clone(),
                        topics: consumer.topics.clone(),
                        interval: config.lease_interval(),
                    },
                    kafka.clone(),
                    progress.clone(),
                    leases.clone(),
                    stopped,
                );
                (Some(leases), Some((stop, task)))
            }
            Assignment::Group | Assignment::Static => (None, None),
        };
        let upkeep = {
            let (store, mut shutdown) = (store.clone(), shutdown.clone());
            let (job, every) = (consumer.upkeep, consumer.upkeep_every);
            tokio::spawn(async move {
                loop {
                    job(store.clone()).await;
                    tokio::select! {
                        () = tokio::time::sleep(every) => {}
                        changed = shutdown.changed() => if changed.is_err() || *shutdown.borrow() { break },
                    }
                }
            })
        };
        let lag = lag::spawn_sampler(
            lag::Sampler {
                consumer: kafka.clone(),
                group: group.clone(),
                topics: consumer.topics.clone(),
                every: Duration::from_millis(config.consumer.lag_interval_ms),
                stall_after: Duration::from_secs(config.consumer.stall_seconds),
                progress: progress.clone(),
                health: state.clone(),
            },
            shutdown.clone(),
        );
        Runner::new(
            (consumer.handler)(store),
            kafka.clone(),
            producer,
            &config,
            &group,
            state,
            progress,
            leases,
        )
        .run(shutdown)
        .await;
        upkeep.abort();
        let _ = lag.await;
        // The last batch is committed: now the leases may go (closing the lease
        // session frees them for the other replicas at once).
        if let Some((stop, task)) = lease_stop {
            let _ = stop.send(true);
            let _ = task.await;
        }
        // The last handle: dropping it closes the consumer, which leaves the group,
        // so the partitions move to another replica at once.
        drop(kafka);
        Ok(())
    });
    Ok(RunningConsumer {
        http_addr,
        health,
        shutdown,
        task,
        http,
        sidecars: Vec::new(),
    })
}

/// What every consumer does before it joins its group: applies the migrations (when
/// `consumer.runMigrations`) and opens the PostgreSQL pool, each retried with capped
/// backoff for as long as the database does not answer. `None`: shutdown was asked
/// for first.
async fn database(config: &ConsumerConfig, shutdown: &watch::Receiver<bool>) -> Option<Pool> {
    if config.consumer.run_migrations {
        let url = config.database.url.clone();
        let applied = until_ok("applying migrations", shutdown, || {
            let url = url.clone();
            async move { db::run_migrations(&url).await.map_err(|e| e.to_string()) }
        })
        .await?;
        if !applied.is_empty() {
            tracing::info!(?applied, "migrations applied");
        }
    }
    until_ok("connecting to PostgreSQL", shutdown, || {
        let database = config.database.clone();
        async move { db::connect(&database).await.map_err(|e| e.to_string()) }
    })
    .await
}

/// Retries `f` with capped backoff until it succeeds or shutdown is asked for.
pub(crate) async fn until_ok<T, F, Fut>(
    what: &str,
    shutdown: &watch::Receiver<bool>,
    mut f: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let mut backoff = Duration::from_millis(200);
    loop {
        match f().await {
            Ok(v) => return Some(v),
            Err(error) => tracing::warn!(%error, retry_in = ?backoff, "{what} failed; retrying"),
        }
        if *shutdown.borrow() {
            return None;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
