//! The synthetic CRM workload, and a producer that writes any event stream
//! to any Kafka-protocol broker.
//!
//! Used by `orderly produce`, `orderly demo`, the tests and the benchmark.
//! The workload is deterministic for a seed: tenants own leads and
//! appointments; leads are created, updated, deleted now and then, and record
//! conversions (`inc` on `amount`); appointments are scheduled, rescheduled and
//! completed, with external versions. A share of events arrives late (after a
//! newer event of the same entity) and a share is sent twice.

use crate::model::envelope::Event;
use crate::model::value::{Fields, Value};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use std::time::{Duration, Instant};

/// What to generate.
#[derive(Clone, Debug)]
pub struct WorkloadSpec {
    /// Messages to emit in all, duplicates included.
    pub events: u64,
    /// Distinct entities.
    pub entities: u64,
    /// Tenants; entity `i` belongs to tenant `i % tenants`.
    pub tenants: u64,
    /// Share of events delivered after a newer event of the same entity.
    pub late_ratio: f64,
    /// Share of messages that repeat an earlier event.
    pub duplicate_ratio: f64,
    /// The seed; the same seed gives the same stream.
    pub seed: u64,
    /// occurred_at of every entity's first event, ms since the Unix epoch.
    pub start_ms: i64,
    /// Time between an entity's consecutive events, ms.
    pub event_spacing_ms: i64,
    /// Zipf exponent of the entity choice: 0 is uniform; 1 and above make a
    /// few hot keys take most events.
    pub zipf: f64,
    /// Pad each `set` event's payload with a `notes` field to about this
    /// many bytes; 0 leaves payloads as they are.
    pub payload_bytes: usize,
}

impl Default for WorkloadSpec {
    fn default() -> Self {
        WorkloadSpec {
            events: 20_000,
            entities: 1_000,
            tenants: 3,
            late_ratio: 0.05,
            duplicate_ratio: 0.01,
            seed: 42,
            start_ms: 1_700_000_000_000,
            event_spacing_ms: 1_000,
            zipf: 0.0,
            payload_bytes: 0,
        }
    }
}

/// An iterator over the workload's messages, in arrival order.
pub struct Workload {
    spec: WorkloadSpec,
    rng: ChaCha8Rng,
    next_seq: Vec<u32>,
    held: Vec<(u64, Event)>,
    recent: Vec<Event>,
    emitted: u64,
    generated: u64,
    zipf: Option<rand_distr::Zipf<f64>>,
    /// The length of each event's `notes` text; 0: none.
    padding: usize,
    /// Draws the notes text, apart from `rng`, so that padding does not
    /// change which events are generated.
    padding_rng: ChaCha8Rng,
}

impl Workload {
    /// A new workload.
    pub fn new(spec: WorkloadSpec) -> Self {
        let entities = spec.entities.max(1) as usize;
        let zipf = (spec.zipf > 0.0)
            .then(|| rand_distr::Zipf::new(entities as f64, spec.zipf).ok())
            .flatten();
        Workload {
            zipf,
            padding: spec.payload_bytes.saturating_sub(64),
            padding_rng: ChaCha8Rng::seed_from_u64(spec.seed ^ 0x6e6f_7465_735f_7061),
            rng: ChaCha8Rng::seed_from_u64(spec.seed),
            next_seq: vec![0; entities],
            held: Vec::new(),
            recent: Vec::new(),
            emitted: 0,
            generated: 0,
            spec,
        }
    }

    fn make(&mut self, entity: usize) -> Event {
        let seq = self.next_seq[entity];
        self.next_seq[entity] += 1;
        self.generated += 1;
        let mut e = crm_event(
            entity as u64,
            seq,
            self.spec.tenants,
            self.spec.start_ms,
            &mut self.rng,
        );
        if self.spec.event_spacing_ms != 1_000 {
            let first = self.spec.start_ms + (entity as i64 % 997);
            e.occurred_at = first + i64::from(seq) * self.spec.event_spacing_ms;
        }
        if self.padding > 0
            && !matches!(
                e.event_type.as_str(),
                "conversion.recorded" | "lead.deleted"
            )
        {
            e.payload
                .insert("notes".into(), Value::String(self.notes()));
        }
        e
    }

