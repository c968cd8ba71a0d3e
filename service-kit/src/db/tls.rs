//! PostgreSQL over TLS, with libpq's `sslmode` meanings.
//!
//! tokio-postgres understands `sslmode=disable|prefer|require` but verifies nothing by
//! itself, and rejects `verify-ca`/`verify-full`. So the URL's TLS settings are read
//! here, under libpq's parameter names: `require` encrypts without checking the
//! certificate (as libpq does); `verify-ca`/`verify-full` check it against
//! `sslrootcert` (a PEM file), the host name too for `verify-full` (the URL's host, or
//! with `hostaddr=` the name the certificate must carry while the address is dialled).
//! `sslcert` + `sslkey` (PEM files, given together) are the client certificate and its
//! key, presented to a server that authenticates clients by certificate (`hostssl ...
//! cert` in `pg_hba.conf`). Without `sslmode` (or with `disable`/`prefer`) the
//! connection is made exactly as before, without TLS. File names may be
//! percent-encoded (`%20` for a space).

use std::sync::Arc;

use diesel::ConnectionResult;
use diesel_async::AsyncPgConnection;
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    DigitallySignedStruct, RootCertStore, SignatureScheme,
};

/// The client certificate (`sslcert`) and its private key (`sslkey`), PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    pub cert: String,
    pub key: String,
}

/// What the URL asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsMode {
    /// No TLS (no `sslmode`, or `disable`/`prefer`).
    Off,
    /// Encrypt, accept any server certificate.
    Require { client: Option<ClientCert> },
    /// Encrypt and verify against `sslrootcert`; `hostname` also checks the name.
    Verify {
        root_cert: String,
        hostname: bool,
        client: Option<ClientCert>,
    },
}

/// The TLS parameters this module reads out of a URL (libpq's names).
pub const TLS_PARAMS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// `%XX` decoding of a query value (file names); anything malformed is kept as it is.
pub fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `%XX` encoding of everything but unreserved characters and `/`, so a file name
/// can go into a URL's query.
pub fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Splits a `postgres://` URL into the URL tokio-postgres will accept and the TLS mode.
pub fn parse(url: &str) -> Result<(String, TlsMode), String> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_owned(), TlsMode::Off));
    };
    let mut kept = Vec::new();
    let (mut mode, mut root, mut cert, mut key) = (None, None, None, None);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("sslmode", v)) => mode = Some(v.to_owned()),
            Some(("sslrootcert", v)) => root = Some(percent_decode(v)),
            Some(("sslcert", v)) => cert = Some(percent_decode(v)),
            Some(("sslkey", v)) => key = Some(percent_decode(v)),
            _ => kept.push(pair.to_owned()),
        }
    }
    let client = match (
        cert.filter(|c| !c.is_empty()),
        key.filter(|k| !k.is_empty()),
    ) {
        (Some(cert), Some(key)) => Some(ClientCert { cert, key }),
        (None, None) => None,
        (Some(_), None) => return Err("sslcert needs sslkey=<PEM file>".to_owned()),
        (None, Some(_)) => return Err("sslkey needs sslcert=<PEM file>".to_owned()),
    };
    let tls = match mode.as_deref() {
        None | Some("disable") | Some("prefer") | Some("allow") => TlsMode::Off,
        Some("require") => TlsMode::Require { client },
        Some(m @ ("verify-ca" | "verify-full")) => TlsMode::Verify {
            root_cert: root
                .filter(|r| !r.is_empty())
                .ok_or_else(|| format!("sslmode={m} needs sslrootcert=<PEM file>"))?,
            hostname: m == "verify-full",
            client,
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

/// The client certificate chain and key for `with_client_auth_cert`.
fn client_identity(
    client: &ClientCert,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let chain = CertificateDer::pem_file_iter(&client.cert)
        .map_err(|e| format!("sslcert {}: {e}", client.cert))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("sslcert {}: {e}", client.cert))?;
    if chain.is_empty() {
        return Err(format!(
            "sslcert {}: no certificate in the file",
            client.cert
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&client.key)
        .map_err(|e| format!("sslkey {}: {e}", client.key))?;
    Ok((chain, key))
}

fn client_config(mode: &TlsMode) -> Result<rustls::ClientConfig, String> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let (verified, client) = match mode {
        TlsMode::Off => (
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider()))),
            None,
        ),
        TlsMode::Require { client } => (
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider()))),
            client.as_ref(),
        ),
        TlsMode::Verify {
            root_cert,
            hostname,
            client,
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
            let verified = if *hostname {
                builder.with_webpki_verifier(verifier)
            } else {
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(ChainOnly(verifier)))
            };
            (verified, client.as_ref())
        }
    };
    match client {
        None => Ok(verified.with_no_client_auth()),
        Some(client) => {
            let (chain, key) = client_identity(client)?;
            verified
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("sslcert {} / sslkey {}: {e}", client.cert, client.key))
        }
    }
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
        .map_err(|e| ConnectionError::BadConnection(describe(&e)))?;
    AsyncPgConnection::try_from_client_and_connection(client, connection).await
}

