//! Telemetry: logging setup, and one OpenTelemetry span per event.
//!
//! Owns the tracer and the W3C `traceparent` propagation through Kafka
//! headers. Spans are exported over OTLP (HTTP/protobuf) when the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is
//! set; otherwise each event's span data is only logged, at debug level, under
//! the `orderly::event` target.
//!
//! Span names and attributes follow OpenTelemetry's messaging semantic
//! conventions (`process <topic>`, `messaging.*`); orderly's own attributes
//! are under `orderly.*`.
//!
//! A span is built once the event is durable, with explicit timestamps: it
//! starts when the message was received, carries `orderly.occurred_at`,
//! `orderly.read_start` and `orderly.write_start` (ms since the Unix epoch,
//! plus span events at the exact instants), and ends when the batch holding
//! the event was flushed. Its parent is the span named by the message's
//! `traceparent` header, when there is one.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, SpanKind, TraceContextExt, Tracer, TracerProvider as _};
use opentelemetry::{Context, Key, KeyValue};
use opentelemetry_sdk::Resource;
use opentelemetry_semantic_conventions as semconv;
use semconv::attribute as attr;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

static TRACER: OnceLock<SdkTracer> = OnceLock::new();

/// Telemetry that must be shut down to flush spans.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// How log lines are written to stderr: `ORDERLY_LOG_FORMAT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable text (the default), coloured only on a terminal.
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

impl LogFormat {
    /// Reads `ORDERLY_LOG_FORMAT` (`text` or `json`; unset: text).
    pub fn from_env() -> Result<LogFormat, TelemetryError> {
        match std::env::var("ORDERLY_LOG_FORMAT").as_deref() {
            Err(_) | Ok("") | Ok("text") => Ok(LogFormat::Text),
            Ok("json") => Ok(LogFormat::Json),
            Ok(other) => Err(TelemetryError::LogFormat(other.to_owned())),
        }
    }
}

/// Telemetry setup failed.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter could not be built from the `OTEL_EXPORTER_OTLP_*` variables.
    #[error("cannot build the OTLP span exporter from OTEL_EXPORTER_OTLP_* variables: {0}")]
    Exporter(String),
    /// `ORDERLY_LOG_FORMAT` names no known format.
    #[error("ORDERLY_LOG_FORMAT={0:?}: expected `text` or `json`")]
    LogFormat(String),
}

/// Sets up logging (`RUST_LOG`, else `default_log`) and, if an OTLP endpoint
/// is configured, span export. Call it before starting any async runtime: the
/// HTTP exporter's blocking client must not be created inside one.
pub fn init(instance_id: &str, default_log: &str) -> Result<Telemetry, TelemetryError> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_log));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let format = LogFormat::from_env()?;
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
    let configured = [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()));
    if !configured {
        tracing::info!("OTEL_EXPORTER_OTLP_ENDPOINT is not set: event spans are only logged (debug, target orderly::event)");
        return Ok(Telemetry { provider: None });
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource(instance_id))
        .build();
    let _ = TRACER.set(provider.tracer("orderly"));
    tracing::info!("exporting event spans over OTLP");
    Ok(Telemetry {
        provider: Some(provider),
    })
}

/// The resource of every span: what `OTEL_SERVICE_NAME` and
/// `OTEL_RESOURCE_ATTRIBUTES` say, and for what they leave unsaid,
/// `service.name = orderly`, the crate's `service.version` and
/// `service.instance.id = instance_id`.
fn resource(instance_id: &str) -> Resource {
    let detected = Resource::builder().build();
    let unset = |key: &'static str| detected.get(&Key::from_static_str(key)).is_none();
    let mut ours = Vec::new();
    let service_named = std::env::var_os("OTEL_SERVICE_NAME").is_some_and(|v| !v.is_empty())
        || detected
            .get(&Key::from_static_str(semconv::resource::SERVICE_NAME))
            .is_some_and(|v| !v.as_str().starts_with("unknown_service"));
    if !service_named {
        ours.push(KeyValue::new(semconv::resource::SERVICE_NAME, "orderly"));
    }
    if unset(semconv::resource::SERVICE_VERSION) {
        ours.push(KeyValue::new(
            semconv::resource::SERVICE_VERSION,
            env!("CARGO_PKG_VERSION"),
        ));
    }
    if unset(semconv::resource::SERVICE_INSTANCE_ID) {
        ours.push(KeyValue::new(
            semconv::resource::SERVICE_INSTANCE_ID,
            instance_id.to_owned(),
        ));
    }
    Resource::builder().with_attributes(ours).build()
}

