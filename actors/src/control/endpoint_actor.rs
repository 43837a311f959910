//! The endpoint actor: one per endpoint, on the control replica holding its lease. It keeps
//! the live index of the endpoint's queued and running jobs and the job counters, from its job
//! records (`shoal-jobs`, keys `<endpoint>.>`: read once when it starts, then changes from the
//! replica's [feed](super::feeds)), and on every tick ends the jobs whose ttl or execution
//! timeout passed (TIMED_OUT by compare-and-set), telling the worker's host to stop a running
//! one. Its child, the [scaler](super::scaler), sizes the workers from the demand this actor
//! measures (the worker records' changes pass through here to it), and is woken at once when
//! a normal-priority job is queued (scale from zero does not wait for the scaler's tick). It
//! answers the [owner queries](super::owner_queries) (`health`, `queued`, `waiting`) that the
//! API of any replica sends.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use shoal_protocol::api::JobCounts;
use shoal_protocol::codec::to_msgpack;
use shoal_protocol::endpoint::EndpointSpec;
use shoal_protocol::host::StopJob;
use shoal_protocol::job::{JobRecord, JobState, Priority};
use shoal_protocol::lifecycle;
use shoal_protocol::worker::WorkerRecord;

use super::feeds::{Entry, Feed, spawn_history_read};
use super::hosts::HostDirectory;
use super::scaler::{ScalerActor, ScalerArgs, ScalerMsg};
use super::scaling::Demand;
use super::waiting::Fleet;
use crate::clock::now_ms;
use crate::jobs::{Applied, JobStore};
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
    pub limits: Arc<super::Limits>,
    pub tick: Duration,
    /// How often the scaler ticks.
    pub scaler_tick: Duration,
}

pub enum EndpointMsg {
    /// The actor is registered with the replica's feeds: read the history.
    Start,
    /// A change of one of the endpoint's job records, from the replica's live feed.
    JobLive(Entry<JobRecord>),
    /// A job record from the history read.
    JobHistory(Entry<JobRecord>),
    /// The history read is done; the bucket's revision before it began.
    JobsCaughtUp(u64),
    /// A change of one of the endpoint's worker records (for the scaler).
    WorkerLive(Entry<WorkerRecord>),
    SpecChanged(Box<EndpointSpec>),
    Tick,
    GetCounts(RpcReplyPort<JobCounts>),
    /// What the scaler needs: normal-priority queue and running jobs.
    GetDemand(RpcReplyPort<Demand>),
    /// Ids of the jobs waiting in the queue (for purge).
    GetQueued(RpcReplyPort<Vec<String>>),
    /// The scaler's last view of the workers (why a job waits).
    GetFleet(RpcReplyPort<Fleet>),
}

/// Which of the timer's ticks check deadlines and which tick the scaler.
struct Cadence {
    deadlines: u32,
    scaler: u32,
    count: u32,
}

