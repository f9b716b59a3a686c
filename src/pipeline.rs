//! The pipeline: wires source → router → entity actors → writer → sink, and
//! stops them in order.
//!
//! [`Pipeline::start`] must run inside an actix System (the shards are actors
//! on their own Arbiters). [`Pipeline::shutdown`] stops consuming, waits for
//! in-flight events to become durable, commits the final checkpoints, and
//! stops the writer and the publisher.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use orderly::{config::Config, pipeline::Pipeline};
//! let config = Config { brokers: "localhost:9092".into(), ..Config::default() };
//! actix::System::new().block_on(async move {
//!     let handlers = config.handlers();
//!     let pipeline = Pipeline::start(config, handlers)?;
//!     tokio::signal::ctrl_c().await?;
//!     pipeline.shutdown()?;
//!     Ok::<_, Box<dyn std::error::Error>>(())
//! })
//! # }
//! ```

use crate::checkpoint::CheckpointTracker;
use crate::config::Config;
use crate::entity::Shared;
use crate::handler::Handlers;
use crate::metrics::Stats;
use crate::router::Router;
use crate::sink::Publisher;
use crate::source::{Source, SourceError, SourceParts};
use crate::store::{SledStore, Store, StoreError};
use crate::writer::{WriteIntent, Writer, WriterMsg};
use actix::Arbiter;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A condition that stops the pipeline (the store failed, for example).
#[derive(Debug, Default)]
pub struct Fatal {
    reason: Mutex<Option<String>>,
    notify: tokio::sync::Notify,
}

impl Fatal {
    /// Raises the condition; the first reason is kept.
    pub fn raise(&self, reason: String) {
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            tracing::error!(%reason, "pipeline cannot continue");
            *r = Some(reason);
        }
        self.notify.notify_waiters();
        self.notify.notify_one();
    }

    /// The reason, if raised.
    pub fn reason(&self) -> Option<String> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Resolves once raised.
    pub async fn raised(&self) -> String {
        loop {
            if let Some(r) = self.reason() {
                return r;
            }
            self.notify.notified().await;
        }
    }
}

/// A pipeline failure.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The store could not be opened or failed.
    #[error("store at {dir}: {source}")]
    Store {
        /// The data dir.
        dir: String,
        /// The error.
        source: StoreError,
    },
    /// The consumer could not start.
    #[error(transparent)]
    Source(Box<SourceError>),
    /// The producer for the outbox could not start.
    #[error("cannot create the Kafka producer for dead letters: {0}")]
    Producer(rdkafka::error::KafkaError),
    /// A thread could not start.
    #[error("cannot start thread: {0}")]
    Thread(std::io::Error),
    /// The pipeline stopped because of a fatal condition.
    #[error("pipeline stopped: {0}")]
    Fatal(String),
    /// The changelog is on but a changelog topic is missing or too small.
    #[error("changelog: {0}")]
    Changelog(String),
    /// Shutdown ran past the grace period; the named stages were abandoned.
    /// Everything acknowledged is durable; the rest is redelivered on restart.
    #[error("shutdown exceeded shutdown_grace_ms; abandoned: {0}")]
    ShutdownTimeout(String),
}

/// Checks that each input topic has its changelog, with at least as many
/// partitions: records go to the partition number of their input partition.
fn check_changelogs(config: &Config) -> Result<(), PipelineError> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &config.brokers)
        .create()
        .map_err(|e| PipelineError::Changelog(e.to_string()))?;
    let partitions = |topic: &str| -> Result<usize, PipelineError> {
        let md = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .map_err(|e| PipelineError::Changelog(format!("metadata of {topic}: {e}")))?;
        Ok(md
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map(|t| t.partitions().len())
            .unwrap_or(0))
    };
    for input in config.input_topics() {
        let changelog = crate::config::changelog_topic(&input, &config.changelog_suffix);
        let (n, m) = (partitions(&input)?, partitions(&changelog)?);
        if m < n {
            return Err(PipelineError::Changelog(format!(
                "{changelog} has {m} partitions, {input} has {n}: create it with at least {n} partitions and cleanup.policy=compact (or unset changelog_suffix)"
            )));
        }
    }
    Ok(())
}

