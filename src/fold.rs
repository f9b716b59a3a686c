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
use crate::ordering::{LatePolicy, Lateness, OrderKey, TooLatePolicy};
use crate::settings::{TenantSettings, TenantView};
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
    /// Late events applied on top (policy `apply`).
    pub late_applied: u64,
    /// Late events dropped (policy `drop`).
    pub late_dropped: u64,
    /// Set while the entity is parked.
    pub parked: Option<Parked>,
    /// Events held while parked, in arrival order.
    pub held: Vec<HeldEvent>,
    /// The newest events skipped after a failure (dead-lettered), for provenance.
    pub skipped: Vec<Skipped>,
    /// Events ignored because their type is not enabled in the tenant's settings.
    pub ignored_events: u64,
    /// The partition the entity's events arrive on: its state lives under
    /// it (in the store's partition index and in that partition's changelog).
    pub home: Option<Home>,
    // Format 3 appended the two fields below; `Stored::from_v2` relies on
    // their being last. Add new fields after them.
    /// Set when the entity has moved to another partition, owned elsewhere:
    /// this record is then a forwarding stub. Its events that still arrive
    /// on `home` are forwarded there, and it is not part of the state.
    pub moved_to: Option<Home>,
    /// How many times events of this entity began arriving on another
    /// partition of its topic, and the two were combined here.
    pub handovers: u32,
}

