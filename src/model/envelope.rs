//! The event envelope: decoding Kafka messages into [`Event`]s.
//!
//! Owns the wire formats (protobuf from `proto/orderly/v1/event.proto`, and
//! JSON with the same field names) and their validation. It does not own
//! routing or what an event does to state. Bytes enter through [`decode`];
//! a valid [`Event`] or a typed [`DecodeError`] leaves.

use crate::model::value::{Fields, Value};
use prost::Message as _;
use serde::{Deserialize, Serialize};

/// Generated protobuf types for `orderly.v1`.
#[allow(missing_docs)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/orderly.v1.rs"));
}

/// One validated event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The entity this event is about; also the Kafka key.
    pub entity_id: String,
    /// The tenant that owns the entity.
    pub tenant_id: String,
    /// The idempotency key, unique per entity.
    pub event_id: String,
    /// The event type, for example `lead.updated`.
    pub event_type: String,
    /// External timestamp, ms since the Unix epoch.
    pub occurred_at: i64,
    /// Optional version, monotonic per entity in the external system.
    pub version: Option<u64>,
    /// The payload, a JSON object.
    pub payload: Fields,
}

/// Which wire format a message uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ContentType {
    /// Decide per message: the `content-type` header if present, else JSON when
    /// the first byte is `{`, else protobuf.
    #[default]
    Auto,
    /// Always JSON.
    Json,
    /// Always protobuf.
    Proto,
}

/// Why a message could not be turned into an event. Each kind becomes a
/// dead-letter record with [`DecodeError::code`] as its reason code.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    /// The message had no value at all.
    #[error(
        "the message has no value (a tombstone or empty message); an event envelope was expected"
    )]
    Empty,
    /// The bytes are not a valid protobuf `orderly.v1.Event`.
    #[error("the value is not a valid protobuf orderly.v1.Event: {0}")]
    BadProtobuf(String),
    /// The bytes are not valid JSON, or not an object with the envelope's fields.
    #[error("the value is not a valid JSON event envelope: {0}")]
    BadJson(String),
    /// `entity_id` is missing or empty.
    #[error("entity_id is missing or empty; every event must name its entity")]
    MissingEntityId,
    /// `tenant_id` is missing or empty.
    #[error("tenant_id is missing or empty; every event must name its tenant")]
    MissingTenantId,
    /// `event_id` is missing or empty.
    #[error("event_id is missing or empty; it is the idempotency key and is required")]
    MissingEventId,
    /// `type` is missing or empty.
    #[error("type is missing or empty; it selects the handler")]
    MissingType,
    /// An id holds a NUL character. Store keys join an entity id and what
    /// follows it with NUL (`h\0<entity id>\0…`), so such an id could read
    /// another entity's history.
    #[error("{field} {value:?} contains a NUL character, which ids may not hold")]
    NulInId {
        /// `entity_id`, `tenant_id` or `event_id`.
        field: &'static str,
        /// The id, NULs shown escaped.
        value: String,
    },
    /// The Kafka key is not the entity id.
    #[error("the Kafka key {key:?} disagrees with entity_id {entity_id:?}; produce with key = entity_id")]
    KeyMismatch {
        /// The message key, lossily decoded as UTF-8.
        key: String,
        /// The entity id in the envelope.
        entity_id: String,
    },
    /// The payload is not JSON at all.
    #[error("the payload is not valid JSON: {0}")]
    PayloadNotJson(String),
    /// The payload is JSON, but not an object.
    #[error("the payload must be a JSON object, found {0}")]
    PayloadNotObject(&'static str),
}

impl DecodeError {
    /// A short, stable code for metrics labels and dead-letter filters.
    pub fn code(&self) -> &'static str {
        match self {
            DecodeError::Empty => "empty_message",
            DecodeError::BadProtobuf(_) => "bad_protobuf",
            DecodeError::BadJson(_) => "bad_json",
            DecodeError::MissingEntityId => "missing_entity_id",
            DecodeError::MissingTenantId => "missing_tenant_id",
            DecodeError::MissingEventId => "missing_event_id",
            DecodeError::MissingType => "missing_type",
            DecodeError::NulInId { .. } => "nul_in_id",
            DecodeError::KeyMismatch { .. } => "key_mismatch",
            DecodeError::PayloadNotJson(_) => "payload_not_json",
            DecodeError::PayloadNotObject(_) => "payload_not_object",
        }
    }
}

