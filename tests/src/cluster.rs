//! More processes for one test's installation: extra control replicas and hosts on the same
//! NATS server, each with its own id, so tests can split endpoints, lose a replica or a host.

use std::sync::Arc;

use anyhow::Result;
use shoal_actors::control::{self, ControlConfig, ControlHandle};
use shoal_actors::host::{self, HostConfig, HostHandle};
use shoal_actors::nats::Nats;
use shoal_actors::runtime::Runtime;
use shoal_actors::runtime::process::ProcessRuntime;

use crate::fast_host_config;

/// A control replica with a fast tick.
pub async fn start_control(nats: &Nats, replica_id: &str) -> Result<ControlHandle> {
    let config = ControlConfig { tick_ms: 100, replica_id: Some(replica_id.to_string()), ..ControlConfig::default() };
    Ok(control::start(nats.clone(), config).await?)
}

/// A host with the process runtime; `tweak` sets fake GPUs, capacity...
pub async fn start_host(
    nats: &Nats,
    state_dir: &std::path::Path,
    id: &str,
    tweak: impl FnOnce(&mut HostConfig),
) -> Result<HostHandle> {
    start_host_with(nats, state_dir, id, Arc::new(ProcessRuntime), tweak).await
}

/// A host with the given runtime.
pub async fn start_host_with(
    nats: &Nats,
    state_dir: &std::path::Path,
    id: &str,
    runtime: Arc<dyn Runtime>,
    tweak: impl FnOnce(&mut HostConfig),
) -> Result<HostHandle> {
    let mut config = fast_host_config(state_dir);
    config.id = Some(id.to_string());
    tweak(&mut config);
    Ok(host::start(nats.clone(), config, runtime).await?)
}
