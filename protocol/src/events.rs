//! Events, past tense: every state change of a job, worker or host, published on
//! `<prefix>.events.…`. `SHOAL_EVENTS` keeps all but a job's queued and started events (see
//! [`crate::names::Names::events_subjects`]): a job's end carries its whole timeline.

use serde::{Deserialize, Serialize};

use crate::job::JobState;
use crate::worker::WorkerState;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobEvent {
    pub job_id: String,
    pub endpoint: String,
    pub state: JobState,
    pub attempts: u32,
    #[serde(default)]
    pub worker_id: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
    pub at_ms: u64,
    /// On a terminal event: the job's status as the record that event wrote says it (none for
    /// other events, and when the status is too large to travel in an event), so that a
    /// waiter answers without reading the record back.
    #[serde(default)]
    pub status: Option<crate::api::JobStatus>,
    /// On a terminal event: the reply subject of the waiting submitter that the worker side
    /// answered already (see [`crate::job::ReplyTo`]); the control plane's waiter for that
    /// subject sends nothing more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answered: Option<String>,
    /// What the owning endpoint actor keeps of the job, as this change left it (with the
    /// record's revision): the owner follows its jobs from these events. None from processes
    /// older than this field (the owner then reads the record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub view: Option<crate::job::JobView>,
    /// The record was removed (a submission undone because its job could not be queued): the
    /// event's subject ends in `removed`, and the owner forgets the job.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub removed: bool,
}

/// The last token of a [`JobEvent::removed`] event's subject.
pub const REMOVED_EVENT_TOKEN: &str = "removed";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerEvent {
    pub worker_id: String,
    pub endpoint: String,
    pub host: String,
    pub state: WorkerState,
    #[serde(default)]
    pub reason: Option<String>,
    pub restarts: u32,
    pub failures: u32,
    /// For a restart scheduled by the supervisor: the backoff delay chosen.
    #[serde(default)]
    pub backoff_ms: Option<u64>,
    pub at_ms: u64,
    /// The phases of the worker's current start, as far as they went (warm or cold).
    #[serde(default)]
    pub start: Option<crate::worker::StartPhases>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostEvent {
    pub host: String,
    /// `started`, `stopped`.
    pub event: String,
    pub at_ms: u64,
}

/// A webhook call's outcome, on `<prefix>.events.webhook.<endpoint>.<job id>.<delivered|failed>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WebhookEvent {
    pub job_id: String,
    pub endpoint: String,
    /// The terminal state the call announced.
    pub state: JobState,
    pub url: String,
    pub delivered: bool,
    /// Calls made (1 + retries used).
    pub attempts: u32,
    #[serde(default)]
    pub status: Option<u16>,
    #[serde(default)]
    pub error: Option<String>,
    pub at_ms: u64,
}
