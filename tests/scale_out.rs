//! Several `orderly run` instances in one consumer group, on the embedded
//! broker, with the changelog on: a member killed mid-stream and restarted,
//! and an instance with an empty data dir that restores what others built.

mod common;

use common::{Found, Oracle, OrderlyProcess, TestTopic};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const SUFFIX: &str = ".changelog";

/// The topic plus its changelog, and a config for instance `name`.
fn changelog_topic(t: &TestTopic) {
    t.broker
        .create_topic(&format!("{}{SUFFIX}", t.topic), t.partitions)
        .expect("changelog topic");
}

fn instance_config(t: &TestTopic, dir: &Path, name: &str) -> PathBuf {
    let mut config = t.config(&dir.join(format!("data-{name}")));
    config.changelog_suffix = SUFFIX.into();
    config.purge_after_ms = 2_000;
    // Static membership: a stopped member's partitions wait for it (for
    // the session timeout) instead of moving at once.
    config.instance_id = Some(name.into());
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
    path
}

fn start(dir: &Path, config: &Path, name: &str) -> OrderlyProcess {
    OrderlyProcess::start(config, &dir.join(format!("{name}.log")), &[])
}

/// `orderly state dump` of a stopped instance's data dir.
fn dump(data_dir: &Path) -> Vec<Found> {
    common::state_dump(data_dir)
        .iter()
        .map(Found::from_dump)
        .collect()
}

/// The union of the instances' dumps equals the oracle, each entity once.
fn check(oracle: &Oracle, dumps: Vec<Vec<Found>>) {
    let problems = oracle.diff_found(dumps.into_iter().flatten());
    assert!(
        problems.is_empty(),
        "{} problems: {:#?}",
        problems.len(),
        &problems[..problems.len().min(20)]
    );
}

fn wait_for_log(p: &OrderlyProcess, needle: &str, timeout: Duration) {
    common::wait_until(
        &format!("{needle:?} in {}", p.log.display()),
        timeout,
        || p.own_log().contains(needle),
    );
}

