//! Placement: which host a new worker goes to. Pure: the scaler passes the live hosts'
//! inventories (as it knows them this tick) and gets a host and a GPU type back, or the
//! reason the worker must wait (Throttled).
//!
//! GPU types are tried in the endpoint's priority order; within a type, hosts that have this
//! endpoint version warm come first (the FlashBoot effect), then the hosts running the fewest
//! workers of this endpoint (spreading), then the most free GPUs. Endpoints without GPU types
//! go to any host with room. A draining host (`shoal hosts drain`) takes no new worker, nor does
//! one without every label of the endpoint's `host_labels` or whose driver's CUDA version is
//! below the endpoint's `min_cuda_version`; when nothing is left, the reason says which hosts
//! were left out and why.

use std::collections::{BTreeMap, BTreeSet};

use shoal_protocol::endpoint::{EndpointSpec, parse_cuda_version};
use shoal_protocol::host::HostRecord;

/// A host as placement sees it; updated in place as workers are placed within one tick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostView {
    pub id: String,
    /// Free GPUs by type name.
    pub free_gpus: BTreeMap<String, usize>,
    /// Workers it runs in all.
    pub workers: u32,
    /// Most GPU-less workers; 0 = no limit.
    pub max_workers: u32,
    /// Workers of the endpoint being placed.
    pub endpoint_workers: u32,
    /// `<endpoint>@<version>` warm on this host.
    pub warm: BTreeSet<String>,
    /// Drained by an operator: never placed on.
    pub draining: bool,
    /// What the host is (`[host.labels]`).
    pub labels: BTreeMap<String, String>,
    /// The newest CUDA version its driver supports, if known.
    pub cuda: Option<(u32, u32)>,
}

impl HostView {
    pub fn from_record(rec: &HostRecord, endpoint_workers: u32) -> HostView {
        let mut free_gpus = BTreeMap::new();
        for g in rec.gpus.iter().filter(|g| g.healthy && g.worker_id.is_none()) {
            *free_gpus.entry(g.name.clone()).or_insert(0) += 1;
        }
        HostView {
            id: rec.id.clone(),
            free_gpus,
            workers: rec.workers,
            max_workers: rec.max_workers,
            endpoint_workers,
            warm: rec.warm.iter().cloned().collect(),
            draining: rec.draining,
            labels: rec.labels.clone(),
            cuda: rec.cuda_version.as_deref().and_then(parse_cuda_version),
        }
    }
}

/// Why a host cannot take any worker of an endpoint, whatever its room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unfit {
    Draining,
    Labels,
    Cuda,
}

fn unfit(spec: &EndpointSpec, h: &HostView) -> Option<Unfit> {
    if h.draining {
        return Some(Unfit::Draining);
    }
    if spec.host_labels.iter().any(|(k, v)| h.labels.get(k) != Some(v)) {
        return Some(Unfit::Labels);
    }
    if let Some(min) = spec.min_cuda_version.as_deref().and_then(parse_cuda_version)
        && h.cuda.is_none_or(|c| c < min)
    {
        return Some(Unfit::Cuda);
    }
    None
}

/// `" (1 draining, 2 without datacenter=eu-1)"`: the hosts left out whatever their room.
fn left_out(spec: &EndpointSpec, hosts: &[HostView]) -> String {
    let count = |why: Unfit| hosts.iter().filter(|h| unfit(spec, h) == Some(why)).count();
    let mut parts = Vec::new();
    let draining = count(Unfit::Draining);
    if draining > 0 {
        parts.push(format!("{draining} draining"));
    }
    let labels = count(Unfit::Labels);
    if labels > 0 {
        let wanted: Vec<String> = spec.host_labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        parts.push(format!("{labels} without {}", wanted.join(", ")));
    }
    let cuda = count(Unfit::Cuda);
    if cuda > 0 {
        let min = spec.min_cuda_version.as_deref().unwrap_or_default();
        parts.push(format!("{cuda} below CUDA {min}"));
    }
    if parts.is_empty() { String::new() } else { format!(" ({})", parts.join(", ")) }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub host: String,
    pub gpu_type: Option<String>,
}

