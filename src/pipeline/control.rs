//! [`Control`]: what an operator can ask of a running pipeline (the admin
//! API and the dashboard use it): its state, partitions, dead letters,
//! parked entities, retries and skips.

use super::*;

/// An operator action failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No such dead letter or entity.
    #[error("{0}")]
    NotFound(String),
    /// The action does not apply in the current state.
    #[error("{0}")]
    Conflict(String),
    /// The store or an actor failed.
    #[error("{0}")]
    Internal(String),
}

/// What operators can do to a running pipeline; cheap to clone.
#[derive(Clone)]
pub struct Control {
    pub(super) store: Arc<SledStore>,
    pub(super) router: Router,
    pub(super) writer: tokio::sync::mpsc::UnboundedSender<WriterMsg>,
    pub(super) ready: Arc<AtomicBool>,
    pub(super) store_ok: Arc<AtomicBool>,
    pub(super) brokers_ok: Arc<AtomicBool>,
    pub(super) fatal: Arc<Fatal>,
    pub(super) stats: Arc<Stats>,
    pub(super) checkpointer: Arc<crate::checkpoint::Checkpointer>,
    pub(super) stalls: Arc<crate::stall::Stalls>,
    pub(super) settings: Arc<crate::settings::Settings>,
    pub(super) identity: Arc<Identity>,
}

/// What `GET /api/overview` returns: everything the dashboard shows at a glance.
#[derive(Debug, serde::Serialize)]
pub struct Overview {
    /// orderly's version.
    pub version: &'static str,
    /// When this was taken, ms since the Unix epoch.
    pub now_ms: i64,
    /// Whether the pipeline is ready.
    pub ready: bool,
    /// Why not, when it is not.
    pub not_ready_reason: Option<String>,
    /// The pipeline's totals.
    pub counters: crate::metrics::CounterSnapshot,
    /// The pipeline's levels.
    pub gauges: GaugesOverview,
    /// End-to-end latency.
    pub latency_ms: crate::metrics::LatencySnapshot,
    /// Lag and checkpoint per partition.
    pub partitions: Vec<PartitionOverview>,
    /// The latest corrections, newest first.
    pub recent_corrections: Vec<crate::metrics::Correction>,
}

/// The gauges of an [`Overview`]: the pipeline's, and two read at the time.
#[derive(Debug, serde::Serialize)]
pub struct GaugesOverview {
    /// The pipeline's gauges.
    #[serde(flatten)]
    pub stats: crate::metrics::GaugeSnapshot,
    /// Events running past the stall deadline now.
    pub stalled: usize,
    /// Deliveries queued over all shards.
    pub mailbox_depth: i64,
}

/// One partition's row in an [`Overview`].
#[derive(Debug, serde::Serialize)]
pub struct PartitionOverview {
    /// The input topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// Consumer lag, from librdkafka's statistics.
    pub lag: Option<i64>,
    /// The durable checkpoint: the next offset to consume.
    pub checkpoint: Option<i64>,
    /// Seconds since the checkpoint last advanced.
    pub checkpoint_age_s: Option<f64>,
}

/// Who this instance is, for operators.
#[derive(Debug, Clone)]
pub struct Identity {
    /// [`Config::instance_name`](crate::config::Config::instance_name).
    pub instance: String,
    /// The changelog, when it is on.
    pub changelog: Option<crate::config::ChangelogConfig>,
}

impl Control {
    /// The partitions this instance owns and holds state for: entities,
    /// checkpoint, lag and changelog position of each, for `orderly partitions`.
    pub fn partitions(&self) -> serde_json::Value {
        use serde_json::json;
        let assigned = self
            .stats
            .source.assigned
            .lock()
            .map(|a| a.clone())
            .unwrap_or_default();
        let counts = self.store.partition_counts().unwrap_or_default();
        let lag = self.stats.source.lag.lock().map(|l| l.clone()).unwrap_or_default();
        let mut held = assigned.clone();
        held.extend(counts.keys().cloned());
        // Each topic's checkpoints in one scan.
        let mut checkpoints: HashMap<&str, std::collections::BTreeMap<i32, i64>> = HashMap::new();
        for tp in &held {
            if !checkpoints.contains_key(&*tp.topic) {
                let c = self.store.checkpoints(&tp.topic).unwrap_or_default();
                checkpoints.insert(&tp.topic, c);
            }
        }
        let rows: Vec<_> = held
            .iter()
            .map(|home| {
                let (topic, partition) = (&*home.topic, home.partition);
                let checkpoint = checkpoints[topic].get(&partition).copied();
                let changelog = self
                    .identity
                    .changelog
                    .as_ref()
                    .and_then(|changelog| {
                        self.store
                            .changelog_position(&changelog.topic_of(topic), partition)
                            .ok()
                            .flatten()
                    });
                json!({
                    "topic": topic,
                    "partition": partition,
                    "assigned": assigned.contains(home),
                    "entities": counts.get(home).copied().unwrap_or(0),
                    "checkpoint": checkpoint,
                    "lag": lag.get(home),
                    "changelog_position": changelog,
                })
            })
            .collect();
        json!({
            "instance": self.identity.instance,
            "ready": self.not_ready().is_none(),
            "partitions": rows,
        })
    }

