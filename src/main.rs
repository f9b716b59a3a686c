//! The `orderly` command line.

// The hot path allocates and frees entity records, events and write intents
// across threads; glibc malloc spent a third of the CPU there (perf).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use orderly::config::{Config, Overrides};
use orderly::pipeline::Pipeline;
use orderly::store::{SledStore, Store};
use orderly::workload::{self, Format, ProduceOptions, Workload, WorkloadSpec};
use std::io::Write as _;
use std::path::PathBuf;

/// orderly: Kafka -> one actor per entity -> sled, with offsets checkpointed with the state.
#[derive(Parser)]
#[command(name = "orderly", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the processor (production mode).
    ///
    /// Configuration is layered: defaults, then the TOML file (--config or
    /// ORDERLY_CONFIG), then ORDERLY_* variables (ORDERLY_BATCH_MAX=...,
    /// ORDERLY_KAFKA__SESSION_TIMEOUT_MS=...), then these flags. Knobs and
    /// defaults: brokers=localhost:9092, topic=orderly.events, group=orderly,
    /// data_dir=orderly-data, dead_letter_topic=orderly.dead-letters,
    /// derived_topic (unset: observers off),
    /// content_type=auto (auto|json|proto), shards=0 (one per core),
    /// idle_timeout_ms=60000, retention_events=32, batch_max=4096,
    /// in_flight_high=50000, in_flight_low=25000, drain_timeout_ms=30000,
    /// shutdown_grace_ms=30000, store_cache_mb=256, default_reducer=set
    /// (set|inc|delete), [types."<event type>"] reducer=..., [kafka] extra
    /// librdkafka consumer properties. Spans go to OTLP when
    /// OTEL_EXPORTER_OTLP_ENDPOINT is set.
    Run(RunArgs),
    /// Run the whole pipeline on an embedded broker with a synthetic CRM workload.
    Demo(DemoArgs),
    /// Produce the synthetic CRM workload to any Kafka-protocol broker.
    Produce(ProduceArgs),
    /// Read entity state from a data dir (offline: stop `orderly run` first).
    State {
        #[command(subcommand)]
        command: StateCommand,
    },
    /// Run the embedded Kafka-protocol broker stand-alone and print its address.
    DevBroker(DevBrokerArgs),
    /// Dead letters of a running orderly, through its admin API.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Replay entities' events in order and compare with the stored state (offline).
    ///
    /// Exit status: 0 when every audited entity matches (or was repaired),
    /// 3 when differences were found and not repaired.
    Audit(AuditArgs),
    /// Benchmark a scenario: ceilings, end-to-end drain rate, latency and
    /// reliability, with a table, report.json and report.svg.
    ///
    /// Built-in scenarios (bench/*.toml): smoke, steady, max, soak, hot-keys,
    /// late-heavy, failures. Flags override the scenario's fields.
    Bench(BenchArgs),
    /// Every partition of a group: its owner, entities, checkpoint, lag and
    /// changelog position, gathered from each instance's admin API.
    ///
    /// Pass every instance's admin URL (`--admin` repeated). With `--brokers`
    /// and `--topic`, partitions nobody owns are listed too.
    Partitions(PartitionsArgs),
    /// Tenant settings: print a tenant's document in force, or validate one
    /// and write it to the settings topic.
    Settings {
        #[command(subcommand)]
        command: SettingsCommand,
    },
}

#[derive(Subcommand)]
enum SettingsCommand {
    /// Print the tenant's settings in force, read from the configured source.
    Get {
        /// The tenant id.
        tenant: String,
        #[command(flatten)]
        source: SettingsArgs,
    },
    /// Validate a document (JSON or protobuf `orderly.v1.TenantSettings`)
    /// and produce it to the settings topic, keyed by the tenant. Without a
    /// `version`, it gets the one after the version in force.
    Put {
        /// The tenant id.
        tenant: String,
        /// The document.
        file: PathBuf,
        #[command(flatten)]
        source: SettingsArgs,
    },
}

