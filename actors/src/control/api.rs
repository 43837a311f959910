//! The NATS API service: one NATS micro service (`shoal`), one endpoint per operation on
//! `<prefix>.v1.api.<op>`, all in one queue group so any number of control replicas answer.
//! Requests are MessagePack or JSON (by `Content-Type`), replies use the same encoding; an
//! error reply carries `Nats-Service-Error`/`Nats-Service-Error-Code` and an `ApiError` body.

use std::sync::Arc;

use async_nats::HeaderMap;
use async_nats::jetstream::kv;
use async_nats::service::ServiceExt;
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use shoal_protocol::api::*;
use shoal_protocol::codec::{CONTENT_TYPE, Encoding, decode, encode, from_msgpack, to_msgpack};
use shoal_protocol::endpoint::EndpointSpec;
use shoal_protocol::ids::validate_id;
use shoal_protocol::job::Priority;
use shoal_protocol::names::{SERVICE_NAME, op};
use shoal_protocol::worker::{WorkerRecord, WorkerState};
use shoal_protocol::{ApiError, ErrorCode};

use super::ControlConfig;
use super::job_list;
use super::job_ops;
use super::lease_manager::Directory;
use crate::jobs::{JobStore, jobs_consumer};
use crate::nats::Nats;

pub(crate) struct Ctx {
    pub nats: Nats,
    pub store: JobStore,
    pub config: ControlConfig,
    pub directory: Directory,
    /// Windows of batch tokens whose acks are outstanding (`job_ops::run_batch`), at most
    /// [`job_ops::BATCH_WINDOWS`] at once in this replica.
    pub batch_windows: tokio::sync::Semaphore,
}

pub struct ApiHandle {
    service: async_nats::service::Service,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl ApiHandle {
    pub async fn stop(self) {
        for t in &self.tasks {
            t.abort();
        }
        let _ = self.service.stop().await;
    }
}

pub async fn start(nats: Nats, config: ControlConfig, directory: Directory) -> Result<ApiHandle, async_nats::Error> {
    let service = nats
        .client
        .service_builder()
        .description("shoal control plane: jobs, endpoints, workers")
        .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
        .await?;
    let ctx = Arc::new(Ctx {
        store: JobStore::new(nats.clone()),
        nats: nats.clone(),
        config,
        directory,
        batch_windows: tokio::sync::Semaphore::new(job_ops::BATCH_WINDOWS),
    });
    let mut tasks = Vec::new();
    for operation in op::ALL {
        let mut endpoint =
            service.endpoint_builder().name(operation.replace('.', "_")).add(nats.names.api_subject(operation)).await?;
        let ctx = ctx.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(request) = endpoint.next().await {
                let ctx = ctx.clone();
                tokio::spawn(Box::pin(async move { serve(&ctx, operation, request).await }));
            }
        }));
    }
    Ok(ApiHandle { service, tasks })
}

async fn serve(ctx: &Ctx, operation: &'static str, request: async_nats::service::Request) {
    let Some(reply) = request.message.reply.clone() else { return };
    let content_type =
        request.message.headers.as_ref().and_then(|h| h.get(CONTENT_TYPE)).map(|v| v.as_str().to_string());
    let enc = Encoding::from_content_type(content_type.as_deref());
    let traceparent = crate::trace_context::from_headers(request.message.headers.as_ref());
    let span = tracing::debug_span!("request", op = operation, trace_id = tracing::field::Empty, otel.kind = "server");
    let waiter = job_ops::Waiter { subject: reply.to_string(), content_type };
    // boxed: every request is a task of its own, and one holding the operation's whole state
    // inline (tens of KB) costs a large allocation and its copy per request
    let dispatched = Box::pin(dispatch(ctx, operation, enc, &request.message.payload, waiter));
    let result = crate::trace_context::within(span, traceparent.as_deref(), dispatched).await;
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, enc.content_type());
    let body = match result {
        Ok(Some(body)) => body,
        // the worker side that recorded the result answered already
        Ok(None) => return,
        Err(e) => {
            if e.code == ErrorCode::Internal || e.code == ErrorCode::Unavailable {
                tracing::warn!(op = operation, code = %e.code, message = %e.message, "request failed");
            }
            headers.insert(ERROR_HEADER, e.message.as_str());
            headers.insert(ERROR_CODE_HEADER, e.code.status().to_string().as_str());
            encode(enc, &e).unwrap_or_default()
        }
    };
    let (headers, body) = fit_reply(ctx, operation, enc, headers, body);
    if let Err(e) = ctx.nats.client.publish_with_headers(reply, headers, Bytes::from(body)).await {
        tracing::debug!(op = operation, error = %e, "cannot send reply");
    }
}

