//! The worker actor: one per worker process or container. It launches the worker through the
//! runtime, takes jobs of its endpoint from JetStream when the worker asks (job-take through
//! the bridge), records results with compare-and-set, streams partial outputs, relays stops,
//! and reports its state. When the worker exits, the actor fails; its supervisor (the host
//! actor) restarts it under backoff. Jobs it held go back to the queue.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde_json::Value;
use shoal_protocol::api::stream_chunk_limit;
use shoal_protocol::codec::to_msgpack;
use shoal_protocol::endpoint::{EndpointSpec, INIT_TIMEOUT_ENV};
use shoal_protocol::events::WorkerEvent;
use shoal_protocol::job::{JobRecord, Priority, ReplyTo, WorkerJob};
use shoal_protocol::lifecycle::{self, Outcome, StartFound};
use shoal_protocol::worker::{StartPhases, WorkerRecord, WorkerState};

use super::HostConfig;
use super::ack::AckGuard;
use super::bridge::{Registered, Registry};
use super::take::{Queues, QueuesHandle, StartWrite, TakenJob, Taker, fetch_and_take, record_start};
use crate::clock::now_ms;
use crate::jobs::{Applied, JobStore, jobs_consumer};
use crate::nats::Nats;
use crate::runtime::{Exit, IdentityHook, Launch, Runtime, StartWorkerError, WorkerHandle};

/// Why a worker actor stopped without failing; the supervisor restarts it at once.
pub const STOP_REFRESH: &str = "refresh";
/// How often the progress of a long start (an image pull) updates the worker's reason.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// Idle/Running flips closer together than this are written to the worker record (and sent
/// as events) once, with the latest state, when this much has passed since the last write:
/// a busy worker writes its record a few times a second, not twice per job.
const FLIP_COALESCE: Duration = Duration::from_millis(50);
/// How long a worker killed for its init timeout is given to exit (and so to tell its last
/// output) before the actor fails without it.
const INIT_EXIT_WAIT: Duration = Duration::from_secs(5);

pub struct WorkerActor;

pub struct WorkerArgs {
    pub nats: Nats,
    pub host_id: String,
    pub worker_id: String,
    pub spec: EndpointSpec,
    pub runtime: Arc<dyn Runtime>,
    pub registry: Registry,
    pub bridge_url: String,
    pub config: Arc<HostConfig>,
    pub restarts: u32,
    pub failures: u32,
    /// UUIDs of the GPUs given to this worker.
    pub gpus: Vec<String>,
    /// The supervising host actor, told when a worker started after failures runs a job to
    /// its end (it is healthy again).
    pub host: Option<ActorRef<super::host_actor::HostMsg>>,
}

/// Why a worker's post was not stored.
#[derive(Debug, Clone, PartialEq)]
pub enum PostError {
    /// Storing it failed (NATS unavailable): the worker may post it again.
    Unavailable(String),
    /// It can never be stored as posted.
    TooLarge(String),
}

impl From<String> for PostError {
    fn from(message: String) -> PostError {
        PostError::Unavailable(message)
    }
}

pub enum WorkerMsg {
    /// job-take (batch when `max` > 1): long-poll up to `hold`.
    Take {
        max: usize,
        hold: Duration,
        reply: RpcReplyPort<Vec<WorkerJob>>,
    },
    /// The fetch task took these jobs for a waiting job-take and hands them to the worker
    /// itself, right after this message (so the worker's job-done for one of them always
    /// comes after it).
    Taken {
        jobs: Vec<TakenJob>,
    },
    /// The job-take these jobs were taken for was gone when they were handed over: the worker
    /// never got them, so they go back to the queue.
    Unhanded {
        job_ids: Vec<String>,
    },
    /// job-done: a result or a progress update.
    Done {
        job_id: String,
        body: Value,
        reply: RpcReplyPort<Result<(), String>>,
    },
    /// job-stream: one partial output.
    Stream {
        job_id: String,
        chunk: Value,
        reply: RpcReplyPort<Result<(), PostError>>,
    },
    /// ping: the jobs the worker holds.
    Ping {
        job_ids: Vec<String>,
        unhealthy: Option<String>,
    },
    /// job-stop poll: the jobs the worker must stop.
    GetStops(RpcReplyPort<Vec<String>>),
    /// A job this worker runs was cancelled or timed out.
    StopJob {
        job_id: String,
        reason: String,
    },
    /// Finish the current jobs, take no more, then stop (rolling update).
    Drain {
        reason: String,
    },
    Tick,
    /// The runtime finished starting the worker (its start runs apart from the actor, so a
    /// long image pull blocks nothing).
    Launched(Result<WorkerHandle, StartWorkerError>),
    /// A step of a long start, for the reason of the Initializing state.
    Progress(String),
    Exited(Exit),
    /// Write the worker record if an Idle/Running flip was held back.
    Flush,
    /// Record the starts of these jobs, handed over before their starts were written, that
    /// still run (`host.start_record_ms` after their take).
    RecordStarts {
        job_ids: Vec<String>,
    },
    /// A job's start is in its record now, at this revision.
    StartRecorded {
        job_id: String,
        record: Box<JobRecord>,
        revision: u64,
    },
}