/// Runs `f` on a helper thread and waits for it until `deadline`. Returns
/// false if it had not finished by then (it is left running).
fn finish_by(deadline: Instant, f: impl FnOnce() + Send + 'static) -> bool {
    let (tx, rx) = std::sync::mpsc::channel();
    let helper = std::thread::Builder::new()
        .name("orderly-shutdown".into())
        .spawn(move || {
            f();
            let _ = tx.send(());
        });
    if helper.is_err() {
        return false;
    }
    rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
        .is_ok()
}

/// An operator action failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No such dead letter or entity.
    #[error("{0}")]
    NotFound(String),
    /// The action does not apply in the current state.
    #[error("{0}")]
    Conflict(String),
    /// The store or an actor failed.
    #[error("{0}")]
    Internal(String),
}

/// What operators can do to a running pipeline; cheap to clone.
#[derive(Clone)]
pub struct Control {
    store: Arc<SledStore>,
    router: Router,
    writer: tokio::sync::mpsc::UnboundedSender<WriterMsg>,
    ready: Arc<AtomicBool>,
    store_ok: Arc<AtomicBool>,
    brokers_ok: Arc<AtomicBool>,
    fatal: Arc<Fatal>,
    stats: Arc<Stats>,
    stalls: Arc<crate::stall::Stalls>,
    settings: Arc<crate::settings::Settings>,
    identity: Arc<Identity>,
}

/// Who this instance is, for operators.
#[derive(Debug, Clone)]
pub struct Identity {
    /// `instance_id` if set, else the consumer group and process id.
    pub instance: String,
    /// The changelog suffix; empty when the changelog is off.
    pub changelog_suffix: String,
}

impl Control {
    /// The partitions this instance owns and holds state for: entities,
    /// checkpoint, lag and changelog position of each, for `orderly partitions`.
    pub fn partitions(&self) -> serde_json::Value {
        use serde_json::json;
        let assigned = self
            .stats
            .assigned
            .lock()
            .map(|a| a.clone())
            .unwrap_or_default();
        let counts = self.store.partition_counts().unwrap_or_default();
        let lag = self.stats.lag.lock().map(|l| l.clone()).unwrap_or_default();
        let mut held: std::collections::BTreeSet<(String, i32)> = assigned.clone();
        held.extend(counts.keys().map(|h| (h.topic.clone(), h.partition)));
        // Each topic's checkpoints in one scan.
        let mut checkpoints: HashMap<String, std::collections::BTreeMap<i32, i64>> = HashMap::new();
        for (topic, _) in &held {
            if !checkpoints.contains_key(topic) {
                let c = self.store.checkpoints(topic).unwrap_or_default();
                checkpoints.insert(topic.clone(), c);
            }
        }
        let rows: Vec<_> = held
            .into_iter()
            .map(|(topic, partition)| {
                let home = crate::fold::Home {
                    topic: topic.clone(),
                    partition,
                };
                let checkpoint = checkpoints[&topic].get(&partition).copied();
                let changelog = (!self.identity.changelog_suffix.is_empty())
                    .then(|| {
                        self.store
                            .changelog_position(
                                &crate::config::changelog_topic(
                                    &topic,
                                    &self.identity.changelog_suffix,
                                ),
                                partition,
                            )
                            .ok()
                            .flatten()
                    })
                    .flatten();
                json!({
                    "topic": topic,
                    "partition": partition,
                    "assigned": assigned.contains(&(topic.clone(), partition)),
                    "entities": counts.get(&home).copied().unwrap_or(0),
                    "checkpoint": checkpoint,
                    "lag": lag.get(&(topic.clone(), partition)),
                    "changelog_position": changelog,
                })
            })
            .collect();
        json!({
            "instance": self.identity.instance,
            "ready": self.not_ready().is_none(),
            "partitions": rows,
        })
    }

