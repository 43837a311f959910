//! Scenarios: when jobs are submitted. Open-loop scenarios (burst, rate, ramp, step) are a pure
//! schedule of arrival times, computed here and unit tested; the closed loop keeps a fixed number
//! of jobs in flight and has no schedule.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Scenario {
    /// `jobs` submitted at once.
    Burst { jobs: u64 },
    /// A constant rate for a duration.
    Rate { jobs_per_s: f64, duration_s: f64 },
    /// A rate rising (or falling) linearly from `from` to `to` over the duration.
    Ramp { from_jobs_per_s: f64, to_jobs_per_s: f64, duration_s: f64 },
    /// Constant rates one after the other, each held for `step_s`.
    Step { jobs_per_s: Vec<f64>, step_s: f64 },
    /// `concurrency` jobs in flight: each finished job is replaced by a new one, until `jobs` were
    /// submitted or `duration_s` passed (whichever comes first; at least one must be set).
    Closed { concurrency: u32, jobs: Option<u64>, duration_s: Option<f64> },
}

impl Scenario {
    /// Checks the parameters; the error names the bad one.
    pub fn validate(&self) -> Result<(), String> {
        let rate_ok = |name: &str, r: f64| {
            if r.is_finite() && r >= 0.0 { Ok(()) } else { Err(format!("{name}: {r} is not a rate (jobs/s >= 0)")) }
        };
        let dur_ok = |name: &str, d: f64| {
            if d.is_finite() && d > 0.0 { Ok(()) } else { Err(format!("{name}: {d} must be a number of seconds > 0")) }
        };
        match self {
            Scenario::Burst { jobs } if *jobs == 0 => Err("jobs: must be at least 1".into()),
            Scenario::Burst { .. } => Ok(()),
            Scenario::Rate { jobs_per_s, duration_s } => {
                rate_ok("jobs_per_s", *jobs_per_s)?;
                dur_ok("duration_s", *duration_s)?;
                if *jobs_per_s <= 0.0 {
                    return Err("jobs_per_s: must be above 0".into());
                }
                Ok(())
            }
            Scenario::Ramp { from_jobs_per_s, to_jobs_per_s, duration_s } => {
                rate_ok("from_jobs_per_s", *from_jobs_per_s)?;
                rate_ok("to_jobs_per_s", *to_jobs_per_s)?;
                dur_ok("duration_s", *duration_s)?;
                if *from_jobs_per_s + *to_jobs_per_s <= 0.0 {
                    return Err("a ramp from 0 to 0 submits nothing".into());
                }
                Ok(())
            }
            Scenario::Step { jobs_per_s, step_s } => {
                dur_ok("step_s", *step_s)?;
                if jobs_per_s.is_empty() {
                    return Err("jobs_per_s: give at least one rate".into());
                }
                for r in jobs_per_s {
                    rate_ok("jobs_per_s", *r)?;
                }
                Ok(())
            }
            Scenario::Closed { concurrency, jobs, duration_s } => {
                if *concurrency == 0 {
                    return Err("concurrency: must be at least 1".into());
                }
                if jobs.is_none() && duration_s.is_none() {
                    return Err("closed loop: set jobs, duration_s, or both".into());
                }
                if let Some(d) = duration_s {
                    dur_ok("duration_s", *d)?;
                }
                if *jobs == Some(0) {
                    return Err("jobs: must be at least 1".into());
                }
                Ok(())
            }
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Scenario::Burst { .. } => "burst",
            Scenario::Rate { .. } => "rate",
            Scenario::Ramp { .. } => "ramp",
            Scenario::Step { .. } => "step",
            Scenario::Closed { .. } => "closed",
        }
    }

    /// One line for people: "burst of 2000 jobs".
    pub fn describe(&self) -> String {
        match self {
            Scenario::Burst { jobs } => format!("burst of {jobs} jobs"),
            Scenario::Rate { jobs_per_s, duration_s } => format!("{jobs_per_s} jobs/s for {duration_s} s"),
            Scenario::Ramp { from_jobs_per_s, to_jobs_per_s, duration_s } => {
                format!("ramp {from_jobs_per_s} -> {to_jobs_per_s} jobs/s over {duration_s} s")
            }
            Scenario::Step { jobs_per_s, step_s } => {
                let rates: Vec<String> = jobs_per_s.iter().map(|r| r.to_string()).collect();
                format!("steps of {step_s} s at {} jobs/s", rates.join(", "))
            }
            Scenario::Closed { concurrency, jobs, duration_s } => {
                let mut s = format!("closed loop, {concurrency} in flight");
                if let Some(n) = jobs {
                    s.push_str(&format!(", {n} jobs"));
                }
                if let Some(d) = duration_s {
                    s.push_str(&format!(", at most {d} s"));
                }
                s
            }
        }
    }

    /// The number of jobs the scenario submits, when it is known in advance.
    pub fn planned_jobs(&self) -> Option<u64> {
        match self {
            Scenario::Closed { jobs, duration_s: None, .. } => *jobs,
            Scenario::Closed { .. } => None,
            open => {
                let mut n = 0u64;
                while open.arrival_s(n).is_some() {
                    n += 1;
                    if n > 100_000_000 {
                        return None;
                    }
                }
                Some(n)
            }
        }
    }

