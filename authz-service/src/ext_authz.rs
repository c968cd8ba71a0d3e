//! Envoy's external-authorization API (`envoy.service.auth.v3.Authorization/Check`)
//! on top of the same hot path as `BudgetAuthorization/Authorize`.
//!
//! For gateways that run Envoy's stock `envoy.filters.http.ext_authz` filter instead of
//! the Caracal wasm filter. ext_authz sees neither the request body nor the response,
//! so it cannot estimate from tokens nor settle from usage: each route gives a FIXED
//! estimate in its per-route `check_settings.context_extensions`, and the reservation
//! is left to expire — the sweeper then charges the reserved amount (the default
//! on-expiry behaviour of a policy; a policy set to release on expiry would make such
//! calls free, so use charge-on-expiry policies for ext_authz routes).
//!
//! Context extensions (per route):
//! - `caracal_estimate_micros` (required): the amount reserved per call, micro-units.
//! - `caracal_currency` (default `USD`).
//! - `caracal_provider` (e.g. `openai`; also picks the error-body format), `caracal_model`
//!   (for model allowlists), `caracal_upstream_host` (the resource is
//!   `<upstream host><path>`; default: the request's Host).
//! - `caracal_identity_sources` (default `api_key,spiffe`): which trusted identities to
//!   accept: the agent key (`x-caracal-agent-key`, `Authorization: Bearer cak_...` or
//!   `x-api-key: cak_...`) and the mTLS peer's SPIFFE id that Envoy verified
//!   (`source.principal`).
//!
//! Answers: OK with `x-caracal-remaining-budget` / `x-caracal-reservation-id` response
//! headers, the agent key and every client `x-caracal-*` header removed before the
//! upstream; or a denied response in the provider's error format: 429 (budget), 401
//! (identity), 403 (allowlist, price), 500 (route misconfigured). A budget store that
//! is down is a gRPC error, so Envoy's `failure_mode_allow` / `status_on_error` decide.

use std::{collections::HashMap, sync::Arc};

use caracal_proto::v1::{
    self as pb, agent_credential::Kind as CredentialKind,
    budget_authorization_server::BudgetAuthorization,
};
use envoy_types::{
    ext_authz::v3::pb::{
        Authorization, CheckRequest, CheckResponse, DeniedHttpResponse, HeaderAppendAction,
        HeaderValue, HeaderValueOption, HttpResponse, HttpStatus, HttpStatusCode, OkHttpResponse,
    },
    pb::{
        envoy::service::auth::v3::attribute_context::{HttpRequest, Peer},
        google::rpc,
    },
};
use tonic::{Code, Request, Response, Status};
use uuid::Uuid;

use crate::{authorize::AuthorizationService, keys::KEY_PREFIX};

/// Header carrying a Caracal agent key.
pub const AGENT_KEY_HEADER: &str = "x-caracal-agent-key";

/// Context-extension keys read from the route's ext_authz per-route config.
pub mod ext {
    pub const ESTIMATE_MICROS: &str = "caracal_estimate_micros";
    pub const CURRENCY: &str = "caracal_currency";
    pub const PROVIDER: &str = "caracal_provider";
    pub const MODEL: &str = "caracal_model";
    pub const UPSTREAM_HOST: &str = "caracal_upstream_host";
    pub const IDENTITY_SOURCES: &str = "caracal_identity_sources";
}

/// The `Authorization/Check` service, sharing the hot path with `Authorize`.
pub struct ExtAuthzService {
    authz: Arc<AuthorizationService>,
}

impl ExtAuthzService {
    pub fn new(authz: Arc<AuthorizationService>) -> Self {
        Self { authz }
    }
}

/// What a route asks of Check, from its context extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RouteSettings {
    estimate_micros: i64,
    currency: String,
    provider: String,
    model: String,
    upstream_host: Option<String>,
    api_key: bool,
    spiffe: bool,
}

