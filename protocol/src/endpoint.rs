//! Endpoint specs: what an endpoint runs and how it scales (RunPod's endpoint settings).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::ids::validate_id;
use crate::job::{MAX_EXECUTION_TIMEOUT_MS, MIN_EXECUTION_TIMEOUT_MS};

/// The variable of an endpoint's `env` that sets how long its workers may take to start, in
/// seconds: from the container's (or process's) start to the worker's first job-take. RunPod's.
pub const INIT_TIMEOUT_ENV: &str = "RUNPOD_INIT_TIMEOUT";
/// Without it: RunPod's 7 minutes.
pub const DEFAULT_INIT_TIMEOUT_S: u64 = 420;
/// The longest start an endpoint may allow: 7 days, like a job's ttl.
pub const MAX_INIT_TIMEOUT_S: u64 = 604_800;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ScalerKind {
    #[default]
    QueueDelay,
    RequestCount,
}

fn d_gpu_count() -> u32 {
    1
}
fn d_workers_max() -> u32 {
    3
}
fn d_idle_timeout_s() -> u32 {
    5
}
fn d_scaler_value() -> f64 {
    4.0
}
fn d_execution_timeout_ms() -> u64 {
    600_000
}
fn d_true() -> bool {
    true
}
fn d_concurrency() -> u32 {
    1
}
fn d_extra_workers() -> u32 {
    2
}
fn d_max_attempts() -> u32 {
    2
}

/// An endpoint: a worker (a command for the process runtime, an image for Docker) and its
/// settings. Defaults are RunPod's (see shared/reference/runpod.md §2.1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    pub id: String,
    /// Container image (Docker runtime).
    #[serde(default)]
    pub image: Option<String>,
    /// Command line run by `sh -c` (process runtime).
    #[serde(default)]
    pub command: Option<String>,
    /// Working directory of the command (process runtime).
    #[serde(default)]
    pub workdir: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// GPU types in priority order, e.g. `["NVIDIA H200", "NVIDIA A100 80GB"]`; empty = any.
    #[serde(default)]
    pub gpu_types: Vec<String>,
    #[serde(default = "d_gpu_count")]
    pub gpu_count: u32,
    /// Labels a host must carry (all of them, `key = value`) for a worker of this endpoint:
    /// a data center, a network, a machine class (hosts set theirs in `[host.labels]`).
    /// Left out of the encoding when empty, so peers without the field read the spec.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub host_labels: BTreeMap<String, String>,
    /// The oldest CUDA version (`major.minor`) a host's driver must support, e.g. `"12.4"`
    /// (RunPod's `minCudaVersion`); none = any. Left out when none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_cuda_version: Option<String>,
    /// Always-on workers, never scaled down.
    #[serde(default)]
    pub workers_min: u32,
    #[serde(default = "d_workers_max")]
    pub workers_max: u32,
    #[serde(default = "d_idle_timeout_s")]
    pub idle_timeout_s: u32,
    #[serde(default)]
    pub scaler: ScalerKind,
    /// Seconds of queue delay (QUEUE_DELAY) or jobs per worker (REQUEST_COUNT).
    #[serde(default = "d_scaler_value")]
    pub scaler_value: f64,
    #[serde(default = "d_execution_timeout_ms")]
    pub execution_timeout_ms: u64,
    #[serde(default = "d_true")]
    pub flashboot: bool,
    /// Volumes as `source:target` (Docker: a host path or a named volume, `:ro` allowed).
    #[serde(default)]
    pub volumes: Vec<String>,
    /// The endpoint's network volume (Docker: a named volume or a host path), mounted at
    /// `/runpod-volume` as on RunPod.
    #[serde(default)]
    pub network_volume: Option<String>,
    /// Memory limit of each worker (Docker); none = no limit.
    #[serde(default)]
    pub memory_mb: Option<u64>,
    /// CPU limit of each worker, in CPUs (`1.5` = one and a half; Docker); none = no limit.
    #[serde(default)]
    pub cpus: Option<f64>,
    /// Jobs one worker may run at once (a hint; the SDK's concurrency_modifier decides).
    #[serde(default = "d_concurrency")]
    pub concurrency: u32,
    /// Takes of a job whose workers keep vanishing before it fails.
    #[serde(default = "d_max_attempts")]
    pub max_attempts: u32,
    /// During a spike, up to this many workers beyond what the rule asks, started only where a
    /// host has this endpoint version warm (RunPod's "extra workers"; never above max).
    #[serde(default = "d_extra_workers")]
    pub extra_workers: u32,
    /// Queued jobs above which submissions are refused with `overloaded`; none = unbounded.
    #[serde(default)]
    pub queue_limit: Option<u64>,
    /// Bumped by the control plane on every change; ignored on input.
    #[serde(default)]
    pub version: u64,
}

