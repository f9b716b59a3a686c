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
    /// The JSON form published to the dead-letter topic and printed by the CLI.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "code": self.code,
            "reason": self.reason,
            "attempts": self.attempts,
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "key": self.key.as_deref().map(String::from_utf8_lossy),
            "value": self.value.as_deref().map(String::from_utf8_lossy),
            "headers": self.headers.iter()
                .map(|(k, v)| serde_json::json!([k, String::from_utf8_lossy(v)]))
                .collect::<Vec<_>>(),
            "entity_id": self.entity_id,
            "event_id": self.event_id,
            "event_type": self.event_type,
            "created_at": self.created_at,
            "status": self.status,
        })
    }
}
