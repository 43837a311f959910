//! The job operations of the API: run, status, cancel, retry, stream, purge. Each reads the
//! job record, applies a pure lifecycle transition by compare-and-set, and does what follows
//! (queue a delivery token, tell a host to stop a job).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{AckPolicy, pull};
use async_nats::jetstream::kv;
use bytes::Bytes;
use futures::StreamExt;
use shoal_protocol::api::*;
use shoal_protocol::codec::{Encoding, encode, from_msgpack, to_msgpack};
use shoal_protocol::ids::validate_id;
use shoal_protocol::job::*;
use shoal_protocol::lifecycle::{self, TransitionError};
use shoal_protocol::{ApiError, ErrorCode};

use super::api::Ctx;
use super::endpoint_actor::send_stop;
use super::waiting::Fleet;
use crate::clock::now_ms;
use crate::jobs::{Applied, StoreError};

fn store_err(e: StoreError) -> ApiError {
    ApiError::unavailable(e.to_string())
}

fn new_job_id(sync: bool) -> String {
    let id = crate::random::uuid_v4();
    if sync { format!("sync-{id}-u1") } else { format!("{id}-u1") }
}

/// The submitter of a request: its reply subject and content type.
pub(super) struct Waiter {
    pub subject: String,
    pub content_type: Option<String>,
}

/// What answers a `job.run`: a status to reply with, or nothing more (the worker side that
/// recorded the result answered the waiting submitter itself).
pub(super) enum Answer {
    Status(Box<JobStatus>),
    Answered,
}

/// Queues a job; with `wait_ms`, waits for its result. A waiting submitter's reply subject
/// travels in the job's token, so the worker side answers it as soon as the result is
/// recorded (`jobs::JobStore::transition_answering`); this waiter answers when that did not
/// happen (the wait ran out, the job ended otherwise, an older host).
pub(super) async fn run(ctx: &Ctx, req: RunRequest, waiter: Option<Waiter>) -> Result<Answer, ApiError> {
    let spec = ctx.spec(&req.endpoint).await?;
    check_input(ctx, &req).await?;
    if let Some(full) = queue_depth(ctx, &spec, 1).await?.filter(QueueDepth::is_full) {
        return Err(full.overloaded(&spec.id));
    }
    let wait_ms = req.wait_ms.min(ctx.config.max_wait_ms);
    let waiter = if wait_ms == 0 { None } else { waiter };
    let job = match prepare(ctx, &spec, req, waiter, wait_ms).await? {
        Prepared::Existing(id) => {
            let found = status(ctx, JobRef { endpoint: Some(spec.id.clone()), id, wait_ms }).await;
            return found.map(|s| Answer::Status(Box::new(s)));
        }
        Prepared::New(job) => job,
    };
    // a waiter subscribes before the job can run (its token is not queued yet), and after its
    // queued event (on the same connection, so that one is not delivered to it); a change
    // between the two (a cancel) is seen when the waiter reads the record again
    let events = match wait_ms {
        0 => None,
        _ => match subscribe(ctx, &spec.id, &job.record.id).await {
            Ok(events) => Some(events),
            Err(e) => {
                undo(ctx, &job.record, job.created, Stored::No).await;
                return Err(e);
            }
        },
    };
    if let Err(failed) = enqueue(ctx, &job.record, job.token).await {
        let stored = undo(ctx, &job.record, job.created, failed.stored).await;
        return Err(failed.error(&job.record.id, stored));
    }
    match events {
        Some(events) => {
            let mine = job.reply.as_ref().map(|r| r.subject.as_str());
            let id = job.record.id.clone();
            wait_terminal(ctx, &spec.id, &id, events, wait_ms, Some(job.record), mine).await
        }
        None => Ok(Answer::Status(Box::new(JobStatus::from(&job.record)))),
    }
}

/// The most tokens of a batch published before their acks are awaited.
const BATCH_WINDOW: usize = 128;
/// The most windows awaiting their acks at once in a replica, all batches together. The
/// client's JetStream context lends 5,000 ack permits, and a publish waits for one: batches
/// holding unawaited acks past that would wait on each other for ever. 8 × 128 leaves most of
/// them to everything else.
pub(super) const BATCH_WINDOWS: usize = 8;

