//! CPU time per job, by process, from `/proc/<pid>/stat` (Linux; elsewhere nothing is reported):
//! the NATS server (when the tester started it), this process (the tester, and for the embedded
//! installation shoal's control plane and host besides) and the worker processes. Ticks are
//! 1/100 s, so a run needs some seconds of work for the numbers to mean something.

use serde::{Deserialize, Serialize};

use crate::stats::round3;

/// Clock ticks per second of `/proc/*/stat` (`getconf CLK_TCK`; 100 on Linux).
const TICKS_PER_S: f64 = 100.0;

/// CPU milliseconds per completed job.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuPerJob {
    #[serde(default)]
    pub nats_server_ms: Option<f64>,
    /// The tester's process: for the embedded installation, shoal's control plane, host and
    /// gateway run in it too (and for the baseline, its in-process workers).
    pub this_process_ms: f64,
    /// The worker processes, over their whole life (start included).
    #[serde(default)]
    pub workers_ms: Option<f64>,
}

/// User + system CPU of a process so far, in ms (`None` when it cannot be read).
pub fn process_cpu_ms(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    parse_stat(&std::fs::read_to_string(path).ok()?)
}

/// utime + stime (fields 14 and 15) of a `/proc/<pid>/stat` line, in ms.
fn parse_stat(stat: &str) -> Option<f64> {
    // the command name may hold spaces and parentheses: count fields after the last ')'
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) * 1000.0 / TICKS_PER_S)
}

/// The CPU of this process and of the NATS server at one moment.
#[derive(Debug, Clone, Copy)]
pub struct CpuSnapshot {
    this_ms: Option<f64>,
    nats_ms: Option<f64>,
}

impl CpuSnapshot {
    pub fn take(nats_pid: Option<u32>) -> CpuSnapshot {
        CpuSnapshot { this_ms: process_cpu_ms(None), nats_ms: nats_pid.and_then(|p| process_cpu_ms(Some(p))) }
    }

    /// Per job since `self`; `workers_ms` is the workers' total CPU, if known.
    pub fn per_job(&self, now: &CpuSnapshot, jobs: u64, workers_ms: Option<f64>) -> Option<CpuPerJob> {
        if jobs == 0 {
            return None;
        }
        let per = |ms: f64| round3(ms / jobs as f64);
        Some(CpuPerJob {
            nats_server_ms: match (self.nats_ms, now.nats_ms) {
                (Some(a), Some(b)) => Some(per(b - a)),
                _ => None,
            },
            this_process_ms: per(now.this_ms? - self.this_ms?),
            workers_ms: workers_ms.map(per),
        })
    }
}

/// Total CPU of processes named by worker records' `runtime_ref` (`pid:<n>`).
pub fn workers_cpu_ms<'a>(runtime_refs: impl Iterator<Item = &'a str>) -> Option<f64> {
    let mut total = None;
    for r in runtime_refs {
        if let Some(ms) = r.strip_prefix("pid:").and_then(|p| p.parse().ok()).and_then(|p| process_cpu_ms(Some(p))) {
            *total.get_or_insert(0.0) += ms;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_are_read_past_odd_command_names() {
        let line = "1234 (tokio rt) worker)) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 1 0 0";
        assert_eq!(parse_stat(line), Some(3000.0));
        assert!(parse_stat("garbage").is_none());
        assert!(process_cpu_ms(None).is_some_and(|ms| ms >= 0.0));
    }

    #[test]
    fn per_job_divides_the_difference() {
        let a = CpuSnapshot { this_ms: Some(100.0), nats_ms: Some(50.0) };
        let b = CpuSnapshot { this_ms: Some(1100.0), nats_ms: Some(550.0) };
        let c = a.per_job(&b, 1000, Some(300.0)).expect("jobs ran");
        assert_eq!((c.this_process_ms, c.nats_server_ms, c.workers_ms), (1.0, Some(0.5), Some(0.3)));
        assert!(a.per_job(&b, 0, None).is_none());
    }
}
