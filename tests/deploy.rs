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
    for required in [
        "kafka",
        "jaeger",
        "orderly",
        "producer",
        "prometheus",
        "grafana",
    ] {
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
    assert_config_variables(env.keys());
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

    // The broker address is the kafka service's advertised PLAINTEXT listener.
    let kafka = env_of(&doc["services"]["kafka"]);
    let advertised = kafka["KAFKA_ADVERTISED_LISTENERS"]
        .split(',')
        .find_map(|l| l.strip_prefix("PLAINTEXT://"))
        .expect("a PLAINTEXT listener")
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
    // The changelog is compacted, with the input topic's partition count.
    assert!(
        !config.changelog_suffix.is_empty(),
        "the stack runs with a changelog"
    );
    let partitions_of = |topic: &str| {
        let at = init
            .find(&format!("--topic {topic} --partitions "))
            .unwrap_or_else(|| panic!("kafka-init does not create {topic}"));
        init[at..]
            .split_whitespace()
            .nth(3)
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap()
    };
    let changelog = format!("{}{}", config.topic, config.changelog_suffix);
    assert_eq!(partitions_of(&changelog), partitions_of(&config.topic));
    assert!(init.contains(&format!(
        "--topic {changelog} --partitions {} --replication-factor 1 --config cleanup.policy=compact",
        partitions_of(&config.topic)
    )));
    // The settings topic is compacted: the latest document per tenant stays.
    assert_eq!(
        config.settings.source,
        orderly::settings::SettingsSource::Topic
    );
    assert!(
        init.contains(&format!(
            "--topic {} --partitions 1 --replication-factor 1 --config cleanup.policy=compact",
            config.settings.topic
        )),
        "kafka-init does not create the compacted settings topic {}",
        config.settings.topic
    );

    // Spans go to the jaeger service's OTLP/HTTP port, which is enabled.
    let endpoint = &env["OTEL_EXPORTER_OTLP_ENDPOINT"];
    assert_eq!(endpoint, "http://jaeger:4318");
    let jaeger = &doc["services"]["jaeger"];
    assert!(strings(&jaeger["ports"])
        .iter()
        .any(|p| p.ends_with(":4318")));
    // Jaeger v2, which takes OTLP on 4318 without a flag.
    let jaeger_image = jaeger["image"].as_str().unwrap();
    assert!(
        jaeger_image.starts_with("jaegertracing/jaeger:2."),
        "Jaeger v2 expected, found {jaeger_image}"
    );

    // One image for every service that runs orderly, built once.
    let runs_orderly: Vec<&Value> = ["orderly", "producer"]
        .iter()
        .map(|n| &doc["services"][*n])
        .collect();
    let image = runs_orderly[0]["image"]
        .as_str()
        .expect("orderly names its image");
    for svc in &runs_orderly {
        assert_eq!(svc["image"].as_str(), Some(image), "one shared image");
    }
    let builds = services
        .values()
        .filter(|s| s.get("build").is_some())
        .count();
    assert_eq!(builds, 1, "the image is built by one service");

    // Kafka has a listener for the host, advertised as localhost on the
    // published port, beside the one the services use.
    let kafka = &doc["services"]["kafka"];
    let kenv = env_of(kafka);
    let external = kenv["KAFKA_ADVERTISED_LISTENERS"]
        .split(',')
        .find_map(|l| l.split_once("://localhost:"))
        .map(|(name, port)| (name.to_owned(), port.to_owned()))
        .expect("a listener advertised as localhost");
    assert!(
        kenv["KAFKA_LISTENERS"].contains(&format!("{}://:{}", external.0, external.1)),
        "the host listener is not bound"
    );
    assert!(
        strings(&kafka["ports"])
            .iter()
            .any(|p| p.ends_with(&format!(":{0}:{0}", external.1))
                || p == &format!("{0}:{0}", external.1)),
        "the host listener's port {} is not published",
        external.1
    );
    assert!(kenv["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].contains(&format!("{}:", external.0)));

    // The build context leaves out what the image does not need.
    let ignore = std::fs::read_to_string(root.join(".dockerignore")).expect(".dockerignore");
    for entry in ["target/", ".git/"] {
        assert!(
            ignore.lines().any(|l| l.trim() == entry),
            ".dockerignore lacks {entry}"
        );
    }

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

fn yaml(path: &str) -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{path} is not valid YAML: {e}"))
}

/// The host-side file mounted at `target` in `service`, if any.
fn mounted(service: &Value, target: &str) -> Option<std::path::PathBuf> {
    strings(&service["volumes"]).into_iter().find_map(|v| {
        let parts: Vec<&str> = v.split(':').collect();
        (parts.get(1) == Some(&target))
            .then(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(parts[0]))
    })
}

#[test]
fn compose_runs_prometheus_and_grafana_on_orderlys_metrics() {
    let doc = compose();
    let s = &doc["services"];
    let orderly_env = env_of(&s["orderly"]);
    let admin_port = orderly_env["ORDERLY_ADMIN_ADDR"]
        .rsplit(':')
        .next()
        .unwrap()
        .to_owned();

    // Prometheus: its config and rules are mounted where its command and
    // rule_files expect them, and it scrapes orderly's admin port.
    let prom = &s["prometheus"];
    let config_flag = strings(&prom["command"])
        .into_iter()
        .find_map(|a| a.strip_prefix("--config.file=").map(str::to_owned))
        .expect("prometheus --config.file");
    let prom_file = mounted(prom, &config_flag).expect("prometheus config mounted");
    assert!(prom_file.is_file());
    let prom_cfg: Value =
        serde_norway::from_str(&std::fs::read_to_string(&prom_file).unwrap()).unwrap();
    for rules in strings(&prom_cfg["rule_files"]) {
        let host = mounted(prom, &rules).unwrap_or_else(|| panic!("{rules} not mounted"));
        assert!(host.is_file(), "{} missing", host.display());
    }
    let job = &prom_cfg["scrape_configs"][0];
    assert_eq!(job["metrics_path"].as_str(), Some("/metrics"));
    let targets = strings(&job["static_configs"][0]["targets"]);
    assert_eq!(targets, [format!("orderly:{admin_port}")]);
    assert!(strings(&prom["ports"]).iter().any(|p| p == "9090:9090"));

    // Grafana: the provisioned datasource is the prometheus service, and the
    // dashboards provider reads the mounted dashboards folder.
    let grafana = &s["grafana"];
    let provisioning = mounted(grafana, "/etc/grafana/provisioning").expect("provisioning mounted");
    let ds: Value = serde_norway::from_str(
        &std::fs::read_to_string(provisioning.join("datasources/prometheus.yml")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        ds["datasources"][0]["url"].as_str(),
        Some("http://prometheus:9090")
    );
    let uid = ds["datasources"][0]["uid"].as_str().unwrap().to_owned();
    let providers: Value = serde_norway::from_str(
        &std::fs::read_to_string(provisioning.join("dashboards/orderly.yml")).unwrap(),
    )
    .unwrap();
    let path = providers["providers"][0]["options"]["path"]
        .as_str()
        .unwrap()
        .to_owned();
    let dashboards = mounted(grafana, &path).expect("dashboards folder mounted");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dashboards.join("orderly.json")).unwrap())
            .expect("the Grafana dashboard is valid JSON");
    for p in dashboard["panels"].as_array().unwrap() {
        if p["type"] != "row" {
            assert_eq!(p["datasource"]["uid"], uid.as_str(), "panel {}", p["title"]);
        }
    }
    let home = env_of(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"].clone();
    assert_eq!(home, format!("{path}/orderly.json"));

    // The producer sends its spans to the same collector as orderly.
    let producer = env_of(&s["producer"]);
    assert_eq!(
        producer["OTEL_EXPORTER_OTLP_ENDPOINT"],
        orderly_env["OTEL_EXPORTER_OTLP_ENDPOINT"]
    );
}

/// The `orderly_*` metric names a PromQL expression uses, and the label names
/// it groups or filters by.
fn promql_refs(expr: &str) -> (Vec<String>, Vec<String>) {
    let mut metrics = Vec::new();
    let mut labels = Vec::new();
    let bytes = expr.as_bytes();
    let ident = |i: usize| {
        let end = expr[i..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(expr.len(), |n| i + n);
        &expr[i..end]
    };
    let mut i = 0;
    while i < bytes.len() {
        if expr[i..].starts_with("orderly_")
            && (i == 0 || !(bytes[i - 1] as char).is_ascii_alphanumeric())
        {
            let name = ident(i);
            metrics.push(name.to_owned());
            i += name.len();
            continue;
        }
        i += 1;
    }
    // by (a, b) / on (a, b) / without (a)
    for kw in ["by (", "on (", "without ("] {
        for part in expr.split(kw).skip(1) {
            let inside = part.split(')').next().unwrap();
            labels.extend(
                inside
                    .split(',')
                    .map(|l| l.trim().to_owned())
                    .filter(|l| !l.is_empty()),
            );
        }
    }
    // {a="x", b=~"y"}
    for part in expr.split('{').skip(1) {
        let inside = part.split('}').next().unwrap();
        for m in inside.split(',') {
            if let Some(name) = m.split(['=', '!']).next() {
                let name = name.trim();
                if !name.is_empty() && !name.contains(' ') && !name.contains('$') {
                    labels.push(name.to_owned());
                }
            }
        }
    }
    (metrics, labels)
}

/// Checks an expression against the catalogue; returns the metric families it uses.
fn check_promql(expr: &str, what: &str) -> Vec<String> {
    use orderly::metrics::{Kind, CATALOGUE};
    // Labels orderly sets, plus Prometheus' own.
    const LABELS: &[&str] = &[
        "outcome",
        "policy",
        "too_late",
        "reason",
        "stage",
        "code",
        "error_code",
        "shard",
        "topic",
        "partition",
        "from",
        "version",
        "result",
        "how",
        "le",
        "instance",
        "job",
    ];
    let (metrics, labels) = promql_refs(expr);
    assert!(!metrics.is_empty(), "{what}: no orderly metric in {expr}");
    let mut families = Vec::new();
    for m in metrics {
        let (family, kind) = CATALOGUE
            .iter()
            .find_map(|(name, kind, _)| {
                if m == *name {
                    Some((name.to_string(), *kind))
                } else {
                    ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|s| m == format!("{name}{s}"))
                        .then(|| (name.to_string(), *kind))
                }
            })
            .unwrap_or_else(|| panic!("{what}: {m} is not a metric orderly emits"));
        if m.ends_with("_bucket") {
            assert_eq!(kind, Kind::Histogram, "{what}: {m} is not a histogram");
        }
        if kind == Kind::Histogram {
            assert_ne!(
                m, family,
                "{what}: a histogram is queried through _bucket, _sum or _count"
            );
        }
        if kind == Kind::Counter {
            assert!(
                ["rate(", "increase(", "irate("]
                    .iter()
                    .any(|f| expr.contains(&format!("{f}{m}"))),
                "{what}: counter {m} is used without rate() or increase()"
            );
        }
        families.push(family);
    }
    for l in labels {
        assert!(
            LABELS.contains(&l.as_str()),
            "{what}: label {l} is not one orderly sets"
        );
    }
    families
}

#[test]
fn grafana_and_alerts_query_only_metrics_orderly_emits() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("deploy/grafana/dashboards/orderly.json")).unwrap(),
    )
    .unwrap();
    let mut covered = std::collections::BTreeSet::new();
    for p in dashboard["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().expect("expr");
            covered.extend(check_promql(expr, &format!("panel {}", p["title"])));
        }
    }
    // The dashboard covers every metric orderly exports.
    for (name, _, _) in orderly::metrics::CATALOGUE {
        assert!(
            covered.contains(*name),
            "the Grafana dashboard does not show {name}"
        );
    }

    let rules = yaml("deploy/prometheus/alerts.yml");
    let mut alerted = std::collections::BTreeSet::new();
    for g in rules["groups"].as_sequence().unwrap() {
        for r in g["rules"].as_sequence().unwrap() {
            let name = r["alert"].as_str().expect("alert name");
            let expr = r["expr"].as_str().expect("expr");
            assert!(
                r["annotations"]["summary"].as_str().is_some(),
                "{name}: summary"
            );
            assert!(
                r["labels"]["severity"].as_str().is_some(),
                "{name}: severity"
            );
            alerted.extend(check_promql(expr, name));
        }
    }
    for required in [
        "orderly_consumer_lag",
        "orderly_stalled_events",
        "orderly_dead_letters_total",
        "orderly_checkpoint_age_seconds",
    ] {
        assert!(alerted.contains(required), "no alert rule on {required}");
    }
}

