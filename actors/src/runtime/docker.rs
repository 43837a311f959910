//! The Docker runtime (bollard): a worker is a container of the endpoint's image.
//!
//! - **Start**: a warm container of the same endpoint version is started when the pool has
//!   one ([`pool`]); otherwise the image is pulled when missing (progress goes to the
//!   worker's reason), a container is created ([`spec`]: env, volumes, limits, GPUs by UUID,
//!   labels) and started. Each phase is timed, and the start is reported warm or cold.
//! - **Exit**: a watcher waits for the container. When it exits on its own, its last log lines
//!   go into the worker's exit (and so into its Unhealthy reason); when the worker is killed,
//!   the container is stopped. Either way the stopped container is kept warm (bounded per
//!   endpoint version, only with `flashboot`) or removed.
//! - **Recovery**: every container carries labels (host, endpoint, version, worker, GPUs,
//!   bridge URL), so a host that restarts finds what it left behind: running containers are
//!   stopped, then kept warm when they still fit, else removed. Nothing runs twice.
//! - **Shutdown**: pending stops finish, then the host's containers are removed (unless
//!   `keep_warm_on_shutdown`), so a stopped host leaves nothing behind.

mod pool;
mod spec;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::models::ContainerSummaryStateEnum;
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, ListContainersOptions, LogsOptions, RemoveContainerOptions,
    StopContainerOptions, WaitContainerOptions,
};
use futures::{StreamExt, stream};
use serde::Deserialize;
use shoal_protocol::worker::StartPhases;
use tokio::sync::{oneshot, watch};

pub use spec::{
    HOST_ALIAS, LABEL_BRIDGE, LABEL_ENDPOINT, LABEL_FLASHBOOT, LABEL_GPUS, LABEL_HOST, LABEL_MANAGED, LABEL_VERSION,
    LABEL_WORKER, NETWORK_VOLUME_TARGET, normalize_image,
};

use super::logs::{LogQuery, LogStream, last_lines};
use super::{BoxFuture, BridgeIdentity, Exit, Launch, Runtime, StartWorkerError, WarmKey, WorkerHandle};
use pool::{Want, Warm, WarmPool};

/// The engine when neither the configuration nor `$DOCKER_HOST` names one.
pub const DEFAULT_DOCKER_HOST: &str = "unix:///var/run/docker.sock";
/// Lines of a crashed container's log that go into its exit.
const EXIT_LOG_LINES: usize = 5;

/// `[host.runtime.docker]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DockerConfig {
    /// The Docker engine: `unix:///var/run/docker.sock` or `tcp://host:2375`; default:
    /// `$DOCKER_HOST`, else the local socket.
    pub host: Option<String>,
    /// The Docker network worker containers join; default: Docker's default bridge. In a
    /// compose deployment, the network the host's own container is on, so workers reach its
    /// bridge by service name.
    pub network: Option<String>,
    /// Stopped containers kept per endpoint version for warm starts (FlashBoot); 0 = none.
    pub warm_per_version: u32,
    /// Seconds between SIGTERM and SIGKILL when a worker's container is stopped.
    pub stop_timeout_s: u32,
    /// Run an init process (Docker's `--init`) as PID 1 of each worker, so SIGTERM reaches
    /// the worker and its children are reaped.
    pub init: bool,
    /// Keep warm containers when the host stops (a host coming back with the same id and
    /// bridge URL adopts them); by default a stopped host removes all its containers.
    pub keep_warm_on_shutdown: bool,
    /// Longest image pull.
    pub pull_timeout_s: u64,
}

impl Default for DockerConfig {
    fn default() -> Self {
        DockerConfig {
            host: None,
            network: None,
            warm_per_version: 2,
            stop_timeout_s: 10,
            init: true,
            keep_warm_on_shutdown: false,
            pull_timeout_s: 1800,
        }
    }
}

