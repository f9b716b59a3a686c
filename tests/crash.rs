//! Crash test: `orderly run` as a child process, killed with SIGKILL at random
//! moments while events flow, and restarted each time. At the end the state
//! equals the oracle and no event was applied twice.

mod common;

use common::{shuffled_stream, Oracle, OrderlyProcess, TestTopic};
use orderly::store::Store;
use orderly::tools::workload::{self, Format};
use rand::{Rng, SeedableRng};
use std::time::{Duration, Instant};

#[test]
fn sigkill_at_random_moments_loses_nothing_and_applies_nothing_twice() {
    let topic = TestTopic::new(8);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = topic.config_file(dir.path(), &data);
    let log = dir.path().join("orderly.log");

    let events = shuffled_stream(1_000, 20, 0.02, 11);
    let oracle = Oracle::of(&events);
    let (brokers, name) = (topic.brokers.clone(), topic.topic.clone());
    let producer = std::thread::spawn(move || {
        common::produce_to(
            &brokers,
            &name,
            Some(1_500.0),
            events
                .iter()
                .map(|e| workload::message_of(e, Format::Proto)),
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
    assert!(second.terminate(Duration::from_secs(30)).success());
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

    let spec = format!("{point}=exit@3");
    let mut first = OrderlyProcess::start(&config, &log, &[("ORDERLY_FAILPOINTS", &spec)]);
    let status = first.child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(orderly::failpoint::EXIT_CODE),
        "{point}: {}",
        first.log_tail()
    );
    assert!(std::fs::read_to_string(&log)
        .unwrap()
        .contains(&format!("fail point {point} fired")));

    let mut second = OrderlyProcess::start(&config, &log, &[]);
    if let Err(e) = topic.wait_all_committed(Duration::from_secs(90)) {
        panic!("{point}: {e}\nlog:\n{}", second.log_tail());
    }
    assert!(second.terminate(Duration::from_secs(30)).success());
    let store = orderly::store::SledStore::open(&data, 16).unwrap();
    let problems = Oracle::of(&events).diff(&store);
    assert!(
        problems.is_empty(),
        "{point}: {:?}",
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
    assert!(orderly.terminate(Duration::from_secs(30)).success());
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
