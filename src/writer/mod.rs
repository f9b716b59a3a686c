//! The store writer: many actors' write intents, plus partition checkpoints,
//! become one atomic store batch; it is flushed, and only then acknowledged.
//!
//! Runs on its own thread, so no actor's thread ever waits for an fsync.
//! Intents for the same entity in one batch are coalesced into one write (the
//! last one wins: each carries the entity's whole record). After the flush the
//! writer tells the [`Checkpointer`] that the offsets and the batch's
//! checkpoints are durable (the source commits those to Kafka), completes the
//! events' spans and records latency.

mod batch;

use batch::BatchBuilder;
use crate::checkpoint::{Checkpointer, TopicPartition};
use crate::internal_events::{emit, BatchCommitted, ComponentError, EventsDurable};
use crate::metrics::{DurableLatency, Stats};
use crate::model::dead_letter::DeadLetter;

use crate::store::{Checkpoint, CommitBatch, Committed, OutboxRecord, Store, StoreError};
use crate::telemetry::{self, SpanInfo};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;

/// The acknowledgement one message needs once its effects are durable.
#[derive(Debug)]
pub struct Ack {
    /// Its partition.
    pub tp: TopicPartition,
    /// Its offset.
    pub offset: i64,
    /// The broker's append timestamp, ms, if known.
    pub kafka_ts: Option<i64>,
    /// The event's external timestamp, ms, if decoded.
    pub occurred_at: Option<i64>,
    /// When the source received the message.
    pub received_at: SystemTime,
    /// What processing did, for the span.
    pub outcome: &'static str,
    /// Span data, when spans are wanted.
    pub span: Option<Box<SpanInfo>>,
    /// The in-flight bytes the event holds until it is durable: its message,
    /// and the record copies its write intent carries.
    pub bytes: u64,
}

/// What one processed message asks the store to write.
#[derive(Debug)]
pub struct WriteIntent {
    /// The entity's whole encoded record, if it changed.
    pub entity: Option<EntityWrite>,
    /// A dead letter to record (its id is assigned here).
    pub dead_letter: Option<DeadLetter>,
    /// Messages to publish once durable.
    pub outbox: Vec<OutboxRecord>,
    /// Anomalies to record and publish (their seq is assigned here).
    pub anomalies: Vec<crate::model::anomaly::Anomaly>,
    /// History entries of the entity.
    pub history: Vec<crate::model::fold::LogEntry>,
    /// The acknowledgement; `None` for work with no offset (an operator's release).
    pub ack: Option<Ack>,
    /// Incremented once the intent is durable (the actor's write counter).
    pub durable: Option<Arc<AtomicU64>>,
    /// A dead letter whose status changes in this batch (`retried`, `skipped`).
    pub resolve_dead_letter: Option<(DeadLetterRef, &'static str)>,
}

impl WriteIntent {
    /// An intent that only records a dead letter (no offset to acknowledge).
    pub fn dead_letter(dead_letter: DeadLetter) -> Self {
        WriteIntent {
            entity: None,
            dead_letter: Some(dead_letter),
            outbox: Vec::new(),
            anomalies: Vec::new(),
            history: Vec::new(),
            ack: None,
            durable: None,
            resolve_dead_letter: None,
        }
    }
}

/// One entity record to write.
#[derive(Debug)]
pub struct EntityWrite {
    /// The entity id.
    pub id: String,
    /// The encoded record.
    pub bytes: Vec<u8>,
    /// Whether the entity is parked (kept in the parked index).
    pub parked: bool,
    /// Its home partition: the changelog partition it is written to.
    pub home: Option<crate::model::fold::Home>,
    /// Its home before this write, when that differs.
    pub previous_home: Option<crate::model::fold::Home>,
}

/// What the writer keeps across batches for operators: parked entities and
/// the open dead-letter count, both persisted with each batch.
struct OperatorView {
    parked: foldhash::HashSet<String>,
    open_dead_letters: u64,
}

/// Names a dead letter: by id, or by the message it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeadLetterRef {
    /// By id.
    Id(u64),
    /// By the position of its message.
    At(crate::model::fold::Origin),
}

/// A message to the writer.
pub enum WriterMsg {
    /// Write and acknowledge.
    Write(Box<WriteIntent>),
    /// Several intents of one entity, in order, written in one batch: only
    /// the last carries the entity's record, and the burst's history
    /// entries with it (`EntityActor` defers intents while more of its
    /// deliveries wait, and encodes the record once).
    Burst(Vec<WriteIntent>),
    /// Reply once every intent sent before this one is durable.
    Barrier(std::sync::mpsc::Sender<()>),
    /// Write what came before, then stop.
    Stop,
    /// Re-read the operator view (parked entities, open dead letters) from
    /// the store, after something other than the writer changed it.
    Reload,
}

