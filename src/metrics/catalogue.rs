//! The metric catalogue: every metric orderly exports, with its kind and
//! help, the histogram buckets, and the zero-registration of known series.
//!
//! The Grafana dashboard, the alert rules and the tests are checked against
//! [`CATALOGUE`].

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
        "orderly_outbox_undeliverable_total",
        Kind::Counter,
        "Outbox records the broker refused for good and that were moved aside, by reason.",
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
        "orderly_actor_starts_total",
        Kind::Counter,
        "Entity actors started; about one per event means max_actors is below the hot set.",
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
        "orderly_in_flight_bytes",
        Kind::Gauge,
        "Bytes held by messages received and not yet durable, and by the record copies their writes carry.",
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
        "orderly_entity_records_encoded_total",
        Kind::Counter,
        "Entity records encoded by the actors: one per event, or one per burst of a hot entity's events.",
    ),
    (
        "orderly_store_flush_seconds",
        Kind::Histogram,
        "Time to commit and flush one store batch.",
    ),
    (
        "orderly_store_exclusive_seconds",
        Kind::Histogram,
        "Time one store batch held sled's process-wide lock exclusively (apply_batch); no entity record can be read meanwhile. The rate of its sum is the share of time reads wait.",
    ),
    (
        "orderly_store_size_bytes",
        Kind::Gauge,
        "Size of the sled data dir on disk.",
    ),
    (
        "orderly_entity_filter_state",
        Kind::Gauge,
        "The filter of stored entity ids: 0 filling (its scan at start runs; every lookup reads the store), 1 complete, 2 switched off after a wrong answer (a bug; every lookup reads the store).",
    ),
    (
        "orderly_entity_lookups_skipped_total",
        Kind::Counter,
        "Entity lookups the filter of stored ids answered without reading the store (entities it never held).",
    ),
    (
        "orderly_record_e2e_latency_seconds",
        Kind::Histogram,
        "From Kafka append (from=append), occurred_at (from=occurred) or orderly receiving the message (from=received, orderly's own share) to durable.",
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
        "orderly_actor_starts_total",
        "orderly_entity_records_encoded_total",
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
    for reason in ["too_large", "no_such_topic", "not_authorized", "invalid_record"] {
        counter!("orderly_outbox_undeliverable_total", "reason" => reason).increment(0);
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
    for from in ["append", "occurred", "received"] {
        let _ = histogram!("orderly_record_e2e_latency_seconds", "from" => from);
    }
    let _ = histogram!("orderly_record_lateness_seconds");
    let _ = histogram!("orderly_store_batch_size");
    let _ = histogram!("orderly_store_flush_seconds");
    let _ = histogram!("orderly_store_exclusive_seconds");
    let _ = histogram!("orderly_restore_seconds");
    ::metrics::gauge!("orderly_restoring_partitions").set(0.0);
    ::metrics::gauge!("orderly_restore_rate").set(0.0);
}
