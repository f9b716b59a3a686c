//! The entity actor: one per entity id, handling that entity's events one at
//! a time, in arrival order.
//!
//! Owns the in-memory copy of one entity's record while it is active. On its
//! first event it reads the record from the store; each event then goes
//! through the fold ([`EntityRecord::process`]), and the new record is handed
//! to the store writer as a write intent. The actor does not wait for the
//! flush: the next event is folded on the in-memory record meanwhile, and the
//! router only passivates the actor once all its writes are durable.

use crate::anomaly::Anomaly;
use crate::change::{ChangeRecord, JsonChange};
use crate::checkpoint::TopicPartition;
use crate::dead_letter::DeadLetter;
use crate::envelope::Event;
use crate::fold::{EntityRecord, Origin, Outcome};
use crate::handler::{derived_event_id, Handlers};
use crate::internal_events::{
    emit, ActorStarted, ActorStopped, DeadLettered, EventForwarded, EventProcessed, HandedOver,
    HandoverMerged, HandoverYielded, KeyMisrouted, RetryDue, RetryScheduled,
};
use crate::metrics::Stats;
use crate::store::{OutboxRecord, Store};
use crate::telemetry::{unix_ms, SpanInfo};
use crate::writer::{Ack, DeadLetterRef, WriteIntent, WriterMsg};
use actix::prelude::*;
use opentelemetry::trace::SpanContext;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::SystemTime;

/// What every actor of a pipeline shares.
pub struct Shared {
    /// The handlers and observers.
    pub handlers: Handlers,
    /// The store, for loading records.
    pub store: Arc<dyn Store>,
    /// The writer's inbox.
    pub writer: tokio::sync::mpsc::UnboundedSender<WriterMsg>,
    /// Counters.
    pub stats: Arc<Stats>,
    /// How transient failures are retried.
    pub retries: crate::config::Retries,
    /// Out-of-order policies, retention and history, per type, as configured
    /// (a tenant's settings may override the out-of-order policies).
    pub policies: crate::ordering::Policies,
    /// Every tenant's compiled settings.
    pub settings: Arc<crate::settings::Settings>,
    /// Where change records go; empty: nowhere.
    pub changes_topic: String,
    /// Where observers' derived events are published, if anywhere.
    pub derived_topic: Option<String>,
    /// Raised when the pipeline cannot go on.
    pub fatal: Arc<crate::pipeline::Fatal>,
    /// Which partition each key belongs on, for entities that change partition.
    pub layout: Arc<crate::partitioner::Layout>,
}

/// One decoded message on its way to its entity.
#[derive(Debug)]
pub struct Delivery {
    /// The event.
    pub event: Event,
    /// Its topic and partition.
    pub tp: TopicPartition,
    /// Its offset.
    pub offset: i64,
    /// The broker's append timestamp, ms.
    pub kafka_ts: Option<i64>,
    /// Its headers, kept for dead letters.
    pub headers: Vec<(String, Vec<u8>)>,
    /// When the source received it.
    pub received_at: SystemTime,
    /// The parent span from `traceparent`, if any.
    pub parent: Option<SpanContext>,
    /// Whether to gather span data.
    pub traced: bool,
}

/// Counters the router reads to decide whether an actor may be passivated.
#[derive(Debug, Default)]
pub struct EntityStatus {
    /// Deliveries the actor has handled.
    pub handled: AtomicU64,
    /// Write intents it has sent.
    pub writes_sent: AtomicU64,
    /// Write intents made durable (incremented by the writer).
    pub durable: Arc<AtomicU64>,
}

impl EntityStatus {
    /// True when everything sent to the actor is handled and durable.
    pub fn quiescent(&self, delivered: u64) -> bool {
        self.handled.load(Relaxed) == delivered
            && self.writes_sent.load(Relaxed) == self.durable.load(Relaxed)
    }
}

/// Delivers one event to its entity actor.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Deliver(pub Delivery);

/// A record of this entity kept under another partition (read from that
/// partition's changelog, or restored there): the entity's events arrive on
/// two partitions. The actor merges it if its own partition is the rightful
/// one, or yields (becomes a forwarding stub) if the other one is.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Merge(pub Box<EntityRecord>);

/// The header naming where a forwarded event was first read:
/// `topic/partition/offset`.
pub const FORWARDED_FROM: &str = "orderly.forwarded_from";

