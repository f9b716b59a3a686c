//! The report of one run: `report.json`, the console table, and the
//! throughput and p99 chart (`report.svg`).

use super::*;

#[allow(clippy::too_many_arguments)]
pub(super) fn report(
    s: &Scenario,
    broker: &Broker,
    rate: f64,
    calibrated_max: Option<f64>,
    produced: u64,
    produced_rate: f64,
    e2e: &E2e,
    ceilings: serde_json::Map<String, serde_json::Value>,
) -> serde_json::Value {
    use serde_json::json;
    let st = &e2e.stats;
    let g = |c: &std::sync::atomic::AtomicU64| Stats::get(c);
    let processed = g(&st.entities.applied)
        + g(&st.entities.late_recomputed)
        + g(&st.entities.late_applied)
        + g(&st.entities.late_dropped)
        + g(&st.entities.too_late)
        + g(&st.entities.parked)
        + g(&st.entities.held)
        + g(&st.entities.ignored);
    let open = s.open_loop();
    let dead = g(&st.entities.dead_letters);
    let dups = g(&st.entities.duplicates);
    let ratio = |k: &str| {
        ceilings
            .get(k)
            .and_then(|v| v.as_f64())
            .filter(|c| *c > 0.0)
            .map(|c| e2e.drain_eps / c)
    };
    let tp: Vec<f64> = e2e.windows.iter().map(|w| w.throughput_eps).collect();
    let p99: Vec<f64> = e2e.windows.iter().map(|w| w.p99_ms).collect();
    let deg_tp = degradation(&tp);
    let deg_p99 = degradation(&p99);
    let append = st.append_to_durable();
    let mut targets = Vec::new();
    let mut target =
        |name: &str, want: &str, actual: Option<f64>, met: Option<bool>, by: Option<f64>| {
            targets.push(
            json!({"target": name, "want": want, "actual": actual, "met": met, "missed_by": by}),
        );
        };
    let vs_bare = ratio("bare_consumer_eps");
    target(
        "drain ≥ 50% of the bare consumer",
        "≥ 0.50",
        vs_bare,
        vs_bare.map(|r| r >= 0.5),
        vs_bare.map(|r| (0.5 - r).max(0.0)),
    );
    let vs_store = ratio("store_eps");
    target(
        "drain ≥ 60% of the store ceiling",
        "≥ 0.60",
        vs_store,
        vs_store.map(|r| r >= 0.6),
        vs_store.map(|r| (0.6 - r).max(0.0)),
    );
    if open {
        let p = append.p99 as f64 / 1000.0;
        target(
            "steady: p99 append → durable ≤ 25 ms",
            "≤ 25 ms",
            Some(p),
            Some(p <= 25.0),
            Some((p - 25.0).max(0.0)),
        );
        let p = e2e.steady.p99 as f64 / 1000.0;
        target(
            "steady: same, after the first window",
            "≤ 25 ms",
            Some(p),
            Some(p <= 25.0),
            Some((p - 25.0).max(0.0)),
        );
    }
    // Degradation is a property of a sustained load; a closed-loop run drains
    // a backlog, whose latency grows by construction.
    if open {
        target(
            "degradation of throughput ≥ 0.95",
            "≥ 0.95",
            deg_tp,
            deg_tp.map(|d| d >= 0.95),
            deg_tp.map(|d| (0.95 - d).max(0.0)),
        );
        target(
            "degradation of p99 ≤ 1.2",
            "≤ 1.2",
            deg_p99,
            deg_p99.map(|d| d <= 1.2),
            deg_p99.map(|d| (d - 1.2).max(0.0)),
        );
    }
    target(
        "RSS < 1.5 GB",
        "< 1536 MiB",
        Some(e2e.max_rss_mib),
        Some(e2e.max_rss_mib < 1536.0),
        Some((e2e.max_rss_mib - 1536.0).max(0.0)),
    );
    json!({
        "schema": "orderly.bench.v1",
        "scenario": s,
        "broker": broker.name(),
        "machine": {
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            "os": std::env::consts::OS,
            "arch": std::env::consts::ARCH,
            "version": env!("CARGO_PKG_VERSION"),
        },
        "load": {
            "mode": if open { "open" } else { "closed" },
            "target_rate_eps": if open { Some(rate) } else { None },
            "calibrated_max_eps": calibrated_max,
            "produced": produced,
            "produce_rate_eps": produced_rate,
        },
        "ceilings": ceilings,
        "orderly": {
            "drain_eps": e2e.drain_eps,
            "seconds": e2e.seconds,
            "max_rss_mib": e2e.max_rss_mib,
        },
        "ratios": {
            "vs_bare_consumer": vs_bare,
            "vs_store": vs_store,
            "vs_engine": ratio("engine_eps"),
        },
        "latency": {
            "append_to_durable": append,
            "append_to_durable_after_warmup": e2e.steady,
            "occurred_to_durable": st.occurred_to_durable(),
            "received_to_durable": st.received_to_durable(),
            "received_to_durable_after_warmup": e2e.steady_received,
        },
        "reliability": {
            "produced": produced,
            "processed": processed,
            "dead_lettered": dead,
            "duplicates": dups,
            "accounted": processed + dead + dups == produced,
            "retries": g(&st.entities.retries),
            "errors": g(&st.errors),
            "late": {
                "recomputed": g(&st.entities.late_recomputed),
                "applied": g(&st.entities.late_applied),
                "dropped": g(&st.entities.late_dropped),
                "too_late": g(&st.entities.too_late),
                "parked": g(&st.entities.parked),
            },
            "corrections": g(&st.entities.corrections),
        },
        "degradation": {"throughput": deg_tp, "p99": deg_p99},
        "windows": e2e.windows,
        "targets": targets,
    })
}