/// The JSON form of the envelope. `payload` may be an object or JSON text.
#[derive(Deserialize)]
struct JsonEnvelope {
    #[serde(default)]
    entity_id: String,
    #[serde(default)]
    tenant_id: String,
    #[serde(default)]
    event_id: String,
    #[serde(default, rename = "type")]
    event_type: String,
    #[serde(default)]
    occurred_at: i64,
    #[serde(default)]
    version: Option<u64>,
    #[serde(default)]
    payload: Option<serde_json::Value>,
}

/// Decodes and validates one message.
///
/// `key` is the Kafka message key; when present it must equal `entity_id`.
/// `header_content_type` is the value of a `content-type` header, if any.
pub fn decode(
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    header_content_type: Option<&[u8]>,
    configured: ContentType,
) -> Result<Event, DecodeError> {
    let value = match value {
        Some(v) if !v.is_empty() => v,
        _ => return Err(DecodeError::Empty),
    };
    let json = match configured {
        ContentType::Json => true,
        ContentType::Proto => false,
        ContentType::Auto => match header_content_type {
            Some(ct) if contains(ct, b"json") => true,
            Some(ct) if contains(ct, b"protobuf") || contains(ct, b"proto") => false,
            _ => value.first() == Some(&b'{'),
        },
    };
    let event = if json {
        decode_json(value)?
    } else {
        decode_proto(value)?
    };
    validate(&event)?;
    if let Some(key) = key {
        if key != event.entity_id.as_bytes() {
            return Err(DecodeError::KeyMismatch {
                key: String::from_utf8_lossy(key).into_owned(),
                entity_id: event.entity_id,
            });
        }
    }
    Ok(event)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle))
}

fn decode_json(value: &[u8]) -> Result<Event, DecodeError> {
    let env: JsonEnvelope =
        serde_json::from_slice(value).map_err(|e| DecodeError::BadJson(e.to_string()))?;
    let payload = match env.payload {
        None | Some(serde_json::Value::Null) => Fields::new(),
        Some(serde_json::Value::String(text)) => payload_from_text(&text)?,
        Some(other) => payload_from_json(other)?,
    };
    Ok(Event {
        entity_id: env.entity_id,
        tenant_id: env.tenant_id,
        event_id: env.event_id,
        event_type: env.event_type,
        occurred_at: env.occurred_at,
        version: env.version,
        payload,
    })
}

fn decode_proto(value: &[u8]) -> Result<Event, DecodeError> {
    let p = proto::Event::decode(value).map_err(|e| DecodeError::BadProtobuf(e.to_string()))?;
    let payload = if p.payload.is_empty() {
        Fields::new()
    } else {
        payload_from_text(&p.payload)?
    };
    Ok(Event {
        entity_id: p.entity_id,
        tenant_id: p.tenant_id,
        event_id: p.event_id,
        event_type: p.r#type,
        occurred_at: p.occurred_at,
        version: p.version,
        payload,
    })
}

fn payload_from_text(text: &str) -> Result<Fields, DecodeError> {
    let json: serde_json::Value =
        serde_json::from_str(text).map_err(|e| DecodeError::PayloadNotJson(e.to_string()))?;
    payload_from_json(json)
}

fn payload_from_json(json: serde_json::Value) -> Result<Fields, DecodeError> {
    match Value::from(json) {
        Value::Object(fields) => Ok(fields),
        Value::Null => Err(DecodeError::PayloadNotObject("null")),
        Value::Bool(_) => Err(DecodeError::PayloadNotObject("a boolean")),
        Value::Int(_) | Value::Float(_) => Err(DecodeError::PayloadNotObject("a number")),
        Value::String(_) => Err(DecodeError::PayloadNotObject("a string")),
        Value::Array(_) => Err(DecodeError::PayloadNotObject("an array")),
    }
}

fn validate(e: &Event) -> Result<(), DecodeError> {
    if e.entity_id.is_empty() {
        return Err(DecodeError::MissingEntityId);
    }
    if e.tenant_id.is_empty() {
        return Err(DecodeError::MissingTenantId);
    }
    if e.event_id.is_empty() {
        return Err(DecodeError::MissingEventId);
    }
    if e.event_type.is_empty() {
        return Err(DecodeError::MissingType);
    }
    for (field, value) in [
        ("entity_id", &e.entity_id),
        ("tenant_id", &e.tenant_id),
        ("event_id", &e.event_id),
    ] {
        if value.contains('\0') {
            return Err(DecodeError::NulInId {
                field,
                value: value.clone(),
            });
        }
    }
    Ok(())
}

