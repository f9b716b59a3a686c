//! Configuration: defaults, a TOML file, `ORDERLY_*` environment variables,
//! and command-line flags, applied in that order.
//!
//! Every knob has a default that works in `orderly demo`. An invalid value
//! fails at start with the field's name. Environment variables map to
//! top-level fields by upper-casing: `ORDERLY_IN_FLIGHT_HIGH=1000` sets
//! `in_flight_high`, and `ORDERLY_KAFKA__SESSION_TIMEOUT_MS=6000` sets the
//! librdkafka property `session.timeout.ms` (a double underscore enters a
//! table; in `kafka`, single underscores become dots:
//! `ORDERLY_KAFKA__PRODUCER__LINGER_MS` is `[kafka.producer] linger.ms`).
//! A variable's value is typed by the field it sets, so a string field
//! takes `123456` as a string. [`Config::load_traced`] also tells where each
//! value came from (`orderly config`).

mod defaults;
pub mod kafka;
mod origin;
#[cfg(test)]
mod tests;

pub use defaults::*;
pub use kafka::{Assignor, KafkaConfig};
pub use origin::{Loaded, Origin};

use crate::model::envelope::ContentType;
use crate::model::handler::ReduceOp;
use crate::model::ordering::{LatePolicy, Policies, TooLatePolicy};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where tenant settings come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SettingsSource {
    /// No settings: every tenant gets the defaults.
    #[default]
    None,
    /// A compacted Kafka topic keyed by tenant id.
    Topic,
    /// An HTTP endpoint, polled with conditional requests.
    Http,
}

/// The `[settings]` section of the configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SettingsConfig {
    /// `none`, `topic` or `http`.
    pub source: SettingsSource,
    /// The compacted settings topic (source `topic`).
    pub topic: String,
    /// The endpoint serving every tenant's document (source `http`): a JSON
    /// array of documents, or `{"tenants": [...]}`.
    pub url: String,
    /// Source `http`: how long a fetched copy is trusted before it is
    /// revalidated with a conditional request, in ms. A changed document is
    /// picked up within this interval.
    pub ttl_ms: u64,
}

impl Default for SettingsConfig {
    fn default() -> Self {
        SettingsConfig {
            source: SettingsSource::None,
            topic: "orderly.settings".into(),
            url: String::new(),
            ttl_ms: 30_000,
        }
    }
}

/// A configuration error, naming the field or the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TOML is malformed or a field has the wrong type or name.
    #[error("invalid configuration: {0}")]
    Parse(String),
    /// A field's value is out of range.
    #[error("invalid configuration: field `{field}`: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
}

/// Per event type settings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TypeConfig {
    /// The built-in reducer's operation for this type.
    pub reducer: ReduceOp,
    /// What to do with a late event of this type (default: `default_late_policy`).
    pub late_policy: Option<LatePolicy>,
    /// What to do with a too-late event of this type (default: `default_too_late_policy`).
    pub too_late_policy: Option<TooLatePolicy>,
    /// Keep every version of the entity that events of this type produce.
    pub history: bool,
    /// After a permanent failure, or when retries run out: `skip` the event
    /// (dead-letter it and go on) or `park` the entity until an operator acts.
    pub on_failure: FailurePolicy,
}

/// What to do with an event whose handler failed for good.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailurePolicy {
    /// Dead-letter the event and process the entity's next events.
    #[default]
    Skip,
    /// Dead-letter the event and hold the entity's later events until an
    /// operator releases it (the failed event is retried first) or skips it.
    Park,
}

