//! The store: the [`Store`] trait and its sled implementation.
//!
//! Owns the durable layout. Everything lives in one sled tree under key
//! prefixes, so that an entity's record, the dead letters and the partition
//! checkpoints of one batch commit atomically (`apply_batch` is atomic within
//! one tree):
//!
//! | key | value |
//! |---|---|
//! | `e\0<entity id>` | [`EntityRecord`] |
//! | `c\0<topic>\0<partition, i32 BE>` | checkpoint: the next offset to consume, i64 BE |
//! | `d\0<id, u64 BE>` | [`DeadLetter`] |
//! | `o\0<id, u64 BE>` | [`OutboxRecord`] not yet published |
//! | `x\0<topic>\0<partition, i32 BE><offset, i64 BE>` | dead-letter id: one dead letter per message, even after a replay |
//! | `a\0<seq, u64 BE>` | [`Anomaly`]; the newest `anomalies_retained` are kept |
//! | `m\0anomaly_seq` | the next anomaly sequence number |
//! | `i\0<topic>\0<partition, i32 BE><entity id>` | the partition index: the entities whose home is that input partition |
//! | `l\0<changelog topic>\0<partition, i32 BE>` | the next changelog offset this store holds (written or restored), i64 BE |
//! | `h\0<entity id>\0<order key>` | a history entry ([`LogEntry`]) for types that keep history |
//! | `w\0<input topic>\0<partition, i32 BE><entity id>` | a changelog record the store holds and the broker has not acknowledged yet: the entity's view from that home partition (its record, or a forwarding stub) |
//! | `u\0<id, u64 BE>` | an [`OutboxRecord`] the broker refused for good (too large, no such topic), with the reason in its `orderly-undeliverable` header |
//! | `s\0<entity id>\0<chunk, u32 BE>` | a piece of a spilled entity record: an encoded record larger than [`SPILL_BYTES`] is cut into pieces of that size, and its `e` key holds a marker (codec 2) with their count and total length |
//!
//! Every value starts with a format-version byte. Version 2 added the
//! settings version to provenance and the ignored-events count to entity
//! records; version 3 added the forwarding stub and handover count to entity
//! records and an explicit partition to outbox records; version 4 grouped
//! the entity record's fields; version 5 stored provenance once per writing
//! event; version 6 put a codec byte after the version (0: the body as is,
//! 1: an LZ4 block) and compresses bodies of 128 bytes or more; version 7
//! added the spill marker (codec 2), so that sled never holds a value or a
//! leaf large enough for a blob file (sled keeps those in memory, whatever
//! its cache size: BENCHMARKS.md, "sled keeps large values resident");
//! version 8 added the zstd codec (3), which outbox bundles use: their
//! change records are JSON, which zstd's entropy coding stores in fewer
//! bytes than LZ4, and sled writes each bundle about four times before it
//! is deleted (BENCHMARKS.md, "zstd for outbox bundles": 13% fewer bytes
//! written per event). Values of
//! every older version are still read (see [`Stored`]). This module
//! does not decide what goes into a batch; the writer does.
//!
//! - `keys`: the key prefixes and how each key is built.
//! - `format`: the format versions and the migration from each older one.
//! - `sled`: [`SledStore`], the implementation over one sled tree.

pub mod filter;
mod format;
mod keys;
mod lz4;
mod sled;

pub use self::sled::SledStore;
pub use format::{Stored, FORMAT_VERSION};

use crate::model::anomaly::Anomaly;
use crate::model::dead_letter::DeadLetter;
use crate::model::fold::{EntityRecord, Home, LogEntry};
use crate::model::position::TopicPartition;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

