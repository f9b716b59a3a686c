//! The sink: publishes the store's outbox (dead letters, derived events) to Kafka.
//!
//! Records enter the outbox in the same atomic batch as the offsets they
//! belong to, so a crash cannot lose one. This publisher produces them after
//! the flush and removes each once the broker acknowledges it; after a crash
//! the rest are published on the next start. Delivery is at least once, and
//! every record carries an id that makes duplicates recognisable.
//!
//! The writer hands each durable batch's bundles to the publisher in
//! memory too ([`Handoff`]), so that the publisher need not read back and
//! decode what was just written. The store stays the truth: the publisher
//! reads it at start, and again whenever the handoff dropped bundles
//! because the publisher fell behind, until it has caught up with what the
//! handoff holds.
//!
//! A record the broker refuses for good (larger than `message.max.bytes`,
//! its topic gone, not authorised) is never retried: it moves aside in the
//! store (`Store::undeliverable`), with the reason in an
//! `orderly-undeliverable` header, and is counted. A bundle published in
//! part keeps only its unpublished records, so a retry does not publish
//! the others again.

use crate::internal_events::{emit, OutboxUndeliverable};
use crate::store::{OutboxRecord, Store};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The most bytes of records the handoff holds; past it, the writer's
/// bundles are left to be read from the store.
pub const HANDOFF_BYTES: usize = 16 * 1024 * 1024;

/// Outbox bundles made durable by the writer, waiting for the publisher,
/// oldest first; and the publisher's wake-up.
pub struct Handoff {
    inner: Mutex<Handed>,
    cap: usize,
    /// Woken by the writer when it adds records.
    ready: tokio::sync::Notify,
}

#[derive(Default)]
struct Handed {
    /// Each bundle: its id, its records, and their bytes.
    bundles: VecDeque<(u64, Vec<OutboxRecord>, usize)>,
    bytes: usize,
    /// Bundles were dropped (or were written before the handoff existed,
    /// as after a restart): the store must be read until the publisher
    /// has caught up with `bundles`.
    gap: bool,
}

impl Handoff {
    /// An empty handoff holding at most `cap` bytes of records. It starts
    /// with a gap: the store may hold bundles from before.
    pub fn new(cap: usize) -> Self {
        Handoff {
            inner: Mutex::new(Handed {
                gap: true,
                ..Default::default()
            }),
            cap,
            ready: tokio::sync::Notify::new(),
        }
    }

    fn handed(&self) -> std::sync::MutexGuard<'_, Handed> {
        // The lock guards plain data that no panic leaves half-changed.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds durable bundles, in id order, and wakes the publisher. If they
    /// do not fit, the handoff drops everything it holds and marks a gap:
    /// the publisher reads the store instead.
    pub fn offer(&self, bundles: Vec<(u64, Vec<OutboxRecord>)>) {
        {
            let mut h = self.handed();
            for (id, records) in bundles {
                let bytes: usize = records.iter().map(OutboxRecord::byte_size).sum();
                if h.gap || h.bytes + bytes > self.cap {
                    *h = Handed {
                        gap: true,
                        ..Default::default()
                    };
                    continue;
                }
                h.bytes += bytes;
                h.bundles.push_back((id, records, bytes));
            }
        }
        self.ready.notify_one();
    }

    /// Up to `limit` bundles, oldest first, taken out; `None` when there is
    /// a gap, which this call closes (empties): the caller reads the store
    /// until it reaches what is handed from now on.
    fn take(&self, limit: usize) -> Option<Vec<(u64, Vec<OutboxRecord>)>> {
        let mut h = self.handed();
        if std::mem::take(&mut h.gap) {
            *h = Handed::default();
            return None;
        }
        let n = limit.min(h.bundles.len());
        let mut freed = 0;
        let taken = h
            .bundles
            .drain(..n)
            .map(|(id, records, bytes)| {
                freed += bytes;
                (id, records)
            })
            .collect();
        h.bytes -= freed;
        Some(taken)
    }

    /// The id of the oldest bundle handed, if any.
    fn oldest(&self) -> Option<u64> {
        self.handed().bundles.front().map(|(id, _, _)| *id)
    }

    /// Marks a gap: the store must be read again (a bundle failed in part
    /// and was settled there).
    fn mark_gap(&self) {
        self.handed().gap = true;
    }
}

