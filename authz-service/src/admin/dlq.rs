//! DeadLetterService: list, count, show and replay the dead letters of `caracal.dlq`.
//!
//! Reading and replaying are [`caracal_service_kit::dlq_admin`]'s; this file checks
//! the requests, applies filters and pages, records the replaying admin as the
//! actor, and asks the DLQ monitor ([`crate::dlq_monitor`]) to refresh its gauges
//! after every replay.

use std::{collections::BTreeSet, sync::Arc};

use caracal_proto::v1::{self as pb, dead_letter_service_server::DeadLetterService};
use caracal_service_kit::dlq_admin::{
    DeadLetterId, DlqAdmin, DlqError, Filter, ReplayOutcome, ReplayRecord, StoredDeadLetter,
    Summary, MAX_REPLAY,
};
use tokio::sync::Notify;
use tonic::{Request, Response, Status};

use super::respond;
use crate::{
    auth::actor,
    convert::{opt_timestamp, page_limit, timestamp},
    error::{ServiceError, ServiceResult},
};

impl From<DlqError> for ServiceError {
    fn from(e: DlqError) -> Self {
        match e {
            DlqError::InvalidId(_) => Self::InvalidArgument(e.to_string()),
            DlqError::NoTopic(_) => Self::FailedPrecondition(e.to_string()),
            DlqError::Kafka(_) | DlqError::ReadTimeout { .. } | DlqError::Database(_) => {
                Self::Unavailable(e.to_string())
            }
        }
    }
}

pub struct DeadLetterAdmin {
    dlq: Arc<DlqAdmin>,
    /// Wakes the DLQ monitor (a replay changes what is pending).
    rescan: Arc<Notify>,
}

impl DeadLetterAdmin {
    pub fn new(dlq: Arc<DlqAdmin>, rescan: Arc<Notify>) -> Self {
        Self { dlq, rescan }
    }
}

fn replay_pb(r: &ReplayRecord) -> pb::DeadLetterReplay {
    pb::DeadLetterReplay {
        actor: r.actor.clone(),
        claimed_at: Some(timestamp(r.claimed_at)),
        replayed_at: opt_timestamp(r.replayed_at),
        target_topic: r.target_topic.clone(),
        target_partition: r.target_partition.unwrap_or(-1),
        target_offset: r.target_offset.unwrap_or(-1),
    }
}

fn bytes(b64: Option<&str>) -> Option<Vec<u8>> {
    b64.and_then(|b| caracal_service_kit::dlq::DeadLetter::decode(b).ok())
}

/// The answer's shape of a dead letter; key, headers and payload only `with_bytes`.
fn dead_letter_pb(d: &StoredDeadLetter, with_bytes: bool) -> pb::DeadLetter {
    let mut out = pb::DeadLetter {
        id: d.id.to_string(),
        dlq_partition: d.id.partition,
        dlq_offset: d.id.offset,
        dead_lettered_at: opt_timestamp(d.dead_lettered_at),
        pending: d.is_pending(),
        payload_size: d.payload_size,
        replay: d.replay.as_ref().map(replay_pb),
        not_replayable: d.not_replayable().unwrap_or_default(),
        ..Default::default()
    };
    match &d.envelope {
        Err(e) => out.error = e.clone(),
        Ok(l) => {
            out.original_topic = l.original_topic.clone().unwrap_or_default();
            out.original_partition = l.original_partition;
            out.original_offset = l.original_offset;
            out.error = l.error.clone();
            out.retry_count = l.retry_count;
            out.consumer_group = l.consumer.clone();
            out.first_failed_at = d
                .envelope
                .as_ref()
                .ok()
                .and_then(|l| l.first_failed_at.as_deref())
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .map(|t| timestamp(t.with_timezone(&chrono::Utc)));
            out.original_stream = l.original_stream.clone().unwrap_or_default();
            out.entry_id = l.entry_id.clone().unwrap_or_default();
            if with_bytes {
                out.key = bytes(l.key_base64.as_deref());
                out.payload = bytes(l.payload_base64.as_deref());
                out.headers = l
                    .headers
                    .iter()
                    .map(|h| pb::DeadLetterHeader {
                        key: h.key.clone(),
                        value: bytes(h.value_base64.as_deref()),
                    })
                    .collect();
                out.fields = l
                    .fields
                    .clone()
                    .map(|f| f.into_iter().collect())
                    .unwrap_or_default();
            }
        }
    }
    out
}

