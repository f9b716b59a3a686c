//! The entity actor: one per entity id, handling that entity's events one at
//! a time, in arrival order.
//!
//! Owns the in-memory copy of one entity's record while it is active. On its
//! first event it reads the record from the store; each event then goes
//! through the fold ([`EntityRecord::process`]), and the new record is handed
//! to the store writer as a write intent. The actor does not wait for the
//! flush: the next event is folded on the in-memory record meanwhile, and the
//! router only passivates the actor once all its writes are durable.

mod effects;
mod moves;

use effects::{ack_of, Effects, Handled};
use crate::checkpoint::TopicPartition;
use crate::internal_events::{
    emit, ActorStarted, ActorStopped, DeadLettered, EventForwarded, EventProcessed, HandedOver,
    HandoverMerged, HandoverYielded, KeyMisrouted, RetryDue, RetryScheduled,
};
use crate::metrics::Stats;
use crate::model::anomaly::Anomaly;
use crate::model::change::{ChangeRecord, ChangeRecordRef, JsonChange};
use crate::model::dead_letter::DeadLetter;
use crate::model::envelope::Event;
use crate::model::fold::{EntityRecord, Origin, Outcome};
use crate::model::handler::{derived_event_id, Handlers};
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
    pub policies: crate::model::ordering::Policies,
    /// Every tenant's compiled settings.
    pub settings: Arc<crate::settings::Settings>,
    /// Where change records go; empty: nowhere.
    pub changes_topic: String,
    /// Where observers' derived events are published, if anywhere.
    pub derived_topic: Option<String>,
    /// Raised when the pipeline cannot go on.
    pub fatal: Arc<crate::lifecycle::Fatal>,
    /// Which partition each key belongs on, for entities that change partition.
    pub layout: Arc<crate::partitioner::Layout>,
    /// With the changelog on, the largest encoded record the changelog can
    /// take (the producers' `message.max.bytes`, less the key and the
    /// record's overhead). An event that would make its entity's record
    /// larger is dead-lettered (`record_too_large`), and the record stays
    /// as it was: the changelog would refuse the record for ever.
    pub record_limit: Option<usize>,
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
    /// The message's size (key, value, headers), counted in flight until
    /// the event is durable.
    pub bytes: u64,
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
    /// Deliveries sent to the actor and not yet taken from its mailbox
    /// (the shard's `Route` adds, the actor's `Deliver` takes away): while
    /// there are any, it defers its write intents (`effects::defer`).
    pub queued: AtomicU64,
    /// The size of the actor's record when last encoded (the body before
    /// compression), for the shard's memory budget.
    pub bytes: AtomicU64,
}

impl EntityStatus {
    /// True when everything sent to the actor is handled and durable.
    pub fn quiescent(&self, delivered: u64) -> bool {
        self.handled.load(Relaxed) == delivered
            // Acquire: pairs with the writer's release of the count, so
            // that the next actor's read sees what the writes stored.
            && self.writes_sent.load(Relaxed) == self.durable.load(std::sync::atomic::Ordering::Acquire)
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

/// Most write intents an actor sends as one burst (`effects::defer`): its
/// record is encoded once for up to this many events.
const BURST_MAX: usize = 256;

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
    stored_home: Option<crate::model::fold::Home>,
    /// The record's body length before compression, when known (see
    /// [`Shared::record_limit`]).
    body_len: Option<usize>,
    /// The shard's total of its actors' record sizes, which this actor
    /// keeps up to date with its own ([`EntityStatus::bytes`]).
    shard_bytes: Arc<std::sync::atomic::AtomicI64>,
    /// Write intents deferred while more deliveries wait, in order; the
    /// next one sent takes them along (`effects::defer`).
    burst: Vec<WriteIntent>,
    /// Whether a deferred intent changed the record, which is then
    /// encoded into the next one sent.
    dirty: bool,
}

impl EntityActor {
    /// A new actor for `id`; its record is loaded on the first event.
    pub fn new(
        id: String,
        shared: Arc<Shared>,
        status: Arc<EntityStatus>,
        busy: Arc<crate::stall::Busy>,
        shard_bytes: Arc<std::sync::atomic::AtomicI64>,
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
            body_len: None,
            shard_bytes,
            burst: Vec::new(),
            dirty: false,
        }
    }
}

