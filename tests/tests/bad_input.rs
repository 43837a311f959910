//! Bad input gets a clear error (a code and a message) and the service keeps serving.

use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use serde_json::{Value, json};
use shoal_actors::control::ControlConfig;
use shoal_protocol::api::{JobRef, JobsRequest, RunRequest};
use shoal_protocol::codec::to_msgpack;
use shoal_protocol::endpoint::EndpointSpec;
use shoal_protocol::job::JobState;
use shoal_protocol::worker::{WorkerRecord, WorkerState};
use shoal_protocol::{ApiError, ErrorCode};
use shoal_tests::{Shoal, rust_endpoint};

async fn raw(shoal: &Shoal, op: &str, content_type: Option<&str>, body: Vec<u8>) -> Result<(Option<String>, Value)> {
    let mut headers = async_nats::HeaderMap::new();
    if let Some(ct) = content_type {
        headers.insert("Content-Type", ct);
    }
    let req =
        async_nats::Request::new().payload(Bytes::from(body)).headers(headers).timeout(Some(Duration::from_secs(10)));
    let reply = shoal.nats.client.send_request(shoal.nats.names.api_subject(op), req).await?;
    let code = reply.headers.as_ref().and_then(|h| h.get("Nats-Service-Error-Code")).map(|v| v.to_string());
    let body = if content_type == Some("application/json") {
        serde_json::from_slice(&reply.payload)?
    } else {
        rmp_serde_value(&reply.payload)
    };
    Ok((code, body))
}

