//! The benchmark: `orderly bench`. Runs one scenario and measures, on the
//! same broker and topic in the same run:
//! - the bare-consumer ceiling: an rdkafka consumer that reads and discards;
//! - the store ceiling: sled writing the same entity records, coalesced per
//!   batch as orderly writes them, with a flush per batch;
//! - the engine ceiling: the same events fed from memory to the router;
//! - orderly end to end, with latency, reliability counts and a time series.
//!
//! Ratios are computed against the ceilings of the same run. The report is
//! a console table, `report.json` (schema in BENCHMARKS.md) and
//! `report.svg` (throughput and p99 over time).
//!
//! Data enters as a [`Scenario`] (TOML or flags) and leaves as a [`Report`].

//!
//! - `measure`: the ceilings and the end-to-end run, each on the same topic;
//! - `report`: `report.json`, the console table and the SVG chart;
//! - `tenants`: the tenant settings of a scenario, and the check that they
//!   took effect.

mod measure;
mod report;
mod tenants;

use crate::config::{Config, FailurePolicy};
use crate::metrics::{Percentiles, Stats};
use crate::model::envelope::Event;
use crate::model::handler::{EntityState, FieldReducer, Handler, HandlerError, Handlers};
use crate::pipeline::Pipeline;
use crate::store::{CommitBatch, SledStore, Store};
use crate::tools::workload::{self, Format, ProduceOptions, Workload, WorkloadSpec};
use anyhow::Context as _;
use measure::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use report::*;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tenants::*;

/// One benchmark scenario. Every field has a default; a TOML file sets some.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Scenario {
    /// Its name, used in file and topic names.
    pub name: String,
    /// Tenants.
    pub tenants: u64,
    /// Per-tenant settings document size, bytes (about). 0: no settings
    /// source, every tenant runs on the defaults. Otherwise every tenant
    /// has a document on a settings topic, read by orderly's topic source
    /// before processing starts, that renames some of the workload's
    /// fields (`workload::FIELD_MAPPINGS`), padded to this size.
    pub settings_bytes: usize,
    /// New settings versions published per second while orderly runs,
    /// round robin over the tenants: each one is compiled and swapped in,
    /// which invalidates the tenant's cached settings. Needs `settings_bytes`.
    pub settings_updates_per_s: f64,
    /// Distinct entities.
    pub entities: u64,
    /// Zipf exponent of the key choice: 0 is uniform, ≥ 1 makes hot keys.
    pub zipf: f64,
    /// Messages to produce, duplicates included. With `rate` and
    /// `duration_s` both set, `rate × duration_s` instead.
    pub events: u64,
    /// Payload size of `set` events, bytes (about).
    pub payload_bytes: usize,
    /// Partitions of the input topic.
    pub partitions: i32,
    /// Share of events delivered late.
    pub late_ratio: f64,
    /// Share of messages sent twice.
    pub duplicate_ratio: f64,
    /// Share of events a handler rejects for good (they are dead-lettered).
    pub failure_ratio: f64,
    /// Share of events a handler fails once, transiently (retried).
    pub transient_ratio: f64,
    /// Open loop: produce at this many events/s while orderly runs.
    /// 0: closed loop, on a topic filled before orderly starts.
    pub rate: f64,
    /// Open loop at this fraction of the maximum, measured first by a
    /// closed-loop calibration run of `calibration_events` (0: off).
    pub rate_fraction: f64,
    /// Events of the calibration run.
    pub calibration_events: u64,
    /// Open loop duration, s.
    pub duration_s: f64,
    /// Recorded events, one JSON envelope per line, instead of the synthetic workload.
    pub input: Option<PathBuf>,
    /// Width of a time-series window, ms.
    pub window_ms: u64,
    /// The workload's seed.
    pub seed: u64,
    /// Measure the three ceilings (bare consumer, store, engine).
    pub ceilings: bool,
    /// Most events the store and engine ceilings use (they hold them, and
    /// every record, in memory).
    pub ceiling_events: u64,
    /// Run with the changelog on, then measure how fast a fresh instance
    /// (empty data dir, same group) restores every partition from it.
    pub restore: bool,
    /// sled's cache for orderly's store, MiB; 0: orderly's default
    /// (`store_cache_mb`).
    pub store_cache_mb: u64,
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            name: "custom".into(),
            tenants: 3,
            settings_bytes: 0,
            settings_updates_per_s: 0.0,
            entities: 10_000,
            zipf: 0.0,
            events: 50_000,
            payload_bytes: 200,
            partitions: 8,
            late_ratio: 0.05,
            duplicate_ratio: 0.01,
            failure_ratio: 0.0,
            transient_ratio: 0.0,
            rate: 0.0,
            rate_fraction: 0.0,
            calibration_events: 0,
            duration_s: 0.0,
            input: None,
            window_ms: 1_000,
            seed: 7,
            ceilings: true,
            ceiling_events: 1_000_000,
            restore: false,
            store_cache_mb: 0,
        }
    }
}

