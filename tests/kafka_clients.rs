//! Every Kafka client orderly makes is built from one config by role:
//! `[kafka]` reaches all of them, `[kafka.consumer]` and `[kafka.producer]`
//! override per role, the properties orderly owns are refused, and TLS and
//! SASL are built in and used.
//!
//! Two real listeners stand in front of the clients: a recording TCP proxy
//! to the embedded broker, which keeps each connection's first request (its
//! ApiVersions, which carries `client.id` and `client.software.name`), and
//! `openssl s_server`, a real TLS endpoint.

mod common;

use common::{shuffled_stream, OrderlyProcess, TestTopic};
use orderly::config::{Config, Overrides};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A TCP proxy to `upstream` that records the first bytes each connection sends.
struct Proxy {
    addr: String,
    first_requests: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Proxy {
    fn start(upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let first_requests: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let (seen, upstream) = (first_requests.clone(), upstream.to_owned());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let (seen, upstream) = (seen.clone(), upstream.clone());
                std::thread::spawn(move || relay(client, &upstream, &seen));
            }
        });
        Proxy {
            addr,
            first_requests,
        }
    }

    /// The first request of every connection so far.
    fn requests(&self) -> Vec<Vec<u8>> {
        self.first_requests.lock().unwrap().clone()
    }

    /// How many first requests hold every one of `needles`.
    fn count(&self, needles: &[&str]) -> usize {
        self.requests()
            .iter()
            .filter(|r| needles.iter().all(|n| contains(r, n.as_bytes())))
            .count()
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn relay(mut client: TcpStream, upstream: &str, seen: &Mutex<Vec<Vec<u8>>>) {
    let Ok(mut server) = TcpStream::connect(upstream) else {
        return;
    };
    // A Kafka request is a 4-byte length and then the request.
    let mut len = [0u8; 4];
    if client.read_exact(&mut len).is_err() {
        return;
    }
    let mut request = vec![0u8; u32::from_be_bytes(len).min(1 << 20) as usize];
    if client.read_exact(&mut request).is_err() {
        return;
    }
    seen.lock().unwrap().push(request.clone());
    if server.write_all(&len).is_err() || server.write_all(&request).is_err() {
        return;
    }
    let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut s2, &mut c2);
        let _ = c2.shutdown(std::net::Shutdown::Both);
    });
    let _ = std::io::copy(&mut client, &mut server);
    let _ = server.shutdown(std::net::Shutdown::Both);
}

