//! The `caracal` binary: everything happens in [`caracal_cli::run`].

#[tokio::main]
async fn main() {
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    let code = caracal_cli::run(std::env::args_os(), &mut stdout, &mut stderr).await;
    std::process::exit(code);
}
