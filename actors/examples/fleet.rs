//! Fleet benchmark: one control replica running many endpoints whose workers are simulated by
//! the fake runtime, to measure the control replica's idle CPU and memory at fleet size.
//!
//! Separate processes, so the control replica is measured alone and no process holds more
//! sockets than its open-file limit allows (each fake worker holds a long-poll to its host's
//! bridge: two sockets in the process that runs both):
//!
//! ```sh
//! cargo build --release -p shoal-actors --example fleet
//! fleet hosts   --nats URL --endpoints 1000 --workers 10 --hosts 4 --index 0 --apply  # and --index 1..3
//! fleet control --nats URL --seconds 60      # the replica; measures once told the fleet is idle
//! fleet wait    --nats URL --expect-workers 10000
//! ```
//!
//! `wait` follows `shoal-workers` with one watch, prints how many workers are idle every 5 s
//! and, once all are, tells `control` (core NATS, subject `<prefix>.fleet.idle`) to start its
//! window: CPU (user+system, % of one core) and RSS from /proc/self every 5 s and a summary.
//! `scripts/bench-fleet` runs the whole thing, its own nats-server included.

/// The allocator of the `shoal` binary, so the replica measured is the one that runs.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use shoal_actors::control::{self, ControlConfig};
use shoal_actors::host::{self, HostConfig};
use shoal_actors::nats::{Nats, Topology};
use shoal_actors::runtime::fake::FakeRuntime;
use shoal_protocol::codec::{from_msgpack, to_msgpack};
use shoal_protocol::endpoint::{EndpointSpec, ScalerKind};
use shoal_protocol::names::Names;
use shoal_protocol::worker::{WorkerRecord, WorkerState};

type Error = Box<dyn std::error::Error + Send + Sync>;

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.to_string())
}

/// (user + system ticks, RSS bytes) of this process.
fn usage() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = fields.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let rss_kb = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    (ticks, rss_kb * 1024)
}

fn idle_subject(names: &Names) -> String {
    format!("{}.fleet.idle", names.prefix())
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).cloned().unwrap_or_default();
    let url = arg(&args, "--nats", "nats://127.0.0.1:4222");
    let names = Names::new(&arg(&args, "--prefix", "shoal"))?;
    let nats = Nats::connect(&url, names.clone(), &Topology::default()).await?;
    match mode.as_str() {
        "hosts" => hosts(&args, nats).await,
        "control" => control_replica(&args, nats, &names).await,
        "wait" => wait_idle(&args, nats, &names).await,
        _ => Err("usage: fleet hosts|control|wait [--nats URL] ...".into()),
    }
}

async fn hosts(args: &[String], nats: Nats) -> Result<(), Error> {
    let endpoints: usize = arg(args, "--endpoints", "1000").parse()?;
    let workers: u32 = arg(args, "--workers", "10").parse()?;
    let n_hosts: usize = arg(args, "--hosts", "1").parse()?;
    let index: Option<usize> =
        args.iter().position(|a| a == "--index").map(|_| arg(args, "--index", "0").parse()).transpose()?;
    let state = std::env::temp_dir().join("shoal-fleet");
    let mut handles = Vec::new();
    // one host of several (its own process), or all of them here
    let mine: Vec<usize> = match index {
        Some(i) => vec![i],
        None => (0..n_hosts).collect(),
    };
    for h in mine {
        let config =
            HostConfig { id: Some(format!("fleet-host-{h}")), state_dir: state.clone(), ..HostConfig::default() };
        let runtime = Arc::new(FakeRuntime { start_latency_ms: 100, job_duration_ms: 50 });
        handles.push(host::start(nats.clone(), config, runtime).await?);
    }
    if args.iter().any(|a| a == "--apply") {
        // specs go straight into the bucket (the control replica may not be up yet), many at once
        let puts = (0..endpoints).map(|e| {
            let mut spec = EndpointSpec::with_command(&format!("fleet-{e}"), "simulated");
            spec.workers_min = workers;
            spec.workers_max = workers.max(1);
            spec.scaler = ScalerKind::RequestCount;
            spec.version = 1;
            let store = &nats.endpoints;
            async move {
                let bytes = to_msgpack(&spec)?;
                store.put(&spec.id, bytes.into()).await?;
                Ok::<(), Error>(())
            }
        });
        let results: Vec<Result<(), Error>> = futures::stream::iter(puts).buffer_unordered(64).collect().await;
        results.into_iter().collect::<Result<Vec<()>, Error>>()?;
        eprintln!("fleet: {endpoints} endpoints x {workers} workers applied");
    }
    eprintln!("fleet: {} fake host(s) running; Ctrl-C to stop", handles.len());
    tokio::signal::ctrl_c().await?;
    for h in handles {
        h.stop().await;
    }
    Ok(())
}