/// A store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled reported an I/O or internal error.
    #[error("store I/O failed: {0}; check the data dir's disk and permissions")]
    Sled(#[from] ::sled::Error),
    /// Another process holds the data dir's lock.
    #[error("the store in {dir} is locked by another process; two instances cannot share a data_dir, so give each its own or stop the other one")]
    Locked {
        /// The data dir.
        dir: String,
    },
    /// A value could not be decoded.
    #[error("stored value under key {key:?} is corrupt: {reason}")]
    Corrupt {
        /// The key, lossily printed.
        key: String,
        /// What was wrong.
        reason: String,
    },
    /// A value was written by a newer orderly.
    #[error("stored value under key {key:?} has format version {found}, this orderly reads {FORMAT_VERSION}; upgrade orderly")]
    UnsupportedFormat {
        /// The key, lossily printed.
        key: String,
        /// The version found.
        found: u8,
    },
    /// A batch that cannot be written as it is: a bug in its caller.
    #[error("the batch cannot be written: {0}")]
    InvalidBatch(String),
    /// A fail point fired (tests only).
    #[error("fail point {0} fired")]
    FailPoint(&'static str),
}

/// `Result` with [`StoreError`].
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A message waiting to be published (to the dead-letter topic, for example).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxRecord {
    /// The destination topic.
    pub topic: String,
    /// The key.
    #[serde(with = "serde_bytes")]
    pub key: Option<Vec<u8>>,
    /// The value.
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    /// The headers.
    #[serde(with = "format::header_bytes")]
    pub headers: Vec<(String, Vec<u8>)>,
    /// The partition, when it must be this one (a forwarded event); `None`:
    /// the producer's partitioner chooses.
    pub partition: Option<i32>,
}

/// The checkpoint of one partition: the next offset to consume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// The partition.
    pub tp: TopicPartition,
    /// The next offset to consume; every offset below it is durable.
    pub next_offset: i64,
}

/// What one atomic commit writes.
#[derive(Debug, Default)]
pub struct CommitBatch {
    /// Encoded entity records, at most one per entity.
    pub entities: Vec<(String, Vec<u8>)>,
    /// New dead letters (their ids already assigned).
    pub dead_letters: Vec<DeadLetter>,
    /// Messages to publish once durable, in order, stored in bundles of
    /// about [`OUTBOX_CHUNK_BYTES`] ([`CommitBatch::outbox_bundles`]).
    pub outbox: Vec<OutboxRecord>,
    /// Each bundle of `outbox`, in order: its id (ascending) and how many
    /// records it holds ([`CommitBatch::assign_outbox_ids`]).
    pub outbox_ids: Vec<(u64, usize)>,
    /// Partition checkpoints.
    pub checkpoints: Vec<Checkpoint>,
    /// New anomaly records (their sequence numbers assigned).
    pub anomalies: Vec<Anomaly>,
    /// The next anomaly sequence number, to persist.
    pub anomaly_seq: Option<u64>,
    /// Removes anomaly records with a lower sequence number.
    pub prune_anomalies_below: Option<u64>,
    /// History entries, by entity.
    pub history: Vec<(String, LogEntry)>,
    /// Entities that became parked (true) or were released (false).
    pub parked: Vec<(String, bool)>,
    /// The count of open dead letters, to persist.
    pub open_dead_letters: Option<u64>,
    /// Entities whose home partition changed (or was first set): the
    /// partition index follows.
    pub homes: Vec<HomeChange>,
    /// The next changelog offset per changelog partition, once this batch's
    /// changelog records are acknowledged.
    pub changelog_positions: Vec<Checkpoint>,
    /// Changelog records this batch makes the store hold before the broker
    /// has them: (home partition, entity). Written with the state, so that a
    /// crash before the changelog is written leaves a mark to write it from.
    pub changelog_pending: Vec<(Home, String)>,
    /// Pending changelog records the broker has acknowledged: marks removed.
    pub changelog_done: Vec<(Home, String)>,
}

impl CommitBatch {
    /// Cuts the outbox into bundles ([`outbox_chunks`]), once, and gives
    /// each its id, drawn from `next_id` in order, so that bundles read
    /// back oldest first.
    pub fn assign_outbox_ids(&mut self, mut next_id: impl FnMut() -> Result<u64>) -> Result<()> {
        self.outbox_ids = outbox_chunks(&self.outbox)
            .map(|chunk| Ok((next_id()?, chunk.len())))
            .collect::<Result<_>>()?;
        Ok(())
    }

