//! The self-contained inclusion proof an auditor verifies offline: no database,
//! no server, only the proof file and the log's public key.
//!
//! # File format (`caracal-merkle-proof/v1`, JSON)
//!
//! | field | content | trusted by `verify`? |
//! | --- | --- | --- |
//! | `format` | exactly `"caracal-merkle-proof/v1"` | checked |
//! | `leaf` | standard base64 of the leaf bytes ([`LedgerLeaf::encode`], layout in [`leaf`](super::leaf)) | verified |
//! | `leaf_index` | the leaf's 0-based position in the log | verified |
//! | `tree_size` | the size of the tree the proof is for; must equal the checkpoint's size | checked |
//! | `audit_path` | standard base64 of each 32-byte sibling hash, RFC 9162 section 2.1.3 order (leaf level first) | verified |
//! | `checkpoint` | the full signed note of a checkpoint of that size ([`checkpoint`]) | signature verified |
//! | `key_id` | 8 hex digits: the key ID of the signature this proof relies on | must name the verifying key |
//! | `event` | the decoded leaf as JSON, for people to read | **not trusted**: never used by `verify` |
//!
//! # What [`ProofFile::verify`] checks, in order
//!
//! 1. `format` is exactly [`PROOF_FORMAT`].
//! 2. `key_id` is 8 hex digits and belongs to one of the public keys the auditor
//!    supplied (otherwise: the proof was signed by a key the auditor does not trust).
//! 3. The checkpoint note has a signature line by that key (name and key ID),
//!    and that signature verifies over the checkpoint body; then the body parses.
//! 4. `tree_size` equals the checkpoint's tree size.
//! 5. `leaf` is base64 and decodes strictly as a version-1 leaf.
//! 6. `leaf_index < tree_size`.
//! 7. Each `audit_path` entry is base64 of exactly 32 bytes.
//! 8. RFC 9162 inclusion: hashing `BLAKE3(0x00 || leaf bytes)` up the audit path
//!    at `leaf_index` in a tree of `tree_size` leaves gives the checkpoint's root.
//!
//! Only then is the decoded leaf returned: the row it describes was in the log
//! when the signed checkpoint was cut, at that index, byte for byte.
//! [`verify_consistency_notes`] then shows a later checkpoint extends that one,
//! so the row is still there.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::checkpoint::{self, Checkpoint, NoteError};
use super::keys::{self, key_id_hex, parse_key_id_hex, KeyError, KeyId};
use super::leaf::{LeafError, LedgerLeaf};
use super::tree::{self, Hash, ProofError};

/// The `format` value of version 1 proof files.
pub const PROOF_FORMAT: &str = "caracal-merkle-proof/v1";

/// An inclusion proof, as written to disk (field table in the module doc).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProofFile {
    pub format: String,
    /// Standard base64 of [`LedgerLeaf::encode`].
    pub leaf: String,
    pub leaf_index: u64,
    pub tree_size: u64,
    /// Standard base64 hashes, RFC 9162 order.
    pub audit_path: Vec<String>,
    /// The full signed note.
    pub checkpoint: String,
    /// Key ID (hex) of the checkpoint signature this proof relies on.
    pub key_id: String,
    /// The decoded leaf, for humans; NOT trusted by verify.
    pub event: serde_json::Value,
}

/// What a successful [`ProofFile::verify`] established.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedProof {
    pub leaf: LedgerLeaf,
    pub checkpoint: Checkpoint,
    pub key_id: KeyId,
}

