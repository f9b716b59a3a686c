//! What operators see: Prometheus metrics that agree with the run, and one
//! trace from `orderly produce` through processing, carried by the
//! `traceparent` header. Each scenario drives the `orderly` binary as a child
//! process, so its process-wide metrics belong to that run alone.

mod common;

use common::{late_on_arrival, otlp, shuffled_stream, OrderlyProcess, TestTopic};
use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

/// One sample line of the Prometheus text format.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the Prometheus text exposition format (0.0.4) strictly enough to
/// catch malformed output: every sample belongs to a family declared by a
/// `# TYPE` line, names and labels are well formed, values are numbers.
fn parse_prometheus(text: &str) -> Result<(Vec<Sample>, BTreeMap<String, String>), String> {
    let mut types = BTreeMap::new();
    let mut samples = Vec::new();
    let valid_name = |n: &str| {
        !n.is_empty()
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            && !n.starts_with(|c: char| c.is_ascii_digit())
    };
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest
                .split_once(' ')
                .ok_or(format!("line {i}: bad TYPE: {line}"))?;
            if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                return Err(format!("line {i}: unknown type {kind}"));
            }
            types.insert(name.to_owned(), kind.to_owned());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .ok_or(format!("line {i}: no value: {line}"))?;
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v
                .parse()
                .map_err(|_| format!("line {i}: bad value {v:?}"))?,
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_owned(), BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .ok_or(format!("line {i}: unclosed labels: {line}"))?;
                let mut labels = BTreeMap::new();
                for pair in body.split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair
                        .split_once("=\"")
                        .ok_or(format!("line {i}: bad label {pair:?}"))?;
                    if !valid_name(k) {
                        return Err(format!("line {i}: bad label name {k:?}"));
                    }
                    labels.insert(k.to_owned(), v.trim_end_matches('"').to_owned());
                }
                (name.to_owned(), labels)
            }
        };
        if !valid_name(&name) {
            return Err(format!("line {i}: bad metric name {name:?}"));
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).map(String::as_str) == Some("histogram"))
            })
            .unwrap_or(&name);
        if !types.contains_key(family) {
            return Err(format!("line {i}: {name} has no # TYPE line"));
        }
        samples.push(Sample {
            name,
            labels,
            value,
        });
    }
    Ok((samples, types))
}

fn scrape(admin: &str) -> (Vec<Sample>, BTreeMap<String, String>) {
    let text = reqwest::blocking::get(format!("http://{admin}/metrics"))
        .and_then(|r| r.error_for_status())
        .and_then(|r| r.text())
        .expect("GET /metrics");
    parse_prometheus(&text).unwrap_or_else(|e| panic!("not Prometheus text: {e}\n{text}"))
}

