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
    pub started_at_ms: u64,
    pub heartbeat_at_ms: u64,
}

/// Stop a job a worker on this host runs: it was cancelled or timed out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopJob {
    pub endpoint: String,
    pub job_id: String,
    pub worker_id: String,
    pub reason: String,
}
