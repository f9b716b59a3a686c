//! Packed entity records (format 8).
//!
//! With a million entity ids in random order, every record written under
//! its own random key rewrote a leaf in a random place of sled's tree, and
//! once the leaves outgrew the cache every new id's lookup paged one in
//! (BENCHMARKS.md, "Packed entity records"). So the records a batch writes
//! for new entities are packed, in order, into packs of at most
//! [`PACK_BYTES`] under
//! ascending `k` keys, which sled appends at the right edge of the tree, and
//! the random `e` key holds only a 14-byte marker: the pack's id and the
//! place of the record's entry in it. The tree of markers stays small enough
//! for the cache.
//!
//! Only a record new to the store is packed. A record written again is
//! likely to be written again soon (a hot key), so it is stored whole under
//! its `e` key, in place, as before format 8, and its entry in the pack is
//! dead. (Rewriting hot records into new packs cost 8% on `hot-keys` and
//! left the store half larger.) A pack never changes once written: its `g`
//! key counts its entries and its dead ones, and once half of them are
//! dead, the batch that makes it so moves the live ones to its own new pack
//! and removes the old one. So the dead bytes stay below about half of the
//! packs' bytes.
//!
//! Writers hold [`SledStore`]'s write lock from the first read of an old
//! place to the batch's apply, so that no two batches move the same record.
//! Readers take no lock: a pack can go between the read of a marker and the
//! read of its pack, and a reader that finds it gone reads the marker again.

use super::super::keys::*;
use super::super::*;
use super::SledStore;

/// Where an entity's record is before a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Was {
    /// Nowhere: the entity is new to the store.
    Absent,
    /// In a pack.
    Packed(Place),
    /// Under its `e` key, whole or spilled.
    Whole,
}

/// Where a packed record is: its pack and the offset of its entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Place {
    pub(super) pack: u64,
    pub(super) offset: u32,
}

impl Place {
    /// The marker stored under the record's `e` key.
    pub(super) fn marker(self) -> [u8; 14] {
        let mut m = [0; 14];
        m[0] = FORMAT_VERSION;
        m[1] = PACKED;
        m[2..10].copy_from_slice(&self.pack.to_le_bytes());
        m[10..].copy_from_slice(&self.offset.to_le_bytes());
        m
    }

    /// The place a pack marker holds, if `v` is one.
    pub(super) fn of_marker(v: &[u8]) -> Option<Place> {
        match v {
            [FORMAT_VERSION, PACKED, rest @ ..] if rest.len() == 12 => Some(Place {
                pack: u64::from_le_bytes(rest[..8].try_into().ok()?),
                offset: u32::from_le_bytes(rest[8..].try_into().ok()?),
            }),
            _ => None,
        }
    }
}

pub(super) fn pack_key(pack: u64) -> Vec<u8> {
    key(PACK, &pack.to_be_bytes())
}

pub(super) fn count_key(pack: u64) -> Vec<u8> {
    key(PACK_COUNT, &pack.to_be_bytes())
}

/// The bytes a record's entry takes in a pack: the id's length (u16), the
/// id, the record's length (u32), the record.
fn entry_len(id: &str, record: &[u8]) -> usize {
    2 + id.len() + 4 + record.len()
}

/// Whether `id`'s `record` is packed (else it is stored under its `e` key,
/// or spilled).
pub(super) fn fits(id: &str, record: &[u8]) -> bool {
    // The pack's version byte and the entry.
    id.len() <= u16::MAX as usize && entry_len(id, record) < PACK_BYTES
}

/// An entry of a pack: its offset, its entity id and its record.
pub(super) type Entry<'a> = (u32, &'a [u8], &'a [u8]);

/// The entries of a pack's value, or why the value is not a pack.
pub(super) fn entries(pack: &[u8]) -> std::result::Result<Vec<Entry<'_>>, String> {
    let mut out = Vec::new();
    let mut at = 1;
    if pack.first() != Some(&FORMAT_VERSION) {
        return Err(format!("a pack starts with format {:?}", pack.first()));
    }
    while at < pack.len() {
        let (id, record, next) = entry_at(pack, at)?;
        out.push((at as u32, id, record));
        at = next;
    }
    Ok(out)
}

