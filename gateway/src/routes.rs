//! The HTTP routes: RunPod's `/v2/{endpoint}/...` operations, each translated into one NATS
//! API request, and the API key check in front of them.

use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use shoal_actors::blobs::Upload;
use shoal_actors::client::ApiClient;
use shoal_actors::nats::Nats;
use shoal_protocol::ApiError;
use shoal_protocol::api::{JobRef, JobStatus, JobsRequest, RunRequest};
use shoal_protocol::ids::validate_id;
use shoal_protocol::job::{MAX_TTL_MS, MIN_TTL_MS, PolicyRequest};
use shoal_protocol::runpod::{Accepted, Envelope, ErrorBody, Health, RunBody};

use crate::limits::{Limiter, Op, Refusal};
use crate::{Gateway, GatewayConfig, keys};

/// `/runsync`'s `?wait=`: default and bounds, in ms (RunPod's).
const DEFAULT_SYNC_WAIT_MS: u64 = 90_000;
const MIN_SYNC_WAIT_MS: u64 = 1_000;
const MAX_SYNC_WAIT_MS: u64 = 300_000;

/// Every route of the API, with the key check in front.
pub fn router(nats: Nats, config: GatewayConfig) -> Router {
    let api = ApiClient::new(nats.client.clone(), nats.names.clone())
        .with_timeout(Duration::from_millis(config.request_timeout_ms));
    let (max_run, max_runsync) = (config.max_run_bytes, config.max_runsync_bytes);
    let limiter = Limiter::new(config.rate_limits.clone());
    let gw = Gateway { nats, api, config, limiter };
    Router::new()
        .route("/v2/{endpoint}/run", post(run).layer(DefaultBodyLimit::max(max_run)))
        .route("/v2/{endpoint}/runsync", post(runsync).layer(DefaultBodyLimit::max(max_runsync)))
        .route("/v2/{endpoint}/status/{id}", get(status).post(status))
        .route("/v2/{endpoint}/stream/{id}", get(stream).post(stream))
        .route("/v2/{endpoint}/cancel/{id}", post(cancel))
        .route("/v2/{endpoint}/retry/{id}", post(retry))
        .route("/v2/{endpoint}/purge-queue", post(purge))
        .route("/v2/{endpoint}/health", get(health))
        .route("/v2/{endpoint}/requests", get(requests))
        .route("/healthz", get(liveness))
        .route("/metrics", get(shoal_actors::metrics::serve_metrics))
        .merge(crate::dashboard::routes())
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(middleware::from_fn_with_state(gw.clone(), limit))
        .layer(middleware::from_fn_with_state(gw.clone(), authorize))
        .layer(middleware::from_fn(traced))
        .with_state(gw)
}

/// An error reply: a status and `{"error": "..."}`.
#[derive(Debug)]
pub(crate) struct HttpError {
    status: StatusCode,
    message: String,
}

impl HttpError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> HttpError {
        HttpError { status, message: message.into() }
    }
    pub(crate) fn bad_request(message: impl Into<String>) -> HttpError {
        HttpError::new(StatusCode::BAD_REQUEST, message)
    }
    pub(crate) fn unauthorized(message: impl Into<String>) -> HttpError {
        HttpError::new(StatusCode::UNAUTHORIZED, message)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = %self.status, message = %self.message, "request failed");
        }
        (self.status, axum::Json(ErrorBody { error: self.message })).into_response()
    }
}

impl From<ApiError> for HttpError {
    fn from(e: ApiError) -> Self {
        let status = StatusCode::from_u16(e.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        HttpError::new(status, e.message)
    }
}

impl From<BytesRejection> for HttpError {
    fn from(r: BytesRejection) -> Self {
        let status = r.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "the request body is larger than this operation accepts (10 MB for /run, 20 MB for /runsync)".to_string()
        } else {
            format!("cannot read the request body: {}", r.body_text())
        };
        HttpError::new(status, message)
    }
}

impl From<PathRejection> for HttpError {
    fn from(r: PathRejection) -> Self {
        HttpError::bad_request(r.body_text())
    }
}

impl From<QueryRejection> for HttpError {
    fn from(r: QueryRejection) -> Self {
        HttpError::bad_request(format!("invalid query: {}", r.body_text()))
    }
}

pub(crate) fn json<T: Serialize>(value: &T) -> Response {
    axum::Json(value).into_response()
}

// ---- API keys ------------------------------------------------------------------------------

/// The key of `Authorization: Bearer <key>` (scheme case-insensitive) or a bare `<key>`.
pub(crate) fn api_key(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let key = match value.split_once(char::is_whitespace) {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim(),
        _ => value,
    };
    (!key.is_empty()).then_some(key)
}

