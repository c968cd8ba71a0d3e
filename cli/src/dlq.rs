//! `caracal dlq list|count|show|replay`: the dead-letter queue over the admin API's
//! DeadLetterService.
//!
//! - `list` follows the pages to the end (or `--limit`): pending dead letters, or
//!   every one with `--include-replayed`.
//! - `show --id P:O` prints the whole envelope; the payload as base64, and as text
//!   too when it is UTF-8.
//! - `replay --id P:O ...` or `--all`: each dead letter goes back to its original
//!   topic once; a repeated replay is refused with when and by whom it was done.
//!   With `--id`, any dead letter not replayed makes the command fail (exit 1) after
//!   the report; with `--all`, only failures do (refusals such as "not replayable"
//!   are the expected answer for messages that no replay can fix).

use std::io::Write;

use anyhow::{bail, Result};
use base64::{engine::general_purpose::STANDARD, Engine as _};
use caracal_proto::v1 as pb;
use clap::{ArgGroup, Args, Subcommand};
use serde_json::{json, Value};

use crate::{
    commands::{read_pages, Ctx},
    output::{self, or_dash, ts_json, ts_text, OutputFormat, Table},
};

#[derive(Debug, Args)]
pub struct DlqArgs {
    #[command(subcommand)]
    pub command: DlqCmd,
}

#[derive(Debug, Subcommand)]
pub enum DlqCmd {
    /// Dead letters (pending only, unless --include-replayed), in id order.
    List {
        /// Only those read from this topic.
        #[arg(long, value_name = "TOPIC")]
        topic: Option<String>,
        /// Only those this consumer group gave up on.
        #[arg(long, value_name = "GROUP")]
        group: Option<String>,
        /// Also the ones already replayed.
        #[arg(long)]
        include_replayed: bool,
        /// Stop after this many.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        limit: Option<u32>,
    },
    /// Totals: dead letters in the topic, pending, replayed, age of the oldest pending.
    Count {
        #[arg(long, value_name = "TOPIC")]
        topic: Option<String>,
        #[arg(long, value_name = "GROUP")]
        group: Option<String>,
    },
    /// One dead letter, whole: coordinates, reason, headers, key and payload.
    Show {
        /// `<dlq partition>:<dlq offset>`, as `dlq list` shows it.
        #[arg(long, value_name = "ID")]
        id: String,
    },
    /// Re-publish dead letters to their original topic, once each.
    #[command(group(ArgGroup::new("which").required(true).args(["id", "all"])))]
    Replay {
        /// A dead letter to replay (repeatable).
        #[arg(long, value_name = "ID")]
        id: Vec<String>,
        /// Every pending dead letter (narrowed by --topic / --group).
        #[arg(long)]
        all: bool,
        #[arg(long, value_name = "TOPIC", requires = "all")]
        topic: Option<String>,
        #[arg(long, value_name = "GROUP", requires = "all")]
        group: Option<String>,
    },
}

/// Upper bound on `replay --all` rounds (each handles up to 1000 dead letters).
const MAX_ROUNDS: usize = 1000;