    /// Text of `padding` random letters and spaces: each event's differs,
    /// like real notes, so that stored records and change records compress
    /// no better than real ones would (a run of one letter would compress
    /// to nothing and flatter the store).
    ///
    /// Each letter takes 5 bits of one 64-bit draw (12 letters a draw): a
    /// draw per letter took about a ninth of the instructions callgrind
    /// counts in an `--engine-only` run. There the events are generated
    /// before the clock starts, but in the open-loop scenarios the
    /// producer generates them on the cores orderly runs on
    /// (BENCHMARKS.md, "The generator's share").
    fn notes(&mut self) -> String {
        use rand::RngCore;
        const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz      ";
        let mut text = Vec::with_capacity(self.padding);
        while text.len() < self.padding {
            let mut bits = self.padding_rng.next_u64();
            for _ in 0..12.min(self.padding - text.len()) {
                text.push(ALPHABET[(bits & 31) as usize]);
                bits >>= 5;
            }
        }
        // Every byte is ASCII.
        String::from_utf8(text).unwrap_or_default()
    }

    fn pick_entity(&mut self) -> usize {
        use rand::distr::Distribution;
        match &self.zipf {
            // Zipf samples 1..=n; rank 1 is the hottest key.
            Some(z) => (z.sample(&mut self.rng) as usize).clamp(1, self.next_seq.len()) - 1,
            None => self.rng.random_range(0..self.next_seq.len()),
        }
    }

    fn remember(&mut self, e: &Event) {
        if self.recent.len() < 1024 {
            self.recent.push(e.clone());
        } else {
            let i = self.rng.random_range(0..self.recent.len());
            self.recent[i] = e.clone();
        }
    }
}

impl Iterator for Workload {
    type Item = Event;

    fn next(&mut self) -> Option<Event> {
        if self.emitted >= self.spec.events {
            return None;
        }
        self.emitted += 1;
        if let Some(i) = self.held.iter().position(|(due, _)| *due <= self.emitted) {
            let (_, e) = self.held.swap_remove(i);
            return Some(e);
        }
        let remaining = self.spec.events - self.emitted + 1;
        if remaining <= self.held.len() as u64 {
            return self.held.pop().map(|(_, e)| e);
        }
        let roll: f64 = self.rng.random();
        if roll < self.spec.duplicate_ratio && !self.recent.is_empty() {
            let i = self.rng.random_range(0..self.recent.len());
            return Some(self.recent[i].clone());
        }
        let entity = self.pick_entity();
        let late = self.rng.random::<f64>() < self.spec.late_ratio
            && remaining > self.held.len() as u64 + 1;
        let e = self.make(entity);
        if late {
            // Deliver the next event of this entity first; this one trails it.
            let newer = self.make(entity);
            let due = self.emitted + self.rng.random_range(1..=8);
            self.remember(&e);
            self.held.push((due, e));
            self.remember(&newer);
            return Some(newer);
        }
        self.remember(&e);
        Some(e)
    }
}

/// The id of entity `i`: every fourth is an appointment, the rest are leads.
pub fn entity_id(i: u64) -> String {
    if i % 4 == 3 {
        format!("appt-{i}")
    } else {
        format!("lead-{i}")
    }
}

/// Three ways a tenant names the workload's fields: tenant `t` maps them
/// by `FIELD_MAPPINGS[t % 3]` (external name, internal name).
pub const FIELD_MAPPINGS: [&[(&str, &str)]; 3] = [
    &[("stage", "lifecycle_stage"), ("owner", "account_owner")],
    &[("score", "lead_score"), ("source", "channel")],
    &[("status", "appointment_status")],
];

/// `FIELD_MAPPINGS[set]` as a document's `field_mappings`.
pub fn field_mappings(set: usize) -> std::collections::BTreeMap<String, String> {
    FIELD_MAPPINGS[set % FIELD_MAPPINGS.len()]
        .iter()
        .map(|(from, to)| (from.to_string(), to.to_string()))
        .collect()
}

/// The settings document of `tenant-{tenant}` at `version` (at least 1):
/// its fields mapped by [`FIELD_MAPPINGS`], padded with integration flags
/// to about `bytes` of JSON. Versions differ in one flag, so each is a
/// change the registry compiles and swaps in.
pub fn tenant_settings(
    tenant: u64,
    version: u64,
    bytes: usize,
) -> crate::settings::SettingsDocument {
    let mut doc = crate::settings::SettingsDocument {
        tenant_id: format!("tenant-{tenant}"),
        version: version.max(1),
        field_mappings: field_mappings(tenant as usize),
        integration_flags: [("even_version".to_owned(), version % 2 == 0)].into(),
        ..Default::default()
    };
    // Each flag adds `"pad-000000":false,` (19 bytes).
    let missing = bytes.saturating_sub(doc.to_json_bytes().len());
    doc.integration_flags
        .extend((0..missing.div_ceil(19)).map(|i| (format!("pad-{i:06}"), false)));
    doc
}

