//! The canonical, versioned byte encoding of one ledger row: a Merkle leaf.
//!
//! Every field of a ledger row that carries meaning is in the leaf, so changing
//! any of them (an amount, a token count, the model, a timestamp, the policy list
//! or its order, ...) changes the leaf bytes, hence its leaf hash, hence every
//! root that covers it. The encoding is a plain length-prefixed binary layout so
//! an auditor can re-implement it in a few lines of any language and recompute a
//! leaf hash from the row with no Caracal code.
//!
//! # Encoding, version 1
//!
//! All integers are big-endian; signed integers are two's complement. `text` is a
//! `u32` byte length followed by that many bytes of UTF-8 (no terminator, no
//! normalisation: the bytes stored are the bytes hashed).
//!
//! | # | field | encoding | bytes |
//! | --- | --- | --- | --- |
//! | 0 | version | `u8`, always `0x01` | 1 |
//! | 1 | `event_id` | text | 4 + n |
//! | 2 | `kind` | text | 4 + n |
//! | 3 | `reservation_id` | text | 4 + n |
//! | 4 | `request_id` | text | 4 + n |
//! | 5 | `agent_id` | UUID: the 16 raw bytes in RFC 9562 order (the hex digits of the hyphenated form, left to right) | 16 |
//! | 6 | `root_agent_id` | UUID, as above | 16 |
//! | 7 | `policy_ids` | `u32` count, then each id as text, in the stored order | 4 + Σ(4 + n) |
//! | 8 | `currency` | text | 4 + n |
//! | 9 | `reserved_micros` | `i64` | 8 |
//! | 10 | `charged_micros` | `i64` | 8 |
//! | 11 | `overshoot_micros` | `i64` | 8 |
//! | 12 | `input_tokens` | `i64` | 8 |
//! | 13 | `output_tokens` | `i64` | 8 |
//! | 14 | `cached_input_tokens` | `i64` | 8 |
//! | 15 | `provider` | text | 4 + n |
//! | 16 | `model` | text | 4 + n |
//! | 17 | `price_version` | `i32` | 4 |
//! | 18 | `schema_version` | `i32` | 4 |
//! | 19 | `occurred_at_micros` | `i64`, UTC microseconds since the Unix epoch (PostgreSQL `timestamptz` precision) | 8 |
//! | 20 | `reserved_at_micros` | `0x00` when absent, or `0x01` followed by the `i64` | 1 or 9 |
//!
//! Nothing follows the last field. Decoding is strict: the version byte must be
//! exactly `0x01`, every length must fit in the remaining input, text must be
//! valid UTF-8, the option tag must be `0x00` or `0x01`, and trailing bytes are an
//! error. So exactly one byte string decodes to a given row, and
//! `decode(encode(x)) == x`.
//!
//! The leaf hash is RFC 9162's `H(0x00 || leaf bytes)` with BLAKE3
//! ([`tree::leaf_hash`]). A future layout gets a new version byte; leaves already
//! in the log keep their version and stay verifiable.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::tree::{self, Hash};

/// The version byte of the layout documented in this module.
pub const LEAF_VERSION: u8 = 1;

/// One ledger row, as covered by the Merkle log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerLeaf {
    pub event_id: String,
    pub kind: String,
    pub reservation_id: String,
    pub request_id: String,
    /// UUID bytes in RFC 9562 (big-endian) order; JSON: the hyphenated UUID string.
    #[serde(with = "uuid_text")]
    pub agent_id: [u8; 16],
    /// UUID bytes in RFC 9562 (big-endian) order; JSON: the hyphenated UUID string.
    #[serde(with = "uuid_text")]
    pub root_agent_id: [u8; 16],
    pub policy_ids: Vec<String>,
    pub currency: String,
    pub reserved_micros: i64,
    pub charged_micros: i64,
    pub overshoot_micros: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cached_input_tokens: i64,
    pub provider: String,
    pub model: String,
    pub price_version: i32,
    pub schema_version: i32,
    /// UTC microseconds since the Unix epoch, as PostgreSQL stores `timestamptz`.
    pub occurred_at_micros: i64,
    /// UTC microseconds since the Unix epoch, when the row has a reservation time.
    pub reserved_at_micros: Option<i64>,
}

