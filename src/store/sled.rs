//! [`SledStore`]: the store over one sled tree, so that every batch commits
//! atomically with `apply_batch` and is made durable with `flush_async`.

use self::spill::EntityPuts;
use super::filter::KeyFilter;
use super::keys::*;
use super::*;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// The sled implementation of [`Store`].
#[derive(Clone)]
pub struct SledStore {
    db: ::sled::Db,
    tree: ::sled::Tree,
    /// The spilled entities and their piece counts (from the `s` keys at
    /// open, then kept with every write), so that a write removes the
    /// pieces a record no longer needs without reading it first.
    spilled: Arc<Mutex<HashMap<String, u32>>>,
    /// The store holds single outbox records under `o` keys, written before
    /// bundles existed: set at open, cleared once `outbox` finds none (no
    /// `o` key is written any more). Until then, `outbox` reads them and a
    /// removal removes an id's `o` key with its bundle. After, neither
    /// happens: sled walks the tree for a key it does not hold, and that
    /// was about 1% of an event's instructions.
    legacy_outbox: Arc<std::sync::atomic::AtomicBool>,
    /// The entity ids the store may hold, so that a lookup of one it never
    /// held does not walk the tree ([`KeyFilter`]).
    keys: Arc<KeyFilter>,
}

impl SledStore {
    fn has_legacy_outbox(&self) -> bool {
        self.legacy_outbox
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Adds to `b` what quarantines `id`, whose restored record is corrupt:
    /// the record this store holds (or a new one) at `input`, parked with
    /// the reason, so its events wait for an operator instead of being
    /// applied to a state that lacks the lost record. An entity that lives
    /// on here under another partition is left alone.
    fn quarantine(&self, b: &mut EntityPuts, input: &Home, id: &str, reason: &str) -> Result<()> {
        let k = key(ENTITY, id.as_bytes());
        let local = match self.entity_value(&k)? {
            Some(v) => decode::<EntityRecord>(&k, &v).ok(),
            None => None,
        };
        let mut record = match local {
            Some(r)
                if r.placement.moved_to.is_none()
                    && r.placement.home.as_ref().is_some_and(|h| h != input) =>
            {
                return Ok(());
            }
            Some(r) => r,
            None => EntityRecord::new(id, ""),
        };
        record.placement = crate::model::fold::Placement {
            home: Some(input.clone()),
            moved_to: None,
        };
        if record.parking.parked.is_none() {
            let since = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            record.parking.parked = Some(crate::model::fold::Parked {
                event_id: String::new(),
                reason: format!("quarantined: its changelog record is corrupt ({reason}); its events are held until an operator releases the entity"),
                since,
            });
        }
        b.batch.insert(index_key(input, id), &[][..]);
        b.batch.insert(key(PARKED, id.as_bytes()), &[][..]);
        self.put_entity_value(b, id, &encode(&record));
        Ok(())
    }

    /// Opens (or creates) the store in `dir`. `cache_mb` bounds sled's page cache.
    ///
    /// sled locks the directory. A store of this process that was just
    /// dropped can hold the lock a little longer, until sled's background
    /// threads let go of it, so a locked directory is tried again for up to
    /// `LOCK_WAIT` (10 s) before [`StoreError::Locked`] is returned.
    pub fn open(dir: &Path, cache_mb: u64) -> Result<Self> {
        Self::open_waiting(dir, cache_mb, LOCK_WAIT)
    }

    /// [`SledStore::open`], waiting up to `lock_wait` for a locked directory.
    pub fn open_waiting(dir: &Path, cache_mb: u64, lock_wait: std::time::Duration) -> Result<Self> {
        let config = ::sled::Config::new()
            .path(dir)
            .cache_capacity(cache_mb.saturating_mul(1024 * 1024))
            // orderly flushes after every batch; a timer flush would only add fsyncs.
            .flush_every_ms(None);
        let deadline = std::time::Instant::now() + lock_wait;
        let db = loop {
            match config.open() {
                Ok(db) => break db,
                Err(e) if is_lock_conflict(&e) => {
                    if std::time::Instant::now() >= deadline {
                        return Err(StoreError::Locked {
                            dir: dir.display().to_string(),
                        });
                    }
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => return Err(e.into()),
            }
        };
        let tree = db.open_tree("orderly")?;
        let mut spilled: HashMap<String, u32> = HashMap::new();
        for k in tree.scan_prefix(key(SPILL, b"")).keys() {
            let k = k?;
            // `s\0<id>\0<n, u32 BE>`: the highest piece number plus one.
            if let Some((id, n)) = k
                .len()
                .checked_sub(5)
                .filter(|&nul| nul >= 2 && k[nul] == 0)
                .map(|nul| (&k[2..nul], &k[nul + 1..]))
            {
                let n = u32::from_be_bytes(n.try_into().unwrap_or_default()) + 1;
                let e = spilled.entry(String::from_utf8_lossy(id).into_owned()).or_default();
                *e = (*e).max(n);
            }
        }
        let legacy_outbox = tree.scan_prefix(key(OUTBOX, b"")).next().is_some();
        let store = SledStore {
            db,
            tree,
            spilled: Arc::new(Mutex::new(spilled)),
            legacy_outbox: Arc::new(legacy_outbox.into()),
            keys: Arc::default(),
        };
        store.build_operator_index()?;
        known::fill(store.tree.clone(), &store.keys);
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
        let mut b = EntityPuts::default();
        self.put_entity_value(&mut b, &record.entity_id, &encode(record));
        self.apply(b)?;
        self.tree.flush()?;
        Ok(())
    }

    /// Keys and key-plus-value bytes per key prefix (`e` for entity records,
    /// and so on; see the layout table), from a scan of the whole tree. For
    /// the benchmark's study of what the store holds.
    pub fn usage(&self) -> Result<BTreeMap<char, (u64, u64)>> {
        let mut usage = BTreeMap::new();
        for kv in self.tree.iter() {
            let (k, v) = kv?;
            let prefix = k.first().map(|&b| b as char).unwrap_or('?');
            let e: &mut (u64, u64) = usage.entry(prefix).or_default();
            e.0 += 1;
            e.1 += (k.len() + v.len()) as u64;
        }
        Ok(usage)
    }

    /// The filter of stored entity ids: its state (filling until its scan
    /// at open has finished, then complete, or off after a wrong answer:
    /// [`filter::FILLING`] and after), and how many lookups it answered
    /// "absent".
    pub fn key_filter(&self) -> (u8, u64) {
        (self.keys.state(), self.keys.skipped())
    }

    /// Writes `value` under `k` as it is, bypassing the record's encoding
    /// (tests of damaged and old values), and keeps the key filter true.
    #[cfg(test)]
    fn insert_raw(&self, k: Vec<u8>, value: Vec<u8>) -> Result<()> {
        if let [ENTITY, 0, id @ ..] = &k[..] {
            self.keys.insert(id);
        }
        self.tree.insert(k, value)?;
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
        match self.entity_value(&k)? {
            Some(v) => Ok(Some(decode(&k, &v)?)),
            None => Ok(None),
        }
    }

    fn commit(&self, batch: &CommitBatch) -> Result<Committed> {
        let mut puts = EntityPuts::default();
        for (id, bytes) in &batch.entities {
            self.put_entity_value(&mut puts, id, bytes);
        }
        let b = &mut puts.batch;
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
        // has its own id, ascending, so bundles read oldest first. Chunks are
        // compressed although they live only until published: sled rewrites
        // the leaves that hold them (their inserts and their removals), and
        // plain JSON change records made the store three times larger on
        // disk and its writes the largest system cost (BENCHMARKS.md).
        for (id, bundle) in batch.outbox_bundles()? {
            b.insert(key(OUTBOX_BUNDLE, &id.to_be_bytes()), encode_bundle(&bundle));
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
        for (home, id) in &batch.changelog_pending {
            b.insert(pending_key(home, id), &[][..]);
        }
        for (home, id) in &batch.changelog_done {
            b.remove(pending_key(home, id));
        }
        self.apply(puts)
    }

    fn changelog_pending(&self, home: &Home) -> Result<Vec<String>> {
        let prefix = pending_prefix(home);
        self.tree
            .scan_prefix(&prefix)
            .keys()
            .map(|k| Ok(String::from_utf8_lossy(&k?[prefix.len()..]).into_owned()))
            .collect()
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
    ) -> Result<Restored> {
        let mut b = EntityPuts::default();
        let mut conflicts = Vec::new();
        let mut corrupt = Vec::new();
        for (i, (id, bytes)) in records.iter().enumerate() {
            let k = key(ENTITY, id.as_bytes());
            let record: EntityRecord = match decode(&k, bytes) {
                Ok(r) => r,
                Err(e) => {
                    let reason = e.to_string();
                    self.quarantine(&mut b, input, id, &reason)?;
                    corrupt.push((i, reason));
                    continue;
                }
            };
            if let Some(old) = self.entity_value(&k)? {
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
                        b.batch.remove(index_key(h, id));
                    }
                }
            }
            b.batch.insert(
                index_key(record.placement.home.as_ref().unwrap_or(input), id),
                &[][..],
            );
            if record.parking.parked.is_some() {
                b.batch.insert(key(PARKED, id.as_bytes()), &[][..]);
            } else {
                b.batch.remove(key(PARKED, id.as_bytes()));
            }
            self.put_entity_value(&mut b, id, bytes);
        }
        b.batch.insert(
            changelog_key(&changelog.tp.topic, changelog.tp.partition),
            changelog.next_offset.to_be_bytes().to_vec(),
        );
        b.batch.remove(checkpoint_key(&input.topic, input.partition));
        self.apply(b)?;
        Ok(Restored { conflicts, corrupt })
    }

    fn purge_partition(&self, input: &Home, changelog_topic: &str) -> Result<u64> {
        // First what says the partition is here: a crash halfway leaves
        // entities that the next assignment restores over.
        let mut b = ::sled::Batch::default();
        b.remove(checkpoint_key(&input.topic, input.partition));
        b.remove(changelog_key(changelog_topic, input.partition));
        for k in self.tree.scan_prefix(pending_prefix(input)).keys() {
            b.remove(k?);
        }
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
            let mut b = EntityPuts::default();
            for k in &keys {
                let id = &k[prefix.len()..];
                self.remove_entity_value(&mut b, id);
                b.batch.remove(key(PARKED, id));
                let entity = String::from_utf8_lossy(id);
                for h in self.tree.scan_prefix(history_prefix(&entity)).keys() {
                    b.batch.remove(h?);
                }
                b.batch.remove(k.clone());
                purged += 1;
            }
            self.apply(b)?;
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

    fn history_tail(&self, entity_id: &str, limit: usize) -> Result<Vec<LogEntry>> {
        let mut newest: Vec<LogEntry> = self
            .tree
            .scan_prefix(history_prefix(entity_id))
            .rev()
            .take(limit)
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            })
            .collect::<Result<_>>()?;
        newest.reverse();
        Ok(newest)
    }

