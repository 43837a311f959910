//! Memory over a run, for sizing: this process's resident memory (`/proc/self/status`; Linux,
//! elsewhere nothing is reported) before and after, with its peak, and — sampled every second
//! while shoal's jobs run — the same with, when the server's monitoring endpoint is known,
//! nats-server's resident memory and JetStream's stored bytes (the report's "memory over time":
//! whether they level off or keep growing with the retained jobs).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::stats::round3;
use crate::traffic::{MIB, Monitor};

/// How often the sampler reads.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// This process's resident memory before and after a run, and its peak so far, MiB.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcessMemory {
    pub rss_mib_before: f64,
    pub rss_mib_after: f64,
    /// The peak over the process's life so far (a baseline run first included).
    pub peak_mib: f64,
}

/// This process's resident memory now and its peak so far, MiB (`VmRSS`, `VmHWM`).
pub fn resident_mib() -> Option<(f64, f64)> {
    parse_status(&std::fs::read_to_string("/proc/self/status").ok()?)
}

fn parse_status(status: &str) -> Option<(f64, f64)> {
    let kib = |key: &str| -> Option<f64> {
        let line = status.lines().find(|l| l.starts_with(key))?;
        let value: f64 = line[key.len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(round3(value / 1024.0))
    };
    Some((kib("VmRSS:")?, kib("VmHWM:")?))
}

impl ProcessMemory {
    /// From the reading before a run (`resident_mib`) and one now.
    pub fn since(before: Option<(f64, f64)>) -> Option<ProcessMemory> {
        let (rss_mib_before, _) = before?;
        let (rss_mib_after, peak_mib) = resident_mib()?;
        Some(ProcessMemory { rss_mib_before, rss_mib_after, peak_mib })
    }
}

/// One reading of the memory, `t_s` seconds after the run's start.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MemoryPoint {
    pub t_s: f64,
    /// This process's resident memory, MiB.
    #[serde(default)]
    pub this_process_mib: Option<f64>,
    /// nats-server's resident memory (`/varz` `mem`), MiB.
    #[serde(default)]
    pub nats_server_mib: Option<f64>,
    /// What JetStream stores in all (`/jsz` storage + memory), MiB.
    #[serde(default)]
    pub stored_mib: Option<f64>,
}

async fn sample(monitor: Option<&Monitor>, start: Instant) -> MemoryPoint {
    let server = match monitor {
        Some(m) => m.snapshot().await,
        None => None,
    };
    MemoryPoint {
        t_s: round3(start.elapsed().as_secs_f64()),
        this_process_mib: resident_mib().map(|(rss, _)| rss),
        nats_server_mib: server.filter(|s| s.rss_bytes > 0).map(|s| round3(s.rss_bytes as f64 / MIB)),
        stored_mib: server.map(|s| round3(s.stored_bytes as f64 / MIB)),
    }
}

/// Reads the memory every [`SAMPLE_EVERY`] from its start (a first reading at once) until
/// [`MemorySampler::finish`] (a last reading then).
pub struct MemorySampler {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Vec<MemoryPoint>>,
}

impl MemorySampler {
    pub fn start(monitor: Option<Monitor>, start: Instant) -> MemorySampler {
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            let mut points = Vec::new();
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = tick.tick() => points.push(sample(monitor.as_ref(), start).await),
                }
            }
            points.push(sample(monitor.as_ref(), start).await);
            points
        });
        MemorySampler { stop, task }
    }

    /// Stops the sampling; every reading, the last one taken now.
    pub async fn finish(self) -> Vec<MemoryPoint> {
        let _ = self.stop.send(());
        self.task.await.unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_gives_resident_and_peak_memory() {
        let status = "Name:\tshoal-loadtest\nVmPeak:\t 900000 kB\nVmHWM:\t   92160 kB\nVmRSS:\t   30720 kB\n";
        assert_eq!(parse_status(status), Some((30.0, 90.0)));
        assert_eq!(parse_status("Name:\tx\nVmRSS:\t12 kB\n"), None, "no peak");
        assert_eq!(parse_status("VmRSS:\tmany kB\nVmHWM:\t1 kB\n"), None);
        let (rss, peak) = resident_mib().expect("Linux");
        assert!(rss > 0.0 && peak >= rss);
        let m = ProcessMemory::since(Some((1.0, 1.0))).expect("read");
        assert!(m.rss_mib_before == 1.0 && m.peak_mib >= m.rss_mib_after);
        assert!(ProcessMemory::since(None).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn the_sampler_reads_at_once_every_second_and_at_the_end() {
        let sampler = MemorySampler::start(None, Instant::now());
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let points = sampler.finish().await;
        let times: Vec<f64> = points.iter().map(|p| p.t_s).collect();
        assert_eq!(times, vec![0.0, 1.0, 2.0, 2.5], "{points:?}");
        assert!(points.iter().all(|p| p.this_process_mib.is_some_and(|m| m > 0.0)));
        assert!(points.iter().all(|p| p.nats_server_mib.is_none() && p.stored_mib.is_none()), "no monitor");
    }
}
