//! The store's tests: batches, restores, every stored format and its
//! migration.

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
        .unwrap()
        .conflicts;
    assert!(conflicts.is_empty(), "{conflicts:?}");
    assert_eq!(store.load_entity("a").unwrap(), Some(live_here.clone()));
    assert_eq!(store.load_entity("b").unwrap(), Some(record("b", 1, None)));
    assert_eq!(store.load_entity("c").unwrap(), Some(record("c", 1, None)));
    let conflicts = store
        .restore(&home(1), &[restored(&record("a", 1, None))], &changelog)
        .unwrap()
        .conflicts;
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
    let committed = store.commit(&batch).unwrap();
    // The time sled held its lock for the batch is measured (the
    // `orderly_store_exclusive_seconds` histogram), not left at zero.
    assert!(committed.exclusive > std::time::Duration::ZERO);
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

/// A format-1 provenance of event `event` at `offset` of `in/2`.
fn v1_provenance(event: &str, offset: i64) -> format_v1::Provenance {
    format_v1::Provenance {
        event_id: event.into(),
        event_type: "lead.updated".into(),
        topic: "in".into(),
        partition: 2,
        offset,
        occurred_at: 5,
        processed_at: 6,
    }
}

#[test]
fn format_1_records_are_read() {
    let prov = |offset| v1_provenance("e1", offset);
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
        settings_version: 1,
        ..Provenance::from(v1_provenance(event, offset))
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
    assert_eq!(r.provenance, crate::model::fold::share_provenance(&fields));
    // The fields one event wrote share one copy.
    assert!(std::sync::Arc::ptr_eq(&r.provenance["email"], &r.provenance["stage"]));
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
    assert!(chunks.len() >= 400_000 / OUTBOX_CHUNK_BYTES, "{}", chunks.len());
    for c in &chunks {
        let bytes: usize = c.iter().map(|r| r.value.len()).sum();
        assert!(bytes <= OUTBOX_CHUNK_BYTES || c.len() == 1, "{bytes}");
    }
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), 16).unwrap();
    let mut batch = CommitBatch {
        outbox: outbox.clone(),
        ..Default::default()
    };
    // Without ids, the bundles would be lost: the commit refuses.
    assert!(matches!(store.commit(&batch), Err(StoreError::InvalidBatch(_))));
    batch.assign_outbox_ids(|| store.next_id()).unwrap();
    store.commit(&batch).unwrap();
    // Bundles are zstd frames: sled writes them twice or more before they
    // are deleted (BENCHMARKS.md).
    for value in store.tree.scan_prefix(key(OUTBOX_BUNDLE, b"")).values() {
        let value = value.unwrap();
        assert_eq!(value[..2], [FORMAT_VERSION, ZSTD]);
        assert!(value.len() < OUTBOX_CHUNK_BYTES / 4, "{}", value.len());
    }
    let bundles = store.outbox(1_000).unwrap();
    assert_eq!(bundles.len(), chunks.len());
    // What the writer hands the publisher is what the store holds.
    assert_eq!(batch.take_outbox_bundles(), bundles);
    assert!(batch.outbox.is_empty() && batch.outbox_ids.is_empty());
    let read: Vec<OutboxRecord> = bundles.into_iter().flat_map(|(_, b)| b).collect();
    assert_eq!(read, outbox);
}

/// A corrupt length prefix (a bundle that claims 2^62 records) is an error,
/// found at once, and allocates nothing near that size: values are decoded
/// from the stored slice, and serde reserves at most about 1 MiB up front.
#[test]
fn a_corrupt_length_is_an_error_not_an_allocation() {
    // Version, codec "plain", then a bincode length prefix of 2^62.
    let mut bytes = vec![FORMAT_VERSION, 0, 0xfd];
    bytes.extend_from_slice(&(1u64 << 62).to_le_bytes());
    bytes.extend_from_slice(b"only a few bytes follow");
    let err = decode::<Vec<OutboxRecord>>(b"o", &bytes).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
}

/// An entity record whose state holds `notes`.
fn record_with_notes(notes: String) -> EntityRecord {
    let mut r = EntityRecord::new("lead-1", "t1");
    r.state
        .fields
        .insert("notes".into(), crate::model::value::Value::String(notes));
    r
}

