//! The stored formats: the version byte, the current layout, and how each
//! older version is read (the migration happens on read; the next write
//! stores the current format).

use super::OutboxRecord;
use crate::model::anomaly::Anomaly;
use crate::model::dead_letter::DeadLetter;
use crate::model::fold::{EntityRecord, LogEntry};
use serde::de::DeserializeOwned;

/// The most bytes decoding one stored value may allocate: a corrupt length
/// prefix (in any format) is an error, not an allocation of exabytes. An
/// LZ4 body may decompress to as much and no more.
pub const MAX_DECODED: usize = 256 * 1024 * 1024;

/// How stored values are decoded: bincode's standard layout, allocating at
/// most [`MAX_DECODED`] bytes.
pub(crate) const DECODE: bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<MAX_DECODED>,
> = bincode::config::standard().with_limit::<MAX_DECODED>();

/// The format version written at the start of every stored value.
pub const FORMAT_VERSION: u8 = 8;

/// The formats whose values are framed: a codec byte after the version,
/// then the body as that codec stores it. Format 6 added the frame, 7 the
/// spill marker (codec 2), 8 the zstd codec (3); each reads the frames of
/// the ones before, so a frame reader (decoding a value, recognising a
/// spill marker) accepts all of them, and a new version joins by itself.
pub(crate) const FRAMED: std::ops::RangeInclusive<u8> = 6..=FORMAT_VERSION;

/// A value the store keeps, and how it is read from an older format.
pub trait Stored: DeserializeOwned {
    /// Decodes the bincode body of a format-1 value. The default suits the
    /// types whose layout did not change.
    fn from_v1(body: &[u8]) -> std::result::Result<Self, bincode::error::DecodeError> {
        bincode::serde::decode_from_slice(body, DECODE).map(|(v, _)| v)
    }

    /// Decodes the bincode body of a format-2 value. The default suits the
    /// types whose layout did not change.
    fn from_v2(body: &[u8]) -> std::result::Result<Self, bincode::error::DecodeError> {
        bincode::serde::decode_from_slice(body, DECODE).map(|(v, _)| v)
    }

    /// Decodes the bincode body of a format-3 value. The default suits the
    /// types whose layout did not change.
    fn from_v3(body: &[u8]) -> std::result::Result<Self, bincode::error::DecodeError> {
        bincode::serde::decode_from_slice(body, DECODE).map(|(v, _)| v)
    }

    /// Decodes the bincode body of a format-4 value. The default suits the
    /// types whose layout did not change.
    fn from_v4(body: &[u8]) -> std::result::Result<Self, bincode::error::DecodeError> {
        bincode::serde::decode_from_slice(body, DECODE).map(|(v, _)| v)
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
            DECODE,
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
            DECODE,
        )
        .map(|(v, _)| v.into_iter().map(Into::into).collect())
    }
}

impl Stored for EntityRecord {
    fn from_v1(body: &[u8]) -> std::result::Result<Self, bincode::error::DecodeError> {
        bincode::serde::decode_from_slice::<format_v1::EntityRecord, _>(
            body,
            DECODE,
        )
        .map(|(v, _)| format_v4::EntityRecord::from(format_v3::EntityRecord::from(v)).into())
    }

    fn from_v2(body: &[u8]) -> std::result::Result<Self, bincode::error::DecodeError> {
        entity_from_v2(body)
    }

    fn from_v3(body: &[u8]) -> std::result::Result<Self, bincode::error::DecodeError> {
        bincode::serde::decode_from_slice::<format_v3::EntityRecord, _>(
            body,
            DECODE,
        )
        .map(|(v, _)| format_v4::EntityRecord::from(v).into())
    }

    fn from_v4(body: &[u8]) -> std::result::Result<Self, bincode::error::DecodeError> {
        bincode::serde::decode_from_slice::<format_v4::EntityRecord, _>(
            body,
            DECODE,
        )
        .map(|(v, _)| v.into())
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
    EntityRecord::from_v3(&upgraded)
}

impl Stored for LogEntry {
    fn from_v1(body: &[u8]) -> std::result::Result<Self, bincode::error::DecodeError> {
        bincode::serde::decode_from_slice::<format_v1::LogEntry, _>(
            body,
            DECODE,
        )
        .map(|(v, _)| v.into())
    }
}

/// Header lists with each value as one byte slice. bincode writes a byte
/// slice as its length and the bytes, as it writes a `Vec<u8>` element by
/// element, so the stored layout is the same; only the work is less.
pub(super) mod header_bytes {
    use serde::{Deserialize, Deserializer, Serializer};
    use serde_bytes::{ByteBuf, Bytes};