/// The actor of one entity.
pub struct EntityActor {
    id: String,
    record: Option<EntityRecord>,
    shared: Arc<Shared>,
    status: Arc<EntityStatus>,
    /// The delivery being retried after a transient failure, and its attempts so far.
    retrying: Option<(Delivery, u32)>,
    /// Deliveries waiting behind it, in arrival order.
    waiting: std::collections::VecDeque<Delivery>,
    /// The shard's slot for the stall watchdog.
    busy: Arc<crate::stall::Busy>,
    /// The home partition the store's partition index has for the entity.
    stored_home: Option<crate::fold::Home>,
}

impl EntityActor {
    /// A new actor for `id`; its record is loaded on the first event.
    pub fn new(
        id: String,
        shared: Arc<Shared>,
        status: Arc<EntityStatus>,
        busy: Arc<crate::stall::Busy>,
    ) -> Self {
        EntityActor {
            id,
            record: None,
            shared,
            status,
            retrying: None,
            waiting: Default::default(),
            busy,
            stored_home: None,
        }
    }
}

impl Actor for EntityActor {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Self::Context) {
        emit(ActorStarted, &self.shared.stats);
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        emit(ActorStopped, &self.shared.stats);
    }
}

/// An operator's decision on a parked entity: release it (process its held
/// events in order) or skip the event that parked it, then release.
#[derive(Message)]
#[rtype(result = "Result<Released, String>")]
pub struct Resolve {
    /// Skip the event that parked the entity.
    pub skip: bool,
}

/// What a release did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Released {
    /// Held events processed.
    pub events: usize,
    /// Whether the entity was parked at all.
    pub was_parked: bool,
}

impl EntityActor {
    /// The entity's record, loaded from the store on first use.
    /// A new one if the store has none.
    fn record(&mut self, entity_id: &str, tenant_id: &str) -> Result<&mut EntityRecord, String> {
        if self.existing()?.is_none() {
            self.record = Some(EntityRecord::new(entity_id, tenant_id));
        }
        Ok(self.record.as_mut().expect("set above"))
    }

    /// The entity's record if this instance has one, loaded on first use.
    fn existing(&mut self) -> Result<Option<&mut EntityRecord>, String> {
        if self.record.is_none() {
            let loaded = self
                .shared
                .store
                .load_entity(&self.id)
                .map_err(|e| format!("cannot read entity {:?}: {e}", self.id))?;
            self.stored_home = loaded.as_ref().and_then(|r| r.home.clone());
            self.record = loaded;
        }
        Ok(self.record.as_mut())
    }

