//! Tenant settings: read once per change, compiled, shared, and swapped in
//! the moment they change.
//!
//! Each tenant's settings are one document (`proto/orderly/v1/settings.proto`,
//! or JSON with the same field names): field mappings, enabled event types,
//! out-of-order policy overrides and integration flags. A document is
//! validated and compiled once per version into an immutable
//! [`TenantSettings`], shared through an `Arc`; every event of the tenant is
//! then handled under the compiled value in force when its actor handles it.
//! Nothing is read or interpreted again per event, and nothing waits for a
//! TTL to notice a change: the [`Settings`] registry swaps the new version in
//! as soon as the source delivers it.
//!
//! Sources ([`SettingsSource`]):
//! - `topic`: a compacted topic keyed by tenant id, read from the beginning at
//!   start and followed after. Processing does not start before it has been
//!   read up to the end offsets it had at start.
//! - `http`: an endpoint serving every tenant's document, polled with
//!   conditional requests (`ETag` / `If-None-Match`) every `ttl_ms`.
//! - `none`: every tenant gets the defaults (version 0).
//!
//! An invalid document is rejected with a reason (a dead letter and the
//! `orderly_settings_rejected_total` metric), and the tenant's last good
//! settings stay in force.
//!
//! The field mappings and the enabled types are applied when an event is
//! handled, before its handler runs: the entity's log keeps the mapped
//! payload, so a later re-fold gives the same result whatever the settings
//! are by then. Each event's provenance records the settings version it was
//! handled under.

use crate::envelope::Event;
use crate::ordering::{LatePolicy, Policies, TooLatePolicy};
use crate::value::Fields;
use prost::Message as _;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};

/// Where tenant settings come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SettingsSource {
    /// No settings: every tenant gets the defaults.
    #[default]
    None,
    /// A compacted Kafka topic keyed by tenant id.
    Topic,
    /// An HTTP endpoint, polled with conditional requests.
    Http,
}

/// The `[settings]` section of the configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SettingsConfig {
    /// `none`, `topic` or `http`.
    pub source: SettingsSource,
    /// The compacted settings topic (source `topic`).
    pub topic: String,
    /// The endpoint serving every tenant's document (source `http`): a JSON
    /// array of documents, or `{"tenants": [...]}`.
    pub url: String,
    /// Source `http`: how long a fetched copy is trusted before it is
    /// revalidated with a conditional request, in ms. A changed document is
    /// picked up within this interval.
    pub ttl_ms: u64,
}

impl Default for SettingsConfig {
    fn default() -> Self {
        SettingsConfig {
            source: SettingsSource::None,
            topic: "orderly.settings".into(),
            url: String::new(),
            ttl_ms: 30_000,
        }
    }
}

/// A tenant's settings document, as written to the topic or served over HTTP.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingsDocument {
    /// The tenant; must equal the Kafka key. `orderly settings put` fills it in.
    #[serde(default)]
    pub tenant_id: String,
    /// At least 1, and above the version in force.
    #[serde(default)]
    pub version: u64,
    /// External payload field name -> internal field name.
    #[serde(default)]
    pub field_mappings: BTreeMap<String, String>,
    /// Drop payload fields without a mapping (default: keep them).
    #[serde(default)]
    pub drop_unmapped: bool,
    /// The event types to handle; empty: all.
    #[serde(default)]
    pub enabled_types: Vec<String>,
    /// Event type -> late policy override.
    #[serde(default)]
    pub late_policy: BTreeMap<String, String>,
    /// Event type -> too-late policy override.
    #[serde(default)]
    pub too_late_policy: BTreeMap<String, String>,
    /// Named switches for handlers.
    #[serde(default)]
    pub integration_flags: BTreeMap<String, bool>,
}

