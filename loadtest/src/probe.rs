//! `shoal-loadtest probe`: what one NATS or JetStream operation costs on this server, one at a
//! time (p50/p99 over `n` rounds). The job path is a chain of such operations; their cost times
//! their count is the floor of a job's latency (see BENCHMARKS.md, "What holds it back").
//!
//! Works in a scratch stream and bucket of its own (`LOADTEST_PROBE_<token>`), deleted after.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Context, Result};
use async_nats::jetstream::{self, consumer, kv, stream};
use bytes::Bytes;
use futures::StreamExt;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpCost {
    pub op: String,
    pub p50_us: u64,
    pub p99_us: u64,
    pub mean_us: u64,
}

async fn measure<F, Fut>(op: &str, n: u64, mut f: F) -> Result<OpCost>
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).context("histogram")?;
    for i in 0..n {
        let t = Instant::now();
        f(i).await.with_context(|| format!("probe {op}"))?;
        h.saturating_record(u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX).max(1));
    }
    Ok(OpCost {
        op: op.to_string(),
        p50_us: h.value_at_quantile(0.5),
        p99_us: h.value_at_quantile(0.99),
        mean_us: h.mean().round() as u64,
    })
}

/// Measures the primitive operations `n` times each; `payload` bytes per message.
pub async fn probe(url: &str, n: u64, payload: usize) -> Result<Vec<OpCost>> {
    let token = crate::random_token();
    let a = async_nats::connect(url).await.context("connect")?;
    let b = async_nats::connect(url).await.context("connect")?;
    let body = Bytes::from(vec![b'x'; payload]);
    let mut out = Vec::new();

    // core request/reply through a responder on another connection
    let subject = format!("loadtest.probe.{token}.echo");
    let mut sub = b.subscribe(subject.clone()).await?;
    let responder = b.clone();
    let echo = tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            if let Some(r) = m.reply {
                let _ = responder.publish(r, m.payload).await;
            }
        }
    });
    // the subscription reaches the server asynchronously: wait until it answers
    let mut answered = false;
    for _ in 0..200 {
        if a.request(subject.clone(), body.clone()).await.is_ok() {
            answered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    anyhow::ensure!(answered, "the probe's echo responder never answered");
    out.push(
        measure("core request/reply", n, |_| {
            let (a, s, p) = (a.clone(), subject.clone(), body.clone());
            async move { a.request(s, p).await.map(|_| ()).map_err(anyhow::Error::from) }
        })
        .await?,
    );
    echo.abort();

    let js = jetstream::new(a.clone());
    let name = format!("LOADTEST_PROBE_{}", token.to_ascii_uppercase());
    let jobs = format!("loadtest.probe.{token}.jobs");
    let st = js
        .create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![jobs.clone()],
            retention: stream::RetentionPolicy::WorkQueue,
            ..Default::default()
        })
        .await
        .context("scratch stream")?;
    out.push(
        measure("JetStream publish, ack awaited", n, |_| {
            let (js, s, p) = (js.clone(), jobs.clone(), body.clone());
            async move { js.publish(s, p).await?.await.map(|_| ()).map_err(anyhow::Error::from) }
        })
        .await?,
    );
    let cons: consumer::PullConsumer = st
        .create_consumer(consumer::pull::Config {
            durable_name: Some("probe".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await?;
    out.push(
        measure("pull fetch of 1 waiting message", n, |_| {
            let c = cons.clone();
            async move {
                let mut batch = c.fetch().max_messages(1).messages().await.map_err(anyhow::Error::from)?;
                let m = batch.next().await.context("a message")?.map_err(|e| anyhow::anyhow!(e))?;
                m.ack().await.map_err(|e| anyhow::anyhow!(e))
            }
        })
        .await?,
    );
    for _ in 0..n {
        js.publish(jobs.clone(), body.clone()).await?.await?;
    }
    out.push(
        measure("pull fetch of 1 + double ack", n, |_| {
            let c = cons.clone();
            async move {
                let mut batch = c.fetch().max_messages(1).messages().await.map_err(anyhow::Error::from)?;
                let m = batch.next().await.context("a message")?.map_err(|e| anyhow::anyhow!(e))?;
                m.double_ack().await.map_err(|e| anyhow::anyhow!(e))
            }
        })
        .await?,
    );
    let _ = js.delete_stream(&name).await;

    let bucket = format!("loadtest-probe-{token}");
    let store = js
        .create_key_value(kv::Config { bucket: bucket.clone(), history: 1, ..Default::default() })
        .await
        .context("scratch bucket")?;
    out.push(
        measure("KV create", n, |i| {
            let (s, p) = (store.clone(), body.clone());
            async move { s.create(format!("k{i}"), p).await.map(|_| ()).map_err(anyhow::Error::from) }
        })
        .await?,
    );
    out.push(
        measure("KV get (entry)", n, |i| {
            let s = store.clone();
            async move { s.entry(format!("k{i}")).await.map(|_| ()).map_err(anyhow::Error::from) }
        })
        .await?,
    );
    out.push(
        measure("KV update (compare-and-set)", n, |i| {
            let (s, p) = (store.clone(), body.clone());
            async move {
                let rev = s.entry(format!("k{i}")).await?.map(|e| e.revision).unwrap_or(0);
                s.update(format!("k{i}"), p, rev).await.map(|_| ()).map_err(anyhow::Error::from)
            }
        })
        .await?
        .minus_get(&out),
    );
    out.push(
        measure("KV put", n, |i| {
            let (s, p) = (store.clone(), body.clone());
            async move { s.put(format!("k{i}"), p).await.map(|_| ()).map_err(anyhow::Error::from) }
        })
        .await?,
    );
    let _ = js.delete_key_value(&bucket).await;
    out.push(
        measure("core publish + flush", n, |_| {
            let (a, s, p) = (a.clone(), format!("loadtest.probe.{token}.sink"), body.clone());
            async move {
                a.publish(s, p).await?;
                a.flush().await.map_err(anyhow::Error::from)
            }
        })
        .await?,
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
    Ok(out)
}

impl OpCost {
    /// The update was measured with the get it needs; report the update alone.
    fn minus_get(mut self, before: &[OpCost]) -> OpCost {
        if let Some(get) = before.iter().find(|c| c.op.starts_with("KV get")) {
            self.p50_us = self.p50_us.saturating_sub(get.p50_us);
            self.p99_us = self.p99_us.saturating_sub(get.p50_us);
            self.mean_us = self.mean_us.saturating_sub(get.mean_us);
        }
        self
    }
}

pub fn table(costs: &[OpCost]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "  {:<36} {:>9} {:>9} {:>9}", "operation (one at a time)", "p50 µs", "p99 µs", "mean µs");
    for c in costs {
        let _ = writeln!(out, "  {:<36} {:>9} {:>9} {:>9}", c.op, c.p50_us, c.p99_us, c.mean_us);
    }
    out
}
