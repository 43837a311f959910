//! shoal-loadtest: the load generator users run to size a deployment, and shoal's yardstick.
//!
//! A [`config::LoadTest`] names a [`scenario::Scenario`] (burst, constant rate, ramp, step,
//! closed loop), how jobs are submitted (NATS API or the HTTP gateway, waiting in the request or
//! watching the job events), what they do (no-op, sleep, the runpod Python handler), the
//! endpoint settings and the installation: an existing one (`--nats URL --prefix P`) or one of
//! its own ([`embedded`]: a child nats-server, control plane and host in this process).
//! [`run`] optionally first runs the same scenario as a raw JetStream work-queue round trip
//! ([`baseline`]), then shoal, and returns a [`report::Report`]: percentiles (hdrhistogram),
//! throughput, errors by code, workers over time and cold starts ([`workers`]), written as JSON
//! and as a self-contained HTML page ([`html`]); [`compare`] diffs two reports.
//!
//! It is a client of shoal: it uses the wire types of `shoal-protocol` and, for the embedded
//! installation only, starts `shoal-actors`; nothing in shoal depends on it.

pub mod baseline;
pub mod compare;
pub mod config;
pub mod cpu;
pub mod driver;
pub mod embedded;
pub mod html;
pub mod memory;
pub mod probe;
pub mod progress;
pub mod report;
pub mod scenario;
pub mod stats;
pub mod submit;
pub mod svg;
pub mod traffic;
pub mod workers;

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use shoal_actors::client::ApiClient;
use shoal_protocol::endpoint::EndpointSpec;
use shoal_protocol::names::Names;

use crate::baseline::BaselineRun;
use crate::config::{Handler, LoadTest, RuntimeKind, Target, Transport, WaitMode};
use crate::cpu::{CpuSnapshot, workers_cpu_ms};
use crate::driver::{Cancel, drive};
use crate::embedded::{Embedded, EmbeddedOptions, example_worker_bin, python_bin, repo_root, shell_quote};
use crate::memory::{MemorySampler, ProcessMemory, resident_mib};
use crate::progress::{Progress, ProgressPrinter};
use crate::report::{Machine, REPORT_VERSION, Ratio, Report};
use crate::submit::{JobTracker, ShoalJobs, job_input};
use crate::traffic::{Monitor, ServerTraffic, Snapshot};
use crate::workers::WorkerWatch;

/// How long workers may take to get ready before a warm run gives up.
const WARM_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a new endpoint may wait for a control replica to take it (shoal's default lease
/// TTL of 10 s has it taken within ~3.3 s).
const OWNER_TIMEOUT: Duration = Duration::from_secs(30);

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A short random token of `[0-9a-f]` (endpoint ids, baseline names).
pub fn random_token() -> String {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    h.write_u32(std::process::id());
    format!("{:08x}", h.finish() as u32)
}

async fn connect(url: &str, name: &str) -> Result<async_nats::Client> {
    shoal_actors::nats::counting_gaps(async_nats::ConnectOptions::new())
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .with_context(|| format!("connect to NATS at {url}"))
}

/// Drains and closes a connection, and waits (up to 2 s) until it is closed: an embedded
/// installation's server is killed after the run, and a connection it drops reports itself lost
/// ("disconnected from NATS") and tries to connect again for as long as the tester still runs.
pub(crate) async fn close(client: &async_nats::Client) {
    if client.drain().await.is_err() {
        return; // closed already
    }
    // a flush fails once the drained connection has closed (its subscriptions drain first)
    let closed = async {
        while client.flush().await.is_ok() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), closed).await;
}

/// Runs the load test: its own installation or the given one, the baseline if asked, then shoal.
pub async fn run(test: &LoadTest) -> Result<Report> {
    run_until(test, &Cancel::never()).await
}

