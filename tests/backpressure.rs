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
    let handlers = config.handlers().with_default(std::sync::Arc::new(Slow));
    let handlers = config.types.keys().fold(handlers, |h, t| {
        h.with_handler(t.clone(), std::sync::Arc::new(Slow))
    });
    // The backlog: 200,000 events waiting before orderly starts.
    let spec = WorkloadSpec {
        events: 200_000,
        entities: 20_000,
        ..Default::default()
    };
    let sent = topic.produce(Workload::new(spec).map(|e| workload::message_of(&e, Format::Proto)));
    assert_eq!(sent, 200_000);
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
