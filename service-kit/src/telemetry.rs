//! Logs and OpenTelemetry traces, set up once per process.
//!
//! Traces are off by default (`tracing.enabled`). When on, one agent call is one
//! trace: the gateway's W3C `traceparent` reaches the authz-service with each
//! Authorize and Settle, the reservation carries the Authorize span's context into
//! its outbox events, the relay sends it on as a Kafka header, and each consumer's
//! write is a span of that trace. Spans go to an OTLP/gRPC collector in batches.
//!
//! Only the spans made here ([`span`]) are exported: they use their own target,
//! [`TARGET`], and the OpenTelemetry layer sees nothing else, so a library's spans
//! or a verbose `RUST_LOG` never turn into traces. When tracing is off the hot
//! path pays one relaxed atomic load per call ([`enabled`]) and makes no span.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider,
};
use serde::Deserialize;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{filter, EnvFilter, Layer as _};

use crate::config::{ConfigError, EnvOverrides};

/// The `tracing` target of the spans that become OpenTelemetry spans.
pub const TARGET: &str = "caracal_trace";

/// The W3C Trace Context header (and gRPC metadata key, and Kafka header).
pub const TRACEPARENT: &str = "traceparent";

static ENABLED: AtomicBool = AtomicBool::new(false);

/// `tracing:` in every process's configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct TracingConfig {
    /// Export spans (default off).
    pub enabled: bool,
    /// The OTLP/gRPC collector, `http://host:4317` (or `https://`).
    pub endpoint: String,
    /// The share of the traces this process starts that are kept (0.0-1.0). A
    /// call that arrives with a `traceparent` follows its caller's decision, so one
    /// trace is kept or dropped as a whole.
    pub sampling_ratio: f64,
    /// `service.name` of the spans; empty: the process's own name.
    pub service_name: String,
    /// How long finished spans wait to be sent as one batch (ms).
    pub export_interval_ms: u64,
    /// Deadline of one export call (ms): a collector that hangs costs no more.
    pub export_timeout_ms: u64,
}

impl Default for TracingConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            endpoint: "http://127.0.0.1:4317".to_owned(),
            sampling_ratio: 0.1,
            service_name: String::new(),
            export_interval_ms: 5000,
            export_timeout_ms: 10_000,
        }
    }
}

impl TracingConfig {
    /// `CARACAL_TRACING_*` overrides.
    pub fn apply_env<F: Fn(&str) -> Option<String>>(
        &mut self,
        env: &EnvOverrides<F>,
    ) -> Result<(), ConfigError> {
        env.parse("CARACAL_TRACING_ENABLED", &mut self.enabled)?;
        env.text("CARACAL_TRACING_ENDPOINT", &mut self.endpoint);
        env.parse("CARACAL_TRACING_SAMPLING_RATIO", &mut self.sampling_ratio)?;
        env.text("CARACAL_TRACING_SERVICE_NAME", &mut self.service_name);
        env.parse(
            "CARACAL_TRACING_EXPORT_INTERVAL_MS",
            &mut self.export_interval_ms,
        )?;
        env.parse(
            "CARACAL_TRACING_EXPORT_TIMEOUT_MS",
            &mut self.export_timeout_ms,
        )?;
        Ok(())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(0.0..=1.0).contains(&self.sampling_ratio) {
            return Err(ConfigError::Invalid(format!(
                "tracing.samplingRatio must be between 0 and 1, got {}",
                self.sampling_ratio
            )));
        }
        if self.export_interval_ms == 0 || self.export_timeout_ms == 0 {
            return Err(ConfigError::Invalid(
                "tracing.exportIntervalMs and exportTimeoutMs must be at least 1".to_owned(),
            ));
        }
        if self.enabled
            && !(self.endpoint.starts_with("http://") || self.endpoint.starts_with("https://"))
        {
            return Err(ConfigError::Invalid(format!(
                "tracing.endpoint must be an http:// or https:// URL, got {:?}",
                self.endpoint
            )));
        }
        Ok(())
    }
}

