//! The result of a load test: [`Report`] (written as JSON, read back by `--compare`), the
//! machine it ran on, the workers seen, the ratio to the baseline, and the text summary.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::config::{LoadTest, Target};
use crate::scenario::Scenario;
use crate::stats::{Percentiles, RunResult};
use crate::workers::WorkersReport;

pub const REPORT_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub version: u32,
    pub tool: String,
    /// Unix time of the start, ms.
    pub started_at_ms: u64,
    /// The command line, when run from the CLI.
    #[serde(default)]
    pub command: Option<String>,
    pub machine: Machine,
    pub test: LoadTest,
    /// The endpoint the jobs ran on.
    pub endpoint_id: String,
    /// The transport and wait mode actually used: `nats/async`, `http/sync`.
    pub mode: String,
    pub shoal: RunResult,
    #[serde(default)]
    pub baseline: Option<RunResult>,
    #[serde(default)]
    pub ratio: Option<Ratio>,
    pub workers: WorkersReport,
    /// Jobs whose terminal event never arrived; their result was read with `status` instead,
    /// and their end to end time is an upper bound.
    #[serde(default)]
    pub events_missed: u64,
    /// Notes about the run worth knowing when reading the numbers.
    #[serde(default)]
    pub notes: Vec<String>,
}

/// Shoal compared with the raw JetStream baseline of the same run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ratio {
    /// shoal jobs/s ÷ baseline jobs/s, in percent.
    pub throughput_pct: f64,
    /// shoal e2e p50 ÷ baseline e2e p50 (how many times slower).
    pub e2e_p50_x: f64,
    /// shoal e2e p99 ÷ baseline e2e p99.
    pub e2e_p99_x: f64,
}

