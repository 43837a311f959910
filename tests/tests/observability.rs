//! Observability: why a queued job waits, seen through the HTTP API; Prometheus metrics on
//! every process; the W3C trace context carried from HTTP onto the job queue.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use futures::StreamExt;
use serde_json::json;
use shoal_actors::control::ControlConfig;
use shoal_actors::trace_context;
use shoal_protocol::api::RunRequest;
use shoal_protocol::job::{JobState, Priority};
use shoal_tests::{Http, Shoal, eventually, python_endpoint, rust_endpoint};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_of_a_job_queued_behind_a_crash_loop_says_so_over_http() -> Result<()> {
    let shoal = Shoal::start().await?;
    let marker = shoal.state_dir.path().join("crash");
    std::fs::write(&marker, "crash")?;
    let mut spec = python_endpoint("crashy")?;
    spec.env.insert("SHOAL_EXAMPLE_CRASH_IF_EXISTS".into(), marker.display().to_string());
    shoal.api.create_endpoint(&spec).await?;
    let gateway = shoal.start_gateway().await?;
    let http = Http::new(&gateway, Some(&shoal.api_key().await?));

    let (code, body) = http.post("/crashy/run", &json!({"input": {"waited": true}})).await?;
    assert_eq!(code, 200, "{body}");
    let id = body["id"].as_str().context("job id")?.to_string();

    let body = eventually(Duration::from_secs(30), "waitingReason names the crash loop", || async {
        let (code, body) = http.get(&format!("/crashy/status/{id}")).await.ok()?;
        let crash_looping = body["waitingReason"]
            .as_str()
            .is_some_and(|r| r.contains("workers are unhealthy") && r.contains("crash loop"));
        (code == 200 && crash_looping).then_some(body)
    })
    .await?;
    assert_eq!(body["status"], "IN_QUEUE", "{body}");
    let why = body["waitingReason"].as_str().unwrap_or_default();
    assert!(why.contains("crashing at start"), "the reason carries the log tail: {why}");

    // once the job ends, the field is gone
    std::fs::remove_file(&marker)?;
    let done = eventually(Duration::from_secs(60), "job completed", || async {
        let (_, body) = http.get(&format!("/crashy/status/{id}")).await.ok()?;
        (body["status"] == "COMPLETED").then_some(body)
    })
    .await?;
    assert!(done.get("waitingReason").is_none(), "{done}");
    shoal.stop().await;
    Ok(())
}

fn metrics_config() -> ControlConfig {
    ControlConfig {
        tick_ms: 100,
        metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        ..ControlConfig::default()
    }
}

/// The value of the sample `name{labels}` in a Prometheus text scrape.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.split(' ').next()?.parse().ok())
}

async fn scrape(url: &str) -> Result<String> {
    let reply = reqwest::get(url).await?;
    anyhow::ensure!(reply.status().is_success(), "{url}: {}", reply.status());
    Ok(reply.text().await?)
}