impl DockerConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.warm_per_version > 64 {
            return Err(format!("warm_per_version: {} is above 64", self.warm_per_version));
        }
        if self.stop_timeout_s > 3600 {
            return Err(format!("stop_timeout_s: {} is above 3600", self.stop_timeout_s));
        }
        if self.pull_timeout_s == 0 {
            return Err("pull_timeout_s: must be above 0".into());
        }
        if self.network.as_deref().is_some_and(|n| n.trim().is_empty()) {
            return Err("network: must not be empty".into());
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectDockerError {
    #[error("cannot reach the Docker engine at {host}: {source}")]
    Unreachable { host: String, source: DockerError },
}

/// The Docker runtime; cheap to clone.
#[derive(Clone)]
pub struct DockerRuntime {
    inner: Arc<Inner>,
}

struct Inner {
    docker: Docker,
    config: DockerConfig,
    pool: Mutex<WarmPool>,
    /// Worker id → its current (or last, while kept warm) container, for logs.
    containers: Mutex<HashMap<String, String>>,
    /// The host these containers belong to (known from the first launch or the recovery).
    host_id: Mutex<Option<String>>,
    /// Watchers alive: the host's shutdown waits for their stops and removals.
    busy: watch::Sender<usize>,
}

/// What a container was made for, to keep it warm when it stops.
#[derive(Debug, Clone)]
struct Made {
    endpoint: String,
    version: u64,
    gpus: Vec<String>,
    bridge: String,
    identity: BridgeIdentity,
    flashboot: bool,
}

impl DockerRuntime {
    /// Connects to the engine and agrees on an API version; fails when the engine does not
    /// answer.
    pub async fn connect(config: DockerConfig) -> Result<DockerRuntime, ConnectDockerError> {
        let host = config
            .host
            .clone()
            .or_else(|| std::env::var("DOCKER_HOST").ok())
            .unwrap_or_else(|| DEFAULT_DOCKER_HOST.to_string());
        let unreachable = |source| ConnectDockerError::Unreachable { host: host.clone(), source };
        let docker = Docker::connect_with_host(&host).map_err(unreachable)?;
        let docker = docker.negotiate_version().await.map_err(unreachable)?;
        let per_version = config.warm_per_version as usize;
        let (busy, _) = watch::channel(0);
        Ok(DockerRuntime {
            inner: Arc::new(Inner {
                docker,
                config,
                pool: Mutex::new(WarmPool::new(per_version)),
                containers: Mutex::new(HashMap::new()),
                host_id: Mutex::new(None),
                busy,
            }),
        })
    }
}

impl Runtime for DockerRuntime {
    fn name(&self) -> &'static str {
        "docker"
    }

    fn start(&self, launch: Launch) -> BoxFuture<'_, Result<WorkerHandle, StartWorkerError>> {
        let inner = self.inner.clone();
        Box::pin(async move { inner.start(launch).await })
    }

    fn in_containers(&self) -> bool {
        true
    }

    fn recover<'a>(&'a self, host_id: &'a str, bridge_url: &'a str) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(self.inner.recover(host_id, bridge_url))
    }

    fn warm(&self) -> Vec<WarmKey> {
        lock(&self.inner.pool)
            .entries()
            .iter()
            .map(|w| WarmKey { endpoint: w.endpoint.clone(), version: w.version, gpus: w.gpus.clone() })
            .collect()
    }

    fn discard_warm<'a>(&'a self, endpoint: &'a str, keep_version: Option<u64>) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let gone = lock(&self.inner.pool).discard(endpoint, keep_version);
            for id in gone {
                self.inner.remove(&id).await;
            }
        })
    }

    fn logs(&self, query: LogQuery) -> BoxFuture<'_, Result<LogStream, String>> {
        Box::pin(self.inner.logs(query))
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.inner.shutdown())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn ms_since(t: Instant) -> Option<u64> {
    Some(t.elapsed().as_millis() as u64)
}

/// The engine's own message, without bollard's wrapping.
fn message(e: &DockerError) -> String {
    match e {
        DockerError::DockerResponseServerError { message, .. } => message.trim().to_string(),
        DockerError::DockerStreamError { error } => error.trim().to_string(),
        other => other.to_string(),
    }
}

