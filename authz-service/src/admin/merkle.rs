//! MerkleService: the tamper-evident ledger's checkpoints, proofs, verification
//! and leaf export, read from the log the sequencer (in the ledger-writer) keeps
//! in PostgreSQL ([`caracal_merkle_log`]). Read only: the `caracal_authz` role's
//! SELECT grants on the merkle tables are enough.
//!
//! Every call reads one snapshot (a REPEATABLE READ, READ ONLY transaction): the
//! sequencer commits leaves and checkpoints concurrently, and a verification that
//! read the tree size before a checkpoint published after it would report that
//! checkpoint as beyond the tree.
//!
//! Errors ([`status`]): `NotFound` -> NOT_FOUND, `Invalid` -> INVALID_ARGUMENT,
//! `Corrupt` -> DATA_LOSS (the stored log or a row no longer matches what was
//! signed), the database -> UNAVAILABLE; each with the log's sentence.

use caracal_merkle_log::{
    checkpoints::{self, CheckpointRecord},
    keys, proofs, sequencer,
    verify::{self, Failure, Report, Scope},
    LogError,
};
use caracal_proto::v1::{self as pb, merkle_service_server::MerkleService};
use chrono::{DateTime, Duration, Utc};
use diesel_async::AsyncPgConnection;
use futures::future::BoxFuture;
use tonic::{Request, Response, Status};

use super::AdminState;
use crate::{
    convert::{from_timestamp, timestamp},
    db,
};

/// Checkpoints per ListCheckpoints answer unless asked otherwise.
pub const DEFAULT_CHECKPOINTS: u32 = 100;
/// Most checkpoints per ListCheckpoints answer.
pub const MAX_CHECKPOINTS: u32 = 1000;
/// Most leaves per ExportLeaves answer (a leaf is a few hundred bytes: a page stays
/// well under gRPC's 4 MiB message limit).
pub const EXPORT_PAGE: u64 = 1000;
/// Longest time range of one VerifyRange call.
pub const MAX_VERIFY_DAYS: i64 = 366;
/// Longest event id (the ledger's own limit).
const MAX_EVENT_ID: usize = 200;

pub struct MerkleAdmin {
    state: AdminState,
}

impl MerkleAdmin {
    pub fn new(state: AdminState) -> Self {
        Self { state }
    }
}

// ------------------------------------------------------------------ errors

/// The gRPC status of a log error (module doc).
pub fn status(err: LogError) -> Status {
    match err {
        LogError::NotFound(m) => Status::not_found(m),
        LogError::Invalid(m) => Status::invalid_argument(m),
        LogError::Corrupt(m) => {
            tracing::error!(error = %m, "the Merkle log does not match what was signed");
            Status::data_loss(format!("the stored tree is inconsistent: {m}"))
        }
        LogError::Db(e) => {
            metrics::counter!(crate::metrics::DB_ERRORS).increment(1);
            Status::unavailable(format!("database: {e}"))
        }
        LogError::Unavailable(m) => Status::unavailable(format!("database unavailable: {m}")),
        LogError::Key(m) => Status::failed_precondition(format!("key: {m}")),
    }
}

/// Records the call under `caracal_admin_requests_total{method, code}` (as
/// [`super::respond`] does) and wraps the answer.
fn answer<T>(method: &'static str, result: Result<T, Status>) -> Result<Response<T>, Status> {
    let code = match &result {
        Ok(_) => "OK".to_owned(),
        Err(status) => format!("{:?}", status.code()),
    };
    metrics::counter!(crate::metrics::ADMIN_REQUESTS, "method" => method, "code" => code)
        .increment(1);
    result.map(Response::new)
}

/// Runs `read` on a pooled connection inside one REPEATABLE READ, READ ONLY
/// transaction (a consistent view of the log). A call cut short by its deadline
/// leaves the transaction open, which marks the connection broken: the pool drops
/// it instead of handing it out again.
async fn snapshot<T, F>(state: &AdminState, read: F) -> Result<T, Status>
where
    T: Send,
    F: for<'r> FnOnce(&'r mut AsyncPgConnection) -> BoxFuture<'r, Result<T, LogError>> + Send,
{
    let mut conn = db::conn(&state.pool).await.map_err(Status::from)?;
    conn.build_transaction()
        .read_only()
        .repeatable_read()
        .run(async move |c: &mut AsyncPgConnection| read(c).await)
        .await
        .map_err(status)
}

