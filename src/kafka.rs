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

/// The source's client config, for topics of `partitions` partitions in all,
/// and whether the source reads each partition from a queue of its own.
///
/// librdkafka applies its prefetch limits, `queued.min.messages` and
/// `queued.max.messages.kbytes`, to the queue a partition's messages go to.
/// For the user they keep their documented meaning, a total. With a queue
/// per partition ([`crate::source`]) each limit is divided by `partitions`,
/// so that an instance holding every partition prefetches about the total.
/// librdkafka looks at a limit before it fetches, so each queue can pass
/// its share by one fetch (up to `max.partition.fetch.bytes`, 1 MiB by
/// default), as a shared queue passes its limit by one fetch response; and
/// a partition always fetches at least one record batch, up to
/// [`MAX_BATCH_BYTES`], whatever its share. So the queues are split only
/// when each partition's share of the bytes holds such a batch; otherwise
/// every partition shares one queue, as librdkafka does by default, whose
/// limits then hold in total but which, under a backlog, can leave some
/// partitions unfetched for minutes (README, "Every partition drains
/// alike"). The count is taken when the source starts: partitions added
/// later each prefetch a share of the old count's.
pub fn group_consumer(config: &Config, partitions: usize) -> SourceClient {
    let mut cc = client(config, Role::Consumer);
    let n = partitions.max(1) as u64;
    let total = |k: &str, default: u64| {
        cc.get(k)
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(default)
    };
    // librdkafka's defaults, the totals when the user sets none.
    let messages = total("queued.min.messages", 100_000);
    let kbytes = total("queued.max.messages.kbytes", 65_536);
    let queue_per_partition = kbytes * 1024 / n >= MAX_BATCH_BYTES;
    if queue_per_partition {
        cc.set("queued.min.messages", (messages / n).max(1).to_string())
            .set("queued.max.messages.kbytes", (kbytes / n).to_string());
    }
    SourceClient {
        config: cc,
        queue_per_partition,
    }
}

/// The largest record batch a Kafka broker takes by default
/// (`message.max.bytes`, about 1 MiB): the least a partition may prefetch.
pub const MAX_BATCH_BYTES: u64 = 1024 * 1024;

/// What [`group_consumer`] decides.
pub struct SourceClient {
    /// The client config.
    pub config: ClientConfig,
    /// Whether each partition has a queue of its own, with its share of
    /// the prefetch limits.
    pub queue_per_partition: bool,
}

impl SourceClient {
    /// How the source prefetches `partitions` partitions, in a sentence
    /// (`orderly doctor` prints it, the source logs it at start).
    pub fn describe(&self, partitions: usize) -> String {
        if self.queue_per_partition {
            let get = |k| self.config.get(k).unwrap_or("?");
            format!(
                "a prefetch queue for each of {partitions} partitions, each up to {} messages (queued.min.messages) and {} KiB (queued.max.messages.kbytes)",
                get("queued.min.messages"),
                get("queued.max.messages.kbytes")
            )
        } else {
            let batch_kib = MAX_BATCH_BYTES / 1024;
            format!("one prefetch queue shared by all {partitions} partitions, since a share of queued.max.messages.kbytes would not hold a {batch_kib} KiB record batch; under a backlog some partitions may go unfetched for minutes (raise queued.max.messages.kbytes to {batch_kib} per partition for a queue each)")
        }
    }
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

/// How many partitions `topic` has, as the brokers' metadata says; 0 when
/// it does not exist there or carries an error.
pub fn partition_count<C, K>(
    client: &K,
    topic: &str,
    timeout: std::time::Duration,
) -> rdkafka::error::KafkaResult<usize>
where
    C: rdkafka::consumer::ConsumerContext + 'static,
    K: rdkafka::consumer::Consumer<C>,
{
    let md = client.fetch_metadata(Some(topic), timeout)?;
    Ok(md
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map_or(0, |t| t.partitions().len()))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn prefetch(props: &[(&str, &str)], partitions: usize) -> (bool, [Option<String>; 2]) {
        let config = Config {
            kafka: crate::config::KafkaConfig::for_consumers(props),
            ..Default::default()
        };
        let c = group_consumer(&config, partitions);
        let get = |k| c.config.get(k).map(str::to_owned);
        (
            c.queue_per_partition,
            [get("queued.min.messages"), get("queued.max.messages.kbytes")],
        )
    }

    #[test]
    fn the_prefetch_totals_are_shared_among_the_partitions() {
        let some = |m: &str, k: &str| [Some(m.to_owned()), Some(k.to_owned())];
        // librdkafka's defaults over eight partitions.
        assert_eq!(prefetch(&[], 8), (true, some("12500", "8192")));
        // Up to 64 partitions each share holds a 1 MiB batch.
        assert_eq!(prefetch(&[], 64), (true, some("1562", "1024")));
        assert_eq!(prefetch(&[], 65), (false, [None, None]));
        // The user's totals; left as they are when the queue is shared.
        let user = [("queued.min.messages", "1000"), ("queued.max.messages.kbytes", "16384")];
        assert_eq!(prefetch(&user, 4), (true, some("250", "4096")));
        assert_eq!(
            prefetch(&user, 1_250),
            (false, some("1000", "16384"))
        );
        // Nothing goes below one message.
        let few = [("queued.min.messages", "3"), ("queued.max.messages.kbytes", "1048576")];
        assert_eq!(prefetch(&few, 8), (true, some("1", "131072")));
        // No partitions count as one: the totals as they are.
        assert_eq!(prefetch(&[], 0), (true, some("100000", "65536")));
    }
}