/// Queues a batch of jobs (`job.run_batch`): each is checked as `job.run` checks it and
/// refused on its own; the tokens are published in the batch's order, a window of
/// [`BATCH_WINDOW`] at a time without waiting for each one's ack, and the reply is sent once
/// every ack came (a job answered as queued is durable). The queue limit is read once per
/// endpoint of the batch.
pub(super) async fn run_batch(ctx: &Ctx, batch: RunBatchRequest) -> Result<RunBatchReply, ApiError> {
    let count = batch.jobs.len();
    if count == 0 {
        return Err(ApiError::bad_request("a batch needs at least one job (jobs: [RunRequest, ...])"));
    }
    if count > MAX_BATCH_JOBS {
        return Err(ApiError::new(
            ErrorCode::TooLarge,
            format!("a batch holds at most {MAX_BATCH_JOBS} jobs; this one has {count}: split it"),
        ));
    }
    let mut wanted: HashMap<String, u64> = HashMap::new();
    for job in &batch.jobs {
        *wanted.entry(job.endpoint.clone()).or_default() += 1;
    }
    let mut endpoints: HashMap<String, Result<Endpoint, ApiError>> = HashMap::new();
    let mut items: Vec<Result<JobStatus, ApiError>> = Vec::with_capacity(count);
    let mut acks = Vec::new();
    let mut window = None;
    for (index, req) in batch.jobs.into_iter().enumerate() {
        if window.is_none() {
            window = Some(ctx.batch_windows.acquire().await.map_err(|e| ApiError::unavailable(e.to_string()))?);
        }
        let endpoint = match endpoints.get_mut(&req.endpoint) {
            Some(endpoint) => endpoint,
            None => {
                let wanted = wanted.get(&req.endpoint).copied().unwrap_or(1);
                let endpoint = Endpoint::read(ctx, &req.endpoint, wanted).await;
                endpoints.entry(req.endpoint.clone()).or_insert(endpoint)
            }
        };
        let queued = match endpoint {
            Ok(endpoint) => queue_one(ctx, req, endpoint).await,
            Err(e) => Err(e.clone()),
        };
        match queued {
            Ok(Queued::Known(status)) => items.push(Ok(*status)),
            Ok(Queued::Publishing { record, created, ack }) => {
                items.push(Ok(JobStatus::from(record.as_ref())));
                acks.push(async move {
                    match ack.await {
                        Ok(_) => None,
                        Err(e) => {
                            let failed = QueueError::of(e);
                            let stored = undo(ctx, &record, created, failed.stored).await;
                            Some((index, failed.error(&record.id, stored)))
                        }
                    }
                });
            }
            Err(e) => items.push(Err(e)),
        }
        // a full window, or the batch's last job: its acks are awaited before the next window
        if acks.len() >= BATCH_WINDOW || index + 1 == count {
            for (index, error) in futures::future::join_all(acks.drain(..)).await.into_iter().flatten() {
                items[index] = Err(error);
            }
            window = None;
        }
    }
    Ok(RunBatchReply { jobs: items.into_iter().map(RunBatchItem::from).collect() })
}

/// One job of a batch, past its checks.
enum Queued {
    /// An idempotent resubmit: the job the key named.
    Known(Box<JobStatus>),
    /// Its token is on its way; `ack` says when it is stored.
    Publishing { record: Box<JobRecord>, created: bool, ack: async_nats::jetstream::context::PublishAckFuture },
}

/// What a batch reads once per endpoint: its spec and how full its queue is.
struct Endpoint {
    spec: shoal_protocol::endpoint::EndpointSpec,
    depth: Option<QueueDepth>,
}

impl Endpoint {
    /// `wanted`: the batch's jobs for this endpoint.
    async fn read(ctx: &Ctx, id: &str, wanted: u64) -> Result<Endpoint, ApiError> {
        let spec = ctx.spec(id).await?;
        let depth = queue_depth(ctx, &spec, wanted).await?;
        Ok(Endpoint { spec, depth })
    }
}

async fn queue_one(ctx: &Ctx, req: RunRequest, endpoint: &mut Endpoint) -> Result<Queued, ApiError> {
    if req.wait_ms > 0 {
        return Err(ApiError::bad_request(
            "wait_ms: the jobs of a batch do not wait; use job.run to wait for one, or job.status with wait_ms",
        ));
    }
    check_input(ctx, &req).await?;
    if let Some(full) = endpoint.depth.filter(QueueDepth::is_full) {
        return Err(full.overloaded(&endpoint.spec.id));
    }
    let job = match prepare(ctx, &endpoint.spec, req, None, 0).await? {
        Prepared::Existing(id) => {
            let found = status(ctx, JobRef { endpoint: Some(endpoint.spec.id.clone()), id, wait_ms: 0 }).await?;
            return Ok(Queued::Known(Box::new(found)));
        }
        Prepared::New(job) => job,
    };
    if let Some(depth) = &mut endpoint.depth {
        depth.depth += 1;
    }
    match publish_token(ctx, &job.record, job.token).await {
        Ok(ack) => Ok(Queued::Publishing { record: Box::new(job.record), created: job.created, ack }),
        Err(failed) => {
            let stored = undo(ctx, &job.record, job.created, failed.stored).await;
            Err(failed.error(&job.record.id, stored))
        }
    }
}

/// A job ready to be queued: its record, its encoded token, whether the record was written
/// (too large to travel in the token) and the waiting submitter the token names.
struct NewJob {
    record: JobRecord,
    token: Bytes,
    created: bool,
    reply: Option<ReplyTo>,
}

