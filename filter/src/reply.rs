//! Local replies in the provider's own error format, so SDKs raise their usual errors.
//!
//! OpenAI: `{"error":{"message":..,"type":..,"param":null,"code":..}}`.
//! Anthropic: `{"type":"error","error":{"type":..,"message":..}}`.
//!
//! | refusal | status | OpenAI type / code | Anthropic type |
//! |---|---|---|---|
//! | budget exceeded | 429 | `insufficient_quota` / `budget_exceeded` | `rate_limit_error` |
//! | no policy | 429 | `insufficient_quota` / `no_policy` | `rate_limit_error` |
//! | currency mismatch | 429 | `insufficient_quota` / `currency_mismatch` | `rate_limit_error` |
//! | unknown or missing identity | 401 | `invalid_request_error` / `invalid_api_key` | `authentication_error` |
//! | not on the allowlist | 403 | `permission_error` / `not_allowed` | `permission_error` |
//! | no price for the model | 403 | `permission_error` / `no_price` | `permission_error` |
//! | other refusal | 403 | `permission_error` / `denied` | `permission_error` |
//! | authorization unavailable | 503 | `server_error` / `authorization_unavailable` | `api_error` |
//! | body not JSON | 400 | `invalid_request_error` / `invalid_json` | `invalid_request_error` |
//! | request the service rejects as invalid | 400 | `invalid_request_error` / `invalid_request` | `invalid_request_error` |
//! | body too large | 413 | `invalid_request_error` / `request_too_large` | `request_too_large` |
//! | path matches no metered route / unreadable path | 404 | `invalid_request_error` / `unknown_route` | `not_found_error` |
//!
//! Every reply has `content-type: application/json`; budget replies carry
//! `x-caracal-remaining-budget` when the service reported it; refusals that a retry
//! cannot fix carry `x-should-retry: false`, which the OpenAI and Anthropic SDKs honour.

use serde_json::json;

use crate::config::Provider;

/// Why the filter answers locally.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A budget of the agent or an ancestor has no room (429).
    BudgetExceeded,
    /// The agent has no active policy (429).
    NoPolicy,
    /// The estimate's currency differs from a policy's (429).
    CurrencyMismatch,
    /// No or unknown credential (401).
    Unauthenticated,
    /// Resource or model not on the allowlist (403).
    NotAllowed,
    /// No price for the provider/model (403).
    NoPrice,
    /// A refusal without a known reason (403).
    Denied,
    /// The authorization service could not be asked (503).
    Unavailable,
    /// The request body is not what the API expects (400).
    BadRequest,
    /// The authorization service rejected the request as invalid (400).
    InvalidRequest,
    /// The request body is larger than `max_body_bytes` (413).
    TooLarge,
    /// The path matches no metered route (404): refused rather than passed to a
    /// provider unmetered.
    NoRoute,
}

impl Refusal {
    /// The HTTP status of the reply.
    pub fn status(&self) -> u32 {
        match self {
            Refusal::BudgetExceeded | Refusal::NoPolicy | Refusal::CurrencyMismatch => 429,
            Refusal::Unauthenticated => 401,
            Refusal::NotAllowed | Refusal::NoPrice | Refusal::Denied => 403,
            Refusal::Unavailable => 503,
            Refusal::BadRequest | Refusal::InvalidRequest => 400,
            Refusal::TooLarge => 413,
            Refusal::NoRoute => 404,
        }
    }

    /// OpenAI's `error.type` and `error.code`.
    fn openai_type_code(&self) -> (&'static str, &'static str) {
        match self {
            Refusal::BudgetExceeded => ("insufficient_quota", "budget_exceeded"),
            Refusal::NoPolicy => ("insufficient_quota", "no_policy"),
            Refusal::CurrencyMismatch => ("insufficient_quota", "currency_mismatch"),
            Refusal::Unauthenticated => ("invalid_request_error", "invalid_api_key"),
            Refusal::NotAllowed => ("permission_error", "not_allowed"),
            Refusal::NoPrice => ("permission_error", "no_price"),
            Refusal::Denied => ("permission_error", "denied"),
            Refusal::Unavailable => ("server_error", "authorization_unavailable"),
            Refusal::BadRequest => ("invalid_request_error", "invalid_json"),
            Refusal::InvalidRequest => ("invalid_request_error", "invalid_request"),
            Refusal::TooLarge => ("invalid_request_error", "request_too_large"),
            Refusal::NoRoute => ("invalid_request_error", "unknown_route"),
        }
    }