/// [`run`], stopped early when `cancel` fires (the report then covers what finished, and the
/// installation and endpoint are still cleaned up).
pub async fn run_until(test: &LoadTest, cancel: &Cancel) -> Result<Report> {
    test.validate().map_err(|e| anyhow!("invalid load test: {e}"))?;
    match &test.target {
        Target::Embedded { runtime, control_tick_ms, lease_ttl_s, fake_start_ms, start_record_ms } => {
            let names = Names::default();
            let options = EmbeddedOptions {
                control_tick_ms: *control_tick_ms,
                lease_ttl_s: *lease_ttl_s,
                gateway: matches!(test.transport, Transport::Http { url: None, .. }),
                fake_start_ms: *fake_start_ms,
                // --phases times every job's started event: each start recorded at its take
                start_record_ms: start_record_ms.or(test.phases.then_some(0)),
            };
            let embedded = Embedded::start(*runtime, names.clone(), &options).await?;
            let url = embedded.server.url.clone();
            let server =
                ServerInfo { monitor_url: Some(embedded.server.monitor_url.clone()), pid: Some(embedded.server.pid) };
            let result = run_on(test, &url, &names, embedded.gateway_url.as_deref(), &server, cancel).await;
            embedded.stop().await;
            result
        }
        Target::External { nats_url, prefix, monitor_url } => {
            let names = Names::new(prefix).map_err(|e| anyhow!("--prefix: {}", e.message))?;
            let server = ServerInfo { monitor_url: monitor_url.clone(), pid: None };
            run_on(test, nats_url, &names, None, &server, cancel).await
        }
    }
}

/// Whether the target's hosts may run images: an embedded Docker runtime, or an installation
/// the tester does not know (an endpoint with an image and no command runs on its Docker
/// hosts; a process host refuses it with a clear reason).
fn runs_images(target: &Target) -> bool {
    matches!(target, Target::Embedded { runtime: RuntimeKind::Docker, .. } | Target::External { .. })
}

/// The worker command of the handler (process runtime), and its working directory.
fn worker_command(test: &LoadTest) -> Result<(String, Option<String>)> {
    if let Some(cmd) = &test.endpoint.command {
        return Ok((cmd.clone(), None));
    }
    if let Target::Embedded { runtime: RuntimeKind::Fake, .. } = test.target {
        return Ok(("fake worker (no process)".into(), None));
    }
    if let (Some(image), true) = (&test.endpoint.image, runs_images(&test.target)) {
        return Ok((format!("the image's entrypoint ({image})"), None));
    }
    match test.handler {
        Handler::Noop | Handler::Sleep { .. } => Ok((format!("exec {}", shell_quote(&example_worker_bin()?)), None)),
        Handler::Python { .. } => {
            let root = repo_root().context("the Python handler lives in examples/python-worker of a shoal checkout: run from one, or give --worker-command")?;
            Ok((
                format!("exec {} examples/python-worker/handler.py", shell_quote(&python_bin()?)),
                Some(root.display().to_string()),
            ))
        }
    }
}

fn endpoint_spec(test: &LoadTest, id: &str) -> Result<EndpointSpec> {
    let (command, workdir) = worker_command(test)?;
    let s = &test.endpoint;
    let mut spec = EndpointSpec::with_command(id, &command);
    spec.workdir = workdir;
    spec.image = s.image.clone();
    if s.image.is_some() && runs_images(&test.target) {
        spec.command = None; // the container runs its image's entrypoint
    }
    spec.workers_min = s.workers_min;
    spec.workers_max = s.workers_max;
    spec.scaler = s.scaler;
    spec.scaler_value = s.scaler_value;
    spec.idle_timeout_s = s.idle_timeout_s;
    spec.env.extend(s.env.iter().cloned());
    spec.concurrency = s.concurrency;
    if s.concurrency > 1 {
        spec.env.insert("SHOAL_EXAMPLE_CONCURRENCY".into(), s.concurrency.to_string());
    }
    spec.validate().map_err(|e| anyhow!("endpoint settings: {}", e.message))?;
    Ok(spec)
}

