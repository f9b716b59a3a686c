//! Memory with large messages: 20,000 messages of 256 KB and a slow
//! handler, with `orderly run` in its own process so that its resident
//! memory is measured apart from the in-process broker's 5 GB. (It has a
//! test binary of its own: the broker's memory would count against the
//! in-process RSS bound of tests/backpressure.rs.)

mod common;

use common::TestTopic;
use orderly::tools::workload;
use std::time::{Duration, Instant};

/// What `orderly run` may hold with the memory knobs of the large-message
/// test, in MiB: sled's cache, the live actors' records, the in-flight
/// messages, librdkafka's prefetch queue,
/// and 300 MiB for everything else (code, allocator slack, librdkafka's
/// fetch buffers, sled's write buffers). Measured: about 350 MiB; without
/// the byte marks and the actors' byte budget (counting messages only),
/// 880 MiB after 30 s and growing with every second; without spilled
/// records (sled kept every record in memory), 600 MiB after 30 s and
/// growing likewise.
const LARGE_STORE_CACHE_MB: u64 = 64;
const LARGE_ACTORS_MB: u64 = 64;
const LARGE_IN_FLIGHT_MB: u64 = 32;
const LARGE_PREFETCH_KB: u64 = 16 * 1024;
const LARGE_RSS_BOUND_MIB: u64 =
    LARGE_STORE_CACHE_MB + LARGE_ACTORS_MB + LARGE_IN_FLIGHT_MB + LARGE_PREFETCH_KB / 1024 + 300;

