//! `caracal merkle ...`: the tamper-evident ledger (SPEC section 5) over the admin
//! API's MerkleService, and the offline checks an auditor runs with nothing but
//! the log's public key.
//!
//! | command | talks to |
//! | --- | --- |
//! | `checkpoint`, `list-checkpoints`, `prove`, `consistency`, `verify-range`, `export-public-key`, `export-leaves` | the admin API |
//! | `verify-proof`, `consistency --verify` (the check itself) | nothing: the proof file / the notes and the `--public-key` files only |
//! | `rotate-key` | the key directory, and PostgreSQL with `--database-url` |
//!
//! A check that finds something wrong (a proof or a pair of checkpoints that does
//! not verify, a verify-range failure) exits with
//! [`EXIT_DRIFT`](crate::EXIT_DRIFT) (3) after printing what it found; any other
//! error (unreadable file, server down, ...) with 1.
//!
//! Public key files (`--public-key`) hold one or more SPKI PEM blocks
//! (`-----BEGIN PUBLIC KEY-----`); text around them, such as the comment lines
//! `export-public-key` writes, is ignored. A key is tried under every key name
//! the note's signature lines carry (the log's origin), so the file needs no name.

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context, Result};
use base64::{engine::general_purpose::STANDARD, Engine as _};
use caracal_domain::merkle::{
    checkpoint::note_key_ids,
    keys::{key_id_hex, Verifier},
    proof_file::{verify_consistency_notes, ProofFile},
    tree::{self, Hash},
};
use caracal_proto::v1 as pb;
use chrono::{DateTime, NaiveDate, SecondsFormat, Utc};
use clap::{ArgGroup, Args, Subcommand};
use serde_json::{json, Value};

use crate::{
    commands::Ctx,
    output::{self, key_values, ts_json, ts_text, OutputFormat, Table},
};

/// The sequencer's default `ledgerWriter.merkle.origin`: the key name of its
/// signature lines.
pub const DEFAULT_ORIGIN: &str = "caracal.local/ledger";

#[derive(Debug, Args)]
pub struct MerkleArgs {
    #[command(subcommand)]
    pub command: MerkleCmd,
}