struct Inflight {
    ack: AckGuard,
    record: JobRecord,
    /// The revision of `record` as this worker's take wrote it; 0 while its start is not
    /// recorded (the record does not exist yet: `take::record_start`).
    revision: u64,
    last_progress: Instant,
    /// The submitter waiting for the result, answered when it is recorded.
    reply: Option<ReplyTo>,
    /// The `worker` span, in the job's trace: from the hand-off to the worker to its result.
    span: tracing::Span,
}

pub struct WorkerState_ {
    args: WorkerArgs,
    store: JobStore,
    /// None while the runtime is starting the worker.
    handle: Option<WorkerHandle>,
    /// How this start went; the runtime's phases, then the first ping and job.
    start: StartPhases,
    launched_at: Instant,
    last_progress: Option<Instant>,
    /// Another worker id the bridge knows this worker by (a reused warm container's).
    alias: Option<String>,
    consumers: QueuesHandle,
    state: WorkerState,
    reason: Option<String>,
    inflight: HashMap<String, Inflight>,
    /// Jobs told to stop, and when.
    stops: HashMap<String, Instant>,
    last_ping: Option<(Instant, HashSet<String>)>,
    started_at_ms: u64,
    jobs_done: u64,
    /// When the worker must have asked for its first job (set once it runs; the endpoint's init
    /// timeout).
    init_deadline: Option<Instant>,
    /// It did not ask in time and was killed: why, and when (its exit fails the actor).
    init_timed_out: Option<(String, Instant)>,
    /// How long after its launch began it made its first job-take (a container may ask before
    /// its launch is reported, when whether it started warm is not known yet).
    ready_after: Option<Duration>,
    /// The worker asked to be replaced (`stopPod`), or was killed to stop a job: take nothing more.
    draining: bool,
    killed_for_stop: bool,
    /// How many jobs the last worker record listed.
    reported_jobs: usize,
    /// When the worker record was last written, and whether a flip waits for [`WorkerMsg::Flush`].
    last_report: Option<Instant>,
    flush_due: bool,
    myself: ActorRef<WorkerMsg>,
}

