//! The command line end to end, as a user would drive it: `dev-broker`,
//! `produce`, `run` (stopped by SIGTERM), and `state get` / `state dump`.

mod common;

use common::{Oracle, OrderlyProcess};
use orderly::tools::workload::{Workload, WorkloadSpec};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn orderly() -> Command {
    Command::new(env!("CARGO_BIN_EXE_orderly"))
}

#[test]
fn dev_broker_produce_run_and_state() {
    // dev-broker prints its bootstrap address on stdout.
    let mut broker = orderly()
        .args(["dev-broker", "--topic", "crm:4", "--topic", "crm.dlq:1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(broker.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let brokers = line.trim().to_owned();
    assert!(brokers.starts_with("127.0.0.1:"), "{brokers:?}");

    // produce: a reproducible workload, in JSON.
    let spec = [
        "--events",
        "3000",
        "--entities",
        "100",
        "--seed",
        "3",
        "--late-ratio",
        "0.1",
        "--duplicate-ratio",
        "0.02",
    ];
    let produced = common::output_ok(
        orderly()
            .args([
                "produce",
                "--brokers",
                &brokers,
                "--topic",
                "crm",
                "--format",
                "json",
            ])
            .args(spec),
    );
    assert!(produced.contains("produced 3000 events"), "{produced}");
    let events: Vec<_> = Workload::new(WorkloadSpec {
        events: 3000,
        entities: 100,
        seed: 3,
        late_ratio: 0.1,
        duplicate_ratio: 0.02,
        ..Default::default()
    })
    .collect();

    // run: flags and the config file together.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("orderly.toml");
    let mut types = toml::Table::new();
    types.insert(
        "types".into(),
        toml::Value::try_from(orderly::config::Config::crm_types()).unwrap(),
    );
    types.insert("dead_letter_topic".into(), "crm.dlq".into());
    types.insert("admin_addr".into(), "127.0.0.1:0".into());
    types.insert(
        "kafka".into(),
        toml::Value::try_from(common::fast_group()).unwrap(),
    );
    std::fs::write(&config, toml::to_string(&types).unwrap()).unwrap();
    let log = dir.path().join("run.log");
    let mut run = OrderlyProcess::spawn(
        &[
            "run".as_ref(),
            "--config".as_ref(),
            config.as_os_str(),
            "--brokers".as_ref(),
            brokers.as_ref(),
            "--topic".as_ref(),
            "crm".as_ref(),
            "--group".as_ref(),
            "cli-test".as_ref(),
            "--data-dir".as_ref(),
            data.as_os_str(),
        ],
        &log,
        &[],
    );

    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "cli-test")
        .create()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let mut tpl = TopicPartitionList::new();
        let mut end = 0;
        for p in 0..4 {
            tpl.add_partition("crm", p);
            end += c
                .fetch_watermarks("crm", p, Duration::from_secs(5))
                .unwrap()
                .1;
        }
        let committed: i64 = c
            .committed_offsets(tpl, Duration::from_secs(5))
            .map(|t| {
                t.elements()
                    .iter()
                    .map(|e| {
                        if let Offset::Offset(o) = e.offset() {
                            o
                        } else {
                            0
                        }
                    })
                    .sum()
            })
            .unwrap_or(0);
        if committed == end {
            assert_eq!(end, 3000);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "committed {committed} of {end}: {}",
            run.log_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = run.terminate(Duration::from_secs(30));
    assert!(status.success(), "{}", run.log_tail());
    assert!(std::fs::read_to_string(&log)
        .unwrap()
        .contains("SIGTERM: draining and checkpointing"));

    // state dump: one JSON line per entity, equal to the oracle.
    let lines = common::state_dump(&data);
    let oracle = Oracle::of(&events);
    assert_eq!(lines.len(), oracle.state.len());
    for l in &lines {
        let id = l["entity_id"].as_str().unwrap();
        let (fields, deleted) = &oracle.state[id];
        assert_eq!(l["state"].as_object().unwrap(), fields, "{id}");
        assert_eq!(l["deleted"].as_bool().unwrap(), *deleted, "{id}");
        assert_eq!(
            l["applied_events"].as_u64().unwrap(),
            oracle.distinct[id],
            "{id}"
        );
    }

    // state get: one entity with provenance per field.
    let out = orderly()
        .args(["state", "get", "lead-0", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success());
    let rec: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let state = rec["state"].as_object().unwrap();
    for field in state.keys() {
        let p = &rec["provenance"][field];
        assert!(
            p["event_id"].as_str().unwrap().starts_with("lead-0-"),
            "{rec}"
        );
        assert_eq!(p["topic"], "crm");
        assert!(p["offset"].as_i64().unwrap() >= 0);
        assert!(p["processed_at"].as_i64().unwrap() > 0);
    }
    let missing = orderly()
        .args(["state", "get", "nobody", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no entity \"nobody\""));

    // A bad config names the field.
    let bad = orderly()
        .args(["run", "--data-dir"])
        .arg(dir.path().join("x"))
        .env("ORDERLY_BATCH_MAX", "many")
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("batch_max"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );

    let _ = broker.kill();
    let _ = broker.wait();
}

/// `orderly run --help` lists the knobs at the binary's own defaults.
#[test]
fn run_help_lists_the_defaults() {
    let out = orderly().args(["run", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    let defaults = orderly::config::Config::default();
    for knob in [
        format!("batch_max={}", defaults.batch_max),
        format!("store_cache_mb={}", defaults.store_cache_mb),
        format!("topic={}", defaults.topic),
    ] {
        assert!(help.contains(&knob), "`{knob}` is not in:\n{help}");
    }
}