/// orderly's configuration. See the README's configuration reference.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Kafka bootstrap servers.
    pub brokers: String,
    /// The input topic; keys are entity ids.
    pub topic: String,
    /// The consumer group.
    pub group: String,
    /// The directory of the sled store.
    pub data_dir: PathBuf,
    /// Where dead letters are published.
    pub dead_letter_topic: String,
    /// Where observers publish derived events (keyed by their target entity);
    /// orderly consumes it too. Unset: observers are not run.
    pub derived_topic: Option<String>,
    /// The wire format of input messages.
    pub content_type: ContentType,
    /// Number of shards (actix Arbiters, one thread each); 0 means one per core.
    pub shards: usize,
    /// Idle time after which an entity actor is passivated, in ms.
    pub idle_timeout_ms: u64,
    /// Events kept in each entity's log for re-folding late events.
    pub retention_events: usize,
    /// Also fold log entries this much older (by occurred_at) than the
    /// entity's newest event into the base snapshot; unset keeps by count only.
    pub retention_ms: Option<u64>,
    /// The late policy of types that set none: recompute, apply, drop or park.
    pub default_late_policy: LatePolicy,
    /// The too-late policy of types that set none: drop, apply or park.
    pub default_too_late_policy: TooLatePolicy,
    /// Where change records (one per applied event, corrections included)
    /// are published; empty disables them.
    pub changes_topic: String,
    /// Where anomaly records (duplicates, late and too-late events) are
    /// published; empty disables publishing (they are still stored).
    pub anomalies_topic: String,
    /// Anomaly records kept in the store; older ones are removed.
    pub anomalies_retained: u64,
    /// Built-in observers to run: `tenant_conversions`.
    pub observers: Vec<String>,
    /// An event still being handled after this long is reported as stalled, in ms.
    pub stall_deadline_ms: u64,
    /// Where the admin HTTP server listens (health, readiness, dead letters,
    /// parked entities); empty: no server. Loopback by default: expose it
    /// deliberately.
    pub admin_addr: String,
    /// The bearer token that mutating admin calls must carry. Unset: every
    /// mutating call is refused.
    pub admin_token: Option<String>,
    /// A file that holds the admin token (a mounted Secret, say), read at
    /// start; surrounding whitespace is ignored. Set this or `admin_token`.
    pub admin_token_file: Option<PathBuf>,
    /// Attempts for an event whose handler fails transiently, the first included.
    pub retry_max_attempts: u32,
    /// The first retry's delay, in ms; each later one doubles, with jitter
    /// (a random delay between half and all of it).
    pub retry_initial_ms: u64,
    /// The longest delay between attempts, in ms.
    pub retry_max_ms: u64,
    /// Most writer messages in one store batch: one event's write intent,
    /// or a burst of up to 256 of one entity's, sent together when its
    /// deliveries queue up (its record is then encoded once).
    pub batch_max: usize,
    /// Pause consumption when this many events are received but not durable.
    pub in_flight_high: usize,
    /// Resume consumption when in-flight events fall below this.
    pub in_flight_low: usize,
    /// Pause consumption when the events received but not durable hold this
    /// many MiB: their messages (key, value, headers) and the copies of
    /// their entities' records waiting for the writer. Bounds memory however
    /// large the messages are, where `in_flight_high` counts them.
    pub in_flight_mb_high: u64,
    /// Resume consumption when in-flight bytes fall below this many MiB.
    pub in_flight_mb_low: u64,
    /// How long a revoked partition may take to drain before it is released, in ms.
    pub drain_timeout_ms: u64,
    /// How long shutdown may take to drain and checkpoint, in ms.
    pub shutdown_grace_ms: u64,
    /// sled page cache size, in MiB.
    pub store_cache_mb: u64,
    /// How often librdkafka reports statistics (consumer lag per partition), in ms.
    pub stats_interval_ms: u64,
    /// Most entity actors alive at once; beyond it the least recently used
    /// idle ones are passivated (their state stays in the store).
    pub max_actors: usize,
    /// Most events a parked entity holds until an operator releases it;
    /// later ones are dead-lettered (`held_limit`), so its record stays
    /// bounded.
    pub max_held_events: usize,
    /// Most MiB the records of live entity actors may take (measured as
    /// their encoded size); beyond it the least recently used idle ones are
    /// passivated, so entities with large records cannot fill memory below
    /// `max_actors`.
    pub actors_mb: u64,
    /// The reducer for event types not listed in `types`.
    pub default_reducer: ReduceOp,
    /// Settings per event type.
    pub types: BTreeMap<String, TypeConfig>,
    /// librdkafka properties of every client (`[kafka]`), and per role
    /// (`[kafka.consumer]`, `[kafka.producer]`); see [`kafka`].
    pub kafka: KafkaConfig,
    /// The source's partition assignor: `cooperative-sticky` (incremental
    /// rebalances: only the partitions that move stop), `range` or
    /// `roundrobin`.
    pub assignor: Assignor,
    /// Where tenant settings come from (`[settings]`).
    pub settings: SettingsConfig,
    /// Turns the changelog on: every entity record made durable is also
    /// written to `<input topic><changelog_suffix>` (compacted, as many
    /// partitions as the input), so a partition's state can move to another
    /// instance. Empty: no changelog (one instance per group only).
    pub changelog_suffix: String,
    /// This instance's static group membership id (`group.instance.id`):
    /// a restart within the session timeout keeps its partitions. Unset:
    /// dynamic membership.
    pub instance_id: Option<String>,
    /// With the changelog on, the state of a partition this instance no
    /// longer owns is removed once the assignment has not changed for this
    /// long, in ms.
    pub purge_after_ms: u64,
    /// The partitioner the producers of the input topics use: `murmur2`
    /// (the Java client's default) or `consistent_random` (librdkafka's).
    /// When an entity's events arrive on two partitions (partitions were
    /// added, or the producers' partitioner changed), its state moves to the
    /// partition this partitioner gives for the current partition count.
    /// The producer of orderly's outbox (derived events, changes, dead
    /// letters) uses it too; `orderly produce` uses librdkafka's default.
    pub partitioner: crate::partitioner::Partitioner,
}

