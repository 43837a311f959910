//! The core job path: a job submitted by a plain NATS client runs on a real worker process
//! (the runpod SDK's Python handler, and the Rust example worker), and its result is read
//! back with `status`.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use bytes::Bytes;
use serde_json::{Value, json};
use shoal_tests::{Shoal, python_endpoint, rust_endpoint};

/// What any NATS client can do, with no shoal code: JSON request, JSON reply.
async fn bare_request(url: &str, subject: String, body: Value, timeout: Duration) -> Result<(Value, Option<String>)> {
    let client = async_nats::connect(url).await?;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Content-Type", "application/json");
    let request = async_nats::Request::new()
        .payload(Bytes::from(serde_json::to_vec(&body)?))
        .headers(headers)
        .timeout(Some(timeout));
    let reply = client.send_request(subject, request).await?;
    let code = reply.headers.as_ref().and_then(|h| h.get("Nats-Service-Error-Code")).map(|v| v.to_string());
    Ok((serde_json::from_slice(&reply.payload).context("reply is JSON")?, code))
}

async fn run_through_bare_client(shoal: &Shoal, endpoint: &str, input: Value) -> Result<Value> {
    let prefix = shoal.nats.names.prefix().to_string();
    let (submitted, err) = bare_request(
        &shoal.server.url,
        format!("{prefix}.v1.api.job.run"),
        json!({"endpoint": endpoint, "input": input}),
        Duration::from_secs(10),
    )
    .await?;
    ensure!(err.is_none(), "run failed: {submitted}");
    ensure!(submitted["status"] == "IN_QUEUE", "{submitted}");
    let id = submitted["id"].as_str().context("id")?.to_string();
    ensure!(id.ends_with("-u1"), "RunPod-style id: {id}");
    let (status, err) = bare_request(
        &shoal.server.url,
        format!("{prefix}.v1.api.job.status"),
        json!({"endpoint": endpoint, "id": id, "wait_ms": 60_000}),
        Duration::from_secs(70),
    )
    .await?;
    ensure!(err.is_none(), "status failed: {status}");
    Ok(status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_nats_client_runs_a_job_on_the_runpod_python_worker() -> Result<()> {
    let shoal = Shoal::start().await?;
    shoal.api.create_endpoint(&python_endpoint("echo-py")?).await?;
    let input = json!({"mode": "echo", "text": "héllo", "n": [1, 2, 3]});
    let status = run_through_bare_client(&shoal, "echo-py", input.clone()).await?;
    assert_eq!(status["status"], "COMPLETED", "{status}");
    assert_eq!(status["output"], input);
    assert_eq!(status["attempts"], 1);
    assert!(status["worker_id"].is_string());
    assert!(status["execution_time_ms"].is_u64());
    shoal.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_nats_client_runs_a_job_on_the_rust_example_worker() -> Result<()> {
    let shoal = Shoal::start().await?;
    shoal.api.create_endpoint(&rust_endpoint("echo-rs")?).await?;
    let status = run_through_bare_client(&shoal, "echo-rs", json!({"x": 1})).await?;
    assert_eq!(status["status"], "COMPLETED", "{status}");
    assert_eq!(status["output"], json!({"x": 1}));
    // and a failing job reports the handler's error
    let status = run_through_bare_client(&shoal, "echo-rs", json!({"fail": "bad input"})).await?;
    assert_eq!(status["status"], "FAILED", "{status}");
    assert_eq!(status["error"], "bad input");
    shoal.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_python_worker_takes_jobs_in_batches() -> Result<()> {
    use shoal_protocol::api::{JobRef, RunRequest};
    use shoal_protocol::job::JobState;
    let shoal = Shoal::start().await?;
    let mut spec = python_endpoint("multi")?;
    spec.env.insert("SHOAL_EXAMPLE_CONCURRENCY".into(), "3".into());
    spec.concurrency = 3;
    shoal.api.create_endpoint(&spec).await?;
    let mut ids = Vec::new();
    for n in 0..6 {
        let req = RunRequest::new("multi", json!({"mode": "sleep", "seconds": 1.5, "n": n}));
        ids.push(shoal.api.run(&req).await?.id);
    }
    // one worker holds several jobs at once
    let most = shoal_tests::several_jobs_on_one_worker(&shoal.api, "multi").await?;
    assert!(most >= 2);
    for id in ids {
        let s = shoal.api.status(&JobRef { endpoint: Some("multi".into()), id, wait_ms: 60_000 }).await?;
        assert_eq!(s.status, JobState::Completed, "{s:?}");
    }
    shoal.stop().await;
    Ok(())
}

/// A worker with several job slots (the SDK's `concurrency_modifier`; here the Rust example
/// worker's `SHOAL_EXAMPLE_CONCURRENCY`) takes what waits in batches and runs the jobs side by
/// side, and a lone job that comes while it waits is handed over at once: a pull for several
/// tokens would be held by the server until all of them came or the pull expired (the bridge's
/// hold, 2 s in these tests: each lone job would wait up to that long, past its 1 s wait).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_several_slots_takes_batches_and_gets_a_lone_job_at_once() -> Result<()> {
    use shoal_protocol::api::{JobRef, RunRequest};
    use shoal_protocol::job::JobState;
    use shoal_protocol::worker::WorkerState;
    let shoal = Shoal::start().await?;
    let mut spec = rust_endpoint("slots")?;
    spec.env.insert("SHOAL_EXAMPLE_CONCURRENCY".into(), "4".into());
    spec.concurrency = 4;
    shoal.api.create_endpoint(&spec).await?;
    // the worker has asked for jobs (Idle) and is long-polling for them
    shoal_tests::eventually(Duration::from_secs(60), "the worker is idle", || async {
        let w = shoal.api.workers(Some("slots")).await.ok()?;
        w.workers.iter().any(|w| w.state == WorkerState::Idle).then_some(())
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for n in 0..3 {
        let mut req = RunRequest::new("slots", json!({"n": n}));
        req.wait_ms = 1_000;
        let s = shoal.api.run(&req).await?;
        assert_eq!(s.status, JobState::Completed, "lone job {n} is handed over while the worker waits: {s:?}");
        assert_eq!(s.output, Some(json!({"n": n})));
    }
    let mut ids = Vec::new();
    for n in 0..8 {
        ids.push(shoal.api.run(&RunRequest::new("slots", json!({"sleep_ms": 1500, "n": n}))).await?.id);
    }
    let most = shoal_tests::several_jobs_on_one_worker(&shoal.api, "slots").await?;
    assert!(most <= 4, "never more jobs than slots: {most}");
    for id in ids {
        let s = shoal.api.status(&JobRef { endpoint: Some("slots".into()), id, wait_ms: 60_000 }).await?;
        assert_eq!(s.status, JobState::Completed, "{s:?}");
    }
    shoal.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_is_discoverable_as_a_nats_micro_service() -> Result<()> {
    let shoal = Shoal::start().await?;
    let client = async_nats::connect(&shoal.server.url).await?;
    let reply = client.request("$SRV.INFO.shoal", Bytes::new()).await?;
    let info: Value = serde_json::from_slice(&reply.payload)?;
    assert_eq!(info["name"], "shoal");
    let subjects: Vec<String> = info["endpoints"]
        .as_array()
        .context("endpoints")?
        .iter()
        .filter_map(|e| e["subject"].as_str().map(String::from))
        .collect();
    let prefix = shoal.nats.names.prefix();
    for op in shoal_protocol::names::op::ALL {
        assert!(subjects.contains(&format!("{prefix}.v1.api.{op}")), "{op} is listed: {subjects:?}");
    }
    shoal.stop().await;
    Ok(())
}

/// A submitter that waits (`job.run` with `wait_ms`) is answered once: by the worker side as
/// soon as the result is recorded (its terminal event names the subject it answered), or by the
/// control plane when the wait ran out first (and then never again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_submitter_is_answered_once_by_whoever_knows_first() -> Result<()> {
    use futures::StreamExt;
    let shoal = Shoal::start().await?;
    shoal.api.create_endpoint(&rust_endpoint("echo-rs")?).await?;
    let prefix = shoal.nats.names.prefix().to_string();
    let client = async_nats::connect(&shoal.server.url).await?;
    let mut events = client.subscribe(format!("{prefix}.events.job.echo-rs.>")).await?;
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await?;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Content-Type", "application/json");
    let run = |input: Value, wait_ms: u64| {
        let body = json!({"endpoint": "echo-rs", "input": input, "wait_ms": wait_ms}).to_string();
        client.publish_with_reply_and_headers(
            format!("{prefix}.v1.api.job.run"),
            inbox.clone(),
            headers.clone(),
            Bytes::from(body),
        )
    };
    // the job ends within the wait: the worker side answers, the control plane stays silent
    run(json!({"x": 1}), 30_000).await?;
    let reply = tokio::time::timeout(Duration::from_secs(30), replies.next()).await?.context("reply")?;
    let status: Value = serde_json::from_slice(&reply.payload).context("a JSON reply to a JSON request")?;
    assert_eq!(status["status"], "COMPLETED", "{status}");
    assert_eq!(status["output"], json!({"x": 1}));
    let id = status["id"].as_str().context("id")?.to_string();
    let ev = terminal_event(&mut events, &id).await?;
    assert_eq!(ev.answered.as_deref(), Some(inbox.as_str()), "the terminal event names the subject answered");
    let again = tokio::time::timeout(Duration::from_millis(700), replies.next()).await;
    assert!(again.is_err(), "one answer only: {again:?}");

    // the wait runs out first: the control plane answers with the status of the moment, and
    // the worker that records the result later does not answer again
    run(json!({"sleep_ms": 1500}), 300).await?;
    let reply = tokio::time::timeout(Duration::from_secs(30), replies.next()).await?.context("reply")?;
    let status: Value = serde_json::from_slice(&reply.payload)?;
    assert!(status["status"] == "IN_QUEUE" || status["status"] == "IN_PROGRESS", "{status}");
    let id = status["id"].as_str().context("id")?.to_string();
    let ev = terminal_event(&mut events, &id).await?;
    assert_eq!(ev.state, shoal_protocol::job::JobState::Completed);
    assert_eq!(ev.answered, None, "nobody waits any more");
    let again = tokio::time::timeout(Duration::from_millis(700), replies.next()).await;
    assert!(again.is_err(), "one answer only: {again:?}");
    shoal.stop().await;
    Ok(())
}

/// The next terminal event of job `id` on `events`.
async fn terminal_event(events: &mut async_nats::Subscriber, id: &str) -> Result<shoal_protocol::events::JobEvent> {
    use futures::StreamExt;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), events.next()).await?.context("events")?;
        let ev: shoal_protocol::events::JobEvent = shoal_protocol::codec::from_msgpack(&msg.payload)?;
        if ev.job_id == id && ev.state.is_terminal() {
            return Ok(ev);
        }
    }
}

/// `SHOAL_EVENTS` keeps a job's end, whose event carries the job's whole timeline; its queued
/// and started events are live only (its waiters and its endpoint's owner get them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_events_stream_keeps_a_jobs_end_with_its_timeline_not_each_step() -> Result<()> {
    use futures::StreamExt;
    use shoal_protocol::api::RunRequest;
    use shoal_protocol::events::JobEvent;
    use shoal_protocol::job::JobState;
    // a job's start is written (and its started event sent) when it still runs 1 s after its take
    let shoal = Shoal::start_with(Default::default(), |h| h.start_record_ms = 1_000).await?;
    shoal.api.create_endpoint(&rust_endpoint("kept")?).await?;
    let names = shoal.nats.names.clone();
    // a live listener of every event of the endpoint's jobs
    let mut live = shoal.nats.client.subscribe(names.job_events_all()).await?;
    let mut heard = Vec::new();
    for (input, steps) in [
        // one that ends sooner is written once, with its result: queued, then its end
        (json!({"x": 1}), vec![JobState::InQueue, JobState::Completed]),
        (json!({"sleep_ms": 2_000}), vec![JobState::InQueue, JobState::InProgress, JobState::Completed]),
    ] {
        let mut req = RunRequest::new("kept", input);
        req.wait_ms = 30_000;
        let done = shoal.api.run(&req).await?;
        assert_eq!(done.status, JobState::Completed);
        let mut states = Vec::new();
        while states.last() != Some(&JobState::Completed) {
            let msg = tokio::time::timeout(Duration::from_secs(10), live.next()).await?.context("live events")?;
            let event = shoal_protocol::codec::from_msgpack::<JobEvent>(&msg.payload)?;
            assert_eq!(event.job_id, done.id);
            states.push(event.state);
        }
        assert_eq!(states, steps, "every step written is published");
        heard.push(done);
    }
    let done = heard.pop().context("the long job")?;

    let stream = shoal.nats.js.get_stream(names.events_stream()).await?;
    let subject = |state: JobState| names.job_event_subject("kept", &done.id, state.event_token());
    for step in [JobState::InQueue, JobState::InProgress] {
        assert!(stream.get_last_raw_message_by_subject(&subject(step)).await.is_err(), "{step:?} is not stored");
    }
    let end = stream.get_last_raw_message_by_subject(&subject(JobState::Completed)).await?;
    let end: JobEvent = shoal_protocol::codec::from_msgpack(&end.payload)?;
    let view = end.view.context("the end carries the job's view")?;
    let (started, finished) = (view.started_at_ms.context("started")?, view.finished_at_ms.context("finished")?);
    assert!(view.submitted_at_ms <= view.queued_at_ms && view.queued_at_ms <= started && started <= finished);
    assert_eq!(view.state, JobState::Completed);
    shoal.stop().await;
    Ok(())
}

/// A jobs bucket made by an older shoal placed a delete marker when a record expired: it
/// places none after a process connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jobs_bucket_that_placed_delete_markers_is_changed_on_connect() -> Result<()> {
    use async_nats::jetstream::stream;
    let server = shoal_tests::NatsServer::start()?;
    let names = shoal_protocol::names::Names::new(&shoal_tests::test_prefix())?;
    let nats = shoal_actors::nats::Nats::connect(&server.url, names.clone(), &shoal_tests::fast_topology()).await?;
    assert!(nats.job_ttl);
    let mut bucket = nats.js.get_stream(&nats.jobs.stream_name).await?;
    let config = bucket.info().await?.config.clone();
    assert_eq!(config.subject_delete_marker_ttl, None);
    let marked = stream::Config { subject_delete_marker_ttl: Some(Duration::from_secs(60)), ..config };
    nats.js.update_stream(marked).await?;
    let again = shoal_actors::nats::Nats::connect(&server.url, names.clone(), &shoal_tests::fast_topology()).await?;
    assert!(again.job_ttl);
    assert_eq!(bucket.info().await?.config.subject_delete_marker_ttl, None);
    Ok(())
}

