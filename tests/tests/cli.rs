//! The `caracal` CLI against a real authz-service on a real PostgreSQL: the
//! runbook's steps, JSON output for scripts, and plain errors with exit codes.

use caracal_tests::{TestStack, ADMIN_TOKEN};

struct Run {
    code: i32,
    out: String,
    err: String,
}

async fn caracal(stack: &TestStack, args: &[&str]) -> Run {
    let url = stack.grpc_url();
    let mut argv = vec!["caracal", "--server", &url, "--admin-token", ADMIN_TOKEN];
    argv.extend_from_slice(args);
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = caracal_cli::run(argv, &mut out, &mut err).await;
    Run {
        code,
        out: String::from_utf8_lossy(&out).into_owned(),
        err: String::from_utf8_lossy(&err).into_owned(),
    }
}

fn json(run: &Run) -> serde_json::Value {
    assert_eq!(run.code, 0, "stderr: {}", run.err);
    serde_json::from_str(&run.out).unwrap_or_else(|e| panic!("not JSON ({e}): {}", run.out))
}

#[tokio::test]
async fn runbook_create_agent_key_daily_and_monthly_policies_and_list_them() {
    let stack = TestStack::start().await.unwrap();

    let agent = json(
        &caracal(
            &stack,
            &[
                "--output",
                "json",
                "agent",
                "create",
                "--name",
                "production-agent-1",
                "--type",
                "openai",
                "--metadata",
                r#"{"team":"platform","env":"prod"}"#,
            ],
        )
        .await,
    );
    let agent_id = agent["id"].as_str().unwrap().to_owned();
    assert_eq!(agent["name"], "production-agent-1");
    assert_eq!(agent["status"], "active");

    let key = json(
        &caracal(
            &stack,
            &[
                "--output",
                "json",
                "agent",
                "key",
                "issue",
                "--agent-id",
                &agent_id,
            ],
        )
        .await,
    );
    let secret = key["secret"].as_str().unwrap();
    assert!(secret.starts_with("cak_") && secret.len() == 47, "{secret}");
    // The table form prints the secret once, with a warning.
    let table = caracal(&stack, &["agent", "key", "issue", "--agent-id", &agent_id]).await;
    assert_eq!(table.code, 0, "{}", table.err);
    assert!(table.out.contains("cak_"), "{}", table.out);

    for (limit, window) in [("1000.00", "daily"), ("25000.00", "monthly")] {
        let p = json(
            &caracal(
                &stack,
                &[
                    "--output",
                    "json",
                    "policy",
                    "create",
                    "--agent-id",
                    &agent_id,
                    "--limit",
                    limit,
                    "--currency",
                    "USD",
                    "--time-window",
                    window,
                    "--window-type",
                    "calendar",
                ],
            )
            .await,
        );
        assert_eq!(p["limit"]["amount"], limit);
        assert_eq!(p["time_window"], window);
    }

    let listed = json(
        &caracal(
            &stack,
            &[
                "policy",
                "list",
                "--agent-id",
                &agent_id,
                "--output",
                "json",
            ],
        )
        .await,
    );
    let mut got: Vec<(String, i64)> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["time_window"].as_str().unwrap().to_owned(),
                p["limit"]["micros"].as_i64().unwrap(),
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            ("daily".to_owned(), 1_000_000_000),
            ("monthly".to_owned(), 25_000_000_000)
        ]
    );

    // The table lists both policies, one row each, under a header.
    let table = caracal(&stack, &["policy", "list", "--agent-id", &agent_id]).await;
    assert_eq!(table.code, 0);
    let rows: Vec<&str> = table
        .out
        .lines()
        .filter(|l| l.contains(&agent_id))
        .collect();
    assert_eq!(rows.len(), 2, "{}", table.out);
    assert!(
        table.out.lines().next().unwrap().contains("LIMIT"),
        "{}",
        table.out
    );

    // Verified identities (SPIFFE ids of meshed agents) bind through the CLI too.
    let ident = json(
        &caracal(
            &stack,
            &[
                "--output",
                "json",
                "agent",
                "identity",
                "add",
                "--agent-id",
                &agent_id,
                "--kind",
                "spiffe",
                "--value",
                "spiffe://cluster.local/ns/agents/sa/prod-1",
            ],
        )
        .await,
    );
    assert_eq!(ident["kind"], "spiffe");
    // A JWT claim binds under its issuer (`--issuer`), and only with one.
    let no_issuer = caracal(
        &stack,
        &[
            "agent",
            "identity",
            "add",
            "--agent-id",
            &agent_id,
            "--kind",
            "jwt",
            "--value",
            "prod-1",
        ],
    )
    .await;
    assert_eq!(no_issuer.code, 1, "{}", no_issuer.out);
    assert!(
        no_issuer.err.starts_with("error: InvalidArgument:") && no_issuer.err.contains("issuer"),
        "{}",
        no_issuer.err
    );
    let jwt = json(
        &caracal(
            &stack,
            &[
                "--output",
                "json",
                "agent",
                "identity",
                "add",
                "--agent-id",
                &agent_id,
                "--kind",
                "jwt",
                "--value",
                "prod-1",
                "--issuer",
                "https://idp.example",
            ],
        )
        .await,
    );
    assert_eq!(
        (&jwt["kind"], &jwt["issuer"], &jwt["value"]),
        (
            &serde_json::json!("jwt"),
            &serde_json::json!("https://idp.example"),
            &serde_json::json!("prod-1")
        )
    );
    let table = caracal(
        &stack,
        &["agent", "identity", "list", "--agent-id", &agent_id],
    )
    .await;
    assert_eq!(table.code, 0, "{}", table.err);
    assert!(
        table.out.starts_with("ID") && table.out.contains("ISSUER"),
        "{}",
        table.out
    );
    assert!(table.out.contains("https://idp.example"), "{}", table.out);
    let idents = json(
        &caracal(
            &stack,
            &[
                "--output",
                "json",
                "agent",
                "identity",
                "list",
                "--agent-id",
                &agent_id,
            ],
        )
        .await,
    );
    let idents = idents.as_array().unwrap();
    assert_eq!(idents.len(), 2);
    assert!(
        idents
            .iter()
            .any(|i| i["kind"] == "spiffe" && i["issuer"] == ""),
        "{idents:?}"
    );

    // Agent list shows the agent.
    let agents = json(&caracal(&stack, &["--output", "json", "agent", "list"]).await);
    assert_eq!(agents.as_array().unwrap().len(), 1);

    // Price book through the CLI.
    let price = json(
        &caracal(
            &stack,
            &[
                "--output",
                "json",
                "pricebook",
                "set",
                "--provider",
                "openai",
                "--model",
                "gpt-4o",
                "--currency",
                "USD",
                "--input-price",
                "2.50",
                "--output-price",
                "10.00",
            ],
        )
        .await,
    );
    assert_eq!(price["output_per_mtok_micros"], 10_000_000);
    stack.stop().await.unwrap();
}