/// Format 6 frames the body: a value of 128 bytes or more that compresses
/// is an LZ4 block, a short one is stored plain, and both read back.
#[test]
fn format_6_values_are_compressed_when_that_is_smaller() {
    let record = record_with_notes("the same words again and again ".repeat(20));
    let bytes = encode(&record);
    assert_eq!(&bytes[..2], &[FORMAT_VERSION, 1], "a long record is an LZ4 block");
    let plain = encode_as(FORMAT_VERSION, &record);
    assert!(bytes.len() < plain.len() / 2, "{} of {}", bytes.len(), plain.len());
    assert_eq!(decode::<EntityRecord>(b"e", &bytes).unwrap(), record);

    let short = Anomaly {
        seq: 1,
        class: "late".into(),
        entity_id: "e".into(),
        tenant_id: "t".into(),
        event_id: "v".into(),
        event_type: "x".into(),
        topic: "in".into(),
        partition: 0,
        offset: 1,
        lateness: None,
        policy: "drop".into(),
        outcome: "dropped".into(),
        at: 2,
    };
    let bytes = encode(&short);
    assert_eq!(&bytes[..2], &[FORMAT_VERSION, 0], "a short value is plain");
    assert_eq!(decode::<Anomaly>(b"a", &bytes).unwrap(), short);
}

/// A format-5 value is format 6's body without the codec byte: it is read
/// as it is.
#[test]
fn format_5_values_are_read() {
    let record = record_with_notes("a note".into());
    let v5 = encode_as(5, &record);
    assert_eq!(decode::<EntityRecord>(b"e", &v5).unwrap(), record);
}

/// A damaged frame is a `Corrupt` error: an unknown codec, an LZ4 block cut
/// short, a size prefix beyond what a value may hold (no allocation of that
/// size), a size that does not match the block.
#[test]
fn a_damaged_frame_is_corrupt() {
    let good = encode(&record_with_notes("tenant ".repeat(40)));
    assert_eq!(good[1], 1);
    let mut unknown = good.clone();
    unknown[1] = 7;
    let cut = good[..good.len() - 10].to_vec();
    let mut huge = good.clone();
    huge[2..6].copy_from_slice(&u32::MAX.to_le_bytes());
    let mut wrong_size = good.clone();
    let size = u32::from_le_bytes(good[2..6].try_into().unwrap());
    wrong_size[2..6].copy_from_slice(&(size + 1).to_le_bytes());
    for (what, bytes) in [
        ("unknown codec", unknown),
        ("cut short", cut),
        ("huge size", huge),
        ("wrong size", wrong_size),
        ("no codec byte", vec![FORMAT_VERSION]),
    ] {
        let err = decode::<EntityRecord>(b"e", &bytes).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{what}: {err}");
    }
}

/// A directory another handle holds is waited for: opening succeeds once
/// the holder lets go (a store this process just dropped), and fails with
/// `Locked`, naming the directory, when it never does.
#[test]
fn a_locked_directory_is_waited_for_then_refused() {
    let dir = tempfile::tempdir().unwrap();
    let first = SledStore::open(dir.path(), 16).unwrap();
    let err = SledStore::open_waiting(dir.path(), 16, std::time::Duration::from_millis(200))
        .err()
        .expect("the directory is held");
    assert!(matches!(&err, StoreError::Locked { dir: d } if d.contains(&dir.path().display().to_string())), "{err}");
    assert!(err.to_string().contains("cannot share a data_dir"), "{err}");
    let holder = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(300));
        drop(first);
    });
    let second = SledStore::open_waiting(dir.path(), 16, std::time::Duration::from_secs(10));
    holder.join().unwrap();
    assert!(second.is_ok(), "{:?}", second.err());
}

/// Random letters: LZ4 cannot shrink them, so the record stays large.
fn noise(len: usize, seed: u64) -> String {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (b'a' + (x % 26) as u8) as char
        })
        .collect()
}

