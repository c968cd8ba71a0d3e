//! Who is calling, from trusted sources only, and which request headers must not reach
//! the upstream.
//!
//! Sources (tried in the configured `identity_sources` order):
//! - `api_key`: a Caracal agent key `cak_...` in `x-caracal-agent-key`, in
//!   `authorization: Bearer cak_...`, or in `x-api-key: cak_...` (what the Anthropic SDK
//!   sends for `api_key=`), first found in that order.
//! - `spiffe`: the URI SAN of the mTLS peer certificate (Envoy property
//!   `connection.uri_san_peer_certificate`); only `spiffe://` ids are accepted.
//! - `jwt`: a claim of a JWT that Envoy's `jwt_authn` filter verified and stored with
//!   `payload_in_metadata` (property `metadata.filter_metadata.<namespace>.<payload_key>.<claim>`),
//!   with the token's issuer (`iss`, same payload): an agent is bound to (issuer, claim),
//!   so one trusted issuer cannot speak for another's subject. No `iss`, no identity.
//!
//! Header hygiene: every `x-caracal-*` request header is client-supplied and stripped,
//! as is any header carrying an agent key, so the key never reaches the provider (Envoy
//! injects the provider key afterwards). `accept-encoding` is removed too, so the
//! provider answers uncompressed and the filter can read the token usage.

use caracal_proto::v1::{agent_credential::Kind, AgentCredential, VerifiedIdentity};

use crate::config::IdentitySource;

/// Prefix of Caracal agent keys.
pub const AGENT_KEY_PREFIX: &str = "cak_";
/// Dedicated header for the agent key.
pub const AGENT_KEY_HEADER: &str = "x-caracal-agent-key";
/// Prefix of Caracal's own headers; never trusted from a client.
pub const CARACAL_HEADER_PREFIX: &str = "x-caracal-";
/// Longest identity value accepted (keys, SPIFFE ids and claims are far shorter).
const MAX_IDENTITY_LEN: usize = 2048;

/// An identified caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identity {
    /// A Caracal agent key.
    ApiKey(String),
    /// A SPIFFE id from the verified peer certificate.
    Spiffe(String),
    /// A claim of a verified JWT, with the issuer that signed it.
    Jwt { issuer: String, claim: String },
}

impl Identity {
    /// The credential for `AuthorizeRequest.credential`.
    pub fn to_credential(&self) -> AgentCredential {
        let kind = match self {
            Identity::ApiKey(k) => Kind::ApiKey(k.clone()),
            Identity::Spiffe(v) => Kind::Verified(VerifiedIdentity {
                kind: "spiffe".to_owned(),
                value: v.clone(),
                issuer: String::new(),
            }),
            Identity::Jwt { issuer, claim } => Kind::Verified(VerifiedIdentity {
                kind: "jwt".to_owned(),
                value: claim.clone(),
                issuer: issuer.clone(),
            }),
        };
        AgentCredential { kind: Some(kind) }
    }

    /// A loggable description that never contains the secret key.
    pub fn describe(&self) -> String {
        match self {
            Identity::ApiKey(k) => {
                let shown: String = k.chars().take(8).collect();
                format!("api_key {shown}…")
            }
            Identity::Spiffe(v) => format!("spiffe {v}"),
            Identity::Jwt { issuer, claim } => format!("jwt {claim} (iss {issuer})"),
        }
    }
}

/// What to do with the request headers of a metered request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderPlan {
    /// Header names (lower case) to remove before the request goes upstream.
    pub remove: Vec<String>,
    /// The agent key found in the headers, if any.
    pub api_key: Option<String>,
}

