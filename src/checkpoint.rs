//! Checkpoints: per partition, the offset below which every event is
//! durable, from the moment an offset is received until Kafka has it.
//!
//! One [`Checkpointer`] owns an offset's whole round trip, shared by the
//! source (which receives offsets and commits to Kafka) and the writer (which
//! writes and flushes them):
//!
//! 1. **received**: the source registers each offset as it arrives;
//! 2. **written**: the writer puts its effects into a batch. Events of one
//!    partition finish out of order (they go to different entity actors), so
//!    the checkpoint stored in a batch is the lowest offset not yet written.
//!    It counts that batch's own offsets as done, which is right because the
//!    batch commits atomically with it;
//! 3. **durable**: the batch is flushed. Its offsets leave the open set, and
//!    its checkpoints become the partitions' durable checkpoints in the same
//!    step, so whoever sees a partition drained also sees its checkpoint;
//! 4. **committed**: the source commits durable checkpoints that Kafka does
//!    not have yet, and Kafka's acknowledgement is recorded.
//!
//! Only durable checkpoints are ever committed to Kafka: a partition revoked
//! before its drain finished commits what was flushed, never what was only
//! written, so a batch that then fails cannot leave Kafka ahead of the store.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

pub use crate::model::position::TopicPartition;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Progress {
    Pending,
    Written,
    Durable,
}

#[derive(Debug, Default)]
struct PartitionProgress {
    /// Offsets received, ascending, from the oldest that is not durable:
    /// durable ones leave from the front, so no removal shifts the rest.
    open: VecDeque<(i64, Progress)>,
    /// How many of `open` are not durable.
    live: usize,
    /// One past the highest offset received.
    next: Option<i64>,
    /// The durable checkpoint (the next offset to consume; everything below
    /// it is flushed), and when it last advanced.
    durable: Option<(i64, SystemTime)>,
    /// The highest checkpoint Kafka acknowledged.
    committed: Option<i64>,
}

impl PartitionProgress {
    fn find(&mut self, offset: i64) -> Option<&mut (i64, Progress)> {
        let i = self.open.binary_search_by_key(&offset, |(o, _)| *o).ok()?;
        self.open.get_mut(i)
    }

    /// The next offset to consume such that everything below it is written
    /// or durable.
    fn written_checkpoint(&self) -> Option<i64> {
        match self.open.iter().find(|(_, s)| *s == Progress::Pending) {
            Some((o, _)) => Some(*o),
            None => self.next,
        }
    }

    fn advance_durable(&mut self, next_offset: i64, at: SystemTime) {
        if self.durable.is_none_or(|(d, _)| d < next_offset) {
            self.durable = Some((next_offset, at));
        }
    }
}

/// Owns every offset from received to committed; see the module docs.
/// Cheap to share: one lock, held only for map updates.
#[derive(Debug, Default)]
pub struct Checkpointer {
    parts: Mutex<foldhash::HashMap<TopicPartition, PartitionProgress>>,
}

impl Checkpointer {
    /// A new checkpointer with nothing in flight.
    pub fn new() -> Self {
        Self::default()
    }

    fn parts(&self) -> MutexGuard<'_, foldhash::HashMap<TopicPartition, PartitionProgress>> {
        self.parts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An offset was received from the broker. Returns the offset that was
    /// expected, when `offset` skips past it (a gap in the partition).
    pub fn received(&self, tp: &TopicPartition, offset: i64) -> Option<i64> {
        let mut parts = self.parts();
        let p = parts.entry(tp.clone()).or_default();
        if p.next.is_some_and(|n| offset < n) {
            // A rewind (the consumer re-fetched after a seek): older offsets are
            // already accounted for, and stay open until their own acks.
            if p.find(offset).is_none() {
                let i = p.open.partition_point(|(o, _)| *o < offset);
                p.open.insert(i, (offset, Progress::Pending));
                p.live += 1;
            }
            return None;
        }
        let gap = p.next.filter(|n| offset > *n);
        p.open.push_back((offset, Progress::Pending));
        p.live += 1;
        p.next = Some(offset + 1);
        gap
    }

