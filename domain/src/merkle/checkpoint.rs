//! Checkpoints: [C2SP tlog-checkpoint](https://c2sp.org/tlog-checkpoint) bodies
//! in [C2SP signed notes](https://c2sp.org/signed-note), signed with ECDSA P-256
//! (key ID and signature encoding in [`keys`]).
//!
//! # Body
//!
//! ```text
//! <origin>\n                 the log's identity, e.g. caracal.example/ledger (non-empty, one line)
//! <tree size>\n              decimal, no sign, no leading zeros ("0" for the empty tree)
//! <root hash>\n              standard base64 (RFC 4648 section 4, padded) of the 32-byte BLAKE3 root
//! timestamp <unix seconds>\n extension line: when the checkpoint was cut, whole seconds since the Unix epoch, UTC
//! ```
//!
//! The first three lines are exactly tlog-checkpoint's; the `timestamp` line is
//! the single extension line Caracal adds, and version 1 of the body has no other
//! lines. Parsing is strict: the exact four lines, each in its canonical form
//! (the root must re-encode to the same base64), so exactly one body text exists
//! for a given checkpoint and anything else is rejected rather than guessed at.
//!
//! # Signed note
//!
//! The signed note is the body, a blank line, then one signature line per key:
//!
//! ```text
//! caracal.example/ledger
//! 4
//! 3q2+7w...=
//! timestamp 1735689600
//!
//! — caracal.example/ledger MEUCIQ...
//! ```
//!
//! A signature line is an em dash (U+2014), a space, the key name, a space, and
//! `base64(key ID || signature)`. The signature covers the body exactly, final
//! newline included, blank line excluded. Following the signed-note rules:
//! a signature line whose (key name, key ID) matches no trusted key is ignored;
//! every line that does match must verify (one failure rejects the whole note);
//! at least one must verify. A key rotation therefore publishes checkpoints
//! signed by both the old and the new key for a while ([`add_signature`]), and
//! older checkpoints keep verifying with the old public key.
//!
//! To check a checkpoint by hand: split the note at the last blank line; the
//! text before it (with its final newline) is the signed message; base64-decode
//! the signature; its first 4 bytes must equal `SHA-256(SPKI DER of the public
//! key)[0..4]`; the rest is an ASN.1 DER ECDSA signature that
//! `openssl dgst -sha256 -verify pub.pem -signature sig.der body.txt` accepts.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

use super::keys::{self, key_id_hex, KeyId};
use super::tree::{Hash, HASH_LEN};

/// The body line prefix of Caracal's timestamp extension line.
pub const TIMESTAMP_PREFIX: &str = "timestamp ";

/// At most this many signature lines are read (signed-note requires at least 16).
pub const MAX_SIGNATURES: usize = 64;

const SIGNATURE_PREFIX: &str = "\u{2014} ";

/// A signed tree head: the tree of `size` leaves of `origin`'s log has `root`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub origin: String,
    pub size: u64,
    pub root: Hash,
    /// When the checkpoint was cut, Unix seconds (UTC).
    pub timestamp_unix: i64,
}

/// Why a note or checkpoint body was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NoteError {
    #[error("malformed signed note: {0}")]
    MalformedNote(String),
    #[error("malformed signature line {line}: {reason}")]
    MalformedSignatureLine { line: usize, reason: String },
    #[error("the note has more than {MAX_SIGNATURES} signature lines")]
    TooManySignatures,
    #[error("no signature from a trusted key: the note is signed by [{}], the trusted keys are [{}]", .signed_by.join(", "), .trusted.join(", "))]
    NoKnownKey {
        signed_by: Vec<String>,
        trusted: Vec<String>,
    },
    #[error("bad signature by trusted key {key_name} ({key_id}): the note was altered or not signed by this key")]
    BadSignature { key_name: String, key_id: String },
    #[error("malformed checkpoint body: {0}")]
    MalformedBody(String),
}

impl Checkpoint {
    /// The tlog-checkpoint body text (format in the module doc).
    pub fn body(&self) -> String {
        format!(
            "{}\n{}\n{}\n{TIMESTAMP_PREFIX}{}\n",
            self.origin,
            self.size,
            STANDARD.encode(self.root),
            self.timestamp_unix
        )
    }

