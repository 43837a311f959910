//! The gateway's error replies: every case a client can act on has its status code and a JSON
//! `{"error": "..."}` body, and the gateway keeps serving after each. Also the API key rules,
//! backpressure (429), payloads through the object store, and result retention.

use std::time::Duration;

use anyhow::{Result, ensure};
use reqwest::Method;
use serde_json::{Value, json};
use shoal_actors::control::ControlConfig;
use shoal_gateway::keys;
use shoal_protocol::api::JobRef;
use shoal_protocol::job::{Policy, Priority};
use shoal_tests::{Http, Shoal, eventually, idle_endpoint, rust_endpoint};

/// Asserts an error reply: its status and a JSON `{"error": <non-empty string>}` body
/// containing `needle`.
fn assert_error(reply: &(u16, Value), status: u16, needle: &str) {
    let (code, body) = reply;
    assert_eq!(*code, status, "expected {status}, got {code}: {body}");
    let message = body["error"].as_str().unwrap_or_else(|| panic!("no error message in {body}"));
    assert!(message.contains(needle), "{needle:?} not in {message:?}");
    assert_eq!(body.as_object().map(|o| o.len()), Some(1), "only `error`: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_are_required_checked_scoped_and_revocable() -> Result<()> {
    let shoal = Shoal::start().await?;
    shoal.api.create_endpoint(&idle_endpoint("a")?).await?;
    shoal.api.create_endpoint(&idle_endpoint("b")?).await?;
    let gateway = shoal.start_gateway().await?;
    let key = shoal.api_key().await?;
    let http = Http::new(&gateway, Some(&key));

    assert_error(&http.with_auth(None).get("/a/health").await?, 401, "API key is required");
    assert_error(&http.with_auth(Some("Bearer nope-nope-nope")).get("/a/health").await?, 401, "invalid API key");
    // the key is checked before the body is read: even a malformed one gets 401
    assert_error(&http.with_auth(None).send(Method::POST, "/a/run", Some(b"{oops".to_vec())).await?, 401, "API key");
    // Bearer in any case, or the bare key (RunPod's cURL examples)
    for auth in [format!("Bearer {key}"), format!("bearer {key}"), format!("BEARER {key}"), key.clone()] {
        let (code, body) = http.with_auth(Some(&auth)).get("/a/health").await?;
        assert_eq!(code, 200, "{auth}: {body}");
        assert!(body["jobs"]["inQueue"].is_u64(), "{body}");
    }

    // a key scoped to endpoint a may not use b
    let scoped = keys::create(&shoal.nats, "only-a", &["a".to_string()]).await?;
    let scoped_http = http.with_auth(Some(&format!("Bearer {}", scoped.secret)));
    assert_eq!(scoped_http.post("/a/run", &json!({"input": 1})).await?.0, 200);
    assert_error(&scoped_http.post("/b/run", &json!({"input": 1})).await?, 401, "may not use endpoint b");

    // listed without its secret; revoked, it stops working at once
    let listed = keys::list(&shoal.nats).await?;
    assert_eq!(listed.len(), 2);
    let record = listed.iter().find(|k| k.name == "only-a").expect("listed");
    assert_eq!(record.endpoints, vec!["a".to_string()]);
    assert!(!format!("{listed:?}").contains(&scoped.secret), "secrets are never stored");
    assert!(keys::revoke(&shoal.nats, &record.id).await?);
    assert_error(&scoped_http.get("/a/health").await?, 401, "invalid API key");
    assert!(!keys::revoke(&shoal.nats, &record.id).await?, "already revoked");
    // the other key still works
    assert_eq!(http.get("/a/health").await?.0, 200);

    gateway.stop().await;
    shoal.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_case_has_its_status_and_a_json_body() -> Result<()> {
    let shoal = Shoal::start().await?;
    shoal.api.create_endpoint(&rust_endpoint("echo")?).await?;
    let mut limited = idle_endpoint("limited")?;
    limited.queue_limit = Some(2);
    shoal.api.create_endpoint(&limited).await?;
    let gateway = shoal.start_gateway().await?;
    let http = Http::new(&gateway, Some(&shoal.api_key().await?));
    let raw = |body: &str| Some(body.as_bytes().to_vec());

    // 400: malformed bodies and fields
    assert_error(&http.send(Method::POST, "/echo/run", raw("{not json")).await?, 400, "not valid JSON");
    assert_error(&http.send(Method::POST, "/echo/run", raw("")).await?, 400, "input");
    assert_error(&http.post("/echo/run", &json!({"prompt": "no input key"})).await?, 400, "\"input\" is required");
    assert_error(&http.post("/echo/runsync", &json!({"input": null})).await?, 400, "\"input\" is required");
    assert_error(&http.post("/echo/run", &json!({"input": 1, "webhook": "ftp://x"})).await?, 400, "webhook");
    assert_error(&http.post("/echo/run", &json!({"input": 1, "webhook": 5})).await?, 400, "webhook");
    assert_error(&http.post("/echo/run", &json!([{"input": 1}])).await?, 400, "JSON object");
    assert_error(
        &http.post("/echo/run", &json!({"input": 1, "policy": {"ttl": 1}})).await?,
        400,
        "policy.ttl 1 is outside",
    );
    let short = json!({"input": 1, "policy": {"executionTimeout": 10}});
    assert_error(&http.post("/echo/runsync", &short).await?, 400, "policy.executionTimeout 10 is outside 1000..=");
    assert_error(
        &http.post("/echo/run?ttl=5", &json!({"input": 1})).await?,
        400,
        "the ttl query parameter 5 is outside",
    );
    assert_error(&http.post("/echo/run?wait=soon", &json!({"input": 1})).await?, 400, "invalid query");
    assert_error(&http.get("/echo/status/a.b").await?, 400, "job id");
    assert_error(&http.get("/echo/status/a*").await?, 400, "job id");
    assert_error(&http.post("/ep.x/run", &json!({"input": 1})).await?, 400, "endpoint id");

    // 404: unknown endpoint, job, route; 405: wrong method
    assert_error(&http.post("/nope/run", &json!({"input": 1})).await?, 404, "nope");
    assert_error(&http.post("/nope/runsync", &json!({"input": 1})).await?, 404, "nope");
    assert_error(&http.get("/nope/health").await?, 404, "nope");
    assert_error(&http.post("/nope/purge-queue", &json!(null)).await?, 404, "nope");
    assert_error(&http.get("/nope/status/some-job").await?, 404, "nope");
    assert_error(&http.get("/echo/status/no-such-job").await?, 404, "no-such-job");
    assert_error(&http.get("/echo/stream/no-such-job").await?, 404, "no-such-job");
    assert_error(&http.send(Method::POST, "/echo/cancel/no-such-job", None).await?, 404, "no-such-job");
    assert_error(&http.send(Method::POST, "/echo/retry/no-such-job", None).await?, 404, "no-such-job");
    assert_error(&http.get("/echo/frobnicate").await?, 404, "no such operation");
    assert_error(&http.get("/echo/run").await?, 405, "GET");

    // 409: retry of a job that did not fail; a failed one is retried under the same id
    let (code, done) = http.post("/echo/runsync", &json!({"input": {"x": 1}})).await?;
    assert_eq!((code, &done["status"]), (200, &json!("COMPLETED")), "{done}");
    let id = done["id"].as_str().expect("id").to_string();
    assert!(id.starts_with("sync-") && id.ends_with("-u1"), "{id}");
    assert_error(&http.send(Method::POST, &format!("/echo/retry/{id}"), None).await?, 409, "COMPLETED");
    // cancel of a finished job: 200, unchanged
    let (code, body) = http.send(Method::POST, &format!("/echo/cancel/{id}"), None).await?;
    assert_eq!((code, body), (200, json!({"id": id, "status": "COMPLETED"})));
    let (_, failed) = http.post("/echo/runsync", &json!({"input": {"fail": "bad input"}})).await?;
    assert_eq!((&failed["status"], &failed["error"]), (&json!("FAILED"), &json!("bad input")), "{failed}");
    let failed_id = failed["id"].as_str().expect("id");
    let (code, body) = http.send(Method::POST, &format!("/echo/retry/{failed_id}"), None).await?;
    assert_eq!((code, body), (200, json!({"id": failed_id, "status": "IN_QUEUE"})));

    // 413: above 10 MB on /run, 20 MB on /runsync (a body just under passes the size check)
    let body_of = |n: usize| {
        let mut b = br#"{"input": ""#.to_vec();
        b.extend(std::iter::repeat_n(b'x', n));
        b.extend_from_slice(br#""}"#);
        b
    };
    assert_error(&http.send(Method::POST, "/echo/run", Some(body_of(10_000_001))).await?, 413, "larger");
    assert_error(&http.send(Method::POST, "/echo/runsync", Some(body_of(20_000_001))).await?, 413, "larger");
    let (code, body) = http.send(Method::POST, "/limited/run", Some(body_of(10_000_000 - 20))).await?;
    assert_eq!(code, 200, "{body}");

    // 429: the endpoint's queue is at its limit (the big job above is the first of two)
    assert_eq!(http.post("/limited/run", &json!({"input": 2})).await?.0, 200);
    assert_error(&http.post("/limited/run", &json!({"input": 3})).await?, 429, "queue_limit");
    // purging makes room again; the refused job was never queued
    let (code, purged) = http.send(Method::POST, "/limited/purge-queue", None).await?;
    assert_eq!((code, purged), (200, json!({"removed": 2, "status": "completed"})));
    eventually(Duration::from_secs(10), "room in the queue", || async {
        (http.post("/limited/run", &json!({"input": 4})).await.ok()?.0 == 200).then_some(())
    })
    .await?;

    // still serving
    let (code, body) = http.post("/echo/runsync", &json!({"input": "still here"})).await?;
    assert_eq!((code, &body["output"]), (200, &json!("still here")));
    gateway.stop().await;
    shoal.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_payloads_travel_through_the_object_store_both_ways() -> Result<()> {
    let shoal = Shoal::start().await?;
    shoal.api.create_endpoint(&rust_endpoint("echo")?).await?;
    let gateway = shoal.start_gateway().await?;
    let http = Http::new(&gateway, Some(&shoal.api_key().await?));

    // 3 MB: three times NATS' default message limit
    let text: String = (0..3_000_000).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    let input = json!({"text": text, "n": 1});
    let (code, body) = http.post("/echo/runsync", &json!({"input": input})).await?;
    assert_eq!((code, &body["status"]), (200, &json!("COMPLETED")), "{}", body["error"]);
    ensure!(body["output"] == input, "the output is the input, whole");
    let id = body["id"].as_str().expect("id").to_string();
    let (_, status) = http.get(&format!("/echo/status/{id}")).await?;
    ensure!(status["output"] == input, "and /status returns it whole too");
    // the record references both blobs instead of holding them
    let raw = shoal.api.status(&JobRef { endpoint: Some("echo".into()), id: id.clone(), wait_ms: 0 }).await?;
    assert_eq!(raw.output, None);
    assert_eq!(raw.output_ref.as_deref(), Some(format!("{id}/output").as_str()));

    // through /run too, read back by /status once done
    let (_, queued) = http.post("/echo/run", &json!({"input": input})).await?;
    let id = queued["id"].as_str().expect("id").to_string();
    let done = eventually(Duration::from_secs(30), "the big /run job to complete", || async {
        let (_, s) = http.get(&format!("/echo/status/{id}")).await.ok()?;
        (s["status"] == "COMPLETED").then_some(s)
    })
    .await?;
    ensure!(done["output"] == input);
    gateway.stop().await;
    shoal.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_expire_after_their_retention_and_runsync_can_time_out() -> Result<()> {
    let control = ControlConfig { tick_ms: 100, run_retention_s: 600, sync_retention_s: 1, ..ControlConfig::default() };
    let shoal = Shoal::start_with(control, |_| {}).await?;
    shoal.api.create_endpoint(&rust_endpoint("echo")?).await?;
    let gateway = shoal.start_gateway().await?;
    let http = Http::new(&gateway, Some(&shoal.api_key().await?));

    let (_, run) = http.post("/echo/run", &json!({"input": "kept"})).await?;
    let run_id = run["id"].as_str().expect("id").to_string();
    let (code, sync) = http.post("/echo/runsync", &json!({"input": "brief"})).await?;
    assert_eq!((code, &sync["output"]), (200, &json!("brief")));
    let sync_id = sync["id"].as_str().expect("id").to_string();
    // the /runsync result is gone after its 1 s retention: 404, like an unknown job
    let gone = eventually(Duration::from_secs(20), "the runsync result to expire", || async {
        let reply = http.get(&format!("/echo/status/{sync_id}")).await.ok()?;
        (reply.0 == 404).then_some(reply)
    })
    .await?;
    assert_error(&gone, 404, &sync_id);
    // and nothing is stored in its place (no delete marker: one stored write fewer per job)
    let jobs = &shoal.nats.jobs;
    let subject = format!("{}{}", jobs.prefix, shoal.nats.names.job_key("echo", &sync_id));
    let bucket = shoal.nats.js.get_stream(&jobs.stream_name).await?;
    let left = bucket.get_last_raw_message_by_subject(&subject).await;
    assert!(left.is_err(), "an expired record left {:?}", left.map(|m| m.headers));
    // the /run result is kept
    let (code, kept) = http.get(&format!("/echo/status/{run_id}")).await?;
    assert_eq!((code, &kept["status"], &kept["output"]), (200, &json!("COMPLETED"), &json!("kept")));

    // a runsync not done within ?wait= answers 200 with its id and state; the client polls
    let (code, waiting) = http.post("/echo/runsync?wait=1000", &json!({"input": {"sleep_ms": 4000}})).await?;
    assert_eq!(code, 200, "{waiting}");
    assert!(waiting["status"] == "IN_QUEUE" || waiting["status"] == "IN_PROGRESS", "{waiting}");
    let id = waiting["id"].as_str().expect("id").to_string();
    let done = eventually(Duration::from_secs(30), "the slow job to complete", || async {
        let (_, s) = http.send(Method::POST, &format!("/echo/status/{id}"), None).await.ok()?;
        (s["status"] == "COMPLETED").then_some(s)
    })
    .await?;
    assert_eq!(done["output"], json!({"sleep_ms": 4000}));
    assert!(done["executionTime"].as_u64().is_some_and(|t| t >= 4000), "{done}");
    assert!(done["delayTime"].is_u64() && done["workerId"].is_string(), "{done}");

    // policy (ms) reaches the job: ttl (also as ?ttl=), executionTimeout, lowPriority
    shoal.api.create_endpoint(&idle_endpoint("idle")?).await?;
    let policy = json!({"executionTimeout": 5000, "ttl": 60000, "lowPriority": true});
    let (_, run) = http.post("/idle/run", &json!({"input": 1, "policy": policy})).await?;
    let store = shoal_actors::jobs::JobStore::new(shoal.nats.clone());
    let (record, _) = store.get("idle", run["id"].as_str().expect("id")).await?.expect("record");
    assert_eq!(
        record.policy,
        Policy { execution_timeout_ms: 5000, ttl_ms: 60_000, priority: Priority::Low },
        "{record:?}"
    );
    let (_, run) = http.post("/idle/run?ttl=1000", &json!({"input": 2})).await?;
    let id = run["id"].as_str().expect("id").to_string();
    let expired = eventually(Duration::from_secs(20), "the ttl to expire the queued job", || async {
        let (_, s) = http.get(&format!("/idle/status/{id}")).await.ok()?;
        (s["status"] == "TIMED_OUT").then_some(s)
    })
    .await?;
    assert!(expired["error"].as_str().is_some_and(|e| e.contains("ttl")), "{expired}");
    gateway.stop().await;
    shoal.stop().await;
    Ok(())
}
