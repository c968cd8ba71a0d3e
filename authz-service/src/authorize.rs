//! BudgetAuthorization: Authorize, Settle, Release, ReleaseByRequest — the hot path.
//!
//! Authorize resolves the credential and the agent's hierarchy from the in-process
//! [`Catalog`], prices the estimate, and makes exactly one Redis call: the script that
//! checks every policy of the agent and its ancestors and reserves on all of them, or
//! refuses. Settle and Release (and ReleaseByRequest, which derives the reservation
//! id from the credential and request id as Authorize does) are one Redis call each;
//! a Settle after expiry still charges the actual cost (see `budget/lua/finish.lua`).
//! Answers are decisions (allow / deny with a reason the gateway maps to
//! 429/401/403/409); gRPC errors are for malformed
//! requests (INVALID_ARGUMENT, NOT_FOUND) and for a budget store that is down
//! (UNAVAILABLE: the gateway fails closed).

use std::{
    pin::Pin,
    sync::{Arc, Weak},
    time::Instant,
};

use caracal_domain::{
    allowlist::is_allowed,
    money::{format_amount, Currency, MAX_AMOUNT_MICROS},
    pricing::{cost_micros, Usage},
    window::{calendar_bounds, rolling_bucket_width, rolling_buckets, window_key, WindowType},
};
use caracal_proto::v1::{
    self as pb, agent_credential::Kind as CredentialKind,
    budget_authorization_server::BudgetAuthorization,
};
use caracal_service_kit::telemetry;
use chrono::{DateTime, Utc};
use futures::{stream::FuturesUnordered, Stream, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument as _;
use uuid::Uuid;

use crate::{
    budget::{
        keys::{partition_of_reservation, reservation_id as reservation_id_of, reservation_stem},
        store::{
            Finish, FinishKind, FinishOutcome, PolicySlot, ReserveOutcome, ReserveRequest,
            SlotMode, StoreError,
        },
        BudgetStore, KeySpace,
    },
    catalog::{AgentView, Catalog, PolicyInfo},
    convert::money,
    metrics,
};

/// Longest request id accepted (ids become Redis key parts).
pub const MAX_REQUEST_ID_LEN: usize = 128;
/// Longest provider and model accepted, in bytes: the ledger-writer's cap on the
/// text of a charge (`consumers::ledger`, `MAX_ID_LEN`). Authorize refuses what the
/// ledger would refuse (longer, or holding NUL), so every charge it makes reaches
/// the ledger; the price book holds no longer model.
pub const MAX_TEXT_BYTES: usize = 200;
/// Most calls one FinishBatch may carry (the gateway sends at most 256): bounds
/// the memory and the Redis work one RPC can ask for.
pub const MAX_FINISH_BATCH: usize = 512;
/// Most calls of one CallStream worked on at once: further ones stay unread (HTTP/2
/// flow control holds the sender back) until earlier ones are answered.
pub const MAX_STREAM_IN_FLIGHT: usize = 1024;
/// Counters of a finished calendar window are kept this long after it ends (for
/// late settles and for inspection), then Redis drops them.
const COUNTER_GRACE_S: i64 = 86_400;

pub struct Settings {
    pub reservation_ttl_s: u64,
    pub finished_marker_ttl_s: u64,
    pub allow_without_policy: bool,
}

pub struct AuthorizationService {
    catalog: Arc<Catalog>,
    store: BudgetStore,
    settings: Settings,
    /// Itself, for the task that drives a CallStream (it outlives the RPC method).
    me: Weak<AuthorizationService>,
    /// Turns true when the server shuts down: open CallStreams end (the gateways
    /// never hang up, so a graceful shutdown would wait for them forever).
    closing: watch::Receiver<bool>,
}

impl AuthorizationService {
    pub fn new(
        catalog: Arc<Catalog>,
        store: BudgetStore,
        settings: Settings,
        closing: watch::Receiver<bool>,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            catalog,
            store,
            settings,
            me: me.clone(),
            closing,
        })
    }
}

fn store_error(e: StoreError) -> Status {
    ::metrics::counter!(metrics::REDIS_ERRORS).increment(1);
    tracing::warn!(error = %e, "budget store call failed");
    match e {
        // Redis is up but refused this call (a corrupt record): retrying elsewhere
        // will not help, and UNAVAILABLE would make the gateway retry.
        StoreError::Rejected(_) => Status::internal(e.to_string()),
        // Redis lost the partition's budget state: refused, never allowed, also by
        // a gateway that fails open when the service is unreachable (the filter
        // answers ABORTED with a 503 refusal; UNAVAILABLE may be let through).
        StoreError::StateLost(_) => Status::aborted(e.to_string()),
        _ => Status::unavailable(e.to_string()),
    }
}

/// A Settle or Release that could not be done: as [`store_error`], except that a
/// lost budget state is UNAVAILABLE (try again later: the call is idempotent and
/// the state comes back with `caracal budget rebuild`), not a refusal.
fn finish_error(e: StoreError) -> Status {
    match e {
        StoreError::StateLost(_) => {
            ::metrics::counter!(metrics::REDIS_ERRORS).increment(1);
            tracing::warn!(error = %e, "budget store call failed");
            Status::unavailable(e.to_string())
        }
        other => store_error(other),
    }
}

