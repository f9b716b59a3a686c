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


/// The numbers of one pipeline, one group per component that books them.
/// Cheap to update from any thread.
///
/// Each happening is booked twice on purpose, by its
/// `internal_events` event: here, per pipeline (for the dashboard,
/// the benchmark, tests and an embedding application), and in the
/// process-wide Prometheus recorder (for scrapes). [`Stats::snapshot`] reads
/// them all at once.
#[derive(Debug, Default)]
pub struct Stats {
    /// What the Kafka source books.
    pub source: SourceStats,
    /// What the entity actors book.
    pub entities: EntityStats,
    /// What the store writer books.
    pub writer: WriterStats,
    /// What the changelog (restore, handover, forwarding) books.
    pub changelog: ChangelogStats,
    /// Errors inside orderly (store, Kafka client), retried or reported.
    pub errors: AtomicU64,
    /// The most recent corrections, newest last (in memory only; the
    /// durable feed is the changes topic).
    pub recent_corrections: Mutex<std::collections::VecDeque<Correction>>,
    latency: Mutex<Latency>,
}

/// What the Kafka source books.
#[derive(Debug, Default)]
pub struct SourceStats {
    /// Messages received from the broker.
    pub received: AtomicU64,
    /// Messages received and not yet durable.
    pub in_flight: AtomicI64,
    /// The most messages ever in flight at once.
    pub max_in_flight: AtomicI64,
    /// Bytes held by the messages in flight and by the record copies their
    /// write intents carry to the writer.
    pub in_flight_bytes: AtomicI64,
    /// The most bytes ever in flight at once.
    pub max_in_flight_bytes: AtomicI64,
    /// Times the source paused its partitions for backpressure.
    pub pauses: AtomicU64,
    /// Partitions paused for backpressure now.
    pub paused_partitions: AtomicI64,
    /// Consumer lag per partition, from librdkafka's statistics.
    pub lag: Mutex<BTreeMap<TopicPartition, i64>>,
    /// The input partitions assigned to this instance now.
    pub assigned: Mutex<std::collections::BTreeSet<TopicPartition>>,
}

/// What the entity actors book: the outcome of every event.
#[derive(Debug, Default)]
pub struct EntityStats {
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
    /// Events whose handling ran past the stall deadline.
    pub stalled: AtomicU64,
    /// Entity actors alive now.
    pub active_actors: AtomicI64,
    /// Entity actors passivated so far.
    pub passivations: AtomicU64,
    /// Entity actors started so far.
    pub actor_starts: AtomicU64,
    /// Events waiting for a retry now.
    pub retrying: AtomicI64,
}

/// What the store writer books.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Messages whose effects are durable (acknowledged).
    pub durable: AtomicU64,
    /// Store batches committed.
    pub batches: AtomicU64,
    /// Entity writes, after coalescing.
    pub entity_writes: AtomicU64,
    /// Entity records the actors encoded into their intents, before the
    /// writer's coalescing: one per event, or one per burst.
    pub records_encoded: AtomicU64,
    /// Microseconds store batches held the store's lock exclusively
    /// ([`crate::store::Committed::exclusive`]).
    pub exclusive_us: AtomicU64,
    /// Dead letters with status open, as of the last store batch.
    pub open_dead_letters: AtomicI64,
    /// Parked entities, as of the last store batch.
    pub parked_entities: AtomicI64,
    /// Outbox records the broker refused for good, moved aside.
    pub undeliverable: AtomicU64,
}

/// What the changelog books: restores, handovers and forwarded events.
#[derive(Debug, Default)]
pub struct ChangelogStats {
    /// True while changelog records are not acknowledged and are being
    /// retried: nothing is checkpointed meanwhile, and `/ready` says so.
    pub produce_failing: std::sync::atomic::AtomicBool,
    /// Changelog records restored.
    pub restored_records: AtomicU64,
    /// Time spent restoring partitions, µs.
    pub restore_micros: AtomicU64,
    /// Entities whose events began arriving on a second partition and were
    /// combined here (see `orderly_handovers_total`).
    pub handovers: AtomicU64,
    /// Events forwarded from a stub to their entity's new partition.
    pub forwarded: AtomicU64,
}

