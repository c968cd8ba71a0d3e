//! The dead-letter envelope: what goes to `caracal.dlq` (as JSON) when a message
//! cannot be decoded, validated or processed.
//!
//! One shape for every producer of dead letters. A Kafka consumer fills the
//! `original_*` coordinates, the key, headers and payload (base64: they are bytes,
//! and a replay must re-publish them exactly); the outbox relay, whose poison comes
//! from a Redis stream, fills `original_stream`, `entry_id` and `fields` instead.
//! Absent parts are left out of the JSON.

use std::collections::BTreeMap;

use base64::{engine::general_purpose::STANDARD, Engine as _};
use serde::{Deserialize, Serialize};

/// A header of the original message; `value_base64` is absent for a null value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterHeader {
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_base64: Option<String>,
}

/// One dead letter. See the module documentation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Kafka topic the message was read from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_topic: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_partition: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_offset: Option<i64>,
    /// The message key, base64 (absent: the message had none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_base64: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<DeadLetterHeader>,
    /// The message value, base64 (absent: the message had none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_base64: Option<String>,
    /// Redis outbox stream the entry was read from (outbox relay only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_stream: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fields: Option<BTreeMap<String, String>>,
    /// Why it could not be processed.
    pub error: String,
    /// Attempts made after the first failure (0: a decode or validation error,
    /// which no retry can fix).
    #[serde(default)]
    pub retry_count: u32,
    /// Who gave up on it: a consumer group (`caracal-ledger-writer`) or `outbox-relay`.
    pub consumer: String,
    /// When it first failed (RFC 3339, UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_failed_at: Option<String>,
}

impl DeadLetter {
    /// The envelope of a Kafka message. `headers` are (name, value) in message order.
    #[allow(clippy::too_many_arguments)]
    pub fn from_kafka(
        topic: &str,
        partition: i32,
        offset: i64,
        key: Option<&[u8]>,
        headers: &[(String, Option<Vec<u8>>)],
        payload: Option<&[u8]>,
        error: String,
        retry_count: u32,
        consumer: &str,
        first_failed_at: chrono::DateTime<chrono::Utc>,
    ) -> Self {
        Self {
            original_topic: Some(topic.to_owned()),
            original_partition: Some(partition),
            original_offset: Some(offset),
            key_base64: key.map(|k| STANDARD.encode(k)),
            headers: headers
                .iter()
                .map(|(k, v)| DeadLetterHeader {
                    key: k.clone(),
                    value_base64: v.as_ref().map(|v| STANDARD.encode(v)),
                })
                .collect(),
            payload_base64: payload.map(|p| STANDARD.encode(p)),
            error,
            retry_count,
            consumer: consumer.to_owned(),
            first_failed_at: Some(
                first_failed_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            ),
            ..Self::default()
        }
    }

    /// The envelope of a Redis outbox entry that could not be converted.
    pub fn from_outbox(
        stream: &str,
        entry_id: &str,
        fields: &BTreeMap<String, String>,
        error: &str,
        consumer: &str,
    ) -> Self {
        Self {
            original_stream: Some(stream.to_owned()),
            entry_id: Some(entry_id.to_owned()),
            fields: Some(fields.clone()),
            error: error.to_owned(),
            consumer: consumer.to_owned(),
            first_failed_at: Some(
                chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            ),
            ..Self::default()
        }
    }

    /// The JSON bytes sent to the dead-letter topic.
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising plain strings and numbers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes a base64 part of the envelope (key, payload or a header value).
    pub fn decode(b64: &str) -> Result<Vec<u8>, base64::DecodeError> {
        STANDARD.decode(b64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_envelope_round_trips_bytes_and_omits_absent_parts() {
        let at = chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let d = DeadLetter::from_kafka(
            "caracal.metering.events",
            3,
            42,
            Some(b"root"),
            &[
                ("bin".to_owned(), Some(vec![0, 255])),
                ("null".to_owned(), None),
            ],
            Some(&[1, 2, 3]),
            "garbage".to_owned(),
            0,
            "caracal-ledger-writer",
            at,
        );
        let v: serde_json::Value = serde_json::from_slice(&d.to_json()).unwrap();
        assert_eq!(v["original_topic"], "caracal.metering.events");
        assert_eq!(v["original_partition"], 3);
        assert_eq!(v["original_offset"], 42);
        assert_eq!(v["consumer"], "caracal-ledger-writer");
        assert_eq!(v["retry_count"], 0);
        assert_eq!(v["first_failed_at"], "2023-11-14T22:13:20.000Z");
        assert!(v.get("original_stream").is_none());
        assert!(v["headers"][1].get("value_base64").is_none());
        let back: DeadLetter = serde_json::from_value(v).unwrap();
        assert_eq!(back, d);
        assert_eq!(
            DeadLetter::decode(back.payload_base64.as_deref().unwrap()).unwrap(),
            vec![1, 2, 3]
        );
        assert_eq!(
            DeadLetter::decode(back.headers[0].value_base64.as_deref().unwrap()).unwrap(),
            vec![0, 255]
        );
    }

    #[test]
    fn outbox_envelope_keeps_the_relay_fields() {
        let fields: BTreeMap<String, String> = [("type".to_owned(), "x".to_owned())].into();
        let v: serde_json::Value = serde_json::from_slice(
            &DeadLetter::from_outbox("s", "1-0", &fields, "bad", "outbox-relay").to_json(),
        )
        .unwrap();
        assert_eq!(v["original_stream"], "s");
        assert_eq!(v["entry_id"], "1-0");
        assert_eq!(v["fields"]["type"], "x");
        assert_eq!(v["error"], "bad");
        assert_eq!(v["consumer"], "outbox-relay");
        assert!(v.get("original_topic").is_none());
    }
}