/// The events stream keeps what the topology settings say, and takes new limits on connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_events_streams_limits_follow_the_topology_settings() -> Result<()> {
    use shoal_actors::nats::Nats;
    let server = shoal_tests::NatsServer::start()?;
    let names = shoal_protocol::names::Names::new(&shoal_tests::test_prefix())?;
    let nats = Nats::connect(&server.url, names.clone(), &shoal_tests::fast_topology()).await?;
    let config = nats.js.get_stream(names.events_stream()).await?.info().await?.config.clone();
    assert_eq!((config.max_age, config.max_messages), (Duration::from_secs(24 * 3600), 1_000_000));
    let sized =
        shoal_actors::nats::Topology { events_max_age_s: 3600, events_max_msgs: 5, ..shoal_tests::fast_topology() };
    let nats = Nats::connect(&server.url, names.clone(), &sized).await?;
    let mut events = nats.js.get_stream(names.events_stream()).await?;
    let config = events.info().await?.config.clone();
    assert_eq!((config.max_age, config.max_messages), (Duration::from_secs(3600), 5));
    // the oldest go first once it holds five
    for n in 0..8 {
        nats.js.publish(format!("{}.events.host.h{n}.started", names.prefix()), Bytes::new()).await?.await?;
    }
    let state = events.info().await?.state.clone();
    assert_eq!((state.messages, state.first_sequence), (5, 4));
    Ok(())
}

