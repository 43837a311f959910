//! "Why is my job waiting": the scaler's last view of the endpoint's workers, and the pure
//! function that turns it into a reason a person can act on.

use serde::{Deserialize, Serialize};
use shoal_protocol::endpoint::{EndpointSpec, ScalerKind};

/// The endpoint's workers as the scaler saw them on its last tick.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fleet {
    pub target: u32,
    pub idle: u32,
    pub initializing: u32,
    pub running: u32,
    pub throttled: u32,
    /// Why the last throttled worker could not be placed.
    pub throttled_reason: Option<String>,
    pub unhealthy: u32,
    /// Why the last unhealthy worker failed (its exit and log tail).
    pub unhealthy_reason: Option<String>,
}

pub fn waiting_reason(spec: &EndpointSpec, fleet: &Fleet, low_priority: bool) -> String {
    let up = fleet.idle + fleet.running;
    if fleet.unhealthy > 0 && up == 0 {
        return format!(
            "workers are unhealthy ({} of them): {}",
            fleet.unhealthy,
            fleet.unhealthy_reason.as_deref().unwrap_or("no reason recorded")
        );
    }
    if fleet.throttled > 0 && up == 0 {
        return format!(
            "waiting for capacity: {} worker(s) throttled: {}",
            fleet.throttled,
            fleet.throttled_reason.as_deref().unwrap_or("no host has room")
        );
    }
    if low_priority {
        return "low priority: runs only when no normal-priority job waits, and never starts a worker by itself".into();
    }
    if fleet.initializing > 0 && fleet.idle == 0 {
        return format!("a worker is starting ({} initializing)", fleet.initializing);
    }
    if up == 0 {
        return "no worker yet: the scaler starts one for the first waiting job".into();
    }
    if fleet.idle == 0 && up >= spec.workers_max {
        return format!("endpoint at max workers ({}), all busy", spec.workers_max);
    }
    if fleet.idle > 0 {
        return "a worker is about to take it".into();
    }
    match spec.scaler {
        ScalerKind::QueueDelay => {
            format!("all {up} workers are busy; QUEUE_DELAY adds one once a job has waited {} s", spec.scaler_value)
        }
        ScalerKind::RequestCount => format!("all {up} workers are busy; the scaler adds more as the rule asks"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> EndpointSpec {
        let mut s = EndpointSpec::with_command("ep", "true");
        s.workers_max = 2;
        s
    }

    #[test]
    fn the_most_telling_reason_wins() {
        let crash = Fleet {
            unhealthy: 1,
            unhealthy_reason: Some("exited with code 1: ImportError".into()),
            ..Fleet::default()
        };
        let r = waiting_reason(&spec(), &crash, false);
        assert!(r.contains("workers are unhealthy") && r.contains("ImportError"), "{r}");
        let full =
            Fleet { throttled: 1, throttled_reason: Some("no capacity: 0 free H200".into()), ..Fleet::default() };
        assert!(waiting_reason(&spec(), &full, false).contains("no capacity"));
        assert!(waiting_reason(&spec(), &Fleet::default(), true).starts_with("low priority"));
        assert!(waiting_reason(&spec(), &Fleet::default(), false).contains("starts one for the first waiting job"));
        let one_busy = Fleet { running: 1, ..Fleet::default() };
        assert!(waiting_reason(&spec(), &one_busy, false).contains("QUEUE_DELAY adds one"));
        let busy = Fleet { running: 2, ..Fleet::default() };
        assert!(waiting_reason(&spec(), &busy, false).contains("at max workers (2)"));
        let starting = Fleet { initializing: 1, ..Fleet::default() };
        assert!(waiting_reason(&spec(), &starting, false).contains("starting"));
    }
}
