//! The progress line on stderr while a run goes: done/total, errors, in flight, the rate over the
//! last interval and the ready workers. On a terminal one line is rewritten in place; otherwise a
//! line is printed every few seconds.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Default)]
pub struct Progress {
    pub submitted: AtomicU64,
    pub done: AtomicU64,
    pub errors: AtomicU64,
    /// Ready workers, when someone watches them.
    pub workers: Option<Arc<AtomicU64>>,
}

impl Progress {
    pub fn with_workers(workers: Arc<AtomicU64>) -> Progress {
        Progress { workers: Some(workers), ..Default::default() }
    }

    pub fn line(&self, label: &str, planned: Option<u64>, elapsed: Duration, rate: f64) -> String {
        let done = self.done.load(Ordering::Relaxed);
        let submitted = self.submitted.load(Ordering::Relaxed);
        let total = planned.map(|p| format!("/{p}")).unwrap_or_default();
        let mut s = format!(
            "[{label}] {done}{total} done, {} errors, {} in flight, {rate:.0} jobs/s",
            self.errors.load(Ordering::Relaxed),
            submitted.saturating_sub(done),
        );
        if let Some(w) = &self.workers {
            s.push_str(&format!(", {} workers ready", w.load(Ordering::Relaxed)));
        }
        s.push_str(&format!(", {:.1} s", elapsed.as_secs_f64()));
        s
    }
}

/// Prints the progress line until dropped.
pub struct ProgressPrinter {
    stop: Arc<AtomicBool>,
    task: Option<tokio::task::JoinHandle<()>>,
    tty: bool,
}

impl ProgressPrinter {
    pub fn start(progress: Arc<Progress>, label: String, planned: Option<u64>, enabled: bool) -> ProgressPrinter {
        let stop = Arc::new(AtomicBool::new(false));
        let tty = std::io::stderr().is_terminal();
        if !enabled {
            return ProgressPrinter { stop, task: None, tty };
        }
        let every = if tty { Duration::from_millis(250) } else { Duration::from_secs(5) };
        let stop_flag = stop.clone();
        let task = tokio::spawn(async move {
            let start = Instant::now();
            let mut last = (Instant::now(), 0u64);
            loop {
                tokio::time::sleep(every).await;
                if stop_flag.load(Ordering::Relaxed) {
                    break;
                }
                let done = progress.done.load(Ordering::Relaxed);
                let rate = (done - last.1) as f64 / last.0.elapsed().as_secs_f64().max(1e-3);
                last = (Instant::now(), done);
                let line = progress.line(&label, planned, start.elapsed(), rate);
                let mut err = std::io::stderr().lock();
                let _ = if tty { write!(err, "\r\x1b[2K{line}") } else { writeln!(err, "{line}") };
                let _ = err.flush();
            }
        });
        ProgressPrinter { stop, task: Some(task), tty }
    }

    pub async fn finish(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
            if self.tty {
                let _ = write!(std::io::stderr(), "\r\x1b[2K");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_shows_counts_and_workers() {
        let p = Progress::with_workers(Arc::new(AtomicU64::new(3)));
        p.submitted.store(10, Ordering::Relaxed);
        p.done.store(7, Ordering::Relaxed);
        p.errors.store(1, Ordering::Relaxed);
        let line = p.line("shoal", Some(20), Duration::from_millis(1500), 42.0);
        assert_eq!(line, "[shoal] 7/20 done, 1 errors, 3 in flight, 42 jobs/s, 3 workers ready, 1.5 s");
    }
}
