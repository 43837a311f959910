//! Taking jobs: the long-poll behind job-take. Normal jobs first, low-priority ones only
//! when no normal job waits; each delivery token's record goes IN_PROGRESS on the taking worker
//! by compare-and-set ([`lifecycle::take`]), or ends (ttl passed, attempts used) without running.

use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::PullConsumer;
use futures::StreamExt;
use serde_json::Value;
use shoal_protocol::codec::from_msgpack;
use shoal_protocol::job::{JobRecord, JobToken, WorkerJob};
use shoal_protocol::lifecycle::{self, Outcome, Take};

use super::ack::AckGuard;
use crate::blobs::BlobError;
use crate::clock::now_ms;
use crate::jobs::JobStore;

/// How often an idle worker's long-poll looks at the low-priority queue.
const LOW_PRIORITY_CHECK: Duration = Duration::from_secs(5);

/// A job taken for a worker: what the worker gets, the record as written, and the delivery.
pub struct TakenJob {
    pub job: WorkerJob,
    pub record: JobRecord,
    pub ack: AckGuard,
}

/// Long-polls the endpoint's queues (normal first, low only when normal is empty) and takes
/// what arrives: each token's record goes IN_PROGRESS on this worker by compare-and-set.
pub async fn fetch_and_take(
    consumers: &(PullConsumer, PullConsumer),
    store: &JobStore,
    worker: &str,
    host: &str,
    max: usize,
    hold: Duration,
) -> Vec<TakenJob> {
    let deadline = Instant::now() + hold;
    let mut taken = Vec::new();
    while taken.is_empty() {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining < Duration::from_millis(10) {
            break;
        }
        // normal jobs first; low-priority ones only when no normal job waits
        let mut msgs = drain(consumers.0.fetch().max_messages(max).messages().await.ok()).await;
        if msgs.is_empty() {
            msgs = drain(consumers.1.fetch().max_messages(max).messages().await.ok()).await;
        }
        if msgs.is_empty() {
            // wait for a normal job; wake every few seconds to look at the low queue (an idle
            // worker costs JetStream one pull per wake, so not more often)
            let wait = remaining.min(LOW_PRIORITY_CHECK);
            match consumers.0.batch().max_messages(max).expires(wait).messages().await {
                Ok(b) => msgs = drain(Some(b)).await,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        for m in msgs {
            let (message, acker) = m.split();
            let ack = AckGuard::new(acker);
            let Ok(token) = from_msgpack::<JobToken>(&message.payload) else {
                tracing::warn!(subject = %message.subject, "undecodable job token dropped");
                ack.ack().await;
                continue;
            };
            let trace_id = crate::trace_context::trace_id_of(message.headers.as_ref());
            let span = tracing::info_span!("job", endpoint_id = %token.endpoint, job_id = %token.id, worker_id = worker, trace_id);
            let taken_one =
                tracing::Instrument::instrument(take_one(store, &token, worker, host, ack), span.clone()).await;
            span.in_scope(|| tracing::debug!(taken = taken_one.is_some(), "job token delivered"));
            if let Some(t) = taken_one {
                taken.push(t);
            }
        }
    }
    taken
}

async fn take_one(store: &JobStore, token: &JobToken, worker: &str, host: &str, ack: AckGuard) -> Option<TakenJob> {
    // an input stored as a blob, read once before the take is written
    let mut blob_input: Option<Value> = None;
    for _ in 0..16 {
        let (rec, rev) = match store.get(&token.endpoint, &token.id).await {
            Ok(Some(found)) => found,
            Ok(None) => {
                ack.ack().await; // record expired or purged: nothing to run
                return None;
            }
            Err(e) => {
                tracing::warn!(job_id = %token.id, error = %e, "cannot read job record; redelivering");
                return None; // the guard naks
            }
        };
        let key = store.key(&rec.endpoint, &rec.id);
        let (mut next, mut run) = match lifecycle::take(&rec, worker, host, now_ms()) {
            Take::Run(next) => (next, true),
            Take::Expired(next) | Take::Exhausted(next) => (next, false),
            Take::Skip => {
                ack.ack().await;
                return None;
            }
        };
        if let (true, None, Some(name)) = (run, &blob_input, &rec.input_ref) {
            match store.blobs().get_json(name).await {
                Ok(v) => blob_input = Some(v),
                Err(BlobError::Unavailable(e)) => {
                    tracing::warn!(job_id = %token.id, error = %e, "cannot read the job's input; redelivering");
                    return None; // the guard naks
                }
                Err(e) => {
                    // the input is gone or corrupt: the job can never run
                    let failed = Outcome::Failed {
                        error: format!("cannot read the job's input: {e}"),
                        output: None,
                        stop_pod: false,
                    };
                    match lifecycle::finish(&rec, failed, now_ms()) {
                        Ok(f) => (next, run) = (f, false),
                        Err(_) => continue,
                    }
                }
            }
        }
        match store.write(&key, &next, rev).await {
            Ok(Some(_)) => {
                store.publish_event(&next).await;
                if !run {
                    ack.ack().await;
                    return None;
                }
                let input = blob_input.take().unwrap_or_else(|| next.input.clone());
                let job = WorkerJob { id: next.id.clone(), input, s3_config: next.s3_config.clone() };
                return Some(TakenJob { job, record: next, ack });
            }
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(job_id = %token.id, error = %e, "cannot take job; redelivering");
                return None;
            }
        }
    }
    None
}

async fn drain(batch: Option<async_nats::jetstream::consumer::pull::Batch>) -> Vec<async_nats::jetstream::Message> {
    let mut out = Vec::new();
    if let Some(mut b) = batch {
        while let Some(Ok(m)) = b.next().await {
            out.push(m);
        }
    }
    out
}
