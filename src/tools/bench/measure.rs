//! The measurements of one run: the bare consumer, the store and engine
//! ceilings, orderly end to end, and the restore rate.

use super::*;

/// A handler that fails on purpose: a fixed share of events for good, and
/// another share once (transiently), chosen by a hash of the event id so
/// that re-folds see the same decision.
pub(super) struct Flaky {
    inner: FieldReducer,
    permanent: f64,
    transient: f64,
    failed_once: Mutex<HashSet<String>>,
}

pub(super) fn unit_hash(s: &str) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h >> 11) as f64 / (1u64 << 53) as f64
}

impl Flaky {
    /// The failure chosen for `event`, if any.
    fn fails(&self, event: &Event) -> Result<(), HandlerError> {
        if self.permanent + self.transient > 0.0 {
            let h = unit_hash(&event.event_id);
            if h < self.permanent {
                return Err(HandlerError::Permanent(format!(
                    "benchmark: event {} is rejected on purpose",
                    event.event_id
                )));
            }
            if h < self.permanent + self.transient {
                let first = self
                    .failed_once
                    .lock()
                    .map(|mut s| s.insert(event.event_id.clone()))
                    .unwrap_or(false);
                if first {
                    return Err(HandlerError::Transient(
                        "benchmark: a transient failure".into(),
                    ));
                }
            }
        }
        Ok(())
    }
}

impl Handler for Flaky {
    fn apply(
        &self,
        state: &mut EntityState,
        event: &Event,
        settings: &crate::settings::TenantSettings,
    ) -> Result<(), HandlerError> {
        self.fails(event)?;
        self.inner.apply(state, event, settings)
    }

    /// The reducer's own, in place: the bench measures the path orderly's
    /// configured handlers take.
    fn apply_changes(
        &self,
        state: &mut EntityState,
        event: &Event,
        settings: &crate::settings::TenantSettings,
    ) -> Result<Vec<crate::model::fold::FieldChange>, HandlerError> {
        self.fails(event)?;
        self.inner.apply_changes(state, event, settings)
    }
}

pub(super) fn handlers(s: &Scenario, config: &Config) -> Handlers {
    let mut h = Handlers::default().with_default(Arc::new(FieldReducer(config.default_reducer)));
    for (t, c) in &config.types {
        h = h.with_handler(
            t.clone(),
            Arc::new(Flaky {
                inner: FieldReducer(c.reducer),
                permanent: s.failure_ratio,
                transient: s.transient_ratio,
                failed_once: Mutex::default(),
            }),
        );
    }
    h
}

/// Where the benchmark runs.
pub(super) enum Broker {
    Embedded(crate::tools::broker::EmbeddedBroker),
    /// A broker at these servers, with the user's librdkafka properties
    /// (`--config`'s `[kafka]` tables).
    External(String, crate::config::KafkaConfig),
}

impl Broker {
    pub(super) fn servers(&self) -> String {
        match self {
            Broker::Embedded(b) => b.bootstrap_servers(),
            Broker::External(s, _) => s.clone(),
        }
    }

    /// The user's librdkafka properties; none for the embedded broker.
    pub(super) fn kafka(&self) -> crate::config::KafkaConfig {
        match self {
            Broker::Embedded(_) => Default::default(),
            Broker::External(_, kafka) => kafka.clone(),
        }
    }

    /// A client of this broker in `role`, from orderly's client builder.
    pub(super) fn client(
        &self,
        role: crate::kafka::Role<'_>,
        defaults: &[(&str, &str)],
    ) -> ClientConfig {
        crate::kafka::with_user(&self.servers(), &self.kafka(), role, defaults)
    }

    pub(super) fn name(&self) -> String {
        match self {
            Broker::Embedded(_) => "embedded (librdkafka mock cluster)".into(),
            Broker::External(s, _) => format!("external at {s}"),
        }
    }

    pub(super) fn create_topic(&self, name: &str, partitions: i32) -> anyhow::Result<()> {
        match self {
            Broker::Embedded(b) => b
                .create_topic(name, partitions)
                .with_context(|| format!("creating topic {name}")),
            Broker::External(..) => {
                use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
                let admin: AdminClient<rdkafka::client::DefaultClientContext> = self
                    .client(crate::kafka::Role::Admin, &[])
                    .create()
                    .context("creating an admin client")?;
                let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let results = rt
                    .block_on(admin.create_topics([&topic], &AdminOptions::new()))
                    .with_context(|| format!("creating topic {name} on {}", self.servers()))?;
                for r in results {
                    r.map_err(|(t, e)| anyhow::anyhow!("creating topic {t}: {e}"))?;
                }
                Ok(())
            }
        }
    }
}