#[test]
fn k8s_manifests_agree_with_the_code() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let kustomization = yaml("deploy/k8s/kustomization.yaml");
    let mut docs: BTreeMap<String, Value> = BTreeMap::new();
    for f in strings(&kustomization["resources"]) {
        let doc = yaml(&format!("deploy/k8s/{f}"));
        let kind = doc["kind"].as_str().expect("kind").to_owned();
        docs.insert(kind, doc);
    }
    for kind in ["StatefulSet", "Service", "ConfigMap", "PodDisruptionBudget"] {
        assert!(docs.contains_key(kind), "no {kind} in deploy/k8s");
    }
    let sts = &docs["StatefulSet"];
    let svc = &docs["Service"];
    let cm = &docs["ConfigMap"];
    let pdb = &docs["PodDisruptionBudget"];
    let pod = &sts["spec"]["template"];
    let labels = &pod["metadata"]["labels"];
    assert_eq!(&sts["spec"]["selector"]["matchLabels"], labels);
    assert_eq!(&pdb["spec"]["selector"]["matchLabels"], labels);
    assert_eq!(&svc["spec"]["selector"], labels);

    // A headless Service named by the StatefulSet.
    assert_eq!(svc["spec"]["clusterIP"].as_str(), Some("None"));
    assert_eq!(sts["spec"]["serviceName"], svc["metadata"]["name"]);

    let c = &pod["spec"]["containers"][0];
    let env: BTreeMap<String, Value> = c["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_owned(), e.clone()))
        .collect();
    assert_config_variables(env.keys());
    let plain: BTreeMap<String, String> = env
        .iter()
        .filter_map(|(k, e)| e["value"].as_str().map(|v| (k.clone(), v.to_owned())))
        .collect();
    assert_eq!(
        env["ORDERLY_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]["key"].as_str(),
        Some("token"),
        "the admin token comes from a Secret"
    );

    // The config file is the ConfigMap's key, mounted where ORDERLY_CONFIG points.
    let config_path = Path::new(&plain["ORDERLY_CONFIG"]).to_owned();
    let mounts = c["volumeMounts"].as_sequence().unwrap();
    let mount_of = |name: &str| {
        mounts
            .iter()
            .find(|m| m["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no volume mount {name}"))["mountPath"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let volumes = pod["spec"]["volumes"].as_sequence().unwrap();
    let config_volume = volumes
        .iter()
        .find(|v| v["configMap"]["name"] == cm["metadata"]["name"])
        .expect("a volume from the ConfigMap");
    let config_dir = mount_of(config_volume["name"].as_str().unwrap());
    assert_eq!(config_path.parent().unwrap(), Path::new(&config_dir));
    let key = config_path.file_name().unwrap().to_str().unwrap();
    let toml_text = cm["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("ConfigMap has no key {key}"));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(key);
    std::fs::write(&file, toml_text).unwrap();
    let config = Config::load(Some(&file), plain.clone(), &Overrides::default())
        .expect("the ConfigMap's config is valid");

    // Static membership survives a restart only if the session outlasts it.
    assert!(env.contains_key("ORDERLY_INSTANCE_ID"), "static membership");
    let session_ms: u64 = config
        .kafka
        .consumer
        .get("session.timeout.ms")
        .or(config.kafka.common.get("session.timeout.ms"))
        .expect("session.timeout.ms is set")
        .parse()
        .unwrap();
    assert!(
        session_ms >= 60_000,
        "session.timeout.ms {session_ms} is shorter than a pod restart"
    );
    assert_eq!(
        sts["spec"]["podManagementPolicy"].as_str(),
        Some("Parallel")
    );
    // The image is pinned by the kustomization, by tag or digest.
    let image = c["image"].as_str().unwrap();
    let pinned = kustomization["images"]
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|i| i["name"].as_str() == Some(image))
        .unwrap_or_else(|| panic!("kustomization.yaml does not pin the image {image}"));
    let tag = pinned["newTag"]
        .as_str()
        .or(pinned["digest"].as_str())
        .unwrap_or("");
    assert!(
        !tag.is_empty() && tag != "latest",
        "image pinned to {tag:?}"
    );

    // The data dir is the PersistentVolumeClaim.
    let claim = sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
        .as_str()
        .unwrap();
    assert_eq!(Path::new(&mount_of(claim)), config.data_dir);

    // Probes and the Service hit the admin server's port; Prometheus scrapes it.
    let admin_port: u64 = config
        .admin_addr
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        config.admin_addr.starts_with("0.0.0.0:"),
        "reachable from the kubelet"
    );
    let port = c["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["name"].as_str() == Some("admin"))
        .expect("an admin port");
    assert_eq!(port["containerPort"].as_u64(), Some(admin_port));
    assert_eq!(svc["spec"]["ports"][0]["port"].as_u64(), Some(admin_port));
    assert_eq!(
        c["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/health")
    );
    assert_eq!(
        c["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/ready")
    );
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(c[probe]["httpGet"]["port"].as_str(), Some("admin"));
    }
    let ann = &pod["metadata"]["annotations"];
    assert_eq!(
        ann["prometheus.io/port"].as_str(),
        Some(admin_port.to_string().as_str())
    );
    assert_eq!(ann["prometheus.io/path"].as_str(), Some("/metrics"));

    // SIGTERM drains within the grace period, which fits in Kubernetes' own.
    let k8s_grace_ms = pod["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap()
        * 1000;
    let needed =
        config.shutdown_grace_ms + orderly::pipeline::SHUTDOWN_ALLOWANCE.as_millis() as u64;
    assert!(
        k8s_grace_ms > needed,
        "terminationGracePeriodSeconds ({k8s_grace_ms} ms) must exceed shutdown_grace_ms + allowance ({needed} ms)"
    );

    // The pod runs as the image's user, which owns the data dir.
    let dockerfile = std::fs::read_to_string(root.join("deploy/Dockerfile")).unwrap();
    let uid = pod["spec"]["securityContext"]["runAsUser"]
        .as_u64()
        .unwrap();
    assert!(
        dockerfile.contains(&format!("--uid {uid} ")),
        "the Dockerfile's user is not uid {uid}"
    );
}

/// Every `ORDERLY_*` variable (but `ORDERLY_CONFIG`) names a config field.
fn assert_config_variables<'a>(names: impl Iterator<Item = &'a String>) {
    for k in names.filter(|k| k.starts_with("ORDERLY_") && *k != "ORDERLY_CONFIG") {
        let field = k.trim_start_matches("ORDERLY_").to_ascii_lowercase();
        assert!(
            orderly::config::field_kind(&field).is_some(),
            "{k} is not a config field"
        );
    }
}
