//! LedgerService (QueryLedger, LedgerSummary, Reconcile) and `caracal ledger`
//! against a real authz-service on real PostgreSQL and Redis.
//!
//! - Query and summary totals for a three-level hierarchy (root -> child ->
//!   grandchild), with a late settle that supersedes an expiry charge: exact
//!   counts, sums, pages, breakdowns.
//! - Reconcile: real Authorize + Settle (and an expiry followed by a late
//!   Settle) move the Redis counters; the charge events the scripts wrote to the
//!   outbox are converted exactly as the relay converts them and written by the
//!   ledger-writer's own decode + insert. Zero drift; then a changed ledger row
//!   and a changed counter show up as exactly that drift.
//! - The `caracal` binary as a process: `ledger query --output csv` and the exit
//!   code of `ledger reconcile`.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use caracal_consumers::ledger::{insert_rows, LedgerRow};
use caracal_proto::v1::{self as pb, ledger_service_client::LedgerServiceClient};
use caracal_tests::{
    authorize_request,
    cli_process::{run_caracal, Run},
    reflection::reflected_services,
    Bearer, Svc, TestStack, ADMIN_TOKEN,
};
use chrono::{DateTime, Utc};
use diesel_async::RunQueryDsl;
use tonic::Code;

fn ledger(stack: &TestStack) -> LedgerServiceClient<Svc> {
    LedgerServiceClient::with_interceptor(
        stack.channel.clone(),
        Bearer(Some(ADMIN_TOKEN.to_owned())),
    )
}

fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .unwrap()
        .with_timezone(&Utc)
}

fn usd(micros: i64) -> pb::Money {
    pb::Money {
        currency: "USD".into(),
        micros,
        amount: String::new(),
    }
}

/// A ledger row as the ledger-writer writes it.
#[allow(clippy::too_many_arguments)]
fn row(
    event_id: &str,
    kind: &str,
    agent: &str,
    root: &str,
    currency: &str,
    (reserved, charged): (i64, i64),
    (input, output, cached): (i64, i64, i64),
    (provider, model): (&str, &str),
    occurred_at: &str,
) -> LedgerRow {
    let reservation = event_id.split('/').next().unwrap().to_owned();
    let occurred_at = at(occurred_at);
    LedgerRow {
        event_id: event_id.to_owned(),
        kind: kind.to_owned(),
        reservation_id: reservation.clone(),
        request_id: format!("req-{reservation}"),
        agent_id: agent.parse().unwrap(),
        root_agent_id: root.parse().unwrap(),
        policy_ids: vec![],
        currency: currency.to_owned(),
        reserved_micros: reserved,
        charged_micros: charged,
        overshoot_micros: (charged - reserved).max(0),
        input_tokens: input,
        output_tokens: output,
        cached_input_tokens: cached,
        provider: provider.to_owned(),
        model: model.to_owned(),
        price_version: 1,
        schema_version: 1,
        occurred_at,
        reserved_at: Some(occurred_at - chrono::Duration::seconds(5)),
        kafka_topic: "caracal.metering.events".to_owned(),
        kafka_partition: 0,
        kafka_offset: 0,
    }
}

