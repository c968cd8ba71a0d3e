//! The proxy-wasm callbacks: Envoy events in, decisions from the plain modules out.
//!
//! Only the SDK's `hostcalls` functions that return `Result` are used (the trait helper
//! methods unwrap), so a host error is logged and handled, never turned into a panic.
//!
//! Request path: headers (route, identity, header hygiene; they continue, see
//! `on_http_request_headers`) -> body held and buffered to the end (estimate,
//! streaming usage switched on) -> `Authorize` over gRPC, body still held -> allow:
//! resume / deny: local reply / failure: 503 or fail open. Non-token endpoints are
//! authorized from the headers, which are then paused.
//! Response path: headers (`x-caracal-*` headers added, status and content type noted)
//! -> body chunks read as they pass (never held back) -> at the end `Settle` or
//! `Release`; `on_log` catches streams that never ended (client abort).
//!
//! Settle, Release and ReleaseByRequest are handed to the ROOT context (the thread's
//! [`Outbox`]), which sends what is due from its tick as one `FinishBatch` call (up to
//! [`authz::MAX_BATCH`] calls; unary calls to a service that predates FinishBatch):
//! one gRPC exchange per tick instead of one per agent call. Envoy cancels the outstanding calls of
//! an HTTP context when its stream is destroyed, right after the last response byte,
//! and the SDK delivers a call's answer to the context that was active when it was
//! dispatched, so only calls the root dispatches itself have their answers seen. A
//! failed call is sent again with backoff (bounded; every one of them is idempotent by
//! reservation / request id), and failures are counted in the
//! `caracal_filter_settle_*` metrics (Envoy stats `wasmcustom.caracal_filter_...`).

use std::cell::{Cell, RefCell};
use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::rc::{Rc, Weak};
use std::time::{Duration, UNIX_EPOCH};

use log::{debug, error, info, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType};

use crate::authz::{self, CallFailure, CallInfo, Outcome, Verdict};
use crate::config::{
    self, strip_query, Config, FailureMode, IdentitySource, Provider, Route, GATEWAY_TOKEN_METADATA,
};
use crate::estimate::{self, Api, Estimate};
use crate::identity::{self, Identity};
use crate::reply::{self, Refusal, REMAINING_BUDGET_HEADER, RESERVATION_ID_HEADER};
use crate::usage::UsageParser;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> {
        Box::new(Root { id: context_id, config: None })
    });
}}

thread_local! {
    static REQUEST_COUNTER: Cell<u64> = const { Cell::new(0) };
    static OUTBOX: RefCell<Outbox> = RefCell::new(Outbox::default());
    static LANE: RefCell<Lane> = RefCell::new(Lane::default());
    /// The root's tick is on.
    static TICKING: Cell<bool> = const { Cell::new(false) };
}

/// Root tick while the outbox holds calls to send; off otherwise.
const TICK: Duration = Duration::from_millis(5);
/// Calls waiting to be sent at most (per worker thread); beyond, new ones are dropped
/// (counted) and their reservations expire.
const MAX_QUEUED: usize = 100_000;

/// One call that ends a reservation.
struct Job {
    method: &'static str,
    message: Vec<u8>,
    /// Reservation id or request id, for logs.
    label: String,
    tags: authz::CallTags,
    /// Attempts already made.
    attempts: u32,
    /// Not before this time (ms since the epoch).
    due_ms: u64,
}

/// The calls of one gRPC call in flight.
enum Flight {
    /// A unary Settle / Release / ReleaseByRequest.
    One(Job),
    /// A FinishBatch, answered per call in this order.
    Batch(Vec<Job>),
}

/// The thread's Settle / Release calls: waiting to be sent, and in flight by token.
#[derive(Default)]
struct Outbox {
    queue: Vec<Job>,
    in_flight: HashMap<u32, Flight>,
    /// The service answered FinishBatch with UNIMPLEMENTED (a release before it):
    /// unary calls from then on.
    unary: bool,
}

/// gRPC status DEADLINE_EXCEEDED.
const DEADLINE_EXCEEDED: u32 = 4;
/// gRPC status UNIMPLEMENTED.
const UNIMPLEMENTED: u32 = 12;
/// gRPC status UNAVAILABLE.
const UNAVAILABLE: u32 = 14;