    /// Anthropic's `error.type`.
    fn anthropic_type(&self) -> &'static str {
        match self {
            Refusal::BudgetExceeded | Refusal::NoPolicy | Refusal::CurrencyMismatch => {
                "rate_limit_error"
            }
            Refusal::Unauthenticated => "authentication_error",
            Refusal::NotAllowed | Refusal::NoPrice | Refusal::Denied => "permission_error",
            Refusal::Unavailable => "api_error",
            Refusal::BadRequest | Refusal::InvalidRequest => "invalid_request_error",
            Refusal::TooLarge => "request_too_large",
            Refusal::NoRoute => "not_found_error",
        }
    }

    /// A short machine-readable name (the OpenAI code), also used in messages and logs.
    pub fn code(&self) -> &'static str {
        self.openai_type_code().1
    }

    fn retry_helps(&self) -> bool {
        matches!(self, Refusal::Unavailable)
    }
}

/// A local reply ready for `send_http_response`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalReply {
    /// HTTP status.
    pub status: u32,
    /// Response headers.
    pub headers: Vec<(String, String)>,
    /// JSON body.
    pub body: Vec<u8>,
}

/// Response header with the smallest remaining budget (decimal amount).
pub const REMAINING_BUDGET_HEADER: &str = "x-caracal-remaining-budget";
/// Response header with the reservation id.
pub const RESERVATION_ID_HEADER: &str = "x-caracal-reservation-id";

