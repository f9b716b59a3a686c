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
//!
//! Every value starts with a format-version byte. Version 2 added the
//! settings version to provenance and the ignored-events count to entity
//! records; version 3 added the forwarding stub and handover count to entity
//! records and an explicit partition to outbox records. Values of versions 1
//! and 2 are still read (see [`Stored`]). This module
//! does not decide what goes into a batch; the writer does.

use crate::anomaly::Anomaly;
use crate::dead_letter::DeadLetter;
use crate::fold::{EntityRecord, Home, LogEntry};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;

/// The format version written at the start of every stored value.
pub const FORMAT_VERSION: u8 = 3;

/// A value the store keeps, and how it is read from an older format.
pub trait Stored: DeserializeOwned {
    /// Decodes the bincode body of a format-1 value. The default suits the
    /// types whose layout did not change.
    fn from_v1(body: &[u8]) -> std::result::Result<Self, bincode::error::DecodeError> {
        bincode::serde::decode_from_slice(body, bincode::config::standard()).map(|(v, _)| v)
    }

    /// Decodes the bincode body of a format-2 value. The default suits the
    /// types whose layout did not change.
    fn from_v2(body: &[u8]) -> std::result::Result<Self, bincode::error::DecodeError> {
        bincode::serde::decode_from_slice(body, bincode::config::standard()).map(|(v, _)| v)
    }
}

impl Stored for Anomaly {}
impl Stored for DeadLetter {}

impl Stored for OutboxRecord {
    fn from_v1(body: &[u8]) -> std::result::Result<Self, bincode::error::DecodeError> {
        Self::from_v2(body)
    }

    fn from_v2(body: &[u8]) -> std::result::Result<Self, bincode::error::DecodeError> {
        bincode::serde::decode_from_slice::<format_v2::OutboxRecord, _>(
            body,
            bincode::config::standard(),
        )
        .map(|(v, _)| v.into())
    }
}

impl Stored for Vec<OutboxRecord> {
    fn from_v1(body: &[u8]) -> std::result::Result<Self, bincode::error::DecodeError> {
        Self::from_v2(body)
    }

    fn from_v2(body: &[u8]) -> std::result::Result<Self, bincode::error::DecodeError> {
        bincode::serde::decode_from_slice::<Vec<format_v2::OutboxRecord>, _>(
            body,
            bincode::config::standard(),
        )
        .map(|(v, _)| v.into_iter().map(Into::into).collect())
    }
}

impl Stored for EntityRecord {
    fn from_v1(body: &[u8]) -> std::result::Result<Self, bincode::error::DecodeError> {
        bincode::serde::decode_from_slice::<format_v1::EntityRecord, _>(
            body,
            bincode::config::standard(),
        )
        .map(|(v, _)| v.into())
    }

    fn from_v2(body: &[u8]) -> std::result::Result<Self, bincode::error::DecodeError> {
        entity_from_v2(body)
    }
}

/// Format 3 appended `moved_to` (`None`) and `handovers` (0) to the entity
/// record. bincode writes fields in order with no names, and encodes both
/// defaults as one zero byte, so a format-2 body plus two zero bytes is the
/// same record in format 3.
fn entity_from_v2(body: &[u8]) -> std::result::Result<EntityRecord, bincode::error::DecodeError> {
    let mut upgraded = Vec::with_capacity(body.len() + 2);
    upgraded.extend_from_slice(body);
    upgraded.extend_from_slice(&[0, 0]);
    bincode::serde::decode_from_slice(&upgraded, bincode::config::standard()).map(|(v, _)| v)
}

impl Stored for LogEntry {
    fn from_v1(body: &[u8]) -> std::result::Result<Self, bincode::error::DecodeError> {
        bincode::serde::decode_from_slice::<format_v1::LogEntry, _>(
            body,
            bincode::config::standard(),
        )
        .map(|(v, _)| v.into())
    }
}

/// The layouts of format 1 that changed in format 2, and their upgrade.
mod format_v1 {
    use crate::fold::{self, HeldEvent, Parked, Skipped};
    use crate::handler::EntityState;
    use crate::ordering::OrderKey;
    use crate::value::Fields;
    use serde::{Deserialize, Serialize};
    use std::collections::BTreeMap;

    #[derive(Serialize, Deserialize)]
    pub struct Provenance {
        pub event_id: String,
        pub event_type: String,
        pub topic: String,
        pub partition: i32,
        pub offset: i64,
        pub occurred_at: i64,
        pub processed_at: i64,
    }

