//! The batch builder: folds many actors' write intents into one
//! [`CommitBatch`], coalescing each entity's records into one write and
//! skipping dead letters already recorded (a redelivery after a crash).

use super::{DeadLetterRef, EntityWrite, OperatorView, WriteIntent, Writer, WriterError};
use crate::checkpoint::TopicPartition;
use crate::model::fold::Home;
use crate::store::{CommitBatch, HomeChange, OutboxRecord};
// foldhash (seeded per process) instead of SipHash: these maps are hashed
// for every event of a batch.
use foldhash::{HashMap, HashSet};

/// One batch under construction.
pub(super) struct BatchBuilder<'w> {
    writer: &'w Writer,
    view: &'w mut OperatorView,
    anomaly_seq: &'w mut u64,
    /// What the batch writes.
    pub(super) batch: CommitBatch,
    /// Entity id -> its place in `batch.entities`.
    index: HashMap<String, usize>,
    /// Per entity: its home in the partition index before the batch, and after.
    pub(super) homes: HashMap<String, (Option<Home>, Option<Home>)>,
    /// The partitions whose checkpoints this batch may move.
    pub(super) touched: HashSet<TopicPartition>,
    /// Entity records the intents carried, before coalescing (one per
    /// encoding on the actors' side).
    pub(super) records: usize,
}

impl<'w> BatchBuilder<'w> {
    /// An empty batch of `writer`, which keeps `view` and `anomaly_seq` current.
    pub(super) fn new(
        writer: &'w Writer,
        view: &'w mut OperatorView,
        anomaly_seq: &'w mut u64,
    ) -> Self {
        BatchBuilder {
            writer,
            view,
            anomaly_seq,
            batch: CommitBatch::default(),
            index: HashMap::default(),
            homes: HashMap::default(),
            touched: HashSet::default(),
            records: 0,
        }
    }

    /// Adds what one intent writes; its acknowledgement stays with it.
    pub(super) fn add(&mut self, intent: &mut WriteIntent) -> Result<(), WriterError> {
        // History is filed under the record's entity: an entity's versions
        // come with its record (a burst moves its deferred intents' entries
        // onto the one that carries it).
        debug_assert!(
            intent.history.is_empty() || intent.entity.is_some(),
            "history entries without the entity's record"
        );
        if let Some(w) = &intent.entity {
            self.batch
                .history
                .extend(intent.history.drain(..).map(|h| (w.id.clone(), h)));
        }
        if let Some(write) = intent.entity.take() {
            self.records += 1;
            self.add_entity(write);
        }
        if let Some(dl) = intent.dead_letter.take() {
            if !self.add_dead_letter(dl)? {
                // A redelivery after a crash: this message is already dead-lettered.
                if let Some(ack) = &intent.ack {
                    self.touched.insert(ack.tp.clone());
                }
                return Ok(());
            }
        }
        if let Some((r, status)) = intent.resolve_dead_letter.take() {
            self.resolve_dead_letter(r, status)?;
        }
        self.batch.outbox.append(&mut intent.outbox);
        for a in intent.anomalies.drain(..) {
            self.add_anomaly(a);
        }
        if let Some(ack) = &intent.ack {
            self.touched.insert(ack.tp.clone());
        }
        Ok(())
    }

    /// The entity's record, coalesced with any earlier one of the batch (the
    /// last wins: each carries the whole record), and its parked flag.
    fn add_entity(&mut self, write: EntityWrite) {
        let EntityWrite {
            id,
            bytes,
            parked,
            home,
            previous_home,
        } = write;
        // The partition index and the changelog exist for moving partitions
        // between instances: without a changelog, neither costs a write.
        if self.writer.changelog.is_some() {
            match self.homes.get_mut(&id) {
                Some(h) => h.1 = home,
                None => {
                    self.homes.insert(id.clone(), (previous_home, home));
                }
            }
        }
        if parked != self.view.parked.contains(&id) {
            if parked {
                self.view.parked.insert(id.clone());
            } else {
                self.view.parked.remove(&id);
            }
            self.batch.parked.retain(|(p, _)| *p != id);
            self.batch.parked.push((id.clone(), parked));
        }
        match self.index.get(&id) {
            Some(&i) => self.batch.entities[i].1 = bytes,
            None => {
                self.index.insert(id.clone(), self.batch.entities.len());
                self.batch.entities.push((id, bytes));
            }
        }
    }

