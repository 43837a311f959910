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
    /// How the current incarnation started: warm or cold, and the time of each phase.
    #[serde(default)]
    pub start: Option<StartPhases>,
}

/// How one start of a worker went: a warm start reuses a stopped container of the same
/// endpoint version (FlashBoot); a cold one pulls the image if missing and creates one. Phase
/// times are in milliseconds; a phase that did not happen (no pull, a warm start's create) is
/// `None`. The first ping and first job are counted from the start request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartPhases {
    #[serde(default)]
    pub warm: bool,
    #[serde(default)]
    pub pull_ms: Option<u64>,
    #[serde(default)]
    pub create_ms: Option<u64>,
    #[serde(default)]
    pub start_ms: Option<u64>,
    #[serde(default)]
    pub first_ping_ms: Option<u64>,
    #[serde(default)]
    pub first_job_ms: Option<u64>,
}

impl StartPhases {
    /// `warm: start 120ms, ping 0.9s, job 1.2s` (phases that happened, in order).
    pub fn summary(&self) -> String {
        let phases = [
            ("pull", self.pull_ms),
            ("create", self.create_ms),
            ("start", self.start_ms),
            ("ping", self.first_ping_ms),
            ("job", self.first_job_ms),
        ];
        let parts: Vec<String> =
            phases.iter().filter_map(|(name, ms)| ms.map(|ms| format!("{name} {}", crate::human_ms(ms)))).collect();
        let kind = if self.warm { "warm" } else { "cold" };
        if parts.is_empty() { kind.to_string() } else { format!("{kind}: {}", parts.join(", ")) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_summaries_name_the_phases_that_happened() {
        let cold = StartPhases {
            warm: false,
            pull_ms: Some(2500),
            create_ms: Some(40),
            start_ms: Some(120),
            first_ping_ms: None,
            first_job_ms: Some(1300),
        };
        assert_eq!(cold.summary(), "cold: pull 2.5s, create 40ms, start 120ms, job 1.3s");
        let warm = StartPhases { warm: true, start_ms: Some(90), ..StartPhases::default() };
        assert_eq!(warm.summary(), "warm: start 90ms");
        assert_eq!(StartPhases::default().summary(), "cold");
    }
}