    impl From<Provenance> for fold::Provenance {
        fn from(p: Provenance) -> Self {
            fold::Provenance {
                event_id: p.event_id,
                event_type: p.event_type,
                topic: p.topic,
                partition: p.partition,
                offset: p.offset,
                occurred_at: p.occurred_at,
                processed_at: p.processed_at,
                settings_version: 0,
            }
        }
    }

    fn upgrade(p: BTreeMap<String, Provenance>) -> BTreeMap<String, fold::Provenance> {
        p.into_iter().map(|(k, v)| (k, v.into())).collect()
    }

    #[derive(Serialize, Deserialize)]
    pub struct LogEntry {
        pub key: OrderKey,
        pub event_type: String,
        pub payload: Fields,
        pub provenance: Provenance,
    }

    impl From<LogEntry> for fold::LogEntry {
        fn from(e: LogEntry) -> Self {
            fold::LogEntry {
                key: e.key,
                event_type: e.event_type,
                payload: e.payload,
                provenance: e.provenance.into(),
            }
        }
    }

    #[derive(Serialize, Deserialize)]
    pub struct Base {
        pub state: EntityState,
        pub provenance: BTreeMap<String, Provenance>,
        pub key: Option<OrderKey>,
    }

    #[derive(Serialize, Deserialize)]
    pub struct EntityRecord {
        pub entity_id: String,
        pub tenant_id: String,
        pub state: EntityState,
        pub provenance: BTreeMap<String, Provenance>,
        pub high_water: Option<OrderKey>,
        pub log: Vec<LogEntry>,
        pub base: Base,
        pub applied_offsets: BTreeMap<String, i64>,
        pub applied_events: u64,
        pub duplicates: u64,
        pub redeliveries: u64,
        pub late_events: u64,
        pub too_late_events: u64,
        pub dead_lettered: u64,
        pub late_applied: u64,
        pub late_dropped: u64,
        pub parked: Option<Parked>,
        pub held: Vec<HeldEvent>,
        pub skipped: Vec<Skipped>,
    }

    impl From<EntityRecord> for fold::EntityRecord {
        fn from(r: EntityRecord) -> Self {
            fold::EntityRecord {
                entity_id: r.entity_id,
                tenant_id: r.tenant_id,
                state: r.state,
                provenance: upgrade(r.provenance),
                high_water: r.high_water,
                log: r.log.into_iter().map(Into::into).collect(),
                base: fold::Base {
                    state: r.base.state,
                    provenance: upgrade(r.base.provenance),
                    key: r.base.key,
                },
                applied_offsets: r.applied_offsets,
                applied_events: r.applied_events,
                duplicates: r.duplicates,
                redeliveries: r.redeliveries,
                late_events: r.late_events,
                too_late_events: r.too_late_events,
                dead_lettered: r.dead_lettered,
                late_applied: r.late_applied,
                late_dropped: r.late_dropped,
                parked: r.parked,
                held: r.held,
                skipped: r.skipped,
                ignored_events: 0,
                home: None,
                moved_to: None,
                handovers: 0,
            }
        }
    }
}

const ENTITY: u8 = b'e';
const CHECKPOINT: u8 = b'c';
const DEAD_LETTER: u8 = b'd';
const OUTBOX: u8 = b'o';
const DEAD_LETTER_INDEX: u8 = b'x';
const ANOMALY: u8 = b'a';
const META: u8 = b'm';
const HISTORY: u8 = b'h';
const PARKED: u8 = b'p';
/// Outbox bundles: all the messages one batch publishes, under one key.
const OUTBOX_BUNDLE: u8 = b'b';
/// The partition index: entities by home partition.
const PARTITION_INDEX: u8 = b'i';
/// Changelog positions.
const CHANGELOG: u8 = b'l';

/// A store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled reported an I/O or internal error.
    #[error("store I/O failed: {0}; check the data dir's disk and permissions")]
    Sled(#[from] sled::Error),
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
    pub key: Option<Vec<u8>>,
    /// The value.
    pub value: Vec<u8>,
    /// The headers.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The partition, when it must be this one (a forwarded event); `None`:
    /// the producer's partitioner chooses.
    pub partition: Option<i32>,
}

/// The outbox record of formats 1 and 2, without a partition.
mod format_v2 {
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize)]
    pub(super) struct OutboxRecord {
        pub topic: String,
        pub key: Option<Vec<u8>>,
        pub value: Vec<u8>,
        pub headers: Vec<(String, Vec<u8>)>,
    }

    impl From<OutboxRecord> for super::OutboxRecord {
        fn from(r: OutboxRecord) -> Self {
            super::OutboxRecord {
                topic: r.topic,
                key: r.key,
                value: r.value,
                headers: r.headers,
                partition: None,
            }
        }
    }
}