#[derive(Debug, Subcommand)]
pub enum MerkleCmd {
    /// Print a signed checkpoint (the newest, or the one of --size leaves): the
    /// signed note as is (`--output json`: its fields).
    Checkpoint {
        /// The tree size of the checkpoint.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        size: Option<u64>,
    },
    /// List published checkpoints, oldest first: those of tree size --from ..= --to,
    /// or without either the newest --limit.
    ListCheckpoints {
        /// Smallest tree size.
        #[arg(long, value_name = "N")]
        from: Option<u64>,
        /// Largest tree size.
        #[arg(long, value_name = "M", value_parser = clap::value_parser!(u64).range(1..))]
        to: Option<u64>,
        /// At most this many (1..=1000; default 100).
        #[arg(long, value_name = "K", value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: Option<u32>,
    },
    /// Write the inclusion proof of a ledger event (a self-contained JSON file that
    /// `verify-proof` checks offline) to --out or stdout.
    Prove {
        #[arg(long, value_name = "ID")]
        event_id: String,
        /// Prove against the checkpoint of this tree size (default: the newest).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        checkpoint: Option<u64>,
        /// Write the proof to this file (leaf index and tree size go to stderr).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Verify a proof file OFFLINE (no server, no database) against the log's
    /// public key(s). Exits with 3 when it does not verify.
    VerifyProof {
        /// The proof file written by `prove`.
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// A PEM file of trusted public key(s) (repeat for several, e.g. across a
        /// key rotation).
        #[arg(long, value_name = "PEM", required = true)]
        public_key: Vec<PathBuf>,
    },
    /// The consistency proof between two checkpoints (--to defaults to the newest);
    /// with --verify, checked offline against the --public-key files: the newer
    /// checkpoint extends the older one. Exits with 3 when it does not verify.
    Consistency {
        /// Tree size of the older checkpoint.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        from: u64,
        /// Tree size of the newer checkpoint (default: the newest).
        #[arg(long, value_name = "M", value_parser = clap::value_parser!(u64).range(1..))]
        to: Option<u64>,
        /// Check the proof and both signed notes with the --public-key files only.
        #[arg(long, requires = "public_key")]
        verify: bool,
        /// A PEM file of trusted public key(s) (repeatable).
        #[arg(long, value_name = "PEM", requires = "verify")]
        public_key: Vec<PathBuf>,
    },
    /// Recompute the ledger rows of a period (or the leaves of an index range)
    /// and check them, the stored tree and every checkpoint against the signed
    /// roots. Prints a summary and one line per failure; exits with 3 on any.
    #[command(group(
        ArgGroup::new("range")
            .required(true)
            .multiple(true)
            .args(["start", "end", "from_leaf", "to_leaf"])
    ))]
    VerifyRange {
        /// First instant: a UTC date (2026-02-01 = its 00:00) or RFC 3339.
        #[arg(long, value_name = "DATE|TIME", value_parser = instant,
              requires = "end", conflicts_with_all = ["from_leaf", "to_leaf"])]
        start: Option<Instant>,
        /// Last instant: a UTC date is INCLUDED to its end (--end 2026-02-03 checks up
        /// to 2026-02-04T00:00:00Z, excluded); an RFC 3339 time is excluded. At most
        /// 366 days after --start.
        #[arg(long, value_name = "DATE|TIME", value_parser = instant, requires = "start")]
        end: Option<Instant>,
        /// First leaf index (included; default 0).
        #[arg(long, value_name = "N")]
        from_leaf: Option<u64>,
        /// Last leaf index (included; default: the log's last leaf).
        #[arg(long, value_name = "M")]
        to_leaf: Option<u64>,
    },
    /// Print the log's public key(s) as PEM: every key ever registered, each after a
    /// `# key_id=... name=... registered_at=...` line, or only --key-id's.
    ExportPublicKey {
        /// 8 hex digits.
        #[arg(long, value_name = "HEX")]
        key_id: Option<String>,
        /// Write to this file instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Export leaves --from ..= --to as JSON lines
    /// `{"leaf_index","event_id","leaf":"<base64>","leaf_hash":"<hex>"}`, rebuilt
    /// from the current rows ("leaf": null when the row is gone). The leaf hash is
    /// BLAKE3(0x00 || leaf); RFC 9162 over them gives the signed roots.
    ExportLeaves {
        /// First leaf index (included).
        #[arg(long, value_name = "N", default_value_t = 0)]
        from: u64,
        /// Last leaf index (included; default: the log's last leaf).
        #[arg(long, value_name = "M")]
        to: Option<u64>,
        /// Write to this file instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Generate a new checkpoint signing key into the sequencer's key directory
    /// (run it where the ledger-writer's `ledgerWriter.merkle.keyDir` is, e.g.
    /// `kubectl exec` into the ledger-writer). The sequencer signs with the newest
    /// registered key it holds from its next key reload (within 5 s); older
    /// checkpoints keep verifying with the old public keys. Prints the key id and
    /// the public key; the private key is never printed.
    RotateKey {
        /// The sequencer's key directory.
        #[arg(long, value_name = "DIR")]
        key_dir: PathBuf,
        /// Encrypt the key with this passphrase (the sequencer's
        /// `keyPassphraseFile`: it must open every key in DIR).
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
        /// The key name: the log's origin (`ledgerWriter.merkle.origin`).
        #[arg(long, value_name = "NAME", default_value = DEFAULT_ORIGIN)]
        origin: String,
        /// Also register the public key in merkle_keys now (a role that may insert
        /// there: the ledger-writer's). Without it the sequencer registers it at
        /// its next key reload.
        #[arg(
            long,
            env = "CARACAL_DATABASE_URL",
            hide_env_values = true,
            value_name = "URL"
        )]
        database_url: Option<String>,
    },
}

/// A check found the ledger, its log, a proof or a checkpoint not as signed: what
/// was found is printed; the process exits with [`EXIT_DRIFT`](crate::EXIT_DRIFT).
#[derive(Debug)]
pub struct VerificationFailed(pub String);

impl std::fmt::Display for VerificationFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for VerificationFailed {}

fn failed(message: impl Into<String>) -> anyhow::Error {
    VerificationFailed(message.into()).into()
}

// ------------------------------------------------------------------ input

/// A bound of `verify-range`: a UTC day or an instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Instant {
    Date(NaiveDate),
    Time(DateTime<Utc>),
}

impl Instant {
    /// A start date at its 00:00; an end date (included) at the next day's.
    pub fn at(self, end: bool) -> Result<DateTime<Utc>> {
        match self {
            Instant::Time(t) => Ok(t),
            Instant::Date(d) => {
                let day = if end {
                    d.succ_opt()
                        .ok_or_else(|| anyhow!("--end {d} is out of range"))?
                } else {
                    d
                };
                Ok(day.and_time(chrono::NaiveTime::MIN).and_utc())
            }
        }
    }
}

fn instant(text: &str) -> Result<Instant, String> {
    if let Ok(d) = NaiveDate::parse_from_str(text.trim(), "%Y-%m-%d") {
        return Ok(Instant::Date(d));
    }
    DateTime::parse_from_rfc3339(text.trim())
        .map(|t| Instant::Time(t.with_timezone(&Utc)))
        .map_err(|_| {
            format!(
                "expected a UTC date such as 2026-02-01 or a time such as \
                 2026-02-01T10:00:00Z, got {text:?}"
            )
        })
}

