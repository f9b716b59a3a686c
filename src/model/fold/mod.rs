//! State as a fold of an entity's events: the [`EntityRecord`] and
//! [`EntityRecord::process`].
//!
//! Owns the semantics of ARCHITECTURE.md's "State is a fold": in-order events
//! take the fast path, duplicates are skipped, late events are inserted into
//! the retained log and the state is re-folded from the base snapshot. It is
//! pure: no I/O, no clocks (the caller passes `processed_at`). The entity actor
//! calls it; the store persists the record it leaves.

use crate::model::envelope::Event;
use crate::model::handler::{EntityState, HandlerError, Handlers};
use crate::model::ordering::{LatePolicy, Lateness, OrderKey, TooLatePolicy};
use crate::model::position::TopicPartition;
pub use crate::model::position::{Home, Origin};
use crate::model::tenant::{TenantSettings, TenantView};
use crate::model::value::{Fields, Value};
mod merge;
mod process;
pub use process::HELD_LIMIT;
pub(crate) mod provenance_table;
pub use provenance_table::share as share_provenance;
#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

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
    /// The version of the tenant's settings it was handled under; 0 for the defaults.
    pub settings_version: u64,
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
    #[serde(with = "provenance_table")]
    pub provenance: BTreeMap<String, Arc<Provenance>>,
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
    #[serde(with = "provenance_table")]
    pub provenance: BTreeMap<String, Arc<Provenance>>,
    /// The highest order key applied.
    pub high_water: Option<OrderKey>,
    /// Retained recent events in order-key order, for re-folds and audits.
    pub log: Vec<LogEntry>,
    /// The snapshot before the first retained event.
    pub base: Base,
    /// Highest offset applied per `topic/partition`: replays at or below it are duplicates.
    pub applied_offsets: BTreeMap<String, i64>,
    /// What happened to the events that reached this entity.
    pub counters: Counters,
    /// Failure handling: whether it is parked, what it holds, what it skipped.
    pub parking: Parking,
    /// Where its state lives, and whether it has moved.
    pub placement: Placement,
}

/// How many of an entity's events met each fate. Counted in the record, so
/// they survive restarts and travel with the entity when it moves.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
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
    /// Late events applied on top (policy `apply`).
    pub late_applied: u64,
    /// Late events dropped (policy `drop`).
    pub late_dropped: u64,
    /// Events ignored because their type is not enabled in the tenant's settings.
    pub ignored_events: u64,
    /// How many times events of this entity began arriving on another
    /// partition of its topic, and the two were combined here.
    pub handovers: u32,
}

/// An entity's failure handling: parked for an operator, the events it holds
/// meanwhile, and the events it skipped after a handler failure.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Parking {
    /// Set while the entity is parked.
    pub parked: Option<Parked>,
    /// Events held while parked, in arrival order.
    pub held: Vec<HeldEvent>,
    /// The newest events skipped after a failure (dead-lettered), for provenance.
    pub skipped: Vec<Skipped>,
}

/// Where an entity's state lives.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// The partition the entity's events arrive on: its state lives under
    /// it (in the store's partition index and in that partition's changelog).
    pub home: Option<Home>,
    /// Set when the entity has moved to another partition, owned elsewhere:
    /// this record is then a forwarding stub. Its events that still arrive
    /// on `home` are forwarded there, and it is not part of the state.
    pub moved_to: Option<Home>,
}

/// What [`EntityRecord::merge`] did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Merged {
    /// Events of the other record this one lacked, now in its log.
    pub added: usize,
    /// Events of the other record too old to re-fold (below the base).
    pub too_late: usize,
    /// Whether the other record's base, which had folded more, replaced this one's.
    pub rebased: bool,
    /// Whether this record gained events from another partition of its topic.
    pub handover: bool,
    /// The fields that changed, old and new values.
    pub changes: Vec<FieldChange>,
}

/// An event that was skipped after a handler failure.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    /// The event.
    pub event_id: String,
    /// Its type.
    pub event_type: String,
    /// Why.
    pub reason: String,
    /// When, ms since the Unix epoch.
    pub at: i64,
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
    /// Late, policy `recompute`: inserted into the log, and the state re-folded.
    Recomputed {
        /// How far behind the high-water mark it was.
        lateness: Lateness,
        /// The fields whose value changed because of it.
        changes: Vec<FieldChange>,
    },
    /// Late (or too late) with policy `apply`: applied on top, no re-fold.
    LateApplied {
        /// How far behind the high-water mark it was.
        lateness: Lateness,
        /// Whether it was older than the retained log.
        too_late: bool,
        /// The fields it changed.
        changes: Vec<FieldChange>,
    },
    /// Late (or too late) with policy `drop`: discarded.
    Dropped {
        /// How far behind the high-water mark it was.
        lateness: Lateness,
        /// Whether it was older than the retained log.
        too_late: bool,
    },
    /// Late (or too late) with policy `park`: the entity now waits for an operator.
    Parked {
        /// How far behind the high-water mark it was.
        lateness: Lateness,
        /// Whether it was older than the retained log.
        too_late: bool,
    },
    /// The entity is parked: the event is held until an operator releases it.
    Held,
    /// Its type is not enabled in the tenant's settings: acknowledged, no effect.
    Ignored {
        /// The settings version that said so.
        settings_version: u64,
    },
}

