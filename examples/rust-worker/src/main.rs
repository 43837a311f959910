//! A tiny worker speaking the RunPod worker HTTP protocol (see `runpod.md` §3), for tests and benchmarks.
//!
//! It reads the same environment as the runpod Python SDK and behaves like an SDK worker without a job-stop channel
//! (like SDK < 1.10.1: only killing the process cancels a job). It has one job slot, or `SHOAL_EXAMPLE_CONCURRENCY`
//! of them (like the SDK's `concurrency_modifier`, runpod.md §3.6): with more than one slot free it takes jobs with
//! job-take-batch (`batch_size` = the free slots) and runs them concurrently. What a job does is chosen by its
//! `input` (a JSON object; any other value is echoed), applied in this order:
//!
//! - `{"sleep_ms": N}`: sleep N ms first (then the other keys apply; alone, the input is echoed);
//! - `{"exit": code}`: exit the process with `code` mid-job, posting nothing (fault tests);
//! - `{"fail": "msg"}`: post `{"error": "msg"}`;
//! - `{"stream": N}`: post N chunks `{"output": {"i": n}}` to job-stream, then `{"output": []}` to job-done with
//!   `isStream=true`;
//! - otherwise: post `{"output": input}`.
//!
//! `SHOAL_EXAMPLE_LOAD_MS=N` makes it "load its model" for N ms before it first asks for a job (like a handler
//! module that loads weights before `runpod.serverless.start`): cold-start and init-timeout trials.

use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use reqwest::StatusCode;
use serde_json::{Value, json};

// like the `shoal` binary: with it (and the job's input moved into its output, not copied) the
// worker's CPU per no-op job fell ~9 % in a burst (BENCHMARKS series 25)
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The SDK bounds each job-take long-poll at 90 s and re-issues it on timeout.
const TAKE_TIMEOUT: Duration = Duration::from_secs(90);
/// Total timeout of the done/stream posts (the SDK uses 600 s; a test worker needs less).
const POST_TIMEOUT: Duration = Duration::from_secs(60);
const VERSION: &str = "shoal-example";

struct Config {
    get_job: String,
    post_output: String,
    post_stream: String,
    ping: String,
    ping_interval: Duration,
    api_key: String,
    /// Job slots (`SHOAL_EXAMPLE_CONCURRENCY`, default 1).
    concurrency: usize,
    /// How long it loads before its first job-take (`SHOAL_EXAMPLE_LOAD_MS`, default 0).
    load: Duration,
}

fn required(name: &str) -> Result<String> {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => Ok(v),
        _ => bail!("required environment variable {name} is not set"),
    }
}

impl Config {
    fn from_env() -> Result<Self> {
        let pod_id = required("RUNPOD_POD_ID")?;
        let interval_ms: u64 = match std::env::var("RUNPOD_PING_INTERVAL") {
            Ok(v) => {
                v.trim().parse().with_context(|| format!("RUNPOD_PING_INTERVAL must be milliseconds, got {v:?}"))?
            }
            Err(_) => 10_000,
        };
        // Same substitutions as the SDK: in GET_JOB `$ID` is the worker id; in the post and ping templates
        // `$RUNPOD_POD_ID` is the worker id and (posts only) `$ID` is replaced per job later.
        let with_pod = |name: &str| -> Result<String> { Ok(required(name)?.replace("$RUNPOD_POD_ID", &pod_id)) };
        let get_job = required("RUNPOD_WEBHOOK_GET_JOB")?.replace("$ID", &pod_id);
        let post_output = with_pod("RUNPOD_WEBHOOK_POST_OUTPUT")?;
        let post_stream = with_pod("RUNPOD_WEBHOOK_POST_STREAM")?;
        for (name, url) in [
            ("RUNPOD_WEBHOOK_GET_JOB", &get_job),
            ("RUNPOD_WEBHOOK_POST_OUTPUT", &post_output),
            ("RUNPOD_WEBHOOK_POST_STREAM", &post_stream),
        ] {
            if !url.contains('?') {
                bail!("{name} must contain '?' (parameters are appended with '&'): {url}");
            }
        }
        let concurrency = match std::env::var("SHOAL_EXAMPLE_CONCURRENCY") {
            Ok(v) if !v.trim().is_empty() => match v.trim().parse::<usize>() {
                Ok(n) if (1..=256).contains(&n) => n,
                _ => bail!("SHOAL_EXAMPLE_CONCURRENCY must be a number of job slots from 1 to 256, got {v:?}"),
            },
            _ => 1,
        };
        let load_ms = match std::env::var("SHOAL_EXAMPLE_LOAD_MS") {
            Ok(v) if !v.trim().is_empty() => match v.trim().parse::<u64>() {
                Ok(ms) if ms <= 86_400_000 => ms,
                _ => bail!("SHOAL_EXAMPLE_LOAD_MS must be milliseconds from 0 to 86400000, got {v:?}"),
            },
            _ => 0,
        };
        Ok(Self {
            concurrency,
            load: Duration::from_millis(load_ms),
            get_job,
            post_output,
            post_stream,
            ping: with_pod("RUNPOD_WEBHOOK_PING")?,
            // 0 would make the ping loop spin; the SDK's whole-second rounding has the same hazard.
            ping_interval: Duration::from_millis(interval_ms.max(100)),
            api_key: required("RUNPOD_AI_API_KEY")?,
        })
    }
}