enum Prepared {
    /// The idempotency key names this job already.
    Existing(String),
    New(Box<NewJob>),
}

/// Checks a submission's policy, claims its idempotency key, moves a large input to the
/// object store, builds the job's record and token, and announces it (its queued event, or
/// the record itself when too large for the token). What is left is publishing the token.
async fn prepare(
    ctx: &Ctx,
    spec: &shoal_protocol::endpoint::EndpointSpec,
    req: RunRequest,
    waiter: Option<Waiter>,
    wait_ms: u64,
) -> Result<Prepared, ApiError> {
    let policy = req.policy.clone().unwrap_or_default();
    let execution_timeout_ms = policy.execution_timeout_ms.unwrap_or(spec.execution_timeout_ms);
    if !(MIN_EXECUTION_TIMEOUT_MS..=MAX_EXECUTION_TIMEOUT_MS).contains(&execution_timeout_ms) {
        return Err(ApiError::bad_request(format!(
            "policy.execution_timeout_ms {execution_timeout_ms} is outside {MIN_EXECUTION_TIMEOUT_MS}..={MAX_EXECUTION_TIMEOUT_MS}"
        )));
    }
    let ttl_ms = policy.ttl_ms.unwrap_or(DEFAULT_TTL_MS);
    if !(MIN_TTL_MS..=MAX_TTL_MS).contains(&ttl_ms) {
        return Err(ApiError::bad_request(format!("policy.ttl_ms {ttl_ms} is outside {MIN_TTL_MS}..={MAX_TTL_MS}")));
    }
    if let Some(hook) = &req.webhook
        && !(hook.starts_with("http://") || hook.starts_with("https://"))
    {
        return Err(ApiError::bad_request(format!("webhook {hook:?} must be an http:// or https:// URL")));
    }
    let priority = if policy.low_priority { Priority::Low } else { Priority::Normal };
    let policy = Policy { execution_timeout_ms, ttl_ms, priority };
    let id = new_job_id(req.sync);
    if let Some(key) = &req.idempotency_key {
        validate_id("idempotency key", key)?;
        if let Some(existing) = claim(ctx, &spec.id, key, &id).await? {
            return Ok(Prepared::Existing(existing));
        }
    }
    let (key, own_input) =
        (req.idempotency_key.clone(), req.input_ref.is_none().then(|| ctx.nats.names.blob_input(&id)));
    let prepared = prepare_claimed(ctx, spec, req, policy, waiter, wait_ms, id.clone()).await;
    if prepared.is_err() {
        // a retry with the same idempotency key must queue the job, not find one that never was
        ctx.store.release_claims(&spec.id, &id, key.as_deref(), own_input.as_deref()).await;
    }
    prepared
}

/// How long a submission may take from claiming its idempotency key to storing its job's token
/// (its input moved to the object store; the token's publish ack, which times out at 5 s): a
/// key that names a job not to be found is waited on until this long after it was claimed.
/// Within a client's default 10 s.
const CLAIM_SETTLE: Duration = Duration::from_secs(6);