/// The checkpoint of one partition: the next offset to consume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
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
    /// Messages to publish once durable, in order, stored as one bundle.
    pub outbox: Vec<OutboxRecord>,
    /// The id of this batch's outbox bundle (needed when `outbox` is not empty).
    pub outbox_id: u64,
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

/// Durable storage for entity records, checkpoints, dead letters and the outbox.
pub trait Store: Send + Sync + 'static {
    /// Loads one entity's record.
    fn load_entity(&self, entity_id: &str) -> Result<Option<EntityRecord>>;
    /// Applies one batch atomically. It is durable only after [`Store::flush`].
    fn commit(&self, batch: &CommitBatch) -> Result<()>;
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
    /// The ids of the parked entities, from the parked index.
    fn parked(&self) -> Result<Vec<String>>;
    /// How many dead letters have status open.
    fn open_dead_letters(&self) -> Result<u64>;
    /// The next changelog offset this store holds for a changelog partition.
    fn changelog_position(&self, topic: &str, partition: i32) -> Result<Option<i64>>;
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
    fn restore(
        &self,
        input: &Home,
        records: &[(String, Vec<u8>)],
        changelog: &Checkpoint,
    ) -> Result<Vec<EntityRecord>>;
    /// Removes everything held for an input partition this instance no longer
    /// owns: its checkpoint, its changelog position, and its entities (with
    /// their history and parked entries). Returns how many entities went.
    fn purge_partition(&self, input: &Home, changelog_topic: &str) -> Result<u64>;
}

fn index_key(home: &Home, entity: &str) -> Vec<u8> {
    let mut k = index_prefix(home);
    k.extend_from_slice(entity.as_bytes());
    k
}

fn index_prefix(home: &Home) -> Vec<u8> {
    let mut k = key(PARTITION_INDEX, home.topic.as_bytes());
    k.push(0);
    k.extend_from_slice(&home.partition.to_be_bytes());
    k
}

fn changelog_key(topic: &str, partition: i32) -> Vec<u8> {
    let mut k = key(CHANGELOG, topic.as_bytes());
    k.push(0);
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

/// Encodes a value with the format-version prefix.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = vec![FORMAT_VERSION];
    // Encoding our own plain data types into a Vec cannot fail.
    bincode::serde::encode_into_std_write(value, &mut out, bincode::config::standard())
        .expect("encoding into a Vec is infallible");
    out
}