/// The changelog, when it is on: how its topics are named.
///
/// [`Config::changelog`] gives it; `None` means the changelog is off, and so
/// are restore, the follower, purging and key moves across instances.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangelogConfig {
    /// Appended to an input topic's name to name its changelog; never empty.
    pub suffix: String,
}

impl ChangelogConfig {
    /// The changelog topic of input topic `input`: `<input><suffix>`.
    pub fn topic_of(&self, input: &str) -> String {
        format!("{input}{}", self.suffix)
    }
}

impl Default for Config {
    fn default() -> Self {
        let in_flight_high = default_in_flight_high();
        Config {
            brokers: "localhost:9092".into(),
            topic: "orderly.events".into(),
            group: "orderly".into(),
            data_dir: PathBuf::from("orderly-data"),
            dead_letter_topic: "orderly.dead-letters".into(),
            derived_topic: None,
            content_type: ContentType::Auto,
            shards: 0,
            idle_timeout_ms: default_idle_timeout_ms(),
            retention_events: default_retention_events(),
            retention_ms: None,
            default_late_policy: LatePolicy::Recompute,
            default_too_late_policy: TooLatePolicy::Drop,
            changes_topic: "orderly.changes".into(),
            anomalies_topic: "orderly.anomalies".into(),
            anomalies_retained: 100_000,
            observers: Vec::new(),
            // Eight attempts over about 25 s at most ride out a dependency's
            // restart without holding an entity for minutes.
            // Far beyond any healthy handler, short enough to page someone.
            stall_deadline_ms: 30_000,
            admin_addr: "127.0.0.1:8089".into(),
            admin_token: None,
            admin_token_file: None,
            retry_max_attempts: 8,
            retry_initial_ms: 100,
            retry_max_ms: 10_000,
            batch_max: default_batch_max(),
            in_flight_high,
            in_flight_low: in_flight_high / 2,
            in_flight_mb_high: default_in_flight_mb_high(),
            in_flight_mb_low: default_in_flight_mb_high() / 2,
            drain_timeout_ms: 30_000,
            shutdown_grace_ms: 30_000,
            store_cache_mb: default_store_cache_mb(),
            stats_interval_ms: default_stats_interval_ms(),
            max_actors: default_max_actors(),
            actors_mb: default_actors_mb(),
            max_held_events: default_max_held_events(),
            default_reducer: ReduceOp::Set,
            types: BTreeMap::new(),
            kafka: KafkaConfig::default(),
            assignor: Assignor::default(),
            settings: Default::default(),
            changelog_suffix: String::new(),
            instance_id: None,
            // Long enough that a rolling restart's reassignments settle first.
            purge_after_ms: 30_000,
            partitioner: Default::default(),
        }
    }
}

/// Flags that override the file and the environment.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `--brokers`.
    pub brokers: Option<String>,
    /// `--topic`.
    pub topic: Option<String>,
    /// `--group`.
    pub group: Option<String>,
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
}

impl Config {
    /// This instance's name, for telemetry and operators: `instance_id` if
    /// set, else the host name (a container's or pod's own), else the
    /// consumer group and process id.
    pub fn instance_name(&self) -> String {
        if let Some(id) = &self.instance_id {
            return id.clone();
        }
        host_name().unwrap_or_else(|| format!("{}-{}", self.group, std::process::id()))
    }

    /// The changelog, when `changelog_suffix` turns it on.
    pub fn changelog(&self) -> Option<ChangelogConfig> {
        (!self.changelog_suffix.is_empty()).then(|| ChangelogConfig {
            suffix: self.changelog_suffix.clone(),
        })
    }

