//! The fake runtime: no process at all. Each worker is a task in the host's process that
//! speaks the worker protocol to the bridge like a real worker, after a configurable start
//! latency, and "runs" each job by sleeping (the configured job duration, or the job's own
//! `sleep_ms`) and echoing its input. It has the endpoint's `concurrency` job slots, and takes
//! with job-take-batch when more than one is free, like an SDK worker with a
//! `concurrency_modifier`. It lets one machine simulate thousands of workers, for
//! the scaler and placement at fleet size. All fake workers of a process share one HTTP
//! client (one connection pool), as thousands of clients would cost a TLS setup and a pool each.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::oneshot;

use super::{BoxFuture, Exit, Launch, Runtime, StartWorkerError, WorkerHandle};

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FakeRuntime {
    /// From start to the first job-take.
    pub start_latency_ms: u64,
    /// How long a job runs when its input has no `sleep_ms`.
    pub job_duration_ms: u64,
}

impl Default for FakeRuntime {
    fn default() -> Self {
        FakeRuntime { start_latency_ms: 200, job_duration_ms: 100 }
    }
}

impl Runtime for FakeRuntime {
    fn name(&self) -> &'static str {
        "fake"
    }

    fn start(&self, launch: Launch) -> BoxFuture<'_, Result<WorkerHandle, StartWorkerError>> {
        let cfg = self.clone();
        Box::pin(async move {
            let env = |k: &str| launch.env.get(k).cloned().unwrap_or_default();
            let worker = FakeWorker {
                slots: usize::try_from(launch.spec.concurrency).unwrap_or(1).clamp(1, 256),
                take_url: env("RUNPOD_WEBHOOK_GET_JOB"),
                done_url: env("RUNPOD_WEBHOOK_POST_OUTPUT"),
                token: env("RUNPOD_AI_API_KEY"),
                http: shared_client(),
                cfg,
            };
            let (kill_tx, kill_rx) = oneshot::channel::<()>();
            let (exit_tx, exit_rx) = oneshot::channel::<Exit>();
            tokio::spawn(async move {
                let description = tokio::select! {
                    _ = kill_rx => "killed".to_string(),
                    e = Arc::new(worker).run() => e,
                };
                let _ = exit_tx.send(Exit { code: None, description, log_tail: String::new() });
            });
            Ok(WorkerHandle::new(format!("fake:{}", launch.worker_id), kill_tx, exit_rx))
        })
    }
}

/// The HTTP client of every fake worker in this process (a client is a handle to a pool).
fn shared_client() -> reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(reqwest::Client::new).clone()
}

struct FakeWorker {
    /// Jobs it runs at once.
    slots: usize,
    take_url: String,
    done_url: String,
    token: String,
    http: reqwest::Client,
    cfg: FakeRuntime,
}

impl FakeWorker {
    /// Takes and runs jobs until the bridge stops answering; returns why it ended.
    async fn run(self: Arc<Self>) -> String {
        tokio::time::sleep(Duration::from_millis(self.cfg.start_latency_ms)).await;
        let mut failures = 0;
        let mut running = tokio::task::JoinSet::new();
        loop {
            if running.len() >= self.slots {
                running.join_next().await;
            }
            while running.try_join_next().is_some() {}
            let free = self.slots - running.len();
            let in_progress = u8::from(!running.is_empty());
            let url = if free > 1 {
                let batch = self.take_url.replacen("/job-take/", "/job-take-batch/", 1);
                format!("{batch}&batch_size={free}&job_in_progress={in_progress}")
            } else {
                format!("{}&job_in_progress={in_progress}", self.take_url)
            };
            let resp = self.http.get(url).header("Authorization", &self.token).send().await;
            let reply: Value = match resp {
                Ok(r) if r.status() == reqwest::StatusCode::OK => match r.json().await {
                    Ok(v) => v,
                    Err(_) => continue,
                },
                Ok(r) if r.status().is_success() => {
                    failures = 0;
                    continue;
                }
                Ok(r) => return format!("job-take answered {}", r.status()),
                Err(e) => {
                    failures += 1;
                    if failures > 3 {
                        return format!("bridge unreachable: {e}");
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            failures = 0;
            let jobs = match reply {
                Value::Array(jobs) => jobs,
                one => vec![one],
            };
            for job in jobs {
                let me = self.clone();
                running.spawn(async move { me.run_job(job).await });
            }
        }
    }

    /// "Runs" a job: sleeps, then posts its input back as the output.
    async fn run_job(&self, job: Value) {
        let id = job.get("id").and_then(Value::as_str).unwrap_or_default().to_string();
        let input = job.get("input").cloned().unwrap_or(Value::Null);
        let ms = input.get("sleep_ms").and_then(Value::as_u64).unwrap_or(self.cfg.job_duration_ms);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        let url = format!("{}&isStream=false", self.done_url.replace("$ID", &id));
        let _ = self.http.post(url).header("Authorization", &self.token).json(&json!({ "output": input })).send().await;
    }
}