/// Builds the reply for `refusal` on a `provider` route. `message` is the human text;
/// for budget refusals `remaining` (decimal amount, e.g. `"0.50"`) and `currency` are
/// added to the message and the header.
pub fn build(
    provider: Provider,
    refusal: &Refusal,
    message: &str,
    remaining: Option<(&str, &str)>,
) -> LocalReply {
    let mut text = message.trim().to_owned();
    let budget = matches!(
        refusal,
        Refusal::BudgetExceeded | Refusal::NoPolicy | Refusal::CurrencyMismatch
    );
    if budget {
        if text.is_empty() {
            text = "Caracal budget exceeded".to_owned();
        }
        if let Some((amount, currency)) = remaining {
            text = format!("{text} (remaining budget: {amount} {currency})").replace("  ", " ");
        }
        text = format!("{text} [{}]", refusal.code());
    } else if text.is_empty() {
        text = format!("Request refused by Caracal [{}]", refusal.code());
    }
    let body = match provider {
        Provider::Openai => {
            let (ty, code) = refusal.openai_type_code();
            json!({"error": {"message": text, "type": ty, "param": null, "code": code}})
        }
        Provider::Anthropic => {
            json!({"type": "error", "error": {"type": refusal.anthropic_type(), "message": text}})
        }
    };
    let mut headers = vec![("content-type".to_owned(), "application/json".to_owned())];
    if budget {
        if let Some((amount, _)) = remaining {
            headers.push((REMAINING_BUDGET_HEADER.to_owned(), amount.to_owned()));
        }
    }
    if !refusal.retry_helps() {
        headers.push(("x-should-retry".to_owned(), "false".to_owned()));
    }
    LocalReply {
        status: refusal.status(),
        headers,
        body: serde_json::to_vec(&body).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn parse(r: &LocalReply) -> Value {
        serde_json::from_slice(&r.body).unwrap()
    }

    fn header<'a>(r: &'a LocalReply, name: &str) -> Option<&'a str> {
        r.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn openai_budget_exceeded() {
        let r = build(
            Provider::Openai,
            &Refusal::BudgetExceeded,
            "daily budget of agent bot exhausted",
            Some(("0.50", "USD")),
        );
        assert_eq!(r.status, 429);
        let v = parse(&r);
        let e = v["error"].as_object().unwrap();
        assert_eq!(e.len(), 4);
        assert_eq!(e["type"], "insufficient_quota");
        assert_eq!(e["code"], "budget_exceeded");
        assert_eq!(e["param"], Value::Null);
        let m = e["message"].as_str().unwrap();
        assert!(
            m.contains("0.50 USD") && m.contains("budget_exceeded"),
            "{m}"
        );
        assert_eq!(header(&r, "x-caracal-remaining-budget"), Some("0.50"));
        assert_eq!(header(&r, "content-type"), Some("application/json"));
        assert_eq!(header(&r, "x-should-retry"), Some("false"));
    }

    #[test]
    fn anthropic_budget_exceeded() {
        let r = build(
            Provider::Anthropic,
            &Refusal::BudgetExceeded,
            "",
            Some(("12.50", "EUR")),
        );
        assert_eq!(r.status, 429);
        let v = parse(&r);
        assert_eq!(v.as_object().unwrap().len(), 2);
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "rate_limit_error");
        let m = v["error"]["message"].as_str().unwrap();
        assert!(
            m.contains("budget_exceeded") && m.contains("12.50 EUR"),
            "{m}"
        );
        assert_eq!(header(&r, "x-caracal-remaining-budget"), Some("12.50"));
    }

    #[test]
    fn status_and_type_table() {
        let table = [
            (
                Refusal::BudgetExceeded,
                429,
                "insufficient_quota",
                "budget_exceeded",
                "rate_limit_error",
            ),
            (
                Refusal::NoPolicy,
                429,
                "insufficient_quota",
                "no_policy",
                "rate_limit_error",
            ),
            (
                Refusal::CurrencyMismatch,
                429,
                "insufficient_quota",
                "currency_mismatch",
                "rate_limit_error",
            ),
            (
                Refusal::Unauthenticated,
                401,
                "invalid_request_error",
                "invalid_api_key",
                "authentication_error",
            ),
            (
                Refusal::NotAllowed,
                403,
                "permission_error",
                "not_allowed",
                "permission_error",
            ),
            (
                Refusal::NoPrice,
                403,
                "permission_error",
                "no_price",
                "permission_error",
            ),
            (
                Refusal::Denied,
                403,
                "permission_error",
                "denied",
                "permission_error",
            ),
            (
                Refusal::Unavailable,
                503,
                "server_error",
                "authorization_unavailable",
                "api_error",
            ),
            (
                Refusal::BadRequest,
                400,
                "invalid_request_error",
                "invalid_json",
                "invalid_request_error",
            ),
            (
                Refusal::InvalidRequest,
                400,
                "invalid_request_error",
                "invalid_request",
                "invalid_request_error",
            ),
            (
                Refusal::TooLarge,
                413,
                "invalid_request_error",
                "request_too_large",
                "request_too_large",
            ),
            (
                Refusal::NoRoute,
                404,
                "invalid_request_error",
                "unknown_route",
                "not_found_error",
            ),
        ];
        for (refusal, status, oa_type, oa_code, an_type) in table {
            let r = build(Provider::Openai, &refusal, "msg \"quoted\" \n", None);
            assert_eq!(r.status, status);
            let v = parse(&r);
            assert_eq!(v["error"]["type"], oa_type);
            assert_eq!(v["error"]["code"], oa_code);
            assert!(v["error"]["param"].is_null());
            assert!(v["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("msg \"quoted\""));
            assert_eq!(header(&r, "x-caracal-remaining-budget"), None);
            assert_eq!(
                header(&r, "x-should-retry").is_some(),
                refusal != Refusal::Unavailable
            );
            let r = build(Provider::Anthropic, &refusal, "", None);
            assert_eq!(r.status, status);
            let v = parse(&r);
            assert_eq!(v["type"], "error");
            assert_eq!(v["error"]["type"], an_type);
            assert!(!v["error"]["message"].as_str().unwrap().is_empty());
        }
    }
}
