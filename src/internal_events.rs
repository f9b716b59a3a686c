//! Everything observable that happens in the pipeline, as one small struct
//! per happening, each with an `emit` that updates the pipeline's [`Stats`],
//! the Prometheus metric and, where an operator should read it, the log.
//!
//! Processing code says *what happened* (`emit(EventProcessed { .. }, stats)`)
//! and never how it is reported. This module owns the metric names: the
//! [`CATALOGUE`] lists every metric orderly exports, and the Grafana
//! dashboard, the alert rules and the tests are checked against it.
//!
//! Labels are bounded: an outcome, a policy, an error code, a stage, a shard
//! number, a topic and partition. Never an entity id, tenant id or event id.

use crate::fold::Outcome;
use crate::metrics::Stats;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

/// One observable happening.
pub trait InternalEvent {
    /// Records it: counters, metrics and log lines.
    fn emit(self, stats: &Stats);
}

/// Records `event`.
pub fn emit(event: impl InternalEvent, stats: &Stats) {
    event.emit(stats)
}

/// The kind of a Prometheus metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up.
    Counter,
    /// Goes up and down.
    Gauge,
    /// Distribution with buckets (`_bucket`, `_sum`, `_count`).
    Histogram,
}

/// Every metric orderly exports: name, kind, help.
pub const CATALOGUE: &[(&str, Kind, &str)] = &[
    (
        "orderly_events_received_total",
        Kind::Counter,
        "Messages received from Kafka.",
    ),
    (
        "orderly_events_processed_total",
        Kind::Counter,
        "Events processed by an entity actor, by outcome (the process rate).",
    ),
    (
        "orderly_events_durable_total",
        Kind::Counter,
        "Messages whose effects are durable and acknowledged.",
    ),
    (
        "orderly_offset_gaps_total",
        Kind::Counter,
        "Jumps in a partition's offsets (transaction markers, compaction, or skipped records).",
    ),
    (
        "orderly_offsets_skipped_total",
        Kind::Counter,
        "Offsets never delivered, summed over the gaps.",
    ),
    (
        "orderly_duplicates_total",
        Kind::Counter,
        "Redeliveries and repeated event ids skipped.",
    ),
    (
        "orderly_out_of_order_events_total",
        Kind::Counter,
        "Late events, by the policy that handled them.",
    ),
    (
        "orderly_dropped_records_total",
        Kind::Counter,
        "Events discarded without effect, by reason.",
    ),
    (
        "orderly_corrections_total",
        Kind::Counter,
        "Late events that changed the state: corrections emitted.",
    ),
    (
        "orderly_retries_total",
        Kind::Counter,
        "Handler retries after transient failures.",
    ),
    (
        "orderly_dead_letters_total",
        Kind::Counter,
        "Messages dead-lettered, by stage and error code.",
    ),
    (
        "orderly_dead_letters_open",
        Kind::Gauge,
        "Dead letters waiting for an operator (status open).",
    ),
    (
        "orderly_retrying_events",
        Kind::Gauge,
        "Events waiting for a retry after a transient failure.",
    ),
    (
        "orderly_parked_entities",
        Kind::Gauge,
        "Entities parked by a late event, waiting for an operator.",
    ),
    (
        "orderly_stalled_events_total",
        Kind::Counter,
        "Events whose handling ran past the stall deadline.",
    ),
    (
        "orderly_stalled_events",
        Kind::Gauge,
        "Events running past the stall deadline now.",
    ),
    ("orderly_active_actors", Kind::Gauge, "Entity actors alive."),
    (
        "orderly_passivations_total",
        Kind::Counter,
        "Idle entity actors stopped.",
    ),
    (
        "orderly_mailbox_depth",
        Kind::Gauge,
        "Deliveries queued in a shard's mailbox, by shard.",
    ),
    (
        "orderly_in_flight_events",
        Kind::Gauge,
        "Messages received and not yet durable.",
    ),
    (
        "orderly_paused_partitions",
        Kind::Gauge,
        "Partitions paused for backpressure.",
    ),
    (
        "orderly_consumer_lag",
        Kind::Gauge,
        "Messages between the log end and the committed offset, by partition.",
    ),
    (
        "orderly_checkpoint_age_seconds",
        Kind::Gauge,
        "Seconds since the partition's checkpoint last advanced, by partition.",
    ),
    (
        "orderly_checkpoint_offset",
        Kind::Gauge,
        "The next offset to consume, durable in the store, by partition.",
    ),
    (
        "orderly_store_batch_size",
        Kind::Histogram,
        "Entity records written per store batch, after coalescing.",
    ),
    (
        "orderly_store_flush_seconds",
        Kind::Histogram,
        "Time to commit and flush one store batch.",
    ),
    (
        "orderly_store_size_bytes",
        Kind::Gauge,
        "Size of the sled data dir on disk.",
    ),
    (
        "orderly_record_e2e_latency_seconds",
        Kind::Histogram,
        "From Kafka append (from=append) or occurred_at (from=occurred) to durable.",
    ),
    (
        "orderly_record_lateness_seconds",
        Kind::Histogram,
        "How far behind its entity's newest event a late event was.",
    ),
    (
        "orderly_component_errors_total",
        Kind::Counter,
        "Errors inside orderly, by stage and error code.",
    ),
    (
        "orderly_settings_lookups_total",
        Kind::Counter,
        "Tenant settings lookups, one per event: hit (the tenant has settings) or miss (the defaults apply).",
    ),
    (
        "orderly_settings_compiled_total",
        Kind::Counter,
        "Tenant settings documents compiled: once per tenant and version, never per event.",
    ),
    (
        "orderly_settings_rejected_total",
        Kind::Counter,
        "Tenant settings documents rejected, by code; the last good settings stay in force.",
    ),
    (
        "orderly_settings_refreshes_total",
        Kind::Counter,
        "HTTP settings source: conditional refreshes, by result (changed, unchanged, not_modified, error).",
    ),
    (
        "orderly_settings_tenants",
        Kind::Gauge,
        "Tenants with settings in force.",
    ),
    (
        "orderly_settings_caught_up",
        Kind::Gauge,
        "1 once the settings source was read to its end at start; processing waits for it.",
    ),
    (
        "orderly_restore_records_total",
        Kind::Counter,
        "Entity records restored from changelogs.",
    ),
    (
        "orderly_restore_seconds",
        Kind::Histogram,
        "Time to restore one partition from its changelog.",
    ),
    (
        "orderly_restore_rate",
        Kind::Gauge,
        "Records per second of the last partition restore.",
    ),
    (
        "orderly_restoring_partitions",
        Kind::Gauge,
        "Partitions being restored now; the instance is not ready meanwhile.",
    ),
    (
        "orderly_handovers_total",
        Kind::Counter,
        "Entities whose events began arriving on a second partition, combined here (how = arrival or merge).",
    ),
    (
        "orderly_handover_merges_total",
        Kind::Counter,
        "Records of an entity from another partition's changelog merged into its live record.",
    ),
    (
        "orderly_handover_merged_events_total",
        Kind::Counter,
        "Events those merges added to the live records.",
    ),
    (
        "orderly_handover_too_late_events_total",
        Kind::Counter,
        "Events of merged records below the live record's base: not re-folded.",
    ),
    (
        "orderly_handover_yields_total",
        Kind::Counter,
        "Live records that became forwarding stubs: their entity's partition is owned elsewhere now.",
    ),
    (
        "orderly_forwarded_events_total",
        Kind::Counter,
        "Events that arrived at a forwarding stub and were forwarded to their entity's partition.",
    ),
    (
        "orderly_key_misrouted_total",
        Kind::Counter,
        "Entities on two partitions that the configured partitioner maps to neither (wrong `partitioner`).",
    ),
    (
        "orderly_build_info",
        Kind::Gauge,
        "Always 1; the version label says which build runs.",
    ),
];