/// Why a settings document was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    /// Neither JSON nor protobuf `orderly.v1.TenantSettings`.
    #[error("the settings document cannot be decoded: {0}")]
    Undecodable(String),
    /// Decoded, but a field is wrong.
    #[error("invalid settings for tenant {tenant:?}: {reason}")]
    Invalid {
        /// The tenant it names.
        tenant: String,
        /// What is wrong.
        reason: String,
    },
    /// The record's key names another tenant than the document.
    #[error("the record's key {key:?} differs from the document's tenant_id {tenant:?}")]
    KeyMismatch {
        /// The Kafka key.
        key: String,
        /// The document's tenant.
        tenant: String,
    },
    /// The version is not above the one in force.
    #[error("settings version {version} for tenant {tenant:?} is not newer than version {in_force} in force")]
    Stale {
        /// The tenant.
        tenant: String,
        /// The rejected version.
        version: u64,
        /// The version in force.
        in_force: u64,
    },
}

impl SettingsError {
    /// A stable code, for dead letters and the metric label.
    pub fn code(&self) -> &'static str {
        match self {
            SettingsError::Undecodable(_) => "settings_undecodable",
            SettingsError::Invalid { .. } => "settings_invalid",
            SettingsError::KeyMismatch { .. } => "settings_key_mismatch",
            SettingsError::Stale { .. } => "settings_stale",
        }
    }
}

impl SettingsDocument {
    /// Decodes a document: JSON when `content_type` says so or the value
    /// starts with `{`, else protobuf.
    pub fn decode(value: &[u8], content_type: Option<&[u8]>) -> Result<Self, SettingsError> {
        let json = match content_type {
            Some(ct) => String::from_utf8_lossy(ct).contains("json"),
            None => value.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{'),
        };
        if json {
            return serde_json::from_slice(value)
                .map_err(|e| SettingsError::Undecodable(format!("JSON: {e}")));
        }
        let p = crate::envelope::proto::TenantSettings::decode(value).map_err(|e| {
            SettingsError::Undecodable(format!("protobuf orderly.v1.TenantSettings: {e}"))
        })?;
        Ok(SettingsDocument {
            tenant_id: p.tenant_id,
            version: p.version,
            field_mappings: p.field_mappings.into_iter().collect(),
            drop_unmapped: p.drop_unmapped,
            enabled_types: p.enabled_types,
            late_policy: p.late_policy.into_iter().collect(),
            too_late_policy: p.too_late_policy.into_iter().collect(),
            integration_flags: p.integration_flags.into_iter().collect(),
        })
    }

    /// The document as JSON bytes, the form `orderly settings put` writes.
    pub fn to_json_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Validates the document and compiles it on top of `base` (the
    /// configured policies), counting nothing: [`Settings`] counts compiles.
    pub fn compile(&self, base: &Policies) -> Result<TenantSettings, SettingsError> {
        let invalid = |reason: String| SettingsError::Invalid {
            tenant: self.tenant_id.clone(),
            reason,
        };
        if self.tenant_id.trim().is_empty() {
            return Err(invalid("tenant_id must not be empty".into()));
        }
        if self.version == 0 {
            return Err(invalid(
                "version must be at least 1 (0 means the defaults)".into(),
            ));
        }
        let mut targets: HashMap<&str, &str> = HashMap::new();
        for (from, to) in &self.field_mappings {
            if from.is_empty() || to.is_empty() {
                return Err(invalid(format!(
                    "field_mappings {from:?} -> {to:?}: names must not be empty"
                )));
            }
            if let Some(other) = targets.insert(to, from) {
                return Err(invalid(format!(
                    "field_mappings: both {other:?} and {from:?} map to {to:?}; which one wins would depend on the payload"
                )));
            }
        }
        if self.enabled_types.iter().any(|t| t.trim().is_empty()) {
            return Err(invalid("enabled_types: a type name is empty".into()));
        }
        let mut policies = base.clone();
        for (t, p) in &self.late_policy {
            let p: LatePolicy = serde_json::from_value(serde_json::Value::String(p.clone()))
                .map_err(|_| {
                    invalid(format!(
                        "late_policy for {t:?}: {p:?} is not one of recompute, apply, drop, park"
                    ))
                })?;
            policies = policies.with_type(t, Some(p), None, false);
        }
        for (t, p) in &self.too_late_policy {
            let p: TooLatePolicy = serde_json::from_value(serde_json::Value::String(p.clone()))
                .map_err(|_| {
                    invalid(format!(
                        "too_late_policy for {t:?}: {p:?} is not one of drop, apply, park"
                    ))
                })?;
            policies = policies.with_type(t, None, Some(p), false);
        }
        if self.integration_flags.keys().any(|k| k.trim().is_empty()) {
            return Err(invalid("integration_flags: a flag name is empty".into()));
        }
        Ok(TenantSettings {
            version: self.version,
            mappings: self
                .field_mappings
                .iter()
                .map(|(a, b)| (a.clone(), b.clone()))
                .collect(),
            drop_unmapped: self.drop_unmapped,
            enabled: (!self.enabled_types.is_empty())
                .then(|| self.enabled_types.iter().cloned().collect()),
            policies,
            document: Some(self.clone()),
        })
    }
}

/// One tenant's settings, compiled: what handlers and the fold use directly.
#[derive(Debug)]
pub struct TenantSettings {
    version: u64,
    mappings: HashMap<String, String>,
    drop_unmapped: bool,
    enabled: Option<HashSet<String>>,
    policies: Policies,
    document: Option<SettingsDocument>,
}

impl TenantSettings {
    /// The defaults (version 0): no mappings, every type enabled, the
    /// configured policies, no flags.
    pub fn defaults(base: &Policies) -> Self {
        TenantSettings {
            version: 0,
            mappings: HashMap::new(),
            drop_unmapped: false,
            enabled: None,
            policies: base.clone(),
            document: None,
        }
    }

    /// The document's version; 0 for the defaults.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The out-of-order policies: the configured ones with this tenant's overrides.
    pub fn policies(&self) -> &Policies {
        &self.policies
    }

    /// An integration flag; false when unset.
    pub fn flag(&self, name: &str) -> bool {
        self.document
            .as_ref()
            .and_then(|d| d.integration_flags.get(name).copied())
            .unwrap_or(false)
    }

    /// The document compiled, if these are not the defaults.
    pub fn document(&self) -> Option<&SettingsDocument> {
        self.document.as_ref()
    }

    /// Whether events of `event_type` are handled.
    pub fn is_enabled(&self, event_type: &str) -> bool {
        self.enabled.as_ref().is_none_or(|e| e.contains(event_type))
    }

    /// The event as its handler sees it: the payload with the field
    /// mappings applied (a mapped field wins over an unmapped one of the
    /// same name). `None` if its type is not enabled.
    pub fn prepare<'e>(&self, event: &'e Event) -> Option<Cow<'e, Event>> {
        if !self.is_enabled(&event.event_type) {
            return None;
        }
        if self.mappings.is_empty() && !self.drop_unmapped {
            return Some(Cow::Borrowed(event));
        }
        Some(Cow::Owned(Event {
            payload: self.map_payload(&event.payload),
            ..event.clone()
        }))
    }

