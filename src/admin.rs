//! The admin HTTP server: health, readiness, dead letters, parked entities
//! and entity views, for operators and their tools.
//!
//! Every mutating call (`POST`) needs `Authorization: Bearer <admin_token>`,
//! and with no token configured every mutating call is refused. The server
//! binds `admin_addr`, loopback by default. Reads are open on loopback; bound
//! beyond it, the reads that show raw payloads and state (dead letters and
//! entity views) need the token too.
//!
//! Scans of the store (dead letters, parked entities, entity views) run on
//! actix's blocking pool, so a long one never holds up `/health` or `/ready`.
//!
//! | method and path | what it does |
//! |---|---|
//! | `GET /health` | 200 while the process runs |
//! | `GET /ready` | 200 when partitions are assigned and the store accepts writes, else 503 with the reason |
//! | `GET /api/dead-letters?after=&limit=&entity=&type=&code=&status=` | a page of dead letters, oldest first; `next_after` continues |
//! | `POST /api/dead-letters/{id}/retry` | processes the event again through its entity's actor |
//! | `POST /api/dead-letters/{id}/skip` | marks it skipped |
//! | `POST /api/dead-letters/retry-all?…filters` and `/skip-all` | the same for every open dead letter that matches |
//! | `GET /api/parked?after=<id>&limit=N` | parked entities and why, a page at a time |
//! | `POST /api/parked/{entity}/release?skip=true` | releases a parked entity (skipping the event that parked it) |
//! | `GET /api/entities/{id}` | state, provenance per field, the retained event log, history entries and recent anomalies |
//! | `GET /` | the live dashboard |
//! | `GET /metrics` | Prometheus metrics |
//! | `GET /api/partitions` | this instance's partitions: assigned or only held, entities, checkpoint, lag, changelog position |
//! | `GET /api/overview` | counters, gauges, latency percentiles, partitions and recent corrections, for the dashboard |
//! | `GET /api/anomalies?limit=` | the most recent anomalies, newest first |
//! | `GET /api/undeliverable?after=&limit=` | outbox records the broker refused for good, with the reason |
//! | `GET /api/stalled` | events that ran past the stall deadline (running ones have no `finished_at`) |

use crate::model::dead_letter::DeadLetter;
use crate::pipeline::{Control, ControlError};
use crate::store::Store;
use actix_web::{get, post, web, HttpRequest, HttpResponse, Responder};
use serde::Deserialize;

/// What the handlers share.
struct Admin {
    control: Control,
    token: Option<String>,
    /// Bound beyond loopback: payload and state reads need the token.
    private_reads: bool,
}

/// Starts the server on the current actix System. Returns its handle.
pub fn start(
    control: Control,
    addr: &str,
    token: Option<String>,
) -> std::io::Result<actix_web::dev::ServerHandle> {
    let listener = std::net::TcpListener::bind(addr)?;
    let private_reads = !listener.local_addr()?.ip().is_loopback();
    let state = web::Data::new(Admin {
        control,
        token,
        private_reads,
    });
    let server = actix_web::HttpServer::new(move || {
        actix_web::App::new()
            .app_data(state.clone())
            .service(health)
            .service(ready)
            .service(list_dead_letters)
            .service(retry_all)
            .service(skip_all)
            .service(retry_one)
            .service(skip_one)
            .service(parked)
            .service(release)
            .service(entity_view)
            .service(stalled)
            .service(metrics)
            .service(dashboard)
            .service(overview)
            .service(partitions)
            .service(recent_anomalies)
            .service(undeliverable)
    })
    .workers(1)
    .disable_signals()
    .listen(listener)?;
    let bound: Vec<String> = server.addrs().iter().map(|a| a.to_string()).collect();
    let server = server.run();
    let handle = server.handle();
    actix_web::rt::spawn(server);
    // The bound address, so that with port 0 a test (or a human) can find it.
    tracing::info!(addr = %bound.join(","), "admin server listening; dashboard at http://{}/", bound.first().map(String::as_str).unwrap_or(addr));
    Ok(handle)
}

