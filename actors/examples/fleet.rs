//! Fleet benchmark: one control replica running many endpoints whose workers are simulated by
//! the fake runtime, to measure the control replica's idle CPU and memory at fleet size.
//!
//! Two processes, so the control replica is measured alone:
//!
//! ```sh
//! cargo build --release -p shoal-actors --example fleet
//! fleet hosts   --nats nats://127.0.0.1:4222 --endpoints 1000 --workers 10 --hosts 4
//! fleet control --nats nats://127.0.0.1:4222 --seconds 60
//! ```
//!
//! `scripts/bench-fleet` runs the whole thing (its own nats-server included) and prints the
//! numbers `BENCHMARKS.md` quotes. `control` prints its CPU (user+system, % of one core) and
//! RSS every 5 s from /proc/self, and a summary at the end.

use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_actors::control::{self, ControlConfig};
use shoal_actors::host::{self, HostConfig};
use shoal_actors::nats::{Nats, Topology};
use shoal_actors::runtime::fake::FakeRuntime;
use shoal_protocol::endpoint::{EndpointSpec, ScalerKind};
use shoal_protocol::names::Names;

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

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).cloned().unwrap_or_default();
    let url = arg(&args, "--nats", "nats://127.0.0.1:4222");
    let names = Names::new(&arg(&args, "--prefix", "shoal"))?;
    let nats = Nats::connect(&url, names.clone(), &Topology::default()).await?;
    match mode.as_str() {
        "hosts" => hosts(&args, nats, names).await,
        "control" => control_replica(&args, nats).await,
        _ => Err("usage: fleet hosts|control [--nats URL] ...".into()),
    }
}

async fn hosts(args: &[String], nats: Nats, names: Names) -> Result<(), Error> {
    let endpoints: usize = arg(args, "--endpoints", "1000").parse()?;
    let workers: u32 = arg(args, "--workers", "10").parse()?;
    let n_hosts: usize = arg(args, "--hosts", "4").parse()?;
    let state = std::env::temp_dir().join("shoal-fleet");
    let mut handles = Vec::new();
    for h in 0..n_hosts {
        let config =
            HostConfig { id: Some(format!("fleet-host-{h}")), state_dir: state.clone(), ..HostConfig::default() };
        let runtime = Arc::new(FakeRuntime { start_latency_ms: 100, job_duration_ms: 50 });
        handles.push(host::start(nats.clone(), config, runtime).await?);
    }
    // specs go straight into the bucket: the control replica may not be up yet
    for e in 0..endpoints {
        let mut spec = EndpointSpec::with_command(&format!("fleet-{e}"), "simulated");
        spec.workers_min = workers;
        spec.workers_max = workers.max(1);
        spec.scaler = ScalerKind::RequestCount;
        spec.version = 1;
        nats.endpoints.put(&spec.id, shoal_protocol::codec::to_msgpack(&spec)?.into()).await?;
    }
    let _ = names;
    eprintln!("fleet: {endpoints} endpoints x {workers} workers on {n_hosts} fake hosts; Ctrl-C to stop");
    tokio::signal::ctrl_c().await?;
    for h in handles {
        h.stop().await;
    }
    Ok(())
}

async fn control_replica(args: &[String], nats: Nats) -> Result<(), Error> {
    let seconds: u64 = arg(args, "--seconds", "60").parse()?;
    let expect: u64 = arg(args, "--expect-workers", "0").parse()?;
    let handle = control::start(nats.clone(), ControlConfig::default()).await?;
    let tick_hz = 100.0; // USER_HZ on Linux
    // wait until the fleet is up, then measure while it idles
    let start = Instant::now();
    loop {
        let idle = count_idle(&nats).await;
        eprintln!("control: {idle} idle workers after {:?}", start.elapsed());
        if idle >= expect || start.elapsed() > Duration::from_secs(600) {
            break;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
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

async fn count_idle(nats: &Nats) -> u64 {
    use futures::StreamExt;
    let mut n = 0;
    let Ok(mut keys) = nats.workers.keys().await else { return 0 };
    while let Some(Ok(k)) = keys.next().await {
        if let Ok(Some(v)) = nats.workers.get(&k).await
            && let Ok(w) = shoal_protocol::codec::from_msgpack::<shoal_protocol::worker::WorkerRecord>(&v)
        {
            n += u64::from(w.state == shoal_protocol::worker::WorkerState::Idle);
        }
    }
    n
}