    fn map_payload(&self, payload: &Fields) -> Fields {
        let mut out = Fields::new();
        if !self.drop_unmapped {
            for (k, v) in payload {
                if !self.mappings.contains_key(k) {
                    out.insert(k.clone(), v.clone());
                }
            }
        }
        for (k, v) in payload {
            if let Some(to) = self.mappings.get(k) {
                out.insert(to.clone(), v.clone());
            }
        }
        out
    }
}

/// How many versions of a tenant's settings stay known, for re-folds of
/// events handled under an earlier one.
pub const RETAINED_VERSIONS: usize = 8;

/// A tenant's settings in force, with the versions before it that are still
/// known. Handed to the fold for each event: it handles the event under
/// [`TenantView::current`], and re-folds older log entries under the version
/// they were handled under, when it is still known.
#[derive(Debug)]
pub struct TenantView {
    /// Oldest first; never empty.
    versions: Vec<Arc<TenantSettings>>,
}

impl TenantView {
    /// The defaults (version 0) over `base` policies: for tenants without
    /// settings, and for tests and tools that use no settings.
    pub fn defaults(base: &Policies) -> Self {
        Self::single(TenantSettings::defaults(base))
    }

    /// A view of one version only.
    pub fn single(settings: TenantSettings) -> Self {
        TenantView {
            versions: vec![Arc::new(settings)],
        }
    }

