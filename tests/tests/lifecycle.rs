//! Job lifecycle against real workers: cancel (queued and running), ttl expiry, execution
//! timeout, retry, and generator streaming consumed on read.

use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{Value, json};
use shoal_protocol::api::{JobRef, JobStatus, RunRequest};
use shoal_protocol::job::{JobState, PolicyRequest};
use shoal_protocol::{ApiError, ErrorCode};
use shoal_tests::{Shoal, eventually, python_endpoint, rust_endpoint};

fn job(endpoint: &str, id: &str) -> JobRef {
    JobRef { endpoint: Some(endpoint.into()), id: id.into(), wait_ms: 0 }
}

async fn wait_state(shoal: &Shoal, endpoint: &str, id: &str, state: JobState, timeout: Duration) -> Result<JobStatus> {
    eventually(timeout, &format!("job {id} to be {state:?}"), || async {
        shoal.api.status(&job(endpoint, id)).await.ok().filter(|s| s.status == state)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_a_queued_job_and_ttl_expiry_without_workers() -> Result<()> {
    let shoal = Shoal::start().await?;
    let mut spec = rust_endpoint("idle")?;
    spec.workers_min = 0;
    spec.workers_max = 0; // nobody will take its jobs (a queued job starts a worker at once otherwise)
    shoal.api.create_endpoint(&spec).await?;

    let queued = shoal.api.run(&RunRequest::new("idle", json!({"a": 1}))).await?;
    let cancelled = shoal.api.cancel(&job("idle", &queued.id)).await?;
    assert_eq!(cancelled.status, JobState::Cancelled);
    // cancelling again leaves it as it is
    assert_eq!(shoal.api.cancel(&job("idle", &queued.id)).await?.status, JobState::Cancelled);

    let mut req = RunRequest::new("idle", json!({"b": 2}));
    req.policy = Some(PolicyRequest { ttl_ms: Some(1_000), ..Default::default() });
    let expiring = shoal.api.run(&req).await?;
    let timed_out = wait_state(&shoal, "idle", &expiring.id, JobState::TimedOut, Duration::from_secs(10)).await?;
    assert!(timed_out.error.unwrap_or_default().contains("ttl"), "reason names the ttl");
    assert_eq!(timed_out.attempts, 0, "it never ran");
    // both ended in the queue (a cancel, the owner's ttl time-out): their tokens are gone
    assert_eq!(tokens(&shoal, "idle").await?, 0);

    // retry re-queues the timed-out job under the same id; a worker then runs it
    let retried = shoal.api.retry(&job("idle", &expiring.id)).await?;
    assert_eq!((retried.id.as_str(), retried.status), (expiring.id.as_str(), JobState::InQueue));
    (spec.workers_min, spec.workers_max) = (1, 1);
    shoal.api.apply_endpoint(&spec).await?;
    let done = wait_state(&shoal, "idle", &expiring.id, JobState::Completed, Duration::from_secs(30)).await?;
    assert_eq!(done.output, Some(json!({"b": 2})));
    // the cancelled job never ran
    assert_eq!(shoal.api.status(&job("idle", &queued.id)).await?.status, JobState::Cancelled);
    // retry of a completed job is a conflict
    let err: ApiError = shoal.api.retry(&job("idle", &expiring.id)).await.expect_err("not retryable");
    assert_eq!(err.code, ErrorCode::Conflict);
    shoal.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_time_out_running_jobs_on_the_python_worker() -> Result<()> {
    let shoal = Shoal::start().await?;
    shoal.api.create_endpoint(&python_endpoint("slow")?).await?;

    // cancel while it runs: the worker is told to stop and is free again at once
    let running = shoal.api.run(&RunRequest::new("slow", json!({"mode": "sleep", "seconds": 60}))).await?;
    wait_state(&shoal, "slow", &running.id, JobState::InProgress, Duration::from_secs(60)).await?;
    let cancelled = shoal.api.cancel(&job("slow", &running.id)).await?;
    assert_eq!(cancelled.status, JobState::Cancelled);

    let mut next = RunRequest::new("slow", json!({"mode": "echo", "after": "cancel"}));
    next.wait_ms = 30_000;
    let after = shoal.api.run(&next).await?;
    assert_eq!(after.status, JobState::Completed, "the worker was freed by the stop: {after:?}");

    // execution timeout: TIMED_OUT, and the worker is stopped from running it
    let mut req = RunRequest::new("slow", json!({"mode": "sleep", "seconds": 60}));
    req.policy = Some(PolicyRequest { execution_timeout_ms: Some(1_500), ..Default::default() });
    let slow = shoal.api.run(&req).await?;
    let timed_out = wait_state(&shoal, "slow", &slow.id, JobState::TimedOut, Duration::from_secs(30)).await?;
    assert_eq!(timed_out.error.as_deref(), Some("execution timeout exceeded"));
    let mut next = RunRequest::new("slow", json!({"mode": "echo", "after": "timeout"}));
    next.wait_ms = 30_000;
    assert_eq!(shoal.api.run(&next).await?.status, JobState::Completed);

    // the late results never land: both stay as they ended
    assert_eq!(shoal.api.status(&job("slow", &running.id)).await?.status, JobState::Cancelled);
    assert_eq!(shoal.api.status(&job("slow", &slow.id)).await?.status, JobState::TimedOut);
    shoal.stop().await;
    Ok(())
}

async fn collect_stream(shoal: &Shoal, endpoint: &str, id: &str) -> Result<(Vec<Value>, JobState)> {
    let mut chunks = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let reply = shoal.api.stream(&job(endpoint, id)).await?;
        let drained = reply.stream.is_empty();
        chunks.extend(reply.stream.into_iter().map(|c| c.output));
        if reply.status.is_terminal() && drained {
            return Ok((chunks, reply.status));
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "stream did not end");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generator_chunks_stream_in_order_each_once() -> Result<()> {
    let shoal = Shoal::start().await?;
    let mut plain = python_endpoint("gen")?;
    plain.env.insert("SHOAL_EXAMPLE_HANDLER".into(), "generator".into());
    shoal.api.create_endpoint(&plain).await?;
    let mut aggregate = plain.clone();
    aggregate.id = "gen-agg".into();
    aggregate.env.insert("SHOAL_EXAMPLE_AGGREGATE".into(), "true".into());
    shoal.api.create_endpoint(&aggregate).await?;

    let expected: Vec<Value> = (0..6).map(|i| json!({"i": i})).collect();
    let a = shoal.api.run(&RunRequest::new("gen", json!({"chunks": 6, "chunk_delay_s": 0.2}))).await?;
    let (chunks, state) = collect_stream(&shoal, "gen", &a.id).await?;
    assert_eq!(state, JobState::Completed);
    assert_eq!(chunks, expected, "every chunk once, in order");
    // consumed: a later read returns nothing
    assert!(shoal.api.stream(&job("gen", &a.id)).await?.stream.is_empty());
    assert_eq!(shoal.api.status(&job("gen", &a.id)).await?.output, Some(json!([])));

    let b = shoal.api.run(&RunRequest::new("gen-agg", json!({"chunks": 6}))).await?;
    let (chunks, _) = collect_stream(&shoal, "gen-agg", &b.id).await?;
    assert_eq!(chunks, expected);
    assert_eq!(shoal.api.status(&job("gen-agg", &b.id)).await?.output, Some(Value::Array(expected)));

    // chunks whose sum passes NATS' max_payload (1 MiB) come over several reads, none lost; a
    // chunk larger than any reply can carry is refused when posted (413) and the stream goes on
    let pad = |n: usize| "x".repeat(n);
    let big = shoal.api.run(&RunRequest::new("gen", json!({"chunks": 24, "chunk_bytes": 100_000}))).await?;
    let (chunks, state) = collect_stream(&shoal, "gen", &big.id).await?;
    assert_eq!(state, JobState::Completed);
    let expected: Vec<Value> = (0..24).map(|i| json!({"i": i, "pad": pad(100_000)})).collect();
    assert!(chunks == expected, "all 24 chunks of 100 KB, in order: got {} chunks", chunks.len());
    let refused =
        shoal.api.run(&RunRequest::new("gen", json!({"chunks": 3, "chunk_bytes": [10, 1_100_000, 10]}))).await?;
    let (chunks, state) = collect_stream(&shoal, "gen", &refused.id).await?;
    assert_eq!(state, JobState::Completed);
    assert_eq!(chunks, [json!({"i": 0, "pad": pad(10)}), json!({"i": 2, "pad": pad(10)})]);
    // the worker was told why (the SDK logs the refusal and goes on)
    let host = &shoal.host.as_ref().context("host")?.id;
    let worker = shoal.api.status(&job("gen", &refused.id)).await?.worker_id.context("the job's worker")?;
    let lines = shoal_actors::host::logs::get(&shoal.nats.client, &shoal.nats.names, host, "gen", &worker, 500).await?;
    assert!(lines.iter().any(|l| l.contains("413")), "the worker's log shows the 413: {lines:?}");
    shoal.stop().await;
    Ok(())
}

/// Writes `id`'s record as CANCELLED behind the job events' back (no event), as if its event
/// had been lost on the way to the endpoint's owner.
async fn cancel_without_an_event(shoal: &Shoal, endpoint: &str, id: &str) -> Result<()> {
    let store = shoal_actors::jobs::JobStore::new(shoal.nats.clone());
    let (rec, revision) = store.get(endpoint, id).await?.expect("the record exists");
    let now = shoal_actors::clock::now_ms();
    let cancelled = shoal_protocol::lifecycle::cancel(&rec, "cancelled behind the events' back", now)?;
    store.write(&store.key(endpoint, id), &cancelled, revision).await?.expect("nobody wrote in between");
    Ok(())
}

async fn counts(shoal: &Shoal, endpoint: &str) -> Result<(u64, u64)> {
    let jobs = shoal.api.health(endpoint).await?.jobs;
    Ok((jobs.in_queue, jobs.cancelled))
}

/// The endpoint actor follows its jobs from the job events; when one was missed, it learns
/// the record's state at the latest at the job's next deadline (the time-out it tries is
/// refused, and it reads the record), without writing over the record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owner_catches_up_with_a_missed_event_at_the_jobs_deadline() -> Result<()> {
    let shoal = Shoal::start().await?;
    let mut spec = rust_endpoint("quiet")?;
    (spec.workers_min, spec.workers_max) = (0, 0);
    shoal.api.create_endpoint(&spec).await?;
    let mut req = RunRequest::new("quiet", json!({}));
    req.policy = Some(PolicyRequest { ttl_ms: Some(1_500), ..Default::default() });
    let id = shoal.api.run(&req).await?.id;
    eventually(Duration::from_secs(10), "the owner to count the queued job", || async {
        counts(&shoal, "quiet").await.ok().filter(|c| *c == (1, 0))
    })
    .await?;
    cancel_without_an_event(&shoal, "quiet", &id).await?;
    assert_eq!(counts(&shoal, "quiet").await?, (1, 0), "no event: the owner still counts it queued");
    eventually(Duration::from_secs(10), "the owner to read the record at the ttl", || async {
        counts(&shoal, "quiet").await.ok().filter(|c| *c == (0, 1))
    })
    .await?;
    let status = shoal.api.status(&job("quiet", &id)).await?;
    assert_eq!(status.status, JobState::Cancelled, "the record is left as it was, not timed out");
    shoal.stop().await;
    Ok(())
}

/// Events published while the control plane's connection is down never reach it: when it is
/// connected again, every endpoint actor it runs reads its job records again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owner_reads_its_records_again_after_a_reconnect() -> Result<()> {
    let mut shoal = Shoal::start().await?;
    let mut spec = rust_endpoint("quiet")?;
    (spec.workers_min, spec.workers_max) = (0, 0);
    shoal.api.create_endpoint(&spec).await?;
    let id = shoal.api.run(&RunRequest::new("quiet", json!({}))).await?.id;
    eventually(Duration::from_secs(10), "the owner to count the queued job", || async {
        counts(&shoal, "quiet").await.ok().filter(|c| *c == (1, 0))
    })
    .await?;
    cancel_without_an_event(&shoal, "quiet", &id).await?;
    // the job's ttl is a day away: only a new read of the records can tell the owner
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(counts(&shoal, "quiet").await?, (1, 0), "no event: the owner still counts it queued");
    shoal.server.restart()?;
    eventually(Duration::from_secs(20), "the owner to read its records again", || async {
        counts(&shoal, "quiet").await.ok().filter(|c| *c == (0, 1))
    })
    .await?;
    shoal.stop().await;
    Ok(())
}

/// Whether the jobs bucket holds a record of the job (not what `status` says: that also reads
/// a queued job's token).
async fn has_record(shoal: &Shoal, endpoint: &str, id: &str) -> Result<bool> {
    let store = shoal_actors::jobs::JobStore::new(shoal.nats.clone());
    Ok(store.get_record(endpoint, id).await?.is_some())
}

/// How many tokens of `endpoint` wait in the jobs stream.
async fn tokens(shoal: &Shoal, endpoint: &str) -> Result<usize> {
    let stream = shoal.nats.js.get_stream(shoal.nats.names.jobs_stream()).await?;
    let mut subjects = stream.info_with_subjects(shoal.nats.names.job_tokens_of_endpoint(endpoint)).await?;
    let mut n = 0;
    while let Some(subject) = futures::StreamExt::next(&mut subjects).await {
        n += subject?.1;
    }
    Ok(n)
}

/// A job is queued as its token alone: until something changes it, it has no record, and
/// its status, the lookup by id alone, the job list, the owner's counts (also after another
/// control replica takes the endpoint over) and a cancel all find it by its token. A cancel
/// writes the record and removes the token, so nothing runs it once that record has expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_job_is_its_token_until_it_changes() -> Result<()> {
    let mut shoal = Shoal::start().await?;
    let mut spec = rust_endpoint("tokens")?;
    (spec.workers_min, spec.workers_max) = (0, 0);
    shoal.api.create_endpoint(&spec).await?;
    let queued = shoal.api.run(&RunRequest::new("tokens", json!({"n": 1}))).await?.id;
    let cancelled = shoal.api.run(&RunRequest::new("tokens", json!({"n": 2}))).await?.id;
    assert!(!has_record(&shoal, "tokens", &queued).await?, "no record while queued");
    assert_eq!(tokens(&shoal, "tokens").await?, 2);

    let status = shoal.api.status(&job("tokens", &queued)).await?;
    assert_eq!((status.status, status.id.as_str()), (JobState::InQueue, queued.as_str()));
    let by_id = JobRef { endpoint: None, id: queued.clone(), wait_ms: 0 };
    assert_eq!(shoal.api.status(&by_id).await?.status, JobState::InQueue, "found by its id alone");
    let list =
        shoal.api.jobs(&shoal_protocol::api::JobsRequest { endpoint: "tokens".into(), ..Default::default() }).await?;
    let mut listed: Vec<(&str, JobState)> = list.jobs.iter().map(|j| (j.id.as_str(), j.state)).collect();
    listed.sort_by_key(|(id, _)| *id);
    let mut expected = vec![(queued.as_str(), JobState::InQueue), (cancelled.as_str(), JobState::InQueue)];
    expected.sort_by_key(|(id, _)| *id);
    assert_eq!(listed, expected);
    eventually(Duration::from_secs(10), "the owner to count both queued jobs", || async {
        counts(&shoal, "tokens").await.ok().filter(|c| *c == (2, 0))
    })
    .await?;

    // a cancel writes the record, and the token goes
    assert_eq!(shoal.api.cancel(&job("tokens", &cancelled)).await?.status, JobState::Cancelled);
    assert!(has_record(&shoal, "tokens", &cancelled).await?);
    assert_eq!(tokens(&shoal, "tokens").await?, 1, "the cancelled job's token is removed");
    assert!(!has_record(&shoal, "tokens", &queued).await?, "the other job is untouched");

    // another control replica takes the endpoint over and counts the queued job from its token
    shoal.control.take().expect("a control plane").stop().await;
    shoal.control = Some(shoal_tests::cluster::start_control(&shoal.nats, "replica-2").await?);
    eventually(Duration::from_secs(30), "the new owner to count the queued job", || async {
        counts(&shoal, "tokens").await.ok().filter(|c| *c == (1, 1))
    })
    .await?;

    // the cancelled job's record expires (removed as a TTL would: nothing left of it); a
    // worker then runs the queued job, and never the cancelled one
    let store = shoal_actors::jobs::JobStore::new(shoal.nats.clone());
    let key = format!("{}{}", shoal.nats.jobs.prefix, store.key("tokens", &cancelled));
    shoal.nats.jobs.stream.purge().filter(key).await?;
    assert!(!has_record(&shoal, "tokens", &cancelled).await?);
    (spec.workers_min, spec.workers_max) = (1, 1);
    shoal.api.apply_endpoint(&spec).await?;
    let done = wait_state(&shoal, "tokens", &queued, JobState::Completed, Duration::from_secs(30)).await?;
    assert_eq!(done.output, Some(json!({"n": 1})));
    assert_eq!(tokens(&shoal, "tokens").await?, 0);
    assert!(!has_record(&shoal, "tokens", &cancelled).await?, "the cancelled job never ran");
    shoal.stop().await;
    Ok(())
}

/// A token delivered again whose job has no record was either handed back before anyone took
/// it (its job runs), or taken, ended and its record expired since: its end is in the stored
/// job events, and it is removed without running again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_delivered_again_without_a_record_runs_only_if_its_job_never_ended() -> Result<()> {
    use async_nats::jetstream::AckKind;
    use futures::StreamExt;
    let shoal = Shoal::start().await?;
    let mut spec = rust_endpoint("again")?;
    (spec.workers_min, spec.workers_max) = (0, 0);
    shoal.api.create_endpoint(&spec).await?;
    let ended = shoal.api.run(&RunRequest::new("again", json!({"n": 1}))).await?.id;
    let fresh = shoal.api.run(&RunRequest::new("again", json!({"n": 2}))).await?.id;
    // a taker that fails before it writes anything: both tokens are handed back
    let priority = shoal_protocol::job::Priority::Normal;
    let queue = shoal_actors::jobs::jobs_consumer(&shoal.nats, "again", priority, Duration::from_secs(30)).await?;
    let mut batch = queue.fetch().max_messages(2).messages().await?;
    let mut handed_back = 0;
    while let Some(token) = batch.next().await {
        token.map_err(|e| anyhow::anyhow!(e))?.ack_with(AckKind::Nak(None)).await.map_err(|e| anyhow::anyhow!(e))?;
        handed_back += 1;
    }
    assert_eq!(handed_back, 2);
    // the first job's end is in the events, as if it ran and its record expired since
    let event = shoal_protocol::events::JobEvent {
        job_id: ended.clone(),
        endpoint: "again".into(),
        state: JobState::Completed,
        attempts: 1,
        worker_id: None,
        error: None,
        at_ms: shoal_actors::clock::now_ms(),
        status: None,
        answered: None,
        view: None,
        removed: false,
    };
    let subject = shoal.nats.names.job_event_subject("again", &ended, JobState::Completed.event_token());
    shoal.nats.js.publish(subject, shoal_protocol::codec::to_msgpack(&event)?.into()).await?.await?;

    (spec.workers_min, spec.workers_max) = (1, 1);
    shoal.api.apply_endpoint(&spec).await?;
    let done = wait_state(&shoal, "again", &fresh, JobState::Completed, Duration::from_secs(30)).await?;
    assert_eq!(done.output, Some(json!({"n": 2})), "a token handed back before its take runs");
    eventually(Duration::from_secs(10), "both tokens to be gone", || async {
        tokens(&shoal, "again").await.ok().filter(|n| *n == 0)
    })
    .await?;
    assert!(!has_record(&shoal, "again", &ended).await?, "an ended job does not run again");
    shoal.stop().await;
    Ok(())
}

/// A job event as received from its subject.
fn job_event(m: &async_nats::Message) -> Result<shoal_protocol::events::JobEvent> {
    Ok(shoal_protocol::codec::from_msgpack(&m.payload)?)
}

/// An endpoint of one worker running a Python script that speaks the worker protocol by hand
/// (tests/python/), to act as a worker the runpod SDK would not.
fn script_worker_endpoint(id: &str, script: &str) -> Result<shoal_protocol::endpoint::EndpointSpec> {
    let python = shoal_tests::python_bin()?;
    let mut spec =
        shoal_protocol::endpoint::EndpointSpec::with_command(id, &format!("exec {} {script}", python.display()));
    (spec.workers_min, spec.workers_max) = (1, 1);
    Ok(spec)
}

/// A job that ends in the queue has its token removed. Should that removal fail, the token
/// outlives the job's record (a cancel's record lives its retention, 1 s here); delivered for
/// the first time after the record expired, it is known by the job's stored end event and
/// removed without running, while an old token of a job that never ended runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_outliving_the_record_of_a_job_that_ended_in_the_queue_never_runs() -> Result<()> {
    use futures::StreamExt;
    use shoal_protocol::job::Priority;
    let config = shoal_actors::control::ControlConfig { tick_ms: 100, run_retention_s: 1, ..Default::default() };
    let shoal = Shoal::start_with(config, |_| {}).await?;
    let mut spec = rust_endpoint("old")?;
    (spec.workers_min, spec.workers_max) = (0, 0);
    shoal.api.create_endpoint(&spec).await?;
    let cancelled = shoal.api.run(&RunRequest::new("old", json!({"n": 1}))).await?.id;
    let fresh = shoal.api.run(&RunRequest::new("old", json!({"n": 2}))).await?.id;
    // the first job's token as queued, kept to be put back as if its removal had failed
    let subject = shoal.nats.names.job_token_subject("old", Priority::Normal, &cancelled);
    let stream = shoal.nats.js.get_stream(shoal.nats.names.jobs_stream()).await?;
    let token = stream.get_last_raw_message_by_subject(&subject).await?;
    assert_eq!(shoal.api.cancel(&job("old", &cancelled)).await?.status, JobState::Cancelled);
    eventually(Duration::from_secs(15), "the cancelled job's record to expire", || async {
        (!has_record(&shoal, "old", &cancelled).await.ok()?).then_some(())
    })
    .await?;
    shoal.nats.js.publish(subject, token.payload).await?.await?;
    assert_eq!(tokens(&shoal, "old").await?, 2, "the old token is back beside the fresh job's");

    let mut events = shoal.nats.client.subscribe(shoal.nats.names.job_events_of("old", "*")).await?;
    (spec.workers_min, spec.workers_max) = (1, 1);
    shoal.api.apply_endpoint(&spec).await?;
    let mut seen = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(m) = events.next().await {
            let e = job_event(&m)?;
            seen.push((e.job_id.clone(), e.state));
            if e.job_id == fresh && e.state.is_terminal() {
                return Ok::<_, anyhow::Error>(e);
            }
        }
        anyhow::bail!("the job events ended")
    })
    .await??;
    assert_eq!(ended.state, JobState::Completed);
    assert_eq!(
        ended.status.and_then(|s| s.output),
        Some(json!({"n": 2})),
        "an old token of a job that never ended runs"
    );
    eventually(Duration::from_secs(10), "both tokens to be gone", || async {
        tokens(&shoal, "old").await.ok().filter(|n| *n == 0)
    })
    .await?;
    // whatever took the old token had published its events by the time the token was gone
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(500), events.next()).await {
        let e = job_event(&m)?;
        seen.push((e.job_id.clone(), e.state));
    }
    assert!(!seen.iter().any(|(id, _)| *id == cancelled), "the cancelled job never ran again: {seen:?}");
    assert!(!has_record(&shoal, "old", &cancelled).await?, "nor was it recorded again");
    shoal.stop().await;
    Ok(())
}