/// A record larger than SPILL_BYTES is stored in pieces under `s` keys and
/// read back whole; a smaller record later removes the pieces it no longer
/// needs, and so does a purge; the piece counts survive a reopen; a large
/// record stored inline by format 6 still reads.
#[test]
fn large_records_spill_into_pieces_and_leave_none_behind() {
    let dir = tempfile::tempdir().unwrap();
    let home = Home::new("in", 0);
    let commit = |store: &SledStore, r: &EntityRecord| {
        let mut r = r.clone();
        r.placement.home = Some(home.clone());
        store
            .commit(&CommitBatch {
                entities: vec![(r.entity_id.clone(), encode(&r))],
                homes: vec![crate::store::HomeChange {
                    entity: r.entity_id.clone(),
                    from: None,
                    to: home.clone(),
                }],
                ..Default::default()
            })
            .unwrap();
        r
    };
    let pieces = |store: &SledStore| store.usage().unwrap().get(&'s').map_or(0, |u| u.0);
    let store = SledStore::open(dir.path(), 16).unwrap();
    let big = commit(&store, &record_with_notes(noise(100_000, 1)));
    let n = pieces(&store);
    assert!(n >= (100_000 / SPILL_BYTES) as u64, "{n} pieces");
    assert_eq!(store.load_entity("lead-1").unwrap().as_ref(), Some(&big));
    assert_eq!(store.entities().next().unwrap().unwrap(), big);
    // The marker under the e key is small.
    let marker = store.tree.get(key(ENTITY, b"lead-1")).unwrap().unwrap();
    assert_eq!(marker.len(), 10);
    // Smaller, still spilled: fewer pieces.
    let smaller = commit(&store, &record_with_notes(noise(30_000, 2)));
    assert!(pieces(&store) < n);
    assert_eq!(store.load_entity("lead-1").unwrap().as_ref(), Some(&smaller));
    drop(store);
    // After a reopen the piece count is known again: a small record removes them all.
    let store = SledStore::open(dir.path(), 16).unwrap();
    let small = commit(&store, &record_with_notes("short".into()));
    assert_eq!(pieces(&store), 0);
    assert_eq!(store.load_entity("lead-1").unwrap().as_ref(), Some(&small));
    // A purge removes the pieces too.
    commit(&store, &record_with_notes(noise(50_000, 3)));
    assert!(pieces(&store) > 0);
    assert_eq!(store.purge_partition(&home, "in.changelog").unwrap(), 1);
    assert_eq!(pieces(&store), 0);
    assert_eq!(store.load_entity("lead-1").unwrap(), None);
    // A marker format 7 wrote is still one: the record reads whole.
    let seven = commit(&store, &record_with_notes(noise(40_000, 5)));
    let mut marker = store.tree.get(key(ENTITY, b"lead-1")).unwrap().unwrap().to_vec();
    marker[0] = 7;
    store.insert_raw(key(ENTITY, b"lead-1"), marker).unwrap();
    assert_eq!(store.load_entity("lead-1").unwrap().as_ref(), Some(&seven));
    // Format 6 stored every record inline: it still reads.
    let old = record_with_notes(noise(20_000, 4));
    let mut inline = encode(&old);
    inline[0] = 6;
    store.insert_raw(key(ENTITY, b"lead-1"), inline).unwrap();
    assert_eq!(store.load_entity("lead-1").unwrap().as_ref(), Some(&old));
}

/// A spill marker whose pieces are missing or short is a Corrupt error that
/// names the key, not a panic or a wrong record.
#[test]
fn a_spill_marker_without_its_pieces_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), 16).unwrap();
    let mut marker = vec![FORMAT_VERSION, SPILLED];
    marker.extend_from_slice(&3u32.to_le_bytes());
    marker.extend_from_slice(&10_000u32.to_le_bytes());
    store.insert_raw(key(ENTITY, b"lead-9"), marker.clone()).unwrap();
    let err = store.load_entity("lead-9").unwrap_err();
    assert!(matches!(&err, StoreError::Corrupt { key, .. } if key.contains("lead-9")), "{err}");
    // A marker that claims more than its pieces can hold.
    marker[6..].copy_from_slice(&u32::MAX.to_le_bytes());
    store.insert_raw(key(ENTITY, b"lead-9"), marker).unwrap();
    assert!(matches!(store.load_entity("lead-9"), Err(StoreError::Corrupt { .. })));
    // decode alone refuses a marker.
    let mut m = vec![FORMAT_VERSION, SPILLED];
    m.extend_from_slice(&[0; 8]);
    assert!(matches!(decode::<EntityRecord>(b"e", &m), Err(StoreError::Corrupt { .. })));
}

