//! Encoded samples of every wire message. Each sample file was written by an earlier version
//! of this crate; it must keep decoding, so peers of different versions interoperate.
//! Regenerate (only when adding a message) with:
//! `SHOAL_WRITE_SAMPLES=<sample name> cargo test -p shoal-protocol --test samples`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Serialize, de::DeserializeOwned};
use serde_json::json;
use shoal_protocol::api::*;
use shoal_protocol::codec::{from_msgpack, to_msgpack};
use shoal_protocol::endpoint::EndpointSpec;
use shoal_protocol::events::{HostEvent, JobEvent, WebhookEvent, WorkerEvent};
use shoal_protocol::host::{DrainHost, GetWorkerLogs, Gpu, HostRecord, StopJob, WorkerLogs};
use shoal_protocol::job::*;
use shoal_protocol::keys::ApiKeyRecord;
use shoal_protocol::worker::{StartPhases, WorkerRecord, WorkerState};
use shoal_protocol::{ApiError, ErrorCode};

fn record() -> JobRecord {
    JobRecord {
        id: "0b7e2c52-5f0e-4a43-9d9c-2b8a9a0e6b1f-u1".into(),
        endpoint: "echo".into(),
        state: JobState::Completed,
        input: json!({"prompt": "hi", "n": [1, 2.5, null, true]}),
        s3_config: Some(json!({"bucketName": "b"})),
        policy: Policy { execution_timeout_ms: 600_000, ttl_ms: 86_400_000, priority: Priority::Low },
        webhook: Some("http://hook".into()),
        idempotency_key: Some("k1".into()),
        attempts: 2,
        max_attempts: 2,
        retries: 1,
        submitted_at_ms: 1_700_000_000_000,
        queued_at_ms: 1_700_000_000_100,
        started_at_ms: Some(1_700_000_000_200),
        finished_at_ms: Some(1_700_000_000_900),
        worker_id: Some("w-1".into()),
        host_id: Some("h-1".into()),
        output: Some(json!({"text": "hi"})),
        error: None,
        stop_pod: false,
        input_ref: None,
        output_ref: None,
        retention_s: None,
        webhook_delivery: None,
    }
}

fn check<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(name: &str, value: T) {
    // the package's directory as cargo gives it when the test runs (a binary built in another
    // checkout sharing the target directory still reads this one's samples)
    let dir =
        std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    let path = dir.join("tests/samples").join(format!("{name}.msgpack"));
    // `SHOAL_WRITE_SAMPLES=<name>` writes only that sample (a new message), leaving the others
    if std::env::var("SHOAL_WRITE_SAMPLES").is_ok_and(|v| v == "1" || v == name) {
        std::fs::write(&path, to_msgpack(&value).expect("encode")).expect("write sample");
    }
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("sample {name} is missing ({e}); regenerate it"));
    let decoded: T = from_msgpack(&bytes).unwrap_or_else(|e| panic!("sample {name} no longer decodes: {e}"));
    assert_eq!(decoded, value, "sample {name} decodes to something else");
}

