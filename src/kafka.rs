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

/// A message's headers, keys and values, read so that nothing in them can
/// panic: a key that is not valid UTF-8 is decoded lossily (U+FFFD for each
/// bad sequence). rdkafka 0.39's `Headers::iter` and `try_get` call
/// `CStr::to_str().unwrap()` on the key, so one producer writing such a
/// key would stop the consumer thread; this reads librdkafka's headers
/// directly instead.
pub fn headers_of(m: &rdkafka::message::BorrowedMessage<'_>) -> Vec<(String, Vec<u8>)> {
    use rdkafka::bindings as rd;
    let mut out = Vec::new();
    // SAFETY: `m` borrows a live librdkafka message, so its pointer and its
    // headers (owned by the message) stay valid while `m` does. librdkafka
    // returns NUL-terminated names and (pointer, size) values that stay
    // valid for the same time; they are copied before `m` can go.
    unsafe {
        let mut hdrs: *mut rd::rd_kafka_headers_t = std::ptr::null_mut();
        if rd::rd_kafka_message_headers(m.ptr(), &mut hdrs)
            != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
            || hdrs.is_null()
        {
            return out;
        }
        for i in 0..rd::rd_kafka_header_cnt(hdrs) {
            let mut name: *const std::os::raw::c_char = std::ptr::null();
            let mut value: *const std::os::raw::c_void = std::ptr::null();
            let mut size = 0usize;
            if rd::rd_kafka_header_get_all(hdrs, i, &mut name, &mut value, &mut size)
                != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
                || name.is_null()
            {
                continue;
            }
            let key = std::ffi::CStr::from_ptr(name).to_string_lossy().into_owned();
            let value = if value.is_null() || size == 0 {
                Vec::new()
            } else {
                std::slice::from_raw_parts(value.cast::<u8>(), size).to_vec()
            };
            out.push((key, value));
        }
    }
    out
}
