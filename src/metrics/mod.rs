//! Pipeline counters and latency histograms.
//!
//! Owns the numbers a run reports: how many events were received, applied,
//! skipped as duplicates, re-folded, dead-lettered and made durable, and the
//! end-to-end latency. Processing code records what happened through the
//! methods here and never formats output itself.

mod catalogue;

pub use catalogue::{register_catalogue, Kind, BATCH_BUCKETS, CATALOGUE, LATENCY_BUCKETS};
use hdrhistogram::Histogram;
use metrics_exporter_prometheus::Matcher;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;
use std::time::SystemTime;

/// Counters of one pipeline. Cheap to update from any thread.
#[derive(Debug, Default)]
pub struct Stats {
    /// Messages received from the broker.
    pub received: AtomicU64,
    /// Events applied in order.
    pub applied: AtomicU64,
    /// Duplicates skipped (redeliveries and repeated event ids).
    pub duplicates: AtomicU64,
    /// Late events inserted and re-folded.
    pub late_recomputed: AtomicU64,
    /// Events older than the retained log, dropped and reported.
    pub too_late: AtomicU64,
    /// Late events applied on top (policy `apply`).
    pub late_applied: AtomicU64,
    /// Late events dropped (policy `drop`).
    pub late_dropped: AtomicU64,
    /// Entities parked by a late event (policy `park`).
    pub parked: AtomicU64,
    /// Events held because their entity is parked.
    pub held: AtomicU64,
    /// Events ignored: their type is not enabled in the tenant's settings.
    pub ignored: AtomicU64,
    /// Late events that changed the state: corrections emitted.
    pub corrections: AtomicU64,
    /// Retries after transient handler failures.
    pub retries: AtomicU64,
    /// Messages dead-lettered.
    pub dead_letters: AtomicU64,
    /// Messages whose effects are durable (acknowledged).
    pub durable: AtomicU64,
    /// Store batches committed.
    pub batches: AtomicU64,
    /// Entity writes, after coalescing.
    pub entity_writes: AtomicU64,
    /// Entity actors alive now.
    pub active_actors: AtomicI64,
    /// Entity actors passivated so far.
    pub passivations: AtomicU64,
    /// Messages received and not yet durable.
    pub in_flight: AtomicI64,
    /// The most messages ever in flight at once.
    pub max_in_flight: AtomicI64,
    /// Times the source paused its partitions for backpressure.
    pub pauses: AtomicU64,
    /// Events whose handling ran past the stall deadline.
    pub stalled: AtomicU64,
    /// Errors inside orderly (store, Kafka client), retried or reported.
    pub errors: AtomicU64,
    /// Partitions paused for backpressure now.
    pub paused_partitions: AtomicI64,
    /// Dead letters with status open, as of the last store batch.
    pub open_dead_letters: AtomicI64,
    /// Parked entities, as of the last store batch.
    pub parked_entities: AtomicI64,
    /// Events waiting for a retry now.
    pub retrying: AtomicI64,
    /// The most recent corrections, newest last (in memory only; the
    /// durable feed is the changes topic).
    pub recent_corrections: Mutex<std::collections::VecDeque<Correction>>,
    /// Consumer lag by (topic, partition), from librdkafka's statistics.
    pub lag: Mutex<BTreeMap<(String, i32), i64>>,
    /// Changelog records restored.
    pub restored_records: AtomicU64,
    /// Time spent restoring partitions, µs.
    pub restore_micros: AtomicU64,
    /// Entities whose events began arriving on a second partition and were
    /// combined here (see `orderly_handovers_total`).
    pub handovers: AtomicU64,
    /// Events forwarded from a stub to their entity's new partition.
    pub forwarded: AtomicU64,
    /// The input partitions assigned to this instance now.
    pub assigned: Mutex<std::collections::BTreeSet<(String, i32)>>,
    /// The durable checkpoint of each partition and when it last advanced.
    pub checkpoints: Mutex<BTreeMap<(String, i32), (i64, SystemTime)>>,
    latency: Mutex<Latency>,
}

#[derive(Debug)]
struct Latency {
    append_to_durable: Histogram<u64>,
    occurred_to_durable: Histogram<u64>,
    /// append → durable since the last [`Stats::take_window`].
    window: Histogram<u64>,
}

impl Default for Latency {
    fn default() -> Self {
        let h = || {
            Histogram::new_with_bounds(1, 3_600_000_000, 3)
                .expect("static histogram bounds are valid")
        };
        Latency {
            append_to_durable: h(),
            occurred_to_durable: h(),
            window: h(),
        }
    }
}

