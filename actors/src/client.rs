//! A typed client of shoal's NATS API, for the CLI, the gateway and the tests. It speaks
//! MessagePack; any other NATS client can speak JSON instead (see the README).

use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use serde::{Serialize, de::DeserializeOwned};
use shoal_protocol::api::*;
use shoal_protocol::codec::{CONTENT_TYPE, Encoding, decode, encode};
use shoal_protocol::endpoint::EndpointSpec;
use shoal_protocol::names::{Names, op};
use shoal_protocol::{ApiError, ErrorCode};

use crate::blobs::Upload;

/// What a failed NATS API request says: no control plane, no answer in time, a request the
/// client would not send (larger than the server's `max_payload`, a subject it cannot name),
/// or the transport's own error.
pub fn request_error(e: &async_nats::RequestError) -> ApiError {
    use async_nats::RequestErrorKind as Kind;
    match e.kind() {
        Kind::NoResponders => ApiError::unavailable(
            "no shoal control plane answers on this NATS server (is `shoal control` or `shoal dev` running?)",
        ),
        Kind::TimedOut => ApiError::new(ErrorCode::Timeout, "the control plane did not answer in time"),
        // checked before anything is sent: retrying cannot help
        Kind::MaxPayloadExceeded => ApiError::new(
            ErrorCode::TooLarge,
            format!(
                "the request is larger than the NATS server's max_payload ({e}); nothing was sent: \
                 put a large input in the object store and send input_ref (the CLI and the HTTP gateway \
                 do it themselves), or raise the server's max_payload"
            ),
        ),
        Kind::InvalidSubject => ApiError::bad_request(format!("the request's subject is not valid ({e})")),
        _ => ApiError::unavailable(format!("request failed: {e}")),
    }
}

/// A MessagePack reply of the NATS API: its error (by the error header) or its decoded body.
pub fn read_reply<T: DeserializeOwned>(msg: &async_nats::Message) -> Result<T, ApiError> {
    if let Some(code) = msg.headers.as_ref().and_then(|h| h.get(ERROR_CODE_HEADER)) {
        let status: u16 = code.as_str().parse().unwrap_or(500);
        return Err(decode::<ApiError>(Encoding::MsgPack, &msg.payload).unwrap_or_else(|_| {
            ApiError::new(ErrorCode::from_status(status), String::from_utf8_lossy(&msg.payload).to_string())
        }));
    }
    decode(Encoding::MsgPack, &msg.payload).map_err(|e| ApiError::internal(format!("cannot decode the reply: {e}")))
}

#[derive(Clone, Debug)]
pub struct ApiClient {
    client: async_nats::Client,
    names: Names,
    timeout: Duration,
}

impl ApiClient {
    pub fn new(client: async_nats::Client, names: Names) -> ApiClient {
        ApiClient { client, names, timeout: Duration::from_secs(10) }
    }

    /// The NATS connection the requests go through.
    pub fn nats(&self) -> &async_nats::Client {
        &self.client
    }
    /// The installation's names (its subjects, buckets and object names).
    pub fn names(&self) -> &Names {
        &self.names
    }

    /// The longest a request waits for its reply (plus any `wait_ms` it carries).
    pub fn with_timeout(mut self, timeout: Duration) -> ApiClient {
        self.timeout = timeout;
        self
    }