#[derive(Args)]
struct PartitionsArgs {
    /// An instance's admin API base URL; repeat for each instance.
    #[arg(long, required = true)]
    admin: Vec<String>,
    /// Kafka bootstrap servers, to list unowned partitions too.
    #[arg(long)]
    brokers: Option<String>,
    /// The input topic, with --brokers.
    #[arg(long)]
    topic: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct SettingsArgs {
    /// TOML config file (its `[settings]` section names the source).
    #[arg(long, env = "ORDERLY_CONFIG")]
    config: Option<PathBuf>,
    /// Kafka bootstrap servers (overrides the config).
    #[arg(long)]
    brokers: Option<String>,
    /// The settings topic (overrides the config, and selects source `topic`).
    #[arg(long)]
    settings_topic: Option<String>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
}

#[derive(Args)]
struct BenchArgs {
    /// A built-in scenario name, or a scenario TOML file.
    #[arg(long, default_value = "smoke")]
    scenario: String,
    /// A Kafka-protocol broker to run against; default: the embedded one.
    #[arg(long)]
    brokers: Option<String>,
    /// Where to write report.json and report.svg.
    #[arg(long, default_value = "bench-results")]
    out: std::path::PathBuf,
    /// Messages to produce.
    #[arg(long)]
    events: Option<u64>,
    /// Distinct entities.
    #[arg(long)]
    entities: Option<u64>,
    /// Partitions of the input topic.
    #[arg(long)]
    partitions: Option<i32>,
    /// Open loop at this many events/s (0: closed loop).
    #[arg(long)]
    rate: Option<f64>,
    /// Open-loop duration, s.
    #[arg(long)]
    duration: Option<f64>,
    /// Payload size of set events, bytes.
    #[arg(long)]
    payload_bytes: Option<usize>,
    /// Zipf exponent of the key choice.
    #[arg(long)]
    zipf: Option<f64>,
    /// Share of late events.
    #[arg(long)]
    late_ratio: Option<f64>,
    /// Share of duplicate messages.
    #[arg(long)]
    duplicate_ratio: Option<f64>,
    /// Share of events rejected for good.
    #[arg(long)]
    failure_ratio: Option<f64>,
    /// Recorded events (JSON Lines of envelopes) instead of the synthetic workload.
    #[arg(long)]
    input: Option<std::path::PathBuf>,
    /// Skip the ceilings (bare consumer, store, engine).
    #[arg(long)]
    no_ceilings: bool,
}

#[derive(Args)]
struct AdminArgs {
    /// The admin API's base URL.
    #[arg(
        long,
        env = "ORDERLY_ADMIN_URL",
        default_value = "http://127.0.0.1:8089"
    )]
    admin: String,
    /// The bearer token for mutating calls.
    #[arg(long, env = "ORDERLY_ADMIN_TOKEN")]
    token: Option<String>,
}

#[derive(Args, Default)]
struct DlqFilter {
    /// Only this entity's dead letters.
    #[arg(long)]
    entity: Option<String>,
    /// Only this event type's.
    #[arg(long = "type")]
    event_type: Option<String>,
    /// Only this reason code's (bad_json, handler_permanent, ...).
    #[arg(long)]
    code: Option<String>,
}

impl DlqFilter {
    fn query(&self) -> Vec<(&'static str, String)> {
        [
            ("entity", &self.entity),
            ("type", &self.event_type),
            ("code", &self.code),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.clone().map(|v| (k, v)))
        .collect()
    }
}

#[derive(Subcommand)]
enum DlqCommand {
    /// List dead letters, oldest first, as JSON Lines.
    List {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(flatten)]
        filter: DlqFilter,
        /// Only with this status: open, retried or skipped.
        #[arg(long)]
        status: Option<String>,
        /// Start after this id.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Process dead letters again, through their entities' actors.
    Retry(DlqTarget),
    /// Mark dead letters skipped.
    Skip(DlqTarget),
}

/// Which dead letters `dlq retry` and `dlq skip` act on.
#[derive(Args)]
struct DlqTarget {
    /// The dead letter's id.
    #[arg(required_unless_present = "all")]
    id: Option<u64>,
    /// Every open dead letter matching the filters.
    #[arg(long)]
    all: bool,
    #[command(flatten)]
    admin: AdminArgs,
    #[command(flatten)]
    filter: DlqFilter,
}

