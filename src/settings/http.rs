//! The HTTP settings source: an endpoint serving every tenant's document,
//! polled with conditional requests (`ETag` / `If-None-Match`) every `ttl_ms`.

use super::{reject, rejected_dead_letter, Applied, SourceParts};
use crate::model::tenant::{SettingsDocument, SettingsError};
use serde::Deserialize as _;
use std::sync::atomic::Ordering::Relaxed;

/// Polls an HTTP endpoint that serves every tenant's document, with
/// conditional requests, every `ttl`.
pub struct HttpReader {
    /// The endpoint.
    pub url: String,
    /// How long a fetched copy is trusted before it is revalidated.
    pub ttl: std::time::Duration,
}

/// Parses the HTTP source's body: an array of documents, or `{"tenants": [...]}`.
pub fn parse_document_list(body: &[u8]) -> Result<Vec<serde_json::Value>, SettingsError> {
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| SettingsError::Undecodable(format!("JSON: {e}")))?;
    match v {
        serde_json::Value::Array(items) => Ok(items),
        serde_json::Value::Object(mut o) => match o.remove("tenants") {
            Some(serde_json::Value::Array(items)) => Ok(items),
            _ => Err(SettingsError::Undecodable(
                "expected an array of documents or {\"tenants\": [...]}".into(),
            )),
        },
        _ => Err(SettingsError::Undecodable(
            "expected an array of documents or {\"tenants\": [...]}".into(),
        )),
    }
}

impl HttpReader {
    /// Runs until `parts.stop`. The registry is caught up after the first
    /// successful fetch; until then it retries every second.
    pub fn run(self, parts: SourceParts) {
        use crate::internal_events::{emit, SettingsRefreshed};
        let client = match reqwest::blocking::Client::builder()
            .timeout(std::time::Duration::from_secs(10))
            .build()
        {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot create the settings HTTP client");
                return;
            }
        };
        let mut etag: Option<String> = None;
        while !parts.stop.load(Relaxed) {
            let result = self.refresh(&client, &mut etag, &parts);
            emit(SettingsRefreshed { result }, &parts.stats);
            let wait = if parts.settings.is_caught_up() {
                self.ttl
            } else {
                self.ttl.min(std::time::Duration::from_secs(1))
            };
            let until = std::time::Instant::now() + wait;
            while std::time::Instant::now() < until && !parts.stop.load(Relaxed) {
                std::thread::sleep(std::time::Duration::from_millis(20).min(wait));
            }
        }
    }

    /// One conditional request: `changed`, `unchanged` (fetched, but every
    /// document equals the one in force), `not_modified` or `error`.
    fn refresh(
        &self,
        client: &reqwest::blocking::Client,
        etag: &mut Option<String>,
        parts: &SourceParts,
    ) -> &'static str {
        let mut req = client.get(&self.url);
        if let Some(tag) = etag.as_deref() {
            req = req.header(reqwest::header::IF_NONE_MATCH, tag);
        }
        let error = |e: &dyn std::fmt::Display| {
            crate::internal_events::emit(
                crate::internal_events::ComponentError {
                    stage: "settings",
                    error_code: "http_error",
                    error: e,
                },
                &parts.stats,
            );
            "error"
        };
        let resp = match req.send() {
            Ok(r) => r,
            Err(e) => return error(&format!("GET {}: {e}", self.url)),
        };
        if resp.status() == reqwest::StatusCode::NOT_MODIFIED {
            return "not_modified";
        }
        if !resp.status().is_success() {
            return error(&format!("GET {}: status {}", self.url, resp.status()));
        }
        let new_tag = resp
            .headers()
            .get(reqwest::header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = match read_capped(resp, BODY_MAX) {
            Ok(b) => b,
            Err(e) => return error(&format!("GET {}: reading the body: {e}", self.url)),
        };
        let docs = match parse_document_list(&body) {
            Ok(d) => d,
            Err(e) => {
                let offset = (crc32(&body) & 0x7fff_ffff) as i64;
                let dl = rejected_dead_letter(&e, &self.url, -1, offset, None, Some(&body), vec![]);
                reject(parts, &e, &self.url, dl);
                return "error";
            }
        };
        let mut changed = false;
        for doc in docs {
            let outcome = SettingsDocument::deserialize(&doc)
                .map_err(|e| SettingsError::Undecodable(format!("JSON: {e}")))
                .and_then(|d| parts.settings.apply_document(d));
            match outcome {
                Ok(Applied::Changed { tenant, version }) => {
                    changed = true;
                    if parts.settings.is_caught_up() {
                        tracing::info!(%tenant, version, "tenant settings changed");
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    // One dead letter per distinct rejected document.
                    let raw = serde_json::to_vec(&doc).unwrap_or_default();
                    let offset = (crc32(&raw) & 0x7fff_ffff) as i64;
                    let dl =
                        rejected_dead_letter(&e, &self.url, 0, offset, None, Some(&raw), vec![]);
                    reject(parts, &e, &self.url, dl);
                }
            }
        }
        *etag = new_tag;
        parts.settings.set_caught_up();
        if changed {
            "changed"
        } else {
            "unchanged"
        }
    }
}

/// Reads every tenant's settings from the configured source once, up to
/// the end it had at the call, and returns the registry (for
/// CRC-32 (IEEE), to name a rejected HTTP document stably across restarts.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

/// The largest settings response read: a bigger one is an error (the
/// settings in force stay), never an allocation without bound.
pub const BODY_MAX: u64 = 64 * 1024 * 1024;

/// Reads all of `body`, or fails once it passes `max` bytes.
fn read_capped(body: impl std::io::Read, max: u64) -> Result<Vec<u8>, String> {
    use std::io::Read as _;
    let mut out = Vec::new();
    body.take(max + 1)
        .read_to_end(&mut out)
        .map_err(|e| e.to_string())?;
    if out.len() as u64 > max {
        return Err(format!("the response is larger than {max} bytes"));
    }
    Ok(out)
}

#[cfg(test)]
mod body_tests {
    #[test]
    fn a_body_over_the_cap_is_an_error_not_an_allocation() {
        let read = |n: usize, max| super::read_capped(std::io::Cursor::new(vec![b'x'; n]), max);
        assert_eq!(read(10, 10).unwrap().len(), 10);
        assert!(read(11, 10).unwrap_err().contains("larger than 10 bytes"));
        // An endless body stops at the cap.
        let endless = std::io::repeat(b'{');
        assert!(super::read_capped(endless, 1 << 20).is_err());
    }
}
