//! Values of the `shoal-leases` bucket: endpoint leases and control replica presence.

use serde::{Deserialize, Serialize};

/// `endpoint.<id>`: the control replica that owns the endpoint. The lease's epoch is the KV
/// revision at which it was created: it only grows, across owners.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub owner: String,
    pub epoch: u64,
    pub renewed_at_ms: u64,
}

/// `replica.<id>`: a live control replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaRecord {
    pub id: String,
    pub started_at_ms: u64,
    pub owned: u32,
}
