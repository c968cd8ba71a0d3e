//! The authz-service built inside the tests package, so a test can run it as a
//! process of its own (`CARGO_BIN_EXE_authz-under-test`) — for one, the metrics
//! test: the Prometheus recorder is process-wide, so only a service in its own
//! process has a `/metrics` that shows what that service alone exports. The same
//! start-up as `caracal-authz-service serve`: settings from `CARACAL_*` variables
//! (and `CARACAL_CONFIG`), stops on SIGTERM.

use anyhow::Context;

fn main() -> anyhow::Result<()> {
    let path = std::env::var_os("CARACAL_CONFIG").map(std::path::PathBuf::from);
    let config = caracal_authz::Config::load(path.as_deref())?;
    let runtime = caracal_authz::server::runtime(config.server.worker_threads)
        .context("starting the async runtime")?;
    let tracing = config.tracing.clone();
    caracal_service_kit::telemetry::block_on(
        &runtime,
        false,
        &tracing,
        "caracal-authz-service",
        async move {
            let mut server = caracal_authz::serve(config).await?;
            tokio::select! {
                result = server.wait() => result.context("server stopped"),
                _ = caracal_service_kit::process::shutdown_signal() => server.shutdown().await,
            }
        },
    )
}
