//! What the tenant settings sources observe: documents applied, rejected,
//! and HTTP revalidations.

use super::DeadLettered;
use super::{emit, InternalEvent};
use crate::metrics::Stats;

/// A tenant's settings document was compiled and swapped in.
pub fn settings_applied(tenant: &str, version: u64, tenants: usize) {
    ::metrics::counter!("orderly_settings_compiled_total").increment(1);
    ::metrics::gauge!("orderly_settings_tenants").set(tenants as f64);
    tracing::debug!(tenant, version, "tenant settings in force");
}

/// A tenant's settings document was rejected; the last good one stays.
pub struct SettingsRejected<'a> {
    /// The rejection code (`settings_invalid`, ...).
    pub code: &'static str,
    /// The reason, for the log.
    pub reason: &'a dyn std::fmt::Display,
    /// Where it came from: `topic/partition@offset` or the URL.
    pub origin: &'a str,
}

impl InternalEvent for SettingsRejected<'_> {
    fn emit(self, stats: &Stats) {
        ::metrics::counter!("orderly_settings_rejected_total", "code" => self.code).increment(1);
        tracing::warn!(code = self.code, origin = self.origin, reason = %self.reason, "tenant settings rejected; the last good settings stay in force");
        emit(
            DeadLettered {
                stage: "settings",
                code: self.code,
            },
            stats,
        );
    }
}

/// The HTTP settings source revalidated its copy.
pub struct SettingsRefreshed {
    /// `changed`, `unchanged`, `not_modified` or `error`.
    pub result: &'static str,
}

impl InternalEvent for SettingsRefreshed {
    fn emit(self, _stats: &Stats) {
        ::metrics::counter!("orderly_settings_refreshes_total", "result" => self.result)
            .increment(1);
    }
}
