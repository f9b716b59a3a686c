//! orderly: a stateful stream processor.
//!
//! Events from a Kafka topic keyed by entity id are routed to one actor per
//! entity, folded into state kept in sled, and checkpointed together with the
//! Kafka offsets, so a crash loses nothing and applies nothing twice. Late
//! events are re-folded; undecodable or failing events are dead-lettered; each
//! event gets an OpenTelemetry span. ARCHITECTURE.md, beside Cargo.toml, draws
//! the design from this code.
//!
//! # The flow of one event
//!
//! 1. **source** (`source`): an rdkafka consumer in a consumer group, on its
//!    own thread. It decodes the message into an [`Event`]
//!    ([`model::envelope`]); an undecodable one goes straight to the writer
//!    as a dead letter, and its offset still advances.
//! 2. **router** (`router`): entity id → shard (an actix Arbiter) →
//!    `EntityActor`, started on demand and passivated when idle.
//! 3. **entity** (`entity`): one actor per entity id, one event at a time.
//!    It loads the record (memory, else the store), then calls the fold.
//! 4. **fold** ([`model::fold`]): pure. It classifies the event against the
//!    record's high-water mark (in order, duplicate, late, too late), runs the
//!    [`Handler`] and the [`Observer`]s, and re-folds late events. The actor
//!    hands the resulting record to the writer as a write intent.
//! 5. **writer** (`writer`): many actors' intents and the partitions' offsets
//!    become one atomic store batch, written to the changelog first when it is
//!    on (`changelog`), then committed and flushed.
//! 6. **store** ([`store`]): [`SledStore`], one sled tree; the batch is atomic
//!    and durable before anything is acknowledged.
//! 7. **checkpoint** (`checkpoint`): one `Checkpointer` follows every offset
//!    from received to written, durable and committed. Per partition it
//!    keeps the offset below which every event is durable; the source
//!    commits only that to Kafka, after the flush.
//! 8. **sinks** (`sink`): the outbox publishes change records, dead letters,
//!    anomalies and derived events to their topics.
//!
//! Beside the flow: `telemetry` (a span per event), [`metrics`] and
//! `internal_events` (what happened, counted once), [`settings`] (tenant
//! settings, compiled and swapped in), [`admin`] (the dashboard and the
//! operator API), `audit` (replay and compare), and `lifecycle` (the fatal
//! signal).
//!
//! # Layers
//!
//! Imports point downward only, and `tests/architecture.rs` checks it:
//! [`model`] at the bottom imports nothing from the rest of the crate and no
//! rdkafka, actix, sled or tokio; without the `runtime` feature the crate is
//! `model` alone. The tools (benchmark, demo, workload generator, embedded
//! broker) and the CLI sit on top, behind the `tools` feature, and are not
//! part of this API.
#![deny(missing_docs)]

pub mod model;

/// Declares the modules of the processor, which exist with the `runtime`
/// feature only.
macro_rules! runtime {
    ($($item:item)*) => { $( #[cfg(feature = "runtime")] $item )* };
}

runtime! {
    pub mod admin;
    pub(crate) mod audit;
    pub(crate) mod changelog;
    pub(crate) mod checkpoint;
    pub mod config;
    pub(crate) mod entity;
    #[doc(hidden)]
    pub mod failpoint;
    pub(crate) mod internal_events;
    pub(crate) mod kafka;
    pub(crate) mod lifecycle;
    pub mod metrics;
    pub mod partitioner;
    pub mod pipeline;
    pub(crate) mod router;
    pub mod settings;
    pub(crate) mod sink;
    pub(crate) mod source;
    pub(crate) mod stall;
    pub mod store;
    pub mod telemetry;
    pub(crate) mod writer;
}

#[doc(hidden)]
#[cfg(feature = "tools")]
// The CLI's doc comments are its `--help` text, with `<placeholders>`.
#[allow(rustdoc::invalid_html_tags)]
pub mod cli;
#[doc(hidden)]
#[cfg(feature = "tools")]
pub mod tools;

pub use model::envelope::Event;
pub use model::handler::{EntityState, Handler, HandlerError, Handlers, Observer};
pub use model::tenant::TenantSettings;
pub use model::value::Value;

runtime! {
    pub use crate::config::Config;
    pub use crate::metrics::Stats;
    pub use crate::pipeline::{Pipeline, PipelineError};
    pub use crate::store::{SledStore, Store, StoreError};
}