fn outcome_pb(id: String, outcome: ReplayOutcome) -> pb::ReplayOutcome {
    use pb::replay_outcome::Status as S;
    let (status, message, replay) = match outcome {
        ReplayOutcome::Replayed(r) => (
            S::Replayed,
            format!(
                "replayed to {} at {}:{}",
                r.target_topic,
                r.target_partition.unwrap_or(-1),
                r.target_offset.unwrap_or(-1)
            ),
            Some(r),
        ),
        ReplayOutcome::AlreadyReplayed(r) => (
            S::AlreadyReplayed,
            format!(
                "already replayed at {} by {}",
                r.replayed_at.map(|t| t.to_rfc3339()).unwrap_or_default(),
                r.actor
            ),
            Some(r),
        ),
        ReplayOutcome::InProgress(r) => (
            S::InProgress,
            format!(
                "a replay claimed at {} by {} has not finished; it can be taken over once the claim times out",
                r.claimed_at.to_rfc3339(),
                r.actor
            ),
            Some(r),
        ),
        ReplayOutcome::NotFound => (
            S::NotFound,
            "no such message in the dead-letter topic".to_owned(),
            None,
        ),
        ReplayOutcome::NotReplayable(why) => (S::NotReplayable, why, None),
        ReplayOutcome::Failed(why) => (S::Failed, why, None),
    };
    pb::ReplayOutcome {
        id,
        status: status as i32,
        message,
        replay: replay.as_ref().map(replay_pb),
    }
}

fn filter(original_topic: &str, consumer_group: &str, include_replayed: bool) -> Filter {
    Filter {
        original_topic: original_topic.trim().to_owned(),
        consumer: consumer_group.trim().to_owned(),
        include_replayed,
    }
}

#[tonic::async_trait]
impl DeadLetterService for DeadLetterAdmin {
    async fn list_dead_letters(
        &self,
        request: Request<pb::ListDeadLettersRequest>,
    ) -> Result<Response<pb::ListDeadLettersResponse>, Status> {
        let result: ServiceResult<_> = async {
            let req = request.into_inner();
            let limit = usize::try_from(page_limit(req.page.as_ref())).unwrap_or(100);
            let after: Option<DeadLetterId> =
                match req.page.as_ref().map(|p| p.page_token.trim()) {
                    None | Some("") => None,
                    Some(token) => Some(token.parse().map_err(|_| {
                        ServiceError::invalid("page_token", "not a dead-letter id")
                    })?),
                };
            let f = filter(
                &req.original_topic,
                &req.consumer_group,
                req.include_replayed,
            );
            let letters = self.dlq.read(false).await?;
            let mut page: Vec<&StoredDeadLetter> = letters
                .iter()
                .filter(|d| after.is_none_or(|a| d.id > a))
                .filter(|d| f.matches(d))
                .take(limit + 1)
                .collect();
            let more = page.len() > limit;
            page.truncate(limit);
            let next_page_token = match (more, page.last()) {
                (true, Some(last)) => last.id.to_string(),
                _ => String::new(),
            };
            Ok(pb::ListDeadLettersResponse {
                dead_letters: page.iter().map(|d| dead_letter_pb(d, false)).collect(),
                next_page_token,
            })
        }
        .await;
        respond("ListDeadLetters", result)
    }

    async fn count_dead_letters(
        &self,
        request: Request<pb::CountDeadLettersRequest>,
    ) -> Result<Response<pb::CountDeadLettersResponse>, Status> {
        let result: ServiceResult<_> = async {
            let req = request.into_inner();
            let f = filter(&req.original_topic, &req.consumer_group, true);
            let letters = self.dlq.read(false).await?;
            let s = Summary::of(letters.iter().filter(|d| f.matches(d)));
            Ok(pb::CountDeadLettersResponse {
                total: s.total,
                pending: s.pending,
                replayed: s.total - s.pending,
                oldest_pending_age_seconds: s.oldest_pending_age(chrono::Utc::now()),
                oldest_pending_at: opt_timestamp(s.oldest_pending),
                dlq_topic: self.dlq.topic().to_owned(),
            })
        }
        .await;
        respond("CountDeadLetters", result)
    }

    async fn get_dead_letter(
        &self,
        request: Request<pb::GetDeadLetterRequest>,
    ) -> Result<Response<pb::DeadLetter>, Status> {
        let result: ServiceResult<_> = async {
            let id: DeadLetterId = request.get_ref().id.parse()?;
            match self.dlq.get(id).await? {
                Some(d) => Ok(dead_letter_pb(&d, true)),
                None => Err(ServiceError::NotFound(format!(
                    "dead letter {id} is not in {}",
                    self.dlq.topic()
                ))),
            }
        }
        .await;
        respond("GetDeadLetter", result)
    }