/// Authorize over the worker's CallStream: one long-lived gRPC stream per worker
/// thread, each Authorize a message on it tagged with a call id. It saves Envoy the
/// HTTP/2 stream, headers, router and timer a unary call costs (and the service the
/// same on its side); the answers are the unary RPC's.
///
/// The ROOT opens the stream (from its tick, once a first Authorize asked), so the
/// stream belongs to no agent call and outlives them all; an HTTP context sends on it
/// with the root made the effective context. An answer arrives at the root, which
/// makes the waiting HTTP context effective and hands the answer to its [`Filter`]
/// (shared through a `Weak`; a context that is gone was already released by
/// request id in `on_log`). Until the service has answered the stream's headers -
/// and for good when it answers UNIMPLEMENTED (a release before CallStream) -
/// Authorize goes as a unary call, as before. The root's tick enforces each call's
/// deadline; a stream that breaks, or answers nothing for a whole deadline, fails
/// its waiting calls (each is then released by request id and fails closed or open,
/// as a failed unary Authorize) and is opened again with backoff. A stream the
/// service ends with OK (it shuts down, having answered every call it read) left its
/// waiting calls unapplied: they are sent again as unary calls.
#[derive(Default)]
struct Lane {
    state: LaneState,
    next_call_id: u64,
    /// Calls sent on a stream, waiting for their answer, by call id.
    waiting: HashMap<u64, Waiting>,
    /// Calls of a stream the service ended cleanly without reading them, sent again
    /// by the root as unary calls: by the unary call's token.
    resent: HashMap<u32, (u64, Waiting)>,
    /// When the stream last answered a call (ms since the epoch).
    last_answer_ms: u64,
    /// Opens in a row that failed (backoff).
    failed_opens: u32,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum LaneState {
    /// Never needed yet (the main thread's root context, which serves no requests,
    /// stays here): the first Authorize asks for the stream and goes unary.
    #[default]
    Unopened,
    /// No stream: the tick opens one from `retry_at_ms` on.
    Closed { retry_at_ms: u64 },
    /// Dispatched with this token, headers not answered yet: calls go unary.
    Opening(u32),
    /// Calls go on the stream with this token.
    Open(u32),
    /// The service has no CallStream: unary for good.
    Unsupported,
}

/// A call sent on the stream `token`, waiting for its answer.
struct Waiting {
    filter: Weak<RefCell<Filter>>,
    context_id: u32,
    token: u32,
    sent_ms: u64,
    deadline_ms: u64,
    /// The encoded AuthorizeRequest and the agent call's tags, to send it
    /// again as a unary call when the service ends the stream without reading it.
    authorize: Vec<u8>,
    tags: authz::CallTags,
}

/// Delay before the stream is opened again after `failed` opens in a row failed.
fn reopen_delay_ms(failed: u32) -> u64 {
    100u64
        .saturating_mul(1 << failed.saturating_sub(1).min(7))
        .min(10_000)
}

/// The filter's counters (ids from `define_metric`, per thread).
#[derive(Clone, Copy, Default)]
struct Metrics {
    failures: Option<u32>,
    retries: Option<u32>,
    recovered: Option<u32>,
    dropped: Option<u32>,
    /// Authorize calls sent on the CallStream / as unary calls.
    streamed: Option<u32>,
    unary: Option<u32>,
    /// CallStreams that opened (a climbing count is a stream that keeps breaking).
    stream_opens: Option<u32>,
}

thread_local! {
    static METRICS: Cell<Metrics> = Cell::new(Metrics::default());
}

fn count(pick: fn(&Metrics) -> Option<u32>) {
    if let Some(id) = METRICS.with(|m| pick(&m.get())) {
        let _ = hostcalls::increment_metric(id, 1);
    }
}

fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Queues a call for the root to send, and turns its tick on. Called from an HTTP
/// context: the tick is the root's (`root_id` is made the effective context for it).
fn enqueue(job: Job, root_id: u32, own_id: u32) {
    let start_tick = OUTBOX.with(|o| {
        let mut o = o.borrow_mut();
        if o.queue.len() >= MAX_QUEUED {
            error!(
                "caracal: {} for {} dropped: {} calls already queued; it will expire",
                job.method,
                job.label,
                o.queue.len()
            );
            count(|m| m.dropped);
            return false;
        }
        o.queue.push(job);
        true
    });
    if start_tick {
        self::start_tick(root_id, own_id);
    }
}

/// Turns the root's tick on (the root, `root_id`, is made the effective context for
/// it when called from another context, `own_id`).
fn start_tick(root_id: u32, own_id: u32) {
    if TICKING.with(|t| t.replace(true)) {
        return;
    }
    let switched = own_id != root_id && hostcalls::set_effective_context(root_id).is_ok();
    if let Err(e) = hostcalls::set_tick_period(TICK) {
        error!("caracal: cannot start the root tick: {e:?}");
        TICKING.with(|t| t.set(false));
    }
    if switched {
        let _ = hostcalls::set_effective_context(own_id);
    }
}

/// The plugin instance: holds the validated configuration.
struct Root {
    id: u32,
    config: Option<Rc<Config>>,
}

impl Root {
    /// Sends the queued calls that are due.
    fn send_due(&mut self) {
        let Some(config) = self.config.clone() else {
            return;
        };
        let now = now_ms();
        let (mut due, unary): (Vec<Job>, bool) = OUTBOX.with(|o| {
            let mut o = o.borrow_mut();
            let (due, wait): (Vec<Job>, Vec<Job>) =
                o.queue.drain(..).partition(|j| j.due_ms <= now);
            o.queue = wait;
            (due, o.unary)
        });
        if unary {
            for job in due {
                self.send_one(&config, job);
            }
        } else {
            while !due.is_empty() {
                let rest = due.split_off(due.len().min(authz::MAX_BATCH));
                self.send_batch(&config, std::mem::replace(&mut due, rest));
            }
        }
    }

    /// Turns the tick off when nothing needs it: no call queued, no streamed call
    /// waiting (deadlines), no stream to open (while the service is down, the tick
    /// keeps trying with backoff).
    fn stop_tick_if_idle(&self) {
        let idle = OUTBOX.with(|o| o.borrow().queue.is_empty())
            && LANE.with(|l| {
                let l = l.borrow();
                l.waiting.is_empty() && !matches!(l.state, LaneState::Closed { .. })
            });
        if idle {
            TICKING.with(|t| t.set(false));
            let _ = hostcalls::set_tick_period(Duration::ZERO);
        }
    }

    /// The stream's upkeep, from the tick: waiting calls past their deadline fail
    /// (and a stream that answered nothing for a whole deadline is given up), a
    /// missing stream is opened.
    fn tend_lane(&mut self) {
        let Some(config) = self.config.clone() else {
            return;
        };
        let now = now_ms();
        let (expired, stuck) = LANE.with(|l| {
            let mut l = l.borrow_mut();
            let last_answer = l.last_answer_ms;
            let expired: Vec<(u64, Waiting)> =
                l.waiting.extract_if(|_, w| w.deadline_ms <= now).collect();
            let stuck = match l.state {
                LaneState::Open(token) => expired
                    .iter()
                    .any(|(_, w)| w.token == token && w.sent_ms >= last_answer)
                    .then_some(token),
                _ => None,
            };
            (expired, stuck)
        });
        for (call_id, w) in expired {
            self.deliver(
                call_id,
                w,
                DEADLINE_EXCEEDED,
                "Authorize timed out (call stream)",
                &[],
            );
        }
        if let Some(token) = stuck {
            warn!("caracal: the Authorize stream answered nothing for a whole deadline; opening a new one");
            let _ = hostcalls::cancel_grpc_stream(token);
            self.stream_lost(
                token,
                "the Authorize stream answered nothing; given up",
                false,
            );
        }
        let open = LANE.with(
            |l| matches!(l.borrow().state, LaneState::Closed { retry_at_ms } if retry_at_ms <= now),
        );
        if open {
            match hostcalls::open_grpc_stream(
                &config.authz_upstream,
                authz::SERVICE,
                authz::CALL_STREAM,
                gateway_metadata(&config, &authz::CallTags::default()),
            ) {
                Ok(token) => {
                    debug!("caracal: Authorize stream {token} dispatched");
                    LANE.with(|l| l.borrow_mut().state = LaneState::Opening(token));
                }
                Err(e) => {
                    warn!("caracal: cannot open the Authorize stream: {e:?}");
                    LANE.with(|l| {
                        let mut l = l.borrow_mut();
                        l.failed_opens = l.failed_opens.saturating_add(1);
                        l.state = LaneState::Closed {
                            retry_at_ms: now.saturating_add(reopen_delay_ms(l.failed_opens)),
                        };
                    });
                }
            }
        }
    }

    /// The stream `token` is gone: it is opened again after a backoff, and its
    /// waiting calls fail — unless the service ended it cleanly (`unread`: a
    /// shutting-down service answers every call it read before it ends a stream with
    /// OK), then they were never applied and are sent again as unary calls.
    fn stream_lost(&mut self, token: u32, why: &str, unread: bool) {
        let now = now_ms();
        let lost: Vec<(u64, Waiting)> = LANE.with(|l| {
            let mut l = l.borrow_mut();
            if matches!(l.state, LaneState::Open(t) | LaneState::Opening(t) if t == token) {
                l.failed_opens = l.failed_opens.saturating_add(1);
                l.state = LaneState::Closed {
                    retry_at_ms: now.saturating_add(reopen_delay_ms(l.failed_opens)),
                };
            }
            l.waiting.extract_if(|_, w| w.token == token).collect()
        });
        for (call_id, w) in lost {
            if unread {
                self.resend_unary(call_id, w);
            } else {
                self.deliver(call_id, w, UNAVAILABLE, why, &[]);
            }
        }
    }

