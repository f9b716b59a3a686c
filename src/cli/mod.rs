//! The `orderly` command line: argument parsing and one function per
//! subcommand. `src/main.rs` only installs the allocator and calls [`main`].
//!
//! - `run` and `demo` start the processor;
//! - `ops`: the commands that talk to a running instance's admin API, to
//!   Kafka or to the settings source (`dlq`, `partitions`, `settings`);
//! - `data`: the commands over data at rest or produced (`produce`, `bench`,
//!   `state`, `audit`, `dev-broker`).

mod data;
mod inspect;
mod ops;

use crate::config::{Config, Overrides};
use crate::pipeline::Pipeline;
use crate::tools::workload::Format;
use anyhow::Context as _;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use data::*;
use inspect::{config, doctor};
use ops::*;
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
    /// ORDERLY_KAFKA__SESSION_TIMEOUT_MS=...), then these flags. Besides the
    /// knobs below: content_type is auto|json|proto, shards=0 is one per
    /// core, derived_topic unset turns the observers off, default_reducer
    /// is set|inc|delete, [types."<event type>"] reducer=... sets a type's,
    /// [kafka] holds librdkafka properties of every client and
    /// [kafka.consumer] and [kafka.producer] those of one role. `orderly
    /// config` prints the result and where each value came from. Spans go
    /// to OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set.
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
    /// Print the effective configuration, one `key = value` per line with
    /// where it came from (default, file, env, flag); secrets are masked.
    ///
    /// Takes the same file, variables and flags as `run`.
    Config(RunArgs),
    /// Check a configuration before running it: librdkafka's version and
    /// built-in features (TLS, SASL, codecs), the properties each Kafka
    /// client receives (secrets masked), and whether the brokers answer
    /// and have the input topics.
    Doctor(DoctorArgs),
}

