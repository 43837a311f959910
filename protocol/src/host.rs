//! Hosts: inventory and heartbeat (`shoal-hosts`), and commands to a host.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gpu {
    pub name: String,
    pub uuid: String,
    #[serde(default)]
    pub memory_mb: u64,
    /// GPUs reporting errors are never placed on.
    #[serde(default)]
    pub healthy: bool,
    /// The worker this GPU is given to, if any.
    #[serde(default)]
    pub worker_id: Option<String>,
    /// GPU utilization in percent at the last heartbeat, where the driver reports it.
    #[serde(default)]
    pub utilization_pct: Option<u32>,
    /// Why the GPU is unhealthy (an NVML error, uncorrected ECC errors, ...).
    #[serde(default)]
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostRecord {
    pub id: String,
    pub runtime: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub gpus: Vec<Gpu>,
    /// The worker bridge's base URL, as workers on this host reach it.
    pub bridge_url: String,
    #[serde(default)]
    pub workers: u32,
    /// Most workers without GPUs this host runs (CPU endpoints); 0 = no limit.
    #[serde(default)]
    pub max_workers: u32,
    /// `<endpoint>@<version>` of endpoint versions this host has warm (a stopped container or
    /// the image): placement prefers these hosts (the FlashBoot effect).
    #[serde(default)]
    pub warm: Vec<String>,
    pub started_at_ms: u64,
    pub heartbeat_at_ms: u64,
    /// Drained by an operator (`shoal hosts drain`): its workers finish their jobs and stop, and
    /// no new worker is placed on it until it is resumed.
    #[serde(default)]
    pub draining: bool,
    /// The newest CUDA version its driver supports (`major.minor`, from NVML or
    /// `host.cuda_version`); none: unknown (a CPU host), never chosen by an endpoint that asks
    /// for a minimum.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cuda_version: Option<String>,
}

impl HostRecord {
    /// Healthy GPUs of type `name` not given to any worker.
    pub fn free_gpus(&self, name: &str) -> usize {
        self.gpus.iter().filter(|g| g.healthy && g.worker_id.is_none() && g.name == name).count()
    }
}

/// Start a worker of an endpoint on this host (request/reply). Carries the spec it runs, so a
/// host needs nothing else, and the epoch of the endpoint lease its sender holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StartWorker {
    pub spec: crate::endpoint::EndpointSpec,
    pub worker_id: String,
    /// The GPU type to give it (`gpu_count` of them); none for CPU endpoints.
    #[serde(default)]
    pub gpu_type: Option<String>,
    pub epoch: u64,
}

/// Stop a worker: at once, or after its current jobs (`drain`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopWorker {
    pub endpoint: String,
    pub worker_id: String,
    pub drain: bool,
    pub epoch: u64,
    pub reason: String,
}

/// Drain a host (`draining`: its workers finish their current jobs and stop, and it takes no
/// new worker) or resume it, request/reply on [`crate::names::Names::host_drain_subject`]; the
/// reply is a [`CommandReply`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainHost {
    pub draining: bool,
}

/// A host's answer to a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandReply {
    pub ok: bool,
    #[serde(default)]
    pub error: Option<String>,
}

/// Stop a job a worker on this host runs: it was cancelled or timed out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopJob {
    pub endpoint: String,
    pub job_id: String,
    pub worker_id: String,
    pub reason: String,
}

/// Ask a host for a worker's log, request/reply on
/// [`crate::names::Names::host_worker_logs_subject`]. The reply is a [`WorkerLogs`] with the
/// last `lines` lines. With `follow_to`, the host then sends every new batch of lines as a
/// request to that subject (the asker answers each with an empty message) until the worker's
/// log ends, or nobody answers: the asker went away.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetWorkerLogs {
    pub endpoint: String,
    pub worker_id: String,
    /// How many of the last lines to send; 0 means 100.
    #[serde(default)]
    pub lines: u32,
    #[serde(default)]
    pub follow_to: Option<String>,
}

/// Lines of a worker's log (stdout and stderr interleaved), oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerLogs {
    #[serde(default)]
    pub lines: Vec<String>,
    /// Nothing more follows: the log ended (the worker stopped) or nothing was followed.
    #[serde(default)]
    pub end: bool,
    /// Why there is no log (unknown worker, the runtime failed).
    #[serde(default)]
    pub error: Option<String>,
}
