//! The restart policy of the worker supervisor: exponential backoff with jitter, capped, with
//! the failure count reset after a stable period. Pure: the host actor gathers the inputs
//! (when the worker started, when it failed, a random sample) and schedules what this returns.

use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackoffPolicy {
    /// Delay before the first restart.
    pub base_ms: u64,
    /// Each further consecutive failure multiplies the delay by this.
    pub factor: f64,
    /// No delay is longer (RunPod keeps retrying unhealthy workers for days; one step is capped).
    pub cap_ms: u64,
    /// Each delay is spread by ± this fraction, so workers that failed together do not restart
    /// together.
    pub jitter: f64,
    /// A worker that ran this long before failing starts again from the base delay.
    pub stable_ms: u64,
    /// After this many consecutive failures the worker is reported Unhealthy.
    pub unhealthy_after: u32,
    /// A worker failing without a stable run for this long is no longer restarted (it stays
    /// Unhealthy, saying so, until its endpoint stops wanting it or gets a new version); 0:
    /// never give up. RunPod retries unhealthy workers for up to 7 days.
    pub give_up_after_ms: u64,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        BackoffPolicy {
            base_ms: 1_000,
            factor: 2.0,
            cap_ms: 3_600_000,
            jitter: 0.2,
            stable_ms: 60_000,
            unhealthy_after: 3,
            give_up_after_ms: 7 * 24 * 3_600_000,
        }
    }
}

/// What the supervisor does after a failure.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Restart {
    /// Consecutive failures, this one included.
    pub failures: u32,
    pub delay_ms: u64,
    pub unhealthy: bool,
}

impl BackoffPolicy {
    pub fn validate(&self) -> Result<(), String> {
        if self.base_ms == 0 {
            return Err("base_ms: must be above 0".into());
        }
        if !(self.factor.is_finite() && self.factor >= 1.0) {
            return Err(format!("factor: {} must be at least 1", self.factor));
        }
        if self.cap_ms < self.base_ms {
            return Err(format!("cap_ms: {} is below base_ms {}", self.cap_ms, self.base_ms));
        }
        if !(0.0..1.0).contains(&self.jitter) {
            return Err(format!("jitter: {} must be in [0, 1)", self.jitter));
        }
        if self.unhealthy_after == 0 {
            return Err("unhealthy_after: must be at least 1".into());
        }
        Ok(())
    }

    /// The delay before restart number `failures` (1 = first failure), before jitter.
    pub fn nominal_delay_ms(&self, failures: u32) -> u64 {
        let exp = failures.saturating_sub(1).min(64) as i32;
        let d = self.base_ms as f64 * self.factor.powi(exp);
        if d.is_finite() { (d as u64).min(self.cap_ms) } else { self.cap_ms }
    }

    /// Whether to stop restarting a worker that has now failed `failures` times in a row, the
    /// first of them `failing_for_ms` ago.
    pub fn gives_up(&self, failures: u32, failing_for_ms: u64) -> bool {
        self.give_up_after_ms > 0 && failures > 1 && failing_for_ms >= self.give_up_after_ms
    }

    /// Decides the next restart. `previous_failures` is the count before this failure,
    /// `ran_ms` how long the worker ran, and `sample` a uniform random number in [0, 1).
    pub fn on_failure(&self, previous_failures: u32, ran_ms: u64, sample: f64) -> Restart {
        let failures = if ran_ms >= self.stable_ms { 1 } else { previous_failures.saturating_add(1) };
        let nominal = self.nominal_delay_ms(failures) as f64;
        let spread = (sample.clamp(0.0, 1.0) * 2.0 - 1.0) * self.jitter;
        let delay_ms = ((nominal * (1.0 + spread)).round() as u64).clamp(1, self.cap_ms);
        Restart { failures, delay_ms, unhealthy: failures >= self.unhealthy_after }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn doubles_from_base_up_to_the_cap() {
        let p = BackoffPolicy {
            base_ms: 100,
            factor: 2.0,
            cap_ms: 1000,
            jitter: 0.0,
            stable_ms: 10_000,
            unhealthy_after: 3,
            give_up_after_ms: 0,
        };
        let delays: Vec<u64> = (1..=6).map(|n| p.nominal_delay_ms(n)).collect();
        assert_eq!(delays, vec![100, 200, 400, 800, 1000, 1000]);
        let r = p.on_failure(0, 5, 0.5);
        assert_eq!((r.failures, r.delay_ms, r.unhealthy), (1, 100, false));
        let r = p.on_failure(2, 5, 0.5);
        assert_eq!((r.failures, r.delay_ms, r.unhealthy), (3, 400, true));
    }

    #[test]
    fn a_stable_run_resets_the_count() {
        let p = BackoffPolicy::default();
        let r = p.on_failure(7, p.stable_ms, 0.5);
        assert_eq!(r.failures, 1);
        assert!(!r.unhealthy);
    }

    #[test]
    fn restarts_stop_after_seven_days_of_failures_without_a_stable_run() {
        let p = BackoffPolicy::default();
        let week = 7 * 24 * 3_600_000;
        assert!(!p.gives_up(40, week - 1));
        assert!(p.gives_up(40, week));
        assert!(!p.gives_up(1, week), "a failure that starts a streak is retried");
        let never = BackoffPolicy { give_up_after_ms: 0, ..p };
        assert!(!never.gives_up(1_000, u64::MAX));
    }

    #[test]
    fn invalid_policies_name_the_field() {
        let p = BackoffPolicy { factor: 0.5, ..Default::default() };
        assert!(p.validate().expect_err("factor").starts_with("factor"));
        let p = BackoffPolicy { cap_ms: 1, base_ms: 2, ..Default::default() };
        assert!(p.validate().expect_err("cap").starts_with("cap_ms"));
    }

    proptest! {
        #[test]
        fn delays_stay_within_jitter_of_nominal_and_under_the_cap(
            base in 1u64..10_000, factor in 1.0f64..4.0, cap_mult in 1u64..1000,
            jitter in 0.0f64..0.9, prev in 0u32..100, sample in 0.0f64..1.0,
        ) {
            let p = BackoffPolicy { base_ms: base, factor, cap_ms: base * cap_mult, jitter, stable_ms: u64::MAX, unhealthy_after: 3, give_up_after_ms: 0 };
            let r = p.on_failure(prev, 0, sample);
            let nominal = p.nominal_delay_ms(r.failures) as f64;
            prop_assert!(r.delay_ms <= p.cap_ms);
            prop_assert!(r.delay_ms >= 1);
            prop_assert!((r.delay_ms as f64) >= (nominal * (1.0 - jitter)).floor().min(p.cap_ms as f64) - 1.0);
            prop_assert!((r.delay_ms as f64) <= nominal * (1.0 + jitter) + 1.0);
            prop_assert_eq!(r.unhealthy, r.failures >= 3);
        }

        #[test]
        fn nominal_delay_never_decreases(base in 1u64..10_000, factor in 1.0f64..4.0, n in 1u32..200) {
            let p = BackoffPolicy { base_ms: base, factor, cap_ms: base * 1000, ..Default::default() };
            prop_assert!(p.nominal_delay_ms(n) <= p.nominal_delay_ms(n + 1));
        }
    }
}
