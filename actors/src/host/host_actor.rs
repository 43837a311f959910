//! The host actor: publishes the host's inventory and heartbeat, keeps each endpoint's
//! workers running (until the scaler exists: `workers_min` of every endpoint), relays stop
//! commands to worker actors, and supervises them: a worker actor that fails is restarted
//! under the [`BackoffPolicy`](super::backoff::BackoffPolicy), and reported Unhealthy after
//! repeated failures while it keeps being retried.

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
use shoal_protocol::host::{HostRecord, StopJob};
use shoal_protocol::worker::{WorkerRecord, WorkerState};

use super::HostConfig;
use super::bridge::Registry;
use super::worker_actor::{STOP_REFRESH, WorkerActor, WorkerArgs, WorkerMsg, put_worker_record};
use crate::clock::now_ms;
use crate::nats::Nats;
use crate::runtime::Runtime;

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
    EndpointPut(Box<EndpointSpec>),
    EndpointDeleted(String),
    /// Start (again) the worker of this slot.
    Restart(String),
    StopJob(StopJob),
    Heartbeat,
    Shutdown(RpcReplyPort<()>),
}

/// A worker the host wants running, across the restarts of its actor.
struct Slot {
    endpoint: String,
    actor: Option<ActorRef<WorkerMsg>>,
    failures: u32,
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
    specs: HashMap<String, EndpointSpec>,
    slots: HashMap<String, Slot>,
    started_at_ms: u64,
    shutting_down: bool,
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
                        Ok(spec) => HostMsg::EndpointPut(Box::new(spec)),
                        Err(e) => {
                            tracing::warn!(key = %entry.key, error = %e, "undecodable endpoint spec ignored");
                            continue;
                        }
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
        myself.send_interval(Duration::from_millis(args.config.heartbeat_ms), || HostMsg::Heartbeat);
        let st = HostState {
            nats: args.nats,
            id: args.id,
            bridge_url: args.bridge_url,
            registry: args.registry,
            runtime: args.runtime,
            config: Arc::new(args.config),
            specs: HashMap::new(),
            slots: HashMap::new(),
            started_at_ms: now_ms(),
            shutting_down: false,
            tasks,
        };
        st.heartbeat().await;
        let event = HostEvent { host: st.id.clone(), event: "started".into(), at_ms: now_ms() };
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
            HostMsg::EndpointPut(spec) => st.on_endpoint_put(&myself, *spec).await,
            HostMsg::EndpointDeleted(id) => st.on_endpoint_deleted(&id),
            HostMsg::Restart(worker_id) => st.on_restart(&myself, worker_id).await,
            HostMsg::StopJob(stop) => st.on_stop_job(stop),
            HostMsg::Heartbeat => st.heartbeat().await,
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
            SupervisionEvent::ActorFailed(cell, err) => st.on_worker_ended(&myself, cell, Some(err.to_string())).await,
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                let failure = match reason.as_deref() {
                    Some(STOP_REFRESH) | None => None,
                    Some(other) => Some(other.to_string()),
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
        let record = HostRecord {
            id: self.id.clone(),
            runtime: self.runtime.name().to_string(),
            labels: Default::default(),
            gpus: vec![],
            bridge_url: self.bridge_url.clone(),
            workers: self.slots.values().filter(|s| s.actor.is_some()).count() as u32,
            max_workers: 0,
            warm: vec![],
            started_at_ms: self.started_at_ms,
            heartbeat_at_ms: now_ms(),
        };
        if let Ok(bytes) = to_msgpack(&record)
            && let Err(e) = self.nats.hosts.put(&self.id, Bytes::from(bytes)).await
        {
            tracing::warn!(host_id = %self.id, error = %e, "heartbeat failed");
        }
    }

    async fn on_endpoint_put(&mut self, myself: &ActorRef<HostMsg>, spec: EndpointSpec) {
        let changed = self.specs.get(&spec.id).is_some_and(|old| old.version != spec.version);
        let id = spec.id.clone();
        self.specs.insert(id.clone(), spec);
        if changed {
            // a new version: replace this endpoint's workers (their jobs go back to the queue)
            for slot in self.slots.values_mut().filter(|s| s.endpoint == id) {
                slot.failures = 0;
                if let Some(actor) = &slot.actor {
                    actor.stop(Some(STOP_REFRESH.into()));
                }
            }
        }
        self.reconcile(myself, &id).await;
    }

    fn on_endpoint_deleted(&mut self, id: &str) {
        self.specs.remove(id);
        for slot in self.slots.values_mut().filter(|s| s.endpoint == id) {
            slot.wanted = false;
            if let Some(actor) = &slot.actor {
                actor.stop(None);
            }
        }
        self.slots.retain(|_, s| s.wanted || s.actor.is_some());
    }

