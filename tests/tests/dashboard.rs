//! The gateway's dashboard: headless Chromium loads it during a burst, enters the API key,
//! sees a worker change state, recent jobs, a failed job in the dead letters and its retry;
//! and the data calls behind it need the key and answer bad input with a clear error.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use shoal_gateway::keys;
use shoal_protocol::api::JobsRequest;
use shoal_protocol::job::JobState;
use shoal_protocol::worker::WorkerState;
use shoal_tests::browser::Browser;
use shoal_tests::{Http, Shoal, eventually, rust_endpoint};

/// Where screenshots go: `$CARGO_TARGET_DIR/test-artifacts` (or the workspace's `target/`).
fn artifact(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| shoal_tests::repo_root().join("target"));
    target.join("test-artifacts").join(name)
}

/// `GET <gateway><path>` with an optional `Authorization` value: (status, JSON body).
async fn get(base: &str, path: &str, auth: Option<&str>) -> Result<(u16, Value)> {
    let mut req = reqwest::Client::new().get(format!("{base}{path}")).timeout(Duration::from_secs(30));
    if let Some(auth) = auth {
        req = req.header("Authorization", auth);
    }
    let resp = req.send().await.with_context(|| format!("GET {path}"))?;
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await?;
    let body = serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
    Ok((status, body))
}

fn assert_error(reply: &(u16, Value), status: u16, needle: &str) {
    let (code, body) = reply;
    assert_eq!(*code, status, "expected {status}, got {code}: {body}");
    let message = body["error"].as_str().unwrap_or_else(|| panic!("no error message in {body}"));
    assert!(message.contains(needle), "{needle:?} not in {message:?}");
}

/// Whether `states` (one entry per change) has IDLE, later RUNNING, later IDLE again.
fn went_idle_running_idle(states: &[String]) -> bool {
    let mut want = ["IDLE", "RUNNING", "IDLE"].into_iter().peekable();
    for state in states {
        if want.peek() == Some(&state.as_str()) {
            want.next();
        }
    }
    want.peek().is_none()
}

/// Worker rows of the page: id → state (`data-state`).
async fn worker_rows(browser: &Browser) -> Result<BTreeMap<String, String>> {
    let rows = browser
        .eval("[...document.querySelectorAll('#workers tbody tr')].map(r => [r.dataset.workerId, r.dataset.state])")
        .await?;
    Ok(serde_json::from_value::<Vec<(String, String)>>(rows)?.into_iter().collect())
}

/// Job rows of a table (`jobs` or `dead-letters`): id → state.
async fn job_rows(browser: &Browser, table: &str) -> Result<BTreeMap<String, String>> {
    let rows = browser
        .eval(&format!(
            "[...document.querySelectorAll('#{table} tbody tr')].map(r => [r.dataset.jobId, r.dataset.state])"
        ))
        .await?;
    Ok(serde_json::from_value::<Vec<(String, String)>>(rows)?.into_iter().collect())
}

async fn text_of(browser: &Browser, selector: &str) -> Result<String> {
    let value = browser.eval(&format!("document.querySelector('{selector}')?.textContent ?? ''")).await?;
    Ok(value.as_str().unwrap_or_default().to_string())
}