/// The entry at `at` in `pack`: its id, its record and where the next
/// entry starts.
fn entry_at(pack: &[u8], at: usize) -> std::result::Result<(&[u8], &[u8], usize), String> {
    let cut = || format!("the pack's entry at {at} is cut short");
    let id_len = pack
        .get(at..at + 2)
        .ok_or_else(cut)
        .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)?;
    let id = pack.get(at + 2..at + 2 + id_len).ok_or_else(cut)?;
    let len_at = at + 2 + id_len;
    let len = pack
        .get(len_at..len_at + 4)
        .ok_or_else(cut)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)?;
    let end = (len_at + 4).checked_add(len).ok_or_else(cut)?;
    let record = pack.get(len_at + 4..end).ok_or_else(cut)?;
    Ok((id, record, end))
}

/// A pack's `g` value: its entry count and dead entries.
fn counts(v: &[u8]) -> Option<(u32, u32)> {
    match v {
        [FORMAT_VERSION, rest @ ..] if rest.len() == 8 => Some((
            u32::from_le_bytes(rest[..4].try_into().ok()?),
            u32::from_le_bytes(rest[4..].try_into().ok()?),
        )),
        _ => None,
    }
}

fn counts_value(entries: u32, dead: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(9);
    v.push(FORMAT_VERSION);
    v.extend_from_slice(&entries.to_le_bytes());
    v.extend_from_slice(&dead.to_le_bytes());
    v
}

/// The packing of one batch: the pack being filled, the packs it filled,
/// where it put each record, and the entries it made dead.
#[derive(Default)]
pub(super) struct Packing {
    /// The pack being filled: its id, its value so far, its entry count.
    open: Option<(u64, Vec<u8>, u32)>,
    /// The packs this batch filled: their ids, values and entry counts,
    /// put into the batch once it is finished.
    new: Vec<(u64, Vec<u8>, u32)>,
    /// Each entity this batch wrote or removed: its new place (`None`: not
    /// packed, or removed).
    written: foldhash::HashMap<String, Option<Place>>,
    /// Entries made dead, by pack.
    dead: foldhash::HashMap<u64, u32>,
}

impl SledStore {
    /// Where entity `id`'s record (under `k`) is before this write, as far
    /// as the batch knows: its own earlier write, or the store.
    pub(super) fn was(&self, p: &Packing, k: &[u8], id: &str) -> Result<Was> {
        if let Some(place) = p.written.get(id) {
            return Ok(place.map_or(Was::Whole, Was::Packed));
        }
        Ok(match self.tree.get(k)? {
            None => Was::Absent,
            Some(v) => Place::of_marker(&v).map_or(Was::Whole, Was::Packed),
        })
    }

    /// Records that entity `id`, which `was` somewhere, moves to `to` in
    /// this batch (`None`: not packed, or removed): its old entry, if it
    /// had one, is dead.
    pub(super) fn moved(p: &mut Packing, id: &str, was: Was, to: Option<Place>) {
        if let Was::Packed(old) = was {
            *p.dead.entry(old.pack).or_default() += 1;
        }
        p.written.insert(id.to_owned(), to);
    }

    /// Appends `id`'s `record` to `p`'s open pack (opening one when it
    /// does not fit) and returns its place. The caller checked [`fits`].
    pub(super) fn pack(&self, p: &mut Packing, id: &str, record: &[u8]) -> Result<Place> {
        let len = entry_len(id, record);
        if p
            .open
            .as_ref()
            .is_some_and(|(_, bytes, _)| bytes.len() + len > PACK_BYTES)
        {
            close(p);
        }
        if p.open.is_none() {
            let mut bytes = Vec::with_capacity(PACK_BYTES);
            bytes.push(FORMAT_VERSION);
            p.open = Some((self.db.generate_id()?, bytes, 0));
        }
        let Some((pack, bytes, n)) = p.open.as_mut() else {
            unreachable!("a pack was just opened")
        };
        let offset = bytes.len() as u32;
        bytes.extend_from_slice(&(id.len() as u16).to_le_bytes());
        bytes.extend_from_slice(id.as_bytes());
        bytes.extend_from_slice(&(record.len() as u32).to_le_bytes());
        bytes.extend_from_slice(record);
        *n += 1;
        Ok(Place {
            pack: *pack,
            offset,
        })
    }

