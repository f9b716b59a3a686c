//! The `[kafka]` section: librdkafka properties for every Kafka client
//! orderly makes.
//!
//! ```toml
//! [kafka]                      # every client: consumers, producers, admin
//! "security.protocol" = "SASL_SSL"
//! [kafka.consumer]             # the source and orderly's readers
//! "session.timeout.ms" = 45000
//! [kafka.producer]             # the outbox, changelog and CLI producers
//! "linger.ms" = 5
//! ```
//!
//! A per-role table overrides `[kafka]`, as Kafka Streams' `consumer.` and
//! `producer.` prefixes do. Values may be strings, numbers or booleans; they
//! reach librdkafka as strings. The properties orderly sets itself because
//! its guarantees depend on them ([`OWNED`]) are refused with the reason.

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// The librdkafka properties orderly sets itself, and why a user may not.
pub const OWNED: &[(&str, &str)] = &[
    ("bootstrap.servers", "set `brokers` instead"),
    (
        "group.id",
        "set `group` instead: the source joins it, and orderly's readers are named after it",
    ),
    ("group.instance.id", "set `instance_id` instead"),
    (
        "enable.auto.commit",
        "orderly commits an offset only once it is durable in the store, together with the state",
    ),
    (
        "enable.auto.offset.store",
        "orderly stores an offset only once it is durable in the store",
    ),
    (
        "auto.offset.reset",
        "a partition without a checkpoint is read from its start (earliest), so no event is skipped",
    ),
    (
        "partition.assignment.strategy",
        "set `assignor` instead: orderly's rebalance handling follows the protocol it implies",
    ),
    (
        "isolation.level",
        "orderly reads only committed records (read_committed), so an aborted transaction's events are never applied",
    ),
    (
        "enable.partition.eof",
        "orderly's consumers rely on it being off",
    ),
    (
        "statistics.interval.ms",
        "set `stats_interval_ms` instead: consumer lag is read from the statistics",
    ),
    (
        "enable.idempotence",
        "the outbox and changelog producers rely on idempotent, ordered delivery",
    ),
    (
        "transactional.id",
        "orderly's producers are not transactional: the checkpoint in the store makes state exactly-once",
    ),
    (
        "partitioner",
        "set `partitioner` instead: the outbox must place keys as orderly routes them",
    ),
];

/// The source's partition assignor (`assignor`): orderly sets
/// `partition.assignment.strategy` from it. The source handles both
/// rebalance protocols: incremental for `cooperative-sticky`, eager for the others.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Assignor {
    /// Incremental rebalances: only the partitions that move stop.
    #[default]
    CooperativeSticky,
    /// Kafka's range assignor (eager).
    Range,
    /// Kafka's round-robin assignor (eager).
    Roundrobin,
}

impl Assignor {
    /// librdkafka's name for it.
    pub fn librdkafka_name(self) -> &'static str {
        match self {
            Assignor::CooperativeSticky => "cooperative-sticky",
            Assignor::Range => "range",
            Assignor::Roundrobin => "roundrobin",
        }
    }
}

/// Whether a property's value is a secret, to be masked when printed.
pub fn is_secret(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    n.contains("password") || n.contains("secret") || n.contains("token") || n == "ssl.key.pem"
}

/// `value`, or a mask when `name` is a secret.
pub fn shown<'a>(name: &str, value: &'a str) -> &'a str {
    if is_secret(name) {
        "********"
    } else {
        value
    }
}

/// The `[kafka]` section.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KafkaConfig {
    /// `[kafka]`: properties of every client.
    pub common: BTreeMap<String, String>,
    /// `[kafka.consumer]`: the source and orderly's readers (changelog
    /// restorer and follower, settings reader), over `common`.
    pub consumer: BTreeMap<String, String>,
    /// `[kafka.producer]`: every producer, over `common`.
    pub producer: BTreeMap<String, String>,
}

impl KafkaConfig {
    /// Only `[kafka.consumer]`, with these properties.
    pub fn for_consumers(props: &[(&str, &str)]) -> KafkaConfig {
        KafkaConfig {
            consumer: props
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..Default::default()
        }
    }