/// The refusal of a mutating call without the right token, if it is refused.
fn refused(admin: &Admin, req: &HttpRequest) -> Option<HttpResponse> {
    let Some(token) = &admin.token else {
        return Some(HttpResponse::Unauthorized()
            .json(serde_json::json!({"error": "mutating calls are disabled: set admin_token in the config"})));
    };
    let given = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given.is_some_and(|g| same_secret(g.as_bytes(), token.as_bytes())) {
        None
    } else {
        Some(
            HttpResponse::Unauthorized()
                .json(serde_json::json!({"error": "missing or wrong bearer token"})),
        )
    }
}

/// Compares a given token with the configured one in time that depends only
/// on their lengths, so the answer's timing does not reveal a matching prefix.
/// The refusal of a payload or state read without the right token, when
/// the server listens beyond loopback.
fn refused_read(admin: &Admin, req: &HttpRequest) -> Option<HttpResponse> {
    if !admin.private_reads {
        return None;
    }
    refused(admin, req)
}

fn same_secret(given: &[u8], token: &[u8]) -> bool {
    given.len() == token.len()
        && given
            .iter()
            .zip(token)
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
}

fn error(e: ControlError) -> HttpResponse {
    let body = serde_json::json!({"error": e.to_string()});
    match e {
        ControlError::NotFound(_) => HttpResponse::NotFound().json(body),
        ControlError::Conflict(_) => HttpResponse::Conflict().json(body),
        ControlError::Internal(_) => HttpResponse::InternalServerError().json(body),
    }
}

