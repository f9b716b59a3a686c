//! The settings registry: every tenant's compiled settings, swapped in
//! atomically the moment a source delivers a new version.
//!
//! Owns the map from tenant to [`TenantView`] and the caught-up flag that
//! holds processing back until a source has read what it had at start. It
//! does not read documents itself: the topic and HTTP sources feed it.

use crate::model::ordering::Policies;
use crate::model::tenant::{SettingsDocument, SettingsError, TenantSettings, TenantView};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};

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
    /// Looked up once per event: foldhash, not SipHash.
    tenants: RwLock<foldhash::HashMap<String, Arc<TenantView>>>,
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
            tenants: RwLock::new(foldhash::HashMap::default()),
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
            if doc.version <= c.version() {
                return Err(SettingsError::Stale {
                    tenant: doc.tenant_id.clone(),
                    version: doc.version,
                    in_force: c.version(),
                });
            }
        }
        let compiled = doc.compile(&self.base)?;
        self.compiled.fetch_add(1, Relaxed);
        let version = compiled.version();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tenant::test_document as doc;

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
}
