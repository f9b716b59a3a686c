//! Telemetry: a real OTLP/HTTP receiver inside the test gets one span per
//! event from `orderly run`, with the attributes and the three timestamps, and
//! a message with a `traceparent` header yields a span in that trace.

mod common;

use common::{otlp, OrderlyProcess, TestTopic};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use orderly::model::envelope::Event;
use orderly::tools::workload::{self, Format};
use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn attrs(span: &Span) -> HashMap<String, AnyValue> {
    span.attributes
        .iter()
        .filter_map(|kv| Some((kv.key.clone(), kv.value.as_ref()?.value.clone()?)))
        .collect()
}

fn int(a: &HashMap<String, AnyValue>, k: &str) -> i64 {
    match a.get(k) {
        Some(AnyValue::IntValue(i)) => *i,
        other => panic!("{k}: expected an int, got {other:?}"),
    }
}

fn string(a: &HashMap<String, AnyValue>, k: &str) -> String {
    match a.get(k) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        other => panic!("{k}: expected a string, got {other:?}"),
    }
}

#[test]
fn every_event_gets_a_span_with_attributes_timestamps_and_parent() {
    let receiver = otlp::Receiver::start();
    let topic = TestTopic::new(2);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = topic.config_file(dir.path(), &data);
    let log = dir.path().join("orderly.log");
    let endpoint = receiver.endpoint();
    let mut orderly = OrderlyProcess::start(
        &config,
        &log,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            // A digits-only value for a string field, and a resource
            // attribute of the user's own that must survive.
            ("ORDERLY_INSTANCE_ID", "7"),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "deployment.environment.name=test",
            ),
        ],
    );

    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let events: Vec<Event> = (0..40)
        .map(|i| {
            let mut e =
                workload::crm_event(i % 8, (i / 8) as u32, 2, now - 60_000, &mut rand::rng());
            e.occurred_at = now - 60_000 + i as i64;
            e
        })
        .collect();
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent_span = "00f067aa0ba902b7";
    let traced_event = events[7].event_id.clone();
    let messages = events.iter().enumerate().map(|(i, e)| {
        let mut m = workload::message_of(e, Format::Proto);
        if i == 7 {
            m.headers.push((
                "traceparent".into(),
                format!("00-{trace_id}-{parent_span}-01").into_bytes(),
            ));
        }
        m
    });
    topic.produce(messages);

    let deadline = Instant::now() + Duration::from_secs(60);
    while receiver.spans().len() < events.len() {
        assert!(
            Instant::now() < deadline,
            "got {} of {} spans; log: {}",
            receiver.spans().len(),
            events.len(),
            orderly.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = orderly.terminate(Duration::from_secs(30));
    assert!(status.success());

    let resources = receiver.resources();
    assert!(!resources.is_empty());
    for r in &resources {
        assert_eq!(r["service.name"], "orderly", "{r:?}");
        assert_eq!(r["service.instance.id"], "7", "from instance_id: {r:?}");
        assert_eq!(r["service.version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(r["deployment.environment.name"], "test", "{r:?}");
    }

    let spans = receiver.spans();
    let mut by_event: HashMap<String, &Span> = HashMap::new();
    for s in &spans {
        by_event.insert(string(&attrs(s), "orderly.event.id"), s);
    }
    assert_eq!(by_event.len(), events.len(), "one span per event");
    for e in &events {
        let span = by_event[&e.event_id];
        let a = attrs(span);
        // The messaging semantic conventions, then orderly's own.
        assert_eq!(span.name, format!("process {}", topic.topic));
        assert_eq!(string(&a, "messaging.system"), "kafka");
        assert_eq!(string(&a, "messaging.operation.type"), "process");
        assert_eq!(string(&a, "messaging.operation.name"), "process");
        assert_eq!(string(&a, "messaging.destination.name"), topic.topic);
        assert_eq!(string(&a, "messaging.consumer.group.name"), topic.group);
        let partition = string(&a, "messaging.destination.partition.id");
        assert!(["0", "1"].contains(&partition.as_str()), "{partition}");
        assert_eq!(string(&a, "messaging.kafka.message.key"), e.entity_id);
        assert!(int(&a, "messaging.kafka.offset") >= 0);
        assert_eq!(string(&a, "orderly.entity.id"), e.entity_id);
        assert_eq!(string(&a, "orderly.tenant.id"), e.tenant_id);
        assert_eq!(string(&a, "orderly.event.type"), e.event_type);
        assert_eq!(string(&a, "orderly.outcome"), "applied");
        let (occurred, read, write) = (
            int(&a, "orderly.occurred_at"),
            int(&a, "orderly.read_start"),
            int(&a, "orderly.write_start"),
        );
        assert_eq!(occurred, e.occurred_at);
        assert!(
            occurred <= read && read <= write,
            "{occurred} <= {read} <= {write}"
        );
        // The span covers receipt to durability, with the two instants as span events.
        let names: Vec<&str> = span.events.iter().map(|ev| ev.name.as_str()).collect();
        assert_eq!(names, ["read_start", "write_start"]);
        assert!(span.start_time_unix_nano <= span.events[0].time_unix_nano);
        assert!(span.events[0].time_unix_nano <= span.events[1].time_unix_nano);
        assert!(span.events[1].time_unix_nano <= span.end_time_unix_nano);
        assert_eq!(span.events[0].time_unix_nano / 1_000_000, read as u64);
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        if e.event_id == traced_event {
            assert_eq!(
                hex(&span.trace_id),
                trace_id,
                "span joins the producer's trace"
            );
            assert_eq!(
                hex(&span.parent_span_id),
                parent_span,
                "span's parent is the traceparent span"
            );
        } else {
            assert_ne!(hex(&span.trace_id), trace_id);
            assert!(span.parent_span_id.is_empty(), "no traceparent, no parent");
        }
    }
}