pub struct EndpointState {
    nats: Arc<Nats>,
    spec: EndpointSpec,
    /// The job records' history read merged with the live changes.
    feed: Feed<JobRecord>,
    /// Non-terminal jobs, by id.
    open: HashMap<String, JobRecord>,
    /// Last known state and retries of every retained job, for the counters.
    seen: HashMap<String, (JobState, u32)>,
    scaler: ActorRef<ScalerMsg>,
    /// A [`ScalerMsg::Wake`] is on its way (shared with the scaler, which clears it).
    wake: Arc<AtomicBool>,
    /// The scaler's view of the workers.
    fleet: Arc<Mutex<Fleet>>,
    /// The demand last published to the metrics.
    published: Option<Demand>,
    cadence: Cadence,
    /// A [`ScalerMsg::Tick`] is on its way (shared with the scaler, which clears it).
    tick_sent: Arc<AtomicBool>,
    limits: Arc<super::Limits>,
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
        // one timer for the deadlines and the scaler: it fires at the shorter of their periods
        let base = args.tick.min(args.scaler_tick).max(Duration::from_millis(1));
        let every = |period: Duration| ((period.as_millis() / base.as_millis()).max(1)) as u32;
        let cadence = Cadence { deadlines: every(args.tick), scaler: every(args.scaler_tick), count: 0 };
        let ticks = crate::clock::tick_aligned(myself.clone(), base, || EndpointMsg::Tick);
        let fleet = Arc::new(Mutex::new(Fleet::default()));
        let wake = Arc::new(AtomicBool::new(false));
        let tick_sent = Arc::new(AtomicBool::new(false));
        let scaler_args = ScalerArgs {
            nats: args.nats.clone(),
            spec: args.spec.clone(),
            epoch: args.epoch,
            endpoint: myself.clone(),
            hosts: args.hosts.clone(),
            limits: args.limits.clone(),
            fleet: fleet.clone(),
            wake: wake.clone(),
            tick_sent: tick_sent.clone(),
        };
        let (scaler, _) = crate::spawn::spawn_linked(ScalerActor, scaler_args, myself.get_cell()).await?;
        tracing::info!(endpoint_id = %args.spec.id, epoch = args.epoch, replica_id = %args.replica_id, "endpoint actor started");
        Ok(EndpointState {
            nats: args.nats,
            spec: args.spec,
            feed: Feed::default(),
            open: HashMap::new(),
            seen: HashMap::new(),
            scaler,
            wake,
            fleet,
            published: None,
            cadence,
            tick_sent,
            limits: args.limits,
            tasks: vec![ticks],
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<EndpointMsg>,
        msg: EndpointMsg,
        st: &mut EndpointState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            EndpointMsg::Start => {
                let filter = st.nats.names.job_keys_of_endpoint(&st.spec.id);
                st.tasks.push(spawn_history_read(
                    st.nats.clone(),
                    |n| &n.jobs,
                    filter,
                    st.limits.clone(),
                    myself,
                    EndpointMsg::JobHistory,
                    EndpointMsg::JobsCaughtUp,
                ));
                let _ = st.scaler.cast(ScalerMsg::Start);
            }
            EndpointMsg::JobLive(entry) => {
                if let Some(entry) = st.feed.live(entry) {
                    st.apply(entry);
                }
            }
            EndpointMsg::JobHistory(entry) => {
                if let Some(entry) = st.feed.history(entry) {
                    st.apply(entry);
                }
            }
            EndpointMsg::JobsCaughtUp(since) => {
                for entry in st.feed.caught_up(since) {
                    st.apply(entry);
                }
            }
            EndpointMsg::WorkerLive(entry) => {
                let _ = st.scaler.cast(ScalerMsg::WorkerLive(entry));
            }
            EndpointMsg::SpecChanged(spec) => {
                let _ = st.scaler.cast(ScalerMsg::SpecChanged(spec.clone()));
                st.spec = *spec;
            }
            EndpointMsg::GetDemand(reply) => {
                let _ = reply.send(st.demand());
            }
            EndpointMsg::Tick => {
                st.cadence.count = st.cadence.count.wrapping_add(1);
                if st.cadence.count.is_multiple_of(st.cadence.deadlines) {
                    st.on_tick();
                }
                if st.cadence.count.is_multiple_of(st.cadence.scaler) && !st.tick_sent.swap(true, Ordering::AcqRel) {
                    let _ = st.scaler.cast(ScalerMsg::Tick(st.demand()));
                }
            }
            EndpointMsg::GetCounts(reply) => {
                let _ = reply.send(st.counts());
            }
            EndpointMsg::GetQueued(reply) => {
                let ids = st.open.values().filter(|r| r.state == JobState::InQueue).map(|r| r.id.clone()).collect();
                let _ = reply.send(ids);
            }
            EndpointMsg::GetFleet(reply) => {
                let fleet = st.fleet.lock().map(|f| f.clone()).unwrap_or_default();
                let _ = reply.send(fleet);
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
    fn apply(&mut self, entry: Entry<JobRecord>) {
        match entry.value {
            Some(rec) => self.on_record(rec),
            None => self.on_gone(&entry.id),
        }
    }

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
            self.open.insert(rec.id.clone(), kept(rec));
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

/// What the actor keeps of an open job: its state, priority and the times and timeouts of its
/// deadlines, not its input or output (up to the inline limit each: a long queue would hold
/// them all in the owning replica's memory). A deadline's transition reads the record anew.
fn kept(mut rec: JobRecord) -> JobRecord {
    rec.input = serde_json::Value::Null;
    rec.output = None;
    rec.s3_config = None;
    rec
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

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_protocol::codec::from_msgpack;

    #[test]
    fn an_open_job_is_kept_without_its_input_and_output_but_with_its_deadlines() {
        let sample = include_bytes!("../../../protocol/tests/samples/job_record.msgpack");
        let mut rec: JobRecord = from_msgpack(sample).expect("the sample record decodes");
        rec.input = serde_json::json!({"prompt": "x".repeat(10_000)});
        rec.output = Some(serde_json::json!({"partial": "y".repeat(10_000)}));
        rec.state = JobState::InProgress;
        rec.started_at_ms = Some(rec.submitted_at_ms + 5);
        let held = kept(rec.clone());
        assert_eq!(held.input, serde_json::Value::Null);
        assert_eq!(held.output, None);
        assert!(to_msgpack(&held).expect("encodes").len() < 2_000, "a few hundred bytes, not the payloads");
        let execution = rec.execution_deadline_ms().expect("running");
        assert!(lifecycle::overdue(&held, execution).is_some());
        for now in [0, execution - 1, execution, rec.ttl_deadline_ms(), u64::MAX] {
            assert_eq!(lifecycle::overdue(&held, now), lifecycle::overdue(&rec, now), "same deadlines at {now}");
        }
        assert_eq!(
            (held.id.clone(), held.state, held.policy.clone(), held.retries, held.queued_at_ms, held.delay_time_ms()),
            (rec.id.clone(), rec.state, rec.policy.clone(), rec.retries, rec.queued_at_ms, rec.delay_time_ms())
        );
    }
}
