//! Change records: the CDC feed of what each applied event changed.
//!
//! Every applied event produces one change record, with the fields it changed
//! (old and new values) and its provenance. A late event that changed the
//! state produces a record of kind `correction` instead: the fields listed are
//! the ones whose value is now different because of it. Records are keyed by
//! entity id and published to the changes topic through the store's outbox.

use crate::model::fold::{FieldChange, Provenance};
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
    /// The record's JSON bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}
