//! The commands over data at rest or produced: `produce`, `bench`, `state`,
//! `audit`, `dev-broker`.

use super::*;
use crate::store::{SledStore, Store};
use crate::tools::workload::{self, ProduceOptions, Workload, WorkloadSpec};
use std::io::Write as _;

pub(super) fn produce(a: ProduceArgs) -> anyhow::Result<()> {
    // Producer spans (and traceparent headers) when OTEL_EXPORTER_OTLP_ENDPOINT is set.
    let telemetry = crate::telemetry::init("producer", "warn")?;
    let result = produce_workload(a);
    telemetry.shutdown();
    result
}

pub(super) fn produce_workload(a: ProduceArgs) -> anyhow::Result<()> {
    let spec = WorkloadSpec {
        events: a.events,
        entities: a.entities,
        tenants: a.tenants,
        late_ratio: a.late_ratio,
        duplicate_ratio: a.duplicate_ratio,
        seed: a.seed,
        ..WorkloadSpec::default()
    };
    let config = a.kafka.load()?;
    let opts = ProduceOptions {
        brokers: config.brokers.clone(),
        kafka: config.kafka.clone(),
        topic: config.topic.clone(),
        rate: (a.rate > 0.0).then_some(a.rate),
        format: a.format,
    };
    let bar = indicatif::ProgressBar::new(a.events);
    let format = a.format;
    let n = workload::produce(
        &opts,
        Workload::new(spec).map(|e| workload::message_of(&e, format)),
        |n| {
            if n % 1000 == 0 {
                bar.set_position(n)
            }
        },
    )
    .with_context(|| format!("producing to {} on {}", opts.topic, opts.brokers))?;
    bar.finish_and_clear();
    println!("produced {n} events to {}", opts.topic);
    Ok(())
}

pub(super) fn bench(a: BenchArgs) -> anyhow::Result<()> {
    // Dead letters are part of some scenarios: only errors are logged.
    let _telemetry = crate::telemetry::init("bench", "error")?;
    let mut s = crate::tools::bench::Scenario::load(&a.scenario)?;
    macro_rules! set {
        ($($f:ident = $v:expr),*) => { $( if let Some(v) = $v { s.$f = v; } )* };
    }
    set!(
        events = a.events,
        entities = a.entities,
        partitions = a.partitions,
        rate = a.rate,
        duration_s = a.duration,
        payload_bytes = a.payload_bytes,
        zipf = a.zipf,
        late_ratio = a.late_ratio,
        duplicate_ratio = a.duplicate_ratio,
        failure_ratio = a.failure_ratio,
        store_cache_mb = a.store_cache_mb
    );
    if a.input.is_some() {
        s.input = a.input;
    }
    if a.no_ceilings {
        s.ceilings = false;
    }
    if a.rate.is_some() {
        s.rate_fraction = 0.0;
    }
    s.validate()?;
    if a.engine_only {
        crate::tools::bench::engine_only(&s, &a.out)?;
        return Ok(());
    }
    // The user's librdkafka properties, for the clients of an external broker.
    let kafka = match &a.config {
        Some(path) => Config::load(Some(path), std::env::vars(), &Default::default())?.kafka,
        None => Default::default(),
    };
    crate::tools::bench::run(&s, a.brokers, kafka, &a.out)?;
    Ok(())
}

pub(super) fn open_store(dir: &std::path::Path) -> anyhow::Result<SledStore> {
    if !dir.exists() {
        anyhow::bail!("data dir {} does not exist", dir.display());
    }
    SledStore::open(dir, 64).with_context(|| {
        format!(
            "opening {} (is `orderly run` still using it? state commands read offline)",
            dir.display()
        )
    })
}

pub(super) fn load_config(store: &StoreArgs) -> anyhow::Result<Config> {
    let overrides = Overrides {
        data_dir: Some(store.data_dir.clone()),
        ..Overrides::default()
    };
    Ok(Config::load(
        store.config.as_deref(),
        std::env::vars(),
        &overrides,
    )?)
}

pub(super) fn parse_time(text: &str) -> anyhow::Result<i64> {
    if let Ok(ms) = text.parse::<i64>() {
        return Ok(ms);
    }
    let t = humantime::parse_rfc3339_weak(text).with_context(|| {
        format!("--as-of {text:?}: expected ms since the Unix epoch or an RFC 3339 time")
    })?;
    Ok(crate::telemetry::unix_ms(t))
}

