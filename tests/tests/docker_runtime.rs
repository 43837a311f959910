//! The Docker runtime on a real engine, with the Rust example worker's image (built locally,
//! no registry): jobs through the bridge from inside a container, scale to zero, warm starts,
//! a container killed from outside, crash logs in the reason and `workers logs`, an image
//! that cannot be pulled, and a container that never asks for a job (the init timeout). These tests need the Docker engine and fail without it.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use futures::StreamExt;
use serde_json::json;
use shoal_actors::host::logs;
use shoal_protocol::api::{JobRef, RunRequest};
use shoal_protocol::codec::from_msgpack;
use shoal_protocol::endpoint::{EndpointSpec, INIT_TIMEOUT_ENV, ScalerKind};
use shoal_protocol::events::WorkerEvent;
use shoal_protocol::host::HostRecord;
use shoal_protocol::job::JobState;
use shoal_protocol::worker::{WorkerRecord, WorkerState};
use shoal_tests::docker::{Sweeper, host_containers, require_docker, run, start_docker_host, worker_image};
use shoal_tests::{Shoal, eventually, test_prefix};

/// A control plane and one host with the Docker runtime (the harness's process host stopped).
async fn docker_shoal() -> Result<(Shoal, String, Sweeper)> {
    require_docker()?;
    let mut shoal = Shoal::start().await?;
    shoal.host.take().context("host")?.stop().await;
    let host_id = format!("dk-{}", test_prefix());
    let sweeper = Sweeper { host_ids: vec![host_id.clone()] };
    let (host, _) = start_docker_host(&shoal.nats, shoal.state_dir.path(), &host_id, |_| {}).await?;
    shoal.host = Some(host);
    Ok((shoal, host_id, sweeper))
}

fn docker_endpoint(id: &str, image: &str) -> EndpointSpec {
    let mut spec = EndpointSpec::with_command(id, "unused");
    spec.command = None;
    spec.image = Some(image.to_string());
    spec.workers_max = 1;
    spec.scaler = ScalerKind::RequestCount;
    spec.scaler_value = 1.0;
    spec.idle_timeout_s = 2;
    spec
}

async fn live_worker(shoal: &Shoal, endpoint: &str, state: WorkerState) -> Result<WorkerRecord> {
    eventually(Duration::from_secs(60), &format!("a {} worker of {endpoint}", state.as_str()), || async {
        let list = shoal.api.workers(Some(endpoint)).await.ok()?;
        list.workers.into_iter().find(|w| w.state == state && w.runtime_ref.is_some())
    })
    .await
}