    /// The outbox's bundles, each with its id; an error if the bundles do
    /// not cover the outbox (ids not assigned, or records added since): a
    /// record outside every bundle would be lost.
    pub fn outbox_bundles(&self) -> Result<Vec<(u64, &[OutboxRecord])>> {
        let covered: usize = self.outbox_ids.iter().map(|(_, n)| n).sum();
        if covered != self.outbox.len() {
            return Err(StoreError::InvalidBatch(format!(
                "the outbox bundles cover {covered} of {} records: call CommitBatch::assign_outbox_ids last",
                self.outbox.len()
            )));
        }
        let mut rest = &self.outbox[..];
        Ok(self
            .outbox_ids
            .iter()
            .map(|&(id, n)| {
                let (bundle, tail) = rest.split_at(n);
                rest = tail;
                (id, bundle)
            })
            .collect())
    }

    /// Takes the outbox out of a committed batch, as the bundles it was
    /// stored in, for the publisher to have without reading them back.
    pub fn take_outbox_bundles(&mut self) -> Vec<(u64, Vec<OutboxRecord>)> {
        let mut records = std::mem::take(&mut self.outbox).into_iter();
        std::mem::take(&mut self.outbox_ids)
            .into_iter()
            .map(|(id, n)| (id, records.by_ref().take(n).collect()))
            .collect()
    }
}

/// Outbox bundles hold about this many bytes of records, before compression.
///
/// sled writes the bundles' leaf whole every 10 fragments and when it
/// splits, whatever the keys' sizes, so fewer, larger bundles are fewer
/// bytes written: 12 KiB wrote 11% fewer bytes per event than 6 KiB
/// (BENCHMARKS.md, "Larger outbox bundles"). The bound is sled's: it
/// writes a node larger than a quarter of its 512 KiB segment to a blob
/// file of its own, and a leaf holds up to 17 keys before it splits.
/// Change records' JSON compressed to 44% with LZ4 in the benchmark's
/// workload, and zstd (format 8) takes it further, so 17 bundles of 12 KiB
/// take under 90 KiB (not enforced); records that do not compress make such a leaf a blob
/// until its bundles are published and removed, which is slower, not
/// wrong. (Larger segments would raise the bound, but they halved sled's
/// rate on large batches.)
pub const OUTBOX_CHUNK_BYTES: usize = 12 * 1024;

/// `outbox` in order, in chunks of about [`OUTBOX_CHUNK_BYTES`] (a record
/// larger than that is a chunk alone).
pub fn outbox_chunks(outbox: &[OutboxRecord]) -> impl Iterator<Item = &[OutboxRecord]> {
    let mut rest = outbox;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut bytes = 0;
        let n = rest
            .iter()
            .take_while(|r| {
                let first = bytes == 0;
                bytes += r.byte_size();
                first || bytes <= OUTBOX_CHUNK_BYTES
            })
            .count();
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        Some(chunk)
    })
}

impl OutboxRecord {
    /// About the bytes it holds: topic, key, value and headers.
    pub fn byte_size(&self) -> usize {
        self.topic.len()
            + self.key.as_ref().map_or(0, Vec::len)
            + self.value.len()
            + self.headers.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
            + 16
    }
}

/// What [`Store::restore`] found besides the records it wrote.
#[derive(Debug, Default)]
pub struct Restored {
    /// Live records of entities that live here under another partition,
    /// for their actors to merge.
    pub conflicts: Vec<EntityRecord>,
    /// The records that could not be decoded, by their index in the
    /// records given, with the reason: each one's entity is quarantined
    /// (parked).
    pub corrupt: Vec<(usize, String)>,
}

/// An entity's home partition, before and after a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HomeChange {
    /// The entity.
    pub entity: String,
    /// Its home before, if any.
    pub from: Option<Home>,
    /// Its home now.
    pub to: Home,
}

/// A boxed future, for the async parts of the trait.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a commit reports about itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Committed {
    /// How long the commit kept every other operation on the store
    /// waiting: for sled, the time `apply_batch` held its process-wide
    /// lock exclusively, while no entity record could be read.
    pub exclusive: std::time::Duration,
}

