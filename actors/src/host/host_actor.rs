//! The host actor: publishes the host's inventory (GPUs, who holds them) and heartbeat, runs
//! the commands of the endpoints' scalers (start a worker, stop or drain one; refused when they
//! carry an epoch older than one already seen for the endpoint, so a control replica that lost
//! its lease cannot act), relays job stops to worker actors, and supervises them: a worker
//! actor that fails is restarted under the [`BackoffPolicy`](super::backoff::BackoffPolicy),
//! and reported Unhealthy after repeated failures while it keeps being retried.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures::StreamExt;
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use shoal_protocol::codec::{from_msgpack, to_msgpack};
use shoal_protocol::endpoint::EndpointSpec;
use shoal_protocol::events::{HostEvent, WorkerEvent};
use shoal_protocol::host::{CommandReply, DrainHost, Gpu, HostRecord, StartWorker, StopJob, StopWorker};
use shoal_protocol::worker::{WorkerRecord, WorkerState};

use super::HostConfig;
use super::bridge::Registry;
use super::gpus::GpuInventory;
use super::worker_actor::{STOP_REFRESH, WorkerActor, WorkerArgs, WorkerMsg, put_worker_record};
use crate::clock::now_ms;
use crate::nats::Nats;
use crate::runtime::{Runtime, StartWorkerError};

pub struct HostActor;

pub struct HostArgs {
    pub nats: Nats,
    pub id: String,
    pub bridge_url: String,
    pub registry: Registry,
    pub runtime: Arc<dyn Runtime>,
    pub config: HostConfig,
}

pub enum HostMsg {
    StartWorker(Box<StartWorker>, RpcReplyPort<CommandReply>),
    StopWorker(StopWorker, RpcReplyPort<CommandReply>),
    /// An operator drains the host (or resumes it).
    Drain(DrainHost, RpcReplyPort<CommandReply>),
    EndpointDeleted(String),
    /// An endpoint's spec is now at this version: warm workers of older ones are useless.
    EndpointVersion(String, u64),
    /// Start (again) the worker of this slot.
    Restart(String),
    /// This slot's worker, started after failures, ran a job to its end: it is healthy, and a
    /// later failure starts the backoff again from its base (RunPod: a worker that takes a job
    /// during a retry is healthy again). Asking for a job is not enough: a worker that crashes
    /// on every job it takes stays a crash loop.
    Healthy(String),
    StopJob(StopJob),
    Heartbeat,
    /// Who holds what changed: publish the host record (once for a run of changes).
    Publish,
    Shutdown(RpcReplyPort<()>),
}

/// A worker the host wants running, across the restarts of its actor.
struct Slot {
    endpoint: String,
    spec: EndpointSpec,
    /// UUIDs of the GPUs given to it.
    gpus: Vec<String>,
    actor: Option<ActorRef<WorkerMsg>>,
    failures: u32,
    /// When the current run of failures began (none: the worker has not failed since its last
    /// stable run).
    failing_since: Option<Instant>,
    restarts: u32,
    started: Instant,
    wanted: bool,
}

