//! What one run measured: a [`Sample`] per job, folded by the [`Recorder`] into hdrhistograms
//! (end to end, submit, queue delay, execution), counts of errors by code and a per-job
//! completion log for the plots; [`Recorder::finish`] turns them into a [`RunResult`].

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// What happened to one job, as the load tester saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// `None`: completed. Otherwise the error key: an API error code (`overloaded`,
    /// `unavailable`, ...), `job_failed` / `job_timed_out` / `job_cancelled` for jobs that ended
    /// so, or `no_result` when the tester gave up waiting.
    pub error: Option<String>,
    /// When the request left the tester, in µs since the run started.
    pub sent_us: u64,
    /// When the result was seen, in µs since the run started (for failed submissions: when the
    /// error came back).
    pub done_us: u64,
    /// Sent to accepted (the reply to an asynchronous submit), in µs.
    pub submit_us: Option<u64>,
    /// The job's queue delay as shoal recorded it (`delay_time_ms`), in µs.
    pub queue_us: Option<u64>,
    /// The job's execution time as shoal recorded it (`execution_time_ms`), in µs.
    pub exec_us: Option<u64>,
    /// How late the request left compared with the schedule, in µs.
    pub lag_us: u64,
    /// When the job's queued and started events were seen, in µs since the run started (async
    /// mode): the phases of a job on the tester's own clock, at µs resolution.
    pub queued_seen_us: Option<u64>,
    pub started_seen_us: Option<u64>,
}

impl Sample {
    pub fn e2e_us(&self) -> u64 {
        self.done_us.saturating_sub(self.sent_us)
    }
}

/// Percentiles of one latency, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub min_ms: f64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

/// One bucket of the latency-over-time plot (by completion time).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimeBucket {
    /// Start of the bucket, seconds since the run started.
    pub t_s: f64,
    pub completed: u64,
    pub jobs_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// A point of the latency-by-percentile curve: `percentile` (0..100) and the e2e latency.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantilePoint {
    pub percentile: f64,
    pub ms: f64,
}

/// Everything one run (shoal or the baseline) measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    pub submitted: u64,
    pub completed: u64,
    pub errors: u64,
    /// Error key -> count (see [`Sample::error`]).
    pub errors_by_code: BTreeMap<String, u64>,
    /// First send to last result, seconds.
    pub duration_s: f64,
    /// Completed jobs per second over `duration_s`.
    pub jobs_per_s: f64,
    /// Send rate achieved: submitted jobs over first to last send.
    pub submitted_per_s: f64,
    /// First send to the first completed result, ms (the cold start as a client sees it).
    pub first_result_ms: Option<f64>,
    /// Submit to result, completed jobs only.
    pub e2e: Percentiles,
    /// Send to accepted (asynchronous submits only).
    pub submit: Percentiles,
    pub queue_delay: Percentiles,
    pub execution: Percentiles,
    /// How far sends fell behind the schedule (the generator's own health).
    pub schedule_lag: Percentiles,
    /// The phases of completed jobs on the tester's clock, from the job events as they arrive
    /// (async mode): send to queued event, queued to started event, started event to result.
    #[serde(default)]
    pub phase_queued: Percentiles,
    #[serde(default)]
    pub phase_take: Percentiles,
    #[serde(default)]
    pub phase_run: Percentiles,
    pub timeline: Vec<TimeBucket>,
    pub e2e_by_percentile: Vec<QuantilePoint>,
    /// What the NATS server handled per completed job, when its monitoring endpoint is known.
    #[serde(default)]
    pub server: Option<crate::traffic::ServerTraffic>,
    /// CPU per completed job by process, when it can be read.
    #[serde(default)]
    pub cpu: Option<crate::cpu::CpuPerJob>,
    /// This process's resident memory before and after the run, when it can be read.
    #[serde(default)]
    pub process_memory: Option<crate::memory::ProcessMemory>,
    /// Memory read every second while the jobs ran (shoal's run only).
    #[serde(default)]
    pub memory_timeline: Vec<crate::memory::MemoryPoint>,
    /// The run was stopped early (Ctrl-C); jobs in flight then are not counted.
    #[serde(default)]
    pub interrupted: bool,
}

fn histogram() -> Histogram<u64> {
    // 1 µs .. 1 h at 3 significant digits
    Histogram::new_with_bounds(1, 3_600_000_000, 3)
        .unwrap_or_else(|_| unreachable!("constant bounds are valid for hdrhistogram"))
}

