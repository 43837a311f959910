//! Submitting shoal jobs the way clients do, and seeing their results.
//!
//! - NATS: a request on `<prefix>.v1.api.job.run` with a MessagePack [`RunRequest`] encoded once
//!   (every job of a run has the same input, so the tester spends no CPU re-encoding it); or in
//!   `job.run_batch` requests of at most [`BATCH_BYTES`]. An input above the inline limit
//!   (a quarter of NATS' `max_payload`) goes to the object store first, once per job, as the CLI
//!   and the gateway send one (`input_ref`).
//! - HTTP: `POST {url}/v2/{endpoint}/run` or `/runsync?wait=` on the RunPod-compatible gateway.
//!
//! Sync mode waits in the request (`wait_ms`, `/runsync`) and reads the delay and execution
//! times from the reply. Async mode submits, then sees the job end on the job events
//! (`<prefix>.events.job.>`) through a [`JobTracker`]; a job whose terminal event never comes is
//! read back with `job.status` once, and counted as `events_missed`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{Value, json};
use shoal_actors::blobs::{Blobs, inline_limit};
use shoal_actors::client::{ApiClient, forget_upload, read_reply, request_error};
use shoal_protocol::api::{JobRef, JobStatus, RunBatchReply, RunRequest};
use shoal_protocol::codec::{CONTENT_TYPE, Encoding, encode, from_msgpack};
use shoal_protocol::events::JobEvent;
use shoal_protocol::job::JobState;
use shoal_protocol::names::{Names, op};
use shoal_protocol::{ApiError, ErrorCode};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use crate::config::{Handler, Transport, WaitMode};
use crate::driver::JobOutcome;

/// The input of every job of a run: what the handler should do, padded to `payload_bytes`.
pub fn job_input(handler: Handler, payload_bytes: usize) -> Value {
    let mut input = match handler {
        Handler::Noop => json!({}),
        Handler::Sleep { ms } => json!({ "sleep_ms": ms }),
        Handler::Python { sleep_ms: 0 } => json!({ "mode": "echo" }),
        Handler::Python { sleep_ms } => json!({ "mode": "sleep", "seconds": sleep_ms as f64 / 1000.0 }),
    };
    if payload_bytes > 0
        && let Some(obj) = input.as_object_mut()
    {
        obj.insert("pad".into(), Value::String("x".repeat(payload_bytes)));
    }
    input
}

/// The error key of a job that ended otherwise than COMPLETED.
pub fn state_error(state: JobState) -> Option<String> {
    match state {
        JobState::Completed => None,
        JobState::Failed => Some("job_failed".into()),
        JobState::TimedOut => Some("job_timed_out".into()),
        JobState::Cancelled => Some("job_cancelled".into()),
        JobState::InQueue | JobState::InProgress => Some("no_result".into()),
    }
}

/// A job's end as its events tell it.
#[derive(Debug, Clone)]
pub struct Finished {
    pub state: JobState,
    /// When the terminal event arrived here.
    pub seen: Instant,
    pub queue_ms: Option<u64>,
    pub exec_ms: Option<u64>,
    /// When the (last) queued and started events arrived here.
    pub queued_seen: Option<Instant>,
    pub started_seen: Option<Instant>,
}

#[derive(Default)]
struct Track {
    queued_at_ms: Option<u64>,
    started_at_ms: Option<u64>,
    queued_seen: Option<Instant>,
    started_seen: Option<Instant>,
    finished: Option<Finished>,
    waiter: Option<oneshot::Sender<Finished>>,
}

/// Matches job events with the submissions waiting for them; events may arrive before the
/// submit reply names the job, so both orders work.
#[derive(Default)]
pub struct JobTracker {
    jobs: Mutex<HashMap<String, Track>>,
    pub events: AtomicU64,
}

