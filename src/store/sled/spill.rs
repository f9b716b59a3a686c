//! Spilled entity records: an encoded record larger than [`SPILL_BYTES`] is
//! stored in pieces under `s` keys, with a marker under its `e` key, so that
//! sled never holds a node large enough for a blob file (which it keeps in
//! memory whatever its cache size). Records small enough are packed instead
//! (`pack`). Every entity write and read of the store goes through here.

use super::super::keys::*;
use super::super::*;
use super::pack::{fits, Packing, Place, Was};
use super::SledStore;
use crate::lifecycle::lock;

/// The pieces of entity `id`'s record under `s` keys: `s\0<id>\0`.
fn piece_prefix(id: &[u8]) -> Vec<u8> {
    let mut k = key(SPILL, id);
    k.push(0);
    k
}

fn piece_key(id: &[u8], n: u32) -> Vec<u8> {
    let mut k = piece_prefix(id);
    k.extend_from_slice(&n.to_be_bytes());
    k
}

/// The piece count and total length a spill marker holds, if `v` is one.
fn spill_marker(v: &[u8]) -> Option<(u32, u32)> {
    match v {
        [7 | FORMAT_VERSION, SPILLED, rest @ ..] if rest.len() == 8 => Some((
            u32::from_le_bytes(rest[..4].try_into().ok()?),
            u32::from_le_bytes(rest[4..].try_into().ok()?),
        )),
        _ => None,
    }
}

/// Entity writes of one sled batch: what to put in the batch, its packing,
/// and the piece counts to remember once it is applied. It holds the
/// store's write lock until it is applied or dropped.
pub(super) struct EntityPuts<'a> {
    pub(super) batch: ::sled::Batch,
    spilled: Vec<(String, u32)>,
    packing: Packing,
    _writing: std::sync::MutexGuard<'a, ()>,
}

/// How often a reader reads a record's marker again when the pack it names
/// went between the two reads (a batch moved the record meanwhile).
const MOVED_RETRIES: usize = 8;

impl SledStore {
    /// Starts the entity writes of one batch, taking the write lock.
    pub(super) fn entity_puts(&self) -> EntityPuts<'_> {
        EntityPuts {
            batch: ::sled::Batch::default(),
            spilled: Vec::new(),
            packing: Packing::default(),
            _writing: lock(&self.writing),
        }
    }

    /// Adds entity `id`'s encoded record to `b`: packed (`pack`), or under
    /// its `e` key, or, when larger than [`SPILL_BYTES`], in pieces under `s`
    /// keys with a marker under the `e` key. Its old pack entry becomes
    /// dead, and pieces an earlier, larger record left are removed.
    pub(super) fn put_entity_value(&self, b: &mut EntityPuts, id: &str, value: &[u8]) -> Result<()> {
        let old = lock(&self.spilled).get(id).copied().unwrap_or(0);
        let k = key(ENTITY, id.as_bytes());
        // Only a record new to the store is packed: one written again is
        // likely written again soon, and is rewritten in place under its `e`
        // key instead of leaving a dead entry in a pack every time.
        let was = self.was(&b.packing, &k, id)?;
        let packed = if was == Was::Absent && fits(id, value) {
            Some(self.pack(&mut b.packing, id, value)?)
        } else {
            None
        };
        Self::moved(&mut b.packing, id, was, packed);
        let pieces = if let Some(place) = packed {
            b.batch.insert(k, &place.marker()[..]);
            0
        } else if value.len() > SPILL_BYTES {
            let mut n = 0u32;
            for piece in value.chunks(SPILL_BYTES) {
                b.batch.insert(piece_key(id.as_bytes(), n), piece);
                n += 1;
            }
            let mut marker = vec![FORMAT_VERSION, SPILLED];
            marker.extend_from_slice(&n.to_le_bytes());
            marker.extend_from_slice(&(value.len() as u32).to_le_bytes());
            b.batch.insert(k, marker);
            n
        } else {
            b.batch.insert(k, value);
            0
        };
        for n in pieces..old {
            b.batch.remove(piece_key(id.as_bytes(), n));
        }
        if pieces != old {
            b.spilled.push((id.to_owned(), pieces));
        }
        Ok(())
    }

    /// Removes entity `id`'s record, its pack entry and its pieces.
    pub(super) fn remove_entity_value(&self, b: &mut EntityPuts, id: &[u8]) -> Result<()> {
        let id_text = String::from_utf8_lossy(id);
        let old = lock(&self.spilled).get(id_text.as_ref()).copied().unwrap_or(0);
        let k = key(ENTITY, id);
        let was = self.was(&b.packing, &k, &id_text)?;
        Self::moved(&mut b.packing, &id_text, was, None);
        b.batch.remove(k);
        for n in 0..old {
            b.batch.remove(piece_key(id, n));
        }
        if old > 0 {
            b.spilled.push((id_text.into_owned(), 0));
        }
        Ok(())
    }

    /// Completes `b`'s packing, applies it, then remembers its piece counts.
    pub(super) fn apply(&self, mut b: EntityPuts) -> Result<()> {
        self.finish_packing(&mut b.packing, &mut b.batch)?;
        self.tree.apply_batch(b.batch)?;
        let mut spilled = lock(&self.spilled);
        for (id, n) in b.spilled {
            if n == 0 {
                spilled.remove(&id);
            } else {
                spilled.insert(id, n);
            }
        }
        Ok(())
    }

    /// The encoded record under entity key `k`: from its pack, or its
    /// pieces put together when it was spilled.
    pub(super) fn entity_value(&self, k: &[u8]) -> Result<Option<::sled::IVec>> {
        for _ in 0..MOVED_RETRIES {
            let Some(v) = self.tree.get(k)? else {
                return Ok(None);
            };
            if let Some(record) = self.resolve(k, v)? {
                return Ok(Some(record));
            }
        }
        Err(StoreError::Corrupt {
            key: String::from_utf8_lossy(k).into_owned(),
            reason: format!("the pack its marker names was gone {MOVED_RETRIES} times in a row"),
        })
    }

    /// The record that `v`, read under entity key `k`, stands for: `v`
    /// itself, the record in its pack, or the record its pieces hold. `None`
    /// when its pack went since `v` was read: read `k` again.
    pub(super) fn resolve(&self, k: &[u8], v: ::sled::IVec) -> Result<Option<::sled::IVec>> {
        if let Some(place) = Place::of_marker(&v) {
            return self.unpack(k, place);
        }
        self.unspill(k, v).map(Some)
    }

    /// `v`, read under entity key `k`, or the record its pieces hold when
    /// it is a spill marker.
    fn unspill(&self, k: &[u8], v: ::sled::IVec) -> Result<::sled::IVec> {
        let Some((n, len)) = spill_marker(&v) else {
            // Stored whole: read as it is, no copy.
            return Ok(v);
        };
        let corrupt = |reason: String| StoreError::Corrupt {
            key: String::from_utf8_lossy(k).into_owned(),
            reason,
        };
        let len = len as usize;
        if len > n as usize * SPILL_BYTES {
            return Err(corrupt(format!(
                "the spill marker claims {len} bytes in {n} pieces of at most {SPILL_BYTES}"
            )));
        }
        let mut out = Vec::with_capacity(len);
        for piece in self.tree.scan_prefix(piece_prefix(&k[2..])).values().take(n as usize) {
            out.extend_from_slice(&piece?);
        }
        if out.len() != len {
            return Err(corrupt(format!(
                "the spilled record's pieces hold {} bytes, its marker says {len}",
                out.len()
            )));
        }
        Ok(out.into())
    }
}