fn percentiles(h: &Histogram<u64>) -> Percentiles {
    if h.is_empty() {
        return Percentiles::default();
    }
    let ms = |us: u64| round3(us as f64 / 1000.0);
    Percentiles {
        count: h.len(),
        min_ms: ms(h.min()),
        mean_ms: round3(h.mean() / 1000.0),
        p50_ms: ms(h.value_at_quantile(0.5)),
        p90_ms: ms(h.value_at_quantile(0.9)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        p999_ms: ms(h.value_at_quantile(0.999)),
        max_ms: ms(h.max()),
    }
}

pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Folds samples as they arrive.
pub struct Recorder {
    e2e: Histogram<u64>,
    submit: Histogram<u64>,
    queue: Histogram<u64>,
    exec: Histogram<u64>,
    lag: Histogram<u64>,
    phases: [Histogram<u64>; 3],
    errors_by_code: BTreeMap<String, u64>,
    submitted: u64,
    completed: u64,
    first_sent_us: Option<u64>,
    last_sent_us: u64,
    last_done_us: u64,
    first_result_us: Option<u64>,
    /// (done µs, e2e µs) of completed jobs, for the timeline.
    log: Vec<(u64, u64)>,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder {
            e2e: histogram(),
            submit: histogram(),
            queue: histogram(),
            exec: histogram(),
            lag: histogram(),
            phases: [histogram(), histogram(), histogram()],
            errors_by_code: BTreeMap::new(),
            submitted: 0,
            completed: 0,
            first_sent_us: None,
            last_sent_us: 0,
            last_done_us: 0,
            first_result_us: None,
            log: Vec::new(),
        }
    }
}

impl Recorder {
    pub fn record(&mut self, s: &Sample) {
        self.submitted += 1;
        self.first_sent_us = Some(self.first_sent_us.map_or(s.sent_us, |f| f.min(s.sent_us)));
        self.last_sent_us = self.last_sent_us.max(s.sent_us);
        self.last_done_us = self.last_done_us.max(s.done_us);
        self.lag.saturating_record(s.lag_us.max(1));
        if let Some(us) = s.submit_us {
            self.submit.saturating_record(us.max(1));
        }
        match &s.error {
            Some(code) => *self.errors_by_code.entry(code.clone()).or_default() += 1,
            None => {
                self.completed += 1;
                let e2e = s.e2e_us();
                self.e2e.saturating_record(e2e.max(1));
                if let Some(us) = s.queue_us {
                    self.queue.saturating_record(us.max(1));
                }
                if let Some(us) = s.exec_us {
                    self.exec.saturating_record(us.max(1));
                }
                if let (Some(q), Some(st)) = (s.queued_seen_us, s.started_seen_us) {
                    self.phases[0].saturating_record(q.saturating_sub(s.sent_us).max(1));
                    self.phases[1].saturating_record(st.saturating_sub(q).max(1));
                    self.phases[2].saturating_record(s.done_us.saturating_sub(st).max(1));
                }
                self.first_result_us = Some(self.first_result_us.map_or(s.done_us, |f| f.min(s.done_us)));
                self.log.push((s.done_us, e2e));
            }
        }
    }

    pub fn completed(&self) -> u64 {
        self.completed
    }

    pub fn finish(mut self) -> RunResult {
        let first = self.first_sent_us.unwrap_or(0);
        let duration_us = self.last_done_us.saturating_sub(first);
        let duration_s = duration_us as f64 / 1e6;
        let send_span_s = self.last_sent_us.saturating_sub(first) as f64 / 1e6;
        let errors = self.submitted - self.completed;
        RunResult {
            submitted: self.submitted,
            completed: self.completed,
            errors,
            errors_by_code: std::mem::take(&mut self.errors_by_code),
            duration_s: round3(duration_s),
            jobs_per_s: if duration_s > 0.0 { round3(self.completed as f64 / duration_s) } else { 0.0 },
            submitted_per_s: if send_span_s > 0.0 { round3(self.submitted as f64 / send_span_s) } else { 0.0 },
            first_result_ms: self.first_result_us.map(|f| round3(f.saturating_sub(first) as f64 / 1000.0)),
            e2e: percentiles(&self.e2e),
            submit: percentiles(&self.submit),
            queue_delay: percentiles(&self.queue),
            execution: percentiles(&self.exec),
            schedule_lag: percentiles(&self.lag),
            phase_queued: percentiles(&self.phases[0]),
            phase_take: percentiles(&self.phases[1]),
            phase_run: percentiles(&self.phases[2]),
            timeline: timeline(&mut self.log, first),
            e2e_by_percentile: by_percentile(&self.e2e),
            server: None,
            cpu: None,
            process_memory: None,
            memory_timeline: Vec::new(),
            interrupted: false,
        }
    }
}

