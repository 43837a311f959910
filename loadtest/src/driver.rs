//! Runs a scenario: calls a job function at the scheduled times (open loop) or keeps a fixed
//! number of calls going (closed loop), and folds what each call reports into a [`RunResult`].
//! The driver knows nothing of shoal: the baseline and shoal both plug in a job function.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::Instant;

use crate::progress::Progress;
use crate::scenario::Scenario;
use crate::stats::{Recorder, RunResult, Sample};

/// What one job function call reports.
#[derive(Debug, Clone)]
pub struct JobOutcome {
    /// `None`: completed; otherwise the error key (see [`Sample::error`]).
    pub error: Option<String>,
    /// When the request left.
    pub sent: Instant,
    /// When an asynchronous submit was accepted.
    pub accepted: Option<Instant>,
    /// When the result (or the error) was seen.
    pub done: Instant,
    pub queue_ms: Option<u64>,
    pub exec_ms: Option<u64>,
    /// When the job's queued and started events were seen here (async mode).
    pub queued_seen: Option<Instant>,
    pub started_seen: Option<Instant>,
}

impl JobOutcome {
    /// A job sent at `sent` whose result is seen now; set the rest with struct update syntax.
    pub fn done(sent: Instant) -> JobOutcome {
        JobOutcome {
            error: None,
            sent,
            accepted: None,
            done: Instant::now(),
            queue_ms: None,
            exec_ms: None,
            queued_seen: None,
            started_seen: None,
        }
    }

    pub fn failed(code: impl Into<String>, sent: Instant) -> JobOutcome {
        JobOutcome { error: Some(code.into()), ..JobOutcome::done(sent) }
    }
}

/// Stops a run early (Ctrl-C). Clones share it; it fires only when its sender says so.
#[derive(Clone)]
pub struct Cancel(watch::Receiver<bool>);

impl Cancel {
    /// A cancel and the sender that fires it.
    pub fn new() -> (watch::Sender<bool>, Cancel) {
        let (tx, rx) = watch::channel(false);
        (tx, Cancel(rx))
    }

    /// A cancel that never fires (its sender is gone).
    pub fn never() -> Cancel {
        Cancel::new().1
    }

