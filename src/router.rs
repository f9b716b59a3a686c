//! The router: entity id → shard → entity actor.
//!
//! Owns the placement of entities. Each shard is an actor on its own actix
//! Arbiter (one thread); an entity always lands on the same shard, by a stable
//! hash of its id, so its events are handled by one actor on one thread and
//! cannot race. Shards start actors on demand and passivate those that have
//! been idle past the timeout and whose writes are all durable, so memory
//! follows the active set. On revocation the source asks the shards to release
//! the actors of the revoked partitions.

use crate::checkpoint::TopicPartition;
use crate::entity::{
    Deliver, Delivery, EntityActor, EntityStatus, Merge, Released, Resolve, RetryDeadLetter, Shared,
};
use actix::prelude::*;
use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Routes one delivery to its entity's actor.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Route(pub Delivery);

/// An operator's decision on a parked entity, routed to its actor.
#[derive(Message)]
#[rtype(result = "Result<Released, String>")]
pub struct ResolveEntity {
    /// The entity.
    pub entity_id: String,
    /// Skip the event that parked it.
    pub skip: bool,
}

/// Releases the actors of these partitions; replies with how many were released.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct Release(pub HashSet<TopicPartition>);

struct Handle {
    addr: Addr<EntityActor>,
    status: Arc<EntityStatus>,
    delivered: u64,
    last_delivery: Instant,
    tp: TopicPartition,
    /// Its place in the shard's recency queue: the tick of its last delivery.
    tick: u64,
}

/// How many live actors the shards of a router keep, at most.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Actors, over all shards.
    pub actors: usize,
    /// Bytes of their records (encoded size), over all shards.
    pub bytes: u64,
}

/// Actors looked at, at most, when a new actor passes the cap: the
/// quiescent ones are usually the oldest, but an actor whose write is still
/// in flight is skipped (and kept). More than one, so that a shard over the
/// cap comes back down as it takes new actors.
const PASSIVATION_LOOKAHEAD: usize = 16;

/// One shard: the entity actors on one Arbiter.
pub struct Shard {
    shared: Arc<Shared>,
    busy: Arc<crate::stall::Busy>,
    idle: Duration,
    /// Most actors kept alive on this shard; beyond it the least recently
    /// used quiescent ones are passivated.
    max_actors: usize,
    /// Most bytes this shard's actors' records may take; beyond it the
    /// least recently used quiescent ones are passivated.
    max_bytes: u64,
    /// What this shard's actors' records take now: each actor adds the
    /// change in its record's size, and takes its size away when it stops.
    live_bytes: Arc<std::sync::atomic::AtomicI64>,
    /// Keyed by entity id with foldhash (seeded per process): SipHash was
    /// a measurable share of an event's instructions.
    entities: foldhash::HashMap<Arc<str>, Handle>,
    /// The actors in the order of their last delivery, least recent first,
    /// as `(tick, id)`. An actor's current entry is the one whose tick its
    /// handle holds; its older entries (and those of passivated actors) are
    /// stale, skipped when met and dropped when the queue is compacted. So a
    /// delivery costs a push, and passivation takes actors from the front
    /// instead of scanning and sorting the shard (which, at a million new
    /// keys, was a fifth of the CPU, and in an open loop stalled the shard's
    /// deliveries while it ran).
    recency: VecDeque<(u64, Arc<str>)>,
    tick: u64,
}

impl Shard {
    /// A shard whose actors are passivated after `idle`, or beyond `limits`
    /// (this shard's share).
    pub fn new(
        shared: Arc<Shared>,
        idle: Duration,
        busy: Arc<crate::stall::Busy>,
        limits: Limits,
    ) -> Self {
        Shard {
            shared,
            busy,
            idle,
            max_actors: limits.actors.max(1),
            max_bytes: limits.bytes.max(1),
            live_bytes: Arc::default(),
            entities: foldhash::HashMap::default(),
            recency: VecDeque::new(),
            tick: 0,
        }
    }

    fn live_bytes(&self) -> u64 {
        self.live_bytes.load(std::sync::atomic::Ordering::Relaxed).max(0) as u64
    }

    fn over_cap(&self, live_bytes: u64) -> bool {
        self.entities.len() > self.max_actors || live_bytes > self.max_bytes
    }

    /// The oldest live entry of the recency queue, taken off it; stale
    /// entries before it are dropped.
    fn pop_oldest(&mut self) -> Option<(u64, Arc<str>)> {
        while let Some((tick, id)) = self.recency.pop_front() {
            if self.entities.get(&id).is_some_and(|h| h.tick == tick) {
                return Some((tick, id));
            }
        }
        None
    }

