//! Taking jobs: the long-poll behind job-take. Normal jobs first, low-priority ones only
//! when no normal job waits; each delivery token's record goes IN_PROGRESS on the taking worker
//! by compare-and-set ([`lifecycle::take`]), or ends (ttl passed, attempts used) without running.
//! A fresh token's job goes to the worker before its start is written ([`record_start`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_nats::StatusCode;
use async_nats::jetstream::Message;
use async_nats::jetstream::consumer::PullConsumer;
use futures::StreamExt;
use serde_json::Value;
use shoal_protocol::codec::from_msgpack;
use shoal_protocol::job::{JobRecord, JobToken, Priority, RecordSnapshot, ReplyTo, WorkerJob};
use shoal_protocol::lifecycle::{self, Outcome, StartFound, Take};

use super::ack::AckGuard;
use crate::blobs::BlobError;
use crate::clock::now_ms;
use crate::jobs::{JobStore, StoreError};

/// How often an idle worker's long-poll looks at the low-priority queue.
const LOW_PRIORITY_CHECK: Duration = Duration::from_secs(5);

/// How often a busy worker looks at the low-priority queue between normal jobs. Not after
/// every job: each look costs two pulls that find nothing while normal jobs keep coming
/// (four messages at the server, two round trips on the worker's path to its next job).
const LOW_PRIORITY_RECHECK: Duration = Duration::from_millis(200);

/// Who takes: the worker and its host, and whether a fresh token's job goes to the worker
/// before its start is recorded (`host.start_record_ms` above 0; see [`record_start`]).
pub struct Taker<'a> {
    pub worker: &'a str,
    pub host: &'a str,
    pub defer_start: bool,
}

/// A job taken for a worker: what the worker gets, the record as written and its revision,
/// and the delivery.
pub struct TakenJob {
    pub job: WorkerJob,
    pub record: JobRecord,
    pub revision: u64,
    pub ack: AckGuard,
    /// The waiting submitter to answer with the result, from the token.
    pub reply: Option<ReplyTo>,
    /// The `job` span (a child of the submitter's trace): the worker actor keeps it open
    /// until the job's result is written.
    pub span: tracing::Span,
}

/// Long-polls the endpoint's queues (normal first, low only when normal is empty) and takes
/// what arrives: each token's record goes IN_PROGRESS on this worker by compare-and-set.
pub async fn fetch_and_take(
    queues: &Queues,
    store: &JobStore,
    taker: &Taker<'_>,
    max: usize,
    hold: Duration,
) -> Vec<TakenJob> {
    let worker = taker.worker;
    let deadline = Instant::now() + hold;
    let mut taken = Vec::new();
    while taken.is_empty() {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining < Duration::from_millis(10) || queues.is_closed() {
            break;
        }
        // the worker's own subscription, unless another take of this worker holds it
        let mut own = queues.puller.try_lock().ok();
        // normal jobs first; low-priority ones only when no normal job waits, looked at
        // every LOW_PRIORITY_RECHECK at most (a long-poll hands over a waiting normal job at
        // once, so between looks it is the only pull). A worker with several free slots first
        // takes what waits now, up to all of them.
        let mut msgs = Vec::new();
        let low_due_in = queues.low_check_due_in();
        if low_due_in.is_zero() || max > 1 {
            msgs = queues.pull(own.as_deref_mut(), Priority::Normal, max, None).await;
        }
        if msgs.is_empty() && low_due_in.is_zero() {
            msgs = queues.pull(own.as_deref_mut(), Priority::Low, max, None).await;
            queues.low_checked();
        }
        if msgs.is_empty() {
            // wait for a normal job; wake to look at the low queue when that is due, or every
            // few seconds after a look (an idle worker costs JetStream one pull per wake). The
            // wait is for one token: the server holds a pull for more until all have come or
            // it expires, which would keep the first one from a worker with free slots
            let wait = if low_due_in.is_zero() { LOW_PRIORITY_CHECK } else { low_due_in };
            let wait = remaining.min(wait);
            msgs = queues.pull(own.as_deref_mut(), Priority::Normal, 1, Some(wait)).await;
        }
        drop(own);
        // the tokens of one pull are taken together: their compare-and-sets and events leave
        // side by side (one write to the server for the batch, not a round trip each)
        let mut takes = Vec::with_capacity(msgs.len());
        for m in msgs {
            let delivered = m.info().map_or(1, |info| info.delivered);
            let (message, acker) = m.split();
            let ack = AckGuard::new(acker);
            if queues.is_closed() {
                // the worker stopped during the pull: the token goes straight back, untaken
                ack.nak().await;
                continue;
            }
            let Ok(token) = from_msgpack::<JobToken>(&message.payload) else {
                tracing::warn!(subject = %message.subject, "undecodable job token dropped");
                ack.ack().await;
                continue;
            };
            let trace_id = crate::trace_context::trace_id_of(message.headers.as_ref());
            let span = tracing::info_span!("job", endpoint_id = %token.endpoint, job_id = %token.id, worker_id = worker, trace_id);
            crate::trace_context::set_parent(&span, message.headers.as_ref());
            takes.push(tracing::Instrument::instrument(
                async move {
                    let taken_one = take_one(store, &token, delivered, taker, ack).await;
                    tracing::debug!(taken = taken_one.is_some(), "job token delivered");
                    taken_one
                },
                span,
            ));
        }
        taken.extend(futures::future::join_all(takes).await.into_iter().flatten());
    }
    taken
}