fn timestamp_of(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

/// Every SPKI PEM block (`-----BEGIN PUBLIC KEY-----` .. `-----END PUBLIC KEY-----`)
/// of a file's text, comments and blank lines around them left out.
pub fn pem_blocks(text: &str) -> Vec<String> {
    const BEGIN: &str = "-----BEGIN PUBLIC KEY-----";
    const END: &str = "-----END PUBLIC KEY-----";
    let mut blocks = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(BEGIN) {
        let Some(len) = rest[start..].find(END) else {
            break;
        };
        let stop = start + len + END.len();
        blocks.push(format!("{}\n", &rest[start..stop]));
        rest = &rest[stop..];
    }
    blocks
}

/// The trusted keys of `--public-key` files, each under every key name of
/// `names` (the names the notes' signature lines carry).
pub fn load_verifiers(files: &[PathBuf], names: &[String]) -> Result<Vec<Verifier>> {
    let mut verifiers = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read --public-key {}", file.display()))?;
        let blocks = pem_blocks(&text);
        if blocks.is_empty() {
            bail!(
                "--public-key {} holds no PEM public key (-----BEGIN PUBLIC KEY-----)",
                file.display()
            );
        }
        for pem in &blocks {
            for name in names {
                let v = Verifier::from_public_key_pem(name, pem)
                    .with_context(|| format!("--public-key {}", file.display()))?;
                if !verifiers.contains(&v) {
                    verifiers.push(v);
                }
            }
        }
    }
    Ok(verifiers)
}