#[get("/health")]
async fn health() -> impl Responder {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

#[get("/ready")]
async fn ready(admin: web::Data<Admin>) -> impl Responder {
    match admin.control.not_ready() {
        None => HttpResponse::Ok().json(serde_json::json!({"ready": true})),
        Some(reason) => HttpResponse::ServiceUnavailable()
            .json(serde_json::json!({"ready": false, "reason": reason})),
    }
}

/// Filters for dead-letter listings and bulk actions.
#[derive(Deserialize, Default)]
struct Filter {
    after: Option<u64>,
    limit: Option<usize>,
    entity: Option<String>,
    r#type: Option<String>,
    code: Option<String>,
    status: Option<String>,
}

impl Filter {
    fn matches(&self, d: &DeadLetter) -> bool {
        self.entity
            .as_ref()
            .is_none_or(|e| d.entity_id.as_ref() == Some(e))
            && self
                .r#type
                .as_ref()
                .is_none_or(|t| d.event_type.as_ref() == Some(t))
            && self.code.as_ref().is_none_or(|c| &d.code == c)
            && self.status.as_ref().is_none_or(|s| &d.status == s)
    }
}

/// Scans dead letters after `after`, returning up to `limit` that match, and
/// where to continue.
fn page(
    store: &dyn Store,
    filter: &Filter,
    limit: usize,
) -> Result<(Vec<DeadLetter>, Option<u64>), String> {
    let mut after = filter.after.unwrap_or(0);
    let mut out = Vec::new();
    loop {
        let chunk = store.dead_letters(after, 1000).map_err(|e| e.to_string())?;
        let Some(last) = chunk.last().map(|d| d.id) else {
            return Ok((out, None));
        };
        for d in chunk {
            let id = d.id;
            if filter.matches(&d) {
                out.push(d);
                if out.len() == limit {
                    return Ok((out, Some(id)));
                }
            }
        }
        after = last;
    }
}

#[get("/api/dead-letters")]
async fn list_dead_letters(
    admin: web::Data<Admin>,
    req: HttpRequest,
    filter: web::Query<Filter>,
) -> impl Responder {
    if let Some(r) = refused_read(&admin, &req) {
        return r;
    }
    let limit = filter.limit.unwrap_or(100).clamp(1, 1000);
    let (control, filter) = (admin.control.clone(), filter.into_inner());
    match blocking(move || page(control.store(), &filter, limit)).await {
        Ok((items, next)) => HttpResponse::Ok().json(serde_json::json!({
            "items": items.iter().map(DeadLetter::to_json).collect::<Vec<_>>(),
            "next_after": next,
        })),
        Err(e) => HttpResponse::InternalServerError().json(serde_json::json!({"error": e})),
    }
}

#[post("/api/dead-letters/{id}/retry")]
async fn retry_one(
    admin: web::Data<Admin>,
    req: HttpRequest,
    id: web::Path<u64>,
) -> impl Responder {
    if let Some(r) = refused(&admin, &req) {
        return r;
    }
    match admin.control.retry_dead_letter(*id).await {
        Ok(outcome) => HttpResponse::Ok()
            .json(serde_json::json!({"id": *id, "status": "retried", "outcome": outcome})),
        Err(e) => error(e),
    }
}

#[post("/api/dead-letters/{id}/skip")]
async fn skip_one(admin: web::Data<Admin>, req: HttpRequest, id: web::Path<u64>) -> impl Responder {
    if let Some(r) = refused(&admin, &req) {
        return r;
    }
    match admin.control.skip_dead_letter(*id).await {
        Ok(()) => HttpResponse::Ok().json(serde_json::json!({"id": *id, "status": "skipped"})),
        Err(e) => error(e),
    }
}

/// Applies `retry` (or skip) to every open dead letter matching the filter.
async fn bulk(admin: &Admin, filter: Filter, retry: bool) -> HttpResponse {
    let filter = Filter {
        status: Some(crate::model::dead_letter::OPEN.into()),
        after: None,
        ..filter
    };
    let control = admin.control.clone();
    let (items, _) = match blocking(move || page(control.store(), &filter, usize::MAX)).await {
        Ok(p) => p,
        Err(e) => return HttpResponse::InternalServerError().json(serde_json::json!({"error": e})),
    };
    let (mut done, mut failed) = (0, Vec::new());
    for d in items {
        let r = if retry {
            admin.control.retry_dead_letter(d.id).await.map(|_| ())
        } else {
            admin.control.skip_dead_letter(d.id).await
        };
        match r {
            Ok(()) => done += 1,
            Err(e) => failed.push(serde_json::json!({"id": d.id, "error": e.to_string()})),
        }
    }
    HttpResponse::Ok().json(serde_json::json!({"done": done, "failed": failed}))
}

#[post("/api/dead-letters/retry-all")]
async fn retry_all(
    admin: web::Data<Admin>,
    req: HttpRequest,
    filter: web::Query<Filter>,
) -> impl Responder {
    if let Some(r) = refused(&admin, &req) {
        return r;
    }
    bulk(&admin, filter.into_inner(), true).await
}

#[post("/api/dead-letters/skip-all")]
async fn skip_all(
    admin: web::Data<Admin>,
    req: HttpRequest,
    filter: web::Query<Filter>,
) -> impl Responder {
    if let Some(r) = refused(&admin, &req) {
        return r;
    }
    bulk(&admin, filter.into_inner(), false).await
}

#[get("/metrics")]
async fn metrics(admin: web::Data<Admin>) -> impl Responder {
    let Some(handle) = crate::metrics::prometheus() else {
        return HttpResponse::ServiceUnavailable()
            .body("another metrics recorder is installed in this process; orderly's Prometheus exporter is not");
    };
    admin.control.sample_gauges();
    handle.run_upkeep();
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(handle.render())
}

#[get("/api/stalled")]
async fn stalled(admin: web::Data<Admin>) -> impl Responder {
    HttpResponse::Ok().json(serde_json::json!({"items": admin.control.stalled()}))
}

/// A page of parked entities: after this id, at most `limit` (100 by
/// default, 1,000 at most).
#[derive(Deserialize)]
struct ParkedQuery {
    after: Option<String>,
    limit: Option<usize>,
}

#[get("/api/parked")]
async fn parked(admin: web::Data<Admin>, q: web::Query<ParkedQuery>) -> impl Responder {
    let control = admin.control.clone();
    let limit = q.limit.unwrap_or(100).clamp(1, 1_000);
    let after = q.after.clone().unwrap_or_default();
    let scan = move || -> Result<(Vec<serde_json::Value>, Option<String>), String> {
        let store = control.store();
        let mut out = Vec::new();
        let page = store.parked_page(&after, limit).map_err(|e| e.to_string())?;
        let next = (page.len() == limit).then(|| page.last().cloned()).flatten();
        for id in page {
            match store.load_entity(&id).map_err(|e| e.to_string())? {
                Some(r) if r.parking.parked.is_some() => out.push(serde_json::json!({
                    "entity_id": r.entity_id,
                    "parked": r.parking.parked,
                    "held": r.parking.held.len(),
                })),
                _ => {}
            }
        }
        Ok((out, next))
    };
    match blocking(scan).await {
        Ok((out, next)) => HttpResponse::Ok().json(serde_json::json!({"items": out, "next": next})),
        Err(e) => HttpResponse::InternalServerError().json(serde_json::json!({"error": e})),
    }
}

/// Runs a store scan on the blocking pool, off the server's worker.
async fn blocking<T: Send + 'static>(
    scan: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    web::block(scan).await.map_err(|e| e.to_string())?
}