/// Why bytes are not a valid version-1 leaf.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LeafError {
    #[error("empty leaf: no version byte")]
    Empty,
    #[error("unsupported leaf version {found} (this build reads version {LEAF_VERSION})")]
    UnsupportedVersion { found: u8 },
    #[error(
        "leaf truncated in {field}: needs {needed} more bytes at offset {offset}, {remaining} left"
    )]
    Truncated {
        field: &'static str,
        offset: usize,
        needed: u64,
        remaining: usize,
    },
    #[error("leaf field {field} at offset {offset} is not valid UTF-8")]
    InvalidUtf8 { field: &'static str, offset: usize },
    #[error(
        "leaf field {field} at offset {offset} has option tag {tag:#04x} (expected 0x00 or 0x01)"
    )]
    InvalidOptionTag {
        field: &'static str,
        offset: usize,
        tag: u8,
    },
    #[error("{count} trailing bytes after the last leaf field")]
    TrailingBytes { count: usize },
}

impl LedgerLeaf {
    /// The canonical version-1 bytes of this row (layout in the module doc).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len_hint());
        out.push(LEAF_VERSION);
        put_text(&mut out, &self.event_id);
        put_text(&mut out, &self.kind);
        put_text(&mut out, &self.reservation_id);
        put_text(&mut out, &self.request_id);
        out.extend_from_slice(&self.agent_id);
        out.extend_from_slice(&self.root_agent_id);
        put_len(&mut out, self.policy_ids.len());
        for id in &self.policy_ids {
            put_text(&mut out, id);
        }
        put_text(&mut out, &self.currency);
        for v in [
            self.reserved_micros,
            self.charged_micros,
            self.overshoot_micros,
            self.input_tokens,
            self.output_tokens,
            self.cached_input_tokens,
        ] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        put_text(&mut out, &self.provider);
        put_text(&mut out, &self.model);
        out.extend_from_slice(&self.price_version.to_be_bytes());
        out.extend_from_slice(&self.schema_version.to_be_bytes());
        out.extend_from_slice(&self.occurred_at_micros.to_be_bytes());
        match self.reserved_at_micros {
            None => out.push(0x00),
            Some(v) => {
                out.push(0x01);
                out.extend_from_slice(&v.to_be_bytes());
            }
        }
        out
    }

    /// Strictly decodes version-1 leaf bytes (see the module doc for what is rejected).
    pub fn decode(bytes: &[u8]) -> Result<Self, LeafError> {
        let (&version, rest) = bytes.split_first().ok_or(LeafError::Empty)?;
        if version != LEAF_VERSION {
            return Err(LeafError::UnsupportedVersion { found: version });
        }
        let mut r = Reader {
            buf: rest,
            offset: 1,
        };
        let event_id = r.text("event_id")?;
        let kind = r.text("kind")?;
        let reservation_id = r.text("reservation_id")?;
        let request_id = r.text("request_id")?;
        let agent_id = r.array::<16>("agent_id")?;
        let root_agent_id = r.array::<16>("root_agent_id")?;
        let count = r.u32("policy_ids count")?;
        // Each id takes at least its 4-byte length, which bounds the allocation by the input.
        let mut policy_ids = Vec::with_capacity((count as usize).min(r.buf.len() / 4));
        for _ in 0..count {
            policy_ids.push(r.text("policy_ids")?);
        }
        let currency = r.text("currency")?;
        let reserved_micros = r.i64("reserved_micros")?;
        let charged_micros = r.i64("charged_micros")?;
        let overshoot_micros = r.i64("overshoot_micros")?;
        let input_tokens = r.i64("input_tokens")?;
        let output_tokens = r.i64("output_tokens")?;
        let cached_input_tokens = r.i64("cached_input_tokens")?;
        let provider = r.text("provider")?;
        let model = r.text("model")?;
        let price_version = i32::from_be_bytes(r.array::<4>("price_version")?);
        let schema_version = i32::from_be_bytes(r.array::<4>("schema_version")?);
        let occurred_at_micros = r.i64("occurred_at_micros")?;
        let tag_offset = r.offset;
        let [tag] = r.array::<1>("reserved_at_micros")?;
        let reserved_at_micros = match tag {
            0x00 => None,
            0x01 => Some(r.i64("reserved_at_micros")?),
            tag => {
                return Err(LeafError::InvalidOptionTag {
                    field: "reserved_at_micros",
                    offset: tag_offset,
                    tag,
                })
            }
        };
        if !r.buf.is_empty() {
            return Err(LeafError::TrailingBytes { count: r.buf.len() });
        }
        Ok(Self {
            event_id,
            kind,
            reservation_id,
            request_id,
            agent_id,
            root_agent_id,
            policy_ids,
            currency,
            reserved_micros,
            charged_micros,
            overshoot_micros,
            input_tokens,
            output_tokens,
            cached_input_tokens,
            provider,
            model,
            price_version,
            schema_version,
            occurred_at_micros,
            reserved_at_micros,
        })
    }

    /// The RFC 9162 leaf hash of [`encode`](Self::encode): `BLAKE3(0x00 || bytes)`.
    pub fn hash(&self) -> Hash {
        tree::leaf_hash(&self.encode())
    }

    /// `occurred_at_micros` as a UTC instant (`None` when outside chrono's range).
    pub fn occurred_at(&self) -> Option<DateTime<Utc>> {
        DateTime::<Utc>::from_timestamp_micros(self.occurred_at_micros)
    }

    /// `reserved_at_micros` as a UTC instant, when present and within chrono's range.
    pub fn reserved_at(&self) -> Option<DateTime<Utc>> {
        self.reserved_at_micros
            .and_then(DateTime::<Utc>::from_timestamp_micros)
    }

    fn encoded_len_hint(&self) -> usize {
        let texts = [
            &self.event_id,
            &self.kind,
            &self.reservation_id,
            &self.request_id,
            &self.currency,
            &self.provider,
            &self.model,
        ];
        1 + texts.iter().map(|t| 4 + t.len()).sum::<usize>()
            + 32
            + 4
            + self.policy_ids.iter().map(|p| 4 + p.len()).sum::<usize>()
            + 6 * 8
            + 2 * 4
            + 8
            + if self.reserved_at_micros.is_some() {
                9
            } else {
                1
            }
    }
}

