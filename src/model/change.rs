//! Change records: the CDC feed of what each applied event changed.
//!
//! Every applied event produces one change record, with the fields it changed
//! (old and new values) and its provenance. A late event that changed the
//! state produces a record of kind `correction` instead: the fields listed are
//! the ones whose value is now different because of it. Records are keyed by
//! entity id and published to the changes topic through the store's outbox.

use crate::model::fold::{FieldChange, Provenance};
use crate::model::json;
use crate::model::ordering::Lateness;
use crate::model::value::{Json, Value};
use serde::{Deserialize, Serialize};

/// What one applied event changed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChangeRecord {
    /// `change`, or `correction` for a late event that changed the state
    /// (also for an audit repair, with `repair` as its event type), or
    /// `handover` when merging the entity's record from another partition
    /// changed it (no causing event: its event fields are empty).
    pub kind: String,
    /// The entity.
    pub entity_id: String,
    /// Its tenant.
    pub tenant_id: String,
    /// The causing event's id.
    pub event_id: String,
    /// The causing event's type.
    pub event_type: String,
    /// The causing event's external timestamp, ms.
    pub occurred_at: i64,
    /// The fields changed, with old and new values (`null`: absent).
    pub changes: Vec<JsonChange>,
    /// Where and when the causing event was processed.
    pub provenance: Option<Provenance>,
    /// How late the causing event was, for corrections.
    pub lateness: Option<Lateness>,
}

/// A field change with JSON values, as published.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JsonChange {
    /// The field.
    pub field: String,
    /// The value before (`null` when absent).
    #[serde(serialize_with = "as_json", deserialize_with = "from_json")]
    pub old: Option<Value>,
    /// The value after (`null` when removed).
    #[serde(serialize_with = "as_json", deserialize_with = "from_json")]
    pub new: Option<Value>,
}

/// `None` as `null`, a value as its plain JSON.
fn as_json<S: serde::Serializer>(v: &Option<Value>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => Json(v).serialize(s),
        None => s.serialize_unit(),
    }
}

/// `null` as `None`, any other JSON as its value.
fn from_json<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Ok(match serde_json::Value::deserialize(d)? {
        serde_json::Value::Null => None,
        v => Some(Value::from(v)),
    })
}

impl From<&FieldChange> for JsonChange {
    fn from(c: &FieldChange) -> Self {
        JsonChange {
            field: c.field.clone(),
            old: c.old.clone(),
            new: c.new.clone(),
        }
    }
}

impl ChangeRecord {
    /// The record's JSON bytes: what `serde_json` writes for it (its
    /// `Serialize`), written by hand, since one is written per applied
    /// event (see [`crate::model::json`]).
    pub fn to_bytes(&self) -> Vec<u8> {
        ChangeRecordRef {
            kind: &self.kind,
            entity_id: &self.entity_id,
            tenant_id: &self.tenant_id,
            event_id: &self.event_id,
            event_type: &self.event_type,
            occurred_at: self.occurred_at,
            changes: &self.changes,
            provenance: self.provenance.as_ref(),
            lateness: self.lateness.as_ref(),
        }
        .to_bytes()
    }
}

/// A field change as the change record writes it: [`JsonChange`], or the
/// fold's [`FieldChange`], which holds the same.
pub trait AsFieldChange {
    /// The field, its value before and its value after.
    fn parts(&self) -> (&str, Option<&Value>, Option<&Value>);
}

impl AsFieldChange for JsonChange {
    fn parts(&self) -> (&str, Option<&Value>, Option<&Value>) {
        (&self.field, self.old.as_ref(), self.new.as_ref())
    }
}

impl AsFieldChange for FieldChange {
    fn parts(&self) -> (&str, Option<&Value>, Option<&Value>) {
        (&self.field, self.old.as_ref(), self.new.as_ref())
    }
}

/// A [`ChangeRecord`] borrowed from the event and the fold's outcome it
/// describes, so that the one written per applied event is not copied
/// first. Its bytes are the owned record's.
pub struct ChangeRecordRef<'a, C> {
    /// See [`ChangeRecord::kind`].
    pub kind: &'a str,
    /// The entity.
    pub entity_id: &'a str,
    /// Its tenant.
    pub tenant_id: &'a str,
    /// The causing event's id.
    pub event_id: &'a str,
    /// The causing event's type.
    pub event_type: &'a str,
    /// The causing event's external timestamp, ms.
    pub occurred_at: i64,
    /// The fields changed.
    pub changes: &'a [C],
    /// Where and when the causing event was processed.
    pub provenance: Option<&'a Provenance>,
    /// How late the causing event was, for corrections.
    pub lateness: Option<&'a Lateness>,
}