fn validate_request_id(id: &str) -> Result<(), Status> {
    if id.is_empty() {
        return Err(Status::invalid_argument("request_id is required"));
    }
    if id.len() > MAX_REQUEST_ID_LEN
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
    {
        return Err(Status::invalid_argument(format!(
            "request_id must be 1-{MAX_REQUEST_ID_LEN} characters of [A-Za-z0-9._:-]"
        )));
    }
    Ok(())
}

/// Provider and model as the ledger will store them: at most [`MAX_TEXT_BYTES`]
/// bytes, no NUL (PostgreSQL text cannot hold it). Empty is allowed (a cost given
/// for a call without a model).
fn validate_text(field: &str, value: &str) -> Result<(), Status> {
    if value.len() > MAX_TEXT_BYTES {
        return Err(Status::invalid_argument(format!(
            "{field} is longer than {MAX_TEXT_BYTES} bytes ({} bytes)",
            value.len()
        )));
    }
    if value.contains('\0') {
        return Err(Status::invalid_argument(format!(
            "{field} contains a NUL character"
        )));
    }
    Ok(())
}

fn deny(reason: pb::DenyReason, message: impl Into<String>) -> pb::AuthorizeResponse {
    pb::AuthorizeResponse {
        decision: pb::Decision::Deny as i32,
        reason: reason as i32,
        message: message.into(),
        ..Default::default()
    }
}

/// Validates a caller-given amount (estimate or actual cost).
fn given_cost(field: &str, m: &pb::Money) -> Result<(i64, Currency), Status> {
    let currency = Currency::parse(&m.currency)
        .map_err(|e| Status::invalid_argument(format!("{field}.currency: {e}")))?;
    if m.micros < 0 || m.micros > MAX_AMOUNT_MICROS {
        return Err(Status::invalid_argument(format!(
            "{field}.micros must be between 0 and {MAX_AMOUNT_MICROS}, got {}",
            m.micros
        )));
    }
    Ok((m.micros, currency))
}

/// Provider usage to the price book's terms: input tokens exclude cached ones.
fn usage_of(u: &pb::TokenUsage) -> Result<Usage, Status> {
    if u.cached_input_tokens > u.input_tokens {
        return Err(Status::invalid_argument(
            "usage.cached_input_tokens cannot exceed usage.input_tokens",
        ));
    }
    Ok(Usage {
        input_tokens: u.input_tokens - u.cached_input_tokens,
        output_tokens: u.output_tokens,
        cached_input_tokens: u.cached_input_tokens,
    })
}

/// The counter a policy counts in at `now` (its calendar window, or its rolling
/// sub-buckets).
pub fn policy_slot(
    keys: &KeySpace,
    partition: u16,
    p: &PolicyInfo,
    now: DateTime<Utc>,
) -> PolicySlot {
    let id = p.id.to_string();
    let mode_and_key = match (
        p.window_type,
        rolling_bucket_width(p.window),
        rolling_buckets(p.window, now),
    ) {
        (WindowType::Rolling, Some(width), Some(range)) => (
            SlotMode::Rolling {
                bucket: *range.end(),
                oldest: *range.start(),
                width_s: width.num_seconds(),
            },
            keys.rolling_counter(partition, &id, width.num_seconds()),
        ),
        // Calendar windows, and `total` of either type (all time, one counter).
        _ => {
            let bounds = calendar_bounds(p.window, now);
            let expire_at_s = bounds
                .end
                .map(|end| end.timestamp() + COUNTER_GRACE_S)
                .unwrap_or(0);
            let wkey = window_key(p.window, WindowType::Calendar, now);
            (
                SlotMode::Calendar { expire_at_s },
                keys.calendar_counter(partition, &id, &wkey),
            )
        }
    };
    PolicySlot {
        policy_id: id,
        limit_micros: p.limit_micros,
        key: mode_and_key.1,
        mode: mode_and_key.0,
        on_expiry: p.on_expiry,
    }
}

fn remaining_list(policies: &[PolicyInfo], used: &[i64], extra: i64) -> Vec<pb::PolicyRemaining> {
    policies
        .iter()
        .zip(used)
        .map(|(p, u)| pb::PolicyRemaining {
            policy_id: p.id.to_string(),
            agent_id: p.agent_id.to_string(),
            remaining: Some(money(p.limit_micros - u - extra, p.currency.as_str())),
            limit: Some(money(p.limit_micros, p.currency.as_str())),
        })
        .collect()
}

fn min_remaining(list: &[pb::PolicyRemaining]) -> Option<pb::Money> {
    list.iter()
        .filter_map(|r| r.remaining.clone())
        .min_by_key(|m| m.micros)
}