/// Everything the writer works with.
pub struct Writer {
    /// The store.
    pub store: Arc<dyn Store>,
    /// Every offset's progress, shared with the source.
    pub checkpointer: Arc<Checkpointer>,
    /// Counters.
    pub stats: Arc<Stats>,
    /// Where dead letters are published.
    pub dead_letter_topic: String,
    /// Most messages per batch (a message is one intent, or a burst of one
    /// entity's).
    pub batch_max: usize,
    /// Hands durable outbox bundles to the publisher, and wakes it.
    pub outbox: Arc<crate::sink::Handoff>,
    /// Where anomalies are published; empty: not published.
    pub anomalies_topic: String,
    /// Anomaly records kept in the store.
    pub anomalies_retained: u64,
    /// False while store writes are failing.
    pub store_ok: Arc<std::sync::atomic::AtomicBool>,
    /// The consumer group, for the event spans.
    pub group: Arc<str>,
    /// Where entity records are also written, when the changelog is on.
    pub changelog: Option<crate::changelog::Producer>,
}

/// Why the writer stopped.
#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    /// The store failed; nothing after the last flush was acknowledged.
    #[error("store writer stopped: {0}")]
    Store(#[from] StoreError),
}

impl Writer {
    /// Runs until every sender is gone. Returns an error if the store fails:
    /// the caller must stop the pipeline, since later offsets cannot be made durable.
    pub async fn run(self, mut rx: mpsc::UnboundedReceiver<WriterMsg>) -> Result<(), WriterError> {
        let mut msgs = Vec::with_capacity(self.batch_max);
        let mut anomaly_seq = self.store.anomaly_seq()?;
        let mut view = OperatorView {
            parked: self.store.parked()?.into_iter().collect(),
            open_dead_letters: self.store.open_dead_letters()?,
        };
        self.publish_view(&view);
        loop {
            if rx.recv_many(&mut msgs, self.batch_max).await == 0 {
                return Ok(());
            }
            // Everything before a Stop is written; then the writer ends.
            let stop = msgs.iter().position(|m| matches!(m, WriterMsg::Stop));
            if let Some(i) = stop {
                msgs.truncate(i);
            }
            self.write_batch(&mut msgs, &mut anomaly_seq, &mut view)
                .await?;
            if stop.is_some() {
                return Ok(());
            }
        }
    }

    async fn write_batch(
        &self,
        msgs: &mut Vec<WriterMsg>,
        anomaly_seq: &mut u64,
        view: &mut OperatorView,
    ) -> Result<(), WriterError> {
        let mut intents = Vec::with_capacity(msgs.len());
        let mut barriers = Vec::new();
        for msg in msgs.drain(..) {
            match msg {
                WriterMsg::Write(i) => intents.push(*i),
                WriterMsg::Burst(b) => intents.extend(b),
                WriterMsg::Barrier(b) => barriers.push(b),
                WriterMsg::Stop => {}
                WriterMsg::Reload => {
                    *view = OperatorView {
                        parked: self.store.parked()?.into_iter().collect(),
                        open_dead_letters: self.store.open_dead_letters()?,
                    };
                }
            }
        }
        let mut builder = BatchBuilder::new(self, view, anomaly_seq);
        for intent in intents.iter_mut() {
            builder.add(intent)?;
        }
        let BatchBuilder {
            mut batch,
            homes,
            touched,
            records: records_encoded,
            ..
        } = builder;
        batch.homes = BatchBuilder::home_changes(&homes);
        batch.assign_outbox_ids(|| self.store.next_id())?;
        // The changelog after the store (see `changelog::producer`): its
        // records are marked pending in the batch, written once the batch is
        // durable, and acknowledged (checkpointed) only after that, so the
        // next owner of a partition never restores less than a checkpoint
        // covers, and never restores a record whose effects were lost.
        let planned = match &self.changelog {
            Some(_) => crate::changelog::Producer::plan(&batch.entities, &homes),
            None => Vec::new(),
        };
        batch.changelog_pending = planned
            .iter()
            .map(|p| (p.home.clone(), p.id.to_owned()))
            .collect();
        if !batch.anomalies.is_empty() {
            batch.anomaly_seq = Some(*anomaly_seq);
            batch.prune_anomalies_below = anomaly_seq.checked_sub(self.anomalies_retained);
        }
        let checkpoints = self.checkpointer.written(
            intents
                .iter()
                .filter_map(|i| i.ack.as_ref())
                .map(|a| (&a.tp, a.offset)),
            &touched,
        );
        batch.checkpoints = checkpoints
            .iter()
            .map(|(tp, next_offset)| Checkpoint {
                tp: tp.clone(),
                next_offset: *next_offset,
            })
            .collect();
        // A store failure is retried with backoff, for ever: nothing is
        // acknowledged until the batch is durable, so in-flight events pile up
        // and the source pauses; the pipeline reports not ready meanwhile.
        let mut attempt = 0u32;
        let started = std::time::Instant::now();
        let committed = loop {
            let e = match self.commit_and_flush(&batch).await {
                Ok(committed) => break committed,
                Err(e) => e,
            };
            attempt += 1;
            self.store_ok.store(false, Relaxed);
            emit(
                ComponentError {
                    stage: "store",
                    error_code: "batch_write_failed",
                    error: &e,
                },
                &self.stats,
            );
            let delay = Duration::from_millis(100u64.saturating_mul(1 << attempt.min(6)));
            tracing::error!(error = %e, attempt, ?delay, "store write failed; retrying the batch (nothing is acknowledged meanwhile)");
            tokio::time::sleep(delay).await;
        };
        if attempt > 0 {
            tracing::info!(
                attempts = attempt + 1,
                "store write succeeded after retries"
            );
            self.store_ok.store(true, Relaxed);
        }
        if let Some(changelog) = &self.changelog {
            let pending = std::mem::take(&mut batch.changelog_pending);
            self.write_changelog(changelog, &planned, pending).await;
        }
        let took = started.elapsed();
        let durable_at = SystemTime::now();
        self.checkpointer.flushed(
            intents
                .iter()
                .filter_map(|i| i.ack.as_ref())
                .map(|a| (&a.tp, a.offset)),
            &checkpoints,
            durable_at,
        );
        self.acknowledge(&intents, durable_at);
        emit(
            BatchCommitted {
                entity_writes: batch.entities.len(),
                records_encoded,
                took,
                exclusive: committed.exclusive,
            },
            &self.stats,
        );
        self.publish_view(view);
        if !batch.outbox.is_empty() {
            self.outbox.offer(batch.take_outbox_bundles());
        }
        for b in barriers {
            let _ = b.send(());
        }
        Ok(())
    }

