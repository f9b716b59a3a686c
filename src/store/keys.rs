//! The key layout: one prefix byte per kind of value, then `\0`, then the
//! parts that order it (see the table in the module above).

use crate::model::fold::Home;

pub(super) const ENTITY: u8 = b'e';
pub(super) const CHECKPOINT: u8 = b'c';
pub(super) const DEAD_LETTER: u8 = b'd';
pub(super) const OUTBOX: u8 = b'o';
pub(super) const DEAD_LETTER_INDEX: u8 = b'x';
pub(super) const ANOMALY: u8 = b'a';
pub(super) const META: u8 = b'm';
pub(super) const HISTORY: u8 = b'h';
pub(super) const PARKED: u8 = b'p';
/// Outbox bundles: all the messages one batch publishes, under one key.
pub(super) const OUTBOX_BUNDLE: u8 = b'b';
/// The partition index: entities by home partition.
pub(super) const PARTITION_INDEX: u8 = b'i';
/// Changelog positions.
pub(super) const CHANGELOG: u8 = b'l';
/// Outbox records the broker refused for good, kept for operators.
pub(super) const UNDELIVERABLE: u8 = b'u';
/// Pieces of spilled entity records.
pub(super) const SPILL: u8 = b's';
/// Changelog records committed to the store but not yet acknowledged by the
/// broker, by the changelog partition (the home) they go to.
pub(super) const CHANGELOG_PENDING: u8 = b'w';

pub(super) fn pending_prefix(home: &Home) -> Vec<u8> {
    let mut k = key(CHANGELOG_PENDING, home.topic.as_bytes());
    k.push(0);
    k.extend_from_slice(&home.partition.to_be_bytes());
    k
}

pub(super) fn pending_key(home: &Home, entity: &str) -> Vec<u8> {
    let mut k = pending_prefix(home);
    k.extend_from_slice(entity.as_bytes());
    k
}
pub(super) fn index_key(home: &Home, entity: &str) -> Vec<u8> {
    let mut k = index_prefix(home);
    k.extend_from_slice(entity.as_bytes());
    k
}

pub(super) fn index_prefix(home: &Home) -> Vec<u8> {
    let mut k = key(PARTITION_INDEX, home.topic.as_bytes());
    k.push(0);
    k.extend_from_slice(&home.partition.to_be_bytes());
    k
}

pub(super) fn changelog_key(topic: &str, partition: i32) -> Vec<u8> {
    let mut k = key(CHANGELOG, topic.as_bytes());
    k.push(0);
    k.extend_from_slice(&partition.to_be_bytes());
    k
}
pub(super) fn key(prefix: u8, rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + rest.len());
    k.push(prefix);
    k.push(0);
    k.extend_from_slice(rest);
    k
}

pub(super) fn dead_letter_index_key(topic: &str, partition: i32, offset: i64) -> Vec<u8> {
    let mut k = key(DEAD_LETTER_INDEX, topic.as_bytes());
    k.push(0);
    k.extend_from_slice(&partition.to_be_bytes());
    k.extend_from_slice(&offset.to_be_bytes());
    k
}

pub(super) fn history_prefix(entity_id: &str) -> Vec<u8> {
    let mut k = key(HISTORY, entity_id.as_bytes());
    k.push(0);
    k
}

pub(super) const ANOMALY_SEQ: &[u8] = b"anomaly_seq";
pub(super) const OPEN_DEAD_LETTERS: &[u8] = b"open_dead_letters";
/// Present once the parked index and the open dead-letter count exist.
pub(super) const OPERATOR_INDEX: &[u8] = b"operator_index_v1";

pub(super) fn checkpoint_key(topic: &str, partition: i32) -> Vec<u8> {
    let mut k = key(CHECKPOINT, topic.as_bytes());
    k.push(0);
    k.extend_from_slice(&partition.to_be_bytes());
    k
}
