//! The source: an rdkafka consumer in a consumer group, on its own thread.
//!
//! Owns the consumer. Offsets are never auto-committed: on assignment each
//! partition starts at the checkpoint stored in sled (or the group's committed
//! offset when the store has none), and the writer's checkpoints are committed
//! to Kafka only after they are flushed. A revoked partition is drained (every
//! received event made durable) and checkpointed before it is released. Above
//! the in-flight high mark the source stops taking messages from librdkafka,
//! whose own prefetch queue then fills (`queued.max.messages.kbytes`) and
//! stops fetching; below the low mark it takes them again. Nothing is purged
//! and re-fetched, so no fetch lands in the middle of a record batch (some
//! Kafka-compatible brokers, tansu 0.6 among them, answer such a fetch from
//! the next batch and so skip records). Messages leave as [`Delivery`]s to the router, or as
//! dead-letter intents straight to the writer when they cannot be decoded.

use crate::changelog::Restorer;
use crate::checkpoint::{Checkpointer, TopicPartition};
use crate::lifecycle::lock;
use crate::config::Config;
use crate::entity::Delivery;
use crate::internal_events::{
    emit, ComponentError, DeadLettered, EventReceived, OffsetGap, PartitionsPaused,
};
use crate::metrics::Stats;
use crate::model::dead_letter::{DeadLetter, Received};
use crate::model::envelope::{self, ContentType};
use crate::router::Router;
use crate::store::Store;
use crate::telemetry::{self, unix_ms, SpanInfo};
use crate::writer::{Ack, WriteIntent, WriterMsg};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// What the source shares with its rebalance callbacks.
pub struct SourceContext {
    store: Arc<dyn Store>,
    checkpointer: Arc<Checkpointer>,
    router: Router,
    drain_timeout: Duration,
    assigned: Mutex<HashSet<TopicPartition>>,
    ready: Arc<AtomicBool>,
    /// False after librdkafka reported every broker down, until a message arrives.
    brokers_ok: Arc<AtomicBool>,
    /// Counters; consumer lag is written here from librdkafka's statistics.
    stats: Arc<Stats>,
    /// Restores assigned partitions from their changelog, when it is on.
    restorer: Option<Restorer>,
    /// The store writer, for the dead letters of corrupt changelog records.
    writer: tokio::sync::mpsc::UnboundedSender<WriterMsg>,
    /// Input partitions whose state the store holds.
    local: Mutex<HashSet<TopicPartition>>,
    /// When the assignment last changed; `None` before the first assignment.
    last_rebalance: Mutex<Option<Instant>>,
    /// Raised when a partition cannot be restored.
    fatal: Arc<crate::lifecycle::Fatal>,
    /// When an offset commit last failed.
    commit_failed_at: Mutex<Option<Instant>>,
    /// The partitioner and partition counts, for entities whose partition changes.
    layout: Arc<crate::partitioner::Layout>,
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
        match consumer.fetch_metadata(Some(topic), Duration::from_secs(10)) {
            Ok(md) => {
                let Some(n) = md
                    .topics()
                    .iter()
                    .find(|t| t.name() == topic)
                    .map(|t| t.partitions().len() as i32)
                    .filter(|n| *n > 0)
                else {
                    return;
                };
                if let Some(old) = self.layout.set_count(topic, n) {
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
                for tp in &tps {
                    self.checkpointer.forget(tp);
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

/// The running source.
pub struct Source {
    consumer: BaseConsumer<SourceContext>,
    topics: Vec<String>,
    content_type: ContentType,
    writer: tokio::sync::mpsc::UnboundedSender<WriterMsg>,
    router: Router,
    checkpointer: Arc<Checkpointer>,
    stats: Arc<Stats>,
    high: i64,
    low: i64,
    /// The in-flight byte marks.
    bytes_high: i64,
    bytes_low: i64,
    topic_names: std::cell::RefCell<HashMap<String, Arc<str>>>,
    settings: Arc<crate::settings::Settings>,
    purge_after: Duration,
}

/// Why the source could not start.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The consumer could not be created or subscribed.
    #[error("cannot start the Kafka consumer ({context}): {source}")]
    Kafka {
        /// Configured brokers and group.
        context: String,
        /// The client error.
        source: KafkaError,
    },
}

/// Everything [`Source::new`] needs.
pub struct SourceParts {
    /// The store, for stored checkpoints.
    pub store: Arc<dyn Store>,
    /// Every offset's progress, shared with the writer.
    pub checkpointer: Arc<Checkpointer>,
    /// Where events go.
    pub router: Router,
    /// The writer, for dead letters.
    pub writer: tokio::sync::mpsc::UnboundedSender<WriterMsg>,
    /// Counters.
    pub stats: Arc<Stats>,
    /// Set while partitions are assigned.
    pub ready: Arc<AtomicBool>,
    /// The topics to consume.
    pub topics: Vec<String>,
    /// Cleared while every broker is down.
    pub brokers_ok: Arc<AtomicBool>,
    /// Tenant settings: nothing is consumed before they are caught up.
    pub settings: Arc<crate::settings::Settings>,
    /// Raised when the source cannot go on.
    pub fatal: Arc<crate::lifecycle::Fatal>,
    /// The partitioner, and the partition counts this source keeps current.
    pub layout: Arc<crate::partitioner::Layout>,
    /// The changelog producer, when the changelog is on: the restorer writes
    /// what a crash left pending with it.
    pub changelog: Option<crate::changelog::Producer>,
}

impl Source {
    /// Creates the consumer and subscribes.
    pub fn new(config: &Config, parts: SourceParts) -> Result<Source, SourceError> {
        let err = |source| SourceError::Kafka {
            context: format!("brokers {:?}, group {:?}", config.brokers, config.group),
            source,
        };
        let cc = crate::kafka::group_consumer(config);
        let restorer = match (config.changelog(), parts.changelog) {
            (Some(changelog), Some(producer)) => {
                Some(Restorer::new(config, changelog, producer).map_err(err)?)
            }
            _ => None,
        };
        let local: HashSet<TopicPartition> = parts
            .store
            .partition_counts()
            .unwrap_or_default()
            .into_keys()
            .filter(|h| parts.topics.iter().any(|t| **t == *h.topic))
            .collect();
        let context = SourceContext {
            layout: parts.layout,
            restorer,
            writer: parts.writer.clone(),
            local: Mutex::new(local),
            last_rebalance: Mutex::new(None),
            commit_failed_at: Mutex::new(None),
            fatal: parts.fatal,
            store: parts.store,
            checkpointer: parts.checkpointer.clone(),
            router: parts.router.clone(),
            drain_timeout: Duration::from_millis(config.drain_timeout_ms),
            assigned: Mutex::new(HashSet::new()),
            ready: parts.ready,
            brokers_ok: parts.brokers_ok,
            stats: parts.stats.clone(),
        };
        let consumer: BaseConsumer<SourceContext> = cc.create_with_context(context).map_err(err)?;
        let topics: Vec<&str> = parts.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics).map_err(err)?;
        Ok(Source {
            consumer,
            topics: parts.topics.clone(),
            content_type: config.content_type,
            writer: parts.writer,
            router: parts.router,
            checkpointer: parts.checkpointer,
            stats: parts.stats,
            high: config.in_flight_high as i64,
            low: config.in_flight_low as i64,
            bytes_high: mib(config.in_flight_mb_high),
            bytes_low: mib(config.in_flight_mb_low),
            topic_names: Default::default(),
            settings: parts.settings,
            purge_after: Duration::from_millis(config.purge_after_ms),
        })
    }

    /// Consumes until `stop` is set, then drains for up to `grace` and commits.
    pub fn run(self, stop: Arc<AtomicBool>, grace: Duration) {
        // Every event is handled under the settings in force: none before
        // the settings source has delivered what it had at start.
        if !self.settings.is_caught_up() {
            tracing::info!("waiting for tenant settings before consuming");
            while !self.settings.is_caught_up() {
                if stop.load(Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        tracing::info!(topics = ?self.topics, "source started");
        let mut paused = false;
        let mut last_commit = Instant::now();
        let mut last_purge_check = Instant::now();
        while !stop.load(Relaxed) {
            if last_purge_check.elapsed() >= Duration::from_secs(1) {
                last_purge_check = Instant::now();
                self.purge_stale();
            }
            if last_commit.elapsed() >= Duration::from_millis(200) {
                self.commit(CommitMode::Async);
                last_commit = Instant::now();
            }
            let in_flight = self.stats.source.in_flight.load(Relaxed);
            let bytes = self.stats.source.in_flight_bytes.load(Relaxed);
            if !paused && (in_flight >= self.high || bytes >= self.bytes_high) {
                paused = true;
                let partitions = lock(&self.consumer.context().assigned).len();
                emit(PartitionsPaused { paused: partitions }, &self.stats);
                tracing::debug!(in_flight, bytes, "backpressure: not taking messages");
            } else if paused && in_flight <= self.low && bytes <= self.bytes_low {
                paused = false;
                emit(PartitionsPaused { paused: 0 }, &self.stats);
                tracing::debug!(in_flight, bytes, "backpressure released");
            }
            if paused {
                // librdkafka keeps heartbeating on its own threads; the group
                // stays joined while the actors catch up.
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            match self.consumer.poll(Duration::from_millis(100)) {
                None => {}
                Some(Ok(m)) => self.on_message(&m),
                Some(Err(e)) => emit(
                    ComponentError {
                        stage: "source",
                        error_code: "consumer_error",
                        error: &e,
                    },
                    &self.stats,
                ),
            }
        }
        // Shutdown: nothing new is polled; wait for what is in flight.
        let deadline = Instant::now() + grace;
        while self.checkpointer.in_flight() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.commit(CommitMode::Sync);
        tracing::info!(
            in_flight = self.stats.source.in_flight.load(Relaxed),
            "source stopped"
        );
        // Dropping the consumer leaves the group; the revoke callback drains (already done) and commits.
    }

    /// With the changelog on, removes the state of partitions this instance
    /// no longer owns, once the assignment has been stable for `purge_after`.
    fn purge_stale(&self) {
        let ctx = self.consumer.context();
        let Some(r) = &ctx.restorer else {
            return;
        };
        // Only once the group has settled: a partition that comes back
        // soon is cheaper kept than restored.
        if lock(&ctx.last_rebalance).is_none_or(|t| t.elapsed() < self.purge_after) {
            return;
        }
        let assigned = lock(&ctx.assigned).clone();
        let stale: Vec<TopicPartition> = lock(&ctx.local)
            .iter()
            .filter(|tp| !assigned.contains(*tp))
            .cloned()
            .collect();
        for home in stale {
            match ctx.store.purge_partition(&home, &r.topic_of(&home.topic)) {
                Ok(n) => {
                    tracing::info!(partition = %home, entities = n, "removed the state of a partition another instance owns");
                    lock(&ctx.local).remove(&home);
                    let _ = self.writer.send(WriterMsg::Reload);
                }
                Err(e) => emit(
                    ComponentError {
                        stage: "store",
                        error_code: "purge_failed",
                        error: &e,
                    },
                    &self.stats,
                ),
            }
        }
    }

    /// Commits every assigned partition whose durable checkpoint Kafka does not
    /// have yet. A failed commit is simply tried again next time.
    fn commit(&self, mode: CommitMode) {
        let ctx = self.consumer.context();
        let assigned = lock(&ctx.assigned).clone();
        let mut tpl = TopicPartitionList::new();
        for (tp, offset) in self.checkpointer.to_commit(|tp| assigned.contains(tp)) {
            let _ = tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(offset));
        }
        if tpl.count() == 0 {
            return;
        }
        // While the group rebalances every commit fails (and librdkafka logs
        // each): after a failure, asynchronous commits wait a second.
        if matches!(mode, CommitMode::Async)
            && lock(&ctx.commit_failed_at).is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        // The checkpoints are durable in the store; a crash here must not keep Kafka behind.
        if crate::failpoint::hit("source.before_commit").is_err() {
            return;
        }
        tracing::debug!(partitions = tpl.count(), "committing checkpoints to Kafka");
        if let Err(e) = self.consumer.commit(&tpl, mode) {
            tracing::warn!(error = %e, "committing offsets to Kafka failed; will retry");
        }
    }

    fn topic_name(&self, topic: &str) -> Arc<str> {
        let mut names = self.topic_names.borrow_mut();
        if let Some(t) = names.get(topic) {
            return t.clone();
        }
        let t: Arc<str> = Arc::from(topic);
        names.insert(topic.to_owned(), t.clone());
        t
    }

    fn on_message(&self, m: &BorrowedMessage<'_>) {
        let received_at = SystemTime::now();
        if !self.consumer.context().brokers_ok.swap(true, Relaxed) {
            tracing::info!("brokers answer again");
        }
        let tp = TopicPartition::new(self.topic_name(m.topic()), m.partition());
        let offset = m.offset();
        if let Some(expected) = self.checkpointer.received(&tp, offset) {
            emit(
                OffsetGap {
                    topic: &tp.topic,
                    partition: tp.partition,
                    expected,
                    got: offset,
                },
                &self.stats,
            );
        }
        let kafka_ts = m.timestamp().to_millis();
        let headers = crate::kafka::headers_of(m);
        let bytes = message_bytes(m.key(), m.payload(), &headers);
        emit(EventReceived { bytes }, &self.stats);
        let content_type = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
            .map(|(_, v)| v.as_slice());
        let traced = telemetry::spans_wanted();
        match envelope::decode(m.key(), m.payload(), content_type, self.content_type) {
            Ok(event) => {
                let parent = if traced {
                    telemetry::parent_from_headers(
                        headers.iter().map(|(k, v)| (k.as_str(), v.as_slice())),
                    )
                } else {
                    None
                };
                self.router.route(Delivery {
                    event,
                    tp,
                    offset,
                    kafka_ts,
                    headers,
                    received_at,
                    parent,
                    traced,
                    bytes,
                });
            }
            Err(e) => {
                emit(
                    DeadLettered {
                        stage: "decode",
                        code: e.code(),
                    },
                    &self.stats,
                );
                tracing::warn!(topic = %tp.topic, partition = tp.partition, offset, code = e.code(), trace_id = crate::telemetry::trace_id_in(&headers).as_deref(), error = %e, "undecodable message dead-lettered");
                let now = SystemTime::now();
                let key = m.key().map(<[u8]>::to_vec);
                let span = traced.then(|| {
                    Box::new(SpanInfo {
                        parent: telemetry::parent_from_headers(
                            headers.iter().map(|(k, v)| (k.as_str(), v.as_slice())),
                        ),
                        read_start: now,
                        write_start: now,
                        topic: tp.topic.clone(),
                        partition: tp.partition,
                        offset,
                        entity_id: key
                            .as_deref()
                            .map(|k| String::from_utf8_lossy(k).into_owned())
                            .unwrap_or_default(),
                        tenant_id: String::new(),
                        event_id: String::new(),
                        event_type: String::new(),
                        occurred_at: 0,
                    })
                });
                let dl = DeadLetter::undecodable(
                    e.code(),
                    e.to_string(),
                    Received {
                        topic: tp.topic.to_string(),
                        partition: tp.partition,
                        offset,
                        key,
                        value: m.payload().map(<[u8]>::to_vec),
                        headers,
                    },
                    unix_ms(now),
                );
                let intent = WriteIntent {
                    entity: None,
                    dead_letter: Some(dl),
                    outbox: Vec::new(),
                    anomalies: Vec::new(),
                    history: Vec::new(),
                    ack: Some(Ack {
                        tp,
                        offset,
                        kafka_ts,
                        occurred_at: None,
                        received_at,
                        outcome: "dead-lettered",
                        span,
                        bytes,
                    }),
                    durable: None,
                    resolve_dead_letter: None,
                };
                let _ = self.writer.send(WriterMsg::Write(Box::new(intent)));
            }
        }
    }
}

/// A message's size as the in-flight byte count sees it: key, value and
/// headers.
pub fn message_bytes(key: Option<&[u8]>, value: Option<&[u8]>, headers: &[(String, Vec<u8>)]) -> u64 {
    let h: usize = headers.iter().map(|(k, v)| k.len() + v.len()).sum();
    (key.map_or(0, <[u8]>::len) + value.map_or(0, <[u8]>::len) + h) as u64
}

/// `mb` MiB in bytes, as the in-flight gauges count them.
pub(crate) fn mib(mb: u64) -> i64 {
    mb.saturating_mul(1024 * 1024).min(i64::MAX as u64) as i64
}