fn route_settings(ctx: &HashMap<String, String>) -> Result<RouteSettings, String> {
    let get = |k: &str| ctx.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
    let estimate_micros = match get(ext::ESTIMATE_MICROS) {
        None => {
            return Err(format!(
                "context extension {} is missing",
                ext::ESTIMATE_MICROS
            ))
        }
        Some(v) => v.parse::<i64>().ok().filter(|n| *n >= 0).ok_or_else(|| {
            format!(
                "{} must be a non-negative integer, got {v:?}",
                ext::ESTIMATE_MICROS
            )
        })?,
    };
    let (mut api_key, mut spiffe) = (false, false);
    for source in get(ext::IDENTITY_SOURCES)
        .unwrap_or("api_key,spiffe")
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        match source {
            "api_key" => api_key = true,
            "spiffe" => spiffe = true,
            other => {
                return Err(format!(
                    "{}: unknown identity source {other:?} (api_key, spiffe)",
                    ext::IDENTITY_SOURCES
                ))
            }
        }
    }
    Ok(RouteSettings {
        estimate_micros,
        currency: get(ext::CURRENCY).unwrap_or("USD").to_uppercase(),
        provider: get(ext::PROVIDER).unwrap_or_default().to_lowercase(),
        model: get(ext::MODEL).unwrap_or_default().to_owned(),
        upstream_host: get(ext::UPSTREAM_HOST).map(str::to_owned),
        api_key,
        spiffe,
    })
}

/// A request header by (lower-case) name, from the parsed map or the raw map
/// (`encode_raw_headers: true`).
fn header(http: &HttpRequest, name: &str) -> Option<String> {
    if let Some(v) = http.headers.get(name) {
        return Some(v.clone());
    }
    http.header_map.as_ref().and_then(|m| {
        m.headers.iter().find_map(|h| {
            if !h.key.eq_ignore_ascii_case(name) {
                return None;
            }
            if h.raw_value.is_empty() {
                Some(h.value.clone())
            } else {
                String::from_utf8(h.raw_value.clone()).ok()
            }
        })
    })
}

/// The agent call's `traceparent`: the Check's own (Envoy's span) first, then the
/// request's header.
fn trace_of(metadata: Option<&str>, http: &HttpRequest) -> Option<String> {
    metadata
        .map(str::to_owned)
        .or_else(|| header(http, caracal_service_kit::telemetry::TRACEPARENT))
}

/// All request header names (lower-case).
fn header_names(http: &HttpRequest) -> Vec<String> {
    let mut names: Vec<String> = http
        .headers
        .keys()
        .map(|k| k.to_ascii_lowercase())
        .collect();
    if let Some(m) = &http.header_map {
        names.extend(m.headers.iter().map(|h| h.key.to_ascii_lowercase()));
    }
    names.sort();
    names.dedup();
    names
}

/// The agent key in `Authorization: Bearer cak_...`, if that is what it holds.
fn bearer_agent_key(http: &HttpRequest) -> Option<String> {
    let value = header(http, "authorization")?;
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && token.starts_with(KEY_PREFIX))
        .then(|| token.to_owned())
}

/// The agent key in `x-api-key: cak_...` (how the Anthropic SDKs send their key).
fn x_api_agent_key(http: &HttpRequest) -> Option<String> {
    let value = header(http, "x-api-key")?;
    let token = value.trim();
    token.starts_with(KEY_PREFIX).then(|| token.to_owned())
}

/// The caller's identity, from trusted sources only.
fn credential(
    settings: &RouteSettings,
    http: &HttpRequest,
    source: Option<&Peer>,
) -> Option<pb::AgentCredential> {
    if settings.api_key {
        let key = header(http, AGENT_KEY_HEADER)
            .map(|k| k.trim().to_owned())
            .filter(|k| !k.is_empty())
            .or_else(|| bearer_agent_key(http))
            .or_else(|| x_api_agent_key(http));
        if let Some(key) = key {
            return Some(pb::AgentCredential {
                kind: Some(CredentialKind::ApiKey(key)),
            });
        }
    }
    if settings.spiffe {
        // Envoy fills `principal` from the VERIFIED peer certificate (URI SAN first).
        // Trusted only because the caller of Check is an authenticated gateway (the
        // gateway interceptor in `server.rs` refuses everyone else).
        if let Some(id) = source
            .map(|p| p.principal.trim())
            .filter(|p| p.starts_with("spiffe://"))
        {
            return Some(pb::AgentCredential {
                kind: Some(CredentialKind::Verified(pb::VerifiedIdentity {
                    kind: "spiffe".to_owned(),
                    value: id.to_owned(),
                    issuer: String::new(),
                })),
            });
        }
    }
    None
}

