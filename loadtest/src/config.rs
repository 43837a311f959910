//! A load test, as plain data: the scenario, how jobs are submitted, what they do, the endpoint
//! they run on and the installation that runs them. The CLI builds one; tests build one directly;
//! the report carries it, so a result always says how it was produced.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_protocol::endpoint::ScalerKind;

use crate::scenario::Scenario;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoadTest {
    pub scenario: Scenario,
    pub transport: Transport,
    pub wait: WaitMode,
    pub handler: Handler,
    /// Bytes of padding in each job's input (echoed back by the no-op handler).
    pub payload_bytes: usize,
    pub endpoint: EndpointSettings,
    pub target: Target,
    /// Run the same scenario as a raw JetStream work-queue round trip first.
    pub baseline: bool,
    /// Longest a job may take, submit to result, before it counts as `no_result`.
    pub job_timeout_ms: u64,
    /// Most jobs in flight at once in open-loop scenarios (a bound on the tester's memory; a
    /// run that reaches it says so in `schedule_lag`).
    pub max_in_flight: usize,
    /// Show a progress line on stderr.
    pub progress: bool,
    /// Async mode: also watch every job's queued and started events, to time its phases on the
    /// tester's clock (two more messages per job at the server; without it the tester watches
    /// only the terminal events, which carry the queue delay and execution time).
    #[serde(default)]
    pub phases: bool,
    /// NATS, async: queue up to this many jobs per request (`job.run_batch`), as a client that
    /// gathers the jobs waiting to be sent does; 0 or 1: one `job.run` per job.
    #[serde(default)]
    pub submit_batch: usize,
}

impl LoadTest {
    /// A burst of `jobs` no-op jobs on an embedded installation, over NATS: the defaults of
    /// `shoal-loadtest burst`.
    pub fn burst(jobs: u64) -> LoadTest {
        LoadTest {
            scenario: Scenario::Burst { jobs },
            transport: Transport::Nats,
            wait: WaitMode::Auto,
            handler: Handler::Noop,
            payload_bytes: 0,
            endpoint: EndpointSettings::default(),
            target: Target::embedded(RuntimeKind::Process),
            baseline: false,
            job_timeout_ms: 120_000,
            max_in_flight: 10_000,
            progress: false,
            phases: false,
            submit_batch: 0,
        }
    }

    pub fn job_timeout(&self) -> Duration {
        Duration::from_millis(self.job_timeout_ms)
    }