#[derive(Deserialize)]
struct ReleaseQuery {
    skip: Option<bool>,
}

#[post("/api/parked/{entity}/release")]
async fn release(
    admin: web::Data<Admin>,
    req: HttpRequest,
    id: web::Path<String>,
    q: web::Query<ReleaseQuery>,
) -> impl Responder {
    if let Some(r) = refused(&admin, &req) {
        return r;
    }
    match admin
        .control
        .resolve_parked(&id, q.skip.unwrap_or(false))
        .await
    {
        Ok(r) => HttpResponse::Ok()
            .json(serde_json::json!({"entity_id": *id, "released_events": r.events})),
        Err(e) => error(e),
    }
}

#[get("/api/entities/{id}")]
async fn entity_view(
    admin: web::Data<Admin>,
    req: HttpRequest,
    id: web::Path<String>,
) -> impl Responder {
    if let Some(r) = refused_read(&admin, &req) {
        return r;
    }
    let (control, id) = (admin.control.clone(), id.into_inner());
    let shown = id.clone();
    match blocking(move || entity_json(control.store(), &id)).await {
        Ok(Some(view)) => HttpResponse::Ok().json(view),
        Ok(None) => HttpResponse::NotFound()
            .json(serde_json::json!({"error": format!("no entity {shown}")})),
        Err(e) => HttpResponse::InternalServerError().json(serde_json::json!({"error": e})),
    }
}

/// History entries an entity view shows: the newest.
const HISTORY_SHOWN: usize = 100;

/// An entity's record, retained log, newest history and recent anomalies.
fn entity_json(store: &dyn Store, id: &str) -> Result<Option<serde_json::Value>, String> {
    let Some(r) = store.load_entity(id).map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    let mut anomalies = Vec::new();
    let mut after = store.anomaly_seq().unwrap_or(1).saturating_sub(10_000);
    while let Ok(chunk) = store.anomalies(after, 1000) {
        let Some(last) = chunk.last().map(|a| a.seq) else {
            break;
        };
        anomalies.extend(
            chunk
                .into_iter()
                .filter(|a| a.entity_id == id)
                .map(|a| a.to_json()),
        );
        after = last;
    }
    let n = anomalies.len();
    let recent: Vec<_> = anomalies.into_iter().skip(n.saturating_sub(50)).collect();
    // The retained event log: which event wrote what, in order.
    let log: Vec<_> = r.log.iter().map(log_entry_json).collect();
    let history: Vec<_> = store
        .history_tail(id, HISTORY_SHOWN)
        .unwrap_or_default()
        .iter()
        .map(log_entry_json)
        .collect();
    Ok(Some(serde_json::json!({
        "record": r.to_json(),
        "log": log,
        "history": history,
        "recent_anomalies": recent,
    })))
}