impl Telemetry {
    /// Flushes and stops span export.
    pub fn shutdown(mut self) {
        if let Some(p) = self.provider.take() {
            if let Err(e) = p.shutdown() {
                tracing::warn!(error = %e, "span export did not shut down cleanly; some spans may be lost");
            }
        }
    }
}

/// Whether per-event span data must be collected: spans are exported, or
/// debug logging of events is on.
pub fn spans_wanted() -> bool {
    TRACER.get().is_some() || tracing::enabled!(target: "orderly::event", tracing::Level::DEBUG)
}

/// Reads the W3C trace context from Kafka headers given as name/value pairs.
pub fn parent_from_headers<'a>(
    headers: impl Iterator<Item = (&'a str, &'a [u8])>,
) -> Option<SpanContext> {
    struct Headers<'a>(Vec<(&'a str, &'a str)>);
    impl Extractor for Headers<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            self.0
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(key))
                .map(|(_, v)| *v)
        }
        fn keys(&self) -> Vec<&str> {
            self.0.iter().map(|(k, _)| *k).collect()
        }
    }
    let pairs: Vec<(&str, &str)> = headers
        .filter(|(k, _)| {
            k.eq_ignore_ascii_case("traceparent") || k.eq_ignore_ascii_case("tracestate")
        })
        .filter_map(|(k, v)| Some((k, std::str::from_utf8(v).ok()?)))
        .collect();
    if pairs.is_empty() {
        return None;
    }
    let cx = TraceContextPropagator::new().extract(&Headers(pairs));
    let sc = cx.span().span_context().clone();
    sc.is_valid().then_some(sc)
}