/// Appends a `u32` length. Lengths come from in-memory strings and vectors of a
/// ledger row (PostgreSQL `text` holds at most 1 GB), so they always fit; a value
/// that did not would saturate and the leaf would then fail to decode rather than
/// silently alias another row.
fn put_len(out: &mut Vec<u8>, len: usize) {
    let len = u32::try_from(len).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
}

fn put_text(out: &mut Vec<u8>, s: &str) {
    put_len(out, s.len());
    out.extend_from_slice(s.as_bytes());
}

struct Reader<'a> {
    buf: &'a [u8],
    /// Offset of `buf[0]` in the whole leaf, for error messages.
    offset: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, field: &'static str, n: u64) -> Result<&'a [u8], LeafError> {
        let truncated = LeafError::Truncated {
            field,
            offset: self.offset,
            needed: n,
            remaining: self.buf.len(),
        };
        let n = usize::try_from(n).map_err(|_| truncated.clone())?;
        if n > self.buf.len() {
            return Err(truncated);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        self.offset += n;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], LeafError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(field, N as u64)?);
        Ok(out)
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, LeafError> {
        Ok(u32::from_be_bytes(self.array::<4>(field)?))
    }

    fn i64(&mut self, field: &'static str) -> Result<i64, LeafError> {
        Ok(i64::from_be_bytes(self.array::<8>(field)?))
    }

    fn text(&mut self, field: &'static str) -> Result<String, LeafError> {
        let len = self.u32(field)?;
        let offset = self.offset;
        let bytes = self.take(field, u64::from(len))?;
        String::from_utf8(bytes.to_vec()).map_err(|_| LeafError::InvalidUtf8 { field, offset })
    }
}

/// Formats 16 UUID bytes as the lowercase hyphenated form (8-4-4-4-12).
pub fn format_uuid(bytes: &[u8; 16]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(36);
    for (i, b) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    s
}

