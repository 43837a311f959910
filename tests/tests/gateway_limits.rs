//! The gateway's rate limits (RunPod's requests per 10 s and requests at once, per endpoint and
//! operation) and `/requests`: over a limit a request is answered 429 with `Retry-After` and a
//! message naming the setting, before it reaches the control plane; other endpoints and
//! operations keep their own counts; requests without a valid key use nobody's budget.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use reqwest::Method;
use serde_json::{Value, json};
use shoal_gateway::limits::OpLimitConfig;
use shoal_tests::{Http, Shoal, eventually, idle_endpoint};

/// The reply is a 429 whose message contains `needle`; returns its `Retry-After` (s).
fn assert_limited(reply: &(u16, Value, reqwest::header::HeaderMap), needle: &str) -> Result<u64> {
    let (code, body, headers) = reply;
    ensure!(*code == 429, "expected 429, got {code}: {body}");
    let message = body["error"].as_str().context("an error message")?;
    ensure!(message.contains(needle), "{needle:?} not in {message:?}");
    let retry_after = headers.get("retry-after").context("Retry-After")?.to_str()?.parse::<u64>()?;
    ensure!((1..=10).contains(&retry_after), "Retry-After {retry_after}");
    Ok(retry_after)
}

async fn run(http: &Http, endpoint: &str) -> Result<(u16, Value, reqwest::header::HeaderMap)> {
    http.send_with_headers(Method::POST, &format!("/{endpoint}/run"), Some(br#"{"input": {"n": 1}}"#.to_vec())).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_an_endpoints_rate_get_429_with_retry_after_and_the_setting_to_change() -> Result<()> {
    let shoal = Shoal::start().await?;
    shoal.api.create_endpoint(&idle_endpoint("a")?).await?;
    shoal.api.create_endpoint(&idle_endpoint("b")?).await?;
    let gateway = shoal.start_gateway_with(|c| c.rate_limits.run = OpLimitConfig::set(3, 0)).await?;
    let http = Http::new(&gateway, Some(&shoal.api_key().await?));

    let mut ids = Vec::new();
    for _ in 0..3 {
        let (code, body, _) = run(&http, "a").await?;
        ensure!(code == 200, "{code}: {body}");
        ids.push(body["id"].as_str().context("id")?.to_string());
    }
    let retry_after = assert_limited(&run(&http, "a").await?, "gateway.rate_limits.run.requests_per_10s")?;
    let (_, refused, _) = run(&http, "a").await?;
    let message = refused["error"].as_str().unwrap_or_default();
    ensure!(message.contains("endpoint a takes 3 /run requests per 10 s"), "{message}");

    // the refused requests reached nothing: three jobs queued
    eventually(Duration::from_secs(10), "three jobs queued on a", || async {
        let (code, health) = http.get("/a/health").await.ok()?;
        (code == 200 && health["jobs"]["inQueue"] == 3).then_some(())
    })
    .await?;
    // other endpoints and other operations have their own counts
    ensure!(run(&http, "b").await?.0 == 200, "endpoint b has its own budget");
    for id in &ids {
        let (code, status) = http.get(&format!("/a/status/{id}")).await?;
        ensure!(code == 200 && status["status"] == "IN_QUEUE", "{code}: {status}");
    }
    // a request without a valid key is refused for that and counts against nobody
    let anonymous = http.with_auth(None);
    ensure!(run(&anonymous, "a").await?.0 == 401, "no key: 401, not 429");
    ensure!(run(&anonymous, "b").await?.0 == 401);

    // /requests: the retained jobs, newest first, as [{id, status}]
    let (code, listed) = http.get("/a/requests").await?;
    ensure!(code == 200, "{code}: {listed}");
    let entries = listed.as_array().context("an array")?;
    ensure!(entries.len() == 3, "{listed}");
    for entry in entries {
        ensure!(entry.as_object().map(|o| o.len()) == Some(2), "only id and status: {entry}");
        ensure!(entry["status"] == "IN_QUEUE", "{entry}");
        ensure!(ids.iter().any(|id| entry["id"] == json!(id)), "{entry} not among {ids:?}");
    }
    let (code, two) = http.get("/a/requests?limit=2").await?;
    ensure!(code == 200 && two.as_array().map(Vec::len) == Some(2), "{code}: {two}");
    for bad in ["/a/requests?limit=0", "/a/requests?limit=501", "/a/requests?limit=many"] {
        let (code, body) = http.get(bad).await?;
        ensure!(code == 400 && body["error"].as_str().is_some_and(|m| m.contains("limit")), "{bad}: {code} {body}");
    }

    // /purge-queue keeps RunPod's default: 2 per 10 s
    for _ in 0..2 {
        let (code, body) = http.send(Method::POST, "/b/purge-queue", None).await?;
        ensure!(code == 200, "{code}: {body}");
    }
    let purge = http.send_with_headers(Method::POST, "/b/purge-queue", None).await?;
    assert_limited(&purge, "gateway.rate_limits.purge_queue.requests_per_10s")?;

    // the gateway's metrics count the refusals
    let metrics = reqwest::get(format!("http://{}/metrics", gateway.local_addr())).await?.text().await?;
    for line in [
        r#"shoal_gateway_rate_limited_total{endpoint="a",operation="run",limit="rate"}"#,
        r#"shoal_gateway_rate_limited_total{endpoint="b",operation="purge_queue",limit="rate"}"#,
    ] {
        ensure!(metrics.contains(line), "{line} not in the metrics:\n{metrics}");
    }

    // once the oldest request has left the window, one more is admitted
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    let (code, body, _) = run(&http, "a").await?;
    ensure!(code == 200, "after Retry-After: {code}: {body}");

    gateway.stop().await;
    shoal.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_an_endpoints_concurrency_get_429_until_one_is_answered() -> Result<()> {
    let shoal = Shoal::start().await?;
    shoal.api.create_endpoint(&idle_endpoint("held")?).await?;
    let gateway = shoal.start_gateway_with(|c| c.rate_limits.runsync = OpLimitConfig::set(0, 1)).await?;
    let http = Http::new(&gateway, Some(&shoal.api_key().await?));
    let runsync = |wait: u32| {
        let http = http.clone();
        async move {
            let path = format!("/held/runsync?wait={wait}");
            http.send_with_headers(Method::POST, &path, Some(br#"{"input": 1}"#.to_vec())).await
        }
    };

    // two at once: nothing takes the endpoint's jobs, so the first admitted is held for its
    // whole wait and the other is refused
    let (first, second) = tokio::join!(runsync(4_000), runsync(4_000));
    let (first, second) = (first?, second?);
    let (answered, refused) = if first.0 == 200 { (first, second) } else { (second, first) };
    ensure!(answered.0 == 200 && answered.1["status"] == "IN_QUEUE", "{:?}", answered.1);
    assert_limited(&refused, "gateway.rate_limits.runsync.concurrent")?;
    let message = refused.1["error"].as_str().unwrap_or_default();
    ensure!(message.contains("takes 1 /runsync requests at once"), "{message}");

    // answered, its place is free again
    let (code, body, _) = runsync(1_000).await?;
    ensure!(code == 200, "{code}: {body}");

    gateway.stop().await;
    shoal.stop().await;
    Ok(())
}
