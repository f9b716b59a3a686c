//! Broker faults: request errors on Fetch, OffsetCommit and Produce, and a
//! broker that goes down. orderly keeps retrying, is not ready while it cannot
//! make progress, and resumes without loss.

mod common;

use common::{run_to_quiet_with, shuffled_stream, Oracle, TestTopic};

use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use std::time::{Duration, Instant};

#[test]
fn request_errors_and_a_broker_outage_lose_nothing() {
    let topic = TestTopic::new(4);
    let dir = tempfile::tempdir().unwrap();
    let config = topic.config(dir.path());
    let events = shuffled_stream(300, 10, 0.02, 17);
    let thirds: Vec<Vec<_>> = events
        .chunks(events.len() / 3 + 1)
        .map(|c| c.to_vec())
        .collect();
    let (brokers, name) = (topic.brokers.clone(), topic.topic.clone());
    let produce = move |batch: &[orderly::model::envelope::Event]| {
        common::produce_events(&brokers, &name, batch);
    };
    let cluster = topic.broker.cluster();
    let store = run_to_quiet_with(config, events.len() as u64, |control, durable| {
        produce(&thirds[0]);
        durable(thirds[0].len() as u64);
        // Retriable errors on fetches, offset commits and produces.
        cluster.request_errors(
            RDKafkaApiKey::Fetch,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION; 8],
        );
        cluster.request_errors(
            RDKafkaApiKey::OffsetCommit,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT; 8],
        );
        cluster.request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 4],
        );
        produce(&thirds[1]);
        durable((thirds[0].len() + thirds[1].len()) as u64);
        // The broker goes down for a while: orderly reports not ready.
        cluster.broker_down(1).unwrap();
        let down = Instant::now();
        let mut saw_not_ready = None;
        while down.elapsed() < Duration::from_secs(6) {
            if let Some(reason) = control.not_ready() {
                saw_not_ready = Some(reason);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        cluster.broker_up(1).unwrap();
        let reason = saw_not_ready.expect("not ready while the broker was down");
        assert!(reason.contains("brokers are down"), "{reason}");
        produce(&thirds[2]);
    });
    let problems = Oracle::of(&events).diff(store.as_ref());
    assert!(
        problems.is_empty(),
        "{:?}",
        &problems[..problems.len().min(5)]
    );
    topic.wait_all_committed(Duration::from_secs(60)).unwrap();
}
