//! Combining records of one entity kept under two partitions (key moves),
//! forwarding stubs, and trimming the log into the base snapshot.

use super::*;

impl EntityRecord {
    /// Combines `other`, a record of the same entity kept under another
    /// partition, into this one: the union of the two event logs, re-folded.
    /// Because the state is a function of the set of events, the result is
    /// what one record would hold had it seen every event of both, in any
    /// order. It is idempotent: merging the same record again adds nothing.
    ///
    /// Counters of distinct events follow the union: `applied_events` grows
    /// by the events this record lacked. The per-partition offsets are
    /// combined, so a redelivery from either partition is still a duplicate.
    /// When the two bases differ, the one that folded more (the higher order
    /// key) is kept; retained events of the other below it cannot be
    /// re-folded and are counted as too late, as any event older than the
    /// retention is.
    pub fn merge(
        &mut self,
        other: &EntityRecord,
        handlers: &Handlers,
        settings: &TenantView,
    ) -> Merged {
        let topic = self
            .placement
            .home
            .as_ref()
            .or(other.placement.home.as_ref())
            .map(|h| h.topic.clone())
            .unwrap_or_default();
        let partitions_before = self.partitions_of(&topic);
        let before = self.state.fields.clone();
        let mut merged = Merged::default();
        if other.base.key > self.base.key {
            let floor = other.base.key.clone();
            let (keep, below): (Vec<LogEntry>, Vec<LogEntry>) = std::mem::take(&mut self.log)
                .into_iter()
                .partition(|e| Some(&e.key) > floor.as_ref());
            merged.too_late += below
                .iter()
                .filter(|e| !other.log.iter().any(|o| o.key.event_id == e.key.event_id))
                .count();
            // The other record counted everything its base folded; ours adds
            // what only we retain.
            let own = keep
                .iter()
                .filter(|e| !other.log.iter().any(|o| o.key.event_id == e.key.event_id))
                .count();
            self.counters.applied_events = other.counters.applied_events + own as u64;
            self.base = other.base.clone();
            self.log = keep;
            merged.rebased = true;
        }
        let known: std::collections::HashSet<&str> =
            self.log.iter().map(|e| e.key.event_id.as_str()).collect();
        let mut fresh = Vec::new();
        for e in &other.log {
            if known.contains(e.key.event_id.as_str()) {
                continue;
            }
            if self.base.key.as_ref().is_some_and(|b| e.key <= *b) {
                merged.too_late += 1;
                continue;
            }
            fresh.push(e.clone());
        }
        merged.added = fresh.len();
        self.log.extend(fresh);
        self.log.sort_by(|a, b| a.key.cmp(&b.key));
        for (tp, &offset) in &other.applied_offsets {
            let o = self.applied_offsets.entry(tp.clone()).or_insert(offset);
            *o = (*o).max(offset);
        }
        for s in &other.parking.skipped {
            if !self
                .parking
                .skipped
                .iter()
                .any(|x| x.event_id == s.event_id)
            {
                self.parking.skipped.push(s.clone());
            }
        }
        if self.tenant_id.is_empty() {
            self.tenant_id = other.tenant_id.clone();
        }
        if !merged.rebased {
            self.counters.applied_events += merged.added as u64;
        }
        self.counters.too_late_events += merged.too_late as u64;
        if merged.added > 0 || merged.rebased {
            self.refold(handlers, settings);
            self.trim(handlers, settings);
        }
        if partitions_before > 0 && self.partitions_of(&topic) > partitions_before {
            self.counters.handovers = self.counters.handovers.max(other.counters.handovers) + 1;
            merged.handover = true;
        }
        merged.changes = diff(&before, &self.state.fields);
        merged
    }

    /// How many partitions of `topic` this entity's events have come from.
    pub(super) fn partitions_of(&self, topic: &str) -> usize {
        self.applied_offsets
            .keys()
            .filter(|key| TopicPartition::parse_key(key).is_some_and(|(t, _)| t == topic))
            .count()
    }

    /// Whether an event from `origin` is the first from its partition while
    /// the entity already has events from another partition of the same
    /// topic: its events have begun arriving on a second partition.
    pub fn is_handover(&self, origin: &Origin) -> bool {
        !self.applied_offsets.is_empty()
            && !self.applied_offsets.contains_key(&origin.topic_partition())
            && self.partitions_of(&origin.tp.topic) > 0
    }

    /// Records an event that arrived at a forwarding stub (see
    /// [`Placement::moved_to`]) and is forwarded to the entity's home.
    /// Returns false, counting a redelivery, if its offset was seen before.
    pub fn forward(&mut self, origin: &Origin) -> bool {
        let tp = origin.topic_partition();
        if self
            .applied_offsets
            .get(&tp)
            .is_some_and(|&last| origin.offset <= last)
        {
            self.counters.duplicates += 1;
            self.counters.redeliveries += 1;
            return false;
        }
        self.applied_offsets.insert(tp, origin.offset);
        true
    }

    /// Folds the oldest entries into the base until at most the retained
    /// number remain, and none is older than the time retention.
    pub(super) fn trim(&mut self, handlers: &Handlers, settings: &TenantView) {
        let policies = settings.current().policies();
        let retention = policies.retention_events.max(1);
        let mut excess = self.log.len().saturating_sub(retention);
        if let (Some(ms), Some(hw)) = (policies.retention_ms, &self.high_water) {
            let horizon = hw.occurred_at.saturating_sub(ms);
            let old = self
                .log
                .iter()
                .take_while(|e| e.key.occurred_at < horizon)
                .count();
            excess = excess.max(old.min(self.log.len().saturating_sub(1)));
        }
        if excess == 0 {
            return;
        }
        let trimmed: Vec<LogEntry> = self.log.drain(..excess).collect();
        for entry in trimmed {
            let before = self.base.state.fields.clone();
            let mut state = std::mem::take(&mut self.base.state);
            if apply_entry(&mut state, &entry, self, handlers, settings).is_ok() {
                let provenance = Arc::new(entry.provenance.clone());
                for c in diff(&before, &state.fields) {
                    self.base
                        .provenance
                        .insert(c.field, Arc::clone(&provenance));
                }
            }
            self.base.state = state;
            self.base.key = Some(entry.key);
        }
    }
}
