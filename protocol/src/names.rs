//! Every subject, stream, bucket and consumer name shoal uses, from one place.
//!
//! All names derive from a prefix (default `shoal`), so several shoal installations — or
//! several tests — can share one NATS account without seeing each other. Call sites never
//! `format!` a subject: they call a builder here. Ids passed to builders must already be
//! validated with [`crate::ids::validate_id`].

use crate::error::ApiError;
use crate::ids::validate_id;
use crate::job::{JobState, Priority};

pub const DEFAULT_PREFIX: &str = "shoal";
/// The major version of the wire protocol, carried in API and command subjects.
pub const API_VERSION: &str = "v1";
/// The NATS micro service name the control plane registers.
pub const SERVICE_NAME: &str = "shoal";

/// Retention of a stream, as plain data (the actors map it onto the NATS client's types).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    /// A message is removed once acknowledged: each job is delivered to one worker.
    WorkQueue,
    /// Messages are kept up to the limits: events for dashboards, audits and tests.
    Limits,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamDef {
    pub name: String,
    pub subjects: Vec<String>,
    pub retention: Retention,
    /// 0 = unlimited.
    pub max_age_s: u64,
    /// -1 = unlimited.
    pub max_msgs: i64,
    /// Messages may be read by direct gets (in batches), not only through the stream's leader.
    pub allow_direct: bool,
    pub description: &'static str,
}

/// What the events stream keeps: events younger than `max_age_s` (0: no age limit), at most
/// `max_msgs` of them (-1: no count limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventLimits {
    pub max_age_s: u64,
    pub max_msgs: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketDef {
    pub bucket: String,
    /// 0 = unlimited.
    pub max_age_s: u64,
    pub history: i64,
    pub description: &'static str,
}

/// The names of one shoal installation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    prefix: String,
    upper: String,
}

impl Default for Names {
    fn default() -> Self {
        Names::new(DEFAULT_PREFIX).unwrap_or_else(|_| unreachable!("the default prefix is valid"))
    }
}

/// The api operations, one subject each: `<prefix>.v1.api.<op>`.
pub mod op {
    pub const JOB_RUN: &str = "job.run";
    /// Several jobs queued in one request (up to `api::MAX_BATCH_JOBS`).
    pub const JOB_RUN_BATCH: &str = "job.run_batch";
    pub const JOB_STATUS: &str = "job.status";
    pub const JOB_CANCEL: &str = "job.cancel";
    pub const JOB_RETRY: &str = "job.retry";
    pub const JOB_STREAM: &str = "job.stream";
    pub const ENDPOINT_PURGE: &str = "endpoint.purge";
    pub const ENDPOINT_HEALTH: &str = "endpoint.health";
    pub const ENDPOINT_CREATE: &str = "endpoint.create";
    pub const ENDPOINT_UPDATE: &str = "endpoint.update";
    pub const ENDPOINT_GET: &str = "endpoint.get";
    pub const ENDPOINT_LIST: &str = "endpoint.list";
    pub const ENDPOINT_DELETE: &str = "endpoint.delete";
    pub const WORKERS_LIST: &str = "workers.list";
    /// An endpoint's recent jobs (dashboards).
    pub const JOBS_LIST: &str = "jobs.list";
    /// Every live host (dashboards).
    pub const HOSTS_LIST: &str = "hosts.list";

    pub const ALL: [&str; 16] = [
        JOB_RUN,
        JOB_RUN_BATCH,
        JOB_STATUS,
        JOB_CANCEL,
        JOB_RETRY,
        JOB_STREAM,
        ENDPOINT_PURGE,
        ENDPOINT_HEALTH,
        ENDPOINT_CREATE,
        ENDPOINT_UPDATE,
        ENDPOINT_GET,
        ENDPOINT_LIST,
        ENDPOINT_DELETE,
        WORKERS_LIST,
        JOBS_LIST,
        HOSTS_LIST,
    ];
}

