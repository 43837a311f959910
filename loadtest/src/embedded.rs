//! An installation of the tester's own: a child `nats-server -js` (found like the test harness
//! finds it: `$SHOAL_NATS_SERVER`, `.tools/nats-*`, then `PATH`) on a free port with a temporary
//! store, and shoal's control plane and one host started in this process. Everything is stopped
//! and removed by [`Embedded::stop`] (and the server is killed on drop).
//!
//! Also finds the workers the scenarios run: the Rust example worker and the runpod venv's Python.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use shoal_actors::control::{self, ControlConfig, ControlHandle};
use shoal_actors::host::{self, HostConfig, HostHandle};
use shoal_actors::lifeline::{self, Lifeline, OnParentExit};
use shoal_actors::nats::{Nats, Topology};
use shoal_actors::runtime::Runtime;
use shoal_actors::runtime::docker::{DockerConfig, DockerRuntime};
use shoal_actors::runtime::fake::FakeRuntime;
use shoal_actors::runtime::process::ProcessRuntime;
use shoal_protocol::names::Names;

use crate::config::RuntimeKind;

/// Candidate roots of a shoal checkout: the current directory and its parents, then the source
/// tree this binary was built from.
fn roots() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        out.extend(cwd.ancestors().map(Path::to_path_buf));
    }
    if let Some(built) = Path::new(env!("CARGO_MANIFEST_DIR")).parent() {
        out.push(built.to_path_buf());
    }
    out
}

/// The shoal checkout the tester runs in or was built from (it has `examples/`).
pub fn repo_root() -> Option<PathBuf> {
    roots().into_iter().find(|r| r.join("examples").join("python-worker").join("handler.py").is_file())
}

/// `<tools>/<prefix>*/bin/<name>`, highest version first, in `$SHOAL_TOOLS` or `.tools` of a root.
fn from_tools(prefix: &str, name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("SHOAL_TOOLS").map(PathBuf::from).into_iter().collect();
    dirs.extend(roots().into_iter().map(|r| r.join(".tools")));
    for tools in dirs {
        let Ok(entries) = std::fs::read_dir(&tools) else { continue };
        let mut found: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(prefix)))
            .map(|p| p.join("bin").join(name))
            .filter(|p| p.is_file())
            .collect();
        found.sort();
        if let Some(p) = found.pop() {
            return Some(p);
        }
    }
    None
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(name)).find(|p| p.is_file())
}

/// The nats-server binary: `$SHOAL_NATS_SERVER`, `.tools/nats-*` (scripts/setup.sh), `PATH`.
pub fn nats_server_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("SHOAL_NATS_SERVER") {
        return Ok(PathBuf::from(p));
    }
    from_tools("nats-", "nats-server").or_else(|| on_path("nats-server")).context(
        "no nats-server: run ./scripts/setup.sh (installs it under .tools/), set SHOAL_NATS_SERVER, \
         or point the tester at a running installation with --nats URL",
    )
}

/// The runpod venv's Python: `$SHOAL_PYTHON` or `.tools/venv-runpod-*`.
pub fn python_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("SHOAL_PYTHON") {
        return Ok(PathBuf::from(p));
    }
    from_tools("venv-runpod", "python").context("no runpod venv: run ./scripts/setup.sh (or set SHOAL_PYTHON)")
}

/// The Rust example worker: `$SHOAL_EXAMPLE_WORKER`, next to this binary (or the test binary's
/// profile directory), or on `PATH`.
pub fn example_worker_bin() -> Result<PathBuf> {
    const NAME: &str = "shoal-example-worker";
    if let Some(p) = std::env::var_os("SHOAL_EXAMPLE_WORKER") {
        return Ok(PathBuf::from(p));
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            let p = dir.join(NAME);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    on_path(NAME).context(
        "no shoal-example-worker: build it with `cargo build --release -p shoal-example-worker` \
         (next to shoal-loadtest), or set SHOAL_EXAMPLE_WORKER",
    )
}

/// Quotes a path for `sh -c`.
pub fn shell_quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', r"'\''"))
}

/// A child nats-server, killed on drop, stopped if the tester dies (on a lifeline).
pub struct NatsChild {
    /// Its process id, for its CPU time.
    pub pid: u32,
    child: Child,
    _lifeline: Lifeline,
    pub url: String,
    /// The server's HTTP monitoring endpoint (`/varz`, `/jsz`).
    pub monitor_url: String,
    _store: tempfile::TempDir,
}

impl NatsChild {
    pub fn start() -> Result<NatsChild> {
        let bin = nats_server_bin()?;
        let store = tempfile::Builder::new().prefix("shoal-loadtest-nats").tempdir().context("temporary store")?;
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let monitor = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let (mut cmd, lifeline) = lifeline::command(&bin, OnParentExit::Terminate).context("create a pipe")?;
            let mut child = cmd
                .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-m", &monitor.to_string(), "-sd"])
                .arg(store.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("cannot start {}", bin.display()))?;
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // the port was taken meanwhile: try another
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Ok(NatsChild {
                        pid: child.id(),
                        child,
                        _lifeline: lifeline,
                        url: format!("nats://127.0.0.1:{port}"),
                        monitor_url: format!("http://127.0.0.1:{monitor}"),
                        _store: store,
                    });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        bail!("{} did not start", bin.display())
    }
}

