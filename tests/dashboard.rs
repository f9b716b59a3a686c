//! The dashboard in a real browser: headless Chromium, driven through
//! ChromeDriver's WebDriver protocol, loads the page while events flow,
//! sees the throughput change, looks up an entity's provenance, and retries
//! a dead letter with the button.
//!
//! Chromium comes from Debian's `chromium` and `chromium-driver` packages;
//! `.ci/run` installs them and sets `ORDERLY_REQUIRE_BROWSER=1`, which makes
//! this test mandatory. Elsewhere it skips, with a message, when they are
//! absent. `ORDERLY_SCREENSHOT=<path.png>` saves a screenshot of the page.

mod common;

use common::{event, shuffled_stream, TestTopic};
use orderly::pipeline::Pipeline;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn find(candidates: &[&str]) -> Option<PathBuf> {
    candidates.iter().map(PathBuf::from).find(|p| p.is_file())
}

/// A WebDriver session on a ChromeDriver child process.
struct Browser {
    driver: Child,
    base: String,
    session: String,
    http: reqwest::blocking::Client,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts ChromeDriver and a headless Chromium session, or says why not.
    fn start() -> Result<Browser, String> {
        let chromedriver = std::env::var_os("CHROMEDRIVER")
            .map(PathBuf::from)
            .or_else(|| find(&["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]))
            .ok_or("chromedriver not found (apt-get install chromium-driver)")?;
        let chromium = std::env::var_os("CHROMIUM")
            .map(PathBuf::from)
            .or_else(|| find(&["/usr/bin/chromium", "/usr/bin/chromium-browser"]))
            .ok_or("chromium not found (apt-get install chromium)")?;
        let port = common::free_port();
        let driver = Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting {}: {e}", chromedriver.display()))?;
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while http
            .get(format!("{base}/status"))
            .send()
            .ok()
            .and_then(|r| r.json::<Value>().ok())
            .is_none_or(|v| v["value"]["ready"] != true)
        {
            if Instant::now() > deadline {
                return Err("chromedriver did not become ready".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let profile = tempfile::tempdir().unwrap();
        let args = [
            "--headless=new".to_owned(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--window-size=1400,2400".into(),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": args},
        }}});
        let mut b = Browser {
            driver,
            base,
            session: String::new(),
            http,
            _profile: profile,
        };
        let v = b.call(reqwest::Method::POST, "/session", caps)?;
        b.session = v["sessionId"]
            .as_str()
            .ok_or(format!("no session: {v}"))?
            .to_owned();
        Ok(b)
    }

    fn call(&self, method: reqwest::Method, path: &str, body: Value) -> Result<Value, String> {
        let url = if path.starts_with("/session/") || path == "/session" {
            format!("{}{path}", self.base)
        } else {
            format!("{}/session/{}{path}", self.base, self.session)
        };
        let mut req = self.http.request(method, url);
        if !body.is_null() {
            req = req.json(&body);
        }
        let resp = req.send().map_err(|e| e.to_string())?;
        let status = resp.status();
        let v: Value = resp.json().map_err(|e| e.to_string())?;
        if !status.is_success() {
            return Err(format!("WebDriver {status}: {}", v["value"]));
        }
        Ok(v["value"].clone())
    }

    fn goto(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", json!({"url": url}))
            .expect("navigate");
    }

    fn element(&self, css: &str) -> String {
        let v = self
            .call(
                reqwest::Method::POST,
                "/element",
                json!({"using": "css selector", "value": css}),
            )
            .unwrap_or_else(|e| panic!("{css}: {e}"));
        v[ELEMENT].as_str().expect("element id").to_owned()
    }

    fn click(&self, css: &str) {
        let id = self.element(css);
        self.call(
            reqwest::Method::POST,
            &format!("/element/{id}/click"),
            json!({}),
        )
        .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    fn type_into(&self, css: &str, text: &str) {
        let id = self.element(css);
        self.call(
            reqwest::Method::POST,
            &format!("/element/{id}/value"),
            json!({"text": text}),
        )
        .unwrap_or_else(|e| panic!("type into {css}: {e}"));
    }

    /// Runs `script` in the page and returns its result.
    fn eval(&self, script: &str, args: Value) -> Value {
        self.call(
            reqwest::Method::POST,
            "/execute/sync",
            json!({"script": script, "args": args}),
        )
        .unwrap_or_else(|e| panic!("script failed: {e}"))
    }

    fn text(&self, css: &str) -> Option<String> {
        self.eval(
            "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;",
            json!([css]),
        )
        .as_str()
        .map(str::to_owned)
    }

    /// Waits until `f` returns `Some`, or panics with `what`.
    fn wait<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&Browser) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = f(self) {
                return v;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn screenshot(&self, path: &std::path::Path) {
        use base64::Engine;
        let v = self
            .call(reqwest::Method::GET, "/screenshot", Value::Null)
            .expect("screenshot");
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().expect("base64"))
            .expect("PNG");
        std::fs::write(path, png).expect("write screenshot");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.call(
                reqwest::Method::DELETE,
                &format!("/session/{}", self.session),
                Value::Null,
            );
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

#[test]
fn dashboard_shows_live_work_provenance_and_retries_a_dead_letter() {
    let browser = match Browser::start() {
        Ok(b) => b,
        Err(why) if std::env::var("ORDERLY_REQUIRE_BROWSER").as_deref() != Ok("1") => {
            eprintln!("SKIPPED: the dashboard browser test needs Chromium: {why}");
            return;
        }
        Err(why) => panic!("ORDERLY_REQUIRE_BROWSER=1 but the browser cannot start: {why}"),
    };

    let topic = TestTopic::new(4);
    let dir = tempfile::tempdir().unwrap();
    let mut config = topic.config(dir.path());
    let validating = Arc::new(common::Validating {
        broken: AtomicBool::new(true),
    });
    let handlers = common::skip_and_park(&mut config, validating.clone());
    let port = common::free_port();
    let base = format!("http://127.0.0.1:{port}");
    let token = "dash-token";

    // The pipeline and its admin server run in an actix System on their own thread.
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let pipeline_thread = std::thread::spawn(move || {
        actix::System::new().block_on(async move {
            let pipeline = Pipeline::start(config, handlers).unwrap();
            let server = orderly::admin::start(
                pipeline.control(),
                &format!("127.0.0.1:{port}"),
                Some(token.into()),
            )
            .unwrap();
            while stop_rx.try_recv().is_err() {
                actix_rt::time::sleep(Duration::from_millis(50)).await;
            }
            server.stop(true).await;
            pipeline.shutdown().unwrap();
        })
    });

    // First an entity to look up and two events the handler rejects, then a steady flow.
    let known = [
        event(
            "lead-dash",
            "e1",
            "lead.updated",
            1_000,
            json!({"name": "Ada"}),
        ),
        event(
            "lead-dash",
            "e2",
            "lead.updated",
            2_000,
            json!({"stage": "won"}),
        ),
        event(
            "invoice-dash",
            "bad-1",
            "invoice.updated",
            1_000,
            json!({"currency": "XTS"}),
        ),
        event(
            "invoice-dash2",
            "bad-2",
            "invoice.updated",
            1_000,
            json!({"currency": "XTS"}),
        ),
    ];
    common::produce_events(&topic.brokers, &topic.topic, &known);
    let flow = shuffled_stream(300, 10, 0.02, 77);
    let (brokers, name) = (topic.brokers.clone(), topic.topic.clone());
    let producer = std::thread::spawn(move || {
        common::produce_to(
            &brokers,
            &name,
            Some(150.0),
            flow.iter().map(|e| {
                orderly::tools::workload::message_of(e, orderly::tools::workload::Format::Proto)
            }),
        )
    });

    // The server binds after the pipeline starts, which under load takes a
    // while: a page opened before then would be the browser's error page.
    common::wait_until("the admin server", Duration::from_secs(60), || {
        reqwest::blocking::get(format!("{base}/health")).is_ok()
    });
    browser.goto(&format!("{base}/"));

    // Throughput is live: the number changes while events flow.
    let first = browser.wait("a throughput number", Duration::from_secs(30), |b| {
        b.text("#throughput")
            .filter(|t| t.parse::<f64>().is_ok() || t.replace(',', "").parse::<f64>().is_ok())
    });
    let second = browser.wait("the throughput to change", Duration::from_secs(30), |b| {
        b.text("#throughput").filter(|t| *t != first)
    });
    assert_ne!(first, second);
    let completed = browser.text("#completed").unwrap();
    assert_ne!(completed, "–", "completed work is shown");
    // Latency percentiles from /api/overview reach the tile and the table.
    let p99 = browser.wait("a p99 latency", Duration::from_secs(20), |b| {
        b.text("#p99")
            .filter(|t| t.replace(',', "").parse::<f64>().is_ok())
    });
    assert!(p99.replace(',', "").parse::<f64>().unwrap() > 0.0, "{p99}");
    let row = browser.text("#latency tr").unwrap_or_default();
    assert!(
        row.starts_with("Kafka append → durable") && !row.contains('–'),
        "{row}"
    );

    // Entity lookup shows, per field, the event that wrote it.
    browser.type_into("#entity-id", "lead-dash");
    browser.click("#entity-lookup");
    let provenance = |field: &str| {
        let css = format!("#entity-state tr[data-field=\"{field}\"] td.provenance");
        browser.wait(
            &format!("provenance of {field}"),
            Duration::from_secs(20),
            |b| b.text(&css),
        )
    };
    assert_eq!(provenance("name"), "e1");
    assert_eq!(provenance("stage"), "e2");

    // A dead letter is listed; the cause is fixed; Retry removes it from the open list.
    let id = browser.wait("an open dead letter", Duration::from_secs(30), |b| {
        b.eval(
            "const r = [...document.querySelectorAll('#dead-letters tr')].find(r => r.textContent.includes('bad-1')); return r ? r.dataset.id : null;",
            json!([]),
        )
        .as_str()
        .map(str::to_owned)
    });
    validating.broken.store(false, SeqCst);
    browser.type_into("#token", token);
    browser.click(&format!("button[data-retry=\"{id}\"]"));
    browser.wait("the retried dead letter to leave the list", Duration::from_secs(20), |b| {
        let still = b.eval(
            "return document.querySelector(`#dead-letters tr[data-id=\"${arguments[0]}\"]`) !== null;",
            json!([id]),
        );
        (still == json!(false)).then_some(())
    });
    let msg = browser.text("#dl-msg").unwrap_or_default();
    assert!(msg.contains("retry done"), "{msg}");
    // The other one is still open, and the retried one is recorded as retried.
    let open: Value = reqwest::blocking::get(format!("{base}/api/dead-letters?status=open"))
        .unwrap()
        .json()
        .unwrap();
    let open: Vec<&str> = open["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| d["event_id"].as_str())
        .collect();
    assert_eq!(open, ["bad-2"]);
    let retried: Value = reqwest::blocking::get(format!("{base}/api/dead-letters?status=retried"))
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(retried["items"][0]["event_id"], "bad-1");

    if let Some(path) = std::env::var_os("ORDERLY_SCREENSHOT") {
        browser.click("#dl-apply");
        std::thread::sleep(Duration::from_millis(1500));
        browser.screenshot(std::path::Path::new(&path));
    }

    producer.join().unwrap();
    stop_tx.send(()).unwrap();
    pipeline_thread.join().unwrap();
}