impl AuthorizationService {
    async fn resolve_agent(
        &self,
        cred: Option<&pb::AgentCredential>,
    ) -> Result<Option<Uuid>, Status> {
        let kind = cred.and_then(|c| c.kind.as_ref()).ok_or_else(|| {
            Status::invalid_argument("credential is required (api_key or verified identity)")
        })?;
        let found = match kind {
            CredentialKind::ApiKey(key) => self.catalog.agent_for_key(key.trim()).await,
            CredentialKind::Verified(v) => {
                let kind = v.kind.trim().to_lowercase();
                if kind != "spiffe" && kind != "jwt" {
                    return Err(Status::invalid_argument(format!(
                        "verified.kind must be \"spiffe\" or \"jwt\", not {:?}",
                        v.kind
                    )));
                }
                // A JWT claim is an identity only with its issuer: one without `iss`
                // matches no binding (bindings made before issuers were required too).
                let issuer = if kind == "jwt" { v.issuer.trim() } else { "" };
                if kind == "jwt" && issuer.is_empty() {
                    return Ok(None);
                }
                self.catalog
                    .agent_for_identity(&kind, issuer, v.value.trim())
                    .await
            }
        };
        found.map_err(Status::from)
    }

    async fn authorize_inner(
        &self,
        req: pb::AuthorizeRequest,
    ) -> Result<pb::AuthorizeResponse, Status> {
        validate_request_id(&req.request_id)?;
        validate_text("provider", &req.provider)?;
        validate_text("model", &req.model)?;
        let Some(agent_id) = self.resolve_agent(req.credential.as_ref()).await? else {
            return Ok(deny(
                pb::DenyReason::UnknownAgent,
                "unknown or revoked agent credential",
            ));
        };
        let Some(agent) = self.catalog.agent(agent_id).await.map_err(Status::from)? else {
            return Ok(deny(pb::DenyReason::UnknownAgent, "unknown agent"));
        };
        let with_agent = |mut r: pb::AuthorizeResponse| {
            r.agent_id = agent_id.to_string();
            r
        };
        if let Some(why) = &agent.blocked {
            return Ok(with_agent(deny(pb::DenyReason::UnknownAgent, why.clone())));
        }
        if !is_allowed(&agent.allowed_resources, &req.resource) {
            return Ok(with_agent(deny(
                pb::DenyReason::NotAllowed,
                format!(
                    "resource {:?} is not on the agent's allowlist",
                    req.resource
                ),
            )));
        }
        if !is_allowed(&agent.allowed_models, &req.model) {
            return Ok(with_agent(deny(
                pb::DenyReason::NotAllowed,
                format!("model {:?} is not on the agent's allowlist", req.model),
            )));
        }

        // The estimate: given, or priced from the token estimate.
        let (amount, currency) = match &req.estimated_cost {
            Some(m) => given_cost("estimated_cost", m)?,
            None => {
                let usage = usage_of(&req.estimated_usage.unwrap_or_default())?;
                let Some(price) = self
                    .catalog
                    .price(&req.provider, &req.model)
                    .await
                    .map_err(Status::from)?
                else {
                    return Ok(with_agent(deny(
                        pb::DenyReason::NoPrice,
                        format!(
                            "no price for {}/{} in the price book",
                            req.provider, req.model
                        ),
                    )));
                };
                let cost = cost_micros(&price.price, &usage)
                    .map_err(|e| Status::invalid_argument(format!("estimated_usage: {e}")))?;
                (cost, price.price.currency)
            }
        };
        let estimate = money(amount, currency.as_str());

        if agent.policies.is_empty() && !self.settings.allow_without_policy {
            let mut r = deny(
                pb::DenyReason::NoPolicy,
                "the agent and its ancestors have no active budget policy",
            );
            r.estimate = Some(estimate);
            return Ok(with_agent(r));
        }
        if let Some(p) = agent.policies.iter().find(|p| p.currency != currency) {
            let mut r = deny(
                pb::DenyReason::CurrencyMismatch,
                format!(
                    "estimate is in {currency} but policy {} counts {}",
                    p.id, p.currency
                ),
            );
            r.policy_id = p.id.to_string();
            r.estimate = Some(estimate);
            return Ok(with_agent(r));
        }

        self.reserve(&req, &agent, amount, currency, estimate).await
    }