/// The input partition an entity's state lives under.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Home {
    /// The input topic.
    pub topic: String,
    /// Its partition.
    pub partition: i32,
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
/// mappings applied).
#[derive(Clone, Copy)]
struct Prepared<'a> {
    raw: &'a Event,
    event: &'a Event,
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// A new arrival from the broker.
    Arrival,
    /// A held event, released by an operator: its offset is already recorded,
    /// and a late one is re-folded whatever the policy.
    Release,
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

    /// Processes one event under its tenant's settings: classify it, then
    /// apply, skip, re-fold, drop, park, hold or ignore it, as the settings in
    /// force say for its type. The settings' field mappings are applied first,
    /// so the log keeps the payload its handler saw.
    ///
    /// On `Err`, the record is left exactly as it was, offset included, so
    /// a retry is processed like the first try; when the actor gives up,
    /// [`EntityRecord::record_failure`] records the offset, so a redelivery
    /// is then a duplicate rather than dead-lettered twice.
    pub fn process(
        &mut self,
        event: &Event,
        origin: &Origin,
        processed_at: i64,
        handlers: &Handlers,
        settings: &TenantView,
    ) -> Result<Outcome, Rejected> {
        let tp = origin.topic_partition();
        if let Some(&last) = self.applied_offsets.get(&tp) {
            if origin.offset <= last {
                self.duplicates += 1;
                self.redeliveries += 1;
                return Ok(Outcome::Duplicate(DuplicateKind::Redelivery));
            }
        }
        let previous = self.applied_offsets.insert(tp.clone(), origin.offset);
        if let Some(outcome) = self.duplicate_or_held(event, origin) {
            if matches!(outcome, Outcome::Duplicate(_)) {
                self.duplicates += 1;
            }
            return Ok(outcome);
        }
        let Some(prepared) = settings.current().prepare(event) else {
            self.ignored_events += 1;
            return Ok(Outcome::Ignored {
                settings_version: settings.current().version(),
            });
        };
        let result = self.apply_event(
            Prepared {
                raw: event,
                event: &prepared,
            },
            origin,
            processed_at,
            handlers,
            settings,
            Mode::Arrival,
        );
        if result.is_err() {
            // Leave no trace: a retry is processed as the first try was, and
            // giving up is recorded by `record_failure`.
            match previous {
                Some(o) => self.applied_offsets.insert(tp, o),
                None => self.applied_offsets.remove(&tp),
            };
        }
        result
    }

    /// Processes a dead-lettered event again, at an operator's request. Its
    /// offset is already recorded, so only its event id is checked for
    /// duplicates; a late one is re-folded, so the entity's order is kept; a
    /// parked entity holds it.
    pub fn retry(
        &mut self,
        event: &Event,
        origin: &Origin,
        processed_at: i64,
        handlers: &Handlers,
        settings: &TenantView,
    ) -> Result<Outcome, Rejected> {
        if let Some(outcome) = self.duplicate_or_held(event, origin) {
            return Ok(outcome);
        }
        let Some(prepared) = settings.current().prepare(event) else {
            self.ignored_events += 1;
            self.skipped.retain(|s| s.event_id != event.event_id);
            return Ok(Outcome::Ignored {
                settings_version: settings.current().version(),
            });
        };
        let result = self.apply_event(
            Prepared {
                raw: event,
                event: &prepared,
            },
            origin,
            processed_at,
            handlers,
            settings,
            Mode::Release,
        );
        if result.is_ok() {
            self.skipped.retain(|s| s.event_id != event.event_id);
        }
        result
    }

    /// A duplicate by event id (in the log or held), or, if the entity is
    /// parked, the event held; `None` if it is to be applied.
    fn duplicate_or_held(&mut self, event: &Event, origin: &Origin) -> Option<Outcome> {
        if self.log.iter().any(|e| e.key.event_id == event.event_id)
            || self.held.iter().any(|h| h.event.event_id == event.event_id)
        {
            return Some(Outcome::Duplicate(DuplicateKind::EventId));
        }
        if self.parked.is_some() {
            self.held.push(HeldEvent {
                event: event.clone(),
                origin: origin.clone(),
            });
            return Some(Outcome::Held);
        }
        None
    }

    /// Records that the actor gave up on an event (a permanent failure, or
    /// the last transient one): it is dead-lettered, its offset counts as
    /// applied (so a redelivery is a duplicate), and then either the skip is
    /// noted in the record, or, with `park`, the entity is parked with the
    /// event first in line.
    pub fn record_failure(
        &mut self,
        event: &Event,
        origin: &Origin,
        reason: &str,
        at: i64,
        park: bool,
    ) {
        let last = self
            .applied_offsets
            .entry(origin.topic_partition())
            .or_insert(origin.offset);
        *last = (*last).max(origin.offset);
        self.dead_lettered += 1;
        if park {
            self.parked = Some(Parked {
                event_id: event.event_id.clone(),
                reason: reason.to_owned(),
                since: at,
            });
            self.held.push(HeldEvent {
                event: event.clone(),
                origin: origin.clone(),
            });
        } else {
            self.note_skip(event, reason, at);
        }
    }

    /// Notes a skipped (dead-lettered) event in the record's provenance; the
    /// newest 16 are kept.
    fn note_skip(&mut self, event: &Event, reason: &str, at: i64) {
        self.skipped.push(Skipped {
            event_id: event.event_id.clone(),
            event_type: event.event_type.clone(),
            reason: reason.to_owned(),
            at,
        });
        if self.skipped.len() > 16 {
            self.skipped.remove(0);
        }
    }

    /// Unparks the entity and processes its held events in order-key order,
    /// re-folding late ones. With `skip`, the event that parked it is
    /// discarded instead. Returns each held event with what became of it.
    pub fn release(
        &mut self,
        skip: bool,
        processed_at: i64,
        handlers: &Handlers,
        settings: &TenantView,
    ) -> Vec<(HeldEvent, Result<Outcome, Rejected>)> {
        let Some(parked) = self.parked.take() else {
            return Vec::new();
        };
        let mut held = std::mem::take(&mut self.held);
        if skip {
            held.retain(|h| h.event.event_id != parked.event_id);
        }
        held.sort_by_key(|h| OrderKey::of(&h.event));
        held.into_iter()
            .map(|h| {
                let r = match settings.current().prepare(&h.event) {
                    None => {
                        self.ignored_events += 1;
                        Ok(Outcome::Ignored {
                            settings_version: settings.current().version(),
                        })
                    }
                    Some(prepared) => self.apply_event(
                        Prepared {
                            raw: &h.event,
                            event: &prepared,
                        },
                        &h.origin,
                        processed_at,
                        handlers,
                        settings,
                        Mode::Release,
                    ),
                };
                if let Err(rejected) = &r {
                    // Failing again on release: dead-lettered and skipped.
                    self.record_failure(
                        &h.event,
                        &h.origin,
                        &rejected.to_string(),
                        processed_at,
                        false,
                    );
                }
                (h, r)
            })
            .collect()
    }

    fn apply_event(
        &mut self,
        Prepared { raw, event }: Prepared<'_>,
        origin: &Origin,
        processed_at: i64,
        handlers: &Handlers,
        settings: &TenantView,
        mode: Mode,
    ) -> Result<Outcome, Rejected> {
        let in_force = settings.current();
        let policies = in_force.policies();
        let key = OrderKey::of(event);
        let entry = LogEntry {
            key: key.clone(),
            event_type: event.event_type.clone(),
            payload: event.payload.clone(),
            provenance: Provenance {
                event_id: event.event_id.clone(),
                event_type: event.event_type.clone(),
                topic: origin.topic.clone(),
                partition: origin.partition,
                offset: origin.offset,
                occurred_at: event.occurred_at,
                processed_at,
                settings_version: in_force.version(),
            },
        };
        let reject = |error| Rejected {
            event_type: event.event_type.clone(),
            event_id: event.event_id.clone(),
            error,
        };
        let handler = handlers.for_type(&event.event_type);

        let outcome = match &self.high_water {
            Some(hw) if key < *hw => {
                let lateness = Lateness::between(&key, hw);
                let too_late = self.base.key.as_ref().is_some_and(|b| key <= *b);
                let late = policies.late(&event.event_type);
                let policy = match (mode, too_late) {
                    (Mode::Release, false) => LatePolicy::Recompute,
                    (Mode::Release, true) => match policies.too_late(&event.event_type) {
                        TooLatePolicy::Apply => LatePolicy::Apply,
                        _ => LatePolicy::Drop,
                    },
                    (Mode::Arrival, false) => late,
                    (Mode::Arrival, true) => match policies.too_late(&event.event_type) {
                        TooLatePolicy::Drop => LatePolicy::Drop,
                        TooLatePolicy::Apply => LatePolicy::Apply,
                        TooLatePolicy::Park => LatePolicy::Park,
                    },
                };
                match policy {
                    LatePolicy::Drop => {
                        if too_late {
                            self.too_late_events += 1;
                        } else {
                            self.late_dropped += 1;
                        }
                        return Ok(Outcome::Dropped { lateness, too_late });
                    }
                    LatePolicy::Park => {
                        self.parked = Some(Parked {
                            event_id: event.event_id.clone(),
                            reason: format!(
                                "{} event {} is {} ms behind the entity's newest event; policy park",
                                if too_late { "too-late" } else { "late" },
                                event.event_id,
                                lateness.millis
                            ),
                            since: processed_at,
                        });
                        // Held as it arrived: it is prepared again on release.
                        self.held.push(HeldEvent {
                            event: raw.clone(),
                            origin: origin.clone(),
                        });
                        return Ok(Outcome::Parked { lateness, too_late });
                    }
                    LatePolicy::Apply => {
                        let changes = self
                            .apply_on_top(handler, event, in_force, &entry.provenance)
                            .map_err(reject)?;
                        let pos = self.log.partition_point(|e| e.key < key);
                        self.log.insert(pos, entry);
                        self.late_applied += 1;
                        Outcome::LateApplied {
                            lateness,
                            too_late,
                            changes,
                        }
                    }
                    LatePolicy::Recompute => {
                        // Check the late event itself applies, on the state just before it.
                        let pos = self.log.partition_point(|e| e.key < key);
                        let mut before = self.state_at(pos, handlers, settings);
                        if let Err(error) = handler.apply(&mut before, event, in_force) {
                            return Err(reject(error));
                        }
                        self.log.insert(pos, entry);
                        let old = std::mem::take(&mut self.state);
                        self.refold(handlers, settings);
                        self.late_events += 1;
                        Outcome::Recomputed {
                            lateness,
                            changes: diff(&old.fields, &self.state.fields),
                        }
                    }
                }
            }
            _ => {
                let changes = self
                    .apply_on_top(handler, event, in_force, &entry.provenance)
                    .map_err(reject)?;
                self.high_water = Some(key);
                self.log.push(entry);
                Outcome::Applied { changes }
            }
        };
        self.applied_events += 1;
        self.trim(handlers, settings);
        Ok(outcome)
    }

    /// Applies `event` on top of the current state (on a copy, so a failure
    /// leaves no partial effect) and credits the fields it changed to it.
    fn apply_on_top(
        &mut self,
        handler: &dyn crate::handler::Handler,
        event: &Event,
        settings: &TenantSettings,
        provenance: &Provenance,
    ) -> Result<Vec<FieldChange>, HandlerError> {
        let mut next = self.state.clone();
        handler.apply(&mut next, event, settings)?;
        let changes = diff(&self.state.fields, &next.fields);
        for c in &changes {
            self.provenance.insert(c.field.clone(), provenance.clone());
        }
        self.state = next;
        Ok(changes)
    }

    /// The state after the base and the first `upto` log entries.
    fn state_at(&self, upto: usize, handlers: &Handlers, settings: &TenantView) -> EntityState {
        let mut state = self.base.state.clone();
        for entry in &self.log[..upto] {
            let _ = apply_entry(&mut state, entry, self, handlers, settings);
        }
        state
    }

    /// Recomputes state, provenance and high-water mark from the base and the log.
    ///
    /// An entry whose handler fails in this order is skipped, deterministically,
    /// so the result still depends only on the set of events. Each entry's
    /// handler gets the settings version the entry was handled under, while
    /// `settings` still knows it (see [`TenantView::at`]); the payload is
    /// already mapped, so the built-in reducer does not depend on it.
    pub fn refold(&mut self, handlers: &Handlers, settings: &TenantView) {
        let mut state = self.base.state.clone();
        let mut provenance = self.base.provenance.clone();
        for entry in &self.log {
            let before = state.fields.clone();
            if apply_entry(&mut state, entry, self, handlers, settings).is_ok() {
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

    /// Combines `other`, a record of the same entity kept under another
    /// partition, into this one: the union of the two event logs, re-folded.
    /// Because the state is a function of the set of events, the result is
    /// what one record would hold had it seen every event of both, in any
    /// order. It is idempotent: merging the same record again adds nothing.
    ///
    /// Counters of distinct events follow the union: `applied_events` grows
    /// by the events this record lacked. The per-partition offsets are
    /// combined, so a redelivery from either partition is still a duplicate.
    /// When the two bases differ, the one that folded more (the higher order
    /// key) is kept; retained events of the other below it cannot be
    /// re-folded and are counted as too late, as any event older than the
    /// retention is.
    pub fn merge(
        &mut self,
        other: &EntityRecord,
        handlers: &Handlers,
        settings: &TenantView,
    ) -> Merged {
        let topic = self
            .home
            .as_ref()
            .or(other.home.as_ref())
            .map(|h| h.topic.clone())
            .unwrap_or_default();
        let partitions_before = self.partitions_of(&topic);
        let before = self.state.fields.clone();
        let mut merged = Merged::default();
        if other.base.key > self.base.key {
            let floor = other.base.key.clone();
            let (keep, below): (Vec<LogEntry>, Vec<LogEntry>) = std::mem::take(&mut self.log)
                .into_iter()
                .partition(|e| Some(&e.key) > floor.as_ref());
            merged.too_late += below
                .iter()
                .filter(|e| !other.log.iter().any(|o| o.key.event_id == e.key.event_id))
                .count();
            // The other record counted everything its base folded; ours adds
            // what only we retain.
            let own = keep
                .iter()
                .filter(|e| !other.log.iter().any(|o| o.key.event_id == e.key.event_id))
                .count();
            self.applied_events = other.applied_events + own as u64;
            self.base = other.base.clone();
            self.log = keep;
            merged.rebased = true;
        }
        let known: std::collections::HashSet<&str> =
            self.log.iter().map(|e| e.key.event_id.as_str()).collect();
        let mut fresh = Vec::new();
        for e in &other.log {
            if known.contains(e.key.event_id.as_str()) {
                continue;
            }
            if self.base.key.as_ref().is_some_and(|b| e.key <= *b) {
                merged.too_late += 1;
                continue;
            }
            fresh.push(e.clone());
        }
        merged.added = fresh.len();
        self.log.extend(fresh);
        self.log.sort_by(|a, b| a.key.cmp(&b.key));
        for (tp, &offset) in &other.applied_offsets {
            let o = self.applied_offsets.entry(tp.clone()).or_insert(offset);
            *o = (*o).max(offset);
        }
        for s in &other.skipped {
            if !self.skipped.iter().any(|x| x.event_id == s.event_id) {
                self.skipped.push(s.clone());
            }
        }
        if self.tenant_id.is_empty() {
            self.tenant_id = other.tenant_id.clone();
        }
        if !merged.rebased {
            self.applied_events += merged.added as u64;
        }
        self.too_late_events += merged.too_late as u64;
        if merged.added > 0 || merged.rebased {
            self.refold(handlers, settings);
            self.trim(handlers, settings);
        }
        if partitions_before > 0 && self.partitions_of(&topic) > partitions_before {
            self.handovers = self.handovers.max(other.handovers) + 1;
            merged.handover = true;
        }
        merged.changes = diff(&before, &self.state.fields);
        merged
    }

    /// How many partitions of `topic` this entity's events have come from.
    fn partitions_of(&self, topic: &str) -> usize {
        self.applied_offsets
            .keys()
            .filter(|tp| tp.rsplit_once('/').is_some_and(|(t, _)| t == topic))
            .count()
    }

    /// Whether an event from `origin` is the first from its partition while
    /// the entity already has events from another partition of the same
    /// topic: its events have begun arriving on a second partition.
    pub fn is_handover(&self, origin: &Origin) -> bool {
        !self.applied_offsets.is_empty()
            && !self.applied_offsets.contains_key(&origin.topic_partition())
            && self.partitions_of(&origin.topic) > 0
    }

    /// Records an event that arrived at a forwarding stub (see
    /// [`EntityRecord::moved_to`]) and is forwarded to the entity's home.
    /// Returns false, counting a redelivery, if its offset was seen before.
    pub fn forward(&mut self, origin: &Origin) -> bool {
        let tp = origin.topic_partition();
        if self
            .applied_offsets
            .get(&tp)
            .is_some_and(|&last| origin.offset <= last)
        {
            self.duplicates += 1;
            self.redeliveries += 1;
            return false;
        }
        self.applied_offsets.insert(tp, origin.offset);
        true
    }

    /// Folds the oldest entries into the base until at most the retained
    /// number remain, and none is older than the time retention.
    fn trim(&mut self, handlers: &Handlers, settings: &TenantView) {
        let policies = settings.current().policies();
        let retention = policies.retention_events.max(1);
        let mut excess = self.log.len().saturating_sub(retention);
        if let (Some(ms), Some(hw)) = (policies.retention_ms, &self.high_water) {
            let horizon = hw.occurred_at.saturating_sub(ms);
            let old = self
                .log
                .iter()
                .take_while(|e| e.key.occurred_at < horizon)
                .count();
            excess = excess.max(old.min(self.log.len().saturating_sub(1)));
        }
        if excess == 0 {
            return;
        }
        let trimmed: Vec<LogEntry> = self.log.drain(..excess).collect();
        for entry in trimmed {
            let before = self.base.state.fields.clone();
            let mut state = std::mem::take(&mut self.base.state);
            if apply_entry(&mut state, &entry, self, handlers, settings).is_ok() {
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
            "late_applied": self.late_applied,
            "late_dropped": self.late_dropped,
            "parked": self.parked,
            "held": self.held.len(),
            "skipped": self.skipped,
            "ignored_events": self.ignored_events,
            "home": self.home.as_ref().map(|h| format!("{}/{}", h.topic, h.partition)),
            "moved_to": self.moved_to.as_ref().map(|h| format!("{}/{}", h.topic, h.partition)),
            "handovers": self.handovers,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::{FieldReducer, ReduceOp};
    use crate::ordering::Policies;
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
        Origin {
            topic: "in".into(),
            partition,
            offset,
        }
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
        old.home = Some(Home {
            topic: "in".into(),
            partition: 1,
        });
        new.home = Some(Home {
            topic: "in".into(),
            partition: 5,
        });
        let merged = new.merge(&old, &h, &p);
        assert_eq!(merged.added, 5);
        assert!(merged.handover);
        assert_eq!(new.state, whole.state);
        assert_eq!(new.applied_events, 12);
        assert_eq!(new.handovers, 1);
        assert_eq!(new.applied_offsets["in/1"], 7);
        // Idempotent: the same record again (a later stub) changes nothing.
        let again = new.merge(&old, &h, &p);
        assert_eq!((again.added, again.handover), (0, false));
        assert!(again.changes.is_empty());
        assert_eq!(new.handovers, 1);
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
        assert_eq!(new.applied_events, 7);
    }

    #[test]
    fn settings_map_filter_and_are_recorded_in_provenance() {
        use crate::settings::{Settings, SettingsDocument};
        let registry = Settings::new(Policies::default());
        let doc = |version, to: &str| SettingsDocument {
            tenant_id: "t".into(),
            version,
            field_mappings: [("Ext".to_owned(), to.to_owned())].into(),
            enabled_types: vec!["set".into()],
            ..Default::default()
        };
        registry.apply_document(doc(1, "a")).unwrap();
        let h = handlers();
        let mut r = EntityRecord::new("e", "t");
        let v1 = registry.view("t");
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
        registry.apply_document(doc(2, "b")).unwrap();
        let v2 = registry.view("t");
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
        assert_eq!(r.ignored_events, 1);
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
        assert_eq!(r.dead_lettered, 0);
        assert_eq!(
            r.applied_offsets["in/0"], 0,
            "the failed offset 1 is not recorded"
        );
        let b = ev("b", 20, "inc", serde_json::json!({"n": 1}));
        r.record_failure(&b, &origin(1), &err.to_string(), 0, false);
        assert_eq!(r.dead_lettered, 1);
        assert_eq!(r.skipped[0].event_id, "b");
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
}
