//! Who may call the hot path (issue 11 items 6 and 7), against a real authz-service:
//! `BudgetAuthorization` and ext_authz `Check` answer allowlisted gateways only (the
//! gateway token on plain TCP, or a client certificate whose SAN is on
//! `auth.gatewaySans`); admins are admins by their own token or SAN list; no
//! credential of one works for the other. JWT identities bind (issuer, claim).

use std::{collections::HashMap, path::Path, process::Command, time::Duration};

use caracal_proto::v1::{
    self as pb, agent_service_client::AgentServiceClient,
    budget_authorization_client::BudgetAuthorizationClient,
    policy_service_client::PolicyServiceClient,
};
use caracal_tests::{
    authorize_request, Bearer, GatewayToken, TestStack, ADMIN_TOKEN, GATEWAY_TOKEN, PEPPER,
};
use envoy_types::pb::envoy::service::auth::v3::{
    attribute_context::{HttpRequest, Peer, Request as AttrRequest},
    authorization_client::AuthorizationClient,
    AttributeContext, CheckRequest,
};
use tonic::{
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
    Code,
};

fn usd(micros: i64) -> pb::Money {
    pb::Money {
        currency: "USD".into(),
        micros,
        amount: String::new(),
    }
}

fn allowed(r: &pb::AuthorizeResponse) -> bool {
    r.decision == pb::Decision::Allow as i32
}

/// An agent with a key and a 10 USD daily policy.
async fn funded_agent(stack: &TestStack, name: &str) -> (String, String) {
    let (id, key) = stack.agent_with_key(name, None).await.unwrap();
    stack
        .usd_policy(&id, "10", "daily", "calendar", "charge")
        .await
        .unwrap();
    (id, key)
}

/// The agent's smallest remaining budget (a zero-estimate Authorize, as a gateway).
async fn remaining(stack: &TestStack, key: &str) -> i64 {
    let r = stack
        .authz()
        .authorize(authorize_request(
            key,
            &format!("probe-{}", uuid::Uuid::new_v4().simple()),
            0,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(allowed(&r), "{r:?}");
    r.min_remaining.map(|m| m.micros).unwrap_or(-1)
}

fn settle(reservation_id: &str, micros: i64) -> pb::SettleRequest {
    pb::SettleRequest {
        reservation_id: reservation_id.into(),
        usage: None,
        provider: String::new(),
        model: String::new(),
        actual_cost: Some(usd(micros)),
    }
}

fn release(reservation_id: &str) -> pb::ReleaseRequest {
    pb::ReleaseRequest {
        reservation_id: reservation_id.into(),
        reason: "client_abort".into(),
    }
}

/// Authorize, Settle, Release and ReleaseByRequest with this client: the codes.
async fn hot_path_codes<S>(
    client: &mut BudgetAuthorizationClient<S>,
    key: &str,
    reservation_id: &str,
) -> [Code; 4]
where
    S: tonic::client::GrpcService<tonic::body::Body>,
    S::Error: Into<tonic::codegen::StdError>,
    S::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <S::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let code = |r: Result<_, tonic::Status>| match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    };
    [
        code(
            client
                .authorize(authorize_request(key, "intruder-1", 1_000))
                .await
                .map(|_| ()),
        ),
        code(client.settle(settle(reservation_id, 0)).await.map(|_| ())),
        code(client.release(release(reservation_id)).await.map(|_| ())),
        code(
            client
                .release_by_request(pb::ReleaseByRequestRequest {
                    request_id: "r-1".into(),
                    credential: Some(pb::AgentCredential {
                        kind: Some(pb::agent_credential::Kind::ApiKey(key.into())),
                    }),
                    reason: "client_abort".into(),
                })
                .await
                .map(|_| ()),
        ),
    ]
}

