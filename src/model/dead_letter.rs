//! The dead-letter record: an event orderly could not process, with enough
//! context for an operator to understand, fix and replay it.
//!
//! Records are written to the store in the same batch as the offset they
//! cover, and published to the dead-letter topic through the store's outbox.

use crate::model::envelope::Event;
use serde::{Deserialize, Serialize};

/// One dead-lettered message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Unique id, assigned by the store.
    pub id: u64,
    /// A stable reason code, for example `bad_json` or `handler_permanent`.
    pub code: String,
    /// The full reason, for a person.
    pub reason: String,
    /// How many times processing was attempted.
    pub attempts: u32,
    /// The topic the message was read from.
    pub topic: String,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// Its key, if any.
    pub key: Option<Vec<u8>>,
    /// Its value, as received.
    pub value: Option<Vec<u8>>,
    /// Its headers, as received.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The entity, when the message decoded far enough to name it.
    pub entity_id: Option<String>,
    /// The event id, when known.
    pub event_id: Option<String>,
    /// The event type, when known.
    pub event_type: Option<String>,
    /// When it was dead-lettered, ms since the Unix epoch.
    pub created_at: i64,
    /// `open`, `retried` (processed again, successfully) or `skipped` (an
    /// operator decided to leave it).
    pub status: String,
}

/// The status of a dead letter nobody has acted on.
pub const OPEN: &str = "open";

/// The message a dead letter is about, as it was received.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Received {
    /// Its key, if any.
    pub key: Option<Vec<u8>>,
    /// Its value, as received.
    pub value: Option<Vec<u8>>,
    /// Its headers, as received.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The topic it was read from (for a settings document served over
    /// HTTP, the URL).
    pub topic: String,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
}

impl DeadLetter {
    /// An open dead letter: `code` and `reason` say why, `attempts` how many
    /// times it was tried, `at` when (ms). The store assigns the id.
    fn open(code: String, reason: String, attempts: u32, message: Received, at: i64) -> Self {
        DeadLetter {
            id: 0,
            code,
            reason,
            attempts,
            topic: message.topic,
            partition: message.partition,
            offset: message.offset,
            key: message.key,
            value: message.value,
            headers: message.headers,
            entity_id: None,
            event_id: None,
            event_type: None,
            created_at: at,
            status: OPEN.into(),
        }
    }

    /// A message that could not be decoded into an event. It names the
    /// entity when its key is UTF-8, since the key is the entity id.
    pub fn undecodable(code: &str, reason: String, message: Received, at: i64) -> Self {
        let entity_id = message
            .key
            .as_deref()
            .and_then(|k| std::str::from_utf8(k).ok())
            .map(str::to_owned);
        DeadLetter {
            entity_id,
            ..Self::open(code.to_owned(), reason, 1, message, at)
        }
    }

    /// An event its handler rejected for good, or after `attempts` tries.
    pub fn rejected(
        code: String,
        reason: String,
        attempts: u32,
        event: &Event,
        message: Received,
        at: i64,
    ) -> Self {
        DeadLetter {
            entity_id: Some(event.entity_id.clone()),
            event_id: Some(event.event_id.clone()),
            event_type: Some(event.event_type.clone()),
            ..Self::open(code, reason, attempts, message, at)
        }
    }

    /// A tenant settings document that was rejected.
    pub fn settings_rejected(code: &str, reason: String, message: Received, at: i64) -> Self {
        Self::open(code.to_owned(), reason, 1, message, at)
    }
}

impl DeadLetter {
    /// The JSON form published to the dead-letter topic and printed by the
    /// CLI. The key, the value and each header value are a string when they
    /// are UTF-8, and `{"base64": "…"}` when they are not: nothing is lost,
    /// and binary junk grows by a third, not by the sixfold of escaped
    /// replacement characters.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "code": self.code,
            "reason": self.reason,
            "attempts": self.attempts,
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "key": self.key.as_deref().map(bytes_json),
            "value": self.value.as_deref().map(bytes_json),
            "headers": self.headers.iter()
                .map(|(k, v)| serde_json::json!([k, bytes_json(v)]))
                .collect::<Vec<_>>(),
            "entity_id": self.entity_id,
            "event_id": self.event_id,
            "event_type": self.event_type,
            "created_at": self.created_at,
            "status": self.status,
        })
    }
}

/// The most bytes of a message's value that a dead letter published to the
/// dead-letter topic carries; the store keeps the whole value.
pub const PUBLISHED_VALUE_MAX: usize = 256 * 1024;

impl DeadLetter {
    /// [`DeadLetter::to_json`] with the value cut to its first `max` bytes,
    /// so that the record fits a Kafka message; a cut value is marked
    /// `value_truncated`, with its full size in `value_bytes`. The dead letter
    /// in the store, which a retry reads, keeps the whole value.
    pub fn to_json_capped(&self, max: usize) -> serde_json::Value {
        let mut json = self.to_json();
        if let Some(v) = self.value.as_deref().filter(|v| v.len() > max) {
            json["value"] = bytes_json(&v[..max]);
            json["value_truncated"] = true.into();
            json["value_bytes"] = v.len().into();
        }
        json
    }
}

/// Bytes as JSON: the text if they are UTF-8, else `{"base64": "…"}`.
pub fn bytes_json(b: &[u8]) -> serde_json::Value {
    match std::str::from_utf8(b) {
        Ok(text) => serde_json::Value::String(text.to_owned()),
        Err(_) => serde_json::json!({ "base64": base64(b) }),
    }
}

/// Standard base64 with padding (RFC 4648).
fn base64(b: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(b.len().div_ceil(3) * 4);
    for chunk in b.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &x)| n | (x as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod bytes_tests {
    use super::*;

    #[test]
    fn bytes_are_text_when_utf8_and_base64_when_not() {
        assert_eq!(bytes_json(b"lead-1"), serde_json::json!("lead-1"));
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64(&[0xff, 0xfe, 0x00]), "//4A");
        assert_eq!(
            bytes_json(&[0xff, 0x00, 0x80]),
            serde_json::json!({"base64": "/wCA"})
        );
        // A long value is cut for publishing, and says so.
        let dl = DeadLetter {
            value: Some(vec![b'a'; 10]),
            ..DeadLetter::undecodable("bad_json", "x".into(), Received::default(), 0)
        };
        assert_eq!(dl.to_json_capped(100)["value"], "aaaaaaaaaa");
        let cut = dl.to_json_capped(4);
        assert_eq!(cut["value"], "aaaa");
        assert_eq!(cut["value_truncated"], true);
        assert_eq!(cut["value_bytes"], 10);
        // 900 KB of junk stays within 4/3 of its size, plus a little.
        let junk: Vec<u8> = (0..900_000u32)
            .map(|i| (i.wrapping_mul(7919) % 251) as u8 | 0x80)
            .collect();
        let json = bytes_json(&junk).to_string();
        assert!(json.len() <= junk.len() * 4 / 3 + 32, "{}", json.len());
    }
}