fn log_entry_json(e: &crate::model::fold::LogEntry) -> serde_json::Value {
    serde_json::json!({
        "event_id": e.provenance.event_id,
        "event_type": e.event_type,
        "occurred_at": e.key.occurred_at,
        "version": e.key.version,
        "payload": crate::model::value::fields_to_json(&e.payload),
        "partition": e.provenance.partition,
        "offset": e.provenance.offset,
        "processed_at": e.provenance.processed_at,
    })
}

/// The dashboard: one self-contained page, no CDN, built into the binary.
const DASHBOARD: &str = include_str!("dashboard.html");

#[get("/")]
async fn dashboard() -> impl Responder {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(DASHBOARD)
}

#[derive(Deserialize)]
struct Recent {
    limit: Option<u64>,
}

#[get("/api/anomalies")]
async fn recent_anomalies(admin: web::Data<Admin>, q: web::Query<Recent>) -> impl Responder {
    let store = admin.control.store();
    let limit = q.limit.unwrap_or(20).clamp(1, 1000);
    let after = store.anomaly_seq().unwrap_or(0).saturating_sub(limit + 1);
    match store.anomalies(after, limit as usize + 1) {
        Ok(items) => {
            let mut items: Vec<_> = items.iter().map(|a| a.to_json()).collect();
            items.reverse();
            items.truncate(limit as usize);
            HttpResponse::Ok().json(serde_json::json!({"items": items}))
        }
        Err(e) => {
            HttpResponse::InternalServerError().json(serde_json::json!({"error": e.to_string()}))
        }
    }
}

#[derive(Deserialize)]
struct Page {
    after: Option<u64>,
    limit: Option<usize>,
}

#[get("/api/undeliverable")]
async fn undeliverable(
    admin: web::Data<Admin>,
    req: HttpRequest,
    q: web::Query<Page>,
) -> impl Responder {
    if let Some(r) = refused_read(&admin, &req) {
        return r;
    }
    let (control, after) = (admin.control.clone(), q.after.unwrap_or(0));
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let scan = move || {
        control
            .store()
            .undeliverable(after, limit)
            .map_err(|e| e.to_string())
    };
    match blocking(scan).await {
        Ok(items) => {
            let next = items.last().map(|(id, _)| *id);
            let items: Vec<_> = items
                .iter()
                .map(|(id, rec)| {
                    let header = |name: &str| {
                        rec.headers
                            .iter()
                            .find(|(k, _)| k == name)
                            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
                    };
                    serde_json::json!({
                        "id": id,
                        "topic": rec.topic,
                        "key": rec.key.as_deref().map(String::from_utf8_lossy),
                        "partition": rec.partition,
                        "value_bytes": rec.value.len(),
                        "reason": header("orderly-undeliverable"),
                    })
                })
                .collect();
            HttpResponse::Ok().json(serde_json::json!({"items": items, "next_after": next}))
        }
        Err(e) => HttpResponse::InternalServerError().json(serde_json::json!({"error": e})),
    }
}

#[get("/api/overview")]
async fn overview(admin: web::Data<Admin>) -> impl Responder {
    HttpResponse::Ok().json(admin.control.overview())
}

#[get("/api/partitions")]
async fn partitions(admin: web::Data<Admin>) -> impl Responder {
    let control = admin.control.clone();
    match web::block(move || control.partitions()).await {
        Ok(v) => HttpResponse::Ok().json(v),
        Err(e) => {
            HttpResponse::InternalServerError().json(serde_json::json!({"error": e.to_string()}))
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn tokens_compare_whole() {
        use super::same_secret;
        assert!(same_secret(b"123456", b"123456"));
        assert!(!same_secret(b"123457", b"123456"));
        assert!(!same_secret(b"12345", b"123456"));
        assert!(!same_secret(b"", b"123456"));
    }
}