    /// Passivates the least recently used quiescent actors while the shard
    /// is over `max_actors` or `max_bytes`: memory follows the hot set, not
    /// every key ever seen, and large records cannot fill it below
    /// `max_actors`. Looks at no more than `budget` actors; those whose
    /// writes are still in flight are kept and go to the back of the queue.
    fn passivate_over_cap(&mut self, budget: usize) {
        let mut live = self.live_bytes();
        let mut busy = Vec::new();
        let mut stopped = 0u64;
        let mut looked = 0;
        while looked < budget && self.over_cap(live) {
            let Some((tick, id)) = self.pop_oldest() else {
                break;
            };
            looked += 1;
            let h = &self.entities[&id];
            if !h.status.quiescent(h.delivered) {
                busy.push((tick, id));
                continue;
            }
            live = live.saturating_sub(h.status.bytes.load(std::sync::atomic::Ordering::Relaxed));
            // Dropping the last address stops the actor.
            self.entities.remove(&id);
            stopped += 1;
        }
        self.recency.extend(busy);
        self.passivated(stopped);
    }

    /// Passivates the actors idle past the timeout whose writes are durable.
    fn passivate_idle(&mut self) {
        let mut busy = Vec::new();
        let mut stopped = 0u64;
        while let Some((tick, id)) = self.pop_oldest() {
            let h = &self.entities[&id];
            if h.last_delivery.elapsed() < self.idle {
                // The queue is in delivery order, so the rest are more
                // recent; except the actors moved to the back while their
                // writes were in flight, which wait for a later tick.
                self.recency.push_front((tick, id));
                break;
            }
            if h.status.quiescent(h.delivered) {
                self.entities.remove(&id);
                stopped += 1;
            } else {
                busy.push((tick, id));
            }
        }
        self.recency.extend(busy);
        self.passivated(stopped);
    }

    fn passivated(&self, count: u64) {
        if count > 0 {
            crate::internal_events::emit(
                crate::internal_events::ActorsPassivated { count },
                &self.shared.stats,
            );
        }
    }

    /// Drops the stale entries of the recency queue once they outnumber the
    /// live ones, so the queue stays within twice the live actors.
    fn compact_recency(&mut self) {
        if self.recency.len() > 2 * self.entities.len() + 1024 {
            let entities = &self.entities;
            self.recency
                .retain(|(tick, id)| entities.get(id).is_some_and(|h| h.tick == *tick));
        }
    }
}

impl Actor for Shard {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let every = (self.idle / 2).clamp(Duration::from_millis(10), Duration::from_secs(5));
        ctx.run_interval(every, |shard, _| {
            shard.passivate_idle();
            // Actors kept at the cap because their writes were in flight
            // are quiescent by now; and records grow without new actors.
            let all = shard.entities.len();
            shard.passivate_over_cap(all);
        });
    }
}

impl Shard {
    /// The handle of an entity's actor, started if needed, with one more
    /// delivery counted.
    fn actor(&mut self, entity_id: &str, tp: &TopicPartition) -> &mut Handle {
        self.tick += 1;
        let (tick, now) = (self.tick, Instant::now());
        let id = match self.entities.get_key_value(entity_id) {
            Some((id, _)) => id.clone(),
            None => {
                let status = Arc::new(EntityStatus::default());
                let actor = EntityActor::new(
                    entity_id.to_owned(),
                    self.shared.clone(),
                    status.clone(),
                    self.busy.clone(),
                    self.live_bytes.clone(),
                );
                let id: Arc<str> = Arc::from(entity_id);
                self.entities.insert(
                    id.clone(),
                    Handle {
                        addr: actor.start(),
                        status,
                        delivered: 0,
                        last_delivery: now,
                        tp: tp.clone(),
                        tick,
                    },
                );
                // One in, about one out: a few actors looked at per new
                // one, never a scan of the shard, also when more actors
                // than the cap have writes in flight (the timer catches up
                // once they are durable).
                self.passivate_over_cap(PASSIVATION_LOOKAHEAD);
                id
            }
        };
        self.recency.push_back((tick, id.clone()));
        self.compact_recency();
        let h = self.entities.get_mut(&id).expect("inserted above, and a new actor is the most recent: not passivated");
        h.tick = tick;
        h.delivered += 1;
        h.last_delivery = now;
        h
    }
}

impl Handler<ResolveEntity> for Shard {
    type Result = ResponseFuture<Result<Released, String>>;

    fn handle(&mut self, msg: ResolveEntity, _: &mut Self::Context) -> Self::Result {
        let tp = TopicPartition::new("", -1);
        let h = self.actor(&msg.entity_id, &tp);
        let fut = h.addr.send(Resolve { skip: msg.skip });
        Box::pin(async move {
            fut.await
                .map_err(|e| format!("entity actor unavailable: {e}"))?
        })
    }
}

/// A dead-lettered event to process again, routed to its entity's actor.
#[derive(Message)]
#[rtype(result = "Result<&'static str, String>")]
pub struct RetryEntity(pub RetryDeadLetter);

impl Handler<RetryEntity> for Shard {
    type Result = ResponseFuture<Result<&'static str, String>>;

    fn handle(&mut self, RetryEntity(msg): RetryEntity, _: &mut Self::Context) -> Self::Result {
        let tp = msg.origin.tp.clone();
        let h = self.actor(&msg.event.entity_id.clone(), &tp);
        let fut = h.addr.send(msg);
        Box::pin(async move {
            fut.await
                .map_err(|e| format!("entity actor unavailable: {e}"))?
        })
    }
}

impl Handler<Route> for Shard {
    type Result = ();

