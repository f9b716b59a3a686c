//! State as a fold of an entity's events: the [`EntityRecord`] and
//! [`EntityRecord::process`].
//!
//! Owns the semantics of ARCHITECTURE.md's "State is a fold": in-order events
//! take the fast path, duplicates are skipped, late events are inserted into
//! the retained log and the state is re-folded from the base snapshot. It is
//! pure: no I/O, no clocks (the caller passes `processed_at`). The entity actor
//! calls it; the store persists the record it leaves.

use crate::envelope::Event;
use crate::handler::{EntityState, HandlerError, Handlers};
use crate::ordering::{Lateness, OrderKey};
use crate::value::{Fields, Value};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Where an event came from: its Kafka coordinates.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// The topic it was read from.
    pub topic: String,
    /// The partition it was read from.
    pub partition: i32,
    /// Its offset in that partition.
    pub offset: i64,
}

impl Origin {
    /// The `topic/partition` key used in [`EntityRecord::applied_offsets`].
    pub fn topic_partition(&self) -> String {
        format!("{}/{}", self.topic, self.partition)
    }
}

/// Which event last wrote a field, and when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    /// The writing event's id.
    pub event_id: String,
    /// The writing event's type.
    pub event_type: String,
    /// The topic it was read from.
    pub topic: String,
    /// The partition it was read from.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// Its external timestamp, ms since the Unix epoch.
    pub occurred_at: i64,
    /// When orderly processed it, ms since the Unix epoch.
    pub processed_at: i64,
}

/// One retained event in an entity's log, enough to re-fold it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogEntry {
    /// Its order key (version, occurred_at and id).
    pub key: OrderKey,
    /// Its type.
    pub event_type: String,
    /// Its payload.
    pub payload: Fields,
    /// Where and when it was processed.
    pub provenance: Provenance,
}

/// The fold of every event trimmed out of the log: the snapshot a re-fold starts from.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Base {
    /// The state after the trimmed events.
    pub state: EntityState,
    /// Provenance per field after the trimmed events.
    pub provenance: BTreeMap<String, Provenance>,
    /// The order key of the newest trimmed event. Events at or below it are too late.
    pub key: Option<OrderKey>,
}

/// Everything orderly keeps about one entity: one store record, written at
/// most once per batch.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EntityRecord {
    /// The entity id.
    pub entity_id: String,
    /// The tenant of its first event.
    pub tenant_id: String,
    /// The current state: the fold of `base` and `log`.
    pub state: EntityState,
    /// Which event last wrote each field.
    pub provenance: BTreeMap<String, Provenance>,
    /// The highest order key applied.
    pub high_water: Option<OrderKey>,
    /// Retained recent events in order-key order, for re-folds and audits.
    pub log: Vec<LogEntry>,
    /// The snapshot before the first retained event.
    pub base: Base,
    /// Highest offset applied per `topic/partition`: replays at or below it are duplicates.
    pub applied_offsets: BTreeMap<String, i64>,
    /// Distinct events applied (in order or re-folded).
    pub applied_events: u64,
    /// Duplicates skipped (both kinds).
    pub duplicates: u64,
    /// Of those, redeliveries: offsets at or below the last applied one, as
    /// after a crash or rebalance.
    pub redeliveries: u64,
    /// Late events re-folded.
    pub late_events: u64,
    /// Events older than the retained log, which could not be re-folded.
    pub too_late_events: u64,
    /// Events dead-lettered and skipped.
    pub dead_lettered: u64,
}

/// Why an event was a duplicate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DuplicateKind {
    /// Its offset is at or below the last applied one for its partition: a
    /// redelivery after a restart or rebalance.
    Redelivery,
    /// Its event id is already in the log: the producer sent it twice.
    EventId,
}

/// One field's change, old and new.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FieldChange {
    /// The field name.
    pub field: String,
    /// The value before; `None` if absent.
    pub old: Option<Value>,
    /// The value after; `None` if removed.
    pub new: Option<Value>,
}