impl Actor for WorkerActor {
    type Msg = WorkerMsg;
    type State = WorkerState_;
    type Arguments = WorkerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<WorkerMsg>,
        args: WorkerArgs,
    ) -> Result<WorkerState_, ActorProcessingErr> {
        let ack_wait = Duration::from_millis(args.config.ack_wait_ms);
        let normal = jobs_consumer(&args.nats, &args.spec.id, Priority::Normal, ack_wait).await?;
        let low = jobs_consumer(&args.nats, &args.spec.id, Priority::Low, ack_wait).await?;
        let token = uuid::Uuid::new_v4().simple().to_string();
        args.registry.register(
            &args.worker_id,
            Registered { endpoint: args.spec.id.clone(), token: token.clone(), actor: myself.clone() },
        );
        let (progress_tx, mut progress_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let on_identity = {
            let (registry, endpoint, me) = (args.registry.clone(), args.spec.id.clone(), myself.clone());
            IdentityHook::new(move |identity| {
                let reg = Registered { endpoint: endpoint.clone(), token: identity.token.clone(), actor: me.clone() };
                registry.register(&identity.worker_id, reg);
            })
        };
        let launch = Launch {
            worker_id: args.worker_id.clone(),
            host_id: args.host_id.clone(),
            spec: args.spec.clone(),
            env: worker_env(&args, &token),
            log_file: super::logs::log_file(&args.config.state_dir, &args.spec.id, &args.worker_id),
            workdir: args.config.workdir.clone(),
            gpus: args.gpus.clone(),
            progress: Some(progress_tx),
            on_identity: Some(on_identity),
        };
        let me = myself.clone();
        tokio::spawn(async move {
            while let Some(line) = progress_rx.recv().await {
                if me.cast(WorkerMsg::Progress(line)).is_err() {
                    break;
                }
            }
        });
        // started apart from the actor: when the actor is gone by the time it is launched,
        // the undelivered handle is dropped, which kills the worker
        let (runtime, me) = (args.runtime.clone(), myself.clone());
        tokio::spawn(async move {
            let launched = runtime.start(launch).await;
            let _ = me.cast(WorkerMsg::Launched(launched));
        });
        let tick = Duration::from_millis((args.config.ack_wait_ms / 4).clamp(50, 1000));
        // on whole periods, like every tick of this kind: a host with many workers wakes once
        crate::clock::tick_aligned(myself.clone(), tick, || WorkerMsg::Tick);
        let store = JobStore::new(args.nats.clone());
        let mut st = WorkerState_ {
            store,
            handle: None,
            start: StartPhases::default(),
            launched_at: Instant::now(),
            last_progress: None,
            alias: None,
            consumers: Queues::open(normal, low, &args.nats),
            state: WorkerState::Initializing,
            reason: Some("starting".into()),
            inflight: HashMap::new(),
            stops: HashMap::new(),
            last_ping: None,
            started_at_ms: now_ms(),
            jobs_done: 0,
            init_deadline: None,
            init_timed_out: None,
            ready_after: None,
            draining: false,
            killed_for_stop: false,
            reported_jobs: 0,
            last_report: None,
            flush_due: false,
            myself: myself.clone(),
            args,
        };
        st.report(None).await;
        Ok(st)
    }

    async fn handle(
        &self,
        myself: ActorRef<WorkerMsg>,
        msg: WorkerMsg,
        st: &mut WorkerState_,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            WorkerMsg::Take { max, hold, reply } => st.on_take(&myself, max, hold, reply).await,
            WorkerMsg::Taken { jobs } => st.on_taken(&myself, jobs).await,
            WorkerMsg::Unhanded { job_ids } => st.on_unhanded(&myself, job_ids).await,
            WorkerMsg::Done { job_id, body, reply } => st.on_done(&myself, job_id, body, reply).await,
            WorkerMsg::Stream { job_id, chunk, reply } => st.on_stream(job_id, chunk, reply),
            WorkerMsg::Ping { job_ids, unhealthy } => st.on_ping(job_ids, unhealthy).await,
            WorkerMsg::GetStops(reply) => st.on_get_stops(reply),
            WorkerMsg::StopJob { job_id, reason } => st.on_stop_job(job_id, reason).await,
            WorkerMsg::Drain { reason } => st.on_drain(&myself, reason).await,
            WorkerMsg::Tick => {
                st.on_tick().await;
                st.check_init()?;
            }
            WorkerMsg::Launched(Ok(handle)) => st.on_launched(&myself, handle).await,
            WorkerMsg::Launched(Err(e)) => return Err(Box::new(e)),
            WorkerMsg::Progress(line) => st.on_progress(line).await,
            WorkerMsg::Exited(exit) => return st.on_exited(&myself, exit),
            WorkerMsg::Flush => st.on_flush().await,
            WorkerMsg::RecordStarts { job_ids } => st.on_record_starts(&myself, job_ids),
            WorkerMsg::StartRecorded { job_id, record, revision } => st.on_start_recorded(job_id, *record, revision),
        }
        Ok(())
    }

    async fn post_stop(&self, myself: ActorRef<WorkerMsg>, st: &mut WorkerState_) -> Result<(), ActorProcessingErr> {
        st.args.registry.unregister(&st.args.worker_id, &myself);
        if let Some(alias) = &st.alias {
            st.args.registry.unregister(alias, &myself);
        }
        if let Some(handle) = st.handle.as_mut() {
            handle.kill();
        }
        // post_stop runs only on a deliberate stop (a failed worker skips it and its jobs come
        // back by redelivery, counted): jobs it held go back to the queue without using one of
        // their attempts, then redeliver
        let me = st.args.worker_id.clone();
        for (id, inflight) in st.inflight.drain() {
            if inflight.ack.start_pending() {
                // its start was never recorded: the queue still holds it as it was
                inflight.ack.release().await;
                continue;
            }
            let attempt = inflight.record.attempts;
            let lost = st
                .store
                .transition(&st.args.spec.id, &id, |r| {
                    if r.worker_id.as_deref() != Some(me.as_str()) || r.attempts != attempt {
                        return Err(lifecycle::TransitionError::NotRunning("held by another worker"));
                    }
                    lifecycle::release(r, &me)
                })
                .await;
            match lost {
                Ok(Applied::Changed { record, .. }) if record.state.is_terminal() => inflight.ack.ack().await,
                _ => inflight.ack.nak().await,
            }
        }
        Ok(())
    }
}

fn worker_env(args: &WorkerArgs, token: &str) -> BTreeMap<String, String> {
    let base = format!("{}/v2/{}", args.bridge_url.trim_end_matches('/'), args.spec.id);
    let w = &args.worker_id;
    let gpu = args.spec.gpu_types.first().map(|g| g.replace(' ', "+")).unwrap_or_else(|| "none".into());
    BTreeMap::from([
        ("RUNPOD_WEBHOOK_GET_JOB".into(), format!("{base}/job-take/{w}?gpu={gpu}")),
        ("RUNPOD_WEBHOOK_POST_OUTPUT".into(), format!("{base}/job-done/{w}/$ID?gpu={gpu}")),
        ("RUNPOD_WEBHOOK_POST_STREAM".into(), format!("{base}/job-stream/{w}/$ID?gpu={gpu}")),
        ("RUNPOD_WEBHOOK_PING".into(), format!("{base}/ping/{w}")),
        ("RUNPOD_PING_INTERVAL".into(), args.config.ping_interval_ms.to_string()),
        ("RUNPOD_POD_ID".into(), w.clone()),
        ("RUNPOD_AI_API_KEY".into(), token.to_string()),
        ("RUNPOD_ENDPOINT_ID".into(), args.spec.id.clone()),
        ("RUNPOD_SKIP_AUTO_SYSTEM_CHECKS".into(), "true".into()),
        ("RUNPOD_SKIP_GPU_CHECK".into(), "true".into()),
        ("RUNPOD_POD_HOSTNAME".into(), args.host_id.clone()),
        ("RUNPOD_GPU_COUNT".into(), args.spec.gpu_count.to_string()),
        ("CUDA_VISIBLE_DEVICES".into(), args.gpus.join(",")),
        ("NVIDIA_VISIBLE_DEVICES".into(), if args.gpus.is_empty() { "void".into() } else { args.gpus.join(",") }),
    ])
}

