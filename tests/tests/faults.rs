//! Faults: a worker process killed mid-job (redelivery, exactly one result), a handler that
//! crashes at start (restarts under backoff, Unhealthy, recovery), a worker that never asks
//! for a job (stopped at its init timeout, Unhealthy, recovery), and a control plane that
//! answers a submission too late (the uploaded input is kept for the job queued after all).

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use futures::StreamExt;
use serde_json::json;
use shoal_actors::blobs::Blobs;
use shoal_actors::client::ApiClient;
use shoal_protocol::ErrorCode;
use shoal_protocol::api::{JobRef, JobsRequest, RunRequest};
use shoal_protocol::codec::from_msgpack;
use shoal_protocol::endpoint::{EndpointSpec, INIT_TIMEOUT_ENV};
use shoal_protocol::events::{JobEvent, WorkerEvent};
use shoal_protocol::job::JobState;
use shoal_protocol::names::Names;
use shoal_protocol::worker::WorkerState;
use shoal_tests::process::ShoalProcess;
use shoal_tests::{NatsServer, Shoal, eventually, python_endpoint, rust_endpoint, test_prefix};

/// A job that kills its worker before its start is recorded (`host.start_record_ms`) still
/// uses an attempt each time: the start is written as the job goes back, so a job that always
/// kills its worker runs as often as its attempts allow, and not once more uncounted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_kills_its_worker_before_its_start_is_recorded_uses_up_its_attempts() -> Result<()> {
    let shoal = Shoal::start_with(Default::default(), |h| h.start_record_ms = 3_000).await?;
    let mut spec = shoal_tests::rust_endpoint("poison")?;
    spec.max_attempts = 2;
    shoal.api.create_endpoint(&spec).await?;
    let submitted = shoal.api.run(&RunRequest::new("poison", json!({"exit": 3}))).await?;
    let jref = JobRef { endpoint: Some("poison".into()), id: submitted.id.clone(), wait_ms: 60_000 };
    let status = shoal.api.status(&jref).await?;
    assert_eq!(status.status, JobState::Failed, "{status:?}");
    assert_eq!(status.attempts, 2, "{status:?}");
    let error = status.error.unwrap_or_default();
    assert!(error.contains("job lost"), "{error}");
    // it ran twice (each run's worker said so in its log before it exited), not a third time
    // on an attempt that went uncounted
    let runs = count_in_files(&shoal.state_dir.path().join("logs"), &format!("job {} asks to exit", submitted.id))?;
    assert_eq!(runs, 2, "the job ran on each of its attempts, and only then");
    // the endpoint's next job runs on the restarted worker
    let ok = shoal.api.run(&RunRequest::new("poison", json!({"n": 1}))).await?;
    let ok = shoal.api.status(&JobRef { endpoint: Some("poison".into()), id: ok.id, wait_ms: 60_000 }).await?;
    assert_eq!(ok.status, JobState::Completed, "{ok:?}");
    shoal.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_job_gets_its_job_redelivered_and_recorded_once() -> Result<()> {
    let shoal = Shoal::start().await?;
    shoal.api.create_endpoint(&python_endpoint("fragile")?).await?;
    let mut events = shoal.nats.client.subscribe(shoal.nats.names.events_of_kind("job")).await?;

    let submitted = shoal.api.run(&RunRequest::new("fragile", json!({"mode": "sleep", "seconds": 3}))).await?;
    let jref = JobRef { endpoint: Some("fragile".into()), id: submitted.id.clone(), wait_ms: 0 };
    let running = eventually(Duration::from_secs(60), "job running", || async {
        shoal.api.status(&jref).await.ok().filter(|s| s.status == JobState::InProgress)
    })
    .await?;
    let worker_id = running.worker_id.context("worker id")?;
    let workers = shoal.api.workers(Some("fragile")).await?;
    let worker = workers.workers.iter().find(|w| w.id == worker_id).context("worker record")?;
    let pid = worker.runtime_ref.as_deref().and_then(|r| r.strip_prefix("pid:")).context("a process worker")?;
    // `sh -c exec python ...`: the pid is the handler's own process
    let killed = std::process::Command::new("kill").args(["-KILL", pid]).status()?;
    ensure!(killed.success(), "kill failed");

    let mut done = jref.clone();
    done.wait_ms = 90_000;
    let status = shoal.api.status(&done).await?;
    assert_eq!(status.status, JobState::Completed, "{status:?}");
    assert_eq!(status.attempts, 2);
    assert_eq!(status.retries, 1);
    assert_eq!(status.output, Some(json!({"slept": 3})));

    // exactly one terminal event for the job
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut terminal = 0;
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_millis(200), events.next()).await {
        let ev: JobEvent = from_msgpack(&msg.payload)?;
        if ev.job_id == submitted.id && ev.state.is_terminal() {
            terminal += 1;
        }
    }
    assert_eq!(terminal, 1);
    shoal.stop().await;
    Ok(())
}

