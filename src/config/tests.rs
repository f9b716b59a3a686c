    use super::*;

#[test]
fn layers_apply_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("orderly.toml");
    std::fs::write(
        &file,
        "topic = \"from-file\"\nbatch_max = 7\n[types.\"x.y\"]\nreducer = \"inc\"\n",
    )
    .unwrap();
    let env = vec![
        ("ORDERLY_BATCH_MAX".to_string(), "9".to_string()),
        (
            "ORDERLY_KAFKA__SESSION_TIMEOUT_MS".to_string(),
            "6000".to_string(),
        ),
        ("ORDERLY_CONFIG".to_string(), "ignored".to_string()),
    ];
    let o = Overrides {
        group: Some("g2".into()),
        ..Default::default()
    };
    let c = Config::load(Some(&file), env, &o).unwrap();
    assert_eq!(c.topic, "from-file");
    assert_eq!(c.batch_max, 9);
    assert_eq!(c.group, "g2");
    assert_eq!(c.kafka.common["session.timeout.ms"], "6000");
    assert_eq!(c.types["x.y"].reducer, ReduceOp::Inc);
}

#[test]
fn errors_name_the_field() {
    let env = vec![("ORDERLY_BATCH_MAX".to_string(), "lots".to_string())];
    let err = Config::load(None, env, &Overrides::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("batch_max"), "{err}");
    let env = vec![("ORDERLY_IN_FLIGHT_LOW".to_string(), "999999".to_string())];
    let err = Config::load(None, env, &Overrides::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("in_flight_low"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(&file, "bogus_knob = 1\n").unwrap();
    let err = Config::load(Some(&file), vec![], &Overrides::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("bogus_knob"), "{err}");
}

fn vars(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn a_string_field_takes_a_value_made_of_digits() {
    let env = vars(&[
        ("ORDERLY_ADMIN_TOKEN", "123456"),
        ("ORDERLY_INSTANCE_ID", "7"),
        ("ORDERLY_TOPIC", "2024"),
        ("ORDERLY_GROUP", "42"),
        ("ORDERLY_BROKERS", "9092"),
        ("ORDERLY_DEAD_LETTER_TOPIC", "1"),
        ("ORDERLY_CHANGES_TOPIC", "2"),
        ("ORDERLY_ANOMALIES_TOPIC", "3"),
        ("ORDERLY_DERIVED_TOPIC", "4"),
        ("ORDERLY_CHANGELOG_SUFFIX", "5"),
        ("ORDERLY_DATA_DIR", "6"),
        ("ORDERLY_ADMIN_ADDR", "8"),
        ("ORDERLY_SETTINGS__TOPIC", "99"),
        ("ORDERLY_SETTINGS__TTL_MS", "5000"),
        ("ORDERLY_BATCH_MAX", " 12 "),
    ]);
    let c = Config::load(None, env, &Overrides::default()).unwrap();
    assert_eq!(c.admin_token.as_deref(), Some("123456"));
    assert_eq!(c.instance_id.as_deref(), Some("7"));
    assert_eq!(c.topic, "2024");
    assert_eq!(c.group, "42");
    assert_eq!(c.derived_topic.as_deref(), Some("4"));
    assert_eq!(c.data_dir, std::path::PathBuf::from("6"));
    assert_eq!(c.settings.topic, "99");
    assert_eq!(c.settings.ttl_ms, 5000);
    assert_eq!(c.batch_max, 12);
    // Every string field: a digits-only value loads (or fails only on its
    // own rule, never on its type).
    for (f, _) in FIELDS.iter().filter(|(_, k)| *k == Kind::Str) {
        let name = format!("ORDERLY_{}", f.to_ascii_uppercase());
        if let Err(e) = Config::load(None, vars(&[(&name, "123")]), &Overrides::default()) {
            let e = e.to_string();
            assert!(!e.contains("invalid type: integer"), "{name}: {e}");
            assert!(e.contains(f), "{name}: {e}");
        }
    }
}

#[test]
fn kafka_variables_reach_their_table_and_owned_properties_are_refused() {
    let env = vars(&[
        ("ORDERLY_KAFKA__SECURITY_PROTOCOL", "SASL_SSL"),
        ("ORDERLY_KAFKA__CONSUMER__SESSION_TIMEOUT_MS", "45000"),
        ("ORDERLY_KAFKA__PRODUCER__LINGER_MS", "7"),
    ]);
    let c = Config::load(None, env, &Overrides::default()).unwrap();
    assert_eq!(c.kafka.common["security.protocol"], "SASL_SSL");
    assert_eq!(c.kafka.consumer["session.timeout.ms"], "45000");
    assert_eq!(c.kafka.producer["linger.ms"], "7");
    let err = Config::load(
        None,
        vars(&[("ORDERLY_KAFKA__CONSUMER__ENABLE_AUTO_COMMIT", "true")]),
        &Overrides::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("enable.auto.commit") && err.contains("kafka.consumer"), "{err}");
    let err = Config::load(
        None,
        vars(&[("ORDERLY_KAFKA__ADMIN__X", "1")]),
        &Overrides::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("ORDERLY_KAFKA__ADMIN__X"), "{err}");
}

#[test]
fn origins_name_the_layer_and_secrets_are_masked() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("orderly.toml");
    std::fs::write(
        &file,
        "topic = \"t\"\nbatch_max = 7\n[kafka]\n\"sasl.password\" = \"hunter2\"\n",
    )
    .unwrap();
    let o = Overrides {
        group: Some("g".into()),
        ..Default::default()
    };
    let l = Config::load_traced(
        Some(&file),
        vars(&[("ORDERLY_BATCH_MAX", "9"), ("ORDERLY_ADMIN_TOKEN", "s3cret")]),
        &o,
    )
    .unwrap();
    let text = l.render();
    let line = |k: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{k} = ")))
            .unwrap_or_else(|| panic!("no {k} in\n{text}"))
            .to_owned()
    };
    assert!(line("topic").ends_with(&format!("# file {}", file.display())), "{text}");
    assert!(line("batch_max").contains("9  # env ORDERLY_BATCH_MAX"), "{text}");
    assert!(line("group").ends_with("# flag --group"), "{text}");
    assert!(line("brokers").ends_with("# default"), "{text}");
    assert!(line("instance_id").contains("(unset)"), "{text}");
    assert!(!text.contains("hunter2") && !text.contains("s3cret"), "{text}");
    assert!(line("kafka.\"sasl.password\"").contains("********"), "{text}");
}

#[test]
fn the_admin_token_comes_from_its_file_or_the_field_not_both() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "  abc123\n").unwrap();
    let path = file.to_string_lossy().into_owned();
    let c = Config::load(
        None,
        vars(&[("ORDERLY_ADMIN_TOKEN_FILE", &path)]),
        &Overrides::default(),
    )
    .unwrap();
    assert_eq!(c.resolved_admin_token().unwrap().as_deref(), Some("abc123"));
    let both = Config::load(
        None,
        vars(&[("ORDERLY_ADMIN_TOKEN_FILE", &path), ("ORDERLY_ADMIN_TOKEN", "x")]),
        &Overrides::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(both.contains("admin_token_file"), "{both}");
    let missing = Config {
        admin_token_file: Some(dir.path().join("nope")),
        ..Config::default()
    };
    let e = missing.resolved_admin_token().unwrap_err().to_string();
    assert!(e.contains("admin_token_file") && e.contains("nope"), "{e}");
    std::fs::write(&file, "\n").unwrap();
    assert!(c.resolved_admin_token().is_err(), "an empty file is no token");
}

