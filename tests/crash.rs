//! Crash test: `orderly run` as a child process, killed with SIGKILL at random
//! moments while events flow, and restarted each time. At the end the state
//! equals the oracle and no event was applied twice.

mod common;

use common::{shuffled_stream, Oracle, OrderlyProcess, TestTopic};
use orderly::store::Store;
use orderly::tools::workload::{self, Format};
use rand::{Rng, SeedableRng};
use std::path::Path;
use std::time::{Duration, Instant};

#[test]
fn sigkill_at_random_moments_loses_nothing_and_applies_nothing_twice() {
    sigkill_loop(false);
}

#[test]
fn with_the_changelog_sigkill_at_random_moments_loses_nothing() {
    sigkill_loop(true);
}

/// Undecodable messages mixed into the stream: one every this many events.
const JUNK_EVERY: usize = 500;

/// SIGKILLs `orderly run` five times mid-stream, with the changelog on or
/// off, and checks what it promised: the state (the oracle, each event
/// applied once), each junk message's dead letter exactly once, and each
/// applied event's change record at least once.
fn sigkill_loop(changelog: bool) {
    let topic = TestTopic::new(8);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut c = topic.config(&data);
    // librdkafka's mock broker keeps 5 MiB per partition and deletes older
    // records: the change records (about 20,000 of a few hundred bytes,
    // more after redeliveries) go to a topic of 16 partitions, so that none
    // is deleted before it is read.
    c.changes_topic = format!("{}.changes", topic.topic);
    topic
        .broker
        .create_topic(&c.changes_topic, 16)
        .expect("changes topic");
    if changelog {
        c.changelog_suffix = ".changelog".into();
        topic
            .broker
            .create_topic(&format!("{}.changelog", topic.topic), 8)
            .expect("changelog topic");
    }
    let config = dir.path().join("orderly.toml");
    std::fs::write(&config, toml::to_string(&c).unwrap()).unwrap();
    let changes_topic = c.changes_topic.clone();
    let log = dir.path().join("orderly.log");

    let events = shuffled_stream(1_000, 20, 0.02, 11);
    let oracle = Oracle::of(&events);
    let applied: std::collections::HashSet<(String, String)> = events
        .iter()
        .map(|e| (e.entity_id.clone(), e.event_id.clone()))
        .collect();
    let junk = events.len() / JUNK_EVERY;
    let (brokers, name) = (topic.brokers.clone(), topic.topic.clone());
    let producer = std::thread::spawn(move || {
        common::produce_to(
            &brokers,
            &name,
            Some(1_500.0),
            events.iter().enumerate().flat_map(|(i, e)| {
                let junk = (i % JUNK_EVERY == JUNK_EVERY - 1).then(|| workload::Outgoing {
                    key: Some(format!("junk-{i}").into_bytes()),
                    value: b"\xff not an event".to_vec(),
                    headers: Vec::new(),
                });
                std::iter::once(workload::message_of(e, Format::Proto)).chain(junk)
            }),
        )
    });

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let mut orderly = OrderlyProcess::start(&config, &log, &[]);
    let committed = || topic.committed().values().filter(|o| **o > 0).sum::<i64>();
    for kill in 0..5 {
        // Kill while the instance is working: once it has committed progress
        // (it is draining the backlog that built up while it was down), at a
        // random moment within the next 400 ms.
        let before = committed();
        let deadline = Instant::now() + Duration::from_secs(60);
        while committed() == before && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(0..400)));
        assert!(
            orderly.child.try_wait().unwrap().is_none(),
            "orderly exited on its own: {}",
            orderly.log_tail()
        );
        orderly.kill();
        eprintln!("kill {} at {} committed", kill + 1, committed());
        orderly = OrderlyProcess::start(&config, &log, &[]);
    }
    let produced = producer.join().unwrap();
    if let Err(e) = topic.wait_all_committed(Duration::from_secs(120)) {
        panic!("{e}\nlog:\n{}", orderly.log_tail());
    }
    assert_change_records(&topic, &changes_topic, &applied, "sigkill loop");
    let status = orderly.terminate(Duration::from_secs(30));
    assert!(status.success(), "exit {status:?}: {}", orderly.log_tail());

    let store = orderly::store::SledStore::open(&data, 16).unwrap();
    let problems = oracle.diff(&store);
    assert!(
        problems.is_empty(),
        "{} mismatches, first: {:?}",
        problems.len(),
        &problems[..problems.len().min(5)]
    );
    // Each junk message has one dead letter, however often it was redelivered.
    let dead = store.dead_letters(0, 10_000).unwrap();
    let positions: std::collections::HashSet<(i32, i64)> =
        dead.iter().map(|d| (d.partition, d.offset)).collect();
    assert_eq!(dead.len(), junk, "{dead:?}");
    assert_eq!(positions.len(), junk, "one dead letter per message");
    assert!(dead.iter().all(|d| d
        .entity_id
        .as_deref()
        .is_some_and(|e| e.starts_with("junk-"))));
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(log_text.matches("pipeline started").count(), 6, "six runs");
    assert!(produced >= 20_000);
    // The kills did interrupt work in flight: some events were redelivered
    // after a restart, and every one was recognised and skipped.
    let redelivered: u64 = store
        .entities()
        .map(|r| r.unwrap().counters.redeliveries)
        .sum();
    eprintln!("redeliveries skipped: {redelivered}");
    assert!(
        redelivered > 0,
        "no kill landed between a flush and the next checkpoint; the test did not exercise replays"
    );
}