pub async fn run(ctx: &Ctx<'_>, cmd: DlqCmd, out: &mut dyn Write) -> Result<()> {
    match cmd {
        DlqCmd::List {
            topic,
            group,
            include_replayed,
            limit,
        } => {
            let client = ctx.connect().await?.dead_letters();
            let letters = read_pages(limit, |page| {
                let mut client = client.clone();
                let request = pb::ListDeadLettersRequest {
                    original_topic: topic.clone().unwrap_or_default(),
                    consumer_group: group.clone().unwrap_or_default(),
                    include_replayed,
                    page: Some(page),
                };
                async move {
                    let r = client.list_dead_letters(request).await?.into_inner();
                    Ok((r.dead_letters, r.next_page_token))
                }
            })
            .await?;
            let mut table = Table::new([
                "ID",
                "TOPIC",
                "FROM",
                "GROUP",
                "RETRIES",
                "DEAD_LETTERED",
                "STATUS",
                "ERROR",
            ]);
            for d in &letters {
                table.row(vec![
                    d.id.clone(),
                    or_dash(&d.original_topic),
                    origin(d),
                    or_dash(&d.consumer_group),
                    d.retry_count.to_string(),
                    ts_text(d.dead_lettered_at.as_ref()),
                    status(d),
                    d.error.clone(),
                ]);
            }
            output::write_list(
                out,
                ctx.format,
                letters.iter().map(|d| letter_json(d, false)).collect(),
                &table,
            )
        }
        DlqCmd::Count { topic, group } => {
            let c = ctx
                .connect()
                .await?
                .dead_letters()
                .count_dead_letters(pb::CountDeadLettersRequest {
                    original_topic: topic.unwrap_or_default(),
                    consumer_group: group.unwrap_or_default(),
                })
                .await?
                .into_inner();
            let json = json!({
                "dlq_topic": c.dlq_topic,
                "total": c.total,
                "pending": c.pending,
                "replayed": c.replayed,
                "oldest_pending_age_seconds": c.oldest_pending_age_seconds,
                "oldest_pending_at": ts_json(c.oldest_pending_at.as_ref()),
            });
            let pairs = [
                ("dlq_topic", c.dlq_topic.clone()),
                ("total", c.total.to_string()),
                ("pending", c.pending.to_string()),
                ("replayed", c.replayed.to_string()),
                (
                    "oldest_pending_age",
                    format!("{:.0}s", c.oldest_pending_age_seconds),
                ),
                (
                    "oldest_pending_at",
                    or_dash(&ts_text(c.oldest_pending_at.as_ref())),
                ),
            ];
            output::write_object(out, ctx.format, json, &pairs)
        }
        DlqCmd::Show { id } => {
            let d = ctx
                .connect()
                .await?
                .dead_letters()
                .get_dead_letter(pb::GetDeadLetterRequest { id })
                .await?
                .into_inner();
            let mut pairs: Vec<(&str, String)> = vec![
                ("id", d.id.clone()),
                ("status", status(&d)),
                ("original_topic", or_dash(&d.original_topic)),
                ("original_partition", opt(d.original_partition)),
                ("original_offset", opt(d.original_offset)),
                ("consumer_group", or_dash(&d.consumer_group)),
                ("error", d.error.clone()),
                ("retry_count", d.retry_count.to_string()),
                ("first_failed_at", ts_text(d.first_failed_at.as_ref())),
                ("dead_lettered_at", ts_text(d.dead_lettered_at.as_ref())),
                ("key", d.key.as_deref().map_or("-".to_owned(), shown)),
            ];
            for h in &d.headers {
                pairs.push((
                    "header",
                    format!(
                        "{}: {}",
                        h.key,
                        h.value.as_deref().map_or("(null)".to_owned(), shown)
                    ),
                ));
            }
            pairs.push(("payload_size", d.payload_size.to_string()));
            pairs.push((
                "payload_base64",
                d.payload
                    .as_deref()
                    .map_or("-".to_owned(), |p| STANDARD.encode(p)),
            ));
            if let Some(text) = d
                .payload
                .as_deref()
                .and_then(|p| std::str::from_utf8(p).ok())
            {
                pairs.push(("payload_text", text.to_owned()));
            }
            if !d.original_stream.is_empty() {
                pairs.push(("original_stream", d.original_stream.clone()));
                pairs.push(("entry_id", d.entry_id.clone()));
                let mut fields: Vec<_> = d.fields.iter().collect();
                fields.sort();
                for (k, v) in fields {
                    pairs.push(("field", format!("{k}={v}")));
                }
            }
            if let Some(r) = &d.replay {
                pairs.push(("replayed_by", r.actor.clone()));
                pairs.push(("replayed_at", or_dash(&ts_text(r.replayed_at.as_ref()))));
                pairs.push(("replayed_to", replay_target(r)));
            }
            if !d.not_replayable.is_empty() {
                pairs.push(("not_replayable", d.not_replayable.clone()));
            }
            output::write_object(out, ctx.format, letter_json(&d, true), &pairs)
        }
        DlqCmd::Replay {
            id,
            all,
            topic,
            group,
        } => {
            let mut client = ctx.connect().await?.dead_letters();
            let mut outcomes: Vec<pb::ReplayOutcome> = Vec::new();
            if all {
                for _ in 0..MAX_ROUNDS {
                    let r = client
                        .replay_dead_letters(pb::ReplayDeadLettersRequest {
                            all_pending: true,
                            original_topic: topic.clone().unwrap_or_default(),
                            consumer_group: group.clone().unwrap_or_default(),
                            ..Default::default()
                        })
                        .await?
                        .into_inner();
                    outcomes.extend(r.outcomes);
                    // Another round only while rounds make progress.
                    if !r.more || r.replayed == 0 {
                        break;
                    }
                }
            } else {
                outcomes = client
                    .replay_dead_letters(pb::ReplayDeadLettersRequest {
                        ids: id,
                        ..Default::default()
                    })
                    .await?
                    .into_inner()
                    .outcomes;
            }
            write_outcomes(ctx.format, &outcomes, out)?;
            let replayed = outcomes.iter().filter(|o| is(o, Status::Replayed)).count();
            let failed = outcomes.iter().filter(|o| is(o, Status::Failed)).count();
            if failed > 0 || (!all && replayed < outcomes.len()) {
                bail!(
                    "{} of {} dead letters were not replayed",
                    outcomes.len() - replayed,
                    outcomes.len()
                );
            }
            Ok(())
        }
    }
}