/// Every counter and gauge of [`Stats`] at one moment, as the dashboard's
/// `/api/overview` shows them.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Snapshot {
    /// Totals since start.
    pub counters: CounterSnapshot,
    /// Levels now.
    pub gauges: GaugeSnapshot,
    /// End-to-end latency percentiles.
    pub latency_ms: LatencySnapshot,
}

/// The totals of a [`Snapshot`].
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CounterSnapshot {
    /// Messages received.
    pub received: u64,
    /// Messages whose effects are durable.
    pub completed: u64,
    /// Events applied in order.
    pub applied: u64,
    /// Duplicates skipped.
    pub duplicates: u64,
    /// Late events re-folded.
    pub late_recomputed: u64,
    /// Late events applied on top.
    pub late_applied: u64,
    /// Late events dropped.
    pub late_dropped: u64,
    /// Events older than the retained log.
    pub too_late: u64,
    /// Entities parked by a late event.
    pub parked_events: u64,
    /// Events held by parked entities.
    pub held: u64,
    /// Events ignored by the tenant's settings.
    pub ignored: u64,
    /// Corrections emitted.
    pub corrections: u64,
    /// Retries after transient failures.
    pub retries: u64,
    /// Messages dead-lettered.
    pub dead_letters: u64,
    /// Events that ran past the stall deadline.
    pub stalled: u64,
    /// Actors passivated.
    pub passivations: u64,
    /// Actors started.
    pub actor_starts: u64,
    /// Backpressure pauses.
    pub pauses: u64,
    /// Errors inside orderly.
    pub errors: u64,
    /// Store batches committed.
    pub batches: u64,
    /// Entity writes after coalescing.
    pub entity_writes: u64,
    /// Changelog records restored.
    pub restored_records: u64,
    /// Entities combined from a second partition.
    pub handovers: u64,
    /// Events forwarded to an entity's new partition.
    pub forwarded: u64,
}

/// The levels of a [`Snapshot`].
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct GaugeSnapshot {
    /// Messages received and not yet durable.
    pub in_flight: i64,
    /// The most ever in flight at once.
    pub max_in_flight: i64,
    /// Bytes in flight: messages and their record copies.
    pub in_flight_bytes: i64,
    /// The most bytes ever in flight at once.
    pub max_in_flight_bytes: i64,
    /// Entity actors alive.
    pub active_actors: i64,
    /// Partitions paused for backpressure.
    pub paused_partitions: i64,
    /// Open dead letters.
    pub failed: i64,
    /// Parked entities.
    pub parked: i64,
    /// Events waiting for a retry.
    pub retrying: i64,
}

/// The latency part of a [`Snapshot`].
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct LatencySnapshot {
    /// Kafka append → durable.
    pub append_to_durable: Percentiles,
    /// The event's `occurred_at` → durable.
    pub occurred_to_durable: Percentiles,
    /// Received from the consumer → durable: orderly's own share of the
    /// append → durable latency (the rest is the producer, the broker and
    /// the fetch).
    pub received_to_durable: Percentiles,
}

/// The latency of one message made durable, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DurableLatency {
    /// Kafka append → durable, when the message has a timestamp.
    pub append: Option<u64>,
    /// The event's `occurred_at` → durable, when it was decoded.
    pub occurred: Option<u64>,
    /// Received from the consumer → durable.
    pub received: u64,
}

/// The latency since the last [`Stats::take_window`].
pub struct LatencyWindow {
    /// Kafka append → durable, µs.
    pub append: Histogram<u64>,
    /// Received → durable, µs.
    pub received: Histogram<u64>,
}

pub use crate::model::position::TopicPartition;