pub struct HostState {
    nats: Nats,
    id: String,
    bridge_url: String,
    registry: Registry,
    runtime: Arc<dyn Runtime>,
    config: Arc<HostConfig>,
    slots: HashMap<String, Slot>,
    gpus: Vec<Gpu>,
    inventory: GpuInventory,
    /// Highest lease epoch seen per endpoint.
    epochs: HashMap<String, u64>,
    started_at_ms: u64,
    shutting_down: bool,
    /// Drained: its workers finish their jobs and stop, and it starts no new worker.
    draining: bool,
    /// The driver's CUDA version (the config's, else NVML's).
    cuda_version: Option<String>,
    /// A [`HostMsg::Publish`] is in the mailbox.
    publish_queued: bool,
    myself: ActorRef<HostMsg>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Actor for HostActor {
    type Msg = HostMsg;
    type State = HostState;
    type Arguments = HostArgs;

    async fn pre_start(&self, myself: ActorRef<HostMsg>, args: HostArgs) -> Result<HostState, ActorProcessingErr> {
        let mut tasks = Vec::new();
        // endpoint specs: current values, then every change
        let mut watch = args.nats.endpoints.watch_with_history(">").await?;
        let me = myself.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(Ok(entry)) = watch.next().await {
                let msg = match entry.operation {
                    kv::Operation::Put => match from_msgpack::<EndpointSpec>(&entry.value) {
                        Ok(spec) => HostMsg::EndpointVersion(entry.key.clone(), spec.version),
                        Err(_) => continue,
                    },
                    _ => HostMsg::EndpointDeleted(entry.key.clone()),
                };
                if me.cast(msg).is_err() {
                    break;
                }
            }
        }));
        // stop commands from the control plane
        let mut stops = args.nats.client.subscribe(args.nats.names.host_stop_job_subject(&args.id)).await?;
        let me = myself.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(msg) = stops.next().await {
                if let Ok(stop) = from_msgpack::<StopJob>(&msg.payload)
                    && me.cast(HostMsg::StopJob(stop)).is_err()
                {
                    break;
                }
            }
        }));
        // commands from the endpoints' scalers (request/reply)
        tasks.push(
            serve_commands(
                &args.nats,
                &args.nats.names.host_start_worker_subject(&args.id),
                myself.clone(),
                |bytes, reply| from_msgpack::<StartWorker>(bytes).map(|c| HostMsg::StartWorker(Box::new(c), reply)),
            )
            .await?,
        );
        tasks.push(
            serve_commands(
                &args.nats,
                &args.nats.names.host_stop_worker_subject(&args.id),
                myself.clone(),
                |bytes, reply| from_msgpack::<StopWorker>(bytes).map(|c| HostMsg::StopWorker(c, reply)),
            )
            .await?,
        );
        tasks.push(
            serve_commands(
                &args.nats,
                &args.nats.names.host_drain_subject(&args.id),
                myself.clone(),
                |bytes, reply| from_msgpack::<DrainHost>(bytes).map(|c| HostMsg::Drain(c, reply)),
            )
            .await?,
        );
        // worker logs, asked by `shoal workers logs`
        tasks
            .push(super::logs::serve(&args.nats, &args.id, args.runtime.clone(), args.config.state_dir.clone()).await?);
        myself.send_interval(Duration::from_millis(args.config.heartbeat_ms), || HostMsg::Heartbeat);
        let inventory = GpuInventory::open(&args.config);
        let gpus = inventory.read(&[]).await;
        let cuda_version = args.config.cuda_version.clone().or_else(|| inventory.cuda_version());
        let st = HostState {
            nats: args.nats,
            id: args.id,
            bridge_url: args.bridge_url,
            registry: args.registry,
            runtime: args.runtime,
            config: Arc::new(args.config),
            slots: HashMap::new(),
            gpus,
            inventory,
            epochs: HashMap::new(),
            started_at_ms: now_ms(),
            shutting_down: false,
            draining: false,
            cuda_version,
            publish_queued: false,
            myself: myself.clone(),
            tasks,
        };
        st.heartbeat().await;
        let event = HostEvent { host: st.id.clone(), event: "started".into(), at_ms: now_ms() };
        if !st.gpus.is_empty() {
            let names: Vec<&str> = st.gpus.iter().map(|g| g.name.as_str()).collect();
            tracing::info!(host_id = %st.id, gpus = %names.join(", "), "GPU inventory");
        }
        st.nats.publish_event(st.nats.names.host_event_subject(&st.id, "started"), &event).await;
        tracing::info!(host_id = %st.id, bridge = %st.bridge_url, runtime = st.runtime.name(), "host started");
        Ok(st)
    }

    async fn handle(
        &self,
        myself: ActorRef<HostMsg>,
        msg: HostMsg,
        st: &mut HostState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            HostMsg::StartWorker(cmd, reply) => {
                let result = st.on_start_worker(&myself, *cmd).await;
                let _ = reply.send(command_reply(result));
            }
            HostMsg::StopWorker(cmd, reply) => {
                let result = st.on_stop_worker(cmd).await;
                let _ = reply.send(command_reply(result));
            }
            HostMsg::Drain(cmd, reply) => {
                st.on_drain(cmd.draining).await;
                let _ = reply.send(command_reply(Ok(())));
            }
            HostMsg::EndpointDeleted(id) => st.on_endpoint_deleted(&id).await,
            HostMsg::EndpointVersion(id, version) => st.runtime.discard_warm(&id, Some(version)).await,
            HostMsg::Restart(worker_id) => st.on_restart(&myself, worker_id).await,
            HostMsg::Healthy(worker_id) => st.on_healthy(&worker_id),
            HostMsg::StopJob(stop) => st.on_stop_job(stop),
            HostMsg::Heartbeat => {
                st.gpus = st.inventory.read(&st.gpus).await;
                st.heartbeat().await
            }
            HostMsg::Publish => {
                st.publish_queued = false;
                if !st.shutting_down {
                    st.heartbeat().await
                }
            }
            HostMsg::Shutdown(reply) => {
                st.on_shutdown().await;
                let _ = reply.send(());
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<HostMsg>,
        evt: SupervisionEvent,
        st: &mut HostState,
    ) -> Result<(), ActorProcessingErr> {
        match evt {
            SupervisionEvent::ActorFailed(cell, err) => {
                // a start that cannot succeed as things are (a bad image): Unhealthy at once
                let permanent = err.downcast_ref::<StartWorkerError>().is_some_and(StartWorkerError::is_permanent);
                st.on_worker_ended(&myself, cell, Some(Failure { reason: err.to_string(), permanent })).await
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                let failure = match reason.as_deref() {
                    Some(STOP_REFRESH) | None => None,
                    Some(other) => Some(Failure { reason: other.to_string(), permanent: false }),
                };
                st.on_worker_ended(&myself, cell, failure).await
            }
            _ => {}
        }
        Ok(())
    }

    async fn post_stop(&self, _myself: ActorRef<HostMsg>, st: &mut HostState) -> Result<(), ActorProcessingErr> {
        for t in &st.tasks {
            t.abort();
        }
        Ok(())
    }
}