/// The `{endpoint}` of a `/v2/{endpoint}/...` path.
fn endpoint_of(path: &str) -> Option<&str> {
    path.strip_prefix("/v2/")?.split('/').next().filter(|s| !s.is_empty())
}

/// Runs the request in the caller's trace (its `traceparent` header) or a new one, which the
/// NATS requests it makes carry on; the reply's `traceparent` names it.
async fn traced(req: Request, next: Next) -> Response {
    use shoal_actors::trace_context::{TRACEPARENT, current, within};
    let incoming = req.headers().get(TRACEPARENT).and_then(|v| v.to_str().ok()).map(str::to_string);
    let (method, path) = (req.method(), req.uri().path());
    let span = tracing::debug_span!("request", %method, path, trace_id = tracing::field::Empty, otel.kind = "server");
    within(span, incoming.as_deref(), async {
        let mut response = next.run(req).await;
        if let Some(value) = current().and_then(|tp| header::HeaderValue::from_str(&tp).ok()) {
            response.headers_mut().insert(TRACEPARENT, value);
        }
        response
    })
    .await
}

/// Checks the key of every `/v2/...` request before its body is read.
async fn authorize(State(gw): State<Gateway>, req: Request, next: Next) -> Response {
    let Some(endpoint) = endpoint_of(req.uri().path()) else { return next.run(req).await };
    match key_of(&gw, req.headers()).await {
        Ok(Some(record)) if !record.allows(endpoint) => {
            HttpError::unauthorized(format!("API key {} may not use endpoint {endpoint}", record.id)).into_response()
        }
        Ok(_) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// Counts the request against its endpoint's limits for its operation (after the key check, so
/// that requests without a valid key use nobody's budget); over a limit, 429 with `Retry-After`
/// (whole seconds, rounded up) and what to change.
async fn limit(State(gw): State<Gateway>, req: Request, next: Next) -> Response {
    let Some((endpoint, op)) = Op::of_request(req.method(), req.uri().path()) else { return next.run(req).await };
    if validate_id("endpoint id", endpoint).is_err() {
        return next.run(req).await; // the route answers 400 without counting it
    }
    match gw.limiter.acquire(endpoint, op) {
        Ok(permit) => {
            let response = next.run(req).await;
            drop(permit);
            response
        }
        Err(refusal) => rate_limited(endpoint, op, refusal),
    }
}

fn rate_limited(endpoint: &str, op: Op, refusal: Refusal) -> Response {
    let (kind, retry_after_s, message) = match refusal {
        Refusal::Rate { limit, retry_after_ms } => {
            let s = retry_after_ms.div_ceil(1000);
            let message = format!(
                "rate limited: endpoint {endpoint} takes {limit} {} requests per 10 s on this gateway \
                 (gateway.rate_limits.{}.requests_per_10s); retry in {s} s",
                op.path(),
                op.key()
            );
            ("rate", s, message)
        }
        Refusal::Concurrent { limit } => {
            let message = format!(
                "rate limited: endpoint {endpoint} takes {limit} {} requests at once on this gateway \
                 (gateway.rate_limits.{}.concurrent); retry when one has been answered",
                op.path(),
                op.key()
            );
            ("concurrent", 1, message)
        }
    };
    shoal_actors::metrics::gateway_rate_limited(endpoint, op.key(), kind);
    let mut response = HttpError::new(StatusCode::TOO_MANY_REQUESTS, message).into_response();
    response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from(retry_after_s));
    response
}

/// The record of the request's API key: `None` when the gateway requires no key; an error when
/// it does and the request has none, or not a valid one.
pub(crate) async fn key_of(gw: &Gateway, headers: &HeaderMap) -> Result<Option<keys::ApiKeyRecord>, HttpError> {
    if !gw.config.require_api_key {
        return Ok(None);
    }
    let Some(key) = api_key(headers) else {
        return Err(HttpError::unauthorized("an API key is required: send `Authorization: Bearer <key>`"));
    };
    match keys::lookup(&gw.nats, key).await {
        Ok(Some(record)) => Ok(Some(record)),
        Ok(None) => Err(HttpError::unauthorized("invalid API key")),
        Err(e) => Err(HttpError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
    }
}

// ---- operations ----------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
struct RunQuery {
    /// `/runsync`: how long to wait for the result, ms.
    wait: Option<u64>,
    /// Alias of `policy.ttl` (RunPod's docs put it in the query).
    ttl: Option<u64>,
}

/// The NATS run request of a `/run` or `/runsync` body, with an input too large to inline
/// stored in the object store first (the returned name, to delete if the run fails).
async fn run_request(
    gw: &Gateway,
    endpoint: String,
    query: RunQuery,
    body: Bytes,
    sync: bool,
) -> Result<(RunRequest, Option<Upload>), HttpError> {
    validate_id("endpoint id", &endpoint)?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(HttpError::bad_request(r#"the body must be a JSON object with an "input", e.g. {"input": {}}"#));
    }
    let body: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| HttpError::bad_request(format!("the body is not valid JSON: {e}")))?;
    let body = RunBody::from_json(body).map_err(HttpError::bad_request)?;
    let Some(input) = body.input else {
        return Err(HttpError::bad_request(r#""input" is required (any JSON value but null)"#));
    };
    let mut policy: Option<PolicyRequest> = body.policy.map(PolicyRequest::from);
    if let Some(ttl) = query.ttl {
        if !(MIN_TTL_MS..=MAX_TTL_MS).contains(&ttl) {
            return Err(HttpError::bad_request(format!(
                "the ttl query parameter {ttl} is outside {MIN_TTL_MS}..={MAX_TTL_MS} (milliseconds)"
            )));
        }
        let p = policy.get_or_insert_with(PolicyRequest::default);
        p.ttl_ms = p.ttl_ms.or(Some(ttl));
    }
    let mut req = RunRequest {
        endpoint,
        input,
        policy,
        webhook: body.webhook,
        s3_config: body.s3_config,
        sync,
        wait_ms: if sync {
            query.wait.unwrap_or(DEFAULT_SYNC_WAIT_MS).clamp(MIN_SYNC_WAIT_MS, MAX_SYNC_WAIT_MS)
        } else {
            0
        },
        ..RunRequest::default()
    };
    // an input a NATS request should not carry goes to the object store first
    let uploaded = gw
        .nats
        .blobs
        .offload_input(&gw.nats.names, &mut req)
        .await
        .map_err(|e| HttpError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    Ok((req, uploaded))
}

/// Submits; on failure removes the input it stored, unless the job may be queued all the same
/// (see [`shoal_actors::client::ApiClient::run_uploaded`]).
async fn submit(gw: &Gateway, req: RunRequest, uploaded: Option<Upload>) -> Result<JobStatus, HttpError> {
    Ok(gw.api.run_uploaded(&req, uploaded).await?)
}

/// A status with its output read back from the object store when it was stored there.
async fn resolved(gw: &Gateway, mut status: JobStatus) -> Result<JobStatus, HttpError> {
    gw.nats.blobs.resolve_output(&mut status).await.map_err(|e| match e {
        shoal_actors::blobs::BlobError::Unavailable(m) => HttpError::new(StatusCode::SERVICE_UNAVAILABLE, m),
        other => HttpError::new(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
    })?;
    Ok(status)
}

async fn run(
    State(gw): State<Gateway>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<RunQuery>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, HttpError> {
    let (Path(endpoint), Query(query), body) = (path?, query?, body?);
    let (req, uploaded) = run_request(&gw, endpoint, query, body, false).await?;
    let status = submit(&gw, req, uploaded).await?;
    Ok(json(&Accepted { id: status.id, status: status.status }))
}

async fn runsync(
    State(gw): State<Gateway>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<RunQuery>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, HttpError> {
    let (Path(endpoint), Query(query), body) = (path?, query?, body?);
    let (req, uploaded) = run_request(&gw, endpoint, query, body, true).await?;
    let status = submit(&gw, req, uploaded).await?;
    // not done within the wait: 200 with IN_QUEUE or IN_PROGRESS, and the client polls /status
    let status = resolved(&gw, status).await?;
    Ok(json(&Envelope::from(&status)))
}

fn job_ref(endpoint: String, id: String) -> Result<JobRef, HttpError> {
    validate_id("endpoint id", &endpoint)?;
    validate_id("job id", &id)?;
    Ok(JobRef { endpoint: Some(endpoint), id, wait_ms: 0 })
}

async fn status(
    State(gw): State<Gateway>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, HttpError> {
    let Path((endpoint, id)) = path?;
    let status = gw.api.status(&job_ref(endpoint, id)?).await?;
    let status = resolved(&gw, status).await?;
    Ok(json(&StatusReply { waiting_reason: status.waiting_reason.clone(), envelope: Envelope::from(&status) }))
}

/// `/status`: RunPod's envelope, plus `waitingReason` for a queued job (why it still waits).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct StatusReply {
    #[serde(flatten)]
    envelope: Envelope,
    #[serde(skip_serializing_if = "Option::is_none")]
    waiting_reason: Option<String>,
}

/// Consume-on-read: the chunks since the previous call (`{"id", "status", "stream": [...]}`).
async fn stream(
    State(gw): State<Gateway>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, HttpError> {
    let Path((endpoint, id)) = path?;
    let reply = gw.api.stream(&job_ref(endpoint, id)?).await?;
    Ok(json(&reply))
}

async fn cancel(
    State(gw): State<Gateway>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, HttpError> {
    let Path((endpoint, id)) = path?;
    let status = gw.api.cancel(&job_ref(endpoint, id)?).await?;
    Ok(json(&Accepted { id: status.id, status: status.status }))
}

async fn retry(
    State(gw): State<Gateway>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, HttpError> {
    let Path((endpoint, id)) = path?;
    let status = gw.api.retry(&job_ref(endpoint, id)?).await?;
    Ok(json(&Accepted { id: status.id, status: status.status }))
}

async fn purge(State(gw): State<Gateway>, path: Result<Path<String>, PathRejection>) -> Result<Response, HttpError> {
    let Path(endpoint) = path?;
    validate_id("endpoint id", &endpoint)?;
    Ok(json(&gw.api.purge(&endpoint).await?))
}

async fn health(State(gw): State<Gateway>, path: Result<Path<String>, PathRejection>) -> Result<Response, HttpError> {
    let Path(endpoint) = path?;
    validate_id("endpoint id", &endpoint)?;
    Ok(json(&Health::from(&gw.api.health(&endpoint).await?)))
}

#[derive(Debug, Default, Deserialize)]
struct RequestsQuery {
    /// At most this many (default 50, at most 500).
    limit: Option<u32>,
}

/// One of `/requests`' entries.
#[derive(Serialize)]
struct RequestEntry {
    id: String,
    status: &'static str,
}

/// `/requests`: the endpoint's retained jobs, newest first, as `[{"id", "status"}]`.
async fn requests(
    State(gw): State<Gateway>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<RequestsQuery>, QueryRejection>,
) -> Result<Response, HttpError> {
    let (Path(endpoint), Query(query)) = (path?, query?);
    validate_id("endpoint id", &endpoint)?;
    let limit = query.limit.unwrap_or(JobsRequest::DEFAULT_LIMIT);
    if !(1..=JobsRequest::MAX_LIMIT).contains(&limit) {
        return Err(HttpError::bad_request(format!(
            "the limit query parameter {limit} is outside 1..={}",
            JobsRequest::MAX_LIMIT
        )));
    }
    let list = gw.api.jobs(&JobsRequest { endpoint, states: Vec::new(), limit }).await?;
    let entries: Vec<RequestEntry> =
        list.jobs.into_iter().map(|job| RequestEntry { id: job.id, status: job.state.as_str() }).collect();
    Ok(json(&entries))
}

/// For load balancers: 200 while the gateway's NATS connection is up.
async fn liveness(State(gw): State<Gateway>) -> Response {
    match gw.nats.client.connection_state() {
        async_nats::connection::State::Connected => json(&serde_json::json!({"status": "ok"})),
        other => HttpError::new(StatusCode::SERVICE_UNAVAILABLE, format!("NATS connection is {other}")).into_response(),
    }
}

async fn no_route(method: Method, uri: Uri) -> HttpError {
    HttpError::new(
        StatusCode::NOT_FOUND,
        format!(
            "no such operation: {method} {} (the API is /v2/{{endpoint}}/run, runsync, status/{{id}}, stream/{{id}}, cancel/{{id}}, retry/{{id}}, purge-queue, health, requests)",
            uri.path()
        ),
    )
}

async fn wrong_method(method: Method, uri: Uri) -> HttpError {
    HttpError::new(StatusCode::METHOD_NOT_ALLOWED, format!("{method} is not allowed on {}", uri.path()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(value).expect("header"));
        h
    }

    #[test]
    fn keys_come_bearer_or_bare_with_any_scheme_case() {
        assert_eq!(api_key(&headers("Bearer abc123")), Some("abc123"));
        assert_eq!(api_key(&headers("bearer abc123")), Some("abc123"));
        assert_eq!(api_key(&headers("BEARER   abc123 ")), Some("abc123"));
        assert_eq!(api_key(&headers("abc123")), Some("abc123"));
        assert_eq!(api_key(&headers("Bearer ")), Some("Bearer"), "a lone word is a bare key (and an invalid one)");
        assert_eq!(api_key(&headers("  ")), None);
        assert_eq!(api_key(&HeaderMap::new()), None);
    }

    #[test]
    fn the_endpoint_comes_from_v2_paths_only() {
        assert_eq!(endpoint_of("/v2/echo/run"), Some("echo"));
        assert_eq!(endpoint_of("/v2/echo"), Some("echo"));
        assert_eq!(endpoint_of("/v2//run"), None);
        assert_eq!(endpoint_of("/healthz"), None);
    }
}
