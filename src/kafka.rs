//! Kafka client configuration: every client orderly makes is built here.
//!
//! - [`group_consumer`]: the source, a member of the consumer group. Offsets
//!   are never auto-committed or auto-stored: the checkpoint owns them.
//! - [`reader`]: a consumer that assigns partitions itself and never joins
//!   the group or commits (the changelog restorer and follower, the settings
//!   reader).
//! - [`producer`]: the outbox producer, the changelog producer and the CLI's.
//!
//! The user's `[kafka]` properties apply to the consumers.

use crate::config::Config;
use rdkafka::producer::FutureProducer;
use rdkafka::ClientConfig;

/// librdkafka's `fetch.wait.max.ms` for orderly's consumers: how long a fetch
/// may wait for data. Kafka answers as soon as data arrives, but some
/// Kafka-protocol brokers (the mock cluster, tansu) hold every fetch this
/// long: at librdkafka's 500 ms default that was the p50 latency of a lightly
/// loaded orderly. 10 ms costs at most 100 idle fetches per second per broker.
pub const FETCH_WAIT_MAX_MS: &str = "10";

/// The client config of a consumer that assigns partitions itself and never
/// joins the group or commits (the changelog restorer, the settings reader):
/// the configured security and client properties apply, group ones do not.
pub fn reader(config: &Config, purpose: &str) -> ClientConfig {
    let mut cc = ClientConfig::new();
    for (k, v) in &config.kafka {
        if !k.starts_with("group.") && k != "partition.assignment.strategy" {
            cc.set(k, v);
        }
    }
    cc.set("bootstrap.servers", &config.brokers)
        .set("group.id", format!("{}.{purpose}", config.group))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        // An offset the log no longer has (retention, compaction) reads from
        // the start of what it has: never skip to the end.
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", FETCH_WAIT_MAX_MS);
    cc
}

/// The client config of the source: a member of the group, with the
/// rebalance protocol, offset handling and statistics orderly relies on.
pub fn group_consumer(config: &Config) -> ClientConfig {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &config.brokers)
        .set("group.id", &config.group)
        // Incremental rebalances: only the partitions that move stop.
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", FETCH_WAIT_MAX_MS)
        // Consumer lag per partition comes from librdkafka's statistics.
        .set(
            "statistics.interval.ms",
            config.stats_interval_ms.to_string(),
        );
    if let Some(id) = &config.instance_id {
        cc.set("group.instance.id", id);
    }
    for (k, v) in &config.kafka {
        cc.set(k, v);
    }
    cc
}

/// Creates the producer used for the outbox and by `orderly produce`.
pub fn producer(
    brokers: &str,
    extra: &[(&str, &str)],
) -> rdkafka::error::KafkaResult<FutureProducer> {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", brokers)
        .set("message.timeout.ms", "30000")
        .set("enable.idempotence", "true");
    for (k, v) in extra {
        cc.set(*k, *v);
    }
    cc.create()
}
