//! Runtimes: how a worker runs. The worker actor asks a [`Runtime`] to launch a worker and
//! gets a [`WorkerHandle`] to kill it and learn when it exits; it never knows which runtime
//! it talks to. [`process`] runs a local command (for `shoal dev` and tests), [`docker`] a
//! container of the endpoint's image (with warm starts), [`fake`] nothing at all (simulated
//! workers). [`RuntimeConfig`] chooses one from the host's configuration.

pub mod docker;
pub mod fake;
pub mod logs;
pub mod process;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use serde::Deserialize;
use shoal_protocol::endpoint::EndpointSpec;
use shoal_protocol::worker::StartPhases;
use tokio::sync::{mpsc, oneshot};

pub use logs::{LogQuery, LogStream};

/// Everything a runtime needs to launch one worker.
#[derive(Debug, Clone)]
pub struct Launch {
    pub worker_id: String,
    /// The host that runs it (the Docker runtime labels its containers with it).
    pub host_id: String,
    pub spec: EndpointSpec,
    /// The RunPod worker variables (bridge URLs, token, ids), added to the spec's env.
    pub env: BTreeMap<String, String>,
    /// The worker's stdout and stderr go here (process runtime).
    pub log_file: PathBuf,
    pub workdir: Option<PathBuf>,
    /// UUIDs of the GPUs given to the worker (the Docker runtime requests exactly these).
    pub gpus: Vec<String>,
    /// Progress of a long start (an image pull), one line at a time, for the worker's reason.
    pub progress: Option<mpsc::UnboundedSender<String>>,
    /// Tells the bridge, before a reused container starts, the identity it speaks with.
    pub on_identity: Option<IdentityHook>,
}

/// A callback a runtime calls with the identity a worker will speak with, when it is not
/// the launch's own, before the worker starts (so its first request is already routed).
#[derive(Clone)]
pub struct IdentityHook(Arc<dyn Fn(&BridgeIdentity) + Send + Sync>);

impl IdentityHook {
    pub fn new(f: impl Fn(&BridgeIdentity) + Send + Sync + 'static) -> IdentityHook {
        IdentityHook(Arc::new(f))
    }
    pub fn announce(&self, identity: &BridgeIdentity) {
        (self.0)(identity)
    }
}

impl std::fmt::Debug for IdentityHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IdentityHook")
    }
}

impl Launch {
    /// Reports a step of a long start; nobody listening is fine.
    pub fn progress(&self, line: impl Into<String>) {
        if let Some(tx) = &self.progress {
            let _ = tx.send(line.into());
        }
    }
}

/// How a worker ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    /// The exit code, if it exited on its own.
    pub code: Option<i32>,
    /// A one-line description: "exited with code 1", "killed by signal 9".
    pub description: String,
    /// The last lines of its log, for the Unhealthy reason.
    pub log_tail: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StartWorkerError {
    #[error("the endpoint has no {0} for this runtime")]
    NothingToRun(&'static str),
    #[error("cannot start the worker: {0}")]
    Io(#[from] std::io::Error),
    /// The image cannot be pulled or run: retrying soon will not help.
    #[error("{0}")]
    Image(String),
    /// The container engine failed (unreachable, out of resources...).
    #[error("{0}")]
    Engine(String),
    /// The worker ran but never asked for a job within the endpoint's init timeout.
    #[error("{0}")]
    InitTimeout(String),
}

impl StartWorkerError {
    /// A start that cannot succeed without a change (of the spec, the image, the registry), or
    /// took longer than the endpoint allows (RunPod: a cold start over 7 minutes is unhealthy):
    /// the worker is reported Unhealthy at once, and retried on the backoff schedule.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            StartWorkerError::NothingToRun(_) | StartWorkerError::Image(_) | StartWorkerError::InitTimeout(_)
        )
    }
}

/// The identity a worker speaks to the bridge with, when it is not its launch's own: a warm
/// container keeps the worker id and token in the environment it was created with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeIdentity {
    pub worker_id: String,
    pub token: String,
}

/// A launched worker: kill it, or wait for it to exit.
pub struct WorkerHandle {
    /// Process id or container id.
    pub runtime_ref: String,
    /// Warm or cold, and the time of the phases the runtime went through.
    pub start: StartPhases,
    pub bridge_identity: Option<BridgeIdentity>,
    pub(crate) kill: Option<oneshot::Sender<()>>,
    pub(crate) exit: Option<oneshot::Receiver<Exit>>,
}

