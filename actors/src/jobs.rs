//! The job store: job records in the `shoal-jobs` KV, changed only by compare-and-set with the
//! pure transitions of [`shoal_protocol::lifecycle`]. Each applied change that the job's owner
//! would see (its [`JobView`]) publishes a job event carrying that view and the record's
//! revision: the owning endpoint actor follows its jobs from these events.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures::StreamExt;
use shoal_protocol::api::JobStatus;
use shoal_protocol::codec::{CONTENT_TYPE, Encoding, encode as encode_as, from_msgpack, to_msgpack};
use shoal_protocol::events::JobEvent;
use shoal_protocol::events::REMOVED_EVENT_TOKEN;
use shoal_protocol::job::{JobRecord, JobToken, JobView, Priority, ReplyTo};
use shoal_protocol::lifecycle::TransitionError;

use crate::clock::now_ms;
use crate::nats::Nats;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("job store unavailable: {0}")]
    Unavailable(String),
    #[error("job record {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("job record {0} keeps changing under us")]
    Contended(String),
}

/// The result of [`JobStore::transition`].
#[derive(Debug)]
pub enum Applied {
    /// Written: the new record and its revision.
    Changed {
        record: Box<JobRecord>,
        previous: Box<JobRecord>,
        revision: u64,
    },
    /// The transition refused the current record (already terminal, wrong state).
    Refused {
        record: Box<JobRecord>,
        reason: TransitionError,
    },
    NotFound,
}

/// Cheap to clone (the job path clones it per job): the connection and stores are shared.
#[derive(Clone, Debug)]
pub struct JobStore {
    nats: Arc<Nats>,
}

impl JobStore {
    pub fn new(nats: Nats) -> JobStore {
        JobStore { nats: Arc::new(nats) }
    }

    /// The object store of inputs and outputs too large to inline in a record.
    pub fn blobs(&self) -> &crate::blobs::Blobs {
        &self.nats.blobs
    }

    pub fn key(&self, endpoint: &str, id: &str) -> String {
        self.nats.names.job_key(endpoint, id)
    }

    /// A job as its readers see it: its record, or, for a job queued without one (the record
    /// is written by whoever changes the job first: its taker, a cancel, a time-out), the
    /// record its token carries, at revision 0. A compare-and-set against revision 0 creates
    /// the record, so a transition from either is the same.
    pub async fn get(&self, endpoint: &str, id: &str) -> Result<Option<(JobRecord, u64)>, StoreError> {
        Ok(self.lookup(endpoint, id).await?.map(|found| (found.record, found.revision)))
    }

    async fn lookup(&self, endpoint: &str, id: &str) -> Result<Option<Found>, StoreError> {
        if let Some((record, revision)) = self.get_record(endpoint, id).await? {
            return Ok(Some(Found { record, revision, token: None }));
        }
        if let Some((record, token)) = self.queued_token(endpoint, id).await? {
            return Ok(Some(Found { record, revision: 0, token: Some(token) }));
        }
        // neither: unknown, or taken (its record written) between the two reads
        Ok(self.get_record(endpoint, id).await?.map(|(record, revision)| Found { record, revision, token: None }))
    }

    /// The record of a queued job that has none yet, from its token, and the token's sequence
    /// in the jobs stream. `endpoint` may be `*`. A token that carries no record, or one
    /// written before it was queued (an older shoal; a record too large to travel in its
    /// token), is not one: that job's record is in the bucket.
    pub async fn queued_token(&self, endpoint: &str, id: &str) -> Result<Option<(JobRecord, u64)>, StoreError> {
        use async_nats::jetstream::stream::LastRawMessageErrorKind;
        // with the endpoint known, each priority's exact subject in turn (normal first: most
        // jobs); a wildcard only for the lookup by id alone
        let subjects = match endpoint {
            "*" => vec![self.nats.names.job_token_of(endpoint, id)],
            _ => [Priority::Normal, Priority::Low]
                .into_iter()
                .map(|priority| self.nats.names.job_token_subject(endpoint, priority, id))
                .collect(),
        };
        let stream = self.jobs_stream().await?;
        for subject in subjects {
            match stream.get_last_raw_message_by_subject(&subject).await {
                Ok(message) => return Ok(queued_record(&message.payload, id).map(|rec| (rec, message.sequence))),
                Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => {}
                Err(e) => return Err(StoreError::Unavailable(e.to_string())),
            }
        }
        Ok(None)
    }

