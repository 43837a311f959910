//! The self-contained HTML report: the summary, latency and throughput over time, the latency
//! by percentile, the workers over time and the cold starts, the memory over time. Plots are
//! inline SVG ([`crate::svg`]); the page loads nothing.

use std::fmt::Write as _;

use crate::report::Report;
use crate::stats::{Percentiles, RunResult};
use crate::svg::{Chart, Series, escape, line_chart};

const BLUE: &str = "#1f77b4";
const ORANGE: &str = "#ff7f0e";
const GREEN: &str = "#2ca02c";
const RED: &str = "#d62728";
const PURPLE: &str = "#9467bd";
const GREY: &str = "#7f7f7f";

fn pct_row(out: &mut String, name: &str, p: &Percentiles) {
    if p.count == 0 {
        return;
    }
    let _ = write!(
        out,
        "<tr><th>{}</th><td>{}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td></tr>",
        escape(name),
        p.count,
        p.min_ms,
        p.mean_ms,
        p.p50_ms,
        p.p90_ms,
        p.p99_ms,
        p.p999_ms,
        p.max_ms
    );
}

fn latency_table(out: &mut String, r: &RunResult, with_shoal_times: bool) {
    out.push_str("<table><tr><th></th><th>count</th><th>min</th><th>mean</th><th>p50</th><th>p90</th><th>p99</th><th>p99.9</th><th>max</th></tr>");
    pct_row(out, "end to end", &r.e2e);
    pct_row(out, "submit", &r.submit);
    if with_shoal_times {
        pct_row(out, "queue delay", &r.queue_delay);
        pct_row(out, "execution", &r.execution);
        pct_row(out, "send → queued event", &r.phase_queued);
        pct_row(out, "queued → started event", &r.phase_take);
        pct_row(out, "started event → result", &r.phase_run);
    }
    pct_row(out, "schedule lag", &r.schedule_lag);
    out.push_str("</table><p class=\"small\">milliseconds</p>");
    let mut costs = Vec::new();
    if let Some(c) = &r.cpu {
        costs.push(format!("CPU per job: this process {:.3} ms", c.this_process_ms));
        if let Some(n) = c.nats_server_ms {
            costs.push(format!("nats-server {n:.3} ms"));
        }
        if let Some(w) = c.workers_ms {
            costs.push(format!("worker processes {w:.3} ms"));
        }
    }
    if let Some(t) = &r.server {
        costs.push(format!(
            "NATS server per job: {:.1} msgs in, {:.1} msgs out, {:.0} B in, {:.0} B out",
            t.msgs_in_per_job, t.msgs_out_per_job, t.bytes_in_per_job, t.bytes_out_per_job
        ));
    }
    if let Some(line) = crate::report::memory_line(r) {
        costs.push(format!("memory: {line}"));
    }
    if !costs.is_empty() {
        let _ = write!(out, "<p>{}</p>", escape(&costs.join("; ")));
    }
}

fn counts_table(out: &mut String, rows: &[(&str, &RunResult)]) {
    out.push_str("<table><tr><th></th><th>jobs/s</th><th>submitted</th><th>completed</th><th>errors</th><th>duration s</th><th>first result ms</th><th>errors by code</th></tr>");
    for (name, r) in rows {
        let codes: Vec<String> = r.errors_by_code.iter().map(|(k, v)| format!("{}: {v}", escape(k))).collect();
        let _ = write!(
            out,
            "<tr><th>{}</th><td>{:.1}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.3}</td><td>{}</td><td>{}</td></tr>",
            escape(name),
            r.jobs_per_s,
            r.submitted,
            r.completed,
            r.errors,
            r.duration_s,
            r.first_result_ms.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into()),
            if codes.is_empty() { "none".into() } else { codes.join(", ") }
        );
    }
    out.push_str("</table>");
}

fn series(name: &str, color: &'static str, points: Vec<(f64, f64)>, dashed: bool) -> Series {
    Series { name: name.into(), color, points, step: false, dashed }
}

/// x position of a percentile on a "nines" axis: 0 → 0, 90 → 1, 99 → 2, 99.9 → 3, capped at 5.
fn nines(p: f64) -> f64 {
    let rest = (100.0 - p) / 100.0;
    if rest <= 1e-5 { 5.0 } else { -rest.log10() }
}