use pb::replay_outcome::Status;

fn is(o: &pb::ReplayOutcome, s: Status) -> bool {
    o.status == s as i32
}

fn status_name(o: &pb::ReplayOutcome) -> &'static str {
    match Status::try_from(o.status).unwrap_or(Status::Unspecified) {
        Status::Replayed => "replayed",
        Status::AlreadyReplayed => "already_replayed",
        Status::InProgress => "in_progress",
        Status::NotFound => "not_found",
        Status::NotReplayable => "not_replayable",
        Status::Failed => "failed",
        Status::Unspecified => "unknown",
    }
}

fn write_outcomes(
    format: OutputFormat,
    outcomes: &[pb::ReplayOutcome],
    out: &mut dyn Write,
) -> Result<()> {
    let mut table = Table::new(["ID", "OUTCOME", "DETAIL"]);
    for o in outcomes {
        table.row(vec![
            o.id.clone(),
            status_name(o).to_owned(),
            o.message.clone(),
        ]);
    }
    let json = outcomes
        .iter()
        .map(|o| {
            json!({
                "id": o.id,
                "outcome": status_name(o),
                "message": o.message,
                "replay": o.replay.as_ref().map(replay_json),
            })
        })
        .collect();
    output::write_list(out, format, json, &table)
}

/// Where the message was read: `partition:offset` of the original topic, or the
/// outbox entry.
fn origin(d: &pb::DeadLetter) -> String {
    match (d.original_partition, d.original_offset) {
        (Some(p), Some(o)) => format!("{p}:{o}"),
        _ if !d.entry_id.is_empty() => format!("{} {}", d.original_stream, d.entry_id),
        _ => "-".to_owned(),
    }
}

fn status(d: &pb::DeadLetter) -> String {
    if !d.pending {
        "replayed".to_owned()
    } else if d.replay.is_some() {
        "replay_in_progress".to_owned()
    } else if !d.not_replayable.is_empty() {
        "not_replayable".to_owned()
    } else {
        "pending".to_owned()
    }
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or("-".to_owned(), |v| v.to_string())
}