    async fn reserve(
        &self,
        req: &pb::AuthorizeRequest,
        agent: &AgentView,
        amount: i64,
        currency: Currency,
        estimate: pb::Money,
    ) -> Result<pb::AuthorizeResponse, Status> {
        let now = Utc::now();
        let root = agent.root_id.to_string();
        let keys = self.store.keys();
        let partition = keys.partition_of(&root);
        let slots: Vec<PolicySlot> = agent
            .policies
            .iter()
            .map(|p| policy_slot(keys, partition, p, now))
            .collect();
        let agent_id = agent.agent_id.to_string();
        let stem = reservation_stem(partition, &agent_id, &req.request_id);
        let now_ms = now.timestamp_millis();
        // The reservation this call makes if the request is new: the stem and this
        // call's time as its generation, so a request id used again after the last
        // reservation's marker aged out gets a reservation (and event ids) of its
        // own. A retry is answered with the id the record holds.
        let rid = reservation_id_of(&stem, now_ms);
        let ttl_ms =
            i64::try_from(self.settings.reservation_ttl_s.saturating_mul(1000)).unwrap_or(i64::MAX);
        let allow_event = format!("{rid}/authorize");
        // A refusal makes no reservation, but its id names the request: the same
        // request refused again in the same millisecond is the same decision.
        // (No random UUID here: it cost a getrandom call on every Authorize.)
        let deny_event = format!("{stem}/deny/{now_ms}");
        // This call's span (when traced): the reservation's events carry it.
        let traceparent = telemetry::current_traceparent();
        let outcome = self
            .store
            .reserve(&ReserveRequest {
                partition,
                request_id: &req.request_id,
                reservation_id: &rid,
                amount_micros: amount,
                now_ms,
                expires_at_ms: now_ms.saturating_add(ttl_ms),
                agent_id: &agent_id,
                root_agent_id: &root,
                currency: currency.as_str(),
                provider: &req.provider,
                model: &req.model,
                resource: &req.resource,
                allow_event_id: &allow_event,
                deny_event_id: &deny_event,
                policies: &slots,
                traceparent: traceparent.as_deref(),
            })
            .await
            .map_err(store_error)?;
        let mut response = pb::AuthorizeResponse {
            agent_id,
            estimate: Some(estimate),
            ..Default::default()
        };
        match outcome {
            ReserveOutcome::Allowed { used } => {
                metrics::count(metrics::RESERVATIONS, ("event", "created"), ("", ""));
                response.decision = pb::Decision::Allow as i32;
                response.reservation_id = rid;
                response.remaining = remaining_list(&agent.policies, &used, amount);
            }
            ReserveOutcome::Duplicate {
                reservation_id,
                used,
                finished: None,
            } => {
                // The live reservation already counts in `used`: what remains is
                // limit - used.
                response.decision = pb::Decision::Allow as i32;
                response.reservation_id = reservation_id;
                response.message =
                    "retry of an authorized request: original reservation".to_owned();
                response.remaining = remaining_list(&agent.policies, &used, 0);
            }
            ReserveOutcome::Duplicate {
                reservation_id,
                used,
                finished: Some(done),
            } => {
                // The request was made and its reservation has ended: admitting it
                // again would be a call nobody pays for (a client reusing request
                // ids). The reservation id names the finished reservation.
                response.decision = pb::Decision::Deny as i32;
                response.reason = pb::DenyReason::RequestFinished as i32;
                response.reservation_id = reservation_id;
                response.remaining = remaining_list(&agent.policies, &used, 0);
                response.message = format!(
                    "request {:?} was already made and its reservation is {} (charged {} {}); \
                     use a new request id for a new call",
                    req.request_id,
                    finished_word(done.kind),
                    format_amount(done.charged),
                    done.currency
                );
            }
            ReserveOutcome::Denied { index, used } => {
                let refused = agent.policies.get(index);
                response.decision = pb::Decision::Deny as i32;
                response.reason = pb::DenyReason::BudgetExceeded as i32;
                response.policy_id = refused.map(|p| p.id.to_string()).unwrap_or_default();
                response.remaining = remaining_list(&agent.policies, &used, 0);
                response.message = match refused {
                    Some(p) => format!(
                        "budget exceeded: policy {} ({} {} {}) has {} {} left, estimate is {} {}",
                        p.id,
                        p.window_type,
                        p.window,
                        format_amount(p.limit_micros),
                        format_amount(p.limit_micros - used.get(index).copied().unwrap_or(0)),
                        p.currency,
                        format_amount(amount),
                        currency
                    ),
                    None => "budget exceeded".to_owned(),
                };
            }
        }
        response.min_remaining = min_remaining(&response.remaining);
        Ok(response)
    }