/// Histogram buckets for latencies, in seconds: 1 ms to 5 min.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Histogram buckets for batch sizes.
pub const BATCH_BUCKETS: &[f64] = &[1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0];

/// A Kafka message arrived.
pub struct EventReceived;

impl InternalEvent for EventReceived {
    fn emit(self, stats: &Stats) {
        let in_flight = stats.in_flight.fetch_add(1, Relaxed) + 1;
        stats.max_in_flight.fetch_max(in_flight, Relaxed);
        Stats::incr(&stats.received);
        ::metrics::counter!("orderly_events_received_total").increment(1);
    }
}

/// An entity actor processed an event.
pub struct EventProcessed<'a> {
    /// What processing did.
    pub outcome: &'a Outcome,
    /// The entity (kept in the recent-corrections list, never a label).
    pub entity_id: &'a str,
    /// The event (likewise).
    pub event_id: &'a str,
    /// When, ms since the Unix epoch.
    pub at_ms: i64,
}

impl InternalEvent for EventProcessed<'_> {
    fn emit(self, stats: &Stats) {
        let outcome = self.outcome;
        let counter = match outcome {
            Outcome::Applied { .. } => &stats.applied,
            Outcome::Duplicate(_) => &stats.duplicates,
            Outcome::Recomputed { .. } => &stats.late_recomputed,
            Outcome::LateApplied { .. } => &stats.late_applied,
            Outcome::Dropped {
                too_late: false, ..
            } => &stats.late_dropped,
            Outcome::Dropped { too_late: true, .. } => &stats.too_late,
            Outcome::Parked { .. } => &stats.parked,
            Outcome::Held => &stats.held,
            Outcome::Ignored { .. } => &stats.ignored,
        };
        Stats::incr(counter);
        ::metrics::counter!("orderly_events_processed_total", "outcome" => outcome.name())
            .increment(1);
        let late = match outcome {
            Outcome::Duplicate(_) => {
                ::metrics::counter!("orderly_duplicates_total").increment(1);
                None
            }
            Outcome::Recomputed { lateness, .. } => Some(("recompute", false, lateness)),
            Outcome::LateApplied {
                lateness, too_late, ..
            } => Some(("apply", *too_late, lateness)),
            Outcome::Dropped { lateness, too_late } => Some(("drop", *too_late, lateness)),
            Outcome::Parked { lateness, too_late } => Some(("park", *too_late, lateness)),
            Outcome::Applied { .. } | Outcome::Held | Outcome::Ignored { .. } => None,
        };
        if let Some((policy, too_late, lateness)) = late {
            ::metrics::counter!(
                "orderly_out_of_order_events_total",
                "policy" => policy,
                "too_late" => if too_late { "true" } else { "false" }
            )
            .increment(1);
            ::metrics::histogram!("orderly_record_lateness_seconds")
                .record(lateness.millis.max(0) as f64 / 1000.0);
            if policy == "drop" {
                let reason = if too_late { "too_late" } else { "late" };
                ::metrics::counter!("orderly_dropped_records_total", "reason" => reason)
                    .increment(1);
            }
        }
        if outcome.is_correction() {
            Stats::incr(&stats.corrections);
            ::metrics::counter!("orderly_corrections_total").increment(1);
            if let Outcome::Recomputed { changes, .. } | Outcome::LateApplied { changes, .. } =
                outcome
            {
                stats.record_correction(crate::metrics::Correction {
                    at_ms: self.at_ms,
                    entity_id: self.entity_id.to_owned(),
                    event_id: self.event_id.to_owned(),
                    outcome: outcome.name(),
                    fields: changes.iter().map(|c| c.field.clone()).collect(),
                });
            }
        }
    }
}