/// The key names of a note's signature lines (distinct, in order).
fn signer_names(notes: &[&str]) -> Result<Vec<String>> {
    let mut names: Vec<String> = Vec::new();
    for note in notes {
        let lines = note_key_ids(note)
            .map_err(|e| failed(format!("the checkpoint is not a signed note: {e}")))?;
        for (name, _) in lines {
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    Ok(names)
}

fn write_out(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// A side note for people (stderr), kept off the command's output.
fn note(text: &str) {
    let _ = writeln!(std::io::stderr(), "{text}");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

// ------------------------------------------------------------------ run

pub async fn run(ctx: &Ctx<'_>, cmd: MerkleCmd, out: &mut dyn Write) -> Result<()> {
    match cmd {
        MerkleCmd::Checkpoint { size } => {
            let answer = ctx
                .connect()
                .await?
                .merkle()
                .get_checkpoint(pb::GetCheckpointRequest {
                    tree_size: size.unwrap_or(0),
                })
                .await?
                .into_inner();
            let cp = answer
                .checkpoint
                .ok_or_else(|| anyhow!("the server answered without a checkpoint"))?;
            match ctx.format {
                OutputFormat::Json => {
                    let mut value = checkpoint_json(&cp);
                    value["log_size"] = json!(answer.log_size);
                    output::write_json(out, &value)
                }
                // The note exactly as signed: what an auditor keeps and verifies.
                _ => output::write_text(out, &cp.note),
            }
        }
        MerkleCmd::ListCheckpoints { from, to, limit } => {
            let answer = ctx
                .connect()
                .await?
                .merkle()
                .list_checkpoints(pb::ListCheckpointsRequest {
                    from_size: from.unwrap_or(0),
                    to_size: to.unwrap_or(0),
                    limit: limit.unwrap_or(0),
                })
                .await?
                .into_inner();
            let mut table = Table::new(["TREE_SIZE", "ROOT", "KEY_ID", "PUBLISHED_AT"]);
            for cp in &answer.checkpoints {
                table.row(vec![
                    cp.tree_size.to_string(),
                    STANDARD.encode(&cp.root),
                    cp.key_id.clone(),
                    ts_text(cp.published_at.as_ref()),
                ]);
            }
            let json = answer.checkpoints.iter().map(checkpoint_json).collect();
            output::write_list(out, ctx.format, json, &table)?;
            if answer.more {
                note("more checkpoints match: ask with --from (after the last size shown) or a larger --limit");
            }
            Ok(())
        }
        MerkleCmd::Prove {
            event_id,
            checkpoint,
            out: file,
        } => {
            let answer = ctx
                .connect()
                .await?
                .merkle()
                .prove_inclusion(pb::ProveInclusionRequest {
                    event_id: event_id.clone(),
                    checkpoint_size: checkpoint.unwrap_or(0),
                })
                .await?
                .into_inner();
            let proof = ProofFile::from_json(&answer.proof_json)
                .map_err(|e| anyhow!("the server's proof is not a proof file: {e}"))?;
            let mut text = proof.to_json().map_err(|e| anyhow!("{e}"))?;
            text.push('\n');
            match file {
                Some(path) => {
                    write_out(&path, &text)?;
                    note(&format!(
                        "event {event_id} is leaf {} of the tree of size {} (checkpoint signed by key {}); proof written to {}",
                        proof.leaf_index,
                        proof.tree_size,
                        proof.key_id,
                        path.display()
                    ));
                    Ok(())
                }
                None => output::write_text(out, &text),
            }
        }
        MerkleCmd::VerifyProof { file, public_key } => {
            verify_proof(&file, &public_key, ctx.format, out)
        }
        MerkleCmd::Consistency {
            from,
            to,
            verify,
            public_key,
        } => {
            let answer = ctx
                .connect()
                .await?
                .merkle()
                .prove_consistency(pb::ProveConsistencyRequest {
                    from_size: from,
                    to_size: to.unwrap_or(0),
                })
                .await?
                .into_inner();
            consistency(
                answer,
                from,
                verify.then_some(&public_key[..]),
                ctx.format,
                out,
            )
        }
        MerkleCmd::VerifyRange {
            start,
            end,
            from_leaf,
            to_leaf,
        } => {
            let mut request = pb::VerifyRangeRequest::default();
            let scope = match (start, end) {
                (Some(start), Some(end)) => {
                    let (s, e) = (start.at(false)?, end.at(true)?);
                    if e <= s {
                        bail!(
                            "the range ends ({}) at or before it starts ({}); an --end date is included",
                            rfc3339(e),
                            rfc3339(s)
                        );
                    }
                    request.start_time = Some(timestamp_of(s));
                    request.end_time = Some(timestamp_of(e));
                    format!("{} .. {} (end excluded)", rfc3339(s), rfc3339(e))
                }
                _ => {
                    request.from_leaf = from_leaf;
                    request.to_leaf = to_leaf;
                    format!(
                        "leaves {} ..= {}",
                        from_leaf.unwrap_or(0),
                        to_leaf.map_or("end".to_owned(), |t| t.to_string())
                    )
                }
            };
            let report = ctx
                .connect()
                .await?
                .merkle()
                .verify_range(request)
                .await?
                .into_inner();
            write_report(out, ctx.format, &scope, &report)?;
            if report.failures_total > 0 {
                return Err(failed(format!(
                    "verify-range found {} failure(s) in {scope}: the ledger or its Merkle log \
                     no longer matches the signed checkpoints",
                    report.failures_total
                )));
            }
            Ok(())
        }
        MerkleCmd::ExportPublicKey { key_id, out: file } => {
            let keys = ctx
                .connect()
                .await?
                .merkle()
                .list_public_keys(pb::ListPublicKeysRequest {})
                .await?
                .into_inner()
                .keys;
            for k in &keys {
                check_key_record(k)?;
            }
            let text = match &key_id {
                Some(id) => {
                    let id = id.trim().to_ascii_lowercase();
                    let Some(k) = keys.iter().find(|k| k.key_id == id) else {
                        bail!(
                            "no public key {id} in the log (known: {})",
                            keys.iter()
                                .map(|k| k.key_id.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        );
                    };
                    match ctx.format {
                        OutputFormat::Json => json_text(&key_json(k))?,
                        _ => pem_text(&k.public_key_pem),
                    }
                }
                None => match ctx.format {
                    OutputFormat::Json => {
                        json_text(&Value::Array(keys.iter().map(key_json).collect()))?
                    }
                    _ => keys
                        .iter()
                        .map(|k| {
                            format!(
                                "# key_id={} name={} registered_at={}\n{}",
                                k.key_id,
                                k.key_name,
                                ts_text(k.registered_at.as_ref()),
                                pem_text(&k.public_key_pem)
                            )
                        })
                        .collect(),
                },
            };
            match file {
                Some(path) => {
                    write_out(&path, &text)?;
                    note(&format!(
                        "{} public key(s) written to {}",
                        if key_id.is_some() { 1 } else { keys.len() },
                        path.display()
                    ));
                    Ok(())
                }
                None => output::write_text(out, &text),
            }
        }
        MerkleCmd::ExportLeaves {
            from,
            to,
            out: file,
        } => {
            if let Some(to) = to {
                if to < from {
                    bail!("--to {to} is before --from {from}");
                }
            }
            let mut client = ctx.connect().await?.merkle();
            let mut sink: Box<dyn Write + '_> = match &file {
                Some(path) => Box::new(std::io::BufWriter::new(
                    std::fs::File::create(path)
                        .with_context(|| format!("cannot create {}", path.display()))?,
                )),
                None => Box::new(&mut *out),
            };
            let mut next = Some(from);
            let mut count: u64 = 0;
            while let Some(from_index) = next {
                let page = client
                    .export_leaves(pb::ExportLeavesRequest {
                        from_index,
                        to_index: to.unwrap_or(u64::MAX),
                    })
                    .await?
                    .into_inner();
                for leaf in &page.leaves {
                    writeln!(sink, "{}", serde_json::to_string(&leaf_json(leaf))?)?;
                    count += 1;
                }
                next = match page.next_index {
                    Some(n) if n <= from_index => {
                        bail!("the server returned the same page twice; stopping")
                    }
                    other => other,
                };
            }
            sink.flush()?;
            if let Some(path) = &file {
                note(&format!("{count} leaves written to {}", path.display()));
            }
            Ok(())
        }
        MerkleCmd::RotateKey {
            key_dir,
            passphrase_file,
            origin,
            database_url,
        } => {
            rotate_key(
                &key_dir,
                passphrase_file.as_deref(),
                &origin,
                database_url,
                ctx.format,
                out,
            )
            .await
        }
    }
}

// ------------------------------------------------------------------ checkpoints

fn checkpoint_json(cp: &pb::MerkleCheckpoint) -> Value {
    json!({
        "tree_size": cp.tree_size,
        "root": STANDARD.encode(&cp.root),
        "key_id": cp.key_id,
        "published_at": ts_json(cp.published_at.as_ref()),
        "note": cp.note,
    })
}

fn json_text(value: &Value) -> Result<String> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    Ok(text)
}

fn pem_text(pem: &str) -> String {
    let mut text = pem.trim_end().to_owned();
    text.push('\n');
    text
}

// ------------------------------------------------------------------ proofs

/// `verify-proof`: everything from the file and the key files, nothing else.
fn verify_proof(
    file: &Path,
    public_keys: &[PathBuf],
    format: OutputFormat,
    out: &mut dyn Write,
) -> Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let proof = ProofFile::from_json(&text)
        .map_err(|e| failed(format!("{} is not a proof file: {e}", file.display())))?;
    let names = signer_names(&[&proof.checkpoint])?;
    let verifiers = load_verifiers(public_keys, &names)?;
    let verified = proof.verify(&verifiers).map_err(|e| {
        failed(format!(
            "the proof in {} does NOT verify: {e}",
            file.display()
        ))
    })?;
    // `event` is the readable copy of the leaf, not covered by the proof: a copy
    // that says something else than the leaf would mislead whoever reads it.
    let leaf = serde_json::to_value(&verified.leaf)?;
    if leaf != proof.event {
        let fields = differing_fields(&leaf, &proof.event);
        return Err(failed(format!(
            "the proof's leaf verifies, but its readable \"event\" differs from the leaf in {} \
             (the file was edited): trust only the leaf",
            if fields.is_empty() {
                "its shape".to_owned()
            } else {
                fields.join(", ")
            }
        )));
    }
    let cp = &verified.checkpoint;
    let key = key_id_hex(&verified.key_id);
    let signed_at = DateTime::from_timestamp(cp.timestamp_unix, 0)
        .map_or_else(|| cp.timestamp_unix.to_string(), rfc3339);
    let event_id = &verified.leaf.event_id;
    match format {
        OutputFormat::Json => output::write_json(
            out,
            &json!({
                "ok": true,
                "event_id": event_id,
                "leaf_index": proof.leaf_index,
                "tree_size": cp.size,
                "root": STANDARD.encode(cp.root),
                "origin": cp.origin,
                "key_id": key,
                "signed_at": signed_at,
                "event": leaf,
            }),
        ),
        _ => {
            writeln!(
                out,
                "OK: event {event_id} is leaf {} of the tree of size {} signed by key {key} at {signed_at}",
                proof.leaf_index, cp.size
            )?;
            output::write_text(
                out,
                &key_values(&[
                    ("origin", cp.origin.clone()),
                    ("root", STANDARD.encode(cp.root)),
                    (
                        "charged",
                        format!(
                            "{} {}",
                            output::micros_text(verified.leaf.charged_micros),
                            verified.leaf.currency
                        ),
                    ),
                    (
                        "agent",
                        caracal_domain::merkle::leaf::format_uuid(&verified.leaf.agent_id),
                    ),
                    (
                        "occurred_at",
                        verified.leaf.occurred_at().map(rfc3339).unwrap_or_default(),
                    ),
                ]),
            )
        }
    }
}

fn differing_fields(a: &Value, b: &Value) -> Vec<String> {
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
        return Vec::new();
    };
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| k.to_string())
        .collect()
}

