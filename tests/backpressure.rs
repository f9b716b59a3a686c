//! Backpressure: with a slow handler and a large backlog, the events in
//! flight never exceed the high mark and memory stays bounded.

mod common;

use common::TestTopic;
use orderly::metrics::Stats;
use orderly::model::envelope::Event;
use orderly::model::handler::{EntityState, FieldReducer, Handler, HandlerError, ReduceOp};
use orderly::pipeline::Pipeline;
use orderly::settings::TenantSettings;
use orderly::tools::workload::{self, Format, Workload, WorkloadSpec};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

/// A handler that takes 1 ms per event.
struct Slow;

impl Handler for Slow {
    fn apply(
        &self,
        state: &mut EntityState,
        event: &Event,
        settings: &TenantSettings,
    ) -> Result<(), HandlerError> {
        std::thread::sleep(Duration::from_millis(1));
        FieldReducer(ReduceOp::Set).apply(state, event, settings)
    }
}

/// Every event type handled by [`Slow`].
fn slow_handlers(config: &orderly::config::Config) -> orderly::model::handler::Handlers {
    let handlers = config.handlers().with_default(std::sync::Arc::new(Slow));
    config.types.keys().fold(handlers, |h, t| {
        h.with_handler(t.clone(), std::sync::Arc::new(Slow))
    })
}

/// Produces `events` events over `entities` entities before orderly starts.
fn backlog(topic: &TestTopic, events: u64, entities: u64) {
    let spec = WorkloadSpec {
        events,
        entities,
        ..Default::default()
    };
    let sent = topic.produce(Workload::new(spec).map(|e| workload::message_of(&e, Format::Proto)));
    assert_eq!(sent, events);
}

fn rss_mib() -> u64 {
    common::rss_mib("self")
}

/// The process's resident memory may not pass this, with 200,000 events
/// waiting in the (in-process) broker and orderly draining them slowly.
const RSS_BOUND_MIB: u64 = 512;

#[test]
fn a_slow_handler_and_a_200k_backlog_keep_in_flight_under_the_high_mark() {
    let topic = TestTopic::new(4);
    let dir = tempfile::tempdir().unwrap();
    let mut config = topic.config(dir.path());
    config.in_flight_high = 2_000;
    config.in_flight_low = 1_000;
    config.store_cache_mb = 64;
    let handlers = slow_handlers(&config);
    // The backlog: 200,000 events waiting before orderly starts.
    backlog(&topic, 200_000, 20_000);
    let rss_before = rss_mib();
    actix::System::new().block_on(async move {
        let pipeline = Pipeline::start(config, handlers).unwrap();
        let stats = pipeline.stats();
        let started = Instant::now();
        let mut max_rss = 0;
        // Run while it drains slowly (about 2,000 events/s over 2 shards).
        while started.elapsed() < Duration::from_secs(12) {
            assert!(stats.source.in_flight.load(Relaxed) <= 2_000);
            max_rss = max_rss.max(rss_mib());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let durable = Stats::get(&stats.writer.durable);
        let max_in_flight = stats.source.max_in_flight.load(Relaxed);
        eprintln!("durable {durable}, max in flight {max_in_flight}, pauses {}, rss {rss_before} -> {max_rss} MiB", Stats::get(&stats.source.pauses));
        assert!(durable > 2_000, "it made progress: {durable}");
        assert!(durable < 150_000, "the backlog was still waiting: {durable}");
        assert!(max_in_flight <= 2_000, "in flight reached {max_in_flight}");
        assert!(Stats::get(&stats.source.pauses) >= 1, "the source paused");
        assert!(max_rss < RSS_BOUND_MIB, "RSS {max_rss} MiB passed {RSS_BOUND_MIB} MiB");
        pipeline.shutdown().unwrap();
    });
}

/// With a backlog on every partition, each partition advances at about the
/// same pace: the source reads a queue per partition, in turn, and
/// librdkafka's prefetch limits hold per partition, so a full prefetch of
/// some partitions cannot keep the others from being fetched. Measured by
/// the group's committed offsets, not by time.
#[test]
fn a_backlog_on_every_partition_drains_them_alike() {
    drains_alike(orderly::config::Assignor::CooperativeSticky);
}

/// The same with an eager assignor, whose `assign` replaces the whole
/// assignment: the queues split before it must stay apart.
#[test]
fn a_backlog_on_every_partition_drains_them_alike_with_an_eager_assignor() {
    drains_alike(orderly::config::Assignor::Range);
}

fn drains_alike(assignor: orderly::config::Assignor) {
    const PARTITIONS: i32 = 4;
    let topic = TestTopic::new(PARTITIONS);
    let dir = tempfile::tempdir().unwrap();
    let mut config = topic.config(dir.path());
    config.assignor = assignor;
    config.in_flight_high = 1_000;
    config.in_flight_low = 500;
    // A prefetch limit far below the backlog, so that it is what decides
    // which partitions are fetched: 200 messages in all, 50 a partition.
    // The bytes are enough for each partition to have a queue of its own
    // (1 MiB each: `orderly::kafka::MAX_BATCH_BYTES`).
    for (k, v) in [
        ("queued.min.messages", "200"),
        ("queued.max.messages.kbytes", "4096"),
    ] {
        config.kafka.consumer.insert(k.into(), v.into());
    }
    let handlers = slow_handlers(&config);
    backlog(&topic, 40_000, 8_000);
    let ends = topic.end_offsets();
    assert!(
        ends.values().all(|n| *n > 5_000),
        "every partition has a backlog: {ends:?}"
    );
    let committed = actix::System::new().block_on(async move {
        let pipeline = Pipeline::start(config, handlers).unwrap();
        // Until a fifth of the backlog is durable and committed.
        let committed = loop {
            let c = topic.committed();
            if c.values().filter(|o| **o > 0).sum::<i64>() >= 8_000 {
                break c;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        pipeline.shutdown().unwrap();
        committed
    });
    let mean = committed.values().map(|o| (*o).max(0)).sum::<i64>() / i64::from(PARTITIONS);
    eprintln!("committed {committed:?} of {ends:?}, mean {mean}");
    assert_eq!(committed.len(), PARTITIONS as usize, "{committed:?}");
    for (p, o) in &committed {
        assert!(
            *o >= mean / 2,
            "partition {p} advanced to {o} while the mean is {mean}: {committed:?}"
        );
    }
}