pub(super) fn state(cmd: StateCommand) -> anyhow::Result<()> {
    let out = std::io::stdout();
    let mut out = out.lock();
    match cmd {
        StateCommand::Get {
            id,
            as_of,
            store: args,
        } => {
            let store = open_store(&args.data_dir)?;
            let Some(r) = store.load_entity(&id)? else {
                anyhow::bail!("no entity {id:?} in {}", args.data_dir.display())
            };
            match as_of {
                None => writeln!(out, "{}", serde_json::to_string_pretty(&r.to_json())?)?,
                Some(t) => {
                    let at = parse_time(&t)?;
                    let config = load_config(&args)?;
                    let history = store.history(&id)?;
                    let (state, complete) = crate::model::history::as_of(
                        &r,
                        &history,
                        at,
                        &config.handlers(),
                        &offline_settings(&config),
                    );
                    let json = serde_json::json!({
                        "entity_id": id,
                        "as_of": at,
                        "state": crate::model::value::fields_to_json(&state.fields),
                        "deleted": state.deleted,
                        "complete": complete,
                    });
                    writeln!(out, "{}", serde_json::to_string_pretty(&json)?)?;
                }
            }
        }
        StateCommand::Dump { store: args } => {
            let store = open_store(&args.data_dir)?;
            for r in store.entities() {
                let r = r?;
                // A forwarding stub is not state: the entity lives elsewhere.
                if r.placement.moved_to.is_none() {
                    writeln!(out, "{}", r.to_json())?;
                }
            }
        }
        StateCommand::History { id, store: args } => {
            let store = open_store(&args.data_dir)?;
            let Some(r) = store.load_entity(&id)? else {
                anyhow::bail!("no entity {id:?} in {}", args.data_dir.display())
            };
            let history = store.history(&id)?;
            if history.is_empty() {
                anyhow::bail!(
                    "entity {id:?} has no history: mark its event types `history = true`"
                );
            }
            let config = load_config(&args)?;
            let settings = offline_settings(&config);
            for v in crate::model::history::versions(&r, &history, &config.handlers(), &settings) {
                let json = serde_json::json!({
                    "occurred_at": v.entry.key.occurred_at,
                    "version": v.entry.key.version,
                    "event_id": v.entry.key.event_id,
                    "event_type": v.entry.event_type,
                    "provenance": v.entry.provenance,
                    "state": crate::model::value::fields_to_json(&v.state.fields),
                    "deleted": v.state.deleted,
                });
                writeln!(out, "{json}")?;
            }
        }
    }
    Ok(())
}

/// The settings offline replays (audit, history, `--as-of`) run handlers
/// under: the defaults. The log holds mapped payloads, so the built-in
/// reducer's result does not depend on them; a custom handler that reads
/// integration flags sees them unset.
pub(super) fn offline_settings(config: &Config) -> crate::settings::TenantView {
    crate::settings::TenantView::defaults(&config.policies())
}

pub(super) fn audit(a: AuditArgs) -> anyhow::Result<()> {
    use crate::audit::{self, Report};
    let config = load_config(&a.store)?;
    let handlers = config.handlers();
    let settings = offline_settings(&config);
    let store = open_store(&a.store.data_dir)?;
    let now = crate::telemetry::unix_ms(std::time::SystemTime::now());
    let mut report = Report {
        shard: a.shard.clone(),
        ..Report::default()
    };
    if let Some(id) = &a.entity {
        let Some(r) = store.load_entity(id)? else {
            anyhow::bail!("no entity {id:?} in {}", a.store.data_dir.display())
        };
        let (result, replayed) = audit::audit(&r, &store.history(id)?, &handlers, &settings);
        println!(
            "entity {id}: replayed from {:?}, {} field(s) differ",
            result.source,
            result.fields.len()
        );
        for f in &result.fields {
            println!("  {}: stored {} replayed {}", f.field, f.stored, f.replayed);
        }
        if a.repair && !result.fields.is_empty() {
            audit::repair(&store, &r, &replayed, &config.changes_topic, now)?;
            report.repaired += 1;
            println!("repaired {id}");
        }
        report.add(result);
    } else if a.all {
        let shard = a
            .shard
            .as_deref()
            .map(audit::parse_shard)
            .transpose()
            .map_err(anyhow::Error::msg)?;
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {pos} entities audited ({per_sec})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        for r in store.entities() {
            let r = r?;
            if let Some((i, n)) = shard {
                if crate::router::shard_of(&r.entity_id, n) != i {
                    continue;
                }
            }
            let (result, replayed) =
                audit::audit(&r, &store.history(&r.entity_id)?, &handlers, &settings);
            if a.repair && !result.fields.is_empty() {
                audit::repair(&store, &r, &replayed, &config.changes_topic, now)?;
                report.repaired += 1;
            }
            report.add(result);
            bar.inc(1);
        }
        bar.finish_and_clear();
        let json = serde_json::to_string_pretty(&report)?;
        match &a.report {
            Some(path) => {
                std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?
            }
            None => println!("{json}"),
        }
        eprintln!(
            "audited {} entities: {} differ in {} fields{}",
            report.entities_checked,
            report.entities_differing,
            report.fields_differing,
            if a.repair {
                format!(", {} repaired", report.repaired)
            } else {
                String::new()
            }
        );
    } else {
        anyhow::bail!("say which entities to audit: --entity <id> or --all");
    }
    if report.entities_differing > report.repaired {
        std::process::exit(3);
    }
    Ok(())
}

pub(super) fn dev_broker(a: DevBrokerArgs) -> anyhow::Result<()> {
    let broker = crate::tools::broker::EmbeddedBroker::start(a.brokers)
        .context("starting the embedded broker")?;
    for t in &a.topics {
        let (name, parts) = t.rsplit_once(':').unwrap_or((t.as_str(), "1"));
        let parts: i32 = parts
            .parse()
            .with_context(|| format!("--topic {t}: partitions must be a number"))?;
        broker
            .create_topic(name, parts)
            .with_context(|| format!("creating topic {name}"))?;
        eprintln!("created topic {name} with {parts} partitions");
    }
    println!("{}", broker.bootstrap_servers());
    std::io::stdout().flush()?;
    eprintln!("embedded broker running; press Ctrl-C to stop");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(tokio::signal::ctrl_c())?;
    Ok(())
}