    /// Loads the configuration: defaults, then `file`, then `ORDERLY_*`
    /// variables from `env`, then `overrides`; and validates it.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &Overrides,
    ) -> Result<Config, ConfigError> {
        Config::load_traced(file, env, overrides).map(|l| l.config)
    }

    /// The admin token: `admin_token`, or the contents of `admin_token_file`.
    pub fn resolved_admin_token(&self) -> Result<Option<String>, ConfigError> {
        let Some(path) = &self.admin_token_file else {
            return Ok(self.admin_token.clone());
        };
        let invalid = |reason: String| ConfigError::Invalid {
            field: "admin_token_file",
            reason,
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| invalid(format!("cannot read {}: {e}", path.display())))?;
        let token = text.trim();
        if token.is_empty() {
            return Err(invalid(format!("{} is empty", path.display())));
        }
        Ok(Some(token.to_owned()))
    }

    /// The topics orderly consumes: the input topic and, if set, the derived-events topic.
    pub fn input_topics(&self) -> Vec<String> {
        std::iter::once(self.topic.clone())
            .chain(self.derived_topic.clone())
            .collect()
    }

    /// Checks ranges and relations between fields.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field, reason: &str| {
            Err(ConfigError::Invalid {
                field,
                reason: reason.to_owned(),
            })
        };
        if self.brokers.trim().is_empty() {
            return bad("brokers", "must name at least one host:port");
        }
        if self.admin_token.is_some() && self.admin_token_file.is_some() {
            return bad("admin_token_file", "set it or admin_token, not both");
        }
        if self.topic.trim().is_empty() {
            return bad("topic", "must not be empty");
        }
        if self.group.trim().is_empty() {
            return bad("group", "must not be empty");
        }
        if self.dead_letter_topic.trim().is_empty() {
            return bad("dead_letter_topic", "must not be empty");
        }
        if self.dead_letter_topic == self.topic {
            return bad(
                "dead_letter_topic",
                "must differ from `topic`, or dead letters would be consumed again",
            );
        }
        if let Some(d) = &self.derived_topic {
            if d.trim().is_empty() || d == &self.topic || d == &self.dead_letter_topic {
                return bad(
                    "derived_topic",
                    "must be a topic of its own, not empty, `topic` or `dead_letter_topic`",
                );
            }
        }
        for o in &self.observers {
            if !crate::model::observers::BUILT_IN.contains(&o.as_str()) {
                return Err(ConfigError::Invalid {
                    field: "observers",
                    reason: format!(
                        "unknown observer {o:?}; built in: {:?}",
                        crate::model::observers::BUILT_IN
                    ),
                });
            }
        }
        if !self.observers.is_empty() && self.derived_topic.is_none() {
            return bad(
                "derived_topic",
                "must be set when `observers` are configured",
            );
        }
        if self.retry_max_attempts == 0 {
            return bad(
                "retry_max_attempts",
                "must be at least 1 (the first attempt)",
            );
        }
        if self.retry_initial_ms > self.retry_max_ms {
            return bad("retry_initial_ms", "must not exceed retry_max_ms");
        }
        if self.retention_events == 0 {
            return bad("retention_events", "must be at least 1");
        }
        if self.batch_max == 0 {
            return bad("batch_max", "must be at least 1");
        }
        if self.in_flight_high == 0 {
            return bad("in_flight_high", "must be at least 1");
        }
        if self.in_flight_low >= self.in_flight_high {
            return bad("in_flight_low", "must be below in_flight_high");
        }
        if self.in_flight_mb_high == 0 {
            return bad("in_flight_mb_high", "must be at least 1");
        }
        if self.in_flight_mb_low >= self.in_flight_mb_high {
            return bad("in_flight_mb_low", "must be below in_flight_mb_high");
        }
        if self.max_held_events == 0 {
            return bad("max_held_events", "must be at least 1");
        }
        if self.actors_mb == 0 {
            return bad("actors_mb", "must be at least 1");
        }
        if self.max_actors == 0 {
            return bad("max_actors", "must be at least 1");
        }
        if self.idle_timeout_ms == 0 {
            return bad("idle_timeout_ms", "must be at least 1");
        }
        if let Some(id) = &self.instance_id {
            if id.trim().is_empty() {
                return bad("instance_id", "must not be empty when set");
            }
        }
        if let Err(reason) = self.kafka.check() {
            return Err(ConfigError::Invalid {
                field: "kafka",
                reason,
            });
        }
        if !self.changelog_suffix.is_empty()
            && self.changelog_suffix.trim() != self.changelog_suffix
        {
            return bad("changelog_suffix", "must not start or end with spaces");
        }

        match self.settings.source {
            SettingsSource::None => {}
            SettingsSource::Topic => {
                let t = &self.settings.topic;
                if t.trim().is_empty() {
                    return bad("settings.topic", "must name the compacted settings topic");
                }
                if self.input_topics().contains(t)
                    || t == &self.dead_letter_topic
                    || t == &self.changes_topic
                    || t == &self.anomalies_topic
                {
                    return bad(
                        "settings.topic",
                        "must be a topic of its own, not an input, dead-letter, changes or anomalies topic",
                    );
                }
            }
            SettingsSource::Http => {
                let u = &self.settings.url;
                if !(u.starts_with("http://") || u.starts_with("https://")) {
                    return bad(
                        "settings.url",
                        "must be an http:// or https:// URL when settings.source = \"http\"",
                    );
                }
                if self.settings.ttl_ms < 100 {
                    return bad("settings.ttl_ms", "must be at least 100");
                }
            }
        }
        Ok(())
    }

    /// The number of shards to run: `shards`, or one per core.
    pub fn shard_count(&self) -> usize {
        if self.shards > 0 {
            self.shards
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
        }
    }

    /// The built-in handlers for the configured types.
    pub fn handlers(&self) -> crate::model::handler::Handlers {
        use crate::model::handler::{FieldReducer, Handlers};
        let mut h = Handlers::default()
            .with_default(std::sync::Arc::new(FieldReducer(self.default_reducer)));
        for (t, c) in &self.types {
            h = h.with_handler(t.clone(), std::sync::Arc::new(FieldReducer(c.reducer)));
        }
        for o in &self.observers {
            if let Some(o) = crate::model::observers::built_in(o) {
                h = h.with_observer(o);
            }
        }
        h
    }

    /// The retry schedule and the failure policy per type.
    pub fn retries(&self) -> Retries {
        Retries {
            max_attempts: self.retry_max_attempts,
            initial: std::time::Duration::from_millis(self.retry_initial_ms),
            max: std::time::Duration::from_millis(self.retry_max_ms),
            park_on_failure: self
                .types
                .iter()
                .filter(|(_, c)| c.on_failure == FailurePolicy::Park)
                .map(|(t, _)| t.clone())
                .collect(),
        }
    }

    /// The out-of-order policies, retention and history settings.
    pub fn policies(&self) -> Policies {
        let mut p = Policies::new(
            self.default_late_policy,
            self.default_too_late_policy,
            self.retention_events,
            self.retention_ms.map(|ms| ms.min(i64::MAX as u64) as i64),
        );
        for (t, c) in &self.types {
            p = p.with_type(t, c.late_policy, c.too_late_policy, c.history);
        }
        p.max_held = self.max_held_events;
        p
    }

    /// The event types of the synthetic CRM workload and their reducers.
    pub fn crm_types() -> BTreeMap<String, TypeConfig> {
        [
            ("lead.created", ReduceOp::Set),
            ("lead.updated", ReduceOp::Set),
            ("lead.deleted", ReduceOp::Delete),
            ("conversion.recorded", ReduceOp::Inc),
            ("appointment.scheduled", ReduceOp::Set),
            ("appointment.rescheduled", ReduceOp::Set),
            ("appointment.completed", ReduceOp::Set),
        ]
        .into_iter()
        .map(|(t, r)| {
            (
                t.to_owned(),
                TypeConfig {
                    reducer: r,
                    ..Default::default()
                },
            )
        })
        .chain(std::iter::once((
            crate::model::observers::TENANT_CONVERSION.to_owned(),
            // A sum commutes: late or very late conversions are added on top.
            TypeConfig {
                reducer: ReduceOp::Inc,
                late_policy: Some(LatePolicy::Apply),
                too_late_policy: Some(TooLatePolicy::Apply),
                history: false,
                on_failure: FailurePolicy::Skip,
            },
        )))
        .collect()
    }
}

