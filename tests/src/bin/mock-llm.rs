//! A deterministic mock of the OpenAI and Anthropic APIs for local gateway runs
//! (see `caracal_tests::mock_llm` for what it answers).
//!
//!   cargo run -p caracal-tests --bin mock-llm -- --port 9000
//!
//! Flags: --port N (default 9000; always on 127.0.0.1). Prints one JSON line per
//! request received (method, path, header names, and whether a provider key came in)
//! until Ctrl-C.

use std::{net::SocketAddr, time::Duration};

use anyhow::{bail, Context};
use caracal_tests::mock_llm::MockLlm;

fn parse_port() -> anyhow::Result<u16> {
    let mut port = 9000;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--port" => {
                port = args
                    .next()
                    .context("--port needs a value")?
                    .parse()
                    .context("--port must be a number")?;
            }
            "-h" | "--help" => {
                println!("usage: mock-llm [--port N]   (listens on 127.0.0.1:N, default 9000)");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    Ok(port)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let port = parse_port()?;
    let mock = MockLlm::start_on(SocketAddr::from(([127, 0, 0, 1], port))).await?;
    eprintln!("mock-llm listening on http://{}", mock.addr());
    let mut seen = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tick.tick() => {
                let requests = mock.requests();
                for r in requests.iter().skip(seen) {
                    let names: Vec<&str> = r.headers.iter().map(|(k, _)| k.as_str()).collect();
                    let line = serde_json::json!({
                        "method": r.method,
                        "path": r.path,
                        "model": r.json()["model"],
                        "stream": r.json()["stream"],
                        "headers": names,
                        "provider_key_present": r.header("authorization").is_some() || r.header("x-api-key").is_some(),
                    });
                    println!("{line}");
                }
                seen = requests.len();
            }
        }
    }
    mock.stop().await;
    Ok(())
}
