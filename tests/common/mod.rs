//! Scenario-test helpers: a real broker (librdkafka's mock cluster), topics
//! with random names, event streams and an independent oracle, `orderly run`
//! as a child process, and a real OTLP/HTTP receiver.
#![allow(dead_code)]

use orderly::model::envelope::Event;
use orderly::tools::broker::EmbeddedBroker;
use orderly::tools::workload::{self, Format, Outgoing, ProduceOptions};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A broker with a random topic of `partitions` partitions and a dead-letter topic.
pub struct TestTopic {
    pub broker: EmbeddedBroker,
    pub brokers: String,
    pub topic: String,
    pub dead_letters: String,
    pub group: String,
    pub partitions: i32,
}

impl TestTopic {
    pub fn new(partitions: i32) -> TestTopic {
        let broker = EmbeddedBroker::start(1).expect("mock cluster");
        let suffix: u32 = rand::rng().random();
        let topic = format!("events-{suffix:08x}");
        let dead_letters = format!("dead-letters-{suffix:08x}");
        broker
            .create_topic(&topic, partitions)
            .expect("create topic");
        broker
            .create_topic(&dead_letters, 1)
            .expect("create dlq topic");
        for t in ["changes", "anomalies"] {
            broker
                .create_topic(&format!("{t}-{suffix:08x}"), 1)
                .expect("create topic");
        }
        broker
            .create_topic(&format!("derived-{suffix:08x}"), 2)
            .expect("create topic");
        TestTopic {
            brokers: broker.bootstrap_servers(),
            broker,
            topic,
            dead_letters,
            group: format!("group-{suffix:08x}"),
            partitions,
        }
    }

    /// A config for this topic, with a fast-failing group for crash tests.
    pub fn config(&self, data_dir: &Path) -> orderly::config::Config {
        orderly::config::Config {
            brokers: self.brokers.clone(),
            topic: self.topic.clone(),
            group: self.group.clone(),
            dead_letter_topic: self.dead_letters.clone(),
            // Tests run many instances at once: any free port for the admin API.
            admin_addr: "127.0.0.1:0".into(),
            changes_topic: self.topic.replace("events-", "changes-"),
            anomalies_topic: self.topic.replace("events-", "anomalies-"),
            data_dir: data_dir.to_owned(),
            types: orderly::config::Config::crm_types(),
            kafka: fast_group(),
            ..Default::default()
        }
    }

    /// Writes `config` as a TOML file for `orderly run`.
    pub fn config_file(&self, dir: &Path, data_dir: &Path) -> PathBuf {
        let path = dir.join("orderly.toml");
        let text = toml::to_string(&self.config(data_dir)).expect("config serialises");
        std::fs::write(&path, text).expect("write config");
        path
    }

    pub fn produce(&self, messages: impl Iterator<Item = Outgoing>) -> u64 {
        produce_to(&self.brokers, &self.topic, None, messages)
    }

    pub fn produce_events(&self, events: &[Event]) -> u64 {
        self.produce(
            events
                .iter()
                .map(|e| workload::message_of(e, Format::Proto)),
        )
    }

    /// Sum of the partitions' high watermarks: messages on the topic.
    pub fn end_offsets(&self) -> BTreeMap<i32, i64> {
        let c = self.admin_consumer();
        (0..self.partitions)
            .map(|p| {
                let (_, high) = c
                    .fetch_watermarks(&self.topic, p, Duration::from_secs(10))
                    .expect("watermarks");
                (p, high)
            })
            .collect()
    }

    /// The group's committed offsets.
    pub fn committed(&self) -> BTreeMap<i32, i64> {
        let c = self.admin_consumer();
        let mut tpl = TopicPartitionList::new();
        for p in 0..self.partitions {
            tpl.add_partition(&self.topic, p);
        }
        match c.committed_offsets(tpl, Duration::from_secs(10)) {
            Ok(tpl) => tpl
                .elements()
                .iter()
                .map(|e| {
                    (
                        e.partition(),
                        match e.offset() {
                            Offset::Offset(o) => o,
                            _ => -1,
                        },
                    )
                })
                .collect(),
            Err(_) => BTreeMap::new(),
        }
    }

