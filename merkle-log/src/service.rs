//! The sequencer task of the ledger-writer: every replica runs it, one holds the
//! PostgreSQL advisory lock and sequences; the others wait on the lock and take
//! over within `standbyIntervalMs` of the leader's session ending (a killed
//! process's socket closes and PostgreSQL frees its lock; a vanished host is found
//! by the session's TCP keepalives). Correctness does not rest on the lock: each
//! sequencing transaction locks `merkle_state` (see [`crate::sequencer`]).
//!
//! The leader also reloads its signing keys (rotation) every
//! [`KEY_RELOAD`], refreshes the gauges, and runs the self-check.

use std::time::{Duration, Instant};

use caracal_domain::merkle::keys::{key_id_hex, Signer};
use caracal_service_kit::db::tls;
use diesel_async::{AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection as _};
use tokio::{sync::watch, task::JoinHandle};

use crate::{
    checkpoints, keys, metric,
    sequencer::{self, Limits, Sequencer},
    verify::{self, Scope},
    LogError, MerkleConfig,
};

/// Advisory lock key of the sequencer (one per database).
pub const SEQUENCER_LOCK: i64 = 7_368_223_510;
/// How often the leader looks for a new signing key.
pub const KEY_RELOAD: Duration = Duration::from_secs(5);
/// How often the leader refreshes the queue-depth and checkpoint-age gauges.
const GAUGES_EVERY: Duration = Duration::from_secs(5);

/// Starts the sequencer task; it stops when `shutdown` turns true.
pub fn spawn(url: String, config: MerkleConfig, shutdown: watch::Receiver<bool>) -> JoinHandle<()> {
    tokio::spawn(run(url, config, shutdown))
}

