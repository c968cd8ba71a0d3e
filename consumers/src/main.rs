//! `caracal-consumers <consumer>`: see [`caracal_consumers::cli`].

fn main() -> anyhow::Result<()> {
    caracal_consumers::cli::main()
}