    /// The settings in force.
    pub fn current(&self) -> &TenantSettings {
        self.versions.last().expect("a view is never empty")
    }

    /// The settings of `version` if still known, else those in force.
    pub fn at(&self, version: u64) -> &TenantSettings {
        self.versions
            .iter()
            .rev()
            .find(|s| s.version == version)
            .map(|s| s.as_ref())
            .unwrap_or_else(|| self.current())
    }

    fn then(&self, next: TenantSettings) -> Self {
        let mut versions = self.versions.clone();
        versions.push(Arc::new(next));
        let excess = versions.len().saturating_sub(RETAINED_VERSIONS);
        versions.drain(..excess);
        TenantView { versions }
    }
}

/// What applying one settings record did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// A new version is in force.
    Changed {
        /// The tenant.
        tenant: String,
        /// Its new version.
        version: u64,
    },
    /// The document equals the one in force (a re-read); nothing compiled.
    Unchanged,
    /// A tombstone: the tenant's settings are gone; the defaults apply.
    Removed {
        /// The tenant.
        tenant: String,
    },
}

/// The registry: every tenant's compiled settings, swapped atomically.
pub struct Settings {
    base: Policies,
    defaults: Arc<TenantView>,
    tenants: RwLock<HashMap<String, Arc<TenantView>>>,
    caught_up: AtomicBool,
    compiled: AtomicU64,
    hits: ::metrics::Counter,
    misses: ::metrics::Counter,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("tenants", &self.tenant_count())
            .field("compiled", &self.compiled())
            .field("caught_up", &self.is_caught_up())
            .finish()
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

impl Settings {
    /// An empty registry over the configured `base` policies. Not caught up
    /// until [`Settings::set_caught_up`] (a source calls it once it has read
    /// everything there was at start).
    pub fn new(base: Policies) -> Self {
        let defaults = Arc::new(TenantView::single(TenantSettings::defaults(&base)));
        Settings {
            base,
            defaults,
            tenants: RwLock::new(HashMap::new()),
            caught_up: AtomicBool::new(false),
            compiled: AtomicU64::new(0),
            hits: ::metrics::counter!("orderly_settings_lookups_total", "result" => "hit"),
            misses: ::metrics::counter!("orderly_settings_lookups_total", "result" => "miss"),
        }
    }

    /// The settings `tenant` handles its events under now. Called once per
    /// event: a read lock, a hash lookup and an `Arc` clone.
    pub fn view(&self, tenant: &str) -> Arc<TenantView> {
        match read(&self.tenants).get(tenant) {
            Some(v) => {
                self.hits.increment(1);
                v.clone()
            }
            None => {
                self.misses.increment(1);
                self.defaults.clone()
            }
        }
    }

    /// The settings in force for `tenant`, if it has any.
    pub fn get(&self, tenant: &str) -> Option<Arc<TenantView>> {
        read(&self.tenants).get(tenant).cloned()
    }

    /// Applies one record of the settings topic: `key` is the tenant id,
    /// `value` the document, or `None` for a tombstone.
    pub fn apply_record(
        &self,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        content_type: Option<&[u8]>,
    ) -> Result<Applied, SettingsError> {
        let key = key.map(|k| String::from_utf8_lossy(k).into_owned());
        let Some(value) = value.filter(|v| !v.is_empty()) else {
            let Some(tenant) = key.filter(|k| !k.is_empty()) else {
                return Err(SettingsError::Undecodable(
                    "a tombstone without a key names no tenant".into(),
                ));
            };
            return Ok(self.remove(&tenant));
        };
        let doc = SettingsDocument::decode(value, content_type)?;
        if let Some(key) = key {
            if key != doc.tenant_id {
                return Err(SettingsError::KeyMismatch {
                    key,
                    tenant: doc.tenant_id,
                });
            }
        }
        self.apply_document(doc)
    }

