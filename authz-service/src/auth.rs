//! Who may call what. Gateways, administrators and agents are three separate
//! identities, and no credential of one is a credential of another:
//!
//! - **Gateways** call the hot path (`caracal.v1.BudgetAuthorization` and Envoy's
//!   ext_authz `Check`) with a client certificate whose URI or DNS SAN is on
//!   `auth.gatewaySans`, or (plain-TCP dev setups) the gateway token in
//!   `x-caracal-gateway-token`. Only a gateway may Settle or Release reservations or
//!   assert an identity it verified (`verified`, ext_authz `source.principal`).
//! - **Administrators** call the admin API with a client certificate whose SAN is on
//!   `auth.adminSans`, or the admin token as `authorization: Bearer <token>`. The
//!   identity found is recorded as `changed_by` in policy history.
//! - **Agents** (`cak_...` keys, bound SPIFFE ids / JWT claims) are named inside hot
//!   path messages by a gateway; they never authenticate a gRPC call themselves.
//!
//! Certificates are verified by the TLS layer against `server.tls.clientCaFile`; a
//! verified certificate alone grants nothing, its SAN must be on the list of the API
//! it calls, and a certificate with a SAN on BOTH lists (overlapping prefixes, or one
//! certificate naming both roles) is neither. Missing or wrong credentials:
//! UNAUTHENTICATED. A valid certificate that is not on the list (e.g. an admin's
//! certificate on the hot path): PERMISSION_DENIED.

use std::sync::Arc;

use sha2::{Digest, Sha256};
use tonic::{metadata::MetadataMap, Request, Status};
use x509_cert::{
    der::Decode,
    ext::pkix::{name::GeneralName, SubjectAltName},
    Certificate,
};

/// Metadata a gateway sends its token in (plain-TCP setups without mTLS).
pub const GATEWAY_TOKEN_HEADER: &str = "x-caracal-gateway-token";

/// The authenticated administrator, attached to each admin request's extensions.
#[derive(Debug, Clone)]
pub struct AdminIdentity(pub String);

/// The authenticated gateway, attached to each hot-path request's extensions.
#[derive(Debug, Clone)]
pub struct GatewayIdentity(pub String);

/// Certificate SANs allowed on one API: exact match, or a trailing `*` for a prefix.
#[derive(Clone, Debug, Default)]
pub struct SanAllowlist(Arc<[String]>);

impl SanAllowlist {
    pub fn new(patterns: &[String]) -> Self {
        Self(
            patterns
                .iter()
                .map(|p| p.trim().to_owned())
                .filter(|p| !p.is_empty())
                .collect(),
        )
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn matches(&self, san: &str) -> bool {
        self.0.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => san.starts_with(prefix),
            None => san == p,
        })
    }
}

/// The URI and DNS SANs of a DER certificate (nothing if it cannot be parsed: the
/// TLS layer already verified it, so this only happens for SAN-less certificates).
pub fn cert_sans(der: &[u8]) -> Vec<String> {
    let Ok(cert) = Certificate::from_der(der) else {
        return Vec::new();
    };
    let Ok(Some((_, SubjectAltName(names)))) = cert.tbs_certificate.get::<SubjectAltName>() else {
        return Vec::new();
    };
    names
        .iter()
        .filter_map(|n| match n {
            GeneralName::UniformResourceIdentifier(s) | GeneralName::DnsName(s) => {
                Some(s.as_str().to_owned())
            }
            _ => None,
        })
        .collect()
}

/// What the caller's client certificate says about it on one API.
enum Peer {
    /// No client certificate (plain TCP, or TLS without one).
    None,
    /// A SAN on the allowlist.
    Allowed(String),
    /// A verified certificate, none of whose SANs is on the allowlist, or one of
    /// whose SANs belongs to the other role.
    NotAllowed(Vec<String>),
}

fn peer<T>(request: &Request<T>, allow: &SanAllowlist, other_role: &SanAllowlist) -> Peer {
    let Some(certs) = request.peer_certs() else {
        return Peer::None;
    };
    let Some(leaf) = certs.first() else {
        return Peer::None;
    };
    let sans = cert_sans(leaf.as_ref());
    if sans.iter().any(|s| other_role.matches(s)) {
        return Peer::NotAllowed(sans);
    }
    match sans.iter().find(|s| allow.matches(s)) {
        Some(san) => Peer::Allowed(san.clone()),
        None => Peer::NotAllowed(sans),
    }
}