/// A message became a dead letter.
pub struct DeadLettered<'a> {
    /// Where: `decode` (the source) or `handler` (an entity actor).
    pub stage: &'static str,
    /// The error code, from a bounded set.
    pub code: &'a str,
}

impl InternalEvent for DeadLettered<'_> {
    fn emit(self, stats: &Stats) {
        Stats::incr(&stats.dead_letters);
        ::metrics::counter!(
            "orderly_dead_letters_total",
            "stage" => self.stage,
            "code" => self.code.to_owned()
        )
        .increment(1);
    }
}

/// A transient handler failure will be retried after a backoff.
pub struct RetryScheduled;

impl InternalEvent for RetryScheduled {
    fn emit(self, stats: &Stats) {
        Stats::incr(&stats.retries);
        stats.retrying.fetch_add(1, Relaxed);
        ::metrics::counter!("orderly_retries_total").increment(1);
    }
}

/// A scheduled retry's backoff ended: the event is attempted again.
pub struct RetryDue;

impl InternalEvent for RetryDue {
    fn emit(self, stats: &Stats) {
        stats.retrying.fetch_sub(1, Relaxed);
    }
}

/// An entity actor started.
pub struct ActorStarted;

impl InternalEvent for ActorStarted {
    fn emit(self, stats: &Stats) {
        stats.active_actors.fetch_add(1, Relaxed);
    }
}

/// An entity actor stopped.
pub struct ActorStopped;

