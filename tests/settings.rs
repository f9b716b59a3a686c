//! Tenant settings, end to end on the embedded broker: a mapping changed
//! mid-stream, an invalid document, startup ordering, compile counts with
//! 1,000 tenants, the HTTP source with ETags, and `orderly settings`.

mod common;

use common::{Oracle, TestTopic};
use orderly::model::envelope::Event;
use orderly::settings::{SettingsDocument, SettingsSource};
use orderly::store::Store;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Creates a settings topic next to `t`'s topics and points `config` at it.
fn with_settings_topic(t: &TestTopic, config: &mut orderly::config::Config) -> String {
    let name = t.topic.replace("events-", "settings-");
    t.broker.create_topic(&name, 1).expect("settings topic");
    config.settings.source = SettingsSource::Topic;
    config.settings.topic = name.clone();
    name
}

/// Produces one record to the settings topic, as any producer could
/// (without `orderly settings put`'s validation).
fn produce_setting(brokers: &str, topic: &str, tenant: &str, value: &[u8]) {
    produce_settings(brokers, topic, &[(tenant.to_owned(), value.to_vec())]);
}

/// Produces several settings records through one producer, in order.
fn produce_settings(brokers: &str, topic: &str, records: &[(String, Vec<u8>)]) {
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .create()
        .expect("producer");
    let sends: Vec<_> = records
        .iter()
        .map(|(tenant, value)| {
            let record = rdkafka::producer::FutureRecord::to(topic)
                .key(tenant)
                .payload(value);
            producer.send(record, Duration::from_secs(30))
        })
        .collect();
    for s in sends {
        futures::executor::block_on(s).expect("settings record delivered");
    }
}

/// Version 1 of most tests' mapping: the external names, lower-cased.
const EXTERNAL: [(&str, &str); 3] = [("Stage", "stage"), ("Owner", "owner"), ("Amount", "amount")];

fn doc(tenant: &str, version: u64, mappings: &[(&str, &str)]) -> SettingsDocument {
    SettingsDocument {
        tenant_id: tenant.into(),
        version,
        field_mappings: mappings
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect(),
        ..Default::default()
    }
}

/// `per_entity` events for each of `entities` lead entities of `tenant`,
/// with external field names (`Stage`, `Owner`, `Amount`), shuffled so some
/// arrive late. Entity ids carry `prefix`.
fn external_events(
    tenant: &str,
    prefix: &str,
    entities: u64,
    per_entity: u32,
    first_at: i64,
    seed: u64,
) -> Vec<Event> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::new();
    for i in 0..entities {
        for seq in 0..per_entity {
            let (t, payload) = if rng.random_range(0..4) == 0 {
                (
                    "conversion.recorded",
                    serde_json::json!({"Amount": rng.random_range(1..100)}),
                )
            } else {
                let stage = ["new", "won", "lost"][rng.random_range(0..3)];
                (
                    "lead.updated",
                    serde_json::json!({
                        "Stage": stage,
                        "Owner": format!("rep-{}", rng.random_range(0..9)),
                    }),
                )
            };
            let mut e = common::event(
                &format!("{prefix}-{i}"),
                &format!("{prefix}-{i}-{seed}-{seq}"),
                t,
                first_at + i64::from(seq) * 10 + rng.random_range(0..50),
                payload,
            );
            e.tenant_id = tenant.into();
            out.push(e);
        }
    }
    out.shuffle(&mut rng);
    out
}

/// The test's own mapping, independent of orderly's: renames payload fields.
fn mapped(events: &[Event], mappings: &[(&str, &str)]) -> Vec<Event> {
    let m: HashMap<&str, &str> = mappings.iter().copied().collect();
    events
        .iter()
        .map(|e| {
            let mut e = e.clone();
            e.payload = e
                .payload
                .into_iter()
                .map(|(k, v)| (m.get(k.as_str()).map(|s| s.to_string()).unwrap_or(k), v))
                .collect();
            e
        })
        .collect()
}

/// Checks each field's provenance: events of `versions` were handled under
/// that settings version.
fn assert_provenance(store: &dyn Store, versions: &HashMap<String, u64>) {
    let mut checked = 0;
    for r in store.entities() {
        let r = r.expect("record");
        for (field, p) in r.provenance.iter() {
            if let Some(v) = versions.get(&p.event_id) {
                assert_eq!(
                    p.settings_version, *v,
                    "{}: field {field} written by {} under settings {} (want {v})",
                    r.entity_id, p.event_id, p.settings_version
                );
                checked += 1;
            }
        }
        for e in &r.log {
            if let Some(v) = versions.get(&e.provenance.event_id) {
                assert_eq!(e.provenance.settings_version, *v, "{}", r.entity_id);
            }
        }
    }
    assert!(checked > 0, "no provenance checked");
}