    /// The offsets of `acks` are in a batch being built; returns the
    /// checkpoint to store with it for each partition in `touched`.
    pub fn written<'a>(
        &self,
        acks: impl IntoIterator<Item = (&'a TopicPartition, i64)>,
        touched: impl IntoIterator<Item = &'a TopicPartition>,
    ) -> Vec<(TopicPartition, i64)> {
        let mut parts = self.parts();
        for (tp, offset) in acks {
            if let Some(e) = parts.get_mut(tp).and_then(|p| p.find(offset)) {
                if e.1 == Progress::Pending {
                    e.1 = Progress::Written;
                }
            }
        }
        touched
            .into_iter()
            .filter_map(|tp| {
                let next = parts.get(tp)?.written_checkpoint()?;
                Some((tp.clone(), next))
            })
            .collect()
    }

    /// The batch holding `acks` and `checkpoints` is flushed: its offsets are
    /// durable, and so are its checkpoints, in one step.
    pub fn flushed<'a>(
        &self,
        acks: impl IntoIterator<Item = (&'a TopicPartition, i64)>,
        checkpoints: &[(TopicPartition, i64)],
        at: SystemTime,
    ) {
        let mut parts = self.parts();
        for (tp, offset) in acks {
            if let Some(p) = parts.get_mut(tp) {
                if let Some(e) = p.find(offset).filter(|e| e.1 != Progress::Durable) {
                    e.1 = Progress::Durable;
                    p.live -= 1;
                }
                while p.open.front().is_some_and(|e| e.1 == Progress::Durable) {
                    p.open.pop_front();
                }
            }
        }
        for (tp, next_offset) in checkpoints {
            parts
                .entry(tp.clone())
                .or_default()
                .advance_durable(*next_offset, at);
        }
    }

    /// A checkpoint found in the store at assignment: durable already, and
    /// committed to Kafka even if nothing new arrives.
    pub fn stored(&self, tp: &TopicPartition, next_offset: i64) {
        self.parts()
            .entry(tp.clone())
            .or_default()
            .advance_durable(next_offset, SystemTime::now());
    }

    /// Kafka acknowledged a commit of `next_offset` for `tp`.
    pub fn committed(&self, tp: &TopicPartition, next_offset: i64) {
        let mut parts = self.parts();
        let p = parts.entry(tp.clone()).or_default();
        if p.committed.is_none_or(|c| c < next_offset) {
            p.committed = Some(next_offset);
        }
    }

    /// The durable checkpoints of the partitions `wanted` accepts that Kafka
    /// does not have yet.
    pub fn to_commit(&self, wanted: impl Fn(&TopicPartition) -> bool) -> Vec<(TopicPartition, i64)> {
        self.parts()
            .iter()
            .filter(|(tp, _)| wanted(tp))
            .filter_map(|(tp, p)| {
                let (durable, _) = p.durable?;
                p.committed
                    .is_none_or(|c| c < durable)
                    .then(|| (tp.clone(), durable))
            })
            .collect()
    }

    /// The durable checkpoint of `tp` (the next offset to consume), if any:
    /// what a revoked partition commits.
    pub fn durable(&self, tp: &TopicPartition) -> Option<i64> {
        Some(self.parts().get(tp)?.durable?.0)
    }

    /// Every partition's durable checkpoint, for the dashboard and the gauges.
    pub fn durable_checkpoints(&self) -> BTreeMap<TopicPartition, (i64, SystemTime)> {
        self.parts()
            .iter()
            .filter_map(|(tp, p)| Some((tp.clone(), p.durable?)))
            .collect()
    }

    /// Whether every received offset of `tp` is durable.
    pub fn drained(&self, tp: &TopicPartition) -> bool {
        self.parts().get(tp).is_none_or(|p| p.live == 0)
    }

    /// Offsets received and not yet durable, over all partitions.
    pub fn in_flight(&self) -> usize {
        self.parts().values().map(|p| p.live).sum()
    }