impl JobTracker {
    pub fn on_event(&self, e: &JobEvent, seen: Instant) {
        self.events.fetch_add(1, Ordering::Relaxed);
        let Ok(mut jobs) = self.jobs.lock() else { return };
        let t = jobs.entry(e.job_id.clone()).or_default();
        match e.state {
            JobState::InQueue => (t.queued_at_ms, t.queued_seen) = (Some(e.at_ms), Some(seen)),
            JobState::InProgress => (t.started_at_ms, t.started_seen) = (Some(e.at_ms), Some(seen)),
            terminal => {
                if t.finished.is_some() {
                    return;
                }
                // from the queued and started events when watched, else as the terminal
                // event's status says (the record's own timestamps)
                let status = e.status.as_ref();
                let f = Finished {
                    state: terminal,
                    seen,
                    queue_ms: match (t.queued_at_ms, t.started_at_ms) {
                        (Some(q), Some(s)) => Some(s.saturating_sub(q)),
                        _ => status.and_then(|s| s.delay_time_ms),
                    },
                    exec_ms: t
                        .started_at_ms
                        .map(|s| e.at_ms.saturating_sub(s))
                        .or_else(|| status.and_then(|s| s.execution_time_ms)),
                    queued_seen: t.queued_seen,
                    started_seen: t.started_seen,
                };
                match t.waiter.take() {
                    Some(w) => {
                        let _ = w.send(f);
                        jobs.remove(&e.job_id);
                    }
                    None => t.finished = Some(f),
                }
            }
        }
    }

    /// The job's end, now if it already ended.
    pub fn wait_for(&self, job_id: &str) -> oneshot::Receiver<Finished> {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut jobs) = self.jobs.lock() {
            let t = jobs.entry(job_id.to_string()).or_default();
            match t.finished.take() {
                Some(f) => {
                    let _ = tx.send(f);
                    jobs.remove(job_id);
                }
                None => t.waiter = Some(tx),
            }
        }
        rx
    }

    pub fn forget(&self, job_id: &str) {
        if let Ok(mut jobs) = self.jobs.lock() {
            jobs.remove(job_id);
        }
    }

    /// Subscribes to the job events of `endpoint` and feeds them to the tracker until dropped
    /// (the returned task is aborted by the caller): the terminal events only, or with `phases`
    /// every event (queued and started too).
    pub async fn watch(
        self: &Arc<Self>,
        client: &async_nats::Client,
        names: &Names,
        endpoint: &str,
        phases: bool,
    ) -> anyhow::Result<tokio::task::JoinHandle<()>> {
        let subjects = if phases {
            vec![names.job_event_subject(endpoint, "*", "*")]
        } else {
            [JobState::Completed, JobState::Failed, JobState::TimedOut, JobState::Cancelled]
                .iter()
                .map(|s| names.job_event_subject(endpoint, "*", s.event_token()))
                .collect()
        };
        let mut subs = Vec::new();
        for subject in subjects {
            subs.push(client.subscribe(subject).await?);
        }
        let mut sub = futures::stream::select_all(subs);
        let (me, endpoint) = (self.clone(), endpoint.to_string());
        Ok(tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                match from_msgpack::<JobEvent>(&msg.payload) {
                    Ok(e) if e.endpoint == endpoint => me.on_event(&e, Instant::now()),
                    Ok(_) => {}
                    Err(e) => tracing::debug!(error = %e, "undecodable job event ignored"),
                }
            }
        }))
    }
}

enum Path {
    Nats { client: async_nats::Client, subject: String, headers: HeaderMap },
    NatsBatch(Batcher),
    Http { http: reqwest::Client, url: String, api_key: Option<String>, body: Bytes },
}

/// A job's input too large to travel in its request: each job uploads it first.
struct LargeInput {
    blobs: Blobs,
    names: Names,
    req: RunRequest,
}

/// Submits the jobs of one run and reports each one's outcome.
pub struct ShoalJobs {
    path: Path,
    /// Every job's encoded `RunRequest` (NATS), unless its input goes to the object store.
    body: Bytes,
    large: Option<LargeInput>,
    wait: WaitMode,
    endpoint: String,
    timeout: Duration,
    tracker: Option<Arc<JobTracker>>,
    api: ApiClient,
    pub events_missed: AtomicU64,
}