#[test]
fn a_mapping_changed_mid_stream_applies_to_later_events_only() {
    let t = TestTopic::new(4);
    let dir = tempfile::tempdir().unwrap();
    let mut config = t.config(&dir.path().join("data"));
    let settings_topic = with_settings_topic(&t, &mut config);
    let v1_map = EXTERNAL;
    let v2_map = [
        ("Stage", "lifecycle"),
        ("Owner", "owner"),
        ("Amount", "amount"),
    ];
    produce_setting(
        &t.brokers,
        &settings_topic,
        "acme",
        &doc("acme", 1, &v1_map).to_json_bytes(),
    );
    // Before: acme's events and those of a tenant without settings.
    let before: Vec<Event> = external_events("acme", "a", 30, 6, 1_000, 1)
        .into_iter()
        .chain(external_events("plain", "p", 10, 4, 1_000, 2))
        .collect();
    // After: more events for the same entities, some older than events
    // handled before the change (late: re-folded with what they were mapped to).
    let after = external_events("acme", "a", 30, 6, 1_020, 3);
    let expected = (before.len() + after.len()) as u64;
    let (brokers, topic) = (t.brokers.clone(), t.topic.clone());
    let store = common::run_to_quiet_with(config, expected, |control, wait_durable| {
        common::produce_events(&brokers, &topic, &before);
        wait_durable(before.len() as u64);
        produce_setting(
            &brokers,
            &settings_topic,
            "acme",
            &doc("acme", 2, &v2_map).to_json_bytes(),
        );
        common::wait_until("version 2 in force", Duration::from_secs(30), || {
            control
                .settings()
                .get("acme")
                .is_some_and(|v| v.current().version() == 2)
        });
        common::produce_events(&brokers, &topic, &after);
    });
    let handled: Vec<Event> = mapped(&before[..180], &v1_map)
        .into_iter()
        .chain(before[180..].iter().cloned())
        .chain(mapped(&after, &v2_map))
        .collect();
    let problems = Oracle::of(&handled).diff(store.as_ref());
    assert!(problems.is_empty(), "{problems:#?}");
    let versions: HashMap<String, u64> = before
        .iter()
        .map(|e| {
            (
                e.event_id.clone(),
                if e.tenant_id == "acme" { 1 } else { 0 },
            )
        })
        .chain(after.iter().map(|e| (e.event_id.clone(), 2)))
        .collect();
    assert_provenance(store.as_ref(), &versions);
    // Some late events after the change were re-folded among older ones.
    let late = common::late_on_arrival(&before.iter().chain(&after).cloned().collect::<Vec<_>>());
    assert!(after
        .iter()
        .any(|e| late.contains(&(e.entity_id.clone(), e.event_id.clone()))));
}

#[test]
fn an_invalid_document_is_dead_lettered_and_the_last_good_one_stays() {
    let t = TestTopic::new(2);
    let dir = tempfile::tempdir().unwrap();
    let mut config = t.config(&dir.path().join("data"));
    let settings_topic = with_settings_topic(&t, &mut config);
    let map = EXTERNAL;
    produce_setting(
        &t.brokers,
        &settings_topic,
        "acme",
        &doc("acme", 1, &map).to_json_bytes(),
    );
    let first = external_events("acme", "a", 10, 4, 1_000, 1);
    let second = external_events("acme", "a", 10, 4, 2_000, 2);
    let expected = (first.len() + second.len()) as u64;
    let (brokers, topic) = (t.brokers.clone(), t.topic.clone());
    let store = common::run_to_quiet_with(config, expected, |control, wait_durable| {
        common::produce_events(&brokers, &topic, &first);
        wait_durable(first.len() as u64);
        // Two external fields onto one internal field: ambiguous, rejected.
        let bad = doc("acme", 2, &[("Stage", "stage"), ("Owner", "stage")]);
        produce_setting(&brokers, &settings_topic, "acme", &bad.to_json_bytes());
        common::wait_until("the dead letter", Duration::from_secs(30), || {
            control
                .store()
                .dead_letters(0, 10)
                .unwrap()
                .iter()
                .any(|d| d.code == "settings_invalid")
        });
        assert_eq!(
            control.settings().get("acme").unwrap().current().version(),
            1
        );
        common::produce_events(&brokers, &topic, &second);
    });
    let dls = store.dead_letters(0, 10).unwrap();
    let dl = dls.iter().find(|d| d.code == "settings_invalid").unwrap();
    assert_eq!(dl.topic, settings_topic);
    assert!(
        dl.reason
            .contains("both \"Owner\" and \"Stage\" map to \"stage\""),
        "{}",
        dl.reason
    );
    assert_eq!(dl.key.as_deref(), Some(&b"acme"[..]));
    // Every event was handled under version 1, before and after the rejection.
    let all: Vec<Event> = first.iter().chain(&second).cloned().collect();
    let problems = Oracle::of(&mapped(&all, &map)).diff(store.as_ref());
    assert!(problems.is_empty(), "{problems:#?}");
    let versions = all.iter().map(|e| (e.event_id.clone(), 1)).collect();
    assert_provenance(store.as_ref(), &versions);
}

