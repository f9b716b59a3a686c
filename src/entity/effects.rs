//! What one processing result produces besides the record: change records,
//! derived events, anomalies, history entries, dead letters; and how they
//! and the record are sent to the writer.

use super::*;
use crate::model::dead_letter::Received;

impl EntityActor {

    /// Turns one processing result into the records it produces: change
    /// records and derived events (outbox), an anomaly, history entries, a
    /// dead letter. Updates the counters.
    pub(super) fn effects(
        &self,
        handled: Handled<'_>,
        result: &Result<Outcome, crate::model::fold::Rejected>,
        before: Option<&crate::model::handler::EntityState>,
    ) -> Effects {
        let Handled {
            event,
            origin,
            headers,
            processed_at,
            attempts,
            settings,
        } = handled;
        let shared = &self.shared;
        let stats = &shared.stats;
        let record = self.record.as_ref().expect("loaded before processing");
        let mut fx = Effects::default();
        let outcome = match result {
            Ok(o) => o,
            Err(rejected) => {
                let code = rejected.code();
                emit(
                    DeadLettered {
                        stage: "handler",
                        code: &code,
                    },
                    stats,
                );
                tracing::warn!(entity = %self.id, event = %event.event_id, offset = origin.offset, trace_id = crate::telemetry::trace_id_in(headers).as_deref(), error = %rejected, "event dead-lettered");
                fx.dead_letter = Some(DeadLetter::rejected(
                    code,
                    rejected.to_string(),
                    attempts,
                    event,
                    Received {
                        topic: origin.tp.topic.to_string(),
                        partition: origin.tp.partition,
                        offset: origin.offset,
                        key: Some(event.entity_id.clone().into_bytes()),
                        value: Some(event.to_json_bytes()),
                        headers: headers.to_vec(),
                    },
                    processed_at,
                ));
                return fx;
            }
        };
        emit(
            EventProcessed {
                outcome,
                entity_id: &event.entity_id,
                event_id: &event.event_id,
                at_ms: processed_at,
            },
            stats,
        );
        let class = match outcome {
            Outcome::Duplicate(crate::model::fold::DuplicateKind::EventId) => {
                Some(("duplicate", "skip"))
            }
            Outcome::Recomputed { .. } => Some(("late", "recompute")),
            Outcome::LateApplied { too_late, .. }
            | Outcome::Dropped { too_late, .. }
            | Outcome::Parked { too_late, .. } => {
                let class = if *too_late { "too-late" } else { "late" };
                let policies = settings.policies();
                let policy = if *too_late {
                    policies.too_late(&event.event_type).name()
                } else {
                    policies.late(&event.event_type).name()
                };
                Some((class, policy))
            }
            _ => None,
        };
        if let Some((class, policy)) = class {
            fx.anomalies.push(Anomaly {
                seq: 0,
                class: class.into(),
                entity_id: event.entity_id.clone(),
                tenant_id: event.tenant_id.clone(),
                event_id: event.event_id.clone(),
                event_type: event.event_type.clone(),
                topic: String::from(&*origin.tp.topic),
                partition: origin.tp.partition,
                offset: origin.offset,
                lateness: outcome.lateness().cloned(),
                policy: policy.into(),
                outcome: outcome.name().into(),
                at: processed_at,
            });
        }
        if let Some(changes) = outcome.changes() {
            let entry = record.log.iter().find(|e| e.key.event_id == event.event_id);
            if !shared.changes_topic.is_empty() {
                let change = ChangeRecordRef {
                    kind: if outcome.is_correction() {
                        "correction"
                    } else {
                        "change"
                    },
                    entity_id: &event.entity_id,
                    tenant_id: &event.tenant_id,
                    event_id: &event.event_id,
                    event_type: &event.event_type,
                    occurred_at: event.occurred_at,
                    changes,
                    provenance: entry.map(|e| &e.provenance),
                    lateness: outcome.lateness(),
                };
                fx.outbox.push(OutboxRecord {
                    topic: shared.changes_topic.clone(),
                    key: Some(event.entity_id.clone().into_bytes()),
                    value: change.to_bytes(),
                    headers: vec![("content-type".into(), b"application/json".to_vec())],
                    partition: None,
                });
            }
            if shared.policies.history(&event.event_type) {
                if let Some(e) = entry {
                    fx.history.push(e.clone());
                }
            }
            if let Some(before) = before {
                // Observers see the event as its handler did: mapped.
                let prepared = settings.prepare(event);
                let seen = prepared.as_deref().unwrap_or(event);
                fx.outbox
                    .extend(derive(shared, seen, before, &record.state));
            }
        }
        fx
    }

    /// Sends one event's write intent to the writer, after the intents
    /// deferred before it. See [`Self::defer`] for the other way.
    pub(super) fn send(&mut self, entity_changed: bool, fx: Effects, ack: Option<Ack>) {
        self.dirty |= entity_changed;
        let intent = self.intent(fx, ack);
        self.dispatch(intent);
    }

    /// Defers one event's write intent while more deliveries wait in
    /// the actor's mailbox: the next event's intent goes with it, in one
    /// message the writer puts in one batch, and the record is encoded once
    /// for both, with the last ([`Self::dispatch`]).
    pub(super) fn defer(&mut self, entity_changed: bool, fx: Effects, ack: Option<Ack>) {
        if entity_changed {
            self.dirty = true;
            // The record grows unencoded: its size is measured afresh.
            self.body_len = None;
        }
        let intent = self.intent(fx, ack);
        self.burst.push(intent);
    }