    /// How a reservation ends now, with this service's marker TTL.
    fn finish_of<'a>(
        &self,
        kind: FinishKind,
        partition: u16,
        reservation_id: &'a str,
    ) -> Finish<'a> {
        Finish::new(
            kind,
            partition,
            reservation_id,
            Utc::now().timestamp_millis(),
            self.settings.finished_marker_ttl_s,
        )
    }

    fn partition(&self, reservation_id: &str) -> Result<u16, Status> {
        partition_of_reservation(reservation_id, self.store.keys().partitions()).ok_or_else(|| {
            Status::invalid_argument(format!("{reservation_id:?} is not a reservation id"))
        })
    }

    async fn settle_inner(&self, req: pb::SettleRequest) -> Result<pb::SettleResponse, Status> {
        let partition = self.partition(&req.reservation_id)?;
        let usage = req.usage.unwrap_or_default();
        // The currency of the cost must be the reservation's (the script checks, in
        // the same call): counters of one currency never take another's micros.
        let given = req.actual_cost.is_some();
        let (cost, currency, price_version) = match &req.actual_cost {
            Some(m) => {
                let (cost, currency) = given_cost("actual_cost", m)?;
                (cost, currency, 0)
            }
            None => {
                if req.provider.is_empty() || req.model.is_empty() {
                    return Err(Status::invalid_argument(
                        "provider and model are required to price usage (or give actual_cost)",
                    ));
                }
                let Some(price) = self
                    .catalog
                    .price(&req.provider, &req.model)
                    .await
                    .map_err(Status::from)?
                else {
                    return Err(Status::failed_precondition(format!(
                        "no price for {}/{} in the price book",
                        req.provider, req.model
                    )));
                };
                let cost = cost_micros(&price.price, &usage_of(&usage)?)
                    .map_err(|e| Status::invalid_argument(format!("usage: {e}")))?;
                (cost, price.price.currency, price.version)
            }
        };
        let mismatch = |reservation_currency: &str| {
            if given {
                Status::invalid_argument(format!(
                    "actual_cost is in {currency} but reservation {} is in {reservation_currency}",
                    req.reservation_id
                ))
            } else {
                Status::failed_precondition(format!(
                    "the price of {}/{} is in {currency} but reservation {} is in \
                     {reservation_currency}",
                    req.provider, req.model, req.reservation_id
                ))
            }
        };
        let outcome = self
            .store
            .finish(&Finish {
                cost_micros: cost,
                input_tokens: usage.input_tokens,
                output_tokens: usage.output_tokens,
                cached_input_tokens: usage.cached_input_tokens,
                price_version,
                currency: currency.as_str(),
                ..self.finish_of(FinishKind::Settle, partition, &req.reservation_id)
            })
            .await
            .map_err(finish_error)?;
        match outcome {
            FinishOutcome::Finished {
                late,
                reserved,
                charged,
                currency,
                policies,
                ..
            } => {
                if late {
                    // After expiry: the counters now hold the actual cost (expiry's
                    // charge corrected by the difference).
                    ::metrics::counter!(metrics::RESERVATIONS, "event" => "settled_late")
                        .increment(1);
                    tracing::info!(reservation = %req.reservation_id, charged, reserved, "settled after expiry");
                } else {
                    metrics::count(metrics::RESERVATIONS, ("event", "settled"), ("", ""));
                }
                let overshoot = (charged - reserved).max(0);
                if overshoot > 0 {
                    ::metrics::counter!(metrics::OVERSHOOT_MICROS)
                        .increment(overshoot.unsigned_abs());
                    tracing::info!(reservation = %req.reservation_id, overshoot, "settled above the estimate");
                }
                Ok(pb::SettleResponse {
                    charged: Some(money(charged, &currency)),
                    reserved: Some(money(reserved, &currency)),
                    overshoot: Some(money(overshoot, &currency)),
                    remaining: policies
                        .into_iter()
                        .map(|p| pb::PolicyRemaining {
                            policy_id: p.policy_id,
                            agent_id: String::new(),
                            remaining: Some(money(p.limit_micros - p.used_micros, &currency)),
                            limit: Some(money(p.limit_micros, &currency)),
                        })
                        .collect(),
                    already_settled: false,
                })
            }
            FinishOutcome::AlreadyFinished {
                kind: FinishKind::Settle,
                currency: done_currency,
                ..
            } if done_currency != currency.as_str() => Err(mismatch(&done_currency)),
            FinishOutcome::CurrencyMismatch {
                reservation_currency,
            } => Err(mismatch(&reservation_currency)),
            FinishOutcome::AlreadyFinished {
                kind: FinishKind::Settle,
                reserved,
                charged,
                currency,
            } => Ok(pb::SettleResponse {
                charged: Some(money(charged, &currency)),
                reserved: Some(money(reserved, &currency)),
                overshoot: Some(money((charged - reserved).max(0), &currency)),
                remaining: Vec::new(),
                already_settled: true,
            }),
            FinishOutcome::AlreadyFinished { kind, .. } => {
                Err(finished_otherwise(&req.reservation_id, kind))
            }
            FinishOutcome::Unknown | FinishOutcome::Tombstoned => {
                Err(unknown_reservation(&req.reservation_id))
            }
        }
    }

    async fn release_inner(&self, req: pb::ReleaseRequest) -> Result<pb::ReleaseResponse, Status> {
        let partition = self.partition(&req.reservation_id)?;
        self.release_reservation(partition, &req.reservation_id, &req.reason, None)
            .await
    }

    /// ReleaseByRequest: the gateway's Authorize failed or timed out, so it holds no
    /// reservation id, yet the Authorize may have reserved (or may still be on its
    /// way). The id is derived from (agent, request id) as Authorize derives it;
    /// when nothing is there yet, a released tombstone makes that Authorize, should
    /// it still arrive, reserve nothing (it is refused with REQUEST_FINISHED).
    async fn release_by_request_inner(
        &self,
        req: pb::ReleaseByRequestRequest,
    ) -> Result<pb::ReleaseResponse, Status> {
        validate_request_id(&req.request_id)?;
        let Some(agent_id) = self.resolve_agent(req.credential.as_ref()).await? else {
            return Err(Status::not_found("unknown or revoked agent credential"));
        };
        let Some(agent) = self.catalog.agent(agent_id).await.map_err(Status::from)? else {
            return Err(Status::not_found("unknown agent"));
        };
        let partition = self.store.keys().partition_of(&agent.root_id.to_string());
        // The stem alone: the generation of the request's reservation is not known
        // here; the script releases whichever the record holds.
        let rid = reservation_stem(partition, &agent_id.to_string(), &req.request_id);
        // The tombstone names the currency the agent's policies count in.
        let currency = agent
            .policies
            .first()
            .map(|p| p.currency.as_str())
            .unwrap_or_default();
        self.release_reservation(partition, &rid, &req.reason, Some(currency))
            .await
    }

    /// Releases a reservation; `tombstone`: when none exists, leave a released
    /// marker in that currency.
    async fn release_reservation(
        &self,
        partition: u16,
        reservation_id: &str,
        reason: &str,
        tombstone: Option<&str>,
    ) -> Result<pb::ReleaseResponse, Status> {
        let reason = if reason.trim().is_empty() {
            "released"
        } else {
            reason.trim()
        };
        let outcome = self
            .store
            .finish(&Finish {
                reason,
                currency: tombstone.unwrap_or_default(),
                tombstone: tombstone.is_some(),
                ..self.finish_of(FinishKind::Release, partition, reservation_id)
            })
            .await
            .map_err(finish_error)?;
        match outcome {
            FinishOutcome::Finished {
                reserved, currency, ..
            } => {
                ::metrics::counter!(metrics::RESERVATIONS, "event" => "released").increment(1);
                Ok(pb::ReleaseResponse {
                    released: Some(money(reserved, &currency)),
                    already_released: false,
                })
            }
            FinishOutcome::AlreadyFinished {
                kind: FinishKind::Release,
                reserved,
                currency,
                ..
            } => Ok(pb::ReleaseResponse {
                released: Some(money(reserved, &currency)),
                already_released: true,
            }),
            FinishOutcome::AlreadyFinished { kind, .. } => {
                Err(finished_otherwise(reservation_id, kind))
            }
            FinishOutcome::Tombstoned => {
                ::metrics::counter!(metrics::RESERVATIONS, "event" => "released_before_made")
                    .increment(1);
                Ok(pb::ReleaseResponse {
                    released: Some(money(0, tombstone.unwrap_or_default())),
                    already_released: false,
                })
            }
            FinishOutcome::Unknown | FinishOutcome::CurrencyMismatch { .. } => {
                Err(unknown_reservation(reservation_id))
            }
        }
    }

    /// One call of a FinishBatch, answered as its unary RPC would be (and counted
    /// under that RPC's name in the request metrics).
    async fn finish_call(&self, call: pb::FinishCall) -> pb::FinishResult {
        use pb::{finish_call::Call, finish_result::Response as Answer};
        let started = Instant::now();
        let finishing = match call.call {
            Some(Call::Settle(req)) => Some(Finishing::Settle(req)),
            Some(Call::Release(req)) => Some(Finishing::Release(req)),
            Some(Call::ReleaseByRequest(req)) => Some(Finishing::ReleaseByRequest(req)),
            None => None,
        };
        let (method, result) = match finishing {
            Some(f) => {
                let (method, result) = self.finish_one(f, traced(&call.traceparent)).await;
                (method, result.map(Answer::from))
            }
            None => (
                "FinishBatch",
                Err(Status::invalid_argument(
                    "a FinishCall must set settle, release or release_by_request",
                )),
            ),
        };
        observe(method, started, &result, None);
        let (code, message, response) = carried(method, &call.x_request_id, result);
        pb::FinishResult {
            code,
            message,
            response,
        }
    }

    /// A Settle, Release or ReleaseByRequest of a batch or a stream, in its span.
    async fn finish_one(
        &self,
        finishing: Finishing,
        traceparent: Option<&str>,
    ) -> (&'static str, Result<Finished, Status>) {
        match finishing {
            Finishing::Settle(req) => (
                "Settle",
                self.settle_inner(req)
                    .instrument(span("Settle", traceparent))
                    .await
                    .map(Finished::Settle),
            ),
            Finishing::Release(req) => (
                "Release",
                self.release_inner(req)
                    .instrument(span("Release", traceparent))
                    .await
                    .map(Finished::Release),
            ),
            Finishing::ReleaseByRequest(req) => (
                "ReleaseByRequest",
                self.release_by_request_inner(req)
                    .instrument(span("ReleaseByRequest", traceparent))
                    .await
                    .map(Finished::Release),
            ),
        }
    }
}

