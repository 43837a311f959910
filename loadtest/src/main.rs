//! `shoal-loadtest`: the command line of the load tester (see the crate docs of shoal_loadtest).

/// The allocator of the `shoal` binary (see its `main.rs`), so that the embedded installation
/// measured allocates as `shoal` does.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, anyhow};
use clap::{Args, Parser, Subcommand, ValueEnum};
use shoal_loadtest::config::{EndpointSettings, Handler, LoadTest, RuntimeKind, Target, Transport, WaitMode};
use shoal_loadtest::driver::Cancel;
use shoal_loadtest::scenario::Scenario;
use shoal_loadtest::{compare, write_outputs};
use shoal_protocol::endpoint::ScalerKind;

#[derive(Parser)]
#[command(
    name = "shoal-loadtest",
    version,
    about = "Load-test shoal: scenarios over NATS or HTTP, a raw JetStream baseline, JSON and HTML reports",
    after_help = "Examples:\n  shoal-loadtest burst -n 2000 --baseline\n  shoal-loadtest closed -c 1 -n 2000\n  \
                  shoal-loadtest rate --rps 500 --duration-s 10 --handler sleep --sleep-ms 20 --workers 8\n  \
                  shoal-loadtest burst -n 1000 --nats nats://10.0.0.5:4222 --prefix shoal\n  \
                  shoal-loadtest compare old.json new.json"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Command,
    #[command(flatten)]
    common: Common,
}

