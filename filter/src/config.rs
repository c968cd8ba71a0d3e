//! The filter configuration: the JSON given as the plugin configuration in Envoy
//! (`typed_config.value.config.configuration`). Parsed and validated once by the root
//! context; an invalid configuration refuses to start the plugin.
//!
//! ```json
//! {
//!   "authz_cluster": "caracal_authz",
//!   "authz_timeout_ms": 200,
//!   "settle_timeout_ms": 2000,
//!   "failure_mode": "deny",
//!   "identity_sources": ["api_key", "spiffe", "jwt"],
//!   "jwt_metadata_namespace": "envoy.filters.http.jwt_authn",
//!   "jwt_payload_key": "jwt_payload",
//!   "jwt_claim": "sub",
//!   "max_body_bytes": 33554432,
//!   "default_max_output_tokens": 4096,
//!   "max_output_tokens_cap": 65536,
//!   "refuse_unmatched": true,
//!   "gateway_token": "dev-only-shared-secret",
//!   "log_level": "info",
//!   "trace_sampling_ratio": 0.0,
//!   "routes": [
//!     {"path_prefix": "/v1/messages", "provider": "anthropic", "upstream_host": "api.anthropic.com"},
//!     {"path_prefix": "/v1/", "provider": "openai", "upstream_host": "api.openai.com", "failure_mode": "allow"}
//!   ]
//! }
//! ```

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

/// What to do when the authorization service cannot be asked (unreachable, timeout,
/// unreadable answer).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureMode {
    /// Fail closed: answer 503 locally.
    Deny,
    /// Fail open: let the call through without a reservation (logged).
    Allow,
}

/// The LLM provider behind a route; decides the error format of local replies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// OpenAI and OpenAI-compatible APIs.
    Openai,
    /// Anthropic's Messages API.
    Anthropic,
}

impl Provider {
    /// The name sent to the authorization service (`AuthorizeRequest.provider`).
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Openai => "openai",
            Provider::Anthropic => "anthropic",
        }
    }
}

/// A trusted place the agent's identity may come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentitySource {
    /// A Caracal agent key: `x-caracal-agent-key`, `authorization: Bearer cak_...` or
    /// `x-api-key: cak_...`.
    ApiKey,
    /// The SPIFFE id in the mTLS peer certificate's URI SAN.
    Spiffe,
    /// A claim of a JWT verified by Envoy's jwt_authn filter (dynamic metadata).
    Jwt,
}

/// How much the filter logs (Envoy's own `wasm` log level filters further).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Everything, including each request's estimate and decision.
    Trace,
    /// Per-request decisions.
    Debug,
    /// Refusals and configuration.
    Info,
    /// Failures (fail-open, unsent Settle/Release).
    Warn,
    /// Errors only.
    Error,
}

/// One LLM route: requests whose path starts with `path_prefix` are metered.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Route {
    /// Path prefix, e.g. `/v1/chat/completions` or `/v1/`.
    pub path_prefix: String,
    /// Which provider's API (and error format) the route speaks.
    pub provider: Provider,
    /// Host part of the resource string sent to Authorize, e.g. `api.openai.com`.
    pub upstream_host: String,
    /// Overrides the global `failure_mode` for this route.
    #[serde(default)]
    pub failure_mode: Option<FailureMode>,
    /// Lets OpenAI Responses `background: true` through (refused by default: the
    /// usage of a background response never comes back through the gateway).
    #[serde(default)]
    pub allow_background: bool,
}

