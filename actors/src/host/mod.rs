//! A host: the host actor ([`host_actor`]) supervises one worker actor ([`worker_actor`]) per
//! worker, restarting failed ones under the [`backoff`] policy, and serves the worker bridge
//! ([`bridge`]), RunPod's worker HTTP protocol, to the workers it runs.

pub mod ack;
pub mod backoff;
pub mod bridge;
pub mod host_actor;
pub mod take;
pub mod worker_actor;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorRef};
use serde::Deserialize;

use crate::nats::Nats;
use crate::runtime::Runtime;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HostConfig {
    /// This host's id; default: the hostname plus a random suffix.
    pub id: Option<String>,
    /// Where the worker bridge listens.
    pub bridge_listen: SocketAddr,
    /// The bridge's base URL as workers reach it; default: from the bound address.
    pub bridge_url: Option<String>,
    /// How long job-take and job-stop long-polls are held before 204.
    pub hold_ms: u64,
    /// `RUNPOD_PING_INTERVAL` given to workers.
    pub ping_interval_ms: u64,
    /// After a stop (cancel, timeout), how long a worker may keep listing the job in its
    /// pings before its process is killed and replaced.
    pub stop_grace_ms: u64,
    /// JetStream ack wait of job deliveries; in-progress acks extend it while a job runs.
    pub ack_wait_ms: u64,
    pub heartbeat_ms: u64,
    /// Where worker logs go.
    pub state_dir: PathBuf,
    /// Working directory of process-runtime workers whose spec sets none.
    pub workdir: Option<PathBuf>,
    pub backoff: backoff::BackoffPolicy,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            id: None,
            bridge_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            bridge_url: None,
            hold_ms: 20_000,
            ping_interval_ms: 10_000,
            stop_grace_ms: 20_000,
            ack_wait_ms: 30_000,
            heartbeat_ms: 5_000,
            state_dir: std::env::temp_dir().join("shoal"),
            workdir: None,
            backoff: backoff::BackoffPolicy::default(),
        }
    }
}

impl HostConfig {
    pub fn validate(&self) -> Result<(), String> {
        if let Some(id) = &self.id {
            shoal_protocol::ids::validate_id("host.id", id).map_err(|e| e.message)?;
        }
        for (key, v) in [
            ("host.hold_ms", self.hold_ms),
            ("host.ack_wait_ms", self.ack_wait_ms),
            ("host.heartbeat_ms", self.heartbeat_ms),
        ] {
            if v == 0 {
                return Err(format!("{key}: must be above 0"));
            }
        }
        if self.ping_interval_ms < 1000 {
            return Err(format!(
                "host.ping_interval_ms: {} is below 1000; the runpod SDK would ping in a busy loop",
                self.ping_interval_ms
            ));
        }
        self.backoff.validate().map_err(|e| format!("host.backoff.{e}"))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartHostError {
    #[error("cannot bind the worker bridge on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("cannot start the host actor: {0}")]
    Spawn(#[from] ractor::SpawnErr),
    #[error("invalid host config: {0}")]
    Config(String),
}

/// A running host; [`HostHandle::stop`] stops its workers and the bridge.
pub struct HostHandle {
    pub id: String,
    pub bridge_url: String,
    actor: ActorRef<host_actor::HostMsg>,
    bridge: bridge::BridgeServer,
}

impl HostHandle {
    pub async fn stop(self) {
        let _ = ractor::call!(self.actor, host_actor::HostMsg::Shutdown);
        self.actor.stop(None);
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            while self.actor.get_status() != ractor::ActorStatus::Stopped {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        self.bridge.stop().await;
    }
}

fn default_host_id() -> String {
    let name = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    let clean: String = name.trim().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(40).collect();
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..6];
    if clean.is_empty() { format!("host-{suffix}") } else { format!("{clean}-{suffix}") }
}

/// Binds the bridge and starts the host actor, which starts the workers its endpoints need.
pub async fn start(nats: Nats, config: HostConfig, runtime: Arc<dyn Runtime>) -> Result<HostHandle, StartHostError> {
    config.validate().map_err(StartHostError::Config)?;
    let id = config.id.clone().unwrap_or_else(default_host_id);
    let registry = bridge::Registry::default();
    let bridge =
        bridge::BridgeServer::bind(config.bridge_listen, registry.clone(), Duration::from_millis(config.hold_ms))
            .await
            .map_err(|source| StartHostError::Bind { addr: config.bridge_listen, source })?;
    let bridge_url = config.bridge_url.clone().unwrap_or_else(|| format!("http://{}", bridge.local_addr()));
    let (actor, _) = Actor::spawn(
        None,
        host_actor::HostActor,
        host_actor::HostArgs { nats, id: id.clone(), bridge_url: bridge_url.clone(), registry, runtime, config },
    )
    .await?;
    Ok(HostHandle { id, bridge_url, actor, bridge })
}
