//! Unit tests of the fold.

use super::*;
use crate::model::handler::{FieldReducer, ReduceOp};
use crate::model::ordering::Policies;
use crate::model::position::TopicPartition;
use std::sync::Arc;

fn handlers() -> Handlers {
    Handlers::default()
        .with_handler("inc", Arc::new(FieldReducer(ReduceOp::Inc)))
        .with_handler("del", Arc::new(FieldReducer(ReduceOp::Delete)))
}

fn ev(id: &str, at: i64, t: &str, payload: serde_json::Value) -> Event {
    Event::test(id, at, t, payload)
}

fn pol(retention: usize) -> TenantView {
    TenantView::defaults(&Policies::new(
        LatePolicy::Recompute,
        TooLatePolicy::Drop,
        retention,
        None,
    ))
}

fn origin(offset: i64) -> Origin {
    at(0, offset)
}

fn at(partition: i32, offset: i64) -> Origin {
    Origin::new(TopicPartition::new("in", partition), offset)
}

/// The events of one entity split over two partitions, processed into
/// two records, merge into what one record of all of them holds.
#[test]
fn merging_two_partitions_records_gives_the_fold_of_the_union() {
    let h = handlers();
    let p = pol(32);
    let events: Vec<Event> = (0..12)
        .map(|i| {
            let payload = if i % 3 == 0 {
                serde_json::json!({"n": i})
            } else {
                serde_json::json!({"stage": format!("s{i}")})
            };
            ev(
                &format!("e{i}"),
                100 - i * 7 % 50,
                if i % 3 == 0 { "inc" } else { "set" },
                payload,
            )
        })
        .collect();
    let mut whole = EntityRecord::new("e", "t");
    let mut old = EntityRecord::new("e", "t");
    let mut new = EntityRecord::new("e", "t");
    for (i, e) in events.iter().enumerate() {
        whole.process(e, &at(0, i as i64), 0, &h, &p).unwrap();
        // Events 0-7 on the old partition, 5-11 on the new: 5-7 on both.
        if i < 8 {
            old.process(e, &at(1, i as i64), 0, &h, &p).unwrap();
        }
        if i >= 5 {
            new.process(e, &at(5, i as i64), 0, &h, &p).unwrap();
        }
    }
    old.placement.home = Some(Home::new("in", 1));
    new.placement.home = Some(Home::new("in", 5));
    let merged = new.merge(&old, &h, &p);
    assert_eq!(merged.added, 5);
    assert!(merged.handover);
    assert_eq!(new.state, whole.state);
    assert_eq!(new.counters.applied_events, 12);
    assert_eq!(new.counters.handovers, 1);
    assert_eq!(new.applied_offsets["in/1"], 7);
    // Idempotent: the same record again (a later stub) changes nothing.
    let again = new.merge(&old, &h, &p);
    assert_eq!((again.added, again.handover), (0, false));
    assert!(again.changes.is_empty());
    assert_eq!(new.counters.handovers, 1);
    // A redelivery from the old partition is still a duplicate.
    assert_eq!(
        new.process(&events[3], &at(1, 3), 0, &h, &p).unwrap(),
        Outcome::Duplicate(DuplicateKind::Redelivery)
    );
    // A stub forwards each offset once.
    assert!(old.forward(&at(1, 8)));
    assert!(!old.forward(&at(1, 8)));
}

#[test]
fn merging_keeps_the_base_that_folded_more() {
    let h = handlers();
    let mut old = EntityRecord::new("e", "t");
    for i in 0..6 {
        let e = ev(&format!("e{i}"), i * 10, "inc", serde_json::json!({"n": 1}));
        old.process(&e, &at(1, i), 0, &h, &pol(2)).unwrap();
    }
    assert!(old.base.key.is_some(), "retention 2 trimmed the old record");
    let mut new = EntityRecord::new("e", "t");
    let e = ev("e9", 90, "inc", serde_json::json!({"n": 1}));
    new.process(&e, &at(5, 0), 0, &h, &pol(2)).unwrap();
    let merged = new.merge(&old, &h, &pol(2));
    assert!(merged.rebased);
    assert_eq!(new.state.fields["n"], Value::Int(7));
    assert_eq!(new.counters.applied_events, 7);
}

