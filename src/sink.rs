//! The sink: publishes the store's outbox (dead letters, derived events) to Kafka.
//!
//! Records enter the outbox in the same atomic batch as the offsets they
//! belong to, so a crash cannot lose one. This publisher produces them after
//! the flush and removes each once the broker acknowledges it; after a crash
//! the rest are published on the next start. Delivery is at least once, and
//! every record carries an id that makes duplicates recognisable.

use crate::store::Store;
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
        // A bundle is removed once every message in it is published; one that
        // failed in part is published again, whole (at least once).
        let mut done = Vec::new();
        for (id, recs) in &page {
            let mut ok = true;
            for (rec, r) in recs.iter().zip(results.by_ref()) {
                if let Err((e, _)) = r {
                    ok = false;
                    tracing::warn!(topic = %rec.topic, error = %e, "publishing an outbox record failed; will retry");
                }
            }
            if ok {
                done.push(*id);
            }
        }
        if let Err(e) = self.store.remove_outbox(&done) {
            tracing::error!(error = %e, "cannot remove published outbox records; they will be published again");
        }
        if done.len() < page.len() {
            tokio::time::sleep(Duration::from_millis(500)).await;
            return 0;
        }
        done.len()
    }
}
