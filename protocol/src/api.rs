//! Requests and replies of the NATS API (`<prefix>.v1.api.<op>`, see [`crate::names::op`]).
//!
//! A request is MessagePack with named fields, or JSON with `Content-Type: application/json`;
//! the reply uses the same encoding. A failed request gets the standard NATS micro error
//! headers (`Nats-Service-Error`, `Nats-Service-Error-Code`) and an [`crate::ApiError`] body.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::job::{JobRecord, JobState, PolicyRequest, Priority, WebhookDelivery};

pub const ERROR_HEADER: &str = "Nats-Service-Error";
pub const ERROR_CODE_HEADER: &str = "Nats-Service-Error-Code";
/// W3C trace context, carried from submitter to worker.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// Submit a job: `job.run`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunRequest {
    pub endpoint: String,
    #[serde(default)]
    pub input: Value,
    #[serde(default)]
    pub policy: Option<PolicyRequest>,
    /// Called with the status envelope when the job ends.
    #[serde(default)]
    pub webhook: Option<String>,
    /// Handed to the worker inside the job (`job["s3Config"]`).
    #[serde(default)]
    pub s3_config: Option<Value>,
    /// The same key on the same endpoint returns the same job.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// Wait up to this long for the job to end before replying (runsync); 0 = reply at once.
    #[serde(default)]
    pub wait_ms: u64,
    /// Id prefix `sync-`, as RunPod gives /runsync jobs (and their shorter result retention).
    #[serde(default)]
    pub sync: bool,
    /// Instead of `input`: the name of an object in the `shoal-blobs` object store holding the
    /// input as JSON, for inputs larger than a NATS message (the gateway stores them).
    #[serde(default)]
    pub input_ref: Option<String>,
}

impl RunRequest {
    /// A plain submission: `input` to `endpoint`, default policy, no wait.
    pub fn new(endpoint: &str, input: Value) -> RunRequest {
        RunRequest {
            endpoint: endpoint.to_string(),
            input,
            policy: None,
            webhook: None,
            s3_config: None,
            idempotency_key: None,
            wait_ms: 0,
            sync: false,
            input_ref: None,
        }
    }
}

/// The most jobs one `job.run_batch` queues.
pub const MAX_BATCH_JOBS: usize = 1000;

/// Submit several jobs in one request: `job.run_batch`. Each is a [`RunRequest`] (to any
/// endpoint) with `wait_ms` 0: a batch queues, it does not wait. The jobs are queued in the
/// order given, each on its own: one that fails its checks does not stop the others.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunBatchRequest {
    pub jobs: Vec<RunRequest>,
}

/// The reply to a `job.run_batch`: one item per job, in the request's order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunBatchReply {
    pub jobs: Vec<RunBatchItem>,
}

/// One job of a batch: queued (its status, durable once the reply is sent) or refused (why).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunBatchItem {
    #[serde(default)]
    pub status: Option<JobStatus>,
    #[serde(default)]
    pub error: Option<crate::ApiError>,
}

impl RunBatchItem {
    pub fn into_result(self) -> Result<JobStatus, crate::ApiError> {
        match (self.status, self.error) {
            (_, Some(e)) => Err(e),
            (Some(s), None) => Ok(s),
            (None, None) => Err(crate::ApiError::internal("a batch item with neither a status nor an error")),
        }
    }
}

impl From<Result<JobStatus, crate::ApiError>> for RunBatchItem {
    fn from(r: Result<JobStatus, crate::ApiError>) -> Self {
        match r {
            Ok(s) => RunBatchItem { status: Some(s), error: None },
            Err(e) => RunBatchItem { status: None, error: Some(e) },
        }
    }
}

/// Names a job: `job.status`, `job.cancel`, `job.retry`, `job.stream`. The endpoint is
/// optional (RunPod clients always know it; shoal's CLI may not).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRef {
    #[serde(default)]
    pub endpoint: Option<String>,
    pub id: String,
    /// For `job.status`: wait up to this long for the job to end.
    #[serde(default)]
    pub wait_ms: u64,
}