/// The parked index pages in id order, strictly after the id given; the
/// history tail is the newest entries, in order.
#[test]
fn parked_entities_page_and_history_tails_are_the_newest() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), 16).unwrap();
    let ids: Vec<String> = (0..25).map(|i| format!("lead-{i:02}")).collect();
    store
        .commit(&CommitBatch {
            parked: ids.iter().map(|id| (id.clone(), true)).collect(),
            ..Default::default()
        })
        .unwrap();
    let mut seen = Vec::new();
    let mut after = String::new();
    loop {
        let page = store.parked_page(&after, 10).unwrap();
        assert!(page.len() <= 10);
        let Some(last) = page.last().cloned() else {
            break;
        };
        seen.extend(page);
        after = last;
    }
    assert_eq!(seen, ids);
    let entry = |n: i64| {
        let mut e = EntityRecord::new("lead-h", "t");
        let ev = crate::model::envelope::Event::test(&format!("e{n}"), n, "set", serde_json::json!({"n": n}));
        e.process(
            &ev,
            &crate::model::fold::Origin::new(crate::model::position::TopicPartition::new("in", 0), n),
            0,
            &crate::model::handler::Handlers::default(),
            &crate::model::tenant::TenantView::defaults(&crate::model::ordering::Policies::default()),
        )
        .unwrap();
        ("lead-h".to_string(), e.log[0].clone())
    };
    store
        .commit(&CommitBatch {
            history: (0..8).map(entry).collect(),
            ..Default::default()
        })
        .unwrap();
    let tail = store.history_tail("lead-h", 3).unwrap();
    let all = store.history("lead-h").unwrap();
    assert_eq!(all.len(), 8);
    assert_eq!(tail, all[5..].to_vec());
}

/// Found by the `stored_record` fuzz target: a format-1 anomaly whose
/// string length prefix claims 3 × 10^18 bytes made bincode allocate that
/// much (the process aborted). Every format now decodes with an allocation
/// limit, so it is a Corrupt error.
#[test]
fn a_huge_length_prefix_in_an_old_format_is_an_error_not_an_allocation() {
    let value = [1, 0, 253, 255, 0, 0, 0, 0, 0, 128, 45, 48, 1, 144];
    let err = decode::<Anomaly>(b"a\0x", &value).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    for version in 1..=4u8 {
        let mut v = value.to_vec();
        v[0] = version;
        // Each reads it as its own layout: an error or a small value, never
        // a huge allocation.
        let _ = decode::<EntityRecord>(b"e\0x", &v);
        let _ = decode::<LogEntry>(b"h\0x", &v);
        let _ = decode::<Vec<OutboxRecord>>(b"b\0x", &v);
        let _ = decode::<DeadLetter>(b"d\0x", &v);
    }
}

/// An LZ4 block that claims more than LZ4 can expand to (about 255 times
/// its size) is refused before its buffer is allocated.
#[test]
fn an_lz4_claim_past_the_expansion_limit_is_corrupt() {
    let mut value = vec![FORMAT_VERSION, 1];
    value.extend_from_slice(&(100u32 * 1024 * 1024).to_le_bytes());
    value.extend_from_slice(&[0x1f, b'a', 0, 0]);
    let err = decode::<EntityRecord>(b"e\0x", &value).unwrap_err();
    assert!(err.to_string().contains("more than LZ4 can expand to"), "{err}");
}

/// Single outbox records written before bundles existed (`o` keys) are read
/// after a restart, before the bundles, and removed with them; once none
/// are left, the store stops looking for them.
#[test]
fn single_outbox_records_from_before_bundles_are_read_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    let record = |value: &str| OutboxRecord {
        topic: "t".into(),
        key: None,
        value: value.as_bytes().to_vec(),
        headers: vec![],
        partition: None,
    };
    let ids = |read: Vec<(u64, Vec<OutboxRecord>)>| -> Vec<u64> {
        read.into_iter().map(|(id, _)| id).collect()
    };
    {
        let store = SledStore::open(dir.path(), 16).unwrap();
        assert!(!store.has_legacy_outbox(), "a new store has none");
        for id in [3u64, 4] {
            store
                .tree
                .insert(key(OUTBOX, &id.to_be_bytes()), encode(&record("old")))
                .unwrap();
        }
        store.db.flush().unwrap();
    }
    let store = SledStore::open(dir.path(), 16).unwrap();
    store
        .tree
        .insert(
            key(OUTBOX_BUNDLE, &7u64.to_be_bytes()),
            encode(&vec![record("new")]),
        )
        .unwrap();
    // An empty page read is no proof that none are left.
    assert!(store.outbox(0).unwrap().is_empty());
    assert!(store.has_legacy_outbox());
    assert_eq!(ids(store.outbox(10).unwrap()), [3, 4, 7]);
    store.remove_outbox(&[3, 4]).unwrap();
    assert_eq!(ids(store.outbox(10).unwrap()), [7]);
    assert!(!store.has_legacy_outbox(), "none left: no more looking");
    store.remove_outbox(&[7]).unwrap();
    assert!(store.outbox(10).unwrap().is_empty());
    assert_eq!(store.tree.scan_prefix(key(OUTBOX, b"")).count(), 0);
}
