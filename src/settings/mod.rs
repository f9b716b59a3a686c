//! Tenant settings at run time: where documents come from, and the registry
//! that swaps each new version in.
//!
//! The documents and their compiled form are pure and live in
//! [`crate::model::tenant`]. This module owns the moving parts:
//! - [`Settings`] (`registry`): every tenant's compiled settings, swapped in
//!   atomically as soon as a source delivers a new version; nothing waits for
//!   a TTL to notice a change.
//! - the sources, chosen by [`SettingsSource`]:
//!   - `topic`: a compacted topic keyed by tenant id, read from the beginning
//!     at start and followed after. Processing does not start before it has
//!     been read up to the end offsets it had at start.
//!   - `http`: an endpoint serving every tenant's document, polled with
//!     conditional requests (`ETag` / `If-None-Match`) every `ttl_ms`.
//!   - `none`: every tenant gets the defaults (version 0).
//! - the `orderly settings get/put` commands' halves: [`load_once`] and [`put`].
//!
//! An invalid document is rejected with a reason (a dead letter and the
//! `orderly_settings_rejected_total` metric), and the tenant's last good
//! settings stay in force.

mod http;
mod registry;
mod topic;

pub use crate::config::{SettingsConfig, SettingsSource};
pub use crate::model::tenant::{SettingsDocument, SettingsError, TenantSettings, TenantView};
pub use http::{parse_document_list, HttpReader};
pub use registry::{Applied, Settings};
pub use topic::TopicReader;

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;

/// Where a source sends a rejected document: the pipeline records it as a
/// dead letter.
pub type RejectSink = Box<dyn Fn(crate::model::dead_letter::DeadLetter) + Send>;

/// What a settings source thread needs.
pub struct SourceParts {
    /// The registry it feeds.
    pub settings: Arc<Settings>,
    /// Counters (rejections count as dead letters).
    pub stats: Arc<crate::metrics::Stats>,
    /// Rejected documents go here.
    pub reject: RejectSink,
    /// Set to stop.
    pub stop: Arc<AtomicBool>,
    /// Raised if the reader's thread panics.
    pub fatal: Arc<crate::lifecycle::Fatal>,
}

/// Starts the configured source on its own thread; with source `none`, marks
/// the registry caught up and starts nothing.
pub fn start_source(
    config: &crate::config::Config,
    parts: SourceParts,
) -> std::io::Result<Option<std::thread::JoinHandle<()>>> {
    let fatal = parts.fatal.clone();
    let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
        crate::lifecycle::spawn(name, &fatal, f).map(Some)
    };
    match config.settings.source {
        SettingsSource::None => {
            parts.settings.set_caught_up();
            Ok(None)
        }
        SettingsSource::Topic => {
            let reader = TopicReader::new(config);
            spawn("orderly-settings", Box::new(move || reader.run(parts)))
        }
        SettingsSource::Http => {
            let url = config.settings.url.clone();
            let ttl = std::time::Duration::from_millis(config.settings.ttl_ms);
            spawn(
                "orderly-settings",
                Box::new(move || HttpReader { url, ttl }.run(parts)),
            )
        }
    }
}

fn rejected_dead_letter(
    e: &SettingsError,
    topic: &str,
    partition: i32,
    offset: i64,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    headers: Vec<(String, Vec<u8>)>,
) -> crate::model::dead_letter::DeadLetter {
    crate::model::dead_letter::DeadLetter::settings_rejected(
        e.code(),
        e.to_string(),
        crate::model::dead_letter::Received {
            topic: topic.into(),
            partition,
            offset,
            key: key.map(<[u8]>::to_vec),
            value: value.map(<[u8]>::to_vec),
            headers,
        },
        crate::telemetry::unix_ms(std::time::SystemTime::now()),
    )
}

