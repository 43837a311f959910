//! Gateways are stateless: two of them against one installation (each on its own NATS
//! connection, as two `shoal gateway` processes behind a balancer) see each other's jobs.

use std::time::Duration;

use anyhow::Result;
use reqwest::Method;
use serde_json::{Value, json};
use shoal_tests::{Http, Shoal, eventually, rust_endpoint};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_submitted_through_one_gateway_is_visible_through_another() -> Result<()> {
    let shoal = Shoal::start().await?;
    shoal.api.create_endpoint(&rust_endpoint("echo")?).await?;
    let mut idle = rust_endpoint("idle")?;
    (idle.workers_min, idle.workers_max) = (0, 0);
    shoal.api.create_endpoint(&idle).await?;
    let (one, two) = (shoal.start_gateway().await?, shoal.start_gateway().await?);
    assert_ne!(one.local_addr(), two.local_addr());
    // one key, stored in NATS, works on both
    let key = shoal.api_key().await?;
    let (a, b) = (Http::new(&one, Some(&key)), Http::new(&two, Some(&key)));

    // submitted through a, followed through b to the end
    let (_, run) = a.post("/echo/run", &json!({"input": {"sleep_ms": 300, "v": 1}})).await?;
    let id = run["id"].as_str().expect("id").to_string();
    let done = eventually(Duration::from_secs(30), "the job to complete, seen through b", || async {
        let (code, s) = b.get(&format!("/echo/status/{id}")).await.ok()?;
        (code == 200 && s["status"] == "COMPLETED").then_some(s)
    })
    .await?;
    assert_eq!(done["output"], json!({"sleep_ms": 300, "v": 1}));
    assert_eq!(a.get(&format!("/echo/status/{id}")).await?.1, done, "both tell the same");

    // a stream produced for a job submitted through a, consumed through b (each chunk once,
    // whichever gateway reads)
    let (_, run) = a.post("/echo/run", &json!({"input": {"stream": 4}})).await?;
    let id = run["id"].as_str().expect("id").to_string();
    let mut chunks = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    for reader in [&b, &a].into_iter().cycle() {
        let (_, reply) = reader.get(&format!("/echo/stream/{id}")).await?;
        let batch = reply["stream"].as_array().cloned().unwrap_or_default();
        let drained = batch.is_empty();
        chunks.extend(batch.into_iter().map(|c| c["output"].clone()));
        if reply["status"] == "COMPLETED" && drained {
            break;
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "the stream did not end: {reply}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(Value::Array(chunks), json!([{"i": 0}, {"i": 1}, {"i": 2}, {"i": 3}]));

    // queued through a, counted, cancelled and purged through b
    let mut queued = Vec::new();
    for n in 0..3 {
        let (_, run) = a.post("/idle/run", &json!({"input": n})).await?;
        queued.push(run["id"].as_str().expect("id").to_string());
    }
    eventually(Duration::from_secs(10), "b's health to count a's jobs", || async {
        let (_, h) = b.get("/idle/health").await.ok()?;
        (h["jobs"]["inQueue"] == 3).then_some(())
    })
    .await?;
    let (code, cancelled) = b.send(Method::POST, &format!("/idle/cancel/{}", queued[0]), None).await?;
    assert_eq!((code, cancelled), (200, json!({"id": queued[0], "status": "CANCELLED"})));
    let (_, purged) = b.send(Method::POST, "/idle/purge-queue", None).await?;
    assert_eq!(purged, json!({"removed": 2, "status": "completed"}));
    for id in &queued {
        assert_eq!(a.get(&format!("/idle/status/{id}")).await?.1["status"], "CANCELLED");
    }
    one.stop().await;
    // the other keeps serving when one goes
    assert_eq!(b.get("/echo/health").await?.0, 200);
    two.stop().await;
    shoal.stop().await;
    Ok(())
}
