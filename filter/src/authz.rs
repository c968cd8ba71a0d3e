//! The conversation with `caracal.v1.BudgetAuthorization`: the messages the filter
//! sends, what an Authorize answer means for the request, and how a call ends
//! (Settle or Release).

use caracal_proto::v1::{
    AuthorizeRequest, AuthorizeResponse, Decision, DenyReason, Money, ReleaseByRequestRequest,
    ReleaseRequest, SettleRequest, TokenUsage,
};
use prost::Message;

use crate::estimate::Estimate;
use crate::identity::Identity;
use crate::reply::Refusal;

/// The gRPC service name.
pub const SERVICE: &str = "caracal.v1.BudgetAuthorization";
/// Reserve an estimate before the call.
pub const AUTHORIZE: &str = "Authorize";
/// Charge the real usage after the call.
pub const SETTLE: &str = "Settle";
/// Free a reservation whose call did not happen.
pub const RELEASE: &str = "Release";
/// Free whatever an Authorize that failed or timed out may have reserved.
pub const RELEASE_BY_REQUEST: &str = "ReleaseByRequest";

/// The "upstream" argument of `proxy_grpc_call`: Envoy's
/// `envoy.config.core.v3.GrpcService` with only `envoy_grpc.cluster_name`, encoded.
/// Envoy first tries to parse that argument as this message and only then as a bare
/// cluster name, so a bare name that happens to parse as protobuf would be misread;
/// the encoded message is unambiguous. The SDK takes the argument as `&str`: for the
/// ASCII names of at most 120 bytes the configuration accepts, the encoding is ASCII
/// (every length fits one varint byte); otherwise the bare name is used.
pub fn grpc_upstream(cluster: &str) -> String {
    #[derive(Clone, PartialEq, prost::Message)]
    struct EnvoyGrpc {
        #[prost(string, tag = "1")]
        cluster_name: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct GrpcService {
        #[prost(message, optional, tag = "1")]
        envoy_grpc: Option<EnvoyGrpc>,
    }
    let encoded = GrpcService {
        envoy_grpc: Some(EnvoyGrpc {
            cluster_name: cluster.to_owned(),
        }),
    }
    .encode_to_vec();
    String::from_utf8(encoded).unwrap_or_else(|_| cluster.to_owned())
}

/// Longest request id the service accepts.
pub const MAX_REQUEST_ID_LEN: usize = 128;
/// Longest `x-request-id` kept as the prefix of the request id.
const MAX_PREFIX_LEN: usize = 100;

/// Whether `id` is a request id the service accepts: 1-128 characters of
/// `[A-Za-z0-9._:-]`.
pub fn valid_request_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_REQUEST_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// The Authorize request id: Envoy's `x-request-id` (when it fits the service's
/// alphabet), for correlation, followed by a random per-call `nonce`.
///
/// The nonce matters: the service answers a repeated request id with its stored answer
/// (idempotency), and a client can choose `x-request-id` unless Envoy regenerates it;
/// reusing a client-chosen id would hand a replayed call the already settled
/// reservation of the first one, i.e. a free call.
pub fn request_id(x_request_id: Option<&str>, nonce: u64) -> String {
    match x_request_id
        .map(str::trim)
        .filter(|id| id.len() <= MAX_PREFIX_LEN && valid_request_id(id))
    {
        Some(id) => format!("{id}:{nonce:016x}"),
        None => format!("caracal-{nonce:016x}"),
    }
}

/// What a failed Authorize call (non-OK gRPC status) means.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallFailure {
    /// The service could not answer (unavailable, deadline, overload, internal error,
    /// wrong cluster): the failure mode decides.
    Unavailable,
    /// The service answered that the request itself is unacceptable: refused even on
    /// fail-open routes (otherwise a malformed request would be a free pass).
    Refuse(Refusal),
    /// The service does not accept this gateway (gateway token / certificate): a
    /// gateway misconfiguration the agent cannot fix, answered 503 and never failed
    /// open (an unauthenticated gateway must not become a free pass).
    GatewayRejected,
}

/// Maps a gRPC status code of a failed Authorize.
pub fn grpc_failure(status: u32) -> CallFailure {
    match status {
        // INVALID_ARGUMENT, OUT_OF_RANGE
        3 | 11 => CallFailure::Refuse(Refusal::InvalidRequest),
        // UNAUTHENTICATED, PERMISSION_DENIED: on the hot path only the gateway's own
        // credential is checked this way (agents are refused with a DENY answer).
        7 | 16 => CallFailure::GatewayRejected,
        // NOT_FOUND, FAILED_PRECONDITION
        5 | 9 => CallFailure::Refuse(Refusal::Denied),
        // ABORTED: the service is up but cannot decide this call now (Redis lost
        // the budget state; see the service's budget::state): 503, and never let
        // through, also when the gateway fails open on an unreachable service.
        10 => CallFailure::Refuse(Refusal::Unavailable),
        // CANCELLED, UNKNOWN, DEADLINE_EXCEEDED, ALREADY_EXISTS, RESOURCE_EXHAUSTED,
        // UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS, anything else
        _ => CallFailure::Unavailable,
    }
}

