//! Handler failures: transient ones are retried with backoff while the
//! entity's later events wait and other entities flow; permanent ones are
//! dead-lettered and then skipped, or park the entity until an operator
//! releases it.

mod common;

use common::{event, shuffled_stream, Oracle, TestTopic};
use orderly::metrics::Stats;
use orderly::model::envelope::Event;
use orderly::model::handler::{EntityState, FieldReducer, Handler, HandlerError, ReduceOp};
use orderly::pipeline::Pipeline;
use orderly::settings::TenantSettings;
use orderly::store::Store;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Fails event `fail_id` transiently `remaining` times, then applies `set`.
struct Flaky {
    fail_id: String,
    remaining: AtomicU32,
    first_failure: AtomicBool,
    succeeded: AtomicBool,
}

impl Handler for Flaky {
    fn apply(
        &self,
        state: &mut EntityState,
        event: &Event,
        settings: &TenantSettings,
    ) -> Result<(), HandlerError> {
        if event.event_id == self.fail_id {
            if self.remaining.load(SeqCst) > 0 {
                self.remaining.fetch_sub(1, SeqCst);
                self.first_failure.store(true, SeqCst);
                return Err(HandlerError::Transient(
                    "the billing service is restarting".into(),
                ));
            }
            self.succeeded.store(true, SeqCst);
        }
        FieldReducer(ReduceOp::Set).apply(state, event, settings)
    }
}