/// A worker that gives up its job-take while the host is taking a job for it never gets that
/// job: the take is undone without using an attempt (its record back to IN_QUEUE, its token
/// handed back at once), and the job runs on the worker's next take, counted as its first
/// attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_taken_for_a_job_take_given_up_goes_back_without_using_an_attempt() -> Result<()> {
    // both ways a take is undone: written at the take (start_record_ms 0), and handed over
    // before its start was written (the default)
    for start_record_ms in [0, shoal_actors::host::HostConfig::default().start_record_ms] {
        a_take_given_up_is_released(start_record_ms).await?;
    }
    Ok(())
}

async fn a_take_given_up_is_released(start_record_ms: u64) -> Result<()> {
    use futures::StreamExt;
    let shoal = Shoal::start_with(Default::default(), |h| h.start_record_ms = start_record_ms).await?;
    let dir = tempfile::tempdir()?;
    let gave_up = dir.path().join("gave-up");
    let mut spec = script_worker_endpoint("abandon", "tests/python/abandoning_worker.py")?;
    spec.env.insert("GAVE_UP_FILE".into(), gave_up.display().to_string());
    let mut events = shoal.nats.client.subscribe(shoal.nats.names.job_events_all()).await?;
    shoal.api.create_endpoint(&spec).await?;
    // the worker has asked for a job and gone; the host still holds its take for up to 2 s
    eventually(Duration::from_secs(30), "the worker to give up its first job-take", || async {
        gave_up.exists().then_some(())
    })
    .await?;
    let id = shoal.api.run(&RunRequest::new("abandon", json!({"n": 7}))).await?.id;

    let done = wait_state(&shoal, "abandon", &id, JobState::Completed, Duration::from_secs(30)).await?;
    assert_eq!(done.output, Some(json!({"input": {"n": 7}})));
    assert_eq!(done.attempts, 1, "the take nobody got is not an attempt ({start_record_ms} ms)");
    let mut seen = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(2), events.next()).await {
        let e = job_event(&m)?;
        if e.job_id == id {
            seen.push((e.state, e.attempts));
            if e.state == JobState::Completed {
                break;
            }
        }
    }
    if start_record_ms == 0 {
        let taken_then_released = [(JobState::InProgress, 1), (JobState::InQueue, 0), (JobState::InProgress, 1)];
        assert!(
            seen.windows(3).any(|w| w == taken_then_released),
            "the job was taken for the given-up request, released, then taken again: {seen:?}"
        );
    } else {
        // the take nobody got was never written: the job went back to the queue as it was
        assert!(seen.iter().all(|&(state, attempts)| state != JobState::InQueue || attempts == 0), "{seen:?}");
        assert!(seen.iter().all(|&(_, attempts)| attempts <= 1), "{seen:?}");
    }
    assert_eq!(seen.last(), Some(&(JobState::Completed, 1)));
    shoal.stop().await;
    Ok(())
}

