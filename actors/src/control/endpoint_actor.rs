//! The endpoint actor: one per endpoint, on the control replica holding its lease. It watches
//! the endpoint's job records (the key range `<endpoint>.>` of `shoal-jobs`), keeps the live
//! index of queued and running jobs and the job counters, and on every tick ends the jobs
//! whose ttl or execution timeout passed (TIMED_OUT by compare-and-set), telling the worker's
//! host to stop a running one. Its child, the [scaler](super::scaler), sizes the workers from
//! the demand this actor measures, and is woken at once when a normal-priority job is queued
//! (scale from zero does not wait for the scaler's tick). It answers the owner queries (`health`, `queued`) that the
//! API of any replica forwards.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures::StreamExt;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use shoal_protocol::api::JobCounts;
use shoal_protocol::codec::to_msgpack;
use shoal_protocol::endpoint::EndpointSpec;
use shoal_protocol::host::StopJob;
use shoal_protocol::job::{JobRecord, JobState, Priority};
use shoal_protocol::lifecycle;

use super::hosts::HostDirectory;
use super::scaler::{ScalerActor, ScalerArgs, ScalerMsg};
use super::scaling::Demand;
use super::waiting::Fleet;
use crate::clock::now_ms;
use crate::jobs::{Applied, JobStore, decode};
use crate::nats::Nats;

pub struct EndpointActor;

pub struct EndpointArgs {
    /// One connection for all the replica's endpoint actors and scalers (a `Nats` holds a
    /// handle per bucket, each with its stream's info: worth sharing a thousand times over).
    pub nats: Arc<Nats>,
    pub spec: EndpointSpec,
    /// The epoch of this replica's lease on the endpoint; commands to hosts carry it.
    pub epoch: u64,
    pub replica_id: String,
    pub hosts: HostDirectory,
    pub tick: Duration,
    /// How often the scaler ticks.
    pub scaler_tick: Duration,
}

pub enum EndpointMsg {
    RecordPut(Box<JobRecord>),
    RecordGone(String),
    SpecChanged(Box<EndpointSpec>),
    Tick,
    GetCounts(RpcReplyPort<JobCounts>),
    /// What the scaler needs: normal-priority queue and running jobs.
    GetDemand(RpcReplyPort<Demand>),
    /// Ids of the jobs waiting in the queue (for purge).
    GetQueued(RpcReplyPort<Vec<String>>),
}