async fn take_one(
    store: &JobStore,
    token: &JobToken,
    delivered: i64,
    taker: &Taker<'_>,
    ack: AckGuard,
) -> Option<TakenJob> {
    let (worker, host, defer_start) = (taker.worker, taker.host, taker.defer_start);
    // an input stored as a blob, read once before the take is written
    let mut blob_input: Option<Value> = None;
    // the token's snapshot of the record as queued: a compare-and-set against its revision
    // needs no read first, and fails (then we read) if the record changed since. At revision
    // 0 the job was queued without a record, and this take creates it
    let mut snapshot =
        token.snapshot.clone().filter(|s| s.record.id == token.id && s.record.endpoint == token.endpoint);
    // A token queued without a record may be of a job that ended since and whose record has
    // expired: one delivered before (taken and ended, its ack lost), or one queued longer ago
    // than a record lives (its job ended in the queue and the token's removal failed). Its
    // record is read first, and without one the job's stored events say whether it ended
    let mut unrecorded = match snapshot.as_ref().is_some_and(|s| may_have_ended(s, delivered, now_ms())) {
        true => snapshot.take(),
        false => None,
    };
    for _ in 0..16 {
        let (found, from_token) = match snapshot.take() {
            Some(s) => (Ok(Some((s.record, s.revision))), true),
            None => (store.get_record(&token.endpoint, &token.id).await, false),
        };
        let (rec, rev) = match found {
            Ok(Some(found)) => found,
            Ok(None) => match unrecorded.take() {
                Some(queued) => match store.has_ended(&token.endpoint, &token.id).await {
                    Ok(false) => (queued.record, 0),
                    Ok(true) => {
                        ack.ack().await; // ended, and its record expired: nothing to run
                        return None;
                    }
                    Err(e) => {
                        tracing::warn!(job_id = %token.id, error = %e, "cannot read the job's events; redelivering");
                        return None; // the guard naks
                    }
                },
                None => {
                    ack.ack().await; // record expired or purged: nothing to run
                    return None;
                }
            },
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
        if defer_start && run && from_token && rev == 0 {
            // a fresh token's job goes to its worker now, its start recorded later (or never,
            // when its result comes first: the result's write creates the record)
            let mut ack = ack;
            ack.defer_start(store, next.clone());
            let input = blob_input.take().unwrap_or_else(|| next.input.clone());
            let job = WorkerJob { id: next.id.clone(), input, s3_config: next.s3_config.clone() };
            let reply = token.reply.clone();
            return Some(TakenJob { job, record: next, revision: 0, ack, reply, span: tracing::Span::current() });
        }
        match store.write(&key, &next, rev).await {
            Ok(Some(revision)) => {
                store.publish_event(&next, revision).await;
                if !run {
                    ack.ack().await;
                    return None;
                }
                let input = blob_input.take().unwrap_or_else(|| next.input.clone());
                let job = WorkerJob { id: next.id.clone(), input, s3_config: next.s3_config.clone() };
                let reply = token.reply.clone();
                return Some(TakenJob { job, record: next, revision, ack, reply, span: tracing::Span::current() });
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

/// What [`record_start`] did.
#[derive(Debug)]
pub enum StartWrite {
    /// The record now says IN_PROGRESS on this worker, at this revision (the started event is out).
    Written(u64),
    /// The job was written since its token was queued: what to do about it, the record found and
    /// its revision.
    Found(StartFound, Box<JobRecord>, u64),
    /// There was a record, and it is gone again (purged): nothing to do.
    Gone,
}

/// Records the start of a job its worker already has (`taken`: the record as the take made it
/// from the token's snapshot, at revision 0): creates the record, or tells what is there
/// instead ([`lifecycle::found_at_start`]).
///
/// Why the start is written late: a short job's result comes before it is due, and the result's
/// write then creates the record at once, so such a job costs the server one stored write (and
/// its ack, and the started event) fewer, and its worker gets it one round trip sooner. Until the
/// start is written the job reads as IN_QUEUE; a cancel or a time-out in that time ends the
/// record, which this write then runs into, and the worker is told to stop.
pub async fn record_start(store: &JobStore, taken: &JobRecord) -> Result<StartWrite, StoreError> {
    let key = store.key(&taken.endpoint, &taken.id);
    if let Some(revision) = store.write(&key, taken, 0).await? {
        store.publish_event(taken, revision).await;
        return Ok(StartWrite::Written(revision));
    }
    Ok(match store.get_record(&taken.endpoint, &taken.id).await? {
        Some((current, revision)) => {
            StartWrite::Found(lifecycle::found_at_start(&current, taken), Box::new(current), revision)
        }
        None => StartWrite::Gone,
    })
}

/// Whether a token queued with its record at `snapshot` may stand for a job that ended since
/// and whose record has expired (then the take reads before it writes): a token queued without
/// a record (revision 0) that was delivered before, or that was queued at least a record's
/// retention ago. Any other token's job either never ended or still has its record, which the
/// take's compare-and-set runs into.
fn may_have_ended(snapshot: &RecordSnapshot, delivered: i64, now_ms: u64) -> bool {
    let record = &snapshot.record;
    snapshot.revision == 0
        && (delivered > 1 || now_ms.saturating_sub(record.queued_at_ms) >= record.retention_s().saturating_mul(1000))
}

/// How long after `now` a worker that last looked at the low-priority queue at `last` (never:
/// none) should look again: at once the first time, then LOW_PRIORITY_RECHECK after each look.
fn low_check_due_in(last: Option<Instant>, now: Instant) -> Duration {
    last.map_or(Duration::ZERO, |at| LOW_PRIORITY_RECHECK.saturating_sub(now.saturating_duration_since(at)))
}

/// An endpoint's two queue consumers, as one worker pulls from them.
pub struct Queues {
    pub normal: PullConsumer,
    pub low: PullConsumer,
    puller: tokio::sync::Mutex<Puller>,
    /// The worker is gone: a pull still under way hands back what it gets.
    closed: AtomicBool,
    /// When this worker last looked at the low-priority queue (none: never).
    low_checked_at: std::sync::Mutex<Option<Instant>>,
}

impl Queues {
    /// The queues of a worker actor, closed when the returned handle (held in its state) drops.
    pub fn open(normal: PullConsumer, low: PullConsumer, nats: &crate::nats::Nats) -> QueuesHandle {
        let puller = Puller { client: nats.client.clone(), js: nats.js.clone(), inbox: None };
        QueuesHandle(Arc::new(Queues {
            normal,
            low,
            puller: tokio::sync::Mutex::new(puller),
            closed: AtomicBool::new(false),
            low_checked_at: std::sync::Mutex::new(None),
        }))
    }

    /// How long until this worker should look at the low-priority queue again (zero: now).
    fn low_check_due_in(&self) -> Duration {
        match self.low_checked_at.lock() {
            Ok(at) => low_check_due_in(*at, Instant::now()),
            Err(_) => Duration::ZERO,
        }
    }

    fn low_checked(&self) {
        if let Ok(mut at) = self.low_checked_at.lock() {
            *at = Some(Instant::now());
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// One pull of up to `max` tokens: at once (`wait` none: what waits now, maybe nothing) or
    /// held up to `wait` for the first. Through the worker's own subscription when given,
    /// else through a fresh one (async-nats' fetch).
    async fn pull(
        &self,
        own: Option<&mut Puller>,
        priority: Priority,
        max: usize,
        wait: Option<Duration>,
    ) -> Vec<Message> {
        let consumer = match priority {
            Priority::Normal => &self.normal,
            Priority::Low => &self.low,
        };
        if let Some(puller) = own {
            return puller.pull(consumer, max, wait).await;
        }
        match wait {
            None => drain(consumer.fetch().max_messages(max).messages().await.ok()).await,
            Some(wait) => match consumer.batch().max_messages(max).expires(wait).messages().await {
                Ok(b) => drain(Some(b)).await,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    vec![]
                }
            },
        }
    }
}

/// The worker actor's hold on its [`Queues`]: dropped with the actor's state (a stop or a
/// failure), it closes them, so the tokens of a long-poll still under way go back at once
/// instead of being taken for a worker that is gone.
pub struct QueuesHandle(Arc<Queues>);

impl QueuesHandle {
    pub fn queues(&self) -> Arc<Queues> {
        self.0.clone()
    }
}

impl Drop for QueuesHandle {
    fn drop(&mut self) {
        self.0.closed.store(true, Ordering::Release);
    }
}

/// A worker's pulls on one subscription it keeps: async-nats' fetch subscribes a fresh inbox
/// per pull and unsubscribes it after (two more protocol operations and two changes of the
/// server's subscription list per pull, on the path of every job). One pull at a time: each
/// is read until the server ends it (its tokens, or a 404/408/409 status), so no answer to
/// one can be taken for the next's.
struct Puller {
    client: async_nats::Client,
    js: async_nats::jetstream::Context,
    inbox: Option<(async_nats::Subject, async_nats::Subscriber)>,
}

impl Puller {
    async fn pull(&mut self, consumer: &PullConsumer, max: usize, wait: Option<Duration>) -> Vec<Message> {
        use async_nats::jetstream::consumer::pull::BatchConfig;
        if self.inbox.is_none() {
            let subject = async_nats::Subject::from(self.client.new_inbox());
            match self.client.subscribe(subject.clone()).await {
                Ok(sub) => self.inbox = Some((subject, sub)),
                Err(_) => return vec![],
            }
        }
        let Some((subject, sub)) = self.inbox.as_mut() else { return vec![] };
        let request = BatchConfig { batch: max, expires: wait, no_wait: wait.is_none(), ..Default::default() };
        if consumer.request_batch(request, subject.clone()).await.is_err() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            return vec![];
        }
        // the server ends a pull by itself; past this, something was lost
        let give_up = tokio::time::Instant::now() + wait.unwrap_or_default() + Duration::from_secs(5);
        let mut out = Vec::new();
        while out.len() < max {
            match tokio::time::timeout_at(give_up, sub.next()).await {
                Ok(Some(message)) => match message.status {
                    None | Some(StatusCode::OK) => out.push(Message { message, context: self.js.clone() }),
                    Some(StatusCode::IDLE_HEARTBEAT) => {}
                    // no tokens (404), the wait expired (408), or the pull was refused (409)
                    Some(_) => break,
                },
                // closed, or no end from the server: a fresh inbox, so that a late answer to
                // this pull cannot be taken for the next one's
                Ok(None) | Err(_) => {
                    self.inbox = None;
                    break;
                }
            }
        }
        out
    }
}

async fn drain(batch: Option<async_nats::jetstream::consumer::pull::Batch>) -> Vec<Message> {
    let mut out = Vec::new();
    if let Some(mut b) = batch {
        while let Some(Ok(m)) = b.next().await {
            out.push(m);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_take_reads_first_only_when_the_job_may_have_ended_and_its_record_expired() {
        let record: JobRecord = serde_json::from_value(serde_json::json!({
            "id": "j1", "endpoint": "ep", "state": "IN_QUEUE", "input": {}, "max_attempts": 3,
            "policy": {"execution_timeout_ms": 600_000, "ttl_ms": 86_400_000},
            "submitted_at_ms": 1_000, "queued_at_ms": 1_000, "retention_s": 60,
        }))
        .expect("a queued record");
        let at = |revision| RecordSnapshot { revision, record: record.clone() };
        let young = 1_000 + 59_999;
        let old = 1_000 + 60_000;
        assert!(!may_have_ended(&at(0), 1, young), "first delivery, younger than a record lives: write at once");
        assert!(may_have_ended(&at(0), 2, young), "delivered before: maybe taken, ended and expired");
        assert!(may_have_ended(&at(0), 1, old), "as old as a record lives: maybe ended in the queue and expired");
        assert!(!may_have_ended(&at(3), 2, old), "queued with a record: the compare-and-set meets it");
        // a clock behind the queueing time is not "old"
        assert!(!may_have_ended(&at(0), 1, 0));
    }

    #[test]
    fn the_low_priority_queue_is_looked_at_first_then_at_most_every_recheck() {
        let t0 = Instant::now();
        assert_eq!(low_check_due_in(None, t0), Duration::ZERO, "a worker that never looked looks at once");
        assert_eq!(low_check_due_in(Some(t0), t0), LOW_PRIORITY_RECHECK);
        let half = LOW_PRIORITY_RECHECK / 2;
        assert_eq!(low_check_due_in(Some(t0), t0 + half), LOW_PRIORITY_RECHECK - half);
        assert_eq!(low_check_due_in(Some(t0), t0 + LOW_PRIORITY_RECHECK), Duration::ZERO);
        assert_eq!(low_check_due_in(Some(t0), t0 + LOW_PRIORITY_CHECK), Duration::ZERO);
        // a clock read before the look (another take of the same worker) is not "overdue"
        assert_eq!(low_check_due_in(Some(t0 + half), t0), LOW_PRIORITY_RECHECK);
    }
}