/// A job whose worker has it before its start is written (`host.start_record_ms`) reads as
/// queued until then; cancelled in that time, it is CANCELLED at once, and the late write of
/// its start runs into the cancel and stops the job on its worker, which is then free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_cancelled_before_its_start_is_recorded_is_stopped_on_its_worker() -> Result<()> {
    let shoal = Shoal::start_with(Default::default(), |h| h.start_record_ms = 1_500).await?;
    shoal.api.create_endpoint(&rust_endpoint("late")?).await?;
    let id = shoal.api.run(&RunRequest::new("late", json!({"sleep_ms": 60_000}))).await?.id;
    eventually(Duration::from_secs(30), "the worker to run the job", || async {
        let workers = shoal.api.workers(Some("late")).await.ok()?;
        workers.workers.iter().any(|w| w.current_jobs.contains(&id)).then_some(())
    })
    .await?;
    let status = shoal.api.status(&job("late", &id)).await?;
    assert_eq!((status.status, status.attempts), (JobState::InQueue, 0), "its start is not recorded yet");
    let cancelled = shoal.api.cancel(&job("late", &id)).await?;
    assert_eq!(cancelled.status, JobState::Cancelled);
    eventually(Duration::from_secs(15), "the worker to drop the cancelled job", || async {
        let workers = shoal.api.workers(Some("late")).await.ok()?;
        let free = !workers.workers.is_empty() && workers.workers.iter().all(|w| !w.current_jobs.contains(&id));
        free.then_some(())
    })
    .await?;
    let status = shoal.api.status(&job("late", &id)).await?;
    assert_eq!(status.status, JobState::Cancelled, "the late start did not overwrite the cancel");
    // the worker runs the next job
    let next = shoal.api.run(&RunRequest::new("late", json!({"n": 2}))).await?.id;
    let done = wait_state(&shoal, "late", &next, JobState::Completed, Duration::from_secs(30)).await?;
    assert_eq!(done.attempts, 1);
    shoal.stop().await;
    Ok(())
}

