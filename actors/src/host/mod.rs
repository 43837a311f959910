//! A host: the host actor ([`host_actor`]) supervises one worker actor ([`worker_actor`]) per
//! worker, restarting failed ones under the [`backoff`] policy, and serves the worker bridge
//! ([`bridge`]), RunPod's worker HTTP protocol, to the workers it runs.

pub mod ack;
pub mod backoff;
pub mod bridge;
pub mod gpus;
pub mod host_actor;
pub mod logs;
mod recover;
pub mod take;
pub mod worker_actor;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ractor::ActorRef;
use serde::Deserialize;

use crate::nats::Nats;
use crate::runtime::{Runtime, RuntimeConfig};

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HostConfig {
    /// This host's id; default: the hostname plus a random suffix.
    pub id: Option<String>,
    /// Where the worker bridge listens.
    pub bridge_listen: SocketAddr,
    /// The bridge's base URL as workers reach it; default: from the bound address.
    pub bridge_url: Option<String>,
    /// The bridge's base URL as workers in containers (Docker runtime) reach it; default:
    /// `http://host.docker.internal:<bridge port>`, that name being mapped to the host's
    /// gateway in every container. The bridge must then listen where containers reach it
    /// (`bridge_listen = "0.0.0.0:<port>"`). In a compose deployment: the host's service name.
    pub container_bridge_url: Option<String>,
    /// How workers run: `[host.runtime] kind = "process" | "docker" | "fake"`, with the
    /// settings of each (`[host.runtime.docker]`, `[host.runtime.fake]`).
    pub runtime: RuntimeConfig,
    /// How long job-take and job-stop long-polls are held before 204.
    pub hold_ms: u64,
    /// `RUNPOD_PING_INTERVAL` given to workers.
    pub ping_interval_ms: u64,
    /// After a stop (cancel, timeout), how long a worker may keep listing the job in its
    /// pings before its process is killed and replaced.
    pub stop_grace_ms: u64,
    /// JetStream ack wait of job deliveries; in-progress acks extend it while a job runs.
    pub ack_wait_ms: u64,
    /// How long after its take a job that still runs has its start (IN_PROGRESS, the worker,
    /// the attempt) written to its record; 0: at the take, before the worker gets the job. A
    /// job that ends sooner is recorded once, with its result: one stored write, its ack and
    /// the started event fewer per job, and the job reaches its worker one round trip sooner
    /// (BENCHMARKS.md series 20). Until then the job reads as IN_QUEUE; a cancel or time-out
    /// in that time stops it when the start is written.
    pub start_record_ms: u64,
    pub heartbeat_ms: u64,
    /// Where worker logs go.
    pub state_dir: PathBuf,
    /// Working directory of process-runtime workers whose spec sets none.
    pub workdir: Option<PathBuf>,
    pub backoff: backoff::BackoffPolicy,
    /// A simulated GPU inventory, e.g. `"NVIDIA H200:2,NVIDIA A100 80GB:1"`, for hosts
    /// without GPUs (tests, placement trials).
    pub fake_gpus: Option<String>,
    /// Most GPU-less workers this host runs; 0 = no limit.
    pub max_workers: u32,
    /// Where Prometheus scrapes `/metrics`; none: no listener.
    pub metrics_listen: Option<SocketAddr>,
    /// `[host.labels]`: what this host is (`datacenter = "eu-1"`, `network = "ib"`); endpoints
    /// that set `host_labels` run only on hosts carrying all of theirs.
    pub labels: std::collections::BTreeMap<String, String>,
    /// The newest CUDA version the driver supports (`"12.4"`), for endpoints that set
    /// `min_cuda_version`; default: read through NVML (none on a CPU host).
    pub cuda_version: Option<String>,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            id: None,
            bridge_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            bridge_url: None,
            container_bridge_url: None,
            runtime: RuntimeConfig::default(),
            hold_ms: 20_000,
            ping_interval_ms: 10_000,
            stop_grace_ms: 20_000,
            ack_wait_ms: 30_000,
            start_record_ms: 100,
            heartbeat_ms: 5_000,
            state_dir: std::env::temp_dir().join("shoal"),
            workdir: None,
            backoff: backoff::BackoffPolicy::default(),
            fake_gpus: None,
            max_workers: 0,
            metrics_listen: None,
            labels: Default::default(),
            cuda_version: None,
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
        if self.start_record_ms > 10_000 || self.start_record_ms >= self.ack_wait_ms {
            return Err(format!(
                "host.start_record_ms: {} is above 10000 or not below host.ack_wait_ms ({}); a running job \
                 would read as queued too long",
                self.start_record_ms, self.ack_wait_ms
            ));
        }
        if self.ping_interval_ms < 1000 {
            return Err(format!(
                "host.ping_interval_ms: {} is below 1000; the runpod SDK would ping in a busy loop",
                self.ping_interval_ms
            ));
        }
        for (key, value) in &self.labels {
            shoal_protocol::endpoint::check_label(key, value).map_err(|e| format!("host.labels: {e}"))?;
        }
        if let Some(v) = &self.cuda_version
            && shoal_protocol::endpoint::parse_cuda_version(v).is_none()
        {
            return Err(format!("host.cuda_version: {v:?} is not a CUDA version like \"12.4\""));
        }
        if let Some(spec) = &self.fake_gpus {
            parse_fake_gpus(spec).map_err(|e| format!("host.fake_gpus: {e}"))?;
        }
        if let Some(url) = &self.container_bridge_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(format!("host.container_bridge_url: {url:?} is not an http:// URL"));
        }
        self.runtime.validate().map_err(|e| format!("host.{e}"))?;
        self.backoff.validate().map_err(|e| format!("host.backoff.{e}"))
    }

    /// The simulated GPU inventory of `fake_gpus`, else none (the real one is read through
    /// NVML by [`gpus::GpuInventory`]).
    pub fn gpus(&self) -> Vec<shoal_protocol::host::Gpu> {
        self.fake_gpus.as_deref().and_then(|s| parse_fake_gpus(s).ok()).unwrap_or_default()
    }
}