    /// Every queued job of `endpoint` that has no record yet, from its token, as `(record,
    /// token sequence)`, oldest first: for an owner that takes the endpoint, and for the job
    /// list, not the job path.
    pub async fn queued_tokens(&self, endpoint: &str) -> Result<Vec<(JobRecord, u64)>, StoreError> {
        self.queued_tokens_by(endpoint, TOKENS_PER_READ).await
    }

    /// [`JobStore::queued_tokens`], reading `batch` tokens per request: a batched direct get
    /// (nats-server >= 2.11), since a work-queue stream takes no second consumer over the
    /// workers' subjects. Each answer is the batch's messages, then an end-of-batch status (204),
    /// or 404 when no message is left.
    pub async fn queued_tokens_by(&self, endpoint: &str, batch: usize) -> Result<Vec<(JobRecord, u64)>, StoreError> {
        use async_nats::header::{NATS_SEQUENCE, NATS_SUBJECT};
        let unavailable =
            |e: &dyn std::fmt::Display| StoreError::Unavailable(format!("cannot read the job tokens: {e}"));
        let client = &self.nats.client;
        let subject = format!("$JS.API.DIRECT.GET.{}", self.nats.names.jobs_stream());
        let filter = self.nats.names.job_tokens_of_endpoint(endpoint);
        let inbox = client.new_inbox();
        let mut answers = client.subscribe(inbox.clone()).await.map_err(|e| unavailable(&e))?;
        let mut out = Vec::new();
        let mut from = 1;
        loop {
            let request = serde_json::json!({ "seq": from, "next_by_subj": filter, "batch": batch });
            client
                .publish_with_reply(subject.clone(), inbox.clone(), Bytes::from(request.to_string()))
                .await
                .map_err(|e| unavailable(&e))?;
            let mut read = 0;
            loop {
                let answer = tokio::time::timeout(Duration::from_secs(5), answers.next())
                    .await
                    .map_err(|_| unavailable(&"no answer from the server"))?
                    .ok_or_else(|| unavailable(&"the subscription ended"))?;
                match answer.status.map(|s| s.as_u16()) {
                    None | Some(200) => {
                        let header = |name| answer.headers.as_ref().and_then(|h| h.get(name)).map(|v| v.as_str());
                        let sequence = header(NATS_SEQUENCE).and_then(|v| v.parse::<u64>().ok());
                        let (Some(sequence), Some(token_subject)) = (sequence, header(NATS_SUBJECT)) else {
                            return Err(unavailable(&"a direct get answer without its sequence or subject"));
                        };
                        let id = token_subject.rsplit('.').next().unwrap_or_default();
                        if let Some(rec) = queued_record(&answer.payload, id) {
                            out.push((rec, sequence));
                        }
                        from = sequence + 1;
                        read += 1;
                    }
                    // the end of a batch; none left
                    Some(204) | Some(404) => break,
                    Some(code) => {
                        let why = answer.description.as_deref().unwrap_or("");
                        return Err(unavailable(&format!("direct get answered {code} {why}")));
                    }
                }
            }
            if read < batch {
                return Ok(out);
            }
        }
    }

    /// Removes a token whose job ended before it was taken (a cancel, a time-out): its record
    /// says so, but a record expires, and a token outliving it would be taken as new.
    async fn remove_token(&self, id: &str, sequence: u64) {
        let removed = match self.jobs_stream().await {
            Ok(stream) => stream.delete_message(sequence).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = removed {
            // it is skipped when delivered while the record lives (lifecycle::take)
            tracing::warn!(job_id = %id, error = %e, "cannot remove the token of a job that ended in the queue");
        }
    }

    /// Whether a job has ended: a terminal (or removal) event of it is stored. For a token
    /// delivered again whose job has no record: taken, ended, and its record expired since,
    /// or never taken (a delivery handed back, a taker that failed first).
    pub async fn has_ended(&self, endpoint: &str, id: &str) -> Result<bool, StoreError> {
        use async_nats::jetstream::stream::LastRawMessageErrorKind;
        let stream = self
            .nats
            .js
            .get_stream_no_info(self.nats.names.events_stream())
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        match stream.get_last_raw_message_by_subject(&self.nats.names.job_events_of(endpoint, id)).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(false),
            Err(e) => Err(StoreError::Unavailable(e.to_string())),
        }
    }

    async fn jobs_stream(&self) -> Result<async_nats::jetstream::stream::Stream<()>, StoreError> {
        let name = self.nats.names.jobs_stream();
        self.nats.js.get_stream_no_info(name).await.map_err(|e| StoreError::Unavailable(e.to_string()))
    }