impl ShoalJobs {
    /// `tracker` is required for async mode; `batch` above 1 queues the jobs in batches (async,
    /// NATS only).
    #[allow(clippy::too_many_arguments)]
    pub async fn new(
        transport: &Transport,
        wait: WaitMode,
        client: async_nats::Client,
        names: &Names,
        endpoint: &str,
        input: Value,
        timeout: Duration,
        tracker: Option<Arc<JobTracker>>,
        batch: usize,
    ) -> anyhow::Result<ShoalJobs> {
        let sync = wait == WaitMode::Sync;
        let wait_ms = if sync { u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX) } else { 0 };
        let (mut body, mut large) = (Bytes::new(), None);
        let path = match transport {
            Transport::Nats => {
                // built from its fields by name, so fields added to the request later keep their defaults
                let req: RunRequest = serde_json::from_value(json!({
                    "endpoint": endpoint, "input": input, "wait_ms": wait_ms, "sync": sync,
                }))?;
                let mut headers = HeaderMap::new();
                headers.insert(CONTENT_TYPE, Encoding::MsgPack.content_type());
                if serde_json::to_vec(&input)?.len() > inline_limit(client.server_info().max_payload) {
                    let blobs = Blobs::open(client.clone(), names).await?;
                    large = Some(LargeInput { blobs, names: names.clone(), req });
                } else {
                    body = Bytes::from(encode(Encoding::MsgPack, &req)?);
                }
                if batch > 1 {
                    if sync {
                        anyhow::bail!("batches of submits do not wait: async mode only");
                    }
                    let subject = names.api_subject(op::JOB_RUN_BATCH);
                    Path::NatsBatch(Batcher::start(client.clone(), subject, headers, batch, timeout))
                } else {
                    Path::Nats { client: client.clone(), subject: names.api_subject(op::JOB_RUN), headers }
                }
            }
            Transport::Http { url, api_key } => {
                let url = url.as_deref().context("no gateway URL")?;
                let base = url.trim_end_matches('/');
                let url = if sync {
                    format!("{base}/v2/{endpoint}/runsync?wait={wait_ms}")
                } else {
                    format!("{base}/v2/{endpoint}/run")
                };
                let http = reqwest::Client::builder().pool_max_idle_per_host(4096).build()?;
                Path::Http {
                    http,
                    url,
                    api_key: api_key.clone(),
                    body: Bytes::from(serde_json::to_vec(&json!({ "input": input }))?),
                }
            }
        };
        if !sync && tracker.is_none() {
            anyhow::bail!("async submits need a job tracker");
        }
        Ok(ShoalJobs {
            path,
            body,
            large,
            wait,
            endpoint: endpoint.to_string(),
            timeout,
            tracker,
            api: ApiClient::new(client, names.clone()).with_timeout(Duration::from_secs(10)),
            events_missed: AtomicU64::new(0),
        })
    }

    /// The batch requests sent so far, when the jobs are queued in batches.
    pub fn batch_requests(&self) -> Option<u64> {
        match &self.path {
            Path::NatsBatch(b) => Some(b.requests.load(Ordering::Relaxed)),
            _ => None,
        }
    }

    /// Submits one job and waits for its end.
    pub async fn run_job(&self) -> JobOutcome {
        let sent = Instant::now();
        let reply = self.submit().await;
        let replied = Instant::now();
        let status = match reply {
            Ok(s) => s,
            Err(e) => return JobOutcome::failed(e.code.as_str(), sent),
        };
        if self.wait == WaitMode::Sync {
            return JobOutcome {
                error: state_error(status.status),
                done: replied,
                queue_ms: status.delay_time_ms,
                exec_ms: status.execution_time_ms,
                ..JobOutcome::done(sent)
            };
        }
        let Some(tracker) = &self.tracker else {
            return JobOutcome::failed("internal", sent);
        };
        let left = self.timeout.saturating_sub(sent.elapsed());
        match tokio::time::timeout(left, tracker.wait_for(&status.id)).await {
            Ok(Ok(f)) => JobOutcome {
                error: state_error(f.state),
                accepted: Some(replied),
                done: f.seen,
                queue_ms: f.queue_ms,
                exec_ms: f.exec_ms,
                queued_seen: f.queued_seen,
                started_seen: f.started_seen,
                ..JobOutcome::done(sent)
            },
            _ => {
                tracker.forget(&status.id);
                self.read_back(&status.id, sent, replied).await
            }
        }
    }

    /// No terminal event in time: ask once.
    async fn read_back(&self, id: &str, sent: Instant, accepted: Instant) -> JobOutcome {
        let job = JobRef { endpoint: Some(self.endpoint.clone()), id: id.to_string(), wait_ms: 0 };
        match self.api.status(&job).await {
            Ok(s) if s.status.is_terminal() => {
                self.events_missed.fetch_add(1, Ordering::Relaxed);
                JobOutcome {
                    error: state_error(s.status),
                    accepted: Some(accepted),
                    queue_ms: s.delay_time_ms,
                    exec_ms: s.execution_time_ms,
                    ..JobOutcome::done(sent)
                }
            }
            _ => JobOutcome { accepted: Some(accepted), ..JobOutcome::failed("no_result", sent) },
        }
    }

    async fn submit(&self) -> Result<JobStatus, ApiError> {
        if let Some(large) = &self.large {
            // boxed: the upload's futures are large, and every job's future would carry them
            return Box::pin(self.submit_uploaded(large)).await;
        }
        self.send(self.body.clone()).await
    }

    /// Uploads the job's input, sends the job, and removes the upload when it was not queued.
    async fn submit_uploaded(&self, large: &LargeInput) -> Result<JobStatus, ApiError> {
        let mut req = large.req.clone();
        let uploaded = large
            .blobs
            .offload_input(&large.names, &mut req)
            .await
            .map_err(|e| ApiError::unavailable(e.to_string()))?;
        let result = match encode(Encoding::MsgPack, &req) {
            Ok(body) => self.send(Bytes::from(body)).await,
            Err(e) => Err(ApiError::from(e)),
        };
        if let Err(e) = &result {
            forget_upload(uploaded, e).await;
        }
        result
    }

    /// Sends one job: `body` is its encoded `RunRequest` over NATS (HTTP sends its own body).
    async fn send(&self, body: Bytes) -> Result<JobStatus, ApiError> {
        match &self.path {
            Path::Nats { client, subject, headers } => {
                let request = async_nats::Request::new()
                    .payload(body)
                    .headers(headers.clone())
                    .timeout(Some(self.timeout + Duration::from_secs(5)));
                let msg = client.send_request(subject.clone(), request).await.map_err(|e| request_error(&e))?;
                read_reply(&msg)
            }
            Path::NatsBatch(batcher) => batcher.submit(body).await,
            Path::Http { .. } => self.submit_http().await,
        }
    }

    async fn submit_http(&self) -> Result<JobStatus, ApiError> {
        match &self.path {
            Path::Nats { .. } | Path::NatsBatch(_) => Err(ApiError::internal("not an HTTP submitter")),
            Path::Http { http, url, api_key, body } => {
                let mut req = http
                    .post(url)
                    .header("content-type", "application/json")
                    .timeout(self.timeout + Duration::from_secs(5))
                    .body(body.clone());
                if let Some(key) = api_key {
                    req = req.header("authorization", format!("Bearer {key}"));
                }
                let resp = req.send().await.map_err(|e| {
                    if e.is_timeout() {
                        ApiError::new(ErrorCode::Timeout, e.to_string())
                    } else {
                        ApiError::unavailable(e.to_string())
                    }
                })?;
                let status = resp.status();
                let bytes = resp.bytes().await.map_err(|e| ApiError::unavailable(e.to_string()))?;
                if !status.is_success() {
                    return Err(ApiError::new(
                        ErrorCode::from_status(status.as_u16()),
                        String::from_utf8_lossy(&bytes),
                    ));
                }
                envelope(&bytes, &self.endpoint)
            }
        }
    }
}