/// Claims the idempotency key `key` of `endpoint` for job `id`: `None` once claimed, or the job
/// an earlier submission claimed it for, once that job can be found. A key naming a job not
/// found is held by a submission still queueing it (a duplicate sent at the same time): it is
/// waited on until the job appears, or the key is freed (that submission failed: this one claims
/// it), or [`CLAIM_SETTLE`] has passed since the claim — then the job will not appear (its
/// submission's control plane stopped before queueing it, or its record expired before the
/// key), and the answer is `not_found` saying so, rather than the bare job id's.
async fn claim(ctx: &Ctx, endpoint: &str, key: &str, id: &str) -> Result<Option<String>, ApiError> {
    let idem_key = ctx.nats.names.idempotency_key(endpoint, key);
    let unavailable = |e: &dyn std::fmt::Display| ApiError::unavailable(format!("idempotency key {key:?}: {e}"));
    let started = Instant::now();
    loop {
        match ctx.nats.idempotency.create(&idem_key, Bytes::from(id.to_string())).await {
            Ok(_) => return Ok(None),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Err(e) => return Err(unavailable(&e)),
        }
        let entry = ctx.nats.idempotency.entry(idem_key.as_str()).await.map_err(|e| unavailable(&e))?;
        if let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) {
            let existing = String::from_utf8_lossy(&entry.value).to_string();
            if ctx.store.get(endpoint, &existing).await.map_err(store_err)?.is_some() {
                return Ok(Some(existing));
            }
            // the server's clock dates the claim; a skewed one only moves the wait
            let claimed_at_ms = u64::try_from(entry.created.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
            let claimed_for = Duration::from_millis(now_ms().saturating_sub(claimed_at_ms));
            if claimed_for >= CLAIM_SETTLE || started.elapsed() >= CLAIM_SETTLE {
                return Err(ApiError::not_found(format!(
                    "idempotency key {key:?} names job {existing}, which does not exist: the submission that \
                     claimed the key did not queue it (its control plane stopped first), or the job's record \
                     has expired; submit with another key"
                )));
            }
        } else if started.elapsed() >= CLAIM_SETTLE {
            // freed and claimed again, over and over: give up rather than spin
            return Err(unavailable(&"claimed and freed by other submissions meanwhile; retry"));
        }
        // a duplicate's claim still being queued, or freed meanwhile: look again
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// [`prepare`] once the job has its checked policy, its id and its idempotency key.
async fn prepare_claimed(
    ctx: &Ctx,
    spec: &shoal_protocol::endpoint::EndpointSpec,
    mut req: RunRequest,
    policy: Policy,
    waiter: Option<Waiter>,
    wait_ms: u64,
    id: String,
) -> Result<Prepared, ApiError> {
    // an inline input above the inline limit moves to the object store, so the record (with
    // an output besides) always fits in one message
    if req.input_ref.is_none() {
        let name = ctx.nats.names.blob_input(&id);
        if ctx.nats.blobs.offload(&name, &req.input).await.map_err(|e| ApiError::unavailable(e.to_string()))? {
            req.input = serde_json::Value::Null;
            req.input_ref = Some(name);
        }
    }
    let retention_s = if req.sync { ctx.config.sync_retention_s } else { ctx.config.run_retention_s };
    let now = now_ms();
    let record = JobRecord {
        s3_config: req.s3_config,
        webhook: req.webhook,
        idempotency_key: req.idempotency_key,
        input_ref: req.input_ref,
        retention_s: Some(retention_s),
        ..JobRecord::queued(&id, &spec.id, req.input, policy, spec.max_attempts, now)
    };
    // The job is queued as its token alone, which carries its record: the record is written
    // by whoever changes the job first (its taker, a cancel, a time-out: a compare-and-set
    // against revision 0), and until then readers find the job by its token
    // (`JobStore::get`). One stored write and one round trip per job fewer than writing the
    // record here. A record too large to travel in a token is written here first. A waiting
    // submitter's reply subject travels in the token too (its subscription is made after
    // this, and the request fails if it cannot be).
    let reply = waiter.map(|w| ReplyTo { subject: w.subject, content_type: w.content_type, until_ms: now + wait_ms });
    let (token, carries_record) = encode_token(&record, 0, reply.clone())?;
    let created = match carries_record {
        true => {
            ctx.store.publish_event(&record, 0).await;
            false
        }
        false => {
            if ctx.store.create(&record).await.map_err(store_err)?.is_none() {
                return Err(ApiError::conflict(format!("job id {id} exists")));
            }
            true
        }
    };
    Ok(Prepared::New(Box::new(NewJob { record, token, created, reply })))
}

/// The input is inline (any JSON value but null) or a reference to a stored blob, not both.
async fn check_input(ctx: &Ctx, req: &RunRequest) -> Result<(), ApiError> {
    match &req.input_ref {
        None if req.input.is_null() => Err(ApiError::bad_request("input is required (any JSON value but null)")),
        None => Ok(()),
        Some(_) if !req.input.is_null() => Err(ApiError::bad_request("give input or input_ref, not both")),
        Some(name) => match ctx.nats.blobs.exists(name).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(ApiError::bad_request(format!(
                "input_ref {name:?} names no object in the {} object store",
                ctx.nats.names.blobs_bucket()
            ))),
            Err(e) => Err(ApiError::unavailable(e.to_string())),
        },
    }
}

/// How full an endpoint's queue is, against its `queue_limit`.
#[derive(Debug, Clone, Copy)]
struct QueueDepth {
    depth: u64,
    limit: u64,
}

impl QueueDepth {
    fn is_full(&self) -> bool {
        self.depth >= self.limit
    }

    fn overloaded(&self, endpoint: &str) -> ApiError {
        ApiError::new(
            ErrorCode::Overloaded,
            format!(
                "endpoint {endpoint} has {} queued jobs, at its queue_limit of {}; retry later",
                self.depth, self.limit
            ),
        )
    }
}

/// Backpressure: the depth of the endpoint's queue when it has a `queue_limit` (none
/// without). Read first as the pending count of the endpoint's two queue consumers (tokens
/// not yet delivered: cheap; the token of a job cancelled, purged or timed out while queued
/// is removed with it, unless that removal failed); when `wanted` more jobs would pass the
/// limit, the owner's count of IN_QUEUE jobs decides.
async fn queue_depth(
    ctx: &Ctx,
    spec: &shoal_protocol::endpoint::EndpointSpec,
    wanted: u64,
) -> Result<Option<QueueDepth>, ApiError> {
    let Some(limit) = spec.queue_limit else { return Ok(None) };
    let names = &ctx.nats.names;
    let unavailable = |e: String| ApiError::unavailable(format!("cannot read the queue depth: {e}"));
    let stream = ctx.nats.js.get_stream_no_info(names.jobs_stream()).await.map_err(|e| unavailable(e.to_string()))?;
    let mut depth = 0;
    for priority in [Priority::Normal, Priority::Low] {
        match stream.consumer_info(names.jobs_consumer(&spec.id, priority)).await {
            Ok(info) => depth += info.num_pending,
            // no consumer yet: nothing was ever queued on this priority
            Err(e) if e.kind() == async_nats::jetstream::context::ConsumerInfoErrorKind::NotFound => {}
            Err(e) => return Err(unavailable(e.to_string())),
        }
    }
    if depth + wanted > limit {
        depth = match ctx.ask_owner::<(JobCounts, String)>(&spec.id, "health").await {
            Ok((counts, _)) => counts.in_queue,
            Err(_) => depth,
        };
    }
    Ok(Some(QueueDepth { depth, limit }))
}

/// The largest token that carries its record; a larger record is written before the job is
/// queued and read by the taker, instead of travelling twice.
const MAX_SNAPSHOT_TOKEN_BYTES: usize = 16 * 1024;

/// A job's delivery token, encoded, carrying its record at `revision` when the whole fits in
/// [`MAX_SNAPSHOT_TOKEN_BYTES`] (else the taker reads the record), and whether it does.
fn encode_token(record: &JobRecord, revision: u64, reply: Option<ReplyTo>) -> Result<(Bytes, bool), ApiError> {
    let encode = |t: &JobToken| to_msgpack(t).map(Bytes::from).map_err(|e| ApiError::internal(e.to_string()));
    let mut token = JobToken::new(record.id.clone(), record.endpoint.clone());
    token.reply = reply;
    token.snapshot = Some(RecordSnapshot { revision, record: record.clone() });
    let bytes = encode(&token)?;
    if bytes.len() <= MAX_SNAPSHOT_TOKEN_BYTES {
        return Ok((bytes, true));
    }
    token.snapshot = None;
    Ok((encode(&token)?, false))
}

/// Whether a token whose publish failed may be stored all the same.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Stored {
    /// It was refused, or never sent.
    No,
    /// Its ack did not come (a time-out, a lost connection): it may be stored, and its job run.
    Maybe,
}