    /// Sends a waiting call again as a unary Authorize of the root's, with what is
    /// left of its deadline; the answer is delivered as a stream answer would be.
    fn resend_unary(&mut self, call_id: u64, w: Waiting) {
        let Some(config) = self.config.clone() else {
            return self.deliver(call_id, w, UNAVAILABLE, "not configured", &[]);
        };
        let left = w.deadline_ms.saturating_sub(now_ms()).max(1);
        match hostcalls::dispatch_grpc_call(
            &config.authz_upstream,
            authz::SERVICE,
            authz::AUTHORIZE,
            gateway_metadata(&config, &w.tags),
            Some(&w.authorize),
            Duration::from_millis(left),
        ) {
            Ok(token) => {
                count(|m| m.unary);
                LANE.with(|l| l.borrow_mut().resent.insert(token, (call_id, w)));
            }
            Err(e) => {
                let why = format!("Authorize not dispatched again: {e:?}");
                self.deliver(call_id, w, UNAVAILABLE, &why, &[]);
            }
        }
    }

    /// Hands an answer from the stream to the HTTP context waiting for it (made the
    /// effective context meanwhile, so its hostcalls act on its own stream).
    fn deliver(&mut self, call_id: u64, w: Waiting, code: u32, message: &str, body: &[u8]) {
        let Some(filter) = w.filter.upgrade() else {
            debug!("caracal: stream call {call_id} answered after its request ended");
            return;
        };
        if hostcalls::set_effective_context(w.context_id).is_err() {
            debug!("caracal: stream call {call_id}: its HTTP context is gone");
            return;
        }
        match filter.try_borrow_mut() {
            Ok(mut f) => f.on_stream_answer(call_id, code, message, body),
            Err(_) => {
                error!("caracal: stream call {call_id}: its HTTP context is busy; answer dropped")
            }
        }
        let _ = hostcalls::set_effective_context(self.id);
    }

    /// Sends `message` to the authz-service's `method` with the Settle deadline.
    fn dispatch(
        config: &Config,
        method: &str,
        tags: &authz::CallTags,
        message: &[u8],
    ) -> Result<u32, proxy_wasm::types::Status> {
        hostcalls::dispatch_grpc_call(
            &config.authz_upstream,
            authz::SERVICE,
            method,
            gateway_metadata(config, tags),
            Some(message),
            config.settle_timeout(),
        )
    }

    /// Sends one call as its unary RPC.
    fn send_one(&mut self, config: &Config, job: Job) {
        if job.attempts > 0 {
            count(|m| m.retries);
        }
        match Self::dispatch(config, job.method, &job.tags, &job.message) {
            Ok(token) => {
                debug!("caracal: {} sent for {}", job.method, job.label);
                OUTBOX.with(|o| o.borrow_mut().in_flight.insert(token, Flight::One(job)));
            }
            Err(e) => self.failed(job, &format!("not dispatched ({e:?})"), true),
        }
    }

    /// Sends calls as one FinishBatch (each call's x-request-id travels inside it).
    fn send_batch(&mut self, config: &Config, jobs: Vec<Job>) {
        let entries: Vec<authz::BatchEntry<'_>> = jobs
            .iter()
            .map(|j| authz::BatchEntry {
                method: j.method,
                message: &j.message,
                tags: &j.tags,
            })
            .collect();
        let Some(message) = authz::finish_batch_request(&entries) else {
            // Only Settle / Release / ReleaseByRequest are ever queued.
            error!("caracal: a queued call has no place in a FinishBatch; sent alone");
            for job in jobs {
                self.send_one(config, job);
            }
            return;
        };
        for job in jobs.iter().filter(|j| j.attempts > 0) {
            debug!("caracal: {} for {} sent again", job.method, job.label);
            count(|m| m.retries);
        }
        match Self::dispatch(
            config,
            authz::FINISH_BATCH,
            &authz::CallTags::default(),
            &message,
        ) {
            Ok(token) => {
                debug!("caracal: FinishBatch of {} call(s) sent", jobs.len());
                OUTBOX.with(|o| o.borrow_mut().in_flight.insert(token, Flight::Batch(jobs)));
            }
            Err(e) => {
                let why = format!("not dispatched ({e:?})");
                for job in jobs {
                    self.failed(job, &why, true);
                }
            }
        }
    }

    /// The answer to one call (unary, or one entry of a batch): gRPC `code` and its
    /// message.
    fn answered(&mut self, job: Job, code: u32, message: &str) {
        if code != 0 {
            let why = format!("gRPC status {code} {message}");
            self.failed(job, &why, authz::retryable(code));
        } else if job.attempts > 0 {
            count(|m| m.recovered);
            info!(
                "caracal: {} for {} succeeded after {} failed attempt(s)",
                job.method, job.label, job.attempts
            );
        }
    }

    /// The answer to a FinishBatch.
    fn on_batch_answer(&mut self, jobs: Vec<Job>, status_code: u32, response_size: usize) {
        if status_code == UNIMPLEMENTED {
            // A service without FinishBatch: the calls go again, unary, at once (not a
            // failed attempt of theirs).
            warn!("caracal: the authz-service has no FinishBatch; Settle/Release sent one by one");
            OUTBOX.with(|o| o.borrow_mut().unary = true);
            for job in jobs {
                enqueue(job, self.id, self.id);
            }
            return;
        }
        if status_code != 0 {
            // The batch as a whole failed: each call failed the same way.
            let message = grpc_status_message();
            for job in jobs {
                self.answered(job, status_code, &message);
            }
            return;
        }
        let results = hostcalls::get_buffer(BufferType::GrpcReceiveBuffer, 0, response_size)
            .map_err(|e| format!("FinishBatch answer unreadable: {e:?}"))
            .and_then(|b| authz::finish_batch_results(&b.unwrap_or_default(), jobs.len()));
        match results {
            Ok(results) => {
                for (job, r) in jobs.into_iter().zip(results) {
                    self.answered(job, r.code, &r.message);
                }
            }
            // Every call is idempotent: sent again, an already applied one answers
            // "already settled / released".
            Err(why) => {
                for job in jobs {
                    self.failed(job, &why, true);
                }
            }
        }
    }