#[test]
fn every_message_sample_still_decodes() {
    check("job_record", record());
    let mut with_refs = record();
    with_refs.input = json!(null);
    with_refs.input_ref = Some("upload-1/input".into());
    with_refs.output = None;
    with_refs.output_ref = Some("0b7e2c52-5f0e-4a43-9d9c-2b8a9a0e6b1f-u1/output".into());
    with_refs.retention_s = Some(60);
    with_refs.webhook_delivery = Some(WebhookDelivery {
        delivered: true,
        attempts: 2,
        status: Some(200),
        error: None,
        at_ms: 1_700_000_001_000,
    });
    check("job_record_with_refs", with_refs);
    check("job_token", JobToken::new("j", "e"));
    let mut queued = record();
    queued.state = JobState::InQueue;
    check(
        "job_token_with_snapshot",
        JobToken {
            id: "j".into(),
            endpoint: "e".into(),
            snapshot: Some(RecordSnapshot { revision: 7, record: queued.clone() }),
            reply: None,
        },
    );
    check(
        "job_token_with_reply",
        JobToken {
            id: "j".into(),
            endpoint: "e".into(),
            snapshot: Some(RecordSnapshot { revision: 7, record: queued }),
            reply: Some(ReplyTo {
                subject: "_INBOX.abc.def".into(),
                content_type: Some("application/json".into()),
                until_ms: 1_700_000_090_000,
            }),
        },
    );
    check("worker_job", WorkerJob { id: "j".into(), input: json!(null), s3_config: None });
    check(
        "run_request",
        RunRequest {
            endpoint: "echo".into(),
            input: json!({"a": 1}),
            policy: Some(PolicyRequest { execution_timeout_ms: Some(5000), ttl_ms: None, low_priority: true }),
            webhook: None,
            s3_config: None,
            idempotency_key: Some("k".into()),
            wait_ms: 0,
            sync: false,
            input_ref: None,
        },
    );
    check(
        "run_batch_request",
        RunBatchRequest {
            jobs: vec![
                RunRequest::new("echo", json!({"a": 1})),
                RunRequest { idempotency_key: Some("k".into()), ..RunRequest::new("echo", json!([2])) },
            ],
        },
    );
    check(
        "run_batch_reply",
        RunBatchReply {
            jobs: vec![
                RunBatchItem::from(Ok(JobStatus::from(&record()))),
                RunBatchItem::from(Err(ApiError::new(ErrorCode::BadRequest, "input is required"))),
            ],
        },
    );
    check("job_ref", JobRef { endpoint: Some("echo".into()), id: "j".into(), wait_ms: 10 });
    check("job_status", JobStatus::from(&record()));
    check(
        "stream_reply",
        StreamReply {
            id: "j".into(),
            status: JobState::InProgress,
            stream: vec![StreamChunk { output: json!({"i": 0}) }],
        },
    );
    check("endpoint_ref", EndpointRef { endpoint: "echo".into() });
    check("purge_reply", PurgeReply { removed: 3, status: "completed".into() });
    check(
        "health_reply",
        HealthReply {
            jobs: JobCounts {
                completed: 1,
                failed: 2,
                cancelled: 3,
                timed_out: 4,
                in_progress: 5,
                in_queue: 6,
                retried: 7,
            },
            workers: WorkerCounts {
                idle: 1,
                initializing: 2,
                ready: 3,
                running: 4,
                throttled: 5,
                unhealthy: 6,
                outdated: 7,
            },
            ..Default::default()
        },
    );
    let mut spec = EndpointSpec::with_command("echo", "python handler.py");
    spec.env = BTreeMap::from([("A".to_string(), "1".to_string())]);
    spec.gpu_types = vec!["NVIDIA H200".into()];
    spec.version = 3;
    check("endpoint_spec", spec.clone());
    let mut constrained = spec.clone();
    constrained.host_labels = BTreeMap::from([("datacenter".to_string(), "eu-1".to_string())]);
    constrained.min_cuda_version = Some("12.4".into());
    check("endpoint_spec_with_constraints", constrained);
    check("endpoint_list", EndpointList { endpoints: vec![spec] });
    let worker = WorkerRecord {
        id: "w-1".into(),
        endpoint: "echo".into(),
        host: "h-1".into(),
        state: WorkerState::Unhealthy,
        reason: Some("crash loop".into()),
        spec_version: 3,
        current_jobs: vec!["j".into()],
        runtime_ref: Some("pid:42".into()),
        restarts: 4,
        failures: 3,
        started_at_ms: 1,
        updated_at_ms: 2,
        jobs_done: 9,
        start: None,
    };
    check("worker_record", worker.clone());
    check("worker_list", WorkerList { workers: vec![worker] });
    check("workers_request", WorkersRequest { endpoint: Some("echo".into()) });
    check("deleted", Deleted { deleted: true });
    check(
        "host_record",
        HostRecord {
            id: "h-1".into(),
            runtime: "process".into(),
            labels: BTreeMap::from([("zone".to_string(), "a".to_string())]),
            gpus: vec![Gpu {
                name: "NVIDIA H200".into(),
                uuid: "GPU-1".into(),
                memory_mb: 141_000,
                healthy: true,
                worker_id: None,
                utilization_pct: None,
                error: None,
            }],
            bridge_url: "http://127.0.0.1:1".into(),
            workers: 1,
            max_workers: 0,
            warm: vec![],
            started_at_ms: 1,
            heartbeat_at_ms: 2,
            draining: false,
            cuda_version: None,
        },
    );
    check(
        "host_record_draining",
        HostRecord {
            id: "h-2".into(),
            runtime: "docker".into(),
            labels: BTreeMap::new(),
            gpus: vec![],
            bridge_url: "http://127.0.0.1:2".into(),
            workers: 3,
            max_workers: 8,
            warm: vec!["echo@2".into()],
            started_at_ms: 1,
            heartbeat_at_ms: 2,
            draining: true,
            cuda_version: None,
        },
    );
    check("drain_host", DrainHost { draining: true });
    check(
        "host_record_with_cuda",
        HostRecord {
            id: "h-3".into(),
            runtime: "docker".into(),
            labels: BTreeMap::from([("datacenter".to_string(), "eu-1".to_string())]),
            gpus: vec![],
            bridge_url: "http://127.0.0.1:3".into(),
            workers: 0,
            max_workers: 0,
            warm: vec![],
            started_at_ms: 1,
            heartbeat_at_ms: 2,
            draining: false,
            cuda_version: Some("12.8".into()),
        },
    );
    check(
        "stop_job",
        StopJob { endpoint: "e".into(), job_id: "j".into(), worker_id: "w".into(), reason: "cancelled".into() },
    );
    check(
        "job_event",
        JobEvent {
            job_id: "j".into(),
            endpoint: "e".into(),
            state: JobState::TimedOut,
            attempts: 1,
            worker_id: None,
            error: Some("ttl".into()),
            at_ms: 5,
            status: None,
            answered: None,
            view: None,
            removed: false,
        },
    );
    check(
        "job_event_with_status",
        JobEvent {
            job_id: "j".into(),
            endpoint: "e".into(),
            state: JobState::Completed,
            attempts: 2,
            worker_id: Some("w-1".into()),
            error: None,
            at_ms: 6,
            status: Some(JobStatus::from(&record())),
            answered: None,
            view: None,
            removed: false,
        },
    );
    check(
        "job_event_answered",
        JobEvent {
            job_id: "j".into(),
            endpoint: "e".into(),
            state: JobState::Completed,
            attempts: 1,
            worker_id: Some("w-1".into()),
            error: None,
            at_ms: 7,
            status: Some(JobStatus::from(&record())),
            answered: Some("_INBOX.abc.def".into()),
            view: None,
            removed: false,
        },
    );
    check(
        "job_event_with_view",
        JobEvent {
            job_id: "j".into(),
            endpoint: "e".into(),
            state: JobState::InProgress,
            attempts: 1,
            worker_id: Some("w-1".into()),
            error: None,
            at_ms: 8,
            status: None,
            answered: None,
            view: Some(JobView::of(&JobRecord { state: JobState::InProgress, started_at_ms: Some(7), ..record() }, 42)),
            removed: false,
        },
    );
    check(
        "job_event_removed",
        JobEvent {
            job_id: "j".into(),
            endpoint: "e".into(),
            state: JobState::InQueue,
            attempts: 0,
            worker_id: None,
            error: None,
            at_ms: 9,
            status: None,
            answered: None,
            view: None,
            removed: true,
        },
    );
    check(
        "worker_event",
        WorkerEvent {
            worker_id: "w".into(),
            endpoint: "e".into(),
            host: "h".into(),
            state: WorkerState::Idle,
            reason: None,
            restarts: 1,
            failures: 0,
            backoff_ms: Some(250),
            at_ms: 6,
            start: None,
        },
    );
    check("host_event", HostEvent { host: "h".into(), event: "started".into(), at_ms: 7 });
    check("api_error", ApiError::new(ErrorCode::NotFound, "no such job"));
    check(
        "webhook_event",
        WebhookEvent {
            job_id: "j".into(),
            endpoint: "e".into(),
            state: JobState::Failed,
            url: "http://hook".into(),
            delivered: false,
            attempts: 3,
            status: Some(500),
            error: Some("status 500".into()),
            at_ms: 8,
        },
    );
    check(
        "api_key",
        ApiKeyRecord {
            id: "k-1".into(),
            name: "ci".into(),
            key_hash: "ab".repeat(32),
            endpoints: vec!["echo".into()],
            created_at_ms: 9,
        },
    );
}