impl Ratio {
    pub fn of(shoal: &RunResult, baseline: &RunResult) -> Option<Ratio> {
        if baseline.jobs_per_s <= 0.0 {
            return None;
        }
        let x = |a: f64, b: f64| if b > 0.0 { crate::stats::round3(a / b) } else { 0.0 };
        Some(Ratio {
            throughput_pct: crate::stats::round3(100.0 * shoal.jobs_per_s / baseline.jobs_per_s),
            e2e_p50_x: x(shoal.e2e.p50_ms, baseline.e2e.p50_ms),
            e2e_p99_x: x(shoal.e2e.p99_ms, baseline.e2e.p99_ms),
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub memory_gib: f64,
    pub os: String,
    pub kernel: String,
}

impl Machine {
    /// Reads what Linux tells (`/proc`); elsewhere, what std knows.
    pub fn detect() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_kib: f64 = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
        Machine {
            cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            cpu_model,
            memory_gib: crate::stats::round3(mem_kib / 1024.0 / 1024.0),
            os: std::env::consts::OS.to_string(),
            kernel,
        }
    }

    pub fn describe(&self) -> String {
        let model = if self.cpu_model.is_empty() { "unknown CPU" } else { &self.cpu_model };
        format!("{} CPUs ({model}), {:.1} GiB, {} {}", self.cpus, self.memory_gib, self.os, self.kernel)
    }
}

fn row(out: &mut String, name: &str, r: &RunResult) {
    let _ = writeln!(
        out,
        "  {name:<10} {:>9.1} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        r.jobs_per_s,
        r.completed,
        ms(r.e2e.p50_ms),
        ms(r.e2e.p90_ms),
        ms(r.e2e.p99_ms),
        ms(r.e2e.p999_ms),
        ms(r.e2e.max_ms),
    );
}

fn ms(v: f64) -> String {
    if v >= 100.0 { format!("{v:.0}") } else { format!("{v:.2}") }
}

fn pct_line(out: &mut String, name: &str, p: &Percentiles) {
    if p.count == 0 {
        return;
    }
    let _ = writeln!(
        out,
        "  {name:<14} p50 {:>8}  p90 {:>8}  p99 {:>8}  p99.9 {:>8}  max {:>8}  ms",
        ms(p.p50_ms),
        ms(p.p90_ms),
        ms(p.p99_ms),
        ms(p.p999_ms),
        ms(p.max_ms)
    );
}

fn errors_line(r: &RunResult) -> String {
    if r.errors_by_code.is_empty() {
        return "none".into();
    }
    r.errors_by_code.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join(", ")
}

impl Report {
    /// The text summary printed at the end of a run.
    pub fn summary(&self) -> String {
        let t = &self.test;
        let mut out = String::new();
        let target = match &t.target {
            Target::Embedded { runtime, .. } => format!("embedded installation, {} runtime", runtime.name()),
            Target::External { nats_url, prefix, .. } => format!("installation at {nats_url} (prefix {prefix})"),
        };
        let transport = t.submit_describe();
        let slots = t.endpoint.concurrency;
        let env = if slots > 1 { format!(", {slots} job slots each") } else { String::new() };
        let _ = writeln!(out, "shoal-loadtest: {}", t.scenario.describe());
        let _ = writeln!(
            out,
            "  handler {}, payload {} B, {transport} ({}), endpoint {} (workers {}..{}{env}), {target}",
            t.handler.describe(),
            t.payload_bytes,
            self.mode,
            self.endpoint_id,
            t.endpoint.workers_min,
            t.endpoint.workers_max,
        );
        let _ = writeln!(out, "  machine: {}", self.machine.describe());
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "  {:<10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "", "jobs/s", "done", "e2e p50", "p90", "p99", "p99.9", "max ms"
        );
        if let Some(b) = &self.baseline {
            row(&mut out, "baseline", b);
        }
        row(&mut out, "shoal", &self.shoal);
        if let Some(r) = &self.ratio {
            let _ = writeln!(
                out,
                "  shoal/baseline: {:.1} % of the throughput; e2e p50 {:.1}x, p99 {:.1}x",
                r.throughput_pct, r.e2e_p50_x, r.e2e_p99_x
            );
        }
        let _ = writeln!(out);
        let s = &self.shoal;
        pct_line(&mut out, "submit", &s.submit);
        pct_line(&mut out, "queue delay", &s.queue_delay);
        pct_line(&mut out, "execution", &s.execution);
        pct_line(&mut out, "end to end", &s.e2e);
        if s.phase_take.count > 0 {
            let _ = writeln!(out, "  phases on the tester's clock, from the job events as they arrive:");
            pct_line(&mut out, "  -> queued", &s.phase_queued);
            pct_line(&mut out, "  -> started", &s.phase_take);
            pct_line(&mut out, "  -> result", &s.phase_run);
        }
        let open_rate = matches!(t.scenario, Scenario::Rate { .. } | Scenario::Ramp { .. } | Scenario::Step { .. });
        if open_rate && s.schedule_lag.p99_ms >= 5.0 {
            let _ = writeln!(
                out,
                "  note: sends fell behind the schedule (lag p99 {} ms): the tester itself was saturated",
                ms(s.schedule_lag.p99_ms)
            );
        }
        if let Some(first) = s.first_result_ms {
            let _ = writeln!(out, "  first result {} ms after the first submit", ms(first));
        }
        let _ = writeln!(out, "  submitted {}, completed {}, errors: {}", s.submitted, s.completed, errors_line(s));
        for (name, r) in [("shoal", Some(s)), ("baseline", self.baseline.as_ref())] {
            if let Some(c) = r.and_then(|r| r.cpu.as_ref()) {
                let mut parts = vec![format!("this process {:.3}", c.this_process_ms)];
                if let Some(n) = c.nats_server_ms {
                    parts.push(format!("nats-server {n:.3}"));
                }
                if let Some(w) = c.workers_ms {
                    parts.push(format!("worker processes {w:.3}"));
                }
                let _ = writeln!(out, "  CPU ms per job ({name}): {}", parts.join(", "));
            }
            if let Some(t) = r.and_then(|r| r.server.as_ref()) {
                let api = if t.js_api_per_job >= 0.05 {
                    format!(", {:.1} JetStream API calls", t.js_api_per_job)
                } else {
                    String::new()
                };
                let _ = writeln!(
                    out,
                    "  NATS server per job ({name}): {:.1} msgs in, {:.1} msgs out, {:.0} B in, {:.0} B out{api}",
                    t.msgs_in_per_job, t.msgs_out_per_job, t.bytes_in_per_job, t.bytes_out_per_job
                );
            }
            if let Some(line) = r.and_then(memory_line) {
                let _ = writeln!(out, "  memory ({name}): {line}");
            }
        }
        if let Some(b) = &self.baseline
            && b.errors > 0
        {
            let _ = writeln!(out, "  baseline errors: {}", errors_line(b));
        }
        if self.events_missed > 0 {
            let _ = writeln!(
                out,
                "  {} jobs had no terminal event; their results were read with status",
                self.events_missed
            );
        }
        let w = &self.workers;
        let _ = writeln!(
            out,
            "  workers: at most {} ({} ready at most); {} cold starts",
            w.max_total,
            w.max_ready,
            w.cold_starts.len()
        );
        if let Some(p) = &w.cold_start_ms {
            let _ = writeln!(
                out,
                "    cold start (first event -> ready): p50 {} ms, max {} ms",
                ms(p.p50_ms),
                ms(p.max_ms)
            );
        }
        for c in w.cold_starts.iter().filter(|c| c.phases.is_some()).take(5) {
            let phases = c.phases.as_ref().map(crate::workers::StartPhases::summary).unwrap_or_default();
            let _ = writeln!(out, "    {} at {:.3} s: {phases}", c.worker_id, c.at_s);
        }
        for note in &self.notes {
            let _ = writeln!(out, "  note: {note}");
        }
        out
    }
}

/// What a run left in memory and storage: the NATS server's resident memory before and after
/// and its stored bytes per job, this process's resident memory before and after (and its peak).
pub fn memory_line(r: &RunResult) -> Option<String> {
    let mut parts = Vec::new();
    if let Some(t) = &r.server {
        let mut server = Vec::new();
        if let (Some(b), Some(a)) = (t.rss_mib_before, t.rss_mib_after) {
            server.push(format!("{b:.0} → {a:.0} MiB"));
        }
        if let Some(stored) = t.stored_bytes_per_job {
            server.push(format!("{stored:+.0} B stored per job"));
        }
        if !server.is_empty() {
            parts.push(format!("nats-server {}", server.join(", ")));
        }
    }
    if let Some(m) = &r.process_memory {
        parts.push(format!(
            "this process {:.0} → {:.0} MiB (peak {:.0})",
            m.rss_mib_before, m.rss_mib_after, m.peak_mib
        ));
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{Recorder, Sample};

    fn result(jobs_per_ms: u64) -> RunResult {
        let mut r = Recorder::default();
        for i in 0..100 {
            r.record(&Sample {
                error: None,
                sent_us: 0,
                done_us: (i + 1) * 1000 / jobs_per_ms,
                submit_us: None,
                queue_us: None,
                exec_us: None,
                lag_us: 0,
                queued_seen_us: None,
                started_seen_us: None,
            });
        }
        r.finish()
    }

    #[test]
    fn the_ratio_is_shoal_over_baseline() {
        let ratio = Ratio::of(&result(1), &result(4)).expect("baseline ran");
        assert!((ratio.throughput_pct - 25.0).abs() < 0.5, "{ratio:?}");
        assert!((ratio.e2e_p50_x - 4.0).abs() < 0.2, "{ratio:?}");
        assert!(Ratio::of(&result(1), &RunResult::default()).is_none());
    }

    #[test]
    fn the_memory_line_names_what_was_read() {
        let mut r = result(1);
        assert_eq!(memory_line(&r), None);
        r.server = Some(crate::traffic::ServerTraffic {
            stored_bytes_per_job: Some(1234.4),
            rss_mib_before: Some(44.2),
            rss_mib_after: Some(510.0),
            ..Default::default()
        });
        assert_eq!(memory_line(&r).as_deref(), Some("nats-server 44 → 510 MiB, +1234 B stored per job"));
        r.process_memory =
            Some(crate::memory::ProcessMemory { rss_mib_before: 29.0, rss_mib_after: 90.4, peak_mib: 92.0 });
        let old_report = crate::traffic::ServerTraffic { msgs_in_per_job: 7.0, ..Default::default() };
        let only_process = RunResult { server: Some(old_report), ..r.clone() };
        assert_eq!(memory_line(&only_process).as_deref(), Some("this process 29 → 90 MiB (peak 92)"));
        if let Some(t) = r.server.as_mut() {
            t.rss_mib_after = None;
        }
        assert_eq!(
            memory_line(&r).as_deref(),
            Some("nats-server +1234 B stored per job; this process 29 → 90 MiB (peak 92)")
        );
    }

    #[test]
    fn the_machine_is_described() {
        let m = Machine::detect();
        assert!(m.cpus >= 1);
        assert!(m.describe().contains("CPUs"));
    }
}
