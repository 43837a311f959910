//! The job record (the `shoal-jobs` KV value), its states and policies, and the queue token.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// RunPod's job states, spelled as on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobState {
    InQueue,
    InProgress,
    Completed,
    Failed,
    Cancelled,
    TimedOut,
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        !matches!(self, JobState::InQueue | JobState::InProgress)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::InQueue => "IN_QUEUE",
            JobState::InProgress => "IN_PROGRESS",
            JobState::Completed => "COMPLETED",
            JobState::Failed => "FAILED",
            JobState::Cancelled => "CANCELLED",
            JobState::TimedOut => "TIMED_OUT",
        }
    }
    /// Every state, in the order a job goes through them.
    pub const ALL: [JobState; 6] = [
        JobState::InQueue,
        JobState::InProgress,
        JobState::Completed,
        JobState::Failed,
        JobState::Cancelled,
        JobState::TimedOut,
    ];

    /// The event subject token of this state.
    pub fn event_token(self) -> &'static str {
        match self {
            JobState::InQueue => "queued",
            JobState::InProgress => "started",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            JobState::TimedOut => "timed_out",
        }
    }
}

/// A state by its wire name in any case (`FAILED`, `timed_out`); the error names the valid ones.
impl std::str::FromStr for JobState {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        let upper = name.trim().to_ascii_uppercase();
        JobState::ALL.into_iter().find(|s| s.as_str() == upper).ok_or_else(|| {
            format!("unknown job state {name:?} (one of {})", JobState::ALL.map(JobState::as_str).join(", "))
        })
    }
}

/// Normal jobs drive scaling; low-priority jobs wait in a second queue served only when the
/// normal one is empty, and never trigger a scale-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    #[default]
    Normal,
    Low,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }
}

pub const DEFAULT_TTL_MS: u64 = 24 * 3600 * 1000;
pub const MIN_TTL_MS: u64 = 1_000;
pub const MAX_TTL_MS: u64 = 7 * 24 * 3600 * 1000;
pub const MIN_EXECUTION_TIMEOUT_MS: u64 = 1_000;
pub const MAX_EXECUTION_TIMEOUT_MS: u64 = 7 * 24 * 3600 * 1000;

/// A job's policy as the client sent it; absent fields take the endpoint's defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PolicyRequest {
    #[serde(default)]
    pub execution_timeout_ms: Option<u64>,
    #[serde(default)]
    pub ttl_ms: Option<u64>,
    #[serde(default)]
    pub low_priority: bool,
}

/// A job's resolved policy, stored in its record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub execution_timeout_ms: u64,
    pub ttl_ms: u64,
    #[serde(default)]
    pub priority: Priority,
}

/// The job record: the single source of truth about a job. Every change is a
/// compare-and-set on its KV revision, computed by [`crate::lifecycle`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub endpoint: String,
    pub state: JobState,
    #[serde(default)]
    pub input: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3_config: Option<Value>,
    pub policy: Policy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// How many times a worker took the job.
    #[serde(default)]
    pub attempts: u32,
    /// Past this many takes, a lost job fails instead of being redelivered.
    pub max_attempts: u32,
    /// Re-dispatches after a lost worker (RunPod's `retries`).
    #[serde(default)]
    pub retries: u32,
    /// Submission (or `retry`) time; the ttl counts from here.
    pub submitted_at_ms: u64,
    /// When the job last entered the queue; `delayTime` counts from here.
    pub queued_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The handler asked for its worker to be replaced after this job (`stopPod`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stop_pod: bool,
    /// The input lives in the `shoal-blobs` object store under this name (it was larger than
    /// a NATS message should carry); `input` is then null.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_ref: Option<String>,
    /// The output lives in the `shoal-blobs` object store under this name; `output` is then
    /// absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_ref: Option<String>,
    /// How long the record is kept once it is terminal (its terminal write carries this
    /// per-key TTL); none: [`DEFAULT_RETENTION_S`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_s: Option<u64>,
    /// What became of the webhook call for the current terminal state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_delivery: Option<WebhookDelivery>,
}

