//! Out-of-order events: each policy, corrections, derived totals.

mod common;

use common::{event, late_on_arrival, read_json, run_to_quiet, shuffled_stream, Oracle, TestTopic};
use orderly::config::TypeConfig;
use orderly::model::handler::ReduceOp;
use orderly::model::ordering::LatePolicy;
use orderly::store::Store;
use orderly::tools::workload::{Workload, WorkloadSpec};
use rand::{seq::SliceRandom, SeedableRng};
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

fn produce(
    topic: &TestTopic,
    events: Vec<orderly::model::envelope::Event>,
) -> impl FnOnce() + Send + 'static {
    let (brokers, name) = (topic.brokers.clone(), topic.topic.clone());
    move || {
        common::produce_events(&brokers, &name, &events);
    }
}

#[test]
fn recompute_folds_a_stream_with_many_late_events_to_the_oracle() {
    let topic = TestTopic::new(4);
    let dir = tempfile::tempdir().unwrap();
    let events = shuffled_stream(300, 10, 0.02, 21);
    let late = late_on_arrival(&events);
    let distinct = Oracle::of(&events).distinct.values().sum::<u64>();
    assert!(
        late.len() as f64 >= 0.2 * distinct as f64,
        "{} late of {distinct}",
        late.len()
    );
    let config = topic.config(dir.path());
    let store = run_to_quiet(
        config.clone(),
        config.handlers(),
        events.len() as u64,
        produce(&topic, events.clone()),
    );
    let problems = Oracle::of(&events).diff(store.as_ref());
    assert!(
        problems.is_empty(),
        "{:?}",
        &problems[..problems.len().min(5)]
    );
    let recomputed: u64 = store
        .entities()
        .map(|r| r.unwrap().counters.late_events)
        .sum();
    assert_eq!(recomputed, late.len() as u64);
}

#[test]
fn apply_adds_late_counters_on_top_without_a_refold() {
    let topic = TestTopic::new(2);
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
    let mut events = Vec::new();
    for e in 0..50 {
        for i in 0..20 {
            events.push(event(
                &format!("acct-{e}"),
                &format!("c{i}"),
                "conversion.recorded",
                i * 10,
                serde_json::json!({"amount": i + 1, "conversions": 1}),
            ));
        }
    }
    events.shuffle(&mut rng);
    let late = late_on_arrival(&events);
    let mut config = topic.config(dir.path());
    config.types.insert(
        "conversion.recorded".into(),
        TypeConfig {
            reducer: ReduceOp::Inc,
            late_policy: Some(LatePolicy::Apply),
            ..Default::default()
        },
    );
    let store = run_to_quiet(
        config.clone(),
        config.handlers(),
        1000,
        produce(&topic, events.clone()),
    );
    for r in store.entities() {
        let r = r.unwrap();
        assert_eq!(
            r.state.fields["amount"],
            orderly::model::value::Value::Int(210),
            "{}",
            r.entity_id
        );
        assert_eq!(
            r.state.fields["conversions"],
            orderly::model::value::Value::Int(20)
        );
        assert_eq!(r.counters.late_events, 0, "no re-fold");
    }
    let applied: u64 = store
        .entities()
        .map(|r| r.unwrap().counters.late_applied)
        .sum();
    assert_eq!(applied, late.len() as u64);
    assert!(applied > 100);
}