/// Parses `"NAME:COUNT,NAME:COUNT"` into fake GPUs with stable UUIDs.
pub fn parse_fake_gpus(spec: &str) -> Result<Vec<shoal_protocol::host::Gpu>, String> {
    let mut gpus = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, count) = part.rsplit_once(':').ok_or_else(|| format!("{part:?} is not NAME:COUNT"))?;
        let count: usize = count.trim().parse().map_err(|_| format!("{part:?}: the count is not a number"))?;
        if name.trim().is_empty() || count == 0 || count > 64 {
            return Err(format!("{part:?}: needs a name and a count in 1..=64"));
        }
        for _ in 0..count {
            let n = gpus.len();
            gpus.push(shoal_protocol::host::Gpu {
                name: name.trim().to_string(),
                uuid: format!("GPU-fake-{n}"),
                memory_mb: 0,
                healthy: true,
                worker_id: None,
                utilization_pct: None,
                error: None,
            });
        }
    }
    Ok(gpus)
}

#[cfg(test)]
mod tests {
    #[test]
    fn fake_gpus_parse_and_refuse_nonsense() {
        let g = super::parse_fake_gpus("NVIDIA H200:2, NVIDIA A100 80GB:1").expect("valid");
        assert_eq!(g.len(), 3);
        assert_eq!(g[2].name, "NVIDIA A100 80GB");
        assert!(g.iter().all(|g| g.healthy && g.worker_id.is_none()));
        for bad in ["H200", "H200:x", ":2", "H200:0"] {
            assert!(super::parse_fake_gpus(bad).is_err(), "{bad}");
        }
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
    #[error("cannot recover what this host left behind: {0}")]
    Recover(String),
    #[error("cannot listen for metrics on {0}: {1}")]
    Metrics(SocketAddr, std::io::Error),
}

/// A running host; [`HostHandle::stop`] stops its workers and the bridge.
pub struct HostHandle {
    pub id: String,
    pub bridge_url: String,
    actor: ActorRef<host_actor::HostMsg>,
    bridge: bridge::BridgeServer,
    /// The `/metrics` listener, when `metrics_listen` is set.
    pub metrics: Option<crate::metrics::MetricsServer>,
}

impl HostHandle {
    /// Dies as a crashed machine would: workers killed, no record cleaned up, no job handed
    /// back (their deliveries expire and JetStream redelivers them).
    pub async fn abort(self) {
        self.actor.kill();
        self.bridge.stop().await;
    }

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

/// The bridge's base URL as this host's workers reach it: the local one for processes; for
/// containers, `container_bridge_url`, else the host's gateway alias on the bridge's port.
fn worker_bridge_url(config: &HostConfig, runtime: &dyn Runtime, local_url: &str, port: u16) -> String {
    if !runtime.in_containers() {
        return local_url.to_string();
    }
    if config.container_bridge_url.is_none() && config.bridge_listen.ip().is_loopback() {
        tracing::warn!(
            bridge_listen = %config.bridge_listen,
            "the worker bridge listens on loopback, which containers cannot reach: set host.bridge_listen to 0.0.0.0:<port>"
        );
    }
    config
        .container_bridge_url
        .clone()
        .unwrap_or_else(|| format!("http://{}:{port}", crate::runtime::docker::HOST_ALIAS))
        .trim_end_matches('/')
        .to_string()
}

/// Drains the host `host` (its workers finish their jobs and stop; it takes no new worker) or
/// resumes it, asking the host itself. An error says what went wrong: no such host answering,
/// or the host's refusal.
pub async fn set_draining(
    client: &async_nats::Client,
    names: &shoal_protocol::names::Names,
    host: &str,
    draining: bool,
) -> Result<(), String> {
    use shoal_protocol::codec::{from_msgpack, to_msgpack};
    use shoal_protocol::host::{CommandReply, DrainHost};
    shoal_protocol::ids::validate_id("host id", host).map_err(|e| e.message)?;
    let bytes = to_msgpack(&DrainHost { draining }).map_err(|e| e.to_string())?;
    let asked = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        client.request(names.host_drain_subject(host), bytes::Bytes::from(bytes)),
    )
    .await;
    let msg = match asked {
        Ok(Ok(msg)) => msg,
        Ok(Err(_)) | Err(_) => {
            return Err(format!("host {host} does not answer (is it running? `shoal hosts` lists them)"));
        }
    };
    let reply: CommandReply = from_msgpack(&msg.payload).map_err(|e| format!("host {host} answered: {e}"))?;
    match reply.error {
        Some(e) if !reply.ok => Err(format!("host {host} refused: {e}")),
        _ => Ok(()),
    }
}

/// An id for a process: the hostname plus a random suffix (`<fallback>-<suffix>` without one).
pub fn default_id(fallback: &str) -> String {
    let name = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    let clean: String = name.trim().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(40).collect();
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..6];
    if clean.is_empty() { format!("{fallback}-{suffix}") } else { format!("{clean}-{suffix}") }
}

