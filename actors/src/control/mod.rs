//! The control plane: the NATS API service ([`api`]), the endpoint manager ([`manager`])
//! and one endpoint actor per endpoint ([`endpoint_actor`]).
//!
//! Every `shoal control` replica serves the API in one queue group, so any replica answers
//! any request. Endpoint actors enforce deadlines (ttl, execution timeout) and count jobs;
//! all their writes are compare-and-set, so replicas that overlap cannot corrupt a record.

pub mod api;
pub mod endpoint_actor;
mod job_ops;
pub mod manager;
pub mod placement;
pub mod scaling;

use std::time::Duration;

use ractor::{Actor, ActorRef};
use serde::Deserialize;

use crate::nats::Nats;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControlConfig {
    /// How often endpoint actors check deadlines (ttl, execution timeout).
    pub tick_ms: u64,
    /// Largest accepted job input (encoded request), in bytes. NATS' own message limit
    /// (max_payload, 1 MiB by default) applies before this one.
    pub max_input_bytes: usize,
    /// Longest `wait_ms` a run or status request may ask for.
    pub max_wait_ms: u64,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig { tick_ms: 1000, max_input_bytes: 1024 * 1024, max_wait_ms: 300_000 }
    }
}

impl ControlConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.tick_ms == 0 {
            return Err("control.tick_ms: must be above 0".into());
        }
        if self.max_input_bytes == 0 {
            return Err("control.max_input_bytes: must be above 0".into());
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartControlError {
    #[error("cannot start the NATS API service: {0}")]
    Service(String),
    #[error("cannot start the endpoint manager: {0}")]
    Manager(#[from] ractor::SpawnErr),
}

/// A running control plane; [`ControlHandle::stop`] shuts it down.
pub struct ControlHandle {
    manager: ActorRef<manager::ManagerMsg>,
    api: api::ApiHandle,
}

impl ControlHandle {
    pub async fn stop(self) {
        self.api.stop().await;
        self.manager.stop(None);
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while self.manager.get_status() != ractor::ActorStatus::Stopped {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }
}

/// Starts the endpoint manager and the API service.
pub async fn start(nats: Nats, config: ControlConfig) -> Result<ControlHandle, StartControlError> {
    let directory = manager::Directory::default();
    let args = manager::ManagerArgs { nats: nats.clone(), config: config.clone(), directory: directory.clone() };
    let (manager, _) = Actor::spawn(None, manager::Manager, args).await?;
    let api = api::start(nats, config, directory).await.map_err(|e| StartControlError::Service(e.to_string()))?;
    Ok(ControlHandle { manager, api })
}