/// What the filter knows about a call when it asks Authorize.
#[derive(Clone, Debug)]
pub struct CallInfo<'a> {
    /// Idempotency key (Envoy's `x-request-id`).
    pub request_id: &'a str,
    /// The caller.
    pub identity: &'a Identity,
    /// `openai` / `anthropic`.
    pub provider: &'a str,
    /// Upstream host + path, e.g. `api.openai.com/v1/chat/completions`.
    pub resource: &'a str,
    /// The estimate (model and tokens).
    pub estimate: &'a Estimate,
}

/// The encoded `AuthorizeRequest`.
pub fn authorize_request(call: &CallInfo<'_>) -> Vec<u8> {
    AuthorizeRequest {
        request_id: call.request_id.to_owned(),
        credential: Some(call.identity.to_credential()),
        provider: call.provider.to_owned(),
        model: call.estimate.model.clone(),
        resource: call.resource.to_owned(),
        estimated_usage: Some(estimated_usage(call.estimate)),
        estimated_cost: None,
    }
    .encode_to_vec()
}

/// The estimate as token usage.
pub fn estimated_usage(e: &Estimate) -> TokenUsage {
    TokenUsage {
        input_tokens: e.input_tokens,
        output_tokens: e.output_tokens,
        cached_input_tokens: 0,
    }
}

/// The encoded `SettleRequest`.
pub fn settle_request(
    reservation_id: &str,
    usage: &TokenUsage,
    provider: &str,
    model: &str,
) -> Vec<u8> {
    SettleRequest {
        reservation_id: reservation_id.to_owned(),
        usage: Some(*usage),
        provider: provider.to_owned(),
        model: model.to_owned(),
        actual_cost: None,
    }
    .encode_to_vec()
}

/// The encoded `ReleaseRequest`.
pub fn release_request(reservation_id: &str, reason: &str) -> Vec<u8> {
    ReleaseRequest {
        reservation_id: reservation_id.to_owned(),
        reason: reason.to_owned(),
    }
    .encode_to_vec()
}

/// The encoded `ReleaseByRequestRequest`: the request id and credential of an
/// Authorize whose answer never came (or was unusable).
pub fn release_by_request_request(request_id: &str, identity: &Identity, reason: &str) -> Vec<u8> {
    ReleaseByRequestRequest {
        request_id: request_id.to_owned(),
        credential: Some(identity.to_credential()),
        reason: reason.to_owned(),
    }
    .encode_to_vec()
}

/// Whether a failed Settle / Release / ReleaseByRequest is worth sending again: the
/// service could not answer (the calls are idempotent by reservation / request id).
/// A refusal (invalid, unknown, already finished) will not change on a retry.
pub fn retryable(status: u32) -> bool {
    matches!(grpc_failure(status), CallFailure::Unavailable)
}

/// Attempts per Settle / Release / ReleaseByRequest: the first and 3 retries.
pub const MAX_ATTEMPTS: u32 = 4;
/// Wait before retry n (1-based): 200 ms, 400 ms, 800 ms (1.4 s in all, well inside
/// the reservation's expiry).
pub const BACKOFF_MS: [u64; 3] = [200, 400, 800];

/// How long to wait before sending a call again after its `failed_attempts`-th
/// failure; `None`: give up (not worth retrying, or out of attempts).
pub fn retry_delay_ms(failed_attempts: u32, retryable: bool) -> Option<u64> {
    if !retryable || failed_attempts == 0 || failed_attempts >= MAX_ATTEMPTS {
        return None;
    }
    let i = usize::try_from(failed_attempts - 1).ok()?;
    BACKOFF_MS.get(i).copied()
}

/// What an Authorize answer means for the request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Let the call through.
    Allow {
        /// Reservation to settle or release (empty: nothing reserved).
        reservation_id: String,
        /// Smallest remaining budget (decimal amount), for the response header.
        remaining: Option<String>,
    },
    /// Answer locally.
    Refuse {
        /// Why.
        refusal: Refusal,
        /// The service's message.
        message: String,
        /// Smallest remaining budget: (amount, currency).
        remaining: Option<(String, String)>,
    },
    /// The answer is unusable; treat like an unreachable service.
    Unusable(String),
}

