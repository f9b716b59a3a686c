//! What scale-out observes: changelog restores, key moves (handovers,
//! yields, forwarded events, misrouted keys).

use super::InternalEvent;
use crate::metrics::Stats;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

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
        stats.changelog.restored_records.fetch_add(self.records, Relaxed);
        stats
            .changelog.restore_micros
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
        stats.changelog.handovers.fetch_add(1, Relaxed);
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
        stats.changelog.forwarded.fetch_add(1, Relaxed);
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
