//! RunPod's HTTP JSON shapes: the bodies of the gateway's `/v2/{endpoint}/...` API and of
//! webhook calls, spelled as the runpod SDK and RunPod's docs spell them (camelCase, durations
//! in milliseconds), and their conversions from and to the NATS API's types
//! (see shared/reference/runpod.md §1).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::api::{HealthReply, JobStatus};
use crate::job::{JobState, MAX_EXECUTION_TIMEOUT_MS, MAX_TTL_MS, MIN_EXECUTION_TIMEOUT_MS, MIN_TTL_MS, PolicyRequest};

/// The body of `/run` and `/runsync`. Unknown fields are ignored, as RunPod does.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunBody {
    /// Required; `null` counts as missing.
    #[serde(default)]
    pub input: Option<Value>,
    #[serde(default)]
    pub webhook: Option<String>,
    #[serde(default)]
    pub policy: Option<RunPolicy>,
    /// `{"accessId", "accessSecret", "bucketName", "endpointUrl"}`, handed to the worker.
    #[serde(default)]
    pub s3_config: Option<Value>,
}

impl RunBody {
    /// Reads a body, naming the field at fault: not an object, a `webhook` that is not a
    /// string, a `policy` field of the wrong type.
    pub fn from_json(body: Value) -> Result<RunBody, String> {
        let Value::Object(mut map) = body else {
            return Err(r#"the body must be a JSON object with an "input", e.g. {"input": {}}"#.into());
        };
        let mut field = |name: &str| map.remove(name).filter(|v| !v.is_null());
        let input = field("input");
        let webhook =
            field("webhook").map(|v| serde_json::from_value(v).map_err(|e| format!("webhook: {e}"))).transpose()?;
        let policy: Option<RunPolicy> =
            field("policy").map(|v| serde_json::from_value(v).map_err(|e| format!("policy: {e}"))).transpose()?;
        if let Some(p) = &policy {
            p.check()?;
        }
        let s3_config = field("s3Config");
        if s3_config.as_ref().is_some_and(|v| !v.is_object()) {
            return Err("s3Config: must be an object (accessId, accessSecret, bucketName, endpointUrl)".into());
        }
        Ok(RunBody { input, webhook, policy, s3_config })
    }
}

/// `policy` of a run request: milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunPolicy {
    #[serde(default)]
    pub execution_timeout: Option<u64>,
    #[serde(default)]
    pub ttl: Option<u64>,
    #[serde(default)]
    pub low_priority: Option<bool>,
}

impl RunPolicy {
    /// The bounds the NATS API enforces too, said in the names the client sent.
    fn check(&self) -> Result<(), String> {
        let bounds = [
            ("executionTimeout", self.execution_timeout, MIN_EXECUTION_TIMEOUT_MS, MAX_EXECUTION_TIMEOUT_MS),
            ("ttl", self.ttl, MIN_TTL_MS, MAX_TTL_MS),
        ];
        for (name, value, min, max) in bounds {
            if let Some(v) = value.filter(|v| !(min..=max).contains(v)) {
                return Err(format!("policy.{name} {v} is outside {min}..={max} (milliseconds)"));
            }
        }
        Ok(())
    }
}

impl From<RunPolicy> for PolicyRequest {
    fn from(p: RunPolicy) -> Self {
        PolicyRequest {
            execution_timeout_ms: p.execution_timeout,
            ttl_ms: p.ttl,
            low_priority: p.low_priority.unwrap_or(false),
        }
    }
}

/// The status envelope of `/status`, `/runsync` and webhook calls. Fields a state does not
/// have yet are left out, as RunPod leaves them out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    pub id: String,
    pub status: JobState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_time: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execution_time: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub retries: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_id: Option<String>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl From<&JobStatus> for Envelope {
    /// The output must be resolved first when the status carries an `output_ref`.
    fn from(s: &JobStatus) -> Self {
        Envelope {
            id: s.id.clone(),
            status: s.status,
            delay_time: s.delay_time_ms,
            execution_time: s.execution_time_ms,
            output: s.output.clone(),
            error: s.error.clone(),
            retries: s.retries,
            worker_id: s.worker_id.clone(),
        }
    }
}

/// `/run`, `/cancel`, `/retry`: the id and the state only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    pub id: String,
    pub status: JobState,
}

/// The body of a webhook call: the status envelope, plus the job's input and the webhook URL
/// (as one captured RunPod payload has them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WebhookBody {
    #[serde(flatten)]
    pub envelope: Envelope,
    pub input: Value,
    pub webhook: String,
}

