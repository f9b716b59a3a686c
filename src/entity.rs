//! The entity actor: one per entity id, handling that entity's events one at
//! a time, in arrival order.
//!
//! Owns the in-memory copy of one entity's record while it is active. On its
//! first event it reads the record from the store; each event then goes
//! through the fold ([`EntityRecord::process`]), and the new record is handed
//! to the store writer as a write intent. The actor does not wait for the
//! flush: the next event is folded on the in-memory record meanwhile, and the
//! router only passivates the actor once all its writes are durable.

use crate::checkpoint::TopicPartition;
use crate::dead_letter::DeadLetter;
use crate::envelope::Event;
use crate::fold::{EntityRecord, Origin, Outcome};
use crate::handler::{derived_event_id, Handlers};
use crate::metrics::Stats;
use crate::store::{OutboxRecord, Store};
use crate::telemetry::{unix_ms, SpanInfo};
use crate::writer::{Ack, WriteIntent, WriterMsg};
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
    /// Events kept per entity log.
    pub retention: usize,
    /// Where observers' derived events are published, if anywhere.
    pub derived_topic: Option<String>,
    /// Raised when the pipeline cannot go on.
    pub fatal: Arc<crate::pipeline::Fatal>,
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

/// The actor of one entity.
pub struct EntityActor {
    id: String,
    record: Option<EntityRecord>,
    shared: Arc<Shared>,
    status: Arc<EntityStatus>,
}

impl EntityActor {
    /// A new actor for `id`; its record is loaded on the first event.
    pub fn new(id: String, shared: Arc<Shared>, status: Arc<EntityStatus>) -> Self {
        EntityActor {
            id,
            record: None,
            shared,
            status,
        }
    }
}

impl Actor for EntityActor {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Self::Context) {
        self.shared.stats.active_actors.fetch_add(1, Relaxed);
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        self.shared.stats.active_actors.fetch_sub(1, Relaxed);
    }
}

impl Handler<Deliver> for EntityActor {
    type Result = ();

    fn handle(&mut self, Deliver(d): Deliver, _: &mut Self::Context) {
        let shared = self.shared.clone();
        let read_start = SystemTime::now();
        let record =
            match &mut self.record {
                Some(r) => r,
                None => match shared.store.load_entity(&self.id) {
                    Ok(r) => self.record.insert(r.unwrap_or_else(|| {
                        EntityRecord::new(&d.event.entity_id, &d.event.tenant_id)
                    })),
                    Err(e) => {
                        // Not acknowledged: the checkpoint stays below this event.
                        shared
                            .fatal
                            .raise(format!("cannot read entity {:?}: {e}", self.id));
                        self.status.handled.fetch_add(1, Relaxed);
                        return;
                    }
                },
            };
        let origin = Origin {
            topic: d.tp.0.to_string(),
            partition: d.tp.1,
            offset: d.offset,
        };
        let before = (!shared.handlers.observers().is_empty()).then(|| record.state.clone());
        let result = record.process(
            &d.event,
            &origin,
            unix_ms(read_start),
            &shared.handlers,
            shared.retention,
        );
        let stats = &shared.stats;
        let mut outbox = Vec::new();
        let (outcome, dead_letter) = match &result {
            Ok(o) => {
                match o {
                    Outcome::Applied { .. } => Stats::incr(&stats.applied),
                    Outcome::Duplicate(_) => Stats::incr(&stats.duplicates),
                    Outcome::Recomputed { .. } => Stats::incr(&stats.late_recomputed),
                    Outcome::TooLate { .. } => Stats::incr(&stats.too_late),
                }
                if let (Some(before), Outcome::Applied { .. } | Outcome::Recomputed { .. }) =
                    (&before, o)
                {
                    outbox = derive(&shared, &d.event, before, &record.state);
                }
                (o.name(), None)
            }
            Err(rejected) => {
                Stats::incr(&stats.dead_letters);
                tracing::warn!(entity = %self.id, event = %d.event.event_id, offset = d.offset, error = %rejected, "event dead-lettered");
                let dl = DeadLetter {
                    id: 0,
                    code: format!("handler_{}", rejected.error.kind()),
                    reason: rejected.to_string(),
                    attempts: 1,
                    topic: origin.topic.clone(),
                    partition: origin.partition,
                    offset: origin.offset,
                    key: Some(d.event.entity_id.clone().into_bytes()),
                    value: Some(d.event.to_json_bytes()),
                    headers: d.headers.clone(),
                    entity_id: Some(d.event.entity_id.clone()),
                    event_id: Some(d.event.event_id.clone()),
                    event_type: Some(d.event.event_type.clone()),
                    created_at: unix_ms(read_start),
                };
                ("dead-lettered", Some(dl))
            }
        };
        let changed = match &result {
            Ok(o) => o.changes_record(),
            Err(_) => true,
        };
        let entity = changed.then(|| (self.id.clone(), crate::store::encode(&*record)));
        let write_start = SystemTime::now();
        let span = d.traced.then(|| {
            Box::new(SpanInfo {
                parent: d.parent,
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
        let intent = WriteIntent {
            entity,
            dead_letter,
            outbox,
            ack: Ack {
                tp: d.tp,
                offset: d.offset,
                kafka_ts: d.kafka_ts,
                occurred_at: Some(d.event.occurred_at),
                outcome,
                span,
            },
            durable: Some(self.status.durable.clone()),
        };
        self.status.writes_sent.fetch_add(1, Relaxed);
        self.status.handled.fetch_add(1, Relaxed);
        if shared
            .writer
            .send(WriterMsg::Write(Box::new(intent)))
            .is_err()
        {
            shared.fatal.raise("the store writer has stopped".into());
        }
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
            });
        }
    }
    out
}