/// Submits jobs in batches (`job.run_batch`), as a client that gathers whatever jobs are
/// waiting to be sent does: a batch leaves as soon as one of the few batch requests allowed in
/// flight is free, with every job that queued up meanwhile (up to the batch size). No timer:
/// a lone job leaves alone.
pub struct Batcher {
    queue: mpsc::UnboundedSender<Waiting>,
    task: tokio::task::JoinHandle<()>,
    /// Batch requests sent.
    requests: Arc<AtomicU64>,
}

/// Batch requests in flight at once.
const BATCHES_IN_FLIGHT: usize = 4;
/// The most job bytes one batch request carries (as the CLI's `job submit`), well under the
/// control plane's `max_input_bytes` and NATS' `max_payload` (1 MiB by default).
pub const BATCH_BYTES: usize = 512 * 1024;

/// A job waiting to be sent in a batch: its encoded `RunRequest` and where its answer goes.
type Waiting = (Bytes, oneshot::Sender<Result<JobStatus, ApiError>>);

impl Batcher {
    fn start(
        client: async_nats::Client,
        subject: String,
        headers: HeaderMap,
        max: usize,
        timeout: Duration,
    ) -> Batcher {
        let (queue, mut rx) = mpsc::unbounded_channel::<Waiting>();
        let requests = Arc::new(AtomicU64::new(0));
        let sent = requests.clone();
        let task = tokio::spawn(async move {
            let slots = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
            // a job that did not fit in the previous batch opens the next one
            let mut carried: Option<Waiting> = None;
            loop {
                let Ok(slot) = slots.clone().acquire_owned().await else { return };
                let first = match carried.take() {
                    Some(first) => first,
                    None => match rx.recv().await {
                        Some(first) => first,
                        None => return,
                    },
                };
                let mut bytes = first.0.len();
                let mut waiting = vec![first];
                while waiting.len() < max {
                    match rx.try_recv() {
                        Ok(w) if bytes + w.0.len() > BATCH_BYTES => {
                            carried = Some(w);
                            break;
                        }
                        Ok(w) => {
                            bytes += w.0.len();
                            waiting.push(w);
                        }
                        Err(_) => break,
                    }
                }
                let (jobs, waiting): (Vec<Bytes>, Vec<_>) = waiting.into_iter().unzip();
                let body = batch_body(&jobs);
                sent.fetch_add(1, Ordering::Relaxed);
                let (client, subject, headers) = (client.clone(), subject.clone(), headers.clone());
                tokio::spawn(async move {
                    let request = async_nats::Request::new()
                        .payload(body)
                        .headers(headers)
                        .timeout(Some(timeout + Duration::from_secs(5)));
                    let answers = match client.send_request(subject, request).await {
                        Ok(msg) => read_reply::<RunBatchReply>(&msg).and_then(|r| {
                            if r.jobs.len() == waiting.len() {
                                Ok(r.jobs)
                            } else {
                                Err(ApiError::internal(format!(
                                    "{} answers to a batch of {}",
                                    r.jobs.len(),
                                    waiting.len()
                                )))
                            }
                        }),
                        Err(e) => Err(request_error(&e)),
                    };
                    drop(slot);
                    match answers {
                        Ok(items) => {
                            for (w, item) in waiting.into_iter().zip(items) {
                                let _ = w.send(item.into_result());
                            }
                        }
                        Err(e) => {
                            for w in waiting {
                                let _ = w.send(Err(e.clone()));
                            }
                        }
                    }
                });
            }
        });
        Batcher { queue, task, requests }
    }