/// Samples of the messages added with the Docker runtime (start phases, GPU health, logs).
#[test]
fn docker_runtime_message_samples_still_decode() {
    let phases = StartPhases {
        warm: true,
        pull_ms: None,
        create_ms: None,
        start_ms: Some(120),
        first_ping_ms: Some(900),
        first_job_ms: Some(1100),
    };
    check(
        "worker_record_with_start",
        WorkerRecord {
            id: "w-2".into(),
            endpoint: "echo".into(),
            host: "h-1".into(),
            state: WorkerState::Idle,
            reason: None,
            spec_version: 4,
            current_jobs: vec![],
            runtime_ref: Some("docker:0123456789ab".into()),
            restarts: 1,
            failures: 0,
            started_at_ms: 1,
            updated_at_ms: 2,
            jobs_done: 3,
            start: Some(phases.clone()),
        },
    );
    check(
        "worker_event_with_start",
        WorkerEvent {
            worker_id: "w".into(),
            endpoint: "e".into(),
            host: "h".into(),
            state: WorkerState::Idle,
            reason: None,
            restarts: 0,
            failures: 0,
            backoff_ms: None,
            at_ms: 6,
            start: Some(phases),
        },
    );
    check(
        "gpu_with_health",
        Gpu {
            name: "NVIDIA H200".into(),
            uuid: "GPU-2".into(),
            memory_mb: 143_771,
            healthy: false,
            worker_id: Some("w-2".into()),
            utilization_pct: Some(87),
            error: Some("3 uncorrected ECC errors".into()),
        },
    );
    check(
        "get_worker_logs",
        GetWorkerLogs { endpoint: "e".into(), worker_id: "w".into(), lines: 50, follow_to: Some("_INBOX.x".into()) },
    );
    check("worker_logs", WorkerLogs { lines: vec!["started".into(), "took job j".into()], end: true, error: None });
}