fn phases(w: &WorkerRecord) -> String {
    w.start.as_ref().map(|s| s.summary()).unwrap_or_else(|| "-".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_docker_host_runs_jobs_in_a_container_scales_to_zero_and_starts_warm_again() -> Result<()> {
    let image = worker_image()?;
    let (shoal, host_id, _sweeper) = docker_shoal().await?;
    let created = shoal.api.create_endpoint(&docker_endpoint("dk-echo", &image)).await?;

    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(shoal.api.run(&RunRequest::new("dk-echo", json!({"n": n, "sleep_ms": 50}))).await?.id);
    }
    for (n, id) in ids.iter().enumerate() {
        let s =
            shoal.api.status(&JobRef { endpoint: Some("dk-echo".into()), id: id.clone(), wait_ms: 120_000 }).await?;
        assert_eq!(s.status, JobState::Completed, "{s:?}");
        assert_eq!(s.output, Some(json!({"n": n, "sleep_ms": 50})));
    }
    let worker = shoal.api.workers(Some("dk-echo")).await?.workers.into_iter().find(|w| w.jobs_done > 0);
    let worker = worker.context("the worker that ran the jobs")?;
    let container = worker.runtime_ref.clone().unwrap_or_default();
    ensure!(container.starts_with("docker:"), "a container runs the worker: {worker:?}");
    let start = worker.start.clone().context("start phases")?;
    assert!(!start.warm && start.create_ms.is_some() && start.first_job_ms.is_some(), "{start:?}");
    println!("cold start: {}", start.summary());
    let running = host_containers(&host_id)?;
    assert_eq!(running.iter().filter(|c| c.running()).count(), 1, "{running:?}");

    // idle past the timeout: scaled to zero, the container stopped and kept warm
    eventually(Duration::from_secs(60), "the worker stopped and its container with it", || async {
        let workers = shoal.api.workers(Some("dk-echo")).await.ok()?.workers;
        let stopped = workers.iter().all(|w| w.state == WorkerState::Stopped);
        let none_running = host_containers(&host_id).ok()?.iter().all(|c| !c.running());
        (stopped && none_running).then_some(())
    })
    .await?;
    let warm_key = format!("dk-echo@{}", created.version);
    eventually(Duration::from_secs(10), "the host lists the endpoint version warm", || async {
        let entry = shoal.nats.hosts.get(&host_id).await.ok()??;
        let rec: HostRecord = from_msgpack(&entry).ok()?;
        rec.warm.contains(&warm_key).then_some(())
    })
    .await?;
    assert_eq!(host_containers(&host_id)?.len(), 1, "one stopped container kept");

    // the next job starts that container again: a warm start
    let s = shoal.api.run(&RunRequest::new("dk-echo", json!({"again": true}))).await?;
    let s = shoal.api.status(&JobRef { endpoint: Some("dk-echo".into()), id: s.id, wait_ms: 120_000 }).await?;
    assert_eq!(s.status, JobState::Completed, "{s:?}");
    // the worker's record is written behind the job path (coalesced, not awaited), and a warm
    // container's worker can ping and take the job before the runtime's start call returns: read
    // the record once it holds both the job and the runtime's start (warm or cold, `start_ms`)
    let again = eventually(Duration::from_secs(10), "the new worker's record with its start and first job", || async {
        let workers = shoal.api.workers(Some("dk-echo")).await.ok()?.workers;
        workers.into_iter().find(|w| {
            w.state != WorkerState::Stopped
                && w.start.as_ref().is_some_and(|s| s.start_ms.is_some() && s.first_job_ms.is_some())
        })
    })
    .await?;
    let warm = again.start.clone().context("start phases")?;
    assert!(warm.warm && warm.create_ms.is_none() && warm.pull_ms.is_none(), "{warm:?}");
    assert_eq!(again.runtime_ref.as_deref(), Some(container.as_str()), "the same container, started again");
    println!("warm start: {}", warm.summary());
    assert_eq!(host_containers(&host_id)?.len(), 1, "no second container");
    // the start metrics tell the cold start from the warm one
    let metrics = shoal_actors::metrics::render();
    for kind in ["cold", "warm"] {
        let series = format!(r#"shoal_worker_starts_total{{endpoint="dk-echo",kind="{kind}"}} 1"#);
        assert!(metrics.lines().any(|l| l.starts_with(&series)), "{series} not in:\n{metrics}");
    }

    // a new version: the old version's container is not kept, the new version starts cold
    let mut v2 = docker_endpoint("dk-echo", &image);
    v2.env.insert("RELEASE".into(), "2".into());
    let v2 = shoal.api.apply_endpoint(&v2).await?;
    let old_label = format!("io.shoal.version={}", created.version);
    eventually(Duration::from_secs(60), "the old version's container discarded", || async {
        host_containers(&host_id).ok()?.iter().all(|c| !c.labels.contains(&old_label)).then_some(())
    })
    .await?;
    let s = shoal.api.run(&RunRequest::new("dk-echo", json!({"version": 2}))).await?;
    let s = shoal.api.status(&JobRef { endpoint: Some("dk-echo".into()), id: s.id, wait_ms: 120_000 }).await?;
    assert_eq!(s.status, JobState::Completed, "{s:?}");
    let newest = shoal.api.workers(Some("dk-echo")).await?.workers;
    let newest = newest.iter().find(|w| w.spec_version == v2.version).context("a worker of the new version")?;
    assert!(newest.start.as_ref().is_some_and(|s| !s.warm), "{newest:?}");
    let label = format!("io.shoal.version={}", v2.version);
    let all = host_containers(&host_id)?;
    assert!(!all.is_empty() && all.iter().all(|c| c.labels.contains(&label)), "{all:?}");
    shoal.stop().await;
    assert!(host_containers(&host_id)?.is_empty(), "a stopped host removes its containers");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_killed_from_outside_is_restarted_warm_under_backoff() -> Result<()> {
    let image = worker_image()?;
    let (shoal, _host_id, _sweeper) = docker_shoal().await?;
    let mut spec = docker_endpoint("dk-kill", &image);
    spec.workers_min = 1;
    let mut events = shoal.nats.client.subscribe(shoal.nats.names.events_of_kind("worker")).await?;
    shoal.api.create_endpoint(&spec).await?;
    let first = live_worker(&shoal, "dk-kill", WorkerState::Idle).await?;
    println!("first start: {}", phases(&first));
    let container = first.runtime_ref.clone().context("container")?;
    let id = container.trim_start_matches("docker:");
    run(std::process::Command::new("docker").args(["kill", id]))?;

    // the supervisor schedules a restart, with the container's fate in the reason
    let restart = loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), events.next()).await?.context("events")?;
        let ev: WorkerEvent = from_msgpack(&msg.payload)?;
        if ev.worker_id == first.id && ev.backoff_ms.is_some() {
            break ev;
        }
    };
    let reason = restart.reason.clone().unwrap_or_default();
    assert!(reason.contains("137") || reason.contains("killed"), "{reason}");
    println!("restart scheduled in {:?} ms: {reason}", restart.backoff_ms);
    // back, warm: the killed container itself, started again
    let back = eventually(Duration::from_secs(60), "the worker idle again after a warm start", || async {
        let list = shoal.api.workers(Some("dk-kill")).await.ok()?;
        list.workers
            .into_iter()
            .find(|w| w.id == first.id && w.state == WorkerState::Idle && w.start.as_ref().is_some_and(|s| s.warm))
    })
    .await?;
    assert_eq!(back.restarts, first.restarts + 1);
    assert_eq!(back.runtime_ref, first.runtime_ref, "the same container");
    let warm = back.start.clone().context("phases")?;
    assert!(warm.start_ms.is_some() && warm.create_ms.is_none(), "{warm:?}");
    println!("warm restart: {}", warm.summary());
    let s = shoal.api.run(&RunRequest::new("dk-kill", json!({"after": "kill"}))).await?;
    let s = shoal.api.status(&JobRef { endpoint: Some("dk-kill".into()), id: s.id, wait_ms: 60_000 }).await?;
    assert_eq!((s.status, s.worker_id.as_deref()), (JobState::Completed, Some(first.id.as_str())), "{s:?}");
    shoal.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_carries_the_containers_last_lines_and_its_log_can_be_read_and_followed() -> Result<()> {
    let image = worker_image()?;
    let (shoal, host_id, _sweeper) = docker_shoal().await?;
    let mut spec = docker_endpoint("dk-crash", &image);
    spec.workers_min = 1;
    spec.max_attempts = 1;
    let mut events = shoal.nats.client.subscribe(shoal.nats.names.events_of_kind("worker")).await?;
    shoal.api.create_endpoint(&spec).await?;
    let worker = live_worker(&shoal, "dk-crash", WorkerState::Idle).await?;
    let (client, names) = (&shoal.nats.client, &shoal.nats.names);
    let mut followed = logs::follow(client, names, &host_id, "dk-crash", &worker.id, 10).await?;
    assert!(followed.next().await.is_some(), "the last lines come first");

    // three crashes in a row: the worker turns Unhealthy, the reason ends with its last line
    for n in 0..3 {
        let job = shoal.api.run(&RunRequest::new("dk-crash", json!({"exit": 3, "n": n}))).await?;
        let s = shoal.api.status(&JobRef { endpoint: Some("dk-crash".into()), id: job.id, wait_ms: 60_000 }).await?;
        assert_eq!(s.status, JobState::Failed, "{s:?}");
    }
    let unhealthy = loop {
        let msg = tokio::time::timeout(Duration::from_secs(60), events.next()).await?.context("events")?;
        let ev: WorkerEvent = from_msgpack(&msg.payload)?;
        if ev.worker_id == worker.id && ev.state == WorkerState::Unhealthy {
            break ev;
        }
    };
    let reason = unhealthy.reason.unwrap_or_default();
    assert!(reason.contains("exited with code 3") && reason.contains("asks to exit with code 3"), "{reason}");
    println!("unhealthy: {reason}");

    // the followed log saw the first crash's line, then ended with that container run
    let mut seen = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(batch) = followed.next().await {
            seen.extend(batch);
        }
    })
    .await
    .context("the followed log ends when the container stops")?;
    assert!(seen.iter().any(|l| l.contains("asks to exit with code 3")), "{seen:?}");
    let lines = logs::get(client, names, &host_id, "dk-crash", &worker.id, 50).await?;
    assert!(lines.iter().filter(|l| l.contains("asks to exit with code 3")).count() >= 3, "{lines:?}");
    let unknown = logs::get(client, names, &host_id, "dk-crash", "w-nobody", 5).await;
    assert!(unknown.is_err_and(|e| e.to_string().contains("no container")));
    shoal.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_that_cannot_be_pulled_makes_the_worker_unhealthy_with_the_reason() -> Result<()> {
    let (shoal, _host_id, _sweeper) = docker_shoal().await?;
    let image = "registry.invalid/shoal/missing:1";
    let mut spec = docker_endpoint("dk-nopull", image);
    spec.workers_min = 1;
    let mut events = shoal.nats.client.subscribe(shoal.nats.names.events_of_kind("worker")).await?;
    shoal.api.create_endpoint(&spec).await?;
    let mut pulling = false;
    let reason = loop {
        let msg = tokio::time::timeout(Duration::from_secs(60), events.next()).await?.context("events")?;
        let ev: WorkerEvent = from_msgpack(&msg.payload)?;
        let reason = ev.reason.clone().unwrap_or_default();
        if ev.state == WorkerState::Initializing && reason.starts_with("pulling image") {
            pulling = true;
        }
        if ev.state == WorkerState::Unhealthy {
            break reason;
        }
    };
    assert!(pulling, "the pull shows in the Initializing reason");
    assert!(reason.contains(&format!("cannot pull image {image}")), "{reason}");
    println!("unhealthy: {reason}");
    let listed = shoal.api.workers(Some("dk-nopull")).await?;
    assert!(listed.workers.iter().any(|w| w.state == WorkerState::Unhealthy), "{listed:?}");
    shoal.stop().await;
    Ok(())
}