impl EndpointSpec {
    /// A minimal spec with RunPod's defaults, for tests and examples.
    pub fn with_command(id: &str, command: &str) -> EndpointSpec {
        EndpointSpec {
            id: id.into(),
            image: None,
            command: Some(command.into()),
            workdir: None,
            env: BTreeMap::new(),
            gpu_types: vec![],
            gpu_count: d_gpu_count(),
            host_labels: BTreeMap::new(),
            min_cuda_version: None,
            workers_min: 0,
            workers_max: d_workers_max(),
            idle_timeout_s: d_idle_timeout_s(),
            scaler: ScalerKind::QueueDelay,
            scaler_value: d_scaler_value(),
            execution_timeout_ms: d_execution_timeout_ms(),
            flashboot: true,
            volumes: vec![],
            network_volume: None,
            memory_mb: None,
            cpus: None,
            concurrency: d_concurrency(),
            max_attempts: d_max_attempts(),
            extra_workers: d_extra_workers(),
            queue_limit: None,
            version: 0,
        }
    }

    /// How long a worker may take from its start to its first job-take before it is stopped and
    /// reported Unhealthy: [`INIT_TIMEOUT_ENV`] in `env` (seconds), else 7 minutes. A value
    /// [`EndpointSpec::validate`] refuses counts as the default.
    pub fn init_timeout_ms(&self) -> u64 {
        self.init_timeout_s().ok().flatten().unwrap_or(DEFAULT_INIT_TIMEOUT_S) * 1000
    }

    fn init_timeout_s(&self) -> Result<Option<u64>, String> {
        let Some(value) = self.env.get(INIT_TIMEOUT_ENV) else { return Ok(None) };
        match value.trim().parse::<u64>() {
            Ok(s) if (1..=MAX_INIT_TIMEOUT_S).contains(&s) => Ok(Some(s)),
            _ => Err(format!("{value:?} must be whole seconds in 1..={MAX_INIT_TIMEOUT_S}")),
        }
    }

