//! OpenTelemetry traces (issue 25 item 6): one agent call through the real Envoy
//! and filter is one trace, from the gateway's span through the authz-service's
//! Authorize and Settle, the outbox relay's Kafka message (its `traceparent`
//! header) to the ledger-writer's write, each process exporting to an OTLP
//! collector in this test. The services sample only what the caller sampled
//! (`samplingRatio` 0 here): a call whose `traceparent` says "not sampled" leaves
//! no span of ours.

use std::{path::Path, sync::Arc, time::Duration};

use caracal_tests::{
    charges::agent_charges,
    consumer_process::{ConsumerProcess, Reaped},
    envoy::{Envoy, EnvoyOptions, Gateway},
    kafka::Tansu,
    mock_llm::{MockLlm, COMPLETION_TOKENS_HEADER},
    otlp_collector::{Collector, ReceivedSpan},
    service_process::ServiceProcess,
};
use serde_json::json;

const AUTHZ: &str = env!("CARGO_BIN_EXE_authz-under-test");
const CONSUMERS: &str = env!("CARGO_BIN_EXE_consumers-under-test");

const SERVER: i32 = 2;
const PRODUCER: i32 = 4;
const CONSUMER: i32 = 5;

/// The caller's trace (sampled) and the parent span the agent's SDK would send.
const TRACE: &str = "5b8efff798038103d269b633813fc60c";
const CALLER_SPAN: &str = "eee19b7ec3c1b174";
/// A second call's trace, marked not sampled by its caller.
const UNSAMPLED_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";

/// Envoy's own OpenTelemetry tracer, exporting to the collector: the gateway span.
fn envoy_tracing(collector_port: u16) -> Vec<(String, String)> {
    let tracing = r#"          codec_type: AUTO
          tracing:
            provider:
              name: envoy.tracers.opentelemetry
              typed_config:
                "@type": type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig
                grpc_service:
                  envoy_grpc: { cluster_name: otel_collector }
                  timeout: 2s
                service_name: caracal-gateway
"#;
    let cluster = format!(
        r#"  clusters:
  - name: otel_collector
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {{}}
    load_assignment:
      cluster_name: otel_collector
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: 127.0.0.1, port_value: {collector_port} }}
"#
    );
    vec![
        (
            "          codec_type: AUTO\n".to_owned(),
            tracing.to_owned(),
        ),
        ("  clusters:\n".to_owned(), cluster),
    ]
}

fn find(spans: &[ReceivedSpan], what: impl Fn(&ReceivedSpan) -> bool) -> Option<&ReceivedSpan> {
    spans.iter().find(|s| what(s))
}

