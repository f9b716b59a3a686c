//! orderly: a stateful stream processor.
//!
//! Events from a Kafka topic keyed by entity id are routed to one actor per
//! entity, folded into state kept in sled, and checkpointed together with the
//! Kafka offsets, so a crash loses nothing and applies nothing twice. Late
//! events are re-folded; undecodable or failing events are dead-lettered; each
//! event gets an OpenTelemetry span. See ARCHITECTURE.md for the semantics.
//!
//! Data flows down this list of modules; nothing low imports the CLI.
#![deny(missing_docs)]

pub mod admin;
pub mod anomaly;
pub mod audit;
pub mod bench;
pub mod broker;
pub mod change;
pub mod checkpoint;
pub mod config;
pub mod dead_letter;
pub mod demo;
pub mod entity;
pub mod envelope;
pub mod failpoint;
pub mod fold;
pub mod handler;
pub mod handover;
pub mod history;
pub mod internal_events;
pub mod metrics;
pub mod observers;
pub mod ordering;
pub mod partitioner;
pub mod pipeline;
pub mod router;
pub mod settings;
pub mod sink;
pub mod source;
pub mod stall;
pub mod store;
pub mod telemetry;
pub mod value;
pub mod workload;
pub mod writer;