fn latency_charts(r: &Report) -> String {
    let mut out = String::new();
    let s = &r.shoal;
    let mut lat = vec![
        series("shoal p50", BLUE, s.timeline.iter().map(|b| (b.t_s, b.p50_ms)).collect(), false),
        series("shoal p99", ORANGE, s.timeline.iter().map(|b| (b.t_s, b.p99_ms)).collect(), false),
        series("shoal max", RED, s.timeline.iter().map(|b| (b.t_s, b.max_ms)).collect(), false),
    ];
    let mut thr = vec![series("shoal", BLUE, s.timeline.iter().map(|b| (b.t_s, b.jobs_per_s)).collect(), false)];
    let mut pct =
        vec![series("shoal", BLUE, s.e2e_by_percentile.iter().map(|q| (nines(q.percentile), q.ms)).collect(), false)];
    if let Some(b) = &r.baseline {
        lat.push(series("baseline p50", GREY, b.timeline.iter().map(|b| (b.t_s, b.p50_ms)).collect(), true));
        lat.push(series("baseline p99", PURPLE, b.timeline.iter().map(|b| (b.t_s, b.p99_ms)).collect(), true));
        thr.push(series("baseline", GREY, b.timeline.iter().map(|b| (b.t_s, b.jobs_per_s)).collect(), true));
        pct.push(series(
            "baseline",
            GREY,
            b.e2e_by_percentile.iter().map(|q| (nines(q.percentile), q.ms)).collect(),
            true,
        ));
    }
    out.push_str(&line_chart(&Chart {
        title: "End-to-end latency over time (by completion time)".into(),
        x_label: "seconds since the start".into(),
        y_label: "ms".into(),
        series: lat,
        x_ticks: None,
    }));
    out.push_str(&line_chart(&Chart {
        title: "Throughput over time".into(),
        x_label: "seconds since the start".into(),
        y_label: "completed jobs/s".into(),
        series: thr,
        x_ticks: None,
    }));
    let ticks = [("0%", 0.0), ("90%", 90.0), ("99%", 99.0), ("99.9%", 99.9), ("99.99%", 99.99), ("max", 100.0)]
        .iter()
        .map(|(l, p)| (nines(*p), l.to_string()))
        .collect();
    out.push_str(&line_chart(&Chart {
        title: "End-to-end latency by percentile".into(),
        x_label: "percentile".into(),
        y_label: "ms".into(),
        series: pct,
        x_ticks: Some(ticks),
    }));
    out
}

fn worker_chart(r: &Report) -> String {
    let tl = &r.workers.timeline;
    let pick = |f: fn(&crate::workers::WorkerPoint) -> u32| tl.iter().map(|p| (p.t_s, f64::from(f(p)))).collect();
    let step = |name: &str, color: &'static str, points: Vec<(f64, f64)>| Series {
        name: name.into(),
        color,
        points,
        step: true,
        dashed: false,
    };
    line_chart(&Chart {
        title: "Workers over time".into(),
        x_label: "seconds since the start (negative: warm-up)".into(),
        y_label: "workers".into(),
        series: vec![
            step("total", GREY, pick(|p| p.total)),
            step("running", BLUE, pick(|p| p.running)),
            step("idle", GREEN, pick(|p| p.idle)),
            step("initializing", ORANGE, pick(|p| p.initializing)),
            step("throttled/unhealthy", RED, pick(|p| p.other)),
        ],
        x_ticks: None,
    })
}

/// nats-server's and this process's resident memory and JetStream's store over the run, when
/// read at least twice.
fn memory_chart(r: &RunResult) -> Option<String> {
    let tl = &r.memory_timeline;
    if tl.len() < 2 {
        return None;
    }
    let pick = |f: fn(&crate::memory::MemoryPoint) -> Option<f64>| -> Vec<(f64, f64)> {
        tl.iter().filter_map(|p| f(p).map(|v| (p.t_s, v))).collect()
    };
    let lines = [
        ("nats-server resident", BLUE, pick(|p| p.nats_server_mib)),
        ("JetStream stored", GREEN, pick(|p| p.stored_mib)),
        ("this process resident", ORANGE, pick(|p| p.this_process_mib)),
    ];
    let series: Vec<Series> =
        lines.into_iter().filter(|(_, _, points)| !points.is_empty()).map(|(n, c, p)| series(n, c, p, false)).collect();
    if series.is_empty() {
        return None;
    }
    Some(line_chart(&Chart {
        title: "Memory over time".into(),
        x_label: "seconds since the start".into(),
        y_label: "MiB".into(),
        series,
        x_ticks: None,
    }))
}

