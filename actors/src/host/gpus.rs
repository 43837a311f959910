//! The host's GPU inventory, read through NVML (nvml-wrapper): name, UUID, memory and
//! utilization of each device. A GPU that reports errors (it cannot be read, it fell off the
//! bus, it has uncorrected ECC errors or pages waiting to be retired) is marked unhealthy and
//! never placed on.
//!
//! A host without the NVIDIA driver library runs as a CPU host: one log line says so, and
//! the inventory is empty. `fake_gpus` in the host configuration replaces NVML (tests,
//! placement trials).

use std::sync::Arc;

use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::{EccCounter, MemoryError};
use nvml_wrapper::error::NvmlError;
use shoal_protocol::host::Gpu;

use super::HostConfig;

/// The NVIDIA driver's library, by its versioned name (the unversioned one comes only with
/// development packages), then the unversioned one.
const NVML_LIBRARIES: [&str; 2] = ["libnvidia-ml.so.1", "libnvidia-ml.so"];

/// Where the host's GPUs come from.
#[derive(Clone)]
pub enum GpuInventory {
    /// `fake_gpus`: fixed.
    Fake(Vec<Gpu>),
    /// The NVIDIA driver, read at each heartbeat.
    Nvml(Arc<Nvml>),
    /// No GPU.
    None,
}

/// One device as read at one moment; `problem` makes it unhealthy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reading {
    pub name: String,
    pub uuid: String,
    pub memory_mb: u64,
    pub utilization_pct: Option<u32>,
    pub problem: Option<String>,
}

impl GpuInventory {
    /// The fake GPUs when configured; else NVML when the driver is there; else none, said once.
    pub fn open(config: &HostConfig) -> GpuInventory {
        if config.fake_gpus.is_some() {
            return GpuInventory::Fake(config.gpus());
        }
        let mut last_error = None;
        for lib in NVML_LIBRARIES {
            match Nvml::builder().lib_path(std::ffi::OsStr::new(lib)).init() {
                Ok(nvml) => return GpuInventory::Nvml(Arc::new(nvml)),
                Err(e) => last_error = Some(e),
            }
        }
        match last_error {
            Some(NvmlError::LibloadingError(_)) | None => {
                tracing::info!("no NVIDIA driver library (libnvidia-ml.so.1): running as a CPU host")
            }
            Some(e) => tracing::warn!(error = %e, "the NVIDIA driver did not answer (NVML): running as a CPU host"),
        }
        GpuInventory::None
    }

    /// The newest CUDA version the driver supports (`major.minor`), where NVML tells it.
    pub fn cuda_version(&self) -> Option<String> {
        let GpuInventory::Nvml(nvml) = self else { return None };
        match nvml.sys_cuda_driver_version() {
            Ok(v) => Some(format!(
                "{}.{}",
                nvml_wrapper::cuda_driver_version_major(v),
                nvml_wrapper::cuda_driver_version_minor(v)
            )),
            Err(e) => {
                tracing::warn!(error = %e, "the NVIDIA driver does not tell its CUDA version");
                None
            }
        }
    }

    /// The GPUs now. Assignments to workers carry over from `current` by UUID.
    pub async fn read(&self, current: &[Gpu]) -> Vec<Gpu> {
        match self {
            GpuInventory::Fake(gpus) if current.is_empty() => gpus.clone(),
            GpuInventory::Fake(_) => current.to_vec(),
            GpuInventory::None => vec![],
            GpuInventory::Nvml(nvml) => {
                let nvml = nvml.clone();
                match tokio::task::spawn_blocking(move || read_nvml(&nvml)).await {
                    Ok(readings) => merge(readings, current),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the GPUs");
                        current.to_vec()
                    }
                }
            }
        }
    }
}

