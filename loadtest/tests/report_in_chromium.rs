//! The HTML report as a reader sees it: a tiny burst with the baseline on an embedded
//! installation (a real nats-server, the Rust example worker), its report opened in headless
//! Chromium, and what the browser laid out checked: every plot drawn at its size, each series
//! inside its plot's frame, every label and legend entry inside its picture, the summary's
//! numbers in the page, and nothing wider than the window.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use shoal_loadtest::config::{LoadTest, RuntimeKind, Target};
use shoal_loadtest::{embedded, write_outputs};
use shoal_tests::browser::Browser;

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
    embedded::example_worker_bin().context(
        "this test runs the Rust example worker: `cargo build -p shoal-example-worker` first (scripts/test does)",
    )?;
    let mut test = LoadTest::burst(40);
    test.baseline = true;
    test.target = Target::Embedded {
        runtime: RuntimeKind::Process,
        control_tick_ms: Some(100),
        lease_ttl_s: Some(1),
        fake_start_ms: None,
    };
    test.job_timeout_ms = 60_000;
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
