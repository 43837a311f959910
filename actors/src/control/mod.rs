//! The control plane: the NATS API service ([`api`]), the lease manager
//! ([`lease_manager`]) and, for each endpoint this replica owns, an endpoint actor
//! ([`endpoint_actor`]) with its scaler ([`scaler`]).
//!
//! Every `shoal control` replica serves the API in one queue group, so any replica answers
//! any request. Endpoints are shared among replicas by leases: exactly one replica runs an
//! endpoint's actors, and another takes over within the lease TTL when it dies. Endpoint
//! actors enforce deadlines (ttl, execution timeout) and count jobs; scalers size and place
//! workers. Decisions are pure ([`scaling`], [`placement`], [`lease`]); all record writes
//! are compare-and-set, so replicas that overlap during a handover cannot corrupt a record.

pub mod api;
pub mod endpoint_actor;
pub mod feeds;
pub mod hosts;
pub mod job_book;
mod job_list;
mod job_ops;
pub mod lease;
pub mod lease_manager;
mod owner_queries;
pub mod placement;
pub mod scaler;
pub mod scaling;
pub mod waiting;

use std::sync::Arc;
use std::time::Duration;

use ractor::ActorRef;
use serde::Deserialize;

use crate::nats::Nats;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControlConfig {
    /// How often endpoint actors check deadlines (ttl, execution timeout).
    pub tick_ms: u64,
    /// How often scalers tick (scale up past the first worker, idle timeouts, rolling
    /// updates, placing throttled workers); default: `min(1000, 5 × tick_ms)`. A job queued on an
    /// endpoint without workers wakes its scaler at once, whatever this is.
    pub scaler_tick_ms: Option<u64>,
    /// Largest accepted job input (encoded request), in bytes. NATS' own message limit
    /// (max_payload, 1 MiB by default) applies before this one.
    pub max_input_bytes: usize,
    /// Longest `wait_ms` a run or status request may ask for.
    pub max_wait_ms: u64,
    /// This replica's id; default: the hostname plus a random suffix.
    pub replica_id: Option<String>,
    /// How long results of `/run` jobs are kept after they end.
    pub run_retention_s: u64,
    /// How long results of `/runsync` jobs are kept after they end.
    pub sync_retention_s: u64,
    /// Webhook calls: signing secret, retries, timeouts.
    pub webhook: crate::webhook::WebhookConfig,
    /// Where Prometheus scrapes `/metrics`; none: no listener.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            tick_ms: 1000,
            scaler_tick_ms: None,
            max_input_bytes: 1024 * 1024,
            max_wait_ms: 300_000,
            replica_id: None,
            run_retention_s: shoal_protocol::job::DEFAULT_RETENTION_S,
            sync_retention_s: shoal_protocol::job::DEFAULT_SYNC_RETENTION_S,
            webhook: crate::webhook::WebhookConfig::default(),
            metrics_listen: None,
        }
    }
}

impl ControlConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.tick_ms == 0 {
            return Err("control.tick_ms: must be above 0".into());
        }
        if self.scaler_tick_ms == Some(0) {
            return Err("control.scaler_tick_ms: must be above 0".into());
        }
        if self.max_input_bytes == 0 {
            return Err("control.max_input_bytes: must be above 0".into());
        }
        if self.run_retention_s == 0 || self.sync_retention_s == 0 {
            return Err(
                "control.run_retention_s, control.sync_retention_s: must be at least 1 (NATS' shortest TTL)".into()
            );
        }
        if let Some(id) = &self.replica_id {
            // it names NATS subjects (owner queries) and lease keys
            shoal_protocol::ids::validate_id("control.replica_id", id).map_err(|e| e.message)?;
        }
        self.webhook.validate()
    }

    /// How often scalers tick.
    pub fn scaler_tick(&self) -> Duration {
        match self.scaler_tick_ms {
            Some(ms) => Duration::from_millis(ms),
            None => Duration::from_millis(1000).min(Duration::from_millis(self.tick_ms) * 5),
        }
    }
}

