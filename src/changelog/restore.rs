//! Restore on assignment: when this instance is assigned an input partition
//! whose changelog has records its store lacks, the changelog partition is
//! read into the store before the input partition is consumed.

use crate::config::{ChangelogConfig, Config};
use crate::internal_events::{emit, DeadLettered, RestoreFinished, RestoreStarted};
use crate::metrics::Stats;
use crate::store::Store;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use std::time::{Duration, Instant};

/// Reads a changelog partition into the store when this instance is assigned
/// an input partition whose changelog has records the store lacks.
pub struct Restorer {
    consumer: BaseConsumer,
    changelog: ChangelogConfig,
    producer: super::Producer,
}

impl Restorer {
    /// A restorer reading the changelogs named by `changelog` on `config.brokers`.
    /// `producer` writes what a crash left pending (see [`super::Producer::republish`]).
    pub fn new(
        config: &Config,
        changelog: ChangelogConfig,
        producer: super::Producer,
    ) -> Result<Self, KafkaError> {
        Ok(Restorer {
            consumer: crate::kafka::reader(config, "restore").create()?,
            changelog,
            producer,
        })
    }

    /// The changelog topic of `input`.
    pub fn topic_of(&self, input: &str) -> String {
        self.changelog.topic_of(input)
    }

    /// Brings the store's copy of `input`/`partition` up to its changelog's
    /// end; see [`Restore`] for what it returns.
    pub fn restore(
        &self,
        store: &dyn Store,
        stats: &Stats,
        input: &str,
        partition: i32,
    ) -> Result<Restore, String> {
        let topic = self.topic_of(input);
        let timeout = Duration::from_secs(10);
        let (low, high) = self
            .consumer
            .fetch_watermarks(&topic, partition, timeout)
            .map_err(|e| format!("cannot read the end of changelog {topic}/{partition}: {e}"))?;
        let position = store
            .changelog_position(&topic, partition)
            .map_err(|e| e.to_string())?;
        let home = crate::model::fold::Home::new(input, partition);
        let pending = store
            .changelog_pending(&home)
            .map_err(|e| e.to_string())?;
        if position.unwrap_or(low) >= high {
            // Nobody wrote this changelog partition since this store did:
            // what a crash left pending is written now.
            if !pending.is_empty() {
                let n = self
                    .producer
                    .republish(store, &home, stats, Duration::from_secs(60))?;
                tracing::info!(partition = %home, records = n, "wrote the changelog records a crash left pending");
            }
            return Ok(Restore::default());
        }
        let from = match position {
            Some(p) if p > low => Offset::Offset(p),
            _ => Offset::Beginning,
        };
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, partition, from)
            .map_err(|e| e.to_string())?;
        self.consumer.assign(&tpl).map_err(|e| e.to_string())?;
        emit(
            RestoreStarted {
                topic: &topic,
                partition,
                from: position,
                to: high,
            },
            stats,
        );
        let started = Instant::now();
        let mut batch: Vec<(String, Vec<u8>)> = Vec::new();
        let mut offsets: Vec<i64> = Vec::new();
        let mut quarantined = Vec::new();
        let mut records = 0u64;
        let mut next = position.unwrap_or(low).max(low);
        let mut last_progress = (next, Instant::now());
        let mut last_log = Instant::now();
        let mut conflicts = Vec::new();
        let mut write = |batch: &mut Vec<(String, Vec<u8>)>, offsets: &mut Vec<i64>, next: i64| {
            let found = store
                .restore(
                    &home,
                    batch,
                    &crate::store::Checkpoint {
                        tp: crate::model::position::TopicPartition::new(
                            topic.as_str(),
                            partition,
                        ),
                        next_offset: next,
                    },
                )
                .map_err(|e| e.to_string())?;
            conflicts.extend(found.conflicts);
            for (i, reason) in found.corrupt {
                let (id, bytes) = &batch[i];
                tracing::error!(%topic, partition, offset = offsets[i], entity = %id, %reason, "corrupt changelog record: the entity is quarantined (parked) and dead-lettered; the rest of the partition restores");
                emit(
                    DeadLettered {
                        stage: "restore",
                        code: "corrupt_changelog_record",
                    },
                    stats,
                );
                quarantined.push(crate::model::dead_letter::DeadLetter::undecodable(
                    "corrupt_changelog_record",
                    format!("the changelog record of entity {id:?} cannot be decoded ({reason}); the entity is parked with the record this instance had of it (or none): release it to apply its held events, or repair it"),
                    crate::model::dead_letter::Received {
                        key: Some(id.clone().into_bytes()),
                        value: Some(bytes.clone()),
                        headers: Vec::new(),
                        topic: topic.clone(),
                        partition,
                        offset: offsets[i],
                    },
                    crate::telemetry::unix_ms(std::time::SystemTime::now()),
                ));
            }
            batch.clear();
            offsets.clear();
            Ok::<_, String>(())
        };
        let result = loop {
            if next >= high {
                break Ok(());
            }
            match self.consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    if let (Some(k), Some(v)) = (m.key(), m.payload()) {
                        batch.push((String::from_utf8_lossy(k).into_owned(), v.to_vec()));
                        offsets.push(m.offset());
                        records += 1;
                    }
                    next = m.offset() + 1;
                    if batch.len() >= 1000 {
                        if let Err(e) = write(&mut batch, &mut offsets, next) {
                            break Err(e);
                        }
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(%topic, partition, error = %e, "changelog read error; retrying")
                }
                None => {
                    // Compaction can leave the end offset without a record.
                    if let Ok(pos) = self.consumer.position() {
                        if let Some(Offset::Offset(o)) =
                            pos.find_partition(&topic, partition).map(|e| e.offset())
                        {
                            next = next.max(o);
                        }
                    }
                }
            }
            if next != last_progress.0 {
                last_progress = (next, Instant::now());
            } else if last_progress.1.elapsed() > Duration::from_secs(60) {
                break Err(format!(
                    "restoring {topic}/{partition}: no progress for 60 s at offset {next} of {high}"
                ));
            }
            if last_log.elapsed() >= Duration::from_secs(5) {
                last_log = Instant::now();
                let rate = records as f64 / started.elapsed().as_secs_f64().max(1e-3);
                tracing::info!(%topic, partition, records, offset = next, end = high, rate = rate as u64, "restoring");
            }
        };
        let _ = self.consumer.unassign();
        result?;
        write(&mut batch, &mut offsets, next.max(high))?;
        if !pending.is_empty() {
            // Another owner wrote the partition since: its records, just
            // restored, supersede what this store left pending.
            let done = crate::store::CommitBatch {
                changelog_done: pending.into_iter().map(|id| (home.clone(), id)).collect(),
                ..Default::default()
            };
            store.commit(&done).map_err(|e| e.to_string())?;
        }
        futures::executor::block_on(store.flush()).map_err(|e| e.to_string())?;
        emit(
            RestoreFinished {
                topic: &topic,
                partition,
                records,
                took: started.elapsed(),
            },
            stats,
        );
        Ok(Restore {
            read: true,
            conflicts,
            quarantined,
        })
    }
}

/// What a [`Restorer::restore`] did.
#[derive(Debug, Default)]
pub struct Restore {
    /// Whether anything was read: then consumption must resume from the
    /// offset committed to Kafka, not the stored checkpoint.
    pub read: bool,
    /// The restored records of entities this store holds live under
    /// another partition, which their actors merge.
    pub conflicts: Vec<crate::model::fold::EntityRecord>,
    /// The dead letters of records that could not be decoded: their
    /// entities are quarantined (parked) in the store.
    pub quarantined: Vec<crate::model::dead_letter::DeadLetter>,
}