/// Why a proof (or a pair of checkpoints) does not verify.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProofFileError {
    #[error("unsupported proof format {found:?} (this build reads {PROOF_FORMAT:?})")]
    UnsupportedFormat { found: String },
    #[error("invalid key_id: {0}")]
    InvalidKeyId(#[source] KeyError),
    #[error("the proof relies on key {key_id}, which is not among the trusted public keys [{}]", .trusted.join(", "))]
    UntrustedKey {
        key_id: String,
        trusted: Vec<String>,
    },
    #[error("{which} checkpoint: {source}")]
    Checkpoint {
        which: &'static str,
        #[source]
        source: NoteError,
    },
    #[error("the checkpoint verified with key {verified}, but the proof names key {expected}")]
    KeyIdMismatch { expected: String, verified: String },
    #[error("tree_size {file} does not match the checkpoint's tree size {checkpoint}")]
    TreeSizeMismatch { file: u64, checkpoint: u64 },
    #[error("{field} is not standard base64")]
    InvalidBase64 { field: String },
    #[error("the leaf does not decode: {0}")]
    Leaf(#[source] LeafError),
    #[error("leaf_index {index} is not below the tree size {size}")]
    LeafIndexOutOfRange { index: u64, size: u64 },
    #[error("audit_path[{position}] is {len} bytes, expected 32")]
    BadHashLength { position: usize, len: usize },
    #[error("the leaf (hash {leaf_hash}) is not at index {index} of the tree of size {size} with root {root}: {source}")]
    NotIncluded {
        leaf_hash: String,
        index: u64,
        size: u64,
        root: String,
        #[source]
        source: ProofError,
    },
    #[error("the checkpoints are of different logs: {older:?} and {newer:?}")]
    OriginMismatch { older: String, newer: String },
    #[error("the older checkpoint (size {older}) is larger than the newer one (size {newer})")]
    SizesOutOfOrder { older: u64, newer: u64 },
    #[error(
        "the checkpoint of size {newer} does not extend the checkpoint of size {older}: {source}"
    )]
    NotConsistent {
        older: u64,
        newer: u64,
        #[source]
        source: ProofError,
    },
    #[error("proof file JSON: {0}")]
    Json(String),
}

impl ProofFile {
    /// Builds the proof file of `leaf` at `leaf_index`. `tree_size` and `key_id`
    /// come from the note (the key ID of its first signature line). The proof is
    /// checked against the note's root before it is returned, so a file that
    /// would not verify is never produced; the signature is not checked here.
    pub fn new(
        leaf: &LedgerLeaf,
        leaf_index: u64,
        audit_path: &[Hash],
        signed_checkpoint: &str,
    ) -> Result<Self, ProofFileError> {
        let as_checkpoint = |source| ProofFileError::Checkpoint {
            which: "the",
            source,
        };
        let (text, lines) = checkpoint::split_note(signed_checkpoint).map_err(as_checkpoint)?;
        let cp = Checkpoint::parse_body(text).map_err(as_checkpoint)?;
        let Some(first) = lines.first() else {
            return Err(as_checkpoint(NoteError::MalformedNote(
                "no signature lines".into(),
            )));
        };
        let bytes = leaf.encode();
        check_inclusion(&bytes, leaf_index, audit_path, &cp)?;
        let event = serde_json::to_value(leaf).map_err(|e| ProofFileError::Json(e.to_string()))?;
        Ok(Self {
            format: PROOF_FORMAT.to_string(),
            leaf: STANDARD.encode(&bytes),
            leaf_index,
            tree_size: cp.size,
            audit_path: audit_path.iter().map(|h| STANDARD.encode(h)).collect(),
            checkpoint: signed_checkpoint.to_string(),
            key_id: key_id_hex(&first.id),
            event,
        })
    }