/// How transient failures are retried, and what happens when they run out.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Retries {
    /// Attempts, the first included.
    pub max_attempts: u32,
    /// The first retry's delay.
    pub initial: std::time::Duration,
    /// The longest delay.
    pub max: std::time::Duration,
    /// Types whose failures park the entity instead of skipping the event.
    pub park_on_failure: std::collections::HashSet<String>,
}

impl Retries {
    /// The delay before attempt `attempt + 1` (after `attempt` failures):
    /// exponential, capped, with full jitter.
    pub fn backoff(&self, attempt: u32) -> std::time::Duration {
        use rand::Rng;
        let cap = self
            .initial
            .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1)))
            .min(self.max);
        let ms = cap.as_millis() as u64;
        std::time::Duration::from_millis(if ms == 0 {
            0
        } else {
            rand::rng().random_range(ms / 2..=ms)
        })
    }
}

/// The type of a field that an `ORDERLY_*` variable sets: the variable's
/// value is read as this type, so a string field keeps `123456` a string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A string, a path or a named choice.
    Str,
    /// An integer.
    Int,
}

/// The top-level scalar fields, which `ORDERLY_*` variables can set, with their types.
pub const FIELDS: &[(&str, Kind)] = &[
    ("brokers", Kind::Str),
    ("topic", Kind::Str),
    ("group", Kind::Str),
    ("data_dir", Kind::Str),
    ("dead_letter_topic", Kind::Str),
    ("derived_topic", Kind::Str),
    ("content_type", Kind::Str),
    ("shards", Kind::Int),
    ("idle_timeout_ms", Kind::Int),
    ("retention_events", Kind::Int),
    ("retention_ms", Kind::Int),
    ("default_late_policy", Kind::Str),
    ("default_too_late_policy", Kind::Str),
    ("changes_topic", Kind::Str),
    ("anomalies_topic", Kind::Str),
    ("anomalies_retained", Kind::Int),
    ("stall_deadline_ms", Kind::Int),
    ("admin_addr", Kind::Str),
    ("admin_token", Kind::Str),
    ("admin_token_file", Kind::Str),
    ("retry_max_attempts", Kind::Int),
    ("retry_initial_ms", Kind::Int),
    ("retry_max_ms", Kind::Int),
    ("batch_max", Kind::Int),
    ("in_flight_high", Kind::Int),
    ("in_flight_low", Kind::Int),
    ("in_flight_mb_high", Kind::Int),
    ("in_flight_mb_low", Kind::Int),
    ("actors_mb", Kind::Int),
    ("max_held_events", Kind::Int),
    ("drain_timeout_ms", Kind::Int),
    ("shutdown_grace_ms", Kind::Int),
    ("store_cache_mb", Kind::Int),
    ("stats_interval_ms", Kind::Int),
    ("max_actors", Kind::Int),
    ("default_reducer", Kind::Str),
    ("changelog_suffix", Kind::Str),
    ("instance_id", Kind::Str),
    ("purge_after_ms", Kind::Int),
    ("partitioner", Kind::Str),
    ("assignor", Kind::Str),
];

