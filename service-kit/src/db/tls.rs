//! PostgreSQL over TLS, with libpq's `sslmode` meanings.
//!
//! tokio-postgres understands `sslmode=disable|prefer|require` but verifies nothing by
//! itself, and rejects `verify-ca`/`verify-full`. So the URL's TLS settings are read
//! here: `require` encrypts without checking the certificate (as libpq does);
//! `verify-ca`/`verify-full` check it against `sslrootcert` (a PEM file), the host
//! name too for `verify-full`. Without `sslmode` (or with `disable`/`prefer`) the
//! connection is made exactly as before, without TLS.

use std::sync::Arc;

use diesel::ConnectionResult;
use diesel_async::AsyncPgConnection;
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{pem::PemObject, CertificateDer, ServerName, UnixTime},
    DigitallySignedStruct, RootCertStore, SignatureScheme,
};

/// What the URL asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsMode {
    /// No TLS (no `sslmode`, or `disable`/`prefer`).
    Off,
    /// Encrypt, accept any server certificate.
    Require,
    /// Encrypt and verify against `sslrootcert`; `hostname` also checks the name.
    Verify { root_cert: String, hostname: bool },
}

/// Splits a `postgres://` URL into the URL tokio-postgres will accept and the TLS mode.
pub fn parse(url: &str) -> Result<(String, TlsMode), String> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_owned(), TlsMode::Off));
    };
    let mut kept = Vec::new();
    let (mut mode, mut root) = (None, None);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("sslmode", v)) => mode = Some(v.to_owned()),
            Some(("sslrootcert", v)) => root = Some(v.to_owned()),
            _ => kept.push(pair.to_owned()),
        }
    }
    let tls = match mode.as_deref() {
        None | Some("disable") | Some("prefer") | Some("allow") => TlsMode::Off,
        Some("require") => TlsMode::Require,
        Some(m @ ("verify-ca" | "verify-full")) => TlsMode::Verify {
            root_cert: root.ok_or_else(|| format!("sslmode={m} needs sslrootcert=<PEM file>"))?,
            hostname: m == "verify-full",
        },
        Some(other) => return Err(format!("unknown sslmode {other:?}")),
    };
    if tls != TlsMode::Off {
        kept.push("sslmode=require".to_owned());
    }
    let url = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((url, tls))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// `sslmode=require`: the link is encrypted, the peer is not authenticated (libpq's
/// meaning). Handshake signatures are still checked, so the session key is sound.
#[derive(Debug)]
struct AcceptAnyCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to the root, whatever name the server has.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

fn client_config(mode: &TlsMode) -> Result<rustls::ClientConfig, String> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let config = match mode {
        TlsMode::Off | TlsMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider())))
            .with_no_client_auth(),
        TlsMode::Verify {
            root_cert,
            hostname,
        } => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(root_cert)
                .map_err(|e| format!("sslrootcert {root_cert}: {e}"))?
            {
                roots
                    .add(cert.map_err(|e| format!("sslrootcert {root_cert}: {e}"))?)
                    .map_err(|e| format!("sslrootcert {root_cert}: {e}"))?;
            }
            let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                provider(),
            )
            .build()
            .map_err(|e| e.to_string())?;
            if *hostname {
                builder.with_webpki_verifier(verifier).with_no_client_auth()
            } else {
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(ChainOnly(verifier)))
                    .with_no_client_auth()
            }
        }
    };
    Ok(config)
}

/// Opens one connection for the pool (or for migrations) as the URL says.
pub async fn establish(url: &str) -> ConnectionResult<AsyncPgConnection> {
    use diesel::ConnectionError;
    let (url, mode) = parse(url).map_err(ConnectionError::InvalidConnectionUrl)?;
    if mode == TlsMode::Off {
        return <AsyncPgConnection as diesel_async::AsyncConnection>::establish(&url).await;
    }
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(
        client_config(&mode).map_err(ConnectionError::BadConnection)?,
    );
    let (client, connection) = tokio_postgres::connect(&url, tls)
        .await
        .map_err(|e| ConnectionError::BadConnection(e.to_string()))?;
    AsyncPgConnection::try_from_client_and_connection(client, connection).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_is_read_and_rewritten() {
        let cases = [
            ("postgres://u@h/db", "postgres://u@h/db", TlsMode::Off),
            (
                "postgres://u@h/db?sslmode=disable",
                "postgres://u@h/db",
                TlsMode::Off,
            ),
            (
                "postgres://u@h/db?sslmode=require",
                "postgres://u@h/db?sslmode=require",
                TlsMode::Require,
            ),
            (
                "postgres://u@h/db?application_name=x&sslmode=verify-full&sslrootcert=/ca.pem",
                "postgres://u@h/db?application_name=x&sslmode=require",
                TlsMode::Verify {
                    root_cert: "/ca.pem".into(),
                    hostname: true,
                },
            ),
        ];
        for (input, url, mode) in cases {
            assert_eq!(parse(input).unwrap(), (url.to_owned(), mode), "{input}");
        }
        assert!(
            parse("postgres://h/db?sslmode=verify-ca").is_err(),
            "needs sslrootcert"
        );
        assert!(parse("postgres://h/db?sslmode=sometimes").is_err());
    }
}