    /// A call failed: counted, logged, and queued again with backoff when worth it.
    fn failed(&mut self, mut job: Job, why: &str, retry: bool) {
        count(|m| m.failures);
        job.attempts += 1;
        match authz::retry_delay_ms(job.attempts, retry) {
            Some(ms) => {
                warn!(
                    "caracal: {} for {} failed: {why}; retry {} in {ms} ms",
                    job.method, job.label, job.attempts
                );
                job.due_ms = now_ms().saturating_add(ms);
                // Already the root's own callback: no context switch needed.
                enqueue(job, self.id, self.id);
            }
            _ => {
                count(|m| m.dropped);
                error!(
                    "caracal: {} for {} failed: {why}; given up after {} attempt(s), the reservation will expire",
                    job.method, job.label, job.attempts
                );
            }
        }
    }
}

impl Context for Root {
    fn on_grpc_stream_initial_metadata(&mut self, token_id: u32, num_elements: u32) {
        // A trailers-only answer (UNIMPLEMENTED, UNAUTHENTICATED, ...) comes with no
        // initial metadata and is followed by the close.
        LANE.with(|l| {
            let mut l = l.borrow_mut();
            if l.state == LaneState::Opening(token_id) && num_elements > 0 {
                info!("caracal: Authorize stream {token_id} open");
                l.state = LaneState::Open(token_id);
                l.failed_opens = 0;
                count(|m| m.stream_opens);
            }
        });
    }

    fn on_grpc_stream_message(&mut self, token_id: u32, message_size: usize) {
        let answer = hostcalls::get_buffer(BufferType::GrpcReceiveBuffer, 0, message_size)
            .map_err(|e| format!("unreadable: {e:?}"))
            .and_then(|b| authz::stream_answer(&b.unwrap_or_default()));
        let answer = match answer {
            Ok(a) => a,
            Err(why) => {
                // Which call it answers is unknown: that call times out.
                error!("caracal: an Authorize stream answer was {why}");
                return;
            }
        };
        let now = now_ms();
        let waiting = LANE.with(|l| {
            let mut l = l.borrow_mut();
            l.last_answer_ms = now;
            match l.waiting.remove(&answer.call_id) {
                Some(w) if w.token == token_id => Some(w),
                Some(w) => {
                    l.waiting.insert(answer.call_id, w);
                    None
                }
                None => None,
            }
        });
        match waiting {
            Some(w) => self.deliver(
                answer.call_id,
                w,
                answer.code,
                &answer.message,
                &answer.authorize,
            ),
            None => debug!(
                "caracal: stream answer for call {} that no longer waits",
                answer.call_id
            ),
        }
    }

    fn on_grpc_stream_close(&mut self, token_id: u32, status_code: u32) {
        let message = grpc_status_message();
        let unsupported = status_code == UNIMPLEMENTED
            && LANE.with(|l| {
                let mut l = l.borrow_mut();
                let ours =
                    matches!(l.state, LaneState::Opening(t) | LaneState::Open(t) if t == token_id);
                if ours {
                    l.state = LaneState::Unsupported;
                }
                ours
            });
        if unsupported {
            warn!("caracal: the authz-service has no CallStream; Authorize sent as unary calls");
        } else {
            warn!("caracal: Authorize stream {token_id} closed with gRPC status {status_code} {message}");
        }
        self.stream_lost(
            token_id,
            &format!("the Authorize stream closed (gRPC status {status_code} {message})"),
            status_code == 0,
        );
    }

    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        match OUTBOX.with(|o| o.borrow_mut().in_flight.remove(&token_id)) {
            None => {
                let Some((call_id, w)) = LANE.with(|l| l.borrow_mut().resent.remove(&token_id))
                else {
                    return;
                };
                let (code, message, body) = unary_answer(status_code, response_size);
                self.deliver(call_id, w, code, &message, &body);
            }
            Some(Flight::Batch(jobs)) => self.on_batch_answer(jobs, status_code, response_size),
            Some(Flight::One(job)) => {
                let message = if status_code == 0 {
                    String::new()
                } else {
                    grpc_status_message()
                };
                self.answered(job, status_code, &message);
            }
        }
    }
}

impl RootContext for Root {
    fn on_tick(&mut self) {
        self.send_due();
        self.tend_lane();
        self.stop_tick_if_idle();
    }

    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let bytes = match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX) {
            Ok(Some(b)) => b,
            Ok(None) => Vec::new(),
            Err(e) => {
                error!("caracal: cannot read the plugin configuration: {e:?}");
                return false;
            }
        };
        match Config::parse(&bytes) {
            Ok((config, warnings)) => {
                proxy_wasm::set_log_level(match config.log_level {
                    config::LogLevel::Trace => LogLevel::Trace,
                    config::LogLevel::Debug => LogLevel::Debug,
                    config::LogLevel::Info => LogLevel::Info,
                    config::LogLevel::Warn => LogLevel::Warn,
                    config::LogLevel::Error => LogLevel::Error,
                });
                for w in warnings {
                    warn!("caracal: {w}");
                }
                info!(
                    "caracal: configured, authz cluster {:?}, {} route(s), failure mode {:?}",
                    config.authz_cluster,
                    config.routes.len(),
                    config.failure_mode
                );
                self.config = Some(Rc::new(config));
                let define = |name: &str| match hostcalls::define_metric(MetricType::Counter, name)
                {
                    Ok(id) => Some(id),
                    Err(e) => {
                        warn!("caracal: cannot define metric {name}: {e:?}");
                        None
                    }
                };
                METRICS.with(|m| {
                    m.set(Metrics {
                        failures: define("caracal_filter_settle_failures_total"),
                        retries: define("caracal_filter_settle_retries_total"),
                        recovered: define("caracal_filter_settle_recovered_total"),
                        dropped: define("caracal_filter_settle_dropped_total"),
                        streamed: define("caracal_filter_authorize_streamed_total"),
                        unary: define("caracal_filter_authorize_unary_total"),
                        stream_opens: define("caracal_filter_authorize_stream_opens_total"),
                    })
                });
                true
            }
            Err(e) => {
                error!("caracal: {e}; the plugin refuses to start");
                false
            }
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let config = self.config.clone();
        let root_id = self.id;
        Some(Box::new(FilterContext(Rc::new_cyclic(|me| {
            RefCell::new(Filter::new(config, root_id, context_id, me.clone()))
        }))))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Not a metered request (or nothing left to do).
    PassThrough,
    /// Headers passed on; holding and buffering the body.
    AwaitingBody,
    /// Authorize in flight.
    Authorizing(AuthorizeCall),
    /// Answered locally.
    Refused,
    /// Forwarded upstream (with or without a reservation).
    Forwarded,
}

/// How an Authorize in flight was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AuthorizeCall {
    /// A unary call with this token.
    Unary(u32),
    /// On the worker's CallStream with this call id.
    Stream(u64),
}

/// What Envoy holds for an HTTP stream: its [`Filter`] in a shared cell, so the root
/// can hand it an answer that arrived on the worker's CallStream. Callbacks never
/// nest (Envoy defers what a hostcall would trigger until the callback returns), so
/// the cell is never borrowed twice; if it were, the request stays paused rather
/// than the VM trapping.
struct FilterContext(Rc<RefCell<Filter>>);

