//! The scaler actor: child of an endpoint actor. Every tick (sent by its parent, with the
//! demand the parent measures: one timer per endpoint, not two) it reads the endpoint's
//! workers (its worker records in `shoal-workers`: read once when it starts, then the changes
//! the parent passes on from the replica's [feed](super::feeds)) and the live hosts; asks the
//! pure rule ([`super::scaling`]) how many workers the endpoint wants and which stop or drain;
//! places new ones ([`super::placement`]) and sends the hosts their commands, each carrying
//! the lease epoch. A worker that cannot be placed is recorded Throttled, with the reason, and
//! placed as soon as a host has room. Workers of a host that went silent are replaced.
//!
//! Scale from zero does not wait for the tick: the endpoint actor sends [`ScalerMsg::Wake`]
//! when a normal-priority job is queued, at most one at a time (a shared flag, cleared when the
//! wake is handled, so a burst of jobs costs a few wakes, not one per job). A wake acts at once
//! when the endpoint has no worker ready or starting, and only once the scaler has caught up
//! with the endpoint's worker records (a replica that just took the endpoint over must not start
//! workers it merely has not seen yet).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde::Serialize;
use shoal_protocol::codec::{from_msgpack, to_msgpack};
use shoal_protocol::endpoint::EndpointSpec;
use shoal_protocol::events::WorkerEvent;
use shoal_protocol::host::{CommandReply, StartWorker, StopWorker};
use shoal_protocol::worker::{WorkerRecord, WorkerState};

use super::endpoint_actor::EndpointMsg;
use super::feeds::{Entry, Feed, spawn_history_read};
use super::hosts::HostDirectory;
use super::placement::{HostView, Placement, place};
use super::scaling::{Demand, WorkerView, decide};
use super::waiting::Fleet;
use crate::clock::now_ms;
use crate::nats::Nats;

/// A started worker that has not shown up in `shoal-workers` within this long is forgotten.
const PENDING_FOR: Duration = Duration::from_secs(30);
/// How long a host has to answer a command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a host did not carry out a command.
enum CommandError {
    /// No answer in time: it may still be carried out.
    NoAnswer,
    /// Refused, undeliverable or unreadable: it was not carried out.
    Refused(String),
}

impl std::fmt::Display for CommandError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CommandError::NoAnswer => f.write_str("the host did not answer"),
            CommandError::Refused(e) => f.write_str(e),
        }
    }
}

pub struct ScalerActor;

pub struct ScalerArgs {
    pub nats: Arc<Nats>,
    pub spec: EndpointSpec,
    pub epoch: u64,
    pub endpoint: ActorRef<EndpointMsg>,
    pub hosts: HostDirectory,
    pub limits: Arc<super::Limits>,
    /// Where the scaler leaves its view of the workers for "why is my job waiting".
    pub fleet: Arc<Mutex<Fleet>>,
    /// Set by the endpoint actor when it sends a [`ScalerMsg::Wake`], cleared when the scaler
    /// handles it: at most one wake waits in the mailbox.
    pub wake: Arc<AtomicBool>,
    /// Set by the endpoint actor when it sends a [`ScalerMsg::Tick`], cleared when the scaler
    /// takes it: a busy scaler gets the next tick's demand, not a backlog of stale ones.
    pub tick_sent: Arc<AtomicBool>,
}

pub enum ScalerMsg {
    /// The endpoint actor is registered with the replica's feeds: read the worker records.
    Start,
    /// Time to size the workers, for this demand.
    Tick(Demand),
    /// A normal-priority job was queued: act now if the endpoint has no worker to take it.
    Wake,
    /// A worker record from the history read.
    WorkerHistory(Entry<WorkerRecord>),
    /// The history read is done; the bucket's revision before it began.
    CaughtUp(u64),
    /// A change of a worker record, from the replica's live feed.
    WorkerLive(Entry<WorkerRecord>),
    SpecChanged(Box<EndpointSpec>),
}

pub struct ScalerState {
    nats: Arc<Nats>,
    spec: EndpointSpec,
    epoch: u64,
    endpoint: ActorRef<EndpointMsg>,
    hosts: HostDirectory,
    limits: Arc<super::Limits>,
    workers: HashMap<String, WorkerRecord>,
    /// The worker records' history read merged with the live changes.
    feed: Feed<WorkerRecord>,
    /// Started here, not yet in `shoal-workers`.
    pending: HashMap<String, Instant>,
    /// Told to stop or drain.
    stopping: HashSet<String>,
    fleet: Arc<Mutex<Fleet>>,
    wake: Arc<AtomicBool>,
    tick_sent: Arc<AtomicBool>,
    /// A wake came before the worker records were read (until then a wake only sets this).
    woken: bool,
    /// The fleet last published (metrics and the shared view), to skip unchanged ones.
    fleet_published: Option<Fleet>,
    /// The history read, while it runs.
    reader: Option<tokio::task::JoinHandle<()>>,
}