fn consistency(
    answer: pb::ProveConsistencyResponse,
    from: u64,
    public_keys: Option<&[PathBuf]>,
    format: OutputFormat,
    out: &mut dyn Write,
) -> Result<()> {
    let (Some(older), Some(newer)) = (&answer.older, &answer.newer) else {
        bail!("the server answered without both checkpoints");
    };
    let proof: Vec<Hash> = answer
        .proof
        .iter()
        .enumerate()
        .map(|(i, h)| {
            Hash::try_from(h.as_slice())
                .map_err(|_| anyhow!("proof hash {i} is {} bytes, not 32", h.len()))
        })
        .collect::<Result<_>>()?;
    let verified = match public_keys {
        None => None,
        Some(files) => {
            let names = signer_names(&[&older.note, &newer.note])?;
            let verifiers = load_verifiers(files, &names)?;
            let (o, n) = verify_consistency_notes(&older.note, &newer.note, &proof, &verifiers)
                .map_err(|e| failed(format!("the consistency proof does NOT verify: {e}")))?;
            if o.size != from {
                return Err(failed(format!(
                    "asked for the checkpoint of size {from}, the server's signed note is of size {}",
                    o.size
                )));
            }
            Some((o, n))
        }
    };
    match format {
        OutputFormat::Json => output::write_json(
            out,
            &json!({
                "from": checkpoint_json(older),
                "to": checkpoint_json(newer),
                "proof": proof.iter().map(|h| STANDARD.encode(h)).collect::<Vec<_>>(),
                "verified": verified.is_some(),
            }),
        ),
        _ => {
            let mut text = key_values(&[
                (
                    "from",
                    format!(
                        "{}  root {}  key {}",
                        older.tree_size,
                        STANDARD.encode(&older.root),
                        older.key_id
                    ),
                ),
                (
                    "to",
                    format!(
                        "{}  root {}  key {}",
                        newer.tree_size,
                        STANDARD.encode(&newer.root),
                        newer.key_id
                    ),
                ),
                ("proof", format!("{} hash(es)", proof.len())),
            ]);
            for h in &proof {
                text.push_str(&format!("  {}\n", STANDARD.encode(h)));
            }
            if let Some((o, n)) = &verified {
                text.push_str(&format!(
                    "OK: the checkpoint of size {} extends the checkpoint of size {} (same log {}, both signed by a trusted key)\n",
                    n.size, o.size, n.origin
                ));
            }
            output::write_text(out, &text)
        }
    }
}