#[test]
fn three_instances_share_twelve_partitions_through_a_kill_and_a_restart() {
    let t = TestTopic::new(12);
    changelog_topic(&t);
    let dir = tempfile::tempdir().unwrap();
    let configs: Vec<PathBuf> = (0..3)
        .map(|i| instance_config(&t, dir.path(), &format!("i{i}")))
        .collect();
    let mut instances: Vec<OrderlyProcess> = (0..3)
        .map(|i| start(dir.path(), &configs[i], &format!("i{i}")))
        .collect();
    for p in &instances {
        wait_for_log(p, "partition assigned", Duration::from_secs(60));
    }
    let events = common::shuffled_stream(600, 10, 0.02, 11);
    let oracle = Oracle::of(&events);
    let (brokers, topic) = (t.brokers.clone(), t.topic.clone());
    let (first, rest) = events.split_at(events.len() / 3);
    common::produce_events(&brokers, &topic, first);
    let rest = rest.to_vec();
    let producer = std::thread::spawn(move || {
        common::produce_to(
            &brokers,
            &topic,
            Some(1_500.0),
            rest.iter().map(|e| {
                orderly::tools::workload::message_of(e, orderly::tools::workload::Format::Proto)
            }),
        )
    });
    // Mid-stream: one member dies without a goodbye.
    std::thread::sleep(Duration::from_secs(2));
    instances[2].kill();
    // The survivors take over its partitions after the session timeout,
    // restoring them from the changelog; then it comes back.
    common::wait_until(
        "the killed member's partitions to move",
        Duration::from_secs(90),
        || {
            (0..2).any(|i| {
                std::fs::read_to_string(dir.path().join(format!("i{i}.log")))
                    .unwrap_or_default()
                    .contains("partition restored")
            })
        },
    );
    producer.join().unwrap();
    instances[2] = start(dir.path(), &configs[2], "i2");
    t.wait_all_committed(Duration::from_secs(180))
        .unwrap_or_else(|e| panic!("{e}\n{}", instances[0].log_tail()));
    // The group settles: every partition owned once, and the copies of
    // partitions an instance no longer owns purged.
    let admins: Vec<String> = instances
        .iter_mut()
        .map(|p| format!("http://{}", p.admin_addr(Duration::from_secs(30))))
        .collect();
    // An instance that does not answer counts as unsettled, not as one
    // that owns nothing.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut settled = 0;
    let mut last = String::new();
    while settled < 3 {
        assert!(
            Instant::now() < deadline,
            "the group never settled: {last}\n{}",
            instances
                .iter()
                .map(|p| format!("{}:\n{}", p.log.display(), p.log_tail()))
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_secs(1));
        let mut owners: BTreeMap<i64, usize> = BTreeMap::new();
        let mut stale = 0;
        let mut silent = Vec::new();
        for a in &admins {
            let body: serde_json::Value = match reqwest::blocking::get(format!(
                "{a}/api/partitions"
            ))
            .and_then(|r| r.json())
            {
                Ok(body) => body,
                Err(e) => {
                    silent.push(format!("{a}: {e}"));
                    continue;
                }
            };
            for p in body["partitions"].as_array().into_iter().flatten() {
                if p["assigned"] == true {
                    *owners.entry(p["partition"].as_i64().unwrap()).or_default() += 1;
                } else {
                    stale += 1;
                }
            }
        }
        let ok = silent.is_empty()
            && owners.len() == 12
            && owners.values().all(|n| *n == 1)
            && stale == 0;
        last = format!("owners {owners:?}, {stale} stale, not answering {silent:?}");
        settled = if ok { settled + 1 } else { 0 };
    }
    // `orderly partitions` shows each partition's owner.
    let mut args = vec!["partitions".to_owned()];
    for a in &admins {
        args.extend(["--admin".to_owned(), a.clone()]);
    }
    args.extend([
        "--brokers".into(),
        t.brokers.clone(),
        "--topic".into(),
        t.topic.clone(),
    ]);
    let table =
        common::output_ok(std::process::Command::new(env!("CARGO_BIN_EXE_orderly")).args(&args));
    let rows: Vec<&str> = table.lines().filter(|l| l.starts_with(&t.topic)).collect();
    assert_eq!(rows.len(), 12, "{table}");
    assert!(
        rows.iter()
            .all(|r| !r.contains("unassigned") && !r.contains("purged")),
        "{table}"
    );
    for p in instances.iter_mut() {
        assert!(
            p.terminate(Duration::from_secs(40)).success(),
            "{}",
            p.log_tail()
        );
    }
    let logs: String = (0..3)
        .map(|i| std::fs::read_to_string(dir.path().join(format!("i{i}.log"))).unwrap())
        .collect();
    assert!(logs.contains("partition restored"), "no restore happened");
    let dumps: Vec<_> = (0..3)
        .map(|i| dump(&dir.path().join(format!("data-i{i}"))))
        .collect();
    check(&oracle, dumps);
}

#[test]
fn an_instance_with_an_empty_data_dir_restores_and_continues() {
    let t = TestTopic::new(4);
    changelog_topic(&t);
    let dir = tempfile::tempdir().unwrap();
    let events = common::shuffled_stream(300, 8, 0.02, 5);
    let (before, after) = events.split_at(events.len() / 2);
    // Two instances build the state of the first half.
    let a = instance_config(&t, dir.path(), "a");
    let b = instance_config(&t, dir.path(), "b");
    let mut pa = start(dir.path(), &a, "a");
    let mut pb = start(dir.path(), &b, "b");
    t.produce_events(before);
    t.wait_all_committed(Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}\n{}", pa.log_tail()));
    pa.terminate_ok(Duration::from_secs(40));
    pb.terminate_ok(Duration::from_secs(40));
    // A new instance, empty data dir, owns every partition now.
    let c = instance_config(&t, dir.path(), "c");
    let mut pc = start(dir.path(), &c, "c");
    wait_for_log(&pc, "partition restored", Duration::from_secs(60));
    t.produce_events(after);
    t.wait_all_committed(Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}\n{}", pc.log_tail()));
    let addr = pc.admin_addr(Duration::from_secs(10));
    let restored = common::metric(&addr, "orderly_restore_records_total");
    assert!(restored >= 300.0, "restored {restored} records");
    pc.terminate_ok(Duration::from_secs(40));
    let dump_c = dump(&dir.path().join("data-c"));
    check(&Oracle::of(&events), vec![dump_c]);
}