    async fn replay_dead_letters(
        &self,
        request: Request<pb::ReplayDeadLettersRequest>,
    ) -> Result<Response<pb::ReplayDeadLettersResponse>, Status> {
        let replayed_by = actor(&request);
        let result: ServiceResult<_> = async {
            let req = request.into_inner();
            // Exactly one of the two: ids, or all_pending.
            let has_ids = !req.ids.is_empty();
            if req.all_pending == has_ids {
                return Err(ServiceError::InvalidArgument(
                    "give either ids or all_pending".to_owned(),
                ));
            }
            if req.ids.len() > MAX_REPLAY {
                return Err(ServiceError::InvalidArgument(format!(
                    "at most {MAX_REPLAY} ids per call"
                )));
            }
            // Every id is checked before anything is replayed.
            let ids: BTreeSet<DeadLetterId> = req
                .ids
                .iter()
                .map(|s| s.parse())
                .collect::<Result<_, _>>()?;
            let letters = self.dlq.read(true).await?;
            let mut more = false;
            // (id, the dead letter when it is in the topic)
            let chosen: Vec<(DeadLetterId, Option<&StoredDeadLetter>)> = if req.all_pending {
                let f = filter(&req.original_topic, &req.consumer_group, false);
                let pending: Vec<&StoredDeadLetter> =
                    letters.iter().filter(|d| f.matches(d)).collect();
                more = pending.len() > MAX_REPLAY;
                pending
                    .into_iter()
                    .take(MAX_REPLAY)
                    .map(|d| (d.id, Some(d)))
                    .collect()
            } else {
                ids.iter()
                    .map(|id| (*id, letters.iter().find(|d| d.id == *id)))
                    .collect()
            };
            let found: Vec<StoredDeadLetter> =
                chosen.iter().filter_map(|(_, d)| d.cloned()).collect();
            let mut done = self.dlq.replay(&found, &replayed_by).await.into_iter();
            let outcomes: Vec<pb::ReplayOutcome> = chosen
                .iter()
                .map(|(id, d)| {
                    let outcome = match d {
                        Some(_) => done
                            .next()
                            .unwrap_or(ReplayOutcome::Failed("no outcome".to_owned())),
                        None => ReplayOutcome::NotFound,
                    };
                    outcome_pb(id.to_string(), outcome)
                })
                .collect();
            self.rescan.notify_one();
            let replayed = outcomes
                .iter()
                .filter(|o| o.status == pb::replay_outcome::Status::Replayed as i32)
                .count();
            Ok(pb::ReplayDeadLettersResponse {
                replayed: u32::try_from(replayed).unwrap_or(u32::MAX),
                not_replayed: u32::try_from(outcomes.len() - replayed).unwrap_or(u32::MAX),
                outcomes,
                more,
            })
        }
        .await;
        respond("ReplayDeadLetters", result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use caracal_service_kit::dlq::DeadLetter;

    #[test]
    fn a_dead_letter_is_shown_with_or_without_its_bytes() {
        let letter = DeadLetter::from_kafka(
            "caracal.metering.events",
            2,
            40,
            Some(b"root"),
            &[("schema_version".to_owned(), Some(b"1".to_vec()))],
            Some(b"hello"),
            "refused".to_owned(),
            3,
            "caracal-ledger-writer",
            chrono::Utc::now(),
        );
        let mut d = StoredDeadLetter {
            id: DeadLetterId {
                partition: 1,
                offset: 7,
            },
            dead_lettered_at: None,
            envelope: Ok(letter),
            payload_size: 5,
            replay: None,
        };
        let full = dead_letter_pb(&d, true);
        assert_eq!(full.id, "1:7");
        assert_eq!(full.original_partition, Some(2));
        assert_eq!(full.original_offset, Some(40));
        assert_eq!(full.payload.as_deref(), Some(&b"hello"[..]));
        assert_eq!(full.payload_size, 5);
        assert_eq!(full.key.as_deref(), Some(&b"root"[..]));
        assert_eq!(full.headers[0].value.as_deref(), Some(&b"1"[..]));
        assert_eq!(full.retry_count, 3);
        assert!(full.pending);
        assert!(full.not_replayable.is_empty());
        if let Ok(l) = d.envelope.as_mut() {
            l.payload_base64 = None;
        }
        let short = dead_letter_pb(&d, false);
        assert!(short.payload.is_none() && short.key.is_none() && short.headers.is_empty());
        assert_eq!(short.payload_size, 5);
    }

    #[test]
    fn outcomes_say_what_happened() {
        let r = ReplayRecord {
            actor: "admin-token".into(),
            claimed_at: chrono::Utc::now(),
            replayed_at: Some(chrono::Utc::now()),
            target_topic: "t".into(),
            target_partition: Some(1),
            target_offset: Some(9),
        };
        let o = outcome_pb("0:1".into(), ReplayOutcome::Replayed(r.clone()));
        assert_eq!(o.status, pb::replay_outcome::Status::Replayed as i32);
        assert_eq!(o.message, "replayed to t at 1:9");
        let o = outcome_pb("0:1".into(), ReplayOutcome::AlreadyReplayed(r));
        assert!(o.message.contains("by admin-token"), "{}", o.message);
        assert_eq!(o.replay.unwrap().target_offset, 9);
    }
}