/// `/health`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub jobs: HealthJobs,
    pub workers: HealthWorkers,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthJobs {
    pub completed: u64,
    pub failed: u64,
    pub in_progress: u64,
    pub in_queue: u64,
    pub retried: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthWorkers {
    pub idle: u64,
    pub initializing: u64,
    pub ready: u64,
    pub running: u64,
    pub throttled: u64,
    pub unhealthy: u64,
}

impl From<&HealthReply> for Health {
    fn from(h: &HealthReply) -> Self {
        Health {
            jobs: HealthJobs {
                completed: h.jobs.completed,
                failed: h.jobs.failed,
                in_progress: h.jobs.in_progress,
                in_queue: h.jobs.in_queue,
                retried: h.jobs.retried,
            },
            workers: HealthWorkers {
                idle: h.workers.idle,
                initializing: h.workers.initializing,
                ready: h.workers.ready,
                running: h.workers.running,
                throttled: h.workers.throttled,
                unhealthy: h.workers.unhealthy,
            },
        }
    }
}

/// Every error reply: `{"error": "<message>"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_run_body_reads_runpods_field_names() {
        let body: RunBody = serde_json::from_value(json!({
            "input": {"prompt": "hi"},
            "webhook": "http://hook",
            "policy": {"executionTimeout": 5000, "ttl": 60000, "lowPriority": true},
            "s3Config": {"bucketName": "b"},
            "unknown": 1
        }))
        .expect("decode");
        assert_eq!(body.input, Some(json!({"prompt": "hi"})));
        assert_eq!(body.s3_config, Some(json!({"bucketName": "b"})));
        let policy = PolicyRequest::from(body.policy.expect("policy"));
        assert_eq!(policy, PolicyRequest { execution_timeout_ms: Some(5000), ttl_ms: Some(60000), low_priority: true });
        let missing: RunBody = serde_json::from_value(json!({"input": null})).expect("decode");
        assert_eq!(missing.input, None, "null input counts as missing");
    }

    #[test]
    fn a_bad_run_body_names_the_field_at_fault() {
        let ok = RunBody::from_json(json!({"input": 1, "policy": {"lowPriority": true}, "webhook": null})).expect("ok");
        assert_eq!((ok.input, ok.webhook), (Some(json!(1)), None));
        assert!(RunBody::from_json(json!([1])).expect_err("array").contains("JSON object"));
        assert!(RunBody::from_json(json!({"input": 1, "webhook": 5})).expect_err("webhook").starts_with("webhook:"));
        let e = RunBody::from_json(json!({"input": 1, "policy": {"ttl": "soon"}})).expect_err("ttl");
        assert!(e.starts_with("policy:"), "{e}");
        assert!(RunBody::from_json(json!({"input": 1, "s3Config": "x"})).expect_err("s3").starts_with("s3Config"));
        let e = RunBody::from_json(json!({"input": 1, "policy": {"executionTimeout": 5}})).expect_err("too short");
        assert_eq!(e, "policy.executionTimeout 5 is outside 1000..=604800000 (milliseconds)");
        let e = RunBody::from_json(json!({"input": 1, "policy": {"ttl": 604800001}})).expect_err("too long");
        assert!(e.starts_with("policy.ttl 604800001 is outside"), "{e}");
        let edges = json!({"input": 1, "policy": {"executionTimeout": 1000, "ttl": 604800000}});
        assert!(RunBody::from_json(edges).is_ok(), "the bounds themselves are allowed");
    }

    #[test]
    fn the_envelope_is_camel_case_and_omits_what_a_state_lacks() {
        let status = JobStatus {
            id: "j".into(),
            endpoint: "e".into(),
            status: JobState::Completed,
            delay_time_ms: Some(824),
            execution_time_ms: Some(3391),
            output: Some(json!({"text": "hi"})),
            error: None,
            retries: 0,
            attempts: 1,
            worker_id: Some("w1".into()),
            output_ref: None,
            webhook_delivery: None,
            waiting_reason: None,
        };
        let v = serde_json::to_value(Envelope::from(&status)).expect("encode");
        assert_eq!(
            v,
            json!({"id": "j", "status": "COMPLETED", "delayTime": 824, "executionTime": 3391,
                   "output": {"text": "hi"}, "workerId": "w1"})
        );
        let queued = JobStatus {
            status: JobState::InQueue,
            delay_time_ms: None,
            execution_time_ms: None,
            output: None,
            worker_id: None,
            retries: 2,
            ..status
        };
        let v = serde_json::to_value(Envelope::from(&queued)).expect("encode");
        assert_eq!(v, json!({"id": "j", "status": "IN_QUEUE", "retries": 2}));
        let hook = WebhookBody { envelope: Envelope::from(&queued), input: json!(1), webhook: "http://h".into() };
        let v = serde_json::to_value(hook).expect("encode");
        assert_eq!(v["input"], 1);
        assert_eq!(v["status"], "IN_QUEUE");
    }

    #[test]
    fn health_has_runpods_shape() {
        let mut h = HealthReply::default();
        h.jobs.in_queue = 3;
        h.workers.ready = 1;
        let v = serde_json::to_value(Health::from(&h)).expect("encode");
        assert_eq!(v["jobs"]["inQueue"], 3);
        assert_eq!(v["workers"]["ready"], 1);
        assert!(v["jobs"].get("inProgress").is_some());
    }
}