impl Stored {
    fn after(e: &async_nats::jetstream::context::PublishError) -> Stored {
        use async_nats::jetstream::context::PublishErrorKind;
        match e.kind() {
            PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe => Stored::Maybe,
            _ => Stored::No,
        }
    }
}

/// A token that could not be queued: why, and whether it may be stored all the same.
struct QueueError {
    cause: String,
    stored: Stored,
}

impl QueueError {
    fn of(e: async_nats::jetstream::context::PublishError) -> QueueError {
        QueueError { stored: Stored::after(&e), cause: e.to_string() }
    }

    /// The submitter's error for job `id`, once undone (`stored`: as [`undo`] left it):
    /// `unavailable` when the job is not queued; a `timeout` naming the job when it may be (the
    /// client can look it up, and the gateway keeps its input).
    fn error(&self, id: &str, stored: Stored) -> ApiError {
        let cause = &self.cause;
        match stored {
            Stored::No => ApiError::unavailable(format!("cannot queue the job: {cause}")),
            Stored::Maybe => ApiError::new(
                ErrorCode::Timeout,
                format!(
                    "job {id} may or may not be queued (queueing it did not complete: {cause}); its status tells, \
                     and a retry with the same idempotency key cannot queue it twice"
                ),
            ),
        }
    }
}

/// Undoes a submission whose token could not be queued ([`JobStore::delete`]) and says whether
/// its job may run all the same. A record written before the token (`created`: too large to
/// travel in it) is purged here, and a token that finds none is dropped: that job will not run.
/// When the job will not run, what the submission claimed is freed ([`JobStore::release_claims`]):
/// its idempotency key, so that the client's retry with the key queues the job instead of
/// finding a job that never was. A job that may run keeps the key: a retry then finds that job
/// if it was queued after all, rather than running it twice.
async fn undo(ctx: &Ctx, record: &JobRecord, created: bool, stored: Stored) -> Stored {
    let _ = ctx.store.delete(record, created).await;
    if stored == Stored::Maybe && !created {
        return Stored::Maybe;
    }
    let (key, input) = (record.idempotency_key.as_deref(), record.input_ref.as_deref());
    ctx.store.release_claims(&record.endpoint, &record.id, key, input).await;
    Stored::No
}

/// Publishes a job's encoded delivery token on its own subject and awaits JetStream's ack
/// (the job is durable after it).
async fn enqueue(ctx: &Ctx, record: &JobRecord, token: Bytes) -> Result<(), QueueError> {
    let ack = publish_token(ctx, record, token).await?;
    ack.await.map_err(QueueError::of)?;
    Ok(())
}