    /// Until the scaler exists, a host keeps `workers_min` workers of every endpoint.
    async fn reconcile(&mut self, myself: &ActorRef<HostMsg>, endpoint: &str) {
        if self.shutting_down {
            return;
        }
        let Some(spec) = self.specs.get(endpoint) else { return };
        if spec.command.is_none() && self.runtime.name() == "process" {
            tracing::warn!(endpoint_id = %endpoint, "endpoint has no command; the process runtime cannot run it");
            return;
        }
        let want = spec.workers_min as usize;
        let mut have: Vec<String> =
            self.slots.iter().filter(|(_, s)| s.endpoint == endpoint && s.wanted).map(|(k, _)| k.clone()).collect();
        have.sort();
        for extra in have.iter().skip(want) {
            if let Some(slot) = self.slots.get_mut(extra) {
                slot.wanted = false;
                if let Some(actor) = &slot.actor {
                    actor.stop(None);
                }
            }
        }
        for _ in have.len()..want {
            let worker_id = format!("w{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
            self.slots.insert(
                worker_id.clone(),
                Slot {
                    endpoint: endpoint.to_string(),
                    actor: None,
                    failures: 0,
                    restarts: 0,
                    started: Instant::now(),
                    wanted: true,
                },
            );
            self.spawn_worker(myself, &worker_id).await;
        }
        self.slots.retain(|_, s| s.wanted || s.actor.is_some());
    }

    async fn spawn_worker(&mut self, myself: &ActorRef<HostMsg>, worker_id: &str) {
        let Some(slot) = self.slots.get(worker_id) else { return };
        let Some(spec) = self.specs.get(&slot.endpoint).cloned() else { return };
        let args = WorkerArgs {
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
        };
        let spawned = Actor::spawn_linked(None, WorkerActor, args, myself.get_cell()).await;
        let Some(slot) = self.slots.get_mut(worker_id) else { return };
        slot.started = Instant::now();
        match spawned {
            Ok((actor, _)) => slot.actor = Some(actor),
            Err(e) => {
                // it never ran: same treatment as a crash
                slot.actor = None;
                let reason = format!("cannot start worker: {e}");
                self.schedule_restart(myself, worker_id, Some(reason)).await;
            }
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

    async fn on_worker_ended(&mut self, myself: &ActorRef<HostMsg>, cell: ActorCell, failure: Option<String>) {
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
    async fn schedule_restart(&mut self, myself: &ActorRef<HostMsg>, worker_id: &str, failure: Option<String>) {
        let policy = self.config.backoff.clone();
        let (host, names) = (self.id.clone(), self.nats.names.clone());
        let Some(slot) = self.slots.get_mut(worker_id) else { return };
        if !slot.wanted || self.shutting_down {
            let record = stopped_record(worker_id, slot, &host);
            self.slots.remove(worker_id);
            put_worker_record(&self.nats, &record).await;
            return;
        }
        slot.restarts += 1;
        let Some(reason) = failure else {
            let _ = myself.cast(HostMsg::Restart(worker_id.to_string()));
            return;
        };
        let decision =
            policy.on_failure(slot.failures, slot.started.elapsed().as_millis() as u64, rand::random::<f64>());
        slot.failures = decision.failures;
        let state = if decision.unhealthy { WorkerState::Unhealthy } else { WorkerState::Initializing };
        let reason = if decision.unhealthy {
            format!(
                "crash loop ({} failures in a row), retrying in {} ms: {reason}",
                decision.failures, decision.delay_ms
            )
        } else {
            format!("restarting in {} ms after: {reason}", decision.delay_ms)
        };
        tracing::warn!(worker_id, endpoint_id = %slot.endpoint, failures = decision.failures, delay_ms = decision.delay_ms, "worker failed");
        let now = now_ms();
        let record = WorkerRecord {
            id: worker_id.to_string(),
            endpoint: slot.endpoint.clone(),
            host: host.clone(),
            state,
            reason: Some(reason.clone()),
            spec_version: self.specs.get(&slot.endpoint).map(|s| s.version).unwrap_or(0),
            current_jobs: vec![],
            runtime_ref: None,
            restarts: slot.restarts,
            failures: slot.failures,
            started_at_ms: now,
            updated_at_ms: now,
            jobs_done: 0,
        };
        let event = WorkerEvent {
            worker_id: worker_id.to_string(),
            endpoint: slot.endpoint.clone(),
            host,
            state,
            reason: Some(reason),
            restarts: slot.restarts,
            failures: slot.failures,
            backoff_ms: Some(decision.delay_ms),
            at_ms: now,
        };
        put_worker_record(&self.nats, &record).await;
        self.nats.publish_event(names.worker_event_subject(&record.endpoint, state.as_str()), &event).await;
        myself.send_after(Duration::from_millis(decision.delay_ms), {
            let id = worker_id.to_string();
            move || HostMsg::Restart(id)
        });
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
        for (id, slot) in self.slots.drain() {
            put_worker_record(&self.nats, &stopped_record(&id, &slot, &self.id)).await;
        }
        let _ = self.nats.hosts.delete(&self.id).await;
        let event = HostEvent { host: self.id.clone(), event: "stopped".into(), at_ms: now_ms() };
        self.nats.publish_event(self.nats.names.host_event_subject(&self.id, "stopped"), &event).await;
    }
}

fn stopped_record(worker_id: &str, slot: &Slot, host: &str) -> WorkerRecord {
    let now = now_ms();
    WorkerRecord {
        id: worker_id.to_string(),
        endpoint: slot.endpoint.clone(),
        host: host.to_string(),
        state: WorkerState::Stopped,
        reason: Some("stopped".into()),
        spec_version: 0,
        current_jobs: vec![],
        runtime_ref: None,
        restarts: slot.restarts,
        failures: slot.failures,
        started_at_ms: now,
        updated_at_ms: now,
        jobs_done: 0,
    }
}