/// Trace export could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("OTLP exporter for {endpoint}: {reason}")]
    Exporter { endpoint: String, reason: String },
    #[error("a global tracing subscriber is already set: {0}")]
    Subscriber(String),
}

/// The process's trace pipeline; [`Telemetry::shutdown`] sends what is left.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Sends the spans not yet exported and stops the exporter. Blocking: call it
    /// off the async runtime's threads (`spawn_blocking`), while the runtime still
    /// runs (the gRPC exporter's connection lives there).
    pub fn shutdown(self) {
        ENABLED.store(false, Ordering::Relaxed);
        if let Some(provider) = self.provider {
            if let Err(e) = provider.shutdown() {
                tracing::warn!(error = %e, "trace exporter shutdown");
            }
        }
    }

    /// [`Self::shutdown`] from async code.
    pub async fn shutdown_async(self) {
        let _ = tokio::task::spawn_blocking(move || self.shutdown()).await;
    }
}

/// Installs the global subscriber: logs (text or JSON lines, filtered by
/// `RUST_LOG`, default `info`) and, when `config.enabled`, the span exporter.
/// With tracing on it must run inside the Tokio runtime (the exporter's gRPC
/// channel is made there).
pub fn init(
    json: bool,
    config: &TracingConfig,
    default_service: &str,
) -> Result<Telemetry, TelemetryError> {
    let mut log_filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Our trace spans are for the exporter, not for the log lines.
    if let Ok(off) = format!("{TARGET}=off").parse() {
        log_filter = log_filter.add_directive(off);
    }
    let logs = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .with_filter(log_filter)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_filter(log_filter)
            .boxed()
    };
    let (provider, traces) = if config.enabled {
        let provider = provider(config, default_service)?;
        let tracer = provider.tracer("caracal");
        let only_ours = filter::Targets::new().with_target(TARGET, filter::LevelFilter::INFO);
        // Spans carry what names the call (set by the code that makes them), not
        // the source location, thread or busy/idle times of the `tracing` span.
        let layer = tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_location(false)
            .with_threads(false)
            .with_tracked_inactivity(false)
            .with_target(false)
            .with_filter(only_ours)
            .boxed();
        (Some(provider), Some(layer))
    } else {
        (None, None)
    };
    tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init()
        .map_err(|e| TelemetryError::Subscriber(e.to_string()))?;
    ENABLED.store(provider.is_some(), Ordering::Relaxed);
    Ok(Telemetry { provider })
}

/// Runs `work` on `runtime` the way every Caracal process does: logs and traces
/// set up first ([`init`], inside the runtime: the exporter's channel lives
/// there), the spans not yet exported flushed after it.
pub fn block_on<T, E: From<TelemetryError>>(
    runtime: &tokio::runtime::Runtime,
    json: bool,
    config: &TracingConfig,
    default_service: &str,
    work: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let telemetry = {
        let _entered = runtime.enter();
        init(json, config, default_service)?
    };
    runtime.block_on(async move {
        let result = work.await;
        telemetry.shutdown_async().await;
        result
    })
}

fn provider(
    config: &TracingConfig,
    default_service: &str,
) -> Result<SdkTracerProvider, TelemetryError> {
    use opentelemetry_otlp::WithExportConfig as _;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(config.endpoint.clone())
        .with_timeout(Duration::from_millis(config.export_timeout_ms))
        .build()
        .map_err(|e| TelemetryError::Exporter {
            endpoint: config.endpoint.clone(),
            reason: e.to_string(),
        })?;
    let batches = BatchConfigBuilder::default()
        .with_scheduled_delay(Duration::from_millis(config.export_interval_ms))
        .build();
    let name = if config.service_name.is_empty() {
        default_service.to_owned()
    } else {
        config.service_name.clone()
    };
    Ok(SdkTracerProvider::builder()
        .with_span_processor(
            BatchSpanProcessor::builder(exporter)
                .with_batch_config(batches)
                .build(),
        )
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            config.sampling_ratio,
        ))))
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(name)
                .build(),
        )
        .build())
}