// ------------------------------------------------------------------ input

fn size_arg(n: u64) -> Option<u64> {
    (n > 0).then_some(n)
}

/// The page size of ListCheckpoints: 0 means the default.
pub fn checkpoint_limit(asked: u32) -> Result<u32, Status> {
    match asked {
        0 => Ok(DEFAULT_CHECKPOINTS),
        n if n <= MAX_CHECKPOINTS => Ok(n),
        n => Err(Status::invalid_argument(format!(
            "limit {n} is out of range (1..={MAX_CHECKPOINTS}; 0 = {DEFAULT_CHECKPOINTS})"
        ))),
    }
}

fn event_id(text: &str) -> Result<String, Status> {
    let id = text.trim();
    if id.is_empty() {
        return Err(Status::invalid_argument("event_id is required"));
    }
    if id.len() > MAX_EVENT_ID {
        return Err(Status::invalid_argument(format!(
            "event_id is longer than {MAX_EVENT_ID} bytes: no ledger event has such an id"
        )));
    }
    Ok(id.to_owned())
}

/// What a VerifyRange request asks for (see merkle.proto).
pub fn verify_scope(req: &pb::VerifyRangeRequest) -> Result<Scope, Status> {
    let time = req.start_time.is_some() || req.end_time.is_some();
    let leaves = req.from_leaf.is_some() || req.to_leaf.is_some();
    let invalid = |e: crate::error::ServiceError| Status::invalid_argument(e.to_string());
    match (time, leaves) {
        (true, true) => Err(Status::invalid_argument(
            "give a time range (start_time, end_time) or a leaf range (from_leaf, to_leaf), \
             not both",
        )),
        (false, false) => Err(Status::invalid_argument(
            "give a time range (start_time and end_time) or a leaf range (from_leaf, to_leaf)",
        )),
        (true, false) => {
            let (Some(start), Some(end)) = (&req.start_time, &req.end_time) else {
                return Err(Status::invalid_argument(
                    "a time range needs both start_time and end_time",
                ));
            };
            let start = from_timestamp("start_time", start).map_err(invalid)?;
            let end = from_timestamp("end_time", end).map_err(invalid)?;
            time_scope(start, end)
        }
        (false, true) => {
            let from = req.from_leaf.unwrap_or(0);
            match req.to_leaf {
                Some(to) if to < from => Err(Status::invalid_argument(format!(
                    "to_leaf {to} is before from_leaf {from}"
                ))),
                // Scope::Leaves ends before `to`: to_leaf is included.
                Some(to) => Ok(Scope::Leaves {
                    from,
                    to: to.saturating_add(1),
                }),
                None => Ok(Scope::Leaves { from, to: u64::MAX }),
            }
        }
    }
}

fn time_scope(start: DateTime<Utc>, end: DateTime<Utc>) -> Result<Scope, Status> {
    if end <= start {
        return Err(Status::invalid_argument(format!(
            "the range ends ({}) at or before it starts ({})",
            end.to_rfc3339(),
            start.to_rfc3339()
        )));
    }
    if end - start > Duration::days(MAX_VERIFY_DAYS) {
        return Err(Status::invalid_argument(format!(
            "the range {} .. {} is longer than {MAX_VERIFY_DAYS} days: verify it in parts",
            start.to_rfc3339(),
            end.to_rfc3339()
        )));
    }
    Ok(Scope::Time { start, end })
}

// ------------------------------------------------------------------ output

fn checkpoint(c: CheckpointRecord) -> pb::MerkleCheckpoint {
    pb::MerkleCheckpoint {
        tree_size: u64::try_from(c.tree_size).unwrap_or(0),
        root: c.root,
        key_id: c.key_id,
        note: c.note,
        published_at: Some(timestamp(c.published_at)),
    }
}

fn failure(f: Failure) -> pb::MerkleVerificationFailure {
    pb::MerkleVerificationFailure {
        kind: f.kind.as_str().to_owned(),
        event_id: f.event_id.unwrap_or_default(),
        leaf_index: f.leaf_index,
        checkpoint: f.checkpoint,
        detail: f.detail,
    }
}

