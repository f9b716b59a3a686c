//! The changelog producer: every entity record the store makes durable is
//! also written to the changelog, at the entity's home partition, before the
//! sled batch commits.

use crate::config::ChangelogConfig;
use crate::internal_events::{emit, ComponentError};
use crate::metrics::Stats;
use crate::model::fold::Home;
use crate::model::position::TopicPartition;
use crate::store::Checkpoint;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// The changelog: every entity record the store makes durable is also
/// produced, keyed by entity id, to `<input topic><suffix>`, at the partition
/// number of the record's home. The value is the stored record itself, format
/// byte first.
pub struct Producer {
    /// An idempotent producer.
    pub producer: rdkafka::producer::FutureProducer,
    /// How the changelog topics are named.
    pub changelog: ChangelogConfig,
}

impl Producer {
    /// The changelog topic of `input`.
    pub fn topic_of(&self, input: &str) -> String {
        self.changelog.topic_of(input)
    }

    /// Produces the batch's records and waits until the broker has them all;
    /// failures are retried, with backoff, until they succeed (nothing is
    /// acknowledged meanwhile). Returns the next offset per changelog partition.
    ///
    /// An entity whose home moved to another partition of its topic in this
    /// batch also gets a forwarding stub (its record, with `moved_to` set) in
    /// its old home's changelog partition: whoever restores that partition
    /// forwards the entity's stragglers instead of holding a stale copy.
    pub(crate) async fn write(
        &self,
        entities: &[(String, Vec<u8>)],
        homes: &HashMap<String, (Option<Home>, Option<Home>)>,
        stats: &Stats,
    ) -> Vec<Checkpoint> {
        use rdkafka::producer::FutureRecord;
        // One changelog name per input topic, not one per record.
        let mut topics: HashMap<&str, Arc<str>> = HashMap::new();
        let stubs: Vec<(&str, Vec<u8>, Arc<str>, i32)> = entities
            .iter()
            .filter_map(|(id, bytes)| {
                let (Some(from), Some(to)) = homes.get(id)? else {
                    return None;
                };
                if from == to || from.topic != to.topic {
                    return None;
                }
                let mut stub: crate::model::fold::EntityRecord =
                    crate::store::decode(id.as_bytes(), bytes).ok()?;
                if stub.placement.moved_to.is_some() {
                    return None;
                }
                stub.placement.moved_to = Some(to.clone());
                stub.placement.home = Some(from.clone());
                let topic = topics
                    .entry(&*from.topic)
                    .or_insert_with(|| self.topic_of(&from.topic).into())
                    .clone();
                Some((
                    id.as_str(),
                    crate::store::encode(&stub),
                    topic,
                    from.partition,
                ))
            })
            .collect();
        let mut pending: Vec<(&str, &[u8], Arc<str>, i32)> = entities
            .iter()
            .filter_map(|(id, bytes)| {
                let home = homes.get(id)?.1.as_ref()?;
                let topic = topics
                    .entry(&*home.topic)
                    .or_insert_with(|| self.topic_of(&home.topic).into())
                    .clone();
                Some((id.as_str(), bytes.as_slice(), topic, home.partition))
            })
            .collect();
        pending.extend(stubs.iter().map(|(id, bytes, topic, partition)| {
            (*id, bytes.as_slice(), topic.clone(), *partition)
        }));
        let mut positions: HashMap<TopicPartition, i64> = HashMap::new();
        let mut attempt = 0u32;
        while !pending.is_empty() {
            let sends = pending.iter().map(|(id, bytes, topic, partition)| {
                self.producer.send(
                    FutureRecord::to(topic)
                        .partition(*partition)
                        .key(*id)
                        .payload(*bytes),
                    Duration::from_secs(30),
                )
            });
            let results = futures::future::join_all(sends).await;
            let mut failed = Vec::new();
            for (r, p) in results.into_iter().zip(pending.drain(..)) {
                match r {
                    Ok(d) => {
                        let next = positions
                            .entry(TopicPartition::new(p.2.clone(), p.3))
                            .or_insert(0);
                        *next = (*next).max(d.offset + 1);
                    }
                    Err((e, _)) => {
                        if failed.is_empty() {
                            emit(
                                ComponentError {
                                    stage: "changelog",
                                    error_code: "produce_failed",
                                    error: &format!("{}/{}: {e}", p.2, p.3),
                                },
                                stats,
                            );
                        }
                        failed.push(p);
                    }
                }
            }
            stats
                .changelog
                .produce_failing
                .store(!failed.is_empty(), std::sync::atomic::Ordering::Relaxed);
            if !failed.is_empty() {
                attempt += 1;
                let delay = Duration::from_millis(100u64.saturating_mul(1 << attempt.min(6)));
                tracing::error!(failed = failed.len(), attempt, ?delay, "changelog records not acknowledged; retrying (nothing is checkpointed meanwhile)");
                tokio::time::sleep(delay).await;
            }
            pending = failed;
        }
        positions
            .into_iter()
            .map(|(tp, next_offset)| Checkpoint { tp, next_offset })
            .collect()
    }
}
