//! The fold of one event: in order, duplicate, late (by policy), held,
//! retried, released; and the re-fold from the base snapshot.

use super::*;
use std::borrow::Cow;

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
                self.counters.duplicates += 1;
                self.counters.redeliveries += 1;
                return Ok(Outcome::Duplicate(DuplicateKind::Redelivery));
            }
        }
        if self.holds_its_limit(event, settings.current().policies().max_held) {
            return Err(held_limit(event, settings.current().policies().max_held));
        }
        let previous = self.applied_offsets.insert(tp.clone(), origin.offset);
        if let Some(outcome) = self.duplicate_or_held(event, origin) {
            if matches!(outcome, Outcome::Duplicate(_)) {
                self.counters.duplicates += 1;
            }
            return Ok(outcome);
        }
        let result = self.prepare_and_apply(
            event,
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
        if self.holds_its_limit(event, settings.current().policies().max_held) {
            return Err(held_limit(event, settings.current().policies().max_held));
        }
        if let Some(outcome) = self.duplicate_or_held(event, origin) {
            return Ok(outcome);
        }
        let result = self.prepare_and_apply(
            event,
            origin,
            processed_at,
            handlers,
            settings,
            Mode::Release,
        );
        if result.is_ok() {
            self.parking
                .skipped
                .retain(|s| s.event_id != event.event_id);
        }
        result
    }

    /// Applies the tenant's field mappings to `event` and applies it, or,
    /// when its type is not enabled for the tenant, counts it ignored.
    fn prepare_and_apply(
        &mut self,
        event: &Event,
        origin: &Origin,
        processed_at: i64,
        handlers: &Handlers,
        settings: &TenantView,
        mode: Mode,
    ) -> Result<Outcome, Rejected> {
        let Some(prepared) = settings.current().prepare(event) else {
            self.counters.ignored_events += 1;
            return Ok(Outcome::Ignored {
                settings_version: settings.current().version(),
            });
        };
        self.apply_event(
            Prepared {
                raw: event,
                event: prepared,
            },
            origin,
            processed_at,
            handlers,
            settings,
            mode,
        )
    }

    /// Whether the entity is parked and already holds `max_held` events, so
    /// that `event` (unless a duplicate of one of them) cannot be held.
    fn holds_its_limit(&self, event: &Event, max_held: usize) -> bool {
        self.parking.parked.is_some()
            && self.parking.held.len() >= max_held
            && !self
                .parking
                .held
                .iter()
                .any(|h| h.event.event_id == event.event_id)
            && !self.log.iter().any(|e| e.key.event_id == event.event_id)
    }

    /// A duplicate by event id (in the log or held), or, if the entity is
    /// parked, the event held; `None` if it is to be applied.
    pub(super) fn duplicate_or_held(&mut self, event: &Event, origin: &Origin) -> Option<Outcome> {
        if self.log.iter().any(|e| e.key.event_id == event.event_id)
            || self
                .parking
                .held
                .iter()
                .any(|h| h.event.event_id == event.event_id)
        {
            return Some(Outcome::Duplicate(DuplicateKind::EventId));
        }
        if self.parking.parked.is_some() {
            self.parking.held.push(HeldEvent {
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
    /// noted in the record, or, with `park` and the entity not parked yet,
    /// the entity is parked with the event first in line.
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
        self.counters.dead_lettered += 1;
        // An entity already parked is not parked again: its held events
        // would wait behind this one, and it may be over its hold limit.
        if park && self.parking.parked.is_none() {
            self.parking.parked = Some(Parked {
                event_id: event.event_id.clone(),
                reason: reason.to_owned(),
                since: at,
            });
            self.parking.held.push(HeldEvent {
                event: event.clone(),
                origin: origin.clone(),
            });
        } else {
            self.note_skip(event, reason, at);
        }
    }

    /// Notes a skipped (dead-lettered) event in the record's provenance; the
    /// newest 16 are kept.
    pub(super) fn note_skip(&mut self, event: &Event, reason: &str, at: i64) {
        self.parking.skipped.push(Skipped {
            event_id: event.event_id.clone(),
            event_type: event.event_type.clone(),
            reason: reason.to_owned(),
            at,
        });
        if self.parking.skipped.len() > 16 {
            self.parking.skipped.remove(0);
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
        let Some(parked) = self.parking.parked.take() else {
            return Vec::new();
        };
        let mut held = std::mem::take(&mut self.parking.held);
        if skip {
            held.retain(|h| h.event.event_id != parked.event_id);
        }
        held.sort_by_key(|h| OrderKey::of(&h.event));
        held.into_iter()
            .map(|h| {
                let r = match settings.current().prepare(&h.event) {
                    None => {
                        self.counters.ignored_events += 1;
                        Ok(Outcome::Ignored {
                            settings_version: settings.current().version(),
                        })
                    }
                    Some(prepared) => self.apply_event(
                        Prepared {
                            raw: &h.event,
                            event: prepared,
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

    pub(super) fn apply_event(
        &mut self,
        Prepared {
            raw,
            event: prepared,
        }: Prepared<'_>,
        origin: &Origin,
        processed_at: i64,
        handlers: &Handlers,
        settings: &TenantView,
        mode: Mode,
    ) -> Result<Outcome, Rejected> {
        let event: &Event = &prepared;
        let in_force = settings.current();
        let policies = in_force.policies();
        let key = OrderKey::of(event);
        let provenance = Provenance {
            event_id: event.event_id.clone(),
            event_type: event.event_type.clone(),
            topic: String::from(&*origin.tp.topic),
            partition: origin.tp.partition,
            offset: origin.offset,
            occurred_at: event.occurred_at,
            processed_at,
            settings_version: in_force.version(),
        };
        let reject = |error| Rejected {
            event_type: event.event_type.clone(),
            event_id: event.event_id.clone(),
            error,
            code: None,
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
                            self.counters.too_late_events += 1;
                        } else {
                            self.counters.late_dropped += 1;
                        }
                        return Ok(Outcome::Dropped { lateness, too_late });
                    }
                    LatePolicy::Park => {
                        self.parking.parked = Some(Parked {
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
                        self.parking.held.push(HeldEvent {
                            event: raw.clone(),
                            origin: origin.clone(),
                        });
                        return Ok(Outcome::Parked { lateness, too_late });
                    }
                    LatePolicy::Apply => {
                        let changes = self
                            .apply_on_top(handler, event, in_force, &provenance)
                            .map_err(reject)?;
                        let pos = self.log.partition_point(|e| e.key < key);
                        self.log.insert(pos, log_entry(prepared, key, provenance));
                        self.counters.late_applied += 1;
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
                        self.log.insert(pos, log_entry(prepared, key, provenance));
                        let old = std::mem::take(&mut self.state);
                        self.refold(handlers, settings);
                        self.counters.late_events += 1;
                        Outcome::Recomputed {
                            lateness,
                            changes: diff(&old.fields, &self.state.fields),
                        }
                    }
                }
            }
            _ => {
                let changes = self
                    .apply_on_top(handler, event, in_force, &provenance)
                    .map_err(reject)?;
                self.high_water = Some(key.clone());
                self.log.push(log_entry(prepared, key, provenance));
                Outcome::Applied { changes }
            }
        };
        self.counters.applied_events += 1;
        self.trim(handlers, settings);
        Ok(outcome)
    }

    /// Applies `event` on top of the current state (a failure leaves no
    /// partial effect: [`crate::model::handler::Handler::apply_changes`]) and credits the fields it
    /// changed to it.
    pub(super) fn apply_on_top(
        &mut self,
        handler: &dyn crate::model::handler::Handler,
        event: &Event,
        settings: &TenantSettings,
        provenance: &Provenance,
    ) -> Result<Vec<FieldChange>, HandlerError> {
        let changes = handler.apply_changes(&mut self.state, event, settings)?;
        // One copy, shared by the fields this event wrote.
        let shared = Arc::new(provenance.clone());
        for c in &changes {
            self.provenance.insert(c.field.clone(), Arc::clone(&shared));
        }
        Ok(changes)
    }

    /// The state after the base and the first `upto` log entries.
    pub(super) fn state_at(
        &self,
        upto: usize,
        handlers: &Handlers,
        settings: &TenantView,
    ) -> EntityState {
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
                let shared = Arc::new(entry.provenance.clone());
                for c in diff(&before, &state.fields) {
                    provenance.insert(c.field, Arc::clone(&shared));
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

/// The rejection of an event that a parked entity holding `max` events
/// cannot hold: it is dead-lettered (`held_limit`), and the entity stays
/// parked with what it holds.
fn held_limit(event: &Event, max: usize) -> Rejected {
    Rejected {
        event_type: event.event_type.clone(),
        event_id: event.event_id.clone(),
        error: crate::model::handler::HandlerError::Permanent(format!(
            "the entity is parked and already holds {max} events (max_held_events); release or skip it, then retry this dead letter"
        )),
        code: Some(HELD_LIMIT),
    }
}

/// The dead-letter code of an event a parked entity could not hold.
pub const HELD_LIMIT: &str = "held_limit";

/// The log entry of a prepared event: its payload moved when it was built
/// for this event (the tenant maps fields), copied when it is the event as
/// it arrived.
fn log_entry(prepared: Cow<'_, Event>, key: OrderKey, provenance: Provenance) -> LogEntry {
    let (event_type, payload) = match prepared {
        Cow::Owned(e) => (e.event_type, e.payload),
        Cow::Borrowed(e) => (e.event_type.clone(), e.payload.clone()),
    };
    LogEntry {
        key,
        event_type,
        payload,
        provenance,
    }
}