    fn has_dead_letter(&self, topic: &str, partition: i32, offset: i64) -> Result<bool> {
        Ok(self
            .tree
            .contains_key(dead_letter_index_key(topic, partition, offset))?)
    }

    fn entities(&self) -> Box<dyn Iterator<Item = Result<EntityRecord>> + '_> {
        Box::new(self.tree.scan_prefix(key(ENTITY, b"")).map(|kv| {
            let (k, v) = kv?;
            decode(&k, &self.unspill(&k, v)?)
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
        let mut out: Vec<(u64, Vec<OutboxRecord>)> = match self.has_legacy_outbox() {
            true => self
                .tree
                .scan_prefix(key(OUTBOX, b""))
                .take(limit)
                .map(|kv| {
                    let (k, v) = kv?;
                    Ok((id_of(&k)?, vec![decode(&k, &v)?]))
                })
                .collect::<Result<_>>()?,
            false => Vec::new(),
        };
        // A page of none says nothing about what is left.
        if out.is_empty() && limit > 0 {
            self.legacy_outbox
                .store(false, std::sync::atomic::Ordering::Relaxed);
        }
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
        // One removal at a time, under sled's shared lock: as one batch
        // they would take its process-wide exclusive lock, and every
        // actor's read would wait (see `put_entity_value`). They need not be atomic: a
        // bundle a crash leaves behind is published again, as is any
        // bundle published and not yet removed.
        let legacy = self.has_legacy_outbox();
        for id in ids {
            if legacy {
                self.tree.remove(key(OUTBOX, &id.to_be_bytes()))?;
            }
            self.tree.remove(key(OUTBOX_BUNDLE, &id.to_be_bytes()))?;
        }
        Ok(())
    }

    fn settle_outbox(
        &self,
        id: u64,
        unpublished: &[OutboxRecord],
        undeliverable: &[OutboxRecord],
    ) -> Result<()> {
        let mut b = ::sled::Batch::default();
        if self.has_legacy_outbox() {
            b.remove(key(OUTBOX, &id.to_be_bytes()));
        }
        if unpublished.is_empty() {
            b.remove(key(OUTBOX_BUNDLE, &id.to_be_bytes()));
        } else {
            b.insert(key(OUTBOX_BUNDLE, &id.to_be_bytes()), encode_bundle(&unpublished));
        }
        for rec in undeliverable {
            let aside = self.next_id()?;
            b.insert(key(UNDELIVERABLE, &aside.to_be_bytes()), encode(rec));
        }
        self.tree.apply_batch(b)?;
        Ok(())
    }

    fn undeliverable(&self, after: u64, limit: usize) -> Result<Vec<(u64, OutboxRecord)>> {
        self.tree
            .range(key(UNDELIVERABLE, &after.saturating_add(1).to_be_bytes())..key(UNDELIVERABLE + 1, b""))
            .take(limit)
            .map(|kv| {
                let (k, v) = kv?;
                let id = k[2..]
                    .try_into()
                    .map(u64::from_be_bytes)
                    .map_err(|_| StoreError::Corrupt {
                        key: String::from_utf8_lossy(&k).into_owned(),
                        reason: "undeliverable key has the wrong length".into(),
                    })?;
                Ok((id, decode(&k, &v)?))
            })
            .collect()
    }

    fn parked(&self) -> Result<Vec<String>> {
        self.tree
            .scan_prefix(key(PARKED, b""))
            .keys()
            .map(|k| Ok(String::from_utf8_lossy(&k?[2..]).into_owned()))
            .collect()
    }

    fn parked_page(&self, after: &str, limit: usize) -> Result<Vec<String>> {
        // Strictly after `after`: its key with a zero byte appended is the
        // first key above it.
        let mut start = key(PARKED, after.as_bytes());
        if !after.is_empty() {
            start.push(0);
        }
        self.tree
            .range(start..key(PARKED + 1, b""))
            .keys()
            .take(limit)
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

/// How long [`SledStore::open`] waits for a locked directory: long enough
/// for a store this process just dropped to let go of its lock.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Whether sled refused to open because another handle holds the lock
/// (sled 0.34 reports it as an I/O error of kind `Other` naming the lock).
fn is_lock_conflict(e: &::sled::Error) -> bool {
    matches!(e, ::sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock
        || io.to_string().contains("could not acquire lock"))
}

mod known;
mod spill;
#[cfg(test)]
mod tests;
