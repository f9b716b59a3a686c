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
use std::collections::{HashMap, HashSet};
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
}

/// How many live actors the shards of a router keep, at most.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Actors, over all shards.
    pub actors: usize,
    /// Bytes of their records (encoded size), over all shards.
    pub bytes: u64,
}

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
    /// When a passivation over the byte budget last found nothing to stop:
    /// the scan waits a little before it is tried again.
    bytes_scan_missed: Option<Instant>,
    /// The actor count above which a new actor runs a passivation over
    /// `max_actors`: a tenth over it, or a tenth over what the last scan
    /// left when that could not get down to `max_actors` (its actors still
    /// had writes in flight). Without this, every new actor scanned and
    /// sorted the whole shard while the in-flight events outnumbered
    /// `max_actors`: a fifth of the CPU at a million new keys (perf).
    count_scan_at: usize,
    entities: HashMap<String, Handle>,
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
            bytes_scan_missed: None,
            count_scan_at: Self::slack(limits.actors.max(1)),
            entities: HashMap::new(),
        }
    }

    /// `n` and a tenth.
    fn slack(n: usize) -> usize {
        n + n / 10
    }

    /// Above `max_actors` (plus a tenth, so this runs once per many new
    /// actors) or `max_bytes` (likewise), passivates the least recently used
    /// quiescent actors down to both: memory follows the hot set, not every
    /// key ever seen, and large records cannot fill it below `max_actors`.
    /// Runs from the timer with `timer` set (the count is then checked
    /// against `max_actors` and a tenth again: actors that were busy at the
    /// last scan may be quiescent now), and for each new actor without.
    fn passivate_over_cap(&mut self, timer: bool) {
        let live = self.live_bytes.load(std::sync::atomic::Ordering::Relaxed).max(0) as u64;
        let count_at = if timer {
            Self::slack(self.max_actors)
        } else {
            self.count_scan_at
        };
        let over_count = self.entities.len() > count_at;
        let over_bytes = live > self.max_bytes + self.max_bytes / 10
            && self
                .bytes_scan_missed
                .is_none_or(|t| t.elapsed() >= Duration::from_millis(100));
        if !over_count && !over_bytes {
            return;
        }
        let mut idle: Vec<(Instant, String, u64)> = self
            .entities
            .iter()
            .filter(|(_, h)| h.status.quiescent(h.delivered))
            .map(|(k, h)| {
                let bytes = h.status.bytes.load(std::sync::atomic::Ordering::Relaxed);
                (h.last_delivery, k.clone(), bytes)
            })
            .collect();
        idle.sort_unstable_by_key(|(at, _, _)| *at);
        // Oldest first, until both the count and the bytes are within bounds.
        let mut excess = self.entities.len().saturating_sub(self.max_actors);
        let mut excess_bytes = live.saturating_sub(self.max_bytes);
        let stop = idle
            .iter()
            .take_while(|(_, _, bytes)| {
                let go = excess > 0 || excess_bytes > 0;
                excess = excess.saturating_sub(1);
                excess_bytes = excess_bytes.saturating_sub(*bytes);
                go
            })
            .count();
        idle.truncate(stop);
        self.bytes_scan_missed = (over_bytes && excess_bytes > 0).then(Instant::now);
        for (_, k, _) in &idle {
            self.entities.remove(k);
        }
        self.count_scan_at = Self::slack(self.max_actors)
            .max(self.entities.len() + self.max_actors / 10);
        if !idle.is_empty() {
            crate::internal_events::emit(
                crate::internal_events::ActorsPassivated {
                    count: idle.len() as u64,
                },
                &self.shared.stats,
            );
        }
    }

    /// Drops idle, fully durable actors. Dropping the last address stops an actor.
    fn passivate_idle(&mut self) {
        let idle = self.idle;
        let before = self.entities.len();
        self.entities
            .retain(|_, h| h.last_delivery.elapsed() < idle || !h.status.quiescent(h.delivered));
        let n = before - self.entities.len();
        if n > 0 {
            crate::internal_events::emit(
                crate::internal_events::ActorsPassivated { count: n as u64 },
                &self.shared.stats,
            );
        }
    }
}

impl Actor for Shard {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let every = (self.idle / 2).clamp(Duration::from_millis(10), Duration::from_secs(5));
        ctx.run_interval(every, |shard, _| {
            shard.passivate_idle();
            // Records also grow without new actors: check the budget too.
            shard.passivate_over_cap(true);
        });
    }
}

impl Shard {
    /// The handle of an entity's actor, started if needed.
    fn actor(&mut self, entity_id: &str, tp: &TopicPartition) -> &mut Handle {
        if !self.entities.contains_key(entity_id) {
            self.passivate_over_cap(false);
            let status = Arc::new(EntityStatus::default());
            let actor = EntityActor::new(
                entity_id.to_owned(),
                self.shared.clone(),
                status.clone(),
                self.busy.clone(),
                self.live_bytes.clone(),
            );
            self.entities.insert(
                entity_id.to_owned(),
                Handle {
                    addr: actor.start(),
                    status,
                    delivered: 0,
                    last_delivery: Instant::now(),
                    tp: tp.clone(),
                },
            );
        }
        self.entities.get_mut(entity_id).expect("inserted above")
    }
}

impl Handler<ResolveEntity> for Shard {
    type Result = ResponseFuture<Result<Released, String>>;

    fn handle(&mut self, msg: ResolveEntity, _: &mut Self::Context) -> Self::Result {
        let tp = TopicPartition::new("", -1);
        let h = self.actor(&msg.entity_id, &tp);
        h.delivered += 1;
        h.last_delivery = Instant::now();
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
        h.delivered += 1;
        h.last_delivery = Instant::now();
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
        h.delivered += 1;
        h.last_delivery = Instant::now();
        if h.tp != d.tp {
            h.tp = d.tp.clone();
        }
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
        if !self.entities.contains_key(&record.entity_id)
            && !matches!(
                self.shared.store.load_entity(&record.entity_id),
                Ok(Some(_))
            )
        {
            return;
        }
        let h = self.actor(&record.entity_id.clone(), &tp);
        h.delivered += 1;
        h.last_delivery = Instant::now();
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
