//! Kafka client configuration: every client orderly makes is built here,
//! by its [`Role`].
//!
//! Each client gets, in this order: orderly's defaults for the role (which
//! the user may change), the user's `[kafka]` properties, the role's
//! `[kafka.consumer]` or `[kafka.producer]` table, and last the properties
//! orderly owns (`bootstrap.servers`, offsets, the group, the partitioner;
//! see [`crate::config::kafka::OWNED`]), which a configuration that sets
//! them is refused for at start.
//!
//! - [`Role::Consumer`]: the source, a member of the consumer group. Offsets
//!   are never auto-committed or auto-stored: the checkpoint owns them.
//! - [`Role::Reader`]: a consumer that assigns partitions itself and never
//!   joins the group or commits (the changelog restorer and follower, the
//!   settings reader).
//! - [`Role::Producer`]: the outbox and changelog producers, and the CLI's.
//! - [`Role::Admin`]: metadata lookups (the changelog topic check,
//!   `orderly partitions`, `orderly doctor`).

use crate::config::{Config, KafkaConfig};
use rdkafka::producer::FutureProducer;
use rdkafka::ClientConfig;

/// librdkafka's `fetch.wait.max.ms` for orderly's consumers: how long a fetch
/// may wait for data. Kafka answers as soon as data arrives, but some
/// Kafka-protocol brokers (the mock cluster, tansu) hold every fetch this
/// long: at librdkafka's 500 ms default that was the p50 latency of a lightly
/// loaded orderly. 10 ms costs at most 100 idle fetches per second per broker.
pub const FETCH_WAIT_MAX_MS: &str = "10";

/// What a Kafka client is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role<'a> {
    /// The source: a member of the group.
    Consumer,
    /// A consumer that assigns partitions itself; its group id is
    /// `<group>.<purpose>`, used for nothing but librdkafka's bookkeeping.
    Reader(&'a str),
    /// A producer.
    Producer,
    /// Metadata only.
    Admin,
}

impl Role<'_> {
    /// The role's name, as `orderly doctor` prints it.
    pub fn name(&self) -> String {
        match self {
            Role::Consumer => "consumer".into(),
            Role::Reader(p) => format!("reader ({p})"),
            Role::Producer => "producer".into(),
            Role::Admin => "admin".into(),
        }
    }
}

/// The client config of `role` for `config`.
pub fn client(config: &Config, role: Role<'_>) -> ClientConfig {
    client_with(config, role, &[])
}

/// [`client`] with `defaults` of the caller's own, which the user's
/// properties override (the changelog producer's `linger.ms`).
pub fn client_with(config: &Config, role: Role<'_>, defaults: &[(&str, &str)]) -> ClientConfig {
    let mut cc = with_user(&config.brokers, &config.kafka, role, defaults);
    match role {
        Role::Consumer => {
            cc.set("group.id", &config.group)
                .set(
                    "partition.assignment.strategy",
                    config.assignor.librdkafka_name(),
                )
                // Consumer lag per partition comes from librdkafka's statistics.
                .set(
                    "statistics.interval.ms",
                    config.stats_interval_ms.to_string(),
                );
            if let Some(id) = &config.instance_id {
                cc.set("group.instance.id", id);
            }
        }
        Role::Reader(purpose) => {
            cc.set("group.id", format!("{}.{purpose}", config.group));
        }
        Role::Producer => {
            cc.set("partitioner", config.partitioner.librdkafka_name());
        }
        Role::Admin => {}
    }
    cc
}

/// The client config of `role` on `brokers` with the user's `kafka`
/// properties, and orderly's own but those that need the whole [`Config`]
/// (the group and the partitioner). The tools that have only a broker
/// address (the workload producer, the benchmark) build theirs with it.
/// `defaults` come after orderly's own defaults and before the user's.
pub fn with_user(
    brokers: &str,
    kafka: &KafkaConfig,
    role: Role<'_>,
    defaults: &[(&str, &str)],
) -> ClientConfig {
    let mut cc = ClientConfig::new();
    let consumer = matches!(role, Role::Consumer | Role::Reader(_));
    // orderly's defaults, then the caller's, which the user may change.
    if consumer {
        cc.set("fetch.wait.max.ms", FETCH_WAIT_MAX_MS);
    }
    if role == Role::Producer {
        cc.set("message.timeout.ms", "30000");
    }
    for (k, v) in defaults {
        cc.set(*k, *v);
    }
    // The user's, then the role's table.
    let role_table = match role {
        Role::Consumer | Role::Reader(_) => Some(&kafka.consumer),
        Role::Producer => Some(&kafka.producer),
        Role::Admin => None,
    };
    for (k, v) in kafka.common.iter().chain(role_table.into_iter().flatten()) {
        // A reader never joins the group: group membership settings would
        // only draw librdkafka's warnings.
        if matches!(role, Role::Reader(_)) && k.starts_with("group.") {
            continue;
        }
        cc.set(k, v);
    }
    // orderly's own.
    cc.set("bootstrap.servers", brokers);
    if consumer {
        cc.set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("isolation.level", "read_committed")
            // A partition without a checkpoint, or an offset the log no
            // longer has (retention, compaction), reads from the start of
            // what it has: never skip to the end.
            .set("auto.offset.reset", "earliest");
    }
    if role == Role::Producer {
        cc.set("enable.idempotence", "true");
    }
    cc
}

/// The source's client config.
pub fn group_consumer(config: &Config) -> ClientConfig {
    client(config, Role::Consumer)
}

/// A reader's client config (see [`Role::Reader`]).
pub fn reader(config: &Config, purpose: &str) -> ClientConfig {
    client(config, Role::Reader(purpose))
}

/// Creates a producer for `config`, with these defaults of its own (which
/// the user's `[kafka]` and `[kafka.producer]` override).
pub fn producer(
    config: &Config,
    defaults: &[(&str, &str)],
) -> rdkafka::error::KafkaResult<FutureProducer> {
    client_with(config, Role::Producer, defaults).create()
}

/// A metadata-only client for `config`.
pub fn admin(config: &Config) -> rdkafka::error::KafkaResult<rdkafka::consumer::BaseConsumer> {
    client(config, Role::Admin).create()
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