/// The error with its causes: tokio-postgres's own text is only the kind ("db
/// error", "error performing TLS handshake"), the server's refusal or the
/// certificate problem is in the sources.
fn describe(error: &tokio_postgres::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    // Bounded: a source chain is short, but nothing promises it ends.
    for _ in 0..8 {
        let Some(cause) = source else { break };
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_is_read_and_rewritten() {
        let client = Some(ClientCert {
            cert: "/etc/pg/client.crt".into(),
            key: "/etc/pg/my key.pem".into(),
        });
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
                TlsMode::Require { client: None },
            ),
            (
                "postgres://u@h/db?application_name=x&sslmode=verify-full&sslrootcert=/ca.pem",
                "postgres://u@h/db?application_name=x&sslmode=require",
                TlsMode::Verify {
                    root_cert: "/ca.pem".into(),
                    hostname: true,
                    client: None,
                },
            ),
            (
                "postgres://u@db.example:5433/db?sslmode=verify-ca&sslrootcert=/ca.pem\
                 &sslcert=/etc/pg/client.crt&sslkey=/etc/pg/my%20key.pem&hostaddr=10.0.0.1",
                "postgres://u@db.example:5433/db?hostaddr=10.0.0.1&sslmode=require",
                TlsMode::Verify {
                    root_cert: "/ca.pem".into(),
                    hostname: false,
                    client: client.clone(),
                },
            ),
            (
                "postgres://u@h/db?sslmode=require&sslcert=/etc/pg/client.crt&sslkey=/etc/pg/my%20key.pem",
                "postgres://u@h/db?sslmode=require",
                TlsMode::Require { client },
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
        let half =
            parse("postgres://h/db?sslmode=verify-full&sslrootcert=/ca&sslcert=/c").unwrap_err();
        assert!(half.contains("sslkey"), "{half}");
        let half = parse("postgres://h/db?sslmode=require&sslkey=/k").unwrap_err();
        assert!(half.contains("sslcert"), "{half}");
    }

    #[test]
    fn file_names_survive_the_url() {
        for name in ["/a b/c%d&e=f.pem", "/etc/ssl/ca.pem", "C:\\x\\ü.pem"] {
            assert_eq!(percent_decode(&percent_encode(name)), name);
        }
        assert_eq!(percent_encode("/etc/ssl/ca.pem"), "/etc/ssl/ca.pem");
        assert_eq!(percent_decode("100%"), "100%");
    }

    #[test]
    fn unreadable_client_files_are_named() {
        let mode = TlsMode::Require {
            client: Some(ClientCert {
                cert: "/nonexistent/client.crt".into(),
                key: "/nonexistent/client.key".into(),
            }),
        };
        let err = client_config(&mode).unwrap_err();
        assert!(err.contains("sslcert /nonexistent/client.crt"), "{err}");
    }
}