impl Event {
    /// An event of entity `e`, tenant `t`, for unit tests.
    #[cfg(test)]
    pub(crate) fn test(id: &str, at: i64, event_type: &str, payload: serde_json::Value) -> Event {
        let Value::Object(payload) = Value::from(payload) else {
            panic!("a test payload must be a JSON object")
        };
        Event {
            entity_id: "e".into(),
            tenant_id: "t".into(),
            event_id: id.into(),
            event_type: event_type.into(),
            occurred_at: at,
            version: None,
            payload,
        }
    }

    /// Encodes as protobuf, the default wire format of `orderly produce`.
    pub fn to_proto_bytes(&self) -> Vec<u8> {
        proto::Event {
            entity_id: self.entity_id.clone(),
            tenant_id: self.tenant_id.clone(),
            event_id: self.event_id.clone(),
            r#type: self.event_type.clone(),
            occurred_at: self.occurred_at,
            version: self.version,
            payload: crate::model::value::fields_to_json(&self.payload).to_string(),
        }
        .encode_to_vec()
    }

    /// Encodes as the JSON envelope.
    pub fn to_json_bytes(&self) -> Vec<u8> {
        let mut obj = serde_json::json!({
            "entity_id": self.entity_id,
            "tenant_id": self.tenant_id,
            "event_id": self.event_id,
            "type": self.event_type,
            "occurred_at": self.occurred_at,
            "payload": crate::model::value::fields_to_json(&self.payload),
        });
        if let Some(v) = self.version {
            obj["version"] = serde_json::Value::from(v);
        }
        obj.to_string().into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Event {
        Event {
            entity_id: "lead-1".into(),
            tenant_id: "t1".into(),
            event_id: "e1".into(),
            event_type: "lead.updated".into(),
            occurred_at: 1_700_000_000_000,
            version: Some(3),
            payload: match Value::from(serde_json::json!({"stage": "won", "n": 2})) {
                Value::Object(o) => o,
                _ => unreachable!(),
            },
        }
    }

    #[test]
    fn proto_and_json_round_trip() {
        let e = sample();
        let p = decode(
            Some(b"lead-1"),
            Some(&e.to_proto_bytes()),
            None,
            ContentType::Auto,
        );
        assert_eq!(p, Ok(e.clone()));
        let j = decode(
            Some(b"lead-1"),
            Some(&e.to_json_bytes()),
            None,
            ContentType::Auto,
        );
        assert_eq!(j, Ok(e));
    }

    #[test]
    fn each_malformation_has_its_own_error() {
        let e = sample();
        type Case<'a> = (Option<&'a [u8]>, Vec<u8>, &'a str);
        let cases: Vec<Case> = vec![
            (None, vec![], "empty_message"),
            (None, vec![0xff, 0xff, 0xff], "bad_protobuf"),
            (None, b"{not json".to_vec(), "bad_json"),
            (
                None,
                br#"{"tenant_id":"t","event_id":"e","type":"x"}"#.to_vec(),
                "missing_entity_id",
            ),
            (
                None,
                br#"{"entity_id":"a","event_id":"e","type":"x"}"#.to_vec(),
                "missing_tenant_id",
            ),
            (
                None,
                br#"{"entity_id":"a","tenant_id":"t","type":"x"}"#.to_vec(),
                "missing_event_id",
            ),
            (Some(b"other"), e.to_json_bytes(), "key_mismatch"),
            (
                None,
                br#"{"entity_id":"a\u0000b","tenant_id":"t","event_id":"e","type":"x"}"#.to_vec(),
                "nul_in_id",
            ),
            (
                None,
                br#"{"entity_id":"a","tenant_id":"t","event_id":"e\u0000","type":"x"}"#.to_vec(),
                "nul_in_id",
            ),
            (
                None,
                br#"{"entity_id":"a","tenant_id":"t","event_id":"e","type":"x","payload":[1]}"#
                    .to_vec(),
                "payload_not_object",
            ),
            (
                None,
                br#"{"entity_id":"a","tenant_id":"t","event_id":"e","type":"x","payload":"{oops"}"#
                    .to_vec(),
                "payload_not_json",
            ),
        ];
        for (key, value, code) in cases {
            let err = decode(key, Some(&value), None, ContentType::Auto).unwrap_err();
            assert_eq!(err.code(), code, "{err}");
        }
    }

    #[test]
    fn header_overrides_sniffing() {
        let e = sample();
        let r = decode(
            None,
            Some(&e.to_json_bytes()),
            Some(b"application/x-protobuf"),
            ContentType::Auto,
        );
        assert_eq!(r.unwrap_err().code(), "bad_protobuf");
    }
}