fn obj(pairs: Vec<(&str, Value)>) -> Fields {
    pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

/// The `seq`-th event of entity `i`. Deterministic given the rng state.
pub fn crm_event(i: u64, seq: u32, tenants: u64, start_ms: i64, rng: &mut impl Rng) -> Event {
    let id = entity_id(i);
    let tenant = format!("tenant-{}", i % tenants.max(1));
    let occurred_at = start_ms + i64::from(seq) * 1_000 + (i % 997) as i64;
    let stages = ["new", "contacted", "qualified", "proposal", "won", "lost"];
    let (event_type, version, payload) = if id.starts_with("appt") {
        let version = Some(u64::from(seq) + 1);
        match (seq, rng.random_range(0..10)) {
            (0, _) => (
                "appointment.scheduled",
                version,
                obj(vec![
                    ("status", Value::String("scheduled".into())),
                    (
                        "at",
                        Value::Int(start_ms + 86_400_000 + rng.random_range(0..1_000_000)),
                    ),
                    ("lead", Value::String(entity_id(i - 1))),
                ]),
            ),
            (_, 0..=6) => (
                "appointment.rescheduled",
                version,
                obj(vec![(
                    "at",
                    Value::Int(start_ms + 86_400_000 + rng.random_range(0..1_000_000)),
                )]),
            ),
            _ => (
                "appointment.completed",
                version,
                obj(vec![("status", Value::String("completed".into()))]),
            ),
        }
    } else {
        match (seq, rng.random_range(0..100)) {
            (0, _) => (
                "lead.created",
                None,
                obj(vec![
                    ("stage", Value::String("new".into())),
                    (
                        "owner",
                        Value::String(format!("rep-{}", rng.random_range(0..20))),
                    ),
                    (
                        "source",
                        Value::String(["web", "ads", "referral"][rng.random_range(0..3)].into()),
                    ),
                ]),
            ),
            (_, 0..=64) => (
                "lead.updated",
                None,
                obj(vec![
                    (
                        "stage",
                        Value::String(stages[rng.random_range(0..stages.len())].into()),
                    ),
                    ("score", Value::Int(rng.random_range(0..100))),
                ]),
            ),
            (_, 65..=97) => (
                "conversion.recorded",
                None,
                obj(vec![
                    ("amount", Value::Int(rng.random_range(1..500))),
                    ("conversions", Value::Int(1)),
                ]),
            ),
            _ => ("lead.deleted", None, Fields::new()),
        }
    };
    Event {
        event_id: format!("{id}-{seq}"),
        entity_id: id,
        tenant_id: tenant,
        event_type: event_type.into(),
        occurred_at,
        version,
        payload,
    }
}

/// Malformed messages of every kind orderly dead-letters.
pub fn malformed_samples() -> Vec<Outgoing> {
    let ok = |entity: &str| {
        format!(
            r#"{{"entity_id":"{entity}","tenant_id":"tenant-0","event_id":"bad-1","type":"lead.updated","occurred_at":1,"payload":{{"x":1}}}}"#
        )
    };
    vec![
        (Some(b"junk-1".to_vec()), vec![0xde, 0xad, 0xbe, 0xef, 0xff]),
        (Some(b"junk-2".to_vec()), b"{\"entity_id\": ".to_vec()),
        (None, br#"{"tenant_id":"tenant-0","event_id":"x","type":"lead.updated"}"#.to_vec()),
        (Some(b"junk-4".to_vec()), br#"{"entity_id":"junk-4","tenant_id":"tenant-0","type":"lead.updated"}"#.to_vec()),
        (Some(b"someone-else".to_vec()), ok("junk-5").into_bytes()),
        (
            Some(b"junk-6".to_vec()),
            br#"{"entity_id":"junk-6","tenant_id":"tenant-0","event_id":"x","type":"lead.updated","payload":[1,2]}"#.to_vec(),
        ),
        (Some(b"junk-7".to_vec()), Vec::new()),
    ]
    .into_iter()
    .map(|(key, value)| Outgoing { key, value, headers: Vec::new() })
    .collect()
}

/// The wire format `orderly produce` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Protobuf `orderly.v1.Event`.
    Proto,
    /// The JSON envelope.
    Json,
}

/// Where and how to produce.
#[derive(Clone, Debug)]
pub struct ProduceOptions {
    /// Bootstrap servers.
    pub brokers: String,
    /// The user's librdkafka properties (`[kafka]`, `[kafka.producer]`).
    pub kafka: crate::config::KafkaConfig,
    /// The topic.
    pub topic: String,
    /// Events per second; `None` for as fast as possible.
    pub rate: Option<f64>,
    /// The wire format.
    pub format: Format,
}

/// Produces every message; returns how many were sent. Blocks until the
/// broker acknowledges them all (or 60 s pass).
pub fn produce(
    opts: &ProduceOptions,
    messages: impl Iterator<Item = Outgoing>,
    mut on_sent: impl FnMut(u64),
) -> Result<u64, KafkaError> {
    let producer: ThreadedProducer<DefaultProducerContext> = crate::kafka::with_user(
        &opts.brokers,
        &opts.kafka,
        crate::kafka::Role::Producer,
        &[("linger.ms", "5"), ("message.timeout.ms", "60000")],
    )
    .create()?;
    let started = Instant::now();
    let mut sent = 0u64;
    for Outgoing {
        key,
        value,
        headers,
    } in messages
    {
        if let Some(rate) = opts.rate.filter(|r| *r > 0.0) {
            let due = started + Duration::from_secs_f64(sent as f64 / rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        let mut hs = OwnedHeaders::new();
        for (k, v) in &headers {
            hs = hs.insert(Header {
                key: k,
                value: Some(v.as_slice()),
            });
        }
        // With span export on, each message gets a producer span, and its
        // traceparent travels in the headers to the processor.
        let span = crate::telemetry::start_send_span(
            &opts.topic,
            key.as_deref().and_then(|k| std::str::from_utf8(k).ok()),
        );
        if let Some(cx) = &span {
            for (k, v) in crate::telemetry::inject_headers(cx) {
                hs = hs.insert(Header {
                    key: &k,
                    value: Some(v.as_bytes()),
                });
            }
        }
        loop {
            let mut rec = BaseRecord::<[u8], [u8]>::to(&opts.topic)
                .payload(&value)
                .headers(hs.clone());
            if let Some(k) = &key {
                rec = rec.key(k.as_slice());
            }
            match producer.send(rec) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(e),
            }
        }
        if let Some(cx) = span {
            use opentelemetry::trace::TraceContextExt;
            cx.span().end();
        }
        sent += 1;
        on_sent(sent);
    }
    producer.flush(Duration::from_secs(60))?;
    Ok(sent)
}

/// One message to produce.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    /// The key.
    pub key: Option<Vec<u8>>,
    /// The value.
    pub value: Vec<u8>,
    /// The headers.
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Encodes an event as a message: key = entity id, with a content-type header.
pub fn message_of(e: &Event, format: Format) -> Outgoing {
    let (value, ct) = match format {
        Format::Proto => (e.to_proto_bytes(), &b"application/x-protobuf"[..]),
        Format::Json => (e.to_json_bytes(), &b"application/json"[..]),
    };
    Outgoing {
        key: Some(e.entity_id.clone().into_bytes()),
        value,
        headers: vec![("content-type".into(), ct.to_vec())],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};

    #[test]
    fn tenant_settings_are_valid_padded_and_differ_by_version() {
        let registry = crate::settings::Settings::new(crate::config::Config::default().policies());
        // Unpadded, a document takes what its fields take.
        let least = tenant_settings(4, 1, 0).to_json_bytes().len();
        for bytes in [0, 500, 4096] {
            let doc = tenant_settings(4, 1, bytes);
            let len = doc.to_json_bytes().len();
            assert!(
                len >= bytes && len < bytes.max(least) + 20,
                "{bytes}: {len} bytes"
            );
            assert_eq!(doc.field_mappings, field_mappings(1));
        }
        registry.apply_document(tenant_settings(4, 1, 500)).unwrap();
        let again = registry.apply_document(tenant_settings(4, 2, 500)).unwrap();
        assert!(
            !matches!(again, crate::settings::Applied::Unchanged),
            "{again:?}"
        );
        assert_eq!(registry.compiled(), 2);
    }

    #[test]
    fn deterministic_with_late_and_duplicate_events() {
        let spec = WorkloadSpec {
            events: 5_000,
            entities: 200,
            ..Default::default()
        };
        let a: Vec<Event> = Workload::new(spec.clone()).collect();
        let b: Vec<Event> = Workload::new(spec).collect();
        assert_eq!(a.len(), 5_000);
        assert_eq!(a, b);
        let mut seen = HashSet::new();
        let mut dups = 0;
        let mut late = 0;
        let mut high: HashMap<String, (Option<u64>, i64, String)> = HashMap::new();
        for e in &a {
            if !seen.insert((e.entity_id.clone(), e.event_id.clone())) {
                dups += 1;
                continue;
            }
            let key = (e.version, e.occurred_at, e.event_id.clone());
            let h = high.entry(e.entity_id.clone()).or_insert(key.clone());
            if key < *h {
                late += 1;
            } else {
                *h = key;
            }
        }
        assert!((25..=100).contains(&dups), "duplicates: {dups}");
        assert!((150..=400).contains(&late), "late: {late}");
    }
}