/// How long a `/run` result is kept after the job ends (RunPod: 30 minutes).
pub const DEFAULT_RETENTION_S: u64 = 30 * 60;
/// How long a `/runsync` result is kept after the job ends (RunPod: 1 minute).
pub const DEFAULT_SYNC_RETENTION_S: u64 = 60;

/// The outcome of a webhook call, recorded on the job once the dispatcher is done with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookDelivery {
    /// A 2xx came back.
    pub delivered: bool,
    /// Calls made (1 + retries used).
    pub attempts: u32,
    /// The HTTP status of the last call, if any came back.
    #[serde(default)]
    pub status: Option<u16>,
    /// Why the last call failed.
    #[serde(default)]
    pub error: Option<String>,
    pub at_ms: u64,
}

impl JobRecord {
    /// A job just submitted: queued now, never taken, with nothing else set (the caller adds
    /// its webhook, s3Config, references and retention).
    pub fn queued(id: &str, endpoint: &str, input: Value, policy: Policy, max_attempts: u32, now_ms: u64) -> JobRecord {
        JobRecord {
            id: id.to_string(),
            endpoint: endpoint.to_string(),
            state: JobState::InQueue,
            input,
            s3_config: None,
            policy,
            webhook: None,
            idempotency_key: None,
            attempts: 0,
            max_attempts,
            retries: 0,
            submitted_at_ms: now_ms,
            queued_at_ms: now_ms,
            started_at_ms: None,
            finished_at_ms: None,
            worker_id: None,
            host_id: None,
            output: None,
            error: None,
            stop_pod: false,
            input_ref: None,
            output_ref: None,
            retention_s: None,
            webhook_delivery: None,
        }
    }

    /// Its times and deadlines, computed in one place ([`JobView`]; no allocation).
    fn times(&self) -> JobView {
        JobView::of(self, 0)
    }
    /// Milliseconds queued before the last attempt started.
    pub fn delay_time_ms(&self) -> Option<u64> {
        self.times().delay_time_ms()
    }
    /// Milliseconds the last attempt ran, once terminal.
    pub fn execution_time_ms(&self) -> Option<u64> {
        self.times().execution_time_ms()
    }
    pub fn ttl_deadline_ms(&self) -> u64 {
        self.times().ttl_deadline_ms()
    }
    pub fn execution_deadline_ms(&self) -> Option<u64> {
        self.times().execution_deadline_ms()
    }
    /// Seconds the record is kept once terminal.
    pub fn retention_s(&self) -> u64 {
        self.times().retention_s()
    }
}

/// What the endpoint actor owning a job keeps of it: its state, policy (deadlines and
/// priority), retries and the times its deadlines, metrics and retention count from, with the
/// revision of the record it was taken from; not its input, output or anything else that a
/// long queue would make the owner hold in memory. Job events carry it
/// ([`crate::events::JobEvent::view`]), so the owner follows its jobs from the events alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobView {
    pub state: JobState,
    pub policy: Policy,
    #[serde(default)]
    pub retries: u32,
    pub submitted_at_ms: u64,
    pub queued_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_s: Option<u64>,
    /// The `shoal-jobs` revision of the record this view was taken from.
    pub revision: u64,
}