/// The validated filter configuration.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct Config {
    /// Envoy cluster (HTTP/2) of the authorization service.
    pub authz_cluster: String,
    /// `authz_cluster` as the encoded GrpcService every gRPC call names (see
    /// [`crate::authz::grpc_upstream`]): encoded once here, not per call.
    #[serde(skip)]
    pub authz_upstream: String,
    /// Deadline of the Authorize call, in milliseconds.
    #[serde(default = "default_authz_timeout_ms")]
    pub authz_timeout_ms: u64,
    /// Deadline of the Settle and Release calls, in milliseconds (off the request path).
    #[serde(default = "default_settle_timeout_ms")]
    pub settle_timeout_ms: u64,
    /// Global failure mode, see [`FailureMode`].
    #[serde(default = "default_failure_mode")]
    pub failure_mode: FailureMode,
    /// Identity sources, tried in this order; the first that yields an identity wins.
    #[serde(default = "default_identity_sources")]
    pub identity_sources: Vec<IdentitySource>,
    /// Dynamic-metadata namespace of the jwt_authn filter.
    #[serde(default = "default_jwt_metadata_namespace")]
    pub jwt_metadata_namespace: String,
    /// jwt_authn's `payload_in_metadata` key.
    #[serde(default = "default_jwt_payload_key")]
    pub jwt_payload_key: String,
    /// The claim naming the agent.
    #[serde(default = "default_jwt_claim")]
    pub jwt_claim: String,
    /// Largest request body read for estimation; larger requests get 413.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u64,
    /// Output tokens reserved when the request sets no limit (and written into the
    /// forwarded body as its limit).
    #[serde(default = "default_max_output_tokens")]
    pub default_max_output_tokens: u64,
    /// Largest output limit forwarded: a request asking for more is lowered to it.
    #[serde(default = "default_max_output_tokens_cap")]
    pub max_output_tokens_cap: u64,
    /// Refuse (404) requests that reach the filter without matching a route, instead
    /// of passing them through unmetered. The filter sits in front of the provider
    /// routes, so an unmatched request would reach a provider with its key injected;
    /// disable the filter per route (`typed_per_filter_config`) for non-LLM routes.
    #[serde(default = "default_true")]
    pub refuse_unmatched: bool,
    /// Sent as `x-caracal-gateway-token` metadata on every call to the authorization
    /// service (empty or absent: not sent), which refuses hot-path calls without an allowed gateway credential.
    /// For plain-TCP development setups; production authenticates the gateway with
    /// mTLS on the authz cluster (a client certificate whose SAN is on the service's
    /// gateway allowlist) and may leave this unset.
    #[serde(default)]
    pub gateway_token: Option<String>,
    /// LLM routes; the first matching prefix wins.
    pub routes: Vec<Route>,
    /// The filter's log level.
    #[serde(default = "default_log_level")]
    pub log_level: LogLevel,
    /// Traces: an agent call's W3C `traceparent` always reaches the authorization
    /// service (Authorize, Settle, Release), so their spans join the caller's trace.
    /// A call without one starts a trace here when this is above 0: a new
    /// `traceparent` (sampled with this probability) is added to the request, so
    /// the provider, the service and the consumers see the same trace.
    #[serde(default)]
    pub trace_sampling_ratio: f64,
}

fn default_authz_timeout_ms() -> u64 {
    200
}
fn default_settle_timeout_ms() -> u64 {
    2000
}
fn default_failure_mode() -> FailureMode {
    FailureMode::Deny
}
fn default_identity_sources() -> Vec<IdentitySource> {
    vec![IdentitySource::ApiKey]
}
fn default_jwt_metadata_namespace() -> String {
    "envoy.filters.http.jwt_authn".to_owned()
}
fn default_jwt_payload_key() -> String {
    "jwt_payload".to_owned()
}
fn default_jwt_claim() -> String {
    "sub".to_owned()
}
/// 32 MiB: what providers accept for a request with images (Anthropic's Messages API
/// refuses requests above 32 MB; OpenAI's image inputs are bounded by a similar total
/// payload), so multimodal agents are not refused by default.
fn default_max_body_bytes() -> u64 {
    32 * 1024 * 1024
}
fn default_max_output_tokens() -> u64 {
    4096
}
/// 65536: above every current model's usual output limits (GPT-4.1 32k, Claude
/// Sonnet 4 64k) so honest requests pass unchanged, while bounding what one call can
/// reserve and produce.
fn default_max_output_tokens_cap() -> u64 {
    65_536
}
fn default_true() -> bool {
    true
}
fn default_log_level() -> LogLevel {
    LogLevel::Info
}

/// Keys the configuration understands; anything else is reported as a warning.
const KNOWN_KEYS: &[&str] = &[
    "authz_cluster",
    "authz_timeout_ms",
    "settle_timeout_ms",
    "failure_mode",
    "identity_sources",
    "jwt_metadata_namespace",
    "jwt_payload_key",
    "jwt_claim",
    "max_body_bytes",
    "default_max_output_tokens",
    "max_output_tokens_cap",
    "refuse_unmatched",
    "gateway_token",
    "routes",
    "log_level",
    "trace_sampling_ratio",
];
const KNOWN_ROUTE_KEYS: &[&str] = &[
    "path_prefix",
    "provider",
    "upstream_host",
    "failure_mode",
    "allow_background",
];

/// Why a configuration was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid caracal filter configuration: {}", self.0)
    }
}

impl std::error::Error for ConfigError {}

fn invalid(msg: impl Into<String>) -> ConfigError {
    ConfigError(msg.into())
}

/// Longest accepted authorization deadline (60 s).
const MAX_TIMEOUT_MS: u64 = 60_000;