    pub fn is_cancelled(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves when the run is cancelled; never, if it is not.
    pub async fn cancelled(&self) {
        let mut rx = self.0.clone();
        if rx.wait_for(|c| *c).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn sample(out: &JobOutcome, start: Instant, scheduled: Instant) -> Sample {
    Sample {
        error: out.error.clone(),
        sent_us: us(out.sent.saturating_duration_since(start)),
        done_us: us(out.done.saturating_duration_since(start)),
        submit_us: out.accepted.map(|a| us(a.saturating_duration_since(out.sent))),
        queue_us: out.queue_ms.map(|m| m * 1000),
        exec_us: out.exec_ms.map(|m| m * 1000),
        lag_us: us(out.sent.saturating_duration_since(scheduled)),
        queued_seen_us: out.queued_seen.map(|t| us(t.saturating_duration_since(start))),
        started_seen_us: out.started_seen.map(|t| us(t.saturating_duration_since(start))),
    }
}

/// Runs `scenario`, calling `job(i)` for each job; returns the result and the start instant.
/// A cancelled run stops at once: jobs still in flight are left out, and the result says so.
pub async fn drive<F, Fut>(
    scenario: &Scenario,
    max_in_flight: usize,
    progress: Arc<Progress>,
    cancel: &Cancel,
    job: F,
) -> (RunResult, Instant)
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = JobOutcome> + Send + 'static,
{
    let job = Arc::new(job);
    let (tx, mut rx) = mpsc::unbounded_channel::<Sample>();
    let start = Instant::now();
    let feeder = match scenario.clone() {
        Scenario::Closed { concurrency, jobs, duration_s } => {
            let deadline = duration_s.map(|d| start + Duration::from_secs_f64(d));
            let next = Arc::new(AtomicU64::new(0));
            let mut loops = Vec::new();
            for _ in 0..concurrency {
                let (job, tx, next, progress) = (job.clone(), tx.clone(), next.clone(), progress.clone());
                let cancel = cancel.clone();
                loops.push(tokio::spawn(async move {
                    loop {
                        if deadline.is_some_and(|d| Instant::now() >= d) {
                            break;
                        }
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if jobs.is_some_and(|n| i >= n) {
                            break;
                        }
                        progress.submitted.fetch_add(1, Ordering::Relaxed);
                        let scheduled = Instant::now();
                        let out = tokio::select! {
                            out = job(i) => out,
                            _ = cancel.cancelled() => break,
                        };
                        if tx.send(sample(&out, start, scheduled)).is_err() {
                            break;
                        }
                    }
                }));
            }
            tokio::spawn(async move {
                for l in loops {
                    let _ = l.await;
                }
            })
        }
        open => {
            let tx = tx.clone();
            let progress = progress.clone();
            let cancel = cancel.clone();
            tokio::spawn(async move {
                let limit = Arc::new(Semaphore::new(max_in_flight));
                let mut i = 0u64;
                while let Some(at) = open.arrival_s(i) {
                    let scheduled = start + Duration::from_secs_f64(at);
                    let permit = tokio::select! {
                        permit = async {
                            if scheduled > Instant::now() {
                                tokio::time::sleep_until(scheduled).await;
                            }
                            limit.clone().acquire_owned().await
                        } => permit,
                        _ = cancel.cancelled() => break,
                    };
                    let Ok(permit) = permit else { break };
                    progress.submitted.fetch_add(1, Ordering::Relaxed);
                    let (job, tx) = (job.clone(), tx.clone());
                    tokio::spawn(async move {
                        let out = job(i).await;
                        drop(permit);
                        let _ = tx.send(sample(&out, start, scheduled));
                    });
                    i += 1;
                }
            })
        }
    };
    drop(tx);
    let mut recorder = Recorder::default();
    loop {
        let s = tokio::select! {
            s = rx.recv() => s,
            _ = cancel.cancelled() => None,
        };
        let Some(s) = s else { break };
        if s.error.is_some() {
            progress.errors.fetch_add(1, Ordering::Relaxed);
        }
        progress.done.fetch_add(1, Ordering::Relaxed);
        recorder.record(&s);
    }
    if cancel.is_cancelled() {
        feeder.abort();
    }
    let _ = feeder.await;
    let mut result = recorder.finish();
    result.interrupted = cancel.is_cancelled();
    (result, start)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instant_job(fail_every: u64) -> impl Fn(u64) -> std::pin::Pin<Box<dyn Future<Output = JobOutcome> + Send>> {
        move |i| {
            Box::pin(async move {
                let sent = Instant::now();
                tokio::task::yield_now().await;
                if fail_every > 0 && i % fail_every == 0 {
                    return JobOutcome::failed("overloaded", sent);
                }
                JobOutcome { queue_ms: Some(1), exec_ms: Some(2), ..JobOutcome::done(sent) }
            })
        }
    }

    #[tokio::test]
    async fn a_burst_runs_every_job_once() {
        let p = Arc::new(Progress::default());
        let (res, _) = drive(&Scenario::Burst { jobs: 500 }, 64, p.clone(), &Cancel::never(), instant_job(100)).await;
        assert_eq!(res.submitted, 500);
        assert_eq!(res.completed, 495);
        assert_eq!(res.errors_by_code.get("overloaded"), Some(&5));
        assert_eq!(p.done.load(Ordering::Relaxed), 500);
        assert_eq!(res.execution.p50_ms, 2.0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_follows_the_schedule() {
        let p = Arc::new(Progress::default());
        let scenario = Scenario::Rate { jobs_per_s: 100.0, duration_s: 2.0 };
        let t0 = Instant::now();
        let (res, _) = drive(&scenario, 1000, p, &Cancel::never(), instant_job(0)).await;
        assert_eq!(res.submitted, 200);
        // the last job is due at 1.99 s: the run takes the schedule's time, not less
        assert!(t0.elapsed() >= Duration::from_millis(1990), "{:?}", t0.elapsed());
    }

    #[tokio::test]
    async fn the_closed_loop_keeps_its_concurrency_and_budget() {
        let in_flight = Arc::new(AtomicU64::new(0));
        let most = Arc::new(AtomicU64::new(0));
        let (f, m) = (in_flight.clone(), most.clone());
        let job = move |_i: u64| {
            let (f, m) = (f.clone(), m.clone());
            async move {
                let sent = Instant::now();
                let now = f.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(1)).await;
                f.fetch_sub(1, Ordering::SeqCst);
                JobOutcome::done(sent)
            }
        };
        let scenario = Scenario::Closed { concurrency: 3, jobs: Some(30), duration_s: None };
        let (res, _) = drive(&scenario, 1, Arc::new(Progress::default()), &Cancel::never(), job).await;
        assert_eq!(res.completed, 30);
        assert_eq!(most.load(Ordering::SeqCst), 3);
        assert!(!res.interrupted);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_run_stops_at_once_and_says_so() {
        let (stop, cancel) = Cancel::new();
        let scenario = Scenario::Rate { jobs_per_s: 10.0, duration_s: 3600.0 };
        let t0 = Instant::now();
        let run = drive(&scenario, 100, Arc::new(Progress::default()), &cancel, instant_job(0));
        let stopper = async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let _ = stop.send(true);
        };
        let ((res, _), ()) = tokio::join!(run, stopper);
        assert!(res.interrupted);
        assert!((19..=21).contains(&res.submitted), "{}", res.submitted);
        assert!(t0.elapsed() < Duration::from_secs(3));
    }
}
