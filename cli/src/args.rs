//! The command line, as clap definitions. Parsing only: nothing here talks to a server.
//!
//! Global connection options (`--server`, `--admin-token`, `--timeout`, TLS files) are
//! accepted anywhere on the line. `--output table|json` is accepted before the resource
//! (`caracal --output json agent list`) or anywhere after it
//! (`caracal agent list --output json`). Prices in `caracal pricebook set` are
//! `--input-price`/`--output-price`/... so they never clash with `--output`.

use std::path::PathBuf;

use chrono::{DateTime, Utc};
use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};

/// `caracal`: operate Caracal's hard spending limits for AI agents.
#[derive(Debug, Parser)]
#[command(name = "caracal", version, about, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub conn: ConnOpts,

    /// Output format (accepted anywhere on the line).
    #[arg(
        long,
        global = true,
        value_enum,
        value_name = "FORMAT",
        help_heading = "Global options"
    )]
    pub output: Option<OutputFormat>,

    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The output format chosen on the line (table unless `--output json`).
    pub fn format(&self) -> OutputFormat {
        self.output.unwrap_or(OutputFormat::Table)
    }
}

/// How to reach and authenticate to the admin API.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Global options")]
pub struct ConnOpts {
    /// Admin API address (http:// or https://).
    #[arg(
        long,
        global = true,
        env = "CARACAL_SERVER",
        default_value = "http://127.0.0.1:50051",
        value_name = "URL"
    )]
    pub server: String,

    /// Admin token, sent as `authorization: Bearer <token>` on every call.
    #[arg(
        long,
        global = true,
        env = "CARACAL_ADMIN_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub admin_token: Option<String>,

    /// Seconds to wait for the connection and for each call.
    #[arg(
        long,
        global = true,
        default_value_t = 10,
        value_name = "SECONDS",
        value_parser = clap::value_parser!(u64).range(1..=86_400)
    )]
    pub timeout: u64,

    /// PEM file of the CA that signed the server certificate (https:// servers).
    #[arg(long, global = true, env = "CARACAL_CA_CERT", value_name = "PEM")]
    pub ca_cert: Option<PathBuf>,

    /// PEM client certificate for mutual TLS (with --client-key).
    #[arg(long, global = true, env = "CARACAL_CLIENT_CERT", value_name = "PEM")]
    pub client_cert: Option<PathBuf>,

    /// PEM private key of the client certificate (with --client-cert).
    #[arg(long, global = true, env = "CARACAL_CLIENT_KEY", value_name = "PEM")]
    pub client_key: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
    /// Comma-separated values with a header row (RFC 4180 quoting).
    Csv,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Agents and their API keys.
    Agent(AgentArgs),
    /// Spending-limit policies.
    Policy(PolicyArgs),
    /// Per-agent allowlists of resources and models.
    Allowlist(AllowlistArgs),
    /// Model prices (per one million tokens).
    Pricebook(PricebookArgs),
    /// The audit trail (audit_logs), read directly from PostgreSQL.
    Audit(AuditArgs),
    /// The dead-letter queue: list, count, show and replay (once) dead letters.
    Dlq(crate::dlq::DlqArgs),
    /// The ledger of record: rows, totals, reconciliation with the budget counters.
    Ledger(crate::ledger::LedgerArgs),
    /// Spend history from the metrics-aggregator: daily spend trend of an agent.
    Spend(crate::spend::SpendArgs),
    /// Re-feed a time range of the metering topic into the ledger (idempotent), list
    /// the replays, check the ledger holds a range.
    Replay(crate::replay::ReplayArgs),
    /// The Redis budget state: which partitions Redis lost, and rebuilding them
    /// from the ledger.
    Budget(crate::budget::BudgetArgs),
    /// Budget snapshots: create, list, status, restore (Redis budget state from a
    /// snapshot plus the ledger after it), cleanup.
    Snapshot(crate::snapshot::SnapshotArgs),
    /// The tamper-evident ledger: signed checkpoints, inclusion and consistency
    /// proofs (verified offline), verify-range, leaf export, key rotation.
    Merkle(crate::merkle::MerkleArgs),
}

// ------------------------------------------------------------------ audit

#[derive(Debug, Args)]
pub struct AuditArgs {
    #[command(subcommand)]
    pub command: AuditCmd,
}