impl FilterContext {
    fn with(&self, busy: Action, f: impl FnOnce(&mut Filter) -> Action) -> Action {
        match self.0.try_borrow_mut() {
            Ok(mut filter) => f(&mut filter),
            Err(_) => {
                error!("caracal: an HTTP context was re-entered; callback skipped");
                busy
            }
        }
    }
}

/// One HTTP stream.
struct Filter {
    config: Option<Rc<Config>>,
    root_id: u32,
    id: u32,
    /// Itself, for the root to hand it a streamed Authorize answer.
    me: Weak<RefCell<Filter>>,
    phase: Phase,
    route: Option<Route>,
    api: Api,
    path: String,
    identity: Option<Identity>,
    request_id: String,
    /// The agent call's x-request-id and traceparent (its own, or one started here).
    tags: authz::CallTags,
    estimate: Estimate,
    reservation_id: Option<String>,
    remaining: Option<String>,
    status: Option<u32>,
    parser: Option<UsageParser>,
    response_complete: bool,
    finished: bool,
}

impl Filter {
    fn new(config: Option<Rc<Config>>, root_id: u32, id: u32, me: Weak<RefCell<Filter>>) -> Self {
        Filter {
            config,
            root_id,
            id,
            me,
            phase: Phase::PassThrough,
            route: None,
            api: Api::Other,
            path: String::new(),
            identity: None,
            request_id: String::new(),
            tags: authz::CallTags::default(),
            estimate: Estimate::default(),
            reservation_id: None,
            remaining: None,
            status: None,
            parser: None,
            response_complete: false,
            finished: false,
        }
    }

    fn provider(&self) -> Provider {
        self.route.as_ref().map_or(Provider::Openai, |r| r.provider)
    }

    fn failure_mode(&self) -> FailureMode {
        match (&self.config, &self.route) {
            (Some(c), Some(r)) => c.failure_mode_for(r),
            _ => FailureMode::Deny,
        }
    }

    /// Answers locally and stops the request.
    fn refuse(
        &mut self,
        refusal: Refusal,
        message: &str,
        remaining: Option<(&str, &str)>,
    ) -> Action {
        let r = reply::build(self.provider(), &refusal, message, remaining);
        info!(
            "caracal: request {} refused with {} ({}): {}",
            self.request_id,
            r.status,
            refusal.code(),
            message
        );
        let headers: Vec<(&str, &str)> = r
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        if let Err(e) = hostcalls::send_http_response(r.status, headers, Some(&r.body)) {
            error!("caracal: cannot send the local reply: {e:?}");
        }
        self.phase = Phase::Refused;
        Action::Pause
    }

    fn resolve_identity(&self, config: &Config, api_key: Option<String>) -> Option<Identity> {
        for source in &config.identity_sources {
            let found = match source {
                IdentitySource::ApiKey => api_key.clone().map(Identity::ApiKey),
                IdentitySource::Spiffe => property(identity::SPIFFE_PROPERTY.to_vec())
                    .and_then(|v| identity::spiffe_from_property(&v))
                    .map(Identity::Spiffe),
                IdentitySource::Jwt => {
                    let claim = |name: &str| {
                        property(
                            identity::jwt_property_path(
                                &config.jwt_metadata_namespace,
                                &config.jwt_payload_key,
                                name,
                            )
                            .to_vec(),
                        )
                    };
                    identity::jwt_identity(
                        claim(&config.jwt_claim),
                        claim(identity::JWT_ISSUER_CLAIM),
                    )
                }
            };
            if found.is_some() {
                return found;
            }
        }
        None
    }