    /// The record of a job in the bucket, nothing else (its taker's read: a token is what it
    /// holds).
    pub async fn get_record(&self, endpoint: &str, id: &str) -> Result<Option<(JobRecord, u64)>, StoreError> {
        let key = self.key(endpoint, id);
        let entry = self.nats.jobs.entry(&key).await.map_err(|e| StoreError::Unavailable(e.to_string()))?;
        match entry {
            Some(e) if e.operation == kv::Operation::Put => Ok(Some((decode(&key, &e.value)?, e.revision))),
            _ => Ok(None),
        }
    }

    /// Finds a job by id alone (the CLI may not know its endpoint): a queued job by its token
    /// (which names the endpoint), any other by a watch of `*.<id>`.
    pub async fn find(&self, id: &str) -> Result<Option<(JobRecord, u64)>, StoreError> {
        // a token lives from the submit until the job ends: without one, the job has ended (or
        // is unknown), and its record is all there is
        if let Some((rec, _)) = self.queued_token("*", id).await? {
            // taken since its token was read: the record is newer
            return Ok(Some(self.get_record(&rec.endpoint, id).await?.unwrap_or((rec, 0))));
        }
        let pattern = self.nats.names.job_key_any_endpoint(id);
        let mut watch =
            self.nats.jobs.watch_with_history(&pattern).await.map_err(|e| StoreError::Unavailable(e.to_string()))?;
        match tokio::time::timeout(Duration::from_millis(500), watch.next()).await {
            Ok(Some(Ok(e))) if e.operation == kv::Operation::Put => Ok(Some((decode(&e.key, &e.value)?, e.revision))),
            Ok(Some(Err(e))) => Err(StoreError::Unavailable(e.to_string())),
            _ => Ok(None),
        }
    }

    /// Creates a new record; `Ok(None)` if one with this id exists.
    pub async fn create(&self, rec: &JobRecord) -> Result<Option<u64>, StoreError> {
        let key = self.key(&rec.endpoint, &rec.id);
        let bytes = encode(&key, rec)?;
        match self.nats.jobs.create(&key, bytes).await {
            Ok(rev) => {
                self.publish_event(rec, rev).await;
                Ok(Some(rev))
            }
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
            Err(e) => Err(StoreError::Unavailable(e.to_string())),
        }
    }

    /// Undoes a submission (its job could not be queued): removes its record when one was
    /// written (`written`), and tells the owner with a `removed` event. `rec` is the record as
    /// submitted.
    pub async fn delete(&self, rec: &JobRecord, written: bool) -> Result<(), StoreError> {
        if written {
            self.nats
                .jobs
                .purge(self.key(&rec.endpoint, &rec.id))
                .await
                .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        }
        let mut event = event_of(rec, None);
        event.removed = true;
        let subject = self.nats.names.job_event_subject(&rec.endpoint, &rec.id, REMOVED_EVENT_TOKEN);
        self.nats.publish_event(subject, &event).await;
        Ok(())
    }