/// SHA-256 of a token: compared in constant time over fixed-length digests so
/// neither the token's content nor its length leaks through timing.
fn digest(token: &str) -> Option<Arc<[u8; 32]>> {
    (!token.is_empty()).then(|| Arc::new(Sha256::digest(token).into()))
}

fn token_matches(presented: &str, expected: &[u8; 32]) -> bool {
    let got: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
    constant_time_eq(&got, expected)
}

/// Checks gateway credentials on every hot-path call.
#[derive(Clone)]
pub struct GatewayAuth {
    token_digest: Option<Arc<[u8; 32]>>,
    sans: SanAllowlist,
    admin_sans: SanAllowlist,
}

impl GatewayAuth {
    pub fn new(gateway_token: &str, gateway_sans: &[String], admin_sans: &[String]) -> Self {
        Self {
            token_digest: digest(gateway_token),
            sans: SanAllowlist::new(gateway_sans),
            admin_sans: SanAllowlist::new(admin_sans),
        }
    }

    /// No gateway credential is configured: every hot-path call is refused.
    pub fn closed(&self) -> bool {
        self.token_digest.is_none() && self.sans.is_empty()
    }

    pub fn check(&self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let identity = self.identify(&request)?;
        request.extensions_mut().insert(identity);
        Ok(request)
    }

    fn identify(&self, request: &Request<()>) -> Result<GatewayIdentity, Status> {
        let peer = peer(request, &self.sans, &self.admin_sans);
        if let Peer::Allowed(san) = peer {
            return Ok(GatewayIdentity(format!("mtls:{san}")));
        }
        if let Some(presented) = gateway_token(request.metadata()) {
            return match &self.token_digest {
                Some(expected) if token_matches(presented, expected) => {
                    Ok(GatewayIdentity("gateway-token".to_owned()))
                }
                Some(_) => Err(Status::unauthenticated("invalid gateway token")),
                None => Err(Status::unauthenticated(
                    "gateway token auth is disabled on this server (auth.gatewayToken)",
                )),
            };
        }
        if let Peer::NotAllowed(sans) = peer {
            return Err(Status::permission_denied(format!(
                "client certificate {sans:?} is not a gateway (auth.gatewaySans)"
            )));
        }
        if self.closed() {
            return Err(Status::unauthenticated(
                "the hot path is closed: this server has neither auth.gatewayToken nor auth.gatewaySans",
            ));
        }
        Err(Status::unauthenticated(
            "gateway credentials required: an allowlisted client certificate or `x-caracal-gateway-token`",
        ))
    }
}

/// Checks admin credentials on every admin call.
#[derive(Clone)]
pub struct AdminAuth {
    token_digest: Option<Arc<[u8; 32]>>,
    sans: SanAllowlist,
    gateway_sans: SanAllowlist,
}

impl AdminAuth {
    pub fn new(admin_token: &str, admin_sans: &[String], gateway_sans: &[String]) -> Self {
        Self {
            token_digest: digest(admin_token),
            sans: SanAllowlist::new(admin_sans),
            gateway_sans: SanAllowlist::new(gateway_sans),
        }
    }

    /// No admin credential is configured: every admin call is refused.
    pub fn closed(&self) -> bool {
        self.token_digest.is_none() && self.sans.is_empty()
    }

    pub fn check(&self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let identity = self.identify(&request)?;
        request.extensions_mut().insert(identity);
        Ok(request)
    }