impl Drop for NatsChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The runtime of the embedded host. Docker runs the endpoint's `--image` on the local engine
/// (`$DOCKER_HOST` or its socket); `deploy/build-images.sh worker` builds the example worker's.
pub async fn runtime(kind: RuntimeKind, options: &EmbeddedOptions) -> Result<Arc<dyn Runtime>> {
    match kind {
        RuntimeKind::Process => Ok(Arc::new(ProcessRuntime)),
        RuntimeKind::Fake => {
            let defaults = FakeRuntime::default();
            Ok(Arc::new(FakeRuntime {
                // a job runs for its own `sleep_ms` (the sleep handler), or not at all
                job_duration_ms: 0,
                start_latency_ms: options.fake_start_ms.unwrap_or(defaults.start_latency_ms),
            }))
        }
        RuntimeKind::Docker => {
            let config = DockerConfig { stop_timeout_s: 2, ..DockerConfig::default() };
            let docker = DockerRuntime::connect(config).await.context("the docker runtime")?;
            Ok(Arc::new(docker))
        }
    }
}

/// Host settings for load tests: workers' logs in a temporary directory, the checkout as the
/// working directory (the Python handler's path is relative to it). Containers reach the
/// bridge through the host's gateway, so with Docker it listens on every interface.
pub fn host_config(state_dir: &Path, kind: RuntimeKind) -> HostConfig {
    let bridge_ip = if kind == RuntimeKind::Docker { [0, 0, 0, 0] } else { [127, 0, 0, 1] };
    HostConfig {
        bridge_listen: std::net::SocketAddr::from((bridge_ip, 0)),
        state_dir: state_dir.to_path_buf(),
        workdir: repo_root(),
        hold_ms: 5_000,
        ping_interval_ms: 5_000,
        heartbeat_ms: 2_000,
        ..HostConfig::default()
    }
}

/// What the embedded installation runs, beyond shoal's defaults.
#[derive(Debug, Clone, Default)]
pub struct EmbeddedOptions {
    pub control_tick_ms: Option<u64>,
    pub lease_ttl_s: Option<u64>,
    /// Also serve the HTTP gateway (no API keys) on a free port.
    pub gateway: bool,
    /// The fake runtime's start latency, ms.
    pub fake_start_ms: Option<u64>,
    /// The host's `start_record_ms` (default: shoal's).
    pub start_record_ms: Option<u64>,
}

/// A whole installation in this process.
pub struct Embedded {
    pub server: NatsChild,
    pub nats: Nats,
    /// The gateway's base URL (`http://127.0.0.1:<port>`), when one was started.
    pub gateway_url: Option<String>,
    control: Option<ControlHandle>,
    host: Option<HostHandle>,
    gateway: Option<shoal_gateway::GatewayHandle>,
    /// Every connection of the installation (control plane, host, gateway), closed before the
    /// server goes.
    clients: Vec<async_nats::Client>,
    _state: tempfile::TempDir,
}

impl Embedded {
    pub async fn start(kind: RuntimeKind, names: Names, options: &EmbeddedOptions) -> Result<Embedded> {
        let runtime = runtime(kind, options).await?;
        let server = NatsChild::start()?;
        let mut topology = Topology::default();
        if let Some(ttl) = options.lease_ttl_s {
            topology.lease_ttl_s = ttl;
        }
        let nats = Nats::connect(&server.url, names, &topology).await.context("connect to the child nats-server")?;
        let mut control_config = ControlConfig::default();
        if let Some(tick) = options.control_tick_ms {
            control_config.tick_ms = tick;
        }
        let control =
            Box::pin(control::start(nats.clone(), control_config)).await.context("start the control plane")?;
        let state = tempfile::Builder::new().prefix("shoal-loadtest-host").tempdir().context("host state directory")?;
        // the host on a connection of its own, as a separate `shoal host` process has it (one
        // connection for both would funnel all their traffic through one reader task)
        let host_nats = Nats::connect(&server.url, nats.names.clone(), &topology).await.context("connect the host")?;
        let mut clients = vec![nats.client.clone(), host_nats.client.clone()];
        let mut host_settings = host_config(state.path(), kind);
        if let Some(ms) = options.start_record_ms {
            host_settings.start_record_ms = ms;
        }
        let host = Box::pin(host::start(host_nats, host_settings, runtime)).await.context("start the host")?;
        let gateway = if options.gateway {
            // its own connection, as a separate `shoal gateway` process would have
            let gw_nats =
                Nats::connect(&server.url, nats.names.clone(), &topology).await.context("connect the gateway")?;
            clients.push(gw_nats.client.clone());
            let config = shoal_gateway::GatewayConfig {
                listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
                require_api_key: false,
                // it measures shoal's job path; RunPod's per-endpoint rates (1,000 /run and
                // 2,000 /runsync per 10 s) would cap every HTTP scenario
                rate_limits: shoal_gateway::limits::RateLimits::off(),
                ..shoal_gateway::GatewayConfig::default()
            };
            Some(shoal_gateway::start(gw_nats, config).await.context("start the gateway")?)
        } else {
            None
        };
        let gateway_url = gateway.as_ref().map(|g| format!("http://{}", g.local_addr()));
        Ok(Embedded {
            server,
            nats,
            gateway_url,
            control: Some(control),
            host: Some(host),
            gateway,
            clients,
            _state: state,
        })
    }

    pub async fn stop(mut self) {
        if let Some(g) = self.gateway.take() {
            g.stop().await;
        }
        if let Some(h) = self.host.take() {
            h.stop().await;
        }
        if let Some(c) = self.control.take() {
            c.stop().await;
        }
        // every connection closed before the server is killed (on drop), as `shoal dev` stops
        for client in &self.clients {
            crate::close(client).await;
        }
    }
}
