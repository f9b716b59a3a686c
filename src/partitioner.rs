//! Which partition a key belongs on: the producers' partitioner, and the
//! input topics' partition counts.
//!
//! Owns the rule that settles where an entity lives when its events arrive
//! on more than one partition (partitions were added, or the producers'
//! partitioner changed): the partition the configured partitioner gives
//! for the current partition count. Both partitioners are reimplemented
//! here bit for bit, and a test checks them against librdkafka's own.

use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Mutex, RwLock};

/// How producers map a key to a partition.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Partitioner {
    /// librdkafka's default (`consistent_random`): CRC-32 of the key,
    /// modulo the partition count. Used by librdkafka-based clients
    /// (confluent-kafka-python, -go, -dotnet, rdkafka) unless configured.
    #[default]
    ConsistentRandom,
    /// The Java client's default: murmur2 of the key, sign bit cleared,
    /// modulo the partition count (librdkafka's `murmur2_random`).
    Murmur2,
}

impl Partitioner {
    /// The partition of `key` among `partitions`.
    pub fn partition(self, key: &[u8], partitions: i32) -> i32 {
        let n = partitions.max(1) as u32;
        let h = match self {
            Partitioner::ConsistentRandom => crc32(key),
            Partitioner::Murmur2 => (murmur2(key) & 0x7fff_ffff) as u32,
        };
        (h % n) as i32
    }

    /// librdkafka's name for it (the producer property `partitioner`).
    pub fn librdkafka_name(self) -> &'static str {
        match self {
            Partitioner::ConsistentRandom => "consistent_random",
            Partitioner::Murmur2 => "murmur2_random",
        }
    }

    /// The name used in config.
    pub fn name(self) -> &'static str {
        match self {
            Partitioner::ConsistentRandom => "consistent_random",
            Partitioner::Murmur2 => "murmur2",
        }
    }
}

/// Kafka's murmur2 (`org.apache.kafka.common.utils.Utils.murmur2`).
pub fn murmur2(data: &[u8]) -> i32 {
    const M: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        for (i, b) in rest.iter().enumerate().rev() {
            h ^= u32::from(*b) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// CRC-32 (IEEE 802.3, as zlib and librdkafka's `rd_crc32`).
pub fn crc32(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, slot) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *slot = c;
        }
        t
    });
    let mut c = !0u32;
    for b in data {
        c = table[((c ^ u32::from(*b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// The partitioner and the partition count of each input topic, as last
/// read from the brokers' metadata (at start and at every assignment).
#[derive(Debug, Default)]
pub struct Layout {
    /// The producers' partitioner.
    pub partitioner: Partitioner,
    counts: RwLock<HashMap<String, i32>>,
    /// Entities held live here under a partition other than the one the
    /// partitioner maps them to: those whose records elsewhere the
    /// changelog follower must not miss, even before their own record is
    /// in the store.
    misplaced: Mutex<HashSet<String>>,
    misplaced_len: AtomicUsize,
}

impl Layout {
    /// A layout with no partition counts known yet.
    pub fn new(partitioner: Partitioner) -> Layout {
        Layout {
            partitioner,
            counts: RwLock::default(),
            misplaced: Mutex::default(),
            misplaced_len: AtomicUsize::new(0),
        }
    }

    /// Notes where an entity held live here lives now (`None`: it is not
    /// live here any more), keeping the misplaced set current.
    pub fn note_home(&self, topic: &str, id: &str, home: Option<i32>) {
        let misplaced = home.is_some_and(|h| self.rightful(topic, id).is_some_and(|r| r != h));
        if !misplaced && self.misplaced_len.load(Relaxed) == 0 {
            return;
        }
        let mut set = self.misplaced.lock().unwrap_or_else(|p| p.into_inner());
        if misplaced {
            set.insert(id.to_owned());
        } else {
            set.remove(id);
        }
        self.misplaced_len.store(set.len(), Relaxed);
    }

    /// Whether an entity is held live here under a partition the
    /// partitioner does not map it to.
    pub fn is_misplaced(&self, id: &str) -> bool {
        self.misplaced_len.load(Relaxed) > 0
            && self
                .misplaced
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(id)
    }

    /// Records `topic`'s partition count; returns the previous one when it changed.
    pub fn set_count(&self, topic: &str, partitions: i32) -> Option<i32> {
        let mut counts = self.counts.write().unwrap_or_else(|p| p.into_inner());
        match counts.insert(topic.to_owned(), partitions) {
            Some(old) if old != partitions => Some(old),
            _ => None,
        }
    }

    /// `topic`'s partition count, if known.
    pub fn count(&self, topic: &str) -> Option<i32> {
        self.counts
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(topic)
            .copied()
    }

    /// The partition `key` belongs on in `topic` now, if the count is known.
    pub fn rightful(&self, topic: &str, key: &str) -> Option<i32> {
        self.count(topic)
            .map(|n| self.partitioner.partition(key.as_bytes(), n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_the_java_client() {
        // The vectors of Kafka's UtilsTest.testMurmur2.
        let cases: &[(&[u8], i32)] = &[
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            (b"abc", 479_470_107),
        ];
        for (data, want) in cases {
            assert_eq!(murmur2(data), *want, "{}", String::from_utf8_lossy(data));
        }
    }

    #[test]
    fn crc32_is_the_ieee_checksum() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn the_layout_knows_a_keys_partition_once_it_knows_the_count() {
        let l = Layout::new(Partitioner::Murmur2);
        assert_eq!(l.rightful("t", "lead-1"), None);
        assert_eq!(l.set_count("t", 4), None);
        let four = l.rightful("t", "lead-1").unwrap();
        assert_eq!(l.set_count("t", 8), Some(4));
        let eight = l.rightful("t", "lead-1").unwrap();
        assert_eq!(
            eight % 4,
            four,
            "growing 4 -> 8 keeps the key or moves it by 4"
        );
    }
}