    /// Every tenant's compiled settings.
    pub fn settings(&self) -> &crate::settings::Settings {
        &self.settings
    }

    /// The recent stalled events (those still running have no `finished_at`).
    pub fn stalled(&self) -> Vec<crate::stall::StalledEvent> {
        self.stalls.list()
    }

    /// The store, for reads.
    pub fn store(&self) -> &SledStore {
        &self.store
    }

    /// Sets the gauges that are read rather than counted; call before
    /// rendering metrics.
    pub fn sample_gauges(&self) {
        let stalled_now = self.stalls.running();
        crate::internal_events::emit(
            crate::internal_events::GaugesSampled {
                mailbox_depths: &self.router.mailbox_depths(),
                stalled_now,
                store_size_bytes: self.store.size_on_disk().ok(),
            },
            &self.stats,
        );
    }

    /// Everything the dashboard shows at a glance, as JSON.
    pub fn overview(&self) -> serde_json::Value {
        use serde_json::json;
        let s = &*self.stats;
        let c = |a: &std::sync::atomic::AtomicU64| a.load(Relaxed);
        let g = |a: &std::sync::atomic::AtomicI64| a.load(Relaxed);
        let stalled_now = self.stalls.running();
        let now = std::time::SystemTime::now();
        let lag = s.lag.lock().map(|l| l.clone()).unwrap_or_default();
        let checkpoints = s.checkpoints.lock().map(|c| c.clone()).unwrap_or_default();
        let mut keys: std::collections::BTreeSet<(String, i32)> = lag.keys().cloned().collect();
        keys.extend(checkpoints.keys().cloned());
        let partitions: Vec<_> = keys
            .into_iter()
            .map(|k| {
                let cp = checkpoints.get(&k);
                json!({
                    "topic": k.0,
                    "partition": k.1,
                    "lag": lag.get(&k),
                    "checkpoint": cp.map(|c| c.0),
                    "checkpoint_age_s": cp.map(|c| now.duration_since(c.1).unwrap_or_default().as_secs_f64()),
                })
            })
            .collect();
        let corrections: Vec<_> = s
            .recent_corrections
            .lock()
            .map(|r| r.iter().rev().cloned().collect())
            .unwrap_or_default();
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "now_ms": crate::telemetry::unix_ms(now),
            "ready": self.not_ready().is_none(),
            "not_ready_reason": self.not_ready(),
            "counters": {
                "received": c(&s.received),
                "completed": c(&s.durable),
                "applied": c(&s.applied),
                "duplicates": c(&s.duplicates),
                "late_recomputed": c(&s.late_recomputed),
                "late_applied": c(&s.late_applied),
                "late_dropped": c(&s.late_dropped),
                "too_late": c(&s.too_late),
                "parked_events": c(&s.parked),
                "held": c(&s.held),
                "ignored": c(&s.ignored),
                "corrections": c(&s.corrections),
                "retries": c(&s.retries),
                "dead_letters": c(&s.dead_letters),
                "stalled": c(&s.stalled),
                "passivations": c(&s.passivations),
                "pauses": c(&s.pauses),
                "errors": c(&s.errors),
            },
            "gauges": {
                "in_flight": g(&s.in_flight),
                "active_actors": g(&s.active_actors),
                "paused_partitions": g(&s.paused_partitions),
                "failed": g(&s.open_dead_letters),
                "parked": g(&s.parked_entities),
                "retrying": g(&s.retrying),
                "stalled": stalled_now,
                "mailbox_depth": self.router.mailbox_depths().iter().sum::<i64>(),
            },
            "latency_ms": {
                "append_to_durable": s.append_to_durable().to_json(),
                "occurred_to_durable": s.occurred_to_durable().to_json(),
            },
            "partitions": partitions,
            "recent_corrections": corrections,
        })
    }

    /// The counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Why the pipeline is not ready, or `None` if it is.
    pub fn not_ready(&self) -> Option<String> {
        if let Some(r) = self.fatal.reason() {
            return Some(format!("stopped: {r}"));
        }
        if !self.store_ok.load(Relaxed) {
            return Some("store writes are failing; retrying".into());
        }
        if !self.brokers_ok.load(Relaxed) {
            return Some("all Kafka brokers are down; retrying".into());
        }
        if !self.settings.is_caught_up() {
            return Some("reading tenant settings; processing has not started".into());
        }
        if !self.ready.load(Relaxed) {
            return Some("no partitions assigned yet".into());
        }
        None
    }

    fn open_dead_letter(&self, id: u64) -> Result<crate::dead_letter::DeadLetter, ControlError> {
        let dl = self
            .store
            .dead_letter(id)
            .map_err(|e| ControlError::Internal(e.to_string()))?
            .ok_or_else(|| ControlError::NotFound(format!("no dead letter {id}")))?;
        if dl.status != crate::dead_letter::OPEN {
            return Err(ControlError::Conflict(format!(
                "dead letter {id} is already {}",
                dl.status
            )));
        }
        Ok(dl)
    }

    /// Processes a dead letter's event again, through its entity's actor (a
    /// late one is re-folded, so the entity's order is kept). Returns the outcome.
    pub async fn retry_dead_letter(&self, id: u64) -> Result<&'static str, ControlError> {
        let dl = self.open_dead_letter(id)?;
        if dl.code.starts_with("settings_") {
            return Err(ControlError::Conflict(format!(
                "dead letter {id} is a rejected settings document, not an event: write a corrected version (orderly settings put), then skip this one"
            )));
        }
        let content_type = dl
            .headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
            .map(|(_, v)| v.as_slice());
        let key = dl.key.as_deref();
        let value = dl.value.as_deref();
        let event = crate::envelope::decode(key, value, content_type, Default::default())
            .or_else(|_| crate::envelope::decode(key, value, None, Default::default()))
            .map_err(|e| {
                ControlError::Conflict(format!("dead letter {id} still cannot be decoded: {e}"))
            })?;
        let origin = crate::fold::Origin {
            topic: dl.topic,
            partition: dl.partition,
            offset: dl.offset,
        };
        self.router
            .retry(crate::entity::RetryDeadLetter { event, origin, id })
            .await
            .map_err(ControlError::Conflict)
    }

    /// Marks a dead letter skipped: an operator decided to leave it. Returns once durable.
    pub async fn skip_dead_letter(&self, id: u64) -> Result<(), ControlError> {
        self.open_dead_letter(id)?;
        let intent = crate::writer::WriteIntent {
            entity: None,
            dead_letter: None,
            outbox: Vec::new(),
            anomalies: Vec::new(),
            history: Vec::new(),
            ack: None,
            durable: None,
            resolve_dead_letter: Some((crate::writer::DeadLetterRef::Id(id), "skipped")),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        self.writer
            .send(WriterMsg::Write(Box::new(intent)))
            .and_then(|_| self.writer.send(WriterMsg::Barrier(tx)))
            .map_err(|_| ControlError::Internal("the store writer has stopped".into()))?;
        tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(30)))
            .await
            .map_err(|e| ControlError::Internal(e.to_string()))?
            .map_err(|_| ControlError::Internal("the store writer did not confirm in 30 s".into()))
    }

    /// Releases a parked entity (or skips the event that parked it, then releases it).
    pub async fn resolve_parked(
        &self,
        entity_id: &str,
        skip: bool,
    ) -> Result<crate::entity::Released, ControlError> {
        match self.store.load_entity(entity_id) {
            Ok(Some(r)) if r.parked.is_some() => {}
            Ok(Some(_)) => {
                return Err(ControlError::Conflict(format!(
                    "entity {entity_id} is not parked"
                )))
            }
            Ok(None) => return Err(ControlError::NotFound(format!("no entity {entity_id}"))),
            Err(e) => return Err(ControlError::Internal(e.to_string())),
        }
        self.router
            .resolve(entity_id, skip)
            .await
            .map_err(ControlError::Internal)
    }
}