impl Names {
    /// A prefix is an id: letters, digits, `-` and `_`.
    pub fn new(prefix: &str) -> Result<Names, ApiError> {
        validate_id("subject prefix", prefix)?;
        Ok(Names { prefix: prefix.to_string(), upper: prefix.to_ascii_uppercase().replace('-', "_") })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    // ---- streams -------------------------------------------------------------------------

    pub fn jobs_stream(&self) -> String {
        format!("{}_JOBS", self.upper)
    }
    pub fn events_stream(&self) -> String {
        format!("{}_EVENTS", self.upper)
    }
    pub fn stream_stream(&self) -> String {
        format!("{}_STREAM", self.upper)
    }

    // ---- buckets -------------------------------------------------------------------------

    pub fn jobs_bucket(&self) -> String {
        format!("{}-jobs", self.prefix)
    }
    pub fn endpoints_bucket(&self) -> String {
        format!("{}-endpoints", self.prefix)
    }
    pub fn workers_bucket(&self) -> String {
        format!("{}-workers", self.prefix)
    }
    pub fn hosts_bucket(&self) -> String {
        format!("{}-hosts", self.prefix)
    }
    pub fn leases_bucket(&self) -> String {
        format!("{}-leases", self.prefix)
    }
    pub fn idempotency_bucket(&self) -> String {
        format!("{}-idempotency", self.prefix)
    }
    /// API keys of the HTTP gateway, by the SHA-256 of the key.
    pub fn keys_bucket(&self) -> String {
        format!("{}-keys", self.prefix)
    }
    /// The object store of payloads above what a NATS message carries.
    pub fn blobs_bucket(&self) -> String {
        format!("{}-blobs", self.prefix)
    }

    // ---- keys ----------------------------------------------------------------------------

    /// The `shoal-jobs` key of a job: `<endpoint>.<job id>`, so an endpoint's jobs are one
    /// key range (`<endpoint>.>`) that its endpoint actor can watch.
    pub fn job_key(&self, endpoint: &str, job_id: &str) -> String {
        format!("{endpoint}.{job_id}")
    }
    pub fn job_keys_of_endpoint(&self, endpoint: &str) -> String {
        format!("{endpoint}.>")
    }
    /// Finds a job when only its id is known.
    pub fn job_key_any_endpoint(&self, job_id: &str) -> String {
        format!("*.{job_id}")
    }
    pub fn worker_key(&self, endpoint: &str, worker_id: &str) -> String {
        format!("{endpoint}.{worker_id}")
    }
    /// The lease that makes one control replica the owner of an endpoint.
    pub fn lease_key(&self, endpoint: &str) -> String {
        format!("endpoint.{endpoint}")
    }
    pub fn lease_keys(&self) -> String {
        "endpoint.>".to_string()
    }
    /// A control replica's presence (the lease managers share endpoints among the live ones).
    pub fn replica_key(&self, replica: &str) -> String {
        format!("replica.{replica}")
    }
    pub fn replica_keys(&self) -> String {
        "replica.>".to_string()
    }
    pub fn idempotency_key(&self, endpoint: &str, key: &str) -> String {
        format!("{endpoint}.{key}")
    }
    /// The `shoal-keys` key of an API key: the hex SHA-256 of the key itself.
    pub fn api_key_key(&self, key_hash: &str) -> String {
        key_hash.to_string()
    }
    /// The `shoal-blobs` object holding a job's input: `<id>/input`, where `id` is the job id
    /// or, for inputs uploaded before the job exists, a fresh upload id.
    pub fn blob_input(&self, id: &str) -> String {
        format!("{id}/input")
    }
    /// The `shoal-blobs` object holding a job's output (or latest progress output).
    pub fn blob_output(&self, job_id: &str) -> String {
        format!("{job_id}/output")
    }

    // ---- subjects ------------------------------------------------------------------------

    /// Where the tokens of an older shoal waited, one subject per endpoint and priority:
    /// `<prefix>.jobs.<endpoint>.<priority>`. The queue consumers still take what waits there.
    pub fn job_subject(&self, endpoint: &str, priority: Priority) -> String {
        format!("{}.jobs.{endpoint}.{}", self.prefix, priority.as_str())
    }
    /// Where a queued job's delivery token waits: `<prefix>.jobs.<endpoint>.<priority>.<job id>`.
    /// A subject of its own, so that a job that is queued and has no record yet (the taker
    /// creates it) is found by its id.
    pub fn job_token_subject(&self, endpoint: &str, priority: Priority, job_id: &str) -> String {
        format!("{}.jobs.{endpoint}.{}.{job_id}", self.prefix, priority.as_str())
    }
    /// The tokens of one endpoint's queue of one priority (a queue consumer's filter).
    pub fn job_tokens_of_queue(&self, endpoint: &str, priority: Priority) -> String {
        format!("{}.jobs.{endpoint}.{}.*", self.prefix, priority.as_str())
    }
    /// Every token of an endpoint, of either priority and of either subject form.
    pub fn job_tokens_of_endpoint(&self, endpoint: &str) -> String {
        format!("{}.jobs.{endpoint}.>", self.prefix)
    }
    /// The token of one job, of either priority; `endpoint` `*` when it is not known.
    pub fn job_token_of(&self, endpoint: &str, job_id: &str) -> String {
        format!("{}.jobs.{endpoint}.*.{job_id}", self.prefix)
    }
    pub fn jobs_subjects(&self) -> String {
        format!("{}.jobs.>", self.prefix)
    }
    /// Partial outputs of a generator job, in order.
    pub fn stream_subject(&self, job_id: &str) -> String {
        format!("{}.stream.{job_id}", self.prefix)
    }
    pub fn stream_subjects(&self) -> String {
        format!("{}.stream.>", self.prefix)
    }
    /// `<prefix>.events.job.<endpoint>.<job id>.<state>`: a waiter subscribes to one job.
    pub fn job_event_subject(&self, endpoint: &str, job_id: &str, state: &str) -> String {
        format!("{}.events.job.{endpoint}.{job_id}.{state}", self.prefix)
    }
    pub fn job_events_of(&self, endpoint: &str, job_id: &str) -> String {
        format!("{}.events.job.{endpoint}.{job_id}.*", self.prefix)
    }
    /// Every job event (`<prefix>.events.job.>`).
    pub fn job_events_all(&self) -> String {
        format!("{}.events.job.>", self.prefix)
    }
    /// Every job's events of one state (a [`crate::job::JobState::event_token`]).
    pub fn job_events_in_state(&self, state: &str) -> String {
        format!("{}.events.job.*.*.{state}", self.prefix)
    }
    /// A job with a webhook reached a terminal state: `<prefix>.events.webhook_due.<endpoint>.<job
    /// id>` (the job event again, only for such jobs, so the webhook dispatchers read these and
    /// not every job's end; its own kind, so subscribers of `webhook` events get only outcomes).
    pub fn webhook_due_subject(&self, endpoint: &str, job_id: &str) -> String {
        format!("{}.events.webhook_due.{endpoint}.{job_id}", self.prefix)
    }
    /// Every [`Names::webhook_due_subject`].
    pub fn webhooks_due(&self) -> String {
        format!("{}.events.webhook_due.*.*", self.prefix)
    }
    /// `<prefix>.events.webhook.<endpoint>.<job id>.<outcome>` (`delivered`, `failed`).
    pub fn webhook_event_subject(&self, endpoint: &str, job_id: &str, outcome: &str) -> String {
        format!("{}.events.webhook.{endpoint}.{job_id}.{outcome}", self.prefix)
    }
    pub fn worker_event_subject(&self, endpoint: &str, state: &str) -> String {
        format!("{}.events.worker.{endpoint}.{state}", self.prefix)
    }
    pub fn host_event_subject(&self, host: &str, event: &str) -> String {
        format!("{}.events.host.{host}.{event}", self.prefix)
    }
    /// What `SHOAL_EVENTS` keeps: every worker, host and webhook event, and of a job its end
    /// (a terminal state, or its removal), whose event carries the job's whole timeline (the
    /// times of its [`crate::job::JobView`]). A job's queued and started events are live only:
    /// published on the same subjects to whoever listens (its endpoint's owner, waiters,
    /// dashboards), not stored — storing messages is most of the server's work per job.
    pub fn events_subjects(&self) -> Vec<String> {
        let mut subjects: Vec<String> =
            ["worker", "host", "webhook", "webhook_due"].iter().map(|kind| self.events_of_kind(kind)).collect();
        let ends = [JobState::Completed, JobState::Failed, JobState::Cancelled, JobState::TimedOut];
        subjects.extend(ends.iter().map(|s| self.job_events_in_state(s.event_token())));
        subjects.push(self.job_events_in_state(crate::events::REMOVED_EVENT_TOKEN));
        subjects
    }
    /// All events of one kind (`job`, `worker`, `host`).
    pub fn events_of_kind(&self, kind: &str) -> String {
        format!("{}.events.{kind}.>", self.prefix)
    }
    /// An api operation's subject: `<prefix>.v1.api.<op>` (see [`op`]).
    pub fn api_subject(&self, op: &str) -> String {
        format!("{}.{API_VERSION}.api.{op}", self.prefix)
    }
    /// Command to a host: stop a job a worker of this host runs (cancel, timeout).
    pub fn host_stop_job_subject(&self, host: &str) -> String {
        format!("{}.{API_VERSION}.host.{host}.job.stop", self.prefix)
    }

    /// Command to a host: start a worker (request/reply).
    pub fn host_start_worker_subject(&self, host: &str) -> String {
        format!("{}.{API_VERSION}.host.{host}.worker.start", self.prefix)
    }
    /// Command to a host: stop or drain a worker (request/reply).
    pub fn host_stop_worker_subject(&self, host: &str) -> String {
        format!("{}.{API_VERSION}.host.{host}.worker.stop", self.prefix)
    }
    /// Command to a host: drain it or resume it (request/reply, see [`crate::host::DrainHost`]).
    pub fn host_drain_subject(&self, host: &str) -> String {
        format!("{}.{API_VERSION}.host.{host}.drain", self.prefix)
    }
    /// Query to a host: a worker's log lines (request/reply, see [`crate::host::GetWorkerLogs`]).
    pub fn host_worker_logs_subject(&self, host: &str) -> String {
        format!("{}.{API_VERSION}.host.{host}.worker.logs", self.prefix)
    }
    /// Queries about an endpoint (`health`, `queued`, `waiting`) sent to the control replica
    /// owning it; each replica serves its own subjects, not one subscription per endpoint.
    pub fn owner_subject(&self, replica: &str, endpoint: &str, query: &str) -> String {
        format!("{}{endpoint}.{query}", self.owner_prefix(replica))
    }
    /// Everything before `<endpoint>.<query>` in a replica's owner subjects.
    pub fn owner_prefix(&self, replica: &str) -> String {
        format!("{}.{API_VERSION}.owner.{replica}.", self.prefix)
    }

    // ---- consumers -----------------------------------------------------------------------

    /// The durable pull consumer all workers of an endpoint share, one per priority.
    pub fn jobs_consumer(&self, endpoint: &str, priority: Priority) -> String {
        format!("jobs_{endpoint}_{}", priority.as_str())
    }
    /// The one cursor of a job's stream, shared by all readers (consume-on-read).
    pub fn stream_consumer(&self, job_id: &str) -> String {
        format!("stream_{job_id}")
    }
    /// The durable consumer of terminal job events all webhook dispatchers share, so each
    /// delivery is made by one control replica.
    pub fn webhooks_consumer(&self) -> String {
        "webhooks".to_string()
    }

    // ---- definitions ---------------------------------------------------------------------

    /// Every stream, with its limits. `retention_s` bounds how long partial outputs live;
    /// `events`, what the events stream keeps.
    pub fn streams(&self, retention_s: u64, events: EventLimits) -> Vec<StreamDef> {
        vec![
            StreamDef {
                name: self.jobs_stream(),
                subjects: vec![self.jobs_subjects()],
                retention: Retention::WorkQueue,
                max_age_s: 0,
                max_msgs: -1,
                // a job's token is its record until the take: read by id, and in batches
                allow_direct: true,
                description: "queued jobs, one message per delivery token",
            },
            StreamDef {
                name: self.events_stream(),
                subjects: self.events_subjects(),
                retention: Retention::Limits,
                max_age_s: events.max_age_s,
                max_msgs: events.max_msgs,
                allow_direct: false,
                description: "every worker and host state change, every job's end, webhook calls",
            },
            StreamDef {
                name: self.stream_stream(),
                subjects: vec![self.stream_subjects()],
                retention: Retention::WorkQueue,
                max_age_s: retention_s.max(60),
                max_msgs: -1,
                allow_direct: false,
                description: "partial outputs of generator jobs, consumed on read",
            },
        ]
    }

    pub fn buckets(&self, retention_s: u64, host_ttl_s: u64, lease_ttl_s: u64) -> Vec<BucketDef> {
        vec![
            BucketDef {
                bucket: self.jobs_bucket(),
                max_age_s: retention_s,
                history: 1,
                description: "job records: state, attempts, timestamps, output or error",
            },
            BucketDef {
                bucket: self.endpoints_bucket(),
                max_age_s: 0,
                history: 5,
                description: "endpoint specs, versioned",
            },
            BucketDef {
                bucket: self.workers_bucket(),
                max_age_s: 24 * 3600,
                history: 1,
                description: "worker records: state, host, version, current jobs",
            },
            BucketDef {
                bucket: self.hosts_bucket(),
                max_age_s: host_ttl_s,
                history: 1,
                description: "host inventories and heartbeats",
            },
            BucketDef {
                bucket: self.leases_bucket(),
                max_age_s: lease_ttl_s,
                history: 1,
                description: "endpoint leases (owner replica, epoch) and replica presence",
            },
            BucketDef {
                bucket: self.idempotency_bucket(),
                max_age_s: retention_s,
                history: 1,
                description: "idempotency key -> job id",
            },
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names_match_the_design() {
        let n = Names::default();
        assert_eq!(n.jobs_stream(), "SHOAL_JOBS");
        assert_eq!(n.events_stream(), "SHOAL_EVENTS");
        assert_eq!(n.stream_stream(), "SHOAL_STREAM");
        assert_eq!(n.jobs_bucket(), "shoal-jobs");
        assert_eq!(n.job_subject("ep1", Priority::Normal), "shoal.jobs.ep1.normal");
        assert_eq!(n.job_subject("ep1", Priority::Low), "shoal.jobs.ep1.low");
        assert_eq!(n.job_token_subject("ep1", Priority::Low, "j1"), "shoal.jobs.ep1.low.j1");
        assert_eq!(n.job_tokens_of_queue("ep1", Priority::Normal), "shoal.jobs.ep1.normal.*");
        assert_eq!(n.job_tokens_of_endpoint("ep1"), "shoal.jobs.ep1.>");
        assert_eq!(n.job_token_of("*", "j1"), "shoal.jobs.*.*.j1");
        assert_eq!(n.api_subject(op::JOB_RUN), "shoal.v1.api.job.run");
        assert_eq!(n.host_stop_job_subject("h1"), "shoal.v1.host.h1.job.stop");
        assert_eq!(n.host_worker_logs_subject("h1"), "shoal.v1.host.h1.worker.logs");
        assert_eq!(n.keys_bucket(), "shoal-keys");
        assert_eq!(n.blobs_bucket(), "shoal-blobs");
        assert_eq!(n.blob_input("j1"), "j1/input");
        assert_eq!(n.blob_output("j1"), "j1/output");
        assert_eq!(n.job_events_in_state("completed"), "shoal.events.job.*.*.completed");
        assert!(stored(&n, &n.webhook_event_subject("e", "j", "delivered")));
        assert_eq!(n.webhook_due_subject("e", "j"), "shoal.events.webhook_due.e.j");
        assert_eq!(n.webhooks_due(), "shoal.events.webhook_due.*.*");
    }

    /// Whether `SHOAL_EVENTS` captures `subject` (NATS wildcards: `*` one token, `>` the rest).
    fn stored(n: &Names, subject: &str) -> bool {
        fn matches(pattern: &str, subject: &str) -> bool {
            let (mut p, mut s) = (pattern.split('.'), subject.split('.'));
            loop {
                match (p.next(), s.next()) {
                    (Some(">"), Some(_)) => return true,
                    (Some("*"), Some(_)) => {}
                    (Some(a), Some(b)) if a == b => {}
                    (None, None) => return true,
                    _ => return false,
                }
            }
        }
        n.events_subjects().iter().any(|p| matches(p, subject))
    }

    #[test]
    fn the_events_stream_keeps_a_jobs_end_and_every_worker_host_and_webhook_event() {
        let n = Names::default();
        for state in JobState::ALL {
            let subject = n.job_event_subject("ep", "j1", state.event_token());
            assert_eq!(stored(&n, &subject), state.is_terminal(), "{subject}");
        }
        assert!(stored(&n, &n.job_event_subject("ep", "j1", crate::events::REMOVED_EVENT_TOKEN)));
        assert!(stored(&n, &n.worker_event_subject("ep", "Idle")));
        assert!(stored(&n, &n.host_event_subject("h1", "started")));
        assert!(stored(&n, &n.webhook_due_subject("ep", "j1")));
        assert!(!stored(&n, &n.job_subject("ep", Priority::Normal)), "tokens are another stream's");
        assert!(!stored(&Names::new("other").expect("valid"), &n.job_event_subject("ep", "j1", "completed")));
    }

    #[test]
    fn prefixes_isolate_installations() {
        let a = Names::new("t-17").expect("valid");
        assert_eq!(a.jobs_stream(), "T_17_JOBS");
        assert_eq!(a.jobs_bucket(), "t-17-jobs");
        assert!(a.jobs_subjects().starts_with("t-17."));
        assert!(Names::new("a.b").is_err());
        assert!(Names::new("*").is_err());
    }

    #[test]
    fn every_stream_subject_falls_under_its_prefix() {
        let n = Names::new("p").expect("valid");
        for s in n.streams(60, EventLimits { max_age_s: 3600, max_msgs: -1 }) {
            for subj in s.subjects {
                assert!(subj.starts_with("p."), "{subj}");
            }
        }
        for op in op::ALL {
            assert!(n.api_subject(op).starts_with("p.v1.api."));
        }
    }
}
