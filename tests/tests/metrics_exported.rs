//! Issue 25: every metric that an alert rule or a Grafana dashboard of
//! `k8s/monitoring/` names is exported by a running Caracal service.
//!
//! Each service runs as a process of its own (the Prometheus recorder is
//! process-wide, so in one process every service's `/metrics` would show them all):
//! the authz-service (on the local Redis Cluster, as production runs it, with the
//! outbox relay, the admin-event relay, the DLQ monitor and the reconcile-drift
//! monitor), the ledger-writer with its Merkle sequencer, the audit-logger and the
//! metrics-aggregator, all on one fresh PostgreSQL database and a fresh tansu
//! broker, and Envoy with the Caracal wasm filter in front of a mock OpenAI. A
//! little traffic goes through Envoy (calls allowed and settled, one refused) and
//! is drained through Kafka into the ledger, the audit log, the Merkle log and the
//! spend gauges, so labelled series exist. Then every `/metrics` (Envoy's
//! `/stats/prometheus`) is scraped over HTTP and parsed, and every metric name the
//! PromQL of the rule files and dashboards names must have a sample in at least one
//! of them. Names owned by other exporters are listed in [`EXTERNAL`], each with its
//! reason; recording rules' own names are Prometheus's.
//!
//! `scripts/check-deploy.sh` checks the same names against the metric-name literals
//! of the sources; this test checks them against what the processes really serve.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::Path,
    sync::Arc,
    time::Duration,
};

use caracal_tests::{
    consumer_process::{terminate, ConsumerProcess, Reaped},
    envoy::{free_port, repo_root, Envoy, EnvoyOptions, Gateway},
    kafka::Tansu,
    mock_llm::{MockLlm, COMPLETION_TOKENS_HEADER},
    probe::{http_get, metric_value},
    redis_cluster,
    service_process::ServiceProcess,
};
use serde_json::json;

const AUTHZ: &str = env!("CARGO_BIN_EXE_authz-under-test");
const CONSUMERS: &str = env!("CARGO_BIN_EXE_consumers-under-test");

/// Metric names a rule or dashboard may use that no Caracal process exports: each
/// with why it is someone else's (a third-party exporter's, or Prometheus's own).
/// An entry no rule or dashboard uses fails the test (the list cannot go stale).
/// None today: the guide's `up{job="postgres"}` (postgres_exporter) was replaced by
/// Caracal's own `caracal_db_errors_total` (k8s/README.md, "Not expressible").
const EXTERNAL: &[(&str, &str)] = &[];

/// At least this many distinct names are expected from the rules and dashboards
/// (62 today): fewer means the extraction broke, not that the files shrank.
const MIN_NAMES: usize = 50;

/// PromQL words that are not metric names: keywords, binary operators, modifiers,
/// aggregation operators (which may stand before `by (...)`, not before `(`).
const NOT_METRICS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
    "atan2",
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "group",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "limitk",
    "limit_ratio",
];

/// Replaces the contents of string literals ('...', "...", `...`) with nothing.
fn strip_strings(expr: &str) -> String {
    let mut out = String::with_capacity(expr.len());
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in expr.chars() {
        match quote {
            Some(q) => {
                if escaped {
                    escaped = false;
                } else if c == '\\' && q != '`' {
                    escaped = true;
                } else if c == q {
                    quote = None;
                    out.push(c);
                }
            }
            None => {
                if matches!(c, '"' | '\'' | '`') {
                    quote = Some(c);
                }
                out.push(c);
            }
        }
    }
    out
}