    fn identify(&self, request: &Request<()>) -> Result<AdminIdentity, Status> {
        let peer = peer(request, &self.sans, &self.gateway_sans);
        if let Peer::Allowed(san) = peer {
            return Ok(AdminIdentity(format!("mtls:{san}")));
        }
        if let Some(presented) = bearer(request.metadata()) {
            return match &self.token_digest {
                Some(expected) if token_matches(&presented, expected) => {
                    Ok(AdminIdentity("admin-token".to_owned()))
                }
                Some(_) => Err(Status::unauthenticated("invalid admin token")),
                None => Err(Status::unauthenticated(
                    "admin token auth is disabled on this server; use an allowlisted client certificate",
                )),
            };
        }
        if let Peer::NotAllowed(sans) = peer {
            return Err(Status::permission_denied(format!(
                "client certificate {sans:?} is not an administrator (auth.adminSans)"
            )));
        }
        Err(Status::unauthenticated(
            "admin credentials required: send `authorization: Bearer <admin token>` or an allowlisted client certificate",
        ))
    }
}

fn gateway_token(metadata: &MetadataMap) -> Option<&str> {
    metadata
        .get(GATEWAY_TOKEN_HEADER)
        .map(|v| v.to_str().unwrap_or_default().trim())
}

fn bearer(metadata: &MetadataMap) -> Option<String> {
    let value = metadata.get("authorization")?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_owned())
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// The identity an admin handler acts as (set by [`AdminAuth::check`]).
pub fn actor<T>(request: &Request<T>) -> String {
    request
        .extensions()
        .get::<AdminIdentity>()
        .map(|i| i.0.clone())
        .unwrap_or_else(|| "unknown".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(header: &'static str, value: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(a) = value {
            r.metadata_mut()
                .insert(header, a.parse().expect("ascii test value"));
        }
        r
    }

    #[test]
    fn admin_token_rules() {
        let auth = AdminAuth::new("s3cret", &[], &[]);
        assert!(auth
            .check(req("authorization", Some("Bearer s3cret")))
            .is_ok());
        assert!(auth
            .check(req("authorization", Some("bearer s3cret")))
            .is_ok());
        let e = auth
            .check(req("authorization", Some("Bearer nope")))
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let e = auth.check(req("authorization", None)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(e.message().contains("admin credentials required"));
        // The gateway header is not an admin credential.
        let e = auth
            .check(req(GATEWAY_TOKEN_HEADER, Some("s3cret")))
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let disabled = AdminAuth::new("", &[], &[]);
        assert!(disabled.closed());
        assert!(disabled
            .check(req("authorization", Some("Bearer ")))
            .is_err());
    }

    #[test]
    fn gateway_token_rules() {
        let auth = GatewayAuth::new("gw", &[], &[]);
        assert!(!auth.closed());
        let ok = auth.check(req(GATEWAY_TOKEN_HEADER, Some("gw"))).unwrap();
        assert_eq!(
            ok.extensions()
                .get::<GatewayIdentity>()
                .map(|g| g.0.as_str()),
            Some("gateway-token")
        );
        for (header, value) in [
            (GATEWAY_TOKEN_HEADER, Some("gw2")),
            (GATEWAY_TOKEN_HEADER, Some("")),
            (GATEWAY_TOKEN_HEADER, None),
            // The token as a bearer is not the gateway header.
            ("authorization", Some("Bearer gw")),
        ] {
            let e = auth.check(req(header, value)).unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{header} {value:?}");
        }
        let closed = GatewayAuth::new("", &[], &[]);
        assert!(closed.closed());
        let e = closed
            .check(req(GATEWAY_TOKEN_HEADER, Some("")))
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let e = closed.check(req(GATEWAY_TOKEN_HEADER, None)).unwrap_err();
        assert!(e.message().contains("closed"), "{}", e.message());
    }

    #[test]
    fn san_patterns() {
        let allow = SanAllowlist::new(&[
            "spiffe://mesh/ns/gw/sa/envoy".into(),
            "spiffe://mesh/ns/edge/*".into(),
            " ".into(),
        ]);
        assert!(allow.matches("spiffe://mesh/ns/gw/sa/envoy"));
        assert!(!allow.matches("spiffe://mesh/ns/gw/sa/envoy2"));
        assert!(!allow.matches("spiffe://mesh/ns/gw/sa/envo"));
        assert!(allow.matches("spiffe://mesh/ns/edge/sa/a"));
        assert!(!allow.matches("spiffe://mesh/ns/edgy/sa/a"));
        assert!(!allow.matches(""));
        assert!(SanAllowlist::new(&["".into()]).is_empty());
        assert!(cert_sans(b"not a certificate").is_empty());
    }
}
