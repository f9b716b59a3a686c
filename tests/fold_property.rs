//! Properties of the fold:
//! - any arrival order of an entity's events, with duplicates, folds to the
//!   in-order state (and to an independent oracle's), within the retention;
//! - streams several times longer than the retention, delivered late by up
//!   to more than the retention, fold to an independent model of trimming:
//!   an event at or below the newest trimmed one is too late and dropped
//!   (the default policy), every other one is folded in order;
//! - two records of one entity (its events split between two partitions,
//!   some on both) merge to the fold of all of them, in either direction,
//!   and merging again adds nothing.

use orderly::model::envelope::Event;
use orderly::model::fold::{EntityRecord, Origin};
use orderly::model::handler::{FieldReducer, Handlers, ReduceOp};
use orderly::model::position::TopicPartition;
use orderly::model::value::Value;
use proptest::prelude::*;
use std::sync::Arc;

fn handlers() -> Handlers {
    Handlers::default()
        .with_handler("set", Arc::new(FieldReducer(ReduceOp::Set)))
        .with_handler("inc", Arc::new(FieldReducer(ReduceOp::Inc)))
        .with_handler("delete", Arc::new(FieldReducer(ReduceOp::Delete)))
}

/// Events of one entity: unique ids, types set/inc/delete, colliding
/// timestamps and optional versions, so the tie-breakers matter.
fn events() -> impl Strategy<Value = Vec<Event>> {
    events_of(1..24)
}

/// As [`events`], `len` of them.
fn events_of(len: std::ops::Range<usize>) -> impl Strategy<Value = Vec<Event>> {
    let one = (
        0..3u8,
        0..6i64,
        prop::option::of(0..4u64),
        prop::collection::btree_map("[abc]", 0..5i64, 0..3),
    );
    prop::collection::vec(one, len).prop_map(|raw| {
        raw.into_iter()
            .enumerate()
            .map(|(i, (t, at, version, fields))| {
                let (event_type, payload) = match t {
                    0 => (
                        "set",
                        fields
                            .into_iter()
                            .map(|(k, v)| (k, Value::Int(v)))
                            .collect(),
                    ),
                    1 => (
                        "inc",
                        fields
                            .into_iter()
                            .map(|(k, v)| (format!("n{k}"), Value::Int(v)))
                            .collect(),
                    ),
                    _ => ("delete", Default::default()),
                };
                Event {
                    entity_id: "e".into(),
                    tenant_id: "t".into(),
                    event_id: format!("ev{i:02}"),
                    event_type: event_type.into(),
                    occurred_at: at,
                    version,
                    payload,
                }
            })
            .collect()
    })
}

fn fold(arrivals: &[Event]) -> EntityRecord {
    fold_with(arrivals, 0, &view(32))
}

/// The default policies (late: recompute, too late: drop) with this retention.
fn view(retention: usize) -> orderly::settings::TenantView {
    use orderly::model::ordering::{LatePolicy, Policies, TooLatePolicy};
    orderly::settings::TenantView::defaults(&Policies::new(
        LatePolicy::Recompute,
        TooLatePolicy::Drop,
        retention,
        None,
    ))
}

/// `arrivals` processed in order, from `partition`.
fn fold_with(
    arrivals: &[Event],
    partition: i32,
    view: &orderly::settings::TenantView,
) -> EntityRecord {
    let h = handlers();
    let mut r = EntityRecord::new("e", "t");
    for (offset, e) in arrivals.iter().enumerate() {
        let origin = Origin::new(TopicPartition::new("in", partition), offset as i64);
        r.process(e, &origin, 0, &h, view)
            .expect("no handler error: set fields and inc fields are disjoint");
    }
    r
}

/// The order key: version, then external time, then event id.
fn key(e: &Event) -> (Option<u64>, i64, String) {
    (e.version, e.occurred_at, e.event_id.clone())
}

/// Each event delayed by up to `delays[i]` places: the arrival order of a
/// stream whose events are late by a bounded amount.
fn delayed(evs: &[Event], delays: &[usize]) -> Vec<Event> {
    let mut ranked: Vec<(usize, usize, &Event)> = evs
        .iter()
        .enumerate()
        .map(|(i, e)| (i + delays[i % delays.len()], i, e))
        .collect();
    ranked.sort_by_key(|(rank, i, _)| (*rank, *i));
    ranked.into_iter().map(|(_, _, e)| e.clone()).collect()
}