/// Decodes a value written by [`encode`].
pub fn decode<T: Stored>(key: &[u8], bytes: &[u8]) -> Result<T> {
    let key_text = || String::from_utf8_lossy(key).into_owned();
    let corrupt = |e: bincode::error::DecodeError| StoreError::Corrupt {
        key: key_text(),
        reason: e.to_string(),
    };
    match bytes.first() {
        Some(&FORMAT_VERSION) => {
            bincode::serde::decode_from_slice(&bytes[1..], bincode::config::standard())
                .map(|(v, _)| v)
                .map_err(corrupt)
        }
        Some(1) => T::from_v1(&bytes[1..]).map_err(corrupt),
        Some(2) => T::from_v2(&bytes[1..]).map_err(corrupt),
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

fn key(prefix: u8, rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + rest.len());
    k.push(prefix);
    k.push(0);
    k.extend_from_slice(rest);
    k
}

fn dead_letter_index_key(topic: &str, partition: i32, offset: i64) -> Vec<u8> {
    let mut k = key(DEAD_LETTER_INDEX, topic.as_bytes());
    k.push(0);
    k.extend_from_slice(&partition.to_be_bytes());
    k.extend_from_slice(&offset.to_be_bytes());
    k
}

fn history_prefix(entity_id: &str) -> Vec<u8> {
    let mut k = key(HISTORY, entity_id.as_bytes());
    k.push(0);
    k
}

const ANOMALY_SEQ: &[u8] = b"anomaly_seq";
const OPEN_DEAD_LETTERS: &[u8] = b"open_dead_letters";
/// Present once the parked index and the open dead-letter count exist.
const OPERATOR_INDEX: &[u8] = b"operator_index_v1";

fn checkpoint_key(topic: &str, partition: i32) -> Vec<u8> {
    let mut k = key(CHECKPOINT, topic.as_bytes());
    k.push(0);
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

/// The sled implementation of [`Store`].
#[derive(Clone)]
pub struct SledStore {
    db: sled::Db,
    tree: sled::Tree,
}

impl SledStore {
    /// Opens (or creates) the store in `dir`. `cache_mb` bounds sled's page cache.
    pub fn open(dir: &Path, cache_mb: u64) -> Result<Self> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_mb.saturating_mul(1024 * 1024))
            // orderly flushes after every batch; a timer flush would only add fsyncs.
            .flush_every_ms(None)
            .open()?;
        let tree = db.open_tree("orderly")?;
        let store = SledStore { db, tree };
        store.build_operator_index()?;
        Ok(store)
    }

    /// Builds the parked index and the open dead-letter count of a store
    /// written before they existed: one scan, once.
    fn build_operator_index(&self) -> Result<()> {
        if self.tree.contains_key(key(META, OPERATOR_INDEX))? {
            return Ok(());
        }
        let mut b = sled::Batch::default();
        for r in self.entities() {
            let r = r?;
            if r.parked.is_some() {
                b.insert(key(PARKED, r.entity_id.as_bytes()), &[][..]);
            }
        }
        let mut open = 0u64;
        let mut after = 0;
        loop {
            let chunk = self.dead_letters(after, 1000)?;
            let Some(last) = chunk.last().map(|d| d.id) else {
                break;
            };
            open += chunk
                .iter()
                .filter(|d| d.status == crate::dead_letter::OPEN)
                .count() as u64;
            after = last;
        }
        b.insert(key(META, OPEN_DEAD_LETTERS), open.to_be_bytes().to_vec());
        b.insert(key(META, OPERATOR_INDEX), &[][..]);
        self.tree.apply_batch(b)?;
        self.tree.flush()?;
        Ok(())
    }

    /// Overwrites one entity record directly, outside the pipeline. For
    /// repairs and for tests that corrupt state on purpose.
    pub fn put_entity(&self, record: &EntityRecord) -> Result<()> {
        self.tree
            .insert(key(ENTITY, record.entity_id.as_bytes()), encode(record))?;
        self.tree.flush()?;
        Ok(())
    }

    /// The size of the data dir on disk, in bytes.
    pub fn size_on_disk(&self) -> Result<u64> {
        Ok(self.db.size_on_disk()?)
    }
}

impl Store for SledStore {
    fn load_entity(&self, entity_id: &str) -> Result<Option<EntityRecord>> {
        let k = key(ENTITY, entity_id.as_bytes());
        match self.tree.get(&k)? {
            Some(v) => Ok(Some(decode(&k, &v)?)),
            None => Ok(None),
        }
    }

    fn commit(&self, batch: &CommitBatch) -> Result<()> {
        let mut b = sled::Batch::default();
        for (id, bytes) in &batch.entities {
            b.insert(key(ENTITY, id.as_bytes()), bytes.as_slice());
        }
        for dl in &batch.dead_letters {
            b.insert(key(DEAD_LETTER, &dl.id.to_be_bytes()), encode(dl));
            b.insert(
                dead_letter_index_key(&dl.topic, dl.partition, dl.offset),
                dl.id.to_be_bytes().to_vec(),
            );
        }
        if !batch.outbox.is_empty() {
            // One key per batch: per-message keys cost an insert and a
            // remove per event (a third of the store's work in the bench).
            b.insert(
                key(OUTBOX_BUNDLE, &batch.outbox_id.to_be_bytes()),
                encode(&batch.outbox),
            );
        }
        for a in &batch.anomalies {
            b.insert(key(ANOMALY, &a.seq.to_be_bytes()), encode(a));
        }
        if let Some(seq) = batch.anomaly_seq {
            b.insert(key(META, ANOMALY_SEQ), seq.to_be_bytes().to_vec());
        }
        if let Some(below) = batch.prune_anomalies_below {
            for k in self
                .tree
                .range(key(ANOMALY, b"")..key(ANOMALY, &below.to_be_bytes()))
                .keys()
            {
                b.remove(k?);
            }
        }
        for (entity, entry) in &batch.history {
            let mut k = history_prefix(entity);
            k.extend_from_slice(&crate::history::encode_key(&entry.key));
            b.insert(k, encode(entry));
        }
        for (id, parked) in &batch.parked {
            if *parked {
                b.insert(key(PARKED, id.as_bytes()), &[][..]);
            } else {
                b.remove(key(PARKED, id.as_bytes()));
            }
        }
        if let Some(n) = batch.open_dead_letters {
            b.insert(key(META, OPEN_DEAD_LETTERS), n.to_be_bytes().to_vec());
        }
        for cp in &batch.checkpoints {
            b.insert(
                checkpoint_key(&cp.topic, cp.partition),
                cp.next_offset.to_be_bytes().to_vec(),
            );
        }
        for h in &batch.homes {
            if let Some(from) = &h.from {
                b.remove(index_key(from, &h.entity));
            }
            b.insert(index_key(&h.to, &h.entity), &[][..]);
        }
        for cp in &batch.changelog_positions {
            b.insert(
                changelog_key(&cp.topic, cp.partition),
                cp.next_offset.to_be_bytes().to_vec(),
            );
        }
        self.tree.apply_batch(b)?;
        Ok(())
    }