#[test]
fn kafka_and_kafka_producer_reach_every_client_of_a_run() {
    const SUFFIX: &str = "-changelog";
    let topic = TestTopic::new(2);
    topic
        .broker
        .create_topic(&format!("{}{SUFFIX}", topic.topic), 2)
        .unwrap();
    topic.produce_events(&shuffled_stream(20, 3, 0.0, 3));
    let proxy = Proxy::start(&topic.brokers);

    let dir = tempfile::tempdir().unwrap();
    let mut config = topic.config(&dir.path().join("data"));
    config.brokers = proxy.addr.clone();
    config.changelog_suffix = SUFFIX.into();
    // `[kafka]` for every client; `[kafka.producer]` and `[kafka.consumer]`
    // each name their own client.id over it.
    config
        .kafka
        .common
        .insert("client.software.name".into(), "orderly-common-sw".into());
    config
        .kafka
        .producer
        .insert("client.id".into(), "orderly-test-producer".into());
    config
        .kafka
        .consumer
        .insert("client.id".into(), "orderly-test-consumer".into());
    let path = dir.path().join("orderly.toml");
    std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();

    let mut orderly = OrderlyProcess::start(&path, &dir.path().join("orderly.log"), &[]);
    topic
        .wait_all_committed(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", orderly.log_tail()));
    // The outbox producer (change records) and the changelog producer each
    // bootstrap through the proxy with the producer client.id, and the
    // source and the changelog reader with the consumer one; all of them
    // carry `[kafka]`'s software name.
    let producer = ["orderly-test-producer", "orderly-common-sw"];
    let consumer = ["orderly-test-consumer", "orderly-common-sw"];
    common::wait_until(
        "two producers and a consumer through the proxy",
        Duration::from_secs(30),
        || proxy.count(&producer) >= 2 && proxy.count(&consumer) >= 1,
    );
    let status = orderly.terminate(Duration::from_secs(30));
    assert!(status.success(), "{}", orderly.log_tail());
    // No client was made without `[kafka]`.
    for r in proxy.requests() {
        assert!(
            contains(&r, b"orderly-common-sw"),
            "a client without [kafka]: {}",
            String::from_utf8_lossy(&r)
        );
    }
}

#[test]
fn every_owned_property_is_refused_with_its_name_in_every_table() {
    let dir = tempfile::tempdir().unwrap();
    for (property, _) in orderly::config::kafka::OWNED {
        for table in ["kafka", "kafka.consumer", "kafka.producer"] {
            let path = dir.path().join("orderly.toml");
            std::fs::write(&path, format!("[{table}]\n\"{property}\" = \"x\"\n")).unwrap();
            let err = Config::load(Some(&path), Vec::new(), &Overrides::default())
                .expect_err(property)
                .to_string();
            assert!(
                err.contains(property) && err.contains(table),
                "[{table}] {property}: {err}"
            );
        }
    }
}

/// A self-signed certificate for `localhost` and its key, made by openssl.
fn certificate(dir: &Path) -> Option<(String, String)> {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let ok = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args([
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then(|| {
        (
            cert.to_string_lossy().into_owned(),
            key.to_string_lossy().into_owned(),
        )
    })
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `orderly run` with SASL_SSL completes a TLS handshake with a real TLS
/// server (openssl s_server), verifying its certificate, and then speaks
/// Kafka over TLS. The SASL password comes from an environment variable.
#[test]
fn sasl_ssl_run_completes_a_tls_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let Some((cert, key)) = certificate(dir.path()) else {
        if std::env::var_os("ORDERLY_REQUIRE_OPENSSL").is_some() {
            panic!("openssl is required (ORDERLY_REQUIRE_OPENSSL) but cannot make a certificate");
        }
        eprintln!("skipped: no openssl to make a certificate");
        return;
    };
    let port = common::free_port();
    let out = dir.path().join("s_server.out");
    let server = Command::new("openssl")
        .args([
            "s_server",
            "-accept",
            &port.to_string(),
            "-cert",
            &cert,
            "-key",
            &key,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::from(std::fs::File::create(&out).unwrap()))
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl s_server");
    let _server = Server(server);

    let mut config = Config {
        brokers: format!("localhost:{port}"),
        data_dir: dir.path().join("data"),
        admin_addr: String::new(),
        ..Default::default()
    };
    for (k, v) in [
        ("security.protocol", "SASL_SSL"),
        ("sasl.mechanism", "SCRAM-SHA-256"),
        ("sasl.username", "orderly"),
        ("ssl.ca.location", &cert),
        ("client.software.name", "orderly-over-tls"),
    ] {
        config.kafka.common.insert(k.into(), v.into());
    }
    let path = dir.path().join("orderly.toml");
    std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
    let orderly = OrderlyProcess::start(
        &path,
        &dir.path().join("orderly.log"),
        &[("ORDERLY_KAFKA__SASL_PASSWORD", "from-the-environment")],
    );
    let text = || String::from_utf8_lossy(&std::fs::read(&out).unwrap_or_default()).into_owned();
    // s_server prints what a client sends once the handshake is complete
    // (the client verified the server's certificate against ssl.ca.location):
    // here the first Kafka request, ApiVersions, which carries `[kafka]`'s
    // software name. s_server answers no Kafka request, so the SASL
    // exchange itself cannot follow.
    common::wait_until("a Kafka request over TLS", Duration::from_secs(30), || {
        let t = text();
        t.contains("ACCEPT") && t.contains("orderly-over-tls")
    });
    assert!(!orderly.log_tail().contains("OpenSSL not available"));
}

/// librdkafka is built with TLS, every SASL mechanism and every codec, and
/// each CLI command that talks to Kafka takes `[kafka]` from `--config`: with
/// `security.protocol=SSL` its first bytes are a TLS ClientHello.
#[test]
fn tls_and_sasl_are_built_in_and_every_command_takes_config() {
    let text = common::output_ok(
        Command::new(env!("CARGO_BIN_EXE_orderly")).args(["doctor", "--no-connect"]),
    );
    let features = text
        .lines()
        .find_map(|l| l.strip_prefix("builtin.features "))
        .unwrap_or_else(|| panic!("{text}"));
    for f in [
        "ssl",
        "sasl_plain",
        "sasl_scram",
        "sasl_oauthbearer",
        "gzip",
        "snappy",
        "lz4",
        "zstd",
    ] {
        assert!(
            features.split(',').any(|x| x == f),
            "{f} missing: {features}"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("orderly.toml");
    std::fs::write(&path, "[kafka]\n\"security.protocol\" = \"SSL\"\n").unwrap();
    let doc = dir.path().join("settings.json");
    std::fs::write(&doc, "{}").unwrap();
    let doc = doc.to_string_lossy().into_owned();
    let commands: [&[&str]; 4] = [
        &["produce", "--events", "1", "--topic", "t"],
        &[
            "partitions",
            "--admin",
            "http://127.0.0.1:9",
            "--topic",
            "t",
        ],
        &["doctor", "--timeout", "5"],
        &["settings", "put", "acme", &doc, "--settings-topic", "s"],
    ];
    for args in commands {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let brokers = listener.local_addr().unwrap().to_string();
        let stderr = dir.path().join("stderr");
        let mut child = Command::new(env!("CARGO_BIN_EXE_orderly"))
            .args(args)
            .arg("--config")
            .arg(&path)
            .env("ORDERLY_BROKERS", &brokers)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut conn = loop {
            match listener.accept() {
                Ok((conn, _)) => break conn,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => {
                    let _ = child.kill();
                    panic!(
                        "{args:?} never connected ({e}): {}",
                        std::fs::read_to_string(&stderr).unwrap_or_default()
                    );
                }
            }
        };
        conn.set_nonblocking(false).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut head = [0u8; 3];
        conn.read_exact(&mut head).unwrap();
        let _ = child.kill();
        let _ = child.wait();
        // A TLS record of type handshake (22), version 3.x.
        assert_eq!(&head[..2], &[0x16, 0x03], "{args:?}: not a TLS ClientHello");
    }
}

/// `orderly doctor` says how the source will prefetch the input topic's
/// partitions: a queue each, with its share of the limits, or one queue
/// shared when a share would not hold a record batch.
#[test]
fn doctor_says_how_the_source_prefetches() {
    let topic = TestTopic::new(4);
    let dir = tempfile::tempdir().unwrap();
    let doctor = |kbytes: Option<&str>| {
        let mut config = topic.config(&dir.path().join("data"));
        if let Some(k) = kbytes {
            config
                .kafka
                .consumer
                .insert("queued.max.messages.kbytes".into(), k.into());
        }
        let path = dir.path().join("orderly.toml");
        std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
        common::output_ok(
            Command::new(env!("CARGO_BIN_EXE_orderly"))
                .args(["doctor", "--timeout", "10", "--config"])
                .arg(&path),
        )
    };
    // librdkafka's defaults over four partitions.
    let split = doctor(None);
    assert!(
        split.contains(&format!("topic {}: 4 partitions", topic.topic)),
        "{split}"
    );
    assert!(
        split.contains("source: a prefetch queue for each of 4 partitions, each up to 25000 messages (queued.min.messages) and 16384 KiB"),
        "{split}"
    );
    // 2 MiB in all: half a MiB each would not hold a batch.
    let shared = doctor(Some("2048"));
    assert!(
        shared.contains("source: one prefetch queue shared by all 4 partitions"),
        "{shared}"
    );
}