    fn handle(&mut self, Route(d): Route, _: &mut Self::Context) {
        let h = self.actor(&d.event.entity_id.clone(), &d.tp);
        if h.tp != d.tp {
            h.tp = d.tp.clone();
        }
        h.status.queued.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        h.addr.do_send(Deliver(d));
    }
}

/// A record of an entity from another partition, routed to its actor.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RouteMerge(
    pub Box<crate::model::fold::EntityRecord>,
    pub TopicPartition,
);

impl Handler<RouteMerge> for Shard {
    type Result = ();

    fn handle(&mut self, RouteMerge(record, tp): RouteMerge, _: &mut Self::Context) {
        // Only an entity held here has anything to merge or yield: one
        // whose actor is alive (its record may not be in the store yet),
        // or one in the store. No actor is started for the others.
        if !self.entities.contains_key(record.entity_id.as_str())
            && !matches!(
                self.shared.store.load_entity(&record.entity_id),
                Ok(Some(_))
            )
        {
            return;
        }
        let h = self.actor(&record.entity_id.clone(), &tp);
        h.addr.do_send(Merge(record));
    }
}

impl Handler<Release> for Shard {
    type Result = usize;

    fn handle(&mut self, Release(tps): Release, _: &mut Self::Context) -> usize {
        let before = self.entities.len();
        self.entities.retain(|_, h| !tps.contains(&h.tp));
        before - self.entities.len()
    }
}

/// Sends deliveries to the shard that owns their entity.
#[derive(Clone)]
pub struct Router {
    shards: Vec<Addr<Shard>>,
    busy: Vec<Arc<crate::stall::Busy>>,
}

/// The shard of an entity: FNV-1a of its id, stable across runs and machines.
pub fn shard_of(entity_id: &str, shards: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in entity_id.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % shards.max(1) as u64) as usize
}

impl Router {
    /// Starts one shard on each arbiter.
    /// `busy` holds one slot per arbiter, for the stall watchdog.
    pub fn start(
        arbiters: &[Arbiter],
        shared: Arc<Shared>,
        idle: Duration,
        busy: &[Arc<crate::stall::Busy>],
        limits: Limits,
    ) -> Router {
        let n = arbiters.len().max(1);
        let per_shard = Limits {
            actors: limits.actors.div_ceil(n),
            bytes: limits.bytes.div_ceil(n as u64),
        };
        let shards = arbiters
            .iter()
            .zip(busy)
            .map(|(a, b)| {
                let shared = shared.clone();
                let b = b.clone();
                Shard::start_in_arbiter(&a.handle(), move |_| {
                    Shard::new(shared, idle, b, per_shard)
                })
            })
            .collect();
        Router {
            shards,
            busy: busy.to_vec(),
        }
    }

    /// Routes a delivery. Mailboxes are unbounded here; memory is bounded by
    /// the source, which pauses above the in-flight high mark.
    pub fn route(&self, d: Delivery) {
        let i = shard_of(&d.event.entity_id, self.shards.len());
        self.busy[i]
            .queued
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.shards[i].do_send(Route(d));
    }

    /// Deliveries queued per shard, not yet taken up by their entity actor.
    pub fn mailbox_depths(&self) -> Vec<i64> {
        self.busy
            .iter()
            .map(|b| b.queued.load(std::sync::atomic::Ordering::Relaxed))
            .collect()
    }

    /// Hands `record`, an entity's record kept under another partition, to
    /// the entity's actor, which merges it or yields to it. `partition` is
    /// the partition of the entity's input topic the actor is counted under.
    pub fn merge(&self, record: crate::model::fold::EntityRecord, partition: i32) {
        let i = shard_of(&record.entity_id, self.shards.len());
        let topic = record
            .placement
            .home
            .as_ref()
            .map(|h| h.topic.clone())
            .unwrap_or_else(|| Arc::from(""));
        self.shards[i].do_send(RouteMerge(
            Box::new(record),
            TopicPartition::new(topic, partition),
        ));
    }

    /// Releases (or, with `skip`, skips the parking event of) a parked entity.
    pub async fn resolve(&self, entity_id: &str, skip: bool) -> Result<Released, String> {
        let i = shard_of(entity_id, self.shards.len());
        self.shards[i]
            .send(ResolveEntity {
                entity_id: entity_id.to_owned(),
                skip,
            })
            .await
            .map_err(|e| format!("shard unavailable: {e}"))?
    }

    /// Processes a dead-lettered event again through its entity's actor.
    pub async fn retry(&self, msg: RetryDeadLetter) -> Result<&'static str, String> {
        let i = shard_of(&msg.event.entity_id, self.shards.len());
        self.shards[i]
            .send(RetryEntity(msg))
            .await
            .map_err(|e| format!("shard unavailable: {e}"))?
    }

    /// Releases the actors of `tps` on every shard, waiting for the shards.
    /// Call only from outside the arbiters (the source thread).
    pub fn release(&self, tps: &HashSet<TopicPartition>) -> usize {
        let mut n = 0;
        for s in &self.shards {
            n += futures::executor::block_on(s.send(Release(tps.clone()))).unwrap_or(0);
        }
        n
    }
}