/// The sum of a metric's samples whose labels include `labels`.
fn sum(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

#[test]
fn metrics_agree_with_the_run() {
    let topic = TestTopic::new(4);
    let events = shuffled_stream(150, 8, 0.05, 21);
    let distinct: HashSet<_> = events.iter().map(|e| e.event_id.clone()).collect();
    let late = late_on_arrival(&events).len();
    let malformed = orderly::tools::workload::malformed_samples();
    let produced = topic.produce_events(&events) + topic.produce(malformed.clone().into_iter());

    let dir = tempfile::tempdir().unwrap();
    let config = topic.config_file(dir.path(), &dir.path().join("data"));
    let log = dir.path().join("orderly.log");
    let mut orderly = OrderlyProcess::start(&config, &log, &[("ORDERLY_STATS_INTERVAL_MS", "300")]);
    let admin = orderly.admin_addr(Duration::from_secs(60));

    // Wait until every message is durable and the lag of every partition is reported as 0.
    let deadline = Instant::now() + Duration::from_secs(120);
    let (samples, types) = loop {
        let (samples, types) = scrape(&admin);
        let durable = sum(&samples, "orderly_events_durable_total", &[]);
        let lag: Vec<f64> = samples
            .iter()
            .filter(|s| s.name == "orderly_consumer_lag")
            .map(|s| s.value)
            .collect();
        if durable as u64 == produced && lag.len() == 4 && lag.iter().all(|l| *l == 0.0) {
            break (samples, types);
        }
        assert!(
            Instant::now() < deadline,
            "durable {durable} of {produced}, lag {lag:?}; log:\n{}",
            orderly.log_tail()
        );
        std::thread::sleep(Duration::from_millis(300));
    };

    // The counters agree with what was produced.
    let get = |name: &str, labels: &[(&str, &str)]| sum(&samples, name, labels) as u64;
    assert_eq!(get("orderly_events_received_total", &[]), produced);
    assert_eq!(
        get("orderly_dead_letters_total", &[("stage", "decode")]),
        malformed.len() as u64
    );
    assert_eq!(
        get("orderly_events_processed_total", &[]),
        events.len() as u64,
        "every decodable message is processed once"
    );
    assert_eq!(
        get("orderly_duplicates_total", &[]),
        (events.len() - distinct.len()) as u64
    );
    assert_eq!(
        get(
            "orderly_events_processed_total",
            &[("outcome", "duplicate")]
        ),
        (events.len() - distinct.len()) as u64
    );
    assert_eq!(
        get(
            "orderly_events_processed_total",
            &[("outcome", "late-recomputed")]
        ),
        late as u64
    );
    assert_eq!(
        get(
            "orderly_out_of_order_events_total",
            &[("policy", "recompute")]
        ),
        late as u64
    );
    assert_eq!(
        get("orderly_events_processed_total", &[("outcome", "applied")]),
        (distinct.len() - late) as u64
    );
    assert!(get("orderly_corrections_total", &[]) <= late as u64);
    assert_eq!(
        get("orderly_dead_letters_open", &[]),
        malformed.len() as u64
    );
    assert_eq!(get("orderly_in_flight_events", &[]), 0);
    assert_eq!(
        get("orderly_record_lateness_seconds_count", &[]),
        late as u64
    );
    assert_eq!(
        get(
            "orderly_record_e2e_latency_seconds_count",
            &[("from", "append")]
        ),
        produced
    );
    assert!(get("orderly_store_batch_size_count", &[]) > 0);
    // Every batch reports how long it held the store's lock exclusively.
    assert_eq!(
        get("orderly_store_exclusive_seconds_count", &[]),
        get("orderly_store_batch_size_count", &[])
    );
    assert!(get("orderly_store_size_bytes", &[]) > 0);
    // The filter of stored ids is complete (the store started empty), and
    // the first event of each new entity did not read the store.
    assert_eq!(get("orderly_entity_filter_state", &[]), 1);
    assert!(get("orderly_entity_lookups_skipped_total", &[]) > 0);
    assert!(get("orderly_active_actors", &[]) > 0);

    // Checkpoints cover the topic, per partition.
    let ends = topic.end_offsets();
    for (p, end) in &ends {
        let offset = sum(
            &samples,
            "orderly_checkpoint_offset",
            &[("partition", &p.to_string())],
        );
        assert_eq!(offset as i64, *end, "checkpoint of partition {p}");
    }

    // Every metric in the catalogue is exported with its declared type, so
    // dashboards and alerts see a value (0 included), not "no data". Errors
    // are labelled by what failed, so a clean run has none.
    for (name, kind, _) in orderly::metrics::CATALOGUE {
        if *name == "orderly_component_errors_total" {
            continue;
        }
        let want = match kind {
            orderly::metrics::Kind::Counter => "counter",
            orderly::metrics::Kind::Gauge => "gauge",
            orderly::metrics::Kind::Histogram => "histogram",
        };
        assert_eq!(
            types.get(*name).map(String::as_str),
            Some(want),
            "{name} is not exported as a {want}"
        );
    }

    // Labels are bounded: no entity, tenant or event id anywhere.
    for s in &samples {
        for v in s.labels.values() {
            assert!(
                !events
                    .iter()
                    .any(|e| v == &e.entity_id || v == &e.event_id || v == &e.tenant_id),
                "{} has an id as a label value: {v}",
                s.name
            );
        }
    }
    let status = orderly.terminate(Duration::from_secs(60));
    assert!(status.success(), "{}", orderly.log_tail());
}

#[test]
fn producer_spans_parent_the_processing_spans() {
    let receiver = otlp::Receiver::start();
    let endpoint = receiver.endpoint();
    let topic = TestTopic::new(2);
    let otel = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "200"),
    ];
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("orderly.log");

    // `orderly produce`, with span export on.
    let n = 120u64;
    let args: Vec<std::ffi::OsString> = [
        "produce",
        "--brokers",
        &topic.brokers,
        "--topic",
        &topic.topic,
        "--events",
        &n.to_string(),
        "--entities",
        "12",
        "--duplicate-ratio",
        "0",
    ]
    .iter()
    .map(Into::into)
    .collect();
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let mut producer = OrderlyProcess::spawn(&args, &log, &otel);
    let status = producer.child.wait().unwrap();
    assert!(status.success(), "{}", producer.log_tail());

    let config = topic.config_file(dir.path(), &dir.path().join("data"));
    let mut orderly = OrderlyProcess::start(&config, &log, &otel);
    topic
        .wait_all_committed(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", orderly.log_tail()));
    let status = orderly.terminate(Duration::from_secs(60));
    assert!(status.success(), "{}", orderly.log_tail());

    let spans = receiver.spans();
    use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
    let producers: BTreeMap<Vec<u8>, &otlp::Span> = spans
        .iter()
        .filter(|s| s.kind == SpanKind::Producer as i32)
        .map(|s| (s.span_id.clone(), s))
        .collect();
    let processed: Vec<&otlp::Span> = spans
        .iter()
        .filter(|s| s.kind == SpanKind::Consumer as i32)
        .collect();
    assert_eq!(producers.len() as u64, n, "one producer span per message");
    assert_eq!(processed.len() as u64, n, "one processing span per message");
    let mut parents = HashSet::new();
    for s in &processed {
        let parent = producers
            .get(&s.parent_span_id)
            .unwrap_or_else(|| panic!("processing span {} has no producer parent", s.name));
        assert_eq!(s.trace_id, parent.trace_id, "same trace");
        assert!(s.start_time_unix_nano >= parent.start_time_unix_nano);
        let attr = |k: &str| s.attributes.iter().any(|a| a.key == k);
        assert!(
            attr("orderly.occurred_at")
                && attr("orderly.read_start")
                && attr("orderly.write_start"),
            "the three timestamps are on the span"
        );
        parents.insert(s.parent_span_id.clone());
    }
    assert_eq!(
        parents.len() as u64,
        n,
        "each message has its own producer span"
    );
}