    /// Waits until the group has committed every message on the topic,
    /// including any written meanwhile (orderly forwards events to it).
    pub fn wait_all_committed(&self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let end = self.end_offsets();
            let committed = self.committed();
            if committed == end {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "not all committed after {timeout:?}: committed {committed:?}, end {end:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn admin_consumer(&self) -> BaseConsumer {
        ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", &self.group)
            .set("enable.auto.commit", "false")
            .create()
            .expect("admin consumer")
    }

    /// Reads every message of `topic` from the beginning (for dead-letter checks).
    pub fn read_all(&self, topic: &str, expected: usize, timeout: Duration) -> Vec<Vec<u8>> {
        self.read_until(topic, timeout, |read| read.len() >= expected)
    }

    /// Reads every partition of `topic` from the beginning until `done`
    /// says so of what was read, or `timeout` passes.
    pub fn read_until(
        &self,
        topic: &str,
        timeout: Duration,
        mut done: impl FnMut(&[Vec<u8>]) -> bool,
    ) -> Vec<Vec<u8>> {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set(
                "group.id",
                format!("reader-{}", rand::rng().random::<u32>()),
            )
            .set("auto.offset.reset", "earliest")
            .create()
            .expect("reader");
        let partitions = c
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .ok()
            .and_then(|m| m.topics().first().map(|t| t.partitions().len() as i32))
            .unwrap_or(1)
            .max(1);
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .expect("tpl");
        }
        c.assign(&tpl).expect("assign");
        let mut out = Vec::new();
        let deadline = Instant::now() + timeout;
        while !done(&out) && Instant::now() < deadline {
            if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
                use rdkafka::Message;
                out.push(m.payload().unwrap_or_default().to_vec());
            }
        }
        out
    }
}

/// Consumer properties that make a killed member leave the group quickly.
pub fn fast_group() -> orderly::config::KafkaConfig {
    orderly::config::KafkaConfig::for_consumers(&[
        ("session.timeout.ms", "6000"),
        ("heartbeat.interval.ms", "500"),
    ])
}

pub fn produce_to(
    brokers: &str,
    topic: &str,
    rate: Option<f64>,
    messages: impl Iterator<Item = Outgoing>,
) -> u64 {
    produce_with(brokers, topic, rate, Default::default(), messages)
}

/// [`produce_to`] with the producer given these librdkafka properties.
pub fn produce_with(
    brokers: &str,
    topic: &str,
    rate: Option<f64>,
    kafka: orderly::config::KafkaConfig,
    messages: impl Iterator<Item = Outgoing>,
) -> u64 {
    let opts = ProduceOptions {
        brokers: brokers.into(),
        kafka,
        topic: topic.into(),
        rate,
        format: Format::Proto,
    };
    workload::produce(&opts, messages, |_| {}).expect("produce")
}

/// `per_entity` distinct CRM events for each of `entities` entities, arriving
/// in a random order (so shuffled within each entity), plus about
/// `dup_ratio` duplicates re-sent later.
pub fn shuffled_stream(entities: u64, per_entity: u32, dup_ratio: f64, seed: u64) -> Vec<Event> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut events = Vec::new();
    for i in 0..entities {
        for seq in 0..per_entity {
            events.push(workload::crm_event(i, seq, 5, 1_700_000_000_000, &mut rng));
        }
    }
    events.shuffle(&mut rng);
    let dups = (events.len() as f64 * dup_ratio) as usize;
    for _ in 0..dups {
        let from = rng.random_range(0..events.len());
        let e = events[from].clone();
        let to = rng.random_range(from..=events.len());
        events.insert(to, e);
    }
    events
}

/// The oracle: folds each entity's distinct events in order-key order with
/// its own implementation of set / inc / delete, independent of orderly's.
pub struct Oracle {
    pub state: BTreeMap<String, (serde_json::Map<String, serde_json::Value>, bool)>,
    pub distinct: HashMap<String, u64>,
}