fn report(r: Report) -> pb::VerifyRangeResponse {
    pb::VerifyRangeResponse {
        events_checked: r.events_checked,
        pending: r.pending,
        unsigned: r.unsigned,
        checkpoints_checked: r.checkpoints_checked,
        tree_size: r.tree_size,
        newest_checkpoint: r.newest_checkpoint,
        failures_total: r.failures_total,
        failures: r.failures.into_iter().map(failure).collect(),
        rewritten: r.rewritten,
    }
}

// ------------------------------------------------------------------ calls

async fn get_checkpoint(
    state: &AdminState,
    req: pb::GetCheckpointRequest,
) -> Result<pb::GetCheckpointResponse, Status> {
    let size = size_arg(req.tree_size);
    snapshot(state, move |conn| {
        Box::pin(async move {
            let found = checkpoints::get(conn, size).await?;
            let (log_size, _) = sequencer::state(conn).await?;
            Ok(pb::GetCheckpointResponse {
                checkpoint: Some(checkpoint(found)),
                log_size,
            })
        })
    })
    .await
}

async fn list_checkpoints(
    state: &AdminState,
    req: pb::ListCheckpointsRequest,
) -> Result<pb::ListCheckpointsResponse, Status> {
    let limit = u64::from(checkpoint_limit(req.limit)?);
    let to = size_arg(req.to_size).unwrap_or(u64::MAX >> 1);
    if to < req.from_size {
        return Err(Status::invalid_argument(format!(
            "to_size {to} is below from_size {}",
            req.from_size
        )));
    }
    let newest = req.from_size == 0 && req.to_size == 0;
    let from = req.from_size;
    snapshot(state, move |conn| {
        Box::pin(async move {
            let mut found = if newest {
                checkpoints::newest(conn, limit + 1).await?
            } else {
                checkpoints::list(conn, from, to, limit + 1).await?
            };
            let more = found.len() as u64 > limit;
            found.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
            if newest {
                // newest() answers newest first.
                found.reverse();
            }
            Ok(pb::ListCheckpointsResponse {
                checkpoints: found.into_iter().map(checkpoint).collect(),
                more,
            })
        })
    })
    .await
}

async fn prove_inclusion(
    state: &AdminState,
    req: pb::ProveInclusionRequest,
) -> Result<pb::ProveInclusionResponse, Status> {
    let id = event_id(&req.event_id)?;
    let size = size_arg(req.checkpoint_size);
    snapshot(state, move |conn| {
        Box::pin(async move {
            let verifiers = keys::verifiers(conn).await?;
            let file = proofs::prove_event(conn, &id, size, &verifiers).await?;
            let proof_json = file
                .to_json()
                .map_err(|e| LogError::Invalid(format!("cannot write the proof file: {e}")))?;
            Ok(pb::ProveInclusionResponse {
                proof_json,
                leaf_index: file.leaf_index,
                tree_size: file.tree_size,
                key_id: file.key_id,
            })
        })
    })
    .await
}

async fn prove_consistency(
    state: &AdminState,
    req: pb::ProveConsistencyRequest,
) -> Result<pb::ProveConsistencyResponse, Status> {
    if req.from_size == 0 {
        return Err(Status::invalid_argument(
            "from_size must be the tree size of a published checkpoint (> 0)",
        ));
    }
    let (from, to) = (req.from_size, size_arg(req.to_size));
    snapshot(state, move |conn| {
        Box::pin(async move {
            let to = match to {
                Some(to) => to,
                None => u64::try_from(checkpoints::get(conn, None).await?.tree_size).unwrap_or(0),
            };
            let (older, newer, proof) = proofs::prove_consistency(conn, from, to).await?;
            Ok(pb::ProveConsistencyResponse {
                older: Some(checkpoint(older)),
                newer: Some(checkpoint(newer)),
                proof: proof.iter().map(|h| h.to_vec()).collect(),
            })
        })
    })
    .await
}

async fn verify_range(
    state: &AdminState,
    req: pb::VerifyRangeRequest,
) -> Result<pb::VerifyRangeResponse, Status> {
    let scope = verify_scope(&req)?;
    let found = snapshot(state, move |conn| {
        Box::pin(async move {
            let verifiers = keys::verifiers(conn).await?;
            verify::verify(conn, scope, &verifiers).await
        })
    })
    .await?;
    if !found.failures.is_empty() {
        tracing::error!(
            failures = found.failures_total,
            ?scope,
            "merkle verify-range found the ledger or its log changed"
        );
    }
    Ok(report(found))
}