impl HostState {
    async fn heartbeat(&self) {
        let mut warm: Vec<String> =
            self.runtime.warm().into_iter().map(|w| format!("{}@{}", w.endpoint, w.version)).collect();
        warm.sort();
        warm.dedup();
        let record = HostRecord {
            id: self.id.clone(),
            runtime: self.runtime.name().to_string(),
            labels: self.config.labels.clone(),
            gpus: self.gpus.clone(),
            bridge_url: self.bridge_url.clone(),
            workers: self.slots.len() as u32,
            max_workers: self.config.max_workers,
            warm,
            started_at_ms: self.started_at_ms,
            heartbeat_at_ms: now_ms(),
            draining: self.draining,
            cuda_version: self.cuda_version.clone(),
        };
        if let Ok(bytes) = to_msgpack(&record)
            && let Err(e) = self.nats.hosts.put(&self.id, Bytes::from(bytes)).await
        {
            tracing::warn!(host_id = %self.id, error = %e, "heartbeat failed");
        }
    }

    /// Publishes the host record after the commands already waiting are handled, so a burst
    /// of starts or stops writes it once instead of once each.
    fn publish_soon(&mut self) {
        if !self.publish_queued {
            self.publish_queued = true;
            let _ = self.myself.cast(HostMsg::Publish);
        }
    }

