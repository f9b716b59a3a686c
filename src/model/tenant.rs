//! Tenant settings, compiled: the pure half of tenant settings.
//!
//! Each tenant's settings are one document (`proto/orderly/v1/settings.proto`,
//! or JSON with the same field names): field mappings, enabled event types,
//! out-of-order policy overrides and integration flags. A document is
//! validated and compiled once per version into an immutable
//! [`TenantSettings`], shared through an `Arc`; every event of the tenant is
//! handled under the compiled value in force when its actor handles it.
//!
//! The field mappings and the enabled types are applied when an event is
//! handled, before its handler runs: the entity's log keeps the mapped
//! payload, so a later re-fold gives the same result whatever the settings
//! are by then. Each event's provenance records the settings version it was
//! handled under.
//!
//! This module owns the document, its validation and the compiled value. It
//! does not own where documents come from or how a new version is swapped in:
//! that is the runtime's `settings` module (registry, topic and HTTP sources).

use crate::model::envelope::Event;
use crate::model::ordering::{LatePolicy, Policies, TooLatePolicy};
use crate::model::value::Fields;
use prost::Message as _;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

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
        let p = crate::model::envelope::proto::TenantSettings::decode(value).map_err(|e| {
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
    /// configured policies), counting nothing: the registry counts compiles.
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
    /// Looked up once per payload field of every event: foldhash, not
    /// SipHash (callgrind, BENCHMARKS.md "The tenant settings path").
    mappings: foldhash::HashMap<String, String>,
    drop_unmapped: bool,
    enabled: Option<foldhash::HashSet<String>>,
    policies: Policies,
    document: Option<SettingsDocument>,
}

impl TenantSettings {
    /// The defaults (version 0): no mappings, every type enabled, the
    /// configured policies, no flags.
    pub fn defaults(base: &Policies) -> Self {
        TenantSettings {
            version: 0,
            mappings: foldhash::HashMap::default(),
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
        // Field by field: `..event.clone()` would clone the payload too,
        // only to drop it.
        let Event {
            entity_id,
            tenant_id,
            event_id,
            event_type,
            occurred_at,
            version,
            payload,
        } = event;
        Some(Cow::Owned(Event {
            entity_id: entity_id.clone(),
            tenant_id: tenant_id.clone(),
            event_id: event_id.clone(),
            event_type: event_type.clone(),
            occurred_at: *occurred_at,
            version: *version,
            payload: self.map_payload(payload),
        }))
    }

    /// One lookup per field. A mapped field replaces an unmapped one of the
    /// same name whichever comes first; no two mappings share a target
    /// (checked when the document is compiled).
    fn map_payload(&self, payload: &Fields) -> Fields {
        let mut out = Fields::new();
        for (k, v) in payload {
            match self.mappings.get(k) {
                Some(to) => {
                    out.insert(to.clone(), v.clone());
                }
                None if !self.drop_unmapped => {
                    out.entry(k.clone()).or_insert_with(|| v.clone());
                }
                None => {}
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

    pub(crate) fn then(&self, next: TenantSettings) -> Self {
        let mut versions = self.versions.clone();
        versions.push(Arc::new(next));
        let excess = versions.len().saturating_sub(RETAINED_VERSIONS);
        versions.drain(..excess);
        TenantView { versions }
    }
}

/// A document of tenant `t1` at `version`, mapping `Email` to `email`: the
/// unit tests' starting point.
#[cfg(test)]
pub(crate) fn test_document(version: u64) -> SettingsDocument {
    SettingsDocument {
        tenant_id: "t1".into(),
        version,
        field_mappings: [("Email".to_owned(), "email".to_owned())].into(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::value::Value;

    use super::test_document as doc;

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
        // Also when the unmapped field comes first in the payload's order.
        let mut later = doc(1);
        later.field_mappings.insert("zstage".into(), "stage".into());
        let later = later.compile(&Policies::default()).unwrap();
        let e2 = Event::test(
            "1",
            0,
            "lead.updated",
            serde_json::json!({"stage": "old", "zstage": "new"}),
        );
        let p2 = later.prepare(&e2).unwrap();
        assert_eq!(p2.payload["stage"], Value::String("new".into()));
        assert!(!p2.payload.contains_key("zstage"));
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
    fn protobuf_documents_decode() {
        let p = crate::model::envelope::proto::TenantSettings {
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