/// The scenarios shipped in `bench/`, built in so `--scenario NAME` works anywhere.
pub const BUILT_IN: &[(&str, &str)] = &[
    ("smoke", include_str!("../../../bench/smoke.toml")),
    ("steady", include_str!("../../../bench/steady.toml")),
    ("max", include_str!("../../../bench/max.toml")),
    ("soak", include_str!("../../../bench/soak.toml")),
    ("hot-keys", include_str!("../../../bench/hot-keys.toml")),
    ("late-heavy", include_str!("../../../bench/late-heavy.toml")),
    ("failures", include_str!("../../../bench/failures.toml")),
    ("restore", include_str!("../../../bench/restore.toml")),
    ("tenants", include_str!("../../../bench/tenants.toml")),
];

impl Scenario {
    /// A built-in scenario by name, or a TOML file by path.
    pub fn load(name_or_path: &str) -> anyhow::Result<Scenario> {
        let text = match BUILT_IN.iter().find(|(n, _)| *n == name_or_path) {
            Some((_, t)) => t.to_string(),
            None => std::fs::read_to_string(name_or_path).with_context(|| {
                let names: Vec<&str> = BUILT_IN.iter().map(|(n, _)| *n).collect();
                format!(
                    "{name_or_path} is neither a built-in scenario ({}) nor a readable file",
                    names.join(", ")
                )
            })?,
        };
        let s: Scenario =
            toml::from_str(&text).with_context(|| format!("scenario {name_or_path}"))?;
        s.validate()?;
        Ok(s)
    }

    /// Rejects values that cannot run.
    pub fn validate(&self) -> anyhow::Result<()> {
        let ratio = |v: f64, n: &str| {
            anyhow::ensure!(
                (0.0..=1.0).contains(&v),
                "{n} must be between 0 and 1, not {v}"
            );
            Ok(())
        };
        ratio(self.late_ratio, "late_ratio")?;
        ratio(self.duplicate_ratio, "duplicate_ratio")?;
        ratio(self.failure_ratio, "failure_ratio")?;
        ratio(self.transient_ratio, "transient_ratio")?;
        ratio(self.rate_fraction, "rate_fraction")?;
        anyhow::ensure!(self.partitions >= 1, "partitions must be at least 1");
        anyhow::ensure!(self.entities >= 1, "entities must be at least 1");
        anyhow::ensure!(self.window_ms >= 100, "window_ms must be at least 100");
        anyhow::ensure!(self.zipf >= 0.0, "zipf must not be negative");
        anyhow::ensure!(
            self.settings_updates_per_s >= 0.0,
            "settings_updates_per_s must not be negative"
        );
        anyhow::ensure!(
            self.settings_updates_per_s == 0.0 || self.settings_bytes > 0,
            "settings_updates_per_s needs settings_bytes above 0 (tenants without settings have none to update)"
        );
        anyhow::ensure!(
            self.rate >= 0.0 && self.duration_s >= 0.0,
            "rate and duration_s must not be negative"
        );
        Ok(())
    }