/// Interprets the encoded `AuthorizeResponse`.
pub fn verdict(response: &[u8]) -> Verdict {
    let resp = match AuthorizeResponse::decode(response) {
        Ok(r) => r,
        Err(e) => return Verdict::Unusable(format!("undecodable AuthorizeResponse: {e}")),
    };
    match Decision::try_from(resp.decision) {
        Ok(Decision::Allow) => Verdict::Allow {
            reservation_id: resp.reservation_id,
            remaining: resp.min_remaining.as_ref().map(format_amount),
        },
        Ok(Decision::Deny) => {
            let refusal = match DenyReason::try_from(resp.reason) {
                Ok(DenyReason::BudgetExceeded) => Refusal::BudgetExceeded,
                Ok(DenyReason::NoPolicy) => Refusal::NoPolicy,
                Ok(DenyReason::CurrencyMismatch) => Refusal::CurrencyMismatch,
                Ok(DenyReason::UnknownAgent) => Refusal::Unauthenticated,
                Ok(DenyReason::NotAllowed) => Refusal::NotAllowed,
                Ok(DenyReason::NoPrice) => Refusal::NoPrice,
                Ok(DenyReason::RequestFinished) => Refusal::Denied,
                Ok(DenyReason::Unspecified) | Err(_) => Refusal::Denied,
            };
            Verdict::Refuse {
                refusal,
                message: resp.message,
                remaining: resp
                    .min_remaining
                    .as_ref()
                    .map(|m| (format_amount(m), m.currency.clone())),
            }
        }
        Ok(Decision::Unspecified) | Err(_) => Verdict::Unusable(format!(
            "AuthorizeResponse without a decision ({})",
            resp.decision
        )),
    }
}

/// The decimal amount of `m`: its `amount` text when well formed, else rendered from
/// the micro-units with at least two decimals (`12500000` -> `"12.50"`).
pub fn format_amount(m: &Money) -> String {
    let a = m.amount.trim();
    let digits = a.strip_prefix('-').unwrap_or(a);
    let well_formed = a.len() <= 32
        && digits.starts_with(|c: char| c.is_ascii_digit())
        && digits.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && digits.bytes().filter(|&b| b == b'.').count() <= 1;
    if well_formed {
        a.to_owned()
    } else {
        format_micros(m.micros)
    }
}

/// Micro-units as a decimal with 2 to 6 decimals.
pub fn format_micros(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let abs = micros.unsigned_abs();
    let units = abs / 1_000_000;
    let frac = format!("{:06}", abs % 1_000_000);
    let frac = frac.trim_end_matches('0');
    let frac = if frac.len() < 2 {
        format!("{frac:0<2}")
    } else {
        frac.to_owned()
    };
    format!("{sign}{units}.{frac}")
}

/// How a metered call ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Charge this usage.
    Settle(TokenUsage),
    /// Free the reservation, with the reason.
    Release(&'static str),
}

/// Decides how an allowed call ends.
///
/// - complete, usage seen -> Settle it;
/// - no response status, or an error status (>= 400), without usage -> Release
///   (`no_response` / `client_abort` / `upstream_error`);
/// - a success status (< 400) but incomplete (client reset, upstream cut, timeout)
///   -> the provider is working on (and billing) the call: Settle the larger of the
///   partial usage seen and the reserved estimate, per token kind (the output is
///   capped at the reservation, so the estimate bounds the real cost);
/// - a successful response without readable usage on a metered API -> Settle the
///   estimate (the reserved amount; a successful call is never free);
/// - otherwise (non-token APIs) -> Release `no_usage`.
pub fn outcome(
    status: Option<u32>,
    usage: Option<TokenUsage>,
    completed: bool,
    estimate: Option<TokenUsage>,
) -> Outcome {
    if completed {
        if let Some(u) = usage {
            return Outcome::Settle(u);
        }
    }
    let success = match status {
        None => {
            return match usage {
                Some(u) => Outcome::Settle(u),
                None if completed => Outcome::Release("no_response"),
                None => Outcome::Release("client_abort"),
            }
        }
        Some(s) => s < 400,
    };
    if !success {
        return match usage {
            Some(u) => Outcome::Settle(u),
            None => Outcome::Release("upstream_error"),
        };
    }
    let estimate = estimate.filter(|e| e.input_tokens > 0 || e.output_tokens > 0);
    match (usage, estimate) {
        (Some(u), Some(e)) => Outcome::Settle(larger(u, e)),
        (Some(u), None) => Outcome::Settle(u),
        (None, Some(e)) => Outcome::Settle(e),
        (None, None) => Outcome::Release(if completed {
            "no_usage"
        } else {
            "client_abort"
        }),
    }
}

/// Per token kind, the larger of partial usage `u` and estimate `e`; cached (cheaper)
/// input counts only when the input count itself comes from the usage.
fn larger(u: TokenUsage, e: TokenUsage) -> TokenUsage {
    TokenUsage {
        input_tokens: u.input_tokens.max(e.input_tokens),
        output_tokens: u.output_tokens.max(e.output_tokens),
        cached_input_tokens: if u.input_tokens >= e.input_tokens {
            u.cached_input_tokens
        } else {
            0
        },
    }
}

/// Settle, Release and ReleaseByRequest in one call: what a worker's root has queued.
pub const FINISH_BATCH: &str = "FinishBatch";
/// Calls per FinishBatch at most (the service accepts 512).
pub const MAX_BATCH: usize = 256;

/// What every call to the service carries about the agent call it is made for:
/// its x-request-id (logs) and its W3C traceparent (traces). Unary calls send
/// them as metadata, stream and batch calls as fields of each call.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CallTags {
    pub x_request_id: Option<String>,
    pub traceparent: Option<String>,
}

impl CallTags {
    /// Bytes of the tags' values (for sizing an encoded call).
    fn len(&self) -> usize {
        self.x_request_id.as_ref().map_or(0, String::len)
            + self.traceparent.as_ref().map_or(0, String::len)
    }
}

