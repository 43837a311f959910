//! What a worker's container is made of, from its launch: image, environment, labels,
//! volumes, limits and GPUs. Pure, so every rule is unit tested.

use std::collections::HashMap;

use bollard::models::{ContainerCreateBody, DeviceRequest, HostConfig, HostConfigLogConfig};

use super::DockerConfig;
use crate::runtime::Launch;

/// Marks every container shoal creates.
pub const LABEL_MANAGED: &str = "io.shoal.managed";
pub const LABEL_HOST: &str = "io.shoal.host";
pub const LABEL_ENDPOINT: &str = "io.shoal.endpoint";
pub const LABEL_VERSION: &str = "io.shoal.version";
/// The worker the container was created for (a warm container keeps it when reused).
pub const LABEL_WORKER: &str = "io.shoal.worker";
/// Sorted GPU UUIDs, comma-separated.
pub const LABEL_GPUS: &str = "io.shoal.gpus";
/// The bridge base URL in the container's environment.
pub const LABEL_BRIDGE: &str = "io.shoal.bridge";
/// Whether the container may be kept warm (the endpoint's `flashboot`).
pub const LABEL_FLASHBOOT: &str = "io.shoal.flashboot";

/// The name containers reach their host by; mapped to the host's gateway address
/// (`host-gateway`) in every container.
pub const HOST_ALIAS: &str = "host.docker.internal";
/// Where the endpoint's network volume is mounted, as on RunPod.
pub const NETWORK_VOLUME_TARGET: &str = "/runpod-volume";

/// GPU UUIDs of `--fake-gpus` hosts: there is no device to request.
const FAKE_GPU_PREFIX: &str = "GPU-fake-";

/// An image reference with a tag or digest: without one, Docker's pull API would pull every
/// tag of the repository.
pub fn normalize_image(image: &str) -> String {
    let image = image.trim();
    let last = image.rsplit('/').next().unwrap_or(image);
    if image.contains('@') || last.contains(':') { image.to_string() } else { format!("{image}:latest") }
}

/// The bridge base URL (`http://host:port`) of a worker's environment.
pub fn bridge_base(launch: &Launch) -> String {
    launch.env.get("RUNPOD_WEBHOOK_PING").and_then(|url| url.split("/v2/").next()).unwrap_or_default().to_string()
}

/// The GPUs sorted, as the pool and the labels compare them.
pub fn sorted_gpus(gpus: &[String]) -> Vec<String> {
    let mut g = gpus.to_vec();
    g.sort();
    g
}

/// A container name for a worker: unique, so a restart never waits for the removal of the
/// previous container.
pub fn container_name(host_id: &str, worker_id: &str) -> String {
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..6];
    format!("shoal-{host_id}-{worker_id}-{suffix}")
}

pub fn labels(launch: &Launch) -> HashMap<String, String> {
    HashMap::from([
        (LABEL_MANAGED.to_string(), "true".to_string()),
        (LABEL_HOST.to_string(), launch.host_id.clone()),
        (LABEL_ENDPOINT.to_string(), launch.spec.id.clone()),
        (LABEL_VERSION.to_string(), launch.spec.version.to_string()),
        (LABEL_WORKER.to_string(), launch.worker_id.clone()),
        (LABEL_GPUS.to_string(), sorted_gpus(&launch.gpus).join(",")),
        (LABEL_BRIDGE.to_string(), bridge_base(launch)),
        (LABEL_FLASHBOOT.to_string(), launch.spec.flashboot.to_string()),
    ])
}

