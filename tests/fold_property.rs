//! Property: any arrival order of an entity's events, with duplicates, folds
//! to the in-order state (and to an independent oracle's).

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
    let one = (
        0..3u8,
        0..6i64,
        prop::option::of(0..4u64),
        prop::collection::btree_map("[abc]", 0..5i64, 0..3),
    );
    prop::collection::vec(one, 1..24).prop_map(|raw| {
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
    let h = handlers();
    let mut r = EntityRecord::new("e", "t");
    for (offset, e) in arrivals.iter().enumerate() {
        let origin = Origin::new(TopicPartition::new("in", 0), offset as i64);
        r.process(
            e,
            &origin,
            0,
            &h,
            &orderly::settings::TenantView::defaults(&Default::default()),
        )
        .expect("no handler error: set fields and inc fields are disjoint");
    }
    r
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