async fn list_public_keys(state: &AdminState) -> Result<pb::ListPublicKeysResponse, Status> {
    snapshot(state, move |conn| {
        Box::pin(async move {
            Ok(pb::ListPublicKeysResponse {
                keys: keys::public_keys(conn)
                    .await?
                    .into_iter()
                    .map(|k| pb::MerklePublicKey {
                        key_id: k.key_id,
                        key_name: k.key_name,
                        public_key_pem: k.public_key_pem,
                        registered_at: Some(timestamp(k.registered_at)),
                    })
                    .collect(),
            })
        })
    })
    .await
}

async fn export_leaves(
    state: &AdminState,
    req: pb::ExportLeavesRequest,
) -> Result<pb::ExportLeavesResponse, Status> {
    let (from, to) = (req.from_index, req.to_index);
    if to < from {
        return Err(Status::invalid_argument(format!(
            "to_index {to} is before from_index {from}"
        )));
    }
    snapshot(state, move |conn| {
        Box::pin(async move {
            let (log_size, _) = sequencer::state(conn).await?;
            if from >= log_size {
                return Ok(pb::ExportLeavesResponse {
                    leaves: Vec::new(),
                    next_index: None,
                    log_size,
                });
            }
            let last = to.min(log_size - 1);
            let end = last.min(from.saturating_add(EXPORT_PAGE - 1));
            let leaves = proofs::export_leaves(conn, from, end).await?;
            Ok(pb::ExportLeavesResponse {
                leaves: leaves
                    .into_iter()
                    .map(|l| pb::ExportedLeaf {
                        leaf_index: l.leaf_index,
                        event_id: l.event_id,
                        row_missing: l.leaf.is_none(),
                        leaf: l.leaf.unwrap_or_default(),
                    })
                    .collect(),
                next_index: (end < last).then_some(end + 1),
                log_size,
            })
        })
    })
    .await
}

#[tonic::async_trait]
impl MerkleService for MerkleAdmin {
    async fn get_checkpoint(
        &self,
        request: Request<pb::GetCheckpointRequest>,
    ) -> Result<Response<pb::GetCheckpointResponse>, Status> {
        let result = get_checkpoint(&self.state, request.into_inner()).await;
        answer("GetCheckpoint", result)
    }

    async fn list_checkpoints(
        &self,
        request: Request<pb::ListCheckpointsRequest>,
    ) -> Result<Response<pb::ListCheckpointsResponse>, Status> {
        let result = list_checkpoints(&self.state, request.into_inner()).await;
        answer("ListCheckpoints", result)
    }

    async fn prove_inclusion(
        &self,
        request: Request<pb::ProveInclusionRequest>,
    ) -> Result<Response<pb::ProveInclusionResponse>, Status> {
        let result = prove_inclusion(&self.state, request.into_inner()).await;
        answer("ProveInclusion", result)
    }

    async fn prove_consistency(
        &self,
        request: Request<pb::ProveConsistencyRequest>,
    ) -> Result<Response<pb::ProveConsistencyResponse>, Status> {
        let result = prove_consistency(&self.state, request.into_inner()).await;
        answer("ProveConsistency", result)
    }

    async fn verify_range(
        &self,
        request: Request<pb::VerifyRangeRequest>,
    ) -> Result<Response<pb::VerifyRangeResponse>, Status> {
        let result = verify_range(&self.state, request.into_inner()).await;
        answer("VerifyRange", result)
    }

    async fn list_public_keys(
        &self,
        _request: Request<pb::ListPublicKeysRequest>,
    ) -> Result<Response<pb::ListPublicKeysResponse>, Status> {
        let result = list_public_keys(&self.state).await;
        answer("ListPublicKeys", result)
    }