/// Reads a job-done body the way RunPod does (shared/reference/runpod.md §3.7).
pub fn outcome_of(body: &Value) -> Outcome {
    let output = body.get("output").cloned();
    let stop_pod = body.get("stopPod").and_then(Value::as_bool).unwrap_or(false);
    if body.get("status").and_then(Value::as_str) == Some("IN_PROGRESS") {
        return Outcome::Progress(output.unwrap_or(Value::Null));
    }
    let error = match body.get("error") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::Bool(false)) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => Some(other.to_string()),
    };
    match error {
        Some(error) => Outcome::Failed { error, output, stop_pod },
        None => Outcome::Completed { output, stop_pod },
    }
}

impl WorkerState_ {
    fn endpoint(&self) -> &str {
        &self.args.spec.id
    }

    /// Writes the worker record and publishes a worker event. The write is sent, not awaited
    /// (the job path must not wait on it): it leaves on the shared connection before anything
    /// the host actor writes about this worker after it stops, so the order holds.
    async fn report(&mut self, backoff_ms: Option<u64>) {
        let now = now_ms();
        self.reported_jobs = self.inflight.len();
        self.last_report = Some(Instant::now());
        self.flush_due = false;
        let record = WorkerRecord {
            id: self.args.worker_id.clone(),
            endpoint: self.endpoint().to_string(),
            host: self.args.host_id.clone(),
            state: self.state,
            reason: self.reason.clone(),
            spec_version: self.args.spec.version,
            current_jobs: self.inflight.keys().cloned().collect(),
            runtime_ref: self.handle.as_ref().map(|h| h.runtime_ref.clone()),
            restarts: self.args.restarts,
            failures: self.args.failures,
            started_at_ms: self.started_at_ms,
            updated_at_ms: now,
            jobs_done: self.jobs_done,
            start: Some(self.start.clone()),
        };
        send_worker_record(&self.args.nats, &record).await;
        let event = WorkerEvent {
            worker_id: record.id.clone(),
            endpoint: record.endpoint.clone(),
            host: record.host.clone(),
            state: record.state,
            reason: record.reason.clone(),
            restarts: record.restarts,
            failures: record.failures,
            backoff_ms,
            at_ms: now,
            start: record.start.clone(),
        };
        let subject = self.args.nats.names.worker_event_subject(&record.endpoint, record.state.as_str());
        self.args.nats.publish_event(subject, &event).await;
    }

    async fn set_state(&mut self, state: WorkerState, reason: Option<String>) {
        if self.state != state || self.reason != reason {
            self.state = state;
            self.reason = reason;
            self.report(None).await;
        }
    }

    /// Idle or Running, by the jobs it holds; the record follows every change of those jobs,
    /// Idle/Running flips at most every [`FLIP_COALESCE`] (the latest state wins).
    async fn settle(&mut self) {
        if self.draining && self.state == WorkerState::Outdated {
            return;
        }
        let state = if self.inflight.is_empty() { WorkerState::Idle } else { WorkerState::Running };
        if self.state == state && self.reason.is_none() && self.reported_jobs == self.inflight.len() {
            return;
        }
        let flip = self.reason.is_none() && matches!(self.state, WorkerState::Idle | WorkerState::Running);
        self.state = state;
        self.reason = None;
        let since = self.last_report.map(|t| t.elapsed());
        match since {
            Some(since) if flip && since < FLIP_COALESCE => {
                if !self.flush_due {
                    self.flush_due = true;
                    self.myself.send_after(FLIP_COALESCE - since, || WorkerMsg::Flush);
                }
            }
            _ => self.report(None).await,
        }
    }

    async fn on_flush(&mut self) {
        if self.flush_due {
            self.report(None).await;
        }
    }

    async fn on_take(
        &mut self,
        myself: &ActorRef<WorkerMsg>,
        max: usize,
        hold: Duration,
        reply: RpcReplyPort<Vec<WorkerJob>>,
    ) {
        if self.state == WorkerState::Initializing {
            if self.ready_after.is_none() {
                self.ready_after = Some(self.launched_at.elapsed());
                self.count_start();
            }
            self.settle().await;
        }
        if self.draining {
            // hold, then nothing: a draining worker is never refused outright (it would re-poll at once)
            tokio::spawn(async move {
                tokio::time::sleep(hold).await;
                let _ = reply.send(vec![]);
            });
            return;
        }
        let queues = self.consumers.queues();
        let store = self.store.clone();
        let (worker, host) = (self.args.worker_id.clone(), self.args.host_id.clone());
        let defer_start = self.args.config.start_record_ms > 0;
        let me = myself.clone();
        // boxed, as the result's write above (~5 KB)
        tokio::spawn(Box::pin(async move {
            let taker = Taker { worker: &worker, host: &host, defer_start };
            let jobs = fetch_and_take(&queues, &store, &taker, max, hold).await;
            if jobs.is_empty() {
                let _ = reply.send(vec![]);
                return;
            }
            // the jobs go to the actor first, then straight to the waiting job-take from here
            // (not through the actor: one hand-off between tasks fewer before the worker has them)
            let handed: Vec<WorkerJob> = jobs.iter().map(|t| t.job.clone()).collect();
            if let Err(ractor::MessagingErr::SendErr(WorkerMsg::Taken { jobs })) = me.cast(WorkerMsg::Taken { jobs }) {
                // the worker stopped meanwhile: give the jobs back without using an attempt
                tracing::debug!(worker_id = %worker, jobs = jobs.len(), "worker stopped while taking jobs; releasing them");
                release_taken(&store, &worker, jobs);
                return;
            }
            if let Err(ractor::MessagingErr::SendErr(handed)) = reply.send(handed) {
                // the worker gave up its request: undo the takes, without counting them
                let _ = me.cast(WorkerMsg::Unhanded { job_ids: handed.into_iter().map(|j| j.id).collect() });
            }
        }));
    }