#[derive(Subcommand)]
enum Command {
    /// N jobs submitted at once.
    Burst {
        #[arg(short = 'n', long = "jobs", default_value_t = 2000)]
        jobs: u64,
    },
    /// A constant rate for a duration.
    Rate {
        #[arg(long = "rps")]
        jobs_per_s: f64,
        #[arg(long, default_value_t = 10.0)]
        duration_s: f64,
    },
    /// A rate rising (or falling) linearly over a duration.
    Ramp {
        #[arg(long = "from", default_value_t = 0.0)]
        from_jobs_per_s: f64,
        #[arg(long = "to")]
        to_jobs_per_s: f64,
        #[arg(long, default_value_t = 10.0)]
        duration_s: f64,
    },
    /// Constant rates one after the other.
    Step {
        /// Rates in jobs/s, comma-separated.
        #[arg(long = "rates", value_delimiter = ',', required = true)]
        jobs_per_s: Vec<f64>,
        /// How long each rate is held.
        #[arg(long, default_value_t = 5.0)]
        step_s: f64,
    },
    /// A fixed number of jobs in flight.
    Closed {
        #[arg(short = 'c', long, default_value_t = 1)]
        concurrency: u32,
        #[arg(short = 'n', long = "jobs")]
        jobs: Option<u64>,
        #[arg(long)]
        duration_s: Option<f64>,
    },
    /// Print the differences between two reports.
    Compare { old: PathBuf, new: PathBuf },
    /// Measure single NATS and JetStream operations on the server, one at a time.
    Probe {
        #[arg(short = 'n', long, default_value_t = 2000)]
        rounds: u64,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum HandlerArg {
    /// The Rust example worker, echoing its input.
    Noop,
    /// The Rust example worker, sleeping --sleep-ms per job.
    Sleep,
    /// The runpod-SDK Python handler (echo, or sleep with --sleep-ms).
    Python,
}

#[derive(Clone, Copy, ValueEnum)]
enum WaitArg {
    Auto,
    Sync,
    Async,
}

#[derive(Clone, Copy, ValueEnum)]
enum ScalerArg {
    QueueDelay,
    RequestCount,
}

#[derive(Args)]
struct Common {
    /// Target a running installation at this NATS URL (default: start one of its own).
    #[arg(long, global = true, env = "SHOAL_NATS_URL")]
    nats: Option<String>,
    /// The server's monitoring URL (with --nats; e.g. http://127.0.0.1:8222), for traffic per job.
    #[arg(long, global = true)]
    nats_monitor: Option<String>,
    /// The installation's subject prefix (with --nats).
    #[arg(long, global = true, default_value = "shoal")]
    prefix: String,
    /// Submit through the HTTP gateway at this base URL (e.g. http://127.0.0.1:8080) instead of
    /// NATS; without a URL, through a gateway started in the embedded installation.
    #[arg(long, global = true, num_args = 0..=1, default_missing_value = "")]
    http: Option<String>,
    /// API key for the HTTP gateway.
    #[arg(long, global = true, env = "SHOAL_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// sync: one request per job returns its result (wait_ms, /runsync); async: submit, then watch
    /// the job events. auto: sync for closed loops, async otherwise.
    #[arg(long, global = true, value_enum, default_value = "auto")]
    wait: WaitArg,
    #[arg(long, global = true, value_enum, default_value = "noop")]
    handler: HandlerArg,
    /// What the sleep (or python) handler sleeps per job.
    #[arg(long, global = true, default_value_t = 0)]
    sleep_ms: u64,
    /// Bytes of padding in each job's input (echoed back by the no-op handler).
    #[arg(long, global = true, default_value_t = 0)]
    payload_bytes: usize,
    /// Workers: sets both --workers-min and --workers-max.
    #[arg(long, global = true)]
    workers: Option<u32>,
    #[arg(long, global = true)]
    workers_min: Option<u32>,
    #[arg(long, global = true)]
    workers_max: Option<u32>,
    /// Job slots per worker: the example workers' SHOAL_EXAMPLE_CONCURRENCY (the SDK's
    /// concurrency_modifier); with more than one slot free a worker takes jobs with job-take-batch.
    #[arg(long, global = true, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    worker_concurrency: u32,
    #[arg(long, global = true, value_enum, default_value = "queue-delay")]
    scaler: ScalerArg,
    #[arg(long, global = true, default_value_t = 4.0)]
    scaler_value: f64,
    #[arg(long, global = true, default_value_t = 5)]
    idle_timeout_s: u32,
    /// Start jobs at once, without waiting for workers_min workers to be ready (cold start).
    #[arg(long, global = true)]
    no_warm: bool,
    /// Use this existing endpoint as it is (default: a fresh one, deleted afterwards).
    #[arg(long, global = true)]
    endpoint: Option<String>,
    /// The worker command (default: the handler's example worker).
    #[arg(long, global = true)]
    worker_command: Option<String>,
    /// The worker image (docker runtime).
    #[arg(long, global = true)]
    image: Option<String>,
    /// The runtime of the embedded host.
    #[arg(long, global = true, value_enum, default_value = "process")]
    runtime: RuntimeKind,
    /// Embedded installation: the control plane's tick in ms (scaler, deadlines; default shoal's).
    #[arg(long, global = true)]
    control_tick_ms: Option<u64>,
    /// Embedded installation: the endpoint lease TTL in s (default shoal's).
    #[arg(long, global = true)]
    lease_ttl_s: Option<u64>,
    /// Embedded installation, fake runtime: a worker's start latency in ms (default the runtime's).
    #[arg(long, global = true)]
    fake_start_ms: Option<u64>,
    /// Embedded installation: the host's `start_record_ms` (0: each job's start written at its
    /// take; default shoal's, or 0 with --phases).
    #[arg(long, global = true)]
    start_record_ms: Option<u64>,
    /// First run the same scenario as a raw JetStream work-queue round trip, and print the ratio.
    #[arg(long, global = true)]
    baseline: bool,
    /// A job without a result after this long counts as no_result.
    #[arg(long, global = true, default_value_t = 120)]
    job_timeout_s: u64,
    /// Most jobs in flight in open-loop scenarios.
    #[arg(long, global = true, default_value_t = 10_000)]
    max_in_flight: usize,
    /// Where the JSON and HTML reports go.
    #[arg(long, global = true, default_value = "target/shoal-loadtest")]
    out: PathBuf,
    /// File name of the reports, without extension (default: <scenario>-<unix time>).
    #[arg(long, global = true)]
    name: Option<String>,
    /// Print the differences to this earlier report.
    #[arg(long, global = true)]
    compare: Option<PathBuf>,
    /// No progress line.
    #[arg(long, global = true)]
    no_progress: bool,
    /// Async mode: also watch every job's queued and started events and report the phases on
    /// the tester's clock (costs the server two more messages per job).
    #[arg(long, global = true)]
    phases: bool,
    /// NATS, async: queue up to this many jobs per request (job.run_batch), gathering the jobs
    /// waiting to be sent (at most 1000; default one job.run per job).
    #[arg(long, global = true, default_value_t = 0)]
    submit_batch: usize,
}

fn build(scenario: Scenario, c: &Common) -> Result<LoadTest> {
    let handler = match c.handler {
        HandlerArg::Noop => Handler::Noop,
        HandlerArg::Sleep => Handler::Sleep { ms: c.sleep_ms },
        HandlerArg::Python => Handler::Python { sleep_ms: c.sleep_ms },
    };
    let defaults = EndpointSettings::default();
    let workers_max = c.workers_max.or(c.workers).unwrap_or(defaults.workers_max);
    let workers_min = c.workers_min.or(c.workers).unwrap_or(defaults.workers_min.min(workers_max));
    let transport = match &c.http {
        Some(url) => Transport::Http { url: (!url.is_empty()).then(|| url.clone()), api_key: c.api_key.clone() },
        None => Transport::Nats,
    };
    let target = match &c.nats {
        Some(url) => {
            Target::External { nats_url: url.clone(), prefix: c.prefix.clone(), monitor_url: c.nats_monitor.clone() }
        }
        None => Target::Embedded {
            runtime: c.runtime,
            control_tick_ms: c.control_tick_ms,
            lease_ttl_s: c.lease_ttl_s,
            fake_start_ms: c.fake_start_ms,
            start_record_ms: c.start_record_ms,
        },
    };
    let test = LoadTest {
        scenario,
        transport,
        wait: match c.wait {
            WaitArg::Auto => WaitMode::Auto,
            WaitArg::Sync => WaitMode::Sync,
            WaitArg::Async => WaitMode::Async,
        },
        handler,
        payload_bytes: c.payload_bytes,
        endpoint: EndpointSettings {
            id: c.endpoint.clone(),
            workers_min,
            workers_max,
            scaler: match c.scaler {
                ScalerArg::QueueDelay => ScalerKind::QueueDelay,
                ScalerArg::RequestCount => ScalerKind::RequestCount,
            },
            scaler_value: c.scaler_value,
            idle_timeout_s: c.idle_timeout_s,
            warm: !c.no_warm,
            command: c.worker_command.clone(),
            image: c.image.clone(),
            env: vec![],
            concurrency: c.worker_concurrency,
        },
        target,
        baseline: c.baseline,
        job_timeout_ms: c.job_timeout_s.saturating_mul(1000),
        max_in_flight: c.max_in_flight,
        progress: !c.no_progress,
        phases: c.phases,
        submit_batch: c.submit_batch,
    };
    test.validate().map_err(|e| anyhow!(e))?;
    Ok(test)
}

async fn main_async(cli: Cli) -> Result<()> {
    let scenario = match cli.scenario {
        Command::Burst { jobs } => Scenario::Burst { jobs },
        Command::Rate { jobs_per_s, duration_s } => Scenario::Rate { jobs_per_s, duration_s },
        Command::Ramp { from_jobs_per_s, to_jobs_per_s, duration_s } => {
            Scenario::Ramp { from_jobs_per_s, to_jobs_per_s, duration_s }
        }
        Command::Step { jobs_per_s, step_s } => Scenario::Step { jobs_per_s, step_s },
        Command::Closed { concurrency, jobs, duration_s } => Scenario::Closed { concurrency, jobs, duration_s },
        Command::Compare { old, new } => {
            print!("{}", compare::compare(&compare::load(&old)?, &compare::load(&new)?));
            return Ok(());
        }
        Command::Probe { rounds } => {
            let c = &cli.common;
            let server = match &c.nats {
                Some(_) => None,
                None => Some(shoal_loadtest::embedded::NatsChild::start()?),
            };
            let url = c.nats.clone().or_else(|| server.as_ref().map(|s| s.url.clone())).unwrap_or_default();
            let costs = shoal_loadtest::probe::probe(&url, rounds, c.payload_bytes).await?;
            println!("shoal-loadtest probe: {rounds} rounds each, payload {} B, {url}", c.payload_bytes);
            print!("{}", shoal_loadtest::probe::table(&costs));
            return Ok(());
        }
    };
    let c = &cli.common;
    let old = c.compare.as_deref().map(compare::load).transpose()?;
    let test = build(scenario, c)?;
    let (stop, cancel) = Cancel::new();
    tokio::spawn(async move {
        wait_for_signal().await;
        eprintln!("\nshoal-loadtest: interrupted; stopping and cleaning up (again to quit at once)");
        let _ = stop.send(true);
        wait_for_signal().await;
        std::process::exit(130);
    });
    let mut report = shoal_loadtest::run_until(&test, &cancel).await?;
    report.command = Some(std::env::args().collect::<Vec<_>>().join(" "));
    print!("{}", report.summary());
    let name = c.name.clone().unwrap_or_else(|| format!("{}-{}", test.scenario.name(), report.started_at_ms / 1000));
    let (json, html) = write_outputs(&report, &c.out, &name).context("write the reports")?;
    println!("  report: {} and {}", json.display(), html.display());
    if let Some(old) = old {
        println!();
        print!("{}", compare::compare(&old, &report));
    }
    Ok(())
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("shoal-loadtest: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(main_async(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shoal-loadtest: {e:#}");
            ExitCode::FAILURE
        }
    }
}