/// Publishes a job's encoded delivery token on its own subject; the future tells when it is
/// stored.
async fn publish_token(
    ctx: &Ctx,
    record: &JobRecord,
    token: Bytes,
) -> Result<async_nats::jetstream::context::PublishAckFuture, QueueError> {
    let subject = ctx.nats.names.job_token_subject(&record.endpoint, record.policy.priority, &record.id);
    let mut headers = async_nats::HeaderMap::new();
    crate::trace_context::inject(&mut headers);
    ctx.nats.js.publish_with_headers(subject, headers, token).await.map_err(QueueError::of)
}

async fn subscribe(ctx: &Ctx, endpoint: &str, id: &str) -> Result<async_nats::Subscriber, ApiError> {
    ctx.nats
        .client
        .subscribe(ctx.nats.names.job_events_of(endpoint, id))
        .await
        .map_err(|e| ApiError::unavailable(e.to_string()))
}

/// Waits until the job is terminal or `wait_ms` passed; returns its status either way. `known`:
/// the record as the caller just wrote it (not read again before the first event). `mine`: the
/// reply subject this waiter answers, which the worker side may have answered already (the
/// terminal event says so).
async fn wait_terminal(
    ctx: &Ctx,
    endpoint: &str,
    id: &str,
    mut events: async_nats::Subscriber,
    wait_ms: u64,
    mut known: Option<JobRecord>,
    mine: Option<&str>,
) -> Result<Answer, ApiError> {
    let deadline = Instant::now() + Duration::from_millis(wait_ms);
    loop {
        let rec = match known.take() {
            Some(rec) => rec,
            None => ctx.store.get(endpoint, id).await.map_err(store_err)?.ok_or_else(|| not_found(id))?.0,
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        if rec.state.is_terminal() || remaining.is_zero() {
            return Ok(Answer::Status(Box::new(JobStatus::from(&rec))));
        }
        // a terminal event carrying the status (small jobs) is the answer; the record is read
        // again on a terminal event without one (a non-terminal one changes nothing a waiter
        // returns), on an event it cannot read, and at least every second regardless (core
        // events may be dropped)
        let until = Instant::now() + remaining.min(Duration::from_secs(1));
        while let Ok(Some(msg)) = tokio::time::timeout_at(until.into(), events.next()).await {
            match from_msgpack::<shoal_protocol::events::JobEvent>(&msg.payload) {
                Ok(ev) if !ev.state.is_terminal() => {}
                Ok(ev) if mine.is_some() && ev.answered.as_deref() == mine => return Ok(Answer::Answered),
                Ok(shoal_protocol::events::JobEvent { status: Some(status), .. }) if status.status.is_terminal() => {
                    return Ok(Answer::Status(Box::new(status)));
                }
                _ => break,
            }
        }
    }
}

fn not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("job {id} not found (unknown, or its result expired)"))
}

/// The record of a job, by endpoint and id or by id alone.
async fn find(ctx: &Ctx, job: &JobRef) -> Result<JobRecord, ApiError> {
    validate_id("job id", &job.id)?;
    let found = match &job.endpoint {
        Some(ep) => {
            ctx.spec(ep).await?;
            ctx.store.get(ep, &job.id).await
        }
        None => ctx.store.find(&job.id).await,
    };
    found.map_err(store_err)?.map(|(r, _)| r).ok_or_else(|| not_found(&job.id))
}

pub(super) async fn status(ctx: &Ctx, job: JobRef) -> Result<JobStatus, ApiError> {
    let rec = find(ctx, &job).await?;
    let wait_ms = job.wait_ms.min(ctx.config.max_wait_ms);
    if rec.state == JobState::InQueue && wait_ms == 0 {
        let mut status = JobStatus::from(&rec);
        status.waiting_reason = Some(waiting_reason(ctx, &rec).await);
        return Ok(status);
    }
    if wait_ms == 0 || rec.state.is_terminal() {
        return Ok(JobStatus::from(&rec));
    }
    let events = subscribe(ctx, &rec.endpoint, &rec.id).await?;
    match wait_terminal(ctx, &rec.endpoint, &rec.id, events, wait_ms, None, None).await? {
        Answer::Status(status) => Ok(*status),
        // only a waiter that names its subject is answered by the worker side
        Answer::Answered => Err(ApiError::internal("a status request was answered by a worker")),
    }
}

/// Why a queued job waits, from the owner's view of the endpoint's workers.
async fn waiting_reason(ctx: &Ctx, rec: &JobRecord) -> String {
    let Ok(spec) = ctx.spec(&rec.endpoint).await else {
        return "its endpoint no longer exists".into();
    };
    match ctx.ask_owner::<Fleet>(&rec.endpoint, "waiting").await {
        Ok(fleet) => crate::control::waiting::waiting_reason(&spec, &fleet, rec.policy.priority == Priority::Low),
        Err(_) => "no control replica owns its endpoint yet (starting, or taking over after a failure)".into(),
    }
}

pub(super) async fn cancel(ctx: &Ctx, job: JobRef) -> Result<JobStatus, ApiError> {
    let rec = find(ctx, &job).await?;
    cancel_record(ctx, &rec, "cancelled by request").await
}

