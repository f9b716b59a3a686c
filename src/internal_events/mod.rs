//! Everything observable that happens in the pipeline, as one small struct
//! per happening, each with an `emit` that updates the pipeline's [`Stats`],
//! the Prometheus metric and, where an operator should read it, the log.
//!
//! Processing code says *what happened* (`emit(EventProcessed { .. }, stats)`)
//! and never how it is reported. One file per component holds its events;
//! the metric names they use are listed in [`crate::metrics::CATALOGUE`],
//! against which the Grafana dashboard, the alert rules and the tests are
//! checked.
//!
//! Labels are bounded: an outcome, a policy, an error code, a stage, a shard
//! number, a topic and partition. Never an entity id, tenant id or event id.

use crate::metrics::Stats;
use std::sync::atomic::Ordering::Relaxed;

/// One observable happening.
pub trait InternalEvent {
    /// Records it: counters, metrics and log lines.
    fn emit(self, stats: &Stats);
}

/// Records `event`.
pub fn emit(event: impl InternalEvent, stats: &Stats) {
    event.emit(stats)
}

mod changelog;
mod entity;
mod settings;
mod source;
mod writer;

pub use changelog::*;
pub use entity::*;
pub use settings::*;
pub use source::*;
pub use writer::*;

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
    /// The filter of stored entity ids: its state and the lookups it
    /// answered without the store ([`crate::store::SledStore::key_filter`]).
    pub entity_filter: (u8, u64),
    /// Each partition's durable checkpoint and when it last advanced.
    pub checkpoints: &'a std::collections::BTreeMap<
        crate::model::position::TopicPartition,
        (i64, std::time::SystemTime),
    >,
}

impl InternalEvent for GaugesSampled<'_> {
    fn emit(self, stats: &Stats) {
        use ::metrics::gauge;
        gauge!("orderly_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        gauge!("orderly_active_actors").set(stats.entities.active_actors.load(Relaxed) as f64);
        gauge!("orderly_in_flight_events").set(stats.source.in_flight.load(Relaxed) as f64);
        gauge!("orderly_in_flight_bytes").set(stats.source.in_flight_bytes.load(Relaxed) as f64);
        gauge!("orderly_paused_partitions").set(stats.source.paused_partitions.load(Relaxed) as f64);
        gauge!("orderly_dead_letters_open").set(stats.writer.open_dead_letters.load(Relaxed) as f64);
        gauge!("orderly_parked_entities").set(stats.writer.parked_entities.load(Relaxed) as f64);
        gauge!("orderly_retrying_events").set(stats.entities.retrying.load(Relaxed) as f64);
        gauge!("orderly_stalled_events").set(self.stalled_now as f64);
        for (shard, depth) in self.mailbox_depths.iter().enumerate() {
            gauge!("orderly_mailbox_depth", "shard" => shard.to_string()).set(*depth as f64);
        }
        if let Some(bytes) = self.store_size_bytes {
            gauge!("orderly_store_size_bytes").set(bytes as f64);
        }
        let (filter_state, skipped) = self.entity_filter;
        gauge!("orderly_entity_filter_state").set(f64::from(filter_state));
        ::metrics::counter!("orderly_entity_lookups_skipped_total").absolute(skipped);
        if let Ok(lag) = stats.source.lag.lock() {
            for (tp, lag) in lag.iter() {
                gauge!("orderly_consumer_lag", "topic" => tp.topic.to_string(), "partition" => tp.partition.to_string())
                    .set(*lag as f64);
            }
        }
        let now = std::time::SystemTime::now();
        for (tp, (offset, at)) in self.checkpoints {
            let age = now.duration_since(*at).unwrap_or_default().as_secs_f64();
            let labels = [
                ("topic", tp.topic.to_string()),
                ("partition", tp.partition.to_string()),
            ];
            gauge!("orderly_checkpoint_age_seconds", &labels).set(age);
            gauge!("orderly_checkpoint_offset", &labels).set(*offset as f64);
        }
    }
}