impl InternalEvent for ActorStopped {
    fn emit(self, stats: &Stats) {
        stats.active_actors.fetch_sub(1, Relaxed);
    }
}

/// Idle actors were passivated.
pub struct ActorsPassivated {
    /// How many.
    pub count: u64,
}

impl InternalEvent for ActorsPassivated {
    fn emit(self, stats: &Stats) {
        stats.passivations.fetch_add(self.count, Relaxed);
        ::metrics::counter!("orderly_passivations_total").increment(self.count);
    }
}

/// The source paused (or resumed) its partitions for backpressure.
pub struct PartitionsPaused {
    /// How many partitions are paused now; 0 after a resume.
    pub paused: usize,
}

impl InternalEvent for PartitionsPaused {
    fn emit(self, stats: &Stats) {
        if self.paused > 0 {
            Stats::incr(&stats.pauses);
        }
        stats.paused_partitions.store(self.paused as i64, Relaxed);
    }
}

/// A partition's offsets jumped: the records in between were never
/// delivered. Normal for transaction markers (a gap of one) and compacted
/// topics; anything else means a broker or client skipped records.
pub struct OffsetGap<'a> {
    /// The topic.
    pub topic: &'a str,
    /// The partition.
    pub partition: i32,
    /// The offset expected next.
    pub expected: i64,
    /// The offset delivered.
    pub got: i64,
}

impl InternalEvent for OffsetGap<'_> {
    fn emit(self, _stats: &Stats) {
        let missing = self.got - self.expected;
        if missing > 1 {
            tracing::warn!(topic = %self.topic, partition = self.partition, expected = self.expected, got = self.got, missing, "offsets skipped: records between these offsets were not delivered (compacted topic, or a broker that skips records)");
        }
        ::metrics::counter!("orderly_offset_gaps_total").increment(1);
        ::metrics::counter!("orderly_offsets_skipped_total").increment(missing.max(0) as u64);
    }
}

/// An event's handling ran past the stall deadline.
pub struct EventStalled<'a> {
    /// The shard.
    pub shard: usize,
    /// The entity (logged, never a label).
    pub entity_id: &'a str,
    /// The event (logged, never a label).
    pub event_id: &'a str,
    /// How long it has run.
    pub running_ms: i64,
}

impl InternalEvent for EventStalled<'_> {
    fn emit(self, stats: &Stats) {
        tracing::warn!(shard = self.shard, entity = %self.entity_id, event = %self.event_id, running_ms = self.running_ms, "event stalled: handling runs past the stall deadline");
        Stats::incr(&stats.stalled);
        ::metrics::counter!("orderly_stalled_events_total").increment(1);
    }
}

/// A store batch was committed and flushed.
pub struct BatchCommitted {
    /// Entity records written, after coalescing.
    pub entity_writes: usize,
    /// Commit plus flush time.
    pub took: Duration,
}

impl InternalEvent for BatchCommitted {
    fn emit(self, stats: &Stats) {
        stats.batches.fetch_add(1, Relaxed);
        stats
            .entity_writes
            .fetch_add(self.entity_writes as u64, Relaxed);
        ::metrics::histogram!("orderly_store_batch_size").record(self.entity_writes as f64);
        ::metrics::histogram!("orderly_store_flush_seconds").record(self.took.as_secs_f64());
    }
}

/// Messages became durable; `latencies` holds, per message, (Kafka append →
/// durable, occurred_at → durable) in microseconds, where known.
pub struct EventsDurable<'a> {
    /// Per message.
    pub latencies: &'a [(Option<u64>, Option<u64>)],
}

impl InternalEvent for EventsDurable<'_> {
    fn emit(self, stats: &Stats) {
        let n = self.latencies.len();
        stats.record_latencies(self.latencies.iter().copied());
        stats.durable.fetch_add(n as u64, Relaxed);
        stats.in_flight.fetch_sub(n as i64, Relaxed);
        ::metrics::counter!("orderly_events_durable_total").increment(n as u64);
        let append =
            ::metrics::histogram!("orderly_record_e2e_latency_seconds", "from" => "append");
        let occurred =
            ::metrics::histogram!("orderly_record_e2e_latency_seconds", "from" => "occurred");
        for (a, o) in self.latencies {
            if let Some(us) = a {
                append.record(*us as f64 / 1e6);
            }
            if let Some(us) = o {
                occurred.record(*us as f64 / 1e6);
            }
        }
    }
}