/// Durable storage for entity records, checkpoints, dead letters and the outbox.
pub trait Store: Send + Sync + 'static {
    /// Loads one entity's record.
    fn load_entity(&self, entity_id: &str) -> Result<Option<EntityRecord>>;
    /// Applies one batch atomically, and reports how long it kept the
    /// store's other operations waiting ([`Committed`]). It is durable only
    /// after [`Store::flush`].
    fn commit(&self, batch: &CommitBatch) -> Result<Committed>;
    /// Makes every committed batch durable.
    fn flush(&self) -> BoxFuture<'_, Result<()>>;
    /// A fresh unique id, at least 1 (for dead letters and outbox records).
    fn next_id(&self) -> Result<u64>;
    /// The stored checkpoints of `topic`, by partition.
    fn checkpoints(&self, topic: &str) -> Result<BTreeMap<i32, i64>>;
    /// Anomaly records with seq > `after`, at most `limit`, oldest first.
    fn anomalies(&self, after: u64, limit: usize) -> Result<Vec<Anomaly>>;
    /// The next anomaly sequence number.
    fn anomaly_seq(&self) -> Result<u64>;
    /// An entity's history entries, in order-key order.
    fn history(&self, entity_id: &str) -> Result<Vec<LogEntry>>;
    /// An entity's newest `limit` history entries, in order-key order.
    fn history_tail(&self, entity_id: &str, limit: usize) -> Result<Vec<LogEntry>>;
    /// Whether the message at this position already has a dead letter.
    fn has_dead_letter(&self, topic: &str, partition: i32, offset: i64) -> Result<bool>;
    /// Every entity record, in key order.
    fn entities(&self) -> Box<dyn Iterator<Item = Result<EntityRecord>> + '_>;
    /// The id of the dead letter of the message at this position, if any.
    fn dead_letter_at(&self, topic: &str, partition: i32, offset: i64) -> Result<Option<u64>>;
    /// One dead letter.
    fn dead_letter(&self, id: u64) -> Result<Option<DeadLetter>>;
    /// Dead letters with id > `after`, at most `limit`, in id order.
    fn dead_letters(&self, after: u64, limit: usize) -> Result<Vec<DeadLetter>>;
    /// Unpublished outbox bundles, at most `limit`, oldest first: (id, messages).
    fn outbox(&self, limit: usize) -> Result<Vec<(u64, Vec<OutboxRecord>)>>;
    /// Removes published outbox bundles.
    fn remove_outbox(&self, ids: &[u64]) -> Result<()>;
    /// Settles bundle `id` after a pass that published only part of it, in
    /// one atomic batch: `unpublished` stays in the outbox for a later pass
    /// (so what was published is not published again), and `undeliverable`
    /// records move aside under fresh ids, out of the outbox.
    fn settle_outbox(
        &self,
        id: u64,
        unpublished: &[OutboxRecord],
        undeliverable: &[OutboxRecord],
    ) -> Result<()>;
    /// Outbox records the broker refused for good, with id > `after`, at
    /// most `limit`, oldest first.
    fn undeliverable(&self, after: u64, limit: usize) -> Result<Vec<(u64, OutboxRecord)>>;
    /// The ids of the parked entities, from the parked index.
    fn parked(&self) -> Result<Vec<String>>;
    /// The ids of the parked entities after `after`, at most `limit`, in id
    /// order: one page.
    fn parked_page(&self, after: &str, limit: usize) -> Result<Vec<String>>;
    /// How many dead letters have status open.
    fn open_dead_letters(&self) -> Result<u64>;
    /// The next changelog offset this store holds for a changelog partition.
    fn changelog_position(&self, topic: &str, partition: i32) -> Result<Option<i64>>;
    /// The entities whose changelog record for `home` is committed here and
    /// not yet acknowledged by the broker (see [`CommitBatch::changelog_pending`]).
    fn changelog_pending(&self, home: &Home) -> Result<Vec<String>>;
    /// Entities per home partition, from the partition index.
    fn partition_counts(&self) -> Result<BTreeMap<Home, u64>>;
    /// Writes records restored from a changelog partition (each the whole
    /// encoded record, which names its home), and the changelog position
    /// reached. The input partition's checkpoint is removed: after a restore,
    /// consumption resumes from the offset committed to Kafka, which the
    /// changelog covers.
    ///
    /// A record whose entity the store already holds live under another
    /// home (the entity moved partitions) does not replace it: a forwarding
    /// stub is dropped, and a live record is returned, to be merged by the
    /// entity's actor.
    ///
    /// A record that cannot be decoded quarantines its entity: the store's
    /// own record of it (or a new, empty one) is kept and parked, so its
    /// events wait for an operator, and the entity is returned with the
    /// reason. The rest of the partition restores.
    fn restore(
        &self,
        input: &Home,
        records: &[(String, Vec<u8>)],
        changelog: &Checkpoint,
    ) -> Result<Restored>;
    /// Removes everything held for an input partition this instance no longer
    /// owns: its checkpoint, its changelog position, and its entities (with
    /// their history and parked entries). Returns how many entities went.
    fn purge_partition(&self, input: &Home, changelog_topic: &str) -> Result<u64>;
}
/// Encodes a value with the format-version prefix and the codec byte.
///
/// Bodies of [`COMPRESS_FROM`] bytes or more are stored as an LZ4 block when
/// that is smaller. An entity record repeats itself: its state holds the
/// payload its log entry holds, and the event id, type and topic appear in
/// the provenance, the log key and the offsets. LZ4 finds those repeats: in
/// the `max` benchmark a record took 492 bytes instead of 944, and the
/// store half the disk.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    encode_with(value, Codec::Lz4).0
}

