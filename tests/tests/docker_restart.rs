//! A host that dies with its worker containers still running, then comes back with the same
//! id: what it left behind is adopted (stopped, kept warm, started again for the new worker)
//! or removed, and at no moment do two containers serve the one worker the endpoint wants.
//! Needs the Docker engine.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use serde_json::json;
use shoal_actors::nats::Nats;
use shoal_protocol::api::{JobRef, RunRequest};
use shoal_protocol::codec::from_msgpack;
use shoal_protocol::endpoint::{EndpointSpec, ScalerKind};
use shoal_protocol::job::JobState;
use shoal_protocol::worker::{WorkerRecord, WorkerState};
use shoal_tests::docker::{Sweeper, host_containers, require_docker, start_docker_host, worker_image};
use shoal_tests::{Shoal, eventually, fast_topology, free_port, test_prefix};

/// Runs a Docker host on a runtime of its own until told to crash: then the runtime is shut
/// down at once, as the process dying would, and its containers are left running.
fn crashable_host(
    url: String,
    names: shoal_protocol::names::Names,
    dir: std::path::PathBuf,
    id: String,
    port: u16,
) -> Result<(mpsc::Sender<()>, std::thread::JoinHandle<Result<()>>)> {
    let (crash_tx, crash_rx) = mpsc::channel::<()>();
    let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
    let thread = std::thread::spawn(move || -> Result<()> {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let started = rt.block_on(async {
            let nats = Nats::connect(&url, names, &fast_topology()).await?;
            let bridge = SocketAddr::from(([0, 0, 0, 0], port));
            start_docker_host(&nats, &dir, &id, |c| c.bridge_listen = bridge).await
        });
        match started {
            Ok(host) => {
                let _ = ready_tx.send(Ok(()));
                let _ = crash_rx.recv();
                // no stop, no cleanup: the process is gone
                std::mem::forget(host);
                rt.shutdown_background();
                Ok(())
            }
            Err(e) => {
                let _ = ready_tx.send(Err(anyhow!("{e:#}")));
                Ok(())
            }
        }
    });
    ready_rx.recv().context("host thread")??;
    Ok((crash_tx, thread))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_host_adopts_or_removes_the_containers_it_left_and_never_runs_two() -> Result<()> {
    require_docker()?;
    let image = worker_image()?;
    let mut shoal = Shoal::start().await?;
    shoal.host.take().context("host")?.stop().await;
    let host_id = format!("dk-{}", test_prefix());
    let _sweeper = Sweeper { host_ids: vec![host_id.clone()] };
    let port = free_port()?;
    let dir = shoal.state_dir.path().to_path_buf();
    let (crash, thread) =
        crashable_host(shoal.server.url.clone(), shoal.nats.names.clone(), dir.clone(), host_id.clone(), port)?;

    let mut spec = EndpointSpec::with_command("dk-keep", "unused");
    spec.command = None;
    spec.image = Some(image);
    spec.workers_min = 1;
    spec.workers_max = 1;
    spec.scaler = ScalerKind::RequestCount;
    spec.scaler_value = 1.0;
    shoal.api.create_endpoint(&spec).await?;
    let first = eventually(Duration::from_secs(60), "a worker idle in its container", || async {
        let list = shoal.api.workers(Some("dk-keep")).await.ok()?;
        list.workers.into_iter().find(|w| w.state == WorkerState::Idle && w.runtime_ref.is_some())
    })
    .await?;
    let before = host_containers(&host_id)?;
    assert_eq!(before.iter().filter(|c| c.running()).count(), 1, "{before:?}");

    // the host dies; its container keeps running
    crash.send(()).map_err(|_| anyhow!("host thread gone"))?;
    thread.join().map_err(|_| anyhow!("host thread panicked"))??;
    let orphaned = host_containers(&host_id)?;
    assert_eq!(orphaned.iter().filter(|c| c.running()).count(), 1, "left running: {orphaned:?}");

    // it comes back with the same id and bridge address
    let (host, _) = start_docker_host(&shoal.nats, &dir, &host_id, |c| {
        c.bridge_listen = SocketAddr::from(([0, 0, 0, 0], port));
    })
    .await?;
    shoal.host = Some(host);
    let most_running = AtomicUsize::new(0);
    let second = eventually(Duration::from_secs(60), "a new worker idle", || async {
        let running = host_containers(&host_id).ok()?.iter().filter(|c| c.running()).count();
        most_running.fetch_max(running, Ordering::Relaxed);
        let list = shoal.api.workers(Some("dk-keep")).await.ok()?;
        // launched (a runtime reference), not only polling: an adopted container asks for jobs
        // before its start is reported, and its worker is Idle for a moment without its phases
        list.workers.into_iter().find(|w| w.id != first.id && w.state == WorkerState::Idle && w.runtime_ref.is_some())
    })
    .await?;
    assert!(most_running.load(Ordering::Relaxed) <= 1, "two containers ran at once");
    // (listings leave stopped workers out: read its record)
    let old = shoal.nats.workers.get(shoal.nats.names.worker_key("dk-keep", &first.id)).await?;
    let old: WorkerRecord = from_msgpack(&old.context("the old worker's record")?)?;
    assert_eq!(old.state, WorkerState::Stopped, "{old:?}");
    assert_eq!(old.reason.as_deref(), Some("its host restarted"));
    // adopted: the container it left is the new worker's, started warm
    let start = second.start.clone().context("phases")?;
    assert!(start.warm, "{start:?}");
    assert_eq!(second.runtime_ref, first.runtime_ref, "the left container, adopted");
    println!("after the restart: {}", start.summary());
    let after = host_containers(&host_id)?;
    assert_eq!(after.len(), 1, "no duplicate: {after:?}");
    assert!(after[0].running());

    let job = shoal.api.run(&RunRequest::new("dk-keep", json!({"after": "restart"}))).await?;
    let s = shoal.api.status(&JobRef { endpoint: Some("dk-keep".into()), id: job.id, wait_ms: 60_000 }).await?;
    assert_eq!((s.status, s.worker_id), (JobState::Completed, Some(second.id.clone())));
    shoal.stop().await;
    assert!(host_containers(&host_id)?.is_empty(), "a stopped host removes its containers");
    Ok(())
}
