//! `orderly bench` end to end at tiny sizes: it writes the table, the JSON
//! report with every documented field, and the chart, and its counts add up.

mod common;

use std::path::Path;
use std::process::Command;

/// Runs `orderly bench` with `args`, writing into `out`; returns its console
/// output and its report. Fails the test if the bench fails.
fn bench(args: &[&str], out: &Path) -> (String, serde_json::Value) {
    let stdout = common::output_ok(
        Command::new(env!("CARGO_BIN_EXE_orderly"))
            .arg("bench")
            .args(args)
            .arg("--out")
            .arg(out),
    );
    let report = serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    (stdout, report)
}

/// The smoke scenario at the size these tests run it.
const SMOKE: [&str; 6] = [
    "--scenario",
    "smoke",
    "--events",
    "3000",
    "--entities",
    "300",
];

#[test]
fn smoke_scenario_writes_a_complete_report_whose_counts_add_up() {
    let out = tempfile::tempdir().unwrap();
    let (stdout, r) = bench(&SMOKE, out.path());
    for row in [
        "orderly end to end (events/s)",
        "bare consumer",
        "store ceiling",
        "engine ceiling",
        "target ",
    ] {
        assert!(stdout.contains(row), "the table has no {row:?}:\n{stdout}");
    }

    // Every documented field (BENCHMARKS.md, "The report") is present.
    for path in [
        "/schema",
        "/scenario/name",
        "/broker",
        "/machine/cpus",
        "/load/mode",
        "/load/produced",
        "/load/produce_rate_eps",
        "/ceilings/bare_consumer_eps",
        "/ceilings/store_eps",
        "/ceilings/store_events_measured",
        "/ceilings/engine_eps",
        "/orderly/drain_eps",
        "/orderly/seconds",
        "/orderly/max_rss_mib",
        "/ratios/vs_bare_consumer",
        "/ratios/vs_store",
        "/ratios/vs_engine",
        "/latency/append_to_durable/p50_ms",
        "/latency/append_to_durable/p95_ms",
        "/latency/append_to_durable/p99_ms",
        "/latency/append_to_durable/max_ms",
        "/latency/occurred_to_durable/p99_ms",
        "/latency/received_to_durable/p50_ms",
        "/latency/received_to_durable/p99_ms",
        "/latency/received_to_durable_after_warmup/p99_ms",
        "/reliability/processed",
        "/reliability/dead_lettered",
        "/reliability/duplicates",
        "/reliability/retries",
        "/reliability/errors",
        "/reliability/late/recomputed",
        "/reliability/corrections",
        "/degradation/throughput",
        "/degradation/p99",
        "/windows/0/t_s",
        "/windows/0/throughput_eps",
        "/windows/0/p99_ms",
        "/windows/0/received_p99_ms",
        "/windows/0/rss_mib",
        "/windows/0/active_actors",
        "/windows/0/in_flight",
        "/targets/0/met",
        "/store/bytes_on_disk",
        "/store/entities",
        "/store/bytes_per_entity",
        "/store/usage/e/keys",
        "/store/usage/e/bytes",
    ] {
        assert!(
            r.pointer(path).is_some_and(|v| !v.is_null()),
            "{path} missing in the report"
        );
    }
    assert_eq!(r["load"]["produced"], 3000);
    // Every window has the field (null in a run shorter than librdkafka's
    // first statistics, as this one is; the next test reads the values).
    assert!(r["windows"]
        .as_array()
        .unwrap()
        .iter()
        .all(|w| w.get("partition_lag").is_some()));
    assert_eq!(r["load"]["mode"], "closed");
    let n = |p: &str| r.pointer(p).and_then(|v| v.as_u64()).unwrap();
    assert_eq!(
        n("/reliability/processed")
            + n("/reliability/dead_lettered")
            + n("/reliability/duplicates"),
        n("/load/produced"),
        "processed + dead-lettered + duplicates = produced"
    );
    assert!(n("/reliability/duplicates") > 0 && n("/reliability/late/recomputed") > 0);
    // The run wrote one entity record per entity it touched, of a size a
    // record of a few events has, and the store on disk holds at least
    // their live bytes.
    let entities = n("/store/entities");
    assert!(entities > 0 && entities <= 300, "{entities} entity records");
    let live = n("/store/usage/e/bytes");
    assert!(
        (100..20_000).contains(&(live / entities)),
        "{} live bytes per entity record",
        live / entities
    );
    assert!(n("/store/bytes_on_disk") >= live, "less on disk than live");
    assert!(
        (r["store"]["bytes_per_entity"].as_f64().unwrap()
            - n("/store/bytes_on_disk") as f64 / entities as f64)
            .abs()
            < 1e-6
    );
    // Each ratio is computed from this run's own ceilings.
    let f = |p: &str| r.pointer(p).and_then(|v| v.as_f64()).unwrap();
    let drain = f("/orderly/drain_eps");
    for (ratio, ceiling) in [
        ("/ratios/vs_bare_consumer", "/ceilings/bare_consumer_eps"),
        ("/ratios/vs_store", "/ceilings/store_eps"),
        ("/ratios/vs_engine", "/ceilings/engine_eps"),
    ] {
        assert!((f(ratio) - drain / f(ceiling)).abs() < 1e-9, "{ratio}");
    }
    // orderly's share (received → durable) is a part of append → durable:
    // a message is appended before it is received. One millisecond of slack
    // for the append timestamp's resolution.
    let received = |q: &str| f(&format!("/latency/received_to_durable/{q}"));
    let append = |q: &str| f(&format!("/latency/append_to_durable/{q}"));
    assert_eq!(
        n("/latency/received_to_durable/count"),
        n("/latency/append_to_durable/count")
    );
    for q in ["p50_ms", "p99_ms", "max_ms"] {
        assert!(
            received(q) > 0.0 && received(q) <= append(q) + 1.0,
            "received → durable {q} {} against append → durable {}",
            received(q),
            append(q)
        );
    }

    let svg = std::fs::read_to_string(out.path().join("report.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("<polyline"),
        "a chart"
    );
}

/// A scenario with tenant settings: every tenant's document is read by
/// orderly's topic source before processing starts, renames the workload's
/// fields in every record, and the versions published while orderly runs
/// are compiled and swapped in.
#[test]
fn tenant_settings_scenario_renames_fields_and_swaps_versions_in() {
    let out = tempfile::tempdir().unwrap();
    let scenario = out.path().join("tenants.toml");
    std::fs::write(
        &scenario,
        "name = \"tenants-test\"\nevents = 3000\nentities = 300\npartitions = 4\n\
         tenants = 4\nsettings_bytes = 1024\nsettings_updates_per_s = 20\n",
    )
    .unwrap();
    let (_, r) = bench(&["--scenario", scenario.to_str().unwrap()], out.path());
    let n = |p: &str| {
        r.pointer(&format!("/settings/{p}"))
            .and_then(|v| v.as_u64())
            .unwrap_or_else(|| panic!("settings/{p} missing: {}", r["settings"]))
    };
    assert_eq!(n("tenants"), 4);
    assert_eq!(n("tenants_in_force"), 4);
    assert!(
        (1024..1100).contains(&n("document_bytes")),
        "{}",
        r["settings"]
    );
    // Every version published was compiled once: the four first ones and
    // the updates published while orderly ran.
    let updates = n("updates_published");
    assert!(updates > 0, "{}", r["settings"]);
    assert_eq!(n("versions_compiled"), 4 + updates, "{}", r["settings"]);
    // Every record was handled under its tenant's settings.
    assert_eq!(
        n("records_checked"),
        r["store"]["entities"].as_u64().unwrap()
    );
    assert!(n("records_renamed") > 0, "{}", r["settings"]);
    assert_eq!(n("records_not_renamed"), 0, "{}", r["settings"]);
    assert!(r["ceilings"]["engine_eps"].as_f64().unwrap() > 0.0);
}

#[test]
fn windows_report_how_far_apart_the_partitions_lag() {
    let out = tempfile::tempdir().unwrap();
    // Open loop for about three seconds: several windows, most of them
    // after librdkafka's first statistics.
    let (stdout, r) = bench(
        &[&SMOKE[..], &["--rate", "1000", "--no-ceilings"]].concat(),
        out.path(),
    );
    let partitions = r["scenario"]["partitions"].as_u64().unwrap();
    let lags: Vec<&serde_json::Value> = r["windows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| &w["partition_lag"])
        .filter(|l| !l.is_null())
        .collect();
    assert!(!lags.is_empty(), "no window has the partitions' lag: {r}");
    for lag in &lags {
        let (min, max, n) = (
            lag["min"].as_i64().unwrap(),
            lag["max"].as_i64().unwrap(),
            lag["partitions"].as_u64().unwrap(),
        );
        assert!(0 <= min && min <= max, "{lag}");
        assert!((1..=partitions).contains(&n), "{lag}");
    }
    // One instance consumes every partition, and each reports its lag.
    assert!(
        lags.iter()
            .any(|l| l["partitions"].as_u64() == Some(partitions)),
        "{lags:?}"
    );
    let row = stdout
        .lines()
        .find(|l| l.contains("partition lag, widest spread"))
        .unwrap_or_else(|| panic!("no partition lag row:\n{stdout}"));
    assert!(row.contains("..") && row.contains(" at "), "{row}");
}