#[test]
fn transient_failures_are_retried_in_order_while_other_entities_flow() {
    let topic = TestTopic::new(4);
    let dir = tempfile::tempdir().unwrap();
    let mut config = topic.config(dir.path());
    config.retry_initial_ms = 100;
    let flaky = Arc::new(Flaky {
        fail_id: "f2".into(),
        remaining: AtomicU32::new(5),
        first_failure: AtomicBool::new(false),
        succeeded: AtomicBool::new(false),
    });
    let handlers = config
        .handlers()
        .with_handler("sync.updated", flaky.clone());
    let f = |id: &str, at: i64, v: serde_json::Value| event("flaky-1", id, "sync.updated", at, v);
    let flaky_events = [
        f("f1", 10, serde_json::json!({"step": 1, "a": 1})),
        f("f2", 20, serde_json::json!({"step": 2, "b": 1})),
        f("f3", 30, serde_json::json!({"step": 3})),
        f("f4", 25, serde_json::json!({"c": 1})), // late behind f3, still in order after the retries
        f("f5", 50, serde_json::json!({"step": 5})),
    ];
    let others = shuffled_stream(1_000, 20, 0.0, 13);
    // The flaky entity's events come first; 20,000 others follow.
    let all: Vec<Event> = flaky_events.iter().chain(others.iter()).cloned().collect();
    let expected = all.len() as u64;
    let (brokers, name) = (topic.brokers.clone(), topic.topic.clone());
    actix::System::new().block_on(async move {
        let pipeline = Pipeline::start(config, handlers).unwrap();
        let stats = pipeline.stats();
        std::thread::spawn(move || common::produce_events(&brokers, &name, &all));
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut at_first_failure = None;
        let mut at_success = None;
        while Stats::get(&stats.writer.durable) < expected {
            assert!(
                Instant::now() < deadline,
                "stuck at {}",
                Stats::get(&stats.writer.durable)
            );
            if at_first_failure.is_none() && flaky.first_failure.load(SeqCst) {
                at_first_failure = Some(Stats::get(&stats.writer.durable));
            }
            if at_success.is_none() && flaky.succeeded.load(SeqCst) {
                at_success = Some(Stats::get(&stats.writer.durable));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Retries may outlast everything else: then success is at the end.
        let success = at_success.unwrap_or_else(|| Stats::get(&stats.writer.durable));
        let first = at_first_failure.expect("f2 failed at least once");
        assert!(
            success - first >= 1_000,
            "only {} events of other entities completed during the retries",
            success - first
        );
        assert_eq!(Stats::get(&stats.entities.retries), 5);
        assert_eq!(Stats::get(&stats.entities.dead_letters), 0);
        let store = pipeline.store();
        pipeline.shutdown().unwrap();
        let r = store.load_entity("flaky-1").unwrap().unwrap();
        assert_eq!(
            orderly::model::value::fields_to_json(&r.state.fields),
            serde_json::json!({"step": 5, "a": 1, "b": 1, "c": 1})
        );
        assert_eq!(r.counters.applied_events, 5);
        assert_eq!(r.provenance["step"].event_id, "f5");
        assert_eq!(r.provenance["b"].event_id, "f2");
        let problems = Oracle::of(&others).diff_excluding(&*store, &["flaky-1"]);
        assert!(problems.is_empty(), "{problems:?}");
    });
}

#[test]
fn permanent_failures_skip_or_park_and_a_release_applies_the_event_in_order() {
    let topic = TestTopic::new(2);
    let dir = tempfile::tempdir().unwrap();
    let mut config = topic.config(dir.path());
    let validating = Arc::new(common::Validating {
        broken: AtomicBool::new(true),
    });
    let handlers = common::skip_and_park(&mut config, validating.clone());
    let i =
        |id: &str, at: i64, v: serde_json::Value| event("invoice-1", id, "invoice.updated", at, v);
    let c = |id: &str, at: i64, v: serde_json::Value| {
        event("contract-1", id, "contract.updated", at, v)
    };
    let events = [
        i("i1", 10, serde_json::json!({"total": 1})),
        i("i2", 20, serde_json::json!({"total": 2, "currency": "XTS"})),
        i("i3", 30, serde_json::json!({"status": "sent"})),
        c("c1", 10, serde_json::json!({"stage": "draft"})),
        c(
            "c2",
            20,
            serde_json::json!({"stage": "signed", "currency": "XTS", "x": 1}),
        ),
        c("c3", 30, serde_json::json!({"stage": "active"})),
        c("c4", 15, serde_json::json!({"y": 1})),
    ];
    let n = events.len() as u64;
    let (brokers, name) = (topic.brokers.clone(), topic.topic.clone());
    actix::System::new().block_on(async move {
        let pipeline = Pipeline::start(config, handlers).unwrap();
        let stats = pipeline.stats();
        std::thread::spawn(move || common::produce_events(&brokers, &name, &events))
            .join()
            .unwrap();
        common::wait_durable(&stats, n).await;
        let store = pipeline.store();
        // skip: a dead letter with the full reason, and the invoice moved on.
        let dls = store.dead_letters(0, 10).unwrap();
        let dl = dls
            .iter()
            .find(|d| d.entity_id.as_deref() == Some("invoice-1"))
            .expect("invoice dead letter");
        assert_eq!(dl.code, "handler_permanent");
        assert_eq!(dl.event_id.as_deref(), Some("i2"));
        assert!(
            dl.reason.contains("currency of i2 is not mapped")
                && dl.reason.contains("invoice.updated"),
            "{}",
            dl.reason
        );
        assert_eq!(dl.attempts, 1);
        assert_eq!(
            (dl.topic.as_str(), dl.offset >= 0),
            (topic.topic.as_str(), true)
        );
        let inv = store.load_entity("invoice-1").unwrap().unwrap();
        assert_eq!(
            orderly::model::value::fields_to_json(&inv.state.fields),
            serde_json::json!({"total": 1, "status": "sent"})
        );
        assert_eq!(inv.parking.skipped.len(), 1);
        assert_eq!(inv.parking.skipped[0].event_id, "i2");
        // park: the contract holds c2 and everything after it.
        let con = store.load_entity("contract-1").unwrap().unwrap();
        assert_eq!(con.parking.parked.as_ref().unwrap().event_id, "c2");
        assert_eq!(con.parking.held.len(), 3);
        assert_eq!(
            orderly::model::value::fields_to_json(&con.state.fields),
            serde_json::json!({"stage": "draft"})
        );
        // The cause is fixed; the release applies c2, c3 and c4 in order-key order.
        validating.broken.store(false, SeqCst);
        let released = pipeline
            .control()
            .resolve_parked("contract-1", false)
            .await
            .unwrap();
        assert_eq!(released.events, 3);
        tokio::time::sleep(Duration::from_millis(300)).await;
        pipeline.shutdown().unwrap();
        let con = store.load_entity("contract-1").unwrap().unwrap();
        assert!(con.parking.parked.is_none());
        // The in-order oracle of all four contract events.
        assert_eq!(
            orderly::model::value::fields_to_json(&con.state.fields),
            serde_json::json!({"stage": "active", "currency": "XTS", "x": 1, "y": 1})
        );
        assert_eq!(con.provenance["stage"].event_id, "c3");
        assert_eq!(con.counters.applied_events, 4);
    });
}

/// An outbox record the broker can never take (here, a change record over
/// the producer's `message.max.bytes`) is moved aside as undeliverable with
/// its reason, once; the records beside it are published exactly once, and
/// publishing goes on.
#[test]
fn an_outbox_record_the_broker_refuses_for_good_moves_aside_and_the_rest_publish_once() {
    let topic = TestTopic::new(1);
    let dir = tempfile::tempdir().unwrap();
    let mut config = topic.config(dir.path());
    config
        .kafka
        .producer
        .insert("message.max.bytes".into(), "2000".into());
    let big = "x".repeat(4_000);
    let mut events: Vec<Event> = (0..20)
        .map(|i| {
            event(
                &format!("lead-{i}"),
                &format!("small-{i}"),
                "lead.updated",
                1_000 + i,
                serde_json::json!({"n": i}),
            )
        })
        .collect();
    events.insert(
        7,
        event(
            "lead-big",
            "big",
            "lead.updated",
            1_000,
            serde_json::json!({"note": big}),
        ),
    );
    let n = events.len() as u64;
    let (brokers, name) = (topic.brokers.clone(), topic.topic.clone());
    let store = common::run_to_quiet(config.clone(), config.handlers(), n, move || {
        common::produce_events(&brokers, &name, &events);
    });
    // The outbox is empty (run_to_quiet waited for it); the big record is aside.
    let aside = store.undeliverable(0, 100).unwrap();
    assert_eq!(aside.len(), 1, "one undeliverable record");
    let (_, rec) = &aside[0];
    assert_eq!(rec.topic, config.changes_topic);
    let reason = rec
        .headers
        .iter()
        .find(|(k, _)| k == "orderly-undeliverable")
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        .expect("the reason header");
    assert!(reason.to_lowercase().contains("too large"), "{reason}");
    // Every other change record was published, once.
    let changes = common::read_json(&topic, &config.changes_topic, n as usize);
    let ids: Vec<&str> = changes
        .iter()
        .map(|c| c["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), n as usize - 1, "{ids:?}");
    let distinct: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len(), "no record published twice");
    assert!(!ids.contains(&"big"));
}

/// With the changelog on, an event that would make its entity's record
/// larger than a changelog message may be (a 600 KB note, which the record
/// holds twice: in its state and in its log) is dead-lettered with
/// `record_too_large`. The entity keeps its record, and its later events and
/// every other entity's reach the oracle. Before, the changelog refused the
/// record, the writer retried it for ever, and nothing after it became
/// durable.
#[test]
fn an_event_that_would_outgrow_a_changelog_message_is_dead_lettered() {
    let topic = TestTopic::new(2);
    topic
        .broker
        .create_topic(&format!("{}.changelog", topic.topic), 2)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = topic.config(dir.path());
    config.changelog_suffix = ".changelog".into();
    let mut events = shuffled_stream(20, 5, 0.0, 7);
    let first = events[0].clone();
    let big = event(
        &first.entity_id,
        "big",
        &first.event_type,
        first.occurred_at + 1,
        // Incompressible, so the stored (LZ4) record would stay over the limit.
        serde_json::json!({"note": (0..37_500)
            .map(|_| format!("{:016x}", rand::random::<u64>()))
            .collect::<String>()}),
    );
    let oracle = Oracle::of(&events);
    let mut produced = events.clone();
    produced.insert(events.len() / 2, big);
    events.clear();
    let (brokers, name) = (topic.brokers.clone(), topic.topic.clone());
    let handlers = config.handlers();
    let expected = produced.len() as u64;
    let store = common::run_to_quiet(config, handlers, expected, move || {
        common::produce_events(&brokers, &name, &produced);
    });
    let dead: Vec<_> = store
        .dead_letters(0, 100)
        .unwrap()
        .into_iter()
        .filter(|d| d.code == "record_too_large")
        .collect();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(
        dead[0].reason.contains("message.max.bytes"),
        "{}",
        dead[0].reason
    );
    assert_eq!(dead[0].entity_id.as_deref(), Some(first.entity_id.as_str()));
    let problems = oracle.diff(&*store);
    assert!(
        problems.is_empty(),
        "{:?}",
        &problems[..problems.len().min(5)]
    );
}
