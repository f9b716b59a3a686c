//! Built-in observers, selected by name in the config's `observers` list.
//!
//! `tenant_conversions` derives the per-tenant conversion total: every newly
//! applied `conversion.recorded` event on a lead becomes a
//! `tenant.conversion` event for the entity `tenant_conversions:<tenant>`,
//! published to the derived-events topic and folded by the same processor
//! (with the `inc` reducer and the `apply` policies, since a sum commutes).

use crate::model::envelope::Event;
use crate::model::handler::{DerivedEvent, EntityState, Observer};
use crate::model::value::Fields;
use std::sync::Arc;

/// The names of the built-in observers.
pub const BUILT_IN: &[&str] = &["tenant_conversions"];

/// The built-in observer called `name`.
pub fn built_in(name: &str) -> Option<Arc<dyn Observer>> {
    match name {
        "tenant_conversions" => Some(Arc::new(TenantConversions)),
        _ => None,
    }
}

/// The entity id of a tenant's conversion total.
pub fn tenant_conversions_id(tenant: &str) -> String {
    format!("tenant_conversions:{tenant}")
}

/// The event type of a derived conversion.
pub const TENANT_CONVERSION: &str = "tenant.conversion";

/// Derives per-tenant conversion totals from `conversion.recorded` events.
pub struct TenantConversions;

impl Observer for TenantConversions {
    fn name(&self) -> &str {
        "tenant_conversions"
    }

    fn observe(
        &self,
        event: &Event,
        _before: &EntityState,
        _after: &EntityState,
    ) -> Vec<DerivedEvent> {
        if event.event_type != "conversion.recorded" {
            return Vec::new();
        }
        let payload: Fields = event
            .payload
            .iter()
            .filter(|(k, v)| {
                (k.as_str() == "amount" || k.as_str() == "conversions") && v.as_f64().is_some()
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        vec![DerivedEvent {
            event: Event {
                entity_id: tenant_conversions_id(&event.tenant_id),
                tenant_id: event.tenant_id.clone(),
                event_id: String::new(), // set by the pipeline: source id + observer name
                event_type: TENANT_CONVERSION.into(),
                occurred_at: event.occurred_at,
                version: None,
                payload,
            },
        }]
    }
}
