//! The tenant settings a scenario runs with (`settings_bytes`,
//! `settings_updates_per_s`): the documents, their updates while orderly
//! runs, and the report's check that they took effect.

use super::*;

/// The tenant settings a scenario runs with (`settings_bytes`).
#[derive(Clone, Debug)]
pub(super) struct TenantDocs {
    tenants: u64,
    bytes: usize,
    updates_per_s: f64,
}

impl TenantDocs {
    pub(super) fn of(s: &Scenario) -> Option<TenantDocs> {
        (s.settings_bytes > 0).then(|| TenantDocs {
            tenants: s.tenants.max(1),
            bytes: s.settings_bytes,
            updates_per_s: s.settings_updates_per_s,
        })
    }

    /// The tenants, each with a document.
    pub(super) fn tenant_count(&self) -> u64 {
        self.tenants
    }

    /// Every tenant's first version.
    pub(super) fn initial(&self) -> Vec<crate::settings::SettingsDocument> {
        (0..self.tenants)
            .map(|t| workload::tenant_settings(t, 1, self.bytes))
            .collect()
    }

    /// On a thread of its own: publishes a new version every
    /// `1 / updates_per_s` seconds, round robin over the tenants, until the
    /// returned [`Updates`] is finished or dropped.
    pub(super) fn spawn_updates(
        &self,
        mut publish: impl FnMut(crate::settings::SettingsDocument) -> anyhow::Result<()>
            + Send
            + 'static,
    ) -> Updates {
        let docs = self.clone();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            if docs.updates_per_s <= 0.0 {
                return Ok(0);
            }
            let started = Instant::now();
            let mut n = 0u64;
            while !stopped.load(Relaxed) {
                let due = started + Duration::from_secs_f64((n + 1) as f64 / docs.updates_per_s);
                let now = Instant::now();
                if now < due {
                    std::thread::sleep((due - now).min(Duration::from_millis(20)));
                    continue;
                }
                let (tenant, version) = (n % docs.tenants, 2 + n / docs.tenants);
                publish(workload::tenant_settings(tenant, version, docs.bytes))?;
                n += 1;
            }
            Ok(n)
        });
        Updates {
            stop,
            thread: Some(thread),
        }
    }
}

/// The thread publishing settings updates. Dropping it stops the thread
/// (a run that fails does not leave it publishing).
pub(super) struct Updates {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<u64>>>,
}

impl Updates {
    /// Stops publishing; how many updates were published.
    pub(super) fn finish(mut self) -> anyhow::Result<u64> {
        self.stop.store(true, Relaxed);
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| anyhow::anyhow!("the settings updater panicked"))?
                .context("publishing settings updates"),
            None => Ok(0),
        }
    }
}

impl Drop for Updates {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
    }
}

/// What the settings registry of an end-to-end run took in.
pub(super) struct TenantSettingsSeen {
    /// Tenants with settings in force at the end.
    pub(super) tenants: usize,
    /// Documents compiled: one per tenant and version.
    pub(super) compiled: u64,
    /// Updates published while orderly ran.
    pub(super) updates: u64,
}

/// The tenant settings of a run, for the report (null without any), and
/// whether they took effect: every record in `store` is checked against its
/// tenant's field mappings. A record holding a name its tenant renames was
/// handled without its settings; none should, since the settings topic is
/// read before processing starts and no version changes the mappings.
pub(super) fn settings_report(
    s: &Scenario,
    seen: &TenantSettingsSeen,
    store: &SledStore,
) -> anyhow::Result<serde_json::Value> {
    let Some(docs) = TenantDocs::of(s) else {
        return Ok(serde_json::Value::Null);
    };
    let initial = docs.initial();
    let document_bytes = initial
        .iter()
        .map(|d| d.to_json_bytes().len())
        .sum::<usize>()
        / initial.len().max(1);
    // Each tenant's mappings, from its documents (no version changes them).
    let mappings: HashMap<&str, &std::collections::BTreeMap<String, String>> = initial
        .iter()
        .map(|d| (d.tenant_id.as_str(), &d.field_mappings))
        .collect();
    let (mut checked, mut renamed, mut not_renamed) = (0u64, 0u64, 0u64);
    for record in store.entities() {
        let r = record?;
        let Some(pairs) = mappings.get(r.tenant_id.as_str()) else {
            continue;
        };
        let holds = |name: &String| r.state.fields.contains_key(name);
        checked += 1;
        renamed += u64::from(pairs.values().any(holds));
        not_renamed += u64::from(pairs.keys().any(holds));
    }
    println!(
        "settings: {} tenants, {document_bytes} B each, {} updates published, {} versions \
         compiled; {renamed} of {checked} records hold renamed fields, {not_renamed} a name \
         their tenant renames",
        docs.tenants, seen.updates, seen.compiled
    );
    Ok(serde_json::json!({
        "tenants": docs.tenants,
        "document_bytes": document_bytes,
        "updates_per_s": docs.updates_per_s,
        "updates_published": seen.updates,
        "tenants_in_force": seen.tenants,
        "versions_compiled": seen.compiled,
        "records_checked": checked,
        "records_renamed": renamed,
        "records_not_renamed": not_renamed,
    }))
}
