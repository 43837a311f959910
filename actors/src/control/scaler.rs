//! The scaler actor: child of an endpoint actor. Every tick it reads the demand (from its
//! parent), the endpoint's workers (a watch on `shoal-workers`) and the live hosts; asks the
//! pure rule ([`super::scaling`]) how many workers the endpoint wants and which stop or drain;
//! places new ones ([`super::placement`]) and sends the hosts their commands, each carrying
//! the lease epoch. A worker that cannot be placed is recorded Throttled, with the reason, and
//! placed as soon as a host has room. Workers of a host that went silent are replaced.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures::StreamExt;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde::Serialize;
use shoal_protocol::codec::{from_msgpack, to_msgpack};
use shoal_protocol::endpoint::EndpointSpec;
use shoal_protocol::events::WorkerEvent;
use shoal_protocol::host::{CommandReply, StartWorker, StopWorker};
use shoal_protocol::worker::{WorkerRecord, WorkerState};

use super::endpoint_actor::EndpointMsg;
use super::hosts::HostDirectory;
use super::placement::{HostView, Placement, place};
use super::scaling::{WorkerView, decide};
use super::waiting::Fleet;
use crate::clock::now_ms;
use crate::nats::Nats;

/// A started worker that has not shown up in `shoal-workers` within this long is forgotten.
const PENDING_FOR: Duration = Duration::from_secs(30);

pub struct ScalerActor;

pub struct ScalerArgs {
    pub nats: Nats,
    pub spec: EndpointSpec,
    pub epoch: u64,
    pub endpoint: ActorRef<EndpointMsg>,
    pub hosts: HostDirectory,
    pub tick: Duration,
    /// Where the scaler leaves its view of the workers for "why is my job waiting".
    pub fleet: Arc<Mutex<Fleet>>,
}

pub enum ScalerMsg {
    Tick,
    SpecChanged(Box<EndpointSpec>),
    WorkerPut(Box<WorkerRecord>),
    WorkerGone(String),
}

pub struct ScalerState {
    nats: Nats,
    spec: EndpointSpec,
    epoch: u64,
    endpoint: ActorRef<EndpointMsg>,
    hosts: HostDirectory,
    workers: HashMap<String, WorkerRecord>,
    /// Started here, not yet in `shoal-workers`.
    pending: HashMap<String, Instant>,
    /// Told to stop or drain.
    stopping: HashSet<String>,
    fleet: Arc<Mutex<Fleet>>,
    watch: tokio::task::JoinHandle<()>,
}

impl Actor for ScalerActor {
    type Msg = ScalerMsg;
    type State = ScalerState;
    type Arguments = ScalerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<ScalerMsg>,
        args: ScalerArgs,
    ) -> Result<ScalerState, ActorProcessingErr> {
        let mut watch = args.nats.workers.watch_with_history(args.nats.names.worker_key(&args.spec.id, ">")).await?;
        let me = myself.clone();
        let watch = tokio::spawn(async move {
            while let Some(Ok(entry)) = watch.next().await {
                let msg = match entry.operation {
                    kv::Operation::Put => match from_msgpack::<WorkerRecord>(&entry.value) {
                        Ok(rec) => ScalerMsg::WorkerPut(Box::new(rec)),
                        Err(_) => continue,
                    },
                    _ => ScalerMsg::WorkerGone(entry.key.rsplit('.').next().unwrap_or_default().to_string()),
                };
                if me.cast(msg).is_err() {
                    break;
                }
            }
        });
        myself.send_interval(args.tick, || ScalerMsg::Tick);
        Ok(ScalerState {
            nats: args.nats,
            spec: args.spec,
            epoch: args.epoch,
            endpoint: args.endpoint,
            hosts: args.hosts,
            workers: HashMap::new(),
            pending: HashMap::new(),
            stopping: HashSet::new(),
            fleet: args.fleet,
            watch,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<ScalerMsg>,
        msg: ScalerMsg,
        st: &mut ScalerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ScalerMsg::Tick => {
                let span = tracing::debug_span!("scaler", endpoint_id = %st.spec.id);
                tracing::Instrument::instrument(st.on_tick(), span).await
            }
            ScalerMsg::SpecChanged(spec) => st.spec = *spec,
            ScalerMsg::WorkerPut(rec) => st.on_worker(*rec),
            ScalerMsg::WorkerGone(id) => {
                st.workers.remove(&id);
                st.stopping.remove(&id);
            }
        }
        Ok(())
    }

    async fn post_stop(&self, _myself: ActorRef<ScalerMsg>, st: &mut ScalerState) -> Result<(), ActorProcessingErr> {
        st.watch.abort();
        Ok(())
    }
}