    /// Refuses commands older than the newest lease epoch seen for the endpoint.
    fn check_epoch(&mut self, endpoint: &str, epoch: u64) -> Result<(), String> {
        let seen = self.epochs.entry(endpoint.to_string()).or_insert(0);
        if epoch < *seen {
            return Err(format!(
                "stale epoch {epoch} for endpoint {endpoint}: epoch {seen} was seen; its owner changed"
            ));
        }
        *seen = epoch;
        Ok(())
    }

    async fn on_start_worker(&mut self, myself: &ActorRef<HostMsg>, cmd: StartWorker) -> Result<(), String> {
        if self.shutting_down {
            return Err("host is shutting down".into());
        }
        if self.draining {
            return Err(format!("host {} is draining (`shoal hosts resume {}` undoes it)", self.id, self.id));
        }
        self.check_epoch(&cmd.spec.id, cmd.epoch)?;
        shoal_protocol::ids::validate_id("worker id", &cmd.worker_id).map_err(|e| e.message)?;
        if self.slots.contains_key(&cmd.worker_id) {
            return Ok(()); // a retried command: already running
        }
        if cmd.spec.command.is_none() && self.runtime.name() == "process" {
            return Err(format!("endpoint {} has no command; the process runtime cannot run it", cmd.spec.id));
        }
        let gpus = match &cmd.gpu_type {
            Some(kind) => {
                let is_free = |g: &Gpu| g.healthy && g.worker_id.is_none() && &g.name == kind;
                // the GPUs of a warm container of this version first, so it can be reused
                let warm_set = self.runtime.warm().into_iter().find(|w| {
                    w.endpoint == cmd.spec.id
                        && w.version == cmd.spec.version
                        && w.gpus.len() == cmd.spec.gpu_count as usize
                        && w.gpus.iter().all(|u| self.gpus.iter().any(|g| &g.uuid == u && is_free(g)))
                });
                let free: Vec<usize> = match warm_set {
                    Some(w) => (0..self.gpus.len()).filter(|i| w.gpus.contains(&self.gpus[*i].uuid)).collect(),
                    None => (0..self.gpus.len())
                        .filter(|i| is_free(&self.gpus[*i]))
                        .take(cmd.spec.gpu_count as usize)
                        .collect(),
                };
                if free.len() < cmd.spec.gpu_count as usize {
                    return Err(format!(
                        "no capacity: {} free GPU(s) of type {kind}, {} needed",
                        free.len(),
                        cmd.spec.gpu_count
                    ));
                }
                free.iter()
                    .map(|i| {
                        self.gpus[*i].worker_id = Some(cmd.worker_id.clone());
                        self.gpus[*i].uuid.clone()
                    })
                    .collect()
            }
            None => {
                if self.config.max_workers > 0 && self.slots.len() as u32 >= self.config.max_workers {
                    return Err(format!(
                        "no capacity: this host runs its maximum of {} workers",
                        self.config.max_workers
                    ));
                }
                vec![]
            }
        };
        self.slots.insert(
            cmd.worker_id.clone(),
            Slot {
                endpoint: cmd.spec.id.clone(),
                spec: cmd.spec,
                gpus,
                actor: None,
                failures: 0,
                restarts: 0,
                started: Instant::now(),
                failing_since: None,
                wanted: true,
            },
        );
        self.spawn_worker(myself, &cmd.worker_id).await;
        self.publish_soon();
        Ok(())
    }

    async fn on_stop_worker(&mut self, cmd: StopWorker) -> Result<(), String> {
        self.check_epoch(&cmd.endpoint, cmd.epoch)?;
        let Some(slot) = self.slots.get_mut(&cmd.worker_id) else {
            return Ok(()); // already gone
        };
        slot.wanted = false;
        match slot.actor.clone() {
            Some(actor) if cmd.drain => {
                let _ = actor.cast(WorkerMsg::Drain { reason: cmd.reason });
            }
            Some(actor) => actor.stop(Some(cmd.reason)),
            None => self.remove_slot(&cmd.worker_id).await,
        }
        Ok(())
    }