impl Config {
    /// Parses and validates the plugin configuration. Returns the configuration and
    /// warnings (unknown keys) to log.
    pub fn parse(bytes: &[u8]) -> Result<(Config, Vec<String>), ConfigError> {
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| invalid(format!("not JSON: {e}")))?;
        let warnings = unknown_keys(&value);
        let mut config: Config =
            serde_json::from_value(value).map_err(|e| invalid(format!("{e}")))?;
        config.validate()?;
        config.authz_upstream = crate::authz::grpc_upstream(&config.authz_cluster);
        Ok((config, warnings))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let cluster_ok = !self.authz_cluster.is_empty()
            && self.authz_cluster.len() <= 120
            && self.authz_cluster.bytes().all(|b| b.is_ascii_graphic());
        if !cluster_ok {
            return Err(invalid(
                "authz_cluster must be an Envoy cluster name (1-120 printable ASCII characters)",
            ));
        }
        for (name, ms) in [
            ("authz_timeout_ms", self.authz_timeout_ms),
            ("settle_timeout_ms", self.settle_timeout_ms),
        ] {
            if ms == 0 || ms > MAX_TIMEOUT_MS {
                return Err(invalid(format!(
                    "{name} must be between 1 and {MAX_TIMEOUT_MS}"
                )));
            }
        }
        if self.identity_sources.is_empty() {
            return Err(invalid("identity_sources must not be empty"));
        }
        for (i, s) in self.identity_sources.iter().enumerate() {
            if self.identity_sources[..i].contains(s) {
                return Err(invalid(format!("identity_sources lists {s:?} twice")));
            }
        }
        if self.identity_sources.contains(&IdentitySource::Jwt)
            && (self.jwt_metadata_namespace.is_empty()
                || self.jwt_payload_key.is_empty()
                || self.jwt_claim.is_empty())
        {
            return Err(invalid(
                "jwt_metadata_namespace, jwt_payload_key and jwt_claim must not be empty",
            ));
        }
        if self.max_body_bytes == 0 || self.max_body_bytes > u64::from(u32::MAX) {
            return Err(invalid("max_body_bytes must be between 1 and 4294967295"));
        }
        if self.default_max_output_tokens == 0 {
            return Err(invalid("default_max_output_tokens must be positive"));
        }
        if self.max_output_tokens_cap == 0 || self.max_output_tokens_cap > u64::from(u32::MAX) {
            return Err(invalid(
                "max_output_tokens_cap must be between 1 and 4294967295",
            ));
        }
        if let Some(t) = self.gateway_token() {
            // Sent as gRPC metadata: visible ASCII only.
            if t.len() > 512 || !t.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(invalid(
                    "gateway_token must be 1-512 visible ASCII characters (no spaces)",
                ));
            }
        }
        if !(0.0..=1.0).contains(&self.trace_sampling_ratio) {
            return Err(invalid("trace_sampling_ratio must be between 0 and 1"));
        }
        if self.routes.is_empty() {
            return Err(invalid("routes must list at least one LLM route"));
        }
        for (i, r) in self.routes.iter().enumerate() {
            if !r.path_prefix.starts_with('/') {
                return Err(invalid(format!(
                    "routes[{i}].path_prefix must start with '/'"
                )));
            }
            if r.upstream_host.trim().is_empty() || r.upstream_host.contains('/') {
                return Err(invalid(format!(
                    "routes[{i}].upstream_host must be a host name (no scheme or path)"
                )));
            }
        }
        Ok(())
    }

    /// The first route whose prefix the request path (query ignored) starts with.
    pub fn match_route(&self, path: &str) -> Option<&Route> {
        let path = strip_query(path);
        self.routes
            .iter()
            .find(|r| path.starts_with(&r.path_prefix))
    }

    /// The failure mode in force for `route`.
    pub fn failure_mode_for(&self, route: &Route) -> FailureMode {
        route.failure_mode.unwrap_or(self.failure_mode)
    }

    /// Deadline of the Authorize call.
    pub fn authz_timeout(&self) -> Duration {
        Duration::from_millis(self.authz_timeout_ms)
    }

    /// Deadline of Settle / Release.
    pub fn settle_timeout(&self) -> Duration {
        Duration::from_millis(self.settle_timeout_ms)
    }

    /// The output limits of requests.
    pub fn limits(&self) -> crate::estimate::Limits {
        crate::estimate::Limits {
            default_max_output_tokens: self.default_max_output_tokens,
            max_output_tokens_cap: self.max_output_tokens_cap,
        }
    }

    /// The gateway token, when one is configured (an empty one is none: templates
    /// render an unset token as `""`).
    pub fn gateway_token(&self) -> Option<&str> {
        self.gateway_token.as_deref().filter(|t| !t.is_empty())
    }
}