#[test]
fn crash_between_flush_and_kafka_commit_still_commits_after_restart() {
    let topic = TestTopic::new(2);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = topic.config_file(dir.path(), &data);
    let log = dir.path().join("orderly.log");
    let events = shuffled_stream(10, 3, 0.0, 1);
    topic.produce_events(&events);

    // The first run makes everything durable, then dies at its first Kafka commit.
    let mut first = OrderlyProcess::start(
        &config,
        &log,
        &[("ORDERLY_FAILPOINTS", "source.before_commit=exit")],
    );
    let status = first.child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(orderly::failpoint::EXIT_CODE),
        "{}",
        first.log_tail()
    );
    assert!(
        topic.committed().values().all(|o| *o < 0),
        "nothing was committed to Kafka"
    );

    // The restart finds nothing new to consume, and must still commit the stored checkpoints.
    let mut second = OrderlyProcess::start(&config, &log, &[]);
    if let Err(e) = topic.wait_all_committed(Duration::from_secs(60)) {
        panic!("{e}\nlog:\n{}", second.log_tail());
    }
    second.terminate_ok(Duration::from_secs(30));
    let store = orderly::store::SledStore::open(&data, 16).unwrap();
    assert!(Oracle::of(&events).diff(&store).is_empty());
}

/// Runs orderly with a fail point that makes it exit mid-commit, restarts it
/// without, and checks the oracle: nothing lost, nothing applied twice.
fn crash_at(point: &str) {
    let topic = TestTopic::new(4);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = topic.config_file(dir.path(), &data);
    let log = dir.path().join("orderly.log");
    let events = shuffled_stream(200, 10, 0.02, 3);
    topic.produce_events(&events);

    let mut second = crash_and_restart(&topic, &config, &log, point);
    second.terminate_ok(Duration::from_secs(30));
    assert_oracle(&Oracle::of(&events), &data, point);
}

/// Runs orderly with `point` set to exit on its third hit, checks that it
/// exited there, and restarts it without; returns the restarted process once
/// every produced offset is committed.
fn crash_and_restart(topic: &TestTopic, config: &Path, log: &Path, point: &str) -> OrderlyProcess {
    let spec = format!("{point}=exit@3");
    let mut first = OrderlyProcess::start(config, log, &[("ORDERLY_FAILPOINTS", &spec)]);
    let status = first.child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(orderly::failpoint::EXIT_CODE),
        "{point}: {}",
        first.log_tail()
    );
    assert!(std::fs::read_to_string(log)
        .unwrap()
        .contains(&format!("fail point {point} fired")));
    let second = OrderlyProcess::start(config, log, &[]);
    if let Err(e) = topic.wait_all_committed(Duration::from_secs(90)) {
        panic!("{point}: {e}\nlog:\n{}", second.log_tail());
    }
    second
}

/// The store in `data` (of a stopped instance) equals the oracle.
fn assert_oracle(oracle: &Oracle, data: &Path, what: &str) {
    let store = orderly::store::SledStore::open(data, 16).unwrap();
    let problems = oracle.diff(&store);
    assert!(
        problems.is_empty(),
        "{what}: {} mismatches, first: {:?}",
        problems.len(),
        &problems[..problems.len().min(5)]
    );
}

#[test]
fn crash_before_the_store_commit() {
    crash_at("writer.before_commit");
}

#[test]
fn crash_between_the_store_commit_and_the_flush() {
    crash_at("writer.before_flush");
}

#[test]
fn crash_after_the_flush_before_acknowledging() {
    crash_at("writer.after_flush");
}

#[test]
fn crash_before_the_kafka_commit() {
    crash_at("source.before_commit");
}

