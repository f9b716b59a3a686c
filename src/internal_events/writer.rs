//! What the store writer observes: batches committed, events made durable.

use super::InternalEvent;
use crate::metrics::Stats;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

/// A store batch was committed and flushed.
pub struct BatchCommitted {
    /// Entity records written, after coalescing.
    pub entity_writes: usize,
    /// Entity records the batch's intents carried, before coalescing.
    pub records_encoded: usize,
    /// Commit plus flush time.
    pub took: Duration,
    /// How long the commit kept the store's readers waiting
    /// ([`crate::store::Committed::exclusive`]).
    pub exclusive: Duration,
}

impl InternalEvent for BatchCommitted {
    fn emit(self, stats: &Stats) {
        stats.writer.batches.fetch_add(1, Relaxed);
        stats
            .writer.entity_writes
            .fetch_add(self.entity_writes as u64, Relaxed);
        stats
            .writer.records_encoded
            .fetch_add(self.records_encoded as u64, Relaxed);
        ::metrics::counter!("orderly_entity_records_encoded_total").increment(self.records_encoded as u64);
        stats
            .writer.exclusive_us
            .fetch_add(self.exclusive.as_micros() as u64, Relaxed);
        ::metrics::histogram!("orderly_store_batch_size").record(self.entity_writes as f64);
        ::metrics::histogram!("orderly_store_flush_seconds").record(self.took.as_secs_f64());
        ::metrics::histogram!("orderly_store_exclusive_seconds").record(self.exclusive.as_secs_f64());
    }
}

/// Messages became durable, with each one's latencies.
pub struct EventsDurable<'a> {
    /// Per message.
    pub latencies: &'a [crate::metrics::DurableLatency],
    /// The in-flight bytes they held, which are freed.
    pub bytes: u64,
}

impl InternalEvent for EventsDurable<'_> {
    fn emit(self, stats: &Stats) {
        let n = self.latencies.len();
        stats.record_latencies(self.latencies.iter().copied());
        stats.writer.durable.fetch_add(n as u64, Relaxed);
        stats.source.in_flight.fetch_sub(n as i64, Relaxed);
        stats
            .source
            .in_flight_bytes
            .fetch_sub(self.bytes as i64, Relaxed);
        ::metrics::counter!("orderly_events_durable_total").increment(n as u64);
        let append =
            ::metrics::histogram!("orderly_record_e2e_latency_seconds", "from" => "append");
        let occurred =
            ::metrics::histogram!("orderly_record_e2e_latency_seconds", "from" => "occurred");
        let received =
            ::metrics::histogram!("orderly_record_e2e_latency_seconds", "from" => "received");
        for l in self.latencies {
            if let Some(us) = l.append {
                append.record(us as f64 / 1e6);
            }
            if let Some(us) = l.occurred {
                occurred.record(us as f64 / 1e6);
            }
            received.record(l.received as f64 / 1e6);
        }
    }
}

/// The broker refused an outbox record for good; it was moved aside.
pub struct OutboxUndeliverable {
    /// Why, from a bounded set: `too_large`, `no_such_topic`,
    /// `not_authorized`, `invalid_record`.
    pub reason: &'static str,
}

impl InternalEvent for OutboxUndeliverable {
    fn emit(self, stats: &Stats) {
        stats.writer.undeliverable.fetch_add(1, Relaxed);
        ::metrics::counter!("orderly_outbox_undeliverable_total", "reason" => self.reason)
            .increment(1);
    }
}