fn rmp_serde_value(bytes: &[u8]) -> Value {
    shoal_protocol::codec::from_msgpack(bytes).unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors_and_the_service_keeps_serving() -> Result<()> {
    let shoal =
        Shoal::start_with(ControlConfig { tick_ms: 100, max_input_bytes: 64 * 1024, ..Default::default() }, |_| {})
            .await?;
    shoal.api.create_endpoint(&rust_endpoint("ok")?).await?;

    // malformed MessagePack
    let (code, body) = raw(&shoal, "job.run", None, vec![0xc1, 0xff, 0x00]).await?;
    assert_eq!(code.as_deref(), Some("400"));
    assert_eq!(body["code"], "bad_request");
    assert!(body["message"].as_str().unwrap_or_default().contains("MessagePack"), "{body}");
    // malformed JSON
    let (code, body) = raw(&shoal, "job.run", Some("application/json"), b"{not json".to_vec()).await?;
    assert_eq!(code.as_deref(), Some("400"));
    assert!(body["message"].as_str().unwrap_or_default().contains("JSON"), "{body}");
    // missing input
    let (code, body) =
        raw(&shoal, "job.run", Some("application/json"), serde_json::to_vec(&json!({"endpoint": "ok"}))?).await?;
    assert_eq!(code.as_deref(), Some("400"));
    assert!(body["message"].as_str().unwrap_or_default().contains("input"), "{body}");

    // unknown endpoint
    let err: ApiError = shoal.api.run(&RunRequest::new("nope", json!(1))).await.expect_err("unknown");
    assert_eq!(err.code, ErrorCode::NotFound);
    assert!(err.message.contains("nope"));
    // wildcards and separators in ids
    for bad in ["ep*", ">", "a.b", "a b", ""] {
        let err = shoal.api.run(&RunRequest::new(bad, json!(1))).await.expect_err(bad);
        assert_eq!(err.code, ErrorCode::BadRequest, "{bad}: {err}");
        let err =
            shoal.api.status(&JobRef { endpoint: Some("ok".into()), id: bad.into(), wait_ms: 0 }).await.expect_err(bad);
        assert_eq!(err.code, ErrorCode::BadRequest, "{bad}: {err}");
        let err = shoal.api.health(bad).await.expect_err(bad);
        assert_eq!(err.code, ErrorCode::BadRequest, "{bad}: {err}");
    }
    // unknown job
    let err = shoal
        .api
        .status(&JobRef { endpoint: Some("ok".into()), id: "missing-u1".into(), wait_ms: 0 })
        .await
        .expect_err("missing");
    assert_eq!(err.code, ErrorCode::NotFound);
    // oversize payload
    let big = "x".repeat(100 * 1024);
    let err = shoal.api.run(&RunRequest::new("ok", json!({"blob": big}))).await.expect_err("too large");
    assert_eq!(err.code, ErrorCode::TooLarge);
    assert!(err.message.contains("max_input_bytes"), "{err}");
    // a request larger than the NATS server takes: refused by the client, nothing sent
    let huge = "x".repeat(2 * 1024 * 1024);
    let err = shoal.api.run(&RunRequest::new("ok", json!({"blob": huge}))).await.expect_err("too large for NATS");
    assert_eq!(err.code, ErrorCode::TooLarge, "{err}");
    assert!(err.message.contains("max_payload") && err.message.contains("input_ref"), "{err}");
    // invalid policy and spec
    let mut req = RunRequest::new("ok", json!(1));
    req.policy = Some(shoal_protocol::job::PolicyRequest { ttl_ms: Some(5), ..Default::default() });
    assert_eq!(shoal.api.run(&req).await.expect_err("ttl").code, ErrorCode::BadRequest);
    let mut spec = EndpointSpec::with_command("bad-spec", "true");
    spec.workers_min = 9;
    let err = shoal.api.create_endpoint(&spec).await.expect_err("invalid spec");
    assert_eq!(err.code, ErrorCode::BadRequest);
    assert!(err.message.contains("workers_min"), "{err}");
    assert_eq!(shoal.api.create_endpoint(&rust_endpoint("ok")?).await.expect_err("exists").code, ErrorCode::Conflict);

    // still serving
    let mut req = RunRequest::new("ok", json!({"still": "alive"}));
    req.wait_ms = 30_000;
    let done = shoal.api.run(&req).await?;
    assert_eq!(done.output, Some(json!({"still": "alive"})));
    // idempotency: the same key returns the same job
    let mut req = RunRequest::new("ok", json!({"once": true}));
    req.idempotency_key = Some("order-42".into());
    let a = shoal.api.run(&req).await?;
    let b = shoal.api.run(&req).await?;
    assert_eq!(a.id, b.id);
    shoal.stop().await;
    Ok(())
}

/// An idempotency key names one job however its submissions meet. Duplicates sent at the same
/// moment all answer with that job (one that finds the key claimed and the job not yet queued
/// waits for it). A key left naming a job that never was (its control plane stopped between
/// claiming the key and queueing the job) is a `not_found` that says so and what to do, not the
/// bare "job not found". A key its holder frees while another submission waits on it (its job
/// could not be queued) is claimed by the one waiting, whose job runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_names_one_job_however_its_submissions_meet() -> Result<()> {
    let shoal = Shoal::start().await?;
    shoal.api.create_endpoint(&rust_endpoint("keys")?).await?;
    let keyed =
        |key: &str| RunRequest { idempotency_key: Some(key.into()), ..RunRequest::new("keys", json!({"order": key})) };
    for round in 0..3 {
        let key = format!("dup-{round}");
        let req = keyed(&key);
        let answers = futures::future::join_all((0..16).map(|_| shoal.api.run(&req))).await;
        let ids = answers.into_iter().map(|a| a.map(|s| s.id)).collect::<Result<Vec<_>, _>>()?;
        assert!(ids.iter().all(|id| *id == ids[0]), "one job for the key: {ids:?}");
    }
    let all = JobsRequest { endpoint: "keys".into(), ..JobsRequest::default() };
    assert_eq!(shoal.api.jobs(&all).await?.jobs.len(), 3, "one job per key");

    // a claim left by a control plane that stopped before queueing its job
    let orphan = shoal.nats.names.idempotency_key("keys", "orphan");
    shoal.nats.idempotency.create(&orphan, "j-never-queued".into()).await?;
    let e = shoal.api.run(&keyed("orphan")).await.expect_err("the key names no job");
    assert_eq!(e.code, ErrorCode::NotFound, "{e}");
    assert!(e.message.contains("\"orphan\"") && e.message.contains("another key"), "{e}");

    // a claim its submission frees while this one waits on it
    let freed = shoal.nats.names.idempotency_key("keys", "freed");
    shoal.nats.idempotency.create(&freed, "j-not-queued".into()).await?;
    let req = RunRequest { wait_ms: 30_000, ..keyed("freed") };
    let waiting = shoal.api.run(&req);
    let free = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        shoal.nats.idempotency.delete(&freed).await
    };
    let (done, deleted) = tokio::join!(waiting, free);
    deleted?;
    let done = done?;
    assert_ne!(done.id, "j-not-queued");
    assert_eq!((done.status, done.output), (JobState::Completed, Some(json!({"order": "freed"}))));
    shoal.stop().await;
    Ok(())
}

