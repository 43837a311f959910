//! `shoal workers` (the table) and `shoal workers logs WORKER [--follow]`: a worker's log,
//! asked of the host that runs it (`docker logs`, or the process runtime's log file).

use std::process::ExitCode;

use anyhow::{Context, Result, anyhow};
use futures::StreamExt;
use shoal_actors::client::ApiClient;
use shoal_actors::host::logs;

use crate::output::line;
use crate::roles;
use crate::settings::{ConfigError, Settings};

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct WorkersArgs {
    #[command(subcommand)]
    pub command: Option<WorkersCommand>,
    /// Only the workers of this endpoint.
    #[arg(long)]
    pub endpoint: Option<String>,
}

#[derive(Debug, clap::Subcommand)]
pub enum WorkersCommand {
    /// Print a worker's last log lines; with --follow, keep printing new ones until the
    /// worker stops (or Ctrl-C).
    Logs {
        /// The worker id (`shoal workers` lists them).
        worker: String,
        /// Keep printing new lines.
        #[arg(short, long)]
        follow: bool,
        /// How many of the last lines to print.
        #[arg(short = 'n', long, default_value_t = logs::DEFAULT_LINES)]
        lines: u32,
    },
}

pub async fn workers_command(settings: &Settings, args: &WorkersArgs) -> Result<ExitCode> {
    match &args.command {
        None => super::endpoint::workers(settings, args.endpoint.as_deref()).await,
        Some(WorkersCommand::Logs { worker, follow, lines }) => worker_logs(settings, worker, *follow, *lines).await,
    }
}

async fn worker_logs(settings: &Settings, worker: &str, follow: bool, lines: u32) -> Result<ExitCode> {
    let names = settings.names().map_err(ConfigError)?;
    let client = roles::client(settings).await?;
    let record = ApiClient::new(client.clone(), names.clone())
        .workers(None)
        .await?
        .workers
        .into_iter()
        .find(|w| w.id == worker)
        .ok_or_else(|| anyhow!("no worker {worker} (`shoal workers` lists them)"))?;
    if record.host.is_empty() {
        return Err(anyhow!("worker {worker} has not been placed on a host ({})", record.state.as_str()));
    }
    let client = &client;
    if !follow {
        for l in logs::get(client, &names, &record.host, &record.endpoint, worker, lines)
            .await
            .with_context(|| format!("logs of worker {worker} on host {}", record.host))?
        {
            line(l)?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut stream = logs::follow(client, &names, &record.host, &record.endpoint, worker, lines)
        .await
        .with_context(|| format!("logs of worker {worker} on host {}", record.host))?;
    while let Some(batch) = stream.next().await {
        for l in batch {
            line(l)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
