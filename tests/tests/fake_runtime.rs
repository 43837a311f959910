//! The fake runtime: simulated workers (no process) that speak the worker protocol to the
//! bridge, so the scaler and placement can be exercised at size.

use std::sync::Arc;

use anyhow::{Context, Result};
use serde_json::json;
use shoal_actors::runtime::fake::FakeRuntime;
use shoal_protocol::api::{JobRef, RunRequest};
use shoal_protocol::endpoint::{EndpointSpec, ScalerKind};
use shoal_protocol::job::JobState;
use shoal_protocol::worker::WorkerState;
use shoal_tests::Shoal;
use shoal_tests::cluster::start_host_with;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_workers_scale_and_run_a_burst() -> Result<()> {
    let mut shoal = Shoal::start().await?;
    // only the fake host: stop the process host so every worker is simulated
    shoal.host.take().context("host")?.stop().await;
    let runtime = Arc::new(FakeRuntime { start_latency_ms: 50, job_duration_ms: 20 });
    let fake = start_host_with(&shoal.nats, shoal.state_dir.path(), "fake-host", runtime, |_| {}).await?;
    for ep in ["sim-a", "sim-b"] {
        let mut spec = EndpointSpec::with_command(ep, "unused by the fake runtime");
        spec.image = Some("example/worker:1".into());
        spec.workers_max = 20;
        spec.scaler = ScalerKind::RequestCount;
        spec.scaler_value = 2.0;
        spec.idle_timeout_s = 1;
        if ep == "sim-b" {
            // two workers with four job slots each, taking in batches
            spec.workers_max = 2;
            spec.concurrency = 4;
        }
        shoal.api.create_endpoint(&spec).await?;
    }
    let mut ids = Vec::new();
    for n in 0..100 {
        let (ep, input) =
            if n % 2 == 0 { ("sim-a", json!({"n": n})) } else { ("sim-b", json!({"n": n, "sleep_ms": 200})) };
        ids.push((ep, shoal.api.run(&RunRequest::new(ep, input)).await?.id));
    }
    let most = shoal_tests::several_jobs_on_one_worker(&shoal.api, "sim-b").await?;
    assert!(most <= 4, "never more jobs than slots: {most}");
    for (ep, id) in ids {
        let s = shoal.api.status(&JobRef { endpoint: Some(ep.into()), id, wait_ms: 60_000 }).await?;
        assert_eq!(s.status, JobState::Completed, "{s:?}");
        assert!(s.output.is_some_and(|o| o.get("n").is_some()));
        assert!(s.worker_id.is_some());
    }
    let workers = shoal.api.workers(None).await?.workers;
    assert!(workers.iter().all(|w| w.host == "fake-host"));
    assert!(workers.iter().filter(|w| w.state != WorkerState::Stopped).count() <= 40);
    fake.stop().await;
    shoal.stop().await;
    Ok(())
}