#[derive(Args)]
struct DoctorArgs {
    #[command(flatten)]
    run: RunArgs,
    /// Do not contact the brokers.
    #[arg(long)]
    no_connect: bool,
    /// Give up connecting after this many seconds.
    #[arg(long, default_value_t = 10)]
    timeout: u64,
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
    /// With --config or --brokers, partitions nobody owns are listed too.
    #[command(flatten)]
    kafka: KafkaArgs,
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
    /// A TOML config whose `[kafka]` tables the clients of `--brokers` get
    /// (security, compression); its other fields are not used.
    #[arg(long)]
    config: Option<std::path::PathBuf>,
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
    /// sled's cache for orderly's store, MiB (default: orderly's).
    #[arg(long)]
    store_cache_mb: Option<u64>,
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
    /// Measure the engine ceiling alone, for profiling the engine path.
    #[arg(long, conflicts_with = "no_ceilings")]
    engine_only: bool,
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
    /// Kafka bootstrap servers (overrides the config and ORDERLY_BROKERS).
    #[arg(long)]
    brokers: Option<String>,
    /// Input topic (overrides the config and ORDERLY_TOPIC).
    #[arg(long)]
    topic: Option<String>,
    /// Consumer group (overrides the config and ORDERLY_GROUP).
    #[arg(long)]
    group: Option<String>,
    /// sled data directory (overrides the config and ORDERLY_DATA_DIR).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

impl RunArgs {
    fn overrides(&self) -> Overrides {
        Overrides {
            brokers: self.brokers.clone(),
            topic: self.topic.clone(),
            group: self.group.clone(),
            data_dir: self.data_dir.clone(),
        }
    }
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

/// Where a CLI command finds Kafka: the config's brokers, topic and
/// `[kafka]` properties (ORDERLY_* variables apply as for `run`), with flags
/// over them.
#[derive(Args)]
struct KafkaArgs {
    /// TOML config file.
    #[arg(long, env = "ORDERLY_CONFIG")]
    config: Option<PathBuf>,
    /// Kafka bootstrap servers [config: brokers, default localhost:9092].
    #[arg(long)]
    brokers: Option<String>,
    /// The topic [config: topic, default orderly.events].
    #[arg(long)]
    topic: Option<String>,
}

impl KafkaArgs {
    /// The configuration these name, as `run` would load it.
    fn load(&self) -> anyhow::Result<Config> {
        let overrides = Overrides {
            brokers: self.brokers.clone(),
            topic: self.topic.clone(),
            ..Default::default()
        };
        Ok(Config::load(
            self.config.as_deref(),
            std::env::vars(),
            &overrides,
        )?)
    }
}

#[derive(Args)]
struct ProduceArgs {
    #[command(flatten)]
    kafka: KafkaArgs,
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

/// The command line, with every knob of `run` at its default appended to
/// `run`'s long help, from [`Config::default`].
fn command() -> clap::Command {
    let knobs = wrap(&crate::config::defaults_listing(), 78);
    Cli::command().mut_subcommand("run", |run| {
        let about = run.get_long_about().map(ToString::to_string);
        run.long_about(format!(
            "{}\n\nKnobs and their defaults:\n{knobs}",
            about.unwrap_or_default()
        ))
    })
}

/// `items` joined by ", " into lines of at most `width` columns (an item
/// longer than that gets a line of its own).
fn wrap(items: &[String], width: usize) -> String {
    let mut lines = vec![String::new()];
    for (i, item) in items.iter().enumerate() {
        let piece = if i + 1 < items.len() {
            format!("{item},")
        } else {
            item.clone()
        };
        let line = lines.last_mut().expect("one line at least");
        if line.is_empty() {
            line.push_str(&piece);
        } else if line.len() + 1 + piece.len() <= width {
            line.push(' ');
            line.push_str(&piece);
        } else {
            lines.push(piece);
        }
    }
    lines.join("\n")
}

/// Parses the arguments and runs the subcommand; exits 1 with the error on failure.
pub fn main() {
    let cli = Cli::from_arg_matches(&command().get_matches()).unwrap_or_else(|e| e.exit());
    let result = match cli.command {
        Command::Run(a) => run(a),
        Command::Demo(a) => crate::telemetry::init("demo", "warn")
            .map_err(anyhow::Error::from)
            .and_then(|t| {
                let r = crate::tools::demo::run(crate::tools::demo::DemoOptions {
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
        Command::Config(a) => config(a),
        Command::Doctor(a) => doctor(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(a: RunArgs) -> anyhow::Result<()> {
    let config = Config::load(a.config.as_deref(), std::env::vars(), &a.overrides())?;
    let telemetry = crate::telemetry::init(&config.instance_name(), "info")?;
    let handlers = config.handlers();
    let result = actix::System::new().block_on(async move {
        // The handlers first: a SIGTERM or SIGINT while the pipeline starts
        // (restoring partitions can take a while) waits for the start to
        // finish, then drains like any other, instead of killing the
        // process with the signal's default action.
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let admin_addr = config.admin_addr.clone();
        let admin_token = config.resolved_admin_token()?;
        let pipeline = Pipeline::start(config, handlers)?;
        let admin = if admin_addr.is_empty() {
            None
        } else {
            Some(
                crate::admin::start(pipeline.control(), &admin_addr, admin_token).with_context(
                    || format!("starting the admin server on {admin_addr} (admin_addr)"),
                )?,
            )
        };
        let fatal = pipeline.fatal();
        tokio::select! {
            _ = int.recv() => tracing::info!("SIGINT: draining and checkpointing"),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `orderly run --help` lists every knob at its default, made from
    /// `Config::default`, one whole `name=value` per item.
    #[test]
    fn run_help_lists_every_knob_at_its_default() {
        let mut cli = command();
        let help = cli
            .find_subcommand_mut("run")
            .unwrap()
            .render_long_help()
            .to_string();
        let listing = crate::config::defaults_listing();
        assert_eq!(listing.len(), crate::config::FIELDS.len());
        for item in &listing {
            assert!(help.contains(item.as_str()), "`{item}` is not in:\n{help}");
        }
        assert!(help.contains(&format!("batch_max={}", Config::default().batch_max)));
        let knobs = help.split("Knobs and their defaults:\n").nth(1).unwrap();
        let knobs = knobs.split("\n\n").next().unwrap();
        assert!(knobs.lines().all(|l| l.chars().count() <= 78), "{knobs}");
    }

    #[test]
    fn wrap_keeps_items_whole_within_the_width() {
        let items: Vec<String> = ["a=1", "bb=22", "ccc=333", "a_long_one=4444"]
            .map(String::from)
            .into();
        assert_eq!(wrap(&items, 12), "a=1, bb=22,\nccc=333,\na_long_one=4444");
        assert_eq!(wrap(&items, 80), "a=1, bb=22, ccc=333, a_long_one=4444");
        assert_eq!(wrap(&[], 80), "");
    }
}