/// Plans the header hygiene and finds the agent key. `headers` are (name, value) pairs
/// as Envoy gives them (names lower case; compared case-insensitively anyway).
pub fn plan_request_headers(headers: &[(String, Vec<u8>)]) -> HeaderPlan {
    let mut plan = HeaderPlan::default();
    let mut from_dedicated = None;
    let mut from_bearer = None;
    let mut from_x_api_key = None;
    for (name, value) in headers {
        let lower = name.to_ascii_lowercase();
        let remove = if lower.starts_with(CARACAL_HEADER_PREFIX) {
            if lower == AGENT_KEY_HEADER && from_dedicated.is_none() {
                from_dedicated = agent_key(value);
            }
            true
        } else if lower == "authorization" {
            let key = bearer_agent_key(value);
            if from_bearer.is_none() {
                from_bearer = key;
            }
            // Any credential header that mentions an agent key goes, even when it is
            // not one this filter reads as an identity (`authorization: cak_...`
            // without a scheme): the upstream must never see an agent key.
            mentions_agent_key(value)
        } else if lower == "x-api-key" {
            let key = agent_key(value);
            if from_x_api_key.is_none() {
                from_x_api_key = key;
            }
            mentions_agent_key(value)
        } else {
            lower == "accept-encoding"
        };
        if remove && !plan.remove.contains(&lower) {
            plan.remove.push(lower);
        }
    }
    plan.api_key = from_dedicated.or(from_bearer).or(from_x_api_key);
    plan
}

/// Whether a header value contains an agent key prefix anywhere.
fn mentions_agent_key(value: &[u8]) -> bool {
    value
        .windows(AGENT_KEY_PREFIX.len())
        .any(|w| w == AGENT_KEY_PREFIX.as_bytes())
}

/// The agent key in a header value, if it is one (`cak_` followed by key characters).
fn agent_key(value: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(value).ok()?.trim();
    let rest = s.strip_prefix(AGENT_KEY_PREFIX)?;
    let valid = !rest.is_empty()
        && s.len() <= MAX_IDENTITY_LEN
        && rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    valid.then(|| s.to_owned())
}

/// The agent key in an `authorization: Bearer cak_...` value.
fn bearer_agent_key(value: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(value).ok()?.trim_start();
    let (scheme, rest) = s.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    agent_key(rest.trim().as_bytes())
}

/// The 401 message: what the configured sources expect.
pub fn missing_identity_message(sources: &[IdentitySource]) -> String {
    let wanted: Vec<&str> = sources
        .iter()
        .map(|s| match s {
            IdentitySource::ApiKey => {
                "a Caracal agent key (`x-caracal-agent-key: cak_...`, `Authorization: Bearer cak_...` or `x-api-key: cak_...`)"
            }
            IdentitySource::Spiffe => "an mTLS client certificate with a SPIFFE id",
            IdentitySource::Jwt => "a verified JWT",
        })
        .collect();
    format!(
        "Missing or invalid Caracal agent credential: expected {}.",
        wanted.join(" or ")
    )
}

/// The SPIFFE id from the `connection.uri_san_peer_certificate` property value.
pub fn spiffe_from_property(value: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(value).ok()?.trim();
    let valid = s.starts_with("spiffe://")
        && s.len() > "spiffe://".len()
        && s.len() <= MAX_IDENTITY_LEN
        && !s.chars().any(|c| c.is_control() || c.is_whitespace());
    valid.then(|| s.to_owned())
}

/// The claim value from the `metadata.filter_metadata.<ns>.<payload>.<claim>` property
/// value (Envoy returns a string leaf as its raw bytes).
pub fn jwt_claim_from_property(value: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(value).ok()?.trim();
    let valid = !s.is_empty() && s.len() <= MAX_IDENTITY_LEN && !s.chars().any(|c| c.is_control());
    valid.then(|| s.to_owned())
}

/// The JWT identity from the property values of the configured claim and of `iss`
/// (both from the same verified payload); none unless both are present and valid.
pub fn jwt_identity(claim: Option<Vec<u8>>, issuer: Option<Vec<u8>>) -> Option<Identity> {
    let claim = jwt_claim_from_property(&claim?)?;
    let issuer = jwt_claim_from_property(&issuer?)?;
    Some(Identity::Jwt { issuer, claim })
}

/// The registered claim naming a JWT's issuer.
pub const JWT_ISSUER_CLAIM: &str = "iss";

/// The property path of the SPIFFE id.
pub const SPIFFE_PROPERTY: [&str; 2] = ["connection", "uri_san_peer_certificate"];

