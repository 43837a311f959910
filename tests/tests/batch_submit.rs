//! `job.run_batch`: several jobs queued in one request, each checked and answered on its own,
//! in the request's order; bad batches get clear errors and the service keeps serving.

use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use serde_json::{Value, json};
use shoal_protocol::api::{JobRef, MAX_BATCH_JOBS, RunRequest};
use shoal_protocol::job::JobState;
use shoal_protocol::names::op;
use shoal_protocol::{ApiError, ErrorCode};
use shoal_tests::{Shoal, eventually, idle_endpoint, rust_endpoint};

fn code(r: &Result<shoal_protocol::api::JobStatus, ApiError>) -> Option<ErrorCode> {
    r.as_ref().err().map(|e| e.code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_queues_its_good_jobs_and_refuses_each_bad_one_with_its_reason() -> Result<()> {
    let shoal = Shoal::start().await?;
    shoal.api.create_endpoint(&rust_endpoint("echo")?).await?;
    let mut limited = idle_endpoint("limited")?;
    limited.queue_limit = Some(3);
    shoal.api.create_endpoint(&limited).await?;

    let keyed = |input: Value| RunRequest { idempotency_key: Some("order-7".into()), ..RunRequest::new("echo", input) };
    let mut jobs = vec![
        RunRequest::new("echo", json!({"n": 1})),
        RunRequest::new("echo", Value::Null),
        RunRequest::new("nope", json!(1)),
        RunRequest { wait_ms: 5000, ..RunRequest::new("echo", json!(1)) },
        keyed(json!({"n": 2})),
        keyed(json!({"n": 3})),
    ];
    jobs.extend((0..5).map(|i| RunRequest::new("limited", json!({"i": i}))));
    let answers = shoal.api.run_batch(jobs).await?;
    assert_eq!(answers.len(), 11);
    assert_eq!(code(&answers[1]), Some(ErrorCode::BadRequest), "{:?}", answers[1]);
    assert!(answers[1].as_ref().is_err_and(|e| e.message.contains("input is required")));
    assert_eq!(code(&answers[2]), Some(ErrorCode::NotFound), "{:?}", answers[2]);
    assert!(answers[3].as_ref().is_err_and(|e| e.code == ErrorCode::BadRequest && e.message.contains("wait_ms")));
    // the same idempotency key twice in one batch: one job
    let (first, keyed_first, keyed_again) = (
        answers[0].as_ref().map_err(Clone::clone)?,
        answers[4].as_ref().map_err(Clone::clone)?,
        answers[5].as_ref().map_err(Clone::clone)?,
    );
    assert_eq!(keyed_first.id, keyed_again.id);
    assert_eq!(first.status, JobState::InQueue);
    // the queue limit, read once for the batch: three fit, the rest are refused
    let limited: Vec<_> = answers[6..].iter().map(code).collect();
    assert_eq!(limited, [None, None, None, Some(ErrorCode::Overloaded), Some(ErrorCode::Overloaded)]);
    assert!(answers[9].as_ref().is_err_and(|e| e.message.contains("queue_limit")));

    // the queued jobs run: each answers its own input
    for (job, input) in [(first, json!({"n": 1})), (keyed_first, json!({"n": 2}))] {
        let done =
            shoal.api.status(&JobRef { endpoint: Some("echo".into()), id: job.id.clone(), wait_ms: 30_000 }).await?;
        assert_eq!((done.status, done.output), (JobState::Completed, Some(input)), "{}", job.id);
    }
    // and the limited endpoint holds exactly the three it took
    let api = &shoal.api;
    eventually(Duration::from_secs(10), "three queued jobs on the limited endpoint", || async {
        api.health("limited").await.ok().filter(|h| h.jobs.in_queue == 3)
    })
    .await?;
    shoal.stop().await;
    Ok(())
}

async fn raw(shoal: &Shoal, body: &Value) -> Result<(Option<String>, Value)> {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Content-Type", "application/json");
    let req = async_nats::Request::new()
        .payload(Bytes::from(serde_json::to_vec(body)?))
        .headers(headers)
        .timeout(Some(Duration::from_secs(10)));
    let reply = shoal.nats.client.send_request(shoal.nats.names.api_subject(op::JOB_RUN_BATCH), req).await?;
    let code = reply.headers.as_ref().and_then(|h| h.get("Nats-Service-Error-Code")).map(|v| v.to_string());
    Ok((code, serde_json::from_slice(&reply.payload)?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_batches_get_clear_errors_and_json_clients_can_batch() -> Result<()> {
    let shoal = Shoal::start().await?;
    shoal.api.create_endpoint(&idle_endpoint("ep")?).await?;

    let err = shoal.api.run_batch(vec![]).await.expect_err("empty");
    assert_eq!(err.code, ErrorCode::BadRequest);
    assert!(err.message.contains("at least one job"), "{err}");
    let err = shoal.api.run_batch(vec![RunRequest::new("ep", json!(1)); MAX_BATCH_JOBS + 1]).await.expect_err("large");
    assert_eq!(err.code, ErrorCode::TooLarge);
    assert!(err.message.contains(&MAX_BATCH_JOBS.to_string()), "{err}");
    let (code, body) = raw(&shoal, &json!({"jobs": "not a list"})).await?;
    assert_eq!((code.as_deref(), body["code"].as_str()), (Some("400"), Some("bad_request")), "{body}");

    // JSON in, JSON out: one item per job
    let (code, body) =
        raw(&shoal, &json!({"jobs": [{"endpoint": "ep", "input": {"x": 1}}, {"endpoint": "ep"}]})).await?;
    assert_eq!(code, None, "{body}");
    let items = body["jobs"].as_array().context("jobs")?;
    assert_eq!(items.len(), 2, "{body}");
    assert_eq!(items[0]["status"]["status"], "IN_QUEUE", "{body}");
    assert_eq!(items[1]["error"]["code"], "bad_request", "{body}");
    let id = items[0]["status"]["id"].as_str().context("an id")?;
    let status = shoal.api.status(&JobRef { endpoint: Some("ep".into()), id: id.into(), wait_ms: 0 }).await?;
    assert_eq!(status.status, JobState::InQueue);

    // still serving
    let one = shoal.api.run_batch(vec![RunRequest::new("ep", json!(2))]).await?;
    assert!(one[0].is_ok(), "{one:?}");
    shoal.stop().await;
    Ok(())
}

/// Full batches at once, more tokens than the client's JetStream context lends ack permits
/// (5,000): every job is queued, none waits for ever on another batch's unawaited acks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_full_batches_are_all_queued() -> Result<()> {
    const BATCHES: usize = 8;
    let shoal = Shoal::start().await?;
    shoal.api.create_endpoint(&idle_endpoint("many")?).await?;
    let api = shoal_actors::client::ApiClient::new(shoal.nats.client.clone(), shoal.nats.names.clone())
        .with_timeout(Duration::from_secs(120));
    let batches = (0..BATCHES).map(|b| {
        let api = api.clone();
        let jobs = (0..MAX_BATCH_JOBS).map(|i| RunRequest::new("many", json!({"b": b, "i": i}))).collect();
        async move { api.run_batch(jobs).await }
    });
    let mut ids = std::collections::HashSet::new();
    for answers in futures::future::join_all(batches).await {
        for answer in answers? {
            ids.insert(answer?.id);
        }
    }
    assert_eq!(ids.len(), BATCHES * MAX_BATCH_JOBS);
    let names = &shoal.nats.names;
    let mut consumer = shoal
        .nats
        .js
        .get_stream(names.jobs_stream())
        .await?
        .get_consumer::<async_nats::jetstream::consumer::pull::Config>(
            &names.jobs_consumer("many", shoal_protocol::job::Priority::Normal),
        )
        .await
        .map_err(|e| anyhow::anyhow!("the queue's consumer: {e}"))?;
    assert_eq!(consumer.info().await?.num_pending, (BATCHES * MAX_BATCH_JOBS) as u64);
    shoal.stop().await;
    Ok(())
}