/// What processing one event did.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// In order: applied on top of the state.
    Applied {
        /// The fields it changed.
        changes: Vec<FieldChange>,
    },
    /// Already seen: skipped.
    Duplicate(DuplicateKind),
    /// Late: inserted into the log, and the state re-folded.
    Recomputed {
        /// How far behind the high-water mark it was.
        lateness: Lateness,
        /// The fields whose value changed because of it.
        changes: Vec<FieldChange>,
    },
    /// Older than the retained log: it cannot be placed, so it is dropped and reported.
    TooLate {
        /// How far behind the high-water mark it was.
        lateness: Lateness,
    },
}

impl Outcome {
    /// The outcome's name, as recorded on the span and in metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Outcome::Applied { .. } => "applied",
            Outcome::Duplicate(_) => "duplicate",
            Outcome::Recomputed { .. } => "late-recomputed",
            Outcome::TooLate { .. } => "too-late",
        }
    }

    /// Whether the stored record changed (and so must be written).
    pub fn changes_record(&self) -> bool {
        !matches!(self, Outcome::Duplicate(DuplicateKind::Redelivery))
    }
}

/// A handler rejected the event; the record is unchanged but for the skip bookkeeping.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("handler for {event_type:?} failed on event {event_id:?}: {error}")]
pub struct Rejected {
    /// The event's type.
    pub event_type: String,
    /// The event's id.
    pub event_id: String,
    /// The handler's error.
    pub error: HandlerError,
}

impl EntityRecord {
    /// A new, empty record for `entity_id`.
    pub fn new(entity_id: &str, tenant_id: &str) -> Self {
        EntityRecord {
            entity_id: entity_id.to_owned(),
            tenant_id: tenant_id.to_owned(),
            ..Default::default()
        }
    }

    /// Processes one event: classify it, then apply, skip or re-fold.
    ///
    /// `retention` is how many events the log keeps; older ones are folded
    /// into the base snapshot. On `Err`, the state is unchanged and the event
    /// is counted as dead-lettered; its offset is recorded so a redelivery is
    /// recognised as a duplicate rather than dead-lettered twice.
    pub fn process(
        &mut self,
        event: &Event,
        origin: &Origin,
        processed_at: i64,
        handlers: &Handlers,
        retention: usize,
    ) -> Result<Outcome, Rejected> {
        let tp = origin.topic_partition();
        if let Some(&last) = self.applied_offsets.get(&tp) {
            if origin.offset <= last {
                self.duplicates += 1;
                self.redeliveries += 1;
                return Ok(Outcome::Duplicate(DuplicateKind::Redelivery));
            }
        }
        self.applied_offsets.insert(tp, origin.offset);
        if self.log.iter().any(|e| e.key.event_id == event.event_id) {
            self.duplicates += 1;
            return Ok(Outcome::Duplicate(DuplicateKind::EventId));
        }
        let key = OrderKey::of(event);
        let provenance = Provenance {
            event_id: event.event_id.clone(),
            event_type: event.event_type.clone(),
            topic: origin.topic.clone(),
            partition: origin.partition,
            offset: origin.offset,
            occurred_at: event.occurred_at,
            processed_at,
        };
        let entry = LogEntry {
            key: key.clone(),
            event_type: event.event_type.clone(),
            payload: event.payload.clone(),
            provenance,
        };
        let reject = |record: &mut EntityRecord, error| {
            record.dead_lettered += 1;
            Rejected {
                event_type: event.event_type.clone(),
                event_id: event.event_id.clone(),
                error,
            }
        };

        let outcome = match &self.high_water {
            Some(hw) if key < *hw => {
                let lateness = Lateness::between(&key, hw);
                if self.base.key.as_ref().is_some_and(|b| key <= *b) {
                    self.too_late_events += 1;
                    return Ok(Outcome::TooLate { lateness });
                }
                // Check the late event itself applies, on the state just before it.
                let pos = self.log.partition_point(|e| e.key < key);
                let mut before = self.state_at(pos, handlers);
                if let Err(error) = handlers
                    .for_type(&event.event_type)
                    .apply(&mut before, event)
                {
                    return Err(reject(self, error));
                }
                self.log.insert(pos, entry);
                let old = std::mem::take(&mut self.state);
                self.refold(handlers);
                self.late_events += 1;
                Outcome::Recomputed {
                    lateness,
                    changes: diff(&old.fields, &self.state.fields),
                }
            }
            _ => {
                let mut next = self.state.clone();
                if let Err(error) = handlers.for_type(&event.event_type).apply(&mut next, event) {
                    return Err(reject(self, error));
                }
                let changes = diff(&self.state.fields, &next.fields);
                for c in &changes {
                    self.provenance
                        .insert(c.field.clone(), entry.provenance.clone());
                }
                self.state = next;
                self.high_water = Some(key);
                self.log.push(entry);
                Outcome::Applied { changes }
            }
        };
        self.applied_events += 1;
        self.trim(retention, handlers);
        Ok(outcome)
    }