/// The trimming model, written apart from orderly's fold: the events that
/// are applied (not too late, not duplicates), in arrival order. The log
/// keeps the newest `retention` keys; a key at or below the newest key
/// trimmed from it is too late.
fn accepted(arrivals: &[Event], retention: usize) -> Vec<Event> {
    let mut log: std::collections::BTreeSet<(Option<u64>, i64, String)> = Default::default();
    let mut seen = std::collections::HashSet::new();
    let mut base: Option<(Option<u64>, i64, String)> = None;
    let mut out = Vec::new();
    for e in arrivals {
        let k = key(e);
        if seen.contains(&e.event_id) || base.as_ref().is_some_and(|b| k <= *b) {
            continue;
        }
        seen.insert(e.event_id.clone());
        log.insert(k);
        out.push(e.clone());
        while log.len() > retention {
            base = log.pop_first();
        }
    }
    out
}

/// What a generated long stream exercised.
#[derive(Default)]
struct Covered {
    trimmed: bool,
    too_late: bool,
    revived: bool,
}

fn covered(evs: &[Event], arrivals: &[Event], retention: usize) -> Covered {
    let kept = accepted(arrivals, retention);
    let mut in_order = kept.clone();
    in_order.sort_by_key(key);
    let revived = in_order.windows(2).any(|w| {
        w[0].event_type == "delete" && w[1].event_type != "delete" && !w[1].payload.is_empty()
    });
    Covered {
        trimmed: kept.len() > retention,
        too_late: kept.len() < evs.len(),
        revived,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]
    #[test]
    fn any_permutation_with_duplicates_folds_to_the_in_order_state(
        evs in events(),
        seed in any::<u64>(),
        dups in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
    ) {
        use rand::{seq::SliceRandom, SeedableRng};
        let mut in_order = evs.clone();
        in_order.sort_by(|a, b| (a.version, a.occurred_at, &a.event_id).cmp(&(b.version, b.occurred_at, &b.event_id)));
        let expected = fold(&in_order);

        let mut arrivals = evs.clone();
        for d in &dups {
            arrivals.push(d.get(&evs).clone());
        }
        arrivals.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
        let got = fold(&arrivals);

        prop_assert_eq!(&got.state, &expected.state);
        prop_assert_eq!(&got.high_water, &expected.high_water);
        prop_assert_eq!(got.counters.applied_events, evs.len() as u64);
        prop_assert_eq!(got.counters.duplicates, dups.len() as u64);
        // The provenance names the same writing event per field, whatever the order.
        let writers = |r: &EntityRecord| r.provenance.iter().map(|(k, p)| (k.clone(), p.event_id.clone())).collect::<Vec<_>>();
        prop_assert_eq!(writers(&got), writers(&expected));

        // And an oracle written apart from orderly's fold agrees.
        let (oracle, deleted) = oracle(&in_order);
        prop_assert_eq!(orderly::model::value::fields_to_json(&got.state.fields), oracle);
        // Deleted only while no later event wrote a field (`set`, or an `inc`).
        prop_assert_eq!(got.state.deleted, deleted);
    }
}

/// The long-stream generator: 33 to 80 events, a retention of 8, delays of
/// up to 20 places.
fn long_streams() -> impl Strategy<Value = (Vec<Event>, Vec<usize>, Vec<prop::sample::Index>)> {
    (
        events_of(33..80),
        prop::collection::vec(0..20usize, 1..40),
        prop::collection::vec(any::<prop::sample::Index>(), 0..8),
    )
}

const LONG_RETENTION: usize = 8;