    /// Strictly parses a body produced by [`body`](Self::body).
    pub fn parse_body(body: &str) -> Result<Self, NoteError> {
        let bad = |why: String| NoteError::MalformedBody(why);
        let Some(text) = body.strip_suffix('\n') else {
            return Err(bad("the body does not end with a newline".into()));
        };
        let lines: Vec<&str> = text.split('\n').collect();
        let [origin, size, root, timestamp] = lines.as_slice() else {
            return Err(bad(format!(
                "expected 4 lines (origin, size, root, timestamp), found {}",
                lines.len()
            )));
        };
        if origin.is_empty() {
            return Err(bad("empty origin".into()));
        }
        if origin.chars().any(char::is_control) {
            return Err(bad("the origin contains a control character".into()));
        }
        if !is_canonical_decimal(size) {
            return Err(bad(format!(
                "tree size {size:?} is not a decimal without sign or leading zeros"
            )));
        }
        let size: u64 = size
            .parse()
            .map_err(|_| bad(format!("tree size {size} does not fit in 64 bits")))?;
        let root_bytes = STANDARD
            .decode(root)
            .map_err(|_| bad(format!("root {root:?} is not standard base64")))?;
        let root_hash: Hash = root_bytes.as_slice().try_into().map_err(|_| {
            bad(format!(
                "root is {} bytes, expected {HASH_LEN}",
                root_bytes.len()
            ))
        })?;
        if STANDARD.encode(root_hash) != *root {
            return Err(bad(format!("root {root:?} is not canonical base64")));
        }
        let Some(ts) = timestamp.strip_prefix(TIMESTAMP_PREFIX) else {
            return Err(bad(format!(
                "line 4 is {timestamp:?}, expected \"{TIMESTAMP_PREFIX}<unix seconds>\""
            )));
        };
        let digits = ts.strip_prefix('-').unwrap_or(ts);
        if !is_canonical_decimal(digits) || ts == "-0" {
            return Err(bad(format!("timestamp {ts:?} is not a canonical decimal")));
        }
        let timestamp_unix: i64 = ts
            .parse()
            .map_err(|_| bad(format!("timestamp {ts} does not fit in 64 bits")))?;
        Ok(Self {
            origin: (*origin).to_string(),
            size,
            root: root_hash,
            timestamp_unix,
        })
    }
}

fn is_canonical_decimal(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'))
}

/// One parsed signature line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SignatureLine {
    pub name: String,
    pub id: KeyId,
    pub sig: Vec<u8>,
}

/// A signed note split into its signed text (final newline included) and its
/// signature lines, with the signed-note syntax checked but nothing verified.
pub(crate) fn split_note(note: &str) -> Result<(&str, Vec<SignatureLine>), NoteError> {
    let bad = |why: &str| NoteError::MalformedNote(why.to_string());
    if let Some(c) = note.chars().find(|&c| c != '\n' && c.is_control()) {
        return Err(NoteError::MalformedNote(format!(
            "control character U+{:04X} (signed notes allow only newline)",
            u32::from(c)
        )));
    }
    let Some(split) = note.rfind("\n\n") else {
        return Err(bad("no blank line between the text and the signatures"));
    };
    let (text, sigs) = (&note[..=split], &note[split + 2..]);
    if sigs.is_empty() {
        return Err(bad("no signature lines after the blank line"));
    }
    let Some(sigs) = sigs.strip_suffix('\n') else {
        return Err(bad("the last signature line does not end with a newline"));
    };
    let mut lines = Vec::new();
    for (i, line) in sigs.split('\n').enumerate() {
        if i >= MAX_SIGNATURES {
            return Err(NoteError::TooManySignatures);
        }
        lines.push(parse_signature_line(line).map_err(|reason| {
            NoteError::MalformedSignatureLine {
                line: i + 1,
                reason,
            }
        })?);
    }
    Ok((text, lines))
}

fn parse_signature_line(line: &str) -> Result<SignatureLine, String> {
    let Some(rest) = line.strip_prefix(SIGNATURE_PREFIX) else {
        return Err("does not start with an em dash (U+2014) and a space".into());
    };
    let Some((name, b64)) = rest.split_once(' ') else {
        return Err("expected \"— <key name> <base64 signature>\"".into());
    };
    if !keys::is_valid_key_name(name) {
        return Err(format!("invalid key name {name:?}"));
    }
    let raw = STANDARD
        .decode(b64)
        .map_err(|_| "the signature is not standard base64".to_string())?;
    if raw.len() < 5 {
        return Err("the signature is shorter than a key ID and one byte".into());
    }
    let (id, sig) = raw.split_at(4);
    Ok(SignatureLine {
        name: name.to_string(),
        id: [id[0], id[1], id[2], id[3]],
        sig: sig.to_vec(),
    })
}