    /// Drained: every worker finishes the jobs it holds, takes no more and stops (an idle one at
    /// once; one waiting out a restart's backoff is forgotten), and no worker starts here until
    /// resumed; the endpoints' scalers start their replacements elsewhere. Resumed: workers may
    /// be placed here again (those drained are not brought back).
    async fn on_drain(&mut self, draining: bool) {
        if self.draining != draining {
            tracing::info!(host_id = %self.id, draining, workers = self.slots.len(), "host {}", if draining { "draining" } else { "resumed" });
        }
        self.draining = draining;
        if draining {
            let reason = format!("host {} is draining", self.id);
            let mut idle_slots = Vec::new();
            for (id, slot) in self.slots.iter_mut() {
                slot.wanted = false;
                match &slot.actor {
                    Some(actor) => {
                        let _ = actor.cast(WorkerMsg::Drain { reason: reason.clone() });
                    }
                    None => idle_slots.push(id.clone()),
                }
            }
            for id in idle_slots {
                self.remove_slot(&id).await;
            }
        }
        self.heartbeat().await;
    }

    async fn on_endpoint_deleted(&mut self, id: &str) {
        for slot in self.slots.values_mut().filter(|s| s.endpoint == id) {
            slot.wanted = false;
            if let Some(actor) = &slot.actor {
                actor.stop(Some("endpoint deleted".into()));
            }
        }
        self.runtime.discard_warm(id, None).await;
    }

    /// Forgets a worker for good: frees its GPUs and records it Stopped.
    async fn remove_slot(&mut self, worker_id: &str) {
        let Some(slot) = self.slots.remove(worker_id) else { return };
        for g in self.gpus.iter_mut().filter(|g| g.worker_id.as_deref() == Some(worker_id)) {
            g.worker_id = None;
        }
        put_worker_record(&self.nats, &stopped_record(worker_id, &slot, &self.id)).await;
        self.publish_soon();
    }

    async fn spawn_worker(&mut self, myself: &ActorRef<HostMsg>, worker_id: &str) {
        let Some(slot) = self.slots.get(worker_id) else { return };
        let spec = slot.spec.clone();
        let gpus = slot.gpus.clone();
        let args = WorkerArgs {
            gpus,
            nats: self.nats.clone(),
            host_id: self.id.clone(),
            worker_id: worker_id.to_string(),
            spec,
            runtime: self.runtime.clone(),
            registry: self.registry.clone(),
            bridge_url: self.bridge_url.clone(),
            config: self.config.clone(),
            restarts: slot.restarts,
            failures: slot.failures,
            host: Some(myself.clone()),
        };
        let spawned = crate::spawn::spawn_linked(WorkerActor, args, myself.get_cell()).await;
        let Some(slot) = self.slots.get_mut(worker_id) else { return };
        slot.started = Instant::now();
        match spawned {
            Ok((actor, _)) => slot.actor = Some(actor),
            Err(e) => {
                // it never ran: same treatment as a crash
                slot.actor = None;
                let reason = format!("cannot start worker: {e}");
                self.schedule_restart(myself, worker_id, Some(Failure { reason, permanent: false })).await;
            }
        }
    }

    fn on_healthy(&mut self, worker_id: &str) {
        if let Some(slot) = self.slots.get_mut(worker_id) {
            slot.failures = 0;
            slot.failing_since = None;
        }
    }

    async fn on_restart(&mut self, myself: &ActorRef<HostMsg>, worker_id: String) {
        match self.slots.get(&worker_id) {
            Some(s) if s.wanted && s.actor.is_none() && !self.shutting_down => {
                self.spawn_worker(myself, &worker_id).await
            }
            _ => {}
        }
    }

