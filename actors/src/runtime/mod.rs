//! Runtimes: how a worker runs. The worker actor asks a [`Runtime`] to launch a worker and
//! gets a [`WorkerHandle`] to kill it and learn when it exits; it never knows which runtime
//! it talks to. [`process`] runs a local command (for `shoal dev` and tests); Docker comes next.

pub mod fake;
pub mod process;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use shoal_protocol::endpoint::EndpointSpec;
use tokio::sync::oneshot;

/// Everything a runtime needs to launch one worker.
#[derive(Debug, Clone)]
pub struct Launch {
    pub worker_id: String,
    pub spec: EndpointSpec,
    /// The RunPod worker variables (bridge URLs, token, ids), added to the spec's env.
    pub env: BTreeMap<String, String>,
    /// The worker's stdout and stderr go here.
    pub log_file: PathBuf,
    pub workdir: Option<PathBuf>,
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
}

/// A launched worker: kill it, or wait for it to exit.
pub struct WorkerHandle {
    /// Process id or container id.
    pub runtime_ref: String,
    pub(crate) kill: Option<oneshot::Sender<()>>,
    pub(crate) exit: Option<oneshot::Receiver<Exit>>,
}

impl WorkerHandle {
    pub fn new(runtime_ref: String, kill: oneshot::Sender<()>, exit: oneshot::Receiver<Exit>) -> Self {
        WorkerHandle { runtime_ref, kill: Some(kill), exit: Some(exit) }
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

pub trait Runtime: Send + Sync + 'static {
    /// `process`, `docker`, `fake`.
    fn name(&self) -> &'static str;
    fn start(&self, launch: Launch) -> BoxFuture<'_, Result<WorkerHandle, StartWorkerError>>;
}