    /// Stops tracking `tp` (after it is revoked and its checkpoint committed).
    pub fn forget(&self, tp: &TopicPartition) {
        self.parts().remove(tp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_is_the_lowest_offset_not_done() {
        let tp = TopicPartition::new("t", 0);
        let t = Checkpointer::new();
        let at = SystemTime::now();
        assert_eq!(t.written([], [&tp]), vec![]);
        for o in 10..15 {
            assert_eq!(t.received(&tp, o), None);
        }
        assert_eq!(t.written([], [&tp]), vec![(tp.clone(), 10)]);
        assert_eq!(t.written([(&tp, 11), (&tp, 12)], [&tp]), vec![(tp.clone(), 10)]);
        let batch = t.written([(&tp, 10)], [&tp]);
        assert_eq!(batch, vec![(tp.clone(), 13)]);
        // Written is not durable: nothing to commit yet.
        assert_eq!(t.durable(&tp), None);
        assert!(t.to_commit(|_| true).is_empty());
        t.flushed([(&tp, 10), (&tp, 11), (&tp, 12)], &batch, at);
        assert!(!t.drained(&tp));
        assert_eq!(t.durable(&tp), Some(13));
        assert_eq!(t.to_commit(|_| true), vec![(tp.clone(), 13)]);
        let batch = t.written([(&tp, 14), (&tp, 13)], [&tp]);
        assert_eq!(batch, vec![(tp.clone(), 15)]);
        t.committed(&tp, 13);
        assert!(t.to_commit(|_| true).is_empty());
        t.flushed([(&tp, 13), (&tp, 14)], &batch, at);
        assert!(t.drained(&tp));
        assert_eq!(t.to_commit(|_| true), vec![(tp.clone(), 15)]);
        assert!(t.to_commit(|_| false).is_empty());
    }

    #[test]
    fn a_gap_and_a_rewind_are_told_apart() {
        let tp = TopicPartition::new("t", 1);
        let t = Checkpointer::new();
        assert_eq!(t.received(&tp, 5), None);
        assert_eq!(t.received(&tp, 8), Some(6));
        // A rewind re-registers an offset already settled, in order.
        assert_eq!(t.received(&tp, 6), None);
        assert_eq!(t.written([], [&tp]), vec![(tp.clone(), 5)]);
        assert_eq!(t.in_flight(), 3);
    }

    /// A stored checkpoint is durable, and never moves a newer one back.
    #[test]
    fn durable_checkpoints_only_advance() {
        let tp = TopicPartition::new("t", 2);
        let t = Checkpointer::new();
        t.stored(&tp, 40);
        assert_eq!(t.to_commit(|_| true), vec![(tp.clone(), 40)]);
        t.flushed([], &[(tp.clone(), 30)], SystemTime::now());
        assert_eq!(t.durable(&tp), Some(40));
        t.committed(&tp, 40);
        t.committed(&tp, 35);
        assert!(t.to_commit(|_| true).is_empty());
        t.forget(&tp);
        assert_eq!(t.durable(&tp), None);
    }

    /// Offsets of one partition become durable out of order (different
    /// actors, different batches): the checkpoint waits for the oldest.
    #[test]
    fn durable_out_of_order_waits_for_the_oldest() {
        let tp = TopicPartition::new("t", 3);
        let t = Checkpointer::new();
        for o in 0..4 {
            t.received(&tp, o);
        }
        let at = SystemTime::now();
        let batch = t.written([(&tp, 2), (&tp, 3)], [&tp]);
        assert_eq!(batch, vec![(tp.clone(), 0)]);
        t.flushed([(&tp, 2), (&tp, 3)], &batch, at);
        assert_eq!((t.in_flight(), t.drained(&tp)), (2, false));
        let batch = t.written([(&tp, 1)], [&tp]);
        assert_eq!(batch, vec![(tp.clone(), 0)]);
        t.flushed([(&tp, 1)], &batch, at);
        let batch = t.written([(&tp, 0)], [&tp]);
        assert_eq!(batch, vec![(tp.clone(), 4)]);
        t.flushed([(&tp, 0)], &batch, at);
        assert_eq!((t.in_flight(), t.drained(&tp)), (0, true));
        assert_eq!(t.durable(&tp), Some(4));
        // A redelivered offset after the rewind is tracked again.
        t.received(&tp, 2);
        assert_eq!(t.in_flight(), 1);
    }
}