/// Encodes an outbox bundle as [`encode`] does, compressed with zstd
/// instead of LZ4 when that is smaller (format 8). A bundle holds about
/// [`OUTBOX_CHUNK_BYTES`] of change records, JSON that repeats its field
/// names record after record, and sled writes a bundle several times
/// before it is deleted. In the `max` benchmark zstd wrote 13% fewer bytes
/// per event and left 15% less on disk; its compression takes about twice
/// LZ4's instructions (8k more per event), which the run's CPU time did not
/// show (BENCHMARKS.md, "zstd for outbox bundles"). Entity records stay
/// LZ4: at a few hundred bytes each, zstd saved little on them and the runs
/// were no faster.
pub fn encode_bundle<T: Serialize>(value: &T) -> Vec<u8> {
    encode_with(value, Codec::Zstd).0
}

/// As [`encode`], and also the length of the body before compression: the
/// encoded value is at most 2 bytes longer than that.
pub fn encode_measured<T: Serialize>(value: &T) -> (Vec<u8>, usize) {
    encode_with(value, Codec::Lz4)
}

/// `value` framed with `codec`, and the length of its body before
/// compression.
fn encode_with<T: Serialize>(value: &T, codec: Codec) -> (Vec<u8>, usize) {
    SCRATCH.with_borrow_mut(|scratch| {
        scratch.body.clear();
        append_body(value, &mut scratch.body);
        (scratch.frame(codec), scratch.body.len())
    })
}

/// The length of `value`'s body before compression, without encoding it.
pub fn body_len<T: Serialize>(value: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Counting our own plain data types cannot fail.
    let _ = bincode::serde::encode_into_std_write(value, &mut count, bincode::config::standard());
    count.0
}

/// Appends `value`'s bincode body to `out`.
fn append_body<T: Serialize>(value: &T, out: &mut Vec<u8>) {
    // Encoding our own plain data types into a Vec cannot fail.
    bincode::serde::encode_into_std_write(value, out, bincode::config::standard())
        .expect("encoding into a Vec is infallible");
}

/// Bodies shorter than this are stored plain: LZ4 would save little.
pub const COMPRESS_FROM: usize = 128;

/// The codec byte of a format-6 value: the body follows as is.
const PLAIN: u8 = 0;
/// The codec byte of a format-6 value: an LZ4 block follows, prefixed with
/// its decompressed size (u32, little endian).
const LZ4: u8 = 1;