/// Percent-encodes a query parameter value (everything but RFC 3986 unreserved characters).
fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

struct Worker {
    cfg: Config,
    http: reqwest::Client,
    /// The jobs being run, listed in pings.
    current: Arc<Mutex<Vec<String>>>,
}

/// The job-take URL for `free` free slots (runpod.md §3.6): job-take for one, job-take-batch with `batch_size` for
/// more; `job_in_progress` tells whether this worker still runs a job.
fn take_url(get_job: &str, free: usize, in_progress: bool) -> String {
    let in_progress = u8::from(in_progress);
    if free > 1 {
        let batch = get_job.replacen("/job-take/", "/job-take-batch/", 1);
        format!("{batch}&batch_size={free}&job_in_progress={in_progress}")
    } else {
        format!("{get_job}&job_in_progress={in_progress}")
    }
}

/// The jobs of a job-take reply: one object, or an array of them (batch); anything without an id and an input is
/// dropped with a message.
fn jobs_of(reply: Value) -> Vec<(String, Value)> {
    let items = match reply {
        Value::Array(items) => items,
        one => vec![one],
    };
    items
        .into_iter()
        .filter_map(|mut job| {
            // the input is moved out, not copied: it is posted back as the output
            let input = job
                .as_object_mut()
                .filter(|o| o.get("id").is_some_and(Value::is_string))
                .and_then(|o| o.remove("input"));
            match (job.get("id").and_then(Value::as_str), input) {
                (Some(id), Some(input)) => Some((id.to_owned(), input)),
                _ => {
                    eprintln!("shoal-example-worker: dropping job without id and input: {job}");
                    None
                }
            }
        })
        .collect()
}

impl Worker {
    fn running(&self, id: &str, on: bool) {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if on {
            current.push(id.to_owned());
        } else {
            current.retain(|j| j != id);
        }
    }

    /// One job-take call for `free` slots. `Ok(vec![])` means no job (204, 400, malformed reply); errors carry the
    /// back-off to use.
    async fn take(&self, free: usize, in_progress: bool) -> Result<Vec<(String, Value)>, Duration> {
        let url = take_url(&self.cfg.get_job, free, in_progress);
        let resp = match self.http.get(&url).timeout(TAKE_TIMEOUT).send().await {
            Ok(r) => r,
            Err(e) if e.is_timeout() => return Ok(vec![]),
            Err(e) => {
                eprintln!("shoal-example-worker: job-take failed: {e}");
                return Err(Duration::from_secs(1));
            }
        };
        match resp.status() {
            StatusCode::OK => {}
            StatusCode::NO_CONTENT | StatusCode::BAD_REQUEST => return Ok(vec![]),
            StatusCode::TOO_MANY_REQUESTS => return Err(Duration::from_secs(5)),
            s => {
                eprintln!("shoal-example-worker: job-take answered {s}");
                return Err(Duration::from_secs(1));
            }
        }
        match resp.json::<Value>().await {
            Ok(reply) => Ok(jobs_of(reply)),
            Err(e) => {
                eprintln!("shoal-example-worker: job-take body is not JSON: {e}");
                Ok(vec![])
            }
        }
    }

    /// POSTs a JSON body; retries on 5xx like the SDK (3 attempts, waits 2 s then 3 s).
    async fn post(&self, url: &str, body: &Value) -> Result<()> {
        let mut waits = [2, 3].into_iter();
        loop {
            let resp = self
                .http
                .post(url)
                .timeout(POST_TIMEOUT)
                .json(body)
                .send()
                .await
                .with_context(|| format!("POST {url}"))?;
            let status = resp.status();
            if status.is_server_error()
                && let Some(wait) = waits.next()
            {
                tokio::time::sleep(Duration::from_secs(wait)).await;
                continue;
            }
            if status.is_client_error() || status.is_server_error() {
                bail!("POST {url} answered {status}");
            }
            return Ok(());
        }
    }

    async fn done(&self, id: &str, stream: bool, body: &Value) -> Result<()> {
        let url = format!("{}&isStream={stream}", self.cfg.post_output.replace("$ID", id));
        self.post(&url, body).await
    }

