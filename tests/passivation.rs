//! `max_actors` bounds the live entity actors, also when more events are in
//! flight than it allows actors: the actors whose writes are still in
//! flight are kept, and passivated once durable. `actors_mb` bounds them
//! by the size of their records, below `max_actors`.

mod common;

use orderly::config::Config;
use orderly::metrics::Stats;
use orderly::pipeline::Pipeline;
use orderly::tools::broker::EmbeddedBroker;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

/// One shard that keeps `max_actors`, on an embedded broker, in a temp
/// dir; both are returned to be kept for the test's length.
fn one_shard(max_actors: usize) -> (EmbeddedBroker, tempfile::TempDir, Config) {
    let broker = EmbeddedBroker::start(1).expect("embedded broker");
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        max_actors,
        // Only the cap passivates here, not the idle timeout.
        idle_timeout_ms: 600_000,
        ..common::engine_config(&broker, dir.path(), "passivation")
    };
    (broker, dir, config)
}

/// Waits up to 60 s until `n` events are durable.
async fn until_durable(pipeline: &Pipeline, n: u64) {
    let (stats, fatal) = (pipeline.stats(), pipeline.fatal());
    let deadline = Instant::now() + Duration::from_secs(60);
    while Stats::get(&stats.writer.durable) < n {
        assert!(
            fatal.reason().is_none(),
            "the pipeline stopped: {:?}",
            fatal.reason()
        );
        assert!(Instant::now() < deadline, "events not durable within 60 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits up to 30 s, once every write is durable, until at most `cap`
/// actors are live (the shard's timer passivates every 5 s here); returns
/// how many are. `bound` names the bound, for the failure.
async fn until_live_at_most(pipeline: &Pipeline, cap: i64, bound: &str) -> i64 {
    let stats = pipeline.stats();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let live = stats.entities.active_actors.load(Relaxed);
        if live <= cap {
            return live;
        }
        assert!(
            Instant::now() < deadline,
            "{live} actors still live 30 s after every write was durable ({bound})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn live_actors_come_down_to_max_actors_after_a_burst_of_new_keys() {
    let (_broker, _dir, config) = one_shard(100);
    let handlers = config.handlers();
    // 3,000 new keys, all of them in flight at once (the in-flight mark is
    // 16,384): thirty times the cap in actors with writes not yet durable.
    let events: Vec<_> = (0..3_000)
        .map(|i| {
            common::event(
                &format!("lead-{i}"),
                &format!("e{i}"),
                "lead.created",
                1_000 + i,
                serde_json::json!({ "n": i }),
            )
        })
        .collect();
    let n = events.len() as u64;
    actix::System::new().block_on(async move {
        let (pipeline, mut injector) = Pipeline::start_engine(config, handlers).unwrap();
        let feeder = std::thread::spawn(move || {
            for e in events {
                injector.inject(e, 0);
            }
        });
        until_durable(&pipeline, n).await;
        feeder.join().unwrap();
        // Every actor is quiescent now; the shard's timer passivates down
        // to the cap.
        until_live_at_most(&pipeline, 100, "max_actors = 100").await;
        pipeline.shutdown().unwrap();
    });
}

/// Beyond `max_actors` the least recently *used* actor goes, not the
/// oldest one: an actor that had a delivery since is kept.
#[test]
fn the_least_recently_used_actor_is_the_one_passivated() {
    let (_broker, _dir, config) = one_shard(2);
    let handlers = config.handlers();
    actix::System::new().block_on(async move {
        let (pipeline, mut injector) = Pipeline::start_engine(config, handlers).unwrap();
        let stats = pipeline.stats();
        let fatal = pipeline.fatal();
        let mut sent = 0u64;
        // Sends one event of `entity` and waits until it is durable; returns
        // the actors started so far.
        let (stats_f, fatal_f) = (stats.clone(), fatal.clone());
        let mut send = move |entity: &str| {
            let (stats, fatal) = (&stats_f, &fatal_f);
            sent += 1;
            let e = common::event(
                entity,
                &format!("e{sent}"),
                "lead.created",
                1_000 + sent as i64,
                serde_json::json!({ "n": sent }),
            );
            injector.inject(e, 0);
            let deadline = Instant::now() + Duration::from_secs(30);
            while Stats::get(&stats.writer.durable) < sent {
                assert!(fatal.reason().is_none(), "{:?}", fatal.reason());
                assert!(Instant::now() < deadline, "event {sent} not durable");
                std::thread::sleep(Duration::from_millis(5));
            }
            Stats::get(&stats.entities.actor_starts)
        };
        let feeder = std::thread::spawn(move || {
            let mut starts = Vec::new();
            for entity in ["a", "b", "a", "c", "a", "b"] {
                starts.push(send(entity));
            }
            starts
        });
        while !feeder.is_finished() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let starts = feeder.join().unwrap();
        // a and b start; a is used again; c starts and b, used least
        // recently, is passivated (a was started first, but used since); a
        // is still live; b starts again.
        assert_eq!(starts, vec![1, 2, 2, 3, 3, 4]);
        assert_eq!(stats.entities.active_actors.load(Relaxed), 2);
        pipeline.shutdown().unwrap();
    });
}

/// `actors_mb` bounds the live actors by the size of their records, below
/// `max_actors`: 200 entities of about 20 KB each (20 KB of payload in the
/// state, and again in the log) do not fit in 1 MiB, so once their writes
/// are durable most are passivated, although `max_actors` would keep all.
#[test]
fn actors_mb_bounds_live_actors_with_large_records_below_max_actors() {
    let (_broker, _dir, mut config) = one_shard(10_000);
    config.actors_mb = 1;
    let handlers = config.handlers();
    // Text that LZ4 cannot shrink much; the bound counts the record before
    // compression anyway.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut text = |n: usize| -> String {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                char::from(b'a' + (x % 26) as u8)
            })
            .collect()
    };
    let events: Vec<_> = (0..200)
        .map(|i| {
            common::event(
                &format!("big-{i}"),
                &format!("e{i}"),
                "lead.created",
                1_000 + i,
                serde_json::json!({ "notes": text(20_000) }),
            )
        })
        .collect();
    let n = events.len() as u64;
    actix::System::new().block_on(async move {
        let (pipeline, mut injector) = Pipeline::start_engine(config, handlers).unwrap();
        for e in events {
            injector.inject(e, 0);
        }
        until_durable(&pipeline, n).await;
        // At least 40 KB of record each: at most 26 fit in 1 MiB.
        let live = until_live_at_most(&pipeline, 26, "actors_mb = 1, records of 40 KB").await;
        assert!(
            live > 0,
            "every actor passivated: the bound is 1 MiB, not 0"
        );
        pipeline.shutdown().unwrap();
    });
}
