//! Key moves as the actor sees them: where the entity's state lives when
//! its events arrive on two partitions, forwarding stragglers from a stub,
//! and merging a record of the entity from another partition's changelog.

use super::*;

impl EntityActor {

    /// Decides the partition the entity's state lives under after an event
    /// from `tp`: the partition its events arrive on, and when they arrive
    /// on two, the one the configured partitioner maps its key to.
    pub(super) fn settle_home(&mut self, tp: &TopicPartition, handover: bool) {
        let shared = self.shared.clone();
        let Some(r) = self.record.as_mut() else {
            return;
        };
        let here = tp.clone();
        let moved = match &r.placement.home {
            None => true,
            Some(h) if *h == here => false,
            Some(h) if h.topic != here.topic => true,
            Some(h) => match shared.layout.rightful(&h.topic, &self.id) {
                // Unknown partition count (no source): its latest partition.
                None => true,
                Some(p) if p == here.partition => true,
                // A straggler from the partition it left.
                Some(p) if p == h.partition => false,
                rightful => {
                    if handover {
                        emit(
                            KeyMisrouted {
                                entity_id: &self.id,
                                topic: &h.topic,
                                home: h.partition,
                                other: here.partition,
                                rightful,
                                partitioner: shared.layout.partitioner.name(),
                            },
                            &shared.stats,
                        );
                    }
                    false
                }
            },
        };
        if handover {
            let home = if moved {
                here.partition
            } else {
                r.placement.home.as_ref().map_or(here.partition, |h| h.partition)
            };
            emit(
                HandedOver {
                    entity_id: &self.id,
                    home,
                    how: "arrival",
                },
                &shared.stats,
            );
        }
        if moved {
            // Kept for the changelog follower: a new entity under a partition
            // its key does not map to may have a record elsewhere.
            shared
                .layout
                .note_home(&here.topic, &self.id, Some(here.partition));
            r.placement.home = Some(here);
        }
    }

    /// Forwards an event that arrived at a forwarding stub to the entity's
    /// new partition, through the outbox: it is published once the stub's
    /// record of its offset is durable, and acknowledged then.
    pub(super) fn forward(
        &mut self,
        d: Delivery,
        to: crate::model::fold::Home,
        origin: Origin,
        read_start: SystemTime,
    ) {
        let record = self.record.as_mut().expect("loaded by the caller");
        let mut fx = Effects::default();
        let outcome = if record.forward(&origin) {
            let mut headers: Vec<(String, Vec<u8>)> = d
                .headers
                .iter()
                .filter(|(k, _)| k != FORWARDED_FROM && k != "content-type")
                .cloned()
                .collect();
            headers.push(("content-type".into(), b"application/x-protobuf".to_vec()));
            headers.push((
                FORWARDED_FROM.into(),
                format!("{}/{}", origin.tp, origin.offset).into_bytes(),
            ));
            fx.outbox.push(OutboxRecord {
                topic: to.topic.to_string(),
                key: Some(d.event.entity_id.clone().into_bytes()),
                value: d.event.to_proto_bytes(),
                headers,
                partition: Some(to.partition),
            });
            emit(EventForwarded, &self.shared.stats);
            "forwarded"
        } else {
            "duplicate"
        };
        let ack = ack_of(&d, read_start, outcome);
        self.status.handled.fetch_add(1, Relaxed);
        self.send(true, fx, Some(ack));
    }
}


impl Handler<Merge> for EntityActor {
    type Result = ();

    fn handle(&mut self, Merge(other): Merge, _: &mut Self::Context) {
        self.status.handled.fetch_add(1, Relaxed);
        let shared = self.shared.clone();
        let id = self.id.clone();
        let mine = match self.existing() {
            Ok(Some(r)) => r,
            // Not held here: nothing to combine.
            Ok(None) => return,
            Err(reason) => {
                tracing::warn!(entity = %id, %reason, "cannot load an entity to merge its other record; skipped");
                return;
            }
        };
        let (Some(home), Some(theirs)) = (mine.placement.home.clone(), other.placement.home.clone()) else {
            return;
        };
        if mine.placement.moved_to.is_some() || home == theirs || home.topic != theirs.topic {
            return;
        }
        let rightful = shared.layout.rightful(&home.topic, &id);
        if rightful == Some(home.partition) {
            let settings = shared.settings.view(&mine.tenant_id);
            let merged = mine.merge(&other, &shared.handlers, &settings);
            emit(
                HandoverMerged {
                    added: merged.added,
                    too_late: merged.too_late,
                },
                &shared.stats,
            );
            if merged.handover {
                emit(
                    HandedOver {
                        entity_id: &id,
                        home: home.partition,
                        how: "merge",
                    },
                    &shared.stats,
                );
            }
            let mut fx = Effects::default();
            if !merged.changes.is_empty() && !shared.changes_topic.is_empty() {
                let change = ChangeRecord {
                    kind: "handover".into(),
                    entity_id: id.clone(),
                    tenant_id: mine.tenant_id.clone(),
                    event_id: String::new(),
                    event_type: String::new(),
                    occurred_at: 0,
                    changes: merged.changes.iter().map(JsonChange::from).collect(),
                    provenance: None,
                    lateness: None,
                };
                fx.outbox.push(OutboxRecord {
                    topic: shared.changes_topic.clone(),
                    key: Some(id.clone().into_bytes()),
                    value: change.to_bytes(),
                    headers: vec![("content-type".into(), b"application/json".to_vec())],
                    partition: None,
                });
            }
            // A live copy elsewhere only yields once its owner reads this
            // record in the changelog: write it, even if nothing changed.
            let write =
                merged.added > 0 || merged.handover || merged.rebased || other.placement.moved_to.is_none();
            if write {
                self.send(true, fx, None);
            }
        } else if rightful == Some(theirs.partition) && other.placement.moved_to.is_none() {
            mine.placement.moved_to = Some(theirs.clone());
            shared.layout.note_home(&home.topic, &id, None);
            emit(
                HandoverYielded {
                    entity_id: &id,
                    from: home.partition,
                    to: theirs.partition,
                },
                &shared.stats,
            );
            self.send(true, Effects::default(), None);
        } else if other.placement.moved_to.is_none() {
            emit(
                KeyMisrouted {
                    entity_id: &id,
                    topic: &home.topic,
                    home: home.partition,
                    other: theirs.partition,
                    rightful,
                    partitioner: shared.layout.partitioner.name(),
                },
                &shared.stats,
            );
        }
    }
}

