//! Connection to the admin API: endpoint, timeouts, TLS, and the bearer-token interceptor.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use caracal_proto::v1::{
    agent_service_client::AgentServiceClient, allowlist_service_client::AllowlistServiceClient,
    ledger_service_client::LedgerServiceClient, policy_service_client::PolicyServiceClient,
    price_book_service_client::PriceBookServiceClient, spend_service_client::SpendServiceClient,
};
use tonic::{
    metadata::{Ascii, MetadataValue},
    service::{interceptor::InterceptedService, Interceptor},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
    Request, Status,
};

use crate::args::ConnOpts;

/// Adds `authorization: Bearer <token>` to every call when a token is configured.
#[derive(Clone, Debug)]
pub struct BearerAuth {
    header: Option<MetadataValue<Ascii>>,
}

impl BearerAuth {
    pub fn new(token: Option<&str>) -> Result<Self> {
        let header = match token.map(str::trim) {
            None | Some("") => None,
            Some(token) => Some(
                format!("Bearer {token}")
                    .parse::<MetadataValue<Ascii>>()
                    .ok()
                    .context("the admin token contains characters not allowed in a gRPC header")?,
            ),
        };
        Ok(Self { header })
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(header) = &self.header {
            request
                .metadata_mut()
                .insert("authorization", header.clone());
        }
        Ok(request)
    }
}

type Svc = InterceptedService<Channel, BearerAuth>;

/// An open channel to the admin API; hands out authenticated clients for each service.
pub struct Connection {
    channel: Channel,
    auth: BearerAuth,
}

impl Connection {
    /// Connects eagerly, so an unreachable server is reported as such, up front.
    pub async fn open(opts: &ConnOpts) -> Result<Self> {
        let auth = BearerAuth::new(opts.admin_token.as_deref())?;
        let endpoint = endpoint(opts)?;
        let channel = endpoint
            .connect()
            .await
            .with_context(|| format!("cannot connect to {}", opts.server))?;
        Ok(Self { channel, auth })
    }

    pub fn agents(&self) -> AgentServiceClient<Svc> {
        AgentServiceClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }

    pub fn policies(&self) -> PolicyServiceClient<Svc> {
        PolicyServiceClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }

    pub fn allowlists(&self) -> AllowlistServiceClient<Svc> {
        AllowlistServiceClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }

    pub fn prices(&self) -> PriceBookServiceClient<Svc> {
        PriceBookServiceClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }

    pub fn dead_letters(
        &self,
    ) -> caracal_proto::v1::dead_letter_service_client::DeadLetterServiceClient<Svc> {
        caracal_proto::v1::dead_letter_service_client::DeadLetterServiceClient::with_interceptor(
            self.channel.clone(),
            self.auth.clone(),
        )
    }

    pub fn spend(&self) -> SpendServiceClient<Svc> {
        SpendServiceClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }

    pub fn snapshots(
        &self,
    ) -> caracal_proto::v1::snapshot_service_client::SnapshotServiceClient<Svc> {
        caracal_proto::v1::snapshot_service_client::SnapshotServiceClient::with_interceptor(
            self.channel.clone(),
            self.auth.clone(),
        )
    }

    pub fn ledger(&self) -> LedgerServiceClient<Svc> {
        LedgerServiceClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }

    pub fn merkle(&self) -> caracal_proto::v1::merkle_service_client::MerkleServiceClient<Svc> {
        caracal_proto::v1::merkle_service_client::MerkleServiceClient::with_interceptor(
            self.channel.clone(),
            self.auth.clone(),
        )
    }
}

fn endpoint(opts: &ConnOpts) -> Result<Endpoint> {
    let url = opts.server.trim();
    let https = if url.starts_with("https://") {
        true
    } else if url.starts_with("http://") {
        false
    } else {
        bail!("--server must be an http:// or https:// URL, got {url:?}");
    };
    let timeout = Duration::from_secs(opts.timeout);
    let endpoint = Endpoint::from_shared(url.to_owned())
        .with_context(|| format!("invalid --server URL {url:?}"))?
        .connect_timeout(timeout)
        .timeout(timeout);

    let tls_files =
        opts.ca_cert.is_some() || opts.client_cert.is_some() || opts.client_key.is_some();
    if !https {
        if tls_files {
            bail!("--ca-cert/--client-cert/--client-key need an https:// --server URL");
        }
        return Ok(endpoint);
    }
    let Some(ca_path) = &opts.ca_cert else {
        bail!("an https:// server needs --ca-cert (the PEM of the CA that signed its certificate)");
    };
    let ca = std::fs::read(ca_path)
        .with_context(|| format!("cannot read --ca-cert {}", ca_path.display()))?;
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    match (&opts.client_cert, &opts.client_key) {
        (None, None) => {}
        (Some(cert_path), Some(key_path)) => {
            let cert = std::fs::read(cert_path)
                .with_context(|| format!("cannot read --client-cert {}", cert_path.display()))?;
            let key = std::fs::read(key_path)
                .with_context(|| format!("cannot read --client-key {}", key_path.display()))?;
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        _ => bail!("--client-cert and --client-key must be given together"),
    }
    endpoint
        .tls_config(tls)
        .context("invalid TLS configuration")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(server: &str) -> ConnOpts {
        ConnOpts {
            server: server.to_owned(),
            admin_token: None,
            timeout: 5,
            ca_cert: None,
            client_cert: None,
            client_key: None,
        }
    }

    #[test]
    fn bearer_header_is_added() {
        let mut auth = BearerAuth::new(Some("s3cret")).unwrap();
        let req = auth.call(Request::new(())).unwrap();
        assert_eq!(
            req.metadata().get("authorization").unwrap(),
            "Bearer s3cret"
        );

        let mut none = BearerAuth::new(Some("")).unwrap();
        let req = none.call(Request::new(())).unwrap();
        assert!(req.metadata().get("authorization").is_none());

        assert!(BearerAuth::new(Some("bad\ntoken")).is_err());
    }

    #[test]
    fn endpoint_checks_scheme_and_tls_options() {
        assert!(endpoint(&opts("http://127.0.0.1:50051")).is_ok());
        assert!(endpoint(&opts("127.0.0.1:50051")).is_err());
        let err = endpoint(&opts("https://caracal.example:443")).unwrap_err();
        assert!(err.to_string().contains("--ca-cert"), "{err}");
        let mut o = opts("http://127.0.0.1:50051");
        o.client_cert = Some("c.pem".into());
        assert!(endpoint(&o).is_err());
    }
}