async fn cancel_record(ctx: &Ctx, rec: &JobRecord, reason: &str) -> Result<JobStatus, ApiError> {
    match ctx
        .store
        .transition(&rec.endpoint, &rec.id, |r| lifecycle::cancel(r, reason, now_ms()))
        .await
        .map_err(store_err)?
    {
        Applied::Changed { record, previous, .. } => {
            if previous.state == JobState::InProgress {
                send_stop(&ctx.nats, &previous, reason).await;
            }
            Ok(JobStatus::from(record.as_ref()))
        }
        // already over: the status is unchanged
        Applied::Refused { record, .. } => Ok(JobStatus::from(record.as_ref())),
        Applied::NotFound => Err(not_found(&rec.id)),
    }
}

pub(super) async fn retry(ctx: &Ctx, job: JobRef) -> Result<JobStatus, ApiError> {
    let rec = find(ctx, &job).await?;
    match ctx.store.transition(&rec.endpoint, &rec.id, |r| lifecycle::retry(r, now_ms())).await.map_err(store_err)? {
        Applied::Changed { record, previous, revision } => {
            let (token, _) = encode_token(&record, revision, None)?;
            if let Err(failed) = enqueue(ctx, &record, token).await {
                // put it back as it was, so it stays retryable (and its owner sees it so)
                let key = ctx.store.key(&record.endpoint, &record.id);
                if let Ok(Some(rev)) = ctx.store.write(&key, previous.as_ref(), revision).await {
                    ctx.store.publish_restored(&previous, rev).await;
                }
                // a token stored after all finds the record put back, and is dropped
                return Err(failed.error(&record.id, Stored::No));
            }
            Ok(JobStatus::from(record.as_ref()))
        }
        Applied::Refused { reason: reason @ TransitionError::NotRetryable(_), .. } => {
            Err(ApiError::conflict(reason.to_string()))
        }
        Applied::Refused { reason, .. } => Err(ApiError::conflict(reason.to_string())),
        Applied::NotFound => Err(not_found(&rec.id)),
    }
}

