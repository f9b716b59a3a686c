//! How an [`EntityRecord`] is stored (format 8): the record without the
//! copies its log repeats.
//!
//! The newest log entry usually wrote the values the state holds, and every
//! entry's provenance repeats its own order key and type. Format 7 stored
//! each of them twice, and LZ4 found the repeats at a cost of about 9,000
//! instructions per record written. This layout leaves them out instead:
//!
//! - a payload string the state holds, under the same name, is stored as
//!   a marker and read back from the state (strings only: they are the
//!   large values, and compared exactly, where floats would not be);
//! - an entry's provenance omits its event id, type and `occurred_at` when
//!   they are the entry's own, and its topic when it is the previous
//!   entry's;
//! - the high-water mark is a marker when it is the newest entry's key.
//!
//! Decoding puts every copy back: the record read is the record written.

use super::{Base, Counters, EntityRecord, LogEntry, Parking, Placement, Provenance};
use crate::model::handler::EntityState;
use crate::model::ordering::OrderKey;
use crate::model::value::{Fields, Value};
use serde::ser::SerializeSeq;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;
use std::sync::Arc;

/// The record as stored, borrowed from the record being written.
#[derive(Serialize)]
struct Out<'a> {
    entity_id: &'a str,
    tenant_id: &'a str,
    state: &'a EntityState,
    #[serde(serialize_with = "provenance_table")]
    provenance: &'a BTreeMap<String, Arc<Provenance>>,
    log: LogOut<'a>,
    high_water: HighWater<&'a OrderKey>,
    base: &'a Base,
    applied_offsets: &'a BTreeMap<String, i64>,
    counters: &'a Counters,
    parking: &'a Parking,
    placement: &'a Placement,
}

/// The record as read, before the copies are put back.
#[derive(Deserialize)]
struct In {
    entity_id: String,
    tenant_id: String,
    state: EntityState,
    #[serde(deserialize_with = "super::provenance_table::deserialize")]
    provenance: BTreeMap<String, Arc<Provenance>>,
    log: Vec<EntryIn>,
    high_water: HighWater<OrderKey>,
    base: Base,
    applied_offsets: BTreeMap<String, i64>,
    counters: Counters,
    parking: Parking,
    placement: Placement,
}

fn provenance_table<S: Serializer>(
    map: &&BTreeMap<String, Arc<Provenance>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    super::provenance_table::serialize(map, s)
}

/// The high-water mark: usually the newest entry's key.
#[derive(Serialize, Deserialize)]
enum HighWater<K> {
    None,
    NewestEntry,
    Key(K),
}

/// A payload value: usually the one the state holds.
#[derive(Serialize, Deserialize)]
enum Slot<V> {
    /// The state's string under the same name.
    InState,
    Value(V),
}

/// A log entry as stored; `None` is "the entry's own" (for the topic: the
/// previous entry's).
#[derive(Serialize)]
struct EntryOut<'a> {
    key: &'a OrderKey,
    event_type: &'a str,
    payload: PayloadOut<'a>,
    event_id: Option<&'a str>,
    provenance_type: Option<&'a str>,
    topic: Option<&'a str>,
    partition: i32,
    offset: i64,
    occurred_at: Option<i64>,
    processed_at: i64,
    settings_version: u64,
}

#[derive(Deserialize)]
struct EntryIn {
    key: OrderKey,
    event_type: String,
    payload: Vec<(String, Slot<Value>)>,
    event_id: Option<String>,
    provenance_type: Option<String>,
    topic: Option<String>,
    partition: i32,
    offset: i64,
    occurred_at: Option<i64>,
    processed_at: i64,
    settings_version: u64,
}

struct LogOut<'a> {
    log: &'a [LogEntry],
    state: &'a Fields,
}

struct PayloadOut<'a> {
    payload: &'a Fields,
    state: &'a Fields,
}

impl Serialize for LogOut<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.log.len()))?;
        let mut topic: Option<&str> = None;
        for e in self.log {
            let p = &e.provenance;
            let same_topic = topic == Some(p.topic.as_str());
            topic = Some(&p.topic);
            seq.serialize_element(&EntryOut {
                key: &e.key,
                event_type: &e.event_type,
                payload: PayloadOut {
                    payload: &e.payload,
                    state: self.state,
                },
                event_id: (p.event_id != e.key.event_id).then_some(&p.event_id),
                provenance_type: (p.event_type != e.event_type).then_some(&p.event_type),
                topic: (!same_topic).then_some(&p.topic),
                partition: p.partition,
                offset: p.offset,
                occurred_at: (p.occurred_at != e.key.occurred_at).then_some(p.occurred_at),
                processed_at: p.processed_at,
                settings_version: p.settings_version,
            })?;
        }
        seq.end()
    }
}

