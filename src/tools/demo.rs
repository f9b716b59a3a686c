//! `orderly demo`: the whole pipeline on the embedded broker and a synthetic
//! CRM workload, with a progress bar and a summary.

use crate::config::Config;
use crate::metrics::{Percentiles, Stats};
use crate::pipeline::Pipeline;
use crate::store::Store;
use crate::tools::broker::EmbeddedBroker;
use crate::tools::workload::{
    self, field_mappings, Format, ProduceOptions, Workload, WorkloadSpec,
};
use anyhow::Context as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Demo options.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Events to produce.
    pub events: u64,
    /// Distinct entities.
    pub entities: u64,
    /// Workload seed.
    pub seed: u64,
    /// Keep processing after the summary, until Ctrl-C.
    pub keep_running: bool,
    /// Data dir; a temporary one if `None`.
    pub data_dir: Option<PathBuf>,
}

/// What the demo measured.
#[derive(Clone, Debug)]
pub struct Summary {
    /// Messages produced (events, duplicates and malformed).
    pub produced: u64,
    /// Entities in the store at the end.
    pub entities: u64,
    /// Events applied in order.
    pub applied: u64,
    /// Duplicates skipped.
    pub duplicates: u64,
    /// Late events re-folded.
    pub late_recomputed: u64,
    /// Too-late events dropped.
    pub too_late: u64,
    /// Dead letters.
    pub dead_letters: u64,
    /// Corrections (late events that changed the state).
    pub corrections: u64,
    /// Late events applied on top (policy `apply`).
    pub late_applied: u64,
    /// Events ignored because the tenant has not enabled their type.
    pub ignored: u64,
    /// Per tenant: the settings version in force at the end, and the
    /// internal field names its entities hold.
    pub tenant_settings: Vec<(String, u64, Vec<String>)>,
    /// Per tenant: conversion total and count, from the derived table.
    pub tenant_conversions: Vec<(String, serde_json::Value, serde_json::Value)>,
    /// Durable messages per second.
    pub throughput: f64,
    /// Kafka append → durable, µs.
    pub latency: Percentiles,
    /// Seconds from start to the last durable event.
    pub seconds: f64,
}