fn cold_starts(out: &mut String, r: &Report) {
    let w = &r.workers;
    let _ = write!(
        out,
        "<p>At most {} workers ({} ready at once); {} cold starts; {} worker events.</p>",
        w.max_total,
        w.max_ready,
        w.cold_starts.len(),
        w.events
    );
    if w.cold_starts.is_empty() {
        return;
    }
    out.push_str("<table><tr><th>worker</th><th>host</th><th>at s</th><th>throttled ms</th><th>initializing ms</th><th>first job ms</th><th>restarts</th><th>phases reported by the host (ms from the start request)</th></tr>");
    let opt = |v: Option<f64>| v.map(|v| format!("{v:.0}")).unwrap_or_else(|| "-".into());
    for c in w.cold_starts.iter().take(500) {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{:.3}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&c.worker_id),
            escape(&c.host),
            c.at_s,
            opt(c.throttled_ms),
            opt(c.initializing_ms),
            opt(c.first_job_ms),
            c.restarts,
            escape(&c.phases.as_ref().map(crate::workers::StartPhases::summary).unwrap_or_else(|| "-".into()))
        );
    }
    out.push_str("</table>");
    if w.cold_starts.len() > 500 {
        let _ = write!(out, "<p>... and {} more (see the JSON)</p>", w.cold_starts.len() - 500);
    }
}

/// The whole page.
pub fn render(r: &Report) -> String {
    let mut out = String::new();
    let title = format!("shoal-loadtest: {}", r.test.scenario.describe());
    let _ = write!(
        out,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{}</title><style>\
body{{font-family:sans-serif;margin:24px;color:#222;max-width:1000px}}\
table{{border-collapse:collapse;margin:8px 0}}td,th{{border:1px solid #ddd;padding:3px 8px;text-align:right}}\
th{{background:#f6f6f6}}.small{{font-size:12px;color:#666}}svg{{display:block;margin:12px 0}}\
pre{{background:#f6f6f6;padding:8px;overflow:auto;font-size:12px}}</style></head><body>",
        escape(&title)
    );
    let _ = write!(out, "<h1>{}</h1>", escape(&title));
    let _ = write!(
        out,
        "<p>Handler {}, payload {} B, {} ({}), endpoint <code>{}</code>, workers {}..{}.<br>Machine: {}.<br>Started at unix ms {}.</p>",
        escape(&r.test.handler.describe()),
        r.test.payload_bytes,
        escape(&r.test.submit_describe()),
        escape(&r.mode),
        escape(&r.endpoint_id),
        r.test.endpoint.workers_min,
        r.test.endpoint.workers_max,
        escape(&r.machine.describe()),
        r.started_at_ms
    );
    if let Some(cmd) = &r.command {
        let _ = write!(out, "<p class=\"small\">Command: <code>{}</code></p>", escape(cmd));
    }
    out.push_str("<h2>Summary</h2>");
    let mut rows: Vec<(&str, &RunResult)> = Vec::new();
    if let Some(b) = &r.baseline {
        rows.push(("baseline (raw JetStream)", b));
    }
    rows.push(("shoal", &r.shoal));
    counts_table(&mut out, &rows);
    if let Some(ratio) = &r.ratio {
        let _ = write!(
            out,
            "<p><b>shoal / baseline: {:.1} % of the throughput</b>; end-to-end p50 {:.1}x, p99 {:.1}x the baseline's.</p>",
            ratio.throughput_pct, ratio.e2e_p50_x, ratio.e2e_p99_x
        );
    }
    out.push_str("<h2>Latency</h2><h3>shoal</h3>");
    latency_table(&mut out, &r.shoal, true);
    if let Some(b) = &r.baseline {
        out.push_str("<h3>baseline</h3>");
        latency_table(&mut out, b, false);
    }
    out.push_str(&latency_charts(r));
    out.push_str("<h2>Workers</h2>");
    out.push_str(&worker_chart(r));
    cold_starts(&mut out, r);
    if let Some(chart) = memory_chart(&r.shoal) {
        out.push_str("<h2>Memory</h2>");
        out.push_str(&chart);
    }
    if !r.notes.is_empty() || r.events_missed > 0 {
        out.push_str("<h2>Notes</h2><ul>");
        if r.events_missed > 0 {
            let _ = write!(
                out,
                "<li>{} jobs had no terminal event; their results were read with status.</li>",
                r.events_missed
            );
        }
        for n in &r.notes {
            let _ = write!(out, "<li>{}</li>", escape(n));
        }
        out.push_str("</ul>");
    }
    let settings = serde_json::to_string_pretty(&r.test).unwrap_or_default();
    let _ = write!(out, "<h2>Settings</h2><pre>{}</pre>", escape(&settings));
    out.push_str("</body></html>\n");
    out
}