/// One queued call for [`finish_batch_request`]: the unary method it stands for and
/// its encoded request.
#[derive(Clone, Copy, Debug)]
pub struct BatchEntry<'a> {
    pub method: &'a str,
    pub message: &'a [u8],
    pub tags: &'a CallTags,
}

/// The encoded `FinishBatchRequest` of `entries`, built from the already encoded
/// unary requests (each goes into its `FinishCall` as it is: no decode, no copy of
/// the fields). `None` when a method has no place in a FinishBatch (Authorize).
pub fn finish_batch_request(entries: &[BatchEntry<'_>]) -> Option<Vec<u8>> {
    use prost::encoding::{encode_key, encode_varint, WireType};
    let field = |bytes: &mut Vec<u8>, tag: u32, value: &[u8]| {
        encode_key(tag, WireType::LengthDelimited, bytes);
        encode_varint(value.len() as u64, bytes);
        bytes.extend_from_slice(value);
    };
    let mut out = Vec::with_capacity(
        entries
            .iter()
            .map(|e| e.message.len() + e.tags.len() + 20)
            .sum(),
    );
    let mut call = Vec::new();
    for e in entries {
        // FinishCall: oneof call { settle = 1; release = 2; release_by_request = 3 },
        // x_request_id = 4, traceparent = 5.
        let tag = match e.method {
            SETTLE => 1,
            RELEASE => 2,
            RELEASE_BY_REQUEST => 3,
            _ => return None,
        };
        call.clear();
        field(&mut call, tag, e.message);
        if let Some(id) = &e.tags.x_request_id {
            field(&mut call, 4, id.as_bytes());
        }
        if let Some(tp) = &e.tags.traceparent {
            field(&mut call, 5, tp.as_bytes());
        }
        // FinishBatchRequest: repeated FinishCall calls = 1.
        field(&mut out, 1, &call);
    }
    Some(out)
}

/// The status of one batched call: the gRPC code its unary RPC would have had.
#[derive(Clone, PartialEq, prost::Message)]
pub struct BatchResult {
    #[prost(uint32, tag = "1")]
    pub code: u32,
    #[prost(string, tag = "2")]
    pub message: String,
}

/// `FinishBatchResponse`, reading only each result's status (the responses of the
/// calls, fields 3 and 4, are skipped unread).
#[derive(Clone, PartialEq, prost::Message)]
struct BatchResults {
    #[prost(message, repeated, tag = "1")]
    results: Vec<BatchResult>,
}

/// The per-call statuses of a FinishBatch answer; an error when it does not decode
/// or does not answer exactly `calls` calls.
pub fn finish_batch_results(response: &[u8], calls: usize) -> Result<Vec<BatchResult>, String> {
    let decoded = BatchResults::decode(response)
        .map_err(|e| format!("undecodable FinishBatchResponse: {e}"))?;
    if decoded.results.len() != calls {
        return Err(format!(
            "FinishBatchResponse answers {} calls, {calls} were sent",
            decoded.results.len()
        ));
    }
    Ok(decoded.results)
}

/// The W3C Trace Context header (and the gRPC metadata key of unary calls).
pub const TRACEPARENT: &str = "traceparent";

/// `value` when it is a W3C `traceparent` this filter passes on: version 00's
/// `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`, lowercase, ids not all
/// zero. A later version is read by its first four fields, as the spec says, and
/// only those 55 characters are passed on (a long header is not copied into every
/// call). Anything else is dropped rather than forwarded into the service's spans.
pub fn valid_traceparent(value: &str) -> Option<&str> {
    let v = value.trim();
    let b = v.as_bytes();
    let hex = |s: &[u8]| !s.is_empty() && s.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    let zero = |s: &[u8]| s.iter().all(|&c| c == b'0');
    if b.len() < 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let (version, trace, parent, flags) = (&b[0..2], &b[3..35], &b[36..52], &b[53..55]);
    let ok = hex(version)
        && version != b"ff"
        && (b.len() == 55 || (version != b"00" && b[55] == b'-'))
        && hex(trace)
        && !zero(trace)
        && hex(parent)
        && !zero(parent)
        && hex(flags);
    // The first 55 bytes are ASCII (checked above): a char boundary.
    ok.then(|| v.get(..55)).flatten()
}

/// A new `traceparent` for a call that came without one: trace id and parent id
/// from `random` (made non-zero), sampled flag as decided.
pub fn new_traceparent(random: [u64; 3], sampled: bool) -> String {
    let trace = (u128::from(random[0]) << 64 | u128::from(random[1])).max(1);
    let parent = random[2].max(1);
    format!(
        "00-{trace:032x}-{parent:016x}-{}",
        if sampled { "01" } else { "00" }
    )
}

/// The hot path's calls over one long-lived stream: a worker sends its Authorizes
/// on it (see `glue`'s `Lane`).
pub const CALL_STREAM: &str = "CallStream";

/// The encoded `StreamCall` of an Authorize: the encoded `AuthorizeRequest` goes in
/// as it is (field 3), tagged with `call_id` (field 1), the agent call's
/// x-request-id (field 2) and its W3C traceparent (field 7).
pub fn stream_authorize_call(call_id: u64, tags: &CallTags, authorize: &[u8]) -> Vec<u8> {
    use prost::encoding::{encode_key, encode_varint, WireType};
    let mut out = Vec::with_capacity(authorize.len() + tags.len() + 28);
    encode_key(1, WireType::Varint, &mut out);
    encode_varint(call_id, &mut out);
    if let Some(id) = &tags.x_request_id {
        encode_key(2, WireType::LengthDelimited, &mut out);
        encode_varint(id.len() as u64, &mut out);
        out.extend_from_slice(id.as_bytes());
    }
    if let Some(tp) = &tags.traceparent {
        encode_key(7, WireType::LengthDelimited, &mut out);
        encode_varint(tp.len() as u64, &mut out);
        out.extend_from_slice(tp.as_bytes());
    }
    encode_key(3, WireType::LengthDelimited, &mut out);
    encode_varint(authorize.len() as u64, &mut out);
    out.extend_from_slice(authorize);
    out
}

/// A `StreamResult` as the filter reads it: which call it answers, the gRPC status
/// its unary RPC would have had, and the `AuthorizeResponse` (field 4) still encoded,
/// for [`verdict`]. Settle / Release answers (fields 5, 6) are skipped unread.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StreamAnswer {
    #[prost(uint64, tag = "1")]
    pub call_id: u64,
    #[prost(uint32, tag = "2")]
    pub code: u32,
    #[prost(string, tag = "3")]
    pub message: String,
    #[prost(bytes = "vec", tag = "4")]
    pub authorize: Vec<u8>,
}