    async fn on_worker_ended(&mut self, myself: &ActorRef<HostMsg>, cell: ActorCell, failure: Option<Failure>) {
        let Some(worker_id) = self
            .slots
            .iter()
            .find(|(_, s)| s.actor.as_ref().is_some_and(|a| a.get_id() == cell.get_id()))
            .map(|(k, _)| k.clone())
        else {
            return;
        };
        if let Some(slot) = self.slots.get_mut(&worker_id) {
            slot.actor = None;
        }
        self.schedule_restart(myself, &worker_id, failure).await;
    }

    /// A worker ended. Unwanted: forget it. Wanted: restart it, at once after a clean stop
    /// (refresh, version change), under backoff after a failure.
    async fn schedule_restart(&mut self, myself: &ActorRef<HostMsg>, worker_id: &str, failure: Option<Failure>) {
        let policy = self.config.backoff.clone();
        let (host, names) = (self.id.clone(), self.nats.names.clone());
        if self.slots.get(worker_id).is_some_and(|s| !s.wanted) || self.shutting_down {
            self.remove_slot(worker_id).await;
            return;
        }
        let Some(slot) = self.slots.get_mut(worker_id) else { return };
        let Some(Failure { reason, permanent }) = failure else {
            slot.restarts += 1;
            let _ = myself.cast(HostMsg::Restart(worker_id.to_string()));
            return;
        };
        let decision =
            policy.on_failure(slot.failures, slot.started.elapsed().as_millis() as u64, rand::random::<f64>());
        slot.failures = decision.failures;
        if decision.failures == 1 || slot.failing_since.is_none() {
            slot.failing_since = Some(Instant::now());
        }
        let failing_for = slot.failing_since.map_or(0, |t| t.elapsed().as_millis() as u64);
        // what the record and the event say, and when the restart comes (none: given up)
        let (state, reason, restart_in) = if policy.gives_up(decision.failures, failing_for) {
            // no restart any more: the record says so until the endpoint stops wanting this
            // worker (its scaler stops unhealthy workers first) or replaces it (a new version)
            tracing::warn!(worker_id, endpoint_id = %slot.endpoint, failures = decision.failures, "worker failed for too long; not restarting it");
            let reason = format!(
                "gave up restarting it after {} of failures ({} in a row; host.backoff.give_up_after_ms); the last: \
                 {reason}. A new version of the endpoint replaces it",
                shoal_protocol::human_ms(failing_for),
                decision.failures
            );
            (WorkerState::Unhealthy, reason, None)
        } else {
            tracing::warn!(worker_id, endpoint_id = %slot.endpoint, failures = decision.failures, delay_ms = decision.delay_ms, "worker failed");
            slot.restarts += 1;
            let state =
                if decision.unhealthy || permanent { WorkerState::Unhealthy } else { WorkerState::Initializing };
            let reason = if permanent && !decision.unhealthy {
                format!("{reason} (retrying in {} ms)", decision.delay_ms)
            } else if decision.unhealthy {
                format!(
                    "crash loop ({} failures in a row), retrying in {} ms: {reason}",
                    decision.failures, decision.delay_ms
                )
            } else {
                format!("restarting in {} ms after: {reason}", decision.delay_ms)
            };
            (state, reason, Some(decision.delay_ms))
        };
        let record = slot_record(worker_id, slot, &host, state, reason.clone());
        let event = WorkerEvent {
            worker_id: worker_id.to_string(),
            endpoint: slot.endpoint.clone(),
            host,
            state,
            reason: Some(reason),
            restarts: slot.restarts,
            failures: slot.failures,
            backoff_ms: restart_in,
            at_ms: now_ms(),
            start: None,
        };
        put_worker_record(&self.nats, &record).await;
        self.nats.publish_event(names.worker_event_subject(&record.endpoint, state.as_str()), &event).await;
        if let Some(delay_ms) = restart_in {
            myself.send_after(Duration::from_millis(delay_ms), {
                let id = worker_id.to_string();
                move || HostMsg::Restart(id)
            });
        }
    }