// ------------------------------------------------------------------ verify-range

fn failure_line(f: &pb::MerkleVerificationFailure) -> String {
    let mut line = format!("FAILURE {}", f.kind);
    if !f.event_id.is_empty() {
        line.push_str(&format!(" event={}", f.event_id));
    }
    if let Some(i) = f.leaf_index {
        line.push_str(&format!(" leaf={i}"));
    }
    if let Some(c) = f.checkpoint {
        line.push_str(&format!(" checkpoint={c}"));
    }
    line.push_str(": ");
    line.push_str(&f.detail.split_whitespace().collect::<Vec<_>>().join(" "));
    line
}

fn write_report(
    out: &mut dyn Write,
    format: OutputFormat,
    scope: &str,
    r: &pb::VerifyRangeResponse,
) -> Result<()> {
    match format {
        OutputFormat::Json => output::write_json(
            out,
            &json!({
                "range": scope,
                "ok": r.failures_total == 0,
                "events_checked": r.events_checked,
                "pending": r.pending,
                "unsigned": r.unsigned,
                "rewritten": r.rewritten,
                "checkpoints_checked": r.checkpoints_checked,
                "tree_size": r.tree_size,
                "newest_checkpoint": r.newest_checkpoint,
                "failures_total": r.failures_total,
                "failures": r.failures.iter().map(|f| json!({
                    "kind": f.kind,
                    "event_id": (!f.event_id.is_empty()).then_some(&f.event_id),
                    "leaf_index": f.leaf_index,
                    "checkpoint": f.checkpoint,
                    "detail": f.detail,
                })).collect::<Vec<_>>(),
            }),
        ),
        _ => {
            let mut text = key_values(&[
                ("range", scope.to_owned()),
                ("events checked", r.events_checked.to_string()),
                (
                    "pending",
                    format!("{} (queued, not in the log yet)", r.pending),
                ),
                (
                    "unsigned",
                    format!("{} (in the log, no checkpoint yet)", r.unsigned),
                ),
                (
                    "rewritten",
                    format!(
                        "{} (in the log twice: the row was deleted and written again)",
                        r.rewritten
                    ),
                ),
                ("checkpoints checked", r.checkpoints_checked.to_string()),
                ("tree size", r.tree_size.to_string()),
                ("newest checkpoint", r.newest_checkpoint.to_string()),
                ("failures", r.failures_total.to_string()),
            ]);
            for f in &r.failures {
                text.push_str(&failure_line(f));
                text.push('\n');
            }
            if r.failures_total > r.failures.len() as u64 {
                text.push_str(&format!(
                    "... and {} more failure(s) not listed\n",
                    r.failures_total - r.failures.len() as u64
                ));
            }
            if r.failures_total == 0 {
                text.push_str("OK: every row of the range matches the signed log\n");
            }
            output::write_text(out, &text)
        }
    }
}