    /// The producers' `message.max.bytes`: `[kafka.producer]`, else
    /// `[kafka]`, else librdkafka's default of 1,000,000.
    pub fn producer_message_max_bytes(&self) -> usize {
        [&self.producer, &self.common]
            .iter()
            .find_map(|t| t.get("message.max.bytes"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(1_000_000)
    }

    /// Every table with its name (`kafka`, `kafka.consumer`, `kafka.producer`).
    pub fn tables(&self) -> [(&'static str, &BTreeMap<String, String>); 3] {
        [
            ("kafka", &self.common),
            ("kafka.consumer", &self.consumer),
            ("kafka.producer", &self.producer),
        ]
    }

    /// Refuses the properties orderly owns, naming the property, its table
    /// and the reason.
    pub fn check(&self) -> Result<(), String> {
        for (table, props) in self.tables() {
            for name in props.keys() {
                let key = name.trim().to_ascii_lowercase();
                if let Some((_, why)) = OWNED.iter().find(|(owned, _)| *owned == key) {
                    return Err(format!(
                        "`{name}` in [{table}] is set by orderly and cannot be configured: {why}"
                    ));
                }
            }
        }
        Ok(())
    }
}

impl Serialize for KafkaConfig {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let tables = [("consumer", &self.consumer), ("producer", &self.producer)];
        let n = self.common.len() + tables.iter().filter(|(_, t)| !t.is_empty()).count();
        let mut map = s.serialize_map(Some(n))?;
        // Scalars first: TOML puts a table's own keys before its sub-tables.
        for (k, v) in &self.common {
            map.serialize_entry(k, v)?;
        }
        for (name, t) in tables.into_iter().filter(|(_, t)| !t.is_empty()) {
            map.serialize_entry(name, t)?;
        }
        map.end()
    }
}

/// A property value: a string, number or boolean, kept as librdkafka's string.
struct Scalar(String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(EntryVisitor)
            .and_then(|e| match e {
                Entry::Scalar(s) => Ok(Scalar(s)),
                Entry::Table(_) => Err(de::Error::custom(
                    "a librdkafka property must be a string, number or boolean",
                )),
            })
    }
}

enum Entry {
    Scalar(String),
    Table(BTreeMap<String, String>),
}

struct EntryVisitor;

impl<'de> Visitor<'de> for EntryVisitor {
    type Value = Entry;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string, number or boolean, or a table of them")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Entry, E> {
        Ok(Entry::Scalar(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Entry, E> {
        Ok(Entry::Scalar(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Entry, E> {
        Ok(Entry::Scalar(v.to_string()))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Entry, E> {
        Ok(Entry::Scalar(v.to_string()))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Entry, E> {
        Ok(Entry::Scalar(v.to_string()))
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Entry, E> {
        Ok(Entry::Scalar(v.to_string()))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Entry, A::Error> {
        let mut t = BTreeMap::new();
        while let Some((k, Scalar(v))) = m.next_entry::<String, Scalar>()? {
            t.insert(k, v);
        }
        Ok(Entry::Table(t))
    }
}

impl<'de> Deserialize<'de> for Entry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(EntryVisitor)
    }
}

impl<'de> Deserialize<'de> for KafkaConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut out = KafkaConfig::default();
        for (k, e) in BTreeMap::<String, Entry>::deserialize(d)? {
            match (k.as_str(), e) {
                ("consumer", Entry::Table(t)) => out.consumer = t,
                ("producer", Entry::Table(t)) => out.producer = t,
                (_, Entry::Scalar(v)) => {
                    out.common.insert(k, v);
                }
                (_, Entry::Table(_)) => {
                    return Err(de::Error::custom(format!(
                        "[kafka.{k}] is not a table orderly knows: use [kafka.consumer] or [kafka.producer]"
                    )))
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_parse_with_any_scalar_and_round_trip() {
        let k: KafkaConfig = toml::from_str(
            "\"linger.ms\" = 5\n\"security.protocol\" = \"SSL\"\n\"x.y\" = true\n\
             [consumer]\n\"session.timeout.ms\" = 45000\n[producer]\n\"acks\" = \"all\"\n",
        )
        .unwrap();
        assert_eq!(k.common["linger.ms"], "5");
        assert_eq!(k.common["x.y"], "true");
        assert_eq!(k.consumer["session.timeout.ms"], "45000");
        assert_eq!(k.producer["acks"], "all");
        let text = toml::to_string(&k).unwrap();
        assert_eq!(toml::from_str::<KafkaConfig>(&text).unwrap(), k);
        let err = toml::from_str::<KafkaConfig>("[admin]\n\"a\" = \"b\"\n").unwrap_err();
        assert!(err.to_string().contains("[kafka.admin]"), "{err}");
    }

    #[test]
    fn every_owned_property_is_refused_in_every_table_with_its_name() {
        for (name, why) in OWNED {
            for table in 0..3 {
                let mut k = KafkaConfig::default();
                let t = [&mut k.common, &mut k.consumer, &mut k.producer];
                t.into_iter()
                    .nth(table)
                    .unwrap()
                    .insert(name.to_string(), "x".into());
                let err = k.check().unwrap_err();
                assert!(err.contains(name) && err.contains(why), "{err}");
            }
        }
        assert!(KafkaConfig::for_consumers(&[("fetch.min.bytes", "1")])
            .check()
            .is_ok());
    }

    #[test]
    fn secrets_are_masked() {
        assert_eq!(shown("sasl.password", "hunter2"), "********");
        assert_eq!(shown("ssl.key.password", "x"), "********");
        assert_eq!(shown("sasl.oauthbearer.client.secret", "x"), "********");
        assert_eq!(shown("sasl.username", "me"), "me");
    }
}