#[test]
fn the_producers_message_limit_comes_from_producer_then_common_then_the_default() {
    let mut k = KafkaConfig::default();
    assert_eq!(k.producer_message_max_bytes(), 1_000_000);
    k.common.insert("message.max.bytes".into(), "5000".into());
    assert_eq!(k.producer_message_max_bytes(), 5_000);
    k.producer.insert("message.max.bytes".into(), " 7000 ".into());
    assert_eq!(k.producer_message_max_bytes(), 7_000);
}

/// The README's configuration table says what `Config::default` holds: a
/// default changed in code and not in the README (or the other way round)
/// fails here. (`orderly run --help` lists the defaults from
/// `Config::default` itself: `cli::tests`.)
#[test]
fn the_documented_defaults_are_the_defaults() {
    let defaults = toml::Table::try_from(Config::default()).unwrap();
    let shown = |name: &str| super::shown(&defaults, name);
    let ticked = |cell: &str| -> Vec<String> {
        cell.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect()
    };

    let readme = include_str!("../../README.md");
    let table = readme
        .lines()
        .skip_while(|l| !l.starts_with("| `brokers` |"))
        .take_while(|l| l.starts_with('|'));
    let mut documented = Vec::new();
    for row in table {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let (names, values) = (ticked(cells[1]), ticked(cells[2]));
        if names.iter().any(|n| n.starts_with('[')) {
            continue; // a table of its own, such as `[kafka]`
        }
        for (i, name) in names.iter().enumerate() {
            assert!(
                FIELDS.iter().any(|(f, _)| f == name) || defaults.contains_key(name),
                "README documents `{name}`, which is not a configuration field"
            );
            match (cells[2], values.get(i)) {
                ("unset", _) => assert_eq!(shown(name), None, "README: `{name}` unset"),
                (_, Some(v)) => assert_eq!(shown(name).as_ref(), Some(v), "README: `{name}`"),
                (_, None) => panic!("README gives no default for `{name}`: {row}"),
            }
            documented.push(name.clone());
        }
    }
    for (field, _) in FIELDS {
        assert!(
            documented.iter().any(|d| d == field),
            "`{field}` is missing from README's configuration table"
        );
    }
}
