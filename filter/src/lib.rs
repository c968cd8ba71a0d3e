//! Caracal's Envoy proxy-wasm HTTP filter: puts a hard spending limit on every AI agent
//! call that passes through Envoy.
//!
//! For each request on a configured LLM route the filter identifies the agent from a
//! trusted source, strips client-supplied `x-caracal-*` headers and the agent key,
//! estimates the call from the body, reserves the estimate with
//! `caracal.v1.BudgetAuthorization/Authorize`, and answers refusals locally in the
//! provider's error format. On the way back it adds `x-caracal-remaining-budget` and
//! `x-caracal-reservation-id`, reads the token usage from the JSON or event-stream
//! body as it passes, and calls `Settle` (or `Release`).
//!
//! Build: `cargo build -p caracal-filter --target wasm32-wasip1 --profile wasm`
//! (`target/wasm32-wasip1/wasm/caracal_filter.wasm`).

/// Authorize / Settle / Release messages and what their answers mean.
pub mod authz;
/// The plugin configuration (JSON) and route matching.
pub mod config;
/// Request body -> model and token estimate; streaming usage switched on.
pub mod estimate;
/// Agent identity (API key, SPIFFE, JWT claim) and request header hygiene.
pub mod identity;
/// Local error replies in the provider's own format.
pub mod reply;
/// Token usage from JSON and server-sent-event response bodies, incrementally.
pub mod usage;

/// The proxy-wasm callbacks (wasm builds only).
#[cfg(target_arch = "wasm32")]
mod glue;