impl Actor for EntityActor {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Self::Context) {
        emit(ActorStarted, &self.shared.stats);
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        let bytes = self.status.bytes.swap(0, Relaxed);
        self.shard_bytes.fetch_sub(bytes as i64, Relaxed);
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
            self.stored_home = loaded.as_ref().and_then(|r| r.placement.home.clone());
            self.body_len = None;
            self.record = loaded;
        }
        Ok(self.record.as_mut())
    }
}
impl Handler<Deliver> for EntityActor {
    type Result = ();

    fn handle(&mut self, Deliver(d): Deliver, ctx: &mut Self::Context) {
        self.busy.queued.fetch_sub(1, Relaxed);
        self.status.queued.fetch_sub(1, Relaxed);
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
        let origin = Origin::new(d.tp.clone(), d.offset);
        let known_len = self.body_len;
        let record = match self.record(&d.event.entity_id, &d.event.tenant_id) {
            Ok(r) => r,
            Err(reason) => {
                // Not acknowledged: the checkpoint stays below this event.
                shared.fatal.raise(reason);
                self.status.handled.fetch_add(1, Relaxed);
                return;
            }
        };
        if let Some(to) = record.placement.moved_to.clone() {
            if to.partition == d.tp.partition && *to.topic == *d.tp.topic {
                // Its new partition is owned here now: it lives here again.
                record.placement.moved_to = None;
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
        // The record grows by at most about twice the event (its log entry
        // and its state): only an event that could pass the limit pays for
        // a copy of the record to fall back on.
        let limit = shared.record_limit.map(|l| l.saturating_sub(d.event.entity_id.len()));
        let fallback = limit
            .filter(|l| {
                let now = known_len.unwrap_or_else(|| crate::store::body_len(&*record));
                now + 2 * crate::store::body_len(&d.event) + 1024 + 2 > *l
            })
            .map(|l| (l, record.clone()));
        // Tests make handlers slow here (`entity.handle=sleep(MS)`); an
        // error or exit there is not a handler's outcome and is ignored.
        let _ = crate::failpoint::hit("entity.handle");
        let mut result = record.process(&d.event, &origin, processed_at, &shared.handlers, &settings);
        busy.end();
        if let (Some((limit, before)), Ok(_)) = (fallback, &result) {
            let size = crate::store::encode(&*record).len();
            if size > limit {
                *record = before;
                result = Err(crate::model::fold::Rejected {
                    event_type: d.event.event_type.clone(),
                    event_id: d.event.event_id.clone(),
                    error: crate::model::handler::HandlerError::Permanent(format!(
                        "with this event the entity's record would take {size} bytes, more than the {limit} a changelog message may hold (the producers' message.max.bytes); the record is kept as it was"
                    )),
                    code: Some("record_too_large"),
                });
            }
        }
        if let Err(rejected) = &result {
            let transient = matches!(
                rejected.error,
                crate::model::handler::HandlerError::Transient(_)
            );
            if transient && attempt < shared.retries.max_attempts {
                let delay = shared.retries.backoff(attempt);
                emit(RetryScheduled, &shared.stats);
                tracing::info!(entity = %self.id, event = %d.event.event_id, attempt, ?delay, trace_id = crate::telemetry::trace_id_in(&d.headers).as_deref(), error = %rejected.error, "transient failure; retrying");
                // What was deferred goes now, not after the wait.
                self.flush_burst();
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
            record.counters.handovers += 1;
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
        if self.status.queued.load(Relaxed) > 0 && self.burst.len() + 1 < BURST_MAX {
            // The next delivery is in the mailbox: it takes this intent along.
            self.defer(changed || handover, fx, Some(ack));
        } else {
            self.send(changed || handover, fx, Some(ack));
        }
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
impl Handler<Resolve> for EntityActor {
    type Result = Result<Released, String>;

    fn handle(&mut self, msg: Resolve, _: &mut Self::Context) -> Self::Result {
        self.status.handled.fetch_add(1, Relaxed);
        let shared = self.shared.clone();
        let now = unix_ms(SystemTime::now());
        let id = self.id.clone();
        let record = self.record(&id, "")?;
        if record.parking.parked.is_none() {
            return Ok(Released {
                events: 0,
                was_parked: false,
            });
        }
        let before_all = record.state.clone();
        let parked_by = record.parking.parked.as_ref().map(|p| p.event_id.clone());
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