pub(super) fn produce(
    broker: &Broker,
    topic: &str,
    rate: Option<f64>,
    events: impl Iterator<Item = Event>,
    progress: Option<&indicatif::ProgressBar>,
) -> anyhow::Result<(u64, f64)> {
    let brokers = broker.servers();
    let opts = ProduceOptions {
        brokers: brokers.clone(),
        kafka: broker.kafka(),
        topic: topic.to_owned(),
        rate,
        format: Format::Proto,
    };
    let started = Instant::now();
    let n = workload::produce(
        &opts,
        events.map(|e| workload::message_of(&e, Format::Proto)),
        |n| {
            if let Some(p) = progress {
                if n % 1000 == 0 {
                    p.set_position(n);
                }
            }
        },
    )
    .with_context(|| format!("producing to {topic} on {brokers}"))?;
    Ok((n, n as f64 / started.elapsed().as_secs_f64().max(1e-9)))
}

/// Fails if the broker already dropped the start of a partition: the
/// embedded mock cluster keeps only about 5 MB per partition.
pub(super) fn check_retained(broker: &Broker, topic: &str, partitions: i32) -> anyhow::Result<()> {
    let consumer: BaseConsumer = broker
        .client(crate::kafka::Role::Admin, &[])
        .create()
        .context("creating a consumer")?;
    for p in 0..partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        anyhow::ensure!(
            low == 0,
            "the broker no longer holds the first {low} of {high} messages of partition {p}: \
             the embedded broker keeps about 5 MB per partition. Use fewer or smaller events, \
             more partitions, or a real broker (--brokers; see BENCHMARKS.md for tansu)"
        );
    }
    Ok(())
}

/// The bare consumer: reads every message of the topic and discards it.
pub(super) fn bare_consumer(
    broker: &Broker,
    topic: &str,
    partitions: i32,
    expected: u64,
) -> anyhow::Result<f64> {
    // A reader built as orderly's are, so its fetch settings (and the
    // user's properties) match the source's and the ceiling is comparable.
    let consumer: BaseConsumer = broker
        .client(crate::kafka::Role::Reader("bench-bare"), &[])
        .set("group.id", format!("bench-bare-{}", rand::random::<u32>()))
        .create()
        .context("creating the bare consumer")?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut n = 0u64;
    let mut errors = 0u64;
    let mut first: Option<Instant> = None;
    let mut last_progress = Instant::now();
    while n < expected {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                std::hint::black_box(m.payload());
                first.get_or_insert_with(Instant::now);
                n += 1;
                last_progress = Instant::now();
            }
            Some(Err(e)) => {
                errors += 1;
                if errors <= 3 {
                    eprintln!("bare consumer error: {e}");
                }
            }
            None if last_progress.elapsed() > Duration::from_secs(60) => {
                let mut where_ = Vec::new();
                let positions = consumer.position()?;
                for p in 0..partitions {
                    let (_, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
                    let pos = positions
                        .find_partition(topic, p)
                        .map(|e| format!("{:?}", e.offset()))
                        .unwrap_or_default();
                    where_.push(format!("partition {p}: at {pos} of {high}"));
                }
                anyhow::bail!(
                    "the bare consumer read {n} of {expected} messages ({errors} errors) and then nothing for 60 s ({})",
                    where_.join(", ")
                );
            }
            None => {}
        }
    }
    let secs = first.map(|f| f.elapsed().as_secs_f64()).unwrap_or(0.0);
    Ok(n as f64 / secs.max(1e-9))
}