/// An installation made by an older shoal kept every job event: the subjects of its events
/// stream are changed when a process connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_events_stream_that_kept_every_job_event_is_changed_on_connect() -> Result<()> {
    use async_nats::jetstream::stream;
    let server = shoal_tests::NatsServer::start()?;
    let names = shoal_protocol::names::Names::new(&shoal_tests::test_prefix())?;
    let js = async_nats::jetstream::new(async_nats::connect(&server.url).await?);
    let everything = format!("{}.events.>", names.prefix());
    js.create_stream(stream::Config {
        name: names.events_stream(),
        subjects: vec![everything.clone()],
        ..Default::default()
    })
    .await?;
    let nats = shoal_actors::nats::Nats::connect(&server.url, names.clone(), &shoal_tests::fast_topology()).await?;
    let mut info = nats.js.get_stream(names.events_stream()).await?;
    let subjects = info.info().await?.config.subjects.clone();
    assert!(!subjects.contains(&everything), "{subjects:?}");
    assert_eq!(subjects.len(), names.events_subjects().len());
    // and a second connect finds nothing to change
    shoal_actors::nats::Nats::connect(&server.url, names.clone(), &shoal_tests::fast_topology()).await?;
    Ok(())
}

/// A queue of an older shoal: its consumer took the queue's one subject, where the jobs queued
/// then wait, their records written before their tokens. After an upgrade the consumer takes
/// both forms, and those jobs run beside the ones queued since.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_queued_by_an_older_shoal_run_after_an_upgrade() -> Result<()> {
    use shoal_protocol::api::{JobRef, RunRequest};
    use shoal_protocol::job::{JobState, JobToken, Priority, RecordSnapshot};
    let shoal = Shoal::start().await?;
    let names = shoal.nats.names.clone();
    let mut spec = rust_endpoint("older")?;
    (spec.workers_min, spec.workers_max) = (0, 0);
    shoal.api.create_endpoint(&spec).await?;
    // the queue's consumer as an older shoal made it
    let stream = shoal.nats.js.get_stream(names.jobs_stream()).await?;
    let consumer_name = names.jobs_consumer("older", Priority::Normal);
    let mut config = stream.consumer_info(&consumer_name).await?.config;
    (config.filter_subject, config.filter_subjects) = (names.job_subject("older", Priority::Normal), vec![]);
    stream.update_consumer(config).await?;
    // a job queued as an older shoal queued it: its record, then a token on the queue's subject
    let store = shoal_actors::jobs::JobStore::new(shoal.nats.clone());
    let old = shoal.api.run(&RunRequest::new("older", json!({"queued": "before"}))).await?.id;
    let (record, sequence) = store.queued_token("older", &old).await?.context("the new token")?;
    stream.delete_message(sequence).await?;
    let revision = store.create(&record).await?.context("a record")?;
    let mut token = JobToken::new(old.clone(), "older");
    token.snapshot = Some(RecordSnapshot { revision, record });
    let bytes = shoal_protocol::codec::to_msgpack(&token)?;
    shoal.nats.js.publish(names.job_subject("older", Priority::Normal), bytes.into()).await?.await?;
    let new = shoal.api.run(&RunRequest::new("older", json!({"queued": "after"}))).await?.id;

    (spec.workers_min, spec.workers_max) = (1, 1);
    shoal.api.apply_endpoint(&spec).await?;
    for (id, input) in [(&old, "before"), (&new, "after")] {
        let done = shoal_tests::eventually(Duration::from_secs(30), "the job to complete", || async {
            let job = JobRef { endpoint: Some("older".into()), id: id.clone(), wait_ms: 0 };
            shoal.api.status(&job).await.ok().filter(|s| s.status == JobState::Completed)
        })
        .await?;
        assert_eq!(done.output, Some(json!({"queued": input})));
    }
    let config = stream.consumer_info(&consumer_name).await?.config;
    let mut filters = config.filter_subjects.clone();
    filters.sort();
    let mut expected = shoal_actors::jobs::queue_subjects(&names, "older", Priority::Normal);
    expected.sort();
    assert_eq!(filters, expected, "the consumer takes both forms");
    shoal.stop().await;
    Ok(())
}