    /// Every tenant's compiled settings.
    pub fn settings(&self) -> &crate::settings::Settings {
        &self.settings
    }

    /// The recent stalled events (those still running have no `finished_at`).
    pub fn stalled(&self) -> Vec<crate::stall::StalledEvent> {
        self.stalls.list()
    }

    /// The store, for reads.
    pub fn store(&self) -> &SledStore {
        &self.store
    }

    /// Sets the gauges that are read rather than counted; call before
    /// rendering metrics.
    pub fn sample_gauges(&self) {
        let stalled_now = self.stalls.running();
        crate::internal_events::emit(
            crate::internal_events::GaugesSampled {
                mailbox_depths: &self.router.mailbox_depths(),
                stalled_now,
                store_size_bytes: self.store.size_on_disk().ok(),
                entity_filter: self.store.key_filter(),
                checkpoints: &self.checkpointer.durable_checkpoints(),
            },
            &self.stats,
        );
    }

    /// Everything the dashboard shows at a glance.
    pub fn overview(&self) -> Overview {
        let now = std::time::SystemTime::now();
        let stats = self.stats.snapshot();
        let lag = self.stats.source.lag.lock().map(|l| l.clone()).unwrap_or_default();
        let checkpoints = self.checkpointer.durable_checkpoints();
        let mut keys: std::collections::BTreeSet<_> = lag.keys().cloned().collect();
        keys.extend(checkpoints.keys().cloned());
        let partitions = keys
            .into_iter()
            .map(|k| {
                let cp = checkpoints.get(&k);
                PartitionOverview {
                    lag: lag.get(&k).copied(),
                    checkpoint: cp.map(|c| c.0),
                    checkpoint_age_s: cp
                        .map(|c| now.duration_since(c.1).unwrap_or_default().as_secs_f64()),
                    topic: k.topic.to_string(),
                    partition: k.partition,
                }
            })
            .collect();
        let recent_corrections = self
            .stats
            .recent_corrections
            .lock()
            .map(|r| r.iter().rev().cloned().collect())
            .unwrap_or_default();
        Overview {
            version: env!("CARGO_PKG_VERSION"),
            now_ms: crate::telemetry::unix_ms(now),
            ready: self.not_ready().is_none(),
            not_ready_reason: self.not_ready(),
            gauges: GaugesOverview {
                stalled: self.stalls.running(),
                mailbox_depth: self.router.mailbox_depths().iter().sum(),
                stats: stats.gauges,
            },
            counters: stats.counters,
            latency_ms: stats.latency_ms,
            partitions,
            recent_corrections,
        }
    }

    /// The counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Why the pipeline is not ready, or `None` if it is.
    pub fn not_ready(&self) -> Option<String> {
        if let Some(r) = self.fatal.reason() {
            return Some(format!("stopped: {r}"));
        }
        if !self.store_ok.load(Relaxed) {
            return Some("store writes are failing; retrying".into());
        }
        if !self.brokers_ok.load(Relaxed) {
            return Some("all Kafka brokers are down; retrying".into());
        }
        if self.stats.changelog.produce_failing.load(Relaxed) {
            return Some(
                "changelog records are not acknowledged; retrying, nothing is checkpointed".into(),
            );
        }
        if !self.settings.is_caught_up() {
            return Some("reading tenant settings; processing has not started".into());
        }
        if !self.ready.load(Relaxed) {
            return Some("no partitions assigned yet".into());
        }
        None
    }