#[derive(Debug)]
struct Latency {
    append_to_durable: Histogram<u64>,
    occurred_to_durable: Histogram<u64>,
    received_to_durable: Histogram<u64>,
    /// append → durable since the last [`Stats::take_window`].
    window: Histogram<u64>,
    /// received → durable since the last [`Stats::take_window`].
    received_window: Histogram<u64>,
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
            received_to_durable: h(),
            window: h(),
            received_window: h(),
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

impl serde::Serialize for Percentiles {
    /// In milliseconds: `count`, `p50_ms`, `p95_ms`, `p99_ms`, `max_ms`.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let ms = |us: u64| us as f64 / 1000.0;
        let mut out = s.serialize_struct("Percentiles", 5)?;
        out.serialize_field("count", &self.count)?;
        out.serialize_field("p50_ms", &ms(self.p50))?;
        out.serialize_field("p95_ms", &ms(self.p95))?;
        out.serialize_field("p99_ms", &ms(self.p99))?;
        out.serialize_field("max_ms", &ms(self.max))?;
        out.end()
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

    /// Records the latencies of a batch of durable events.
    pub fn record_latencies(&self, samples: impl Iterator<Item = DurableLatency>) {
        let Ok(mut l) = self.latency.lock() else {
            return;
        };
        for s in samples {
            if let Some(us) = s.append {
                l.append_to_durable.saturating_record(us.max(1));
                l.window.saturating_record(us.max(1));
            }
            if let Some(us) = s.occurred {
                l.occurred_to_durable.saturating_record(us.max(1));
            }
            l.received_to_durable.saturating_record(s.received.max(1));
            l.received_window.saturating_record(s.received.max(1));
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

    /// The latency since the previous call, and a fresh window.
    pub fn take_window(&self) -> Option<LatencyWindow> {
        self.latency.lock().ok().map(|mut l| {
            let w = LatencyWindow {
                append: l.window.clone(),
                received: l.received_window.clone(),
            };
            l.window.reset();
            l.received_window.reset();
            w
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

    /// Received → durable latency so far: orderly's own share.
    pub fn received_to_durable(&self) -> Percentiles {
        self.latency
            .lock()
            .map(|l| percentiles(&l.received_to_durable))
            .unwrap_or_default()
    }

    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        // Acquire, for the writer's release fence before it counts events
        // durable: a reader that sees an event counted durable sees its
        // actor's durable count too. Other counters carry no such promise.
        counter.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Every counter and gauge now. Each is read on its own, so a snapshot
    /// taken while events flow may be off by the events of that instant.
    pub fn snapshot(&self) -> Snapshot {
        let c = |a: &AtomicU64| a.load(Relaxed);
        let g = |a: &AtomicI64| a.load(Relaxed);
        let (source, entities, writer, changelog) =
            (&self.source, &self.entities, &self.writer, &self.changelog);
        Snapshot {
            counters: CounterSnapshot {
                received: c(&source.received),
                completed: c(&writer.durable),
                applied: c(&entities.applied),
                duplicates: c(&entities.duplicates),
                late_recomputed: c(&entities.late_recomputed),
                late_applied: c(&entities.late_applied),
                late_dropped: c(&entities.late_dropped),
                too_late: c(&entities.too_late),
                parked_events: c(&entities.parked),
                held: c(&entities.held),
                ignored: c(&entities.ignored),
                corrections: c(&entities.corrections),
                retries: c(&entities.retries),
                dead_letters: c(&entities.dead_letters),
                stalled: c(&entities.stalled),
                passivations: c(&entities.passivations),
                actor_starts: c(&entities.actor_starts),
                pauses: c(&source.pauses),
                errors: c(&self.errors),
                batches: c(&writer.batches),
                entity_writes: c(&writer.entity_writes),
                restored_records: c(&changelog.restored_records),
                handovers: c(&changelog.handovers),
                forwarded: c(&changelog.forwarded),
            },
            gauges: GaugeSnapshot {
                in_flight: g(&source.in_flight),
                max_in_flight: g(&source.max_in_flight),
                in_flight_bytes: g(&source.in_flight_bytes),
                max_in_flight_bytes: g(&source.max_in_flight_bytes),
                active_actors: g(&entities.active_actors),
                paused_partitions: g(&source.paused_partitions),
                failed: g(&writer.open_dead_letters),
                parked: g(&writer.parked_entities),
                retrying: g(&entities.retrying),
            },
            latency_ms: LatencySnapshot {
                append_to_durable: self.append_to_durable(),
                occurred_to_durable: self.occurred_to_durable(),
                received_to_durable: self.received_to_durable(),
            },
        }
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
            spawn_upkeep(handle.clone());
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

/// How often the recorder folds histogram samples in without a scrape.
const UPKEEP_EVERY: Duration = Duration::from_secs(1);

/// Upkeep passes run so far (for the test that the thread runs).
static UPKEEPS: AtomicU64 = AtomicU64::new(0);

/// Runs the recorder's upkeep every [`UPKEEP_EVERY`] on a thread of its own.
///
/// The exporter keeps every histogram sample in a bucket until upkeep or a
/// scrape folds them into the histogram, and `install_recorder` leaves the
/// upkeep to its caller. Without it, a process nobody scrapes kept about 50
/// bytes per event for good: about 370 MB over `soak`'s 7.2 million events
/// (BENCHMARKS.md, "Where the soak's memory went").
fn spawn_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name("orderly-metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP_EVERY);
            handle.run_upkeep();
            UPKEEPS.fetch_add(1, Relaxed);
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "the metrics upkeep thread did not start; histogram samples are folded in only when /metrics is scraped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Histogram samples are folded in without a scrape: the recorder's
    /// upkeep runs on its own thread, so a process nobody scrapes does not
    /// keep every sample it ever recorded.
    #[test]
    fn the_recorder_keeps_up_without_a_scrape() {
        assert!(prometheus().is_some(), "no other recorder in this test binary");
        let before = UPKEEPS.load(Relaxed);
        let deadline = std::time::Instant::now() + 20 * UPKEEP_EVERY;
        while UPKEEPS.load(Relaxed) <= before {
            assert!(
                std::time::Instant::now() < deadline,
                "no upkeep ran in {:?}",
                20 * UPKEEP_EVERY
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The snapshot reads every group, and serialises under the names the
    /// dashboard reads (`src/dashboard.html`).
    #[test]
    fn snapshot_reads_each_component_under_the_dashboards_names() {
        let stats = Stats::default();
        stats.source.received.fetch_add(5, Relaxed);
        stats.source.in_flight.fetch_add(2, Relaxed);
        stats.entities.parked.fetch_add(1, Relaxed);
        stats.entities.active_actors.fetch_add(3, Relaxed);
        stats.writer.durable.fetch_add(4, Relaxed);
        stats.writer.open_dead_letters.fetch_add(6, Relaxed);
        stats.writer.parked_entities.fetch_add(7, Relaxed);
        stats.changelog.forwarded.fetch_add(8, Relaxed);
        stats.errors.fetch_add(9, Relaxed);
        stats.record_latencies(
            [DurableLatency {
                append: Some(2_000),
                occurred: Some(3_000),
                received: 1_000,
            }]
            .into_iter(),
        );
        let json = serde_json::to_value(stats.snapshot()).unwrap();
        let c = &json["counters"];
        assert_eq!(
            (&c["received"], &c["completed"], &c["parked_events"]),
            (&5.into(), &4.into(), &1.into())
        );
        assert_eq!((&c["forwarded"], &c["errors"]), (&8.into(), &9.into()));
        let g = &json["gauges"];
        assert_eq!(
            (&g["in_flight"], &g["active_actors"], &g["failed"], &g["parked"]),
            (&2.into(), &3.into(), &6.into(), &7.into())
        );
        let append = &json["latency_ms"]["append_to_durable"];
        assert_eq!(append["count"], 1);
        assert!((append["p50_ms"].as_f64().unwrap() - 2.0).abs() < 0.01, "{append}");
        assert!(json["latency_ms"]["occurred_to_durable"]["max_ms"].as_f64().unwrap() >= 2.99);
        let received = json["latency_ms"]["received_to_durable"]["max_ms"].as_f64().unwrap();
        assert!((0.99..2.0).contains(&received), "{received}");
    }
}