    /// Turns one processing result into the records it produces: change
    /// records and derived events (outbox), an anomaly, history entries, a
    /// dead letter. Updates the counters.
    fn effects(
        &self,
        handled: Handled<'_>,
        result: &Result<Outcome, crate::fold::Rejected>,
        before: Option<&crate::handler::EntityState>,
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
                let code = format!("handler_{}", rejected.error.kind());
                emit(
                    DeadLettered {
                        stage: "handler",
                        code: &code,
                    },
                    stats,
                );
                tracing::warn!(entity = %self.id, event = %event.event_id, offset = origin.offset, error = %rejected, "event dead-lettered");
                fx.dead_letter = Some(DeadLetter {
                    id: 0,
                    code,
                    reason: rejected.to_string(),
                    attempts,
                    topic: origin.topic.clone(),
                    partition: origin.partition,
                    offset: origin.offset,
                    key: Some(event.entity_id.clone().into_bytes()),
                    value: Some(event.to_json_bytes()),
                    headers: headers.to_vec(),
                    entity_id: Some(event.entity_id.clone()),
                    event_id: Some(event.event_id.clone()),
                    event_type: Some(event.event_type.clone()),
                    created_at: processed_at,
                    status: crate::dead_letter::OPEN.into(),
                });
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
            Outcome::Duplicate(crate::fold::DuplicateKind::EventId) => Some(("duplicate", "skip")),
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
                topic: origin.topic.clone(),
                partition: origin.partition,
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
                let change = ChangeRecord {
                    kind: if outcome.is_correction() {
                        "correction"
                    } else {
                        "change"
                    }
                    .into(),
                    entity_id: event.entity_id.clone(),
                    tenant_id: event.tenant_id.clone(),
                    event_id: event.event_id.clone(),
                    event_type: event.event_type.clone(),
                    occurred_at: event.occurred_at,
                    changes: changes.iter().map(JsonChange::from).collect(),
                    provenance: entry.map(|e| e.provenance.clone()),
                    lateness: outcome.lateness().cloned(),
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

    /// Sends one write intent to the writer.
    fn send(&mut self, entity_changed: bool, fx: Effects, ack: Option<Ack>) {
        let entity = entity_changed
            .then(|| {
                self.record.as_ref().map(|r| crate::writer::EntityWrite {
                    id: self.id.clone(),
                    bytes: crate::store::encode(r),
                    parked: r.parked.is_some(),
                    home: r.home.clone(),
                    previous_home: self.stored_home.clone(),
                })
            })
            .flatten();
        if let Some(w) = &entity {
            self.stored_home = w.home.clone();
        }
        let intent = WriteIntent {
            entity,
            dead_letter: fx.dead_letter,
            outbox: fx.outbox,
            anomalies: fx.anomalies,
            history: fx.history,
            ack,
            durable: Some(self.status.durable.clone()),
            resolve_dead_letter: fx.resolve_dead_letter,
        };
        self.status.writes_sent.fetch_add(1, Relaxed);
        if self
            .shared
            .writer
            .send(WriterMsg::Write(Box::new(intent)))
            .is_err()
        {
            self.shared
                .fatal
                .raise("the store writer has stopped".into());
        }
    }
}

/// The acknowledgement of a delivery, with its span data when traced; the
/// write starts now.
fn ack_of(d: &Delivery, read_start: SystemTime, outcome: &'static str) -> Ack {
    let write_start = SystemTime::now();
    let span = d.traced.then(|| {
        Box::new(SpanInfo {
            parent: d.parent.clone(),
            received_at: d.received_at,
            read_start,
            write_start,
            topic: d.tp.0.clone(),
            partition: d.tp.1,
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
        outcome,
        span,
    }
}

/// The event an outcome belongs to, and how it was handled.
#[derive(Clone, Copy)]
struct Handled<'a> {
    event: &'a Event,
    origin: &'a Origin,
    headers: &'a [(String, Vec<u8>)],
    processed_at: i64,
    attempts: u32,
    /// The tenant's settings it was handled under.
    settings: &'a crate::settings::TenantSettings,
}

/// What processing one event asks to write besides the entity record.
#[derive(Default)]
struct Effects {
    outbox: Vec<OutboxRecord>,
    anomalies: Vec<Anomaly>,
    history: Vec<crate::fold::LogEntry>,
    dead_letter: Option<DeadLetter>,
    resolve_dead_letter: Option<(DeadLetterRef, &'static str)>,
}

impl Handler<Deliver> for EntityActor {
    type Result = ();

    fn handle(&mut self, Deliver(d): Deliver, ctx: &mut Self::Context) {
        self.busy.queued.fetch_sub(1, Relaxed);
        if self.retrying.is_some() || !self.waiting.is_empty() {
            // An earlier event of this entity is being retried: keep the order.
            self.waiting.push_back(d);
            return;
        }
        self.attempt(d, 1, ctx);
    }
}

impl EntityActor {
    /// Processes one delivery; on a transient failure, schedules a retry and
    /// leaves the delivery (and those behind it) waiting.
    fn attempt(&mut self, d: Delivery, attempt: u32, ctx: &mut Context<Self>) {
        let busy = self.busy.clone();
        let shared = self.shared.clone();
        let read_start = SystemTime::now();
        let processed_at = unix_ms(read_start);
        let origin = Origin {
            topic: d.tp.0.to_string(),
            partition: d.tp.1,
            offset: d.offset,
        };
        let record = match self.record(&d.event.entity_id, &d.event.tenant_id) {
            Ok(r) => r,
            Err(reason) => {
                // Not acknowledged: the checkpoint stays below this event.
                shared.fatal.raise(reason);
                self.status.handled.fetch_add(1, Relaxed);
                return;
            }
        };
        if let Some(to) = record.moved_to.clone() {
            if to.partition == d.tp.1 && *to.topic == *d.tp.0 {
                // Its new partition is owned here now: it lives here again.
                record.moved_to = None;
            } else {
                self.forward(d, to, origin, read_start);
                return;
            }
        }
        let handover = record.is_handover(&origin);
        let before = (!shared.handlers.observers().is_empty()).then(|| record.state.clone());
        // The settings in force now: this event is handled under them.
        let settings = shared.settings.view(&d.event.tenant_id);
        busy.begin(&d.event.entity_id, &d.event.event_id, processed_at);
        let result = record.process(&d.event, &origin, processed_at, &shared.handlers, &settings);
        busy.end();
        if let Err(rejected) = &result {
            let transient = matches!(rejected.error, crate::handler::HandlerError::Transient(_));
            if transient && attempt < shared.retries.max_attempts {
                let delay = shared.retries.backoff(attempt);
                emit(RetryScheduled, &shared.stats);
                tracing::info!(entity = %self.id, event = %d.event.event_id, attempt, ?delay, error = %rejected.error, "transient failure; retrying");
                self.retrying = Some((d, attempt));
                ctx.run_later(delay, |actor, ctx| {
                    if let Some((d, n)) = actor.retrying.take() {
                        emit(RetryDue, &actor.shared.stats);
                        actor.attempt(d, n + 1, ctx);
                        actor.drain(ctx);
                    }
                });
                return;
            }
            let reason = rejected.to_string();
            let park = shared.retries.park_on_failure.contains(&d.event.event_type);
            record.record_failure(&d.event, &origin, &reason, processed_at, park);
        }
        if handover {
            // Its events now come from a second partition, both handled here.
            record.handovers += 1;
        }
        let handled = Handled {
            event: &d.event,
            origin: &origin,
            headers: &d.headers,
            processed_at,
            attempts: attempt,
            settings: settings.current(),
        };
        let fx = self.effects(handled, &result, before.as_ref());
        let outcome = match &result {
            Ok(o) => o.name(),
            Err(_) => "dead-lettered",
        };
        let changed = result.as_ref().map(Outcome::changes_record).unwrap_or(true);
        if changed || handover {
            self.settle_home(&d.tp, handover);
        }
        let ack = ack_of(&d, read_start, outcome);
        self.status.handled.fetch_add(1, Relaxed);
        self.send(changed || handover, fx, Some(ack));
    }

    /// Decides the partition the entity's state lives under after an event
    /// from `tp`: the partition its events arrive on, and when they arrive
    /// on two, the one the configured partitioner maps its key to.
    fn settle_home(&mut self, tp: &TopicPartition, handover: bool) {
        let shared = self.shared.clone();
        let Some(r) = self.record.as_mut() else {
            return;
        };
        let here = crate::fold::Home {
            topic: tp.0.to_string(),
            partition: tp.1,
        };
        let moved = match &r.home {
            None => true,
            Some(h) if *h == here => false,
            Some(h) if h.topic != here.topic => true,
            Some(h) => match shared.layout.rightful(&h.topic, &self.id) {
                // Unknown partition count (no source): its latest partition.
                None => true,
                Some(p) if p == here.partition => true,
                // A straggler from the partition it left.
                Some(p) if p == h.partition => false,
                rightful => {
                    if handover {
                        emit(
                            KeyMisrouted {
                                entity_id: &self.id,
                                topic: &h.topic,
                                home: h.partition,
                                other: here.partition,
                                rightful,
                                partitioner: shared.layout.partitioner.name(),
                            },
                            &shared.stats,
                        );
                    }
                    false
                }
            },
        };
        if handover {
            let home = if moved {
                here.partition
            } else {
                r.home.as_ref().map_or(here.partition, |h| h.partition)
            };
            emit(
                HandedOver {
                    entity_id: &self.id,
                    home,
                    how: "arrival",
                },
                &shared.stats,
            );
        }
        if moved {
            // Kept for the changelog follower: a new entity under a partition
            // its key does not map to may have a record elsewhere.
            shared
                .layout
                .note_home(&here.topic, &self.id, Some(here.partition));
            r.home = Some(here);
        }
    }

    /// Forwards an event that arrived at a forwarding stub to the entity's
    /// new partition, through the outbox: it is published once the stub's
    /// record of its offset is durable, and acknowledged then.
    fn forward(
        &mut self,
        d: Delivery,
        to: crate::fold::Home,
        origin: Origin,
        read_start: SystemTime,
    ) {
        let record = self.record.as_mut().expect("loaded by the caller");
        let mut fx = Effects::default();
        let outcome = if record.forward(&origin) {
            let mut headers: Vec<(String, Vec<u8>)> = d
                .headers
                .iter()
                .filter(|(k, _)| k != FORWARDED_FROM && k != "content-type")
                .cloned()
                .collect();
            headers.push(("content-type".into(), b"application/x-protobuf".to_vec()));
            headers.push((
                FORWARDED_FROM.into(),
                format!("{}/{}/{}", origin.topic, origin.partition, origin.offset).into_bytes(),
            ));
            fx.outbox.push(OutboxRecord {
                topic: to.topic.clone(),
                key: Some(d.event.entity_id.clone().into_bytes()),
                value: d.event.to_proto_bytes(),
                headers,
                partition: Some(to.partition),
            });
            emit(EventForwarded, &self.shared.stats);
            "forwarded"
        } else {
            "duplicate"
        };
        let ack = ack_of(&d, read_start, outcome);
        self.status.handled.fetch_add(1, Relaxed);
        self.send(true, fx, Some(ack));
    }

    /// Processes the deliveries that waited behind a retry, until one needs a retry of its own.
    fn drain(&mut self, ctx: &mut Context<Self>) {
        while self.retrying.is_none() {
            let Some(d) = self.waiting.pop_front() else {
                break;
            };
            self.attempt(d, 1, ctx);
        }
    }
}

/// Processes a dead-lettered event again (the operator fixed the cause).
#[derive(Message)]
#[rtype(result = "Result<&'static str, String>")]
pub struct RetryDeadLetter {
    /// The event, decoded from the dead letter.
    pub event: Event,
    /// Where it was read from.
    pub origin: Origin,
    /// The dead letter's id; marked `retried` once the event is durable.
    pub id: u64,
}

impl Handler<RetryDeadLetter> for EntityActor {
    type Result = Result<&'static str, String>;

    fn handle(&mut self, msg: RetryDeadLetter, _: &mut Self::Context) -> Self::Result {
        self.status.handled.fetch_add(1, Relaxed);
        let shared = self.shared.clone();
        let now = unix_ms(SystemTime::now());
        let record = self.record(&msg.event.entity_id, &msg.event.tenant_id)?;
        let before = record.state.clone();
        let settings = shared.settings.view(&msg.event.tenant_id);
        let result = record.retry(&msg.event, &msg.origin, now, &shared.handlers, &settings);
        match &result {
            Ok(outcome) => {
                let name = outcome.name();
                let handled = Handled {
                    event: &msg.event,
                    origin: &msg.origin,
                    headers: &[],
                    processed_at: now,
                    attempts: 1,
                    settings: settings.current(),
                };
                let observed = (!shared.handlers.observers().is_empty()).then_some(&before);
                let mut fx = self.effects(handled, &result, observed);
                fx.resolve_dead_letter = Some((DeadLetterRef::Id(msg.id), "retried"));
                tracing::info!(entity = %self.id, event = %msg.event.event_id, dead_letter = msg.id, outcome = name, "dead letter retried");
                self.send(true, fx, None);
                Ok(name)
            }
            Err(rejected) => Err(format!("still failing: {rejected}")),
        }
    }
}

impl Handler<Merge> for EntityActor {
    type Result = ();

    fn handle(&mut self, Merge(other): Merge, _: &mut Self::Context) {
        self.status.handled.fetch_add(1, Relaxed);
        let shared = self.shared.clone();
        let id = self.id.clone();
        let mine = match self.existing() {
            Ok(Some(r)) => r,
            // Not held here: nothing to combine.
            Ok(None) => return,
            Err(reason) => {
                tracing::warn!(entity = %id, %reason, "cannot load an entity to merge its other record; skipped");
                return;
            }
        };
        let (Some(home), Some(theirs)) = (mine.home.clone(), other.home.clone()) else {
            return;
        };
        if mine.moved_to.is_some() || home == theirs || home.topic != theirs.topic {
            return;
        }
        let rightful = shared.layout.rightful(&home.topic, &id);
        if rightful == Some(home.partition) {
            let settings = shared.settings.view(&mine.tenant_id);
            let merged = mine.merge(&other, &shared.handlers, &settings);
            emit(
                HandoverMerged {
                    added: merged.added,
                    too_late: merged.too_late,
                },
                &shared.stats,
            );
            if merged.handover {
                emit(
                    HandedOver {
                        entity_id: &id,
                        home: home.partition,
                        how: "merge",
                    },
                    &shared.stats,
                );
            }
            let mut fx = Effects::default();
            if !merged.changes.is_empty() && !shared.changes_topic.is_empty() {
                let change = ChangeRecord {
                    kind: "handover".into(),
                    entity_id: id.clone(),
                    tenant_id: mine.tenant_id.clone(),
                    event_id: String::new(),
                    event_type: String::new(),
                    occurred_at: 0,
                    changes: merged.changes.iter().map(JsonChange::from).collect(),
                    provenance: None,
                    lateness: None,
                };
                fx.outbox.push(OutboxRecord {
                    topic: shared.changes_topic.clone(),
                    key: Some(id.clone().into_bytes()),
                    value: change.to_bytes(),
                    headers: vec![("content-type".into(), b"application/json".to_vec())],
                    partition: None,
                });
            }
            // A live copy elsewhere only yields once its owner reads this
            // record in the changelog: write it, even if nothing changed.
            let write =
                merged.added > 0 || merged.handover || merged.rebased || other.moved_to.is_none();
            if write {
                self.send(true, fx, None);
            }
        } else if rightful == Some(theirs.partition) && other.moved_to.is_none() {
            mine.moved_to = Some(theirs.clone());
            shared.layout.note_home(&home.topic, &id, None);
            emit(
                HandoverYielded {
                    entity_id: &id,
                    from: home.partition,
                    to: theirs.partition,
                },
                &shared.stats,
            );
            self.send(true, Effects::default(), None);
        } else if other.moved_to.is_none() {
            emit(
                KeyMisrouted {
                    entity_id: &id,
                    topic: &home.topic,
                    home: home.partition,
                    other: theirs.partition,
                    rightful,
                    partitioner: shared.layout.partitioner.name(),
                },
                &shared.stats,
            );
        }
    }
}

impl Handler<Resolve> for EntityActor {
    type Result = Result<Released, String>;

    fn handle(&mut self, msg: Resolve, _: &mut Self::Context) -> Self::Result {
        self.status.handled.fetch_add(1, Relaxed);
        let shared = self.shared.clone();
        let now = unix_ms(SystemTime::now());
        let id = self.id.clone();
        let record = self.record(&id, "")?;
        if record.parked.is_none() {
            return Ok(Released {
                events: 0,
                was_parked: false,
            });
        }
        let before_all = record.state.clone();
        let parked_by = record.parked.as_ref().map(|p| p.event_id.clone());
        let settings = shared.settings.view(&record.tenant_id);
        let results = record.release(msg.skip, now, &shared.handlers, &settings);
        tracing::info!(entity = %self.id, events = results.len(), skip = msg.skip, "parked entity released");
        let mut fx = Effects::default();
        for (held, result) in &results {
            let before = (!shared.handlers.observers().is_empty()).then(|| before_all.clone());
            let handled = Handled {
                event: &held.event,
                origin: &held.origin,
                headers: &[],
                processed_at: now,
                attempts: 1,
                settings: settings.current(),
            };
            let one = self.effects(handled, result, before.as_ref());
            if result.is_ok() && parked_by.as_deref() == Some(held.event.event_id.as_str()) {
                // The event that parked the entity went through: a dead letter
                // written when it failed is resolved.
                fx.resolve_dead_letter = Some((DeadLetterRef::At(held.origin.clone()), "retried"));
            }
            fx.outbox.extend(one.outbox);
            fx.anomalies.extend(one.anomalies);
            fx.history.extend(one.history);
            if let Some(dl) = one.dead_letter {
                // Several dead letters in one release: send them one per intent.
                self.send(
                    false,
                    Effects {
                        dead_letter: Some(dl),
                        ..Default::default()
                    },
                    None,
                );
            }
        }
        self.send(true, fx, None);
        Ok(Released {
            events: results.len(),
            was_parked: true,
        })
    }
}

/// Runs the observers on one applied event and turns what they derive into
/// outbox records for the derived-events topic.
fn derive(
    shared: &Shared,
    event: &Event,
    before: &crate::handler::EntityState,
    after: &crate::handler::EntityState,
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