#[derive(Args)]
struct StoreArgs {
    /// sled data directory.
    #[arg(long, env = "ORDERLY_DATA_DIR", default_value = "orderly-data")]
    data_dir: PathBuf,
    /// TOML config file, for the event types' reducers and policies.
    #[arg(long, env = "ORDERLY_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Args)]
struct AuditArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Audit one entity and print its differences field by field.
    #[arg(long, conflicts_with = "all")]
    entity: Option<String>,
    /// Audit every entity (or one shard of them) and write a JSON report.
    #[arg(long)]
    all: bool,
    /// With --all: only the entities of shard i of n (by a hash of the id), as i/n.
    #[arg(long, requires = "all")]
    shard: Option<String>,
    /// Write the replayed state where it differs, with a correction record.
    #[arg(long)]
    repair: bool,
    /// With --all: where to write the JSON report (default: stdout).
    #[arg(long)]
    report: Option<PathBuf>,
}

#[derive(Args)]
struct RunArgs {
    /// TOML config file.
    #[arg(long, env = "ORDERLY_CONFIG")]
    config: Option<PathBuf>,
    /// Kafka bootstrap servers (overrides the config).
    #[arg(long)]
    brokers: Option<String>,
    /// Input topic (overrides the config).
    #[arg(long)]
    topic: Option<String>,
    /// Consumer group (overrides the config).
    #[arg(long)]
    group: Option<String>,
    /// sled data directory (overrides the config).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

#[derive(Args)]
struct DemoArgs {
    /// Events to produce.
    #[arg(long, default_value_t = 20_000)]
    events: u64,
    /// Distinct entities.
    #[arg(long, default_value_t = 1_000)]
    entities: u64,
    /// Workload seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Keep processing after the summary until Ctrl-C.
    #[arg(long)]
    keep_running: bool,
    /// Keep the state in this directory instead of a temporary one.
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

#[derive(Args)]
struct ProduceArgs {
    /// Kafka bootstrap servers.
    #[arg(long, env = "ORDERLY_BROKERS", default_value = "localhost:9092")]
    brokers: String,
    /// Topic to write to.
    #[arg(long, env = "ORDERLY_TOPIC", default_value = "orderly.events")]
    topic: String,
    /// Messages to produce, duplicates included.
    #[arg(long, default_value_t = 20_000)]
    events: u64,
    /// Events per second (0 = as fast as possible).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Distinct entities.
    #[arg(long, default_value_t = 1_000)]
    entities: u64,
    /// Tenants.
    #[arg(long, default_value_t = 3)]
    tenants: u64,
    /// Share of events that arrive after a newer event of their entity.
    #[arg(long, default_value_t = 0.05)]
    late_ratio: f64,
    /// Share of messages that repeat an earlier event.
    #[arg(long, default_value_t = 0.01)]
    duplicate_ratio: f64,
    /// Wire format.
    #[arg(long, value_enum, default_value = "proto")]
    format: Format,
    /// Seed, for a reproducible stream.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

#[derive(Subcommand)]
enum StateCommand {
    /// Print one entity's state, provenance and counters as JSON.
    Get {
        /// The entity id.
        id: String,
        /// The state as of this time instead (ms since the Unix epoch, or RFC 3339
        /// such as 2026-11-23T10:00:00Z): the fold of the events that occurred by then.
        #[arg(long)]
        as_of: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Print every entity as JSON Lines (not the forwarding stubs of
    /// entities that moved to a partition another instance owns).
    Dump {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Print an entity's versions, one JSON line per event, in order-key order.
    History {
        /// The entity id.
        id: String,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Args)]
struct DevBrokerArgs {
    /// Topics to create, as name:partitions (repeatable).
    #[arg(long = "topic", default_values_t = ["orderly.events:8".to_string(), "orderly.dead-letters:1".to_string()])]
    topics: Vec<String>,
    /// Number of brokers in the cluster.
    #[arg(long, default_value_t = 1)]
    brokers: i32,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(a) => run(a),
        Command::Demo(a) => orderly::telemetry::init("demo", "warn")
            .map_err(anyhow::Error::from)
            .and_then(|t| {
                let r = orderly::demo::run(orderly::demo::DemoOptions {
                    events: a.events,
                    entities: a.entities,
                    seed: a.seed,
                    keep_running: a.keep_running,
                    data_dir: a.data_dir,
                });
                t.shutdown();
                r.map(|_| ())
            }),
        Command::Produce(a) => produce(a),
        Command::State { command } => state(command),
        Command::DevBroker(a) => dev_broker(a),
        Command::Audit(a) => audit(a),
        Command::Bench(a) => bench(a),
        Command::Dlq { command } => dlq(command),
        Command::Settings { command } => settings(command),
        Command::Partitions(a) => partitions(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(a: RunArgs) -> anyhow::Result<()> {
    let overrides = Overrides {
        brokers: a.brokers,
        topic: a.topic,
        group: a.group,
        data_dir: a.data_dir,
    };
    let config = Config::load(a.config.as_deref(), std::env::vars(), &overrides)?;
    let instance = format!("{}-{}", config.group, std::process::id());
    let telemetry = orderly::telemetry::init(&instance, "info")?;
    let handlers = config.handlers();
    let result = actix::System::new().block_on(async move {
        let admin_addr = config.admin_addr.clone();
        let admin_token = config.admin_token.clone();
        let pipeline = Pipeline::start(config, handlers)?;
        let admin = if admin_addr.is_empty() {
            None
        } else {
            Some(
                orderly::admin::start(pipeline.control(), &admin_addr, admin_token).with_context(
                    || format!("starting the admin server on {admin_addr} (admin_addr)"),
                )?,
            )
        };
        let fatal = pipeline.fatal();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: draining and checkpointing"),
            _ = term.recv() => tracing::info!("SIGTERM: draining and checkpointing"),
            reason = fatal.raised() => tracing::error!(%reason, "stopping"),
        }
        pipeline.shutdown()?;
        if let Some(a) = admin {
            a.stop(true).await;
        }
        Ok::<_, anyhow::Error>(())
    });
    telemetry.shutdown();
    result
}

fn admin_call(
    admin: &AdminArgs,
    method: reqwest::Method,
    path: &str,
    query: &[(&str, String)],
) -> anyhow::Result<serde_json::Value> {
    let client = reqwest::blocking::Client::new();
    let mut req = client
        .request(
            method,
            format!("{}{path}", admin.admin.trim_end_matches('/')),
        )
        .query(query);
    if let Some(t) = &admin.token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().with_context(|| {
        format!(
            "calling the admin API at {} (is orderly run up? --admin)",
            admin.admin
        )
    })?;
    let status = resp.status();
    let body: serde_json::Value = resp.json().unwrap_or_default();
    if !status.is_success() {
        anyhow::bail!(
            "{status}: {}",
            body["error"].as_str().unwrap_or("no details")
        );
    }
    Ok(body)
}

fn dlq(cmd: DlqCommand) -> anyhow::Result<()> {
    match cmd {
        DlqCommand::List {
            admin,
            filter,
            status,
            after,
            limit,
        } => {
            let mut q = filter.query();
            q.push(("after", after.to_string()));
            q.push(("limit", limit.to_string()));
            if let Some(s) = status {
                q.push(("status", s));
            }
            let body = admin_call(&admin, reqwest::Method::GET, "/api/dead-letters", &q)?;
            for item in body["items"].as_array().into_iter().flatten() {
                println!("{item}");
            }
            if let Some(next) = body["next_after"].as_u64() {
                eprintln!("more: --after {next}");
            }
        }
        DlqCommand::Retry(t) => dlq_act("retry", &t)?,
        DlqCommand::Skip(t) => dlq_act("skip", &t)?,
    }
    Ok(())
}

fn dlq_act(verb: &str, target: &DlqTarget) -> anyhow::Result<()> {
    let DlqTarget {
        id,
        all,
        admin,
        filter,
    } = target;
    let body = match (*all, *id) {
        (true, _) => admin_call(
            admin,
            reqwest::Method::POST,
            &format!("/api/dead-letters/{verb}-all"),
            &filter.query(),
        )?,
        (false, Some(id)) => admin_call(
            admin,
            reqwest::Method::POST,
            &format!("/api/dead-letters/{id}/{verb}"),
            &[],
        )?,
        (false, None) => anyhow::bail!("name a dead letter id, or --all"),
    };
    println!("{body}");
    Ok(())
}

fn produce(a: ProduceArgs) -> anyhow::Result<()> {
    // Producer spans (and traceparent headers) when OTEL_EXPORTER_OTLP_ENDPOINT is set.
    let telemetry = orderly::telemetry::init("producer", "warn")?;
    let result = produce_workload(a);
    telemetry.shutdown();
    result
}

fn produce_workload(a: ProduceArgs) -> anyhow::Result<()> {
    let spec = WorkloadSpec {
        events: a.events,
        entities: a.entities,
        tenants: a.tenants,
        late_ratio: a.late_ratio,
        duplicate_ratio: a.duplicate_ratio,
        seed: a.seed,
        ..WorkloadSpec::default()
    };
    let opts = ProduceOptions {
        brokers: a.brokers,
        topic: a.topic.clone(),
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
    .with_context(|| format!("producing to {} on {}", a.topic, opts.brokers))?;
    bar.finish_and_clear();
    println!("produced {n} events to {}", a.topic);
    Ok(())
}

fn bench(a: BenchArgs) -> anyhow::Result<()> {
    // Dead letters are part of some scenarios: only errors are logged.
    let _telemetry = orderly::telemetry::init("bench", "error")?;
    let mut s = orderly::bench::Scenario::load(&a.scenario)?;
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
        failure_ratio = a.failure_ratio
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
    orderly::bench::run(&s, a.brokers, &a.out)?;
    Ok(())
}

fn open_store(dir: &std::path::Path) -> anyhow::Result<SledStore> {
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

fn partitions(a: PartitionsArgs) -> anyhow::Result<()> {
    use std::collections::BTreeMap;
    // (topic, partition) -> rows from each instance that owns or holds it.
    let mut rows: BTreeMap<(String, i64), Vec<serde_json::Value>> = BTreeMap::new();
    let mut problems = Vec::new();
    for url in &a.admin {
        let args = AdminArgs {
            admin: url.clone(),
            token: None,
        };
        match admin_call(&args, reqwest::Method::GET, "/api/partitions", &[]) {
            Ok(body) => {
                let instance = body["instance"].as_str().unwrap_or(url).to_owned();
                for p in body["partitions"].as_array().into_iter().flatten() {
                    let mut p = p.clone();
                    p["owner"] = serde_json::json!(instance);
                    let k = (
                        p["topic"].as_str().unwrap_or_default().to_owned(),
                        p["partition"].as_i64().unwrap_or(-1),
                    );
                    rows.entry(k).or_default().push(p);
                }
            }
            Err(e) => problems.push(format!("{url}: {e}")),
        }
    }
    if let (Some(brokers), Some(topic)) = (&a.brokers, &a.topic) {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let c: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create()?;
        let md = c.fetch_metadata(Some(topic), std::time::Duration::from_secs(10))?;
        for t in md.topics().iter().filter(|t| t.name() == topic) {
            for p in t.partitions() {
                rows.entry((topic.clone(), i64::from(p.id()))).or_default();
            }
        }
    }
    if a.json {
        let all: Vec<_> = rows.values().flatten().cloned().collect();
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else {
        println!(
            "{:<28} {:>9}  {:<24} {:>9} {:>11} {:>8} {:>11}",
            "topic", "partition", "owner", "entities", "checkpoint", "lag", "changelog"
        );
        let s = |v: &serde_json::Value| match v {
            serde_json::Value::Null => "-".to_owned(),
            v => v.to_string(),
        };
        for ((topic, partition), held) in &rows {
            let owner = held.iter().find(|p| p["assigned"] == true);
            let stale: Vec<&str> = held
                .iter()
                .filter(|p| p["assigned"] != true)
                .filter_map(|p| p["owner"].as_str())
                .collect();
            let (name, p) = match owner {
                Some(p) => (p["owner"].as_str().unwrap_or("?").to_owned(), Some(p)),
                None => ("(unassigned)".to_owned(), None),
            };
            let f = |k: &str| p.map(|p| s(&p[k])).unwrap_or_else(|| "-".into());
            println!(
                "{topic:<28} {partition:>9}  {name:<24} {:>9} {:>11} {:>8} {:>11}{}",
                f("entities"),
                f("checkpoint"),
                f("lag"),
                f("changelog_position"),
                if stale.is_empty() {
                    String::new()
                } else {
                    format!("  (also held by {}, to be purged)", stale.join(", "))
                }
            );
        }
    }
    if !problems.is_empty() {
        anyhow::bail!("some instances did not answer: {}", problems.join("; "));
    }
    Ok(())
}

fn settings(cmd: SettingsCommand) -> anyhow::Result<()> {
    use orderly::settings::SettingsSource;
    let (SettingsCommand::Get { source, .. } | SettingsCommand::Put { source, .. }) = &cmd;
    let overrides = Overrides {
        brokers: source.brokers.clone(),
        ..Overrides::default()
    };
    let mut config = Config::load(source.config.as_deref(), std::env::vars(), &overrides)?;
    if let Some(t) = &source.settings_topic {
        config.settings.source = SettingsSource::Topic;
        config.settings.topic = t.clone();
    }
    if config.settings.source == SettingsSource::None {
        anyhow::bail!(
            "no settings source is configured: set settings.source (\"topic\" or \"http\") or pass --settings-topic"
        );
    }
    let timeout = std::time::Duration::from_secs(source.timeout);
    match &cmd {
        SettingsCommand::Get { tenant, .. } => {
            let registry =
                orderly::settings::load_once(&config, timeout).map_err(anyhow::Error::msg)?;
            let Some(view) = registry.get(tenant) else {
                anyhow::bail!("tenant {tenant:?} has no settings: the defaults apply")
            };
            let doc = view
                .current()
                .document()
                .context("settings in force always have a document")?;
            println!("{}", serde_json::to_string_pretty(doc)?);
        }
        SettingsCommand::Put { tenant, file, .. } => {
            let bytes =
                std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
            let (doc, partition, offset) = orderly::settings::put(&config, tenant, &bytes, timeout)
                .map_err(anyhow::Error::msg)?;
            println!(
                "tenant {tenant}: version {} written to {} partition {partition} offset {offset}",
                doc.version, config.settings.topic
            );
        }
    }
    Ok(())
}

fn load_config(store: &StoreArgs) -> anyhow::Result<Config> {
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

fn parse_time(text: &str) -> anyhow::Result<i64> {
    if let Ok(ms) = text.parse::<i64>() {
        return Ok(ms);
    }
    let t = humantime::parse_rfc3339_weak(text).with_context(|| {
        format!("--as-of {text:?}: expected ms since the Unix epoch or an RFC 3339 time")
    })?;
    Ok(orderly::telemetry::unix_ms(t))
}

fn state(cmd: StateCommand) -> anyhow::Result<()> {
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
                    let (state, complete) = orderly::history::as_of(
                        &r,
                        &history,
                        at,
                        &config.handlers(),
                        &offline_settings(&config),
                    );
                    let json = serde_json::json!({
                        "entity_id": id,
                        "as_of": at,
                        "state": orderly::value::fields_to_json(&state.fields),
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
                if r.moved_to.is_none() {
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
            for v in orderly::history::versions(&r, &history, &config.handlers(), &settings) {
                let json = serde_json::json!({
                    "occurred_at": v.entry.key.occurred_at,
                    "version": v.entry.key.version,
                    "event_id": v.entry.key.event_id,
                    "event_type": v.entry.event_type,
                    "provenance": v.entry.provenance,
                    "state": orderly::value::fields_to_json(&v.state.fields),
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
fn offline_settings(config: &Config) -> orderly::settings::TenantView {
    orderly::settings::TenantView::defaults(&config.policies())
}

fn audit(a: AuditArgs) -> anyhow::Result<()> {
    use orderly::audit::{self, Report};
    let config = load_config(&a.store)?;
    let handlers = config.handlers();
    let settings = offline_settings(&config);
    let store = open_store(&a.store.data_dir)?;
    let now = orderly::telemetry::unix_ms(std::time::SystemTime::now());
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
                if orderly::router::shard_of(&r.entity_id, n) != i {
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

fn dev_broker(a: DevBrokerArgs) -> anyhow::Result<()> {
    let broker = orderly::broker::EmbeddedBroker::start(a.brokers)
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
