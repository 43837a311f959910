//! The test harness: a real `nats-server -js` per test (random port, own store directory,
//! killed and cleaned up on drop), a shoal control plane and host wired to it in-process, and
//! helpers to find the runpod venv's Python and the Rust example worker.
//!
//! Each test gets its own server, and its own subject prefix besides, so tests run in parallel.

pub mod browser;
pub mod cluster;
pub mod docker;
pub mod process;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use shoal_actors::client::ApiClient;
use shoal_actors::control::{self, ControlConfig, ControlHandle};
use shoal_actors::host::backoff::BackoffPolicy;
use shoal_actors::host::{self, HostConfig, HostHandle};
use shoal_actors::lifeline::{self, Lifeline, OnParentExit};
use shoal_actors::nats::{Nats, Topology};
use shoal_actors::runtime::process::ProcessRuntime;
use shoal_protocol::endpoint::EndpointSpec;
use shoal_protocol::names::Names;

/// The repository root (tests run from `tests/`): from the package directory cargo gives the
/// running test, so a test binary built in another checkout that shares the target directory
/// still uses this one.
pub fn repo_root() -> PathBuf {
    let dir =
        std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    dir.parent().map(PathBuf::from).unwrap_or_default()
}

fn find_tool(env: &str, pattern_dir: &str, name: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Some(PathBuf::from(p));
    }
    let tools = std::env::var_os("SHOAL_TOOLS").map(PathBuf::from).unwrap_or_else(|| repo_root().join(".tools"));
    let mut found: Vec<PathBuf> = std::fs::read_dir(&tools)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(pattern_dir)))
        .map(|p| p.join("bin").join(name))
        .filter(|p| p.exists())
        .collect();
    found.sort();
    found.pop()
}

/// The nats-server binary: `$SHOAL_NATS_SERVER`, `.tools/nats-*`, or `nats-server` on PATH.
pub fn nats_server_bin() -> PathBuf {
    find_tool("SHOAL_NATS_SERVER", "nats-", "nats-server").unwrap_or_else(|| PathBuf::from("nats-server"))
}

/// The runpod venv's Python: `$SHOAL_PYTHON` or `.tools/venv-runpod-*`.
pub fn python_bin() -> Result<PathBuf> {
    find_tool("SHOAL_PYTHON", "venv-runpod", "python")
        .context("no runpod venv: run ./scripts/setup.sh (or set SHOAL_PYTHON)")
}

/// The Rust example worker: `$SHOAL_EXAMPLE_WORKER`, or built next to this test binary.
pub fn example_worker_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("SHOAL_EXAMPLE_WORKER") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let profile_dir = exe.parent().and_then(|p| p.parent()).context("no target dir")?;
    let bin = profile_dir.join("shoal-example-worker");
    if bin.exists() {
        Ok(bin)
    } else {
        bail!("{} is missing: run `cargo build -p shoal-example-worker` (scripts/test does)", bin.display())
    }
}

/// A TCP port free on every address now, for a server a test must tell where to listen.
///
/// Drawn at random below the kernel's ephemeral range (`ip_local_port_range`): a port the
/// kernel hands out for a `:0` bind or an outgoing connection can be taken by any of the
/// suite's thousands of client sockets between this probe and the server's bind (once it was,
/// and `docker compose up` failed); a port below that range is only ever taken by a test that
/// chose it on purpose, at random from ~12,000 here. Where the range starts too low to leave
/// room, it falls back to a kernel-chosen port.
pub fn free_port() -> Result<u16> {
    let ephemeral_from = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    const FROM: u16 = 20000;
    if ephemeral_from > FROM + 1000 {
        for _ in 0..200 {
            let port = FROM + (random_u64() % u64::from(ephemeral_from - FROM)) as u16;
            if TcpListener::bind(("0.0.0.0", port)).is_ok() && TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return Ok(port);
            }
        }
    }
    Ok(TcpListener::bind("0.0.0.0:0")?.local_addr()?.port())
}

fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(PREFIX_COUNTER.fetch_add(1, Ordering::Relaxed));
    h.finish()
}

/// A `nats-server -js` of this test's own.
pub struct NatsServer {
    child: Child,
    _lifeline: Lifeline,
    pub port: u16,
    pub url: String,
    _store: tempfile::TempDir,
    extra_args: Vec<String>,
    store_dir: PathBuf,
}

impl NatsServer {
    pub fn start() -> Result<NatsServer> {
        Self::start_with(&[])
    }

