//! Admin change events (issue 8 item 1), against a real authz-service, PostgreSQL
//! and a real Kafka-protocol broker (tansu): every admin write emits exactly one
//! event on its topic with ids, actor and before/after values; a rolled-back change
//! emits nothing; a change made while Kafka is down arrives exactly once when it
//! returns; two replicas relaying the same outbox publish each event once.

use std::{collections::HashMap, collections::HashSet, time::Duration};

use caracal_proto::v1::{
    self as pb, agent_lifecycle_event::Change as AgentChangeKind,
    agent_service_client::AgentServiceClient, policy_change_event::Change as PolicyChangeKind,
    policy_service_client::PolicyServiceClient,
};
use caracal_tests::{
    kafka::{consume_all, topic_message_count, Consumed, Tansu},
    Bearer, Svc, TestStack, ADMIN_TOKEN,
};
use prost::Message;
use tonic::{transport::Channel, Code};

const LIFECYCLE: &str = "caracal.agent.lifecycle";
const POLICY_CHANGES: &str = "caracal.policy.changes";
const CONSUME_TIMEOUT: Duration = Duration::from_secs(60);

/// A stack whose relays (Redis outbox and admin outbox) produce to `brokers`.
async fn stack_on(brokers: &str) -> TestStack {
    let b = brokers.to_owned();
    TestStack::start_with(move |c| {
        c.budget.relay_enabled = true;
        c.kafka.brokers = b;
        c.kafka.topic_partitions = 3;
    })
    .await
    .unwrap()
}

/// Waits (bounded) until the relay has emptied the admin outbox.
async fn wait_outbox_empty(stack: &TestStack, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let n = stack.count("admin_outbox").await.unwrap();
        if n == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "admin_outbox still holds {n} rows after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads exactly `n` messages of `topic` and checks the topic holds no more (no
/// duplicate, no extra event).
async fn exactly(brokers: &str, topic: &str, n: usize) -> Vec<Consumed> {
    let got = consume_all(brokers, topic, n, CONSUME_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(got.len(), n, "messages on {topic}");
    let stored = topic_message_count(brokers, topic, Duration::from_secs(30)).unwrap();
    assert_eq!(stored, n as i64, "{topic} holds exactly {n} messages");
    got
}

/// Decodes lifecycle events and checks what every event shares: the key is the
/// root agent, the headers repeat id/kind/version, the id is a UUID v7, the actor is
/// the admin token.
fn lifecycle_events(msgs: &[Consumed]) -> Vec<pb::AgentLifecycleEvent> {
    msgs.iter()
        .map(|(key, payload, headers)| {
            let e = pb::AgentLifecycleEvent::decode(payload.as_slice()).unwrap();
            check_common(
                headers,
                &e.event_id,
                &e.kind,
                e.schema_version,
                &e.actor,
                e.occurred_at.is_some(),
            );
            assert_eq!(key, &e.root_agent_id, "keyed by the root agent: {e:?}");
            e
        })
        .collect()
}

fn policy_events(msgs: &[Consumed]) -> Vec<(String, pb::PolicyChangeEvent)> {
    msgs.iter()
        .map(|(key, payload, headers)| {
            let e = pb::PolicyChangeEvent::decode(payload.as_slice()).unwrap();
            check_common(
                headers,
                &e.event_id,
                &e.kind,
                e.schema_version,
                &e.actor,
                e.occurred_at.is_some(),
            );
            (key.clone(), e)
        })
        .collect()
}

fn check_common(
    headers: &HashMap<String, String>,
    event_id: &str,
    kind: &str,
    schema_version: u32,
    actor: &str,
    has_time: bool,
) {
    assert_eq!(headers.get("event_id").map(String::as_str), Some(event_id));
    assert_eq!(headers.get("event_type").map(String::as_str), Some(kind));
    assert_eq!(headers.get("schema_version").map(String::as_str), Some("1"));
    assert_eq!(schema_version, 1);
    let id = uuid::Uuid::parse_str(event_id).unwrap();
    assert_eq!(id.get_version_num(), 7, "event ids are UUID v7");
    assert_eq!(
        actor, "admin-token",
        "the admin credential that made the change"
    );
    assert!(has_time, "occurred_at is set");
}

fn one<'a, T>(items: impl IntoIterator<Item = &'a T>, what: &str) -> &'a T {
    let v: Vec<&T> = items.into_iter().collect();
    assert_eq!(v.len(), 1, "exactly one {what}");
    v[0]
}

