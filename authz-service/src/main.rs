//! `caracal-authz-service`: runs the server, or applies migrations and exits.

use std::path::PathBuf;

use anyhow::Context;
use caracal_authz::{config::Config, db, serve};
use caracal_service_kit::telemetry;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "caracal-authz-service",
    version,
    about = "Caracal budget-authorization service"
)]
struct Args {
    /// YAML configuration file; `CARACAL_*` environment variables override its keys.
    #[arg(long, short, env = "CARACAL_CONFIG")]
    config: Option<PathBuf>,
    /// Log as JSON lines (for log shippers) instead of human-readable text.
    #[arg(long, env = "CARACAL_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the gRPC and HTTP APIs (the default).
    Serve,
    /// Apply pending database migrations and exit.
    Migrate,
}

// The hot path allocates many small, short-lived buffers (HTTP/2 frames, protobuf,
// Redis commands); mimalloc took ~15 % off the CPU per Authorize+Settle pair
// against glibc's allocator in the authz bench.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = Config::load(args.config.as_deref())?;
    let runtime = caracal_authz::server::runtime(config.server.worker_threads)
        .context("starting the async runtime")?;
    let (json, tracing) = (args.log_json, config.tracing.clone());
    telemetry::block_on(
        &runtime,
        json,
        &tracing,
        "caracal-authz-service",
        run(args, config),
    )
}

async fn run(args: Args, config: Config) -> anyhow::Result<()> {
    match args.command.unwrap_or(Command::Serve) {
        Command::Migrate => {
            let applied = db::run_migrations(&config.database.url).await?;
            tracing::info!(?applied, "migrations applied");
            Ok(())
        }
        Command::Serve => {
            let mut server = serve(config).await?;
            tokio::select! {
                result = server.wait() => result.context("server stopped"),
                _ = caracal_service_kit::process::shutdown_signal() => {
                    tracing::info!("shutting down");
                    server.shutdown().await
                }
            }
        }
    }
}
