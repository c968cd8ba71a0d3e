//! Conversions between database rows, domain values and protobuf messages.

use caracal_domain::money::format_amount;
use caracal_proto::v1 as pb;
use chrono::{DateTime, TimeZone, Utc};
use uuid::Uuid;

use crate::error::ServiceError;

pub fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        // Always within 0..1e9 for a valid DateTime.
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

pub fn opt_timestamp(t: Option<DateTime<Utc>>) -> Option<prost_types::Timestamp> {
    t.map(timestamp)
}

pub fn from_timestamp(
    field: &str,
    t: &prost_types::Timestamp,
) -> Result<DateTime<Utc>, ServiceError> {
    let nanos = u32::try_from(t.nanos)
        .map_err(|_| ServiceError::invalid(field, "nanos must be non-negative"))?;
    Utc.timestamp_opt(t.seconds, nanos)
        .single()
        .ok_or_else(|| ServiceError::invalid(field, "timestamp out of range"))
}

pub fn money(micros: i64, currency: &str) -> pb::Money {
    pb::Money {
        currency: currency.to_owned(),
        micros,
        amount: format_amount(micros),
    }
}

/// Parses an id field; a malformed id is the caller's mistake, not a missing row.
pub fn uuid(field: &str, text: &str) -> Result<Uuid, ServiceError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(ServiceError::InvalidArgument(format!(
            "{field} is required"
        )));
    }
    Uuid::parse_str(text).map_err(|_| {
        ServiceError::InvalidArgument(format!("{field} {text:?} is not a valid id (UUID)"))
    })
}

pub fn opt_uuid(field: &str, text: &str) -> Result<Option<Uuid>, ServiceError> {
    if text.trim().is_empty() {
        Ok(None)
    } else {
        uuid(field, text).map(Some)
    }
}

/// Page size: default 100, at most 1000 (explicit bound on every list call).
pub fn page_limit(page: Option<&pb::PageRequest>) -> i64 {
    match page.map(|p| p.limit) {
        None | Some(0) => 100,
        Some(n) => i64::from(n.min(1000)),
    }
}

/// Keyset cursor: the last id of the previous page (ids are UUIDv7, so sortable).
pub fn page_after(page: Option<&pb::PageRequest>) -> Result<Option<Uuid>, ServiceError> {
    match page.map(|p| p.page_token.as_str()) {
        None | Some("") => Ok(None),
        Some(token) => uuid("page_token", token).map(Some),
    }
}

/// Non-empty, trimmed, bounded text field.
pub fn required_text(field: &str, text: &str, max_len: usize) -> Result<String, ServiceError> {
    let t = text.trim();
    if t.is_empty() {
        return Err(ServiceError::InvalidArgument(format!(
            "{field} is required"
        )));
    }
    if t.chars().count() > max_len {
        return Err(ServiceError::InvalidArgument(format!(
            "{field} is longer than {max_len} characters"
        )));
    }
    if t.chars().any(char::is_control) {
        return Err(ServiceError::InvalidArgument(format!(
            "{field} must not contain control characters"
        )));
    }
    Ok(t.to_owned())
}