async fn control_replica(args: &[String], nats: Nats, names: &Names) -> Result<(), Error> {
    let seconds: u64 = arg(args, "--seconds", "60").parse()?;
    let mut idle = nats.client.subscribe(idle_subject(names)).await?;
    let started = Instant::now();
    let handle = control::start(nats.clone(), ControlConfig::default()).await?;
    let tick_hz = 100.0; // USER_HZ on Linux
    // wait until the fleet is up and idle (`fleet wait` says so), then measure while it idles
    let ready = tokio::time::timeout(Duration::from_secs(1800), idle.next()).await;
    if !matches!(ready, Ok(Some(_))) {
        return Err("the fleet never became idle".into());
    }
    let (t_up, rss_up) = usage();
    eprintln!(
        "control: fleet idle {:.1} s after the replica started; its cpu so far {:.1} s, rss {:.1} MiB",
        started.elapsed().as_secs_f64(),
        t_up as f64 / tick_hz,
        rss_up as f64 / 1048576.0
    );
    let (t0, _) = usage();
    let begin = Instant::now();
    let mut peak_rss = 0;
    while begin.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let (t, rss) = usage();
        peak_rss = peak_rss.max(rss);
        let cpu = (t - t0) as f64 / tick_hz / begin.elapsed().as_secs_f64() * 100.0;
        eprintln!("control: cpu {cpu:.1}% of one core, rss {:.1} MiB", rss as f64 / 1048576.0);
    }
    let (t1, rss) = usage();
    let cpu = (t1 - t0) as f64 / tick_hz / begin.elapsed().as_secs_f64() * 100.0;
    println!(
        "fleet-control idle: cpu {cpu:.1}% of one core over {seconds} s, rss {:.1} MiB (peak {:.1} MiB)",
        rss as f64 / 1048576.0,
        peak_rss as f64 / 1048576.0
    );
    handle.stop().await;
    Ok(())
}

/// Follows every worker record; once `--expect-workers` are idle, tells the control replica.
async fn wait_idle(args: &[String], nats: Nats, names: &Names) -> Result<(), Error> {
    let expect: usize = arg(args, "--expect-workers", "0").parse()?;
    let mut watch = nats.workers.watch_with_history(">").await?;
    let mut states: HashMap<String, WorkerState> = HashMap::new();
    let mut details: HashMap<String, (String, Option<String>)> = HashMap::new();
    let start = Instant::now();
    let mut report = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            entry = watch.next() => {
                let Some(Ok(entry)) = entry else { return Err("worker watch ended".into()) };
                match from_msgpack::<WorkerRecord>(&entry.value) {
                    Ok(rec) => {
                        details.insert(entry.key.clone(), (rec.host.clone(), rec.reason.clone()));
                        states.insert(entry.key, rec.state)
                    }
                    Err(_) => states.remove(&entry.key),
                };
            }
            _ = report.tick() => {
                let idle = states.values().filter(|s| **s == WorkerState::Idle).count();
                let live = states.values().filter(|s| **s != WorkerState::Stopped).count();
                eprintln!("wait: {idle} idle of {live} live workers after {:.0} s", start.elapsed().as_secs_f64());
                if args.iter().any(|a| a == "--verbose") {
                    // what the others are doing, by state, host and reason
                    let mut others: HashMap<String, usize> = HashMap::new();
                    for (key, state) in &states {
                        if *state != WorkerState::Idle && *state != WorkerState::Stopped {
                            let (host, reason) = details.get(key).cloned().unwrap_or_default();
                            *others.entry(format!("{state:?} on {host:?}: {reason:?}")).or_default() += 1;
                        }
                    }
                    let mut others: Vec<_> = others.into_iter().collect();
                    others.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
                    for (what, n) in others.iter().take(8) {
                        eprintln!("wait:   {n} {what}");
                    }
                }
                if idle >= expect && live == idle {
                    nats.client.publish(idle_subject(names), "idle".into()).await?;
                    nats.client.flush().await?;
                    return Ok(());
                }
            }
        }
    }
}
