//! The admin API against a real authz-service and a real PostgreSQL: every call,
//! and every kind of bad input, with the status code and what the database holds.

use caracal_proto::v1 as pb;
use caracal_tests::TestStack;
use tonic::Code;

fn agent_req(name: &str) -> pb::CreateAgentRequest {
    pb::CreateAgentRequest {
        name: name.to_owned(),
        agent_type: "openai".to_owned(),
        parent_id: String::new(),
        metadata_json: r#"{"team":"platform","env":"prod"}"#.to_owned(),
    }
}

fn policy_req(agent: &str, limit: &str, currency: &str, window: &str) -> pb::CreatePolicyRequest {
    pb::CreatePolicyRequest {
        agent_id: agent.to_owned(),
        limit: limit.to_owned(),
        currency: currency.to_owned(),
        time_window: window.to_owned(),
        window_type: "calendar".to_owned(),
        on_expiry: String::new(),
    }
}

#[tokio::test]
async fn agents_lifecycle_and_bad_input() {
    let stack = TestStack::start().await.unwrap();
    let mut agents = stack.agents();

    let a = agents
        .create_agent(agent_req("production-agent-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.name, "production-agent-1");
    assert_eq!(a.agent_type, "openai");
    assert_eq!(a.status, "active");
    let meta: serde_json::Value = serde_json::from_str(&a.metadata_json).unwrap();
    assert_eq!(meta["team"], "platform");

    // Get by id and by name give the same agent.
    let by_id = agents
        .get_agent(pb::GetAgentRequest {
            id_or_name: a.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let by_name = agents
        .get_agent(pb::GetAgentRequest {
            id_or_name: a.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_id, by_name);

    // Duplicate names are refused, and nothing is written.
    let err = agents
        .create_agent(agent_req("production-agent-1"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert!(
        err.message().contains("production-agent-1"),
        "{}",
        err.message()
    );
    assert_eq!(stack.count("agents").await.unwrap(), 1);

    // Malformed metadata, metadata that is not an object, empty name/type.
    for (meta, needle) in [
        ("{not json", "not valid JSON"),
        ("[1,2]", "JSON object"),
        ("\"x\"", "JSON object"),
    ] {
        let mut req = agent_req("meta-agent");
        req.metadata_json = meta.to_owned();
        let err = agents.create_agent(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{meta}: {err:?}");
        assert!(err.message().contains(needle), "{meta}: {}", err.message());
    }
    let mut req = agent_req("  ");
    req.agent_type = String::new();
    assert_eq!(
        agents.create_agent(req).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(stack.count("agents").await.unwrap(), 1);

    // Unknown agent, malformed id, unknown parent.
    let err = agents
        .get_agent(pb::GetAgentRequest {
            id_or_name: "nobody".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = agents
        .deactivate_agent(pb::DeactivateAgentRequest {
            id: "not-a-uuid".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let mut child = agent_req("orphan");
    child.parent_id = uuid::Uuid::now_v7().to_string();
    assert_eq!(
        agents.create_agent(child).await.unwrap_err().code(),
        Code::NotFound
    );

    // Hierarchy: b under a, c under b; making a a child of c is a cycle.
    let mut b = agent_req("child-b");
    b.parent_id = a.id.clone();
    let b = agents.create_agent(b).await.unwrap().into_inner();
    assert_eq!(b.parent_id, a.id);
    let mut c = agent_req("grandchild-c");
    c.parent_id = b.id.clone();
    let c = agents.create_agent(c).await.unwrap().into_inner();
    let err = agents
        .update_agent(pb::UpdateAgentRequest {
            id: a.id.clone(),
            parent_id: Some(c.id.clone()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("cycle"), "{}", err.message());
    let err = agents
        .update_agent(pb::UpdateAgentRequest {
            id: a.id.clone(),
            parent_id: Some(a.id.clone()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let unchanged = agents
        .get_agent(pb::GetAgentRequest {
            id_or_name: a.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unchanged.parent_id, "");

    // Re-parenting and making a root again work; metadata update keeps the rest.
    let moved = agents
        .update_agent(pb::UpdateAgentRequest {
            id: c.id.clone(),
            parent_id: Some(a.id.clone()),
            metadata_json: Some(r#"{"team":"ml"}"#.into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(moved.parent_id, a.id);
    assert_eq!(moved.agent_type, "openai");
    assert!(moved.metadata_json.contains("ml"));
    let root = agents
        .update_agent(pb::UpdateAgentRequest {
            id: c.id.clone(),
            parent_id: Some(String::new()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(root.parent_id, "");

    // Listing: pagination walks every agent exactly once; filters work.
    let mut seen = Vec::new();
    let mut token = String::new();
    for _ in 0..10 {
        let page = agents
            .list_agents(pb::ListAgentsRequest {
                page: Some(pb::PageRequest {
                    limit: 2,
                    page_token: token.clone(),
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        seen.extend(page.agents.into_iter().map(|a| a.name));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    seen.sort();
    assert_eq!(seen, vec!["child-b", "grandchild-c", "production-agent-1"]);
    let children = agents
        .list_agents(pb::ListAgentsRequest {
            parent_id: a.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(children.agents.len(), 1);
    assert_eq!(children.agents[0].id, b.id);

    // Deactivation is idempotent and visible to status filters.
    let d1 = agents
        .deactivate_agent(pb::DeactivateAgentRequest { id: b.id.clone() })
        .await
        .unwrap()
        .into_inner();
    let d2 = agents
        .deactivate_agent(pb::DeactivateAgentRequest { id: b.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d1.status, "inactive");
    assert_eq!(d1.updated_at, d2.updated_at);
    let inactive = agents
        .list_agents(pb::ListAgentsRequest {
            status: "inactive".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        inactive
            .agents
            .iter()
            .map(|a| a.id.clone())
            .collect::<Vec<_>>(),
        vec![b.id.clone()]
    );
    let err = agents
        .list_agents(pb::ListAgentsRequest {
            status: "sleeping".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    stack.stop().await.unwrap();
}

#[tokio::test]
async fn admin_calls_need_credentials() {
    let stack = TestStack::start().await.unwrap();
    for token in [None, Some("wrong-token")] {
        let err = stack
            .agents_with(token)
            .create_agent(agent_req("x"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{token:?}");
        let err = stack
            .agents_with(token)
            .list_agents(pb::ListAgentsRequest::default())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
    }
    assert_eq!(stack.count("agents").await.unwrap(), 0);
    stack.stop().await.unwrap();
}

#[tokio::test]
async fn concurrent_reparenting_never_creates_a_cycle() {
    let stack = TestStack::start().await.unwrap();
    let mut agents = stack.agents();
    for round in 0..5 {
        let a = agents
            .create_agent(agent_req(&format!("a{round}")))
            .await
            .unwrap()
            .into_inner();
        let b = agents
            .create_agent(agent_req(&format!("b{round}")))
            .await
            .unwrap()
            .into_inner();
        let (mut c1, mut c2) = (stack.agents(), stack.agents());
        let (r1, r2) = tokio::join!(
            c1.update_agent(pb::UpdateAgentRequest {
                id: a.id.clone(),
                parent_id: Some(b.id.clone()),
                ..Default::default()
            }),
            c2.update_agent(pb::UpdateAgentRequest {
                id: b.id.clone(),
                parent_id: Some(a.id.clone()),
                ..Default::default()
            }),
        );
        let ok = [r1.is_ok(), r2.is_ok()].iter().filter(|x| **x).count();
        assert_eq!(
            ok, 1,
            "exactly one of two opposite re-parentings may win (round {round}): {r1:?} {r2:?}"
        );
        let failed = r1.err().or(r2.err()).unwrap();
        assert_eq!(failed.code(), Code::FailedPrecondition, "{failed:?}");
    }
    stack.stop().await.unwrap();
}

#[tokio::test]
async fn api_keys_are_shown_once_and_stored_hashed() {
    let stack = TestStack::start().await.unwrap();
    let mut agents = stack.agents();
    let a = agents
        .create_agent(agent_req("keyed"))
        .await
        .unwrap()
        .into_inner();
    let issued = agents
        .issue_api_key(pb::IssueApiKeyRequest {
            agent_id: a.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let key = issued.key.unwrap();
    assert!(issued.secret.starts_with("cak_"), "{}", issued.secret);
    assert_eq!(issued.secret.len(), 4 + 43);
    assert!(issued.secret.starts_with(&key.prefix));
    assert!(key.revoked_at.is_none());

    // The database holds the keyed hash, never the secret.
    #[derive(diesel::QueryableByName)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::Bytea)]
        key_hash: Vec<u8>,
        #[diesel(sql_type = diesel::sql_types::Text)]
        dump: String,
    }
    let mut conn = stack.db().await.unwrap();
    let rows: Vec<Row> = diesel_async::RunQueryDsl::load(
        diesel::sql_query("SELECT key_hash, row_to_json(k)::text AS dump FROM agent_api_keys k"),
        &mut conn,
    )
    .await
    .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        rows[0].key_hash,
        caracal_authz::keys::hash(caracal_tests::PEPPER, &issued.secret).to_vec()
    );
    assert!(
        !rows[0].dump.contains(&issued.secret[4..]),
        "secret leaked into the table"
    );

    // Verified identities: add, duplicate, list, remove.
    let spiffe = "spiffe://cluster.local/ns/agents/sa/keyed";
    let add_from = |kind: &str, value: &str, issuer: &str| pb::AddIdentityRequest {
        agent_id: a.id.clone(),
        kind: kind.into(),
        value: value.into(),
        issuer: issuer.into(),
    };
    let add = |kind: &str, value: &str| add_from(kind, value, "");
    let ident = agents
        .add_identity(add("spiffe", spiffe))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (ident.kind.as_str(), ident.value.as_str()),
        ("spiffe", spiffe)
    );
    assert_eq!(
        agents
            .add_identity(add("spiffe", spiffe))
            .await
            .unwrap_err()
            .code(),
        Code::AlreadyExists
    );
    assert_eq!(
        agents
            .add_identity(add("kerberos", "x"))
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    // A JWT identity is (issuer, claim): the issuer is required for jwt, refused
    // for spiffe, and the same claim under two issuers is two identities.
    let err = agents
        .add_identity(add("jwt", "agent-keyed@example.com"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("issuer"), "{}", err.message());
    let err = agents
        .add_identity(add_from("jwt", "agent-keyed@example.com", "  "))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = agents
        .add_identity(add_from(
            "spiffe",
            "spiffe://cluster.local/ns/agents/sa/other",
            "https://idp-a.example",
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let jwt_a = agents
        .add_identity(add_from(
            "jwt",
            "agent-keyed@example.com",
            "https://idp-a.example",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            jwt_a.kind.as_str(),
            jwt_a.issuer.as_str(),
            jwt_a.value.as_str()
        ),
        ("jwt", "https://idp-a.example", "agent-keyed@example.com")
    );
    assert_eq!(
        agents
            .add_identity(add_from(
                "jwt",
                "agent-keyed@example.com",
                "https://idp-a.example",
            ))
            .await
            .unwrap_err()
            .code(),
        Code::AlreadyExists
    );
    agents
        .add_identity(add_from(
            "jwt",
            "agent-keyed@example.com",
            "https://idp-b.example",
        ))
        .await
        .unwrap();
    let listed = agents
        .list_identities(pb::ListIdentitiesRequest {
            agent_id: a.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen: Vec<(String, String, String)> = listed
        .identities
        .iter()
        .map(|i| (i.kind.clone(), i.issuer.clone(), i.value.clone()))
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        vec![
            (
                "jwt".to_owned(),
                "https://idp-a.example".to_owned(),
                "agent-keyed@example.com".to_owned()
            ),
            (
                "jwt".to_owned(),
                "https://idp-b.example".to_owned(),
                "agent-keyed@example.com".to_owned()
            ),
            ("spiffe".to_owned(), String::new(), spiffe.to_owned()),
        ]
    );
    agents
        .remove_identity(pb::RemoveIdentityRequest {
            id: ident.id.clone(),
        })
        .await
        .unwrap();
    let err = agents
        .remove_identity(pb::RemoveIdentityRequest {
            id: ident.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(stack.count("agent_identities").await.unwrap(), 2);

    // Listing never shows the secret; revocation is idempotent.
    let listed = agents
        .list_api_keys(pb::ListApiKeysRequest {
            agent_id: a.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.keys.len(), 1);
    let r1 = agents
        .revoke_api_key(pb::RevokeApiKeyRequest {
            key_id: key.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let r2 = agents
        .revoke_api_key(pb::RevokeApiKeyRequest {
            key_id: key.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r1.revoked_at.is_some());
    assert_eq!(r1.revoked_at, r2.revoked_at);
    let err = agents
        .revoke_api_key(pb::RevokeApiKeyRequest {
            key_id: uuid::Uuid::now_v7().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // Inactive agents get no keys; unknown agents are NotFound.
    agents
        .deactivate_agent(pb::DeactivateAgentRequest { id: a.id.clone() })
        .await
        .unwrap();
    let err = agents
        .issue_api_key(pb::IssueApiKeyRequest {
            agent_id: a.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = agents
        .issue_api_key(pb::IssueApiKeyRequest {
            agent_id: "ghost".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(stack.count("agent_api_keys").await.unwrap(), 1);
    stack.stop().await.unwrap();
}

#[tokio::test]
async fn policies_validate_version_and_keep_history() {
    let stack = TestStack::start().await.unwrap();
    let agent = stack
        .agents()
        .create_agent(agent_req("budgeted"))
        .await
        .unwrap()
        .into_inner();
    let mut policies = stack.policies();

    let daily = policies
        .create_policy(policy_req(&agent.id, "1000.00", "USD", "daily"))
        .await
        .unwrap()
        .into_inner();
    let limit = daily.limit.clone().unwrap();
    assert_eq!(
        (limit.micros, limit.currency.as_str(), limit.amount.as_str()),
        (1_000_000_000, "USD", "1000.00")
    );
    assert_eq!(
        (daily.time_window.as_str(), daily.window_type.as_str()),
        ("daily", "calendar")
    );
    assert_eq!(daily.on_expiry, "charge");
    assert_eq!(daily.version, 1);
    let mut monthly_req = policy_req(&agent.name, "25000.5", "usd", "monthly");
    monthly_req.on_expiry = "release".into();
    let monthly = policies
        .create_policy(monthly_req)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(monthly.limit.unwrap().micros, 25_000_500_000);
    assert_eq!(monthly.on_expiry, "release");

    // Every kind of bad limit, currency and window is refused with InvalidArgument.
    let bad: &[(&str, &str, &str, &str)] = &[
        ("0", "USD", "daily", "limit"),
        ("0.00", "USD", "daily", "limit"),
        ("-5", "USD", "daily", "limit"),
        ("1.0000001", "USD", "daily", "limit"),
        ("99999999999999999999", "USD", "daily", "limit"),
        ("NaN", "USD", "daily", "limit"),
        ("1e5", "USD", "daily", "limit"),
        ("", "USD", "daily", "limit"),
        ("10", "XYZ", "daily", "currency"),
        ("10", "US", "daily", "currency"),
        ("10", "USD", "fortnightly", "time_window"),
    ];
    for (limit, currency, window, field) in bad {
        let err = policies
            .create_policy(policy_req(&agent.id, limit, currency, window))
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{limit} {currency} {window}: {err:?}"
        );
        assert!(
            err.message().starts_with(field),
            "{limit} {currency} {window}: {}",
            err.message()
        );
    }
    let mut bad_type = policy_req(&agent.id, "10", "USD", "daily");
    bad_type.window_type = "sliding".into();
    assert_eq!(
        policies.create_policy(bad_type).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let err = policies
        .create_policy(policy_req(
            &uuid::Uuid::now_v7().to_string(),
            "10",
            "USD",
            "daily",
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(stack.count("policies").await.unwrap(), 2);
    assert_eq!(stack.count("policy_versions").await.unwrap(), 2);

    // Get by id; unknown and malformed ids.
    let got = policies
        .get_policy(pb::GetPolicyRequest {
            id: daily.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, daily);
    let err = policies
        .get_policy(pb::GetPolicyRequest {
            id: uuid::Uuid::now_v7().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = policies
        .get_policy(pb::GetPolicyRequest { id: "x".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // List both.
    let listed = policies
        .list_policies(pb::ListPoliciesRequest {
            agent_id: agent.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut windows: Vec<_> = listed
        .policies
        .iter()
        .map(|p| p.time_window.clone())
        .collect();
    windows.sort();
    assert_eq!(windows, vec!["daily", "monthly"]);

    // Update: new version, history with a diff, value at a time.
    let before_update = chrono::Utc::now();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let updated = policies
        .update_policy(pb::UpdatePolicyRequest {
            id: daily.id.clone(),
            limit: Some("1500".into()),
            window_type: Some("rolling".into()),
            expected_version: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.version, 2);
    assert_eq!(updated.limit.unwrap().micros, 1_500_000_000);
    assert_eq!(updated.window_type, "rolling");
    // A stale writer is refused and changes nothing.
    let err = policies
        .update_policy(pb::UpdatePolicyRequest {
            id: daily.id.clone(),
            limit: Some("1".into()),
            expected_version: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted);
    // A bad update is refused before anything is written.
    let err = policies
        .update_policy(pb::UpdatePolicyRequest {
            id: daily.id.clone(),
            limit: Some("-1".into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let deactivated = policies
        .deactivate_policy(pb::DeactivatePolicyRequest {
            id: daily.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!deactivated.active);
    assert_eq!(deactivated.version, 3);
    let again = policies
        .deactivate_policy(pb::DeactivatePolicyRequest {
            id: daily.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.version, 3, "deactivating twice is one change");

    let history = policies
        .policy_history(pb::PolicyHistoryRequest {
            id: daily.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let kinds: Vec<_> = history
        .versions
        .iter()
        .map(|v| (v.version, v.change_kind.clone()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (1, "create".into()),
            (2, "update".into()),
            (3, "deactivate".into())
        ]
    );
    assert!(history.versions[0].diff.is_empty());
    assert_eq!(
        history.versions[1].diff,
        vec![
            "limit: 1000.00 USD -> 1500.00 USD".to_owned(),
            "window_type: calendar -> rolling".to_owned()
        ]
    );
    assert_eq!(
        history.versions[2].diff,
        vec!["active: true -> false".to_owned()]
    );
    assert_eq!(history.versions[1].changed_by, "admin-token");

    let at = |t: chrono::DateTime<chrono::Utc>| pb::PolicyAtRequest {
        id: daily.id.clone(),
        at: Some(prost_types::Timestamp {
            seconds: t.timestamp(),
            nanos: t.timestamp_subsec_nanos() as i32,
        }),
    };
    let then = policies
        .policy_at(at(before_update))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (then.version, then.limit.unwrap().micros),
        (1, 1_000_000_000)
    );
    let now = policies
        .policy_at(at(chrono::Utc::now()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(now.version, 3);
    let err = policies
        .policy_at(at(chrono::Utc::now() - chrono::Duration::days(1)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // Inactive policies leave the default listing but stay retrievable.
    let listed = policies
        .list_policies(pb::ListPoliciesRequest {
            agent_id: agent.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.policies.len(), 1);
    let all = policies
        .list_policies(pb::ListPoliciesRequest {
            agent_id: agent.id.clone(),
            include_inactive: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.policies.len(), 2);
    stack.stop().await.unwrap();
}

#[tokio::test]
async fn allowlists_are_anchored_and_validated() {
    let stack = TestStack::start().await.unwrap();
    let agent = stack
        .agents()
        .create_agent(agent_req("listed"))
        .await
        .unwrap()
        .into_inner();
    let mut lists = stack.allowlists();
    let check = |target: &str, value: &str| pb::CheckAllowlistRequest {
        agent_id: agent.id.clone(),
        target: target.into(),
        value: value.into(),
    };
    // No entries: no restriction.
    assert!(
        lists
            .check(check("model", "anything"))
            .await
            .unwrap()
            .into_inner()
            .allowed
    );

    let glob = lists
        .add_entry(pb::AddAllowlistEntryRequest {
            agent_id: agent.id.clone(),
            target: "model".into(),
            pattern_kind: "glob".into(),
            pattern: "gpt-4o*".into(),
        })
        .await
        .unwrap()
        .into_inner();
    lists
        .add_entry(pb::AddAllowlistEntryRequest {
            agent_id: agent.id.clone(),
            target: "model".into(),
            pattern_kind: "regex".into(),
            pattern: "claude-3-(opus|haiku)".into(),
        })
        .await
        .unwrap();
    lists
        .add_entry(pb::AddAllowlistEntryRequest {
            agent_id: agent.id.clone(),
            target: "resource".into(),
            pattern_kind: "glob".into(),
            pattern: "api.openai.com/v1/**".into(),
        })
        .await
        .unwrap();

    let r = lists
        .check(check("model", "gpt-4o-mini"))
        .await
        .unwrap()
        .into_inner();
    assert!(r.allowed);
    assert_eq!(r.matched_entry_id, glob.id);
    assert!(
        lists
            .check(check("model", "claude-3-opus"))
            .await
            .unwrap()
            .into_inner()
            .allowed
    );
    for denied in ["xgpt-4o", "claude-3-opus-20240229", "gpt-3.5-turbo"] {
        assert!(
            !lists
                .check(check("model", denied))
                .await
                .unwrap()
                .into_inner()
                .allowed,
            "{denied}"
        );
    }
    assert!(
        lists
            .check(check("resource", "api.openai.com/v1/chat/completions"))
            .await
            .unwrap()
            .into_inner()
            .allowed
    );
    assert!(
        !lists
            .check(check("resource", "evil.com/api.openai.com/v1/x"))
            .await
            .unwrap()
            .into_inner()
            .allowed
    );

    // Invalid regex, empty pattern, unknown target or kind, duplicates.
    let add = |target: &str, kind: &str, pattern: &str| pb::AddAllowlistEntryRequest {
        agent_id: agent.id.clone(),
        target: target.into(),
        pattern_kind: kind.into(),
        pattern: pattern.into(),
    };
    for (t, k, p) in [
        ("model", "regex", "gpt-(4"),
        ("model", "glob", ""),
        ("host", "glob", "x"),
        ("model", "wildcard", "x"),
    ] {
        let err = lists.add_entry(add(t, k, p)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{t} {k} {p}: {err:?}");
    }
    let err = lists
        .add_entry(add("model", "glob", "gpt-4o*"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert_eq!(stack.count("allowlist_entries").await.unwrap(), 3);

    let listed = lists
        .list_entries(pb::ListAllowlistRequest {
            agent_id: agent.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.entries.len(), 3);
    lists
        .remove_entry(pb::RemoveAllowlistEntryRequest {
            id: glob.id.clone(),
        })
        .await
        .unwrap();
    let err = lists
        .remove_entry(pb::RemoveAllowlistEntryRequest {
            id: glob.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        !lists
            .check(check("model", "gpt-4o-mini"))
            .await
            .unwrap()
            .into_inner()
            .allowed
    );
    stack.stop().await.unwrap();
}

#[tokio::test]
async fn price_book_is_versioned_and_imports_all_or_nothing() {
    let stack = TestStack::start().await.unwrap();
    let mut prices = stack.prices();
    let set = |model: &str, input: &str, output: &str| pb::SetPriceRequest {
        provider: "openai".into(),
        model: model.into(),
        currency: "USD".into(),
        input_per_mtok: input.into(),
        output_per_mtok: output.into(),
        cached_input_per_mtok: "1.25".into(),
        per_request: String::new(),
    };
    let v1 = prices
        .set_price(set("gpt-4o", "2.50", "10.00"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            v1.version,
            v1.input_per_mtok_micros,
            v1.output_per_mtok_micros,
            v1.cached_input_per_mtok_micros
        ),
        (1, 2_500_000, 10_000_000, 1_250_000)
    );
    let v2 = prices
        .set_price(set("gpt-4o", "2.00", "8.00"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v2.version, 2);

    let latest = prices
        .list_prices(pb::ListPricesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(latest.prices.len(), 1);
    assert_eq!(
        (
            latest.prices[0].version,
            latest.prices[0].input_per_mtok_micros
        ),
        (2, 2_000_000)
    );
    let all = prices
        .list_prices(pb::ListPricesRequest {
            include_history: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        all.prices.iter().map(|p| p.version).collect::<Vec<_>>(),
        vec![2, 1]
    );

    // One bad row rejects the whole import, naming the row.
    let err = prices
        .import_prices(pb::ImportPricesRequest {
            prices: vec![set("gpt-4o-mini", "0.15", "0.60"), set("o1", "15", "-60")],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("row 2"), "{}", err.message());
    assert_eq!(stack.count("price_book").await.unwrap(), 2);
    for (input, currency) in [("1.0000001", "USD"), ("abc", "USD"), ("1", "ZZZ")] {
        let mut req = set("bad", input, "1");
        req.currency = currency.into();
        assert_eq!(
            prices.set_price(req).await.unwrap_err().code(),
            Code::InvalidArgument,
            "{input} {currency}"
        );
    }
    let ok = prices
        .import_prices(pb::ImportPricesRequest {
            prices: vec![
                set("gpt-4o-mini", "0.15", "0.60"),
                set("gpt-4o", "2.50", "10"),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        ok.prices
            .iter()
            .map(|p| (p.model.as_str(), p.version))
            .collect::<Vec<_>>(),
        vec![("gpt-4o-mini", 1), ("gpt-4o", 3)]
    );
    stack.stop().await.unwrap();
}

#[tokio::test]
async fn reflection_health_and_metrics() {
    let stack = TestStack::start().await.unwrap();

    // gRPC reflection lists every Caracal service (what grpcurl `list` shows).
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };
    let mut reflection = ServerReflectionClient::new(stack.channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let response = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer: {response:?}");
    };
    let mut names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    for expected in [
        "caracal.v1.AgentService",
        "caracal.v1.AllowlistService",
        "caracal.v1.BudgetAuthorization",
        "caracal.v1.PolicyService",
        "caracal.v1.PriceBookService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.contains(&expected.to_owned()),
            "{expected} missing from {names:?}"
        );
    }

    // gRPC health.
    let mut health = tonic_health::pb::health_client::HealthClient::new(stack.channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // HTTP probes and metrics (a real HTTP/1.1 exchange over TCP).
    stack
        .agents()
        .create_agent(agent_req("metered"))
        .await
        .unwrap();
    let _ = stack
        .agents()
        .get_agent(pb::GetAgentRequest {
            id_or_name: "nobody".into(),
        })
        .await;
    let (code, body) = http_get(&stack.http_url(), "/health").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"database\":\"ok\""), "{body}");
    let (code, body) = http_get(&stack.http_url(), "/metrics").await;
    assert_eq!(code, 200);
    assert!(
        body.contains("caracal_admin_requests_total{method=\"CreateAgent\",code=\"OK\"}"),
        "{body}"
    );
    assert!(
        body.contains("caracal_admin_requests_total{method=\"GetAgent\",code=\"NotFound\"}"),
        "{body}"
    );
    assert!(body.contains("caracal_db_pool_connections"), "{body}");

    // The hot path's metrics (recorded through per-thread handles): nothing else in
    // this test binary calls Authorize or Settle, so the values are exact.
    let (agent_id, key) = stack.agent_with_key("metered-calls", None).await.unwrap();
    stack
        .usd_policy(&agent_id, "10", "daily", "calendar", "")
        .await
        .unwrap();
    let mut authz = stack.authz();
    let mut rid = String::new();
    for i in 0..2 {
        let r = authz
            .authorize(caracal_tests::authorize_request(
                &key,
                &format!("m-{i}"),
                1_000,
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.decision, pb::Decision::Allow as i32, "{r:?}");
        rid = r.reservation_id;
    }
    authz
        .settle(pb::SettleRequest {
            reservation_id: rid,
            actual_cost: Some(pb::Money {
                currency: "USD".into(),
                micros: 500,
                amount: String::new(),
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let (_, body) = http_get(&stack.http_url(), "/metrics").await;
    for line in [
        "caracal_requests_total{method=\"Authorize\",status=\"allow\"} 2",
        "caracal_requests_total{method=\"Settle\",status=\"ok\"} 1",
        "caracal_authorization_decisions_total{decision=\"allow\",reason=\"\"} 2",
        "caracal_reservations_total{event=\"created\"} 2",
        "caracal_reservations_total{event=\"settled\"} 1",
        "caracal_authz_request_duration_seconds_count{method=\"Authorize\"} 2",
    ] {
        assert!(body.lines().any(|l| l == line), "no {line:?} in {body}");
    }
    stack.stop().await.unwrap();
}

/// Minimal HTTP/1.1 GET, enough for probes (no client library needed).
async fn http_get(base: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

#[tokio::test]
async fn database_connections_use_tls_with_sslmode_require() {
    // The local PostgreSQL serves TLS (Debian's default snakeoil certificate).
    let stack =
        TestStack::start_with(|c| c.database.url = format!("{}?sslmode=require", c.database.url))
            .await
            .unwrap();
    // Work goes through the TLS pool...
    let a = stack
        .agents()
        .create_agent(agent_req("over-tls"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.name, "over-tls");
    // ...and PostgreSQL reports the service's connections as encrypted.
    #[derive(diesel::QueryableByName)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        encrypted: i64,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        plain: i64,
    }
    let mut conn = stack.db().await.unwrap();
    let row: Row = diesel_async::RunQueryDsl::get_result(
        diesel::sql_query(format!(
            "SELECT count(*) FILTER (WHERE s.ssl) AS encrypted, count(*) FILTER (WHERE NOT s.ssl) AS plain \
             FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.datname = '{}'",
            stack.database
        )),
        &mut conn,
    )
    .await
    .unwrap();
    assert!(row.encrypted >= 1, "the service's pool connections use TLS");
    assert_eq!(
        row.plain, 1,
        "only this test's own probe connection is plain"
    );
    stack.stop().await.unwrap();
}
