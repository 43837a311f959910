//! A real Prometheus (Debian's `prometheus` package) scrapes a control plane's `/metrics`,
//! and the job counter and worker-state gauge are queried through Prometheus's HTTP API.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use shoal_actors::control::ControlConfig;
use shoal_protocol::api::RunRequest;
use shoal_protocol::job::JobState;
use shoal_tests::{Shoal, eventually, free_port, rust_endpoint};

/// A Prometheus server, killed when dropped.
struct Prometheus {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts Prometheus scraping `target` (`host:port`) every 500 ms.
fn start_prometheus(target: SocketAddr) -> Result<Prometheus> {
    let found = Command::new("sh").args(["-c", "command -v prometheus"]).stdout(Stdio::null()).status()?;
    if !found.success() {
        bail!("the prometheus binary is missing: install it with `apt-get update && apt-get install -y prometheus`");
    }
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 500ms\n  scrape_timeout: 400ms\nscrape_configs:\n  - job_name: shoal\n    metrics_path: /metrics\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )?;
    let port = free_port()?;
    let log = std::fs::File::create(dir.path().join("prometheus.log"))?;
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("tsdb").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("start prometheus")?;
    Ok(Prometheus { child, url: format!("http://127.0.0.1:{port}"), _dir: dir })
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The value of the single series `query` returns, through `/api/v1/query`.
async fn query(prom: &Prometheus, query: &str) -> Option<f64> {
    let url = format!("{}/api/v1/query?query={}", prom.url, percent_encode(query));
    let body: Value = reqwest::get(url).await.ok()?.json().await.ok()?;
    let results = body["data"]["result"].as_array()?;
    if results.len() != 1 {
        return None;
    }
    results[0]["value"][1].as_str()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_job_counter_and_worker_gauge() -> Result<()> {
    let config = ControlConfig {
        tick_ms: 100,
        metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        ..ControlConfig::default()
    };
    let shoal = Shoal::start_with(config, |_| {}).await?;
    let target = shoal.control.as_ref().and_then(|c| c.metrics.as_ref()).context("metrics listener")?.local_addr();
    let prom = start_prometheus(target)?;

    shoal.api.create_endpoint(&rust_endpoint("obs-prom")?).await?;
    for i in 0..2 {
        let req = RunRequest { wait_ms: 30_000, ..RunRequest::new("obs-prom", json!({"n": i})) };
        let done = shoal.api.run(&req).await?;
        anyhow::ensure!(done.status == JobState::Completed, "{done:?}");
    }

    let jobs = r#"shoal_jobs_total{endpoint="obs-prom",state="COMPLETED"}"#;
    eventually(Duration::from_secs(60), "Prometheus has 2 completed jobs", || async {
        (query(&prom, jobs).await == Some(2.0)).then_some(())
    })
    .await?;
    let idle = r#"shoal_workers{endpoint="obs-prom",state="idle"}"#;
    eventually(Duration::from_secs(30), "Prometheus has 1 idle worker", || async {
        (query(&prom, idle).await == Some(1.0)).then_some(())
    })
    .await?;
    // the target is healthy as Prometheus sees it
    let up = format!(r#"up{{instance="{target}"}}"#);
    assert_eq!(query(&prom, &up).await, Some(1.0));
    drop(prom);
    shoal.stop().await;
    Ok(())
}