    async fn on_taken(&mut self, myself: &ActorRef<WorkerMsg>, jobs: Vec<TakenJob>) {
        if !jobs.is_empty() && self.start.first_job_ms.is_none() {
            self.start.first_job_ms = Some(self.launched_at.elapsed().as_millis() as u64);
        }
        let unrecorded: Vec<String> = jobs.iter().filter(|t| t.ack.start_pending()).map(|t| t.job.id.clone()).collect();
        if !unrecorded.is_empty() {
            let me = myself.clone();
            let after = Duration::from_millis(self.args.config.start_record_ms);
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                let _ = me.cast(WorkerMsg::RecordStarts { job_ids: unrecorded });
            });
        }
        for t in jobs {
            let (endpoint_id, worker_id) = (&t.record.endpoint, &self.args.worker_id);
            let span = tracing::debug_span!(parent: &t.span, "worker", %endpoint_id, %worker_id, job_id = %t.job.id);
            let (ack, record, revision, reply) = (t.ack, t.record, t.revision, t.reply);
            let inflight = Inflight { ack, record, revision, last_progress: Instant::now(), reply, span };
            self.inflight.insert(t.job.id.clone(), inflight);
        }
        self.settle().await;
    }

    /// Records the starts of jobs that still run and whose starts are not recorded yet, each in
    /// a task of its own; what each found comes back as a message.
    fn on_record_starts(&mut self, myself: &ActorRef<WorkerMsg>, job_ids: Vec<String>) {
        for id in job_ids {
            let Some(inflight) = self.inflight.get(&id).filter(|i| i.ack.start_pending()) else { continue };
            let (store, me, record) = (self.store.clone(), myself.clone(), inflight.record.clone());
            let span = tracing::debug_span!(parent: &inflight.span, "start");
            tokio::spawn(tracing::Instrument::instrument(
                async move {
                    let job_id = record.id.clone();
                    let msg = match record_start(&store, &record).await {
                        Ok(StartWrite::Written(revision)) => {
                            WorkerMsg::StartRecorded { job_id, record: Box::new(record), revision }
                        }
                        Ok(StartWrite::Found(StartFound::Adopt, current, revision)) => {
                            WorkerMsg::StartRecorded { job_id, record: current, revision }
                        }
                        Ok(StartWrite::Found(StartFound::Stop(reason), ..)) => WorkerMsg::StopJob { job_id, reason },
                        Ok(StartWrite::Found(StartFound::Leave, current, _)) => {
                            tracing::debug!(%job_id, state = current.state.as_str(), worker = ?current.worker_id, "the job's record moved on; its result settles it");
                            return;
                        }
                        Ok(StartWrite::Gone) => return,
                        Err(e) => {
                            // tried again in a second; a nak or the result records it otherwise
                            tracing::warn!(%job_id, error = %e, "cannot record the job's start; trying again");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            WorkerMsg::RecordStarts { job_ids: vec![job_id] }
                        }
                    };
                    let _ = me.cast(msg);
                },
                span,
            ));
        }
    }

    fn on_start_recorded(&mut self, job_id: String, record: JobRecord, revision: u64) {
        if let Some(inflight) = self.inflight.get_mut(&job_id).filter(|i| i.ack.start_pending()) {
            inflight.ack.start_recorded();
            inflight.record = record;
            inflight.revision = revision;
        }
    }

    async fn on_unhanded(&mut self, myself: &ActorRef<WorkerMsg>, job_ids: Vec<String>) {
        for id in job_ids {
            if let Some(i) = self.inflight.remove(&id) {
                release_one(&self.store, &self.args.worker_id, i.record, i.revision, i.ack);
            }
        }
        if self.draining && self.inflight.is_empty() {
            myself.stop(Some(STOP_REFRESH.into()));
            return;
        }
        self.settle().await;
    }

    async fn on_done(
        &mut self,
        myself: &ActorRef<WorkerMsg>,
        job_id: String,
        body: Value,
        reply: RpcReplyPort<Result<(), String>>,
    ) {
        let outcome = outcome_of(&body);
        let progress = matches!(outcome, Outcome::Progress(_));
        let stop_pod =
            matches!(outcome, Outcome::Completed { stop_pod: true, .. } | Outcome::Failed { stop_pod: true, .. });
        let inflight = if progress { None } else { self.inflight.remove(&job_id) };
        // a progress update of a job whose start is not recorded yet creates the record, as
        // taken, with the progress
        let unrecorded = match (progress, self.inflight.get(&job_id)) {
            (true, Some(i)) if i.ack.start_pending() => Some((i.record.clone(), 0)),
            _ => None,
        };
        if shoal_protocol::ids::validate_id("job id", &job_id).is_err() {
            let _ = reply.send(Ok(()));
            return;
        }
        let store = self.store.clone();
        let endpoint = self.endpoint().to_string();
        let worker = self.args.worker_id.clone();
        let blob_name = self.args.nats.names.blob_output(&job_id);
        // the record as this worker's take wrote it: the compare-and-set needs no read unless
        // it changed since (cancelled, timed out, a progress update)
        let known = inflight.as_ref().map(|i| (i.record.clone(), i.revision)).or(unrecorded);
        let held = inflight.is_some();
        let waiting = inflight.as_ref().and_then(|i| i.reply.clone());
        let span =
            inflight.as_ref().map_or_else(tracing::Span::none, |i| tracing::debug_span!(parent: &i.span, "result"));
        let done = async move {
            // an output too large to inline goes to the object store; the record references it
            let applied = match store.blobs().offload_outcome(&store, &endpoint, &job_id, &blob_name, outcome).await {
                Ok((outcome, output_ref)) => {
                    store
                        .transition_answering(&endpoint, &job_id, known, waiting.as_ref(), |r| {
                            let mut next = lifecycle::finish(r, outcome.clone(), now_ms())?;
                            next.output_ref = output_ref.clone();
                            Ok(next)
                        })
                        .await
                }
                Err(e) => Err(e),
            };
            let result = match applied {
                Ok(Applied::Refused { reason, .. }) => {
                    tracing::debug!(worker_id = %worker, job_id = %job_id, %reason, "result dropped");
                    Ok(())
                }
                Ok(_) => Ok(()),
                Err(e) => Err(e.to_string()),
            };
            // the worker waits for the reply, not for the ack: the record is written
            let recorded = result.is_ok();
            let _ = reply.send(result);
            if let Some(inflight) = inflight {
                if recorded {
                    inflight.ack.ack().await;
                } else {
                    inflight.ack.nak().await;
                }
            }
        };
        // boxed: the result's write is a large future (~8 KB), and a task holding it inline is
        // copied whole when spawned and again when it finishes, once per job
        tokio::spawn(tracing::Instrument::instrument(Box::pin(done), span));
        if !progress {
            if held && self.args.failures > 0 {
                // it ran a job to its end: healthy, the failures before this start are forgotten
                self.args.failures = 0;
                if let Some(host) = &self.args.host {
                    let _ = host.cast(super::host_actor::HostMsg::Healthy(self.args.worker_id.clone()));
                }
            }
            self.jobs_done += 1;
            if stop_pod {
                self.draining = true;
            }
            if self.draining && self.inflight.is_empty() {
                myself.stop(Some(STOP_REFRESH.into()));
                return;
            }
            self.settle().await;
        }
    }

    fn on_stream(&mut self, job_id: String, chunk: Value, reply: RpcReplyPort<Result<(), PostError>>) {
        if !self.inflight.contains_key(&job_id) {
            let _ = reply.send(Ok(())); // cancelled or finished: dropped
            return;
        }
        let nats = self.args.nats.clone();
        tokio::spawn(async move {
            let result = async {
                let bytes = to_msgpack(&chunk).map_err(|e| PostError::Unavailable(e.to_string()))?;
                let limit = stream_chunk_limit(nats.client.server_info().max_payload);
                if bytes.len() > limit {
                    return Err(PostError::TooLarge(format!(
                        "a stream chunk is at most {limit} bytes (as MessagePack: NATS' max_payload less room for \
                         the reply that reads it); this one is {}: yield smaller chunks",
                        bytes.len()
                    )));
                }
                let ack = nats
                    .js
                    .publish(nats.names.stream_subject(&job_id), Bytes::from(bytes))
                    .await
                    .map_err(|e| PostError::Unavailable(e.to_string()))?;
                ack.await.map_err(|e| PostError::Unavailable(e.to_string())).map(|_| ())
            }
            .await;
            let _ = reply.send(result);
        });
    }

    async fn on_ping(&mut self, job_ids: Vec<String>, unhealthy: Option<String>) {
        let listed: HashSet<String> = job_ids.into_iter().collect();
        self.stops.retain(|id, _| listed.contains(id) || self.inflight.contains_key(id));
        self.last_ping = Some((Instant::now(), listed));
        if let Some(reason) = unhealthy {
            self.set_state(WorkerState::Unhealthy, Some(reason)).await;
        } else if self.start.first_ping_ms.is_none() {
            self.start.first_ping_ms = Some(self.launched_at.elapsed().as_millis() as u64);
            self.report(None).await;
        }
    }

    async fn on_drain(&mut self, myself: &ActorRef<WorkerMsg>, reason: String) {
        self.draining = true;
        if self.inflight.is_empty() {
            myself.stop(Some(reason));
        } else {
            self.set_state(WorkerState::Outdated, Some(format!("draining: {reason}"))).await;
        }
    }

    fn on_get_stops(&mut self, reply: RpcReplyPort<Vec<String>>) {
        let _ = reply.send(self.stops.keys().cloned().collect());
    }

    async fn on_stop_job(&mut self, job_id: String, reason: String) {
        if let Some(inflight) = self.inflight.remove(&job_id) {
            tracing::info!(worker_id = %self.args.worker_id, job_id = %job_id, %reason, "stopping job");
            inflight.ack.ack().await; // its record is terminal already
            self.stops.insert(job_id, Instant::now());
            self.settle().await;
        }
    }

    async fn on_tick(&mut self) {
        let every = Duration::from_millis(self.args.config.ack_wait_ms / 3);
        for inflight in self.inflight.values_mut() {
            if inflight.last_progress.elapsed() >= every {
                inflight.ack.progress().await;
                inflight.last_progress = Instant::now();
            }
        }
        // a stopped job still listed in the worker's pings past the grace: only a kill stops it
        let grace = Duration::from_millis(self.args.config.stop_grace_ms);
        let stuck = self.stops.iter().any(|(id, since)| {
            since.elapsed() >= grace
                && match &self.last_ping {
                    Some((at, listed)) if at > since => listed.contains(id),
                    _ => true,
                }
        });
        if stuck && !self.killed_for_stop {
            tracing::warn!(worker_id = %self.args.worker_id, "worker did not stop a job within the grace; killing it");
            self.killed_for_stop = true;
            self.draining = true;
            if let Some(handle) = self.handle.as_mut() {
                handle.kill();
            }
        }
    }

    /// The worker runs: watch for its exit, let the bridge know it by the identity it speaks
    /// with, and report how the start went.
    async fn on_launched(&mut self, myself: &ActorRef<WorkerMsg>, mut handle: WorkerHandle) {
        if let Some(exit) = handle.take_exit() {
            let me = myself.clone();
            tokio::spawn(async move {
                if let Ok(exit) = exit.await {
                    let _ = me.cast(WorkerMsg::Exited(exit));
                }
            });
        }
        if let Some(identity) = handle.bridge_identity.clone() {
            let reg = Registered { endpoint: self.args.spec.id.clone(), token: identity.token, actor: myself.clone() };
            self.args.registry.register(&identity.worker_id, reg);
            if identity.worker_id != self.args.worker_id {
                self.alias = Some(identity.worker_id);
            }
        }
        let first_ping = self.start.first_ping_ms;
        let first_job = self.start.first_job_ms;
        self.start = StartPhases { first_ping_ms: first_ping, first_job_ms: first_job, ..handle.start.clone() };
        tracing::info!(
            worker_id = %self.args.worker_id,
            endpoint_id = %self.args.spec.id,
            runtime_ref = %handle.runtime_ref,
            start = %self.start.summary(),
            "worker launched"
        );
        self.handle = Some(handle);
        self.count_start();
        if self.state == WorkerState::Initializing {
            let timeout = self.args.spec.init_timeout_ms();
            self.init_deadline = Some(Instant::now() + Duration::from_millis(timeout));
            self.reason = Some(format!(
                "started, waiting for its first request (init timeout {})",
                shoal_protocol::human_ms(timeout)
            ));
        }
        self.report(None).await;
    }

    async fn on_progress(&mut self, line: String) {
        if self.handle.is_some() || self.state != WorkerState::Initializing {
            return;
        }
        if self.last_progress.is_some_and(|t| t.elapsed() < PROGRESS_EVERY) {
            return;
        }
        self.last_progress = Some(Instant::now());
        self.set_state(WorkerState::Initializing, Some(line)).await;
    }

    /// Counts the start in the metrics once both are known: when the worker first asked for a
    /// job, and (from the runtime) whether it started warm. Each becomes known once (the first
    /// take, the launch), and this runs right then, so the second of them counts it, once.
    fn count_start(&self) {
        if let (Some(after), Some(_)) = (self.ready_after, &self.handle) {
            crate::metrics::worker_ready(&self.args.spec.id, self.start.warm, after.as_secs_f64());
        }
    }

    /// A worker still Initializing at its init deadline is killed; its exit (or, should none
    /// come, a few seconds) fails the actor as an init timeout, which makes it Unhealthy.
    fn check_init(&mut self) -> Result<(), ActorProcessingErr> {
        if let Some((reason, killed_at)) = &self.init_timed_out {
            if killed_at.elapsed() >= INIT_EXIT_WAIT {
                return Err(Box::new(StartWorkerError::InitTimeout(reason.clone())));
            }
            return Ok(());
        }
        let due = self.init_deadline.is_some_and(|d| Instant::now() >= d);
        if !due || self.state != WorkerState::Initializing || self.draining {
            return Ok(());
        }
        let timeout = self.args.spec.init_timeout_ms();
        let reason = format!(
            "initialization timed out: the worker did not ask for a job within {} of its start \
             (a longer start needs {INIT_TIMEOUT_ENV}, in seconds, in the endpoint's env)",
            shoal_protocol::human_ms(timeout)
        );
        tracing::warn!(worker_id = %self.args.worker_id, endpoint_id = %self.args.spec.id, timeout_ms = timeout, "worker initialization timed out; killing it");
        if let Some(handle) = self.handle.as_mut() {
            handle.kill();
        }
        self.init_timed_out = Some((reason, Instant::now()));
        Ok(())
    }

    fn on_exited(&mut self, myself: &ActorRef<WorkerMsg>, exit: Exit) -> Result<(), ActorProcessingErr> {
        if let Some((mut reason, _)) = self.init_timed_out.take() {
            if !exit.log_tail.is_empty() {
                reason.push_str("; its last output: ");
                reason.push_str(&exit.log_tail);
            }
            return Err(Box::new(StartWorkerError::InitTimeout(reason)));
        }
        if self.killed_for_stop || (self.draining && exit.code == Some(0)) {
            myself.stop(Some(STOP_REFRESH.into()));
            return Ok(());
        }
        let mut reason = format!("worker process {}", exit.description);
        if !exit.log_tail.is_empty() {
            reason.push_str(": ");
            reason.push_str(&exit.log_tail);
        }
        Err(reason.into())
    }
}