#[test]
fn settings_map_filter_and_are_recorded_in_provenance() {
    use crate::model::tenant::SettingsDocument;
    let doc = |version, to: &str| SettingsDocument {
        tenant_id: "t".into(),
        version,
        field_mappings: [("Ext".to_owned(), to.to_owned())].into(),
        enabled_types: vec!["set".into()],
        ..Default::default()
    };
    let h = handlers();
    let mut r = EntityRecord::new("e", "t");
    let v1 = TenantView::single(doc(1, "a").compile(&Policies::default()).unwrap());
    r.process(
        &ev("e1", 10, "set", serde_json::json!({"Ext": 1})),
        &origin(0),
        0,
        &h,
        &v1,
    )
    .unwrap();
    assert_eq!(r.state.fields["a"], Value::Int(1));
    assert_eq!(r.provenance["a"].settings_version, 1);
    // A type the tenant has not enabled: ignored, but its offset counts.
    let off = ev("e2", 20, "inc", serde_json::json!({"a": 5}));
    let out = r.process(&off, &origin(1), 0, &h, &v1).unwrap();
    assert_eq!(
        out,
        Outcome::Ignored {
            settings_version: 1
        }
    );
    assert_eq!(r.state.fields["a"], Value::Int(1));
    assert_eq!(
        r.process(&off, &origin(1), 0, &h, &v1).unwrap(),
        Outcome::Duplicate(DuplicateKind::Redelivery)
    );
    // Version 2 maps Ext elsewhere: later events follow it, and a late
    // event's re-fold keeps what version 1 mapped.
    let v2 = v1.then(doc(2, "b").compile(&Policies::default()).unwrap());
    r.process(
        &ev("e3", 30, "set", serde_json::json!({"Ext": 3})),
        &origin(2),
        0,
        &h,
        &v2,
    )
    .unwrap();
    r.process(
        &ev("e0", 5, "set", serde_json::json!({"Ext": 0})),
        &origin(3),
        0,
        &h,
        &v2,
    )
    .unwrap();
    assert_eq!(r.state.fields["a"], Value::Int(1));
    assert_eq!(r.state.fields["b"], Value::Int(3));
    assert_eq!(r.provenance["a"].settings_version, 1);
    assert_eq!(r.provenance["b"].settings_version, 2);
    assert_eq!(r.counters.ignored_events, 1);
}

#[test]
fn late_event_refolds_and_reports_the_change() {
    let h = handlers();
    let mut r = EntityRecord::new("e", "t");
    r.process(
        &ev("a", 10, "set", serde_json::json!({"x": 1})),
        &origin(0),
        0,
        &h,
        &pol(8),
    )
    .unwrap();
    r.process(
        &ev("c", 30, "set", serde_json::json!({"x": 3})),
        &origin(1),
        0,
        &h,
        &pol(8),
    )
    .unwrap();
    // b is late and sets y (changes state) and x (overwritten by c: no change).
    let out = r
        .process(
            &ev("b", 20, "set", serde_json::json!({"x": 2, "y": 2})),
            &origin(2),
            0,
            &h,
            &pol(8),
        )
        .unwrap();
    let Outcome::Recomputed { changes, lateness } = out else {
        panic!("{out:?}")
    };
    assert_eq!(lateness.millis, 10);
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].field, "y");
    assert_eq!(r.state.fields["x"], Value::Int(3));
    assert_eq!(r.provenance["x"].event_id, "c");
    assert_eq!(r.provenance["y"].event_id, "b");
}

#[test]
fn duplicates_by_id_and_by_offset() {
    let h = handlers();
    let mut r = EntityRecord::new("e", "t");
    let e = ev("a", 10, "inc", serde_json::json!({"n": 1}));
    r.process(&e, &origin(5), 0, &h, &pol(8)).unwrap();
    assert_eq!(
        r.process(&e, &origin(5), 0, &h, &pol(8)).unwrap(),
        Outcome::Duplicate(DuplicateKind::Redelivery)
    );
    assert_eq!(
        r.process(&e, &origin(9), 0, &h, &pol(8)).unwrap(),
        Outcome::Duplicate(DuplicateKind::EventId)
    );
    assert_eq!(r.state.fields["n"], Value::Int(1));
    assert_eq!(r.counters.applied_events, 1);
}

#[test]
fn trimmed_events_live_on_in_the_base() {
    let h = handlers();
    let mut r = EntityRecord::new("e", "t");
    for i in 0..10 {
        r.process(
            &ev(
                &format!("e{i:02}"),
                i * 10,
                "inc",
                serde_json::json!({"n": 1}),
            ),
            &origin(i),
            0,
            &h,
            &pol(3),
        )
        .unwrap();
    }
    assert_eq!(r.log.len(), 3);
    assert_eq!(r.state.fields["n"], Value::Int(10));
    // Late, but within the retained window: re-folded on top of the base.
    let out = r
        .process(
            &ev("late", 75, "inc", serde_json::json!({"n": 5})),
            &origin(10),
            0,
            &h,
            &pol(3),
        )
        .unwrap();
    assert_eq!(out.name(), "late-recomputed");
    assert_eq!(r.state.fields["n"], Value::Int(15));
    // Older than everything retained: too late.
    let out = r
        .process(
            &ev("old", 5, "inc", serde_json::json!({"n": 5})),
            &origin(11),
            0,
            &h,
            &pol(3),
        )
        .unwrap();
    assert_eq!(out.name(), "too-late-dropped");
    assert_eq!(r.state.fields["n"], Value::Int(15));
}