/// Something inside orderly failed; it is retried or reported elsewhere.
pub struct ComponentError<'a> {
    /// Where: `source`, `store`, `sink`, `admin`.
    pub stage: &'static str,
    /// What, from a bounded set.
    pub error_code: &'static str,
    /// The error, for the log.
    pub error: &'a dyn std::fmt::Display,
}

impl InternalEvent for ComponentError<'_> {
    fn emit(self, stats: &Stats) {
        Stats::incr(&stats.errors);
        tracing::warn!(stage = self.stage, error_code = self.error_code, error = %self.error, "component error");
        ::metrics::counter!(
            "orderly_component_errors_total",
            "stage" => self.stage,
            "error_code" => self.error_code
        )
        .increment(1);
    }
}

/// A scrape: the gauges that are read rather than counted, set from the
/// pipeline's current state.
pub struct GaugesSampled<'a> {
    /// Deliveries queued per shard.
    pub mailbox_depths: &'a [i64],
    /// Events running past the stall deadline now.
    pub stalled_now: usize,
    /// The store's size on disk, if it could be read.
    pub store_size_bytes: Option<u64>,
}

impl InternalEvent for GaugesSampled<'_> {
    fn emit(self, stats: &Stats) {
        use ::metrics::gauge;
        gauge!("orderly_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        gauge!("orderly_active_actors").set(stats.active_actors.load(Relaxed) as f64);
        gauge!("orderly_in_flight_events").set(stats.in_flight.load(Relaxed) as f64);
        gauge!("orderly_paused_partitions").set(stats.paused_partitions.load(Relaxed) as f64);
        gauge!("orderly_dead_letters_open").set(stats.open_dead_letters.load(Relaxed) as f64);
        gauge!("orderly_parked_entities").set(stats.parked_entities.load(Relaxed) as f64);
        gauge!("orderly_retrying_events").set(stats.retrying.load(Relaxed) as f64);
        gauge!("orderly_stalled_events").set(self.stalled_now as f64);
        for (shard, depth) in self.mailbox_depths.iter().enumerate() {
            gauge!("orderly_mailbox_depth", "shard" => shard.to_string()).set(*depth as f64);
        }
        if let Some(bytes) = self.store_size_bytes {
            gauge!("orderly_store_size_bytes").set(bytes as f64);
        }
        if let Ok(lag) = stats.lag.lock() {
            for ((topic, partition), lag) in lag.iter() {
                gauge!("orderly_consumer_lag", "topic" => topic.clone(), "partition" => partition.to_string())
                    .set(*lag as f64);
            }
        }
        let now = std::time::SystemTime::now();
        if let Ok(cps) = stats.checkpoints.lock() {
            for ((topic, partition), (offset, at)) in cps.iter() {
                let age = now.duration_since(*at).unwrap_or_default().as_secs_f64();
                let labels = [
                    ("topic", topic.clone()),
                    ("partition", partition.to_string()),
                ];
                gauge!("orderly_checkpoint_age_seconds", &labels).set(age);
                gauge!("orderly_checkpoint_offset", &labels).set(*offset as f64);
            }
        }
    }
}

/// A partition's restore from its changelog began.
pub struct RestoreStarted<'a> {
    /// The changelog topic.
    pub topic: &'a str,
    /// Its partition.
    pub partition: i32,
    /// The offset the store held, if any.
    pub from: Option<i64>,
    /// The changelog's end offset.
    pub to: i64,
}

impl InternalEvent for RestoreStarted<'_> {
    fn emit(self, _stats: &Stats) {
        ::metrics::gauge!("orderly_restoring_partitions").increment(1.0);
        tracing::info!(topic = self.topic, partition = self.partition, from = ?self.from, to = self.to, "restoring a partition from its changelog; not ready until done");
    }
}

/// A partition's restore finished.
pub struct RestoreFinished<'a> {
    /// The changelog topic.
    pub topic: &'a str,
    /// Its partition.
    pub partition: i32,
    /// Records read.
    pub records: u64,
    /// How long it took.
    pub took: Duration,
}

