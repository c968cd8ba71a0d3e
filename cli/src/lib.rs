//! `caracal`, the operator CLI over Caracal's admin gRPC API.
//!
//! - [`args`]: the command line (clap): `agent`, `agent key`, `policy`, `allowlist`,
//!   `pricebook`, and the global connection options.
//! - [`client`]: connecting to the server (timeouts, TLS) and the bearer-token interceptor.
//! - `commands`: one module per resource, from parsed arguments to rendered answers.
//! - [`output`]: tables, key/value blocks and JSON documents.
//! - [`price_import`]: reading price files for `pricebook import`.
//! - [`spend`]: `spend trend`, the daily spend history of an agent.
//! - [`budget`]: `budget status|rebuild`, the Redis budget state after a loss.
//! - [`replay`]: `replay start|status|validate`, a time range of the metering topic
//!   read again into the ledger.
//! - [`merkle`]: `merkle ...`, the tamper-evident ledger (proofs verified offline).
//!
//! [`run`] is the whole program; `main.rs` only wires it to the process.

pub mod args;
pub mod budget;
pub mod client;
mod commands;
pub mod dlq;
pub mod ledger;
pub mod ledger_status;
pub mod merkle;
pub mod output;
pub mod price_import;
pub mod replay;
pub mod snapshot;
pub mod spend;

use std::{ffi::OsString, io::Write};

use clap::Parser;

use crate::args::Cli;

/// Exit code of a command that failed (server error, unreachable server, bad file, ...).
pub const EXIT_FAILURE: i32 = 1;
/// Exit code of a command line that does not parse.
pub const EXIT_USAGE: i32 = 2;
/// Exit code of `caracal ledger reconcile` when the ledger and the budget counters
/// differ, of `caracal ledger status` when a partition is stalled, and of the
/// `caracal merkle` checks (verify-proof, consistency --verify, verify-range) when
/// what they check does not verify.
pub const EXIT_DRIFT: i32 = 3;

/// Runs `caracal` with `args` (the program name first), writing results to `out` and
/// diagnostics to `err`. Returns the process exit code: 0 on success (and for `--help`
/// and `--version`), 1 when the command fails (one line `error: <message>` on `err`;
/// for a gRPC status `error: <Code>: <message>`), 2 on a usage error.
pub async fn run<I, T>(args: I, out: &mut dyn Write, err: &mut dyn Write) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => return report_parse_outcome(&e, out, err),
    };
    match commands::execute(cli, out).await {
        Ok(()) => match out.flush() {
            Ok(()) => 0,
            Err(e) => {
                let _ = writeln!(err, "error: cannot write output: {e}");
                EXIT_FAILURE
            }
        },
        Err(e) => {
            let _ = writeln!(err, "error: {}", describe(&e));
            if e.downcast_ref::<ledger::DriftFound>().is_some()
                || e.downcast_ref::<ledger_status::Stalled>().is_some()
                || e.downcast_ref::<merkle::VerificationFailed>().is_some()
                || e.downcast_ref::<budget::StateLost>().is_some()
                || e.downcast_ref::<replay::EventsMissing>().is_some()
            {
                EXIT_DRIFT
            } else {
                EXIT_FAILURE
            }
        }
    }
}

/// `--help` and `--version` go to `out` with code 0; usage errors to `err` with code 2.
fn report_parse_outcome(e: &clap::Error, out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    let text = e.render().to_string();
    if e.use_stderr() {
        let _ = write!(err, "{text}");
        EXIT_USAGE
    } else {
        let _ = write!(out, "{text}");
        let _ = out.flush();
        0
    }
}

/// One line describing a failure. A gRPC status anywhere in the chain is shown as
/// `<Code>: <message>`; anything else as its chain of causes.
fn describe(e: &anyhow::Error) -> String {
    let text = match e.chain().find_map(|c| c.downcast_ref::<tonic::Status>()) {
        Some(status) if !status.message().is_empty() => {
            format!("{:?}: {}", status.code(), status.message())
        }
        Some(status) => match std::error::Error::source(status) {
            Some(source) => format!("{:?}: {source}", status.code()),
            None => format!("{:?}", status.code()),
        },
        None => {
            // Transport errors often repeat their cause's text; show each part once.
            let mut parts: Vec<String> = Vec::new();
            for cause in e.chain() {
                let part = cause.to_string();
                if parts.last().is_none_or(|last| !last.ends_with(&part)) {
                    parts.push(part);
                }
            }
            parts.join(": ")
        }
    };
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn run_line(args: &[&str]) -> (i32, String, String) {
        let mut out = Vec::new();
        let mut err = Vec::new();
        let code = run(args.iter().copied(), &mut out, &mut err).await;
        (
            code,
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        )
    }

    #[tokio::test]
    async fn bad_subcommand_is_a_usage_error() {
        let (code, out, err) = run_line(&["caracal", "frobnicate"]).await;
        assert_eq!(code, 2);
        assert!(out.is_empty());
        assert!(err.contains("error:"), "{err}");

        let (code, _, err) = run_line(&["caracal", "agent", "explode"]).await;
        assert_eq!(code, 2);
        assert!(err.contains("explode"), "{err}");

        let (code, _, _) = run_line(&["caracal"]).await;
        assert_eq!(code, 2);
    }

    #[tokio::test]
    async fn help_and_version_go_to_out() {
        let (code, out, err) = run_line(&["caracal", "--help"]).await;
        assert_eq!(code, 0);
        assert!(out.contains("pricebook"), "{out}");
        assert!(err.is_empty());

        let (code, out, _) = run_line(&["caracal", "policy", "create", "--help"]).await;
        assert_eq!(code, 0);
        assert!(out.contains("--time-window"), "{out}");

        let (code, out, _) = run_line(&["caracal", "--version"]).await;
        assert_eq!(code, 0);
        assert!(out.starts_with("caracal "), "{out}");
    }

    #[tokio::test]
    async fn unreachable_server_is_one_error_line() {
        let (code, out, err) = run_line(&[
            "caracal",
            "--server",
            "http://127.0.0.1:1",
            "--timeout",
            "2",
            "agent",
            "get",
            "bot",
        ])
        .await;
        assert_eq!(code, 1);
        assert!(out.is_empty(), "{out}");
        assert!(err.starts_with("error: "), "{err}");
        assert!(err.contains("127.0.0.1:1"), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }

    #[tokio::test]
    async fn import_checks_the_file_before_connecting() {
        let (code, _, err) = run_line(&[
            "caracal",
            "--server",
            "http://127.0.0.1:1",
            "pricebook",
            "import",
            "/nonexistent/prices.csv",
        ])
        .await;
        assert_eq!(code, 1);
        assert!(
            err.starts_with("error: cannot read /nonexistent/prices.csv"),
            "{err}"
        );
    }

    #[test]
    fn status_errors_show_code_and_message() {
        let e = anyhow::Error::new(tonic::Status::not_found("agent \"x\" not found"));
        assert_eq!(describe(&e), "NotFound: agent \"x\" not found");
        let e = anyhow::Error::new(tonic::Status::invalid_argument("bad\nthing"));
        assert_eq!(describe(&e), "InvalidArgument: bad thing");
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(describe(&e), "outer: inner");
        let e = anyhow::anyhow!("refused")
            .context("tcp connect error")
            .context("tcp connect error")
            .context("cannot connect");
        assert_eq!(describe(&e), "cannot connect: tcp connect error: refused");
    }
}