    /// Sends the deferred intents, if any (before a retry's wait).
    pub(super) fn flush_burst(&mut self) {
        if let Some(last) = self.burst.pop() {
            self.dispatch(last);
        }
    }

    fn intent(&self, fx: Effects, ack: Option<Ack>) -> WriteIntent {
        WriteIntent {
            entity: None,
            dead_letter: fx.dead_letter,
            outbox: fx.outbox,
            anomalies: fx.anomalies,
            history: fx.history,
            ack,
            durable: Some(self.status.durable.clone()),
            resolve_dead_letter: fx.resolve_dead_letter,
        }
    }

    /// Sends `last` with the intents deferred before it, the record encoded into
    /// `last` if any of them changed it: the batch they all land in holds
    /// the entity as of the last.
    fn dispatch(&mut self, mut last: WriteIntent) {
        if std::mem::take(&mut self.dirty) {
            last.entity = self.record.as_ref().map(|r| {
                let (bytes, body_len) = crate::store::encode_measured(r);
                self.body_len = Some(body_len);
                crate::writer::EntityWrite {
                    id: self.id.clone(),
                    bytes,
                    parked: r.parking.parked.is_some(),
                    home: r.placement.home.clone(),
                    previous_home: self.stored_home.clone(),
                }
            });
        }
        if last.entity.is_some() && self.burst.iter().any(|i| !i.history.is_empty()) {
            // The writer files history entries under the record's entity:
            // those of the deferred intents go with the record, in order.
            let mut history: Vec<_> = self
                .burst
                .iter_mut()
                .flat_map(|i| i.history.drain(..))
                .collect();
            history.append(&mut last.history);
            last.history = history;
        }
        if let Some(w) = &last.entity {
            self.stored_home = w.home.clone();
            let size = self.body_len.unwrap_or(0) as u64;
            let before = self.status.bytes.swap(size, Relaxed);
            self.shard_bytes
                .fetch_add(size as i64 - before as i64, Relaxed);
            if let Some(ack) = &mut last.ack {
                // The copy waits in the writer's queue and batch until the
                // event is durable: memory the source must count.
                let bytes = w.bytes.len() as u64;
                ack.bytes += bytes;
                emit(crate::internal_events::InFlightBytesAdded { bytes }, &self.shared.stats);
            }
        }
        let msg = if self.burst.is_empty() {
            self.status.writes_sent.fetch_add(1, Relaxed);
            WriterMsg::Write(Box::new(last))
        } else {
            self.burst.push(last);
            self.status
                .writes_sent
                .fetch_add(self.burst.len() as u64, Relaxed);
            WriterMsg::Burst(std::mem::take(&mut self.burst))
        };
        if self.shared.writer.send(msg).is_err() {
            self.shared
                .fatal
                .raise("the store writer has stopped".into());
        }
    }
}

/// The acknowledgement of a delivery, with its span data when traced; the
/// write starts now.
pub(super) fn ack_of(d: &Delivery, read_start: SystemTime, outcome: &'static str) -> Ack {
    let write_start = SystemTime::now();
    let span = d.traced.then(|| {
        Box::new(SpanInfo {
            parent: d.parent.clone(),
            read_start,
            write_start,
            topic: d.tp.topic.clone(),
            partition: d.tp.partition,
            offset: d.offset,
            entity_id: d.event.entity_id.clone(),
            tenant_id: d.event.tenant_id.clone(),
            event_id: d.event.event_id.clone(),
            event_type: d.event.event_type.clone(),
            occurred_at: d.event.occurred_at,
        })
    });
    Ack {
        tp: d.tp.clone(),
        offset: d.offset,
        kafka_ts: d.kafka_ts,
        occurred_at: Some(d.event.occurred_at),
        received_at: d.received_at,
        outcome,
        span,
        bytes: d.bytes,
    }
}

/// The event an outcome belongs to, and how it was handled.
#[derive(Clone, Copy)]
pub(super) struct Handled<'a> {
    pub(super) event: &'a Event,
    pub(super) origin: &'a Origin,
    pub(super) headers: &'a [(String, Vec<u8>)],
    pub(super) processed_at: i64,
    pub(super) attempts: u32,
    /// The tenant's settings it was handled under.
    pub(super) settings: &'a crate::settings::TenantSettings,
}

/// What processing one event asks to write besides the entity record.
#[derive(Default)]
pub(super) struct Effects {
    pub(super) outbox: Vec<OutboxRecord>,
    pub(super) anomalies: Vec<Anomaly>,
    pub(super) history: Vec<crate::model::fold::LogEntry>,
    pub(super) dead_letter: Option<DeadLetter>,
    pub(super) resolve_dead_letter: Option<(DeadLetterRef, &'static str)>,
}


/// Runs the observers on one applied event and turns what they derive into
/// outbox records for the derived-events topic.
pub(super) fn derive(
    shared: &Shared,
    event: &Event,
    before: &crate::model::handler::EntityState,
    after: &crate::model::handler::EntityState,
) -> Vec<OutboxRecord> {
    let Some(topic) = &shared.derived_topic else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for observer in shared.handlers.observers() {
        for (i, mut derived) in observer
            .observe(event, before, after)
            .into_iter()
            .enumerate()
        {
            let id = derived_event_id(&event.event_id, observer.name());
            derived.event.event_id = if i == 0 { id } else { format!("{id}~{i}") };
            out.push(OutboxRecord {
                topic: topic.clone(),
                key: Some(derived.event.entity_id.clone().into_bytes()),
                value: derived.event.to_proto_bytes(),
                headers: vec![("content-type".into(), b"application/x-protobuf".to_vec())],
                partition: None,
            });
        }
    }
    out
}
