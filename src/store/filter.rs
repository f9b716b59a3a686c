//! The entity ids a store may hold: a Bloom filter, so that an event of an
//! entity the store has never held does not walk sled's tree to learn that.
//!
//! With a large, cold keyspace, most events start an actor whose record is
//! not in the store, and sled answers "absent" only after it has found (and
//! often paged in and deserialised) the leaf where the key would be. In the
//! `max` benchmark at a million keys, `Tree::get` was 11% of all CPU
//! samples, about as much as the writer's `apply_batch` (BENCHMARKS.md,
//! "The negative lookup").
//!
//! The filter answers "absent" only when it knows every id the store holds:
//! it is *complete* once the scan of the stored ids at open has finished,
//! and every id written since was added before its batch was applied. Until
//! then every lookup goes to sled. A "maybe" goes to sled too, so a false
//! positive costs one lookup, never a wrong answer; ids are never removed
//! (an entity that moves away leaves a stale "maybe", which is safe).
//!
//! A wrong "absent" would be the one dangerous answer: the entity would
//! start again from nothing and its next write would overwrite its record.
//! Nothing should cause one (every entity write goes through the store's
//! one function that adds its id), but one "absent" answer in
//! [`CHECK_EVERY`] is checked against the store anyway; if the store holds
//! the entity after all, the filter is switched off for good, every lookup
//! goes to the store, and the error is logged.
//!
//! The filter grows in layers, each twice the capacity of the one before:
//! its size follows the keyspace without knowing it in advance, and a layer
//! is never rebuilt. Each layer is a blocked Bloom filter: an id's bits all
//! lie in one 64-byte block, so a probe touches one cache line per layer.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering::*};
use std::sync::OnceLock;

/// Bits per id in a layer: under 1% false positives in a full layer (the
/// tests below check it).
const BITS_PER_ID: usize = 12;
/// Bits set per id, all within one block.
const PROBES: u32 = 7;
/// Words (of 64 bits) per block: one cache line.
const BLOCK_WORDS: usize = 8;
/// Layers at most: the last holds `base << 39` ids, far beyond any store.
const LAYERS: usize = 40;
/// The first layer's capacity in ids (192 KiB).
pub const BASE_CAPACITY: usize = 1 << 17;
/// One "absent" answer in this many (the first among them) is checked
/// against the store.
pub const CHECK_EVERY: u64 = 1024;

/// The filter's states, as [`KeyFilter::state`] gives them (and the
/// `orderly_entity_filter_state` gauge shows them): filling, its "absent"
/// answers not yet given; complete; switched off after a wrong answer.
pub const FILLING: u8 = 0;
/// See [`FILLING`].
pub const COMPLETE: u8 = 1;
/// See [`FILLING`].
pub const OFF: u8 = 2;

/// What the filter says of an id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// The store may hold it: look.
    Maybe,
    /// The store does not hold it.
    Absent,
    /// The store does not hold it, and this answer is one to check: look,
    /// and call [`KeyFilter::switch_off`] if the store holds it after all.
    AbsentCheck,
}

/// The filter; see the module documentation.
pub struct KeyFilter {
    layers: [OnceLock<Layer>; LAYERS],
    /// The layer new ids go to.
    current: AtomicUsize,
    base: usize,
    /// [`FILLING`] until every stored id is in the filter, then
    /// [`COMPLETE`]: "absent" answers can be trusted; [`OFF`] for good once
    /// a check found one wrong.
    state: AtomicU8,
    /// Lookups answered "absent": written by every such lookup, so on a
    /// cache line of its own, apart from `state` and `current`, which every
    /// lookup reads.
    skipped: Padded,
}

/// An atomic alone on its cache line.
#[repr(align(64))]
struct Padded(AtomicU64);

/// One block: an id's bits all lie in one, and it is aligned to a cache
/// line, so a probe touches one line (a `Box<[AtomicU64]>` is only aligned
/// to 8 bytes, and its blocks would straddle two).
#[repr(align(64))]
struct Block([AtomicU64; BLOCK_WORDS]);

struct Layer {
    blocks: Box<[Block]>,
    capacity: usize,
    len: AtomicUsize,
}