    /// The state after the base and the first `upto` log entries.
    fn state_at(&self, upto: usize, handlers: &Handlers) -> EntityState {
        let mut state = self.base.state.clone();
        for entry in &self.log[..upto] {
            let _ = apply_entry(&mut state, entry, self, handlers);
        }
        state
    }

    /// Recomputes state, provenance and high-water mark from the base and the log.
    ///
    /// An entry whose handler fails in this order is skipped, deterministically,
    /// so the result still depends only on the set of events.
    pub fn refold(&mut self, handlers: &Handlers) {
        let mut state = self.base.state.clone();
        let mut provenance = self.base.provenance.clone();
        for entry in &self.log {
            let before = state.fields.clone();
            if apply_entry(&mut state, entry, self, handlers).is_ok() {
                for c in diff(&before, &state.fields) {
                    provenance.insert(c.field, entry.provenance.clone());
                }
            }
        }
        self.state = state;
        self.provenance = provenance;
        self.high_water = self
            .log
            .last()
            .map(|e| e.key.clone())
            .or_else(|| self.base.key.clone());
    }

    /// Folds the oldest entries into the base until at most `retention` remain.
    fn trim(&mut self, retention: usize, handlers: &Handlers) {
        let retention = retention.max(1);
        if self.log.len() <= retention {
            return;
        }
        let excess = self.log.len() - retention;
        let trimmed: Vec<LogEntry> = self.log.drain(..excess).collect();
        for entry in trimmed {
            let before = self.base.state.fields.clone();
            let mut state = std::mem::take(&mut self.base.state);
            if apply_entry(&mut state, &entry, self, handlers).is_ok() {
                for c in diff(&before, &state.fields) {
                    self.base
                        .provenance
                        .insert(c.field, entry.provenance.clone());
                }
            }
            self.base.state = state;
            self.base.key = Some(entry.key);
        }
    }

    /// Rebuilds the event a log entry came from.
    pub fn event_of(&self, entry: &LogEntry) -> Event {
        Event {
            entity_id: self.entity_id.clone(),
            tenant_id: self.tenant_id.clone(),
            event_id: entry.key.event_id.clone(),
            event_type: entry.event_type.clone(),
            occurred_at: entry.key.occurred_at,
            version: entry.key.version,
            payload: entry.payload.clone(),
        }
    }
}

fn apply_entry(
    state: &mut EntityState,
    entry: &LogEntry,
    record: &EntityRecord,
    handlers: &Handlers,
) -> Result<(), HandlerError> {
    let event = record.event_of(entry);
    let mut next = state.clone();
    handlers
        .for_type(&entry.event_type)
        .apply(&mut next, &event)?;
    *state = next;
    Ok(())
}

/// The fields that differ between `old` and `new`, in name order.
pub fn diff(old: &Fields, new: &Fields) -> Vec<FieldChange> {
    let mut changes = Vec::new();
    for (k, v) in new {
        if old.get(k) != Some(v) {
            changes.push(FieldChange {
                field: k.clone(),
                old: old.get(k).cloned(),
                new: Some(v.clone()),
            });
        }
    }
    for (k, v) in old {
        if !new.contains_key(k) {
            changes.push(FieldChange {
                field: k.clone(),
                old: Some(v.clone()),
                new: None,
            });
        }
    }
    changes.sort_by(|a, b| a.field.cmp(&b.field));
    changes
}