    /// Checks every field; the error names the field and the reason.
    pub fn validate(&self) -> Result<(), ApiError> {
        let bad = |field: &str, reason: String| {
            Err(ApiError::bad_request(format!("endpoint {}: {field}: {reason}", self.id)))
        };
        validate_id("endpoint id", &self.id)?;
        if self.image.is_none() && self.command.is_none() {
            return bad("image/command", "set `image` (Docker runtime) or `command` (process runtime)".into());
        }
        if self.command.as_deref().is_some_and(|c| c.trim().is_empty()) {
            return bad("command", "must not be empty".into());
        }
        if self.image.as_deref().is_some_and(|c| c.trim().is_empty()) {
            return bad("image", "must not be empty".into());
        }
        if self.workers_min > self.workers_max {
            return bad("workers_min", format!("{} is above workers_max {}", self.workers_min, self.workers_max));
        }
        if self.workers_max > 10_000 {
            return bad("workers_max", format!("{} is above the limit of 10000", self.workers_max));
        }
        if !(1..=3600).contains(&self.idle_timeout_s) {
            return bad("idle_timeout_s", format!("{} is outside 1..=3600", self.idle_timeout_s));
        }
        if !(self.scaler_value.is_finite() && self.scaler_value > 0.0) {
            return bad("scaler_value", format!("{} must be a number above 0", self.scaler_value));
        }
        if !(MIN_EXECUTION_TIMEOUT_MS..=MAX_EXECUTION_TIMEOUT_MS).contains(&self.execution_timeout_ms) {
            return bad(
                "execution_timeout_ms",
                format!(
                    "{} is outside {MIN_EXECUTION_TIMEOUT_MS}..={MAX_EXECUTION_TIMEOUT_MS}",
                    self.execution_timeout_ms
                ),
            );
        }
        if self.gpu_count == 0 || self.gpu_count > 16 {
            return bad("gpu_count", format!("{} is outside 1..=16", self.gpu_count));
        }
        if self.concurrency == 0 {
            return bad("concurrency", "must be at least 1".into());
        }
        if !(1..=100).contains(&self.max_attempts) {
            return bad("max_attempts", format!("{} is outside 1..=100", self.max_attempts));
        }
        for key in self.env.keys() {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                return bad("env", format!("{key:?} is not a valid variable name"));
            }
        }
        for (key, value) in &self.host_labels {
            if let Err(reason) = check_label(key, value) {
                return bad("host_labels", reason);
            }
        }
        if let Some(v) = &self.min_cuda_version
            && parse_cuda_version(v).is_none()
        {
            return bad("min_cuda_version", format!("{v:?} is not a CUDA version like \"12.4\""));
        }
        if let Err(reason) = self.init_timeout_s() {
            return bad(&format!("env.{INIT_TIMEOUT_ENV}"), reason);
        }
        for v in &self.volumes {
            if !v.contains(':') {
                return bad("volumes", format!("{v:?} must be `source:target`"));
            }
        }
        if self.network_volume.as_deref().is_some_and(|v| v.trim().is_empty() || v.contains(':')) {
            return bad("network_volume", "must be a volume name or an absolute path, without `:`".into());
        }
        if self.memory_mb.is_some_and(|m| m < 6) {
            return bad("memory_mb", "must be at least 6 (Docker's minimum)".into());
        }
        if self.cpus.is_some_and(|c| !(0.01..=1024.0).contains(&c)) {
            return bad("cpus", format!("{} is outside 0.01..=1024", self.cpus.unwrap_or_default()));
        }
        Ok(())
    }
}

/// A label `key = value` as hosts and endpoints write them: a key of letters, digits, `-`, `_`,
/// `.` or `/` (up to 63 characters), a value of at most 255 characters without control ones.
pub fn check_label(key: &str, value: &str) -> Result<(), String> {
    let key_ok = !key.is_empty()
        && key.len() <= 63
        && key.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    if !key_ok {
        return Err(format!("{key:?} is not a label key (letters, digits, - _ . /, at most 63)"));
    }
    if value.len() > 255 || value.chars().any(char::is_control) {
        return Err(format!("the value of {key} is longer than 255 characters or has control characters"));
    }
    Ok(())
}

/// `"12.4"` → `(12, 4)`; `"12"` → `(12, 0)`.
pub fn parse_cuda_version(v: &str) -> Option<(u32, u32)> {
    let mut parts = v.trim().split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = match parts.next() {
        Some(m) => m.parse().ok()?,
        None => 0,
    };
    parts.next().is_none().then_some((major, minor))
}