/// The calls that end a reservation, however they arrived (batch or stream).
enum Finishing {
    Settle(pb::SettleRequest),
    Release(pb::ReleaseRequest),
    ReleaseByRequest(pb::ReleaseByRequestRequest),
}

/// Their answers.
enum Finished {
    Settle(pb::SettleResponse),
    Release(pb::ReleaseResponse),
}

impl From<Finished> for pb::finish_result::Response {
    fn from(done: Finished) -> Self {
        match done {
            Finished::Settle(r) => Self::Settle(r),
            Finished::Release(r) => Self::Release(r),
        }
    }
}

impl From<Finished> for pb::stream_result::Response {
    fn from(done: Finished) -> Self {
        match done {
            Finished::Settle(r) => Self::Settle(r),
            Finished::Release(r) => Self::Release(r),
        }
    }
}

impl AuthorizationService {
    /// One call of a CallStream, answered as its unary RPC would be (and counted
    /// under that RPC's name in the request metrics).
    async fn stream_call(&self, call: pb::StreamCall) -> pb::StreamResult {
        use pb::{stream_call::Call, stream_result::Response as Answer};
        let started = Instant::now();
        let traceparent = traced(&call.traceparent);
        let (method, result, decision) = match call.call {
            Some(Call::Authorize(req)) => {
                let span = span("Authorize", traceparent);
                let result = self.authorize_inner(req).instrument(span.clone()).await;
                let decision = decision_of(&result);
                mark_decision(&span, decision);
                ("Authorize", result.map(Answer::Authorize), decision)
            }
            Some(Call::Settle(req)) => {
                self.stream_finish(Finishing::Settle(req), traceparent)
                    .await
            }
            Some(Call::Release(req)) => {
                self.stream_finish(Finishing::Release(req), traceparent)
                    .await
            }
            Some(Call::ReleaseByRequest(req)) => {
                self.stream_finish(Finishing::ReleaseByRequest(req), traceparent)
                    .await
            }
            None => (
                "CallStream",
                Err(Status::invalid_argument(
                    "a StreamCall must set authorize, settle, release or release_by_request",
                )),
                None,
            ),
        };
        observe(method, started, &result, decision);
        let (code, message, response) = carried(method, &call.x_request_id, result);
        pb::StreamResult {
            call_id: call.call_id,
            code,
            message,
            response,
        }
    }

