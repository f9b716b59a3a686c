//! The settings topic source: a compacted topic keyed by tenant id, read from
//! the beginning at start and followed after.
//!
//! Processing does not start before it has been read up to the end offsets
//! it had at start. Invalid documents become dead letters through
//! [`SourceParts::reject`]; the tenant's last good settings stay in force.

use super::{reject, rejected_dead_letter, Applied, SourceParts};
use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;

/// Reads the compacted settings topic from the beginning, and follows it.
pub struct TopicReader {
    topic: String,
    client: rdkafka::ClientConfig,
}

impl TopicReader {
    /// A reader of `config.settings.topic` on `config.brokers`. It assigns
    /// every partition itself: it never joins the group or commits.
    pub fn new(config: &crate::config::Config) -> Self {
        TopicReader {
            topic: config.settings.topic.clone(),
            client: crate::kafka::reader(config, "settings"),
        }
    }

    /// The topic's partitions and their end offsets now, or why not.
    fn ends(
        &self,
        consumer: &rdkafka::consumer::BaseConsumer,
    ) -> Result<Vec<(i32, i64, i64)>, String> {
        use rdkafka::consumer::Consumer as _;
        let timeout = std::time::Duration::from_secs(5);
        let md = consumer
            .fetch_metadata(Some(&self.topic), timeout)
            .map_err(|e| {
                format!(
                    "cannot read metadata of settings topic {:?}: {e}",
                    self.topic
                )
            })?;
        let partitions: Vec<i32> = md
            .topics()
            .iter()
            .filter(|t| t.name() == self.topic && t.error().is_none())
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        if partitions.is_empty() {
            return Err(format!(
                "settings topic {:?} does not exist: create it (compacted, keyed by tenant id), or set settings.source = \"none\"",
                self.topic
            ));
        }
        partitions
            .into_iter()
            .map(|p| {
                consumer
                    .fetch_watermarks(&self.topic, p, timeout)
                    .map(|(lo, hi)| (p, lo, hi))
                    .map_err(|e| format!("cannot read the end offset of {}/{p}: {e}", self.topic))
            })
            .collect()
    }

    /// Runs until `parts.stop`: catches up, marks the registry caught up, follows.
    pub fn run(self, parts: SourceParts) {
        use rdkafka::consumer::Consumer as _;
        use rdkafka::message::Message as _;
        let stop = parts.stop.clone();
        let consumer: rdkafka::consumer::BaseConsumer = match self.client.create() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot create the settings consumer; processing cannot start");
                return;
            }
        };
        // Where the topic ended at start: processing waits until it is read.
        let mut warned: Option<std::time::Instant> = None;
        let ends = loop {
            if stop.load(Relaxed) {
                return;
            }
            match self.ends(&consumer) {
                Ok(ends) => break ends,
                Err(reason) => {
                    if warned.is_none_or(|w| w.elapsed() >= std::time::Duration::from_secs(10)) {
                        tracing::warn!(%reason, "waiting for the settings topic; processing has not started");
                        warned = Some(std::time::Instant::now());
                    }
                    std::thread::sleep(std::time::Duration::from_millis(500));
                }
            }
        };
        let mut tpl = rdkafka::TopicPartitionList::new();
        let mut pending: HashMap<i32, i64> = HashMap::new();
        for &(p, lo, hi) in &ends {
            if let Err(e) = tpl.add_partition_offset(&self.topic, p, rdkafka::Offset::Beginning) {
                tracing::error!(error = %e, "cannot assign the settings topic");
                return;
            }
            if hi > lo {
                pending.insert(p, hi);
            }
        }
        if let Err(e) = consumer.assign(&tpl) {
            tracing::error!(error = %e, "cannot assign the settings topic");
            return;
        }
        tracing::info!(topic = %self.topic, partitions = ends.len(), records_at_most = pending.values().sum::<i64>(), "reading tenant settings");
        while !stop.load(Relaxed) {
            if pending.is_empty() && !parts.settings.is_caught_up() {
                parts.settings.set_caught_up();
            }
            match consumer.poll(std::time::Duration::from_millis(100)) {
                None => {
                    // Compaction or transaction markers can leave the end
                    // offset unreachable by records: trust the position too.
                    if !pending.is_empty() {
                        if let Ok(pos) = consumer.position() {
                            for e in pos.elements() {
                                if let rdkafka::Offset::Offset(o) = e.offset() {
                                    if pending.get(&e.partition()).is_some_and(|&hi| o >= hi) {
                                        pending.remove(&e.partition());
                                    }
                                }
                            }
                        }
                    }
                }
                Some(Ok(m)) => {
                    let _ = crate::failpoint::hit("settings.read");
                    let headers = crate::kafka::headers_of(&m);
                    let content_type = headers
                        .iter()
                        .find(|(k, v)| k.eq_ignore_ascii_case("content-type") && !v.is_empty())
                        .map(|(_, v)| v.clone());
                    match parts
                        .settings
                        .apply_record(m.key(), m.payload(), content_type.as_deref())
                    {
                        Ok(Applied::Changed { tenant, version })
                            if parts.settings.is_caught_up() =>
                        {
                            tracing::info!(%tenant, version, "tenant settings changed");
                        }
                        Ok(_) => {}
                        Err(e) => {
                            let origin = format!("{}/{}@{}", self.topic, m.partition(), m.offset());
                            let dl = rejected_dead_letter(
                                &e,
                                &self.topic,
                                m.partition(),
                                m.offset(),
                                m.key(),
                                m.payload(),
                                headers,
                            );
                            reject(&parts, &e, &origin, dl);
                        }
                    }
                    if pending
                        .get(&m.partition())
                        .is_some_and(|&hi| m.offset() + 1 >= hi)
                    {
                        pending.remove(&m.partition());
                    }
                }
                Some(Err(e)) => crate::internal_events::emit(
                    crate::internal_events::ComponentError {
                        stage: "settings",
                        error_code: "consumer_error",
                        error: &e,
                    },
                    &parts.stats,
                ),
            }
        }
    }
}
