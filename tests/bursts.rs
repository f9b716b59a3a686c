//! A hot entity whose deliveries queue up in its actor's mailbox sends their
//! write intents to the writer together, and encodes its record once for
//! all of them: the state and the history are the same as event by event.

mod common;

use common::Oracle;
use orderly::metrics::Stats;
use orderly::pipeline::Pipeline;
use orderly::tools::broker::EmbeddedBroker;
use std::time::{Duration, Instant};

#[test]
fn a_hot_entitys_queued_events_share_one_encoding_of_its_record() {
    let broker = EmbeddedBroker::start(1).expect("embedded broker");
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::engine_config(&broker, dir.path(), "bursts");
    // Every version kept: a burst's history entries go with its last intent.
    config.types.insert(
        "lead.created".into(),
        orderly::config::TypeConfig {
            history: true,
            ..Default::default()
        },
    );
    let handlers = config.handlers();
    // Two hot entities, their events interleaved and injected as fast as
    // the feeder can: the actors fold more slowly than the shard routes, so
    // deliveries queue up in their mailboxes.
    let n = 2_000u64;
    let events: Vec<_> = (0..n as i64)
        .map(|i| {
            common::event(
                &format!("hot-{}", i % 2),
                &format!("e{i}"),
                "lead.created",
                1_000 + i,
                serde_json::json!({ "n": i, "parity": i % 2 }),
            )
        })
        .collect();
    let oracle = Oracle::of(&events);
    let store = actix::System::new().block_on(async move {
        let (pipeline, mut injector) = Pipeline::start_engine(config, handlers).unwrap();
        let (stats, fatal) = (pipeline.stats(), pipeline.fatal());
        let feeder = std::thread::spawn(move || {
            for e in events {
                injector.inject(e, 0);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        while Stats::get(&stats.writer.durable) < n {
            assert!(fatal.reason().is_none(), "stopped: {:?}", fatal.reason());
            assert!(Instant::now() < deadline, "events not durable within 60 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        feeder.join().unwrap();
        let encoded = Stats::get(&stats.writer.records_encoded);
        assert!(
            (2..n).contains(&encoded),
            "{n} events of 2 entities: their records were encoded {encoded} times"
        );
        let store = pipeline.store();
        pipeline.shutdown().unwrap();
        store
    });
    let diff = oracle.diff(&*store);
    assert!(diff.is_empty(), "state differs from the oracle: {diff:?}");
    for entity in ["hot-0", "hot-1"] {
        let history = orderly::store::Store::history(&*store, entity).unwrap();
        let ids: Vec<&str> = history.iter().map(|e| e.key.event_id.as_str()).collect();
        let want: Vec<String> = (0..n)
            .filter(|i| format!("hot-{}", i % 2) == entity)
            .map(|i| format!("e{i}"))
            .collect();
        assert_eq!(ids, want, "{entity}: every version, in order");
    }
}