#[test]
fn time_retention_trims_old_entries_into_the_base() {
    let h = handlers();
    let p = TenantView::defaults(&Policies::new(
        LatePolicy::Recompute,
        TooLatePolicy::Drop,
        100,
        Some(50),
    ));
    let mut r = EntityRecord::new("e", "t");
    for i in 0..10 {
        let e = ev(&format!("e{i}"), i * 10, "inc", serde_json::json!({"n": 1}));
        r.process(&e, &origin(i), 0, &h, &p).unwrap();
    }
    // The newest is at 90: entries before 40 are folded into the base.
    assert_eq!(r.log.first().unwrap().key.occurred_at, 40);
    assert_eq!(r.state.fields["n"], Value::Int(10));
    let late = ev("old", 15, "inc", serde_json::json!({"n": 1}));
    let out = r.process(&late, &origin(10), 0, &h, &p).unwrap();
    assert_eq!(out.name(), "too-late-dropped");
}

#[test]
fn rejected_event_leaves_state_unchanged() {
    let h = handlers();
    let mut r = EntityRecord::new("e", "t");
    r.process(
        &ev("a", 10, "set", serde_json::json!({"n": "text"})),
        &origin(0),
        0,
        &h,
        &pol(8),
    )
    .unwrap();
    let before = r.state.clone();
    let err = r
        .process(
            &ev("b", 20, "inc", serde_json::json!({"n": 1})),
            &origin(1),
            0,
            &h,
            &pol(8),
        )
        .unwrap_err();
    assert_eq!(err.error.kind(), "permanent");
    assert_eq!(r.state, before);
    // A failed attempt leaves no trace; giving up (as the actor does) is recorded.
    assert_eq!(r.counters.dead_lettered, 0);
    assert_eq!(
        r.applied_offsets["in/0"], 0,
        "the failed offset 1 is not recorded"
    );
    let b = ev("b", 20, "inc", serde_json::json!({"n": 1}));
    r.record_failure(&b, &origin(1), &err.to_string(), 0, false);
    assert_eq!(r.counters.dead_lettered, 1);
    assert_eq!(r.parking.skipped[0].event_id, "b");
    // Its redelivery is a duplicate, not a second dead letter.
    let again = r
        .process(
            &ev("b", 20, "inc", serde_json::json!({"n": 1})),
            &origin(1),
            0,
            &h,
            &pol(8),
        )
        .unwrap();
    assert_eq!(again, Outcome::Duplicate(DuplicateKind::Redelivery));
}

/// A parked entity holds at most `max_held` events: the next one is
/// rejected (`held_limit`) with its offset left unrecorded, so giving up on
/// it is recorded as any failure is; a redelivery of a held event is still
/// a duplicate; a release then processes what was held.
#[test]
fn a_parked_entity_holds_at_most_max_held_events() {
    let h = handlers();
    let mut policies = Policies::new(LatePolicy::Recompute, TooLatePolicy::Drop, 32, None);
    policies.max_held = 3;
    let p = TenantView::defaults(&policies);
    let mut r = EntityRecord::new("e", "t");
    let first = ev("e0", 10, "set", serde_json::json!({"stage": "a"}));
    r.record_failure(&first, &origin(0), "down", 0, true);
    assert!(r.parking.parked.is_some());
    for i in 1..3 {
        let e = ev(&format!("e{i}"), 10 + i, "set", serde_json::json!({"n": i}));
        assert_eq!(r.process(&e, &origin(i), 0, &h, &p).unwrap(), Outcome::Held);
    }
    assert_eq!(r.parking.held.len(), 3);
    let over = ev("e3", 20, "set", serde_json::json!({"n": 3}));
    let err = r.process(&over, &origin(3), 0, &h, &p).unwrap_err();
    assert_eq!(err.code(), HELD_LIMIT);
    assert!(err.to_string().contains("holds 3 events"), "{err}");
    assert_eq!(r.parking.held.len(), 3);
    assert_eq!(
        r.applied_offsets.get(&origin(3).topic_partition()),
        Some(&2)
    );
    // Giving up on it, even for a type that parks on failure, skips it: the
    // entity is parked already, so it is not held after all.
    r.record_failure(&over, &origin(3), &err.to_string(), 0, true);
    assert_eq!(r.parking.held.len(), 3);
    assert_eq!(r.parking.parked.as_ref().unwrap().event_id, "e0");
    assert_eq!(r.parking.skipped.last().unwrap().event_id, "e3");
    // A held event redelivered under a new offset is a duplicate, not over the limit.
    let again = ev("e1", 11, "set", serde_json::json!({"n": 1}));
    assert!(matches!(
        r.process(&again, &origin(4), 0, &h, &p),
        Ok(Outcome::Duplicate(_))
    ));
    let released = r.release(false, 0, &h, &p);
    assert_eq!(released.len(), 3);
    assert!(r.parking.parked.is_none());
    assert_eq!(r.state.fields.get("n"), Some(&Value::Int(2)));
}