/// A worker that keeps failing is restarted under backoff until `host.backoff.give_up_after_ms`
/// (RunPod's 7 days) have passed without a stable run, then no more: it stays Unhealthy and
/// says why, and the job waiting for it says so. Once the endpoint no longer wants it (nothing
/// left to run), its scaler stops it at once, without waiting out the idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_failing_for_too_long_is_given_up_then_stopped_once_no_longer_wanted() -> Result<()> {
    let shoal = Shoal::start_with(Default::default(), |h| h.backoff.give_up_after_ms = 1_500).await?;
    let mut spec = EndpointSpec::with_command("doomed", "echo 'cannot load the model' >&2; exit 3");
    spec.workers_min = 0;
    spec.workers_max = 1;
    spec.idle_timeout_s = 3_600;
    shoal.api.create_endpoint(&spec).await?;
    let queued = shoal.api.run(&RunRequest::new("doomed", json!({"n": 1}))).await?;
    let jref = JobRef { endpoint: Some("doomed".into()), id: queued.id.clone(), wait_ms: 0 };
    let given_up = eventually(Duration::from_secs(30), "the host to give the worker up", || async {
        let workers = shoal.api.workers(Some("doomed")).await.ok()?;
        workers.workers.into_iter().find(|w| w.reason.as_deref().is_some_and(|r| r.contains("gave up")))
    })
    .await?;
    assert_eq!(given_up.state, WorkerState::Unhealthy);
    let reason = given_up.reason.clone().unwrap_or_default();
    assert!(reason.contains("exited with code 3") && reason.contains("cannot load the model"), "{reason}");
    assert!(given_up.failures >= 2, "{given_up:?}");
    // no restart after that
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    let later = shoal.api.workers(Some("doomed")).await?;
    let same = later.workers.iter().find(|w| w.id == given_up.id).context("the worker's record")?;
    assert_eq!((same.state, same.restarts), (WorkerState::Unhealthy, given_up.restarts), "not restarted");
    let waiting = shoal.api.status(&jref).await?.waiting_reason.unwrap_or_default();
    assert!(waiting.contains("workers are unhealthy") && waiting.contains("gave up"), "{waiting}");
    // nothing left to run: the scaler stops the unhealthy worker (the idle timeout is an hour)
    shoal.api.cancel(&jref).await?;
    eventually(Duration::from_secs(15), "the unhealthy worker to be stopped", || async {
        let workers = shoal.api.workers(Some("doomed")).await.ok()?;
        workers.workers.iter().all(|w| w.state == WorkerState::Stopped).then_some(())
    })
    .await?;
    shoal.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_crashing_at_start_backs_off_turns_unhealthy_and_recovers() -> Result<()> {
    let shoal = Shoal::start().await?;
    let marker = shoal.state_dir.path().join("crash");
    std::fs::write(&marker, "crash")?;
    let mut spec = python_endpoint("crashy")?;
    spec.env.insert("SHOAL_EXAMPLE_CRASH_IF_EXISTS".into(), marker.display().to_string());
    let mut events = shoal.nats.client.subscribe(shoal.nats.names.events_of_kind("worker")).await?;
    shoal.api.create_endpoint(&spec).await?;
    // a job waits for the worker meanwhile
    let queued = shoal.api.run(&RunRequest::new("crashy", json!({"waited": true}))).await?;

    // restarts follow the schedule: 300 ms, 600 ms, 1200 ms (±10 %) ...
    let mut delays = Vec::new();
    let mut unhealthy_reason = None;
    while delays.len() < 4 {
        let msg = tokio::time::timeout(Duration::from_secs(30), events.next()).await?.context("events")?;
        let ev: WorkerEvent = from_msgpack(&msg.payload)?;
        if let Some(d) = ev.backoff_ms {
            delays.push(d);
            if ev.state == WorkerState::Unhealthy {
                unhealthy_reason = ev.reason.clone();
            }
        }
    }
    for (n, d) in delays.iter().enumerate() {
        let nominal = 300.0 * 2f64.powi(n as i32);
        ensure!(
            (*d as f64) >= nominal * 0.89 && (*d as f64) <= nominal * 1.11,
            "delay {n} was {d} ms, expected about {nominal}: {delays:?}"
        );
    }
    let reason = unhealthy_reason.context("reported Unhealthy after repeated failures")?;
    assert!(reason.contains("crash loop") && reason.contains("exited with code 1"), "{reason}");
    assert!(reason.contains("crashing at start"), "the reason carries the log tail: {reason}");
    let listed = shoal.api.workers(Some("crashy")).await?;
    assert!(listed.workers.iter().any(|w| w.state == WorkerState::Unhealthy));
    // the queued job says why it waits
    let why = eventually(Duration::from_secs(10), "the waiting reason names the crash loop", || async {
        let s = shoal
            .api
            .status(&JobRef { endpoint: Some("crashy".into()), id: queued.id.clone(), wait_ms: 0 })
            .await
            .ok()?;
        s.waiting_reason.filter(|r| r.contains("workers are unhealthy") && r.contains("crash loop"))
    })
    .await?;
    assert!(why.contains("crashing at start"), "{why}");

    // the handler is fixed: the next restart works, the worker turns idle and runs the job
    std::fs::remove_file(&marker)?;
    let status =
        shoal.api.status(&JobRef { endpoint: Some("crashy".into()), id: queued.id.clone(), wait_ms: 60_000 }).await?;
    assert_eq!(status.status, JobState::Completed, "{status:?}");
    let healthy = eventually(Duration::from_secs(10), "worker healthy", || async {
        let w = shoal.api.workers(Some("crashy")).await.ok()?;
        w.workers.into_iter().find(|w| w.state == WorkerState::Idle)
    })
    .await?;
    // having taken a job it is healthy again (runpod.md choice 26): its failures are forgotten,
    // and its next failure starts the backoff from the base, not from where the crash loop was
    assert_eq!(healthy.failures, 0, "{healthy:?}");
    let pid = healthy.runtime_ref.as_deref().and_then(|r| r.strip_prefix("pid:")).context("a process worker")?;
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(200), events.next()).await {}
    let killed = std::process::Command::new("kill").args(["-KILL", pid]).status()?;
    ensure!(killed.success(), "kill failed");
    let next = loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), events.next()).await?.context("events")?;
        let ev: WorkerEvent = from_msgpack(&msg.payload)?;
        if ev.backoff_ms.is_some() {
            break ev;
        }
    };
    let delay = next.backoff_ms.unwrap_or_default();
    assert_eq!(next.failures, 1, "{next:?}");
    ensure!((267..=333).contains(&delay), "the first delay again (300 ms ±10 %), was {delay} ms");
    shoal.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_never_asks_for_a_job_is_stopped_at_its_init_timeout_and_reported_unhealthy() -> Result<()> {
    let shoal = Shoal::start().await?;
    let marker = shoal.state_dir.path().join("still-loading");
    std::fs::write(&marker, "")?;
    // a worker that "loads its model" while the marker exists, then serves
    let worker = shoal_tests::example_worker_bin()?;
    let command = format!(
        "echo loading the model; while [ -e '{}' ]; do sleep 0.1; done; exec {}",
        marker.display(),
        worker.display()
    );
    let mut spec = EndpointSpec::with_command("slowstart", &command);
    spec.workers_min = 1;
    spec.workers_max = 1;
    // a value that is not whole seconds is refused, naming the variable
    spec.env.insert(INIT_TIMEOUT_ENV.into(), "7m".into());
    let refused = shoal.api.create_endpoint(&spec).await.err().context("7m refused")?;
    ensure!(refused.message.contains("env.RUNPOD_INIT_TIMEOUT"), "{}", refused.message);
    spec.env.insert(INIT_TIMEOUT_ENV.into(), "1".into());
    let mut events = shoal.nats.client.subscribe(shoal.nats.names.events_of_kind("worker")).await?;
    shoal.api.create_endpoint(&spec).await?;
    let queued = shoal.api.run(&RunRequest::new("slowstart", json!({"waited": true}))).await?;

    // while it starts, its reason says how long it has
    let mut starting = None;
    let mut unhealthy = None;
    while unhealthy.is_none() {
        let msg = tokio::time::timeout(Duration::from_secs(30), events.next()).await?.context("events")?;
        let ev: WorkerEvent = from_msgpack(&msg.payload)?;
        match ev.state {
            WorkerState::Initializing if ev.reason.as_deref().is_some_and(|r| r.contains("init timeout")) => {
                starting = ev.reason;
            }
            WorkerState::Unhealthy => unhealthy = ev.reason,
            _ => {}
        }
    }
    let starting = starting.context("an Initializing reason with the init timeout")?;
    ensure!(starting.contains("waiting for its first request (init timeout 1.0s)"), "{starting}");
    let reason = unhealthy.context("an Unhealthy reason")?;
    for needle in ["initialization timed out", "within 1.0s of its start", "RUNPOD_INIT_TIMEOUT", "loading the model"] {
        ensure!(reason.contains(needle), "{needle:?} not in {reason:?}");
    }
    // the waiting job says why, and is untouched
    let jref = JobRef { endpoint: Some("slowstart".into()), id: queued.id.clone(), wait_ms: 0 };
    eventually(Duration::from_secs(10), "the waiting reason names the init timeout", || async {
        let s = shoal.api.status(&jref).await.ok()?;
        s.waiting_reason.filter(|r| r.contains("workers are unhealthy") && r.contains("initialization timed out"))
    })
    .await?;
    ensure!(shoal.api.status(&jref).await?.attempts == 0, "no attempt was used");

    // the model loads faster now: a restart serves, and the job runs
    std::fs::remove_file(&marker)?;
    let status = shoal.api.status(&JobRef { wait_ms: 60_000, ..jref }).await?;
    ensure!(status.status == JobState::Completed, "{status:?}");
    ensure!(status.output == Some(json!({"waited": true})), "{status:?}");
    shoal.stop().await;
    Ok(())
}

