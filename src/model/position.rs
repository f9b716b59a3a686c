//! Where an event is in Kafka: one [`TopicPartition`] type for every part of
//! orderly that names a partition (the source, the checkpoints, the store's
//! partition index, an entity's home), and [`Origin`] for one record in it.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Arc;

/// A topic and one of its partitions: the unit Kafka orders, assigns and
/// checkpoints. Cheap to clone (the topic name is shared).
///
/// Stored as the topic name then the partition, as the `Home` of formats 1
/// to 4 was, so the stored layout is unchanged.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TopicPartition {
    /// The topic.
    pub topic: Arc<str>,
    /// The partition.
    pub partition: i32,
}

impl TopicPartition {
    /// `topic`'s partition `partition`.
    pub fn new(topic: impl Into<Arc<str>>, partition: i32) -> Self {
        TopicPartition {
            topic: topic.into(),
            partition,
        }
    }
}

/// `topic/partition`: the form used in logs, in `orderly state get`, and as
/// the key of an entity's applied offsets.
impl fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

impl TopicPartition {
    /// Reads back a key written by [`fmt::Display`]: the topic and the
    /// partition, or `None` if `key` is not of that form.
    pub fn parse_key(key: &str) -> Option<(&str, i32)> {
        let (topic, partition) = key.rsplit_once('/')?;
        Some((topic, partition.parse().ok()?))
    }
}

/// The input partition an entity's state lives under (in the store's
/// partition index and in that partition's changelog).
pub type Home = TopicPartition;

/// Where an event came from: its partition and offset.
///
/// Stored (in held events) as topic, partition, offset, as before.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// The partition it was read from.
    pub tp: TopicPartition,
    /// Its offset in that partition.
    pub offset: i64,
}

impl Origin {
    /// The event at `offset` of `tp`.
    pub fn new(tp: TopicPartition, offset: i64) -> Self {
        Origin { tp, offset }
    }

    /// The `topic/partition` key used in the record's applied offsets
    /// (what `Display` writes, built without the formatting machinery:
    /// once or twice per event).
    pub fn topic_partition(&self) -> String {
        let mut partition = itoa::Buffer::new();
        let partition = partition.format(self.tp.partition);
        let mut key = String::with_capacity(self.tp.topic.len() + 1 + partition.len());
        key.push_str(&self.tp.topic);
        key.push('/');
        key.push_str(partition);
        key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The applied-offsets key is what `Display` writes, and parses back.
    #[test]
    fn the_partition_key_is_the_displayed_one() {
        for (topic, partition) in [("in", 0), ("a/b", 17), ("", -1), ("é", i32::MAX)] {
            let origin = Origin::new(TopicPartition::new(topic, partition), 5);
            assert_eq!(origin.topic_partition(), origin.tp.to_string());
            assert_eq!(
                TopicPartition::parse_key(&origin.topic_partition()),
                Some((topic, partition))
            );
        }
    }

    /// The new types are stored byte for byte as the old flat ones were.
    #[test]
    fn the_stored_layout_is_the_old_one() {
        #[derive(Serialize)]
        struct OldOrigin {
            topic: String,
            partition: i32,
            offset: i64,
        }
        fn enc<T: Serialize>(v: &T) -> Vec<u8> {
            bincode::serde::encode_to_vec(v, bincode::config::standard()).unwrap()
        }
        let new = Origin::new(TopicPartition::new("in", 3), 42);
        let old = OldOrigin {
            topic: "in".into(),
            partition: 3,
            offset: 42,
        };
        assert_eq!(enc(&new), enc(&old));
        assert_eq!(new.topic_partition(), "in/3");
        assert_eq!(TopicPartition::parse_key("a/b/7"), Some(("a/b", 7)));
        assert_eq!(TopicPartition::parse_key("in"), None);
    }
}
