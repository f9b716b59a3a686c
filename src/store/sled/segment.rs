//! The size of sled's log segments: larger for a new store, kept for an
//! existing one (sled refuses to open a store with another size).
//!
//! sled writes a node larger than a quarter of a segment to a blob file of
//! its own, so the segment size bounds how large the outbox's bundles may
//! be, and the bundles' size decides how many bytes sled writes for them:
//! each bundle is a fragment of the rightmost leaf of their key range, and
//! that leaf is written whole every 10 fragments and when it splits at 17
//! keys, whatever its keys' sizes. Fewer, larger bundles are fewer leaf
//! rewrites (BENCHMARKS.md, "Larger outbox bundles").

use std::path::Path;

/// The segment size of a store this orderly creates: 8 MiB, so that a leaf
/// of 17 bundles of [`OUTBOX_CHUNK_MAX`] stays far below a quarter of it.
pub const NEW_STORE_SEGMENT_BYTES: usize = 8 * 1024 * 1024;

/// sled's default, which every store created before 8 MiB segments has.
pub const SLED_DEFAULT_SEGMENT_BYTES: usize = 512 * 1024;

/// The most bytes of outbox records a bundle takes, whatever the segment
/// size: 24 KiB wrote as few bytes per event as 96 KiB, and 384 KiB more.
pub const OUTBOX_CHUNK_MAX: usize = 24 * 1024;

/// The segment size to open the store in `dir` with: the one its sled
/// `conf` file records; sled's default for a store whose `conf` cannot be
/// read (every store before 8 MiB segments used it); and
/// [`NEW_STORE_SEGMENT_BYTES`] where there is no store yet.
pub(super) fn segment_size(dir: &Path) -> usize {
    match std::fs::read(dir.join("conf")) {
        Ok(conf) => recorded(&conf).unwrap_or(SLED_DEFAULT_SEGMENT_BYTES),
        Err(_) if dir.join("db").exists() => SLED_DEFAULT_SEGMENT_BYTES,
        Err(_) => NEW_STORE_SEGMENT_BYTES,
    }
}

/// The `segment_size: N` line of sled's `conf` file (text lines, then a
/// 4-byte checksum).
fn recorded(conf: &[u8]) -> Option<usize> {
    let text = conf.get(..conf.len().checked_sub(4)?)?;
    std::str::from_utf8(text)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("segment_size: "))
        .and_then(|n| n.trim().parse().ok())
}

/// The most bytes of outbox records in one bundle, for a store of
/// `segment` bytes per segment: 17 bundles (a leaf about to split) within
/// a quarter of a segment, with a margin for their framing, in whole KiB,
/// and at most [`OUTBOX_CHUNK_MAX`]. 6 KiB for sled's default segments,
/// as before 8 MiB segments.
pub fn outbox_chunk_bytes(segment: usize) -> usize {
    (segment / 4 / 20 / 1024 * 1024).clamp(1024, OUTBOX_CHUNK_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_fit_a_leaf_below_the_blob_threshold() {
        assert_eq!(outbox_chunk_bytes(SLED_DEFAULT_SEGMENT_BYTES), 6 * 1024);
        assert_eq!(outbox_chunk_bytes(NEW_STORE_SEGMENT_BYTES), OUTBOX_CHUNK_MAX);
        for segment in [256 * 1024, SLED_DEFAULT_SEGMENT_BYTES, 1 << 20, NEW_STORE_SEGMENT_BYTES, 16 << 20] {
            assert!(17 * outbox_chunk_bytes(segment) < segment / 4, "{segment}");
        }
    }

    /// A store created before 8 MiB segments opens with its own segment
    /// size (sled refuses another) and keeps 6 KiB bundles; a new store
    /// gets 8 MiB and keeps it when opened again.
    #[test]
    fn an_existing_store_keeps_its_segment_size() {
        use crate::store::sled::SledStore;
        use crate::store::Store;
        let old = tempfile::tempdir().unwrap();
        {
            let db = ::sled::Config::new()
                .path(old.path())
                .segment_size(SLED_DEFAULT_SEGMENT_BYTES)
                .open()
                .unwrap();
            db.insert(b"k", b"v").unwrap();
            db.flush().unwrap();
        }
        assert_eq!(segment_size(old.path()), SLED_DEFAULT_SEGMENT_BYTES);
        let store = SledStore::open(old.path(), 16).unwrap();
        assert_eq!(store.outbox_chunk_bytes(), 6 * 1024);
        drop(store);

        let new = tempfile::tempdir().unwrap();
        assert_eq!(segment_size(new.path()), NEW_STORE_SEGMENT_BYTES);
        drop(SledStore::open(new.path(), 16).unwrap());
        assert_eq!(segment_size(new.path()), NEW_STORE_SEGMENT_BYTES);
        let again = SledStore::open(new.path(), 16).unwrap();
        assert_eq!(again.outbox_chunk_bytes(), OUTBOX_CHUNK_MAX);

        // A store whose `conf` is gone was made before 8 MiB segments.
        std::fs::remove_file(old.path().join("conf")).unwrap();
        assert_eq!(segment_size(old.path()), SLED_DEFAULT_SEGMENT_BYTES);
    }

    #[test]
    fn the_recorded_size_is_read_and_a_damaged_conf_is_none() {
        let mut conf = b"segment_size: 524288\nuse_compression: false\nversion: 0.34\n".to_vec();
        conf.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(recorded(&conf), Some(524_288));
        assert_eq!(recorded(b"use_compression: false\n1234"), None);
        assert_eq!(recorded(b"12"), None);
        assert_eq!(recorded(&[0xff, 0xfe, 0, 0, 1, 2, 3, 4]), None);
    }
}