/// The trace id a message's `traceparent` header names, for log lines about
/// that message, so a log search by trace id finds them beside its span.
pub fn trace_id_in(headers: &[(String, Vec<u8>)]) -> Option<String> {
    parent_from_headers(headers.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
        .map(|sc| sc.trace_id().to_string())
}

/// Writes `traceparent` (and `tracestate`) for `cx` as Kafka header pairs.
pub fn inject_headers(cx: &Context) -> Vec<(String, String)> {
    struct Out(Vec<(String, String)>);
    impl Injector for Out {
        fn set(&mut self, key: &str, value: String) {
            self.0.push((key.to_owned(), value));
        }
    }
    let mut out = Out(Vec::new());
    TraceContextPropagator::new().inject_context(cx, &mut out);
    out.0
}

/// Starts a producer span for one message sent to `topic`, when spans are
/// exported. Inject its context into the message's headers with
/// [`inject_headers`], and end it (`cx.span().end()`) once the message is sent.
pub fn start_send_span(topic: &str, entity_id: Option<&str>) -> Option<Context> {
    let tracer = TRACER.get()?;
    let mut attributes = vec![
        KeyValue::new(attr::MESSAGING_SYSTEM, "kafka"),
        KeyValue::new(attr::MESSAGING_OPERATION_TYPE, "send"),
        KeyValue::new(attr::MESSAGING_OPERATION_NAME, "send"),
        KeyValue::new(attr::MESSAGING_DESTINATION_NAME, topic.to_owned()),
    ];
    if let Some(id) = entity_id {
        attributes.push(KeyValue::new(attr::MESSAGING_KAFKA_MESSAGE_KEY, id.to_owned()));
        attributes.push(KeyValue::new(ENTITY_ID, id.to_owned()));
    }
    let span = tracer
        .span_builder(format!("send {topic}"))
        .with_kind(SpanKind::Producer)
        .with_attributes(attributes)
        .start(tracer);
    Some(Context::new().with_span(span))
}

/// What a span needs to know about one event, gathered along the pipeline.
#[derive(Clone, Debug)]
pub struct SpanInfo {
    /// The parent from `traceparent`, if any.
    pub parent: Option<SpanContext>,
    /// When the actor started reading the entity.
    pub read_start: SystemTime,
    /// When the actor handed the write intent to the writer.
    pub write_start: SystemTime,
    /// Kafka topic.
    pub topic: std::sync::Arc<str>,
    /// Kafka partition.
    pub partition: i32,
    /// Kafka offset.
    pub offset: i64,
    /// Entity id, tenant id, event id and type (empty when undecodable).
    pub entity_id: String,
    /// Tenant id.
    pub tenant_id: String,
    /// Event id.
    pub event_id: String,
    /// Event type.
    pub event_type: String,
    /// The external timestamp, ms.
    pub occurred_at: i64,
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// orderly's own span attributes; the rest follow the OpenTelemetry
/// messaging conventions.
pub const ENTITY_ID: &str = "orderly.entity.id";
/// The event's tenant.
pub const TENANT_ID: &str = "orderly.tenant.id";
/// The event's own id.
pub const EVENT_ID: &str = "orderly.event.id";
/// The event's type.
pub const EVENT_TYPE: &str = "orderly.event.type";

/// Emits the span of one event of consumer group `group`, received at
/// `received_at` (the span's start), that became durable at `durable_at`
/// with `outcome`.
pub fn record_event_span(
    info: &SpanInfo,
    received_at: SystemTime,
    group: &str,
    outcome: &str,
    durable_at: SystemTime,
) {
    let mut attributes = vec![
        KeyValue::new(attr::MESSAGING_SYSTEM, "kafka"),
        KeyValue::new(attr::MESSAGING_OPERATION_TYPE, "process"),
        KeyValue::new(attr::MESSAGING_OPERATION_NAME, "process"),
        KeyValue::new(attr::MESSAGING_DESTINATION_NAME, info.topic.to_string()),
        KeyValue::new(attr::MESSAGING_CONSUMER_GROUP_NAME, group.to_owned()),
        KeyValue::new(
            attr::MESSAGING_DESTINATION_PARTITION_ID,
            info.partition.to_string(),
        ),
        KeyValue::new(attr::MESSAGING_KAFKA_OFFSET, info.offset),
        KeyValue::new(ENTITY_ID, info.entity_id.clone()),
        KeyValue::new(TENANT_ID, info.tenant_id.clone()),
        KeyValue::new(EVENT_ID, info.event_id.clone()),
        KeyValue::new(EVENT_TYPE, info.event_type.clone()),
        KeyValue::new("orderly.occurred_at", info.occurred_at),
        KeyValue::new("orderly.read_start", unix_ms(info.read_start)),
        KeyValue::new("orderly.write_start", unix_ms(info.write_start)),
        KeyValue::new("orderly.outcome", outcome.to_owned()),
    ];
    // The message key: the entity id, which the envelope requires to equal
    // it (an undecodable message's span carries its key as the entity id).
    if !info.entity_id.is_empty() {
        attributes.push(KeyValue::new(
            attr::MESSAGING_KAFKA_MESSAGE_KEY,
            info.entity_id.clone(),
        ));
    }
    match TRACER.get() {
        Some(tracer) => {
            let parent = match &info.parent {
                Some(sc) => Context::new().with_remote_span_context(sc.clone()),
                None => Context::new(),
            };
            let builder = tracer
                .span_builder(format!("process {}", info.topic))
                .with_kind(SpanKind::Consumer)
                .with_start_time(received_at)
                .with_attributes(attributes);
            let span = tracer.build_with_context(builder, &parent);
            let cx = Context::new().with_span(span);
            let span = cx.span();
            span.add_event_with_timestamp("read_start", info.read_start, vec![]);
            span.add_event_with_timestamp("write_start", info.write_start, vec![]);
            span.end_with_timestamp(durable_at);
        }
        None => tracing::debug!(
            target: "orderly::event",
            entity_id = %info.entity_id,
            tenant_id = %info.tenant_id,
            event_id = %info.event_id,
            event_type = %info.event_type,
            partition = info.partition,
            offset = info.offset,
            occurred_at = info.occurred_at,
            received_at = unix_ms(received_at),
            read_start = unix_ms(info.read_start),
            write_start = unix_ms(info.write_start),
            durable_at = unix_ms(durable_at),
            outcome,
            "event processed"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trip() {
        let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let sc = parent_from_headers([("traceparent", header.as_bytes())].into_iter()).unwrap();
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        let out = inject_headers(&Context::new().with_remote_span_context(sc));
        assert_eq!(out[0], ("traceparent".to_string(), header.to_string()));
        assert!(parent_from_headers([("traceparent", &b"garbage"[..])].into_iter()).is_none());
        assert!(parent_from_headers(std::iter::empty()).is_none());
    }
}
