//! The dashboard: one page (HTML, CSS and JS embedded in the binary, no build step and no CDN)
//! served at `/dashboard`, and the JSON it polls under `/dashboard/api/...`.
//!
//! The page itself is public; every data call needs an API key (`Authorization: Bearer <key>`,
//! as on `/v2/...`), and a key scoped to endpoints sees only those. The page asks for the key,
//! keeps it in the tab's session storage, and says so when the gateway answers 401. Each call
//! is one or two NATS API requests (`endpoint.list`, `endpoint.health`, `workers.list`,
//! `hosts.list`, `jobs.list`); retrying a dead-lettered job uses RunPod's `/v2/{endpoint}/retry/{id}`.

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use shoal_actors::clock::now_ms;
use shoal_protocol::api::JobsRequest;
use shoal_protocol::endpoint::EndpointSpec;
use shoal_protocol::ids::validate_id;
use shoal_protocol::job::JobState;
use shoal_protocol::keys::ApiKeyRecord;
use shoal_protocol::worker::{StartPhases, WorkerRecord, WorkerState};

use crate::Gateway;
use crate::routes::{HttpError, json, key_of};

const PAGE: &str = include_str!("../assets/dashboard.html");
const SCRIPT: &str = include_str!("../assets/dashboard.js");
const STYLE: &str = include_str!("../assets/dashboard.css");

/// The dashboard's routes (merged into the gateway's router).
pub(crate) fn routes() -> Router<Gateway> {
    Router::new()
        .route("/dashboard", get(page))
        .route("/dashboard/", get(page))
        .route("/dashboard/app.js", get(script))
        .route("/dashboard/app.css", get(style))
        .route("/dashboard/api/endpoints", get(endpoints))
        .route("/dashboard/api/endpoints/{endpoint}/health", get(health))
        .route("/dashboard/api/endpoints/{endpoint}/workers", get(workers))
        .route("/dashboard/api/endpoints/{endpoint}/jobs", get(jobs))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

async fn page() -> Response {
    asset("text/html; charset=utf-8", PAGE)
}

async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

// ---- the key -------------------------------------------------------------------------------

/// Who is asking: the key's record, or `None` when the gateway requires no key.
struct Caller(Option<ApiKeyRecord>);

impl Caller {
    fn allows(&self, endpoint: &str) -> bool {
        self.0.as_ref().is_none_or(|k| k.allows(endpoint))
    }

    /// The endpoint, checked: a valid id the key may use.
    fn endpoint(&self, endpoint: &str) -> Result<(), HttpError> {
        validate_id("endpoint id", endpoint)?;
        match &self.0 {
            Some(k) if !k.allows(endpoint) => {
                Err(HttpError::unauthorized(format!("API key {} may not use endpoint {endpoint}", k.id)))
            }
            _ => Ok(()),
        }
    }
}

/// Checks the request's API key, as `/v2/...` does.
async fn caller(gw: &Gateway, headers: &HeaderMap) -> Result<Caller, HttpError> {
    key_of(gw, headers).await.map(Caller)
}

/// The endpoint of a `/dashboard/api/endpoints/{endpoint}/...` call, taken only once the
/// caller's key is checked (first) and allowed to use that endpoint (after the id is checked).
struct Scoped(String);

impl FromRequestParts<Gateway> for Scoped {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, gw: &Gateway) -> Result<Self, HttpError> {
        let who = caller(gw, &parts.headers).await?;
        let Path(endpoint) = Path::<String>::from_request_parts(parts, gw).await?;
        who.endpoint(&endpoint)?;
        Ok(Scoped(endpoint))
    }
}

// ---- data ----------------------------------------------------------------------------------

/// An endpoint as the dashboard shows it (its spec without env, volumes or command).
#[derive(Debug, Serialize)]
struct EndpointView {
    id: String,
    version: u64,
    workers_min: u32,
    workers_max: u32,
    gpu_types: Vec<String>,
    gpu_count: u32,
    scaler: String,
    scaler_value: f64,
    idle_timeout_s: u32,
    execution_timeout_ms: u64,
    image: Option<String>,
}

impl From<&EndpointSpec> for EndpointView {
    fn from(s: &EndpointSpec) -> Self {
        EndpointView {
            id: s.id.clone(),
            version: s.version,
            workers_min: s.workers_min,
            workers_max: s.workers_max,
            gpu_types: s.gpu_types.clone(),
            gpu_count: s.gpu_count,
            scaler: format!("{:?}", s.scaler),
            scaler_value: s.scaler_value,
            idle_timeout_s: s.idle_timeout_s,
            execution_timeout_ms: s.execution_timeout_ms,
            image: s.image.clone(),
        }
    }
}