/// gRPC metadata name of the gateway token.
pub const GATEWAY_TOKEN_METADATA: &str = "x-caracal-gateway-token";

/// The path without its query string or fragment.
pub fn strip_query(path: &str) -> &str {
    match path.find(['?', '#']) {
        Some(i) => &path[..i],
        None => path,
    }
}

fn unknown_keys(value: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    let Some(obj) = value.as_object() else {
        return out;
    };
    for k in obj.keys() {
        if !KNOWN_KEYS.contains(&k.as_str()) {
            out.push(format!("unknown configuration key {k:?} ignored"));
        }
    }
    if let Some(routes) = obj.get("routes").and_then(|r| r.as_array()) {
        for (i, r) in routes.iter().enumerate() {
            for k in r.as_object().into_iter().flat_map(|o| o.keys()) {
                if !KNOWN_ROUTE_KEYS.contains(&k.as_str()) {
                    out.push(format!("unknown key {k:?} in routes[{i}] ignored"));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"{"authz_cluster":"authz","routes":[
        {"path_prefix":"/v1/chat/completions","provider":"openai","upstream_host":"api.openai.com"}]}"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let (c, warnings) = Config::parse(MINIMAL.as_bytes()).unwrap();
        assert!(warnings.is_empty());
        assert_eq!(c.authz_cluster, "authz");
        assert_eq!(c.authz_timeout_ms, 200);
        assert_eq!(c.settle_timeout_ms, 2000);
        assert_eq!(c.failure_mode, FailureMode::Deny);
        assert_eq!(c.identity_sources, vec![IdentitySource::ApiKey]);
        assert_eq!(c.jwt_metadata_namespace, "envoy.filters.http.jwt_authn");
        assert_eq!(c.jwt_payload_key, "jwt_payload");
        assert_eq!(c.jwt_claim, "sub");
        assert_eq!(c.max_body_bytes, 32 * 1024 * 1024);
        assert_eq!(c.default_max_output_tokens, 4096);
        assert_eq!(c.max_output_tokens_cap, 65_536);
        assert!(c.refuse_unmatched);
        assert_eq!(c.gateway_token(), None);
        assert!(!c.routes[0].allow_background);
        let json = MINIMAL.replace("\"routes\"", "\"gateway_token\":\"\",\"routes\"");
        let (c, _) = Config::parse(json.as_bytes()).unwrap();
        assert_eq!(c.gateway_token(), None, "empty = none");
        assert_eq!(c.routes[0].failure_mode, None);
        assert_eq!(c.log_level, LogLevel::Info);
        assert_eq!(c.authz_timeout(), Duration::from_millis(200));
        assert_eq!(c.trace_sampling_ratio, 0.0, "no traces started by default");
    }

    #[test]
    fn full_config() {
        let json = r#"{
          "authz_cluster": "caracal_authz", "authz_timeout_ms": 150, "settle_timeout_ms": 900,
          "failure_mode": "allow", "identity_sources": ["spiffe", "jwt", "api_key"],
          "jwt_metadata_namespace": "ns", "jwt_payload_key": "payload", "jwt_claim": "agent",
          "max_body_bytes": 2048, "default_max_output_tokens": 100, "log_level": "debug",
          "max_output_tokens_cap": 500, "refuse_unmatched": false, "gateway_token": "gw-t0ken",
          "trace_sampling_ratio": 0.25,
          "routes": [
            {"path_prefix": "/v1/messages", "provider": "anthropic", "upstream_host": "api.anthropic.com", "failure_mode": "deny"},
            {"path_prefix": "/v1/", "provider": "openai", "upstream_host": "api.openai.com", "allow_background": true}
          ]}"#;
        let (c, w) = Config::parse(json.as_bytes()).unwrap();
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(c.gateway_token(), Some("gw-t0ken"));
        assert_eq!(c.trace_sampling_ratio, 0.25);
        assert!(!c.refuse_unmatched);
        let l = c.limits();
        assert_eq!(
            (l.default_max_output_tokens, l.max_output_tokens_cap),
            (100, 500)
        );
        assert!(c.routes[1].allow_background);
        assert!(!c.routes[0].allow_background);
        assert_eq!(c.failure_mode, FailureMode::Allow);
        assert_eq!(c.log_level, LogLevel::Debug);
        assert_eq!(
            c.identity_sources,
            vec![
                IdentitySource::Spiffe,
                IdentitySource::Jwt,
                IdentitySource::ApiKey
            ]
        );
        let r = c.match_route("/v1/messages?beta=true").unwrap();
        assert_eq!(r.provider, Provider::Anthropic);
        assert_eq!(c.failure_mode_for(r), FailureMode::Deny);
        let r = c.match_route("/v1/chat/completions").unwrap();
        assert_eq!(r.provider, Provider::Openai);
        assert_eq!(c.failure_mode_for(r), FailureMode::Allow);
        assert!(c.match_route("/healthz").is_none());
        assert!(c.match_route("/v2/x").is_none());
    }

    #[test]
    fn first_matching_prefix_wins() {
        let json = r#"{"authz_cluster":"a","routes":[
            {"path_prefix":"/v1/","provider":"openai","upstream_host":"one"},
            {"path_prefix":"/v1/messages","provider":"anthropic","upstream_host":"two"}]}"#;
        let (c, _) = Config::parse(json.as_bytes()).unwrap();
        assert_eq!(c.match_route("/v1/messages").unwrap().upstream_host, "one");
    }

    #[test]
    fn unknown_keys_are_warnings() {
        let json = r#"{"authz_cluster":"a","colour":1,"routes":[
            {"path_prefix":"/v1/","provider":"openai","upstream_host":"h","x":2}]}"#;
        let (_, w) = Config::parse(json.as_bytes()).unwrap();
        assert_eq!(w.len(), 2, "{w:?}");
    }

    #[test]
    fn invalid_configs_are_refused() {
        let route = r#"{"path_prefix":"/v1/","provider":"openai","upstream_host":"h"}"#;
        let cases = [
            "".to_owned(),
            "[]".to_owned(),
            "{}".to_owned(),
            format!(r#"{{"routes":[{route}]}}"#),
            format!(r#"{{"authz_cluster":"","routes":[{route}]}}"#),
            format!(r#"{{"authz_cluster":"a b","routes":[{route}]}}"#),
            format!(r#"{{"authz_cluster":"caf\u00e9","routes":[{route}]}}"#),
            r#"{"authz_cluster":"a","routes":[]}"#.to_owned(),
            format!(r#"{{"authz_cluster":"a","authz_timeout_ms":0,"routes":[{route}]}}"#),
            format!(r#"{{"authz_cluster":"a","authz_timeout_ms":-5,"routes":[{route}]}}"#),
            format!(r#"{{"authz_cluster":"a","failure_mode":"maybe","routes":[{route}]}}"#),
            format!(r#"{{"authz_cluster":"a","identity_sources":[],"routes":[{route}]}}"#),
            format!(r#"{{"authz_cluster":"a","identity_sources":["password"],"routes":[{route}]}}"#),
            format!(
                r#"{{"authz_cluster":"a","identity_sources":["jwt","jwt"],"routes":[{route}]}}"#
            ),
            format!(r#"{{"authz_cluster":"a","max_body_bytes":0,"routes":[{route}]}}"#),
            format!(r#"{{"authz_cluster":"a","default_max_output_tokens":0,"routes":[{route}]}}"#),
            format!(r#"{{"authz_cluster":"a","max_output_tokens_cap":0,"routes":[{route}]}}"#),
            format!(r#"{{"authz_cluster":"a","gateway_token":"a b","routes":[{route}]}}"#),
            format!(r#"{{"authz_cluster":"a","gateway_token":"x\ny","routes":[{route}]}}"#),
            format!(r#"{{"authz_cluster":"a","trace_sampling_ratio":1.5,"routes":[{route}]}}"#),
            format!(r#"{{"authz_cluster":"a","trace_sampling_ratio":-0.1,"routes":[{route}]}}"#),
            r#"{"authz_cluster":"a","routes":[{"path_prefix":"v1","provider":"openai","upstream_host":"h"}]}"#.to_owned(),
            r#"{"authz_cluster":"a","routes":[{"path_prefix":"/v1","provider":"gemini","upstream_host":"h"}]}"#.to_owned(),
            r#"{"authz_cluster":"a","routes":[{"path_prefix":"/v1","provider":"openai","upstream_host":"https://h/x"}]}"#.to_owned(),
            r#"{"authz_cluster":"a","routes":[{"path_prefix":"/v1","provider":"openai"}]}"#.to_owned(),
        ];
        for c in cases {
            assert!(Config::parse(c.as_bytes()).is_err(), "accepted: {c}");
        }
    }

    #[test]
    fn strip_query_cuts_query_and_fragment() {
        assert_eq!(strip_query("/a/b?c=d"), "/a/b");
        assert_eq!(strip_query("/a#x"), "/a");
        assert_eq!(strip_query("/a"), "/a");
    }
}