#[tokio::test]
async fn errors_are_plain_and_exit_non_zero() {
    let stack = TestStack::start().await.unwrap();
    let a = caracal(
        &stack,
        &["agent", "create", "--name", "dup", "--type", "openai"],
    )
    .await;
    assert_eq!(a.code, 0, "{}", a.err);

    let dup = caracal(
        &stack,
        &["agent", "create", "--name", "dup", "--type", "openai"],
    )
    .await;
    assert_eq!(dup.code, 1);
    assert!(dup.err.starts_with("error: AlreadyExists:"), "{}", dup.err);
    assert!(dup.err.contains("dup"), "{}", dup.err);

    let bad = caracal(
        &stack,
        &[
            "policy",
            "create",
            "--agent-id",
            "dup",
            "--limit",
            "1.0000001",
            "--currency",
            "USD",
            "--time-window",
            "daily",
            "--window-type",
            "calendar",
        ],
    )
    .await;
    assert_eq!(bad.code, 1);
    assert!(
        bad.err.starts_with("error: InvalidArgument: limit"),
        "{}",
        bad.err
    );
    assert!(bad.out.is_empty());

    let missing = caracal(&stack, &["agent", "get", "nobody"]).await;
    assert_eq!(missing.code, 1);
    assert!(
        missing.err.starts_with("error: NotFound:"),
        "{}",
        missing.err
    );

    // Without the admin token.
    let url = stack.grpc_url();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = caracal_cli::run(
        [
            "caracal",
            "--server",
            &url,
            "--admin-token",
            "",
            "agent",
            "list",
        ],
        &mut out,
        &mut err,
    )
    .await;
    assert_eq!(code, 1);
    assert!(
        String::from_utf8_lossy(&err).starts_with("error: Unauthenticated:"),
        "{}",
        String::from_utf8_lossy(&err)
    );

    // Usage errors are exit code 2.
    let usage = caracal(&stack, &["policy", "create", "--agent-id", "dup"]).await;
    assert_eq!(usage.code, 2);
    assert_eq!(stack.count("policies").await.unwrap(), 0);
    stack.stop().await.unwrap();
}