/// The owner's history read and the job list read an endpoint's queued jobs from their tokens
/// in batches (direct gets), in the order they were queued; a jobs stream made by an older
/// shoal, without direct gets, takes them on connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_jobs_are_read_from_their_tokens_in_batches() -> Result<()> {
    use shoal_protocol::api::{JobRef, RunRequest};
    let shoal = Shoal::start().await?;
    let mut spec = rust_endpoint("batched")?;
    (spec.workers_min, spec.workers_max) = (0, 0);
    shoal.api.create_endpoint(&spec).await?;
    let mut queued = Vec::new();
    for n in 0..5 {
        queued.push(shoal.api.run(&RunRequest::new("batched", json!({ "n": n }))).await?.id);
    }
    // one ends in the queue: its token goes with it
    let cancelled = queued.remove(2);
    shoal.api.cancel(&JobRef { endpoint: Some("batched".into()), id: cancelled, wait_ms: 0 }).await?;
    let store = shoal_actors::jobs::JobStore::new(shoal.nats.clone());
    for batch in [1, 2, 4, 256] {
        let read: Vec<String> =
            store.queued_tokens_by("batched", batch).await?.into_iter().map(|(rec, _)| rec.id).collect();
        assert_eq!(read, queued, "batches of {batch}");
    }
    assert!(store.queued_tokens("no-such-endpoint").await?.is_empty());

    let mut stream = shoal.nats.js.get_stream(shoal.nats.names.jobs_stream()).await?;
    let config = stream.info().await?.config.clone();
    assert!(config.allow_direct);
    shoal.nats.js.update_stream(async_nats::jetstream::stream::Config { allow_direct: false, ..config }).await?;
    let names = shoal.nats.names.clone();
    let again = shoal_actors::nats::Nats::connect(&shoal.server.url, names, &shoal_tests::fast_topology()).await?;
    assert!(stream.info().await?.config.allow_direct, "changed on connect");
    let read = shoal_actors::jobs::JobStore::new(again).queued_tokens("batched").await?;
    assert_eq!(read.len(), queued.len());
    shoal.stop().await;
    Ok(())
}