/// Whether spans are exported (false until [`init`] with tracing on).
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// What a span is to the call it stands for (OpenTelemetry's span kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Serves a request (Authorize, Settle).
    Server,
    /// Hands a message to the broker (the outbox relay).
    Producer,
    /// Works on a consumed message (a consumer's write).
    Consumer,
}

/// A span named `name`, child of the W3C `traceparent` given (a new trace, sampled
/// by `tracing.samplingRatio`, when there is none or it does not parse), or
/// `Span::none()` when tracing is off.
pub fn span(name: &'static str, kind: Kind, traceparent: Option<&str>) -> tracing::Span {
    if !enabled() {
        return tracing::Span::none();
    }
    let kind = match kind {
        Kind::Server => "server",
        Kind::Producer => "producer",
        Kind::Consumer => "consumer",
    };
    let span = tracing::info_span!(target: TARGET, "caracal", otel.name = name, otel.kind = kind);
    if let Some(parent) = traceparent.and_then(parent_context) {
        let _ = span.set_parent(parent);
    }
    span
}

/// Sets an attribute of a span made by [`span`] (nothing when tracing is off).
pub fn attribute(span: &tracing::Span, key: &'static str, value: impl Into<String>) {
    if enabled() && !span.is_none() {
        span.set_attribute(key, value.into());
    }
}

/// The context a W3C `traceparent` names, when it is valid.
fn parent_context(traceparent: &str) -> Option<opentelemetry::Context> {
    let carrier: HashMap<String, String> =
        HashMap::from([(TRACEPARENT.to_owned(), traceparent.trim().to_owned())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    cx.span().span_context().is_valid().then_some(cx)
}

/// The `traceparent` of `span`, to hand to the next hop: `None` when tracing is
/// off or the span is not sampled (an unsampled trace is not carried further:
/// nothing of it is exported anyway).
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    if !enabled() || span.is_none() {
        return None;
    }
    let cx = span.context();
    if !cx.span().span_context().is_sampled() {
        return None;
    }
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove(TRACEPARENT)
}

/// The `traceparent` of the span the current task runs in (see [`traceparent`]).
pub fn current_traceparent() -> Option<String> {
    if !enabled() {
        return None;
    }
    traceparent(&tracing::Span::current())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_off_and_valid() {
        let c = TracingConfig::default();
        assert!(!c.enabled);
        c.validate().unwrap();
    }

    #[test]
    fn odd_settings_are_refused() {
        let mut c = TracingConfig {
            sampling_ratio: 1.5,
            ..TracingConfig::default()
        };
        assert!(c.validate().is_err());
        c.sampling_ratio = 0.5;
        c.enabled = true;
        c.endpoint = "127.0.0.1:4317".to_owned();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("tracing.endpoint"), "{err}");
    }

    #[test]
    fn env_overrides_apply() {
        let vars = HashMap::from([
            ("CARACAL_TRACING_ENABLED", "true"),
            ("CARACAL_TRACING_SAMPLING_RATIO", "0.25"),
            ("CARACAL_TRACING_ENDPOINT", "http://127.0.0.1:14317"),
        ]);
        let env = EnvOverrides::new(|n: &str| vars.get(n).map(|v| (*v).to_owned()));
        let mut c = TracingConfig::default();
        c.apply_env(&env).unwrap();
        assert!(c.enabled);
        assert_eq!(c.sampling_ratio, 0.25);
        assert_eq!(c.endpoint, "http://127.0.0.1:14317");
        let bad = EnvOverrides::new(|n: &str| {
            (n == "CARACAL_TRACING_SAMPLING_RATIO").then(|| "lots".to_owned())
        });
        assert!(c.apply_env(&bad).is_err());
    }

    #[test]
    fn traceparents_parse_only_when_valid() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = parent_context(good).unwrap();
        assert_eq!(
            cx.span().span_context().trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert!(cx.span().span_context().is_sampled());
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        ] {
            assert!(parent_context(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn off_means_no_span_and_no_context() {
        // `init` never ran in this test binary: tracing is off.
        let s = span(
            "Authorize",
            Kind::Server,
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        assert!(s.is_none());
        assert_eq!(traceparent(&s), None);
        assert_eq!(current_traceparent(), None);
    }
}
