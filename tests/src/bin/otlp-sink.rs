//! An OTLP/gRPC trace sink on 127.0.0.1 for benchmarks (`authz-bench
//! --trace-sampling`): it accepts and counts spans in a process of its own, so the
//! collector's CPU is not counted as the service's. Prints the count when stopped.
//!
//!   otlp-sink PORT

use anyhow::Context;
use caracal_tests::otlp_collector::Collector;

fn main() -> anyhow::Result<()> {
    let port: u16 = std::env::args()
        .nth(1)
        .context("usage: otlp-sink PORT")?
        .parse()
        .context("PORT must be a port number")?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let collector = Collector::start_on(port, true).await?;
            caracal_service_kit::process::shutdown_signal().await;
            println!("otlp-sink: {} spans received", collector.count());
            Ok(())
        })
}