/// How long reading a deep queue from its tokens takes, one token per request against a batch
/// per request (BENCHMARKS.md series 15):
/// `cargo test --release -p shoal-tests --test job_path -- --ignored --nocapture reading_a_deep_queue`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: prints numbers"]
async fn reading_a_deep_queue_from_its_tokens() -> Result<()> {
    use shoal_protocol::api::RunRequest;
    const JOBS: usize = 20_000;
    let shoal = Shoal::start().await?;
    let mut spec = rust_endpoint("deep")?;
    (spec.workers_min, spec.workers_max) = (0, 0);
    shoal.api.create_endpoint(&spec).await?;
    let mut ids = Vec::new();
    for _ in 0..JOBS / 500 {
        let requests: Vec<RunRequest> = (0..500).map(|n| RunRequest::new("deep", json!({ "n": n }))).collect();
        for run in futures::future::join_all(requests.iter().map(|r| shoal.api.run(r))).await {
            ids.push(run?.id);
        }
    }
    let store = shoal_actors::jobs::JobStore::new(shoal.nats.clone());
    // the owner is done with the queued events before anything is timed
    tokio::time::sleep(Duration::from_secs(3)).await;
    let started = std::time::Instant::now();
    for id in ids.iter().step_by(JOBS / 200) {
        ensure!(store.get_record("deep", id).await?.is_none());
    }
    println!("a job not in the bucket: {:?} on average", started.elapsed() / 200);
    let started = std::time::Instant::now();
    for id in ids.iter().step_by(JOBS / 200) {
        ensure!(store.queued_token("deep", id).await?.is_some());
    }
    println!("a queued job's token: {:?} on average", started.elapsed() / 200);
    // one queued job by its token (the bucket first, then the token): a status, a cancel
    let started = std::time::Instant::now();
    for id in ids.iter().step_by(JOBS / 200) {
        ensure!(store.get("deep", id).await?.is_some_and(|(_, revision)| revision == 0));
    }
    println!("one queued job of {JOBS} found (both) in {:?} on average", started.elapsed() / 200);
    for batch in [1, 256, 1] {
        let started = std::time::Instant::now();
        let read = store.queued_tokens_by("deep", batch).await?.len();
        ensure!(read == JOBS, "read {read} of {JOBS}");
        println!("{JOBS} queued jobs read {batch} per request in {:?}", started.elapsed());
    }
    shoal.stop().await;
    Ok(())
}