pub(super) fn print_table(r: &serde_json::Value) {
    let f = |v: &serde_json::Value| match v.as_f64() {
        Some(x) if x.fract() == 0.0 && x.abs() < 1e15 => format!("{x:.0}"),
        Some(x) => format!("{x:.2}"),
        None => match v {
            serde_json::Value::Null => "–".into(),
            other => other.to_string(),
        },
    };
    let rows: Vec<(&str, String)> = vec![
        (
            "scenario",
            r["scenario"]["name"].as_str().unwrap_or("").to_owned(),
        ),
        ("broker", r["broker"].as_str().unwrap_or("").to_owned()),
        ("load", r["load"]["mode"].as_str().unwrap_or("").to_owned()),
        ("produced", f(&r["load"]["produced"])),
        (
            "bare consumer (events/s)",
            f(&r["ceilings"]["bare_consumer_eps"]),
        ),
        ("store ceiling (events/s)", f(&r["ceilings"]["store_eps"])),
        ("engine ceiling (events/s)", f(&r["ceilings"]["engine_eps"])),
        (
            "orderly end to end (events/s)",
            f(&r["orderly"]["drain_eps"]),
        ),
        ("  ÷ bare consumer", f(&r["ratios"]["vs_bare_consumer"])),
        ("  ÷ store ceiling", f(&r["ratios"]["vs_store"])),
        ("  ÷ engine ceiling", f(&r["ratios"]["vs_engine"])),
        (
            "append → durable p50/p99/max ms",
            format!(
                "{} / {} / {}",
                f(&r["latency"]["append_to_durable"]["p50_ms"]),
                f(&r["latency"]["append_to_durable"]["p99_ms"]),
                f(&r["latency"]["append_to_durable"]["max_ms"])
            ),
        ),
        (
            "after warm-up p50/p99 ms",
            format!(
                "{} / {}",
                f(&r["latency"]["append_to_durable_after_warmup"]["p50_ms"]),
                f(&r["latency"]["append_to_durable_after_warmup"]["p99_ms"])
            ),
        ),
        (
            "  received → durable (orderly)",
            format!(
                "{} / {}",
                f(&r["latency"]["received_to_durable_after_warmup"]["p50_ms"]),
                f(&r["latency"]["received_to_durable_after_warmup"]["p99_ms"])
            ),
        ),
        (
            "occurred → durable p50/p99 ms",
            format!(
                "{} / {}",
                f(&r["latency"]["occurred_to_durable"]["p50_ms"]),
                f(&r["latency"]["occurred_to_durable"]["p99_ms"])
            ),
        ),
        (
            "processed / dead / duplicates",
            format!(
                "{} / {} / {}",
                f(&r["reliability"]["processed"]),
                f(&r["reliability"]["dead_lettered"]),
                f(&r["reliability"]["duplicates"])
            ),
        ),
        ("  add up to produced", f(&r["reliability"]["accounted"])),
        (
            "retries / errors",
            format!(
                "{} / {}",
                f(&r["reliability"]["retries"]),
                f(&r["reliability"]["errors"])
            ),
        ),
        (
            "late: recomputed / corrections",
            format!(
                "{} / {}",
                f(&r["reliability"]["late"]["recomputed"]),
                f(&r["reliability"]["corrections"])
            ),
        ),
        (
            "degradation throughput / p99",
            format!(
                "{} / {}",
                f(&r["degradation"]["throughput"]),
                f(&r["degradation"]["p99"])
            ),
        ),
        ("partition lag, widest spread", widest_lag(r)),
        ("max RSS MiB", f(&r["orderly"]["max_rss_mib"])),
    ];
    println!();
    for (k, v) in rows {
        println!(" {k:<34} | {v:>28}");
    }
    println!();
    for t in r["targets"].as_array().into_iter().flatten() {
        let met = match t["met"].as_bool() {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "not measured",
        };
        println!(
            " target {:<40} {:>12}  actual {:>10}  missed by {}",
            t["target"].as_str().unwrap_or(""),
            met,
            f(&t["actual"]),
            f(&t["missed_by"])
        );
    }
}