/// Bytes as text when they are UTF-8, else as base64 (marked).
fn shown(b: &[u8]) -> String {
    match std::str::from_utf8(b) {
        Ok(t) => t.to_owned(),
        Err(_) => format!("base64:{}", STANDARD.encode(b)),
    }
}

fn replay_target(r: &pb::DeadLetterReplay) -> String {
    if r.target_partition < 0 {
        return format!("{} (not delivered yet)", r.target_topic);
    }
    format!(
        "{} at {}:{}",
        r.target_topic, r.target_partition, r.target_offset
    )
}

fn replay_json(r: &pb::DeadLetterReplay) -> Value {
    json!({
        "actor": r.actor,
        "claimed_at": ts_json(r.claimed_at.as_ref()),
        "replayed_at": ts_json(r.replayed_at.as_ref()),
        "target_topic": r.target_topic,
        "target_partition": (r.target_partition >= 0).then_some(r.target_partition),
        "target_offset": (r.target_offset >= 0).then_some(r.target_offset),
    })
}

fn letter_json(d: &pb::DeadLetter, with_bytes: bool) -> Value {
    let mut v = json!({
        "id": d.id,
        "dlq_partition": d.dlq_partition,
        "dlq_offset": d.dlq_offset,
        "dead_lettered_at": ts_json(d.dead_lettered_at.as_ref()),
        "original_topic": d.original_topic,
        "original_partition": d.original_partition,
        "original_offset": d.original_offset,
        "consumer_group": d.consumer_group,
        "error": d.error,
        "retry_count": d.retry_count,
        "first_failed_at": ts_json(d.first_failed_at.as_ref()),
        "payload_size": d.payload_size,
        "pending": d.pending,
        "status": status(d),
        "replay": d.replay.as_ref().map(replay_json),
        "not_replayable": (!d.not_replayable.is_empty()).then_some(&d.not_replayable),
    });
    if with_bytes {
        if let Value::Object(m) = &mut v {
            m.insert(
                "key_base64".into(),
                json!(d.key.as_deref().map(|k| STANDARD.encode(k))),
            );
            m.insert(
                "headers".into(),
                Value::Array(
                    d.headers
                        .iter()
                        .map(|h| {
                            json!({
                                "key": h.key,
                                "value_base64": h.value.as_deref().map(|b| STANDARD.encode(b)),
                            })
                        })
                        .collect(),
                ),
            );
            m.insert(
                "payload_base64".into(),
                json!(d.payload.as_deref().map(|p| STANDARD.encode(p))),
            );
            m.insert(
                "payload_text".into(),
                json!(d
                    .payload
                    .as_deref()
                    .and_then(|p| std::str::from_utf8(p).ok())),
            );
            if !d.original_stream.is_empty() {
                m.insert("original_stream".into(), json!(d.original_stream));
                m.insert("entry_id".into(), json!(d.entry_id));
                m.insert("fields".into(), json!(d.fields));
            }
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_show_as_text_or_base64() {
        assert_eq!(shown(b"root"), "root");
        assert_eq!(shown(&[0xff, 0x00]), "base64:/wA=");
    }

    #[test]
    fn status_and_origin() {
        let mut d = pb::DeadLetter {
            pending: true,
            original_partition: Some(2),
            original_offset: Some(40),
            ..Default::default()
        };
        assert_eq!(status(&d), "pending");
        assert_eq!(origin(&d), "2:40");
        d.not_replayable = "not a dead-letter envelope".into();
        assert_eq!(status(&d), "not_replayable");
        d.pending = false;
        assert_eq!(status(&d), "replayed");
        let r = pb::DeadLetterReplay {
            target_topic: "t".into(),
            target_partition: 1,
            target_offset: 5,
            ..Default::default()
        };
        assert_eq!(replay_target(&r), "t at 1:5");
        assert_eq!(replay_json(&r)["target_offset"], 5);
    }
}