#[test]
fn no_event_is_processed_before_the_settings_topic_is_caught_up() {
    let t = TestTopic::new(2);
    let dir = tempfile::tempdir().unwrap();
    let mut config = t.config(&dir.path().join("data"));
    let settings_topic = with_settings_topic(&t, &mut config);
    let map = EXTERNAL;
    // Settings first, for 20 tenants, then the events: all on the broker
    // before orderly starts.
    let docs: Vec<(String, Vec<u8>)> = (0..20)
        .map(|i| {
            let tenant = format!("t{i}");
            let bytes = doc(&tenant, 1, &map).to_json_bytes();
            (tenant, bytes)
        })
        .collect();
    produce_settings(&t.brokers, &settings_topic, &docs);
    let events: Vec<Event> = (0..20)
        .flat_map(|i| external_events(&format!("t{i}"), &format!("e{i}"), 3, 3, 1_000, i))
        .collect();
    t.produce_events(&events);
    let config_path = dir.path().join("orderly.toml");
    std::fs::write(&config_path, toml::to_string(&config).unwrap()).unwrap();
    // The settings consumer is slow: each of its records takes 150 ms.
    let mut p = common::OrderlyProcess::start(
        &config_path,
        &dir.path().join("log"),
        &[("ORDERLY_FAILPOINTS", "settings.read=sleep(150)@1..1000")],
    );
    t.wait_all_committed(Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}\n{}", p.log_tail()));
    p.terminate_ok(Duration::from_secs(30));
    let log = p.log_tail();
    // Threads write their lines in whatever order they get the lock, so the
    // order is read from each line's timestamp, not from its place in the log.
    // The timestamps are RFC 3339 in UTC with microseconds, of fixed width,
    // so they compare as text.
    let at = |what: &str| -> String {
        let line = log.lines().find(|l| l.contains(what)).expect(&log);
        line.split_whitespace().next().expect(line).to_owned()
    };
    let waited = at("waiting for tenant settings");
    let caught_up = at("tenant settings caught up");
    let started = at("source started");
    assert!(waited <= caught_up && caught_up <= started, "{log}");
    let store = orderly::store::SledStore::open(&config.data_dir, 16).unwrap();
    let problems = Oracle::of(&mapped(&events, &map)).diff(&store);
    assert!(problems.is_empty(), "{problems:#?}");
    let versions = events.iter().map(|e| (e.event_id.clone(), 1)).collect();
    assert_provenance(&store, &versions);
}