/// A job that could not be queued (here: its token refused by the jobs stream) gets an error,
/// and its idempotency key is free again: the client's retry with the same key queues and runs
/// the job, instead of being told of a job that never was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_cannot_be_queued_leaves_its_idempotency_key_to_the_retry() -> Result<()> {
    let shoal = Shoal::start().await?;
    shoal.api.create_endpoint(&rust_endpoint("ok")?).await?;
    let mut stream = shoal.nats.js.get_stream(shoal.nats.names.jobs_stream()).await?;
    let config = stream.info().await?.config.clone();
    // the stream refuses every token
    shoal
        .nats
        .js
        .update_stream(async_nats::jetstream::stream::Config { max_message_size: 16, ..config.clone() })
        .await?;
    let keyed = |key: &str, wait_ms: u64| RunRequest {
        idempotency_key: Some(key.into()),
        wait_ms,
        ..RunRequest::new("ok", json!({"order": key}))
    };
    let err = shoal.api.run(&keyed("order-1", 0)).await.expect_err("the token cannot be stored");
    assert_eq!(err.code, ErrorCode::Unavailable, "{err}");
    let answers = shoal.api.run_batch(vec![keyed("order-2", 0)]).await?;
    assert!(answers[0].as_ref().is_err_and(|e| e.code == ErrorCode::Unavailable), "{:?}", answers[0]);
    // a record too large to travel in its token is written before it, and purged by the undo
    let large = json!({"order": "order-3", "pad": "x".repeat(20_000)});
    let large_keyed = |wait_ms: u64| RunRequest {
        idempotency_key: Some("order-3".into()),
        wait_ms,
        ..RunRequest::new("ok", large.clone())
    };
    let err = shoal.api.run(&large_keyed(0)).await.expect_err("the token cannot be stored");
    assert_eq!(err.code, ErrorCode::Unavailable, "{err}");

    // the stream takes tokens again: each retry queues its job, which runs
    shoal.nats.js.update_stream(config).await?;
    let done = shoal.api.run(&keyed("order-1", 30_000)).await?;
    assert_eq!((done.status, done.output), (JobState::Completed, Some(json!({"order": "order-1"}))));
    let queued = shoal.api.run_batch(vec![keyed("order-2", 0)]).await?.remove(0).map_err(anyhow::Error::from)?;
    let done =
        shoal.api.status(&JobRef { endpoint: Some("ok".into()), id: queued.id.clone(), wait_ms: 30_000 }).await?;
    assert_eq!((done.status, done.output), (JobState::Completed, Some(json!({"order": "order-2"}))));
    let done = shoal.api.run(&large_keyed(30_000)).await?;
    assert_eq!((done.status, done.output), (JobState::Completed, Some(large.clone())));
    // and the keys name those jobs now
    assert_eq!(shoal.api.run(&keyed("order-2", 0)).await?.id, queued.id);
    shoal.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_larger_than_nats_carries_is_a_clear_error_not_a_silent_timeout() -> Result<()> {
    let shoal = Shoal::start().await?;
    // six endpoints of 200 KB each (their environment): the list is over NATS' 1 MiB
    for n in 0..6 {
        let mut spec = EndpointSpec::with_command(&format!("wide-{n}"), "true");
        spec.env.insert("BLOB".into(), "x".repeat(200_000));
        shoal.api.create_endpoint(&spec).await?;
    }
    let err = shoal.api.list_endpoints().await.expect_err("a list over max_payload");
    assert_eq!(err.code, ErrorCode::TooLarge, "answered, not timed out: {err}");
    assert!(err.message.contains("endpoint.list") && err.message.contains("max_payload (1048576)"), "{err}");
    // each endpoint alone still comes back, and the service goes on
    assert_eq!(shoal.api.get_endpoint("wide-3").await?.env["BLOB"].len(), 200_000);
    shoal.api.delete_endpoint("wide-0").await?;
    shoal.api.delete_endpoint("wide-1").await?;
    assert_eq!(shoal.api.list_endpoints().await?.endpoints.len(), 4);

    // the workers of a large fleet: too many for one reply, so the client asks per endpoint
    // (records of 200 KB, written as a host would, stand in for thousands of small ones)
    for n in 0..6 {
        let endpoint = format!("wide-{}", 2 + n % 2);
        let worker = WorkerRecord {
            id: format!("w-wide-{n}"),
            endpoint: endpoint.clone(),
            host: "h-elsewhere".into(),
            state: WorkerState::Idle,
            reason: Some("y".repeat(200_000)),
            spec_version: 1,
            current_jobs: Vec::new(),
            runtime_ref: None,
            restarts: 0,
            failures: 0,
            started_at_ms: 1,
            updated_at_ms: 1,
            jobs_done: 0,
            start: None,
        };
        let key = shoal.nats.names.worker_key(&endpoint, &worker.id);
        shoal.nats.workers.put(key, to_msgpack(&worker)?.into()).await?;
    }
    let err = shoal.api.workers(None).await.expect_err("a list over max_payload");
    assert_eq!(err.code, ErrorCode::TooLarge, "{err}");
    assert!(err.message.contains("one endpoint's workers"), "{err}");
    let all = shoal.api.all_workers().await?.workers;
    let ids: Vec<&str> = all.iter().map(|w| w.id.as_str()).collect();
    assert_eq!(ids, ["w-wide-0", "w-wide-2", "w-wide-4", "w-wide-1", "w-wide-3", "w-wide-5"], "by endpoint, then id");
    shoal.stop().await;
    Ok(())
}