    fn open_loop(&self) -> bool {
        self.rate > 0.0 || self.rate_fraction > 0.0
    }

    fn event_count(&self, rate: f64) -> u64 {
        if rate > 0.0 && self.duration_s > 0.0 {
            (rate * self.duration_s) as u64
        } else {
            self.events
        }
    }

    fn spec(&self, events: u64, rate: f64) -> WorkloadSpec {
        let now = crate::telemetry::unix_ms(SystemTime::now());
        WorkloadSpec {
            events,
            entities: self.entities,
            tenants: self.tenants,
            late_ratio: self.late_ratio,
            duplicate_ratio: self.duplicate_ratio,
            seed: self.seed,
            // Open loop: occurred_at follows the real clock on average (an
            // entity's events are as far apart as the load makes them).
            // Closed loop: every event happened before the run, 1 ms apart.
            start_ms: if rate > 0.0 { now } else { now - events as i64 },
            event_spacing_ms: if rate > 0.0 {
                ((self.entities as f64 / rate) * 1000.0).max(1.0) as i64
            } else {
                1
            },
            zipf: self.zipf,
            payload_bytes: self.payload_bytes,
        }
    }

    /// The events of this scenario, synthetic or recorded.
    fn events(&self, events: u64, rate: f64) -> anyhow::Result<Box<dyn Iterator<Item = Event>>> {
        match &self.input {
            None => Ok(Box::new(Workload::new(self.spec(events, rate)))),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading recorded events {}", path.display()))?;
                let mut out = Vec::new();
                for (i, line) in text
                    .lines()
                    .enumerate()
                    .filter(|(_, l)| !l.trim().is_empty())
                {
                    let e = crate::model::envelope::decode(
                        None,
                        Some(line.as_bytes()),
                        None,
                        crate::model::envelope::ContentType::Json,
                    )
                    .with_context(|| format!("{} line {}", path.display(), i + 1))?;
                    out.push(e);
                }
                let n = if events > 0 {
                    events as usize
                } else {
                    out.len()
                };
                Ok(Box::new(out.into_iter().cycle().take(n.max(1))))
            }
        }
    }
}

/// One window of the time series.
#[derive(Clone, Debug, Serialize)]
pub struct Window {
    /// End of the window, s since orderly received its first message.
    pub t_s: f64,
    /// Events made durable per second in the window.
    pub throughput_eps: f64,
    /// p99 Kafka append → durable in the window, ms (0 if none).
    pub p99_ms: f64,
    /// p99 received → durable in the window (orderly's own share), ms.
    pub received_p99_ms: f64,
    /// Resident memory, MiB.
    pub rss_mib: f64,
    /// Entity actors alive.
    pub active_actors: i64,
    /// Events received and not yet durable.
    pub in_flight: i64,
    /// The least and the most messages any one input partition was behind
    /// (log end minus committed offset, from librdkafka's statistics, which
    /// the bench asks for at least once per window); `None` until the first
    /// statistics. A wide spread means some partitions wait far longer
    /// than others.
    pub partition_lag: Option<PartitionLag>,
}

/// What one end-to-end orderly run measured.
struct E2e {
    /// Its tenant settings.
    settings: TenantSettingsSeen,
    /// The run's store, still open, until its footprint is taken.
    store: Option<Arc<SledStore>>,
    /// append → durable after the first window.
    steady: Percentiles,
    /// received → durable after the first window: orderly's own share.
    steady_received: Percentiles,
    drain_eps: f64,
    seconds: f64,
    stats: Arc<Stats>,
    windows: Vec<Window>,
    max_rss_mib: f64,
}

/// The full report.
#[derive(Debug, Serialize)]
pub struct Report {
    /// The whole report, as written to `report.json`.
    pub json: serde_json::Value,
}

/// The process's CPU time so far, user and system, in seconds.
fn cpu_seconds() -> (f64, f64) {
    // SAFETY: getrusage writes into the struct it is given, nothing else.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return (0.0, 0.0);
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (secs(usage.ru_utime), secs(usage.ru_stime))
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map(|pages| pages * 4096.0 / (1024.0 * 1024.0))
        .unwrap_or(0.0)
}