#[tokio::test]
async fn hot_path_refuses_callers_without_the_gateway_token() {
    let stack = TestStack::start().await.unwrap();
    let (_, key) = funded_agent(&stack, "victim").await;
    let r1 = stack
        .authz()
        .authorize(authorize_request(&key, "r-1", 1_000))
        .await
        .unwrap()
        .into_inner();
    assert!(allowed(&r1), "{r1:?}");

    // No token, a wrong one, the admin token, the agent's own key: all refused
    // before anything is reserved, settled or released.
    for token in [None, Some("wrong"), Some(ADMIN_TOKEN), Some(key.as_str())] {
        let mut client = stack.authz_with(token);
        assert_eq!(
            hot_path_codes(&mut client, &key, &r1.reservation_id).await,
            [Code::Unauthenticated; 4],
            "gateway token {token:?}"
        );
    }
    // The admin token the way admins send it is no gateway credential either.
    let mut as_admin = BudgetAuthorizationClient::with_interceptor(
        stack.channel.clone(),
        Bearer(Some(ADMIN_TOKEN.into())),
    );
    assert_eq!(
        hot_path_codes(&mut as_admin, &key, &r1.reservation_id).await,
        [Code::Unauthenticated; 4]
    );

    // The refused Settle-for-0 and Release did nothing: the gateway's Settle charges
    // the real cost, once; the refused Authorize reserved nothing.
    let s = stack
        .authz()
        .settle(settle(&r1.reservation_id, 3_000))
        .await
        .unwrap()
        .into_inner();
    assert!(!s.already_settled, "{s:?}");
    assert_eq!(s.charged.map(|m| m.micros), Some(3_000));
    assert_eq!(remaining(&stack, &key).await, 10_000_000 - 3_000);

    // Release with the token works too.
    let r2 = stack
        .authz()
        .authorize(authorize_request(&key, "r-2", 2_000))
        .await
        .unwrap()
        .into_inner();
    let rel = stack
        .authz()
        .release(release(&r2.reservation_id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rel.released.map(|m| m.micros), Some(2_000));
    assert_eq!(remaining(&stack, &key).await, 10_000_000 - 3_000);
    stack.stop().await.unwrap();
}

#[tokio::test]
async fn gateway_and_admin_credentials_are_not_interchangeable() {
    let stack = TestStack::start().await.unwrap();
    let (_, key) = funded_agent(&stack, "separate").await;
    // Admin token as the gateway token: refused on the hot path.
    let err = stack
        .authz_with(Some(ADMIN_TOKEN))
        .authorize(authorize_request(&key, "x-1", 1_000))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    // Gateway token on the admin API: as its own header or as a bearer, refused.
    let list = || pb::ListAgentsRequest {
        status: String::new(),
        parent_id: String::new(),
        page: None,
    };
    let mut with_gateway_header = AgentServiceClient::with_interceptor(
        stack.channel.clone(),
        GatewayToken(Some(GATEWAY_TOKEN.into())),
    );
    let err = with_gateway_header.list_agents(list()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    for token in [GATEWAY_TOKEN, key.as_str()] {
        let err = stack
            .agents_with(Some(token))
            .list_agents(list())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{token}: {err:?}");
    }
    // Each credential still works where it belongs.
    let agents = stack
        .agents()
        .list_agents(list())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(agents.agents.len(), 1);
    assert_eq!(remaining(&stack, &key).await, 10_000_000);
    stack.stop().await.unwrap();
}

/// A Check as Envoy's ext_authz filter sends it: the caller identified by the SPIFFE
/// id Envoy verified (`source.principal`), 1000 micros per call.
fn check_request(principal: &str) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(Peer {
                principal: principal.into(),
                ..Default::default()
            }),
            request: Some(AttrRequest {
                http: Some(HttpRequest {
                    method: "POST".into(),
                    host: "api.openai.com".into(),
                    path: "/v1/chat/completions".into(),
                    headers: HashMap::from([(":authority".into(), "api.openai.com".into())]),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            context_extensions: HashMap::from([
                ("caracal_estimate_micros".into(), "1000".into()),
                ("caracal_provider".into(), "openai".into()),
                ("caracal_upstream_host".into(), "api.openai.com".into()),
                ("caracal_identity_sources".into(), "spiffe".into()),
            ]),
            ..Default::default()
        }),
    }
}

#[tokio::test]
async fn ext_authz_check_answers_gateways_only() {
    let stack = TestStack::start().await.unwrap();
    let (agent_id, key) = funded_agent(&stack, "meshed").await;
    let spiffe = "spiffe://cluster.local/ns/agents/sa/meshed";
    stack
        .agents()
        .add_identity(pb::AddIdentityRequest {
            agent_id,
            kind: "spiffe".into(),
            value: spiffe.into(),
            issuer: String::new(),
        })
        .await
        .unwrap();

    // Anyone could claim to be the meshed agent by writing its SPIFFE id into
    // `source.principal`: without gateway credentials Check refuses.
    for token in [None, Some("wrong"), Some(ADMIN_TOKEN)] {
        let mut client = AuthorizationClient::with_interceptor(
            stack.channel.clone(),
            GatewayToken(token.map(str::to_owned)),
        );
        let err = client.check(check_request(spiffe)).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{token:?}: {err:?}");
    }
    assert_eq!(remaining(&stack, &key).await, 10_000_000);

    // The gateway's Check reserves for the agent Envoy verified.
    let mut gateway = AuthorizationClient::with_interceptor(
        stack.channel.clone(),
        GatewayToken(Some(GATEWAY_TOKEN.into())),
    );
    let ok = gateway
        .check(check_request(spiffe))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.status.map(|s| s.code), Some(0));
    assert_eq!(remaining(&stack, &key).await, 10_000_000 - 1_000);
    stack.stop().await.unwrap();
}

#[tokio::test]
async fn without_gateway_credentials_the_hot_path_is_closed() {
    let stack = TestStack::start_with(|c| c.auth.gateway_token.clear())
        .await
        .unwrap();
    let (_, key) = funded_agent(&stack, "closed").await;
    for token in [None, Some(GATEWAY_TOKEN), Some("")] {
        let err = stack
            .authz_with(token)
            .authorize(authorize_request(&key, "c-1", 1_000))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{token:?}: {err:?}");
    }
    let err = AuthorizationClient::with_interceptor(
        stack.channel.clone(),
        GatewayToken(Some(GATEWAY_TOKEN.into())),
    )
    .check(check_request("spiffe://x/y"))
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    // The admin API is unaffected.
    stack
        .agents()
        .list_agents(pb::ListAgentsRequest::default())
        .await
        .unwrap();
    stack.stop().await.unwrap();
}

// ------------------------------------------------------------------ mTLS

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A P-256 key and a certificate signed by `ca` with these SANs and extended usage.
fn issue(dir: &Path, name: &str, san: &str, usage: &str) {
    let (key, csr, ext, crt) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.ext"),
        format!("{name}.crt"),
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &key,
            "-out",
            &csr,
        ],
    );
    std::fs::write(
        dir.join(&ext),
        format!("subjectAltName={san}\nextendedKeyUsage={usage}\nbasicConstraints=CA:FALSE\n"),
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext,
            "-out",
            &crt,
        ],
    );
}

