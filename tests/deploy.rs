//! The deploy files agree with the code: docker-compose.yml parses, every
//! file it refers to exists, every ORDERLY_* variable is a real config field
//! with a valid value, and hosts, ports and topic names line up across services.

use orderly::config::{Config, Overrides};
use serde_norway::Value;
use std::collections::BTreeMap;
use std::path::Path;

fn compose() -> Value {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docker-compose.yml"))
            .unwrap();
    serde_norway::from_str(&text).expect("docker-compose.yml is valid YAML")
}

fn env_of(service: &Value) -> BTreeMap<String, String> {
    match &service["environment"] {
        Value::Mapping(m) => m
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    Value::String(s) => s.clone(),
                    other => serde_norway::to_string(other).unwrap().trim().to_owned(),
                };
                (k.as_str().unwrap().to_owned(), v)
            })
            .collect(),
        Value::Null => BTreeMap::new(),
        other => panic!("environment must be a mapping, found {other:?}"),
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn compose_agrees_with_the_code() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = compose();
    let services = doc["services"].as_mapping().expect("services");
    let names: Vec<&str> = services.keys().filter_map(|k| k.as_str()).collect();
    for required in ["kafka", "jaeger", "orderly", "producer"] {
        assert!(names.contains(&required), "service {required} missing");
    }

    for (name, svc) in services {
        let name = name.as_str().unwrap();
        // Every build file and bind-mounted file exists.
        if let Some(build) = svc.get("build") {
            let context = root.join(build["context"].as_str().unwrap_or("."));
            let dockerfile = context.join(build["dockerfile"].as_str().unwrap_or("Dockerfile"));
            assert!(
                dockerfile.is_file(),
                "{name}: {} missing",
                dockerfile.display()
            );
            let text = std::fs::read_to_string(&dockerfile).unwrap();
            for line in text
                .lines()
                .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
            {
                let src = line.split_whitespace().nth(1).unwrap();
                assert!(
                    context.join(src).exists(),
                    "{name}: Dockerfile copies {src}, which is missing"
                );
            }
        }
        for v in strings(&svc["volumes"]) {
            let src = v.split(':').next().unwrap();
            if src.starts_with("./") {
                assert!(
                    root.join(src).exists(),
                    "{name}: volume source {src} missing"
                );
            }
        }
        // Every dependency is a service.
        if let Some(Value::Mapping(deps)) = svc.get("depends_on") {
            for d in deps.keys() {
                assert!(
                    names.contains(&d.as_str().unwrap()),
                    "{name} depends on unknown {d:?}"
                );
            }
        }
    }

    // orderly's variables are real config fields, and the config they give is valid.
    let orderly = &doc["services"]["orderly"];
    let env = env_of(orderly);
    for k in env
        .keys()
        .filter(|k| k.starts_with("ORDERLY_") && *k != "ORDERLY_CONFIG")
    {
        let field = k.trim_start_matches("ORDERLY_").to_ascii_lowercase();
        assert!(
            orderly::config::FIELDS.contains(&field.as_str()),
            "{k} is not a config field"
        );
    }
    let file = env["ORDERLY_CONFIG"].clone();
    let mounted = strings(&orderly["volumes"])
        .into_iter()
        .find_map(|v| {
            let parts: Vec<&str> = v.split(':').collect();
            (parts.get(1) == Some(&file.as_str())).then(|| root.join(parts[0]))
        })
        .expect("ORDERLY_CONFIG is a mounted file");
    let config = Config::load(Some(&mounted), env.clone(), &Overrides::default())
        .expect("the stack's config is valid");
    assert_eq!(config.brokers, env["ORDERLY_BROKERS"]);
    assert_eq!(config.data_dir, Path::new("/data"));
    assert!(
        strings(&orderly["volumes"])
            .iter()
            .any(|v| v.ends_with(":/data")),
        "the data dir is a volume"
    );

    // The admin API's published port is the one it listens on, on host loopback only.
    let admin_port = config.admin_addr.rsplit(':').next().unwrap().to_owned();
    let published = strings(&orderly["ports"]);
    assert!(
        published
            .iter()
            .any(|p| p == &format!("127.0.0.1:{admin_port}:{admin_port}")),
        "admin port {admin_port} not published on loopback: {published:?}"
    );
    assert!(
        config.admin_token.is_some(),
        "the stack sets an admin token"
    );

    // The broker address is the kafka service's advertised listener.
    let kafka = env_of(&doc["services"]["kafka"]);
    let advertised = kafka["KAFKA_ADVERTISED_LISTENERS"]
        .trim_start_matches("PLAINTEXT://")
        .to_owned();
    assert_eq!(config.brokers, advertised);
    assert_eq!(
        kafka["KAFKA_PROCESS_ROLES"], "broker,controller",
        "KRaft mode"
    );

    // The topics orderly reads and writes are created by kafka-init.
    let init = serde_norway::to_string(&doc["services"]["kafka-init"]["command"]).unwrap();
    for t in [
        &config.topic,
        &config.dead_letter_topic,
        &config.changes_topic,
        &config.anomalies_topic,
    ] {
        assert!(
            init.contains(&format!("--topic {t} ")),
            "kafka-init does not create {t}"
        );
    }

    // Spans go to the jaeger service's OTLP/HTTP port, which is enabled.
    let endpoint = &env["OTEL_EXPORTER_OTLP_ENDPOINT"];
    assert_eq!(endpoint, "http://jaeger:4318");
    let jaeger = &doc["services"]["jaeger"];
    assert!(strings(&jaeger["ports"])
        .iter()
        .any(|p| p.ends_with(":4318")));
    assert_eq!(env_of(jaeger)["COLLECTOR_OTLP_ENABLED"], "true");

    // The producer's command is a valid `orderly produce` invocation for the same broker and topic.
    let args = strings(&doc["services"]["producer"]["command"]);
    assert_eq!(args[0], "produce");
    let flag = |f: &str| {
        args.iter()
            .position(|a| a == f)
            .map(|i| args[i + 1].clone())
    };
    assert_eq!(flag("--brokers").as_deref(), Some(config.brokers.as_str()));
    assert_eq!(flag("--topic").as_deref(), Some(config.topic.as_str()));
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_orderly"))
        .args(["produce", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for a in args.iter().filter(|a| a.starts_with("--")) {
        assert!(
            help.contains(a.as_str()),
            "`orderly produce` has no flag {a}"
        );
    }
}
