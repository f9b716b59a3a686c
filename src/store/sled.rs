//! [`SledStore`]: the store over one sled tree, so that every batch commits
//! atomically with `apply_batch` and is made durable with `flush_async`.

use super::keys::*;
use super::*;
use std::path::Path;

/// The sled implementation of [`Store`].
#[derive(Clone)]
pub struct SledStore {
    db: ::sled::Db,
    tree: ::sled::Tree,
}

impl SledStore {
    /// Opens (or creates) the store in `dir`. `cache_mb` bounds sled's page cache.
    pub fn open(dir: &Path, cache_mb: u64) -> Result<Self> {
        let db = ::sled::Config::new()
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
        let mut b = ::sled::Batch::default();
        for r in self.entities() {
            let r = r?;
            if r.parking.parked.is_some() {
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
                .filter(|d| d.status == crate::model::dead_letter::OPEN)
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
        let mut b = ::sled::Batch::default();
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
        // A few keys per batch: per-message keys cost an insert and a remove
        // per event (a third of the store's work in the bench), and one key
        // per batch grows past sled's inline limit, so that every batch
        // wrote (and later deleted) a blob file. Each chunk after the first
        // takes the next id, so bundles still read oldest first.
        let mut id = batch.outbox_id;
        for (i, chunk) in outbox_chunks(&batch.outbox).enumerate() {
            if i > 0 {
                id = self.next_id()?;
            }
            b.insert(key(OUTBOX_BUNDLE, &id.to_be_bytes()), encode(&chunk));
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
            k.extend_from_slice(&crate::model::history::encode_key(&entry.key));
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
                checkpoint_key(&cp.tp.topic, cp.tp.partition),
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
                changelog_key(&cp.tp.topic, cp.tp.partition),
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
            let home = Home::new(
                String::from_utf8_lossy(&rest[..nul]).into_owned(),
                i32::from_be_bytes(p),
            );
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
        let mut b = ::sled::Batch::default();
        let mut conflicts = Vec::new();
        for (id, bytes) in records {
            let k = key(ENTITY, id.as_bytes());
            let record: EntityRecord = decode(&k, bytes)?;
            if let Some(old) = self.tree.get(&k)? {
                if let Ok(old) = decode::<EntityRecord>(&k, &old) {
                    let elsewhere = old
                        .placement.home
                        .as_ref()
                        .filter(|h| Some(*h) != record.placement.home.as_ref());
                    if elsewhere.is_some() && old.placement.moved_to.is_none() {
                        // The entity lives on under another partition here.
                        if record.placement.moved_to.is_none() {
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
                index_key(record.placement.home.as_ref().unwrap_or(input), id),
                &[][..],
            );
            if record.parking.parked.is_some() {
                b.insert(key(PARKED, id.as_bytes()), &[][..]);
            } else {
                b.remove(key(PARKED, id.as_bytes()));
            }
            b.insert(k, bytes.as_slice());
        }
        b.insert(
            changelog_key(&changelog.tp.topic, changelog.tp.partition),
            changelog.next_offset.to_be_bytes().to_vec(),
        );
        b.remove(checkpoint_key(&input.topic, input.partition));
        self.tree.apply_batch(b)?;
        Ok(conflicts)
    }

    fn purge_partition(&self, input: &Home, changelog_topic: &str) -> Result<u64> {
        // First what says the partition is here: a crash halfway leaves
        // entities that the next assignment restores over.
        let mut b = ::sled::Batch::default();
        b.remove(checkpoint_key(&input.topic, input.partition));
        b.remove(changelog_key(changelog_topic, input.partition));
        self.tree.apply_batch(b)?;
        let prefix = index_prefix(input);
        let mut purged = 0;
        loop {
            let keys: Vec<::sled::IVec> = self
                .tree
                .scan_prefix(&prefix)
                .keys()
                .take(1000)
                .collect::<std::result::Result<_, _>>()?;
            if keys.is_empty() {
                break;
            }
            let mut b = ::sled::Batch::default();
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
        let mut b = ::sled::Batch::default();
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

/// Outbox bundles stay below this many bytes (about). sled writes a node
/// larger than a quarter of its 512 KiB segment to a blob file of its own,
/// and a leaf holds up to 16 keys, so 16 chunks must fit in 128 KiB.
const OUTBOX_CHUNK_BYTES: usize = 6 * 1024;

/// `outbox` in order, in chunks of about [`OUTBOX_CHUNK_BYTES`] (a record
/// larger than that is a chunk alone).
fn outbox_chunks(outbox: &[OutboxRecord]) -> impl Iterator<Item = &[OutboxRecord]> {
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
                bytes += r.topic.len()
                    + r.key.as_ref().map_or(0, Vec::len)
                    + r.value.len()
                    + r.headers.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
                    + 16;
                first || bytes <= OUTBOX_CHUNK_BYTES
            })
            .count();
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        Some(chunk)
    })
}

#[cfg(test)]
mod tests {
    use super::super::format::{format_v1, format_v2, format_v3, format_v4};
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
        let home = |partition| Home::new("in", partition);
        let record = |id: &str, at: i32, moved: Option<i32>| {
            let mut r = EntityRecord::new(id, "t");
            r.placement.home = Some(home(at));
            r.placement.moved_to = moved.map(home);
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
            tp: crate::model::position::TopicPartition::new("in.changelog", 1),
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
            tp: crate::model::position::TopicPartition::new("in", 3),
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
                key: crate::model::ordering::OrderKey {
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
        assert_eq!(r.counters.ignored_events, 0);
    }

    /// A format-3 entity record: flat, every counter set to a distinct value.
    fn format_3_record() -> format_v3::EntityRecord {
        format_v3::EntityRecord {
            entity_id: "lead-1".into(),
            tenant_id: "t1".into(),
            state: Default::default(),
            provenance: Default::default(),
            high_water: None,
            log: vec![],
            base: Default::default(),
            applied_offsets: [("in/2".to_owned(), 9)].into(),
            applied_events: 1,
            duplicates: 2,
            redeliveries: 3,
            late_events: 4,
            too_late_events: 5,
            dead_lettered: 6,
            late_applied: 7,
            late_dropped: 8,
            parked: None,
            held: vec![],
            skipped: vec![],
            ignored_events: 12,
            home: Some(crate::model::fold::Home::new("in", 2)),
            moved_to: None,
            handovers: 0,
        }
    }

    #[test]
    fn format_2_records_are_read() {
        // Format 2 is format 3 without its last two fields, `moved_to` and
        // `handovers`; with both at their defaults, each is one zero byte.
        let mut bytes = encode_as(3, &format_3_record());
        assert_eq!(bytes.split_off(bytes.len() - 2), [0, 0]);
        bytes[0] = 2;
        let r: EntityRecord = decode(b"k", &bytes).unwrap();
        assert_eq!(r.entity_id, "lead-1");
        assert_eq!(r.counters.ignored_events, 12);
        assert_eq!(r.placement.home.as_ref().map(|h| h.partition), Some(2));
        assert_eq!((r.placement.moved_to, r.counters.handovers), (None, 0));

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

    /// Format 4 grouped the flat fields of format 3 into counters, parking
    /// and placement; a format-3 record reads with every value in its group.
    #[test]
    fn format_3_records_are_read() {
        use crate::model::fold::{HeldEvent, Home, Origin, Parked, Skipped};
        let home = |partition| Home::new("in", partition);
        let held = HeldEvent {
            event: crate::model::envelope::Event {
                event_id: "e9".into(),
                event_type: "lead.updated".into(),
                entity_id: "lead-1".into(),
                tenant_id: "t1".into(),
                occurred_at: 9,
                version: None,
                payload: Default::default(),
            },
            origin: Origin::new(crate::model::position::TopicPartition::new("in", 2), 9),
        };
        let old = format_v3::EntityRecord {
            parked: Some(Parked {
                event_id: "e8".into(),
                reason: "late".into(),
                since: 10,
            }),
            held: vec![held.clone()],
            skipped: vec![Skipped {
                event_id: "e7".into(),
                event_type: "lead.updated".into(),
                reason: "boom".into(),
                at: 11,
            }],
            moved_to: Some(home(5)),
            handovers: 13,
            ..format_3_record()
        };
        let r: EntityRecord = decode(b"k", &encode_as(3, &old)).unwrap();
        let c = &r.counters;
        assert_eq!(
            (
                c.applied_events,
                c.duplicates,
                c.redeliveries,
                c.late_events,
                c.too_late_events,
                c.dead_lettered,
                c.late_applied,
                c.late_dropped,
                c.ignored_events,
                c.handovers
            ),
            (1, 2, 3, 4, 5, 6, 7, 8, 12, 13)
        );
        assert_eq!(r.parking.parked.as_ref().map(|p| p.since), Some(10));
        assert_eq!(r.parking.held, vec![held]);
        assert_eq!(r.parking.skipped[0].reason, "boom");
        assert_eq!(r.placement.home, Some(home(2)));
        assert_eq!(r.placement.moved_to, Some(home(5)));
        assert_eq!(r.applied_offsets["in/2"], 9);

        // Read, then written again: the current format, the same record.
        let again: EntityRecord = decode(b"k", &encode(&r)).unwrap();
        assert_eq!(encode(&r)[0], FORMAT_VERSION);
        assert_eq!(again, r);
    }

    /// Byte fields are written as one slice; the layout is the one a
    /// `Vec<u8>` written element by element had, so older outboxes read.
    #[test]
    fn outbox_bytes_keep_their_layout() {
        #[derive(Serialize)]
        struct Plain {
            topic: String,
            key: Option<Vec<u8>>,
            value: Vec<u8>,
            headers: Vec<(String, Vec<u8>)>,
            partition: Option<i32>,
        }
        let record = OutboxRecord {
            topic: "t".into(),
            key: Some(vec![0, 1, 255]),
            value: (0..=255).collect(),
            headers: vec![("traceparent".into(), b"00-ab".to_vec()), ("h".into(), vec![])],
            partition: Some(3),
        };
        let plain = Plain {
            topic: record.topic.clone(),
            key: record.key.clone(),
            value: record.value.clone(),
            headers: record.headers.clone(),
            partition: record.partition,
        };
        assert_eq!(encode(&record), encode(&plain));
        let back: OutboxRecord = decode(b"o", &encode(&plain)).unwrap();
        assert_eq!(back, record);
    }

    /// Format 5 stores one provenance per writing event; a format-4 record
    /// (one per field) reads the same, and the new body is smaller.
    #[test]
    fn format_4_records_are_read_and_format_5_is_smaller() {
        use crate::model::fold::Provenance;
        let prov = |event: &str, offset| Provenance {
            event_id: event.into(),
            event_type: "lead.updated".into(),
            topic: "in".into(),
            partition: 2,
            offset,
            occurred_at: 5,
            processed_at: 6,
            settings_version: 1,
        };
        let fields: BTreeMap<String, Provenance> = [
            ("email".to_owned(), prov("e1", 7)),
            ("name".to_owned(), prov("e2", 8)),
            ("stage".to_owned(), prov("e1", 7)),
            ("phone".to_owned(), prov("e1", 7)),
        ]
        .into();
        let old = format_v4::EntityRecord {
            entity_id: "lead-1".into(),
            tenant_id: "t1".into(),
            state: Default::default(),
            provenance: fields.clone(),
            high_water: None,
            log: vec![],
            base: format_v4::Base {
                provenance: [("email".to_owned(), prov("e0", 3))].into(),
                ..Default::default()
            },
            applied_offsets: [("in/2".to_owned(), 8)].into(),
            counters: crate::model::fold::Counters {
                applied_events: 2,
                ..Default::default()
            },
            parking: Default::default(),
            placement: Default::default(),
        };
        let v4 = encode_as(4, &old);
        let r: EntityRecord = decode(b"k", &v4).unwrap();
        assert_eq!(r.provenance, fields);
        assert_eq!(r.base.provenance["email"].event_id, "e0");
        assert_eq!(r.counters.applied_events, 2);
        let v5 = encode(&r);
        assert_eq!(decode::<EntityRecord>(b"k", &v5).unwrap(), r);
        assert!(v5.len() < v4.len(), "{} >= {}", v5.len(), v4.len());
    }

    /// A large batch's outbox is written in chunks, each under the chunk
    /// size unless one record alone is over it; they read back oldest
    /// first, all of them, in order.
    #[test]
    fn a_large_outbox_is_written_in_chunks_read_in_order() {
        let record = |i: u32, len: usize| OutboxRecord {
            topic: "changes".into(),
            key: Some(i.to_be_bytes().to_vec()),
            value: vec![7; len],
            headers: vec![],
            partition: None,
        };
        let mut outbox: Vec<OutboxRecord> = (0..400).map(|i| record(i, 1_000)).collect();
        outbox.insert(200, record(9_999, 200_000));
        let chunks: Vec<_> = outbox_chunks(&outbox).collect();
        assert!(chunks.len() >= 60, "{}", chunks.len());
        for c in &chunks {
            let bytes: usize = c.iter().map(|r| r.value.len()).sum();
            assert!(bytes <= OUTBOX_CHUNK_BYTES || c.len() == 1, "{bytes}");
        }
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 16).unwrap();
        let batch = CommitBatch {
            outbox: outbox.clone(),
            outbox_id: store.next_id().unwrap(),
            ..Default::default()
        };
        store.commit(&batch).unwrap();
        let bundles = store.outbox(1_000).unwrap();
        assert_eq!(bundles.len(), chunks.len());
        let read: Vec<OutboxRecord> = bundles.into_iter().flat_map(|(_, b)| b).collect();
        assert_eq!(read, outbox);
    }
}