fn header_option(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_owned(),
            value: value.to_owned(),
            raw_value: Vec::new(),
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

fn rpc_status(code: Code, message: &str) -> Option<rpc::Status> {
    Some(rpc::Status {
        code: code as i32,
        message: message.to_owned(),
        details: Vec::new(),
    })
}

/// A refusal: HTTP status, OpenAI-style `error.type` / `error.code`, Anthropic-style type.
struct Refusal {
    http: HttpStatusCode,
    openai_type: &'static str,
    code: &'static str,
    anthropic_type: &'static str,
}

fn refusal(reason: pb::DenyReason) -> Refusal {
    use pb::DenyReason as R;
    let (http, openai_type, code, anthropic_type) = match reason {
        R::BudgetExceeded | R::Unspecified => (
            HttpStatusCode::TooManyRequests,
            "insufficient_quota",
            "budget_exceeded",
            "rate_limit_error",
        ),
        R::NoPolicy => (
            HttpStatusCode::TooManyRequests,
            "insufficient_quota",
            "no_policy",
            "rate_limit_error",
        ),
        R::CurrencyMismatch => (
            HttpStatusCode::TooManyRequests,
            "insufficient_quota",
            "currency_mismatch",
            "rate_limit_error",
        ),
        R::UnknownAgent => (
            HttpStatusCode::Unauthorized,
            "invalid_request_error",
            "invalid_api_key",
            "authentication_error",
        ),
        R::NotAllowed => (
            HttpStatusCode::Forbidden,
            "permission_error",
            "not_allowed",
            "permission_error",
        ),
        R::NoPrice => (
            HttpStatusCode::Forbidden,
            "permission_error",
            "no_price",
            "permission_error",
        ),
        // A reused request id whose reservation is already finished: never a free call.
        R::RequestFinished => (
            HttpStatusCode::Conflict,
            "invalid_request_error",
            "request_finished",
            "invalid_request_error",
        ),
    };
    Refusal {
        http,
        openai_type,
        code,
        anthropic_type,
    }
}

/// A local reply in the provider's error format (so SDKs raise their usual error),
/// plus a `caracal` object with the decision details.
fn error_body(
    provider: &str,
    r: &Refusal,
    message: &str,
    answer: Option<&pb::AuthorizeResponse>,
) -> String {
    let caracal = serde_json::json!({
        "code": r.code,
        "agent_id": answer.map(|a| a.agent_id.as_str()).unwrap_or_default(),
        "policy_id": answer.map(|a| a.policy_id.as_str()).unwrap_or_default(),
        "remaining": answer.and_then(|a| a.min_remaining.as_ref()).map(|m| m.amount.as_str()),
        "remaining_micros": answer.and_then(|a| a.min_remaining.as_ref()).map(|m| m.micros),
        "currency": answer.and_then(|a| a.min_remaining.as_ref()).map(|m| m.currency.as_str()),
    });
    let body = if provider == "anthropic" {
        serde_json::json!({
            "type": "error",
            "error": {"type": r.anthropic_type, "message": format!("{}: {message}", r.code)},
            "caracal": caracal,
        })
    } else {
        serde_json::json!({
            "error": {"message": message, "type": r.openai_type, "param": null, "code": r.code},
            "caracal": caracal,
        })
    };
    body.to_string()
}

fn denied(
    provider: &str,
    r: &Refusal,
    message: &str,
    answer: Option<&pb::AuthorizeResponse>,
) -> CheckResponse {
    let grpc = if r.http == HttpStatusCode::Unauthorized {
        Code::Unauthenticated
    } else {
        Code::PermissionDenied
    };
    let mut headers = vec![header_option("content-type", "application/json")];
    // The same refusal would come back: tell the OpenAI/Anthropic SDKs not to retry.
    headers.push(header_option("x-should-retry", "false"));
    if let Some(m) = answer.and_then(|a| a.min_remaining.as_ref()) {
        headers.push(header_option("x-caracal-remaining-budget", &m.amount));
    }
    CheckResponse {
        status: rpc_status(grpc, message),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus {
                code: r.http as i32,
            }),
            headers,
            body: error_body(provider, r, message, answer),
        })),
        ..Default::default()
    }
}

fn misconfigured(provider: &str, message: &str) -> CheckResponse {
    tracing::warn!(%message, "ext_authz route misconfigured; refusing");
    let r = Refusal {
        http: HttpStatusCode::InternalServerError,
        openai_type: "server_error",
        code: "caracal_misconfigured",
        anthropic_type: "api_error",
    };
    let mut response = denied(provider, &r, message, None);
    response.status = rpc_status(Code::FailedPrecondition, message);
    response
}

