//! The audit: replay an entity's events in order-key order, in memory, and
//! compare the result with the stored state, field by field.
//!
//! The replay reads the entity's history (for types with `history = true`)
//! when it reaches back to the entity's first event, and otherwise the base
//! snapshot plus the retained log. So without history the audit checks that
//! the stored state is the fold of the retained log on top of the snapshot;
//! it cannot re-derive the snapshot itself. `--repair` writes the replayed
//! state and emits a correction record for each repaired entity.

use crate::model::change::{ChangeRecord, JsonChange};
use crate::model::fold::{diff, EntityRecord, FieldChange, LogEntry};
use crate::model::handler::Handlers;
use crate::store::{CommitBatch, OutboxRecord, Store, StoreError};
use serde::Serialize;

/// Where a replay's events came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The full history of the entity.
    History,
    /// The base snapshot and the retained log.
    Log,
}

/// One field that differs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FieldDiff {
    /// The field.
    pub field: String,
    /// The stored value (`null`: absent).
    pub stored: serde_json::Value,
    /// The replayed value (`null`: absent).
    pub replayed: serde_json::Value,
}

/// The audit of one entity.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EntityAudit {
    /// The entity.
    pub entity_id: String,
    /// Where the replay's events came from.
    pub source: Source,
    /// The fields that differ (the `deleted` flag shows as field `<deleted>`).
    pub fields: Vec<FieldDiff>,
}

/// Replays one entity. Returns the audit and the replayed record.
pub fn audit(
    record: &EntityRecord,
    history: &[LogEntry],
    handlers: &Handlers,
    settings: &crate::settings::TenantView,
) -> (EntityAudit, EntityRecord) {
    let mut replayed = record.clone();
    let full_history = !history.is_empty()
        && match &record.base.key {
            None => true,
            Some(b) => history.first().is_some_and(|h| h.key <= *b),
        };
    let source = if full_history {
        // Every event since the first: replay from an empty state.
        let mut entries: Vec<LogEntry> = history.to_vec();
        for e in &record.log {
            if !entries.iter().any(|h| h.key.event_id == e.key.event_id) {
                entries.push(e.clone());
            }
        }
        entries.sort_by(|a, b| a.key.cmp(&b.key));
        replayed.base = Default::default();
        replayed.log = entries;
        replayed.refold(handlers, settings);
        // Keep the stored retention shape: the replay only decides the state.
        replayed.log = record.log.clone();
        replayed.base = record.base.clone();
        Source::History
    } else {
        replayed.refold(handlers, settings);
        Source::Log
    };
    let json = |v: &Option<crate::model::value::Value>| {
        v.as_ref()
            .map(|v| v.to_json())
            .unwrap_or(serde_json::Value::Null)
    };
    let mut fields: Vec<FieldDiff> = diff(&record.state.fields, &replayed.state.fields)
        .iter()
        .map(|c: &FieldChange| FieldDiff {
            field: c.field.clone(),
            stored: json(&c.old),
            replayed: json(&c.new),
        })
        .collect();
    if record.state.deleted != replayed.state.deleted {
        fields.push(FieldDiff {
            field: "<deleted>".into(),
            stored: record.state.deleted.into(),
            replayed: replayed.state.deleted.into(),
        });
    }
    (
        EntityAudit {
            entity_id: record.entity_id.clone(),
            source,
            fields,
        },
        replayed,
    )
}

/// Writes the replayed record and a correction record for the repair, durably.
pub fn repair(
    store: &dyn Store,
    stored: &EntityRecord,
    replayed: &EntityRecord,
    changes_topic: &str,
    now_ms: i64,
) -> Result<(), StoreError> {
    let mut batch = CommitBatch {
        entities: vec![(replayed.entity_id.clone(), crate::store::encode(replayed))],
        ..Default::default()
    };
    if !changes_topic.is_empty() {
        let record = ChangeRecord {
            kind: "correction".into(),
            entity_id: replayed.entity_id.clone(),
            tenant_id: replayed.tenant_id.clone(),
            event_id: format!("audit-repair-{now_ms}"),
            event_type: "repair".into(),
            occurred_at: now_ms,
            changes: diff(&stored.state.fields, &replayed.state.fields)
                .iter()
                .map(JsonChange::from)
                .collect(),
            provenance: None,
            lateness: None,
        };
        batch.outbox.push(OutboxRecord {
            topic: changes_topic.to_owned(),
            key: Some(replayed.entity_id.clone().into_bytes()),
            value: record.to_bytes(),
            headers: vec![("content-type".into(), b"application/json".to_vec())],
            partition: None,
        });
        batch.assign_outbox_ids(|| store.next_id())?;
    }
    store.commit(&batch)?;
    futures::executor::block_on(store.flush())
}

/// A full audit's report.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Report {
    /// `i/n` when the audit covered one shard.
    pub shard: Option<String>,
    /// Entities replayed.
    pub entities_checked: u64,
    /// Entities whose stored state differs from the replay.
    pub entities_differing: u64,
    /// Fields that differ, over all entities.
    pub fields_differing: u64,
    /// Entities replayed from history, and from the snapshot and log.
    pub from_history: u64,
    /// Entities replayed from the snapshot and the retained log.
    pub from_log: u64,
    /// Entities repaired.
    pub repaired: u64,
    /// The differing entities.
    pub differences: Vec<EntityAudit>,
}

impl Report {
    /// Adds one entity's audit.
    pub fn add(&mut self, a: EntityAudit) {
        self.entities_checked += 1;
        match a.source {
            Source::History => self.from_history += 1,
            Source::Log => self.from_log += 1,
        }
        if !a.fields.is_empty() {
            self.entities_differing += 1;
            self.fields_differing += a.fields.len() as u64;
            self.differences.push(a);
        }
    }
}

/// Parses a shard spec `i/n` (0 ≤ i < n).
pub fn parse_shard(spec: &str) -> Result<(usize, usize), String> {
    let (i, n) = spec
        .split_once('/')
        .ok_or_else(|| format!("--shard {spec:?}: expected i/n, for example 0/4"))?;
    let i: usize = i
        .parse()
        .map_err(|_| format!("--shard {spec:?}: {i:?} is not a number"))?;
    let n: usize = n
        .parse()
        .map_err(|_| format!("--shard {spec:?}: {n:?} is not a number"))?;
    if n == 0 || i >= n {
        return Err(format!("--shard {spec:?}: need 0 <= i < n"));
    }
    Ok((i, n))
}