    /// Completes `b`'s packing before it is applied: counts the dead
    /// entries of the packs it touched, moves the live entries of those
    /// that are half dead into its own packs and removes them, and writes
    /// its own packs with their counts. Its own packs that it left half
    /// dead (an entity written twice in one batch, as a restore does) are
    /// packed again, and those it left all dead are not written at all.
    pub(super) fn finish_packing(&self, p: &mut Packing, b: &mut ::sled::Batch) -> Result<()> {
        let mut dead: Vec<(u64, u32)> = p.dead.iter().map(|(k, v)| (*k, *v)).collect();
        dead.sort_unstable();
        let ours: foldhash::HashSet<u64> = p
            .new
            .iter()
            .map(|(id, _, _)| *id)
            .chain(p.open.as_ref().map(|(id, _, _)| *id))
            .collect();
        for (pack, n) in dead {
            if ours.contains(&pack) {
                continue;
            }
            let ck = count_key(pack);
            let Some((entries, was)) = self.tree.get(&ck)?.as_deref().and_then(counts) else {
                // A pack without counts is not one this store wrote: leave it.
                continue;
            };
            let now = was.saturating_add(n).min(entries);
            if now.saturating_mul(2) < entries {
                b.insert(ck, counts_value(entries, now));
                continue;
            }
            if let Some(value) = self.tree.get(pack_key(pack))? {
                self.move_live(p, b, pack, &value)?;
            }
            b.remove(ck);
            b.remove(pack_key(pack));
        }
        close(p);
        // Packing again appends new packs to the list: it ends with the
        // last, which is all live.
        let mut i = 0;
        while i < p.new.len() {
            let (pack, value, entries) = std::mem::take(&mut p.new[i]);
            let dead = p.dead.get(&pack).copied().unwrap_or(0);
            if dead.saturating_mul(2) < entries {
                b.insert(pack_key(pack), value);
                b.insert(count_key(pack), counts_value(entries, dead));
            } else if dead < entries {
                self.move_live(p, b, pack, &value)?;
                close(p);
            }
            i += 1;
        }
        p.new.clear();
        Ok(())
    }

    /// Moves the live entries of `pack` (whose value is `value`) into
    /// `p`'s packs: those that this batch did not write and whose `e` key
    /// still names their place there, or that this batch wrote there.
    fn move_live(&self, p: &mut Packing, b: &mut ::sled::Batch, pack: u64, value: &[u8]) -> Result<()> {
        let corrupt = |reason: String| StoreError::Corrupt {
            key: String::from_utf8_lossy(&pack_key(pack)).into_owned(),
            reason,
        };
        for (offset, id, record) in entries(value).map_err(corrupt)? {
            let id = std::str::from_utf8(id)
                .map_err(|_| corrupt(format!("the entry at {offset} has an id that is not UTF-8")))?;
            let here = Some(Place { pack, offset });
            let k = key(ENTITY, id.as_bytes());
            let live = match p.written.get(id) {
                Some(place) => *place == here,
                None => self.tree.get(&k)?.and_then(|v| Place::of_marker(&v)) == here,
            };
            if live {
                let to = self.pack(p, id, record)?;
                b.insert(k, &to.marker()[..]);
                p.written.insert(id.to_owned(), Some(to));
            }
        }
        Ok(())
    }