    /// A finishing call of a CallStream, as the stream answers it.
    async fn stream_finish(
        &self,
        finishing: Finishing,
        traceparent: Option<&str>,
    ) -> (
        &'static str,
        Result<pb::stream_result::Response, Status>,
        Option<(&'static str, &'static str)>,
    ) {
        let (method, result) = self.finish_one(finishing, traceparent).await;
        (method, result.map(Into::into), None)
    }

    /// Reads a CallStream's calls and works on up to [`MAX_STREAM_IN_FLIGHT`] at once,
    /// answering each as it completes. When the caller stops sending, or the server
    /// shuts down, the calls in flight are still answered and the stream then ends
    /// (OK); when the caller goes away, they still complete (each may have changed a
    /// budget: the caller releases the unanswered ones by request id) and their
    /// answers are dropped.
    async fn drive_stream(
        self: Arc<Self>,
        mut calls: Streaming<pb::StreamCall>,
        answers: mpsc::Sender<Result<pb::StreamResult, Status>>,
    ) {
        let mut working = FuturesUnordered::new();
        let mut closing = self.closing.clone();
        let mut reading = !*closing.borrow_and_update();
        let mut caller_gone = false;
        while reading || !working.is_empty() {
            tokio::select! {
                _ = closing.changed(), if reading => {
                    if *closing.borrow_and_update() {
                        reading = false;
                    }
                }
                call = calls.message(), if reading && working.len() < MAX_STREAM_IN_FLIGHT => {
                    match call {
                        Ok(Some(call)) => working.push(self.stream_call(call)),
                        Ok(None) => reading = false,
                        Err(status) => {
                            tracing::debug!(code = ?status.code(), message = status.message(), "call stream broken");
                            reading = false;
                        }
                    }
                }
                Some(result) = working.next(), if !working.is_empty() => {
                    if !caller_gone && answers.send(Ok(result)).await.is_err() {
                        caller_gone = true;
                        reading = false;
                    }
                }
            }
        }
    }
}

/// The decision and reason labels of an Authorize answer.
fn decision_of(
    result: &Result<pb::AuthorizeResponse, Status>,
) -> Option<(&'static str, &'static str)> {
    result.as_ref().ok().map(|r| {
        let d = if r.decision == pb::Decision::Allow as i32 {
            "allow"
        } else {
            "deny"
        };
        (d, reason_label(r.reason))
    })
}

/// A call's outcome as a batch or stream answer carries it: gRPC code (0 = OK),
/// message, response. A refusal is logged with the agent call's x-request-id (a
/// unary call's refusal reaches the gateway's log instead).
fn carried<T>(
    method: &'static str,
    x_request_id: &str,
    result: Result<T, Status>,
) -> (u32, String, Option<T>) {
    match result {
        Ok(answer) => (0, String::new(), Some(answer)),
        Err(status) => {
            tracing::info!(
                method,
                x_request_id,
                code = ?status.code(),
                message = status.message(),
                "batched or streamed call refused"
            );
            let code = u32::try_from(i32::from(status.code())).unwrap_or(2);
            (code, status.message().to_owned(), None)
        }
    }
}

fn finished_word(kind: FinishKind) -> &'static str {
    match kind {
        FinishKind::Settle => "settled",
        FinishKind::Release => "released",
        FinishKind::Expire => "expired",
    }
}

/// A Settle or Release of a reservation that ended another way first.
fn finished_otherwise(reservation_id: &str, kind: FinishKind) -> Status {
    Status::failed_precondition(format!(
        "reservation {reservation_id} was already {}",
        finished_word(kind)
    ))
}

fn unknown_reservation(reservation_id: &str) -> Status {
    Status::not_found(format!("reservation {reservation_id} not found"))
}

/// Records the outcome of a hot-path call: `caracal_requests_total{status}` (the
/// guide's error-rate alert reads status="error"), decisions by reason, latency.
fn observe<T>(
    method: &'static str,
    started: Instant,
    result: &Result<T, Status>,
    decision: Option<(&'static str, &'static str)>,
) {
    let status = match (result, decision) {
        (Err(_), _) => "error",
        (Ok(_), Some((d, _))) => d,
        (Ok(_), None) => "ok",
    };
    metrics::count(metrics::REQUESTS, ("method", method), ("status", status));
    if let Some((d, reason)) = decision {
        metrics::count(metrics::DECISIONS, ("decision", d), ("reason", reason));
    }
    metrics::record(
        metrics::HOT_PATH_LATENCY,
        ("method", method),
        started.elapsed().as_secs_f64(),
    );
}

