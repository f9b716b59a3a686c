//! What events do to state: the `Handler` and `Observer` traits, and the
//! built-in field reducer (`set`, `inc`, `delete`).
//!
//! Handlers are pure and deterministic: the same state and event always give
//! the same result. That is what lets orderly re-fold an entity's log when a
//! late event arrives. This module does not know about Kafka, storage or
//! ordering; the fold in [`crate::model::fold`] calls it in order-key order.
//!
//! # Example: a custom handler
//!
//! ```
//! use orderly::model::handler::{EntityState, Handler, HandlerError};
//! use orderly::model::envelope::Event;
//! use orderly::settings::TenantSettings;
//! use orderly::model::value::Value;
//!
//! /// Counts the events of each type an entity has seen, when the tenant's
//! /// `count_types` integration flag is on.
//! struct CountByType;
//!
//! impl Handler for CountByType {
//!     fn apply(
//!         &self,
//!         state: &mut EntityState,
//!         event: &Event,
//!         settings: &TenantSettings,
//!     ) -> Result<(), HandlerError> {
//!         if !settings.flag("count_types") {
//!             return Ok(());
//!         }
//!         let n = state.fields.entry(event.event_type.clone()).or_insert(Value::Int(0));
//!         match n {
//!             Value::Int(i) => *i += 1,
//!             _ => return Err(HandlerError::Permanent(format!("{} is not a counter", event.event_type))),
//!         }
//!         Ok(())
//!     }
//! }
//! ```

use crate::model::envelope::Event;
use crate::model::fold::{diff, FieldChange};
use crate::model::tenant::TenantSettings;
use crate::model::value::{Fields, Value};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

/// The state of one entity: its fields, and whether it is deleted.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EntityState {
    /// Current field values.
    pub fields: Fields,
    /// True after a `delete` until a later `set` revives the entity.
    pub deleted: bool,
}

/// A handler failure. The kind decides what orderly does next.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HandlerError {
    /// May succeed if tried again (a dependency was down, a timeout).
    #[error("transient: {0}")]
    Transient(String),
    /// Will fail however often it is tried (invalid data for this type).
    #[error("permanent: {0}")]
    Permanent(String),
}

impl HandlerError {
    /// `transient` or `permanent`.
    pub fn kind(&self) -> &'static str {
        match self {
            HandlerError::Transient(_) => "transient",
            HandlerError::Permanent(_) => "permanent",
        }
    }
}

/// Computes an entity's next state from its current state and one event.
///
/// Must be deterministic and must not perform I/O whose result changes the
/// state: orderly calls it again when it re-folds after a late event. A failed
/// call must leave no partial effect visible; orderly applies it to a copy
/// ([`Handler::apply_changes`]).
///
/// `settings` are the compiled settings of the event's tenant: the version in
/// force when the event was handled (on a re-fold, that same version while
/// orderly still knows it; see [`crate::model::tenant::TenantView::at`]). The
/// event's payload already has the tenant's field mappings applied, and
/// events of types the tenant has not enabled never reach a handler.
pub trait Handler: Send + Sync + 'static {
    /// Applies `event` to `state`.
    fn apply(
        &self,
        state: &mut EntityState,
        event: &Event,
        settings: &TenantSettings,
    ) -> Result<(), HandlerError>;

    /// Applies `event` to `state` as [`Handler::apply`] does, and returns
    /// the fields it changed (in field order, with their values before and
    /// after); on `Err`, `state` is as it was.
    ///
    /// The default applies [`Handler::apply`] to a copy of the state and
    /// compares the two. A handler that knows which fields it writes may
    /// write in place instead, as the built-in [`FieldReducer`] does; it
    /// must return what the default would. A handler that wraps another
    /// should pass this call on too, or it gets the copy.
    fn apply_changes(
        &self,
        state: &mut EntityState,
        event: &Event,
        settings: &TenantSettings,
    ) -> Result<Vec<FieldChange>, HandlerError> {
        let mut next = state.clone();
        self.apply(&mut next, event, settings)?;
        let changes = diff(&state.fields, &next.fields);
        *state = next;
        Ok(changes)
    }
}

