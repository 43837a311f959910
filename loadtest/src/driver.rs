//! Runs a scenario: calls a job function at the scheduled times (open loop) or keeps a fixed
//! number of calls going (closed loop), and folds what each call reports into a [`RunResult`].
//! The driver knows nothing of shoal: the baseline and shoal both plug in a job function.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc};
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
}

impl JobOutcome {
    pub fn failed(code: impl Into<String>, sent: Instant) -> JobOutcome {
        JobOutcome {
            error: Some(code.into()),
            sent,
            accepted: None,
            done: Instant::now(),
            queue_ms: None,
            exec_ms: None,
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
    }
}

/// Runs `scenario`, calling `job(i)` for each job; returns the result and the start instant.
pub async fn drive<F, Fut>(
    scenario: &Scenario,
    max_in_flight: usize,
    progress: Arc<Progress>,
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
                        let out = job(i).await;
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
            tokio::spawn(async move {
                let limit = Arc::new(Semaphore::new(max_in_flight));
                let mut i = 0u64;
                while let Some(at) = open.arrival_s(i) {
                    let scheduled = start + Duration::from_secs_f64(at);
                    if scheduled > Instant::now() {
                        tokio::time::sleep_until(scheduled).await;
                    }
                    let Ok(permit) = limit.clone().acquire_owned().await else { break };
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
    while let Some(s) = rx.recv().await {
        if s.error.is_some() {
            progress.errors.fetch_add(1, Ordering::Relaxed);
        }
        progress.done.fetch_add(1, Ordering::Relaxed);
        recorder.record(&s);
    }
    let _ = feeder.await;
    (recorder.finish(), start)
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
                JobOutcome { error: None, sent, accepted: None, done: Instant::now(), queue_ms: Some(1), exec_ms: Some(2) }
            })
        }
    }

    #[tokio::test]
    async fn a_burst_runs_every_job_once() {
        let p = Arc::new(Progress::default());
        let (res, _) = drive(&Scenario::Burst { jobs: 500 }, 64, p.clone(), instant_job(100)).await;
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
        let (res, _) = drive(&scenario, 1000, p, instant_job(0)).await;
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
                JobOutcome { error: None, sent, accepted: None, done: Instant::now(), queue_ms: None, exec_ms: None }
            }
        };
        let scenario = Scenario::Closed { concurrency: 3, jobs: Some(30), duration_s: None };
        let (res, _) = drive(&scenario, 1, Arc::new(Progress::default()), job).await;
        assert_eq!(res.completed, 30);
        assert_eq!(most.load(Ordering::SeqCst), 3);
    }
}