    pub fn serialize<S: Serializer>(headers: &[(String, Vec<u8>)], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(headers.iter().map(|(k, v)| (k, Bytes::new(v))))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(String, Vec<u8>)>, D::Error> {
        let headers = Vec::<(String, ByteBuf)>::deserialize(d)?;
        Ok(headers.into_iter().map(|(k, v)| (k, v.into_vec())).collect())
    }
}

/// The layouts of format 1 that changed in format 2, and their upgrade.
pub(super) mod format_v1 {
    use crate::model::fold::{self, HeldEvent, Parked, Skipped};
    use crate::model::handler::EntityState;
    use crate::model::ordering::OrderKey;
    use crate::model::value::Fields;
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

    impl From<EntityRecord> for super::format_v3::EntityRecord {
        fn from(r: EntityRecord) -> Self {
            super::format_v3::EntityRecord {
                entity_id: r.entity_id,
                tenant_id: r.tenant_id,
                state: r.state,
                provenance: upgrade(r.provenance),
                high_water: r.high_water,
                log: r.log.into_iter().map(Into::into).collect(),
                base: super::format_v4::Base {
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

/// The entity record of formats 2 and 3: every field flat, in order. Format 4
/// grouped the counters, the parking and the placement.
pub(super) mod format_v3 {
    use super::format_v4::Base;
    use crate::model::fold::{self, HeldEvent, Home, LogEntry, Parked, Provenance, Skipped};
    use crate::model::handler::EntityState;
    use crate::model::ordering::OrderKey;
    use serde::{Deserialize, Serialize};
    use std::collections::BTreeMap;

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
        pub ignored_events: u64,
        pub home: Option<Home>,
        pub moved_to: Option<Home>,
        pub handovers: u32,
    }

    /// Format 4 grouped the flat fields; the rest reads as format 4 does.
    impl From<EntityRecord> for super::format_v4::EntityRecord {
        fn from(r: EntityRecord) -> Self {
            super::format_v4::EntityRecord {
                entity_id: r.entity_id,
                tenant_id: r.tenant_id,
                state: r.state,
                provenance: r.provenance,
                high_water: r.high_water,
                log: r.log,
                base: r.base,
                applied_offsets: r.applied_offsets,
                counters: fold::Counters {
                    applied_events: r.applied_events,
                    duplicates: r.duplicates,
                    redeliveries: r.redeliveries,
                    late_events: r.late_events,
                    too_late_events: r.too_late_events,
                    dead_lettered: r.dead_lettered,
                    late_applied: r.late_applied,
                    late_dropped: r.late_dropped,
                    ignored_events: r.ignored_events,
                    handovers: r.handovers,
                },
                parking: fold::Parking {
                    parked: r.parked,
                    held: r.held,
                    skipped: r.skipped,
                },
                placement: fold::Placement {
                    home: r.home,
                    moved_to: r.moved_to,
                },
            }
        }
    }
}

/// The entity record of formats 2 to 4 kept a full provenance per field;
/// format 5 stores one per writing event (`fold::provenance_table`).
pub(super) mod format_v4 {
    use crate::model::fold::{self, Counters, LogEntry, Parking, Placement, Provenance};
    use crate::model::handler::EntityState;
    use crate::model::ordering::OrderKey;
    use serde::{Deserialize, Serialize};
    use std::collections::BTreeMap;

    #[derive(Default, Serialize, Deserialize)]
    pub struct Base {
        pub state: EntityState,
        pub provenance: BTreeMap<String, Provenance>,
        pub key: Option<OrderKey>,
    }

    impl From<Base> for fold::Base {
        fn from(b: Base) -> Self {
            fold::Base {
                state: b.state,
                provenance: fold::share_provenance(&b.provenance),
                key: b.key,
            }
        }
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
        pub counters: Counters,
        pub parking: Parking,
        pub placement: Placement,
    }

    impl From<EntityRecord> for fold::EntityRecord {
        fn from(r: EntityRecord) -> Self {
            fold::EntityRecord {
                entity_id: r.entity_id,
                tenant_id: r.tenant_id,
                state: r.state,
                provenance: fold::share_provenance(&r.provenance),
                high_water: r.high_water,
                log: r.log,
                base: r.base.into(),
                applied_offsets: r.applied_offsets,
                counters: r.counters,
                parking: r.parking,
                placement: r.placement,
            }
        }
    }
}

/// The outbox record of formats 1 and 2, without a partition.
pub(super) mod format_v2 {
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize)]
    pub(in crate::store) struct OutboxRecord {
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