impl InternalEvent for RestoreFinished<'_> {
    fn emit(self, stats: &Stats) {
        stats.restored_records.fetch_add(self.records, Relaxed);
        stats
            .restore_micros
            .fetch_add(self.took.as_micros() as u64, Relaxed);
        let secs = self.took.as_secs_f64();
        let rate = self.records as f64 / secs.max(1e-6);
        ::metrics::gauge!("orderly_restoring_partitions").decrement(1.0);
        ::metrics::counter!("orderly_restore_records_total").increment(self.records);
        ::metrics::histogram!("orderly_restore_seconds").record(secs);
        ::metrics::gauge!("orderly_restore_rate").set(rate);
        tracing::info!(
            topic = self.topic,
            partition = self.partition,
            records = self.records,
            seconds = secs,
            rate = rate as u64,
            "partition restored"
        );
    }
}

/// A tenant's settings document was compiled and swapped in.
pub fn settings_applied(tenant: &str, version: u64, tenants: usize) {
    ::metrics::counter!("orderly_settings_compiled_total").increment(1);
    ::metrics::gauge!("orderly_settings_tenants").set(tenants as f64);
    tracing::debug!(tenant, version, "tenant settings in force");
}

/// A tenant's settings document was rejected; the last good one stays.
pub struct SettingsRejected<'a> {
    /// The rejection code (`settings_invalid`, ...).
    pub code: &'static str,
    /// The reason, for the log.
    pub reason: &'a dyn std::fmt::Display,
    /// Where it came from: `topic/partition@offset` or the URL.
    pub origin: &'a str,
}

impl InternalEvent for SettingsRejected<'_> {
    fn emit(self, stats: &Stats) {
        ::metrics::counter!("orderly_settings_rejected_total", "code" => self.code).increment(1);
        tracing::warn!(code = self.code, origin = self.origin, reason = %self.reason, "tenant settings rejected; the last good settings stay in force");
        emit(
            DeadLettered {
                stage: "settings",
                code: self.code,
            },
            stats,
        );
    }
}

/// The HTTP settings source revalidated its copy.
pub struct SettingsRefreshed {
    /// `changed`, `unchanged`, `not_modified` or `error`.
    pub result: &'static str,
}

impl InternalEvent for SettingsRefreshed {
    fn emit(self, _stats: &Stats) {
        ::metrics::counter!("orderly_settings_refreshes_total", "result" => self.result)
            .increment(1);
    }
}

/// Registers every series whose labels are known in advance at zero, so
/// dashboards and alerts see 0 rather than "no data" before the first event.
pub fn register_catalogue() {
    use ::metrics::{counter, histogram};
    for name in [
        "orderly_events_received_total",
        "orderly_events_durable_total",
        "orderly_duplicates_total",
        "orderly_corrections_total",
        "orderly_retries_total",
        "orderly_stalled_events_total",
        "orderly_passivations_total",
        "orderly_offset_gaps_total",
        "orderly_offsets_skipped_total",
        "orderly_settings_compiled_total",
        "orderly_restore_records_total",
        "orderly_handover_merges_total",
        "orderly_handover_merged_events_total",
        "orderly_handover_too_late_events_total",
        "orderly_handover_yields_total",
        "orderly_forwarded_events_total",
        "orderly_key_misrouted_total",
    ] {
        counter!(name).increment(0);
    }
    for how in ["arrival", "merge"] {
        counter!("orderly_handovers_total", "how" => how).increment(0);
    }
    for outcome in [
        "applied",
        "duplicate",
        "late-recomputed",
        "late-applied",
        "too-late-applied",
        "late-dropped",
        "too-late-dropped",
        "parked",
        "held",
        "ignored",
    ] {
        counter!("orderly_events_processed_total", "outcome" => outcome).increment(0);
    }
    for policy in ["recompute", "apply", "drop", "park"] {
        for too_late in ["false", "true"] {
            if policy == "recompute" && too_late == "true" {
                continue;
            }
            counter!("orderly_out_of_order_events_total", "policy" => policy, "too_late" => too_late)
                .increment(0);
        }
    }
    for result in ["hit", "miss"] {
        counter!("orderly_settings_lookups_total", "result" => result).increment(0);
    }
    for result in ["changed", "unchanged", "not_modified", "error"] {
        counter!("orderly_settings_refreshes_total", "result" => result).increment(0);
    }
    for code in [
        "settings_undecodable",
        "settings_invalid",
        "settings_key_mismatch",
        "settings_stale",
    ] {
        counter!("orderly_settings_rejected_total", "code" => code).increment(0);
    }
    ::metrics::gauge!("orderly_settings_tenants").set(0.0);
    ::metrics::gauge!("orderly_settings_caught_up").set(0.0);
    for reason in ["late", "too_late"] {
        counter!("orderly_dropped_records_total", "reason" => reason).increment(0);
    }
    for from in ["append", "occurred"] {
        let _ = histogram!("orderly_record_e2e_latency_seconds", "from" => from);
    }
    let _ = histogram!("orderly_record_lateness_seconds");
    let _ = histogram!("orderly_store_batch_size");
    let _ = histogram!("orderly_store_flush_seconds");
    let _ = histogram!("orderly_restore_seconds");
    ::metrics::gauge!("orderly_restoring_partitions").set(0.0);
    ::metrics::gauge!("orderly_restore_rate").set(0.0);
}

