//! `shoal dev`, the README's first command, as a user runs it: the built binary from the clone's
//! root with the example endpoints, a child nats-server on a port of its own, jobs through the
//! HTTP gateway; then stopped as a user stops it (Ctrl-C's SIGTERM) and as a crash does (SIGKILL),
//! each time leaving nothing running — no nats-server holding the port and the store, no worker
//! process — and started again on the same data directory with its jobs still there.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use shoal_actors::client::ApiClient;
use shoal_protocol::names::{DEFAULT_PREFIX, Names};
use shoal_protocol::worker::WorkerState;
use shoal_tests::process::shoal_bin;
use shoal_tests::{eventually, example_worker_bin, free_port, nats_server_bin, python_bin, repo_root};

struct Dev {
    child: Child,
    log: PathBuf,
    nats_port: u16,
    base: String,
    key: String,
}

impl Dev {
    fn start(data_dir: &Path, nats_port: u16, gateway_port: u16, log: PathBuf) -> Result<Dev> {
        let key = "dev-test-key".to_string();
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
        let child = Command::new(shoal_bin()?)
            .args(["dev", "--nats-port", &nats_port.to_string(), "--api-key", &key, "--data-dir"])
            .arg(data_dir)
            .current_dir(repo_root())
            .env("SHOAL_GATEWAY__LISTEN", format!("127.0.0.1:{gateway_port}"))
            .env("SHOAL_NATS_SERVER", nats_server_bin())
            .env("SHOAL_PYTHON", python_bin()?)
            .env("SHOAL_EXAMPLE_WORKER", example_worker_bin()?)
            .env("RUST_LOG", "info,async_nats=warn")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("start shoal dev")?;
        Ok(Dev { child, log, nats_port, base: format!("http://127.0.0.1:{gateway_port}/v2"), key })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Option<Value> {
        let mut req = reqwest::Client::new()
            .request(method, format!("{}/{path}", self.base))
            .bearer_auth(&self.key)
            .timeout(Duration::from_secs(60));
        if let Some(body) = body {
            req = req.json(&body);
        }
        let reply = req.send().await.ok()?;
        if !reply.status().is_success() {
            return None;
        }
        reply.json().await.ok()
    }

    /// Each example endpoint answers a `/runsync` (once its worker has started).
    async fn serves_both_examples(&self) -> Result<()> {
        for endpoint in ["echo-rs", "echo-py"] {
            let input = json!({"from": endpoint});
            let body = eventually(Duration::from_secs(90), &format!("{endpoint} answers"), || async {
                self.call(reqwest::Method::POST, &format!("{endpoint}/runsync"), Some(json!({"input": input})))
                    .await
                    .filter(|b| b["status"] == "COMPLETED")
            })
            .await
            .with_context(|| self.log())?;
            assert_eq!(body["output"], input, "{body}");
        }
        Ok(())
    }

    /// The worker processes running now.
    async fn worker_pids(&self) -> Result<Vec<u32>> {
        let nats = async_nats::connect(format!("nats://127.0.0.1:{}", self.nats_port)).await?;
        let api = ApiClient::new(nats, Names::new(DEFAULT_PREFIX)?);
        let workers = api.all_workers().await?.workers;
        let pids: Vec<u32> = workers
            .iter()
            .filter(|w| w.state != WorkerState::Stopped)
            .filter_map(|w| w.runtime_ref.as_deref()?.strip_prefix("pid:")?.parse().ok())
            .collect();
        ensure!(pids.len() >= 2, "a worker per example endpoint: {workers:?}");
        assert!(pids.iter().all(|p| running(*p)), "{pids:?}");
        Ok(pids)
    }

    /// Nothing of this run is left: the port is free (its nats-server is gone) and so is every
    /// worker process.
    async fn left_nothing(&self, workers: &[u32]) -> Result<()> {
        eventually(Duration::from_secs(20), "nats-server and the workers gone", || async {
            let port_free = std::net::TcpListener::bind(("127.0.0.1", self.nats_port)).is_ok();
            (port_free && !workers.iter().any(|p| running(*p))).then_some(())
        })
        .await
        .with_context(|| {
            let alive: Vec<_> = workers.iter().filter(|p| running(**p)).collect();
            format!("workers still running: {alive:?}\n{}", self.log())
        })
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `pid` still runs (an orphan's zombie, which nothing may reap here, does not).
fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shoal_dev_runs_the_examples_and_leaves_nothing_running_however_it_stops() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data_dir = dir.path().join("data");
    let log = dir.path().join("dev.log");
    let (nats_port, gateway_port) = (free_port()?, free_port()?);

    // first run: both examples answer; an async job is kept for later
    let dev = Dev::start(&data_dir, nats_port, gateway_port, log.clone())?;
    dev.serves_both_examples().await?;
    let queued = dev
        .call(reqwest::Method::POST, "echo-rs/run", Some(json!({"input": {"kept": true}})))
        .await
        .with_context(|| dev.log())?;
    let id = queued["id"].as_str().context("a job id")?.to_string();
    eventually(Duration::from_secs(30), "the async job completes", || async {
        dev.call(reqwest::Method::GET, &format!("echo-rs/status/{id}"), None)
            .await
            .filter(|b| b["status"] == "COMPLETED")
    })
    .await?;
    let workers = dev.worker_pids().await?;

    // killed as a crash kills it: no unwinding, no stopping of its children
    let mut dev = dev;
    dev.child.kill()?;
    dev.child.wait()?;
    dev.left_nothing(&workers).await?;
    drop(dev);

    // started again on the same directory (the port is free, the store is its own again): the
    // job of the first run is still there, and new jobs run
    let dev = Dev::start(&data_dir, nats_port, gateway_port, log.clone())?;
    dev.serves_both_examples().await?;
    let kept =
        dev.call(reqwest::Method::GET, &format!("echo-rs/status/{id}"), None).await.with_context(|| dev.log())?;
    assert_eq!(kept["status"], "COMPLETED", "{kept}");
    assert_eq!(kept["output"], json!({"kept": true}), "{kept}");
    let workers = dev.worker_pids().await?;

    // Ctrl-C: it stops everything in order and exits cleanly
    let mut dev = dev;
    let pid = dev.child.id().to_string();
    ensure!(Command::new("kill").args(["-INT", &pid]).status()?.success(), "kill -INT failed");
    let status = eventually(Duration::from_secs(60), "shoal dev exits", || {
        let exited = dev.child.try_wait().ok().flatten();
        async move { exited }
    })
    .await
    .with_context(|| dev.log())?;
    assert!(status.success(), "{status}\n{}", dev.log());
    assert!(dev.log().contains("shoal dev stopped"), "{}", dev.log());
    dev.left_nothing(&workers).await?;
    Ok(())
}