    /// Validates, compiles and swaps in one document. A document equal to
    /// the one in force changes nothing; an older version is rejected.
    pub fn apply_document(&self, doc: SettingsDocument) -> Result<Applied, SettingsError> {
        let current = self.get(&doc.tenant_id);
        if let Some(c) = current.as_deref().map(TenantView::current) {
            if c.document() == Some(&doc) {
                return Ok(Applied::Unchanged);
            }
            if doc.version <= c.version {
                return Err(SettingsError::Stale {
                    tenant: doc.tenant_id.clone(),
                    version: doc.version,
                    in_force: c.version,
                });
            }
        }
        let compiled = doc.compile(&self.base)?;
        self.compiled.fetch_add(1, Relaxed);
        let version = compiled.version;
        let view = Arc::new(match &current {
            Some(c) => c.then(compiled),
            None => TenantView::single(compiled),
        });
        let tenants = {
            let mut map = self.tenants.write().unwrap_or_else(|e| e.into_inner());
            map.insert(doc.tenant_id.clone(), view);
            map.len()
        };
        crate::internal_events::settings_applied(&doc.tenant_id, version, tenants);
        Ok(Applied::Changed {
            tenant: doc.tenant_id,
            version,
        })
    }

    fn remove(&self, tenant: &str) -> Applied {
        let mut map = self.tenants.write().unwrap_or_else(|e| e.into_inner());
        if map.remove(tenant).is_none() {
            return Applied::Unchanged;
        }
        ::metrics::gauge!("orderly_settings_tenants").set(map.len() as f64);
        tracing::info!(tenant, "tenant settings removed; the defaults apply");
        Applied::Removed {
            tenant: tenant.to_owned(),
        }
    }

    /// Documents compiled so far: one per tenant and version.
    pub fn compiled(&self) -> u64 {
        self.compiled.load(Relaxed)
    }

    /// Tenants with settings in force.
    pub fn tenant_count(&self) -> usize {
        read(&self.tenants).len()
    }

    /// True once the source has delivered everything it had at start.
    pub fn is_caught_up(&self) -> bool {
        self.caught_up.load(Relaxed)
    }

    /// Marks the registry caught up; processing may start.
    pub fn set_caught_up(&self) {
        if !self.caught_up.swap(true, Relaxed) {
            ::metrics::gauge!("orderly_settings_caught_up").set(1.0);
            tracing::info!(
                tenants = self.tenant_count(),
                compiled = self.compiled(),
                "tenant settings caught up"
            );
        }
    }
}

/// Where a source sends a rejected document: the pipeline records it as a
/// dead letter.
pub type RejectSink = Box<dyn Fn(crate::dead_letter::DeadLetter) + Send>;

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
}

/// Starts the configured source on its own thread; with source `none`, marks
/// the registry caught up and starts nothing.
pub fn start_source(
    config: &crate::config::Config,
    parts: SourceParts,
) -> std::io::Result<Option<std::thread::JoinHandle<()>>> {
    let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
        std::thread::Builder::new()
            .name(name.into())
            .spawn(f)
            .map(Some)
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
) -> crate::dead_letter::DeadLetter {
    crate::dead_letter::DeadLetter {
        id: 0,
        code: e.code().into(),
        reason: e.to_string(),
        attempts: 1,
        topic: topic.into(),
        partition,
        offset,
        key: key.map(<[u8]>::to_vec),
        value: value.map(<[u8]>::to_vec),
        headers,
        entity_id: None,
        event_id: None,
        event_type: None,
        created_at: crate::telemetry::unix_ms(std::time::SystemTime::now()),
        status: crate::dead_letter::OPEN.into(),
    }
}