/// Decodes one message of the CallStream.
pub fn stream_answer(message: &[u8]) -> Result<StreamAnswer, String> {
    StreamAnswer::decode(message).map_err(|e| format!("undecodable StreamResult: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use caracal_proto::v1::{agent_credential::Kind, PolicyRemaining};

    fn money(micros: i64, amount: &str) -> Money {
        Money {
            currency: "USD".into(),
            micros,
            amount: amount.into(),
        }
    }

    #[test]
    fn request_ids() {
        let n = 0x0123_4567_89ab_cdef;
        assert_eq!(
            request_id(Some("6f1c7a52-0d8e-4c1b-9a55-3f2d9b1e7c10"), n),
            "6f1c7a52-0d8e-4c1b-9a55-3f2d9b1e7c10:0123456789abcdef"
        );
        assert_eq!(request_id(None, 1), "caracal-0000000000000001");
        assert_eq!(request_id(Some(""), 1), "caracal-0000000000000001");
        assert_eq!(request_id(Some("a/b"), 1), "caracal-0000000000000001");
        assert_eq!(
            request_id(Some(&"x".repeat(101)), 1),
            "caracal-0000000000000001"
        );
        assert_eq!(request_id(Some(" abc "), 2), "abc:0000000000000002");
        for id in [
            request_id(Some(&"y".repeat(100)), u64::MAX),
            request_id(None, u64::MAX),
        ] {
            assert!(valid_request_id(&id), "{id}");
        }
        // The same x-request-id never gives the same request id twice.
        assert_ne!(request_id(Some("r"), 1), request_id(Some("r"), 2));
    }

    #[test]
    fn grpc_failures() {
        for code in [1, 2, 4, 6, 8, 12, 13, 14, 15, 99] {
            assert_eq!(grpc_failure(code), CallFailure::Unavailable, "{code}");
        }
        assert_eq!(grpc_failure(10), CallFailure::Refuse(Refusal::Unavailable));
        assert_eq!(
            grpc_failure(3),
            CallFailure::Refuse(Refusal::InvalidRequest)
        );
        assert_eq!(
            grpc_failure(11),
            CallFailure::Refuse(Refusal::InvalidRequest)
        );
        assert_eq!(grpc_failure(16), CallFailure::GatewayRejected);
        assert_eq!(grpc_failure(7), CallFailure::GatewayRejected);
        for code in [5, 9] {
            assert_eq!(grpc_failure(code), CallFailure::Refuse(Refusal::Denied));
        }
    }

    #[test]
    fn grpc_upstream_encoding() {
        // field 1 (envoy_grpc), length 7, { field 1 (cluster_name), length 5, "authz" }
        assert_eq!(grpc_upstream("authz"), "\x0a\x07\x0a\x05authz");
        let long = "c".repeat(120);
        assert!(grpc_upstream(&long).ends_with(&long));
        assert!(grpc_upstream(&long).is_ascii());
        // Lengths past one varint byte are not UTF-8: the bare name is used.
        let too_long = "c".repeat(200);
        assert_eq!(grpc_upstream(&too_long), too_long);
    }

    #[test]
    fn authorize_request_fields() {
        let id = Identity::ApiKey("cak_k".into());
        let est = Estimate {
            model: "gpt-4o".into(),
            input_tokens: 12,
            output_tokens: 34,
            stream: true,
        };
        let bytes = authorize_request(&CallInfo {
            request_id: "req-1",
            identity: &id,
            provider: "openai",
            resource: "api.openai.com/v1/chat/completions",
            estimate: &est,
        });
        let r = AuthorizeRequest::decode(bytes.as_slice()).unwrap();
        assert_eq!(r.request_id, "req-1");
        assert_eq!(
            r.credential.unwrap().kind,
            Some(Kind::ApiKey("cak_k".into()))
        );
        assert_eq!(r.provider, "openai");
        assert_eq!(r.model, "gpt-4o");
        assert_eq!(r.resource, "api.openai.com/v1/chat/completions");
        assert_eq!(
            r.estimated_usage,
            Some(TokenUsage {
                input_tokens: 12,
                output_tokens: 34,
                cached_input_tokens: 0
            })
        );
        assert_eq!(r.estimated_cost, None);
    }

    #[test]
    fn settle_and_release_requests() {
        let u = TokenUsage {
            input_tokens: 1,
            output_tokens: 2,
            cached_input_tokens: 1,
        };
        let s =
            SettleRequest::decode(settle_request("res-1", &u, "anthropic", "claude").as_slice())
                .unwrap();
        assert_eq!(s.reservation_id, "res-1");
        assert_eq!(s.usage, Some(u));
        assert_eq!(
            (s.provider.as_str(), s.model.as_str()),
            ("anthropic", "claude")
        );
        let r =
            ReleaseRequest::decode(release_request("res-2", "upstream_error").as_slice()).unwrap();
        assert_eq!(
            (r.reservation_id.as_str(), r.reason.as_str()),
            ("res-2", "upstream_error")
        );
    }

    #[test]
    fn allow_verdict() {
        let resp = AuthorizeResponse {
            decision: Decision::Allow as i32,
            reservation_id: "res-9".into(),
            min_remaining: Some(money(12_500_000, "12.50")),
            remaining: vec![PolicyRemaining::default()],
            ..Default::default()
        };
        assert_eq!(
            verdict(&resp.encode_to_vec()),
            Verdict::Allow {
                reservation_id: "res-9".into(),
                remaining: Some("12.50".into())
            }
        );
        let resp = AuthorizeResponse {
            decision: Decision::Allow as i32,
            ..Default::default()
        };
        assert_eq!(
            verdict(&resp.encode_to_vec()),
            Verdict::Allow {
                reservation_id: String::new(),
                remaining: None
            }
        );
    }

    #[test]
    fn deny_reasons_map_to_refusals() {
        let table = [
            (DenyReason::BudgetExceeded, Refusal::BudgetExceeded),
            (DenyReason::NoPolicy, Refusal::NoPolicy),
            (DenyReason::CurrencyMismatch, Refusal::CurrencyMismatch),
            (DenyReason::UnknownAgent, Refusal::Unauthenticated),
            (DenyReason::NotAllowed, Refusal::NotAllowed),
            (DenyReason::NoPrice, Refusal::NoPrice),
            // A finished request id (a replay: the filter's ids carry a nonce).
            (DenyReason::RequestFinished, Refusal::Denied),
            (DenyReason::Unspecified, Refusal::Denied),
        ];
        for (reason, refusal) in table {
            let resp = AuthorizeResponse {
                decision: Decision::Deny as i32,
                reason: reason as i32,
                message: "nope".into(),
                min_remaining: Some(money(500_000, "")),
                ..Default::default()
            };
            assert_eq!(
                verdict(&resp.encode_to_vec()),
                Verdict::Refuse {
                    refusal,
                    message: "nope".into(),
                    remaining: Some(("0.50".into(), "USD".into()))
                }
            );
        }
        let resp = AuthorizeResponse {
            decision: Decision::Deny as i32,
            reason: 999,
            ..Default::default()
        };
        assert!(matches!(
            verdict(&resp.encode_to_vec()),
            Verdict::Refuse {
                refusal: Refusal::Denied,
                remaining: None,
                ..
            }
        ));
    }

    #[test]
    fn unusable_answers() {
        assert!(matches!(verdict(&[0xff, 0xff, 0xff]), Verdict::Unusable(_)));
        let resp = AuthorizeResponse::default();
        assert!(matches!(
            verdict(&resp.encode_to_vec()),
            Verdict::Unusable(_)
        ));
        let resp = AuthorizeResponse {
            decision: 42,
            ..Default::default()
        };
        assert!(matches!(
            verdict(&resp.encode_to_vec()),
            Verdict::Unusable(_)
        ));
        // An empty message decodes to the default (no decision).
        assert!(matches!(verdict(&[]), Verdict::Unusable(_)));
    }

    #[test]
    fn amounts() {
        assert_eq!(format_micros(12_500_000), "12.50");
        assert_eq!(format_micros(0), "0.00");
        assert_eq!(format_micros(1_234_567), "1.234567");
        assert_eq!(format_micros(-500_000), "-0.50");
        assert_eq!(format_micros(10), "0.00001");
        assert_eq!(format_micros(i64::MIN), "-9223372036854.775808");
        assert_eq!(format_amount(&money(1, "3.14")), "3.14");
        assert_eq!(format_amount(&money(1_000_000, "bogus")), "1.00");
        assert_eq!(format_amount(&money(1_000_000, "1.2.3")), "1.00");
        assert_eq!(format_amount(&money(1_000_000, "-")), "1.00");
        assert_eq!(format_amount(&money(1_000_000, "--1")), "1.00");
        assert_eq!(format_amount(&money(-1_000_000, "-1.5")), "-1.5");
        assert_eq!(format_amount(&money(1_000_000, "\r\n1")), "1");
        assert_eq!(format_amount(&money(2_000_000, "x\r\ny: z")), "2.00");
    }

    #[test]
    fn outcomes() {
        let u = TokenUsage {
            input_tokens: 5,
            output_tokens: 6,
            cached_input_tokens: 2,
        };
        let e = TokenUsage {
            input_tokens: 50,
            output_tokens: 60,
            cached_input_tokens: 0,
        };
        assert_eq!(
            outcome(Some(200), Some(u), true, Some(e)),
            Outcome::Settle(u)
        );
        // A 2xx cut short: never free; the estimate unless more was seen.
        assert_eq!(
            outcome(Some(200), Some(u), false, Some(e)),
            Outcome::Settle(e)
        );
        assert_eq!(
            outcome(Some(200), None, false, Some(e)),
            Outcome::Settle(e),
            "a client reset after the provider answered is charged"
        );
        let big = TokenUsage {
            input_tokens: 70,
            output_tokens: 10,
            cached_input_tokens: 30,
        };
        assert_eq!(
            outcome(Some(200), Some(big), false, Some(e)),
            Outcome::Settle(TokenUsage {
                input_tokens: 70,
                output_tokens: 60,
                cached_input_tokens: 30
            })
        );
        assert_eq!(
            outcome(Some(206), None, false, None),
            Outcome::Release("client_abort")
        );
        // No status, or an error status: released.
        assert_eq!(
            outcome(None, None, false, Some(e)),
            Outcome::Release("client_abort")
        );
        assert_eq!(
            outcome(Some(500), None, false, Some(e)),
            Outcome::Release("upstream_error")
        );
        assert_eq!(
            outcome(Some(500), None, true, Some(e)),
            Outcome::Release("upstream_error")
        );
        assert_eq!(
            outcome(Some(429), None, true, Some(e)),
            Outcome::Release("upstream_error")
        );
        // Usage seen on an error or without a status is still charged.
        assert_eq!(
            outcome(Some(400), Some(u), false, Some(e)),
            Outcome::Settle(u)
        );
        assert_eq!(outcome(None, Some(u), false, Some(e)), Outcome::Settle(u));
        assert_eq!(outcome(Some(200), None, true, Some(e)), Outcome::Settle(e));
        assert_eq!(
            outcome(Some(200), None, true, None),
            Outcome::Release("no_usage")
        );
        assert_eq!(
            outcome(Some(200), None, true, Some(TokenUsage::default())),
            Outcome::Release("no_usage")
        );
        assert_eq!(
            outcome(None, None, true, Some(e)),
            Outcome::Release("no_response")
        );
    }

    #[test]
    fn release_by_request_fields() {
        let id = Identity::ApiKey("cak_k".into());
        let r = ReleaseByRequestRequest::decode(
            release_by_request_request("req-7:00ff", &id, "authorize_failed").as_slice(),
        )
        .unwrap();
        assert_eq!(r.request_id, "req-7:00ff");
        assert_eq!(
            r.credential.unwrap().kind,
            Some(caracal_proto::v1::agent_credential::Kind::ApiKey(
                "cak_k".into()
            ))
        );
        assert_eq!(r.reason, "authorize_failed");
        assert!(retryable(14) && retryable(4) && retryable(13));
        let delays: Vec<_> = (0..6).map(|n| retry_delay_ms(n, true)).collect();
        assert_eq!(
            delays,
            [None, Some(200), Some(400), Some(800), None, None],
            "4 attempts in all"
        );
        assert_eq!(retry_delay_ms(1, false), None);
        assert!(!retryable(3) && !retryable(5) && !retryable(9) && !retryable(16));
    }

    #[test]
    fn a_finish_batch_carries_each_call_as_its_unary_request() {
        use caracal_proto::v1::{finish_call::Call, FinishBatchRequest};
        let usage = TokenUsage {
            input_tokens: 10,
            output_tokens: 5,
            cached_input_tokens: 2,
        };
        let settle = settle_request("rsv_1_ab", &usage, "openai", "gpt-4o");
        let release = release_request("rsv_2_cd", "upstream_error");
        let identity = Identity::ApiKey("cak_x".into());
        let by_request = release_by_request_request("req-9", &identity, "client_abort");
        let tags = |x: Option<&str>, tp: Option<&str>| CallTags {
            x_request_id: x.map(str::to_owned),
            traceparent: tp.map(str::to_owned),
        };
        let (a, none, c) = (
            tags(
                Some("trace-a"),
                Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            ),
            CallTags::default(),
            tags(Some("trace-c"), None),
        );
        let entries = [
            BatchEntry {
                method: SETTLE,
                message: &settle,
                tags: &a,
            },
            BatchEntry {
                method: RELEASE,
                message: &release,
                tags: &none,
            },
            BatchEntry {
                method: RELEASE_BY_REQUEST,
                message: &by_request,
                tags: &c,
            },
        ];
        let bytes = finish_batch_request(&entries).unwrap();
        let decoded = FinishBatchRequest::decode(bytes.as_slice()).unwrap();
        assert_eq!(decoded.calls.len(), 3);
        assert_eq!(
            decoded.calls[0].call,
            Some(Call::Settle(
                SettleRequest::decode(settle.as_slice()).unwrap()
            ))
        );
        assert_eq!(decoded.calls[0].x_request_id, "trace-a");
        assert_eq!(
            decoded.calls[0].traceparent,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        assert_eq!(decoded.calls[1].traceparent, "");
        assert_eq!(
            decoded.calls[1].call,
            Some(Call::Release(
                ReleaseRequest::decode(release.as_slice()).unwrap()
            ))
        );
        assert_eq!(decoded.calls[1].x_request_id, "");
        assert_eq!(
            decoded.calls[2].call,
            Some(Call::ReleaseByRequest(
                ReleaseByRequestRequest::decode(by_request.as_slice()).unwrap()
            ))
        );
        // Authorize has no place in a batch.
        let authorize = [BatchEntry {
            method: AUTHORIZE,
            message: &settle,
            tags: &none,
        }];
        assert!(finish_batch_request(&authorize).is_none());
        assert_eq!(finish_batch_request(&[]), Some(Vec::new()));
    }

    #[test]
    fn a_streamed_authorize_carries_its_tags() {
        use caracal_proto::v1::{stream_call::Call, StreamCall};
        let authorize = AuthorizeRequest {
            request_id: "req-1".into(),
            model: "gpt-4o".into(),
            ..Default::default()
        }
        .encode_to_vec();
        let tags = CallTags {
            x_request_id: Some("xr-1".into()),
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
        };
        let bytes = stream_authorize_call(7, &tags, &authorize);
        let call = StreamCall::decode(bytes.as_slice()).unwrap();
        assert_eq!(call.call_id, 7);
        assert_eq!(call.x_request_id, "xr-1");
        assert_eq!(
            call.traceparent,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        let Some(Call::Authorize(a)) = call.call else {
            panic!("not an Authorize: {:?}", call.call);
        };
        assert_eq!(a.request_id, "req-1");
        let bare = StreamCall::decode(
            stream_authorize_call(8, &CallTags::default(), &authorize).as_slice(),
        )
        .unwrap();
        assert_eq!(
            (bare.x_request_id.as_str(), bare.traceparent.as_str()),
            ("", "")
        );
    }

    #[test]
    fn traceparents_are_checked_before_they_are_passed_on() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(valid_traceparent(good), Some(good));
        assert_eq!(valid_traceparent(&format!(" {good} ")), Some(good));
        // A later version may append fields after a dash.
        let v1 = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra";
        assert_eq!(valid_traceparent(v1), Some(&v1[..55]));
        let long = format!("{}-{}", &v1[..55], "x".repeat(10_000));
        assert_eq!(valid_traceparent(&long).map(str::len), Some(55));
        for bad in [
            "",
            "00",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
        ] {
            assert_eq!(valid_traceparent(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn new_traceparents_are_valid_and_say_whether_sampled() {
        let t = new_traceparent([1, 2, 3], true);
        assert_eq!(t, "00-00000000000000010000000000000002-0000000000000003-01");
        assert_eq!(valid_traceparent(&t), Some(t.as_str()));
        let zero = new_traceparent([0, 0, 0], false);
        assert!(zero.ends_with("-00"), "{zero}");
        assert_eq!(valid_traceparent(&zero), Some(zero.as_str()));
    }

    #[test]
    fn finish_batch_results_read_the_codes_and_check_the_count() {
        use caracal_proto::v1::{
            finish_result::Response, FinishBatchResponse, FinishResult, SettleResponse,
        };
        let answer = FinishBatchResponse {
            results: vec![
                FinishResult {
                    code: 0,
                    message: String::new(),
                    response: Some(Response::Settle(SettleResponse {
                        already_settled: true,
                        ..Default::default()
                    })),
                },
                FinishResult {
                    code: 5,
                    message: "reservation rsv_x not found".into(),
                    response: None,
                },
            ],
        }
        .encode_to_vec();
        let results = finish_batch_results(&answer, 2).unwrap();
        assert_eq!(
            results,
            vec![
                BatchResult {
                    code: 0,
                    message: String::new()
                },
                BatchResult {
                    code: 5,
                    message: "reservation rsv_x not found".into()
                }
            ]
        );
        assert!(!retryable(results[1].code));
        // Fewer answers than calls, or garbage: an error (the calls are sent again).
        assert!(finish_batch_results(&answer, 3).is_err());
        assert!(finish_batch_results(&[0xff, 0xff, 0xff], 1).is_err());
    }
}
