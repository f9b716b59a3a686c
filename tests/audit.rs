//! Audit by replay, and history: the `orderly audit` and `orderly state`
//! commands on a data dir written by a real pipeline run.

mod common;

use common::{event, run_to_quiet, TestTopic};
use orderly::model::value::Value;
use orderly::store::{SledStore, Store};
use std::path::Path;
use std::process::{Command, Output};

fn orderly(args: &[&str], data: &Path, config: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_orderly"))
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .arg("--config")
        .arg(config)
        .env_remove("ORDERLY_CONFIG")
        .output()
        .unwrap()
}

#[test]
fn audit_finds_exactly_the_corrupted_entities_and_repair_fixes_them() {
    let topic = TestTopic::new(4);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config_file = topic.config_file(dir.path(), &data);
    let config = topic.config(&data);
    // 10,000 entities, two events each, the second one late.
    let mut events = Vec::new();
    for i in 0..10_000 {
        let id = format!("lead-{i}");
        events.push(event(
            &id,
            &format!("{id}-b"),
            "lead.updated",
            20,
            serde_json::json!({"stage": "won", "score": i}),
        ));
        events.push(event(
            &id,
            &format!("{id}-a"),
            "lead.updated",
            10,
            serde_json::json!({"stage": "new", "owner": "rep-1"}),
        ));
    }
    let (brokers, name) = (topic.brokers.clone(), topic.topic.clone());
    let store = run_to_quiet(config.clone(), config.handlers(), 20_000, move || {
        common::produce_events(&brokers, &name, &events);
    });
    drop(store); // the CLI opens the store itself

    // Corrupt three entities through the store API.
    {
        let store = SledStore::open(&data, 16).unwrap();
        for (id, field) in [
            ("lead-7", "stage"),
            ("lead-4242", "score"),
            ("lead-9999", "owner"),
        ] {
            let mut r = store.load_entity(id).unwrap().unwrap();
            r.state
                .fields
                .insert(field.into(), Value::String("corrupt".into()));
            if id == "lead-9999" {
                r.state.fields.insert("bogus".into(), Value::Int(1));
            }
            store.put_entity(&r).unwrap();
        }
    }

    // --entity reports exactly the corrupted fields.
    let out = orderly(&["audit", "--entity", "lead-9999"], &data, &config_file);
    assert_eq!(out.status.code(), Some(3));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("2 field(s) differ"), "{text}");
    assert!(
        text.contains("owner: stored \"corrupt\" replayed \"rep-1\""),
        "{text}"
    );
    assert!(text.contains("bogus: stored 1 replayed null"), "{text}");
    let clean = orderly(&["audit", "--entity", "lead-8"], &data, &config_file);
    assert!(clean.status.success());
    assert!(String::from_utf8_lossy(&clean.stdout).contains("0 field(s) differ"));

    // --all reports exactly the corrupted entities.
    let report_path = dir.path().join("report.json");
    let out = orderly(
        &["audit", "--all", "--report", report_path.to_str().unwrap()],
        &data,
        &config_file,
    );
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report_path).unwrap()).unwrap();
    assert_eq!(report["entities_checked"], 10_000);
    assert_eq!(report["entities_differing"], 3);
    assert_eq!(report["fields_differing"], 4);
    let mut differing: Vec<String> = report["differences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["entity_id"].as_str().unwrap().to_owned())
        .collect();
    differing.sort();
    assert_eq!(differing, ["lead-4242", "lead-7", "lead-9999"]);

    // The shards cover every entity exactly once.
    let mut checked = 0;
    let mut found = Vec::new();
    for shard in ["0/3", "1/3", "2/3"] {
        let path = dir.path().join(format!("shard-{}.json", &shard[..1]));
        let out = orderly(
            &[
                "audit",
                "--all",
                "--shard",
                shard,
                "--report",
                path.to_str().unwrap(),
            ],
            &data,
            &config_file,
        );
        assert!(out.status.code() == Some(0) || out.status.code() == Some(3));
        let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(r["shard"], shard);
        checked += r["entities_checked"].as_u64().unwrap();
        for d in r["differences"].as_array().unwrap() {
            found.push(d["entity_id"].as_str().unwrap().to_owned());
        }
    }
    found.sort();
    assert_eq!(checked, 10_000);
    assert_eq!(found, differing);

    // --repair fixes the corruption, emits a correction each, and a second audit is clean.
    let out = orderly(
        &[
            "audit",
            "--all",
            "--repair",
            "--report",
            report_path.to_str().unwrap(),
        ],
        &data,
        &config_file,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = orderly(
        &["audit", "--all", "--report", report_path.to_str().unwrap()],
        &data,
        &config_file,
    );
    assert!(out.status.success());
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report_path).unwrap()).unwrap();
    assert_eq!(report["entities_differing"], 0);
    let store = SledStore::open(&data, 16).unwrap();
    let r = store.load_entity("lead-9999").unwrap().unwrap();
    assert_eq!(
        orderly::model::value::fields_to_json(&r.state.fields),
        serde_json::json!({"stage": "won", "score": 9999, "owner": "rep-1"})
    );
    let corrections: Vec<serde_json::Value> = store
        .outbox(100)
        .unwrap()
        .into_iter()
        .flat_map(|(_, bundle)| bundle)
        .filter(|o| o.topic == config.changes_topic)
        .map(|o| serde_json::from_slice(&o.value).unwrap())
        .collect();
    assert_eq!(corrections.len(), 3);
    assert!(corrections
        .iter()
        .all(|c| c["kind"] == "correction" && c["event_type"] == "repair"));
}