/// How often `needle` occurs in the files under `dir`, at any depth.
fn count_in_files(dir: &std::path::Path, needle: &str) -> Result<usize> {
    let mut n = 0;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        n += if path.is_dir() {
            count_in_files(&path, needle)?
        } else {
            String::from_utf8_lossy(&std::fs::read(&path)?).matches(needle).count()
        };
    }
    Ok(n)
}

/// A client whose submission the control plane answers too late — here its process is stopped
/// (SIGSTOP) with the request in its socket — gets `timeout`, and keeps the large input it
/// uploaded first: the job may be queued all the same, and is, once the control plane runs
/// again. That job reads its input and completes, and the client's retry with the same
/// idempotency key finds it. Had the client removed its upload on `timeout`, as it does on
/// other errors, the job would fail "cannot read the job's input".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submit_answered_too_late_keeps_its_uploaded_input_for_the_job_queued_after_all() -> Result<()> {
    let server = NatsServer::start()?;
    let prefix = test_prefix();
    let names = Names::new(&prefix)?;
    let control = ShoalProcess::start(&server, &prefix, &["control"], &[])?;
    let client = async_nats::connect(&server.url).await?;
    let api = ApiClient::new(client.clone(), names.clone());
    let spec = rust_endpoint("late")?;
    eventually(Duration::from_secs(30), "the control plane answers", || async {
        api.create_endpoint(&spec).await.ok()
    })
    .await
    .with_context(|| control.log())?;
    let host = ShoalProcess::start(&server, &prefix, &["host"], &[])?;
    eventually(Duration::from_secs(60), "an idle worker", || async {
        let workers = api.workers(Some("late")).await.ok()?.workers;
        workers.iter().any(|w| w.state == WorkerState::Idle).then_some(())
    })
    .await
    .with_context(|| host.log())?;

    // an input above the inline limit goes to the object store first, as the CLI and the
    // gateway send it
    let blobs = Blobs::open(client.clone(), &names).await?;
    let input = json!({"blob": "x".repeat(blobs.inline_limit() + 1_000)});
    let mut req = RunRequest::new("late", input.clone());
    req.idempotency_key = Some("once".into());
    let upload = blobs.offload_input(&names, &mut req).await?.context("the input is uploaded")?;
    let input_ref = req.input_ref.clone().context("the request names its upload")?;

    control.signal("STOP")?;
    let impatient = ApiClient::new(client.clone(), names.clone()).with_timeout(Duration::from_secs(2));
    let late = impatient.run_uploaded(&req, Some(upload)).await;
    let resumed = control.signal("CONT");
    let e = late.expect_err("a stopped control plane does not answer");
    resumed?;
    assert_eq!(e.code, ErrorCode::Timeout, "{e:?}");
    assert!(blobs.exists(&input_ref).await?, "the upload is kept after a timeout");

    // the request it did not answer in time, it answers now: the job is queued and runs
    let all = JobsRequest { endpoint: "late".into(), ..JobsRequest::default() };
    let queued = eventually(Duration::from_secs(30), "the late request's job", || async {
        let jobs = api.jobs(&all).await.ok()?.jobs;
        (jobs.len() == 1).then(|| jobs[0].id.clone())
    })
    .await
    .with_context(|| control.log())?;
    let again = api.run(&req).await?;
    assert_eq!(again.id, queued, "the retry with the key finds the job the late request queued");
    let mut done = api.status(&JobRef { endpoint: Some("late".into()), id: queued, wait_ms: 60_000 }).await?;
    assert_eq!(done.status, JobState::Completed, "{done:?}\n{}", host.log());
    blobs.resolve_output(&mut done).await?;
    assert_eq!(done.output, Some(input), "the job read the input the client kept");
    assert_eq!(api.jobs(&all).await?.jobs.len(), 1, "one job for the two submissions");
    Ok(())
}
