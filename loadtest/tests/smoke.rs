//! The smoke scenario CI runs so the harness never rots: a tiny burst with the baseline and a
//! tiny closed loop, each on an embedded installation (a real nats-server found like the test
//! harness finds it, control and host in-process, the Rust example worker as the handler), through
//! the library API, and once through the binary as users run it. Asserts counts and that the JSON
//! and HTML reports are whole; never wall time.
//! The HTML report is also opened in headless Chromium and its layout checked as a reader sees
//! it: every plot drawn at its size, each series inside its plot's frame, every label and legend
//! entry inside its picture, the summary's numbers in the page, nothing wider than the window.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use shoal_loadtest::config::{LoadTest, RuntimeKind, Target, Transport};
use shoal_loadtest::scenario::Scenario;
use shoal_loadtest::{compare, embedded, write_outputs};
use shoal_tests::browser::Browser;

/// shoal's embedded installation with short ticks, so a new endpoint is picked up in a fraction
/// of a second (the defaults take seconds).
fn quick(jobs: u64) -> LoadTest {
    let mut test = LoadTest::burst(jobs);
    test.target = Target::Embedded {
        runtime: RuntimeKind::Process,
        control_tick_ms: Some(100),
        lease_ttl_s: Some(1),
        fake_start_ms: None,
        start_record_ms: None,
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
    // what the jobs left on the server: each its record and its end event, retained for longer
    // than the run (the baseline's work queue keeps nothing of an acknowledged job)
    let traffic = shoal.server.as_ref().context("the server's numbers")?;
    assert!(traffic.stored_bytes_per_job.is_some_and(|b| b > 100.0), "{traffic:?}");
    assert!(traffic.rss_mib_before.is_some_and(|b| b > 0.0) && traffic.rss_mib_after.is_some(), "{traffic:?}");
    let base_traffic = baseline.server.as_ref().context("the baseline's server numbers")?;
    assert!(base_traffic.stored_bytes_per_job < traffic.stored_bytes_per_job, "{base_traffic:?}");
    let memory = shoal.process_memory.as_ref().context("this process's memory")?;
    assert!(memory.rss_mib_after > 0.0 && memory.peak_mib >= memory.rss_mib_after, "{memory:?}");
    // read at the start and at the end at least, the server's numbers with this process's
    let timeline = &shoal.memory_timeline;
    assert!(timeline.len() >= 2, "{timeline:?}");
    assert!(timeline.windows(2).all(|w| w[0].t_s <= w[1].t_s), "{timeline:?}");
    assert!(
        timeline.iter().all(|p| p.nats_server_mib.is_some() && p.stored_mib.is_some() && p.this_process_mib.is_some()),
        "{timeline:?}"
    );
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
    assert!(html.matches("<svg").count() >= 5, "latency, throughput, percentiles, workers and memory plots");
    assert!(html.contains("Memory over time"));
    assert_eq!(html.matches("<svg").count(), html.matches("</svg>").count());
    assert!(!html.contains("NaN"));
    for points in html.split("points=\"").skip(1).filter_map(|s| s.split('"').next()) {
        for n in points.split([' ', ',']).filter(|t| !t.is_empty()) {
            assert!(n.parse::<f64>().is_ok_and(f64::is_finite), "plotted coordinate {n:?}");
        }
    }
    assert!(!html.contains("<script"), "self-contained, no scripts");
    assert!(report.summary().contains("shoal/baseline"));
    assert!(report.summary().contains("memory (shoal): nats-server "), "{}", report.summary());
    Ok(())
}

/// A client that gathers its waiting jobs into `job.run_batch` requests: every job runs and is
/// reported, in fewer requests than jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_burst_queued_in_batches_reports_every_job() -> Result<()> {
    require_example_worker()?;
    let mut test = quick(300);
    test.submit_batch = 16;
    let report = shoal_loadtest::run(&test).await?;
    let s = &report.shoal;
    ensure!((s.submitted, s.completed, s.errors) == (300, 300, 0), "{:?}", s.errors_by_code);
    assert_eq!(s.queue_delay.count + report.events_missed, 300);
    assert!(report.summary().contains("batches of up to 16 jobs"), "{}", report.summary());
    let requests: u64 = report
        .notes
        .iter()
        .find_map(|n| n.strip_prefix("submitted in ")?.split(' ').next()?.parse().ok())
        .with_context(|| format!("a note on the batch requests: {:?}", report.notes))?;
    assert!((300 / 16..300).contains(&requests), "{requests} requests for 300 jobs");
    // a batch does not wait: a closed loop (sync by default) is refused, as is HTTP
    test.scenario = Scenario::Closed { concurrency: 1, jobs: Some(1), duration_s: None };
    assert!(test.validate().is_err_and(|e| e.contains("--wait async")));
    test.scenario = Scenario::Burst { jobs: 1 };
    test.transport = Transport::Http { url: None, api_key: None };
    assert!(test.validate().is_err_and(|e| e.contains("--http")));
    Ok(())
}