fn signature_line(text: &str, signer: &keys::Signer) -> String {
    let mut payload = signer.id().to_vec();
    payload.extend_from_slice(&signer.sign(text.as_bytes()));
    format!(
        "{SIGNATURE_PREFIX}{} {}\n",
        signer.name(),
        STANDARD.encode(payload)
    )
}

/// The signed note of `cp`: its body, a blank line and `signer`'s signature line.
pub fn sign_checkpoint(cp: &Checkpoint, signer: &keys::Signer) -> String {
    let body = cp.body();
    let line = signature_line(&body, signer);
    format!("{body}\n{line}")
}

/// Adds `signer`'s signature line to an already signed note (a co-signature,
/// e.g. by the new key during a key rotation). The existing signatures are kept
/// as they are and not verified here.
pub fn add_signature(note: &str, signer: &keys::Signer) -> Result<String, NoteError> {
    let (text, lines) = split_note(note)?;
    if lines.len() >= MAX_SIGNATURES {
        return Err(NoteError::TooManySignatures);
    }
    Ok(format!("{note}{}", signature_line(text, signer)))
}

/// A checkpoint whose note verified, and the trusted key that verified it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenedCheckpoint {
    pub checkpoint: Checkpoint,
    pub key_id: KeyId,
    pub key_name: String,
}

/// Verifies the note with the first of `verifiers` whose (name, id) matches a signature line; parses the body. Error names the reason (no known key, bad signature, malformed note/body).
///
/// Every signature line from a trusted key (one whose name and ID both match)
/// must verify; lines from other keys are ignored. The body is parsed only
/// after a signature verified, so untrusted text is never interpreted.
pub fn open_checkpoint(
    note: &str,
    verifiers: &[keys::Verifier],
) -> Result<OpenedCheckpoint, NoteError> {
    let (text, lines) = split_note(note)?;
    let mut verified = vec![false; verifiers.len()];
    for line in &lines {
        let known = verifiers
            .iter()
            .enumerate()
            .filter(|(_, v)| v.name() == line.name && v.id() == line.id);
        for (i, v) in known {
            v.verify(text.as_bytes(), &line.sig)
                .map_err(|_| NoteError::BadSignature {
                    key_name: line.name.clone(),
                    key_id: key_id_hex(&line.id),
                })?;
            verified[i] = true;
        }
    }
    let Some(first) = verifiers
        .iter()
        .zip(&verified)
        .find_map(|(v, ok)| ok.then_some(v))
    else {
        let describe = |name: &str, id: &KeyId| format!("{name} ({})", key_id_hex(id));
        return Err(NoteError::NoKnownKey {
            signed_by: lines.iter().map(|l| describe(&l.name, &l.id)).collect(),
            trusted: verifiers
                .iter()
                .map(|v| describe(v.name(), &v.id()))
                .collect(),
        });
    };
    Ok(OpenedCheckpoint {
        checkpoint: Checkpoint::parse_body(text)?,
        key_id: first.id(),
        key_name: first.name().to_string(),
    })
}

