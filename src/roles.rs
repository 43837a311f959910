//! The long-running process roles: `shoal control` and `shoal host`, and the connections
//! they (and `shoal dev`) make.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use shoal_actors::nats::Nats;
use shoal_actors::runtime::Runtime;
use shoal_actors::{control, host};
use shoal_gateway::GatewayConfig;
use tracing::info;

use crate::settings::{ConfigError, Settings};
use crate::shutdown::Shutdown;

/// Connects to NATS and makes sure every stream and bucket exists.
pub async fn connect(settings: &Settings, url: &str) -> Result<Nats> {
    let names = settings.names().map_err(ConfigError)?;
    Nats::connect(url, names, &settings.topology)
        .await
        .with_context(|| format!("connect to NATS at {url} and set up JetStream (is nats-server running, with -js?)"))
}

/// A plain client for the CLI commands: fails at once when no server answers.
pub async fn client(settings: &Settings) -> Result<async_nats::Client> {
    async_nats::ConnectOptions::new()
        .name("shoal-cli")
        .connection_timeout(Duration::from_secs(5))
        .connect(settings.nats.url.as_str())
        .await
        .with_context(|| {
            format!(
                "cannot connect to NATS at {} (is `shoal dev` or a nats-server running? set --nats or SHOAL_NATS__URL)",
                settings.nats.url
            )
        })
}

/// Flushes what is still buffered and closes the connection, so that nothing published
/// during shutdown is lost and the server sees a clean goodbye.
pub async fn close(client: &async_nats::Client) {
    if let Err(e) = client.flush().await {
        tracing::warn!(error = %e, "cannot flush the NATS connection");
    }
    if client.drain().await.is_ok() {
        // Once the drain is done the connection is closed and every command fails; the
        // connection state does not say so (it stays "connected").
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while client.flush().await.is_ok() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
    }
}

/// The runtime the host configuration names (`host.runtime.kind`: process by default).
pub async fn runtime(settings: &Settings) -> Result<Arc<dyn Runtime>> {
    let kind = settings.host.runtime.kind;
    settings.host.runtime.build().await.with_context(|| format!("set up the {kind:?} runtime (host.runtime.kind)"))
}

/// `shoal control`: serves the NATS API and runs endpoint actors until Ctrl-C or SIGTERM.
pub async fn control(settings: Settings) -> Result<()> {
    let mut shutdown = Shutdown::install()?;
    let nats = tokio::select! {
        nats = connect(&settings, &settings.nats.url) => nats?,
        signal = shutdown.wait() => {
            info!(signal, "stopped before the connection to NATS was made");
            return Ok(());
        }
    };
    let handle = control::start(nats.clone(), settings.control.clone()).await.context("start the control plane")?;
    info!(nats = %settings.nats.url, prefix = %settings.nats.prefix, "control plane running");
    let signal = shutdown.wait().await;
    info!(signal, "stopping the control plane");
    handle.stop().await;
    close(&nats.client).await;
    info!("control plane stopped");
    Ok(())
}

/// `shoal host`: runs the workers of the endpoints until Ctrl-C or SIGTERM, then stops them.
pub async fn host(settings: Settings) -> Result<()> {
    let mut shutdown = Shutdown::install()?;
    let nats = tokio::select! {
        nats = connect(&settings, &settings.nats.url) => nats?,
        signal = shutdown.wait() => {
            info!(signal, "stopped before the connection to NATS was made");
            return Ok(());
        }
    };
    let runtime = runtime(&settings).await?;
    let handle = host::start(nats.clone(), settings.host.clone(), runtime).await.context("start the host")?;
    info!(
        host_id = %handle.id,
        bridge_url = %handle.bridge_url,
        nats = %settings.nats.url,
        prefix = %settings.nats.prefix,
        "host running"
    );
    let signal = shutdown.wait().await;
    info!(signal, "stopping the host and its workers");
    handle.stop().await;
    close(&nats.client).await;
    info!("host stopped");
    Ok(())
}

/// `shoal gateway`: serves RunPod's HTTP API (`/v2/{endpoint}/...`) over the NATS API until
/// Ctrl-C or SIGTERM. Stateless: run as many as you like.
pub async fn gateway(settings: Settings, listen: Option<std::net::SocketAddr>) -> Result<()> {
    let mut shutdown = Shutdown::install()?;
    let nats = tokio::select! {
        nats = connect(&settings, &settings.nats.url) => nats?,
        signal = shutdown.wait() => {
            info!(signal, "stopped before the connection to NATS was made");
            return Ok(());
        }
    };
    let config = GatewayConfig { listen: listen.unwrap_or(settings.gateway.listen), ..settings.gateway.clone() };
    if !config.require_api_key {
        tracing::warn!("gateway.require_api_key is off: anyone who reaches the gateway can use every endpoint");
    }
    let handle = shoal_gateway::start(nats.clone(), config).await.context("start the gateway")?;
    info!(url = %handle.base_url(), nats = %settings.nats.url, prefix = %settings.nats.prefix, "gateway running");
    let signal = shutdown.wait().await;
    info!(signal, "stopping the gateway");
    handle.stop().await;
    close(&nats.client).await;
    info!("gateway stopped");
    Ok(())
}
