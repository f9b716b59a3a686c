//! The pure core: what an event is, how it orders, and how an entity's state
//! is folded from its events.
//!
//! Everything here is deterministic and does no I/O. It imports nothing from
//! the rest of the crate, and nothing of rdkafka, actix, sled or tokio: a
//! test in `tests/architecture.rs` checks the imports, and `cargo check --lib
//! --no-default-features` builds this module alone. The runtime around it
//! (source, router, entity actors, writer, store) moves events in and state
//! out; it decides nothing that the fold decides.
//!
//! - [`envelope`]: the wire formats and the validated [`Event`].
//! - [`value`]: orderly's own JSON value, which bincode can store.
//! - [`ordering`]: the order key, lateness, and the out-of-order policies.
//! - [`position`]: a topic and partition, and an event's place in it.
//! - [`handler`]: the [`Handler`] and [`Observer`] traits and the built-in
//!   field reducer.
//! - [`tenant`]: tenant settings documents and their compiled form.
//! - [`fold`]: the entity record (snapshot, log, provenance) and the fold.
//! - [`change`], [`anomaly`], [`dead_letter`], [`history`]: what the fold's
//!   outcomes become for the outside world.
//! - [`observers`]: the built-in observers.
//! - [`json`]: the change record's JSON, written by hand on the hot path.

pub mod anomaly;
pub mod change;
pub mod dead_letter;
pub mod envelope;
pub mod fold;
pub mod handler;
pub mod history;
pub mod json;
pub mod observers;
pub mod ordering;
pub mod position;
pub mod tenant;
pub mod value;

pub use envelope::Event;
pub use handler::{EntityState, Handler, HandlerError, Observer};
pub use tenant::TenantSettings;
pub use value::Value;
