//! The order key and how an arriving event is classified against an entity.
//!
//! Owns the total order of an entity's events. It does not own what happens
//! to a late event (that is the fold's policy); it only says where it falls.

use crate::envelope::Event;
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