/// The (key name, key ID) of each signature line, in order, without verifying anything.
pub fn note_key_ids(note: &str) -> Result<Vec<(String, KeyId)>, NoteError> {
    let (_, lines) = split_note(note)?;
    Ok(lines.into_iter().map(|l| (l.name, l.id)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merkle::keys::{Signer, Verifier};

    fn signer(name: &str) -> Signer {
        match Signer::generate(name) {
            Ok(s) => s,
            Err(e) => unreachable!("generate: {e}"),
        }
    }

    fn cp() -> Checkpoint {
        let mut root = [0u8; 32];
        for (i, b) in root.iter_mut().enumerate() {
            *b = i as u8 * 7;
        }
        Checkpoint {
            origin: "caracal.test/ledger".into(),
            size: 1234,
            root,
            timestamp_unix: 1_735_689_600,
        }
    }

    #[test]
    fn body_format() {
        assert_eq!(
            cp().body(),
            "caracal.test/ledger\n1234\nAAcOFRwjKjE4P0ZNVFtiaXB3foWMk5qhqK+2vcTL0tk=\ntimestamp 1735689600\n"
        );
        assert_eq!(Checkpoint::parse_body(&cp().body()), Ok(cp()));
        let empty = Checkpoint {
            size: 0,
            timestamp_unix: 0,
            ..cp()
        };
        assert_eq!(Checkpoint::parse_body(&empty.body()), Ok(empty));
    }

    #[test]
    fn body_is_strict() {
        let good = cp().body();
        let root = STANDARD.encode(cp().root);
        let cases = [
            good.trim_end().to_string(),
            good.replacen("caracal.test/ledger", "", 1),
            good.replacen("1234", "01234", 1),
            good.replacen("1234", "+1234", 1),
            good.replacen("1234", "-1234", 1),
            good.replacen("1234", "12a4", 1),
            good.replacen("1234", "99999999999999999999", 1),
            good.replacen(&root, &root[..root.len() - 4], 1),
            good.replacen(&root, &STANDARD.encode([0u8; 33]), 1),
            good.replacen(&root, root.trim_end_matches('='), 1),
            good.replacen("timestamp 1735689600", "timestamp 01735689600", 1),
            good.replacen("timestamp 1735689600", "timestamp -0", 1),
            good.replacen("timestamp 1735689600", "time 1735689600", 1),
            good.replacen("timestamp 1735689600\n", "", 1),
            format!("{good}extra\n"),
            good.replacen("caracal", "cara\rcal", 1),
        ];
        for case in cases {
            assert!(
                matches!(
                    Checkpoint::parse_body(&case),
                    Err(NoteError::MalformedBody(_))
                ),
                "{case:?}"
            );
        }
        // Non-canonical base64 (trailing bits set) of a 32-byte root.
        let mut chars: Vec<char> = root.chars().collect();
        let last = chars.len() - 2; // the character before '='
        chars[last] = if chars[last] == 'k' { 'l' } else { 'k' };
        let noncanonical: String = chars.into_iter().collect();
        assert!(Checkpoint::parse_body(&good.replacen(&root, &noncanonical, 1)).is_err());
        let negative = Checkpoint {
            timestamp_unix: -5,
            ..cp()
        };
        assert_eq!(Checkpoint::parse_body(&negative.body()), Ok(negative));
    }

    #[test]
    fn round_trip() {
        let s = signer("caracal.test/ledger");
        let note = sign_checkpoint(&cp(), &s);
        assert!(note.starts_with(&format!("{}\n\u{2014} caracal.test/ledger ", cp().body())));
        let opened = open_checkpoint(&note, &[s.verifier()]);
        assert_eq!(
            opened,
            Ok(OpenedCheckpoint {
                checkpoint: cp(),
                key_id: s.id(),
                key_name: s.name().to_string(),
            })
        );
        assert_eq!(
            note_key_ids(&note),
            Ok(vec![(s.name().to_string(), s.id())])
        );
    }

    #[test]
    fn alterations_fail() {
        let s = signer("caracal.test/ledger");
        let v = [s.verifier()];
        let note = sign_checkpoint(&cp(), &s);
        let root = STANDARD.encode(cp().root);
        let mut other_root = cp().root;
        other_root[0] ^= 1;
        let altered = [
            note.replacen("\n1234\n", "\n1235\n", 1),
            note.replacen(&root, &STANDARD.encode(other_root), 1),
            note.replacen("timestamp 1735689600", "timestamp 1735689601", 1),
            note.replacen("caracal.test/ledger\n1234", "caracal.test/ledgeR\n1234", 1),
        ];
        for a in &altered {
            assert_ne!(a, &note);
            assert_eq!(
                open_checkpoint(a, &v),
                Err(NoteError::BadSignature {
                    key_name: s.name().to_string(),
                    key_id: key_id_hex(&s.id()),
                }),
                "{a}"
            );
        }
        // Flip one byte of the signature itself (past the 4-byte key id).
        let (text, lines) = split_note(&note).unwrap();
        let mut payload = lines[0].id.to_vec();
        let mut sig = lines[0].sig.clone();
        let last = sig.len() - 1;
        sig[last] ^= 0x01;
        payload.extend_from_slice(&sig);
        let flipped = format!(
            "{text}\n\u{2014} {} {}\n",
            s.name(),
            STANDARD.encode(&payload)
        );
        assert!(matches!(
            open_checkpoint(&flipped, &v),
            Err(NoteError::BadSignature { .. })
        ));
    }

    #[test]
    fn wrong_key_fails() {
        let s = signer("caracal.test/ledger");
        let note = sign_checkpoint(&cp(), &s);
        // Same name, different key: a different key id, so the line is not from a trusted key.
        let other = signer("caracal.test/ledger").verifier();
        assert!(matches!(
            open_checkpoint(&note, &[other]),
            Err(NoteError::NoKnownKey { .. })
        ));
        // Same key under another name: also not the trusted (name, id).
        let der = s.verifier().public_key_der().to_vec();
        let renamed = Verifier::from_public_key_der("someone.else/log", &der);
        let renamed: Vec<Verifier> = renamed.into_iter().collect();
        assert!(matches!(
            open_checkpoint(&note, &renamed),
            Err(NoteError::NoKnownKey { .. })
        ));
        assert!(matches!(
            open_checkpoint(&note, &[]),
            Err(NoteError::NoKnownKey { .. })
        ));
    }

    #[test]
    fn two_signatures_verify_with_either() {
        let old = signer("caracal.test/ledger");
        let new = signer("caracal.test/ledger-2025");
        let note = sign_checkpoint(&cp(), &old);
        let note = add_signature(&note, &new).unwrap();
        assert_eq!(note.matches('\u{2014}').count(), 2);
        for (v, s) in [(old.verifier(), &old), (new.verifier(), &new)] {
            let opened = open_checkpoint(&note, &[v]);
            assert_eq!(opened.as_ref().map(|o| o.key_id), Ok(s.id()));
            assert_eq!(opened.map(|o| o.checkpoint), Ok(cp()));
        }
        // With both trusted, the first of `verifiers` is reported.
        let opened = open_checkpoint(&note, &[new.verifier(), old.verifier()]);
        assert_eq!(opened.map(|o| o.key_name), Ok(new.name().to_string()));
        // Unknown extra lines are ignored.
        let stranger = signer("stranger.test/x");
        let note3 = add_signature(&note, &stranger).unwrap();
        assert!(open_checkpoint(&note3, &[old.verifier()]).is_ok());
        assert_eq!(note_key_ids(&note3).map(|k| k.len()), Ok(3));
        // One bad signature from a trusted key rejects the note even if another verifies.
        let (text, lines) = split_note(&note).unwrap();
        let old_line = format!(
            "\u{2014} {} {}\n",
            old.name(),
            STANDARD.encode([lines[0].id.to_vec(), lines[0].sig.clone()].concat())
        );
        // new's line carrying old's signature bytes
        let forged_line = format!(
            "\u{2014} {} {}\n",
            new.name(),
            STANDARD.encode([new.id().to_vec(), lines[0].sig.clone()].concat())
        );
        let forged = format!("{text}\n{old_line}{forged_line}");
        assert!(open_checkpoint(&forged, &[old.verifier()]).is_ok());
        assert!(matches!(
            open_checkpoint(&forged, &[old.verifier(), new.verifier()]),
            Err(NoteError::BadSignature { .. })
        ));
    }

    #[test]
    fn note_syntax_is_strict() {
        let s = signer("caracal.test/ledger");
        let v = [s.verifier()];
        let note = sign_checkpoint(&cp(), &s);
        let malformed = [
            note.replacen("\n\n", "\n", 1),
            note.trim_end().to_string(),
            format!("{}\n", cp().body()),
            note.replacen('\u{2014}', "-", 1),
            note.replacen(
                "\u{2014} caracal.test/ledger ",
                "\u{2014} caracal.test/ledger  ",
                1,
            ),
            note.replacen("\u{2014} caracal.test/ledger ", "\u{2014} cara+cal ", 1),
            note.replace('\n', "\r\n"),
            format!("{note}\u{2014} x AAAA\n"),
            format!("{note}\u{2014} x not-base64!\n"),
        ];
        for m in &malformed {
            assert!(
                matches!(
                    open_checkpoint(m, &v),
                    Err(NoteError::MalformedNote(_) | NoteError::MalformedSignatureLine { .. })
                ),
                "{m:?} -> {:?}",
                open_checkpoint(m, &v)
            );
        }
        let mut many = note.clone();
        for _ in 0..MAX_SIGNATURES {
            many.push_str("\u{2014} x AAAAAAA=\n");
        }
        assert_eq!(
            open_checkpoint(&many, &v),
            Err(NoteError::TooManySignatures)
        );
        // A validly signed but malformed body is reported as such.
        let bad_body = "caracal.test/ledger\n01\nAAAA\n";
        let line = signature_line(bad_body, &s);
        assert!(matches!(
            open_checkpoint(&format!("{bad_body}\n{line}"), &v),
            Err(NoteError::MalformedBody(_))
        ));
    }
}