#[test]
fn state_as_of_gives_the_right_version_for_an_out_of_order_entity() {
    let topic = TestTopic::new(1);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut config = topic.config(&data);
    for (t, c) in config.types.iter_mut() {
        c.history = t.starts_with("appointment.");
    }
    let config_file = dir.path().join("orderly.toml");
    std::fs::write(&config_file, toml::to_string(&config).unwrap()).unwrap();
    let a = |id: &str, v: u64, at: i64, p: serde_json::Value| {
        let mut e = event(
            "appt-1",
            id,
            if v == 1 {
                "appointment.scheduled"
            } else {
                "appointment.rescheduled"
            },
            at,
            p,
        );
        e.version = Some(v);
        e
    };
    // Arrival order 1, 3, 2, 5, 4: versions 2 and 4 are late.
    let events = [
        a(
            "v1",
            1,
            1_000,
            serde_json::json!({"status": "scheduled", "at": 100}),
        ),
        a("v3", 3, 3_000, serde_json::json!({"at": 300})),
        a("v2", 2, 2_000, serde_json::json!({"at": 200, "room": "A"})),
        a("v5", 5, 5_000, serde_json::json!({"at": 500})),
        a("v4", 4, 4_000, serde_json::json!({"room": "B"})),
    ];
    let (brokers, name) = (topic.brokers.clone(), topic.topic.clone());
    drop(run_to_quiet(
        config.clone(),
        config.handlers(),
        5,
        move || {
            common::produce_events(&brokers, &name, &events);
        },
    ));

    let as_of = |t: &str| -> serde_json::Value {
        let out = orderly(
            &["state", "get", "appt-1", "--as-of", t],
            &data,
            &config_file,
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["complete"], true);
        v["state"].clone()
    };
    assert_eq!(
        as_of("1500"),
        serde_json::json!({"status": "scheduled", "at": 100})
    );
    assert_eq!(
        as_of("2500"),
        serde_json::json!({"status": "scheduled", "at": 200, "room": "A"})
    );
    // RFC 3339 works too: 1970-01-01T00:00:04.5Z is 4,500 ms.
    assert_eq!(
        as_of("1970-01-01T00:00:04.5Z"),
        serde_json::json!({"status": "scheduled", "at": 300, "room": "B"})
    );

    // history lists the five versions in order, with provenance.
    let out = orderly(&["state", "history", "appt-1"], &data, &config_file);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let versions: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ids: Vec<&str> = versions
        .iter()
        .map(|v| v["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["v1", "v2", "v3", "v4", "v5"]);
    assert_eq!(
        versions[4]["state"],
        serde_json::json!({"status": "scheduled", "at": 500, "room": "B"})
    );
    assert!(versions
        .iter()
        .all(|v| v["provenance"]["offset"].as_i64().is_some()));
}