#[test]
fn a_thousand_tenants_compile_once_per_version_over_a_hundred_thousand_events() {
    let t = TestTopic::new(8);
    let dir = tempfile::tempdir().unwrap();
    let mut config = t.config(&dir.path().join("data"));
    config.types = BTreeMap::new();
    let settings_topic = with_settings_topic(&t, &mut config);
    let tenants = 1_000u64;
    let docs: Vec<(String, Vec<u8>)> = (0..tenants)
        .map(|i| {
            let tenant = format!("t{i}");
            let bytes = doc(&tenant, 1, &[("F", "f")]).to_json_bytes();
            (tenant, bytes)
        })
        .collect();
    produce_settings(&t.brokers, &settings_topic, &docs);
    let n = 100_000u64;
    let make = |range: std::ops::Range<u64>| -> Vec<Event> {
        range
            .map(|i| {
                let mut e = common::event(
                    &format!("x{}", i % 5_000),
                    &format!("ev{i}"),
                    "lead.updated",
                    i as i64,
                    serde_json::json!({"F": i}),
                );
                e.tenant_id = format!("t{}", i % 5_000 % tenants);
                e
            })
            .collect()
    };
    let (brokers, topic) = (t.brokers.clone(), t.topic.clone());
    let compiled = Arc::new(Mutex::new(Vec::new()));
    let seen = compiled.clone();
    let store = common::run_to_quiet_with(config, n, move |control, wait_durable| {
        common::wait_until("settings caught up", Duration::from_secs(60), || {
            control.settings().is_caught_up()
        });
        seen.lock().unwrap().push(control.settings().compiled());
        common::produce_events(&brokers, &topic, &make(0..n / 2));
        wait_durable(n / 2);
        seen.lock().unwrap().push(control.settings().compiled());
        // Ten tenants change: ten compiles, however many events follow.
        let changes: Vec<(String, Vec<u8>)> = (0..10)
            .map(|i| {
                let tenant = format!("t{i}");
                let bytes = doc(&tenant, 2, &[("F", "g")]).to_json_bytes();
                (tenant, bytes)
            })
            .collect();
        produce_settings(&brokers, &settings_topic, &changes);
        common::wait_until("ten changes", Duration::from_secs(30), || {
            control.settings().compiled() == tenants + 10
        });
        common::produce_events(&brokers, &topic, &make(n / 2..n));
        wait_durable(n);
        seen.lock().unwrap().push(control.settings().compiled());
    });
    assert_eq!(
        *compiled.lock().unwrap(),
        vec![tenants, tenants, tenants + 10]
    );
    // The mapping was applied: every entity holds `f` (or `g`), never `F`.
    let mut entities = 0;
    for r in store.entities() {
        let r = r.unwrap();
        entities += 1;
        assert!(!r.state.fields.contains_key("F"), "{}", r.entity_id);
    }
    assert_eq!(entities, 5_000);
}

/// One request the endpoint answered: its If-None-Match, the status, the version served.
type Served = (Option<String>, u16, u64);

/// A settings endpoint: serves `doc` with an ETag, answers 304 to a
/// matching `If-None-Match`, and logs (if-none-match, status, version served).
struct SettingsServer {
    url: String,
    doc: Arc<Mutex<SettingsDocument>>,
    log: Arc<Mutex<Vec<Served>>>,
}

impl SettingsServer {
    fn start(doc: SettingsDocument) -> SettingsServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/settings", listener.local_addr().unwrap());
        let doc = Arc::new(Mutex::new(doc));
        let log: Arc<Mutex<Vec<Served>>> = Arc::default();
        let (d, l) = (doc.clone(), log.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut if_none_match = None;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                        break;
                    }
                    if let Some((k, v)) = line.split_once(':') {
                        if k.eq_ignore_ascii_case("if-none-match") {
                            if_none_match = Some(v.trim().to_owned());
                        }
                    }
                }
                // The log entry is written under the document's lock, so the
                // test can change the document between two requests exactly.
                let guard = d.lock().unwrap();
                let current = guard.clone();
                let etag = format!("\"v{}\"", current.version);
                let mut stream = stream;
                if if_none_match.as_deref() == Some(etag.as_str()) {
                    l.lock()
                        .unwrap()
                        .push((if_none_match, 304, current.version));
                    let _ = write!(
                        stream,
                        "HTTP/1.1 304 Not Modified\r\nETag: {etag}\r\nConnection: close\r\n\r\n"
                    );
                } else {
                    l.lock()
                        .unwrap()
                        .push((if_none_match, 200, current.version));
                    let body = serde_json::json!({ "tenants": [current] }).to_string();
                    let _ = write!(
                        stream,
                        "HTTP/1.1 200 OK\r\nETag: {etag}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                }
                drop(guard);
            }
        });
        SettingsServer { url, doc, log }
    }
}