    /// Frees what the submission of job `id` claimed before it was undone: its idempotency key,
    /// while the key still names this job (a client retrying with the key after the error then
    /// queues the job anew, instead of finding a job that never was), and an input it moved to
    /// the object store (`input_ref`, when it is this job's own `<id>/input`; an input the
    /// client stored is the client's). Best effort: what cannot be freed now expires with its
    /// bucket's max age.
    pub async fn release_claims(
        &self,
        endpoint: &str,
        id: &str,
        idempotency_key: Option<&str>,
        input_ref: Option<&str>,
    ) {
        if let Some(key) = idempotency_key {
            let key = self.nats.names.idempotency_key(endpoint, key);
            let released = match self.nats.idempotency.entry(key.as_str()).await {
                Ok(Some(e)) if e.operation == kv::Operation::Put && e.value.as_ref() == id.as_bytes() => self
                    .nats
                    .idempotency
                    .delete_expect_revision(&key, Some(e.revision))
                    .await
                    .map_err(|e| e.to_string()),
                Ok(_) => Ok(()), // gone, or naming another job: not this submission's any more
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = released {
                tracing::warn!(job_id = id, error = %e, "cannot free the idempotency key of an undone submission");
            }
        }
        let own_input = self.nats.names.blob_input(id);
        if input_ref == Some(own_input.as_str())
            && let Err(e) = self.nats.blobs.delete(&own_input).await
        {
            tracing::debug!(job_id = id, error = %e, "cannot delete the input of an undone submission");
        }
    }

    /// Reads the record, applies `f`, writes the result if the revision did not move; on a
    /// conflict reads again and re-applies. `f` is a pure lifecycle transition.
    pub async fn transition<F>(&self, endpoint: &str, id: &str, f: F) -> Result<Applied, StoreError>
    where
        F: Fn(&JobRecord) -> Result<JobRecord, TransitionError>,
    {
        self.transition_from(endpoint, id, None, f).await
    }

    /// [`JobStore::transition`] starting from a record the caller holds at `revision` (the one
    /// its own last write returned): the first compare-and-set needs no read, and a conflict
    /// (someone wrote since) falls back to reading and re-applying.
    pub async fn transition_from<F>(
        &self,
        endpoint: &str,
        id: &str,
        known: Option<(JobRecord, u64)>,
        f: F,
    ) -> Result<Applied, StoreError>
    where
        F: Fn(&JobRecord) -> Result<JobRecord, TransitionError>,
    {
        self.transition_answering(endpoint, id, known, None, f).await
    }

    /// [`JobStore::transition_from`] that also answers a waiting submitter (`reply`, from the
    /// job's token) when the write makes the job terminal: right after the write, before the
    /// terminal event, which then names the subject answered so that the control plane's
    /// waiter for it stays silent.
    pub async fn transition_answering<F>(
        &self,
        endpoint: &str,
        id: &str,
        mut known: Option<(JobRecord, u64)>,
        reply: Option<&ReplyTo>,
        f: F,
    ) -> Result<Applied, StoreError>
    where
        F: Fn(&JobRecord) -> Result<JobRecord, TransitionError>,
    {
        let key = self.key(endpoint, id);
        for _ in 0..16 {
            let found = match known.take() {
                Some((record, revision)) => Some(Found { record, revision, token: None }),
                None => self.lookup(endpoint, id).await?,
            };
            let Some(Found { record: current, revision, token }) = found else {
                return Ok(Applied::NotFound);
            };
            let next = match f(&current) {
                Ok(next) => next,
                Err(reason) => return Ok(Applied::Refused { record: Box::new(current), reason }),
            };
            match self.write(&key, &next, revision).await? {
                Some(rev) => {
                    if !JobView::of(&next, rev).same_as(&JobView::of(&current, revision)) {
                        // the status of a terminal record, built once for the answer and the event
                        let status = next.state.is_terminal().then(|| JobStatus::from(&next));
                        let answered = match (reply, &status) {
                            (Some(reply), Some(status)) => self.answer(reply, status).await,
                            _ => None,
                        };
                        self.publish_event_with(&next, rev, status, answered).await;
                    }
                    if let (Some(sequence), true) = (token, next.state.is_terminal()) {
                        self.remove_token(id, sequence).await;
                    }
                    return Ok(Applied::Changed { record: Box::new(next), previous: Box::new(current), revision: rev });
                }
                None => continue,
            }
        }
        Err(StoreError::Contended(key))
    }

    /// Compare-and-set of one record; `Ok(None)` when the revision moved. A terminal record is
    /// the last write of a job (unless it is retried): it carries the record's retention as
    /// its per-key TTL, after which the record is gone and `status` says not found.
    pub async fn write(&self, key: &str, rec: &JobRecord, revision: u64) -> Result<Option<u64>, StoreError> {
        let bytes = encode(key, rec)?;
        if rec.state.is_terminal() && self.nats.job_ttl {
            return self.write_with_ttl(key, bytes, revision, rec.retention_s()).await;
        }
        match self.nats.jobs.update(key, bytes, revision).await {
            Ok(rev) => Ok(Some(rev)),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
            Err(e) => Err(StoreError::Unavailable(e.to_string())),
        }
    }

    /// `kv::Store::update` with a `Nats-TTL` (async-nats has TTLs only on create and purge).
    async fn write_with_ttl(
        &self,
        key: &str,
        bytes: Bytes,
        revision: u64,
        ttl_s: u64,
    ) -> Result<Option<u64>, StoreError> {
        use async_nats::jetstream::context::PublishErrorKind;
        let store = &self.nats.jobs;
        let subject = format!("{}{key}", store.put_prefix.as_deref().unwrap_or(&store.prefix));
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, revision.to_string().as_str());
        // the server's minimum TTL is one second
        headers.insert(async_nats::header::NATS_MESSAGE_TTL, ttl_s.max(1).to_string().as_str());
        let ack = match self.nats.js.publish_with_headers(subject, headers, bytes).await {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        match ack {
            Ok(ack) => Ok(Some(ack.sequence)),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Ok(None),
            Err(e) => Err(StoreError::Unavailable(e.to_string())),
        }
    }

    /// Publishes the job event of the state `rec` is in. A terminal event carries the job's
    /// status when it is small, so a `wait_ms` waiter answers from the event alone. A job with
    /// a webhook that reached a terminal state also gets a "webhook due" event, which is all the
    /// webhook dispatchers read.
    pub async fn publish_event(&self, rec: &JobRecord, revision: u64) {
        self.publish_event_with(rec, revision, rec.state.is_terminal().then(|| JobStatus::from(rec)), None).await
    }

    /// Publishes the event of a record put back as it was at `revision` (an undone retry), so
    /// that its owner sees it so; unlike [`JobStore::publish_event`] it announces no webhook
    /// again.
    pub async fn publish_restored(&self, rec: &JobRecord, revision: u64) {
        let mut event = event_of(rec, None);
        event.view = Some(JobView::of(rec, revision));
        let subject = self.nats.names.job_event_subject(&rec.endpoint, &rec.id, rec.state.event_token());
        self.nats.publish_event(subject, &event).await;
    }

    /// Answers a waiting submitter with the status of a terminal record, in the encoding its
    /// request used, unless its wait is over or the answer is too large to be sure it travels
    /// (then the control plane's waiter answers). The subject answered, if any.
    async fn answer(&self, reply: &ReplyTo, status: &JobStatus) -> Option<String> {
        if now_ms() >= reply.until_ms {
            return None;
        }
        let encoding = Encoding::from_content_type(reply.content_type.as_deref());
        let body = encode_as(encoding, status).ok().filter(|b| b.len() <= MAX_EVENT_WITH_STATUS_BYTES)?;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(CONTENT_TYPE, encoding.content_type());
        match self.nats.client.publish_with_headers(reply.subject.clone(), headers, Bytes::from(body)).await {
            Ok(()) => Some(reply.subject.clone()),
            Err(e) => {
                tracing::debug!(error = %e, "cannot answer the waiting submitter; the control plane will");
                None
            }
        }
    }

    /// The event of `rec`'s state as written at `revision`, with `status` (a terminal record's)
    /// and the subject answered.
    async fn publish_event_with(
        &self,
        rec: &JobRecord,
        revision: u64,
        status: Option<JobStatus>,
        answered: Option<String>,
    ) {
        let mut event = event_of(rec, answered);
        if rec.state.is_terminal() && rec.webhook.is_some() {
            self.nats.publish_event(self.nats.names.webhook_due_subject(&rec.endpoint, &rec.id), &event).await;
        }
        event.view = Some(JobView::of(rec, revision));
        event.status = status;
        let subject = self.nats.names.job_event_subject(&rec.endpoint, &rec.id, rec.state.event_token());
        if event.status.is_some() {
            match to_msgpack(&event) {
                Ok(bytes) if bytes.len() <= MAX_EVENT_WITH_STATUS_BYTES => {
                    if let Err(e) = self.nats.client.publish(subject, Bytes::from(bytes)).await {
                        tracing::debug!(error = %e, "event publish failed");
                    }
                    return;
                }
                // too large to travel in an event (or unencodable): waiters read the record
                _ => event.status = None,
            }
        }
        self.nats.publish_event(subject, &event).await;
    }
}

/// Tokens read per request when an endpoint's queued jobs are read from their tokens.
const TOKENS_PER_READ: usize = 256;

/// A job as [`JobStore::lookup`] found it.
struct Found {
    record: JobRecord,
    revision: u64,
    /// The sequence of the token it was read from (revision 0: no record yet).
    token: Option<u64>,
}

/// The record a token carries when its job was queued without one (revision 0), if it is
/// that job's.
fn queued_record(payload: &[u8], id: &str) -> Option<JobRecord> {
    let token = from_msgpack::<JobToken>(payload).ok()?;
    let snapshot = token.snapshot?;
    (snapshot.revision == 0 && snapshot.record.id == id && token.id == id).then_some(snapshot.record)
}

fn event_of(rec: &JobRecord, answered: Option<String>) -> JobEvent {
    JobEvent {
        job_id: rec.id.clone(),
        endpoint: rec.endpoint.clone(),
        state: rec.state,
        attempts: rec.attempts,
        worker_id: rec.worker_id.clone(),
        error: rec.error.clone(),
        at_ms: now_ms(),
        status: None,
        answered,
        view: None,
        removed: false,
    }
}

/// The largest terminal event that carries the job's status (its output inline); a larger
/// one goes without, and its waiters read the record.
const MAX_EVENT_WITH_STATUS_BYTES: usize = 16 * 1024;

fn encode(key: &str, rec: &JobRecord) -> Result<Bytes, StoreError> {
    to_msgpack(rec).map(Bytes::from).map_err(|e| StoreError::Corrupt { key: key.to_string(), reason: e.to_string() })
}

pub fn decode(key: &str, bytes: &[u8]) -> Result<JobRecord, StoreError> {
    from_msgpack(bytes).map_err(|e| StoreError::Corrupt { key: key.to_string(), reason: e.to_string() })
}

/// The durable pull consumer the workers of an endpoint share for one priority. Created by
/// whoever needs it first, always with the same config; one made by an older shoal (which
/// queued every token of the queue on one subject) is changed to take both subject forms.
pub async fn jobs_consumer(
    nats: &Nats,
    endpoint: &str,
    priority: shoal_protocol::job::Priority,
    ack_wait: Duration,
) -> Result<async_nats::jetstream::consumer::PullConsumer, StoreError> {
    use async_nats::jetstream::consumer::{AckPolicy, pull};
    let unavailable = |e: &dyn std::fmt::Display| StoreError::Unavailable(e.to_string());
    let name = nats.names.jobs_consumer(endpoint, priority);
    let stream = nats.js.get_stream_no_info(nats.names.jobs_stream()).await.map_err(|e| unavailable(&e))?;
    let config = pull::Config {
        durable_name: Some(name.clone()),
        filter_subjects: queue_subjects(&nats.names, endpoint, priority),
        ack_policy: AckPolicy::Explicit,
        ack_wait,
        max_ack_pending: 100_000,
        max_waiting: 4096,
        ..Default::default()
    };
    let mut consumer: async_nats::jetstream::consumer::PullConsumer =
        stream.get_or_create_consumer(&name, config.clone()).await.map_err(|e| unavailable(&e))?;
    let filters = &consumer.cached_info().config.filter_subjects;
    if filters.len() != config.filter_subjects.len() || config.filter_subjects.iter().any(|s| !filters.contains(s)) {
        let mut update = consumer.cached_info().config.clone();
        update.filter_subject = String::new();
        update.filter_subjects = config.filter_subjects.clone();
        stream.update_consumer(update).await.map_err(|e| unavailable(&e))?;
        consumer = stream.get_consumer(&name).await.map_err(|e| unavailable(&e))?;
    }
    Ok(consumer)
}

/// What a queue consumer takes: tokens on their own subjects, and those an older shoal queued
/// on the queue's one subject.
pub fn queue_subjects(names: &shoal_protocol::names::Names, endpoint: &str, priority: Priority) -> Vec<String> {
    vec![names.job_tokens_of_queue(endpoint, priority), names.job_subject(endpoint, priority)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_protocol::job::RecordSnapshot;

    fn record(id: &str) -> JobRecord {
        let mut rec: JobRecord =
            from_msgpack(include_bytes!("../../protocol/tests/samples/job_record.msgpack")).expect("decodes");
        rec.id = id.into();
        rec
    }

    fn token(id: &str, snapshot: Option<(u64, &str)>) -> Vec<u8> {
        let mut token = JobToken::new(id, "ep");
        token.snapshot = snapshot.map(|(revision, of)| RecordSnapshot { revision, record: record(of) });
        to_msgpack(&token).expect("encodes")
    }

    #[test]
    fn only_a_token_queued_without_a_record_stands_for_its_job() {
        assert_eq!(queued_record(&token("j1", Some((0, "j1"))), "j1").map(|r| r.id), Some("j1".into()));
        // a record written before the token (an older shoal, a large record, a retry): the
        // bucket has the job
        assert_eq!(queued_record(&token("j1", Some((7, "j1"))), "j1"), None);
        assert_eq!(queued_record(&token("j1", None), "j1"), None);
        // not this job's
        assert_eq!(queued_record(&token("j1", Some((0, "j2"))), "j1"), None);
        assert_eq!(queued_record(&token("j1", Some((0, "j1"))), "j2"), None);
        assert_eq!(queued_record(b"not a token", "j1"), None);
    }
}