impl Actor for ScalerActor {
    type Msg = ScalerMsg;
    type State = ScalerState;
    type Arguments = ScalerArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<ScalerMsg>,
        args: ScalerArgs,
    ) -> Result<ScalerState, ActorProcessingErr> {
        Ok(ScalerState {
            nats: args.nats,
            spec: args.spec,
            epoch: args.epoch,
            endpoint: args.endpoint,
            hosts: args.hosts,
            limits: args.limits,
            workers: HashMap::new(),
            feed: Feed::default(),
            pending: HashMap::new(),
            stopping: HashSet::new(),
            fleet: args.fleet,
            wake: args.wake,
            tick_sent: args.tick_sent,
            woken: false,
            fleet_published: None,
            reader: None,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<ScalerMsg>,
        msg: ScalerMsg,
        st: &mut ScalerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ScalerMsg::Start => {
                let filter = st.nats.names.worker_key(&st.spec.id, ">");
                st.reader = Some(spawn_history_read(
                    st.nats.clone(),
                    |n| &n.workers,
                    filter,
                    None,
                    st.limits.clone(),
                    myself,
                    ScalerMsg::WorkerHistory,
                    ScalerMsg::CaughtUp,
                ))
            }
            // until it has read the worker records it would start workers it has not seen yet
            ScalerMsg::Tick(_) if !st.feed.is_caught_up() => st.tick_sent.store(false, Ordering::Release),
            ScalerMsg::Tick(demand) => {
                st.tick_sent.store(false, Ordering::Release);
                let span = tracing::debug_span!("scaler", endpoint_id = %st.spec.id);
                // boxed: the tick's future is large, and only lives while it runs (the actor's
                // task would otherwise carry its size for good, times a thousand endpoints)
                Box::pin(tracing::Instrument::instrument(st.on_tick(Some(demand)), span)).await
            }
            ScalerMsg::Wake => Box::pin(st.on_wake()).await,
            ScalerMsg::CaughtUp(since) => {
                st.reader = None;
                for entry in st.feed.caught_up(since) {
                    st.on_worker(entry);
                }
                Box::pin(st.on_caught_up()).await
            }
            ScalerMsg::SpecChanged(spec) => st.spec = *spec,
            ScalerMsg::WorkerHistory(entry) => {
                if let Some(entry) = st.feed.history(entry) {
                    st.on_worker(entry);
                }
            }
            ScalerMsg::WorkerLive(entry) => {
                if let Some(entry) = st.feed.live(entry) {
                    st.on_worker(entry);
                }
            }
        }
        Ok(())
    }

    async fn post_stop(&self, _myself: ActorRef<ScalerMsg>, st: &mut ScalerState) -> Result<(), ActorProcessingErr> {
        if let Some(reader) = &st.reader {
            reader.abort();
        }
        Ok(())
    }
}

impl ScalerState {
    /// Scale from zero without waiting for the tick: act now when no worker could take the
    /// job that was just queued.
    async fn on_wake(&mut self) {
        self.wake.store(false, Ordering::Release);
        if !self.feed.is_caught_up() {
            self.woken = true;
            return;
        }
        if self.has_a_worker() {
            return; // a ready or starting worker takes it; the tick does the rest
        }
        let span = tracing::debug_span!("scaler", endpoint_id = %self.spec.id, wake = true);
        tracing::Instrument::instrument(self.on_tick(None), span).await
    }

    async fn on_caught_up(&mut self) {
        if std::mem::take(&mut self.woken) {
            self.on_wake().await;
        }
    }

    /// A worker that is or will soon be taking jobs: started (not yet recorded), initializing,
    /// idle or running, and not on its way out.
    fn has_a_worker(&self) -> bool {
        !self.pending.is_empty()
            || self.workers.values().any(|w| {
                matches!(w.state, WorkerState::Initializing | WorkerState::Idle | WorkerState::Running)
                    && !self.stopping.contains(&w.id)
            })
    }

    fn on_worker(&mut self, entry: Entry<WorkerRecord>) {
        let Some(rec) = entry.value else {
            self.workers.remove(&entry.id);
            self.stopping.remove(&entry.id);
            return;
        };
        self.pending.remove(&rec.id);
        if rec.state == WorkerState::Stopped {
            self.stopping.remove(&rec.id);
        }
        self.workers.insert(rec.id.clone(), rec);
    }

