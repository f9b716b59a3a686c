//! What entity actors observe: events processed, dead letters, retries,
//! actors started, stopped and passivated, stalls.

use super::InternalEvent;
use crate::metrics::Stats;
use std::sync::atomic::Ordering::Relaxed;

use crate::model::fold::Outcome;

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
            Outcome::Applied { .. } => &stats.entities.applied,
            Outcome::Duplicate(_) => &stats.entities.duplicates,
            Outcome::Recomputed { .. } => &stats.entities.late_recomputed,
            Outcome::LateApplied { .. } => &stats.entities.late_applied,
            Outcome::Dropped {
                too_late: false, ..
            } => &stats.entities.late_dropped,
            Outcome::Dropped { too_late: true, .. } => &stats.entities.too_late,
            Outcome::Parked { .. } => &stats.entities.parked,
            Outcome::Held => &stats.entities.held,
            Outcome::Ignored { .. } => &stats.entities.ignored,
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
            Stats::incr(&stats.entities.corrections);
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
    /// Where: `decode` (the source), `handler` (an entity actor) or
    /// `restore` (a changelog record).
    pub stage: &'static str,
    /// The error code, from a bounded set.
    pub code: &'a str,
}

impl InternalEvent for DeadLettered<'_> {
    fn emit(self, stats: &Stats) {
        Stats::incr(&stats.entities.dead_letters);
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
        Stats::incr(&stats.entities.retries);
        stats.entities.retrying.fetch_add(1, Relaxed);
        ::metrics::counter!("orderly_retries_total").increment(1);
    }
}

/// A scheduled retry's backoff ended: the event is attempted again.
pub struct RetryDue;

impl InternalEvent for RetryDue {
    fn emit(self, stats: &Stats) {
        stats.entities.retrying.fetch_sub(1, Relaxed);
    }
}

/// An entity actor started.
pub struct ActorStarted;

impl InternalEvent for ActorStarted {
    fn emit(self, stats: &Stats) {
        stats.entities.active_actors.fetch_add(1, Relaxed);
        stats.entities.actor_starts.fetch_add(1, Relaxed);
        ::metrics::counter!("orderly_actor_starts_total").increment(1);
    }
}

/// An entity actor stopped.
pub struct ActorStopped;

impl InternalEvent for ActorStopped {
    fn emit(self, stats: &Stats) {
        stats.entities.active_actors.fetch_sub(1, Relaxed);
    }
}

/// Idle actors were passivated.
pub struct ActorsPassivated {
    /// How many.
    pub count: u64,
}

impl InternalEvent for ActorsPassivated {
    fn emit(self, stats: &Stats) {
        stats.entities.passivations.fetch_add(self.count, Relaxed);
        ::metrics::counter!("orderly_passivations_total").increment(self.count);
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
        Stats::incr(&stats.entities.stalled);
        ::metrics::counter!("orderly_stalled_events_total").increment(1);
    }
}
