//! The `caracal` CLI binary, built inside the tests package so tests can run it as
//! a real process (`CARGO_BIN_EXE_caracal-under-test`: exit codes, stdout): the
//! same code as `cli/src/main.rs`, [`caracal_cli::run`].

#[tokio::main]
async fn main() {
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    let code = caracal_cli::run(std::env::args_os(), &mut stdout, &mut stderr).await;
    std::process::exit(code);
}