    /// Verifies the proof offline against the trusted public keys (steps in the module doc).
    pub fn verify(&self, verifiers: &[keys::Verifier]) -> Result<VerifiedProof, ProofFileError> {
        if self.format != PROOF_FORMAT {
            return Err(ProofFileError::UnsupportedFormat {
                found: self.format.clone(),
            });
        }
        let key_id = parse_key_id_hex(&self.key_id).map_err(ProofFileError::InvalidKeyId)?;
        let trusted: Vec<keys::Verifier> = verifiers
            .iter()
            .filter(|v| v.id() == key_id)
            .cloned()
            .collect();
        if trusted.is_empty() {
            return Err(ProofFileError::UntrustedKey {
                key_id: self.key_id.clone(),
                trusted: verifiers
                    .iter()
                    .map(|v| format!("{} ({})", v.name(), key_id_hex(&v.id())))
                    .collect(),
            });
        }
        let opened = checkpoint::open_checkpoint(&self.checkpoint, &trusted).map_err(|source| {
            ProofFileError::Checkpoint {
                which: "the",
                source,
            }
        })?;
        if opened.key_id != key_id {
            return Err(ProofFileError::KeyIdMismatch {
                expected: self.key_id.clone(),
                verified: key_id_hex(&opened.key_id),
            });
        }
        let cp = opened.checkpoint;
        if self.tree_size != cp.size {
            return Err(ProofFileError::TreeSizeMismatch {
                file: self.tree_size,
                checkpoint: cp.size,
            });
        }
        let bytes = decode_b64(&self.leaf, "leaf")?;
        let leaf = LedgerLeaf::decode(&bytes).map_err(ProofFileError::Leaf)?;
        let mut path = Vec::with_capacity(self.audit_path.len());
        for (position, entry) in self.audit_path.iter().enumerate() {
            let raw = decode_b64(entry, &format!("audit_path[{position}]"))?;
            let hash: Hash =
                raw.as_slice()
                    .try_into()
                    .map_err(|_| ProofFileError::BadHashLength {
                        position,
                        len: raw.len(),
                    })?;
            path.push(hash);
        }
        check_inclusion(&bytes, self.leaf_index, &path, &cp)?;
        Ok(VerifiedProof {
            leaf,
            checkpoint: cp,
            key_id,
        })
    }

    /// The file as pretty-printed JSON.
    pub fn to_json(&self) -> Result<String, ProofFileError> {
        serde_json::to_string_pretty(self).map_err(|e| ProofFileError::Json(e.to_string()))
    }

    /// Reads a proof file's JSON (nothing is verified: call [`verify`](Self::verify)).
    pub fn from_json(json: &str) -> Result<Self, ProofFileError> {
        serde_json::from_str(json).map_err(|e| ProofFileError::Json(e.to_string()))
    }
}

