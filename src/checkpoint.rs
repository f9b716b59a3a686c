//! Checkpoints: per partition, the offset below which every event is durable.
//!
//! Events of one partition finish out of order (they go to different entity
//! actors), so the checkpoint is the lowest offset not yet durable. The source
//! registers each offset as it is received; the writer marks offsets written
//! (in a batch being committed) and then durable (after the flush). The
//! checkpoint written into a batch counts that batch's own offsets as done,
//! which is right because the batch commits atomically.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// A topic and partition.
pub type TopicPartition = (Arc<str>, i32);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Progress {
    Pending,
    Written,
}

#[derive(Debug, Default)]
struct PartitionProgress {
    /// Offsets received and not yet durable, ascending.
    open: VecDeque<(i64, Progress)>,
    /// One past the highest offset received.
    next: Option<i64>,
}

impl PartitionProgress {
    fn find(&mut self, offset: i64) -> Option<&mut (i64, Progress)> {
        let i = self.open.binary_search_by_key(&offset, |(o, _)| *o).ok()?;
        self.open.get_mut(i)
    }
}

/// Tracks in-flight offsets per partition and computes checkpoints.
#[derive(Debug, Default)]
pub struct CheckpointTracker {
    parts: HashMap<TopicPartition, PartitionProgress>,
}

impl CheckpointTracker {
    /// A new tracker with nothing in flight.
    pub fn new() -> Self {
        Self::default()
    }

    /// An offset was received from the broker.
    pub fn received(&mut self, tp: &TopicPartition, offset: i64) {
        let p = self.parts.entry(tp.clone()).or_default();
        if p.next.is_some_and(|n| offset < n) {
            // A rewind (the consumer re-fetched after a seek): older offsets are
            // already accounted for, and stay open until their own acks.
            if p.find(offset).is_none() {
                let i = p.open.partition_point(|(o, _)| *o < offset);
                p.open.insert(i, (offset, Progress::Pending));
            }
            return;
        }
        p.open.push_back((offset, Progress::Pending));
        p.next = Some(offset + 1);
    }

    /// An offset's effects are in the batch being committed.
    pub fn written(&mut self, tp: &TopicPartition, offset: i64) {
        if let Some(e) = self.parts.get_mut(tp).and_then(|p| p.find(offset)) {
            e.1 = Progress::Written;
        }
    }

    /// An offset's batch is flushed.
    pub fn durable(&mut self, tp: &TopicPartition, offset: i64) {
        if let Some(p) = self.parts.get_mut(tp) {
            if let Ok(i) = p.open.binary_search_by_key(&offset, |(o, _)| *o) {
                p.open.remove(i);
            }
        }
    }

    /// The next offset to consume such that everything below it is written or
    /// durable; `None` if nothing was ever received on `tp`.
    pub fn checkpoint(&self, tp: &TopicPartition) -> Option<i64> {
        let p = self.parts.get(tp)?;
        match p.open.iter().find(|(_, s)| *s == Progress::Pending) {
            Some((o, _)) => Some(*o),
            None => p.next,
        }
    }

    /// One past the highest offset received on `tp`.
    pub fn next(&self, tp: &TopicPartition) -> Option<i64> {
        self.parts.get(tp).and_then(|p| p.next)
    }

    /// Whether every received offset of `tp` is durable.
    pub fn drained(&self, tp: &TopicPartition) -> bool {
        self.parts.get(tp).is_none_or(|p| p.open.is_empty())
    }

    /// Offsets received and not yet durable, over all partitions.
    pub fn in_flight(&self) -> usize {
        self.parts.values().map(|p| p.open.len()).sum()
    }

    /// Stops tracking `tp` (after it is revoked).
    pub fn forget(&mut self, tp: &TopicPartition) {
        self.parts.remove(tp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_is_the_lowest_offset_not_done() {
        let tp: TopicPartition = (Arc::from("t"), 0);
        let mut t = CheckpointTracker::new();
        assert_eq!(t.checkpoint(&tp), None);
        for o in 10..15 {
            t.received(&tp, o);
        }
        assert_eq!(t.checkpoint(&tp), Some(10));
        t.written(&tp, 11);
        t.written(&tp, 12);
        assert_eq!(t.checkpoint(&tp), Some(10));
        t.written(&tp, 10);
        assert_eq!(t.checkpoint(&tp), Some(13));
        for o in [10, 11, 12] {
            t.durable(&tp, o);
        }
        assert!(!t.drained(&tp));
        t.written(&tp, 14);
        t.written(&tp, 13);
        assert_eq!(t.checkpoint(&tp), Some(15));
        t.durable(&tp, 13);
        t.durable(&tp, 14);
        assert!(t.drained(&tp));
        assert_eq!(t.checkpoint(&tp), Some(15));
    }
}