#[test]
fn a_record_with_unknown_future_fields_still_decodes() {
    #[derive(Serialize)]
    struct Future {
        #[serde(flatten)]
        rec: JobRecord,
        some_new_field: u32,
    }
    let bytes = to_msgpack(&Future { rec: record(), some_new_field: 1 }).expect("encode");
    let rec: JobRecord = from_msgpack(&bytes).expect("decode");
    assert_eq!(rec, record());
}

/// The dashboard's queries (`jobs.list`, `hosts.list`), added after the samples above.
#[test]
fn dashboard_samples_still_decode() {
    check(
        "jobs_request",
        JobsRequest { endpoint: "echo".into(), states: vec![JobState::Failed, JobState::TimedOut], limit: 20 },
    );
    let mut summary = JobSummary::from(&record());
    summary.error = Some("boom".into());
    let queued = JobSummary {
        state: JobState::InQueue,
        started_at_ms: None,
        finished_at_ms: None,
        delay_time_ms: None,
        execution_time_ms: None,
        waiting_reason: Some("a worker is starting (1 initializing)".into()),
        ..summary.clone()
    };
    check("job_list", JobList { jobs: vec![summary, queued], matched: 7 });
    check(
        "host_list",
        HostList {
            hosts: vec![HostRecord {
                id: "h-1".into(),
                runtime: "docker".into(),
                labels: BTreeMap::new(),
                gpus: vec![Gpu {
                    name: "NVIDIA H200".into(),
                    uuid: "GPU-1".into(),
                    memory_mb: 141_000,
                    healthy: true,
                    worker_id: Some("w-1".into()),
                    utilization_pct: Some(87),
                    error: None,
                }],
                bridge_url: "http://127.0.0.1:1".into(),
                workers: 1,
                max_workers: 4,
                warm: vec!["echo@3".into()],
                started_at_ms: 1,
                heartbeat_at_ms: 2,
                draining: false,
                cuda_version: None,
            }],
        },
    );
}

/// A record writes only the fields it has (a queued job has no worker, output or times yet):
/// fewer bytes stored and sent per job, and older peers read the missing fields as their
/// defaults, as they read samples written before these fields existed.
#[test]
fn a_record_leaves_out_the_fields_it_does_not_have_and_reads_back_the_same() {
    let full = record();
    let queued = JobRecord::queued(&full.id, &full.endpoint, full.input.clone(), full.policy.clone(), 2, 1);
    let bytes = to_msgpack(&queued).expect("encode");
    let fields: serde_json::Value = from_msgpack(&bytes).expect("a map");
    let names: Vec<&String> = fields.as_object().expect("a map").keys().collect();
    for absent in ["worker_id", "started_at_ms", "output", "error", "stop_pod", "webhook_delivery", "input_ref"] {
        assert!(!names.iter().any(|n| *n == absent), "{absent} written: {names:?}");
    }
    assert_eq!(from_msgpack::<JobRecord>(&bytes).expect("decode"), queued);
    assert_eq!(from_msgpack::<JobRecord>(&to_msgpack(&full).expect("encode")).expect("decode"), full);
    assert!(bytes.len() < to_msgpack(&full).expect("encode").len());
}