impl Oracle {
    pub fn of(events: &[Event]) -> Oracle {
        let reducers: HashMap<String, orderly::model::handler::ReduceOp> =
            orderly::config::Config::crm_types()
                .into_iter()
                .map(|(t, c)| (t, c.reducer))
                .collect();
        let mut seen = HashSet::new();
        let mut by_entity: BTreeMap<String, Vec<&Event>> = BTreeMap::new();
        for e in events {
            if seen.insert((e.entity_id.clone(), e.event_id.clone())) {
                by_entity.entry(e.entity_id.clone()).or_default().push(e);
            }
        }
        let mut state = BTreeMap::new();
        let mut distinct = HashMap::new();
        for (id, mut evs) in by_entity {
            evs.sort_by(|a, b| {
                (a.version, a.occurred_at, &a.event_id).cmp(&(
                    b.version,
                    b.occurred_at,
                    &b.event_id,
                ))
            });
            distinct.insert(id.clone(), evs.len() as u64);
            let mut fields = serde_json::Map::new();
            let mut deleted = false;
            for e in evs {
                let payload = orderly::model::value::fields_to_json(&e.payload);
                let payload = payload.as_object().expect("object");
                use orderly::model::handler::ReduceOp::*;
                match reducers.get(&e.event_type).copied().unwrap_or(Set) {
                    Set => {
                        deleted = false;
                        for (k, v) in payload {
                            fields.insert(k.clone(), v.clone());
                        }
                    }
                    Inc => {
                        // Writing a field after a tombstone revives the entity.
                        deleted &= payload.is_empty();
                        for (k, v) in payload {
                            let old = fields.get(k).and_then(|o| o.as_i64()).unwrap_or(0);
                            fields.insert(
                                k.clone(),
                                serde_json::json!(old + v.as_i64().expect("int")),
                            );
                        }
                    }
                    Delete => {
                        fields.clear();
                        deleted = true;
                    }
                }
            }
            state.insert(id, (fields, deleted));
        }
        Oracle { state, distinct }
    }

    /// Compares with a store: same entities, same fields, and each entity's
    /// applied count equals its distinct events. Returns the mismatches.
    pub fn diff(&self, store: &dyn orderly::store::Store) -> Vec<String> {
        self.diff_excluding(store, &[])
    }

    /// As [`Oracle::diff`], ignoring the entities in `skip` (and `junk-*`).
    pub fn diff_excluding(&self, store: &dyn orderly::store::Store, skip: &[&str]) -> Vec<String> {
        self.diff_found(
            store
                .entities()
                .map(|r| r.expect("record decodes"))
                .filter(|r| {
                    !r.entity_id.starts_with("junk") && !skip.contains(&r.entity_id.as_str())
                })
                .map(|r| Found {
                    state: orderly::model::value::fields_to_json(&r.state.fields),
                    deleted: r.state.deleted,
                    applied: r.counters.applied_events,
                    id: r.entity_id,
                }),
        )
    }

    /// Compares entities found (in one store, or gathered from several
    /// instances) with the oracle: each present exactly once, the same
    /// state, and applied once per distinct event. Returns the mismatches.
    pub fn diff_found(&self, found: impl IntoIterator<Item = Found>) -> Vec<String> {
        let mut problems = Vec::new();
        let mut seen = HashSet::new();
        for f in found {
            if !seen.insert(f.id.clone()) {
                problems.push(format!("{}: present more than once", f.id));
                continue;
            }
            let Some((fields, deleted)) = self.state.get(&f.id) else {
                problems.push(format!("{}: not in the oracle", f.id));
                continue;
            };
            if f.state.as_object() != Some(fields) || f.deleted != *deleted {
                problems.push(format!(
                    "{}: state {} deleted={}, oracle {fields:?} deleted={deleted}",
                    f.id, f.state, f.deleted
                ));
            }
            if f.applied != self.distinct[&f.id] {
                problems.push(format!(
                    "{}: applied {} events, oracle has {} distinct",
                    f.id, f.applied, self.distinct[&f.id]
                ));
            }
        }
        if seen.len() != self.state.len() {
            problems.push(format!(
                "found {} entities, oracle {}",
                seen.len(),
                self.state.len()
            ));
        }
        problems
    }
}

