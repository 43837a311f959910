//! `shoal job run|submit|status|cancel|retry|stream|list`.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use serde_json::Value;
use shoal_actors::blobs::{Blobs, Upload, inline_limit};
use shoal_actors::client::ApiClient;
use shoal_actors::clock::now_ms;
use shoal_protocol::api::{JobRef, JobStatus, JobSummary, JobsRequest, MAX_BATCH_JOBS, RunRequest};
use shoal_protocol::human_ms;
use shoal_protocol::job::{JobState, PolicyRequest};

use super::table::{ago, first_line, render};
use super::{api, read_text};
use crate::output::line;
use crate::settings::Settings;

/// How often `job stream` asks for new chunks.
const STREAM_POLL: Duration = Duration::from_millis(500);

#[derive(Debug, clap::Subcommand)]
pub enum JobCommand {
    /// Submit a job, wait for it to end and print its status (`--async`: print its id only).
    /// Exits non-zero when the job ends FAILED, TIMED_OUT or CANCELLED.
    Run(RunArgs),
    /// Queue one job per line of a JSON-lines file (each line a job's input), in batches
    /// (`job.run_batch`); print the id of each queued job, in the file's order. A refused job
    /// prints its error on stderr with its line number, and the exit code is 1.
    Submit(SubmitArgs),
    /// Print a job's status.
    Status(JobArgs),
    /// Cancel a queued or running job.
    Cancel(JobArgs),
    /// Queue a FAILED or TIMED_OUT job again, under the same id.
    Retry(JobArgs),
    /// Print a generator job's chunks as JSON lines, as they come, until the job ends.
    Stream(JobArgs),
    /// List an endpoint's jobs, newest first: state, timings, worker, and why a queued job
    /// waits or a failed one failed.
    List(ListArgs),
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// The endpoint whose jobs to list.
    pub endpoint: String,
    /// Only jobs in these states (IN_QUEUE, IN_PROGRESS, COMPLETED, FAILED, CANCELLED,
    /// TIMED_OUT; any case), comma-separated or repeated.
    #[arg(long = "state", value_delimiter = ',', value_name = "STATE")]
    pub states: Vec<JobState>,
    /// At most this many jobs (1..=500).
    #[arg(long, default_value_t = JobsRequest::DEFAULT_LIMIT, value_parser = clap::value_parser!(u32).range(1..=JobsRequest::MAX_LIMIT as i64))]
    pub limit: u32,
    /// Print the list as JSON (`{jobs, matched}`) instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The endpoint to run the job on.
    pub endpoint: String,
    /// The job's input, one JSON value (`-` reads it from stdin, `@FILE` from a file).
    pub input: String,
    /// Print the job id at once instead of waiting for the job to end.
    #[arg(long = "async")]
    pub r#async: bool,
    /// How long each request waits for the job to end before asking again.
    #[arg(long, default_value_t = 30_000, value_name = "MS")]
    pub wait_ms: u64,
    /// Queue behind every normal job of the endpoint; does not trigger a scale-up.
    #[arg(long)]
    pub low_priority: bool,
    /// End the job TIMED_OUT if it has not finished this long after submission
    /// [default: 24 h].
    #[arg(long, value_name = "MS")]
    pub ttl_ms: Option<u64>,
    /// End the job TIMED_OUT (and stop its worker's handler) if it runs longer than this
    /// [default: the endpoint's].
    #[arg(long, value_name = "MS")]
    pub execution_timeout_ms: Option<u64>,
    /// The same key on the same endpoint returns the same job instead of a new one.
    #[arg(long, value_name = "KEY")]
    pub idempotency_key: Option<String>,
    /// URL called with the job's status when it ends.
    #[arg(long, value_name = "URL")]
    pub webhook: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct SubmitArgs {
    /// The endpoint to queue the jobs on.
    pub endpoint: String,
    /// The inputs, one JSON value per line (`-`: stdin); blank lines are skipped.
    pub file: std::path::PathBuf,
    /// Jobs per request (1..=1000; fewer when their inputs pass 512 KB).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=MAX_BATCH_JOBS as i64))]
    pub batch: u32,
    /// Queue behind every normal job of the endpoint; does not trigger a scale-up.
    #[arg(long)]
    pub low_priority: bool,
}

#[derive(Debug, clap::Args)]
pub struct JobArgs {
    /// The job id.
    pub id: String,
    /// The job's endpoint (found from the id when absent).
    #[arg(long)]
    pub endpoint: Option<String>,
}

impl JobArgs {
    fn job_ref(&self, wait_ms: u64) -> JobRef {
        JobRef { endpoint: self.endpoint.clone(), id: self.id.clone(), wait_ms }
    }
}

pub async fn job(settings: &Settings, cmd: &JobCommand) -> Result<ExitCode> {
    match cmd {
        JobCommand::Run(args) => {
            // A mistake in the input is reported before anything is sent.
            let request = run_request(args, parse_input(&args.input)?);
            run(&LargePayloads::new(api(settings).await?), args, request).await
        }
        JobCommand::Submit(args) => {
            // every line is read and checked before anything is sent
            let inputs = parse_lines(&read_text(&args.file)?, &args.file.display().to_string())?;
            submit(&LargePayloads::new(api(settings).await?), args, inputs).await
        }
        JobCommand::Status(args) => {
            let payloads = LargePayloads::new(api(settings).await?);
            let status = payloads.api.status(&args.job_ref(0)).await?;
            print_status(&payloads.resolved(status).await?)?;
            Ok(ExitCode::SUCCESS)
        }
        JobCommand::Cancel(args) => {
            print_status(&api(settings).await?.cancel(&args.job_ref(0)).await?)?;
            Ok(ExitCode::SUCCESS)
        }
        JobCommand::Retry(args) => {
            print_status(&api(settings).await?.retry(&args.job_ref(0)).await?)?;
            Ok(ExitCode::SUCCESS)
        }
        JobCommand::Stream(args) => stream(&api(settings).await?, args).await,
        JobCommand::List(args) => {
            let req = JobsRequest { endpoint: args.endpoint.clone(), states: args.states.clone(), limit: args.limit };
            let list = api(settings).await?.jobs(&req).await?;
            if args.json {
                line(serde_json::to_string_pretty(&list).context("encode the list")?)?;
            } else {
                line(jobs_table(&list.jobs, now_ms()).trim_end())?;
                if list.matched > list.jobs.len() as u64 {
                    eprintln!(
                        "{} of {} matching jobs (newest first; --limit up to {})",
                        list.jobs.len(),
                        list.matched,
                        JobsRequest::MAX_LIMIT
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// One row per job: what it is doing or did, and the one line that says why.
fn jobs_table(jobs: &[JobSummary], now_ms: u64) -> String {
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            let note = match (&j.error, &j.waiting_reason) {
                (Some(error), _) => first_line(error, 80),
                (None, Some(reason)) => first_line(reason, 80),
                (None, None) => String::new(),
            };
            vec![
                j.id.clone(),
                j.state.as_str().to_string(),
                j.priority.as_str().to_string(),
                ago(now_ms, j.submitted_at_ms),
                j.delay_time_ms.map(human_ms).unwrap_or_default(),
                j.execution_time_ms.map(human_ms).unwrap_or_default(),
                j.attempts.to_string(),
                j.worker_id.clone().unwrap_or_default(),
                note,
            ]
        })
        .collect();
    render(&["JOB", "STATE", "PRIORITY", "SUBMITTED", "DELAY", "EXECUTION", "ATTEMPTS", "WORKER", "NOTE"], &rows)
}

/// Parses the input argument; the error says what was wrong and how to quote it.
pub fn parse_input(arg: &str) -> Result<Value> {
    let (text, source) = match arg {
        "-" => (read_text(Path::new("-"))?, "stdin".to_string()),
        _ => match arg.strip_prefix('@') {
            Some(path) => (read_text(Path::new(path))?, path.to_string()),
            None => (arg.to_string(), "the input argument".to_string()),
        },
    };
    serde_json::from_str(&text).map_err(|e| {
        anyhow!("{source} is not valid JSON: {e} (quote it for the shell, e.g. '{{\"prompt\":\"hello\"}}')")
    })
}

/// The inputs of a JSON-lines text with their line numbers (from 1), skipping blank lines; the
/// first line that is not JSON is the error.
pub fn parse_lines(text: &str, source: &str) -> Result<Vec<(usize, Value)>> {
    let mut inputs = Vec::new();
    for (index, text) in text.lines().enumerate() {
        if text.trim().is_empty() {
            continue;
        }
        let value = serde_json::from_str(text)
            .map_err(|e| anyhow!("{source} line {}: not valid JSON: {e} (one JSON value per line)", index + 1))?;
        inputs.push((index + 1, value));
    }
    if inputs.is_empty() {
        return Err(anyhow!("{source} holds no job inputs (one JSON value per line)"));
    }
    Ok(inputs)
}

/// The most input bytes (as JSON) `job submit` puts in one request, so a batch of large inputs
/// stays well under the control plane's `max_input_bytes` (1 MiB by default).
const SUBMIT_REQUEST_BYTES: usize = 512 * 1024;

/// Consecutive runs of inputs of these sizes: at most `count` each, and at most `bytes` in all
/// unless one input alone is larger.
fn chunks(sizes: &[usize], count: usize, bytes: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut size) = (0, 0);
    for (i, len) in sizes.iter().enumerate() {
        if i > start && (i - start == count || size + len > bytes) {
            out.push(start..i);
            (start, size) = (i, 0);
        }
        size += len;
    }
    if start < sizes.len() {
        out.push(start..sizes.len());
    }
    out
}

/// The API client with the object store of large payloads, opened the first time an input
/// must go there or an output comes from there: the CLI sends any input and prints any output,
/// whatever NATS' `max_payload`, as the HTTP gateway does.
struct LargePayloads {
    api: ApiClient,
    blobs: tokio::sync::OnceCell<Blobs>,
}

impl LargePayloads {
    fn new(api: ApiClient) -> LargePayloads {
        LargePayloads { api, blobs: tokio::sync::OnceCell::new() }
    }

    async fn blobs(&self) -> Result<&Blobs> {
        Ok(self.blobs.get_or_try_init(|| Blobs::open(self.api.nats().clone(), self.api.names())).await?)
    }

    /// The inline limit of the server this client is connected to.
    fn inline_limit(&self) -> usize {
        inline_limit(self.api.nats().server_info().max_payload)
    }

    /// How many bytes of JSON `input` adds to a request, and whether it goes to the object
    /// store instead (then it adds nothing much).
    fn measure(&self, input: &Value) -> (usize, bool) {
        let len = serde_json::to_vec(input).map_or(0, |v| v.len());
        if len > self.inline_limit() { (0, true) } else { (len, false) }
    }

    /// Stores the request's input in the object store when [`LargePayloads::measure`] says it
    /// goes there (see [`Blobs::offload_input`]).
    async fn offload(&self, req: &mut RunRequest, large: bool) -> Result<Option<Upload>> {
        if !large {
            return Ok(None);
        }
        Ok(self.blobs().await?.offload_input(self.api.names(), req).await?)
    }

    /// The status with its output read back from the object store when it was stored there.
    async fn resolved(&self, mut status: JobStatus) -> Result<JobStatus> {
        if status.output_ref.is_some() {
            self.blobs().await?.resolve_output(&mut status).await?;
        }
        Ok(status)
    }
}

async fn submit(payloads: &LargePayloads, args: &SubmitArgs, inputs: Vec<(usize, Value)>) -> Result<ExitCode> {
    let policy = args.low_priority.then_some(PolicyRequest { low_priority: true, ..PolicyRequest::default() });
    let measured: Vec<(usize, bool)> = inputs.iter().map(|(_, input)| payloads.measure(input)).collect();
    let sizes: Vec<usize> = measured.iter().map(|(size, _)| *size).collect();
    let mut refused = 0usize;
    for range in chunks(&sizes, args.batch as usize, SUBMIT_REQUEST_BYTES) {
        let (chunk, measured) = (&inputs[range.clone()], &measured[range]);
        let (mut jobs, mut uploaded) = (Vec::with_capacity(chunk.len()), Vec::with_capacity(chunk.len()));
        for ((_, input), (_, large)) in chunk.iter().zip(measured) {
            let mut job = RunRequest { policy: policy.clone(), ..RunRequest::new(&args.endpoint, input.clone()) };
            uploaded.push(payloads.offload(&mut job, *large).await?);
            jobs.push(job);
        }
        for ((number, _), answer) in chunk.iter().zip(payloads.api.run_batch_uploaded(jobs, uploaded).await?) {
            match answer {
                Ok(status) => line(&status.id)?,
                Err(e) => {
                    refused += 1;
                    eprintln!("line {number}: {e}");
                }
            }
        }
    }
    if refused > 0 {
        eprintln!("{refused} of {} jobs refused", inputs.len());
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn run_request(args: &RunArgs, input: Value) -> RunRequest {
    let policy =
        (args.low_priority || args.ttl_ms.is_some() || args.execution_timeout_ms.is_some()).then_some(PolicyRequest {
            execution_timeout_ms: args.execution_timeout_ms,
            ttl_ms: args.ttl_ms,
            low_priority: args.low_priority,
        });
    RunRequest {
        policy,
        webhook: args.webhook.clone(),
        idempotency_key: args.idempotency_key.clone(),
        wait_ms: if args.r#async { 0 } else { args.wait_ms },
        ..RunRequest::new(&args.endpoint, input)
    }
}

async fn run(payloads: &LargePayloads, args: &RunArgs, mut request: RunRequest) -> Result<ExitCode> {
    let api = &payloads.api;
    let (_, large) = payloads.measure(&request.input);
    let uploaded = payloads.offload(&mut request, large).await?;
    let mut status = api.run_uploaded(&request, uploaded).await?;
    if args.r#async {
        line(&status.id)?;
        return Ok(ExitCode::SUCCESS);
    }
    if !status.status.is_terminal() {
        eprintln!(
            "job {} is {}; waiting for it to end (Ctrl-C stops waiting, not the job)",
            status.id,
            status.status.as_str()
        );
    }
    while !status.status.is_terminal() {
        if args.wait_ms == 0 {
            tokio::time::sleep(STREAM_POLL).await;
        }
        let job = JobRef { endpoint: Some(status.endpoint.clone()), id: status.id.clone(), wait_ms: args.wait_ms };
        status = api.status(&job).await?;
    }
    let state = status.status;
    print_status(&payloads.resolved(status).await?)?;
    Ok(exit_code(state))
}

async fn stream(api: &ApiClient, args: &JobArgs) -> Result<ExitCode> {
    let job = args.job_ref(0);
    loop {
        let reply = api.stream(&job).await?;
        for chunk in &reply.stream {
            line(serde_json::to_string(&chunk.output).context("encode a chunk")?)?;
        }
        if reply.status.is_terminal() && reply.stream.is_empty() {
            eprintln!("job {} ended {}", reply.id, reply.status.as_str());
            return Ok(exit_code(reply.status));
        }
        if reply.stream.is_empty() {
            tokio::time::sleep(STREAM_POLL).await;
        }
    }
}

fn print_status(status: &JobStatus) -> Result<()> {
    line(serde_json::to_string_pretty(status).context("encode the status")?)
}

/// Success only for a job that completed.
fn exit_code(state: JobState) -> ExitCode {
    match state {
        JobState::Failed | JobState::TimedOut | JobState::Cancelled => ExitCode::FAILURE,
        JobState::Completed | JobState::InQueue | JobState::InProgress => ExitCode::SUCCESS,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn submitted_inputs_go_in_runs_bounded_by_count_and_size() {
        // seven inputs of 10 bytes of JSON each
        let inputs = [10; 7];
        let sizes = |c: Vec<std::ops::Range<usize>>| c.iter().map(|c| c.len()).collect::<Vec<_>>();
        assert_eq!(sizes(chunks(&inputs, 3, 1000)), [3, 3, 1]);
        assert_eq!(sizes(chunks(&inputs, 100, 25)), [2, 2, 2, 1]);
        // an input larger than the bound goes alone
        assert_eq!(sizes(chunks(&inputs, 100, 5)), [1; 7]);
        assert_eq!(chunks(&inputs, 3, 1000), [0..3, 3..6, 6..7], "in order, each input once");
        // inputs that go to the object store add nothing
        assert_eq!(sizes(chunks(&[10, 0, 0, 10, 10], 100, 25)), [4, 1]);
        assert!(chunks(&[], 3, 1000).is_empty());
    }

    fn args(input: &str) -> RunArgs {
        RunArgs {
            endpoint: "ep".into(),
            input: input.into(),
            r#async: false,
            wait_ms: 1000,
            low_priority: false,
            ttl_ms: None,
            execution_timeout_ms: None,
            idempotency_key: None,
            webhook: None,
        }
    }

    #[test]
    fn input_must_be_json() {
        assert_eq!(parse_input(r#"{"a":[1,2]}"#).expect("json"), serde_json::json!({"a": [1, 2]}));
        assert_eq!(parse_input("\"text\"").expect("a string is json"), serde_json::json!("text"));
        let e = parse_input("{hello: world}").expect_err("not json").to_string();
        assert!(e.contains("not valid JSON") && e.contains("quote"), "{e}");
        let e = parse_input("@/nonexistent/input.json").expect_err("no file");
        assert!(format!("{e:#}").contains("/nonexistent/input.json"), "{e:#}");
    }

    #[test]
    fn the_request_carries_the_policy_only_when_one_is_given() {
        let plain = run_request(&args("{}"), Value::Null);
        assert_eq!((plain.policy, plain.wait_ms), (None, 1000));
        let mut a = args("{}");
        a.r#async = true;
        a.low_priority = true;
        a.ttl_ms = Some(5000);
        let req = run_request(&a, Value::Null);
        assert_eq!(req.wait_ms, 0, "--async does not wait");
        assert_eq!(
            req.policy,
            Some(PolicyRequest { execution_timeout_ms: None, ttl_ms: Some(5000), low_priority: true })
        );
    }

    #[test]
    fn the_job_list_says_why_a_job_waits_or_failed() {
        let job = |id: &str, state| JobSummary::new(id, "ep", state, 100_000);
        let queued = JobSummary {
            waiting_reason: Some("no worker yet: 1 starting".into()),
            ..job("j-queued", JobState::InQueue)
        };
        let failed = JobSummary {
            delay_time_ms: Some(12),
            execution_time_ms: Some(1_500),
            attempts: 1,
            worker_id: Some("w1".into()),
            error: Some("boom\nTraceback".into()),
            ..job("j-failed", JobState::Failed)
        };
        let t = jobs_table(&[queued, failed], 160_000);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(lines[0].starts_with("JOB") && lines[0].ends_with("NOTE"), "{t}");
        for cell in ["j-queued", "IN_QUEUE", "normal", "1m 00s ago", "no worker yet: 1 starting"] {
            assert!(lines[1].contains(cell), "{cell} missing: {t}");
        }
        for cell in ["j-failed", "FAILED", "12ms", "1.5s", "w1", "boom …"] {
            assert!(lines[2].contains(cell), "{cell} missing: {t}");
        }
    }

    #[test]
    fn only_completed_jobs_succeed() {
        assert_eq!(exit_code(JobState::Completed), ExitCode::SUCCESS);
        for s in [JobState::Failed, JobState::TimedOut, JobState::Cancelled] {
            assert_eq!(exit_code(s), ExitCode::FAILURE);
        }
    }
}