pub struct EndpointState {
    nats: Arc<Nats>,
    spec: EndpointSpec,
    /// Non-terminal jobs, by id.
    open: HashMap<String, JobRecord>,
    /// Last known state and retries of every retained job, for the counters.
    seen: HashMap<String, (JobState, u32)>,
    scaler: ActorRef<ScalerMsg>,
    /// A [`ScalerMsg::Wake`] is on its way (shared with the scaler, which clears it).
    wake: Arc<AtomicBool>,
    /// The demand last published to the metrics.
    published: Option<Demand>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Actor for EndpointActor {
    type Msg = EndpointMsg;
    type State = EndpointState;
    type Arguments = EndpointArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<EndpointMsg>,
        args: EndpointArgs,
    ) -> Result<EndpointState, ActorProcessingErr> {
        let mut watch = args.nats.jobs.watch_with_history(args.nats.names.job_keys_of_endpoint(&args.spec.id)).await?;
        let me = myself.clone();
        let watch = tokio::spawn(async move {
            while let Some(Ok(entry)) = watch.next().await {
                let msg = match entry.operation {
                    kv::Operation::Put => match decode(&entry.key, &entry.value) {
                        Ok(rec) => EndpointMsg::RecordPut(Box::new(rec)),
                        Err(e) => {
                            tracing::warn!(error = %e, "ignored");
                            continue;
                        }
                    },
                    _ => EndpointMsg::RecordGone(entry.key.rsplit('.').next().unwrap_or_default().to_string()),
                };
                if me.cast(msg).is_err() {
                    break;
                }
            }
        });
        myself.send_interval(args.tick, || EndpointMsg::Tick);
        let fleet = Arc::new(Mutex::new(Fleet::default()));
        let wake = Arc::new(AtomicBool::new(false));
        let queries =
            Box::pin(serve_owner_queries(&args.nats, &args.spec.id, &args.replica_id, myself.clone(), fleet.clone()))
                .await?;
        let scaler_args = ScalerArgs {
            nats: args.nats.clone(),
            spec: args.spec.clone(),
            epoch: args.epoch,
            endpoint: myself.clone(),
            hosts: args.hosts.clone(),
            tick: args.scaler_tick,
            fleet,
            wake: wake.clone(),
        };
        let (scaler, _) = crate::spawn::spawn_linked(ScalerActor, scaler_args, myself.get_cell()).await?;
        tracing::info!(endpoint_id = %args.spec.id, epoch = args.epoch, "endpoint actor started");
        Ok(EndpointState {
            nats: args.nats,
            spec: args.spec,
            open: HashMap::new(),
            seen: HashMap::new(),
            scaler,
            wake,
            published: None,
            tasks: vec![watch, queries],
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<EndpointMsg>,
        msg: EndpointMsg,
        st: &mut EndpointState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            EndpointMsg::RecordPut(rec) => st.on_record(*rec),
            EndpointMsg::RecordGone(id) => st.on_gone(&id),
            EndpointMsg::SpecChanged(spec) => {
                let _ = st.scaler.cast(ScalerMsg::SpecChanged(spec.clone()));
                st.spec = *spec;
            }
            EndpointMsg::GetDemand(reply) => {
                let _ = reply.send(st.demand());
            }
            EndpointMsg::Tick => st.on_tick(),
            EndpointMsg::GetCounts(reply) => {
                let _ = reply.send(st.counts());
            }
            EndpointMsg::GetQueued(reply) => {
                let ids = st.open.values().filter(|r| r.state == JobState::InQueue).map(|r| r.id.clone()).collect();
                let _ = reply.send(ids);
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<EndpointMsg>,
        st: &mut EndpointState,
    ) -> Result<(), ActorProcessingErr> {
        for t in &st.tasks {
            t.abort();
        }
        st.scaler.stop(None);
        crate::metrics::forget_endpoint(&st.spec.id);
        Ok(())
    }
}

impl EndpointState {
    fn on_record(&mut self, rec: JobRecord) {
        let before = self.seen.get(&rec.id).map(|(state, _)| *state);
        let was_open = before.is_some_and(|state| !state.is_terminal());
        if rec.state == JobState::InQueue
            && before != Some(JobState::InQueue)
            && rec.policy.priority == Priority::Normal
            && !self.wake.swap(true, Ordering::AcqRel)
        {
            // newly queued: the scaler starts a worker at once if there is none
            let _ = self.scaler.cast(ScalerMsg::Wake);
        }
        if was_open && rec.state.is_terminal() {
            crate::metrics::job_ended(&rec);
        }
        self.seen.insert(rec.id.clone(), (rec.state, rec.retries));
        if rec.state.is_terminal() {
            self.open.remove(&rec.id);
        } else {
            self.open.insert(rec.id.clone(), rec);
        }
    }

    fn on_gone(&mut self, id: &str) {
        self.open.remove(id);
        self.seen.remove(id);
    }

    fn demand(&self) -> Demand {
        let now = now_ms();
        let mut d = Demand::default();
        for r in self.open.values().filter(|r| r.policy.priority == Priority::Normal) {
            match r.state {
                JobState::InQueue => {
                    d.queued += 1;
                    let waited = now.saturating_sub(r.queued_at_ms);
                    d.oldest_wait_ms = Some(d.oldest_wait_ms.map_or(waited, |w| w.max(waited)));
                }
                JobState::InProgress => d.in_progress += 1,
                _ => {}
            }
        }
        // low-priority jobs already running keep their workers busy, so count them as running
        d.in_progress += self
            .open
            .values()
            .filter(|r| r.policy.priority == Priority::Low && r.state == JobState::InProgress)
            .count() as u64;
        d
    }

    fn counts(&self) -> JobCounts {
        let mut c = JobCounts::default();
        for (state, retries) in self.seen.values() {
            match state {
                JobState::InQueue => c.in_queue += 1,
                JobState::InProgress => c.in_progress += 1,
                JobState::Completed => c.completed += 1,
                JobState::Failed => c.failed += 1,
                JobState::Cancelled => c.cancelled += 1,
                JobState::TimedOut => c.timed_out += 1,
            }
            c.retried += u64::from(*retries);
        }
        c
    }

    /// Ends overdue jobs. Each is a compare-and-set that re-checks the deadline on the record
    /// it reads, so a job that finished meanwhile is left alone.
    fn on_tick(&mut self) {
        let demand = self.demand();
        if self.published != Some(demand) {
            crate::metrics::set_demand(&self.spec.id, &demand);
            self.published = Some(demand);
        }
        let now = now_ms();
        for rec in self.open.values() {
            if lifecycle::overdue(rec, now).is_none() {
                continue;
            }
            // rare (a job overdue): the store is made when needed, not held by every actor
            let (store, nats) = (JobStore::new(Nats::clone(&self.nats)), self.nats.clone());
            let (endpoint, id) = (rec.endpoint.clone(), rec.id.clone());
            tokio::spawn(async move {
                let applied = store
                    .transition(&endpoint, &id, |r| match lifecycle::overdue(r, now_ms()) {
                        Some(reason) => lifecycle::time_out(r, reason, now_ms()),
                        None => Err(lifecycle::TransitionError::NotRunning("not overdue")),
                    })
                    .await;
                if let Ok(Applied::Changed { record, previous, .. }) = applied {
                    tracing::info!(endpoint_id = %endpoint, job_id = %id, reason = ?record.error, "job timed out");
                    if previous.state == JobState::InProgress {
                        send_stop(&nats, &previous, record.error.as_deref().unwrap_or("timed out")).await;
                    }
                }
            });
        }
    }
}

/// Tells the host running `rec` to stop it (cancel, timeout).
pub async fn send_stop(nats: &Nats, rec: &JobRecord, reason: &str) {
    let (Some(host), Some(worker)) = (&rec.host_id, &rec.worker_id) else { return };
    let stop = StopJob {
        endpoint: rec.endpoint.clone(),
        job_id: rec.id.clone(),
        worker_id: worker.clone(),
        reason: reason.to_string(),
    };
    if let Ok(bytes) = to_msgpack(&stop)
        && let Err(e) = nats.client.publish(nats.names.host_stop_job_subject(host), Bytes::from(bytes)).await
    {
        tracing::warn!(job_id = %rec.id, error = %e, "cannot send stop to host");
    }
}

/// Answers `health` and `queued` for this endpoint on its owner subjects, so the API of any
/// replica can ask the owner.
async fn serve_owner_queries(
    nats: &Nats,
    endpoint: &str,
    replica_id: &str,
    actor: ActorRef<EndpointMsg>,
    fleet: Arc<Mutex<Fleet>>,
) -> Result<tokio::task::JoinHandle<()>, async_nats::SubscribeError> {
    let mut sub = nats.client.subscribe(nats.names.owner_subject(endpoint, "*")).await?;
    let client = nats.client.clone();
    let prefix = nats.names.owner_subject(endpoint, "");
    let replica_id = replica_id.to_string();
    Ok(tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let Some(reply) = msg.reply.clone() else { continue };
            let query = msg.subject.as_str().strip_prefix(&prefix).unwrap_or_default().to_string();
            let bytes = match query.as_str() {
                "health" => match ractor::call!(actor, EndpointMsg::GetCounts) {
                    Ok(counts) => to_msgpack(&(counts, replica_id.clone())),
                    Err(_) => break,
                },
                "waiting" => match fleet.lock() {
                    Ok(f) => to_msgpack(&*f),
                    Err(_) => break,
                },
                "queued" => match ractor::call!(actor, EndpointMsg::GetQueued) {
                    Ok(ids) => to_msgpack(&ids),
                    Err(_) => break,
                },
                _ => continue,
            };
            if let Ok(bytes) = bytes {
                let _ = client.publish(reply, Bytes::from(bytes)).await;
            }
        }
    }))
}