/// Replies up to this size are sent without looking at the server's `max_payload` (reading it
/// clones the server's INFO): no server allows less.
const SMALL_REPLY: usize = 64 * 1024;
/// Room for a reply's headers next to its body.
const REPLY_HEADERS_ROOM: usize = 1024;

/// The reply itself, or, when it is larger than the server carries (the client would only see
/// its request time out), a `too_large` error that says so and what to ask instead.
fn fit_reply(ctx: &Ctx, operation: &str, enc: Encoding, headers: HeaderMap, body: Vec<u8>) -> (HeaderMap, Vec<u8>) {
    if body.len() <= SMALL_REPLY {
        return (headers, body);
    }
    let max_payload = ctx.nats.client.server_info().max_payload;
    if max_payload == 0 || body.len() + REPLY_HEADERS_ROOM <= max_payload {
        return (headers, body);
    }
    let narrower = match operation {
        op::WORKERS_LIST => "; ask for one endpoint's workers (endpoint)",
        op::JOBS_LIST => "; ask for fewer jobs (limit) or some states only (states)",
        _ => "",
    };
    let e = ApiError::new(
        ErrorCode::TooLarge,
        format!(
            "the reply to {operation} is {} bytes, more than the NATS server's max_payload ({max_payload}){narrower}",
            body.len()
        ),
    );
    tracing::warn!(op = operation, bytes = body.len(), max_payload, "reply too large for NATS");
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, enc.content_type());
    headers.insert(ERROR_HEADER, e.message.as_str());
    headers.insert(ERROR_CODE_HEADER, e.code.status().to_string().as_str());
    (headers, encode(enc, &e).unwrap_or_default())
}

fn req<T: DeserializeOwned>(enc: Encoding, payload: &[u8]) -> Result<T, ApiError> {
    decode(enc, payload).map_err(ApiError::from)
}

fn rep<T: Serialize>(enc: Encoding, value: &T) -> Result<Vec<u8>, ApiError> {
    encode(enc, value).map_err(|e| ApiError::internal(e.to_string()))
}

/// The reply body of one request; `None` when the request was answered elsewhere (a `job.run`
/// whose result the worker side sent straight to the waiting submitter).
async fn dispatch(
    ctx: &Ctx,
    operation: &str,
    enc: Encoding,
    payload: &[u8],
    waiter: job_ops::Waiter,
) -> Result<Option<Vec<u8>>, ApiError> {
    if operation == op::JOB_RUN || operation == op::JOB_RUN_BATCH {
        if payload.len() > ctx.config.max_input_bytes {
            return Err(ApiError::new(
                ErrorCode::TooLarge,
                format!(
                    "request is {} bytes; the limit is {} bytes (control.max_input_bytes)",
                    payload.len(),
                    ctx.config.max_input_bytes
                ),
            ));
        }
        if operation == op::JOB_RUN_BATCH {
            return rep(enc, &Box::pin(job_ops::run_batch(ctx, req(enc, payload)?)).await?).map(Some);
        }
        return match job_ops::run(ctx, req(enc, payload)?, Some(waiter)).await? {
            job_ops::Answer::Status(status) => rep(enc, &status).map(Some),
            job_ops::Answer::Answered => Ok(None),
        };
    }
    // the other operations are rare next to job runs: boxed, so that a run's state is not
    // sized for the largest of them
    Box::pin(dispatch_reply(ctx, operation, enc, payload)).await.map(Some)
}