/// The codec byte of a format-7 entity value that was spilled: its pieces
/// follow under `s` keys; the value holds their count and the whole
/// encoded length (each u32, little endian).
pub(crate) const SPILLED: u8 = 2;

/// The codec byte of a format-8 value: a zstd frame follows, prefixed with
/// its decompressed size (u32, little endian). Outbox bundles use it.
const ZSTD: u8 = 3;

/// zstd's level for outbox bundles: its fastest standard level. Level 3
/// (zstd's default) stored the `max` benchmark's bundles in no fewer bytes.
const BUNDLE_ZSTD_LEVEL: i32 = 1;

/// Encoded entity records larger than this are spilled into pieces of this
/// size. sled writes a node larger than a quarter of its 512 KiB segment to
/// a blob file of its own and keeps it in memory for as long as it lives,
/// whatever the cache size; a leaf holds up to 16 keys, so 16 pieces stay
/// below that.
pub const SPILL_BYTES: usize = 6 * 1024;

/// The largest body a stored value may decompress to: the bound decoding
/// it may allocate. A corrupt size prefix is an error, not an allocation of
/// gigabytes.
const MAX_BODY: usize = format::MAX_DECODED;

/// How a body is compressed, when that makes it smaller.
#[derive(Clone, Copy)]
enum Codec {
    Lz4,
    Zstd,
}

/// What encoding reuses from value to value, so that the value written is
/// allocated once, at its size.
#[derive(Default)]
struct Scratch {
    /// The bincode body.
    body: Vec<u8>,
    /// The compressed block before framing.
    block: Vec<u8>,
    /// The LZ4 compressor's hash table.
    table: lz4::Table,
    /// The zstd context, made on first use; `None` after zstd could not
    /// make one (out of memory), and LZ4 is used instead.
    zstd: Option<Option<zstd::bulk::Compressor<'static>>>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
    /// The zstd decompression context, made on first use.
    static UNZSTD: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

impl Scratch {
    /// `[FORMAT_VERSION, codec, payload]`: the body compressed with `codec`
    /// (in `block`'s space) when that is smaller, else the body itself.
    fn frame(&mut self, codec: Codec) -> Vec<u8> {
        let len = self.body.len();
        let compressed = if len < COMPRESS_FROM {
            None
        } else {
            self.block.clear();
            Some(match codec {
                Codec::Zstd => self.zstd(),
                Codec::Lz4 => {
                    lz4::compress(&self.body, &mut self.table, &mut self.block);
                    LZ4
                }
            })
        }
        .filter(|_| 4 + self.block.len() < len);
        let payload_len = compressed.map_or(len, |_| 4 + self.block.len());
        let mut out = Vec::with_capacity(2 + payload_len);
        match compressed {
            Some(codec) => {
                out.extend_from_slice(&[FORMAT_VERSION, codec]);
                out.extend_from_slice(&(len as u32).to_le_bytes());
                out.extend_from_slice(&self.block);
            }
            None => {
                out.extend_from_slice(&[FORMAT_VERSION, PLAIN]);
                out.extend_from_slice(&self.body);
            }
        }
        out
    }