/// Reads every device (blocking calls into the driver).
fn read_nvml(nvml: &Nvml) -> Vec<Reading> {
    let count = match nvml.device_count() {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "NVML cannot count the GPUs");
            return vec![];
        }
    };
    (0..count)
        .map(|i| match nvml.device_by_index(i) {
            Err(e) => Reading {
                name: "unknown".into(),
                uuid: format!("GPU-index-{i}"),
                memory_mb: 0,
                utilization_pct: None,
                problem: Some(format!("cannot read GPU {i}: {e}")),
            },
            Ok(device) => {
                let mut problems = Vec::new();
                let name = device.name().unwrap_or_else(|e| {
                    fault(&mut problems, "name", e);
                    "unknown".into()
                });
                let uuid = device.uuid().unwrap_or_else(|e| {
                    fault(&mut problems, "uuid", e);
                    format!("GPU-index-{i}")
                });
                let memory_mb = device.memory_info().map(|m| m.total / (1024 * 1024)).unwrap_or_else(|e| {
                    fault(&mut problems, "memory", e);
                    0
                });
                let utilization_pct =
                    device.utilization_rates().map(|u| u.gpu).map_err(|e| fault(&mut problems, "utilization", e)).ok();
                match device.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile) {
                    Ok(0) => {}
                    Ok(n) => problems.push(format!("{n} uncorrected ECC error(s)")),
                    Err(e) => fault(&mut problems, "ECC errors", e),
                }
                match device.are_pages_pending_retired() {
                    Ok(true) => problems.push("memory pages waiting to be retired (reset the GPU)".into()),
                    Ok(false) => {}
                    Err(e) => fault(&mut problems, "retired pages", e),
                }
                Reading {
                    name,
                    uuid,
                    memory_mb,
                    utilization_pct,
                    problem: (!problems.is_empty()).then(|| problems.join("; ")),
                }
            }
        })
        .collect()
}

/// Notes a failed read, unless the device merely lacks the feature.
fn fault(problems: &mut Vec<String>, what: &str, e: NvmlError) {
    if !matches!(e, NvmlError::NotSupported) {
        problems.push(format!("{what}: {e}"));
    }
}

/// The inventory from fresh readings: health and utilization from the readings, worker
/// assignments from `current`. A GPU given to a worker that can no longer be read stays
/// listed (unhealthy), so its worker keeps it until it stops.
pub fn merge(readings: Vec<Reading>, current: &[Gpu]) -> Vec<Gpu> {
    let mut gpus: Vec<Gpu> = readings
        .into_iter()
        .map(|r| Gpu {
            worker_id: current.iter().find(|g| g.uuid == r.uuid).and_then(|g| g.worker_id.clone()),
            healthy: r.problem.is_none(),
            error: r.problem,
            name: r.name,
            uuid: r.uuid,
            memory_mb: r.memory_mb,
            utilization_pct: r.utilization_pct,
        })
        .collect();
    for g in current.iter().filter(|g| g.worker_id.is_some()) {
        if !gpus.iter().any(|n| n.uuid == g.uuid) {
            gpus.push(Gpu { healthy: false, error: Some("no longer seen by the driver".into()), ..g.clone() });
        }
    }
    gpus
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(uuid: &str, problem: Option<&str>) -> Reading {
        Reading {
            name: "NVIDIA H200".into(),
            uuid: uuid.into(),
            memory_mb: 143_771,
            utilization_pct: Some(12),
            problem: problem.map(str::to_string),
        }
    }

    #[test]
    fn faulty_gpus_are_unhealthy_and_assignments_carry_over() {
        let first = merge(vec![reading("GPU-a", None), reading("GPU-b", None)], &[]);
        assert!(first.iter().all(|g| g.healthy && g.worker_id.is_none()));
        let mut current = first;
        current[1].worker_id = Some("w1".into());
        let next = merge(vec![reading("GPU-a", Some("2 uncorrected ECC error(s)")), reading("GPU-b", None)], &current);
        assert!(!next[0].healthy);
        assert_eq!(next[0].error.as_deref(), Some("2 uncorrected ECC error(s)"));
        assert_eq!(next[1].worker_id.as_deref(), Some("w1"));
        assert_eq!(next[1].utilization_pct, Some(12));
    }

    #[test]
    fn a_vanished_gpu_in_use_stays_listed_as_unhealthy() {
        let mut current = merge(vec![reading("GPU-a", None)], &[]);
        current[0].worker_id = Some("w1".into());
        let next = merge(vec![], &current);
        assert_eq!(next.len(), 1);
        assert!(!next[0].healthy && next[0].worker_id.as_deref() == Some("w1"));
        assert!(merge(vec![], &merge(vec![reading("GPU-a", None)], &[])).is_empty(), "unused: dropped");
    }

    #[tokio::test]
    async fn a_host_without_the_nvidia_library_is_a_cpu_host_and_fake_gpus_win() {
        let config = HostConfig { fake_gpus: Some("NVIDIA H200:2".into()), ..HostConfig::default() };
        let fake = GpuInventory::open(&config);
        assert_eq!(fake.read(&[]).await.len(), 2);
        // on a machine with the driver this finds real GPUs; it must never fail either way
        let real = GpuInventory::open(&HostConfig::default());
        let gpus = real.read(&[]).await;
        if matches!(real, GpuInventory::None) {
            assert!(gpus.is_empty());
        }
    }
}