/// The arrivals of a long stream: delayed, with duplicates re-sent after.
fn long_arrivals(evs: &[Event], delays: &[usize], dups: &[prop::sample::Index]) -> Vec<Event> {
    let mut arrivals = delayed(evs, delays);
    for (n, d) in dups.iter().enumerate() {
        let at = (d.index(arrivals.len()) + n) % arrivals.len();
        arrivals.insert(at, d.get(evs).clone());
    }
    arrivals
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    #[test]
    fn streams_longer_than_the_retention_fold_to_the_trimming_model(
        (evs, delays, dups) in long_streams(),
    ) {
        let arrivals = long_arrivals(&evs, &delays, &dups);
        let got = fold_with(&arrivals, 0, &view(LONG_RETENTION));
        let mut kept = accepted(&arrivals, LONG_RETENTION);
        kept.sort_by_key(key);
        let (fields, deleted) = oracle(&kept);
        prop_assert_eq!(orderly::model::value::fields_to_json(&got.state.fields), fields);
        prop_assert_eq!(got.state.deleted, deleted);
        prop_assert_eq!(got.counters.applied_events, kept.len() as u64);
        prop_assert!(got.log.len() <= LONG_RETENTION);
        // The newest event always counts.
        prop_assert_eq!(got.high_water.map(|h| h.event_id), evs.iter().max_by_key(|e| key(e)).map(|e| e.event_id.clone()));
    }

    #[test]
    fn two_records_of_one_entity_merge_to_the_fold_of_all_its_events(
        evs in events_of(1..9),
        sides in prop::collection::vec(0..3u8, 8),
        seed in any::<u64>(),
    ) {
        use rand::{seq::SliceRandom, SeedableRng};
        let h = handlers();
        let view = view(LONG_RETENTION);
        // Each event on partition 0, on partition 1, or on both.
        let mut on = [Vec::new(), Vec::new()];
        for (i, e) in evs.iter().enumerate() {
            let side = sides[i % sides.len()];
            if side != 1 { on[0].push(e.clone()); }
            if side != 0 { on[1].push(e.clone()); }
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        on[0].shuffle(&mut rng);
        on[1].shuffle(&mut rng);
        let (a, b) = (fold_with(&on[0], 0, &view), fold_with(&on[1], 1, &view));
        let mut in_order = evs.clone();
        in_order.sort_by_key(key);
        let (fields, deleted) = oracle(&in_order);
        for (mut into, from) in [(a.clone(), &b), (b.clone(), &a)] {
            into.merge(from, &h, &view);
            prop_assert_eq!(orderly::model::value::fields_to_json(&into.state.fields), fields.clone());
            prop_assert_eq!(into.state.deleted, deleted);
            prop_assert_eq!(into.counters.applied_events, evs.len() as u64);
            let again = into.merge(from, &h, &view);
            prop_assert_eq!(again.added, 0);
            prop_assert_eq!(orderly::model::value::fields_to_json(&into.state.fields), fields.clone());
        }
    }
}

/// The long-stream generator reaches what the property is for: in most
/// cases the log is trimmed, events come too late, and a delete is
/// followed by a write that revives the entity.
#[test]
fn the_long_streams_trim_come_too_late_and_revive() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = long_streams();
    let (mut trimmed, mut too_late, mut revived) = (0, 0, 0);
    for _ in 0..200 {
        let (evs, delays, dups) = strategy.new_tree(&mut runner).unwrap().current();
        let c = covered(&evs, &long_arrivals(&evs, &delays, &dups), LONG_RETENTION);
        trimmed += c.trimmed as u32;
        too_late += c.too_late as u32;
        revived += c.revived as u32;
    }
    eprintln!("trimmed {trimmed}, too late {too_late}, revived {revived} of 200");
    assert!(trimmed >= 190, "trimmed in {trimmed} of 200");
    assert!(too_late >= 50, "too-late events in {too_late} of 200");
    assert!(revived >= 100, "a revival in {revived} of 200");
}

/// The fields, and whether the entity is deleted, after `in_order`.
fn oracle(in_order: &[Event]) -> (serde_json::Value, bool) {
    let mut m = serde_json::Map::new();
    let mut deleted = false;
    for e in in_order {
        let p = orderly::model::value::fields_to_json(&e.payload);
        match e.event_type.as_str() {
            "set" => {
                m.extend(p.as_object().unwrap().clone());
                deleted = false;
            }
            "inc" => {
                for (k, v) in p.as_object().unwrap() {
                    let old = m.get(k).and_then(|o| o.as_i64()).unwrap_or(0);
                    m.insert(k.clone(), serde_json::json!(old + v.as_i64().unwrap()));
                    deleted = false;
                }
            }
            _ => {
                m.clear();
                deleted = true;
            }
        }
    }
    (serde_json::Value::Object(m), deleted)
}