/// Undoes takes that no worker will run: each job back to the queue without using one of its
/// attempts (from the record as the take wrote it), its token redelivered.
fn release_taken(store: &JobStore, worker: &str, jobs: Vec<TakenJob>) {
    for t in jobs {
        release_one(store, worker, t.record, t.revision, t.ack);
    }
}

/// Undoes one take (see [`release_taken`]), in a task of its own.
fn release_one(store: &JobStore, worker: &str, record: JobRecord, revision: u64, ack: AckGuard) {
    let (store, worker) = (store.clone(), worker.to_string());
    tokio::spawn(async move {
        if ack.start_pending() {
            // the take was never recorded: the queue holds the job as it was
            ack.release().await;
            return;
        }
        let (endpoint, id) = (record.endpoint.clone(), record.id.clone());
        let _ =
            store.transition_from(&endpoint, &id, Some((record, revision)), |r| lifecycle::release(r, &worker)).await;
        ack.nak().await;
    });
}

/// Sends a worker record to its bucket without waiting for the write's ack (a failure is
/// logged when the ack comes back).
async fn send_worker_record(nats: &Nats, record: &WorkerRecord) {
    let bytes = match to_msgpack(record) {
        Ok(bytes) => bytes,
        Err(e) => return tracing::warn!(error = %e, "cannot encode worker record"),
    };
    let store = &nats.workers;
    let key = nats.names.worker_key(&record.endpoint, &record.id);
    let subject = format!("{}{key}", store.put_prefix.as_deref().unwrap_or(&store.prefix));
    match nats.js.publish(subject, Bytes::from(bytes)).await {
        Ok(ack) => {
            let worker_id = record.id.clone();
            tokio::spawn(async move {
                if let Err(e) = ack.await {
                    tracing::warn!(worker_id = %worker_id, error = %e, "cannot write worker record");
                }
            });
        }
        Err(e) => tracing::warn!(worker_id = %record.id, error = %e, "cannot write worker record"),
    }
}