#[test]
fn a_missing_changelog_topic_stops_start_up_and_says_which() {
    let t = TestTopic::new(3);
    let dir = tempfile::tempdir().unwrap();
    // No changelog topic created.
    let config = instance_config(&t, dir.path(), "lone");
    let mut p = start(dir.path(), &config, "lone");
    let mut status = None;
    common::wait_until("orderly to exit", Duration::from_secs(60), || {
        status = p.child.try_wait().unwrap();
        status.is_some()
    });
    assert!(!status.unwrap().success(), "{}", p.log_tail());
    let log = std::fs::read_to_string(&p.log).unwrap();
    assert!(
        log.contains(&format!(
            "{}{SUFFIX} has 0 partitions, {} has 3: create it",
            t.topic, t.topic
        )),
        "{log}"
    );
}

/// A changelog record that cannot be decoded (here an LZ4 block that claims
/// 4 GiB) quarantines its entity instead of stopping the instance: the
/// entity is parked, its events are held, the record is dead-lettered with
/// `corrupt_changelog_record`, and every other entity reaches the oracle.
/// Before, the restore failed and the instance stopped.
#[test]
fn a_corrupt_changelog_record_quarantines_its_entity_and_the_rest_flows() {
    let t = TestTopic::new(1);
    changelog_topic(&t);
    let dir = tempfile::tempdir().unwrap();
    let mut config = t.config(&dir.path().join("data"));
    config.changelog_suffix = SUFFIX.into();
    let events = common::shuffled_stream(20, 4, 0.0, 9);
    let victim = events[0].entity_id.clone();
    let changelog = format!("{}{SUFFIX}", t.topic);
    let junk = orderly::tools::workload::Outgoing {
        key: Some(victim.clone().into_bytes()),
        // Format 6, LZ4, a size prefix of 4 GiB - 1.
        value: vec![orderly::store::FORMAT_VERSION, 1, 0xff, 0xff, 0xff, 0xff, 0],
        headers: Vec::new(),
    };
    common::produce_to(&t.brokers, &changelog, None, std::iter::once(junk));
    let held = events.iter().filter(|e| e.entity_id == victim).count();
    let others: Vec<_> = events
        .iter()
        .filter(|e| e.entity_id != victim)
        .cloned()
        .collect();
    let oracle = Oracle::of(&others);
    let (brokers, name) = (t.brokers.clone(), t.topic.clone());
    let handlers = config.handlers();
    let store = common::run_to_quiet(config, handlers, events.len() as u64, move || {
        common::produce_events(&brokers, &name, &events);
    });
    use orderly::store::Store;
    let record = store
        .load_entity(&victim)
        .unwrap()
        .expect("the victim is kept");
    let parked = record
        .parking
        .parked
        .as_ref()
        .expect("the victim is parked");
    assert!(parked.reason.contains("quarantined"), "{}", parked.reason);
    assert_eq!(record.parking.held.len(), held, "its events are held");
    let dead: Vec<_> = store
        .dead_letters(0, 100)
        .unwrap()
        .into_iter()
        .filter(|d| d.code == "corrupt_changelog_record")
        .collect();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].entity_id.as_deref(), Some(victim.as_str()));
    assert_eq!(dead[0].topic, changelog);
    assert_eq!(store.parked().unwrap(), vec![victim.clone()]);
    let problems = oracle.diff_excluding(&*store, &[victim.as_str()]);
    assert!(
        problems.is_empty(),
        "{:?}",
        &problems[..problems.len().min(5)]
    );
}