impl JobView {
    /// The view of `rec` as written at `revision`.
    pub fn of(rec: &JobRecord, revision: u64) -> JobView {
        JobView {
            state: rec.state,
            policy: rec.policy.clone(),
            retries: rec.retries,
            submitted_at_ms: rec.submitted_at_ms,
            queued_at_ms: rec.queued_at_ms,
            started_at_ms: rec.started_at_ms,
            finished_at_ms: rec.finished_at_ms,
            retention_s: rec.retention_s,
            revision,
        }
    }
    /// Whether `other` says the same of the job (the revision aside): a write that changes
    /// nothing the owner keeps (a webhook's outcome on a terminal record) needs no event.
    pub fn same_as(&self, other: &JobView) -> bool {
        JobView { revision: other.revision, ..self.clone() } == *other
    }
    /// Milliseconds queued before the last attempt started.
    pub fn delay_time_ms(&self) -> Option<u64> {
        self.started_at_ms.map(|s| s.saturating_sub(self.queued_at_ms))
    }
    /// Milliseconds the last attempt ran, once terminal.
    pub fn execution_time_ms(&self) -> Option<u64> {
        match (self.started_at_ms, self.finished_at_ms) {
            (Some(s), Some(f)) => Some(f.saturating_sub(s)),
            _ => None,
        }
    }
    pub fn ttl_deadline_ms(&self) -> u64 {
        self.submitted_at_ms.saturating_add(self.policy.ttl_ms)
    }
    pub fn execution_deadline_ms(&self) -> Option<u64> {
        self.started_at_ms.map(|s| s.saturating_add(self.policy.execution_timeout_ms))
    }
    /// When a terminal record expires (its retention after it finished): the owner forgets
    /// the job then. None while the job is open.
    pub fn expires_at_ms(&self) -> Option<u64> {
        let finished = self.finished_at_ms.filter(|_| self.state.is_terminal())?;
        Some(finished.saturating_add(self.retention_s().saturating_mul(1000)))
    }
    /// Seconds the record is kept once terminal.
    pub fn retention_s(&self) -> u64 {
        self.retention_s.unwrap_or(DEFAULT_RETENTION_S)
    }
}

/// The message on `<prefix>.jobs.<endpoint>.<priority>`: a delivery token. The record is the
/// truth; the token says which job to take and may carry a snapshot of the record as queued,
/// so that a taker can compare-and-set against the snapshot's revision without reading the
/// record first (a conflict means the record changed since: the taker reads it then).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobToken {
    pub id: String,
    pub endpoint: String,
    /// The record as queued, when it was small enough to carry (older tokens: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<RecordSnapshot>,
    /// Where the submitter waits for the result (a `job.run` with `wait_ms`): the worker side
    /// that records the result answers there itself, one hop sooner than the control plane
    /// could (older tokens, and jobs nobody waits for: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<ReplyTo>,
}

/// A waiting submitter's reply subject, how it wants the answer encoded, and until when it
/// waits (after that the control plane has answered with the status of the moment).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplyTo {
    pub subject: String,
    /// The request's content type (see [`crate::codec::Encoding::from_content_type`]).
    #[serde(default)]
    pub content_type: Option<String>,
    /// Unix ms; a result recorded later is not answered here.
    pub until_ms: u64,
}

/// A job record at a KV revision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordSnapshot {
    pub revision: u64,
    pub record: JobRecord,
}

impl JobToken {
    /// A token without a snapshot: the taker reads the record.
    pub fn new(id: impl Into<String>, endpoint: impl Into<String>) -> JobToken {
        JobToken { id: id.into(), endpoint: endpoint.into(), snapshot: None, reply: None }
    }
}

/// What the worker bridge hands a worker on job-take: RunPod's job object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerJob {
    pub id: String,
    pub input: Value,
    #[serde(rename = "s3Config", skip_serializing_if = "Option::is_none", default)]
    pub s3_config: Option<Value>,
}

#[cfg(test)]
mod tests {
    use super::JobState;

    #[test]
    fn states_parse_by_their_wire_names_in_any_case() {
        for state in JobState::ALL {
            assert_eq!(state.as_str().parse::<JobState>(), Ok(state));
            assert_eq!(state.as_str().to_lowercase().parse::<JobState>(), Ok(state));
        }
        assert_eq!(" timed_out ".parse::<JobState>(), Ok(JobState::TimedOut));
        let err = "DONE".parse::<JobState>().expect_err("not a state");
        assert!(err.contains("\"DONE\"") && err.contains("IN_QUEUE") && err.contains("TIMED_OUT"), "{err}");
    }
}