/// Feeds events to a pipeline started with [`Pipeline::start_engine`], as
/// the Kafka source would: each gets a partition and the next offset of it,
/// and feeding waits while `in_flight_high` events are in flight.
pub struct Injector {
    router: Router,
    tracker: Arc<Mutex<CheckpointTracker>>,
    stats: Arc<Stats>,
    high: i64,
    topic: Arc<str>,
    offsets: HashMap<i32, i64>,
}

impl Injector {
    /// Routes `event` as if read from `partition`; blocks while the pipeline is full.
    pub fn inject(&mut self, event: crate::envelope::Event, partition: i32) {
        while self.stats.in_flight.load(Relaxed) >= self.high {
            std::thread::sleep(Duration::from_micros(200));
        }
        let offset = self.offsets.entry(partition).or_insert(0);
        let tp: crate::checkpoint::TopicPartition = (self.topic.clone(), partition);
        self.tracker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .received(&tp, *offset);
        crate::internal_events::emit(crate::internal_events::EventReceived, &self.stats);
        let now = std::time::SystemTime::now();
        self.router.route(crate::entity::Delivery {
            event,
            tp,
            offset: *offset,
            kafka_ts: Some(crate::telemetry::unix_ms(now)),
            headers: Vec::new(),
            received_at: now,
            parent: None,
            traced: crate::telemetry::spans_wanted(),
        });
        *offset += 1;
    }
}