/// Headers that must not reach the upstream: the agent key (either form) and every
/// client-supplied `x-caracal-*` header.
fn headers_to_remove(http: &HttpRequest) -> Vec<String> {
    let mut remove: Vec<String> = header_names(http)
        .into_iter()
        .filter(|n| n.starts_with("x-caracal-"))
        .collect();
    if !remove.iter().any(|n| n == AGENT_KEY_HEADER) {
        remove.push(AGENT_KEY_HEADER.to_owned());
    }
    if bearer_agent_key(http).is_some() {
        remove.push("authorization".to_owned());
    }
    if x_api_agent_key(http).is_some() {
        remove.push("x-api-key".to_owned());
    }
    remove
}

impl ExtAuthzService {
    async fn check_inner(
        &self,
        req: CheckRequest,
        metadata_traceparent: Option<String>,
    ) -> Result<CheckResponse, Status> {
        let attributes = req.attributes.unwrap_or_default();
        let http = attributes.request.and_then(|r| r.http).unwrap_or_default();
        let settings = match route_settings(&attributes.context_extensions) {
            Ok(s) => s,
            Err(message) => {
                let provider = attributes
                    .context_extensions
                    .get(ext::PROVIDER)
                    .cloned()
                    .unwrap_or_default();
                return Ok(misconfigured(&provider, &message));
            }
        };
        let provider = settings.provider.clone();
        let Some(credential) = credential(&settings, &http, attributes.source.as_ref()) else {
            return Ok(denied(
                &provider,
                &refusal(pb::DenyReason::UnknownAgent),
                "missing agent credential (x-caracal-agent-key, Authorization: Bearer cak_..., or a SPIFFE client certificate)",
                None,
            ));
        };
        let path = http.path.split('?').next().unwrap_or_default();
        let host = settings.upstream_host.as_deref().unwrap_or(&http.host);
        let authorize = pb::AuthorizeRequest {
            // Fresh per Check: a client-chosen id (x-request-id) must never make a call
            // look like a retry of an already-reserved one.
            request_id: format!("xa-{}", Uuid::now_v7().simple()),
            credential: Some(credential),
            provider: settings.provider.clone(),
            model: settings.model.clone(),
            resource: format!("{host}{path}"),
            estimated_usage: None,
            estimated_cost: Some(pb::Money {
                currency: settings.currency.clone(),
                micros: settings.estimate_micros,
                amount: String::new(),
            }),
        };
        let mut request = Request::new(authorize);
        // The agent call's trace: its Authorize span is a child of the call's
        // traceparent (the Check's metadata when Envoy's tracer set it, else the
        // HTTP request's own header).
        if caracal_service_kit::telemetry::enabled() {
            let traceparent = trace_of(metadata_traceparent.as_deref(), &http);
            if let Some(value) = traceparent.and_then(|t| t.parse().ok()) {
                request
                    .metadata_mut()
                    .insert(caracal_service_kit::telemetry::TRACEPARENT, value);
            }
        }
        let answer = match self.authz.authorize(request).await {
            Ok(r) => r.into_inner(),
            // The route's own settings are wrong (e.g. a bad currency): fail closed.
            Err(s) if s.code() == Code::InvalidArgument => {
                return Ok(misconfigured(&provider, s.message()))
            }
            // Budget store down etc.: Envoy's failure_mode_allow / status_on_error decide.
            Err(s) => return Err(s),
        };
        if answer.decision != pb::Decision::Allow as i32 {
            let reason =
                pb::DenyReason::try_from(answer.reason).unwrap_or(pb::DenyReason::Unspecified);
            return Ok(denied(
                &provider,
                &refusal(reason),
                &answer.message.clone(),
                Some(&answer),
            ));
        }
        let mut response_headers = vec![header_option(
            "x-caracal-reservation-id",
            &answer.reservation_id,
        )];
        if let Some(m) = &answer.min_remaining {
            response_headers.push(header_option("x-caracal-remaining-budget", &m.amount));
        }
        Ok(CheckResponse {
            status: rpc_status(Code::Ok, ""),
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                headers_to_remove: headers_to_remove(&http),
                response_headers_to_add: response_headers,
                ..Default::default()
            })),
            ..Default::default()
        })
    }
}

