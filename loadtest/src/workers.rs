//! The workers of the endpoint over time and every cold start with its phases, from the worker
//! events on `SHOAL_EVENTS` (`<prefix>.events.worker.>`). [`WorkerTracker`] is the pure part
//! (events in, counts and cold starts out); [`WorkerWatch`] feeds it from NATS.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use shoal_protocol::codec::from_msgpack;
use shoal_protocol::events::WorkerEvent;
use shoal_protocol::names::Names;
use shoal_protocol::worker::{WorkerRecord, WorkerState};
use tokio::sync::oneshot;

use crate::stats::{Percentiles, round3};

/// Worker counts at one moment; `t_s` is seconds since the scenario started (negative during
/// the warm-up).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerPoint {
    pub t_s: f64,
    /// Every worker that is not stopped.
    pub total: u32,
    pub initializing: u32,
    pub idle: u32,
    pub running: u32,
    /// Throttled, unhealthy or outdated.
    pub other: u32,
}

impl WorkerPoint {
    fn same_counts(&self, o: &WorkerPoint) -> bool {
        (self.total, self.initializing, self.idle, self.running, self.other)
            == (o.total, o.initializing, o.idle, o.running, o.other)
    }
}

/// The phases of a start as the host reports them in worker events (`start`): read leniently,
/// field by field, so the tester keeps working as the host learns to report more.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartPhases {
    /// A warm start reused a stopped container of the same endpoint version (FlashBoot).
    #[serde(default)]
    pub warm: bool,
    #[serde(default)]
    pub pull_ms: Option<u64>,
    #[serde(default)]
    pub create_ms: Option<u64>,
    #[serde(default)]
    pub start_ms: Option<u64>,
    /// From the start request to the worker's first ping.
    #[serde(default)]
    pub first_ping_ms: Option<u64>,
    /// From the start request to its first job.
    #[serde(default)]
    pub first_job_ms: Option<u64>,
}

impl StartPhases {
    /// `cold: start 12, ping 40, job 55` (the phases that happened, ms).
    pub fn summary(&self) -> String {
        let phases = [
            ("pull", self.pull_ms),
            ("create", self.create_ms),
            ("start", self.start_ms),
            ("ping", self.first_ping_ms),
            ("job", self.first_job_ms),
        ];
        let parts: Vec<String> = phases.iter().filter_map(|(n, ms)| ms.map(|ms| format!("{n} {ms}"))).collect();
        let kind = if self.warm { "warm" } else { "cold" };
        if parts.is_empty() { kind.to_string() } else { format!("{kind}: {}", parts.join(", ")) }
    }
}

/// The part of a worker event the tester reads besides [`WorkerEvent`]'s own fields.
#[derive(Debug, Default, Deserialize)]
pub struct EventExtras {
    #[serde(default)]
    pub start: Option<StartPhases>,
}

/// One worker start, from its first event until it asked for work, and its first job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ColdStart {
    pub worker_id: String,
    pub host: String,
    /// When its first event arrived, seconds since the scenario started.
    pub at_s: f64,
    /// Throttled (wanted, no capacity) until placed, ms.
    pub throttled_ms: Option<f64>,
    /// Initializing (process or container starting) until ready (first job-take), ms.
    pub initializing_ms: Option<f64>,
    /// Ready until its first job started, ms.
    pub first_job_ms: Option<f64>,
    /// Restarts by the supervisor before this start.
    pub restarts: u32,
    /// The phases the host reported for this start, the latest it told.
    #[serde(default)]
    pub phases: Option<StartPhases>,
}