    /// Reads the whole buffered request body, estimates and asks Authorize.
    fn end_of_request_body(&mut self, config: &Config, body_size: usize) -> Action {
        let body = match hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size) {
            Ok(b) => b.unwrap_or_default(),
            Err(e) => {
                error!("caracal: cannot read the request body: {e:?}");
                return self.refuse(
                    Refusal::Unavailable,
                    "The request body could not be read.",
                    None,
                );
            }
        };
        if body.len() as u64 > config.max_body_bytes {
            return self.too_large(config);
        }
        let prepared = match estimate::prepare(self.api, &body, &config.limits()) {
            Ok(p) => p,
            Err(estimate::BadRequest(msg)) => return self.refuse(Refusal::BadRequest, &msg, None),
        };
        let body_len = body.len();
        drop(body);
        if prepared.background && !self.route.as_ref().is_some_and(|r| r.allow_background) {
            return self.refuse(Refusal::InvalidRequest, estimate::BACKGROUND_REFUSED, None);
        }
        if let Some(new_body) = prepared.new_body {
            // content-length was removed with the headers (see on_http_request_headers):
            // the output limit and stream_options may be written in.
            if let Err(e) =
                hostcalls::set_buffer(BufferType::HttpRequestBody, 0, body_len, &new_body)
            {
                // Forwarding without the written limit would let the output exceed
                // the reservation.
                error!("caracal: cannot rewrite the request body: {e:?}");
                return self.refuse(
                    Refusal::Unavailable,
                    "The request body could not be prepared.",
                    None,
                );
            }
            debug!("caracal: request {} body rewritten", self.request_id);
        }
        self.estimate = prepared.estimate;
        self.authorize(config, true)
    }

    fn too_large(&mut self, config: &Config) -> Action {
        let msg = format!(
            "The request body is larger than the {} bytes Caracal accepts.",
            config.max_body_bytes
        );
        self.refuse(Refusal::TooLarge, &msg, None)
    }

    /// Sends Authorize and pauses; `in_callback` = called from a filter callback (so a
    /// synchronous fail-open returns Continue instead of resuming).
    fn authorize(&mut self, config: &Config, in_callback: bool) -> Action {
        let (Some(route), Some(identity)) = (&self.route, &self.identity) else {
            return self.refuse(Refusal::Unavailable, "Internal filter state error.", None);
        };
        let resource = format!("{}{}", route.upstream_host, self.path);
        let message = authz::authorize_request(&CallInfo {
            request_id: &self.request_id,
            identity,
            provider: route.provider.as_str(),
            resource: &resource,
            estimate: &self.estimate,
        });
        debug!(
            "caracal: Authorize request {} ({}, {} {}, model {:?}, ~{}+{} tokens)",
            self.request_id,
            identity.describe(),
            route.provider.as_str(),
            resource,
            self.estimate.model,
            self.estimate.input_tokens,
            self.estimate.output_tokens
        );
        let message = match self.send_on_stream(config, message) {
            Ok(call_id) => {
                count(|m| m.streamed);
                self.phase = Phase::Authorizing(AuthorizeCall::Stream(call_id));
                return Action::Pause;
            }
            Err(message) => message,
        };
        count(|m| m.unary);
        match hostcalls::dispatch_grpc_call(
            &config.authz_upstream,
            authz::SERVICE,
            authz::AUTHORIZE,
            gateway_metadata(config, &self.tags),
            Some(&message),
            config.authz_timeout(),
        ) {
            Ok(token) => {
                self.phase = Phase::Authorizing(AuthorizeCall::Unary(token));
                Action::Pause
            }
            Err(e) => self.authz_failed(&format!("Authorize not dispatched: {e:?}"), in_callback),
        }
    }

    /// Sends an encoded Authorize on the worker's CallStream (see [`Lane`]) and keeps
    /// it (for a clean-end re-send) while its answer is awaited; when no stream is open
    /// it is handed back, to be sent unary (the root's tick is opening one).
    fn send_on_stream(&self, config: &Config, authorize: Vec<u8>) -> Result<u64, Vec<u8>> {
        let open = LANE.with(|l| {
            let mut l = l.borrow_mut();
            match l.state {
                LaneState::Open(token) => {
                    l.next_call_id = l.next_call_id.wrapping_add(1);
                    Ok((token, l.next_call_id))
                }
                LaneState::Unopened => {
                    l.state = LaneState::Closed { retry_at_ms: 0 };
                    Err(true)
                }
                LaneState::Closed { .. } => Err(true),
                LaneState::Opening(_) | LaneState::Unsupported => Err(false),
            }
        });
        let (token, call_id) = match open {
            Ok(open) => open,
            Err(closed) => {
                // The tick opens it (it is on while the stream is closed).
                if closed {
                    start_tick(self.root_id, self.id);
                }
                return Err(authorize);
            }
        };
        let message = authz::stream_authorize_call(call_id, &self.tags, &authorize);
        // The stream is the root's: Envoy looks the token up in the effective context.
        let switched = hostcalls::set_effective_context(self.root_id).is_ok();
        let sent = hostcalls::send_grpc_stream_message(token, Some(&message), false);
        if switched {
            let _ = hostcalls::set_effective_context(self.id);
        }
        let now = now_ms();
        if let Err(e) = sent {
            // The stream is unusable: the root opens another (this one's waiting calls
            // time out); this call goes unary.
            warn!("caracal: cannot send on the Authorize stream: {e:?}");
            LANE.with(|l| {
                let mut l = l.borrow_mut();
                if l.state == LaneState::Open(token) {
                    l.state = LaneState::Closed { retry_at_ms: now };
                }
            });
            start_tick(self.root_id, self.id);
            return Err(authorize);
        }
        let timeout_ms = u64::try_from(config.authz_timeout().as_millis()).unwrap_or(u64::MAX);
        LANE.with(|l| {
            l.borrow_mut().waiting.insert(
                call_id,
                Waiting {
                    filter: self.me.clone(),
                    context_id: self.id,
                    token,
                    sent_ms: now,
                    deadline_ms: now.saturating_add(timeout_ms),
                    authorize,
                    tags: self.tags.clone(),
                },
            )
        });
        start_tick(self.root_id, self.id);
        Ok(call_id)
    }

    /// The root hands over an answer from the CallStream (this context is the
    /// effective one).
    fn on_stream_answer(&mut self, call_id: u64, code: u32, message: &str, body: &[u8]) {
        if self.phase == Phase::Authorizing(AuthorizeCall::Stream(call_id)) {
            self.on_authorize_answer(code, message, body);
        }
    }

    /// The authorization service could not answer: 503, or fail open per route.
    fn authz_failed(&mut self, why: &str, in_callback: bool) -> Action {
        match self.failure_mode() {
            FailureMode::Deny => {
                warn!(
                    "caracal: request {}: {why}; failing closed",
                    self.request_id
                );
                self.refuse(
                    Refusal::Unavailable,
                    "The Caracal budget authorization service is unavailable; try again later.",
                    None,
                )
            }
            FailureMode::Allow => {
                warn!(
                    "caracal: request {}: {why}; failing OPEN, forwarded without a reservation",
                    self.request_id
                );
                self.forward(in_callback)
            }
        }
    }

    fn forward(&mut self, in_callback: bool) -> Action {
        self.phase = Phase::Forwarded;
        if !in_callback {
            if let Err(e) = hostcalls::resume_http_request() {
                error!("caracal: cannot resume the request: {e:?}");
            }
        }
        Action::Continue
    }

    /// An Authorize's answer: gRPC status, its message, and the response when OK.
    fn on_authorize_answer(&mut self, status_code: u32, msg: &str, body: &[u8]) {
        if status_code != 0 {
            match authz::grpc_failure(status_code) {
                CallFailure::Unavailable => {
                    self.release_by_request("authorize_failed");
                    self.authz_failed(
                        &format!("Authorize failed with gRPC status {status_code} {msg}"),
                        false,
                    );
                }
                CallFailure::Refuse(refusal) => {
                    let text = format!("The request was rejected by Caracal: {msg}");
                    self.refuse(refusal, &text, None);
                }
                CallFailure::GatewayRejected => {
                    error!(
                        "caracal: the authz-service does not accept this gateway ({status_code} {msg}): check gateway_token / the mTLS client certificate"
                    );
                    self.refuse(
                        Refusal::Unavailable,
                        "The gateway is not authorized with the Caracal budget service; contact the operator.",
                        None,
                    );
                }
            }
            return;
        }
        match authz::verdict(body) {
            Verdict::Allow {
                reservation_id,
                remaining,
            } => {
                debug!(
                    "caracal: request {} allowed, reservation {reservation_id:?}",
                    self.request_id
                );
                self.reservation_id = (!reservation_id.is_empty()).then_some(reservation_id);
                self.remaining = remaining;
                self.forward(false);
            }
            Verdict::Refuse {
                refusal,
                message,
                remaining,
            } => {
                let remaining = remaining.as_ref().map(|(a, c)| (a.as_str(), c.as_str()));
                self.refuse(refusal, &message, remaining);
            }
            Verdict::Unusable(why) => {
                self.release_by_request("authorize_unusable");
                self.authz_failed(&why, false);
            }
        }
    }

    /// Settles or releases the reservation once.
    fn finish(&mut self, completed: bool) {
        if self.finished || self.phase != Phase::Forwarded {
            return;
        }
        self.finished = true;
        let Some(reservation_id) = self.reservation_id.clone() else {
            debug!("caracal: request {} had no reservation", self.request_id);
            return;
        };
        if let Some(p) = self.parser.as_mut() {
            if completed {
                p.finish();
            }
        }
        let usage = self.parser.as_ref().and_then(UsageParser::usage);
        let estimate = self
            .api
            .reads_body()
            .then(|| authz::estimated_usage(&self.estimate));
        let provider = self.provider().as_str();
        match authz::outcome(self.status, usage, completed, estimate) {
            Outcome::Settle(u) => {
                if usage.is_none() {
                    warn!(
                        "caracal: request {}: no usage in the response, settling the estimate",
                        self.request_id
                    );
                }
                let msg =
                    authz::settle_request(&reservation_id, &u, provider, &self.estimate.model);
                self.send_detached(authz::SETTLE, msg, reservation_id);
            }
            Outcome::Release(reason) => {
                let msg = authz::release_request(&reservation_id, reason);
                self.send_detached(authz::RELEASE, msg, reservation_id);
            }
        }
    }

    /// An Authorize was sent but its answer is lost (failed, timed out, unusable, or
    /// the client left): whatever it may have reserved is released by request id (the
    /// service also refuses to reserve for that id afterwards).
    fn release_by_request(&self, reason: &str) {
        let Some(identity) = &self.identity else {
            return;
        };
        let msg = authz::release_by_request_request(&self.request_id, identity, reason);
        self.send_detached(authz::RELEASE_BY_REQUEST, msg, self.request_id.clone());
    }

    /// The agent call's W3C traceparent: its own when valid; otherwise, when
    /// `trace_sampling_ratio` is above 0, a new trace, set on the request so the
    /// provider sees the same one.
    fn trace_of(&self, headers: &[(String, Vec<u8>)], config: &Config) -> Option<String> {
        let given = header(headers, authz::TRACEPARENT);
        if let Some(tp) = given.as_deref().and_then(authz::valid_traceparent) {
            return Some(tp.to_owned());
        }
        if config.trace_sampling_ratio <= 0.0 {
            return None;
        }
        // 53 random bits as a uniform value in [0, 1).
        let draw = (nonce() >> 11) as f64 / (1u64 << 53) as f64;
        let tp = authz::new_traceparent(
            [nonce(), nonce(), nonce()],
            draw < config.trace_sampling_ratio,
        );
        if let Err(e) =
            hostcalls::set_map_value(MapType::HttpRequestHeaders, authz::TRACEPARENT, Some(&tp))
        {
            warn!("caracal: cannot set the traceparent header: {e:?}");
        }
        Some(tp)
    }

    /// Hands a Settle / Release / ReleaseByRequest to the root context, which sends
    /// it (and retries it) independently of this stream.
    fn send_detached(&self, method: &'static str, message: Vec<u8>, label: String) {
        enqueue(
            Job {
                method,
                message,
                label,
                tags: self.tags.clone(),
                attempts: 0,
                due_ms: 0,
            },
            self.root_id,
            self.id,
        );
    }
}