fn reject(
    parts: &SourceParts,
    e: &SettingsError,
    origin: &str,
    dl: crate::model::dead_letter::DeadLetter,
) {
    crate::internal_events::emit(
        crate::internal_events::SettingsRejected {
            code: e.code(),
            reason: e,
            origin,
        },
        &parts.stats,
    );
    (parts.reject)(dl);
}
/// `orderly settings get` and `put`). Rejected documents are logged.
pub fn load_once(
    config: &crate::config::Config,
    timeout: std::time::Duration,
) -> Result<Arc<Settings>, String> {
    let settings = Arc::new(Settings::new(config.policies()));
    let stop = Arc::new(AtomicBool::new(false));
    let fatal = Arc::new(crate::lifecycle::Fatal::default());
    let parts = SourceParts {
        settings: settings.clone(),
        stats: Arc::default(),
        reject: Box::new(|_| {}),
        stop: stop.clone(),
        fatal: fatal.clone(),
    };
    let handle = start_source(config, parts).map_err(|e| e.to_string())?;
    let deadline = std::time::Instant::now() + timeout;
    while !settings.is_caught_up() && std::time::Instant::now() < deadline {
        if let Some(reason) = fatal.reason() {
            return Err(reason);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    stop.store(true, Relaxed);
    if let Some(h) = handle {
        let _ = h.join();
    }
    if !settings.is_caught_up() {
        return Err(match config.settings.source {
            SettingsSource::Http => format!(
                "could not read tenant settings from {} within {timeout:?}",
                config.settings.url
            ),
            _ => format!(
                "could not read settings topic {:?} on {} within {timeout:?}",
                config.settings.topic, config.brokers
            ),
        });
    }
    Ok(settings)
}

/// Validates `document` (JSON or protobuf) for `tenant` and produces it to
/// the settings topic. A document without a version gets the one after the
/// version in force. Returns the document written and its partition and offset.
pub fn put(
    config: &crate::config::Config,
    tenant: &str,
    document: &[u8],
    timeout: std::time::Duration,
) -> Result<(SettingsDocument, i32, i64), String> {
    if config.settings.source != SettingsSource::Topic {
        return Err(
            "settings put writes to the settings topic: set settings.source = \"topic\" (with source \"http\", change the document where the endpoint serves it)"
                .into(),
        );
    }
    let mut doc = SettingsDocument::decode(document, None).map_err(|e| e.to_string())?;
    if doc.tenant_id.is_empty() {
        doc.tenant_id = tenant.to_owned();
    }
    if doc.tenant_id != tenant {
        return Err(SettingsError::KeyMismatch {
            key: tenant.to_owned(),
            tenant: doc.tenant_id,
        }
        .to_string());
    }
    let registry = load_once(config, timeout)?;
    let in_force = registry
        .get(tenant)
        .map(|v| v.current().version())
        .unwrap_or(0);
    if doc.version == 0 {
        doc.version = in_force + 1;
    }
    // The same checks the processor makes, before anything is written.
    registry
        .apply_document(doc.clone())
        .map_err(|e| e.to_string())?;
    let (partition, offset) =
        produce_document(config, &doc, timeout)?;
    Ok((doc, partition, offset))
}

/// Produces `doc` as JSON to the settings topic of `config`, keyed by its
/// tenant, without checks (`put` checks first). Returns its partition and offset.
pub fn produce_document(
    config: &crate::config::Config,
    doc: &SettingsDocument,
    timeout: std::time::Duration,
) -> Result<(i32, i64), String> {
    let producer = crate::kafka::producer(config, &[]).map_err(|e| e.to_string())?;
    send_document(&producer, &config.settings.topic, doc, timeout)
}

/// As [`produce_document`], with a producer of the caller's (one that
/// publishes many documents).
pub fn send_document(
    producer: &rdkafka::producer::FutureProducer,
    topic: &str,
    doc: &SettingsDocument,
    timeout: std::time::Duration,
) -> Result<(i32, i64), String> {
    let value = doc.to_json_bytes();
    let record = rdkafka::producer::FutureRecord::to(topic)
        .key(&doc.tenant_id)
        .payload(&value)
        .headers(
            rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
                key: "content-type",
                value: Some("application/json"),
            }),
        );
    let delivered = futures::executor::block_on(producer.send(record, timeout))
        .map_err(|(e, _)| format!("cannot write to {topic:?}: {e}"))?;
    Ok((delivered.partition, delivered.offset))
}