impl WorkerHandle {
    pub fn new(runtime_ref: String, kill: oneshot::Sender<()>, exit: oneshot::Receiver<Exit>) -> Self {
        WorkerHandle {
            runtime_ref,
            start: StartPhases::default(),
            bridge_identity: None,
            kill: Some(kill),
            exit: Some(exit),
        }
    }
    pub fn with_start(mut self, start: StartPhases) -> Self {
        self.start = start;
        self
    }
    pub fn with_bridge_identity(mut self, identity: Option<BridgeIdentity>) -> Self {
        self.bridge_identity = identity;
        self
    }
    /// Kills the worker (and everything it started). Its exit still arrives.
    pub fn kill(&mut self) {
        if let Some(tx) = self.kill.take() {
            let _ = tx.send(());
        }
    }
    /// The exit notification; can be taken once.
    pub fn take_exit(&mut self) -> Option<oneshot::Receiver<Exit>> {
        self.exit.take()
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        self.kill();
    }
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// An endpoint version a runtime can start warm, on these GPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmKey {
    pub endpoint: String,
    pub version: u64,
    pub gpus: Vec<String>,
}

pub trait Runtime: Send + Sync + 'static {
    /// `process`, `docker`, `fake`.
    fn name(&self) -> &'static str;
    fn start(&self, launch: Launch) -> BoxFuture<'_, Result<WorkerHandle, StartWorkerError>>;

    /// Whether workers run in containers, which reach the bridge at the host's
    /// `container_bridge_url` rather than at its local address.
    fn in_containers(&self) -> bool {
        false
    }

    /// Called once when a host starts, before any worker: adopt or remove what an earlier run
    /// of the same host left behind. `bridge_url` is the bridge as this run's workers reach it.
    fn recover<'a>(&'a self, host_id: &'a str, bridge_url: &'a str) -> BoxFuture<'a, Result<(), String>> {
        let _ = (host_id, bridge_url);
        Box::pin(async { Ok(()) })
    }

    /// What could start warm now (FlashBoot), for the host record and GPU choice.
    fn warm(&self) -> Vec<WarmKey> {
        vec![]
    }

    /// Forgets the warm workers of an endpoint, except those of `keep_version`.
    fn discard_warm<'a>(&'a self, endpoint: &'a str, keep_version: Option<u64>) -> BoxFuture<'a, ()> {
        let _ = (endpoint, keep_version);
        Box::pin(async {})
    }

    /// A worker's log: its last lines, then (when following) new ones as they come. The
    /// default reads the worker's log file.
    fn logs(&self, query: LogQuery) -> BoxFuture<'_, Result<LogStream, String>> {
        Box::pin(async move { logs::file_lines(query).await })
    }

    /// Called when the host stops, after its workers: finish pending stops and remove what
    /// must not outlive the host.
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// Which runtime a host runs its workers with, and the settings of each
/// (`[host.runtime]`, `kind = "process" | "docker" | "fake"`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    pub kind: RuntimeKind,
    pub docker: docker::DockerConfig,
    pub fake: fake::FakeRuntime,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    /// A local command per worker (`command` of the endpoint).
    #[default]
    Process,
    /// A container of the endpoint's `image` per worker.
    Docker,
    /// Simulated workers, no process at all.
    Fake,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildRuntimeError {
    #[error("cannot use the Docker engine: {0}")]
    Docker(String),
}

impl RuntimeConfig {
    pub fn validate(&self) -> Result<(), String> {
        self.docker.validate().map_err(|e| format!("runtime.docker.{e}"))
    }

    /// The configured runtime; the Docker one checks that the engine answers.
    pub async fn build(&self) -> Result<Arc<dyn Runtime>, BuildRuntimeError> {
        Ok(match self.kind {
            RuntimeKind::Process => Arc::new(process::ProcessRuntime),
            RuntimeKind::Fake => Arc::new(self.fake.clone()),
            RuntimeKind::Docker => Arc::new(
                docker::DockerRuntime::connect(self.docker.clone())
                    .await
                    .map_err(|e| BuildRuntimeError::Docker(e.to_string()))?,
            ),
        })
    }
}
