//! The raw JetStream baseline: the same scenario and payload as a bare work-queue round trip on
//! the same server, with nothing of shoal in between. A job is a JetStream publish whose ack is
//! awaited (the job is durable), pulled by one of `workers` in-process workers from a durable pull
//! consumer, acknowledged, and answered with a core publish carrying the payload back (after the
//! handler's sleep, if any). The submitter sees the reply on a subscription of its own.
//!
//! This is what any at-least-once JetStream work queue costs; shoal adds its job records,
//! events, the worker bridge and the worker process on top. Its stream and subjects are the
//! tester's own (not shoal's: they live here, not in `shoal_protocol::names`) and are deleted after.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::driver::{Cancel, JobOutcome, drive};
use crate::progress::Progress;
use crate::scenario::Scenario;
use crate::stats::RunResult;

const REPLY_HEADER: &str = "Shoal-Loadtest-Reply";

/// Names of one baseline run (`run` is a random token of `[a-z0-9]`).
struct BaselineNames {
    stream: String,
    jobs: String,
    replies: String,
    reply_prefix: String,
}

impl BaselineNames {
    fn new(prefix: &str, run: &str) -> BaselineNames {
        BaselineNames {
            stream: format!("LOADTEST_{}", run.to_ascii_uppercase()),
            jobs: format!("{prefix}.loadtest.{run}.jobs"),
            replies: format!("{prefix}.loadtest.{run}.reply.*"),
            reply_prefix: format!("{prefix}.loadtest.{run}.reply."),
        }
    }

    fn reply(&self, i: u64) -> String {
        format!("{}{i}", self.reply_prefix)
    }
}

pub struct BaselineRun<'a> {
    /// The submitting connection.
    pub client: &'a async_nats::Client,
    /// The workers' connection (another one, as a worker would have).
    pub worker_client: &'a async_nats::Client,
    pub prefix: &'a str,
    pub run_id: &'a str,
    pub scenario: &'a Scenario,
    pub workers: u32,
    pub payload: Bytes,
    pub sleep_ms: u64,
    pub timeout: Duration,
    pub max_in_flight: usize,
    pub progress: Arc<Progress>,
    pub cancel: Cancel,
}

type Waiters = Arc<Mutex<HashMap<u64, oneshot::Sender<Instant>>>>;

impl BaselineRun<'_> {
    pub async fn run(self) -> Result<RunResult> {
        let names = Arc::new(BaselineNames::new(self.prefix, self.run_id));
        let wjs = jetstream::new(self.worker_client.clone());
        let stream = wjs
            .create_stream(stream::Config {
                name: names.stream.clone(),
                subjects: vec![names.jobs.clone()],
                retention: stream::RetentionPolicy::WorkQueue,
                description: Some("shoal-loadtest baseline (deleted after the run)".into()),
                ..Default::default()
            })
            .await
            .context("create the baseline stream")?;
        let consumer: consumer::PullConsumer = stream
            .create_consumer(consumer::pull::Config {
                durable_name: Some("baseline".into()),
                ack_policy: consumer::AckPolicy::Explicit,
                max_ack_pending: 100_000,
                ..Default::default()
            })
            .await
            .context("create the baseline consumer")?;
        let mut tasks = Vec::new();
        for _ in 0..self.workers.max(1) {
            let mut messages = consumer.messages().await.context("pull from the baseline consumer")?;
            let (client, sleep_ms) = (self.worker_client.clone(), self.sleep_ms);
            tasks.push(tokio::spawn(async move {
                while let Some(Ok(msg)) = messages.next().await {
                    if sleep_ms > 0 {
                        tokio::time::sleep(Duration::from_millis(sleep_ms)).await;
                    }
                    let reply = msg.headers.as_ref().and_then(|h| h.get(REPLY_HEADER)).map(|v| v.to_string());
                    if let Err(e) = msg.ack().await {
                        tracing::debug!(error = %e, "baseline ack failed");
                    }
                    if let Some(reply) = reply {
                        let _ = client.publish(reply, msg.payload.clone()).await;
                    }
                }
            }));
        }
        // replies
        let waiters: Waiters = Arc::default();
        let mut sub = self.client.subscribe(names.replies.clone()).await.context("subscribe to baseline replies")?;
        let router = {
            let waiters = waiters.clone();
            tokio::spawn(async move {
                while let Some(msg) = sub.next().await {
                    let seen = Instant::now();
                    let Some(i) = msg.subject.rsplit('.').next().and_then(|t| t.parse::<u64>().ok()) else { continue };
                    let waiter = waiters.lock().ok().and_then(|mut w| w.remove(&i));
                    if let Some(tx) = waiter {
                        let _ = tx.send(seen);
                    }
                }
            })
        };
        let js = jetstream::new(self.client.clone());
        let (payload, timeout) = (self.payload.clone(), self.timeout);
        let job_names = names.clone();
        let job_waiters = waiters.clone();
        let job = move |i: u64| {
            let (js, names, waiters, payload) = (js.clone(), job_names.clone(), job_waiters.clone(), payload.clone());
            async move {
                let (tx, rx) = oneshot::channel();
                if let Ok(mut w) = waiters.lock() {
                    w.insert(i, tx);
                }
                let mut headers = HeaderMap::new();
                headers.insert(REPLY_HEADER, names.reply(i).as_str());
                let sent = Instant::now();
                let persisted = match js.publish_with_headers(names.jobs.clone(), headers, payload).await {
                    Ok(ack) => ack.await.is_ok(),
                    Err(_) => false,
                };
                if !persisted {
                    if let Ok(mut w) = waiters.lock() {
                        w.remove(&i);
                    }
                    return JobOutcome::failed("unavailable", sent);
                }
                let accepted = Instant::now();
                match tokio::time::timeout(timeout.saturating_sub(sent.elapsed()), rx).await {
                    Ok(Ok(done)) => JobOutcome { accepted: Some(accepted), done, ..JobOutcome::done(sent) },
                    _ => {
                        if let Ok(mut w) = waiters.lock() {
                            w.remove(&i);
                        }
                        JobOutcome { accepted: Some(accepted), ..JobOutcome::failed("no_result", sent) }
                    }
                }
            }
        };
        let (result, _) = drive(self.scenario, self.max_in_flight, self.progress.clone(), &self.cancel, job).await;
        router.abort();
        for t in tasks {
            t.abort();
        }
        if let Err(e) = wjs.delete_stream(&names.stream).await {
            tracing::warn!(stream = %names.stream, error = %e, "cannot delete the baseline stream");
        }
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn baseline_names_stay_under_the_prefix() {
        let n = BaselineNames::new("shoal", "ab12");
        assert_eq!(n.stream, "LOADTEST_AB12");
        assert_eq!(n.jobs, "shoal.loadtest.ab12.jobs");
        assert_eq!(n.reply(7), "shoal.loadtest.ab12.reply.7");
        assert!(n.replies.ends_with(".reply.*"));
    }
}