    async fn submit(&self, job: Bytes) -> Result<JobStatus, ApiError> {
        let (tx, rx) = oneshot::channel();
        self.queue.send((job, tx)).map_err(|_| ApiError::unavailable("the batcher stopped"))?;
        rx.await.map_err(|_| ApiError::unavailable("the batcher stopped"))?
    }
}

impl Drop for Batcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A MessagePack `RunBatchRequest` of encoded `RunRequest`s (`{"jobs": [job, ...]}`), without
/// encoding the jobs again.
fn batch_body(jobs: &[Bytes]) -> Bytes {
    let count = jobs.len();
    let mut out = Vec::with_capacity(16 + jobs.iter().map(Bytes::len).sum::<usize>());
    out.push(0x81); // a map of one entry
    out.push(0xa4); // a string of 4 bytes
    out.extend_from_slice(b"jobs");
    match u16::try_from(count) {
        Ok(n) if n < 16 => out.push(0x90 | n as u8),
        Ok(n) => {
            out.push(0xdc);
            out.extend_from_slice(&n.to_be_bytes());
        }
        Err(_) => {
            out.push(0xdd);
            out.extend_from_slice(&u32::try_from(count).unwrap_or(u32::MAX).to_be_bytes());
        }
    }
    for job in jobs {
        out.extend_from_slice(job);
    }
    Bytes::from(out)
}