impl Context for FilterContext {
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        self.with(Action::Continue, |f| {
            f.on_grpc_call_response(token_id, status_code, response_size);
            Action::Continue
        });
    }
}

impl HttpContext for FilterContext {
    fn on_http_request_headers(&mut self, num_headers: usize, end_of_stream: bool) -> Action {
        self.with(Action::Pause, |f| {
            f.on_http_request_headers(num_headers, end_of_stream)
        })
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.with(Action::Pause, |f| {
            f.on_http_request_body(body_size, end_of_stream)
        })
    }

    fn on_http_request_trailers(&mut self, num_trailers: usize) -> Action {
        self.with(Action::Pause, |f| f.on_http_request_trailers(num_trailers))
    }

    fn on_http_response_headers(&mut self, num_headers: usize, end_of_stream: bool) -> Action {
        self.with(Action::Continue, |f| {
            f.on_http_response_headers(num_headers, end_of_stream)
        })
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.with(Action::Continue, |f| {
            f.on_http_response_body(body_size, end_of_stream)
        })
    }

    fn on_http_response_trailers(&mut self, num_trailers: usize) -> Action {
        self.with(Action::Continue, |f| {
            f.on_http_response_trailers(num_trailers)
        })
    }

    fn on_log(&mut self) {
        self.with(Action::Continue, |f| {
            f.on_log();
            Action::Continue
        });
    }
}