impl Layer {
    fn new(capacity: usize) -> Layer {
        let blocks = (capacity * BITS_PER_ID).div_ceil(BLOCK_WORDS * 64).max(1);
        Layer {
            blocks: (0..blocks)
                .map(|_| Block(std::array::from_fn(|_| AtomicU64::new(0))))
                .collect(),
            capacity,
            len: AtomicUsize::new(0),
        }
    }

    /// The block of hash `h`, and its `PROBES` bits: (word, mask).
    fn bits(&self, h: u64) -> (&Block, impl Iterator<Item = (usize, u64)>) {
        // The block from the hash's high bits (a multiply, not a modulo);
        // the bit positions from a remix of it, 9 bits each.
        let n = self.blocks.len() as u64;
        let block = ((u128::from(h) * u128::from(n)) >> 64) as usize;
        let mut rest = h.rotate_left(32).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let bits = (0..PROBES).map(move |_| {
            let bit = (rest & 511) as usize;
            rest >>= 9;
            (bit / 64, 1u64 << (bit % 64))
        });
        (&self.blocks[block], bits)
    }

    fn contains(&self, h: u64) -> bool {
        let (block, mut bits) = self.bits(h);
        bits.all(|(w, mask)| block.0[w].load(Relaxed) & mask != 0)
    }

    fn insert(&self, h: u64) {
        let (block, bits) = self.bits(h);
        for (w, mask) in bits {
            block.0[w].fetch_or(mask, Relaxed);
        }
        self.len.fetch_add(1, Relaxed);
    }
}

impl Default for KeyFilter {
    fn default() -> Self {
        KeyFilter::with_base(BASE_CAPACITY)
    }
}

impl KeyFilter {
    /// An empty, incomplete filter whose first layer holds `base` ids.
    pub fn with_base(base: usize) -> KeyFilter {
        KeyFilter {
            layers: std::array::from_fn(|_| OnceLock::new()),
            current: AtomicUsize::new(0),
            base: base.max(1),
            state: AtomicU8::new(FILLING),
            skipped: Padded(AtomicU64::new(0)),
        }
    }

    fn hash(id: &[u8]) -> u64 {
        // Fixed, not per process: the filter lives only in memory, and a
        // fixed seed makes its false positives the same from run to run.
        foldhash::fast::FixedState::with_seed(0x6f72_6465_726c_7921).hash_one(id)
    }

    fn layer(&self, i: usize) -> &Layer {
        self.layers[i].get_or_init(|| Layer::new(self.base << i))
    }

    fn in_layers(&self, h: u64) -> bool {
        let current = self.current.load(Acquire);
        // Newest first: the newest layer holds about half the ids.
        (0..=current).rev().any(|i| self.layers[i].get().is_some_and(|l| l.contains(h)))
    }

    /// Adds `id`: call before the write that stores it is applied. An id
    /// already (or seemingly) present is not added again, so that rewriting
    /// one entity does not fill the filter.
    pub fn insert(&self, id: &[u8]) {
        let h = Self::hash(id);
        if self.in_layers(h) {
            return;
        }
        let i = self.current.load(Acquire);
        let layer = self.layer(i);
        layer.insert(h);
        if layer.len.load(Relaxed) >= layer.capacity && i + 1 < LAYERS {
            // The next layer exists before ids are sent to it.
            self.layer(i + 1);
            let _ = self.current.compare_exchange(i, i + 1, AcqRel, Relaxed);
        }
    }

    /// Whether the store may hold `id`: [`Lookup::Maybe`] unless the
    /// filter is complete and `id` was never added.
    pub fn lookup(&self, id: &[u8]) -> Lookup {
        if self.state.load(Acquire) != COMPLETE || self.in_layers(Self::hash(id)) {
            return Lookup::Maybe;
        }
        if self.skipped.0.fetch_add(1, Relaxed) % CHECK_EVERY == 0 {
            Lookup::AbsentCheck
        } else {
            Lookup::Absent
        }
    }

    /// Every stored id has been added: "absent" can be trusted from now on
    /// (unless the filter was switched off).
    pub fn mark_complete(&self) {
        let _ = self
            .state
            .compare_exchange(FILLING, COMPLETE, AcqRel, Acquire);
    }

    /// A check found the store holding an id the filter did not have: every
    /// lookup goes to the store from now on.
    pub fn switch_off(&self) {
        self.state.store(OFF, Release);
    }

