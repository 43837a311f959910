//! Autoscaling against real worker processes: REQUEST_COUNT and QUEUE_DELAY, scale to zero,
//! low priority, placement over GPU types with Throttled workers, rolling updates.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::json;
use shoal_actors::control::ControlConfig;
use shoal_protocol::api::{JobRef, RunRequest};
use shoal_protocol::endpoint::{EndpointSpec, ScalerKind};
use shoal_protocol::job::{JobState, PolicyRequest};
use shoal_protocol::worker::WorkerState;
use shoal_tests::cluster::start_host;
use shoal_tests::{Shoal, eventually, rust_endpoint};

fn autoscaled(id: &str, scaler: ScalerKind, value: f64, max: u32) -> Result<EndpointSpec> {
    let mut spec = rust_endpoint(id)?;
    spec.workers_min = 0;
    spec.workers_max = max;
    spec.scaler = scaler;
    spec.scaler_value = value;
    spec.idle_timeout_s = 1;
    Ok(spec)
}

/// Workers that exist (not stopped, not merely wanted).
async fn running_workers(shoal: &Shoal, endpoint: &str) -> Vec<shoal_protocol::worker::WorkerRecord> {
    shoal
        .api
        .workers(Some(endpoint))
        .await
        .map(|l| {
            l.workers
                .into_iter()
                .filter(|w| !matches!(w.state, WorkerState::Stopped | WorkerState::Throttled))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_count_scales_a_burst_to_max_then_back_to_zero() -> Result<()> {
    let shoal = Shoal::start().await?;
    shoal.api.create_endpoint(&autoscaled("burst", ScalerKind::RequestCount, 1.0, 5)?).await?;
    let mut ids = Vec::new();
    for n in 0..50 {
        ids.push(shoal.api.run(&RunRequest::new("burst", json!({"sleep_ms": 150, "n": n}))).await?.id);
    }
    let mut most = 0;
    let mut done = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while done < ids.len() {
        anyhow::ensure!(std::time::Instant::now() < deadline, "burst did not finish: {done} of {}", ids.len());
        let n = running_workers(&shoal, "burst").await.len();
        assert!(n <= 5, "never more than max workers: {n}");
        most = most.max(n);
        done = 0;
        for id in &ids {
            let s = shoal.api.status(&JobRef { endpoint: Some("burst".into()), id: id.clone(), wait_ms: 0 }).await?;
            assert!(!matches!(s.status, JobState::Failed | JobState::TimedOut | JobState::Cancelled), "{s:?}");
            if s.status == JobState::Completed {
                done += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(most, 5, "the burst scaled to max");
    eventually(Duration::from_secs(30), "scale to zero after the idle timeout", || async {
        running_workers(&shoal, "burst").await.is_empty().then_some(())
    })
    .await?;
    shoal.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_delay_starts_the_first_worker_at_once_and_low_priority_alone_never_scales_up() -> Result<()> {
    let shoal = Shoal::start().await?;
    // a delay of an hour: a second worker is never due during this test
    let mut lazy = autoscaled("lazy", ScalerKind::QueueDelay, 3600.0, 2)?;
    lazy.idle_timeout_s = 60;
    shoal.api.create_endpoint(&lazy).await?;
    shoal.api.create_endpoint(&autoscaled("low", ScalerKind::RequestCount, 1.0, 2)?).await?;

    // low priority on an endpoint at zero: nothing starts, the job waits
    let mut low = RunRequest::new("low", json!({"low": true}));
    low.policy = Some(PolicyRequest { low_priority: true, ..Default::default() });
    let low = shoal.api.run(&low).await?;

    // a job on an endpoint with no worker starts one at once, not after the queue delay
    let mut req = RunRequest::new("lazy", json!({"x": 1}));
    req.wait_ms = 60_000;
    let done = shoal.api.run(&req).await?;
    assert_eq!(done.status, JobState::Completed, "{done:?}");
    // with that worker up, more jobs queue behind it: no second worker before the delay
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(shoal.api.run(&RunRequest::new("lazy", json!({"sleep_ms": 300, "n": n}))).await?.id);
    }
    for id in ids {
        let s = shoal.api.status(&JobRef { endpoint: Some("lazy".into()), id, wait_ms: 30_000 }).await?;
        assert_eq!(s.status, JobState::Completed, "{s:?}");
        let n = running_workers(&shoal, "lazy").await.len();
        assert_eq!(n, 1, "QUEUE_DELAY adds a worker only once a job waited past the value");
    }

    assert!(running_workers(&shoal, "low").await.is_empty(), "low-priority jobs alone never scale up from zero");
    let s = shoal.api.status(&JobRef { endpoint: Some("low".into()), id: low.id.clone(), wait_ms: 0 }).await?;
    assert_eq!(s.status, JobState::InQueue);
    // a normal job brings a worker, which then also serves the low-priority one
    let mut normal = RunRequest::new("low", json!({"normal": true}));
    normal.wait_ms = 60_000;
    assert_eq!(shoal.api.run(&normal).await?.status, JobState::Completed);
    let s = shoal.api.status(&JobRef { endpoint: Some("low".into()), id: low.id, wait_ms: 30_000 }).await?;
    assert_eq!(s.status, JobState::Completed);
    shoal.stop().await;
    Ok(())
}

/// The scaler ticks once an hour here, so only the wake from the endpoint actor can start the
/// worker: a job queued on an endpoint at zero does not wait for the scaler's tick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_on_an_endpoint_at_zero_wakes_the_scaler_without_waiting_for_its_tick() -> Result<()> {
    let config = ControlConfig { tick_ms: 100, scaler_tick_ms: Some(3_600_000), ..ControlConfig::default() };
    let shoal = Shoal::start_with(config, |_| {}).await?;
    for (id, scaler) in [("rc", ScalerKind::RequestCount), ("qd", ScalerKind::QueueDelay)] {
        shoal.api.create_endpoint(&autoscaled(id, scaler, 10.0, 3)?).await?;
        // low priority alone wakes nothing
        let mut low = RunRequest::new(id, json!({"low": true}));
        low.policy = Some(PolicyRequest { low_priority: true, ..Default::default() });
        let low = shoal.api.run(&low).await?;
        let s = shoal.api.status(&JobRef { endpoint: Some(id.into()), id: low.id.clone(), wait_ms: 1_000 }).await?;
        assert_eq!(s.status, JobState::InQueue, "{s:?}");
        assert!(running_workers(&shoal, id).await.is_empty(), "low-priority jobs alone never scale up from zero");
        // a burst of normal jobs: one wake, one worker, every job done
        let mut ids = Vec::new();
        for n in 0..5 {
            ids.push(shoal.api.run(&RunRequest::new(id, json!({"n": n}))).await?.id);
        }
        for job in ids.into_iter().chain([low.id]) {
            let s = shoal.api.status(&JobRef { endpoint: Some(id.into()), id: job, wait_ms: 60_000 }).await?;
            assert_eq!(s.status, JobState::Completed, "{id}: {s:?}");
        }
        assert_eq!(running_workers(&shoal, id).await.len(), 1, "{id}: the wake starts the first worker only");
    }
    shoal.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_land_on_the_highest_priority_gpu_type_then_the_next_then_throttle() -> Result<()> {
    let shoal = Shoal::start_with(ControlConfig { tick_ms: 100, ..Default::default() }, |h| {
        h.fake_gpus = Some("NVIDIA H200:1".into())
    })
    .await?;
    let second =
        start_host(&shoal.nats, shoal.state_dir.path(), "a100-host", |h| h.fake_gpus = Some("NVIDIA A100:2".into()))
            .await?;
    let h200 = shoal.host.as_ref().map(|h| h.id.clone()).context("host")?;
    let mut spec = autoscaled("gpu", ScalerKind::RequestCount, 1.0, 4)?;
    spec.gpu_types = vec!["NVIDIA H200".into(), "NVIDIA A100".into()];
    shoal.api.create_endpoint(&spec).await?;
    for n in 0..4 {
        shoal.api.run(&RunRequest::new("gpu", json!({"sleep_ms": 20_000, "n": n}))).await?;
    }
    let workers = eventually(Duration::from_secs(60), "3 placed and 1 throttled", || async {
        let w = shoal.api.workers(Some("gpu")).await.ok()?.workers;
        let placed = w
            .iter()
            .filter(|w| matches!(w.state, WorkerState::Running | WorkerState::Idle | WorkerState::Initializing))
            .count();
        let throttled = w.iter().filter(|w| w.state == WorkerState::Throttled).count();
        (placed == 3 && throttled == 1).then_some(w)
    })
    .await?;
    let on: Vec<&str> = workers.iter().filter(|w| w.state != WorkerState::Throttled).map(|w| w.host.as_str()).collect();
    assert_eq!(on.iter().filter(|h| **h == h200).count(), 1, "one on the H200 host");
    assert_eq!(on.iter().filter(|h| **h == "a100-host").count(), 2, "the rest on the A100 host");
    let throttled = workers.iter().find(|w| w.state == WorkerState::Throttled).context("throttled")?;
    assert!(throttled.reason.as_deref().unwrap_or_default().contains("no capacity"), "{throttled:?}");
    let health = shoal.api.health("gpu").await?;
    assert_eq!(health.workers.throttled, 1);
    second.stop().await;
    shoal.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_update_replaces_workers_one_at_a_time_without_failing_a_job() -> Result<()> {
    let shoal = Shoal::start().await?;
    let mut spec = rust_endpoint("roll")?;
    spec.workers_min = 10;
    spec.workers_max = 10;
    spec.scaler = ScalerKind::RequestCount;
    shoal.api.create_endpoint(&spec).await?;
    eventually(Duration::from_secs(60), "10 workers idle", || async {
        let w = running_workers(&shoal, "roll").await;
        (w.iter().filter(|w| w.state == WorkerState::Idle).count() == 10).then_some(())
    })
    .await?;
    let v1: HashSet<String> = running_workers(&shoal, "roll").await.into_iter().map(|w| w.id).collect();

    // keep jobs flowing through the update
    let api = shoal.api.clone();
    let load = tokio::spawn(async move {
        let mut ids = Vec::new();
        for n in 0..60 {
            if let Ok(s) = api.run(&RunRequest::new("roll", json!({"sleep_ms": 300, "n": n}))).await {
                ids.push(s.id);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ids
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    spec.env.insert("RELEASE".into(), "2".into());
    let updated = shoal.api.apply_endpoint(&spec).await?;
    assert_eq!(updated.version, 2);

    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let w = running_workers(&shoal, "roll").await;
        assert!(w.len() <= 10, "never above max: {}", w.len());
        let draining = w.iter().filter(|w| w.state == WorkerState::Outdated).count();
        assert!(draining <= 1, "replaced one at a time (10 % of max 10): {draining} draining");
        if w.len() == 10 && w.iter().all(|w| w.spec_version == 2) {
            break;
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "rollout did not finish");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let health = shoal.api.health("roll").await?;
    assert_eq!((health.rollout.workers_on_latest, health.rollout.workers_total), (10, 10));
    let v2: HashSet<String> = running_workers(&shoal, "roll").await.into_iter().map(|w| w.id).collect();
    assert!(v1.is_disjoint(&v2), "every worker was replaced");
    for id in load.await? {
        let s = shoal.api.status(&JobRef { endpoint: Some("roll".into()), id, wait_ms: 60_000 }).await?;
        assert_eq!(s.status, JobState::Completed, "no job fails during the update: {s:?}");
    }
    shoal.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_host_finishes_its_jobs_takes_no_new_worker_and_its_workers_start_elsewhere() -> Result<()> {
    let shoal = Shoal::start().await?;
    let mut spec = rust_endpoint("drained")?;
    spec.workers_min = 1;
    spec.workers_max = 1;
    shoal.api.create_endpoint(&spec).await?;
    let first = eventually(Duration::from_secs(30), "a worker idle", || async {
        running_workers(&shoal, "drained").await.into_iter().find(|w| w.state == WorkerState::Idle)
    })
    .await?;
    let old_host = first.host.clone();
    // named to sort last: placement would pick the old host on a tie, were it not draining
    let spare = start_host(&shoal.nats, shoal.state_dir.path(), "zz-spare", |_| {}).await?;

    // a job runs on the host about to be drained
    let long = shoal.api.run(&RunRequest::new("drained", json!({"sleep_ms": 2_000}))).await?;
    let long = JobRef { endpoint: Some("drained".into()), id: long.id, wait_ms: 0 };
    eventually(Duration::from_secs(30), "the job running", || async {
        shoal.api.status(&long).await.ok().filter(|s| s.status == JobState::InProgress).map(|_| ())
    })
    .await?;
    shoal_actors::host::set_draining(&shoal.nats.client, &shoal.nats.names, &old_host, true)
        .await
        .map_err(anyhow::Error::msg)?;
    let listed = shoal.api.hosts().await?.hosts;
    let record = listed.iter().find(|h| h.id == old_host).context("the drained host is listed")?;
    anyhow::ensure!(record.draining, "{record:?}");

    // the job finishes where it runs, on its first attempt: nothing was killed
    let done = shoal.api.status(&JobRef { wait_ms: 30_000, ..long.clone() }).await?;
    anyhow::ensure!(done.status == JobState::Completed && done.attempts == 1, "{done:?}");
    anyhow::ensure!(done.worker_id.as_deref() == Some(first.id.as_str()), "{done:?}");
    // then the worker stops and its replacement starts on the other host
    let replacement = eventually(Duration::from_secs(30), "a replacement idle on the spare host", || async {
        let workers = shoal.api.workers(Some("drained")).await.ok()?.workers;
        // stopped: recorded so, or already forgotten
        let old_gone = workers.iter().all(|w| w.id != first.id || w.state == WorkerState::Stopped);
        let new = workers.into_iter().find(|w| w.state == WorkerState::Idle && w.host == "zz-spare");
        new.filter(|_| old_gone)
    })
    .await?;
    let on_old: Vec<_> = shoal
        .api
        .workers(Some("drained"))
        .await?
        .workers
        .into_iter()
        .filter(|w| w.host == old_host && w.id != first.id)
        .collect();
    anyhow::ensure!(on_old.is_empty(), "no new worker on the drained host: {on_old:?}");
    let hosts = shoal.api.hosts().await?.hosts;
    anyhow::ensure!(hosts.iter().any(|h| h.id == old_host && h.workers == 0), "{hosts:?}");
    let next = shoal.api.run(&RunRequest { wait_ms: 30_000, ..RunRequest::new("drained", json!({"n": 2})) }).await?;
    anyhow::ensure!(next.status == JobState::Completed, "{next:?}");
    anyhow::ensure!(next.worker_id.as_deref() == Some(replacement.id.as_str()), "{next:?}");

    // resumed, it is in service again; an unknown host is named in the error
    shoal_actors::host::set_draining(&shoal.nats.client, &shoal.nats.names, &old_host, false)
        .await
        .map_err(anyhow::Error::msg)?;
    let hosts = shoal.api.hosts().await?.hosts;
    anyhow::ensure!(hosts.iter().any(|h| h.id == old_host && !h.draining), "{hosts:?}");
    let err = shoal_actors::host::set_draining(&shoal.nats.client, &shoal.nats.names, "nope", true)
        .await
        .expect_err("no such host");
    anyhow::ensure!(err.contains("host nope does not answer"), "{err}");
    spare.stop().await;
    shoal.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_go_only_to_hosts_with_the_endpoints_labels_and_cuda_version() -> Result<()> {
    let shoal = Shoal::start().await?;
    let labelled = start_host(&shoal.nats, shoal.state_dir.path(), "eu-host", |h| {
        h.labels.insert("datacenter".into(), "eu-1".into());
        h.cuda_version = Some("12.4".into());
    })
    .await?;
    // the host tells what it is
    let hosts = eventually(Duration::from_secs(10), "the labelled host listed", || async {
        let hosts = shoal.api.hosts().await.ok()?.hosts;
        hosts.iter().any(|h| h.id == "eu-host").then_some(hosts)
    })
    .await?;
    let eu = hosts.iter().find(|h| h.id == "eu-host").context("eu-host")?;
    assert_eq!(eu.labels.get("datacenter").map(String::as_str), Some("eu-1"));
    assert_eq!(eu.cuda_version.as_deref(), Some("12.4"));

    // an endpoint asking for the label runs there, and only there
    let mut zoned = rust_endpoint("zoned")?;
    zoned.workers_min = 2;
    zoned.workers_max = 2;
    zoned.host_labels.insert("datacenter".into(), "eu-1".into());
    zoned.min_cuda_version = Some("12.0".into());
    shoal.api.create_endpoint(&zoned).await?;
    let placed = eventually(Duration::from_secs(30), "two zoned workers idle", || async {
        let w = running_workers(&shoal, "zoned").await;
        (w.len() == 2 && w.iter().all(|w| w.state == WorkerState::Idle)).then_some(w)
    })
    .await?;
    assert!(placed.iter().all(|w| w.host == "eu-host"), "{placed:?}");
    let done = shoal.api.run(&RunRequest { wait_ms: 30_000, ..RunRequest::new("zoned", json!({"n": 1})) }).await?;
    assert_eq!(done.status, JobState::Completed, "{done:?}");

    // one asking for a newer CUDA than any host has waits, and says why
    let mut newer = rust_endpoint("newer-cuda")?;
    newer.min_cuda_version = Some("12.8".into());
    shoal.api.create_endpoint(&newer).await?;
    let queued = shoal.api.run(&RunRequest::new("newer-cuda", json!({"n": 2}))).await?;
    let jref = JobRef { endpoint: Some("newer-cuda".into()), id: queued.id, wait_ms: 0 };
    let why = eventually(Duration::from_secs(30), "the waiting reason names the CUDA version", || async {
        shoal.api.status(&jref).await.ok()?.waiting_reason.filter(|r| r.contains("below CUDA 12.8"))
    })
    .await?;
    assert!(why.contains("throttled") && why.contains("(2 below CUDA 12.8)"), "{why}");
    let throttled = shoal.api.workers(Some("newer-cuda")).await?.workers;
    assert!(throttled.iter().all(|w| w.state == WorkerState::Throttled), "{throttled:?}");
    labelled.stop().await;
    shoal.stop().await;
    Ok(())
}
