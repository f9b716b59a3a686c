//! The store's [`KeyFilter`]: filled from the stored entity keys by a
//! thread at open, and with every entity write after.

use super::super::filter::KeyFilter;
use super::super::keys::*;
use std::sync::{Arc, Weak};

/// Adds every stored entity id to `filter` on a thread of its own, then
/// marks it complete. Until then lookups go to sled, so a large store opens
/// as fast as before. The thread stops when the store is dropped (its last
/// handle drops the filter), so it does not hold sled's lock for long. A
/// scan that fails leaves the filter incomplete: slower, never wrong.
pub(super) fn fill(tree: ::sled::Tree, filter: &Arc<KeyFilter>) {
    let weak: Weak<KeyFilter> = Arc::downgrade(filter);
    let spawned = std::thread::Builder::new()
        .name("orderly-key-scan".into())
        .spawn(move || scan(&tree, &weak));
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the scan of stored entity ids; every entity lookup goes to the store");
    }
}

fn scan(tree: &::sled::Tree, weak: &Weak<KeyFilter>) {
    let started = std::time::Instant::now();
    let mut n = 0u64;
    for k in tree.scan_prefix(key(ENTITY, b"")).keys() {
        let Some(filter) = weak.upgrade() else {
            return;
        };
        match k {
            Ok(k) => filter.insert(&k[2..]),
            Err(e) => {
                tracing::warn!(error = %e, "the scan of stored entity ids failed; every entity lookup goes to the store");
                return;
            }
        }
        n += 1;
    }
    if let Some(filter) = weak.upgrade() {
        filter.mark_complete();
        tracing::info!(
            entities = n,
            seconds = started.elapsed().as_secs_f64(),
            filter_bytes = filter.bytes(),
            "stored entity ids scanned: lookups of entities the store never held skip it"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::filter::{COMPLETE, OFF};
    use super::super::super::{encode, CommitBatch, Store};
    use super::super::SledStore;
    use crate::model::fold::EntityRecord;

    fn commit(store: &SledStore, ids: impl Iterator<Item = String>) {
        let entities = ids
            .map(|id| {
                let bytes = encode(&EntityRecord::new(&id, "t"));
                (id, bytes)
            })
            .collect();
        store
            .commit(&CommitBatch {
                entities,
                ..Default::default()
            })
            .unwrap();
    }

    fn wait_complete(store: &SledStore) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while store.key_filter().0 != COMPLETE {
            assert!(std::time::Instant::now() < deadline, "the key scan never finished");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// Entities written before the store was opened (found by the scan)
    /// and after (added with their batch) are read; entities it never held
    /// are answered "absent" without a lookup.
    #[test]
    fn stored_entities_are_found_and_absent_ones_skip_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 16).unwrap();
        wait_complete(&store);
        commit(&store, (0..3_000).map(|i| format!("lead-{i}")));
        assert!(store.load_entity("lead-7").unwrap().is_some());
        assert_eq!(store.load_entity("appt-7").unwrap(), None);
        assert_eq!(store.key_filter().1, 1);
        drop(store);

        let store = SledStore::open(dir.path(), 16).unwrap();
        wait_complete(&store);
        commit(&store, (0..10).map(|i| format!("appt-{i}")));
        for i in 0..3_000 {
            let id = format!("lead-{i}");
            let r = store.load_entity(&id).unwrap();
            assert_eq!(r.map(|r| r.entity_id), Some(id));
        }
        for i in 0..10 {
            assert!(store.load_entity(&format!("appt-{i}")).unwrap().is_some());
        }
        for i in 0..1_000 {
            assert_eq!(store.load_entity(&format!("lead-x{i}")).unwrap(), None);
        }
        let (state, skipped) = store.key_filter();
        assert_eq!(state, COMPLETE);
        // A few false positives went to the store; most did not.
        assert!(skipped >= 950, "{skipped} of 1,000 absent lookups skipped the store");
    }

    /// An entity written past the filter (what a bug would do) is answered
    /// "absent" at most `CHECK_EVERY` times: the check finds it, the filter
    /// is switched off, and every lookup goes to the store after.
    #[test]
    fn a_wrong_absent_answer_is_caught_and_switches_the_filter_off() {
        use super::super::super::filter::CHECK_EVERY;
        use super::super::super::keys::{key, ENTITY};
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 16).unwrap();
        wait_complete(&store);
        commit(&store, std::iter::once("lead-1".to_owned()));
        for i in 0..10 {
            assert_eq!(store.load_entity(&format!("absent-{i}")).unwrap(), None);
        }
        store
            .tree
            .insert(key(ENTITY, b"ghost"), encode(&EntityRecord::new("ghost", "t")))
            .unwrap();
        let misses = (0..=CHECK_EVERY)
            .take_while(|_| store.load_entity("ghost").unwrap().is_none())
            .count() as u64;
        assert!(misses < CHECK_EVERY, "{misses} wrong answers before the check");
        assert_eq!(store.key_filter().0, OFF);
        let skipped = store.key_filter().1;
        assert!(store.load_entity("ghost").unwrap().is_some());
        assert_eq!(store.load_entity("absent-0").unwrap(), None);
        assert_eq!(store.key_filter(), (OFF, skipped));
    }
}