async fn endpoints(State(gw): State<Gateway>, headers: HeaderMap) -> Result<Response, HttpError> {
    let who = caller(&gw, &headers).await?;
    let list = gw.api.list_endpoints().await?;
    let endpoints: Vec<EndpointView> =
        list.endpoints.iter().filter(|e| who.allows(&e.id)).map(EndpointView::from).collect();
    Ok(json(&serde_json::json!({ "endpoints": endpoints, "now_ms": now_ms() })))
}

async fn health(State(gw): State<Gateway>, Scoped(endpoint): Scoped) -> Result<Response, HttpError> {
    let health = gw.api.health(&endpoint).await?;
    Ok(json(&serde_json::json!({ "endpoint": endpoint, "health": health, "now_ms": now_ms() })))
}

/// A worker row: the record, its GPUs (from its host's inventory) and how long it has been up.
#[derive(Debug, Serialize)]
struct WorkerView {
    id: String,
    state: WorkerState,
    host: String,
    gpus: Vec<String>,
    version: u64,
    outdated: bool,
    uptime_ms: u64,
    current_jobs: Vec<String>,
    reason: Option<String>,
    restarts: u32,
    jobs_done: u64,
    start: Option<String>,
}

fn worker_view(w: WorkerRecord, gpus: Vec<String>, latest: u64, now: u64) -> WorkerView {
    WorkerView {
        outdated: w.spec_version < latest || w.state == WorkerState::Outdated,
        uptime_ms: now.saturating_sub(w.started_at_ms),
        start: w.start.as_ref().map(StartPhases::summary),
        id: w.id,
        state: w.state,
        host: w.host,
        gpus,
        version: w.spec_version,
        current_jobs: w.current_jobs,
        reason: w.reason,
        restarts: w.restarts,
        jobs_done: w.jobs_done,
    }
}

async fn workers(State(gw): State<Gateway>, Scoped(endpoint): Scoped) -> Result<Response, HttpError> {
    let (spec, list, hosts) =
        tokio::try_join!(gw.api.get_endpoint(&endpoint), gw.api.workers(Some(&endpoint)), gw.api.hosts())?;
    let now = now_ms();
    let workers: Vec<WorkerView> = list
        .workers
        .into_iter()
        .map(|w| {
            let gpus = hosts
                .hosts
                .iter()
                .filter(|h| h.id == w.host)
                .flat_map(|h| h.gpus.iter())
                .filter(|g| g.worker_id.as_deref() == Some(w.id.as_str()))
                .map(|g| g.name.clone())
                .collect();
            worker_view(w, gpus, spec.version, now)
        })
        .collect();
    Ok(json(&serde_json::json!({ "endpoint": endpoint, "version": spec.version, "workers": workers, "now_ms": now })))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobsQuery {
    /// Comma-separated states (`FAILED,TIMED_OUT`); none: all.
    state: Option<String>,
    limit: Option<u32>,
}

/// `FAILED,TIMED_OUT` → the states; an unknown name is a bad request naming the valid ones.
fn parse_states(list: &str) -> Result<Vec<JobState>, HttpError> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|name| name.parse::<JobState>().map_err(HttpError::bad_request))
        .collect()
}

async fn jobs(
    State(gw): State<Gateway>,
    Scoped(endpoint): Scoped,
    query: Result<Query<JobsQuery>, QueryRejection>,
) -> Result<Response, HttpError> {
    let Query(query) = query?;
    let states = query.state.as_deref().map(parse_states).transpose()?.unwrap_or_default();
    let req = JobsRequest { endpoint: endpoint.clone(), states, limit: query.limit.unwrap_or(0) };
    let list = gw.api.jobs(&req).await?;
    Ok(json(
        &serde_json::json!({ "endpoint": endpoint, "jobs": list.jobs, "matched": list.matched, "now_ms": now_ms() }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_parse_in_any_case_and_unknown_ones_are_named() {
        assert_eq!(parse_states("FAILED, timed_out").expect("valid"), vec![JobState::Failed, JobState::TimedOut]);
        assert_eq!(parse_states("").expect("empty"), Vec::<JobState>::new());
        let err = parse_states("FAILED,BROKEN").expect_err("unknown");
        let text = format!("{err:?}");
        assert!(text.contains("BROKEN") && text.contains("TIMED_OUT"), "{text}");
    }

    #[test]
    fn the_page_links_only_its_own_assets() {
        assert!(PAGE.contains("/dashboard/app.js") && PAGE.contains("/dashboard/app.css"));
        for asset in [PAGE, SCRIPT, STYLE] {
            for outside in ["src=\"http", "href=\"http", "url(http", "fetch(\"http", "import "] {
                assert!(!asset.contains(outside), "no CDN, nothing from outside the gateway: {outside}");
            }
        }
    }
}
