//! The smoke scenario CI runs so the harness never rots: a tiny burst with the baseline and a
//! tiny closed loop, each on an embedded installation (a real nats-server found like the test
//! harness finds it, control and host in-process, the Rust example worker as the handler), through
//! the library API. Asserts counts and that the JSON and HTML reports are whole; never wall time.

use anyhow::{Context, Result, ensure};
use shoal_loadtest::config::{LoadTest, RuntimeKind, Target, Transport};
use shoal_loadtest::scenario::Scenario;
use shoal_loadtest::{compare, embedded, write_outputs};

/// shoal's embedded installation with short ticks, so a new endpoint is picked up in a fraction
/// of a second (the defaults take seconds).
fn quick(jobs: u64) -> LoadTest {
    let mut test = LoadTest::burst(jobs);
    test.target = Target::Embedded {
        runtime: RuntimeKind::Process,
        control_tick_ms: Some(100),
        lease_ttl_s: Some(1),
        fake_start_ms: None,
    };
    test.job_timeout_ms = 60_000;
    test
}

fn require_example_worker() -> Result<()> {
    embedded::example_worker_bin().map(|_| ()).context(
        "the smoke test runs the Rust example worker: `cargo build -p shoal-example-worker` first (scripts/test does)",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_burst_with_baseline_reports_every_job() -> Result<()> {
    require_example_worker()?;
    let mut test = quick(40);
    test.baseline = true;
    let report = shoal_loadtest::run(&test).await?;

    let (shoal, baseline) = (&report.shoal, report.baseline.as_ref().context("the baseline ran")?);
    ensure!((shoal.submitted, shoal.completed, shoal.errors) == (40, 40, 0), "shoal: {:?}", shoal.errors_by_code);
    ensure!((baseline.submitted, baseline.completed) == (40, 40), "baseline: {:?}", baseline.errors_by_code);
    assert_eq!(shoal.e2e.count, 40);
    assert_eq!(shoal.queue_delay.count + report.events_missed, 40, "every job has a queue delay");
    assert!(shoal.jobs_per_s > 0.0 && baseline.jobs_per_s > 0.0);
    assert!(shoal.e2e.p50_ms <= shoal.e2e.p99_ms && shoal.e2e.p99_ms <= shoal.e2e.max_ms);
    let ratio = report.ratio.as_ref().context("a ratio to the baseline")?;
    assert!(ratio.throughput_pct > 0.0);
    assert_eq!(report.mode, "nats/async");
    // the two warm workers of the fresh endpoint started while the tester watched
    assert_eq!(report.workers.max_ready, 2, "{:?}", report.workers.timeline);
    assert_eq!(report.workers.cold_starts.len(), 2, "{:?}", report.workers.cold_starts);
    assert!(report.workers.cold_starts.iter().all(|c| c.initializing_ms.is_some()));

    let dir = tempfile::tempdir()?;
    let (json_path, html_path) = write_outputs(&report, dir.path(), "smoke")?;
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&json_path)?)?;
    assert_eq!(json["shoal"]["completed"], 40);
    assert_eq!(json["baseline"]["completed"], 40);
    assert_eq!(json["test"]["scenario"]["kind"], "burst");
    let reread = compare::load(&json_path)?;
    assert_eq!(reread.shoal, report.shoal);
    let diff = compare::compare(&reread, &report);
    assert!(diff.contains("e2e p99 ms") && diff.contains("shoal/baseline %"), "{diff}");

    let html = std::fs::read_to_string(&html_path)?;
    assert!(html.starts_with("<!doctype html>") && html.trim_end().ends_with("</html>"));
    assert!(html.matches("<svg").count() >= 4, "latency, throughput, percentiles and workers plots");
    assert_eq!(html.matches("<svg").count(), html.matches("</svg>").count());
    assert!(!html.contains("NaN"));
    for points in html.split("points=\"").skip(1).filter_map(|s| s.split('"').next()) {
        for n in points.split([' ', ',']).filter(|t| !t.is_empty()) {
            assert!(n.parse::<f64>().is_ok_and(f64::is_finite), "plotted coordinate {n:?}");
        }
    }
    assert!(!html.contains("<script"), "self-contained, no scripts");
    assert!(report.summary().contains("shoal/baseline"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_closed_loop_through_the_http_gateway_waits_in_the_request() -> Result<()> {
    require_example_worker()?;
    let mut test = quick(1);
    test.transport = Transport::Http { url: None, api_key: None };
    test.scenario = Scenario::Closed { concurrency: 2, jobs: Some(20), duration_s: None };
    test.payload_bytes = 256;
    test.endpoint.workers_min = 1;
    test.endpoint.workers_max = 1;
    let report = shoal_loadtest::run(&test).await?;
    assert_eq!(report.mode, "http/sync");
    let s = &report.shoal;
    ensure!((s.submitted, s.completed) == (20, 20), "{:?}", s.errors_by_code);
    // /runsync replies carry shoal's own delay and execution times
    assert_eq!(s.queue_delay.count, 20);
    assert_eq!(s.execution.count, 20);
    assert!(report.baseline.is_none() && report.ratio.is_none());
    assert_eq!(report.workers.max_ready, 1);
    Ok(())
}
