//! The `caracal` CLI run as a process against a [`TestStack`], as an operator
//! runs it (exit code, stdout and stderr).

use crate::{TestStack, ADMIN_TOKEN};

/// What one run of the CLI did.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub out: String,
    pub err: String,
}

/// Runs the CLI `binary` (a test's `env!("CARGO_BIN_EXE_caracal-under-test")`)
/// with `args` against the stack's service, as admin; the environment cannot
/// point it elsewhere.
pub async fn run_caracal(binary: &str, stack: &TestStack, args: &[&str]) -> anyhow::Result<Run> {
    let mut argv: Vec<String> = vec![
        "--server".into(),
        stack.grpc_url(),
        "--admin-token".into(),
        ADMIN_TOKEN.into(),
    ];
    argv.extend(args.iter().map(|a| (*a).to_owned()));
    let binary = binary.to_owned();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(binary)
            .args(&argv)
            .env_remove("CARACAL_SERVER")
            .env_remove("CARACAL_ADMIN_TOKEN")
            .output()
    })
    .await??;
    Ok(Run {
        code: output.status.code().unwrap_or(-1),
        out: String::from_utf8_lossy(&output.stdout).into_owned(),
        err: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}