/// The create request of a worker's container. The environment is the spec's, then the
/// worker variables (which win); volumes are the spec's plus the network volume; GPUs are
/// requested by UUID from the NVIDIA driver.
pub fn create_body(launch: &Launch, image: &str, config: &DockerConfig) -> ContainerCreateBody {
    let mut env: Vec<String> = launch
        .spec
        .env
        .iter()
        .filter(|(k, _)| !launch.env.contains_key(*k))
        .chain(launch.env.iter())
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    env.sort();
    let mut binds = launch.spec.volumes.clone();
    if let Some(volume) = &launch.spec.network_volume {
        binds.push(format!("{volume}:{NETWORK_VOLUME_TARGET}"));
    }
    let real_gpus: Vec<String> = launch.gpus.iter().filter(|g| !g.starts_with(FAKE_GPU_PREFIX)).cloned().collect();
    let device_requests = (!real_gpus.is_empty()).then(|| {
        vec![DeviceRequest {
            driver: Some("nvidia".into()),
            device_ids: Some(real_gpus),
            capabilities: Some(vec![vec!["gpu".into()]]),
            ..Default::default()
        }]
    });
    let host_config = HostConfig {
        binds: (!binds.is_empty()).then_some(binds),
        memory: launch.spec.memory_mb.map(|mb| (mb * 1024 * 1024) as i64),
        nano_cpus: launch.spec.cpus.map(|c| (c * 1e9).round() as i64),
        device_requests,
        extra_hosts: Some(vec![format!("{HOST_ALIAS}:host-gateway")]),
        network_mode: config.network.clone(),
        init: config.init.then_some(true),
        log_config: Some(HostConfigLogConfig {
            typ: Some("json-file".into()),
            config: Some(HashMap::from([
                ("max-size".to_string(), "10m".to_string()),
                ("max-file".to_string(), "2".to_string()),
            ])),
        }),
        ..Default::default()
    };
    ContainerCreateBody {
        image: Some(image.to_string()),
        env: Some(env),
        labels: Some(labels(launch)),
        working_dir: launch.spec.workdir.clone(),
        stop_timeout: Some(i64::from(config.stop_timeout_s)),
        host_config: Some(host_config),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use shoal_protocol::endpoint::EndpointSpec;

    use super::*;

    fn launch() -> Launch {
        let mut spec = EndpointSpec::with_command("ep", "unused");
        spec.image = Some("example/worker:1".into());
        spec.version = 3;
        spec.env = BTreeMap::from([("MODEL".into(), "tiny".into()), ("RUNPOD_POD_ID".into(), "spoofed".into())]);
        spec.volumes = vec!["/models:/models:ro".into()];
        spec.network_volume = Some("shared".into());
        spec.memory_mb = Some(512);
        spec.cpus = Some(1.5);
        Launch {
            worker_id: "w1".into(),
            host_id: "h1".into(),
            spec,
            env: BTreeMap::from([
                ("RUNPOD_POD_ID".into(), "w1".into()),
                ("RUNPOD_WEBHOOK_PING".into(), "http://host.docker.internal:9000/v2/ep/ping/w1".into()),
            ]),
            log_file: "/tmp/w1.log".into(),
            workdir: None,
            gpus: vec!["GPU-b".into(), "GPU-a".into()],
            progress: None,
            on_identity: None,
        }
    }

    #[test]
    fn images_get_a_tag_unless_they_have_one() {
        assert_eq!(normalize_image("busybox"), "busybox:latest");
        assert_eq!(normalize_image("example/worker:1"), "example/worker:1");
        assert_eq!(normalize_image("registry:5000/team/worker"), "registry:5000/team/worker:latest");
        assert_eq!(normalize_image("registry:5000/team/worker:2"), "registry:5000/team/worker:2");
        assert_eq!(normalize_image("worker@sha256:abc"), "worker@sha256:abc");
    }

    #[test]
    fn the_container_has_the_worker_env_volumes_limits_gpus_and_labels() {
        let l = launch();
        let body = create_body(&l, "example/worker:1", &DockerConfig::default());
        let env = body.env.clone().unwrap_or_default();
        assert!(env.contains(&"MODEL=tiny".to_string()));
        assert!(env.contains(&"RUNPOD_POD_ID=w1".to_string()), "the worker variables win: {env:?}");
        assert!(!env.iter().any(|e| e.contains("spoofed")));
        let hc = body.host_config.clone().unwrap_or_default();
        assert_eq!(hc.binds, Some(vec!["/models:/models:ro".to_string(), "shared:/runpod-volume".to_string()]));
        assert_eq!(hc.memory, Some(512 * 1024 * 1024));
        assert_eq!(hc.nano_cpus, Some(1_500_000_000));
        let req = &hc.device_requests.unwrap_or_default()[0];
        assert_eq!(req.device_ids, Some(vec!["GPU-b".to_string(), "GPU-a".to_string()]));
        assert_eq!(req.driver.as_deref(), Some("nvidia"));
        assert_eq!(hc.extra_hosts, Some(vec!["host.docker.internal:host-gateway".to_string()]));
        let labels = body.labels.unwrap_or_default();
        assert_eq!(labels[LABEL_HOST], "h1");
        assert_eq!(labels[LABEL_ENDPOINT], "ep");
        assert_eq!(labels[LABEL_VERSION], "3");
        assert_eq!(labels[LABEL_WORKER], "w1");
        assert_eq!(labels[LABEL_GPUS], "GPU-a,GPU-b");
        assert_eq!(labels[LABEL_BRIDGE], "http://host.docker.internal:9000");
    }

    #[test]
    fn fake_gpus_and_no_limits_request_nothing() {
        let mut l = launch();
        l.gpus = vec!["GPU-fake-0".into()];
        l.spec.memory_mb = None;
        l.spec.cpus = None;
        l.spec.volumes.clear();
        l.spec.network_volume = None;
        let hc = create_body(&l, "x:1", &DockerConfig::default()).host_config.unwrap_or_default();
        assert!(hc.device_requests.is_none() && hc.memory.is_none() && hc.nano_cpus.is_none() && hc.binds.is_none());
    }
}
