//! The sink: publishes the store's outbox (dead letters, derived events) to Kafka.
//!
//! Records enter the outbox in the same atomic batch as the offsets they
//! belong to, so a crash cannot lose one. This publisher produces them after
//! the flush and removes each once the broker acknowledges it; after a crash
//! the rest are published on the next start. Delivery is at least once, and
//! every record carries an id that makes duplicates recognisable.
//!
//! A record the broker refuses for good (larger than `message.max.bytes`,
//! its topic gone, not authorised) is never retried: it moves aside in the
//! store (`Store::undeliverable`), with the reason in an
//! `orderly-undeliverable` header, and is counted. A bundle published in
//! part keeps only its unpublished records, so a retry does not publish
//! the others again.

use crate::internal_events::{emit, OutboxUndeliverable};
use crate::store::Store;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

/// Publishes the outbox until stopped.
pub struct Publisher {
    /// The store holding the outbox.
    pub store: Arc<dyn Store>,
    /// The producer.
    pub producer: FutureProducer,
    /// Woken by the writer when it adds records.
    pub ready: Arc<tokio::sync::Notify>,
    /// Set to stop after one last pass.
    pub stop: Arc<AtomicBool>,
    /// Counters.
    pub stats: Arc<crate::metrics::Stats>,
}

impl Publisher {
    /// Runs until `stop`; a final pass publishes what the last batches added.
    pub async fn run(self) {
        loop {
            let stopping = self.stop.load(Relaxed);
            while self.publish_some().await > 0 {}
            if stopping {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_millis(500), self.ready.notified()).await;
        }
    }

    /// Publishes up to one page of the outbox; returns how many were published.
    async fn publish_some(&self) -> usize {
        let page = match self.store.outbox(1000) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the outbox");
                return 0;
            }
        };
        if page.is_empty() {
            return 0;
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
            tokio::time::sleep(Duration::from_millis(500)).await;
            return 0;
        }
        page.len()
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