/// Where the publisher reads next.
#[derive(Debug, Default)]
struct Cursor {
    /// Whether the store must be read: at start, and after a gap, until it
    /// holds nothing older than the handoff.
    from_store: bool,
    /// The highest bundle id taken to publish: a bundle read from the
    /// store and also handed over is published once (ids only grow).
    published: u64,
}

/// Publishes the outbox until stopped.
pub struct Publisher {
    /// The store holding the outbox.
    pub store: Arc<dyn Store>,
    /// The producer.
    pub producer: FutureProducer,
    /// The writer's durable bundles, and the wake-up.
    pub handoff: Arc<Handoff>,
    /// Set to stop after one last pass.
    pub stop: Arc<AtomicBool>,
    /// Counters.
    pub stats: Arc<crate::metrics::Stats>,
}

impl Publisher {
    /// Runs until `stop`; a final pass publishes what the last batches added.
    pub async fn run(self) {
        let mut cursor = Cursor::default();
        loop {
            let stopping = self.stop.load(Relaxed);
            while self.publish_some(&mut cursor).await {}
            if stopping {
                return;
            }
            let _ = tokio::time::timeout(
                Duration::from_millis(500),
                self.handoff.ready.notified(),
            )
            .await;
        }
    }

    /// The next page of bundles to publish: from the store while catching
    /// up with the handoff, else from the handoff.
    fn next_page(&self, cursor: &mut Cursor) -> Vec<(u64, Vec<OutboxRecord>)> {
        let page = self.read_page(cursor);
        cursor.published = page.iter().map(|(id, _)| *id).fold(cursor.published, u64::max);
        page
    }

    fn read_page(&self, cursor: &mut Cursor) -> Vec<(u64, Vec<OutboxRecord>)> {
        const PAGE: usize = 1000;
        if !cursor.from_store {
            match self.handoff.take(PAGE) {
                Some(page) => {
                    return page
                        .into_iter()
                        .filter(|(id, _)| *id > cursor.published)
                        .collect()
                }
                None => cursor.from_store = true,
            }
        }
        let page = match self.store.outbox(PAGE) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the outbox");
                return Vec::new();
            }
        };
        // Caught up once the store holds nothing older than the handoff's
        // oldest bundle (or nothing at all): the rest comes from memory.
        let older: Vec<_> = match self.handoff.oldest() {
            Some(oldest) => page.into_iter().filter(|(id, _)| *id < oldest).collect(),
            None => page,
        };
        if older.is_empty() {
            cursor.from_store = false;
        }
        older
    }

    /// Publishes up to one page of the outbox; returns whether to go on at
    /// once (it published, or the handoff holds more).
    async fn publish_some(&self, cursor: &mut Cursor) -> bool {
        let page = self.next_page(cursor);
        if page.is_empty() {
            // Caught up with the store: the handoff may hold more.
            return !cursor.from_store && self.handoff.oldest().is_some();
        }
        let sends = page.iter().flat_map(|(_, recs)| recs).map(|rec| {
            let mut headers = OwnedHeaders::new();
            for (k, v) in &rec.headers {
                headers = headers.insert(Header {
                    key: k,
                    value: Some(v.as_slice()),
                });
            }
            let mut r = FutureRecord::to(&rec.topic)
                .payload(&rec.value)
                .headers(headers);
            if let Some(k) = &rec.key {
                r = r.key(k.as_slice());
            }
            if let Some(p) = rec.partition {
                r = r.partition(p);
            }
            self.producer.send(r, Duration::from_secs(5))
        });
        let mut results = futures::future::join_all(sends).await.into_iter();
        let (mut done, mut partial) = (Vec::new(), false);
        for (id, recs) in &page {
            let (mut unpublished, mut undeliverable) = (Vec::new(), Vec::new());
            for (rec, r) in recs.iter().zip(results.by_ref()) {
                let Err((e, _)) = r else { continue };
                if let Some(reason) = refused_for_good(&e) {
                    emit(OutboxUndeliverable { reason }, &self.stats);
                    tracing::error!(topic = %rec.topic, error = %e, "the broker refuses an outbox record for good; it is kept in the store as undeliverable");
                    let mut rec = rec.clone();
                    rec.headers
                        .push(("orderly-undeliverable".into(), e.to_string().into_bytes()));
                    undeliverable.push(rec);
                } else {
                    tracing::warn!(topic = %rec.topic, error = %e, "publishing an outbox record failed; will retry");
                    unpublished.push(rec.clone());
                }
            }
            if unpublished.is_empty() && undeliverable.is_empty() {
                done.push(*id);
                continue;
            }
            partial |= !unpublished.is_empty();
            if let Err(e) = self.store.settle_outbox(*id, &unpublished, &undeliverable) {
                tracing::error!(error = %e, "cannot settle a partly published outbox bundle; it will be published again");
                partial = true;
            }
        }
        if let Err(e) = self.store.remove_outbox(&done) {
            tracing::error!(error = %e, "cannot remove published outbox records; they will be published again");
        }
        if partial {
            // What was settled in the store is published from there.
            self.handoff.mark_gap();
            tokio::time::sleep(Duration::from_millis(500)).await;
            return false;
        }
        true
    }
}