    fn on_stop_job(&mut self, stop: StopJob) {
        match self.slots.get(&stop.worker_id).and_then(|s| s.actor.as_ref()) {
            Some(actor) => {
                let _ = actor.cast(WorkerMsg::StopJob { job_id: stop.job_id, reason: stop.reason });
            }
            None => {
                tracing::debug!(worker_id = %stop.worker_id, job_id = %stop.job_id, "stop for a worker not running here")
            }
        }
    }

    async fn on_shutdown(&mut self) {
        self.shutting_down = true;
        let actors: Vec<ActorRef<WorkerMsg>> = self
            .slots
            .values_mut()
            .filter_map(|s| {
                s.wanted = false;
                s.actor.clone()
            })
            .collect();
        for actor in actors {
            let _ = actor.stop_and_wait(None, Some(Duration::from_secs(10))).await;
        }
        let ids: Vec<String> = self.slots.keys().cloned().collect();
        for id in ids {
            self.remove_slot(&id).await;
        }
        self.runtime.shutdown().await;
        let _ = self.nats.hosts.delete(&self.id).await;
        let event = HostEvent { host: self.id.clone(), event: "stopped".into(), at_ms: now_ms() };
        self.nats.publish_event(self.nats.names.host_event_subject(&self.id, "stopped"), &event).await;
    }
}

fn stopped_record(worker_id: &str, slot: &Slot, host: &str) -> WorkerRecord {
    slot_record(worker_id, slot, host, WorkerState::Stopped, "stopped".into())
}

/// The record of a slot's worker between incarnations (restarting, unhealthy, stopped).
fn slot_record(worker_id: &str, slot: &Slot, host: &str, state: WorkerState, reason: String) -> WorkerRecord {
    let now = now_ms();
    WorkerRecord {
        id: worker_id.to_string(),
        endpoint: slot.endpoint.clone(),
        host: host.to_string(),
        state,
        reason: Some(reason),
        spec_version: slot.spec.version,
        current_jobs: vec![],
        runtime_ref: None,
        restarts: slot.restarts,
        failures: slot.failures,
        started_at_ms: now,
        updated_at_ms: now,
        jobs_done: 0,
        start: None,
    }
}

/// Why a worker actor failed; a permanent failure makes it Unhealthy at once.
struct Failure {
    reason: String,
    permanent: bool,
}

fn command_reply(result: Result<(), String>) -> CommandReply {
    match result {
        Ok(()) => CommandReply { ok: true, error: None },
        Err(e) => CommandReply { ok: false, error: Some(e) },
    }
}

/// Serves one command subject: decodes each request, asks the host actor, replies.
async fn serve_commands<F>(
    nats: &Nats,
    subject: &str,
    actor: ActorRef<HostMsg>,
    make: F,
) -> Result<tokio::task::JoinHandle<()>, async_nats::SubscribeError>
where
    F: Fn(&[u8], RpcReplyPort<CommandReply>) -> Result<HostMsg, shoal_protocol::codec::CodecError> + Send + 'static,
{
    let mut sub = nats.client.subscribe(subject.to_string()).await?;
    let client = nats.client.clone();
    Ok(tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let Some(reply_to) = msg.reply.clone() else { continue };
            let (tx, rx) = tokio::sync::oneshot::channel();
            let port: RpcReplyPort<CommandReply> = tx.into();
            let answer = match make(&msg.payload, port) {
                Ok(cmd) => {
                    if actor.cast(cmd).is_err() {
                        break;
                    }
                    rx.await.unwrap_or(CommandReply { ok: false, error: Some("host is stopping".into()) })
                }
                Err(e) => CommandReply { ok: false, error: Some(format!("bad command: {e}")) },
            };
            if let Ok(bytes) = to_msgpack(&answer) {
                let _ = client.publish(reply_to, Bytes::from(bytes)).await;
            }
        }
    }))
}
