//! `caracal-consumers [--config FILE] <consumer>`: one binary, one consumer per
//! process (each its own consumer group, deployed and scaled on its own).

use std::path::PathBuf;

use anyhow::Context;
use caracal_service_kit::telemetry;
use clap::{Parser, Subcommand};

use crate::config::ConsumerConfig;

#[derive(Parser)]
#[command(name = "caracal-consumers", version, about = "Caracal Kafka consumers")]
struct Args {
    /// YAML configuration file; `CARACAL_*` environment variables override its keys.
    #[arg(long, short, env = "CARACAL_CONFIG")]
    config: Option<PathBuf>,
    /// Log as JSON lines (for log shippers) instead of human-readable text.
    #[arg(long, env = "CARACAL_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// caracal.metering.events -> the ledger_events table (group caracal-ledger-writer).
    LedgerWriter,
    /// Every topic but the DLQ -> the append-only audit_logs table (group
    /// caracal-audit-logger); runs the retention job at start and daily.
    AuditLogger,
    /// Delete audit rows older than audit.retentionDays once and exit (for a CronJob).
    AuditRetention,
    /// caracal.metering.events -> spend per agent / model / hour / day in Redis,
    /// spend gauges and spending anomalies on caracal.policy.decisions (group
    /// caracal-metrics-aggregator; needs Redis, not PostgreSQL).
    MetricsAggregator,
    /// Apply pending database migrations and exit.
    Migrate,
}

/// Parses the command line and runs the chosen consumer until SIGTERM/SIGINT.
pub fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = ConsumerConfig::load(args.config.as_deref())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let (service, tracing) = (args.command.service_name(), config.tracing.clone());
    telemetry::block_on(
        &runtime,
        args.log_json,
        &tracing,
        service,
        run(args.command, config),
    )
}

impl Command {
    /// `service.name` of the process's spans (unless `tracing.serviceName` says).
    fn service_name(&self) -> &'static str {
        match self {
            Self::LedgerWriter => "caracal-ledger-writer",
            Self::AuditLogger => "caracal-audit-logger",
            Self::AuditRetention => "caracal-audit-retention",
            Self::MetricsAggregator => "caracal-metrics-aggregator",
            Self::Migrate => "caracal-migrate",
        }
    }
}

async fn run(command: Command, config: ConsumerConfig) -> anyhow::Result<()> {
    match command {
        Command::LedgerWriter => {
            let mut writer = crate::ledger::start(config).await?;
            tracing::info!(http = %writer.http_addr, "ledger-writer serving /health and /metrics");
            let stopped = tokio::select! {
                result = writer.wait() => Some(result),
                () = caracal_service_kit::process::shutdown_signal() => None,
            };
            match stopped {
                Some(result) => result.context("ledger-writer stopped"),
                None => {
                    tracing::info!("shutting down: finishing the batch in hand");
                    writer.shutdown().await.context("ledger-writer shutdown")
                }
            }
        }
        Command::AuditLogger => {
            let mut logger = crate::audit::start(config).await?;
            tracing::info!(http = %logger.http_addr, "audit-logger serving /health and /metrics");
            let stopped = tokio::select! {
                result = logger.wait() => Some(result),
                () = caracal_service_kit::process::shutdown_signal() => None,
            };
            match stopped {
                Some(result) => result.context("audit-logger stopped"),
                None => {
                    tracing::info!("shutting down: finishing the batch in hand");
                    logger.shutdown().await.context("audit-logger shutdown")
                }
            }
        }
        Command::AuditRetention => {
            let deleted = crate::audit::retention_once(&config).await?;
            tracing::info!(deleted, "audit retention finished");
            Ok(())
        }
        Command::MetricsAggregator => {
            let mut aggregator = crate::aggregator::start(config).await?;
            tracing::info!(http = %aggregator.http_addr, "metrics-aggregator serving /health and /metrics");
            let stopped = tokio::select! {
                result = aggregator.wait() => Some(result),
                () = caracal_service_kit::process::shutdown_signal() => None,
            };
            match stopped {
                Some(result) => result.context("metrics-aggregator stopped"),
                None => {
                    tracing::info!("shutting down: finishing the batch in hand");
                    aggregator
                        .shutdown()
                        .await
                        .context("metrics-aggregator shutdown")
                }
            }
        }
        Command::Migrate => {
            let applied = caracal_service_kit::db::run_migrations(&config.database.url).await?;
            tracing::info!(?applied, "migrations applied");
            Ok(())
        }
    }
}
