//! The source's consumer context: what librdkafka's callbacks (rebalances,
//! commits, errors, statistics) see, and the queue each assigned partition
//! is split into before it is assigned.

use crate::changelog::Restorer;
use crate::checkpoint::{Checkpointer, TopicPartition};
use crate::lifecycle::lock;
use crate::metrics::Stats;
use crate::router::Router;
use crate::store::Store;
use crate::writer::{WriteIntent, WriterMsg};
use rdkafka::consumer::{
    base_consumer::PartitionQueue, BaseConsumer, CommitMode, Consumer, ConsumerContext,
    RebalanceProtocol,
};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

/// What the source shares with its rebalance callbacks.
pub struct SourceContext {
    pub(super) store: Arc<dyn Store>,
    pub(super) checkpointer: Arc<Checkpointer>,
    pub(super) router: Router,
    pub(super) drain_timeout: Duration,
    pub(super) assigned: Mutex<HashSet<TopicPartition>>,
    pub(super) ready: Arc<AtomicBool>,
    /// False after librdkafka reported every broker down, until a message arrives.
    pub(super) brokers_ok: Arc<AtomicBool>,
    /// Counters; consumer lag is written here from librdkafka's statistics.
    pub(super) stats: Arc<Stats>,
    /// Restores assigned partitions from their changelog, when it is on.
    pub(super) restorer: Option<Restorer>,
    /// The store writer, for the dead letters of corrupt changelog records.
    pub(super) writer: tokio::sync::mpsc::UnboundedSender<WriterMsg>,
    /// Input partitions whose state the store holds.
    pub(super) local: Mutex<HashSet<TopicPartition>>,
    /// When the assignment last changed; `None` before the first assignment.
    pub(super) last_rebalance: Mutex<Option<Instant>>,
    /// Raised when a partition cannot be restored.
    pub(super) fatal: Arc<crate::lifecycle::Fatal>,
    /// When an offset commit last failed.
    pub(super) commit_failed_at: Mutex<Option<Instant>>,
    /// The partitioner and partition counts, for entities whose partition changes.
    pub(super) layout: Arc<crate::partitioner::Layout>,
    /// The consumer itself, which splitting a partition's queue needs.
    pub(super) consumer: OnceLock<Weak<BaseConsumer<SourceContext>>>,
    /// A queue per assigned partition. Each holds the consumer: the source
    /// empties this before it lets the consumer go ([`super::Source`]'s `Drop`).
    pub(super) queues: Mutex<BTreeMap<TopicPartition, PartitionQueue<SourceContext>>>,
    /// Whether partitions get a queue of their own
    /// ([`crate::kafka::group_consumer`]).
    pub(super) queue_per_partition: bool,
    /// Wakes the source's thread when a queue has something.
    pub(super) waker: Arc<Waker>,
}

/// Wakes the source's thread, parked while every queue is empty, when
/// librdkafka puts something in one of them.
#[derive(Default)]
pub(super) struct Waker(pub(super) OnceLock<std::thread::Thread>);

impl Waker {
    pub(super) fn wake(&self) {
        if let Some(t) = self.0.get() {
            t.unpark();
        }
    }
}

impl ClientContext for SourceContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::AllBrokersDown) {
            self.brokers_ok.store(false, Relaxed);
            tracing::error!(%reason, "all brokers are down; not ready until they answer again");
        } else {
            tracing::warn!(%error, %reason, "Kafka client error; librdkafka retries");
        }
    }

    /// librdkafka's periodic statistics (`statistics.interval.ms`): keeps the
    /// consumer lag of the partitions this instance consumes.
    fn stats(&self, statistics: rdkafka::Statistics) {
        let assigned = lock(&self.assigned).clone();
        let mut lag = BTreeMap::new();
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                let tp = TopicPartition::new(topic.as_str(), *partition);
                if *partition >= 0 && p.consumer_lag >= 0 && assigned.contains(&tp) {
                    lag.insert(tp, p.consumer_lag);
                }
            }
        }
        *lock(&self.stats.source.lag) = lag;
    }
}