/// `ORDERLY_LOG_FORMAT=json`: every line orderly writes is one JSON object,
/// with no ANSI escapes when stderr is a file, and the log line about a bad
/// message carries the trace id of its `traceparent`. The run is also given
/// a digits-only admin token, which must load as a string and work.
#[test]
fn json_logs_parse_line_by_line_and_carry_the_trace_id() {
    let topic = TestTopic::new(2);
    let events = shuffled_stream(10, 3, 0.0, 5);
    topic.produce_events(&events);
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let junk = orderly::tools::workload::Outgoing {
        key: Some(b"lead-junk".to_vec()),
        value: b"{not json".to_vec(),
        headers: vec![(
            "traceparent".into(),
            format!("00-{trace_id}-b7ad6b7169203331-01").into_bytes(),
        )],
    };
    topic.produce(std::iter::once(junk));

    let dir = tempfile::tempdir().unwrap();
    let config = topic.config_file(dir.path(), &dir.path().join("data"));
    let log = dir.path().join("orderly.log");
    let mut orderly = OrderlyProcess::start(
        &config,
        &log,
        &[
            ("ORDERLY_LOG_FORMAT", "json"),
            ("ORDERLY_ADMIN_TOKEN", "123456"),
        ],
    );
    let admin = orderly.admin_addr(Duration::from_secs(60));
    topic
        .wait_all_committed(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", orderly.log_tail()));
    let post = |token: &str| {
        reqwest::blocking::Client::new()
            .post(format!("http://{admin}/api/dead-letters/skip-all"))
            .bearer_auth(token)
            .send()
            .expect("admin answers")
            .status()
            .as_u16()
    };
    assert_eq!(post("12345"), 401, "a wrong token is refused");
    assert_eq!(post("123456"), 200, "the digits-only token is the token");
    let status = orderly.terminate(Duration::from_secs(30));
    assert!(status.success(), "{}", orderly.log_tail());

    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains('\u{1b}'), "no ANSI escapes in a file");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.len() > 3, "{text}");
    for l in &lines {
        assert!(l["timestamp"].is_string() && l["level"].is_string(), "{l}");
        assert!(l["message"].is_string(), "{l}");
    }
    let dead = lines
        .iter()
        .find(|l| l["message"] == "undecodable message dead-lettered")
        .unwrap_or_else(|| panic!("no dead-letter line in {text}"));
    assert_eq!(dead["trace_id"], trace_id, "{dead}");
}