#[tonic::async_trait]
impl Authorization for ExtAuthzService {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let traceparent = crate::authorize::metadata_traceparent(&request).map(str::to_owned);
        self.check_inner(request.into_inner(), traceparent)
            .await
            .map(Response::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(headers: &[(&str, &str)]) -> HttpRequest {
        HttpRequest {
            headers: headers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..Default::default()
        }
    }

    fn ctx(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn settings_need_an_estimate() {
        assert!(route_settings(&ctx(&[])).is_err());
        assert!(route_settings(&ctx(&[(ext::ESTIMATE_MICROS, "-1")])).is_err());
        assert!(route_settings(&ctx(&[(ext::ESTIMATE_MICROS, "x")])).is_err());
        let s = route_settings(&ctx(&[(ext::ESTIMATE_MICROS, "1500")])).unwrap();
        assert_eq!(s.estimate_micros, 1500);
        assert_eq!(s.currency, "USD");
        assert!(s.api_key && s.spiffe);
        let s = route_settings(&ctx(&[
            (ext::ESTIMATE_MICROS, "1"),
            (ext::IDENTITY_SOURCES, "spiffe"),
        ]))
        .unwrap();
        assert!(!s.api_key && s.spiffe);
        assert!(route_settings(&ctx(&[
            (ext::ESTIMATE_MICROS, "1"),
            (ext::IDENTITY_SOURCES, "cookie"),
        ]))
        .is_err());
    }

    #[test]
    fn identity_from_trusted_sources_only() {
        let s = route_settings(&ctx(&[(ext::ESTIMATE_MICROS, "1")])).unwrap();
        let key = |c: Option<pb::AgentCredential>| match c.and_then(|c| c.kind) {
            Some(CredentialKind::ApiKey(k)) => Some(k),
            _ => None,
        };
        assert_eq!(
            key(credential(&s, &http(&[(AGENT_KEY_HEADER, "cak_a")]), None)),
            Some("cak_a".to_owned())
        );
        assert_eq!(
            key(credential(
                &s,
                &http(&[("authorization", "Bearer cak_b")]),
                None
            )),
            Some("cak_b".to_owned())
        );
        assert_eq!(
            key(credential(&s, &http(&[("x-api-key", "cak_c")]), None)),
            Some("cak_c".to_owned())
        );
        // A provider key in Authorization is not an agent identity.
        assert!(credential(&s, &http(&[("authorization", "Bearer sk-x")]), None).is_none());
        // A principal that is not a SPIFFE id is ignored.
        let peer = |p: &str| Peer {
            principal: p.to_owned(),
            ..Default::default()
        };
        assert!(credential(&s, &http(&[]), Some(&peer("CN=agent"))).is_none());
        let c = credential(&s, &http(&[]), Some(&peer("spiffe://td/ns/a/sa/b")));
        assert!(matches!(
            c.and_then(|c| c.kind),
            Some(CredentialKind::Verified(v)) if v.kind == "spiffe" && v.value == "spiffe://td/ns/a/sa/b"
        ));
    }

    #[test]
    fn the_trace_comes_from_the_check_then_the_request() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let h = http(&[("traceparent", tp)]);
        assert_eq!(
            trace_of(Some("from-envoy"), &h).as_deref(),
            Some("from-envoy")
        );
        assert_eq!(trace_of(None, &h).as_deref(), Some(tp));
        assert_eq!(trace_of(None, &http(&[("x-request-id", "r")])), None);
    }

    #[test]
    fn agent_key_and_client_caracal_headers_are_removed() {
        let h = http(&[
            ("authorization", "Bearer cak_x"),
            ("x-caracal-remaining-budget", "999"),
            ("x-caracal-agent-id", "someone"),
            ("content-type", "application/json"),
        ]);
        let removed = headers_to_remove(&h);
        for name in [
            "authorization",
            "x-caracal-remaining-budget",
            "x-caracal-agent-id",
            AGENT_KEY_HEADER,
        ] {
            assert!(removed.iter().any(|r| r == name), "{name} kept");
        }
        assert!(!removed.iter().any(|r| r == "content-type"));
        // A provider key in Authorization is left alone (the injector overwrites it).
        assert!(
            !headers_to_remove(&http(&[("authorization", "Bearer sk-1")]))
                .iter()
                .any(|r| r == "authorization")
        );
    }

    #[test]
    fn budget_refusal_is_an_openai_429() {
        let r = refusal(pb::DenyReason::BudgetExceeded);
        assert_eq!(r.http, HttpStatusCode::TooManyRequests);
        let body: serde_json::Value =
            serde_json::from_str(&error_body("openai", &r, "no room", None)).unwrap();
        assert_eq!(body["error"]["type"], "insufficient_quota");
        assert_eq!(body["error"]["code"], "budget_exceeded");
        let body: serde_json::Value =
            serde_json::from_str(&error_body("anthropic", &r, "no room", None)).unwrap();
        assert_eq!(body["type"], "error");
        assert_eq!(body["error"]["type"], "rate_limit_error");
    }
}
