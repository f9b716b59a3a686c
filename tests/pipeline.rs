//! Scenario tests of the core pipeline on the embedded broker, in process.

mod common;

use common::{shuffled_stream, Oracle, TestTopic};
use orderly::metrics::Stats;
use orderly::pipeline::Pipeline;
use orderly::store::Store;
use orderly::tools::workload::{self, Format, Outgoing};
use std::time::{Duration, Instant};

/// Runs a pipeline until `expected` messages are durable, then shuts it down.
fn run_until_durable(
    config: orderly::config::Config,
    expected: u64,
    produce: impl FnOnce() + Send + 'static,
) -> std::sync::Arc<orderly::store::SledStore> {
    let handlers = config.handlers();
    actix::System::new().block_on(async move {
        let pipeline = Pipeline::start(config, handlers).expect("pipeline starts");
        let producer = std::thread::spawn(produce);
        let stats = pipeline.stats();
        let deadline = Instant::now() + Duration::from_secs(240);
        while Stats::get(&stats.writer.durable) < expected {
            assert!(
                pipeline.fatal().reason().is_none(),
                "pipeline failed: {:?}",
                pipeline.fatal().reason()
            );
            assert!(
                Instant::now() < deadline,
                "only {} of {expected} durable",
                Stats::get(&stats.writer.durable)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        producer.join().expect("producer");
        // Nothing beyond what was produced may show up.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(Stats::get(&stats.writer.durable), expected);
        let store = pipeline.store();
        pipeline.shutdown().expect("clean shutdown");
        store
    })
}

#[test]
fn shuffled_stream_with_duplicates_folds_to_the_oracle() {
    let topic = TestTopic::new(8);
    let dir = tempfile::tempdir().unwrap();
    // 1,000 entities x 20 distinct events, shuffled, plus 2% duplicates.
    let events = shuffled_stream(1_000, 20, 0.02, 7);
    assert!(events.len() >= 20_000);
    let oracle = Oracle::of(&events);
    let n = events.len() as u64;
    let (brokers, name) = (topic.brokers.clone(), topic.topic.clone());
    let to_send = events.clone();
    let store = run_until_durable(topic.config(dir.path()), n, move || {
        common::produce_events(&brokers, &name, &to_send);
    });
    let problems = oracle.diff(store.as_ref());
    assert!(
        problems.is_empty(),
        "{} mismatches, first: {:?}",
        problems.len(),
        &problems[..problems.len().min(5)]
    );
    // Every offset is checkpointed: the stored checkpoints cover the topic.
    let stored = store.checkpoints(&topic.topic).unwrap();
    assert_eq!(
        stored.values().sum::<i64>(),
        n as i64,
        "checkpoints {stored:?}"
    );
    topic.wait_all_committed(Duration::from_secs(30)).unwrap();
}

#[test]
fn malformed_messages_are_dead_lettered_and_processing_goes_on() {
    let topic = TestTopic::new(4);
    let dir = tempfile::tempdir().unwrap();
    let good = shuffled_stream(50, 4, 0.0, 3);
    let malformed = workload::malformed_samples();
    // An event a handler rejects: inc on a text field (the lead's stage).
    let rejected = Outgoing {
        key: Some(b"lead-0".to_vec()),
        value: br#"{"entity_id":"lead-0","tenant_id":"tenant-0","event_id":"bad-inc","type":"conversion.recorded","occurred_at":1700000099999,"payload":{"stage":1}}"#.to_vec(),
        headers: vec![("x-origin".into(), b"crm".to_vec())],
    };
    // An id with a NUL: store keys use NUL as their separator.
    let nul = Outgoing {
        key: Some(b"lead-0\0x".to_vec()),
        value: br#"{"entity_id":"lead-0\u0000x","tenant_id":"tenant-0","event_id":"nul-1","type":"lead.updated","occurred_at":1700000099999,"payload":{"stage":"x"}}"#.to_vec(),
        headers: Vec::new(),
    };
    let mut messages: Vec<Outgoing> = Vec::new();
    let mut bad = malformed.clone().into_iter().chain([rejected, nul]);
    for (i, e) in good.iter().enumerate() {
        messages.push(workload::message_of(e, Format::Proto));
        if i % 20 == 10 {
            if let Some(b) = bad.next() {
                messages.push(b);
            }
        }
    }
    messages.extend(bad);
    let n = messages.len() as u64;
    let kinds = malformed.len() + 2;
    assert!(kinds >= 7);
    let (brokers, name) = (topic.brokers.clone(), topic.topic.clone());
    let store = run_until_durable(topic.config(dir.path()), n, move || {
        common::produce_to(&brokers, &name, None, messages.into_iter());
    });

    let dls = store.dead_letters(0, 1000).unwrap();
    let mut codes: Vec<&str> = dls.iter().map(|d| d.code.as_str()).collect();
    codes.sort();
    assert_eq!(
        codes,
        [
            "bad_json",
            "bad_protobuf",
            "empty_message",
            "handler_permanent",
            "key_mismatch",
            "missing_entity_id",
            "missing_event_id",
            "nul_in_id",
            "payload_not_object"
        ]
    );
    for d in &dls {
        assert!(d.reason.len() > 20, "reason too terse: {d:?}");
        assert_eq!(d.topic, topic.topic);
        assert!(d.offset >= 0);
    }
    let handler = dls.iter().find(|d| d.code == "handler_permanent").unwrap();
    assert!(handler.reason.contains("stage"), "{}", handler.reason);
    assert_eq!(
        handler.headers,
        vec![("x-origin".to_string(), b"crm".to_vec())]
    );
    assert_eq!(handler.entity_id.as_deref(), Some("lead-0"));

    // The valid events around them are all applied, and the rejected event left lead-0 as the oracle says.
    let problems = Oracle::of(&good).diff(store.as_ref());
    assert!(problems.is_empty(), "{problems:?}");
    // The dead letters were published to the dead-letter topic, through the outbox.
    let published = topic.read_all(&topic.dead_letters, dls.len(), Duration::from_secs(20));
    assert_eq!(published.len(), dls.len());
    let first: serde_json::Value = serde_json::from_slice(&published[0]).unwrap();
    assert!(
        first["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{first}"
    );
    assert!(store.outbox(10).unwrap().is_empty(), "outbox drained");
}

#[test]
fn idle_actors_are_passivated_and_hot_entities_coalesce_writes() {
    let topic = TestTopic::new(2);
    let dir = tempfile::tempdir().unwrap();
    let mut config = topic.config(dir.path());
    config.idle_timeout_ms = 300;
    // 200 fully shuffled events per entity: retain enough to re-fold any of them.
    config.retention_events = 256;
    // Five hot entities with 200 events each: many land in the same batch.
    let events = shuffled_stream(5, 200, 0.0, 9);
    let (first, second) = events.split_at(600);
    let (first, second) = (first.to_vec(), second.to_vec());
    let handlers = config.handlers();
    let (brokers, name) = (topic.brokers.clone(), topic.topic.clone());
    let store = actix::System::new().block_on(async move {
        let pipeline = Pipeline::start(config, handlers).expect("pipeline starts");
        let stats = pipeline.stats();
        let wait = |n: u64| {
            let stats = stats.clone();
            async move {
                let deadline = Instant::now() + Duration::from_secs(60);
                while Stats::get(&stats.writer.durable) < n {
                    assert!(
                        Instant::now() < deadline,
                        "stuck at {}",
                        Stats::get(&stats.writer.durable)
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        let b = brokers.clone();
        let n1 = name.clone();
        std::thread::spawn(move || {
            common::produce_to(
                &b,
                &n1,
                None,
                first.iter().map(|e| workload::message_of(e, Format::Proto)),
            )
        })
        .join()
        .unwrap();
        wait(600).await;
        // Idle past the timeout with every write durable: all five are passivated.
        let deadline = Instant::now() + Duration::from_secs(10);
        while stats
            .entities
            .active_actors
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
        {
            assert!(Instant::now() < deadline, "actors were not passivated");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Each of the five was passivated at least once (under load an entity
        // may also go idle mid-stream, and come back).
        let passivated = Stats::get(&stats.entities.passivations);
        assert!(passivated >= 5, "{passivated} passivations");
        // Their next events start new actors that load the state from the store.
        std::thread::spawn(move || common::produce_events(&brokers, &name, &second))
            .join()
            .unwrap();
        wait(1000).await;
        let writes = Stats::get(&stats.writer.entity_writes);
        assert!(
            writes < 1000,
            "1,000 events of 5 entities took {writes} entity writes: no coalescing"
        );
        let store = pipeline.store();
        pipeline.shutdown().expect("clean shutdown");
        store
    });
    let problems = Oracle::of(&events).diff(store.as_ref());
    assert!(problems.is_empty(), "{problems:?}");
}

/// Produces `value` with key `key` and one header whose key is not valid
/// UTF-8, through librdkafka's own API: rdkafka's Rust API only takes `&str`
/// header keys, but other clients can write any bytes.
fn produce_with_a_binary_header_key(brokers: &str, topic: &str, key: &[u8], value: &[u8]) {
    use rdkafka::bindings as rd;
    use rdkafka::producer::{BaseProducer, Producer};
    let producer: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("producer");
    let topic = std::ffi::CString::new(topic).unwrap();
    let name = b"\xff\xfeorigin\0";
    let header = b"crm";
    let vu = |vtype, u| rd::rd_kafka_vu_t { vtype, u };
    let bytes = |vtype, b: &[u8]| {
        vu(
            vtype,
            rd::rd_kafka_vu_s__bindgen_ty_1 {
                mem: rd::rd_kafka_vu_s__bindgen_ty_1__bindgen_ty_1 {
                    ptr: b.as_ptr() as *mut _,
                    size: b.len(),
                },
            },
        )
    };
    let vus = [
        vu(
            rd::rd_kafka_vtype_t::RD_KAFKA_VTYPE_TOPIC,
            rd::rd_kafka_vu_s__bindgen_ty_1 {
                cstr: topic.as_ptr(),
            },
        ),
        bytes(rd::rd_kafka_vtype_t::RD_KAFKA_VTYPE_KEY, key),
        bytes(rd::rd_kafka_vtype_t::RD_KAFKA_VTYPE_VALUE, value),
        vu(
            rd::rd_kafka_vtype_t::RD_KAFKA_VTYPE_HEADER,
            rd::rd_kafka_vu_s__bindgen_ty_1 {
                header: rd::rd_kafka_vu_s__bindgen_ty_1__bindgen_ty_2 {
                    name: name.as_ptr().cast(),
                    val: header.as_ptr().cast(),
                    size: header.len() as isize,
                },
            },
        ),
    ];
    // SAFETY: every pointer in `vus` outlives the call, which copies them
    // (librdkafka copies key, value and headers unless told otherwise).
    let err =
        unsafe { rd::rd_kafka_produceva(producer.client().native_ptr(), vus.as_ptr(), vus.len()) };
    assert!(err.is_null(), "produceva failed");
    producer.flush(Duration::from_secs(10)).expect("flush");
}

/// A message whose header key is not valid UTF-8 is consumed like any
/// other: rdkafka's header iterator would panic on it, and the source
/// would stop consuming.
#[test]
fn a_header_key_that_is_not_utf8_does_not_stop_the_source() {
    let topic = TestTopic::new(2);
    let dir = tempfile::tempdir().unwrap();
    let mut events = shuffled_stream(20, 3, 0.0, 5);
    let odd = events.remove(events.len() / 2);
    let oracle = Oracle::of(
        &events
            .iter()
            .cloned()
            .chain([odd.clone()])
            .collect::<Vec<_>>(),
    );
    let n = events.len() as u64 + 1;
    let (brokers, name) = (topic.brokers.clone(), topic.topic.clone());
    let store = run_until_durable(topic.config(dir.path()), n, move || {
        let (first, rest) = events.split_at(events.len() / 2);
        common::produce_events(&brokers, &name, first);
        produce_with_a_binary_header_key(
            &brokers,
            &name,
            odd.entity_id.as_bytes(),
            &odd.to_proto_bytes(),
        );
        common::produce_events(&brokers, &name, rest);
    });
    let problems = oracle.diff(store.as_ref());
    assert!(problems.is_empty(), "{problems:?}");
    assert!(store.dead_letters(0, 10).unwrap().is_empty());
}

/// Batches compressed with each codec a producer may use (Java producers
/// often send zstd) are decoded, and their events fold to the oracle.
#[test]
fn batches_in_every_compression_codec_fold_to_the_oracle() {
    let topic = TestTopic::new(2);
    let dir = tempfile::tempdir().unwrap();
    let events = shuffled_stream(80, 5, 0.0, 11);
    let oracle = Oracle::of(&events);
    let n = events.len() as u64;
    let (brokers, name) = (topic.brokers.clone(), topic.topic.clone());
    let store = run_until_durable(topic.config(dir.path()), n, move || {
        let codecs = ["zstd", "lz4", "snappy", "gzip"];
        for (codec, chunk) in codecs.iter().zip(events.chunks(events.len() / 4 + 1)) {
            let mut kafka = orderly::config::KafkaConfig::default();
            kafka
                .producer
                .insert("compression.type".into(), (*codec).into());
            // Linger, so that messages travel in compressed batches.
            kafka.producer.insert("linger.ms".into(), "50".into());
            let messages = chunk.iter().map(|e| workload::message_of(e, Format::Proto));
            let sent = common::produce_with(&brokers, &name, None, kafka, messages);
            assert_eq!(sent, chunk.len() as u64, "{codec}");
        }
    });
    let problems = oracle.diff(store.as_ref());
    assert!(
        problems.is_empty(),
        "{:?}",
        &problems[..problems.len().min(5)]
    );
}

/// A 900 KB message of binary junk becomes a dead letter that keeps the
/// whole value in the store; the one published to the dead-letter topic is
/// cut to fit a Kafka message and says so, and every other event folds to
/// the oracle.
#[test]
fn a_900_kb_binary_junk_message_is_dead_lettered_and_published_cut() {
    let topic = TestTopic::new(1);
    let dir = tempfile::tempdir().unwrap();
    let events = shuffled_stream(10, 3, 0.0, 9);
    let oracle = Oracle::of(&events);
    let n = events.len() as u64 + 1;
    let junk: Vec<u8> = (0..900_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8 | 0x80)
        .collect();
    let sent = junk.clone();
    let (brokers, name) = (topic.brokers.clone(), topic.topic.clone());
    let config = topic.config(dir.path());
    let store = common::run_to_quiet(config.clone(), config.handlers(), n, move || {
        let (first, rest) = events.split_at(events.len() / 2);
        common::produce_events(&brokers, &name, first);
        common::produce_to(
            &brokers,
            &name,
            None,
            std::iter::once(Outgoing {
                key: Some(b"lead-junk".to_vec()),
                value: sent,
                headers: vec![],
            }),
        );
        common::produce_events(&brokers, &name, rest);
    });
    let problems = oracle.diff(store.as_ref());
    assert!(problems.is_empty(), "{problems:?}");
    let dls = store.dead_letters(0, 10).unwrap();
    assert_eq!(dls.len(), 1);
    assert_eq!(
        dls[0].value.as_deref(),
        Some(junk.as_slice()),
        "the store keeps it whole"
    );
    let published = topic.read_all(&topic.dead_letters, 1, Duration::from_secs(20));
    assert_eq!(published.len(), 1, "published, not stuck in the outbox");
    assert!(published[0].len() < 400_000, "{} bytes", published[0].len());
    let dl: serde_json::Value = serde_json::from_slice(&published[0]).unwrap();
    assert_eq!(dl["value_truncated"], true);
    assert_eq!(dl["value_bytes"], 900_000);
    assert!(
        dl["value"]["base64"].is_string(),
        "binary is base64: {}",
        dl["code"]
    );
    assert!(store.undeliverable(0, 10).unwrap().is_empty());
}