#[test]
fn store_failures_are_retried_and_nothing_is_acknowledged_until_durable() {
    let topic = TestTopic::new(2);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = topic.config_file(dir.path(), &data);
    let log = dir.path().join("orderly.log");
    let events = shuffled_stream(100, 10, 0.0, 5);
    // Flushes 3 to 6 fail; the writer retries the same batch until it succeeds.
    let mut orderly = OrderlyProcess::start(
        &config,
        &log,
        &[("ORDERLY_FAILPOINTS", "writer.before_flush=error@3..6")],
    );
    topic.produce_events(&events);
    if let Err(e) = topic.wait_all_committed(Duration::from_secs(90)) {
        panic!("{e}\nlog:\n{}", orderly.log_tail());
    }
    orderly.terminate_ok(Duration::from_secs(30));
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        text.matches("store write failed; retrying the batch")
            .count(),
        4,
        "{}",
        orderly.log_tail()
    );
    assert!(text.contains("store write succeeded after retries"));
    let store = orderly::store::SledStore::open(&data, 16).unwrap();
    let problems = Oracle::of(&events).diff(&store);
    assert!(problems.is_empty(), "{problems:?}");
}

/// With the changelog on: runs orderly with a fail point that makes it exit
/// in the writer, restarts it without, and checks what it promised besides
/// the state. Every applied event's change record is published (at least
/// once: they are keyed by entity and event id), and the changelog holds
/// every entity's final record: a fresh instance that restores all of it
/// from the changelog, with an empty data dir, reaches the oracle too.
fn crash_with_the_changelog_at(point: &str) {
    const SUFFIX: &str = ".changelog";
    let topic = TestTopic::new(4);
    topic
        .broker
        .create_topic(&format!("{}{SUFFIX}", topic.topic), 4)
        .expect("changelog topic");
    let dir = tempfile::tempdir().unwrap();
    let write_config = |name: &str| {
        let mut config = topic.config(&dir.path().join(format!("data-{name}")));
        config.changelog_suffix = SUFFIX.into();
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
        (path, config)
    };
    let (config_path, config) = write_config("a");
    let log = dir.path().join("a.log");
    let events = shuffled_stream(200, 10, 0.02, 3);
    topic.produce_events(&events);
    let oracle = Oracle::of(&events);

    let mut second = crash_and_restart(&topic, &config_path, &log, point);
    if point == "writer.before_changelog" {
        // The batch was durable in sled but not in the changelog: the
        // restart writes it there before consuming.
        assert!(
            std::fs::read_to_string(&log)
                .unwrap()
                .contains("wrote the changelog records a crash left pending"),
            "{}",
            second.log_tail()
        );
    }

    let expected: std::collections::HashSet<(String, String)> = events
        .iter()
        .map(|e| (e.entity_id.clone(), e.event_id.clone()))
        .collect();
    assert_change_records(&topic, &config.changes_topic, &expected, point);
    second.terminate_ok(Duration::from_secs(30));
    assert_oracle(&oracle, &config.data_dir, point);

    // A fresh instance restores everything from the changelog.
    let (fresh_path, fresh) = write_config("fresh");
    let fresh_log = dir.path().join("fresh.log");
    let mut third = OrderlyProcess::start(&fresh_path, &fresh_log, &[]);
    common::wait_until(
        "the fresh instance is assigned all four partitions",
        Duration::from_secs(90),
        || {
            std::fs::read_to_string(&fresh_log)
                .unwrap_or_default()
                .matches("partition assigned")
                .count()
                >= 4
        },
    );
    third.terminate_ok(Duration::from_secs(30));
    assert_oracle(
        &oracle,
        &fresh.data_dir,
        &format!("{point}, restored from the changelog"),
    );
}

#[test]
fn with_the_changelog_a_crash_before_the_store_commit_loses_no_change_record() {
    crash_with_the_changelog_at("writer.before_commit");
}

#[test]
fn with_the_changelog_a_crash_before_the_changelog_is_written_loses_no_record() {
    crash_with_the_changelog_at("writer.before_changelog");
}

/// The (entity, event) pairs of `expected` that no change record on
/// Asserts that a change record on `changes` names every (entity, event)
/// pair of `expected`, reading for up to 60 s; `context` heads the message.
fn assert_change_records(
    topic: &TestTopic,
    changes: &str,
    expected: &std::collections::HashSet<(String, String)>,
    context: &str,
) {
    let missing = missing_change_records(topic, changes, expected);
    assert!(
        missing.is_empty(),
        "{context}: {} of {} applied events have no change record, for example {:?}",
        missing.len(),
        expected.len(),
        &missing[..missing.len().min(5)]
    );
}

/// `changes` names, after reading for up to 60 s.
fn missing_change_records(
    topic: &TestTopic,
    changes: &str,
    expected: &std::collections::HashSet<(String, String)>,
) -> Vec<(String, String)> {
    let mut seen = std::collections::HashSet::new();
    let mut parsed = 0;
    topic.read_until(changes, Duration::from_secs(60), |read| {
        for m in &read[parsed..] {
            let c: serde_json::Value = serde_json::from_slice(m).expect("a change record is JSON");
            seen.insert((
                c["entity_id"].as_str().unwrap_or_default().to_owned(),
                c["event_id"].as_str().unwrap_or_default().to_owned(),
            ));
        }
        parsed = read.len();
        expected.is_subset(&seen)
    });
    expected.difference(&seen).cloned().collect()
}
