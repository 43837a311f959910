//! `--compare old.json`: the differences between two reports, metric by metric, with the change
//! in percent and whether it is better or worse.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;

use crate::report::Report;
use crate::stats::RunResult;

pub fn load(path: &Path) -> anyhow::Result<Report> {
    let bytes = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("{} is not a shoal-loadtest report", path.display()))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Better {
    Higher,
    Lower,
}

struct Row {
    name: String,
    old: Option<f64>,
    new: Option<f64>,
    better: Better,
}

fn rows_of(prefix: &str, old: Option<&RunResult>, new: Option<&RunResult>) -> Vec<Row> {
    let get = |r: Option<&RunResult>, f: fn(&RunResult) -> f64| r.map(f);
    let mut rows = Vec::new();
    let mut push = |name: &str, f: fn(&RunResult) -> f64, better: Better| {
        rows.push(Row { name: format!("{prefix}{name}"), old: get(old, f), new: get(new, f), better });
    };
    push("jobs/s", |r| r.jobs_per_s, Better::Higher);
    push("completed", |r| r.completed as f64, Better::Higher);
    push("errors", |r| r.errors as f64, Better::Lower);
    push("e2e p50 ms", |r| r.e2e.p50_ms, Better::Lower);
    push("e2e p90 ms", |r| r.e2e.p90_ms, Better::Lower);
    push("e2e p99 ms", |r| r.e2e.p99_ms, Better::Lower);
    push("e2e p99.9 ms", |r| r.e2e.p999_ms, Better::Lower);
    push("e2e max ms", |r| r.e2e.max_ms, Better::Lower);
    push("submit p50 ms", |r| r.submit.p50_ms, Better::Lower);
    push("queue p50 ms", |r| r.queue_delay.p50_ms, Better::Lower);
    push("queue p99 ms", |r| r.queue_delay.p99_ms, Better::Lower);
    push("execution p50 ms", |r| r.execution.p50_ms, Better::Lower);
    push("execution p99 ms", |r| r.execution.p99_ms, Better::Lower);
    push("first result ms", |r| r.first_result_ms.unwrap_or(f64::NAN), Better::Lower);
    push("NATS msgs in/job", |r| r.server.as_ref().map_or(f64::NAN, |t| t.msgs_in_per_job), Better::Lower);
    push("CPU ms/job (process)", |r| r.cpu.as_ref().map_or(f64::NAN, |c| c.this_process_ms), Better::Lower);
    push("CPU ms/job (nats)", |r| r.cpu.as_ref().and_then(|c| c.nats_server_ms).unwrap_or(f64::NAN), Better::Lower);
    push("stored B/job", |r| r.server.as_ref().and_then(|t| t.stored_bytes_per_job).unwrap_or(f64::NAN), Better::Lower);
    push("process MiB (after)", |r| r.process_memory.as_ref().map_or(f64::NAN, |m| m.rss_mib_after), Better::Lower);
    rows
}

fn cell(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_finite() => {
            if v.abs() >= 100.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.3}")
            }
        }
        _ => "-".into(),
    }
}

/// The comparison table, `old` then `new`.
pub fn compare(old: &Report, new: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "compare: old = {} ({}), new = {} ({})",
        old.test.scenario.describe(),
        old.mode,
        new.test.scenario.describe(),
        new.mode
    );
    if old.test.scenario != new.test.scenario || old.mode != new.mode || old.test.handler != new.test.handler {
        let _ = writeln!(out, "  warning: the two runs differ in scenario, mode or handler");
    }
    if old.machine.cpus != new.machine.cpus || old.machine.cpu_model != new.machine.cpu_model {
        let _ =
            writeln!(out, "  warning: different machines ({} / {})", old.machine.describe(), new.machine.describe());
    }
    let mut rows = rows_of("", Some(&old.shoal), Some(&new.shoal));
    if old.baseline.is_some() || new.baseline.is_some() {
        rows.extend(rows_of("baseline ", old.baseline.as_ref(), new.baseline.as_ref()).into_iter().take(4));
        rows.push(Row {
            name: "shoal/baseline %".into(),
            old: old.ratio.as_ref().map(|r| r.throughput_pct),
            new: new.ratio.as_ref().map(|r| r.throughput_pct),
            better: Better::Higher,
        });
    }
    rows.push(Row {
        name: "cold start p50 ms".into(),
        old: old.workers.cold_start_ms.as_ref().map(|p| p.p50_ms),
        new: new.workers.cold_start_ms.as_ref().map(|p| p.p50_ms),
        better: Better::Lower,
    });
    let _ = writeln!(out, "  {:<22} {:>12} {:>12} {:>9}", "metric", "old", "new", "change");
    for r in rows {
        let (Some(o), Some(n)) = (r.old.filter(|v| v.is_finite()), r.new.filter(|v| v.is_finite())) else {
            if r.old.is_some_and(f64::is_finite) || r.new.is_some_and(f64::is_finite) {
                let _ = writeln!(out, "  {:<22} {:>12} {:>12}", r.name, cell(r.old), cell(r.new));
            }
            continue;
        };
        let change = if o != 0.0 {
            format!("{:+.1} %", 100.0 * (n - o) / o.abs())
        } else if n == 0.0 {
            "=".into()
        } else {
            "new".into()
        };
        let verdict = if (n - o).abs() <= 0.02 * o.abs() {
            ""
        } else if (n > o) == (r.better == Better::Higher) {
            "  better"
        } else {
            "  worse"
        };
        let _ = writeln!(out, "  {:<22} {:>12} {:>12} {:>9}{verdict}", r.name, cell(Some(o)), cell(Some(n)), change);
    }
    out
}
