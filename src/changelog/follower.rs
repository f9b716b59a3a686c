//! Key moves between instances: the changelog follower.
//!
//! Owns how an instance learns that an entity it holds, or should hold, has
//! a record under another partition owned elsewhere. When partitions are
//! added (or the producers' partitioner changes), an entity's events start
//! arriving on a new partition, possibly at another instance, while its
//! state, and maybe some of its events still in flight, are with the owner of
//! the old one. Every record an instance makes durable is in the changelog,
//! at its home partition, so each instance follows the changelog partitions
//! it does not own and hands the records that concern it to the entity's
//! actor ([`crate::entity::Merge`]):
//!
//! - a record of an entity whose key the partitioner maps to a partition
//!   this instance owns: the actor merges it (union of the logs, re-fold);
//! - a record of an entity this instance holds live under another partition:
//!   the actor yields if that record's partition is the rightful one (its
//!   record becomes a forwarding stub, which forwards the entity's
//!   stragglers to the new partition).
//!
//! Each merge of a live record is written back to the changelog, so the
//! other owner reads it and yields; its stub is then merged too. Merging is
//! idempotent and commutative, so the two sides converge whatever the order.
//! Records of partitions this instance owns are skipped: it wrote them.

use crate::config::{ChangelogConfig, Config};
use crate::metrics::Stats;
use crate::model::fold::EntityRecord;
use crate::partitioner::Layout;
use crate::store::Store;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The input partitions this instance owns, by topic.
type Owned = HashMap<String, std::collections::HashSet<i32>>;

/// Where the follower hands a record that concerns this instance: the
/// entity's actor (the pipeline passes the router's `merge`). A function, so
/// that the changelog does not depend on the router.
pub type MergeSink = Box<dyn Fn(EntityRecord, i32) + Send>;

/// Follows every partition of the changelogs of the input topics.
pub struct Follower {
    consumer: BaseConsumer,
    /// Changelog topic → input topic.
    inputs: HashMap<String, String>,
    store: Arc<dyn Store>,
    merge: MergeSink,
    layout: Arc<Layout>,
    stats: Arc<Stats>,
}

impl Follower {
    /// A follower of the changelogs of `config`'s input topics.
    pub fn new(
        config: &Config,
        changelog: &ChangelogConfig,
        store: Arc<dyn Store>,
        merge: MergeSink,
        layout: Arc<Layout>,
        stats: Arc<Stats>,
    ) -> Result<Follower, rdkafka::error::KafkaError> {
        let consumer: BaseConsumer = crate::kafka::reader(config, "follow").create()?;
        let inputs = config
            .input_topics()
            .into_iter()
            .map(|t| (changelog.topic_of(&t), t))
            .collect();
        Ok(Follower {
            consumer,
            inputs,
            store,
            merge,
            layout,
            stats,
        })
    }

    /// Follows until `stop`. Which records concern this instance depends on
    /// the partitions it owns, so it waits for an assignment, and reads each
    /// changelog from its beginning then and again whenever the assignment
    /// changes. New changelog partitions are picked up every 10 s.
    pub fn run(self, stop: Arc<AtomicBool>) {
        let mut known: HashMap<String, i32> = HashMap::new();
        let mut last_check: Option<Instant> = None;
        let mut assigned = std::collections::BTreeSet::new();
        // The same, by input topic, for lookups without allocating.
        let mut owned = Owned::new();
        while !stop.load(Relaxed) {
            let changed = {
                let now = self
                    .stats
                    .source.assigned
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                let changed = *now != assigned;
                if changed {
                    assigned = now.clone();
                }
                changed
            };
            if changed {
                owned = Owned::new();
                for tp in &assigned {
                    owned
                        .entry(tp.topic.to_string())
                        .or_default()
                        .insert(tp.partition);
                }
                known.clear();
                last_check = None;
            }
            if assigned.is_empty() {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            if last_check.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                last_check = Some(Instant::now());
                self.assign_new_partitions(&mut known);
            }
            match self.consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    if let (Some(key), Some(value)) = (m.key(), m.payload()) {
                        self.consider(&owned, m.topic(), m.partition(), key, value);
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "changelog follower read error; retrying");
                    std::thread::sleep(Duration::from_millis(200));
                }
                None => {}
            }
        }
    }

    /// Adds the changelog partitions not followed yet, from their beginning;
    /// with `known` empty, follows every partition from its beginning again.
    fn assign_new_partitions(&self, known: &mut HashMap<String, i32>) {
        let restart = known.is_empty();
        let mut grew = false;
        for changelog in self.inputs.keys() {
            let n = match crate::kafka::partition_count(
                &self.consumer,
                changelog,
                Duration::from_secs(5),
            ) {
                Ok(n) => n as i32,
                Err(e) => {
                    tracing::warn!(topic = %changelog, error = %e, "cannot read the changelog's partitions; retrying in 10 s");
                    continue;
                }
            };
            if n > known.get(changelog).copied().unwrap_or(0) {
                known.insert(changelog.clone(), n);
                grew = true;
            }
        }
        if !grew {
            return;
        }
        // Partitions followed already keep their position.
        let positions = if restart {
            TopicPartitionList::new()
        } else {
            self.consumer.position().unwrap_or_default()
        };
        let mut tpl = TopicPartitionList::new();
        for (topic, n) in known.iter() {
            for p in 0..*n {
                let at = positions
                    .find_partition(topic, p)
                    .map(|e| e.offset())
                    .filter(|o| matches!(o, Offset::Offset(_)))
                    .unwrap_or(Offset::Beginning);
                let _ = tpl.add_partition_offset(topic, p, at);
            }
        }
        if let Err(e) = self.consumer.assign(&tpl) {
            tracing::warn!(error = %e, "cannot follow the changelogs; retrying in 10 s");
        }
    }

    /// Hands one changelog record to its entity's actor if it concerns this
    /// instance.
    fn consider(&self, owned: &Owned, changelog: &str, partition: i32, key: &[u8], value: &[u8]) {
        let Some(input) = self.inputs.get(changelog) else {
            return;
        };
        let owned = |p: i32| owned.get(input).is_some_and(|ps| ps.contains(&p));
        if owned(partition) {
            return;
        }
        let Ok(id) = std::str::from_utf8(key) else {
            return;
        };
        let ours = self.layout.rightful(input, id).is_some_and(owned);
        if !ours && !self.layout.is_misplaced(id) {
            // Held live here under a partition owned here? (The misplaced
            // set has those touched since start, before their record is in
            // the store; the store has those from before.)
            let live_here = match self.store.load_entity(id) {
                Ok(Some(r)) => {
                    r.placement.moved_to.is_none()
                        && r.placement.home
                            .as_ref()
                            .is_some_and(|h| h.partition != partition && owned(h.partition))
                }
                _ => false,
            };
            if !live_here {
                return;
            }
        }
        match crate::store::decode::<EntityRecord>(key, value) {
            Ok(record) => (self.merge)(record, partition),
            Err(e) => {
                tracing::warn!(topic = changelog, partition, entity = id, error = %e, "undecodable changelog record; skipped")
            }
        }
    }
}
