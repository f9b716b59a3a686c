//! Graceful shutdown, as Kubernetes does it: SIGTERM during processing. The
//! process drains what is in flight, leaves a checkpoint (in the store and
//! in Kafka) that covers every event whose effects are durable, and exits
//! within the configured grace period, even when a stage cannot finish. A
//! SIGTERM during start-up waits for the start.

mod common;

use common::{shuffled_stream, Oracle, OrderlyProcess, TestTopic};
use orderly::store::Store;
use std::time::{Duration, Instant};

fn durable(admin: &str) -> u64 {
    common::metric(admin, "orderly_events_durable_total") as u64
}

/// Runs `orderly run` until every message is durable, then stops it.
fn run_to_end(topic: &TestTopic, config: &std::path::Path, log: &std::path::Path) {
    let mut orderly = OrderlyProcess::start(config, log, &[]);
    topic
        .wait_all_committed(Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", orderly.log_tail()));
    orderly.terminate_ok(Duration::from_secs(60));
}

#[test]
fn sigterm_checkpoints_every_acknowledged_event_within_the_grace_period() {
    let topic = TestTopic::new(4);
    let events = shuffled_stream(400, 25, 0.02, 5);
    let produced = topic.produce_events(&events);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = topic.config_file(dir.path(), &data);
    let log = dir.path().join("orderly.log");
    // A small in-flight window keeps most of the topic unread when SIGTERM comes.
    let env = [
        ("ORDERLY_IN_FLIGHT_HIGH", "400"),
        ("ORDERLY_IN_FLIGHT_LOW", "200"),
        ("ORDERLY_SHUTDOWN_GRACE_MS", "10000"),
    ];
    let mut orderly = OrderlyProcess::start(&config, &log, &env);
    let admin = orderly.admin_addr(Duration::from_secs(60));
    let deadline = Instant::now() + Duration::from_secs(60);
    let before = loop {
        let d = durable(&admin);
        if d >= 500 {
            break d;
        }
        assert!(
            Instant::now() < deadline,
            "no progress; log:\n{}",
            orderly.log_tail()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(before < produced, "SIGTERM must come during processing");
    let sent = Instant::now();
    let status = orderly.terminate(Duration::from_secs(30));
    let took = sent.elapsed();
    assert!(status.success(), "clean exit; log:\n{}", orderly.log_tail());
    assert!(
        took < Duration::from_secs(12),
        "exited {took:?} after SIGTERM, grace is 10 s + 2 s"
    );
    drop(orderly);

    // The stored checkpoint covers every event whose effects are stored, and
    // Kafka has the same offsets.
    let store = orderly::store::SledStore::open(&data, 16).unwrap();
    let checkpoints = store.checkpoints(&topic.topic).unwrap();
    let stored: i64 = checkpoints.values().sum();
    assert!(
        stored as u64 >= before,
        "checkpoints {checkpoints:?} behind {before} acknowledged"
    );
    let mut entities = 0;
    for r in store.entities() {
        let r = r.unwrap();
        for (tp, offset) in &r.applied_offsets {
            let p: i32 = tp.rsplit('/').next().unwrap().parse().unwrap();
            let cp = checkpoints.get(&p).copied().unwrap_or(0);
            assert!(
                *offset < cp,
                "{}: applied offset {offset} of {tp} is not covered by checkpoint {cp}",
                r.entity_id
            );
        }
        entities += 1;
    }
    assert!(entities > 0);
    let committed = topic.committed();
    for (p, cp) in &checkpoints {
        assert_eq!(
            committed.get(p),
            Some(cp),
            "Kafka's committed offset of partition {p}"
        );
    }
    drop(store);

    // A restart continues from there: nothing lost, nothing applied twice.
    run_to_end(&topic, &config, &log);
    let store = orderly::store::SledStore::open(&data, 16).unwrap();
    let diff = Oracle::of(&events).diff(&store);
    assert!(diff.is_empty(), "{diff:?}");
}

#[test]
fn shutdown_gives_up_after_the_grace_period_when_the_store_keeps_failing() {
    let topic = TestTopic::new(2);
    let events = shuffled_stream(50, 10, 0.0, 9);
    topic.produce_events(&events);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = topic.config_file(dir.path(), &data);
    let log = dir.path().join("orderly.log");
    // The first batch becomes durable; every flush after it fails, so the
    // batches after it are written to the store and never flushed, and
    // nothing drains.
    let env = [
        ("ORDERLY_FAILPOINTS", "writer.before_flush=error@2..1000000"),
        ("ORDERLY_SHUTDOWN_GRACE_MS", "2000"),
    ];
    let mut orderly = OrderlyProcess::start(&config, &log, &env);
    let admin = orderly.admin_addr(Duration::from_secs(60));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("store write failed")
    {
        assert!(
            Instant::now() < deadline,
            "the fail point never fired; log:\n{}",
            orderly.log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let acknowledged = durable(&admin);
    let sent = Instant::now();
    let status = orderly.terminate(Duration::from_secs(30));
    let took = sent.elapsed();
    assert!(
        !status.success(),
        "an incomplete shutdown must not look clean"
    );
    assert!(
        took < Duration::from_secs(8),
        "exited {took:?} after SIGTERM, grace is 2 s + 2 s"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("shutdown exceeded the grace period"),
        "{text}"
    );
    drop(orderly);
    // Loss window 1: the checkpoints committed to Kafka at shutdown (the
    // revoke handler commits after its drain times out) cover only flushed
    // offsets. Each is the offset below which every event of its partition
    // is durable, so together they cover at most the acknowledged events;
    // counting written offsets as done would commit the unflushed batch,
    // and a partition restarting from Kafka's offset would skip it.
    let committed: i64 = topic.committed().values().filter(|o| **o > 0).sum();
    assert!(acknowledged > 0, "the first batch was to become durable");
    assert!(
        committed as u64 <= acknowledged,
        "Kafka holds checkpoints covering {committed} events, only {acknowledged} were durable"
    );

    // What was not acknowledged is processed by a healthy restart, once.
    run_to_end(&topic, &config, &log);
    let store = orderly::store::SledStore::open(&data, 16).unwrap();
    let diff = Oracle::of(&events).diff(&store);
    assert!(diff.is_empty(), "{diff:?}");
}

/// A SIGTERM while the pipeline is still starting waits for the start to
/// finish and then drains like any other, instead of killing the process
/// with the signal's default action. A broker address nobody listens on
/// holds the start for the five seconds the partition count's read waits;
/// the settings are open before that, after the handlers are installed.
#[test]
fn sigterm_during_start_up_waits_for_the_start_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("orderly.log");
    let data = dir.path().join("data");
    let brokers = format!("127.0.0.1:{}", common::free_port());
    let args = [
        "run".as_ref(),
        "--brokers".as_ref(),
        brokers.as_ref(),
        "--data-dir".as_ref(),
        data.as_os_str(),
    ];
    let mut orderly = OrderlyProcess::spawn(&args, &log, &[("ORDERLY_ADMIN_ADDR", "127.0.0.1:0")]);
    common::wait_until("the settings to be open", Duration::from_secs(30), || {
        orderly.own_log().contains("tenant settings caught up")
    });
    assert!(
        !orderly.own_log().contains("pipeline started"),
        "SIGTERM must come while the pipeline starts; log:\n{}",
        orderly.log_tail()
    );
    let status = orderly.terminate(Duration::from_secs(60));
    assert!(
        status.success(),
        "orderly exited with {status}; log:\n{}",
        orderly.log_tail()
    );
    let text = orderly.own_log();
    let started = text.find("pipeline started").expect("the start finished");
    let handled = text
        .find("SIGTERM: draining and checkpointing")
        .expect("the signal was handled");
    assert!(started < handled, "{}", orderly.log_tail());
}
