//! shoal-gateway: RunPod's HTTP API (`/v2/{endpoint}/run`, `/runsync`, `/status/{id}`,
//! `/stream/{id}`, `/cancel/{id}`, `/retry/{id}`, `/purge-queue`, `/health`, `/requests`) over shoal's NATS
//! API, so the runpod SDK's `Endpoint` client, and anyone with curl, can use shoal unchanged.
//!
//! The gateway is stateless: every request becomes one request to the control plane (through
//! [`shoal_actors::client::ApiClient`]), so any number of gateways can stand behind a load
//! balancer. What it adds on the way:
//! - **API keys** ([`keys`]): `Authorization: Bearer <key>` or the bare key, checked against
//!   the `shoal-keys` bucket before the body is read; a key may be scoped to endpoints.
//! - **RunPod's shapes** ([`shoal_protocol::runpod`]): camelCase bodies, milliseconds,
//!   `{"error": "..."}` for every error, the status codes of shared/reference/runpod.md.
//! - **Rate limits** ([`limits`]): RunPod's requests per 10 s and requests at once, per
//!   endpoint and operation, counted by each gateway; over them, 429 with `Retry-After`.
//! - **A dashboard** (`dashboard`) at `/dashboard`: workers, queue and latency charts, recent
//!   jobs and dead letters, read with the same API keys.
//! - **Large payloads**: an input above the inline limit is stored in the `shoal-blobs` object
//!   store first (the run request then carries `input_ref`), and an output stored there by the
//!   host is read back before it is returned.
//!
//! It must not depend on anything but the NATS API and the buckets it reads (keys, blobs): no
//! endpoint or job state lives here.

mod dashboard;
pub mod keys;
pub mod limits;
mod routes;

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;
use shoal_actors::client::ApiClient;
use shoal_actors::nats::Nats;
use tokio::sync::oneshot;

pub use routes::router;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Where the HTTP API listens.
    pub listen: SocketAddr,
    /// Whether requests need an API key (keys are managed with `shoal keys`). Turn off only
    /// behind something else that authenticates.
    pub require_api_key: bool,
    /// Largest `/run` body (RunPod: 10 MB).
    pub max_run_bytes: usize,
    /// Largest `/runsync` body (RunPod: 20 MB).
    pub max_runsync_bytes: usize,
    /// Longest wait for the control plane's answer (on top of a `/runsync` wait).
    pub request_timeout_ms: u64,
    /// Requests per 10 s and at once, per endpoint and operation, on this gateway.
    pub rate_limits: limits::RateLimits,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            require_api_key: true,
            max_run_bytes: 10_000_000,
            max_runsync_bytes: 20_000_000,
            request_timeout_ms: 10_000,
            rate_limits: limits::RateLimits::default(),
        }
    }
}

impl GatewayConfig {
    pub fn validate(&self) -> Result<(), String> {
        for (key, v) in
            [("gateway.max_run_bytes", self.max_run_bytes), ("gateway.max_runsync_bytes", self.max_runsync_bytes)]
        {
            if v == 0 {
                return Err(format!("{key}: must be above 0"));
            }
        }
        if self.request_timeout_ms == 0 {
            return Err("gateway.request_timeout_ms: must be above 0".into());
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartGatewayError {
    #[error("invalid gateway config: {0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

/// What the handlers share.
#[derive(Clone)]
pub(crate) struct Gateway {
    pub nats: Nats,
    pub api: ApiClient,
    pub config: GatewayConfig,
    pub limiter: std::sync::Arc<limits::Limiter>,
}

/// A running gateway; [`GatewayHandle::stop`] stops it.
pub struct GatewayHandle {
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl GatewayHandle {
    /// The bound address (the port is chosen when `listen` has port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL of RunPod's API, as the runpod SDK wants it (`RUNPOD_ENDPOINT_BASE_URL`).
    pub fn base_url(&self) -> String {
        format!("http://{}/v2", self.addr)
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if tokio::time::timeout(Duration::from_secs(5), &mut self.task).await.is_err() {
            self.task.abort();
        }
    }
}

/// Binds `config.listen` and serves the API until stopped.
pub async fn start(nats: Nats, config: GatewayConfig) -> Result<GatewayHandle, StartGatewayError> {
    config.validate().map_err(StartGatewayError::Config)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| StartGatewayError::Bind { addr: config.listen, source })?;
    let addr = listener.local_addr().map_err(|source| StartGatewayError::Bind { addr: config.listen, source })?;
    let app = router(nats, config);
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app).with_graceful_shutdown(async move {
            let _ = rx.await;
        });
        if let Err(e) = served.await {
            tracing::error!(error = %e, "gateway stopped");
        }
    });
    tracing::info!(%addr, "gateway listening");
    Ok(GatewayHandle { addr, shutdown: Some(tx), task })
}