/// How long shutdown may run past the grace period for the final commit.
pub const SHUTDOWN_ALLOWANCE: Duration = Duration::from_secs(2);

/// A running pipeline.
pub struct Pipeline {
    stats: Arc<Stats>,
    fatal: Arc<Fatal>,
    ready: Arc<AtomicBool>,
    store_ok: Arc<AtomicBool>,
    brokers_ok: Arc<AtomicBool>,
    stop_source: Arc<AtomicBool>,
    stop_publisher: Arc<AtomicBool>,
    source: Option<JoinHandle<()>>,
    writer_tx: tokio::sync::mpsc::UnboundedSender<WriterMsg>,
    writer: Option<JoinHandle<()>>,
    publisher: Option<JoinHandle<()>>,
    arbiters: Vec<Arbiter>,
    router: Router,
    stalls: Arc<crate::stall::Stalls>,
    watchdog: Option<JoinHandle<()>>,
    grace: Duration,
    store: Arc<SledStore>,
    settings: Arc<crate::settings::Settings>,
    identity: Arc<Identity>,
    stop_settings: Arc<AtomicBool>,
    settings_reader: Option<JoinHandle<()>>,
    /// The changelog follower; it stops with the source.
    follower: Option<JoinHandle<()>>,
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, PipelineError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(PipelineError::Thread)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime needs no resources that can be missing")
}

impl Pipeline {
    /// Opens the store and starts every stage. Call inside an actix System.
    pub fn start(config: Config, handlers: Handlers) -> Result<Pipeline, PipelineError> {
        Self::build(config, handlers, true).map(|(p, _)| p)
    }

    /// Starts every stage but the Kafka source: events are fed from memory
    /// through the returned [`Injector`]. The benchmark uses it to measure
    /// the engine (actors, fold, store) without Kafka. Call inside an actix System.
    pub fn start_engine(
        config: Config,
        handlers: Handlers,
    ) -> Result<(Pipeline, Injector), PipelineError> {
        let (p, injector) = Self::build(config, handlers, false)?;
        Ok((p, injector.expect("built without a source")))
    }