    async fn export_leaves(
        &self,
        request: Request<pb::ExportLeavesRequest>,
    ) -> Result<Response<pb::ExportLeavesResponse>, Status> {
        let result = export_leaves(&self.state, request.into_inner()).await;
        answer("ExportLeaves", result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn at(text: &str) -> prost_types::Timestamp {
        timestamp(
            DateTime::parse_from_rfc3339(text)
                .unwrap()
                .with_timezone(&Utc),
        )
    }

    fn time(start: &str, end: &str) -> pb::VerifyRangeRequest {
        pb::VerifyRangeRequest {
            start_time: Some(at(start)),
            end_time: Some(at(end)),
            ..Default::default()
        }
    }

    fn code(req: pb::VerifyRangeRequest) -> (Code, String) {
        let e = verify_scope(&req).unwrap_err();
        (e.code(), e.message().to_owned())
    }

    #[test]
    fn time_ranges_are_half_open_and_bounded() {
        let s = verify_scope(&time("2026-02-01T00:00:00Z", "2026-02-04T00:00:00Z")).unwrap();
        assert_eq!(
            s,
            Scope::Time {
                start: "2026-02-01T00:00:00Z".parse().unwrap(),
                end: "2026-02-04T00:00:00Z".parse().unwrap(),
            }
        );
        // 366 days is the longest range; a day more is refused.
        assert!(verify_scope(&time("2025-01-01T00:00:00Z", "2026-01-02T00:00:00Z")).is_ok());
        let (c, m) = code(time("2025-01-01T00:00:00Z", "2026-01-03T00:00:00Z"));
        assert_eq!(c, Code::InvalidArgument);
        assert!(m.contains("366 days"), "{m}");
        let (c, m) = code(time("2026-02-01T00:00:00Z", "2026-02-01T00:00:00Z"));
        assert_eq!(c, Code::InvalidArgument);
        assert!(m.contains("at or before it starts"), "{m}");
        let (c, _) = code(time("2026-02-02T00:00:00Z", "2026-02-01T00:00:00Z"));
        assert_eq!(c, Code::InvalidArgument);
        let mut half = time("2026-02-01T00:00:00Z", "2026-02-02T00:00:00Z");
        half.end_time = None;
        assert!(code(half).1.contains("both"));
    }

    #[test]
    fn leaf_ranges_include_both_ends() {
        let leaves = |from, to| pb::VerifyRangeRequest {
            from_leaf: from,
            to_leaf: to,
            ..Default::default()
        };
        assert_eq!(
            verify_scope(&leaves(Some(2), Some(5))).unwrap(),
            Scope::Leaves { from: 2, to: 6 }
        );
        assert_eq!(
            verify_scope(&leaves(None, Some(0))).unwrap(),
            Scope::Leaves { from: 0, to: 1 }
        );
        assert_eq!(
            verify_scope(&leaves(Some(3), None)).unwrap(),
            Scope::Leaves {
                from: 3,
                to: u64::MAX
            }
        );
        assert_eq!(code(leaves(Some(5), Some(2))).0, Code::InvalidArgument);
        // Neither, or both kinds of range.
        assert_eq!(code(leaves(None, None)).0, Code::InvalidArgument);
        let mut both = time("2026-02-01T00:00:00Z", "2026-02-02T00:00:00Z");
        both.from_leaf = Some(0);
        assert!(code(both).1.contains("not both"));
    }

    #[test]
    fn log_errors_map_to_codes_with_their_message() {
        let s = status(LogError::NotFound("no checkpoint of tree size 9".into()));
        assert_eq!(
            (s.code(), s.message()),
            (Code::NotFound, "no checkpoint of tree size 9")
        );
        assert_eq!(
            status(LogError::Invalid("x".into())).code(),
            Code::InvalidArgument
        );
        let s = status(LogError::Corrupt("leaf 3 changed".into()));
        assert_eq!(s.code(), Code::DataLoss);
        assert!(s.message().contains("leaf 3 changed"));
        assert_eq!(
            status(LogError::Db(
                diesel::result::Error::BrokenTransactionManager
            ))
            .code(),
            Code::Unavailable
        );
        assert_eq!(
            status(LogError::Unavailable("down".into())).code(),
            Code::Unavailable
        );
    }

    #[test]
    fn limits_and_event_ids() {
        assert_eq!(checkpoint_limit(0).unwrap(), DEFAULT_CHECKPOINTS);
        assert_eq!(checkpoint_limit(1000).unwrap(), 1000);
        assert_eq!(
            checkpoint_limit(1001).unwrap_err().code(),
            Code::InvalidArgument
        );
        assert_eq!(event_id(" e1 ").unwrap(), "e1");
        assert_eq!(event_id("").unwrap_err().code(), Code::InvalidArgument);
        assert_eq!(
            event_id(&"x".repeat(201)).unwrap_err().code(),
            Code::InvalidArgument
        );
    }
}