/// How far behind the input partitions were, in messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct PartitionLag {
    /// The partition least behind.
    pub min: i64,
    /// The partition most behind.
    pub max: i64,
    /// How many partitions reported a lag.
    pub partitions: usize,
}

impl PartitionLag {
    /// The spread of `lags`; `None` if there is none.
    pub fn of<I>(lags: I) -> Option<Self>
    where
        I: ExactSizeIterator<Item = i64> + Clone,
    {
        Some(PartitionLag {
            min: lags.clone().min()?,
            max: lags.clone().max()?,
            partitions: lags.len(),
        })
    }
}

/// The window whose input partitions were furthest apart in lag, as
/// "least..most messages behind at t s"; "–" without librdkafka's
/// statistics.
fn widest_lag(r: &serde_json::Value) -> String {
    fn spread(w: &serde_json::Value) -> Option<(i64, &serde_json::Value)> {
        let lag = &w["partition_lag"];
        Some((lag["max"].as_i64()? - lag["min"].as_i64()?, w))
    }
    r["windows"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(spread)
        .max_by_key(|(d, _)| *d)
        .map_or_else(
            || "–".to_owned(),
            |(_, w)| {
                format!(
                    "{}..{} at {:.0} s",
                    w["partition_lag"]["min"],
                    w["partition_lag"]["max"],
                    w["t_s"].as_f64().unwrap_or(0.0)
                )
            },
        )
}

/// Throughput and p99 over time, as an SVG line chart.
pub(super) fn chart(s: &Scenario, windows: &[Window]) -> String {
    let (w, h, left, right, top, bottom) = (900.0, 420.0, 70.0, 70.0, 40.0, 50.0);
    let pw = w - left - right;
    let ph = h - top - bottom;
    let tmax = windows.last().map(|x| x.t_s).unwrap_or(1.0).max(1e-9);
    let ymax = windows.iter().map(|x| x.throughput_eps).fold(1.0, f64::max);
    let pmax = windows.iter().map(|x| x.p99_ms).fold(1.0, f64::max);
    let line = |f: &dyn Fn(&Window) -> f64, max: f64| {
        windows
            .iter()
            .map(|x| {
                format!(
                    "{:.1},{:.1}",
                    left + x.t_s / tmax * pw,
                    top + ph - f(x) / max * ph
                )
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{left}" y="22" font-size="15">orderly bench: {name} — throughput and p99 (append → durable) per window</text>
<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#ccc"/>
<polyline fill="none" stroke="#2b6cb0" stroke-width="2" points="{tp}"/>
<polyline fill="none" stroke="#c53030" stroke-width="2" points="{p99}"/>
<text x="{lx}" y="{ty}" fill="#2b6cb0" text-anchor="end">{ymax:.0} ev/s</text>
<text x="{lx}" y="{by}" fill="#2b6cb0" text-anchor="end">0</text>
<text x="{rx}" y="{ty}" fill="#c53030">{pmax:.1} ms</text>
<text x="{rx}" y="{by}" fill="#c53030">0</text>
<text x="{left}" y="{xl}">0 s</text>
<text x="{xr}" y="{xl}" text-anchor="end">{tmax:.1} s</text>
<text x="{mid}" y="{xl}" text-anchor="middle"><tspan fill="#2b6cb0">throughput (events/s)</tspan> · <tspan fill="#c53030">p99 latency (ms)</tspan></text>
</svg>
"##,
        name = s.name,
        tp = line(&|x| x.throughput_eps, ymax),
        p99 = line(&|x| x.p99_ms, pmax),
        lx = left - 6.0,
        rx = w - right + 6.0,
        ty = top + 10.0,
        by = top + ph,
        xl = h - bottom + 20.0,
        xr = w - right,
        mid = left + pw / 2.0,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_lag_is_the_spread_of_the_partitions() {
        assert_eq!(PartitionLag::of([0i64; 0].into_iter()), None);
        assert_eq!(
            PartitionLag::of([40, 7, 900, 12].into_iter()),
            Some(PartitionLag {
                min: 7,
                max: 900,
                partitions: 4
            })
        );
        let windows = |lags: &[Option<(i64, i64)>]| {
            serde_json::json!({ "windows": lags.iter().enumerate().map(|(i, l)| serde_json::json!({
                "t_s": i as f64 * 10.0,
                "partition_lag": l.map(|(min, max)| serde_json::json!({ "min": min, "max": max })),
            })).collect::<Vec<_>>() })
        };
        assert_eq!(widest_lag(&windows(&[None, None])), "–");
        assert_eq!(
            widest_lag(&windows(&[
                Some((0, 5)),
                None,
                Some((100, 900)),
                Some((800, 900))
            ])),
            "100..900 at 20 s"
        );
    }
}