/// The HTTP callbacks, called through [`FilterContext`].
impl Filter {
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        if self.phase == Phase::Authorizing(AuthorizeCall::Unary(token_id)) {
            let (code, message, body) = unary_answer(status_code, response_size);
            self.on_authorize_answer(code, &message, &body);
        } else if status_code != 0 {
            // A Settle / Release answer that arrived while this stream still lives.
            warn!("caracal: Settle/Release call {token_id} failed with gRPC status {status_code}");
        }
    }

    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let Some(config) = self.config.clone() else {
            return self.refuse(
                Refusal::Unavailable,
                "The Caracal filter is not configured.",
                None,
            );
        };
        let headers = match hostcalls::get_map_bytes(MapType::HttpRequestHeaders) {
            Ok(h) => h,
            Err(e) => {
                error!("caracal: cannot read request headers: {e:?}");
                return self.refuse(Refusal::Unavailable, "Request headers unreadable.", None);
            }
        };
        // A path that is not text cannot be matched against the routes: refused, never
        // passed through (it would reach the provider unmetered).
        let path = match headers.iter().find(|(k, _)| k == ":path") {
            None => String::new(),
            Some((_, v)) => match std::str::from_utf8(v) {
                Ok(p) => p.to_owned(),
                Err(_) => {
                    return self.refuse(
                        Refusal::NoRoute,
                        "The request path is not valid UTF-8.",
                        None,
                    )
                }
            },
        };
        let Some(route) = config.match_route(&path) else {
            if config.refuse_unmatched {
                return self.refuse(
                    Refusal::NoRoute,
                    "This gateway meters LLM API routes only; the path matches none.",
                    None,
                );
            }
            return Action::Continue;
        };
        self.route = Some(route.clone());
        let method = header(&headers, ":method").unwrap_or_default();
        self.api = Api::for_request(&method, &path);
        self.path = strip_query(&path).to_owned();
        self.tags.x_request_id = header(&headers, "x-request-id")
            .map(|id| id.trim().to_owned())
            .filter(|id| authz::valid_request_id(id));
        self.request_id = authz::request_id(self.tags.x_request_id.as_deref(), nonce());
        self.tags.traceparent = self.trace_of(&headers, &config);

        let plan = identity::plan_request_headers(&headers);
        for name in &plan.remove {
            if let Err(e) = hostcalls::remove_map_value(MapType::HttpRequestHeaders, name) {
                error!("caracal: cannot remove request header {name}: {e:?}");
                return self.refuse(
                    Refusal::Unavailable,
                    "Request headers could not be sanitized.",
                    None,
                );
            }
        }
        self.identity = self.resolve_identity(&config, plan.api_key);
        if self.identity.is_none() {
            let msg = identity::missing_identity_message(&config.identity_sources);
            return self.refuse(Refusal::Unauthenticated, &msg, None);
        }
        let declared_len =
            header(&headers, "content-length").and_then(|v| v.trim().parse::<u64>().ok());
        if self.api.reads_body() && declared_len.is_some_and(|n| n > config.max_body_bytes) {
            return self.too_large(&config);
        }
        if !self.api.reads_body() {
            // Non-token endpoint: authorize now, without reading the body.
            return self.authorize(&config, true);
        }
        if end_of_stream {
            return self.refuse(Refusal::BadRequest, "The request body is missing.", None);
        }
        if self.api.may_change_body() {
            // The body may grow (output limit, stream_options); the headers leave
            // before it is read.
            if let Err(e) =
                hostcalls::remove_map_value(MapType::HttpRequestHeaders, "content-length")
            {
                warn!("caracal: cannot remove content-length: {e:?}");
            }
        }
        // Envoy turns a paused header callback into "stop everything", which would keep
        // the body from this filter too. So the headers continue (the router may open the
        // upstream request) and the BODY is held (Pause in on_http_request_body) until
        // Authorize allows it; a refusal resets the upstream request before any body.
        self.phase = Phase::AwaitingBody;
        Action::Continue
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        match self.phase {
            Phase::AwaitingBody => {
                let Some(config) = self.config.clone() else {
                    return Action::Pause;
                };
                if body_size as u64 > config.max_body_bytes {
                    return self.too_large(&config);
                }
                if !end_of_stream {
                    return Action::Pause;
                }
                self.end_of_request_body(&config, body_size)
            }
            Phase::Authorizing(_) | Phase::Refused => Action::Pause,
            Phase::PassThrough | Phase::Forwarded => Action::Continue,
        }
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        match self.phase {
            Phase::AwaitingBody => {
                let Some(config) = self.config.clone() else {
                    return Action::Pause;
                };
                // The body ended without end_of_stream (trailers follow): read it all.
                let size = usize::try_from(config.max_body_bytes)
                    .unwrap_or(usize::MAX)
                    .saturating_add(1);
                self.end_of_request_body(&config, size)
            }
            Phase::Authorizing(_) | Phase::Refused => Action::Pause,
            Phase::PassThrough | Phase::Forwarded => Action::Continue,
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        if self.phase != Phase::Forwarded {
            return Action::Continue;
        }
        let headers = hostcalls::get_map_bytes(MapType::HttpResponseHeaders).unwrap_or_default();
        self.status = header(&headers, ":status").and_then(|s| s.parse().ok());
        // Upstream must not speak for Caracal.
        for (name, _) in &headers {
            if name
                .to_ascii_lowercase()
                .starts_with(identity::CARACAL_HEADER_PREFIX)
            {
                let _ = hostcalls::remove_map_value(MapType::HttpResponseHeaders, name);
            }
        }
        if let Some(remaining) = &self.remaining {
            let _ = hostcalls::set_map_value(
                MapType::HttpResponseHeaders,
                REMAINING_BUDGET_HEADER,
                Some(remaining),
            );
        }
        if let Some(id) = &self.reservation_id {
            let _ = hostcalls::set_map_value(
                MapType::HttpResponseHeaders,
                RESERVATION_ID_HEADER,
                Some(id),
            );
        }
        let encoded = header(&headers, "content-encoding")
            .is_some_and(|e| !e.trim().is_empty() && !e.trim().eq_ignore_ascii_case("identity"));
        if encoded {
            warn!(
                "caracal: request {}: compressed response, usage unreadable",
                self.request_id
            );
        } else if self.reservation_id.is_some() {
            let ct = header(&headers, "content-type").unwrap_or_default();
            self.parser = Some(UsageParser::for_content_type(&ct));
        }
        if end_of_stream {
            self.response_complete = true;
            self.finish(true);
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.phase != Phase::Forwarded || self.finished {
            return Action::Continue;
        }
        if let Some(parser) = self.parser.as_mut() {
            if body_size > 0 {
                match hostcalls::get_buffer(BufferType::HttpResponseBody, 0, body_size) {
                    Ok(Some(chunk)) => parser.feed(&chunk),
                    Ok(None) => {}
                    Err(e) => warn!("caracal: cannot read a response chunk: {e:?}"),
                }
            }
        }
        if end_of_stream {
            self.response_complete = true;
            self.finish(true);
        }
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        if self.phase == Phase::Forwarded {
            self.response_complete = true;
            self.finish(true);
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        match self.phase {
            Phase::Forwarded if !self.finished => {
                debug!(
                    "caracal: request {} ended before its response did",
                    self.request_id
                );
                self.finish(self.response_complete);
            }
            Phase::Authorizing(_) => {
                debug!(
                    "caracal: request {} aborted while Authorize was in flight",
                    self.request_id
                );
                // Envoy cancels the call, but the service may have reserved already.
                self.release_by_request("client_abort");
            }
            Phase::AwaitingBody => debug!(
                "caracal: request {} aborted before authorization started",
                self.request_id
            ),
            _ => {}
        }
    }
}

/// The metadata of every call to the authz-service: Envoy's `x-request-id` of the
/// agent call (for tracing) and the gateway token (when configured: it
/// authenticates the gateway).
fn gateway_metadata<'a>(config: &'a Config, tags: &'a authz::CallTags) -> Vec<(&'a str, &'a [u8])> {
    let mut m = Vec::with_capacity(3);
    if let Some(id) = &tags.x_request_id {
        m.push(("x-request-id", id.as_bytes()));
    }
    if let Some(tp) = &tags.traceparent {
        m.push((authz::TRACEPARENT, tp.as_bytes()));
    }
    if let Some(token) = config.gateway_token() {
        m.push((GATEWAY_TOKEN_METADATA, token.as_bytes()));
    }
    m
}

/// A unary Authorize's answer as (gRPC status, its message, the response): an
/// unreadable response counts as UNAVAILABLE (released by request id, then failed
/// closed or open like any failed call).
fn unary_answer(status_code: u32, response_size: usize) -> (u32, String, Vec<u8>) {
    if status_code != 0 {
        return (status_code, grpc_status_message(), Vec::new());
    }
    match hostcalls::get_buffer(BufferType::GrpcReceiveBuffer, 0, response_size) {
        Ok(b) => (0, String::new(), b.unwrap_or_default()),
        Err(e) => (
            UNAVAILABLE,
            format!("Authorize answer unreadable: {e:?}"),
            Vec::new(),
        ),
    }
}

/// The message of the gRPC status of the call being answered ("" when none).
fn grpc_status_message() -> String {
    hostcalls::get_grpc_status()
        .ok()
        .and_then(|(_, m)| m)
        .unwrap_or_default()
}

/// A property value, `None` when absent or on a host error.
fn property(path: Vec<&str>) -> Option<Vec<u8>> {
    hostcalls::get_property(path).ok().flatten()
}

/// A header value as text (first occurrence), `None` when absent or not UTF-8.
fn header(headers: &[(String, Vec<u8>)], name: &str) -> Option<String> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .and_then(|(_, v)| String::from_utf8(v.clone()).ok())
}

/// A random per-call value: std's `RandomState` is seeded from the host's randomness
/// (WASI `random_get`) and stepped per instance; time and a counter are mixed in.
fn nonce() -> u64 {
    let n = REQUEST_COUNTER.with(|c| {
        let n = c.get().wrapping_add(1);
        c.set(n);
        n
    });
    let nanos = hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .unwrap_or(Duration::ZERO)
        .as_nanos();
    let mut h = RandomState::new().build_hasher();
    h.write_u64(n);
    h.write_u128(nanos);
    h.finish()
}