#[test]
fn drop_discards_late_events_and_reports_each_one() {
    let topic = TestTopic::new(2);
    let dir = tempfile::tempdir().unwrap();
    let events = shuffled_stream(100, 8, 0.0, 8);
    let late = late_on_arrival(&events);
    let kept: Vec<_> = events
        .iter()
        .filter(|e| !late.contains(&(e.entity_id.clone(), e.event_id.clone())))
        .cloned()
        .collect();
    let mut config = topic.config(dir.path());
    config.default_late_policy = LatePolicy::Drop;
    let store = run_to_quiet(
        config.clone(),
        config.handlers(),
        events.len() as u64,
        produce(&topic, events.clone()),
    );
    // The state holds only the events that arrived in order.
    let oracle = Oracle::of(&kept);
    for r in store.entities() {
        let r = r.unwrap();
        let (fields, _) = &oracle.state[&r.entity_id];
        assert_eq!(
            orderly::model::value::fields_to_json(&r.state.fields)
                .as_object()
                .unwrap(),
            fields,
            "{}",
            r.entity_id
        );
    }
    // Each dropped event is an anomaly record, in the store and on the anomalies topic.
    let anomalies = store.anomalies(0, 100_000).unwrap();
    let reported: HashSet<(String, String)> = anomalies
        .iter()
        .filter(|a| a.class == "late" && a.outcome == "late-dropped" && a.policy == "drop")
        .map(|a| (a.entity_id.clone(), a.event_id.clone()))
        .collect();
    assert_eq!(reported, late);
    assert!(anomalies
        .iter()
        .all(|a| a.lateness.as_ref().is_some_and(|l| l.millis > 0)));
    let published = read_json(&topic, &config.anomalies_topic, anomalies.len());
    assert_eq!(published.len(), anomalies.len());
}