fn config_for(s: &Scenario, broker: &Broker, topics: &Topics, data_dir: &Path) -> Config {
    let mut types = Config::crm_types();
    for t in types.values_mut() {
        t.on_failure = FailurePolicy::Skip;
    }
    Config {
        brokers: broker.servers(),
        kafka: broker.kafka(),
        topic: topics.input.clone(),
        group: format!("bench-{}", rand::random::<u32>()),
        data_dir: data_dir.to_owned(),
        dead_letter_topic: topics.dead_letters.clone(),
        changes_topic: topics.changes.clone(),
        anomalies_topic: topics.anomalies.clone(),
        admin_addr: String::new(),
        types,
        retry_initial_ms: 10,
        retry_max_ms: 100,
        // Passivate idle actors, so memory follows the hot set, not every key seen.
        idle_timeout_ms: 10_000,
        settings: match &topics.settings {
            Some(topic) => crate::settings::SettingsConfig {
                source: crate::settings::SettingsSource::Topic,
                topic: topic.clone(),
                ..Default::default()
            },
            None => Default::default(),
        },
        // librdkafka's statistics, which carry each partition's lag, at
        // least once per window, so that every window's `partition_lag`
        // is current.
        stats_interval_ms: Config::default().stats_interval_ms.min(s.window_ms),
        store_cache_mb: match s.store_cache_mb {
            0 => Config::default().store_cache_mb,
            mb => mb,
        },
        ..Config::default()
    }
}

struct Topics {
    input: String,
    dead_letters: String,
    changes: String,
    anomalies: String,
    /// The tenants' settings documents, if the scenario has any.
    settings: Option<String>,
}

impl Topics {
    fn create(broker: &Broker, s: &Scenario, label: &str) -> anyhow::Result<Topics> {
        let suffix = format!("{}-{label}-{:08x}", s.name, rand::random::<u32>());
        let t = Topics {
            input: format!("bench-{suffix}"),
            dead_letters: format!("bench-dlq-{suffix}"),
            changes: format!("bench-changes-{suffix}"),
            anomalies: format!("bench-anomalies-{suffix}"),
            settings: (s.settings_bytes > 0).then(|| format!("bench-settings-{suffix}")),
        };
        broker.create_topic(&t.input, s.partitions)?;
        broker.create_topic(&t.dead_letters, 1)?;
        broker.create_topic(&t.changes, s.partitions)?;
        broker.create_topic(&t.anomalies, 1)?;
        if let Some(settings) = &t.settings {
            broker.create_topic(settings, 1)?;
        }
        if s.restore {
            broker.create_topic(&format!("{}{CHANGELOG}", t.input), s.partitions)?;
        }
        Ok(t)
    }
}

/// The degradation ratio of a series: last full window over first full
/// window (the partial windows at either end are left out).
fn degradation(values: &[f64]) -> Option<f64> {
    let full: Vec<f64> = if values.len() > 3 {
        values[1..values.len() - 1].to_vec()
    } else {
        values.to_vec()
    };
    let (first, last) = (full.first()?, full.last()?);
    (*first > 0.0).then(|| last / first)
}

