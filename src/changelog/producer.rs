//! The changelog producer: every entity record the store makes durable is
//! also written to the changelog, at the entity's home partition, after the
//! sled batch is durable and before any of its offsets is acknowledged.
//!
//! The order matters for what an event promised besides its state. Were the
//! changelog written first, a crash before the sled commit would leave the
//! changelog ahead of the store: the restore would bring back the batch's
//! records with their applied offsets, the redelivered events would be
//! duplicates, and their change records, dead letters and forwarded
//! stragglers, which only the lost sled batch held, would never be emitted.
//! Written after, the batch's effects are durable in this store's outbox
//! before any other owner can see its records. The batch also marks each
//! record pending (`w` keys): a crash before the broker has them leaves the
//! marks, and [`Producer::republish`] writes them when the partition is next
//! assigned here, unless another owner wrote the partition meanwhile.

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
#[derive(Clone)]
pub struct Producer {
    /// An idempotent producer.
    pub producer: rdkafka::producer::FutureProducer,
    /// How the changelog topics are named.
    pub changelog: ChangelogConfig,
}

/// One changelog record to write: an entity's view from one home partition.
#[derive(Debug)]
pub(crate) struct Planned<'a> {
    /// The home partition whose changelog partition it goes to.
    pub home: Home,
    /// The entity.
    pub id: &'a str,
    /// The record, or a forwarding stub.
    pub bytes: std::borrow::Cow<'a, [u8]>,
}

impl Producer {
    /// The changelog topic of `input`.
    pub fn topic_of(&self, input: &str) -> String {
        self.changelog.topic_of(input)
    }

    /// The changelog records a batch writes: each entity's record at its
    /// home, and, for an entity whose home moved to another partition of its
    /// topic in this batch, a forwarding stub (its record, with `moved_to`
    /// set) at its old home: whoever restores that partition forwards the
    /// entity's stragglers instead of holding a stale copy.
    pub(crate) fn plan<'a>(
        entities: &'a [(String, Vec<u8>)],
        homes: &foldhash::HashMap<String, (Option<Home>, Option<Home>)>,
    ) -> Vec<Planned<'a>> {
        let mut planned = Vec::with_capacity(entities.len());
        for (id, bytes) in entities {
            let Some((from, Some(to))) = homes.get(id) else {
                continue;
            };
            planned.push(Planned {
                home: to.clone(),
                id,
                bytes: std::borrow::Cow::Borrowed(bytes),
            });
            if let Some(from) = from.as_ref().filter(|f| *f != to && f.topic == to.topic) {
                if let Some(stub) = stub_of(id, bytes, from, to) {
                    planned.push(Planned {
                        home: from.clone(),
                        id,
                        bytes: std::borrow::Cow::Owned(stub),
                    });
                }
            }
        }
        planned
    }

    /// Writes `planned` and waits until the broker has it all; failures are
    /// retried, with backoff, until they succeed (nothing is acknowledged
    /// meanwhile). Returns the next offset per changelog partition.
    pub(crate) async fn write(&self, planned: &[Planned<'_>], stats: &Stats) -> Vec<Checkpoint> {
        use rdkafka::producer::FutureRecord;
        // One changelog name per input topic, not one per record.
        let mut topics: HashMap<&str, Arc<str>> = HashMap::new();
        let mut pending: Vec<(&str, &[u8], Arc<str>, i32)> = planned
            .iter()
            .map(|p| {
                let topic = topics
                    .entry(&*p.home.topic)
                    .or_insert_with(|| self.topic_of(&p.home.topic).into())
                    .clone();
                (p.id, &*p.bytes, topic, p.home.partition)
            })
            .collect();
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

impl Producer {
    /// Writes the changelog records the store marks pending for `home`: a
    /// crash came between their sled commit and the broker's acknowledgement.
    /// Call it only when nobody wrote `home`'s changelog partition since this
    /// store last did (its end is this store's position), with the partition
    /// assigned here: each entity's current view from `home` is written, and
    /// the marks are cleared with the new position.
    ///
    /// Runs on the caller's thread (the rebalance callback), in a runtime of
    /// its own; gives up after `timeout`.
    pub fn republish(
        &self,
        store: &dyn crate::store::Store,
        home: &Home,
        stats: &Stats,
        timeout: Duration,
    ) -> Result<usize, String> {
        let ids = store.changelog_pending(home).map_err(|e| e.to_string())?;
        if ids.is_empty() {
            return Ok(0);
        }
        let mut views: Vec<(&str, Vec<u8>)> = Vec::with_capacity(ids.len());
        for id in &ids {
            let Some(record) = store.load_entity(id).map_err(|e| e.to_string())? else {
                continue;
            };
            let bytes = crate::store::encode(&record);
            let view = match &record.placement.home {
                Some(h) if h == home => Some(bytes),
                Some(to) => stub_of(id, &bytes, home, to),
                None => None,
            };
            if let Some(v) = view {
                views.push((id, v));
            }
        }
        let planned: Vec<Planned> = views
            .iter()
            .map(|(id, bytes)| Planned {
                home: home.clone(),
                id,
                bytes: std::borrow::Cow::Borrowed(bytes),
            })
            .collect();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start a runtime for the changelog: {e}"))?;
        let positions = runtime
            .block_on(async { tokio::time::timeout(timeout, self.write(&planned, stats)).await })
            .map_err(|_| {
                format!(
                    "the changelog of {home} did not take {} pending records within {timeout:?}",
                    planned.len()
                )
            })?;
        let batch = crate::store::CommitBatch {
            changelog_positions: positions,
            changelog_done: ids.iter().map(|id| (home.clone(), id.clone())).collect(),
            ..Default::default()
        };
        store.commit(&batch).map_err(|e| e.to_string())?;
        runtime
            .block_on(store.flush())
            .map_err(|e| e.to_string())?;
        Ok(planned.len())
    }
}

/// The forwarding stub `from`'s changelog partition holds for an entity
/// whose record (`bytes`) now lives at `to`; `None` if the record cannot be
/// read or is a stub itself.
fn stub_of(id: &str, bytes: &[u8], from: &Home, to: &Home) -> Option<Vec<u8>> {
    let mut stub: crate::model::fold::EntityRecord =
        crate::store::decode(id.as_bytes(), bytes).ok()?;
    if stub.placement.moved_to.is_some() {
        return None;
    }
    stub.placement.moved_to = Some(to.clone());
    stub.placement.home = Some(from.clone());
    Some(crate::store::encode(&stub))
}
