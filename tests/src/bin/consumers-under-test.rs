//! The `caracal-consumers` binary, built inside the tests package so crash tests
//! can run it as a real process (`CARGO_BIN_EXE_consumers-under-test`): the same
//! code, `caracal_consumers::cli::main`.

fn main() -> anyhow::Result<()> {
    caracal_consumers::cli::main()
}