impl EntityRecord {
    /// The record as JSON, for `orderly state get` and `state dump`.
    pub fn to_json(&self) -> serde_json::Value {
        let prov = |p: &BTreeMap<String, Provenance>| {
            serde_json::Value::Object(
                p.iter()
                    .map(|(k, v)| (k.clone(), serde_json::to_value(v).unwrap_or_default()))
                    .collect(),
            )
        };
        serde_json::json!({
            "entity_id": self.entity_id,
            "tenant_id": self.tenant_id,
            "state": crate::value::fields_to_json(&self.state.fields),
            "deleted": self.state.deleted,
            "provenance": prov(&self.provenance),
            "high_water": self.high_water,
            "log_len": self.log.len(),
            "applied_offsets": self.applied_offsets,
            "applied_events": self.applied_events,
            "duplicates": self.duplicates,
            "redeliveries": self.redeliveries,
            "late_events": self.late_events,
            "too_late_events": self.too_late_events,
            "dead_lettered": self.dead_lettered,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::{FieldReducer, ReduceOp};
    use std::sync::Arc;

    fn handlers() -> Handlers {
        Handlers::default()
            .with_handler("inc", Arc::new(FieldReducer(ReduceOp::Inc)))
            .with_handler("del", Arc::new(FieldReducer(ReduceOp::Delete)))
    }

    fn ev(id: &str, at: i64, t: &str, payload: serde_json::Value) -> Event {
        let Value::Object(payload) = Value::from(payload) else {
            unreachable!()
        };
        Event {
            entity_id: "e".into(),
            tenant_id: "t".into(),
            event_id: id.into(),
            event_type: t.into(),
            occurred_at: at,
            version: None,
            payload,
        }
    }

    fn origin(offset: i64) -> Origin {
        Origin {
            topic: "in".into(),
            partition: 0,
            offset,
        }
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
            8,
        )
        .unwrap();
        r.process(
            &ev("c", 30, "set", serde_json::json!({"x": 3})),
            &origin(1),
            0,
            &h,
            8,
        )
        .unwrap();
        // b is late and sets y (changes state) and x (overwritten by c: no change).
        let out = r
            .process(
                &ev("b", 20, "set", serde_json::json!({"x": 2, "y": 2})),
                &origin(2),
                0,
                &h,
                8,
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
        r.process(&e, &origin(5), 0, &h, 8).unwrap();
        assert_eq!(
            r.process(&e, &origin(5), 0, &h, 8).unwrap(),
            Outcome::Duplicate(DuplicateKind::Redelivery)
        );
        assert_eq!(
            r.process(&e, &origin(9), 0, &h, 8).unwrap(),
            Outcome::Duplicate(DuplicateKind::EventId)
        );
        assert_eq!(r.state.fields["n"], Value::Int(1));
        assert_eq!(r.applied_events, 1);
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
                3,
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
                3,
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
                3,
            )
            .unwrap();
        assert_eq!(out.name(), "too-late");
        assert_eq!(r.state.fields["n"], Value::Int(15));
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
            8,
        )
        .unwrap();
        let before = r.state.clone();
        let err = r
            .process(
                &ev("b", 20, "inc", serde_json::json!({"n": 1})),
                &origin(1),
                0,
                &h,
                8,
            )
            .unwrap_err();
        assert_eq!(err.error.kind(), "permanent");
        assert_eq!(r.state, before);
        assert_eq!(r.dead_lettered, 1);
        // Its redelivery is a duplicate, not a second dead letter.
        let again = r
            .process(
                &ev("b", 20, "inc", serde_json::json!({"n": 1})),
                &origin(1),
                0,
                &h,
                8,
            )
            .unwrap();
        assert_eq!(again, Outcome::Duplicate(DuplicateKind::Redelivery));
    }
}