#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Export audit records written (ingested) in [--start, --end), oldest first; the
    /// producer's own timestamp is in each record but does not select it. Reads
    /// PostgreSQL directly over a read-only session (no admin API call).
    Export {
        /// First instant included: RFC 3339 or a UTC date (2026-02-01).
        #[arg(long, value_name = "TIME", value_parser = time_or_date)]
        start: DateTime<Utc>,
        /// First instant excluded: RFC 3339 or a UTC date (2026-02-03).
        #[arg(long, value_name = "TIME", value_parser = time_or_date)]
        end: DateTime<Utc>,
        /// `json`: one JSON object per line; `syslog`: RFC 5424 lines.
        #[arg(long, value_enum, default_value = "json")]
        format: AuditFormat,
        /// Write to this file instead of stdout (`--output` is the global table/json switch).
        #[arg(long, value_name = "FILE", conflicts_with = "syslog_server")]
        file: Option<PathBuf>,
        /// Send the lines to a syslog server instead: `udp://HOST:PORT` (one datagram
        /// per record, RFC 5426) or `tcp://HOST:PORT` (octet counting, RFC 6587).
        /// Needs `--format syslog`.
        #[arg(long, value_name = "URL")]
        syslog_server: Option<String>,
        /// PostgreSQL URL of the audit database (a read-only role is enough).
        #[arg(
            long,
            env = "CARACAL_DATABASE_URL",
            hide_env_values = true,
            value_name = "URL"
        )]
        database_url: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AuditFormat {
    Json,
    Syslog,
}

// ------------------------------------------------------------------ agents

#[derive(Debug, Args)]
pub struct AgentArgs {
    #[command(subcommand)]
    pub command: AgentCmd,
}

#[derive(Debug, Subcommand)]
pub enum AgentCmd {
    /// Register an agent.
    Create {
        /// Unique name.
        #[arg(long)]
        name: String,
        /// Provider family the agent talks to (openai, anthropic, ...).
        #[arg(long = "type", value_name = "TYPE")]
        agent_type: String,
        /// Parent agent id (omit for a root agent).
        #[arg(long, value_name = "ID")]
        parent_id: Option<String>,
        /// JSON object, e.g. '{"team":"platform"}'.
        #[arg(long, value_name = "JSON", value_parser = json_object)]
        metadata: Option<String>,
    },
    /// Show one agent, by id or name.
    Get {
        #[arg(value_name = "ID_OR_NAME")]
        id_or_name: String,
    },
    /// List agents (every page, up to --limit).
    List {
        #[arg(long, value_enum)]
        status: Option<AgentStatus>,
        /// Only direct children of this agent.
        #[arg(long, value_name = "ID")]
        parent_id: Option<String>,
        /// Stop after this many agents.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        limit: Option<u32>,
    },
    /// Change an agent's type, metadata or parent.
    #[command(group(
        ArgGroup::new("changes")
            .required(true)
            .multiple(true)
            .args(["agent_type", "metadata", "parent_id"])
    ))]
    Update {
        id: String,
        #[arg(long = "type", value_name = "TYPE")]
        agent_type: Option<String>,
        /// JSON object; replaces the current metadata.
        #[arg(long, value_name = "JSON", value_parser = json_object)]
        metadata: Option<String>,
        /// New parent id; "" makes the agent a root.
        #[arg(long, value_name = "ID")]
        parent_id: Option<String>,
    },
    /// Deactivate an agent.
    Deactivate { id: String },
    /// Agent API keys.
    #[command(subcommand)]
    Key(KeyCmd),
    /// Verified identities (SPIFFE id, JWT claim) that authenticate as an agent.
    #[command(subcommand)]
    Identity(IdentityCmd),
}