    /// Sends one request and decodes the reply or the error.
    pub async fn request<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        operation: &str,
        req: &Req,
        extra_wait: Duration,
    ) -> Result<Resp, ApiError> {
        let body = encode(Encoding::MsgPack, req).map_err(ApiError::from)?;
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, Encoding::MsgPack.content_type());
        crate::trace_context::inject(&mut headers);
        let request = async_nats::Request::new()
            .payload(Bytes::from(body))
            .headers(headers)
            .timeout(Some(self.timeout + extra_wait));
        let msg = self
            .client
            .send_request(self.names.api_subject(operation), request)
            .await
            .map_err(|e| request_error(&e))?;
        read_reply(&msg)
    }

    pub async fn run(&self, req: &RunRequest) -> Result<JobStatus, ApiError> {
        self.request(op::JOB_RUN, req, Duration::from_millis(req.wait_ms)).await
    }
    /// Queues several jobs in one request (at most [`MAX_BATCH_JOBS`]); one result per job,
    /// in order.
    pub async fn run_batch(&self, jobs: Vec<RunRequest>) -> Result<Vec<Result<JobStatus, ApiError>>, ApiError> {
        let reply: RunBatchReply = self.request(op::JOB_RUN_BATCH, &RunBatchRequest { jobs }, Duration::ZERO).await?;
        Ok(reply.jobs.into_iter().map(RunBatchItem::into_result).collect())
    }
    /// Submits a request whose input [`crate::blobs::Blobs::offload_input`] may have stored;
    /// when the job was not queued, removes that input again, unless the job may be queued
    /// all the same (`timeout`: the control plane did not answer in time, or could not tell
    /// whether the job's token was stored); such an input expires with the object store.
    pub async fn run_uploaded(&self, req: &RunRequest, uploaded: Option<Upload>) -> Result<JobStatus, ApiError> {
        let result = self.run(req).await;
        if let Err(e) = &result {
            // boxed: a large future, needed only on this path
            Box::pin(forget_upload(uploaded, e)).await;
        }
        result
    }
    /// [`ApiClient::run_batch`] for jobs whose inputs [`crate::blobs::Blobs::offload_input`]
    /// may have stored (`uploaded`, one per job, in order); a job not queued has its input
    /// removed as in [`ApiClient::run_uploaded`].
    pub async fn run_batch_uploaded(
        &self,
        jobs: Vec<RunRequest>,
        uploaded: Vec<Option<Upload>>,
    ) -> Result<Vec<Result<JobStatus, ApiError>>, ApiError> {
        match self.run_batch(jobs).await {
            Ok(answers) => {
                for (answer, upload) in answers.iter().zip(uploaded) {
                    if let Err(e) = answer {
                        Box::pin(forget_upload(upload, e)).await;
                    }
                }
                Ok(answers)
            }
            Err(e) => {
                for upload in uploaded {
                    Box::pin(forget_upload(upload, &e)).await;
                }
                Err(e)
            }
        }
    }
    pub async fn status(&self, job: &JobRef) -> Result<JobStatus, ApiError> {
        self.request(op::JOB_STATUS, job, Duration::from_millis(job.wait_ms)).await
    }
    pub async fn cancel(&self, job: &JobRef) -> Result<JobStatus, ApiError> {
        self.request(op::JOB_CANCEL, job, Duration::ZERO).await
    }
    pub async fn retry(&self, job: &JobRef) -> Result<JobStatus, ApiError> {
        self.request(op::JOB_RETRY, job, Duration::ZERO).await
    }
    pub async fn stream(&self, job: &JobRef) -> Result<StreamReply, ApiError> {
        self.request(op::JOB_STREAM, job, Duration::ZERO).await
    }
    pub async fn purge(&self, endpoint: &str) -> Result<PurgeReply, ApiError> {
        self.request(op::ENDPOINT_PURGE, &EndpointRef { endpoint: endpoint.into() }, Duration::ZERO).await
    }
    pub async fn health(&self, endpoint: &str) -> Result<HealthReply, ApiError> {
        self.request(op::ENDPOINT_HEALTH, &EndpointRef { endpoint: endpoint.into() }, Duration::ZERO).await
    }
    pub async fn create_endpoint(&self, spec: &EndpointSpec) -> Result<EndpointSpec, ApiError> {
        self.request(op::ENDPOINT_CREATE, spec, Duration::ZERO).await
    }
    /// Creates or updates (idempotent: an unchanged spec keeps its version).
    pub async fn apply_endpoint(&self, spec: &EndpointSpec) -> Result<EndpointSpec, ApiError> {
        self.request(op::ENDPOINT_UPDATE, spec, Duration::ZERO).await
    }
    pub async fn get_endpoint(&self, endpoint: &str) -> Result<EndpointSpec, ApiError> {
        self.request(op::ENDPOINT_GET, &EndpointRef { endpoint: endpoint.into() }, Duration::ZERO).await
    }
    pub async fn list_endpoints(&self) -> Result<EndpointList, ApiError> {
        self.request(op::ENDPOINT_LIST, &(), Duration::ZERO).await
    }
    pub async fn delete_endpoint(&self, endpoint: &str) -> Result<Deleted, ApiError> {
        self.request(op::ENDPOINT_DELETE, &EndpointRef { endpoint: endpoint.into() }, Duration::ZERO).await
    }
    pub async fn workers(&self, endpoint: Option<&str>) -> Result<WorkerList, ApiError> {
        self.request(op::WORKERS_LIST, &WorkersRequest { endpoint: endpoint.map(str::to_string) }, Duration::ZERO).await
    }
    /// The workers of every endpoint: one request, or one per endpoint when they do not all
    /// fit in one reply (a fleet of thousands of workers), sorted by endpoint and id.
    pub async fn all_workers(&self) -> Result<WorkerList, ApiError> {
        match self.workers(None).await {
            Err(e) if e.code == ErrorCode::TooLarge => {
                let mut workers = Vec::new();
                for spec in self.list_endpoints().await?.endpoints {
                    workers.extend(self.workers(Some(&spec.id)).await?.workers);
                }
                workers.sort_by(|a, b| (&a.endpoint, &a.id).cmp(&(&b.endpoint, &b.id)));
                Ok(WorkerList { workers })
            }
            other => other,
        }
    }
    /// An endpoint's jobs, newest first (see [`JobsRequest`]).
    pub async fn jobs(&self, req: &JobsRequest) -> Result<JobList, ApiError> {
        self.request(op::JOBS_LIST, req, Duration::ZERO).await
    }
    pub async fn hosts(&self) -> Result<HostList, ApiError> {
        self.request(op::HOSTS_LIST, &(), Duration::ZERO).await
    }
}

/// Removes the input stored for a submission that failed with `error`, unless the job may be
/// queued all the same (a `timeout`).
pub async fn forget_upload(uploaded: Option<Upload>, error: &ApiError) {
    if let Some(upload) = uploaded
        && error.code != ErrorCode::Timeout
    {
        upload.forget().await;
    }
}