/// Types `key` into the page's key form and submits it, as a person would.
async fn enter_key(browser: &Browser, key: &str) -> Result<()> {
    let key = serde_json::to_string(key)?;
    browser
        .eval(&format!(
            "document.getElementById('key-input').value = {key}; document.getElementById('key-form').requestSubmit(); true"
        ))
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_sees_workers_change_state_recent_jobs_and_retries_a_dead_letter() -> Result<()> {
    // first, so that a machine without Chromium fails at once with how to install it
    let browser = Browser::launch(1400, 1000).await?;
    let shoal = Shoal::start().await?;
    let mut spec = rust_endpoint("burst")?;
    spec.workers_min = 1;
    spec.workers_max = 2;
    shoal.api.create_endpoint(&spec).await?;
    eventually(Duration::from_secs(30), "an idle worker", || async {
        let list = shoal.api.workers(Some("burst")).await.ok()?;
        list.workers.iter().any(|w| w.state == WorkerState::Idle).then_some(())
    })
    .await?;
    let gateway = shoal.start_gateway().await?;
    let key = shoal.api_key().await?;
    let http = Http::new(&gateway, Some(&key));

    browser.goto(&format!("http://{}/dashboard?refresh_ms=300", gateway.local_addr())).await?;
    // a wrong key: the page says the gateway refused it
    enter_key(&browser, "shoal_not-a-key").await?;
    eventually(Duration::from_secs(15), "the page to report the refused key", || async {
        let text = text_of(&browser, "#auth-error").await.ok()?;
        (text.contains("401") && text.contains("invalid API key")).then_some(())
    })
    .await?;
    ensure!(browser.eval("document.getElementById('main').hidden").await? == json!(true), "no data without a key");

    // the right key: the workers tab fills in, with the idle worker
    enter_key(&browser, &key).await?;
    eventually(Duration::from_secs(15), "an idle worker row", || async {
        let rows = worker_rows(&browser).await.ok()?;
        rows.values().any(|s| s == "IDLE").then_some(())
    })
    .await?;

    // a burst of sleeping jobs: the page must show a worker in more than one state
    let mut burst = BTreeSet::new();
    for i in 0..6 {
        let (code, body) = http.post("/burst/run", &json!({"input": {"sleep_ms": 1500, "i": i}})).await?;
        ensure!(code == 200, "run: {code} {body}");
        burst.insert(body["id"].as_str().context("job id")?.to_string());
    }
    // each worker's states as the page showed them, one entry per change
    let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut burst_shot = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !seen.values().any(|states| went_idle_running_idle(states)) {
        ensure!(Instant::now() < deadline, "no worker went IDLE -> RUNNING -> IDLE on the page; seen: {seen:?}");
        for (worker, state) in worker_rows(&browser).await? {
            let states = seen.entry(worker).or_default();
            if states.last() != Some(&state) {
                states.push(state);
            }
        }
        if !burst_shot && seen.values().any(|states| states.last().is_some_and(|s| s == "RUNNING")) {
            browser.screenshot(&artifact("dashboard-burst.png")).await?;
            burst_shot = true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // every job of the burst shows up in recent jobs, completed
    eventually(Duration::from_secs(60), "the burst's jobs completed in recent jobs", || async {
        let rows = job_rows(&browser, "jobs").await.ok()?;
        burst.iter().all(|id| rows.get(id).is_some_and(|s| s == "COMPLETED")).then_some(())
    })
    .await?;

    // a failed job appears in the dead letters; its retry button queues it again
    let (code, body) = http.post("/burst/run", &json!({"input": {"fail": "boom"}})).await?;
    ensure!(code == 200, "run: {code} {body}");
    let failed = body["id"].as_str().context("job id")?.to_string();
    eventually(Duration::from_secs(30), "the failed job in the dead letters", || async {
        let rows = job_rows(&browser, "dead-letters").await.ok()?;
        (rows.get(&failed)? == "FAILED").then_some(())
    })
    .await?;
    let dead =
        shoal.api.jobs(&JobsRequest { endpoint: "burst".into(), states: vec![JobState::Failed], limit: 0 }).await?;
    let first_failure = dead.jobs.into_iter().find(|j| j.id == failed).context("the failed job in jobs.list")?;
    assert_eq!(first_failure.error.as_deref(), Some("boom"), "{first_failure:?}");
    let retried = browser
        .eval(&format!(
            "(() => {{ const b = document.querySelector('#dead-letters button.retry[data-job-id=\"{failed}\"]'); if (!b) return false; b.click(); return true; }})()"
        ))
        .await?;
    ensure!(retried == json!(true), "no retry button for {failed}");
    eventually(Duration::from_secs(30), "the retry to be confirmed on the page", || async {
        let text = text_of(&browser, "#retry-status").await.ok()?;
        text.contains(&failed).then_some(text)
    })
    .await
    .map(|text| assert!(text.contains("IN_QUEUE") && text.contains("again"), "{text}"))?;
    // a retry resubmits the job (new submission time); with the same input it runs and fails again
    eventually(Duration::from_secs(30), "the retried job to run again", || async {
        let list = shoal.api.jobs(&JobsRequest { endpoint: "burst".into(), ..JobsRequest::default() }).await.ok()?;
        let job = list.jobs.into_iter().find(|j| j.id == failed)?;
        (job.submitted_at_ms > first_failure.submitted_at_ms && job.state == JobState::Failed && job.attempts >= 1)
            .then_some(())
    })
    .await?;

    // the page keeps its charts drawn
    let drawn = browser
        .eval("[document.querySelectorAll('#chart-queue path').length, document.querySelectorAll('#chart-latency circle').length]")
        .await?;
    ensure!(drawn[0].as_u64() >= Some(1) && drawn[1].as_u64() >= Some(6), "charts: {drawn}");

    let shot = artifact("dashboard.png");
    browser.screenshot(&shot).await?;
    println!("dashboard screenshot: {}", shot.display());
    println!("dashboard screenshot during the burst: {}", artifact("dashboard-burst.png").display());

    drop(browser);
    gateway.stop().await;
    shoal.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_data_needs_the_key_and_bad_input_gets_a_clear_error() -> Result<()> {
    let shoal = Shoal::start().await?;
    for id in ["a", "b"] {
        let mut spec = rust_endpoint(id)?;
        spec.workers_min = 0;
        spec.workers_max = 0; // nothing takes its jobs: they stay queued
        shoal.api.create_endpoint(&spec).await?;
    }
    let gateway = shoal.start_gateway().await?;
    let base = format!("http://{}", gateway.local_addr());
    let key = shoal.api_key().await?;
    let bearer = format!("Bearer {key}");

    // the page and its assets are public; the data is not
    let (code, page) = get(&base, "/dashboard", None).await?;
    assert_eq!(code, 200);
    assert!(page.as_str().is_some_and(|p| p.contains("/dashboard/app.js")), "{page}");
    assert_eq!(get(&base, "/dashboard/app.js", None).await?.0, 200);
    for path in ["/dashboard/api/endpoints", "/dashboard/api/endpoints/a/workers", "/dashboard/api/endpoints/a/jobs"] {
        assert_error(&get(&base, path, None).await?, 401, "API key is required");
        assert_error(&get(&base, path, Some("Bearer shoal_wrong-key")).await?, 401, "invalid API key");
    }

    // a scoped key sees only its endpoint
    let scoped = keys::create(&shoal.nats, "only-a", &["a".to_string()]).await?;
    let scoped = format!("Bearer {}", scoped.secret);
    let (code, body) = get(&base, "/dashboard/api/endpoints", Some(&scoped)).await?;
    assert_eq!(code, 200, "{body}");
    let ids: Vec<&str> = body["endpoints"].as_array().into_iter().flatten().filter_map(|e| e["id"].as_str()).collect();
    assert_eq!(ids, ["a"]);
    assert!(body["endpoints"][0].get("env").is_none(), "no env (secrets) in the list: {body}");
    assert_error(
        &get(&base, "/dashboard/api/endpoints/b/workers", Some(&scoped)).await?,
        401,
        "may not use endpoint b",
    );
    let (code, body) = get(&base, "/dashboard/api/endpoints", Some(&bearer)).await?;
    assert_eq!((code, body["endpoints"].as_array().map(Vec::len)), (200, Some(2)), "{body}");

    // bad input
    assert_error(&get(&base, "/dashboard/api/endpoints/a.b/jobs", Some(&bearer)).await?, 400, "endpoint id");
    assert_error(&get(&base, "/dashboard/api/endpoints/nope/jobs", Some(&bearer)).await?, 404, "nope");
    assert_error(&get(&base, "/dashboard/api/endpoints/nope/workers", Some(&bearer)).await?, 404, "nope");
    assert_error(&get(&base, "/dashboard/api/endpoints/a/jobs?state=BROKEN", Some(&bearer)).await?, 400, "BROKEN");
    assert_error(&get(&base, "/dashboard/api/endpoints/a/jobs?limit=100000", Some(&bearer)).await?, 400, "limit");
    assert_error(&get(&base, "/dashboard/api/endpoints/a/jobs?limit=x", Some(&bearer)).await?, 400, "invalid query");

    // jobs: newest first, filtered, bounded, queued ones with their waiting reason
    let http = Http::new(&gateway, Some(&key));
    let mut ids = Vec::new();
    for i in 0..3 {
        let (code, body) = http.post("/a/run", &json!({"input": i})).await?;
        assert_eq!(code, 200, "{body}");
        ids.push(body["id"].as_str().context("id")?.to_string());
        tokio::time::sleep(Duration::from_millis(5)).await; // distinct submission times, for the order
    }
    let (code, body) = http.post(&format!("/a/cancel/{}", ids[0]), &json!({})).await?;
    assert_eq!(code, 200, "{body}");
    let (code, body) = get(&base, "/dashboard/api/endpoints/a/jobs?limit=2", Some(&bearer)).await?;
    assert_eq!(code, 200, "{body}");
    let listed: Vec<&str> = body["jobs"].as_array().into_iter().flatten().filter_map(|j| j["id"].as_str()).collect();
    assert_eq!(listed, [ids[2].as_str(), ids[1].as_str()], "newest first, at most 2: {body}");
    assert_eq!(body["matched"], 3);
    let reason = body["jobs"][0]["waiting_reason"].as_str().unwrap_or_default();
    assert!(!reason.is_empty(), "a queued job says why it waits: {body}");
    let (code, body) = get(&base, "/dashboard/api/endpoints/a/jobs?state=cancelled", Some(&bearer)).await?;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["jobs"].as_array().map(Vec::len), Some(1), "{body}");
    assert_eq!(body["jobs"][0]["id"], ids[0].as_str());
    assert_eq!(body["jobs"][0]["state"], "CANCELLED");

    // the NATS API op behind it, for any client
    let list = shoal.api.jobs(&JobsRequest { endpoint: "a".into(), states: vec![JobState::InQueue], limit: 0 }).await?;
    assert_eq!(list.jobs.len(), 2);
    assert!(list.jobs.iter().all(|j| j.state == JobState::InQueue && j.waiting_reason.is_some()));
    assert!(shoal.api.jobs(&JobsRequest { endpoint: "b".into(), ..JobsRequest::default() }).await?.jobs.is_empty());
    let hosts = shoal.api.hosts().await?;
    assert_eq!(hosts.hosts.len(), 1, "{hosts:?}");

    gateway.stop().await;
    shoal.stop().await;
    Ok(())
}