async fn new_agent(stack: &TestStack, name: &str, parent: &str) -> String {
    stack
        .agents()
        .create_agent(pb::CreateAgentRequest {
            name: name.into(),
            agent_type: "openai".into(),
            parent_id: parent.into(),
            metadata_json: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .id
}

fn dates(start: &str, end: &str) -> Option<pb::LedgerTimeRange> {
    Some(pb::LedgerTimeRange {
        start_date: start.into(),
        end_date: end.into(),
        ..Default::default()
    })
}

async fn query_all(
    stack: &TestStack,
    agent: &str,
    range: Option<pb::LedgerTimeRange>,
    children: bool,
    page_size: u32,
) -> (Vec<pb::LedgerEntry>, usize) {
    let mut client = ledger(stack);
    let mut token = String::new();
    let mut entries = Vec::new();
    let mut pages = 0;
    for _ in 0..1000 {
        let page = client
            .query_ledger(pb::QueryLedgerRequest {
                agent_id: agent.into(),
                range: range.clone(),
                aggregate_children: children,
                page_size,
                page_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.entries.len() <= page_size.max(1) as usize);
        entries.extend(page.entries);
        if page.next_page_token.is_empty() {
            return (entries, pages);
        }
        token = page.next_page_token;
    }
    panic!("more than 1000 pages");
}

fn ids(entries: &[pb::LedgerEntry]) -> Vec<&str> {
    entries.iter().map(|e| e.event_id.as_str()).collect()
}

fn charged_sum(entries: &[pb::LedgerEntry]) -> i64 {
    entries
        .iter()
        .map(|e| e.charged.as_ref().unwrap().micros)
        .sum()
}

fn totals<'a>(list: &'a [pb::LedgerTotals], currency: &str) -> &'a pb::LedgerTotals {
    list.iter()
        .find(|t| t.currency == currency)
        .unwrap_or_else(|| panic!("no {currency} totals in {list:?}"))
}

fn micros(m: &Option<pb::Money>) -> i64 {
    m.as_ref().unwrap().micros
}

#[tokio::test]
async fn query_and_summary_over_a_three_level_hierarchy() {
    let stack = TestStack::start().await.unwrap();
    let root = new_agent(&stack, "ledger-root", "").await;
    let child = new_agent(&stack, "ledger-child", &root).await;
    let grandchild = new_agent(&stack, "ledger-grandchild", &child).await;
    let other = new_agent(&stack, "ledger-other", "").await;

    let gpt = ("openai", "gpt-4o");
    let claude = ("anthropic", "claude-3");
    let rows = vec![
        row(
            "r1/settle",
            "settle",
            &root,
            &root,
            "USD",
            (800_000, 1_000_000),
            (100, 50, 10),
            gpt,
            "2026-02-01T10:00:00Z",
        ),
        row(
            "r2/settle",
            "settle",
            &root,
            &root,
            "USD",
            (3_000_000, 2_500_000),
            (200, 100, 0),
            claude,
            "2026-02-02T09:00:00Z",
        ),
        row(
            "c1/settle",
            "settle",
            &child,
            &root,
            "USD",
            (300_000, 300_000),
            (30, 10, 5),
            gpt,
            "2026-02-01T12:00:00Z",
        ),
        // Expired just before midnight, settled late just after: the late settle
        // carries the final charge (700,000) and supersedes the expiry's 500,000.
        row(
            "c2/expire",
            "expire_charge",
            &child,
            &root,
            "USD",
            (500_000, 500_000),
            (0, 0, 0),
            gpt,
            "2026-02-02T23:59:00Z",
        ),
        row(
            "c2/settle",
            "late_settle",
            &child,
            &root,
            "USD",
            (500_000, 700_000),
            (70, 30, 0),
            gpt,
            "2026-02-03T00:10:00Z",
        ),
        row(
            "c3/settle",
            "settle",
            &child,
            &root,
            "EUR",
            (50_000, 50_000),
            (5, 5, 0),
            ("openai", "gpt-4o-mini"),
            "2026-02-02T10:00:00Z",
        ),
        row(
            "g1/settle",
            "settle",
            &grandchild,
            &root,
            "USD",
            (400_000, 400_000),
            (40, 20, 0),
            claude,
            "2026-02-03T08:00:00Z",
        ),
        // Outside 2026-02-01..=2026-02-03.
        row(
            "g2/settle",
            "settle",
            &grandchild,
            &root,
            "USD",
            (9_000_000, 9_000_000),
            (1, 1, 1),
            claude,
            "2026-02-04T00:00:00Z",
        ),
        row(
            "g0/settle",
            "settle",
            &grandchild,
            &root,
            "USD",
            (8_000_000, 8_000_000),
            (1, 1, 1),
            claude,
            "2026-01-31T23:59:59.999Z",
        ),
        // Another hierarchy: never counted.
        row(
            "o1/settle",
            "settle",
            &other,
            &other,
            "USD",
            (77_000, 77_000),
            (7, 7, 7),
            gpt,
            "2026-02-02T10:00:00Z",
        ),
    ];
    let mut conn = stack.db().await.unwrap();
    assert_eq!(insert_rows(&mut conn, &rows).await.unwrap(), rows.len());
    let feb = || dates("2026-02-01", "2026-02-03");

    // The root alone: its two rows.
    let (own, _) = query_all(&stack, &root, feb(), false, 100).await;
    assert_eq!(ids(&own), ["r1/settle", "r2/settle"]);
    assert_eq!(charged_sum(&own), 3_500_000);

    // With every descendant: seven rows in the range, oldest first, every field.
    let (all, pages) = query_all(&stack, &root, feb(), true, 100).await;
    assert_eq!(pages, 1);
    assert_eq!(
        ids(&all),
        [
            "r1/settle",
            "c1/settle",
            "r2/settle",
            "c3/settle",
            "c2/expire",
            "c2/settle",
            "g1/settle"
        ]
    );
    let superseded: Vec<&str> = all
        .iter()
        .filter(|e| e.superseded)
        .map(|e| e.event_id.as_str())
        .collect();
    assert_eq!(superseded, ["c2/expire"]);
    let late = all.iter().find(|e| e.event_id == "c2/settle").unwrap();
    assert_eq!(late.kind, "late_settle");
    assert_eq!(late.agent_id, child);
    assert_eq!(late.root_agent_id, root);
    assert_eq!(micros(&late.reserved), 500_000);
    assert_eq!(micros(&late.charged), 700_000);
    assert_eq!(micros(&late.overshoot), 200_000);
    assert_eq!(late.charged.as_ref().unwrap().amount, "0.70");
    assert_eq!(
        late.usage,
        Some(pb::TokenUsage {
            input_tokens: 70,
            output_tokens: 30,
            cached_input_tokens: 0
        })
    );
    assert_eq!((late.provider.as_str(), late.model.as_str()), gpt);
    assert_eq!(late.request_id, "req-c2");
    assert_eq!(late.price_version, 1);
    assert_eq!(late.schema_version, 1);
    assert_eq!(late.kafka_topic, "caracal.metering.events");
    let occurred = late.occurred_at.unwrap();
    assert_eq!(occurred.seconds, at("2026-02-03T00:10:00Z").timestamp());
    assert_eq!(late.reserved_at.unwrap().seconds, occurred.seconds - 5);
    assert!(late.ingested_at.is_some());

    // Small pages return every row once, in the same order.
    for size in [1, 2, 3] {
        let (paged, pages) = query_all(&stack, &root, feb(), true, size).await;
        assert_eq!(ids(&paged), ids(&all), "page size {size}");
        assert_eq!(pages, 7usize.div_ceil(size as usize), "page size {size}");
    }
    // The boundaries: the start date from 00:00, the end date included to its end.
    let (one_day, _) = query_all(
        &stack,
        &grandchild,
        dates("2026-02-04", "2026-02-04"),
        true,
        10,
    )
    .await;
    assert_eq!(ids(&one_day), ["g2/settle"]);
    let (jan, _) = query_all(
        &stack,
        &grandchild,
        dates("2026-01-31", "2026-01-31"),
        false,
        10,
    )
    .await;
    assert_eq!(ids(&jan), ["g0/settle"]);
    // The middle level covers itself and the grandchild; no range is all time.
    let (mid, _) = query_all(&stack, &child, feb(), true, 100).await;
    assert_eq!(mid.len(), 5);
    let (g_all, _) = query_all(&stack, &grandchild, None, false, 100).await;
    assert_eq!(charged_sum(&g_all), 17_400_000);

    // Summary of the root alone, all time.
    let s = ledger(&stack)
        .ledger_summary(pb::LedgerSummaryRequest {
            agent_id: root.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.agent_count, 1);
    assert_eq!(s.totals.len(), 1);
    let t = totals(&s.totals, "USD");
    assert_eq!(
        (
            micros(&t.charged),
            micros(&t.reserved),
            micros(&t.overshoot)
        ),
        (3_500_000, 3_800_000, 200_000)
    );
    assert_eq!((t.event_count, t.superseded_count), (2, 0));
    assert!(s.breakdown.is_empty());

    // The whole hierarchy in the range: the late settle counts, the expiry it
    // supersedes does not.
    let summary = |breakdown: pb::LedgerBreakdown| pb::LedgerSummaryRequest {
        agent_id: root.clone(),
        range: feb(),
        aggregate_children: true,
        breakdown: breakdown as i32,
    };
    let s = ledger(&stack)
        .ledger_summary(summary(pb::LedgerBreakdown::None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.agent_count, 3);
    assert_eq!(s.totals.len(), 2);
    let t = totals(&s.totals, "USD");
    assert_eq!(
        micros(&t.charged),
        1_000_000 + 2_500_000 + 300_000 + 700_000 + 400_000
    );
    assert_eq!(
        micros(&t.reserved),
        800_000 + 3_000_000 + 300_000 + 500_000 + 400_000
    );
    assert_eq!(micros(&t.overshoot), 200_000 + 200_000);
    assert_eq!((t.event_count, t.superseded_count), (5, 1));
    assert_eq!(
        (t.input_tokens, t.output_tokens, t.cached_input_tokens),
        (100 + 200 + 30 + 70 + 40, 50 + 100 + 10 + 30 + 20, 10 + 5)
    );
    let eur = totals(&s.totals, "EUR");
    assert_eq!((micros(&eur.charged), eur.event_count), (50_000, 1));

    // Per model.
    let s = ledger(&stack)
        .ledger_summary(summary(pb::LedgerBreakdown::Model))
        .await
        .unwrap()
        .into_inner();
    let groups: Vec<(String, String, String, i64, i64, i64)> = s
        .breakdown
        .iter()
        .map(|t| {
            (
                t.provider.clone(),
                t.model.clone(),
                t.currency.clone(),
                micros(&t.charged),
                t.event_count,
                t.superseded_count,
            )
        })
        .collect();
    let g = |p: &str, m: &str, c: &str, ch: i64, n: i64, sup: i64| {
        (p.to_owned(), m.to_owned(), c.to_owned(), ch, n, sup)
    };
    assert_eq!(
        groups,
        [
            g("anthropic", "claude-3", "USD", 2_900_000, 2, 0),
            g("openai", "gpt-4o", "USD", 2_000_000, 3, 1),
            g("openai", "gpt-4o-mini", "EUR", 50_000, 1, 0),
        ]
    );

    // Per UTC day (of occurred_at): the late settle is on the 3rd.
    let s = ledger(&stack)
        .ledger_summary(summary(pb::LedgerBreakdown::Day))
        .await
        .unwrap()
        .into_inner();
    let days: Vec<(String, String, i64, i64, i64)> = s
        .breakdown
        .iter()
        .map(|t| {
            (
                t.day.clone(),
                t.currency.clone(),
                micros(&t.charged),
                t.event_count,
                t.superseded_count,
            )
        })
        .collect();
    let d =
        |day: &str, c: &str, ch: i64, n: i64, sup: i64| (day.to_owned(), c.to_owned(), ch, n, sup);
    assert_eq!(
        days,
        [
            d("2026-02-01", "USD", 1_300_000, 2, 0),
            d("2026-02-02", "EUR", 50_000, 1, 0),
            d("2026-02-02", "USD", 2_500_000, 1, 1),
            d("2026-02-03", "USD", 1_100_000, 2, 0),
        ]
    );
    let usd_days: i64 = s
        .breakdown
        .iter()
        .filter(|t| t.currency == "USD")
        .map(|t| micros(&t.charged))
        .sum();
    assert_eq!(usd_days, micros(&totals(&s.totals, "USD").charged));

    // The middle level with its child.
    let s = ledger(&stack)
        .ledger_summary(pb::LedgerSummaryRequest {
            agent_id: child.clone(),
            range: feb(),
            aggregate_children: true,
            breakdown: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.agent_count, 2);
    assert_eq!(micros(&totals(&s.totals, "USD").charged), 1_400_000);

    // Bad input names the problem.
    let mut client = ledger(&stack);
    let query = |agent: &str, range, size: u32, token: &str| pb::QueryLedgerRequest {
        agent_id: agent.into(),
        range,
        aggregate_children: false,
        page_size: size,
        page_token: token.into(),
    };
    let cases = [
        (
            query("not-a-uuid", feb(), 10, ""),
            Code::InvalidArgument,
            "agent_id",
        ),
        (
            query(&root, dates("2026-02-03", "2026-02-01"), 10, ""),
            Code::InvalidArgument,
            "ends before it starts",
        ),
        (
            query(&root, dates("2026-02-31", ""), 10, ""),
            Code::InvalidArgument,
            "start_date",
        ),
        (
            query(&root, feb(), 1001, ""),
            Code::InvalidArgument,
            "page_size",
        ),
        (
            query(&root, feb(), 10, "garbage"),
            Code::InvalidArgument,
            "page_token",
        ),
        (
            query(&uuid::Uuid::now_v7().to_string(), feb(), 10, ""),
            Code::NotFound,
            "not found",
        ),
    ];
    for (request, code, text) in cases {
        let status = client.query_ledger(request).await.unwrap_err();
        assert_eq!(status.code(), code, "{status:?}");
        assert!(
            status.message().contains(text),
            "{status:?} should say {text}"
        );
    }
    let status = client
        .ledger_summary(pb::LedgerSummaryRequest {
            agent_id: root.clone(),
            breakdown: 7,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    // Reflection lists the service (grpcurl needs no proto files).
    let services = reflected_services(stack.channel.clone()).await.unwrap();
    assert!(
        services.iter().any(|s| s == "caracal.v1.LedgerService"),
        "{services:?}"
    );

    // Admin credentials only.
    let status = LedgerServiceClient::with_interceptor(stack.channel.clone(), Bearer(None))
        .query_ledger(query(&root, feb(), 10, ""))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    stack.stop().await.unwrap();
}

// ------------------------------------------------------------- reconcile

/// Writes the charge events waiting in the stack's outbox streams into the ledger,
/// the way they get there in production: each entry converted by the relay's
/// `convert_entry` (metadata spread as the relay does), then decoded and written
/// by the ledger-writer's `decode` + `insert_rows`. Returns the rows written.
async fn drain_charges_into_ledger(stack: &TestStack) -> Vec<LedgerRow> {
    let rows: Vec<LedgerRow> = stack
        .outbox_charges()
        .await
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let mut conn = stack.db().await.unwrap();
    insert_rows(&mut conn, &rows).await.unwrap();
    rows
}

async fn reconcile(stack: &TestStack, agent: &str) -> pb::ReconcileResponse {
    ledger(stack)
        .reconcile(pb::ReconcileRequest {
            agent_id: agent.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

fn by_policy(r: &pb::ReconcileResponse) -> HashMap<String, (i64, i64, i64)> {
    r.policies
        .iter()
        .map(|p| {
            (
                p.policy_id.clone(),
                (p.ledger_micros, p.redis_spent_micros, p.drift_micros),
            )
        })
        .collect()
}

async fn settle(stack: &TestStack, reservation: &str, cost: i64) -> i64 {
    let s = stack
        .authz()
        .settle(pb::SettleRequest {
            reservation_id: reservation.into(),
            actual_cost: Some(usd(cost)),
            provider: "openai".into(),
            model: "gpt-4o".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    micros(&s.charged)
}

async fn authorize(stack: &TestStack, key: &str, request: &str, estimate: i64) -> String {
    let r = stack
        .authz()
        .authorize(authorize_request(key, request, estimate))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.decision(), pb::Decision::Allow, "{r:?}");
    r.reservation_id
}

/// Redis `HINCRBY` on a counter field.
async fn bump_counter(stack: &TestStack, key: &str, field: &str, by: i64) {
    let client = redis::Client::open(stack.redis.url.as_str()).unwrap();
    let mut redis = client.get_multiplexed_async_connection().await.unwrap();
    let _: i64 = redis::cmd("HINCRBY")
        .arg(key)
        .arg(field)
        .arg(by)
        .query_async(&mut redis)
        .await
        .unwrap();
}

/// A stack whose reservations expire after 2 s (swept every second), with a root
/// agent (daily calendar + hourly rolling policies) and a child (total policy)
/// that spent through Authorize + Settle, one expiry and one late Settle.
/// Returns (stack, root, child, policies, sum of Settle charges).
async fn spent_hierarchy() -> (TestStack, String, String, [String; 3], i64) {
    let stack = TestStack::start_with(|c| {
        c.reservations.provisional_charge_expiration = 2;
        c.reservations.provisional_charge_cleanup_interval = 1;
    })
    .await
    .unwrap();
    let (root, root_key) = stack.agent_with_key("rec-root", None).await.unwrap();
    let (child, child_key) = stack
        .agent_with_key("rec-child", Some(&root))
        .await
        .unwrap();
    let daily = stack
        .usd_policy(&root, "100.00", "daily", "calendar", "charge")
        .await
        .unwrap();
    let hourly = stack
        .usd_policy(&root, "50.00", "hourly", "rolling", "charge")
        .await
        .unwrap();
    let total = stack
        .usd_policy(&child, "20.00", "total", "calendar", "charge")
        .await
        .unwrap();

    let mut charged = 0;
    let a1 = authorize(&stack, &child_key, "a1", 100_000).await;
    charged += settle(&stack, &a1, 150_000).await;
    let a2 = authorize(&stack, &child_key, "a2", 200_000).await;
    charged += settle(&stack, &a2, 80_000).await;
    let a3 = authorize(&stack, &root_key, "a3", 50_000).await;
    charged += settle(&stack, &a3, 50_000).await;
    // Released: no charge.
    let a5 = authorize(&stack, &root_key, "a5", 70_000).await;
    stack
        .authz()
        .release(pb::ReleaseRequest {
            reservation_id: a5.clone(),
            reason: "client_abort".into(),
        })
        .await
        .unwrap();
    // Expires (charging the 300,000 reserved), then settles late at 120,000.
    let a4 = authorize(&stack, &child_key, "a4", 300_000).await;
    let keys = caracal_authz::budget::KeySpace::new(stack.key_prefix.as_str(), 4);
    let rsv_key = |p: u16| keys.reservation(p, &a4);
    let client = redis::Client::open(stack.redis.url.as_str()).unwrap();
    let mut redis = client.get_multiplexed_async_connection().await.unwrap();
    let started = Instant::now();
    loop {
        let mut expired = false;
        for p in 0..4u16 {
            let rec: Option<String> = redis::cmd("GET")
                .arg(rsv_key(p))
                .query_async(&mut redis)
                .await
                .unwrap();
            expired |= rec.is_some_and(|r| r.starts_with("D\texpire\t"));
        }
        if expired {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "reservation {a4} never expired"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    charged += settle(&stack, &a4, 120_000).await;
    assert_eq!(charged, 150_000 + 80_000 + 50_000 + 120_000);
    (stack, root, child, [daily, hourly, total], charged)
}

#[tokio::test]
async fn reconcile_is_zero_when_drained_and_shows_exact_drift() {
    let (stack, root, child, [daily, hourly, total], charged) = spent_hierarchy().await;

    // Before the pipeline delivered anything: the counters hold every charge,
    // the ledger none of them.
    let before = reconcile(&stack, "").await;
    assert_eq!(before.policies_checked, 3);
    assert_eq!(before.policies_with_drift, 3);
    assert_eq!(by_policy(&before)[&total], (0, 350_000, 350_000));

    let rows = drain_charges_into_ledger(&stack).await;
    let kinds: HashSet<(&str, &str)> = rows
        .iter()
        .map(|r| (r.event_id.as_str(), r.kind.as_str()))
        .collect();
    assert_eq!(rows.len(), 5, "{kinds:?}");
    assert_eq!(
        rows.iter().filter(|r| r.kind == "expire_charge").count(),
        1,
        "{kinds:?}"
    );
    assert_eq!(rows.iter().filter(|r| r.kind == "late_settle").count(), 1);
    // Every charge carries when its reservation was made; the late settle's is
    // the reservation's, seconds before the settle.
    for r in &rows {
        let reserved_at = r
            .reserved_at
            .unwrap_or_else(|| panic!("{} has no reserved_at", r.event_id));
        assert!(reserved_at <= r.occurred_at, "{r:?}");
    }
    let late = rows.iter().find(|r| r.kind == "late_settle").unwrap();
    assert!(late.occurred_at - late.reserved_at.unwrap() >= chrono::Duration::seconds(2));
    let expire = rows.iter().find(|r| r.kind == "expire_charge").unwrap();
    assert_eq!(expire.reserved_at, late.reserved_at);
    assert_eq!(expire.charged_micros, 300_000);
    // The ledger-writer wrote reserved_at through to the table.
    #[derive(diesel::QueryableByName)]
    struct N {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let mut conn = stack.db().await.unwrap();
    let missing: N =
        diesel::sql_query("SELECT count(*) AS n FROM ledger_events WHERE reserved_at IS NULL")
            .get_result(&mut conn)
            .await
            .unwrap();
    assert_eq!(missing.n, 0);

    // Drained: zero drift, and the ledger total is what Settle returned.
    let r = reconcile(&stack, "").await;
    assert_eq!((r.policies_checked, r.policies_with_drift), (3, 0));
    let all = charged;
    let child_only = 150_000 + 80_000 + 120_000;
    assert_eq!(by_policy(&r)[&daily], (all, all, 0));
    assert_eq!(by_policy(&r)[&hourly], (all, all, 0));
    assert_eq!(by_policy(&r)[&total], (child_only, child_only, 0));
    let daily_row = r.policies.iter().find(|p| p.policy_id == daily).unwrap();
    assert_eq!(
        (
            daily_row.time_window.as_str(),
            daily_row.window_type.as_str()
        ),
        ("daily", "calendar")
    );
    assert_eq!(daily_row.ledger_events, 4);
    assert!(daily_row.window_end.is_some());
    let hourly_row = r.policies.iter().find(|p| p.policy_id == hourly).unwrap();
    assert!(hourly_row.window_end.is_none());
    assert!(
        hourly_row.counter_key.contains(":r:"),
        "{}",
        hourly_row.counter_key
    );
    // The summary agrees with Settle: one charge per reservation.
    let s = ledger(&stack)
        .ledger_summary(pb::LedgerSummaryRequest {
            agent_id: root.clone(),
            aggregate_children: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let t = totals(&s.totals, "USD");
    assert_eq!(
        (micros(&t.charged), t.event_count, t.superseded_count),
        (all, 4, 1)
    );

    // Windows follow the reservation time: a charge settled now for a reservation
    // made before the daily window opened counts in yesterday's window, not this
    // one; a row without reserved_at (older events) falls back to occurred_at.
    let window_start = daily_row.window_start.unwrap().seconds;
    let yesterday = DateTime::from_timestamp(window_start - 60, 0).unwrap();
    let mut previous = row(
        "rsv-prev/settle",
        "settle",
        &root,
        &root,
        "USD",
        (5_000, 5_000),
        (0, 0, 0),
        ("openai", "gpt-4o"),
        &Utc::now().to_rfc3339(),
    );
    previous.policy_ids = vec![daily.clone()];
    previous.reserved_at = Some(yesterday);
    let mut undated = previous.clone();
    undated.event_id = "rsv-old/settle".into();
    undated.reservation_id = "rsv-old".into();
    undated.charged_micros = 7_000;
    undated.reserved_at = None;
    insert_rows(&mut conn, &[previous, undated]).await.unwrap();
    let r = reconcile(&stack, &root).await;
    assert_eq!(r.policies_checked, 2);
    assert_eq!(by_policy(&r)[&daily], (all + 7_000, all, -7_000));
    assert_eq!(by_policy(&r)[&hourly], (all, all, 0));
    // ledger_events is append-only (triggers, on every partition): editing it by
    // hand, as these drift checks do, takes a superuser session in replica mode.
    diesel::sql_query("SET session_replication_role = replica")
        .execute(&mut conn)
        .await
        .unwrap();
    diesel::sql_query(
        "DELETE FROM ledger_events WHERE event_id IN ('rsv-prev/settle', 'rsv-old/settle')",
    )
    .execute(&mut conn)
    .await
    .unwrap();

    // One agent only.
    let only_child = reconcile(&stack, &child).await;
    assert_eq!(only_child.policies_checked, 1);
    assert_eq!(only_child.policies[0].policy_id, total);

    // A ledger row 30,000 short: every policy it names drifts by exactly that.
    let a2_event = rows
        .iter()
        .find(|r| r.charged_micros == 80_000)
        .unwrap()
        .event_id
        .clone();
    let changed = diesel::sql_query(
        "UPDATE ledger_events SET charged_micros = charged_micros - 30000 WHERE event_id = $1",
    )
    .bind::<diesel::sql_types::Text, _>(a2_event.as_str())
    .execute(&mut conn)
    .await
    .unwrap();
    assert_eq!(changed, 1);
    let r = reconcile(&stack, "").await;
    assert_eq!(r.policies_with_drift, 3);
    assert_eq!(by_policy(&r)[&daily], (all - 30_000, all, 30_000));
    assert_eq!(by_policy(&r)[&hourly], (all - 30_000, all, 30_000));
    assert_eq!(
        by_policy(&r)[&total],
        (child_only - 30_000, child_only, 30_000)
    );
    diesel::sql_query(
        "UPDATE ledger_events SET charged_micros = charged_micros + 30000 WHERE event_id = $1",
    )
    .bind::<diesel::sql_types::Text, _>(a2_event.as_str())
    .execute(&mut conn)
    .await
    .unwrap();
    diesel::sql_query("SET session_replication_role = DEFAULT")
        .execute(&mut conn)
        .await
        .unwrap();

    // A counter 12,345 under the ledger: only that policy drifts, by -12,345.
    let total_key = r
        .policies
        .iter()
        .find(|p| p.policy_id == total)
        .unwrap()
        .counter_key
        .clone();
    bump_counter(&stack, &total_key, "s", -12_345).await;
    let r = reconcile(&stack, "").await;
    assert_eq!(r.policies_with_drift, 1);
    assert_eq!(
        by_policy(&r)[&total],
        (child_only, child_only - 12_345, -12_345)
    );
    assert_eq!(by_policy(&r)[&daily].2, 0);

    // Unknown and malformed agents.
    let status = ledger(&stack)
        .reconcile(pb::ReconcileRequest {
            agent_id: uuid::Uuid::now_v7().to_string(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = ledger(&stack)
        .reconcile(pb::ReconcileRequest {
            agent_id: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    stack.stop().await.unwrap();
}

// -------------------------------------------------------------------- CLI

/// Runs the `caracal` binary (built in this package as `caracal-under-test`) as a
/// process against the stack.
async fn caracal(stack: &TestStack, args: &[&str]) -> Run {
    run_caracal(env!("CARGO_BIN_EXE_caracal-under-test"), stack, args)
        .await
        .unwrap()
}

#[tokio::test]
async fn cli_query_csv_and_reconcile_exit_code() {
    let (stack, root, _child, [_, _, total], charged) = spent_hierarchy().await;
    let rows = drain_charges_into_ledger(&stack).await;
    let today = Utc::now().date_naive().to_string();

    // Every row of the hierarchy, in pages of 2, as CSV.
    let run = caracal(
        &stack,
        &[
            "ledger",
            "query",
            "--agent-id",
            &root,
            "--start-date",
            &today,
            "--end-date",
            &today,
            "--aggregate-children",
            "--page-size",
            "2",
            "--output",
            "csv",
        ],
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.err);
    let lines: Vec<&str> = run.out.lines().collect();
    let header: Vec<&str> = lines[0].split(',').collect();
    assert_eq!(header.len(), 25, "{}", lines[0]);
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    assert_eq!(lines.len(), 1 + rows.len(), "{}", run.out);
    let mut seen = HashSet::new();
    let mut final_sum = 0;
    for line in &lines[1..] {
        let cells: Vec<&str> = line.split(',').collect();
        assert_eq!(cells.len(), header.len(), "{line}");
        assert!(
            seen.insert(cells[col("event_id")].to_owned()),
            "{line} twice"
        );
        assert!(!cells[col("reserved_at")].is_empty(), "{line}");
        if cells[col("superseded")] == "false" {
            final_sum += cells[col("charged_micros")].parse::<i64>().unwrap();
        }
    }
    assert_eq!(final_sum, charged);
    // --limit stops early.
    let run = caracal(
        &stack,
        &[
            "ledger",
            "query",
            "--agent-id",
            &root,
            "--aggregate-children",
            "--limit",
            "3",
            "--page-size",
            "2",
            "--output",
            "csv",
        ],
    )
    .await;
    assert_eq!((run.code, run.out.lines().count()), (0, 4), "{}", run.err);

    // Drained: reconcile exits 0.
    let run = caracal(&stack, &["ledger", "reconcile"]).await;
    assert_eq!(run.code, 0, "{}\n{}", run.out, run.err);
    assert!(
        run.out.contains("3 policies checked, 0 with drift."),
        "{}",
        run.out
    );

    // Summary in JSON.
    let run = caracal(
        &stack,
        &[
            "--output",
            "json",
            "ledger",
            "summary",
            "--agent-id",
            &root,
            "--aggregate-children",
            "--breakdown",
            "model",
        ],
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.err);
    let v: serde_json::Value = serde_json::from_str(&run.out).unwrap();
    assert_eq!(v["totals"][0]["charged"]["micros"], charged);
    assert_eq!(v["breakdown"][0]["model"], "gpt-4o");

    // A counter off by 1,000: the report says so and the exit code is 3.
    let key = reconcile(&stack, "")
        .await
        .policies
        .into_iter()
        .find(|p| p.policy_id == total)
        .unwrap()
        .counter_key;
    bump_counter(&stack, &key, "s", 1_000).await;
    let run = caracal(&stack, &["ledger", "reconcile", "--output", "json"]).await;
    assert_eq!(run.code, 3, "{}\n{}", run.out, run.err);
    let v: serde_json::Value = serde_json::from_str(&run.out).unwrap();
    assert_eq!(v["policies_with_drift"], 1);
    let drifting: Vec<&serde_json::Value> = v["policies"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["drift_micros"] != 0)
        .collect();
    assert_eq!(drifting.len(), 1);
    assert_eq!(drifting[0]["policy_id"], total.as_str());
    assert_eq!(drifting[0]["drift_micros"], 1_000);
    assert!(run.err.contains("drift in 1 of 3 policies"), "{}", run.err);

    // Bad input fails before or at the server with one line.
    let run = caracal(
        &stack,
        &[
            "ledger",
            "query",
            "--agent-id",
            &root,
            "--start-date",
            "2026-02-03",
            "--end-date",
            "2026-02-01",
        ],
    )
    .await;
    assert_eq!(run.code, 1);
    assert!(run.err.contains("before"), "{}", run.err);
    let run = caracal(
        &stack,
        &[
            "ledger",
            "summary",
            "--agent-id",
            &uuid::Uuid::now_v7().to_string(),
        ],
    )
    .await;
    assert_eq!(run.code, 1);
    assert!(run.err.starts_with("error: NotFound"), "{}", run.err);

    stack.stop().await.unwrap();
}

// ------------------------------------------------ reconcile over a period

async fn reconcile_range(
    stack: &TestStack,
    agent: &str,
    start: &str,
    end: &str,
) -> pb::ReconcileResponse {
    ledger(stack)
        .reconcile(pb::ReconcileRequest {
            agent_id: agent.into(),
            range: dates(start, end),
        })
        .await
        .unwrap()
        .into_inner()
}

/// The rows of `policy` whose window starts at `start`.
fn rows_at<'a>(
    r: &'a pb::ReconcileResponse,
    policy: &str,
    start: DateTime<Utc>,
) -> Vec<&'a pb::PolicyReconciliation> {
    r.policies
        .iter()
        .filter(|p| {
            p.policy_id == policy
                && p.window_start.as_ref().map(|t| t.seconds) == Some(start.timestamp())
        })
        .collect()
}

/// The one row of `policy` whose window starts at `start`.
fn row_at<'a>(
    r: &'a pb::ReconcileResponse,
    policy: &str,
    start: DateTime<Utc>,
) -> &'a pb::PolicyReconciliation {
    let rows = rows_at(r, policy, start);
    assert_eq!(rows.len(), 1, "policy {policy} at {start}: {r:#?}");
    rows[0]
}

/// (ledger, redis, drift, counter state) of a row.
fn compared(p: &pb::PolicyReconciliation) -> (i64, i64, i64, pb::CounterState) {
    (
        p.ledger_micros,
        p.redis_spent_micros,
        p.drift_micros,
        p.counter_state(),
    )
}

fn midnight(d: chrono::NaiveDate) -> DateTime<Utc> {
    d.and_time(chrono::NaiveTime::MIN).and_utc()
}

/// A final USD (or other) charge of `micros` naming `policy`, reserved at `reserved_at`.
fn charge_row(
    id: &str,
    agent: &str,
    policy: &str,
    currency: &str,
    micros: i64,
    reserved_at: DateTime<Utc>,
) -> LedgerRow {
    let occurred = (reserved_at + chrono::Duration::seconds(5)).to_rfc3339();
    let mut r = row(
        &format!("{id}/settle"),
        "settle",
        agent,
        agent,
        currency,
        (micros, micros),
        (0, 0, 0),
        ("openai", "gpt-4o"),
        &occurred,
    );
    r.policy_ids = vec![policy.to_owned()];
    r.reserved_at = Some(reserved_at);
    r
}

/// Issue 22 item 6: a loss in a window that is no longer the current one (a
/// ledger charge yesterday's counter lacks, a counter with no charge behind it, a
/// lost counter, a rolling bucket outside the current hour), on active and
/// inactive policies, is invisible to today's reconcile and seen over a period.
#[tokio::test]
async fn reconcile_over_a_period_sees_every_window_and_inactive_policies() {
    let stack = TestStack::start().await.unwrap();
    let (root, key) = stack.agent_with_key("period-root", None).await.unwrap();
    let daily = |_: ()| stack.usd_policy(&root, "100", "daily", "calendar", "charge");
    let lacks = daily(()).await.unwrap();
    let extra = daily(()).await.unwrap();
    let lost = daily(()).await.unwrap();
    let rolling = stack
        .usd_policy(&root, "100", "hourly", "rolling", "charge")
        .await
        .unwrap();
    // Today: real spend on all four policies, drained into the ledger.
    let a = authorize(&stack, &key, "today", 40_000).await;
    let spent = settle(&stack, &a, 30_000).await;
    assert_eq!(drain_charges_into_ledger(&stack).await.len(), 1);

    let now = Utc::now();
    let today = now.date_naive();
    let yesterday = today.pred_opt().unwrap();
    let keys =
        caracal_authz::budget::KeySpace::new(stack.key_prefix.clone(), stack.redis.partitions);
    let partition = keys.partition_of(&root);
    let day_key = |policy: &str, d: chrono::NaiveDate| {
        keys.calendar_counter(partition, policy, &format!("d:{d}"))
    };
    let noon_yesterday = midnight(yesterday) + chrono::Duration::hours(12);
    let old_day = today - chrono::Days::new(10);
    let mut conn = stack.db().await.unwrap();
    insert_rows(
        &mut conn,
        &[
            // Yesterday: 5,000 charged to `lacks`, whose counter has 3,000...
            charge_row("y-lacks", &root, &lacks, "USD", 5_000, noon_yesterday),
            // ...and 6,000 to `lost`, whose counter is gone.
            charge_row("y-lost", &root, &lost, "USD", 6_000, noon_yesterday),
            // Ten days ago: a charge whose window's counter expired long since.
            charge_row(
                "old-lacks",
                &root,
                &lacks,
                "USD",
                8_000,
                midnight(old_day) + chrono::Duration::hours(1),
            ),
        ],
    )
    .await
    .unwrap();
    bump_counter(&stack, &day_key(&lacks, yesterday), "s", 3_000).await;
    // `extra`'s counter has 4,000 that no charge accounts for.
    bump_counter(&stack, &day_key(&extra, yesterday), "s", 4_000).await;
    // Two hours ago, outside the rolling hour: 700 in a bucket, no charge behind it.
    let bucket = (now - chrono::Duration::hours(2))
        .timestamp()
        .div_euclid(60);
    bump_counter(
        &stack,
        &keys.rolling_counter(partition, &rolling, 60),
        &format!("s:{bucket}"),
        700,
    )
    .await;
    // A deactivated policy's windows are still the record.
    stack
        .policies()
        .deactivate_policy(pb::DeactivatePolicyRequest { id: extra.clone() })
        .await
        .unwrap();

    // Today's reconcile (active policies, current windows) sees nothing wrong.
    let r = reconcile(&stack, &root).await;
    assert_eq!(
        (r.policies_checked, r.policies_with_drift),
        (3, 0),
        "{r:#?}"
    );
    for p in &r.policies {
        assert_eq!(
            (p.ledger_micros, p.redis_spent_micros),
            (spent, spent),
            "{p:?}"
        );
    }

    // From yesterday on: every window of every policy.
    let r = reconcile_range(&stack, &root, &yesterday.to_string(), "").await;
    let y = midnight(yesterday);
    use pb::CounterState::{Expired, Missing, Present};
    assert_eq!(
        compared(row_at(&r, &lacks, y)),
        (5_000, 3_000, -2_000, Present)
    );
    assert_eq!(compared(row_at(&r, &extra, y)), (0, 4_000, 4_000, Present));
    assert_eq!(compared(row_at(&r, &lost, y)), (6_000, 0, -6_000, Missing));
    let old_bucket = DateTime::from_timestamp(bucket * 60, 0).unwrap();
    let b = row_at(&r, &rolling, old_bucket);
    assert_eq!(compared(b), (0, 700, 700, Present));
    assert_eq!(b.window_end.as_ref().unwrap().seconds, (bucket + 1) * 60);
    for policy in [&lacks, &extra, &lost] {
        let p = row_at(&r, policy, midnight(today));
        assert_eq!(compared(p), (spent, spent, 0, Present), "{policy}");
        assert_eq!(
            (p.currency.as_str(), p.policy_currency.as_str()),
            ("USD", "USD")
        );
    }
    let current: Vec<_> = r
        .policies
        .iter()
        .filter(|p| {
            p.policy_id == rolling
                && p.window_start.as_ref().unwrap().seconds
                    > b.window_start.as_ref().unwrap().seconds
        })
        .collect();
    assert_eq!(current.len(), 1, "{r:#?}");
    assert_eq!(compared(current[0]), (spent, spent, 0, Present));
    assert_eq!(r.policies.len(), 8, "{r:#?}");
    assert_eq!(
        (r.policies_checked, r.policies_with_drift),
        (4, 4),
        "the inactive policy is checked"
    );
    assert_eq!(
        (r.windows_checked, r.windows_with_drift, r.windows_expired),
        (8, 4, 0)
    );
    assert_eq!(r.period_start.as_ref().unwrap().seconds, y.timestamp());
    assert!(r.period_end.as_ref().unwrap().seconds >= now.timestamp());

    // Yesterday only (the end date is included): today's windows are out.
    let r = reconcile_range(
        &stack,
        &root,
        &yesterday.to_string(),
        &yesterday.to_string(),
    )
    .await;
    // The rolling policy shows there too when the run is early in the UTC day:
    // before 02:00 the bucket two hours back is yesterday's, and before 01:00
    // the current rolling hour starts yesterday (it is cut at the period end).
    let today_start = midnight(today);
    let old_bucket_yesterday = usize::from(old_bucket < today_start);
    let hour_starts_yesterday = usize::from(now - chrono::Duration::hours(1) < today_start);
    let daily: Vec<_> = r
        .policies
        .iter()
        .filter(|p| p.policy_id != rolling)
        .collect();
    assert_eq!(daily.len(), 3, "{r:#?}");
    let yesterday_rows = 3 + old_bucket_yesterday + hour_starts_yesterday;
    assert_eq!(r.policies.len(), yesterday_rows, "{r:#?}");
    assert_eq!(
        (r.policies_with_drift, r.windows_with_drift),
        (
            3 + old_bucket_yesterday as i32,
            3 + old_bucket_yesterday as i32
        )
    );

    // Ten days ago: the counter expired by design; the charge is shown, not drift.
    let r = reconcile_range(&stack, &root, &old_day.to_string(), &old_day.to_string()).await;
    assert_eq!(r.policies.len(), 1, "{r:#?}");
    assert_eq!(
        compared(row_at(&r, &lacks, midnight(old_day))),
        (8_000, 0, 0, Expired)
    );
    assert_eq!(
        (
            r.policies_with_drift,
            r.windows_with_drift,
            r.windows_expired
        ),
        (0, 0, 1)
    );

    // A start is required; an end before the start is refused.
    let status = ledger(&stack)
        .reconcile(pb::ReconcileRequest {
            agent_id: root.clone(),
            range: dates("", &today.to_string()),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let status = ledger(&stack)
        .reconcile(pb::ReconcileRequest {
            agent_id: root.clone(),
            range: dates(&today.to_string(), &yesterday.to_string()),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    // The CLI: today's reconcile exits 0; with --start yesterday, 3.
    let run = caracal(&stack, &["ledger", "reconcile", "--agent-id", &root]).await;
    assert_eq!(run.code, 0, "{}\n{}", run.out, run.err);
    let run = caracal(
        &stack,
        &[
            "--output",
            "json",
            "ledger",
            "reconcile",
            "--agent-id",
            &root,
            "--start",
            &yesterday.to_string(),
        ],
    )
    .await;
    assert_eq!(run.code, 3, "{}\n{}", run.out, run.err);
    let v: serde_json::Value = serde_json::from_str(&run.out).unwrap();
    assert_eq!(v["policies_with_drift"], 4);
    let missing: Vec<&serde_json::Value> = v["policies"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["counter_state"] == "missing")
        .collect();
    assert_eq!(missing.len(), 1, "{}", run.out);
    assert_eq!(missing[0]["policy_id"], lost.as_str());
    assert_eq!(missing[0]["drift_micros"], -6_000);
    assert!(run.err.contains("drift in 4 of 4 policies"), "{}", run.err);
    let run = caracal(
        &stack,
        &[
            "--output",
            "csv",
            "ledger",
            "reconcile",
            "--agent-id",
            &root,
            "--start",
            &yesterday.to_string(),
            "--end",
            &yesterday.to_string(),
        ],
    )
    .await;
    assert_eq!(run.code, 3, "{}\n{}", run.out, run.err);
    let lines: Vec<&str> = run.out.lines().collect();
    assert_eq!(lines.len(), 1 + yesterday_rows, "{}", run.out);
    assert!(lines[0].contains("counter_state"), "{}", lines[0]);
    let run = caracal(&stack, &["ledger", "reconcile", "--start", "yesterday"]).await;
    assert_eq!(run.code, 2, "{}\n{}", run.out, run.err);

    stack.stop().await.unwrap();
}

/// Issue 22 item 6: charges in a currency other than the policy's are drift of
/// their own, never summed into the policy's; a policy whose currency changed is
/// reconciled in the currency it had in each window.
#[tokio::test]
async fn reconcile_keeps_currencies_apart() {
    let stack = TestStack::start().await.unwrap();
    let (agent, key) = stack.agent_with_key("cur-agent", None).await.unwrap();
    let usd_policy = stack
        .usd_policy(&agent, "100", "daily", "calendar", "charge")
        .await
        .unwrap();
    let a = authorize(&stack, &key, "usd", 40_000).await;
    let spent = settle(&stack, &a, 30_000).await;
    drain_charges_into_ledger(&stack).await;
    let now = Utc::now();
    let mut conn = stack.db().await.unwrap();
    // 9,000 EUR naming the USD policy (a counter that counted them would hold
    // micros of two currencies).
    insert_rows(
        &mut conn,
        &[charge_row(
            "eur",
            &agent,
            &usd_policy,
            "EUR",
            9_000,
            // In today's window even just after midnight (reconcile without a
            // period looks at the current window only).
            (now - chrono::Duration::minutes(1)).max(midnight(now.date_naive())),
        )],
    )
    .await
    .unwrap();
    let r = reconcile(&stack, &agent).await;
    let rows: Vec<_> = r
        .policies
        .iter()
        .filter(|p| p.policy_id == usd_policy)
        .collect();
    assert_eq!(rows.len(), 2, "{r:#?}");
    let usd = rows.iter().find(|p| p.currency == "USD").unwrap();
    assert_eq!(
        (usd.ledger_micros, usd.redis_spent_micros, usd.drift_micros),
        (spent, spent, 0),
        "EUR charges are not summed into the USD row"
    );
    let eur = rows.iter().find(|p| p.currency == "EUR").unwrap();
    assert_eq!(eur.policy_currency, "USD");
    assert_eq!(
        (
            eur.ledger_micros,
            eur.ledger_events,
            eur.redis_spent_micros,
            eur.drift_micros
        ),
        (9_000, 1, 0, -9_000)
    );
    assert_eq!(
        (
            r.policies_with_drift,
            r.windows_checked,
            r.windows_with_drift
        ),
        (1, 2, 1)
    );

    // A policy that counted USD until today and EUR from now on: yesterday's
    // window is reconciled in USD, today's in EUR; no drift either way.
    let (other, _) = stack.agent_with_key("cur-history", None).await.unwrap();
    let hist = stack
        .usd_policy(&other, "100", "daily", "calendar", "charge")
        .await
        .unwrap();
    let today = now.date_naive();
    let yesterday = today.pred_opt().unwrap();
    let keys =
        caracal_authz::budget::KeySpace::new(stack.key_prefix.clone(), stack.redis.partitions);
    let partition = keys.partition_of(&other);
    let day_key = |d: chrono::NaiveDate| keys.calendar_counter(partition, &hist, &format!("d:{d}"));
    insert_rows(
        &mut conn,
        &[charge_row(
            "hist-y",
            &other,
            &hist,
            "USD",
            1_000,
            midnight(yesterday) + chrono::Duration::hours(12),
        )],
    )
    .await
    .unwrap();
    bump_counter(&stack, &day_key(yesterday), "s", 1_000).await;
    let changed = stack
        .policies()
        .update_policy(pb::UpdatePolicyRequest {
            id: hist.clone(),
            currency: Some("EUR".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(changed.limit.unwrap().currency, "EUR");
    insert_rows(
        &mut conn,
        &[charge_row(
            "hist-t",
            &other,
            &hist,
            "EUR",
            2_000,
            Utc::now(),
        )],
    )
    .await
    .unwrap();
    bump_counter(&stack, &day_key(today), "s", 2_000).await;
    let r = reconcile_range(&stack, &other, &yesterday.to_string(), "").await;
    let y = row_at(&r, &hist, midnight(yesterday));
    assert_eq!(
        (
            y.currency.as_str(),
            y.policy_currency.as_str(),
            y.ledger_micros,
            y.drift_micros
        ),
        ("USD", "USD", 1_000, 0)
    );
    let t = row_at(&r, &hist, midnight(today));
    assert_eq!(
        (
            t.currency.as_str(),
            t.policy_currency.as_str(),
            t.ledger_micros,
            t.drift_micros
        ),
        ("EUR", "EUR", 2_000, 0)
    );
    assert_eq!((r.policies_with_drift, r.windows_checked), (0, 2), "{r:#?}");

    stack.stop().await.unwrap();
}

/// The drift monitor watches a deployment of any size: with more policies than
/// one reconcile call takes (10,000), it reconciles page by page, and a drift on
/// a policy of the last page is reported. (It used to fail every run there: "more
/// than 10000 policies".)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drift_monitor_pages_through_more_policies_than_one_reconcile_takes() {
    use caracal_tests::probe::{http_get, metric_value};
    let stack = TestStack::start_with(|c| c.reconcile.monitor_interval = 1)
        .await
        .unwrap();
    let (agent, _key) = stack.agent_with_key("many-policies", None).await.unwrap();
    let first = stack
        .usd_policy(&agent, "10.00", "daily", "calendar", "charge")
        .await
        .unwrap();
    // 10,000 more of the same policy (and its version row), by SQL.
    let mut db = stack.db().await.unwrap();
    diesel::sql_query(
        "WITH n AS (SELECT gen_random_uuid() AS id FROM generate_series(1, 10000)), \
         ins AS (INSERT INTO policies (id, agent_id, limit_micros, currency, time_window, \
                 window_type, on_expiry) \
             SELECT n.id, p.agent_id, p.limit_micros, p.currency, p.time_window, \
                 p.window_type, p.on_expiry \
             FROM n, policies p WHERE p.id = $1::uuid RETURNING id) \
         INSERT INTO policy_versions \
         SELECT (jsonb_populate_record(pv, jsonb_build_object('policy_id', ins.id))).* \
         FROM ins, policy_versions pv WHERE pv.policy_id = $1::uuid",
    )
    .bind::<diesel::sql_types::Text, _>(&first)
    .execute(&mut db)
    .await
    .unwrap();
    // A charge in the ledger for the policy the monitor reaches last (policies go
    // by agent, then id): drift of 4,321 there, nowhere else.
    #[derive(diesel::QueryableByName)]
    struct Last {
        #[diesel(sql_type = diesel::sql_types::Text)]
        id: String,
    }
    let last: Last = diesel::sql_query(
        "SELECT id::text AS id FROM policies WHERE active ORDER BY agent_id DESC, id DESC LIMIT 1",
    )
    .get_result(&mut db)
    .await
    .unwrap();
    let mut row = row(
        "rsv_paged/settle",
        "settle",
        &agent,
        &agent,
        "USD",
        (5_000, 4_321),
        (10, 10, 0),
        ("openai", "gpt-4o"),
        &Utc::now().to_rfc3339(),
    );
    row.policy_ids = vec![last.id.clone()];
    insert_rows(&mut db, &[row]).await.unwrap();

    let at = stack.server.as_ref().unwrap().http_addr;
    let mut seen = (None, None, None);
    for _ in 0..120 {
        let text = http_get(at, "/metrics").await.1;
        seen = (
            metric_value(&text, "caracal_reconcile_drift_windows", &[]),
            metric_value(
                &text,
                "caracal_reconcile_drift_micros",
                &["currency=\"USD\""],
            ),
            metric_value(&text, "caracal_reconcile_runs_total", &["result=\"error\""]),
        );
        if seen.0 == Some(1.0) && seen.1 == Some(4_321.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(seen.0, Some(1.0), "drift windows: {seen:?}");
    assert_eq!(seen.1, Some(4_321.0), "drift micros: {seen:?}");
    assert!(seen.2.unwrap_or(0.0) == 0.0, "failed runs: {seen:?}");
    stack.stop().await.unwrap();
}
