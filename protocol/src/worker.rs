//! Worker states and the `shoal-workers` record.

use serde::{Deserialize, Serialize};

/// RunPod's worker states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum WorkerState {
    /// Starting: process or container launched, not yet asking for jobs.
    Initializing,
    /// Up and waiting for a job.
    Idle,
    /// Running at least one job.
    Running,
    /// Wanted, but no host has the capacity.
    Throttled,
    /// Runs an old endpoint version; replaced after its current job.
    Outdated,
    /// Crashed or failing to start; retried on the backoff schedule.
    Unhealthy,
    /// Stopped for good (scale-down, endpoint deleted, host shutdown).
    Stopped,
}

impl WorkerState {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Initializing => "initializing",
            WorkerState::Idle => "idle",
            WorkerState::Running => "running",
            WorkerState::Throttled => "throttled",
            WorkerState::Outdated => "outdated",
            WorkerState::Unhealthy => "unhealthy",
            WorkerState::Stopped => "stopped",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerRecord {
    pub id: String,
    pub endpoint: String,
    pub host: String,
    pub state: WorkerState,
    /// Why it is in this state (starting, crash loop with the exit status, ...).
    #[serde(default)]
    pub reason: Option<String>,
    pub spec_version: u64,
    #[serde(default)]
    pub current_jobs: Vec<String>,
    /// Process id or container id of the current incarnation.
    #[serde(default)]
    pub runtime_ref: Option<String>,
    /// Restarts by the supervisor since the worker was created.
    #[serde(default)]
    pub restarts: u32,
    /// Consecutive failures counted by the backoff (resets after a stable period).
    #[serde(default)]
    pub failures: u32,
    pub started_at_ms: u64,
    pub updated_at_ms: u64,
    #[serde(default)]
    pub jobs_done: u64,
}
