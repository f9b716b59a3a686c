//! The admin API: auth, dead letters retried (in order) or skipped after the
//! cause is fixed, parked entities released, readiness, and the `dlq` CLI.

mod common;

use common::{event, TestTopic};
use orderly::config::Config;
use orderly::metrics::Stats;
use orderly::model::envelope::Event;
use orderly::model::handler::{EntityState, FieldReducer, Handler, HandlerError, ReduceOp};
use orderly::pipeline::Pipeline;
use orderly::settings::TenantSettings;
use orderly::store::Store;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A blocking HTTP call from a thread, as an operator's tool would make it.
async fn call(method: &str, url: String, token: Option<&str>) -> (u16, serde_json::Value) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let token = token.map(str::to_owned);
    tokio::task::spawn_blocking(move || {
        let mut req = reqwest::blocking::Client::new().request(method, url);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().expect("admin server answers");
        (resp.status().as_u16(), resp.json().unwrap_or_default())
    })
    .await
    .unwrap()
}

#[test]
fn default_bind_is_loopback() {
    assert!(Config::default().admin_addr.starts_with("127.0.0.1:"));
    assert!(Config::default().admin_token.is_none());
}

#[test]
fn operators_retry_and_skip_dead_letters_and_release_parked_entities() {
    let topic = TestTopic::new(2);
    let dir = tempfile::tempdir().unwrap();
    let mut config = topic.config(dir.path());
    let validating = Arc::new(common::Validating {
        broken: AtomicBool::new(true),
    });
    let handlers = common::skip_and_park(&mut config, validating.clone());
    let inv =
        |id: &str, at: i64, v: serde_json::Value| event("invoice-1", id, "invoice.updated", at, v);
    let events = [
        inv("i1", 10, serde_json::json!({"total": 1, "status": "draft"})),
        inv("i2", 20, serde_json::json!({"total": 2, "currency": "XTS"})),
        inv("i3", 30, serde_json::json!({"status": "sent"})),
        inv("i4", 40, serde_json::json!({"paid": true})),
        inv("i5", 50, serde_json::json!({"currency": "XXX"})),
        event(
            "contract-1",
            "c1",
            "contract.updated",
            10,
            serde_json::json!({"stage": "draft"}),
        ),
        event(
            "contract-1",
            "c2",
            "contract.updated",
            20,
            serde_json::json!({"currency": "XTS"}),
        ),
        event(
            "contract-1",
            "c3",
            "contract.updated",
            30,
            serde_json::json!({"stage": "active"}),
        ),
    ];
    let n = events.len() as u64;
    let port = common::free_port();
    let base = format!("http://127.0.0.1:{port}");
    let (brokers, name) = (topic.brokers.clone(), topic.topic.clone());
    actix::System::new().block_on(async move {
        let pipeline = Pipeline::start(config, handlers).unwrap();
        let server = orderly::admin::start(
            pipeline.control(),
            &format!("127.0.0.1:{port}"),
            Some("s3cret".into()),
        )
        .unwrap();
        let stats = pipeline.stats();
        assert_eq!(call("GET", format!("{base}/health"), None).await.0, 200);
        std::thread::spawn(move || common::produce_events(&brokers, &name, &events))
            .join()
            .unwrap();
        common::wait_durable(&stats, n).await;
        assert_eq!(call("GET", format!("{base}/ready"), None).await.0, 200);

        // Two open dead letters for the invoice (i2, i5); c2 parked the contract.
        let (status, list) = call(
            "GET",
            format!("{base}/api/dead-letters?entity=invoice-1"),
            None,
        )
        .await;
        assert_eq!(status, 200);
        let items = list["items"].as_array().unwrap();
        assert_eq!(items.len(), 2);
        let id = |i: usize| items[i]["id"].as_u64().unwrap();
        assert_eq!(items[0]["event_id"], "i2");
        assert_eq!(items[0]["status"], "open");
        assert!(items[0]["reason"]
            .as_str()
            .unwrap()
            .contains("currency of i2 is not mapped"));

        // Auth: no token, or the wrong one, is refused; nothing changes.
        let retry_url = format!("{base}/api/dead-letters/{}/retry", id(0));
        assert_eq!(call("POST", retry_url.clone(), None).await.0, 401);
        assert_eq!(call("POST", retry_url.clone(), Some("guess")).await.0, 401);
        assert_eq!(
            call(
                "POST",
                format!("{base}/api/parked/contract-1/release"),
                None
            )
            .await
            .0,
            401
        );

        // The cause is fixed; the retry goes through the actor and, being late, is re-folded.
        validating.broken.store(false, SeqCst);
        let (status, body) = call("POST", retry_url.clone(), Some("s3cret")).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["outcome"], "late-recomputed");
        assert_eq!(
            call("POST", retry_url, Some("s3cret")).await.0,
            409,
            "a retried dead letter is not open any more"
        );
        // i5 is skipped instead, with the CLI's bulk skip (i2 is no longer open).
        let out = tokio::task::spawn_blocking({
            let base = base.clone();
            move || {
                std::process::Command::new(env!("CARGO_BIN_EXE_orderly"))
                    .args([
                        "dlq",
                        "skip",
                        "--all",
                        "--entity",
                        "invoice-1",
                        "--admin",
                        &base,
                        "--token",
                        "s3cret",
                    ])
                    .output()
                    .unwrap()
            }
        })
        .await
        .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let body: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(body["done"], 1, "{body}");
        // Skipping it again, one by one, is a conflict.
        let (status, _) = call(
            "POST",
            format!("{base}/api/dead-letters/{}/skip", id(1)),
            Some("s3cret"),
        )
        .await;
        assert_eq!(status, 409);

        // The parked contract is listed, then released in order.
        let (_, parked) = call("GET", format!("{base}/api/parked"), None).await;
        assert_eq!(parked["items"][0]["entity_id"], "contract-1");
        assert_eq!(parked["items"][0]["held"], 2);
        let (status, body) = call(
            "POST",
            format!("{base}/api/parked/contract-1/release"),
            Some("s3cret"),
        )
        .await;
        assert_eq!((status, body["released_events"].as_u64()), (200, Some(2)));

        tokio::time::sleep(Duration::from_millis(400)).await;
        let (_, open) = call("GET", format!("{base}/api/dead-letters?status=open"), None).await;
        assert_eq!(
            open["items"].as_array().unwrap().len(),
            0,
            "c2's dead letter was resolved by the release: {open}"
        );
        let (_, retried) = call(
            "GET",
            format!("{base}/api/dead-letters?status=retried"),
            None,
        )
        .await;
        let retried: Vec<&str> = retried["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["event_id"].as_str().unwrap())
            .collect();
        let mut retried = retried;
        retried.sort();
        assert_eq!(retried, ["c2", "i2"]);
        let (_, skipped) = call(
            "GET",
            format!("{base}/api/dead-letters?status=skipped"),
            None,
        )
        .await;
        assert_eq!(skipped["items"][0]["event_id"], "i5");

        // The entity view: the in-order oracle of i1..i4 (i5 skipped), with provenance.
        let (status, view) = call("GET", format!("{base}/api/entities/invoice-1"), None).await;
        assert_eq!(status, 200);
        let record = &view["record"];
        assert_eq!(
            record["state"],
            serde_json::json!({"total": 2, "status": "sent", "paid": true, "currency": "XTS"})
        );
        assert_eq!(record["provenance"]["total"]["event_id"], "i2");
        assert_eq!(record["provenance"]["status"]["event_id"], "i3");
        assert_eq!(
            call("GET", format!("{base}/api/entities/nobody"), None)
                .await
                .0,
            404
        );

        // The CLI mirrors the API.
        let out = tokio::task::spawn_blocking({
            let base = base.clone();
            move || {
                std::process::Command::new(env!("CARGO_BIN_EXE_orderly"))
                    .args(["dlq", "list", "--admin", &base, "--status", "skipped"])
                    .output()
                    .unwrap()
            }
        })
        .await
        .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0]["event_id"], "i5");

        server.stop(true).await;
        let store = pipeline.store();
        pipeline.shutdown().unwrap();
        let c = store.load_entity("contract-1").unwrap().unwrap();
        assert_eq!(
            orderly::model::value::fields_to_json(&c.state.fields),
            serde_json::json!({"stage": "active", "currency": "XTS"})
        );
    });
}