/// One client CA; the server, a gateway, an admin, and an unlisted client.
fn certificates(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=caracal-test-ca",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ],
    );
    issue(dir, "server", "DNS:localhost,IP:127.0.0.1", "serverAuth");
    issue(
        dir,
        "gateway",
        "URI:spiffe://test.local/ns/edge/sa/envoy-1",
        "clientAuth",
    );
    issue(
        dir,
        "admin",
        "URI:spiffe://test.local/ns/ops/sa/admin",
        "clientAuth",
    );
    // One certificate naming both roles is neither.
    issue(
        dir,
        "both",
        "URI:spiffe://test.local/ns/edge/sa/envoy-2,URI:spiffe://test.local/ns/ops/sa/admin",
        "clientAuth",
    );
    issue(
        dir,
        "stranger",
        "URI:spiffe://test.local/ns/agents/sa/bot,DNS:bot.test.local",
        "clientAuth",
    );
}

async fn tls_channel(addr: std::net::SocketAddr, dir: &Path, client: Option<&str>) -> Channel {
    let read = |f: String| std::fs::read(dir.join(f)).unwrap();
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.crt".into())))
        .domain_name("localhost");
    if let Some(name) = client {
        tls = tls.identity(Identity::from_pem(
            read(format!("{name}.crt")),
            read(format!("{name}.key")),
        ));
    }
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap()
}