fn reject(
    parts: &SourceParts,
    e: &SettingsError,
    origin: &str,
    dl: crate::dead_letter::DeadLetter,
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
            client: crate::source::reader_config(config, "settings"),
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
        use rdkafka::message::{Headers as _, Message as _};
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
                    let content_type = m.headers().and_then(|h| {
                        h.iter()
                            .find(|h| h.key.eq_ignore_ascii_case("content-type"))
                            .and_then(|h| h.value.map(<[u8]>::to_vec))
                    });
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
                            let headers = m
                                .headers()
                                .map(|h| {
                                    h.iter()
                                        .map(|h| {
                                            (h.key.to_owned(), h.value.unwrap_or_default().to_vec())
                                        })
                                        .collect()
                                })
                                .unwrap_or_default();
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

/// Polls an HTTP endpoint that serves every tenant's document, with
/// conditional requests, every `ttl`.
pub struct HttpReader {
    /// The endpoint.
    pub url: String,
    /// How long a fetched copy is trusted before it is revalidated.
    pub ttl: std::time::Duration,
}

/// Parses the HTTP source's body: an array of documents, or `{"tenants": [...]}`.
pub fn parse_document_list(body: &[u8]) -> Result<Vec<serde_json::Value>, SettingsError> {
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| SettingsError::Undecodable(format!("JSON: {e}")))?;
    match v {
        serde_json::Value::Array(items) => Ok(items),
        serde_json::Value::Object(mut o) => match o.remove("tenants") {
            Some(serde_json::Value::Array(items)) => Ok(items),
            _ => Err(SettingsError::Undecodable(
                "expected an array of documents or {\"tenants\": [...]}".into(),
            )),
        },
        _ => Err(SettingsError::Undecodable(
            "expected an array of documents or {\"tenants\": [...]}".into(),
        )),
    }
}

impl HttpReader {
    /// Runs until `parts.stop`. The registry is caught up after the first
    /// successful fetch; until then it retries every second.
    pub fn run(self, parts: SourceParts) {
        use crate::internal_events::{emit, SettingsRefreshed};
        let client = match reqwest::blocking::Client::builder()
            .timeout(std::time::Duration::from_secs(10))
            .build()
        {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot create the settings HTTP client");
                return;
            }
        };
        let mut etag: Option<String> = None;
        while !parts.stop.load(Relaxed) {
            let result = self.refresh(&client, &mut etag, &parts);
            emit(SettingsRefreshed { result }, &parts.stats);
            let wait = if parts.settings.is_caught_up() {
                self.ttl
            } else {
                self.ttl.min(std::time::Duration::from_secs(1))
            };
            let until = std::time::Instant::now() + wait;
            while std::time::Instant::now() < until && !parts.stop.load(Relaxed) {
                std::thread::sleep(std::time::Duration::from_millis(20).min(wait));
            }
        }
    }

    /// One conditional request: `changed`, `unchanged` (fetched, but every
    /// document equals the one in force), `not_modified` or `error`.
    fn refresh(
        &self,
        client: &reqwest::blocking::Client,
        etag: &mut Option<String>,
        parts: &SourceParts,
    ) -> &'static str {
        let mut req = client.get(&self.url);
        if let Some(tag) = etag.as_deref() {
            req = req.header(reqwest::header::IF_NONE_MATCH, tag);
        }
        let error = |e: &dyn std::fmt::Display| {
            crate::internal_events::emit(
                crate::internal_events::ComponentError {
                    stage: "settings",
                    error_code: "http_error",
                    error: e,
                },
                &parts.stats,
            );
            "error"
        };
        let resp = match req.send() {
            Ok(r) => r,
            Err(e) => return error(&format!("GET {}: {e}", self.url)),
        };
        if resp.status() == reqwest::StatusCode::NOT_MODIFIED {
            return "not_modified";
        }
        if !resp.status().is_success() {
            return error(&format!("GET {}: status {}", self.url, resp.status()));
        }
        let new_tag = resp
            .headers()
            .get(reqwest::header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = match resp.bytes() {
            Ok(b) => b,
            Err(e) => return error(&format!("GET {}: reading the body: {e}", self.url)),
        };
        let docs = match parse_document_list(&body) {
            Ok(d) => d,
            Err(e) => {
                let offset = (crc32(&body) & 0x7fff_ffff) as i64;
                let dl = rejected_dead_letter(&e, &self.url, -1, offset, None, Some(&body), vec![]);
                reject(parts, &e, &self.url, dl);
                return "error";
            }
        };
        let mut changed = false;
        for doc in docs {
            let outcome = SettingsDocument::deserialize(&doc)
                .map_err(|e| SettingsError::Undecodable(format!("JSON: {e}")))
                .and_then(|d| parts.settings.apply_document(d));
            match outcome {
                Ok(Applied::Changed { tenant, version }) => {
                    changed = true;
                    if parts.settings.is_caught_up() {
                        tracing::info!(%tenant, version, "tenant settings changed");
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    // One dead letter per distinct rejected document.
                    let raw = serde_json::to_vec(&doc).unwrap_or_default();
                    let offset = (crc32(&raw) & 0x7fff_ffff) as i64;
                    let dl =
                        rejected_dead_letter(&e, &self.url, 0, offset, None, Some(&raw), vec![]);
                    reject(parts, &e, &self.url, dl);
                }
            }
        }
        *etag = new_tag;
        parts.settings.set_caught_up();
        if changed {
            "changed"
        } else {
            "unchanged"
        }
    }
}