/// One line per span: service, name, trace, span <- parent, event id.
fn summary(spans: &[ReceivedSpan]) -> String {
    spans
        .iter()
        .map(|s| {
            format!(
                "{} {:?} {} {} <- {} {}",
                s.service,
                s.name,
                s.trace_id,
                s.span_id,
                s.parent_span_id,
                s.attribute("caracal.event_id").unwrap_or("")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_agent_call_is_one_trace_from_the_gateway_to_the_ledger() {
    let collector = Collector::start().await.unwrap();
    let tracing_env = |service: &str| {
        vec![
            ("CARACAL_TRACING_ENABLED".to_owned(), "true".to_owned()),
            ("CARACAL_TRACING_ENDPOINT".to_owned(), collector.endpoint()),
            // Only what the caller sampled: the decision is the caller's.
            ("CARACAL_TRACING_SAMPLING_RATIO".to_owned(), "0".to_owned()),
            (
                "CARACAL_TRACING_EXPORT_INTERVAL_MS".to_owned(),
                "100".to_owned(),
            ),
            (
                "CARACAL_TRACING_SERVICE_NAME".to_owned(),
                service.to_owned(),
            ),
        ]
    };
    let tansu = Tansu::start_new().await.unwrap();
    let brokers = tansu.brokers();
    let mut authz_env = vec![
        ("CARACAL_RELAY_ENABLED".to_owned(), "true".to_owned()),
        ("CARACAL_KAFKA_BROKERS".to_owned(), brokers.clone()),
    ];
    authz_env.extend(tracing_env("caracal-authz-service"));
    let env: Vec<(&str, String)> = authz_env
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    let (stack, mut authz) = ServiceProcess::start(Path::new(AUTHZ), &env).await.unwrap();

    let logs = tempfile::tempdir().unwrap();
    let mut writer_env = tracing_env("caracal-ledger-writer");
    writer_env.push((
        "CARACAL_LEDGER_WRITER_MERKLE_KEY_DIR".to_owned(),
        logs.path().join("keys").display().to_string(),
    ));
    let writer = ConsumerProcess {
        binary: CONSUMERS.into(),
        subcommand: "ledger-writer".into(),
        database_url: stack.database_url.clone(),
        brokers: brokers.clone(),
        group: format!("traces-{}", uuid::Uuid::new_v4().simple()),
        log: logs.path().join("writer.log"),
        env: writer_env,
    };
    let _writer = Reaped(writer.spawn().unwrap());

    let mock = MockLlm::start().await.unwrap();
    let mut options = EnvoyOptions::new(Gateway::Wasm, authz.grpc_port, mock.port());
    options.edits = envoy_tracing(collector.addr.port());
    let envoy = Arc::new(Envoy::start(options).await.unwrap());
    stack
        .set_token_price("openai", "gpt-4o", "USD", ["2.00", "8.00", "1.00"])
        .await
        .unwrap();
    let (agent, key) = stack.agent_with_key("traced-agent", None).await.unwrap();
    stack
        .usd_policy(&agent, "10.00", "daily", "calendar", "charge")
        .await
        .unwrap();

    let auth = format!("Bearer {key}");
    let call = |traceparent: String, tokens: &'static str| {
        let envoy = envoy.clone();
        let auth = auth.clone();
        async move {
            let body = json!({
                "model": "gpt-4o",
                "messages": [{"role": "user", "content": "traced call"}],
                "max_tokens": 64,
            });
            envoy
                .post_json(
                    "/v1/chat/completions",
                    &[
                        ("authorization", auth.as_str()),
                        ("traceparent", traceparent.as_str()),
                        (COMPLETION_TOKENS_HEADER, tokens),
                    ],
                    &body,
                )
                .await
                .unwrap()
        }
    };
    // The unsampled call first: its spans, had any been made, end before the
    // sampled call's and are exported no later.
    let unsampled = call(format!("00-{UNSAMPLED_TRACE}-b7ad6b7169203331-00"), "11").await;
    assert_eq!(unsampled.status, 200, "{}", unsampled.text());
    let sampled = call(format!("00-{TRACE}-{CALLER_SPAN}-01"), "23").await;
    assert_eq!(sampled.status, 200, "{}", sampled.text());

    // Both charges in the ledger.
    let mut conn = stack.db().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let rows = loop {
        let rows = agent_charges(&mut conn, &agent).await.unwrap();
        if rows.len() == 2 {
            break rows;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of 2 ledger rows; writer log:\n{}",
            rows.len(),
            writer.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // The sampled call's charge: its reservation's settle event.
    let reservation = sampled
        .header("x-caracal-reservation-id")
        .expect("the sampled call's reservation id")
        .to_owned();
    let charge = rows
        .iter()
        .find(|r| r.event_id == format!("{reservation}/settle"))
        .unwrap_or_else(|| panic!("no ledger row of {reservation}"));
    assert!(charge.charged_micros > 0);

    // The whole chain of the sampled call, each link the child of the one before.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(45);
    let chain = loop {
        let spans = collector.trace(TRACE);
        let authorize = find(&spans, |s| {
            s.name == "Authorize"
                && s.service == "caracal-authz-service"
                && s.parent_span_id == CALLER_SPAN
        });
        let written = authorize.and_then(|a| {
            let publish = find(&spans, |s| {
                s.name == "outbox publish"
                    && s.parent_span_id == a.span_id
                    && s.attribute("caracal.event_id") == Some(charge.event_id.as_str())
            })?;
            let write = find(&spans, |s| {
                s.service == "caracal-ledger-writer" && s.parent_span_id == publish.span_id
            })?;
            Some((a.clone(), publish.clone(), write.clone()))
        });
        let settle = find(&spans, |s| {
            s.name == "Settle" && s.service == "caracal-authz-service"
        });
        let gateway = find(&spans, |s| s.service == "caracal-gateway");
        if let (Some(chain), Some(settle), Some(gateway)) = (written, settle, gateway) {
            break (chain, settle.clone(), gateway.clone(), spans);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the trace is incomplete:\n{}\nall spans:\n{}",
            summary(&spans),
            summary(&collector.spans())
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let ((authorize, publish, write), settle, gateway, spans) = chain;
    assert_eq!(authorize.kind, SERVER);
    assert_eq!(authorize.attribute("caracal.decision"), Some("allow"));
    assert_eq!(settle.kind, SERVER);
    assert_eq!(settle.parent_span_id, CALLER_SPAN, "{settle:?}");
    assert_eq!(publish.kind, PRODUCER);
    assert_eq!(publish.service, "caracal-authz-service");
    assert_eq!(
        publish.attribute("messaging.destination.name"),
        Some("caracal.metering.events")
    );
    assert_eq!(write.kind, CONSUMER);
    assert_eq!(write.name, "ledger-writer");
    assert_eq!(
        write.attribute("caracal.event_id"),
        Some(charge.event_id.as_str())
    );
    // Envoy's span is the caller's child too: one trace, from the gateway on.
    assert_eq!(gateway.parent_span_id, CALLER_SPAN, "{gateway:?}");
    // Every span of ours in this trace has its parent in the trace (or is the
    // caller's child): nothing dangles.
    for s in spans.iter().filter(|s| s.service != "caracal-gateway") {
        assert!(
            s.parent_span_id == CALLER_SPAN || spans.iter().any(|p| p.span_id == s.parent_span_id),
            "{s:?} has no parent in the trace"
        );
    }

    // The unsampled call left nothing of ours (its caller said no).
    let ours: Vec<ReceivedSpan> = collector
        .trace(UNSAMPLED_TRACE)
        .into_iter()
        .filter(|s| s.service != "caracal-gateway")
        .collect();
    assert!(ours.is_empty(), "{ours:#?}");

    authz.stop();
}
