//! The tamper-evident ledger's Merkle log, with no I/O (SPEC section 5).
//!
//! | module | what it holds |
//! | --- | --- |
//! | [`tree`] | RFC 9162 section 2 with BLAKE3: leaf and node hashes, roots, inclusion and consistency proofs and their verifiers |
//! | [`compact`] | the right edge of the tree (O(log n) state) the sequencer appends to |
//! | [`leaf`] | the canonical, versioned byte encoding of a ledger row (a leaf) |
//! | [`checkpoint`] | C2SP tlog-checkpoint bodies in signed notes, ECDSA P-256 signatures and key ids |
//! | [`keys`] | signing keys (PKCS#8 PEM, optionally encrypted) and public keys |
//! | [`proof_file`] | the self-contained inclusion proof an auditor verifies offline |

pub mod checkpoint;
pub mod compact;
pub mod keys;
pub mod leaf;
pub mod proof_file;
pub mod tree;

pub use tree::{Hash, HASH_LEN};