/// A worker that posts a result and hangs up before the answer still has that result
/// recorded, and the job is over on its worker: its token is acked and the worker is free for
/// the next job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_posted_by_a_worker_that_hangs_up_is_recorded_and_frees_the_worker() -> Result<()> {
    let shoal = Shoal::start().await?;
    let spec = script_worker_endpoint("hasty", "tests/python/hasty_worker.py")?;
    shoal.api.create_endpoint(&spec).await?;
    let first = shoal.api.run(&RunRequest::new("hasty", json!({"n": 1}))).await?.id;
    let done = wait_state(&shoal, "hasty", &first, JobState::Completed, Duration::from_secs(30)).await?;
    assert_eq!(done.output, Some(json!({"input": {"n": 1}})));
    let second = shoal.api.run(&RunRequest::new("hasty", json!({"n": 2}))).await?.id;
    let done = wait_state(&shoal, "hasty", &second, JobState::Completed, Duration::from_secs(30)).await?;
    assert_eq!(done.output, Some(json!({"input": {"n": 2}})));
    assert_eq!(done.attempts, 1);
    eventually(Duration::from_secs(10), "both tokens acked and the worker idle", || async {
        let workers = shoal.api.workers(Some("hasty")).await.ok()?;
        let idle = !workers.workers.is_empty() && workers.workers.iter().all(|w| w.current_jobs.is_empty());
        (idle && tokens(&shoal, "hasty").await.ok()? == 0).then_some(())
    })
    .await?;
    shoal.stop().await;
    Ok(())
}