impl ScalerState {
    fn on_worker(&mut self, rec: WorkerRecord) {
        self.pending.remove(&rec.id);
        if rec.state == WorkerState::Stopped {
            self.stopping.remove(&rec.id);
        }
        self.workers.insert(rec.id.clone(), rec);
    }

    async fn on_tick(&mut self) {
        let Ok(mut demand) = ractor::call!(self.endpoint, EndpointMsg::GetDemand) else { return };
        let now = now_ms();
        let live = self.hosts.live();
        let warm_key = format!("{}@{}", self.spec.id, self.spec.version);
        demand.warm_slots = live.iter().map(|h| h.warm.iter().filter(|w| **w == warm_key).count() as u32).sum();
        let live_ids: HashSet<&str> = live.iter().map(|h| h.id.as_str()).collect();
        // workers on hosts that went silent are gone; their jobs come back by redelivery
        let lost: Vec<WorkerRecord> = self
            .workers
            .values()
            .filter(|w| w.state != WorkerState::Stopped && !w.host.is_empty() && !live_ids.contains(w.host.as_str()))
            .cloned()
            .collect();
        for mut w in lost {
            tracing::warn!(endpoint_id = %self.spec.id, worker_id = %w.id, host_id = %w.host, "host lost; replacing its worker");
            w.state = WorkerState::Stopped;
            w.reason = Some(format!("host {} lost", w.host));
            self.record(&w).await;
        }
        self.pending.retain(|_, since| since.elapsed() < PENDING_FOR);
        let mut views: Vec<WorkerView> = self
            .workers
            .values()
            .filter(|w| w.state != WorkerState::Stopped)
            .map(|w| WorkerView {
                id: w.id.clone(),
                state: w.state,
                version: w.spec_version,
                idle_since_ms: (w.state == WorkerState::Idle).then_some(w.updated_at_ms),
                stopping: self.stopping.contains(&w.id)
                    || (w.state == WorkerState::Outdated
                        && w.reason.as_deref().is_some_and(|r| r.starts_with("draining"))),
            })
            .collect();
        for id in self.pending.keys().filter(|id| !self.workers.contains_key(*id)) {
            views.push(WorkerView {
                id: id.clone(),
                state: WorkerState::Initializing,
                version: self.spec.version,
                idle_since_ms: None,
                stopping: false,
            });
        }
        let decision = decide(&self.spec, &demand, &views, now);
        self.publish_fleet(decision.target);
        for id in &decision.stop {
            crate::metrics::scaler_decision(&self.spec.id, "stopped");
            self.stop(id, false, "idle timeout").await;
        }
        let reason = format!("rolling update to version {}", self.spec.version);
        for id in &decision.drain {
            crate::metrics::scaler_decision(&self.spec.id, "drained");
            self.stop(id, true, &reason).await;
        }
        // place: the throttled first (they are counted already), then the new ones
        let mut hosts: Vec<HostView> = live
            .iter()
            .map(|h| {
                let ours = self.workers.values().filter(|w| w.host == h.id && w.state != WorkerState::Stopped).count();
                HostView::from_record(h, ours as u32)
            })
            .collect();
        let throttled: Vec<String> = views
            .iter()
            .filter(|v| v.state == WorkerState::Throttled && !v.stopping && !decision.stop.contains(&v.id))
            .map(|v| v.id.clone())
            .collect();
        let new_ids = (0..decision.start).map(|_| format!("w{}", &uuid::Uuid::new_v4().simple().to_string()[..12]));
        for id in throttled.into_iter().chain(new_ids) {
            match place(&self.spec, &mut hosts) {
                Ok(p) => self.start(&id, p).await,
                Err(reason) => self.throttle(&id, reason).await,
            }
        }
    }

