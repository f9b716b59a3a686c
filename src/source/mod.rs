//! The source: an rdkafka consumer in a consumer group, on its own thread.
//!
//! Owns the consumer. Offsets are never auto-committed: on assignment each
//! partition starts at the checkpoint stored in sled (or the group's
//! committed offset when the store has none), and the writer's checkpoints
//! are committed to Kafka only after they are flushed. A revoked partition
//! is drained (every received event made durable) and checkpointed before
//! it is released. Above the in-flight high mark the source stops taking
//! messages from librdkafka, whose prefetch queues then fill and stop
//! fetching; below the low mark it takes them again. Nothing is purged and
//! re-fetched, so no fetch lands in the middle of a record batch (some
//! Kafka-compatible brokers, tansu 0.6 among them, answer such a fetch from
//! the next batch and so skip records). Messages leave as [`Delivery`]s to
//! the router, or as dead-letter intents straight to the writer when they
//! cannot be decoded.
//!
//! Each assigned partition is read from a queue of its own
//! (`split_partition_queue`), split off before the partition is assigned,
//! and the queues are read in turn, a burst from each. librdkafka decides
//! whether to fetch a partition by the length of the queue its messages go
//! to: with one queue for all partitions, that queue is full whenever
//! orderly has a backlog, and which partitions get fetched then depends on
//! when each is looked at, so some went unfetched for minutes while the
//! others were served (BENCHMARKS.md, "The soak's p99 is partitions that
//! are not fetched"). With a queue each, every partition prefetches up to
//! its share of librdkafka's limits and is read at the same pace as the
//! others. Where a share would not hold a record batch (many partitions,
//! small limits: [`crate::kafka::group_consumer`]) the partitions share
//! one queue instead. The consumer's own queue still carries rebalances,
//! errors, commits and statistics, and is polled every turn.

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
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

mod context;

pub use context::SourceContext;
use context::Waker;

/// The running source.
pub struct Source {
    consumer: Arc<BaseConsumer<SourceContext>>,
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
        let partitions = partitions_of(config, &parts.topics);
        let client = crate::kafka::group_consumer(config, partitions);
        let prefetch = client.describe(partitions);
        if client.queue_per_partition {
            tracing::info!("the source has {prefetch}");
        } else {
            tracing::warn!("the source has {prefetch}");
        }
        let cc = client.config;
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
        let waker = Arc::new(Waker::default());
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
            consumer: OnceLock::new(),
            queues: Mutex::new(BTreeMap::new()),
            queue_per_partition: client.queue_per_partition,
            waker: waker.clone(),
        };
        let mut consumer: BaseConsumer<SourceContext> =
            cc.create_with_context(context).map_err(err)?;
        consumer.set_nonempty_callback(move || waker.wake());
        let consumer = Arc::new(consumer);
        let _ = consumer.context().consumer.set(Arc::downgrade(&consumer));
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
        // Rebalances happen on this thread (in `poll`), and so the queues'
        // callbacks wake it.
        let _ = self
            .consumer
            .context()
            .waker
            .0
            .set(std::thread::current());
        let mut paused = false;
        // The queue read first, a different one each turn: where the high
        // mark ends a turn, no partition is always the one left out.
        let mut first = 0;
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
            if !paused && self.over_high(in_flight, bytes) {
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
            // Rebalances, errors, commits and statistics; and the messages
            // of a partition that could not have a queue of its own. A poll
            // that serves a rebalance or a commit returns nothing, like one
            // of an empty queue, so a few each turn: the callback wakes
            // this thread once for several events that arrive together.
            let mut taken = false;
            for _ in 0..MAIN_POLLS {
                if self.above_high() {
                    break;
                }
                taken |= self.take(self.consumer.poll(Duration::ZERO));
            }
            {
                let queues = lock(&self.consumer.context().queues);
                first = (first + 1) % queues.len().max(1);
                for q in queues.values().cycle().skip(first).take(queues.len()) {
                    for _ in 0..BURST {
                        if self.above_high() {
                            break;
                        }
                        match q.poll(Duration::ZERO) {
                            None => break,
                            r => taken |= self.take(r),
                        }
                    }
                }
            }
            if !taken {
                // Every queue was empty: until librdkafka puts something
                // in one (its callbacks unpark this thread), or the next
                // commit is due.
                std::thread::park_timeout(Duration::from_millis(100));
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

    /// Whether the events or bytes in flight are at the high mark.
    fn above_high(&self) -> bool {
        self.over_high(
            self.stats.source.in_flight.load(Relaxed),
            self.stats.source.in_flight_bytes.load(Relaxed),
        )
    }

    /// Whether `in_flight` events of `bytes` are at or past a high mark.
    fn over_high(&self, in_flight: i64, bytes: i64) -> bool {
        in_flight >= self.high || bytes >= self.bytes_high
    }

    /// Handles what a poll returned; true if it returned anything.
    fn take(&self, polled: Option<rdkafka::error::KafkaResult<BorrowedMessage<'_>>>) -> bool {
        match polled {
            None => return false,
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
        true
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

/// How many partitions `topics` have in all, which the source's prefetch
/// limits are shared among ([`crate::kafka::group_consumer`]). When the
/// brokers do not say, [`UNKNOWN_PARTITIONS`]: a smaller prefetch per
/// partition costs throughput, a larger one could cost memory.
fn partitions_of(config: &Config, topics: &[String]) -> usize {
    let counted = crate::kafka::admin(config).ok().and_then(|admin| {
        topics.iter().try_fold(0, |sum, topic| {
            let n = crate::kafka::partition_count(&admin, topic, Duration::from_secs(5)).ok()?;
            (n > 0).then_some(sum + n)
        })
    });
    counted.unwrap_or_else(|| {
        tracing::warn!(topics = ?topics, assumed = UNKNOWN_PARTITIONS, "cannot read the topics' partition counts; sharing the prefetch limits as if they had this many partitions");
        UNKNOWN_PARTITIONS
    })
}

/// The partition count [`partitions_of`] assumes when the brokers do not say.
const UNKNOWN_PARTITIONS: usize = 64;

impl Drop for Source {
    /// The partition queues hold the consumer; they go first, so that
    /// dropping the source drops the consumer, which leaves the group.
    fn drop(&mut self) {
        lock(&self.consumer.context().queues).clear();
    }
}

/// How many messages the source takes from one partition's queue before it
/// turns to the next.
const BURST: usize = 64;

/// How many times the source polls the consumer's own queue each turn.
const MAIN_POLLS: usize = 4;

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