    fn changelog_position(&self, topic: &str, partition: i32) -> Result<Option<i64>> {
        let k = changelog_key(topic, partition);
        match self.tree.get(&k)? {
            Some(v) => Ok(Some(i64::from_be_bytes(v.as_ref().try_into().map_err(
                |_| StoreError::Corrupt {
                    key: String::from_utf8_lossy(&k).into_owned(),
                    reason: "changelog position is not 8 bytes".into(),
                },
            )?))),
            None => Ok(None),
        }
    }

    fn partition_counts(&self) -> Result<BTreeMap<Home, u64>> {
        let mut out = BTreeMap::new();
        for k in self.tree.scan_prefix(key(PARTITION_INDEX, b"")).keys() {
            let k = k?;
            let rest = &k[2..];
            let corrupt = || StoreError::Corrupt {
                key: String::from_utf8_lossy(&k).into_owned(),
                reason: "partition index key is malformed".into(),
            };
            let nul = rest.iter().position(|b| *b == 0).ok_or_else(corrupt)?;
            let p: [u8; 4] = rest
                .get(nul + 1..nul + 5)
                .and_then(|s| s.try_into().ok())
                .ok_or_else(corrupt)?;
            let home = Home {
                topic: String::from_utf8_lossy(&rest[..nul]).into_owned(),
                partition: i32::from_be_bytes(p),
            };
            *out.entry(home).or_insert(0) += 1;
        }
        Ok(out)
    }

    fn restore(
        &self,
        input: &Home,
        records: &[(String, Vec<u8>)],
        changelog: &Checkpoint,
    ) -> Result<Vec<EntityRecord>> {
        let mut b = sled::Batch::default();
        let mut conflicts = Vec::new();
        for (id, bytes) in records {
            let k = key(ENTITY, id.as_bytes());
            let record: EntityRecord = decode(&k, bytes)?;
            if let Some(old) = self.tree.get(&k)? {
                if let Ok(old) = decode::<EntityRecord>(&k, &old) {
                    let elsewhere = old
                        .home
                        .as_ref()
                        .filter(|h| Some(*h) != record.home.as_ref());
                    if elsewhere.is_some() && old.moved_to.is_none() {
                        // The entity lives on under another partition here.
                        if record.moved_to.is_none() {
                            conflicts.push(record);
                        }
                        continue;
                    }
                    // Keep the partition index exact when the record lived elsewhere.
                    if let Some(h) = elsewhere {
                        b.remove(index_key(h, id));
                    }
                }
            }
            b.insert(
                index_key(record.home.as_ref().unwrap_or(input), id),
                &[][..],
            );
            if record.parked.is_some() {
                b.insert(key(PARKED, id.as_bytes()), &[][..]);
            } else {
                b.remove(key(PARKED, id.as_bytes()));
            }
            b.insert(k, bytes.as_slice());
        }
        b.insert(
            changelog_key(&changelog.topic, changelog.partition),
            changelog.next_offset.to_be_bytes().to_vec(),
        );
        b.remove(checkpoint_key(&input.topic, input.partition));
        self.tree.apply_batch(b)?;
        Ok(conflicts)
    }