/// A container that never asks for a job (it is still "loading its model") is killed at the
/// endpoint's init timeout and reported Unhealthy with its last output, read from the
/// container's log; the job waiting for it keeps its attempts and says why it waits. A new
/// version that loads in time replaces it and runs the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_that_never_asks_for_a_job_is_stopped_at_its_init_timeout() -> Result<()> {
    let image = worker_image()?;
    let (shoal, _host_id, _sweeper) = docker_shoal().await?;
    let mut spec = docker_endpoint("dk-slow", &image);
    spec.workers_min = 1;
    spec.env.insert("SHOAL_EXAMPLE_LOAD_MS".into(), "600000".into());
    spec.env.insert(INIT_TIMEOUT_ENV.into(), "2".into());
    let mut events = shoal.nats.client.subscribe(shoal.nats.names.events_of_kind("worker")).await?;
    shoal.api.create_endpoint(&spec).await?;
    let queued = shoal.api.run(&RunRequest::new("dk-slow", json!({"waited": true}))).await?;
    let reason = loop {
        let msg = tokio::time::timeout(Duration::from_secs(90), events.next()).await?.context("events")?;
        let ev: WorkerEvent = from_msgpack(&msg.payload)?;
        if ev.state == WorkerState::Unhealthy {
            break ev.reason.unwrap_or_default();
        }
    };
    println!("unhealthy: {reason}");
    for needle in ["initialization timed out", "within 2.0s", "loading the model (600000 ms)"] {
        ensure!(reason.contains(needle), "{needle:?} not in {reason:?}");
    }
    let jref = JobRef { endpoint: Some("dk-slow".into()), id: queued.id.clone(), wait_ms: 0 };
    let status = shoal.api.status(&jref).await?;
    assert_eq!((status.status, status.attempts), (JobState::InQueue, 0), "{status:?}");
    eventually(Duration::from_secs(10), "the waiting reason names the init timeout", || async {
        let s = shoal.api.status(&jref).await.ok()?;
        s.waiting_reason.filter(|r| r.contains("initialization timed out"))
    })
    .await?;
    // the image loads in time now: a new version replaces the worker and runs the job
    spec.env.insert("SHOAL_EXAMPLE_LOAD_MS".into(), "0".into());
    shoal.api.apply_endpoint(&spec).await?;
    let done = shoal.api.status(&JobRef { wait_ms: 90_000, ..jref }).await?;
    assert_eq!(done.status, JobState::Completed, "{done:?}");
    assert_eq!(done.output, Some(json!({"waited": true})));
    shoal.stop().await;
    Ok(())
}