/// Large inputs over NATS, as a client sends them: batches bounded by their bytes, and an
/// input above the inline limit uploaded to the object store first, one by one or in batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_inputs_are_sent_as_a_client_sends_them() -> Result<()> {
    require_example_worker()?;
    let batch_requests = |report: &shoal_loadtest::report::Report| -> Result<u64> {
        report
            .notes
            .iter()
            .find_map(|n| n.strip_prefix("submitted in ")?.split(' ').next()?.parse().ok())
            .with_context(|| format!("a note on the batch requests: {:?}", report.notes))
    };
    // 200 KB inputs travel in their requests: at most two per batch of 512 KB
    let mut test = quick(40);
    test.payload_bytes = 200_000;
    test.submit_batch = 16;
    let report = Box::pin(shoal_loadtest::run(&test)).await?; // boxed: a large future, three times
    let s = &report.shoal;
    ensure!((s.submitted, s.completed, s.errors) == (40, 40, 0), "{:?}", s.errors_by_code);
    assert!(batch_requests(&report)? >= 20, "{:?}", report.notes);
    test.scenario = shoal_loadtest::scenario::Scenario::Burst { jobs: 6 };
    // 1.5 MB inputs (more than a NATS message) are uploaded first, in batches and alone
    test.payload_bytes = 1_500_000;
    let report = Box::pin(shoal_loadtest::run(&test)).await?; // boxed: a large future, three times
    let s = &report.shoal;
    ensure!((s.submitted, s.completed, s.errors) == (6, 6, 0), "batched: {:?}", s.errors_by_code);
    test.submit_batch = 1;
    let report = Box::pin(shoal_loadtest::run(&test)).await?; // boxed: a large future, three times
    let s = &report.shoal;
    ensure!((s.submitted, s.completed, s.errors) == (6, 6, 0), "alone: {:?}", s.errors_by_code);
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

/// The tester as users run it: its embedded installation is stopped with every connection
/// closed before the server goes, so a finished run prints no lost connection (a connection the
/// server drops logs "disconnected from NATS" and tries to connect again).
#[test]
fn the_tester_stops_its_installation_without_a_lost_connection() -> Result<()> {
    require_example_worker()?;
    let out = tempfile::tempdir()?;
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_shoal-loadtest"))
        .args(["burst", "-n", "20", "--workers", "1", "--baseline", "--no-progress"])
        .args(["--control-tick-ms", "100", "--lease-ttl-s", "1", "--name", "smoke"])
        .arg("--out")
        .arg(out.path())
        .output()?;
    let (stdout, stderr) = (String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    ensure!(run.status.success(), "the run failed: {stdout}\n{stderr}");
    ensure!(stdout.contains("completed 20"), "{stdout}");
    for printed in [&stdout, &stderr] {
        ensure!(!printed.contains("disconnected from NATS"), "a connection was lost at the end: {printed}");
    }
    Ok(())
}

/// Where the screenshot goes: `$CARGO_TARGET_DIR/test-artifacts` (or the workspace's `target/`).
fn artifact(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| shoal_tests::repo_root().join("target"));
    target.join("test-artifacts").join(name)
}

