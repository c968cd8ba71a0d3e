//! Compiles `caracal/v1/*.proto` with protox (a pure-Rust protobuf compiler), so a fresh
//! machine needs no `protoc`. The encoded descriptor set is kept for gRPC server reflection.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "caracal/v1/common.proto",
        "caracal/v1/admin.proto",
        "caracal/v1/authz.proto",
        "caracal/v1/events.proto",
        "caracal/v1/spend.proto",
        "caracal/v1/dlq.proto",
        "caracal/v1/ledger.proto",
        "caracal/v1/merkle.proto",
        "caracal/v1/snapshot.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let descriptors = protox::compile(protos, ["."])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(
        out.join("caracal_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    // Without `grpc` (the wasm filter) only the messages are generated.
    let grpc = env::var_os("CARGO_FEATURE_GRPC").is_some();
    tonic_prost_build::configure()
        .build_server(grpc)
        .build_client(grpc)
        .compile_fds(descriptors)?;
    Ok(())
}