impl<C: AsFieldChange> ChangeRecordRef<'_, C> {
    /// The record's JSON bytes (see [`ChangeRecord::to_bytes`]).
    pub fn to_bytes(&self) -> Vec<u8> {
        let strings = self.entity_id.len() + self.event_id.len() + self.event_type.len();
        let changes: usize = self
            .changes
            .iter()
            .map(|c| {
                let (field, old, new) = c.parts();
                let hint = |v: Option<&Value>| v.map_or(4, json::size_hint);
                32 + field.len() + hint(old) + hint(new)
            })
            .sum();
        let mut out = Vec::with_capacity(320 + 2 * strings + changes);
        json::Object::begin(&mut out)
            .str("kind", self.kind)
            .str("entity_id", self.entity_id)
            .str("tenant_id", self.tenant_id)
            .str("event_id", self.event_id)
            .str("event_type", self.event_type)
            .int("occurred_at", self.occurred_at)
            .with("changes", |o| {
                o.push(b'[');
                for (i, c) in self.changes.iter().enumerate() {
                    if i > 0 {
                        o.push(b',');
                    }
                    let (field, old, new) = c.parts();
                    json::Object::begin(o)
                        .str("field", field)
                        .with("old", |o| json::write_nullable(o, old, json::write_value))
                        .with("new", |o| json::write_nullable(o, new, json::write_value))
                        .end();
                }
                o.push(b']');
            })
            .with("provenance", |o| {
                json::write_nullable(o, self.provenance, |o, p| {
                    json::Object::begin(o)
                        .str("event_id", &p.event_id)
                        .str("event_type", &p.event_type)
                        .str("topic", &p.topic)
                        .int("partition", p.partition)
                        .int("offset", p.offset)
                        .int("occurred_at", p.occurred_at)
                        .int("processed_at", p.processed_at)
                        .int("settings_version", p.settings_version)
                        .end()
                })
            })
            .with("lateness", |o| {
                json::write_nullable(o, self.lateness, |o, l| {
                    json::Object::begin(o)
                        .int("millis", l.millis)
                        .with("versions", |o| {
                            json::write_nullable(o, l.versions, json::write_int)
                        })
                        .end()
                })
            })
            .end();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::Int),
            // Every float, NaN and the infinities included (written `null`).
            any::<f64>().prop_map(Value::Float),
            any::<String>().prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map(any::<String>(), inner, 0..4)
                    .prop_map(Value::Object),
            ]
        })
    }

    fn provenance() -> impl Strategy<Value = Provenance> {
        (
            (any::<String>(), any::<String>(), any::<String>()),
            (
                any::<i32>(),
                any::<i64>(),
                any::<i64>(),
                any::<i64>(),
                any::<u64>(),
            ),
        )
            .prop_map(
                |(
                    (event_id, event_type, topic),
                    (partition, offset, occurred_at, processed_at, settings_version),
                )| {
                    Provenance {
                        event_id,
                        event_type,
                        topic,
                        partition,
                        offset,
                        occurred_at,
                        processed_at,
                        settings_version,
                    }
                },
            )
    }

    fn record() -> impl Strategy<Value = ChangeRecord> {
        let change = (
            any::<String>(),
            proptest::option::of(value()),
            proptest::option::of(value()),
        )
            .prop_map(|(field, old, new)| JsonChange { field, old, new });
        (
            (
                any::<String>(),
                any::<String>(),
                any::<String>(),
                any::<String>(),
                any::<String>(),
            ),
            any::<i64>(),
            proptest::collection::vec(change, 0..4),
            proptest::option::of(provenance()),
            proptest::option::of((any::<i64>(), proptest::option::of(any::<u64>()))),
        )
            .prop_map(
                |(
                    (kind, entity_id, tenant_id, event_id, event_type),
                    occurred_at,
                    changes,
                    provenance,
                    lateness,
                )| {
                    ChangeRecord {
                        kind,
                        entity_id,
                        tenant_id,
                        event_id,
                        event_type,
                        occurred_at,
                        changes,
                        provenance,
                        lateness: lateness.map(|(millis, versions)| Lateness { millis, versions }),
                    }
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        /// The hand-written JSON is what serde_json writes for the record:
        /// the changes topic's bytes did not change with it.
        #[test]
        fn the_record_is_written_as_serde_json_writes_it(record in record()) {
            let expected = serde_json::to_vec(&record).expect("a record serialises");
            let ours = record.to_bytes();
            // Borrowed from the fold's field changes, the same bytes.
            let fold: Vec<FieldChange> = record
                .changes
                .iter()
                .map(|c| FieldChange { field: c.field.clone(), old: c.old.clone(), new: c.new.clone() })
                .collect();
            let borrowed = ChangeRecordRef {
                kind: &record.kind,
                entity_id: &record.entity_id,
                tenant_id: &record.tenant_id,
                event_id: &record.event_id,
                event_type: &record.event_type,
                occurred_at: record.occurred_at,
                changes: &fold,
                provenance: record.provenance.as_ref(),
                lateness: record.lateness.as_ref(),
            };
            prop_assert_eq!(&borrowed.to_bytes(), &ours);
            prop_assert_eq!(String::from_utf8_lossy(&ours), String::from_utf8_lossy(&expected));
        }
    }
}