/// 20,000 messages of 256 KB (5 GB) wait in the broker, and every handler
/// takes 50 ms. The count mark is set to admit them all (the whole
/// backlog, gigabytes). The byte marks and the actors' byte budget
/// keep `orderly run` under [`LARGE_RSS_BOUND_MIB`], while it makes progress.
///
/// librdkafka's mock broker keeps at most 5 MiB per partition (older
/// records are deleted), so the backlog is spread evenly over 1,250
/// partitions: 16 messages, 4.2 MB, each. So many partitions, with a
/// 16 MiB prefetch limit in all, share one prefetch queue
/// (`orderly::kafka::group_consumer`): a queue each would hold at least a
/// record batch per partition, over a gigabyte here.
#[test]
fn large_messages_and_a_slow_handler_keep_memory_under_the_byte_marks() {
    const PARTITIONS: i32 = 1_250;
    const ENTITIES_PER_PARTITION: usize = 4;
    const EVENTS_PER_ENTITY: usize = 4;
    const MESSAGES: usize = PARTITIONS as usize * ENTITIES_PER_PARTITION * EVENTS_PER_ENTITY;
    const PAYLOAD: usize = 256 * 1024;
    let topic = TestTopic::new(PARTITIONS);
    let dir = tempfile::tempdir().unwrap();
    let mut config = topic.config(&dir.path().join("data"));
    config.in_flight_mb_high = LARGE_IN_FLIGHT_MB;
    config.in_flight_mb_low = LARGE_IN_FLIGHT_MB / 2;
    config.actors_mb = LARGE_ACTORS_MB;
    config.store_cache_mb = LARGE_STORE_CACHE_MB;
    config.kafka.consumer.insert(
        "queued.max.messages.kbytes".into(),
        LARGE_PREFETCH_KB.to_string(),
    );
    // The count mark admits the whole backlog, so that the byte marks are
    // what bounds it.
    config.in_flight_high = MESSAGES;
    config.in_flight_low = MESSAGES / 2;
    let path = dir.path().join("orderly.toml");
    std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();

    // Entity ids, ENTITIES_PER_PARTITION for each partition (the producer's
    // partitioner: librdkafka's default).
    let mut per_partition = vec![Vec::new(); PARTITIONS as usize];
    let mut n = 0;
    while per_partition
        .iter()
        .any(|p| p.len() < ENTITIES_PER_PARTITION)
    {
        let id = format!("lead-{n}");
        n += 1;
        let p = orderly::partitioner::Partitioner::ConsistentRandom
            .partition(id.as_bytes(), PARTITIONS) as usize;
        if per_partition[p].len() < ENTITIES_PER_PARTITION {
            per_partition[p].push(id);
        }
    }
    let entities: Vec<String> = per_partition.into_iter().flatten().collect();

    // Random text: neither the broker's nor the store's compression flatters it.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut letter = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"[(x % 62) as usize] as char
    };
    let blobs: Vec<String> = (0..8)
        .map(|_| (0..PAYLOAD).map(|_| letter()).collect())
        .collect();
    let sent = topic.produce((0..MESSAGES).map(|i| {
        let entity = &entities[i % entities.len()];
        let value = format!(
            r#"{{"entity_id":"{entity}","tenant_id":"tenant-0","event_id":"e-{i}","type":"lead.updated","occurred_at":{},"payload":{{"note":"{}"}}}}"#,
            1_000 + i,
            blobs[i % blobs.len()]
        );
        workload::Outgoing {
            key: Some(entity.clone().into_bytes()),
            value: value.into_bytes(),
            headers: Vec::new(),
        }
    }));
    assert_eq!(sent, MESSAGES as u64);
    drop(blobs);
    let waiting: i64 = topic.end_offsets().values().sum();
    assert_eq!(
        waiting, MESSAGES as i64,
        "the mock broker kept every message"
    );

    let log = dir.path().join("orderly.log");
    let mut orderly = common::OrderlyProcess::start(
        &path,
        &log,
        &[(
            "ORDERLY_FAILPOINTS",
            "entity.handle=sleep(50)@1..1000000000",
        )],
    );
    let admin = orderly.admin_addr(Duration::from_secs(60));
    let pid = orderly.child.id();
    let started = Instant::now();
    let mut max_rss = 0;
    while started.elapsed() < Duration::from_secs(30) {
        max_rss = max_rss.max(common::rss_mib(&pid.to_string()));
        std::thread::sleep(Duration::from_millis(100));
    }
    let overview: serde_json::Value =
        reqwest::blocking::get(format!("http://{admin}/api/overview"))
            .and_then(|r| r.json())
            .expect("overview");
    let gauges = &overview["gauges"];
    let durable = common::metric(&admin, "orderly_events_durable_total");
    let max_bytes = gauges["max_in_flight_bytes"]
        .as_i64()
        .expect("max_in_flight_bytes");
    let max_in_flight = gauges["max_in_flight"].as_i64().expect("max_in_flight");
    let pauses = overview["counters"]["pauses"].as_u64().expect("pauses");
    eprintln!(
        "durable {durable}, max in flight {max_in_flight} events / {} MiB, pauses {pauses}, max RSS {max_rss} MiB (bound {LARGE_RSS_BOUND_MIB})",
        max_bytes >> 20
    );
    let status = orderly.terminate(Duration::from_secs(60));
    assert!(status.success(), "{}", orderly.log_tail());
    assert!(durable >= 50.0, "it made progress: {durable}");
    assert!(pauses >= 1, "the source paused");
    // The mark stops the source; the record copies of events already
    // admitted still join the count as the actors handle them.
    let mark = (LARGE_IN_FLIGHT_MB as i64) << 20;
    assert!(
        max_bytes >= mark,
        "the source outran the handlers up to the mark: {max_bytes} bytes"
    );
    assert!(max_bytes <= 2 * mark, "in flight reached {max_bytes} bytes");
    assert!(
        max_in_flight < 200,
        "the byte mark, not the count, bounded it: {max_in_flight} events"
    );
    assert!(
        max_rss < LARGE_RSS_BOUND_MIB,
        "RSS {max_rss} MiB passed {LARGE_RSS_BOUND_MIB} MiB"
    );
}
