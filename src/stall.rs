//! Stalled work: an event whose handling runs past a deadline is reported
//! (a counter, a log line, and an entry in the admin listing), never killed.
//!
//! Each shard has a [`Busy`] slot that its actors set while they handle an
//! event. A watchdog thread looks at the slots; a handler that blocks its
//! shard's thread cannot report itself, but the watchdog can.

use crate::metrics::Stats;
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What one shard is handling now.
#[derive(Debug, Default)]
pub struct Busy {
    /// Deliveries routed to this shard and not yet taken up by their entity
    /// actor: the shard's mailbox depth.
    pub queued: AtomicI64,
    since_ms: AtomicI64,
    seq: AtomicU64,
    what: Mutex<(String, String)>,
}

impl Busy {
    /// The shard starts handling `event_id` of `entity_id`.
    pub fn begin(&self, entity_id: &str, event_id: &str, now_ms: i64) {
        if let Ok(mut w) = self.what.lock() {
            // Reuse the buffers: no allocation per event once warm.
            w.0.clear();
            w.0.push_str(entity_id);
            w.1.clear();
            w.1.push_str(event_id);
        }
        self.seq.fetch_add(1, Relaxed);
        self.since_ms.store(now_ms, Relaxed);
    }

    /// The shard finished it.
    pub fn end(&self) {
        self.since_ms.store(0, Relaxed);
    }
}

/// One stalled event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StalledEvent {
    /// The shard it ran on.
    pub shard: usize,
    /// The entity.
    pub entity_id: String,
    /// The event.
    pub event_id: String,
    /// When its handling started, ms since the Unix epoch.
    pub started_at: i64,
    /// When it finished; `None` while it is still running.
    pub finished_at: Option<i64>,
}

/// The stalled events seen, newest last (the last 100).
#[derive(Debug, Default)]
pub struct Stalls {
    events: Mutex<VecDeque<(u64, StalledEvent)>>,
}

impl Stalls {
    /// How many stalled events are still running.
    pub fn running(&self) -> usize {
        self.events
            .lock()
            .map(|e| e.iter().filter(|(_, s)| s.finished_at.is_none()).count())
            .unwrap_or(0)
    }

    /// The recent stalled events.
    pub fn list(&self) -> Vec<StalledEvent> {
        self.events
            .lock()
            .map(|e| e.iter().map(|(_, s)| s.clone()).collect())
            .unwrap_or_default()
    }
}

/// Watches the shards' slots until `stop`; reports events past `deadline`.
pub fn watch(
    busy: Vec<Arc<Busy>>,
    stalls: Arc<Stalls>,
    stats: Arc<Stats>,
    deadline: Duration,
    stop: Arc<AtomicBool>,
) {
    let every = (deadline / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let deadline_ms = deadline.as_millis() as i64;
    // Per shard: the seq of the event reported as stalled, if still running.
    let mut reported: Vec<Option<u64>> = vec![None; busy.len()];
    while !stop.load(Relaxed) {
        std::thread::sleep(every);
        let now = crate::telemetry::unix_ms(std::time::SystemTime::now());
        for (shard, b) in busy.iter().enumerate() {
            let since = b.since_ms.load(Relaxed);
            let seq = b.seq.load(Relaxed);
            if let Some(r) = reported[shard] {
                if since == 0 || seq != r {
                    if let Ok(mut events) = stalls.events.lock() {
                        if let Some((_, s)) =
                            events.iter_mut().find(|(q, s)| *q == r && s.shard == shard)
                        {
                            s.finished_at = Some(now);
                            tracing::warn!(shard, entity = %s.entity_id, event = %s.event_id, ms = now - s.started_at, "stalled event finished");
                        }
                    }
                    reported[shard] = None;
                }
            }
            if since != 0 && now - since > deadline_ms && reported[shard] != Some(seq) {
                let (entity_id, event_id) = b.what.lock().map(|w| w.clone()).unwrap_or_default();
                crate::internal_events::emit(
                    crate::internal_events::EventStalled {
                        shard,
                        entity_id: &entity_id,
                        event_id: &event_id,
                        running_ms: now - since,
                    },
                    &stats,
                );
                if let Ok(mut events) = stalls.events.lock() {
                    events.push_back((
                        seq,
                        StalledEvent {
                            shard,
                            entity_id,
                            event_id,
                            started_at: since,
                            finished_at: None,
                        },
                    ));
                    if events.len() > 100 {
                        events.pop_front();
                    }
                }
                reported[shard] = Some(seq);
            }
        }
    }
}
