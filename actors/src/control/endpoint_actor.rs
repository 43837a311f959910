//! The endpoint actor: one per endpoint, on the control replica holding its lease. It keeps
//! the [book](super::job_book) of the endpoint's jobs (queued and running, and the counters),
//! from its job records (`shoal-jobs`, keys `<endpoint>.>`: read once when it starts, and again
//! after a gap in the events) and then from the job events (the replica's
//! [feed](super::feeds)), and on every tick ends the jobs whose ttl or execution
//! timeout passed (TIMED_OUT by compare-and-set), telling the worker's host to stop a running
//! one. Its child, the [scaler](super::scaler), sizes the workers from the demand this actor
//! measures (the worker records' changes pass through here to it), and is woken at once when
//! a normal-priority job is queued (scale from zero does not wait for the scaler's tick). It
//! answers the [owner queries](super::owner_queries) (`health`, `queued`, `waiting`) that the
//! API of any replica sends.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use shoal_protocol::api::JobCounts;
use shoal_protocol::codec::to_msgpack;
use shoal_protocol::endpoint::EndpointSpec;
use shoal_protocol::host::StopJob;
use shoal_protocol::job::{JobRecord, JobState, JobView};
use shoal_protocol::lifecycle;
use shoal_protocol::worker::WorkerRecord;

use super::feeds::{Entry, queued_jobs, read_job, spawn_history_read};
use super::hosts::HostDirectory;
use super::job_book::{JobBook, Noted};
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
    /// A change of one of the endpoint's jobs, from the replica's live feed (its job events).
    JobLive(Entry<JobView>),
    /// A job from the history read of that number (a read replaced by a later one — after a
    /// gap in the events — may still have sent some: they are dropped).
    JobHistory(u64, Entry<JobView>),
    /// The history read of that number is done; the bucket's revision before it began.
    JobsCaughtUp(u64, u64),
    /// The live feed may have missed events (a reconnect, a subscriber that fell behind):
    /// read the history again.
    Resync,
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
    /// What the actor knows of the endpoint's jobs.
    book: JobBook,
    /// The history read under way, if any, and the number of the last one started.
    history_read: Option<tokio::task::JoinHandle<()>>,
    reads: u64,
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
            book: JobBook::default(),
            history_read: None,
            reads: 0,
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
                st.read_history(myself);
                let _ = st.scaler.cast(ScalerMsg::Start);
            }
            EndpointMsg::Resync => {
                tracing::info!(endpoint_id = %st.spec.id, "job events may have been missed; reading the job records again");
                st.book.restart();
                st.read_history(myself);
            }
            EndpointMsg::JobLive(entry) => {
                let noted = st.book.live(entry);
                st.noted(noted);
            }
            EndpointMsg::JobHistory(read, entry) if read == st.reads => {
                let noted = st.book.history(entry);
                st.noted(noted);
            }
            EndpointMsg::JobHistory(..) => {}
            EndpointMsg::JobsCaughtUp(read, since) if read == st.reads => {
                st.history_read = None;
                for noted in st.book.caught_up(since) {
                    st.noted(noted);
                }
            }
            EndpointMsg::JobsCaughtUp(..) => {}
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
                    st.on_tick(&myself);
                }
                if st.cadence.count.is_multiple_of(st.cadence.scaler) && !st.tick_sent.swap(true, Ordering::AcqRel) {
                    let _ = st.scaler.cast(ScalerMsg::Tick(st.demand()));
                }
            }
            EndpointMsg::GetCounts(reply) => {
                let _ = reply.send(st.counts());
            }
            EndpointMsg::GetQueued(reply) => {
                let _ = reply.send(st.book.queued());
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
        for t in st.tasks.iter().chain(&st.history_read) {
            t.abort();
        }
        st.scaler.stop(None);
        crate::metrics::forget_endpoint(&st.spec.id);
        Ok(())
    }
}

impl EndpointState {
    /// Reads the endpoint's job records (the last value of each) into the book, replacing a
    /// read still under way.
    fn read_history(&mut self, myself: ActorRef<EndpointMsg>) {
        if let Some(read) = self.history_read.take() {
            read.abort();
        }
        self.reads += 1;
        let (read, filter) = (self.reads, self.nats.names.job_keys_of_endpoint(&self.spec.id));
        self.history_read = Some(spawn_history_read(
            self.nats.clone(),
            |n| &n.jobs,
            filter,
            Some(queued_jobs(self.spec.id.clone())),
            self.limits.clone(),
            myself,
            move |e: Entry<JobRecord>| EndpointMsg::JobHistory(read, view_entry(e)),
            move |since| EndpointMsg::JobsCaughtUp(read, since),
        ));
    }

    fn noted(&mut self, noted: Noted) {
        if noted.queued && !self.wake.swap(true, Ordering::AcqRel) {
            // newly queued: the scaler starts a worker at once if there is none
            let _ = self.scaler.cast(ScalerMsg::Wake);
        }
        if let Some(view) = noted.ended {
            crate::metrics::job_ended(&self.spec.id, &view);
        }
    }

    fn demand(&self) -> Demand {
        self.book.demand(now_ms())
    }

    fn counts(&self) -> JobCounts {
        self.book.counts()
    }

    /// Ends overdue jobs. Each is a compare-and-set that re-checks the deadline on the record
    /// it reads, so a job that finished meanwhile is left alone; when the record says the job
    /// is not overdue after all (an event was missed), the book gets the record as it is.
    fn on_tick(&mut self, myself: &ActorRef<EndpointMsg>) {
        let now = now_ms();
        self.book.forget_expired(now);
        let demand = self.demand();
        if self.published != Some(demand) {
            crate::metrics::set_demand(&self.spec.id, &demand);
            self.published = Some(demand);
        }
        for id in self.book.overdue(now) {
            // rare (a job overdue): the store is made when needed, not held by every actor
            let (store, nats) = (JobStore::new(Nats::clone(&self.nats)), self.nats.clone());
            let (endpoint, myself) = (self.spec.id.clone(), myself.clone());
            tokio::spawn(async move {
                let applied = store
                    .transition(&endpoint, &id, |r| match lifecycle::overdue(r, now_ms()) {
                        Some(reason) => lifecycle::time_out(r, reason, now_ms()),
                        None => Err(lifecycle::TransitionError::NotRunning("not overdue")),
                    })
                    .await;
                match applied {
                    Ok(Applied::Changed { record, previous, .. }) => {
                        tracing::info!(endpoint_id = %endpoint, job_id = %id, reason = ?record.error, "job timed out");
                        if previous.state == JobState::InProgress {
                            send_stop(&nats, &previous, record.error.as_deref().unwrap_or("timed out")).await;
                        }
                    }
                    // the book was behind the record: give it the record as it is now
                    Ok(Applied::Refused { .. } | Applied::NotFound) => read_job(&store, &myself, &endpoint, id).await,
                    // tried again on the next tick (a store that is down says so elsewhere)
                    Err(e) => {
                        tracing::debug!(endpoint_id = %endpoint, job_id = %id, error = %e, "cannot time out an overdue job")
                    }
                }
            });
        }
    }
}

/// A record from the history read as the book keeps it.
fn view_entry(e: Entry<JobRecord>) -> Entry<JobView> {
    Entry { value: e.value.map(|rec| JobView::of(&rec, e.revision)), id: e.id, revision: e.revision }
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
