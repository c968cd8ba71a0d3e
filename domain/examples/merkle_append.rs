//! How fast the sequencer's side of the Merkle log runs, in one thread.
//!
//! ```text
//! cargo run --release -p caracal-domain --example merkle_append -- 1000000
//! ```
//!
//! Prints leaves/s for (a) `CompactRange::append` of precomputed leaf hashes,
//! (b) `leaf_hash` of a ~300-byte leaf + append, and the time of an in-memory
//! inclusion proof (and of a consistency proof) at that size, with their
//! verification.

use std::error::Error;
use std::hint::black_box;
use std::time::{Duration, Instant};

use caracal_domain::merkle::compact::CompactRange;
use caracal_domain::merkle::tree::{
    consistency_proof, inclusion_proof, leaf_hash, root, verify_consistency, verify_inclusion,
    Hash, NodeId,
};

/// About the size of an encoded ledger row.
const LEAF_BYTES: usize = 300;

fn per_second(count: u64, elapsed: Duration) -> String {
    let rate = count as f64 / elapsed.as_secs_f64();
    format!("{:>12.0} leaves/s", rate)
}

fn main() -> Result<(), Box<dyn Error>> {
    let n: u64 = match std::env::args().nth(1) {
        Some(arg) => arg.replace('_', "").parse()?,
        None => 1_000_000,
    };
    if n == 0 {
        return Err("the number of leaves must be at least 1".into());
    }
    println!("Merkle log append, {n} leaves (one thread)");

    // A ~300-byte leaf whose first 8 bytes change per row, like a row id.
    let mut leaf = [0u8; LEAF_BYTES];
    for (i, byte) in leaf.iter_mut().enumerate() {
        *byte = (i * 7 + 3) as u8;
    }

    // The leaf hashes for (a) and the proofs, computed outside the timings.
    let leaves: Vec<Hash> = (0..n)
        .map(|i| {
            leaf[..8].copy_from_slice(&i.to_be_bytes());
            leaf_hash(&leaf)
        })
        .collect();

    // (a) append only. The visitor stands in for handing each completed
    // perfect subtree to storage; counting keeps it from being optimised out.
    let mut range = CompactRange::new();
    let mut stored = 0u64;
    let start = Instant::now();
    for hash in &leaves {
        range.append(*hash, |node: NodeId, h: &Hash| {
            stored += u64::from(node.level) + u64::from(h[0]);
        });
    }
    let append_only = start.elapsed();
    black_box(stored);
    let root_a = range.root();

    // (b) leaf hash of the row bytes + append.
    let mut range = CompactRange::new();
    let mut stored = 0u64;
    let start = Instant::now();
    for i in 0..n {
        leaf[..8].copy_from_slice(&i.to_be_bytes());
        range.append(leaf_hash(black_box(&leaf)), |node, h| {
            stored += u64::from(node.level) + u64::from(h[0]);
        });
    }
    let hash_and_append = start.elapsed();
    black_box(stored);
    let tree_root = range.root();
    if tree_root != root_a || tree_root != root(&leaves) {
        return Err("the appended roots disagree".into());
    }

    println!(
        "(a) append precomputed leaf hashes:  {}  ({:.3} s)",
        per_second(n, append_only),
        append_only.as_secs_f64()
    );
    println!(
        "(b) hash {LEAF_BYTES}-byte leaf + append:    {}  ({:.3} s)",
        per_second(n, hash_and_append),
        hash_and_append.as_secs_f64()
    );

    // An in-memory inclusion proof of a leaf in the middle, and its check.
    let index = n / 2;
    let start = Instant::now();
    let proof = inclusion_proof(index, n, &leaves)?;
    let proved = start.elapsed();
    let start = Instant::now();
    verify_inclusion(&leaves[index as usize], index, n, &proof, &tree_root)?;
    let verified = start.elapsed();
    println!(
        "inclusion proof of leaf {index} of {n}, in memory: {:.1} ms ({} hashes), verify: {:.1} us",
        proved.as_secs_f64() * 1e3,
        proof.len(),
        verified.as_secs_f64() * 1e6
    );

    // And a consistency proof from two thirds of the way.
    let size1 = n * 2 / 3;
    let root1 = root(&leaves[..size1 as usize]);
    let start = Instant::now();
    let proof = consistency_proof(size1, n, &leaves)?;
    let proved = start.elapsed();
    let start = Instant::now();
    verify_consistency(size1, n, &proof, &root1, &tree_root)?;
    let verified = start.elapsed();
    println!(
        "consistency proof {size1} -> {n}, in memory: {:.1} ms ({} hashes), verify: {:.1} us",
        proved.as_secs_f64() * 1e3,
        proof.len(),
        verified.as_secs_f64() * 1e6
    );
    Ok(())
}