/// Runs the demo and prints its summary.
pub fn run(opts: DemoOptions) -> anyhow::Result<Summary> {
    let tmp = tempfile::Builder::new()
        .prefix("orderly-demo-")
        .tempdir()
        .context("creating a temporary data dir")?;
    let data_dir = opts
        .data_dir
        .clone()
        .unwrap_or_else(|| tmp.path().to_owned());
    let broker = EmbeddedBroker::start(1).context("starting the embedded broker")?;
    let mut types = Config::crm_types();
    for (t, c) in types.iter_mut() {
        // Appointments keep every version: try `orderly state history appt-3`.
        c.history = t.starts_with("appointment.");
    }
    let config = Config {
        brokers: broker.bootstrap_servers(),
        topic: "crm.events".into(),
        group: "orderly-demo".into(),
        data_dir,
        types,
        derived_topic: Some("crm.derived".into()),
        observers: vec!["tenant_conversions".into()],
        changes_topic: "crm.changes".into(),
        anomalies_topic: "crm.anomalies".into(),
        settings: crate::settings::SettingsConfig {
            source: crate::settings::SettingsSource::Topic,
            topic: "crm.settings".into(),
            ..Default::default()
        },
        // A fast rebalance on the embedded broker.
        kafka: crate::config::KafkaConfig::for_consumers(&[
            ("session.timeout.ms", "6000"),
            ("heartbeat.interval.ms", "500"),
        ]),
        ..Config::default()
    };
    broker
        .create_topic(&config.topic, 8)
        .context("creating the demo topic")?;
    for t in [
        &config.dead_letter_topic,
        &config.changes_topic,
        &config.anomalies_topic,
    ] {
        broker
            .create_topic(t, 1)
            .with_context(|| format!("creating topic {t}"))?;
    }
    broker
        .create_topic("crm.derived", 8)
        .context("creating the derived-events topic")?;
    broker
        .create_topic(&config.settings.topic, 1)
        .context("creating the settings topic")?;
    // Three tenants, three mappings of the workload's field names.
    for doc in demo_settings() {
        crate::settings::produce_document(&config, &doc, Duration::from_secs(30))
            .map_err(anyhow::Error::msg)?;
    }
    println!(
        "orderly demo: embedded broker at {}, topic {} (8 partitions)",
        config.brokers, config.topic
    );

    let malformed = workload::malformed_samples();
    let total = opts.events + (malformed.len() as u64).min(opts.events);
    let produced = Arc::new(AtomicU64::new(0));
    let spec = WorkloadSpec {
        events: opts.events,
        entities: opts.entities,
        seed: opts.seed,
        ..Default::default()
    };
    let produce_opts = ProduceOptions {
        brokers: config.brokers.clone(),
        kafka: config.kafka.clone(),
        topic: config.topic.clone(),
        rate: None,
        format: Format::Proto,
    };
    let handlers = config.handlers();
    let admin_addr = config.admin_addr.clone();
    let producer_config = config.clone();
    let summary = actix::System::new().block_on(async move {
        let pipeline = Pipeline::start(config, handlers)?;
        // With --keep-running, the dashboard shows the run live.
        let _admin = if opts.keep_running && !admin_addr.is_empty() {
            match crate::admin::start(pipeline.control(), &admin_addr, None) {
                Ok(h) => {
                    println!(
                        "dashboard: http://{admin_addr}/   metrics: http://{admin_addr}/metrics"
                    );
                    Some(h)
                }
                Err(e) => {
                    eprintln!("warning: no dashboard: cannot listen on {admin_addr}: {e}");
                    None
                }
            }
        } else {
            None
        };
        let stats = pipeline.stats();
        let store = pipeline.store();
        // The group takes a few seconds to form on the embedded broker; produce
        // only once partitions are assigned, so latency measures processing.
        let fatal = pipeline.fatal();
        while !pipeline.is_ready() {
            if let Some(r) = fatal.reason() {
                anyhow::bail!("the pipeline stopped: {r}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let started = Instant::now();
        let counter = produced.clone();
        let (half_tx, half_rx) = std::sync::mpsc::channel();
        let (resume_tx, resume_rx) = std::sync::mpsc::channel::<()>();
        let producer = std::thread::spawn(move || {
            // Malformed messages ride along, spread evenly, so the dead-letter
            // path shows up too: with `every` >= 1 they all land before the end.
            let every = (opts.events / (malformed.len() as u64 + 1)).max(1);
            let mut bad = malformed.into_iter();
            let mut i = 0u64;
            let mut messages = Workload::new(spec).flat_map(move |e| {
                i += 1;
                let extra = if i % every == 0 { bad.next() } else { None };
                std::iter::once(workload::message_of(&e, Format::Proto)).chain(extra)
            });
            // The first half, then a pause while tenant-1's settings change.
            let first = workload::produce(
                &produce_opts,
                messages.by_ref().take((total / 2) as usize),
                |n| counter.store(n, Relaxed),
            )?;
            let _ = half_tx.send(first);
            let _ = resume_rx.recv();
            let rest = workload::produce(&produce_opts, messages, |n| {
                counter.store(first + n, Relaxed)
            })?;
            Ok::<_, rdkafka::error::KafkaError>(first + rest)
        });
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} durable ({per_sec})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        let mut last_progress = (0, Instant::now());
        let mut changed = false;
        let mut half = None;
        let registry = pipeline.settings();
        loop {
            let durable = Stats::get(&stats.writer.durable);
            bar.set_position(durable);
            if durable >= total {
                break;
            }
            if let Ok(h) = half_rx.try_recv() {
                half = Some(h);
            }
            if !changed && half.is_some_and(|h| durable >= h) {
                // Mid-run, with the first half durable, tenant-1 renames
                // `score`: events handled from now on write `rating`; those
                // before keep `lead_score`.
                changed = true;
                let config = producer_config.clone();
                tokio::task::spawn_blocking(move || {
                    crate::settings::produce_document(
                        &config,
                        &tenant_1_v2(),
                        Duration::from_secs(30),
                    )
                })
                .await?
                .map_err(anyhow::Error::msg)?;
                while registry.view("tenant-1").current().version() < 2 {
                    if let Some(r) = fatal.reason() {
                        anyhow::bail!("the pipeline stopped: {r}");
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                let _ = resume_tx.send(());
                bar.suspend(|| {
                    println!(
                        "tenant-1 settings changed mid-run: score now maps to `rating` (version 2)"
                    )
                });
            }
            if let Some(r) = fatal.reason() {
                anyhow::bail!("the pipeline stopped: {r}");
            }
            if durable != last_progress.0 {
                last_progress = (durable, Instant::now());
            } else if last_progress.1.elapsed() > Duration::from_secs(60) {
                anyhow::bail!("no progress for 60 s at {durable}/{total} durable events");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Derived events (the tenant totals) follow through the derived topic.
        let mut last = (Stats::get(&stats.writer.durable), Instant::now());
        loop {
            let durable = Stats::get(&stats.writer.durable);
            let quiet = stats.source.in_flight.load(Relaxed) == 0
                && store.outbox(1).map(|o| o.is_empty()).unwrap_or(true);
            if durable != last.0 {
                last = (durable, Instant::now());
            } else if quiet && last.1.elapsed() > Duration::from_millis(500) {
                break;
            }
            if let Some(r) = fatal.reason() {
                anyhow::bail!("the pipeline stopped: {r}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let seconds = started.elapsed().as_secs_f64();
        bar.finish();
        let produced = producer
            .join()
            .map_err(|_| anyhow::anyhow!("the producer thread panicked"))?
            .context("producing the workload")?;
        if opts.keep_running {
            println!("processing continues; press Ctrl-C to stop");
            let _ = tokio::signal::ctrl_c().await;
        }
        let s = &stats;
        let summary = Summary {
            produced,
            entities: 0,
            applied: Stats::get(&s.entities.applied),
            duplicates: Stats::get(&s.entities.duplicates),
            late_recomputed: Stats::get(&s.entities.late_recomputed),
            too_late: Stats::get(&s.entities.too_late),
            dead_letters: Stats::get(&s.entities.dead_letters),
            corrections: Stats::get(&s.entities.corrections),
            late_applied: Stats::get(&s.entities.late_applied),
            ignored: Stats::get(&s.entities.ignored),
            tenant_settings: Vec::new(),
            tenant_conversions: Vec::new(),
            throughput: Stats::get(&s.writer.durable) as f64 / seconds,
            latency: s.append_to_durable(),
            seconds,
        };
        pipeline.shutdown()?;
        let mut entities = 0;
        let mut tenant_conversions = Vec::new();
        let mut fields: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
            Default::default();
        for r in store.entities() {
            let r = r?;
            if let Some(t) = r.entity_id.strip_prefix("tenant_conversions:") {
                let f = |k: &str| {
                    r.state
                        .fields
                        .get(k)
                        .map(|v| v.to_json())
                        .unwrap_or_default()
                };
                tenant_conversions.push((t.to_owned(), f("amount"), f("conversions")));
            } else {
                entities += 1;
                if r.entity_id.starts_with("lead") {
                    fields
                        .entry(r.tenant_id.clone())
                        .or_default()
                        .extend(r.state.fields.keys().cloned());
                }
            }
        }
        let tenant_settings = fields
            .into_iter()
            .map(|(t, f)| {
                let v = registry.view(&t).current().version();
                (t, v, f.into_iter().collect())
            })
            .collect();
        Ok::<_, anyhow::Error>(Summary {
            entities,
            tenant_conversions,
            tenant_settings,
            ..summary
        })
    })?;
    drop(broker);
    print_summary(&summary);
    Ok(summary)
}

fn print_summary(s: &Summary) {
    let ms = |us: u64| format!("{:.1} ms", us as f64 / 1000.0);
    let rows = [
        ("events produced", s.produced.to_string()),
        ("entities", s.entities.to_string()),
        ("applied in order", s.applied.to_string()),
        ("duplicates skipped", s.duplicates.to_string()),
        ("late events re-folded", s.late_recomputed.to_string()),
        ("too late (dropped, reported)", s.too_late.to_string()),
        ("dead letters", s.dead_letters.to_string()),
        ("corrections emitted", s.corrections.to_string()),
        (
            "late derived events added on top",
            s.late_applied.to_string(),
        ),
        ("ignored (type not enabled)", s.ignored.to_string()),
        ("throughput", format!("{:.0} events/s", s.throughput)),
        ("latency p50 (append → durable)", ms(s.latency.p50)),
        ("latency p99 (append → durable)", ms(s.latency.p99)),
        ("elapsed", format!("{:.1} s", s.seconds)),
    ];
    println!("\n orderly demo summary");
    println!(" {:-<32}-+-{:-<20}", "", "");
    for (k, v) in rows {
        println!(" {k:<32} | {v:>20}");
    }
    println!("\n tenant_conversions (derived table)");
    println!(" {:-<32}-+-{:-<20}-+-{:-<12}", "", "", "");
    for (t, amount, n) in &s.tenant_conversions {
        println!(
            " {t:<32} | {:>20} | {:>12}",
            amount.to_string(),
            n.to_string()
        );
    }
    println!("\n tenant settings (version in force; fields their leads hold)");
    println!(" {:-<12}-+-{:-<7}-+-{:-<60}", "", "", "");
    for (t, v, f) in &s.tenant_settings {
        println!(" {t:<12} | {v:>7} | {}", f.join(", "));
    }
    println!("\nThe workload is produced as fast as possible, so latency includes time queued in the broker.");
    println!("The embedded broker serves fetches slowly: do not judge orderly's speed on it.");
}

/// The demo's tenant settings: each tenant names the workload's fields its own way.
fn demo_settings() -> Vec<crate::settings::SettingsDocument> {
    use crate::settings::SettingsDocument;
    vec![
        SettingsDocument {
            tenant_id: "tenant-0".into(),
            version: 1,
            field_mappings: field_mappings(0),
            ..Default::default()
        },
        SettingsDocument {
            tenant_id: "tenant-1".into(),
            version: 1,
            field_mappings: field_mappings(1),
            integration_flags: [("crm_sync".to_owned(), true)].into(),
            ..Default::default()
        },
        SettingsDocument {
            tenant_id: "tenant-2".into(),
            version: 1,
            field_mappings: field_mappings(2),
            // tenant-2 never deletes leads: lead.deleted is not enabled.
            enabled_types: Config::crm_types()
                .into_keys()
                .filter(|t| t != "lead.deleted")
                .collect(),
            ..Default::default()
        },
    ]
}

/// tenant-1's settings after the mid-run change.
fn tenant_1_v2() -> crate::settings::SettingsDocument {
    crate::settings::SettingsDocument {
        version: 2,
        field_mappings: [("score", "rating"), ("source", "channel")]
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
            .into(),
        ..demo_settings().swap_remove(1)
    }
}