/// Runs `s`. `brokers`: an external Kafka-protocol broker, whose clients get
/// the librdkafka properties `kafka` (`--config`'s `[kafka]` tables); `None`
/// for the embedded one. Writes `report.json` and `report.svg` into `out`.
pub fn run(
    s: &Scenario,
    brokers: Option<String>,
    kafka: crate::config::KafkaConfig,
    out: &Path,
) -> anyhow::Result<Report> {
    s.validate()?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let broker = match brokers {
        Some(b) => Broker::External(b, kafka),
        None => Broker::Embedded(
            crate::tools::broker::EmbeddedBroker::start(1)
                .context("starting the embedded broker")?,
        ),
    };
    let servers = broker.servers();
    println!(
        "orderly bench: scenario {} on the {} broker",
        s.name,
        broker.name()
    );

    // Open loop at a fraction of the maximum: calibrate with a closed-loop run first.
    let mut calibrated_max = None;
    let rate = if s.rate_fraction > 0.0 {
        let n = s.calibration_events.max(10_000);
        let topics = Topics::create(&broker, s, "calibration")?;
        let bar = progress(n, "calibrating");
        produce(&broker, &topics.input, None, s.events(n, 0.0)?, None)?;
        let dir = tempfile::tempdir()?;
        let config = config_for(s, &broker, &topics, dir.path());
        let h = handlers(s, &config);
        let e2e = end_to_end(s, config, h, move || Some(n), Arc::default(), &bar)?;
        bar.finish_and_clear();
        println!("calibration: {:.0} events/s end to end", e2e.drain_eps);
        calibrated_max = Some(e2e.drain_eps);
        e2e.drain_eps * s.rate_fraction
    } else {
        s.rate
    };
    let open = s.open_loop();
    let events = s.event_count(rate);

    let topics = Topics::create(&broker, s, "run")?;
    let dir = tempfile::tempdir()?;
    let mut config = config_for(s, &broker, &topics, dir.path());
    if s.restore {
        config.changelog_suffix = CHANGELOG.into();
    }
    let batch_max = config.batch_max;
    let mut produced_rate = 0.0;
    let produced = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut ceilings = serde_json::Map::new();

    // Closed loop: fill the topic first, then measure the bare consumer on it.
    if !open {
        let bar = progress(events, "producing");
        let (n, r) = produce(
            &broker,
            &topics.input,
            None,
            s.events(events, 0.0)?,
            Some(&bar),
        )?;
        bar.finish_and_clear();
        produced.store(n, Relaxed);
        finished.store(true, Relaxed);
        produced_rate = r;
        println!("produced {n} events at {r:.0} events/s");
        check_retained(&broker, &topics.input, s.partitions)?;
        if s.ceilings {
            let eps = bare_consumer(&broker, &topics.input, s.partitions, n)?;
            println!("bare consumer: {eps:.0} events/s");
            ceilings.insert("bare_consumer_eps".into(), eps.into());
        }
    }

    // orderly end to end.
    let bar = progress(events, "orderly");
    let h = handlers(s, &config);
    let consuming = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let producer = if open {
        let (servers, kafka, topic) = (servers.clone(), broker.kafka(), topics.input.clone());
        let (produced, finished) = (produced.clone(), finished.clone());
        let (scenario, consuming) = (s.clone(), consuming.clone());
        Some(std::thread::spawn(move || -> anyhow::Result<f64> {
            // Start once orderly consumes: a backlog built while the group
            // forms would be measured as latency.
            while !consuming.load(Relaxed) {
                std::thread::sleep(Duration::from_millis(5));
            }
            let opts = ProduceOptions {
                brokers: servers,
                kafka,
                topic,
                rate: Some(rate),
                format: Format::Proto,
            };
            let started = Instant::now();
            // Generated here, as sent: the stream is never all in memory.
            let stream = scenario.events(events, rate);
            let r = stream.and_then(|stream| {
                workload::produce(
                    &opts,
                    stream.map(|e| workload::message_of(&e, Format::Proto)),
                    |n| produced.store(n, Relaxed),
                )
                .map_err(anyhow::Error::from)
            });
            finished.store(true, Relaxed);
            r.map(|n| n as f64 / started.elapsed().as_secs_f64().max(1e-9))
        }))
    } else {
        None
    };
    let expected = {
        let (produced, finished) = (produced.clone(), finished.clone());
        move || finished.load(Relaxed).then(|| produced.load(Relaxed))
    };
    let mut e2e = end_to_end(s, config.clone(), h, expected, consuming.clone(), &bar)?;
    bar.finish_and_clear();
    if let Some(p) = producer {
        produced_rate = p
            .join()
            .map_err(|_| anyhow::anyhow!("the producer thread panicked"))?
            .context("producing")?;
    }
    let produced = produced.load(Relaxed);
    println!("orderly: {:.0} events/s end to end", e2e.drain_eps);
    // Taken (and the store closed) before the ceilings run.
    let (store, settings) = match e2e.store.take() {
        Some(store) => (
            store_footprint(&store)?,
            settings_report(s, &e2e.settings, &store)?,
        ),
        None => (serde_json::Value::Null, serde_json::Value::Null),
    };

    if s.ceilings {
        if open {
            let eps = bare_consumer(&broker, &topics.input, s.partitions, produced)?;
            println!("bare consumer: {eps:.0} events/s");
            ceilings.insert("bare_consumer_eps".into(), eps.into());
        }
        let h = handlers(s, &config);
        // sled's cache as orderly's run had it.
        let (eps, measured) = store_ceiling(
            s,
            s.events(events, rate)?,
            batch_max,
            config.store_cache_mb,
            &h,
        )?;
        println!("store ceiling: {eps:.0} events/s ({measured} events)");
        ceilings.insert("store_eps".into(), eps.into());
        ceilings.insert("store_events_measured".into(), measured.into());
        let engine_topics = Topics::create(&broker, s, "engine")?;
        let engine_dir = tempfile::tempdir()?;
        let engine_config = config_for(s, &broker, &engine_topics, engine_dir.path());
        let h = handlers(s, &engine_config);
        let eps = engine_ceiling(
            engine_config,
            h,
            s.events(events, rate)?
                .take(s.ceiling_events as usize)
                .collect(),
            s.partitions,
            TenantDocs::of(s).as_ref(),
        )?
        .eps;
        println!("engine ceiling: {eps:.0} events/s");
        ceilings.insert("engine_eps".into(), eps.into());
    }

    let mut report = report(
        s,
        &broker,
        rate,
        calibrated_max,
        produced,
        produced_rate,
        &e2e,
        ceilings,
    );
    report["store"] = store;
    report["settings"] = settings;
    if s.restore {
        let r = restore(config)?;
        println!(
            "restore: {} entities ({} changelog records) in {:.2} s: {:.0} entities/s",
            r["entities"], r["records"], r["seconds"], r["entities_per_s"]
        );
        report["restore"] = r;
    }
    let json = serde_json::to_string_pretty(&report)?;
    std::fs::write(out.join("report.json"), &json)?;
    std::fs::write(out.join("report.svg"), chart(s, &e2e.windows))?;
    print_table(&report);
    println!(
        "wrote {} and {}",
        out.join("report.json").display(),
        out.join("report.svg").display()
    );
    Ok(Report { json: report })
}

