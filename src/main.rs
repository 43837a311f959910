//! `shoal`: the one binary of shoal. It runs the process roles (`control`, `host`, `gateway`,
//! or all of them with a child nats-server in `dev`) and is the command-line client of the NATS
//! API (`job`, `workers`, `hosts`, `endpoint`) and of the gateway's API keys (`keys`).
//!
//! This crate is wiring only: configuration, the CLI and process lifetimes. Behaviour lives in
//! `shoal-actors`, wire types in `shoal-protocol`.

mod cli;
mod dev;
mod nats_server;
mod output;
mod roles;
mod settings;
mod shutdown;
mod telemetry;

/// jemalloc rather than glibc's allocator: the job path allocates per message (decode, encode,
/// task and channel nodes), and under a burst glibc's malloc/free took 13 % of the process's CPU;
/// jemalloc gives 10-15 % more jobs/s for ~2.5 MiB more RSS on an idle 1,000-endpoint replica
/// (BENCHMARKS.md, series 11).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::cli::{EndpointCommand, JobCommand, KeysCommand};
use crate::settings::{ConfigError, Layers, Settings};

/// Self-hosted serverless jobs with RunPod semantics, over NATS JetStream.
#[derive(Debug, Parser)]
#[command(name = "shoal", version, propagate_version = true)]
struct Cli {
    /// TOML configuration file (sections nats, topology, control, host, gateway).
    #[arg(long, global = true, value_name = "FILE", env = "SHOAL_CONFIG")]
    config: Option<PathBuf>,
    /// NATS server URL [default: nats://127.0.0.1:4222, or nats.url from the configuration].
    #[arg(long, global = true, value_name = "URL")]
    nats: Option<String>,
    /// Prefix of every subject, stream and bucket name [default: shoal].
    #[arg(long, global = true)]
    prefix: Option<String>,
    /// Log as JSON lines (the filter comes from RUST_LOG).
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run everything on this machine: a child nats-server, a control plane and a host (with
    /// the process runtime unless host.runtime.kind says otherwise), with the endpoints of a file.
    Dev(dev::DevArgs),
    /// Run a control plane (the NATS API service and the endpoint actors) until Ctrl-C.
    Control,
    /// Run a host (workers, their supervisor and the worker bridge) until Ctrl-C; the runtime
    /// is host.runtime.kind (process, docker or fake).
    Host,
    /// Serve RunPod's HTTP API (`/v2/{endpoint}/run`, `/runsync`, `/status/{id}`, ...) over
    /// the NATS API until Ctrl-C; stateless, so run as many as you like.
    Gateway(GatewayArgs),
    /// Create, list and revoke the API keys of the HTTP gateway.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Submit and follow jobs.
    #[command(subcommand)]
    Job(JobCommand),
    /// List workers: state, host, restarts, current jobs and how they started; `workers logs
    /// WORKER [--follow]` prints a worker's log.
    Workers(cli::WorkersArgs),
    /// List the live hosts: state, runtime, GPUs free by type, workers, last heartbeat, worker
    /// bridge; `hosts drain HOST [--wait]` takes one out of service without killing its jobs,
    /// `hosts resume HOST` puts it back.
    Hosts(cli::HostsArgs),
    /// Create, update, read and delete endpoints; their health; purge their queues.
    #[command(subcommand)]
    Endpoint(EndpointCommand),
}

#[derive(Debug, clap::Args)]
struct GatewayArgs {
    /// Address to listen on [default: gateway.listen, 127.0.0.1:8080].
    #[arg(long, value_name = "ADDR")]
    listen: Option<std::net::SocketAddr>,
}

impl Command {
    /// Servers log at info by default; client commands only print their result.
    fn default_log_filter(&self) -> &'static str {
        match self {
            Command::Dev(_) | Command::Control | Command::Host | Command::Gateway(_) => "info,async_nats=warn",
            _ => "warn",
        }
    }

    /// The `service.name` of this process's traces (unless `OTEL_SERVICE_NAME` says otherwise).
    fn service_name(&self) -> &'static str {
        match self {
            Command::Dev(_) => "shoal-dev",
            Command::Control => "shoal-control",
            Command::Host => "shoal-host",
            Command::Gateway(_) => "shoal-gateway",
            _ => "shoal-cli",
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let telemetry =
        telemetry::Telemetry::init(cli.log_json, cli.command.default_log_filter(), cli.command.service_name());
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli));
    drop(runtime);
    telemetry.shutdown();
    match result {
        Ok(code) => code,
        Err(e) if output::is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<ConfigError>().is_some() { ExitCode::from(2) } else { ExitCode::FAILURE }
        }
    }
}

/// Loads the configuration: defaults, then `--config`, then `SHOAL_*`, then the flags.
fn load_settings(cli: &Cli, defaults: Vec<(&'static str, String)>) -> Result<Settings, ConfigError> {
    let mut flags = Vec::new();
    if let Some(url) = &cli.nats {
        flags.push(("nats.url", url.clone()));
    }
    if let Some(prefix) = &cli.prefix {
        flags.push(("nats.prefix", prefix.clone()));
    }
    Settings::load(Layers { defaults, file: cli.config.as_deref(), env: std::env::vars().collect(), flags })
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match &cli.command {
        Command::Dev(args) => {
            let settings = load_settings(&cli, dev::default_settings(args))?;
            if cli.nats.is_some() {
                tracing::warn!("--nats is ignored by shoal dev: it runs its own nats-server (see --nats-port)");
            }
            dev::run(settings, args).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Control => {
            roles::control(load_settings(&cli, vec![])?).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Host => {
            roles::host(load_settings(&cli, vec![])?).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Gateway(args) => {
            roles::gateway(load_settings(&cli, vec![])?, args.listen).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Keys(cmd) => cli::keys_command(&load_settings(&cli, vec![])?, cmd).await,
        Command::Job(cmd) => cli::job(&load_settings(&cli, vec![])?, cmd).await,
        Command::Workers(args) => cli::workers_command(&load_settings(&cli, vec![])?, args).await,
        Command::Hosts(args) => cli::hosts_command(&load_settings(&cli, vec![])?, args).await,
        Command::Endpoint(cmd) => cli::endpoint(&load_settings(&cli, vec![])?, cmd).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn job_run_parses_its_options() {
        let cli = Cli::try_parse_from([
            "shoal",
            "--prefix",
            "p1",
            "job",
            "run",
            "echo-py",
            r#"{"a":1}"#,
            "--low-priority",
            "--ttl-ms",
            "5000",
            "--idempotency-key",
            "k1",
        ])
        .expect("parses");
        assert_eq!(cli.prefix.as_deref(), Some("p1"));
        let Command::Job(JobCommand::Run(run)) = cli.command else { panic!("not job run") };
        assert_eq!(run.endpoint, "echo-py");
        assert!(run.low_priority && !run.r#async);
        assert_eq!(run.ttl_ms, Some(5000));
        assert_eq!(run.idempotency_key.as_deref(), Some("k1"));
    }
}