/// Reads every tenant's settings from the configured source once, up to
/// the end it had at the call, and returns the registry (for
/// `orderly settings get` and `put`). Rejected documents are logged.
pub fn load_once(
    config: &crate::config::Config,
    timeout: std::time::Duration,
) -> Result<Arc<Settings>, String> {
    let settings = Arc::new(Settings::new(config.policies()));
    let stop = Arc::new(AtomicBool::new(false));
    let parts = SourceParts {
        settings: settings.clone(),
        stats: Arc::default(),
        reject: Box::new(|_| {}),
        stop: stop.clone(),
    };
    let handle = start_source(config, parts).map_err(|e| e.to_string())?;
    let deadline = std::time::Instant::now() + timeout;
    while !settings.is_caught_up() && std::time::Instant::now() < deadline {
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
        produce_document(&config.brokers, &config.settings.topic, &doc, timeout)?;
    Ok((doc, partition, offset))
}

/// Produces `doc` as JSON to `topic`, keyed by its tenant, without checks
/// (`put` checks first). Returns its partition and offset.
pub fn produce_document(
    brokers: &str,
    topic: &str,
    doc: &SettingsDocument,
    timeout: std::time::Duration,
) -> Result<(i32, i64), String> {
    let producer = crate::sink::producer(brokers, &[]).map_err(|e| e.to_string())?;
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

/// CRC-32 (IEEE), to name a rejected HTTP document stably across restarts.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value::Value;

    fn doc(version: u64) -> SettingsDocument {
        SettingsDocument {
            tenant_id: "t1".into(),
            version,
            field_mappings: [("Email".to_owned(), "email".to_owned())].into(),
            ..Default::default()
        }
    }

    #[test]
    fn mappings_and_enabled_types() {
        let mut d = doc(1);
        d.enabled_types = vec!["lead.updated".into()];
        d.field_mappings.insert("Stage".into(), "stage".into());
        let s = d.compile(&Policies::default()).unwrap();
        let e = Event::test(
            "1",
            0,
            "lead.updated",
            serde_json::json!({"Email": "a@b", "stage": "old", "Stage": "new", "x": 1}),
        );
        let p = s.prepare(&e).unwrap();
        assert_eq!(p.payload["email"], Value::String("a@b".into()));
        // The mapped field wins over an unmapped one of the same name.
        assert_eq!(p.payload["stage"], Value::String("new".into()));
        assert_eq!(p.payload["x"], Value::Int(1));
        assert!(!p.payload.contains_key("Email"));
        assert!(s
            .prepare(&Event::test("1", 0, "lead.deleted", serde_json::json!({})))
            .is_none());
        d.drop_unmapped = true;
        let s = d.compile(&Policies::default()).unwrap();
        assert!(!s.prepare(&e).unwrap().payload.contains_key("x"));
    }

    #[test]
    fn invalid_documents_say_why() {
        let mut d = doc(1);
        d.field_mappings.insert("mail".into(), "email".into());
        let e = d.compile(&Policies::default()).unwrap_err();
        assert!(e.to_string().contains("map to \"email\""), "{e}");
        let mut d = doc(1);
        d.late_policy
            .insert("lead.updated".into(), "sometimes".into());
        let e = d.compile(&Policies::default()).unwrap_err();
        assert!(e.to_string().contains("\"sometimes\" is not one of"), "{e}");
        assert_eq!(
            doc(0).compile(&Policies::default()).unwrap_err().code(),
            "settings_invalid"
        );
        let e = SettingsDocument::decode(br#"{"tenant_id":"t","versoin":2}"#, None).unwrap_err();
        assert!(e.to_string().contains("unknown field `versoin`"), "{e}");
    }

    #[test]
    fn policy_overrides_apply_to_the_tenant_only() {
        let mut d = doc(1);
        d.late_policy.insert("lead.updated".into(), "drop".into());
        let s = d.compile(&Policies::default()).unwrap();
        assert_eq!(s.policies().late("lead.updated"), LatePolicy::Drop);
        assert_eq!(s.policies().late("lead.created"), LatePolicy::Recompute);
    }

    #[test]
    fn registry_swaps_keeps_last_good_and_counts_compiles() {
        let r = Settings::new(Policies::default());
        assert_eq!(r.view("t1").current().version(), 0);
        let v1 = doc(1).to_json_bytes();
        assert!(matches!(
            r.apply_record(Some(b"t1"), Some(&v1), None),
            Ok(Applied::Changed { version: 1, .. })
        ));
        // A re-read of the same document compiles nothing.
        assert_eq!(
            r.apply_record(Some(b"t1"), Some(&v1), None),
            Ok(Applied::Unchanged)
        );
        assert_eq!(r.compiled(), 1);
        // Invalid, stale, or keyed wrongly: rejected, version 1 stays.
        let mut bad = doc(2);
        bad.field_mappings.insert("e".into(), "email".into());
        let e = r
            .apply_record(Some(b"t1"), Some(&bad.to_json_bytes()), None)
            .unwrap_err();
        assert_eq!(e.code(), "settings_invalid");
        let mut stale = doc(1);
        stale.drop_unmapped = true;
        let e = r
            .apply_record(Some(b"t1"), Some(&stale.to_json_bytes()), None)
            .unwrap_err();
        assert_eq!(e.code(), "settings_stale");
        let e = r
            .apply_record(Some(b"t2"), Some(&doc(3).to_json_bytes()), None)
            .unwrap_err();
        assert_eq!(e.code(), "settings_key_mismatch");
        assert_eq!(r.view("t1").current().version(), 1);
        // Version 2 is swapped in; version 1 stays known for re-folds.
        r.apply_record(Some(b"t1"), Some(&doc(2).to_json_bytes()), None)
            .unwrap();
        let view = r.view("t1");
        assert_eq!(view.current().version(), 2);
        assert_eq!(view.at(1).version(), 1);
        assert_eq!(view.at(7).version(), 2);
        assert_eq!(r.compiled(), 2);
        assert_eq!(
            r.apply_record(Some(b"t1"), None, None),
            Ok(Applied::Removed {
                tenant: "t1".into()
            })
        );
        assert_eq!(r.view("t1").current().version(), 0);
    }

    #[test]
    fn protobuf_documents_decode() {
        let p = crate::envelope::proto::TenantSettings {
            tenant_id: "t1".into(),
            version: 4,
            field_mappings: [("A".to_owned(), "a".to_owned())].into(),
            enabled_types: vec!["x".into()],
            integration_flags: [("sync".to_owned(), true)].into(),
            ..Default::default()
        };
        let d = SettingsDocument::decode(&p.encode_to_vec(), None).unwrap();
        assert_eq!(d.version, 4);
        let s = d.compile(&Policies::default()).unwrap();
        assert!(s.flag("sync") && !s.flag("other"));
        assert!(s.is_enabled("x") && !s.is_enabled("y"));
    }
}
