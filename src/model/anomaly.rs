//! Anomaly records: every duplicate, late and too-late event, with how late
//! it was, the policy applied and the outcome.
//!
//! The writer stores them (the newest `anomalies_retained` are kept) and
//! publishes them to the anomalies topic through the outbox.

use crate::model::ordering::Lateness;
use serde::{Deserialize, Serialize};

/// One out-of-order or duplicate event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Anomaly {
    /// Sequence number, assigned by the writer; increases with time.
    pub seq: u64,
    /// `duplicate`, `late` or `too-late`.
    pub class: String,
    /// The entity.
    pub entity_id: String,
    /// Its tenant.
    pub tenant_id: String,
    /// The event.
    pub event_id: String,
    /// Its type.
    pub event_type: String,
    /// Its topic.
    pub topic: String,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// How far behind the entity's high-water mark it was.
    pub lateness: Option<Lateness>,
    /// The policy applied: `skip` for duplicates, else the type's policy.
    pub policy: String,
    /// What happened: the outcome name (`late-recomputed`, `late-dropped`, ...).
    pub outcome: String,
    /// When, ms since the Unix epoch.
    pub at: i64,
}

impl Anomaly {
    /// The JSON published to the anomalies topic.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}
