//! Who may call the admin API.
//!
//! An administrator proves itself with either
//! - a client certificate, verified by the TLS layer against `server.tls.clientCaFile`
//!   (mTLS, as a mesh or a bastion would present), or
//! - the admin token, as `authorization: Bearer <token>`.
//!
//! Agent credentials (`cak_...` keys) are never admin credentials. The identity found
//! here is recorded as `changed_by` in policy history.

use std::sync::Arc;

use sha2::{Digest, Sha256};
use tonic::{metadata::MetadataMap, Request, Status};

/// The authenticated administrator, attached to each admin request's extensions.
#[derive(Debug, Clone)]
pub struct AdminIdentity(pub String);

/// Checks admin credentials on every admin call.
#[derive(Clone)]
pub struct AdminAuth {
    /// SHA-256 of the token: compared in constant time over fixed-length digests so
    /// neither the token's content nor its length leaks through timing.
    token_digest: Option<Arc<[u8; 32]>>,
}

impl AdminAuth {
    pub fn new(admin_token: &str) -> Self {
        let token_digest =
            (!admin_token.is_empty()).then(|| Arc::new(Sha256::digest(admin_token).into()));
        Self { token_digest }
    }

    pub fn check(&self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let identity = self.identify(&request)?;
        request.extensions_mut().insert(identity);
        Ok(request)
    }

    fn identify(&self, request: &Request<()>) -> Result<AdminIdentity, Status> {
        if let Some(certs) = request.peer_certs() {
            if let Some(cert) = certs.first() {
                let fp = Sha256::digest(cert.as_ref());
                return Ok(AdminIdentity(format!("mtls:sha256:{}", hex8(&fp))));
            }
        }
        let Some(presented) = bearer(request.metadata()) else {
            return Err(Status::unauthenticated(
                "admin credentials required: send `authorization: Bearer <admin token>` or a client certificate",
            ));
        };
        let Some(expected) = &self.token_digest else {
            return Err(Status::unauthenticated(
                "admin token auth is disabled on this server; use a client certificate",
            ));
        };
        let got: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        if constant_time_eq(&got, expected) {
            Ok(AdminIdentity("admin-token".to_owned()))
        } else {
            Err(Status::unauthenticated("invalid admin token"))
        }
    }
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

fn hex8(bytes: &[u8]) -> String {
    bytes.iter().take(8).map(|b| format!("{b:02x}")).collect()
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

    fn req(auth: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(a) = auth {
            r.metadata_mut().insert("authorization", a.parse().unwrap());
        }
        r
    }

    #[test]
    fn token_rules() {
        let auth = AdminAuth::new("s3cret");
        assert!(auth.check(req(Some("Bearer s3cret"))).is_ok());
        assert!(auth.check(req(Some("bearer s3cret"))).is_ok());
        let e = auth.check(req(Some("Bearer nope"))).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let e = auth.check(req(None)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(e.message().contains("admin credentials required"));
        let disabled = AdminAuth::new("");
        assert!(disabled.check(req(Some("Bearer "))).is_err());
    }
}