/// The endpoints file `shoal dev --endpoints` and `shoal endpoint apply -f` read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct EndpointsFile {
    #[serde(default, rename = "endpoint")]
    pub endpoints: Vec<EndpointSpec>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_runpods() {
        let s = EndpointSpec::with_command("ep", "true");
        s.validate().expect("valid");
        assert_eq!((s.workers_max, s.idle_timeout_s, s.execution_timeout_ms), (3, 5, 600_000));
        assert_eq!(s.scaler, ScalerKind::QueueDelay);
    }

    #[test]
    fn invalid_specs_name_the_field() {
        let mut s = EndpointSpec::with_command("ep", "true");
        s.workers_min = 4;
        let e = s.validate().expect_err("min > max");
        assert!(e.message.contains("workers_min"), "{}", e.message);
        let mut s = EndpointSpec::with_command("ep", "true");
        s.command = None;
        assert!(s.validate().expect_err("nothing to run").message.contains("image/command"));
        let s = EndpointSpec::with_command("a.b", "true");
        assert!(s.validate().expect_err("bad id").message.contains("endpoint id"));
        let mut s = EndpointSpec::with_command("ep", "true");
        s.scaler_value = f64::NAN;
        assert!(s.validate().expect_err("nan").message.contains("scaler_value"));
        let mut s = EndpointSpec::with_command("ep", "true");
        s.cpus = Some(0.0);
        assert!(s.validate().expect_err("no cpu").message.contains("cpus"));
        s.cpus = Some(1.5);
        s.memory_mb = Some(1);
        assert!(s.validate().expect_err("tiny memory").message.contains("memory_mb"));
        s.memory_mb = Some(512);
        s.network_volume = Some("a:b".into());
        assert!(s.validate().expect_err("colon").message.contains("network_volume"));
        s.network_volume = Some("models".into());
        s.validate().expect("limits and a network volume are valid");
    }

    #[test]
    fn host_labels_and_the_cuda_version_are_checked() {
        let mut s = EndpointSpec::with_command("ep", "true");
        s.host_labels.insert("datacenter".into(), "eu-1".into());
        s.min_cuda_version = Some("12.4".into());
        s.validate().expect("valid");
        for bad in ["12.x", "twelve", "12.4.1", ""] {
            s.min_cuda_version = Some(bad.into());
            assert!(s.validate().expect_err(bad).message.contains("min_cuda_version"));
        }
        s.min_cuda_version = None;
        s.host_labels.insert("bad key".into(), "x".into());
        assert!(s.validate().expect_err("a space").message.contains("host_labels"));
        assert_eq!(parse_cuda_version("12"), Some((12, 0)));
        assert_eq!(parse_cuda_version(" 11.8 "), Some((11, 8)));
        assert!(parse_cuda_version("12.10") > parse_cuda_version("12.9"), "numeric, not textual");
    }

    #[test]
    fn a_spec_without_constraints_encodes_as_before() {
        // peers that know neither field refuse unknown fields: a spec that sets neither must not
        // carry them
        let s = EndpointSpec::with_command("ep", "true");
        let bytes = crate::codec::to_msgpack(&s).expect("encode");
        let v: serde_json::Value = crate::codec::from_msgpack(&bytes).expect("a map");
        assert!(v.get("host_labels").is_none() && v.get("min_cuda_version").is_none(), "{v}");
    }

    #[test]
    fn the_init_timeout_is_runpods_unless_the_env_sets_it() {
        let mut s = EndpointSpec::with_command("ep", "true");
        assert_eq!(s.init_timeout_ms(), 420_000);
        s.env.insert(INIT_TIMEOUT_ENV.into(), "900".into());
        s.validate().expect("valid");
        assert_eq!(s.init_timeout_ms(), 900_000);
        for bad in ["0", "-5", "ten", "1.5", "604801", ""] {
            s.env.insert(INIT_TIMEOUT_ENV.into(), bad.into());
            let e = s.validate().expect_err(bad);
            assert!(
                e.message.contains("env.RUNPOD_INIT_TIMEOUT") && e.message.contains("whole seconds"),
                "{}",
                e.message
            );
            assert_eq!(s.init_timeout_ms(), 420_000, "{bad}: a refused value counts as the default");
        }
    }
}
