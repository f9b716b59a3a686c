//! Spilled entity records: an encoded record larger than [`SPILL_BYTES`] is
//! stored in pieces under `s` keys, with a marker under its `e` key, so that
//! sled never holds a node large enough for a blob file (which it keeps in
//! memory whatever its cache size). Every entity write and read of the
//! store goes through here.

use super::super::keys::*;
use super::super::*;
use super::super::filter::Lookup;
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
        // Any framed format's marker: format 7 wrote the first.
        [version, SPILLED, rest @ ..] if super::super::format::FRAMED.contains(version) && rest.len() == 8 => Some((
            u32::from_le_bytes(rest[..4].try_into().ok()?),
            u32::from_le_bytes(rest[4..].try_into().ok()?),
        )),
        _ => None,
    }
}

/// Entity writes of one sled batch: what to put in the batch, and the
/// piece counts to remember once it is applied.
#[derive(Default)]
pub(super) struct EntityPuts {
    pub(super) batch: ::sled::Batch,
    spilled: Vec<(String, u32)>,
}

impl SledStore {
    /// Adds entity `id`'s encoded record to `b`: under its `e` key, or,
    /// when larger than [`SPILL_BYTES`], in pieces under `s` keys with a
    /// marker under the `e` key. Pieces an earlier, larger record left are
    /// removed.
    pub(super) fn put_entity_value(&self, b: &mut EntityPuts, id: &str, value: &[u8]) {
        let old = lock(&self.spilled).get(id).copied().unwrap_or(0);
        // Before the batch is applied: a lookup after it must not be
        // answered "absent".
        self.keys.insert(id.as_bytes());
        let k = key(ENTITY, id.as_bytes());
        // Page the leaf in now, under sled's shared lock. sled 0.34 guards
        // every tree operation with one process-wide read-write lock once
        // any batch has been applied, and `apply_batch` holds it
        // exclusively for the whole batch: a leaf it writes that is not
        // cached would be read from the log and decoded while every reader
        // (the actors' reads of stored records above all) waits. Read
        // first, the exclusive hold is shorter: in `max --engine-only` at
        // a million keys, about 40% of the run without this and about a
        // quarter with it (BENCHMARKS.md, "sled's global lock"). Where the
        // leaf is cached, it costs a walk of the tree. An error here is
        // met again, and reported, by the batch.
        let _ = self.tree.get(&k);
        let pieces = if value.len() > SPILL_BYTES {
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
    }

    /// Removes entity `id`'s record and its pieces.
    pub(super) fn remove_entity_value(&self, b: &mut EntityPuts, id: &[u8]) {
        let id_text = String::from_utf8_lossy(id);
        let old = lock(&self.spilled).get(id_text.as_ref()).copied().unwrap_or(0);
        b.batch.remove(key(ENTITY, id));
        for n in 0..old {
            b.batch.remove(piece_key(id, n));
        }
        if old > 0 {
            b.spilled.push((id_text.into_owned(), 0));
        }
    }

    /// Applies `b`, then remembers its piece counts; reports how long sled
    /// held its lock exclusively for it.
    pub(super) fn apply(&self, b: EntityPuts) -> Result<Committed> {
        let started = std::time::Instant::now();
        self.tree.apply_batch(b.batch)?;
        let exclusive = started.elapsed();
        let mut spilled = lock(&self.spilled);
        for (id, n) in b.spilled {
            if n == 0 {
                spilled.remove(&id);
            } else {
                spilled.insert(id, n);
            }
        }
        Ok(Committed { exclusive })
    }

    /// The encoded record under entity key `k`, its pieces put together
    /// when it was spilled.
    pub(super) fn entity_value(&self, k: &[u8]) -> Result<Option<::sled::IVec>> {
        let lookup = self.keys.lookup(&k[2..]);
        if lookup == Lookup::Absent {
            return Ok(None);
        }
        match self.tree.get(k)? {
            Some(v) => {
                if lookup == Lookup::AbsentCheck {
                    self.keys.switch_off();
                    tracing::error!(
                        key = %String::from_utf8_lossy(k),
                        "the filter of stored entity ids answered \"absent\" for an entity the store holds; it is switched off, and every entity lookup goes to the store from now on (a bug: please report it)"
                    );
                }
                self.unspill(k, v).map(Some)
            }
            None => Ok(None),
        }
    }

    /// `v`, read under entity key `k`, or the record its pieces hold when
    /// it is a spill marker.
    pub(super) fn unspill(&self, k: &[u8], v: ::sled::IVec) -> Result<::sled::IVec> {
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
