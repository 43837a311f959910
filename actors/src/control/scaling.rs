//! The scaling rule: how many workers an endpoint wants, which idle ones stop, and which
//! outdated ones a rolling update drains next. Pure: the scaler actor gathers the inputs every
//! tick and sends the commands this returns.
//!
//! - QUEUE_DELAY: one worker as soon as a job waits while the endpoint has no worker at all
//!   (as RunPod starts a worker for the first queued request), then one more whenever the
//!   oldest queued job has waited longer than `scaler_value` seconds.
//! - REQUEST_COUNT: `ceil((queued + in progress) / scaler_value)` workers.
//! - Both are clamped to `[workers_min, workers_max]`. Low-priority jobs count for neither.
//! - A worker idle for `idle_timeout_s` stops, never below `workers_min`: scale to zero.
//! - Rolling update: workers of an older spec version are drained `max(1, 10 % of
//!   workers_max)` at a time, idle ones first; replacements start as the count drops, so the
//!   endpoint never runs more than `workers_max`.

use shoal_protocol::endpoint::{EndpointSpec, ScalerKind};
use shoal_protocol::worker::WorkerState;

/// What the queue looks like (normal priority only: low-priority jobs never drive scaling).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Demand {
    pub queued: u64,
    pub in_progress: u64,
    /// How long the oldest normal-priority queued job has waited.
    pub oldest_wait_ms: Option<u64>,
    /// Warm containers of this endpoint version on live hosts (cheap starts).
    pub warm_slots: u32,
}

/// One worker as the scaler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerView {
    pub id: String,
    pub state: WorkerState,
    pub version: u64,
    /// When it last became idle (for Idle workers).
    pub idle_since_ms: Option<u64>,
    /// Already told to drain or stop.
    pub stopping: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision {
    /// Workers the endpoint wants, after clamping.
    pub target: u32,
    /// New workers to start now.
    pub start: u32,
    /// Idle workers to stop (idle timeout, never below min).
    pub stop: Vec<String>,
    /// Outdated workers to drain (rolling update).
    pub drain: Vec<String>,
}

/// Counted workers: all but those stopped for good or already on their way out.
fn active(workers: &[WorkerView]) -> impl Iterator<Item = &WorkerView> {
    workers.iter().filter(|w| w.state != WorkerState::Stopped && !w.stopping)
}

/// The workers the rule asks for, clamped to `[min, max]`.
pub fn desired(spec: &EndpointSpec, demand: &Demand, current: u32) -> u32 {
    let want = match spec.scaler {
        ScalerKind::RequestCount => {
            let jobs = (demand.queued + demand.in_progress) as f64;
            (jobs / spec.scaler_value).ceil().min(u32::MAX as f64) as u32
        }
        ScalerKind::QueueDelay => {
            let delayed = demand.oldest_wait_ms.is_some_and(|w| w as f64 > spec.scaler_value * 1000.0);
            if delayed {
                current.saturating_add(1)
            } else if demand.queued == 0 && demand.in_progress == 0 {
                0
            } else {
                // a job waits with no worker at all: the first one starts at once
                current.max(u32::from(demand.queued > 0))
            }
        }
    };
    want.clamp(spec.workers_min, spec.workers_max)
}

