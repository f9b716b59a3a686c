//! What the source observes: messages arriving, backpressure, offset gaps.

use super::InternalEvent;
use crate::metrics::Stats;
use std::sync::atomic::Ordering::Relaxed;

/// A Kafka message arrived.
pub struct EventReceived {
    /// Its size: key, value and headers.
    pub bytes: u64,
}

impl InternalEvent for EventReceived {
    fn emit(self, stats: &Stats) {
        let in_flight = stats.source.in_flight.fetch_add(1, Relaxed) + 1;
        stats.source.max_in_flight.fetch_max(in_flight, Relaxed);
        InFlightBytesAdded { bytes: self.bytes }.emit(stats);
        Stats::incr(&stats.source.received);
        ::metrics::counter!("orderly_events_received_total").increment(1);
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
            Stats::incr(&stats.source.pauses);
        }
        stats.source.paused_partitions.store(self.paused as i64, Relaxed);
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

/// Bytes joined the in-flight total: a message arrived, or a write intent
/// took a copy of its entity's record to the writer. They leave it when the
/// event is durable ([`super::EventsDurable`]).
pub struct InFlightBytesAdded {
    /// How many.
    pub bytes: u64,
}

impl InternalEvent for InFlightBytesAdded {
    fn emit(self, stats: &Stats) {
        let bytes = stats
            .source
            .in_flight_bytes
            .fetch_add(self.bytes as i64, Relaxed)
            + self.bytes as i64;
        stats.source.max_in_flight_bytes.fetch_max(bytes, Relaxed);
    }
}