    /// Sizes the workers for `demand` (`None`: ask the endpoint actor for it now).
    async fn on_tick(&mut self, demand: Option<Demand>) {
        let mut demand = match demand {
            Some(d) => d,
            None => match ractor::call!(self.endpoint, EndpointMsg::GetDemand) {
                Ok(d) => d,
                Err(_) => return,
            },
        };
        // most ticks of a steady endpoint change nothing: read the hosts without copying them,
        // and copy them only when there is something to place
        let now = now_ms();
        let warm_key = format!("{}@{}", self.spec.id, self.spec.version);
        demand.warm_slots = self.hosts.warm_slots(&warm_key);
        // workers on hosts that went silent are gone; their jobs come back by redelivery
        let lost: Vec<WorkerRecord> = self
            .workers
            .values()
            .filter(|w| w.state != WorkerState::Stopped && !w.host.is_empty() && !self.hosts.is_live(&w.host))
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
        if !decision.drain.is_empty() {
            let reason = format!("rolling update to version {}", self.spec.version);
            for id in &decision.drain {
                crate::metrics::scaler_decision(&self.spec.id, "drained");
                self.stop(id, true, &reason).await;
            }
        }
        // place: the throttled first (they are counted already), then the new ones
        let throttled: Vec<String> = views
            .iter()
            .filter(|v| v.state == WorkerState::Throttled && !v.stopping && !decision.stop.contains(&v.id))
            .map(|v| v.id.clone())
            .collect();
        if throttled.is_empty() && decision.start == 0 {
            return;
        }
        let mut hosts: Vec<HostView> = self
            .hosts
            .live()
            .iter()
            .map(|h| {
                let ours = self.workers.values().filter(|w| w.host == h.id && w.state != WorkerState::Stopped).count();
                HostView::from_record(h, ours as u32)
            })
            .collect();
        let new_ids = (0..decision.start).map(|_| format!("w{}", &uuid::Uuid::new_v4().simple().to_string()[..12]));
        let mut starts = Vec::new();
        for id in throttled.into_iter().chain(new_ids) {
            match place(&self.spec, &mut hosts) {
                Ok(p) => starts.push((id, p)),
                Err(reason) => self.throttle(&id, reason).await,
            }
        }
        self.start_all(starts).await;
    }

    fn publish_fleet(&mut self, target: u32) {
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
        if self.fleet_published.as_ref() != Some(&f) {
            crate::metrics::set_fleet(&self.spec.id, &f);
            if let Ok(mut shared) = self.fleet.lock() {
                *shared = f.clone();
            }
            self.fleet_published = Some(f);
        }
    }

    async fn command<T: Serialize>(&self, subject: String, cmd: &T) -> Result<(), CommandError> {
        let bytes = to_msgpack(cmd).map_err(|e| CommandError::Refused(e.to_string()))?;
        let reply = tokio::time::timeout(COMMAND_TIMEOUT, self.nats.client.request(subject, Bytes::from(bytes)))
            .await
            .map_err(|_| CommandError::NoAnswer)?
            .map_err(|e| CommandError::Refused(format!("the host did not answer: {e}")))?;
        let reply: CommandReply = from_msgpack(&reply.payload).map_err(|e| CommandError::Refused(e.to_string()))?;
        if reply.ok { Ok(()) } else { Err(CommandError::Refused(reply.error.unwrap_or_else(|| "refused".into()))) }
    }

    /// Sends the start commands of one tick at once (a busy host answers each in turn, so a
    /// tick starting many workers waits for the slowest answer, not for their sum).
    async fn start_all(&mut self, starts: Vec<(String, Placement)>) {
        let limits = self.limits.clone();
        let Ok(_permit) = limits.starting.acquire().await else { return };
        let this = &*self;
        let commands = starts.iter().map(|(id, p)| {
            let cmd = StartWorker {
                spec: this.spec.clone(),
                worker_id: id.clone(),
                gpu_type: p.gpu_type.clone(),
                epoch: this.epoch,
            };
            let subject = this.nats.names.host_start_worker_subject(&p.host);
            async move { this.command(subject, &cmd).await }
        });
        let results = futures::future::join_all(commands).await;
        for ((id, p), result) in starts.into_iter().zip(results) {
            match result {
                Ok(()) => {
                    crate::metrics::scaler_decision(&self.spec.id, "started");
                    tracing::info!(endpoint_id = %self.spec.id, worker_id = %id, host_id = %p.host, "worker started");
                    self.pending.insert(id, Instant::now());
                }
                // the command may still be carried out: count the worker as starting (it is
                // forgotten after PENDING_FOR if it never shows up), never place it twice
                Err(CommandError::NoAnswer) => {
                    tracing::warn!(endpoint_id = %self.spec.id, worker_id = %id, host_id = %p.host, "host did not answer a start in time");
                    self.pending.insert(id, Instant::now());
                }
                Err(CommandError::Refused(e)) => self.throttle(&id, format!("host {} refused: {e}", p.host)).await,
            }
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