fn is_not_found(e: &DockerError) -> bool {
    matches!(e, DockerError::DockerResponseServerError { status_code: 404, .. })
}

/// Counts a live watcher until dropped.
struct Busy(watch::Sender<usize>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl Inner {
    fn busy(&self) -> Busy {
        self.busy.send_modify(|n| *n += 1);
        Busy(self.busy.clone())
    }

    async fn start(self: Arc<Self>, launch: Launch) -> Result<WorkerHandle, StartWorkerError> {
        let image = launch.spec.image.as_deref().ok_or(StartWorkerError::NothingToRun("image"))?;
        let image = normalize_image(image);
        lock(&self.host_id).get_or_insert_with(|| launch.host_id.clone());
        let made = Made {
            endpoint: launch.spec.id.clone(),
            version: launch.spec.version,
            gpus: spec::sorted_gpus(&launch.gpus),
            bridge: spec::bridge_base(&launch),
            identity: BridgeIdentity {
                worker_id: launch.worker_id.clone(),
                token: launch.env.get("RUNPOD_AI_API_KEY").cloned().unwrap_or_default(),
            },
            flashboot: launch.spec.flashboot,
        };
        // warm containers of older versions of this endpoint will never be used again
        let older = lock(&self.pool).discard_older(&made.endpoint, made.version);
        for id in older {
            self.remove(&id).await;
        }
        if made.flashboot {
            let warm = lock(&self.pool).take(&Want {
                endpoint: &made.endpoint,
                version: made.version,
                gpus: &made.gpus,
                bridge: &made.bridge,
            });
            if let Some(warm) = warm {
                let identity = BridgeIdentity { worker_id: warm.worker_id.clone(), token: warm.token.clone() };
                if let Some(hook) = &launch.on_identity {
                    hook.announce(&identity);
                }
                let t = Instant::now();
                match self.docker.start_container(&warm.container_id, None).await {
                    Ok(()) => {
                        let phases = StartPhases { warm: true, start_ms: ms_since(t), ..StartPhases::default() };
                        let made = Made { identity: identity.clone(), ..made };
                        return Ok(self.watch(&launch.worker_id, warm.container_id, made, phases, Some(identity)));
                    }
                    Err(e) => {
                        tracing::warn!(worker_id = %launch.worker_id, container = %warm.container_id, error = %message(&e), "cannot start a warm container; starting cold");
                        self.remove(&warm.container_id).await;
                    }
                }
            }
        }
        let mut phases = StartPhases { pull_ms: self.ensure_image(&image, &launch).await?, ..StartPhases::default() };
        let t = Instant::now();
        let body = spec::create_body(&launch, &image, &self.config);
        let options = CreateContainerOptions {
            name: Some(spec::container_name(&launch.host_id, &launch.worker_id)),
            ..Default::default()
        };
        let created = self.docker.create_container(Some(options), body).await.map_err(|e| match &e {
            DockerError::DockerResponseServerError { status_code: 400 | 404, .. } => {
                StartWorkerError::Image(format!("cannot create a container of {image}: {}", message(&e)))
            }
            _ => StartWorkerError::Engine(format!("cannot create a container of {image}: {}", message(&e))),
        })?;
        phases.create_ms = ms_since(t);
        let t = Instant::now();
        if let Err(e) = self.docker.start_container(&created.id, None).await {
            self.remove(&created.id).await;
            return Err(StartWorkerError::Image(format!("cannot start a container of {image}: {}", message(&e))));
        }
        phases.start_ms = ms_since(t);
        Ok(self.watch(&launch.worker_id, created.id, made, phases, None))
    }

    /// Pulls the image when the engine does not have it; returns how long the pull took.
    async fn ensure_image(&self, image: &str, launch: &Launch) -> Result<Option<u64>, StartWorkerError> {
        match self.docker.inspect_image(image).await {
            Ok(_) => return Ok(None),
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(StartWorkerError::Engine(format!("cannot inspect image {image}: {}", message(&e)))),
        }
        tracing::info!(worker_id = %launch.worker_id, image, "pulling image");
        launch.progress(format!("pulling image {image}"));
        let t = Instant::now();
        let options = CreateImageOptions { from_image: Some(image.to_string()), ..Default::default() };
        let mut pulling = self.docker.create_image(Some(options), None, None);
        let pull = async {
            while let Some(item) = pulling.next().await {
                let info = item?;
                let mut line = format!("pulling image {image}:");
                for part in [info.id, info.status].into_iter().flatten() {
                    line.push(' ');
                    line.push_str(&part);
                }
                if let Some(d) = info.progress_detail
                    && let (Some(cur), Some(total)) = (d.current, d.total)
                    && total > 0
                {
                    line.push_str(&format!(" {}/{} MB", cur / 1_000_000, total / 1_000_000));
                }
                launch.progress(line);
            }
            Ok::<(), DockerError>(())
        };
        match tokio::time::timeout(Duration::from_secs(self.config.pull_timeout_s), pull).await {
            Ok(Ok(())) => Ok(ms_since(t)),
            Ok(Err(e)) => Err(StartWorkerError::Image(format!("cannot pull image {image}: {}", message(&e)))),
            Err(_) => Err(StartWorkerError::Image(format!(
                "cannot pull image {image}: not done after {} s",
                self.config.pull_timeout_s
            ))),
        }
    }

    /// Watches a started container: its exit, or a kill; then keeps it warm or removes it.
    fn watch(
        self: &Arc<Self>,
        worker_id: &str,
        container_id: String,
        made: Made,
        phases: StartPhases,
        identity: Option<BridgeIdentity>,
    ) -> WorkerHandle {
        lock(&self.containers).insert(worker_id.to_string(), container_id.clone());
        let (kill_tx, kill_rx) = oneshot::channel::<()>();
        let (exit_tx, exit_rx) = oneshot::channel::<Exit>();
        let inner = self.clone();
        let id = container_id.clone();
        let busy = self.busy();
        tokio::spawn(async move {
            let _busy = busy;
            let ended = tokio::select! {
                ended = inner.wait_exit(&id) => Some(ended),
                _ = kill_rx => None,
            };
            match ended {
                Some((code, description)) => {
                    let log_tail = inner.tail(&id, EXIT_LOG_LINES).await;
                    // kept (or removed) before the exit is told, so a restart finds it warm
                    inner.keep_or_remove(id, made).await;
                    let _ = exit_tx.send(Exit { code, description, log_tail });
                }
                None => {
                    tracing::debug!(container = %id, "stopping container");
                    // what it printed last, for a worker killed for a reason (an init timeout)
                    let log_tail = inner.tail(&id, EXIT_LOG_LINES).await;
                    inner.stop(&id).await;
                    inner.keep_or_remove(id, made).await;
                    let _ = exit_tx.send(Exit { code: None, description: "stopped".into(), log_tail });
                }
            }
        });
        let short: String = container_id.chars().take(12).collect();
        WorkerHandle::new(format!("docker:{short}"), kill_tx, exit_rx).with_start(phases).with_bridge_identity(identity)
    }

    /// Waits until the container is not running; returns its exit code and a description.
    async fn wait_exit(&self, id: &str) -> (Option<i32>, String) {
        loop {
            let options = WaitContainerOptions { condition: "not-running".into() };
            let waited = self.docker.wait_container(id, Some(options)).next().await;
            let code = match waited {
                Some(Ok(r)) => Some(r.status_code),
                Some(Err(DockerError::DockerContainerWaitError { code, .. })) => Some(code),
                Some(Err(e)) if is_not_found(&e) => return (None, "was removed".into()),
                Some(Err(e)) => {
                    tracing::debug!(container = %id, error = %message(&e), "waiting for the container failed; checking it");
                    None
                }
                None => None,
            };
            let state = self.docker.inspect_container(id, None).await.ok().and_then(|c| c.state);
            let code = match (code, &state) {
                (Some(code), _) => code,
                (None, Some(s)) if s.running != Some(true) => s.exit_code.unwrap_or(-1),
                (None, None) => return (None, "was removed".into()),
                _ => {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let code = i32::try_from(code).ok();
            let oom = state.as_ref().and_then(|s| s.oom_killed).unwrap_or(false);
            let description = match code {
                _ if oom => "was killed: out of memory".to_string(),
                Some(137) => "was killed (exit code 137)".to_string(),
                Some(c) => format!("exited with code {c}"),
                None => "exited".to_string(),
            };
            return (code, description);
        }
    }

    async fn stop(&self, id: &str) {
        let options = StopContainerOptions { t: Some(self.config.stop_timeout_s as i32), signal: None };
        if let Err(e) = self.docker.stop_container(id, Some(options)).await
            && !is_not_found(&e)
            && !matches!(e, DockerError::DockerResponseServerError { status_code: 304, .. })
        {
            tracing::warn!(container = %id, error = %message(&e), "cannot stop container");
        }
    }

    async fn remove(&self, id: &str) {
        lock(&self.containers).retain(|_, c| c != id);
        let options = RemoveContainerOptions { force: true, v: true, ..Default::default() };
        if let Err(e) = self.docker.remove_container(id, Some(options)).await
            && !is_not_found(&e)
        {
            tracing::warn!(container = %id, error = %message(&e), "cannot remove container");
        }
    }

    /// A stopped container: into the warm pool when its endpoint wants FlashBoot and there is
    /// room, else removed (and so are the containers it displaces).
    async fn keep_or_remove(&self, id: String, made: Made) {
        tracing::debug!(container = %id, endpoint = %made.endpoint, version = made.version, "container stopped");
        let gone = if made.flashboot {
            lock(&self.pool).offer(Warm {
                container_id: id,
                endpoint: made.endpoint,
                version: made.version,
                gpus: made.gpus,
                bridge: made.bridge,
                worker_id: made.identity.worker_id,
                token: made.identity.token,
                since: Instant::now(),
            })
        } else {
            vec![id]
        };
        for id in gone {
            self.remove(&id).await;
        }
    }

    /// The last `lines` lines of a container's log.
    async fn tail(&self, id: &str, lines: usize) -> String {
        let options = LogsOptions { stdout: true, stderr: true, tail: lines.to_string(), ..Default::default() };
        let chunks: Vec<_> = self.docker.logs(id, Some(options)).collect().await;
        let text: String = chunks.into_iter().filter_map(Result::ok).map(|c| c.to_string()).collect();
        last_lines(&text, lines).join("\n")
    }

    /// The container of a worker: the one it runs (or last ran) here, else one labelled for it.
    async fn container_of(&self, worker_id: &str) -> Option<String> {
        if let Some(id) = lock(&self.containers).get(worker_id) {
            return Some(id.clone());
        }
        let filters = HashMap::from([("label".to_string(), vec![format!("{LABEL_WORKER}={worker_id}")])]);
        let options = ListContainersOptions { all: true, filters: Some(filters), ..Default::default() };
        self.docker.list_containers(Some(options)).await.ok()?.into_iter().find_map(|c| c.id)
    }

    async fn logs(&self, query: LogQuery) -> Result<LogStream, String> {
        let id = self
            .container_of(&query.worker_id)
            .await
            .ok_or_else(|| format!("worker {} has no container on this host", query.worker_id))?;
        let options = LogsOptions {
            follow: query.follow,
            stdout: true,
            stderr: true,
            tail: query.lines.to_string(),
            ..Default::default()
        };
        let lines = self
            .docker
            .logs(&id, Some(options))
            .take_while(|r| std::future::ready(r.is_ok()))
            .filter_map(|r| std::future::ready(r.ok()))
            .ready_chunks(256)
            .map(|chunks| {
                let text: String = chunks.iter().map(|c| c.to_string()).collect();
                text.lines().map(|l| l.trim_end_matches('\r').to_string()).collect::<Vec<String>>()
            });
        if query.follow {
            return Ok(Box::pin(lines));
        }
        let all: Vec<String> = lines.collect::<Vec<_>>().await.concat();
        Ok(Box::pin(stream::once(async move { all })))
    }

    /// Finds the containers an earlier run of this host left: stops the running ones, keeps
    /// the warm-able ones (same bridge URL, FlashBoot) and removes the rest.
    async fn recover(&self, host_id: &str, bridge_url: &str) -> Result<(), String> {
        *lock(&self.host_id) = Some(host_id.to_string());
        let filters = HashMap::from([("label".to_string(), vec![format!("{LABEL_HOST}={host_id}")])]);
        let options = ListContainersOptions { all: true, filters: Some(filters), ..Default::default() };
        let found = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(|e| format!("cannot list the containers of host {host_id}: {}", message(&e)))?;
        let (mut stopped, mut kept, mut removed) = (0, 0, 0);
        for c in found {
            let Some(id) = c.id else { continue };
            let labels = c.labels.unwrap_or_default();
            if matches!(c.state, Some(ContainerSummaryStateEnum::RUNNING | ContainerSummaryStateEnum::RESTARTING)) {
                self.stop(&id).await;
                stopped += 1;
            }
            let keep = c.state != Some(ContainerSummaryStateEnum::PAUSED)
                && labels.get(LABEL_FLASHBOOT).map(String::as_str) == Some("true")
                && labels.get(LABEL_BRIDGE).map(|b| b.trim_end_matches('/')) == Some(bridge_url.trim_end_matches('/'));
            let warm = match keep {
                true => self.warm_entry(&id, &labels).await,
                false => None,
            };
            match warm {
                Some(warm) => {
                    kept += 1;
                    let gone = lock(&self.pool).offer(warm);
                    removed += gone.len();
                    for id in gone {
                        self.remove(&id).await;
                    }
                }
                None => {
                    self.remove(&id).await;
                    removed += 1;
                }
            }
        }
        if stopped + kept + removed > 0 {
            tracing::info!(
                host_id,
                stopped,
                kept_warm = kept,
                removed,
                "recovered the containers an earlier run of this host left"
            );
        }
        Ok(())
    }

    /// A left-behind container as a warm pool entry, from its labels and environment.
    async fn warm_entry(&self, id: &str, labels: &HashMap<String, String>) -> Option<Warm> {
        let env = self.docker.inspect_container(id, None).await.ok()?.config?.env.unwrap_or_default();
        let var = |name: &str| env.iter().find_map(|e| e.strip_prefix(&format!("{name}="))).map(str::to_string);
        let gpus: Vec<String> =
            labels.get(LABEL_GPUS).map(|g| g.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect())?;
        Some(Warm {
            container_id: id.to_string(),
            endpoint: labels.get(LABEL_ENDPOINT)?.clone(),
            version: labels.get(LABEL_VERSION)?.parse().ok()?,
            gpus,
            bridge: labels.get(LABEL_BRIDGE)?.trim_end_matches('/').to_string(),
            worker_id: var("RUNPOD_POD_ID")?,
            token: var("RUNPOD_AI_API_KEY")?,
            since: Instant::now(),
        })
    }

    async fn shutdown(&self) {
        let grace = Duration::from_secs(u64::from(self.config.stop_timeout_s) + 15);
        let mut busy = self.busy.subscribe();
        if tokio::time::timeout(grace, busy.wait_for(|n| *n == 0)).await.is_err() {
            tracing::warn!("worker containers still stopping at host shutdown");
        }
        if self.config.keep_warm_on_shutdown {
            return;
        }
        let ids = lock(&self.pool).drain();
        for id in &ids {
            self.remove(id).await;
        }
        // and anything else of this host's (a watcher that did not finish in time)
        let host_id = lock(&self.host_id).clone();
        if let Some(host_id) = host_id {
            let filters = HashMap::from([("label".to_string(), vec![format!("{LABEL_HOST}={host_id}")])]);
            let options = ListContainersOptions { all: true, filters: Some(filters), ..Default::default() };
            if let Ok(left) = self.docker.list_containers(Some(options)).await {
                for id in left.into_iter().filter_map(|c| c.id) {
                    self.remove(&id).await;
                }
            }
        }
    }
}