/// What a run's `store` holds after it: its size on disk, its entity
/// records and the bytes on disk per record, and the live bytes by kind of
/// key (`e` for entity records, and so on: the layout table in `store`).
/// Printed, and returned for the report.
fn store_footprint(store: &SledStore) -> anyhow::Result<serde_json::Value> {
    let bytes = store.size_on_disk()?;
    let usage = store.usage()?;
    let entities = usage.get(&'e').map_or(0, |u| u.0);
    println!(
        "store: {:.0} MiB on disk, {entities} entity records, {:.0} B per entity",
        bytes as f64 / (1024.0 * 1024.0),
        bytes as f64 / entities.max(1) as f64,
    );
    for (prefix, (keys, live)) in &usage {
        println!(
            "  store key prefix {prefix:?}: {keys} keys, {:.1} MiB, {:.0} B per key",
            *live as f64 / (1024.0 * 1024.0),
            *live as f64 / (*keys).max(1) as f64
        );
    }
    let usage: BTreeMap<String, serde_json::Value> = usage
        .into_iter()
        .map(|(p, (keys, live))| {
            (
                p.to_string(),
                serde_json::json!({ "keys": keys, "bytes": live }),
            )
        })
        .collect();
    Ok(serde_json::json!({
        "bytes_on_disk": bytes,
        "entities": entities,
        "bytes_per_entity": bytes as f64 / entities.max(1) as f64,
        "usage": usage,
    }))
}