async fn wait_ready(
    api: &ApiClient,
    endpoint: &str,
    want: u32,
    ready: &std::sync::atomic::AtomicU64,
    cancel: &Cancel,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + WARM_TIMEOUT;
    while ready.load(Ordering::Relaxed) < u64::from(want) {
        if cancel.is_cancelled() {
            bail!("interrupted while waiting for workers");
        }
        if tokio::time::Instant::now() >= deadline {
            let reasons: Vec<String> = api
                .workers(Some(endpoint))
                .await
                .map(|l| l.workers)
                .unwrap_or_default()
                .into_iter()
                .map(|w| format!("{} {}: {}", w.id, w.state.as_str(), w.reason.unwrap_or_default()))
                .collect();
            bail!(
                "only {} of {want} workers of {endpoint} got ready in {WARM_TIMEOUT:?}; workers: [{}]",
                ready.load(Ordering::Relaxed),
                reasons.join("; ")
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// What the tester knows of the NATS server: its monitoring URL and, when it started it, its pid.
struct ServerInfo {
    monitor_url: Option<String>,
    pid: Option<u32>,
}

async fn snapshot(monitor: &Option<Monitor>) -> Option<Snapshot> {
    match monitor {
        Some(m) => m.snapshot().await,
        None => None,
    }
}

async fn traffic(monitor: &Option<Monitor>, before: Option<Snapshot>, jobs: u64) -> Option<ServerTraffic> {
    let after = snapshot(monitor).await?;
    before?.per_job(&after, jobs)
}

/// Waits until a control replica owns the endpoint (its actors and scaler run). `false` when
/// none says so in time: a control plane without leases never does, so the run goes on.
async fn wait_owned(api: &ApiClient, endpoint: &str, cancel: &Cancel) -> Result<bool> {
    let deadline = tokio::time::Instant::now() + OWNER_TIMEOUT;
    loop {
        if cancel.is_cancelled() {
            bail!("interrupted while waiting for the endpoint");
        }
        match api.health(endpoint).await {
            Ok(h) if h.owner.is_some() => return Ok(true),
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "health"),
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn run_on(
    test: &LoadTest,
    url: &str,
    names: &Names,
    gateway_url: Option<&str>,
    server: &ServerInfo,
    cancel: &Cancel,
) -> Result<Report> {
    let monitor = server.monitor_url.as_deref().and_then(Monitor::new);
    let started_at_ms = now_ms();
    let client = connect(url, "shoal-loadtest").await?;
    let watch_client = connect(url, "shoal-loadtest-events").await?;
    let api = ApiClient::new(client.clone(), names.clone()).with_timeout(Duration::from_secs(30));
    let input = job_input(test.handler, test.payload_bytes);
    let planned = test.scenario.planned_jobs();
    let mut notes = Vec::new();
    if let Target::Embedded { runtime, .. } = &test.target {
        notes.push(format!(
            "embedded installation: nats-server, shoal (control + host, {} runtime), the workers and the tester share this machine",
            runtime.name()
        ));
    }

    let baseline = if test.baseline {
        let worker_client = connect(url, "shoal-loadtest-baseline-worker").await?;
        let progress = Arc::new(Progress::default());
        let printer = ProgressPrinter::start(progress.clone(), "baseline".into(), planned, test.progress);
        let before = snapshot(&monitor).await;
        let cpu_before = CpuSnapshot::take(server.pid);
        let mem_before = resident_mib();
        let result = BaselineRun {
            client: &client,
            worker_client: &worker_client,
            prefix: names.prefix(),
            run_id: &random_token(),
            scenario: &test.scenario,
            workers: test.endpoint.workers_max,
            payload: Bytes::from(serde_json::to_vec(&input)?),
            sleep_ms: test.handler.sleep_ms(),
            timeout: test.job_timeout(),
            max_in_flight: test.max_in_flight,
            progress,
            cancel: cancel.clone(),
        }
        .run()
        .await;
        printer.finish().await;
        let mut result = result.context("baseline run")?;
        result.cpu = cpu_before.per_job(&CpuSnapshot::take(server.pid), result.completed, None);
        result.process_memory = ProcessMemory::since(mem_before);
        result.server = traffic(&monitor, before, result.completed).await;
        Some(result)
    } else {
        None
    };

    let (endpoint_id, spec) = match &test.endpoint.id {
        Some(id) => {
            api.get_endpoint(id).await.map_err(|e| anyhow!("endpoint {id}: {e}"))?;
            (id.clone(), None)
        }
        None => {
            let id = format!("lt-{}", random_token());
            let spec = endpoint_spec(test, &id)?;
            (id, Some(spec))
        }
    };
    let t0 = std::time::Instant::now();
    let seed_api = api.clone();
    let seed_id = endpoint_id.clone();
    let watch = WorkerWatch::start(&watch_client, names, &endpoint_id, move || async move {
        seed_api.workers(Some(&seed_id)).await.map(|l| l.workers).unwrap_or_default()
    })
    .await
    .context("watch worker events")?;
    tracing::debug!(elapsed = ?t0.elapsed(), "watch started");
    let wait = test.effective_wait();
    let tracker = Arc::new(JobTracker::default());
    let tracker_task = match wait {
        WaitMode::Async => {
            Some(tracker.watch(&watch_client, names, &endpoint_id, test.phases).await.context("watch job events")?)
        }
        _ => None,
    };
    if let Some(spec) = &spec {
        api.create_endpoint(spec).await.map_err(|e| anyhow!("create endpoint {endpoint_id}: {e}"))?;
    }
    tracing::debug!(elapsed = ?t0.elapsed(), "endpoint created");
    let outcome = async {
        let owned = wait_owned(&api, &endpoint_id, cancel).await?;
        if test.endpoint.warm && test.endpoint.workers_min > 0 {
            wait_ready(&api, &endpoint_id, test.endpoint.workers_min, &watch.ready(), cancel).await?;
        }
        tracing::debug!(elapsed = ?t0.elapsed(), "warm");
        let transport = match &test.transport {
            Transport::Http { url: None, api_key } => {
                Transport::Http { url: gateway_url.map(str::to_string), api_key: api_key.clone() }
            }
            other => other.clone(),
        };
        let jobs = Arc::new(
            ShoalJobs::new(
                &transport,
                wait,
                client.clone(),
                names,
                &endpoint_id,
                input.clone(),
                test.job_timeout(),
                tracker_task.as_ref().map(|_| tracker.clone()),
                test.submit_batch,
            )
            .await?,
        );
        let progress = Arc::new(Progress::with_workers(watch.ready()));
        let printer = ProgressPrinter::start(progress.clone(), "shoal".into(), planned, test.progress);
        let job_fn = {
            let jobs = jobs.clone();
            move |_i: u64| {
                let jobs = jobs.clone();
                async move { jobs.run_job().await }
            }
        };
        let before = snapshot(&monitor).await;
        let cpu_before = CpuSnapshot::take(server.pid);
        let mem_before = resident_mib();
        let sampler = MemorySampler::start(monitor.clone(), tokio::time::Instant::now());
        let (mut result, start) = drive(&test.scenario, test.max_in_flight, progress, cancel, job_fn).await;
        let cpu_after = CpuSnapshot::take(server.pid);
        result.memory_timeline = sampler.finish().await;
        result.process_memory = ProcessMemory::since(mem_before);
        printer.finish().await;
        result.server = traffic(&monitor, before, result.completed).await;
        let workers = api.workers(Some(&endpoint_id)).await.map(|l| l.workers).unwrap_or_default();
        let workers_ms = workers_cpu_ms(workers.iter().filter_map(|w| w.runtime_ref.as_deref()));
        result.cpu = cpu_before.per_job(&cpu_after, result.completed, workers_ms);
        if let Some(requests) = jobs.batch_requests() {
            notes.push(format!(
                "submitted in {requests} job.run_batch requests, {:.1} jobs each on average",
                result.submitted as f64 / requests.max(1) as f64
            ));
        }
        anyhow::Ok((result, start, jobs.events_missed.load(Ordering::Relaxed), owned))
    }
    .await;
    let (shoal, start, events_missed, owned) = match outcome {
        Ok(o) => o,
        Err(e) => {
            if let Some(t) = tracker_task {
                t.abort();
            }
            if spec.is_some() {
                let _ = api.delete_endpoint(&endpoint_id).await;
            }
            return Err(e);
        }
    };
    let workers = watch.finish(start.into_std()).await;
    if let Some(t) = tracker_task {
        t.abort();
    }
    if spec.is_some()
        && let Err(e) = api.delete_endpoint(&endpoint_id).await
    {
        tracing::warn!(endpoint_id = %endpoint_id, error = %e, "cannot delete the load test endpoint");
    }
    if !owned {
        notes.push(format!(
            "no control replica reported owning {endpoint_id} within {OWNER_TIMEOUT:?} (health.owner); the run went on"
        ));
    }
    if shoal.interrupted || baseline.as_ref().is_some_and(|b| b.interrupted) {
        notes.push("interrupted: the run was stopped early; jobs in flight then are not counted".into());
    }
    if wait == WaitMode::Async {
        notes.push(if test.phases {
            "async mode: queue delay and execution time come from the job events' timestamps (ms)".into()
        } else {
            "async mode: queue delay and execution time come from the terminal job events' status (ms); \
             --phases also times the queued and started events on the tester's clock (an embedded host \
             then records every start at its take, host.start_record_ms = 0)"
                .into()
        });
    }
    if workers.cold_starts.iter().any(|c| c.restarts > 0) || workers.timeline.iter().any(|p| p.other > 0) {
        notes.push("some workers were throttled, unhealthy or restarted during the run".into());
    }
    let ratio = baseline.as_ref().and_then(|b| Ratio::of(&shoal, b));
    close(&client).await;
    close(&watch_client).await;
    Ok(Report {
        version: REPORT_VERSION,
        tool: format!("shoal-loadtest {}", env!("CARGO_PKG_VERSION")),
        started_at_ms,
        command: None,
        machine: Machine::detect(),
        test: test.clone(),
        endpoint_id,
        mode: format!("{}/{}", test.transport.name(), if wait == WaitMode::Sync { "sync" } else { "async" }),
        shoal,
        baseline,
        ratio,
        workers,
        events_missed,
        notes,
    })
}

/// Writes `<dir>/<name>.json` and `<dir>/<name>.html`; returns their paths.
pub fn write_outputs(report: &Report, dir: &Path, name: &str) -> Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let json = dir.join(format!("{name}.json"));
    let html = dir.join(format!("{name}.html"));
    std::fs::write(&json, serde_json::to_vec_pretty(report)?).with_context(|| format!("write {}", json.display()))?;
    std::fs::write(&html, html::render(report)).with_context(|| format!("write {}", html.display()))?;
    Ok((json, html))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_runs_its_own_entrypoint_on_a_cluster_and_on_embedded_docker() {
        let mut test = LoadTest::burst(1);
        test.endpoint.image = Some("shoal/example-worker:local".into());
        test.target =
            Target::External { nats_url: "nats://127.0.0.1:4222".into(), prefix: "shoal".into(), monitor_url: None };
        // no local worker binary is needed: the hosts run the image
        let spec = endpoint_spec(&test, "lt-1").expect("spec");
        assert_eq!((spec.command, spec.image.as_deref()), (None, Some("shoal/example-worker:local")));
        test.target = Target::Embedded {
            runtime: RuntimeKind::Docker,
            control_tick_ms: None,
            lease_ttl_s: None,
            fake_start_ms: None,
            start_record_ms: None,
        };
        assert_eq!(endpoint_spec(&test, "lt-1").expect("spec").command, None);
    }
}
