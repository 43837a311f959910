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
        .all_workers()
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        workers: super::WorkersArgs,
    }

    #[test]
    fn workers_lists_and_workers_logs_follows() {
        let cli = Cli::try_parse_from(["workers", "--endpoint", "echo"]).expect("parses");
        assert!(cli.workers.command.is_none());
        assert_eq!(cli.workers.endpoint.as_deref(), Some("echo"));
        let cli = Cli::try_parse_from(["workers", "logs", "w1", "--follow", "-n", "20"]).expect("parses");
        let Some(super::WorkersCommand::Logs { worker, follow, lines }) = cli.workers.command else {
            panic!("not logs")
        };
        assert_eq!((worker.as_str(), follow, lines), ("w1", true, 20));
    }

    #[test]
    fn the_deploy_endpoints_file_is_valid() {
        let specs = super::super::parse_endpoints(include_str!("../../deploy/endpoints.toml")).expect("valid");
        assert_eq!(specs.len(), 1);
        assert!(specs[0].image.is_some() && specs[0].command.is_none());
    }
}