    fn open_dead_letter(
        &self,
        id: u64,
    ) -> Result<crate::model::dead_letter::DeadLetter, ControlError> {
        let dl = self
            .store
            .dead_letter(id)
            .map_err(|e| ControlError::Internal(e.to_string()))?
            .ok_or_else(|| ControlError::NotFound(format!("no dead letter {id}")))?;
        if dl.status != crate::model::dead_letter::OPEN {
            return Err(ControlError::Conflict(format!(
                "dead letter {id} is already {}",
                dl.status
            )));
        }
        Ok(dl)
    }

    /// Processes a dead letter's event again, through its entity's actor (a
    /// late one is re-folded, so the entity's order is kept). Returns the outcome.
    pub async fn retry_dead_letter(&self, id: u64) -> Result<&'static str, ControlError> {
        let dl = self.open_dead_letter(id)?;
        if dl.code.starts_with("settings_") {
            return Err(ControlError::Conflict(format!(
                "dead letter {id} is a rejected settings document, not an event: write a corrected version (orderly settings put), then skip this one"
            )));
        }
        let content_type = dl
            .headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
            .map(|(_, v)| v.as_slice());
        let key = dl.key.as_deref();
        let value = dl.value.as_deref();
        let event = crate::model::envelope::decode(key, value, content_type, Default::default())
            .or_else(|_| crate::model::envelope::decode(key, value, None, Default::default()))
            .map_err(|e| {
                ControlError::Conflict(format!("dead letter {id} still cannot be decoded: {e}"))
            })?;
        let came_from = crate::model::position::TopicPartition::new(dl.topic, dl.partition);
        self.check_owned(id, &event.entity_id, &came_from)?;
        let origin = crate::model::fold::Origin::new(came_from, dl.offset);
        self.router
            .retry(crate::entity::RetryDeadLetter { event, origin, id })
            .await
            .map_err(ControlError::Conflict)
    }

    /// Refuses a retry on an instance that does not own the entity's
    /// partition: applied here, it would change an orphan record that never
    /// reaches the changelog, and the owner would never see it. The entity
    /// lives where its record says (where it moved to, if it moved), or with
    /// no record, on the partition the message came from.
    fn check_owned(
        &self,
        id: u64,
        entity: &str,
        came_from: &crate::model::position::TopicPartition,
    ) -> Result<(), ControlError> {
        let record = self
            .store
            .load_entity(entity)
            .map_err(|e| ControlError::Internal(e.to_string()))?;
        let lives = record
            .and_then(|r| r.placement.moved_to.or(r.placement.home))
            .unwrap_or_else(|| came_from.clone());
        let owned = self
            .stats
            .source
            .assigned
            .lock()
            .map(|a| a.contains(&lives))
            .unwrap_or(false);
        if owned {
            Ok(())
        } else {
            Err(ControlError::Conflict(format!(
                "dead letter {id}: entity {entity} lives on {lives}, which this instance does not own; retry it on the instance that does (orderly partitions names it)"
            )))
        }
    }

    /// Marks a dead letter skipped: an operator decided to leave it. Returns once durable.
    pub async fn skip_dead_letter(&self, id: u64) -> Result<(), ControlError> {
        self.open_dead_letter(id)?;
        let intent = crate::writer::WriteIntent {
            entity: None,
            dead_letter: None,
            outbox: Vec::new(),
            anomalies: Vec::new(),
            history: Vec::new(),
            ack: None,
            durable: None,
            resolve_dead_letter: Some((crate::writer::DeadLetterRef::Id(id), "skipped")),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        self.writer
            .send(WriterMsg::Write(Box::new(intent)))
            .and_then(|_| self.writer.send(WriterMsg::Barrier(tx)))
            .map_err(|_| ControlError::Internal("the store writer has stopped".into()))?;
        tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(30)))
            .await
            .map_err(|e| ControlError::Internal(e.to_string()))?
            .map_err(|_| ControlError::Internal("the store writer did not confirm in 30 s".into()))
    }

    /// Releases a parked entity (or skips the event that parked it, then releases it).
    pub async fn resolve_parked(
        &self,
        entity_id: &str,
        skip: bool,
    ) -> Result<crate::entity::Released, ControlError> {
        match self.store.load_entity(entity_id) {
            Ok(Some(r)) if r.parking.parked.is_some() => {}
            Ok(Some(_)) => {
                return Err(ControlError::Conflict(format!(
                    "entity {entity_id} is not parked"
                )))
            }
            Ok(None) => return Err(ControlError::NotFound(format!("no entity {entity_id}"))),
            Err(e) => return Err(ControlError::Internal(e.to_string())),
        }
        self.router
            .resolve(entity_id, skip)
            .await
            .map_err(ControlError::Internal)
    }
}