fn decode_b64(text: &str, field: &str) -> Result<Vec<u8>, ProofFileError> {
    STANDARD
        .decode(text)
        .map_err(|_| ProofFileError::InvalidBase64 {
            field: field.to_string(),
        })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn check_inclusion(
    leaf_bytes: &[u8],
    index: u64,
    path: &[Hash],
    cp: &Checkpoint,
) -> Result<(), ProofFileError> {
    if index >= cp.size {
        return Err(ProofFileError::LeafIndexOutOfRange {
            index,
            size: cp.size,
        });
    }
    let leaf_hash = tree::leaf_hash(leaf_bytes);
    tree::verify_inclusion(&leaf_hash, index, cp.size, path, &cp.root).map_err(|source| {
        ProofFileError::NotIncluded {
            leaf_hash: hex(&leaf_hash),
            index,
            size: cp.size,
            root: hex(&cp.root),
            source,
        }
    })
}

/// Consistency between two signed checkpoints (e.g. for `caracal merkle consistency --verify`).
///
/// Opens both notes with `verifiers` (each may be signed by a different trusted
/// key, e.g. across a key rotation), requires the same origin and
/// `older.size <= newer.size`, then checks the RFC 9162 consistency proof
/// between the two roots. Returns `(older, newer)`.
pub fn verify_consistency_notes(
    older_note: &str,
    newer_note: &str,
    proof: &[Hash],
    verifiers: &[keys::Verifier],
) -> Result<(Checkpoint, Checkpoint), ProofFileError> {
    let older = checkpoint::open_checkpoint(older_note, verifiers)
        .map_err(|source| ProofFileError::Checkpoint {
            which: "the older",
            source,
        })?
        .checkpoint;
    let newer = checkpoint::open_checkpoint(newer_note, verifiers)
        .map_err(|source| ProofFileError::Checkpoint {
            which: "the newer",
            source,
        })?
        .checkpoint;
    if older.origin != newer.origin {
        return Err(ProofFileError::OriginMismatch {
            older: older.origin,
            newer: newer.origin,
        });
    }
    if older.size > newer.size {
        return Err(ProofFileError::SizesOutOfOrder {
            older: older.size,
            newer: newer.size,
        });
    }
    tree::verify_consistency(older.size, newer.size, proof, &older.root, &newer.root).map_err(
        |source| ProofFileError::NotConsistent {
            older: older.size,
            newer: newer.size,
            source,
        },
    )?;
    Ok((older, newer))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merkle::checkpoint::{add_signature, sign_checkpoint};
    use crate::merkle::keys::Signer;

    fn leaf(i: usize) -> LedgerLeaf {
        LedgerLeaf {
            event_id: format!("evt-{i}"),
            kind: "charge".into(),
            reservation_id: format!("res-{i}"),
            request_id: format!("req-{i}"),
            agent_id: [i as u8; 16],
            root_agent_id: [0xaa; 16],
            policy_ids: vec!["p-daily".into()],
            currency: "USD".into(),
            reserved_micros: 1_000_000,
            charged_micros: 900_000 + i as i64,
            overshoot_micros: 0,
            input_tokens: 100,
            output_tokens: 20,
            cached_input_tokens: 0,
            provider: "openai".into(),
            model: "gpt-4o".into(),
            price_version: 1,
            schema_version: 1,
            occurred_at_micros: 1_735_689_600_000_000 + i as i64,
            reserved_at_micros: None,
        }
    }

    struct Fixture {
        signer: Signer,
        leaves: Vec<LedgerLeaf>,
        hashes: Vec<Hash>,
    }

    fn fixture(n: usize) -> Fixture {
        let leaves: Vec<LedgerLeaf> = (0..n).map(leaf).collect();
        let hashes = leaves.iter().map(LedgerLeaf::hash).collect();
        Fixture {
            signer: Signer::generate("caracal.test/ledger").unwrap(),
            leaves,
            hashes,
        }
    }

    impl Fixture {
        fn note(&self, size: usize) -> String {
            let cp = Checkpoint {
                origin: "caracal.test/ledger".into(),
                size: size as u64,
                root: tree::root(&self.hashes[..size]),
                timestamp_unix: 1_735_689_600 + size as i64,
            };
            sign_checkpoint(&cp, &self.signer)
        }

        fn proof(&self, index: usize, size: usize) -> ProofFile {
            let path =
                tree::inclusion_proof(index as u64, size as u64, &self.hashes[..size]).unwrap();
            ProofFile::new(&self.leaves[index], index as u64, &path, &self.note(size)).unwrap()
        }
    }

    #[test]
    fn build_json_round_trip_and_verify() {
        let f = fixture(7);
        let v = [f.signer.verifier()];
        for size in 1..=7 {
            for index in 0..size {
                let p = f.proof(index, size);
                assert_eq!(p.format, PROOF_FORMAT);
                assert_eq!(p.tree_size, size as u64);
                assert_eq!(p.key_id, key_id_hex(&f.signer.id()));
                let back = ProofFile::from_json(&p.to_json().unwrap()).unwrap();
                assert_eq!(back, p);
                let ok = back.verify(&v).unwrap();
                assert_eq!(ok.leaf, f.leaves[index]);
                assert_eq!(ok.checkpoint.size, size as u64);
                assert_eq!(ok.key_id, f.signer.id());
            }
        }
        let p = f.proof(3, 7);
        assert_eq!(p.event["agent_id"], "03030303-0303-0303-0303-030303030303");
    }

    #[test]
    fn new_refuses_a_proof_that_would_not_verify() {
        let f = fixture(5);
        let path = tree::inclusion_proof(2, 5, &f.hashes).unwrap();
        let note = f.note(5);
        assert!(matches!(
            ProofFile::new(&f.leaves[3], 2, &path, &note),
            Err(ProofFileError::NotIncluded { .. })
        ));
        assert!(matches!(
            ProofFile::new(&f.leaves[2], 5, &path, &note),
            Err(ProofFileError::LeafIndexOutOfRange { index: 5, size: 5 })
        ));
        assert!(matches!(
            ProofFile::new(&f.leaves[2], 2, &path, "not a note"),
            Err(ProofFileError::Checkpoint { .. })
        ));
    }

    #[test]
    fn tampering_fails_with_a_clear_error() {
        let f = fixture(6);
        let v = [f.signer.verifier()];
        let good = f.proof(2, 6);
        assert!(good.verify(&v).is_ok());

        // A flipped leaf byte (inside the model name: still a well-formed leaf).
        let mut bytes = STANDARD.decode(&good.leaf).unwrap();
        let at = bytes.len() - 1 - 8 - 4 - 4 - 1; // last byte of `model`
        bytes[at] ^= 0x01;
        let p = ProofFile {
            leaf: STANDARD.encode(&bytes),
            ..good.clone()
        };
        let e = p.verify(&v).unwrap_err();
        assert!(
            matches!(
                e,
                ProofFileError::NotIncluded {
                    index: 2,
                    size: 6,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e
            .to_string()
            .contains("is not at index 2 of the tree of size 6"));

        // A flipped leaf byte that breaks the encoding.
        let mut bytes = STANDARD.decode(&good.leaf).unwrap();
        bytes[0] = 9;
        let p = ProofFile {
            leaf: STANDARD.encode(&bytes),
            ..good.clone()
        };
        assert!(matches!(
            p.verify(&v),
            Err(ProofFileError::Leaf(LeafError::UnsupportedVersion {
                found: 9
            }))
        ));

        // Wrong index, inside and outside the tree.
        let p = ProofFile {
            leaf_index: 3,
            ..good.clone()
        };
        assert!(matches!(
            p.verify(&v),
            Err(ProofFileError::NotIncluded { index: 3, .. })
        ));
        let p = ProofFile {
            leaf_index: 6,
            ..good.clone()
        };
        assert_eq!(
            p.verify(&v),
            Err(ProofFileError::LeafIndexOutOfRange { index: 6, size: 6 })
        );

        // Wrong size.
        let p = ProofFile {
            tree_size: 5,
            ..good.clone()
        };
        assert_eq!(
            p.verify(&v),
            Err(ProofFileError::TreeSizeMismatch {
                file: 5,
                checkpoint: 6
            })
        );

        // An altered audit path entry, a truncated one, a missing one.
        let mut path = good.audit_path.clone();
        let mut h = STANDARD.decode(&path[0]).unwrap();
        h[0] ^= 0x80;
        path[0] = STANDARD.encode(&h);
        let p = ProofFile {
            audit_path: path,
            ..good.clone()
        };
        assert!(matches!(
            p.verify(&v),
            Err(ProofFileError::NotIncluded { .. })
        ));
        let mut path = good.audit_path.clone();
        path[1] = STANDARD.encode([0u8; 31]);
        let p = ProofFile {
            audit_path: path,
            ..good.clone()
        };
        assert_eq!(
            p.verify(&v),
            Err(ProofFileError::BadHashLength {
                position: 1,
                len: 31
            })
        );
        let mut path = good.audit_path.clone();
        path.pop();
        let p = ProofFile {
            audit_path: path,
            ..good.clone()
        };
        assert!(matches!(
            p.verify(&v),
            Err(ProofFileError::NotIncluded { .. })
        ));

        // An altered checkpoint root: the signature no longer verifies.
        let cp = Checkpoint::parse_body(
            good.checkpoint
                .split("\n\n")
                .next()
                .map(|b| format!("{b}\n"))
                .as_deref()
                .unwrap(),
        )
        .unwrap();
        let mut other = cp.root;
        other[31] ^= 0x01;
        let p = ProofFile {
            checkpoint: good.checkpoint.replacen(
                &STANDARD.encode(cp.root),
                &STANDARD.encode(other),
                1,
            ),
            ..good.clone()
        };
        assert!(matches!(
            p.verify(&v),
            Err(ProofFileError::Checkpoint {
                source: NoteError::BadSignature { .. },
                ..
            })
        ));

        // The wrong public key.
        let stranger = Signer::generate("caracal.test/ledger").unwrap();
        let e = good.verify(&[stranger.verifier()]).unwrap_err();
        assert!(matches!(e, ProofFileError::UntrustedKey { .. }), "{e}");
        assert!(e.to_string().contains(&good.key_id));

        // Format and key_id fields.
        let p = ProofFile {
            format: "caracal-merkle-proof/v2".into(),
            ..good.clone()
        };
        assert!(matches!(
            p.verify(&v),
            Err(ProofFileError::UnsupportedFormat { .. })
        ));
        let p = ProofFile {
            key_id: "xyz".into(),
            ..good.clone()
        };
        assert!(matches!(p.verify(&v), Err(ProofFileError::InvalidKeyId(_))));
        let p = ProofFile {
            leaf: "***".into(),
            ..good.clone()
        };
        assert!(matches!(
            p.verify(&v),
            Err(ProofFileError::InvalidBase64 { .. })
        ));

        // The human-readable event is not trusted: editing it changes nothing.
        let mut p = good.clone();
        p.event["charged_micros"] = serde_json::json!(1);
        assert_eq!(p.verify(&v).map(|ok| ok.leaf), Ok(f.leaves[2].clone()));
    }

    #[test]
    fn rotation_key_id_selects_the_signature() {
        let f = fixture(4);
        let new = Signer::generate("caracal.test/ledger-2").unwrap();
        let mut p = f.proof(1, 4);
        p.checkpoint = add_signature(&p.checkpoint, &new).unwrap();
        // key_id names the old key: verifies with the old key only.
        assert!(p.verify(&[f.signer.verifier()]).is_ok());
        assert!(matches!(
            p.verify(&[new.verifier()]),
            Err(ProofFileError::UntrustedKey { .. })
        ));
        // Re-pointed at the new key's signature line: verifies with the new key.
        p.key_id = key_id_hex(&new.id());
        assert_eq!(
            p.verify(&[f.signer.verifier(), new.verifier()])
                .map(|ok| ok.key_id),
            Ok(new.id())
        );
    }

    #[test]
    fn consistency_between_signed_checkpoints() {
        let f = fixture(9);
        let v = [f.signer.verifier()];
        for (m, n) in [(1, 9), (3, 9), (4, 8), (5, 5), (8, 9)] {
            let proof = tree::consistency_proof(m as u64, n as u64, &f.hashes[..n]).unwrap();
            let (a, b) = verify_consistency_notes(&f.note(m), &f.note(n), &proof, &v).unwrap();
            assert_eq!((a.size, b.size), (m as u64, n as u64));
        }
        let proof = tree::consistency_proof(3, 9, &f.hashes).unwrap();
        // Wrong proof for these sizes.
        let proof48 = tree::consistency_proof(4, 8, &f.hashes[..8]).unwrap();
        assert!(matches!(
            verify_consistency_notes(&f.note(3), &f.note(9), &proof48, &v),
            Err(ProofFileError::NotConsistent {
                older: 3,
                newer: 9,
                ..
            })
        ));
        // Swapped notes.
        assert!(matches!(
            verify_consistency_notes(&f.note(9), &f.note(3), &proof, &v),
            Err(ProofFileError::SizesOutOfOrder { older: 9, newer: 3 })
        ));
        // A rewritten history: same size, different leaves.
        let mut forked = fixture(9);
        forked.signer = Signer::from_pkcs8_pem(
            "caracal.test/ledger",
            &f.signer.to_pkcs8_pem(None).unwrap(),
            None,
        )
        .unwrap();
        forked.hashes[1] = tree::leaf_hash(b"rewritten");
        assert!(matches!(
            verify_consistency_notes(&f.note(3), &forked.note(9), &proof, &v),
            Err(ProofFileError::NotConsistent { .. })
        ));
        // An untrusted newer checkpoint.
        let stranger = fixture(9);
        assert!(matches!(
            verify_consistency_notes(&f.note(3), &stranger.note(9), &proof, &v),
            Err(ProofFileError::Checkpoint {
                which: "the newer",
                source: NoteError::NoKnownKey { .. }
            })
        ));
        // Different origins.
        let other_origin = sign_checkpoint(
            &Checkpoint {
                origin: "elsewhere.test/log".into(),
                size: 9,
                root: tree::root(&f.hashes),
                timestamp_unix: 0,
            },
            &f.signer,
        );
        assert!(matches!(
            verify_consistency_notes(&f.note(3), &other_origin, &proof, &v),
            Err(ProofFileError::OriginMismatch { .. })
        ));
    }
}