/// The `[settings]` fields that `ORDERLY_SETTINGS__*` variables can set.
pub const SETTINGS_FIELDS: &[(&str, Kind)] = &[
    ("source", Kind::Str),
    ("topic", Kind::Str),
    ("url", Kind::Str),
    ("ttl_ms", Kind::Int),
];

/// The type of top-level field `name`, if `ORDERLY_*` variables can set it.
pub fn field_kind(name: &str) -> Option<Kind> {
    FIELDS.iter().find(|(f, _)| *f == name).map(|(_, k)| *k)
}

/// Every field of [`FIELDS`] at its default, as `name=value` (`name
/// (unset)` when it has none), for `orderly run --help`. Made from
/// [`Config::default`], so the help cannot disagree with it.
pub fn defaults_listing() -> Vec<String> {
    let defaults = toml::Table::try_from(Config::default()).unwrap_or_default();
    FIELDS
        .iter()
        .map(|(name, _)| match shown(&defaults, name) {
            Some(value) => format!("{name}={value}"),
            None => format!("{name} (unset)"),
        })
        .collect()
}

/// A field's value in a serialised configuration as the docs write it:
/// strings bare, an empty string as `""`, `None` when it is unset.
fn shown(config: &toml::Table, name: &str) -> Option<String> {
    config.get(name).map(|v| match v {
        toml::Value::String(s) if s.is_empty() => "\"\"".to_string(),
        toml::Value::String(s) => s.clone(),
        v => v.to_string(),
    })
}

/// The machine's host name, if it has a usable one.
fn host_name() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most
    // that many bytes and we stop at the first NUL or the end.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = std::str::from_utf8(&buf[..end]).ok()?.trim();
    (!name.is_empty() && name != "localhost").then(|| name.to_owned())
}