    /// Sync for the closed loop (submit and wait in one request, like `/runsync`); async
    /// otherwise (submit, then see the result on the job events), unless set.
    pub fn effective_wait(&self) -> WaitMode {
        match self.wait {
            WaitMode::Auto if self.scenario.is_closed() => WaitMode::Sync,
            WaitMode::Auto => WaitMode::Async,
            other => other,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        self.scenario.validate()?;
        if self.endpoint.workers_max == 0 {
            return Err("workers_max: must be at least 1".into());
        }
        if self.endpoint.workers_min > self.endpoint.workers_max {
            return Err(format!(
                "workers_min {} is above workers_max {}",
                self.endpoint.workers_min, self.endpoint.workers_max
            ));
        }
        if !(1..=256).contains(&self.endpoint.concurrency) {
            return Err(format!("concurrency {}: job slots per worker go from 1 to 256", self.endpoint.concurrency));
        }
        if self.job_timeout_ms < 1000 {
            return Err("job_timeout_ms: must be at least 1000".into());
        }
        if self.max_in_flight == 0 {
            return Err("max_in_flight: must be at least 1".into());
        }
        if self.submit_batch > 1 {
            if self.submit_batch > shoal_protocol::api::MAX_BATCH_JOBS {
                return Err(format!(
                    "submit_batch {}: a batch holds at most {} jobs",
                    self.submit_batch,
                    shoal_protocol::api::MAX_BATCH_JOBS
                ));
            }
            if self.transport != Transport::Nats {
                return Err("--submit-batch queues through the NATS API (job.run_batch); drop --http".into());
            }
            if self.effective_wait() != WaitMode::Async {
                return Err(
                    "--submit-batch queues without waiting: use --wait async (a closed loop waits by default)".into()
                );
            }
        }
        if let Target::Embedded { runtime: RuntimeKind::Docker, .. } = self.target
            && self.endpoint.image.is_none()
        {
            return Err("the docker runtime needs --image".into());
        }
        if matches!(self.transport, Transport::Http { url: None, .. }) && matches!(self.target, Target::External { .. })
        {
            return Err("--http without a URL starts a gateway in the embedded installation; with --nats give the gateway's URL".into());
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Transport {
    /// The NATS API (`<prefix>.v1.api.job.run`), MessagePack.
    Nats,
    /// The RunPod-compatible HTTP gateway: `POST {url}/v2/{endpoint}/run` or `/runsync`; without
    /// a URL, a gateway started in the embedded installation.
    Http {
        url: Option<String>,
        #[serde(skip_serializing)]
        api_key: Option<String>,
    },
}

impl Transport {
    pub fn name(&self) -> &'static str {
        match self {
            Transport::Nats => "nats",
            Transport::Http { .. } => "http",
        }
    }
}

impl LoadTest {
    /// How jobs are submitted, in words: the transport and, over NATS, the batches.
    pub fn submit_describe(&self) -> String {
        match &self.transport {
            Transport::Nats if self.submit_batch > 1 => {
                format!("NATS API, batches of up to {} jobs (job.run_batch)", self.submit_batch)
            }
            Transport::Nats => "NATS API".to_string(),
            Transport::Http { url: Some(url), .. } => format!("HTTP gateway {url}"),
            Transport::Http { url: None, .. } => "HTTP gateway (embedded)".to_string(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WaitMode {
    /// Sync for the closed loop, async otherwise.
    Auto,
    /// One request per job that returns when the job ended (`wait_ms`, `/runsync`).
    Sync,
    /// Submit (`/run`), then see the result on the job events stream.
    Async,
}

/// What each job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Handler {
    /// The Rust example worker, echoing its input.
    Noop,
    /// The Rust example worker, sleeping `ms` first (`{"sleep_ms": ms}`).
    Sleep { ms: u64 },
    /// The runpod-SDK Python handler of examples/python-worker: echo, or `{"mode": "sleep"}`
    /// when `sleep_ms` > 0.
    Python { sleep_ms: u64 },
}

impl Handler {
    pub fn sleep_ms(&self) -> u64 {
        match self {
            Handler::Noop => 0,
            Handler::Sleep { ms } => *ms,
            Handler::Python { sleep_ms } => *sleep_ms,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Handler::Noop => "no-op (Rust example worker)".into(),
            Handler::Sleep { ms } => format!("sleep {ms} ms (Rust example worker)"),
            Handler::Python { sleep_ms: 0 } => "echo (runpod Python SDK)".into(),
            Handler::Python { sleep_ms } => format!("sleep {sleep_ms} ms (runpod Python SDK)"),
        }
    }
}

/// The endpoint the jobs run on. Without `id` the tester creates a fresh endpoint with these
/// settings and deletes it afterwards; with `id` it uses that endpoint as it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EndpointSettings {
    pub id: Option<String>,
    pub workers_min: u32,
    pub workers_max: u32,
    pub scaler: ScalerKind,
    pub scaler_value: f64,
    pub idle_timeout_s: u32,
    /// Wait until `workers_min` workers are ready before the first job.
    pub warm: bool,
    /// The worker command (process runtime); default: the handler's example worker.
    pub command: Option<String>,
    /// The worker image (Docker runtime).
    pub image: Option<String>,
    /// Extra environment of the workers.
    pub env: Vec<(String, String)>,
    /// Job slots per worker (the endpoint's `concurrency`; the example workers read it as
    /// SHOAL_EXAMPLE_CONCURRENCY and take jobs in batches when more than one slot is free).
    #[serde(default = "one")]
    pub concurrency: u32,
}

fn one() -> u32 {
    1
}

impl Default for EndpointSettings {
    fn default() -> Self {
        EndpointSettings {
            id: None,
            workers_min: 2,
            workers_max: 2,
            scaler: ScalerKind::QueueDelay,
            scaler_value: 4.0,
            idle_timeout_s: 5,
            warm: true,
            command: None,
            image: None,
            env: vec![],
            concurrency: 1,
        }
    }
}

/// Where shoal runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Target {
    /// A child nats-server, a control plane and a host in this process, with shoal's defaults
    /// unless set here.
    Embedded {
        runtime: RuntimeKind,
        /// The control plane's tick (deadlines, scaler), ms.
        #[serde(default)]
        control_tick_ms: Option<u64>,
        /// Endpoint lease TTL, s (a new endpoint is picked up within a third of it).
        #[serde(default)]
        lease_ttl_s: Option<u64>,
        /// The fake runtime: from start to the first job-take, ms.
        #[serde(default)]
        fake_start_ms: Option<u64>,
        /// The host's `start_record_ms`: how long after its take a running job's start is
        /// written (0: at the take).
        #[serde(default)]
        start_record_ms: Option<u64>,
    },
    /// An installation that is already running.
    External {
        nats_url: String,
        prefix: String,
        /// The server's monitoring endpoint (`http://host:8222`), for traffic per job.
        #[serde(default)]
        monitor_url: Option<String>,
    },
}

impl Target {
    /// An embedded installation with shoal's default settings.
    pub fn embedded(runtime: RuntimeKind) -> Target {
        Target::Embedded {
            runtime,
            control_tick_ms: None,
            lease_ttl_s: None,
            fake_start_ms: None,
            start_record_ms: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum RuntimeKind {
    /// Workers are local processes.
    Process,
    /// Workers are containers.
    Docker,
    /// No process at all: simulated workers, for thousands of them.
    Fake,
}

impl RuntimeKind {
    pub fn name(self) -> &'static str {
        match self {
            RuntimeKind::Process => "process",
            RuntimeKind::Docker => "docker",
            RuntimeKind::Fake => "fake",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_closed_loop_waits_in_one_request_by_default() {
        let mut t = LoadTest::burst(10);
        assert_eq!(t.effective_wait(), WaitMode::Async);
        t.scenario = Scenario::Closed { concurrency: 1, jobs: Some(10), duration_s: None };
        assert_eq!(t.effective_wait(), WaitMode::Sync);
        t.wait = WaitMode::Async;
        assert_eq!(t.effective_wait(), WaitMode::Async);
    }

    #[test]
    fn bad_settings_are_refused_with_the_field() {
        let mut t = LoadTest::burst(10);
        t.endpoint.workers_min = 3;
        assert!(t.validate().expect_err("min > max").contains("workers_min"));
        let mut t = LoadTest::burst(10);
        t.endpoint.concurrency = 0;
        assert!(t.validate().expect_err("no slots").contains("concurrency"));
        let mut t = LoadTest::burst(10);
        t.target = Target::embedded(RuntimeKind::Docker);
        assert!(t.validate().expect_err("no image").contains("--image"));
        let mut t = LoadTest::burst(10);
        t.transport = Transport::Http { url: None, api_key: None };
        assert!(t.validate().is_ok());
        t.target =
            Target::External { nats_url: "nats://127.0.0.1:4222".into(), prefix: "shoal".into(), monitor_url: None };
        assert!(t.validate().expect_err("no gateway").contains("--http"));
        assert!(LoadTest::burst(0).validate().is_err());
    }

    #[test]
    fn the_api_key_never_reaches_the_report() {
        let t = Transport::Http { url: Some("http://127.0.0.1:1".into()), api_key: Some("secret".into()) };
        let json = serde_json::to_string(&t).expect("encode");
        assert!(!json.contains("secret"), "{json}");
    }
}