    /// [`FILLING`], [`COMPLETE`] or [`OFF`].
    pub fn state(&self) -> u8 {
        self.state.load(Acquire)
    }

    /// Ids added (an id whose bits were all set already is not counted).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.layers
            .iter()
            .filter_map(OnceLock::get)
            .map(|l| l.len.load(Relaxed))
            .sum()
    }

    /// Lookups answered "absent" so far.
    pub fn skipped(&self) -> u64 {
        self.skipped.0.load(Relaxed)
    }

    /// The filter's memory, bytes.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .filter_map(OnceLock::get)
            .map(|l| std::mem::size_of_val(&*l.blocks))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(prefix: &str, i: usize) -> Vec<u8> {
        format!("{prefix}-{i}").into_bytes()
    }

    impl KeyFilter {
        fn may_contain(&self, id: &[u8]) -> bool {
            self.lookup(id) == Lookup::Maybe
        }
    }

    #[test]
    fn an_incomplete_filter_answers_maybe() {
        let f = KeyFilter::with_base(16);
        assert!(f.may_contain(b"never-added"));
        f.insert(b"a");
        assert!(f.may_contain(b"a"));
        assert!(f.may_contain(b"b"));
        f.mark_complete();
        assert!(f.may_contain(b"a"));
        assert!(!f.may_contain(b"b"));
        assert_eq!(f.skipped(), 1);
    }

    /// The first "absent" answer, and one in every `CHECK_EVERY` after it,
    /// is to be checked; a filter switched off answers "maybe" for good,
    /// even if its scan marks it complete afterwards.
    #[test]
    fn absent_answers_are_checked_now_and_then_and_a_wrong_one_switches_it_off() {
        let f = KeyFilter::with_base(16);
        f.mark_complete();
        let answers: Vec<Lookup> = (0..2 * CHECK_EVERY + 1)
            .map(|i| f.lookup(format!("absent-{i}").as_bytes()))
            .collect();
        let checked: Vec<usize> = (0..answers.len())
            .filter(|&i| answers[i] == Lookup::AbsentCheck)
            .collect();
        let every = CHECK_EVERY as usize;
        assert_eq!(checked, [0, every, 2 * every]);
        assert!(answers.iter().all(|a| *a != Lookup::Maybe));
        f.switch_off();
        f.mark_complete();
        assert_eq!(f.state(), OFF);
        assert_eq!(f.lookup(b"absent-0"), Lookup::Maybe);
    }

    /// No added id is ever reported absent, across many layers, and few
    /// absent ids are reported present.
    #[test]
    fn no_false_negatives_and_few_false_positives_as_it_grows() {
        let f = KeyFilter::with_base(1_000);
        f.mark_complete();
        let n = 200_000;
        for i in 0..n {
            f.insert(&id("lead", i));
        }
        // 1,000 · (2^8 − 1) ≥ 200,000: at least eight layers.
        assert!(f.current.load(Relaxed) >= 7, "{} layers", f.current.load(Relaxed) + 1);
        assert!((0..n).all(|i| f.may_contain(&id("lead", i))));
        let absent = (0..n).filter(|&i| !f.may_contain(&id("appt", i))).count();
        let false_positives = n - absent;
        // About 0.5% per full layer, over eight or so layers.
        assert!(false_positives < n / 20, "{false_positives} false positives of {n}");
        assert_eq!(f.skipped(), absent as u64);
        assert!(f.len() <= n && f.len() > n * 9 / 10, "{}", f.len());
    }

    /// One full layer: about 0.5% false positives.
    #[test]
    fn one_layer_at_capacity_has_under_one_percent_false_positives() {
        let n = 100_000;
        let f = KeyFilter::with_base(n + 1);
        f.mark_complete();
        for i in 0..n {
            f.insert(&id("lead", i));
        }
        assert_eq!(f.current.load(Relaxed), 0);
        let fp = (0..n).filter(|&i| f.may_contain(&id("appt", i))).count();
        assert!(fp < n / 100, "{fp} false positives of {n}");
    }

    /// Rewriting one entity many times does not fill the filter.
    #[test]
    fn adding_an_id_again_does_not_count() {
        let f = KeyFilter::with_base(4);
        for _ in 0..1_000 {
            f.insert(b"lead-1");
        }
        assert_eq!(f.len(), 1);
        assert_eq!(f.current.load(Relaxed), 0);
    }
}