/// The status envelope (RunPod's `/status` reply, with shoal's extras).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobStatus {
    pub id: String,
    pub endpoint: String,
    pub status: JobState,
    #[serde(default)]
    pub delay_time_ms: Option<u64>,
    #[serde(default)]
    pub execution_time_ms: Option<u64>,
    #[serde(default)]
    pub output: Option<Value>,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub retries: u32,
    #[serde(default)]
    pub attempts: u32,
    #[serde(default)]
    pub worker_id: Option<String>,
    /// The output is in the `shoal-blobs` object store under this name (too large to inline).
    #[serde(default)]
    pub output_ref: Option<String>,
    /// What became of the webhook call, once made.
    #[serde(default)]
    pub webhook_delivery: Option<WebhookDelivery>,
    /// For a queued job: why it still waits (no worker yet, throttled, at max, crash loop...).
    #[serde(default)]
    pub waiting_reason: Option<String>,
}

impl From<&JobRecord> for JobStatus {
    fn from(r: &JobRecord) -> Self {
        JobStatus {
            id: r.id.clone(),
            endpoint: r.endpoint.clone(),
            status: r.state,
            delay_time_ms: r.delay_time_ms(),
            execution_time_ms: r.execution_time_ms(),
            output: r.output.clone(),
            error: r.error.clone(),
            retries: r.retries,
            attempts: r.attempts,
            worker_id: r.worker_id.clone(),
            output_ref: r.output_ref.clone(),
            webhook_delivery: r.webhook_delivery.clone(),
            waiting_reason: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamChunk {
    pub output: Value,
}

/// Room a `job.stream` reply keeps for its envelope (id, state, framing, headers) next to its
/// chunks: a reply carries chunks up to the server's `max_payload` less this, and a stream
/// chunk larger than that is refused when the worker posts it (it could never be read).
pub const STREAM_REPLY_ROOM: usize = 8 * 1024;

/// The largest stream chunk (its MessagePack) a server with this `max_payload` stores, and the
/// most chunk bytes one `job.stream` reply carries.
pub fn stream_chunk_limit(max_payload: usize) -> usize {
    max_payload.saturating_sub(STREAM_REPLY_ROOM)
}

/// `job.stream`: the chunks produced since the previous read (consume-on-read), in order; as
/// many as fit in one reply (see [`stream_chunk_limit`]), the rest at the next read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamReply {
    pub id: String,
    pub status: JobState,
    pub stream: Vec<StreamChunk>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRef {
    pub endpoint: String,
}

/// `endpoint.purge`: queued jobs removed (cancelled); running ones continue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurgeReply {
    pub removed: u64,
    pub status: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobCounts {
    pub completed: u64,
    pub failed: u64,
    pub cancelled: u64,
    pub timed_out: u64,
    pub in_progress: u64,
    pub in_queue: u64,
    pub retried: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerCounts {
    pub idle: u64,
    pub initializing: u64,
    pub ready: u64,
    pub running: u64,
    pub throttled: u64,
    pub unhealthy: u64,
    pub outdated: u64,
}

/// Progress of a rolling update: workers on the latest spec version out of all.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    pub version: u64,
    pub workers_on_latest: u64,
    pub workers_total: u64,
}

/// `endpoint.health`: RunPod's `/health` shape, plus the rollout and the owning replica.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReply {
    pub jobs: JobCounts,
    pub workers: WorkerCounts,
    #[serde(default)]
    pub rollout: Rollout,
    #[serde(default)]
    pub owner: Option<String>,
}

/// `endpoint.list`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EndpointList {
    pub endpoints: Vec<crate::endpoint::EndpointSpec>,
}

/// `workers.list`: filter by endpoint, or all.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkersRequest {
    #[serde(default)]
    pub endpoint: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerList {
    pub workers: Vec<crate::worker::WorkerRecord>,
}

/// `jobs.list`: an endpoint's jobs, newest first (by submission), for dashboards.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobsRequest {
    pub endpoint: String,
    /// Only jobs in these states; empty: every state.
    #[serde(default)]
    pub states: Vec<JobState>,
    /// At most this many jobs (0: [`JobsRequest::DEFAULT_LIMIT`]; above [`JobsRequest::MAX_LIMIT`]
    /// is a bad request).
    #[serde(default)]
    pub limit: u32,
}