    /// A new dead letter and its outbox record; false (and nothing added)
    /// when its message is already dead-lettered.
    fn add_dead_letter(
        &mut self,
        mut dl: crate::model::dead_letter::DeadLetter,
    ) -> Result<bool, WriterError> {
        let replayed = self
            .writer
            .store
            .has_dead_letter(&dl.topic, dl.partition, dl.offset)?
            || self.batch.dead_letters.iter().any(|d| {
                (&d.topic, d.partition, d.offset) == (&dl.topic, dl.partition, dl.offset)
            });
        if replayed {
            return Ok(false);
        }
        dl.id = self.writer.store.next_id()?;
        let mut headers = dl.headers.clone();
        headers.push((
            "orderly.dead_letter.code".into(),
            dl.code.clone().into_bytes(),
        ));
        headers.push((
            "orderly.dead_letter.reason".into(),
            dl.reason.clone().into_bytes(),
        ));
        self.batch.outbox.push(OutboxRecord {
            topic: self.writer.dead_letter_topic.clone(),
            key: dl.key.clone(),
            value: dl
                .to_json_capped(crate::model::dead_letter::PUBLISHED_VALUE_MAX)
                .to_string()
                .into_bytes(),
            headers,
            partition: None,
        });
        self.batch.dead_letters.push(dl);
        self.view.open_dead_letters += 1;
        self.batch.open_dead_letters = Some(self.view.open_dead_letters);
        Ok(true)
    }

    /// Sets an existing dead letter's status (retried, skipped).
    fn resolve_dead_letter(
        &mut self,
        r: DeadLetterRef,
        status: &'static str,
    ) -> Result<(), WriterError> {
        use crate::model::dead_letter::OPEN;
        let store = &self.writer.store;
        let id = match r {
            DeadLetterRef::Id(id) => Some(id),
            DeadLetterRef::At(o) => store.dead_letter_at(&o.tp.topic, o.tp.partition, o.offset)?,
        };
        if let Some(mut dl) = id.map(|id| store.dead_letter(id)).transpose()?.flatten() {
            let id = dl.id;
            if dl.status == OPEN && status != OPEN {
                self.view.open_dead_letters = self.view.open_dead_letters.saturating_sub(1);
                self.batch.open_dead_letters = Some(self.view.open_dead_letters);
            }
            dl.status = status.to_owned();
            self.batch.dead_letters.retain(|d| d.id != id);
            self.batch.dead_letters.push(dl);
        }
        Ok(())
    }

    /// An anomaly, numbered, and published when the anomalies topic is set.
    fn add_anomaly(&mut self, mut a: crate::model::anomaly::Anomaly) {
        a.seq = *self.anomaly_seq;
        *self.anomaly_seq += 1;
        if !self.writer.anomalies_topic.is_empty() {
            self.batch.outbox.push(OutboxRecord {
                topic: self.writer.anomalies_topic.clone(),
                key: Some(a.entity_id.clone().into_bytes()),
                value: a.to_json().to_string().into_bytes(),
                headers: Vec::new(),
                partition: None,
            });
        }
        self.batch.anomalies.push(a);
    }

    /// The changes of home of the batch's entities, for the partition index.
    pub(super) fn home_changes(
        homes: &HashMap<String, (Option<Home>, Option<Home>)>,
    ) -> Vec<HomeChange> {
        homes
            .iter()
            .filter_map(|(entity, (from, to))| {
                let to = to.as_ref().filter(|to| from.as_ref() != Some(*to))?;
                Some(HomeChange {
                    entity: entity.clone(),
                    from: from.clone(),
                    to: to.clone(),
                })
            })
            .collect()
    }
}