fn agent_change(e: &pb::AgentLifecycleEvent) -> &pb::AgentChange {
    match &e.change {
        Some(AgentChangeKind::Agent(c)) => c,
        other => panic!("{}: not an agent change: {other:?}", e.kind),
    }
}

fn policy_change(e: &pb::PolicyChangeEvent) -> &pb::PolicyChange {
    match &e.change {
        Some(PolicyChangeKind::Policy(c)) => c,
        other => panic!("{}: not a policy change: {other:?}", e.kind),
    }
}

fn price_change(e: &pb::PolicyChangeEvent) -> &pb::PriceChange {
    match &e.change {
        Some(PolicyChangeKind::Price(c)) => c,
        other => panic!("{}: not a price change: {other:?}", e.kind),
    }
}

fn price_req(provider: &str, model: &str, input: &str) -> pb::SetPriceRequest {
    pb::SetPriceRequest {
        provider: provider.into(),
        model: model.into(),
        currency: "USD".into(),
        input_per_mtok: input.into(),
        output_per_mtok: "10".into(),
        cached_input_per_mtok: String::new(),
        per_request: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_admin_write_emits_one_event_with_actor_and_before_after() {
    let tansu = Tansu::start_new().await.unwrap();
    let brokers = tansu.brokers();
    let stack = stack_on(&brokers).await;
    let mut agents = stack.agents();
    let mut policies = stack.policies();

    // --- agent lifecycle: 8 changes (and two no-ops that must emit nothing) ---
    let root = agents
        .create_agent(pb::CreateAgentRequest {
            name: "ev-root".into(),
            agent_type: "openai".into(),
            parent_id: String::new(),
            metadata_json: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let child = agents
        .create_agent(pb::CreateAgentRequest {
            name: "ev-child".into(),
            agent_type: "openai".into(),
            parent_id: root.id.clone(),
            metadata_json: r#"{"team":"a"}"#.into(),
        })
        .await
        .unwrap()
        .into_inner();
    agents
        .update_agent(pb::UpdateAgentRequest {
            id: child.id.clone(),
            agent_type: None,
            metadata_json: Some(r#"{"team":"b"}"#.into()),
            parent_id: None,
        })
        .await
        .unwrap();
    let key = agents
        .issue_api_key(pb::IssueApiKeyRequest {
            agent_id: child.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let key_meta = key.key.clone().unwrap();
    agents
        .revoke_api_key(pb::RevokeApiKeyRequest {
            key_id: key_meta.id.clone(),
        })
        .await
        .unwrap();
    // Revoking again changes nothing: no event.
    agents
        .revoke_api_key(pb::RevokeApiKeyRequest {
            key_id: key_meta.id.clone(),
        })
        .await
        .unwrap();
    let identity = agents
        .add_identity(pb::AddIdentityRequest {
            agent_id: child.id.clone(),
            kind: "jwt".into(),
            value: "svc-ev".into(),
            issuer: "https://issuer.example".into(),
        })
        .await
        .unwrap()
        .into_inner();
    agents
        .remove_identity(pb::RemoveIdentityRequest {
            id: identity.id.clone(),
        })
        .await
        .unwrap();
    agents
        .deactivate_agent(pb::DeactivateAgentRequest {
            id: child.id.clone(),
        })
        .await
        .unwrap();
    // Deactivating again changes nothing: no event.
    agents
        .deactivate_agent(pb::DeactivateAgentRequest {
            id: child.id.clone(),
        })
        .await
        .unwrap();

    // --- policy changes: 3 policy + 2 allowlist + 4 price events ---
    let policy_id = stack
        .usd_policy(&root.id, "100", "daily", "calendar", "")
        .await
        .unwrap();
    policies
        .update_policy(pb::UpdatePolicyRequest {
            id: policy_id.clone(),
            limit: Some("250.5".into()),
            expected_version: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    policies
        .deactivate_policy(pb::DeactivatePolicyRequest {
            id: policy_id.clone(),
        })
        .await
        .unwrap();
    let entry = stack
        .allowlists()
        .add_entry(pb::AddAllowlistEntryRequest {
            agent_id: root.id.clone(),
            target: "model".into(),
            pattern_kind: "glob".into(),
            pattern: "gpt-4o*".into(),
        })
        .await
        .unwrap()
        .into_inner();
    stack
        .allowlists()
        .remove_entry(pb::RemoveAllowlistEntryRequest {
            id: entry.id.clone(),
        })
        .await
        .unwrap();
    let mut prices = stack.prices();
    prices
        .set_price(price_req("openai", "gpt-4o", "2.5"))
        .await
        .unwrap();
    prices
        .set_price(price_req("openai", "gpt-4o", "3"))
        .await
        .unwrap();
    prices
        .import_prices(pb::ImportPricesRequest {
            prices: vec![
                price_req("openai", "gpt-4o", "4"),
                price_req("anthropic", "claude-x", "1"),
            ],
        })
        .await
        .unwrap();

    // --- lifecycle topic ---
    let msgs = exactly(&brokers, LIFECYCLE, 8).await;
    assert!(
        !msgs.iter().any(|(_, p, _)| p
            .windows(key.secret.len())
            .any(|w| w == key.secret.as_bytes())),
        "no event carries an API key secret"
    );
    let events = lifecycle_events(&msgs);
    let ids: HashSet<&str> = events.iter().map(|e| e.event_id.as_str()).collect();
    assert_eq!(ids.len(), 8, "distinct event ids");
    for e in &events {
        assert_eq!(e.root_agent_id, root.id, "{} root", e.kind);
    }
    let of = |kind: &str, agent: &str| {
        one(
            events
                .iter()
                .filter(|e| e.kind == kind && e.agent_id == agent),
            kind,
        )
        .clone()
    };

    let created_root = of("agent_created", &root.id);
    let c = agent_change(&created_root);
    assert!(c.before.is_none());
    let after = c.after.as_ref().unwrap();
    assert_eq!(
        (
            after.name.as_str(),
            after.status.as_str(),
            after.parent_id.as_str()
        ),
        ("ev-root", "active", "")
    );

    let created_child = of("agent_created", &child.id);
    let after = agent_change(&created_child).after.clone().unwrap();
    assert_eq!(after.parent_id, root.id);
    assert_eq!(after.metadata_json, r#"{"team":"a"}"#);

    let updated = of("agent_updated", &child.id);
    let c = agent_change(&updated);
    assert_eq!(c.before.as_ref().unwrap().metadata_json, r#"{"team":"a"}"#);
    assert_eq!(c.after.as_ref().unwrap().metadata_json, r#"{"team":"b"}"#);

    let deactivated = of("agent_deactivated", &child.id);
    let c = agent_change(&deactivated);
    assert_eq!(c.before.as_ref().unwrap().status, "active");
    assert_eq!(c.after.as_ref().unwrap().status, "inactive");

    let issued = of("api_key_issued", &child.id);
    let Some(AgentChangeKind::ApiKey(k)) = &issued.change else {
        panic!("api_key_issued without a key change: {issued:?}")
    };
    assert!(k.before.is_none());
    let after = k.after.as_ref().unwrap();
    assert_eq!(after.key_id, key_meta.id);
    assert_eq!(after.prefix, key_meta.prefix);
    assert!(after.revoked_at.is_none());

    let revoked = of("api_key_revoked", &child.id);
    let Some(AgentChangeKind::ApiKey(k)) = &revoked.change else {
        panic!("api_key_revoked without a key change: {revoked:?}")
    };
    assert!(k.before.as_ref().unwrap().revoked_at.is_none());
    assert!(k.after.as_ref().unwrap().revoked_at.is_some());
    assert_eq!(k.after.as_ref().unwrap().key_id, key_meta.id);

    let added = of("identity_added", &child.id);
    let Some(AgentChangeKind::Identity(i)) = &added.change else {
        panic!("identity_added without an identity change: {added:?}")
    };
    assert!(i.before.is_none());
    let after = i.after.as_ref().unwrap();
    assert_eq!(
        (
            after.identity_id.as_str(),
            after.kind.as_str(),
            after.issuer.as_str(),
            after.value.as_str()
        ),
        (
            identity.id.as_str(),
            "jwt",
            "https://issuer.example",
            "svc-ev"
        )
    );
    let removed = of("identity_removed", &child.id);
    let Some(AgentChangeKind::Identity(i)) = &removed.change else {
        panic!("identity_removed without an identity change: {removed:?}")
    };
    assert_eq!(i.before.as_ref().unwrap().identity_id, identity.id);
    assert!(i.after.is_none());

    // --- policy-changes topic ---
    let msgs = exactly(&brokers, POLICY_CHANGES, 9).await;
    let events = policy_events(&msgs);
    let kind = |k: &str| -> Vec<&(String, pb::PolicyChangeEvent)> {
        events.iter().filter(|(_, e)| e.kind == k).collect()
    };
    let (key, created) = one(kind("policy_created"), "policy_created");
    assert_eq!(key, &root.id);
    assert_eq!(
        (
            created.policy_id.as_str(),
            created.agent_id.as_str(),
            created.root_agent_id.as_str(),
            created.version
        ),
        (policy_id.as_str(), root.id.as_str(), root.id.as_str(), 1)
    );
    let c = policy_change(created);
    assert!(c.before.is_none());
    assert_eq!(
        c.after.as_ref().unwrap().limit.as_ref().unwrap().micros,
        100_000_000
    );

    let (_, updated) = one(kind("policy_updated"), "policy_updated");
    assert_eq!(updated.version, 2);
    let c = policy_change(updated);
    let (before, after) = (c.before.as_ref().unwrap(), c.after.as_ref().unwrap());
    assert_eq!(before.limit.as_ref().unwrap().micros, 100_000_000);
    assert_eq!(after.limit.as_ref().unwrap().micros, 250_500_000);
    assert_eq!((before.version, after.version), (1, 2));

    let (_, deactivated) = one(kind("policy_deactivated"), "policy_deactivated");
    assert_eq!(deactivated.version, 3);
    let c = policy_change(deactivated);
    assert!(c.before.as_ref().unwrap().active);
    assert!(!c.after.as_ref().unwrap().active);
    assert_eq!(
        c.after.as_ref().unwrap().limit.as_ref().unwrap().micros,
        250_500_000
    );

    for (k, present_before) in [
        ("allowlist_entry_added", false),
        ("allowlist_entry_removed", true),
    ] {
        let (key, e) = one(kind(k), k);
        assert_eq!(
            (key.as_str(), e.agent_id.as_str()),
            (root.id.as_str(), root.id.as_str())
        );
        let Some(PolicyChangeKind::Allowlist(a)) = &e.change else {
            panic!("{k} without an allowlist change: {e:?}")
        };
        let state = if present_before {
            assert!(a.after.is_none());
            a.before.as_ref().unwrap()
        } else {
            assert!(a.before.is_none());
            a.after.as_ref().unwrap()
        };
        assert_eq!(
            (
                state.entry_id.as_str(),
                state.target.as_str(),
                state.pattern_kind.as_str(),
                state.pattern.as_str()
            ),
            (entry.id.as_str(), "model", "glob", "gpt-4o*")
        );
    }

    let set = kind("price_set");
    assert_eq!(set.len(), 2);
    for (key, e) in &set {
        assert_eq!(key, "openai/gpt-4o");
        let c = price_change(e);
        let after = c.after.as_ref().unwrap();
        match e.version {
            1 => {
                assert!(c.before.is_none(), "first price supersedes nothing");
                assert_eq!(after.input_per_mtok_micros, 2_500_000);
            }
            2 => {
                assert_eq!(c.before.as_ref().unwrap().input_per_mtok_micros, 2_500_000);
                assert_eq!(c.before.as_ref().unwrap().version, 1);
                assert_eq!(after.input_per_mtok_micros, 3_000_000);
            }
            v => panic!("unexpected price version {v}"),
        }
    }
    let imported = kind("price_imported");
    assert_eq!(imported.len(), 2);
    let (_, gpt) = one(
        imported
            .iter()
            .copied()
            .filter(|(k, _)| k == "openai/gpt-4o"),
        "imported gpt-4o",
    );
    let c = price_change(gpt);
    assert_eq!(
        (
            c.before.as_ref().unwrap().version,
            c.after.as_ref().unwrap().version,
            c.after.as_ref().unwrap().input_per_mtok_micros
        ),
        (2, 3, 4_000_000)
    );
    let (_, claude) = one(
        imported
            .iter()
            .copied()
            .filter(|(k, _)| k == "anthropic/claude-x"),
        "imported claude-x",
    );
    assert!(price_change(claude).before.is_none());
    assert_eq!(claude.version, 1);

    wait_outbox_empty(&stack, Duration::from_secs(10)).await;
    let metrics = metrics_text(&stack).await;
    assert!(
        metrics.contains("caracal_admin_outbox_depth"),
        "the depth gauge is exported"
    );
    stack.stop().await.unwrap();
}

/// `/metrics` of the stack, as text (minimal HTTP/1.1 GET).
async fn metrics_text(stack: &TestStack) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let base = stack.http_url();
    let addr = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).await.unwrap();
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_change_emits_nothing() {
    let tansu = Tansu::start_new().await.unwrap();
    let brokers = tansu.brokers();
    let stack = stack_on(&brokers).await;
    let mut agents = stack.agents();
    let base = agents
        .create_agent(pb::CreateAgentRequest {
            name: "rb-base".into(),
            agent_type: "openai".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let policy_id = stack
        .usd_policy(&base.id, "10", "daily", "calendar", "")
        .await
        .unwrap();
    wait_outbox_empty(&stack, Duration::from_secs(30)).await;

    // A constraint checked at COMMIT, i.e. after the handler appended its event:
    // the whole transaction, event included, must roll back.
    let mut db = stack.db().await.unwrap();
    use diesel_async::RunQueryDsl;
    diesel::sql_query(
        "CREATE FUNCTION refuse_doomed() RETURNS trigger AS $$ \
         BEGIN RAISE EXCEPTION 'doomed agents are refused at commit'; END $$ LANGUAGE plpgsql",
    )
    .execute(&mut db)
    .await
    .unwrap();
    diesel::sql_query(
        "CREATE CONSTRAINT TRIGGER refuse_doomed AFTER INSERT OR UPDATE ON agents \
         DEFERRABLE INITIALLY DEFERRED FOR EACH ROW \
         WHEN (NEW.name LIKE 'doomed%' OR NEW.metadata ? 'doomed') \
         EXECUTE FUNCTION refuse_doomed()",
    )
    .execute(&mut db)
    .await
    .unwrap();

    let err = agents
        .create_agent(pb::CreateAgentRequest {
            name: "doomed-1".into(),
            agent_type: "openai".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_ne!(err.code(), Code::Ok);
    let err = agents
        .update_agent(pb::UpdateAgentRequest {
            id: base.id.clone(),
            metadata_json: Some(r#"{"doomed":true}"#.into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_ne!(err.code(), Code::Ok);
    // Refused before writing: a duplicate name and a stale policy version.
    let err = agents
        .create_agent(pb::CreateAgentRequest {
            name: "rb-base".into(),
            agent_type: "openai".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    let err = stack
        .policies()
        .update_policy(pb::UpdatePolicyRequest {
            id: policy_id.clone(),
            limit: Some("99".into()),
            expected_version: 7,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted);

    // Nothing of the failed changes exists: not the rows, not their events.
    assert_eq!(stack.count("admin_outbox").await.unwrap(), 0);
    assert_eq!(stack.count("agents").await.unwrap(), 1);
    assert_eq!(stack.count("policy_versions").await.unwrap(), 1);

    // A later committed change still flows, and the topics hold only the
    // committed changes' events.
    agents
        .create_agent(pb::CreateAgentRequest {
            name: "rb-survivor".into(),
            agent_type: "openai".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let events = lifecycle_events(&exactly(&brokers, LIFECYCLE, 2).await);
    let names: HashSet<String> = events
        .iter()
        .map(|e| agent_change(e).after.as_ref().unwrap().name.clone())
        .collect();
    assert_eq!(
        names,
        HashSet::from(["rb-base".to_owned(), "rb-survivor".to_owned()])
    );
    assert!(events.iter().all(|e| e.kind == "agent_created"));
    let policy = policy_events(&exactly(&brokers, POLICY_CHANGES, 1).await);
    assert_eq!(policy[0].1.kind, "policy_created");
    stack.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_made_while_kafka_is_down_arrives_exactly_once() {
    let mut tansu = Tansu::start_new().await.unwrap();
    let brokers = tansu.brokers();
    let stack = stack_on(&brokers).await;
    tansu.stop().await.unwrap();

    // Admin writes do not depend on Kafka.
    let agent = stack
        .agents()
        .create_agent(pb::CreateAgentRequest {
            name: "outage-agent".into(),
            agent_type: "openai".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // The event waits in PostgreSQL (give the relay time to try and fail).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        stack.count("admin_outbox").await.unwrap(),
        1,
        "the event waits in the outbox while Kafka is down"
    );

    tansu.start().await.unwrap();
    wait_outbox_empty(&stack, Duration::from_secs(60)).await;
    let events = lifecycle_events(&exactly(&brokers, LIFECYCLE, 1).await);
    assert_eq!(events[0].kind, "agent_created");
    assert_eq!(events[0].agent_id, agent.id);
    // Stays exactly one: nothing else is still queued somewhere.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        topic_message_count(&brokers, LIFECYCLE, Duration::from_secs(30)).unwrap(),
        1
    );
    stack.stop().await.unwrap();
}

/// A second replica of `stack`'s service: same database, Redis prefix and broker.
async fn second_replica(
    stack: &TestStack,
    brokers: &str,
) -> (caracal_authz::RunningServer, Channel) {
    // The stack's own settings (tokens, pool), on the stack's database and Redis state.
    let mut config = TestStack::config(&stack.database_url).await.unwrap();
    config.redis = stack.redis.clone();
    config.budget.relay_enabled = true;
    config.kafka.brokers = brokers.to_owned();
    config.kafka.topic_partitions = 3;
    let server = caracal_authz::serve(config).await.unwrap();
    let channel = Channel::from_shared(format!("http://{}", server.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (server, channel)
}

/// Creates `n` agents named `{prefix}-{i}` and updates each once, alternating the
/// replica that makes the change; returns the names.
async fn churn(
    replicas: &mut [(AgentServiceClient<Svc>, PolicyServiceClient<Svc>)],
    prefix: &str,
    n: usize,
) -> Vec<String> {
    let mut names = Vec::new();
    for i in 0..n {
        let k = replicas.len();
        let name = format!("{prefix}-{i}");
        let agent = replicas[i % k]
            .0
            .create_agent(pb::CreateAgentRequest {
                name: name.clone(),
                agent_type: "openai".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        replicas[(i + 1) % k]
            .0
            .update_agent(pb::UpdateAgentRequest {
                id: agent.id,
                metadata_json: Some(format!(r#"{{"i":{i}}}"#)),
                ..Default::default()
            })
            .await
            .unwrap();
        names.push(name);
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_publish_each_event_once() {
    const N: usize = 30;
    let tansu = Tansu::start_new().await.unwrap();
    let brokers = tansu.brokers();
    let stack = stack_on(&brokers).await;
    let (replica, channel) = second_replica(&stack, &brokers).await;
    let bearer = Bearer(Some(ADMIN_TOKEN.to_owned()));
    let mut both = vec![
        (stack.agents(), stack.policies()),
        (
            AgentServiceClient::with_interceptor(channel.clone(), bearer.clone()),
            PolicyServiceClient::with_interceptor(channel.clone(), bearer.clone()),
        ),
    ];
    let mut names = churn(&mut both, "dup", N).await;
    wait_outbox_empty(&stack, Duration::from_secs(60)).await;

    // The second replica leaves (gracefully); if it was the relaying one, the
    // first takes over; either way later events still arrive once.
    replica.shutdown().await.unwrap();
    both.truncate(1);
    names.extend(churn(&mut both, "after", N / 3).await);
    wait_outbox_empty(&stack, Duration::from_secs(60)).await;

    let expected = 2 * names.len();
    let events = lifecycle_events(&exactly(&brokers, LIFECYCLE, expected).await);
    let ids: HashSet<&str> = events.iter().map(|e| e.event_id.as_str()).collect();
    assert_eq!(ids.len(), expected, "every event published once");
    let mut per_name: HashMap<String, Vec<String>> = HashMap::new();
    for e in &events {
        let name = agent_change(e).after.as_ref().unwrap().name.clone();
        per_name.entry(name).or_default().push(e.kind.clone());
    }
    for name in &names {
        let kinds = per_name.get(name).cloned().unwrap_or_default();
        // Same key, so the relay's order is the commit order.
        assert_eq!(kinds, vec!["agent_created", "agent_updated"], "{name}");
    }
    stack.stop().await.unwrap();
}