pub fn decide(spec: &EndpointSpec, demand: &Demand, workers: &[WorkerView], now_ms: u64) -> Decision {
    let counted: Vec<&WorkerView> = active(workers).collect();
    // workers already leaving still hold their place until they are gone (max is a hard cap)
    let leaving = workers.iter().filter(|w| w.state != WorkerState::Stopped && w.stopping).count() as u32;
    let current = counted.len() as u32;
    let target = desired(spec, demand, current);
    let mut decision = Decision { target, ..Decision::default() };
    // a spike: extra workers beyond the rule where they start warm, never above max; they go
    // again with the idle timeout like any other
    let with_extra = if demand.queued > 0 {
        (target + spec.extra_workers.min(demand.warm_slots)).min(spec.workers_max)
    } else {
        target
    };
    if current + leaving < with_extra {
        decision.start = with_extra - current - leaving;
    }
    // scale down: beyond the target and never below min, workers that serve nothing (unhealthy:
    // crash-looping under backoff, or given up; throttled: never started) at once, idle ones past
    // the timeout. An endpoint that no longer wants a broken worker stops retrying it.
    let idle_timeout_ms = u64::from(spec.idle_timeout_s) * 1000;
    let floor = target.max(spec.workers_min);
    let mut removable = current.saturating_sub(floor) as usize;
    let mut idle: Vec<&&WorkerView> = counted
        .iter()
        .filter(|w| {
            matches!(w.state, WorkerState::Unhealthy | WorkerState::Throttled)
                || (w.state == WorkerState::Idle
                    && w.idle_since_ms.is_some_and(|t| now_ms.saturating_sub(t) >= idle_timeout_ms))
        })
        .collect();
    // unhealthy first, then throttled, then the longest idle
    let rank = |w: &WorkerView| match w.state {
        WorkerState::Unhealthy => 0,
        WorkerState::Throttled => 1,
        _ => 2,
    };
    idle.sort_by_key(|w| (rank(w), w.idle_since_ms.unwrap_or(0)));
    for w in idle {
        if removable == 0 {
            break;
        }
        decision.stop.push(w.id.clone());
        removable -= 1;
    }
    decision.drain = rollout(spec, workers, &decision.stop);
    decision
}