/// Picks a host for one more worker of `spec`, and books it in `hosts`.
pub fn place(spec: &EndpointSpec, hosts: &mut [HostView]) -> Result<Placement, String> {
    let warm_key = format!("{}@{}", spec.id, spec.version);
    let rank = |h: &HostView, free: usize| {
        (!h.warm.contains(&warm_key), h.endpoint_workers, usize::MAX - free, h.workers, h.id.clone())
    };
    if spec.gpu_types.is_empty() {
        let best = hosts
            .iter_mut()
            .filter(|h| unfit(spec, h).is_none() && (h.max_workers == 0 || h.workers < h.max_workers))
            .min_by_key(|h| rank(h, 0));
        let Some(best) = best else {
            return Err(format!("no live host has room for another worker{}", left_out(spec, hosts)));
        };
        best.workers += 1;
        best.endpoint_workers += 1;
        return Ok(Placement { host: best.id.clone(), gpu_type: None });
    }
    let need = spec.gpu_count as usize;
    for gpu in &spec.gpu_types {
        let best = hosts
            .iter_mut()
            .filter(|h| unfit(spec, h).is_none() && h.free_gpus.get(gpu).copied().unwrap_or(0) >= need)
            .min_by_key(|h| rank(h, h.free_gpus.get(gpu).copied().unwrap_or(0)));
        if let Some(h) = best {
            if let Some(free) = h.free_gpus.get_mut(gpu) {
                *free -= need;
            }
            h.workers += 1;
            h.endpoint_workers += 1;
            return Ok(Placement { host: h.id.clone(), gpu_type: Some(gpu.clone()) });
        }
    }
    Err(format!(
        "no capacity: no live host has {need} free GPU(s) of type {}{}",
        spec.gpu_types.join(" or "),
        left_out(spec, hosts)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn host(id: &str, gpus: &[(&str, usize)]) -> HostView {
        HostView {
            id: id.into(),
            free_gpus: gpus.iter().map(|(n, c)| (n.to_string(), *c)).collect(),
            workers: 0,
            max_workers: 0,
            endpoint_workers: 0,
            warm: BTreeSet::new(),
            draining: false,
            labels: BTreeMap::new(),
            cuda: None,
        }
    }

    #[test]
    fn labels_and_cuda_narrow_the_hosts_and_the_refusal_says_which_were_left_out() {
        let mut spec = gpu_spec(&["H200"]);
        spec.host_labels.insert("datacenter".into(), "eu-1".into());
        spec.min_cuda_version = Some("12.4".into());
        let mut hosts = vec![host("us", &[("H200", 8)]), host("old", &[("H200", 8)]), host("eu", &[("H200", 1)])];
        hosts[0].labels.insert("datacenter".into(), "us-1".into());
        hosts[0].cuda = Some((12, 8));
        hosts[1].labels.insert("datacenter".into(), "eu-1".into());
        hosts[1].cuda = Some((12, 2));
        hosts[2].labels.insert("datacenter".into(), "eu-1".into());
        hosts[2].labels.insert("network".into(), "ib".into()); // more labels than asked: fine
        hosts[2].cuda = Some((12, 10)); // 12.10 is above 12.4
        assert_eq!(place(&spec, &mut hosts).map(|p| p.host), Ok("eu".into()));
        let err = place(&spec, &mut hosts).expect_err("eu is full");
        assert!(err.contains("no capacity") && err.contains("(1 without datacenter=eu-1, 1 below CUDA 12.4)"), "{err}");
        // a host that does not tell its CUDA version never serves an endpoint asking for one
        let mut unknown = vec![host("cpu", &[("H200", 1)])];
        unknown[0].labels.insert("datacenter".into(), "eu-1".into());
        assert!(place(&spec, &mut unknown).is_err());
        spec.min_cuda_version = None;
        assert_eq!(place(&spec, &mut unknown).map(|p| p.host), Ok("cpu".into()));
    }

    #[test]
    fn a_draining_host_is_never_placed_on_and_the_refusal_says_so() {
        let spec = gpu_spec(&["H200"]);
        let mut hosts = vec![host("a", &[("H200", 4)]), host("b", &[("H200", 1)])];
        hosts[0].draining = true;
        hosts[0].warm.insert("ep@1".into()); // warm, emptier: still not chosen
        assert_eq!(place(&spec, &mut hosts).map(|p| p.host), Ok("b".into()));
        let err = place(&spec, &mut hosts).expect_err("only the draining host has room");
        assert!(err.contains("no capacity") && err.contains("(1 draining)"), "{err}");
        let cpu = gpu_spec(&[]);
        let mut only = vec![host("a", &[])];
        only[0].draining = true;
        let err = place(&cpu, &mut only).expect_err("draining");
        assert!(err.contains("no live host has room") && err.contains("(1 draining)"), "{err}");
        only[0].draining = false;
        assert_eq!(place(&cpu, &mut only).map(|p| p.host), Ok("a".into()));
    }

    fn gpu_spec(types: &[&str]) -> EndpointSpec {
        let mut s = EndpointSpec::with_command("ep", "true");
        s.gpu_types = types.iter().map(|t| t.to_string()).collect();
        s.version = 1;
        s
    }

    #[test]
    fn priority_order_first_then_the_next_type_then_throttled() {
        let spec = gpu_spec(&["H200", "A100"]);
        let mut hosts = vec![host("a", &[("A100", 2)]), host("b", &[("H200", 1)])];
        let picks: Vec<_> = (0..3).map(|_| place(&spec, &mut hosts).map(|p| (p.host, p.gpu_type))).collect();
        assert_eq!(picks[0], Ok(("b".into(), Some("H200".into()))));
        assert_eq!(picks[1], Ok(("a".into(), Some("A100".into()))));
        assert_eq!(picks[2], Ok(("a".into(), Some("A100".into()))));
        let err = place(&spec, &mut hosts).expect_err("full");
        assert!(err.contains("no capacity"), "{err}");
    }

    #[test]
    fn warm_hosts_win_then_spreading() {
        let spec = gpu_spec(&[]);
        let mut hosts = vec![host("a", &[]), host("b", &[]), host("c", &[])];
        hosts[2].warm.insert("ep@1".into());
        assert_eq!(place(&spec, &mut hosts).map(|p| p.host), Ok("c".into()));
        hosts[2].warm.clear();
        // c has one of ours now: the next goes elsewhere
        assert_eq!(place(&spec, &mut hosts).map(|p| p.host), Ok("a".into()));
        assert_eq!(place(&spec, &mut hosts).map(|p| p.host), Ok("b".into()));
    }

    #[test]
    fn cpu_hosts_respect_max_workers() {
        let spec = gpu_spec(&[]);
        let mut hosts = vec![host("a", &[])];
        hosts[0].max_workers = 1;
        assert!(place(&spec, &mut hosts).is_ok());
        assert!(place(&spec, &mut hosts).is_err());
    }

    proptest! {
        #[test]
        fn never_books_more_gpus_than_free(free in proptest::collection::vec(0usize..4, 1..5), count in 1u32..3, n in 0usize..20) {
            let mut spec = gpu_spec(&["T"]);
            spec.gpu_count = count;
            let mut hosts: Vec<HostView> = free.iter().enumerate().map(|(i, f)| host(&format!("h{i}"), &[("T", *f)])).collect();
            let total: usize = free.iter().map(|f| f / count as usize).sum();
            let placed = (0..n).filter(|_| place(&spec, &mut hosts).is_ok()).count();
            prop_assert_eq!(placed, n.min(total));
        }

        /// Whatever the hosts and the endpoint ask, a worker lands only on a host that is not
        /// draining, carries every asked label and reaches the asked CUDA version; and a worker
        /// is refused only when no such host has room.
        #[test]
        fn workers_land_only_on_hosts_that_fit(
            hosts in proptest::collection::vec((any::<bool>(), 0u8..3, proptest::option::of((11u32..13, 0u32..10)), 0usize..3), 1..6),
            zone in proptest::option::of(0u8..3),
            min_cuda in proptest::option::of((11u32..13, 0u32..10)),
            n in 1usize..8,
        ) {
            let mut spec = gpu_spec(&["T"]);
            if let Some(z) = zone {
                spec.host_labels.insert("zone".into(), z.to_string());
            }
            spec.min_cuda_version = min_cuda.map(|(a, b)| format!("{a}.{b}"));
            let mut views: Vec<HostView> = hosts
                .iter()
                .enumerate()
                .map(|(i, (draining, z, cuda, free))| {
                    let mut h = host(&format!("h{i}"), &[("T", *free)]);
                    h.draining = *draining;
                    h.labels.insert("zone".into(), z.to_string());
                    h.cuda = *cuda;
                    h
                })
                .collect();
            let fits = |h: &HostView| {
                !h.draining
                    && zone.is_none_or(|z| h.labels.get("zone") == Some(&z.to_string()))
                    && min_cuda.is_none_or(|m| h.cuda.is_some_and(|c| c >= m))
            };
            let room: usize = views.iter().filter(|h| fits(h)).map(|h| h.free_gpus.get("T").copied().unwrap_or(0)).sum();
            let before = views.clone();
            let mut placed = 0;
            for _ in 0..n {
                match place(&spec, &mut views) {
                    Ok(p) => {
                        let h = before.iter().find(|h| h.id == p.host).expect("a known host");
                        prop_assert!(fits(h), "placed on {:?}", h);
                        placed += 1;
                    }
                    Err(e) => prop_assert!(e.contains("no capacity"), "{}", e),
                }
            }
            prop_assert_eq!(placed, n.min(room));
        }
    }
}
