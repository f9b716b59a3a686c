//! History: every version of an entity, for event types marked `history = true`.
//!
//! Each applied event of such a type is stored under `h\0<entity>\0<order key>`,
//! so a prefix scan yields the entity's events in order-key order. Folding
//! them gives the version after each event, and the state as of any time
//! (the fold of the events with `occurred_at` at or before it).

use crate::model::fold::{EntityRecord, LogEntry};
use crate::model::handler::{EntityState, Handlers};
use crate::model::ordering::OrderKey;
use crate::model::tenant::TenantView;

/// Encodes an order key so that byte order is order-key order.
pub fn encode_key(key: &OrderKey) -> Vec<u8> {
    let mut out = Vec::with_capacity(18 + key.event_id.len());
    match key.version {
        None => out.push(0),
        Some(v) => {
            out.push(1);
            out.extend_from_slice(&v.to_be_bytes());
        }
    }
    out.extend_from_slice(&((key.occurred_at as u64) ^ (1 << 63)).to_be_bytes());
    out.extend_from_slice(key.event_id.as_bytes());
    out
}

/// One version: the event that made it, and the state after it.
#[derive(Clone, Debug, PartialEq)]
pub struct Version {
    /// The event (with provenance).
    pub entry: LogEntry,
    /// The state after it.
    pub state: EntityState,
}

/// Folds `entries` (in order-key order) into the versions they produce.
///
/// Each handler gets the settings version its entry was handled under, while
/// `settings` knows it; payloads in the log are already mapped.
pub fn versions(
    record: &EntityRecord,
    entries: &[LogEntry],
    handlers: &Handlers,
    settings: &TenantView,
) -> Vec<Version> {
    let mut state = EntityState::default();
    let mut out = Vec::with_capacity(entries.len());
    for entry in entries {
        let event = record.event_of(entry);
        let mut next = state.clone();
        if handlers
            .for_type(&entry.event_type)
            .apply(
                &mut next,
                &event,
                settings.at(entry.provenance.settings_version),
            )
            .is_ok()
        {
            state = next;
        }
        out.push(Version {
            entry: entry.clone(),
            state: state.clone(),
        });
    }
    out
}

/// The state as of `at` (ms): the fold of every known event with
/// `occurred_at <= at`, from the history and the retained log. `complete` is
/// false when events older than the retained log exist that the history does
/// not hold, so the answer may miss them.
pub fn as_of(
    record: &EntityRecord,
    history: &[LogEntry],
    at: i64,
    handlers: &Handlers,
    settings: &TenantView,
) -> (EntityState, bool) {
    let mut entries: Vec<LogEntry> = history.to_vec();
    for e in &record.log {
        if !entries.iter().any(|h| h.key.event_id == e.key.event_id) {
            entries.push(e.clone());
        }
    }
    entries.sort_by(|a, b| a.key.cmp(&b.key));
    let complete = record.base.key.is_none()
        || record
            .base
            .key
            .as_ref()
            .is_some_and(|b| entries.first().is_some_and(|f| f.key <= *b));
    let relevant: Vec<LogEntry> = entries
        .into_iter()
        .filter(|e| e.key.occurred_at <= at)
        .collect();
    let state = versions(record, &relevant, handlers, settings)
        .pop()
        .map(|v| v.state)
        .unwrap_or_default();
    (state, complete)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_keys_sort_like_order_keys() {
        let keys = [
            OrderKey {
                version: None,
                occurred_at: -5,
                event_id: "a".into(),
            },
            OrderKey {
                version: None,
                occurred_at: 3,
                event_id: "a".into(),
            },
            OrderKey {
                version: None,
                occurred_at: 3,
                event_id: "b".into(),
            },
            OrderKey {
                version: Some(0),
                occurred_at: -9,
                event_id: "a".into(),
            },
            OrderKey {
                version: Some(2),
                occurred_at: 1,
                event_id: "a".into(),
            },
        ];
        for w in keys.windows(2) {
            assert!(w[0] < w[1]);
            assert!(encode_key(&w[0]) < encode_key(&w[1]), "{w:?}");
        }
    }
}