async fn run_jobs(shoal: &Shoal, endpoint: &str, n: usize) -> Result<()> {
    for i in 0..n {
        let req = RunRequest { wait_ms: 30_000, ..RunRequest::new(endpoint, json!({"n": i})) };
        let done = shoal.api.run(&req).await?;
        anyhow::ensure!(done.status == JobState::Completed, "{done:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_jobs_and_workers_on_control_and_gateway() -> Result<()> {
    let shoal = Shoal::start_with(metrics_config(), |_| {}).await?;
    let url = shoal.control.as_ref().and_then(|c| c.metrics.as_ref()).context("metrics listener")?.url();
    shoal.api.create_endpoint(&rust_endpoint("obs-metrics")?).await?;
    run_jobs(&shoal, "obs-metrics", 3).await?;

    let jobs = r#"shoal_jobs_total{endpoint="obs-metrics",state="COMPLETED"}"#;
    let idle = r#"shoal_workers{endpoint="obs-metrics",state="idle"}"#;
    let text = eventually(Duration::from_secs(10), "3 completed jobs and 1 idle worker", || async {
        let text = scrape(&url).await.ok()?;
        (sample(&text, jobs) == Some(3.0) && sample(&text, idle) == Some(1.0)).then_some(text)
    })
    .await?;
    assert_eq!(sample(&text, r#"shoal_workers{endpoint="obs-metrics",state="unhealthy"}"#), Some(0.0), "{text}");
    assert_eq!(sample(&text, r#"shoal_queue_depth{endpoint="obs-metrics"}"#), Some(0.0), "{text}");
    assert_eq!(sample(&text, r#"shoal_job_execution_seconds_count{endpoint="obs-metrics"}"#), Some(3.0), "{text}");
    assert_eq!(sample(&text, r#"shoal_scaler_decisions_total{endpoint="obs-metrics",decision="started"}"#), Some(1.0));
    assert_eq!(sample(&text, r#"shoal_lease_owned{endpoint="obs-metrics"}"#), Some(1.0), "{text}");
    assert!(sample(&text, r#"shoal_bridge_requests_total{route="job-done",status="200"}"#) >= Some(3.0), "{text}");
    // the worker's start: one, cold (a process), timed from its launch to its first job-take
    assert_eq!(sample(&text, r#"shoal_worker_starts_total{endpoint="obs-metrics",kind="cold"}"#), Some(1.0), "{text}");
    let started = r#"shoal_worker_start_seconds_count{endpoint="obs-metrics",kind="cold"}"#;
    assert_eq!(sample(&text, started), Some(1.0), "{text}");
    let took = sample(&text, r#"shoal_worker_start_seconds_sum{endpoint="obs-metrics",kind="cold"}"#);
    assert!(took.is_some_and(|s| s > 0.0 && s < 60.0), "{took:?}");

    // the gateway serves the same registry, without an API key
    let gateway = shoal.start_gateway().await?;
    let root = gateway.base_url();
    let text = scrape(&format!("{}/metrics", root.trim_end_matches("/v2"))).await?;
    assert_eq!(sample(&text, jobs), Some(3.0), "{text}");
    shoal.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jobs_traceparent_travels_from_http_to_the_job_queue() -> Result<()> {
    let shoal = Shoal::start().await?;
    let mut spec = rust_endpoint("obs-trace")?;
    spec.workers_min = 0;
    spec.workers_max = 0; // the token stays queued: only the published message matters here
    shoal.api.create_endpoint(&spec).await?;
    let gateway = shoal.start_gateway().await?;
    let key = shoal.api_key().await?;
    let subject = shoal.nats.names.job_tokens_of_queue("obs-trace", Priority::Normal);
    let mut tokens = shoal.nats.client.subscribe(subject).await?;

    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let reply = reqwest::Client::new()
        .post(format!("{}/obs-trace/run", gateway.base_url()))
        .header("Authorization", format!("Bearer {key}"))
        .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"))
        .json(&json!({"input": 1}))
        .send()
        .await?;
    assert_eq!(reply.status(), 200);
    let echoed = reply.headers().get("traceparent").context("traceparent in the reply")?.to_str()?.to_string();
    assert_eq!(trace_context::trace_id(&echoed), Some(trace), "{echoed}");

    let token = tokio::time::timeout(Duration::from_secs(10), tokens.next()).await?.context("a job token")?;
    let sent = trace_context::from_headers(token.headers.as_ref()).context("traceparent on the job token")?;
    assert_eq!(trace_context::trace_id(&sent), Some(trace), "{sent}");

    // without one, the gateway starts a trace and names it
    let reply = reqwest::Client::new()
        .post(format!("{}/obs-trace/run", gateway.base_url()))
        .header("Authorization", format!("Bearer {key}"))
        .json(&json!({"input": 2}))
        .send()
        .await?;
    let started = reply.headers().get("traceparent").context("a new trace")?.to_str()?.to_string();
    let token = tokio::time::timeout(Duration::from_secs(10), tokens.next()).await?.context("a job token")?;
    let sent = trace_context::from_headers(token.headers.as_ref()).context("traceparent on the job token")?;
    assert_eq!(trace_context::trace_id(&sent), trace_context::trace_id(&started));
    shoal.stop().await;
    Ok(())
}