/// An entity's events began arriving on a second partition of its topic,
/// and the two were combined in this instance: in its actor (both partitions
/// are owned here) or by merging the record from the other partition's
/// changelog.
pub struct HandedOver<'a> {
    /// The entity.
    pub entity_id: &'a str,
    /// The partition its state lives under now.
    pub home: i32,
    /// How: `arrival` (an event arrived on the other partition) or `merge`.
    pub how: &'static str,
}

impl InternalEvent for HandedOver<'_> {
    fn emit(self, stats: &Stats) {
        stats.handovers.fetch_add(1, Relaxed);
        ::metrics::counter!("orderly_handovers_total", "how" => self.how).increment(1);
        tracing::debug!(
            entity = self.entity_id,
            home = self.home,
            how = self.how,
            "entity handed over"
        );
    }
}

/// A record of an entity from another partition's changelog was merged
/// into the live record here.
pub struct HandoverMerged {
    /// Events the live record lacked.
    pub added: usize,
    /// Events below the live record's base, which could not be re-folded.
    pub too_late: usize,
}

impl InternalEvent for HandoverMerged {
    fn emit(self, _stats: &Stats) {
        ::metrics::counter!("orderly_handover_merges_total").increment(1);
        ::metrics::counter!("orderly_handover_merged_events_total").increment(self.added as u64);
        if self.too_late > 0 {
            ::metrics::counter!("orderly_handover_too_late_events_total")
                .increment(self.too_late as u64);
        }
    }
}

/// This instance's live record of an entity became a forwarding stub: the
/// entity's rightful partition, owned by another instance, has it now.
pub struct HandoverYielded<'a> {
    /// The entity.
    pub entity_id: &'a str,
    /// The partition it lived under here.
    pub from: i32,
    /// Its new partition.
    pub to: i32,
}

impl InternalEvent for HandoverYielded<'_> {
    fn emit(self, _stats: &Stats) {
        ::metrics::counter!("orderly_handover_yields_total").increment(1);
        tracing::debug!(
            entity = self.entity_id,
            from = self.from,
            to = self.to,
            "entity moved to another instance; forwarding its events there"
        );
    }
}

/// An event arrived at a forwarding stub and was forwarded to its entity's
/// new partition.
pub struct EventForwarded;

impl InternalEvent for EventForwarded {
    fn emit(self, stats: &Stats) {
        stats.forwarded.fetch_add(1, Relaxed);
        ::metrics::counter!("orderly_forwarded_events_total").increment(1);
    }
}

/// An entity's events arrive on two partitions, and the configured
/// partitioner maps its key to neither: orderly cannot tell which is its
/// home, so it does not move it.
pub struct KeyMisrouted<'a> {
    /// The entity.
    pub entity_id: &'a str,
    /// The topic.
    pub topic: &'a str,
    /// Where its state lives.
    pub home: i32,
    /// The other partition.
    pub other: i32,
    /// What the partitioner says.
    pub rightful: Option<i32>,
    /// The partitioner's name.
    pub partitioner: &'static str,
}

impl InternalEvent for KeyMisrouted<'_> {
    fn emit(self, _stats: &Stats) {
        ::metrics::counter!("orderly_key_misrouted_total").increment(1);
        tracing::warn!(
            entity = self.entity_id,
            topic = self.topic,
            home = self.home,
            other = self.other,
            rightful = ?self.rightful,
            partitioner = self.partitioner,
            "an entity's events arrive on two partitions and the configured partitioner maps its key to neither: set `partitioner` to the producers' partitioner"
        );
    }
}
