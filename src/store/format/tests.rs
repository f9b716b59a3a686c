//! The entity record's format 8 against format 7: read, migrated, smaller.

use super::format_v7;
use crate::model::fold::EntityRecord;
use crate::store::{decode, encode, FORMAT_VERSION};

/// A record of three events (one late, re-folded) for the format tests.
pub(crate) fn three_event_record() -> EntityRecord {
    use crate::model::handler::Handlers;
    use crate::model::ordering::{LatePolicy, Policies, TooLatePolicy};
    use crate::model::position::{Origin, TopicPartition};
    use crate::model::tenant::TenantView;
    let view = TenantView::defaults(&Policies::new(
        LatePolicy::Recompute,
        TooLatePolicy::Drop,
        32,
        None,
    ));
    let events = [
        ("e1", 100, serde_json::json!({"stage": "new", "notes": "called twice, no answer", "score": 3})),
        ("e2", 200, serde_json::json!({"stage": "won", "amount": 12.5})),
        ("e3", 150, serde_json::json!({"owner": "rep-1", "stage": "qualified"})),
    ];
    let mut r = EntityRecord::new("lead-1", "t1");
    for (i, (id, at, payload)) in events.into_iter().enumerate() {
        let event = crate::model::envelope::Event::test(id, at, "lead.updated", payload);
        let origin = Origin::new(TopicPartition::new("in", 2), i as i64 + 10);
        r.process(&event, &origin, 1_000 + i as i64, &Handlers::default(), &view)
            .unwrap();
    }
    r
}


/// `three_event_record()` as format 7 wrote it (`encode` at 966fefc): an
/// LZ4 frame of the body with every copy in it.
const THREE_EVENTS_V7: &str = "0701ed010000f105066c6561642d310274310506616d6f756e7403000100f3512940056e6f746573041763616c6c65642074776963652c206e6f20616e73776572056f776e657204057265702d310573636f726502060573746167650403776f6e00030265320c6c6561642e7570646174656402696e0416fb9001fbd20700026e000231003d0265312a007214c8fbd007000286000360002d653327009218fb2c01fbd40700019000bc0100fb90010265320300c8550012034b000fd100070bc4003c6e657743000698004d00fb2c018f00028300051301010b01ad097175616c69666965642f0007be0003b6000ade000323010691010252004d03776f6e2c00075b0100bf01f0070104696e2f3218030000010000000000000000000000";

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn plain_body<T: serde::Serialize>(value: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(value, bincode::config::standard()).unwrap()
}

/// A record format 7 wrote reads as the same record, and written again it
/// is format 8, smaller, and reads back the same.
#[test]
fn format_7_records_are_read_and_format_8_leaves_out_the_copies() {
    let want = three_event_record();
    let v7 = unhex(THREE_EVENTS_V7);
    let read: EntityRecord = decode(b"e", &v7).unwrap();
    assert_eq!(read, want);

    let v8 = encode(&read);
    assert_eq!(v8[0], FORMAT_VERSION);
    assert_eq!(decode::<EntityRecord>(b"e", &v8).unwrap(), want);
    // Before compression, the body without the copies is smaller by the
    // strings the state holds, three provenances' ids, types, times and
    // topics, and the high-water mark: 407 bytes against 493.
    let (old, new) = (plain_body(&format_v7::EntityRecord::from(want.clone())), plain_body(&want));
    assert!(new.len() * 100 < old.len() * 85, "{} against {}", new.len(), old.len());
}

/// Formats 5 (unframed) and 6 (framed, plain or LZ4) hold format 7's body:
/// each reads as the record.
#[test]
fn format_5_and_6_records_are_read() {
    let want = three_event_record();
    let body = plain_body(&format_v7::EntityRecord::from(want.clone()));
    let mut v5 = vec![5];
    v5.extend_from_slice(&body);
    assert_eq!(decode::<EntityRecord>(b"e", &v5).unwrap(), want);
    let mut v6 = vec![6, 0];
    v6.extend_from_slice(&body);
    assert_eq!(decode::<EntityRecord>(b"e", &v6).unwrap(), want);
    let mut v6_lz4 = unhex(THREE_EVENTS_V7);
    v6_lz4[0] = 6;
    assert_eq!(decode::<EntityRecord>(b"e", &v6_lz4).unwrap(), want);
}