#[test]
fn the_http_source_revalidates_with_etags_and_picks_up_a_change_at_the_next_refresh() {
    let t = TestTopic::new(2);
    let dir = tempfile::tempdir().unwrap();
    let mut config = t.config(&dir.path().join("data"));
    let map1 = EXTERNAL;
    let map2 = [("Stage", "phase"), ("Owner", "owner"), ("Amount", "amount")];
    let server = SettingsServer::start(doc("acme", 1, &map1));
    config.settings.source = SettingsSource::Http;
    config.settings.url = server.url.clone();
    config.settings.ttl_ms = 200;
    let first = external_events("acme", "a", 10, 4, 1_000, 1);
    let second = external_events("acme", "a", 10, 4, 2_000, 2);
    let expected = (first.len() + second.len()) as u64;
    let (brokers, topic) = (t.brokers.clone(), t.topic.clone());
    let (doc_slot, log) = (server.doc.clone(), server.log.clone());
    let changed_at = Arc::new(Mutex::new(0usize));
    let changed = changed_at.clone();
    let store = common::run_to_quiet_with(config, expected, |control, wait_durable| {
        common::produce_events(&brokers, &topic, &first);
        wait_durable(first.len() as u64);
        // Unchanged refreshes are conditional and answered 304.
        common::wait_until("a 304", Duration::from_secs(30), || {
            log.lock().unwrap().iter().any(|(_, s, _)| *s == 304)
        });
        {
            let mut d = doc_slot.lock().unwrap();
            *changed.lock().unwrap() = log.lock().unwrap().len();
            *d = doc("acme", 2, &map2);
        }
        common::wait_until("version 2 in force", Duration::from_secs(30), || {
            control
                .settings()
                .get("acme")
                .is_some_and(|v| v.current().version() == 2)
        });
        common::produce_events(&brokers, &topic, &second);
    });
    let log = server.log.lock().unwrap().clone();
    let at = *changed_at.lock().unwrap();
    // The first request after the change fetched version 2: one refresh.
    assert_eq!(log[at].1, 200, "{log:?}");
    assert_eq!(log[at].2, 2, "{log:?}");
    assert_eq!(log[at].0.as_deref(), Some("\"v1\""), "{log:?}");
    assert!(
        log[1..at]
            .iter()
            .all(|(tag, s, _)| tag.as_deref() == Some("\"v1\"") && *s == 304),
        "{log:?}"
    );
    let handled: Vec<Event> = mapped(&first, &map1)
        .into_iter()
        .chain(mapped(&second, &map2))
        .collect();
    let problems = Oracle::of(&handled).diff(store.as_ref());
    assert!(problems.is_empty(), "{problems:#?}");
    // The cache's metrics.
    let text = orderly::metrics::prometheus().unwrap().render();
    for needle in [
        "orderly_settings_refreshes_total{result=\"not_modified\"}",
        "orderly_settings_refreshes_total{result=\"changed\"}",
        "orderly_settings_lookups_total{result=\"hit\"}",
    ] {
        let line = text
            .lines()
            .find(|l| l.starts_with(needle))
            .unwrap_or_else(|| panic!("{needle} missing"));
        let n: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(n > 0.0, "{line}");
    }
}

#[test]
fn settings_put_validates_and_get_reads_back() {
    let t = TestTopic::new(1);
    let dir = tempfile::tempdir().unwrap();
    let topic = t.topic.replace("events-", "settings-");
    t.broker.create_topic(&topic, 1).unwrap();
    let bin = env!("CARGO_BIN_EXE_orderly");
    let run = |args: &[&str]| {
        std::process::Command::new(bin)
            .args(args)
            .args(["--brokers", &t.brokers, "--settings-topic", &topic])
            .env_remove("ORDERLY_CONFIG")
            .output()
            .unwrap()
    };
    let file = dir.path().join("acme.json");
    std::fs::write(
        &file,
        r#"{"field_mappings": {"Stage": "stage"}, "enabled_types": ["lead.updated"]}"#,
    )
    .unwrap();
    let out = run(&["settings", "put", "acme", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("version 1 written"));
    let out = run(&["settings", "put", "acme", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("version 2 written"));
    let out = run(&["settings", "get", "acme"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["version"], 2);
    assert_eq!(got["field_mappings"]["Stage"], "stage");
    // Invalid: refused with the reason, nothing written.
    std::fs::write(&file, r#"{"late_policy": {"lead.updated": "later"}}"#).unwrap();
    let out = run(&["settings", "put", "acme", file.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("\"later\" is not one of"), "{err}");
    let out = run(&["settings", "get", "nobody"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no settings"));
    let records: HashSet<Vec<u8>> = t
        .read_all(&topic, 3, Duration::from_secs(3))
        .into_iter()
        .collect();
    assert_eq!(
        records.len(),
        2,
        "only the two valid documents were written"
    );
}