    async fn run(&self, id: &str, input: Value) -> Result<()> {
        if let Some(ms) = input.get("sleep_ms").and_then(Value::as_u64) {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if let Some(code) = input.get("exit").and_then(Value::as_i64) {
            eprintln!("shoal-example-worker: job {id} asks to exit with code {code}");
            std::process::exit(i32::try_from(code).unwrap_or(1));
        }
        if let Some(msg) = input.get("fail") {
            let msg = msg.as_str().map_or_else(|| msg.to_string(), str::to_owned);
            return self.done(id, false, &json!({ "error": msg })).await;
        }
        if let Some(n) = input.get("stream").and_then(Value::as_u64) {
            let url = format!("{}&isStream=false", self.cfg.post_stream.replace("$ID", id));
            for i in 0..n {
                self.post(&url, &json!({ "output": { "i": i } })).await?;
            }
            return self.done(id, true, &json!({ "output": [] })).await;
        }
        self.done(id, false, &json!({ "output": input })).await
    }
}

/// Heartbeat: `GET {PING}?job_id=<id>&runpod_version=…` (no `job_id` when idle), then sleep the interval.
async fn ping_loop(http: reqwest::Client, base: String, interval: Duration, current: Arc<Mutex<Vec<String>>>) {
    let sep = if base.contains('?') { '&' } else { '?' };
    loop {
        let jobs = current.lock().unwrap_or_else(|e| e.into_inner()).join(",");
        let url = if jobs.is_empty() {
            format!("{base}{sep}runpod_version={VERSION}")
        } else {
            format!("{base}{sep}job_id={}&runpod_version={VERSION}", encode(&jobs))
        };
        if let Err(e) = http.get(&url).timeout(interval * 2).send().await {
            eprintln!("shoal-example-worker: ping failed: {e}");
        }
        tokio::time::sleep(interval).await;
    }
}

async fn main_loop(cfg: Config) -> Result<()> {
    if !cfg.load.is_zero() {
        eprintln!("shoal-example-worker: loading the model ({} ms)", cfg.load.as_millis());
        tokio::time::sleep(cfg.load).await;
    }
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        cfg.api_key.parse().context("RUNPOD_AI_API_KEY is not a valid header value")?,
    );
    let http = reqwest::Client::builder()
        .default_headers(headers)
        .user_agent(concat!("shoal-example-worker/", env!("CARGO_PKG_VERSION")))
        .build()
        .context("building the HTTP client")?;
    let current = Arc::new(Mutex::new(Vec::new()));
    tokio::spawn(ping_loop(http.clone(), cfg.ping.clone(), cfg.ping_interval, current.clone()));
    let worker = Arc::new(Worker { cfg, http, current });

    // SIGTERM/SIGINT: like the SDK, finish the current long-poll and jobs, then exit 0.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        eprintln!("shoal-example-worker: signal received, stopping after the current take/job");
        let _ = stop_tx.send(true);
    });

    let slots = worker.cfg.concurrency;
    let mut jobs = tokio::task::JoinSet::new();
    while !*stop_rx.borrow() {
        // a slot frees when a job ends; those that ended meanwhile free theirs too, so the next take asks for them all
        if jobs.len() >= slots {
            jobs.join_next().await;
        }
        while jobs.try_join_next().is_some() {}
        match worker.take(slots - jobs.len(), !jobs.is_empty()).await {
            Ok(taken) => {
                for (id, input) in taken {
                    // marked running at once, before the handler starts, like the SDK
                    worker.running(&id, true);
                    let worker = worker.clone();
                    jobs.spawn(async move {
                        if let Err(e) = worker.run(&id, input).await {
                            eprintln!("shoal-example-worker: job {id}: {e:#}");
                        }
                        worker.running(&id, false);
                    });
                }
            }
            Err(backoff) => tokio::time::sleep(backoff).await,
        }
    }
    while jobs.join_next().await.is_some() {}
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

// Like the SDK's single asyncio loop: one thread is enough, and a multi-threaded runtime per
// worker process costs more in wake-ups than the jobs themselves.
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cfg = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("shoal-example-worker: {e:#}");
            return ExitCode::from(2);
        }
    };
    match main_loop(cfg).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shoal-example-worker: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GET_JOB: &str = "http://h:1/v2/ep/job-take/w1?gpu=none";

    #[test]
    fn one_free_slot_takes_one_job_and_more_take_a_batch_of_them() {
        assert_eq!(take_url(GET_JOB, 1, false), "http://h:1/v2/ep/job-take/w1?gpu=none&job_in_progress=0");
        assert_eq!(take_url(GET_JOB, 1, true), "http://h:1/v2/ep/job-take/w1?gpu=none&job_in_progress=1");
        assert_eq!(
            take_url(GET_JOB, 3, true),
            "http://h:1/v2/ep/job-take-batch/w1?gpu=none&batch_size=3&job_in_progress=1"
        );
    }

    #[test]
    fn a_take_reply_is_one_job_or_a_batch_and_malformed_jobs_are_dropped() {
        let one = jobs_of(json!({"id": "a", "input": {"x": 1}}));
        assert_eq!(one, vec![("a".to_string(), json!({"x": 1}))]);
        let batch = jobs_of(json!([{"id": "a", "input": 1}, {"id": "b"}, {"input": 2}, {"id": "c", "input": null}]));
        assert_eq!(batch, vec![("a".to_string(), json!(1)), ("c".to_string(), Value::Null)]);
        assert!(jobs_of(json!([])).is_empty());
        assert!(jobs_of(json!("nonsense")).is_empty());
    }
}
