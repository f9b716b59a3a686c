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

mod control;

pub use control::{Control, ControlError, Identity};
use crate::checkpoint::Checkpointer;
use crate::config::Config;
use crate::entity::Shared;
use crate::lifecycle::Fatal;
use crate::metrics::Stats;
use crate::model::handler::Handlers;
use crate::router::Router;
use crate::sink::Publisher;
use crate::source::{Source, SourceError, SourceParts};
use crate::store::{SledStore, Store, StoreError};
use crate::writer::{WriteIntent, Writer, WriterMsg};
use actix::Arbiter;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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


/// Feeds events to a pipeline started with [`Pipeline::start_engine`], as
/// the Kafka source would: each gets a partition and the next offset of it,
/// and feeding waits while `in_flight_high` events (or `in_flight_mb_high`
/// MiB) are in flight.
pub struct Injector {
    router: Router,
    checkpointer: Arc<Checkpointer>,
    stats: Arc<Stats>,
    high: i64,
    bytes_high: i64,
    topic: Arc<str>,
    offsets: HashMap<i32, i64>,
}

impl Injector {
    /// Routes `event` as if read from `partition`; blocks while the pipeline is full.
    pub fn inject(&mut self, event: crate::model::envelope::Event, partition: i32) {
        while self.stats.source.in_flight.load(Relaxed) >= self.high
            || self.stats.source.in_flight_bytes.load(Relaxed) >= self.bytes_high
        {
            std::thread::sleep(Duration::from_micros(200));
        }
        let offset = self.offsets.entry(partition).or_insert(0);
        let tp = crate::checkpoint::TopicPartition::new(self.topic.clone(), partition);
        self.checkpointer.received(&tp, *offset);
        // The size the message would have, about: its encoded event.
        let bytes = crate::store::body_len(&event) as u64;
        crate::internal_events::emit(crate::internal_events::EventReceived { bytes }, &self.stats);
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
            bytes,
        });
        *offset += 1;
    }
}

/// How long shutdown may run past the grace period for the final commit.
pub const SHUTDOWN_ALLOWANCE: Duration = Duration::from_secs(2);