/// Measures the engine ceiling alone: `s`'s events (at most
/// `ceiling_events`) fed from memory through actors, fold, writer and store.
/// For profiling the engine path (`valgrind --tool=callgrind orderly bench
/// --engine-only`), where the broker and the other measures would only add
/// noise. Writes `report.json` into `out`.
pub fn engine_only(s: &Scenario, out: &Path) -> anyhow::Result<f64> {
    s.validate()?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    // The engine consumes nothing; the broker only gives the config its topics.
    let broker = Broker::Embedded(
        crate::tools::broker::EmbeddedBroker::start(1).context("starting the embedded broker")?,
    );
    let topics = Topics::create(&broker, s, "engine")?;
    let dir = tempfile::tempdir()?;
    let config = config_for(s, &broker, &topics, dir.path());
    let h = handlers(s, &config);
    let events: Vec<Event> = s
        .events(s.event_count(s.rate), s.rate)?
        .take(s.ceiling_events as usize)
        .collect();
    let n = events.len();
    let distinct = events
        .iter()
        .map(|e| e.entity_id.as_str())
        .collect::<HashSet<_>>()
        .len();
    let run = engine_ceiling(config, h, events, s.partitions, TenantDocs::of(s).as_ref())?;
    let eps = run.eps;
    println!("engine ceiling: {eps:.0} events/s ({n} events)");
    // Callgrind sees only user space; the kernel's share (page faults,
    // sled's writes) shows here.
    println!(
        "CPU while timed: user {:.2} s, system {:.2} s, {:.2} cores busy",
        run.cpu_user_s,
        run.cpu_system_s,
        (run.cpu_user_s + run.cpu_system_s) / run.secs.max(1e-9)
    );
    println!(
        "store lock held exclusively by batches: {:.2} s, {:.0}% of the run",
        run.exclusive_s,
        100.0 * run.exclusive_s / run.secs.max(1e-9)
    );
    let quarter = (run.windows.len() / 4).max(1);
    let mean = |w: &[f64]| w.iter().sum::<f64>() / w.len().max(1) as f64;
    let (first, last) = (
        mean(&run.windows[..quarter.min(run.windows.len())]),
        mean(&run.windows[run.windows.len().saturating_sub(quarter)..]),
    );
    println!(
        "per-second windows: first quarter {first:.0}, last quarter {last:.0} events/s; \
         max RSS {:.0} MiB",
        run.max_rss_mib,
    );
    let store = store_footprint(&run.store)?;
    let report = serde_json::json!({
        "schema": "orderly.bench.engine.v1",
        "scenario": s,
        "events": n,
        "ceilings": { "engine_eps": eps },
        "windows_eps": run.windows,
        "max_rss_mib": run.max_rss_mib,
        "cpu_user_s": run.cpu_user_s,
        "cpu_system_s": run.cpu_system_s,
        "store_exclusive_s": run.exclusive_s,
        "entities_touched": distinct,
        "store": store,
    });
    std::fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    Ok(eps)
}

fn progress(n: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(n);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{what:>11} [{{elapsed_precise}}] {{wide_bar}} {{pos}}/{{len}} ({{per_sec}})"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_scenarios_parse_and_validate() {
        for (name, _) in BUILT_IN {
            let s = Scenario::load(name).unwrap_or_else(|e| panic!("{name}: {e:#}"));
            assert_eq!(s.name, *name);
        }
        assert!(Scenario::load("no-such-scenario").is_err());
        let bad: Scenario = toml::from_str("late_ratio = 1.5").unwrap();
        assert!(bad.validate().is_err());
        assert!(toml::from_str::<Scenario>("unknown = 1").is_err());
    }

    #[test]
    fn degradation_skips_partial_windows() {
        assert_eq!(degradation(&[5.0, 100.0, 90.0, 95.0, 3.0]), Some(0.95));
        assert_eq!(degradation(&[]), None);
    }
}