/// Takes 1.5 s on one event.
struct Sleepy;

impl Handler for Sleepy {
    fn apply(
        &self,
        state: &mut EntityState,
        event: &Event,
        settings: &TenantSettings,
    ) -> Result<(), HandlerError> {
        if event.event_id == "slow-1" {
            std::thread::sleep(Duration::from_millis(1_500));
        }
        FieldReducer(ReduceOp::Set).apply(state, event, settings)
    }
}

#[test]
fn a_slow_event_is_reported_as_stalled_and_not_killed() {
    let topic = TestTopic::new(2);
    let dir = tempfile::tempdir().unwrap();
    let mut config = topic.config(dir.path());
    config.stall_deadline_ms = 300;
    let handlers = config
        .handlers()
        .with_handler("report.built", Arc::new(Sleepy));
    let events = [
        event(
            "report-1",
            "slow-1",
            "report.built",
            10,
            serde_json::json!({"pages": 40}),
        ),
        event(
            "report-1",
            "fast-2",
            "report.built",
            20,
            serde_json::json!({"done": true}),
        ),
    ];
    let port = common::free_port();
    let base = format!("http://127.0.0.1:{port}");
    let (brokers, name) = (topic.brokers.clone(), topic.topic.clone());
    actix::System::new().block_on(async move {
        let pipeline = Pipeline::start(config, handlers).unwrap();
        let _server =
            orderly::admin::start(pipeline.control(), &format!("127.0.0.1:{port}"), None).unwrap();
        let stats = pipeline.stats();
        std::thread::spawn(move || common::produce_events(&brokers, &name, &events));
        // While it runs: listed, with no finish time.
        let deadline = Instant::now() + Duration::from_secs(30);
        let running = loop {
            let (_, body) = call("GET", format!("{base}/api/stalled"), None).await;
            if let Some(item) = body["items"].as_array().and_then(|a| a.first()).cloned() {
                break item;
            }
            assert!(Instant::now() < deadline, "never reported as stalled");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(running["entity_id"], "report-1");
        assert_eq!(running["event_id"], "slow-1");
        assert!(running["finished_at"].is_null());
        // It is not killed: it finishes, and so does the event behind it.
        while Stats::get(&stats.writer.durable) < 2 {
            assert!(Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (_, body) = call("GET", format!("{base}/api/stalled"), None).await;
        assert!(body["items"][0]["finished_at"].as_i64().is_some(), "{body}");
        assert_eq!(Stats::get(&stats.entities.stalled), 1);
        let store = pipeline.store();
        pipeline.shutdown().unwrap();
        let r = store.load_entity("report-1").unwrap().unwrap();
        assert_eq!(
            orderly::model::value::fields_to_json(&r.state.fields),
            serde_json::json!({"pages": 40, "done": true})
        );
    });
}

/// The dead-letter listing the dashboard pages through stays correct with
/// 100,000 records: pages are contiguous and ordered, filters hold, the
/// last page says so, and the open count comes from the store's counter.
#[test]
fn dead_letters_page_through_a_hundred_thousand_records() {
    use orderly::model::dead_letter::DeadLetter;
    use orderly::store::{CommitBatch, SledStore};
    let topic = TestTopic::new(1);
    let dir = tempfile::tempdir().unwrap();
    let n = 100_000u64;
    {
        let store = SledStore::open(dir.path(), 64).unwrap();
        let mut open = 0;
        for chunk in (1..=n).collect::<Vec<_>>().chunks(10_000) {
            let mut batch = CommitBatch::default();
            for &id in chunk {
                let status = if id % 10 == 0 { "retried" } else { "open" };
                open += u64::from(status == "open");
                batch.dead_letters.push(DeadLetter {
                    id,
                    code: if id % 2 == 0 {
                        "bad_json"
                    } else {
                        "missing_type"
                    }
                    .into(),
                    reason: format!("record {id}"),
                    attempts: 1,
                    topic: topic.topic.clone(),
                    partition: 0,
                    offset: id as i64,
                    key: None,
                    value: Some(b"{".to_vec()),
                    headers: Vec::new(),
                    entity_id: Some(format!("lead-{}", id % 1000)),
                    event_id: None,
                    event_type: None,
                    created_at: id as i64,
                    status: status.into(),
                });
            }
            batch.open_dead_letters = Some(open);
            store.commit(&batch).unwrap();
        }
        futures::executor::block_on(orderly::store::Store::flush(&store)).unwrap();
    }

    let config = topic.config(dir.path());
    let port = common::free_port();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let server = std::thread::spawn(move || {
        actix::System::new().block_on(async move {
            let pipeline = Pipeline::start(config, Default::default()).unwrap();
            let server =
                orderly::admin::start(pipeline.control(), &format!("127.0.0.1:{port}"), None)
                    .unwrap();
            while stop_rx.try_recv().is_err() {
                actix_rt::time::sleep(Duration::from_millis(20)).await;
            }
            server.stop(true).await;
            pipeline.shutdown().unwrap();
        })
    });
    let base = format!("http://127.0.0.1:{port}");
    let get = |path: &str| -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match reqwest::blocking::get(format!("{base}{path}")).and_then(|r| r.json()) {
                Ok(v) => return v,
                Err(e) if Instant::now() > deadline => panic!("{path}: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    };

    // The "failed" tile: the open count, without a scan.
    assert_eq!(get("/api/overview")["gauges"]["failed"], 90_000);

    // Three pages of open dead letters, 50 each, contiguous and ascending.
    let mut after = 0u64;
    let mut seen = Vec::new();
    for _ in 0..3 {
        let page = get(&format!(
            "/api/dead-letters?status=open&limit=50&after={after}"
        ));
        let items = page["items"].as_array().unwrap();
        assert_eq!(items.len(), 50);
        for d in items {
            assert_eq!(d["status"], "open");
            seen.push(d["id"].as_u64().unwrap());
        }
        after = page["next_after"].as_u64().expect("more pages");
    }
    let expected: Vec<u64> = (1..).filter(|id| id % 10 != 0).take(150).collect();
    assert_eq!(seen, expected);

    // Filters compose with paging, and the last page says there is no next one.
    let page = get("/api/dead-letters?status=retried&code=bad_json&limit=1000&after=99000");
    let ids: Vec<u64> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, (99_010..=n).step_by(10).collect::<Vec<_>>());
    assert!(page["next_after"].is_null(), "{}", page["next_after"]);

    // A filter that matches nothing scans all 100,000 records; meanwhile
    // /health answers (the scan runs off the server's one worker). Scans
    // repeat so that one is surely running while health is asked.
    let scanning = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let scans = {
        let (base, scanning) = (base.clone(), scanning.clone());
        std::thread::spawn(move || {
            let mut took = Vec::new();
            while scanning.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                reqwest::blocking::get(format!("{base}/api/dead-letters?code=no_such_code"))
                    .unwrap()
                    .error_for_status()
                    .unwrap();
                took.push(t.elapsed());
            }
            took
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let mut health = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let status = reqwest::blocking::get(format!("{base}/health"))
            .unwrap()
            .status();
        assert_eq!(status, 200);
        health.push(t.elapsed());
    }
    scanning.store(false, std::sync::atomic::Ordering::Relaxed);
    let scan_took = scans.join().unwrap();
    let slowest_scan = scan_took.iter().max().copied().unwrap_or_default();
    let median_health = {
        health.sort();
        health[health.len() / 2]
    };
    // Behind a blocking scan, half the health checks would wait for one:
    // their median would be a sizeable part of a scan. (Only compared when
    // a scan is long enough to tell; this is an ordering check, not a speed
    // requirement.)
    eprintln!("slowest scan {slowest_scan:?}, median health {median_health:?}");
    if slowest_scan > Duration::from_millis(100) {
        assert!(
            median_health < slowest_scan / 4,
            "health waited on scans: median {median_health:?}, scan {slowest_scan:?}"
        );
    }

    stop_tx.send(()).unwrap();
    server.join().unwrap();
}

/// Bound beyond loopback, the admin API asks for the token on the reads
/// that show payloads and state, not on health; the token comes from
/// `admin_token_file`.
#[test]
fn beyond_loopback_payload_reads_need_the_token_from_its_file() {
    let topic = TestTopic::new(1);
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret-from-file\n").unwrap();
    let config = topic.config_file(dir.path(), &dir.path().join("data"));
    let token_path = token_file.to_string_lossy().into_owned();
    let mut orderly = common::OrderlyProcess::start(
        &config,
        &dir.path().join("orderly.log"),
        &[
            ("ORDERLY_ADMIN_ADDR", "0.0.0.0:0"),
            ("ORDERLY_ADMIN_TOKEN_FILE", &token_path),
        ],
    );
    let addr = orderly.admin_addr(Duration::from_secs(60));
    let port = addr.rsplit(':').next().unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let get = |path: &str, token: Option<&str>| {
        let mut req = reqwest::blocking::Client::new().get(format!("{base}{path}"));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send().expect("admin answers").status().as_u16()
    };
    assert_eq!(get("/health", None), 200);
    assert_eq!(get("/api/overview", None), 200);
    assert_eq!(get("/api/dead-letters", None), 401);
    assert_eq!(get("/api/entities/lead-1", None), 401);
    assert_eq!(get("/api/dead-letters", Some("wrong")), 401);
    assert_eq!(get("/api/dead-letters", Some("s3cret-from-file")), 200);
    assert_eq!(get("/api/entities/lead-1", Some("s3cret-from-file")), 404);
    let status = orderly.terminate(Duration::from_secs(30));
    assert!(status.success(), "{}", orderly.log_tail());
}

/// A retry sent to an instance that does not own the entity's partition is
/// refused, and nothing changes there: applied, it would change an orphan
/// record that never reaches the owner. The same retry on an owned
/// partition goes through.
#[test]
fn a_retry_on_an_instance_that_does_not_own_the_partition_is_refused() {
    use orderly::model::dead_letter::DeadLetter;
    use orderly::store::{CommitBatch, SledStore};
    let topic = TestTopic::new(1);
    let dir = tempfile::tempdir().unwrap();
    let letter = |id: u64, entity: &str, partition: i32| {
        let value = serde_json::json!({
            "entity_id": entity, "tenant_id": "tenant-0", "event_id": format!("e{id}"),
            "type": "lead.updated", "occurred_at": 1_000, "payload": {"stage": id}
        });
        DeadLetter {
            id,
            code: "handler_permanent".into(),
            reason: "seeded".into(),
            attempts: 1,
            topic: topic.topic.clone(),
            partition,
            offset: id as i64,
            key: Some(entity.as_bytes().to_vec()),
            value: Some(value.to_string().into_bytes()),
            headers: Vec::new(),
            entity_id: Some(entity.into()),
            event_id: Some(format!("e{id}")),
            event_type: Some("lead.updated".into()),
            created_at: 0,
            status: "open".into(),
        }
    };
    {
        let store = SledStore::open(dir.path(), 64).unwrap();
        let batch = CommitBatch {
            // Partition 5 of a one-partition topic: owned by nobody here.
            dead_letters: vec![letter(1, "lead-elsewhere", 5), letter(2, "lead-here", 0)],
            open_dead_letters: Some(2),
            ..Default::default()
        };
        store.commit(&batch).unwrap();
        futures::executor::block_on(orderly::store::Store::flush(&store)).unwrap();
    }
    let mut config = topic.config(dir.path());
    config.admin_token = Some("t".into());
    let port = common::free_port();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let (bound_tx, bound_rx) = std::sync::mpsc::channel::<()>();
    let server = std::thread::spawn(move || {
        actix::System::new().block_on(async move {
            let pipeline = Pipeline::start(config, Default::default()).unwrap();
            let store = pipeline.store();
            let server = orderly::admin::start(
                pipeline.control(),
                &format!("127.0.0.1:{port}"),
                Some("t".into()),
            )
            .unwrap();
            // The listener is bound once `start` returns: requests queue.
            bound_tx.send(()).unwrap();
            while stop_rx.try_recv().is_err() {
                actix_rt::time::sleep(Duration::from_millis(20)).await;
            }
            server.stop(true).await;
            pipeline.shutdown().unwrap();
            store
        })
    });
    // Under load, starting the pipeline can take longer than a client's
    // first request: wait for the bound listener, not for luck.
    bound_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("admin server bound");
    let base = format!("http://127.0.0.1:{port}");
    let retry = |id: u64| {
        let resp = reqwest::blocking::Client::new()
            .post(format!("{base}/api/dead-letters/{id}/retry"))
            .bearer_auth("t")
            .send()
            .expect("admin answers");
        let status = resp.status().as_u16();
        (status, resp.json::<serde_json::Value>().unwrap_or_default())
    };
    // Wait until the partition is assigned: the owned retry then succeeds.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (status, body) = loop {
        let (status, body) = retry(2);
        if status == 200 || Instant::now() > deadline {
            break (status, body);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(status, 200, "{body}");
    let (status, body) = retry(1);
    assert_eq!(status, 409, "{body}");
    let reason = body["error"].as_str().unwrap();
    assert!(reason.contains("does not own"), "{reason}");

    stop_tx.send(()).unwrap();
    let store = server.join().unwrap();
    use orderly::store::Store;
    assert!(
        store.load_entity("lead-elsewhere").unwrap().is_none(),
        "nothing applied"
    );
    assert_eq!(store.dead_letter(1).unwrap().unwrap().status, "open");
    assert!(store.load_entity("lead-here").unwrap().is_some());
    assert_eq!(store.dead_letter(2).unwrap().unwrap().status, "retried");
}