/// A running pipeline.
pub struct Pipeline {
    stats: Arc<Stats>,
    checkpointer: Arc<Checkpointer>,
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

/// Starts a pipeline thread; see [`crate::lifecycle::spawn`].
fn spawn(
    name: &str,
    fatal: &Arc<Fatal>,
    f: impl FnOnce() + Send + 'static,
) -> Result<JoinHandle<()>, PipelineError> {
    crate::lifecycle::spawn(name, fatal, f).map_err(PipelineError::Thread)
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
        let checkpointer = Arc::new(Checkpointer::new());
        let (writer_tx, writer_rx) = tokio::sync::mpsc::unbounded_channel();
        let outbox = Arc::new(crate::sink::Handoff::new(crate::sink::HANDOFF_BYTES));
        let store_ok = Arc::new(AtomicBool::new(true));
        let brokers_ok = Arc::new(AtomicBool::new(true));

        let changelog = match config.changelog() {
            Some(changelog) if with_source => {
                crate::changelog::check_topics(&config, &changelog)
                    .map_err(PipelineError::Changelog)?;
                Some(crate::changelog::Producer {
                    producer: crate::kafka::producer(&config, &[("linger.ms", "2")])
                        .map_err(PipelineError::Producer)?,
                    changelog,
                })
            }
            _ => None,
        };
        let writer = Writer {
            store: dyn_store.clone(),
            checkpointer: checkpointer.clone(),
            stats: stats.clone(),
            dead_letter_topic: config.dead_letter_topic.clone(),
            batch_max: config.batch_max,
            outbox: outbox.clone(),
            anomalies_topic: config.anomalies_topic.clone(),
            anomalies_retained: config.anomalies_retained,
            store_ok: store_ok.clone(),
            group: config.group.as_str().into(),
            changelog: changelog.clone(),
        };
        let writer_fatal = fatal.clone();
        let writer = spawn("orderly-writer", &fatal, move || {
            if let Err(e) = runtime().block_on(writer.run(writer_rx)) {
                writer_fatal.raise(e.to_string());
            }
        })?;

        let stop_publisher = Arc::new(AtomicBool::new(false));
        let publisher = Publisher {
            store: dyn_store.clone(),
            producer: crate::kafka::producer(&config, &[])
            .map_err(PipelineError::Producer)?,
            handoff: outbox,
            stop: stop_publisher.clone(),
            stats: stats.clone(),
        };
        let publisher = spawn("orderly-publisher", &fatal, move || {
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
                    let _ = writer.send(WriterMsg::Write(Box::new(WriteIntent::dead_letter(dl))));
                }),
                stop: stop_settings.clone(),
                fatal: fatal.clone(),
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
            // The key and the Kafka record's own fields take the rest.
            record_limit: changelog
                .as_ref()
                .map(|_| config.kafka.producer_message_max_bytes().saturating_sub(512)),
        });
        let arbiters: Vec<Arbiter> = (0..config.shard_count()).map(|_| Arbiter::new()).collect();
        let busy: Vec<Arc<crate::stall::Busy>> = arbiters.iter().map(|_| Arc::default()).collect();
        let router = Router::start(
            &arbiters,
            shared,
            Duration::from_millis(config.idle_timeout_ms),
            &busy,
            crate::router::Limits {
                actors: config.max_actors,
                bytes: config.actors_mb.saturating_mul(1024 * 1024),
            },
        );
        let resolver = router.clone();
        let stalls = Arc::new(crate::stall::Stalls::default());
        let watchdog = {
            let (stalls, stats, stop) = (stalls.clone(), stats.clone(), stop_publisher.clone());
            let deadline = Duration::from_millis(config.stall_deadline_ms);
            spawn("orderly-watchdog", &fatal, move || {
                crate::stall::watch(busy, stalls, stats, deadline, stop)
            })?
        };

        let ready = Arc::new(AtomicBool::new(false));
        let stop_source = Arc::new(AtomicBool::new(false));
        let grace = Duration::from_millis(config.shutdown_grace_ms);
        let follower = match config.changelog() {
            Some(changelog) if with_source => {
                let merge_into = router.clone();
                let follower = crate::changelog::Follower::new(
                    &config,
                    &changelog,
                    dyn_store.clone(),
                    Box::new(move |record, partition| merge_into.merge(record, partition)),
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
                Some(spawn("orderly-follower", &fatal, move || follower.run(stop))?)
            }
            _ => None,
        };
        let (source, injector) = if with_source {
            let source = Source::new(
                &config,
                SourceParts {
                    store: dyn_store,
                    checkpointer: checkpointer.clone(),
                    router,
                    writer: writer_tx.clone(),
                    stats: stats.clone(),
                    ready: ready.clone(),
                    topics: config.input_topics(),
                    brokers_ok: brokers_ok.clone(),
                    settings: settings.clone(),
                    fatal: fatal.clone(),
                    layout,
                    changelog,
                },
            )
            .map_err(|e| PipelineError::Source(Box::new(e)))?;
            let stop = stop_source.clone();
            let source = spawn("orderly-source", &fatal, move || source.run(stop, grace))?;
            (Some(source), None)
        } else {
            // Engine mode: events come from an Injector; the durable
            // checkpoints have no source to commit them.
            ready.store(true, Relaxed);
            let injector = Injector {
                router: router.clone(),
                checkpointer: checkpointer.clone(),
                stats: stats.clone(),
                high: config.in_flight_high as i64,
                bytes_high: crate::source::mib(config.in_flight_mb_high),
                topic: Arc::from(config.topic.as_str()),
                offsets: HashMap::new(),
            };
            (None, Some(injector))
        };
        tracing::info!(shards = arbiters.len(), topic = %config.topic, group = %config.group, data_dir = %config.data_dir.display(), kafka = with_source, "pipeline started");
        let pipeline = Pipeline {
            checkpointer,
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
                instance: config.instance_name(),
                changelog: config.changelog(),
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
            checkpointer: self.checkpointer.clone(),
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
                in_flight = self.stats.source.in_flight.load(Relaxed),
                "shutdown exceeded the grace period; stopping anyway (what was not acknowledged is redelivered on restart)"
            );
            return Err(PipelineError::ShutdownTimeout(abandoned.join(", ")));
        }
        let remaining = self.stats.source.in_flight.load(Relaxed);
        tracing::info!(
            remaining,
            durable = Stats::get(&self.stats.writer.durable),
            "pipeline stopped"
        );
        match self.fatal.reason() {
            Some(r) => Err(PipelineError::Fatal(r)),
            None => Ok(()),
        }
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    /// A pipeline thread that panics raises the fatal signal with its name
    /// and message, so the pipeline stops instead of running without it.
    #[test]
    fn a_panicking_thread_raises_fatal() {
        let fatal = Arc::new(Fatal::default());
        let t = spawn("orderly-test", &fatal, || panic!("header key is not UTF-8")).unwrap();
        t.join().expect("the panic is caught");
        let reason = fatal.reason().expect("fatal raised");
        assert!(
            reason.contains("orderly-test") && reason.contains("header key is not UTF-8"),
            "{reason}"
        );
        let calm = spawn("orderly-calm", &fatal, || {}).unwrap();
        calm.join().unwrap();
    }
}