async fn dispatch_reply(ctx: &Ctx, operation: &str, enc: Encoding, payload: &[u8]) -> Result<Vec<u8>, ApiError> {
    match operation {
        op::JOB_STATUS => rep(enc, &job_ops::status(ctx, req(enc, payload)?).await?),
        op::JOB_CANCEL => rep(enc, &job_ops::cancel(ctx, req(enc, payload)?).await?),
        op::JOB_RETRY => rep(enc, &job_ops::retry(ctx, req(enc, payload)?).await?),
        op::JOB_STREAM => rep(enc, &job_ops::stream(ctx, enc, req(enc, payload)?).await?),
        op::ENDPOINT_PURGE => rep(enc, &job_ops::purge(ctx, req(enc, payload)?).await?),
        op::ENDPOINT_HEALTH => rep(enc, &health(ctx, req(enc, payload)?).await?),
        op::ENDPOINT_CREATE => rep(enc, &create_endpoint(ctx, req(enc, payload)?).await?),
        op::ENDPOINT_UPDATE => rep(enc, &apply_endpoint(ctx, req(enc, payload)?).await?),
        op::ENDPOINT_GET => {
            let r: EndpointRef = req(enc, payload)?;
            rep(enc, &ctx.spec(&r.endpoint).await?)
        }
        op::ENDPOINT_LIST => rep(enc, &list_endpoints(ctx).await?),
        op::ENDPOINT_DELETE => rep(enc, &delete_endpoint(ctx, req(enc, payload)?).await?),
        op::WORKERS_LIST => rep(enc, &list_workers(ctx, req(enc, payload)?).await?),
        op::JOBS_LIST => rep(enc, &job_list::list_jobs(ctx, req(enc, payload)?).await?),
        op::HOSTS_LIST => rep(enc, &job_list::list_hosts(ctx).await?),
        other => Err(ApiError::not_found(format!("unknown operation {other}"))),
    }
}

fn unavailable(e: impl std::fmt::Display) -> ApiError {
    ApiError::unavailable(format!("JetStream: {e}"))
}

impl Ctx {
    /// Asks the replica owning `endpoint` (this one, or another over NATS) a query.
    pub async fn ask_owner<T: DeserializeOwned>(&self, endpoint: &str, query: &str) -> Result<T, ApiError> {
        super::owner_queries::ask(&self.nats, &self.directory, endpoint, query).await
    }

    /// The endpoint's spec: from the directory, or from the bucket when this replica has not
    /// seen it yet.
    pub async fn spec(&self, endpoint: &str) -> Result<EndpointSpec, ApiError> {
        validate_id("endpoint id", endpoint)?;
        if let Some(spec) = self.directory.spec(endpoint) {
            return Ok(spec);
        }
        match self.nats.endpoints.entry(endpoint).await.map_err(unavailable)? {
            Some(e) if e.operation == kv::Operation::Put => from_msgpack(&e.value)
                .map_err(|e| ApiError::internal(format!("stored spec of {endpoint} is corrupt: {e}"))),
            _ => Err(ApiError::not_found(format!("endpoint {endpoint} does not exist"))),
        }
    }
}

async fn health(ctx: &Ctx, r: EndpointRef) -> Result<HealthReply, ApiError> {
    let spec = ctx.spec(&r.endpoint).await?;
    // counts live with the endpoint's owner; none yet (just created): nothing counted
    let (jobs, owner) = match ctx.ask_owner::<(JobCounts, String)>(&r.endpoint, "health").await {
        Ok((jobs, owner)) => (jobs, Some(owner)),
        Err(e) if e.code == ErrorCode::Unavailable => (JobCounts::default(), None),
        Err(e) => return Err(e),
    };
    let mut workers = WorkerCounts::default();
    let mut rollout = Rollout { version: spec.version, ..Rollout::default() };
    for w in scan_workers(ctx, Some(&r.endpoint)).await? {
        match w.state {
            WorkerState::Idle => workers.idle += 1,
            WorkerState::Running => workers.running += 1,
            WorkerState::Initializing => workers.initializing += 1,
            WorkerState::Throttled => workers.throttled += 1,
            WorkerState::Unhealthy => workers.unhealthy += 1,
            WorkerState::Outdated => workers.outdated += 1,
            WorkerState::Stopped => {}
        }
        if !matches!(w.state, WorkerState::Stopped | WorkerState::Throttled) {
            rollout.workers_total += 1;
            if w.spec_version == spec.version {
                rollout.workers_on_latest += 1;
            }
        }
    }
    workers.ready = workers.idle + workers.running;
    Ok(HealthReply { jobs, workers, rollout, owner })
}