/// Work a replica does for many endpoints at once when it starts or takes endpoints over
/// (reading their records, starting their workers): bounded, so that the replica's memory
/// does not peak with the number of endpoints it owns (freed memory mostly stays in the
/// process, so the peak is what it keeps).
#[derive(Debug)]
pub struct Limits {
    /// History reads in flight (each a short-lived watch).
    pub history_reads: tokio::sync::Semaphore,
    /// Scalers sending start commands at once (each sends all of its tick's starts).
    pub starting: tokio::sync::Semaphore,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { history_reads: tokio::sync::Semaphore::new(32), starting: tokio::sync::Semaphore::new(64) }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartControlError {
    #[error("cannot start the NATS API service: {0}")]
    Service(String),
    #[error("cannot start the lease manager: {0}")]
    Manager(#[from] ractor::SpawnErr),
    #[error("cannot watch the hosts: {0}")]
    Hosts(String),
    #[error("cannot watch the {0} records: {1}")]
    Feed(&'static str, feeds::HistoryError),
    #[error("cannot serve owner queries: {0}")]
    OwnerQueries(async_nats::SubscribeError),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot start the webhook dispatcher: {0}")]
    Webhooks(#[from] crate::webhook::StartDispatcherError),
    #[error("cannot listen for metrics on {0}: {1}")]
    Metrics(std::net::SocketAddr, std::io::Error),
}

/// A running control plane; [`ControlHandle::stop`] shuts it down.
pub struct ControlHandle {
    manager: ActorRef<lease_manager::LeaseMsg>,
    api: api::ApiHandle,
    hosts_watch: tokio::task::JoinHandle<()>,
    /// The record feeds and the owner query server.
    tasks: Vec<tokio::task::JoinHandle<()>>,
    webhooks: crate::webhook::Dispatcher,
    pub replica_id: String,
    /// The `/metrics` listener, when `metrics_listen` is set.
    pub metrics: Option<crate::metrics::MetricsServer>,
}

impl ControlHandle {
    /// Dies as a crashed process would: no lease is released, nothing is cleaned up (for
    /// failover tests and drills).
    pub async fn abort(self) {
        self.api.stop().await;
        self.manager.kill();
        self.hosts_watch.abort();
        self.tasks.iter().for_each(|t| t.abort());
    }

    pub async fn stop(self) {
        self.api.stop().await;
        self.manager.stop(None);
        self.hosts_watch.abort();
        self.webhooks.stop();
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while self.manager.get_status() != ractor::ActorStatus::Stopped {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        self.tasks.iter().for_each(|t| t.abort());
    }
}

/// Starts the lease manager (which starts the endpoint actors of the endpoints this replica
/// comes to own) and the API service.
pub async fn start(nats: Nats, config: ControlConfig) -> Result<ControlHandle, StartControlError> {
    config.validate().map_err(StartControlError::Config)?;
    let replica_id = config.replica_id.clone().unwrap_or_else(|| crate::host::default_id("control"));
    let metrics = match config.metrics_listen {
        Some(addr) => {
            Some(crate::metrics::MetricsServer::bind(addr).await.map_err(|e| StartControlError::Metrics(addr, e))?)
        }
        None => None,
    };
    let directory = lease_manager::Directory::default();
    let (hosts, hosts_watch) = hosts::HostDirectory::watch(&nats, nats.topology.host_ttl_s * 1000)
        .await
        .map_err(|e| StartControlError::Hosts(e.to_string()))?;
    // one live feed per kind of record for all the endpoints this replica will own, started before
    // it owns any (see feeds)
    let jobs_feed = feeds::route_job_events(Arc::new(nats.clone()), directory.clone())
        .await
        .map_err(|e| StartControlError::Feed("job", e.into()))?;
    let workers_feed = feeds::route(nats.workers.clone(), directory.clone(), endpoint_actor::EndpointMsg::WorkerLive)
        .await
        .map_err(|e| StartControlError::Feed("worker", e))?;
    let queries =
        owner_queries::serve(&nats, &replica_id, directory.clone()).await.map_err(StartControlError::OwnerQueries)?;
    let tasks = vec![jobs_feed, workers_feed, queries];
    let args = lease_manager::LeaseArgs {
        nats: nats.clone(),
        config: config.clone(),
        directory: directory.clone(),
        hosts,
        limits: Arc::new(Limits::default()),
        replica_id: replica_id.clone(),
        lease_ttl: Duration::from_secs(nats.topology.lease_ttl_s.max(1)),
    };
    let (manager, _) = crate::spawn::spawn(lease_manager::LeaseManager, args).await?;
    let webhooks = crate::webhook::start(nats.clone(), config.webhook.clone()).await?;
    let api = api::start(nats, config, directory).await.map_err(|e| StartControlError::Service(e.to_string()))?;
    Ok(ControlHandle { manager, api, hosts_watch, tasks, webhooks, replica_id, metrics })
}