pub async fn put_worker_record(nats: &Nats, record: &WorkerRecord) {
    match to_msgpack(record) {
        Ok(bytes) => {
            let key = nats.names.worker_key(&record.endpoint, &record.id);
            if let Err(e) = nats.workers.put(key, Bytes::from(bytes)).await {
                tracing::warn!(worker_id = %record.id, error = %e, "cannot write worker record");
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot encode worker record"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn job_done_bodies_read_as_runpod_reads_them() {
        assert_eq!(
            outcome_of(&json!({"output": {"a": 1}})),
            Outcome::Completed { output: Some(json!({"a": 1})), stop_pod: false }
        );
        assert_eq!(outcome_of(&json!({})), Outcome::Completed { output: None, stop_pod: false });
        assert_eq!(
            outcome_of(&json!({"error": "nope"})),
            Outcome::Failed { error: "nope".into(), output: None, stop_pod: false }
        );
        assert_eq!(
            outcome_of(&json!({"output": {"ok": true}, "stopPod": true})),
            Outcome::Completed { output: Some(json!({"ok": true})), stop_pod: true }
        );
        assert_eq!(outcome_of(&json!({"status": "IN_PROGRESS", "output": "half"})), Outcome::Progress(json!("half")));
        // a non-string error is kept as its JSON text; an empty one is no error
        assert_eq!(
            outcome_of(&json!({"error": {"code": 3}, "output": 1})),
            Outcome::Failed { error: "{\"code\":3}".into(), output: Some(json!(1)), stop_pod: false }
        );
        assert_eq!(
            outcome_of(&json!({"error": "", "output": 2})),
            Outcome::Completed { output: Some(json!(2)), stop_pod: false }
        );
    }
}