async fn run(url: String, config: MerkleConfig, mut shutdown: watch::Receiver<bool>) {
    metrics::gauge!(metric::LEADER).set(0.0);
    // The failure counters exist from the start (at 0), so an alert on their rate
    // sees a series before the first failure, in whatever process runs the sequencer.
    metrics::counter!(metric::ERRORS).increment(0);
    metrics::counter!(metric::VERIFICATION_FAILURES).increment(0);
    let mut backoff = Duration::from_millis(200);
    loop {
        if *shutdown.borrow() {
            return;
        }
        match lead(&url, &config, &mut shutdown).await {
            Ok(()) => return,
            Err(error) => {
                metrics::gauge!(metric::LEADER).set(0.0);
                metrics::counter!(metric::ERRORS).increment(1);
                tracing::warn!(%error, retry_in = ?backoff, "Merkle sequencer stopped; retrying");
            }
        }
        if wait(&mut shutdown, backoff).await {
            return;
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Sleeps `d`; true when shutdown was asked for meanwhile.
async fn wait(shutdown: &mut watch::Receiver<bool>, d: Duration) -> bool {
    tokio::select! {
        () = tokio::time::sleep(d) => *shutdown.borrow(),
        changed = shutdown.changed() => changed.is_err() || *shutdown.borrow(),
    }
}

/// The signing keys this replica holds (an ephemeral one when `keyDir` is empty).
fn held_keys(
    config: &MerkleConfig,
    ephemeral: &mut Option<Signer>,
) -> Result<Vec<(std::path::PathBuf, Signer)>, LogError> {
    if config.key_dir.as_os_str().is_empty() {
        let signer = match ephemeral {
            Some(s) => s.clone(),
            None => {
                let s =
                    Signer::generate(&config.origin).map_err(|e| LogError::Key(e.to_string()))?;
                tracing::warn!(
                    key_id = %key_id_hex(&s.id()),
                    "ledgerWriter.merkle.keyDir is empty: checkpoints are signed with an ephemeral \
                     key (its public key is in merkle_keys); set keyDir for a key of record"
                );
                *ephemeral = Some(s.clone());
                s
            }
        };
        return Ok(vec![(std::path::PathBuf::new(), signer)]);
    }
    let passphrase = keys::read_passphrase(&config.key_passphrase_file)?;
    let mut held = keys::load_signers(&config.key_dir, &config.origin, passphrase.as_deref())?;
    if held.is_empty() && config.generate_key_if_missing {
        let (path, signer) =
            keys::generate_into(&config.key_dir, &config.origin, passphrase.as_deref())?;
        tracing::warn!(path = %path.display(), key_id = %key_id_hex(&signer.id()), "no signing key in keyDir: generated one");
        held.push((path, signer));
    }
    if held.is_empty() {
        return Err(LogError::Key(format!(
            "no signing key (*.pem) in {}",
            config.key_dir.display()
        )));
    }
    Ok(held)
}

async fn session(url: &str) -> Result<AsyncPgConnection, LogError> {
    let mut conn = tls::establish(url)
        .await
        .map_err(|e| LogError::Unavailable(e.to_string()))?;
    // A leader whose host vanished is noticed by PostgreSQL within ~11 s.
    conn.batch_execute(
        "SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 2; \
         SET tcp_keepalives_count = 3; SET application_name = 'caracal-merkle-sequencer'",
    )
    .await?;
    Ok(conn)
}

/// Waits for the lock, then sequences until shutdown (Ok) or an error.
async fn lead(
    url: &str,
    config: &MerkleConfig,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), LogError> {
    #[derive(diesel::QueryableByName)]
    struct Flag {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        ok: bool,
    }
    let mut conn = session(url).await?;
    loop {
        let got: Flag = diesel::sql_query("SELECT pg_try_advisory_lock($1) AS ok")
            .bind::<diesel::sql_types::BigInt, _>(SEQUENCER_LOCK)
            .get_result(&mut conn)
            .await?;
        if got.ok {
            break;
        }
        if wait(shutdown, Duration::from_millis(config.standby_interval_ms)).await {
            return Ok(());
        }
    }
    metrics::gauge!(metric::LEADER).set(1.0);
    let mut ephemeral = None;
    let signer = keys::select_signer(&mut conn, held_keys(config, &mut ephemeral)?).await?;
    tracing::info!(key_id = %key_id_hex(&signer.id()), "Merkle sequencer leading");
    let mut seq = Sequencer::new(
        signer,
        &config.origin,
        Limits {
            batch_size_limit: config.batch_size_limit,
            batch_timeout: chrono::Duration::seconds(
                i64::try_from(config.batch_timeout_seconds).unwrap_or(i64::MAX / 1000),
            ),
            max_leaves_per_transaction: config.max_leaves_per_transaction,
        },
    );
    let mut keys_at = Instant::now();
    let mut gauges_at = Instant::now() - GAUGES_EVERY;
    let self_check_every = Duration::from_secs(config.self_check_interval_seconds);
    let mut self_check_at = Instant::now();
    let mut checked_upto: Option<u64> = None;
    let mut self_check: Option<JoinHandle<Option<u64>>> = None;
    loop {
        if *shutdown.borrow() {
            break;
        }
        let started = Instant::now();
        let out = seq.step(&mut conn).await?;
        if out.leaves > 0 || !out.checkpoints.is_empty() {
            metrics::histogram!(metric::BATCH_SIZE).record(out.leaves as f64);
            metrics::histogram!(metric::BATCH_SECONDS).record(started.elapsed().as_secs_f64());
            for s in &out.signing_seconds {
                metrics::histogram!(metric::SIGNING_SECONDS).record(*s);
            }
            metrics::gauge!(metric::TREE_SIZE).set(out.tree_size as f64);
            for size in &out.checkpoints {
                tracing::debug!(size, "checkpoint published");
            }
        }
        if keys_at.elapsed() >= KEY_RELOAD {
            keys_at = Instant::now();
            let signer = keys::select_signer(&mut conn, held_keys(config, &mut ephemeral)?).await?;
            if signer.id() != seq.signer().id() {
                tracing::info!(
                    from = %key_id_hex(&seq.signer().id()),
                    to = %key_id_hex(&signer.id()),
                    "Merkle signing key rotated"
                );
                seq.set_signer(signer);
            }
        }
        if gauges_at.elapsed() >= GAUGES_EVERY {
            gauges_at = Instant::now();
            let depth = sequencer::queue_depth(&mut conn).await?;
            metrics::gauge!(metric::QUEUE_DEPTH).set(depth as f64);
            let newest = checkpoints::newest(&mut conn, 1).await?;
            let age = newest
                .as_slice()
                .first()
                .map_or(0.0, |c: &checkpoints::CheckpointRecord| {
                    (chrono::Utc::now() - c.published_at)
                        .num_milliseconds()
                        .max(0) as f64
                        / 1000.0
                });
            metrics::gauge!(metric::CHECKPOINT_AGE).set(age);
            let (size, _) = sequencer::state(&mut conn).await?;
            metrics::gauge!(metric::TREE_SIZE).set(size as f64);
        }
        // The self-check, on a connection of its own so sequencing goes on.
        if self_check.as_ref().is_some_and(JoinHandle::is_finished) {
            // Finished: awaiting it returns at once.
            if let Some(Ok(Some(upto))) = match self_check.take() {
                Some(task) => Some(task.await),
                None => None,
            } {
                checked_upto = Some(upto);
            }
        }
        if !self_check_every.is_zero()
            && self_check.is_none()
            && self_check_at.elapsed() >= self_check_every
        {
            self_check_at = Instant::now();
            self_check = Some(tokio::spawn(run_self_check(
                url.to_owned(),
                checked_upto,
                config.self_check_max_leaves,
            )));
        }
        if !out.more && wait(shutdown, Duration::from_millis(config.poll_interval_ms)).await {
            break;
        }
    }
    if let Some(task) = self_check {
        task.abort();
    }
    let _ = diesel::sql_query("SELECT pg_advisory_unlock($1)")
        .bind::<diesel::sql_types::BigInt, _>(SEQUENCER_LOCK)
        .execute(&mut conn)
        .await;
    metrics::gauge!(metric::LEADER).set(0.0);
    Ok(())
}

/// The self-check of `from ..` the newest checkpoint (at most `max` leaves, the
/// newest): returns how far it checked, None when it could not run.
pub async fn run_self_check(url: String, from: Option<u64>, max: u64) -> Option<u64> {
    let outcome = async {
        let mut conn = session(&url).await?;
        let verifiers = keys::verifiers(&mut conn).await?;
        let Some(newest) = checkpoints::newest(&mut conn, 1).await?.pop() else {
            return Ok(None);
        };
        let to = u64::try_from(newest.tree_size).unwrap_or(0);
        let from = from.unwrap_or(0).max(to.saturating_sub(max)).min(to);
        // One snapshot: a checkpoint the leader publishes meanwhile is not half seen.
        conn.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await?;
        let report = verify::verify(&mut conn, Scope::Leaves { from, to }, &verifiers).await;
        let _ = conn.batch_execute("COMMIT").await;
        let report = report?;
        if report.ok() {
            tracing::debug!(from, to, "Merkle self-check passed");
        } else {
            tracing::error!(
                from,
                to,
                failures = report.failures_total,
                "Merkle self-check FAILED: the ledger or the log was changed (run caracal merkle verify-range)"
            );
        }
        Ok::<_, LogError>(Some(to))
    };
    match outcome.await {
        Ok(upto) => upto,
        Err(error) => {
            tracing::warn!(%error, "Merkle self-check could not run");
            None
        }
    }
}