/// Buckets completions by time: about 150 buckets over the run, at least 10 ms wide.
fn timeline(log: &mut [(u64, u64)], first_us: u64) -> Vec<TimeBucket> {
    if log.is_empty() {
        return vec![];
    }
    log.sort_unstable();
    let span_us = log[log.len() - 1].0.saturating_sub(first_us);
    let width_us = (span_us / 150).max(10_000);
    let mut out = Vec::new();
    let mut i = 0;
    while i < log.len() {
        let bucket = log[i].0.saturating_sub(first_us) / width_us;
        let mut j = i;
        while j < log.len() && log[j].0.saturating_sub(first_us) / width_us == bucket {
            j += 1;
        }
        let mut lat: Vec<u64> = log[i..j].iter().map(|(_, e)| *e).collect();
        lat.sort_unstable();
        let at = |q: f64| lat[((lat.len() as f64 - 1.0) * q).round() as usize] as f64 / 1000.0;
        out.push(TimeBucket {
            t_s: round3((bucket * width_us) as f64 / 1e6),
            completed: lat.len() as u64,
            jobs_per_s: round3(lat.len() as f64 / (width_us as f64 / 1e6)),
            p50_ms: round3(at(0.5)),
            p99_ms: round3(at(0.99)),
            max_ms: round3(at(1.0)),
        });
        i = j;
    }
    out
}

fn by_percentile(h: &Histogram<u64>) -> Vec<QuantilePoint> {
    if h.is_empty() {
        return vec![];
    }
    [0.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99, 100.0]
        .iter()
        .map(|p| QuantilePoint { percentile: *p, ms: round3(h.value_at_quantile(p / 100.0) as f64 / 1000.0) })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(sent_ms: u64, done_ms: u64) -> Sample {
        Sample {
            error: None,
            sent_us: sent_ms * 1000,
            done_us: done_ms * 1000,
            submit_us: Some(500),
            queue_us: Some(2000),
            exec_us: Some(1000),
            lag_us: 0,
            queued_seen_us: Some(sent_ms * 1000 + 100),
            started_seen_us: Some(sent_ms * 1000 + 300),
        }
    }

    #[test]
    fn counts_throughput_and_percentiles() {
        let mut r = Recorder::default();
        for i in 0..100 {
            r.record(&ok(0, 10 + i)); // e2e 10..109 ms, last result at 109 ms
        }
        r.record(&Sample { error: Some("overloaded".into()), ..ok(0, 1) });
        r.record(&Sample { error: Some("job_failed".into()), ..ok(0, 50) });
        let res = r.finish();
        assert_eq!((res.submitted, res.completed, res.errors), (102, 100, 2));
        assert_eq!(res.errors_by_code.get("overloaded"), Some(&1));
        assert_eq!(res.errors_by_code.get("job_failed"), Some(&1));
        assert!((res.e2e.p50_ms - 59.0).abs() < 1.0, "{:?}", res.e2e);
        assert!((res.e2e.max_ms - 109.0).abs() < 0.2, "{:?}", res.e2e);
        assert_eq!(res.e2e.count, 100);
        assert!((res.jobs_per_s - 100.0 / 0.109).abs() < 1.0, "{}", res.jobs_per_s);
        assert_eq!(res.first_result_ms, Some(10.0));
        assert_eq!(res.queue_delay.p50_ms, 2.0);
        assert_eq!(res.execution.count, 100);
        assert_eq!((res.phase_queued.p50_ms, res.phase_take.p50_ms), (0.1, 0.2));
        assert!(!res.timeline.is_empty());
        assert_eq!(res.timeline.iter().map(|b| b.completed).sum::<u64>(), 100);
        assert_eq!(res.e2e_by_percentile.last().map(|p| p.percentile), Some(100.0));
    }

    #[test]
    fn an_empty_run_is_all_zeros() {
        let res = Recorder::default().finish();
        assert_eq!(res.completed, 0);
        assert_eq!(res.jobs_per_s, 0.0);
        assert!(res.timeline.is_empty());
        assert_eq!(res.first_result_ms, None);
    }

    #[test]
    fn the_timeline_buckets_by_completion_time() {
        let mut r = Recorder::default();
        for i in 0..10 {
            r.record(&ok(0, i)); // 10 jobs in the first 10 ms
        }
        for i in 0..5 {
            r.record(&ok(0, 30 + i)); // 5 more in the fourth bucket
        }
        let res = r.finish();
        let counts: Vec<(f64, u64)> = res.timeline.iter().map(|b| (b.t_s, b.completed)).collect();
        assert_eq!(counts, vec![(0.0, 10), (0.03, 5)]);
        assert_eq!(res.timeline[0].jobs_per_s, 1000.0);
        // a long run has about 150 buckets
        let mut r = Recorder::default();
        for i in 0..3000 {
            r.record(&ok(0, 1 + i * 10));
        }
        let n = r.finish().timeline.len();
        assert!((140..=160).contains(&n), "{n}");
    }
}