    /// The record a pack marker under `k` names, or `None` when its pack is
    /// gone (moved by a batch since the marker was read: read it again).
    pub(super) fn unpack(&self, k: &[u8], place: Place) -> Result<Option<::sled::IVec>> {
        let Some(pack) = self.tree.get(pack_key(place.pack))? else {
            return Ok(None);
        };
        let (id, record, _) =
            entry_at(&pack, place.offset as usize).map_err(|reason| StoreError::Corrupt {
                key: String::from_utf8_lossy(k).into_owned(),
                reason: format!("its pack {}: {reason}", place.pack),
            })?;
        if id != &k[2..] {
            return Err(StoreError::Corrupt {
                key: String::from_utf8_lossy(k).into_owned(),
                reason: format!(
                    "its pack {} holds entity {:?} at {}",
                    place.pack,
                    String::from_utf8_lossy(id),
                    place.offset
                ),
            });
        }
        let start = record.as_ptr() as usize - pack.as_ptr() as usize;
        Ok(Some(pack.subslice(start, record.len())))
    }
}

/// Closes `p`'s open pack: no more entries go into it.
fn close(p: &mut Packing) {
    if let Some(open) = p.open.take() {
        p.new.push(open);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// A stored value as the store writes records: framed, plain codec, so
    /// that no value looks like a marker.
    fn value(id: u8, version: u8, len: usize) -> Vec<u8> {
        let mut v = vec![FORMAT_VERSION, 0, id, version];
        v.resize(len.max(4), id ^ version);
        v
    }

    fn id(n: u8) -> String {
        format!("entity-{n}")
    }

    /// What the store holds: every entity's value through the read path,
    /// and, per pack, its counts against the entries no marker names.
    fn check(store: &SledStore, model: &BTreeMap<String, Vec<u8>>) {
        for n in 0..ENTITIES {
            let k = key(ENTITY, id(n).as_bytes());
            let got = store.entity_value(&k).unwrap().map(|v| v.to_vec());
            assert_eq!(got.as_ref(), model.get(&id(n)), "{}", id(n));
        }
        let packs: Vec<(::sled::IVec, ::sled::IVec)> = store
            .tree
            .scan_prefix(key(PACK, b""))
            .collect::<std::result::Result<_, _>>()
            .unwrap();
        let counted = store.tree.scan_prefix(key(PACK_COUNT, b"")).count();
        assert_eq!(counted, packs.len(), "every pack has its counts, and only packs");
        for (k, v) in packs {
            let pack = u64::from_be_bytes(k[2..].try_into().unwrap());
            let (entries_n, dead) = counts(&store.tree.get(count_key(pack)).unwrap().unwrap()).unwrap();
            let entries = entries(&v).unwrap();
            assert_eq!(entries.len() as u32, entries_n, "pack {pack}'s entry count");
            let truly_dead = entries
                .iter()
                .filter(|(offset, id, _)| {
                    let marker = store.tree.get(key(ENTITY, id)).unwrap();
                    marker.and_then(|m| Place::of_marker(&m))
                        != Some(Place {
                            pack,
                            offset: *offset,
                        })
                })
                .count() as u32;
            assert_eq!(dead, truly_dead, "pack {pack}'s dead count");
            assert!(dead * 2 < entries_n, "pack {pack} is half dead and was not compacted");
        }
        let scanned: BTreeMap<String, ()> = store
            .tree
            .scan_prefix(key(ENTITY, b""))
            .keys()
            .map(|k| (String::from_utf8(k.unwrap()[2..].to_vec()).unwrap(), ()))
            .collect();
        assert!(scanned.keys().eq(model.keys()), "the e keys are the model's entities");
    }

    const ENTITIES: u8 = 10;

    #[derive(Clone, Debug)]
    enum Op {
        Put(u8, usize),
        Remove(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..ENTITIES, prop_oneof![3 => 4usize..1500, 1 => 5000usize..9000])
                .prop_map(|(n, len)| Op::Put(n, len)),
            1 => (0..ENTITIES).prop_map(Op::Remove),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Any batches of writes and removals, an entity written more than
        /// once in a batch included: every record reads back as last
        /// written, each pack's dead count is the number of its entries no
        /// marker names, and no pack stays half dead.
        #[test]
        fn packs_hold_the_last_write_and_count_their_dead(
            batches in proptest::collection::vec(proptest::collection::vec(op(), 1..8), 1..12)
        ) {
            let dir = tempfile::tempdir().unwrap();
            let store = SledStore::open(dir.path(), 16).unwrap();
            let mut model = BTreeMap::new();
            for (version, batch) in batches.iter().enumerate() {
                let mut b = store.entity_puts();
                for op in batch {
                    match *op {
                        Op::Put(n, len) => {
                            let v = value(n, version as u8, len);
                            store.put_entity_value(&mut b, &id(n), &v).unwrap();
                            model.insert(id(n), v);
                        }
                        Op::Remove(n) => {
                            store.remove_entity_value(&mut b, id(n).as_bytes()).unwrap();
                            model.remove(&id(n));
                        }
                    }
                }
                store.apply(b).unwrap();
                check(&store, &model);
            }
        }
    }

    /// New records are packed, a record written again is stored whole in
    /// place, and a pack half of whose records were rewritten moves the
    /// rest into a new pack and goes.
    #[test]
    fn a_half_dead_pack_moves_its_live_records_and_goes() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 16).unwrap();
        let mut model = BTreeMap::new();
        let mut b = store.entity_puts();
        for n in 0..ENTITIES {
            let v = value(n, 0, 300);
            store.put_entity_value(&mut b, &id(n), &v).unwrap();
            model.insert(id(n), v);
        }
        store.apply(b).unwrap();
        let packs = || store.tree.scan_prefix(key(PACK, b"")).keys().map(|k| k.unwrap()).collect::<Vec<_>>();
        let first = packs();
        assert_eq!(first.len(), 1, "ten records of 300 bytes share one pack");
        let marker = store.tree.get(key(ENTITY, id(0).as_bytes())).unwrap().unwrap();
        assert_eq!(marker.len(), 14, "the e key holds the marker");
        check(&store, &model);
        // Rewrite four: stored whole, the pack is four tenths dead.
        for n in 0..4 {
            let mut b = store.entity_puts();
            let v = value(n, 1, 300);
            store.put_entity_value(&mut b, &id(n), &v).unwrap();
            store.apply(b).unwrap();
            model.insert(id(n), v.clone());
            assert_eq!(store.tree.get(key(ENTITY, id(n).as_bytes())).unwrap().unwrap(), v);
        }
        assert_eq!(packs(), first);
        check(&store, &model);
        // The fifth makes it half dead: the other five move.
        let mut b = store.entity_puts();
        let v = value(4, 1, 300);
        store.put_entity_value(&mut b, &id(4), &v).unwrap();
        store.apply(b).unwrap();
        model.insert(id(4), v);
        let now = packs();
        assert_eq!(now.len(), 1);
        assert_ne!(now, first, "the live records moved to a new pack");
        check(&store, &model);
    }

    /// A record of format 7 (stored whole under its `e` key) still reads,
    /// and is rewritten in place; a format-7 spill marker still reads.
    #[test]
    fn format_7_records_read_and_stay_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 16).unwrap();
        let mut old = crate::model::fold::EntityRecord::new("lead-1", "t1");
        old.counters.applied_events = 3;
        let mut v7 = encode(&old);
        v7[0] = 7;
        store.tree.insert(key(ENTITY, b"lead-1"), v7).unwrap();
        assert_eq!(store.load_entity("lead-1").unwrap().as_ref(), Some(&old));
        old.counters.applied_events = 4;
        let mut b = store.entity_puts();
        store.put_entity_value(&mut b, "lead-1", &encode(&old)).unwrap();
        store.apply(b).unwrap();
        assert_eq!(store.tree.get(key(ENTITY, b"lead-1")).unwrap().unwrap(), encode(&old));
        assert_eq!(store.load_entity("lead-1").unwrap().as_ref(), Some(&old));
        // A format-7 spill marker and its pieces.
        let whole = value(2, 0, 9000);
        let mut marker = vec![7, SPILLED];
        marker.extend_from_slice(&2u32.to_le_bytes());
        marker.extend_from_slice(&(whole.len() as u32).to_le_bytes());
        for (n, piece) in whole.chunks(SPILL_BYTES).enumerate() {
            let mut k = key(SPILL, b"lead-2");
            k.push(0);
            k.extend_from_slice(&(n as u32).to_be_bytes());
            store.tree.insert(k, piece).unwrap();
        }
        store.tree.insert(key(ENTITY, b"lead-2"), marker).unwrap();
        let read = store.entity_value(&key(ENTITY, b"lead-2")).unwrap().unwrap();
        assert_eq!(read.as_ref(), &whole[..]);
    }

    /// A marker whose pack holds another entity at its place, or whose
    /// place is past the pack's end, is a Corrupt error naming the key.
    #[test]
    fn a_marker_that_names_the_wrong_entry_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 16).unwrap();
        let mut b = store.entity_puts();
        store.put_entity_value(&mut b, &id(1), &value(1, 0, 100)).unwrap();
        store.apply(b).unwrap();
        let marker = store.tree.get(key(ENTITY, id(1).as_bytes())).unwrap().unwrap();
        store.tree.insert(key(ENTITY, id(2).as_bytes()), marker.clone()).unwrap();
        let err = store.entity_value(&key(ENTITY, id(2).as_bytes())).unwrap_err();
        assert!(matches!(&err, StoreError::Corrupt { key, .. } if key.contains("entity-2")), "{err}");
        let mut past = Place::of_marker(&marker).unwrap();
        past.offset = 5000;
        store.tree.insert(key(ENTITY, id(1).as_bytes()), &past.marker()[..]).unwrap();
        let err = store.entity_value(&key(ENTITY, id(1).as_bytes())).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        // decode alone refuses a marker.
        assert!(matches!(
            decode::<crate::model::fold::EntityRecord>(b"e\0x", &past.marker()),
            Err(StoreError::Corrupt { .. })
        ));
    }

    /// Readers take no lock: while batches move records from pack to pack,
    /// a reader of records that never change reads each of them every time.
    #[test]
    fn readers_see_every_record_while_packs_are_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 16).unwrap();
        // Pairs: even ids never change, odd ids are rewritten, which makes
        // the packs half dead and moves the even ones again and again.
        let stable = |n: u32| (format!("stable-{n}"), value((n % 200) as u8, 7, 200 + n as usize % 300));
        let writer = {
            let store = store.clone();
            std::thread::spawn(move || {
                for round in 0..60u32 {
                    let mut b = store.entity_puts();
                    for n in 0..200u32 {
                        if round == 0 {
                            let (id, v) = stable(n);
                            store.put_entity_value(&mut b, &id, &v).unwrap();
                        }
                        // A new id every round, half removed the next one.
                        let fresh = format!("churn-{round}-{n}");
                        store.put_entity_value(&mut b, &fresh, &value(1, 1, 300)).unwrap();
                        if round > 0 && n % 2 == 0 {
                            store
                                .remove_entity_value(&mut b, format!("churn-{}-{n}", round - 1).as_bytes())
                                .unwrap();
                        }
                    }
                    store.apply(b).unwrap();
                }
            })
        };
        // Wait for the stable records, then read them until the writer ends.
        while store.tree.get(key(ENTITY, b"stable-199")).unwrap().is_none() {
            std::thread::yield_now();
        }
        let mut reads = 0;
        while !writer.is_finished() || reads == 0 {
            for n in 0..200 {
                let (id, v) = stable(n);
                let got = store.entity_value(&key(ENTITY, id.as_bytes())).unwrap();
                assert_eq!(got.as_deref(), Some(&v[..]), "{id}");
                reads += 1;
            }
        }
        writer.join().unwrap();
        let moved = store.tree.scan_prefix(key(PACK, b"")).count();
        assert!(moved > 0 && reads > 0);
    }
}
