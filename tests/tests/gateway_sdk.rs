//! The real runpod Python SDK client (`runpod.Endpoint`, pointed at the gateway with
//! `RUNPOD_ENDPOINT_BASE_URL`) against real runpod-SDK Python workers run by the process
//! runtime: every client operation, and every kind of handler. The client side is
//! tests/python/sdk_client.py; these tests start shoal and assert on what the SDK saw.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use shoal_tests::{Shoal, python_bin, python_endpoint, repo_root};

/// Runs a scenario of tests/python/sdk_client.py against `gateway`; returns what it printed.
async fn sdk_client(gateway: &shoal_gateway::GatewayHandle, key: &str, scenario: &str) -> Result<Value> {
    let script = repo_root().join("tests/python/sdk_client.py");
    let run = tokio::process::Command::new(python_bin()?)
        .arg(&script)
        .arg(scenario)
        .env("RUNPOD_ENDPOINT_BASE_URL", gateway.base_url())
        .env("SHOAL_API_KEY", key)
        .env("PYTHONUNBUFFERED", "1")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(400), run).await.context("the SDK client hung")??;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "sdk_client.py {scenario} failed ({}):\n{stdout}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let last = stdout.lines().last().context("sdk_client.py printed nothing")?;
    serde_json::from_str(last).with_context(|| format!("not JSON: {last}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runpod_sdk_client_runs_polls_cancels_and_purges() -> Result<()> {
    let shoal = Shoal::start().await?;
    shoal.api.create_endpoint(&python_endpoint("echo")?).await?;
    let mut info = python_endpoint("jobinfo")?;
    info.command = Some(format!("exec {} tests/python/job_handler.py", python_bin()?.display()));
    shoal.api.create_endpoint(&info).await?;
    let mut idle = python_endpoint("idle")?;
    (idle.workers_min, idle.workers_max) = (0, 0);
    shoal.api.create_endpoint(&idle).await?;
    let gateway = shoal.start_gateway().await?;
    let key = shoal.api_key().await?;

    let out = sdk_client(&gateway, &key, "basic").await?;

    assert!(
        out["health_before"]["workers"].is_object() && out["health_before"]["jobs"]["completed"].is_u64(),
        "{}",
        out["health_before"]
    );
    // run / status / output
    assert!(["IN_QUEUE", "IN_PROGRESS", "COMPLETED"].contains(&out["run_first_status"].as_str().unwrap_or("")));
    assert_eq!(out["run_output"], json!({"mode": "echo", "text": "héllo", "n": [1, 2, 3]}));
    assert_eq!(out["run_status"], "COMPLETED");
    let envelope = &out["run_envelope"];
    assert_eq!(envelope["id"], out["run_id"]);
    assert!(envelope["id"].as_str().is_some_and(|id| id.ends_with("-u1") && !id.starts_with("sync-")), "{envelope}");
    for field in ["delayTime", "executionTime"] {
        assert!(envelope[field].is_u64(), "{field} in {envelope}");
    }
    assert!(envelope["workerId"].is_string(), "{envelope}");
    // run_sync
    assert_eq!(out["run_sync_output"], json!({"mode": "echo", "sync": true}));
    // the raising handler: FAILED, no output, the SDK's JSON error report
    assert_eq!((&out["error_output"], &out["error_status"]), (&Value::Null, &json!("FAILED")));
    let report: Value = serde_json::from_str(out["error_envelope"]["error"].as_str().context("error string")?)?;
    assert_eq!(report["error_type"], "<class 'RuntimeError'>");
    assert_eq!(report["error_message"], "kaboom");
    assert_eq!(out["error_run_sync_output"], Value::Null, "run_sync of a failing job returns no output");
    // cancel mid-run
    assert_eq!(out["cancel_reply"]["status"], "CANCELLED");
    assert_eq!(out["cancelled_status"], "CANCELLED");
    assert_eq!(out["after_cancel_output"], json!({"mode": "echo", "after": "cancel"}));
    // refresh_worker: the flag is not part of the result; the worker was replaced and serves on
    assert_eq!(out["refresh_output"], json!({"ok": true}));
    assert_eq!(out["after_refresh_output"], json!({"mode": "echo", "after": "refresh"}));
    let workers = shoal.api.workers(Some("echo")).await?.workers;
    assert!(workers.iter().any(|w| w.restarts >= 1), "the refreshed worker was restarted: {workers:?}");
    // s3Config reaches the handler inside the job, and nothing else but id and input
    assert_eq!(
        out["jobinfo_output"],
        json!({"keys": ["id", "input", "s3Config"], "input": {"x": 1},
               "s3Config": {"accessId": "AK", "accessSecret": "SK", "bucketName": "results", "endpointUrl": "http://s3.local"}})
    );
    // purge_queue
    assert_eq!(out["idle_statuses"], json!(["IN_QUEUE", "IN_QUEUE", "IN_QUEUE"]));
    assert_eq!(out["idle_health"]["jobs"]["inQueue"], 3, "{}", out["idle_health"]);
    assert_eq!(out["purge"], json!({"removed": 3, "status": "completed"}));
    assert_eq!(out["purged_statuses"], json!(["CANCELLED", "CANCELLED", "CANCELLED"]));
    // health counts what ran
    let health = &out["health_after"];
    assert!(health["jobs"]["completed"].as_u64().is_some_and(|n| n >= 5), "{health}");
    assert!(health["jobs"]["failed"].as_u64().is_some_and(|n| n >= 2), "{health}");
    assert_eq!(health["workers"]["ready"], 1, "{health}");
    gateway.stop().await;
    shoal.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runpod_sdk_client_streams_generators_and_drives_concurrent_workers() -> Result<()> {
    let shoal = Shoal::start().await?;
    let mut gen_spec = python_endpoint("gen")?;
    gen_spec.env.insert("SHOAL_EXAMPLE_HANDLER".into(), "generator".into());
    shoal.api.create_endpoint(&gen_spec).await?;
    let mut agg = gen_spec.clone();
    agg.id = "gen-agg".into();
    agg.env.insert("SHOAL_EXAMPLE_AGGREGATE".into(), "true".into());
    shoal.api.create_endpoint(&agg).await?;
    let mut multi = python_endpoint("multi")?;
    multi.env.insert("SHOAL_EXAMPLE_CONCURRENCY".into(), "3".into());
    multi.concurrency = 3;
    shoal.api.create_endpoint(&multi).await?;
    let gateway = shoal.start_gateway().await?;
    let key = shoal.api_key().await?;

    let out = sdk_client(&gateway, &key, "streams").await?;

    let chunks = |n: usize| Value::Array((0..n).map(|i| json!({"i": i})).collect());
    // a plain generator: every chunk once, in order, through Job.stream(); the output is []
    assert_eq!(out["gen_stream"], chunks(5));
    assert_eq!((&out["gen_output"], &out["gen_status"]), (&json!([]), &json!("COMPLETED")));
    // a generator that raises: its chunks, then FAILED with the SDK's message
    assert_eq!(out["gen_error_stream"], chunks(2));
    assert_eq!(out["gen_error_status"], "FAILED");
    assert!(
        out["gen_error_envelope"]["error"].as_str().is_some_and(|e| e.contains("gen-boom")),
        "{}",
        out["gen_error_envelope"]
    );
    // return_aggregate_stream: the output holds every chunk, and they still stream
    assert_eq!(out["agg_run_sync_output"], chunks(4));
    assert_eq!(out["agg_stream"], chunks(3));
    assert_eq!(out["agg_output"], chunks(3));
    // concurrency_modifier 3: one worker ran several of the jobs at once
    assert!(out["multi_most_in_progress"].as_u64().is_some_and(|n| n >= 2), "{}", out["multi_most_in_progress"]);
    assert_eq!(out["multi_outputs"], Value::Array(vec![json!({"slept": 3}); 4]));
    assert_eq!(out["multi_workers"].as_array().map(Vec::len), Some(1), "{}", out["multi_workers"]);
    gateway.stop().await;
    shoal.stop().await;
    Ok(())
}