impl Outcome {
    /// The outcome's name, as recorded on the span, in metrics and in anomaly records.
    pub fn name(&self) -> &'static str {
        match self {
            Outcome::Applied { .. } => "applied",
            Outcome::Duplicate(_) => "duplicate",
            Outcome::Recomputed { .. } => "late-recomputed",
            Outcome::LateApplied {
                too_late: false, ..
            } => "late-applied",
            Outcome::LateApplied { too_late: true, .. } => "too-late-applied",
            Outcome::Dropped {
                too_late: false, ..
            } => "late-dropped",
            Outcome::Dropped { too_late: true, .. } => "too-late-dropped",
            Outcome::Parked { .. } => "parked",
            Outcome::Held => "held",
            Outcome::Ignored { .. } => "ignored",
        }
    }

    /// Whether the stored record changed (and so must be written).
    pub fn changes_record(&self) -> bool {
        !matches!(self, Outcome::Duplicate(DuplicateKind::Redelivery))
    }

    /// The fields the event changed, if it was applied.
    pub fn changes(&self) -> Option<&[FieldChange]> {
        match self {
            Outcome::Applied { changes }
            | Outcome::Recomputed { changes, .. }
            | Outcome::LateApplied { changes, .. } => Some(changes),
            _ => None,
        }
    }

    /// How late the event was, if it was.
    pub fn lateness(&self) -> Option<&Lateness> {
        match self {
            Outcome::Recomputed { lateness, .. }
            | Outcome::LateApplied { lateness, .. }
            | Outcome::Dropped { lateness, .. }
            | Outcome::Parked { lateness, .. } => Some(lateness),
            _ => None,
        }
    }

    /// A late event whose application changed the state: a correction.
    pub fn is_correction(&self) -> bool {
        matches!(self, Outcome::Recomputed { changes, .. } | Outcome::LateApplied { changes, .. } if !changes.is_empty())
    }
}

/// Why an entity is parked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Parked {
    /// The event that parked it.
    pub event_id: String,
    /// Why, for the operator.
    pub reason: String,
    /// When, ms since the Unix epoch.
    pub since: i64,
}

/// An event held while its entity is parked.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeldEvent {
    /// The event.
    pub event: Event,
    /// Where it came from.
    pub origin: Origin,
}

/// An event as it arrived, and as its handler sees it (the tenant's field
/// mappings applied). The log entry takes the prepared payload when it was
/// built for this event, instead of a copy.
struct Prepared<'a> {
    raw: &'a Event,
    event: std::borrow::Cow<'a, Event>,
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// A new arrival from the broker.
    Arrival,
    /// A held event, released by an operator: its offset is already recorded,
    /// and a late one is re-folded whatever the policy.
    Release,
}

/// A handler rejected the event, or orderly did (`code` says why); the
/// record is unchanged but for the skip bookkeeping.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    /// The event's type.
    pub event_type: String,
    /// The event's id.
    pub event_id: String,
    /// The handler's error.
    pub error: HandlerError,
    /// Set when orderly, not the handler, rejected the event: the dead
    /// letter's code, for example `record_too_large`.
    pub code: Option<&'static str>,
}

impl Rejected {
    /// The dead letter's code: `code`, else `handler_<kind>`.
    pub fn code(&self) -> String {
        match self.code {
            Some(code) => code.to_owned(),
            None => format!("handler_{}", self.error.kind()),
        }
    }
}

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (event_type, event_id) = (&self.event_type, &self.event_id);
        match self.code {
            Some(code) => write!(
                f,
                "{code} on event {event_id:?} of type {event_type:?}: {}",
                self.error
            ),
            None => write!(
                f,
                "handler for {event_type:?} failed on event {event_id:?}: {}",
                self.error
            ),
        }
    }
}

impl std::error::Error for Rejected {}

fn apply_entry(
    state: &mut EntityState,
    entry: &LogEntry,
    record: &EntityRecord,
    handlers: &Handlers,
    settings: &TenantView,
) -> Result<(), HandlerError> {
    let event = record.event_of(entry);
    let mut next = state.clone();
    handlers.for_type(&entry.event_type).apply(
        &mut next,
        &event,
        settings.at(entry.provenance.settings_version),
    )?;
    *state = next;
    Ok(())
}

/// The fields that differ between `old` and `new` (not [`Value::same`]), in
/// name order.
pub fn diff(old: &Fields, new: &Fields) -> Vec<FieldChange> {
    let mut changes = Vec::new();
    for (k, v) in new {
        if !old.get(k).is_some_and(|o| o.same(v)) {
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
        let prov = |p: &BTreeMap<String, Arc<Provenance>>| {
            serde_json::Value::Object(
                p.iter()
                    .map(|(k, v)| (k.clone(), serde_json::to_value(v).unwrap_or_default()))
                    .collect(),
            )
        };
        serde_json::json!({
            "entity_id": self.entity_id,
            "tenant_id": self.tenant_id,
            "state": crate::model::value::fields_to_json(&self.state.fields),
            "deleted": self.state.deleted,
            "provenance": prov(&self.provenance),
            "high_water": self.high_water,
            "log_len": self.log.len(),
            "applied_offsets": self.applied_offsets,
            "applied_events": self.counters.applied_events,
            "duplicates": self.counters.duplicates,
            "redeliveries": self.counters.redeliveries,
            "late_events": self.counters.late_events,
            "too_late_events": self.counters.too_late_events,
            "dead_lettered": self.counters.dead_lettered,
            "late_applied": self.counters.late_applied,
            "late_dropped": self.counters.late_dropped,
            "parked": self.parking.parked,
            "held": self.parking.held.len(),
            "skipped": self.parking.skipped,
            "ignored_events": self.counters.ignored_events,
            "home": self.placement.home.as_ref().map(ToString::to_string),
            "moved_to": self.placement.moved_to.as_ref().map(ToString::to_string),
            "handovers": self.counters.handovers,
        })
    }
}