/// Why the broker will never take a record, if that is what `e` says; a
/// failure that a retry may mend (a timeout, a broker down) gives `None`.
fn refused_for_good(e: &KafkaError) -> Option<&'static str> {
    use RDKafkaErrorCode as C;
    Some(match e.rdkafka_error_code()? {
        C::MessageSizeTooLarge | C::MessageBatchTooLarge => "too_large",
        C::UnknownTopic | C::UnknownPartition | C::InvalidTopic => "no_such_topic",
        C::TopicAuthorizationFailed => "not_authorized",
        C::InvalidRecord => "invalid_record",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    //! The publisher on a real broker (librdkafka's mock cluster) and a
    //! real sled store: bundles handed over in memory and bundles only the
    //! store holds (from before a start, or dropped by a full handoff) are
    //! each published once, oldest first, and removed.

    use super::*;
    use crate::store::{CommitBatch, SledStore};
    use crate::tools::broker::EmbeddedBroker;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::Message;

    fn records(topic: &str, from: u32, n: u32) -> Vec<OutboxRecord> {
        (from..from + n)
            .map(|i| OutboxRecord {
                topic: topic.to_owned(),
                key: Some(b"k".to_vec()),
                // Large enough that a few fill a bundle.
                value: format!("{i:06}{}", "x".repeat(2_000)).into_bytes(),
                headers: vec![],
                partition: Some(0),
            })
            .collect()
    }

    /// Commits `outbox` durably, as the writer does; returns its bundles.
    fn commit(store: &SledStore, outbox: Vec<OutboxRecord>) -> Vec<(u64, Vec<OutboxRecord>)> {
        let mut batch = CommitBatch {
            outbox,
            ..Default::default()
        };
        batch.assign_outbox_ids(|| store.next_id()).unwrap();
        store.commit(&batch).unwrap();
        futures::executor::block_on(store.flush()).unwrap();
        batch.take_outbox_bundles()
    }

    /// The numbers of the records on `topic`, read until none comes for a
    /// second.
    fn published(brokers: &str, topic: &str) -> Vec<u32> {
        let c: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", "reader")
            .set("auto.offset.reset", "earliest")
            .create()
            .unwrap();
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition_offset(topic, 0, rdkafka::Offset::Beginning)
            .unwrap();
        c.assign(&tpl).unwrap();
        let (mut out, mut quiet) = (Vec::new(), std::time::Instant::now());
        while quiet.elapsed() < Duration::from_secs(3) {
            if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
                let v = m.payload().unwrap();
                out.push(std::str::from_utf8(&v[..6]).unwrap().parse().unwrap());
                quiet = std::time::Instant::now();
            }
        }
        out
    }

    fn wait_until(mut done: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "timed out");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn bundles_handed_over_or_only_stored_are_each_published_once_in_order() {
        let broker = EmbeddedBroker::start(1).unwrap();
        broker.create_topic("changes", 1).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SledStore::open(dir.path(), 16).unwrap());
        // Room for about one batch of ten: the third batch overflows it.
        let handoff = Arc::new(Handoff::new(40_000));

        // Written before the publisher started: only in the store.
        commit(&store, records("changes", 0, 10));
        // Handed over too (but the handoff starts with a gap).
        handoff.offer(commit(&store, records("changes", 10, 10)));
        // Too large for the handoff: dropped there.
        handoff.offer(commit(&store, records("changes", 20, 30)));
        // Handed over after the gap.
        handoff.offer(commit(&store, records("changes", 50, 10)));

        let config = crate::config::Config {
            brokers: broker.bootstrap_servers(),
            ..Default::default()
        };
        let stop = Arc::new(AtomicBool::new(false));
        let publisher = Publisher {
            store: store.clone(),
            producer: crate::kafka::producer(&config, &[]).unwrap(),
            handoff: handoff.clone(),
            stop: stop.clone(),
            stats: Arc::new(crate::metrics::Stats::default()),
        };
        let run = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(publisher.run())
        });
        // Handed over while it runs: published from memory.
        for from in [60, 70] {
            wait_until(|| {
                store.outbox(1).unwrap().is_empty()
            });
            assert!(!handoff.handed().gap, "caught up with the store");
            handoff.offer(commit(&store, records("changes", from, 10)));
        }
        wait_until(|| {
            store.outbox(1).unwrap().is_empty()
        });
        stop.store(true, Relaxed);
        handoff.offer(Vec::new());
        run.join().unwrap();

        assert_eq!(
            published(&config.brokers, "changes"),
            (0..80).collect::<Vec<_>>(),
            "each once, oldest first"
        );
    }

    /// Which bundles `next_page` gives, step by step, as the writer and the
    /// publisher interleave.
    #[test]
    fn the_store_is_read_until_it_holds_nothing_older_than_the_handoff() {
        let broker = EmbeddedBroker::start(1).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SledStore::open(dir.path(), 16).unwrap());
        let handoff = Arc::new(Handoff::new(1 << 20));
        let publisher = Publisher {
            store: store.clone(),
            producer: crate::kafka::producer(
                &crate::config::Config {
                    brokers: broker.bootstrap_servers(),
                    ..Default::default()
                },
                &[],
            )
            .unwrap(),
            handoff: handoff.clone(),
            stop: Arc::new(AtomicBool::new(false)),
            stats: Arc::new(crate::metrics::Stats::default()),
        };
        let ids = |page: &[(u64, Vec<OutboxRecord>)]| page.iter().map(|(id, _)| *id).collect::<Vec<_>>();
        let mut cursor = Cursor::default();
        let next = |cursor: &mut Cursor| {
            let page = publisher.next_page(cursor);
            store.remove_outbox(&ids(&page)).unwrap();
            ids(&page)
        };

        // From before the start: the initial gap sends the publisher to the store.
        let a = ids(&commit(&store, records("t", 0, 1)));
        assert_eq!(next(&mut cursor), a);
        assert!(cursor.from_store);
        // Committed, read from the store, and only then handed over: it is
        // not published again.
        let b = commit(&store, records("t", 1, 1));
        assert_eq!(next(&mut cursor), ids(&b));
        handoff.offer(b);
        let c = commit(&store, records("t", 2, 1));
        handoff.offer(c.clone());
        // The store holds nothing older than the handoff's oldest (b): done with it.
        assert_eq!(next(&mut cursor), Vec::<u64>::new());
        assert!(!cursor.from_store);
        // From memory: b skipped, c published.
        assert_eq!(next(&mut cursor), ids(&c));
        // A gap: what is handed meanwhile is dropped, and the store read.
        let d = commit(&store, records("t", 3, 1));
        handoff.mark_gap();
        handoff.offer(d.clone());
        let e = commit(&store, records("t", 4, 1));
        handoff.offer(e.clone());
        assert_eq!(next(&mut cursor), [ids(&d), ids(&e)].concat());
        assert!(cursor.from_store);
        assert_eq!(next(&mut cursor), Vec::<u64>::new());
        assert!(!cursor.from_store);
        assert_eq!(next(&mut cursor), Vec::<u64>::new(), "nothing twice");
    }

    #[test]
    fn a_full_handoff_drops_what_it_holds_and_says_so_once() {
        let handoff = Handoff::new(150);
        let rec = |n| OutboxRecord {
            topic: String::new(),
            key: None,
            value: vec![0; n],
            headers: vec![],
            partition: None,
        };
        // It starts with a gap, which the first take reports and closes.
        assert!(handoff.take(10).is_none());
        handoff.offer(vec![(1, vec![rec(40)]), (2, vec![rec(40)])]);
        assert_eq!(handoff.oldest(), Some(1));
        let taken = handoff.take(1).unwrap();
        assert_eq!(taken[0].0, 1);
        // 2 and 3 (56 bytes each) fit; 4 does not: all dropped, a gap.
        handoff.offer(vec![(3, vec![rec(40)]), (4, vec![rec(40)])]);
        assert_eq!(handoff.oldest(), None);
        assert!(handoff.take(10).is_none());
        handoff.offer(vec![(5, vec![rec(40)])]);
        assert_eq!(handoff.take(10).unwrap()[0].0, 5);
        assert_eq!(handoff.handed().bytes, 0);
    }
}