    /// When (seconds after the start) the open-loop job `i` (0-based) is submitted; `None` past
    /// the last job, and always `None` for the closed loop.
    pub fn arrival_s(&self, i: u64) -> Option<f64> {
        let k = i as f64;
        match self {
            Scenario::Burst { jobs } => (i < *jobs).then_some(0.0),
            Scenario::Rate { jobs_per_s, duration_s } => {
                let t = k / jobs_per_s;
                (t < *duration_s).then_some(t)
            }
            Scenario::Ramp { from_jobs_per_s: r0, to_jobs_per_s: r1, duration_s: d } => {
                // jobs submitted by time t: n(t) = r0 t + (r1 - r0) t^2 / (2 d); job i arrives at n(t) = i
                let a = (r1 - r0) / (2.0 * d);
                let t = if a.abs() < 1e-12 {
                    k / r0
                } else {
                    let disc = r0 * r0 + 4.0 * a * k;
                    if disc < 0.0 {
                        return None; // a falling ramp that never reaches job i
                    }
                    (-r0 + disc.sqrt()) / (2.0 * a)
                };
                (t.is_finite() && t >= 0.0 && t < *d).then_some(t)
            }
            Scenario::Step { jobs_per_s, step_s } => {
                let mut before = 0.0; // jobs submitted before this step
                for (s, rate) in jobs_per_s.iter().enumerate() {
                    let in_step = rate * step_s;
                    // job i falls in this step when before <= k < before + in_step (integer boundaries)
                    if k < (before + in_step).floor().max(before) && *rate > 0.0 {
                        return Some(s as f64 * step_s + (k - before) / rate);
                    }
                    before = (before + in_step).floor().max(before);
                }
                None
            }
            Scenario::Closed { .. } => None,
        }
    }

    /// How long the open-loop schedule lasts (the closed loop: its duration, if any).
    pub fn duration_s(&self) -> Option<f64> {
        match self {
            Scenario::Burst { .. } => Some(0.0),
            Scenario::Rate { duration_s, .. } | Scenario::Ramp { duration_s, .. } => Some(*duration_s),
            Scenario::Step { jobs_per_s, step_s } => Some(jobs_per_s.len() as f64 * step_s),
            Scenario::Closed { duration_s, .. } => *duration_s,
        }
    }

    pub fn is_closed(&self) -> bool {
        matches!(self, Scenario::Closed { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arrivals(s: &Scenario) -> Vec<f64> {
        (0..).map_while(|i| s.arrival_s(i)).collect()
    }

    #[test]
    fn burst_submits_everything_at_once() {
        let s = Scenario::Burst { jobs: 5 };
        assert_eq!(arrivals(&s), vec![0.0; 5]);
        assert_eq!(s.planned_jobs(), Some(5));
    }

    #[test]
    fn constant_rate_spaces_jobs_evenly() {
        let s = Scenario::Rate { jobs_per_s: 4.0, duration_s: 2.0 };
        assert_eq!(arrivals(&s), vec![0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75]);
    }

    #[test]
    fn ramp_submits_the_area_under_the_rate() {
        // 0 -> 100 jobs/s over 10 s: 500 jobs, arriving ever faster
        let s = Scenario::Ramp { from_jobs_per_s: 0.0, to_jobs_per_s: 100.0, duration_s: 10.0 };
        let a = arrivals(&s);
        assert!((499..=501).contains(&a.len()), "{}", a.len());
        assert!(a.windows(2).all(|w| w[1] >= w[0]));
        let first_gap = a[2] - a[1];
        let last_gap = a[a.len() - 1] - a[a.len() - 2];
        assert!(last_gap < first_gap / 5.0, "{first_gap} {last_gap}");
        // a flat ramp is a constant rate
        let flat = Scenario::Ramp { from_jobs_per_s: 10.0, to_jobs_per_s: 10.0, duration_s: 1.0 };
        assert_eq!(arrivals(&flat).len(), 10);
        // a falling ramp ends with the slowest gaps
        let down = Scenario::Ramp { from_jobs_per_s: 100.0, to_jobs_per_s: 0.0, duration_s: 10.0 };
        let d = arrivals(&down);
        assert!((499..=501).contains(&d.len()), "{}", d.len());
        assert!(d.iter().all(|t| *t < 10.0));
    }

    #[test]
    fn steps_hold_each_rate_for_its_step() {
        let s = Scenario::Step { jobs_per_s: vec![2.0, 0.0, 4.0], step_s: 1.0 };
        assert_eq!(arrivals(&s), vec![0.0, 0.5, 2.0, 2.25, 2.5, 2.75]);
        assert_eq!(s.duration_s(), Some(3.0));
    }

    #[test]
    fn the_closed_loop_has_no_schedule() {
        let s = Scenario::Closed { concurrency: 4, jobs: Some(10), duration_s: None };
        assert_eq!(s.arrival_s(0), None);
        assert_eq!(s.planned_jobs(), Some(10));
        assert!(s.validate().is_ok());
        let unbounded = Scenario::Closed { concurrency: 4, jobs: None, duration_s: None };
        assert!(unbounded.validate().expect_err("no bound").contains("closed loop"));
    }

    #[test]
    fn invalid_parameters_are_named() {
        assert!(Scenario::Burst { jobs: 0 }.validate().expect_err("0").contains("jobs"));
        let e = Scenario::Rate { jobs_per_s: f64::NAN, duration_s: 1.0 }.validate().expect_err("nan");
        assert!(e.contains("jobs_per_s"), "{e}");
        let e = Scenario::Rate { jobs_per_s: 1.0, duration_s: 0.0 }.validate().expect_err("0 s");
        assert!(e.contains("duration_s"), "{e}");
        let e = Scenario::Step { jobs_per_s: vec![], step_s: 1.0 }.validate().expect_err("empty");
        assert!(e.contains("jobs_per_s"), "{e}");
    }
}