    fn publish_fleet(&self, target: u32) {
        let mut f = Fleet { target, ..Fleet::default() };
        for w in self.workers.values() {
            match w.state {
                WorkerState::Idle => f.idle += 1,
                WorkerState::Running | WorkerState::Outdated => f.running += 1,
                WorkerState::Initializing => f.initializing += 1,
                WorkerState::Throttled => {
                    f.throttled += 1;
                    f.throttled_reason = w.reason.clone();
                }
                WorkerState::Unhealthy => {
                    f.unhealthy += 1;
                    f.unhealthy_reason = w.reason.clone();
                }
                WorkerState::Stopped => {}
            }
        }
        f.initializing += self.pending.keys().filter(|id| !self.workers.contains_key(*id)).count() as u32;
        crate::metrics::set_fleet(&self.spec.id, &f);
        if let Ok(mut shared) = self.fleet.lock() {
            *shared = f;
        }
    }

    async fn command<T: Serialize>(&self, subject: String, cmd: &T) -> Result<(), String> {
        let bytes = to_msgpack(cmd).map_err(|e| e.to_string())?;
        let reply = tokio::time::timeout(Duration::from_secs(5), self.nats.client.request(subject, Bytes::from(bytes)))
            .await
            .map_err(|_| "the host did not answer".to_string())?
            .map_err(|e| format!("the host did not answer: {e}"))?;
        let reply: CommandReply = from_msgpack(&reply.payload).map_err(|e| e.to_string())?;
        if reply.ok { Ok(()) } else { Err(reply.error.unwrap_or_else(|| "refused".into())) }
    }

    async fn start(&mut self, id: &str, p: Placement) {
        let cmd =
            StartWorker { spec: self.spec.clone(), worker_id: id.to_string(), gpu_type: p.gpu_type, epoch: self.epoch };
        match self.command(self.nats.names.host_start_worker_subject(&p.host), &cmd).await {
            Ok(()) => {
                crate::metrics::scaler_decision(&self.spec.id, "started");
                tracing::info!(endpoint_id = %self.spec.id, worker_id = id, host_id = %p.host, "worker started");
                self.pending.insert(id.to_string(), Instant::now());
            }
            Err(e) => self.throttle(id, format!("host {} refused: {e}", p.host)).await,
        }
    }

    async fn stop(&mut self, id: &str, drain: bool, reason: &str) {
        let Some(w) = self.workers.get(id).cloned() else { return };
        self.stopping.insert(id.to_string());
        if w.state == WorkerState::Throttled || w.host.is_empty() {
            let mut w = w;
            w.state = WorkerState::Stopped;
            w.reason = Some("no longer needed".into());
            self.record(&w).await;
            return;
        }
        let cmd = StopWorker {
            endpoint: self.spec.id.clone(),
            worker_id: id.to_string(),
            drain,
            epoch: self.epoch,
            reason: reason.to_string(),
        };
        if let Err(e) = self.command(self.nats.names.host_stop_worker_subject(&w.host), &cmd).await {
            tracing::warn!(endpoint_id = %self.spec.id, worker_id = id, error = %e, "stop refused");
            self.stopping.remove(id);
        }
    }

    async fn throttle(&mut self, id: &str, reason: String) {
        let now = now_ms();
        let prev = self.workers.get(id);
        if prev.is_some_and(|w| w.state == WorkerState::Throttled && w.reason.as_deref() == Some(reason.as_str())) {
            return;
        }
        let rec = WorkerRecord {
            id: id.to_string(),
            endpoint: self.spec.id.clone(),
            host: String::new(),
            state: WorkerState::Throttled,
            reason: Some(reason),
            spec_version: self.spec.version,
            current_jobs: vec![],
            runtime_ref: None,
            restarts: 0,
            failures: 0,
            started_at_ms: prev.map_or(now, |w| w.started_at_ms),
            updated_at_ms: now,
            jobs_done: 0,
            start: None,
        };
        self.record(&rec).await;
    }

    /// Writes a worker record this scaler decided (throttled, stopped) and its event.
    async fn record(&mut self, rec: &WorkerRecord) {
        if let Ok(bytes) = to_msgpack(rec) {
            let _ = self.nats.workers.put(self.nats.names.worker_key(&rec.endpoint, &rec.id), Bytes::from(bytes)).await;
        }
        let event = WorkerEvent {
            worker_id: rec.id.clone(),
            endpoint: rec.endpoint.clone(),
            host: rec.host.clone(),
            state: rec.state,
            reason: rec.reason.clone(),
            restarts: rec.restarts,
            failures: rec.failures,
            backoff_ms: None,
            at_ms: rec.updated_at_ms,
            start: None,
        };
        self.nats.publish_event(self.nats.names.worker_event_subject(&rec.endpoint, rec.state.as_str()), &event).await;
        self.workers.insert(rec.id.clone(), rec.clone());
    }
}