/// An event derived by an [`Observer`], to be published keyed by `entity_id`.
#[derive(Clone, Debug, PartialEq)]
pub struct DerivedEvent {
    /// The event, whose `event_id` must be deterministic (see [`derived_event_id`]).
    pub event: Event,
}

/// The deterministic id of a derived event: the source event id plus the
/// observer's name. Re-deriving after a crash or re-fold yields the same id,
/// so the consumer deduplicates it like any other duplicate.
pub fn derived_event_id(source_event_id: &str, observer: &str) -> String {
    format!("{source_event_id}~{observer}")
}

/// Reacts to an applied event, seeing the state before and after, and may
/// emit derived events for other entities (for example a per-tenant total).
pub trait Observer: Send + Sync + 'static {
    /// A stable name; part of every derived event id.
    fn name(&self) -> &str;
    /// Called once per newly applied event.
    fn observe(
        &self,
        event: &Event,
        before: &EntityState,
        after: &EntityState,
    ) -> Vec<DerivedEvent>;
}

/// The operation of the built-in field reducer for one event type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ReduceOp {
    /// Each payload field is last-writer-wins by order key. Revives a deleted entity.
    #[default]
    Set,
    /// Each payload field is a number added to the field (missing counts as
    /// 0). Revives a deleted entity, whose fields a tombstone cleared.
    Inc,
    /// Tombstone: clears every field. A later `set` or `inc` that writes a
    /// field revives the entity.
    Delete,
}

/// The built-in handler: `set`, `inc` or `delete` on payload fields.
#[derive(Clone, Copy, Debug)]
pub struct FieldReducer(pub ReduceOp);

impl Handler for FieldReducer {
    fn apply(
        &self,
        state: &mut EntityState,
        event: &Event,
        _settings: &TenantSettings,
    ) -> Result<(), HandlerError> {
        self.reduce(state, event, false).map(drop)
    }

    /// In place, without copying the state.
    fn apply_changes(
        &self,
        state: &mut EntityState,
        event: &Event,
        _settings: &TenantSettings,
    ) -> Result<Vec<FieldChange>, HandlerError> {
        self.reduce(state, event, true)
    }
}