/// Parses the hyphenated UUID form (8-4-4-4-12 hex digits, either case) into its 16 bytes.
pub fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let raw = s.as_bytes();
    if raw.len() != 36 {
        return None;
    }
    let mut out = [0u8; 16];
    let mut digits = Vec::with_capacity(32);
    for (i, &c) in raw.iter().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            if c != b'-' {
                return None;
            }
            continue;
        }
        let v = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            b'A'..=b'F' => c - b'A' + 10,
            _ => return None,
        };
        digits.push(v);
    }
    for (slot, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        *slot = (pair[0] << 4) | pair[1];
    }
    Some(out)
}

/// Serde adapter: `[u8; 16]` as the hyphenated UUID string.
mod uuid_text {
    use serde::{de::Error as _, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8; 16], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_uuid(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 16], D::Error> {
        let s = String::deserialize(d)?;
        super::parse_uuid(&s)
            .ok_or_else(|| D::Error::custom(format!("not a hyphenated UUID: {s:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// A fixed row whose encoding and hash are pinned below. Changing either pin
    /// means every existing log would stop verifying: bump `LEAF_VERSION` instead.
    pub(crate) fn sample() -> LedgerLeaf {
        LedgerLeaf {
            event_id: "evt-1".into(),
            kind: "charge".into(),
            reservation_id: "res-1".into(),
            request_id: "req-1".into(),
            agent_id: [
                0x01, 0x8f, 0x3a, 0x4b, 0x5c, 0x6d, 0x7e, 0x8f, 0x90, 0xa1, 0xb2, 0xc3, 0xd4, 0xe5,
                0xf6, 0x07,
            ],
            root_agent_id: [0x11; 16],
            policy_ids: vec!["p-daily".into(), "p-team".into()],
            currency: "USD".into(),
            reserved_micros: 1_500_000,
            charged_micros: 1_234_567,
            overshoot_micros: 0,
            input_tokens: 1000,
            output_tokens: 250,
            cached_input_tokens: 0,
            provider: "openai".into(),
            model: "gpt-4o".into(),
            price_version: 3,
            schema_version: 1,
            occurred_at_micros: 1_735_689_600_123_456,
            reserved_at_micros: Some(1_735_689_599_000_000),
        }
    }

    /// The encoding of [`sample`], field by field (computed independently with
    /// Python's `struct.pack` from the table in the module doc).
    const SAMPLE_ENCODING: [&str; 21] = [
        "01",                                                 // version
        "000000056576742d31",                                 // event_id "evt-1"
        "00000006636861726765",                               // kind "charge"
        "000000057265732d31",                                 // reservation_id "res-1"
        "000000057265712d31",                                 // request_id "req-1"
        "018f3a4b5c6d7e8f90a1b2c3d4e5f607",                   // agent_id
        "11111111111111111111111111111111",                   // root_agent_id
        "0000000200000007702d6461696c7900000006702d7465616d", // policy_ids ["p-daily", "p-team"]
        "00000003555344",                                     // currency "USD"
        "000000000016e360",                                   // reserved_micros 1500000
        "000000000012d687",                                   // charged_micros 1234567
        "0000000000000000",                                   // overshoot_micros 0
        "00000000000003e8",                                   // input_tokens 1000
        "00000000000000fa",                                   // output_tokens 250
        "0000000000000000",                                   // cached_input_tokens 0
        "000000066f70656e6169",                               // provider "openai"
        "000000066770742d346f",                               // model "gpt-4o"
        "00000003",                                           // price_version 3
        "00000001",                                           // schema_version 1
        "00062a99ba0e4240",   // occurred_at_micros 2025-01-01T00:00:00.123456Z
        "0100062a99b9fd1dc0", // reserved_at_micros Some(2024-12-31T23:59:59Z)
    ];

    /// BLAKE3(0x00 || encoding of [`sample`]).
    const SAMPLE_LEAF_HASH: &str =
        "4c5d2eae48d7e95a0447316b65e8073dd65fd0979aad0c9fff79923f7328f016";

    #[test]
    fn pinned_encoding() {
        let bytes = sample().encode();
        assert_eq!(
            hex(&bytes[..20]),
            "01000000056576742d3100000006636861726765"
        );
        assert_eq!(hex(&bytes), SAMPLE_ENCODING.concat());
        assert_eq!(bytes.len(), 195);
        assert_eq!(bytes.len(), sample().encoded_len_hint());
    }

    #[test]
    fn pinned_leaf_hash() {
        let bytes = sample().encode();
        assert_eq!(hex(&sample().hash()), SAMPLE_LEAF_HASH);
        // RFC 9162 leaf hash with BLAKE3, computed here without the tree module.
        let direct = blake3::Hasher::new()
            .update(&[0x00])
            .update(&bytes)
            .finalize();
        assert_eq!(hex(direct.as_bytes()), SAMPLE_LEAF_HASH);
    }

    #[test]
    fn decode_round_trip_sample_and_none() {
        let mut leaf = sample();
        assert_eq!(LedgerLeaf::decode(&leaf.encode()), Ok(leaf.clone()));
        leaf.reserved_at_micros = None;
        leaf.policy_ids.clear();
        let bytes = leaf.encode();
        assert_eq!(bytes[bytes.len() - 1], 0x00);
        assert_eq!(LedgerLeaf::decode(&bytes), Ok(leaf));
    }

    #[test]
    fn decode_is_strict() {
        let bytes = sample().encode();
        assert_eq!(LedgerLeaf::decode(&[]), Err(LeafError::Empty));
        let mut v2 = bytes.clone();
        v2[0] = 2;
        assert_eq!(
            LedgerLeaf::decode(&v2),
            Err(LeafError::UnsupportedVersion { found: 2 })
        );
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert_eq!(
            LedgerLeaf::decode(&trailing),
            Err(LeafError::TrailingBytes { count: 1 })
        );
        for cut in 1..bytes.len() {
            assert!(
                matches!(
                    LedgerLeaf::decode(&bytes[..cut]),
                    Err(LeafError::Truncated { .. })
                ),
                "prefix of {cut} bytes"
            );
        }
        // A length larger than the input.
        let mut long = bytes.clone();
        long[1..5].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            LedgerLeaf::decode(&long),
            Err(LeafError::Truncated {
                field: "event_id",
                ..
            })
        ));
        // Invalid UTF-8 in event_id.
        let mut bad = bytes.clone();
        bad[5] = 0xff;
        assert_eq!(
            LedgerLeaf::decode(&bad),
            Err(LeafError::InvalidUtf8 {
                field: "event_id",
                offset: 5
            })
        );
        // Option tag other than 0 / 1.
        let mut tag = bytes.clone();
        let at = tag.len() - 9;
        tag[at] = 2;
        assert!(matches!(
            LedgerLeaf::decode(&tag),
            Err(LeafError::InvalidOptionTag { tag: 2, .. })
        ));
        // A huge policy count does not allocate: it fails as truncated.
        let mut count = sample();
        count.policy_ids.clear();
        let mut b = count.encode();
        let at = 1 + (4 + 5) + (4 + 6) + (4 + 5) + (4 + 5) + 32;
        b[at..at + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            LedgerLeaf::decode(&b),
            Err(LeafError::Truncated { .. })
        ));
    }

    #[test]
    fn every_field_changes_the_hash() {
        let base = sample();
        let h = base.hash();
        let mut variants: Vec<LedgerLeaf> = Vec::new();
        macro_rules! vary {
            ($($f:ident = $v:expr),* $(,)?) => {$({
                let mut l = base.clone();
                l.$f = $v;
                variants.push(l);
            })*};
        }
        vary!(
            event_id = "evt-2".into(),
            kind = "release".into(),
            reservation_id = "res-2".into(),
            request_id = "req-2".into(),
            agent_id = [0x22; 16],
            root_agent_id = [0x12; 16],
            policy_ids = vec!["p-team".into(), "p-daily".into()],
            currency = "EUR".into(),
            reserved_micros = 1_500_001,
            charged_micros = 1_234_568,
            overshoot_micros = 1,
            input_tokens = 1001,
            output_tokens = 251,
            cached_input_tokens = 1,
            provider = "anthropic".into(),
            model = "gpt-4o-mini".into(),
            price_version = 4,
            schema_version = 2,
            occurred_at_micros = 1_735_689_600_123_457,
            reserved_at_micros = None,
        );
        assert_eq!(variants.len(), 20);
        for v in variants {
            assert_ne!(v.hash(), h, "{v:?}");
        }
    }

    #[test]
    fn text_boundaries_are_unambiguous() {
        // Moving bytes between adjacent text fields changes the encoding.
        let mut a = sample();
        a.event_id = "ab".into();
        a.kind = "c".into();
        let mut b = sample();
        b.event_id = "a".into();
        b.kind = "bc".into();
        assert_ne!(a.encode(), b.encode());
    }

    #[test]
    fn json_uses_hyphenated_uuids() {
        let leaf = sample();
        let v = serde_json::to_value(&leaf).ok();
        let agent = v
            .as_ref()
            .and_then(|v| v.get("agent_id"))
            .and_then(|v| v.as_str());
        assert_eq!(agent, Some("018f3a4b-5c6d-7e8f-90a1-b2c3d4e5f607"));
        let back: Option<LedgerLeaf> = v.and_then(|v| serde_json::from_value(v).ok());
        assert_eq!(back, Some(leaf));
        assert_eq!(
            parse_uuid("018F3A4B-5C6D-7E8F-90A1-B2C3D4E5F607"),
            Some(sample().agent_id)
        );
        assert_eq!(parse_uuid("018f3a4b5c6d7e8f90a1b2c3d4e5f607"), None);
        assert_eq!(parse_uuid("018f3a4b-5c6d-7e8f-90a1-b2c3d4e5f60g"), None);
        assert_eq!(parse_uuid("018f3a4b-5c6d-7e8f-90a1b-2c3d4e5f607"), None);
    }

    #[test]
    fn occurred_at_is_utc_micros() {
        let t = sample().occurred_at().map(|t| t.to_rfc3339());
        assert_eq!(t.as_deref(), Some("2025-01-01T00:00:00.123456+00:00"));
        assert!(sample().reserved_at().is_some());
    }

    fn arb_leaf() -> impl Strategy<Value = LedgerLeaf> {
        let texts = (".*", ".*", ".*", ".*", ".{0,3}", ".*", ".*");
        let ids = (
            any::<[u8; 16]>(),
            any::<[u8; 16]>(),
            prop::collection::vec(".*", 0..4),
        );
        let nums = (
            any::<i64>(),
            any::<i64>(),
            any::<i64>(),
            any::<i64>(),
            any::<i64>(),
            any::<i64>(),
            any::<i32>(),
            any::<i32>(),
            any::<i64>(),
            any::<Option<i64>>(),
        );
        (texts, ids, nums).prop_map(|(t, i, n)| LedgerLeaf {
            event_id: t.0,
            kind: t.1,
            reservation_id: t.2,
            request_id: t.3,
            agent_id: i.0,
            root_agent_id: i.1,
            policy_ids: i.2,
            currency: t.4,
            reserved_micros: n.0,
            charged_micros: n.1,
            overshoot_micros: n.2,
            input_tokens: n.3,
            output_tokens: n.4,
            cached_input_tokens: n.5,
            provider: t.5,
            model: t.6,
            price_version: n.6,
            schema_version: n.7,
            occurred_at_micros: n.8,
            reserved_at_micros: n.9,
        })
    }

    proptest! {
        #[test]
        fn decode_inverts_encode(leaf in arb_leaf()) {
            let bytes = leaf.encode();
            prop_assert_eq!(bytes.len(), leaf.encoded_len_hint());
            prop_assert_eq!(LedgerLeaf::decode(&bytes), Ok(leaf));
        }

        #[test]
        fn distinct_leaves_encode_distinctly(a in arb_leaf(), b in arb_leaf()) {
            prop_assume!(a != b);
            prop_assert_ne!(a.encode(), b.encode());
        }

        #[test]
        fn decode_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(leaf) = LedgerLeaf::decode(&bytes) {
                prop_assert_eq!(leaf.encode(), bytes);
            }
        }

        #[test]
        fn uuid_text_round_trip(bytes in any::<[u8; 16]>()) {
            prop_assert_eq!(parse_uuid(&format_uuid(&bytes)), Some(bytes));
        }
    }
}