/// Reads RunPod's status envelope (`{"id", "status", "delayTime", "executionTime", ...}`).
pub fn envelope(bytes: &[u8], endpoint: &str) -> Result<JobStatus, ApiError> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| ApiError::internal(format!("reply is not JSON: {e}")))?;
    let id = v.get("id").and_then(Value::as_str).ok_or_else(|| ApiError::internal(format!("reply has no id: {v}")))?;
    let status: JobState = v
        .get("status")
        .cloned()
        .and_then(|s| serde_json::from_value(s).ok())
        .ok_or_else(|| ApiError::internal(format!("reply has no known status: {v}")))?;
    serde_json::from_value(json!({
        "id": id,
        "endpoint": endpoint,
        "status": status,
        "delay_time_ms": v.get("delayTime").and_then(Value::as_u64),
        "execution_time_ms": v.get("executionTime").and_then(Value::as_u64),
        "error": v.get("error").map(|e| e.to_string()),
    }))
    .map_err(|e| ApiError::internal(format!("cannot read the status envelope: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(id: &str, state: JobState, at_ms: u64) -> JobEvent {
        serde_json::from_value(json!({"job_id": id, "endpoint": "ep", "state": state, "attempts": 1, "at_ms": at_ms}))
            .expect("a job event")
    }

    #[test]
    fn a_batch_body_is_the_batch_request_of_the_jobs_in_order() {
        let job = |n: usize| RunRequest::new("ep", json!({"pad": "xx", "n": n}));
        for count in [1, 15, 16, 1000, 70_000] {
            let encoded: Vec<Bytes> =
                (0..count).map(|n| Bytes::from(encode(Encoding::MsgPack, &job(n)).expect("encode"))).collect();
            let batch: shoal_protocol::api::RunBatchRequest =
                shoal_protocol::codec::decode(Encoding::MsgPack, &batch_body(&encoded)).expect("a batch request");
            assert_eq!(batch.jobs.len(), count);
            assert!(batch.jobs.iter().enumerate().all(|(n, j)| *j == job(n)));
        }
    }

    #[tokio::test]
    async fn the_tracker_matches_events_in_either_order() {
        let t = JobTracker::default();
        // events first, then the submitter asks
        t.on_event(&ev("a", JobState::InQueue, 100), Instant::now());
        t.on_event(&ev("a", JobState::InProgress, 103), Instant::now());
        t.on_event(&ev("a", JobState::Completed, 110), Instant::now());
        let f = t.wait_for("a").await.expect("already finished");
        assert_eq!((f.state, f.queue_ms, f.exec_ms), (JobState::Completed, Some(3), Some(7)));
        // the submitter asks first
        let rx = t.wait_for("b");
        t.on_event(&ev("b", JobState::InQueue, 0), Instant::now());
        t.on_event(&ev("b", JobState::InProgress, 5), Instant::now());
        // a redelivery: queued again, started again; the delay counts from the last queueing
        t.on_event(&ev("b", JobState::InQueue, 50), Instant::now());
        t.on_event(&ev("b", JobState::InProgress, 52), Instant::now());
        t.on_event(&ev("b", JobState::Failed, 60), Instant::now());
        let f = rx.await.expect("finished");
        assert_eq!((f.state, f.queue_ms, f.exec_ms), (JobState::Failed, Some(2), Some(8)));
        assert!(t.jobs.lock().expect("lock").is_empty());
        assert_eq!(t.events.load(Ordering::Relaxed), 8);
    }

    #[tokio::test]
    async fn terminal_events_alone_give_the_delay_and_execution_time_from_their_status() {
        let t = JobTracker::default();
        let mut done = ev("c", JobState::Completed, 500);
        let status =
            json!({"id": "c", "endpoint": "ep", "status": "COMPLETED", "delay_time_ms": 4, "execution_time_ms": 9});
        done.status = Some(serde_json::from_value(status).expect("a status"));
        let rx = t.wait_for("c");
        t.on_event(&done, Instant::now());
        let f = rx.await.expect("finished");
        assert_eq!((f.state, f.queue_ms, f.exec_ms), (JobState::Completed, Some(4), Some(9)));
        assert_eq!((f.queued_seen, f.started_seen), (None, None));
    }

    #[test]
    fn inputs_carry_the_handler_and_the_padding() {
        assert_eq!(job_input(Handler::Noop, 0), json!({}));
        assert_eq!(job_input(Handler::Sleep { ms: 5 }, 3), json!({"sleep_ms": 5, "pad": "xxx"}));
        assert_eq!(job_input(Handler::Python { sleep_ms: 250 }, 0), json!({"mode": "sleep", "seconds": 0.25}));
    }

    #[test]
    fn runpod_envelopes_are_read() {
        let s = envelope(br#"{"id":"x-u1","status":"COMPLETED","delayTime":3,"executionTime":4,"output":{}}"#, "ep")
            .expect("valid");
        assert_eq!((s.status, s.delay_time_ms, s.execution_time_ms), (JobState::Completed, Some(3), Some(4)));
        assert!(envelope(br#"{"status":"COMPLETED"}"#, "ep").is_err());
        assert_eq!(state_error(JobState::TimedOut).as_deref(), Some("job_timed_out"));
    }
}