impl ColdStart {
    /// First event to ready, ms (`None` while it never got ready).
    pub fn to_ready_ms(&self) -> Option<f64> {
        self.initializing_ms.map(|i| i + self.throttled_ms.unwrap_or(0.0))
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkersReport {
    pub timeline: Vec<WorkerPoint>,
    pub cold_starts: Vec<ColdStart>,
    pub max_total: u32,
    /// Most workers idle or running at once.
    pub max_ready: u32,
    /// Cold start to ready, over all cold starts that got ready.
    #[serde(default)]
    pub cold_start_ms: Option<Percentiles>,
    /// Worker events received.
    pub events: u64,
}

struct Tracked {
    state: WorkerState,
    /// Its latest cold start, as an index into `cold_starts`.
    last_start: Option<usize>,
    /// The open cold start, as an index into `cold_starts`, with the phase timestamps (ms).
    open: Option<OpenStart>,
}

struct OpenStart {
    index: usize,
    first_ms: u64,
    throttled_at_ms: Option<u64>,
    initializing_at_ms: Option<u64>,
    ready_at_ms: Option<u64>,
}

/// Events in, counts and cold starts out. Times are seconds since `origin` until
/// [`WorkerTracker::finish`] shifts them to the scenario start.
#[derive(Default)]
pub struct WorkerTracker {
    workers: HashMap<String, Tracked>,
    timeline: Vec<WorkerPoint>,
    cold_starts: Vec<ColdStart>,
    max_total: u32,
    max_ready: u32,
    events: u64,
}

fn is_ready(s: WorkerState) -> bool {
    matches!(s, WorkerState::Idle | WorkerState::Running)
}

fn is_starting(s: WorkerState) -> bool {
    matches!(s, WorkerState::Initializing | WorkerState::Throttled)
}

impl WorkerTracker {
    /// Workers that existed before the watch began (not cold starts).
    pub fn seed(&mut self, records: &[WorkerRecord], t_s: f64) {
        for r in records {
            self.workers.entry(r.id.clone()).or_insert(Tracked { state: r.state, last_start: None, open: None });
        }
        self.sample(t_s);
    }

    pub fn on_event(&mut self, e: &WorkerEvent, phases: Option<StartPhases>, t_s: f64) {
        self.events += 1;
        let previous = self.workers.get(&e.worker_id).map(|w| w.state);
        let tracked =
            self.workers.entry(e.worker_id.clone()).or_insert(Tracked { state: e.state, last_start: None, open: None });
        tracked.state = e.state;
        if is_starting(e.state) && tracked.open.is_none() && !previous.is_some_and(is_starting) {
            self.cold_starts.push(ColdStart {
                worker_id: e.worker_id.clone(),
                host: e.host.clone(),
                at_s: round3(t_s),
                throttled_ms: None,
                initializing_ms: None,
                first_job_ms: None,
                restarts: e.restarts,
                phases: None,
            });
            tracked.last_start = Some(self.cold_starts.len() - 1);
            tracked.open = Some(OpenStart {
                index: self.cold_starts.len() - 1,
                first_ms: e.at_ms,
                throttled_at_ms: None,
                initializing_at_ms: None,
                ready_at_ms: None,
            });
        }
        if let (Some(phases), Some(i)) = (phases, tracked.last_start) {
            self.cold_starts[i].phases = Some(phases);
        }
        if let Some(open) = tracked.open.as_mut() {
            let cs = &mut self.cold_starts[open.index];
            let since = |from: u64| Some(e.at_ms.saturating_sub(from) as f64);
            match e.state {
                WorkerState::Throttled if open.throttled_at_ms.is_none() && open.initializing_at_ms.is_none() => {
                    open.throttled_at_ms = Some(e.at_ms)
                }
                WorkerState::Initializing if open.initializing_at_ms.is_none() => {
                    open.initializing_at_ms = Some(e.at_ms);
                    if let Some(th) = open.throttled_at_ms {
                        cs.throttled_ms = since(th);
                    }
                }
                WorkerState::Idle | WorkerState::Running if open.ready_at_ms.is_none() => {
                    open.ready_at_ms = Some(e.at_ms);
                    cs.initializing_ms = since(open.initializing_at_ms.unwrap_or(open.first_ms));
                    if e.state == WorkerState::Running {
                        cs.first_job_ms = Some(0.0);
                    }
                }
                WorkerState::Running if cs.first_job_ms.is_none() => {
                    cs.first_job_ms = since(open.ready_at_ms.unwrap_or(open.first_ms));
                }
                _ => {}
            }
            let done = cs.first_job_ms.is_some()
                || matches!(e.state, WorkerState::Stopped | WorkerState::Unhealthy)
                || (open.ready_at_ms.is_some() && e.state == WorkerState::Initializing);
            if done {
                tracked.open = None;
            }
        }
        if e.state == WorkerState::Stopped {
            self.workers.remove(&e.worker_id);
        }
        let (total, ready) = self.counts_now();
        self.max_total = self.max_total.max(total);
        self.max_ready = self.max_ready.max(ready);
    }

    fn counts_now(&self) -> (u32, u32) {
        let live = self.workers.values().filter(|w| w.state != WorkerState::Stopped);
        let (mut total, mut ready) = (0, 0);
        for w in live {
            total += 1;
            if is_ready(w.state) {
                ready += 1;
            }
        }
        (total, ready)
    }

    pub fn ready(&self) -> u32 {
        self.counts_now().1
    }

    /// Records the counts at `t_s` when they changed since the last point.
    pub fn sample(&mut self, t_s: f64) {
        let mut p = WorkerPoint { t_s: round3(t_s), ..Default::default() };
        for w in self.workers.values() {
            match w.state {
                WorkerState::Stopped => continue,
                WorkerState::Initializing => p.initializing += 1,
                WorkerState::Idle => p.idle += 1,
                WorkerState::Running => p.running += 1,
                _ => p.other += 1,
            }
            p.total += 1;
        }
        self.max_total = self.max_total.max(p.total);
        self.max_ready = self.max_ready.max(p.idle + p.running);
        if self.timeline.last().is_none_or(|last| !last.same_counts(&p)) {
            self.timeline.push(p);
        }
    }

    /// The report, with times shifted by `shift_s` (origin to scenario start) and the timeline
    /// thinned to at most 2000 points.
    pub fn finish(mut self, t_s: f64, shift_s: f64) -> WorkersReport {
        self.sample(t_s);
        if let Some(last) = self.timeline.last().cloned()
            && last.t_s < round3(t_s)
        {
            self.timeline.push(WorkerPoint { t_s: round3(t_s), ..last }); // the step plot runs to the end
        }
        // the stretch before the first worker is noise on the plot: keep its last point only
        if let Some(first) = self.timeline.iter().position(|p| p.total > 0) {
            self.timeline.drain(..first.saturating_sub(1));
            if first > 0 && self.timeline.len() >= 2 {
                // the zero point just before the first worker, not wherever the watch began
                self.timeline[0].t_s = self.timeline[0].t_s.max(round3(self.timeline[1].t_s - 0.1));
            }
        }
        let step = self.timeline.len().div_ceil(2000).max(1);
        let n = self.timeline.len();
        let mut timeline: Vec<WorkerPoint> = self
            .timeline
            .into_iter()
            .enumerate()
            .filter(|(i, _)| i % step == 0 || *i + 1 == n)
            .map(|(_, p)| p)
            .collect();
        for p in &mut timeline {
            p.t_s = round3(p.t_s - shift_s);
        }
        for c in &mut self.cold_starts {
            c.at_s = round3(c.at_s - shift_s);
        }
        let mut ready: Vec<f64> = self.cold_starts.iter().filter_map(ColdStart::to_ready_ms).collect();
        ready.sort_by(f64::total_cmp);
        let cold_start_ms = (!ready.is_empty()).then(|| {
            let at = |q: f64| ready[((ready.len() as f64 - 1.0) * q).round() as usize];
            Percentiles {
                count: ready.len() as u64,
                min_ms: ready[0],
                mean_ms: round3(ready.iter().sum::<f64>() / ready.len() as f64),
                p50_ms: at(0.5),
                p90_ms: at(0.9),
                p99_ms: at(0.99),
                p999_ms: at(0.999),
                max_ms: ready[ready.len() - 1],
            }
        });
        WorkersReport {
            timeline,
            cold_starts: self.cold_starts,
            max_total: self.max_total,
            max_ready: self.max_ready,
            cold_start_ms,
            events: self.events,
        }
    }
}

/// Watches the worker events of one endpoint in the background.
pub struct WorkerWatch {
    origin: Instant,
    ready: Arc<AtomicU64>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<WorkerTracker>,
}

impl WorkerWatch {
    /// Subscribes first, then seeds with the endpoint's current workers (`seed`), so no change
    /// falls between the two.
    pub async fn start<F, Fut>(
        client: &async_nats::Client,
        names: &Names,
        endpoint: &str,
        seed: F,
    ) -> anyhow::Result<Self>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Vec<WorkerRecord>>,
    {
        let mut sub = client.subscribe(names.events_of_kind("worker")).await?;
        let origin = Instant::now();
        let mut tracker = WorkerTracker::default();
        tracker.seed(&seed().await, 0.0);
        let ready = Arc::new(AtomicU64::new(u64::from(tracker.ready())));
        let (stop_tx, mut stop_rx) = oneshot::channel();
        let endpoint = endpoint.to_string();
        let ready_out = ready.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tokio::select! {
                    msg = sub.next() => {
                        let Some(msg) = msg else { break };
                        match from_msgpack::<WorkerEvent>(&msg.payload) {
                            Ok(e) if e.endpoint == endpoint => {
                                let extras = from_msgpack::<EventExtras>(&msg.payload).unwrap_or_default();
                                tracker.on_event(&e, extras.start, origin.elapsed().as_secs_f64());
                                ready_out.store(u64::from(tracker.ready()), Ordering::Relaxed);
                            }
                            Ok(_) => {}
                            Err(e) => tracing::debug!(error = %e, "undecodable worker event ignored"),
                        }
                    }
                    _ = tick.tick() => tracker.sample(origin.elapsed().as_secs_f64()),
                    _ = &mut stop_rx => break,
                }
            }
            tracker
        });
        Ok(WorkerWatch { origin, ready, stop: Some(stop_tx), task })
    }

    /// Workers idle or running now.
    pub fn ready(&self) -> Arc<AtomicU64> {
        self.ready.clone()
    }

    /// Stops watching; times in the report are relative to `scenario_start`.
    pub async fn finish(mut self, scenario_start: Instant) -> WorkersReport {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let shift = scenario_start.saturating_duration_since(self.origin).as_secs_f64();
        let now = self.origin.elapsed().as_secs_f64();
        match self.task.await {
            Ok(tracker) => tracker.finish(now, shift),
            Err(_) => WorkersReport::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(worker: &str, state: WorkerState, at_ms: u64) -> WorkerEvent {
        WorkerEvent {
            worker_id: worker.into(),
            endpoint: "ep".into(),
            host: "h".into(),
            state,
            reason: None,
            restarts: 0,
            failures: 0,
            backoff_ms: None,
            at_ms,
            start: None,
        }
    }

    #[test]
    fn a_cold_start_has_its_phases() {
        let mut t = WorkerTracker::default();
        t.on_event(&ev("w1", WorkerState::Throttled, 1000), None, 1.0);
        t.on_event(&ev("w1", WorkerState::Initializing, 1050), None, 1.05);
        t.sample(1.06);
        t.on_event(&ev("w1", WorkerState::Idle, 1250), None, 1.25);
        t.on_event(&ev("w1", WorkerState::Running, 1260), None, 1.26);
        t.on_event(&ev("w1", WorkerState::Idle, 1270), None, 1.27);
        let r = t.finish(2.0, 1.0);
        assert_eq!(r.cold_starts.len(), 1);
        let cs = &r.cold_starts[0];
        assert_eq!(cs.throttled_ms, Some(50.0));
        assert_eq!(cs.initializing_ms, Some(200.0));
        assert_eq!(cs.first_job_ms, Some(10.0));
        assert_eq!(cs.to_ready_ms(), Some(250.0));
        assert_eq!(cs.at_s, 0.0); // shifted to the scenario start
        assert_eq!(r.cold_start_ms.as_ref().map(|p| p.p50_ms), Some(250.0));
        assert_eq!((r.max_total, r.max_ready), (1, 1));
        assert_eq!(r.events, 5);
    }

    #[test]
    fn seeded_workers_are_counted_but_are_not_cold_starts() {
        let rec = WorkerRecord {
            id: "w0".into(),
            endpoint: "ep".into(),
            host: "h".into(),
            state: WorkerState::Idle,
            reason: None,
            spec_version: 1,
            current_jobs: vec![],
            runtime_ref: None,
            restarts: 0,
            failures: 0,
            started_at_ms: 0,
            updated_at_ms: 0,
            jobs_done: 0,
            start: None,
        };
        let mut t = WorkerTracker::default();
        t.seed(&[rec], 0.0);
        t.on_event(&ev("w0", WorkerState::Running, 10), None, 0.1);
        t.on_event(&ev("w1", WorkerState::Initializing, 20), None, 0.2);
        t.sample(0.3);
        t.on_event(&ev("w0", WorkerState::Stopped, 30), None, 0.4);
        t.sample(0.5);
        let r = t.finish(1.0, 0.0);
        assert_eq!(r.cold_starts.len(), 1);
        assert_eq!(r.cold_starts[0].worker_id, "w1");
        assert_eq!(r.cold_starts[0].initializing_ms, None); // never got ready
        assert!(r.cold_start_ms.is_none());
        let totals: Vec<u32> = r.timeline.iter().map(|p| p.total).collect();
        assert_eq!(totals, vec![1, 2, 1, 1]);
        assert_eq!(r.timeline.last().map(|p| p.t_s), Some(1.0));
        // a watch that began long before the first worker starts its plot just before it
        let mut t = WorkerTracker::default();
        t.sample(0.0);
        t.sample(3.0);
        t.on_event(&ev("w1", WorkerState::Initializing, 0), None, 5.0);
        t.sample(5.0);
        let r = t.finish(6.0, 0.0);
        assert_eq!(r.timeline.first().map(|p| (p.t_s, p.total)), Some((4.9, 0)));
    }

    #[test]
    fn the_phases_the_host_reports_are_kept_with_the_start() {
        let mut t = WorkerTracker::default();
        t.on_event(&ev("w1", WorkerState::Initializing, 0), None, 0.0);
        let first = StartPhases { start_ms: Some(12), ..StartPhases::default() };
        t.on_event(&ev("w1", WorkerState::Idle, 40), Some(first), 0.04);
        let later = StartPhases { start_ms: Some(12), first_job_ms: Some(55), ..StartPhases::default() };
        t.on_event(&ev("w1", WorkerState::Running, 55), Some(later.clone()), 0.055);
        let r = t.finish(1.0, 0.0);
        assert_eq!(r.cold_starts[0].phases, Some(later));
        // the extras decode from an event that has them, and from one that has not
        let with: EventExtras =
            serde_json::from_value(serde_json::json!({"start": {"warm": true, "start_ms": 5}})).expect("extras");
        assert_eq!(with.start.map(|p| (p.warm, p.start_ms)), Some((true, Some(5))));
        let without: EventExtras = serde_json::from_value(serde_json::json!({"state": "IDLE"})).expect("extras");
        assert!(without.start.is_none());
    }

    #[test]
    fn a_crashed_worker_starting_again_is_a_new_cold_start() {
        let mut t = WorkerTracker::default();
        t.on_event(&ev("w1", WorkerState::Initializing, 0), None, 0.0);
        t.on_event(&ev("w1", WorkerState::Idle, 100), None, 0.1);
        t.on_event(&ev("w1", WorkerState::Running, 110), None, 0.11);
        t.on_event(&ev("w1", WorkerState::Unhealthy, 120), None, 0.12);
        t.on_event(&ev("w1", WorkerState::Initializing, 500), None, 0.5);
        t.on_event(&ev("w1", WorkerState::Idle, 650), None, 0.65);
        let r = t.finish(1.0, 0.0);
        let ready: Vec<Option<f64>> = r.cold_starts.iter().map(ColdStart::to_ready_ms).collect();
        assert_eq!(ready, vec![Some(100.0), Some(150.0)]);
    }
}