    /// Writes a durable batch's changelog records, then clears their
    /// pending marks with the changelog positions reached. That second
    /// commit is not flushed: if it is lost, the next assignment restores
    /// this store's own records from the older position, which is harmless.
    async fn write_changelog(
        &self,
        changelog: &crate::changelog::Producer,
        planned: &[crate::changelog::Planned<'_>],
        pending: Vec<(crate::model::fold::Home, String)>,
    ) {
        // Only `exit` and `sleep` act here: the batch is durable already.
        let _ = crate::failpoint::hit("writer.before_changelog");
        let done = CommitBatch {
            changelog_positions: changelog.write(planned, &self.stats).await,
            changelog_done: pending,
            ..Default::default()
        };
        if let Err(e) = self.store.commit(&done) {
            emit(
                ComponentError {
                    stage: "store",
                    error_code: "changelog_position_failed",
                    error: &e,
                },
                &self.stats,
            );
        }
    }

    fn publish_view(&self, view: &OperatorView) {
        self.stats
            .writer.parked_entities
            .store(view.parked.len() as i64, Relaxed);
        self.stats
            .writer.open_dead_letters
            .store(view.open_dead_letters as i64, Relaxed);
    }

    async fn commit_and_flush(&self, batch: &CommitBatch) -> Result<Committed, StoreError> {
        crate::failpoint::hit("writer.before_commit")?;
        let committed = self.store.commit(batch)?;
        crate::failpoint::hit("writer.before_flush")?;
        self.store.flush().await?;
        crate::failpoint::hit("writer.after_flush")?;
        Ok(committed)
    }

    fn acknowledge(&self, intents: &[WriteIntent], durable_at: SystemTime) {
        let now_us = durable_at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0);
        let since = |ms: Option<i64>| ms.map(|ms| (now_us - ms * 1000).max(0) as u64);
        let mut bytes = 0;
        let latencies: Vec<_> = intents
            .iter()
            .filter_map(|i| i.ack.as_ref())
            .map(|a| {
                bytes += a.bytes;
                DurableLatency {
                    append: since(a.kafka_ts),
                    occurred: since(a.occurred_at),
                    received: durable_at
                        .duration_since(a.received_at)
                        .map_or(0, |d| d.as_micros() as u64),
                }
            })
            .collect();
        // The actors first: once the stats count an event durable, its
        // actor counts it too (and may be passivated). The fence orders the
        // actors' counts before the stats' for a reader that loads a stat
        // with `Stats::get` (an acquire load). Each count is a release, and
        // the router reads it with an acquire before it passivates an
        // actor, so that what this batch wrote (the store's filter of
        // entity ids included) is seen by the next actor of that entity.
        for d in intents.iter().filter_map(|i| i.durable.as_ref()) {
            d.fetch_add(1, std::sync::atomic::Ordering::Release);
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        emit(
            EventsDurable {
                latencies: &latencies,
                bytes,
            },
            &self.stats,
        );
        for ack in intents.iter().filter_map(|i| i.ack.as_ref()) {
            if let Some(span) = &ack.span {
                telemetry::record_event_span(
                    span,
                    ack.received_at,
                    &self.group,
                    ack.outcome,
                    durable_at,
                );
            }
        }
    }
}