    /// Compresses the body into `block` with zstd and returns its codec, or
    /// with LZ4 when zstd cannot run (it could not allocate its context).
    fn zstd(&mut self) -> u8 {
        let context = self
            .zstd
            .get_or_insert_with(|| zstd::bulk::Compressor::new(BUNDLE_ZSTD_LEVEL).ok());
        if let Some(context) = context {
            self.block
                .reserve(zstd::zstd_safe::compress_bound(self.body.len()));
            // With room for the bound, compressing cannot run out of space.
            if context
                .compress_to_buffer(&self.body, &mut self.block)
                .is_ok()
            {
                return ZSTD;
            }
            self.block.clear();
        }
        lz4::compress(&self.body, &mut self.table, &mut self.block);
        LZ4
    }
}

/// Decompresses a zstd frame of `size` bytes (already checked against
/// [`MAX_BODY`]).
fn unzstd(frame: &[u8], size: usize) -> std::result::Result<Vec<u8>, String> {
    // The frame says its own size: a prefix that disagrees is refused
    // before its buffer is allocated.
    match zstd::zstd_safe::get_frame_content_size(frame) {
        Ok(Some(n)) if n == size as u64 => {}
        Ok(Some(n)) => {
            return Err(format!(
                "the zstd frame holds {n} bytes, its prefix says {size}"
            ))
        }
        Ok(None) | Err(_) => return Err("the zstd frame's header is corrupt".into()),
    }
    UNZSTD.with_borrow_mut(|slot| {
        let context = match slot {
            Some(context) => context,
            None => slot.insert(zstd::bulk::Decompressor::new().map_err(|e| e.to_string())?),
        };
        let mut body = Vec::with_capacity(size);
        let n = context
            .decompress_to_buffer(frame, &mut body)
            .map_err(|e| format!("the zstd frame is corrupt: {e}"))?;
        if n != size {
            return Err(format!("the zstd frame holds {n} bytes, its prefix says {size}"));
        }
        Ok(body)
    })
}

/// A compressed body's size prefix (u32, little endian) and what follows
/// it, refused when it claims more than [`MAX_BODY`].
fn size_prefixed<'a>(rest: &'a [u8], what: &str) -> std::result::Result<(usize, &'a [u8]), String> {
    let (size, payload) = rest
        .split_first_chunk::<4>()
        .ok_or_else(|| format!("the {what}'s size prefix is cut short"))?;
    let size = u32::from_le_bytes(*size) as usize;
    if size > MAX_BODY {
        return Err(format!(
            "the {what} claims {size} bytes, more than the {MAX_BODY} a value may hold"
        ));
    }
    Ok((size, payload))
}

/// The body of a format-6 value (after its version byte), decompressed.
fn unframe(framed: &[u8]) -> std::result::Result<std::borrow::Cow<'_, [u8]>, String> {
    match framed.split_first() {
        Some((&PLAIN, body)) => Ok(std::borrow::Cow::Borrowed(body)),
        Some((&LZ4, rest)) => {
            let (size, block) = size_prefixed(rest, "LZ4 block")?;
            // An LZ4 block expands at most about 255 times: a larger claim
            // is corrupt, and is refused before its buffer is allocated.
            if size > block.len().saturating_mul(255).saturating_add(16) {
                return Err(format!(
                    "the LZ4 block of {} bytes claims {size}, more than LZ4 can expand to",
                    block.len()
                ));
            }
            let mut body = vec![0; size];
            let n = lz4_flex::block::decompress_into(block, &mut body)
                .map_err(|e| format!("the LZ4 block is corrupt: {e}"))?;
            if n != size {
                return Err(format!(
                    "the LZ4 block holds {n} bytes, its prefix says {size}"
                ));
            }
            Ok(std::borrow::Cow::Owned(body))
        }
        Some((&ZSTD, rest)) => {
            let (size, frame) = size_prefixed(rest, "zstd frame")?;
            unzstd(frame, size).map(std::borrow::Cow::Owned)
        }
        Some((&SPILLED, _)) => Err("a spilled record's marker was read without its pieces".into()),
        Some((&codec, _)) => Err(format!("unknown codec {codec}")),
        None => Err("the codec byte is missing".into()),
    }
}