    fn build(
        config: Config,
        handlers: Handlers,
        with_source: bool,
    ) -> Result<(Pipeline, Option<Injector>), PipelineError> {
        // Metrics emitted before the recorder exists would be lost.
        crate::metrics::prometheus();
        let store = Arc::new(
            SledStore::open(&config.data_dir, config.store_cache_mb).map_err(|source| {
                PipelineError::Store {
                    dir: config.data_dir.display().to_string(),
                    source,
                }
            })?,
        );
        let dyn_store: Arc<dyn Store> = store.clone();
        let stats = Arc::new(Stats::default());
        let fatal = Arc::new(Fatal::default());
        let tracker = Arc::new(Mutex::new(CheckpointTracker::new()));
        let (writer_tx, writer_rx) = tokio::sync::mpsc::unbounded_channel();
        let (commits_tx, commits_rx) = std::sync::mpsc::channel();
        let outbox_ready = Arc::new(tokio::sync::Notify::new());
        let store_ok = Arc::new(AtomicBool::new(true));
        let brokers_ok = Arc::new(AtomicBool::new(true));

        let writer = Writer {
            store: dyn_store.clone(),
            tracker: tracker.clone(),
            stats: stats.clone(),
            dead_letter_topic: config.dead_letter_topic.clone(),
            batch_max: config.batch_max,
            commits: commits_tx,
            outbox_ready: outbox_ready.clone(),
            anomalies_topic: config.anomalies_topic.clone(),
            anomalies_retained: config.anomalies_retained,
            store_ok: store_ok.clone(),
            changelog: if config.changelog_suffix.is_empty() || !with_source {
                None
            } else {
                check_changelogs(&config)?;
                Some(crate::writer::Changelog {
                    producer: crate::sink::producer(&config.brokers, &[("linger.ms", "2")])
                        .map_err(PipelineError::Producer)?,
                    suffix: config.changelog_suffix.clone(),
                })
            },
        };
        let writer_fatal = fatal.clone();
        let writer = spawn("orderly-writer", move || {
            if let Err(e) = runtime().block_on(writer.run(writer_rx)) {
                writer_fatal.raise(e.to_string());
            }
        })?;

        let stop_publisher = Arc::new(AtomicBool::new(false));
        let publisher = Publisher {
            store: dyn_store.clone(),
            producer: crate::sink::producer(
                &config.brokers,
                &[("partitioner", config.partitioner.librdkafka_name())],
            )
            .map_err(PipelineError::Producer)?,
            ready: outbox_ready,
            stop: stop_publisher.clone(),
        };
        let publisher = spawn("orderly-publisher", move || {
            runtime().block_on(publisher.run())
        })?;

        let settings = Arc::new(crate::settings::Settings::new(config.policies()));
        let stop_settings = Arc::new(AtomicBool::new(false));
        let settings_reader = {
            let writer = writer_tx.clone();
            let parts = crate::settings::SourceParts {
                settings: settings.clone(),
                stats: stats.clone(),
                reject: Box::new(move |dl| {
                    // Recorded like any dead letter (deduplicated by position).
                    let _ = writer.send(WriterMsg::Write(Box::new(WriteIntent {
                        entity: None,
                        dead_letter: Some(dl),
                        outbox: Vec::new(),
                        anomalies: Vec::new(),
                        history: Vec::new(),
                        ack: None,
                        durable: None,
                        resolve_dead_letter: None,
                    })));
                }),
                stop: stop_settings.clone(),
            };
            crate::settings::start_source(&config, parts).map_err(PipelineError::Thread)?
        };

        let layout = Arc::new(crate::partitioner::Layout::new(config.partitioner));
        let shared = Arc::new(Shared {
            layout: layout.clone(),
            settings: settings.clone(),
            handlers,
            store: dyn_store.clone(),
            writer: writer_tx.clone(),
            stats: stats.clone(),
            policies: config.policies(),
            retries: config.retries(),
            changes_topic: config.changes_topic.clone(),
            derived_topic: config.derived_topic.clone(),
            fatal: fatal.clone(),
        });
        let arbiters: Vec<Arbiter> = (0..config.shard_count()).map(|_| Arbiter::new()).collect();
        let busy: Vec<Arc<crate::stall::Busy>> = arbiters.iter().map(|_| Arc::default()).collect();
        let router = Router::start(
            &arbiters,
            shared,
            Duration::from_millis(config.idle_timeout_ms),
            &busy,
            config.max_actors,
        );
        let resolver = router.clone();
        let stalls = Arc::new(crate::stall::Stalls::default());
        let watchdog = {
            let (stalls, stats, stop) = (stalls.clone(), stats.clone(), stop_publisher.clone());
            let deadline = Duration::from_millis(config.stall_deadline_ms);
            spawn("orderly-watchdog", move || {
                crate::stall::watch(busy, stalls, stats, deadline, stop)
            })?
        };

        let ready = Arc::new(AtomicBool::new(false));
        let stop_source = Arc::new(AtomicBool::new(false));
        let grace = Duration::from_millis(config.shutdown_grace_ms);
        let follower = if with_source && !config.changelog_suffix.is_empty() {
            let follower = crate::handover::Follower::new(
                &config,
                dyn_store.clone(),
                router.clone(),
                layout.clone(),
                stats.clone(),
            )
            .map_err(|e| {
                PipelineError::Source(Box::new(SourceError::Kafka {
                    context: "the changelog follower".into(),
                    source: e,
                }))
            })?;
            let stop = stop_source.clone();
            Some(spawn("orderly-follower", move || follower.run(stop))?)
        } else {
            None
        };
        let (source, injector) = if with_source {
            let source = Source::new(
                &config,
                SourceParts {
                    store: dyn_store,
                    tracker,
                    router,
                    writer: writer_tx.clone(),
                    stats: stats.clone(),
                    commits: commits_rx,
                    ready: ready.clone(),
                    topics: config.input_topics(),
                    brokers_ok: brokers_ok.clone(),
                    settings: settings.clone(),
                    fatal: fatal.clone(),
                    layout,
                },
            )
            .map_err(|e| PipelineError::Source(Box::new(e)))?;
            let stop = stop_source.clone();
            let source = spawn("orderly-source", move || source.run(stop, grace))?;
            (Some(source), None)
        } else {
            // Engine mode: events come from an Injector; the writer's
            // checkpoint requests have no source to commit them.
            ready.store(true, Relaxed);
            drop(commits_rx);
            let injector = Injector {
                router: router.clone(),
                tracker,
                stats: stats.clone(),
                high: config.in_flight_high as i64,
                topic: Arc::from(config.topic.as_str()),
                offsets: HashMap::new(),
            };
            (None, Some(injector))
        };
        tracing::info!(shards = arbiters.len(), topic = %config.topic, group = %config.group, data_dir = %config.data_dir.display(), kafka = with_source, "pipeline started");
        let pipeline = Pipeline {
            stats,
            fatal,
            ready,
            store_ok,
            brokers_ok,
            stop_source,
            stop_publisher,
            source,
            router: resolver,
            stalls,
            watchdog: Some(watchdog),
            writer_tx,
            writer: Some(writer),
            publisher: Some(publisher),
            arbiters,
            grace,
            store,
            settings,
            identity: Arc::new(Identity {
                instance: config
                    .instance_id
                    .clone()
                    .unwrap_or_else(|| format!("{}-{}", config.group, std::process::id())),
                changelog_suffix: config.changelog_suffix.clone(),
            }),
            stop_settings,
            settings_reader,
            follower,
        };
        Ok((pipeline, injector))
    }