#[derive(diesel::QueryableByName)]
struct ChangedBy {
    #[diesel(sql_type = diesel::sql_types::Text)]
    changed_by: String,
}

#[tokio::test]
async fn client_certificates_are_gateways_or_admins_by_san() {
    let stack = TestStack::start().await.unwrap();
    let (agent_id, key) = funded_agent(&stack, "tls").await;
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let f = |n: &str| dir.path().join(n);

    // A TLS instance on the same database and Redis keys. Certificates only for the
    // hot path (no gateway token); the admin token stays.
    let mut config = caracal_authz::Config::default();
    config.server.grpc_addr = "127.0.0.1:0".parse().unwrap();
    config.server.http_addr = "127.0.0.1:0".parse().unwrap();
    config.server.tls = Some(caracal_authz::config::TlsConfig {
        cert_file: f("server.crt"),
        key_file: f("server.key"),
        client_ca_file: Some(f("ca.crt")),
    });
    config.database.url = stack.database_url.clone();
    config.database.db_pool_size = 2;
    config.auth.admin_token = ADMIN_TOKEN.into();
    config.auth.api_key_pepper = PEPPER.into();
    config.auth.gateway_sans = vec!["spiffe://test.local/ns/edge/*".into()];
    config.auth.admin_sans = vec!["spiffe://test.local/ns/ops/sa/admin".into()];
    config.redis.url = stack.redis.url.clone();
    config.redis.key_prefix = stack.key_prefix.clone();
    config.redis.partitions = 4;
    config.budget.relay_enabled = false;
    let server = caracal_authz::serve(config).await.unwrap();
    let addr = server.grpc_addr;

    let list = pb::ListAgentsRequest::default;
    let authorize = |id: &str, micros: i64| authorize_request(&key, id, micros);

    // The gateway's certificate: the hot path, not the admin API.
    let gw = tls_channel(addr, dir.path(), Some("gateway")).await;
    let r = BudgetAuthorizationClient::new(gw.clone())
        .authorize(authorize("tls-1", 1_000))
        .await
        .unwrap()
        .into_inner();
    assert!(allowed(&r), "{r:?}");
    let s = BudgetAuthorizationClient::new(gw.clone())
        .settle(settle(&r.reservation_id, 1_500))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.charged.map(|m| m.micros), Some(1_500));
    let err = AgentServiceClient::new(gw.clone())
        .list_agents(list())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let ok = AuthorizationClient::new(gw)
        .check(check_request(""))
        .await
        .unwrap()
        .into_inner();
    // No identity in this Check: a denied answer from the handler, not a refusal
    // of the caller.
    assert_ne!(ok.status.map(|s| s.code), Some(0));

    // The admin's certificate: the admin API (recorded as its SAN), not the hot path.
    let admin = tls_channel(addr, dir.path(), Some("admin")).await;
    let agents = AgentServiceClient::new(admin.clone())
        .list_agents(list())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(agents.agents.len(), 1);
    let policy = PolicyServiceClient::new(admin.clone())
        .create_policy(pb::CreatePolicyRequest {
            agent_id: agent_id.clone(),
            limit: "20".into(),
            currency: "USD".into(),
            time_window: "monthly".into(),
            window_type: "calendar".into(),
            on_expiry: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut conn = stack.db().await.unwrap();
    let rows: Vec<ChangedBy> = diesel_async::RunQueryDsl::load(
        diesel::sql_query("SELECT changed_by FROM policy_versions WHERE policy_id = $1")
            .bind::<diesel::sql_types::Uuid, _>(uuid::Uuid::parse_str(&policy.id).unwrap()),
        &mut conn,
    )
    .await
    .unwrap();
    assert_eq!(
        rows.iter()
            .map(|r| r.changed_by.as_str())
            .collect::<Vec<_>>(),
        vec!["mtls:spiffe://test.local/ns/ops/sa/admin"]
    );
    let err = BudgetAuthorizationClient::new(admin.clone())
        .authorize(authorize("tls-2", 1_000))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = BudgetAuthorizationClient::new(admin)
        .settle(settle(&r.reservation_id, 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // A certificate from the same CA on neither list: neither API.
    let stranger = tls_channel(addr, dir.path(), Some("stranger")).await;
    let err = BudgetAuthorizationClient::new(stranger.clone())
        .authorize(authorize("tls-3", 1_000))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = AgentServiceClient::new(stranger.clone())
        .list_agents(list())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = AuthorizationClient::new(stranger)
        .check(check_request(""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    let both = tls_channel(addr, dir.path(), Some("both")).await;
    let err = BudgetAuthorizationClient::new(both.clone())
        .authorize(authorize("tls-5", 1_000))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = AgentServiceClient::new(both)
        .list_agents(list())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // No certificate: the hot path wants one (no gateway token configured), the
    // admin token still administers.
    let anonymous = tls_channel(addr, dir.path(), None).await;
    let err = BudgetAuthorizationClient::new(anonymous.clone())
        .authorize(authorize("tls-4", 1_000))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    AgentServiceClient::with_interceptor(anonymous, Bearer(Some(ADMIN_TOKEN.into())))
        .list_agents(list())
        .await
        .unwrap();

    // Only the gateway's 1500 was spent, on both policies.
    assert_eq!(remaining(&stack, &key).await, 10_000_000 - 1_500);
    server.shutdown().await.unwrap();
    stack.stop().await.unwrap();
}

// ------------------------------------------------------------------ JWT issuer

fn jwt(issuer: &str, claim: &str, request_id: &str) -> pb::AuthorizeRequest {
    let mut req = authorize_request("", request_id, 1_000);
    req.credential = Some(pb::AgentCredential {
        kind: Some(pb::agent_credential::Kind::Verified(pb::VerifiedIdentity {
            kind: "jwt".into(),
            value: claim.into(),
            issuer: issuer.into(),
        })),
    });
    req
}

#[tokio::test]
async fn jwt_identities_bind_issuer_and_claim() {
    let stack = TestStack::start().await.unwrap();
    let (agent_id, key) = funded_agent(&stack, "jwt-agent").await;
    let (issuer_a, issuer_b) = ("https://idp-a.example", "https://idp-b.example");
    let err = stack
        .agents()
        .add_identity(pb::AddIdentityRequest {
            agent_id: agent_id.clone(),
            kind: "jwt".into(),
            value: "agent-7".into(),
            issuer: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let bound = stack
        .agents()
        .add_identity(pb::AddIdentityRequest {
            agent_id: agent_id.clone(),
            kind: "jwt".into(),
            value: "agent-7".into(),
            issuer: issuer_a.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(bound.issuer, issuer_a);

    // The same claim from another issuer (or from no issuer) is nobody.
    for (issuer, id) in [(issuer_b, "j-b"), ("", "j-none")] {
        let r = stack
            .authz()
            .authorize(jwt(issuer, "agent-7", id))
            .await
            .unwrap()
            .into_inner();
        assert!(!allowed(&r), "{issuer:?}: {r:?}");
        assert_eq!(r.reason, pb::DenyReason::UnknownAgent as i32, "{r:?}");
    }
    assert_eq!(remaining(&stack, &key).await, 10_000_000);
    // The bound issuer's token is the agent.
    let r = stack
        .authz()
        .authorize(jwt(issuer_a, "agent-7", "j-a"))
        .await
        .unwrap()
        .into_inner();
    assert!(allowed(&r), "{r:?}");
    assert_eq!(r.agent_id, agent_id);
    assert_eq!(remaining(&stack, &key).await, 10_000_000 - 1_000);
    stack.stop().await.unwrap();
}
