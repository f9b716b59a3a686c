//! The decoders that read outside input, driven by arbitrary bytes: the
//! harnesses of the cargo-fuzz targets in `fuzz/` and of the decoder
//! property tests (`tests/decoders.rs`), which also replay the checked-in
//! fuzz corpus. Each returns normally on any input; a panic, a stack
//! overflow or an allocation past the fuzzer's cap is a finding.

use crate::model::anomaly::Anomaly;
use crate::model::dead_letter::DeadLetter;
use crate::model::envelope::{decode, ContentType};
use crate::model::fold::{EntityRecord, LogEntry};
use crate::model::ordering::Policies;
use crate::model::tenant::SettingsDocument;
use crate::store::OutboxRecord;

/// The envelope decoder (JSON and protobuf, chosen by config or by a
/// content-type header) on an arbitrary key and value. `data`'s first
/// byte picks the key's presence, the header and the configured type; the
/// second the key's length. An event it accepts survives its JSON round
/// trip.
pub fn envelope(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Some((&key_len, rest)) = rest.split_first() else {
        return;
    };
    let (key, value) = rest.split_at((key_len as usize).min(rest.len()));
    let key = (mode & 1 == 1).then_some(key);
    let header: Option<&[u8]> = match (mode >> 1) & 3 {
        0 => None,
        1 => Some(b"application/json"),
        2 => Some(b"application/x-protobuf"),
        _ => Some(&value[..value.len().min(8)]),
    };
    let configured = match (mode >> 3) % 3 {
        0 => ContentType::Auto,
        1 => ContentType::Json,
        _ => ContentType::Proto,
    };
    if let Ok(event) = decode(key, Some(value), header, configured) {
        let again = decode(
            Some(event.entity_id.as_bytes()),
            Some(&event.to_json_bytes()),
            Some(b"application/json"),
            ContentType::Auto,
        );
        assert!(
            again.as_ref().is_ok_and(|e| e.event_id == event.event_id),
            "an accepted event's JSON does not decode to it: {again:?}"
        );
    }
}

/// The store's and the changelog's value decoder (every format version,
/// the codec byte, LZ4 blocks, bincode bodies) on an arbitrary value; the
/// first byte picks the kind of value. An entity record it accepts can be
/// written and read back.
pub fn stored_record(data: &[u8]) {
    use crate::store::{decode, encode};
    let Some((&kind, value)) = data.split_first() else {
        return;
    };
    match kind % 5 {
        0 => {
            if let Ok(r) = decode::<EntityRecord>(b"e\0fuzz", value) {
                // What was read can be written and read back. (Not always to
                // the same record: provenance is stored once per event id,
                // so a corrupt record whose entries share an event id comes
                // back with one of their provenances.)
                let again = decode::<EntityRecord>(b"e\0fuzz", &encode(&r));
                assert!(
                    again.is_ok(),
                    "a decoded record does not read back: {again:?}"
                );
            }
        }
        1 => drop(decode::<DeadLetter>(b"d\0fuzz", value)),
        2 => {
            if let Ok(bundle) = decode::<Vec<OutboxRecord>>(b"b\0fuzz", value) {
                // A bundle read (a zstd frame since format 8) is written
                // and read back as it was.
                let again =
                    decode::<Vec<OutboxRecord>>(b"b\0fuzz", &crate::store::encode_bundle(&bundle));
                assert!(
                    again.as_ref().is_ok_and(|b| *b == bundle),
                    "a decoded bundle does not read back: {again:?}"
                );
            }
        }
        3 => drop(decode::<Anomaly>(b"a\0fuzz", value)),
        _ => drop(decode::<LogEntry>(b"h\0fuzz", value)),
    }
}

/// The tenant settings decoder on an arbitrary settings-topic record (JSON
/// or protobuf; the first byte picks the content type), the compilation of
/// what it accepts, and the HTTP source's document list.
pub fn settings_document(data: &[u8]) {
    let Some((&mode, value)) = data.split_first() else {
        return;
    };
    let content_type: Option<&[u8]> = match mode % 3 {
        0 => None,
        1 => Some(b"application/json"),
        _ => Some(b"application/x-protobuf"),
    };
    if let Ok(doc) = SettingsDocument::decode(value, content_type) {
        let _ = doc.compile(&Policies::default());
        let again = SettingsDocument::decode(&doc.to_json_bytes(), Some(b"application/json"));
        assert!(
            again.as_ref().is_ok_and(|a| a.tenant_id == doc.tenant_id),
            "an accepted document's JSON does not decode to it: {again:?}"
        );
    }
    let _ = crate::settings::parse_document_list(value);
}

/// The W3C trace-context parser on arbitrary `traceparent` and
/// `tracestate` values (the two halves of `data`) and header names.
pub fn traceparent(data: &[u8]) {
    let (parent, state) = data.split_at(data.len() / 2);
    let headers = [
        ("traceparent", parent),
        ("tracestate", state),
        ("TraceParent", state),
    ];
    let _ = crate::telemetry::parent_from_headers(headers.iter().map(|(k, v)| (*k, *v)));
    let owned = [
        (String::from_utf8_lossy(state).into_owned(), parent.to_vec()),
        ("traceparent".to_owned(), parent.to_vec()),
    ];
    if let Some(id) = crate::telemetry::trace_id_in(&owned) {
        assert_eq!(id.len(), 32, "a trace id is 32 hex digits: {id}");
    }
}

/// A fuzz harness: returns on any input.
pub type Harness = fn(&[u8]);

/// The harness of each fuzz target, by the target's name.
pub const TARGETS: &[(&str, Harness)] = &[
    ("envelope", envelope),
    ("stored_record", stored_record),
    ("settings_document", settings_document),
    ("traceparent", traceparent),
];
