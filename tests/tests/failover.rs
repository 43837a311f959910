//! Losing a process: control replicas share endpoints by lease and take over a dead one's;
//! a host that dies mid-burst gets its jobs redelivered to another host.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use futures::StreamExt;
use serde_json::json;
use shoal_protocol::api::{JobRef, RunRequest};
use shoal_protocol::codec::from_msgpack;
use shoal_protocol::endpoint::ScalerKind;
use shoal_protocol::events::JobEvent;
use shoal_protocol::job::JobState;
use shoal_protocol::worker::WorkerState;
use shoal_tests::cluster::{start_control, start_host};
use shoal_tests::{Shoal, eventually, rust_endpoint};

/// Owner of each endpoint, as the API reports it.
async fn owners(shoal: &Shoal, endpoints: &[String]) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for ep in endpoints {
        if let Ok(Some(owner)) = shoal.api.health(ep).await.map(|h| h.owner) {
            out.insert(ep.clone(), owner);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_endpoints_and_take_over_a_dead_ones() -> Result<()> {
    let mut shoal = Shoal::start().await?;
    let first = shoal.control.as_ref().map(|c| c.replica_id.clone()).context("control")?;
    let second = start_control(&shoal.nats, "replica-b").await?;
    let third = start_control(&shoal.nats, "replica-c").await?;
    let mut job_events = shoal.nats.client.subscribe(shoal.nats.names.events_of_kind("job")).await?;

    let endpoints: Vec<String> = (0..30).map(|i| format!("ep{i}")).collect();
    for ep in &endpoints {
        let mut spec = rust_endpoint(ep)?;
        spec.workers_min = 0;
        spec.workers_max = 2;
        spec.scaler = ScalerKind::RequestCount;
        spec.idle_timeout_s = 30;
        shoal.api.create_endpoint(&spec).await?;
    }
    // ownership splits evenly: 10 each
    let split = eventually(Duration::from_secs(60), "an even split", || async {
        let o = owners(&shoal, &endpoints).await;
        let mut per: HashMap<String, usize> = HashMap::new();
        for owner in o.values() {
            *per.entry(owner.clone()).or_default() += 1;
        }
        (o.len() == 30 && per.len() == 3 && per.values().all(|n| *n == 10)).then_some(o)
    })
    .await?;

    // a burst on every endpoint; kill the replica owning ep0 in the middle of it
    let victim = split.get("ep0").context("owner of ep0")?.clone();
    let mut ids = Vec::new();
    for round in 0..3 {
        for ep in &endpoints {
            ids.push((
                ep.clone(),
                shoal.api.run(&RunRequest::new(ep, json!({"sleep_ms": 200, "round": round}))).await?.id,
            ));
        }
    }
    let (survivors, killed_at) = if victim == first {
        shoal.control.take().context("first")?.abort().await;
        (vec![second, third], std::time::Instant::now())
    } else if victim == "replica-b" {
        second.abort().await;
        (vec![third], std::time::Instant::now())
    } else {
        third.abort().await;
        (vec![second], std::time::Instant::now())
    };
    let orphaned: Vec<String> = split.iter().filter(|(_, o)| **o == victim).map(|(e, _)| e.clone()).collect();
    assert_eq!(orphaned.len(), 10);

    // re-owned within the lease TTL (2 s) plus a tick, with slack for this busy machine
    eventually(Duration::from_secs(15), "the dead replica's endpoints re-owned", || async {
        let o = owners(&shoal, &orphaned).await;
        (o.len() == orphaned.len() && o.values().all(|owner| *owner != victim)).then_some(())
    })
    .await?;
    let took = killed_at.elapsed();
    eprintln!("takeover of {} endpoints took {took:?}", orphaned.len());

    // every job completes, exactly once; no endpoint ever above its max workers
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let workers = shoal.api.workers(None).await?.workers;
        let mut per: HashMap<&str, usize> = HashMap::new();
        for w in workers.iter().filter(|w| !matches!(w.state, WorkerState::Stopped | WorkerState::Throttled)) {
            *per.entry(w.endpoint.as_str()).or_default() += 1;
        }
        ensure!(per.values().all(|n| *n <= 2), "an endpoint ran more than its max workers: {per:?}");
        let mut done = 0;
        for (ep, id) in &ids {
            let s = shoal.api.status(&JobRef { endpoint: Some(ep.clone()), id: id.clone(), wait_ms: 0 }).await?;
            ensure!(!matches!(s.status, JobState::Failed | JobState::TimedOut | JobState::Cancelled), "{s:?}");
            done += usize::from(s.status == JobState::Completed);
        }
        if done == ids.len() {
            break;
        }
        ensure!(std::time::Instant::now() < deadline, "only {done} of {} jobs completed", ids.len());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut terminal: HashMap<String, usize> = HashMap::new();
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_millis(300), job_events.next()).await {
        let ev: JobEvent = from_msgpack(&msg.payload)?;
        if ev.state.is_terminal() {
            *terminal.entry(ev.job_id).or_default() += 1;
        }
    }
    for (_, id) in &ids {
        assert_eq!(terminal.get(id).copied(), Some(1), "job {id} recorded exactly once");
    }
    for c in survivors {
        c.stop().await;
    }
    shoal.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_killed_mid_burst_has_its_jobs_finish_on_the_other_host() -> Result<()> {
    let mut shoal = Shoal::start().await?;
    let survivor = start_host(&shoal.nats, shoal.state_dir.path(), "survivor", |_| {}).await?;
    let doomed = shoal.host.as_ref().map(|h| h.id.clone()).context("host")?;
    let mut spec = rust_endpoint("spread")?;
    spec.workers_min = 2;
    spec.workers_max = 2;
    shoal.api.create_endpoint(&spec).await?;
    // placement spreads the two workers over the two hosts
    eventually(Duration::from_secs(60), "one idle worker per host", || async {
        let w = shoal.api.workers(Some("spread")).await.ok()?.workers;
        let idle: Vec<&str> = w.iter().filter(|w| w.state == WorkerState::Idle).map(|w| w.host.as_str()).collect();
        (idle.len() == 2 && idle.contains(&"survivor") && idle.contains(&doomed.as_str())).then_some(())
    })
    .await?;
    let mut ids = Vec::new();
    for n in 0..10 {
        ids.push(shoal.api.run(&RunRequest::new("spread", json!({"sleep_ms": 1_500, "n": n}))).await?.id);
    }
    // wait until the doomed host runs one, then kill it
    let on_doomed = eventually(Duration::from_secs(30), "a job running on the doomed host", || async {
        let w = shoal.api.workers(Some("spread")).await.ok()?.workers;
        w.into_iter().find(|w| w.host == doomed && !w.current_jobs.is_empty()).map(|w| w.current_jobs[0].clone())
    })
    .await?;
    shoal.host.take().context("host")?.abort().await;

    for id in &ids {
        let s = shoal.api.status(&JobRef { endpoint: Some("spread".into()), id: id.clone(), wait_ms: 90_000 }).await?;
        assert_eq!(s.status, JobState::Completed, "{s:?}");
        if *id == on_doomed {
            assert!(s.retries >= 1 && s.attempts >= 2, "redelivered after its host died: {s:?}");
        }
    }
    // the lost host's worker was replaced on the survivor
    eventually(Duration::from_secs(30), "two workers on the survivor", || async {
        let w = shoal.api.workers(Some("spread")).await.ok()?.workers;
        let live: Vec<_> = w.iter().filter(|w| !matches!(w.state, WorkerState::Stopped)).collect();
        (live.len() == 2 && live.iter().all(|w| w.host == "survivor")).then_some(())
    })
    .await?;
    survivor.stop().await;
    shoal.stop().await;
    Ok(())
}

/// A replica watches the job and worker records of all the endpoints it owns with one watch
/// per bucket (not one per endpoint), and answers owner queries for each of them on its own
/// subjects; the history each endpoint actor reads when it starts is a watch that goes away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_holds_the_same_watches_whatever_it_owns() -> Result<()> {
    let shoal = Shoal::start().await?;
    let consumers = |store: async_nats::jetstream::kv::Store| async move {
        store.stream.get_info().await.map(|i| i.state.consumer_count).unwrap_or(usize::MAX)
    };
    let jobs_before = consumers(shoal.nats.jobs.clone()).await;
    let workers_before = consumers(shoal.nats.workers.clone()).await;

    let endpoints: Vec<String> = (0..20).map(|i| format!("many{i}")).collect();
    for ep in &endpoints {
        let mut spec = rust_endpoint(ep)?;
        spec.workers_min = 0;
        spec.workers_max = 1;
        shoal.api.create_endpoint(&spec).await?;
    }
    // each is owned, and its owner answers (health is an owner query)
    eventually(Duration::from_secs(30), "every endpoint owned", || async {
        (owners(&shoal, &endpoints).await.len() == endpoints.len()).then_some(())
    })
    .await?;
    // jobs still run on one of them, seen by its endpoint actor through the shared feed
    let job = shoal.api.run(&RunRequest::new("many7", json!({"echo": 7}))).await?;
    let done = eventually(Duration::from_secs(30), "the job done", || async {
        let s =
            shoal.api.status(&JobRef { endpoint: Some("many7".into()), id: job.id.clone(), wait_ms: 0 }).await.ok()?;
        (s.status == JobState::Completed).then_some(s)
    })
    .await?;
    assert_eq!(done.output, Some(json!({"echo": 7})));
    let counts = shoal.api.health("many7").await?.jobs;
    assert_eq!(counts.completed, 1, "the owner counted the job: {counts:?}");

    // the history reads' consumers expire (30 s after their watch is dropped); what stays
    // does not depend on how many endpoints the replica owns
    eventually(Duration::from_secs(90), "no consumer per endpoint", || async {
        let (jobs, workers) = (consumers(shoal.nats.jobs.clone()).await, consumers(shoal.nats.workers.clone()).await);
        (jobs <= jobs_before && workers <= workers_before).then_some(())
    })
    .await?;
    shoal.stop().await;
    Ok(())
}

/// A replica that starts takes its share of the endpoints once it has read the leases, not a
/// lease tick later: on an empty bucket at once, and after a replica that stopped (its released
/// leases and presence left in the bucket as history). The leases here last 60 s, so a tick is
/// 20 s: an endpoint owned within 10 s was not waiting for one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starting_replica_takes_its_endpoints_once_it_has_read_the_leases() -> Result<()> {
    let server = shoal_tests::NatsServer::start()?;
    let names = shoal_protocol::names::Names::new(&shoal_tests::test_prefix())?;
    let topology = shoal_actors::nats::Topology { lease_ttl_s: 60, ..shoal_tests::fast_topology() };
    let nats = shoal_actors::nats::Nats::connect(&server.url, names.clone(), &topology).await?;
    let api = shoal_actors::client::ApiClient::new(nats.client.clone(), names);
    let owner = |endpoint: &'static str| {
        let api = api.clone();
        async move { api.health(endpoint).await.ok().and_then(|h| h.owner) }
    };
    let mut spec = rust_endpoint("first")?;
    spec.workers_min = 0;

    // an empty leases bucket: nothing to wait for
    let first = start_control(&nats, "replica-a").await?;
    api.create_endpoint(&spec).await?;
    let owned = eventually(Duration::from_secs(10), "the endpoint owned on an empty bucket", || owner("first")).await?;
    assert_eq!(owned, "replica-a");
    first.stop().await;

    // the bucket now holds the first replica's history: the next one reads it, then takes over
    let second = start_control(&nats, "replica-b").await?;
    let owned = eventually(Duration::from_secs(10), "the endpoint owned after the history", || owner("first")).await?;
    assert_eq!(owned, "replica-b");
    second.stop().await;
    Ok(())
}
