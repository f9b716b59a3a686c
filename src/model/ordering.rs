//! The order key and how an arriving event is classified against an entity.
//!
//! Owns the total order of an entity's events. It does not own what happens
//! to a late event (that is the fold's policy); it only says where it falls.

use crate::model::envelope::Event;
use serde::{Deserialize, Serialize};

/// Orders an entity's events totally and deterministically.
///
/// Compared field by field: `version` (absent sorts before any version),
/// then `occurred_at`, then `event_id` as the final tie-breaker. So it is
/// `(version, occurred_at, event_id)` when the external system versions its
/// events, and `(occurred_at, event_id)` when it does not.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct OrderKey {
    /// The external version, if the source system provides one.
    pub version: Option<u64>,
    /// External timestamp, ms since the Unix epoch.
    pub occurred_at: i64,
    /// The event id, which makes the order total.
    pub event_id: String,
}

impl OrderKey {
    /// The order key of an event.
    pub fn of(event: &Event) -> Self {
        OrderKey {
            version: event.version,
            occurred_at: event.occurred_at,
            event_id: event.event_id.clone(),
        }
    }
}

/// How far behind its entity's high-water mark a late event is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lateness {
    /// High-water `occurred_at` minus the event's `occurred_at`, in ms.
    pub millis: i64,
    /// High-water version minus the event's version, when both have one.
    pub versions: Option<u64>,
}

impl Lateness {
    /// The lateness of `key` behind `high_water`.
    pub fn between(key: &OrderKey, high_water: &OrderKey) -> Self {
        Lateness {
            millis: high_water.occurred_at.saturating_sub(key.occurred_at),
            versions: match (high_water.version, key.version) {
                (Some(h), Some(k)) => Some(h.saturating_sub(k)),
                _ => None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(version: Option<u64>, at: i64, id: &str) -> OrderKey {
        OrderKey {
            version,
            occurred_at: at,
            event_id: id.into(),
        }
    }

    #[test]
    fn version_wins_over_time_and_id_breaks_ties() {
        assert!(key(Some(2), 0, "a") > key(Some(1), 99, "z"));
        assert!(key(None, 5, "a") < key(None, 6, "a"));
        assert!(key(None, 5, "a") < key(None, 5, "b"));
        assert!(key(None, 99, "z") < key(Some(0), 0, "a"));
    }

    #[test]
    fn lateness_in_time_and_versions() {
        let l = Lateness::between(&key(Some(3), 100, "a"), &key(Some(7), 250, "b"));
        assert_eq!(
            l,
            Lateness {
                millis: 150,
                versions: Some(4)
            }
        );
    }
}

/// What to do with a late event: one below its entity's high-water mark but
/// within the retained log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LatePolicy {
    /// Insert it into the log and re-fold from the base snapshot (the default:
    /// the result is the in-order state).
    #[default]
    Recompute,
    /// Apply it on top of the current state, without a re-fold. Right for
    /// commutative effects, such as counters.
    Apply,
    /// Discard it, and report it.
    Drop,
    /// Hold the entity: this and its later events wait until an operator
    /// releases or skips it.
    Park,
}

/// What to do with an event older than everything the entity's log retains.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TooLatePolicy {
    /// Discard it, and report it (the default: it cannot be placed correctly).
    #[default]
    Drop,
    /// Apply it on top of the current state (for commutative effects).
    Apply,
    /// Hold the entity until an operator decides.
    Park,
}

impl LatePolicy {
    /// The policy's name.
    pub fn name(self) -> &'static str {
        match self {
            LatePolicy::Recompute => "recompute",
            LatePolicy::Apply => "apply",
            LatePolicy::Drop => "drop",
            LatePolicy::Park => "park",
        }
    }
}

impl TooLatePolicy {
    /// The policy's name.
    pub fn name(self) -> &'static str {
        match self {
            TooLatePolicy::Drop => "drop",
            TooLatePolicy::Apply => "apply",
            TooLatePolicy::Park => "park",
        }
    }
}

/// The out-of-order policies and retention, per event type.
#[derive(Clone, Debug, PartialEq)]
pub struct Policies {
    late: std::collections::HashMap<String, LatePolicy>,
    too_late: std::collections::HashMap<String, TooLatePolicy>,
    history: std::collections::HashSet<String>,
    default_late: LatePolicy,
    default_too_late: TooLatePolicy,
    /// Most events kept in an entity's log.
    pub retention_events: usize,
    /// Log entries this much older (by occurred_at) than the high-water mark
    /// are folded into the base, if set.
    pub retention_ms: Option<i64>,
    /// Most events a parked entity holds; later ones are dead-lettered
    /// (`held_limit`), so a parked entity's record cannot grow without bound.
    pub max_held: usize,
}

impl Default for Policies {
    fn default() -> Self {
        Policies {
            late: Default::default(),
            too_late: Default::default(),
            history: Default::default(),
            default_late: LatePolicy::Recompute,
            default_too_late: TooLatePolicy::Drop,
            retention_events: 32,
            retention_ms: None,
            max_held: 10_000,
        }
    }
}

impl Policies {
    /// Policies with these defaults and retention.
    pub fn new(
        default_late: LatePolicy,
        default_too_late: TooLatePolicy,
        retention_events: usize,
        retention_ms: Option<i64>,
    ) -> Self {
        Policies {
            default_late,
            default_too_late,
            retention_events,
            retention_ms,
            ..Default::default()
        }
    }

    /// Sets the policies of one event type.
    pub fn with_type(
        mut self,
        event_type: &str,
        late: Option<LatePolicy>,
        too_late: Option<TooLatePolicy>,
        history: bool,
    ) -> Self {
        if let Some(p) = late {
            self.late.insert(event_type.to_owned(), p);
        }
        if let Some(p) = too_late {
            self.too_late.insert(event_type.to_owned(), p);
        }
        if history {
            self.history.insert(event_type.to_owned());
        }
        self
    }

    /// The late policy of `event_type`.
    pub fn late(&self, event_type: &str) -> LatePolicy {
        self.late
            .get(event_type)
            .copied()
            .unwrap_or(self.default_late)
    }

    /// The too-late policy of `event_type`.
    pub fn too_late(&self, event_type: &str) -> TooLatePolicy {
        self.too_late
            .get(event_type)
            .copied()
            .unwrap_or(self.default_too_late)
    }

    /// Whether events of `event_type` keep history (a version per event).
    pub fn history(&self, event_type: &str) -> bool {
        self.history.contains(event_type)
    }
}