/// Drops everything between `open` and its matching `close` (label matchers, range
/// and subquery selectors), keeping the brackets.
fn strip_between(expr: &str, open: char, close: char) -> String {
    let mut out = String::with_capacity(expr.len());
    let mut depth = 0usize;
    for c in expr.chars() {
        if c == open {
            if depth == 0 {
                out.push(c);
            }
            depth += 1;
        } else if c == close && depth > 0 {
            depth -= 1;
            if depth == 0 {
                out.push(c);
            }
        } else if depth == 0 {
            out.push(c);
        }
    }
    out
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// The metric names a PromQL expression selects: identifiers that are not called
/// (functions, aggregations), not keywords, not label names (matchers and the
/// label lists of `by`, `without`, `on`, `ignoring`, `group_left`, `group_right`
/// are dropped first), not numbers or durations and not Grafana variables (`$x`).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let e = strip_strings(expr);
    let e = strip_between(&e, '{', '}');
    let e = strip_between(&e, '[', ']');
    let chars: Vec<char> = e.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    // The previous identifier was a label-list keyword: a `(...)` after it is labels.
    let mut label_list_next = false;
    while i < chars.len() {
        let c = chars[i];
        if c.is_ascii_digit() || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) {
            // A number (1e6, 0.99, 0x1f) or a duration (5m): one token.
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
            label_list_next = false;
            continue;
        }
        if c == '$' {
            // A Grafana variable ($__rate_interval, $datasource).
            i += 1;
            while i < chars.len() && is_ident(chars[i]) {
                i += 1;
            }
            continue;
        }
        if c == '(' && label_list_next {
            let mut depth = 0usize;
            while i < chars.len() {
                match chars[i] {
                    '(' => depth += 1,
                    ')' => {
                        depth -= 1;
                        if depth == 0 {
                            i += 1;
                            break;
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            label_list_next = false;
            continue;
        }
        if !is_ident_start(c) {
            if !c.is_whitespace() {
                label_list_next = false;
            }
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && is_ident(chars[i]) {
            i += 1;
        }
        let ident: String = chars[start..i].iter().collect();
        let lower = ident.to_ascii_lowercase();
        label_list_next = matches!(
            lower.as_str(),
            "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
        );
        let mut j = i;
        while j < chars.len() && chars[j].is_whitespace() {
            j += 1;
        }
        let called = chars.get(j) == Some(&'(');
        if called || NOT_METRICS.contains(&lower.as_str()) {
            continue;
        }
        names.insert(ident);
    }
    names
}

/// Where each metric name is used: "rule X" / "dashboard.json panel 'Y'".
#[derive(Default)]
struct Uses {
    names: BTreeMap<String, BTreeSet<String>>,
    /// Names recording rules define (Prometheus makes them).
    recorded: BTreeSet<String>,
    rules: usize,
    queries: usize,
}

impl Uses {
    fn add(&mut self, expr: &str, place: &str) {
        for n in metric_names(expr) {
            self.names.entry(n).or_default().insert(place.to_owned());
        }
    }
}

/// Every PrometheusRule document of the monitoring kustomization's rule files.
fn rule_uses(dir: &Path, uses: &mut Uses) {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        for part in text.split("\n---") {
            let doc: serde_yaml::Value = serde_yaml::from_str(part).unwrap();
            if doc.get("kind").and_then(|k| k.as_str()) != Some("PrometheusRule") {
                continue;
            }
            let groups = doc["spec"]["groups"].as_sequence().unwrap();
            for g in groups {
                for r in g["rules"].as_sequence().unwrap() {
                    let expr = match &r["expr"] {
                        serde_yaml::Value::String(s) => s.clone(),
                        other => serde_yaml::to_string(other).unwrap(),
                    };
                    let name = r
                        .get("alert")
                        .or_else(|| r.get("record"))
                        .and_then(|v| v.as_str())
                        .unwrap_or("?");
                    if let Some(record) = r.get("record").and_then(|v| v.as_str()) {
                        uses.recorded.insert(record.to_owned());
                    }
                    uses.rules += 1;
                    let file = path.file_name().unwrap().to_string_lossy();
                    uses.add(&expr, &format!("{file} rule {name}"));
                }
            }
        }
    }
}

/// Every `expr` of every dashboard (panels at any depth, rows' panels), and the
/// metric of `label_values(metric, label)` template variables.
fn dashboard_uses(dir: &Path, uses: &mut Uses) {
    fn walk(v: &serde_json::Value, title: &str, file: &str, uses: &mut Uses) {
        match v {
            serde_json::Value::Object(m) => {
                let title = m.get("title").and_then(|t| t.as_str()).unwrap_or(title);
                if let Some(expr) = m.get("expr").and_then(|e| e.as_str()) {
                    uses.queries += 1;
                    uses.add(expr, &format!("{file} panel {title:?}"));
                }
                if let Some(q) = m.get("query").and_then(|q| q.as_str()) {
                    if let Some(args) = q.trim().strip_prefix("label_values(") {
                        let metric = args.split(',').next().unwrap_or("");
                        if args.contains(',') {
                            uses.queries += 1;
                            uses.add(metric, &format!("{file} variable {title:?}"));
                        }
                    }
                }
                for child in m.values() {
                    walk(child, title, file, uses);
                }
            }
            serde_json::Value::Array(a) => {
                for child in a {
                    walk(child, title, file, uses);
                }
            }
            _ => {}
        }
    }
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 6, "expected the six dashboards in {dir:?}");
    for path in files {
        let dash: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        walk(&dash, "", &file, uses);
    }
}

/// What a Prometheus text exposition declares and serves.
#[derive(Default, Debug)]
struct Exposition {
    /// Names with at least one sample line.
    sampled: BTreeSet<String>,
    /// Names of `# TYPE` / `# HELP` lines (a histogram's or summary's series
    /// names added: `_bucket`, `_sum`, `_count`).
    declared: BTreeSet<String>,
}

fn parse_exposition(text: &str) -> Exposition {
    let mut out = Exposition::default();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line
            .strip_prefix("# TYPE ")
            .or_else(|| line.strip_prefix("# HELP "))
        {
            let mut parts = rest.split_whitespace();
            let Some(name) = parts.next() else { continue };
            out.declared.insert(name.to_owned());
            if line.starts_with("# TYPE ") {
                let suffixes: &[&str] = match parts.next() {
                    Some("histogram") => &["_bucket", "_sum", "_count"],
                    Some("summary") => &["_sum", "_count"],
                    _ => &[],
                };
                for s in suffixes {
                    out.declared.insert(format!("{name}{s}"));
                }
            }
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let name: String = line.chars().take_while(|c| is_ident(*c)).collect();
        let rest = &line[name.len()..];
        // A sample: name, then labels or a value.
        if !name.is_empty() && (rest.starts_with('{') || rest.starts_with(' ')) {
            out.sampled.insert(name);
        }
    }
    out
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// One consumer process of `subcommand` with `/metrics` on `http`.
fn consumer(
    subcommand: &str,
    db_url: &str,
    brokers: &str,
    http: u16,
    log_dir: &Path,
    more: Vec<(String, String)>,
) -> ConsumerProcess {
    let mut env = vec![
        (
            "CARACAL_CONSUMER_HTTP_ADDR".to_owned(),
            format!("127.0.0.1:{http}"),
        ),
        ("CARACAL_CONSUMER_LEASE_INTERVAL_MS".into(), "300".into()),
        ("CARACAL_CONSUMER_LAG_INTERVAL_MS".into(), "300".into()),
    ];
    env.extend(more);
    ConsumerProcess {
        binary: CONSUMERS.into(),
        subcommand: subcommand.to_owned(),
        database_url: db_url.to_owned(),
        brokers: brokers.to_owned(),
        group: format!("metrics-{subcommand}-{}", uuid::Uuid::new_v4().simple()),
        log: log_dir.join(format!("{subcommand}.log")),
        env,
    }
}

/// Fails with `what` once `deadline` has passed.
fn before(deadline: tokio::time::Instant, what: impl FnOnce() -> String) {
    assert!(
        tokio::time::Instant::now() < deadline,
        "timed out waiting for {}",
        what()
    );
}

#[test]
fn promql_names_are_extracted_without_functions_labels_or_keywords() {
    let names = |e: &str| metric_names(e).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(
            "histogram_quantile(0.99,\n  sum by (le, method) \
             (rate(caracal_authz_request_duration_seconds_bucket{job=\"a,b\"}[5m]))) > 0.1"
        ),
        ["caracal_authz_request_duration_seconds_bucket"]
    );
    assert_eq!(
        names(
            "max by (group) (caracal_consumer_lease_members) == 0 or \
             absent(caracal_consumer_lease_members)"
        ),
        ["caracal_consumer_lease_members"]
    );
    assert_eq!(
        names("sum(rate(a_total[$__rate_interval])) / ignoring(x) group_left(y) b * 3600 / 1e6"),
        ["a_total", "b"]
    );
    assert_eq!(
        names("up{job=\"postgres\"} == 0 unless on() c offset 5m"),
        ["c", "up"]
    );
    assert_eq!(
        names("topk(10, max by (agent_id, currency) (spend)) / 1e-6"),
        ["spend"]
    );
    assert_eq!(names("sum without (pod) (x:rate5m)"), ["x:rate5m"]);
    assert_eq!(names("count(x) by (le)"), ["x"]);
    assert!(names("vector(1) + time()").is_empty());
}

#[test]
fn expositions_give_sample_and_declared_names() {
    let text = "# HELP h_seconds latency\n# TYPE h_seconds histogram\n\
                h_seconds_bucket{le=\"0.1\"} 1\nh_seconds_sum 0.05\nh_seconds_count 1\n\
                # TYPE c_total counter\nc_total{kind=\"db\"} 0\n\
                # TYPE s summary\ns{quantile=\"0.5\"} 2\ns_sum 2\ns_count 1\n\
                # TYPE g gauge\n";
    let e = parse_exposition(text);
    let sampled: Vec<&str> = e.sampled.iter().map(String::as_str).collect();
    assert_eq!(
        sampled,
        [
            "c_total",
            "h_seconds_bucket",
            "h_seconds_count",
            "h_seconds_sum",
            "s",
            "s_count",
            "s_sum"
        ]
    );
    assert!(e.declared.contains("g") && e.declared.contains("h_seconds_bucket"));
    assert!(!e.sampled.contains("g"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_in_a_rule_or_dashboard_is_exported_by_a_running_service() {
    // What the rules and dashboards name.
    let monitoring = repo_root().join("k8s/monitoring");
    let mut uses = Uses::default();
    rule_uses(&monitoring, &mut uses);
    dashboard_uses(&monitoring.join("dashboards"), &mut uses);
    assert!(
        uses.rules >= 20 && uses.queries >= 50,
        "{} rules and {} dashboard queries read: is k8s/monitoring where it was?",
        uses.rules,
        uses.queries
    );
    assert!(
        uses.names.len() >= MIN_NAMES,
        "only {} metric names extracted from the rules and dashboards (expected >= \
         {MIN_NAMES}): {:?}",
        uses.names.len(),
        uses.names.keys().collect::<Vec<_>>()
    );
    for known in [
        "caracal_requests_total",
        "caracal_authz_request_duration_seconds_bucket",
        "kafka_consumer_lag",
        "caracal_merkle_checkpoint_age_seconds",
        "caracal_filter_settle_dropped_total",
    ] {
        assert!(uses.names.contains_key(known), "{known} not extracted");
    }
    for (name, why) in EXTERNAL {
        assert!(
            uses.names.contains_key(*name),
            "EXTERNAL lists {name} ({why}), which no rule or dashboard uses any more"
        );
    }

    // Every service, each in its own process.
    let tansu = Tansu::start_new().await.unwrap();
    let brokers = tansu.brokers();
    let nodes = redis_cluster::ensure_shared().await.unwrap();
    let seeds = nodes.clone();
    let (stack, authz) = ServiceProcess::start_with(
        Path::new(AUTHZ),
        &[
            ("CARACAL_RELAY_ENABLED", "true".to_owned()),
            ("CARACAL_KAFKA_BROKERS", brokers.clone()),
            ("CARACAL_DLQ_MONITOR_INTERVAL", "1".to_owned()),
            ("CARACAL_RECONCILE_MONITOR_INTERVAL", "1".to_owned()),
        ],
        move |redis| {
            redis.mode = caracal_authz::config::RedisMode::Cluster;
            redis.nodes = seeds;
            redis.replica_ack_timeout_ms = 1_000;
            redis.timeout_ms = 3_000;
        },
    )
    .await
    .unwrap();
    let logs = tempfile::tempdir().unwrap();
    let keys = tempfile::tempdir().unwrap();
    let redis_env = vec![
        ("CARACAL_REDIS_MODE".to_owned(), "cluster".to_owned()),
        ("CARACAL_REDIS_NODES".to_owned(), nodes.join(",")),
        (
            "CARACAL_REDIS_KEY_PREFIX".to_owned(),
            stack.key_prefix.clone(),
        ),
        (
            "CARACAL_AGGREGATOR_UPKEEP_INTERVAL_MS".to_owned(),
            "300".to_owned(),
        ),
    ];
    let merkle_env = vec![
        (
            "CARACAL_LEDGER_WRITER_MERKLE_KEY_DIR".to_owned(),
            keys.path().display().to_string(),
        ),
        (
            "CARACAL_LEDGER_WRITER_MERKLE_BATCH_TIMEOUT_SECONDS".to_owned(),
            "1".to_owned(),
        ),
        (
            "CARACAL_LEDGER_WRITER_MERKLE_SELF_CHECK_INTERVAL_SECONDS".to_owned(),
            "1".to_owned(),
        ),
    ];
    let mut consumers = Vec::new();
    for (name, more) in [
        ("ledger-writer", merkle_env),
        ("audit-logger", Vec::new()),
        ("metrics-aggregator", redis_env),
    ] {
        let port = free_port().unwrap();
        let process = consumer(name, &stack.database_url, &brokers, port, logs.path(), more);
        let child = Reaped(process.spawn().unwrap());
        consumers.push((name, port, process, child));
    }
    let mock = MockLlm::start().await.unwrap();
    let envoy = Arc::new(
        Envoy::start(EnvoyOptions::new(
            Gateway::Wasm,
            authz.grpc_port,
            mock.port(),
        ))
        .await
        .unwrap(),
    );

    // Traffic: admin writes (admin outbox), calls allowed and settled from their
    // usage, one refused at the limit.
    stack
        .set_token_price("openai", "gpt-4o", "USD", ["2.00", "8.00", "1.00"])
        .await
        .unwrap();
    let (agent, key) = stack.agent_with_key("metrics-agent", None).await.unwrap();
    let policy = stack
        .usd_policy(&agent, "10.00", "daily", "calendar", "charge")
        .await
        .unwrap();
    let (poor, poor_key) = stack.agent_with_key("metrics-poor", None).await.unwrap();
    stack
        .usd_policy(&poor, "0.000001", "daily", "calendar", "charge")
        .await
        .unwrap();
    let call = |key: String, i: usize| {
        let envoy = envoy.clone();
        async move {
            let body = json!({
                "model": "gpt-4o",
                "messages": [{"role": "user", "content": format!("metrics call {i}")}],
                "max_tokens": 64,
            });
            let auth = format!("Bearer {key}");
            let tokens = (10 + i).to_string();
            envoy
                .post_json(
                    "/v1/chat/completions",
                    &[
                        ("authorization", auth.as_str()),
                        (COMPLETION_TOKENS_HEADER, tokens.as_str()),
                    ],
                    &body,
                )
                .await
                .unwrap()
        }
    };
    const CALLS: usize = 3;
    for i in 0..CALLS {
        let resp = call(key.clone(), i).await;
        assert_eq!(resp.status, 200, "{}", resp.text());
    }
    let refused = call(poor_key.clone(), 99).await;
    assert_eq!(refused.status, 429, "{}", refused.text());

    // Drained: every charge in the ledger and under a signed checkpoint, audit
    // rows written, the spend gauges set.
    let mut conn = stack.db().await.unwrap();
    let log_of = |name: &str| {
        consumers
            .iter()
            .find(|c| c.0 == name)
            .map(|c| c.2.log_tail(30))
            .unwrap_or_default()
    };
    let pause = || tokio::time::sleep(Duration::from_millis(200));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while stack.count("ledger_events").await.unwrap() < CALLS as i64 {
        before(deadline, || {
            format!("ledger rows: {}", log_of("ledger-writer"))
        });
        pause().await;
    }
    loop {
        let (_, checkpointed) = caracal_merkle_log::sequencer::state(&mut conn)
            .await
            .unwrap();
        if checkpointed >= CALLS as u64 {
            break;
        }
        before(deadline, || {
            format!("a checkpoint: {}", log_of("ledger-writer"))
        });
        pause().await;
    }
    while stack.count("audit_logs").await.unwrap() == 0 {
        before(deadline, || {
            format!("audit rows: {}", log_of("audit-logger"))
        });
        pause().await;
    }
    let aggregator = addr(consumers[2].1);
    loop {
        let (_, text) = http_get(aggregator, "/metrics").await;
        if parse_exposition(&text)
            .sampled
            .contains("caracal_spend_total_micros")
        {
            break;
        }
        before(deadline, || {
            format!("spend gauges: {}", log_of("metrics-aggregator"))
        });
        pause().await;
    }
    // Two reconcile-monitor runs and two DLQ scans after the traffic.
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Scrape every service.
    let mut targets: Vec<(String, SocketAddr, &str)> = vec![
        ("authz-service".into(), addr(authz.http_port), "/metrics"),
        (
            "gateway (Envoy)".into(),
            addr(envoy.admin_port),
            "/stats/prometheus",
        ),
    ];
    for (name, port, _, _) in &consumers {
        targets.push(((*name).to_owned(), addr(*port), "/metrics"));
    }
    let mut exporters: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut declared_only: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (service, at, path) in &targets {
        let (status, text) = http_get(*at, path).await;
        assert_eq!(status, 200, "{service}: GET {path} on {at}: {text}");
        let e = parse_exposition(&text);
        assert!(
            !e.sampled.is_empty(),
            "{service}: no samples in {path}:\n{text}"
        );
        eprintln!(
            "{service} ({at}{path}): {} metric names with samples",
            e.sampled.len()
        );
        for n in &e.sampled {
            exporters
                .entry(n.clone())
                .or_default()
                .insert(service.clone());
        }
        for n in e.declared.difference(&e.sampled) {
            declared_only
                .entry(n.clone())
                .or_default()
                .insert(service.clone());
        }
    }

    // Values of the two metrics added for the rules (not only their names): the
    // drained pipeline leaves no relay lag and no drift; a budget counter changed
    // behind the ledger's back is drift once it held still for a monitor interval.
    let authz_at = addr(authz.http_port);
    let text = http_get(authz_at, "/metrics").await.1;
    assert_eq!(
        metric_value(&text, "caracal_outbox_oldest_age_seconds", &[]),
        Some(0.0)
    );
    assert_eq!(
        metric_value(&text, "caracal_reconcile_drift_windows", &[]),
        Some(0.0)
    );
    assert!(metric_value(&text, "caracal_reconcile_runs_total", &["result=\"ok\""]) >= Some(1.0));
    let counters = stack.policy_counter_keys(&policy).await.unwrap();
    assert_eq!(counters.len(), 1, "{counters:?}");
    let mut redis = stack.redis_conn().unwrap();
    let _: i64 = ::redis::cmd("HINCRBY")
        .arg(&counters[0])
        .arg("s")
        .arg(5_000)
        .query_async(&mut redis)
        .await
        .unwrap();
    loop {
        let text = http_get(authz_at, "/metrics").await.1;
        let windows = metric_value(&text, "caracal_reconcile_drift_windows", &[]);
        let micros = metric_value(
            &text,
            "caracal_reconcile_drift_micros",
            &["currency=\"USD\""],
        );
        if windows == Some(1.0) && micros == Some(5_000.0) {
            break;
        }
        before(deadline, || {
            format!("drift reported: {windows:?} {micros:?}")
        });
        pause().await;
    }

    let external: BTreeSet<&str> = EXTERNAL.iter().map(|(n, _)| *n).collect();
    let mut missing = Vec::new();
    for (name, places) in &uses.names {
        if external.contains(name.as_str()) || uses.recorded.contains(name) {
            continue;
        }
        match exporters.get(name) {
            Some(services) => eprintln!(
                "  {name}: {}",
                services.iter().cloned().collect::<Vec<_>>().join(", ")
            ),
            None => {
                let declared = declared_only
                    .get(name)
                    .map(|s| {
                        format!(
                            " (declared without a sample by {})",
                            s.iter().cloned().collect::<Vec<_>>().join(", ")
                        )
                    })
                    .unwrap_or_default();
                missing.push(format!(
                    "{name}{declared}, used by: {}",
                    places.iter().cloned().collect::<Vec<_>>().join("; ")
                ));
            }
        }
    }
    eprintln!(
        "{} metric names in {} rules and {} dashboard queries; {} external, {} recorded",
        uses.names.len(),
        uses.rules,
        uses.queries,
        external.len(),
        uses.recorded.len()
    );

    // Stop everything before judging (the processes' logs stay in `logs`).
    drop(envoy);
    for (name, _, _, mut child) in consumers {
        if let Err(e) = terminate(&mut child.0, Duration::from_secs(30)) {
            eprintln!("{name}: {e:#}");
        }
    }
    drop(conn);
    let mut authz = authz;
    authz.stop();
    stack.stop().await.unwrap();
    drop(tansu);
    drop(mock);

    assert!(
        missing.is_empty(),
        "{} metric(s) named by an alert rule or a dashboard are exported by no service:\n  {}",
        missing.len(),
        missing.join("\n  ")
    );
}
