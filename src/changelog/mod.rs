//! Scale-out: the changelog, restore on assignment, and key moves.
//!
//! With the changelog on ([`crate::config::Config::changelog`] is `Some`),
//! every entity record the store makes durable is also written to
//! `<input topic><suffix>` at the entity's home partition, so a partition's
//! state can move to another instance:
//! - [`Producer`] writes each batch's records once the sled batch is durable,
//!   before its offsets are acknowledged;
//! - [`Restorer`] reads a newly assigned partition's changelog into the store
//!   before the partition is consumed;
//! - [`Follower`] reads the changelog partitions this instance does not own,
//!   and hands the records of entities whose key moved here (partitions were
//!   added) to their actor, which merges them; see its module for the rules.
//!
//! Which partition an entity belongs to is the [`crate::partitioner`]'s
//! answer. With the changelog off, none of this runs: one instance per group.

mod follower;
mod producer;
mod restore;

pub use follower::Follower;
pub use producer::Producer;
pub(crate) use producer::Planned;
pub use restore::Restorer;

use crate::config::{ChangelogConfig, Config};
use std::time::Duration;

/// Checks that each input topic has its changelog, with at least as many
/// partitions: records go to the partition number of their input partition.
pub fn check_topics(config: &Config, changelog: &ChangelogConfig) -> Result<(), String> {
    use rdkafka::consumer::BaseConsumer;
    let consumer: BaseConsumer = crate::kafka::admin(config).map_err(|e| e.to_string())?;
    let partitions = |topic: &str| -> Result<usize, String> {
        crate::kafka::partition_count(&consumer, topic, Duration::from_secs(10))
            .map_err(|e| format!("metadata of {topic}: {e}"))
    };
    for input in config.input_topics() {
        let changelog = changelog.topic_of(&input);
        let (n, m) = (partitions(&input)?, partitions(&changelog)?);
        if m < n {
            return Err(format!(
                "{changelog} has {m} partitions, {input} has {n}: create it with at least {n} partitions and cleanup.policy=compact (or unset changelog_suffix)"
            ));
        }
    }
    Ok(())
}
