//! Worker logs with the process runtime: the host answers with the last lines of the worker's
//! log file and, followed, streams new ones; the asker going away stops the stream.

use std::time::Duration;

use anyhow::{Context, Result};
use futures::StreamExt;
use serde_json::json;
use shoal_actors::host::logs;
use shoal_protocol::api::{JobRef, RunRequest};
use shoal_protocol::job::JobState;
use shoal_protocol::worker::WorkerState;
use shoal_tests::{Shoal, eventually, rust_endpoint};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_workers_log_can_be_read_and_followed() -> Result<()> {
    let shoal = Shoal::start().await?;
    let host = shoal.host.as_ref().context("host")?.id.clone();
    let mut spec = rust_endpoint("logged")?;
    spec.max_attempts = 1;
    shoal.api.create_endpoint(&spec).await?;
    let worker = eventually(Duration::from_secs(30), "an idle worker", || async {
        let list = shoal.api.workers(Some("logged")).await.ok()?;
        list.workers.into_iter().find(|w| w.state == WorkerState::Idle)
    })
    .await?;
    let (client, names) = (&shoal.nats.client, &shoal.nats.names);
    let mut followed = logs::follow(client, names, &host, "logged", &worker.id, 20).await?;
    assert!(followed.next().await.is_some(), "the last lines come first");

    let job = shoal.api.run(&RunRequest::new("logged", json!({"exit": 5}))).await?;
    let s = shoal.api.status(&JobRef { endpoint: Some("logged".into()), id: job.id.clone(), wait_ms: 30_000 }).await?;
    assert_eq!(s.status, JobState::Failed, "{s:?}");
    let line = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(batch) = followed.next().await {
            if let Some(l) = batch.into_iter().find(|l| l.contains("asks to exit with code 5")) {
                return Some(l);
            }
        }
        None
    })
    .await?
    .context("the followed log shows the exit")?;
    assert!(line.contains(&job.id), "{line}");
    drop(followed);

    let lines = logs::get(client, names, &host, "logged", &worker.id, 5).await?;
    assert!(lines.iter().any(|l| l.contains("asks to exit with code 5")), "{lines:?}");
    assert!(lines.len() <= 5);
    let missing = logs::get(client, names, &host, "logged", "w-nobody", 5).await;
    assert!(missing.is_err_and(|e| e.to_string().contains("no log")));
    let bad = logs::get(client, names, &host, "../etc", "passwd", 5).await;
    assert!(bad.is_err(), "ids are validated before they name a file");
    let nobody = logs::get(client, names, "no-such-host", "logged", &worker.id, 5).await;
    assert!(nobody.is_err_and(|e| e.to_string().contains("does not answer")));
    shoal.stop().await;
    Ok(())
}