async fn create_endpoint(ctx: &Ctx, mut spec: EndpointSpec) -> Result<EndpointSpec, ApiError> {
    spec.validate()?;
    spec.version = 1;
    let bytes = to_msgpack(&spec).map_err(|e| ApiError::internal(e.to_string()))?;
    match ctx.nats.endpoints.create(&spec.id, Bytes::from(bytes)).await {
        Ok(_) => {}
        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
            return Err(ApiError::conflict(format!(
                "endpoint {} already exists (use update/apply to change it)",
                spec.id
            )));
        }
        Err(e) => return Err(unavailable(e)),
    }
    ensure_consumers(ctx, &spec.id).await?;
    ctx.directory.put_spec(spec.clone());
    Ok(spec)
}

/// Create or update: idempotent (an unchanged spec keeps its version; a change bumps it).
async fn apply_endpoint(ctx: &Ctx, mut spec: EndpointSpec) -> Result<EndpointSpec, ApiError> {
    spec.validate()?;
    for _ in 0..8 {
        let current = ctx.nats.endpoints.entry(&spec.id).await.map_err(unavailable)?;
        let Some(entry) = current.filter(|e| e.operation == kv::Operation::Put) else {
            match create_endpoint(ctx, spec.clone()).await {
                Err(e) if e.code == ErrorCode::Conflict => continue,
                other => return other,
            }
        };
        let old: EndpointSpec = from_msgpack(&entry.value).map_err(|e| ApiError::internal(e.to_string()))?;
        spec.version = old.version;
        if spec == old {
            return Ok(old);
        }
        spec.version = old.version + 1;
        let bytes = to_msgpack(&spec).map_err(|e| ApiError::internal(e.to_string()))?;
        match ctx.nats.endpoints.update(&spec.id, Bytes::from(bytes), entry.revision).await {
            Ok(_) => {
                ctx.directory.put_spec(spec.clone());
                return Ok(spec);
            }
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
            Err(e) => return Err(unavailable(e)),
        }
    }
    Err(ApiError::conflict(format!("endpoint {} is being changed concurrently; try again", spec.id)))
}

async fn ensure_consumers(ctx: &Ctx, endpoint: &str) -> Result<(), ApiError> {
    for p in [Priority::Normal, Priority::Low] {
        jobs_consumer(&ctx.nats, endpoint, p, std::time::Duration::from_secs(30)).await.map_err(unavailable)?;
    }
    Ok(())
}

async fn list_endpoints(ctx: &Ctx) -> Result<EndpointList, ApiError> {
    let mut endpoints = Vec::new();
    for entry in scan(&ctx.nats.endpoints, None).await? {
        if let Ok(spec) = from_msgpack::<EndpointSpec>(&entry) {
            endpoints.push(spec);
        }
    }
    endpoints.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(EndpointList { endpoints })
}

async fn delete_endpoint(ctx: &Ctx, r: EndpointRef) -> Result<Deleted, ApiError> {
    ctx.spec(&r.endpoint).await?;
    ctx.nats.endpoints.delete(&r.endpoint).await.map_err(unavailable)?;
    Ok(Deleted { deleted: true })
}

async fn list_workers(ctx: &Ctx, r: WorkersRequest) -> Result<WorkerList, ApiError> {
    if let Some(ep) = &r.endpoint {
        validate_id("endpoint id", ep)?;
    }
    let mut workers = scan_workers(ctx, r.endpoint.as_deref()).await?;
    workers.retain(|w| w.state != WorkerState::Stopped);
    workers.sort_by(|a, b| (&a.endpoint, &a.id).cmp(&(&b.endpoint, &b.id)));
    Ok(WorkerList { workers })
}

async fn scan_workers(ctx: &Ctx, endpoint: Option<&str>) -> Result<Vec<WorkerRecord>, ApiError> {
    let prefix = endpoint.map(|e| ctx.nats.names.worker_key(e, ""));
    Ok(scan(&ctx.nats.workers, prefix.as_deref()).await?.iter().filter_map(|v| from_msgpack(v).ok()).collect())
}

/// Values of every live key (with `prefix`, if given) of a small bucket.
async fn scan(store: &kv::Store, prefix: Option<&str>) -> Result<Vec<Bytes>, ApiError> {
    let mut keys = store.keys().await.map_err(unavailable)?;
    let mut out = Vec::new();
    while let Some(key) = keys.next().await {
        let key = key.map_err(unavailable)?;
        if prefix.is_some_and(|p| !key.starts_with(p)) {
            continue;
        }
        if let Ok(Some(v)) = store.get(&key).await {
            out.push(v);
        }
    }
    Ok(out)
}
