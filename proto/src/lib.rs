//! Caracal's wire schemas. The `.proto` sources under `caracal/v1/` are the contract;
//! this crate only compiles them (see `build.rs`).

/// Version 1 of the Caracal API.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/caracal.v1.rs"));
}

/// Encoded `FileDescriptorSet` of every Caracal proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/caracal_descriptor.bin"));