/// The server span of one hot-path call (`Span::none()` when tracing is off).
fn span(method: &'static str, traceparent: Option<&str>) -> tracing::Span {
    telemetry::span(method, telemetry::Kind::Server, traceparent)
}

/// A batched or streamed call's `traceparent` field, when tracing is on.
fn traced(field: &str) -> Option<&str> {
    (telemetry::enabled() && !field.is_empty()).then_some(field)
}

/// A unary call's `traceparent` metadata, when tracing is on.
pub(crate) fn metadata_traceparent<T>(request: &Request<T>) -> Option<&str> {
    if !telemetry::enabled() {
        return None;
    }
    request
        .metadata()
        .get(telemetry::TRACEPARENT)
        .and_then(|v| v.to_str().ok())
}

/// Records an Authorize's decision and reason on its span.
fn mark_decision(span: &tracing::Span, decision: Option<(&'static str, &'static str)>) {
    if let Some((d, reason)) = decision {
        telemetry::attribute(span, "caracal.decision", d);
        if !reason.is_empty() {
            telemetry::attribute(span, "caracal.deny_reason", reason);
        }
    }
}

fn reason_label(r: i32) -> &'static str {
    match pb::DenyReason::try_from(r).unwrap_or(pb::DenyReason::Unspecified) {
        pb::DenyReason::Unspecified => "",
        pb::DenyReason::BudgetExceeded => "budget_exceeded",
        pb::DenyReason::UnknownAgent => "unknown_agent",
        pb::DenyReason::NotAllowed => "not_allowed",
        pb::DenyReason::NoPolicy => "no_policy",
        pb::DenyReason::CurrencyMismatch => "currency_mismatch",
        pb::DenyReason::NoPrice => "no_price",
        pb::DenyReason::RequestFinished => "request_finished",
    }
}

#[tonic::async_trait]
impl BudgetAuthorization for AuthorizationService {
    async fn authorize(
        &self,
        request: Request<pb::AuthorizeRequest>,
    ) -> Result<Response<pb::AuthorizeResponse>, Status> {
        let started = Instant::now();
        let span = span("Authorize", metadata_traceparent(&request));
        let result = self
            .authorize_inner(request.into_inner())
            .instrument(span.clone())
            .await;
        let decision = decision_of(&result);
        mark_decision(&span, decision);
        observe("Authorize", started, &result, decision);
        result.map(Response::new)
    }

    async fn settle(
        &self,
        request: Request<pb::SettleRequest>,
    ) -> Result<Response<pb::SettleResponse>, Status> {
        let started = Instant::now();
        let span = span("Settle", metadata_traceparent(&request));
        let result = self
            .settle_inner(request.into_inner())
            .instrument(span)
            .await;
        observe("Settle", started, &result, None);
        result.map(Response::new)
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let started = Instant::now();
        let span = span("Release", metadata_traceparent(&request));
        let result = self
            .release_inner(request.into_inner())
            .instrument(span)
            .await;
        observe("Release", started, &result, None);
        result.map(Response::new)
    }

    async fn release_by_request(
        &self,
        request: Request<pb::ReleaseByRequestRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let started = Instant::now();
        let span = span("ReleaseByRequest", metadata_traceparent(&request));
        let result = self
            .release_by_request_inner(request.into_inner())
            .instrument(span)
            .await;
        observe("ReleaseByRequest", started, &result, None);
        result.map(Response::new)
    }

    /// The calls run concurrently: each is one Redis script call, and concurrent
    /// calls share the connection's pipeline (one write, one read for many).
    async fn finish_batch(
        &self,
        request: Request<pb::FinishBatchRequest>,
    ) -> Result<Response<pb::FinishBatchResponse>, Status> {
        let calls = request.into_inner().calls;
        if calls.len() > MAX_FINISH_BATCH {
            return Err(Status::invalid_argument(format!(
                "a FinishBatch holds at most {MAX_FINISH_BATCH} calls, got {}",
                calls.len()
            )));
        }
        let results =
            futures::future::join_all(calls.into_iter().map(|c| self.finish_call(c))).await;
        Ok(Response::new(pb::FinishBatchResponse { results }))
    }

    type CallStreamStream =
        Pin<Box<dyn Stream<Item = Result<pb::StreamResult, Status>> + Send + 'static>>;

    /// The calls are driven by a task of their own (see [`Self::drive_stream`]); the
    /// answers reach the caller through a channel as long as the calls may be in
    /// flight, so a slow reader holds the task back rather than growing a buffer.
    async fn call_stream(
        &self,
        request: Request<Streaming<pb::StreamCall>>,
    ) -> Result<Response<Self::CallStreamStream>, Status> {
        let me = self
            .me
            .upgrade()
            .ok_or_else(|| Status::unavailable("the service is shutting down"))?;
        let (answers, out) = mpsc::channel(MAX_STREAM_IN_FLIGHT);
        tokio::spawn(me.drive_stream(request.into_inner(), answers));
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }
}