/// A late event that changed the state, as the dashboard lists it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Correction {
    /// When it was processed, ms since the Unix epoch.
    pub at_ms: i64,
    /// The entity.
    pub entity_id: String,
    /// The late event.
    pub event_id: String,
    /// `late-recomputed` or `late-applied`.
    pub outcome: &'static str,
    /// The fields whose value changed.
    pub fields: Vec<String>,
}

impl Percentiles {
    /// As JSON, in milliseconds: `count`, `p50_ms`, `p95_ms`, `p99_ms`, `max_ms`.
    pub fn to_json(&self) -> serde_json::Value {
        let ms = |us: u64| us as f64 / 1000.0;
        serde_json::json!({
            "count": self.count,
            "p50_ms": ms(self.p50),
            "p95_ms": ms(self.p95),
            "p99_ms": ms(self.p99),
            "max_ms": ms(self.max),
        })
    }
}

/// Corrections kept for the dashboard.
const RECENT_CORRECTIONS: usize = 50;

/// Latency percentiles, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Percentiles {
    /// Samples recorded.
    pub count: u64,
    /// Median.
    pub p50: u64,
    /// 95th percentile.
    pub p95: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Maximum.
    pub max: u64,
}

/// The percentiles of a latency histogram (µs).
pub fn percentiles(h: &Histogram<u64>) -> Percentiles {
    Percentiles {
        count: h.len(),
        p50: h.value_at_quantile(0.50),
        p95: h.value_at_quantile(0.95),
        p99: h.value_at_quantile(0.99),
        max: h.max(),
    }
}

impl Stats {
    /// Adds one to a counter.
    pub fn incr(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    /// Records the latencies of a batch of durable events, in microseconds.
    /// `samples` holds (append → durable, occurred → durable) per event.
    pub fn record_latencies(&self, samples: impl Iterator<Item = (Option<u64>, Option<u64>)>) {
        let Ok(mut l) = self.latency.lock() else {
            return;
        };
        for (append, occurred) in samples {
            if let Some(us) = append {
                l.append_to_durable.saturating_record(us.max(1));
                l.window.saturating_record(us.max(1));
            }
            if let Some(us) = occurred {
                l.occurred_to_durable.saturating_record(us.max(1));
            }
        }
    }

    /// Keeps `c` in the recent-corrections list.
    pub fn record_correction(&self, c: Correction) {
        if let Ok(mut r) = self.recent_corrections.lock() {
            if r.len() == RECENT_CORRECTIONS {
                r.pop_front();
            }
            r.push_back(c);
        }
    }

    /// Kafka append → durable latency (µs) since the previous call, and a fresh window.
    pub fn take_window(&self) -> Option<Histogram<u64>> {
        self.latency.lock().ok().map(|mut l| {
            let h = l.window.clone();
            l.window.reset();
            h
        })
    }

    /// Kafka append → durable latency so far.
    pub fn append_to_durable(&self) -> Percentiles {
        self.latency
            .lock()
            .map(|l| percentiles(&l.append_to_durable))
            .unwrap_or_default()
    }

    /// occurred_at → durable latency so far.
    pub fn occurred_to_durable(&self) -> Percentiles {
        self.latency
            .lock()
            .map(|l| percentiles(&l.occurred_to_durable))
            .unwrap_or_default()
    }

    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Relaxed)
    }
}

/// The process-wide Prometheus recorder, installed on first use. `None` when
/// the embedding application installed another `metrics` recorder first (then
/// orderly's metrics go to that one).
///
/// Metrics are process-wide: run one pipeline per process when you scrape
/// them. [`Stats`] stays per pipeline.
pub fn prometheus() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("_seconds".into()),
                    LATENCY_BUCKETS,
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("orderly_store_batch_size".into()),
                        BATCH_BUCKETS,
                    )
                })
                .map(|b| {
                    // Gauges are set at every scrape; one not set for 10
                    // minutes belongs to a partition this instance lost.
                    b.idle_timeout(MetricKindMask::GAUGE, Some(Duration::from_secs(600)))
                });
            let handle = match builder.and_then(|b| b.install_recorder()) {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(error = %e, "Prometheus recorder not installed; /metrics will be empty");
                    return None;
                }
            };
            for (name, kind, help) in CATALOGUE {
                match kind {
                    Kind::Counter => ::metrics::describe_counter!(*name, *help),
                    Kind::Gauge => ::metrics::describe_gauge!(*name, *help),
                    Kind::Histogram => ::metrics::describe_histogram!(*name, *help),
                }
            }
            register_catalogue();
            Some(handle)
        })
        .as_ref()
}
