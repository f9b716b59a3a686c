//! A library user's own logic: a custom `Handler` and an `Observer`.
//!
//! The handler keeps a lead's score as the maximum ever reported; the observer
//! derives a per-tenant event (`tenant.conversion`) from every conversion and
//! publishes it, keyed by tenant, to the derived-events topic, which the same
//! pipeline consumes and folds into a per-tenant total.
//!
//! Run it with `cargo run --example custom_handler`; it uses the embedded broker.

use orderly::config::Config;
use orderly::model::envelope::Event;
use orderly::model::handler::{
    DerivedEvent, EntityState, FieldReducer, Handler, HandlerError, Observer, ReduceOp,
};
use orderly::model::value::Value;
use orderly::pipeline::Pipeline;
use orderly::settings::TenantSettings;
use orderly::store::Store;
use orderly::tools::broker::EmbeddedBroker;
use orderly::tools::workload::{self, Format, ProduceOptions};
use std::sync::Arc;
use std::time::Duration;

/// `lead.scored`: keep the highest score seen.
struct MaxScore;

impl Handler for MaxScore {
    fn apply(
        &self,
        state: &mut EntityState,
        event: &Event,
        _settings: &TenantSettings,
    ) -> Result<(), HandlerError> {
        let Some(new) = event.payload.get("score").and_then(Value::as_f64) else {
            return Err(HandlerError::Permanent(
                "lead.scored needs a numeric `score`".into(),
            ));
        };
        let old = state
            .fields
            .get("max_score")
            .and_then(Value::as_f64)
            .unwrap_or(f64::MIN);
        if new > old {
            state.fields.insert("max_score".into(), Value::Float(new));
        }
        Ok(())
    }
}

/// Emits one `tenant.conversion` per recorded conversion, keyed by the tenant.
struct TenantTotals;

impl Observer for TenantTotals {
    fn name(&self) -> &str {
        "tenant-totals"
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
        let mut derived = event.clone();
        derived.entity_id = format!("totals-{}", event.tenant_id);
        derived.event_type = "tenant.conversion".into();
        derived.payload.retain(|k, _| k == "amount");
        vec![DerivedEvent { event: derived }]
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let broker = EmbeddedBroker::start(1)?;
    let dir = tempfile::tempdir()?;
    let mut config = Config {
        brokers: broker.bootstrap_servers(),
        topic: "example.events".into(),
        derived_topic: Some("example.derived".into()),
        group: "example".into(),
        data_dir: dir.path().to_owned(),
        types: Config::crm_types(),
        ..Config::default()
    };
    config.types.insert(
        "tenant.conversion".into(),
        orderly::config::TypeConfig {
            reducer: ReduceOp::Inc,
            // A sum commutes: late conversions are added on top, no re-fold.
            late_policy: Some(orderly::model::ordering::LatePolicy::Apply),
            too_late_policy: Some(orderly::model::ordering::TooLatePolicy::Apply),
            history: false,
            on_failure: orderly::config::FailurePolicy::Skip,
        },
    );
    for t in [
        &config.topic,
        config.derived_topic.as_ref().expect("set above"),
        &config.dead_letter_topic,
    ] {
        broker.create_topic(t, 2)?;
    }
    let handlers = config
        .handlers()
        .with_handler("lead.scored", Arc::new(MaxScore))
        .with_handler("tenant.conversion", Arc::new(FieldReducer(ReduceOp::Inc)))
        .with_observer(Arc::new(TenantTotals));

    let events: Vec<Event> = (0..6)
        .map(|i| {
            let json = serde_json::json!({
                "entity_id": "lead-1", "tenant_id": "acme", "event_id": format!("e{i}"),
                "type": if i % 2 == 0 { "lead.scored" } else { "conversion.recorded" },
                "occurred_at": 1_700_000_000_000i64 + i,
                "payload": if i % 2 == 0 { serde_json::json!({"score": 10 * (i % 3)}) } else { serde_json::json!({"amount": 100}) },
            });
            orderly::model::envelope::decode(None, Some(json.to_string().as_bytes()), None, Default::default())
                .expect("valid example event")
        })
        .collect();
    let opts = ProduceOptions {
        brokers: config.brokers.clone(),
        kafka: config.kafka.clone(),
        topic: config.topic.clone(),
        rate: None,
        format: Format::Json,
    };
    workload::produce(
        &opts,
        events.iter().map(|e| workload::message_of(e, Format::Json)),
        |_| {},
    )?;

    let store = actix::System::new().block_on(async move {
        let pipeline = Pipeline::start(config, handlers)?;
        let stats = pipeline.stats();
        // 6 input events plus 3 derived ones.
        while stats
            .writer
            .durable
            .load(std::sync::atomic::Ordering::Relaxed)
            < 9
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let store = pipeline.store();
        pipeline.shutdown()?;
        Ok::<_, Box<dyn std::error::Error>>(store)
    })?;
    for id in ["lead-1", "totals-acme"] {
        let record = store.load_entity(id)?.ok_or("entity missing")?;
        println!(
            "{id}: {}",
            orderly::model::value::fields_to_json(&record.state.fields)
        );
    }
    Ok(())
}