/// The sum of a metric family's series (every label set) at the `/metrics`
/// of the instance whose admin server is at `admin` (host:port); 0 when
/// absent or unreachable.
pub fn metric(admin: &str, name: &str) -> f64 {
    let text = reqwest::blocking::get(format!("http://{admin}/metrics"))
        .and_then(|r| r.text())
        .unwrap_or_default();
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `orderly state dump` of a stopped instance's data dir: one JSON value
/// per entity.
pub fn state_dump(data_dir: &Path) -> Vec<serde_json::Value> {
    output_ok(
        Command::new(env!("CARGO_BIN_EXE_orderly"))
            .args(["state", "dump", "--data-dir"])
            .arg(data_dir),
    )
    .lines()
    .map(|l| serde_json::from_str(l).expect("a JSON line"))
    .collect()
}

/// Runs `cmd` to its end and returns its standard output, failing with
/// both outputs when it does not succeed.
pub fn output_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("the command runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `done` every 20 ms until it holds; fails the test after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One entity as a store or `orderly state dump` has it.
pub struct Found {
    pub id: String,
    pub state: serde_json::Value,
    pub deleted: bool,
    pub applied: u64,
}

impl Found {
    /// From one line of `orderly state dump`.
    pub fn from_dump(v: &serde_json::Value) -> Found {
        Found {
            id: v["entity_id"].as_str().expect("entity_id").to_owned(),
            state: v["state"].clone(),
            deleted: v["deleted"].as_bool().expect("deleted"),
            applied: v["applied_events"].as_u64().expect("applied_events"),
        }
    }
}

/// `orderly run` as a child process.
pub struct OrderlyProcess {
    pub child: Child,
    pub log: PathBuf,
    /// Where this process's output starts in `log`: a restarted instance
    /// appends to its predecessor's log, whose lines are not its own.
    log_from: usize,
}

impl OrderlyProcess {
    /// `orderly run --config <config>`.
    pub fn start(config: &Path, log: &Path, envs: &[(&str, &str)]) -> OrderlyProcess {
        let args = [
            std::ffi::OsStr::new("run"),
            "--config".as_ref(),
            config.as_os_str(),
        ];
        Self::spawn(&args, log, envs)
    }

    /// `orderly <args>`, logging to `log` (appended).
    pub fn spawn(args: &[&std::ffi::OsStr], log: &Path, envs: &[(&str, &str)]) -> OrderlyProcess {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let log_from = log_file.metadata().expect("log file size").len() as usize;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_orderly"));
        cmd.args(args)
            .env("RUST_LOG", "info")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file));
        for (k, v) in envs {
            cmd.env(k, v);
        }
        OrderlyProcess {
            child: cmd.spawn().expect("spawn orderly"),
            log: log.to_owned(),
            log_from,
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits up to `timeout` for a clean exit.
    pub fn terminate(&mut self, timeout: Duration) -> std::process::ExitStatus {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                self.kill();
                panic!(
                    "orderly did not exit within {timeout:?} of SIGTERM; log: {}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// [`Self::terminate`], and asserts that orderly exited successfully,
    /// showing its log when it did not.
    pub fn terminate_ok(&mut self, timeout: Duration) {
        let status = self.terminate(timeout);
        assert!(
            status.success(),
            "orderly exited with {status}; log: {}",
            self.log_tail()
        );
    }

    /// What this process has written to its log so far (not what an
    /// earlier process appended to the same file).
    pub fn own_log(&self) -> String {
        let bytes = std::fs::read(&self.log).unwrap_or_default();
        String::from_utf8_lossy(bytes.get(self.log_from..).unwrap_or_default()).into_owned()
    }

    /// The admin server's address, read from the log line it prints once
    /// bound (configs in tests bind port 0).
    pub fn admin_addr(&mut self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.own_log();
            if let Some(addr) = text
                .lines()
                .rev()
                .find_map(|l| l.split("dashboard at http://").nth(1))
                .and_then(|rest| rest.split('/').next())
            {
                return addr.to_owned();
            }
            if let Some(status) = self.child.try_wait().expect("wait") {
                panic!(
                    "orderly exited ({status}) before its admin server listened; log:
{}",
                    self.log_tail()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no admin server address in the log:
{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(80)..].join("\n")
    }
}

impl Drop for OrderlyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub mod otlp {
    //! A minimal OTLP/HTTP (protobuf) trace receiver.
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    pub use opentelemetry_proto::tonic::trace::v1::Span;
    use prost::Message;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;
    use std::sync::{Arc, Mutex};

    /// The resource attributes of one export, as strings.
    pub type Resource = std::collections::HashMap<String, String>;

    #[derive(Clone, Default)]
    pub struct Receiver {
        pub spans: Arc<Mutex<Vec<Span>>>,
        pub resources: Arc<Mutex<Vec<Resource>>>,
        pub port: u16,
    }

    impl Receiver {
        pub fn start() -> Receiver {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            let port = listener.local_addr().expect("addr").port();
            let spans: Arc<Mutex<Vec<Span>>> = Arc::default();
            let resources: Arc<Mutex<Vec<Resource>>> = Arc::default();
            let (sink, rsink) = (spans.clone(), resources.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming().flatten() {
                    let (sink, rsink) = (sink.clone(), rsink.clone());
                    std::thread::spawn(move || serve(stream, sink, rsink));
                }
            });
            Receiver {
                spans,
                resources,
                port,
            }
        }

        pub fn endpoint(&self) -> String {
            format!("http://127.0.0.1:{}", self.port)
        }

        pub fn spans(&self) -> Vec<Span> {
            self.spans.lock().expect("lock").clone()
        }

        /// The resource of every export received.
        pub fn resources(&self) -> Vec<Resource> {
            self.resources.lock().expect("lock").clone()
        }
    }

    fn serve(
        stream: std::net::TcpStream,
        sink: Arc<Mutex<Vec<Span>>>,
        rsink: Arc<Mutex<Vec<Resource>>>,
    ) {
        let mut writer = stream.try_clone().expect("clone");
        let mut reader = BufReader::new(stream);
        loop {
            let mut len = 0usize;
            let mut line = String::new();
            let mut first = true;
            loop {
                line.clear();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    return;
                }
                if first {
                    assert!(
                        line.starts_with("POST /v1/traces"),
                        "unexpected request: {line}"
                    );
                    first = false;
                }
                let l = line.trim_end();
                if l.is_empty() {
                    break;
                }
                if let Some((k, v)) = l.split_once(':') {
                    if k.eq_ignore_ascii_case("content-length") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                }
            }
            let mut body = vec![0; len];
            if reader.read_exact(&mut body).is_err() {
                return;
            }
            let req =
                ExportTraceServiceRequest::decode(body.as_slice()).expect("valid OTLP protobuf");
            let mut spans = sink.lock().expect("lock");
            for rs in req.resource_spans {
                use opentelemetry_proto::tonic::common::v1::any_value::Value;
                let resource = rs.resource.iter().flat_map(|r| &r.attributes);
                let resource =
                    resource.filter_map(|kv| match kv.value.as_ref()?.value.as_ref()? {
                        Value::StringValue(v) => Some((kv.key.clone(), v.clone())),
                        other => Some((kv.key.clone(), format!("{other:?}"))),
                    });
                rsink.lock().expect("lock").push(resource.collect());
                for ss in rs.scope_spans {
                    spans.extend(ss.spans);
                }
            }
            drop(spans);
            let _ = writer.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n");
        }
    }
}

/// Runs a pipeline in this thread: starts it, calls `produce` on a thread,
/// waits until at least `expected` messages are durable and the pipeline is
/// quiet (nothing in flight, the outbox published, no progress for 500 ms),
/// shuts it down and returns the store.
pub fn run_to_quiet(
    config: orderly::config::Config,
    handlers: orderly::model::handler::Handlers,
    expected: u64,
    produce: impl FnOnce() + Send + 'static,
) -> std::sync::Arc<orderly::store::SledStore> {
    use orderly::metrics::Stats;
    use orderly::store::Store;
    use std::sync::atomic::Ordering::Relaxed;
    actix::System::new().block_on(async move {
        let pipeline =
            orderly::pipeline::Pipeline::start(config, handlers).expect("pipeline starts");
        let producer = std::thread::spawn(produce);
        let stats = pipeline.stats();
        let store = pipeline.store();
        let deadline = Instant::now() + Duration::from_secs(180);
        let mut last = (0, Instant::now());
        loop {
            assert!(
                pipeline.fatal().reason().is_none(),
                "pipeline failed: {:?}",
                pipeline.fatal().reason()
            );
            let durable = Stats::get(&stats.writer.durable);
            assert!(
                Instant::now() < deadline,
                "only {durable} of {expected} durable"
            );
            if durable != last.0 {
                last = (durable, Instant::now());
            }
            let quiet =
                stats.source.in_flight.load(Relaxed) == 0 && store.outbox(1).unwrap().is_empty();
            if durable >= expected && quiet && last.1.elapsed() > Duration::from_millis(500) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        producer.join().expect("producer");
        pipeline.shutdown().expect("clean shutdown");
        store
    })
}

/// Reads every message of a one-partition topic as JSON.
pub fn read_json(topic: &TestTopic, name: &str, expected: usize) -> Vec<serde_json::Value> {
    topic
        .read_all(name, expected, Duration::from_secs(20))
        .iter()
        .map(|b| serde_json::from_slice(b).expect("JSON record"))
        .collect()
}

/// An event built by hand.
pub fn event(
    entity: &str,
    id: &str,
    event_type: &str,
    at: i64,
    payload: serde_json::Value,
) -> Event {
    let orderly::model::value::Value::Object(payload) = orderly::model::value::Value::from(payload)
    else {
        panic!("payload must be an object")
    };
    Event {
        entity_id: entity.into(),
        tenant_id: "tenant-0".into(),
        event_id: id.into(),
        event_type: event_type.into(),
        occurred_at: at,
        version: None,
        payload,
    }
}

/// Which events arrive late: below their entity's high-water mark on arrival
/// (duplicates excluded).
pub fn late_on_arrival(events: &[Event]) -> HashSet<(String, String)> {
    let mut high: HashMap<String, (Option<u64>, i64, String)> = HashMap::new();
    let mut seen = HashSet::new();
    let mut late = HashSet::new();
    for e in events {
        if !seen.insert((e.entity_id.clone(), e.event_id.clone())) {
            continue;
        }
        let key = (e.version, e.occurred_at, e.event_id.clone());
        match high.get(&e.entity_id) {
            Some(h) if key < *h => {
                late.insert((e.entity_id.clone(), e.event_id.clone()));
            }
            _ => {
                high.insert(e.entity_id.clone(), key);
            }
        }
    }
    late
}

/// Like [`run_to_quiet`], but `script` drives the run from this thread (it
/// may use the mock cluster, which is not `Send`) while the pipeline runs on
/// its own actix System thread. `script` gets the operator handle and a
/// function that waits until at least n messages are durable.
pub fn run_to_quiet_with(
    config: orderly::config::Config,
    expected: u64,
    script: impl FnOnce(&orderly::pipeline::Control, &dyn Fn(u64)),
) -> std::sync::Arc<orderly::store::SledStore> {
    use orderly::metrics::Stats;
    use orderly::store::Store;
    use std::sync::atomic::Ordering::Relaxed;
    let (tx, rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let system = std::thread::spawn(move || {
        actix::System::new().block_on(async move {
            let handlers = config.handlers();
            let pipeline =
                orderly::pipeline::Pipeline::start(config, handlers).expect("pipeline starts");
            tx.send(pipeline.control()).unwrap();
            let _ = tokio::task::spawn_blocking(move || done_rx.recv()).await;
            let store = pipeline.store();
            pipeline.shutdown().expect("clean shutdown");
            store
        })
    });
    let control: orderly::pipeline::Control = rx.recv().expect("pipeline started");
    let wait_durable = |n: u64| {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Stats::get(&control.stats().writer.durable) < n {
            assert!(
                Instant::now() < deadline,
                "only {} of {n} durable",
                Stats::get(&control.stats().writer.durable)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    script(&control, &wait_durable);
    wait_durable(expected);
    let mut last = (0, Instant::now());
    loop {
        let durable = Stats::get(&control.stats().writer.durable);
        if durable != last.0 {
            last = (durable, Instant::now());
        }
        let quiet = control.stats().source.in_flight.load(Relaxed) == 0
            && control.store().outbox(1).unwrap().is_empty();
        if quiet && last.1.elapsed() > Duration::from_millis(500) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(control);
    done_tx.send(()).unwrap();
    system.join().expect("pipeline thread")
}

/// A handler (`set`) that rejects, permanently, every event carrying a
/// `currency` field while `broken` is set: a cause an operator can fix.
pub struct Validating {
    pub broken: std::sync::atomic::AtomicBool,
}

impl orderly::model::handler::Handler for Validating {
    fn apply(
        &self,
        state: &mut orderly::model::handler::EntityState,
        event: &Event,
        settings: &orderly::settings::TenantSettings,
    ) -> Result<(), orderly::model::handler::HandlerError> {
        use orderly::model::handler::{FieldReducer, HandlerError, ReduceOp};
        if self.broken.load(std::sync::atomic::Ordering::SeqCst)
            && event.payload.contains_key("currency")
        {
            return Err(HandlerError::Permanent(format!(
                "currency of {} is not mapped",
                event.event_id
            )));
        }
        FieldReducer(ReduceOp::Set).apply(state, event, settings)
    }
}

/// `invoice.updated` skips failed events; `contract.updated` parks its entity.
/// Both are handled by `validating`.
pub fn skip_and_park(
    config: &mut orderly::config::Config,
    validating: std::sync::Arc<Validating>,
) -> orderly::model::handler::Handlers {
    use orderly::config::{FailurePolicy, TypeConfig};
    for (t, on_failure) in [
        ("invoice.updated", FailurePolicy::Skip),
        ("contract.updated", FailurePolicy::Park),
    ] {
        config.types.insert(
            t.into(),
            TypeConfig {
                on_failure,
                ..Default::default()
            },
        );
    }
    config
        .handlers()
        .with_handler("invoice.updated", validating.clone())
        .with_handler("contract.updated", validating)
}

/// Produces `events` (protobuf, keyed by entity) to `topic` and returns how many.
pub fn produce_events(brokers: &str, topic: &str, events: &[Event]) -> u64 {
    produce_to(
        brokers,
        topic,
        None,
        events
            .iter()
            .map(|e| workload::message_of(e, Format::Proto)),
    )
}

/// Waits (up to 2 minutes) until at least `n` messages are durable.
pub async fn wait_durable(stats: &orderly::metrics::Stats, n: u64) {
    use orderly::metrics::Stats;
    let deadline = Instant::now() + Duration::from_secs(120);
    while Stats::get(&stats.writer.durable) < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} durable",
            Stats::get(&stats.writer.durable)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The resident memory of process `pid` (or `self`), in MiB; 0 when it
/// cannot be read.
pub fn rss_mib(pid: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb / 1024)
        .unwrap_or(0)
}

/// A configuration for `Pipeline::start_engine` tests: one shard, the
/// embedded `broker`, the store under `dir`, no admin server, no change
/// records or anomalies published.
pub fn engine_config(
    broker: &orderly::tools::broker::EmbeddedBroker,
    dir: &Path,
    topic: &str,
) -> orderly::config::Config {
    orderly::config::Config {
        brokers: broker.bootstrap_servers(),
        topic: topic.into(),
        data_dir: dir.join("data"),
        admin_addr: String::new(),
        changes_topic: String::new(),
        anomalies_topic: String::new(),
        shards: 1,
        ..orderly::config::Config::default()
    }
}