// ------------------------------------------------------------------ keys and leaves

fn key_json(k: &pb::MerklePublicKey) -> Value {
    json!({
        "key_id": k.key_id,
        "key_name": k.key_name,
        "registered_at": ts_json(k.registered_at.as_ref()),
        "public_key_pem": k.public_key_pem,
    })
}

/// A key record whose PEM is not the key its id names is refused: an auditor
/// would be handed the wrong key.
fn check_key_record(k: &pb::MerklePublicKey) -> Result<()> {
    let v = Verifier::from_public_key_pem(&k.key_name, &k.public_key_pem)
        .with_context(|| format!("the log's public key {} does not parse", k.key_id))?;
    let id = key_id_hex(&v.id());
    if id != k.key_id {
        bail!(
            "the log's key record {} holds the public key of key id {id}: merkle_keys was altered",
            k.key_id
        );
    }
    Ok(())
}

fn leaf_json(l: &pb::ExportedLeaf) -> Value {
    let (leaf, hash) = if l.row_missing {
        (Value::Null, Value::Null)
    } else {
        (
            Value::String(STANDARD.encode(&l.leaf)),
            Value::String(hex(&tree::leaf_hash(&l.leaf))),
        )
    };
    json!({
        "leaf_index": l.leaf_index,
        "event_id": l.event_id,
        "leaf": leaf,
        "leaf_hash": hash,
    })
}