    /// The pipeline's counters.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// The fatal condition, for awaiting.
    pub fn fatal(&self) -> Arc<Fatal> {
        self.fatal.clone()
    }

    /// True while partitions are assigned, the store accepts writes, and
    /// nothing fatal happened.
    pub fn is_ready(&self) -> bool {
        self.control().not_ready().is_none()
    }

    /// The operator handle: dead letters, parked entities, readiness.
    pub fn control(&self) -> Control {
        Control {
            store: self.store.clone(),
            router: self.router.clone(),
            writer: self.writer_tx.clone(),
            ready: self.ready.clone(),
            store_ok: self.store_ok.clone(),
            brokers_ok: self.brokers_ok.clone(),
            fatal: self.fatal.clone(),
            stats: self.stats.clone(),
            stalls: self.stalls.clone(),
            settings: self.settings.clone(),
            identity: self.identity.clone(),
        }
    }

    /// Every tenant's compiled settings.
    pub fn settings(&self) -> Arc<crate::settings::Settings> {
        self.settings.clone()
    }

    /// The store, for reads while running.
    pub fn store(&self) -> Arc<SledStore> {
        self.store.clone()
    }

    /// Stops consuming, drains in-flight events, commits the final
    /// checkpoints, and stops every stage. Blocks for at most the grace period
    /// (`shutdown_grace_ms`) plus [`SHUTDOWN_ALLOWANCE`] for the final commit;
    /// a stage that takes longer (a handler blocked for ever, a store that
    /// keeps failing) is abandoned and reported, and the caller should exit.
    pub fn shutdown(mut self) -> Result<(), PipelineError> {
        let deadline = Instant::now() + self.grace + SHUTDOWN_ALLOWANCE;
        let mut abandoned: Vec<&str> = Vec::new();
        self.stop_source.store(true, Relaxed);
        if let Some(s) = self.source.take() {
            if !finish_by(deadline, move || drop(s.join())) {
                abandoned.push("source");
            }
        }
        if let Some(f) = self.follower.take() {
            if !finish_by(deadline, move || drop(f.join())) {
                abandoned.push("changelog follower");
            }
        }
        // Everything the source delivered is durable (or the grace ran out);
        // a barrier makes sure the writer has finished its last batch.
        let (tx, rx) = std::sync::mpsc::channel();
        if self.writer_tx.send(WriterMsg::Barrier(tx)).is_ok()
            && rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .is_err()
        {
            abandoned.push("writer (last batch not durable)");
        }
        self.stop_publisher.store(true, Relaxed);
        self.stop_settings.store(true, Relaxed);
        if let Some(s) = self.settings_reader.take() {
            if !finish_by(deadline, move || drop(s.join())) {
                abandoned.push("settings reader");
            }
        }
        if let Some(w) = self.watchdog.take() {
            if !finish_by(deadline, move || drop(w.join())) {
                abandoned.push("watchdog");
            }
        }
        if let Some(p) = self.publisher.take() {
            if !finish_by(deadline, move || drop(p.join())) {
                abandoned.push("outbox publisher");
            }
        }
        for a in &self.arbiters {
            a.stop();
        }
        let arbiters: Vec<Arbiter> = self.arbiters.drain(..).collect();
        if !finish_by(deadline, move || {
            for a in arbiters {
                let _ = a.join();
            }
        }) {
            abandoned.push("entity actors");
        }
        // Operator handles (the admin server) may still hold senders: stop explicitly.
        let _ = self.writer_tx.send(WriterMsg::Stop);
        if let Some(w) = self.writer.take() {
            if !finish_by(deadline, move || drop(w.join())) {
                abandoned.push("writer");
            }
        }
        if !abandoned.is_empty() {
            abandoned.dedup();
            tracing::error!(
                ?abandoned,
                in_flight = self.stats.in_flight.load(Relaxed),
                "shutdown exceeded the grace period; stopping anyway (what was not acknowledged is redelivered on restart)"
            );
            return Err(PipelineError::ShutdownTimeout(abandoned.join(", ")));
        }
        let remaining = self.stats.in_flight.load(Relaxed);
        tracing::info!(
            remaining,
            durable = Stats::get(&self.stats.durable),
            "pipeline stopped"
        );
        match self.fatal.reason() {
            Some(r) => Err(PipelineError::Fatal(r)),
            None => Ok(()),
        }
    }
}
