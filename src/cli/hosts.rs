//! `shoal hosts` (the table), `shoal hosts drain HOST [--wait]` and `shoal hosts resume HOST`:
//! taking a host out of service for maintenance without killing the jobs it runs.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use shoal_actors::clock::now_ms;
use shoal_protocol::host::HostRecord;

use super::api;
use super::table::{ago, render};
use crate::output::line;
use crate::roles;
use crate::settings::{ConfigError, Settings};

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct HostsArgs {
    #[command(subcommand)]
    pub command: Option<HostsCommand>,
    /// Print the hosts' records as JSON instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Subcommand)]
pub enum HostsCommand {
    /// Take a host out of service: its workers finish the jobs they run and stop, new workers
    /// go to other hosts, and the endpoints' scalers start replacements there. Nothing is
    /// killed and no job is lost; stop the host once it has no workers left.
    Drain {
        /// The host id (`shoal hosts` lists them).
        host: String,
        /// Wait until the host has no workers left.
        #[arg(long)]
        wait: bool,
    },
    /// Put a drained host back in service: new workers may be placed on it again.
    Resume {
        /// The host id.
        host: String,
    },
}

pub async fn hosts_command(settings: &Settings, args: &HostsArgs) -> Result<ExitCode> {
    match &args.command {
        None => hosts(settings, args.json).await,
        Some(HostsCommand::Drain { host, wait }) => drain(settings, host, *wait).await,
        Some(HostsCommand::Resume { host }) => resume(settings, host).await,
    }
}

async fn hosts(settings: &Settings, json: bool) -> Result<ExitCode> {
    let mut hosts = api(settings).await?.hosts().await?.hosts;
    hosts.sort_by(|a, b| a.id.cmp(&b.id));
    if json {
        line(serde_json::to_string_pretty(&hosts).context("encode the hosts")?)?;
    } else {
        line(hosts_table(&hosts, now_ms()).trim_end())?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn set_draining(settings: &Settings, host: &str, draining: bool) -> Result<()> {
    let names = settings.names().map_err(ConfigError)?;
    let client = roles::client(settings).await?;
    shoal_actors::host::set_draining(&client, &names, host, draining).await.map_err(|e| anyhow!(e))
}

async fn drain(settings: &Settings, host: &str, wait: bool) -> Result<ExitCode> {
    set_draining(settings, host, true).await?;
    if !wait {
        line(format!(
            "host {host} is draining: its workers finish their jobs and stop; new workers go elsewhere \
             (`shoal hosts` shows how many are left, `shoal hosts resume {host}` undoes it)"
        ))?;
        return Ok(ExitCode::SUCCESS);
    }
    let api = api(settings).await?;
    let mut last = None;
    loop {
        let record = api.hosts().await?.hosts.into_iter().find(|h| h.id == host);
        let Some(record) = record else {
            line(format!("host {host} is gone (stopped): nothing runs there"))?;
            return Ok(ExitCode::SUCCESS);
        };
        if record.workers == 0 {
            line(format!("host {host} is drained: no workers left; it can be stopped"))?;
            return Ok(ExitCode::SUCCESS);
        }
        if last != Some(record.workers) {
            eprintln!("host {host} draining: {} worker(s) left", record.workers);
            last = Some(record.workers);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn resume(settings: &Settings, host: &str) -> Result<ExitCode> {
    set_draining(settings, host, false).await?;
    line(format!("host {host} is in service: new workers may be placed on it"))?;
    Ok(ExitCode::SUCCESS)
}

/// One row per live host: its state, labels, GPUs by type (free of all, and unhealthy ones) with
/// the driver's CUDA version, workers, heartbeat.
fn hosts_table(hosts: &[HostRecord], now_ms: u64) -> String {
    let rows: Vec<Vec<String>> = hosts
        .iter()
        .map(|h| {
            // per type: how many, how many unhealthy; free as placement counts them
            let mut by_type: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
            for g in &h.gpus {
                let (all, sick) = by_type.entry(g.name.as_str()).or_default();
                *all += 1;
                *sick += usize::from(!g.healthy);
            }
            let gpus: Vec<String> = by_type
                .iter()
                .map(|(name, (all, sick))| {
                    let free = h.free_gpus(name);
                    match sick {
                        0 => format!("{name}: {free} of {all} free"),
                        _ => format!("{name}: {free} of {all} free, {sick} unhealthy"),
                    }
                })
                .collect();
            let mut gpus = gpus.join("; ");
            if let Some(cuda) = &h.cuda_version {
                gpus = if gpus.is_empty() { format!("CUDA {cuda}") } else { format!("{gpus} (CUDA {cuda})") };
            }
            let labels: Vec<String> = h.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let workers = match h.max_workers {
                0 => h.workers.to_string(),
                max => format!("{} of {max}", h.workers),
            };
            vec![
                h.id.clone(),
                if h.draining { "draining" } else { "active" }.to_string(),
                h.runtime.clone(),
                labels.join(","),
                gpus,
                workers,
                ago(now_ms, h.heartbeat_at_ms),
                h.bridge_url.clone(),
            ]
        })
        .collect();
    render(&["HOST", "STATE", "RUNTIME", "LABELS", "GPUS", "WORKERS", "HEARTBEAT", "BRIDGE"], &rows)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        hosts: HostsArgs,
    }

    #[test]
    fn hosts_lists_drains_and_resumes() {
        let cli = Cli::try_parse_from(["hosts"]).expect("parses");
        assert!(cli.hosts.command.is_none() && !cli.hosts.json);
        assert!(Cli::try_parse_from(["hosts", "--json"]).expect("parses").hosts.json);
        let cli = Cli::try_parse_from(["hosts", "drain", "gpu-1", "--wait"]).expect("parses");
        assert!(matches!(cli.hosts.command, Some(HostsCommand::Drain { ref host, wait: true }) if host == "gpu-1"));
        let cli = Cli::try_parse_from(["hosts", "resume", "gpu-1"]).expect("parses");
        assert!(matches!(cli.hosts.command, Some(HostsCommand::Resume { ref host }) if host == "gpu-1"));
        assert!(Cli::try_parse_from(["hosts", "drain"]).is_err(), "a host is required");
    }

    #[test]
    fn the_hosts_table_counts_free_gpus_by_type_and_shows_draining_hosts() {
        let gpu = |name: &str, healthy: bool, worker: Option<&str>| shoal_protocol::host::Gpu {
            name: name.into(),
            uuid: format!("GPU-{name}-{healthy}-{worker:?}"),
            memory_mb: 80_000,
            healthy,
            worker_id: worker.map(String::from),
            utilization_pct: None,
            error: None,
        };
        let gpu_host = HostRecord {
            id: "h-gpu".into(),
            runtime: "docker".into(),
            labels: Default::default(),
            gpus: vec![
                gpu("H100", true, None),
                gpu("H100", true, Some("w1")),
                gpu("H100", false, None),
                gpu("A10", true, None),
            ],
            bridge_url: "http://10.0.0.2:7000".into(),
            workers: 1,
            max_workers: 0,
            warm: vec![],
            started_at_ms: 0,
            heartbeat_at_ms: 58_000,
            draining: false,
            cuda_version: Some("12.4".into()),
        };
        let cpu_host = HostRecord {
            id: "h-cpu".into(),
            runtime: "process".into(),
            gpus: vec![],
            max_workers: 8,
            workers: 3,
            draining: true,
            cuda_version: None,
            labels: [("zone".to_string(), "b".to_string())].into(),
            ..gpu_host.clone()
        };
        let t = hosts_table(&[gpu_host, cpu_host], 60_000);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        for cell in [
            "h-gpu",
            "active",
            "docker",
            "A10: 1 of 1 free; H100: 1 of 3 free, 1 unhealthy (CUDA 12.4)",
            "2.0s ago",
            "http://10.0.0.2:7000",
        ] {
            assert!(lines[1].contains(cell), "{cell} missing: {t}");
        }
        for cell in ["h-cpu", "draining", "process", "zone=b", "  -  ", "3 of 8"] {
            assert!(lines[2].contains(cell), "{cell} missing: {t}");
        }
    }
}
