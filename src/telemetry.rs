//! Telemetry: logging setup, and one OpenTelemetry span per event.
//!
//! Owns the tracer and the W3C `traceparent` propagation through Kafka
//! headers. Spans are exported over OTLP (HTTP/protobuf) when the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is
//! set; otherwise each event's span data is only logged, at debug level, under
//! the `orderly::event` target.
//!
//! A span is built once the event is durable, with explicit timestamps: it
//! starts when the message was received, carries `orderly.occurred_at`,
//! `orderly.read_start` and `orderly.write_start` (ms since the Unix epoch,
//! plus span events at the exact instants), and ends when the batch holding
//! the event was flushed. Its parent is the span named by the message's
//! `traceparent` header, when there is one.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, SpanKind, TraceContextExt, Tracer, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

static TRACER: OnceLock<SdkTracer> = OnceLock::new();

/// Telemetry that must be shut down to flush spans.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// Telemetry setup failed.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter could not be built from the `OTEL_EXPORTER_OTLP_*` variables.
    #[error("cannot build the OTLP span exporter from OTEL_EXPORTER_OTLP_* variables: {0}")]
    Exporter(String),
}

/// Sets up logging (`RUST_LOG`, else `default_log`) and, if an OTLP endpoint
/// is configured, span export. Call it before starting any async runtime: the
/// HTTP exporter's blocking client must not be created inside one.
pub fn init(instance_id: &str, default_log: &str) -> Result<Telemetry, TelemetryError> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_log)),
        )
        .with_writer(std::io::stderr)
        .try_init();
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
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "orderly".into()))
        .with_attributes([
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("service.instance.id", instance_id.to_owned()),
        ])
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    let _ = TRACER.set(provider.tracer("orderly"));
    tracing::info!("exporting event spans over OTLP");
    Ok(Telemetry {
        provider: Some(provider),
    })
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
        KeyValue::new("messaging.system", "kafka"),
        KeyValue::new("messaging.operation.type", "send"),
        KeyValue::new("messaging.destination.name", topic.to_owned()),
    ];
    if let Some(id) = entity_id {
        attributes.push(KeyValue::new("entity.id", id.to_owned()));
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
    /// When the source received the message.
    pub received_at: SystemTime,
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

/// Emits the span of one event that became durable at `durable_at` with `outcome`.
pub fn record_event_span(info: &SpanInfo, outcome: &str, durable_at: SystemTime) {
    let attributes = vec![
        KeyValue::new("entity.id", info.entity_id.clone()),
        KeyValue::new("tenant.id", info.tenant_id.clone()),
        KeyValue::new("event.id", info.event_id.clone()),
        KeyValue::new("event.type", info.event_type.clone()),
        KeyValue::new("messaging.system", "kafka"),
        KeyValue::new("messaging.destination.name", info.topic.to_string()),
        KeyValue::new("messaging.kafka.partition", info.partition as i64),
        KeyValue::new("messaging.kafka.offset", info.offset),
        KeyValue::new("orderly.occurred_at", info.occurred_at),
        KeyValue::new("orderly.read_start", unix_ms(info.read_start)),
        KeyValue::new("orderly.write_start", unix_ms(info.write_start)),
        KeyValue::new("orderly.outcome", outcome.to_owned()),
    ];
    match TRACER.get() {
        Some(tracer) => {
            let parent = match &info.parent {
                Some(sc) => Context::new().with_remote_span_context(sc.clone()),
                None => Context::new(),
            };
            let builder = tracer
                .span_builder(format!("process {}", info.event_type))
                .with_kind(SpanKind::Consumer)
                .with_start_time(info.received_at)
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
            received_at = unix_ms(info.received_at),
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