    fn purge_partition(&self, input: &Home, changelog_topic: &str) -> Result<u64> {
        // First what says the partition is here: a crash halfway leaves
        // entities that the next assignment restores over.
        let mut b = sled::Batch::default();
        b.remove(checkpoint_key(&input.topic, input.partition));
        b.remove(changelog_key(changelog_topic, input.partition));
        self.tree.apply_batch(b)?;
        let prefix = index_prefix(input);
        let mut purged = 0;
        loop {
            let keys: Vec<sled::IVec> = self
                .tree
                .scan_prefix(&prefix)
                .keys()
                .take(1000)
                .collect::<std::result::Result<_, _>>()?;
            if keys.is_empty() {
                break;
            }
            let mut b = sled::Batch::default();
            for k in &keys {
                let id = &k[prefix.len()..];
                b.remove(key(ENTITY, id));
                b.remove(key(PARKED, id));
                let entity = String::from_utf8_lossy(id);
                for h in self.tree.scan_prefix(history_prefix(&entity)).keys() {
                    b.remove(h?);
                }
                b.remove(k.clone());
                purged += 1;
            }
            self.tree.apply_batch(b)?;
        }
        self.tree.flush()?;
        Ok(purged)
    }

    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.tree.flush_async().await?;
            Ok(())
        })
    }

    fn next_id(&self) -> Result<u64> {
        // Ids start at 1, so that paging "after 0" starts at the beginning.
        Ok(self.db.generate_id()? + 1)
    }

    fn checkpoints(&self, topic: &str) -> Result<BTreeMap<i32, i64>> {
        let mut prefix = key(CHECKPOINT, topic.as_bytes());
        prefix.push(0);
        let mut out = BTreeMap::new();
        for kv in self.tree.scan_prefix(&prefix) {
            let (k, v) = kv?;
            let corrupt = || StoreError::Corrupt {
                key: String::from_utf8_lossy(&k).into_owned(),
                reason: "checkpoint key or value has the wrong length".into(),
            };
            let p: [u8; 4] = k[prefix.len()..].try_into().map_err(|_| corrupt())?;
            let o: [u8; 8] = v.as_ref().try_into().map_err(|_| corrupt())?;
            out.insert(i32::from_be_bytes(p), i64::from_be_bytes(o));
        }
        Ok(out)
    }

    fn anomalies(&self, after: u64, limit: usize) -> Result<Vec<Anomaly>> {
        let start = key(ANOMALY, &after.saturating_add(1).to_be_bytes());
        self.tree
            .range(start..key(ANOMALY + 1, b""))
            .take(limit)
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            })
            .collect()
    }

    fn anomaly_seq(&self) -> Result<u64> {
        match self.tree.get(key(META, ANOMALY_SEQ))? {
            Some(v) => Ok(u64::from_be_bytes(v.as_ref().try_into().map_err(|_| {
                StoreError::Corrupt {
                    key: "m\\0anomaly_seq".into(),
                    reason: "not 8 bytes".into(),
                }
            })?)),
            None => Ok(1),
        }
    }

    fn history(&self, entity_id: &str) -> Result<Vec<LogEntry>> {
        self.tree
            .scan_prefix(history_prefix(entity_id))
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            })
            .collect()
    }

    fn has_dead_letter(&self, topic: &str, partition: i32, offset: i64) -> Result<bool> {
        Ok(self
            .tree
            .contains_key(dead_letter_index_key(topic, partition, offset))?)
    }

    fn entities(&self) -> Box<dyn Iterator<Item = Result<EntityRecord>> + '_> {
        Box::new(self.tree.scan_prefix(key(ENTITY, b"")).map(|kv| {
            let (k, v) = kv?;
            decode(&k, &v)
        }))
    }

    fn dead_letter_at(&self, topic: &str, partition: i32, offset: i64) -> Result<Option<u64>> {
        Ok(self
            .tree
            .get(dead_letter_index_key(topic, partition, offset))?
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes)))
    }

    fn dead_letter(&self, id: u64) -> Result<Option<DeadLetter>> {
        let k = key(DEAD_LETTER, &id.to_be_bytes());
        match self.tree.get(&k)? {
            Some(v) => Ok(Some(decode(&k, &v)?)),
            None => Ok(None),
        }
    }

    fn dead_letters(&self, after: u64, limit: usize) -> Result<Vec<DeadLetter>> {
        let start = key(DEAD_LETTER, &after.saturating_add(1).to_be_bytes());
        let end = key(DEAD_LETTER + 1, b"");
        self.tree
            .range(start..end)
            .take(limit)
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            })
            .collect()
    }

    fn outbox(&self, limit: usize) -> Result<Vec<(u64, Vec<OutboxRecord>)>> {
        let id_of = |k: &[u8]| -> Result<u64> {
            let id: [u8; 8] = k[2..].try_into().map_err(|_| StoreError::Corrupt {
                key: String::from_utf8_lossy(k).into_owned(),
                reason: "outbox key has the wrong length".into(),
            })?;
            Ok(u64::from_be_bytes(id))
        };
        // Single records written before bundles existed come first.
        let mut out: Vec<(u64, Vec<OutboxRecord>)> = self
            .tree
            .scan_prefix(key(OUTBOX, b""))
            .take(limit)
            .map(|kv| {
                let (k, v) = kv?;
                Ok((id_of(&k)?, vec![decode(&k, &v)?]))
            })
            .collect::<Result<_>>()?;
        for kv in self
            .tree
            .scan_prefix(key(OUTBOX_BUNDLE, b""))
            .take(limit.saturating_sub(out.len()))
        {
            let (k, v) = kv?;
            out.push((id_of(&k)?, decode(&k, &v)?));
        }
        Ok(out)
    }

    fn remove_outbox(&self, ids: &[u64]) -> Result<()> {
        let mut b = sled::Batch::default();
        for id in ids {
            b.remove(key(OUTBOX, &id.to_be_bytes()));
            b.remove(key(OUTBOX_BUNDLE, &id.to_be_bytes()));
        }
        self.tree.apply_batch(b)?;
        Ok(())
    }

    fn parked(&self) -> Result<Vec<String>> {
        self.tree
            .scan_prefix(key(PARKED, b""))
            .keys()
            .map(|k| Ok(String::from_utf8_lossy(&k?[2..]).into_owned()))
            .collect()
    }

    fn open_dead_letters(&self) -> Result<u64> {
        Ok(self
            .tree
            .get(key(META, OPEN_DEAD_LETTERS))?
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `value` as a store value of an older format `version`.
    fn encode_as<T: Serialize>(version: u8, value: &T) -> Vec<u8> {
        let mut bytes = vec![version];
        bincode::serde::encode_into_std_write(value, &mut bytes, bincode::config::standard())
            .unwrap();
        bytes
    }

    /// A restore does not overwrite an entity that lives on here under
    /// another partition: a restored stub is dropped, a restored live copy
    /// is returned for its actor to merge; a local stub gives way.
    #[test]
    fn restore_keeps_an_entity_that_moved_here() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 16).unwrap();
        let home = |partition| Home {
            topic: "in".into(),
            partition,
        };
        let record = |id: &str, at: i32, moved: Option<i32>| {
            let mut r = EntityRecord::new(id, "t");
            r.home = Some(home(at));
            r.moved_to = moved.map(home);
            r
        };
        let live_here = record("a", 5, None);
        let stub_here = record("b", 5, Some(1));
        store
            .commit(&CommitBatch {
                entities: vec![
                    ("a".into(), encode(&live_here)),
                    ("b".into(), encode(&stub_here)),
                ],
                ..Default::default()
            })
            .unwrap();
        let changelog = Checkpoint {
            topic: "in.changelog".into(),
            partition: 1,
            next_offset: 3,
        };
        // Partition 1's changelog: a stub of a (it moved to 5, here), a live
        // a (an older copy), a live b, and c, new here.
        let restored = |r: &EntityRecord| (r.entity_id.clone(), encode(r));
        let conflicts = store
            .restore(
                &home(1),
                &[
                    restored(&record("a", 1, Some(5))),
                    restored(&record("b", 1, None)),
                    restored(&record("c", 1, None)),
                ],
                &changelog,
            )
            .unwrap();
        assert!(conflicts.is_empty(), "{conflicts:?}");
        assert_eq!(store.load_entity("a").unwrap(), Some(live_here.clone()));
        assert_eq!(store.load_entity("b").unwrap(), Some(record("b", 1, None)));
        assert_eq!(store.load_entity("c").unwrap(), Some(record("c", 1, None)));
        let conflicts = store
            .restore(&home(1), &[restored(&record("a", 1, None))], &changelog)
            .unwrap();
        assert_eq!(conflicts, vec![record("a", 1, None)]);
        assert_eq!(store.load_entity("a").unwrap(), Some(live_here));
    }

    #[test]
    fn batch_round_trip_and_format_version() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 16).unwrap();
        let rec = EntityRecord::new("lead-1", "t1");
        let batch = CommitBatch {
            entities: vec![("lead-1".into(), encode(&rec))],
            checkpoints: vec![Checkpoint {
                topic: "in".into(),
                partition: 3,
                next_offset: 42,
            }],
            ..Default::default()
        };
        store.commit(&batch).unwrap();
        futures::executor::block_on(store.flush()).unwrap();
        assert_eq!(store.load_entity("lead-1").unwrap(), Some(rec));
        assert_eq!(store.checkpoints("in").unwrap(), BTreeMap::from([(3, 42)]));
        assert!(store.checkpoints("other").unwrap().is_empty());

        let err = decode::<EntityRecord>(b"k", &[9, 1, 2]).unwrap_err();
        assert!(
            matches!(err, StoreError::UnsupportedFormat { found: 9, .. }),
            "{err}"
        );
    }

    #[test]
    fn format_1_records_are_read() {
        let prov = |offset| format_v1::Provenance {
            event_id: "e1".into(),
            event_type: "lead.updated".into(),
            topic: "in".into(),
            partition: 2,
            offset,
            occurred_at: 5,
            processed_at: 6,
        };
        let old = format_v1::EntityRecord {
            entity_id: "lead-1".into(),
            tenant_id: "t1".into(),
            state: Default::default(),
            provenance: [("stage".to_owned(), prov(7))].into(),
            high_water: None,
            log: vec![format_v1::LogEntry {
                key: crate::ordering::OrderKey {
                    version: None,
                    occurred_at: 5,
                    event_id: "e1".into(),
                },
                event_type: "lead.updated".into(),
                payload: Default::default(),
                provenance: prov(7),
            }],
            base: format_v1::Base {
                state: Default::default(),
                provenance: Default::default(),
                key: None,
            },
            applied_offsets: [("in/2".to_owned(), 7)].into(),
            applied_events: 1,
            duplicates: 0,
            redeliveries: 0,
            late_events: 0,
            too_late_events: 0,
            dead_lettered: 0,
            late_applied: 0,
            late_dropped: 0,
            parked: None,
            held: vec![],
            skipped: vec![],
        };
        let r: EntityRecord = decode(b"k", &encode_as(1, &old)).unwrap();
        assert_eq!(r.entity_id, "lead-1");
        assert_eq!(r.provenance["stage"].offset, 7);
        assert_eq!(r.provenance["stage"].settings_version, 0);
        assert_eq!(r.log[0].provenance.event_id, "e1");
        assert_eq!(r.applied_offsets["in/2"], 7);
        assert_eq!(r.ignored_events, 0);
    }

    #[test]
    fn format_2_records_are_read() {
        use crate::fold::{Base, HeldEvent, Home, LogEntry, Parked, Provenance, Skipped};
        use crate::handler::EntityState;
        use crate::ordering::OrderKey;
        // The entity record of format 2: format 3 without its last two fields.
        #[derive(Serialize)]
        struct V2 {
            entity_id: String,
            tenant_id: String,
            state: EntityState,
            provenance: BTreeMap<String, Provenance>,
            high_water: Option<OrderKey>,
            log: Vec<LogEntry>,
            base: Base,
            applied_offsets: BTreeMap<String, i64>,
            applied_events: u64,
            duplicates: u64,
            redeliveries: u64,
            late_events: u64,
            too_late_events: u64,
            dead_lettered: u64,
            late_applied: u64,
            late_dropped: u64,
            parked: Option<Parked>,
            held: Vec<HeldEvent>,
            skipped: Vec<Skipped>,
            ignored_events: u64,
            home: Option<Home>,
        }
        let old = V2 {
            entity_id: "lead-1".into(),
            tenant_id: "t1".into(),
            state: Default::default(),
            provenance: Default::default(),
            high_water: None,
            log: vec![],
            base: Default::default(),
            applied_offsets: [("in/2".to_owned(), 7)].into(),
            applied_events: 1,
            duplicates: 2,
            redeliveries: 0,
            late_events: 0,
            too_late_events: 0,
            dead_lettered: 0,
            late_applied: 0,
            late_dropped: 0,
            parked: None,
            held: vec![],
            skipped: vec![],
            ignored_events: 3,
            home: Some(Home {
                topic: "in".into(),
                partition: 2,
            }),
        };
        let r: EntityRecord = decode(b"k", &encode_as(2, &old)).unwrap();
        assert_eq!(r.entity_id, "lead-1");
        assert_eq!(r.ignored_events, 3);
        assert_eq!(r.home.as_ref().map(|h| h.partition), Some(2));
        assert_eq!((r.moved_to, r.handovers), (None, 0));

        let outbox = vec![format_v2::OutboxRecord {
            topic: "t".into(),
            key: Some(b"k".to_vec()),
            value: b"v".to_vec(),
            headers: vec![],
        }];
        for version in [1u8, 2] {
            let read: Vec<OutboxRecord> = decode(b"o", &encode_as(version, &outbox)).unwrap();
            assert_eq!(read[0].value, b"v");
            assert_eq!(read[0].partition, None);
        }
    }
}