impl FieldReducer {
    /// Applies `event` to `state` in place; with `record`, returns the
    /// fields it changed. The fields an event writes are its payload's (or,
    /// for `delete`, all of them). `inc` computes every sum before it writes
    /// one, so a failure leaves the state as it was.
    fn reduce(
        &self,
        state: &mut EntityState,
        event: &Event,
        record: bool,
    ) -> Result<Vec<FieldChange>, HandlerError> {
        match self.0 {
            ReduceOp::Set => {
                state.deleted = false;
                Ok(event
                    .payload
                    .iter()
                    .filter_map(|(k, v)| write(&mut state.fields, k, v.clone(), record))
                    .collect())
            }
            ReduceOp::Inc => {
                let sums = event
                    .payload
                    .iter()
                    .map(|(k, delta)| {
                        let held = state.fields.get(k).unwrap_or(&Value::Int(0));
                        add(held, delta).map(|sum| (k, sum)).ok_or_else(|| {
                            HandlerError::Permanent(format!(
                                "cannot add {} to field {k:?} holding {}: inc needs numbers",
                                delta.to_json(),
                                held.to_json()
                            ))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                // Writing fields after a tombstone revives the entity, as
                // `set` does; its counters start again from 0.
                if !event.payload.is_empty() {
                    state.deleted = false;
                }
                Ok(sums
                    .into_iter()
                    .filter_map(|(k, sum)| write(&mut state.fields, k, sum, record))
                    .collect())
            }
            ReduceOp::Delete => {
                state.deleted = true;
                let cleared = std::mem::take(&mut state.fields);
                Ok(match record {
                    true => cleared
                        .into_iter()
                        .map(|(field, old)| FieldChange {
                            field,
                            old: Some(old),
                            new: None,
                        })
                        .collect(),
                    false => Vec::new(),
                })
            }
        }
    }
}

/// Writes `value` to field `k`; with `record`, the change, unless the field
/// held the same value ([`Value::same`], the comparison [`diff`] makes;
/// -0.0 is the same as 0.0, so the value is written all the same).
fn write(fields: &mut Fields, k: &str, value: Value, record: bool) -> Option<FieldChange> {
    if !record {
        fields.insert(k.to_owned(), value);
        return None;
    }
    match fields.get_mut(k) {
        Some(held) if held.same(&value) => {
            *held = value;
            None
        }
        Some(held) => {
            let new = Some(value.clone());
            Some(FieldChange {
                field: k.to_owned(),
                old: Some(std::mem::replace(held, value)),
                new,
            })
        }
        None => {
            fields.insert(k.to_owned(), value.clone());
            Some(FieldChange {
                field: k.to_owned(),
                old: None,
                new: Some(value),
            })
        }
    }
}

fn add(a: &Value, b: &Value) -> Option<Value> {
    match (a, b) {
        (Value::Int(x), Value::Int(y)) => Some(match x.checked_add(*y) {
            Some(s) => Value::Int(s),
            None => Value::Float(*x as f64 + *y as f64),
        }),
        _ => Some(Value::Float(a.as_f64()? + b.as_f64()?)),
    }
}

/// The handlers for each event type, the default for unknown types, and the observers.
#[derive(Clone)]
pub struct Handlers {
    by_type: HashMap<String, Arc<dyn Handler>>,
    default: Arc<dyn Handler>,
    observers: Vec<Arc<dyn Observer>>,
}

impl Default for Handlers {
    fn default() -> Self {
        Handlers {
            by_type: HashMap::new(),
            default: Arc::new(FieldReducer(ReduceOp::Set)),
            observers: Vec::new(),
        }
    }
}

impl Handlers {
    /// Uses `handler` for events of `event_type`.
    pub fn with_handler(
        mut self,
        event_type: impl Into<String>,
        handler: Arc<dyn Handler>,
    ) -> Self {
        self.by_type.insert(event_type.into(), handler);
        self
    }

    /// Uses `handler` for event types that have none of their own.
    pub fn with_default(mut self, handler: Arc<dyn Handler>) -> Self {
        self.default = handler;
        self
    }

    /// Adds an observer; it sees every newly applied event.
    pub fn with_observer(mut self, observer: Arc<dyn Observer>) -> Self {
        self.observers.push(observer);
        self
    }

    /// The handler for `event_type`.
    pub fn for_type(&self, event_type: &str) -> &dyn Handler {
        self.by_type
            .get(event_type)
            .unwrap_or(&self.default)
            .as_ref()
    }

    /// The observers, in registration order.
    pub fn observers(&self) -> &[Arc<dyn Observer>] {
        &self.observers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d() -> TenantSettings {
        TenantSettings::defaults(&Default::default())
    }

    fn ev(t: &str, payload: serde_json::Value) -> Event {
        Event::test("1", 0, t, payload)
    }

    #[test]
    fn set_inc_delete() {
        let mut s = EntityState::default();
        FieldReducer(ReduceOp::Set)
            .apply(
                &mut s,
                &ev("x", serde_json::json!({"a": 1, "b": "x"})),
                &d(),
            )
            .unwrap();
        FieldReducer(ReduceOp::Inc)
            .apply(
                &mut s,
                &ev("x", serde_json::json!({"a": 2, "c": 0.5})),
                &d(),
            )
            .unwrap();
        assert_eq!(s.fields["a"], Value::Int(3));
        assert_eq!(s.fields["c"], Value::Float(0.5));
        FieldReducer(ReduceOp::Delete)
            .apply(&mut s, &ev("x", serde_json::json!({})), &d())
            .unwrap();
        assert!(s.deleted && s.fields.is_empty());
        FieldReducer(ReduceOp::Set)
            .apply(&mut s, &ev("x", serde_json::json!({"a": 1})), &d())
            .unwrap();
        assert!(!s.deleted);
    }

    /// A reducer that writes fields after a tombstone revives the entity:
    /// an entity is never both deleted and holding live fields.
    #[test]
    fn inc_after_delete_revives() {
        let mut s = EntityState::default();
        FieldReducer(ReduceOp::Set)
            .apply(&mut s, &ev("x", serde_json::json!({"a": 5})), &d())
            .unwrap();
        FieldReducer(ReduceOp::Delete)
            .apply(&mut s, &ev("x", serde_json::json!({})), &d())
            .unwrap();
        FieldReducer(ReduceOp::Inc)
            .apply(&mut s, &ev("x", serde_json::json!({"a": 2})), &d())
            .unwrap();
        assert!(!s.deleted, "{s:?}");
        assert_eq!(s.fields["a"], Value::Int(2), "counts start again from 0");
        // An inc that writes nothing leaves a tombstone a tombstone.
        FieldReducer(ReduceOp::Delete)
            .apply(&mut s, &ev("x", serde_json::json!({})), &d())
            .unwrap();
        FieldReducer(ReduceOp::Inc)
            .apply(&mut s, &ev("x", serde_json::json!({})), &d())
            .unwrap();
        assert!(s.deleted && s.fields.is_empty());
    }

    /// The reducer with the default `apply_changes`: a copy, then a diff.
    struct Copying(FieldReducer);

    impl Handler for Copying {
        fn apply(
            &self,
            state: &mut EntityState,
            event: &Event,
            settings: &TenantSettings,
        ) -> Result<(), HandlerError> {
            self.0.apply(state, event, settings)
        }
    }

    fn fields() -> impl proptest::strategy::Strategy<Value = Fields> {
        use proptest::prelude::*;
        let value = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            (-3i64..3).prop_map(Value::Int),
            Just(Value::Int(i64::MAX)),
            prop_oneof![
                Just(f64::NAN),
                Just(0.0),
                Just(-0.0),
                Just(1.5),
                Just(f64::INFINITY)
            ]
            .prop_map(Value::Float),
            "[xy]{0,2}".prop_map(Value::String),
        ];
        proptest::collection::btree_map("[abcd]", value, 0..4)
    }

    proptest::proptest! {
        /// In place, the reducer gives what a copy and a diff give: the
        /// same changes, the same state, and on an error the same message
        /// and the state untouched. Compared by `Debug`, so that a NaN
        /// equals itself and -0.0 differs from 0.0.
        #[test]
        fn in_place_changes_equal_a_copy_and_a_diff(
            held in fields(),
            deleted: bool,
            payload in fields(),
            op in proptest::sample::select(vec![ReduceOp::Set, ReduceOp::Inc, ReduceOp::Delete]),
        ) {
            let start = EntityState { fields: held, deleted };
            let event = Event { payload, ..ev("x", serde_json::json!({})) };
            let (mut copied, mut in_place) = (start.clone(), start.clone());
            let want = Copying(FieldReducer(op)).apply_changes(&mut copied, &event, &d());
            let got = FieldReducer(op).apply_changes(&mut in_place, &event, &d());
            proptest::prop_assert_eq!(format!("{got:?}"), format!("{want:?}"));
            proptest::prop_assert_eq!(format!("{in_place:?}"), format!("{copied:?}"));
            if got.is_err() {
                proptest::prop_assert_eq!(format!("{in_place:?}"), format!("{start:?}"));
            }
        }
    }

    #[test]
    fn inc_on_a_string_is_permanent() {
        let mut s = EntityState::default();
        FieldReducer(ReduceOp::Set)
            .apply(&mut s, &ev("x", serde_json::json!({"a": "text"})), &d())
            .unwrap();
        let err = FieldReducer(ReduceOp::Inc)
            .apply(&mut s, &ev("x", serde_json::json!({"a": 1})), &d())
            .unwrap_err();
        assert_eq!(err.kind(), "permanent");
    }
}