async fn rotate_key(
    dir: &Path,
    passphrase_file: Option<&Path>,
    origin: &str,
    database_url: Option<String>,
    format: OutputFormat,
    out: &mut dyn Write,
) -> Result<()> {
    use caracal_merkle_log::keys;
    let passphrase = match passphrase_file {
        Some(path) => keys::read_passphrase(path)?,
        None => None,
    };
    // The sequencer opens every key of the directory with one passphrase: a key
    // it could not open would stop its key reloads.
    let held = keys::load_signers(dir, origin, passphrase.as_deref()).with_context(|| {
        format!(
            "the keys already in {} do not open with this passphrase (give the sequencer's \
             keyPassphraseFile as --passphrase-file)",
            dir.display()
        )
    })?;
    let (path, signer) = keys::generate_into(dir, origin, passphrase.as_deref())?;
    let verifier = signer.verifier();
    let pem = verifier
        .to_public_key_pem()
        .map_err(|e| anyhow!("cannot encode the public key: {e}"))?;
    let key_id = key_id_hex(&verifier.id());
    let registered = match &database_url {
        Some(url) => {
            let mut conn = caracal_service_kit::db::tls::establish(url)
                .await
                .context("cannot connect to the ledger database")?;
            keys::register(&mut conn, &verifier)
                .await
                .with_context(|| {
                    format!(
                    "the key is in {}, but registering it in merkle_keys failed (the sequencer \
                     registers it at its next key reload)",
                    path.display()
                )
                })?;
            true
        }
        None => false,
    };
    match format {
        OutputFormat::Json => output::write_json(
            out,
            &json!({
                "key_id": key_id,
                "key_name": origin,
                "file": path.display().to_string(),
                "encrypted": passphrase.is_some(),
                "registered": registered,
                "keys_in_dir": held.len() + 1,
                "public_key_pem": pem,
            }),
        ),
        _ => {
            let mut text = key_values(&[
                ("key_id", key_id.clone()),
                ("key_name", origin.to_owned()),
                ("file", path.display().to_string()),
                ("encrypted", output::yes_no(passphrase.is_some())),
                (
                    "registered",
                    if registered {
                        "yes: the sequencer signs with it from its next key reload (within 5 s)"
                            .to_owned()
                    } else {
                        "not yet: the sequencer registers it and signs with it at its next key reload"
                            .to_owned()
                    },
                ),
            ]);
            text.push('\n');
            text.push_str(&pem_text(&pem));
            output::write_text(out, &text)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use caracal_domain::merkle::keys::Signer;
    use clap::Parser;

    use crate::args::{Cli, Command};

    fn parse(args: &[&str]) -> Result<MerkleCmd, clap::Error> {
        let mut line = vec!["caracal", "merkle"];
        line.extend_from_slice(args);
        match Cli::try_parse_from(line)?.command {
            Command::Merkle(m) => Ok(m.command),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_default_origin_is_the_sequencers() {
        assert_eq!(
            DEFAULT_ORIGIN,
            caracal_merkle_log::MerkleConfig::default().origin
        );
    }

    #[test]
    fn verify_range_from_the_runbook_includes_the_end_date() {
        let MerkleCmd::VerifyRange { start, end, .. } = parse(&[
            "verify-range",
            "--start",
            "2026-02-01",
            "--end",
            "2026-02-03",
        ])
        .unwrap() else {
            panic!()
        };
        assert_eq!(
            rfc3339(start.unwrap().at(false).unwrap()),
            "2026-02-01T00:00:00Z"
        );
        assert_eq!(
            rfc3339(end.unwrap().at(true).unwrap()),
            "2026-02-04T00:00:00Z"
        );
        let MerkleCmd::VerifyRange { end, .. } = parse(&[
            "verify-range",
            "--start",
            "2026-02-01T10:00:00Z",
            "--end",
            "2026-02-03T10:00:00+02:00",
        ])
        .unwrap() else {
            panic!()
        };
        assert_eq!(
            rfc3339(end.unwrap().at(true).unwrap()),
            "2026-02-03T08:00:00Z"
        );
        // A range is required, of one kind, with both time bounds.
        assert!(parse(&["verify-range"]).is_err());
        assert!(parse(&["verify-range", "--start", "2026-02-01"]).is_err());
        assert!(parse(&[
            "verify-range",
            "--start",
            "2026-02-01",
            "--end",
            "2026-02-02",
            "--from-leaf",
            "0"
        ])
        .is_err());
        assert!(parse(&["verify-range", "--from-leaf", "3"]).is_ok());
        assert!(parse(&["verify-range", "--end", "yesterday"]).is_err());
    }

    #[test]
    fn verify_proof_needs_a_key_and_consistency_verify_too() {
        assert!(parse(&["verify-proof", "p.json"]).is_err());
        assert!(parse(&["verify-proof", "p.json", "--public-key", "k.pem"]).is_ok());
        assert!(parse(&["consistency", "--from", "4", "--verify"]).is_err());
        assert!(parse(&["consistency", "--from", "4", "--public-key", "k.pem"]).is_err());
        assert!(parse(&[
            "consistency",
            "--from",
            "4",
            "--verify",
            "--public-key",
            "k.pem"
        ])
        .is_ok());
        // --out never clashes with the global --output.
        let MerkleCmd::Prove { out, .. } = parse(&[
            "prove",
            "--event-id",
            "e",
            "--out",
            "p.json",
            "--output",
            "json",
        ])
        .unwrap() else {
            panic!()
        };
        assert_eq!(out, Some(PathBuf::from("p.json")));
    }

    #[test]
    fn pem_blocks_skip_comments_and_keys_load_under_each_name() {
        let a = Signer::generate("caracal.local/ledger").unwrap();
        let b = Signer::generate("caracal.local/ledger").unwrap();
        let pem_a = a.verifier().to_public_key_pem().unwrap();
        let pem_b = b.verifier().to_public_key_pem().unwrap();
        let text = format!("# key_id=x name=y\n{pem_a}\n# another\n{pem_b}");
        let blocks = pem_blocks(&text);
        assert_eq!(blocks.len(), 2);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys.pem");
        std::fs::write(&file, &text).unwrap();
        let names = vec!["caracal.local/ledger".to_owned(), "other".to_owned()];
        let v = load_verifiers(std::slice::from_ref(&file), &names).unwrap();
        assert_eq!(v.len(), 4);
        assert!(v.iter().any(|v| v.id() == a.id() && v.name() == "other"));
        std::fs::write(&file, "nothing here").unwrap();
        assert!(load_verifiers(&[file], &names).is_err());
    }

    #[test]
    fn failure_lines_name_event_leaf_and_checkpoint() {
        let f = pb::MerkleVerificationFailure {
            kind: "row_changed".into(),
            event_id: "evt-3".into(),
            leaf_index: Some(0),
            checkpoint: Some(4),
            detail: "the row\nchanged".into(),
        };
        assert_eq!(
            failure_line(&f),
            "FAILURE row_changed event=evt-3 leaf=0 checkpoint=4: the row changed"
        );
    }

    #[test]
    fn exported_leaves_carry_their_leaf_hash() {
        let l = pb::ExportedLeaf {
            leaf_index: 7,
            event_id: "e".into(),
            leaf: vec![1, 2, 3],
            row_missing: false,
        };
        let v = leaf_json(&l);
        assert_eq!(v["leaf"], "AQID");
        assert_eq!(v["leaf_hash"], hex(&tree::leaf_hash(&[1, 2, 3])));
        let gone = pb::ExportedLeaf {
            row_missing: true,
            leaf: Vec::new(),
            ..l
        };
        assert_eq!(leaf_json(&gone)["leaf"], Value::Null);
    }
}