/// Decodes a value written by [`encode`].
pub fn decode<T: Stored>(key: &[u8], bytes: &[u8]) -> Result<T> {
    let key_text = || String::from_utf8_lossy(key).into_owned();
    let corrupt = |e: bincode::error::DecodeError| StoreError::Corrupt {
        key: key_text(),
        reason: e.to_string(),
    };
    let current = |body: &[u8]| {
        bincode::serde::decode_from_slice(body, format::DECODE)
            .map(|(v, _)| v)
            .map_err(corrupt)
    };
    match bytes.first() {
        Some(version) if format::FRAMED.contains(version) => {
            let body = unframe(&bytes[1..]).map_err(|reason| StoreError::Corrupt {
                key: key_text(),
                reason,
            })?;
            current(&body)
        }
        // Format 6 framed format 5's body; the body's layout is the same.
        Some(5) => current(&bytes[1..]),
        Some(1) => T::from_v1(&bytes[1..]).map_err(corrupt),
        Some(2) => T::from_v2(&bytes[1..]).map_err(corrupt),
        Some(3) => T::from_v3(&bytes[1..]).map_err(corrupt),
        Some(4) => T::from_v4(&bytes[1..]).map_err(corrupt),
        Some(&found) => Err(StoreError::UnsupportedFormat {
            key: key_text(),
            found,
        }),
        None => Err(StoreError::Corrupt {
            key: key_text(),
            reason: "empty value".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Change records as the outbox holds them: JSON that repeats its
    /// field names, with values that differ.
    fn bundle(n: usize) -> Vec<OutboxRecord> {
        (0..n)
            .map(|i| OutboxRecord {
                topic: "changes".into(),
                key: Some(format!("lead-{i}").into_bytes()),
                value: format!(
                    r#"{{"kind":"change","entity_id":"lead-{i}","event_id":"e{}","changes":[{{"field":"stage","old":null,"new":"s{}"}}]}}"#,
                    i * 7919 % 100_003,
                    i % 13
                )
                .into_bytes(),
                headers: vec![("traceparent".into(), format!("00-{i:032x}-{i:016x}-01").into_bytes())],
                partition: None,
            })
            .collect()
    }

    /// A bundle is a zstd frame, smaller than LZ4 makes it, and reads back
    /// as written; a bundle too short to compress is stored plain.
    #[test]
    fn bundles_are_zstd_frames_smaller_than_lz4() {
        let records = bundle(100);
        let zstd = encode_bundle(&records);
        assert_eq!(zstd[..2], [FORMAT_VERSION, ZSTD]);
        let lz4 = encode(&records);
        assert_eq!(lz4[..2], [FORMAT_VERSION, LZ4]);
        assert!(zstd.len() < lz4.len(), "{} against {}", zstd.len(), lz4.len());
        assert_eq!(decode::<Vec<OutboxRecord>>(b"o", &zstd).unwrap(), records);
        assert_eq!(decode::<Vec<OutboxRecord>>(b"o", &lz4).unwrap(), records);
        let none: Vec<OutboxRecord> = Vec::new();
        assert_eq!(encode_bundle(&none)[..2], [FORMAT_VERSION, PLAIN]);
    }

    /// A damaged zstd frame is a `Corrupt` error, and a size prefix the
    /// frame does not agree with allocates nothing of its size.
    #[test]
    fn a_damaged_zstd_frame_is_corrupt() {
        let good = encode_bundle(&bundle(50));
        let size = u32::from_le_bytes(good[2..6].try_into().unwrap());
        let with_size = |n: u32| {
            let mut b = good.clone();
            b[2..6].copy_from_slice(&n.to_le_bytes());
            b
        };
        let mut flipped = good.clone();
        let middle = flipped.len() / 2;
        flipped[middle] ^= 0xff;
        let mut header = good.clone();
        header[6..10].copy_from_slice(&[0; 4]);
        for (what, bytes) in [
            ("cut short", good[..good.len() - 10].to_vec()),
            ("no size prefix", good[..4].to_vec()),
            ("huge size", with_size(u32::MAX)),
            ("size one more", with_size(size + 1)),
            ("size one less", with_size(size - 1)),
            ("bad magic", header),
            ("a flipped byte", flipped),
        ] {
            match decode::<Vec<OutboxRecord>>(b"o", &bytes) {
                Err(StoreError::Corrupt { .. }) => {}
                // A flipped byte inside a literal can still decode: zstd's
                // checksum is off in bulk frames. It must not panic.
                Ok(_) if what == "a flipped byte" => {}
                other => panic!("{what}: {other:?}"),
            }
        }
    }

    /// A format-7 value (LZ4) still reads, now that values are written as
    /// format 8.
    #[test]
    fn format_7_values_still_read() {
        let records = bundle(20);
        let mut seven = encode(&records);
        assert_eq!(seven[0], 8);
        seven[0] = 7;
        assert_eq!(decode::<Vec<OutboxRecord>>(b"o", &seven).unwrap(), records);
    }
}