/// What the page's layout says, measured by the browser: per plot its rendered size, the series
/// and texts that fall outside where they belong (by more than a pixel), and the page's widths.
const MEASURE: &str = r#"(() => {
  const inside = (b, f) => b.left >= f.left - 1 && b.top >= f.top - 1 && b.right <= f.right + 1 && b.bottom <= f.bottom + 1;
  const plots = [...document.querySelectorAll('svg')].map(svg => {
    const title = svg.querySelector('text')?.textContent ?? '';
    // on screen, transforms (the rotated axis label) applied
    const picture = svg.getBoundingClientRect();
    const frame = svg.querySelector('rect')?.getBoundingClientRect();
    const series = [...svg.querySelectorAll('polyline')];
    const outOfFrame = frame ? series.filter(p => !inside(p.getBoundingClientRect(), frame)).map(p => p.querySelector('title')?.textContent) : [];
    const outOfPicture = [...svg.querySelectorAll('text')].filter(t => !inside(t.getBoundingClientRect(), picture)).map(t => t.textContent);
    return { title, width: picture.width, height: picture.height, hasFrame: !!frame, series: series.length, outOfFrame, outOfPicture };
  });
  return {
    plots,
    pageWidth: document.documentElement.scrollWidth,
    windowWidth: window.innerWidth,
    text: document.body.innerText,
  };
})()"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_html_report_lays_out_whole_in_chromium() -> Result<()> {
    // first, so that a machine without Chromium fails at once with how to install it
    let browser = Browser::launch(1280, 900).await?;
    require_example_worker()?;
    let mut test = quick(40);
    test.baseline = true;
    let report = shoal_loadtest::run(&test).await?;
    ensure!(report.shoal.completed == 40, "shoal: {:?}", report.shoal.errors_by_code);
    let dir = tempfile::tempdir()?;
    let (_, html) = write_outputs(&report, dir.path(), "report")?;

    browser.goto(&format!("file://{}", html.display())).await?;
    let page = browser.eval(MEASURE).await?;
    browser.screenshot(&artifact("loadtest-report.png")).await?;

    let plots = page["plots"].as_array().context("plots measured")?;
    let titles: Vec<&str> = plots.iter().filter_map(|p| p["title"].as_str()).collect();
    for wanted in [
        "End-to-end latency over time",
        "Throughput over time",
        "End-to-end latency by percentile",
        "Workers over time",
        "Memory over time",
    ] {
        ensure!(titles.iter().any(|t| t.starts_with(wanted)), "no plot titled {wanted:?} among {titles:?}");
    }
    for plot in plots {
        let title = &plot["title"];
        ensure!(
            plot["width"].as_f64() > Some(100.0) && plot["height"].as_f64() > Some(100.0),
            "{title} is drawn at {} x {}",
            plot["width"],
            plot["height"]
        );
        ensure!(
            plot["hasFrame"] == Value::Bool(true) && plot["series"].as_u64() > Some(0),
            "{title} has no data: {plot}"
        );
        ensure!(plot["outOfFrame"].as_array().is_some_and(Vec::is_empty), "{title}: series outside the frame: {plot}");
        ensure!(plot["outOfPicture"].as_array().is_some_and(Vec::is_empty), "{title}: text cut off: {plot}");
    }
    // the latency and throughput plots carry both runs: shoal's and the baseline's series
    let over_time = plots
        .iter()
        .find(|p| p["title"].as_str().is_some_and(|t| t.starts_with("Throughput")))
        .context("a throughput plot")?;
    ensure!(over_time["series"].as_u64() == Some(2), "shoal and the baseline in {over_time}");
    // the memory plot: nats-server's and this process's resident memory and JetStream's store
    let memory =
        plots.iter().find(|p| p["title"].as_str().is_some_and(|t| t.starts_with("Memory"))).context("a memory plot")?;
    ensure!(memory["series"].as_u64() == Some(3), "three lines in {memory}");

    let text = page["text"].as_str().unwrap_or_default();
    ensure!(text.contains("shoal / baseline:") && text.contains("% of the throughput"), "no ratio in the page");
    ensure!(text.contains("baseline (raw JetStream)"), "no baseline row in the summary");
    ensure!(
        page["pageWidth"].as_f64() <= page["windowWidth"].as_f64(),
        "the page is wider ({}) than the window ({})",
        page["pageWidth"],
        page["windowWidth"]
    );
    // the browser is dropped (killed) here, after a last look that it still answers
    tokio::time::timeout(Duration::from_secs(5), browser.eval("1")).await??;
    Ok(())
}