impl SourceContext {
    /// Reads `topic`'s partition count from the brokers into the layout. An
    /// assignment follows every change of the count, so the layout is
    /// current whenever events of new partitions arrive.
    fn learn_partition_count(&self, consumer: &BaseConsumer<Self>, topic: &str) {
        match crate::kafka::partition_count(consumer, topic, Duration::from_secs(10)) {
            Ok(0) => {}
            Ok(n) => {
                if let Some(old) = self.layout.set_count(topic, n as i32) {
                    tracing::warn!(%topic, from = old, to = n, partitioner = self.layout.partitioner.name(), "the topic's partition count changed: entities whose key now maps to another partition move there as their events arrive");
                }
            }
            Err(e) => {
                tracing::warn!(%topic, error = %e, "cannot read the topic's partition count; entities that change partition are not moved until it is known")
            }
        }
    }

    /// Waits until every received event of `tps` is durable, or the drain timeout.
    fn drain(&self, tps: &HashSet<TopicPartition>) -> bool {
        let deadline = Instant::now() + self.drain_timeout;
        loop {
            let drained = tps.iter().all(|tp| self.checkpointer.drained(tp));
            if drained {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Gives each of `tps` a queue of its own, before they are assigned, so
    /// that no message of theirs reaches the consumer's shared queue.
    /// librdkafka marks a queue the application split and keeps it apart
    /// when the partition is assigned. Called from the rebalance callback,
    /// on the source's thread, while the source holds the consumer.
    fn split_queues(&self, tps: &[TopicPartition]) {
        if !self.queue_per_partition {
            return;
        }
        let Some(consumer) = self.consumer.get().and_then(Weak::upgrade) else {
            return;
        };
        let mut queues = lock(&self.queues);
        for tp in tps {
            // The old handle first: dropping it turns off the wake-up
            // callback of the librdkafka queue the new one shares.
            queues.remove(tp);
            match consumer.split_partition_queue(&tp.topic, tp.partition) {
                Some(mut q) => {
                    let waker = self.waker.clone();
                    q.set_nonempty_callback(move || waker.wake());
                    queues.insert(tp.clone(), q);
                }
                // Its messages come through the consumer's own queue.
                None => {
                    tracing::warn!(partition = %tp, "cannot give the partition a queue of its own; it shares the consumer's")
                }
            }
        }
    }

    /// What a revoked partition commits: its durable checkpoint, never
    /// offsets only written into a batch that might still fail.
    fn checkpoints_of(&self, tps: &HashSet<TopicPartition>) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for tp in tps {
            if let Some(next) = self.checkpointer.durable(tp) {
                let _ = tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(next));
            }
        }
        tpl
    }
}

impl ConsumerContext for SourceContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                *lock(&self.last_rebalance) = Some(Instant::now());
                let mut restored: HashSet<TopicPartition> = HashSet::new();
                if let Some(r) = &self.restorer {
                    // Not ready while state is restored.
                    self.ready.store(false, Relaxed);
                    for e in tpl.elements() {
                        let (topic, partition) = (e.topic().to_owned(), e.partition());
                        match r.restore(self.store.as_ref(), &self.stats, &topic, partition) {
                            Ok(done) if done.read => {
                                restored.insert(TopicPartition::new(topic.as_str(), partition));
                                for record in done.conflicts {
                                    // The entity moved: its actor merges this copy.
                                    self.router.merge(record, partition);
                                }
                                if !done.quarantined.is_empty() {
                                    for dl in done.quarantined {
                                        // Recorded like any dead letter (deduplicated by position).
                                        let _ = self.writer.send(WriterMsg::Write(Box::new(
                                            WriteIntent::dead_letter(dl),
                                        )));
                                    }
                                    // The quarantined entities are parked now.
                                    let _ = self.writer.send(WriterMsg::Reload);
                                }
                            }
                            Ok(_) => {}
                            Err(reason) => {
                                // Processing without the state would apply events to empty records.
                                tracing::error!(%reason, "cannot restore a partition from its changelog; stopping");
                                self.fatal.raise(reason);
                                return;
                            }
                        }
                        lock(&self.local).insert(TopicPartition::new(topic, partition));
                    }
                }
                let mut stored: HashMap<String, std::collections::BTreeMap<i32, i64>> =
                    HashMap::new();
                let elems: Vec<TopicPartition> = tpl
                    .elements()
                    .iter()
                    .map(|e| TopicPartition::new(e.topic(), e.partition()))
                    .collect();
                let topics: HashSet<&str> = elems.iter().map(|tp| &*tp.topic).collect();
                for topic in topics {
                    self.learn_partition_count(consumer, topic);
                }
                self.split_queues(&elems);
                for tp in &elems {
                    let (topic, partition) = (&*tp.topic, &tp.partition);
                    let cps = match stored.get(topic) {
                        Some(c) => c,
                        None => {
                            let c = self.store.checkpoints(topic).unwrap_or_else(|e| {
                                tracing::error!(%topic, error = %e, "cannot read stored checkpoints; starting from the group's committed offsets");
                                Default::default()
                            });
                            stored.entry(topic.to_owned()).or_insert(c)
                        }
                    };
                    let offset = match cps.get(partition) {
                        // Restored: resume where Kafka's committed offset says; the changelog covers it.
                        _ if restored.contains(tp) => Offset::Stored,
                        Some(&o) => {
                            // Durable already; make sure Kafka learns it even if nothing new arrives.
                            self.checkpointer.stored(tp, o);
                            Offset::Offset(o)
                        }
                        None => Offset::Stored,
                    };
                    let _ = tpl.set_partition_offset(topic, *partition, offset);
                    tracing::info!(%topic, partition, ?offset, "partition assigned");
                }
                let r = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                if let Err(e) = r {
                    tracing::error!(error = %e, "assigning partitions failed");
                }
                let mut a = self.assigned.lock().unwrap_or_else(|p| p.into_inner());
                if !cooperative {
                    a.clear();
                }
                a.extend(elems);
                *lock(&self.stats.source.assigned) = a.iter().cloned().collect();
                self.ready.store(!a.is_empty(), Relaxed);
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                *lock(&self.last_rebalance) = Some(Instant::now());
                let tps: HashSet<TopicPartition> = tpl
                    .elements()
                    .iter()
                    .map(|e| TopicPartition::new(e.topic(), e.partition()))
                    .collect();
                let drained = self.drain(&tps);
                if !drained {
                    tracing::warn!(partitions = tps.len(), "revoked partitions did not drain in time; their undurable events will be redelivered to the next owner");
                }
                let commit = self.checkpoints_of(&tps);
                if commit.count() > 0 && !consumer.assignment_lost() {
                    if let Err(e) = consumer.commit(&commit, CommitMode::Sync) {
                        tracing::warn!(error = %e, "committing revoked partitions failed; the stored checkpoint stays authoritative");
                    }
                }
                let released = self.router.release(&tps);
                {
                    let mut queues = lock(&self.queues);
                    for tp in &tps {
                        self.checkpointer.forget(tp);
                        // What it had prefetched goes with the partition.
                        queues.remove(tp);
                    }
                }
                let r = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(e) = r {
                    tracing::error!(error = %e, "unassigning partitions failed");
                }
                let mut a = self.assigned.lock().unwrap_or_else(|p| p.into_inner());
                for tp in &tps {
                    a.remove(tp);
                }
                *lock(&self.stats.source.assigned) = a.iter().cloned().collect();
                {
                    let mut lag = lock(&self.stats.source.lag);
                    for tp in &tps {
                        lag.remove(tp);
                    }
                }
                self.ready.store(!a.is_empty(), Relaxed);
                tracing::info!(
                    partitions = tps.len(),
                    released,
                    drained,
                    "partitions revoked"
                );
            }
            other => {
                tracing::error!(error = ?other, "rebalance failed");
                let _ = consumer.unassign();
                lock(&self.queues).clear();
            }
        }
    }

    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        offsets: &TopicPartitionList,
    ) {
        match result {
            Ok(()) => {
                for e in offsets.elements() {
                    if let Offset::Offset(o) = e.offset() {
                        self.checkpointer
                            .committed(&TopicPartition::new(e.topic(), e.partition()), o);
                    }
                }
            }
            Err(e) => {
                *lock(&self.commit_failed_at) = Some(Instant::now());
                tracing::warn!(error = %e, "committing offsets to Kafka failed; retrying")
            }
        }
    }
}