/// The property path of the JWT claim.
pub fn jwt_property_path<'a>(
    namespace: &'a str,
    payload_key: &'a str,
    claim: &'a str,
) -> [&'a str; 5] {
    ["metadata", "filter_metadata", namespace, payload_key, claim]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn credential_headers_mentioning_an_agent_key_are_removed() {
        // Found by the header-hygiene property test: the key came from x-api-key, and
        // a scheme-less `authorization: cak_...` carrying it went upstream.
        let h = |k: &str, v: &str| (k.to_owned(), v.as_bytes().to_vec());
        let plan = plan_request_headers(&[h("authorization", "cak_-"), h("x-api-key", "cak_-")]);
        assert_eq!(plan.api_key.as_deref(), Some("cak_-"));
        assert!(
            plan.remove.contains(&"authorization".to_owned()),
            "{:?}",
            plan.remove
        );
        assert!(plan.remove.contains(&"x-api-key".to_owned()));
        let plan = plan_request_headers(&[h("authorization", "Basic cak_x junk")]);
        assert!(plan.remove.contains(&"authorization".to_owned()));
        assert_eq!(plan.api_key, None);
        // A provider key of the client's own stays (the route may pass it through).
        let plan = plan_request_headers(&[h("authorization", "Bearer sk-abc")]);
        assert!(plan.remove.is_empty(), "{:?}", plan.remove);
    }

    #[test]
    fn dedicated_header_key_is_taken_and_stripped() {
        let p = plan_request_headers(&h(&[
            (":path", "/v1/chat/completions"),
            ("x-caracal-agent-key", "cak_abc123"),
            ("content-type", "application/json"),
        ]));
        assert_eq!(p.api_key.as_deref(), Some("cak_abc123"));
        assert_eq!(p.remove, vec!["x-caracal-agent-key"]);
    }

    #[test]
    fn bearer_agent_key_strips_authorization() {
        let p = plan_request_headers(&h(&[("authorization", "Bearer cak_XyZ-9_")]));
        assert_eq!(p.api_key.as_deref(), Some("cak_XyZ-9_"));
        assert_eq!(p.remove, vec!["authorization"]);
        let p = plan_request_headers(&h(&[("Authorization", "bearer   cak_k ")]));
        assert_eq!(p.api_key.as_deref(), Some("cak_k"));
        assert_eq!(p.remove, vec!["authorization"]);
    }

    #[test]
    fn provider_authorization_is_kept() {
        let p = plan_request_headers(&h(&[("authorization", "Bearer sk-proj-123")]));
        assert_eq!(p.api_key, None);
        assert!(p.remove.is_empty());
        // Not an identity, but it carries something shaped like an agent key: it
        // does not go upstream either.
        let p = plan_request_headers(&h(&[("authorization", "Basic cak_abc")]));
        assert_eq!(p.api_key, None);
        assert_eq!(p.remove, vec!["authorization"]);
    }

    #[test]
    fn anthropic_x_api_key_agent_key() {
        let p = plan_request_headers(&h(&[("x-api-key", "cak_anth")]));
        assert_eq!(p.api_key.as_deref(), Some("cak_anth"));
        assert_eq!(p.remove, vec!["x-api-key"]);
        let p = plan_request_headers(&h(&[("x-api-key", "sk-ant-123")]));
        assert_eq!(p.api_key, None);
        assert!(p.remove.is_empty());
    }

    #[test]
    fn dedicated_header_wins_over_bearer_and_every_key_header_is_stripped() {
        let p = plan_request_headers(&h(&[
            ("authorization", "Bearer cak_second"),
            ("x-api-key", "cak_third"),
            ("x-caracal-agent-key", "cak_first"),
        ]));
        assert_eq!(p.api_key.as_deref(), Some("cak_first"));
        assert_eq!(
            p.remove,
            vec!["authorization", "x-api-key", "x-caracal-agent-key"]
        );
    }

    #[test]
    fn every_x_caracal_header_is_stripped_even_spoofed_ones() {
        let p = plan_request_headers(&h(&[
            ("x-caracal-remaining-budget", "1000000"),
            ("X-Caracal-Reservation-Id", "r1"),
            ("x-caracal-agent-key", "not-a-key"),
            ("x-caracal-agent-key", "cak_second_copy"),
            ("x-caracalish", "kept"),
            ("accept-encoding", "gzip, br"),
        ]));
        assert_eq!(p.api_key.as_deref(), Some("cak_second_copy"));
        assert_eq!(
            p.remove,
            vec![
                "x-caracal-remaining-budget",
                "x-caracal-reservation-id",
                "x-caracal-agent-key",
                "accept-encoding"
            ]
        );
    }

    #[test]
    fn malformed_keys_are_not_keys() {
        for v in [
            "cak_",
            "cak_ spaces",
            "cak_\u{e9}",
            "CAK_abc",
            " ",
            "",
            "cak_a\"b",
        ] {
            let p = plan_request_headers(&h(&[("x-caracal-agent-key", v)]));
            assert_eq!(p.api_key, None, "{v:?}");
            assert_eq!(p.remove, vec!["x-caracal-agent-key"]);
        }
        let p = plan_request_headers(&[("x-caracal-agent-key".to_owned(), vec![0xff, 0xfe])]);
        assert_eq!(p.api_key, None);
        let long = format!("cak_{}", "a".repeat(5000));
        assert_eq!(
            plan_request_headers(&h(&[("x-api-key", &long)])).api_key,
            None
        );
    }

    #[test]
    fn spiffe_and_jwt_properties() {
        assert_eq!(
            spiffe_from_property(b"spiffe://cluster.local/ns/agents/sa/bot"),
            Some("spiffe://cluster.local/ns/agents/sa/bot".to_owned())
        );
        assert_eq!(spiffe_from_property(b"https://example.com"), None);
        assert_eq!(spiffe_from_property(b"spiffe://"), None);
        assert_eq!(spiffe_from_property(b"spiffe://a b"), None);
        assert_eq!(spiffe_from_property(&[0xff]), None);
        assert_eq!(spiffe_from_property(b""), None);
        assert_eq!(
            jwt_claim_from_property(b"agent-7"),
            Some("agent-7".to_owned())
        );
        assert_eq!(jwt_claim_from_property(b""), None);
        assert_eq!(jwt_claim_from_property(b"a\nb"), None);
        assert_eq!(
            jwt_property_path("ns", "p", "sub"),
            ["metadata", "filter_metadata", "ns", "p", "sub"]
        );
    }

    #[test]
    fn jwt_identity_needs_claim_and_issuer() {
        let v = |s: &str| Some(s.as_bytes().to_vec());
        assert_eq!(
            jwt_identity(v("agent-7"), v("https://issuer-a.example")),
            Some(Identity::Jwt {
                issuer: "https://issuer-a.example".into(),
                claim: "agent-7".into(),
            })
        );
        // A token without `iss` (or an unreadable one) identifies nobody.
        assert_eq!(jwt_identity(v("agent-7"), None), None);
        assert_eq!(jwt_identity(v("agent-7"), v("")), None);
        assert_eq!(jwt_identity(v("agent-7"), v("a\nb")), None);
        assert_eq!(jwt_identity(None, v("https://issuer-a.example")), None);
        assert_eq!(
            jwt_property_path("ns", "p", JWT_ISSUER_CLAIM),
            ["metadata", "filter_metadata", "ns", "p", "iss"]
        );
        let d = jwt_identity(v("agent-7"), v("https://issuer-a.example"))
            .map(|i| i.describe())
            .unwrap_or_default();
        assert!(d.contains("agent-7") && d.contains("issuer-a"), "{d}");
    }

    #[test]
    fn missing_identity_messages_name_the_sources() {
        let m = missing_identity_message(&[IdentitySource::ApiKey]);
        assert!(
            m.contains("x-caracal-agent-key") && !m.contains("SPIFFE"),
            "{m}"
        );
        let m = missing_identity_message(&[IdentitySource::Spiffe, IdentitySource::Jwt]);
        assert!(
            m.contains("SPIFFE") && m.contains("JWT") && !m.contains("cak_"),
            "{m}"
        );
    }

    #[test]
    fn credentials() {
        let c = Identity::ApiKey("cak_1".into()).to_credential();
        assert_eq!(c.kind, Some(Kind::ApiKey("cak_1".into())));
        let c = Identity::Spiffe("spiffe://x/y".into()).to_credential();
        assert_eq!(
            c.kind,
            Some(Kind::Verified(VerifiedIdentity {
                kind: "spiffe".into(),
                value: "spiffe://x/y".into(),
                issuer: String::new(),
            }))
        );
        let c = Identity::Jwt {
            issuer: "https://idp.example".into(),
            claim: "agent".into(),
        }
        .to_credential();
        assert_eq!(
            c.kind,
            Some(Kind::Verified(VerifiedIdentity {
                kind: "jwt".into(),
                value: "agent".into(),
                issuer: "https://idp.example".into(),
            }))
        );
        assert!(!Identity::ApiKey("cak_secretsecret".into())
            .describe()
            .contains("secretsecret"));
    }
}