impl JobsRequest {
    pub const DEFAULT_LIMIT: u32 = 50;
    pub const MAX_LIMIT: u32 = 500;
}

/// One job of a [`JobList`]: its state and timings, without input or output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSummary {
    pub id: String,
    pub endpoint: String,
    pub state: JobState,
    #[serde(default)]
    pub priority: Priority,
    pub submitted_at_ms: u64,
    #[serde(default)]
    pub started_at_ms: Option<u64>,
    #[serde(default)]
    pub finished_at_ms: Option<u64>,
    /// Queued before the last attempt started.
    #[serde(default)]
    pub delay_time_ms: Option<u64>,
    /// The last attempt's run time, once it ended.
    #[serde(default)]
    pub execution_time_ms: Option<u64>,
    #[serde(default)]
    pub attempts: u32,
    #[serde(default)]
    pub retries: u32,
    #[serde(default)]
    pub worker_id: Option<String>,
    #[serde(default)]
    pub host_id: Option<String>,
    /// Why it failed (cut to [`JobSummary::MAX_ERROR_CHARS`]).
    #[serde(default)]
    pub error: Option<String>,
    /// For a queued job: why it still waits.
    #[serde(default)]
    pub waiting_reason: Option<String>,
}

impl JobSummary {
    pub const MAX_ERROR_CHARS: usize = 500;

    /// A job in `state`, submitted at `submitted_at_ms`, with nothing else known yet.
    pub fn new(id: impl Into<String>, endpoint: impl Into<String>, state: JobState, submitted_at_ms: u64) -> Self {
        JobSummary {
            id: id.into(),
            endpoint: endpoint.into(),
            state,
            priority: Priority::Normal,
            submitted_at_ms,
            started_at_ms: None,
            finished_at_ms: None,
            delay_time_ms: None,
            execution_time_ms: None,
            attempts: 0,
            retries: 0,
            worker_id: None,
            host_id: None,
            error: None,
            waiting_reason: None,
        }
    }

    /// When it last changed state: ended, else started, else submitted.
    pub fn last_change_ms(&self) -> u64 {
        self.finished_at_ms.or(self.started_at_ms).unwrap_or(self.submitted_at_ms)
    }
}

impl From<&JobRecord> for JobSummary {
    fn from(r: &JobRecord) -> Self {
        JobSummary {
            id: r.id.clone(),
            endpoint: r.endpoint.clone(),
            state: r.state,
            priority: r.policy.priority,
            submitted_at_ms: r.submitted_at_ms,
            started_at_ms: r.started_at_ms,
            finished_at_ms: r.finished_at_ms,
            delay_time_ms: r.delay_time_ms(),
            execution_time_ms: r.execution_time_ms(),
            attempts: r.attempts,
            retries: r.retries,
            worker_id: r.worker_id.clone(),
            host_id: r.host_id.clone(),
            error: r.error.as_ref().map(|e| e.chars().take(JobSummary::MAX_ERROR_CHARS).collect()),
            waiting_reason: None,
        }
    }
}

/// `jobs.list` reply: the newest `limit` matching jobs, and how many matched in all.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobList {
    pub jobs: Vec<JobSummary>,
    #[serde(default)]
    pub matched: u64,
}

/// `hosts.list` reply: every live host (inventory and heartbeat), by id.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HostList {
    pub hosts: Vec<crate::host::HostRecord>,
}

/// `endpoint.delete` reply.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deleted {
    pub deleted: bool,
}

/// Labels any API object may carry in the future; kept here so the type exists on the wire.
pub type Labels = BTreeMap<String, String>;