/// Binds the bridge and starts the host actor, which starts the workers its endpoints need.
pub async fn start(nats: Nats, config: HostConfig, runtime: Arc<dyn Runtime>) -> Result<HostHandle, StartHostError> {
    config.validate().map_err(StartHostError::Config)?;
    let id = config.id.clone().unwrap_or_else(|| default_id("host"));
    let metrics = match config.metrics_listen {
        Some(addr) => {
            Some(crate::metrics::MetricsServer::bind(addr).await.map_err(|e| StartHostError::Metrics(addr, e))?)
        }
        None => None,
    };
    let registry = bridge::Registry::default();
    let bridge =
        bridge::BridgeServer::bind(config.bridge_listen, registry.clone(), Duration::from_millis(config.hold_ms))
            .await
            .map_err(|source| StartHostError::Bind { addr: config.bridge_listen, source })?;
    let local_url = config.bridge_url.clone().unwrap_or_else(|| format!("http://{}", bridge.local_addr()));
    let bridge_url = worker_bridge_url(&config, &*runtime, &local_url, bridge.local_addr().port());
    if let Err(e) = runtime.recover(&id, &bridge_url).await {
        bridge.stop().await;
        return Err(StartHostError::Recover(e));
    }
    recover::forget_workers_left_behind(&nats, &id).await;
    let (actor, _) = crate::spawn::spawn(
        host_actor::HostActor,
        host_actor::HostArgs { nats, id: id.clone(), bridge_url: bridge_url.clone(), registry, runtime, config },
    )
    .await?;
    Ok(HostHandle { id, bridge_url, actor, bridge, metrics })
}