#[test]
fn park_holds_one_entity_while_others_flow_and_release_resumes_it_in_order() {
    let topic = TestTopic::new(2);
    let dir = tempfile::tempdir().unwrap();
    let mut config = topic.config(dir.path());
    config.types.insert(
        "ticket.updated".into(),
        TypeConfig {
            reducer: ReduceOp::Set,
            late_policy: Some(LatePolicy::Park),
            ..Default::default()
        },
    );
    let t =
        |id: &str, at: i64, v: serde_json::Value| event("ticket-1", id, "ticket.updated", at, v);
    let parked_stream = [
        t("a", 10, serde_json::json!({"status": "open", "a": 1})),
        t("c", 30, serde_json::json!({"status": "pending", "c": 1})),
        t("b", 20, serde_json::json!({"status": "assigned", "b": 1})), // late: parks the entity
        t("e", 50, serde_json::json!({"status": "closed"})),
        t("d", 40, serde_json::json!({"status": "solved", "d": 1})),
    ];
    let others = shuffled_stream(100, 5, 0.0, 2);
    let handlers = config.handlers();
    let (brokers, name) = (topic.brokers.clone(), topic.topic.clone());
    let all: Vec<_> = parked_stream.iter().chain(others.iter()).cloned().collect();
    let expected = all.len() as u64;
    actix::System::new().block_on(async move {
        let pipeline = orderly::pipeline::Pipeline::start(config, handlers).unwrap();
        let stats = pipeline.stats();
        std::thread::spawn(move || common::produce_events(&brokers, &name, &all))
            .join()
            .unwrap();
        while orderly::metrics::Stats::get(&stats.writer.durable) < expected {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Everyone else flowed; the parked ticket stopped after a and c.
        let store = pipeline.store();
        let problems = Oracle::of(&others).diff_excluding(store.as_ref(), &["ticket-1"]);
        assert!(problems.is_empty(), "{problems:?}");
        let r = store.load_entity("ticket-1").unwrap().unwrap();
        assert_eq!(r.parking.parked.as_ref().unwrap().event_id, "b");
        assert_eq!(r.parking.held.len(), 3);
        assert_eq!(
            orderly::model::value::fields_to_json(&r.state.fields),
            serde_json::json!({"status": "pending", "a": 1, "c": 1})
        );
        // Release: b, d and e are applied in order-key order.
        let released = pipeline
            .control()
            .resolve_parked("ticket-1", false)
            .await
            .unwrap();
        assert_eq!(released.events, 3);
        tokio::time::sleep(Duration::from_millis(500)).await;
        pipeline.shutdown().unwrap();
        let r = store.load_entity("ticket-1").unwrap().unwrap();
        assert!(r.parking.parked.is_none() && r.parking.held.is_empty());
        assert_eq!(
            orderly::model::value::fields_to_json(&r.state.fields),
            serde_json::json!({"status": "closed", "a": 1, "b": 1, "c": 1, "d": 1})
        );
        assert_eq!(r.provenance["status"].event_id, "e");
        assert_eq!(r.counters.applied_events, 5);
    });
}

#[test]
fn a_late_event_that_changes_a_field_emits_exactly_one_correction() {
    let topic = TestTopic::new(1);
    let dir = tempfile::tempdir().unwrap();
    let config = topic.config(dir.path());
    let e = |id: &str, at: i64, v: serde_json::Value| event("lead-9", id, "lead.updated", at, v);
    let events = vec![
        e("a", 10, serde_json::json!({"x": 1})),
        e("c", 30, serde_json::json!({"x": 3})),
        e("b", 20, serde_json::json!({"x": 2, "y": 5})), // late: y changes, x stays 3
        e("z", 5, serde_json::json!({"x": 0})),          // late: changes nothing
    ];
    let store = run_to_quiet(
        config.clone(),
        config.handlers(),
        4,
        produce(&topic, events),
    );
    let changes = read_json(&topic, &config.changes_topic, 4);
    assert_eq!(
        changes.len(),
        4,
        "one change record per applied event: {changes:?}"
    );
    let corrections: Vec<_> = changes
        .iter()
        .filter(|c| c["kind"] == "correction")
        .collect();
    assert_eq!(corrections.len(), 1, "{changes:?}");
    let c = corrections[0];
    assert_eq!(c["event_id"], "b");
    assert_eq!(
        c["changes"],
        serde_json::json!([{"field": "y", "old": null, "new": 5}])
    );
    assert_eq!(c["provenance"]["event_id"], "b");
    assert_eq!(c["lateness"]["millis"], 10);
    let z = changes.iter().find(|c| c["event_id"] == "z").unwrap();
    assert_eq!(z["kind"], "change");
    assert_eq!(z["changes"], serde_json::json!([]));
    let r = store.load_entity("lead-9").unwrap().unwrap();
    assert_eq!(
        orderly::model::value::fields_to_json(&r.state.fields),
        serde_json::json!({"x": 3, "y": 5})
    );
}

#[test]
fn derived_tenant_totals_equal_the_sum_of_distinct_conversions() {
    let topic = TestTopic::new(4);
    let dir = tempfile::tempdir().unwrap();
    let events: Vec<_> = Workload::new(WorkloadSpec {
        events: 6_000,
        entities: 300,
        tenants: 3,
        late_ratio: 0.15,
        duplicate_ratio: 0.05,
        seed: 77,
        ..Default::default()
    })
    .collect();
    let mut config = topic.config(dir.path());
    config.derived_topic = Some(topic.topic.replace("events-", "derived-"));
    config.observers = vec!["tenant_conversions".into()];
    let mut oracle: BTreeMap<String, i64> = BTreeMap::new();
    let mut seen = HashSet::new();
    for e in &events {
        if e.event_type == "conversion.recorded"
            && seen.insert((e.entity_id.clone(), e.event_id.clone()))
        {
            *oracle.entry(e.tenant_id.clone()).or_default() +=
                e.payload["amount"].as_f64().unwrap() as i64;
        }
    }
    assert_eq!(oracle.len(), 3);
    let store = run_to_quiet(
        config.clone(),
        config.handlers(),
        events.len() as u64,
        produce(&topic, events.clone()),
    );
    for (tenant, total) in &oracle {
        let r = store
            .load_entity(&orderly::model::observers::tenant_conversions_id(tenant))
            .unwrap()
            .expect("total exists");
        assert_eq!(
            r.state.fields["amount"],
            orderly::model::value::Value::Int(*total),
            "{tenant}"
        );
    }
}
