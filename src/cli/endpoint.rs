//! `shoal endpoint apply|list|get|health|purge|delete` and `shoal workers`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use shoal_protocol::api::HealthReply;
use shoal_protocol::endpoint::EndpointSpec;
use shoal_protocol::worker::WorkerRecord;

use super::table::{first_line, render};
use super::{api, read_endpoints};
use crate::output::line;
use crate::settings::Settings;

#[derive(Debug, clap::Subcommand)]
pub enum EndpointCommand {
    /// Create or update the endpoints of a file (TOML, `[[endpoint]]` tables).
    Apply {
        /// The endpoints file (`-` reads stdin).
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
    },
    /// List the endpoints.
    List,
    /// Print an endpoint's spec as JSON.
    Get {
        /// The endpoint id.
        id: String,
    },
    /// Print an endpoint's job and worker counts (RunPod's `/health`), its rollout and the
    /// control replica that owns it.
    Health {
        /// The endpoint id.
        id: String,
        /// Print the counts as JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Cancel every queued job of an endpoint (running jobs continue).
    Purge {
        /// The endpoint id.
        id: String,
    },
    /// Delete an endpoint; its workers are stopped.
    Delete {
        /// The endpoint id.
        id: String,
    },
}

pub async fn endpoint(settings: &Settings, cmd: &EndpointCommand) -> Result<ExitCode> {
    match cmd {
        EndpointCommand::Apply { file } => {
            let specs = read_endpoints(file)?;
            let api = api(settings).await?;
            for spec in &specs {
                let applied = api.apply_endpoint(spec).await?;
                line(format!("endpoint {} applied (version {})", applied.id, applied.version))?;
            }
            if specs.is_empty() {
                eprintln!("{} defines no endpoint", file.display());
            }
        }
        EndpointCommand::List => {
            let mut endpoints = api(settings).await?.list_endpoints().await?.endpoints;
            endpoints.sort_by(|a, b| a.id.cmp(&b.id));
            line(endpoints_table(&endpoints).trim_end())?;
        }
        EndpointCommand::Get { id } => {
            let spec = api(settings).await?.get_endpoint(id).await?;
            line(serde_json::to_string_pretty(&spec).context("encode the spec")?)?;
        }
        EndpointCommand::Health { id, json } => {
            let health = api(settings).await?.health(id).await?;
            match json {
                true => line(serde_json::to_string_pretty(&health).context("encode the health")?)?,
                false => line(health_text(id, &health))?,
            }
        }
        EndpointCommand::Purge { id } => {
            let purged = api(settings).await?.purge(id).await?;
            line(format!("endpoint {id}: {} queued jobs cancelled; running jobs continue", purged.removed))?;
        }
        EndpointCommand::Delete { id } => {
            let deleted = api(settings).await?.delete_endpoint(id).await?;
            if deleted.deleted {
                line(format!("endpoint {id} deleted"))?;
            } else {
                line(format!("endpoint {id} did not exist"))?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn workers(settings: &Settings, endpoint: Option<&str>) -> Result<ExitCode> {
    let api = api(settings).await?;
    let mut workers = match endpoint {
        Some(endpoint) => api.workers(Some(endpoint)).await?.workers,
        None => api.all_workers().await?.workers,
    };
    workers.sort_by(|a, b| (&a.endpoint, &a.host, &a.id).cmp(&(&b.endpoint, &b.host, &b.id)));
    line(workers_table(&workers).trim_end())?;
    Ok(ExitCode::SUCCESS)
}

fn health_text(id: &str, h: &HealthReply) -> String {
    let (j, w, r) = (&h.jobs, &h.workers, &h.rollout);
    let owner = h.owner.as_deref().map_or("no owner yet".to_string(), |o| format!("owned by {o}"));
    [
        format!("endpoint {id} ({owner})"),
        format!(
            "jobs     in queue {}, in progress {}, completed {}, failed {}, cancelled {}, timed out {}, retried {}",
            j.in_queue, j.in_progress, j.completed, j.failed, j.cancelled, j.timed_out, j.retried
        ),
        format!(
            "workers  idle {}, running {}, initializing {}, ready {}, throttled {}, unhealthy {}, outdated {}",
            w.idle, w.running, w.initializing, w.ready, w.throttled, w.unhealthy, w.outdated
        ),
        format!("rollout  version {}: {} of {} workers on it", r.version, r.workers_on_latest, r.workers_total),
    ]
    .join("\n")
}

fn endpoints_table(endpoints: &[EndpointSpec]) -> String {
    let rows: Vec<Vec<String>> = endpoints
        .iter()
        .map(|e| {
            let runs = match (&e.image, &e.command) {
                (Some(image), _) => format!("image {image}"),
                (None, Some(command)) => format!("command {command}"),
                (None, None) => String::new(),
            };
            vec![e.id.clone(), e.version.to_string(), format!("{}..{}", e.workers_min, e.workers_max), runs]
        })
        .collect();
    render(&["ENDPOINT", "VERSION", "WORKERS", "RUNS"], &rows)
}

fn workers_table(workers: &[WorkerRecord]) -> String {
    let rows: Vec<Vec<String>> = workers
        .iter()
        .map(|w| {
            vec![
                w.id.clone(),
                w.endpoint.clone(),
                w.host.clone(),
                w.state.as_str().to_string(),
                first_line(w.reason.as_deref().unwrap_or(""), 60),
                w.restarts.to_string(),
                w.current_jobs.join(","),
                w.start.as_ref().map(|s| s.summary()).unwrap_or_default(),
            ]
        })
        .collect();
    render(&["WORKER", "ENDPOINT", "HOST", "STATE", "REASON", "RESTARTS", "JOBS", "START"], &rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_protocol::worker::{StartPhases, WorkerState};

    #[test]
    fn health_reads_as_counts_with_the_owner() {
        let mut h = HealthReply::default();
        h.jobs.in_queue = 3;
        h.workers.throttled = 2;
        h.rollout = shoal_protocol::api::Rollout { version: 4, workers_on_latest: 1, workers_total: 2 };
        let t = health_text("ep", &h);
        assert!(t.starts_with("endpoint ep (no owner yet)"), "{t}");
        assert!(t.contains("in queue 3") && t.contains("throttled 2") && t.contains("version 4: 1 of 2"), "{t}");
        h.owner = Some("r1".into());
        assert!(health_text("ep", &h).starts_with("endpoint ep (owned by r1)"));
    }

    #[test]
    fn the_workers_table_has_one_row_per_worker() {
        let w = WorkerRecord {
            id: "w1".into(),
            endpoint: "echo-py".into(),
            host: "h1".into(),
            state: WorkerState::Unhealthy,
            reason: Some("exited with code 1\nTraceback (most recent call last):".into()),
            spec_version: 1,
            current_jobs: vec!["j1".into(), "j2".into()],
            runtime_ref: None,
            restarts: 4,
            failures: 4,
            started_at_ms: 0,
            updated_at_ms: 0,
            jobs_done: 0,
            start: Some(StartPhases { warm: true, start_ms: Some(95), first_job_ms: Some(400), ..Default::default() }),
        };
        let t = workers_table(&[w]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2, "{t}");
        assert!(lines[0].starts_with("WORKER") && lines[0].ends_with("START"), "{t}");
        for cell in
            ["w1", "echo-py", "h1", "unhealthy", "exited with code 1 …", "4", "j1,j2", "warm: start 95ms, job 400ms"]
        {
            assert!(lines[1].contains(cell), "{cell} missing: {t}");
        }
    }
}