/// The next outdated workers to drain: at most `max(1, 10 % of workers_max)` in flight, idle
/// ones first.
pub fn rollout(spec: &EndpointSpec, workers: &[WorkerView], already_stopping: &[String]) -> Vec<String> {
    let batch = ((spec.workers_max as f64) * 0.1).ceil().max(1.0) as usize;
    let in_flight =
        workers.iter().filter(|w| w.state != WorkerState::Stopped && w.stopping && w.version < spec.version).count();
    let mut outdated: Vec<&WorkerView> = active(workers)
        .filter(|w| w.version < spec.version && w.state != WorkerState::Throttled && !already_stopping.contains(&w.id))
        .collect();
    outdated.sort_by_key(|w| (w.state != WorkerState::Idle, w.id.clone()));
    outdated.into_iter().take(batch.saturating_sub(in_flight)).map(|w| w.id.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn spec(scaler: ScalerKind, value: f64, min: u32, max: u32) -> EndpointSpec {
        let mut s = EndpointSpec::with_command("ep", "true");
        s.scaler = scaler;
        s.scaler_value = value;
        s.workers_min = min;
        s.workers_max = max;
        s.idle_timeout_s = 5;
        s.version = 1;
        s
    }

    fn w(id: &str, state: WorkerState, idle_since: Option<u64>) -> WorkerView {
        WorkerView { id: id.into(), state, version: 1, idle_since_ms: idle_since, stopping: false }
    }

    #[test]
    fn request_count_scales_to_the_jobs_and_clamps() {
        let s = spec(ScalerKind::RequestCount, 1.0, 0, 5);
        let d = decide(&s, &Demand { queued: 50, in_progress: 0, oldest_wait_ms: Some(0), warm_slots: 0 }, &[], 0);
        assert_eq!((d.target, d.start), (5, 5));
        let s2 = spec(ScalerKind::RequestCount, 4.0, 0, 5);
        assert_eq!(desired(&s2, &Demand { queued: 9, in_progress: 0, oldest_wait_ms: None, warm_slots: 0 }, 0), 3);
        assert_eq!(desired(&s2, &Demand::default(), 0), 0);
    }

    #[test]
    fn a_spike_adds_extra_workers_only_where_they_start_warm() {
        let s = spec(ScalerKind::RequestCount, 5.0, 0, 10);
        let cold = Demand { queued: 10, in_progress: 0, oldest_wait_ms: Some(0), warm_slots: 0 };
        assert_eq!(decide(&s, &cold, &[], 0).start, 2, "the rule alone");
        let warm = Demand { warm_slots: 1, ..cold };
        assert_eq!(decide(&s, &warm, &[], 0).start, 3, "one extra: one warm slot");
        let warm = Demand { warm_slots: 9, ..cold };
        assert_eq!(decide(&s, &warm, &[], 0).start, 4, "at most extra_workers (2)");
        let tight = spec(ScalerKind::RequestCount, 5.0, 0, 3);
        assert_eq!(decide(&tight, &warm, &[], 0).start, 3, "never above max");
        let idle = Demand { queued: 0, warm_slots: 9, ..cold };
        assert_eq!(decide(&s, &idle, &[], 0).start, 0, "no spike, no extra");
    }

    #[test]
    fn queue_delay_starts_the_first_worker_at_once_and_more_once_jobs_wait_too_long() {
        let s = spec(ScalerKind::QueueDelay, 2.0, 0, 3);
        let first = Demand { queued: 1, in_progress: 0, oldest_wait_ms: Some(0), warm_slots: 0 };
        assert_eq!(desired(&s, &first, 0), 1, "a job waits with no worker: one starts at once");
        assert_eq!(decide(&s, &first, &[], 0).start, 1);
        let waiting = Demand { queued: 10, in_progress: 0, oldest_wait_ms: Some(1_000), warm_slots: 0 };
        assert_eq!(desired(&s, &waiting, 1), 1, "not yet delayed: no second worker");
        let busy = Demand { queued: 0, in_progress: 1, oldest_wait_ms: None, warm_slots: 0 };
        assert_eq!(desired(&s, &busy, 1), 1, "running jobs keep their worker");
        let late = Demand { oldest_wait_ms: Some(2_500), ..waiting };
        assert_eq!(desired(&s, &late, 0), 1);
        assert_eq!(desired(&s, &late, 1), 2);
        assert_eq!(desired(&s, &late, 3), 3, "clamped to max");
    }

    #[test]
    fn idle_workers_stop_after_the_timeout_but_never_below_min() {
        let s = spec(ScalerKind::RequestCount, 1.0, 1, 5);
        let workers = vec![
            w("a", WorkerState::Idle, Some(0)),
            w("b", WorkerState::Idle, Some(0)),
            w("c", WorkerState::Idle, Some(4_000)),
        ];
        let d = decide(&s, &Demand::default(), &workers, 5_000);
        assert_eq!(d.stop, vec!["a".to_string(), "b".to_string()].into_iter().take(2).collect::<Vec<_>>());
        let d = decide(&s, &Demand::default(), &workers, 10_000);
        assert_eq!(d.stop.len(), 2, "one stays: min is 1");
    }

    #[test]
    fn unhealthy_workers_stop_first_once_the_endpoint_no_longer_wants_them() {
        let s = spec(ScalerKind::RequestCount, 1.0, 0, 5);
        let workers = vec![
            w("idle", WorkerState::Idle, Some(0)),
            w("broken", WorkerState::Unhealthy, None),
            w("busy", WorkerState::Running, None),
        ];
        // jobs still want all three: the crash-looping one is kept (and retried by its host)
        let busy = Demand { queued: 2, in_progress: 1, oldest_wait_ms: Some(0), warm_slots: 0 };
        assert!(decide(&s, &busy, &workers, 0).stop.is_empty());
        // one job left: the unhealthy worker goes first, at once (not after the idle timeout)
        let one = Demand { queued: 0, in_progress: 1, oldest_wait_ms: None, warm_slots: 0 };
        assert_eq!(decide(&s, &one, &workers, 1_000).stop, vec!["broken".to_string()]);
        assert_eq!(decide(&s, &one, &workers, 5_000).stop, vec!["broken".to_string(), "idle".to_string()]);
        // never below min
        let kept = spec(ScalerKind::RequestCount, 1.0, 1, 5);
        let lone = [w("broken", WorkerState::Unhealthy, None)];
        assert!(decide(&kept, &Demand::default(), &lone, 0).stop.is_empty());
        assert_eq!(decide(&s, &Demand::default(), &lone, 0).stop, vec!["broken".to_string()], "scale to zero");
    }

    #[test]
    fn rolling_update_drains_a_tenth_of_max_idle_first() {
        let mut s = spec(ScalerKind::RequestCount, 1.0, 10, 10);
        s.version = 2;
        let mut workers: Vec<WorkerView> = (0..10).map(|i| w(&format!("w{i}"), WorkerState::Running, None)).collect();
        workers[7].state = WorkerState::Idle;
        let d = decide(&s, &Demand { queued: 0, in_progress: 9, oldest_wait_ms: None, warm_slots: 0 }, &workers, 0);
        assert_eq!(d.drain, vec!["w7".to_string()]);
        workers[7].stopping = true;
        let d = decide(&s, &Demand { queued: 0, in_progress: 9, oldest_wait_ms: None, warm_slots: 0 }, &workers, 0);
        assert!(d.drain.is_empty(), "one at a time");
        assert_eq!(d.start, 0, "the draining worker still holds its place under max");
    }

    proptest! {
        #[test]
        fn never_more_than_max_and_never_below_min(
            min in 0u32..5, extra in 0u32..10, value in 0.5f64..8.0, queued in 0u64..500, running in 0u64..50,
            wait in proptest::option::of(0u64..20_000), n in 0usize..20, rc in any::<bool>(), now in 0u64..100_000,
        ) {
            let max = min + extra;
            let s = spec(if rc { ScalerKind::RequestCount } else { ScalerKind::QueueDelay }, value, min, max);
            let workers: Vec<WorkerView> = (0..n).map(|i| w(&format!("w{i}"), if i % 2 == 0 { WorkerState::Idle } else { WorkerState::Running }, Some(0))).collect();
            let d = decide(&s, &Demand { queued, in_progress: running, oldest_wait_ms: wait, warm_slots: 3 }, &workers, now);
            prop_assert!(d.target >= min && d.target <= max);
            prop_assert!(n as u32 + d.start <= max.max(n as u32));
            let after = n as u32 + d.start - d.stop.len() as u32;
            prop_assert!(after >= min.min(n as u32 + d.start));
            prop_assert!(d.stop.len() <= n);
        }

        /// Whatever the rule, a normal-priority job waiting on an endpoint with no worker
        /// starts one (when max allows any).
        #[test]
        fn a_waiting_job_on_an_endpoint_at_zero_starts_a_worker(
            max in 1u32..10, value in 0.5f64..600.0, queued in 1u64..500, wait in 0u64..20_000, rc in any::<bool>(),
        ) {
            let s = spec(if rc { ScalerKind::RequestCount } else { ScalerKind::QueueDelay }, value, 0, max);
            let d = decide(&s, &Demand { queued, in_progress: 0, oldest_wait_ms: Some(wait), warm_slots: 0 }, &[], 0);
            prop_assert!(d.start >= 1 && d.start <= max, "{:?}", d);
            // with a worker already there, QUEUE_DELAY adds one only past the delay
            if !rc {
                let one = [w("a", WorkerState::Running, None)];
                let d = decide(&s, &Demand { queued, in_progress: 1, oldest_wait_ms: Some(wait), warm_slots: 0 }, &one, 0);
                let delayed = wait as f64 > value * 1000.0;
                prop_assert_eq!(d.start, u32::from(delayed && max > 1));
            }
        }

        #[test]
        fn low_demand_alone_never_scales_up_from_zero(min in 0u32..1, value in 0.5f64..8.0, rc in any::<bool>()) {
            let s = spec(if rc { ScalerKind::RequestCount } else { ScalerKind::QueueDelay }, value, min, 5);
            // low-priority jobs are not part of Demand at all: an empty demand is what the scaler sees
            let d = decide(&s, &Demand::default(), &[], 1_000_000);
            prop_assert_eq!(d.start, 0);
        }
    }
}