/// The store ceiling: the records orderly would write for these events,
/// coalesced per batch of `batch_max` like the writer, each batch committed
/// with a checkpoint and flushed, in a store with `cache_mb` of sled cache
/// (orderly's in the same run). Only the commit and flush are timed.
pub(super) fn store_ceiling(
    s: &Scenario,
    events: impl Iterator<Item = Event>,
    batch_max: usize,
    cache_mb: u64,
    handlers: &Handlers,
) -> anyhow::Result<(f64, u64)> {
    let dir = tempfile::tempdir()?;
    let store = SledStore::open(dir.path(), cache_mb)?;
    let settings = crate::settings::Settings::new(
        Config {
            types: Config::crm_types(),
            ..Config::default()
        }
        .policies(),
    );
    for doc in TenantDocs::of(s).map(|d| d.initial()).unwrap_or_default() {
        settings.apply_document(doc)?;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut records: HashMap<String, crate::model::fold::EntityRecord> = HashMap::new();
    let mut timed = Duration::ZERO;
    let mut n = 0u64;
    let mut offset = 0i64;
    let mut events = events.take(s.ceiling_events as usize).peekable();
    while events.peek().is_some() {
        let mut batch = CommitBatch::default();
        let mut index: HashMap<String, usize> = HashMap::new();
        for e in events.by_ref().take(batch_max) {
            n += 1;
            offset += 1;
            let r = records.entry(e.entity_id.clone()).or_insert_with(|| {
                crate::model::fold::EntityRecord::new(&e.entity_id, &e.tenant_id)
            });
            let origin = crate::model::fold::Origin::new(
                crate::model::position::TopicPartition::new("bench", 0),
                offset,
            );
            let _ = r.process(&e, &origin, 0, handlers, &settings.view(&e.tenant_id));
            let bytes = crate::store::encode(&*r);
            match index.get(&e.entity_id) {
                Some(&i) => batch.entities[i].1 = bytes,
                None => {
                    index.insert(e.entity_id.clone(), batch.entities.len());
                    batch.entities.push((e.entity_id.clone(), bytes));
                }
            }
        }
        batch.checkpoints.push(crate::store::Checkpoint {
            tp: crate::model::position::TopicPartition::new("bench", 0),
            next_offset: offset,
        });
        let t = Instant::now();
        store.commit(&batch)?;
        rt.block_on(store.flush())?;
        timed += t.elapsed();
    }
    Ok((n as f64 / timed.as_secs_f64().max(1e-9), n))
}

/// The engine ceiling: the events fed from memory to the router, through
/// actors, fold and store, with no Kafka.
///
/// With tenant settings (`docs`), the documents go straight into the
/// pipeline's registry, as its source would put them (no Kafka here), and
/// so do the updates, at the scenario's rate.
pub(super) fn engine_ceiling(
    mut config: Config,
    handlers: Handlers,
    events: Vec<Event>,
    partitions: i32,
    docs: Option<&TenantDocs>,
) -> anyhow::Result<EngineRun> {
    let n = events.len() as u64;
    config.settings.source = crate::settings::SettingsSource::None;
    let docs = docs.cloned();
    actix::System::new().block_on(async move {
        let (pipeline, mut injector) = Pipeline::start_engine(config, handlers)?;
        let updates = match &docs {
            Some(docs) => {
                let registry = pipeline.settings();
                for doc in docs.initial() {
                    registry.apply_document(doc)?;
                }
                Some(docs.spawn_updates(move |doc| {
                    registry.apply_document(doc).map(drop).map_err(Into::into)
                }))
            }
            None => None,
        };
        let stats = pipeline.stats();
        let started = Instant::now();
        let cpu_before = super::cpu_seconds();
        let exclusive_before = Stats::get(&stats.writer.exclusive_us);
        let feeder = std::thread::spawn(move || {
            for e in events {
                let p = crate::router::shard_of(&e.entity_id, partitions as usize) as i32;
                injector.inject(e, p);
            }
        });
        // One-second windows of durable events, so that a slowdown as the
        // store grows shows (the average alone hides it).
        let mut windows = Vec::new();
        let mut max_rss_mib: f64 = 0.0;
        let mut window_start = (Instant::now(), 0u64);
        let mut last = (0, Instant::now());
        loop {
            let d = Stats::get(&stats.writer.durable);
            if d >= n {
                break;
            }
            if d != last.0 {
                last = (d, Instant::now());
            }
            if let Some(r) = pipeline.fatal().reason() {
                anyhow::bail!("the pipeline stopped: {r}");
            }
            anyhow::ensure!(
                last.1.elapsed() < Duration::from_secs(120),
                "no progress for 120 s at {d} of {n} durable"
            );
            if window_start.0.elapsed() >= Duration::from_secs(1) {
                let secs = window_start.0.elapsed().as_secs_f64();
                windows.push((d - window_start.1) as f64 / secs);
                max_rss_mib = max_rss_mib.max(rss_mib());
                window_start = (Instant::now(), d);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let secs = started.elapsed().as_secs_f64();
        let cpu_after = super::cpu_seconds();
        let exclusive_us = Stats::get(&stats.writer.exclusive_us) - exclusive_before;
        let _ = feeder.join();
        if let Some(u) = updates {
            u.finish()?;
        }
        let store = pipeline.store();
        pipeline.shutdown()?;
        Ok(EngineRun {
            store,
            eps: n as f64 / secs.max(1e-9),
            windows,
            max_rss_mib,
            secs,
            cpu_user_s: cpu_after.0 - cpu_before.0,
            cpu_system_s: cpu_after.1 - cpu_before.1,
            exclusive_s: exclusive_us as f64 / 1e6,
        })
    })
}

/// One engine-ceiling run.
pub(super) struct EngineRun {
    /// The run's store, still open: what it holds is measured without
    /// opening it again (which replays sled's whole log).
    pub(super) store: Arc<crate::store::SledStore>,
    /// Events per second over the whole run.
    pub(super) eps: f64,
    /// Durable events per second, per one-second window.
    pub(super) windows: Vec<f64>,
    /// The largest resident set seen, MiB.
    pub(super) max_rss_mib: f64,
    /// How long it took, s.
    pub(super) secs: f64,
    /// The process's CPU time in user space meanwhile, s.
    pub(super) cpu_user_s: f64,
    /// The process's CPU time in the kernel meanwhile, s.
    pub(super) cpu_system_s: f64,
    /// How long store batches held the store's lock exclusively
    /// meanwhile, s: no entity record could be read.
    pub(super) exclusive_s: f64,
}

/// Waits up to 120 s for `done`, failing early if the pipeline stops.
pub(super) async fn wait_for(
    pipeline: &Pipeline,
    what: &str,
    done: impl Fn() -> bool,
) -> anyhow::Result<()> {
    let started = Instant::now();
    while !done() {
        if let Some(r) = pipeline.fatal().reason() {
            anyhow::bail!("the pipeline stopped: {r}");
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(120),
            "orderly got no {what} for 120 s"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

/// orderly end to end on `topics`; `producer` (open loop) runs meanwhile.
pub(super) fn end_to_end(
    s: &Scenario,
    config: Config,
    handlers: Handlers,
    expected: impl Fn() -> Option<u64> + Send + 'static,
    consuming: Arc<std::sync::atomic::AtomicBool>,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<E2e> {
    let window = Duration::from_millis(s.window_ms);
    let bar = bar.clone();
    // The tenants' settings are on their topic before orderly starts: its
    // source reads them before processing begins.
    let docs = TenantDocs::of(s);
    let settings_producer = match &docs {
        Some(docs) => {
            let producer =
                crate::kafka::producer(&config, &[]).context("creating the settings producer")?;
            for doc in docs.initial() {
                crate::settings::send_document(
                    &producer,
                    &config.settings.topic,
                    &doc,
                    Duration::from_secs(30),
                )
                .map_err(anyhow::Error::msg)?;
            }
            Some(producer)
        }
        None => None,
    };
    let settings_topic = config.settings.topic.clone();
    actix::System::new().block_on(async move {
        let pipeline = Pipeline::start(config, handlers)?;
        let stats = pipeline.stats();
        let fatal = pipeline.fatal();
        wait_for(&pipeline, "partitions", || pipeline.is_ready()).await?;
        consuming.store(true, Relaxed);
        let updates = docs.as_ref().zip(settings_producer).map(|(docs, producer)| {
            docs.spawn_updates(move |doc| {
                crate::settings::send_document(
                    &producer,
                    &settings_topic,
                    &doc,
                    Duration::from_secs(30),
                )
                .map(drop)
                .map_err(anyhow::Error::msg)
            })
        });
        // Time starts at the first message received: group formation is not orderly's speed.
        wait_for(&pipeline, "a first message", || {
            Stats::get(&stats.source.received) > 0
        })
        .await?;
        let started = Instant::now();
        stats.take_window();
        // Latency after the first window: the steady state, without the
        // first fetches and the first actors of a fresh start.
        let mut steady: Option<crate::metrics::LatencyWindow> = None;
        let mut windows = Vec::new();
        let mut last_durable = Stats::get(&stats.writer.durable);
        let mut last_t = started;
        let mut max_rss: f64 = 0.0;
        let mut end: Option<Instant> = None;
        let mut progress_at = (u64::MAX, Instant::now());
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let durable = Stats::get(&stats.writer.durable);
            bar.set_position(durable);
            if let Some(r) = fatal.reason() {
                anyhow::bail!("the pipeline stopped: {r}");
            }
            if durable != progress_at.0 {
                progress_at = (durable, Instant::now());
            }
            anyhow::ensure!(
                progress_at.1.elapsed() < Duration::from_secs(120),
                "no progress for 120 s: {durable} durable of {:?} expected, {} received, {} in flight",
                expected(),
                Stats::get(&stats.source.received),
                stats.source.in_flight.load(Relaxed)
            );
            let target = expected();
            let done = target.is_some_and(|t| durable >= t);
            if done && end.is_none() {
                end = Some(Instant::now());
            }
            if last_t.elapsed() >= window || done {
                let dt = last_t.elapsed().as_secs_f64();
                let h = stats.take_window();
                let (p, received) = h
                    .as_ref()
                    .map(|w| {
                        (
                            crate::metrics::percentiles(&w.append),
                            crate::metrics::percentiles(&w.received),
                        )
                    })
                    .unwrap_or_default();
                if let Some(h) = h {
                    if windows.is_empty() {
                        // The warm-up window is left out of `steady`.
                    } else if let Some(s) = steady.as_mut() {
                        let _ = s.append.add(&h.append);
                        let _ = s.received.add(&h.received);
                    } else {
                        steady = Some(h);
                    }
                }
                let rss = rss_mib();
                max_rss = max_rss.max(rss);
                windows.push(Window {
                    t_s: started.elapsed().as_secs_f64(),
                    throughput_eps: (durable - last_durable) as f64 / dt.max(1e-9),
                    p99_ms: p.p99 as f64 / 1000.0,
                    received_p99_ms: received.p99 as f64 / 1000.0,
                    rss_mib: rss,
                    active_actors: stats.entities.active_actors.load(Relaxed),
                    in_flight: stats.source.in_flight.load(Relaxed),
                    partition_lag: PartitionLag::of(
                        crate::lifecycle::lock(&stats.source.lag).values().copied(),
                    ),
                });
                last_durable = durable;
                last_t = Instant::now();
            }
            if done {
                break;
            }
        }
        let seconds = end
            .map(|e| e.duration_since(started))
            .unwrap_or_else(|| started.elapsed())
            .as_secs_f64();
        let durable = Stats::get(&stats.writer.durable);
        let settings_updates = match updates {
            Some(u) => u.finish()?,
            None => 0,
        };
        // What the registry took in: every version published (the first
        // ones and the updates) once the source has read the last of them,
        // which it may still be doing; a version it never reads shows as
        // fewer compiled.
        let registry = pipeline.settings();
        if let Some(docs) = &docs {
            let published = docs.tenant_count() + settings_updates;
            let deadline = Instant::now() + Duration::from_secs(5);
            while registry.compiled() < published && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let settings = TenantSettingsSeen {
            tenants: registry.tenant_count(),
            compiled: registry.compiled(),
            updates: settings_updates,
        };
        let store = pipeline.store();
        pipeline.shutdown()?;
        Ok(E2e {
            settings,
            store: Some(store),
            steady: steady
                .as_ref()
                .map(|w| crate::metrics::percentiles(&w.append))
                .unwrap_or_default(),
            steady_received: steady
                .as_ref()
                .map(|w| crate::metrics::percentiles(&w.received))
                .unwrap_or_default(),
            drain_eps: durable as f64 / seconds.max(1e-9),
            seconds,
            stats,
            windows,
            max_rss_mib: max_rss,
        })
    })
}

/// The changelog suffix the `restore` scenarios use.
pub(super) const CHANGELOG: &str = ".changelog";

/// A fresh instance of the same group, with an empty data dir, restores every
/// partition from the changelog the run wrote: entities and records per second
/// of restore time (the sum of the partitions' restores, which run one after
/// the other), group formation excluded.
pub(super) fn restore(mut config: Config) -> anyhow::Result<serde_json::Value> {
    let dir = tempfile::tempdir()?;
    config.data_dir = dir.path().to_owned();
    let handlers = config.handlers();
    actix::System::new().block_on(async move {
        let pipeline = Pipeline::start(config, handlers)?;
        wait_for(&pipeline, "the restore", || pipeline.is_ready()).await?;
        let stats = pipeline.stats();
        let store = pipeline.store();
        let records = Stats::get(&stats.changelog.restored_records);
        let seconds = Stats::get(&stats.changelog.restore_micros) as f64 / 1e6;
        let entities: u64 = crate::store::Store::partition_counts(store.as_ref())?
            .values()
            .sum();
        pipeline.shutdown()?;
        Ok(serde_json::json!({
            "entities": entities,
            "records": records,
            "seconds": seconds,
            "entities_per_s": entities as f64 / seconds.max(1e-9),
            "records_per_s": records as f64 / seconds.max(1e-9),
        }))
    })
}