#[derive(Debug, Subcommand)]
pub enum IdentityCmd {
    /// Bind an identity the gateway verifies to an agent.
    Add {
        #[arg(long, value_name = "ID")]
        agent_id: String,
        #[arg(long, value_enum)]
        kind: IdentityKind,
        /// e.g. spiffe://cluster.local/ns/agents/sa/my-agent, or a JWT `sub`.
        #[arg(long)]
        value: String,
        /// The JWT issuer (`iss`, exactly as in the token); required for
        /// `--kind jwt`: a JWT identity is (issuer, claim). Not for spiffe.
        #[arg(long, value_name = "ISS", default_value = "")]
        issuer: String,
    },
    /// Unbind an identity.
    Remove { id: String },
    /// List an agent's identities.
    List {
        #[arg(long, value_name = "ID")]
        agent_id: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IdentityKind {
    Spiffe,
    Jwt,
}

#[derive(Debug, Subcommand)]
pub enum KeyCmd {
    /// Issue a new API key; its secret is shown only once.
    Issue {
        #[arg(long, value_name = "ID")]
        agent_id: String,
    },
    /// Revoke an API key.
    Revoke {
        #[arg(long, value_name = "ID")]
        key_id: String,
    },
    /// List an agent's API keys (prefixes only).
    List {
        #[arg(long, value_name = "ID")]
        agent_id: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AgentStatus {
    Active,
    Inactive,
}

// ---------------------------------------------------------------- policies

#[derive(Debug, Args)]
pub struct PolicyArgs {
    #[command(subcommand)]
    pub command: PolicyCmd,
}

#[derive(Debug, Subcommand)]
pub enum PolicyCmd {
    /// Create a spending limit for an agent.
    Create {
        #[arg(long, value_name = "ID")]
        agent_id: String,
        /// Decimal amount, e.g. 1000.00.
        #[arg(long, value_name = "AMOUNT")]
        limit: String,
        /// ISO-4217 code, e.g. USD.
        #[arg(long)]
        currency: String,
        #[arg(long, value_enum)]
        time_window: TimeWindow,
        #[arg(long, value_enum)]
        window_type: WindowType,
        /// What an expired reservation does (server default: charge).
        #[arg(long, value_enum)]
        on_expiry: Option<OnExpiry>,
    },
    /// List policies (every page).
    List {
        #[arg(long, value_name = "ID")]
        agent_id: Option<String>,
        /// Include deactivated policies.
        #[arg(long)]
        include_inactive: bool,
    },
    /// Show one policy.
    Get { id: String },
    /// Show every version of a policy with what changed.
    History { id: String },
    /// Show the version of a policy in force at an instant.
    At {
        id: String,
        /// RFC 3339 instant, e.g. 2025-01-31T12:00:00Z.
        #[arg(long, value_name = "RFC3339", value_parser = rfc3339)]
        time: DateTime<Utc>,
    },
    /// Change a policy (creates a new version).
    #[command(group(
        ArgGroup::new("changes")
            .required(true)
            .multiple(true)
            .args(["limit", "currency", "time_window", "window_type", "on_expiry", "active"])
    ))]
    Update {
        id: String,
        /// New limit, decimal.
        #[arg(long, value_name = "AMOUNT")]
        limit: Option<String>,
        /// New ISO-4217 currency.
        #[arg(long)]
        currency: Option<String>,
        #[arg(long, value_enum)]
        time_window: Option<TimeWindow>,
        #[arg(long, value_enum)]
        window_type: Option<WindowType>,
        #[arg(long, value_enum)]
        on_expiry: Option<OnExpiry>,
        /// Reactivate (true) or deactivate (false) the policy.
        #[arg(long, value_name = "BOOL")]
        active: Option<bool>,
        /// Fail (Aborted) unless the policy is still at this version.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(1..))]
        expected_version: Option<i32>,
    },
    /// Deactivate a policy.
    Deactivate { id: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TimeWindow {
    Hourly,
    Daily,
    Weekly,
    Monthly,
    Total,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WindowType {
    Calendar,
    Rolling,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnExpiry {
    Charge,
    Release,
}

// -------------------------------------------------------------- allowlists

#[derive(Debug, Args)]
pub struct AllowlistArgs {
    #[command(subcommand)]
    pub command: AllowlistCmd,
}

#[derive(Debug, Subcommand)]
pub enum AllowlistCmd {
    /// Allow a resource or model pattern for an agent.
    Add {
        #[arg(long, value_name = "ID")]
        agent_id: String,
        /// resource (upstream host+path) or model.
        #[arg(long, value_enum)]
        target: Target,
        /// Matched fully anchored.
        #[arg(long)]
        pattern: String,
        /// Pattern syntax (server default: glob).
        #[arg(long, value_enum)]
        kind: Option<PatternKind>,
    },
    /// List an agent's allowlist.
    List {
        #[arg(long, value_name = "ID")]
        agent_id: String,
    },
    /// Remove an allowlist entry.
    Remove { id: String },
    /// Ask whether a value is allowed for an agent.
    Check {
        #[arg(long, value_name = "ID")]
        agent_id: String,
        #[arg(long, value_enum)]
        target: Target,
        #[arg(long)]
        value: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Target {
    Resource,
    Model,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PatternKind {
    Glob,
    Regex,
}

// -------------------------------------------------------------- price book

#[derive(Debug, Args)]
pub struct PricebookArgs {
    #[command(subcommand)]
    pub command: PricebookCmd,
}

#[derive(Debug, Subcommand)]
pub enum PricebookCmd {
    /// Set a model's prices (creates a new version). Prices are per 1M tokens.
    Set(SetPriceArgs),
    /// Import prices from a .json or .csv file, all or nothing.
    Import(ImportArgs),
    /// List current prices (or every version with --history).
    List(ListPricesArgs),
}

#[derive(Debug, Args)]
pub struct SetPriceArgs {
    /// Provider, e.g. openai.
    #[arg(long)]
    pub provider: String,
    /// Model name as the provider spells it, e.g. gpt-4o.
    #[arg(long)]
    pub model: String,
    /// ISO-4217 code the prices are in, e.g. USD.
    #[arg(long)]
    pub currency: String,
    /// Input-token price per 1M tokens, decimal.
    #[arg(long, value_name = "AMOUNT")]
    pub input_price: String,
    /// Output-token price per 1M tokens, decimal.
    #[arg(long, value_name = "AMOUNT")]
    pub output_price: String,
    /// Cached-input price per 1M tokens (default 0).
    #[arg(long, value_name = "AMOUNT")]
    pub cached_input_price: Option<String>,
    /// Fixed price per request (default 0).
    #[arg(long, value_name = "AMOUNT")]
    pub per_request_price: Option<String>,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// A .json array of objects or a .csv file with header
    /// provider,model,currency,input,output,cached_input,per_request.
    pub file: PathBuf,
}

#[derive(Debug, Args)]
pub struct ListPricesArgs {
    #[arg(long)]
    pub provider: Option<String>,
    /// Include superseded versions.
    #[arg(long)]
    pub history: bool,
}

// ------------------------------------------------------------------ helpers

/// The wire spelling of a value enum: its command-line name (`daily`, `calendar`, ...).
pub fn wire<T: ValueEnum>(value: T) -> String {
    value
        .to_possible_value()
        .map(|v| v.get_name().to_owned())
        .unwrap_or_default()
}

/// Accepts a JSON object (or empty text, left for the server to interpret); keeps the
/// text exactly as given.
fn json_object(text: &str) -> Result<String, String> {
    if text.trim().is_empty() {
        return Ok(text.to_owned());
    }
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(_)) => Ok(text.to_owned()),
        Ok(_) => Err("metadata must be a JSON object, e.g. '{\"team\":\"platform\"}'".to_owned()),
        Err(e) => Err(format!("metadata is not valid JSON: {e}")),
    }
}

/// RFC 3339, or a plain date meaning its UTC midnight.
pub fn time_or_date(text: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(day) = chrono::NaiveDate::parse_from_str(text.trim(), "%Y-%m-%d") {
        return Ok(day.and_time(chrono::NaiveTime::MIN).and_utc());
    }
    rfc3339(text)
}

fn rfc3339(text: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(text.trim())
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("expected an RFC 3339 time such as 2025-01-31T12:00:00Z: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(line: &str) -> Cli {
        Cli::try_parse_from(line.split_whitespace()).unwrap()
    }

    fn parse_err(line: &str) -> clap::Error {
        Cli::try_parse_from(line.split_whitespace()).unwrap_err()
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn policy_create_from_runbook() {
        let cli = parse(
            "caracal policy create --agent-id X --limit 1000.00 --currency USD \
             --time-window daily --window-type calendar",
        );
        assert_eq!(cli.format(), OutputFormat::Table);
        let Command::Policy(PolicyArgs {
            command:
                PolicyCmd::Create {
                    agent_id,
                    limit,
                    currency,
                    time_window,
                    window_type,
                    on_expiry,
                },
            ..
        }) = cli.command
        else {
            panic!("wrong command");
        };
        assert_eq!(agent_id, "X");
        assert_eq!(limit, "1000.00");
        assert_eq!(currency, "USD");
        assert_eq!(time_window, TimeWindow::Daily);
        assert_eq!(window_type, WindowType::Calendar);
        assert_eq!(on_expiry, None);
        assert_eq!(wire(time_window), "daily");
        assert_eq!(wire(window_type), "calendar");
    }

    #[test]
    fn policy_create_with_on_expiry() {
        let cli = parse(
            "caracal policy create --agent-id X --limit 5 --currency EUR \
             --time-window monthly --window-type rolling --on-expiry release",
        );
        let Command::Policy(PolicyArgs {
            command: PolicyCmd::Create { on_expiry, .. },
            ..
        }) = cli.command
        else {
            panic!("wrong command");
        };
        assert_eq!(on_expiry.map(wire).as_deref(), Some("release"));
    }

    #[test]
    fn policy_create_rejects_unknown_window() {
        let e = parse_err(
            "caracal policy create --agent-id X --limit 1 --currency USD \
             --time-window fortnightly --window-type calendar",
        );
        assert_eq!(e.kind(), clap::error::ErrorKind::InvalidValue);
    }

    #[test]
    fn agent_create_with_metadata() {
        let cli = Cli::try_parse_from([
            "caracal",
            "agent",
            "create",
            "--name",
            "bot",
            "--type",
            "openai",
            "--metadata",
            r#"{"team":"platform"}"#,
        ])
        .unwrap();
        let Command::Agent(AgentArgs {
            command:
                AgentCmd::Create {
                    name,
                    agent_type,
                    parent_id,
                    metadata,
                },
            ..
        }) = cli.command
        else {
            panic!("wrong command");
        };
        assert_eq!(name, "bot");
        assert_eq!(agent_type, "openai");
        assert_eq!(parent_id, None);
        assert_eq!(metadata.as_deref(), Some(r#"{"team":"platform"}"#));
    }

    #[test]
    fn agent_metadata_must_be_an_object() {
        let e = Cli::try_parse_from([
            "caracal",
            "agent",
            "create",
            "--name",
            "a",
            "--type",
            "t",
            "--metadata",
            "[1]",
        ])
        .unwrap_err();
        assert!(e.to_string().contains("JSON object"), "{e}");
    }

    #[test]
    fn agent_update_parent_can_be_cleared() {
        let cli =
            Cli::try_parse_from(["caracal", "agent", "update", "A1", "--parent-id", ""]).unwrap();
        let Command::Agent(AgentArgs {
            command:
                AgentCmd::Update {
                    id,
                    agent_type,
                    metadata,
                    parent_id,
                },
            ..
        }) = cli.command
        else {
            panic!("wrong command");
        };
        assert_eq!(id, "A1");
        assert_eq!(agent_type, None);
        assert_eq!(metadata, None);
        assert_eq!(parent_id.as_deref(), Some(""));
    }

    #[test]
    fn agent_update_needs_a_change() {
        let e = parse_err("caracal agent update A1");
        assert_eq!(e.kind(), clap::error::ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn agent_list_and_key_commands() {
        let cli = parse("caracal agent list --status active --limit 5");
        let Command::Agent(AgentArgs {
            command:
                AgentCmd::List {
                    status,
                    parent_id,
                    limit,
                },
            ..
        }) = cli.command
        else {
            panic!("wrong command");
        };
        assert_eq!(status, Some(AgentStatus::Active));
        assert_eq!(parent_id, None);
        assert_eq!(limit, Some(5));

        let cli = parse("caracal agent key issue --agent-id A1");
        assert!(matches!(
            cli.command,
            Command::Agent(AgentArgs { command: AgentCmd::Key(KeyCmd::Issue { ref agent_id }), .. })
                if agent_id == "A1"
        ));
        let cli = parse("caracal agent key revoke --key-id K1");
        assert!(matches!(
            cli.command,
            Command::Agent(AgentArgs { command: AgentCmd::Key(KeyCmd::Revoke { ref key_id }), .. })
                if key_id == "K1"
        ));
    }

    #[test]
    fn policy_update_and_at() {
        let cli = parse("caracal policy update P1 --limit 200.00 --expected-version 3");
        let Command::Policy(PolicyArgs {
            command:
                PolicyCmd::Update {
                    id,
                    limit,
                    expected_version,
                    currency,
                    ..
                },
            ..
        }) = cli.command
        else {
            panic!("wrong command");
        };
        assert_eq!(id, "P1");
        assert_eq!(limit.as_deref(), Some("200.00"));
        assert_eq!(currency, None);
        assert_eq!(expected_version, Some(3));

        let cli = parse("caracal policy at P1 --time 2025-01-31T12:00:00+01:00");
        let Command::Policy(PolicyArgs {
            command: PolicyCmd::At { time, .. },
            ..
        }) = cli.command
        else {
            panic!("wrong command");
        };
        assert_eq!(time.to_rfc3339(), "2025-01-31T11:00:00+00:00");

        assert_eq!(
            parse_err("caracal policy at P1 --time yesterday").kind(),
            clap::error::ErrorKind::ValueValidation
        );
    }

    #[test]
    fn allowlist_commands() {
        let cli =
            parse("caracal allowlist add --agent-id A --target model --pattern gpt-4* --kind glob");
        let Command::Allowlist(AllowlistArgs {
            command:
                AllowlistCmd::Add {
                    agent_id,
                    target,
                    pattern,
                    kind,
                },
            ..
        }) = cli.command
        else {
            panic!("wrong command");
        };
        assert_eq!(agent_id, "A");
        assert_eq!(wire(target), "model");
        assert_eq!(pattern, "gpt-4*");
        assert_eq!(kind, Some(PatternKind::Glob));

        let cli = parse("caracal allowlist check --agent-id A --target model --value gpt-4o");
        assert!(matches!(
            cli.command,
            Command::Allowlist(AllowlistArgs {
                command: AllowlistCmd::Check { target: Target::Model, ref value, .. },
                ..
            }) if value == "gpt-4o"
        ));
    }

    #[test]
    fn pricebook_set_prices_do_not_clash_with_output_format() {
        let cli = parse(
            "caracal pricebook set --provider openai --model gpt-4o --currency USD \
             --input-price 2.50 --output-price 10.00 --cached-input-price 1.25",
        );
        assert_eq!(cli.format(), OutputFormat::Table);
        let Command::Pricebook(PricebookArgs {
            command: PricebookCmd::Set(set),
        }) = cli.command
        else {
            panic!("wrong command");
        };
        assert_eq!(set.provider, "openai");
        assert_eq!(set.model, "gpt-4o");
        assert_eq!(set.input_price, "2.50");
        assert_eq!(set.output_price, "10.00");
        assert_eq!(set.cached_input_price.as_deref(), Some("1.25"));
        assert_eq!(set.per_request_price, None);

        let cli = parse(
            "caracal pricebook set --provider openai --model m --currency USD \
             --input-price 1 --output-price 2 --output json",
        );
        assert_eq!(cli.format(), OutputFormat::Json);
    }

    #[test]
    fn output_format_before_or_after_the_resource() {
        assert_eq!(
            parse("caracal --output json agent list").format(),
            OutputFormat::Json
        );
        assert_eq!(
            parse("caracal agent list --output json").format(),
            OutputFormat::Json
        );
        assert_eq!(
            parse("caracal agent --output json list").format(),
            OutputFormat::Json
        );
        assert_eq!(
            parse("caracal policy get P --output json").format(),
            OutputFormat::Json
        );
        assert_eq!(
            parse("caracal pricebook list --output json").format(),
            OutputFormat::Json
        );
        assert_eq!(
            parse("caracal pricebook import f.csv --output json").format(),
            OutputFormat::Json
        );
        assert_eq!(
            parse("caracal --output json allowlist list --agent-id A --output table").format(),
            OutputFormat::Table
        );
    }

    #[test]
    fn connection_options_anywhere() {
        let cli =
            parse("caracal agent get bot --server http://h:1 --admin-token s3cret --timeout 3");
        assert_eq!(cli.conn.server, "http://h:1");
        assert_eq!(cli.conn.admin_token.as_deref(), Some("s3cret"));
        assert_eq!(cli.conn.timeout, 3);
        assert_eq!(
            parse_err("caracal --timeout 0 agent get bot").kind(),
            clap::error::ErrorKind::ValueValidation
        );
    }
}