/// Consume-on-read: the chunks posted since the previous read, through the job's one durable
/// cursor (shared by all readers, so each chunk is delivered once), in order and as many as fit
/// in one reply (`enc`: the reply's encoding); the others stay for the next read.
pub(super) async fn stream(ctx: &Ctx, enc: Encoding, job: JobRef) -> Result<StreamReply, ApiError> {
    let rec = find(ctx, &job).await?;
    let names = &ctx.nats.names;
    let stream =
        ctx.nats.js.get_stream(names.stream_stream()).await.map_err(|e| ApiError::unavailable(e.to_string()))?;
    let name = names.stream_consumer(&rec.id);
    let consumer: async_nats::jetstream::consumer::PullConsumer = stream
        .get_or_create_consumer(
            &name,
            pull::Config {
                durable_name: Some(name.clone()),
                filter_subject: names.stream_subject(&rec.id),
                ack_policy: AckPolicy::Explicit,
                inactive_threshold: Duration::from_secs(600),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| ApiError::unavailable(e.to_string()))?;
    let max_payload = ctx.nats.client.server_info().max_payload;
    let budget = stream_chunk_limit(max_payload);
    // the server hands out about one reply's worth (a chunk stored is at most `budget` plus
    // its subject, so one always comes); the encoding's own size is counted below
    let mut batch = consumer
        .fetch()
        .max_messages(1000)
        .max_bytes(max_payload.saturating_sub(STREAM_REPLY_ROOM / 2))
        .messages()
        .await
        .map_err(|e| ApiError::unavailable(e.to_string()))?;
    let mut fetched = Vec::new();
    while let Some(Ok(msg)) = batch.next().await {
        let output = from_msgpack::<serde_json::Value>(&msg.payload)
            .map_err(|e| tracing::warn!(job_id = %rec.id, error = %e, "undecodable stream chunk skipped"))
            .ok();
        let size = match (&output, enc) {
            (None, _) => 0,
            (Some(_), Encoding::MsgPack) => msg.payload.len(),
            (Some(output), _) => encode(enc, output).map_or(usize::MAX, |v| v.len()),
        };
        fetched.push((msg, output, size + CHUNK_FRAMING));
    }
    let sizes: Vec<usize> = fetched.iter().map(|(_, _, size)| *size).collect();
    let taken = chunks_that_fit(&sizes, budget);
    if taken == 0 && !fetched.is_empty() {
        nak_all(fetched.into_iter().map(|(msg, _, _)| msg)).await;
        return Err(ApiError::new(
            ErrorCode::TooLarge,
            format!(
                "the job's next stream chunk is {} bytes in this encoding, more than a reply carries \
                 ({budget}); read this stream with MessagePack (the HTTP gateway does)",
                sizes[0]
            ),
        ));
    }
    let left = fetched.split_off(taken);
    let mut chunks = Vec::with_capacity(taken);
    let mut fetched = fetched.into_iter().map(|(msg, output, _)| (msg, output));
    while let Some((msg, output)) = fetched.next() {
        if let Err(e) = msg.double_ack().await {
            // not consumed: it and every one after it are read again next time, in order
            let rest = fetched.map(|(msg, _)| msg).chain(left.into_iter().map(|(msg, _, _)| msg));
            nak_all(std::iter::once(msg).chain(rest)).await;
            if chunks.is_empty() {
                return Err(ApiError::unavailable(format!("cannot consume a chunk: {e}")));
            }
            return Ok(StreamReply { id: rec.id, status: rec.state, stream: chunks });
        }
        chunks.extend(output.map(|output| StreamChunk { output }));
    }
    nak_all(left.into_iter().map(|(msg, _, _)| msg)).await;
    Ok(StreamReply { id: rec.id, status: rec.state, stream: chunks })
}

/// What a chunk adds to a reply besides its output (its map and key).
const CHUNK_FRAMING: usize = 16;

/// How many of the next chunks, of these encoded sizes in order, one reply of `budget` bytes
/// carries.
fn chunks_that_fit(sizes: &[usize], budget: usize) -> usize {
    let mut used = 0usize;
    sizes
        .iter()
        .take_while(|size| {
            used = used.saturating_add(**size);
            used <= budget
        })
        .count()
}

/// Hands fetched chunks back to the stream's cursor, in order, for the next read.
async fn nak_all(msgs: impl Iterator<Item = async_nats::jetstream::Message>) {
    for msg in msgs {
        if let Err(e) = msg.ack_with(async_nats::jetstream::AckKind::Nak(None)).await {
            tracing::debug!(error = %e, "cannot hand a stream chunk back; it is read again after the ack wait");
        }
    }
}

/// Cancels every queued job of the endpoint; running jobs continue.
pub(super) async fn purge(ctx: &Ctx, r: EndpointRef) -> Result<PurgeReply, ApiError> {
    ctx.spec(&r.endpoint).await?;
    let queued: Vec<String> = ctx.ask_owner(&r.endpoint, "queued").await?;
    let mut removed = 0;
    for id in queued {
        let applied = ctx
            .store
            .transition(&r.endpoint, &id, |rec| {
                if rec.state != JobState::InQueue {
                    return Err(TransitionError::NotRunning("not queued"));
                }
                lifecycle::cancel(rec, "purged from the queue", now_ms())
            })
            .await
            .map_err(store_err)?;
        if matches!(applied, Applied::Changed { .. }) {
            removed += 1;
        }
    }
    Ok(PurgeReply { removed, status: "completed".into() })
}

#[cfg(test)]
mod tests {
    use async_nats::jetstream::context::{PublishError, PublishErrorKind};

    use shoal_protocol::ErrorCode;

    use super::{QueueError, Stored, chunks_that_fit};

    #[test]
    fn a_stream_reply_carries_the_chunks_that_fit_in_order() {
        assert_eq!(chunks_that_fit(&[], 100), 0);
        assert_eq!(chunks_that_fit(&[40, 40, 40], 100), 2);
        assert_eq!(chunks_that_fit(&[40, 60, 1], 100), 2, "exactly full");
        assert_eq!(chunks_that_fit(&[10, 200, 1], 100), 1, "never one past a chunk that does not fit");
        assert_eq!(chunks_that_fit(&[101, 1], 100), 0, "a first chunk too large alone");
        assert_eq!(chunks_that_fit(&[usize::MAX, 1], 100), 0);
        assert_eq!(chunks_that_fit(&[1; 1000], 100), 100);
    }

    #[test]
    fn a_token_without_its_ack_may_be_stored_and_a_refused_one_is_not() {
        for kind in [PublishErrorKind::TimedOut, PublishErrorKind::BrokenPipe] {
            let failed = QueueError::of(PublishError::new(kind));
            assert_eq!(failed.stored, Stored::Maybe, "{kind:?}");
            let error = failed.error("j-1", Stored::Maybe);
            assert_eq!(error.code, ErrorCode::Timeout);
            assert!(error.message.contains("job j-1 may or may not be queued"), "{error}");
            // withdrawn by the undo (its record purged): not queued
            assert_eq!(failed.error("j-1", Stored::No).code, ErrorCode::Unavailable);
        }
        for kind in [
            PublishErrorKind::StreamNotFound,
            PublishErrorKind::WrongLastMessageId,
            PublishErrorKind::WrongLastSequence,
            PublishErrorKind::MaxAckPending,
            PublishErrorKind::MaxPayloadExceeded,
            PublishErrorKind::Other,
        ] {
            let failed = QueueError::of(PublishError::new(kind));
            assert_eq!(failed.stored, Stored::No, "{kind:?}");
            assert_eq!(failed.error("j-1", Stored::No).code, ErrorCode::Unavailable);
        }
    }
}