impl Serialize for PayloadOut<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.payload.len()))?;
        for (name, value) in self.payload {
            let slot = match (value, self.state.get(name)) {
                (Value::String(a), Some(Value::String(b))) if a == b => Slot::InState,
                _ => Slot::Value(value),
            };
            seq.serialize_element(&(name, slot))?;
        }
        seq.end()
    }
}

/// The record as stored.
pub fn serialize<S: Serializer>(r: &EntityRecord, s: S) -> Result<S::Ok, S::Error> {
    let newest = r.log.last().map(|e| &e.key);
    Out {
        entity_id: &r.entity_id,
        tenant_id: &r.tenant_id,
        state: &r.state,
        provenance: &r.provenance,
        log: LogOut {
            log: &r.log,
            state: &r.state.fields,
        },
        high_water: match &r.high_water {
            None => HighWater::None,
            Some(k) if Some(k) == newest => HighWater::NewestEntry,
            Some(k) => HighWater::Key(k),
        },
        base: &r.base,
        applied_offsets: &r.applied_offsets,
        counters: &r.counters,
        parking: &r.parking,
        placement: &r.placement,
    }
    .serialize(s)
}

/// The record [`serialize`] wrote; a marker without what it stands for is
/// an error.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<EntityRecord, D::Error> {
    use serde::de::Error;
    let r = In::deserialize(d)?;
    let mut log = Vec::with_capacity(r.log.len());
    let mut topic: Option<String> = None;
    for e in r.log {
        let payload = e
            .payload
            .into_iter()
            .map(|(name, slot)| {
                let value = match slot {
                    Slot::Value(v) => v,
                    Slot::InState => match r.state.fields.get(&name) {
                        Some(v @ Value::String(_)) => v.clone(),
                        _ => {
                            return Err(D::Error::custom(format!(
                                "a log entry's field `{name}` refers to a string the state does not hold"
                            )))
                        }
                    },
                };
                Ok((name, value))
            })
            .collect::<Result<Fields, _>>()?;
        if let Some(t) = e.topic {
            topic = Some(t);
        }
        let Some(topic) = topic.clone() else {
            return Err(D::Error::custom(
                "the first log entry does not name its topic",
            ));
        };
        let provenance = Provenance {
            event_id: e.event_id.unwrap_or_else(|| e.key.event_id.clone()),
            event_type: e.provenance_type.unwrap_or_else(|| e.event_type.clone()),
            topic,
            partition: e.partition,
            offset: e.offset,
            occurred_at: e.occurred_at.unwrap_or(e.key.occurred_at),
            processed_at: e.processed_at,
            settings_version: e.settings_version,
        };
        log.push(LogEntry {
            key: e.key,
            event_type: e.event_type,
            payload,
            provenance,
        });
    }
    let high_water = match r.high_water {
        HighWater::None => None,
        HighWater::Key(k) => Some(k),
        HighWater::NewestEntry => match log.last() {
            Some(e) => Some(e.key.clone()),
            None => {
                return Err(D::Error::custom(
                    "the high-water mark refers to an empty log",
                ))
            }
        },
    };
    Ok(EntityRecord {
        entity_id: r.entity_id,
        tenant_id: r.tenant_id,
        state: r.state,
        provenance: r.provenance,
        high_water,
        log,
        base: r.base,
        applied_offsets: r.applied_offsets,
        counters: r.counters,
        parking: r.parking,
        placement: r.placement,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::envelope::Event;
    use crate::model::handler::{FieldReducer, Handlers, ReduceOp};
    use crate::model::ordering::{LatePolicy, Policies, TooLatePolicy};
    use crate::model::position::{Origin, TopicPartition};
    use crate::model::tenant::TenantView;
    use proptest::prelude::*;

    fn round_trip(r: &EntityRecord) -> Result<EntityRecord, bincode::error::DecodeError> {
        let bytes = bincode::serde::encode_to_vec(r, bincode::config::standard()).unwrap();
        bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).map(|(r, _)| r)
    }

    fn value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            (-3i64..3).prop_map(Value::Int),
            prop_oneof![Just(f64::NAN), Just(0.0), Just(-0.0), Just(1.5)].prop_map(Value::Float),
            "[xy]{0,2}".prop_map(Value::String),
            "[xy]{0,2}".prop_map(|s| Value::Array(vec![Value::String(s)])),
        ]
    }

    /// One arriving event: its type, payload, occurred_at, topic and partition.
    fn arrival() -> impl Strategy<Value = (bool, Fields, i64, bool, i32)> {
        (
            any::<bool>(),
            proptest::collection::btree_map("[abc]", value(), 0..4),
            0i64..20,
            any::<bool>(),
            0i32..2,
        )
    }

    /// What a test changes in a log entry, so that its provenance is not
    /// its own: (event id, type, occurred_at) differ.
    fn tweak() -> impl Strategy<Value = (bool, bool, bool)> {
        (any::<bool>(), any::<bool>(), any::<bool>())
    }

    proptest! {
        /// Any record the fold leaves, with entries whose provenance is not
        /// their own and any high-water mark, reads back as written (by
        /// `Debug`, so that a NaN equals itself and -0.0 differs from 0.0).
        #[test]
        fn a_record_reads_back_as_written(
            arrivals in proptest::collection::vec(arrival(), 0..12),
            tweaks in proptest::collection::vec(proptest::option::of(tweak()), 0..12),
            high_water in proptest::option::of(proptest::option::of(0i64..20)),
            retention in 1usize..6,
        ) {
            let handlers = Handlers::default().with_handler("inc", std::sync::Arc::new(FieldReducer(ReduceOp::Inc)));
            let view = TenantView::defaults(&Policies::new(LatePolicy::Recompute, TooLatePolicy::Drop, retention, None));
            let mut r = EntityRecord::new("e", "t");
            for (i, (inc, payload, at, other, partition)) in arrivals.into_iter().enumerate() {
                let event = Event { payload, ..Event::test(&format!("v{i}"), at, if inc { "inc" } else { "set" }, serde_json::json!({})) };
                let topic = if other { "other" } else { "in" };
                let origin = Origin::new(TopicPartition::new(topic, partition), i as i64);
                let _ = r.process(&event, &origin, 1_000 + i as i64, &handlers, &view);
            }
            for (e, t) in r.log.iter_mut().zip(&tweaks) {
                if let Some((id, kind, at)) = t {
                    if *id { e.provenance.event_id.push('!'); }
                    if *kind { e.provenance.event_type.push('!'); }
                    if *at { e.provenance.occurred_at += 1; }
                }
            }
            if let Some(hw) = high_water {
                r.high_water = hw.map(|at| OrderKey { version: None, occurred_at: at, event_id: "hw".into() });
            }
            let back = round_trip(&r).unwrap();
            prop_assert_eq!(format!("{back:?}"), format!("{r:?}"));
        }
    }

    /// The copies are left out: a payload string the state holds is a
    /// marker, and so is a provenance that is the entry's own.
    #[test]
    fn the_copies_the_log_repeats_are_not_stored() {
        let handlers = Handlers::default();
        let view = TenantView::defaults(&Policies::new(
            LatePolicy::Recompute,
            TooLatePolicy::Drop,
            8,
            None,
        ));
        let notes = "a long note that the state and the log both hold".to_owned();
        let mut r = EntityRecord::new("e", "t");
        let event = Event::test("v1", 5, "set", serde_json::json!({"notes": notes, "n": 1}));
        r.process(
            &event,
            &Origin::new(TopicPartition::new("in", 0), 1),
            9,
            &handlers,
            &view,
        )
        .unwrap();
        let bytes = bincode::serde::encode_to_vec(&r, bincode::config::standard()).unwrap();
        let count = |needle: &[u8]| bytes.windows(needle.len()).filter(|w| *w == needle).count();
        assert_eq!(count(notes.as_bytes()), 1, "the note is stored once");
        // In the provenance table and the entry's key; format 7 also had it
        // in the high-water mark and the entry's provenance.
        assert_eq!(count(b"v1"), 2, "the event id is stored twice");
        assert_eq!(format!("{:?}", round_trip(&r).unwrap()), format!("{r:?}"));
    }

    /// A marker without what it stands for is an error, not a panic.
    #[test]
    fn a_marker_without_its_value_is_an_error() {
        let mut r = EntityRecord::new("e", "t");
        let event = Event::test("v1", 5, "set", serde_json::json!({"notes": "text"}));
        r.process(
            &event,
            &Origin::new(TopicPartition::new("in", 0), 1),
            9,
            &Handlers::default(),
            &TenantView::defaults(&Policies::new(
                LatePolicy::Recompute,
                TooLatePolicy::Drop,
                8,
                None,
            )),
        )
        .unwrap();
        // The record's bytes with an empty state in place of its state: the
        // log's marker for the note then stands for nothing.
        let mut without = r.clone();
        without.state.fields.clear();
        let good = bincode::serde::encode_to_vec(&r, bincode::config::standard()).unwrap();
        let emptied = bincode::serde::encode_to_vec(&without, bincode::config::standard()).unwrap();
        let state_of = |rec: &EntityRecord| {
            bincode::serde::encode_to_vec(&rec.state, bincode::config::standard()).unwrap()
        };
        let (full, empty) = (state_of(&r), state_of(&without));
        let at = good
            .windows(full.len())
            .position(|w| w == full.as_slice())
            .unwrap();
        let mut spliced = good[..at].to_vec();
        spliced.extend_from_slice(&empty);
        spliced.extend_from_slice(&good[at + full.len()..]);
        assert_ne!(spliced, emptied);
        let err = bincode::serde::decode_from_slice::<EntityRecord, _>(
            &spliced,
            bincode::config::standard(),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("refers to a string the state does not hold"),
            "{err}"
        );
    }
}