    /// Starts with extra server flags (e.g. `["--max_payload", "2MB"]`).
    pub fn start_with(extra: &[&str]) -> Result<NatsServer> {
        let store = tempfile::tempdir()?;
        let store_dir = store.path().to_path_buf();
        let extra_args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        // a free port may be taken between the probe and the bind: try a few
        for _ in 0..5 {
            let port = free_port()?;
            let (mut child, lifeline) = spawn_server(port, &store_dir, &extra_args)?;
            if wait_ready(&mut child, port, Duration::from_secs(10)) {
                return Ok(NatsServer {
                    child,
                    _lifeline: lifeline,
                    port,
                    url: format!("nats://127.0.0.1:{port}"),
                    _store: store,
                    extra_args,
                    store_dir,
                });
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        bail!("nats-server did not start")
    }

    /// Kills the server (as a crash would) and starts it again on the same port and store.
    pub fn restart(&mut self) -> Result<()> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        (self.child, self._lifeline) = spawn_server(self.port, &self.store_dir, &self.extra_args)?;
        if !wait_ready(&mut self.child, self.port, Duration::from_secs(10)) {
            bail!("nats-server did not restart");
        }
        Ok(())
    }
}

fn wait_ready(child: &mut Child, port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn spawn_server(port: u16, store_dir: &std::path::Path, extra: &[String]) -> Result<(Child, Lifeline)> {
    let bin = nats_server_bin();
    // on a lifeline: a test process that dies without unwinding (an abort, a timeout's
    // SIGKILL) takes its server with it
    let (mut cmd, lifeline) = lifeline::command(&bin, OnParentExit::Terminate)?;
    let child = cmd
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(store_dir)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| {
            format!("cannot start {} (run ./scripts/setup.sh to install the pinned nats-server)", bin.display())
        })?;
    Ok((child, lifeline))
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

static PREFIX_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A unique subject prefix for one test.
pub fn test_prefix() -> String {
    format!("t{}x{}", std::process::id(), PREFIX_COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// Short TTLs, so tests see failovers and lost hosts in seconds.
pub fn fast_topology() -> Topology {
    Topology { lease_ttl_s: 2, host_ttl_s: 3, ..Topology::default() }
}

/// Host settings that make tests fast: short holds, pings and ticks.
pub fn fast_host_config(state_dir: &std::path::Path) -> HostConfig {
    HostConfig {
        hold_ms: 2_000,
        ping_interval_ms: 1_000,
        stop_grace_ms: 3_000,
        ack_wait_ms: 5_000,
        heartbeat_ms: 1_000,
        state_dir: state_dir.to_path_buf(),
        workdir: Some(repo_root()),
        backoff: BackoffPolicy {
            base_ms: 300,
            factor: 2.0,
            cap_ms: 5_000,
            jitter: 0.1,
            stable_ms: 30_000,
            unhealthy_after: 3,
            give_up_after_ms: 0,
        },
        ..HostConfig::default()
    }
}

/// One shoal installation on a test's own server: control plane, one host, a client.
pub struct Shoal {
    pub server: NatsServer,
    pub nats: Nats,
    pub api: ApiClient,
    pub control: Option<ControlHandle>,
    pub host: Option<HostHandle>,
    pub state_dir: tempfile::TempDir,
}

impl Shoal {
    pub async fn start() -> Result<Shoal> {
        Self::start_with(ControlConfig { tick_ms: 100, ..ControlConfig::default() }, |_| {}).await
    }

    pub async fn start_with(control_config: ControlConfig, tweak_host: impl FnOnce(&mut HostConfig)) -> Result<Shoal> {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let server = NatsServer::start()?;
        let names = Names::new(&test_prefix())?;
        let nats = Nats::connect(&server.url, names.clone(), &fast_topology()).await?;
        // boxed: these futures are large, and test threads have small stacks
        let control = Box::pin(control::start(nats.clone(), control_config)).await?;
        let state_dir = tempfile::tempdir()?;
        let mut host_config = fast_host_config(state_dir.path());
        tweak_host(&mut host_config);
        let host = Box::pin(host::start(nats.clone(), host_config, Arc::new(ProcessRuntime))).await?;
        let api = ApiClient::new(nats.client.clone(), names);
        Ok(Shoal { server, nats, api, control: Some(control), host: Some(host), state_dir })
    }

    pub async fn stop(mut self) {
        if let Some(h) = self.host.take() {
            h.stop().await;
        }
        if let Some(c) = self.control.take() {
            c.stop().await;
        }
    }
}

/// An endpoint running the runpod-SDK example handler (examples/python-worker/handler.py).
pub fn python_endpoint(id: &str) -> Result<EndpointSpec> {
    let python = python_bin()?;
    let mut spec =
        EndpointSpec::with_command(id, &format!("exec {} examples/python-worker/handler.py", python.display()));
    spec.workers_min = 1;
    spec.workers_max = 1;
    spec.env.insert("RUNPOD_LOG_LEVEL".into(), "INFO".into());
    Ok(spec)
}

/// An endpoint running the Rust example worker.
pub fn rust_endpoint(id: &str) -> Result<EndpointSpec> {
    let bin = example_worker_bin()?;
    let mut spec = EndpointSpec::with_command(id, &format!("exec {}", bin.display()));
    spec.workers_min = 1;
    spec.workers_max = 1;
    Ok(spec)
}

/// An endpoint whose jobs nothing ever takes (no workers at all): they stay queued.
pub fn idle_endpoint(id: &str) -> Result<EndpointSpec> {
    let mut spec = rust_endpoint(id)?;
    spec.workers_min = 0;
    spec.workers_max = 0;
    Ok(spec)
}

/// Waits until one worker of `endpoint` holds two jobs or more at once (a worker with several
/// job slots); returns the most seen on one worker.
pub async fn several_jobs_on_one_worker(api: &ApiClient, endpoint: &str) -> Result<usize> {
    eventually(Duration::from_secs(60), "several jobs on one worker", || async {
        let list = api.workers(Some(endpoint)).await.ok()?;
        list.workers.iter().map(|w| w.current_jobs.len()).max().filter(|n| *n >= 2)
    })
    .await
}

/// Polls `check` until it returns `Some`, or fails after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---- the HTTP gateway ----------------------------------------------------------------------

impl Shoal {
    /// A gateway on this installation, on a NATS connection of its own (as a separate
    /// `shoal gateway` process would be), listening on a free port and requiring API keys.
    pub async fn start_gateway(&self) -> Result<shoal_gateway::GatewayHandle> {
        self.start_gateway_with(|_| {}).await
    }

    pub async fn start_gateway_with(
        &self,
        tweak: impl FnOnce(&mut shoal_gateway::GatewayConfig),
    ) -> Result<shoal_gateway::GatewayHandle> {
        let nats = Nats::connect(&self.server.url, self.nats.names.clone(), &fast_topology()).await?;
        let mut config = shoal_gateway::GatewayConfig {
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            ..shoal_gateway::GatewayConfig::default()
        };
        tweak(&mut config);
        Ok(shoal_gateway::start(nats, config).await?)
    }

    /// A new API key that may use every endpoint.
    pub async fn api_key(&self) -> Result<String> {
        Ok(shoal_gateway::keys::create(&self.nats, "test", &[]).await?.secret)
    }
}

/// A client of the gateway's RunPod API that returns every reply as (status, JSON body), so
/// tests can assert on both.
#[derive(Clone)]
pub struct Http {
    client: reqwest::Client,
    /// `http://<addr>/v2`
    pub base: String,
    /// The `Authorization` header value sent, if any.
    pub auth: Option<String>,
}

impl Http {
    pub fn new(gateway: &shoal_gateway::GatewayHandle, key: Option<&str>) -> Http {
        Http { client: reqwest::Client::new(), base: gateway.base_url(), auth: key.map(|k| format!("Bearer {k}")) }
    }

    /// The same gateway with another `Authorization` header value (or none).
    pub fn with_auth(&self, auth: Option<&str>) -> Http {
        Http { auth: auth.map(str::to_string), ..self.clone() }
    }

    /// `method` on `<base><path>` (path starts with `/`), with a raw body.
    pub async fn send(&self, method: reqwest::Method, path: &str, body: Option<Vec<u8>>) -> Result<(u16, Value)> {
        let (status, value, _) = self.send_with_headers(method, path, body).await?;
        Ok((status, value))
    }

    /// [`Http::send`], with the reply's headers.
    pub async fn send_with_headers(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(u16, Value, reqwest::header::HeaderMap)> {
        let mut req = self.client.request(method, format!("{}{path}", self.base)).timeout(Duration::from_secs(120));
        if let Some(auth) = &self.auth {
            req = req.header("Authorization", auth);
        }
        if let Some(body) = body {
            req = req.header("Content-Type", "application/json").body(body);
        }
        let resp = req.send().await.with_context(|| format!("request {path}"))?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await?;
        let value = serde_json::from_slice(&bytes)
            .with_context(|| format!("{path}: reply {status} is not JSON: {}", String::from_utf8_lossy(&bytes)))?;
        Ok((status, value, headers))
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<(u16, Value)> {
        self.send(reqwest::Method::POST, path, Some(serde_json::to_vec(body)?)).await
    }

    pub async fn get(&self, path: &str) -> Result<(u16, Value)> {
        self.send(reqwest::Method::GET, path, None).await
    }
}
